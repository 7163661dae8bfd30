//! One incoming connection: its handshake (with a time limit) and then the
//! feet it carries, each handed to the sequencer and acknowledged.
//!
//! Anything that breaks the protocol only drops this connection: the
//! stream in progress and the receiver carry on.

use super::hub::Hub;
use super::state::{Admission, Progress, Session, State};
use super::udp;
use super::{Arrived, Event};
use crate::crypto::{self, DatagramKey, Opener, Sealer, PROOF_LEN};
use crate::error::{shown, Error};
use crate::protocol::handshake::FLAG_UDP;
use crate::protocol::negotiate::{name_of, UdpTerms};
use crate::protocol::negotiate::{RxNegotiation, RxStep, Terms, Verdict};
use crate::protocol::{HandshakeError, Kind, HEADER_LEN};
use crate::stats::LinkState;
use crate::wire::{FrameReader, FrameWriter};
use crate::{net, wire};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zstd::bulk::Decompressor;

/// How long a write to a sender may block before its connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one accepted connection to the end.
pub fn handle(hub: &Arc<Hub>, mut stream: TcpStream, peer: SocketAddr, pass: net::Pass) {
    let outcome = handshake(hub, &mut stream, peer);
    // Out of the handshake: the gate's place goes to another.
    drop(pass);
    let Accepted {
        state,
        session,
        channel,
        checksums,
        udp,
    } = match outcome {
        Handshake::Serve(s) => *s,
        Handshake::ToldComplete(state) => {
            // The sender knows now: rx need not wait for it any longer.
            if let Some(state) = state {
                state.confirm();
                let _ = state.events.send(Event::Confirmed);
            }
            return;
        }
        Handshake::Refused => {
            hub.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let (state, events) = (&state, &state.events);
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            log::warn!("{peer}: clone socket: {e}");
            return;
        }
    };
    let (sealer, opener) = channel.unzip();
    if checksums {
        state.checksummed.store(true, Ordering::Relaxed);
    }
    let (key, conn) = state.register(peer.to_string());
    let out = Arc::clone(&conn);
    let writer = FrameWriter::new(writer, sealer);
    let spawned = std::thread::Builder::new()
        .name(format!("rx-out-{peer}"))
        .spawn(move || out.outbox.run(writer));
    let out_thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            log::warn!("{peer}: no thread for the connection: {e}");
            state.unregister(key);
            return;
        }
    };
    conn.link.set_state(LinkState::Receiving);
    let _ = events.send(Event::Opened);
    log::info!("{peer}: connected");
    crate::events::tell(&state.config.events, || crate::events::Event::Connected {
        peer: peer.to_string(),
    });
    let udp = match udp {
        Some((terms, key)) => match (stream.local_addr().map(|l| hub.udp(l)), stream.try_clone()) {
            (Ok(Ok(socket)), Ok(closer)) => {
                let flow = udp::Flow::new(
                    Arc::clone(state),
                    Arc::clone(&conn),
                    session,
                    key,
                    checksums,
                    closer,
                );
                socket.join(terms.token, flow);
                Some((socket, terms.token))
            }
            _ => None,
        },
        None => None,
    };

    let metered = Metered {
        stream: &stream,
        total: 0,
        outbox: &conn.outbox,
    };
    let reader = FrameReader::new(metered, opener, session.foot_size).with_checksums(checksums);
    let result = receive(state, reader, session, &conn);
    if let Some((socket, token)) = udp {
        socket.leave(token);
    }
    conn.outbox.close();
    match &result {
        Ok(Some(reason)) => {
            // Every connection hears it: one line for the one event.
            if state.end(Progress::Failed(format!("sender {reason}"))) {
                log::warn!("{peer}: the sender stopped the stream: {reason}");
            }
            let _ = events.send(Event::Finished(Err(Error::Sender(reason.clone()))));
        }
        Ok(None) => {
            log::debug!("{peer}: closed by sender");
            if matches!(state.progress(), Progress::Complete(_)) {
                // A sender closes cleanly only once it knows the outcome.
                state.confirm();
            }
        }
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            log::warn!("{peer}: protocol violation, connection dropped: {e}");
            state.refused.fetch_add(1, Ordering::Relaxed);
            net::abortive_close(&stream);
        }
        Err(e) => log::info!("{peer}: connection lost: {e}"),
    }
    if let Err(e) = &result {
        crate::events::tell(&state.config.events, || {
            crate::events::Event::Disconnected {
                peer: peer.to_string(),
                why: e.to_string(),
            }
        });
    }
    // What was posted last (the stream's DONE or ABORT) goes out before
    // the socket closes.
    let _ = out_thread.join();
    let violated = matches!(&result, Err(e) if e.kind() == io::ErrorKind::InvalidData);
    if !violated && state.progress() != Progress::Running {
        linger(&stream);
    }
    let _ = stream.shutdown(Shutdown::Both);
    conn.link.set_state(LinkState::Closed);
    let remaining = state.unregister(key);
    let _ = events.send(Event::Closed(remaining));
}

