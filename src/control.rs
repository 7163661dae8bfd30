//! A running transfer's controls: what the binary's signals and the
//! control socket (`--control PATH`, `viamillipede ctl PATH COMMAND`) ask
//! of it.
//!
//! A side that runs ([`crate::tx`], [`crate::rx`]) attaches a [`Running`]
//! to the configuration's [`Controls`] for as long as it runs; the
//! binary's signal thread and the socket's server only ever talk to the
//! `Controls`. Nothing here is process-wide: a library caller that sets no
//! `Controls` has none of it.
//!
//! The socket speaks one request and one answer per connection: a line of
//! words (`drain host 8834`), answered by one JSON object, `{"ok": true,
//! "message": "..."}`, with `"status"` and `"healthy"` for `status`. Only
//! the socket's own user (or root) is answered, whatever its mode; a client
//! has [`CLIENT_DEADLINE`] to send its line and is never waited on to read
//! the answer, and at most [`MAX_CLIENTS`] are served at once, so no
//! client, slow or hostile, holds up the stream.

use crate::config::Destination;
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The schema of `status`'s document.
pub const STATUS_SCHEMA: &str = "viamillipede-status/1";
/// How long a control client has to send its request.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
/// Control clients served at once; more are turned away.
pub const MAX_CLIENTS: usize = 8;
/// The longest request line.
pub const MAX_REQUEST: usize = 1024;

/// What one running side answers to.
pub trait Running: Send + Sync {
    /// The SIGUSR1 report.
    fn report(&self) -> String;
    /// Its part of `status`: the stats document's side, with live state
    /// and a list of `problems` (empty when healthy).
    fn status(&self) -> Value;
    /// Stops the transfer cleanly, as SIGINT would: `why` is told to the
    /// peer and the user, and the run ends with `Error::Interrupted(sig)`.
    fn stop(&self, why: &str, sig: i32);
    /// Any other command; `Err` names what was wrong.
    fn command(&self, command: &Command) -> Result<String, String> {
        let _ = command;
        Err("this side has no destinations to change: only a sender's can be".into())
    }
}

/// A command to a running transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// The status document.
    Status,
    /// A new destination joins the stream.
    Add {
        /// Where.
        destination: Destination,
        /// Its connections (the run's `threads` if not given).
        threads: Option<u16>,
        /// Its rank, 1 the most preferred (after the others if not given).
        rank: Option<usize>,
    },
    /// No new feet to a destination; its connections close once theirs are
    /// acknowledged.
    Drain(Destination),
    /// A drained destination takes feet again.
    Undrain(Destination),
    /// A destination's connections.
    Threads {
        /// Which.
        destination: Destination,
        /// How many.
        threads: u16,
    },
    /// The sender's rate limit, in bytes per second (`None`: none).
    Rate(Option<u64>),
    /// The clean stop of SIGINT.
    Stop,
}

/// The commands, for `ctl --help` and errors.
pub const COMMANDS: &str = "status | add HOST PORT [threads N] [rank R] | drain HOST PORT | \
undrain HOST PORT | threads HOST PORT N | rate RATE|none | stop";

