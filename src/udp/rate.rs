//! How fast one path's datagrams are paced, and how many bytes may be in
//! flight on it: a model of the path from what it delivers, not from what
//! it loses (the shape of BBR). Random loss on a long path reads as
//! congestion to a loss-based controller and collapses it; here the rate
//! follows the *delivery rate* (the most the path delivered over the last
//! few round trips) and the window the measured round trip, so a loss costs
//! only the bytes sent again.
//!
//! - **Startup**: the rate is 2.885 x the delivery rate, so it doubles
//!   every round trip, until three round trips in a row bring less than a
//!   quarter more (the path is full), two round trips find a standing
//!   queue (see below), or a round trip loses more than [`LOSS_LIMIT`] of
//!   what it sent (a policer, or a queue overflowing).
//! - **Drain**: below the delivery rate until what is in flight fits the
//!   path (its delivery rate times its shortest round trip).
//! - **Cruise**: a cycle of eight round trips at 1.25, 0.75, then 1 x the
//!   delivery rate: the first probes for more, the second drains what the
//!   probe queued. A round trip losing more than [`LOSS_LIMIT`] takes the
//!   estimate down to what was just delivered.
//! - **Giving way** (LEDBAT's rule): two round trips in a row whose
//!   shortest round trip stands well above the path's (by the larger of
//!   5 ms, an eighth of it, or four datagrams at the rate) found a standing
//!   queue, which random loss never builds and a loss-based flow sharing
//!   the path does. Each such round takes the estimate down by
//!   [`YIELD_BETA`] and holds it there; in startup it only ends startup.
//!   Once the queue is gone, probe and drain alternate while each probe
//!   still finds more, so the rate comes back within a few round trips of
//!   the other flow leaving. On a path of its own the rate stays at the
//!   link's, whatever the random loss; beside a TCP flow it takes less
//!   than that flow.
//!
//! The window (bytes in flight) is twice the path's delivery rate times its
//! shortest round trip plus the receiver's report interval: a path that
//! goes dark stops taking datagrams after one window. `--rate` caps the
//! pacing rate. Nothing here does I/O: every call takes `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bytes that may be in flight before anything is known of the path.
pub const INITIAL_WINDOW: u64 = 32 * 1500;
/// Startup's gain on the rate and the window: 2/ln 2, the smallest that
/// doubles what is delivered each round trip.
const STARTUP_GAIN: f64 = 2.885;
/// The window, in path delays (delivery rate x round trip).
const WINDOW_GAIN: f64 = 2.0;
/// The cruise cycle's gains, one round trip each.
const CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// A round trip that loses more than this share of its bytes says the path
/// is over-full (random loss on a long path is far below it).
pub const LOSS_LIMIT: f64 = 0.15;
/// A lossy round takes the estimate down by at most this factor.
const LOSS_BETA: f64 = 0.7;
/// The slowest pace, bytes per second: a few datagrams a second more than
/// nothing, so a path that was thought dead is tried again.
pub const MIN_RATE: f64 = 16.0 * 1024.0;
/// The delivery rate is the best of this many round trips.
const BW_ROUNDS: u32 = 10;
/// The shortest round trip is the shortest seen in this long.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(30);
/// The shortest a round (and a cruise phase) is counted as: two of the
/// receiver's rate windows ([`super::recv::METER_WINDOW`]), or a probe would
/// be averaged away before it is measured.
const MIN_ROUND: Duration = Duration::from_millis(100);
/// A round whose shortest round trip exceeds the path's by this much, by
/// [`QUEUE_SHARE`] of it, or by [`QUEUE_BYTES`] at the delivery rate,
/// whichever is most, found a standing queue: the path is shared with a
/// flow that fills it (LEDBAT's signal; random loss never raises it).
const QUEUE_DELAY: Duration = Duration::from_millis(5);
const QUEUE_SHARE: u32 = 8;
const QUEUE_BYTES: f64 = 4.0 * 1500.0;
/// A queued round takes the estimate down by this factor.
pub const YIELD_BETA: f64 = 0.85;
/// The receiver reports at most this often; the window covers it.
pub const REPORT_EVERY: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Startup,
    Drain,
    Cruise,
}