/// How a handshake ended.
enum Handshake {
    /// Serve the connection.
    Serve(Box<Accepted>),
    /// The stream was complete, and the sender has been told so.
    ToldComplete(Option<Arc<State>>),
    /// Refused or failed.
    Refused,
}

/// What was agreed for an accepted connection.
struct Accepted {
    /// The flow it joins.
    state: Arc<State>,
    session: Session,
    /// Its keys, when it is encrypted.
    channel: Option<(Sealer, Opener)>,
    /// Whether feet carry checksums.
    checksums: bool,
    /// Its datagrams' terms and (with a key) their key.
    udp: Option<(UdpTerms, Option<DatagramKey>)>,
}

/// Runs rx's end of the handshake ([`RxNegotiation`]) on a new connection,
/// within one deadline however slowly its bytes drip: reads what the sender
/// sends, writes what the negotiation answers, and lets the session decide
/// whether the sender may join.
fn handshake(hub: &Arc<Hub>, stream: &mut TcpStream, peer: SocketAddr) -> Handshake {
    let config = &hub.config;
    let limit = config.handshake_timeout;
    if stream.set_write_timeout(Some(limit)).is_err() {
        return Handshake::Refused;
    }
    let deadline = Instant::now() + limit;
    let late = |kind: io::ErrorKind, e: String, what: &str| {
        match kind {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no {what} within {} s", limit.as_secs())
        }
        io::ErrorKind::UnexpectedEof if what == "proof" => {
            "it hung up, as a sender does when this receiver cannot prove the key to it: the key files differ".into()
        }
        _ => e,
    }
    };
    let nonce = match crypto::nonce() {
        Ok(n) => n,
        Err(e) => {
            log::error!("{e}");
            return Handshake::Refused;
        }
    };
    let terms = Terms {
        checkphrase: config.checkphrase,
        key: config.key.clone(),
        encrypt: config.encrypt,
        checksums: config.checksums,
        udp: false,
    };
    let mut negotiation = RxNegotiation::new(terms, hub.receiver, nonce);
    let mut input = net::Deadline {
        stream,
        until: deadline,
    };
    let mut step = match wire::read_hello_bytes(&mut input) {
        Ok((_, bytes)) => negotiation.on_hello(&bytes),
        Err(HandshakeError::Io(kind, e)) => RxStep::Drop(format!(
            "dropped before the handshake completed: {}",
            late(kind, e, "handshake")
        )),
        Err(e) => negotiation.on_bad_hello(e),
    };
    if let RxStep::Challenge(challenge) = &step {
        if let Err(e) = stream.write_all(challenge) {
            log::info!("{peer}: send challenge: {e}");
            return Handshake::Refused;
        }
        let mut proof = [0u8; PROOF_LEN];
        let mut input = net::Deadline {
            stream,
            until: deadline,
        };
        step = match input.read_exact(&mut proof) {
            Ok(()) => negotiation.on_proof(&proof),
            // Slow is not wrong: the sender hears nothing it could take for
            // a refusal, and tries again.
            Err(e) => RxStep::Drop(format!(
                "the sender did not prove the key: {}",
                late(e.kind(), e.to_string(), "proof")
            )),
        };
    }
    let hello = match step {
        RxStep::Decide(hello) => hello,
        RxStep::Refuse(bytes, why) => {
            log::warn!("{peer}: refused: {}", shown(&why));
            let _ = stream.write_all(&bytes);
            return Handshake::Refused;
        }
        RxStep::Drop(why) => {
            // Once the stream is over, late connections (a reverse-mode
            // receiver's dialers, a sender going away) are no news.
            match hub.expecting() {
                true => log::warn!("{peer}: {}", shown(&why)),
                false => log::debug!("{peer}: {}", shown(&why)),
            }
            net::abortive_close(stream);
            return Handshake::Refused;
        }
        RxStep::Challenge(_) => unreachable!("one challenge per handshake"),
    };
    let (admission, state) = hub.admit(&hello, name_of(&hello), peer);
    let (verdict, session) = match admission {
        Admission::Accept(session, delivered) => {
            let udp = (hello.flags & FLAG_UDP != 0)
                .then(|| {
                    let local = stream.local_addr().ok()?;
                    let socket = hub.udp(local).ok()?;
                    Some(UdpTerms {
                        port: socket.port,
                        token: socket.token(),
                    })
                })
                .flatten();
            (Verdict::Accept { delivered, udp }, Some(session))
        }
        Admission::Complete(bytes) => (Verdict::Complete(bytes), None),
        Admission::Reject(reason, message) => {
            log::warn!("{peer}: refused: {message}");
            (Verdict::Reject(reason, message), None)
        }
    };
    let complete = matches!(verdict, Verdict::Complete(_));
    let (answer, agreed) = negotiation.decide(verdict);
    if stream.write_all(&answer).is_err() {
        return Handshake::Refused;
    }
    let (Some(agreed), Some(session), Some(state)) = (agreed, session, state.clone()) else {
        return match complete {
            true => Handshake::ToldComplete(state),
            false => Handshake::Refused,
        };
    };
    let ok = stream.set_read_timeout(None).is_ok()
        && stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_ok()
        && net::tune(stream, &config.socket).is_ok();
    let channel = match (&config.key, agreed.nonces) {
        (Some(key), Some(n)) => Some(key.channel(&n.tx, &n.rx, false, agreed.encrypt)),
        _ => None,
    };
    let udp = agreed.udp.map(|terms| {
        let key = match (&config.key, agreed.nonces) {
            (Some(key), Some(n)) => Some(key.datagrams(&n.tx, &n.rx, agreed.encrypt)),
            _ => None,
        };
        (terms, key)
    });
    match ok {
        true => Handshake::Serve(Box::new(Accepted {
            state,
            session,
            channel,
            checksums: agreed.checksums,
            udp,
        })),
        false => Handshake::Refused,
    }
}

