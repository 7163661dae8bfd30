//! A deterministic link simulation: the real send scheduler
//! ([`crate::tx::schedule::Schedule`]) driven by a virtual clock over
//! simulated paths, with simulated TCP connections and a simulated receiver.
//! Tests only; a whole transfer of minutes takes milliseconds, and the same
//! seed replays exactly.
//!
//! The model, stepped every millisecond of virtual time:
//! - A *path* has a rate, a round-trip time, random loss, a queue (extra
//!   delay once it is saturated) and outages. Its rate is shared max-min
//!   fairly among the connections that have bytes to send.
//! - A *connection* is a TCP fluid: a congestion window that starts at ten
//!   segments, grows by what it sends (slow start) up to what the path can
//!   hold, or under loss up to the Mathis bound (1.22 MSS / sqrt(loss));
//!   slow start again after an idle second. Random loss also sends it into
//!   retransmission timeouts now and then (silences the stall detector must
//!   sit out). In an outage, what is on the wire is lost and the connection
//!   retries with exponential backoff, so it resumes only at its next retry
//!   after the path returns, and gives up (as `TCP_USER_TIMEOUT` does) after
//!   20 s. Bytes arrive in order, half a round trip after they are sent.
//! - The *sender's workers* dial (3 s timeout while the path is dark, two
//!   round trips otherwise, backoff 100 ms doubling to 2 s), take pieces
//!   from the schedule only when it wakes them, and write them into a
//!   4 MiB kernel buffer (a write blocks while it is full).
//! - The *receiver* acknowledges each piece when it has arrived whole,
//!   reports the bytes arriving on a connection every 250 ms, writes pieces
//!   in order (at once, or at a given output rate) and tells the window
//!   half a round trip later. What it sends on a dark path is lost.
//!
//! After every step the simulation checks the scheduler's promises: no
//! worker waits while the schedule would give it a piece (a lost wake-up),
//! no piece outside the receiver's window, and the output is the input.

use crate::error::Error;
use crate::pool::Shared;
use crate::tx::schedule::{Foot, Params, Schedule};
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_millis(1);
const MSS: f64 = 1448.0;
const INITIAL_CWND: f64 = 10.0 * MSS;
const SNDBUF: u64 = 4 << 20;
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
const USER_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The share of loss events that end in a retransmission timeout.
const RTO_SHARE: f64 = 0.05;

/// One simulated path.
#[derive(Clone, Debug)]
pub struct Path {
    /// Bytes per second.
    pub rate: f64,
    /// Round trip without queueing.
    pub rtt: Duration,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Extra round-trip delay while the path is saturated (its queue).
    pub queue: Duration,
    /// Dark intervals, from the start of the transfer.
    pub outages: Vec<(Duration, Duration)>,
    /// Connections are made but carry nothing (a middlebox that passes
    /// handshakes and drops the rest), from this time on.
    pub blackhole: Option<Duration>,
}

impl Path {
    /// A clean path of `mbit` Mbit/s and `rtt_ms` round trip, with a queue
    /// of one round trip (at least a millisecond).
    pub fn new(mbit: f64, rtt_ms: f64) -> Path {
        let rtt = Duration::from_secs_f64(rtt_ms / 1000.0);
        Path {
            rate: mbit * 1e6 / 8.0,
            rtt,
            loss: 0.0,
            queue: rtt.max(Duration::from_millis(1)),
            outages: Vec::new(),
            blackhole: None,
        }
    }

    /// The same, swallowing everything sent from `from` seconds on, while
    /// connections can still be made.
    pub fn blackhole(mut self, from: f64) -> Path {
        self.blackhole = Some(Duration::from_secs_f64(from));
        self
    }

    /// Whether what is sent at `t` is lost.
    fn swallows(&self, t: Duration) -> bool {
        self.is_dark(t) || self.blackhole.is_some_and(|b| t >= b)
    }

    /// The same with random loss (0.01 = 1%).
    pub fn loss(mut self, loss: f64) -> Path {
        self.loss = loss;
        self
    }

    /// The same, dark from `from` to `to` seconds.
    pub fn dark(mut self, from: f64, to: f64) -> Path {
        self.outages
            .push((Duration::from_secs_f64(from), Duration::from_secs_f64(to)));
        self
    }

    fn is_dark(&self, t: Duration) -> bool {
        self.outages.iter().any(|&(a, b)| t >= a && t < b)
    }

    /// What `n` connections can carry: the rate, or under loss their
    /// Mathis bounds.
    pub fn capacity(&self, n: usize) -> f64 {
        if self.loss <= 0.0 {
            return self.rate;
        }
        let rtt = self.rtt.as_secs_f64().max(1e-3);
        let per = 1.22 * MSS / self.loss.sqrt() / rtt;
        self.rate.min(per * n as f64)
    }
}

/// A transfer to simulate.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Ranked paths, best first, each with `threads` connections.
    pub paths: Vec<Path>,
    /// Connections per path.
    pub threads: usize,
    /// Foot size.
    pub foot: usize,
    /// Window in feet.
    pub window: u32,
    /// Pieces per connection.
    pub inflight: usize,
    /// Bytes of input.
    pub bytes: u64,
    /// The input arrives at this rate (bytes per second), or all at once.
    pub source: Option<f64>,
    /// The receiver writes at this rate, or at once.
    pub output: Option<f64>,
    /// `--reconnect-timeout`.
    pub reconnect_timeout: Duration,
    /// Seeds the loss.
    pub seed: u64,
    /// Stop after this much virtual time.
    pub limit: Duration,
    /// `threads auto`: `threads` is the most per path, and the count is
    /// found.
    pub auto: bool,
}