impl Command {
    /// Parses a request's words.
    pub fn parse(words: &[&str]) -> Result<Command, String> {
        let dest = |host: Option<&&str>, port: Option<&&str>| -> Result<Destination, String> {
            let (Some(host), Some(port)) = (host, port) else {
                return Err(format!("{}: give the destination as HOST PORT", words[0]));
            };
            let port: u16 = port.parse().ok().filter(|&p| p != 0).ok_or_else(|| {
                format!(
                    "{}: port {port:?} is not a port number (1 to 65535)",
                    words[0]
                )
            })?;
            Ok(Destination::new(*host, port))
        };
        let none_after = |n: usize| match words.get(n) {
            Some(extra) => Err(format!("{}: unexpected {extra:?}", words[0])),
            None => Ok(()),
        };
        match words.first().copied() {
            None => Err(format!("no command: give one of {COMMANDS}")),
            Some("status") => none_after(1).map(|()| Command::Status),
            Some("stop") => none_after(1).map(|()| Command::Stop),
            Some("drain") => {
                let d = dest(words.get(1), words.get(2))?;
                none_after(3).map(|()| Command::Drain(d))
            }
            Some("undrain") => {
                let d = dest(words.get(1), words.get(2))?;
                none_after(3).map(|()| Command::Undrain(d))
            }
            Some("threads") => {
                let destination = dest(words.get(1), words.get(2))?;
                let n = words.get(3).ok_or("threads: give HOST PORT N")?;
                let threads = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| format!("threads: {n:?} is out of range: give 1 to 64"))?;
                none_after(4).map(|()| Command::Threads {
                    destination,
                    threads,
                })
            }
            Some("add") => {
                let destination = dest(words.get(1), words.get(2))?;
                let (mut threads, mut rank) = (None, None);
                let mut rest = words[3..].iter();
                while let Some(&word) = rest.next() {
                    let value = rest
                        .next()
                        .ok_or_else(|| format!("add: {word} needs a value"))?;
                    match word {
                        "threads" => {
                            threads = Some(value.parse().ok().filter(|n| (1..=64).contains(n)).ok_or_else(
                                || format!("add: threads {value:?} is out of range: give 1 to 64"),
                            )?)
                        }
                        "rank" => {
                            rank = Some(value.parse().ok().filter(|&r| r >= 1).ok_or_else(
                                || format!("add: rank {value:?} is not a rank: give 1 (the most preferred) or more"),
                            )?)
                        }
                        other => {
                            return Err(format!("add: unknown option {other:?}: give threads N or rank R"))
                        }
                    }
                }
                Ok(Command::Add {
                    destination,
                    threads,
                    rank,
                })
            }
            Some("rate") => {
                let value = words
                    .get(1)
                    .ok_or("rate: give a rate (10M, 1.5G) or none")?;
                let rate = match *value {
                    "none" | "0" => None,
                    v => Some(crate::cli::parse_rate(v).map_err(|e| format!("rate: {e}"))?),
                };
                none_after(2).map(|()| Command::Rate(rate))
            }
            Some(other) => Err(format!("unknown command {other:?}: give one of {COMMANDS}")),
        }
    }
}

#[derive(Default)]
struct Inner {
    running: Vec<(u64, Arc<dyn Running>)>,
    next: u64,
    /// A stop asked for before any side attached: the first one to attach
    /// stops at once.
    stopped: Option<(String, i32)>,
    /// Whether any side ever attached.
    ever: bool,
    /// What the sides that ended did, for the stats document.
    ended: Vec<crate::report::Side>,
}

/// The controls of whatever runs in this process: cheap to clone, shared
/// by the signal thread, the control socket and the running sides.
#[derive(Clone, Default)]
pub struct Controls(Arc<Mutex<Inner>>);

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Controls")
    }
}

impl PartialEq for Controls {
    fn eq(&self, other: &Controls) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Controls {}

/// A side attached to [`Controls`]; detached on drop.
pub struct Attached {
    controls: Controls,
    id: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.controls
            .lock()
            .running
            .retain(|(id, _)| *id != self.id);
    }
}

/// What [`Controls::stop`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The running sides were told.
    Told,
    /// Nothing has run yet: the stop waits for the first side.
    Early,
    /// The sides have ended: nothing to stop.
    Over,
}

