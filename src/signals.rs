//! Signals, handled on a thread of their own: SIGUSR1 (and SIGINFO, where
//! the system has it) prints a report on stderr without touching stdout or
//! the data path; SIGINT and SIGTERM stop the transfer cleanly.

use signal_hook::iterator::{Handle, Signals};
use std::io::{self, Write};
use std::thread::JoinHandle;

/// The signals that ask for a report.
fn report_signals() -> Vec<i32> {
    #[allow(
        unused_mut,
        reason = "SIGINFO is added only on the systems that have it"
    )]
    let mut v = vec![signal_hook::consts::SIGUSR1];
    #[cfg(any(
        target_os = "freebsd",
        target_os = "dragonfly",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "macos"
    ))]
    v.push(signal_hook::consts::SIGINFO);
    v
}

/// The signals that stop a transfer cleanly.
const STOP_SIGNALS: [i32; 2] = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM];

/// A running signal thread; stopped and joined on drop.
pub struct Reporter {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Installs the handlers and starts a thread that writes `report()` to
    /// stderr whenever a report signal arrives, and calls `stop(signal)` on
    /// the first SIGINT or SIGTERM. A second one exits at once, for a stop
    /// that hangs (an output that no one reads).
    pub fn spawn(
        report: impl Fn() -> String + Send + 'static,
        stop: impl Fn(i32) + Send + 'static,
    ) -> io::Result<Reporter> {
        let mut signals = Signals::new(report_signals().into_iter().chain(STOP_SIGNALS))?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut stopping = false;
                for sig in signals.forever() {
                    if !STOP_SIGNALS.contains(&sig) {
                        let text = report();
                        let _ = io::stderr().lock().write_all(text.as_bytes());
                    } else if !stopping {
                        stopping = true;
                        stop(sig);
                    } else {
                        std::process::exit(128 + sig);
                    }
                }
            })?;
        Ok(Reporter {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
