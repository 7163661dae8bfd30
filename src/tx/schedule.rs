//! The send scheduler as a state machine without I/O: which connection
//! carries which piece of the input, when a connection has stalled, and when
//! the transfer is over. Every method takes `now`; nothing here sleeps,
//! locks or touches a socket. [`super::window::Window`] is the blocking
//! shell the threads use, and `crate::sim` drives this same type over
//! simulated links with a virtual clock.
//!
//! **Pieces.** The reader admits the input in chunks (a foot each); a
//! connection asking for work is given a *piece* cut off the front of what is
//! unsent, numbered on from the last one. A piece is as large as its
//! connection has shown it can carry in a couple of seconds: each connection
//! starts at [`INITIAL_PIECE`] and doubles while its pieces come back within
//! [`GROW_BELOW`] of being handed out (up to the foot size), and halves when
//! one takes longer than [`SHRINK_ABOVE`]. On a fast path every piece is a
//! whole foot after a few round trips; on a 1 Mbit/s path shared by sixteen
//! connections, pieces are a few KiB and the first acknowledgement comes
//! after seconds, not minutes. Once the input has ended, pieces are also at
//! most the asking connection's share of what is left (at least
//! [`MIN_TAIL`]), so the connections finish together. A piece, once cut,
//! keeps its id and bytes until the receiver has it.
//!
//! **Who gets a piece.** A connection may take one while it has fewer than
//! `inflight` unacknowledged (or less than it delivers in two of its round
//! trips: small feet on a long fat path), and while its destination (its
//! *rank*) has
//! fewer unacknowledged bytes than it has shown it can deliver in
//! [`BUDGET_TIME`] (at least [`START_BUDGET`]): at the start, a few
//! connections carry the first pieces, and more join as acknowledgements show
//! the path carries more. A worse rank gets a piece only while no connection
//! of a better rank has room, or when the piece has waited [`SPILL_PATIENCE`]
//! for one (a connection busy writing has room by the count, yet cannot take
//! a piece: the wait is what shows its rank is saturated). At the end of the
//! input, a connection leaves the rest to connections more than twice as
//! fast when they would carry all of it before it could carry one more.
//!
//! **Liveness.** The receiver reports, every so often, the bytes it has
//! received on each connection, and acknowledges each piece. A connection
//! with pieces in flight and no such sign for several of its usual gaps
//! between signs (between [`STALL_MIN`] and [`STALL_MAX`]; [`STALL_FIRST`]
//! before it has shown any) is stalled: it is closed and its pieces go to the
//! others. However slowly a connection moves, it is never stalled while it
//! moves. The transfer gives up after `reconnect_timeout` without any
//! connection, or with work outstanding and no progress at all; a reconnect
//! is not progress, so it can never loop forever.
//!
//! **Flow control.** The reader may not run more than `window` feet of bytes
//! ahead of what the receiver has written, which bounds memory on both
//! sides; a piece is cut only while its id is less than
//! [`crate::protocol::IDS_PER_FOOT`] windows ahead, so a slow path's small
//! pieces do not hold up a fast path for want of ids. A lost connection's pieces go back to the queue at
//! once, lowest id first.
//!
//! **Effects.** What the shell must do after a call (wake a worker, the
//! reader or the timer thread; close a stalled connection) collects in
//! [`Effects`], taken with [`Schedule::take_effects`]. Timers are one query,
//! [`Schedule::poll_timeout`], and one call, [`Schedule::handle_timeout`].

use crate::error::Error;
use crate::pool::Shared;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long after the start a destination's first connection attempt holds
/// back worse-ranked destinations.
pub const FIRST_ATTEMPT_GRACE: Duration = Duration::from_secs(1);
/// A piece waiting this long for a better rank goes to a worse one.
pub const SPILL_PATIENCE: Duration = Duration::from_millis(500);
/// A new connection's first pieces.
pub const INITIAL_PIECE: usize = 64 << 10;
/// The smallest piece a slow connection is given.
pub const MIN_PIECE: usize = 16 << 10;
/// The smallest piece the end of the input is cut into for its share.
pub const MIN_TAIL: usize = 256 << 10;
/// A piece acknowledged this soon after it was handed out doubles its
/// connection's piece size.
pub const GROW_BELOW: Duration = Duration::from_secs(2);
/// A piece that took longer halves it.
pub const SHRINK_ABOVE: Duration = Duration::from_secs(8);
/// Unacknowledged bytes a destination may have before it has shown a rate.
pub const START_BUDGET: u64 = 256 << 10;
/// A destination may have this many seconds of its delivery rate
/// unacknowledged.
pub const BUDGET_TIME: f64 = 8.0;
/// Silence that stalls a connection that has not yet shown how often it
/// speaks.
pub const STALL_FIRST: Duration = Duration::from_secs(5);
/// The shortest silence that stalls a connection.
pub const STALL_MIN: Duration = Duration::from_secs(2);
/// The longest silence a connection is allowed, however irregular it is.
pub const STALL_MAX: Duration = Duration::from_secs(30);
/// Refusals from receivers that did not prove the key end the transfer
/// only while no connection was ever made, and only once they have gone on
/// this long: a peer that has not proved the key may be anyone, and a
/// stranger must not end a stream, but a user whose receiver refuses (busy,
/// another checkphrase, no key) hears it within seconds.
pub const REFUSAL_GRACE: Duration = Duration::from_secs(3);
/// How often a wait for the receiver is told again.
pub const NOTICE_EVERY: Duration = Duration::from_secs(30);
/// How long a start without any connection may be quiet: the wait is told
/// then even while some attempt is still on its way (a handshake with a
/// listener that never answers, say).
pub const QUIET_START: Duration = Duration::from_secs(3);
/// A connection is stalled after this many of its usual gaps without a sign.
const STALL_GAPS: u32 = 6;
/// At the very end, an idle connection sends a copy of a piece lagging on
/// another destination's connection only if the copy would arrive in less
/// than this share of the time the original still needs.
const COPY_GAIN: f64 = 0.5;
/// Beyond `inflight` pieces, a connection may have what it delivers in this
/// many of its shortest piece times unacknowledged: with small feet on a
/// long fat path two pieces do not fill the pipe, and on a short one this
/// is less than two pieces, so nothing more piles up in socket buffers.
pub const ALLOWANCE_RTTS: f64 = 2.0;

/// A numbered piece of the input.
#[derive(Debug, PartialEq, Eq)]
pub struct Foot {
    /// Sequence number, from 0.
    pub id: u64,
    /// The payload.
    pub data: Shared,
    /// Whether it ends the stream.
    pub end: bool,
}

/// The fixed parameters of one transfer.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Ids a piece may run ahead of the receiver's written position; also
    /// the read-ahead, in feet.
    pub window: u32,
    /// The largest piece (and the reader's chunk).
    pub foot_size: usize,
    /// Unacknowledged pieces per connection.
    pub inflight: usize,
    /// Give up after this long without a connection, or without progress.
    pub reconnect_timeout: Duration,
}

/// What the shell must do after a call.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Workers that may now be able to take a piece (or must see that their
    /// connection is lost, or that the transfer is over).
    pub wake: Vec<usize>,
    /// The reader may have room for more input.
    pub reader: bool,
    /// Connections found stalled: shut their sockets down.
    pub close: Vec<usize>,
    /// The timer thread must look again: the transfer is over, or the
    /// earliest deadline moved closer.
    pub timer: bool,
    /// What the user must be told (at the default verbosity): waits for the
    /// receiver, destinations that cannot be reached, their return.
    pub notices: Vec<String>,
}

/// A snapshot for reports.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Read and not yet written by rx, in feet (rounded up).
    pub ahead: u64,
    /// Pieces held: read, cut, not yet acknowledged.
    pub held: usize,
    /// Pieces waiting for a connection, and unsent input in feet.
    pub queued: usize,
    /// Every piece below this id has been written by rx.
    pub delivered: u64,
    /// Bytes rx has written.
    pub delivered_bytes: u64,
    /// Pieces resent after a connection was lost (or found stalled).
    pub retransmits: u64,
    /// Connections found stalled and closed.
    pub stalls: u64,
    /// Pieces copied onto a faster path at the end.
    pub copies: u64,
    /// Unacknowledged pieces per worker.
    pub inflight: Vec<usize>,
    /// Each worker's current piece size.
    pub piece: Vec<usize>,
    /// Live connections.
    pub connected: usize,
    /// Each worker's rank.
    pub rank: Vec<usize>,
    /// Whether each worker may take pieces (not drained, not left out by
    /// the count of `threads auto`).
    pub enabled: Vec<bool>,
    /// Each worker's smoothed delivery rate while busy, bytes per second.
    pub rate: Vec<Option<f64>>,
    /// Each rank's limit set by the operator (`Some(0)`: drained).
    pub limits: Vec<Option<usize>>,
}

