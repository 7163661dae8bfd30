//! Helpers for the integration tests: spawning the real binary with
//! deadlines and kill-on-drop guards, feeding stdin from a thread, capturing
//! stdout and stderr, and a fault proxy that resets connections.

#![allow(dead_code, reason = "each test uses a different subset")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use viamillipede::protocol::{Hello, Reply};
use viamillipede::wire;

/// The longest any process in a test may run.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Path of the binary under test. `VIAMILLIPEDE_TEST_BIN` runs the tests against another build instead,
/// to compare two builds on the same tests.
pub fn bin() -> String {
    std::env::var("VIAMILLIPEDE_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_viamillipede").to_string())
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A spawned viamillipede: killed on drop, stderr collected line by line.
pub struct Proc {
    pub name: String,
    pid: u32,
    exit: Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr_done: Option<JoinHandle<()>>,
    pub stdin: Option<ChildStdin>,
    started: Instant,
}

/// How stdout is handled.
pub enum Out {
    /// Collected into memory (see `Proc::output`).
    Collect,
    /// Given to the test to read (and maybe close).
    Pipe,
}

impl Proc {
    /// Spawns the binary with `args`; stdin is piped.
    pub fn spawn(name: &str, args: &[&str], out: Out) -> (Proc, Option<std::process::ChildStdout>) {
        Proc::spawn_with(name, args, out, Stdio::piped())
    }

    /// Spawns the binary with `args` and the given stdin.
    pub fn spawn_with(
        name: &str,
        args: &[&str],
        out: Out,
        stdin: Stdio,
    ) -> (Proc, Option<std::process::ChildStdout>) {
        let mut child: Child = Command::new(bin())
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (line_tx, lines) = crossbeam_channel::unbounded();
        let text = Arc::new(Mutex::new(String::new()));
        let stderr_done = {
            let text = Arc::clone(&text);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    text.lock().unwrap().push_str(&format!("{line}\n"));
                    let _ = line_tx.send(line);
                }
            })
        };
        let (collected, piped) = match out {
            Out::Collect => (
                Some(std::thread::spawn(move || {
                    let mut v = Vec::new();
                    let mut stdout = stdout;
                    let _ = stdout.read_to_end(&mut v);
                    v
                })),
                None,
            ),
            Out::Pipe => (None, Some(stdout)),
        };
        let pid = child.id();
        let (exit_tx, exit) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            if let Ok(s) = child.wait() {
                let _ = exit_tx.send(s);
            }
        });
        let proc = Proc {
            name: name.to_string(),
            pid,
            exit,
            status: None,
            lines,
            stderr: text,
            stdout: collected,
            stderr_done: Some(stderr_done),
            stdin,
            started: Instant::now(),
        };
        (proc, piped)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Asserts that stderr (so far) contains `needle`.
    pub fn expect_stderr(&self, needle: &str) {
        let err = self.stderr();
        assert!(
            err.contains(needle),
            "{}: stderr lacks {needle:?}:\n{err}",
            self.name
        );
    }

    /// Waits until stderr lines containing each of `needles` have appeared,
    /// in any order; panics at the deadline.
    pub fn wait_lines(&self, needles: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        let mut missing: Vec<&str> = needles.to_vec();
        while !missing.is_empty() {
            match self.lines.recv_deadline(deadline) {
                Ok(line) => missing.retain(|n| !line.contains(n)),
                Err(_) => panic!(
                    "{}: no stderr lines with {missing:?} within {within:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                ),
            }
        }
    }

    /// Waits for a stderr line containing `needle`; panics at the deadline.
    pub fn wait_line(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            match self.lines.recv_deadline(deadline) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "{}: no stderr line with {needle:?} within {within:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                ),
            }
        }
    }

    /// Waits for the exit; panics (after killing it) at the deadline.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        match self.exit.recv_timeout(within) {
            Ok(s) => {
                self.status = Some(s);
                // All of stderr is read once the process has exited.
                if let Some(h) = self.stderr_done.take() {
                    let _ = h.join();
                }
                s
            }
            Err(_) => {
                self.kill();
                panic!(
                    "{}: still running after {within:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
        }
    }

    /// Waits up to `within` for the exit; None if it is still running.
    pub fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.exit.recv_timeout(within).ok();
        }
        self.status
    }

    /// Waits for the exit and returns the collected stdout.
    pub fn output(&mut self) -> (ExitStatus, Vec<u8>) {
        self.stdin.take();
        let status = self.wait(DEADLINE);
        let out = self
            .stdout
            .take()
            .map(|h| h.join().expect("stdout thread"))
            .unwrap_or_default();
        (status, out)
    }

    /// Sends a signal by name (`USR1`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -{sig} {} failed", self.pid);
    }

    fn kill(&mut self) {
        if self.status.is_none() && self.exit.try_recv().is_err() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.pid.to_string())
                .status();
            self.status = self.exit.recv_timeout(Duration::from_secs(5)).ok();
        }
    }

    /// Seconds since spawn.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `rx 0 extra...` collecting stdout; returns it with its port.
