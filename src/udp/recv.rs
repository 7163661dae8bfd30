//! rx's end of one connection's datagrams, as a state machine without I/O:
//! pieces put together from their ranges in whatever order they come, and
//! the reports that tell tx what is missing.
//!
//! **Pieces.** Each piece being assembled keeps the ranges that arrived
//! (merged, so in-order arrival is one range that grows); it is whole when
//! one range covers it. A range that arrives twice is written twice with the
//! same bytes, so duplicates and replays cost nothing but the copy.
//!
//! **Loss.** Counters that skip ahead leave a *hole*; a hole is lost once
//! [`REORDER_DATAGRAMS`] later datagrams have arrived or it has waited
//! [`REORDER_TIME`] (a reordered datagram fills it before then). A lost
//! hole is reported once, in the next [`Report`]; reports go at most every
//! [`REPORT_EVERY`] while datagrams arrive, and at once when a loss is
//! found.

use crate::protocol::datagram::{Header, Report, MAX_LOST};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

pub use super::rate::REPORT_EVERY;
/// A hole this many datagrams behind the newest is lost.
pub const REORDER_DATAGRAMS: u64 = 3;
/// A hole this old is lost.
pub const REORDER_TIME: Duration = Duration::from_millis(4);

/// A piece put together.
#[derive(Debug, PartialEq, Eq)]
pub struct Whole {
    /// Its id.
    pub id: u64,
    /// Its bytes as sent.
    pub data: Vec<u8>,
    /// Its datagram flags.
    pub flags: u8,
}

/// What a datagram did.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// It added to a piece, or repeated what was there.
    Part,
    /// It completed this piece.
    Whole(Whole),
    /// It belongs to a piece already put together, or one the shell turned
    /// away.
    Stale,
}

#[derive(Debug)]
struct Partial {
    data: Vec<u8>,
    /// Arrived ranges `[start, end)`, sorted and merged.
    have: Vec<(u32, u32)>,
    flags: u8,
}

impl Partial {
    fn insert(&mut self, start: u32, bytes: &[u8]) {
        let end = start + bytes.len() as u32;
        self.data[start as usize..end as usize].copy_from_slice(bytes);
        let i = self.have.partition_point(|&(_, e)| e < start);
        let mut s = start;
        let mut e = end;
        let mut j = i;
        while j < self.have.len() && self.have[j].0 <= e {
            s = s.min(self.have[j].0);
            e = e.max(self.have[j].1);
            j += 1;
        }
        self.have.splice(i..j, [(s, e)]);
    }

    fn whole(&self) -> bool {
        self.data.is_empty() || self.have == [(0, self.data.len() as u32)]
    }
}

/// How long the arrival rate is measured over.
pub const METER_WINDOW: Duration = Duration::from_millis(50);

/// The rate one sender's datagrams arrive at (all its connections').
#[derive(Debug)]
pub struct Meter {
    start: Instant,
    bytes: u64,
    rate: f64,
}

impl Meter {
    /// A meter starting now.
    pub fn new(now: Instant) -> Meter {
        Meter {
            start: now,
            bytes: 0,
            rate: 0.0,
        }
    }

    /// `bytes` (a datagram as the path carries it) arrived.
    pub fn add(&mut self, bytes: usize, now: Instant) {
        let span = now.saturating_duration_since(self.start);
        if span >= METER_WINDOW {
            // A window with a long gap in it (nothing to send) says little
            // of the path: only whole windows count, the rest starts anew.
            if span < METER_WINDOW * 2 {
                self.rate = self.bytes as f64 / span.as_secs_f64();
            }
            self.start = now;
            self.bytes = 0;
        }
        self.bytes += bytes as u64;
    }

    /// KiB per second over the last whole window.
    pub fn rate_kib(&self) -> u32 {
        (self.rate / 1024.0).min(f64::from(u32::MAX)) as u32
    }
}

/// One connection's datagrams.
#[derive(Debug, Default)]
pub struct Inbound {
    largest: Option<u64>,
    largest_at: Option<Instant>,
    /// Holes not yet lost: start -> (end, when found).
    holes: BTreeMap<u64, (u64, Instant)>,
    /// Lost ranges not yet reported.
    lost: Vec<(u64, u64)>,
    pieces: HashMap<u64, Partial>,
    /// Pieces put together and not yet below the written position.
    whole: BTreeSet<u64>,
    /// Bytes of datagrams that arrived.
    received: u64,
    reported_at: Option<Instant>,
    news: bool,
}

