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
