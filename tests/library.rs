//! The library API in one process: senders and receivers as a program that
//! embeds them uses them, and the examples as separate programs.

use crate::util::{assert_same, data};
use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;
use viamillipede::{Flow, Receiver, Sender};

/// Runs `f` on a thread and fails the test if it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    result
        .recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: no end within {secs} s"))
}

fn receiver() -> (u16, Flow) {
    let mut r = Receiver::builder()
        .address("127.0.0.1")
        .bind()
        .expect("bind");
    let port = r.local_addr().port();
    (port, r.accept().expect("a flow"))
}

fn read_all(mut flow: Flow) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    flow.read_to_end(&mut got).map(|_| got)
}

#[test]
fn flows_in_parallel_arrive_exact() {
    let sizes = [0usize, 1, 300_000, 3 << 20];
    let runs: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            std::thread::spawn(move || {
                let want = data(len, i as u64 + 7);
                let (port, flow) = receiver();
                let reader = std::thread::spawn(move || read_all(flow));
                let mut s = Sender::builder()
                    .destination("127.0.0.1", port)
                    .threads(3)
                    .foot_size(64 << 10)
                    .connect()
                    .expect("connect");
                // Writes of odd sizes: the sender cuts feet of its own.
                for part in want.chunks(7777) {
                    s.write_all(part).expect("write");
                }
                let summary = s.finish().expect("finish");
                assert_eq!(summary.bytes, len as u64);
                let got = reader.join().unwrap().expect("the flow's bytes");
                assert_same(&got, &want, &format!("flow {i}"));
            })
        })
        .collect();
    within(120, "four flows", move || {
        for r in runs {
            r.join().expect("a flow failed");
        }
    });
}

#[test]
fn an_aborted_flow_fails_while_another_goes_on() {
    within(120, "abort beside a clean flow", || {
        let (port_a, flow_a) = receiver();
        let (port_b, flow_b) = receiver();
        let read_a = std::thread::spawn(move || read_all(flow_a));
        let read_b = std::thread::spawn(move || read_all(flow_b));
        let mut a = Sender::builder()
            .destination("127.0.0.1", port_a)
            .threads(2)
            .foot_size(64 << 10)
            .connect()
            .unwrap();
        let mut b = Sender::builder()
            .destination("127.0.0.1", port_b)
            .threads(2)
            .foot_size(64 << 10)
            .connect()
            .unwrap();
        let want = data(2 << 20, 3);
        let a_events = a.events();
        a.write_all(&want[..1 << 20]).unwrap();
        a.flush().unwrap();
        b.write_all(&want[..1 << 20]).unwrap();
        // The receiver has written some of it: a connection is up to carry
        // the abort.
        while !matches!(
            a_events.recv().unwrap(),
            viamillipede::Event::Progress { .. }
        ) {}
        let e = a.abort("the backup was cancelled");
        assert!(
            e.to_string().contains("the backup was cancelled"),
            "the sender's error: {e}"
        );
        b.write_all(&want[1 << 20..]).unwrap();
        assert_eq!(b.finish().expect("the other flow").bytes, want.len() as u64);
        let err = read_a
            .join()
            .unwrap()
            .expect_err("an aborted flow must not end cleanly");
        assert!(
            err.to_string().contains("the backup was cancelled"),
            "the receiver's error: {err}"
        );
        assert_same(
            &read_b.join().unwrap().unwrap(),
            &want,
            "the flow beside it",
        );
    });
}

#[test]
fn a_receiver_dropped_mid_flow_fails_the_sender() {
    within(120, "receiver dropped", || {
        let (port, mut flow) = receiver();
        let mut s = Sender::builder()
            .destination("127.0.0.1", port)
            .threads(2)
            .foot_size(64 << 10)
            .connect()
            .unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = data(1 << 20, 9);
            // Far more than the window and the pipes hold: the sender must
            // find out, not block.
            for _ in 0..256 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
            s.finish()
        });
        let mut first = vec![0u8; 100_000];
        flow.read_exact(&mut first).expect("the start of the flow");
        drop(flow);
        let e = writer
            .join()
            .unwrap()
            .expect_err("a dropped receiver is not success");
        assert!(!e.to_string().is_empty());
    });
}

#[test]
fn keys_and_encryption_through_the_builders() {
    within(60, "an encrypted flow", || {
        let (key, _) = viamillipede::crypto::Key::random().unwrap();
        let mut r = Receiver::builder()
            .address("127.0.0.1")
            .key(key.clone())
            .encrypt(true)
            .bind()
            .unwrap();
        let port = r.local_addr().port();
        let reader = {
            let flow = r.accept().unwrap();
            std::thread::spawn(move || read_all(flow))
        };
        let want = data(500_000, 5);
        let mut s = Sender::builder()
            .destination("127.0.0.1", port)
            .threads(2)
            .key(key)
            .encrypt(true)
            .compress(3)
            .checksums(true)
            .connect()
            .unwrap();
        s.write_all(&want).unwrap();
        s.finish().expect("finish");
        assert_same(&reader.join().unwrap().unwrap(), &want, "encrypted");
    });
}

