//! `rx PORT --exec COMMAND`: a receiver that serves a flow per sender
//! session, each written to the stdin of its own run of COMMAND (through
//! `/bin/sh -c`), with the flow's name in `$VIAMILLIPEDE_NAME`.
//!
//! The name reaches the command only in the environment, never spliced
//! into the command's text, and the handshake refuses names with anything
//! a shell, an option parser or a path would read as more than a name. A
//! flow is complete, and its sender told so, only once its command has
//! read the whole stream and exited 0; a flow that fails has its command's
//! process group sent SIGTERM (SIGKILL 5 s later) before its stdin closes,
//! so not even a pipeline takes a cut stream for a whole one.

use super::hub::{FlowInfo, Flows, Hub, Many, Opened, Output};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::stats::human_bytes;
use crate::Summary;
use std::io::{self, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a command is given to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long a command that stopped reading is given to exit, so its
/// status can be told.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How many commands are running, so rx exits only once each has been
/// told how its stream ended and has exited.
#[derive(Default)]
struct Running {
    count: Mutex<usize>,
    gone: Condvar,
}

impl Running {
    fn add(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn remove(&self) {
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        self.gone.notify_all();
    }

    fn wait_none(&self) {
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self.gone.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A command's process group, to signal from any thread (the flow's
/// driver, while the sequencer is blocked writing to the command) until
/// the command has been reaped: after that its id may be another's.
struct Group {
    id: Option<rustix::process::Pid>,
    reaped: AtomicBool,
}

impl Group {
    fn signal(&self, sig: rustix::process::Signal) {
        if let (Some(g), false) = (self.id, self.reaped.load(Ordering::Acquire)) {
            let _ = rustix::process::kill_process_group(g, sig);
        }
    }

    /// SIGTERM now, SIGKILL after [`TERM_GRACE`] if it has not exited.
    fn stop(self: &Arc<Self>) {
        use rustix::process::Signal;
        self.signal(Signal::TERM);
        let group = Arc::clone(self);
        // A timer, not a wait for anything: the group is killed if still
        // there when it rings.
        let _ = std::thread::Builder::new()
            .name("rx-exec-kill".into())
            .spawn(move || {
                std::thread::sleep(TERM_GRACE);
                group.signal(Signal::KILL);
            });
    }
}

/// One flow's command.
struct Exec {
    child: Child,
    stdin: Option<ChildStdin>,
    label: String,
    finished: bool,
    group: Arc<Group>,
    running: Arc<Running>,
}

/// `status` as words: "exited with status 1", "was killed by SIGKILL".
fn told(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by {}", crate::error::signal_name(sig)),
        _ => format!("ended: {status}"),
    }
}

impl Exec {
    fn spawn(command: &str, info: &FlowInfo, running: &Arc<Running>) -> io::Result<Exec> {
        let label = info
            .name
            .clone()
            .unwrap_or_else(|| info.session_hex()[..8].to_string());
        use std::os::unix::process::CommandExt;
        let child = Command::new("/bin/sh")
            // Its own group: a pipeline is stopped whole, and a terminal's
            // ^C reaches rx, which stops its flows, not the commands.
            .process_group(0)
            .arg("-c")
            .arg(command)
            .env("VIAMILLIPEDE_NAME", info.name.as_deref().unwrap_or(""))
            .env("VIAMILLIPEDE_SESSION", info.session_hex())
            .env("VIAMILLIPEDE_PEER", info.peer.to_string())
            .stdin(Stdio::piped())
            .spawn()?;
        running.add();
        let group = Arc::new(Group {
            id: rustix::process::Pid::from_raw(child.id() as i32),
            reaped: AtomicBool::new(false),
        });
        let mut exec = Exec {
            stdin: None,
            child,
            label,
            finished: false,
            group,
            running: Arc::clone(running),
        };
        exec.stdin = exec.child.stdin.take();
        Ok(exec)
    }

    /// Waits up to `grace` for the command to exit.
    fn wait_for(&mut self, grace: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.group.reaped.store(true, Ordering::Release);
                    return Some(status);
                }
                Ok(None) if Instant::now() < until => {
                    // Polled: std has no wait with a deadline.
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }
}

impl Write for Exec {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("the command's stdin is closed"))?;
        match stdin.write(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                // It stopped reading: say how it ended, if it did.
                self.stdin = None;
                let how = match self.wait_for(EXIT_GRACE) {
                    Some(status) => told(status),
                    None => "closed its stdin".into(),
                };
                Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!("the command {how} before the end of the stream"),
                ))
            }
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Output for Exec {
    fn what(&self) -> String {
        "the command's stdin".into()
    }

    fn stopper(&self) -> Option<super::hub::Stopper> {
        let group = Arc::clone(&self.group);
        Some(super::hub::Stopper(Box::new(move || group.stop())))
    }

    fn finish(&mut self) -> io::Result<()> {
        self.finished = true;
        drop(self.stdin.take());
        // Bounded: a flow that fails meanwhile stops the command's group.
        let status = self.child.wait()?;
        self.group.reaped.store(true, Ordering::Release);
        match status.success() {
            true => Ok(()),
            false => Err(io::Error::other(format!(
                "the command for flow {} {} after reading the whole stream",
                self.label,
                told(status)
            ))),
        }
    }
}

impl Drop for Exec {
    /// An unfinished flow: the command is told with SIGTERM before its
    /// stdin closes, then reaped.
    fn drop(&mut self) {
        if !self.finished {
            self.stop();
        }
        self.running.remove();
    }
}

impl Exec {
    fn stop(&mut self) {
        use rustix::process::Signal;
        self.group.signal(Signal::TERM);
        drop(self.stdin.take());
        if self.wait_for(TERM_GRACE).is_none() {
            self.group.signal(Signal::KILL);
            let _ = self.child.wait();
            self.group.reaped.store(true, Ordering::Release);
        }
    }
}

/// Serves flows on `listener`, each into a run of `command`, until
/// SIGINT or SIGTERM; `on_ready` is told the bound address. Ends with the
/// total written, or an error if the stop cut flows short.
pub fn serve(
    config: &Config,
    listener: TcpListener,
    command: &str,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> Result<Summary> {
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("read the listening address", e))?;
    let command = command.to_string();
    let running = Arc::new(Running::default());
    let commands = Arc::clone(&running);
    let open = move |info: &FlowInfo| -> io::Result<Opened> {
        let exec = Exec::spawn(&command, info, &commands)?;
        let label = exec.label.clone();
        let peer = info.peer;
        eprintln_flow(&format!("flow {label} from {peer}: started"));
        Ok(Opened {
            output: Box::new(exec),
            on_end: Box::new(move |result: &Result<Summary>| match result {
                Ok(s) => eprintln_flow(&format!(
                    "flow {label}: {} written in {:.1} s; the command exited 0",
                    human_bytes(s.bytes),
                    s.elapsed.as_secs_f64()
                )),
                Err(e) => eprintln_flow(&format!("flow {label} failed: {e}")),
            }),
            events: None,
        })
    };
    let hub = Hub::new(config.clone(), Flows::Many(Many::new(Box::new(open))));
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<i32>(1);
    let _attached = super::attach(
        &hub,
        Some(Box::new(move |sig, cut| {
            let _ = stop_tx.try_send(if cut { sig } else { 0 });
        })),
    );
    let started = Instant::now();
    hub.listen(listener)?;
    on_ready(local);
    let sig = stop_rx
        .recv()
        .map_err(|_| Error::Internal("the receiver's signal thread ended".into()))?;
    // The flows that were cut tell their senders; wait for them to end.
    // Bounded by the linger: a flow that failed waits at most a few
    // seconds for its sender to hang up.
    hub.wait_idle();
    // Every command has been told (SIGTERM) and has exited.
    running.wait_none();
    let (flows, failed, bytes) = hub
        .with_many(|m| (m.started, m.failed, m.bytes))
        .unwrap_or_default();
    if sig != 0 {
        return Err(Error::Interrupted(sig));
    }
    Ok(Summary {
        bytes,
        elapsed: started.elapsed(),
        detail: format!("{flows} flows, {failed} failed"),
    })
}

/// A line about a flow, for whoever watches rx: always shown, as the
/// address it listens on is.
fn eprintln_flow(line: &str) {
    let _ = writeln!(io::stderr(), "viamillipede: {line}");
}