impl Controls {
    /// Controls with nothing attached.
    pub fn new() -> Controls {
        Controls::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sides(&self) -> Vec<Arc<dyn Running>> {
        self.lock()
            .running
            .iter()
            .map(|(_, r)| Arc::clone(r))
            .collect()
    }

    /// Attaches a running side until the returned guard is dropped. A stop
    /// asked for before it reaches it at once.
    pub fn attach(&self, running: Arc<dyn Running>) -> Attached {
        let stopped = {
            let mut inner = self.lock();
            inner.next += 1;
            let id = inner.next;
            inner.running.push((id, Arc::clone(&running)));
            inner.ever = true;
            (inner.stopped.clone(), id)
        };
        if let (Some((why, sig)), _) = &stopped {
            running.stop(why, *sig);
        }
        Attached {
            controls: self.clone(),
            id: stopped.1,
        }
    }

    /// Stops every running side cleanly.
    pub fn stop(&self, why: &str, sig: i32) -> Stopped {
        let (sides, ever) = {
            let mut inner = self.lock();
            inner.stopped.get_or_insert_with(|| (why.to_string(), sig));
            let sides: Vec<_> = inner.running.iter().map(|(_, r)| Arc::clone(r)).collect();
            (sides, inner.ever)
        };
        for side in &sides {
            side.stop(why, sig);
        }
        match (sides.is_empty(), ever) {
            (false, _) => Stopped::Told,
            (true, false) => Stopped::Early,
            (true, true) => Stopped::Over,
        }
    }

    /// Keeps what a side did as it ends (see [`crate::report::record`]).
    pub fn record(&self, side: crate::report::Side) {
        self.lock().ended.push(side);
    }

    /// What the sides that ended did, in the order they ended.
    pub fn ended(&self) -> Vec<crate::report::Side> {
        self.lock().ended.clone()
    }

    /// Every running side's report.
    pub fn report(&self) -> String {
        let sides = self.sides();
        if sides.is_empty() {
            return "viamillipede: nothing is running yet\n".into();
        }
        sides.iter().map(|s| s.report()).collect()
    }

    /// The status document, and whether every side is healthy.
    pub fn status(&self) -> (Value, bool) {
        let sides: Vec<Value> = self.sides().iter().map(|s| s.status()).collect();
        let mut problems: Vec<Value> = sides
            .iter()
            .filter_map(|s| s.get("problems").and_then(Value::as_array))
            .flatten()
            .cloned()
            .collect();
        if sides.is_empty() {
            problems.push("nothing is running".into());
        }
        let healthy = problems.is_empty();
        let doc = json!({
            "schema": STATUS_SCHEMA,
            "healthy": healthy,
            "problems": problems,
            "sides": sides,
        });
        (doc, healthy)
    }

    /// Carries out a command; the answer says what was done.
    pub fn apply(&self, command: &Command) -> Result<String, String> {
        match command {
            Command::Status => Ok(match self.status().1 {
                true => "healthy".into(),
                false => "degraded".into(),
            }),
            Command::Stop => match self.stop("stopped by the control socket", STOP_SIGNAL) {
                Stopped::Told => Ok("stopping: the transfer ends as it would on SIGINT".into()),
                Stopped::Early => Ok("stopping before the transfer started".into()),
                Stopped::Over => Err("the transfer has already ended".into()),
            },
            other => {
                let sides = self.sides();
                let mut errors = Vec::new();
                for side in &sides {
                    match side.command(other) {
                        Ok(done) => return Ok(done),
                        Err(e) => errors.push(e),
                    }
                }
                Err(errors
                    .pop()
                    .unwrap_or_else(|| "nothing is running yet".into()))
            }
        }
    }

    /// The answer to one request line.
    pub fn answer(&self, line: &str) -> Value {
        let words: Vec<&str> = line.split_whitespace().collect();
        let command = match Command::parse(&words) {
            Ok(c) => c,
            Err(e) => return json!({"ok": false, "message": e}),
        };
        if command == Command::Status {
            let (status, healthy) = self.status();
            let message = if healthy { "healthy" } else { "degraded" };
            return json!({"ok": true, "message": message, "healthy": healthy, "status": status});
        }
        match self.apply(&command) {
            Ok(message) => json!({"ok": true, "message": message}),
            Err(message) => json!({"ok": false, "message": message}),
        }
    }
}

/// The signal a control socket's `stop` is reported as.
pub const STOP_SIGNAL: i32 = signal_hook::consts::SIGINT;

/// A control socket being served; removed from the file system on drop.
pub struct Socket {
    path: PathBuf,
    /// The socket file's inode, to remove only our own.
    inode: u64,
    closed: Arc<AtomicBool>,
}

impl Socket {
    /// Binds `path` (mode 600) and serves `controls` on it from a thread
    /// of its own. A socket file left by a process that is gone is
    /// replaced; one that still answers is an error.
    pub fn serve(path: &Path, controls: Controls) -> io::Result<Socket> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let listener = bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let inode = std::fs::metadata(path)?.ino();
        let closed = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&closed);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept(&listener, &controls, &stop))?;
        Ok(Socket {
            path: path.to_path_buf(),
            inode,
            closed,
        })
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        self.closed.store(true, Ordering::Release);
        // Wakes the accepting thread, which sees it is closed.
        let _ = UnixStream::connect(&self.path);
        // Only our own socket: another could have replaced it since.
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            use std::os::unix::fs::FileTypeExt;
            let is_socket = std::fs::symlink_metadata(path)?.file_type().is_socket();
            if !is_socket {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is serving it",
                ));
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

