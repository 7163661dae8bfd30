//! A relay: `viamillipede relay PORT ... tx HOST PORT ...` takes a sender's
//! connections and carries each one on to a next hop, frame by frame.
//!
//! Every connection that reaches the relay gets a connection of its own to
//! one of the next hop's ranked destinations (the first until it has
//! `threads` of them, then the next), with the same session, foot size,
//! window and worker, so the next hop sees the sender's connections as if
//! they came straight from it. Feet go on as they arrive, in no particular
//! order; what the next hop answers (acknowledgements, the window, the end
//! of the stream, an abort) goes back the same way. The sender therefore
//! lets go of a foot only once the hop after the relay has it, and exits 0
//! only once the last receiver wrote every byte. Nothing is kept in order
//! or stored: a relay holds at most one foot per connection, and the
//! sender's window bounds how many are in flight.
//!
//! Each hop has its own keys and terms: the options before `tx` are the
//! listening side's (`--key-file` of the hop from the sender), those after
//! it the next hop's. The relay proves the upstream key before it dials
//! anything; a next hop it cannot reach is told upstream as
//! [`Reason::Unavailable`] (proven), which the sender takes as a reason to
//! try again or elsewhere, never to stop. A relay that dies costs the
//! sender its connections through it: their feet are sent again, through
//! another relay given as another destination, or this one once it is
//! back.

use crate::config::{Config, Destination, Mode};
use crate::control::{Command, Running};
use crate::crypto::{self, Opener, Sealer, PROOF_LEN};
use crate::error::{shown, Error, Result};
use crate::pool::Buffer;
use crate::protocol::handshake::{Hello, FLAG_CHECKSUMS, FLAG_ENCRYPT, FLAG_UDP};
use crate::protocol::negotiate::{
    name_of, Agreed, Offer, RxNegotiation, RxStep, Terms, TxNegotiation, TxStep, Verdict,
};
use crate::protocol::{HandshakeError, Kind, Reason, MAX_FOOT, MAX_WINDOW, MAX_WINDOW_BYTES};
use crate::wire::{FrameReader, FrameWriter};
use crate::{net, wire};
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a write may make no progress before its pair is dropped: a
/// hop gone dark, whose TCP would otherwise hold the pair for many minutes.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The most connections a relay carries at once.
pub const MAX_PAIRS: usize = 1024;

/// What the relay needs from the two command lines: `up` (an rx's,
/// listening) and `down` (a tx's, with the next hop's destinations).
pub struct Relay {
    up: Config,
    down: Config,
    destinations: Vec<Destination>,
    /// Sent in the challenge, before the next hop's receiver is known.
    id: [u8; 8],
    pairs: Mutex<Vec<Pair>>,
    next_pair: AtomicU64,
    stopped: Mutex<Option<i32>>,
    stopping: AtomicBool,
    /// Where the listener is, to wake its accept on a stop.
    local: Mutex<Option<SocketAddr>>,
    /// The last time a next hop could not be reached, and why.
    trouble: Mutex<Option<(Instant, String)>>,
    relayed: AtomicU64,
    refused: AtomicU64,
    /// Connections accepted and not yet ended, handshakes included.
    slots: AtomicUsize,
    /// Bytes of foot buffers reserved by the pairs.
    memory: AtomicU64,
    /// Dials in progress per rank, counted with the pairs in [`Relay::order`].
    dialing: Mutex<Vec<usize>>,
    /// When each rank last failed to take a connection.
    failed: Mutex<Vec<Option<Instant>>>,
    /// Local addresses of dials in progress: a connection from one of them
    /// is this relay reaching itself.
    own: Mutex<Vec<SocketAddr>>,
}

/// What the pairs' foot buffers may take together.
pub const MEMORY: u64 = crate::config::DEFAULT_MAX_MEMORY;

/// A rank that failed this recently is tried after the others.
const FAILED_FOR: Duration = Duration::from_secs(30);