/// One path's rate and window.
#[derive(Debug)]
pub struct Rate {
    mode: Mode,
    /// Delivery-rate samples (when, bytes/s), best first among the newer.
    bw: VecDeque<(Instant, f64)>,
    min_rtt: Option<(Duration, Instant)>,
    srtt: Option<Duration>,
    cap: Option<f64>,
    /// While rounds find a standing queue: what the estimate may not
    /// exceed (samples then show what was sent before the path filled).
    ceiling: Option<f64>,
    /// Startup: the best rate when it last grew by a quarter, and how many
    /// rounds since.
    full_bw: f64,
    full_rounds: u32,
    round_start: Instant,
    round_lost: u64,
    round_delivered: u64,
    /// The shortest round trip measured this round, and last round.
    round_min_rtt: Option<Duration>,
    last_min_rtt: Option<Duration>,
    /// After giving way: the rate before the last probe, while each probe
    /// still finds more (the cycle is then probe and drain only).
    fast: Option<f64>,
    phase: usize,
    phase_start: Instant,
    /// A delivery rate arrived this round.
    sampled: bool,
    /// Rounds that found a standing queue and gave way.
    pub yields: u64,
}

impl Rate {
    /// A path of which nothing is known yet; `cap` in bytes per second.
    pub fn new(cap: Option<f64>, now: Instant) -> Rate {
        Rate {
            mode: Mode::Startup,
            bw: VecDeque::new(),
            min_rtt: None,
            srtt: None,
            cap,
            ceiling: None,
            full_bw: 0.0,
            full_rounds: 0,
            round_start: now,
            round_lost: 0,
            round_delivered: 0,
            round_min_rtt: None,
            last_min_rtt: None,
            fast: None,
            phase: 0,
            phase_start: now,
            sampled: false,
            yields: 0,
        }
    }

    /// The delivery rate the path has shown (bytes per second), if any.
    pub fn bandwidth(&self) -> Option<f64> {
        self.bw.front().map(|&(_, b)| b)
    }

