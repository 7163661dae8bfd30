//! Hostile and broken peers: the receiver keeps serving the real stream.
//!
//! Some attacks need a peer that has joined the session (truncated feet,
//! duplicates, ids outside the window); a raw sender built on the
//! library's own protocol module plays that part.

use crate::util::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use viamillipede::protocol::{Header, Kind, Status, VERSION};
use viamillipede::wire;

const FOOT: usize = 2 << 20;

/// Starts a real stream through rx and returns both with the data, so an
/// attack can run while it is in progress.
fn stream_in_progress(
    rx_extra: &[&str],
) -> (Proc, Proc, crossbeam_channel::Sender<Vec<u8>>, Vec<u8>, u16) {
    let mut args = vec!["verbose", "1"];
    args.extend_from_slice(rx_extra);
    let (r, port) = rx(&args);
    let p = port.to_string();
    let input = data(6 * FOOT + 5, 99);
    let (t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "3"]);
    feed.send(input[..2 * FOOT].to_vec()).unwrap();
    r.wait_line("connected", Duration::from_secs(10));
    (t, r, feed, input, port)
}

fn finish(
    mut t: Proc,
    mut r: Proc,
    feed: crossbeam_channel::Sender<Vec<u8>>,
    input: Vec<u8>,
    what: &str,
) -> Proc {
    feed.send(input[2 * FOOT..].to_vec()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, what);
    r
}

#[test]
fn malformed_handshakes_are_dropped_while_the_stream_goes_on() {
    let (t, r, feed, input, port) = stream_in_progress(&[]);
    // An empty connection.
    drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    // A truncated hello.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&hello(1, 1024, 8)[..20]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    expect_closed(&mut s, Duration::from_secs(10));
    // A valid-looking hello announcing a huge extension.
    let mut b = hello(1, 1024, 8);
    b[42..44].copy_from_slice(&u16::MAX.to_be_bytes());
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&b).unwrap();
    expect_closed(&mut s, Duration::from_secs(10));
    // Another protocol version gets a reason.
    let mut b = hello(1, 1024, 8);
    b[8..10].copy_from_slice(&(VERSION + 1).to_be_bytes());
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&b).unwrap();
    let answer = expect_closed(&mut s, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains(&format!("protocol version {}", VERSION + 1)),
        "{text:?}"
    );
    // Parameters beyond the receiver's bounds get a reason too.
    let (_, reply) = join(port, 2, u32::MAX, 8);
    assert_eq!(reply.status, Status::Reject);
    assert!(
        reply.message.contains("outside what this receiver accepts"),
        "{}",
        reply.message
    );

    let r = finish(t, r, feed, input, "after malformed handshakes");
    r.expect_stderr("extension too long");
    r.expect_stderr("not supported");
}

