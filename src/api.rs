//! The library's entry points: a [`Sender`] that other programs write a
//! stream into, and a [`Receiver`] whose [`Flow`] they read it back from,
//! byte-exact and in order, over as many TCP connections (or `--udp`
//! datagrams) as the sender is built with. The command line's `tx` and `rx`
//! are built on [`SenderBuilder::send_from`], [`ReceiverBuilder::receive_into`]
//! and [`ReceiverBuilder::serve_commands`], with stdin and stdout.
//!
//! Nothing here is process-wide: no signal handlers, no exit, no logger
//! (log records go to whatever `log` backend the program installed).

use crate::config::{Config, Destination, Mode, SocketOptions};
use crate::crypto::Key;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::rx::hub::{FlowInfo, Flows, Hub, Many, Opened, Output};
use crate::Summary;
use crossbeam_channel::{Receiver as Chan, Sender as ChanTx};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes a [`Sender`] gathers before handing them to the engine.
const CHUNK: usize = 256 << 10;
/// Chunks on their way between the caller and the engine, each way.
const CHUNKS: usize = 16;

/// How the caller's side of a [`Sender`] ended, as the engine sees it
/// once the pipe is empty.
#[derive(Debug)]
enum End {
    /// Still writing, or dropped unfinished.
    Open,
    /// `finish`: the end of the stream.
    Finished,
    /// `abort`, with the reason.
    Aborted(String),
}

/// The reason a [`Sender`] was aborted, as the engine's input error.
#[derive(Debug)]
pub(crate) struct Aborted(pub String);

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Aborted {}

/// Copies what `buf` takes of `chunk` from `at` on, and moves `at` past it.
fn copy_out(chunk: &[u8], at: &mut usize, buf: &mut [u8]) -> usize {
    let n = buf.len().min(chunk.len() - *at);
    buf[..n].copy_from_slice(&chunk[*at..*at + n]);
    *at += n;
    n
}

/// The engine's end of a [`Sender`]: chunks in, bytes out.
struct Inlet {
    chunks: Chan<Vec<u8>>,
    end: Arc<Mutex<End>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for Inlet {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            match self.chunks.recv() {
                Ok(d) => {
                    self.current = d;
                    self.at = 0;
                }
                // The writer is gone: only `finish` makes that the end of
                // the stream; anything else fails it.
                Err(_) => {
                    return match &*self.end.lock().unwrap_or_else(|p| p.into_inner()) {
                        End::Finished => Ok(0),
                        End::Aborted(why) => Err(io::Error::other(Aborted(why.clone()))),
                        End::Open => Err(io::Error::other(Aborted(
                            "the sender was dropped unfinished".into(),
                        ))),
                    };
                }
            }
        }
        Ok(copy_out(&self.current, &mut self.at, buf))
    }
}

/// The engine's end of a [`Flow`]: what the stream writes, as chunks.
struct Outlet(ChanTx<Vec<u8>>);

impl Output for Outlet {
    fn what(&self) -> String {
        "the flow".into()
    }
}

impl Write for Outlet {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf.to_vec()).map_err(|_| {
            io::Error::new(io::ErrorKind::BrokenPipe, "the flow's reader went away")
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A run of the engine on a thread of its own, and the error it ended
/// with, readable as soon as it is known.
struct Engine {
    thread: Option<JoinHandle<Result<Summary>>>,
    failure: Arc<Mutex<Option<String>>>,
    /// Disconnected once the run has returned (its helper threads may
    /// still hold the pipe's other end for a moment).
    done: Chan<()>,
}

impl Engine {
    fn spawn(name: &str, run: impl FnOnce() -> Result<Summary> + Send + 'static) -> Result<Engine> {
        let failure = Arc::new(Mutex::new(None));
        let told = Arc::clone(&failure);
        let (finished, done) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _finished = finished;
                let r = run();
                if let Err(e) = &r {
                    *told.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                }
                r
            })
            .map_err(|e| Error::io("start the transfer's thread", e))?;
        Ok(Engine {
            thread: Some(thread),
            failure,
            done,
        })
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn join(&mut self) -> Result<Summary> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Internal("the transfer's thread panicked".into())),
            None => Err(Error::Internal("the transfer was already joined".into())),
        }
    }
}