/// The longest a connect to a next hop may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What is kept back of the sender's handshake time for the answer to
/// reach it.
const MARGIN: Duration = Duration::from_secs(1);

/// Gives back a slot (and memory) when a connection ends.
struct Held<'a> {
    relay: &'a Relay,
    memory: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.relay.slots.fetch_sub(1, Ordering::AcqRel);
        self.relay.memory.fetch_sub(self.memory, Ordering::AcqRel);
    }
}

/// One connection carried through.
struct Pair {
    id: u64,
    upstream: SocketAddr,
    rank: usize,
    session: [u8; 16],
    feet: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

/// A problem is reported this long after a next hop failed.
const TROUBLE_FOR: Duration = Duration::from_secs(30);

impl Relay {
    /// A relay from the listening side's configuration (`Mode::Rx`) to the
    /// next hop's (`Mode::Tx`).
    pub fn new(up: Config, down: Config) -> Result<Relay> {
        let Mode::Tx { destinations } = down.mode.clone() else {
            return Err(Error::Usage(
                "relay: give the next hop as tx HOST PORT [tx HOST PORT ...]".into(),
            ));
        };
        if !matches!(up.mode, Mode::Rx { .. }) {
            return Err(Error::Usage(
                "relay: give the port to listen on first: relay PORT tx HOST PORT".into(),
            ));
        }
        if up.key.is_some() != down.key.is_some() {
            return Err(Error::Usage(
                "relay: give both hops a key (--key-file before and after tx) or neither: a keyed sender would otherwise trust what an unkeyed hop says".into(),
            ));
        }
        if up.exec.is_some() {
            return Err(Error::Usage(
                "relay: --exec is a receiver's: a relay carries streams on".into(),
            ));
        }
        if down.udp {
            return Err(Error::Usage(
                "relay: --udp is not carried through a relay: the hops are TCP".into(),
            ));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&crypto::nonce()?[..8]);
        Ok(Relay {
            up,
            down,
            id,
            pairs: Mutex::default(),
            next_pair: AtomicU64::new(0),
            stopped: Mutex::default(),
            stopping: AtomicBool::new(false),
            local: Mutex::default(),
            trouble: Mutex::default(),
            relayed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            slots: AtomicUsize::new(0),
            memory: AtomicU64::new(0),
            dialing: Mutex::new(vec![0; destinations.len()]),
            failed: Mutex::new(vec![None; destinations.len()]),
            own: Mutex::default(),
            destinations,
        })
    }

