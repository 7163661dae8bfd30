//! The sending wing: stdin -> feet -> window -> workers -> sockets.
//!
//! One reader thread cuts stdin into full feet (only the last may be short)
//! and admits them to the [`window::Window`]; `threads` workers per
//! destination pull feet from it. The main thread waits for rx's final
//! confirmation, a fatal error, or the reconnect timeout.

pub mod count;
mod live;
pub mod schedule;
mod udp;
pub mod window;
mod worker;

use crate::config::{Config, Destination, Pacing};
use crate::error::{Error, Result};
use crate::monitor::Monitor;
use crate::net;
use crate::pool::Pool;
use crate::prbs::Prbs;
use crate::protocol::handshake::{Dial, DIAL_LEN};
use crate::report;
use crate::stats::{human_bytes, Clock, Link, LinkState};
use crate::Summary;
use schedule::Params;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use window::Window;
use xxhash_rust::xxh3::Xxh3Default;

/// How long to let workers close their connections after the outcome.
const LINGER: Duration = Duration::from_secs(2);

/// What tx sends: the pseudo-random stream of `prbs SEED`, or stdin.
pub fn input(config: &Config) -> Result<Box<dyn Read + Send>> {
    if let Some(seed) = config.prbs {
        return Ok(Box::new(Prbs::new(seed)));
    }
    let stdin = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("open stdin", e))?;
    Ok(Box::new(File::from(stdin)))
}

/// The command line's tx: through the library's [`crate::SenderBuilder`],
/// the input to the mode's destinations (most preferred first).
pub fn run(config: &Config) -> Result<Summary> {
    let config = sized(config);
    let input = input(&config)?;
    crate::SenderBuilder::from_config(config).send_from(input)
}

/// Sends the input to `destinations`, whatever mode `config` was made for
/// (the ssh mode's sending side).
pub fn run_to(config: &Config, destinations: &[Destination]) -> Result<Summary> {
    let mut config = config.clone();
    config.mode = crate::config::Mode::Tx {
        destinations: destinations.to_vec(),
    };
    run(&config)
}

/// `config` with the size of stdin for `--progress`, when stdin is a file
/// or a block device and no `--size` was given, as pv does.
pub fn sized(config: &Config) -> Config {
    let mut config = config.clone();
    if config.display.progress && config.display.size.is_none() && config.prbs.is_none() {
        config.display.size = stdin_size();
    }
    config
}

/// What is left to read of stdin, if it is a file or a block device: the
/// end found by seeking, and the offset put back.
fn stdin_size() -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    let fd = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    let mut file = File::from(fd);
    let kind = file.metadata().ok()?.file_type();
    {
        use std::os::unix::fs::FileTypeExt;
        if !kind.is_file() && !kind.is_block_device() {
            return None;
        }
    }
    let at = file.stream_position().ok()?;
    let end = file.seek(SeekFrom::End(0)).ok()?;
    file.seek(SeekFrom::Start(at)).ok()?;
    Some(end.saturating_sub(at))
}

