//! Soak: a long transfer through a proxy that resets connections at random,
//! checked byte for byte, with both sides' memory sampled every second.
//!
//! `cargo bench --bench soak` (default 20 GiB; `SOAK_GIB` to change,
//! `SOAK_RESET_MIB` for the mean traffic between resets, default 100).
//! The data is generated, not stored: a thread feeds tx from a seeded
//! generator and another compares rx's output with the same generator, so
//! the run needs no disk. Prints and writes `target/bench/soak.md`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: usize = 1 << 20;

/// The same seeded stream on both ends.
struct Generator(u64);

impl Generator {
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            c.copy_from_slice(&self.0.to_le_bytes()[..c.len()]);
        }
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Forwards connections to `upstream`, resetting each after a random
/// amount of traffic with the given mean.
fn proxy(upstream: u16, mean: u64, resets: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for client in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let Ok(mut client) = client else { continue };
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let budget = seed % (2 * mean) + 1;
            let resets = Arc::clone(&resets);
            std::thread::spawn(move || {
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let back = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(Shutdown::Write);
                });
                let mut buf = vec![0u8; 256 << 10];
                let mut sent = 0u64;
                loop {
                    let n = match client.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = server.shutdown(Shutdown::Write);
                            break;
                        }
                        Ok(n) => n,
                    };
                    if sent + n as u64 >= budget {
                        let cut = (budget - sent) as usize;
                        let _ = server.write_all(&buf[..cut]);
                        resets.fetch_add(1, Ordering::Relaxed);
                        for s in [&client, &server] {
                            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                            let _ = s.shutdown(Shutdown::Read);
                        }
                        break;
                    }
                    if server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                }
                let _ = back.join();
            });
        }
    });
    port
}

fn main() {
    let gib = env_num("SOAK_GIB", 20);
    let mean = env_num("SOAK_RESET_MIB", 100) << 20;
    let total = gib << 30;
    let vm = env!("CARGO_BIN_EXE_viamillipede");

    let mut rx = Command::new(vm)
        .args(["rx", "127.0.0.1:0", "--reconnect-timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rx");
    let mut rx_err = BufReader::new(rx.stderr.take().unwrap()).lines();
    let line = rx_err
        .find_map(|l| l.ok().filter(|l| l.contains("listening on")))
        .expect("rx port");
    let port: u16 = line.rsplit(':').next().unwrap().trim().parse().unwrap();
    std::thread::spawn(move || rx_err.for_each(drop));

    let resets = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let pport = proxy(port, mean, Arc::clone(&resets), Arc::clone(&stop));
    let mut tx = Command::new(vm)
        .args([
            "tx",
            "127.0.0.1",
            &pport.to_string(),
            "threads",
            "4",
            "verbose",
            "1",
            "--reconnect-timeout",
            "60",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tx");
    let tx_err = tx.stderr.take().unwrap();
    let tx_log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(tx_err).read_to_string(&mut s);
        s
    });

    let mut stdin = tx.stdin.take().unwrap();
    std::thread::spawn(move || {
        let mut g = Generator(42);
        let mut buf = vec![0u8; CHUNK];
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            g.fill(&mut buf[..n]);
            if stdin.write_all(&buf[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
    });
    let verified = Arc::new(AtomicU64::new(0));
    let mut stdout = rx.stdout.take().unwrap();
    let checker = {
        let verified = Arc::clone(&verified);
        std::thread::spawn(move || {
            let mut g = Generator(42);
            let (mut want, mut got) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
            loop {
                let mut n = 0;
                while n < CHUNK {
                    match stdout.read(&mut got[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) => panic!("read rx output: {e}"),
                    }
                }
                if n == 0 {
                    return true;
                }
                g.fill(&mut want[..n]);
                if got[..n] != want[..n] {
                    let at = verified.load(Ordering::Relaxed);
                    eprintln!("output differs in the MiB at offset {at}");
                    return false;
                }
                verified.fetch_add(n as u64, Ordering::Relaxed);
                if n < CHUNK {
                    return true;
                }
            }
        })
    };

    // Sample memory each second; keep the peak of each tenth of the run.
    let (tx_pid, rx_pid) = (tx.id(), rx.id());
    let start = Instant::now();
    let mut peaks = vec![(0u64, 0u64); 10];
    let (mut tx_peak, mut rx_peak) = (0, 0);
    while !checker.is_finished() {
        std::thread::sleep(Duration::from_secs(1));
        let (t, r) = (rss_kib(tx_pid), rss_kib(rx_pid));
        let done = verified.load(Ordering::Relaxed);
        let tenth = ((done * 10) / total.max(1)).min(9) as usize;
        peaks[tenth].0 = peaks[tenth].0.max(t);
        peaks[tenth].1 = peaks[tenth].1.max(r);
        tx_peak = tx_peak.max(t);
        rx_peak = rx_peak.max(r);
        eprint!(
            "\r{:.1} / {gib} GiB verified, {} resets   ",
            done as f64 / (1u64 << 30) as f64,
            resets.load(Ordering::Relaxed)
        );
    }
    eprintln!();
    let exact = checker.join().expect("checker");
    let secs = start.elapsed().as_secs_f64();
    let (tx_status, rx_status) = (tx.wait().unwrap(), rx.wait().unwrap());
    stop.store(true, Ordering::Relaxed);
    let log = tx_log.join().unwrap();
    let summary = log
        .lines()
        .find(|l| l.contains("done:"))
        .unwrap_or("(no summary)")
        .to_string();
    let bytes = verified.load(Ordering::Relaxed);

    let mut md = format!(
        "### soak: {gib} GiB through a proxy resetting a connection every ~{} MiB\n\n",
        mean >> 20
    );
    md += &format!(
        "- byte-exact: {}, {} bytes verified of {total}\n",
        exact && bytes == total,
        bytes
    );
    md += &format!("- exit status: tx {tx_status}, rx {rx_status}\n");
    md += &format!(
        "- {} connections reset; {:.0} s, {:.0} MiB/s\n",
        resets.load(Ordering::Relaxed),
        secs,
        bytes as f64 / secs / (1 << 20) as f64
    );
    md += &format!("- tx: {summary}\n");
    md += &format!(
        "- peak RSS: tx {} MiB, rx {} MiB\n\n",
        tx_peak / 1024,
        rx_peak / 1024
    );
    md += "| tenth of the run | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 | 10 |\n|---|";
    md += &"---:|".repeat(10);
    md += "\n| tx peak RSS MiB |";
    for (t, _) in &peaks {
        md += &format!(" {} |", t / 1024);
    }
    md += "\n| rx peak RSS MiB |";
    for (_, r) in &peaks {
        md += &format!(" {} |", r / 1024);
    }
    md += "\n";
    println!("{md}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("soak.md"), &md);
    if !(exact && bytes == total && tx_status.success() && rx_status.success()) {
        std::process::exit(1);
    }
}