impl Scenario {
    /// The defaults (16 connections, 2 MiB feet, window 64, inflight 2)
    /// over `paths`, moving `bytes`.
    pub fn new(paths: Vec<Path>, bytes: u64) -> Scenario {
        Scenario {
            paths,
            threads: 16,
            foot: 2 << 20,
            window: 64,
            inflight: 2,
            bytes,
            source: None,
            output: None,
            reconnect_timeout: Duration::from_secs(300),
            seed: 1,
            limit: Duration::from_secs(3600),
            auto: false,
        }
    }

    /// The shortest possible time: the bytes over what the paths can carry,
    /// plus the connection set-up.
    pub fn ideal(&self) -> Duration {
        let capacity: f64 = self.paths.iter().map(|p| p.capacity(self.threads)).sum();
        let mut secs = self.bytes as f64 / capacity;
        if let Some(s) = self.source {
            secs = secs.max(self.bytes as f64 / s);
        }
        if let Some(o) = self.output {
            secs = secs.max(self.bytes as f64 / o);
        }
        let rtt = self.paths[0].rtt.as_secs_f64();
        Duration::from_secs_f64(secs + 3.0 * rtt)
    }
}

/// What a simulated transfer did.
#[derive(Debug)]
pub struct Report {
    /// How the schedule ended, if it did within the limit.
    pub outcome: Option<Result<u64, String>>,
    /// Virtual time to the outcome (or the limit).
    pub time: Duration,
    /// Bytes sent on each path (retransmissions included).
    pub sent: Vec<u64>,
    /// Pieces resent, connections closed as stalled, reconnects.
    pub retransmits: u64,
    /// Connections the watchdog closed.
    pub stalls: u64,
    /// Dials that succeeded after the first of each worker.
    pub reconnects: u64,
    /// The most bytes unacknowledged at once before the first
    /// acknowledgement.
    pub committed_before_first_ack: u64,
    /// When the receiver wrote its first byte.
    pub first_output: Option<Duration>,
    /// Connections in use per path at the end.
    pub counts: Vec<usize>,
}

impl Report {
    /// Whether the transfer succeeded with every byte.
    pub fn complete(&self, bytes: u64) -> bool {
        matches!(&self.outcome, Some(Ok(n)) if *n == bytes)
    }
}

/// A splitmix64 generator, for the loss events.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Bytes of one piece on their way.
#[derive(Clone, Copy, Debug)]
struct Seg {
    id: u64,
    len: u64,
    /// Whether these are the piece's last bytes.
    last: bool,
}

#[derive(Debug)]
enum Worker {
    /// Waiting to dial again.
    Backoff { until: Duration, next: Duration },
    /// Dialing; done (or failed) then.
    Dialing { done: Duration, backoff: Duration },
    /// Connected, waiting for the schedule to wake it.
    Idle,
    /// Woken: polls the schedule in this step.
    Woken,
    /// Blocked in a write until the kernel buffer has room.
    Writing,
}

/// One TCP connection (the current one of a worker).
#[derive(Debug, Default)]
struct Conn {
    up: bool,
    /// Which connection of the worker this is, so stale events are dropped.
    generation: u64,
    /// Written by the worker, not yet sent.
    kernel: VecDeque<Seg>,
    unsent: u64,
    /// Sent, arriving at the receiver then.
    air: VecDeque<(Duration, Seg)>,
    cwnd: f64,
    /// The fraction of a byte its share left over from the last step.
    credit: f64,
    /// Last time it had something to send.
    busy_at: Duration,
    /// In a retransmission timeout until then, and the next timeout.
    rto_until: Option<Duration>,
    rto: Duration,
    /// A lost segment holds back what arrives after it until it is
    /// repaired: the receiver gets all of it at once then.
    hold_until: Duration,
    /// Since when nothing it sent has arrived (for the user timeout).
    silent_since: Option<Duration>,
    // The receiver's end of it.
    received: u64,
    told: Option<Duration>,
    /// The piece arriving, and its bytes so far.
    arriving: Option<(u64, u64)>,
}

/// Something that happens at a given time.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Ack {
        w: usize,
        generation: u64,
        id: u64,
    },
    Progress {
        w: usize,
        generation: u64,
        bytes: u64,
    },
    Advance(u64),
}

#[derive(Debug, PartialEq, Eq)]
struct Timed(Duration, u64, Event);

impl Ord for Timed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.0, other.1).cmp(&(self.0, self.1))
    }
}

impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct Sim<'a> {
    sc: &'a Scenario,
    t0: Instant,
    now: Duration,
    schedule: Schedule,
    workers: Vec<Worker>,
    conns: Vec<Conn>,
    path_of: Vec<usize>,
    events: BinaryHeap<Timed>,
    seq: u64,
    rng: Rng,
    /// The input's bytes: chunk `k` is a view of this from `start(k)`.
    base: Shared,
    /// Input read so far, whether all of it is, and whether the reader
    /// waits for room.
    read: u64,
    input_done: bool,
    reader_blocked: bool,
    /// Pieces sent and not yet written by the receiver.
    pieces: BTreeMap<u64, Arc<Foot>>,
    /// Bytes handed to connections, and whether anything was acknowledged.
    handed: u64,
    acked_yet: bool,
    // The receiver.
    rx_complete: std::collections::BTreeSet<u64>,
    rx_delivered: u64,
    rx_written: u64,
    /// Bytes of pieces arrived and not yet written.
    rx_buffered: u64,
    /// Output bytes the receiver may still write in this step.
    rx_budget: f64,
    timer: Option<Instant>,
    report: Report,
}

