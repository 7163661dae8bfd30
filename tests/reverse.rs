//! Reverse connections for firewalls and NAT: the sender listens
//! (`--listen`), the receiver dials (`--connect`), same guarantees.

use crate::util::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const FOOT: usize = 2 << 20;

/// Starts a listening sender; returns it and its port.
fn listening_tx(extra: &[&str], input: Arc<Vec<u8>>) -> (Proc, u16) {
    let mut args = vec!["--listen", "0"];
    args.extend_from_slice(extra);
    let t = tx(&args, input);
    let port = port_of(&t);
    (t, port)
}

#[test]
fn the_receiver_dials_a_listening_sender() {
    let input = Arc::new(data(8 * FOOT + 5, 51));
    let (mut t, port) = listening_tx(&["verbose", "2"], Arc::clone(&input));
    let (mut r, _) = Proc::spawn(
        "rx",
        &["--connect", &format!("127.0.0.1:{port}"), "threads", "3"],
        Out::Collect,
    );
    expect_delivered(&mut t, &mut r, &input, "reverse");
    t.expect_stderr("dialed in");
}

#[test]
fn reverse_connections_survive_resets() {
    let input = Arc::new(data(48 << 20, 52));
    let (mut t, port) = listening_tx(&["verbose", "2"], Arc::clone(&input));
    // The feet flow from the proxied server (tx) back to its client (rx).
    let proxy = FaultProxy::with(port, |n| Fault {
        reset_after: Some((1 << 20) + (n * 777_777) % (6 << 20)),
        replies: true,
        ..Fault::default()
    });
    let (mut r, _) = Proc::spawn(
        "rx",
        &[
            "--connect",
            &format!("127.0.0.1:{}", proxy.port),
            "threads",
            "4",
        ],
        Out::Collect,
    );
    expect_delivered(&mut t, &mut r, &input, "reverse through the fault proxy");
    let resets = proxy.resets.load(Ordering::Relaxed);
    assert!(resets >= 10, "only {resets} resets");
    assert!(
        !t.stderr().contains(" 0 retransmitted feet"),
        "{}",
        t.stderr()
    );
}

#[test]
fn reverse_connections_with_keys_and_encryption() {
    let key = key_file("reverse", 9);
    let k = key.to_str().unwrap();
    let input = Arc::new(data(3 * FOOT, 53));
    let (mut t, port) = listening_tx(&["--key-file", k, "--encrypt"], Arc::clone(&input));
    let (mut r, _) = Proc::spawn(
        "rx",
        &["--connect", &format!("127.0.0.1:{port}"), "--key-file", k],
        Out::Collect,
    );
    expect_delivered(&mut t, &mut r, &input, "reverse, encrypted");
    // At the default verbosity a clean run says nothing: no rank the
    // receiver chose not to dial is reported as unreachable.
    assert!(!t.stderr().contains("no connection to"), "{}", t.stderr());
    assert!(!r.stderr().contains("warn"), "{}", r.stderr());
}

#[test]
fn a_receiver_that_cannot_reach_its_sender_gives_up() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (mut r, _) = Proc::spawn(
        "rx",
        &[
            "--connect",
            &format!("127.0.0.1:{dead}"),
            "--reconnect-timeout",
            "1",
        ],
        Out::Collect,
    );
    assert_eq!(r.wait(DEADLINE).code(), Some(1));
    r.expect_stderr("giving up");
}