    fn pairs(&self) -> MutexGuard<'_, Vec<Pair>> {
        self.pairs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Listens and relays until stopped (through the listening side's
    /// controls, as SIGINT does): then the error says by what.
    pub fn run(self: &Arc<Relay>) -> Result<()> {
        let Mode::Rx { addr, port } = &self.up.mode else {
            unreachable!("checked in new");
        };
        let listener = net::listen(addr.as_deref(), *port, &self.up.socket)
            .map_err(|e| Error::io(format!("listen on port {port}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("listener address", e))?;
        *self.local.lock().unwrap_or_else(|p| p.into_inner()) = Some(local);
        let to: Vec<String> = self.destinations.iter().map(|d| d.to_string()).collect();
        let _ = writeln!(
            io::stderr(),
            "viamillipede: relaying to {}; listening on {local}",
            to.join(", ")
        );
        let _attached = self
            .up
            .controls
            .as_ref()
            .map(|c| c.attach(Arc::clone(self) as Arc<dyn Running>));
        let gate = net::Gate::new();
        net::accept_loop(
            &listener,
            || !self.stopping.load(Ordering::Acquire),
            |stream, peer| {
                if self.slots.fetch_add(1, Ordering::AcqRel) >= MAX_PAIRS {
                    self.slots.fetch_sub(1, Ordering::AcqRel);
                    log::warn!("{peer}: refused: {MAX_PAIRS} connections are relayed already");
                    net::abortive_close(&stream);
                    return true;
                }
                let pass = gate.enter(&stream, peer.ip());
                let relay = Arc::clone(self);
                let spawned = std::thread::Builder::new()
                    .name(format!("relay-{peer}"))
                    .spawn(move || relay.carry(stream, peer, pass));
                if let Err(e) = spawned {
                    log::warn!("{peer}: no thread for the connection: {e}");
                    self.slots.fetch_sub(1, Ordering::AcqRel);
                }
                true
            },
        );
        let sig = self
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(crate::control::STOP_SIGNAL);
        Err(Error::Interrupted(sig))
    }

    /// Serves one upstream connection to its end.
    fn carry(&self, mut up: TcpStream, peer: SocketAddr, pass: net::Pass) {
        let mut held = Held {
            relay: self,
            memory: 0,
        };
        let Some(opened) = self.open(&mut up, peer, pass, &mut held) else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Opened {
            down,
            rank,
            hello,
            up_agreed,
            down_agreed,
        } = opened;
        // Whatever ends this pair but a clean close on one side (a fault,
        // a stop, this process killed) reaches both peers as a reset, never
        // as a close a receiver could take for the sender's.
        net::abortive_close(&up);
        net::abortive_close(&down);
        let id = self.next_pair.fetch_add(1, Ordering::Relaxed);
        let (feet, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        self.pairs().push(Pair {
            id,
            upstream: peer,
            rank,
            session: hello.session,
            feet: Arc::clone(&feet),
            bytes: Arc::clone(&bytes),
        });
        self.relayed.fetch_add(1, Ordering::Relaxed);
        log::info!("{peer}: relayed to {}", self.destinations[rank]);
        let up_channel = channel(&self.up, &up_agreed, false);
        let down_channel = channel(&self.down, &down_agreed, true);
        let (up_sealer, up_opener) = up_channel.unzip();
        let (down_sealer, down_opener) = down_channel.unzip();
        let ends = (&up, &down);
        let counters = (&*feet, &*bytes);
        let broken = AtomicBool::new(false);
        let broken = &broken;
        // Signs of life for the sender, as a receiver gives them: what has
        // arrived here from it plus what the next hop says has arrived
        // there. Either hop moving shows; both standing still (the next
        // hop dark, and this one held back by it) shows too. The next hop
        // sees a foot only once it is whole here: without this, a slow
        // first hop, or a slow second one behind a fast first, would look
        // stalled.
        let (arrived, there, unheard) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        let (arrived, there, unheard) = (&arrived, &there, &unheard);
        let up_writer = Mutex::new(FrameWriter::new(ends.0, up_sealer));
        let up_writer = &up_writer;
        let (stop_ticks, ticks) = crossbeam_channel::bounded::<()>(0);
        let outcome = std::thread::scope(|s| {
            s.spawn(move || tell_progress(&ticks, [arrived, there], up_writer));
            let back = s.spawn(move || {
                let reader =
                    FrameReader::new(Counting::new(ends.1, unheard), down_opener, hello.foot_size)
                        .with_checksums(down_agreed.checksums);
                let back = answers(reader, up_writer, there, broken);
                end(&back, ends.1, ends.0, broken);
                back
            });
            let reader =
                FrameReader::new(Counting::new(ends.0, arrived), up_opener, hello.foot_size)
                    .with_checksums(up_agreed.checksums);
            let writer =
                FrameWriter::new(ends.1, down_sealer).with_checksums(down_agreed.checksums);
            let forth = feet_on(reader, writer, counters, broken);
            if forth.is_ok() {
                // The sender closed: what the next hop still says must
                // come within the write timeout's time, or not at all.
                let _ = ends.1.set_read_timeout(Some(WRITE_TIMEOUT));
            }
            end(&forth, ends.0, ends.1, broken);
            let back = back
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("panicked")));
            drop(stop_ticks);
            (forth, back)
        });
        match outcome {
            (Err(e), _) | (_, Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                log::warn!("{peer}: protocol violation, connection dropped: {e}");
            }
            (Err(e), _) | (_, Err(e)) => log::info!("{peer}: connection lost: {e}"),
            _ => log::debug!("{peer}: closed"),
        }
        self.pairs().retain(|p| p.id != id);
        drop(held);
    }

    /// The handshake upstream, then one downstream on its terms; None when
    /// the connection is not carried (the reason is logged, and told
    /// upstream where it is worth it).
    fn open(
        &self,
        up: &mut TcpStream,
        peer: SocketAddr,
        pass: net::Pass,
        held: &mut Held<'_>,
    ) -> Option<Opened> {
        let limit = self.up.handshake_timeout;
        up.set_write_timeout(Some(limit)).ok()?;
        let deadline = Instant::now() + limit;
        let nonce = crypto::nonce().ok()?;
        let mut negotiation = RxNegotiation::new(terms(&self.up), self.id, nonce);
        let mut input = net::Deadline {
            stream: up,
            until: deadline,
        };
        let mut step = match wire::read_hello_bytes(&mut input) {
            Ok((_, bytes)) => negotiation.on_hello(&bytes),
            Err(HandshakeError::Io(_, e)) => RxStep::Drop(format!("no handshake: {e}")),
            Err(e) => negotiation.on_bad_hello(e),
        };
        if let RxStep::Challenge(challenge) = &step {
            up.write_all(challenge).ok()?;
            let mut proof = [0u8; PROOF_LEN];
            let mut input = net::Deadline {
                stream: up,
                until: deadline,
            };
            step = match input.read_exact(&mut proof) {
                Ok(()) => negotiation.on_proof(&proof),
                Err(e) => RxStep::Drop(format!("the sender did not prove the key: {e}")),
            };
        }
        // Past the handshake's first part (with a key: proven), a sender
        // gives up its place at the gate to those still in theirs.
        drop(pass);
        let hello = match step {
            RxStep::Decide(hello) => hello,
            RxStep::Refuse(bytes, why) => {
                log::warn!("{peer}: refused: {}", shown(&why));
                let _ = up.write_all(&bytes);
                return None;
            }
            RxStep::Drop(why) => {
                log::info!("{peer}: {}", shown(&why));
                net::abortive_close(up);
                return None;
            }
            RxStep::Challenge(_) => unreachable!("one challenge per handshake"),
        };
        // The sender is who it says (with a key): only now is anything
        // dialed on its behalf, within what is left of its time.
        let until = deadline.checked_sub(MARGIN).unwrap_or(deadline);
        let (verdict, receiver, down) = match self.admit(&hello, peer, held) {
            Err((reason, why)) => {
                log::warn!("{peer}: refused: {why}");
                (Verdict::Reject(reason, why), self.id, None)
            }
            Ok(()) => match self.onward(&hello, until) {
                Onward::Accepted(down, rank, agreed) => {
                    let verdict = Verdict::Accept {
                        delivered: agreed.delivered,
                        udp: None,
                    };
                    (verdict, agreed.receiver, Some((down, rank, agreed)))
                }
                Onward::Complete(bytes) => (Verdict::Complete(bytes), self.id, None),
                Onward::Refused(reason, why) => {
                    log::warn!("{peer}: {why}");
                    (Verdict::Reject(reason, why), self.id, None)
                }
            },
        };
        let (answer, up_agreed) = negotiation.decide_as(verdict, receiver);
        up.write_all(&answer).ok()?;
        let (down, rank, down_agreed) = down?;
        let up_agreed = up_agreed?;
        let ready = up.set_read_timeout(None).is_ok()
            && up.set_write_timeout(Some(WRITE_TIMEOUT)).is_ok()
            && net::tune(up, &self.up.socket).is_ok()
            && down.set_read_timeout(None).is_ok()
            && down.set_write_timeout(Some(WRITE_TIMEOUT)).is_ok();
        ready.then_some(Opened {
            down,
            rank,
            hello,
            up_agreed,
            down_agreed,
        })
    }

    /// Whether the relay carries `hello`'s connection: its terms, a loop
    /// back to this relay, and the memory its feet take.
    fn admit(
        &self,
        hello: &Hello,
        peer: SocketAddr,
        held: &mut Held<'_>,
    ) -> std::result::Result<(), (Reason, String)> {
        check(hello).map_err(|why| (Reason::Parameters, why))?;
        if self.lock_own().contains(&peer) {
            return Err((
                Reason::Parameters,
                "relay loop: this relay's next hop leads back to itself".into(),
            ));
        }
        // A foot read from the sender, and its sealed copy for the next hop.
        let need = u64::from(hello.foot_size) * if self.down.encrypt { 2 } else { 1 };
        if self.memory.fetch_add(need, Ordering::AcqRel) + need > MEMORY {
            self.memory.fetch_sub(need, Ordering::AcqRel);
            return Err((
                Reason::Unavailable,
                format!(
                    "relay: its feet would take more than {} of memory: try again later or elsewhere",
                    crate::stats::human_bytes(MEMORY)
                ),
            ));
        }
        held.memory = need;
        Ok(())
    }

    fn lock_own(&self) -> MutexGuard<'_, Vec<SocketAddr>> {
        self.own.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ranks in the order the next connection tries them: those that
    /// did not fail lately first, then those with fewer than `threads`
    /// connections (dials in progress counted), then by load and rank.
    fn order(&self) -> Vec<usize> {
        let pairs = self.pairs();
        let dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let load = |r: usize| pairs.iter().filter(|p| p.rank == r).count() + dialing[r];
        let threads = usize::from(self.down.threads.max(1));
        let lately = |r: usize| failed[r].is_some_and(|at| at.elapsed() < FAILED_FOR);
        let mut ranks: Vec<usize> = (0..self.destinations.len()).collect();
        ranks.sort_by_key(|&r| (lately(r), load(r) >= threads, load(r) / threads, r));
        ranks
    }

    fn count_dial(&self, rank: usize, by: isize) {
        let mut d = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        d[rank] = d[rank].saturating_add_signed(by);
    }

    /// Dials the next hop for `hello` and shakes hands on the sender's
    /// behalf, by `until`.
    fn onward(&self, hello: &Hello, until: Instant) -> Onward {
        let mut failures = Vec::new();
        let order = self.order();
        for (i, &rank) in order.iter().enumerate() {
            let dest = &self.destinations[rank];
            let now = Instant::now();
            if now >= until {
                failures.push(format!("{dest}: not tried, out of time"));
                continue;
            }
            // A silent hop may take only its share of what is left, so
            // the ones after it are still tried in the sender's time.
            let share = until.saturating_duration_since(now) / (order.len() - i) as u32;
            self.count_dial(rank, 1);
            let outcome = self.dial(dest, hello, now + share);
            self.count_dial(rank, -1);
            match outcome {
                Ok(Onward::Refused(Reason::Unavailable, why)) => failures.push(why),
                Ok(Onward::Accepted(s, _, agreed)) => {
                    self.failed.lock().unwrap_or_else(|p| p.into_inner())[rank] = None;
                    return Onward::Accepted(s, rank, agreed);
                }
                Ok(other) => return other,
                Err(e) => failures.push(format!("{dest}: {e}")),
            }
            self.failed.lock().unwrap_or_else(|p| p.into_inner())[rank] = Some(Instant::now());
        }
        let why = format!(
            "relay: no next hop took the connection: {}",
            failures.join("; ")
        );
        *self.trouble.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), why.clone()));
        Onward::Refused(Reason::Unavailable, why)
    }

