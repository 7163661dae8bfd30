//! Receives streams into files: `receive_files PORT DIR COUNT`. Prints the
//! port it listens on (useful with port 0) on stdout, then takes COUNT
//! streams, each into DIR/NAME (the name its sender gave, slashes made
//! underscores; the session's start without one), all at once, and exits
//! 0 once every one of them is whole in its file.

use std::io::Write;
use std::process::ExitCode;
use viamillipede::{Flow, Receiver};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, dir, count] = args.as_slice() else {
        eprintln!("usage: receive_files PORT DIR COUNT");
        return ExitCode::from(2);
    };
    match receive(port, dir, count) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("receive_files: {e}");
            ExitCode::FAILURE
        }
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn receive(port: &str, dir: &str, count: &str) -> Result<(), Failure> {
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let count: usize = count.parse().map_err(|_| format!("bad count {count:?}"))?;
    let mut receiver = Receiver::builder().port(port).bind()?;
    println!("{}", receiver.local_addr().port());
    std::io::stdout().flush()?;
    let mut writers = Vec::new();
    for n in 0..count {
        let flow = receiver.accept()?;
        let name = match flow.name() {
            Some(name) => name.replace('/', "_"),
            None => format!("flow-{n}"),
        };
        let path = std::path::Path::new(dir).join(&name);
        writers.push(std::thread::spawn(move || into_file(flow, &path)));
    }
    for w in writers {
        let (path, bytes) = w.join().map_err(|_| "a writer panicked")??;
        eprintln!("received {bytes} bytes into {}", path.display());
    }
    Ok(())
}

fn into_file(mut flow: Flow, path: &std::path::Path) -> Result<(std::path::PathBuf, u64), Failure> {
    let mut file =
        std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    // The copy fails, rather than ends, if the stream did not arrive whole.
    let bytes = std::io::copy(&mut flow, &mut file)?;
    file.sync_all()?;
    Ok((path.to_path_buf(), bytes))
}
