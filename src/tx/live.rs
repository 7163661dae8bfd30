//! A running sender's side of the controls ([`crate::control`]): its
//! report, its status document, and the commands that change its
//! destinations while the stream goes on.

use super::window::Window;
use super::{spawn_worker, Crew, Source};
use crate::config::Destination;
use crate::control::{Command, Running};
use crate::error::Error;
use crate::stats::{human_bytes, Clock, Link, LinkState};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

/// Outstanding work without progress for this long makes a sender degraded.
pub const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Every worker's counters, in worker order; grows as destinations are
/// added.
#[derive(Debug, Default)]
pub struct Links(RwLock<Vec<Arc<Link>>>);

impl Links {
    /// Links for these labels.
    pub fn new(labels: Vec<String>) -> Links {
        Links(RwLock::new(
            labels.into_iter().map(|l| Arc::new(Link::new(l))).collect(),
        ))
    }

    /// Worker `w`'s.
    pub fn get(&self, w: usize) -> Arc<Link> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner())[w])
    }

    /// All of them, now.
    pub fn all(&self) -> Vec<Arc<Link>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds worker `w`'s link (the next index).
    fn push(&self, w: usize, label: String) {
        let mut links = self.0.write().unwrap_or_else(|p| p.into_inner());
        debug_assert_eq!(links.len(), w, "links are added in worker order");
        links.push(Arc::new(Link::new(label)));
    }
}

/// One destination as the operator sees it.
#[derive(Clone, Debug)]
struct Place {
    destination: Destination,
    /// `threads N` given for it.
    threads: Option<usize>,
    drained: bool,
}

impl Place {
    fn limit(&self) -> Option<usize> {
        match self.drained {
            true => Some(0),
            false => self.threads,
        }
    }
}

/// What a running sender shares with its controls.
pub struct Live {
    pub(super) window: Arc<Window>,
    pub(super) links: Arc<Links>,
    pub(super) clock: Arc<Clock>,
    pub(super) read: Arc<AtomicU64>,
    pub(super) accepting: bool,
    /// What new workers need; taken away once the run is over.
    pub(super) crew: Mutex<Option<Arc<Crew>>>,
    /// `--rate` in bytes per second, 0 for none.
    pub(super) rate: Arc<AtomicU64>,
    /// The throughput series, once the monitor runs.
    pub(super) series: OnceLock<Arc<Mutex<Vec<u64>>>>,
    /// The destinations by rank (none when the receiver dials in).
    places: Mutex<Vec<Place>>,
    /// The run's `threads`.
    threads: usize,
}

impl Live {
    /// The controls of a sender that dials `destinations` (none: it
    /// accepts) with `threads` connections each.
    #[allow(clippy::too_many_arguments, reason = "the parts of a run, once")]
    pub(super) fn new(
        window: Arc<Window>,
        links: Arc<Links>,
        clock: Arc<Clock>,
        read: Arc<AtomicU64>,
        rate: Arc<AtomicU64>,
        destinations: &[Destination],
        threads: usize,
        accepting: bool,
    ) -> Live {
        Live {
            window,
            links,
            clock,
            read,
            accepting,
            crew: Mutex::new(None),
            rate,
            series: OnceLock::new(),
            places: Mutex::new(
                destinations
                    .iter()
                    .map(|d| Place {
                        destination: d.clone(),
                        threads: None,
                        drained: false,
                    })
                    .collect(),
            ),
            threads,
        }
    }

