//! tx's end of one path's datagrams, as a state machine without I/O: the
//! pieces its connections were given, cut into datagrams, paced, and sent
//! again where rx reports them lost.
//!
//! A *lane* is one receiver address. Each TCP connection to it is a *flow*
//! with a token, a counter and pieces of its own (the schedule gave them to
//! that connection, and rx acknowledges them on it); the lane paces all of
//! its flows' datagrams together under one [`Rate`].
//!
//! - **What goes next**: a lost range first (oldest first), then the next
//!   datagram of the oldest piece not yet sent once. A piece is *out* once
//!   its last byte went for the first time: its connection may then take
//!   the next (as a TCP connection takes the next foot once it has written
//!   one).
//! - **Pacing**: a token bucket filled at the pacing rate, holding at most a
//!   millisecond of it (and at least two datagrams), and the window of bytes
//!   in flight; [`Lane::poll_transmit`] says what to send now, and
//!   [`Lane::poll_timeout`] when to ask again.
//! - **Loss**: rx reports what is missing (see
//!   [`crate::protocol::datagram`]); those ranges go again under new
//!   counters, unless their piece has been acknowledged meanwhile. A flow
//!   with datagrams in flight and no report for a probe timeout (twice the
//!   round trip, doubling each time) sends its newest range again, so the
//!   loss of a tail (which rx cannot see) is found out.
//! - **Silence**: a lane whose flows have sent datagrams for
//!   [`SILENCE_LIMIT`] and never heard a report is told in
//!   [`Effects::silent`]: UDP does not get through.

use super::rate::Rate;
use crate::pool::Shared;
use crate::protocol::datagram::{self, Report};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// IP and UDP headers, counted in the bytes a datagram costs the path.
pub const IP_UDP: usize = 28;
/// How long datagrams may go unanswered before the lane is declared
/// unreachable over UDP.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(3);
/// The shortest probe timeout.
const MIN_PTO: Duration = Duration::from_millis(20);
/// The longest probe timeout, however often it has doubled.
const MAX_PTO: Duration = Duration::from_secs(2);

/// One datagram to send.
#[derive(Debug)]
pub struct Transmit {
    /// The connection (worker) it belongs to.
    pub w: usize,
    /// Its header.
    pub header: datagram::Header,
    /// The piece's bytes; the datagram carries `range` of them.
    pub data: Shared,
    /// The part of `data` it carries.
    pub range: std::ops::Range<usize>,
}

/// What the shell must do after a call.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Workers whose piece is out (or gone): wake them.
    pub out: Vec<usize>,
    /// Datagrams went unanswered this long: UDP does not get through.
    pub silent: Option<Duration>,
}

#[derive(Debug)]
struct Piece {
    data: Shared,
    flags: u8,
    /// Bytes sent once so far.
    next: usize,
}

#[derive(Clone, Copy, Debug)]
struct Sent {
    piece: u64,
    offset: u32,
    len: u32,
    at: Instant,
    wire: u32,
}

#[derive(Debug)]
struct Flow {
    token: u64,
    next_counter: u64,
    /// The counter of `sent[0]`.
    base: u64,
    /// In flight, by counter; None once settled.
    sent: VecDeque<Option<Sent>>,
    pieces: HashMap<u64, Piece>,
    /// (piece, offset, len) to send again, each (piece, offset) once.
    resend: VecDeque<(u64, u32, u32)>,
    queued: HashSet<(u64, u32)>,
    largest_acked: Option<u64>,
    /// The last report, or the first datagram when none came yet.
    heard_at: Option<Instant>,
    ptos: u32,
}

impl Flow {
    fn take(&mut self, counter: u64) -> Option<Sent> {
        let i = counter.checked_sub(self.base)?;
        self.sent.get_mut(usize::try_from(i).ok()?)?.take()
    }

    fn get(&self, counter: u64) -> Option<&Sent> {
        let i = counter.checked_sub(self.base)?;
        self.sent.get(usize::try_from(i).ok()?)?.as_ref()
    }

    fn trim(&mut self) {
        while matches!(self.sent.front(), Some(None)) {
            self.sent.pop_front();
            self.base += 1;
        }
    }

    /// Queues a range to go again, unless it is queued already.
    fn resend(&mut self, piece: u64, offset: u32, len: u32, first: bool) {
        if !self.queued.insert((piece, offset)) {
            return;
        }
        match first {
            true => self.resend.push_front((piece, offset, len)),
            false => self.resend.push_back((piece, offset, len)),
        }
    }

