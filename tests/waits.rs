//! Never a silent wait: what the user is told, at the default verbosity,
//! when something is wrong or slow.

use crate::util::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

/// A port on loopback where nothing listens.
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_port_where_nothing_listens_is_told_at_once_and_again() {
    let p = dead_port().to_string();
    let (t, _feed) = tx_fed(&[
        "tx",
        "127.0.0.1",
        &p,
        "threads",
        "2",
        "--reconnect-timeout",
        "60",
    ]);
    let line = t.wait_line("waiting for the receiver", Duration::from_secs(5));
    assert!(
        line.contains("refused") && line.contains("trying again for 1 min"),
        "{line}"
    );
}

#[test]
fn a_name_that_does_not_resolve_is_an_error_at_once() {
    let (mut t, _feed) = tx_fed(&["tx", "no-such-host.invalid", "8834"]);
    let status = t.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", t.stderr());
    t.expect_stderr("cannot resolve 'no-such-host.invalid'");
}

#[test]
fn a_port_where_something_else_answers_is_an_error_at_once() {
    // An ssh server's banner, and a listener that says nothing at all.
    let banner = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let ports = [
        banner.local_addr().unwrap().port(),
        silent.local_addr().unwrap().port(),
    ];
    std::thread::spawn(move || {
        for s in banner.incoming() {
            let Ok(mut s) = s else { break };
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
            std::thread::spawn(move || {
                let _ = s.read(&mut [0u8; 1024]);
            });
        }
    });
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    // At the default handshake timeout, the wait is told after a few
    // seconds, before the error.
    let p = ports[1].to_string();
    let (t, _feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "2"]);
    let line = t.wait_line("waiting for the receiver", Duration::from_secs(6));
    assert!(
        line.contains("no connection has finished its handshake"),
        "{line}"
    );
    drop(t);
    for (port, needle) in [
        (ports[0], "is not a viamillipede receiver"),
        (ports[1], "did not answer the handshake in time"),
    ] {
        let p = port.to_string();
        let (mut t, _feed) = tx_fed(&[
            "tx",
            "127.0.0.1",
            &p,
            "threads",
            "2",
            "--handshake-timeout",
            "2",
        ]);
        let status = t.wait(Duration::from_secs(20));
        assert_eq!(status.code(), Some(1), "{}", t.stderr());
        t.expect_stderr(needle);
    }
}

#[test]
fn a_receiver_killed_mid_stream_is_told_at_once() {
    let (r, port) = rx(&["verbose", "1"]);
    let p = port.to_string();
    let (t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "4"]);
    feed.send(data(4 << 20, 401)).unwrap();
    r.wait_line("connected", Duration::from_secs(10));
    r.signal("KILL");
    let line = t.wait_line("lost every connection", Duration::from_secs(10));
    assert!(line.contains("for 5 min"), "{line}");
    drop(r);
}

#[test]
fn a_sender_killed_mid_stream_is_told_at_once() {
    let (r, port) = rx(&["verbose", "1"]);
    let p = port.to_string();
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "4"]);
    feed.send(data(4 << 20, 402)).unwrap();
    r.wait_line("connected", Duration::from_secs(10));
    t.signal("KILL");
    let line = r.wait_line(
        "every connection from the sender is gone",
        Duration::from_secs(10),
    );
    assert!(line.contains("5 min"), "{line}");
    let _ = t.wait(Duration::from_secs(5));
}

#[test]
fn a_dead_preferred_destination_is_named() {
    let (mut r, port) = rx(&[]);
    let (dead, p) = (dead_port().to_string(), port.to_string());
    let input = data(3 << 20, 403);
    let mut t = tx(
        &[
            "tx",
            "127.0.0.1",
            &dead,
            "tx",
            "127.0.0.1",
            &p,
            "threads",
            "2",
        ],
        Arc::new(input.clone()),
    );
    expect_delivered(&mut t, &mut r, &input, "dead first rank");
    t.expect_stderr(&format!("no connection to 127.0.0.1:{dead}"));
    t.expect_stderr("the transfer runs on the other destinations");
}

#[test]
fn progress_counts_what_rx_wrote_and_takes_the_size_of_a_file() {
    let (mut r, port) = rx(&[]);
    let p = port.to_string();
    let input = data(6 << 20, 404);
    let path = std::env::temp_dir().join(format!("viamillipede-progress-{}", std::process::id()));
    std::fs::write(&path, &input).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let (mut t, _) = Proc::spawn_with(
        "tx",
        &["tx", "127.0.0.1", &p, "--progress"],
        Out::Collect,
        Stdio::from(file),
    );
    let (status, _) = t.output();
    let (rs, out) = r.output();
    let _ = std::fs::remove_file(&path);
    assert!(status.success() && rs.success(), "{}", t.stderr());
    assert_same(&out, &input, "progress");
    let err = t.stderr();
    let last = err
        .lines()
        .rfind(|l| l.contains("delivered"))
        .unwrap_or_else(|| panic!("no progress line:\n{err}"));
    assert!(last.contains("6.0 MiB") && last.contains("100%"), "{last}");
}

