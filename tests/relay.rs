//! Relays: `viamillipede relay PORT ... tx HOST PORT ...` between a sender
//! and its receiver.

use crate::util::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const FOOT: usize = 2 << 20;

/// Starts `relay 0 up... tx 127.0.0.1 PORT down...` (each `next` port a
/// destination, in rank order); returns it with its port.
fn relay(up: &[&str], next: &[u16], down: &[&str]) -> (Proc, u16) {
    let ports: Vec<String> = next.iter().map(|p| p.to_string()).collect();
    let mut args = vec!["relay", "0"];
    args.extend_from_slice(up);
    for p in &ports {
        args.extend_from_slice(&["tx", "127.0.0.1", p]);
    }
    args.extend_from_slice(down);
    let (p, _) = Proc::spawn("relay", &args, Out::Collect);
    let port = port_of(&p);
    (p, port)
}

#[test]
fn a_relay_carries_a_stream_and_stops_on_sigint() {
    let input = data(9 * FOOT + 77, 101);
    let (mut r, port) = rx(&[]);
    let (mut hop, hop_port) = relay(&[], &[port], &["threads", "4"]);
    let p = hop_port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "threads", "4", "checksums"],
        Arc::new(input.clone()),
    );
    expect_delivered(&mut t, &mut r, &input, "through one relay");
    // A relay outlives the streams it carries, until it is stopped.
    assert!(hop.exited_within(Duration::ZERO).is_none());
    hop.signal("INT");
    assert_eq!(hop.wait(DEADLINE).code(), Some(130), "{}", hop.stderr());
}

#[test]
fn a_chain_of_two_relays_with_a_key_per_hop_and_resets_on_each_hop() {
    let (k1, k2, k3) = (
        key_file("hop1.key", 11),
        key_file("hop2.key", 12),
        key_file("hop3.key", 13),
    );
    let (k1, k2, k3) = (
        k1.to_str().unwrap(),
        k2.to_str().unwrap(),
        k3.to_str().unwrap(),
    );
    let input = data(40 * FOOT + 5, 103);
    let (mut r, port) = rx(&["--key-file", k3]);
    // relay 2, reached through a proxy that resets its connections.
    let (_r2, r2_port) = relay(
        &["--key-file", k2],
        &[port],
        &["--key-file", k3, "--encrypt"],
    );
    let reset_2 = FaultProxy::start(r2_port, |n| (n < 9 && n % 3 == 0).then_some(FOOT as u64));
    let (_r1, r1_port) = relay(
        &["--key-file", k1],
        &[reset_2.port],
        &["--key-file", k2, "checksums"],
    );
    let reset_1 = FaultProxy::start(r1_port, |n| {
        (n < 9 && n % 3 == 1).then_some((2 * FOOT) as u64)
    });
    let p = reset_1.port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "threads", "4", "--key-file", k1],
        Arc::new(input.clone()),
    );
    expect_delivered(&mut t, &mut r, &input, "through two relays with resets");
    let (resets_1, resets_2) = (
        reset_1.resets.load(Ordering::SeqCst),
        reset_2.resets.load(Ordering::SeqCst),
    );
    eprintln!("resets: hop 1 {resets_1}, hop 2 {resets_2}");
    assert!(resets_1 >= 1 && resets_2 >= 1, "{resets_1} {resets_2}");
}

#[test]
fn a_wrong_key_upstream_is_refused_before_anything_is_dialed() {
    let (good, bad) = (
        key_file("relay-good.key", 21),
        key_file("relay-bad.key", 22),
    );
    let good = good.to_str().unwrap();
    let (mut r, port) = rx(&["--key-file", good, "verbose", "1"]);
    let (mut hop, hop_port) = relay(&["--key-file", good], &[port], &["--key-file", good]);
    let p = hop_port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "--key-file", bad.to_str().unwrap()],
        Arc::new(data(FOOT, 105)),
    );
    let status = t.wait(DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", t.stderr());
    t.expect_stderr("key");
    hop.signal("TERM");
    let _ = hop.wait(DEADLINE);
    // The receiver never heard of it.
    assert!(r.exited_within(Duration::ZERO).is_none());
    r.signal("TERM");
    let (_, out) = r.output();
    assert!(out.is_empty());
    assert!(!r.stderr().contains("connected"), "{}", r.stderr());
}