    fn dial(&self, dest: &Destination, hello: &Hello, until: Instant) -> io::Result<Onward> {
        let c = &self.down;
        let left = until.saturating_duration_since(Instant::now());
        let mut stream = net::connect(dest, CONNECT_TIMEOUT.min(left), &c.socket)?;
        let local = stream.local_addr()?;
        self.lock_own().push(local);
        let outcome = self.shake(&mut stream, dest, hello, until);
        self.lock_own().retain(|a| *a != local);
        Ok(match outcome? {
            Shaken::Accepted(agreed) => Onward::Accepted(stream, 0, agreed),
            Shaken::Complete(bytes) => Onward::Complete(bytes),
            Shaken::Refused(reason, why) => Onward::Refused(reason, why),
        })
    }

    /// The handshake with the next hop, as the sender's stand-in: what the
    /// sender asked for goes on, with what this hop asks.
    fn shake(
        &self,
        stream: &mut TcpStream,
        dest: &Destination,
        hello: &Hello,
        until: Instant,
    ) -> io::Result<Shaken> {
        let c = &self.down;
        net::tune(stream, &c.socket)?;
        stream.set_write_timeout(Some(
            until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))?;
        let asked = |flag: u16| hello.flags & flag != 0;
        let offer = Offer {
            terms: Terms {
                checksums: c.checksums || asked(FLAG_CHECKSUMS),
                encrypt: c.encrypt || asked(FLAG_ENCRYPT),
                ..terms(c)
            },
            session: hello.session,
            foot_size: hello.foot_size,
            window: hello.window,
            worker: hello.worker,
            name: name_of(hello),
        };
        let nonce = crypto::nonce().map_err(io::Error::other)?;
        let (mut negotiation, first) = TxNegotiation::new(&offer, nonce);
        stream.write_all(&first)?;
        loop {
            let mut input = net::Deadline { stream, until };
            let (_, answer) = wire::read_reply_bytes(&mut input).map_err(io::Error::other)?;
            match negotiation.on_reply(&answer) {
                TxStep::Send(proof) => stream.write_all(&proof)?,
                TxStep::Accepted(agreed) => return Ok(Shaken::Accepted(agreed)),
                TxStep::Complete { bytes, proven } if proven || c.key.is_none() => {
                    return Ok(Shaken::Complete(bytes))
                }
                TxStep::Complete { .. } => {
                    return Ok(Shaken::Refused(
                        Reason::Unavailable,
                        format!(
                            "{dest}: a peer that did not prove the key says the stream is complete"
                        ),
                    ))
                }
                // The last receiver proved the key and refused: the sender
                // hears it as it would from that receiver.
                TxStep::Refused(r) if r.proven && r.reason != Reason::Unavailable => {
                    return Ok(Shaken::Refused(r.reason, format!("{dest}: {}", r.message)))
                }
                TxStep::Refused(r) => {
                    return Ok(Shaken::Refused(
                        Reason::Unavailable,
                        format!("{dest}: {}", r.message),
                    ))
                }
            }
        }
    }

