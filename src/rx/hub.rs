//! What a receiver's connections share before they belong to a flow: the
//! options, the handshake gate, the UDP sockets, and which flow each
//! session is. A receiver serves one flow ([`Flows::One`], the command
//! line's rx writing stdout) or a new flow per sender session
//! ([`Flows::Many`]: `--exec`, and the library's [`crate::Receiver`]),
//! each with its own window, reorder buffer and output.

use super::state::{Admission, Progress, Session, State};
use super::udp::UdpRx;
use crate::config::Config;
use crate::error::Result;
use crate::protocol::{Hello, Reason};
use crate::Summary;
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where a flow's bytes go, in order.
pub trait Output: Write + Send {
    /// What it is, for errors ("write to stdout: ...").
    fn what(&self) -> String {
        "stdout".into()
    }

    /// Called once the last byte is written: the stream is complete only
    /// if this succeeds (a command given the stream exited 0).
    fn finish(&mut self) -> io::Result<()> {
        self.flush()
    }

    /// A way to stop what the output feeds from another thread once the
    /// flow has failed, even while a write to it is blocked (a command
    /// that stopped reading): rx's driver calls it before it closes the
    /// output.
    fn stopper(&self) -> Option<Stopper> {
        None
    }
}

/// Stops an output's consumer (see [`Output::stopper`]).
pub struct Stopper(pub Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stopper")
    }
}

/// Any writer as an output: finished by a flush.
pub struct Plain<W>(pub W);

impl<W: Write> Write for Plain<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write + Send> Output for Plain<W> {}

/// A new flow, as its output is opened.
#[derive(Clone, Debug)]
pub struct FlowInfo {
    /// The name the sender gave (`--name`).
    pub name: Option<String>,
    /// Where its first connection came from.
    pub peer: SocketAddr,
    /// The sender's session id.
    pub session: [u8; 16],
}

impl FlowInfo {
    /// The session id in hex.
    pub fn session_hex(&self) -> String {
        self.session.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Hears how a flow ended, as soon as it is known.
pub type OnEnd = Box<dyn FnOnce(&Result<Summary>) + Send>;

/// What a new flow's bytes go to, and who hears how it ended.
pub struct Opened {
    /// Its output.
    pub output: Box<dyn Output>,
    /// Told the flow's outcome as soon as it is known.
    pub on_end: OnEnd,
    /// Where the flow's events go (the library's `Flow::events`).
    pub events: Option<crate::events::Sink>,
}

/// Opens a new flow's output, or says why it cannot be opened.
pub type Open = dyn Fn(&FlowInfo) -> io::Result<Opened> + Send + Sync;

/// How a receiver maps sessions to flows.
pub enum Flows {
    /// One flow: the first session to arrive; others are refused "busy".
    One(Arc<State>),
    /// A flow per session, opened as it first arrives.
    Many(Many),
}

/// The flows of a receiver that serves several.
pub struct Many {
    open: Box<Open>,
    /// Flows being served (lingering for their sender included).
    live: BTreeMap<[u8; 16], Arc<State>>,
    /// How recently ended flows ended, so a sender reconnecting late is
    /// told its outcome instead of starting its stream again.
    ended: VecDeque<([u8; 16], Progress)>,
    /// Flows started so far.
    pub started: u64,
    /// Flows that failed so far.
    pub failed: u64,
    /// Bytes written by flows that ended.
    pub bytes: u64,
}

/// Ended flows remembered for a late sender.
const REMEMBERED: usize = 1024;

impl Many {
    /// Flows opened by `open`.
    pub fn new(open: Box<Open>) -> Many {
        Many {
            open,
            live: BTreeMap::new(),
            ended: VecDeque::new(),
            started: 0,
            failed: 0,
            bytes: 0,
        }
    }
}

/// What a receiver's connections share.
pub struct Hub {
    /// The receiver's options.
    pub config: Config,
    /// This process's random id, sent in every reply.
    pub receiver: [u8; 8],
    /// Connections in their handshake, at most so many per source.
    pub gate: Arc<crate::net::Gate>,
    /// Connections refused in their handshake.
    pub refused: AtomicU64,
    /// Set once the receiver takes no new flows; its listener closes once
    /// the flows it serves have ended.
    closing: AtomicBool,
    /// Set once the receiver's threads should end.
    closed: Arc<AtomicBool>,
    /// A copy of the listening socket, shut down to end the acceptor.
    listener: Mutex<Option<TcpListener>>,
    flows: Mutex<Flows>,
    /// Told each time a flow of a receiver serving several ends.
    flow_ended: std::sync::Condvar,
    /// The UDP sockets, one per local address senders reached, opened when
    /// a sender first asked (`--udp`), or why one could not be opened.
    udp: Mutex<BTreeMap<IpAddr, std::result::Result<Arc<UdpRx>, String>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    /// A hub for `flows`.
    pub fn new(config: Config, flows: Flows) -> Arc<Hub> {
        Arc::new(Hub {
            receiver: config
                .local_receiver
                .unwrap_or_else(super::state::random_id),
            config,
            gate: crate::net::Gate::new(),
            refused: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            closed: Arc::new(AtomicBool::new(false)),
            listener: Mutex::new(None),
            flows: Mutex::new(flows),
            flow_ended: std::sync::Condvar::new(),
            udp: Mutex::new(BTreeMap::new()),
        })
    }

    /// Whether the receiver's threads should end.
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether a stream is still expected: a late connection then is news.
    pub fn expecting(&self) -> bool {
        match &*lock(&self.flows) {
            Flows::One(state) => state.progress() == Progress::Running,
            Flows::Many(_) => !self.closing.load(Ordering::Acquire),
        }
    }

    /// Serves `listener` on a thread of its own until the hub closes.
    pub fn listen(self: &Arc<Self>, listener: TcpListener) -> Result<()> {
        if let Ok(copy) = listener.try_clone() {
            *lock(&self.listener) = Some(copy);
        }
        let hub = Arc::clone(self);
        super::spawn("rx-acceptor", move || super::accept(&hub, &listener))
    }

    /// Takes no new flows; once every flow being served has ended, the
    /// receiver's threads end and its ports close.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let idle = match &*lock(&self.flows) {
            Flows::One(_) => true,
            Flows::Many(m) => m.live.is_empty(),
        };
        if idle {
            self.shut();
        }
    }

