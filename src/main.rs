//! The `viamillipede` command: parse, set up logging, run, map the outcome
//! to an exit code.

use std::io::Write;
use std::process::ExitCode;
use viamillipede::cli::{self, Parsed, USAGE_HINT};
use viamillipede::config::Config;
use viamillipede::error::Error;
use viamillipede::stats::{human_bytes, rate};
use viamillipede::Summary;

mod ssh;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("ssh") => return ssh::main(&args[2..]),
        Some(ssh::SERVE) => return ssh::serve_main(&args[2..]),
        _ => {}
    }
    let config = match cli::parse(args) {
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
    let result = viamillipede::run(&config);
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
        if let Err(e) = viamillipede::report::write(path, code, error) {
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