/// Sends the input over the connections the receiver makes to
/// `[addr:]port` (reverse mode, `--listen`).
pub fn run_listening(config: &Config, addr: Option<&str>, port: u16) -> Result<Summary> {
    let listener = net::listen(addr, port, &config.socket)
        .map_err(|e| Error::io(format!("listen on port {port}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("read the listening address", e))?;
    let _ = writeln!(std::io::stderr(), "viamillipede: listening on {local}");
    let config = &sized(config);
    send(config, Connections::Accept(listener), input(config)?)
}

/// Where tx's connections come from.
pub enum Connections<'a> {
    /// Dial these destinations, most preferred first, `threads` each.
    Dial(&'a [Destination]),
    /// Take the connections the receiver makes to this listener.
    Accept(TcpListener),
}

/// Ranks a receiver may dial through in reverse mode, and connections per
/// rank: the slots of an accepting window.
const DIAL_RANKS: usize = 8;
const DIAL_INDEXES: usize = 64;

/// What every worker shares.
struct Crew {
    config: Config,
    window: Arc<Window>,
    links: Arc<live::Links>,
    session: [u8; 16],
    stop: crossbeam_channel::Receiver<()>,
    exited: crossbeam_channel::Sender<()>,
    paths: Arc<udp::Paths>,
}

/// How a worker gets its connections.
enum Source {
    Dial(Destination),
    Accept(crossbeam_channel::Receiver<DialedIn>),
}

fn spawn_worker(crew: &Arc<Crew>, w: usize, source: Source) -> Result<()> {
    let crew = Arc::clone(crew);
    std::thread::Builder::new()
        .name(format!("tx-worker-{w}"))
        .spawn(move || {
            let _guard = PanicGuard {
                window: &crew.window,
                exited: crew.exited.clone(),
                name: format!("tx-worker-{w}"),
            };
            let shared = worker::Shared {
                config: &crew.config,
                window: &crew.window,
                session: crew.session,
                stop: crew.stop.clone(),
                paths: &crew.paths,
            };
            let link = crew.links.get(w);
            match &source {
                Source::Dial(dest) => worker::run(&shared, w, dest, &link),
                Source::Accept(streams) => worker::run_accepted(&shared, w, streams, &link),
            }
        })
        .map(drop)
        .map_err(|e| Error::io("spawn worker thread", e))
}

/// A connection the receiver dialed, on its way to its slot's worker: its
/// place in the handshake gate, and when its handshake must be over (one
/// deadline for the preamble and the handshake).
pub struct DialedIn {
    stream: TcpStream,
    _pass: net::Pass,
    deadline: Instant,
}

impl DialedIn {
    /// The stream, when its handshake must be over, and its place in the
    /// gate (to keep until the handshake is).
    pub fn into_parts(self) -> (TcpStream, Instant, net::Pass) {
        (self.stream, self.deadline, self._pass)
    }
}

/// Takes the receiver's connections, reads which slot each is for, and
/// gives it to that slot's worker (started on its first connection). Anyone
/// may dial in: the preamble has the handshake's deadline, the gate bounds
/// how many are in their handshake, and a slot holds one waiting
/// connection at most.
fn accept(crew: &Arc<Crew>, listener: &TcpListener) {
    let workers: Arc<Mutex<HashMap<usize, crossbeam_channel::Sender<DialedIn>>>> = Arc::default();
    let gate = net::Gate::new();
    net::accept_loop(
        listener,
        || true,
        |stream, peer| {
            if crew.window.is_finished() {
                return false;
            }
            let pass = gate.enter(&stream, peer.ip());
            let (crew, workers) = (Arc::clone(crew), Arc::clone(&workers));
            let _ = std::thread::Builder::new()
                .name("tx-dial-in".into())
                .spawn(move || {
                    let deadline = Instant::now() + crew.config.handshake_timeout;
                    let mut b = [0u8; DIAL_LEN];
                    let read = net::Deadline {
                        stream: &stream,
                        until: deadline,
                    }
                    .read_exact(&mut b);
                    let dial = match read
                        .map_err(|e| e.to_string())
                        .and_then(|()| Dial::decode(&b).map_err(|e| e.to_string()))
                    {
                        Ok(d) => d,
                        Err(e) => return log::info!("{peer}: dropped: {e}"),
                    };
                    let (rank, index) = (usize::from(dial.rank), usize::from(dial.index));
                    if rank >= DIAL_RANKS || index >= DIAL_INDEXES {
                        return log::info!("{peer}: dropped: rank {rank} #{index} is out of range");
                    }
                    let slot = rank * DIAL_INDEXES + index;
                    let mut workers = workers.lock().unwrap_or_else(|p| p.into_inner());
                    let sender = workers.entry(slot).or_insert_with(|| {
                        let (tx, rx) = crossbeam_channel::bounded(1);
                        if let Err(e) = spawn_worker(&crew, slot, Source::Accept(rx)) {
                            log::error!("{e}");
                        }
                        tx
                    });
                    let dialed = DialedIn {
                        stream,
                        _pass: pass,
                        deadline,
                    };
                    if sender.try_send(dialed).is_err() {
                        log::info!(
                        "{peer}: dropped: rank {rank} #{index} already has a connection waiting"
                    );
                    }
                });
            true
        },
    );
}

/// Sends `input` over the given connections; `run` with any readable input.
pub fn send(
    config: &Config,
    connections: Connections<'_>,
    input: impl Read + Send + 'static,
) -> Result<Summary> {
    let threads = usize::from(config.threads);
    let (plan, labels): (Vec<(usize, Option<&Destination>)>, Vec<String>) = match &connections {
        Connections::Dial(destinations) => destinations
            .iter()
            .enumerate()
            .flat_map(|(rank, d)| std::iter::repeat_n((rank, Some(d)), threads))
            .map(|(rank, d)| ((rank, d), d.map(|d| d.to_string()).unwrap_or_default()))
            .unzip(),
        Connections::Accept(_) => (0..DIAL_RANKS * DIAL_INDEXES)
            .map(|slot| {
                let (rank, index) = (slot / DIAL_INDEXES, slot % DIAL_INDEXES);
                ((rank, None), format!("rank {rank} #{index} (dialed in)"))
            })
            .unzip(),
    };
    let ranks: Vec<usize> = plan.iter().map(|(rank, _)| *rank).collect();
    let params = Params {
        window: config.window,
        foot_size: config.foot_size as usize,
        inflight: config.inflight as usize,
        reconnect_timeout: config.reconnect_timeout,
    };
    let window = Arc::new(Window::new(params, &ranks).with_events(config.events.clone()));
    let accepting = matches!(connections, Connections::Accept(_));
    if accepting {
        // The receiver decides which connections exist; none is "coming".
        window.accepting();
    }
    if let Connections::Dial(destinations) = &connections {
        window.name_ranks(destinations.iter().map(|d| d.to_string()).collect());
        if config.auto_threads {
            window.find_count();
        }
    }
    let links = Arc::new(live::Links::new(labels));
    let clock = Arc::new(Clock::new());
    let stream_digest: Arc<OnceLock<u128>> = Arc::default();
    let read = Arc::new(AtomicU64::new(0));
    let rate = Arc::new(AtomicU64::new(config.pacing.rate.unwrap_or(0)));
    let dialed = match &connections {
        Connections::Dial(destinations) => destinations.to_vec(),
        Connections::Accept(_) => Vec::new(),
    };
    let live = Arc::new(live::Live::new(
        Arc::clone(&window),
        Arc::clone(&links),
        Arc::clone(&clock),
        Arc::clone(&read),
        Arc::clone(&rate),
        &dialed,
        threads,
        accepting,
    ));
    let _attached = config
        .controls
        .as_ref()
        .map(|c| c.attach(Arc::clone(&live) as Arc<dyn crate::control::Running>));

    {
        let (window, read, rate) = (Arc::clone(&window), Arc::clone(&read), Arc::clone(&rate));
        let (foot_size, pacing) = (config.foot_size, config.pacing.clone());
        let digest = config.checksums.then(|| Arc::clone(&stream_digest));
        std::thread::Builder::new()
            .name("tx-reader".into())
            .spawn(move || {
                let paced = Paced {
                    pacing: &pacing,
                    rate: &rate,
                };
                ingest(input, foot_size, &paced, &window, &read, digest.as_deref())
            })
            .map_err(|e| Error::io("spawn reader thread", e))?;
    }

    let mut session = [0u8; 16];
    getrandom::getrandom(&mut session)
        .map_err(|e| Error::io("choose a session id", std::io::Error::other(e)))?;
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let (exit_tx, exit_rx) = crossbeam_channel::unbounded::<()>();
    let paths = Arc::new(udp::Paths::new(
        config.pacing.rate.map(|r| r as f64),
        config.key.is_some(),
        config.datagram_size,
    ));
    let crew = Arc::new(Crew {
        config: config.clone(),
        window: Arc::clone(&window),
        links: Arc::clone(&links),
        session,
        stop: stop_rx,
        exited: exit_tx,
        paths: Arc::clone(&paths),
    });
    if matches!(connections, Connections::Dial(_)) {
        *live.crew.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&crew));
    }
    let mut wake_acceptor = None;
    match connections {
        Connections::Dial(_) => {
            for (w, (_, dest)) in plan.iter().enumerate() {
                let dest = dest.expect("dialing plans name a destination").clone();
                spawn_worker(&crew, w, Source::Dial(dest))?;
            }
        }
        Connections::Accept(listener) => {
            wake_acceptor = listener.local_addr().ok();
            let crew = Arc::clone(&crew);
            std::thread::Builder::new()
                .name("tx-acceptor".into())
                .spawn(move || accept(&crew, &listener))
                .map_err(|e| Error::io("spawn acceptor thread", e))?;
        }
    }
    drop(crew);

    let monitor = {
        let (read, window) = (Arc::clone(&read), Arc::clone(&window));
        Monitor::start(
            move || {
                // Delivered means written by rx; the rest read is on its way.
                let delivered = window.delivered_bytes();
                (delivered, read.load(Relaxed).saturating_sub(delivered))
            },
            config.display,
            config.stats_json.is_some() || config.controls.is_some(),
            "delivered",
        )
    };
    let _ = live.series.set(monitor.series());
    let outcome = window.outcome();
    // No workers are added from now on: the last ones may exit.
    live.over();
    window.finish(Err(Error::Internal("stopped".into())));
    paths.stop();
    let (datagrams, again) = paths.counts();
    if datagrams > 0 {
        log::info!(
            "udp: {datagrams} datagrams, {again} of them sent again ({:.2}%)",
            100.0 * again as f64 / datagrams as f64
        );
    }
    drop(stop_tx);
    if let Some(addr) = wake_acceptor {
        // The acceptor sees the run is over on its next connection.
        let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(200));
    }
    // Give workers a moment to close their connections cleanly.
    let deadline = Instant::now() + LINGER;
    while exit_rx.recv_deadline(deadline).is_ok() {}

    let sent = read.load(Relaxed);
    let throughput = monitor.finish();
    let links = links.all();
    // Kept for the stats document only: a library's senders leave none.
    if config.stats_json.is_some() {
        report::record(
            config.controls.as_ref(),
            report::Side {
                role: "tx",
                payload_bytes: sent,
                wire_bytes: links.iter().map(|l| l.wire_bytes()).sum(),
                seconds: clock.elapsed().as_secs_f64(),
                feet: links.iter().map(|l| l.feet()).sum(),
                retransmits: window.snapshot().retransmits,
                reconnects: links.iter().map(|l| l.reconnects()).sum(),
                throughput,
                connections: links
                    .iter()
                    .map(|l| report::Connection::from(&**l))
                    .collect(),
            },
        );
    }
    if config.verbose >= 2 {
        log::debug!(
            "{}",
            report(&window, &links, &clock, sent, accepting).trim_end()
        );
    }
    if let Some(every) = config.chaos {
        log::warn!("chaos {every}: injected {} faults", window.faults());
    }
    let bytes = outcome?;
    if let Some(d) = stream_digest.get() {
        log::info!("stream digest (xxh3-128): {d:032x}");
    }
    if bytes != sent {
        return Err(Error::Peer(format!(
            "receiver confirmed {bytes} bytes, but {sent} were sent"
        )));
    }
    let reconnects: u64 = links.iter().map(|l| l.reconnects()).sum();
    let snap = window.snapshot();
    let mut detail = format!(
        "{} retransmitted feet, {reconnects} reconnects",
        snap.retransmits
    );
    if snap.stalls > 0 {
        detail += &format!(", {} stalled connections closed", snap.stalls);
    }
    if let Some(every) = config.chaos {
        detail += &format!(", {} faults injected by chaos {every}", window.faults());
    }
    Ok(Summary {
        bytes,
        elapsed: clock.elapsed(),
        detail,
    })
}

