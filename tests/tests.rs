//! End-to-end tests: the real binary on loopback.

mod attacks;
mod control;
#[allow(dead_code)]
#[path = "../benches/emulator.rs"]
mod emulator;
mod emulator_checks;
mod ends;
mod flows;
mod hostile;
mod keywords;
mod library;
mod observe;
mod relay;
mod reverse;
mod security;
mod sockets;
mod ssh;
mod tunnel;
mod udp;
mod util;
mod waits;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use util::*;

const FOOT: usize = 2 << 20;

#[test]
fn sizes_around_the_foot_boundary_arrive_exactly() {
    for (i, len) in [0, 1, FOOT - 1, FOOT, FOOT + 1, 3 * FOOT + 17]
        .into_iter()
        .enumerate()
    {
        transfer(data(len, i as u64 + 1), &["threads", "4"], &[]);
    }
}

#[test]
fn a_hundred_megabytes_with_1_4_and_16_threads() {
    let input = data(100 << 20, 7);
    for threads in ["1", "4", "16"] {
        transfer(input.clone(), &["threads", threads], &[]);
    }
}

#[test]
fn small_feet_many_in_flight() {
    // Many feet, small window: exercises flow control and reordering.
    transfer(
        data(5 << 20, 3),
        &["threads", "8", "--foot-size", "4K", "--window", "4"],
        &[],
    );
}

#[test]
fn three_ranked_destinations() {
    let input = Arc::new(data(40 << 20, 11));
    let (mut r, port) = rx(&[]);
    let p = port.to_string();
    let args = [
        "tx",
        "127.0.0.1",
        &p,
        "tx",
        "127.0.0.2",
        &p,
        "tx",
        "localhost",
        &p,
        "threads",
        "2",
        "verbose",
        "1",
    ];
    let mut t = tx(&args, Arc::clone(&input));
    expect_delivered(&mut t, &mut r, &input, "three destinations");
    // Every destination was connected, including the second address.
    let err = t.stderr();
    for dest in ["127.0.0.1", "127.0.0.2", "localhost"] {
        assert!(
            err.contains(&format!("connected to {dest}:{p}")),
            "no connection to {dest}:\n{err}"
        );
    }
}

#[test]
fn a_preferred_destination_carries_the_stream_when_it_keeps_up() {
    // A source paced by the receiver's output: each foot is sent only once
    // the one before it is written, so the first destination always has
    // room and the second must never be given a foot.
    let (mut r, mut stdout) = Proc::spawn("rx", &["rx", "0"], Out::Pipe);
    let p = port_of(&r).to_string();
    let args = [
        "tx",
        "127.0.0.1",
        &p,
        "tx",
        "127.0.0.2",
        &p,
        "threads",
        "2",
        "verbose",
        "2",
        "--foot-size",
        "64K",
    ];
    let (mut t, feed) = tx_fed(&args);
    // Every connection up first: a foot that waits half a second for a
    // better destination still connecting goes to a worse one (the start's
    // rule), which a loaded machine can make happen.
    let (mut first, mut second) = (0, 0);
    while first < 2 || second < 2 {
        let line = t.wait_line("connected to", Duration::from_secs(20));
        first += usize::from(line.contains(&format!("127.0.0.1:{p}")));
        second += usize::from(line.contains(&format!("127.0.0.2:{p}")));
    }
    let input = data(20 * (64 << 10), 5);
    let stdout = stdout.as_mut().unwrap();
    let mut got = vec![0u8; 64 << 10];
    for chunk in input.chunks(64 << 10) {
        feed.send(chunk.to_vec()).unwrap();
        stdout.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], chunk);
    }
    drop(feed);
    assert_eq!(
        stdout.read(&mut got).unwrap(),
        0,
        "output continues past the input"
    );
    assert!(t.wait(DEADLINE).success(), "{}", t.stderr());
    assert!(r.wait(DEADLINE).success(), "{}", r.stderr());
    let err = t.stderr();
    let second: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("127.0.0.2:") && l.contains("worker-"))
        .collect();
    assert_eq!(
        second.len(),
        2,
        "no report lines for the second destination:\n{err}"
    );
    assert!(
        second.iter().all(|l| l.contains(" 0 feet")),
        "second destination carried feet:\n{err}"
    );
}