#[test]
fn a_slow_drip_handshake_is_cut_off_at_the_deadline() {
    let (t, r, feed, input, port) = stream_in_progress(&["--handshake-timeout", "1"]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut writer = s.try_clone().unwrap();
    // The attacker sends one byte every 200 ms: the whole hello would take
    // 9 s, so a timeout per read would never fire.
    std::thread::spawn(move || {
        for byte in hello(3, 1024, 8) {
            if writer.write_all(&[byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let start = Instant::now();
    expect_closed(&mut s, Duration::from_secs(20));
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "slow handshake held for {took:?}"
    );
    let r = finish(t, r, feed, input, "after a slow handshake");
    r.expect_stderr("no handshake within 1 s");
}

#[test]
fn two_hundred_idle_connections_do_not_stop_the_stream() {
    let (t, r, feed, input, port) = stream_in_progress(&[]);
    // From the sender's own address: more than one source may hold, so
    // the oldest are cut off, and the stream never waits for them.
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let r = finish(t, r, feed, input, "with 200 idle connections");
    drop(idle);
    drop(r);
}

#[test]
fn truncated_duplicate_and_out_of_window_feet_never_corrupt_the_output() {
    let (mut r, port) = rx(&["verbose", "1"]);
    let foot = 1024u32;
    let a = data(foot as usize, 1);
    let b = data(foot as usize, 2);

    // Foot 0, then foot 0 again, then half of foot 1 and a hang-up.
    let (mut s, reply) = join(port, 9, foot, 8);
    assert_eq!(reply.status, Status::Accept);
    wire::write_frame(&mut s, &Header::foot(0, foot, false), &a).unwrap();
    wire::write_frame(&mut s, &Header::foot(0, foot, false), &a).unwrap();
    wire::write_control(&mut s, &Header::foot(1, foot, false)).unwrap();
    s.write_all(&b[..100]).unwrap();
    drop(s);

    // A foot far outside the window: the connection is dropped.
    let (mut s, _) = join(port, 9, foot, 8);
    wire::write_frame(&mut s, &Header::foot(1_000_000, foot, false), &b).unwrap();
    expect_closed(&mut s, Duration::from_secs(10));

    // A header announcing more than a foot: dropped before any allocation.
    let (mut s, _) = join(port, 9, foot, 8);
    wire::write_control(&mut s, &Header::foot(1, u32::MAX, false)).unwrap();
    expect_closed(&mut s, Duration::from_secs(10));

    // The sender comes back and finishes the stream.
    let (mut s, reply) = join(port, 9, foot, 8);
    assert_eq!(reply.status, Status::Accept);
    wire::write_frame(&mut s, &Header::foot(1, foot, false), &b).unwrap();
    wire::write_frame(&mut s, &Header::foot(2, 0, true), b"").unwrap();
    let done = loop {
        let h = wire::read_header(&mut s, 0).expect("frames from rx");
        if h.kind == Kind::Done {
            break h.id;
        }
    };
    assert_eq!(done, 2 * u64::from(foot));
    drop(s);
    let (status, out) = r.output();
    assert!(status.success(), "{}", r.stderr());
    assert_same(&out, &[a, b].concat(), "after broken feet");
    r.expect_stderr("outside the window");
    r.expect_stderr("exceeds the limit");
}

#[test]
fn sigint_on_tx_stops_both_sides_with_a_prefix_of_the_input() {
    let (mut r, port) = rx(&["verbose", "1"]);
    let p = port.to_string();
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "2"]);
    let input = data(3 * FOOT + 12_345, 5);
    feed.send(input.clone()).unwrap();
    r.wait_line("connected", Duration::from_secs(10));
    t.signal("INT");
    assert_eq!(
        t.wait(Duration::from_secs(20)).code(),
        Some(130),
        "{}",
        t.stderr()
    );
    t.expect_stderr("stopped by SIGINT");
    // rx hears it at once rather than after its reconnect timeout (300 s).
    let (status, out) = r.output();
    assert_eq!(status.code(), Some(1), "{}", r.stderr());
    r.expect_stderr("sender: stopped by SIGINT");
    assert_prefix(&out, &input, "rx after SIGINT on tx");
    drop(feed);
}

#[test]
fn sigterm_on_rx_fails_tx_with_the_reason() {
    let (r, port) = rx(&[]);
    let p = port.to_string();
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &p, "threads", "2", "verbose", "1"]);
    feed.send(data(FOOT, 6)).unwrap();
    t.wait_line("connected to", Duration::from_secs(10));
    r.signal("TERM");
    let mut r = r;
    assert_eq!(
        r.wait(Duration::from_secs(20)).code(),
        Some(143),
        "{}",
        r.stderr()
    );
    assert_eq!(
        t.wait(Duration::from_secs(20)).code(),
        Some(1),
        "{}",
        t.stderr()
    );
    t.expect_stderr("receiver: stopped by SIGTERM");
    drop(feed);
}

#[test]
fn a_foot_that_inflates_beyond_a_foot_is_refused() {
    let (mut r, port) = rx(&["verbose", "1"]);
    let foot = 4096u32;
    // 1 MiB of zeros compresses to a few hundred bytes and would inflate
    // far beyond the session's 4 KiB feet.
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
    let (mut s, _) = join(port, 12, foot, 8);
    let header = Header {
        flags: viamillipede::protocol::FLAG_COMPRESSED,
        ..Header::foot(0, bomb.len() as u32, false)
    };
    wire::write_frame(&mut s, &header, &bomb).unwrap();
    expect_closed(&mut s, Duration::from_secs(10));

    let a = data(foot as usize, 14);
    let (mut s, _) = join(port, 12, foot, 8);
    wire::write_frame(&mut s, &Header::foot(0, foot, false), &a).unwrap();
    wire::write_frame(&mut s, &Header::foot(1, 0, true), b"").unwrap();
    let (status, out) = r.output();
    assert!(status.success(), "{}", r.stderr());
    assert_same(&out, &a, "after a compression bomb");
    r.expect_stderr("does not decompress within a foot");
    drop(s);
}