/// Bytes counted as buffered for a foot being read: released again if the
/// foot never reaches the sequencer.
struct Reserved<'a> {
    state: &'a State,
    bytes: u64,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.state.release(self.bytes);
    }
}

/// Counts the bytes arriving on a connection and reports them to the
/// sender every so often, so a connection is seen to move while a foot is
/// still arriving.
struct Metered<'a> {
    stream: &'a TcpStream,
    total: u64,
    outbox: &'a super::outbox::Outbox,
}

impl Read for Metered<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut stream = self.stream;
        let n = stream.read(buf)?;
        self.total += n as u64;
        self.outbox.progress(self.total, Instant::now());
        Ok(n)
    }
}

/// How long a connection of an ended stream is read (and what comes
/// discarded) before it is closed.
const LINGER: Duration = Duration::from_secs(5);

/// Closes the sending half and reads the sender's feet still on the way
/// until it closes too, at most [`LINGER`]: closing a socket with unread
/// bytes sends a reset, which can destroy the DONE or ABORT just written
/// before the sender reads it, leaving it to retry until it gives up.
fn linger(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut input = net::Deadline {
        stream,
        until: deadline,
    };
    let mut sink = [0u8; 16 << 10];
    while matches!(input.read(&mut sink), Ok(n) if n > 0) {}
}