    fn stop_now(&self, sig: i32) {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(sig);
        self.stopping.store(true, Ordering::Release);
        // Wakes the accept, which sees the stop.
        if let Some(mut at) = *self.local.lock().unwrap_or_else(|p| p.into_inner()) {
            if at.ip().is_unspecified() {
                at.set_ip(match at {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let _ = TcpStream::connect_timeout(&at, Duration::from_secs(1));
        }
    }
}

struct Opened {
    down: TcpStream,
    rank: usize,
    hello: Hello,
    up_agreed: Agreed,
    down_agreed: Agreed,
}

/// How the handshake with a next hop ended.
enum Shaken {
    Accepted(Agreed),
    Complete(u64),
    Refused(Reason, String),
}

enum Onward {
    Accepted(TcpStream, usize, Agreed),
    Complete(u64),
    Refused(Reason, String),
}

fn terms(c: &Config) -> Terms {
    Terms {
        checkphrase: c.checkphrase,
        key: c.key.clone(),
        encrypt: c.encrypt,
        checksums: c.checksums,
        udp: false,
    }
}

/// The relay's own bounds on what it will carry (the last receiver checks
/// its own too): one foot per connection is what it holds.
fn check(hello: &Hello) -> std::result::Result<(), String> {
    if hello.flags & FLAG_UDP != 0 {
        return Err("a relay carries feet over TCP only: give the sender no --udp".into());
    }
    if hello.foot_size == 0 || hello.foot_size > MAX_FOOT {
        return Err(format!(
            "foot size {} is outside 1 to {MAX_FOOT}",
            hello.foot_size
        ));
    }
    if hello.window == 0
        || hello.window > MAX_WINDOW
        || u64::from(hello.window) * u64::from(hello.foot_size) > MAX_WINDOW_BYTES
    {
        return Err(format!(
            "window {} is outside what a relay carries",
            hello.window
        ));
    }
    Ok(())
}

fn channel(c: &Config, agreed: &Agreed, tx_side: bool) -> Option<(Sealer, Opener)> {
    match (&c.key, agreed.nonces) {
        (Some(key), Some(n)) => Some(key.channel(&n.tx, &n.rx, tx_side, agreed.encrypt)),
        _ => None,
    }
}

/// Counts what is read, so that an end of input can be told apart: at a
/// frame's start (the peer closed) or within one (cut off).
struct Counting<'a> {
    stream: &'a TcpStream,
    read: u64,
    /// The same count, for others to see.
    shared: &'a AtomicU64,
}

impl<'a> Counting<'a> {
    fn new(stream: &'a TcpStream, shared: &'a AtomicU64) -> Counting<'a> {
        Counting {
            stream,
            read: 0,
            shared,
        }
    }
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.stream;
        let n = s.read(buf)?;
        self.read += n as u64;
        self.shared.store(self.read, Ordering::Release);
        Ok(n)
    }
}

/// How often the relay tells the sender what has arrived, while it does.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Tells the sender, every [`PROGRESS_EVERY`] while they grow, the sum of
/// `counts` (see `carry`), until `ticks` closes.
fn tell_progress(
    ticks: &crossbeam_channel::Receiver<()>,
    counts: [&AtomicU64; 2],
    writer: &Mutex<FrameWriter<&TcpStream>>,
) {
    let mut told = 0;
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = ticks.recv_timeout(PROGRESS_EVERY)
    {
        let now: u64 = counts.iter().map(|c| c.load(Ordering::Acquire)).sum();
        if now > told {
            told = now;
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            let header = crate::protocol::Header::control(Kind::Progress, now);
            if w.send(&header, &[]).is_err() {
                return;
            }
        }
    }
}

/// The next header, or None where the peer closed cleanly: at a frame's
/// start, and not because the other direction broke (which shuts this
/// one's reading down).
fn next_header(
    reader: &mut FrameReader<Counting<'_>>,
    broken: &AtomicBool,
) -> io::Result<Option<crate::protocol::Header>> {
    let before = reader.get_mut().read;
    match reader.header() {
        Ok(h) => Ok(Some(h)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            if broken.load(Ordering::Acquire) {
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the other side failed",
                ))
            } else if reader.get_mut().read == before {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "cut off within a frame",
                ))
            }
        }
        Err(e) => Err(e),
    }
}