#[test]
fn a_next_hop_that_does_not_answer_is_a_clear_error_for_the_sender() {
    // A port that refuses: bound, then closed.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_port = gone.local_addr().unwrap().port();
    drop(gone);
    let (_hop, hop_port) = relay(&[], &[gone_port], &[]);
    let p = hop_port.to_string();
    let mut t = tx(&["tx", "127.0.0.1", &p], Arc::new(data(FOOT, 107)));
    let status = t.wait(DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", t.stderr());
    t.expect_stderr("no next hop took the connection");
}

#[test]
fn a_silent_first_next_hop_is_passed_over_for_the_second() {
    // Takes connections (the kernel's backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let input = data(6 * FOOT + 9, 108);
    let (mut r, port) = rx(&[]);
    let (_hop, hop_port) = relay(&[], &[silent_port, port], &["threads", "2"]);
    let p = hop_port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "threads", "2"],
        Arc::new(input.clone()),
    );
    expect_delivered(&mut t, &mut r, &input, "past a silent next hop");
    drop(silent);
}

#[test]
fn the_sender_killed_behind_a_relay_fails_its_flow_and_the_relay_goes_on() {
    let dir = std::env::temp_dir().join(format!("vm-relay-killed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let command = format!(
        r#"cat > "{d}/$VIAMILLIPEDE_NAME.part" && mv "{d}/$VIAMILLIPEDE_NAME.part" "{d}/$VIAMILLIPEDE_NAME""#
    );
    let (mut r, port) = rx(&["--exec", &command, "--reconnect-timeout", "1"]);
    let (mut hop, hop_port) = relay(&[], &[port], &[]);
    let p = hop_port.to_string();
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "2", "--name", "cut"]);
    feed.send(data(2 * FOOT, 109)).unwrap();
    r.wait_line("flow cut from", DEADLINE);
    t.signal("KILL");
    let _ = t.wait(DEADLINE);
    r.wait_line("flow cut failed", DEADLINE);
    drop(feed);
    assert!(!dir.join("cut").exists(), "a cut stream was taken as whole");
    // The same relay carries the next stream to the same receiver.
    assert!(
        hop.exited_within(Duration::ZERO).is_none(),
        "{}",
        hop.stderr()
    );
    let input = data(3 * FOOT + 1, 110);
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "--name", "next"],
        Arc::new(input.clone()),
    );
    assert!(t.wait(DEADLINE).success(), "{}", t.stderr());
    assert_same(
        &std::fs::read(dir.join("next")).unwrap(),
        &input,
        "the next stream",
    );
    r.signal("TERM");
    let _ = r.wait(DEADLINE);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_relay_killed_mid_stream_the_sender_goes_on_through_another() {
    let input = data(16 * FOOT, 113);
    let (mut r, port) = rx(&["verbose", "1"]);
    let (mut first, first_port) = relay(&[], &[port], &[]);
    let (_second, second_port) = relay(&[], &[port], &[]);
    let (a, b) = (first_port.to_string(), second_port.to_string());
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &a, "tx", "127.0.0.1", &b, "threads", "2"]);
    feed.send(input[..4 * FOOT].to_vec()).unwrap();
    r.wait_line("connected", DEADLINE);
    first.signal("KILL");
    let _ = first.wait(DEADLINE);
    feed.send(input[4 * FOOT..].to_vec()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "after the first relay died");
}