#[test]
fn rx_counts_time_from_the_first_connection_and_every_byte_per_second() {
    let dir = std::env::temp_dir();
    let stats = dir.join(format!("viamillipede-rx-stats-{}.json", std::process::id()));
    let s = stats.to_str().unwrap();
    let (mut r, port) = rx(&["--stats-json", s]);
    // rx waits a while for its sender: that is not part of the transfer.
    std::thread::sleep(Duration::from_millis(1500));
    let input = data(5 << 20, 405);
    let p = port.to_string();
    let mut t = tx(&["tx", "127.0.0.1", &p], Arc::new(input.clone()));
    expect_delivered(&mut t, &mut r, &input, "stats");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let _ = std::fs::remove_file(&stats);
    let side = &doc["sides"][0];
    let series: u64 = side["throughput"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(series, input.len() as u64, "{doc}");
    let seconds = side["seconds"].as_f64().unwrap();
    assert!(
        seconds < 1.5,
        "rx counted its wait for the sender: {seconds} s"
    );
}

#[test]
fn options_for_the_sender_given_to_rx_are_said_to_be_ignored() {
    let (r, _) = rx(&["--compress", "threads", "4"]);
    // Told before `listening on`.
    r.expect_stderr("--compress, threads only mean something to the sender");
}

#[test]
fn an_unwritable_stats_file_is_refused_at_start() {
    let (mut t, _) = Proc::spawn(
        "tx",
        &[
            "tx",
            "127.0.0.1",
            "9",
            "--stats-json",
            "/no/such/dir/x.json",
        ],
        Out::Collect,
    );
    let status = t.wait(Duration::from_secs(5));
    assert_eq!(status.code(), Some(2), "{}", t.stderr());
    t.expect_stderr("--stats-json /no/such/dir/x.json");
}

#[test]
fn one_event_is_one_line() {
    let (mut r, port) = rx(&["verbose", "1"]);
    let p = port.to_string();
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "12"]);
    feed.send(data(8 << 20, 406)).unwrap();
    r.wait_line("connected", Duration::from_secs(10));
    t.signal("INT");
    let _ = t.wait(Duration::from_secs(20));
    let _ = r.wait(Duration::from_secs(20));
    let said = r.stderr().matches("the sender stopped the stream").count();
    assert_eq!(said, 1, "{}", r.stderr());

    // A clean run refuses nothing, even with every connection redialing
    // at the end.
    let (_, rx_err) = transfer(data(3 << 20, 407), &["threads", "16"], &["verbose", "1"]);
    assert!(rx_err.contains(" 0 connections refused"), "{rx_err}");
}

#[test]
fn sigint_on_a_receiver_whose_reader_is_stuck_says_so_and_the_second_exits() {
    let (mut r, stdout) = Proc::spawn("rx", &["rx", "0"], Out::Pipe);
    let port = port_of(&r).to_string();
    let (_t, feed) = tx_fed(&["tx", "127.0.0.1", &port, "threads", "2"]);
    feed.send(data(16 << 20, 408)).unwrap();
    // rx is writing its first 2 MiB foot; nobody reads the rest of it.
    let mut stdout = stdout.unwrap();
    stdout.read_exact(&mut [0u8; 1]).unwrap();
    r.signal("INT");
    r.wait_line("stopped reading", Duration::from_secs(10));
    r.signal("INT");
    let status = r.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{}", r.stderr());
    r.expect_stderr("SIGINT again: exiting at once");
}

#[test]
fn command_line_mistakes_get_the_right_spelling() {
    for (words, needle) in [
        (&["rx", "0", "thread", "4"][..], "did you mean 'threads'"),
        (&["--tx", "localhost", "8834"][..], "--tx localhost:8834"),
        (&["tx", "localhost:8834"][..], "tx localhost 8834"),
        (&["rx", "0", "threads", "65"][..], "give 1 to 64"),
        (&["rx", "0", "--foot-size", "1.5Q"][..], "powers of 1000"),
    ] {
        let (mut p, _) = Proc::spawn("cli", words, Out::Collect);
        assert_eq!(p.wait(Duration::from_secs(5)).code(), Some(2), "{words:?}");
        p.expect_stderr(needle);
    }
    // The reverse forms as the recipes write them, and sizes with units.
    let (mut r, _) = Proc::spawn(
        "rx --connect",
        &[
            "rx",
            "--connect",
            "127.0.0.1:9",
            "--reconnect-timeout",
            "1",
            "--foot-size",
            "1.5MiB",
        ],
        Out::Collect,
    );
    assert_eq!(
        r.wait(Duration::from_secs(10)).code(),
        Some(1),
        "{}",
        r.stderr()
    );
    r.expect_stderr("no connection");
    let (mut help, _) = Proc::spawn("help", &["--help"], Out::Collect);
    let (status, text) = help.output();
    assert!(status.success());
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("viamillipede rx [ADDR:]PORT") && text.contains("viamillipede ssh"),
        "{text:.400}"
    );
}

#[test]
fn threads_auto_finds_its_count_and_delivers_exactly() {
    let (_, rx_err) = transfer(
        data(24 << 20, 409),
        &["threads", "auto", "verbose", "1"],
        &[],
    );
    drop(rx_err);
    let (mut p, _) = Proc::spawn("cli", &["rx", "0", "threads", "0"], Out::Collect);
    assert_eq!(p.wait(Duration::from_secs(5)).code(), Some(2));
    p.expect_stderr("give 1 to 64, or auto");
}
