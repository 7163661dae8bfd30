//! The receiving wing: sockets -> connections -> sequencer -> stdout.
//!
//! An acceptor thread takes connections and gives each a thread of its own
//! for the handshake and its feet; one sequencer thread writes stdout in
//! order. The main thread waits for the end of the stream, or for the
//! reconnect timeout once every connection of a started stream is gone.

mod conn;
mod outbox;
mod sequencer;
mod state;
mod udp;

use crate::config::{Config, Destination};
use crate::error::{Error, Result};
use crate::monitor::Monitor;
use crate::protocol::handshake::Dial;
use crate::signals::Reporter;
use crate::stats::{human_bytes, LinkState};
use crate::{net, report, Summary};
use crossbeam_channel::{RecvTimeoutError, Sender};
pub use state::random_id;
use state::{Progress, State};
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long to wait, after the stream ended, for senders to close.
const LINGER: Duration = Duration::from_secs(5);
/// How often a wait for the sender is told again.
const TELL_EVERY: Duration = Duration::from_secs(30);
/// How long a complete stream waits for the sender to show that it knows
/// (its last frames may have been lost with a connection): a sender that
/// reconnects meanwhile is told the stream is complete.
const UNCONFIRMED_LINGER: Duration = Duration::from_secs(30);

/// A foot read from a connection, on its way to the sequencer.
#[derive(Debug)]
pub struct Arrived {
    /// Its id.
    pub id: u64,
    /// Its payload.
    pub data: crate::pool::Buffer,
    /// Whether it ends the stream.
    pub end: bool,
    /// The connection it came on (which the window is told on first).
    pub by: Arc<state::Conn>,
}

/// What the main thread hears about.
#[derive(Debug)]
pub enum Event {
    /// A session connection was accepted.
    Opened,
    /// A session connection closed; this many remain.
    Closed(usize),
    /// The stream ended.
    Finished(Result<u64>),
    /// The sender was told, as it reconnected, that the stream is complete.
    Confirmed,
}

/// Listens as `config` says and writes the stream to stdout.
pub fn run(config: &Config, addr: Option<&str>, port: u16) -> Result<Summary> {
    run_into(config, addr, port, Stdout::open()?)
}

/// The process's stdout as the stream's output. Once the output is done
/// with (the sequencer drops it at the end of the stream), fd 1 itself is
/// pointed at /dev/null, so the program reading the stream sees its end at
/// once, even while rx lingers for the sender.
struct Stdout(Option<File>);

impl Stdout {
    fn open() -> Result<Stdout> {
        let fd = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("open stdout", e))?;
        Ok(Stdout(Some(File::from(fd))))
    }

    fn file(&mut self) -> std::io::Result<&mut File> {
        self.0
            .as_mut()
            .ok_or_else(|| std::io::Error::other("stdout is closed"))
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file()?.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file()?.flush()
    }
}

impl Drop for Stdout {
    fn drop(&mut self) {
        drop(self.0.take());
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = rustix::stdio::dup2_stdout(&null);
        }
    }
}

/// Listens as `config` says and writes the stream to `out`.
pub fn run_into(
    config: &Config,
    addr: Option<&str>,
    port: u16,
    out: impl Write + Send + 'static,
) -> Result<Summary> {
    let listener = net::listen(addr, port, &config.socket).map_err(|e| {
        let shown = match addr {
            Some(a) if a.contains(':') => format!("[{a}]:{port}"),
            Some(a) => format!("{a}:{port}"),
            None => format!("port {port}"),
        };
        Error::io(format!("listen on {shown}"), e)
    })?;
    receive(config, listener, out, |addr| {
        let _ = writeln!(std::io::stderr(), "viamillipede: listening on {addr}");
    })
}

/// Serves `listener`, writing the stream to `out`; `on_ready` is told the
/// bound address once connections are being accepted.
pub fn receive(
    config: &Config,
    listener: TcpListener,
    out: impl Write + Send + 'static,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> Result<Summary> {
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("read the listening address", e))?;
    receive_from(config, Incoming::Listen(listener), out, || on_ready(local))
}

/// Receives over connections made to a listening sender (reverse mode,
/// `--connect`), writing the stream to stdout.
pub fn run_connecting(config: &Config, destinations: &[Destination]) -> Result<Summary> {
    receive_from(
        config,
        Incoming::Dial(destinations.to_vec()),
        Stdout::open()?,
        || {},
    )
}

/// Serves `listener`, writing the stream to stdout.
pub fn run_on(config: &Config, listener: TcpListener) -> Result<Summary> {
    receive(config, listener, Stdout::open()?, |_| {})
}

/// Receives over connections made to listening senders (reverse mode),
/// writing the stream to `out`.
pub fn receive_dialing(
    config: &Config,
    destinations: &[Destination],
    out: impl Write + Send + 'static,
) -> Result<Summary> {
    receive_from(config, Incoming::Dial(destinations.to_vec()), out, || {})
}

/// Where rx's connections come from.
enum Incoming {
    /// Accept them on this listener.
    Listen(TcpListener),
    /// Dial these senders, most preferred first, `threads` each.
    Dial(Vec<Destination>),
}