#[test]
fn connections_reset_mid_stream_lose_nothing() {
    let input = Arc::new(data(64 << 20, 13));
    let (mut r, port) = rx(&[]);
    // Every connection is reset after 1-7 MiB of traffic, mostly in the
    // middle of a foot; most still deliver a foot or more, so the stream
    // progresses.
    let proxy = FaultProxy::start(port, |n| Some((1 << 20) + (n * 777_777) % (6 << 20)));
    let pp = proxy.port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &pp, "threads", "4", "verbose", "2"],
        Arc::clone(&input),
    );
    expect_delivered(&mut t, &mut r, &input, "through the fault proxy");
    let resets = proxy.resets.load(Ordering::Relaxed);
    eprintln!("fault proxy: {resets} connections reset");
    assert!(resets >= 15, "only {resets} resets happened");
    let err = t.stderr();
    assert!(
        !err.contains("retransmitted feet 0,"),
        "no foot was retransmitted:\n{err}"
    );
}

#[test]
fn a_connection_gone_silent_is_closed_and_its_feet_sent_elsewhere() {
    // The first two connections stop delivering after 7 MiB but stay open
    // and their TCP keeps acknowledging: nothing below the application
    // notices. Without tx's watchdog their feet would hold the window
    // forever. (Both, because which of them carries 7 MiB first is a race:
    // the whole transfer takes a fraction of a second.)
    let (mut r, port) = rx(&[]);
    let proxy = FaultProxy::with(port, |n| Fault {
        stall_after: (n < 2).then_some(7 << 20),
        ..Fault::default()
    });
    let input = Arc::new(data(40 << 20, 23));
    let pp = proxy.port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &pp, "threads", "2", "verbose", "1"],
        Arc::clone(&input),
    );
    expect_delivered(&mut t, &mut r, &input, "with a silent connection");
    let err = t.stderr();
    let stalls = proxy.stalls.load(Ordering::Relaxed);
    let closed: u64 = err
        .split(" stalled connections closed")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of stalled connections:\n{err}"));
    assert!(stalls >= 1, "no connection carried 7 MiB:\n{err}");
    assert!(
        err.contains("connection stalled") && closed >= stalls,
        "the watchdog closed {closed} of {stalls} silent connections:\n{err}"
    );
}

#[test]
fn an_unreachable_first_destination_is_skipped() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    let (mut r, port) = rx(&[]);
    let p = port.to_string();
    let input = Arc::new(data(6 * FOOT + 1, 19));
    let args = [
        "tx",
        "127.0.0.1",
        &dead,
        "tx",
        "127.0.0.1",
        &p,
        "threads",
        "2",
        "verbose",
        "2",
    ];
    let mut t = tx(&args, Arc::clone(&input));
    expect_delivered(&mut t, &mut r, &input, "past a dead destination");
    t.expect_stderr("refused");
}

#[test]
fn a_failing_stdin_fails_tx_with_the_reason() {
    let (_r, port) = rx(&[]);
    let p = port.to_string();
    let dir = std::fs::File::open("/").expect("open /");
    let (mut t, _) = Proc::spawn_with("tx", &["tx", "127.0.0.1", &p], Out::Collect, dir.into());
    assert_eq!(t.wait(Duration::from_secs(20)).code(), Some(1));
    t.expect_stderr("read stdin");
}

#[test]
fn destinations_leading_to_different_receivers_are_refused() {
    let (_r1, port1) = rx(&[]);
    let (_r2, port2) = rx(&[]);
    let (p1, p2) = (port1.to_string(), port2.to_string());
    let args = [
        "tx",
        "127.0.0.1",
        &p1,
        "tx",
        "127.0.0.1",
        &p2,
        "threads",
        "1",
    ];
    let mut t = tx(&args, Arc::new(data(3 * FOOT, 47)));
    assert_eq!(t.wait(Duration::from_secs(20)).code(), Some(1));
    assert!(
        t.stderr()
            .contains("not the receiver the stream started with"),
        "{}",
        t.stderr()
    );
}

