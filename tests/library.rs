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

fn receiver() -> (u16, Receiver) {
    let r = Receiver::builder()
        .address("127.0.0.1")
        .bind()
        .expect("bind");
    (r.local_addr().port(), r)
}

fn read_all(mut flow: Flow) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    flow.read_to_end(&mut got).map(|_| got)
}

fn sender(port: u16, name: &str) -> Sender {
    Sender::builder()
        .destination("127.0.0.1", port)
        .threads(3)
        .foot_size(64 << 10)
        .name(name)
        .connect()
        .expect("connect")
}

#[test]
fn flows_in_parallel_arrive_exact_through_one_receiver() {
    let sizes = [0usize, 1, 300_000, 3 << 20];
    let (port, mut r) = receiver();
    let senders: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            std::thread::spawn(move || {
                let want = data(len, i as u64 + 7);
                let mut s = sender(port, &format!("backup/flow-{i}"));
                // Writes of odd sizes: the sender cuts feet of its own.
                for part in want.chunks(7777) {
                    s.write_all(part).expect("write");
                }
                let summary = s.finish().expect("finish");
                assert_eq!(summary.bytes, len as u64);
            })
        })
        .collect();
    within(120, "four flows into one receiver", move || {
        let readers: Vec<_> = (0..sizes.len())
            .map(|_| {
                let flow = r.accept().expect("a flow");
                let name = flow.name().expect("a named flow").to_string();
                (name, std::thread::spawn(move || read_all(flow)))
            })
            .collect();
        for (name, reader) in readers {
            let i: usize = name.strip_prefix("backup/flow-").unwrap().parse().unwrap();
            let got = reader.join().unwrap().expect("the flow's bytes");
            assert_same(&got, &data(sizes[i], i as u64 + 7), &name);
        }
        for s in senders {
            s.join().expect("a sender failed");
        }
        // The receiver told of each flow as it opened and as it closed.
        let events = r.events();
        let (mut opened, mut closed) = (0, 0);
        while closed < sizes.len() {
            match events.recv().expect("the receiver's events") {
                viamillipede::Event::FlowOpened { name, .. } => {
                    assert!(name.unwrap().starts_with("backup/flow-"));
                    opened += 1;
                }
                viamillipede::Event::FlowClosed { error, .. } => {
                    assert_eq!(error, None, "a flow failed");
                    closed += 1;
                }
                other => panic!("not a receiver's event: {other:?}"),
            }
        }
        assert_eq!(opened, sizes.len());
    });
}

#[test]
fn an_aborted_flow_fails_while_another_goes_on() {
    within(120, "abort beside a clean flow", || {
        let (port, mut r) = receiver();
        let mut a = sender(port, "a");
        let mut b = sender(port, "b");
        let want = data(2 << 20, 3);
        let a_events = a.events();
        a.write_all(&want[..1 << 20]).unwrap();
        a.flush().unwrap();
        b.write_all(&want[..1 << 20]).unwrap();
        b.flush().unwrap();
        let mut readers = std::collections::HashMap::new();
        for _ in 0..2 {
            let flow = r.accept().unwrap();
            let name = flow.name().unwrap().to_string();
            readers.insert(name, std::thread::spawn(move || read_all(flow)));
        }
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
        let err = readers
            .remove("a")
            .unwrap()
            .join()
            .unwrap()
            .expect_err("an aborted flow must not end cleanly");
        assert!(
            err.to_string().contains("the backup was cancelled"),
            "the receiver's error: {err}"
        );
        assert_same(
            &readers.remove("b").unwrap().join().unwrap().unwrap(),
            &want,
            "the flow beside it",
        );
    });
}

#[test]
fn a_flow_dropped_midway_fails_its_sender() {
    within(120, "flow dropped", || {
        let (port, mut r) = receiver();
        let mut s = sender(port, "dropped");
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
        let mut flow = r.accept().unwrap();
        let mut first = vec![0u8; 100_000];
        flow.read_exact(&mut first).expect("the start of the flow");
        drop(flow);
        let e = writer
            .join()
            .unwrap()
            .expect_err("a dropped flow is not success");
        assert!(e.to_string().contains("the flow"), "{e}");
    });
}

#[test]
fn a_receiver_dropped_keeps_its_accepted_flow_and_takes_no_new_one() {
    within(120, "receiver dropped", || {
        let (port, mut r) = receiver();
        let want = data(3 << 20, 21);
        let mut s = sender(port, "kept");
        s.write_all(&want[..1 << 20]).unwrap();
        s.flush().unwrap();
        let flow = r.accept().unwrap();
        drop(r);
        let reader = std::thread::spawn(move || read_all(flow));
        s.write_all(&want[1 << 20..]).unwrap();
        assert_eq!(
            s.finish().expect("the accepted flow").bytes,
            want.len() as u64
        );
        assert_same(&reader.join().unwrap().unwrap(), &want, "after the drop");
        // Once its flow has ended, the socket is closed: nobody is served.
        let mut late = Sender::builder()
            .destination("127.0.0.1", port)
            .threads(1)
            .connect()
            .unwrap();
        late.write_all(b"nobody hears this").unwrap();
        let aborted = late.abort("no receiver");
        assert!(aborted.to_string().contains("no receiver"), "{aborted}");
    });
}