pub fn rx(extra: &[&str]) -> (Proc, u16) {
    let mut args = vec!["rx", "0"];
    args.extend_from_slice(extra);
    let (p, _) = Proc::spawn("rx", &args, Out::Collect);
    let port = port_of(&p);
    (p, port)
}

/// Reads the port from rx's `listening on` line.
pub fn port_of(p: &Proc) -> u16 {
    let line = p.wait_line("listening on", Duration::from_secs(10));
    line.rsplit(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// Starts tx with `args`, feeding `input` then closing stdin.
pub fn tx(args: &[&str], input: Arc<Vec<u8>>) -> Proc {
    let (mut p, _) = Proc::spawn("tx", args, Out::Collect);
    let mut stdin = p.stdin.take().expect("stdin");
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    p
}

/// Starts tx and returns a sender for stdin chunks; dropping it ends stdin.
pub fn tx_fed(args: &[&str]) -> (Proc, Sender<Vec<u8>>) {
    let (mut p, _) = Proc::spawn("tx", args, Out::Collect);
    let mut stdin = p.stdin.take().expect("stdin");
    let (chunks, rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    std::thread::spawn(move || {
        for c in rx {
            if stdin.write_all(&c).is_err() {
                break;
            }
        }
    });
    (p, chunks)
}

/// Waits for both sides and checks they succeeded and `rx` wrote `want`.
pub fn expect_delivered(tx: &mut Proc, rx: &mut Proc, want: &[u8], what: &str) {
    let (ts, _) = tx.output();
    let (rs, out) = rx.output();
    assert!(ts.success(), "{what}: tx failed: {ts}\n{}", tx.stderr());
    assert!(rs.success(), "{what}: rx failed: {rs}\n{}", rx.stderr());
    assert_same(&out, want, what);
}

/// Sends `input` through rx and tx with the given extra tx words; checks
/// byte-exact output and exit 0 on both sides. Returns both stderrs.
pub fn transfer(input: Vec<u8>, tx_extra: &[&str], rx_extra: &[&str]) -> (String, String) {
    let input = Arc::new(input);
    let (mut r, port) = rx(rx_extra);
    let port = port.to_string();
    let mut args = vec!["tx", "127.0.0.1", &port];
    args.extend_from_slice(tx_extra);
    let mut t = tx(&args, Arc::clone(&input));
    expect_delivered(&mut t, &mut r, &input, "transfer");
    (t.stderr(), r.stderr())
}

/// Asserts equal bytes without printing megabytes.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: output differs: got {} bytes, want {}, first difference at {first}",
            got.len(),
            want.len()
        );
    }
}

/// Asserts that `got` is the start of `want`: what a receiver stopped
/// mid-stream may have written, never anything else.
pub fn assert_prefix(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got.len() <= want.len(),
        "{what}: {} bytes written of a {}-byte input",
        got.len(),
        want.len()
    );
    assert_same(got, &want[..got.len()], what);
}

/// What the fault proxy does to one connection's sender-to-receiver bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fault {
    /// Reset both sides once this many bytes have been forwarded.
    pub reset_after: Option<u64>,
    /// Flip a bit of the byte at this offset: `flip_bit`, or the lowest.
    pub flip_at: Option<u64>,
    /// The bit `flip_at` flips (0: the lowest).
    pub flip_bit: u8,
    /// After this many bytes, hold what follows for this long: a peer (or
    /// path) that is slow at one point of the exchange.
    pub delay_after: Option<(u64, Duration)>,
    /// Apply to what the server sends back instead (reverse mode, where the
    /// data flows from the server to the client).
    pub replies: bool,
    /// Once this many bytes have been forwarded, forward nothing more but
    /// keep the connection open, swallowing what arrives: a path gone dark
    /// whose TCP still acknowledges, so only the application can notice.
    pub stall_after: Option<u64>,
}

/// A TCP proxy that injects faults into the connections through it, and
/// records what the first connection's client sent first.
pub struct FaultProxy {
    pub port: u16,
    pub resets: Arc<AtomicU64>,
    pub flips: Arc<AtomicU64>,
    pub stalls: Arc<AtomicU64>,
    recorded: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

/// How much of the first connection the proxy records.
const RECORD: usize = 4096;

impl FaultProxy {
    /// Forwards to `127.0.0.1:upstream`; the n-th connection is reset after
    /// `budget(n)` bytes (None: never).
    pub fn start(
        upstream: u16,
        budget: impl Fn(u64) -> Option<u64> + Send + 'static,
    ) -> FaultProxy {
        FaultProxy::with(upstream, move |n| Fault {
            reset_after: budget(n),
            ..Fault::default()
        })
    }