/// The options both ends share.
fn base(mode: Mode) -> Config {
    // The caller's process, not ours: no controls unless it sets some.
    Config::new(mode)
}

/// Builds a [`Sender`]: where to send, and how. Every option has the
/// command line's default.
#[derive(Clone, Debug)]
pub struct SenderBuilder {
    config: Config,
    destinations: Vec<Destination>,
}

impl SenderBuilder {
    /// Adds a destination, ranked after the ones already added: the first
    /// is filled, the next used only while the ones before it are
    /// saturated (`tx HOST PORT` on the command line).
    pub fn destination(mut self, host: impl Into<String>, port: u16) -> SenderBuilder {
        self.destinations.push(Destination::new(host, port));
        self
    }

    /// Connections per destination, 1 to 64 (default 16).
    pub fn threads(mut self, n: u16) -> SenderBuilder {
        self.config.threads = n;
        self.config.auto_threads = false;
        self
    }

    /// Finds the connections per destination while sending (`threads
    /// auto`): start with a few, double while the delivery rate grows.
    pub fn auto_threads(mut self) -> SenderBuilder {
        self.config.threads = crate::config::AUTO_MAX_THREADS;
        self.config.auto_threads = true;
        self
    }

    /// Largest foot in bytes, 1 KiB to 64 MiB (default 2 MiB).
    pub fn foot_size(mut self, bytes: u32) -> SenderBuilder {
        self.config.foot_size = bytes;
        self
    }

    /// Feet that may be sent ahead of what the receiver wrote (default 64).
    pub fn window(mut self, feet: u32) -> SenderBuilder {
        self.config.window = feet;
        self
    }

    /// The pre-shared key the receiver must also hold.
    pub fn key(mut self, key: Key) -> SenderBuilder {
        self.config.key = Some(key);
        self
    }

    /// Encrypts the stream (needs a key).
    pub fn encrypt(mut self, on: bool) -> SenderBuilder {
        self.config.encrypt = on;
        self
    }

    /// Compresses feet with zstd at this level (-7, fastest, to 19).
    pub fn compress(mut self, level: i32) -> SenderBuilder {
        self.config.compress = Some(level);
        self
    }

    /// Sends at most this many bytes per second.
    pub fn rate(mut self, bytes_per_second: u64) -> SenderBuilder {
        self.config.pacing.rate = Some(bytes_per_second);
        self
    }

    /// Per-foot checksums and a digest of the whole stream.
    pub fn checksums(mut self, on: bool) -> SenderBuilder {
        self.config.checksums = on;
        self
    }

    /// Carries the feet's bytes as paced UDP datagrams (`--udp`).
    pub fn udp(mut self, on: bool) -> SenderBuilder {
        self.config.udp = on;
        self
    }

    /// The stream's name, told to the receiver ([`Flow::name`], and
    /// `$VIAMILLIPEDE_NAME` for an `rx --exec` command): 1 to 128 letters,
    /// digits and `. _ - + : @ /`, not starting with `-`, `.` or `/`.
    pub fn name(mut self, name: impl Into<String>) -> SenderBuilder {
        self.config.name = Some(name.into());
        self
    }

    /// Options for every data socket.
    pub fn socket(mut self, options: SocketOptions) -> SenderBuilder {
        self.config.socket = options;
        self
    }