fn accept(listener: &UnixListener, controls: &Controls, closed: &AtomicBool) {
    let busy = Arc::new(AtomicUsize::new(0));
    let me = rustix::process::getuid();
    for stream in listener.incoming() {
        if closed.load(Ordering::Acquire) {
            return;
        }
        let Ok(stream) = stream else {
            // Out of descriptors, say: let the run close some.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if !allowed(&stream, me) {
            log::info!("control: a client of another user was turned away");
            continue;
        }
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            busy.fetch_sub(1, Ordering::AcqRel);
            let _ = reply(
                &stream,
                &json!({"ok": false, "message": "busy: too many control clients at once"}),
            );
            continue;
        }
        // Given back however the client ends (a panic included), or if
        // its thread never starts.
        let place = Place(Arc::clone(&busy));
        let controls = controls.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                let _place = place;
                serve_client(&stream, &controls);
            });
        if spawned.is_err() {
            log::warn!("control: could not start a thread for a client");
        }
    }
}

/// A client's place among the [`MAX_CLIENTS`].
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether the client is this process's user, or root.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn allowed(stream: &UnixStream, me: rustix::process::Uid) -> bool {
    rustix::net::sockopt::socket_peercred(stream).is_ok_and(|c| c.uid == me || c.uid.is_root())
}

/// Elsewhere the socket's mode (600) is the only gate.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn allowed(_: &UnixStream, _: rustix::process::Uid) -> bool {
    true
}

fn serve_client(stream: &UnixStream, controls: &Controls) {
    let _ = stream.set_read_timeout(Some(CLIENT_DEADLINE));
    let _ = stream.set_write_timeout(Some(CLIENT_DEADLINE));
    let answer = match read_request(stream) {
        Ok(line) => {
            log::info!("control: {}", line.trim());
            controls.answer(&line)
        }
        Err(e) => json!({"ok": false, "message": format!("bad request: {e}")}),
    };
    let _ = reply(stream, &answer);
}

/// One line of at most [`MAX_REQUEST`] bytes of UTF-8, within the deadline.
fn read_request(stream: &UnixStream) -> io::Result<String> {
    let deadline = std::time::Instant::now() + CLIENT_DEADLINE;
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request in time",
            ));
        }
        let _ = reader.get_ref().get_ref().set_read_timeout(Some(left));
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request in time",
                ))
            }
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            break;
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                break;
            }
            None => {
                line.extend_from_slice(buf);
                let n = buf.len();
                reader.consume(n);
            }
        }
        if line.len() > MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("longer than {MAX_REQUEST} bytes"),
            ));
        }
    }
    if line.len() > MAX_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {MAX_REQUEST} bytes"),
        ));
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

fn reply(mut stream: &UnixStream, answer: &Value) -> io::Result<()> {
    let mut text = answer.to_string();
    text.push('\n');
    stream.write_all(text.as_bytes())
}

