//! What a man in the middle, a stranger reaching a port, or a slow path can
//! do to a stream: nothing that changes what the stream is, and nothing that
//! ends it, before proving the key. One test (or more) per finding of the
//! review that led to protocol version 2.

use crate::util::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use viamillipede::protocol::handshake::{Dial, REPLY_FIXED_LEN};
use viamillipede::protocol::{Reason, Reply};
use viamillipede::wire;

/// Bytes rx sends before its verdict on a keyed connection: the challenge,
/// with rx's nonce and proof.
const CHALLENGE_LEN: u64 = (REPLY_FIXED_LEN + 64) as u64;

/// Finding 1: the verdict after the proofs was trusted unauthenticated. A
/// proxy flips its checksums flag, its status (accept to complete) or a
/// bit of its delivered count: tx must refuse it every time, and rx must
/// never write a byte that was not sent.
#[test]
fn a_verdict_changed_on_the_way_is_refused_and_nothing_wrong_is_written() {
    let key = key_file("verdict", 11);
    let k = key.to_str().unwrap();
    for (what, offset, bit) in [
        ("the checksums flag", CHALLENGE_LEN + 13, 0x04u8),
        ("accept into complete", CHALLENGE_LEN + 10, 0x01),
        ("the delivered count", CHALLENGE_LEN + 21, 0x10),
    ] {
        let (mut r, port) = rx(&["--key-file", k, "verbose", "1"]);
        let proxy = FaultProxy::with(port, move |_| Fault {
            flip_at: Some(offset),
            flip_bit: bit,
            replies: true,
            ..Fault::default()
        });
        let pp = proxy.port.to_string();
        let mut t = tx(
            &["tx", "127.0.0.1", &pp, "threads", "2", "--key-file", k],
            Arc::new(data(100_000, 12)),
        );
        assert_eq!(t.wait(Duration::from_secs(30)).code(), Some(1), "{what}");
        t.expect_stderr("failed authentication");
        drop(proxy);
        r.signal("TERM");
        let (_, out) = r.output();
        assert!(out.is_empty(), "{what}: rx wrote {} bytes", out.len());
    }
}

/// A raw stranger that dialed a listening tx: reads its hello and answers
/// with `reply`.
fn answer_as_a_stranger(port: u16, reply: &Reply) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&Dial { rank: 0, index: 0 }.encode()).unwrap();
    wire::read_hello(&mut s).expect("tx's hello");
    let mut b = Vec::new();
    reply.encode(&mut b);
    s.write_all(&b).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

/// Finding 2: in reverse mode anyone who reaches tx's port could end the
/// stream with a "busy" before proving anything. With a key and without.
#[test]
fn a_stranger_dialing_a_listening_sender_cannot_end_its_stream() {
    let key = key_file("reverse-stranger", 13);
    let k = key.to_str().unwrap();
    for keyed in [false, true] {
        let input = Arc::new(data(3 << 20, 14));
        let mut args = vec!["--listen", "127.0.0.1:0", "verbose", "1"];
        if keyed {
            args.extend(["--key-file", k]);
        }
        let (mut t, _) = Proc::spawn("tx", &args, Out::Collect);
        let port = port_of(&t);
        let mut stdin = t.stdin.take().unwrap();
        let feed = Arc::clone(&input);
        std::thread::spawn(move || stdin.write_all(&feed));
        let busy = Reply::reject(Reason::Busy, "busy: another stream is in progress");
        answer_as_a_stranger(port, &busy);
        answer_as_a_stranger(port, &busy);
        let mut rargs = vec!["--connect".to_string(), format!("127.0.0.1:{port}")];
        if keyed {
            rargs.extend(["--key-file".into(), k.into()]);
        }
        let rargs: Vec<&str> = rargs.iter().map(String::as_str).collect();
        let (mut r, _) = Proc::spawn("rx", &rargs, Out::Collect);
        expect_delivered(&mut t, &mut r, &input, "after a stranger said busy");
    }
}