fn violation(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads feet until the sender closes the connection (`None`), cancels the
/// stream (`Some(reason)`) or breaks the rules.
fn receive(
    state: &State,
    mut reader: FrameReader<Metered<'_>>,
    session: Session,
    conn: &Arc<super::state::Conn>,
) -> io::Result<Option<String>> {
    let pool = state.pool(session);
    let mut decompressor: Option<Decompressor> = None;
    loop {
        let h = match reader.header() {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        if h.kind == Kind::Cancel {
            let reason = reader.small_payload(&h)?;
            return Ok(Some(shown(&String::from_utf8_lossy(&reason))));
        }
        if h.kind != Kind::Foot {
            return Err(violation(format!(
                "unexpected {:?} frame from a sender",
                h.kind
            )));
        }
        // Flow control promises every foot lies inside the window, in ids
        // and in bytes; anything beyond it would grow the reorder buffer
        // without bound.
        let delivered = state.delivered.load(Ordering::Acquire);
        let ids = crate::protocol::id_window(session.window);
        if h.id >= delivered + ids {
            return Err(violation(format!(
                "foot {} is outside the window ({ids} ids from {delivered})",
                h.id
            )));
        }
        if !state.reserve(session, u64::from(h.len)) {
            return Err(violation(format!(
                "foot {} is beyond the window: more than {} feet of bytes are waiting",
                h.id, session.window
            )));
        }
        let mut reserved = Reserved {
            state,
            bytes: u64::from(h.len),
        };
        // A sealed foot that fails to open ends here, never written: the
        // connection is dropped and tx sends the foot again.
        let mut data = pool.take_for(h.len as usize);
        let before = reader.wire_bytes();
        reader.payload(&h, &mut data)?;
        conn.link
            .count_wire(reader.wire_bytes() - before + HEADER_LEN as u64);
        // From here `hand_over` accounts for what the foot holds.
        reserved.bytes = 0;
        if !hand_over(
            state,
            session,
            conn,
            Piece {
                id: h.id,
                data,
                compressed: h.is_compressed(),
                end: h.is_end(),
            },
            &mut decompressor,
        )? {
            return Ok(None);
        }
    }
}

/// A foot as it arrived, its bytes counted as buffered.
pub struct Piece {
    /// Its id.
    pub id: u64,
    /// Its bytes, compressed or not.
    pub data: crate::pool::Buffer,
    /// Whether they are compressed.
    pub compressed: bool,
    /// Whether it ends the stream.
    pub end: bool,
}

/// Decompresses a foot that arrived whole (by TCP or by datagrams), hands
/// it to the sequencer and acknowledges it on `conn`. False once the
/// sequencer has finished (nothing more is needed); an error breaks the
/// rules (the connection is dropped, and the foot comes again).
pub fn hand_over(
    state: &State,
    session: Session,
    conn: &Arc<super::state::Conn>,
    piece: Piece,
    decompressor: &mut Option<Decompressor<'static>>,
) -> io::Result<bool> {
    let Piece {
        id,
        mut data,
        compressed,
        end,
    } = piece;
    let mut reserved = Reserved {
        state,
        bytes: data.len() as u64,
    };
    if compressed {
        // Never more than a foot: a foot that would inflate beyond it is
        // refused, so compression cannot raise the memory bound.
        let d = match decompressor {
            Some(d) => d,
            None => decompressor.insert(Decompressor::new()?),
        };
        let pool = state.pool(session);
        let mut plain = pool.take();
        plain
            .fill_with(session.foot_size as usize, |out| {
                d.decompress_to_buffer(&data[..], out)
            })
            .map_err(|e| violation(format!("foot {id} does not decompress within a foot: {e}")))?;
        let grown = (plain.len() as u64).saturating_sub(data.len() as u64);
        if !state.reserve(session, grown) {
            return Err(violation(format!("foot {id} inflates beyond the window")));
        }
        reserved.bytes += grown;
        let shrunk = (data.len() as u64).saturating_sub(plain.len() as u64);
        state.release(shrunk);
        reserved.bytes -= shrunk;
        data = plain.compact();
    }
    let len = data.len();
    state.arrived.fetch_add(1, Ordering::Relaxed);
    // From here the sequencer releases what the foot holds.
    reserved.bytes = 0;
    if state
        .feet
        .send(Arrived {
            id,
            data,
            end,
            by: Arc::clone(conn),
        })
        .is_err()
    {
        return Ok(false);
    }
    if !conn.outbox.ack(id, Instant::now()) {
        return Err(violation(
            "the sender does not read its acknowledgements".into(),
        ));
    }
    conn.link.count_foot(len);
    Ok(true)
}