#[test]
fn rx_started_after_tx() {
    let port = {
        let l = std::net::TcpListener::bind("[::]:0").expect("bind");
        l.local_addr().unwrap().port()
    };
    let p = port.to_string();
    let input = Arc::new(data(10 << 20, 17));
    let mut t = tx(
        &["tx", "localhost", &p, "threads", "4", "verbose", "2"],
        Arc::clone(&input),
    );
    t.wait_line("connect to localhost", Duration::from_secs(20));
    let (mut r, _) = Proc::spawn("rx", &["rx", &p], Out::Collect);
    expect_delivered(&mut t, &mut r, &input, "rx started late");
}

#[test]
fn tx_gives_up_when_rx_is_killed() {
    let (r, port) = rx(&[]);
    let p = port.to_string();
    let (mut t, feed) = tx_fed(&[
        "tx",
        "127.0.0.1",
        &p,
        "threads",
        "2",
        "--reconnect-timeout",
        "2",
        "verbose",
        "1",
    ]);
    feed.send(data(FOOT * 2, 1)).unwrap();
    t.wait_line("connected to", Duration::from_secs(10));
    r.signal("KILL");
    let status = t.wait(Duration::from_secs(30));
    assert!(!status.success(), "tx succeeded without a receiver");
    assert_eq!(status.code(), Some(1));
    let err = t.stderr();
    assert!(err.contains("giving up"), "no reason given:\n{err}");
    drop(feed);
}

#[test]
fn rx_gives_up_when_tx_is_killed() {
    let (mut r, port) = rx(&["--reconnect-timeout", "2", "verbose", "1"]);
    let p = port.to_string();
    let (t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "2"]);
    let input = data(FOOT + 5, 1);
    feed.send(input.clone()).unwrap();
    r.wait_line("connected", Duration::from_secs(10));
    t.signal("KILL");
    let (status, out) = r.output();
    assert_eq!(status.code(), Some(1), "{}", r.stderr());
    r.expect_stderr("giving up");
    assert_prefix(&out, &input, "rx after tx was killed");
}

#[test]
fn garbage_and_half_open_connections_do_not_disturb_the_stream() {
    let (mut r, port) = rx(&["--handshake-timeout", "1", "verbose", "1"]);
    let p = port.to_string();
    let input = data(12 * FOOT + 3, 23);
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "4"]);
    feed.send(input[..4 * FOOT].to_vec()).unwrap();
    r.wait_line("connected", Duration::from_secs(10));

    let half_open: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    for seed in 0..5 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(&data(100_000, seed + 100));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        // rx hangs up on garbage: EOF or a reset, never a hang.
        match s.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("rx answered garbage with {n} bytes"),
        }
    }
    // A header-sized hello with the right magic but nothing after it.
    let mut partial = TcpStream::connect(("127.0.0.1", port)).unwrap();
    partial.write_all(b"VIAMPEDE\x00\x01").unwrap();
    feed.send(input[4 * FOOT..].to_vec()).unwrap();
    drop(feed);
    // Half-open connections are dropped once their handshake time is up.
    for mut s in half_open {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1];
        assert!(
            matches!(s.read(&mut buf), Ok(0) | Err(_)),
            "half-open connection kept"
        );
    }
    expect_delivered(&mut t, &mut r, &input, "with garbage around");
    r.expect_stderr("not a viamillipede handshake");
    drop(partial);
}

#[test]
fn a_second_session_is_refused_while_a_stream_runs() {
    let (mut r, port) = rx(&[]);
    let p = port.to_string();
    let input = data(3 * FOOT, 29);
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "2", "verbose", "1"]);
    feed.send(input[..FOOT].to_vec()).unwrap();
    t.wait_line("connected to", Duration::from_secs(10));

    let mut intruder = tx(
        &["tx", "127.0.0.1", &p, "threads", "1"],
        Arc::new(b"intruder".to_vec()),
    );
    let status = intruder.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
    intruder.expect_stderr("busy");

    feed.send(input[FOOT..].to_vec()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "first session");
}

#[test]
fn a_wrong_checkphrase_is_refused_and_rx_keeps_waiting() {
    let (mut r, port) = rx(&["checkphrase", "abcd"]);
    let p = port.to_string();
    let mut wrong = tx(
        &["tx", "127.0.0.1", &p, "checkphrase", "wxyz"],
        Arc::new(b"no".to_vec()),
    );
    assert_eq!(wrong.wait(Duration::from_secs(20)).code(), Some(1));
    wrong.expect_stderr("checkphrase mismatch");
    r.wait_line("refused: checkphrase mismatch", Duration::from_secs(10));
    let input = Arc::new(data(FOOT + 1, 31));
    let mut right = tx(
        &["--tx", &format!("127.0.0.1:{p}"), "--checkphrase", "abcd"],
        Arc::clone(&input),
    );
    expect_delivered(&mut right, &mut r, &input, "after a refused sender");
}