fn receive_from(
    config: &Config,
    incoming: Incoming,
    out: impl Write + Send + 'static,
    on_ready: impl FnOnce(),
) -> Result<Summary> {
    let state = Arc::new(State::new(config.clone()));
    let (feet_tx, feet_rx) = crossbeam_channel::unbounded();
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let _reporter = {
        let (state, stopped) = (Arc::clone(&state), Arc::clone(&state));
        let events = events_tx.clone();
        let stop = move |sig| {
            let why = format!("stopped by {}", crate::error::signal_name(sig));
            stopped.end(Progress::Failed(why));
            let _ = events.send(Event::Finished(Err(Error::Interrupted(sig))));
        };
        match config.signals {
            true => Some(
                Reporter::spawn(move || report(&state), stop)
                    .map_err(|e| Error::io("install signal handlers", e))?,
            ),
            false => None,
        }
    };
    {
        let (state, events) = (Arc::clone(&state), events_tx.clone());
        spawn("rx-sequencer", move || {
            sequencer::run(&state, out, feet_rx, events)
        })?;
    }
    // A receiver that dials is the active party: it gives up after the
    // reconnect timeout from the start, as tx does.
    let dialing = matches!(incoming, Incoming::Dial(_));
    match incoming {
        Incoming::Listen(listener) => {
            let state = Arc::clone(&state);
            spawn("rx-acceptor", move || {
                accept(&state, &listener, &feet_tx, &events_tx)
            })?;
        }
        Incoming::Dial(destinations) => {
            for (rank, dest) in destinations.into_iter().enumerate() {
                for index in 0..config.threads {
                    let (state, feet, events) =
                        (Arc::clone(&state), feet_tx.clone(), events_tx.clone());
                    let dest = dest.clone();
                    spawn(&format!("rx-dialer-{rank}-{index}"), move || {
                        dial(&state, &dest, rank as u16, index, &feet, &events)
                    })?;
                }
            }
        }
    }
    on_ready();
    // The clock and the monitor start with the first connection, not
    // while rx waits for a sender.
    let mut monitor: Option<Monitor> = None;
    let start_monitor = || {
        state.clock.restart();
        let state = Arc::clone(&state);
        Monitor::start(
            move || (state.written.load(Ordering::Relaxed), 0),
            config.display,
            config.stats_json.is_some(),
            "written",
        )
    };

    let timeout = config.reconnect_timeout;
    let mut lost_since: Option<Instant> = dialing.then(Instant::now);
    // When the user was last told that rx is waiting for the sender.
    let mut told: Option<Instant> = None;
    let outcome = loop {
        let event = match (lost_since, told) {
            (None, _) => events_rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            (Some(t), Some(n)) => events_rx.recv_deadline((t + timeout).min(n + TELL_EVERY)),
            (Some(t), None) => events_rx.recv_deadline(t + timeout),
        };
        match event {
            Ok(Event::Opened) => {
                if monitor.is_none() {
                    monitor = Some(start_monitor());
                }
                if let (Some(since), Some(_)) = (lost_since, told.take()) {
                    log::warn!(
                        "the sender is back after {:.1} s",
                        since.elapsed().as_secs_f64()
                    );
                }
                lost_since = None;
            }
            Ok(Event::Closed(_)) => {
                if state.connections().is_empty() && state.progress() == Progress::Running {
                    if lost_since.is_none() {
                        log::warn!(
                            "every connection from the sender is gone; waiting up to {} for it to come back",
                            crate::stats::human_duration(timeout)
                        );
                        told = Some(Instant::now());
                    }
                    lost_since.get_or_insert_with(Instant::now);
                }
            }
            Err(RecvTimeoutError::Timeout)
                if told.is_some_and(|n| n.elapsed() >= TELL_EVERY)
                    && lost_since.is_some_and(|t| t.elapsed() < timeout) =>
            {
                let gone = lost_since.map_or(Duration::ZERO, |t| t.elapsed());
                log::warn!(
                    "still no connection from the sender after {}; giving up in {}",
                    crate::stats::human_duration(gone),
                    crate::stats::human_duration(timeout.saturating_sub(gone))
                );
                told = Some(Instant::now());
            }
            Ok(Event::Finished(result)) => break result,
            Ok(Event::Confirmed) => {}
            Err(RecvTimeoutError::Timeout) => {
                if !state.connections().is_empty() {
                    lost_since = None;
                    continue;
                }
                let msg = format!(
                    "no connection from the sender for {} s, giving up",
                    timeout.as_secs()
                );
                state.end(Progress::Failed(msg.clone()));
                break Err(Error::GaveUp(msg));
            }
            Err(RecvTimeoutError::Disconnected) => {
                break Err(Error::Internal(
                    "receiver threads ended unexpectedly".into(),
                ));
            }
        }
    };

    // Let the senders hear the outcome and close first, so their last
    // frames are not cut off by a reset; a complete stream waits for the
    // sender to show it knows, answering its reconnects meanwhile.
    let ended = Instant::now();
    loop {
        let open = !state.connections().is_empty();
        let complete = matches!(state.progress(), Progress::Complete(_));
        let deadline = match (complete, state.confirmed(), open) {
            (true, Some(at), true) => at + LINGER,
            // An open connection carries the end to the sender.
            (true, None, true) | (false, _, true) => ended + LINGER,
            // Every connection failed before the sender was seen to know.
            (true, None, false) => ended + UNCONFIRMED_LINGER,
            _ => break,
        };
        if events_rx.recv_deadline(deadline).is_err() {
            break;
        }
    }
    // Waits for a foot being written, so the output ends on a foot's end.
    state.close_output();
    let throughput = monitor.map(Monitor::finish).unwrap_or_default();
    // Kept for the stats document only: a library's receivers leave none.
    if config.stats_json.is_some() {
        record_side(&state, throughput);
    }
    if config.verbose >= 2 {
        log::debug!("{}", report(&state).trim_end());
    }
    let bytes = outcome?;
    let detail = format!(
        "{} duplicate feet, {} connections refused",
        state.duplicates.load(Ordering::Relaxed),
        state.refused.load(Ordering::Relaxed)
    );
    Ok(Summary {
        bytes,
        elapsed: state.clock.elapsed(),
        detail,
    })
}

