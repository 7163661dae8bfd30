//! One tx worker: owns a connection to one destination, keeps it open
//! (reconnecting with backoff), and sends the feet the window gives it.
//!
//! Each connection has two threads: this one writes feet, and an
//! acknowledgement reader feeds what rx says back into the window. Whichever
//! notices a failure first shuts the socket down, which wakes the other.

use super::udp::Gone;
use super::window::{Closer, Next, Window};
use super::DialedIn;
use crate::config::{Config, Destination};
use crate::crypto::{self, DatagramKey, Opener, Sealer};
use crate::error::{shown, Error};
use crate::pool::Shared as Bytes;
use crate::protocol::handshake::HandshakeError;
use crate::protocol::negotiate::{Offer, Terms, TxNegotiation, TxStep};
use crate::protocol::{Header, Kind, Reason, FLAG_COMPRESSED};
use crate::stats::{Link, LinkState};
use crate::wire::{FrameReader, FrameWriter};
use crate::{net, wire};
use crossbeam_channel::Receiver;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};
use zstd::bulk::Compressor;

const BACKOFF_START: Duration = Duration::from_millis(100);
/// Short enough that a path coming back (after a stall or an outage) is
/// found again within a few seconds.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Covers a SYN and one retransmission (Linux resends after 1 s); a path
/// that answers later is dialed afresh after the backoff.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What a worker needs, shared by all workers.
pub struct Shared<'a> {
    /// The run's options.
    pub config: &'a Config,
    /// The window of feet.
    pub window: &'a Window,
    /// The stream's session id.
    pub session: [u8; 16],
    /// Closed (dropped) when the run is over: wakes workers in backoff.
    pub stop: Receiver<()>,
    /// The datagram paths (`--udp`).
    pub paths: &'a super::udp::Paths,
}

enum OpenError {
    /// Worth another try later.
    Retry(String),
    /// The receiver (or whoever answered) refused without proving the key:
    /// anyone could have, so it ends nothing, but is told to the schedule,
    /// which gives up if nothing but refusals comes at the start.
    Refused(String),
    /// The name does not resolve, or what answered is not a receiver:
    /// told to the schedule like a refusal.
    Unreachable(String),
    /// The receiver proved the key and refused: the whole transfer stops.
    Fatal(Error),
}

