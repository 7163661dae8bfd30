//! TCP tunnels over a two-way pipe: `terminate PORT` on one end,
//! `initiate HOST PORT` on the other.

use crate::util::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn free_port() -> String {
    let l = TcpListener::bind("[::]:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

/// The two ends of a tunnel to `service`; returns them and the port the
/// terminating end accepts the tunnel's client on.
fn tunnel_to(service: u16) -> (Proc, Proc, u16) {
    let (pa, pb) = (free_port(), free_port());
    let service = service.to_string();
    let (far, _) = Proc::spawn(
        "initiate",
        &[
            "rx",
            &pb,
            "tx",
            "127.0.0.1",
            &pa,
            "initiate",
            "127.0.0.1",
            &service,
            "verbose",
            "1",
        ],
        Out::Collect,
    );
    let (near, _) = Proc::spawn(
        "terminate",
        &[
            "rx",
            &pa,
            "tx",
            "127.0.0.1",
            &pb,
            "terminate",
            "0",
            "verbose",
            "1",
        ],
        Out::Collect,
    );
    let line = near.wait_line("tunnel listening on", Duration::from_secs(10));
    let port = line.rsplit(':').next().unwrap().trim().parse().unwrap();
    (near, far, port)
}

/// A child killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_http_download_crosses_the_tunnel_exactly() {
    let dir = std::env::temp_dir().join(format!("viamillipede-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body = data(50 << 20, 21);
    std::fs::write(dir.join("file"), &body).unwrap();
    let http = free_port();
    let mut server = Server(
        Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                &http,
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server"),
    );
    let mut ready = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.contains("Serving HTTP"), "{ready:?}");

    let (mut near, mut far, port) = tunnel_to(http.parse().unwrap());
    let out = dir.join("out");
    let curl = Command::new("curl")
        .args(["-s", "-f", "--max-time", "60", "-o"])
        .arg(&out)
        .arg(format!("http://127.0.0.1:{port}/file"))
        .status()
        .expect("curl");
    assert!(
        curl.success(),
        "curl: {curl}\n{}\n{}",
        near.stderr(),
        far.stderr()
    );
    assert_same(&std::fs::read(&out).unwrap(), &body, "through the tunnel");
    assert!(near.wait(DEADLINE).success(), "{}", near.stderr());
    assert!(far.wait(DEADLINE).success(), "{}", far.stderr());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_interactive_exchange_and_half_close_pass_through() {
    // A line server that answers each line in capitals and, when the client
    // half-closes, says goodbye and closes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let service = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { break };
            let _ = w.write_all(format!("{}\n", line.to_uppercase()).as_bytes());
        }
        let _ = w.write_all(b"goodbye\n");
    });
    let (mut near, mut far, port) = tunnel_to(service);
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut w = client.try_clone().unwrap();
    for word in ["hello", "millipede"] {
        w.write_all(format!("{word}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        reader
            .read_line(&mut answer)
            .expect("an answer through the tunnel");
        assert_eq!(answer, format!("{}\n", word.to_uppercase()));
    }
    client.shutdown(Shutdown::Write).unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "goodbye\n", "the half-close did not pass through");
    drop(client);
    assert!(near.wait(DEADLINE).success(), "{}", near.stderr());
    assert!(far.wait(DEADLINE).success(), "{}", far.stderr());
}