#[test]
fn bad_options_are_refused_at_once() {
    let no_dest = Sender::builder().connect().err().expect("no destination");
    assert!(no_dest.to_string().contains("destination"), "{no_dest}");
    let zero = Sender::builder()
        .destination("127.0.0.1", 9)
        .threads(0)
        .connect()
        .err()
        .expect("threads 0");
    assert!(zero.to_string().contains("threads"), "{zero}");
    let keyless = Receiver::builder()
        .encrypt(true)
        .bind()
        .err()
        .expect("no key");
    assert!(keyless.to_string().contains("key"), "{keyless}");
    let mut r = Receiver::builder().address("127.0.0.1").bind().unwrap();
    let _flow = r.accept().unwrap();
    assert!(r.accept().is_err(), "one flow per receiver");
}

/// An example program, killed if the test ends before it does.
struct Example {
    pid: u32,
    exited: mpsc::Receiver<std::process::ExitStatus>,
    line: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    done: bool,
}

impl Example {
    fn start(name: &str, args: &[&str]) -> Example {
        use std::io::BufRead;
        let path = std::env::current_exe()
            .unwrap()
            .parent()
            .and_then(|d| d.parent())
            .map(|d| d.join("examples").join(name))
            .unwrap();
        let mut child = std::process::Command::new(&path)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", path.display()));
        let (line_tx, line) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = line_tx.send(l);
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let text = std::sync::Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::BufReader::new(err).read_to_string(&mut s);
            text.lock().unwrap().push_str(&s);
        });
        let pid = child.id();
        let (exit_tx, exited) = mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(s) = child.wait() {
                let _ = exit_tx.send(s);
            }
        });
        Example {
            pid,
            exited,
            line,
            stderr,
            done: false,
        }
    }

    fn line(&self) -> String {
        self.line
            .recv_timeout(Duration::from_secs(30))
            .expect("a line on stdout")
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let s = self
            .exited
            .recv_timeout(Duration::from_secs(60))
            .expect("the example never exited");
        self.done = true;
        s
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::process::Command::new("kill")
                .args(["-9", &self.pid.to_string()])
                .status();
        }
    }
}

/// The examples, as programs: one receives into a file, the other sends one.
#[test]
fn the_examples_send_and_receive_a_file() {
    let dir = std::env::temp_dir().join(format!("vm-examples-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("in"), dir.join("out"));
    let want = data(5 << 20, 11);
    std::fs::write(&input, &want).unwrap();
    let mut rx = Example::start("receive_file", &["0", output.to_str().unwrap()]);
    let port = rx.line();
    let mut tx = Example::start(
        "send_file",
        &["127.0.0.1", port.trim(), input.to_str().unwrap(), "4"],
    );
    assert!(tx.wait().success(), "send_file: {}", tx.stderr());
    assert!(rx.wait().success(), "receive_file: {}", rx.stderr());
    assert_same(&std::fs::read(&output).unwrap(), &want, "the received file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn events_tell_of_connections_progress_and_retransmits() {
    use viamillipede::Event;
    within(120, "events through a proxy that resets", || {
        let (port, flow) = receiver();
        let flow_events = flow.events();
        let reader = std::thread::spawn(move || read_all(flow));
        // The first connection through the proxy is reset after 200 kB.
        let proxy = crate::util::FaultProxy::with(port, |n| crate::util::Fault {
            reset_after: (n == 0).then_some(200_000),
            ..Default::default()
        });
        let want = data(4 << 20, 21);
        let mut s = Sender::builder()
            .destination("127.0.0.1", proxy.port)
            .threads(2)
            .foot_size(64 << 10)
            .connect()
            .unwrap();
        let events = s.events();
        s.write_all(&want).unwrap();
        assert_eq!(s.finish().expect("finish").bytes, want.len() as u64);
        assert_same(&reader.join().unwrap().unwrap(), &want, "through the proxy");
        let seen: Vec<Event> = events.try_iter().collect();
        let count = |f: &dyn Fn(&Event) -> bool| seen.iter().filter(|e| f(e)).count();
        // Both connections; the reset one may or may not come back before
        // the other has carried the rest.
        assert!(
            count(&|e| matches!(e, Event::Connected { .. })) >= 2,
            "{seen:?}"
        );
        assert!(
            count(&|e| matches!(e, Event::Disconnected { .. })) >= 1,
            "{seen:?}"
        );
        assert!(
            count(&|e| matches!(e, Event::Retransmits { .. })) >= 1,
            "{seen:?}"
        );
        let last = seen.iter().rev().find_map(|e| match e {
            Event::Progress { bytes } => Some(*bytes),
            _ => None,
        });
        assert_eq!(last, Some(want.len() as u64), "the sender's last progress");
        let rx_last = flow_events.try_iter().fold(None, |l, e| match e {
            Event::Progress { bytes } => Some(bytes),
            _ => l,
        });
        assert_eq!(
            rx_last,
            Some(want.len() as u64),
            "the receiver's last progress"
        );
        assert!(proxy.resets.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    });
}
