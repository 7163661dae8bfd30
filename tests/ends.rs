//! How transfers end when something goes wrong: promptly, with the reason
//! told to the other side, and never turning a complete stream into a
//! failure.

use crate::util::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;
use viamillipede::protocol::{Header, Kind, Status};
use viamillipede::wire;

/// A socket pair on loopback: what is written to the first is read from
/// the second.
fn socket_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    (server, client)
}

#[test]
fn a_stdin_that_fails_mid_stream_is_told_to_rx_at_once() {
    let (mut r, port) = rx(&["verbose", "1"]);
    let p = port.to_string();
    // tx reads a TCP connection that is reset in the middle.
    let (mut source, stdin) = socket_pair();
    let input = data(3 << 20, 61);
    let (mut t, _) = Proc::spawn_with(
        "tx",
        &["tx", "127.0.0.1", &p, "threads", "2"],
        Out::Collect,
        Stdio::from(OwnedFd::from(stdin)),
    );
    source.write_all(&input).unwrap();
    r.wait_line("connected", Duration::from_secs(10));
    let _ = socket2::SockRef::from(&source).set_linger(Some(Duration::ZERO));
    drop(source);
    assert_eq!(t.wait(Duration::from_secs(20)).code(), Some(1));
    t.expect_stderr("read stdin");
    // Not after rx's reconnect timeout (300 s): at once, with the reason.
    let (status, out) = r.output();
    assert_eq!(status.code(), Some(1), "{}", r.stderr());
    r.expect_stderr("sender: read stdin: ");
    assert_prefix(&out, &input, "rx after tx's input failed");
}

#[test]
fn a_sender_connection_that_stops_reading_holds_up_nobody_else() {
    // A small send buffer on rx's sockets, so one that is not read is full
    // after a few hundred frames.
    let (mut r, port) = rx(&["verbose", "1", "--sndbuf", "4K"]);
    let foot = 1024u32;
    let feet = 10_000u64;
    // One connection of the session never reads, with the smallest
    // receive buffer the kernel allows: the window updates rx sends it
    // soon fill both its buffers and rx's send buffer.
    let deaf = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    deaf.set_recv_buffer_size(1).unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    deaf.connect(&addr.into()).unwrap();
    let mut deaf: TcpStream = deaf.into();
    deaf.write_all(&hello(21, foot, 4096)).unwrap();
    let (mut s, reply) = join(port, 21, foot, 4096);
    assert_eq!(reply.status, Status::Accept);
    // The other connection reads what rx tells it, until the end.
    let mut reader = s.try_clone().unwrap();
    let done = std::thread::spawn(move || loop {
        let h = wire::read_header(&mut reader, 0).expect("frames from rx");
        if h.kind == Kind::Done {
            return h.id;
        }
    });
    let payload = data(foot as usize, 22);
    for id in 0..feet {
        wire::write_frame(&mut s, &Header::foot(id, foot, false), &payload).unwrap();
    }
    wire::write_frame(&mut s, &Header::foot(feet, 0, true), b"").unwrap();
    // rx's stdout and the other connection never wait for the deaf one
    // (which would hold each write for rx's 30 s write timeout).
    let (tx_done, got) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx_done.send(done.join().unwrap());
    });
    let total = got
        .recv_timeout(Duration::from_secs(20))
        .expect("the stream did not complete while one connection was deaf");
    assert_eq!(total, feet * u64::from(foot));
    drop(s);
    let mut b = [0u8; 1];
    let _ = deaf.set_read_timeout(Some(Duration::from_millis(1)));
    let _ = deaf.read(&mut b);
    drop(deaf);
    let (status, out) = r.output();
    assert!(status.success(), "{}", r.stderr());
    assert_eq!(out.len() as u64, feet * u64::from(foot));
}

#[test]
fn a_sender_that_missed_the_end_is_told_when_it_reconnects() {
    let (mut r, port) = rx(&["verbose", "1"]);
    let payload = data(1000, 31);
    let (mut s, reply) = join(port, 41, 1024, 8);
    assert_eq!(reply.status, Status::Accept);
    wire::write_frame(&mut s, &Header::foot(0, 1000, false), &payload).unwrap();
    wire::write_frame(&mut s, &Header::foot(1, 0, true), b"").unwrap();
    loop {
        let h = wire::read_header(&mut s, 0).expect("frames from rx");
        if h.kind == Kind::Done {
            break;
        }
    }
    // The connection dies before the sender can show it heard the end (a
    // reset, not a clean close): rx cannot tell it was heard.
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
    r.wait_line("connection lost", Duration::from_secs(10));
    // A sender comes back a while later, as tx does after a lost
    // connection: rx is still there to say the stream is complete.
    assert!(
        r.exited_within(Duration::from_secs(2)).is_none(),
        "rx left before the sender knew the stream was complete:\n{}",
        r.stderr()
    );
    let (s, reply) = join(port, 41, 1024, 8);
    assert_eq!(reply.status, Status::Complete, "{reply:?}");
    assert_eq!(reply.delivered, 1000);
    drop(s);
    let (status, out) = r.output();
    assert!(status.success(), "{}", r.stderr());
    assert_same(&out, &payload, "a stream whose end was missed");
}

#[test]
fn tx_gives_up_on_time_while_its_stdin_stays_open() {
    let (r, port) = rx(&[]);
    let p = port.to_string();
    let (mut t, feed) = tx_fed(&[
        "tx",
        "127.0.0.1",
        &p,
        "threads",
        "2",
        "--reconnect-timeout",
        "3",
        "verbose",
        "1",
    ]);
    feed.send(data(1 << 20, 1)).unwrap();
    t.wait_line("connected to", Duration::from_secs(10));
    drop(r);
    // stdin is an idle pipe that stays open: tx still ends.
    let status = t.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{}", t.stderr());
    t.expect_stderr("giving up");
    drop(feed);
}