    /// A builder holding every option of `config` (the command line's
    /// whole set, as [`crate::cli`] parses it), its destinations those of
    /// a [`Mode::Tx`]. The run is reached by signals and a control socket
    /// only through `config.controls`, and shows progress only if
    /// `config.display` asks: the binary sets both, a library caller need not.
    pub fn from_config(config: Config) -> SenderBuilder {
        let destinations = match &config.mode {
            Mode::Tx { destinations } => destinations.clone(),
            _ => Vec::new(),
        };
        SenderBuilder {
            config,
            destinations,
        }
    }

    /// The options checked and set for a run.
    fn checked(self) -> Result<(Config, Vec<Destination>)> {
        let SenderBuilder {
            mut config,
            destinations,
        } = self;
        if destinations.is_empty() {
            return Err(Error::Usage("a sender needs a destination".into()));
        }
        if let Some(name) = &config.name {
            crate::protocol::check_name(name).map_err(|e| Error::Usage(format!("name: {e}")))?;
        }
        config.validate()?;
        config.mode = Mode::Tx {
            destinations: destinations.clone(),
        };
        Ok((config, destinations))
    }

    /// Sends everything `input` holds, on the calling thread (what `tx`
    /// does with stdin), and returns once the receiver has written every
    /// byte; an error says why not. Reads `input` straight into feet: no
    /// pipe between.
    pub fn send_from(self, input: impl Read + Send + 'static) -> Result<Summary> {
        let (config, destinations) = self.checked()?;
        crate::tx::send(&config, crate::tx::Connections::Dial(&destinations), input)
    }

    /// Starts sending: the connections are made in the background, and
    /// what is written to the [`Sender`] goes out as it fills feet. Fails
    /// at once on options that cannot work (no destination, a count out of
    /// range, encryption without a key).
    pub fn connect(self) -> Result<Sender> {
        let (mut config, destinations) = self.checked()?;
        let (sink, events) = crate::events::Sink::new();
        config.events = Some(sink);
        let (chunks, inlet) = crossbeam_channel::bounded(CHUNKS);
        let end = Arc::new(Mutex::new(End::Open));
        let input = Inlet {
            chunks: inlet,
            end: Arc::clone(&end),
            current: Vec::new(),
            at: 0,
        };
        let engine = Engine::spawn("sender", move || {
            crate::tx::send(&config, crate::tx::Connections::Dial(&destinations), input)
        })?;
        Ok(Sender {
            chunks: Some(chunks),
            events,
            end,
            buffer: Vec::with_capacity(CHUNK),
            engine,
        })
    }
}

/// A stream on its way to a receiver: write to it, then [`Sender::finish`].
///
/// Dropped without `finish`, it aborts the stream.
///
/// ```
/// use std::io::{Read, Write};
/// use viamillipede::{Receiver, Sender};
///
/// let mut receiver = Receiver::builder().address("127.0.0.1").bind()?;
/// let port = receiver.local_addr().port();
/// let reader = std::thread::spawn(move || {
///     let mut flow = receiver.accept().expect("a flow");
///     let mut got = Vec::new();
///     flow.read_to_end(&mut got).map(|_| got)
/// });
///
/// let mut sender = Sender::builder()
///     .destination("127.0.0.1", port)
///     .threads(4)
///     .connect()?;
/// sender.write_all(b"hello, many connections")?;
/// let summary = sender.finish()?;
/// assert_eq!(summary.bytes, 23);
/// assert_eq!(reader.join().unwrap()?, b"hello, many connections");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Sender {
    chunks: Option<ChanTx<Vec<u8>>>,
    events: Chan<Event>,
    end: Arc<Mutex<End>>,
    buffer: Vec<u8>,
    engine: Engine,
}

impl Sender {
    /// Options for a sender; add at least one destination.
    pub fn builder() -> SenderBuilder {
        SenderBuilder {
            config: base(Mode::Tx {
                destinations: Vec::new(),
            }),
            destinations: Vec::new(),
        }
    }

