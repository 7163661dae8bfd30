//! The original tool's test and pacing keywords: prbs, leglimit, delayus,
//! charmode, and the rate cap.

use crate::util::*;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};
use viamillipede::prbs::Prbs;

const FOOT: usize = 2 << 20;

fn prbs_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Prbs::new(seed).fill(&mut v);
    v
}

#[test]
fn prbs_streams_are_checked_by_rx() {
    let (mut r, port) = rx(&["prbs", "7", "verbose", "1"]);
    let p = port.to_string();
    let mut t = tx(
        &[
            "tx",
            "127.0.0.1",
            &p,
            "prbs",
            "7",
            "leglimit",
            "5",
            "threads",
            "4",
        ],
        Arc::new(Vec::new()),
    );
    expect_delivered(&mut t, &mut r, &prbs_bytes(7, 5 * FOOT), "prbs 7");
    r.expect_stderr("match the seed's stream");

    // Another seed: every byte is still written, and rx says where it differs.
    let (mut r, port) = rx(&["prbs", "8"]);
    let p = port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "prbs", "7", "leglimit", "2"],
        Arc::new(Vec::new()),
    );
    assert!(t.wait(DEADLINE).success(), "{}", t.stderr());
    let (status, out) = r.output();
    assert_eq!(status.code(), Some(1), "{}", r.stderr());
    r.expect_stderr("differs from the seed's at byte 0");
    assert_same(
        &out,
        &prbs_bytes(7, 2 * FOOT),
        "prbs written despite the mismatch",
    );
}

#[test]
fn leglimit_stops_after_n_feet() {
    let (mut r, port) = rx(&[]);
    let p = port.to_string();
    let input = Arc::new(data(5 * FOOT, 3));
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "leglimit", "2"],
        Arc::clone(&input),
    );
    expect_delivered(&mut t, &mut r, &input[..2 * FOOT], "leglimit 2");
}

#[test]
fn delayus_waits_before_each_foot() {
    let (mut r, port) = rx(&[]);
    let p = port.to_string();
    let input = Arc::new(data(4 * 1024, 4));
    let start = Instant::now();
    let args = [
        "tx",
        "127.0.0.1",
        &p,
        "delayus",
        "150000",
        "--foot-size",
        "1K",
    ];
    let mut t = tx(&args, Arc::clone(&input));
    expect_delivered(&mut t, &mut r, &input, "delayus");
    // Four feet and the end foot, 150 ms before each.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(750),
        "5 delays of 150 ms took only {took:?}"
    );
}

#[test]
fn rate_caps_the_sending_rate() {
    let (mut r, port) = rx(&[]);
    let p = port.to_string();
    let input = Arc::new(data(3 << 20, 5));
    let start = Instant::now();
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "--rate", "2M", "--foot-size", "256K"],
        Arc::clone(&input),
    );
    expect_delivered(&mut t, &mut r, &input, "rate");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "3 MiB at 2 MiB/s took only {took:?}"
    );
}

#[test]
fn charmode_sends_a_line_at_once_and_without_it_feet_wait_to_fill() {
    for charmode in [true, false] {
        let (mut r, stdout) = Proc::spawn("rx", &["rx", "0"], Out::Pipe);
        let p = port_of(&r).to_string();
        let mut args = vec!["tx", "127.0.0.1", p.as_str(), "threads", "2"];
        if charmode {
            args.push("charmode");
        }
        let (mut t, feed) = tx_fed(&args);
        let (got_tx, got) = crossbeam_channel::unbounded();
        let mut reader = stdout.expect("rx stdout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || got_tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        });
        let sent = Instant::now();
        feed.send(b"hello\n".to_vec()).unwrap();
        if charmode {
            let (at, line) = got
                .recv_timeout(Duration::from_secs(10))
                .expect("line never arrived");
            assert_eq!(line, b"hello\n");
            eprintln!("charmode: a line arrived after {:?}", at - sent);
        } else {
            assert!(
                got.recv_timeout(Duration::from_millis(500)).is_err(),
                "a short foot was sent without charmode"
            );
        }
        drop(feed);
        if !charmode {
            let (_, line) = got
                .recv_timeout(Duration::from_secs(10))
                .expect("line never arrived at EOF");
            assert_eq!(line, b"hello\n");
        }
        assert!(t.wait(DEADLINE).success(), "{}", t.stderr());
        assert!(r.wait(DEADLINE).success(), "{}", r.stderr());
    }
}

/// The digest a side printed at exit.
fn digest(p: &Proc) -> String {
    let err = p.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("stream digest"))
        .unwrap_or_else(|| panic!("{}: no digest:\n{err}", p.name));
    line.rsplit(' ').next().unwrap().to_string()
}