/// Runs worker `w`, dialing `dest`, until the transfer is over.
pub fn run(shared: &Shared, w: usize, dest: &Destination, link: &Link) {
    let mut backoff = BACKOFF_START;
    let mut connections = 0u64;
    while !shared.window.is_finished() {
        // With `threads auto`, only the connections the count uses dial.
        if !shared
            .window
            .wait_enabled(w, || link.set_state(LinkState::Parked))
        {
            break;
        }
        link.set_state(LinkState::Connecting);
        let opened = dial(shared, dest).and_then(|s| {
            let deadline = Instant::now() + shared.config.handshake_timeout;
            handshake(shared, w, s, deadline, true, dest)
        });
        match use_connection(shared, w, opened, link, &mut connections) {
            ControlFlow::Break(()) => break,
            ControlFlow::Continue(true) => backoff = BACKOFF_START,
            ControlFlow::Continue(false) => {}
        }
        if shared.window.is_finished() {
            break;
        }
        link.set_state(LinkState::Backoff);
        // Wait out the backoff unless the run ends first.
        if let Err(crossbeam_channel::RecvTimeoutError::Disconnected) =
            shared.stop.recv_timeout(backoff)
        {
            break;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    link.set_state(LinkState::Closed);
}

/// Runs worker `w` on the connections the receiver makes to us (reverse
/// mode): each stream that arrives for this slot, until the run is over.
pub fn run_accepted(shared: &Shared, w: usize, streams: &Receiver<DialedIn>, link: &Link) {
    let mut connections = 0u64;
    while !shared.window.is_finished() {
        link.set_state(LinkState::Connecting);
        let dialed = crossbeam_channel::select! {
            recv(streams) -> s => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            recv(shared.stop) -> _ => break,
        };
        let (stream, deadline, _pass) = dialed.into_parts();
        let opened = handshake(shared, w, stream, deadline, false, &link.peer);
        if use_connection(shared, w, opened, link, &mut connections).is_break() {
            break;
        }
    }
    link.set_state(LinkState::Closed);
}

/// Serves an opened connection, or records why it could not be opened.
/// Breaks when the whole transfer must stop; otherwise says whether a
/// connection was made.
fn use_connection(
    shared: &Shared,
    w: usize,
    opened: Result<Opened, OpenError>,
    link: &Link,
    connections: &mut u64,
) -> ControlFlow<(), bool> {
    match opened {
        Ok(opened) => {
            if *connections > 0 {
                link.count_reconnect();
            }
            *connections += 1;
            log::info!("worker {w}: connected to {}", link.peer);
            crate::events::tell(&shared.config.events, || crate::events::Event::Connected {
                peer: link.peer.to_string(),
            });
            serve(shared, w, opened, link);
            return ControlFlow::Continue(true);
        }
        Err(OpenError::Fatal(e)) => {
            shared.window.finish(Err(e));
            return ControlFlow::Break(());
        }
        Err(OpenError::Retry(e)) => {
            log::debug!("worker {w}: {e}");
            shared.window.note_error(e);
            shared.window.attempt_failed(w);
        }
        Err(OpenError::Refused(e)) => {
            log::debug!("worker {w}: {e}");
            shared.window.refused(e);
            shared.window.attempt_failed(w);
        }
        Err(OpenError::Unreachable(e)) => {
            log::debug!("worker {w}: {e}");
            shared.window.unreachable(e);
            shared.window.attempt_failed(w);
        }
    }
    ControlFlow::Continue(false)
}

/// An open connection and what was agreed for it.
struct Opened {
    stream: TcpStream,
    /// Its keys, when it is encrypted.
    channel: Option<(Sealer, Opener)>,
    /// Whether feet carry checksums.
    checksums: bool,
    /// Where its datagrams go, their token and (with a key) their key.
    udp: Option<(SocketAddr, u64, Option<DatagramKey>)>,
}

/// Connects to `dest`.
fn dial(shared: &Shared, dest: &Destination) -> Result<TcpStream, OpenError> {
    let c = shared.config;
    net::connect(dest, CONNECT_TIMEOUT.min(c.reconnect_timeout), &c.socket).map_err(|e| {
        match net::is_unresolved(&e) {
            true => OpenError::Unreachable(format!("cannot resolve '{}': {e}", dest.host)),
            false => OpenError::Retry(format!("connect to {dest}: {e}")),
        }
    })
}

/// Runs tx's end of the handshake ([`TxNegotiation`]) on a new connection
/// to `dest`, within one deadline: writes what the negotiation says, reads
/// rx's answers, and turns the outcome into a connection to serve or a
/// failed attempt. Only a refusal from a receiver that proved the key can
/// end the transfer; a peer at a destination the user named (`dialed`) is
/// also believed when it says the stream is complete or is another
/// receiver, as far as anything can be without a key, while one that
/// dialed in may be anyone.
fn handshake(
    shared: &Shared,
    w: usize,
    mut stream: TcpStream,
    deadline: Instant,
    dialed: bool,
    dest: &dyn std::fmt::Display,
) -> Result<Opened, OpenError> {
    let c = shared.config;
    let retry =
        |what: &str, e: &dyn std::fmt::Display| OpenError::Retry(format!("{what} {dest}: {e}"));
    net::tune(&stream, &c.socket).map_err(|e| retry("set options on connection to", &e))?;
    let offer = Offer {
        terms: Terms {
            checkphrase: c.checkphrase,
            key: c.key.clone(),
            encrypt: c.encrypt,
            checksums: c.checksums,
            udp: c.udp,
        },
        session: shared.session,
        foot_size: c.foot_size,
        window: c.window,
        worker: w as u16,
        name: c.name.clone(),
    };
    let nonce = crypto::nonce().map_err(OpenError::Fatal)?;
    let (mut negotiation, hello) = TxNegotiation::new(&offer, nonce);
    stream
        .write_all(&hello)
        .map_err(|e| retry("handshake with", &e))?;
    let agreed = loop {
        let mut input = net::Deadline {
            stream: &stream,
            until: deadline,
        };
        let (_, answer) =
            wire::read_reply_bytes(&mut input).map_err(|e| not_a_receiver(dest, e))?;
        match negotiation.on_reply(&answer) {
            TxStep::Send(proof) => stream
                .write_all(&proof)
                .map_err(|e| retry("handshake with", &e))?,
            TxStep::Accepted(agreed) => break agreed,
            TxStep::Complete { bytes, proven } if proven || dialed => {
                shared.window.finish(Ok(bytes));
                return Err(OpenError::Retry(format!("{dest}: stream already complete")));
            }
            TxStep::Complete { .. } => {
                return Err(OpenError::Refused(format!(
                    "{dest}: a peer that did not prove the key says the stream is complete"
                )));
            }
            TxStep::Refused(r) => {
                let msg = format!("{dest}: refused the connection: {}", shown(&r.message));
                // A relay that cannot reach its next hop says so, proven,
                // and the stream goes on elsewhere or later.
                return Err(match r.proven && r.reason != Reason::Unavailable {
                    true => OpenError::Fatal(Error::Peer(msg)),
                    false => OpenError::Refused(msg),
                });
            }
        }
    };
    let proven = agreed.nonces.is_some();
    if proven && c.local_receiver == Some(agreed.receiver) {
        // Our own receiver, in a two-way pipe, proving the key: the
        // connection was relayed back (without a key, a loop back to
        // itself is what the user asked for).
        return Err(OpenError::Refused(format!(
            "{dest}: reached this process's own receiver (a reflected connection)"
        )));
    }
    if !shared.window.same_receiver(agreed.receiver) {
        let msg = format!(
            "{dest}: not the receiver the stream started with (a different rx, or one that was restarted): every destination must reach the same rx"
        );
        return Err(match proven || dialed {
            true => OpenError::Fatal(Error::Peer(msg)),
            false => OpenError::Refused(msg),
        });
    }
    if !shared.window.advance(agreed.delivered) {
        return Err(OpenError::Refused(format!(
            "{dest}: the receiver claims {} pieces written, more than were sent",
            agreed.delivered
        )));
    }
    stream
        .set_read_timeout(None)
        .map_err(|e| retry("set timeout on", &e))?;
    let channel = match (&c.key, agreed.nonces) {
        (Some(key), Some(n)) => Some(key.channel(&n.tx, &n.rx, true, agreed.encrypt)),
        _ => None,
    };
    let udp = match agreed.udp {
        Some(terms) => {
            let peer = stream.peer_addr().map_err(|e| retry("address of", &e))?;
            let key = match (&c.key, agreed.nonces) {
                (Some(key), Some(n)) => Some(key.datagrams(&n.tx, &n.rx, agreed.encrypt)),
                _ => None,
            };
            Some((SocketAddr::new(peer.ip(), terms.port), terms.token, key))
        }
        None => None,
    };
    Ok(Opened {
        stream,
        channel,
        checksums: agreed.checksums,
        udp,
    })
}

/// What a failed read of rx's reply means: something that is not a
/// receiver answered (another service on the port, a listener that says
/// nothing), or a connection that failed.
fn not_a_receiver(dest: &dyn std::fmt::Display, e: HandshakeError) -> OpenError {
    match e {
        HandshakeError::BadMagic | HandshakeError::Invalid(_) => OpenError::Unreachable(format!(
            "{dest} is not a viamillipede receiver: it answered with something else ({e}); is another service on that port?"
        )),
        HandshakeError::Version(_) => OpenError::Unreachable(format!("{dest}: {e}")),
        HandshakeError::Io(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, _) => {
            OpenError::Unreachable(format!(
                "{dest} took the connection but did not answer the handshake in time: is a viamillipede receiver listening there?"
            ))
        }
        e => OpenError::Retry(format!("handshake with {dest}: {e}")),
    }
}

/// Sends feet on an established connection until it fails or the transfer
/// is over.
fn serve(shared: &Shared, w: usize, opened: Opened, link: &Link) {
    let Opened {
        stream,
        channel,
        checksums,
        udp,
    } = opened;
    let flow = match udp {
        Some((addr, token, key)) => match shared.paths.join(w, addr, token, key) {
            Ok(f) => Some(f),
            Err(e) => {
                shared
                    .window
                    .finish(Err(Error::io(format!("open a UDP socket to {addr}"), e)));
                return;
            }
        },
        None => None,
    };
    let flow = flow.as_ref();
    let window = shared.window;
    let clone = || stream.try_clone();
    let (reader, closer) = match clone().and_then(|r| Ok((r, clone()?))) {
        Ok(pair) => pair,
        Err(e) => {
            shared.window.note_error(format!("clone socket: {e}"));
            return;
        }
    };
    let (sealer, opener) = channel.unzip();
    // rx never sends feet: a zero bound rejects any payload but an abort's.
    let reader = FrameReader::new(reader, opener, 0);
    let mut writer = FrameWriter::new(stream, sealer).with_checksums(checksums);
    let mut compressor = shared
        .config
        .compress
        .and_then(|level| match Compressor::new(level) {
            Ok(c) => Some(c),
            Err(e) => {
                log::warn!("worker {w}: no compression: {e}");
                None
            }
        });
    let mut squeezed = Vec::new();
    // A stalled connection is reset, not closed: what it still has queued
    // in the kernel is dropped instead of competing with the others.
    window.connected(
        w,
        Closer::new(move || {
            net::abortive_close(&closer);
            let _ = closer.shutdown(Shutdown::Both);
        }),
    );
    link.set_state(LinkState::Idle);
    std::thread::scope(|scope| {
        let acks = std::thread::Builder::new()
            .name(format!("tx-acks-{w}"))
            .spawn_scoped(scope, || {
                read_acks(window, w, reader, flow, &shared.config.events, &link.peer)
            });
        if let Err(e) = acks {
            window.note_error(format!("spawn thread: {e}"));
            window.disconnected(w);
        }
        loop {
            let foot = match window.next(w) {
                Next::Send(f) => f,
                Next::Lost | Next::Finished => break,
            };
            link.set_state(LinkState::Sending);
            let header = Header::foot(foot.id, foot.data.len() as u32, foot.end);
            if let Some(every) = shared.config.chaos.filter(|&n| window.chaos_strikes(n)) {
                // Half the foot, then a reset: the receiver drops the partial
                // foot and the window sends it again elsewhere.
                log::info!(
                    "worker {w}: chaos: cutting the connection in foot {} (every {every} feet)",
                    foot.id
                );
                let half = &foot.data[..foot.data.len() / 2];
                let _ = writer.send_partial(&header, half);
                net::abortive_close(writer.get_ref());
                break;
            }
            let (header, payload) = match &mut compressor {
                Some(c) => squeeze(c, &foot.data, &mut squeezed, header),
                None => (header, &foot.data[..]),
            };
            if let Some(flow) = flow {
                // The bytes go as datagrams; the connection carries only
                // what rx says back.
                let mut bytes = payload.to_vec();
                if checksums {
                    bytes.extend_from_slice(&crate::wire::checksum(payload));
                }
                let wire = bytes.len();
                match flow.send(foot.id, Bytes::from(bytes), header.flags) {
                    Ok(()) => {}
                    Err(Gone::Failed(why)) => {
                        window.finish(Err(Error::Peer(why)));
                        break;
                    }
                    Err(Gone::Closed) => break,
                }
                link.count_wire(wire as u64);
                link.count_foot(foot.data.len());
                link.set_state(LinkState::Idle);
                continue;
            }
            let before = writer.wire_bytes();
            if let Err(e) = writer.send(&header, payload) {
                log::info!("worker {w}: send foot {}: {e}", foot.id);
                window.note_error(format!("send: {e}"));
                break;
            }
            link.count_wire(writer.wire_bytes() - before);
            link.count_foot(foot.data.len());
            link.set_state(LinkState::Idle);
        }
        if let Some(reason) = window.cancelled() {
            let header = Header {
                kind: Kind::Cancel,
                flags: 0,
                len: reason.len() as u32,
                id: 0,
            };
            let _ = writer.send(&header, reason.as_bytes());
        }
        // A FIN tells rx we are done. The acknowledgement reader takes what
        // rx still sends until rx closes too: a frame arriving at a closed
        // socket would be answered with a reset, and rx could not tell that
        // we heard the end of the stream.
        let _ = writer.get_ref().shutdown(Shutdown::Write);
        window.disconnected(w);
    });
}

/// Compresses a foot into `out`, or leaves it as it is when it would not
/// shrink (zstd fails when the output does not fit in one byte less).
fn squeeze<'a>(
    c: &mut Compressor<'_>,
    data: &'a [u8],
    out: &'a mut Vec<u8>,
    header: Header,
) -> (Header, &'a [u8]) {
    if data.len() < 64 {
        return (header, data);
    }
    out.resize(data.len() - 1, 0);
    match c.compress_to_buffer(data, &mut out[..]) {
        Ok(n) => {
            let h = Header {
                flags: header.flags | FLAG_COMPRESSED,
                len: n as u32,
                ..header
            };
            (h, &out[..n])
        }
        Err(_) => (header, data),
    }
}

/// Reads what rx sends back on one connection into the window, until rx
/// closes it (after the end of the stream, too).
fn read_acks(
    window: &Window,
    w: usize,
    mut reader: FrameReader<TcpStream>,
    flow: Option<&super::udp::Flow>,
    events: &Option<crate::events::Sink>,
    peer: &impl std::fmt::Display,
) {
    let result = (|| -> std::io::Result<()> {
        loop {
            let h = reader.header()?;
            // Also checks the tag of a sealed frame without a payload; a
            // foot from rx is bounded to zero bytes, so reading it is cheap.
            let payload = reader.small_payload(&h)?;
            match h.kind {
                Kind::Ack => {
                    if let Some(f) = flow {
                        f.acked(h.id);
                    }
                    window.ack(w, h.id)
                }
                Kind::Datagrams if flow.is_some() => {
                    if let Err(e) = flow.map_or(Ok(()), |f| f.report(&payload)) {
                        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                    }
                }
                Kind::Progress => window.progress(w, h.id),
                Kind::Window => {
                    if !window.advance(h.id) {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "receiver claims {} pieces written, more than were sent",
                                h.id
                            ),
                        ));
                    }
                }
                Kind::Done => window.finish(Ok(h.id)),
                Kind::Abort => {
                    let msg = shown(&String::from_utf8_lossy(&payload));
                    window.finish(Err(Error::Peer(msg)));
                }
                Kind::Foot | Kind::Cancel | Kind::Datagrams => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("receiver sent a {:?} frame", h.kind),
                    ))
                }
            }
        }
    })();
    if let Err(e) = result {
        if !window.is_finished() {
            log::info!("worker {w}: connection lost: {e}");
            window.note_error(format!("connection lost: {e}"));
            crate::events::tell(events, || crate::events::Event::Disconnected {
                peer: peer.to_string(),
                why: e.to_string(),
            });
        }
    }
    let _ = reader.get_mut().shutdown(Shutdown::Both);
    if let Some(f) = flow {
        f.close();
    }
    window.disconnected(w);
}
