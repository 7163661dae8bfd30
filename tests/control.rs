//! The control socket: `--control PATH` and `viamillipede ctl PATH ...`.

use crate::util::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FOOT: usize = 2 << 20;

/// A sender to `127.0.0.1:port` with `threads` connections, its control
/// socket at `sock` (served once it says so), and its stdin.
fn controlled(
    port: &str,
    threads: &str,
    sock: &Path,
) -> (Proc, crossbeam_channel::Sender<Vec<u8>>) {
    let (t, feed) = tx_fed(&[
        "tx",
        "127.0.0.1",
        port,
        "threads",
        threads,
        "--control",
        sock.to_str().unwrap(),
    ]);
    t.wait_line("control socket at", DEADLINE);
    (t, feed)
}

fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("viamillipede-ctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// What `viamillipede ctl` did: its exit code, stdout and stderr.
struct Ctl {
    code: i32,
    out: String,
    err: String,
}

impl Ctl {
    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("ctl printed no JSON ({e}):\n{}{}", self.out, self.err))
    }
}

fn ctl(sock: &Path, words: &[&str]) -> Ctl {
    let mut args = vec!["ctl", sock.to_str().unwrap()];
    args.extend_from_slice(words);
    let (mut p, _) = Proc::spawn("ctl", &args, Out::Collect);
    let (status, out) = p.output();
    Ctl {
        code: status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out).into_owned(),
        err: p.stderr(),
    }
}

/// The sender's side of `ctl status` (the first of its sides).
fn side(sock: &Path) -> (i32, Value) {
    let c = ctl(sock, &["status"]);
    assert!(c.code == 0 || c.code == 1, "status: {}{}", c.out, c.err);
    let doc = c.json();
    assert_eq!(doc["schema"], "viamillipede-status/1", "{doc}");
    (c.code, doc["sides"][0].clone())
}