#[derive(Debug)]
struct Slot {
    rank: usize,
    /// In use (with `threads auto`, only as many as the count says).
    enabled: bool,
    connected: bool,
    /// Still on its first connection attempt.
    first_attempt: bool,
    /// Unacknowledged pieces.
    inflight: Vec<Sent>,
    /// The size of the next piece, learnt from the last ones.
    piece: usize,
    /// Smoothed delivery rate in bytes per second while busy.
    rate: Option<f64>,
    /// Bytes acknowledged on this connection so far.
    acked: u64,
    /// Its shortest time from hand-out to acknowledgement (drifting up
    /// slowly, so it follows a path that gets longer).
    quickest: Option<Duration>,
    /// The last sign of progress, or when the connection last became busy.
    heard: Instant,
    /// Smoothed gap between signs of progress while busy.
    gap: Option<Duration>,
    /// The byte count the receiver last reported for this connection.
    progress: u64,
}

/// A piece handed to a connection.
#[derive(Clone, Copy, Debug)]
struct Sent {
    id: u64,
    len: usize,
    /// When it was handed out.
    at: Instant,
    /// The connection's acknowledged bytes then.
    acked: u64,
}

impl Slot {
    fn new(rank: usize, piece: usize, now: Instant) -> Slot {
        Slot {
            rank,
            enabled: true,
            connected: false,
            first_attempt: true,
            inflight: Vec::new(),
            piece,
            rate: None,
            acked: 0,
            quickest: None,
            heard: now,
            gap: None,
            progress: 0,
        }
    }

    fn inflight_bytes(&self) -> u64 {
        self.inflight.iter().map(|p| p.len as u64).sum()
    }

    /// How long this connection may be silent with pieces in flight.
    fn stall_limit(&self) -> Duration {
        match self.gap {
            None => STALL_FIRST,
            Some(g) => (g * STALL_GAPS).clamp(STALL_MIN, STALL_MAX),
        }
    }
}

/// Unsent input, with when it was admitted (for the spill patience).
#[derive(Debug)]
struct Chunk {
    data: Shared,
    since: Instant,
}

/// Where the piece for a worker comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Take {
    /// A piece already cut, waiting to be (re)sent.
    Queued(u64),
    /// A new piece off the front of the unsent input.
    Cut,
    /// A copy of a piece lagging on a much slower path, at the very end.
    Copy(u64),
}

/// The scheduler of one transfer.
#[derive(Debug)]
pub struct Schedule {
    params: Params,
    slots: Vec<Slot>,
    /// Unacknowledged bytes per rank.
    rank_inflight: Vec<u64>,
    ranks: usize,
    /// Pieces cut and not yet acknowledged.
    held: BTreeMap<u64, Arc<Foot>>,
    /// Held pieces waiting for a connection, and since when.
    queue: BTreeMap<u64, Instant>,
    /// Input not yet cut into pieces.
    unsent: VecDeque<Chunk>,
    unsent_bytes: u64,
    /// The next piece id.
    next_id: u64,
    /// Every piece below this id has been written by rx.
    delivered: u64,
    /// End offsets in the input of the pieces from `delivered` on.
    ends: VecDeque<u64>,
    bytes_read: u64,
    bytes_delivered: u64,
    /// The last chunk has been admitted.
    input_done: bool,
    /// The piece that ends the stream has been cut.
    end_cut: bool,
    connected: usize,
    /// When the last connection was lost (or the start, before the first).
    lost_since: Option<Instant>,
    /// The last progress, or when work became outstanding.
    motion: Instant,
    /// Whether work is outstanding: pieces unacknowledged, or input that
    /// could be cut.
    stuck: bool,
    grace_until: Instant,
    last_error: Option<String>,
    /// Whether any connection was ever made.
    ever_connected: bool,
    /// Whether refusals may end the transfer at the start (not when the
    /// receiver dials in: whoever dials may be a stranger).
    refusals_end: bool,
    /// Refused since then, the latest refusal, and whether a receiver
    /// said it (not a name that does not resolve, or a peer that is not a
    /// receiver), while no connection ever was made.
    refused: Option<(Instant, String, bool)>,
    finished: bool,
    outcome: Option<Result<u64, Error>>,
    retransmits: u64,
    stalls: u64,
    /// Pieces sent a second time at the end, over a faster path.
    copied: std::collections::BTreeSet<u64>,
    copies: u64,
    effects: Effects,
    woken: Vec<bool>,
    /// The deadline the timer thread was last given.
    armed: Option<Instant>,
    /// When the user was last told that no connection is up.
    waiting_told: Option<Instant>,
    /// When the transfer started.
    started: Instant,
    /// Each rank's destination, for notices.
    rank_names: Vec<String>,
    /// Ranks the user was told cannot be reached.
    rank_down: Vec<bool>,
    /// `threads auto`: how many of each rank's connections are in use.
    count: Option<super::count::Count>,
    /// Bytes acknowledged on each rank so far.
    rank_acked: Vec<u64>,
    /// The operator's limit on each rank's connections (`drain`,
    /// `threads N`): `Some(0)` takes no new pieces.
    limits: Vec<Option<usize>>,
}

impl Schedule {
    /// A schedule for workers of the given ranks (one entry per worker).
    pub fn new(params: Params, ranks: &[usize], now: Instant) -> Schedule {
        let initial = INITIAL_PIECE.min(params.foot_size).max(1);
        let slots: Vec<Slot> = ranks
            .iter()
            .map(|&rank| Slot::new(rank, initial, now))
            .collect();
        let nranks = ranks.iter().max().map_or(0, |&r| r + 1);
        Schedule {
            params,
            woken: vec![false; slots.len()],
            slots,
            rank_inflight: vec![0; nranks],
            ranks: nranks,
            held: BTreeMap::new(),
            queue: BTreeMap::new(),
            unsent: VecDeque::new(),
            unsent_bytes: 0,
            next_id: 0,
            delivered: 0,
            ends: VecDeque::new(),
            bytes_read: 0,
            bytes_delivered: 0,
            input_done: false,
            end_cut: false,
            connected: 0,
            lost_since: Some(now),
            motion: now,
            stuck: false,
            grace_until: now + FIRST_ATTEMPT_GRACE,
            last_error: None,
            ever_connected: false,
            refusals_end: true,
            refused: None,
            finished: false,
            outcome: None,
            retransmits: 0,
            stalls: 0,
            copied: Default::default(),
            copies: 0,
            effects: Effects::default(),
            armed: None,
            waiting_told: None,
            started: now,
            rank_names: Vec::new(),
            rank_down: vec![false; nranks],
            count: None,
            rank_acked: vec![0; nranks],
            limits: vec![None; nranks],
        }
    }

    /// `threads auto`: each rank's slots are at most how many connections it
    /// may use; start with a few and find the count (see [`super::count`]).
    pub fn find_count(&mut self, now: Instant) {
        let max: Vec<usize> = (0..self.ranks)
            .map(|r| self.slots.iter().filter(|s| s.rank == r).count())
            .collect();
        self.count = Some(super::count::Count::new(&max, now));
        self.enable_counted();
        self.settle(now);
    }

    /// Enables the first slots of each rank, as many as its count (`threads
    /// auto`) and the operator's limit allow, and disables the rest: a
    /// disabled slot gets no more pieces, and once its last is
    /// acknowledged its connection closes ([`Self::retired`]).
    fn enable_counted(&mut self) {
        let mut seen = vec![0usize; self.ranks];
        for slot in &mut self.slots {
            let r = slot.rank;
            let counted = self.count.as_ref().map_or(usize::MAX, |c| c.active(r));
            let enabled = seen[r] < counted.min(self.limits[r].unwrap_or(usize::MAX));
            seen[r] += 1;
            if !enabled && !slot.connected {
                // Not dialing is not a failed first attempt.
                slot.first_attempt = false;
            }
            slot.enabled = enabled;
        }
        self.wake_all();
    }

