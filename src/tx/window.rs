//! The window of unacknowledged feet, and the scheduler that hands them to
//! connections.
//!
//! Every foot read from stdin stays here until rx acknowledges it. Workers
//! *pull*: a connection is given a foot only while it has fewer than
//! `inflight` feet unacknowledged, so a faster connection (acknowledged
//! sooner) carries more, and a connection to a lower-ranked destination is
//! given a foot only when every live connection of a better rank is full,
//! or the foot has waited for one long enough to show they are saturated
//! (a connection in the middle of writing a foot has room by the count,
//! yet cannot take one).
//! At the end of the input the rule turns around: a connection leaves the
//! queued feet to connections at least twice as fast when those would carry
//! all of them before it could carry one (each connection's pace is its own
//! smoothed time from hand-out to acknowledgement). Otherwise the last feet
//! of a transfer over a fast and a slow path would crawl over the slow one
//! while the fast one sat idle.
//! The end of the input also changes what is handed out: the feet not yet
//! sent are cut into pieces, renumbered from the first of them, each the
//! asking connection's share of what is left. The pieces shrink as the end
//! nears, so the connections finish together; whole 2 MiB feet would leave
//! the transfer waiting for the last of them to crawl over one loss-limited
//! connection while the others sat idle.
//! Flow control: the reader may not run more than `window` feet ahead of what
//! rx has written, which bounds memory on both sides. When a connection is
//! lost, its unacknowledged feet go back to the queue at once, lowest id
//! first, so the foot the receiver is waiting for is resent first.
//!
//! A connection can also stall without failing, when its path goes dark:
//! TCP keeps retrying, with exponential backoff, for as long as the path is
//! gone, and would notice it is back only at its next retry, many seconds
//! later. A watchdog (`watch`, run by the thread waiting for the outcome)
//! declares a connection lost when it has had feet in flight and no
//! acknowledgement for three of its typical foot times (at least a second;
//! ten before its first acknowledgement): its socket is shut down, its feet
//! go to the others at once, and its worker dials again, which succeeds
//! within a few seconds of the path's return.
//!
//! One mutex, and a condition variable for each kind of waiter: the reader
//! (room in the window), each worker (a foot it may send) and the main
//! thread (the outcome). A change wakes only the waiters it may concern, who
//! re-check their condition: an acknowledgement frees room on one
//! connection, so it wakes one worker, not all sixteen. The only timers are
//! the watchdog's round every 100 ms, and workers waiting for the start's
//! grace or a foot's patience to run out.

use crate::error::Error;
use crate::pool::Shared;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long after the start a destination's first connection attempt holds
/// back worse-ranked destinations: long enough for a reachable one to
/// connect, short enough that an unreachable one costs little.
const FIRST_ATTEMPT_GRACE: Duration = Duration::from_secs(1);

/// A connection is stalled after at least this long without an
/// acknowledgement while it has feet in flight.
const STALL_MIN: Duration = Duration::from_secs(1);

/// The same for a connection that has not had a foot acknowledged yet.
const STALL_FIRST: Duration = Duration::from_secs(10);

/// A foot waiting this long for a connection of the best rank with room
/// goes to a worse rank: the better ones are saturated.
const SPILL_PATIENCE: Duration = Duration::from_millis(500);

/// How often the watchdog looks for stalled feet.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// The smallest piece the tail of the input is cut into: small enough that
/// the last pieces cross a loss-limited connection in a fraction of a second,
/// large enough that a piece still fills a fast one between acknowledgements.
const MIN_PIECE: usize = 256 << 10;

/// A numbered slice of the input.
#[derive(Debug, PartialEq, Eq)]
pub struct Foot {
    /// Sequence number, from 0.
    pub id: u64,
    /// The payload.
    pub data: Shared,
    /// Whether it ends the stream.
    pub end: bool,
}

/// What the scheduling rule allows a worker.
enum Pick {
    /// Send this foot.
    Foot(u64),
    /// Nothing yet: wait for a change, or until then at the latest.
    Wait(Option<Instant>),
}

/// What a worker is told to do next.
#[derive(Debug)]
pub enum Next {
    /// Send this foot.
    Send(Arc<Foot>),
    /// Your connection was declared lost: reconnect.
    Lost,
    /// The transfer is over (successfully or not): stop.
    Finished,
}