/// The sender's frames, on to the next hop. Ok at the sender's clean end.
fn feet_on(
    mut reader: FrameReader<Counting<'_>>,
    mut writer: FrameWriter<&TcpStream>,
    (feet, bytes): (&AtomicU64, &AtomicU64),
    broken: &AtomicBool,
) -> io::Result<()> {
    let mut buf = Buffer::default();
    while let Some(h) = next_header(&mut reader, broken)? {
        match h.kind {
            Kind::Foot => {
                reader.payload(&h, &mut buf)?;
                writer.send(&h, &buf)?;
                feet.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(u64::from(h.len), Ordering::Relaxed);
            }
            Kind::Cancel => {
                let why = reader.small_payload(&h)?;
                writer.send(&h, &why)?;
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a sender sent a {other:?} frame"),
                ))
            }
        }
    }
    Ok(())
}

/// The next hop's answers, back to the sender. Ok at the hop's clean end.
fn answers(
    mut reader: FrameReader<Counting<'_>>,
    writer: &Mutex<FrameWriter<&TcpStream>>,
    there: &AtomicU64,
    broken: &AtomicBool,
) -> io::Result<()> {
    while let Some(h) = next_header(&mut reader, broken)? {
        match h.kind {
            Kind::Ack | Kind::Window | Kind::Done | Kind::Abort => {
                let payload = reader.small_payload(&h)?;
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                w.send(&h, &payload)?;
            }
            // Told to the sender in the relay's own (see `carry`).
            Kind::Progress => {
                reader.small_payload(&h)?;
                there.fetch_max(h.id, Ordering::AcqRel);
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the next hop sent a {other:?} frame"),
                ))
            }
        }
    }
    Ok(())
}