/// Polls `ctl status` until `ok` holds for the sender's side; panics with
/// the last document at the deadline.
fn until(sock: &Path, what: &str, ok: impl Fn(i32, &Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, side) = side(sock);
        if ok(code, &side) {
            return side;
        }
        assert!(
            Instant::now() < deadline,
            "no status where {what} within {DEADLINE:?}; the last (exit {code}):\n{side:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn destination<'a>(side: &'a Value, name: &str) -> &'a Value {
    side["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["destination"] == name)
        .unwrap_or_else(|| panic!("no destination {name} in {side:#}"))
}

fn delivered(side: &Value) -> u64 {
    side["delivered_bytes"].as_u64().unwrap_or(0)
}

#[test]
fn drain_and_add_move_the_stream_to_a_new_path() {
    let sock = socket_path("drain.sock");
    let input = data(16 * FOOT, 71);
    let (mut r, port) = rx(&[]);
    // A second path to the same receiver.
    let proxy = FaultProxy::start(port, |_| None);
    let (port, other) = (port.to_string(), proxy.port.to_string());
    let (direct, detour) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{other}"));
    let (mut t, feed) = controlled(&port, "2", &sock);
    feed.send(input[..6 * FOOT].to_vec()).unwrap();
    until(&sock, "the first 6 feet are delivered", |_, s| {
        delivered(s) == 6 * FOOT as u64
    });

    let added = ctl(&sock, &["add", "127.0.0.1", &other, "threads", "2"]);
    assert_eq!(added.code, 0, "add: {}{}", added.out, added.err);
    assert!(
        added.out.contains(&format!("added {detour}")),
        "{}",
        added.out
    );
    let drained = ctl(&sock, &["drain", "127.0.0.1", &port]);
    assert_eq!(drained.code, 0, "drain: {}{}", drained.out, drained.err);
    assert!(drained.out.contains("draining"), "{}", drained.out);
    let before = until(&sock, "the drained path has closed", |_, s| {
        destination(s, &direct)["connected"] == 0
    });
    let direct_before = destination(&before, &direct)["bytes"].as_u64().unwrap();

    feed.send(input[6 * FOOT..12 * FOOT].to_vec()).unwrap();
    let after = until(&sock, "12 feet are delivered", |_, s| {
        delivered(s) == 12 * FOOT as u64
    });
    let (d, n) = (destination(&after, &direct), destination(&after, &detour));
    eprintln!(
        "per-path bytes after the drain: {direct} {} (drained {}), {detour} {}",
        d["bytes"], d["drained"], n["bytes"]
    );
    assert_eq!(d["bytes"].as_u64(), Some(direct_before), "{after:#}");
    assert_eq!(
        (d["drained"].as_bool(), d["threads"].as_u64()),
        (Some(true), Some(0))
    );
    assert!(
        n["bytes"].as_u64().unwrap() >= 6 * FOOT as u64,
        "the new path carried the feet fed after the drain: {after:#}"
    );
    assert_eq!(n["rank"], 2);

    // Back again: the direct path takes feet once more.
    let undrained = ctl(&sock, &["undrain", "127.0.0.1", &port]);
    assert_eq!(
        undrained.code, 0,
        "undrain: {}{}",
        undrained.out, undrained.err
    );
    let back = until(&sock, "the direct path is up again", |_, s| {
        destination(s, &direct)["connected"].as_u64() == Some(2)
    });
    assert_eq!(destination(&back, &direct)["drained"], false);
    feed.send(input[12 * FOOT..].to_vec()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "drained, added and undrained");
    assert!(!sock.exists(), "the socket file is removed at the end");
}

#[test]
fn threads_and_rate_change_a_running_sender() {
    let sock = socket_path("threads.sock");
    let input = data(4 * FOOT, 73);
    let (mut r, port) = rx(&[]);
    let port = port.to_string();
    let direct = format!("127.0.0.1:{port}");
    let (mut t, feed) = controlled(&port, "2", &sock);
    feed.send(input[..FOOT].to_vec()).unwrap();
    until(&sock, "the first foot is delivered", |_, s| {
        delivered(s) == FOOT as u64
    });

    let more = ctl(&sock, &["threads", "127.0.0.1", &port, "5"]);
    assert_eq!(more.code, 0, "threads: {}{}", more.out, more.err);
    let grown = until(&sock, "5 connections are up", |_, s| {
        destination(s, &direct)["connected"] == 5
    });
    assert_eq!(destination(&grown, &direct)["threads"], 5);
    assert_eq!(grown["connections"].as_array().unwrap().len(), 5);
    let fewer = ctl(&sock, &["threads", "127.0.0.1", &port, "1"]);
    assert_eq!(fewer.code, 0, "threads: {}{}", fewer.out, fewer.err);
    until(&sock, "1 connection is up", |_, s| {
        destination(s, &direct)["connected"] == 1
    });

    let limited = ctl(&sock, &["rate", "20M"]);
    assert_eq!(limited.code, 0, "rate: {}{}", limited.out, limited.err);
    assert_eq!(side(&sock).1["rate_limit"], 20u64 << 20);
    let unlimited = ctl(&sock, &["rate", "none"]);
    assert_eq!(
        unlimited.code, 0,
        "rate: {}{}",
        unlimited.out, unlimited.err
    );
    assert!(side(&sock).1["rate_limit"].is_null());

    feed.send(input[FOOT..].to_vec()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "threads and rate changed");
}

#[test]
fn status_is_degraded_while_the_path_is_dark_and_healthy_once_it_is_back() {
    let sock = socket_path("dark.sock");
    let input = data(8 * FOOT, 79);
    let (mut r, port) = rx(&[]);
    let healed = Arc::new(AtomicBool::new(false));
    let plan = {
        let healed = Arc::clone(&healed);
        move |n: u64| Fault {
            // The first connection goes dark after 3 feet; the ones after
            // it get nowhere until the path heals.
            stall_after: match (n, healed.load(Ordering::SeqCst)) {
                (0, _) => Some(3 * FOOT as u64),
                (_, false) => Some(0),
                (_, true) => None,
            },
            ..Fault::default()
        }
    };
    let proxy = FaultProxy::with(port, plan);
    let (mut t, feed) = controlled(&proxy.port.to_string(), "1", &sock);
    feed.send(input.clone()).unwrap();
    drop(feed);
    // Healthy at first (the first connection is given time to come up).
    let (code, first) = side(&sock);
    assert!(code == 0 || delivered(&first) > 0, "{first:#}");
    let dark = until(
        &sock,
        "status is degraded after the first feet",
        |code, s| code == 1 && delivered(s) >= FOOT as u64,
    );
    let problems = dark["problems"].as_array().unwrap();
    assert!(!problems.is_empty(), "degraded names its problem: {dark:#}");
    eprintln!("while dark: {problems:?}");
    assert!(delivered(&dark) < input.len() as u64);

    healed.store(true, Ordering::SeqCst);
    // The sender finds the healed path itself (after its backoff).
    expect_delivered(&mut t, &mut r, &input, "after the path came back");
    assert!(proxy.stalls.load(Ordering::SeqCst) >= 1);
}

#[test]
fn ctl_stop_stops_either_side_as_sigint_does() {
    // The sender.
    let tx_sock = socket_path("stop-tx.sock");
    let (mut r, port) = rx(&[]);
    let (mut t, feed) = controlled(&port.to_string(), "16", &tx_sock);
    feed.send(data(2 * FOOT, 83)).unwrap();
    until(&tx_sock, "two feet are delivered", |_, s| {
        delivered(s) == 2 * FOOT as u64
    });
    let stopped = ctl(&tx_sock, &["stop"]);
    assert_eq!(stopped.code, 0, "stop: {}{}", stopped.out, stopped.err);
    assert!(stopped.out.contains("stopping"), "{}", stopped.out);
    assert_eq!(t.wait(DEADLINE).code(), Some(130), "{}", t.stderr());
    t.expect_stderr("stopped by");
    let (status, out) = r.output();
    assert!(!status.success(), "rx: {status}");
    r.expect_stderr("the sender stopped the stream");
    assert_prefix(&out, &data(2 * FOOT, 83), "what rx wrote before the stop");
    drop(feed);

    // The receiver: its status first, then the stop.
    let rx_sock = socket_path("stop-rx.sock");
    let (mut r, port) = rx(&["--control", rx_sock.to_str().unwrap()]);
    let (mut t, feed) = tx_fed(&["tx", "127.0.0.1", &port.to_string()]);
    feed.send(data(2 * FOOT, 84)).unwrap();
    let rx_side = until(&rx_sock, "rx wrote the two feet's bytes", |_, s| {
        s["flows"][0]["payload_bytes"] == 2 * FOOT as u64
    });
    assert_eq!(rx_side["role"], "rx");
    assert_eq!(rx_side["flows"][0]["state"], "running", "{rx_side:#}");
    let refused = ctl(&rx_sock, &["drain", "127.0.0.1", "1"]);
    assert_eq!(refused.code, 1, "{}{}", refused.out, refused.err);
    assert!(refused.err.contains("sender"), "{}", refused.err);
    let stopped = ctl(&rx_sock, &["stop"]);
    assert_eq!(stopped.code, 0, "stop: {}{}", stopped.out, stopped.err);
    let (status, out) = r.output();
    assert_eq!(status.code(), Some(130), "{}", r.stderr());
    assert_same(&out, &data(2 * FOOT, 84), "what rx wrote before the stop");
    assert!(!t.wait(DEADLINE).success(), "tx: {}", t.stderr());
    drop(feed);
}

#[test]
fn bad_commands_and_absent_sockets_are_clear_errors() {
    let absent = socket_path("absent.sock");
    let c = ctl(&absent, &["status"]);
    assert_eq!(c.code, 2);
    assert!(c.err.contains("--control"), "{}", c.err);
    // Found out before anything is sent, so no socket is needed.
    for (words, needle) in [
        (&["bogus"][..], "unknown command \"bogus\""),
        (&["threads", "h", "1", "0"][..], "threads"),
        (&["add", "h"][..], "add"),
        (&["rate", "fast"][..], "fast"),
        (&[][..], "no command"),
    ] {
        let c = ctl(&absent, words);
        assert_eq!(c.code, 2, "{words:?}: {}{}", c.out, c.err);
        let said = format!("{}{}", c.out, c.err);
        assert!(said.contains(needle), "{words:?}: {said}");
    }

    let sock = socket_path("bad.sock");
    let (mut r, port) = rx(&[]);
    let port = port.to_string();
    let (mut t, feed) = controlled(&port, "16", &sock);
    for (words, needle) in [
        (&["drain", "127.0.0.1", "1"][..], "not a destination"),
        (&["undrain", "127.0.0.1", "1"][..], "not a destination"),
        (&["add", "127.0.0.1", &port][..], "already"),
        (
            &["add", "no.such.host.invalid", "1"][..],
            "no.such.host.invalid",
        ),
    ] {
        let c = ctl(&sock, words);
        assert_eq!(c.code, 1, "{words:?}: {}{}", c.out, c.err);
        assert!(c.err.contains(needle), "{words:?}: {}", c.err);
    }
    // A second process cannot take a socket that is served.
    let (mut other, _) = Proc::spawn(
        "rx",
        &["rx", "0", "--control", sock.to_str().unwrap()],
        Out::Collect,
    );
    assert_eq!(other.wait(DEADLINE).code(), Some(1));
    other.expect_stderr("another process is serving it");

    let input = data(FOOT + 5, 89);
    feed.send(input.clone()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "after bad commands");
}

#[test]
fn a_hostile_control_client_does_not_disturb_the_stream() {
    use std::os::unix::fs::PermissionsExt;
    let sock = socket_path("hostile.sock");
    // A socket file left behind by a process that is gone is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let input = data(24 * FOOT + 3, 97);
    let (mut r, port) = rx(&[]);
    let (mut t, feed) = controlled(&port.to_string(), "4", &sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    // Clients that say nothing, one that never ends its line, one that
    // sends what is not text, all held open while the stream runs.
    let mut silent: Vec<UnixStream> = (0..6)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut endless = UnixStream::connect(&sock).unwrap();
    endless.write_all(&[b'x'; 4000]).unwrap();
    let mut binary = UnixStream::connect(&sock).unwrap();
    binary.write_all(b"\xff\xfe\x00status\n").unwrap();
    // A closed socket with unread bytes may end in a reset: the answer
    // comes before it.
    let mut answer = String::new();
    let _ = binary.read_to_string(&mut answer);
    assert!(answer.contains("\"ok\":false"), "{answer}");
    let mut answer = String::new();
    let _ = endless.read_to_string(&mut answer);
    assert!(answer.contains("longer than"), "{answer}");
    // While the silent ones hold their places, more are turned away with
    // a word, not left waiting.
    let mut extra: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut busy = String::new();
    let _ = extra[3].read_to_string(&mut busy);
    assert!(busy.contains("busy"), "{busy}");

    feed.send(input.clone()).unwrap();
    drop(feed);
    let (ts, _) = t.output();
    let (rs, out) = r.output();
    assert!(ts.success(), "tx: {ts}\n{}", t.stderr());
    assert!(rs.success(), "rx: {rs}\n{}", r.stderr());
    assert_same(&out, &input, "with hostile control clients");
    silent.clear();
    extra.clear();
}