/// Runs `sc` and reports what happened.
pub fn run(sc: &Scenario) -> Report {
    let t0 = Instant::now();
    let ranks: Vec<usize> = (0..sc.paths.len())
        .flat_map(|r| std::iter::repeat_n(r, sc.threads))
        .collect();
    let params = Params {
        window: sc.window,
        foot_size: sc.foot,
        inflight: sc.inflight,
        reconnect_timeout: sc.reconnect_timeout,
    };
    let n = ranks.len();
    let base: Vec<u8> = (0..2 * sc.foot as u64).map(pattern).collect();
    let mut sim = Sim {
        sc,
        t0,
        now: Duration::ZERO,
        schedule: Schedule::new(params, &ranks, t0),
        workers: (0..n)
            .map(|_| Worker::Backoff {
                until: Duration::ZERO,
                next: BACKOFF_START,
            })
            .collect(),
        conns: (0..n).map(|_| Conn::default()).collect(),
        path_of: ranks,
        events: BinaryHeap::new(),
        seq: 0,
        rng: Rng(sc.seed),
        base: base.into(),
        read: 0,
        input_done: false,
        reader_blocked: false,
        pieces: BTreeMap::new(),
        handed: 0,
        acked_yet: false,
        rx_complete: Default::default(),
        rx_delivered: 0,
        rx_written: 0,
        rx_buffered: 0,
        rx_budget: 0.0,
        timer: None,
        report: Report {
            outcome: None,
            time: Duration::ZERO,
            sent: vec![0; sc.paths.len()],
            retransmits: 0,
            stalls: 0,
            reconnects: 0,
            committed_before_first_ack: 0,
            first_output: None,
            counts: Vec::new(),
        },
    };
    if sc.auto {
        sim.schedule.find_count(t0);
    }
    sim.go();
    let snap = sim.schedule.snapshot();
    sim.report.retransmits = snap.retransmits;
    sim.report.stalls = snap.stalls;
    sim.report.counts = sim.schedule.counts();
    sim.report
}

/// The byte at `i` of the base pattern.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9) >> 13) as u8
}

/// Where chunk `k` starts in the base pattern: chunks differ, so a piece
/// out of place is seen.
fn chunk_start(k: u64, foot: usize) -> usize {
    (k.wrapping_mul(7919) % foot as u64) as usize
}

fn base_rto(path: &Path) -> Duration {
    Duration::from_millis(200).max(path.rtt * 2)
}

