//! Sends a file to a receiver over many connections:
//! `send_file HOST PORT FILE [THREADS]`, the stream named after the file.
//! Exits 0 only once the receiver has written every byte.

use std::io::Write;
use std::process::ExitCode;
use viamillipede::Sender;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [host, port, path, rest @ ..] = args.as_slice() else {
        eprintln!("usage: send_file HOST PORT FILE [THREADS]");
        return ExitCode::from(2);
    };
    match send(host, port, path, rest.first()) {
        Ok(bytes) => {
            eprintln!("sent {bytes} bytes");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("send_file: {e}");
            ExitCode::FAILURE
        }
    }
}

fn send(
    host: &str,
    port: &str,
    path: &str,
    threads: Option<&String>,
) -> Result<u64, Box<dyn std::error::Error>> {
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let threads: u16 = threads.map_or(Ok(8), |t| t.parse())?;
    let mut file = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    let mut builder = Sender::builder().destination(host, port).threads(threads);
    let base = std::path::Path::new(path)
        .file_name()
        .and_then(|n| n.to_str());
    if let Some(name) = base.filter(|n| viamillipede::protocol::check_name(n).is_ok()) {
        builder = builder.name(name);
    }
    let mut sender = builder.connect()?;
    std::io::copy(&mut file, &mut sender)?;
    sender.flush()?;
    Ok(sender.finish()?.bytes)
}