    fn shut(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(l) = lock(&self.listener).take() {
            // Wakes the acceptor from accept(2).
            let _ = socket2::SockRef::from(&l).shutdown(std::net::Shutdown::Both);
        }
    }

    /// Ends every flow being served with `why` (a signal, the receiver
    /// dropped), and takes no new ones.
    pub fn stop(&self, why: &str, error: impl Fn() -> crate::error::Error) {
        self.closing.store(true, Ordering::Release);
        for state in self.states() {
            if state.end(Progress::Failed(why.into())) {
                let _ = state.events.send(super::Event::Finished(Err(error())));
            }
        }
        self.close();
    }

    /// The flows being served.
    pub fn states(&self) -> Vec<Arc<State>> {
        match &*lock(&self.flows) {
            Flows::One(state) => vec![Arc::clone(state)],
            Flows::Many(m) => m.live.values().cloned().collect(),
        }
    }

    /// Whether this receiver serves a flow per session.
    pub fn serves_many(&self) -> bool {
        matches!(&*lock(&self.flows), Flows::Many(_))
    }

    /// Waits until no flow is being served.
    pub fn wait_idle(&self) {
        let mut flows = lock(&self.flows);
        while let Flows::Many(m) = &*flows {
            if m.live.is_empty() {
                return;
            }
            flows = self
                .flow_ended
                .wait(flows)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Runs `f` on the flows of a receiver that serves several.
    pub fn with_many<T>(&self, f: impl FnOnce(&mut Many) -> T) -> Option<T> {
        match &mut *lock(&self.flows) {
            Flows::One(_) => None,
            Flows::Many(m) => Some(f(m)),
        }
    }

    /// The UDP socket on the address and port a TCP connection reached
    /// (`local`), opened the first time a sender asks there.
    pub fn udp(&self, local: SocketAddr) -> std::result::Result<Arc<UdpRx>, String> {
        let local = SocketAddr::new(local.ip().to_canonical(), local.port());
        lock(&self.udp)
            .entry(local.ip())
            .or_insert_with(|| {
                UdpRx::open(local, Arc::clone(&self.closed)).map_err(|e| {
                    let why = format!("cannot open UDP port {local}: {e}");
                    log::warn!("{why}");
                    why
                })
            })
            .clone()
    }

    /// Decides whether a sender may join, and which flow it joins: its
    /// session's, or (serving several) a new one if there is room.
    pub fn admit(
        self: &Arc<Self>,
        hello: &Hello,
        name: Option<String>,
        peer: SocketAddr,
    ) -> (Admission, Option<Arc<State>>) {
        let mut flows = lock(&self.flows);
        let many = match &mut *flows {
            Flows::One(state) => {
                let state = Arc::clone(state);
                drop(flows);
                return self.join(state, hello, name);
            }
            Flows::Many(m) => m,
        };
        if let Some(state) = many.live.get(&hello.session) {
            let state = Arc::clone(state);
            drop(flows);
            return self.join(state, hello, name);
        }
        if let Some((_, ended)) = many.ended.iter().find(|(s, _)| *s == hello.session) {
            let verdict = match ended {
                Progress::Complete(bytes) => Admission::Complete(*bytes),
                Progress::Failed(why) => Admission::Reject(Reason::Failed, why.clone()),
                Progress::Running => Admission::Reject(Reason::Failed, "ended".into()),
            };
            return (verdict, None);
        }
        let busy = |why: String| (Admission::Reject(Reason::Busy, why), None);
        if self.closing.load(Ordering::Acquire) {
            return busy("busy: this receiver is closing".into());
        }
        let max = self.config.max_flows;
        if many.live.len() >= max {
            return busy(format!(
                "busy: this receiver serves {max} flows at once (--max-flows), all taken"
            ));
        }
        let offered = Session {
            id: hello.session,
            foot_size: hello.foot_size,
            window: hello.window,
        };
        let need = State::bound(offered, 0);
        let held: u64 = many
            .live
            .values()
            .filter_map(|s| s.session())
            .map(|s| State::bound(s, 0))
            .sum();
        if held + need > self.config.max_memory {
            return busy(format!(
                "busy: this flow's window ({}) does not fit beside the flows being served in --max-memory ({})",
                crate::stats::human_bytes(need),
                crate::stats::human_bytes(self.config.max_memory)
            ));
        }
        // Checked before anything is started for it.
        if let reject @ Admission::Reject(..) = State::check(hello) {
            return (reject, None);
        }
        let info = FlowInfo {
            name: name.clone(),
            peer: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            session: hello.session,
        };
        let opened = match (many.open)(&info) {
            Ok(o) => o,
            Err(e) => {
                let why = format!("this receiver could not start the flow's output: {e}");
                log::warn!("{peer}: {why}");
                return (Admission::Reject(Reason::Failed, why), None);
            }
        };
        crate::events::tell(&self.config.events, || crate::events::Event::FlowOpened {
            name: info.name.clone(),
            peer: info.peer.to_string(),
        });
        let mut config = self.config.clone();
        config.events = opened.events;
        // Many flows at once: no progress line or stats document of one.
        config.display = Default::default();
        config.stats_json = None;
        let (state, ends) = State::new(config);
        let state = Arc::new(state);
        if let Err(e) = super::start_flow(self, &state, ends, opened.output, opened.on_end) {
            return (Admission::Reject(Reason::Failed, e.to_string()), None);
        }
        many.live.insert(hello.session, Arc::clone(&state));
        many.started += 1;
        // Joined before the lock is let go: the session is set, so the next
        // new flow's --max-memory check counts this one.
        self.join(state, hello, name)
    }

    fn join(
        &self,
        state: Arc<State>,
        hello: &Hello,
        name: Option<String>,
    ) -> (Admission, Option<Arc<State>>) {
        let verdict = state.admit(hello);
        if let (Admission::Accept(..), Some(name)) = (&verdict, name) {
            if let Err(other) = state.name.set(name.clone()) {
                let first = state.name.get().cloned().unwrap_or(other);
                if first != name {
                    let why = format!("the stream is named '{first}', not '{name}'");
                    return (Admission::Reject(Reason::Parameters, why), None);
                }
            }
        }
        (verdict, Some(state))
    }

    /// A flow of a receiver serving several has ended: it is forgotten
    /// (but for its outcome), and a closing receiver with no flow left
    /// closes.
    pub fn ended(&self, state: &State, result: &Result<Summary>) {
        crate::events::tell(&self.config.events, || crate::events::Event::FlowClosed {
            name: state.name.get().cloned(),
            bytes: state.written.load(Ordering::Relaxed),
            error: result.as_ref().err().map(|e| e.to_string()),
        });
        let idle = self
            .with_many(|m| {
                let id = state.session().map(|s| s.id).unwrap_or_default();
                m.live.remove(&id);
                if m.ended.len() == REMEMBERED {
                    m.ended.pop_front();
                }
                m.ended.push_back((id, state.progress()));
                match result {
                    Ok(s) => m.bytes += s.bytes,
                    Err(_) => m.failed += 1,
                }
                m.live.is_empty()
            })
            .unwrap_or(false);
        self.flow_ended.notify_all();
        if idle && self.closing.load(Ordering::Acquire) {
            self.shut();
        }
    }
}