    /// Forwards to `127.0.0.1:upstream`, doing `plan(n)` to the n-th connection.
    pub fn with(upstream: u16, plan: impl Fn(u64) -> Fault + Send + 'static) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let proxy = FaultProxy {
            port,
            resets: Arc::default(),
            flips: Arc::default(),
            stalls: Arc::default(),
            recorded: Arc::default(),
            stop: Arc::default(),
        };
        let (resets, flips, stalls, recorded, stop) = (
            Arc::clone(&proxy.resets),
            Arc::clone(&proxy.flips),
            Arc::clone(&proxy.stalls),
            Arc::clone(&proxy.recorded),
            Arc::clone(&proxy.stop),
        );
        std::thread::spawn(move || {
            for (n, client) in listener.incoming().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let fault = plan(n as u64);
                let counters = (Arc::clone(&resets), Arc::clone(&flips), Arc::clone(&stalls));
                let record = (n == 0).then(|| Arc::clone(&recorded));
                std::thread::spawn(move || pump(client, server, fault, counters, record));
            }
        });
        proxy
    }

    /// The first bytes the first connection's client sent.
    pub fn recorded(&self) -> Vec<u8> {
        self.recorded.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
    let _ = s.shutdown(Shutdown::Read);
}

fn pump(
    client: TcpStream,
    server: TcpStream,
    fault: Fault,
    counters: Counters,
    record: Option<Arc<Mutex<Vec<u8>>>>,
) {
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    // The fault applies to one direction: what the client sends, or (for
    // `replies`) what the server sends back.
    let (forward_fault, back_fault) = if fault.replies {
        (Fault::default(), fault)
    } else {
        (fault, Fault::default())
    };
    let back_counters = counters.clone();
    let back = std::thread::spawn(move || forward(s2, c2, back_fault, back_counters, None));
    forward(client, server, forward_fault, counters, record);
    let _ = back.join();
}

/// Resets, flips and stalls done.
type Counters = (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>);

/// Copies `from` to `to`, injecting `fault`.
fn forward(
    mut from: TcpStream,
    mut to: TcpStream,
    fault: Fault,
    (resets, flips, stalls): Counters,
    record: Option<Arc<Mutex<Vec<u8>>>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                break;
            }
            Ok(n) => n,
        };
        if let Some(rec) = &record {
            let mut rec = rec.lock().unwrap();
            let room = RECORD.saturating_sub(rec.len()).min(n);
            rec.extend_from_slice(&buf[..room]);
        }
        if let Some(at) = fault
            .flip_at
            .filter(|&at| at >= sent && at < sent + n as u64)
        {
            buf[(at - sent) as usize] ^= fault.flip_bit.max(1);
            flips.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((after, hold)) = fault.delay_after {
            if sent < after && sent + n as u64 >= after {
                let cut = (after - sent) as usize;
                if to.write_all(&buf[..cut]).is_err() {
                    break;
                }
                std::thread::sleep(hold);
                if to.write_all(&buf[cut..n]).is_err() {
                    break;
                }
                sent += n as u64;
                continue;
            }
        }
        if let Some(l) = fault.reset_after.filter(|&l| sent + n as u64 >= l) {
            // Forward part of the frame, then reset both sides mid-stream.
            let cut = (l - sent) as usize;
            let _ = to.write_all(&buf[..cut]);
            resets.fetch_add(1, Ordering::Relaxed);
            reset(&from);
            reset(&to);
            break;
        }
        if let Some(l) = fault.stall_after.filter(|&l| sent + n as u64 >= l) {
            let cut = (l - sent) as usize;
            let _ = to.write_all(&buf[..cut]);
            stalls.fetch_add(1, Ordering::Relaxed);
            // Swallow everything until the sender gives up on us.
            while matches!(from.read(&mut buf), Ok(n) if n > 0) {}
            let _ = to.shutdown(Shutdown::Write);
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
}

/// Reads until rx closes the connection; panics if it stays open.
pub fn expect_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => got,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => got,
        Err(e) => panic!("rx kept the connection open: {e}"),
    }
}

pub fn hello(session: u8, foot_size: u32, window: u32) -> Vec<u8> {
    let h = Hello {
        flags: 0,
        checkphrase: [0; 4],
        session: [session; 16],
        foot_size,
        window,
        worker: 0,
        extension: Vec::new(),
    };
    let mut b = Vec::new();
    h.encode(&mut b);
    b
}

/// A raw sender: connects, says hello, returns the stream and rx's reply.
pub fn join(port: u16, session: u8, foot_size: u32, window: u32) -> (TcpStream, Reply) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello(session, foot_size, window)).unwrap();
    let reply = wire::read_reply(&mut s).expect("reply");
    (s, reply)
}

/// Writes a key file of 32 random-looking bytes (mode 600) and returns its
/// path; the same `seed` gives the same key.
pub fn key_file(name: &str, seed: u8) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("viamillipede-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    // data() folds its seed to an odd number: keep every seed's key apart.
    std::fs::write(&path, data(32, 2 * u64::from(seed) + 1001)).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}
