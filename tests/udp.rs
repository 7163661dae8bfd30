//! The UDP data plane (`--udp`) end to end: exact output with and without
//! keys, through a proxy that drops, duplicates, reorders and alters
//! datagrams, with strangers' datagrams on the port, and a clear error when
//! UDP does not get through.

use crate::util::*;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Forwards TCP from `127.0.0.2:any` to `127.0.0.1:upstream`, so that tx
/// sends its datagrams to 127.0.0.2 (where the UDP proxy listens) while rx
/// sees connections to 127.0.0.1. Returns the port.
fn tcp_forwarder(upstream: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    port
}

/// What the UDP proxy did.
#[derive(Default)]
struct Done {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    altered: AtomicU64,
}

/// A UDP proxy on `127.0.0.2:port` to `127.0.0.1:port` that drops every
/// 23rd datagram, sends every 17th twice, holds every 11th back behind the
/// next three, and flips a bit in the bytes of every 29th, `alter` times.
fn udp_proxy(port: u16, alter: u64, stop: Arc<AtomicBool>) -> Arc<Done> {
    let inbound = UdpSocket::bind(("127.0.0.2", port)).expect("bind the UDP proxy");
    inbound
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let out = UdpSocket::bind("127.0.0.1:0").unwrap();
    out.connect(("127.0.0.1", port)).unwrap();
    let done = Arc::new(Done::default());
    let d = Arc::clone(&done);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut held: Option<(Vec<u8>, u32)> = None;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Ok(len) = inbound.recv(&mut buf) else {
                continue;
            };
            n += 1;
            let mut dgram = buf[..len].to_vec();
            if n % 23 == 0 {
                d.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if d.altered.load(Ordering::Relaxed) < alter && n % 29 == 0 && dgram.len() > 40 {
                dgram[38] ^= 0x10;
                d.altered.fetch_add(1, Ordering::Relaxed);
            }
            if n % 11 == 0 && held.is_none() {
                held = Some((dgram, 3));
                d.reordered.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let _ = out.send(&dgram);
            d.forwarded.fetch_add(1, Ordering::Relaxed);
            if n % 17 == 0 {
                let _ = out.send(&dgram);
                d.duplicated.fetch_add(1, Ordering::Relaxed);
            }
            if let Some((h, left)) = held.take() {
                match left {
                    1 => {
                        let _ = out.send(&h);
                    }
                    _ => held = Some((h, left - 1)),
                }
            }
        }
    });
    done
}

#[test]
fn udp_transfers_are_exact_plain_keyed_sealed_checksummed_and_compressed() {
    let key = key_file("udp.key", 41);
    let key = key.to_str().unwrap();
    let mut text = Vec::new();
    while text.len() < 3 << 20 {
        text.extend_from_slice(b"the same line of text, over and over, compresses well\n");
    }
    let cases: [(&str, Vec<u8>, Vec<&str>); 6] = [
        ("empty", Vec::new(), vec![]),
        ("one byte", vec![7], vec![]),
        ("plain", data((5 << 20) + 17, 3), vec!["threads", "4"]),
        ("keyed", data(3 << 20, 4), vec!["--key-file", key]),
        (
            "sealed",
            data(3 << 20, 5),
            vec!["--key-file", key, "--encrypt"],
        ),
        (
            "checksums and compression",
            text,
            vec!["checksums", "--compress"],
        ),
    ];
    for (what, input, extra) in cases {
        let keyed = extra.contains(&"--key-file");
        let rx_extra: &[&str] = if keyed { &["--key-file", key] } else { &[] };
        let mut tx_extra = vec!["--udp", "--verbose", "1"];
        tx_extra.extend_from_slice(&extra);
        let (tx_err, _) = transfer(input, &tx_extra, rx_extra);
        assert!(
            tx_err.contains("datagrams"),
            "{what}: the bytes did not go as datagrams:\n{tx_err}"
        );
    }
}