impl Inbound {
    /// A connection with no datagrams yet.
    pub fn new() -> Inbound {
        Inbound::default()
    }

    /// Bytes of datagram payload that arrived in all.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Bytes held in pieces being put together.
    pub fn held(&self) -> u64 {
        self.pieces.values().map(|p| p.data.len() as u64).sum()
    }

    /// Takes a datagram whose tag checked out. `delivered`: every piece
    /// below it is written. `admit` is asked before a new piece is started
    /// (its length): false turns it away (beyond the window), and the
    /// datagram is dropped unread, to come again.
    pub fn on_datagram(
        &mut self,
        h: &Header,
        bytes: &[u8],
        delivered: u64,
        now: Instant,
        admit: impl FnOnce(u32) -> bool,
    ) -> Arrival {
        self.count(h.counter, now);
        self.received += bytes.len() as u64;
        self.whole.retain(|&id| id >= delivered);
        if h.piece < delivered || self.whole.contains(&h.piece) {
            return Arrival::Stale;
        }
        let p = match self.pieces.get_mut(&h.piece) {
            Some(p) if p.data.len() == h.piece_len as usize => p,
            // The same piece with another length: not from an honest
            // sender; the tag says it is from ours, so it is a bug there.
            Some(_) => return Arrival::Stale,
            None => {
                if !admit(h.piece_len) {
                    return Arrival::Stale;
                }
                self.pieces.entry(h.piece).or_insert(Partial {
                    data: vec![0; h.piece_len as usize],
                    have: Vec::new(),
                    flags: h.flags,
                })
            }
        };
        p.insert(h.offset, bytes);
        if !p.whole() {
            return Arrival::Part;
        }
        let p = self.pieces.remove(&h.piece).expect("just found");
        self.whole.insert(h.piece);
        Arrival::Whole(Whole {
            id: h.piece,
            data: p.data,
            flags: p.flags,
        })
    }

    fn count(&mut self, c: u64, now: Instant) {
        self.news = true;
        match self.largest {
            None => {
                if c > 0 {
                    self.holes.insert(0, (c, now));
                }
            }
            Some(l) if c > l => {
                if c > l + 1 {
                    self.holes.insert(l + 1, (c, now));
                }
            }
            Some(_) => {
                // Late: fill its hole, if it still has one.
                if let Some((&s, &(e, at))) = self.holes.range(..=c).next_back() {
                    if c < e {
                        self.holes.remove(&s);
                        if s < c {
                            self.holes.insert(s, (c, at));
                        }
                        if c + 1 < e {
                            self.holes.insert(c + 1, (e, at));
                        }
                    }
                }
                return;
            }
        }
        self.largest = Some(c);
        self.largest_at = Some(now);
    }

    /// Moves the holes that are lost by now to the report.
    fn mature(&mut self, now: Instant) {
        let Some(largest) = self.largest else { return };
        while let Some((&s, &(e, at))) = self.holes.iter().next() {
            let behind = largest.saturating_sub(e - 1) >= REORDER_DATAGRAMS;
            if !behind && now.duration_since(at) < REORDER_TIME {
                break;
            }
            self.holes.remove(&s);
            match self.lost.last_mut() {
                Some((_, le)) if *le == s => *le = e,
                _ => self.lost.push((s, e)),
            }
        }
    }