impl Sim<'_> {
    fn at(&self) -> Instant {
        self.t0 + self.now
    }

    fn push(&mut self, at: Duration, e: Event) {
        self.seq += 1;
        self.events.push(Timed(at, self.seq, e));
    }

    fn go(&mut self) {
        let trace = std::env::var_os("VM_SIM_TRACE").is_some();
        let mut last = vec![0u64; self.sc.paths.len()];
        while self.now <= self.sc.limit {
            if trace && self.now.subsec_millis() == 0 {
                let snap = self.schedule.snapshot();
                let per: Vec<String> = self
                    .report
                    .sent
                    .iter()
                    .zip(&mut last)
                    .map(|(s, l)| {
                        let d = s - *l;
                        *l = *s;
                        format!("{:.1}", d as f64 * 8e-6)
                    })
                    .collect();
                let mut ranks = vec![(0usize, 0usize); self.sc.paths.len()];
                for (w, n) in snap.inflight.iter().enumerate() {
                    ranks[self.path_of[w]].0 += n;
                    ranks[self.path_of[w]].1 = ranks[self.path_of[w]].1.max(snap.piece[w]);
                }
                eprintln!(
                    "t={:>3} Mbit/s {per:?} written {} ids {}..{} held {} queued {} inflight/maxpiece {ranks:?} stalls {}",
                    self.now.as_secs(),
                    self.rx_written,
                    snap.delivered,
                    self.pieces.keys().last().copied().unwrap_or(0),
                    snap.held,
                    snap.queued,
                    snap.stalls
                );
            }
            self.deliver_events();
            self.timers();
            self.dial();
            self.feed();
            self.poll_workers();
            if self.finished() {
                return;
            }
            self.check_wakes();
            self.transmit();
            self.receive();
            self.now += STEP;
        }
        self.report.time = self.now;
    }

    fn finished(&mut self) -> bool {
        match self.schedule.take_outcome() {
            Some(o) => {
                self.report.outcome = Some(o.map_err(|e: Error| e.to_string()));
                self.report.time = self.now;
                if let Some(Ok(n)) = &self.report.outcome {
                    assert_eq!(*n, self.rx_written, "reported bytes are written bytes");
                }
                true
            }
            None => false,
        }
    }

    /// Carries out what the schedule asks after a call.
    fn effects(&mut self) {
        let e = self.schedule.take_effects();
        for w in e.close {
            self.teardown(w);
        }
        for w in e.wake {
            if matches!(self.workers[w], Worker::Idle) {
                self.workers[w] = Worker::Woken;
            }
        }
        if e.reader {
            self.reader_blocked = false;
        }
        if e.timer {
            self.timer = self.schedule.poll_timeout(self.at());
        }
    }

    fn deliver_events(&mut self) {
        while self.events.peek().is_some_and(|e| e.0 <= self.now) {
            let Timed(_, _, event) = self.events.pop().expect("peeked");
            let now = self.at();
            match event {
                Event::Ack { w, generation, id } => {
                    if self.conns[w].generation == generation {
                        if !self.acked_yet {
                            self.acked_yet = true;
                            self.report.committed_before_first_ack = self.handed;
                        }
                        self.schedule.ack(w, id, now);
                    }
                }
                Event::Progress {
                    w,
                    generation,
                    bytes,
                } => {
                    if self.conns[w].generation == generation && self.conns[w].up {
                        self.schedule.progress(w, bytes, now);
                    }
                }
                Event::Advance(d) => {
                    assert!(self.schedule.advance(d, now), "advance to {d} refused");
                }
            }
            self.effects();
        }
    }

    fn timers(&mut self) {
        if self.timer.is_some_and(|t| t <= self.at()) {
            self.schedule.handle_timeout(self.at());
            self.timer = self.schedule.poll_timeout(self.at());
            self.effects();
        }
    }

    fn dial(&mut self) {
        for w in 0..self.workers.len() {
            let path = &self.sc.paths[self.path_of[w]];
            match self.workers[w] {
                Worker::Backoff { until, next }
                    if self.now >= until && self.schedule.is_enabled(w) =>
                {
                    // The kernel sends the SYN again after 1 s; the connect
                    // times out after 3.
                    let syn = [Duration::ZERO, Duration::from_secs(1)]
                        .into_iter()
                        .map(|d| self.now + d)
                        .find(|&t| !path.is_dark(t));
                    let done = syn.map_or(self.now + CONNECT_TIMEOUT, |t| t + path.rtt * 2);
                    self.workers[w] = Worker::Dialing {
                        done,
                        backoff: next,
                    };
                }
                Worker::Dialing { done, backoff } if self.now >= done => {
                    if path.is_dark(self.now) {
                        self.schedule.attempt_failed(w, self.at());
                        self.workers[w] = Worker::Backoff {
                            until: self.now + backoff,
                            next: (backoff * 2).min(BACKOFF_MAX),
                        };
                    } else {
                        let rto = base_rto(path);
                        let c = &mut self.conns[w];
                        let generation = c.generation + 1;
                        if generation > 1 {
                            self.report.reconnects += 1;
                        }
                        *c = Conn {
                            up: true,
                            generation,
                            cwnd: INITIAL_CWND,
                            busy_at: self.now,
                            rto,
                            ..Conn::default()
                        };
                        // The handshake's reply says how far rx has written.
                        let now = self.at();
                        assert!(self.schedule.advance(self.rx_delivered, now));
                        self.schedule.connected(w, now);
                        self.workers[w] = Worker::Woken;
                    }
                    self.effects();
                }
                _ => {}
            }
        }
    }

    /// The reader admits what the source has produced while there is room;
    /// like the real one, it waits for a whole foot or the end.
    fn feed(&mut self) {
        if self.reader_blocked || self.input_done {
            return;
        }
        let available = match self.sc.source {
            None => self.sc.bytes,
            Some(rate) => ((self.now.as_secs_f64() * rate) as u64).min(self.sc.bytes),
        };
        loop {
            let len = (self.sc.bytes - self.read).min(self.sc.foot as u64);
            let end = self.read + len == self.sc.bytes;
            if self.read + len > available {
                return;
            }
            if !self.schedule.room_for_input() {
                self.reader_blocked = true;
                return;
            }
            let k = self.read / self.sc.foot as u64;
            let mut view = self.base.clone();
            view.split_to(chunk_start(k, self.sc.foot));
            let chunk = view.split_to(len as usize);
            self.read += len;
            self.schedule.admit(chunk, end, self.at());
            self.effects();
            if end {
                self.input_done = true;
                return;
            }
        }
    }

    fn poll_workers(&mut self) {
        loop {
            let mut any = false;
            for w in 0..self.workers.len() {
                if matches!(self.workers[w], Worker::Writing) && self.conns[w].unsent <= SNDBUF {
                    self.workers[w] = Worker::Woken;
                }
                if !matches!(self.workers[w], Worker::Woken) {
                    continue;
                }
                any = true;
                if !self.schedule.is_connected(w) || self.schedule.retired(w) {
                    self.teardown(w);
                    continue;
                }
                match self.schedule.poll_send(w, self.at()) {
                    Some(foot) => self.write(w, foot),
                    None => self.workers[w] = Worker::Idle,
                }
                self.effects();
            }
            if !any || self.schedule.is_finished() {
                return;
            }
        }
    }

    fn write(&mut self, w: usize, foot: Arc<Foot>) {
        assert!(
            foot.id < self.rx_delivered + crate::protocol::id_window(self.sc.window),
            "piece {} sent beyond the receiver's window ({} from {})",
            foot.id,
            self.sc.window,
            self.rx_delivered
        );
        let len = foot.data.len() as u64;
        self.handed += len;
        let c = &mut self.conns[w];
        c.kernel.push_back(Seg {
            id: foot.id,
            len,
            last: true,
        });
        c.unsent += len;
        self.workers[w] = if c.unsent > SNDBUF {
            Worker::Writing
        } else {
            Worker::Woken
        };
        self.pieces.entry(foot.id).or_insert(foot);
    }

    /// No waiting worker may be one the schedule would give a piece.
    fn check_wakes(&self) {
        for (w, state) in self.workers.iter().enumerate() {
            if matches!(state, Worker::Idle) && self.schedule.can_send(w, self.at()) {
                panic!(
                    "lost wake-up: worker {w} waits at {:?} while a piece is there for it",
                    self.now
                );
            }
        }
    }

    /// Closes worker `w`'s connection and has it dial again.
    fn teardown(&mut self, w: usize) {
        let c = &mut self.conns[w];
        c.up = false;
        c.kernel.clear();
        c.unsent = 0;
        c.air.clear();
        c.arriving = None;
        c.generation += 1;
        self.schedule.disconnected(w, self.at());
        self.workers[w] = Worker::Backoff {
            until: self.now + BACKOFF_START,
            next: BACKOFF_START * 2,
        };
    }

    fn transmit(&mut self) {
        let dt = STEP.as_secs_f64();
        for (p, path) in self.sc.paths.iter().enumerate() {
            let dark = path.swallows(self.now);
            let members: Vec<usize> = (0..self.conns.len())
                .filter(|&w| self.path_of[w] == p && self.conns[w].up)
                .collect();
            if dark {
                for &w in &members {
                    let c = &mut self.conns[w];
                    // What is on the wire is lost: it goes back to be resent.
                    while let Some((_, seg)) = c.air.pop_back() {
                        c.unsent += seg.len;
                        push_front_merge(&mut c.kernel, seg);
                    }
                    if c.unsent > 0 {
                        let until = *c.rto_until.get_or_insert(self.now + c.rto);
                        if self.now >= until {
                            c.rto = (c.rto * 2).min(Duration::from_secs(60));
                            c.rto_until = Some(self.now + c.rto);
                        }
                    }
                }
            }
            let saturated_rtt = path.rtt + path.queue;
            let mut demands = Vec::new();
            for &w in &members {
                let c = &mut self.conns[w];
                if c.unsent == 0 {
                    if self.now.saturating_sub(c.busy_at) > Duration::from_secs(1) {
                        c.cwnd = INITIAL_CWND;
                    }
                    continue;
                }
                c.busy_at = self.now;
                if let Some(until) = c.rto_until {
                    if dark || self.now < until {
                        continue;
                    }
                    // The retry after a timeout starts again from one segment.
                    c.rto_until = None;
                    c.cwnd = MSS;
                }
                // The window's rate over the bare round trip: once the
                // demands fill the link, the queue grows instead.
                let cap = c.cwnd / path.rtt.as_secs_f64().max(1e-3);
                demands.push((w, cap.min(c.unsent as f64 / dt)));
            }
            let saturated = demands.iter().map(|d| d.1).sum::<f64>() >= path.rate * 0.999;
            let shares = max_min(path.rate, &demands);
            let delay = if saturated { saturated_rtt } else { path.rtt } / 2;
            let window_cap = if path.loss > 0.0 {
                1.22 * MSS / path.loss.sqrt()
            } else {
                f64::INFINITY
            };
            for (w, rate) in shares {
                let c = &mut self.conns[w];
                let due = c.credit + rate * dt;
                let bytes = (due.floor() as u64).min(c.unsent);
                c.credit = if bytes == c.unsent {
                    0.0
                } else {
                    due - bytes as f64
                };
                if bytes == 0 {
                    continue;
                }
                c.cwnd = (c.cwnd + bytes as f64)
                    .min(window_cap)
                    .min(path.rate * saturated_rtt.as_secs_f64().max(1e-3) * 2.0)
                    .max(MSS);
                self.report.sent[p] += bytes;
                let mut left = bytes;
                while left > 0 {
                    let front = c.kernel.front_mut().expect("unsent bytes are queued");
                    let take = left.min(front.len);
                    let seg = Seg {
                        id: front.id,
                        len: take,
                        last: take == front.len && front.last,
                    };
                    front.len -= take;
                    if front.len == 0 {
                        c.kernel.pop_front();
                    }
                    c.air.push_back((self.now + delay, seg));
                    left -= take;
                }
                // An empty piece (the end of an empty input) goes too.
                while c.kernel.front().is_some_and(|s| s.len == 0) {
                    let seg = c.kernel.pop_front().expect("checked");
                    c.air.push_back((self.now + delay, seg));
                }
                c.unsent -= bytes;
                // A loss holds back what follows it for a round trip (a
                // fast retransmission); now and then it ends in a timeout,
                // a silence, and all that was held arrives at once.
                if path.loss > 0.0 {
                    let losses = bytes as f64 / MSS * path.loss;
                    if self.rng.unit() < losses {
                        let repaired = if self.rng.unit() < RTO_SHARE {
                            c.rto_until = Some(self.now + c.rto);
                            self.now + c.rto + path.rtt / 2
                        } else {
                            self.now + path.rtt
                        };
                        c.hold_until = c.hold_until.max(repaired);
                    }
                }
            }
            // Empty pieces on idle connections leave at once.
            for &w in &members {
                let c = &mut self.conns[w];
                if c.unsent == 0 && !dark {
                    while let Some(seg) = c.kernel.pop_front() {
                        c.air.push_back((self.now + path.rtt / 2, seg));
                    }
                }
            }
        }
    }

    fn receive(&mut self) {
        let dt = STEP.as_secs_f64();
        self.rx_budget = match self.sc.output {
            Some(rate) => (self.rx_budget + rate * dt).min(rate.max(self.sc.foot as f64)),
            None => f64::INFINITY,
        };
        for w in 0..self.conns.len() {
            let path = &self.sc.paths[self.path_of[w]];
            let back = path.rtt / 2;
            let dark = path.swallows(self.now);
            let rto = base_rto(path);
            if !self.conns[w].up {
                continue;
            }
            let mut arrived = false;
            let mut complete = Vec::new();
            let c = &mut self.conns[w];
            let held = self.now < c.hold_until;
            while !held && c.air.front().is_some_and(|(t, _)| *t <= self.now) {
                let (_, seg) = c.air.pop_front().expect("checked");
                arrived = true;
                c.received += seg.len;
                let (id, got) = c.arriving.get_or_insert((seg.id, 0));
                assert_eq!(*id, seg.id, "a connection's bytes arrive in order");
                *got += seg.len;
                if seg.last {
                    complete.push(*id);
                    c.arriving = None;
                }
            }
            let generation = c.generation;
            if arrived {
                c.silent_since = None;
                c.rto = rto;
            }
            let report = arrived && c.told.is_none_or(|t| self.now >= t + PROGRESS_EVERY);
            if report || !complete.is_empty() {
                c.told = Some(self.now);
            }
            let bytes = c.received;
            let stuck = !arrived && !held && (c.unsent > 0 || !c.air.is_empty());
            let silent_since = if stuck {
                Some(*c.silent_since.get_or_insert(self.now))
            } else {
                None
            };
            for id in complete {
                assert!(
                    id < self.rx_delivered + crate::protocol::id_window(self.sc.window),
                    "piece {id} arrived beyond the window"
                );
                if id >= self.rx_delivered && self.rx_complete.insert(id) {
                    self.rx_buffered += self.pieces[&id].data.len() as u64;
                    let foot = self.sc.foot as u64;
                    let limit = (u64::from(self.sc.window) + 2 + self.conns.len() as u64) * foot;
                    assert!(
                        self.rx_buffered <= limit,
                        "the receiver holds {} bytes, more than its bound {limit}",
                        self.rx_buffered
                    );
                }
                if !dark {
                    self.push(self.now + back, Event::Ack { w, generation, id });
                }
            }
            if report && !dark {
                self.push(
                    self.now + back,
                    Event::Progress {
                        w,
                        generation,
                        bytes,
                    },
                );
            }
            if silent_since.is_some_and(|since| self.now >= since + USER_TIMEOUT) {
                // The kernel gives up on the connection.
                self.schedule.note_error("connection timed out".into());
                self.teardown(w);
                self.effects();
            }
        }
        self.write_output();
    }

    fn write_output(&mut self) {
        let before = self.rx_delivered;
        while self.rx_complete.first() == Some(&self.rx_delivered) {
            let id = self.rx_delivered;
            let foot = Arc::clone(&self.pieces[&id]);
            let len = foot.data.len() as u64;
            if (len as f64) > self.rx_budget {
                break;
            }
            self.rx_budget -= len as f64;
            self.check_output(&foot);
            self.rx_complete.remove(&id);
            self.pieces.remove(&id);
            self.rx_buffered -= len;
            self.rx_written += len;
            self.rx_delivered += 1;
            if len > 0 {
                self.report.first_output.get_or_insert(self.now);
            }
            if foot.end {
                assert_eq!(self.rx_written, self.sc.bytes, "the end came early");
            }
        }
        if self.rx_delivered != before {
            let back = self
                .sc
                .paths
                .iter()
                .enumerate()
                .filter(|(p, path)| {
                    !path.swallows(self.now)
                        && (0..self.conns.len()).any(|w| self.path_of[w] == *p && self.conns[w].up)
                })
                .map(|(_, path)| path.rtt / 2)
                .min();
            if let Some(back) = back {
                let d = self.rx_delivered;
                self.push(self.now + back, Event::Advance(d));
            }
        }
    }

    /// A piece written at the current output position holds the input's
    /// bytes for it (its first and last, which place it).
    fn check_output(&self, foot: &Foot) {
        let foot_size = self.sc.foot as u64;
        let at = self.rx_written;
        let k = at / foot_size;
        let within = (at % foot_size) as usize;
        let expect = |i: usize| pattern((chunk_start(k, self.sc.foot) + within + i) as u64);
        if let (Some(&first), Some(&last)) = (foot.data.first(), foot.data.last()) {
            let n = foot.data.len();
            assert!(
                first == expect(0) && last == expect(n - 1),
                "piece {} is not the input at {at}",
                foot.id
            );
        }
    }
}

