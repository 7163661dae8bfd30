//! What rx has to tell the sender on one connection, and the thread that
//! tells it.
//!
//! The connection's reader, the sequencer and the end of the stream only
//! *post* here, which never blocks: acknowledgements queue up, window
//! updates and progress reports keep only their latest value, and the
//! stream's end is one slot. One writer thread per connection sends what is
//! posted, in that order, so a sender that stops reading holds up its own
//! connection only (its writes time out and the connection is dropped),
//! never stdout or the other connections, and a frame is never left half
//! written on a connection that goes on.

use crate::protocol::datagram::Report;
use crate::protocol::{Header, Kind, MAX_WINDOW};
use crate::wire::FrameWriter;
use std::net::{Shutdown, TcpStream};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often, at most, rx reports the bytes arriving on a connection while
/// no foot completes: often enough that a slow connection is seen to move
/// long before its stall limit, rarely enough to cost nothing on the way
/// back (16 bytes, 32 sealed, four times a second).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Acknowledgements one connection may have waiting: an honest sender
/// never has more than a window of feet unacknowledged, so more means it
/// does not read what it is told.
const MAX_ACKS: usize = 2 * MAX_WINDOW as usize;

/// How the stream ended, for the sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Every byte (this many) is written.
    Done(u64),
    /// The receiver failed, for this reason.
    Abort(String),
}

/// Reports one connection may have waiting (`--udp`); beyond it, the
/// oldest that tells of no loss goes.
const MAX_REPORTS: usize = 1024;

#[derive(Debug, Default)]
struct Posted {
    acks: Vec<u64>,
    /// Datagram reports, oldest first.
    reports: Vec<Report>,
    progress: Option<u64>,
    window: Option<u64>,
    end: Option<End>,
    /// The connection is over: the writer stops.
    closed: bool,
    /// When an acknowledgement or a report was last posted.
    told: Option<Instant>,
}

impl Posted {
    fn is_empty(&self) -> bool {
        self.acks.is_empty()
            && self.reports.is_empty()
            && self.progress.is_none()
            && self.window.is_none()
            && self.end.is_none()
    }
}

/// The frames waiting to be sent to the sender on one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    posted: Mutex<Posted>,
    ready: Condvar,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, Posted> {
        self.posted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn post(&self, f: impl FnOnce(&mut Posted)) {
        let mut p = self.lock();
        if !p.closed {
            f(&mut p);
            self.ready.notify_one();
        }
    }

    /// Foot `id` has been received. False when the sender has let too many
    /// acknowledgements pile up unread.
    pub fn ack(&self, id: u64, now: Instant) -> bool {
        let mut p = self.lock();
        if p.acks.len() >= MAX_ACKS {
            return false;
        }
        p.acks.push(id);
        p.told = Some(now);
        self.ready.notify_one();
        true
    }

    /// A report on this connection's datagrams. One that tells of no loss
    /// replaces the one before it if that told of none either: only the
    /// newest counters matter then.
    pub fn datagrams(&self, report: Report) {
        self.post(|p| {
            if report.lost.is_empty() && p.reports.last().is_some_and(|r| r.lost.is_empty()) {
                p.reports.pop();
            }
            if p.reports.len() >= MAX_REPORTS {
                if let Some(i) = p.reports.iter().position(|r| r.lost.is_empty()) {
                    p.reports.remove(i);
                }
            }
            p.reports.push(report);
        });
    }

    /// `bytes` in all have arrived on this connection: told to the sender if
    /// it has heard nothing from this connection for [`PROGRESS_EVERY`].
    pub fn progress(&self, bytes: u64, now: Instant) {
        let mut p = self.lock();
        if p.closed || p.told.is_some_and(|t| now < t + PROGRESS_EVERY) {
            return;
        }
        p.progress = Some(bytes);
        p.told = Some(now);
        self.ready.notify_one();
    }

    /// Every foot below `delivered` is written.
    pub fn window(&self, delivered: u64) {
        self.post(|p| p.window = Some(delivered));
    }

    /// The stream has ended.
    pub fn end(&self, end: End) {
        self.post(|p| p.end = Some(end));
    }

    /// The connection is over; the writer stops after what was posted.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The writer thread: sends what is posted until the connection is
    /// closed, or a write fails (then it shuts the socket down, so the
    /// connection's reader stops too).
    pub fn run(&self, mut writer: FrameWriter<TcpStream>) {
        loop {
            let batch = {
                let mut p = self.lock();
                while p.is_empty() && !p.closed {
                    p = self.ready.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                if p.is_empty() {
                    return;
                }
                Posted {
                    acks: std::mem::take(&mut p.acks),
                    reports: std::mem::take(&mut p.reports),
                    progress: p.progress.take(),
                    window: p.window.take(),
                    end: p.end.take(),
                    ..Posted::default()
                }
            };
            if let Err(e) = send(&mut writer, batch) {
                log::debug!("write to sender: {e}");
                let _ = writer.get_ref().shutdown(Shutdown::Both);
                self.close();
                return;
            }
        }
    }
}

fn send(w: &mut FrameWriter<TcpStream>, batch: Posted) -> std::io::Result<()> {
    for r in batch.reports {
        let payload = r.encode();
        let header = Header {
            kind: Kind::Datagrams,
            flags: 0,
            len: payload.len() as u32,
            id: 0,
        };
        w.send(&header, &payload)?;
    }
    for id in batch.acks {
        w.send(&Header::control(Kind::Ack, id), b"")?;
    }
    if let Some(bytes) = batch.progress {
        w.send(&Header::control(Kind::Progress, bytes), b"")?;
    }
    if let Some(delivered) = batch.window {
        w.send(&Header::control(Kind::Window, delivered), b"")?;
    }
    match batch.end {
        Some(End::Done(bytes)) => w.send(&Header::control(Kind::Done, bytes), b""),
        Some(End::Abort(msg)) => {
            let msg = crate::protocol::handshake::truncate_utf8(&msg, crate::protocol::MAX_MESSAGE);
            let header = Header {
                kind: Kind::Abort,
                flags: 0,
                len: msg.len() as u32,
                id: 0,
            };
            w.send(&header, msg.as_bytes())
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_told_only_after_a_quiet_while() {
        let o = Outbox::default();
        let t0 = Instant::now();
        o.progress(10, t0);
        assert_eq!(o.lock().progress, Some(10));
        o.progress(20, t0 + PROGRESS_EVERY / 2);
        assert_eq!(o.lock().progress, Some(10), "too soon");
        assert!(o.ack(0, t0 + PROGRESS_EVERY));
        o.progress(30, t0 + PROGRESS_EVERY * 3 / 2);
        assert_eq!(o.lock().progress, Some(10), "an acknowledgement was news");
        o.progress(40, t0 + PROGRESS_EVERY * 2);
        assert_eq!(o.lock().progress, Some(40));
    }

    #[test]
    fn a_sender_that_reads_nothing_is_found_out() {
        let o = Outbox::default();
        let now = Instant::now();
        assert!((0..MAX_ACKS as u64).all(|id| o.ack(id, now)));
        assert!(!o.ack(0, now));
    }

    #[test]
    fn window_updates_keep_the_latest_and_nothing_is_posted_once_closed() {
        let o = Outbox::default();
        o.window(3);
        o.window(5);
        assert_eq!(o.lock().window, Some(5));
        o.close();
        o.end(End::Done(9));
        assert_eq!(o.lock().end, None);
    }
}