    fn push(&mut self, chunk: Vec<u8>) -> io::Result<()> {
        let sent = match &self.chunks {
            // Not a plain send: the engine may have ended while its reader
            // still holds the pipe.
            Some(c) => crossbeam_channel::select! {
                send(c, chunk) -> r => r.is_ok(),
                recv(self.engine.done) -> _ => false,
            },
            None => false,
        };
        if sent {
            return Ok(());
        }
        let why = self
            .engine
            .failure()
            .unwrap_or_else(|| "the transfer has ended".into());
        Err(io::Error::new(io::ErrorKind::BrokenPipe, why))
    }

    /// What happens as the stream goes (connections up and down, bytes
    /// the receiver wrote, feet sent again), to read whenever the program
    /// likes: the engine never waits for it, and drops events while the
    /// channel is full.
    pub fn events(&self) -> Chan<Event> {
        self.events.clone()
    }

    /// Says how the stream ends, then closes the pipe: the engine reads
    /// what is still in it, then the end.
    fn close(&mut self, end: End) {
        *self.end.lock().unwrap_or_else(|p| p.into_inner()) = end;
        self.chunks = None;
    }

    /// Ends the stream and waits until the receiver has written every byte
    /// of it; the summary says how many. An error says why not.
    pub fn finish(mut self) -> Result<Summary> {
        if !self.buffer.is_empty() {
            let data = std::mem::take(&mut self.buffer);
            // A failed push means the engine has ended: join tells why.
            let _ = self.push(data);
        }
        self.close(End::Finished);
        self.engine.join()
    }

    /// Ends the stream unfinished: the receiver is told `reason`, and
    /// neither side reports success. A receiver no connection has reached
    /// yet is not told: it goes on waiting for a sender.
    pub fn abort(mut self, reason: &str) -> Error {
        self.buffer.clear();
        self.close(End::Aborted(reason.into()));
        match self.engine.join() {
            Err(e) => e,
            Ok(_) => Error::Aborted(reason.into()),
        }
    }
}

impl Write for Sender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.chunks.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the sender has finished",
            ));
        }
        let n = buf.len().min(CHUNK - self.buffer.len());
        self.buffer.extend_from_slice(&buf[..n]);
        if self.buffer.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    /// Hands what was written to the engine (it still waits for a full
    /// foot before sending, unless the stream ends).
    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
        self.push(data)
    }
}

impl Drop for Sender {
    /// Unfinished, the stream fails: the engine reads `End::Open` once
    /// the pipe is empty.
    fn drop(&mut self) {
        self.chunks = None;
    }
}

/// Builds a [`Receiver`].
#[derive(Clone, Debug)]
pub struct ReceiverBuilder {
    config: Config,
    addr: Option<String>,
    port: u16,
}

impl ReceiverBuilder {
    /// The port to listen on; 0 (the default) picks a free one, which
    /// [`Receiver::local_addr`] tells.
    pub fn port(mut self, port: u16) -> ReceiverBuilder {
        self.port = port;
        self
    }

    /// The address to listen on (default: every address, IPv6 and IPv4).
    pub fn address(mut self, addr: impl Into<String>) -> ReceiverBuilder {
        self.addr = Some(addr.into());
        self
    }

    /// The pre-shared key senders must prove.
    pub fn key(mut self, key: Key) -> ReceiverBuilder {
        self.config.key = Some(key);
        self
    }

    /// Asks every sender to encrypt (needs a key).
    pub fn encrypt(mut self, on: bool) -> ReceiverBuilder {
        self.config.encrypt = on;
        self
    }

    /// Checks per-foot checksums when the sender sends them, and asks for
    /// them.
    pub fn checksums(mut self, on: bool) -> ReceiverBuilder {
        self.config.checksums = on;
        self
    }

    /// Options for every data socket.
    pub fn socket(mut self, options: SocketOptions) -> ReceiverBuilder {
        self.config.socket = options;
        self
    }

    /// Flows served at once, accepted or waiting to be (default 8); a
    /// sender beyond them is refused as busy.
    pub fn max_flows(mut self, n: usize) -> ReceiverBuilder {
        self.config.max_flows = n;
        self
    }

