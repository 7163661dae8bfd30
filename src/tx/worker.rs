//! One tx worker: owns a connection to one destination, keeps it open
//! (reconnecting with backoff), and sends the feet the window gives it.
//!
//! Each connection has two threads: this one writes feet, and an
//! acknowledgement reader feeds what rx says back into the window. Whichever
//! notices a failure first shuts the socket down, which wakes the other.

use super::window::{Next, Window};
use crate::config::{Config, Destination};
use crate::error::Error;
use crate::protocol::{Header, Hello, Kind, Status};
use crate::stats::{Link, LinkState};
use crate::{net, wire};
use crossbeam_channel::Receiver;
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Runs worker `w` until the transfer is over.
pub fn run(shared: &Shared, w: usize, dest: &Destination, link: &Link) {
    let mut backoff = BACKOFF_START;
    let mut connections = 0u64;
    while !shared.window.is_finished() {
        link.set_state(LinkState::Connecting);
        match open(shared, w, dest) {
            Ok(stream) => {
                if connections > 0 {
                    link.count_reconnect();
                }
                connections += 1;
                backoff = BACKOFF_START;
                log::info!("worker {w}: connected to {dest}");
                serve(shared, w, stream, link);
            }
            Err(OpenError::Fatal(e)) => {
                shared.window.finish(Err(e));
                break;
            }
            Err(OpenError::Retry(e)) => {
                log::debug!("worker {w}: {e}");
                shared.window.note_error(e);
            }
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

/// Connects and completes the handshake.
fn open(shared: &Shared, w: usize, dest: &Destination) -> Result<TcpStream, OpenError> {
    let c = shared.config;
    let retry =
        |what: &str, e: &dyn std::fmt::Display| OpenError::Retry(format!("{what} {dest}: {e}"));
    let mut stream = net::connect(dest, CONNECT_TIMEOUT.min(c.reconnect_timeout))
        .map_err(|e| retry("connect to", &e))?;
    net::tune(&stream).map_err(|e| retry("set options on connection to", &e))?;
    stream
        .set_read_timeout(Some(c.handshake_timeout))
        .map_err(|e| retry("set timeout on", &e))?;
    let hello = Hello {
        flags: 0,
        checkphrase: c.checkphrase,
        session: shared.session,
        foot_size: c.foot_size,
        window: c.window,
        worker: w as u16,
        extension: Vec::new(),
    };
    let mut buf = Vec::new();
    hello.encode(&mut buf);
    std::io::Write::write_all(&mut stream, &buf).map_err(|e| retry("handshake with", &e))?;
    let reply = wire::read_reply(&mut stream).map_err(|e| retry("handshake with", &e))?;
    stream
        .set_read_timeout(None)
        .map_err(|e| retry("set timeout on", &e))?;
    if reply.status != Status::Reject && !shared.window.same_receiver(reply.receiver) {
        return Err(OpenError::Fatal(Error::Peer(format!(
            "{dest} is not the receiver the stream started with (a different rx, or one that was restarted): every destination must reach the same rx"
        ))));
    }
    match reply.status {
        Status::Accept => {
            shared.window.advance(reply.delivered);
            Ok(stream)
        }
        Status::Complete => {
            shared.window.finish(Ok(reply.delivered));
            Err(OpenError::Retry(format!("{dest}: stream already complete")))
        }
        Status::Reject => Err(OpenError::Fatal(Error::Peer(format!(
            "{dest} refused the connection: {}",
            reply.message
        )))),
    }
}

/// Sends feet on an established connection until it fails or the transfer
/// is over.
fn serve(shared: &Shared, w: usize, mut stream: TcpStream, link: &Link) {
    let window = shared.window;
    let reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => {
            shared.window.note_error(format!("clone socket: {e}"));
            return;
        }
    };
    window.connected(w);
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
            if let Err(e) = wire::write_frame(&mut stream, &header, &foot.data) {
                log::info!("worker {w}: send foot {}: {e}", foot.id);
                window.note_error(format!("send: {e}"));
                break;
            }
            link.count_foot(foot.data.len());
            link.set_state(LinkState::Idle);
        }
        // Wakes the acknowledgement reader; a FIN tells rx we are done.
        let _ = stream.shutdown(Shutdown::Both);
        window.disconnected(w);
    });
}

/// Reads what rx sends back on one connection into the window.
fn read_acks(window: &Window, w: usize, mut stream: TcpStream) {
    let result = (|| -> std::io::Result<()> {
        loop {
            // rx never sends feet: a zero bound rejects any payload but an abort's.
            let h = wire::read_header(&mut stream, 0)?;
            match h.kind {
                Kind::Ack => window.ack(w, h.id),
                Kind::Window => window.advance(h.id),
                Kind::Done => {
                    window.finish(Ok(h.id));
                    return Ok(());
                }
                Kind::Abort => {
                    let msg = wire::read_payload(&mut stream, h.len)?;
                    window.finish(Err(Error::Peer(String::from_utf8_lossy(&msg).into_owned())));
                    return Ok(());
                }
                Kind::Foot => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "receiver sent a foot",
                    ));
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
    let _ = stream.shutdown(Shutdown::Both);
    window.disconnected(w);
}
