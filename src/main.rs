//! The `viamillipede` command: parse, set up logging, run, map the outcome
//! to an exit code.

use std::io::Write;
use std::process::ExitCode;
use viamillipede::cli::{self, Parsed, USAGE_HINT};
use viamillipede::config::Config;
use viamillipede::error::Error;
use viamillipede::stats::{human_bytes, rate};
use viamillipede::Summary;

mod signals;
mod ssh;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("ssh") => return ssh::main(&args[2..]),
        Some(ssh::SERVE) => return ssh::serve_main(&args[2..]),
        Some("ctl") => return ctl(&args[2..]),
        Some("relay") => return relay(&args),
        _ => {}
    }
    let mut config = match cli::parse(args) {
        Ok(Parsed::Run(c)) => c,
        Ok(Parsed::Print(text)) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&e),
    };
    init_logging(config.log_level(), "viamillipede");
    for w in config
        .warnings
        .iter()
        .cloned()
        .chain(cli::ignored_warning(&config.ignored))
    {
        log::warn!("{w}");
    }
    let result = signals::install(&mut config).and_then(|_installed| viamillipede::run(&config));
    finish(&config, result)
}

/// Writes the stats document if asked for, and turns the outcome into the
/// summary line and the exit status.
fn finish(config: &Config, result: viamillipede::error::Result<Summary>) -> ExitCode {
    if let Some(path) = &config.stats_json {
        let (code, error) = match &result {
            Ok(_) => (0, None),
            Err(e) => (e.exit_code(), Some(e.to_string())),
        };
        let sides = config
            .controls
            .as_ref()
            .map(|c| c.ended())
            .unwrap_or_default();
        if let Err(e) = viamillipede::report::write(path, &sides, code, error) {
            log::error!("write {}: {e}", path.display());
        }
    }
    match result {
        Ok(summary) => {
            log::info!(
                "done: {} in {:.2} s, {}; {}",
                human_bytes(summary.bytes),
                summary.elapsed.as_secs_f64(),
                rate(summary.bytes, summary.elapsed),
                summary.detail
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

const RELAY_HELP: &str = "\
Usage: viamillipede relay PORT [OPTIONS] tx HOST PORT [tx HOST PORT ...] [OPTIONS]

Takes a sender's connections on PORT and carries each one on to the next
hop (a receiver, or another relay), frame by frame, without putting feet in
order: a foot is acknowledged to the sender only once the next hop has it,
and the sender exits 0 only once the last receiver wrote every byte.

Options before the first tx are the listening side's, as rx takes them
(--key-file of the hop from the sender, --bind, --control, verbose N);
options after it are the next hop's, as tx takes them (--key-file,
--encrypt, checksums, threads N: the connections each destination takes
before the next one, in rank order, gets more). Each hop has its own key.

  viamillipede relay 8834 --key-file outer.key tx inner.example 8834 --key-file inner.key
  viamillipede tx bastion 8834 --key-file outer.key tx bastion2 8834 --key-file outer.key

Runs until SIGINT or SIGTERM (or ctl PATH stop), then exits 130 or 143.
";

const CTL_HELP: &str = "\
Usage: viamillipede ctl PATH COMMAND

Talks to a running viamillipede started with --control PATH.

Commands:
  status                          the live status as JSON; exit 0 when
                                  healthy, 1 when degraded
  add HOST PORT [threads N] [rank R]
                                  a new destination joins the stream (rank 1
                                  is the most preferred; last if not given)
  drain HOST PORT                 no new feet to it; its connections close
                                  once their feet are acknowledged
  undrain HOST PORT               it takes feet again
  threads HOST PORT N             its connections, 1 to 64
  rate RATE|none                  the sender's rate limit (10M: 10 MiB/s)
  stop                            stop cleanly, as SIGINT does

add, drain, undrain, threads and rate are the sender's. Exit status: 0 done
(status: healthy), 1 refused or degraded (the reason on stderr), 2 for a
bad command line or a socket that does not answer.
";

/// `viamillipede relay PORT ... tx HOST PORT ...`: the two sides' words
/// parsed as rx's and tx's, then relayed until stopped.
fn relay(args: &[std::ffi::OsString]) -> ExitCode {
    let words = &args[2..];
    if words.is_empty() || words.iter().any(|a| a == "--help" || a == "-h") {
        let _ = std::io::stdout().write_all(RELAY_HELP.as_bytes());
        return ExitCode::from(if words.is_empty() { 2 } else { 0 });
    }
    let Some(at) = words.iter().position(|w| w == "tx") else {
        return fail(&Error::Usage(
            "relay: give the next hop: relay PORT tx HOST PORT".into(),
        ));
    };
    let side = |mode: &str, words: &[std::ffi::OsString]| -> Result<Config, Error> {
        let mut argv = vec![args[0].clone(), mode.into()];
        argv.extend_from_slice(words);
        match cli::parse(argv)? {
            Parsed::Run(c) => Ok(*c),
            Parsed::Print(_) => Err(Error::Usage(format!(
                "relay: the {mode} side asks to print something: see viamillipede relay --help"
            ))),
        }
    };
    let (mut up, down) = match (side("rx", &words[..at]), side("tx", &words[at + 1..])) {
        (Ok(up), Ok(down)) => (up, down),
        (Err(e), _) | (_, Err(e)) => return fail(&e),
    };
    init_logging(up.log_level().max(down.log_level()), "viamillipede");
    for w in up
        .warnings
        .iter()
        .chain(&down.warnings)
        .cloned()
        .chain(cli::ignored_warning(&up.ignored))
        .chain(cli::ignored_warning(&down.ignored))
    {
        log::warn!("{w}");
    }
    let result = signals::install(&mut up).and_then(|_installed| {
        let relay = std::sync::Arc::new(viamillipede::relay::Relay::new(up, down)?);
        relay.run()
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// `viamillipede ctl PATH COMMAND...`: one request to a control socket.
fn ctl(args: &[std::ffi::OsString]) -> ExitCode {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        let _ = std::io::stdout().write_all(CTL_HELP.as_bytes());
        return ExitCode::from(if args.is_empty() { 2 } else { 0 });
    }
    let (path, words) = (std::path::Path::new(&args[0]), &args[1..]);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    // Found out here, before anything is sent.
    if let Err(e) = viamillipede::control::Command::parse(&words) {
        eprintln!("viamillipede ctl: {e}");
        return ExitCode::from(2);
    }
    let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    let answer =
        match viamillipede::control::request(path, &words, std::time::Duration::from_secs(10)) {
            Ok(a) => a,
            Err(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        " (is a viamillipede with --control at that path running?)"
                    }
                    _ => "",
                };
                eprintln!("viamillipede ctl: {}: {e}{hint}", path.display());
                return ExitCode::from(2);
            }
        };
    let message = answer["message"].as_str().unwrap_or("");
    if answer["ok"] != true {
        eprintln!("viamillipede ctl: {message}");
        return ExitCode::FAILURE;
    }
    if let Some(status) = answer.get("status") {
        let text = serde_json::to_string_pretty(status).unwrap_or_default();
        let _ = writeln!(std::io::stdout(), "{text}");
        return match answer["healthy"] == true {
            true => ExitCode::SUCCESS,
            false => ExitCode::FAILURE,
        };
    }
    let _ = writeln!(std::io::stdout(), "{message}");
    ExitCode::SUCCESS
}

fn fail(e: &Error) -> ExitCode {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "viamillipede: {e}");
    if let Error::Usage(_) = e {
        let _ = writeln!(err, "{USAGE_HINT}");
    }
    ExitCode::from(e.exit_code())
}

/// `verbose N` sets the level unless RUST_LOG says otherwise. The logger
/// itself lets everything through, and the level is the global maximum, so
/// SIGUSR2 can raise it while running.
fn init_logging(level: log::LevelFilter, name: &'static str) {
    let mut builder = env_logger::Builder::new();
    let spec = std::env::var("RUST_LOG").ok();
    builder.filter_level(log::LevelFilter::Trace);
    if let Some(spec) = &spec {
        builder.parse_filters(spec);
    }
    builder.format(move |buf, record| {
        writeln!(
            buf,
            "{name}: {}: {}",
            record.level().as_str().to_lowercase(),
            record.args()
        )
    });
    builder.init();
    if spec.is_none() {
        log::set_max_level(level);
    }
}
