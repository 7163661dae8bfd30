//! The binary's hold on the process: its signals, handled on a thread of
//! their own, and the control socket. SIGUSR1 (and SIGINFO, where the
//! system has it) prints a report on stderr without touching stdout or the
//! data path; SIGUSR2 cycles the log level (warn, info, debug, trace);
//! SIGINT and SIGTERM stop the transfer cleanly. Both reach the running
//! sides through the configuration's [`Controls`]; the library itself
//! installs nothing.

use signal_hook::consts::SIGUSR2;
use signal_hook::iterator::{Handle, Signals};
use std::io::{self, Write};
use std::thread::JoinHandle;
use viamillipede::config::Config;
use viamillipede::control::{Controls, Socket, Stopped};
use viamillipede::error::{signal_name, Error};

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

/// Cycles the log level: warn, info, debug, trace, warn, ... Returns the
/// new level.
pub fn cycle_log_level() -> log::LevelFilter {
    use log::LevelFilter::*;
    let next = match log::max_level() {
        Off | Error | Warn => Info,
        Info => Debug,
        Debug => Trace,
        Trace => Warn,
    };
    log::set_max_level(next);
    next
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
        let handled = report_signals()
            .into_iter()
            .chain(STOP_SIGNALS)
            .chain([SIGUSR2]);
        let mut signals = Signals::new(handled)?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut stopping = false;
                for sig in signals.forever() {
                    if sig == SIGUSR2 {
                        let level = cycle_log_level();
                        let _ = writeln!(io::stderr(), "viamillipede: log level now {level}");
                    } else if !STOP_SIGNALS.contains(&sig) {
                        let text = report();
                        let _ = io::stderr().lock().write_all(text.as_bytes());
                    } else if !stopping {
                        stopping = true;
                        stop(sig);
                    } else {
                        let _ = writeln!(
                            io::stderr(),
                            "viamillipede: {} again: exiting at once; the output may be incomplete",
                            signal_name(sig)
                        );
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

/// The signal handlers and the control socket of one run; gone on drop.
pub struct Installed {
    _reporter: Reporter,
    _socket: Option<Socket>,
}

/// Gives `config` controls, reached by the signals and, with `--control
/// PATH`, by the control socket.
pub fn install(config: &mut Config) -> Result<Installed, Error> {
    let controls = Controls::new();
    let (reported, stopped) = (controls.clone(), controls.clone());
    let reporter = Reporter::spawn(
        move || reported.report(),
        move |sig| {
            let why = format!("stopped by {}", signal_name(sig));
            if stopped.stop(&why, sig) == Stopped::Early {
                // Nothing runs yet, so nothing is lost: as the signal's
                // default would.
                let _ = writeln!(
                    io::stderr(),
                    "viamillipede: {why} before the transfer started"
                );
                std::process::exit(128 + sig);
            }
        },
    )
    .map_err(|e| Error::io("install signal handlers", e))?;
    let socket = match &config.control {
        Some(path) => {
            let socket = Socket::serve(path, controls.clone()).map_err(|e| {
                Error::io(format!("serve the control socket {}", path.display()), e)
            })?;
            let _ = writeln!(
                io::stderr(),
                "viamillipede: control socket at {}",
                path.display()
            );
            Some(socket)
        }
        None => None,
    };
    config.controls = Some(controls);
    Ok(Installed {
        _reporter: reporter,
        _socket: socket,
    })
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
