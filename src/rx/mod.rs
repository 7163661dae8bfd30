//! The receiving wing: sockets -> connections -> sequencer -> stdout.
//!
//! An acceptor thread takes connections and gives each a thread of its own
//! for the handshake and its feet; one sequencer thread writes stdout in
//! order. The main thread waits for the end of the stream, or for the
//! reconnect timeout once every connection of a started stream is gone.

mod conn;
mod exec;
pub mod hub;
mod outbox;
mod sequencer;
mod state;
mod udp;

use crate::config::{Config, Destination};
use crate::error::{Error, Result};
use crate::monitor::Monitor;
use crate::protocol::handshake::Dial;
use crate::stats::{human_bytes, LinkState};
use crate::{net, report, Summary};
use crossbeam_channel::RecvTimeoutError;
use hub::{Flows, Hub, Output};
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

/// The command line's rx: through the library's [`crate::ReceiverBuilder`],
/// the stream to stdout, or (with `--exec`) each flow into its command.
pub fn run(config: &Config) -> Result<Summary> {
    let builder = crate::ReceiverBuilder::from_config(config.clone());
    match &config.exec {
        Some(command) => builder.serve_commands(command, told_listening),
        None => builder.receive_into(Stdout::open()?, told_listening),
    }
}

/// Serves flows on `listener`, each into a run of `command` (`--exec`).
pub fn serve_commands(
    config: &Config,
    listener: TcpListener,
    command: &str,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> Result<Summary> {
    exec::serve(config, listener, command, on_ready)
}

/// Tells the user where rx listens (on stderr: stdout is the stream's).
pub fn told_listening(addr: std::net::SocketAddr) {
    let _ = writeln!(std::io::stderr(), "viamillipede: listening on {addr}");
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

impl Output for Stdout {}

impl Drop for Stdout {
    fn drop(&mut self) {
        drop(self.0.take());
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = rustix::stdio::dup2_stdout(&null);
        }
    }
}

/// Binds rx's listening socket, with an error that names where.
pub fn listen(config: &Config, addr: Option<&str>, port: u16) -> Result<TcpListener> {
    net::listen(addr, port, &config.socket).map_err(|e| {
        let shown = match addr {
            Some(a) if a.contains(':') => format!("[{a}]:{port}"),
            Some(a) => format!("{a}:{port}"),
            None => format!("port {port}"),
        };
        Error::io(format!("listen on {shown}"), e)
    })
}

/// Listens as `config` says and writes the stream to `out`.
pub fn run_into(
    config: &Config,
    addr: Option<&str>,
    port: u16,
    out: impl Output + 'static,
) -> Result<Summary> {
    let listener = listen(config, addr, port)?;
    receive(config, listener, out, told_listening)
}

/// Serves `listener`, writing the stream to `out`; `on_ready` is told the
/// bound address once connections are being accepted.
pub fn receive(
    config: &Config,
    listener: TcpListener,
    out: impl Output + 'static,
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
    out: impl Output + 'static,
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

/// A receiver's side of the controls: every flow's report and status; a
/// stop ends them all, and `then` hears of it (the signal, and whether a
/// stream still running was cut).
pub(crate) struct Live {
    hub: Arc<Hub>,
    then: Option<Box<dyn Fn(i32, bool) + Send + Sync>>,
}

impl crate::control::Running for Live {
    fn report(&self) -> String {
        report(&self.hub)
    }

    fn status(&self) -> serde_json::Value {
        status(&self.hub)
    }

    fn stop(&self, why: &str, sig: i32) {
        // Only a stream still running is cut: a complete one may be
        // lingering for its sender to hang up.
        let cut = self
            .hub
            .states()
            .iter()
            .any(|s| s.progress() == Progress::Running);
        self.hub.stop(why, || Error::Interrupted(sig));
        if let Some(then) = &self.then {
            then(sig, cut);
        }
    }
}

/// Attaches a receiver to the configuration's controls, if it has any.
pub(crate) fn attach(
    hub: &Arc<Hub>,
    then: Option<Box<dyn Fn(i32, bool) + Send + Sync>>,
) -> Option<crate::control::Attached> {
    let live = Live {
        hub: Arc::clone(hub),
        then,
    };
    hub.config
        .controls
        .as_ref()
        .map(|c| c.attach(Arc::new(live)))
}

/// One flow's receiver: the stream from whichever sender arrives first.
fn receive_from(
    config: &Config,
    incoming: Incoming,
    out: impl Output + 'static,
    on_ready: impl FnOnce(),
) -> Result<Summary> {
    let (state, (feet_rx, events_rx)) = State::new(config.clone());
    let state = Arc::new(state);
    let hub = Hub::new(config.clone(), Flows::One(Arc::clone(&state)));
    let _attached = attach(&hub, None);
    {
        let state = Arc::clone(&state);
        spawn("rx-sequencer", move || {
            sequencer::run(&state, Box::new(out), feet_rx)
        })?;
    }
    // A receiver that dials is the active party: it gives up after the
    // reconnect timeout from the start, as tx does.
    let dialing = matches!(incoming, Incoming::Dial(_));
    match incoming {
        Incoming::Listen(listener) => hub.listen(listener)?,
        Incoming::Dial(destinations) => {
            for (rank, dest) in destinations.into_iter().enumerate() {
                for index in 0..config.threads {
                    let hub = Arc::clone(&hub);
                    let dest = dest.clone();
                    spawn(&format!("rx-dialer-{rank}-{index}"), move || {
                        dial(&hub, &dest, rank as u16, index)
                    })?;
                }
            }
        }
    }
    on_ready();
    let result = drive(&hub, &state, &events_rx, dialing, |_| {});
    hub.close();
    result
}

/// Starts a new flow of a receiver that serves several: its sequencer
/// writing `output`, and its driver, which tells `on_end` the outcome and
/// the hub that the flow has ended.
fn start_flow(
    hub: &Arc<Hub>,
    state: &Arc<State>,
    (feet_rx, events_rx): state::Ends,
    output: Box<dyn Output>,
    on_end: hub::OnEnd,
) -> Result<()> {
    if let Some(stop) = output.stopper() {
        let _ = state.stop_output.set(stop);
    }
    let s = Arc::clone(state);
    spawn("rx-sequencer", move || sequencer::run(&s, output, feet_rx))?;
    let (hub, state) = (Arc::clone(hub), Arc::clone(state));
    spawn("rx-flow", move || {
        // Its first connection joins as soon as the handshake's answer is
        // out; one that never does must not hold the flow's place for good.
        let result = drive(&hub, &state, &events_rx, true, on_end);
        hub.ended(&state, &result);
    })
}

/// Follows one flow to its end: the reconnect timeout once every
/// connection is gone, the linger for the sender to hear the outcome, and
/// the output closed after the foot being written. `told` hears the
/// outcome as soon as it is known, before the linger. `timed` applies the
/// reconnect timeout from the start, not only once a sender was seen.
fn drive(
    hub: &Hub,
    state: &Arc<State>,
    events_rx: &crossbeam_channel::Receiver<Event>,
    timed: bool,
    told: impl FnOnce(&Result<Summary>),
) -> Result<Summary> {
    let config = &state.config;
    // The clock and the monitor start with the first connection, not
    // while rx waits for a sender.
    let mut monitor: Option<Monitor> = None;
    let start_monitor = || {
        state.clock.restart();
        let state = Arc::clone(state);
        Monitor::start(
            move || (state.written.load(Ordering::Relaxed), 0),
            config.display,
            config.stats_json.is_some(),
            "written",
        )
    };

    let timeout = config.reconnect_timeout;
    let mut lost_since: Option<Instant> = timed.then(Instant::now);
    // When the user was last told that rx is waiting for the sender.
    let mut told_waiting: Option<Instant> = None;
    let outcome = loop {
        let event = match (lost_since, told_waiting) {
            (None, _) => events_rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            (Some(t), Some(n)) => events_rx.recv_deadline((t + timeout).min(n + TELL_EVERY)),
            (Some(t), None) => events_rx.recv_deadline(t + timeout),
        };
        match event {
            Ok(Event::Opened) => {
                if monitor.is_none() {
                    monitor = Some(start_monitor());
                }
                if let (Some(since), Some(_)) = (lost_since, told_waiting.take()) {
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
                        told_waiting = Some(Instant::now());
                    }
                    lost_since.get_or_insert_with(Instant::now);
                }
            }
            Err(RecvTimeoutError::Timeout)
                if told_waiting.is_some_and(|n| n.elapsed() >= TELL_EVERY)
                    && lost_since.is_some_and(|t| t.elapsed() < timeout) =>
            {
                let gone = lost_since.map_or(Duration::ZERO, |t| t.elapsed());
                log::warn!(
                    "still no connection from the sender after {}; giving up in {}",
                    crate::stats::human_duration(gone),
                    crate::stats::human_duration(timeout.saturating_sub(gone))
                );
                told_waiting = Some(Instant::now());
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
    let refused = state.refused.load(Ordering::Relaxed)
        + match hub.serves_many() {
            true => 0,
            false => hub.refused.load(Ordering::Relaxed),
        };
    let result = outcome.map(|bytes| Summary {
        bytes,
        elapsed: state.clock.elapsed(),
        detail: format!(
            "{} duplicate feet, {refused} connections refused",
            state.duplicates.load(Ordering::Relaxed),
        ),
    });
    if result.is_err() {
        // A flow that failed writes nothing more, whoever is writing, and
        // what the output feeds is stopped now: a write blocked on it (a
        // command that stopped reading) returns, and the command never
        // sees the cut stream's end as a clean one.
        state.end(Progress::Failed("the stream failed".into()));
        if let Some(stop) = state.stop_output.get() {
            (stop.0)();
        }
    }
    told(&result);

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
        record_side(state, throughput);
    }
    if config.verbose >= 2 {
        log::debug!("{}", flow_report(state).trim_end());
    }
    result
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
    report::record(
        state.config.controls.as_ref(),
        report::Side {
            role: "rx",
            payload_bytes: state.written.load(Ordering::Relaxed),
            wire_bytes: connections.iter().map(|c| c.wire_bytes).sum(),
            seconds: state.clock.elapsed().as_secs_f64(),
            feet: connections.iter().map(|c| c.feet).sum(),
            retransmits: 0,
            reconnects: 0,
            throughput,
            connections,
        },
    );
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| Error::io(format!("spawn thread {name}"), e))
}

/// Accepts connections until the hub closes, each on a thread of its own,
/// through the handshake gate.
fn accept(hub: &Arc<Hub>, listener: &TcpListener) {
    net::accept_loop(
        listener,
        || !hub.closed(),
        |stream, peer| {
            let pass = hub.gate.enter(&stream, peer.ip());
            let hub = Arc::clone(hub);
            let spawned = std::thread::Builder::new()
                .name(format!("rx-conn-{peer}"))
                .spawn(move || conn::handle(&hub, stream, peer, pass));
            if let Err(e) = spawned {
                log::warn!("{peer}: no thread for the connection: {e}");
            }
            true
        },
    );
}

/// Keeps one connection to a listening sender open until the stream ends:
/// dials (with backoff), names its rank and index, then serves it like an
/// accepted connection.
fn dial(hub: &Arc<Hub>, dest: &Destination, rank: u16, index: u16) {
    let mut backoff = DIAL_BACKOFF_START;
    let wanted = || hub.states().iter().any(|s| s.wants_sender());
    while wanted() {
        let connected = net::connect(dest, DIAL_TIMEOUT, &hub.config.socket).and_then(|mut s| {
            s.write_all(&Dial { rank, index }.encode())?;
            let peer = s.peer_addr()?;
            Ok((s, peer))
        });
        match connected {
            Ok((stream, peer)) => {
                let pass = hub.gate.enter(&stream, peer.ip());
                conn::handle(hub, stream, peer, pass);
                backoff = DIAL_BACKOFF_START;
            }
            Err(e) => log::debug!("connect to {dest}: {e}"),
        }
        if !wanted() {
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

/// The SIGUSR1 report: every flow being served.
fn report(hub: &Hub) -> String {
    let mut out = String::from("viamillipede rx report\n");
    let states = hub.states();
    if let Some((started, failed, bytes)) = hub.with_many(|m| (m.started, m.failed, m.bytes)) {
        let _ = writeln!(
            out,
            "  flows: {} being served, {started} started, {failed} failed, {} written by flows that ended",
            states.len(),
            human_bytes(bytes)
        );
    }
    for state in &states {
        if hub.serves_many() {
            let _ = writeln!(out, " flow {}", state.label());
        }
        out.push_str(&flow_report(state));
    }
    let _ = writeln!(
        out,
        "  {} handshaking, {} refused in the handshake",
        hub.gate.open(),
        hub.refused.load(Ordering::Relaxed)
    );
    out
}

/// The receiver's side of the status document: every flow's counters and
/// connections, and as problems the flows whose sender is gone.
fn status(hub: &Hub) -> serde_json::Value {
    use serde_json::json;
    let mut problems: Vec<String> = Vec::new();
    let flows: Vec<serde_json::Value> = hub
        .states()
        .iter()
        .map(|state| {
            let conns = state.connections();
            let running = state.progress() == Progress::Running;
            let seen = state.arrived.load(Ordering::Relaxed) > 0 || !state.closed_links().is_empty();
            if running && seen && conns.is_empty() {
                problems.push(format!("flow {}: every connection from the sender is gone", state.label()));
            }
            let connections: Vec<serde_json::Value> = conns
                .iter()
                .map(|c| {
                    let l = &c.link;
                    json!({"peer": l.peer, "bytes": l.bytes(), "wire_bytes": l.wire_bytes(),
                           "feet": l.feet(), "reconnects": l.reconnects(), "state": l.state().name()})
                })
                .collect();
            let delivered = state.delivered.load(Ordering::Relaxed);
            let duplicates = state.duplicates.load(Ordering::Relaxed);
            json!({
                "flow": state.label(),
                "name": state.name.get(),
                "state": match state.progress() {
                    Progress::Running => "running".to_string(),
                    Progress::Complete(_) => "complete".to_string(),
                    Progress::Failed(why) => format!("failed: {why}"),
                },
                "payload_bytes": state.written.load(Ordering::Relaxed),
                "seconds": state.clock.elapsed().as_secs_f64(),
                "feet": state.arrived.load(Ordering::Relaxed),
                "duplicates": duplicates,
                "buffered_feet": state.arrived.load(Ordering::Relaxed).saturating_sub(duplicates + delivered),
                "next_foot": delivered,
                "connections": connections,
            })
        })
        .collect();
    let written: u64 = flows
        .iter()
        .filter_map(|f| f["payload_bytes"].as_u64())
        .sum();
    json!({
        "role": "rx",
        "payload_bytes": written,
        "flows": flows,
        "handshaking": hub.gate.open(),
        "refused": hub.refused.load(Ordering::Relaxed),
        "problems": problems,
    })
}

/// One flow's part of the report.
fn flow_report(state: &State) -> String {
    let mut out = String::new();
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
        "  connections {receiving} up, {} dropped; {buffered} feet buffered ({} out of order); duplicates {duplicates}; next foot {delivered}; total {}",
        state.refused.load(Ordering::Relaxed),
        state.reorder_feet.load(Ordering::Relaxed),
        human_bytes(written),
    );
    out
}
