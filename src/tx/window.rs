//! The blocking shell over [`Schedule`]: the reader, the workers and the
//! timer thread share one mutex around it, and wait on condition variables
//! for what the schedule says concerns them.
//!
//! Every decision is the schedule's (see its module for the rules). This
//! file only locks, calls it with the time, and carries out the
//! [`Effects`] it returns: waking the reader (room in the window), a worker
//! (a piece it may send, or its connection is gone), the timer thread (an
//! earlier deadline, or the end), and shutting down stalled connections.
//! The one timed wait is the timer thread's, until
//! [`Schedule::poll_timeout`].

pub use super::schedule::Foot;
use super::schedule::{Effects, Params, Schedule, Snapshot};
use crate::error::Error;
use crate::pool::Shared;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a worker is told to do next.
#[derive(Debug)]
pub enum Next {
    /// Send this piece.
    Send(Arc<Foot>),
    /// Your connection was declared lost: reconnect.
    Lost,
    /// The transfer is over (successfully or not): stop.
    Finished,
}

/// Shuts a connection down from outside its threads (how a stalled one is
/// ended).
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

#[derive(Debug)]
struct Inner {
    schedule: Schedule,
    closers: Vec<Option<Closer>>,
    /// The receiver process every connection must reach (the first decides).
    receiver: Option<[u8; 8]>,
    /// Why the transfer was stopped from this side, to tell the receiver.
    cancelled: Option<String>,
    /// What the events last told: bytes delivered, retransmits.
    told: (u64, u64),
}

/// Shared between the reader, the workers and the timer thread.
#[derive(Debug)]
pub struct Window {
    state: Mutex<Inner>,
    /// The timer thread waits here.
    changed: Condvar,
    /// The reader waits here for room in the window.
    room: Condvar,
    /// Worker `w` waits on `workers[w]` for a piece it may send.
    workers: Vec<Condvar>,
    window: u64,
    /// Pieces handed to connections, for `chaos`.
    sends: AtomicU64,
    /// Faults injected by `chaos`.
    faults: AtomicU64,
    /// Where a program embedding the library hears of progress, and what
    /// it was last told (bytes delivered, retransmits).
    events: Option<crate::events::Sink>,
}

/// The most workers a window has room for, destinations added while
/// running included.
pub const MAX_WORKERS: usize = 1024;

impl Window {
    /// A window for workers of the given ranks (at most [`MAX_WORKERS`]),
    /// with room for more to be added up to that.
    pub fn new(params: Params, ranks: &[usize]) -> Window {
        Window {
            state: Mutex::new(Inner {
                schedule: Schedule::new(params, ranks, Instant::now()),
                closers: ranks.iter().map(|_| None).collect(),
                receiver: None,
                cancelled: None,
                told: (0, 0),
            }),
            changed: Condvar::new(),
            room: Condvar::new(),
            workers: (0..MAX_WORKERS.max(ranks.len()))
                .map(|_| Condvar::new())
                .collect(),
            window: u64::from(params.window),
            sends: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            events: None,
        }
    }