#[test]
fn checksums_print_the_same_digest_on_both_sides() {
    // Asked by tx, both sides print the digest; asked by rx alone, rx does
    // (tx cannot know in time that it should hash the stream).
    for tx_asks in [true, false] {
        let rx_args: &[&str] = if tx_asks {
            &["verbose", "1"]
        } else {
            &["verbose", "1", "checksums"]
        };
        let (mut r, port) = rx(rx_args);
        let p = port.to_string();
        let input = Arc::new(data(3 * FOOT + 7, 8));
        let mut args = vec!["tx", "127.0.0.1", &p, "threads", "3", "verbose", "1"];
        if tx_asks {
            args.push("checksums");
        }
        let mut t = tx(&args, Arc::clone(&input));
        expect_delivered(&mut t, &mut r, &input, "checksums");
        let want = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&input));
        assert_eq!(digest(&r), want);
        if tx_asks {
            assert_eq!(digest(&t), want);
        } else {
            assert!(!t.stderr().contains("stream digest"), "{}", t.stderr());
        }
    }
}

#[test]
fn a_corrupted_foot_is_caught_by_its_checksum_and_resent() {
    // One bit flipped inside the first foot; one worker, so that connection
    // surely carries it. Without checksums the corruption reaches the output.
    for checksums in [false, true] {
        let (mut r, port) = rx(&["verbose", "1"]);
        let proxy = FaultProxy::with(port, |n| Fault {
            reset_after: None,
            flip_at: (n == 0).then_some(44 + 16 + 1000),
            ..Fault::default()
        });
        let pp = proxy.port.to_string();
        let input = Arc::new(data(2 * FOOT, 9));
        let mut args = vec!["tx", "127.0.0.1", pp.as_str(), "threads", "1"];
        if checksums {
            args.push("checksums");
        }
        let mut t = tx(&args, Arc::clone(&input));
        let (ts, _) = t.output();
        let (rs, out) = r.output();
        assert!(
            ts.success() && rs.success(),
            "{}\n{}",
            t.stderr(),
            r.stderr()
        );
        assert_eq!(proxy.flips.load(std::sync::atomic::Ordering::Relaxed), 1);
        if checksums {
            assert_same(&out, &input, "with checksums");
            r.expect_stderr("foot checksum mismatch");
        } else {
            assert_ne!(
                out, *input,
                "the flipped bit should reach the output without checksums"
            );
        }
    }
}

#[test]
fn chaos_cuts_connections_and_the_output_stays_exact() {
    let (mut r, port) = rx(&[]);
    let p = port.to_string();
    let input = Arc::new(data(12 * FOOT + 3, 10));
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "threads", "2", "chaos", "3"],
        Arc::clone(&input),
    );
    expect_delivered(&mut t, &mut r, &input, "chaos 3");
    let err = t.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("chaos 3: injected"))
        .unwrap_or_else(|| panic!("{err}"));
    let faults: u64 = line
        .split("injected ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"));
    // At least every third of the 14 feet (13 and the end) was cut.
    assert!(faults >= 4, "only {faults} faults: {line}");
}

#[test]
fn sigusr2_cycles_the_log_level() {
    let (mut r, port) = rx(&[]);
    let p = port.to_string();
    let input = data(2 * FOOT, 11);
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p]);
    feed.send(input[..FOOT].to_vec()).unwrap();
    r.signal("USR2");
    r.wait_line("log level now INFO", Duration::from_secs(10));
    r.signal("USR2");
    r.wait_line("log level now DEBUG", Duration::from_secs(10));
    feed.send(input[FOOT..].to_vec()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "after SIGUSR2");
    // The raised level shows: debug lines appear though rx started at verbose 0.
    r.expect_stderr("debug:");
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("[::]:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

#[test]
fn duplex_loops_back_to_itself() {
    let p = free_port();
    let mut d = tx(
        &["rx", &p, "tx", "localhost", &p],
        Arc::new(b"asdf\n".to_vec()),
    );
    let (status, out) = d.output();
    assert!(status.success(), "{}", d.stderr());
    assert_eq!(out, b"asdf\n");
}

#[test]
fn two_duplex_ends_swap_streams() {
    let (pa, pb) = (free_port(), free_port());
    let (a_in, b_in) = (Arc::new(data(5 << 20, 12)), Arc::new(data(3 << 20, 13)));
    let mut a = tx(
        &["rx", &pa, "tx", "127.0.0.1", &pb, "threads", "3"],
        Arc::clone(&a_in),
    );
    let mut b = tx(
        &["rx", &pb, "tx", "127.0.0.1", &pa, "threads", "2"],
        Arc::clone(&b_in),
    );
    let (sa, a_out) = a.output();
    let (sb, b_out) = b.output();
    assert!(
        sa.success() && sb.success(),
        "{}\n{}",
        a.stderr(),
        b.stderr()
    );
    assert_same(&a_out, &b_in, "b to a");
    assert_same(&b_out, &a_in, "a to b");
}