/// Sends one request to the control socket at `path` and returns its
/// answer (what `viamillipede ctl` does).
pub fn request(path: &Path, words: &[String], deadline: Duration) -> io::Result<Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(deadline))?;
    stream.set_write_timeout(Some(deadline))?;
    let mut line = words.join(" ");
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the answer is not the control socket's: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Command, String> {
        Command::parse(&line.split_whitespace().collect::<Vec<_>>())
    }

    #[test]
    fn commands_parse_and_bad_ones_name_what_is_wrong() {
        let d = |h: &str, p| Destination::new(h, p);
        assert_eq!(parse("status"), Ok(Command::Status));
        assert_eq!(parse("drain h 1"), Ok(Command::Drain(d("h", 1))));
        assert_eq!(
            parse("add h 2 threads 4 rank 1"),
            Ok(Command::Add {
                destination: d("h", 2),
                threads: Some(4),
                rank: Some(1)
            })
        );
        assert_eq!(
            parse("threads h 2 8"),
            Ok(Command::Threads {
                destination: d("h", 2),
                threads: 8
            })
        );
        assert_eq!(parse("rate 10M"), Ok(Command::Rate(Some(10 << 20))));
        assert_eq!(parse("rate none"), Ok(Command::Rate(None)));
        for (bad, says) in [
            ("", "no command"),
            ("frobnicate", "unknown command \"frobnicate\""),
            ("drain h", "HOST PORT"),
            ("drain h 0", "port"),
            ("drain h 99999", "port"),
            ("status now", "unexpected"),
            ("add h 1 threads 0", "out of range"),
            ("add h 1 rank 0", "rank"),
            ("add h 1 colour red", "unknown option"),
            ("add h 1 threads", "needs a value"),
            ("threads h 1 65", "out of range"),
            ("rate fast", "rate"),
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    struct Fake(Mutex<Vec<String>>);

    impl Running for Fake {
        fn report(&self) -> String {
            "fake report\n".into()
        }
        fn status(&self) -> Value {
            json!({"role": "tx", "problems": ["no connection to h:1"]})
        }
        fn stop(&self, why: &str, sig: i32) {
            self.0.lock().unwrap().push(format!("{why} {sig}"));
        }
    }

    #[test]
    fn a_stop_before_anything_runs_reaches_the_first_side_to_attach() {
        let controls = Controls::new();
        assert_eq!(controls.stop("early", 2), Stopped::Early);
        let fake = Arc::new(Fake(Mutex::new(Vec::new())));
        let attached = controls.attach(fake.clone());
        assert_eq!(*fake.0.lock().unwrap(), vec!["early 2".to_string()]);
        drop(attached);
        assert_eq!(controls.stop("late", 15), Stopped::Over);
    }

    #[test]
    fn status_gathers_the_sides_problems_and_other_commands_are_refused_by_a_side_without_them() {
        let controls = Controls::new();
        let fake = Arc::new(Fake(Mutex::new(Vec::new())));
        let _a = controls.attach(fake);
        let (doc, healthy) = controls.status();
        assert!(!healthy);
        assert_eq!(doc["problems"][0], "no connection to h:1");
        assert_eq!(doc["schema"], STATUS_SCHEMA);
        let answer = controls.answer("drain h 1");
        assert_eq!(answer["ok"], false);
        assert!(answer["message"]
            .as_str()
            .unwrap()
            .contains("only a sender"));
        assert_eq!(controls.answer("bogus")["ok"], false);
        assert_eq!(controls.report(), "fake report\n");
    }

    #[test]
    fn the_socket_answers_its_user_and_survives_silent_and_oversized_clients() {
        let dir = std::env::temp_dir().join(format!("vm-control-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let path = dir.join("ctl");
        let controls = Controls::new();
        let _a = controls.attach(Arc::new(Fake(Mutex::new(Vec::new()))));
        let socket = Socket::serve(&path, controls.clone()).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A second server on the same path is refused while this one runs.
        let e = Socket::serve(&path, controls.clone()).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        // Clients that say nothing, and one that sends too much, do not
        // keep the next from its answer.
        let silent: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let mut big = UnixStream::connect(&path).unwrap();
        let _ = big.write_all(&vec![b'x'; 4 * MAX_REQUEST]);
        let mut answer = String::new();
        let _ = big.read_to_string(&mut answer);
        assert!(answer.contains("longer than"), "{answer}");
        let status = request(&path, &["status".into()], Duration::from_secs(5)).unwrap();
        assert_eq!(status["ok"], true);
        assert_eq!(status["healthy"], false);
        drop(silent);
        drop(socket);
        assert!(!path.exists(), "the socket file is removed at the end");
        let _ = std::fs::remove_dir(&dir);
    }
}