    /// A new destination joins as rank `at` (0 is the most preferred; the
    /// ranks from `at` on move one down) with `slots` connections. Returns
    /// the new workers' indexes.
    pub fn insert_rank(
        &mut self,
        at: usize,
        slots: usize,
        name: String,
        now: Instant,
    ) -> std::ops::Range<usize> {
        let at = at.min(self.ranks);
        for slot in &mut self.slots {
            if slot.rank >= at {
                slot.rank += 1;
            }
        }
        self.rank_inflight.insert(at, 0);
        self.rank_down.insert(at, false);
        self.rank_acked.insert(at, 0);
        self.limits.insert(at, None);
        if self.rank_names.len() >= at {
            self.rank_names.insert(at, name);
        }
        self.ranks += 1;
        if let Some(count) = &mut self.count {
            count.insert(at, slots, now);
        }
        self.add_slots(at, slots, now)
    }

    /// Adds `n` connections to rank `rank`; returns their workers' indexes.
    pub fn add_slots(&mut self, rank: usize, n: usize, now: Instant) -> std::ops::Range<usize> {
        let first = self.slots.len();
        let piece = INITIAL_PIECE.min(self.params.foot_size).max(1);
        for _ in 0..n {
            self.slots.push(Slot::new(rank, piece, now));
            self.woken.push(false);
        }
        let total = self.rank_slots(rank);
        if let Some(count) = &mut self.count {
            count.grow(rank, total);
        }
        self.enable_counted();
        self.settle(now);
        first..self.slots.len()
    }

    /// Sets the operator's limit on rank `rank`'s connections: `Some(0)`
    /// drains it (no new pieces; its connections close once their pieces
    /// are acknowledged), `None` lifts the limit.
    pub fn set_limit(&mut self, rank: usize, limit: Option<usize>, now: Instant) {
        self.limits[rank] = limit;
        if limit != Some(0) {
            // Its connections are tried again: a first attempt once more.
            for s in self
                .slots
                .iter_mut()
                .filter(|s| s.rank == rank && !s.connected)
            {
                s.first_attempt = true;
            }
            self.rank_down[rank] = false;
        }
        self.enable_counted();
        self.settle(now);
    }

    /// The number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Each rank's connections (slots), in use or not.
    pub fn rank_slots(&self, rank: usize) -> usize {
        self.slots.iter().filter(|s| s.rank == rank).count()
    }

    /// Whether worker `w` may connect and take pieces.
    pub fn is_enabled(&self, w: usize) -> bool {
        self.slots[w].enabled
    }

    /// Whether worker `w` should close its connection: disabled by the
    /// count, with nothing left unacknowledged.
    pub fn retired(&self, w: usize) -> bool {
        let s = &self.slots[w];
        !s.enabled && s.connected && s.inflight.is_empty()
    }

    /// Connections in use per rank (all of them without `threads auto`).
    pub fn counts(&self) -> Vec<usize> {
        (0..self.ranks)
            .map(|r| {
                self.slots
                    .iter()
                    .filter(|s| s.rank == r && s.enabled)
                    .count()
            })
            .collect()
    }

    /// Names each rank's destination, for what the user is told.
    pub fn name_ranks(&mut self, names: Vec<String>) {
        self.rank_names = names;
    }

    fn rank_name(&self, rank: usize) -> String {
        self.rank_names
            .get(rank)
            .cloned()
            .unwrap_or_else(|| format!("rank {}", rank + 1))
    }

    fn why(&self) -> String {
        self.last_error
            .clone()
            .unwrap_or_else(|| "no connection has finished its handshake yet".into())
    }

    /// Tells the user, once, that no connection is up and why the last
    /// attempt failed.
    fn tell_waiting(&mut self, now: Instant) {
        if self.finished || self.connected > 0 || self.waiting_told.is_some() {
            return;
        }
        let timeout = self.params.reconnect_timeout;
        let left = self.lost_since.map_or(timeout, |t| {
            timeout.saturating_sub(now.saturating_duration_since(t))
        });
        let left = crate::stats::human_duration(left);
        let notice = match self.refusals_end {
            true => format!(
                "waiting for the receiver: {}; trying again for {left}",
                self.why()
            ),
            // The receiver dials in (reverse mode).
            false => format!("waiting for the receiver to connect; giving up in {left}"),
        };
        self.effects.notices.push(notice);
        self.waiting_told = Some(now);
    }

    /// Tells the user about ranks none of whose connections could be made
    /// while others carry the stream.
    fn check_ranks(&mut self) {
        // A receiver that dials in chooses its ranks: none is "down".
        if self.ranks < 2 || self.connected == 0 || self.finished || !self.refusals_end {
            return;
        }
        for rank in 0..self.ranks {
            let mut of_rank = self.slots.iter().filter(|s| s.rank == rank);
            let drained = self.limits[rank] == Some(0);
            let down = !drained
                && !self.rank_down[rank]
                && of_rank.all(|s| !s.connected && !s.first_attempt);
            if down {
                self.rank_down[rank] = true;
                let notice = format!(
                    "no connection to {}: {}; the transfer runs on the other destinations meanwhile",
                    self.rank_name(rank),
                    self.why()
                );
                self.effects.notices.push(notice);
            }
        }
    }

    /// What the shell must do now; clears the list.
    pub fn take_effects(&mut self) -> Effects {
        for &w in &self.effects.wake {
            self.woken[w] = false;
        }
        std::mem::take(&mut self.effects)
    }

    fn wake(&mut self, w: usize) {
        if !self.woken[w] {
            self.woken[w] = true;
            self.effects.wake.push(w);
        }
    }

    fn wake_all(&mut self) {
        for w in 0..self.slots.len() {
            self.wake(w);
        }
        self.effects.reader = true;
        self.effects.timer = true;
    }

    /// Wakes the workers that could take a piece now: only those with room.
    fn wake_with_room(&mut self) {
        if !self.has_work() && !self.end_game() {
            return;
        }
        for w in 0..self.slots.len() {
            if self.has_room(w) {
                self.wake(w);
            }
        }
    }

    /// A connection of worker `w`'s rank may have just lost its room (it
    /// took a piece, or learnt it is slower), or the rank reached its
    /// budget: the worse ranks waiting for it to be full may go now.
    fn unblock_worse_ranks(&mut self, w: usize) {
        let r = self.slots[w].rank;
        if r + 1 < self.ranks && (!self.has_slot_room(w) || self.rank_saturated(r)) {
            self.wake_with_room();
        }
    }

    /// Whether rank `r` has shown a rate and has all of its budget
    /// unacknowledged: more would only wait in its queues, so the worse
    /// ranks may go.
    fn rank_saturated(&self, r: usize) -> bool {
        self.rank_inflight[r] >= self.budget(r)
            && self
                .slots
                .iter()
                .any(|s| s.rank == r && s.connected && s.rate.is_some())
    }

    /// Everything is cut and nothing waits for a connection: only copies
    /// are left to hand out.
    fn end_game(&self) -> bool {
        self.input_done && self.unsent.is_empty() && self.queue.is_empty()
    }

    /// Whether anything could be handed out: a queued piece, or input that
    /// may be cut.
    fn has_work(&self) -> bool {
        !self.queue.is_empty() || self.can_cut()
    }

    fn can_cut(&self) -> bool {
        !self.unsent.is_empty()
            && self.next_id < self.delivered + crate::protocol::id_window(self.params.window)
    }

    /// Unacknowledged bytes rank `r` may have.
    fn budget(&self, r: usize) -> u64 {
        let rate: f64 = self
            .slots
            .iter()
            .filter(|s| s.rank == r && s.connected)
            .filter_map(|s| s.rate)
            .sum();
        START_BUDGET.max((rate * BUDGET_TIME) as u64)
    }

    /// Connected with fewer than `inflight` pieces unacknowledged, or less
    /// than it delivers in [`ALLOWANCE_RTTS`] of its quickest piece times.
    fn has_slot_room(&self, w: usize) -> bool {
        let s = &self.slots[w];
        let allowance = match (s.rate, s.quickest) {
            (Some(r), Some(q)) => r * q.as_secs_f64() * ALLOWANCE_RTTS,
            _ => 0.0,
        };
        s.connected
            && s.enabled
            && (s.inflight.len() < self.params.inflight || (s.inflight_bytes() as f64) < allowance)
    }

