//! Receives one stream into a file: `receive_file PORT FILE`. Prints the
//! port it listens on (useful with port 0) on stdout, then exits 0 once the
//! whole stream is in the file.

use std::io::Write;
use std::process::ExitCode;
use viamillipede::Receiver;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, path] = args.as_slice() else {
        eprintln!("usage: receive_file PORT FILE");
        return ExitCode::from(2);
    };
    match receive(port, path) {
        Ok(bytes) => {
            eprintln!("received {bytes} bytes");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("receive_file: {e}");
            ExitCode::FAILURE
        }
    }
}

fn receive(port: &str, path: &str) -> Result<u64, Box<dyn std::error::Error>> {
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let mut receiver = Receiver::builder().port(port).bind()?;
    println!("{}", receiver.local_addr().port());
    std::io::stdout().flush()?;
    let mut flow = receiver.accept()?;
    let mut file = std::fs::File::create(path).map_err(|e| format!("create {path}: {e}"))?;
    // The copy fails, rather than ends, if the stream did not arrive whole.
    let bytes = std::io::copy(&mut flow, &mut file)?;
    file.sync_all()?;
    Ok(bytes)
}