/// Records what rx did for `--stats-json`. Connections that closed are
/// gone from the registry, so their counters are summed as they close.
fn record_side(state: &State, throughput: Vec<u64>) {
    let live: Vec<report::Connection> = state
        .connections()
        .iter()
        .map(|c| report::Connection::from(&c.link))
        .collect();
    let mut connections = state.closed_links();
    connections.extend(live);
    report::record(report::Side {
        role: "rx",
        payload_bytes: state.written.load(Ordering::Relaxed),
        wire_bytes: connections.iter().map(|c| c.wire_bytes).sum(),
        seconds: state.clock.elapsed().as_secs_f64(),
        feet: connections.iter().map(|c| c.feet).sum(),
        retransmits: 0,
        reconnects: 0,
        throughput,
        connections,
    });
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| Error::io(format!("spawn thread {name}"), e))
}

/// Accepts connections forever, each on a thread of its own, through the
/// handshake gate.
fn accept(
    state: &Arc<State>,
    listener: &TcpListener,
    feet: &Sender<Arrived>,
    events: &Sender<Event>,
) {
    net::accept_loop(listener, |stream, peer| {
        let pass = state.gate.enter(&stream, peer.ip());
        let (state, feet, events) = (Arc::clone(state), feet.clone(), events.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("rx-conn-{peer}"))
            .spawn(move || conn::handle(&state, stream, peer, &feet, &events, pass));
        if let Err(e) = spawned {
            log::warn!("{peer}: no thread for the connection: {e}");
        }
        true
    });
}

/// Keeps one connection to a listening sender open until the stream ends:
/// dials (with backoff), names its rank and index, then serves it like an
/// accepted connection.
fn dial(
    state: &Arc<State>,
    dest: &Destination,
    rank: u16,
    index: u16,
    feet: &Sender<Arrived>,
    events: &Sender<Event>,
) {
    let mut backoff = DIAL_BACKOFF_START;
    while state.wants_sender() {
        let connected = net::connect(dest, DIAL_TIMEOUT, &state.config.socket).and_then(|mut s| {
            s.write_all(&Dial { rank, index }.encode())?;
            let peer = s.peer_addr()?;
            Ok((s, peer))
        });
        match connected {
            Ok((stream, peer)) => {
                let pass = state.gate.enter(&stream, peer.ip());
                conn::handle(state, stream, peer, feet, events, pass);
                backoff = DIAL_BACKOFF_START;
            }
            Err(e) => log::debug!("connect to {dest}: {e}"),
        }
        if !state.wants_sender() {
            break;
        }
        // A retry delay, not a wait for anything: the process ends the
        // dialers when the stream is over.
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
    }
}

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const DIAL_BACKOFF_START: Duration = Duration::from_millis(100);
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The SIGUSR1 report.
fn report(state: &State) -> String {
    let mut out = String::from("viamillipede rx report\n");
    let conns = state.connections();
    for (i, c) in conns.iter().enumerate() {
        out.push_str(&c.link.line(&format!("conn-{i}"), ""));
        out.push('\n');
    }
    let written = state.written.load(Ordering::Relaxed);
    let receiving = conns
        .iter()
        .filter(|c| c.link.state() == LinkState::Receiving)
        .count();
    let _ = writeln!(out, "  written {}", state.clock.summary(written));
    let delivered = state.delivered.load(Ordering::Relaxed);
    let duplicates = state.duplicates.load(Ordering::Relaxed);
    let buffered = state
        .arrived
        .load(Ordering::Relaxed)
        .saturating_sub(duplicates + delivered);
    let _ = writeln!(
        out,
        "  connections {receiving} up, {} handshaking, {} refused; {buffered} feet buffered ({} out of order); duplicates {duplicates}; next foot {delivered}; total {}",
        state.gate.open(),
        state.refused.load(Ordering::Relaxed),
        state.reorder_feet.load(Ordering::Relaxed),
        human_bytes(written),
    );
    out
}