    /// Whether worker `w` may take a piece now, by the counts.
    fn has_room(&self, w: usize) -> bool {
        self.has_slot_room(w) && {
            let r = self.slots[w].rank;
            self.rank_inflight[r] < self.budget(r)
        }
    }

    // ---- the reader ----------------------------------------------------

    /// Whether the reader may admit another chunk: the input read and not
    /// yet written by the receiver is less than `window` feet.
    pub fn room_for_input(&self) -> bool {
        let ahead = self.bytes_read - self.bytes_delivered;
        ahead < u64::from(self.params.window) * self.params.foot_size as u64
    }

    /// Adds a chunk read from the input; `end` marks the last one (which may
    /// be empty). The reader calls it only while [`Self::room_for_input`].
    pub fn admit(&mut self, data: Shared, end: bool, now: Instant) {
        debug_assert!(!self.input_done, "input admitted after its end");
        self.bytes_read += data.len() as u64;
        self.unsent_bytes += data.len() as u64;
        self.unsent.push_back(Chunk { data, since: now });
        self.input_done |= end;
        self.wake_with_room();
        self.settle(now);
    }

    // ---- the workers -----------------------------------------------------

    /// Whether worker `w`'s connection is up.
    pub fn is_connected(&self, w: usize) -> bool {
        self.slots[w].connected
    }

    /// The scheduling rule: where worker `w`'s next piece would come from,
    /// if it may have one now.
    fn pick(&self, w: usize, now: Instant) -> Option<Take> {
        if self.finished || !self.has_room(w) {
            return None;
        }
        let first_queued = self.queue.keys().next().copied();
        if first_queued.is_none() && !self.can_cut() {
            return self.copy_for(w).map(Take::Copy);
        }
        if self.input_done && self.faster_finish_first(w) {
            return None;
        }
        let me = self.slots[w].rank;
        let in_grace = now < self.grace_until;
        let better_first = (0..self.slots.len()).any(|o| {
            let s = &self.slots[o];
            s.rank < me
                && !self.rank_saturated(s.rank)
                && (self.has_slot_room(o) || (s.first_attempt && in_grace))
        });
        if !better_first {
            return Some(first_queued.map_or(Take::Cut, Take::Queued));
        }
        // A better rank has room: only what has waited long enough for it.
        if let Some((&id, _)) = self
            .queue
            .iter()
            .find(|(_, &since)| now >= since + SPILL_PATIENCE)
        {
            return Some(Take::Queued(id));
        }
        let front_waited = self
            .unsent
            .front()
            .is_some_and(|c| now >= c.since + SPILL_PATIENCE);
        (first_queued.is_none() && self.can_cut() && front_waited).then_some(Take::Cut)
    }

    /// At the very end: the lowest piece that, sent again by worker `w`,
    /// would arrive well before it does on the slower connection of another
    /// destination that carries it. A copy on the same destination would
    /// only share one bottleneck with its original; over another path it
    /// keeps the transfer from waiting for a slow link's last pieces while
    /// a fast one sits idle.
    fn copy_for(&self, w: usize) -> Option<u64> {
        if !self.end_game() {
            return None;
        }
        let me = &self.slots[w];
        let mine = me.rate?;
        let my_bytes = me.inflight_bytes() as f64;
        let mut best: Option<u64> = None;
        for o in self
            .slots
            .iter()
            .filter(|o| o.connected && o.enabled && o.rank != me.rank)
        {
            let theirs = o.rate.unwrap_or(0.0);
            let mut ahead = 0.0;
            for p in &o.inflight {
                let (id, len) = (p.id, p.len);
                ahead += len as f64;
                let left = if theirs > 0.0 {
                    ahead / theirs
                } else {
                    f64::INFINITY
                };
                let copy = (my_bytes + len as f64) / mine;
                if copy < COPY_GAIN * left
                    && self.held.contains_key(&id)
                    && !self.copied.contains(&id)
                    && !me.inflight.iter().any(|q| q.id == id)
                {
                    best = Some(best.map_or(id, |b: u64| b.min(id)));
                }
            }
        }
        best
    }

    /// Whether worker `w` could be handed a piece now (no state changes).
    pub fn can_send(&self, w: usize, now: Instant) -> bool {
        self.pick(w, now).is_some()
    }

    /// Hands worker `w` its next piece, if the rule allows one now.
    pub fn poll_send(&mut self, w: usize, now: Instant) -> Option<Arc<Foot>> {
        let id = match self.pick(w, now)? {
            Take::Queued(id) => {
                self.queue.remove(&id);
                id
            }
            Take::Cut => self.cut(w),
            Take::Copy(id) => {
                self.copied.insert(id);
                self.copies += 1;
                id
            }
        };
        let foot = Arc::clone(&self.held[&id]);
        let slot = &mut self.slots[w];
        if slot.inflight.is_empty() {
            // The silence clock starts when the connection has work.
            slot.heard = now;
        }
        slot.inflight.push(Sent {
            id,
            len: foot.data.len(),
            at: now,
            acked: slot.acked,
        });
        self.rank_inflight[slot.rank] += foot.data.len() as u64;
        self.unblock_worse_ranks(w);
        if self.end_game() {
            // The last piece is out: the others may copy what lags.
            self.wake_with_room();
        }
        self.settle(now);
        Some(foot)
    }

    /// The size of the next piece cut for worker `w`.
    fn piece_len(&self, w: usize) -> usize {
        let mut size = self.slots[w].piece;
        if self.input_done {
            let share = self.unsent_bytes as usize / (self.params.inflight * self.connected.max(1));
            size = size.min(share.max(MIN_TAIL));
        }
        size.max(1)
    }

    /// Cuts the next piece off the unsent input and holds it; returns its id.
    fn cut(&mut self, w: usize) -> u64 {
        let size = self.piece_len(w);
        let front = self.unsent.front_mut().expect("cut checked unsent input");
        // No sliver is left behind: a front a little over the size goes whole.
        let data = if front.data.len() <= size + size / 4 {
            self.unsent.pop_front().expect("front exists").data
        } else {
            front.data.split_to(size)
        };
        // The end chunk may be empty: it goes with the piece before it.
        while self.unsent.front().is_some_and(|c| c.data.is_empty()) {
            self.unsent.pop_front();
        }
        self.unsent_bytes -= data.len() as u64;
        let id = self.next_id;
        self.next_id += 1;
        let end = self.input_done && self.unsent.is_empty();
        self.end_cut |= end;
        let offset = self.ends.back().copied().unwrap_or(self.bytes_delivered);
        self.ends.push_back(offset + data.len() as u64);
        self.held.insert(id, Arc::new(Foot { id, data, end }));
        id
    }

    /// At the end of the input: whether the connections markedly faster
    /// than `w` would carry everything left before `w` could carry one more
    /// piece. Then `w` leaves them the rest; a piece given to a slow path at
    /// the end would be the last to arrive, and the transfer would wait for it.
    fn faster_finish_first(&self, w: usize) -> bool {
        let me = &self.slots[w];
        let Some(my_rate) = me.rate else {
            return false;
        };
        let next = self.piece_len(w) as f64;
        let mine = (me.inflight_bytes() as f64 + next) / my_rate;
        let queued: u64 = self
            .queue
            .keys()
            .map(|id| self.held[id].data.len() as u64)
            .sum();
        let (mut rate, mut bytes) = (0.0, (queued + self.unsent_bytes) as f64);
        for (j, o) in self.slots.iter().enumerate() {
            match o.rate {
                Some(r) if j != w && o.connected && o.enabled && r > 2.0 * my_rate => {
                    rate += r;
                    bytes += o.inflight_bytes() as f64;
                }
                _ => {}
            }
        }
        rate > 0.0 && bytes / rate < mine
    }

    // ---- what the connections report -------------------------------------

    /// A sign of progress on worker `w`'s connection.
    fn heard(&mut self, w: usize, now: Instant) {
        let slot = &mut self.slots[w];
        if !slot.inflight.is_empty() {
            let sample = now.saturating_duration_since(slot.heard);
            slot.gap = Some(match slot.gap {
                // Quick to learn that a connection is irregular, slow to
                // forget it.
                Some(g) if sample > g => (g + sample) / 2,
                Some(g) => (g * 7 + sample) / 8,
                None => sample,
            });
        }
        slot.heard = now;
        self.motion = now;
    }