    /// What the flows served at once may hold in memory together, counted
    /// as each flow's window and two feet more (default 2 GiB); a new flow
    /// that does not fit is refused as busy.
    pub fn max_memory(mut self, bytes: u64) -> ReceiverBuilder {
        self.config.max_memory = bytes;
        self
    }

    /// Seconds to wait for a sender whose connections are all gone before
    /// its flow fails (default 300).
    pub fn reconnect_timeout(mut self, timeout: std::time::Duration) -> ReceiverBuilder {
        self.config.reconnect_timeout = timeout;
        self
    }

    /// A builder holding every option of `config` (the command line's
    /// whole set), listening where its [`Mode::Rx`] says. As with
    /// [`SenderBuilder::from_config`], signal handlers and the progress
    /// display come only if `config` asks.
    pub fn from_config(config: Config) -> ReceiverBuilder {
        let (addr, port) = match &config.mode {
            Mode::Rx { addr, port } => (addr.clone(), *port),
            _ => (None, 0),
        };
        ReceiverBuilder { config, addr, port }
    }

    /// The options checked, and the socket bound.
    fn listen(self) -> Result<(Config, TcpListener, SocketAddr)> {
        let ReceiverBuilder {
            mut config,
            addr,
            port,
        } = self;
        config.validate()?;
        if config.max_flows == 0 {
            return Err(Error::Usage("max flows: give 1 or more".into()));
        }
        config.mode = Mode::Rx {
            addr: addr.clone(),
            port,
        };
        let listener = crate::rx::listen(&config, addr.as_deref(), port)?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("read the listening address", e))?;
        Ok((config, listener, local))
    }

    /// Serves one sender's stream into `out`, on the calling thread (what
    /// `rx` does with stdout), refusing other senders as busy, and returns
    /// once the stream has ended: Ok only if every byte was written.
    /// `on_ready` hears the address once senders can connect.
    pub fn receive_into(
        self,
        out: impl Write + Send + 'static,
        on_ready: impl FnOnce(SocketAddr),
    ) -> Result<Summary> {
        let (config, listener, _) = self.listen()?;
        crate::rx::receive(&config, listener, crate::rx::hub::Plain(out), on_ready)
    }

    /// Serves every sender's stream, each into its own run of the shell
    /// command `command` (`rx --exec`: the stream on its stdin, the
    /// sender's name in `$VIAMILLIPEDE_NAME`), until stopped through the
    /// configuration's [`crate::control::Controls`] (the command line's
    /// SIGINT, SIGTERM or `ctl stop`), which it needs. `on_ready` hears the
    /// address.
    pub fn serve_commands(
        self,
        command: &str,
        on_ready: impl FnOnce(SocketAddr),
    ) -> Result<Summary> {
        if self.config.controls.is_none() {
            return Err(Error::Usage(
                "serving commands runs until it is stopped: it needs controls (Config::controls) to stop it".into(),
            ));
        }
        let (config, listener, _) = self.listen()?;
        crate::rx::serve_commands(&config, listener, command, on_ready)
    }

    /// Binds the listening socket and starts taking senders: each new
    /// sender's stream waits for [`Receiver::accept`].
    pub fn bind(self) -> Result<Receiver> {
        let (mut config, listener, local) = self.listen()?;
        // Room for every flow the hub admits: it never waits on the queue.
        let (queue, accepted) = crossbeam_channel::bounded(config.max_flows);
        let open = move |info: &FlowInfo| -> io::Result<Opened> {
            let (out, chunks) = crossbeam_channel::bounded(CHUNKS);
            let (result_tx, result) = crossbeam_channel::bounded(1);
            let (sink, events) = crate::events::Sink::new();
            let flow = Flow {
                chunks,
                events,
                current: Vec::new(),
                at: 0,
                result,
                summary: None,
                failure: None,
                name: info.name.clone(),
                peer: info.peer,
            };
            queue
                .try_send(flow)
                .map_err(|_| io::Error::other("the receiver is not taking flows"))?;
            Ok(Opened {
                output: Box::new(Outlet(out)),
                on_end: Box::new(move |r: &Result<Summary>| {
                    let _ = result_tx.send(match r {
                        Ok(s) => Ok(s.clone()),
                        Err(e) => Err(e.to_string()),
                    });
                }),
                events: Some(sink),
            })
        };
        let (sink, events) = crate::events::Sink::new();
        config.events = Some(sink);
        let hub = Hub::new(config, Flows::Many(Many::new(Box::new(open))));
        hub.listen(listener)?;
        Ok(Receiver {
            hub,
            accepted,
            events,
            local,
        })
    }
}