#[derive(Debug)]
struct Slot {
    rank: usize,
    connected: bool,
    /// Still on its first connection attempt.
    first_attempt: bool,
    /// Unacknowledged feet and when each was handed to this connection.
    inflight: Vec<(u64, Instant)>,
    /// The last acknowledgement (or the connection's start).
    last_ack: Instant,
    /// Shuts the connection's socket down, waking its threads.
    closer: Option<Closer>,
    /// Smoothed time from handing a foot to this worker to its
    /// acknowledgement (paths differ, so each worker has its own).
    typical: Option<Duration>,
}

/// Shuts a connection down from outside its threads (the watchdog's way of
/// ending a stalled one).
pub struct Closer(Box<dyn Fn() + Send>);

impl Closer {
    /// A closer that runs `f`.
    pub fn new(f: impl Fn() + Send + 'static) -> Closer {
        Closer(Box::new(f))
    }
}

impl std::fmt::Debug for Closer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Closer")
    }
}

impl Slot {
    fn has_room(&self, inflight: usize) -> bool {
        self.connected && self.inflight.len() < inflight
    }
}

#[derive(Debug)]
struct State {
    feet: BTreeMap<u64, Arc<Foot>>,
    /// Feet waiting for a connection, and since when.
    queue: BTreeMap<u64, Instant>,
    slots: Vec<Slot>,
    delivered: u64,
    connected: usize,
    /// When the last connection was lost (or the start, before the first).
    lost_since: Option<Instant>,
    last_error: Option<String>,
    finished: bool,
    outcome: Option<Result<u64, Error>>,
    retransmits: u64,
    receiver: Option<[u8; 8]>,
    /// Why the user stopped the transfer, to tell the receiver.
    cancelled: Option<String>,
    /// The next foot id: one more than the highest admitted, or cut from
    /// the tail.
    admitted: u64,
    /// Connections the watchdog found stalled.
    stalls: u64,
    /// The last foot has been admitted: what is queued is all there is.
    input_done: bool,
    /// One more than the highest foot id handed to a connection; no foot
    /// from here on has been sent.
    sent_below: u64,
    /// Once the input has ended: the feet never sent, each with when it was
    /// queued, to be cut into pieces numbered from `admitted`.
    tail: VecDeque<(Shared, Instant)>,
}

/// A snapshot for the stats report.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Feet read and not yet written by rx: the window's occupancy.
    pub ahead: u64,
    /// Feet held (read, not yet acknowledged).
    pub held: usize,
    /// Feet waiting for a connection.
    pub queued: usize,
    /// Every foot below this has been written by rx.
    pub delivered: u64,
    /// Feet resent after a connection was lost (or found stalled).
    pub retransmits: u64,
    /// Connections found stalled (and closed) by the watchdog.
    pub stalls: u64,
    /// Unacknowledged feet per worker.
    pub inflight: Vec<usize>,
    /// Live connections.
    pub connected: usize,
}

/// Shared between the reader, the workers and the main thread.
#[derive(Debug)]
pub struct Window {
    state: Mutex<State>,
    /// The main thread waits here for the outcome.
    changed: Condvar,
    /// The reader waits here for room in the window.
    room: Condvar,
    /// Worker `w` waits on `workers[w]` for a foot it may send.
    workers: Vec<Condvar>,
    window: u64,
    inflight: usize,
    /// Until then, a destination still on its first connection attempt holds
    /// back the worse-ranked ones.
    grace_until: Instant,
    /// Feet handed to connections, for `chaos`.
    sends: AtomicU64,
    /// Faults injected by `chaos`.
    faults: AtomicU64,
}