    fn in_flight(&self) -> u64 {
        self.sent.iter().flatten().map(|s| u64::from(s.wire)).sum()
    }
}

/// One receiver address's datagrams.
#[derive(Debug)]
pub struct Lane {
    flows: BTreeMap<usize, Flow>,
    /// Pieces not yet sent once, oldest first: (worker, piece id).
    fresh: VecDeque<(usize, u64)>,
    rate: Rate,
    tokens: f64,
    refilled: Instant,
    inflight: u64,
    /// Payload bytes per datagram.
    chunk: usize,
    /// Header and tag bytes per datagram.
    overhead: usize,
    heard: bool,
    first_sent: Option<Instant>,
    told_silent: bool,
    effects: Effects,
    /// Datagrams sent again, for the stats.
    pub resent: u64,
    /// Datagrams sent in all.
    pub sent: u64,
    /// Probe timeouts that fired.
    pub probes: u64,
}

impl Lane {
    /// A lane sending datagrams of at most `datagram` bytes (the UDP
    /// payload: header, bytes and a tag of `tag` bytes), paced at most at
    /// `cap` bytes per second.
    pub fn new(datagram: usize, tag: usize, cap: Option<f64>, now: Instant) -> Lane {
        let overhead = datagram::HEADER_LEN + tag;
        Lane {
            flows: BTreeMap::new(),
            fresh: VecDeque::new(),
            rate: Rate::new(cap, now),
            tokens: 0.0,
            refilled: now,
            inflight: 0,
            chunk: datagram.saturating_sub(overhead).max(64),
            overhead,
            heard: false,
            first_sent: None,
            told_silent: false,
            effects: Effects::default(),
            resent: 0,
            sent: 0,
            probes: 0,
        }
    }

    /// The rate model, for logs and tests.
    pub fn rate(&self) -> &Rate {
        &self.rate
    }

    /// Payload bytes per datagram.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// The path takes smaller datagrams than this lane was sending (the
    /// kernel said so): cut what is still to go smaller.
    pub fn shrink(&mut self, datagram: usize) {
        self.chunk = datagram.saturating_sub(self.overhead).clamp(64, self.chunk);
    }

    /// Connection `w` carries datagrams under `token` from now on.
    pub fn open(&mut self, w: usize, token: u64) {
        self.close(w);
        self.flows.insert(
            w,
            Flow {
                token,
                next_counter: 0,
                base: 0,
                sent: VecDeque::new(),
                pieces: HashMap::new(),
                resend: VecDeque::new(),
                queued: HashSet::new(),
                largest_acked: None,
                heard_at: None,
                ptos: 0,
            },
        );
    }

    /// Connection `w` is gone: what it had in flight is forgotten (the
    /// schedule gives its pieces to others).
    pub fn close(&mut self, w: usize) {
        if let Some(f) = self.flows.remove(&w) {
            self.inflight = self.inflight.saturating_sub(f.in_flight());
            self.fresh.retain(|&(fw, _)| fw != w);
            self.effects.out.push(w);
        }
    }

    /// Whether connection `w` has a flow.
    pub fn is_open(&self, w: usize) -> bool {
        self.flows.contains_key(&w)
    }

    /// Connection `w` sends piece `id` (its bytes as sent: compressed, with
    /// its checksum). False without a flow for `w`.
    pub fn submit(&mut self, w: usize, id: u64, data: Shared, flags: u8) -> bool {
        let Some(f) = self.flows.get_mut(&w) else {
            return false;
        };
        f.pieces.insert(
            id,
            Piece {
                data,
                flags,
                next: 0,
            },
        );
        self.fresh.push_back((w, id));
        true
    }

    /// Whether connection `w` still has piece `id` to send once.
    pub fn is_pending(&self, w: usize, id: u64) -> bool {
        self.fresh.contains(&(w, id))
    }

    /// rx acknowledged piece `id` on connection `w`: nothing of it goes again.
    pub fn acked(&mut self, w: usize, id: u64) {
        if let Some(f) = self.flows.get_mut(&w) {
            f.pieces.remove(&id);
        }
        if let Some(i) = self.fresh.iter().position(|&p| p == (w, id)) {
            self.fresh.remove(i);
            self.effects.out.push(w);
        }
    }