#[test]
fn udp_through_drops_duplicates_reordering_and_strangers_is_exact() {
    let input = Arc::new(data(12 << 20, 9));
    let (mut r, port) = rx(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let done = udp_proxy(port, 0, Arc::clone(&stop));
    // A stranger sprays the receiver's UDP port with datagrams: garbage,
    // and well-formed ones under tokens it guesses.
    let spray = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut d = data(1200, sent).to_vec();
                if sent % 2 == 0 {
                    d[..3].copy_from_slice(b"VD\x01");
                    d[3] = 0;
                }
                let _ = s.send_to(&d, ("127.0.0.1", port));
                sent += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            sent
        })
    };
    let via = tcp_forwarder(port).to_string();
    let mut t = tx(
        &[
            "tx",
            "127.0.0.2",
            &via,
            "--udp",
            "--datagram-size",
            "1400",
            "threads",
            "4",
            "--verbose",
            "1",
        ],
        Arc::clone(&input),
    );
    expect_delivered(&mut t, &mut r, &input, "through the UDP proxy");
    stop.store(true, Ordering::Relaxed);
    let sprayed = spray.join().unwrap();
    let (dropped, dup, reord) = (
        done.dropped.load(Ordering::Relaxed),
        done.duplicated.load(Ordering::Relaxed),
        done.reordered.load(Ordering::Relaxed),
    );
    println!("proxy: {dropped} dropped, {dup} duplicated, {reord} reordered; {sprayed} strangers' datagrams");
    assert!(
        dropped > 10 && dup > 10 && reord > 10,
        "the proxy did little"
    );
    assert!(sprayed > 10, "the stranger sent little");
    assert!(t.stderr().contains("sent again"), "{}", t.stderr());
}

#[test]
fn an_altered_datagram_never_reaches_stdout() {
    // With a key every datagram carries a tag: altered ones are dropped
    // and their ranges sent again, however many. With checksums and no
    // key, a piece with an altered range fails its checksum: its connection
    // is dropped and the piece goes again whole (a last line of defence
    // against the rare datagram the UDP checksum lets through).
    let key = key_file("udp-alter.key", 43);
    let key = key.to_str().unwrap();
    let keyed: (&[&str], &[&str]) = (&["--key-file", key], &["--key-file", key]);
    let summed: (&[&str], &[&str]) = (&["checksums"], &[]);
    for (what, (tx_extra, rx_extra), alter) in [("keyed", keyed, 1000), ("checksums", summed, 2)] {
        let input = Arc::new(data(6 << 20, 11));
        let (mut r, port) = rx(rx_extra);
        let stop = Arc::new(AtomicBool::new(false));
        let done = udp_proxy(port, alter, Arc::clone(&stop));
        let via = tcp_forwarder(port).to_string();
        let mut args = vec![
            "tx",
            "127.0.0.2",
            &via,
            "--udp",
            "--datagram-size",
            "1400",
            "threads",
            "2",
        ];
        args.extend_from_slice(tx_extra);
        let mut t = tx(&args, Arc::clone(&input));
        if t.exited_within(Duration::from_secs(40)).is_none() {
            panic!(
                "{what}: tx still running:\n{}\nrx:\n{}",
                t.stderr(),
                r.stderr()
            );
        }
        expect_delivered(&mut t, &mut r, &input, what);
        stop.store(true, Ordering::Relaxed);
        let altered = done.altered.load(Ordering::Relaxed);
        assert!(altered >= alter.min(5), "{what}: {altered} altered");
        if !keyed_case(tx_extra) {
            assert!(r.stderr().contains("failed its checksum"), "{}", r.stderr());
        }
    }
}

fn keyed_case(args: &[&str]) -> bool {
    args.contains(&"--key-file")
}

#[test]
fn udp_that_does_not_get_through_is_a_clear_error_at_once() {
    // The TCP connections reach rx, but nothing listens where the
    // datagrams go (127.0.0.2): as if a firewall dropped UDP.
    let (r, port) = rx(&[]);
    let via = tcp_forwarder(port).to_string();
    let started = Instant::now();
    let mut t = tx(
        &["tx", "127.0.0.2", &via, "--udp"],
        Arc::new(data(1 << 20, 1)),
    );
    let status = t.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", t.stderr());
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(15), "took {waited:?}");
    let err = t.stderr();
    assert!(err.contains("firewall") && err.contains("UDP"), "{err}");
    drop(r);
}

#[test]
fn a_receiver_that_cannot_open_udp_says_so() {
    // Something else holds the UDP port: rx cannot offer datagrams, and the
    // sender hears why instead of waiting.
    let (r, port) = rx(&[]);
    let squatter = UdpSocket::bind(("127.0.0.1", port)).expect("hold the UDP port");
    let mut t = tx(
        &["tx", "127.0.0.1", &port.to_string(), "--udp"],
        Arc::new(data(1 << 20, 2)),
    );
    let status = t.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", t.stderr());
    let err = t.stderr();
    assert!(err.contains("UDP"), "{err}");
    drop(squatter);
    drop(r);
}
