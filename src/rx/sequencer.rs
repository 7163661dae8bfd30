//! The sequencer: puts arriving feet in order and writes them to the output.
//!
//! Runs on one thread, the only one that writes stdout, so a foot is written
//! whole or not at all. After each batch it tells tx how far it has written
//! (the flow-control window), and at the end of the stream confirms the
//! total, or reports why writing failed.

use super::hub::Output;
use super::state::{Progress, State};
use super::{Arrived, Event};
use crate::error::Error;
use crate::prbs::Verifier;
use crate::reorder::{Pushed, Reorder};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::Xxh3Default;

/// How often, at most, every connection is told how far the output has
/// been written; between times, only the connection whose foot moved it is
/// (it is sending that foot's acknowledgement anyway). One update per
/// written foot on every connection woke every connection's writer on rx
/// and reader on tx: with sixteen connections, most of the context
/// switches of a loopback transfer.
const TELL_ALL_EVERY: Duration = Duration::from_millis(100);

/// Writes feet from `feet` to `out` in order until the stream ends, or
/// has failed.
pub fn run(state: &State, mut out: Box<dyn Output>, feet: Receiver<Arrived>) {
    let events = &state.events;
    let mut reorder: Reorder<crate::pool::Buffer> = Reorder::new();
    let mut verifier = state.config.prbs.map(Verifier::new);
    // Only a stream with checksums gets a digest; its connections say so
    // before they hand over any foot.
    let mut digest = Xxh3Default::new();
    let mut end: Option<u64> = None;
    // What every connection was last told, and when.
    let (mut told_all, mut told_at) = (0u64, Instant::now());
    loop {
        let foot = match feet.recv_timeout(TELL_ALL_EVERY) {
            Ok(f) => f,
            Err(RecvTimeoutError::Timeout) => {
                if matches!(state.progress(), Progress::Failed(_)) {
                    // Dropped, the output hears that the stream failed.
                    return;
                }
                // Quiet: make sure no connection is left with old news, in
                // case the one that was told has gone dark.
                if told_all < reorder.next() {
                    told_all = reorder.next();
                    told_at = Instant::now();
                    state.tell_window(told_all);
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let len = foot.data.len() as u64;
        if end.is_some_and(|e| foot.id > e) {
            log::warn!(
                "foot {} arrived after the end of the stream (foot {}); dropped",
                foot.id,
                end.unwrap_or(0)
            );
            state.release(len);
            continue;
        }
        if foot.end {
            end = Some(foot.id);
        }
        if reorder.push(foot.id, foot.data, foot.end) == Pushed::Duplicate {
            state.duplicates.fetch_add(1, Ordering::Relaxed);
            state.release(len);
            continue;
        }
        let before = reorder.next();
        while let Some(ready) = reorder.pop_ready() {
            let written =
                state.write_output(|| out.write_all(&ready.data).and_then(|()| out.flush()));
            match written {
                Some(Ok(())) => {
                    if state.checksummed.load(Ordering::Relaxed) {
                        digest.update(&ready.data);
                    }
                    if let Some(v) = &mut verifier {
                        v.check(&ready.data);
                    }
                }
                Some(Err(e)) => {
                    let what = format!("write to {}", out.what());
                    state.end(Progress::Failed(format!("{what}: {e}")));
                    let _ = events.send(Event::Finished(Err(Error::io(what, e))));
                    return;
                }
                // The run is over: nothing more may be written.
                None => return,
            }
            let so_far = state
                .written
                .fetch_add(ready.data.len() as u64, Ordering::Relaxed)
                + ready.data.len() as u64;
            crate::events::tell(&state.config.events, || crate::events::Event::Progress {
                bytes: so_far,
            });
            state.release(ready.data.len() as u64);
            state.delivered.store(ready.id + 1, Ordering::Release);
            if ready.end {
                state.reorder_feet.store(reorder.len(), Ordering::Relaxed);
                let total = state.written.load(Ordering::Relaxed);
                if state.checksummed.load(Ordering::Relaxed) {
                    log::info!("stream digest (xxh3-128): {:032x}", digest.digest128());
                }
                // Complete only once the output took it all (a command
                // given the stream exited 0).
                if let Err(e) = out.finish() {
                    state.end(Progress::Failed(e.to_string()));
                    let _ = events.send(Event::Finished(Err(Error::Output(e.to_string()))));
                    return;
                }
                // Complete before the sender can hear it: a sender that
                // then closes a connection is seen to know.
                state.end(Progress::Complete(total));
                state.tell_window(ready.id + 1);
                let _ = events.send(Event::Finished(verdict(verifier.as_ref(), total)));
                return;
            }
        }
        state.reorder_feet.store(reorder.len(), Ordering::Relaxed);
        if reorder.next() != before {
            if told_at.elapsed() >= TELL_ALL_EVERY {
                told_all = reorder.next();
                told_at = Instant::now();
                state.tell_window(told_all);
            } else {
                foot.by.outbox.window(reorder.next());
            }
        }
    }
}

/// The outcome of a complete stream: with `prbs`, whether it matched.
fn verdict(verifier: Option<&Verifier>, total: u64) -> crate::error::Result<u64> {
    match verifier.map(|v| (v.mismatch(), v.checked())) {
        Some((Some(at), _)) => Err(Error::Mismatch(format!(
            "prbs: the stream differs from the seed's at byte {at} (of {total} written)"
        ))),
        Some((None, checked)) => {
            log::info!("prbs: {checked} bytes match the seed's stream");
            Ok(total)
        }
        None => Ok(total),
    }
}