/// Finding 3: a proof that arrived after rx's deadline was answered "the
/// keys differ", which tx took as fatal. Slow is not wrong.
#[test]
fn a_slow_handshake_is_retried_not_fatal() {
    let key = key_file("slow-proof", 15);
    let k = key.to_str().unwrap();
    let (mut r, port) = rx(&["--key-file", k, "--handshake-timeout", "1", "verbose", "1"]);
    // The first connection's proof (after the 76-byte hello) is held past
    // rx's deadline.
    let proxy = FaultProxy::with(port, |n| Fault {
        delay_after: (n == 0).then_some((76, Duration::from_millis(1500))),
        ..Fault::default()
    });
    let input = Arc::new(data(1 << 20, 16));
    let pp = proxy.port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &pp, "threads", "1", "--key-file", k],
        Arc::clone(&input),
    );
    expect_delivered(&mut t, &mut r, &input, "after a slow proof");
    r.expect_stderr("did not prove the key");
}

/// Finding 4: a passphrase in a key file could be guessed offline from one
/// recorded handshake. Such files are refused; --genkey makes a good one.
#[test]
fn passphrase_key_files_are_refused_and_genkey_makes_one_that_works() {
    let dir = std::env::temp_dir().join(format!("viamillipede-genkey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weak = dir.join("weak");
    std::fs::write(&weak, b"my dog is called rex\n").unwrap();
    let (mut p, _) = Proc::spawn(
        "rx",
        &["rx", "0", "--key-file", weak.to_str().unwrap()],
        Out::Collect,
    );
    assert_eq!(p.wait(Duration::from_secs(10)).code(), Some(2));
    p.expect_stderr("passphrase");
    p.expect_stderr("--genkey");

    let good = dir.join("good");
    let _ = std::fs::remove_file(&good);
    let (mut g, _) = Proc::spawn(
        "genkey",
        &["--genkey", good.to_str().unwrap()],
        Out::Collect,
    );
    assert!(g.wait(Duration::from_secs(10)).success(), "{}", g.stderr());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&good).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (mut again, _) = Proc::spawn(
        "genkey",
        &["--genkey", good.to_str().unwrap()],
        Out::Collect,
    );
    assert_eq!(
        again.wait(Duration::from_secs(10)).code(),
        Some(2),
        "overwrote a key"
    );
    let k = good.to_str().unwrap();
    transfer(data(50_000, 17), &["--key-file", k], &["--key-file", k]);
}

/// Finding 5a: 64 half-open handshakes from one client locked out the
/// sender. Now each source has its own share, and one source beyond it only
/// pushes out its own oldest.
#[test]
fn half_open_handshakes_from_a_stranger_do_not_lock_out_the_sender() {
    let (mut r, port) = rx(&["--handshake-timeout", "3600", "verbose", "1"]);
    // From 127.0.0.1, more than any source may hold.
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // The sender, from another address: it never waits for them.
    let input = Arc::new(data(4 << 20, 18));
    let p = port.to_string();
    let mut t = tx(
        &[
            "tx",
            "127.0.0.1",
            &p,
            "--bind",
            "127.0.0.2",
            "threads",
            "4",
            "verbose",
            "1",
        ],
        Arc::clone(&input),
    );
    expect_delivered(&mut t, &mut r, &input, "beside 100 half-open handshakes");
    t.expect_stderr(", 0 reconnects");
    // The oldest of the stranger's were cut off to make room for its newest.
    let mut closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    assert!(closed >= 36, "only {closed} of 100 were cut off");
}

/// Finding 5b: tx's reverse-mode acceptor read the preamble with a timeout
/// per read: one byte every 9 s held a thread for minutes.
#[test]
fn a_slow_drip_to_a_listening_sender_is_cut_off_at_the_deadline() {
    let (mut t, _) = Proc::spawn(
        "tx",
        &[
            "--listen",
            "127.0.0.1:0",
            "--handshake-timeout",
            "1",
            "verbose",
            "1",
        ],
        Out::Collect,
    );
    let port = port_of(&t);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut writer = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let preamble = Dial { rank: 0, index: 0 }.encode();
        for byte in preamble {
            if writer.write_all(&[byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = Vec::new();
    let _ = s.read_to_end(&mut b);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "held for {:?}",
        start.elapsed()
    );
    t.signal("TERM");
    t.wait(Duration::from_secs(10));
}

/// CPU seconds a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Finding 5c: with its descriptors used up, tx's reverse-mode acceptor
/// spun at 100% CPU on failing accepts. Now it backs off.
#[test]
fn a_sender_out_of_descriptors_does_not_spin() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no prlimit");
        return;
    }
    let mut child = std::process::Command::new("prlimit")
        .args(["--nofile=24", "--", &bin(), "--listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    let hold: Vec<TcpStream> = (0..40)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    let _ = child.kill();
    let _ = child.wait();
    drop(hold);
    assert!(
        used < 0.5,
        "{used:.2} CPU seconds in 2 s of failing accepts"
    );
}

/// Finding 5d: rx's feet channel was unbounded: a session peer could grow
/// rx's memory at line rate while stdout was blocked, sending one foot
/// again and again. What rx holds is now bounded by a window of bytes,
/// duplicates included, and a peer beyond it is dropped.
#[test]
fn a_session_peer_cannot_grow_rx_beyond_its_window() {
    let (r, mut stdout) = Proc::spawn("rx", &["rx", "0", "verbose", "1"], Out::Pipe);
    let port = port_of(&r);
    let foot = 1 << 20;
    let (mut s, reply) = join(port, 31, foot, 8);
    assert_eq!(reply.status, viamillipede::protocol::Status::Accept);
    let payload = data(foot as usize, 32);
    // Foot 0 is more than the pipe holds, and stdout is never read: the
    // writer blocks on it. Then foot 1, a hundred times.
    let mut dropped = false;
    for id in [0].into_iter().chain(std::iter::repeat_n(1, 100)) {
        let h = viamillipede::protocol::Header::foot(id, foot, false);
        if wire::write_frame(&mut s, &h, &payload).is_err() {
            dropped = true;
            break;
        }
    }
    if !dropped {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = vec![0u8; 1 << 16];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    }
    r.wait_line("beyond the window", Duration::from_secs(10));
    drop(stdout.take());
}

/// Finding 6a: with one key on both hosts, a two-way pipe's tx could be
/// relayed back to its own rx, and its input came out of its own stdout.
#[test]
fn a_connection_relayed_back_to_its_own_process_is_refused() {
    let key = key_file("reflect", 19);
    let k = key.to_str().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let own = l.local_addr().unwrap().port();
    drop(l);
    let proxy = FaultProxy::start(own, |_| None);
    let pp = proxy.port.to_string();
    let ports = own.to_string();
    let marker = b"this must not come back".to_vec();
    let mut p = tx(
        &[
            "rx",
            &ports,
            "tx",
            "127.0.0.1",
            &pp,
            "--key-file",
            k,
            "threads",
            "1",
        ],
        Arc::new(marker.clone()),
    );
    let (status, out) = p.output();
    assert_eq!(status.code(), Some(1), "{}", p.stderr());
    p.expect_stderr("reflected");
    assert!(
        !out.windows(marker.len()).any(|w| w == marker),
        "the input came back out of its own process"
    );
}

/// Finding 6b: peer-supplied strings reached the terminal as they came.
#[test]
fn a_receivers_message_cannot_write_escape_sequences_to_the_terminal() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            if wire::read_hello(&mut s).is_ok() {
                let mut b = Vec::new();
                Reply::reject(Reason::Other, "\x1b[2J\x1b[31mhijacked\r").encode(&mut b);
                let _ = s.write_all(&b);
            }
        }
    });
    let p = port.to_string();
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "threads", "1"],
        Arc::new(b"x".to_vec()),
    );
    assert_eq!(t.wait(Duration::from_secs(20)).code(), Some(1));
    let err = t.stderr();
    assert!(!err.contains('\x1b') && !err.contains('\r'), "{err:?}");
    assert!(err.contains("\\u{1b}[31mhijacked"), "{err}");
}