    /// When the next report may be due, if anything is to be told.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.holes.values().map(|&(_, at)| at + REORDER_TIME).min();
        let due = match (self.news || !self.lost.is_empty(), self.reported_at) {
            (false, _) => None,
            (true, Some(t)) => Some(t + REPORT_EVERY),
            (true, None) => self.largest_at,
        };
        if let Some(d) = due {
            at = Some(at.map_or(d, |a| a.min(d)));
        }
        at
    }

    /// The report to send now, if one is due.
    pub fn poll_report(&mut self, now: Instant) -> Option<Report> {
        self.mature(now);
        let largest = self.largest?;
        let due = self.reported_at.is_none_or(|t| now >= t + REPORT_EVERY);
        if !(self.news && due) && self.lost.is_empty() {
            return None;
        }
        let n = self.lost.len().min(MAX_LOST);
        let lost: Vec<(u64, u64)> = self.lost.drain(..n).collect();
        // Settled up to the first hole still open or loss still untold.
        let mut settled = largest + 1;
        if let Some((&s, _)) = self.holes.iter().next() {
            settled = settled.min(s);
        }
        if let Some(&(s, _)) = self.lost.first() {
            settled = settled.min(s);
        }
        self.reported_at = Some(now);
        self.news = !self.lost.is_empty();
        let delay = self
            .largest_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        Some(Report {
            largest,
            settled,
            ack_delay_us: delay.as_micros().min(u128::from(u32::MAX)) as u32,
            rate_kib: 0,
            lost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(counter: u64, piece: u64, len: u32, offset: u32) -> Header {
        Header {
            flags: 0,
            token: 1,
            counter,
            piece,
            piece_len: len,
            offset,
        }
    }

    #[test]
    fn a_piece_comes_together_in_any_order_with_duplicates() {
        let t = Instant::now();
        let mut i = Inbound::new();
        let data: Vec<u8> = (0..100u8).collect();
        let parts = [(2, 60..100usize), (0, 0..30), (0, 0..30), (1, 30..60)];
        let mut got = None;
        for (n, (c, r)) in parts.iter().enumerate() {
            let a = i.on_datagram(
                &h(*c, 5, 100, r.start as u32),
                &data[r.clone()],
                0,
                t,
                |_| true,
            );
            if n < 3 {
                assert_eq!(a, Arrival::Part);
            } else {
                got = Some(a);
            }
        }
        assert_eq!(
            got,
            Some(Arrival::Whole(Whole {
                id: 5,
                data: data.clone(),
                flags: 0
            }))
        );
        let late = i.on_datagram(&h(3, 5, 100, 0), &data[..30], 0, t, |_| true);
        assert_eq!(late, Arrival::Stale, "a piece already whole");
    }

    #[test]
    fn holes_are_reported_lost_once_and_late_arrivals_fill_them() {
        let t = Instant::now();
        let mut i = Inbound::new();
        let b = [0u8; 10];
        let put = |i: &mut Inbound, c: u64, at: Instant| {
            i.on_datagram(&h(c, 0, 1000, (c * 10) as u32), &b, 0, at, |_| true);
        };
        for c in [0, 1, 3, 5, 6, 7, 8] {
            put(&mut i, c, t);
        }
        // 2 and 4 are three or more behind the newest: lost at once.
        let r = i.poll_report(t).unwrap();
        assert_eq!(r.lost, vec![(2, 3), (4, 5)]);
        assert_eq!((r.largest, r.settled), (8, 9));
        // 10 leaves a hole that a late 9 fills before it is lost.
        put(&mut i, 10, t);
        put(&mut i, 9, t + Duration::from_millis(1));
        let r = i.poll_report(t + REPORT_EVERY).unwrap();
        assert!(r.lost.is_empty());
        assert_eq!(r.settled, 11);
        // A hole at the end is lost by time alone.
        let t2 = t + REPORT_EVERY * 2;
        put(&mut i, 12, t2);
        let r = i.poll_report(t2).unwrap();
        assert_eq!(r.settled, 11, "the hole at 11 is still young");
        assert!(r.lost.is_empty());
        let later = t2 + REORDER_TIME;
        assert_eq!(i.poll_timeout(), Some(later));
        let r = i.poll_report(later).unwrap();
        assert_eq!((r.lost.clone(), r.settled), (vec![(11, 12)], 13));
        assert_eq!(i.poll_report(later + REPORT_EVERY), None, "nothing new");
    }

    #[test]
    fn a_piece_turned_away_is_not_held() {
        let t = Instant::now();
        let mut i = Inbound::new();
        let a = i.on_datagram(&h(0, 7, 100, 0), &[1; 10], 0, t, |_| false);
        assert_eq!(a, Arrival::Stale);
        assert_eq!(i.held(), 0);
        let a = i.on_datagram(&h(1, 3, 100, 0), &[1; 10], 4, t, |_| true);
        assert_eq!(a, Arrival::Stale, "below the written position");
    }
}