/// How the reader paces the input: the options, and the rate in bytes per
/// second (0 for none), which the controls may change while it runs.
struct Paced<'a> {
    pacing: &'a Pacing,
    rate: &'a AtomicU64,
}

/// Cuts the input into feet and admits them to the window, paced as asked.
fn ingest(
    mut input: impl Read,
    foot_size: u32,
    paced: &Paced<'_>,
    window: &Window,
    read: &AtomicU64,
    digest: Option<&OnceLock<u128>>,
) {
    let mut hasher = digest.map(|_| Xxh3Default::new());
    // One buffer more than the window: the one being filled.
    let pool = Pool::new(window.size() as usize + 1, foot_size as usize);
    let pacing = paced.pacing;
    // The token bucket counts from when the rate was last set.
    let (mut start, mut since, mut rate) = (Instant::now(), 0u64, paced.rate.load(Relaxed));
    let mut total = 0u64;
    for chunk in 0.. {
        if let Some(delay) = pacing.delay {
            std::thread::sleep(delay);
        }
        let mut data = pool.take();
        let end = if pacing.leglimit.is_some_and(|n| chunk >= n) {
            true
        } else if pacing.charmode {
            // Whatever one read returns goes at once; only EOF reads nothing.
            match data.read_some_from(&mut input, foot_size as usize) {
                Ok(n) => n == 0,
                Err(e) => return stdin_failed(window, e),
            }
        } else {
            // Feet are full-size however short the pipe's reads are: only
            // the end of the input makes a short one.
            match data.read_full_from(&mut input, foot_size as usize) {
                Ok(n) => n < foot_size as usize,
                Err(e) => return stdin_failed(window, e),
            }
        };
        total += data.len() as u64;
        read.fetch_add(data.len() as u64, Relaxed);
        if let (Some(h), Some(d)) = (&mut hasher, digest) {
            h.update(&data);
            if end {
                let _ = d.set(h.digest128());
            }
        }
        let now_rate = paced.rate.load(Relaxed);
        if now_rate != rate {
            (start, since, rate) = (Instant::now(), total - data.len() as u64, now_rate);
        }
        if rate > 0 {
            // Token bucket with one foot of burst: no foot leaves before the
            // bytes up to its end are due.
            let due = start + Duration::from_secs_f64((total - since) as f64 / rate as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        if !window.admit(data.into(), end) || end {
            return;
        }
    }
}

/// Ends the transfer because the input failed, telling the receiver why.
fn stdin_failed(window: &Window, e: std::io::Error) {
    let aborted = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<crate::api::Aborted>())
        .map(|a| a.0.clone());
    match aborted {
        Some(why) => window.cancel(format!("aborted: {why}"), Error::Aborted(why)),
        None => window.cancel(format!("read stdin: {e}"), Error::io("read stdin", e)),
    }
}

/// Ends the run with an error if a worker thread panics, so the peer is
/// never left waiting on a dead worker; tells the main thread it exited.
struct PanicGuard<'a> {
    window: &'a Window,
    exited: crossbeam_channel::Sender<()>,
    name: String,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.window.finish(Err(Error::Internal(format!(
                "thread {} panicked",
                self.name
            ))));
        }
        let _ = self.exited.send(());
    }
}

