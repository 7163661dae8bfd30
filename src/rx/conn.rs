//! One incoming connection: its handshake (with a time limit) and then the
//! feet it carries, each handed to the sequencer and acknowledged.
//!
//! Anything that breaks the protocol only drops this connection: the
//! stream in progress and the receiver carry on.

use super::state::{Admission, Progress, Session, State};
use super::{Arrived, Event};
use crate::crypto::{self, Key, Opener, Sealer, NONCE_LEN, PROOF_LEN};
use crate::error::Error;
use crate::protocol::handshake::{FLAG_CHECKSUMS, FLAG_ENCRYPT};
use crate::protocol::{HandshakeError, Kind, Reason, Reply, Status};
use crate::protocol::{Hello, HEADER_LEN};
use crate::stats::LinkState;
use crate::wire::{FrameReader, FrameWriter};
use crate::{net, wire};
use crossbeam_channel::Sender;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zstd::bulk::Decompressor;

/// How long a write to a sender may block before its connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one accepted connection to the end.
pub fn handle(
    state: &State,
    mut stream: TcpStream,
    peer: SocketAddr,
    feet: &Sender<Arrived>,
    events: &Sender<Event>,
    handshaking: super::Handshaking<'_>,
) {
    let outcome = handshake(state, &mut stream, peer);
    drop(handshaking);
    let Accepted {
        session,
        channel,
        checksums,
    } = match outcome {
        Handshake::Serve(s) => *s,
        Handshake::ToldComplete => {
            // The sender knows now: rx need not wait for it any longer.
            state.confirm();
            let _ = events.send(Event::Confirmed);
            return;
        }
        Handshake::Refused => {
            state.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
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
    if let Err(e) = std::thread::Builder::new()
        .name(format!("rx-out-{peer}"))
        .spawn(move || out.outbox.run(writer))
    {
        log::warn!("{peer}: no thread for the connection: {e}");
        state.unregister(key);
        return;
    }
    conn.link.set_state(LinkState::Receiving);
    let _ = events.send(Event::Opened);
    log::info!("{peer}: connected");

    let metered = Metered {
        stream: &stream,
        total: 0,
        outbox: &conn.outbox,
    };
    let reader = FrameReader::new(metered, opener, session.foot_size).with_checksums(checksums);
    let result = receive(state, reader, session, &conn, feet);
    conn.outbox.close();
    match &result {
        Ok(Some(reason)) => {
            log::warn!("{peer}: the sender stopped the stream: {reason}");
            state.end(Progress::Failed(format!("sender {reason}")));
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
    ToldComplete,
    /// Refused or failed.
    Refused,
}

/// What was agreed for an accepted connection.
struct Accepted {
    session: Session,
    /// Its keys, when it is encrypted.
    channel: Option<(Sealer, Opener)>,
    /// Whether feet carry checksums.
    checksums: bool,
}

/// Reads and judges the hello, has the sender prove the key if there is
/// one, and answers. Returns the session to serve and, when the connection
/// is encrypted, its keys; or why it is not to be served.
fn handshake(state: &State, stream: &mut TcpStream, peer: SocketAddr) -> Handshake {
    let limit = state.config.handshake_timeout;
    if stream.set_read_timeout(Some(limit)).is_err()
        || stream.set_write_timeout(Some(limit)).is_err()
    {
        return Handshake::Refused;
    }
    // One deadline for the whole handshake, however slowly the bytes drip.
    let deadline = Instant::now() + limit;
    let hello = match wire::read_hello(&mut Deadline {
        stream,
        until: deadline,
    }) {
        Ok(h) => h,
        Err(HandshakeError::Version(v)) => {
            let msg = format!(
                "protocol version {v} is not supported (this receiver speaks {})",
                crate::protocol::VERSION
            );
            log::warn!("{peer}: refused: {msg}");
            reply(state, stream, &Reply::reject(Reason::Version, msg));
            return Handshake::Refused;
        }
        Err(HandshakeError::Io(kind, e)) => {
            let why = if matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                format!("no handshake within {} s", limit.as_secs())
            } else {
                e
            };
            log::warn!("{peer}: dropped before the handshake completed: {why}");
            net::abortive_close(stream);
            return Handshake::Refused;
        }
        Err(e) => {
            log::warn!("{peer}: dropped: {e}");
            net::abortive_close(stream);
            return Handshake::Refused;
        }
    };
    if let Err(r) = state.check(&hello) {
        log::warn!("{peer}: refused: {}", r.message);
        reply(state, stream, &r);
        return Handshake::Refused;
    }
    let nonces = match &state.config.key {
        None => None,
        Some(key) => match authenticate(state, key, stream, &hello, deadline) {
            Ok(nonces) => Some((key, nonces)),
            Err(why) => {
                log::warn!("{peer}: refused: authentication failed: {why}");
                let msg = "authentication failed: the keys differ, or the handshake was replayed";
                reply(state, stream, &Reply::reject(Reason::Auth, msg));
                return Handshake::Refused;
            }
        },
    };
    let encrypt = nonces.is_some() && (hello.flags & FLAG_ENCRYPT != 0 || state.config.encrypt);
    let checksums = hello.flags & FLAG_CHECKSUMS != 0 || state.config.checksums;
    match state.admit(&hello) {
        Admission::Accept(session, delivered) => {
            let mut accept = Reply::accept(delivered);
            if encrypt {
                accept.flags |= FLAG_ENCRYPT;
            }
            if checksums {
                accept.flags |= FLAG_CHECKSUMS;
            }
            if !reply(state, stream, &accept) {
                return Handshake::Refused;
            }
            let ok = stream.set_read_timeout(None).is_ok()
                && stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_ok();
            let ok = ok && net::tune(stream, &state.config.socket).is_ok();
            let channel = nonces
                .filter(|_| encrypt)
                .map(|(key, (tx_nonce, rx_nonce))| key.channel(&tx_nonce, &rx_nonce, false));
            match ok {
                true => Handshake::Serve(Box::new(Accepted {
                    session,
                    channel,
                    checksums,
                })),
                false => Handshake::Refused,
            }
        }
        Admission::Complete(bytes) => {
            let told = reply(
                state,
                stream,
                &Reply::new(
                    Status::Complete,
                    Reason::None,
                    bytes,
                    "stream complete".into(),
                ),
            );
            if told {
                Handshake::ToldComplete
            } else {
                Handshake::Refused
            }
        }
        Admission::Reject(r) => {
            log::warn!("{peer}: refused: {}", r.message);
            reply(state, stream, &r);
            Handshake::Refused
        }
    }
}

/// The challenge-response: rx proves the key over tx's hello and a fresh
/// nonce, then tx must prove it over the whole transcript. Returns both
/// nonces, or why the sender failed.
fn authenticate(
    state: &State,
    key: &Key,
    stream: &mut TcpStream,
    hello: &Hello,
    deadline: Instant,
) -> Result<([u8; NONCE_LEN], [u8; NONCE_LEN]), String> {
    let tx_nonce: [u8; NONCE_LEN] = hello.extension[..]
        .try_into()
        .map_err(|_| "malformed nonce".to_string())?;
    let mut hello_bytes = Vec::new();
    hello.encode(&mut hello_bytes);
    let rx_nonce = crypto::nonce().map_err(|e| e.to_string())?;
    let mut challenge = Reply::new(Status::Challenge, Reason::None, 0, String::new());
    challenge.receiver = state.receiver;
    challenge.extension = [&rx_nonce[..], &key.rx_proof(&hello_bytes, &rx_nonce)].concat();
    let mut challenge_bytes = Vec::new();
    challenge.encode(&mut challenge_bytes);
    stream
        .write_all(&challenge_bytes)
        .map_err(|e| format!("send challenge: {e}"))?;
    let mut proof = [0u8; PROOF_LEN];
    Deadline {
        stream,
        until: deadline,
    }
    .read_exact(&mut proof)
    .map_err(|e| format!("the sender did not prove the key ({e})"))?;
    if !crypto::proofs_match(&key.tx_proof(&hello_bytes, &challenge_bytes), &proof) {
        return Err("wrong key, or a replayed handshake".into());
    }
    Ok((tx_nonce, rx_nonce))
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

/// Reads with a deadline for everything read through it, rather than a
/// timeout per read, which a peer sending a byte at a time would defeat.
struct Deadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

/// Sends a reply, stamped with this receiver's id.
fn reply(state: &State, stream: &mut TcpStream, r: &Reply) -> bool {
    let mut r = r.clone();
    r.receiver = state.receiver;
    let mut buf = Vec::new();
    r.encode(&mut buf);
    stream.write_all(&buf).is_ok()
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
    conn: &super::state::Conn,
    feet: &Sender<Arrived>,
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
            return Ok(Some(String::from_utf8_lossy(&reason).into_owned()));
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
        if h.is_compressed() {
            // Never more than a foot: a foot that would inflate beyond it is
            // refused, so compression cannot raise the memory bound.
            let d = match &mut decompressor {
                Some(d) => d,
                None => decompressor.insert(Decompressor::new()?),
            };
            let mut plain = pool.take();
            plain
                .fill_with(session.foot_size as usize, |out| {
                    d.decompress_to_buffer(&data[..], out)
                })
                .map_err(|e| {
                    violation(format!(
                        "foot {} does not decompress within a foot: {e}",
                        h.id
                    ))
                })?;
            let grown = (plain.len() as u64).saturating_sub(u64::from(h.len));
            if !state.reserve(session, grown) {
                return Err(violation(format!(
                    "foot {} inflates beyond the window",
                    h.id
                )));
            }
            data = plain.compact();
        }
        let len = data.len();
        state.arrived.fetch_add(1, Ordering::Relaxed);
        // From here the sequencer releases what the foot holds.
        reserved.bytes = 0;
        if feet
            .send(Arrived {
                id: h.id,
                data,
                end: h.is_end(),
            })
            .is_err()
        {
            // The sequencer has finished; nothing more is needed.
            return Ok(None);
        }
        if !conn.outbox.ack(h.id, Instant::now()) {
            return Err(violation(
                "the sender does not read its acknowledgements".into(),
            ));
        }
        conn.link.count_foot(len);
    }
}