    /// The receiver has had `bytes` in all on worker `w`'s connection.
    pub fn progress(&mut self, w: usize, bytes: u64, now: Instant) {
        let slot = &mut self.slots[w];
        if slot.connected && bytes > slot.progress {
            slot.progress = bytes;
            self.heard(w, now);
            self.settle(now);
        }
    }

    /// The receiver has piece `id` (on worker `w`'s connection).
    pub fn ack(&mut self, w: usize, id: u64, now: Instant) {
        let r = self.slots[w].rank;
        let was_limited = self.rank_inflight[r] >= self.budget(r);
        let slot = &mut self.slots[w];
        if let Some(at) = slot.inflight.iter().position(|p| p.id == id) {
            let p = slot.inflight.remove(at);
            self.rank_inflight[r] -= p.len as u64;
            self.rank_acked[r] += p.len as u64;
            slot.acked += p.len as u64;
            // What the connection delivered over the piece's whole life
            // (BBR's delivery-rate sample): never less than a round trip,
            // so pieces that complete together, as when a repaired loss
            // releases what queued behind it, do not make a connection
            // look infinitely fast.
            let took = now.saturating_duration_since(p.at);
            slot.quickest = Some(match slot.quickest {
                Some(q) if q <= took => q + (took - q) / 64,
                _ => took,
            });
            let sample = (slot.acked - p.acked) as f64 / took.as_secs_f64().max(1e-3);
            slot.rate = Some(slot.rate.map_or(sample, |r| (r * 3.0 + sample) / 4.0));
            if took < GROW_BELOW && p.len * 2 > slot.piece {
                slot.piece = (slot.piece * 2).min(self.params.foot_size);
            } else if took > SHRINK_ABOVE {
                slot.piece = (slot.piece / 2).max(MIN_PIECE.min(self.params.foot_size));
            }
        }
        self.held.remove(&id);
        self.queue.remove(&id);
        self.heard(w, now);
        self.unblock_worse_ranks(w);
        if self.input_done || was_limited {
            // The end-of-input rule weighs every connection's pace, and a
            // rank at its budget may have room for several now.
            self.wake_with_room();
        } else {
            self.wake(w);
        }
        if self.retired(w) {
            // Drained (or no longer counted), its last piece back: it closes
            // now, not when it next has room, which it never will.
            self.wake(w);
        }
        self.settle(now);
    }

    /// The receiver has written every piece below `delivered`. Returns false
    /// (and changes nothing) if that is more than was ever sent: a receiver
    /// that claims so is broken or lying.
    pub fn advance(&mut self, delivered: u64, now: Instant) -> bool {
        if delivered <= self.delivered {
            return true;
        }
        if delivered > self.next_id {
            return false;
        }
        let written = (delivered - self.delivered) as usize;
        self.bytes_delivered = self
            .ends
            .drain(..written)
            .next_back()
            .expect("ends cover the ids");
        self.delivered = delivered;
        self.held = self.held.split_off(&delivered);
        self.queue = self.queue.split_off(&delivered);
        self.copied = self.copied.split_off(&delivered);
        let mut freed = false;
        let mut retired = Vec::new();
        for (w, slot) in self.slots.iter_mut().enumerate() {
            let before = slot.inflight.len();
            let (keep, gone): (Vec<Sent>, Vec<Sent>) =
                slot.inflight.iter().partition(|p| p.id >= delivered);
            slot.inflight = keep;
            self.rank_inflight[slot.rank] -= gone.iter().map(|p| p.len as u64).sum::<u64>();
            freed |= slot.inflight.len() < before;
            if slot.inflight.len() < before
                && !slot.enabled
                && slot.connected
                && slot.inflight.is_empty()
            {
                retired.push(w);
            }
        }
        // As in `ack`: a retired connection closes as soon as it is idle.
        for w in retired {
            self.wake(w);
        }
        self.motion = now;
        self.effects.reader = true;
        if freed || self.can_cut() {
            self.wake_with_room();
        }
        if self.end_cut && self.delivered == self.next_id {
            // Everything, the end included, is written.
            self.finish(Ok(self.bytes_delivered));
        }
        self.settle(now);
        true
    }

    /// Worker `w` has a working connection.
    pub fn connected(&mut self, w: usize, now: Instant) {
        let slot = &mut self.slots[w];
        slot.first_attempt = false;
        slot.heard = now;
        slot.progress = 0;
        let rank = slot.rank;
        if !slot.connected {
            slot.connected = true;
            self.connected += 1;
            if let (Some(since), Some(_)) = (self.lost_since.take(), self.waiting_told.take()) {
                if !self.finished {
                    self.effects.notices.push(format!(
                        "connected to {} after {:.1} s",
                        self.rank_name(rank),
                        now.saturating_duration_since(since).as_secs_f64()
                    ));
                }
            }
        }
        if std::mem::take(&mut self.rank_down[rank]) && !self.finished && self.ranks > 1 {
            let name = self.rank_name(rank);
            self.effects.notices.push(format!("{name} is back"));
        }
        self.ever_connected = true;
        self.refused = None;
        self.check_ranks();
        self.wake_all();
        self.settle(now);
    }

    /// Worker `w`'s attempt to connect failed (why, the worker gave
    /// [`Self::note_error`] or [`Self::refused`] first). The user hears of
    /// it once every worker has tried and none is connected, and then every
    /// [`NOTICE_EVERY`] while that lasts.
    pub fn attempt_failed(&mut self, w: usize, now: Instant) {
        self.slots[w].first_attempt = false;
        if self.slots.iter().all(|s| !s.first_attempt) || now >= self.started + QUIET_START {
            self.tell_waiting(now);
        }
        self.check_ranks();
        self.wake_all();
        self.settle(now);
    }

    /// Worker `w` lost its connection: its unacknowledged pieces are queued
    /// for the others. Safe to call more than once.
    pub fn disconnected(&mut self, w: usize, now: Instant) {
        if self.disconnect(w, now) {
            self.wake_all();
        }
        self.settle(now);
    }

    fn disconnect(&mut self, w: usize, now: Instant) -> bool {
        let slot = &mut self.slots[w];
        if !slot.connected {
            return false;
        }
        slot.connected = false;
        self.connected -= 1;
        if self.connected == 0 {
            self.lost_since = Some(now);
            if !self.finished && self.waiting_told.is_none() {
                let notice = format!(
                    "lost every connection to the receiver; trying to reconnect for {}",
                    crate::stats::human_duration(self.params.reconnect_timeout)
                );
                self.effects.notices.push(notice);
                self.waiting_told = Some(now);
            }
        }
        let lost = std::mem::take(&mut slot.inflight);
        for p in lost {
            self.rank_inflight[slot.rank] -= p.len as u64;
            if self.held.contains_key(&p.id) {
                self.queue.insert(p.id, now);
                self.retransmits += 1;
            }
        }
        true
    }

    /// The receiver dials in (reverse mode): no slot is on a first
    /// connection attempt, and no refusal ends the transfer, since anyone
    /// may dial in.
    pub fn accepting(&mut self) {
        for slot in &mut self.slots {
            slot.first_attempt = false;
        }
        self.refusals_end = false;
    }

    // ---- time --------------------------------------------------------------