/// The SIGUSR1 report.
fn report(
    window: &Window,
    links: &[Arc<Link>],
    clock: &Clock,
    read: u64,
    accepting: bool,
) -> String {
    let snap = window.snapshot();
    let sent: u64 = links.iter().map(|l| l.bytes()).sum();
    let reconnects: u64 = links.iter().map(|l| l.reconnects()).sum();
    let mut out = String::from("viamillipede tx report\n");
    for (w, link) in links.iter().enumerate() {
        // An accepting sender lists only the slots the receiver dialed.
        if accepting && link.feet() == 0 && link.state() == LinkState::Connecting {
            continue;
        }
        let inflight = snap.inflight.get(w).copied().unwrap_or(0);
        let piece = human_bytes(snap.piece.get(w).copied().unwrap_or(0) as u64);
        let extra = format!(" {inflight:>2} in flight, pieces of {piece}");
        out.push_str(&link.line(&format!("worker-{w}"), &extra));
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "  read {}; sent {}",
        human_bytes(read),
        clock.summary(sent)
    );
    let _ = writeln!(
        out,
        "  connections {}/{} up, retransmitted feet {}, reconnects {}, stalled {}, window {}/{} feet ({} unacknowledged, {} queued), rx has written {}",
        snap.connected,
        links.len(),
        snap.retransmits,
        reconnects,
        snap.stalls,
        snap.ahead,
        window.size(),
        snap.held,
        snap.queued,
        human_bytes(snap.delivered_bytes)
    );
    out
}