    /// Tells `events` of the bytes delivered and the feet sent again as
    /// they change.
    pub fn with_events(mut self, events: Option<crate::events::Sink>) -> Window {
        self.events = events;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking worker ends the run through its guard; the state it
        // leaves is still consistent enough to report and shut down.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the schedule with the time, then does what it asks.
    fn with<T>(&self, f: impl FnOnce(&mut Schedule, Instant) -> T) -> T {
        let mut s = self.lock();
        let out = f(&mut s.schedule, Instant::now());
        self.apply(&mut s);
        out
    }

    fn apply(&self, s: &mut Inner) {
        let Effects {
            wake,
            reader,
            close,
            timer,
            notices,
        } = s.schedule.take_effects();
        for n in notices {
            log::warn!("{n}");
        }
        if let Some(sink) = &self.events {
            use crate::events::Event;
            let now = (s.schedule.delivered_bytes(), s.schedule.retransmits());
            if now.0 != s.told.0 {
                sink.send(Event::Progress { bytes: now.0 });
            }
            if now.1 != s.told.1 {
                sink.send(Event::Retransmits { total: now.1 });
            }
            s.told = now;
        }
        for w in close {
            if let Some(closer) = s.closers[w].take() {
                (closer.0)();
            }
        }
        for w in wake {
            self.workers[w].notify_all();
        }
        if reader {
            self.room.notify_all();
        }
        if timer {
            self.changed.notify_all();
        }
    }

    /// Adds a chunk of input, waiting while the reader is a window ahead of
    /// the receiver. Returns false if the transfer is over.
    pub fn admit(&self, data: Shared, end: bool) -> bool {
        let mut s = self.lock();
        let waiting = Instant::now();
        while !s.schedule.is_finished() && !s.schedule.room_for_input() {
            s = self.room.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        let waited = waiting.elapsed();
        if waited > Duration::from_millis(250) {
            log::debug!("window full for {} ms", waited.as_millis());
        }
        if s.schedule.is_finished() {
            return false;
        }
        s.schedule.admit(data, end, Instant::now());
        self.apply(&mut s);
        true
    }

    /// Waits until worker `w` may send a piece, its connection is lost, or
    /// the transfer is over.
    pub fn next(&self, w: usize) -> Next {
        let mut s = self.lock();
        loop {
            if s.schedule.is_finished() {
                return Next::Finished;
            }
            if !s.schedule.is_connected(w) {
                return Next::Lost;
            }
            if s.schedule.retired(w) {
                // No longer counted (`threads auto`), with nothing left in
                // flight: shut the socket (which ends its acknowledgement
                // reader too) and let the others have its place.
                if let Some(closer) = s.closers[w].take() {
                    (closer.0)();
                }
                s.schedule.disconnected(w, Instant::now());
                self.apply(&mut s);
                return Next::Lost;
            }
            let piece = s.schedule.poll_send(w, Instant::now());
            self.apply(&mut s);
            if let Some(foot) = piece {
                return Next::Send(foot);
            }
            s = self.workers[w].wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// rx has piece `id` (on worker `w`'s connection).
    pub fn ack(&self, w: usize, id: u64) {
        self.with(|s, now| s.ack(w, id, now));
    }

    /// rx has had `bytes` in all on worker `w`'s connection.
    pub fn progress(&self, w: usize, bytes: u64) {
        self.with(|s, now| s.progress(w, bytes, now));
    }

    /// rx has written every piece below `delivered`; false if that is more
    /// than was ever sent.
    pub fn advance(&self, delivered: u64) -> bool {
        self.with(|s, now| s.advance(delivered, now))
    }

    /// Worker `w` has a working connection, which `closer` shuts down.
    pub fn connected(&self, w: usize, closer: Closer) {
        let mut s = self.lock();
        s.closers[w] = Some(closer);
        s.schedule.connected(w, Instant::now());
        self.apply(&mut s);
    }

    /// Worker `w` lost its connection: its pieces go to the others. Safe to
    /// call more than once.
    pub fn disconnected(&self, w: usize) {
        let mut s = self.lock();
        s.closers[w] = None;
        s.schedule.disconnected(w, Instant::now());
        self.apply(&mut s);
    }

    /// Worker `w`'s attempt to connect failed.
    pub fn attempt_failed(&self, w: usize) {
        self.with(|s, now| s.attempt_failed(w, now));
    }

    /// `threads auto`: start with a few connections per destination and
    /// find the count (see the schedule).
    pub fn find_count(&self) {
        self.with(|s, now| s.find_count(now));
    }

    /// A destination joins as rank `at` with `slots` connections, named
    /// `name`; returns the new workers' indexes, or `None` if the window
    /// has no room for so many workers.
    pub fn insert_rank(
        &self,
        at: usize,
        slots: usize,
        name: String,
    ) -> Option<std::ops::Range<usize>> {
        let mut s = self.lock();
        if s.closers.len() + slots > self.workers.len() {
            return None;
        }
        let range = s.schedule.insert_rank(at, slots, name, Instant::now());
        s.closers.resize_with(range.end, || None);
        self.apply(&mut s);
        Some(range)
    }

    /// Rank `rank` gets `n` connections more; `None` if there is no room.
    pub fn add_slots(&self, rank: usize, n: usize) -> Option<std::ops::Range<usize>> {
        let mut s = self.lock();
        if s.closers.len() + n > self.workers.len() {
            return None;
        }
        let range = s.schedule.add_slots(rank, n, Instant::now());
        s.closers.resize_with(range.end, || None);
        self.apply(&mut s);
        Some(range)
    }

    /// Limits rank `rank`'s connections (see [`Schedule::set_limit`]).
    pub fn set_limit(&self, rank: usize, limit: Option<usize>) {
        self.with(|s, now| s.set_limit(rank, limit, now));
    }

    /// How long work has been outstanding without progress, if it is.
    pub fn stuck_for(&self) -> Option<Duration> {
        self.lock().schedule.stuck_since().map(|t| t.elapsed())
    }

    /// Rank `rank`'s connections, in use or not.
    pub fn rank_slots(&self, rank: usize) -> usize {
        self.lock().schedule.rank_slots(rank)
    }

    /// Waits until worker `w` may connect; false if the transfer is over.
    /// `parked` is told once, if it must wait.
    pub fn wait_enabled(&self, w: usize, parked: impl FnOnce()) -> bool {
        let mut s = self.lock();
        let mut parked = Some(parked);
        loop {
            if s.schedule.is_finished() {
                return false;
            }
            if s.schedule.is_enabled(w) {
                return true;
            }
            if let Some(tell) = parked.take() {
                tell();
            }
            s = self.workers[w].wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Bytes rx has written (for the progress display, without the
    /// allocations of a whole snapshot).
    pub fn delivered_bytes(&self) -> u64 {
        self.lock().schedule.delivered_bytes()
    }

    /// Names each rank's destination, for what the user is told.
    pub fn name_ranks(&self, names: Vec<String>) {
        self.with(|s, _| s.name_ranks(names));
    }

    /// The receiver dials in (reverse mode); see [`Schedule::accepting`].
    pub fn accepting(&self) {
        self.with(|s, _| s.accepting());
    }

    /// Checks that a connection reached the same receiver process as every
    /// connection before it (the first one decides). A different one means
    /// the destinations lead to different receivers, or the receiver was
    /// restarted and lost pieces it had acknowledged: the stream cannot go on.
    pub fn same_receiver(&self, id: [u8; 8]) -> bool {
        *self.lock().receiver.get_or_insert(id) == id
    }

    /// Remembers why the latest connection attempt failed, for the message
    /// given if the transfer is abandoned.
    pub fn note_error(&self, e: String) {
        self.with(|s, _| s.note_error(e));
    }

    /// A connection attempt was refused by a peer that did not prove the
    /// key: it ends the transfer only if nothing but such refusals comes at
    /// the start (see the schedule).
    pub fn refused(&self, why: String) {
        self.with(|s, now| s.refused(why, now));
    }

    /// A destination's name does not resolve, or what answers is not a
    /// receiver (see the schedule).
    pub fn unreachable(&self, why: String) {
        self.with(|s, now| s.unreachable(why, now));
    }

    /// Ends the transfer: `Ok(bytes)` when rx confirmed everything, or the
    /// error that stopped it. The first outcome wins.
    pub fn finish(&self, outcome: Result<u64, Error>) {
        self.with(|s, _| s.finish(outcome));
    }

    /// Stops the transfer from this side with `error`; the workers tell the
    /// receiver `reason` on their way out, so it stops at once too.
    pub fn cancel(&self, reason: String, error: Error) {
        let mut s = self.lock();
        if !s.schedule.is_finished() {
            s.cancelled = Some(reason);
        }
        s.schedule.finish(Err(error));
        self.apply(&mut s);
    }

    /// Why the transfer was stopped from this side, if it was.
    pub fn cancelled(&self) -> Option<String> {
        self.lock().cancelled.clone()
    }

    /// Whether the piece about to be sent is the one `chaos every` picks to
    /// cut: every `every`-th piece sent, counted over all connections.
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
        self.lock().schedule.is_finished()
    }

    /// The timer thread: handles the schedule's deadlines (stalled
    /// connections, giving up, waits that end by themselves) until the
    /// outcome, and returns it.
    pub fn outcome(&self) -> Result<u64, Error> {
        let mut s = self.lock();
        loop {
            let now = Instant::now();
            s.schedule.handle_timeout(now);
            self.apply(&mut s);
            if let Some(outcome) = s.schedule.take_outcome() {
                return outcome;
            }
            s = match s.schedule.poll_timeout(now) {
                None => self.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    self.changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Counters for the stats report.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().schedule.snapshot()
    }

    /// The window size in feet.
    pub fn size(&self) -> u64 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(window: u32) -> Params {
        Params {
            window,
            foot_size: 1024,
            inflight: 2,
            reconnect_timeout: Duration::from_millis(50),
        }
    }

    #[test]
    fn the_reader_waits_for_the_window_and_stops_when_finished() {
        let w = Arc::new(Window::new(params(2), &[0]));
        assert!(w.admit(vec![0; 1024].into(), false));
        assert!(w.admit(vec![1; 1024].into(), false));
        let w2 = Arc::clone(&w);
        let reader = std::thread::spawn(move || w2.admit(vec![2; 1024].into(), false));
        w.finish(Ok(0));
        assert!(!reader.join().unwrap(), "admitted after the end");
    }

    #[test]
    fn a_worker_is_given_a_piece_and_told_when_its_connection_is_gone() {
        let w = Arc::new(Window::new(params(8), &[0]));
        w.connected(0, Closer::new(|| {}));
        let w2 = Arc::clone(&w);
        let worker = std::thread::spawn(move || w2.next(0));
        w.admit(vec![7; 100].into(), true);
        match worker.join().unwrap() {
            Next::Send(f) => assert_eq!((f.id, f.data.len(), f.end), (0, 100, true)),
            other => panic!("{other:?}"),
        }
        let w2 = Arc::clone(&w);
        let worker = std::thread::spawn(move || w2.next(0));
        w.disconnected(0);
        assert!(matches!(worker.join().unwrap(), Next::Lost));
    }

    #[test]
    fn the_timer_thread_gives_up_without_connections() {
        let w = Window::new(params(2), &[0]);
        w.note_error("connect: refused".into());
        match w.outcome() {
            Err(Error::GaveUp(m)) => assert!(m.contains("refused"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(w.is_finished());
    }
}