    /// The smoothed round trip.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The shortest round trip seen lately.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(|(d, _)| d)
    }

    fn round(&self) -> Duration {
        self.srtt
            .unwrap_or(Duration::from_millis(100))
            .max(MIN_ROUND)
    }

    fn gain(&self) -> f64 {
        match self.mode {
            Mode::Startup => STARTUP_GAIN,
            Mode::Drain => 1.0 / STARTUP_GAIN,
            Mode::Cruise => CYCLE[self.phase],
        }
    }

    /// Bytes per second to pace at.
    pub fn pacing_rate(&self) -> f64 {
        let rate = match self.bandwidth() {
            Some(bw) => bw * self.gain(),
            // Before any sample: the initial window over one round trip (or
            // a millisecond, before any round trip is known).
            None => {
                let rtt = self.srtt.unwrap_or(Duration::from_millis(1));
                STARTUP_GAIN * INITIAL_WINDOW as f64 / rtt.as_secs_f64().max(1e-4)
            }
        };
        let rate = rate.max(MIN_RATE);
        match self.cap {
            Some(cap) => rate.min(cap),
            None => rate,
        }
    }

    /// Bytes that may be in flight.
    pub fn window(&self) -> u64 {
        let (Some(bw), Some(rtt)) = (self.bandwidth(), self.min_rtt()) else {
            return INITIAL_WINDOW;
        };
        let gain = match self.mode {
            Mode::Startup => STARTUP_GAIN,
            _ => WINDOW_GAIN,
        };
        let path = bw * (rtt + 2 * REPORT_EVERY).as_secs_f64();
        ((gain * path) as u64).max(INITIAL_WINDOW / 4)
    }

    /// A round trip measured on a report.
    pub fn on_rtt(&mut self, rtt: Duration, now: Instant) {
        self.srtt = Some(match self.srtt {
            Some(s) => (s * 7 + rtt) / 8,
            None => rtt,
        });
        self.round_min_rtt = Some(self.round_min_rtt.map_or(rtt, |m| m.min(rtt)));
        let stale = self
            .min_rtt
            .is_none_or(|(d, at)| rtt <= d || now.duration_since(at) > MIN_RTT_WINDOW);
        if stale {
            self.min_rtt = Some((rtt, now));
        }
    }

    /// A delivery-rate sample (bytes per second); `app_limited` when the
    /// sender had nothing more to send while it was taken (it then only
    /// counts if it raises the estimate).
    pub fn on_sample(&mut self, bw: f64, app_limited: bool, now: Instant) {
        if !bw.is_finite() || bw <= 0.0 {
            return;
        }
        if app_limited && self.bandwidth().is_some_and(|b| bw < b) {
            return;
        }
        let bw = self.ceiling.map_or(bw, |c| bw.min(c));
        self.sampled = true;
        let horizon = self.round() * BW_ROUNDS;
        while self
            .bw
            .front()
            .is_some_and(|&(at, _)| now.duration_since(at) > horizon)
        {
            self.bw.pop_front();
        }
        while self.bw.back().is_some_and(|&(_, b)| b <= bw) {
            self.bw.pop_back();
        }
        self.bw.push_back((now, bw));
    }

    /// Bytes newly delivered and lost, and what is in flight after them.
    pub fn on_ack(&mut self, delivered: u64, lost: u64, inflight: u64, now: Instant) {
        self.round_delivered += delivered;
        self.round_lost += lost;
        if now.duration_since(self.round_start) >= self.round() {
            self.end_round(now);
        }
        match self.mode {
            Mode::Drain => {
                let path = match (self.bandwidth(), self.min_rtt()) {
                    (Some(bw), Some(rtt)) => (bw * rtt.as_secs_f64()) as u64,
                    _ => 0,
                };
                if inflight <= path {
                    self.mode = Mode::Cruise;
                    self.phase = 0;
                    self.phase_start = now;
                }
            }
            Mode::Cruise => {
                let phase = self.min_rtt().unwrap_or(MIN_ROUND).max(MIN_ROUND);
                if now.duration_since(self.phase_start) >= phase {
                    self.phase = (self.phase + 1) % CYCLE.len();
                    self.phase_start = now;
                    if let Some(before) = self.fast.filter(|_| self.phase == 2) {
                        let bw = self.bandwidth().unwrap_or(0.0);
                        if bw > before * 1.1 {
                            self.phase = 0;
                            self.fast = Some(bw);
                        } else {
                            self.fast = None;
                        }
                    }
                }
            }
            Mode::Startup => {}
        }
    }

    fn end_round(&mut self, now: Instant) {
        let sent = self.round_delivered + self.round_lost;
        let lossy = sent > 0 && self.round_lost as f64 > LOSS_LIMIT * sent as f64;
        let delivered =
            self.round_delivered as f64 / now.duration_since(self.round_start).as_secs_f64();
        self.round_start = now;
        self.round_lost = 0;
        self.round_delivered = 0;
        // Two rounds in a row, so that a probe's own queue (which the next
        // phase drains) is not taken for someone else's.
        let this = self.round_min_rtt.take();
        let two = match (this, std::mem::replace(&mut self.last_min_rtt, this)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            _ => None,
        };
        let queued = match (two, self.min_rtt(), self.bandwidth()) {
            (Some(round), Some(base), Some(bw)) => {
                let serial = Duration::from_secs_f64(QUEUE_BYTES / bw);
                round > base + QUEUE_DELAY.max(base / QUEUE_SHARE).max(serial)
            }
            _ => false,
        };

        if lossy {
            // Over-full: down to what got through this round, but by no more
            // than a multiplicative step (a round may end just after a pause).
            let best = self.bandwidth().unwrap_or(0.0);
            self.reset_estimate(delivered.max(best * LOSS_BETA), now);
            if self.mode == Mode::Startup {
                self.mode = Mode::Drain;
            }
            return;
        }
        if queued && self.mode == Mode::Startup {
            // Startup's own queue: the path is full; drain it.
            self.mode = Mode::Drain;
            return;
        }
        if queued {
            // Someone else's queue (or a probe's that outlived its drain):
            // give way, and do not probe into it.
            if let Some(bw) = self.bandwidth() {
                self.ceiling = Some(self.reset_estimate(bw * YIELD_BETA, now));
            }
            self.fast = None;
            self.yields += 1;
            if self.mode == Mode::Cruise && self.phase == 0 {
                self.phase = 1;
            }
            return;
        }
        if self.ceiling.take().is_some() && self.mode == Mode::Cruise {
            // The queue is gone: whoever filled it left, or gave way. Probe
            // and drain in turn, not once a cycle, while probing finds more.
            self.fast = Some(self.bandwidth().unwrap_or(0.0));
            self.phase = 0;
            self.phase_start = now;
            return;
        }
        if self.mode != Mode::Startup {
            return;
        }
        // Only a round that measured something says the path is full.
        let Some(bw) = self
            .bandwidth()
            .filter(|_| std::mem::take(&mut self.sampled))
        else {
            return;
        };
        if bw > self.full_bw * 1.25 {
            self.full_bw = bw;
            self.full_rounds = 0;
        } else {
            self.full_rounds += 1;
            if self.full_rounds >= 3 {
                self.mode = Mode::Drain;
            }
        }
    }

    /// Forgets the delivery-rate samples: the estimate is `bw` (at least
    /// [`MIN_RATE`]) from `now`, which is returned.
    fn reset_estimate(&mut self, bw: f64, now: Instant) -> f64 {
        let bw = bw.max(MIN_RATE);
        self.bw.clear();
        self.bw.push_back((now, bw));
        bw
    }

    /// Whether the path is still being sized (for tests and logs).
    pub fn in_startup(&self) -> bool {
        self.mode == Mode::Startup
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_follows_delivery_not_loss() {
        let t0 = Instant::now();
        let mut r = Rate::new(None, t0);
        r.on_rtt(Duration::from_millis(100), t0);
        let mut now = t0;
        // A path delivering 10 MB/s: startup finds it, then cruises at it.
        for i in 0..200 {
            now += Duration::from_millis(10);
            r.on_sample(10e6, false, now);
            r.on_rtt(Duration::from_millis(100), now);
            // Half a percent lost each round is far below the limit.
            r.on_ack(100_000, 500, if i < 50 { 3_000_000 } else { 500_000 }, now);
        }
        assert!(!r.in_startup());
        let rate = r.pacing_rate();
        assert!((7.4e6..=12.6e6).contains(&rate), "{rate}");
        let w = r.window();
        assert!((1_900_000..2_300_000).contains(&w), "{w}");
    }

    #[test]
    fn heavy_loss_takes_the_estimate_down_and_a_cap_holds() {
        let t0 = Instant::now();
        let mut r = Rate::new(Some(5e6), t0);
        r.on_rtt(Duration::from_millis(20), t0);
        r.on_sample(50e6, false, t0);
        assert_eq!(r.pacing_rate(), 5e6, "capped");
        let mut now = t0;
        for _ in 0..80 {
            now += Duration::from_millis(25);
            r.on_ack(10_000, 10_000, 0, now);
        }
        assert!(r.bandwidth().unwrap() < 1e6, "{:?}", r.bandwidth());
    }

    #[test]
    fn an_app_limited_sample_never_lowers_the_estimate() {
        let t0 = Instant::now();
        let mut r = Rate::new(None, t0);
        r.on_sample(8e6, false, t0);
        r.on_sample(1e6, true, t0);
        assert_eq!(r.bandwidth(), Some(8e6));
        r.on_sample(9e6, true, t0);
        assert_eq!(r.bandwidth(), Some(9e6));
    }
}