/// Puts bytes that were lost on the wire back in front of what is queued,
/// joined with the rest of their piece.
fn push_front_merge(kernel: &mut VecDeque<Seg>, seg: Seg) {
    match kernel.front_mut() {
        Some(front) if front.id == seg.id => front.len += seg.len,
        _ => kernel.push_front(seg),
    }
}

/// Shares `rate` max-min fairly among `(who, demand)`.
fn max_min(rate: f64, demands: &[(usize, f64)]) -> Vec<(usize, f64)> {
    let mut order: Vec<(usize, f64)> = demands.to_vec();
    order.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut left = rate;
    let mut out = Vec::with_capacity(order.len());
    for (i, &(w, d)) in order.iter().enumerate() {
        let fair = left / (order.len() - i) as f64;
        let got = d.min(fair);
        left -= got;
        out.push((w, got));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Runs `sc`, asserts it delivered every byte within `factor` of the
    /// ideal time plus `slack`, and returns the report and the ratio.
    fn check(what: &str, sc: &Scenario, factor: f64, slack: Duration) -> (Report, f64) {
        let r = run(sc);
        let ideal = sc.ideal();
        let ratio = r.time.as_secs_f64() / ideal.as_secs_f64();
        assert!(
            r.complete(sc.bytes),
            "{what}: did not complete: {:?} after {:?} (ideal {ideal:?}); {r:?}",
            r.outcome,
            r.time
        );
        assert!(
            r.time <= ideal.mul_f64(factor) + slack,
            "{what}: took {:?}, {ratio:.2} of the ideal {ideal:?} (allowed {factor} + {slack:?}); {r:?}",
            r.time
        );
        (r, ratio)
    }

    #[test]
    fn the_grid_of_rates_connections_and_foot_sizes_completes_near_the_ideal() {
        let mut worst = (0.0, String::new());
        let mut table = String::new();
        for mbit in [1.0, 3.0, 10.0, 27.0, 100.0, 1000.0] {
            for threads in [1, 4, 16, 64] {
                for foot in [256 << 10, 1 << 20, 2 << 20, 8 << 20] {
                    let path = Path::new(mbit, 20.0);
                    // Ten seconds of the link.
                    let bytes = (path.rate * 10.0) as u64;
                    let mut sc = Scenario::new(vec![path], bytes);
                    sc.threads = threads;
                    sc.foot = foot;
                    let what = format!(
                        "{mbit} Mbit/s, {threads} connections, {} KiB feet",
                        foot >> 10
                    );
                    let started = Instant::now();
                    let (r, ratio) = check(&what, &sc, 1.3, Duration::from_secs(3));
                    table += &format!(
                        "{what}: {ratio:.2}, {} stalls, {} resent ({:?} to simulate)\n",
                        r.stalls,
                        r.retransmits,
                        started.elapsed()
                    );
                    assert_eq!(r.stalls, 0, "{what}: a healthy path had stalls");
                    if ratio > worst.0 {
                        worst = (ratio, what);
                    }
                }
            }
        }
        eprintln!("{table}worst: {:.2} at {}", worst.0, worst.1);
    }

    #[test]
    fn round_trips_and_loss_from_none_to_long_and_lossy() {
        let mut table = String::new();
        for mbit in [10.0, 200.0] {
            for rtt in [0.0, 1.0, 50.0, 150.0, 300.0] {
                for loss in [0.0, 0.001, 0.01, 0.02] {
                    let path = Path::new(mbit, rtt).loss(loss);
                    let bytes = ((path.capacity(16) * 15.0) as u64).max(8 * MIB);
                    let sc = Scenario::new(vec![path], bytes);
                    let what = format!("{mbit} Mbit/s, {rtt} ms, {}% loss", loss * 100.0);
                    let (r, ratio) = check(&what, &sc, 1.3, Duration::from_secs(3));
                    table += &format!(
                        "{what}: {ratio:.2}, {} stalls, {} resent\n",
                        r.stalls, r.retransmits
                    );
                }
            }
        }
        eprintln!("{table}");
    }

    #[test]
    fn the_first_pieces_fit_a_slow_path() {
        let sc = Scenario::new(vec![Path::new(1.0, 50.0)], 4 * MIB);
        let (r, _) = check("1 Mbit/s", &sc, 1.3, Duration::from_secs(3));
        assert!(
            r.committed_before_first_ack <= 512 << 10,
            "{} bytes committed before the first acknowledgement",
            r.committed_before_first_ack
        );
        let first = r.first_output.expect("output");
        assert!(
            first < Duration::from_secs(5),
            "first output after {first:?}"
        );
    }
}

#[cfg(test)]
mod faults {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ok(what: &str, sc: &Scenario) -> Report {
        let r = run(sc);
        assert!(
            r.complete(sc.bytes),
            "{what}: did not complete: {:?} after {:?}; {r:?}",
            r.outcome,
            r.time
        );
        r
    }

    #[test]
    fn a_path_that_goes_dark_and_returns_costs_little_more_than_the_outage() {
        for (mbit, rtt) in [(3.0, 50.0), (100.0, 20.0), (200.0, 150.0)] {
            let path = Path::new(mbit, rtt).dark(5.0, 15.0);
            let bytes = (path.rate * 30.0) as u64;
            let sc = Scenario::new(vec![path], bytes);
            let r = ok(&format!("{mbit} Mbit/s dark for 10 s"), &sc);
            let lost = r.time.as_secs_f64() - sc.ideal().as_secs_f64();
            eprintln!(
                "{mbit} Mbit/s, {rtt} ms, dark 10 s: {lost:.1} s lost, {} stalls",
                r.stalls
            );
            assert!(
                lost < 10.0 + 6.0,
                "{mbit} Mbit/s: {lost:.1} s lost to a 10 s outage"
            );
            assert!(
                r.stalls > 0,
                "the dark connections were never found stalled"
            );
        }
    }

    #[test]
    fn a_flapping_path_still_delivers() {
        let mut path = Path::new(50.0, 40.0);
        for i in 0..10 {
            let at = 2.0 + 4.0 * i as f64;
            path = path.dark(at, at + 1.5);
        }
        let bytes = (path.rate * 30.0) as u64;
        let sc = Scenario::new(vec![path], bytes);
        let r = ok("flapping", &sc);
        eprintln!(
            "flapping: {:?} for an ideal {:?}, {} stalls",
            r.time,
            sc.ideal(),
            r.stalls
        );
        // 15 s of 40 are dark; what is left must be used.
        assert!(
            r.time.as_secs_f64() < sc.ideal().as_secs_f64() * 2.2,
            "{r:?}"
        );
    }

    #[test]
    fn one_of_three_ranked_paths_dark_moves_its_share_to_the_others() {
        let paths = vec![
            Path::new(100.0, 20.0).dark(6.0, 16.0),
            Path::new(50.0, 20.0),
            Path::new(20.0, 20.0),
        ];
        let bytes = 384 * MIB;
        let mut sc = Scenario::new(paths, bytes);
        sc.threads = 4;
        let r = ok("three paths, the first dark", &sc);
        let lost = r.time.as_secs_f64() - sc.ideal().as_secs_f64();
        eprintln!(
            "three paths, path 1 dark 10 s: {lost:.1} s lost, sent {:?}",
            r.sent
        );
        // 10 s of 100 of 170 Mbit/s is 5.9 s of the whole.
        assert!(lost < 5.9 + 4.0, "{lost:.1} s lost");
    }

    #[test]
    fn ranked_paths_at_any_connection_count_sum_their_rates() {
        for threads in [1, 2, 4, 8, 12, 16] {
            let paths = vec![
                Path::new(100.0, 20.0),
                Path::new(50.0, 20.0),
                Path::new(20.0, 20.0),
            ];
            let mut sc = Scenario::new(paths, 200 * MIB);
            sc.threads = threads;
            let r = ok("three paths", &sc);
            let ratio = sc.ideal().as_secs_f64() / r.time.as_secs_f64();
            eprintln!(
                "three paths, threads {threads}: {ratio:.2} of the sum, sent {:?}",
                r.sent
            );
            assert!(
                ratio > 0.9,
                "threads {threads}: {ratio:.2} of the paths' sum"
            );
        }
    }

    #[test]
    fn a_lossy_or_slow_first_rank_spills_to_the_next() {
        for (first, what) in [
            (Path::new(100.0, 50.0).loss(0.02), "lossy"),
            (Path::new(1.0, 20.0), "slow"),
        ] {
            let paths = vec![first, Path::new(100.0, 20.0)];
            let sc = Scenario::new(paths, 100 * MIB);
            let r = ok(what, &sc);
            let ratio = sc.ideal().as_secs_f64() / r.time.as_secs_f64();
            eprintln!(
                "{what} first rank: {ratio:.2} of the sum, sent {:?}",
                r.sent
            );
            assert!(
                ratio > 0.85,
                "{what} first rank: {ratio:.2} of the paths' sum"
            );
        }
    }

    #[test]
    fn a_source_the_first_rank_keeps_up_with_stays_on_it() {
        let paths = vec![Path::new(100.0, 20.0), Path::new(50.0, 20.0)];
        let mut sc = Scenario::new(paths, 96 * MIB);
        sc.threads = 4;
        sc.source = Some(60e6 / 8.0);
        let r = ok("paced", &sc);
        let second = r.sent[1] as f64 / (r.sent[0] + r.sent[1]) as f64;
        eprintln!(
            "paced at 60 Mbit/s: {:.1}% on the second rank",
            second * 100.0
        );
        assert!(
            second < 0.01,
            "{:.1}% went to the second rank",
            second * 100.0
        );
    }

    #[test]
    fn a_slow_output_is_no_stall() {
        let mut sc = Scenario::new(vec![Path::new(1000.0, 10.0)], 200 * MIB);
        sc.output = Some(10e6);
        let r = ok("slow output", &sc);
        assert_eq!(r.stalls, 0);
        assert!(
            r.time.as_secs_f64() < sc.ideal().as_secs_f64() * 1.1,
            "{r:?}"
        );
    }

    #[test]
    fn a_path_dark_for_good_gives_up_after_the_timeout() {
        let mut sc = Scenario::new(vec![Path::new(10.0, 20.0).dark(2.0, 1e9)], 100 * MIB);
        sc.reconnect_timeout = Duration::from_secs(60);
        let r = run(&sc);
        match &r.outcome {
            Some(Err(m)) => assert!(m.contains("giving up"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(r.time < Duration::from_secs(2 + 60 + 30), "{:?}", r.time);
    }

    #[test]
    fn connections_that_carry_nothing_give_up_rather_than_loop() {
        let mut sc = Scenario::new(vec![Path::new(10.0, 20.0).blackhole(1.0)], 100 * MIB);
        sc.reconnect_timeout = Duration::from_secs(60);
        let r = run(&sc);
        match &r.outcome {
            Some(Err(m)) => assert!(m.contains("nothing delivered"), "{m}"),
            other => panic!("{other:?} after {:?}", r.time),
        }
        assert!(r.reconnects > 0, "the stalls were never retried");
        assert!(r.time < Duration::from_secs(1 + 60 + 10), "{:?}", r.time);
    }

    #[test]
    fn an_empty_and_a_tiny_input_end() {
        for bytes in [0, 1, 1000] {
            let sc = Scenario::new(vec![Path::new(10.0, 20.0)], bytes);
            ok(&format!("{bytes} bytes"), &sc);
        }
    }
}

#[cfg(test)]
mod auto {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn run_ok(sc: &Scenario) -> Report {
        let r = run(sc);
        assert!(r.complete(sc.bytes), "did not complete: {r:?}");
        r
    }

    fn auto(paths: Vec<Path>, bytes: u64) -> Scenario {
        let mut sc = Scenario::new(paths, bytes);
        sc.threads = 64;
        sc.auto = true;
        sc
    }

    #[test]
    fn a_long_lossy_path_gets_more_connections_and_carries_more() {
        // One stream is held to about 1.3 Mbit/s here (the Mathis bound):
        // sixteen fill a tenth of the link, the count grows past them.
        let path = Path::new(200.0, 150.0).loss(0.005);
        let bytes = 256 * MIB;
        let fixed = run_ok(&Scenario::new(vec![path.clone()], bytes));
        let found = run_ok(&auto(vec![path], bytes));
        eprintln!(
            "200 Mbit/s, 150 ms, 0.5%: threads 16 {:?}, auto {:?} with {:?}",
            fixed.time, found.time, found.counts
        );
        assert_eq!(found.counts, [64]);
        assert!(found.time.as_secs_f64() * 2.0 < fixed.time.as_secs_f64());
    }

    #[test]
    fn clean_paths_keep_a_few_and_lose_nothing_against_the_ideal() {
        for (mbit, rtt) in [
            (1.0, 20.0),
            (3.0, 50.0),
            (10.0, 20.0),
            (100.0, 20.0),
            (1000.0, 2.0),
        ] {
            let path = Path::new(mbit, rtt);
            let bytes = ((path.rate * 20.0) as u64).max(4 * MIB);
            let sc = auto(vec![path], bytes);
            let r = run_ok(&sc);
            let ratio = r.time.as_secs_f64() / sc.ideal().as_secs_f64();
            eprintln!(
                "{mbit} Mbit/s, {rtt} ms: auto {ratio:.2} of ideal, {:?}",
                r.counts
            );
            assert!(ratio < 1.3, "{mbit} Mbit/s: {ratio:.2} of the ideal");
            assert!(
                r.counts[0] <= 16,
                "{mbit} Mbit/s: {:?} connections",
                r.counts
            );
        }
    }

    #[test]
    fn three_ranked_paths_with_a_found_count() {
        let paths = vec![
            Path::new(100.0, 20.0),
            Path::new(50.0, 20.0),
            Path::new(20.0, 20.0),
        ];
        let sc = auto(paths, 384 * MIB);
        let r = run_ok(&sc);
        let ratio = r.time.as_secs_f64() / sc.ideal().as_secs_f64();
        eprintln!("three paths: auto {ratio:.2} of ideal, {:?}", r.counts);
        assert!(ratio < 1.1, "{ratio:.2}");
    }

    #[test]
    fn a_paced_source_does_not_grow_the_count() {
        let mut sc = auto(vec![Path::new(1000.0, 2.0)], 200 * MIB);
        sc.source = Some(20e6);
        let r = run_ok(&sc);
        assert_eq!(r.counts, [crate::tx::count::START], "{r:?}");
    }
}