#[test]
fn a_receiver_serving_its_most_flows_refuses_another_as_busy() {
    within(120, "max flows", || {
        let (key, _) = viamillipede::crypto::Key::random().unwrap();
        let mut r = Receiver::builder()
            .address("127.0.0.1")
            .key(key.clone())
            .max_flows(1)
            .bind()
            .unwrap();
        let port = r.local_addr().port();
        let keyed = |name: &str| {
            Sender::builder()
                .destination("127.0.0.1", port)
                .threads(2)
                .foot_size(64 << 10)
                .key(key.clone())
                .name(name)
                .connect()
                .unwrap()
        };
        let mut first = keyed("first");
        first.write_all(&data(1 << 20, 1)).unwrap();
        first.flush().unwrap();
        let flow = r.accept().unwrap();
        assert_eq!(flow.name(), Some("first"));
        let mut second = keyed("second");
        second.write_all(b"no room for this").unwrap();
        let busy = second.finish().expect_err("a second flow is refused");
        assert!(busy.to_string().contains("busy"), "{busy}");
        let reader = std::thread::spawn(move || read_all(flow));
        assert_eq!(first.finish().unwrap().bytes, 1 << 20);
        assert_eq!(reader.join().unwrap().unwrap().len(), 1 << 20);
        // Its flow has ended: there is room again.
        let mut third = keyed("third");
        third.write_all(b"room again").unwrap();
        let reading = std::thread::spawn(move || read_all(r.accept().unwrap()));
        assert_eq!(third.finish().unwrap().bytes, 10);
        assert_eq!(reading.join().unwrap().unwrap(), b"room again");
    });
}

#[test]
fn a_dropped_receiver_fails_the_flows_it_had_not_handed_out() {
    within(120, "queued flow", || {
        let (port, r) = receiver();
        let events = r.events();
        let mut s = sender(port, "queued");
        s.write_all(&data(1 << 20, 31)).unwrap();
        s.flush().unwrap();
        assert!(matches!(
            events.recv().unwrap(),
            viamillipede::Event::FlowOpened { .. }
        ));
        drop(r);
        s.write_all(&data(4 << 20, 32)).ok();
        let e = s.finish().expect_err("a flow nobody took is not success");
        assert!(e.to_string().contains("the flow"), "{e}");
        // Its flow ended: the port is closed now.
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    });
}

#[test]
fn a_flow_that_does_not_fit_in_max_memory_is_refused_as_busy() {
    within(60, "max memory", || {
        let (key, _) = viamillipede::crypto::Key::random().unwrap();
        // Room for one flow of 64 KiB feet and a window of 64 (66 feet).
        let mut r = Receiver::builder()
            .address("127.0.0.1")
            .key(key.clone())
            .max_memory(6 << 20)
            .bind()
            .unwrap();
        let port = r.local_addr().port();
        let keyed = |name: &str| {
            Sender::builder()
                .destination("127.0.0.1", port)
                .threads(1)
                .foot_size(64 << 10)
                .key(key.clone())
                .name(name)
                .connect()
                .unwrap()
        };
        let mut first = keyed("first");
        first.write_all(&data(1 << 20, 41)).unwrap();
        first.flush().unwrap();
        let flow = r.accept().unwrap();
        let mut second = keyed("second");
        second.write_all(b"no room").unwrap();
        let busy = second.finish().expect_err("a second flow does not fit");
        assert!(busy.to_string().contains("--max-memory"), "{busy}");
        let reader = std::thread::spawn(move || read_all(flow));
        assert_eq!(first.finish().unwrap().bytes, 1 << 20);
        assert_eq!(reader.join().unwrap().unwrap().len(), 1 << 20);
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
        let sending = std::thread::spawn(move || s.finish());
        let got = read_all(r.accept().unwrap()).unwrap();
        sending.join().unwrap().expect("finish");
        assert_same(&got, &want, "encrypted");
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
    let bad_name = Sender::builder()
        .destination("127.0.0.1", 9)
        .name("../etc")
        .connect()
        .err()
        .expect("a bad name");
    assert!(bad_name.to_string().contains("name"), "{bad_name}");
    let keyless = Receiver::builder()
        .encrypt(true)
        .bind()
        .err()
        .expect("no key");
    assert!(keyless.to_string().contains("key"), "{keyless}");
    let mut r = Receiver::builder().address("127.0.0.1").bind().unwrap();
    let none = r.accept_timeout(Duration::from_millis(50)).unwrap();
    assert!(none.is_none(), "no sender, no flow");
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
fn the_examples_send_files_into_one_receiver() {
    let dir = std::env::temp_dir().join(format!("vm-examples-{}", std::process::id()));
    let (sent, received) = (dir.join("sent"), dir.join("received"));
    std::fs::create_dir_all(&sent).unwrap();
    std::fs::create_dir_all(&received).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("part-{i}.bin"), data((i + 1) << 20, 11 + i as u64)))
        .collect();
    for (name, bytes) in &files {
        std::fs::write(sent.join(name), bytes).unwrap();
    }
    let mut rx = Example::start("receive_files", &["0", received.to_str().unwrap(), "3"]);
    let port = rx.line();
    let mut txs: Vec<Example> = files
        .iter()
        .map(|(name, _)| {
            let path = sent.join(name);
            Example::start(
                "send_file",
                &["127.0.0.1", port.trim(), path.to_str().unwrap(), "4"],
            )
        })
        .collect();
    for tx in &mut txs {
        assert!(tx.wait().success(), "send_file: {}", tx.stderr());
    }
    assert!(rx.wait().success(), "receive_files: {}", rx.stderr());
    for (name, bytes) in &files {
        let got = std::fs::read(received.join(name)).unwrap();
        assert_same(&got, bytes, name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn events_tell_of_connections_progress_and_retransmits() {
    use viamillipede::Event;
    within(120, "events through a proxy that resets", || {
        let (port, mut r) = receiver();
        let (flow_events_tx, flow_events) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let flow = r.accept().unwrap();
            flow_events_tx.send(flow.events()).unwrap();
            read_all(flow)
        });
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
        let rx_last = flow_events
            .recv()
            .unwrap()
            .try_iter()
            .fold(None, |l, e| match e {
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