    /// What to send now, if anything.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let (w, piece, offset, len, resend) = self.pick()?;
        let wire = (self.overhead + len + IP_UDP) as f64;
        let probe = self.flows.get(&w).is_some_and(|f| f.ptos > 0) && resend;
        if !probe && self.inflight + wire as u64 > self.rate.window() && self.inflight > 0 {
            return None;
        }
        self.refill(now);
        // (A byte short is near enough: the bucket is no finer than that.)
        if self.tokens + 1.0 < wire && !probe {
            return None;
        }
        self.tokens -= wire;
        // Committed: take it off its queue.
        let f = self.flows.get_mut(&w).expect("picked from a flow");
        let p = f.pieces.get_mut(&piece).expect("picked a live piece");
        let data = p.data.clone();
        let flags = p.flags;
        if resend {
            let (id, off, l) = f.resend.pop_front().expect("picked a resend");
            debug_assert_eq!((id, off), (piece, offset as u32));
            f.queued.remove(&(id, off));
            if l as usize > len {
                f.resend(id, off + len as u32, l - len as u32, true);
            }
            self.resent += 1;
        } else {
            p.next = offset + len;
            if p.next >= p.data.len() {
                self.fresh.pop_front();
                self.effects.out.push(w);
            }
        }
        let counter = f.next_counter;
        f.next_counter += 1;
        if f.sent.is_empty() {
            // Nothing was in flight: the probe timeout runs from now.
            f.heard_at = Some(now);
        }
        f.sent.push_back(Some(Sent {
            piece,
            offset: offset as u32,
            len: len as u32,
            at: now,
            wire: wire as u32,
        }));
        self.first_sent.get_or_insert(now);
        self.inflight += wire as u64;
        self.sent += 1;
        Some(Transmit {
            w,
            header: datagram::Header {
                flags,
                token: f.token,
                counter,
                piece,
                piece_len: data.len() as u32,
                offset: offset as u32,
            },
            data,
            range: offset..offset + len,
        })
    }

    /// The next datagram by the rules, without taking it: (worker, piece,
    /// offset, length, whether it is sent again).
    fn pick(&mut self) -> Option<(usize, u64, usize, usize, bool)> {
        // A probe first (it may go beyond the window), then other ranges to
        // send again.
        for probes in [true, false] {
            for (&w, f) in self.flows.iter_mut() {
                if probes && f.ptos == 0 {
                    continue;
                }
                while let Some(&(id, off, len)) = f.resend.front() {
                    if f.pieces.contains_key(&id) {
                        return Some((w, id, off as usize, (len as usize).min(self.chunk), true));
                    }
                    f.resend.pop_front();
                    f.queued.remove(&(id, off));
                }
            }
        }
        let &(w, id) = self.fresh.front()?;
        let p = &self.flows[&w].pieces[&id];
        let len = (p.data.len() - p.next).min(self.chunk);
        Some((w, id, p.next, len, false))
    }

    fn refill(&mut self, now: Instant) {
        let rate = self.rate.pacing_rate();
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        let datagram = (self.overhead + self.chunk + IP_UDP) as f64;
        let depth = (rate / 1000.0).max(2.0 * datagram);
        self.tokens = (self.tokens + rate * dt).min(depth);
    }

    /// rx's report on connection `w`. An error when it reports datagrams
    /// that were never sent.
    pub fn on_report(&mut self, w: usize, r: &Report, now: Instant) -> Result<(), String> {
        let Some(f) = self.flows.get_mut(&w) else {
            return Ok(());
        };
        if r.settled > f.next_counter || r.largest >= f.next_counter {
            return Err(format!(
                "the receiver reports datagram {} of {} sent",
                r.largest.max(r.settled),
                f.next_counter
            ));
        }
        self.heard = true;
        f.heard_at = Some(now);
        f.ptos = 0;
        // The round trip, from the newest datagram that arrived.
        if f.largest_acked.is_none_or(|l| r.largest > l) {
            if let Some(s) = f.get(r.largest) {
                let delay = Duration::from_micros(u64::from(r.ack_delay_us));
                let elapsed = now.saturating_duration_since(s.at);
                let rtt = elapsed.checked_sub(delay).unwrap_or(elapsed);
                self.rate.on_rtt(rtt.max(Duration::from_micros(10)), now);
            }
            f.largest_acked = Some(r.largest);
        }
        let mut lost = 0u64;
        for &(start, end) in &r.lost {
            let end = end.min(f.next_counter);
            let start = start.max(f.base);
            for c in start..end {
                if let Some(s) = f.take(c) {
                    lost += u64::from(s.wire);
                    if f.pieces.contains_key(&s.piece) {
                        f.resend(s.piece, s.offset, s.len, false);
                    }
                }
            }
        }
        let mut delivered = 0u64;
        for c in f.base..r.settled {
            if let Some(s) = f.take(c) {
                delivered += u64::from(s.wire);
            }
        }
        f.trim();
        self.inflight = self.inflight.saturating_sub(lost + delivered);
        // The delivery rate as rx measured it, where the path delivers: the
        // reports themselves come back late and in bursts.
        if r.rate_kib > 0 {
            self.rate
                .on_sample(f64::from(r.rate_kib) * 1024.0, false, now);
        }
        self.rate.on_ack(delivered, lost, self.inflight, now);
        #[cfg(test)]
        {
            let sum: u64 = self.flows.values().map(Flow::in_flight).sum();
            assert_eq!(sum, self.inflight, "report {r:?} on {w}");
        }
        Ok(())
    }

    fn pto(&self, f: &Flow) -> Duration {
        let base = match self.rate.srtt() {
            Some(s) => 2 * s + 2 * super::rate::REPORT_EVERY,
            None => Duration::from_millis(300),
        };
        (base.max(MIN_PTO) * 2u32.saturating_pow(f.ptos)).min(MAX_PTO)
    }

    /// When to call again: the pacer's next token, a probe, or silence.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut earliest = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        if let Some((_, _, _, len, _)) = self.pick() {
            let wire = (self.overhead + len + IP_UDP) as f64;
            let windowed = self.inflight + wire as u64 > self.rate.window() && self.inflight > 0;
            if !windowed {
                self.refill(now);
                let rate = self.rate.pacing_rate().max(1.0);
                let wait = ((wire - self.tokens).max(0.0) / rate).min(1.0);
                earliest(now + Duration::from_secs_f64(wait).max(Duration::from_micros(1)));
            }
        }
        for f in self.flows.values() {
            if let (Some(h), false) = (f.heard_at, f.sent.is_empty()) {
                earliest(h + self.pto(f));
            }
        }
        if let (Some(first), false) = (self.first_sent, self.heard || self.told_silent) {
            earliest(first + SILENCE_LIMIT);
        }
        at
    }

    /// Deals with what is due: probes, and the silence check.
    pub fn handle_timeout(&mut self, now: Instant) {
        let ptos: Vec<usize> = self
            .flows
            .iter()
            .filter(|(_, f)| {
                !f.sent.is_empty() && f.heard_at.is_some_and(|h| now >= h + self.pto(f))
            })
            .map(|(&w, _)| w)
            .collect();
        for w in ptos {
            let f = self.flows.get_mut(&w).expect("listed");
            f.ptos += 1;
            self.probes += 1;
            f.heard_at = Some(now);
            // The newest range still in flight goes again; what rx then
            // reports brings the rest.
            let newest = f
                .sent
                .iter()
                .rev()
                .flatten()
                .find(|s| f.pieces.contains_key(&s.piece));
            if let Some(&Sent {
                piece, offset, len, ..
            }) = newest
            {
                f.resend(piece, offset, len, true);
            }
        }
        if let (Some(first), false) = (self.first_sent, self.heard || self.told_silent) {
            if now >= first + SILENCE_LIMIT {
                self.told_silent = true;
                self.effects.silent = Some(now - first);
            }
        }
    }

    /// Takes what the shell must do.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    /// Each flow's state, for a test that is stuck.
    #[cfg(test)]
    pub fn describe(&self) -> String {
        let flows: Vec<String> = self
            .flows
            .iter()
            .map(|(w, f)| {
                let live: Vec<u64> = f.sent.iter().flatten().map(|s| s.piece).collect();
                format!(
                    "w{w}: next {} base {} in flight {} {} B (pieces {:?}) pieces {:?} resend {:?} ptos {} heard {:?}",
                    f.next_counter,
                    f.base,
                    live.len(),
                    f.in_flight(),
                    live.iter().take(5).collect::<Vec<_>>(),
                    f.pieces.keys().collect::<Vec<_>>(),
                    &f.resend.iter().take(3).collect::<Vec<_>>(),
                    f.ptos,
                    f.heard_at.map(|h| h.elapsed())
                )
            })
            .collect();
        format!(
            "fresh {:?} inflight {} window {} {}",
            self.fresh,
            self.inflight,
            self.rate.window(),
            flows.join("; ")
        )
    }

    /// Bytes in flight.
    pub fn inflight(&self) -> u64 {
        self.inflight
    }
}
