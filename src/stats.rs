//! Counters shared between the threads that move data and the thread that
//! reports on SIGUSR1, and the formatting of their report.
//!
//! Everything is an atomic, updated once per foot, so keeping stats costs
//! nothing measurable on the data path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one connection is doing right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    /// Resolving, connecting or handshaking.
    Connecting = 0,
    /// Connected, waiting for a foot (or for acknowledgements).
    Idle = 1,
    /// Writing a foot.
    Sending = 2,
    /// Lost its connection; waiting before the next attempt.
    Backoff = 3,
    /// Finished.
    Closed = 4,
    /// Receiving (rx side).
    Receiving = 5,
    /// Not in use: beyond the count `threads auto` chose, or its
    /// destination drained.
    Parked = 6,
}

impl LinkState {
    /// Its name in reports and the status document.
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Idle => "idle",
            LinkState::Sending => "sending",
            LinkState::Backoff => "backoff",
            LinkState::Closed => "closed",
            LinkState::Receiving => "receiving",
            LinkState::Parked => "parked",
        }
    }

    fn from_u8(b: u8) -> LinkState {
        match b {
            0 => LinkState::Connecting,
            1 => LinkState::Idle,
            2 => LinkState::Sending,
            3 => LinkState::Backoff,
            5 => LinkState::Receiving,
            6 => LinkState::Parked,
            _ => LinkState::Closed,
        }
    }
}

/// Per-connection counters.
#[derive(Debug)]
pub struct Link {
    /// Where this connection goes (tx) or comes from (rx).
    pub peer: String,
    state: AtomicU8,
    bytes: AtomicU64,
    feet: AtomicU64,
    wire: AtomicU64,
    reconnects: AtomicU64,
}

impl Link {
    /// A link in the `Connecting` state.
    pub fn new(peer: String) -> Link {
        Link {
            peer,
            state: AtomicU8::new(LinkState::Connecting as u8),
            bytes: AtomicU64::new(0),
            feet: AtomicU64::new(0),
            wire: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    /// Sets the state.
    pub fn set_state(&self, s: LinkState) {
        self.state.store(s as u8, Relaxed);
    }

    /// The current state.
    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Relaxed))
    }

    /// Counts one foot of `bytes` payload bytes.
    pub fn count_foot(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Relaxed);
        self.feet.fetch_add(1, Relaxed);
    }

    /// Counts bytes on the wire (headers, payloads, checksums, tags).
    pub fn count_wire(&self, bytes: u64) {
        self.wire.fetch_add(bytes, Relaxed);
    }

    /// Bytes on the wire.
    pub fn wire_bytes(&self) -> u64 {
        self.wire.load(Relaxed)
    }

    /// Counts a reconnection.
    pub fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Relaxed);
    }

    /// Payload bytes carried.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    /// Feet carried.
    pub fn feet(&self) -> u64 {
        self.feet.load(Relaxed)
    }

    /// Reconnections made.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Relaxed)
    }

    /// One report line for this link.
    pub fn line(&self, name: &str, extra: &str) -> String {
        format!(
            "  {name:<10} {:<11} {:<28} {:>10} {:>7} feet {:>3} reconnects{extra}",
            self.state().name(),
            self.peer,
            human_bytes(self.bytes()),
            self.feet(),
            self.reconnects()
        )
    }
}

/// Whole-stream throughput: the average since start and the rate since the
/// previous report.
#[derive(Debug)]
pub struct Clock {
    start: Mutex<Instant>,
    last: Mutex<(Instant, u64)>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// Starts the clock now.
    pub fn new() -> Clock {
        let now = Instant::now();
        Clock {
            start: Mutex::new(now),
            last: Mutex::new((now, 0)),
        }
    }

    /// Starts the clock again, now (rx: at the first connection).
    pub fn restart(&self) {
        let now = Instant::now();
        *self.start.lock().unwrap_or_else(|p| p.into_inner()) = now;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = (now, 0);
    }

    fn started(&self) -> Instant {
        *self.start.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time since start.
    pub fn elapsed(&self) -> Duration {
        self.started().elapsed()
    }

    /// "elapsed, average rate, current rate" for `bytes` moved so far.
    pub fn summary(&self, bytes: u64) -> String {
        let now = Instant::now();
        let elapsed = now - self.started();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let current = rate(bytes.saturating_sub(last.1), now - last.0);
        *last = (now, bytes);
        format!(
            "{} in {:.1} s, average {}, current {}",
            human_bytes(bytes),
            elapsed.as_secs_f64(),
            rate(bytes, elapsed),
            current
        )
    }
}

/// `bytes` over `d` as a human-readable rate.
pub fn rate(bytes: u64, d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs <= 0.0 {
        return "-".into();
    }
    let per_sec = bytes as f64 / secs;
    format!(
        "{}/s ({:.1} Mbit/s)",
        human_bytes(per_sec as u64),
        per_sec * 8.0 / 1e6
    )
}

/// A duration for people: "45 s", "5 min", "2 min 30 s".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match (s / 60, s % 60) {
        (0, s) => format!("{s} s"),
        (m, 0) => format!("{m} min"),
        (m, s) => format!("{m} min {s} s"),
    }
}

/// A byte count in B, KiB, MiB, GiB or TiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        let mut s = String::new();
        let _ = write!(s, "{v:.1} {}", UNITS[unit]);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn link_counts() {
        let l = Link::new("h:1".into());
        l.count_foot(10);
        l.count_foot(5);
        l.count_reconnect();
        l.set_state(LinkState::Sending);
        assert_eq!(
            (l.bytes(), l.feet(), l.reconnects(), l.state()),
            (15, 2, 1, LinkState::Sending)
        );
        assert!(l.line("worker-0", "").contains("sending"));
    }
}