/// One direction ended, reading `from` and writing `to`. A clean end goes
/// on as a clean end: the other direction may still carry the last
/// answers. A failure ends both without a clean close: reading is shut
/// down (which wakes the other direction's reader, told it is broken), and
/// both sockets reset when they are closed.
fn end(outcome: &io::Result<()>, from: &TcpStream, to: &TcpStream, broken: &AtomicBool) {
    match outcome {
        Ok(()) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(_) => {
            broken.store(true, Ordering::Release);
            let _ = from.shutdown(Shutdown::Read);
            let _ = to.shutdown(Shutdown::Read);
        }
    }
}

impl Running for Relay {
    fn report(&self) -> String {
        let pairs = self.pairs();
        let mut text = format!(
            "viamillipede relay: {} connections carried now, {} in all, {} refused\n",
            pairs.len(),
            self.relayed.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed)
        );
        for p in pairs.iter() {
            text.push_str(&format!(
                "  {} -> {}: {} feet, {}\n",
                p.upstream,
                self.destinations[p.rank],
                p.feet.load(Ordering::Relaxed),
                crate::stats::human_bytes(p.bytes.load(Ordering::Relaxed))
            ));
        }
        text
    }

    fn status(&self) -> Value {
        let pairs = self.pairs();
        let connections: Vec<Value> = pairs
            .iter()
            .map(|p| {
                json!({
                    "upstream": p.upstream.to_string(),
                    "destination": self.destinations[p.rank].to_string(),
                    "rank": p.rank + 1,
                    "session": p.session[..4].iter().map(|b| format!("{b:02x}")).collect::<String>(),
                    "feet": p.feet.load(Ordering::Relaxed),
                    "bytes": p.bytes.load(Ordering::Relaxed),
                })
            })
            .collect();
        let destinations: Vec<Value> = self
            .destinations
            .iter()
            .enumerate()
            .map(|(r, d)| {
                let of = pairs.iter().filter(|p| p.rank == r);
                json!({
                    "destination": d.to_string(),
                    "rank": r + 1,
                    "connections": of.clone().count(),
                    "bytes": of.map(|p| p.bytes.load(Ordering::Relaxed)).sum::<u64>(),
                })
            })
            .collect();
        let problems: Vec<String> = self
            .trouble
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(at, _)| at.elapsed() < TROUBLE_FOR)
            .map(|(_, why)| why.clone())
            .into_iter()
            .collect();
        json!({
            "role": "relay",
            "connections": connections,
            "destinations": destinations,
            "relayed": self.relayed.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
            "problems": problems,
        })
    }

    fn stop(&self, why: &str, sig: i32) {
        log::info!("relay: {why}");
        self.stop_now(sig);
    }

    fn command(&self, _: &Command) -> std::result::Result<String, String> {
        Err("a relay's next hops are set on its command line: only status and stop apply".into())
    }
}
