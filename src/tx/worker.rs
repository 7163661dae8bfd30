//! One tx worker: owns a connection to one destination, keeps it open
//! (reconnecting with backoff), and sends the feet the window gives it.
//!
//! Each connection has two threads: this one writes feet, and an
//! acknowledgement reader feeds what rx says back into the window. Whichever
//! notices a failure first shuts the socket down, which wakes the other.

use super::window::{Closer, Next, Window};
use crate::config::{Config, Destination};
use crate::crypto::{self, Opener, Sealer, NONCE_LEN, PROOF_LEN};
use crate::error::Error;
use crate::protocol::handshake::{FLAG_AUTH, FLAG_CHECKSUMS, FLAG_ENCRYPT};
use crate::protocol::{Header, Hello, Kind, Status, FLAG_COMPRESSED};
use crate::stats::{Link, LinkState};
use crate::wire::{FrameReader, FrameWriter};
use crate::{net, wire};
use crossbeam_channel::Receiver;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::ops::ControlFlow;
use std::time::Duration;
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
}

enum OpenError {
    /// Worth another try later.
    Retry(String),
    /// The receiver refused us: the whole transfer stops.
    Fatal(Error),
}

/// Runs worker `w`, dialing `dest`, until the transfer is over.
pub fn run(shared: &Shared, w: usize, dest: &Destination, link: &Link) {
    let mut backoff = BACKOFF_START;
    let mut connections = 0u64;
    while !shared.window.is_finished() {
        link.set_state(LinkState::Connecting);
        let opened = dial(shared, dest).and_then(|s| handshake(shared, w, s, dest));
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
pub fn run_accepted(shared: &Shared, w: usize, streams: &Receiver<TcpStream>, link: &Link) {
    let mut connections = 0u64;
    while !shared.window.is_finished() {
        link.set_state(LinkState::Connecting);
        let stream = crossbeam_channel::select! {
            recv(streams) -> s => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            recv(shared.stop) -> _ => break,
        };
        let opened = handshake(shared, w, stream, &link.peer);
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
            serve(shared, w, opened, link);
            return ControlFlow::Continue(true);
        }
        Err(OpenError::Fatal(e)) => {
            shared.window.finish(Err(e));
            return ControlFlow::Break(());
        }
        Err(OpenError::Retry(e)) => {
            shared.window.attempt_failed(w);
            log::debug!("worker {w}: {e}");
            shared.window.note_error(e);
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
}

/// Connects to `dest`.
fn dial(shared: &Shared, dest: &Destination) -> Result<TcpStream, OpenError> {
    let c = shared.config;
    net::connect(dest, CONNECT_TIMEOUT.min(c.reconnect_timeout), &c.socket)
        .map_err(|e| OpenError::Retry(format!("connect to {dest}: {e}")))
}

/// Completes the handshake on a new connection to `peer` (proving the key,
/// if there is one).
fn handshake(
    shared: &Shared,
    w: usize,
    mut stream: TcpStream,
    dest: &dyn std::fmt::Display,
) -> Result<Opened, OpenError> {
    let c = shared.config;
    let retry =
        |what: &str, e: &dyn std::fmt::Display| OpenError::Retry(format!("{what} {dest}: {e}"));
    let fatal = |msg: String| OpenError::Fatal(Error::Peer(format!("{dest}: {msg}")));
    net::tune(&stream, &c.socket).map_err(|e| retry("set options on connection to", &e))?;
    stream
        .set_read_timeout(Some(c.handshake_timeout))
        .map_err(|e| retry("set timeout on", &e))?;
    let tx_nonce = match &c.key {
        Some(_) => Some(crypto::nonce().map_err(OpenError::Fatal)?),
        None => None,
    };
    let mut flags = 0;
    if tx_nonce.is_some() {
        flags |= FLAG_AUTH;
    }
    if c.encrypt {
        flags |= FLAG_ENCRYPT;
    }
    if c.checksums {
        flags |= FLAG_CHECKSUMS;
    }
    let hello = Hello {
        flags,
        checkphrase: c.checkphrase,
        session: shared.session,
        foot_size: c.foot_size,
        window: c.window,
        worker: w as u16,
        extension: tx_nonce.map(Vec::from).unwrap_or_default(),
    };
    let mut hello_bytes = Vec::new();
    hello.encode(&mut hello_bytes);
    stream
        .write_all(&hello_bytes)
        .map_err(|e| retry("handshake with", &e))?;
    let mut reply = wire::read_reply(&mut stream).map_err(|e| retry("handshake with", &e))?;
    let mut rx_nonce = None;
    match (&c.key, reply.status) {
        (Some(key), Status::Challenge) => {
            // rx proves the key first; only then does tx prove it, so a
            // receiver without the key learns nothing it could replay.
            let ext = &reply.extension;
            if ext.len() != NONCE_LEN + PROOF_LEN {
                return Err(fatal("malformed authentication challenge".into()));
            }
            let (nonce, proof) = ext.split_at(NONCE_LEN);
            if !crypto::proofs_match(&key.rx_proof(&hello_bytes, nonce), proof) {
                return Err(fatal(
                    "the receiver could not prove the key: the key files differ".into(),
                ));
            }
            let mut challenge = Vec::new();
            reply.encode(&mut challenge);
            stream
                .write_all(&key.tx_proof(&hello_bytes, &challenge))
                .map_err(|e| retry("handshake with", &e))?;
            rx_nonce = Some(nonce.to_vec());
            reply = wire::read_reply(&mut stream).map_err(|e| retry("handshake with", &e))?;
        }
        (None, Status::Challenge) => {
            return Err(fatal(
                "the receiver requires a key: give --key-file on both sides".into(),
            ))
        }
        (Some(_), Status::Accept | Status::Complete) => {
            return Err(fatal("the receiver did not authenticate itself".into()))
        }
        _ => {}
    }
    stream
        .set_read_timeout(None)
        .map_err(|e| retry("set timeout on", &e))?;
    if reply.status != Status::Reject && !shared.window.same_receiver(reply.receiver) {
        return Err(fatal(
            "not the receiver the stream started with (a different rx, or one that was restarted): every destination must reach the same rx".into(),
        ));
    }
    match reply.status {
        Status::Accept => {
            let encrypted = reply.flags & FLAG_ENCRYPT != 0;
            if c.encrypt && !encrypted {
                return Err(fatal("the receiver did not agree to encrypt".into()));
            }
            let channel = match (encrypted, &c.key, tx_nonce, rx_nonce) {
                (false, ..) => None,
                (true, Some(key), Some(tx_nonce), Some(rx_nonce)) => {
                    Some(key.channel(&tx_nonce, &rx_nonce, true))
                }
                (true, ..) => return Err(fatal("encryption without authentication".into())),
            };
            let checksums = reply.flags & FLAG_CHECKSUMS != 0;
            if c.checksums && !checksums {
                return Err(fatal("the receiver did not agree to checksums".into()));
            }
            if !shared.window.advance(reply.delivered) {
                return Err(retry(
                    "handshake with",
                    &format!(
                        "the receiver claims {} pieces written, more than were sent",
                        reply.delivered
                    ),
                ));
            }
            Ok(Opened {
                stream,
                channel,
                checksums,
            })
        }
        Status::Complete => {
            shared.window.finish(Ok(reply.delivered));
            Err(OpenError::Retry(format!("{dest}: stream already complete")))
        }
        Status::Reject | Status::Challenge => {
            Err(fatal(format!("refused the connection: {}", reply.message)))
        }
    }
}

/// Sends feet on an established connection until it fails or the transfer
/// is over.
fn serve(shared: &Shared, w: usize, opened: Opened, link: &Link) {
    let Opened {
        stream,
        channel,
        checksums,
    } = opened;
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
            .spawn_scoped(scope, || read_acks(window, w, reader));
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
fn read_acks(window: &Window, w: usize, mut reader: FrameReader<TcpStream>) {
    let result = (|| -> std::io::Result<()> {
        loop {
            let h = reader.header()?;
            // Also checks the tag of a sealed frame without a payload; a
            // foot from rx is bounded to zero bytes, so reading it is cheap.
            let payload = reader.small_payload(&h)?;
            match h.kind {
                Kind::Ack => window.ack(w, h.id),
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
                    let msg = String::from_utf8_lossy(&payload).into_owned();
                    window.finish(Err(Error::Peer(msg)));
                }
                Kind::Foot | Kind::Cancel => {
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
        }
    }
    let _ = reader.get_mut().shutdown(Shutdown::Both);
    window.disconnected(w);
}
