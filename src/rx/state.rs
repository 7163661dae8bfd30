//! What one flow's threads share: its session, the connections carrying
//! it, how far the output has been written, and whether the stream has
//! ended. A receiver serving several flows ([`super::hub::Hub`]) has one of
//! these per flow.

use super::outbox::{End, Outbox};
use crate::config::Config;
use crate::pool::Pool;
use crate::protocol::{Hello, Reason, MAX_FOOT, MAX_WINDOW, MAX_WINDOW_BYTES};
use crate::report;
use crate::stats::{Clock, Link};
use crossbeam_channel::{Receiver, Sender};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

/// The stream a receiver serves: fixed by the first accepted handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// tx's random session id.
    pub id: [u8; 16],
    /// Largest foot tx sends.
    pub foot_size: u32,
    /// Feet tx may run ahead of what is written.
    pub window: u32,
}

/// Where the stream stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Feet are still expected.
    Running,
    /// Every byte (this many) is written.
    Complete(u64),
    /// Writing failed; no more feet are accepted.
    Failed(String),
}

/// One accepted connection of the session.
#[derive(Debug)]
pub struct Conn {
    /// Its counters.
    pub link: Link,
    /// What is to be told to the sender on it.
    pub outbox: Outbox,
}

/// State shared by a flow's connections, its sequencer and its driver.
#[derive(Debug)]
pub struct State {
    /// The run's options.
    pub config: Config,
    /// Where its connections hand feet to its sequencer.
    pub feet: Sender<super::Arrived>,
    /// Where its threads tell its driver what happened.
    pub events: Sender<super::Event>,
    /// The stream's name (`--name` on the sender), once a sender named it.
    pub name: OnceLock<String>,
    /// Stops what the output feeds, once the flow has failed.
    pub stop_output: OnceLock<super::hub::Stopper>,
    session: Mutex<Option<Session>>,
    progress: Mutex<Progress>,
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next_conn: AtomicU64,
    /// Every foot below this id is written.
    pub delivered: AtomicU64,
    /// Payload bytes written to stdout.
    pub written: AtomicU64,
    /// Feet handed to the sequencer, duplicates included.
    pub arrived: AtomicU64,
    /// Feet received more than once.
    pub duplicates: AtomicU64,
    /// Feet waiting in the reorder buffer.
    pub reorder_feet: AtomicUsize,
    /// Connections dropped for breaking the protocol.
    pub refused: AtomicU64,
    /// Whether the stream's feet carry checksums.
    pub checksummed: AtomicBool,
    /// Payload bytes received and not yet written or dropped.
    buffered: AtomicU64,
    /// Throughput clock.
    pub clock: Clock,
    pool: OnceLock<Pool>,
    /// Counters of closed connections, for the stats document.
    closed: Mutex<Vec<report::Connection>>,
    /// Held while a foot is written; false once the output is closed.
    output_open: Mutex<bool>,
    /// When the sender was first seen to know the stream is complete.
    confirmed: Mutex<Option<Instant>>,
}

/// The verdict on a handshake.
pub enum Admission {
    /// Serve this connection.
    Accept(Session, u64),
    /// Tell the sender everything is written already.
    Complete(u64),
    /// Refuse it, for this reason.
    Reject(Reason, String),
}

/// A random receiver id; a fixed one if the system has no randomness,
/// which only weakens tx's check for a restarted receiver.
pub fn random_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    if getrandom::getrandom(&mut id).is_err() {
        id = std::process::id()
            .to_be_bytes()
            .repeat(2)
            .try_into()
            .unwrap_or_default();
    }
    id
}

/// The other ends of a flow's channels: its sequencer reads the feet, its
/// driver the events.
pub type Ends = (Receiver<super::Arrived>, Receiver<super::Event>);

