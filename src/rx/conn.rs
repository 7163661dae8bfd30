//! One incoming connection: its handshake (with a time limit) and then the
//! feet it carries, each handed to the sequencer and acknowledged.
//!
//! Anything that breaks the protocol only drops this connection: the
//! stream in progress and the receiver carry on.

use super::state::{Admission, State};
use super::{Arrived, Event};
use crate::protocol::{HandshakeError, Header, Kind, Reason, Reply, Status};
use crate::stats::LinkState;
use crate::{net, wire};
use crossbeam_channel::Sender;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

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
    let session = handshake(state, &mut stream, peer);
    drop(handshaking);
    let session = match session {
        Some(s) => s,
        None => {
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
    let (key, conn) = state.register(writer, peer.to_string());
    conn.link.set_state(LinkState::Receiving);
    let _ = events.send(Event::Opened);
    log::info!("{peer}: connected");

    let result = receive(state, &mut stream, session, &conn, feet);
    match &result {
        Ok(()) => log::debug!("{peer}: closed by sender"),
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

/// Reads and judges the hello; answers it. Returns the session to serve, or
/// None when the connection is not to be served.
fn handshake(
    state: &State,
    stream: &mut TcpStream,
    peer: SocketAddr,
) -> Option<super::state::Session> {
    let limit = state.config.handshake_timeout;
    if stream.set_read_timeout(Some(limit)).is_err()
        || stream.set_write_timeout(Some(limit)).is_err()
    {
        return None;
    }
    let hello = match wire::read_hello(stream) {
        Ok(h) => h,
        Err(HandshakeError::Version(v)) => {
            let msg = format!(
                "protocol version {v} is not supported (this receiver speaks {})",
                crate::protocol::VERSION
            );
            log::warn!("{peer}: refused: {msg}");
            reply(state, stream, &Reply::reject(Reason::Version, msg));
            return None;
        }
        Err(HandshakeError::Io(kind, e)) => {
            let why = if matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                format!("no handshake within {} s", limit.as_secs())
            } else {
                e
            };
            log::warn!("{peer}: dropped before the handshake completed: {why}");
            net::abortive_close(stream);
            return None;
        }
        Err(e) => {
            log::warn!("{peer}: dropped: {e}");
            net::abortive_close(stream);
            return None;
        }
    };
    match state.admit(&hello) {
        Admission::Accept(session, delivered) => {
            if !reply(state, stream, &Reply::accept(delivered)) {
                return None;
            }
            let ok = stream.set_read_timeout(None).is_ok()
                && stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_ok();
            let ok = ok && net::tune(stream).is_ok();
            ok.then_some(session)
        }
        Admission::Complete(bytes) => {
            reply(
                state,
                stream,
                &Reply::new(
                    Status::Complete,
                    Reason::None,
                    bytes,
                    "stream complete".into(),
                ),
            );
            None
        }
        Admission::Reject(r) => {
            log::warn!("{peer}: refused: {}", r.message);
            reply(state, stream, &r);
            None
        }
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

/// Reads feet until the sender closes the connection or breaks the rules.
fn receive(
    state: &State,
    stream: &mut TcpStream,
    session: super::state::Session,
    conn: &super::state::Conn,
    feet: &Sender<Arrived>,
) -> io::Result<()> {
    let pool = state.pool(session);
    loop {
        let h = match wire::read_header(stream, session.foot_size) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if h.kind != Kind::Foot {
            return Err(violation(format!(
                "unexpected {:?} frame from a sender",
                h.kind
            )));
        }
        // Flow control promises every foot lies inside the window; anything
        // beyond it would grow the reorder buffer without bound.
        let delivered = state.delivered.load(Ordering::Acquire);
        if h.id >= delivered + u64::from(session.window) {
            return Err(violation(format!(
                "foot {} is outside the window ({} feet from {delivered})",
                h.id, session.window
            )));
        }
        let mut data = pool.take();
        data.read_exact_from(stream, h.len as usize)?;
        let len = data.len();
        state.arrived.fetch_add(1, Ordering::Relaxed);
        if feet
            .send(Arrived {
                id: h.id,
                data,
                end: h.is_end(),
            })
            .is_err()
        {
            // The sequencer has finished; nothing more is needed.
            return Ok(());
        }
        conn.send(&Header::control(Kind::Ack, h.id), b"");
        conn.link.count_foot(len);
    }
}
