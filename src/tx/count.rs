//! `threads auto`: how many connections each destination uses, found while
//! the transfer runs. A destination starts with a few; every epoch in which
//! the sender had more to send than it could (so the network, not the
//! input, set the pace), its delivery rate is compared with the last
//! epoch's: a gain of at least [`GAIN`] doubles the count again, anything
//! less holds it at the count before the last doubling. A held count is
//! tried doubled again every [`PROBE_EVERY`] (paths change during a
//! transfer of hours, and one epoch on a lossy path can mislead). One TCP stream on a long lossy
//! path is limited by its congestion control, so more streams carry more
//! until the link is full; on a small link a few streams already fill it,
//! and more only fight over its queue.
//!
//! No I/O and no clock of its own: [`Count::tick`] takes `now` and what was
//! acknowledged, and [`Count::deadline`] says when it must be called.

use std::time::{Duration, Instant};

/// Connections per destination at the start.
pub const START: usize = 4;
/// How long each count is measured.
pub const EPOCH: Duration = Duration::from_secs(3);
/// The gain in delivery rate that is worth doubling the count again.
pub const GAIN: f64 = 1.15;
/// How long after a change the new count is left to settle (connections
/// made, slow start) before its epoch is measured.
pub const WARM_UP: Duration = Duration::from_millis(1500);
/// How often a held count is tried doubled again.
pub const PROBE_EVERY: Duration = Duration::from_secs(30);

/// One destination's count.
#[derive(Clone, Debug)]
struct Rank {
    active: usize,
    max: usize,
    /// The count before the last doubling.
    previous: usize,
    /// When this epoch began, and the bytes acknowledged by then.
    since: Instant,
    acked_then: u64,
    /// Until then the count is warming up, and the epoch has not begun.
    warm_until: Option<Instant>,
    /// The rate to beat, in bytes per second: the best epoch while
    /// growing, the last one while held.
    best: Option<f64>,
    /// Held (not growing) until then; `None` while growing. A count at its
    /// most is held for good.
    held_until: Option<Instant>,
}

impl Rank {
    fn new(max: usize, now: Instant) -> Rank {
        Rank {
            active: START.min(max),
            max,
            previous: START.min(max),
            since: now,
            acked_then: 0,
            warm_until: None,
            best: None,
            held_until: (START >= max).then_some(now),
        }
    }
}

/// The counts of every destination (rank).
#[derive(Clone, Debug)]
pub struct Count {
    ranks: Vec<Rank>,
}

impl Count {
    /// Counts for ranks of at most `max[r]` connections each.
    pub fn new(max: &[usize], now: Instant) -> Count {
        let ranks = max.iter().map(|&max| Rank::new(max, now)).collect();
        Count { ranks }
    }

    /// A destination added while running, as rank `at`, starts counting
    /// from the start.
    pub fn insert(&mut self, at: usize, max: usize, now: Instant) {
        self.ranks
            .insert(at.min(self.ranks.len()), Rank::new(max, now));
    }

    /// Rank `r` now has `max` connections to count up to; a count that was
    /// held at its old most may grow again.
    pub fn grow(&mut self, r: usize, max: usize) {
        let rank = &mut self.ranks[r];
        if max > rank.max {
            rank.max = max;
            rank.held_until = None;
        }
    }

    /// How many of rank `r`'s connections are in use.
    pub fn active(&self, r: usize) -> usize {
        self.ranks[r].active
    }

    /// When [`Self::tick`] must next be called.
    pub fn deadline(&self) -> Option<Instant> {
        self.ranks
            .iter()
            .filter(|r| r.active < r.max || r.held_until.is_none())
            .map(|r| r.warm_until.unwrap_or(r.since + EPOCH))
            .min()
    }

