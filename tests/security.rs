//! Keys, encryption and attacks on the handshake.

use crate::util::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const FOOT: usize = 2 << 20;
const MARKER: &[u8] = b"PLAINTEXT-MARKER-THAT-MUST-NOT-CROSS-THE-WIRE";
/// A hello with a nonce (44 + 32 bytes) and tx's proof (32 bytes).
const HANDSHAKE_FROM_TX: usize = 44 + 32 + 32;

fn marked(len: usize, seed: u64) -> Vec<u8> {
    let mut v = MARKER.to_vec();
    v.extend(data(len, seed));
    v
}

/// Sends `input` through a recording proxy; returns what tx sent first.
fn send_recorded(input: Vec<u8>, tx_extra: &[&str], rx_extra: &[&str]) -> Vec<u8> {
    let input = Arc::new(input);
    let (mut r, port) = rx(rx_extra);
    let proxy = FaultProxy::start(port, |_| None);
    let pp = proxy.port.to_string();
    let mut args = vec!["tx", "127.0.0.1", &pp, "threads", "1"];
    args.extend_from_slice(tx_extra);
    let mut t = tx(&args, Arc::clone(&input));
    expect_delivered(&mut t, &mut r, &input, "recorded transfer");
    proxy.recorded()
}

#[test]
fn encryption_hides_the_data_whichever_side_asks() {
    let key = key_file("shared", 1);
    let k = key.to_str().unwrap();
    let input = marked(FOOT + 100, 1);
    let contains = |hay: &[u8]| hay.windows(MARKER.len()).any(|w| w == MARKER);

    let plain = send_recorded(input.clone(), &["--key-file", k], &["--key-file", k]);
    assert!(
        contains(&plain),
        "without --encrypt the data should be visible (the check works)"
    );
    let by_tx = send_recorded(
        input.clone(),
        &["--key-file", k, "--encrypt"],
        &["--key-file", k],
    );
    assert!(!contains(&by_tx), "tx --encrypt sent plaintext");
    let by_rx = send_recorded(input, &["--key-file", k], &["--key-file", k, "--encrypt"]);
    assert!(!contains(&by_rx), "rx --encrypt let tx send plaintext");
}

#[test]
fn a_larger_encrypted_transfer_with_many_connections() {
    let key = key_file("many", 2);
    let k = key.to_str().unwrap();
    let input = Arc::new(data(40 << 20, 2));
    let (mut r, port) = rx(&["--key-file", k]);
    let p = port.to_string();
    let mut t = tx(
        &[
            "tx",
            "127.0.0.1",
            &p,
            "threads",
            "8",
            "--key-file",
            k,
            "--encrypt",
        ],
        Arc::clone(&input),
    );
    expect_delivered(&mut t, &mut r, &input, "encrypted");
}

#[test]
fn a_key_on_one_side_only_is_a_clear_error_on_both() {
    let key = key_file("one-side", 3);
    let k = key.to_str().unwrap();

    let (mut r, port) = rx(&["--key-file", k]);
    let p = port.to_string();
    let mut t = tx(&["tx", "127.0.0.1", &p], Arc::new(b"no key".to_vec()));
    assert_eq!(t.wait(Duration::from_secs(20)).code(), Some(1));
    t.expect_stderr("requires a key");
    r.wait_line("requires a key", Duration::from_secs(10));
    // rx keeps waiting for a sender with the key.
    let input = Arc::new(data(1000, 3));
    let mut good = tx(
        &["tx", "127.0.0.1", &p, "--key-file", k],
        Arc::clone(&input),
    );
    expect_delivered(&mut good, &mut r, &input, "after a sender without a key");

    let (r, port) = rx(&[]);
    let p = port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "--key-file", k],
        Arc::new(b"key".to_vec()),
    );
    assert_eq!(t.wait(Duration::from_secs(20)).code(), Some(1));
    t.expect_stderr("has no key");
    r.wait_line("has no key", Duration::from_secs(10));
}

#[test]
fn different_keys_are_refused_on_both_sides() {
    let (a, b) = (key_file("a", 4), key_file("b", 5));
    let (mut r, port) = rx(&["--key-file", a.to_str().unwrap()]);
    let p = port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "--key-file", b.to_str().unwrap()],
        Arc::new(b"x".to_vec()),
    );
    assert_eq!(t.wait(Duration::from_secs(20)).code(), Some(1));
    t.expect_stderr("key files differ");
    r.wait_line("key files differ", Duration::from_secs(20));
    drop(r.stdin.take());
}

#[test]
fn a_replayed_handshake_is_refused_and_the_stream_goes_on() {
    let key = key_file("replay", 6);
    let k = key.to_str().unwrap();
    let (mut r, port) = rx(&["--key-file", k, "verbose", "1"]);
    let proxy = FaultProxy::start(port, |_| None);
    let pp = proxy.port.to_string();
    let input = data(3 * FOOT, 6);
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &pp, "threads", "1", "--key-file", k]);
    feed.send(input[..FOOT].to_vec()).unwrap();
    // Once rx has accepted the connection, tx's hello and proof have passed
    // through the proxy.
    r.wait_line("connected", Duration::from_secs(10));
    let recorded = proxy.recorded();
    assert!(
        recorded.len() >= HANDSHAKE_FROM_TX,
        "recorded only {} bytes",
        recorded.len()
    );

    let mut replay = TcpStream::connect(("127.0.0.1", port)).unwrap();
    replay
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    replay.write_all(&recorded[..HANDSHAKE_FROM_TX]).unwrap();
    let mut answer = Vec::new();
    let _ = replay.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("authentication failed"),
        "replay not refused: {text:?}"
    );
    r.wait_line("authentication failed", Duration::from_secs(10));

    feed.send(input[FOOT..].to_vec()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "after a replay");
}

#[test]
fn a_tampered_sealed_foot_is_never_written_and_is_resent() {
    let key = key_file("tamper", 7);
    let k = key.to_str().unwrap();
    let input = Arc::new(data(4 * FOOT, 7));
    let (mut r, port) = rx(&["--key-file", k, "verbose", "1"]);
    // One bit flipped inside the first foot of the first connection; with
    // one worker that connection surely carries foot 0.
    let proxy = FaultProxy::with(port, |n| Fault {
        reset_after: None,
        flip_at: (n == 0).then_some(HANDSHAKE_FROM_TX as u64 + 16 + 1000),
        ..Fault::default()
    });
    let pp = proxy.port.to_string();
    let args = [
        "tx",
        "127.0.0.1",
        &pp,
        "threads",
        "1",
        "--key-file",
        k,
        "--encrypt",
        "verbose",
        "2",
    ];
    let mut t = tx(&args, Arc::clone(&input));
    expect_delivered(&mut t, &mut r, &input, "with a tampered foot");
    assert_eq!(proxy.flips.load(Ordering::Relaxed), 1);
    r.expect_stderr("failed authentication");
    assert!(
        !t.stderr().contains(" 0 retransmitted feet"),
        "nothing was resent:\n{}",
        t.stderr()
    );
}