    /// When [`Self::handle_timeout`] must next be called; `None`: only after
    /// some other change.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        let at = self.next_deadline(now);
        self.armed = at;
        at
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if self.finished {
            return None;
        }
        let timeout = self.params.reconnect_timeout;
        let stalls = self
            .slots
            .iter()
            .filter(|s| s.connected && !s.inflight.is_empty())
            .map(|s| s.heard + s.stall_limit());
        let lost = self.lost_since.map(|t| t + timeout);
        let stuck = self.stuck.then(|| self.motion + timeout);
        let refused = self.refused.as_ref().map(|r| r.0 + REFUSAL_GRACE);
        let notice = self
            .waiting_told
            .filter(|_| self.connected == 0)
            .map(|t| t + NOTICE_EVERY);
        let count = self.count.as_ref().and_then(|c| c.deadline());
        let quiet = (self.connected == 0 && !self.ever_connected && self.waiting_told.is_none())
            .then_some(self.started + QUIET_START)
            .filter(|&t| t > now);
        // Waits that end by themselves matter only where a worse rank waits.
        let ranked = self.ranks > 1;
        let grace = (ranked && now < self.grace_until).then_some(self.grace_until);
        let patience = ranked
            .then(|| {
                let queued = self.queue.values().copied();
                let front = self.unsent.front().map(|c| c.since);
                queued
                    .chain(front)
                    .map(|since| since + SPILL_PATIENCE)
                    .filter(|&t| t > now)
                    .min()
            })
            .flatten();
        stalls
            .chain(lost)
            .chain(stuck)
            .chain(refused)
            .chain(notice)
            .chain(count)
            .chain(quiet)
            .chain(grace)
            .chain(patience)
            .min()
    }

    /// Closes the connections that have stalled, gives up when it is time,
    /// and wakes the workers whose waits have ended.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.finished {
            return;
        }
        let mut closed = false;
        for w in 0..self.slots.len() {
            let s = &self.slots[w];
            if s.connected
                && !s.inflight.is_empty()
                && now.saturating_duration_since(s.heard) > s.stall_limit()
            {
                log::info!(
                    "worker {w}: nothing received for {:.1} s: connection stalled, reconnecting",
                    now.saturating_duration_since(s.heard).as_secs_f64()
                );
                self.disconnect(w, now);
                self.effects.close.push(w);
                self.stalls += 1;
                closed = true;
            }
        }
        let timeout = self.params.reconnect_timeout;
        let why = self
            .last_error
            .clone()
            .unwrap_or_else(|| "no connection".into());
        if now >= self.started + QUIET_START && !self.ever_connected {
            self.tell_waiting(now);
        }
        if let (0, Some(told), Some(lost)) = (self.connected, self.waiting_told, self.lost_since) {
            let gone = now.saturating_duration_since(lost);
            if now >= told + NOTICE_EVERY && gone < timeout {
                let notice = format!(
                    "still no connection to the receiver after {} ({why}); giving up in {}",
                    crate::stats::human_duration(gone),
                    crate::stats::human_duration(timeout - gone)
                );
                self.effects.notices.push(notice);
                self.waiting_told = Some(now);
            }
        }
        if let Some((_, why, peer)) = self
            .refused
            .as_ref()
            .filter(|(since, ..)| now >= *since + REFUSAL_GRACE)
        {
            let error = match peer {
                true => Error::Peer(why.clone()),
                false => Error::GaveUp(why.clone()),
            };
            self.finish(Err(error));
        } else if self.lost_since.is_some_and(|t| now >= t + timeout) {
            self.finish(Err(Error::GaveUp(format!(
                "no connection to the receiver for {} s, giving up (last error: {why})",
                timeout.as_secs()
            ))));
        } else if self.stuck && now >= self.motion + timeout {
            self.finish(Err(Error::GaveUp(format!(
                "nothing delivered for {} s although connections were made, giving up (last error: {why})",
                timeout.as_secs()
            ))));
        }
        if let Some(count) = self.count.as_mut() {
            // The network set the pace if input waited for a connection.
            let limited = self.unsent_bytes > 0 || !self.queue.is_empty();
            let changed = count.tick(now, &self.rank_acked, limited);
            for &(rank, n) in &changed {
                log::info!("{}: {n} connections", self.rank_name(rank));
            }
            if !changed.is_empty() {
                self.enable_counted();
            }
        }
        if closed {
            self.wake_all();
        } else {
            // A spill patience or the start's grace ended.
            self.wake_with_room();
        }
        self.settle(now);
    }

    /// Bookkeeping after every change: whether work became outstanding, and
    /// whether the timer thread must look again.
    fn settle(&mut self, now: Instant) {
        let stuck = !self.held.is_empty() || self.can_cut();
        if stuck && !self.stuck {
            self.motion = now;
        }
        self.stuck = stuck;
        let next = self.next_deadline(now);
        if next.is_some_and(|n| self.armed.is_none_or(|a| n < a)) || self.finished {
            self.effects.timer = true;
        }
    }

    // ---- the end -----------------------------------------------------------

    /// Remembers why the latest connection attempt failed, for the message
    /// given if the transfer is abandoned.
    pub fn note_error(&mut self, e: String) {
        self.last_error = Some(e);
    }

    /// A connection attempt was refused by a peer that did not prove the
    /// key (see [`REFUSAL_GRACE`]).
    pub fn refused(&mut self, why: String, now: Instant) {
        self.refused_as(why, true, now);
    }

    /// A destination cannot be reached in a way that retrying seldom
    /// mends: its name does not resolve, or what answers there is not a
    /// receiver. Like a refusal, it ends the transfer only if nothing else
    /// comes at the start for [`REFUSAL_GRACE`].
    pub fn unreachable(&mut self, why: String, now: Instant) {
        self.refused_as(why, false, now);
    }

    fn refused_as(&mut self, why: String, peer: bool, now: Instant) {
        if !self.ever_connected && self.refusals_end {
            let since = self.refused.as_ref().map_or(now, |r| r.0);
            self.refused = Some((since, why.clone(), peer));
            self.effects.timer = true;
        }
        self.last_error = Some(why);
    }

    /// Ends the transfer: `Ok(bytes)` when rx confirmed everything, or the
    /// error that stopped it. The first outcome wins.
    pub fn finish(&mut self, outcome: Result<u64, Error>) {
        if !self.finished {
            if let Ok(written) = outcome {
                // The end can come before the window frames that led to it.
                self.bytes_delivered = self.bytes_delivered.max(written);
            }
            self.finished = true;
            self.outcome = Some(outcome);
            self.wake_all();
        }
    }

    /// Whether the transfer is over.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The outcome, once (after [`Self::finish`]).
    pub fn take_outcome(&mut self) -> Option<Result<u64, Error>> {
        self.outcome.take()
    }

    /// Counters for reports.
    pub fn snapshot(&self) -> Snapshot {
        let foot = self.params.foot_size.max(1) as u64;
        let queued_chunks = self.unsent_bytes.div_ceil(foot) as usize;
        Snapshot {
            ahead: (self.bytes_read - self.bytes_delivered).div_ceil(foot),
            held: self.held.len(),
            queued: self.queue.len() + queued_chunks,
            delivered: self.delivered,
            delivered_bytes: self.bytes_delivered,
            retransmits: self.retransmits,
            stalls: self.stalls,
            copies: self.copies,
            inflight: self.slots.iter().map(|s| s.inflight.len()).collect(),
            piece: self.slots.iter().map(|s| s.piece).collect(),
            connected: self.connected,
            rank: self.slots.iter().map(|s| s.rank).collect(),
            enabled: self.slots.iter().map(|s| s.enabled).collect(),
            rate: self.slots.iter().map(|s| s.rate).collect(),
            limits: self.limits.clone(),
        }
    }

    /// Since when work has been outstanding without progress, if it is.
    pub fn stuck_since(&self) -> Option<Instant> {
        (self.stuck && !self.finished).then_some(self.motion)
    }

    /// Pieces resent after a connection was lost (or found stalled).
    pub fn retransmits(&self) -> u64 {
        self.retransmits
    }

    /// Bytes rx has written.
    pub fn delivered_bytes(&self) -> u64 {
        self.bytes_delivered
    }

    /// The window, in feet.
    pub fn window(&self) -> u64 {
        u64::from(self.params.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOOT: usize = 2 << 20;

    fn params(window: u32, inflight: usize) -> Params {
        Params {
            window,
            foot_size: FOOT,
            inflight,
            reconnect_timeout: Duration::from_secs(300),
        }
    }

    /// `len` bytes, each telling where it stands in the input from `at`.
    fn chunk(at: usize, len: usize) -> Shared {
        let v: Vec<u8> = (at..at + len).map(|i| (i % 251) as u8).collect();
        v.into()
    }

    fn sched(window: u32, inflight: usize, ranks: &[usize], t0: Instant) -> Schedule {
        let mut s = Schedule::new(params(window, inflight), ranks, t0);
        for w in 0..ranks.len() {
            s.connected(w, t0);
        }
        s
    }

    fn send(s: &mut Schedule, w: usize, now: Instant) -> Arc<Foot> {
        s.poll_send(w, now)
            .unwrap_or_else(|| panic!("worker {w} was given nothing"))
    }

    #[test]
    fn pieces_start_small_and_grow_while_they_come_back_quickly() {
        let t0 = Instant::now();
        let mut s = sched(64, 2, &[0], t0);
        for i in 0..8 {
            s.admit(chunk(i * FOOT, FOOT), false, t0);
        }
        let mut sizes = Vec::new();
        let mut now = t0;
        for _ in 0..8 {
            let f = send(&mut s, 0, now);
            sizes.push(f.data.len());
            now += Duration::from_millis(10);
            s.ack(0, f.id, now);
        }
        assert_eq!(sizes[0], INITIAL_PIECE);
        assert!(sizes.windows(2).all(|p| p[1] >= p[0]), "{sizes:?}");
        assert_eq!(*sizes.last().unwrap(), FOOT, "{sizes:?}");
    }

    #[test]
    fn pieces_shrink_on_a_connection_that_takes_long() {
        let t0 = Instant::now();
        let mut s = sched(64, 1, &[0], t0);
        s.admit(chunk(0, FOOT), false, t0);
        let f = send(&mut s, 0, t0);
        s.ack(0, f.id, t0 + SHRINK_ABOVE * 2);
        let g = send(&mut s, 0, t0 + SHRINK_ABOVE * 2);
        assert_eq!(g.data.len(), INITIAL_PIECE / 2);
    }

    #[test]
    fn pieces_acknowledged_together_do_not_make_a_connection_look_fast() {
        // Two connections carry 50 KB/s each. A loss on one holds back the
        // piece behind it, and both its pieces are acknowledged in the same
        // instant: it must not look a thousand times faster, or the others
        // would leave it the rest of the input.
        let t0 = Instant::now();
        let mut s = sched(64, 2, &[0, 0], t0);
        s.admit(chunk(0, 8 * FOOT), true, t0);
        let a = send(&mut s, 0, t0).id;
        let b = send(&mut s, 0, t0).id;
        let c = send(&mut s, 1, t0).id;
        let d = send(&mut s, 1, t0).id;
        let one = t0 + Duration::from_secs_f64(INITIAL_PIECE as f64 / 50e3);
        let two = t0 + Duration::from_secs_f64(2.0 * INITIAL_PIECE as f64 / 50e3);
        s.ack(1, c, one);
        s.ack(1, d, two);
        s.ack(0, a, two);
        s.ack(0, b, two);
        let (r0, r1) = (s.slots[0].rate.unwrap(), s.slots[1].rate.unwrap());
        assert!(r0 < 3.0 * r1, "{r0} against {r1}");
        assert!(
            s.can_send(1, two),
            "the other connection still takes pieces"
        );
    }

    #[test]
    fn a_drained_rank_finishes_what_it_carries_takes_nothing_new_then_closes() {
        let t0 = Instant::now();
        let mut s = sched(64, 2, &[0, 1], t0);
        // The input has ended: acks wake only the workers with room.
        s.admit(chunk(0, 8 * FOOT), true, t0);
        let a = send(&mut s, 0, t0).id;
        s.set_limit(0, Some(0), t0);
        assert!(!s.is_enabled(0) && !s.retired(0), "its piece is still out");
        assert!(
            s.poll_send(0, t0).is_none(),
            "a drained rank takes nothing new"
        );
        // The other rank takes the input without waiting for the drained one.
        let b = send(&mut s, 1, t0).id;
        assert_ne!(a, b);
        s.take_effects();
        s.ack(0, a, t0 + Duration::from_millis(10));
        assert!(
            s.retired(0),
            "its last piece is back: its connection closes"
        );
        assert!(
            s.take_effects().wake.contains(&0),
            "its worker is woken to close it"
        );
        s.disconnected(0, t0 + Duration::from_millis(10));
        s.set_limit(0, None, t0 + Duration::from_millis(20));
        assert!(s.is_enabled(0), "undrained");
        assert_eq!(s.snapshot().limits, vec![None, None]);
    }

    #[test]
    fn a_destination_added_as_the_best_rank_takes_the_input_first() {
        let t0 = Instant::now();
        let mut s = sched(64, 2, &[0, 0], t0);
        s.name_ranks(vec!["a:1".into()]);
        s.admit(chunk(0, 8 * FOOT), false, t0);
        let added = s.insert_rank(0, 2, "b:2".into(), t0);
        assert_eq!(added, 2..4);
        assert_eq!(s.snapshot().rank, vec![1, 1, 0, 0]);
        for w in added.clone() {
            s.connected(w, t0);
        }
        // The new rank 0 has room: the old one waits for the spill patience.
        assert!(s.poll_send(0, t0).is_none());
        send(&mut s, 2, t0);
        assert!(s.poll_send(0, t0 + SPILL_PATIENCE).is_some());
        let more = s.add_slots(0, 1, t0);
        assert_eq!(more, 4..5);
        assert_eq!(s.rank_slots(0), 3);
        assert_eq!(s.rank_name(0), "b:2");
    }

    #[test]
    fn threads_n_caps_a_rank_and_the_rest_close_once_idle() {
        let t0 = Instant::now();
        let mut s = sched(64, 2, &[0, 0, 0], t0);
        s.set_limit(0, Some(1), t0);
        let snap = s.snapshot();
        assert_eq!(snap.enabled, vec![true, false, false]);
        assert!(s.retired(1) && s.retired(2));
    }

    #[test]
    fn lost_pieces_are_resent_lowest_first() {
        let t0 = Instant::now();
        let mut s = sched(64, 2, &[0, 0], t0);
        s.admit(chunk(0, FOOT), false, t0);
        let a = send(&mut s, 0, t0).id;
        let b = send(&mut s, 0, t0).id;
        let c = send(&mut s, 1, t0).id;
        assert_eq!((a, b, c), (0, 1, 2));
        s.disconnected(0, t0);
        assert!(!s.is_connected(0));
        assert_eq!(send(&mut s, 1, t0).id, 0);
        s.ack(1, 2, t0);
        assert_eq!(send(&mut s, 1, t0).id, 1);
        assert_eq!(s.snapshot().retransmits, 2);
    }

    #[test]
    fn a_worse_rank_waits_while_a_better_one_has_room_then_spills() {
        let t0 = Instant::now();
        let mut s = sched(64, 1, &[0, 1], t0);
        s.admit(chunk(0, FOOT), false, t0);
        assert!(!s.can_send(1, t0), "rank 0 has room");
        assert_eq!(send(&mut s, 0, t0).id, 0);
        assert!(s.can_send(1, t0), "rank 0 is full");
        // A rank 0 with room by the count, whose worker does not take the
        // piece: after the patience, rank 1 may.
        let mut s = sched(64, 1, &[0, 1], t0);
        s.admit(chunk(0, FOOT), false, t0);
        assert_eq!(s.poll_timeout(t0), Some(t0 + SPILL_PATIENCE));
        s.handle_timeout(t0 + SPILL_PATIENCE);
        assert!(s.take_effects().wake.contains(&1));
        assert!(s.can_send(1, t0 + SPILL_PATIENCE));
    }

    #[test]
    fn a_better_rank_still_connecting_holds_back_the_next_one() {
        let t0 = Instant::now();
        let mut s = Schedule::new(params(8, 1), &[0, 1], t0);
        s.connected(1, t0);
        s.admit(chunk(0, 1000), false, t0);
        assert!(!s.can_send(1, t0), "rank 0 is on its first attempt");
        s.attempt_failed(0, t0);
        assert!(s.can_send(1, t0));
    }

    #[test]
    fn the_start_budget_holds_back_most_connections_until_the_path_shows_its_rate() {
        let t0 = Instant::now();
        let mut s = sched(64, 2, &[0; 16], t0);
        for i in 0..16 {
            s.admit(chunk(i * FOOT, FOOT), false, t0);
        }
        let mut given = 0;
        for w in 0..16 {
            while s.poll_send(w, t0).is_some() {
                given += 1;
            }
        }
        assert_eq!(given as u64, START_BUDGET / INITIAL_PIECE as u64);
        // The first acknowledgements show a fast path: everyone may go
        // (worker 1 still has its two pieces).
        let later = t0 + Duration::from_millis(5);
        s.ack(0, 0, later);
        s.ack(0, 1, later);
        assert!((0..16).all(|w| w == 1 || s.can_send(w, later)));
    }

    #[test]
    fn a_slow_connection_is_never_stalled_while_bytes_move() {
        let t0 = Instant::now();
        let mut s = sched(64, 2, &[0], t0);
        s.admit(chunk(0, FOOT), false, t0);
        send(&mut s, 0, t0);
        let mut now = t0;
        for i in 1..=100 {
            now = t0 + Duration::from_secs(i);
            s.progress(0, i * 100, now);
            s.handle_timeout(now);
            assert!(s.take_effects().close.is_empty(), "closed after {i} s");
        }
        // Silence, then: closed once its usual gap has passed many times.
        let deadline = s.poll_timeout(now).expect("a stall deadline");
        assert!(deadline > now + STALL_MIN);
        s.handle_timeout(deadline + Duration::from_millis(1));
        assert_eq!(s.take_effects().close, vec![0]);
        assert!(!s.is_connected(0));
        assert_eq!(s.snapshot().stalls, 1);
    }

    #[test]
    fn reconnecting_forever_is_not_progress() {
        let t0 = Instant::now();
        let mut p = params(64, 2);
        p.reconnect_timeout = Duration::from_secs(30);
        let mut s = Schedule::new(p, &[0], t0);
        s.admit(chunk(0, FOOT), false, t0);
        let mut now = t0;
        // Connects, is given a piece, is lost; again and again.
        while !s.is_finished() {
            now += Duration::from_secs(1);
            s.connected(0, now);
            s.poll_send(0, now);
            s.disconnected(0, now);
            s.handle_timeout(now);
            assert!(now < t0 + Duration::from_secs(40), "never gave up");
        }
        match s.take_outcome() {
            Some(Err(Error::GaveUp(m))) => assert!(m.contains("nothing delivered"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_idle_input_is_not_a_stall() {
        let t0 = Instant::now();
        let mut s = sched(64, 2, &[0], t0);
        s.admit(chunk(0, 1000), false, t0);
        let f = send(&mut s, 0, t0);
        s.ack(0, f.id, t0);
        assert!(s.advance(1, t0));
        assert_eq!(s.poll_timeout(t0), None, "nothing to wait for");
        // Input arrives an hour later: the clocks start then.
        let later = t0 + Duration::from_secs(3600);
        s.admit(chunk(1000, 1000), false, later);
        let f = send(&mut s, 0, later);
        assert!(s.poll_timeout(later).unwrap() > later);
        s.handle_timeout(later);
        assert!(!s.is_finished());
        assert_eq!(f.id, 1);
    }

    #[test]
    fn the_end_of_the_input_goes_in_shrinking_pieces_and_ends_once() {
        let t0 = Instant::now();
        let mut s = sched(64, 2, &[0], t0);
        // Grow the connection's pieces to whole feet first.
        s.admit(chunk(0, 7 * FOOT + FOOT / 2), true, t0);
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        let mut now = t0;
        loop {
            let f = send(&mut s, 0, now);
            assert_eq!(f.id, sizes.len() as u64, "ids run on without a gap");
            got.extend_from_slice(&f.data);
            sizes.push(f.data.len());
            now += Duration::from_millis(1);
            s.ack(0, f.id, now);
            assert!(s.advance(f.id + 1, now));
            if f.end {
                break;
            }
        }
        let want = chunk(0, 7 * FOOT + FOOT / 2);
        assert!(got[..] == want[..], "the pieces put together are the input");
        let big = sizes.iter().position(|&n| n == FOOT).expect("whole feet");
        assert!(sizes[big..].windows(2).all(|p| p[1] <= p[0]), "{sizes:?}");
        assert!(sizes.last().unwrap() <= &MIN_TAIL, "{sizes:?}");
        assert_eq!(s.take_outcome().unwrap().unwrap(), want.len() as u64);
    }

    #[test]
    fn the_window_bounds_ids_and_read_ahead() {
        let t0 = Instant::now();
        let mut s = sched(4, 64, &[0], t0);
        let mut admitted = 0u64;
        while s.room_for_input() {
            s.admit(chunk(0, 1000), false, t0);
            admitted += 1000;
        }
        let bound = 4 * FOOT as u64;
        assert!(admitted >= bound && admitted - 1000 < bound, "{admitted}");
        let ids = crate::protocol::id_window(4);
        for id in 0..ids {
            assert_eq!(send(&mut s, 0, t0).id, id);
        }
        assert!(!s.can_send(0, t0), "ids 0 to 15 fill a window of four");
        s.ack(0, 0, t0);
        assert!(!s.can_send(0, t0), "acknowledged is not written");
        assert!(s.advance(1, t0));
        assert!(s.can_send(0, t0));
        assert!(!s.advance(99, t0), "more than was sent");
    }

    #[test]
    fn gives_up_without_connections_with_the_last_error() {
        let t0 = Instant::now();
        let mut p = params(2, 2);
        p.reconnect_timeout = Duration::from_millis(10);
        let mut s = Schedule::new(p, &[0], t0);
        s.note_error("connect: refused".into());
        let at = s.poll_timeout(t0).unwrap();
        s.handle_timeout(at);
        match s.take_outcome() {
            Some(Err(Error::GaveUp(m))) => assert!(m.contains("refused"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(s.take_effects().timer);
    }

    fn notices(s: &mut Schedule) -> Vec<String> {
        s.take_effects().notices
    }

    #[test]
    fn a_wait_for_the_receiver_is_told_once_every_worker_tried_then_again() {
        let t0 = Instant::now();
        let mut s = Schedule::new(params(64, 2), &[0, 0], t0);
        s.note_error("connect to h:1: Connection refused".into());
        s.attempt_failed(0, t0);
        assert!(notices(&mut s).is_empty(), "worker 1 has not tried yet");
        s.attempt_failed(1, t0);
        let told = notices(&mut s);
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(
            told[0].contains("Connection refused") && told[0].contains("5 min"),
            "{told:?}"
        );
        // Failing again says nothing new until NOTICE_EVERY has passed.
        s.attempt_failed(0, t0 + Duration::from_secs(1));
        assert!(notices(&mut s).is_empty());
        let later = t0 + NOTICE_EVERY;
        assert!(s.poll_timeout(t0).is_some_and(|d| d <= later));
        s.handle_timeout(later);
        let told = notices(&mut s);
        assert!(
            told[0].contains("still no connection") && told[0].contains("giving up in 4 min 30 s"),
            "{told:?}"
        );
        s.connected(1, later + Duration::from_secs(1));
        let told = notices(&mut s);
        assert!(
            told[0].starts_with("connected to rank 1 after 31.0 s"),
            "{told:?}"
        );
        // Losing every connection later is told at once.
        s.disconnected(1, later + Duration::from_secs(2));
        let told = notices(&mut s);
        assert!(told[0].contains("lost every connection"), "{told:?}");
    }

    #[test]
    fn a_rank_that_cannot_be_reached_is_named_while_another_carries_the_stream() {
        let t0 = Instant::now();
        let mut s = Schedule::new(params(64, 2), &[0, 0, 1, 1], t0);
        s.name_ranks(vec!["a:1".into(), "b:1".into()]);
        s.connected(2, t0);
        s.connected(3, t0);
        s.note_error("connect to a:1: No route to host".into());
        s.attempt_failed(0, t0);
        assert!(notices(&mut s).is_empty());
        s.attempt_failed(1, t0);
        let told = notices(&mut s);
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(
            told[0].starts_with("no connection to a:1: connect to a:1: No route"),
            "{told:?}"
        );
        s.attempt_failed(1, t0 + Duration::from_secs(1));
        assert!(notices(&mut s).is_empty(), "told once");
        s.connected(0, t0 + Duration::from_secs(5));
        assert_eq!(notices(&mut s), ["a:1 is back"]);
    }

    #[test]
    fn a_name_that_does_not_resolve_ends_the_start_after_the_grace() {
        let t0 = Instant::now();
        let mut s = Schedule::new(params(64, 2), &[0], t0);
        s.unreachable("cannot resolve 'x'".into(), t0);
        s.attempt_failed(0, t0);
        s.handle_timeout(t0 + REFUSAL_GRACE);
        match s.take_outcome() {
            Some(Err(Error::GaveUp(m))) => assert!(m.contains("cannot resolve"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_start_with_one_attempt_still_hanging_is_told_after_a_few_seconds() {
        // One connection waits on a listener that never answers; the other
        // was refused at once.
        let t0 = Instant::now();
        let mut s = Schedule::new(params(64, 2), &[0, 0], t0);
        s.note_error("connect to h:1: Connection refused".into());
        s.attempt_failed(0, t0);
        assert!(notices(&mut s).is_empty());
        let at = s.poll_timeout(t0).unwrap();
        assert!(at <= t0 + QUIET_START, "{:?}", at - t0);
        s.handle_timeout(t0 + QUIET_START);
        let told = notices(&mut s);
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(told[0].starts_with("waiting for the receiver"), "{told:?}");
    }
}