#[test]
fn a_relay_answers_status_and_refuses_what_it_cannot_do() {
    let sock = std::env::temp_dir().join(format!("viamillipede-relay-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let (mut r, port) = rx(&[]);
    let (_hop, hop_port) = relay(&["--control", sock.to_str().unwrap()], &[port], &[]);
    let p = hop_port.to_string();
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "3"]);
    let input = data(2 * FOOT, 115);
    feed.send(input.clone()).unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    let side = loop {
        let (mut c, _) = Proc::spawn(
            "ctl",
            &["ctl", sock.to_str().unwrap(), "status"],
            Out::Collect,
        );
        let (status, out) = c.output();
        assert_eq!(status.code(), Some(0), "{}", c.stderr());
        let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let side = doc["sides"][0].clone();
        assert_eq!(side["role"], "relay");
        if side["connections"].as_array().unwrap().len() == 3 {
            break side;
        }
        assert!(std::time::Instant::now() < deadline, "{side:#}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(side["destinations"][0]["connections"], 3, "{side:#}");
    let (mut c, _) = Proc::spawn(
        "ctl",
        &["ctl", sock.to_str().unwrap(), "drain", "127.0.0.1", "1"],
        Out::Collect,
    );
    assert_eq!(c.wait(DEADLINE).code(), Some(1));
    c.expect_stderr("command line");
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "with a relay's status asked");
}

#[test]
fn relay_command_line_mistakes_are_clear() {
    let key = key_file("relay-one-side.key", 23)
        .to_str()
        .unwrap()
        .to_string();
    for (words, needle) in [
        (&["relay", "0"][..], "give the next hop"),
        (&["relay", "0", "tx"][..], "tx"),
        (
            &["relay", "0", "tx", "127.0.0.1", "1", "--udp"][..],
            "--udp",
        ),
        (
            &["relay", "0", "--key-file", &key, "tx", "127.0.0.1", "1"][..],
            "both hops a key",
        ),
    ] {
        let (mut p, _) = Proc::spawn("relay", words, Out::Collect);
        assert_eq!(
            p.wait(DEADLINE).code(),
            Some(2),
            "{words:?}: {}",
            p.stderr()
        );
        p.expect_stderr(needle);
    }
}

#[test]
fn a_relay_refuses_replayed_garbage_and_tampered_bytes_and_the_stream_goes_on() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    // A hello with a nonce (44 + 32 bytes) and the sender's proof (32).
    const HANDSHAKE_FROM_TX: usize = 44 + 32 + 32;
    let key = key_file("relay-lies.key", 31);
    let k = key.to_str().unwrap();
    let (mut r, port) = rx(&["--key-file", k, "verbose", "1"]);
    let (hop, hop_port) = relay(
        &["--key-file", k, "verbose", "1"],
        &[port],
        &["--key-file", k],
    );
    // The sender's first connection is recorded, and a bit of its first
    // foot flipped on the way to the relay.
    let proxy = FaultProxy::with(hop_port, |n| Fault {
        flip_at: (n == 0).then_some(HANDSHAKE_FROM_TX as u64 + 16 + 1000),
        ..Fault::default()
    });
    let p = proxy.port.to_string();
    let input = data(6 * FOOT, 117);
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "1", "--key-file", k]);
    feed.send(input[..FOOT].to_vec()).unwrap();
    hop.wait_line("relayed to", DEADLINE);
    let recorded = proxy.recorded();
    assert!(recorded.len() >= HANDSHAKE_FROM_TX, "{}", recorded.len());

    // The recorded handshake, replayed: the relay's fresh nonce fails it.
    let mut replay = TcpStream::connect(("127.0.0.1", hop_port)).unwrap();
    replay.set_read_timeout(Some(DEADLINE)).unwrap();
    replay.write_all(&recorded[..HANDSHAKE_FROM_TX]).unwrap();
    let mut answer = Vec::new();
    let _ = replay.read_to_end(&mut answer);
    assert!(
        String::from_utf8_lossy(&answer).contains("authentication failed"),
        "replay not refused: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // Garbage, a truncated hello, and one that drips and stops.
    for bytes in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &recorded[..20],
        &recorded[..1],
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", hop_port)).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(bytes).unwrap();
        if bytes.len() > 1 {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let _ = s.read_to_end(&mut Vec::new());
    }

    feed.send(input[FOOT..].to_vec()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "after lies to the relay");
    assert_eq!(proxy.flips.load(Ordering::SeqCst), 1);
    // The tampered foot broke its hop and was sent again; the receiver
    // saw only the relay's connections of the real sender.
    hop.expect_stderr("connection dropped");
    assert!(
        !r.stderr().contains("authentication failed"),
        "{}",
        r.stderr()
    );
}