    /// Ends the epochs that are over. `acked[r]`: bytes acknowledged on rank
    /// `r` so far; `limited`: whether the sender had more to send than its
    /// connections took. Returns the ranks whose count changed, with the
    /// new count.
    pub fn tick(&mut self, now: Instant, acked: &[u64], limited: bool) -> Vec<(usize, usize)> {
        let mut changed = Vec::new();
        for (r, rank) in self.ranks.iter_mut().enumerate() {
            if rank.active >= rank.max && rank.held_until.is_some() {
                continue;
            }
            if let Some(warm) = rank.warm_until {
                if now >= warm {
                    rank.warm_until = None;
                    rank.since = now;
                    rank.acked_then = acked[r];
                }
                continue;
            }
            if now < rank.since + EPOCH {
                continue;
            }
            let secs = now.saturating_duration_since(rank.since).as_secs_f64();
            let rate = acked[r].saturating_sub(rank.acked_then) as f64 / secs.max(1e-9);
            let before = rank.active;
            // Only an epoch the network paced says anything about the
            // network, and a rank that carried nothing (a worse one, while
            // the better ones keep up) says nothing either.
            if limited && rate > 0.0 {
                match (rank.held_until, rank.best) {
                    (Some(until), _) => {
                        // Held: this epoch is the rate a doubling must beat.
                        rank.best = Some(rate);
                        if now >= until && rank.active < rank.max {
                            rank.held_until = None;
                            rank.previous = rank.active;
                            rank.active = (rank.active * 2).min(rank.max);
                        }
                    }
                    (None, Some(best)) if rate < best * GAIN => {
                        // Not worth the doubling: back to the count that
                        // carried nearly as much with fewer streams.
                        rank.held_until = Some(now + PROBE_EVERY);
                        rank.active = rank.previous;
                        rank.best = None;
                    }
                    (None, _) => {
                        rank.best = Some(rate);
                        if rank.active >= rank.max {
                            rank.held_until = Some(now + PROBE_EVERY);
                        } else {
                            rank.previous = rank.active;
                            rank.active = (rank.active * 2).min(rank.max);
                        }
                    }
                }
            }
            log::debug!(
                "rank {r}: {before} connections carried {:.1} Mbit/s{}",
                rate * 8e-6,
                if limited { "" } else { " (paced by the input)" }
            );
            rank.since = now;
            rank.acked_then = acked[r];
            if rank.active != before {
                changed.push((r, rank.active));
                rank.warm_until = Some(now + WARM_UP);
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `secs` of epochs where `rate(count)` is what `count`
    /// connections carry; returns the count at the end.
    fn settle(max: usize, secs: u64, rate: impl Fn(usize) -> f64) -> usize {
        let t0 = Instant::now();
        let mut c = Count::new(&[max], t0);
        let (mut now, mut acked) = (t0, 0u64);
        while let Some(at) = c
            .deadline()
            .filter(|&at| at < t0 + Duration::from_secs(secs))
        {
            acked += (rate(c.active(0)) * (at - now).as_secs_f64()) as u64;
            now = at;
            c.tick(now, &[acked], true);
        }
        c.active(0)
    }

    #[test]
    fn a_count_grows_while_the_rate_does_and_keeps_the_best() {
        // A long lossy path: each stream carries the same, up to a full link.
        assert_eq!(settle(64, 60, |n| (n as f64 * 2e6).min(200e6)), 64);
        assert_eq!(settle(64, 60, |n| (n as f64 * 2e6).min(40e6)), 32);
        // A small link a few streams fill, which more only crowd.
        assert_eq!(settle(64, 60, |n| if n > 4 { 2.5e5 } else { 3e5 }), 4);
        // A fixed cap.
        assert_eq!(settle(2, 60, |n| n as f64 * 1e6), 2);
        // Tried again later (here just after a probe began, its count
        // doubled for the epoch that measures it).
        let probing = settle(64, 20 + PROBE_EVERY.as_secs(), |n| {
            (n as f64 * 2e6).min(40e6)
        });
        assert!(probing == 32 || probing == 64, "{probing}");
    }

    #[test]
    fn an_epoch_the_input_paced_decides_nothing() {
        let t0 = Instant::now();
        let mut c = Count::new(&[64, 64], t0);
        let at = c.deadline().unwrap();
        assert!(c.tick(at, &[1 << 30, 0], false).is_empty());
        // Rank 1 carried nothing: it keeps its count while rank 0 grows.
        let at = c.deadline().unwrap();
        assert_eq!(c.tick(at, &[2 << 30, 0], true), [(0, 8)]);
        assert_eq!((c.active(0), c.active(1)), (8, START));
    }
}
