//! Watching a transfer while it runs: the `--progress` display and the
//! one-second throughput series kept for `--stats-json`.
//!
//! One thread samples a byte counter on a timer. On a terminal the progress
//! line is redrawn in place (indicatif); elsewhere a plain line is printed
//! every few seconds, so logs stay readable. Nothing goes to stdout.

use crate::stats::{human_bytes, rate};
use crossbeam_channel::{RecvTimeoutError, Sender};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(250);
const TICKS_PER_SAMPLE: u32 = 4;
/// Ticks between progress lines when stderr is not a terminal (2 s).
const PLAIN_EVERY: u32 = 8;

/// What to show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Display {
    /// Show progress on stderr.
    pub progress: bool,
    /// The expected total, for percent and ETA.
    pub size: Option<u64>,
}

/// A running monitor; stop it with [`Monitor::finish`].
pub struct Monitor {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    series: Arc<Mutex<Vec<u64>>>,
}

impl Monitor {
    /// Starts watching `count()` (bytes moved so far, and bytes on their
    /// way: read by tx and not yet written by rx), labelled `what`
    /// ("delivered", "written"), if anyone will look: `display.progress`,
    /// or `series` for the stats document. Otherwise no thread runs.
    pub fn start(
        count: impl Fn() -> (u64, u64) + Send + 'static,
        display: Display,
        series: bool,
        what: &'static str,
    ) -> Monitor {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let series_kept = Arc::new(Mutex::new(Vec::new()));
        if !display.progress && !series {
            return Monitor {
                stop: None,
                thread: None,
                series: series_kept,
            };
        }
        let series = series_kept;
        let samples = Arc::clone(&series);
        let thread = std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || {
                let start = Instant::now();
                let mut shown = Shown::new(display, what);
                let (mut ticks, mut last) = (0u32, 0u64);
                loop {
                    let done =
                        !matches!(stopped.recv_timeout(TICK), Err(RecvTimeoutError::Timeout));
                    let (bytes, on_the_way) = count();
                    ticks += 1;
                    // The last, partial second counts too.
                    if ticks % TICKS_PER_SAMPLE == 0 || (done && bytes > last) {
                        samples
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(bytes - last);
                        last = bytes;
                    }
                    shown.update(bytes, on_the_way, start.elapsed(), ticks, done);
                    if done {
                        break;
                    }
                }
            })
            .ok();
        Monitor {
            stop: Some(stop),
            thread,
            series,
        }
    }

    /// The throughput series so far (kept only if asked for at the start).
    pub fn series(&self) -> Arc<Mutex<Vec<u64>>> {
        Arc::clone(&self.series)
    }

    /// Stops the monitor (drawing a last progress line) and returns the
    /// bytes moved in each second (the last may be partial).
    pub fn finish(mut self) -> Vec<u64> {
        self.stop_thread();
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn stop_thread(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The progress display, if any.
enum Shown {
    None,
    Bar(ProgressBar),
    Plain {
        size: Option<u64>,
        what: &'static str,
    },
}

impl Shown {
    fn new(display: Display, what: &'static str) -> Shown {
        if !display.progress {
            return Shown::None;
        }
        if !std::io::stderr().is_terminal() {
            return Shown::Plain {
                size: display.size,
                what,
            };
        }
        let (bar, template) = match display.size {
            Some(total) => (
                ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
                "{prefix} {bytes}/{total_bytes} {percent:>3}% [{wide_bar}] {binary_bytes_per_sec} {elapsed_precise} ETA {eta} {msg}",
            ),
            None => (
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
                "{prefix} {bytes} {binary_bytes_per_sec} {elapsed_precise} {spinner} {msg}",
            ),
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_prefix(what);
        Shown::Bar(bar)
    }

    fn update(&mut self, bytes: u64, on_the_way: u64, elapsed: Duration, ticks: u32, done: bool) {
        match self {
            Shown::None => {}
            Shown::Bar(bar) => {
                bar.set_position(bytes);
                bar.set_message(match on_the_way {
                    0 => String::new(),
                    n => format!("(+{} on the way)", human_bytes(n)),
                });
                if done {
                    bar.finish();
                }
            }
            Shown::Plain { size, what } => {
                if done || ticks % PLAIN_EVERY == 0 {
                    let mut line = plain_line(what, bytes, elapsed, *size);
                    if on_the_way > 0 {
                        line += &format!("; {} more on the way", human_bytes(on_the_way));
                    }
                    let _ = writeln!(std::io::stderr(), "viamillipede: {line}");
                }
            }
        }
    }
}

/// "sent 1.2 GiB in 10 s, 120 MiB/s (1006.6 Mbit/s), 45%, ETA 12 s".
fn plain_line(what: &str, bytes: u64, elapsed: Duration, size: Option<u64>) -> String {
    let mut line = format!(
        "{what} {} in {:.0} s, {}",
        human_bytes(bytes),
        elapsed.as_secs_f64(),
        rate(bytes, elapsed)
    );
    if let Some(total) = size.filter(|&t| t > 0) {
        let percent = bytes as f64 * 100.0 / total as f64;
        line += &format!(", {percent:.0}%");
        let per_sec = bytes as f64 / elapsed.as_secs_f64().max(1e-9);
        if bytes < total && per_sec > 0.0 {
            line += &format!(", ETA {:.0} s", (total - bytes) as f64 / per_sec);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    #[test]
    fn plain_lines_show_percent_and_eta_with_a_size() {
        let l = plain_line("sent", 50 << 20, Duration::from_secs(10), Some(100 << 20));
        assert!(l.starts_with("sent 50.0 MiB in 10 s, 5.0 MiB/s"), "{l}");
        assert!(l.contains("50%") && l.contains("ETA 10 s"), "{l}");
        let l = plain_line("written", 1, Duration::from_secs(1), None);
        assert!(!l.contains('%'), "{l}");
    }

    #[test]
    fn the_series_counts_bytes_per_second() {
        let counter = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&counter);
        let m = Monitor::start(
            move || (c.load(Relaxed), 0),
            Display::default(),
            true,
            "sent",
        );
        counter.store(1000, Relaxed);
        let series = m.finish();
        // Stopped at once: a partial first second, with every byte counted.
        assert_eq!(series.iter().sum::<u64>(), 1000);
    }
}