    fn places(&self) -> MutexGuard<'_, Vec<Place>> {
        self.places.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run is over: no more workers.
    pub(super) fn over(&self) {
        self.crew.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn find(places: &[Place], d: &Destination) -> Result<usize, String> {
        places
            .iter()
            .position(|p| p.destination.host == d.host && p.destination.port == d.port)
            .ok_or_else(|| {
                let known: Vec<String> = places.iter().map(|p| p.destination.to_string()).collect();
                format!(
                    "{d} is not a destination of this transfer (it has {})",
                    known.join(", ")
                )
            })
    }

    /// Starts workers `range`, all for `destination`.
    fn start(
        &self,
        range: std::ops::Range<usize>,
        destination: &Destination,
    ) -> Result<(), String> {
        let crew = self.crew.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let crew = crew.ok_or("the transfer has ended")?;
        for w in range {
            self.links.push(w, destination.to_string());
            spawn_worker(&crew, w, Source::Dial(destination.clone())).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn no_destinations(&self) -> Result<(), String> {
        match self.accepting {
            true => Err("this sender takes the receiver's connections (it listens): it has no destinations to change".into()),
            false => Ok(()),
        }
    }

    fn add(
        &self,
        destination: &Destination,
        threads: Option<u16>,
        rank: Option<usize>,
    ) -> Result<String, String> {
        self.no_destinations()?;
        let places = self.places();
        if let Ok(r) = Self::find(&places, destination) {
            return Err(format!(
                "{destination} is already destination {} of this transfer: use threads or undrain",
                r + 1
            ));
        }
        // Found out now, not by workers that would retry it forever.
        drop(places);
        resolves(destination)?;
        let mut places = self.places();
        if Self::find(&places, destination).is_ok() {
            return Err(format!("{destination} was added meanwhile"));
        }
        let n = threads.map_or(self.threads, usize::from);
        let at = rank.map_or(places.len(), |r| (r - 1).min(places.len()));
        let range = self
            .window
            .insert_rank(at, n, destination.to_string())
            .ok_or_else(|| {
                format!(
                    "no room for {n} more connections: a sender has at most {}",
                    super::window::MAX_WORKERS
                )
            })?;
        places.insert(
            at,
            Place {
                destination: destination.clone(),
                threads: None,
                drained: false,
            },
        );
        self.start(range, destination)?;
        Ok(format!(
            "added {destination} as rank {} of {}, with {n} connections",
            at + 1,
            places.len()
        ))
    }

    fn drain(&self, destination: &Destination, drained: bool) -> Result<String, String> {
        self.no_destinations()?;
        let mut places = self.places();
        let r = Self::find(&places, destination)?;
        if places[r].drained == drained {
            return Err(match drained {
                true => format!("{destination} is already drained"),
                false => format!("{destination} is not drained"),
            });
        }
        if drained && places.iter().enumerate().all(|(i, p)| i == r || p.drained) {
            return Err(format!(
                "{destination} is the only destination taking feet: add or undrain another first"
            ));
        }
        places[r].drained = drained;
        self.window.set_limit(r, places[r].limit());
        let snap = self.window.snapshot();
        let inflight: usize = (0..snap.rank.len())
            .filter(|&w| snap.rank[w] == r)
            .map(|w| snap.inflight[w])
            .sum();
        Ok(match drained {
            true => format!(
                "draining {destination}: no new feet go to it; its connections close once their {inflight} feet in flight are acknowledged"
            ),
            false => format!("{destination} takes feet again"),
        })
    }

    fn set_threads(&self, destination: &Destination, n: u16) -> Result<String, String> {
        self.no_destinations()?;
        let mut places = self.places();
        let r = Self::find(&places, destination)?;
        let n = usize::from(n);
        let have = self.window.rank_slots(r);
        if n > have {
            let range = self.window.add_slots(r, n - have).ok_or_else(|| {
                format!(
                    "no room for {} more connections: a sender has at most {}",
                    n - have,
                    super::window::MAX_WORKERS
                )
            })?;
            self.start(range, destination)?;
        }
        places[r].threads = Some(n);
        self.window.set_limit(r, places[r].limit());
        Ok(match places[r].drained {
            true => format!("{destination} will use {n} connections once undrained"),
            false => format!("{destination} now uses {n} connections"),
        })
    }

    fn set_rate(&self, rate: Option<u64>) -> String {
        self.rate.store(rate.unwrap_or(0), Relaxed);
        match rate {
            Some(r) => format!("rate limit now {}/s", human_bytes(r)),
            None => "no rate limit now".into(),
        }
    }
}

impl Running for Live {
    fn report(&self) -> String {
        let links = self.links.all();
        super::report(
            &self.window,
            &links,
            &self.clock,
            self.read.load(Relaxed),
            self.accepting,
        )
    }

    fn status(&self) -> Value {
        let snap = self.window.snapshot();
        let links = self.links.all();
        let places = self.places().clone();
        let mut problems: Vec<String> = Vec::new();
        let finished = self.window.is_finished();
        // Still making its first connections: not yet a problem.
        let starting = snap.delivered_bytes == 0
            && self.clock.elapsed() < STUCK_AFTER
            && links
                .iter()
                .all(|l| matches!(l.state(), LinkState::Connecting | LinkState::Parked));
        let connections: Vec<Value> = links
            .iter()
            .enumerate()
            .filter(|(w, link)| {
                // An accepting sender lists only the slots the receiver dialed.
                !self.accepting
                    || link.feet() > 0
                    || link.state() != LinkState::Connecting
                    || snap.inflight.get(*w).is_some_and(|&n| n > 0)
            })
            .map(|(w, link)| {
                let rank = snap.rank.get(w).copied().unwrap_or(0);
                json!({
                    "peer": link.peer,
                    "bytes": link.bytes(),
                    "wire_bytes": link.wire_bytes(),
                    "feet": link.feet(),
                    "reconnects": link.reconnects(),
                    "worker": w,
                    "rank": rank + 1,
                    "state": link.state().name(),
                    "enabled": snap.enabled.get(w).copied().unwrap_or(false),
                    "inflight": snap.inflight.get(w).copied().unwrap_or(0),
                    "rate": snap.rate.get(w).copied().flatten().map(|r| r.round() as u64),
                })
            })
            .collect();
        let destinations: Vec<Value> = places
            .iter()
            .enumerate()
            .map(|(r, p)| {
                let of: Vec<usize> = (0..snap.rank.len())
                    .filter(|&w| snap.rank[w] == r)
                    .collect();
                let up = of
                    .iter()
                    .filter(|&&w| {
                        links.get(w).is_some_and(|l| {
                            matches!(l.state(), LinkState::Idle | LinkState::Sending)
                        })
                    })
                    .count();
                let inflight: usize = of.iter().map(|&w| snap.inflight[w]).sum();
                let bytes: u64 = of
                    .iter()
                    .filter_map(|&w| links.get(w))
                    .map(|l| l.bytes())
                    .sum();
                let in_use = of.iter().filter(|&&w| snap.enabled[w]).count();
                // A destination on standby (threads auto has not spilled
                // to it) is not a problem; one meant to carry feet is.
                if !p.drained && in_use > 0 && up == 0 && !finished && !starting {
                    problems.push(format!("no connection to {} is up", p.destination));
                }
                json!({
                    "destination": p.destination.to_string(),
                    "rank": r + 1,
                    "drained": p.drained,
                    "threads": in_use,
                    "connected": up,
                    "inflight": inflight,
                    "bytes": bytes,
                })
            })
            .collect();
        if snap.connected == 0
            && !finished
            && !starting
            && !problems.iter().any(|p| p.starts_with("no connection"))
        {
            problems.push("no connection is up".into());
        }
        if let Some(stuck) = self.window.stuck_for().filter(|&d| d >= STUCK_AFTER) {
            problems.push(format!("nothing delivered for {} s", stuck.as_secs()));
        }
        let throughput = self
            .series
            .get()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default();
        let rate = self.rate.load(Relaxed);
        json!({
            "role": "tx",
            "payload_bytes": self.read.load(Relaxed),
            "wire_bytes": links.iter().map(|l| l.wire_bytes()).sum::<u64>(),
            "seconds": self.clock.elapsed().as_secs_f64(),
            "feet": links.iter().map(|l| l.feet()).sum::<u64>(),
            "retransmits": snap.retransmits,
            "reconnects": links.iter().map(|l| l.reconnects()).sum::<u64>(),
            "throughput": throughput,
            "connections": connections,
            "state": match (finished, starting) {
                (true, _) => "ending",
                (false, true) => "starting",
                (false, false) => "running",
            },
            "delivered_bytes": snap.delivered_bytes,
            "rate_limit": (rate > 0).then_some(rate),
            "window": {
                "feet": self.window.size(),
                "ahead": snap.ahead,
                "unacknowledged": snap.held,
                "queued": snap.queued,
                "delivered_feet": snap.delivered,
            },
            "destinations": destinations,
            "problems": problems,
        })
    }

    fn stop(&self, why: &str, sig: i32) {
        self.window.cancel(why.to_string(), Error::Interrupted(sig));
    }

    fn command(&self, command: &Command) -> Result<String, String> {
        match command {
            Command::Add {
                destination,
                threads,
                rank,
            } => self.add(destination, *threads, *rank),
            Command::Drain(d) => self.drain(d, true),
            Command::Undrain(d) => self.drain(d, false),
            Command::Threads {
                destination,
                threads,
            } => self.set_threads(destination, *threads),
            Command::Rate(r) => Ok(self.set_rate(*r)),
            Command::Status | Command::Stop => Err("handled by the controls".into()),
        }
    }
}

/// Whether `d`'s name resolves to an address (of the local address's
/// family, if it has one).
fn resolves(d: &Destination) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let addrs = (d.host.as_str(), d.port)
        .to_socket_addrs()
        .map_err(|e| format!("{}: does not resolve: {e}", d.host))?;
    let mut addrs = addrs.filter(|a| d.local.is_none_or(|l| l.is_ipv4() == a.is_ipv4()));
    match addrs.next() {
        Some(_) => Ok(()),
        None => Err(format!("{}: resolves to no address to send to", d.host)),
    }
}