impl State {
    /// Fresh state for a flow, and the other ends of its channels.
    pub fn new(config: Config) -> (State, Ends) {
        let (feet, feet_rx) = crossbeam_channel::unbounded();
        let (events, events_rx) = crossbeam_channel::unbounded();
        let state = State {
            feet,
            events,
            name: OnceLock::new(),
            stop_output: OnceLock::new(),
            config,
            session: Mutex::new(None),
            progress: Mutex::new(Progress::Running),
            conns: Mutex::new(BTreeMap::new()),
            next_conn: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            written: AtomicU64::new(0),
            arrived: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            reorder_feet: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            buffered: AtomicU64::new(0),
            checksummed: AtomicBool::new(false),
            clock: Clock::new(),
            pool: OnceLock::new(),
            closed: Mutex::new(Vec::new()),
            output_open: Mutex::new(true),
            confirmed: Mutex::new(None),
        };
        (state, (feet_rx, events_rx))
    }

    /// The most bytes this flow may hold received and not yet written, for
    /// `session`: a window of feet, one more being read, and one per
    /// connection resent after a reconnect.
    pub fn bound(session: Session, connections: u64) -> u64 {
        (u64::from(session.window) + 2 + connections) * u64::from(session.foot_size)
    }

    /// The session, once a sender fixed it.
    pub fn session(&self) -> Option<Session> {
        *Self::lock(&self.session)
    }