#[test]
fn sigusr1_reports_without_disturbing_stdout() {
    let (mut r, port) = rx(&["verbose", "1"]);
    let p = port.to_string();
    let input = data(4 * FOOT, 37);
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "3"]);
    feed.send(input[..2 * FOOT].to_vec()).unwrap();
    // Once rx has a connection, both sides have their handlers installed.
    r.wait_line("connected", Duration::from_secs(10));
    t.signal("USR1");
    t.wait_line("viamillipede tx report", Duration::from_secs(10));
    t.wait_line("worker-2", Duration::from_secs(10));
    t.wait_line("retransmitted feet", Duration::from_secs(10));
    r.signal("USR1");
    r.wait_line("viamillipede rx report", Duration::from_secs(10));
    r.wait_line("feet buffered", Duration::from_secs(10));
    feed.send(input[2 * FOOT..].to_vec()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "with reports");
}

#[test]
fn a_closed_rx_stdout_fails_both_sides_with_the_reason() {
    let (mut r, mut stdout) = Proc::spawn("rx", &["rx", "0"], Out::Pipe);
    let port = port_of(&r).to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &port, "threads", "2"],
        Arc::new(data(40 << 20, 41)),
    );
    let mut first = [0u8; 1];
    stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    drop(stdout);
    let rs = r.wait(Duration::from_secs(30));
    let ts = t.wait(Duration::from_secs(30));
    assert_eq!(rs.code(), Some(1), "{}", r.stderr());
    assert_eq!(ts.code(), Some(1), "{}", t.stderr());
    r.expect_stderr("write to stdout");
    // The reason comes in the receiver's abort, or in its refusal of a
    // connection made after it failed (a worker may dial that late).
    t.expect_stderr("receiver: ");
    t.expect_stderr("write to stdout");
}

#[test]
fn legacy_and_dashed_syntax_behave_the_same() {
    let input = data(FOOT * 2 + 99, 43);
    let (legacy_tx, _) = transfer(
        input.clone(),
        &["threads", "2", "verbose", "2", "checkphrase", "wxyz"],
        &["checkphrase", "wxyz"],
    );
    let (dashed_tx, _) = transfer(
        input,
        &["--threads", "2", "--verbose", "2", "--checkphrase", "wxyz"],
        &["--checkphrase", "wxyz"],
    );
    for err in [legacy_tx, dashed_tx] {
        assert!(
            err.contains("worker-1") && !err.contains("worker-2"),
            "{err}"
        );
    }
}

#[test]
fn bad_command_lines_exit_2_naming_the_word() {
    let cases: &[(&[&str], &str)] = &[
        (&["rx", "1", "frobnicate"], "frobnicate"),
        (&["tx", "host"], "tx"),
        (&["tx", "host", "80", "threads", "0"], "threads"),
        (&["tx", "host", "80", "threads", "100"], "100"),
        (&["rx", "1", "checkphrase", "toolong"], "checkphrase"),
        (&["rx", "1", "terminate", "3"], "terminate"),
        (&["rx", "99999"], "99999"),
        (&[], "nothing to do"),
    ];
    for (args, word) in cases {
        let (mut p, _) = Proc::spawn("bad", args, Out::Collect);
        let (status, out) = p.output();
        assert_eq!(status.code(), Some(2), "{args:?}: {}", p.stderr());
        let err = p.stderr();
        assert!(
            err.contains(word),
            "{args:?}: error does not name {word:?}: {err}"
        );
        assert!(err.contains("usage:"), "{args:?}: no usage hint: {err}");
        assert!(out.is_empty());
    }
}

