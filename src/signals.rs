//! Turns SIGUSR1 (and SIGINFO, where the system has it) into a report on
//! stderr, printed from a thread of its own so it never touches stdout or
//! disturbs the data path.

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

/// A running report thread; stopped and joined on drop.
pub struct Reporter {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Installs the handlers and starts a thread that writes `report()` to
    /// stderr whenever one of the signals arrives.
    pub fn spawn(report: impl Fn() -> String + Send + 'static) -> io::Result<Reporter> {
        let mut signals = Signals::new(report_signals())?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                for _ in signals.forever() {
                    let text = report();
                    let _ = io::stderr().lock().write_all(text.as_bytes());
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