    /// The name the stream goes by in logs: its `--name`, or its session
    /// id's first bytes.
    pub fn label(&self) -> String {
        match (self.name.get(), self.session()) {
            (Some(n), _) => n.clone(),
            (None, Some(s)) => s.id[..4].iter().map(|b| format!("{b:02x}")).collect(),
            (None, None) => "the stream".into(),
        }
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a hello's foot size and window are ones this receiver
    /// takes: [`Admission::Accept`] (with nothing in it) or a refusal.
    pub fn check(hello: &Hello) -> Admission {
        let bytes = u64::from(hello.foot_size) * u64::from(hello.window);
        if hello.foot_size == 0
            || hello.foot_size > MAX_FOOT
            || hello.window < 2
            || hello.window > MAX_WINDOW
            || bytes > MAX_WINDOW_BYTES
        {
            return Admission::Reject(
                Reason::Parameters,
                format!(
                    "foot size {} x window {} is outside what this receiver accepts (foot up to {MAX_FOOT}, window 2 to {MAX_WINDOW}, at most {MAX_WINDOW_BYTES} bytes)",
                    hello.foot_size, hello.window
                ),
            );
        }
        Admission::Accept(
            Session {
                id: hello.session,
                foot_size: hello.foot_size,
                window: hello.window,
            },
            0,
        )
    }

    /// Decides whether a sender may join; the first acceptable one fixes the
    /// session.
    pub fn admit(&self, hello: &Hello) -> Admission {
        let reject = Admission::Reject;
        if let refused @ Admission::Reject(..) = Self::check(hello) {
            return refused;
        }
        let offered = Session {
            id: hello.session,
            foot_size: hello.foot_size,
            window: hello.window,
        };
        let mut session = Self::lock(&self.session);
        match *session {
            None => *session = Some(offered),
            Some(s) if s.id != offered.id => {
                return reject(
                    Reason::Busy,
                    "busy: another stream is in progress on this receiver".into(),
                )
            }
            Some(s) if s != offered => {
                return reject(
                    Reason::Parameters,
                    "foot size or window differs from the stream's".into(),
                )
            }
            Some(_) => {}
        }
        drop(session);
        match self.progress() {
            Progress::Running => Admission::Accept(offered, self.delivered.load(Ordering::Acquire)),
            Progress::Complete(bytes) => Admission::Complete(bytes),
            Progress::Failed(msg) => reject(Reason::Failed, msg),
        }
    }

    /// Counts `bytes` more received and not yet written; false (counting
    /// nothing) if that is more than an honest sender can have on its way:
    /// a window of feet, one more being read, and one per connection resent
    /// after a reconnect.
    pub fn reserve(&self, session: Session, bytes: u64) -> bool {
        let limit = Self::bound(session, self.connections().len() as u64);
        let before = self.buffered.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > limit {
            self.buffered.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// `bytes` counted by [`State::reserve`] were written or dropped.
    pub fn release(&self, bytes: u64) {
        self.buffered.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// The session's foot buffers: as many as the window holds, so the
    /// pool adds nothing to the memory bound.
    pub fn pool(&self, session: Session) -> Pool {
        self.pool
            .get_or_init(|| Pool::new(session.window as usize, session.foot_size as usize))
            .clone()
    }

    /// Runs `write` unless the output was closed, holding the output so
    /// that closing it waits for a foot being written: rx never stops in
    /// the middle of a foot. Returns None if the output is closed.
    pub fn write_output<T>(&self, write: impl FnOnce() -> T) -> Option<T> {
        let open = Self::lock(&self.output_open);
        open.then(write)
    }

    /// Closes the output, after the foot being written (if any). A write
    /// that does not end (the program reading the output has stopped
    /// reading) is told after a second.
    pub fn close_output(&self) {
        let started = std::time::Instant::now();
        let mut told = false;
        loop {
            match self.output_open.try_lock() {
                Ok(mut open) => return *open = false,
                Err(std::sync::TryLockError::Poisoned(p)) => return *p.into_inner() = false,
                Err(std::sync::TryLockError::WouldBlock) => {
                    if !told && started.elapsed() >= std::time::Duration::from_secs(1) {
                        log::warn!(
                            "waiting for the program reading the output to take the foot being written (it has stopped reading); interrupt again to exit at once"
                        );
                        told = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }

    /// Where the stream stands.
    pub fn progress(&self) -> Progress {
        Self::lock(&self.progress).clone()
    }

    /// Records the end of the stream (the first end wins) and tells every
    /// connection: `Done` or `Abort`. Returns whether this call ended it.
    pub fn end(&self, progress: Progress) -> bool {
        {
            let mut p = Self::lock(&self.progress);
            if *p != Progress::Running {
                return false;
            }
            *p = progress.clone();
        }
        let end = match progress {
            Progress::Complete(bytes) => End::Done(bytes),
            Progress::Failed(msg) => End::Abort(msg),
            Progress::Running => return false,
        };
        for c in self.connections() {
            c.outbox.end(end.clone());
        }
        true
    }

    /// Tells every connection that every foot below `delivered` is written.
    pub fn tell_window(&self, delivered: u64) {
        for c in self.connections() {
            c.outbox.window(delivered);
        }
    }

    /// The sender has shown it knows the stream is complete (it closed a
    /// connection cleanly, or was told so when it reconnected).
    pub fn confirm(&self) {
        Self::lock(&self.confirmed).get_or_insert_with(Instant::now);
    }

    /// Whether the sender is still needed: the stream runs, or is complete
    /// and the sender has not yet shown that it knows.
    pub fn wants_sender(&self) -> bool {
        match self.progress() {
            Progress::Running => true,
            Progress::Complete(_) => self.confirmed().is_none(),
            Progress::Failed(_) => false,
        }
    }

    /// When the sender was first seen to know the stream is complete.
    pub fn confirmed(&self) -> Option<Instant> {
        *Self::lock(&self.confirmed)
    }

    /// Adds a connection; returns its key and handle.
    pub fn register(&self, peer: String) -> (u64, Arc<Conn>) {
        let key = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            link: Link::new(peer),
            outbox: Outbox::default(),
        });
        Self::lock(&self.conns).insert(key, Arc::clone(&conn));
        (key, conn)
    }

    /// Removes a connection, keeping its counters for the stats document;
    /// returns how many remain.
    pub fn unregister(&self, key: u64) -> usize {
        let mut conns = Self::lock(&self.conns);
        if let Some(c) = conns.remove(&key) {
            Self::lock(&self.closed).push(report::Connection::from(&c.link));
        }
        conns.len()
    }

    /// Counters of the connections that have closed.
    pub fn closed_links(&self) -> Vec<report::Connection> {
        Self::lock(&self.closed).clone()
    }

    /// Live connections of the session.
    pub fn connections(&self) -> Vec<Arc<Conn>> {
        Self::lock(&self.conns).values().cloned().collect()
    }
}