/// A listening socket that senders connect to; each sender's stream is a
/// [`Flow`] of its own, served at once beside the others.
///
/// ```
/// use std::io::Write;
/// use viamillipede::{Receiver, Sender};
///
/// let mut receiver = Receiver::builder().address("127.0.0.1").bind()?;
/// let port = receiver.local_addr().port();
///
/// type Failure = Box<dyn std::error::Error + Send + Sync>;
/// let sending = std::thread::spawn(move || -> Result<_, Failure> {
///     let mut sender = Sender::builder()
///         .destination("127.0.0.1", port)
///         .name("nightly")
///         .connect()?;
///     sender.write_all(&[7u8; 100_000])?;
///     // Returns once the receiver wrote it all.
///     Ok(sender.finish()?)
/// });
/// let flow = receiver.accept()?;
/// assert_eq!(flow.name(), Some("nightly"));
/// let summary = flow.finish()?;
/// assert_eq!(summary.bytes, 100_000);
/// assert_eq!(sending.join().unwrap().unwrap().bytes, 100_000);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Receiver {
    hub: Arc<Hub>,
    accepted: Chan<Flow>,
    events: Chan<Event>,
    local: SocketAddr,
}

impl Receiver {
    /// Options for a receiver.
    pub fn builder() -> ReceiverBuilder {
        ReceiverBuilder {
            config: base(Mode::Rx {
                addr: None,
                port: 0,
            }),
            addr: None,
            port: 0,
        }
    }

    /// The address the receiver listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Flows opened and closed ([`Event::FlowOpened`],
    /// [`Event::FlowClosed`]), to read whenever the program likes; each
    /// flow's own events come from [`Flow::events`].
    pub fn events(&self) -> Chan<Event> {
        self.events.clone()
    }

    /// The next sender's stream: waits until a sender whose stream this
    /// receiver has not seen completes its handshake. Its bytes arrive
    /// meanwhile (up to a bounded pipe); read them from the flow.
    pub fn accept(&mut self) -> Result<Flow> {
        self.accepted
            .recv()
            .map_err(|_| Error::Internal("the receiver stopped taking flows".into()))
    }