#[test]
fn help_and_version() {
    let (mut p, _) = Proc::spawn("help", &["--help"], Out::Collect);
    let (status, out) = p.output();
    assert!(status.success());
    let help = String::from_utf8(out).unwrap();
    for word in [
        "--threads",
        "--tx",
        "--rx",
        "--reconnect-timeout",
        "Examples",
        "SIGUSR1",
        "Memory",
        "--key-file",
        "--encrypt",
        "SIGTERM",
    ] {
        assert!(help.contains(word), "help lacks {word}");
    }
    let (mut p, _) = Proc::spawn("version", &["--version"], Out::Collect);
    let (status, out) = p.output();
    assert!(status.success());
    assert!(String::from_utf8(out).unwrap().starts_with("viamillipede "));
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let l = std::net::TcpListener::bind("[::]:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    let (mut p, _) = Proc::spawn("rx", &["rx", &port], Out::Collect);
    assert_eq!(p.wait(Duration::from_secs(10)).code(), Some(1));
    p.expect_stderr(&format!("listen on port {port}"));
}

#[test]
fn the_man_page_is_current() {
    // Regenerate with: VIAMILLIPEDE_BLESS=1 cargo test the_man_page_is_current
    use clap::CommandFactory;
    use clap_mangen::roff::{roman, Roff};
    use viamillipede::cli;
    let man = clap_mangen::Man::new(cli::Cli::command());
    let mut page = Vec::new();
    for render in [
        clap_mangen::Man::render_title,
        clap_mangen::Man::render_name_section,
        clap_mangen::Man::render_synopsis_section,
        clap_mangen::Man::render_description_section,
        clap_mangen::Man::render_options_section,
    ] {
        render(&man, &mut page).expect("render the man page");
    }
    let examples = cli::EXAMPLES.trim_start_matches("Examples:\n");
    let mut roff = Roff::default();
    for (title, text, literal) in [
        ("EXAMPLES", examples, true),
        ("SIGNALS", cli::SIGNALS, false),
        ("EXIT STATUS", cli::EXIT_STATUS, false),
        ("FILES", cli::FILES, false),
        ("STATS DOCUMENT", cli::STATS_SCHEMA, true),
    ] {
        roff.control("SH", [title]);
        if literal {
            roff.control("nf", []);
        }
        for line in text.lines() {
            roff.text([roman(line)]);
        }
        if literal {
            roff.control("fi", []);
        }
    }
    roff.to_writer(&mut page).expect("render the man page");
    clap_mangen::Man::render_version_section(&man, &mut page).expect("render the man page");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("viamillipede.1");
    if std::env::var_os("VIAMILLIPEDE_BLESS").is_some() {
        std::fs::write(&path, &page).expect("write viamillipede.1");
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == page,
        "viamillipede.1 is out of date: VIAMILLIPEDE_BLESS=1 cargo test the_man_page_is_current"
    );
    let text = String::from_utf8(page).unwrap();
    for word in [
        "rx",
        "tx",
        "threads",
        "verbose",
        "checkphrase",
        "prbs",
        "leglimit",
        "delayus",
        "chaos",
        "checksums",
        "charmode",
        "terminate",
        "initiate",
        "key\\-file",
        "encrypt",
        "EXAMPLES",
        "SIGNALS",
        "EXIT STATUS",
        "FILES",
        "viamillipede\\-stats/1",
        "ssh",
    ] {
        assert!(text.contains(word), "the man page lacks {word}");
    }
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let (mut p, _) = Proc::spawn("completions", &["--completions", shell], Out::Collect);
        let (status, out) = p.output();
        assert!(status.success(), "{shell}: {}", p.stderr());
        let script = String::from_utf8(out).unwrap();
        assert!(
            script.contains("viamillipede") && script.contains("threads"),
            "{shell}: {script:.200}"
        );
        if shell != "bash" {
            assert!(script.contains("rx tx ssh threads"), "{shell}: no keywords");
        }
        if shell == "bash" {
            // The keywords are offered, and a number is never a file name.
            assert!(script.contains("opts=\"rx tx ssh threads"), "{script:.300}");
            let threads = script.split("--threads)").nth(1).unwrap_or_default();
            let threads = threads.split(";;").next().unwrap_or_default();
            assert!(!threads.contains("compgen -f"), "{threads}");
            let key = script.split("--key-file)").nth(1).unwrap_or_default();
            assert!(key
                .split(";;")
                .next()
                .unwrap_or_default()
                .contains("compgen -f"));
        }
    }
}