impl Window {
    /// A window of `window` feet for workers of the given ranks, each
    /// allowed `inflight` unacknowledged feet.
    pub fn new(window: u32, inflight: u32, ranks: &[usize]) -> Window {
        let slots = ranks
            .iter()
            .map(|&rank| Slot {
                rank,
                connected: false,
                first_attempt: true,
                inflight: Vec::new(),
                last_ack: Instant::now(),
                closer: None,
                typical: None,
            })
            .collect();
        Window {
            state: Mutex::new(State {
                feet: BTreeMap::new(),
                queue: BTreeMap::new(),
                slots,
                delivered: 0,
                connected: 0,
                lost_since: Some(Instant::now()),
                last_error: None,
                finished: false,
                outcome: None,
                retransmits: 0,
                receiver: None,
                cancelled: None,
                admitted: 0,
                stalls: 0,
                input_done: false,
                sent_below: 0,
                tail: VecDeque::new(),
            }),
            changed: Condvar::new(),
            room: Condvar::new(),
            workers: ranks.iter().map(|_| Condvar::new()).collect(),
            window: u64::from(window),
            inflight: inflight as usize,
            grace_until: Instant::now() + FIRST_ATTEMPT_GRACE,
            sends: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking worker ends the run through its guard; the state it
        // leaves is still consistent enough to report and shut down.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every waiter: for the rare changes (connections made or lost,
    /// the end of the transfer) that may concern anyone.
    fn wake_all(&self) {
        self.changed.notify_all();
        self.room.notify_all();
        for c in &self.workers {
            c.notify_all();
        }
    }

    /// Wakes the workers that could take a foot now: only a connection with
    /// room can.
    fn wake_with_room(&self, s: &State) {
        for (slot, c) in s.slots.iter().zip(&self.workers) {
            if slot.has_room(self.inflight) {
                c.notify_all();
            }
        }
    }

    /// Adds a foot read from the input, waiting while it would run more than
    /// a window ahead of the receiver. Returns false if the transfer is over.
    pub fn admit(&self, foot: Foot) -> bool {
        let mut s = self.lock();
        let waiting = Instant::now();
        while !s.finished && foot.id >= s.delivered + self.window {
            s = self.room.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        let waited = waiting.elapsed();
        if waited > Duration::from_millis(250) {
            log::debug!(
                "window full for {} ms waiting for foot {}",
                waited.as_millis(),
                foot.id.saturating_sub(self.window)
            );
        }
        if s.finished {
            return false;
        }
        s.queue.insert(foot.id, Instant::now());
        s.admitted = s.admitted.max(foot.id + 1);
        s.input_done |= foot.end;
        let end = foot.end;
        s.feet.insert(foot.id, Arc::new(foot));
        if end {
            Self::open_tail(&mut s);
        }
        self.wake_with_room(&s);
        true
    }

    /// Waits until worker `w` may send a foot, its connection is lost, or the
    /// transfer is over.
    pub fn next(&self, w: usize) -> Next {
        let mut s = self.lock();
        loop {
            if s.finished {
                return Next::Finished;
            }
            if !s.slots[w].connected {
                return Next::Lost;
            }
            let now = Instant::now();
            let cut = s.slots[w].has_room(self.inflight) && self.cut(&mut s);
            let wake = match self.pick(&s, w, now) {
                Pick::Foot(id) => {
                    s.queue.remove(&id);
                    s.slots[w].inflight.push((id, now));
                    s.sent_below = s.sent_below.max(id + 1);
                    return Next::Send(Arc::clone(&s.feet[&id]));
                }
                Pick::Wait(wake) => wake,
            };
            if cut {
                // The piece is for another connection.
                self.wake_with_room(&s);
            }
            // The grace for first attempts, and a queued foot's patience,
            // end by themselves: wake up for them.
            let me = &self.workers[w];
            s = match wake {
                None => me.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(at) => {
                    me.wait_timeout(s, at.saturating_duration_since(now))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// The scheduling rule: which queued foot worker `w` may send now, if
    /// any. It needs room. A connection of a better rank that has room, or
    /// may have soon (its first attempt to connect, for a moment after the
    /// start), goes first, unless the foot has waited longer than
    /// `SPILL_PATIENCE`: then the better ranks are saturated, whatever their
    /// counts say.
    fn pick(&self, s: &State, w: usize, now: Instant) -> Pick {
        let me = &s.slots[w];
        if s.queue.is_empty() || !me.has_room(self.inflight) {
            return Pick::Wait(None);
        }
        if s.input_done && self.faster_finish_first(s, w) {
            return Pick::Wait(None);
        }
        let in_grace = now < self.grace_until;
        let better_first = s.slots.iter().any(|o| {
            o.rank < me.rank && (o.has_room(self.inflight) || (o.first_attempt && in_grace))
        });
        if !better_first {
            return Pick::Foot(*s.queue.keys().next().expect("queue checked non-empty"));
        }
        // The lowest foot that has waited long enough; or wake up when the
        // first one will have (or when the start's grace ends).
        if let Some((&id, _)) = s
            .queue
            .iter()
            .find(|(_, &since)| now >= since + SPILL_PATIENCE)
        {
            return Pick::Foot(id);
        }
        let patience = s.queue.values().min().map(|&since| since + SPILL_PATIENCE);
        let grace = in_grace.then_some(self.grace_until);
        Pick::Wait(patience.into_iter().chain(grace).min())
    }

    /// At the end of the input, takes the feet never sent out of the queue
    /// again: they are handed out in pieces instead (see `cut`), renumbered
    /// from the first of them. Nothing with those ids has left, so the
    /// receiver never sees one id carry two different payloads.
    fn open_tail(s: &mut State) {
        for id in s.sent_below..s.admitted {
            let foot = s.feet.remove(&id).expect("a foot never sent is held");
            let since = s.queue.remove(&id).expect("a foot never sent is queued");
            s.tail.push_back((foot.data.clone(), since));
        }
        s.admitted = s.sent_below;
    }

    /// Cuts the next piece off the tail of the input into the queue, when
    /// the queue is empty and the window has room for one more id. A piece
    /// is the asking connection's share of what is left (each connection
    /// keeps `inflight` pieces), at least `MIN_PIECE` and at most what is
    /// left of one foot: the pieces shrink as the end nears, so connections
    /// finish together instead of waiting for the last whole foot to crawl
    /// over one loss-limited connection. Returns whether it cut one.
    fn cut(&self, s: &mut State) -> bool {
        if !s.queue.is_empty() || s.tail.is_empty() || s.admitted >= s.delivered + self.window {
            return false;
        }
        let left: usize = s.tail.iter().map(|(p, _)| p.len()).sum();
        let share = (left / (self.inflight * s.connected.max(1))).max(MIN_PIECE);
        let (front, since) = s.tail.front_mut().expect("tail checked non-empty");
        let since = *since;
        let piece = if front.len() < share + MIN_PIECE {
            s.tail.pop_front().expect("tail checked non-empty").0
        } else {
            front.split_to(share)
        };
        // The end foot may be empty: it goes with the piece before it.
        while s.tail.front().is_some_and(|(p, _)| p.is_empty()) {
            s.tail.pop_front();
        }
        let id = s.admitted;
        s.admitted += 1;
        let end = s.tail.is_empty();
        s.feet.insert(
            id,
            Arc::new(Foot {
                id,
                data: piece,
                end,
            }),
        );
        s.queue.insert(id, since);
        true
    }

    /// At the end of the input: whether the connections markedly faster
    /// than `w` would carry every queued foot before `w` could carry one.
    /// Then `w` leaves them the rest; a foot given to a slow path at the end
    /// would be the last to arrive, and the whole transfer would wait for it.
    fn faster_finish_first(&self, s: &State, w: usize) -> bool {
        let me = &s.slots[w];
        let Some(typical) = me.typical else {
            return false;
        };
        // `typical` spans `inflight` feet sent back to back.
        let cap = self.inflight as f64;
        let mine = typical.as_secs_f64() * (me.inflight.len() + 1) as f64 / cap;
        // What is left of the tail counts in whole feet, as it was read.
        let (mut rate, mut feet) = (0.0, s.queue.len() + s.tail.len());
        for (j, o) in s.slots.iter().enumerate() {
            match o.typical {
                Some(t) if j != w && o.connected && t * 2 < typical => {
                    rate += cap / t.as_secs_f64();
                    feet += o.inflight.len();
                }
                _ => {}
            }
        }
        rate > 0.0 && feet as f64 / rate < mine
    }

    /// No slot is on a first connection attempt (when the receiver dials).
    pub fn skip_first_attempts(&self) {
        for slot in &mut self.lock().slots {
            slot.first_attempt = false;
        }
    }

    /// Worker `w`'s attempt to connect failed.
    pub fn attempt_failed(&self, w: usize) {
        self.lock().slots[w].first_attempt = false;
        self.wake_all();
    }

    /// rx has received foot `id` (on worker `w`'s connection).
    pub fn ack(&self, w: usize, id: u64) {
        let mut s = self.lock();
        let now = Instant::now();
        let slot = &mut s.slots[w];
        if let Some(&(_, since)) = slot.inflight.iter().find(|&&(i, _)| i == id) {
            let sample = now - since;
            slot.typical = Some(match slot.typical {
                Some(t) => (t * 7 + sample) / 8,
                None => sample,
            });
        }
        slot.inflight.retain(|&(i, _)| i != id);
        slot.last_ack = now;
        s.feet.remove(&id);
        s.queue.remove(&id);
        if s.input_done {
            // The end-of-input rule weighs every connection's pace.
            self.wake_with_room(&s);
        } else {
            self.workers[w].notify_all();
        }
    }

    /// rx has written every foot below `delivered`.
    pub fn advance(&self, delivered: u64) {
        let mut s = self.lock();
        if delivered <= s.delivered {
            return;
        }
        s.delivered = delivered;
        // Written feet need no acknowledgement any more.
        s.feet = s.feet.split_off(&delivered);
        s.queue = s.queue.split_off(&delivered);
        let mut freed = false;
        for slot in &mut s.slots {
            let before = slot.inflight.len();
            slot.inflight.retain(|&(i, _)| i >= delivered);
            freed |= slot.inflight.len() < before;
        }
        self.room.notify_all();
        // Room on a connection whose acknowledgement has not come yet, or
        // room in the window for the next piece of the tail.
        if freed || !s.tail.is_empty() {
            self.wake_with_room(&s);
        }
    }

    /// Worker `w` has a working connection.
    pub fn connected(&self, w: usize) {
        let mut s = self.lock();
        s.slots[w].first_attempt = false;
        s.slots[w].last_ack = Instant::now();
        if !s.slots[w].connected {
            s.slots[w].connected = true;
            s.connected += 1;
            s.lost_since = None;
        }
        drop(s);
        self.wake_all();
    }

    /// How worker `w`'s connection can be shut down from outside.
    pub fn set_closer(&self, w: usize, closer: Closer) {
        self.lock().slots[w].closer = Some(closer);
    }

    /// Worker `w` lost its connection: its unacknowledged feet are queued
    /// for another. Safe to call more than once.
    pub fn disconnected(&self, w: usize) {
        let mut s = self.lock();
        if Self::disconnect(&mut s, w) {
            drop(s);
            self.wake_all();
        }
    }

    /// Marks `w` disconnected and requeues its feet; false if it already was.
    fn disconnect(s: &mut State, w: usize) -> bool {
        if !s.slots[w].connected {
            return false;
        }
        s.slots[w].connected = false;
        s.slots[w].closer = None;
        s.connected -= 1;
        if s.connected == 0 {
            s.lost_since = Some(Instant::now());
        }
        let now = Instant::now();
        let lost = std::mem::take(&mut s.slots[w].inflight);
        for (id, _) in lost {
            if s.feet.contains_key(&id) {
                s.queue.insert(id, now);
                s.retransmits += 1;
            }
        }
        true
    }

    /// Checks that a connection reached the same receiver process as every
    /// connection before it (the first one decides). A different one means
    /// the destinations lead to different receivers, or the receiver was
    /// restarted and lost feet it had acknowledged: the stream cannot go on.
    pub fn same_receiver(&self, id: [u8; 8]) -> bool {
        *self.lock().receiver.get_or_insert(id) == id
    }

    /// Remembers why the latest connection attempt failed, for the message
    /// given if the transfer is abandoned.
    pub fn note_error(&self, e: String) {
        self.lock().last_error = Some(e);
    }

    /// Ends the transfer: `Ok(bytes)` when rx confirmed everything, or the
    /// error that stopped it. The first outcome wins.
    pub fn finish(&self, outcome: Result<u64, Error>) {
        let mut s = self.lock();
        if !s.finished {
            s.finished = true;
            s.outcome = Some(outcome);
        }
        drop(s);
        self.wake_all();
    }

    /// Stops the transfer because the user asked (`sig`); workers tell the
    /// receiver why on their way out.
    pub fn cancel(&self, sig: i32) {
        self.lock().cancelled = Some(format!("stopped by {}", crate::error::signal_name(sig)));
        self.finish(Err(Error::Interrupted(sig)));
    }

    /// Why the user stopped the transfer, if they did.
    pub fn cancelled(&self) -> Option<String> {
        self.lock().cancelled.clone()
    }

    /// Whether the foot about to be sent is the one `chaos every` picks to
    /// cut: every `every`-th foot sent, counted over all connections.
    pub fn chaos_strikes(&self, every: u64) -> bool {
        let n = self.sends.fetch_add(1, Ordering::Relaxed) + 1;
        let strike = n % every == 0;
        if strike {
            self.faults.fetch_add(1, Ordering::Relaxed);
        }
        strike
    }

    /// Faults `chaos` injected.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Whether the transfer is over.
    pub fn is_finished(&self) -> bool {
        self.lock().finished
    }

    /// The watchdog: closes connections that have stalled (see the module's
    /// description) and requeues their feet. Returns how many it closed.
    fn watch(&self, s: &mut State, now: Instant) -> usize {
        let mut closed = 0;
        for w in 0..s.slots.len() {
            let slot = &s.slots[w];
            let Some(&(_, oldest)) = slot.inflight.first() else {
                continue;
            };
            // Until its first acknowledgement, nothing says how slow this
            // path is: only a long silence counts.
            let stall = slot.typical.map_or(STALL_FIRST, |t| (t * 3).max(STALL_MIN));
            let silent = now.saturating_duration_since(oldest.max(slot.last_ack));
            if slot.connected && silent > stall {
                log::info!(
                    "worker {w}: no acknowledgement for {:.1} s: connection stalled, reconnecting",
                    silent.as_secs_f64()
                );
                if let Some(closer) = &slot.closer {
                    (closer.0)();
                }
                Self::disconnect(s, w);
                s.stalls += 1;
                closed += 1;
            }
        }
        closed
    }

    /// Waits for the outcome, running the watchdog meanwhile. Gives up when
    /// no connection has been alive for `reconnect_timeout`.
    pub fn outcome(&self, reconnect_timeout: Duration) -> Result<u64, Error> {
        let mut s = self.lock();
        let mut watched = Instant::now();
        loop {
            if let Some(o) = s.outcome.take() {
                return o;
            }
            if watched.elapsed() >= WATCH_EVERY {
                watched = Instant::now();
                if self.watch(&mut s, watched) > 0 {
                    self.wake_all();
                }
            }
            match s.lost_since {
                None => {
                    s = self
                        .changed
                        .wait_timeout(s, WATCH_EVERY)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                Some(since) => {
                    let deadline = since + reconnect_timeout;
                    let now = Instant::now();
                    if now >= deadline {
                        let why = s
                            .last_error
                            .clone()
                            .unwrap_or_else(|| "no connection".into());
                        s.finished = true;
                        drop(s);
                        self.wake_all();
                        return Err(Error::GaveUp(format!(
                            "no connection to the receiver for {} s, giving up (last error: {why})",
                            reconnect_timeout.as_secs()
                        )));
                    }
                    s = self
                        .changed
                        .wait_timeout(s, (deadline - now).min(WATCH_EVERY))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Counters for the stats report.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            ahead: s.admitted.saturating_sub(s.delivered),
            held: s.feet.len(),
            queued: s.queue.len() + s.tail.len(),
            delivered: s.delivered,
            retransmits: s.retransmits,
            stalls: s.stalls,
            inflight: s.slots.iter().map(|x| x.inflight.len()).collect(),
            connected: s.connected,
        }
    }

    /// The window size in feet.
    pub fn size(&self) -> u64 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn foot(id: u64) -> Foot {
        Foot {
            id,
            data: vec![id as u8].into(),
            end: false,
        }
    }

    fn sent(n: Next) -> u64 {
        match n {
            Next::Send(f) => f.id,
            other => panic!("expected a foot, got {other:?}"),
        }
    }

    #[test]
    fn lost_feet_are_resent_lowest_first() {
        let w = Window::new(8, 2, &[0, 0]);
        w.connected(0);
        w.connected(1);
        for id in 0..4 {
            assert!(w.admit(foot(id)));
        }
        assert_eq!(sent(w.next(0)), 0);
        assert_eq!(sent(w.next(0)), 1);
        assert_eq!(sent(w.next(1)), 2);
        w.disconnected(0);
        assert!(matches!(w.next(0), Next::Lost));
        assert_eq!(sent(w.next(1)), 0);
        w.ack(1, 2);
        assert_eq!(sent(w.next(1)), 1);
        assert_eq!(w.snapshot().retransmits, 2);
    }

    #[test]
    fn lower_rank_gets_feet_only_when_better_ranks_are_full() {
        let w = Window::new(8, 1, &[0, 1]);
        w.connected(0);
        w.connected(1);
        for id in 0..3 {
            w.admit(foot(id));
        }
        // Rank 1 must wait while rank 0 has room.
        let s = w.lock();
        assert!(matches!(w.pick(&s, 1, Instant::now()), Pick::Wait(Some(_))));
        drop(s);
        assert_eq!(sent(w.next(0)), 0);
        assert_eq!(sent(w.next(1)), 1);
        w.ack(0, 0);
        let s = w.lock();
        assert!(
            matches!(w.pick(&s, 1, Instant::now()), Pick::Wait(_)),
            "rank 0 has room again"
        );
        drop(s);
        // A dead better rank does not hold back the next one.
        w.disconnected(0);
        w.ack(1, 1);
        assert_eq!(sent(w.next(1)), 2);
    }

    /// Two connected workers of one rank, taking 100 ms and 2 s per foot.
    fn fast_and_slow() -> Window {
        let w = Window::new(64, 2, &[0, 0]);
        w.connected(0);
        w.connected(1);
        let mut s = w.lock();
        s.slots[0].typical = Some(Duration::from_millis(100));
        s.slots[1].typical = Some(Duration::from_secs(2));
        drop(s);
        w
    }

    fn admit_all(w: &Window, ids: std::ops::Range<u64>, last: Option<u64>) {
        for id in ids {
            w.admit(Foot {
                end: Some(id) == last,
                ..foot(id)
            });
        }
    }

    #[test]
    fn at_the_end_a_slow_connection_leaves_the_last_feet_to_faster_ones() {
        let w = fast_and_slow();
        // More input may come: the slow connection takes its share.
        admit_all(&w, 0..3, None);
        assert_eq!(sent(w.next(1)), 0);
        // The rest is known; the fast one carries 20 feet a second, and
        // would be done with these long before the slow one with one more.
        admit_all(&w, 3..4, Some(3));
        let mut s = w.lock();
        assert!(w.cut(&mut s));
        assert!(matches!(w.pick(&s, 1, Instant::now()), Pick::Wait(None)));
        assert!(matches!(w.pick(&s, 0, Instant::now()), Pick::Foot(1)));
    }

    #[test]
    fn at_the_end_a_slow_connection_still_carries_what_the_fast_cannot() {
        let w = fast_and_slow();
        // 40 feet take the fast one two seconds: both carry.
        admit_all(&w, 0..40, Some(39));
        assert_eq!(sent(w.next(1)), 0);
        // A connection not markedly faster does not count either.
        w.lock().slots[0].typical = Some(Duration::from_millis(1500));
        let mut s = w.lock();
        assert!(w.cut(&mut s));
        assert!(matches!(w.pick(&s, 1, Instant::now()), Pick::Foot(1)));
    }

    /// Foot `id` of `len` bytes, each telling where it stands in the input.
    fn numbered(id: u64, len: usize, end: bool) -> Foot {
        let at = id as usize * (2 << 20);
        let data: Vec<u8> = (at..at + len).map(|i| (i % 251) as u8).collect();
        Foot {
            id,
            data: data.into(),
            end,
        }
    }

    #[test]
    fn the_tail_of_the_input_goes_in_shrinking_pieces_and_ends_once() {
        let foot = 2 << 20;
        let w = Window::new(64, 2, &[0]);
        w.connected(0);
        w.admit(numbered(0, foot, false));
        w.admit(numbered(1, foot, false));
        assert_eq!(sent(w.next(0)), 0);
        for id in 2..7 {
            w.admit(numbered(id, foot, false));
        }
        w.admit(numbered(7, foot / 2, true));
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let Next::Send(f) = w.next(0) else {
                panic!("the stream ended without its end foot");
            };
            assert_eq!(f.id, sizes.len() as u64 + 1, "ids run on without a gap");
            got.extend_from_slice(&f.data);
            sizes.push(f.data.len());
            w.ack(0, f.id);
            w.advance(f.id + 1);
            if f.end {
                break;
            }
        }
        // Foot 1, queued before the end was known, was cut like the rest.
        let want: Vec<u8> = (foot..7 * foot + foot / 2)
            .map(|i| (i % 251) as u8)
            .collect();
        assert!(got == want, "the pieces put together are the input");
        assert!(sizes.windows(2).all(|p| p[1] <= p[0]), "{sizes:?}");
        assert_eq!(sizes[0], foot, "far from the end, pieces are whole feet");
        assert_eq!(sizes[sizes.len() - 2..], [MIN_PIECE; 2], "{sizes:?}");
        assert!(sizes.len() > 8);
    }

    #[test]
    fn the_tail_waits_for_room_in_the_window_and_keeps_sent_ids() {
        let w = Window::new(4, 4, &[0]);
        w.connected(0);
        for id in 0..3 {
            w.admit(numbered(id, 2 << 20, id == 2));
        }
        // Foot 0 left before the end was known; 1 and 2 are cut anew.
        assert_eq!(sent(w.next(0)), 0);
        assert_eq!(sent(w.next(0)), 1);
        assert_eq!(sent(w.next(0)), 2);
        assert_eq!(sent(w.next(0)), 3);
        let mut s = w.lock();
        assert!(!w.cut(&mut s), "ids 0 to 3 fill a window of four");
        drop(s);
        w.ack(0, 0);
        w.advance(1);
        let mut s = w.lock();
        assert!(w.cut(&mut s));
        assert!(s.feet.contains_key(&4));
    }

    #[test]
    fn a_foot_that_waited_long_enough_spills_to_a_worse_rank() {
        let w = Window::new(8, 2, &[0, 1]);
        w.connected(0);
        w.connected(1);
        w.admit(foot(0));
        let s = w.lock();
        let now = Instant::now();
        assert!(matches!(w.pick(&s, 1, now), Pick::Wait(Some(_))));
        // Rank 0 has room by the count, but nobody there took the foot.
        let later = now + SPILL_PATIENCE + Duration::from_millis(1);
        assert!(matches!(w.pick(&s, 1, later), Pick::Foot(0)));
    }

    #[test]
    fn a_stalled_connection_is_closed_and_its_feet_go_to_the_others() {
        let w = Window::new(8, 2, &[0, 1]);
        w.connected(0);
        w.connected(1);
        let closed = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&closed);
        w.set_closer(
            0,
            Closer::new(move || {
                c.fetch_add(1, Ordering::Relaxed);
            }),
        );
        for id in 0..3 {
            w.admit(foot(id));
        }
        assert_eq!(sent(w.next(0)), 0);
        assert_eq!(sent(w.next(0)), 1);
        let mut s = w.lock();
        assert_eq!(w.watch(&mut s, Instant::now()), 0, "not stalled yet");
        // Rank 0 is full, so rank 1 may take the next foot.
        assert!(matches!(w.pick(&s, 1, Instant::now()), Pick::Foot(2)));
        let later = Instant::now() + STALL_FIRST * 2;
        assert_eq!(w.watch(&mut s, later), 1);
        assert_eq!(
            closed.load(Ordering::Relaxed),
            1,
            "its socket was shut down"
        );
        drop(s);
        assert!(matches!(w.next(0), Next::Lost));
        // Its feet are first in line for the other connection.
        assert_eq!(sent(w.next(1)), 0);
        assert_eq!(sent(w.next(1)), 1);
        let snap = w.snapshot();
        assert_eq!((snap.stalls, snap.retransmits), (1, 2));
        // Reconnected, it takes feet again.
        w.connected(0);
        assert_eq!(sent(w.next(0)), 2);
    }

    #[test]
    fn a_better_rank_still_connecting_holds_back_the_next_one() {
        let w = Window::new(8, 1, &[0, 1]);
        w.connected(1);
        w.admit(foot(0));
        let s = w.lock();
        assert!(
            matches!(w.pick(&s, 1, Instant::now()), Pick::Wait(_)),
            "rank 0 is still on its first attempt"
        );
        drop(s);
        w.attempt_failed(0);
        assert_eq!(sent(w.next(1)), 0);
    }

    #[test]
    fn reader_waits_for_the_window_and_stops_when_finished() {
        let w = Arc::new(Window::new(2, 2, &[0]));
        assert!(w.admit(foot(0)));
        assert!(w.admit(foot(1)));
        let w2 = Arc::clone(&w);
        let reader = std::thread::spawn(move || w2.admit(foot(2)));
        w.advance(1);
        assert!(reader.join().unwrap());
        assert_eq!(w.snapshot().held, 2);
        let w2 = Arc::clone(&w);
        let reader = std::thread::spawn(move || w2.admit(foot(5)));
        w.finish(Ok(0));
        assert!(!reader.join().unwrap());
    }

    #[test]
    fn gives_up_without_connections() {
        let w = Window::new(2, 2, &[0]);
        w.note_error("connect: refused".into());
        match w.outcome(Duration::from_millis(10)) {
            Err(Error::GaveUp(m)) => assert!(m.contains("refused")),
            other => panic!("{other:?}"),
        }
        assert!(w.is_finished());
    }
}