    /// As [`Receiver::accept`], but gives up after `timeout` (`Ok(None)`).
    pub fn accept_timeout(&mut self, timeout: std::time::Duration) -> Result<Option<Flow>> {
        match self.accepted.recv_timeout(timeout) {
            Ok(flow) => Ok(Some(flow)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
            Err(_) => Err(Error::Internal("the receiver stopped taking flows".into())),
        }
    }
}

impl Drop for Receiver {
    /// Takes no new senders; flows already accepted go on (their senders
    /// may still reconnect), and the socket closes once they have ended.
    /// Flows not yet accepted fail.
    fn drop(&mut self) {
        // Closed first: no flow is queued after the queue is emptied.
        self.hub.close();
        for waiting in self.accepted.try_iter() {
            // Its reader gone, the flow fails and its sender hears why.
            drop(waiting);
        }
    }
}

/// One sender's stream, read in order: [`Read`] ends (`Ok(0)`) only once
/// every byte arrived and the stream ended cleanly, and fails if the
/// stream failed (the sender aborted, the connections were lost for good).
///
/// Dropped before its end, it fails the stream: the sender's `finish`
/// reports an error.
///
/// ```
/// use std::io::{Read, Write};
/// use viamillipede::{Receiver, Sender};
///
/// let mut receiver = Receiver::builder().address("127.0.0.1").bind()?;
/// let mut sender = Sender::builder()
///     .destination("127.0.0.1", receiver.local_addr().port())
///     .foot_size(64 << 10) // feet go out as they fill
///     .connect()?;
/// let events = sender.events();
/// sender.write_all(&[1u8; 1 << 20])?;
/// sender.flush()?;
/// let mut flow = receiver.accept()?;
/// // Once the receiver has written something, it is sure to hear the abort.
/// let mut buf = [0u8; 4096];
/// flow.read_exact(&mut buf)?;
/// while !matches!(events.recv()?, viamillipede::Event::Progress { .. }) {}
/// let error = sender.abort("the source went away");
/// assert!(error.to_string().contains("the source went away"));
/// // The flow fails with the sender's reason; it never just ends.
/// let read = flow.read_to_end(&mut Vec::new());
/// assert!(read.unwrap_err().to_string().contains("the source went away"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Flow {
    chunks: Chan<Vec<u8>>,
    events: Chan<Event>,
    current: Vec<u8>,
    at: usize,
    result: Chan<std::result::Result<Summary, String>>,
    summary: Option<Summary>,
    failure: Option<String>,
    name: Option<String>,
    peer: SocketAddr,
}

impl Flow {
    /// What happens as the stream arrives (connections up and down, bytes
    /// written to the flow); see [`Sender::events`].
    pub fn events(&self) -> Chan<Event> {
        self.events.clone()
    }

    /// The name the sender gave its stream ([`SenderBuilder::name`]).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Where the sender's first connection came from.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Reads the rest of the stream into nothing and returns its summary
    /// (or the error it ended with).
    pub fn finish(mut self) -> Result<Summary> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| Error::io("read the flow", e))?;
        self.summary
            .take()
            .ok_or_else(|| Error::Internal("the flow ended without a summary".into()))
    }

    fn take(&mut self, r: std::result::Result<Summary, String>) {
        match r {
            Ok(s) => self.summary = Some(s),
            Err(e) => self.failure = Some(e),
        }
    }

    /// The stream's end: its summary, or the error it ended with (every
    /// time it is asked).
    fn end(&mut self) -> io::Result<usize> {
        if self.summary.is_none() && self.failure.is_none() {
            match self.result.recv() {
                Ok(r) => self.take(r),
                Err(_) => self.failure = Some("the receiver went away".into()),
            }
        }
        match &self.failure {
            Some(why) => Err(io::Error::other(why.clone())),
            None => Ok(0),
        }
    }
}

impl Read for Flow {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use crossbeam_channel::TryRecvError;
        while self.at == self.current.len() {
            match self.chunks.try_recv() {
                Ok(d) => {
                    self.current = d;
                    self.at = 0;
                    continue;
                }
                Err(TryRecvError::Disconnected) => return self.end(),
                Err(TryRecvError::Empty) => {}
            }
            // Everything the stream wrote is in the pipe before its outcome
            // is told: once it is, an empty pipe is the end.
            if self.summary.is_some() || self.failure.is_some() {
                return self.end();
            }
            crossbeam_channel::select! {
                recv(self.chunks) -> d => match d {
                    Ok(d) => {
                        self.current = d;
                        self.at = 0;
                    }
                    Err(_) => return self.end(),
                },
                recv(self.result) -> r => match r {
                    Ok(r) => self.take(r),
                    Err(_) => return self.end(),
                },
            }
        }
        Ok(copy_out(&self.current, &mut self.at, buf))
    }
}
