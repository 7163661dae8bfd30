//! Whole-program transfer benchmark: viamillipede side by side with the
//! tools people use instead, in one run, so ratios hold on a noisy machine.
//!
//! `cargo bench --bench transfer -- loopback` moves 1 GiB of random data
//! over loopback with nc, mbuffer, socat and viamillipede (threads 1, 4, 16),
//! interleaving the tools round by round (in an order rotated each round)
//! and reporting medians. Every transfer is checked byte-exact (sha256)
//! outside the timed region. CPU time and peak RSS come from GNU time
//! around each process. Receivers write
//! to /dev/shm where it exists, so disk writeback does not add noise. The
//! table is printed and written to `target/bench/transfer.md`.
//!
//! Environment: `BENCH_SIZE_MIB` (default 1024), `BENCH_ROUNDS` (default 5).

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod emulator;
mod wan;

/// The peers a scenario needs, with the Debian package that has them.
const PEERS: &[(&str, &str)] = &[
    ("nc", "netcat-openbsd"),
    ("mbuffer", "mbuffer"),
    ("socat", "socat"),
    ("/usr/bin/time", "time"),
    ("sha256sum", "coreutils"),
];

fn main() {
    let scenarios: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if scenarios.first().map(String::as_str) == Some("shell") {
        wan::shell(&scenarios[1..]);
        return;
    }
    let scenarios = if scenarios.is_empty() {
        vec!["loopback".to_string()]
    } else {
        scenarios
    };
    let mut report = String::new();
    for s in &scenarios {
        match s.as_str() {
            "loopback" => report.push_str(&loopback()),
            "wan" => report.push_str(&wan::wan()),
            "validate" => report.push_str(&wan::validation()),
            "multipath" => report.push_str(&wan::multipath()),
            "slow" => report.push_str(&wan::slow()),
            "longhaul" => report.push_str(&wan::longhaul()),
            "fairness" => report.push_str(&wan::fair()),
            "all" => {
                report.push_str(&loopback());
                report.push_str(&wan::wan());
                report.push_str(&wan::slow());
                report.push_str(&wan::multipath());
                report.push_str(&wan::longhaul());
            }
            other => {
                eprintln!(
                    "unknown scenario {other:?}; known: loopback, wan, slow, multipath, longhaul, fairness, all, validate"
                );
                std::process::exit(2);
            }
        }
    }
    let dir = bench_dir();
    fs::write(dir.join("transfer.md"), &report).expect("write transfer.md");
    println!("{report}");
    println!("(written to {})", dir.join("transfer.md").display());
}

fn bench_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("bench");
    fs::create_dir_all(&dir).expect("create target/bench");
    dir
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Stops with the apt command for whatever of `peers` is missing.
fn require(peers: &[(&str, &str)]) {
    let missing: Vec<&str> = peers
        .iter()
        .filter(|(cmd, _)| {
            !Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {cmd}"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "missing benchmark peers; install them with:\n  apt-get install -y {}",
            missing.join(" ")
        );
        std::process::exit(1);
    }
}

/// A random input file, made once and kept.
fn input(dir: &Path, mib: u64) -> PathBuf {
    let path = dir.join(format!("random-{mib}m.bin"));
    if fs::metadata(&path)
        .map(|m| m.len() == mib << 20)
        .unwrap_or(false)
    {
        return path;
    }
    let mut f = std::io::BufWriter::new(fs::File::create(&path).expect("create input"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).expect("write input");
    }
    f.flush().expect("flush input");
    path
}

/// A key file for the encrypted runs (mode 600, so no warning).
fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("bench.key");
    // A fixed key (not a secret): 64 hex digits, as --genkey writes them.
    fs::write(
        &path,
        b"0f1e2d3c4b5a69788796a5b4c3d2e1f000112233445566778899aabbccddeeff\n",
    )
    .expect("write key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod key");
    }
    path
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// What GNU time says of one process: user+system seconds, peak RSS in KiB.
fn read_time(path: &Path) -> (f64, u64) {
    let text = fs::read_to_string(path).unwrap_or_default();
    let last = text.lines().last().unwrap_or("");
    let f: Vec<&str> = last.split_whitespace().collect();
    if f.len() < 3 {
        panic!("unexpected GNU time output in {}: {text:?}", path.display());
    }
    (
        f[0].parse::<f64>().unwrap_or(0.0) + f[1].parse::<f64>().unwrap_or(0.0),
        f[2].parse().unwrap_or(0),
    )
}

/// `shell` under GNU time, inside network namespace `ns` if given.
fn timed(ns: Option<&str>, time_file: &Path, shell: &str) -> Command {
    let mut c = match ns {
        Some(ns) => emulator::Wan::exec(ns, "/usr/bin/time"),
        None => Command::new("/usr/bin/time"),
    };
    c.arg("-f")
        .arg("%U %S %M")
        .arg("-o")
        .arg(time_file)
        .arg("sh")
        .arg("-c")
        .arg(format!("exec {shell}"));
    c
}

/// A free TCP port (the tool then binds it; the race is harmless here).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether something listens on `port` in process `pid`'s network namespace
/// (read from /proc, without connecting, which would confuse one-shot
/// listeners like nc).
fn listening(pid: u32, port: u16) -> bool {
    let needle = format!(":{port:04X} ");
    ["tcp", "tcp6"].iter().any(|p| {
        let table = fs::read_to_string(format!("/proc/{pid}/net/{p}"));
        table.unwrap_or_default().lines().any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| format!("{a} ").ends_with(&needle))
                && l.split_whitespace().nth(3) == Some("0A")
        })
    })
}

struct Run {
    wall: f64,
    cpu: f64,
    rss_tx: u64,
    rss_rx: u64,
}

/// One tool: how to start its receiver (writing `out`) and its sender
/// (reading `inp`) on `port`.
/// Builds a shell command from a port and a file.
type CommandLine = Box<dyn Fn(u16, &Path) -> String>;

struct Tool {
    name: String,
    rx: CommandLine,
    tx: CommandLine,
    reports_port: bool,
}

/// Waits for a child in a thread of its own, so the wall clock stops the
/// moment it exits; kills it at the deadline.
fn waiter(
    mut c: Child,
    what: String,
) -> crossbeam_channel::Receiver<(String, std::process::ExitStatus)> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let s = c.wait().expect("wait");
        let _ = tx.send((what, s));
    });
    rx
}

fn wait_all(
    waiters: &[crossbeam_channel::Receiver<(String, std::process::ExitStatus)>],
    deadline: Instant,
) {
    for w in waiters {
        match w.recv_deadline(deadline) {
            Ok((what, s)) => assert!(s.success(), "{what} failed: {s}"),
            Err(_) => panic!("a transfer did not finish before its deadline"),
        }
    }
}

/// Where the two ends run: namespaces (or none, for loopback) and the port.
#[derive(Clone, Copy)]
struct Place<'a> {
    rx_ns: Option<&'a str>,
    tx_ns: Option<&'a str>,
    port: Option<u16>,
}

const LOOPBACK: Place<'static> = Place {
    rx_ns: None,
    tx_ns: None,
    port: None,
};

fn run_tool(tool: &Tool, inp: &Path, out: &Path, dir: &Path, place: Place) -> Run {
    let (rx_time, tx_time) = (dir.join("rx.time"), dir.join("tx.time"));
    let mut port = place.port.unwrap_or_else(free_port);
    let mut rx_cmd = timed(place.rx_ns, &rx_time, &(tool.rx)(port, out));
    rx_cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    let mut rx = rx_cmd.spawn().expect("spawn receiver");
    if tool.reports_port {
        let mut lines = BufReader::new(rx.stderr.take().unwrap()).lines();
        let line = lines
            .find_map(|l| l.ok().filter(|l| l.contains("listening on")))
            .expect("no port reported");
        port = line
            .rsplit(':')
            .next()
            .unwrap()
            .trim()
            .parse()
            .expect("port");
        std::thread::spawn(move || lines.for_each(drop));
    } else {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(rx.id(), port) {
            assert!(
                Instant::now() < deadline,
                "{} receiver never listened",
                tool.name
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let start = Instant::now();
    let tx = timed(place.tx_ns, &tx_time, &(tool.tx)(port, inp))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sender");
    let waiters = [
        waiter(tx, format!("{} sender", tool.name)),
        waiter(rx, format!("{} receiver", tool.name)),
    ];
    wait_all(&waiters, start + Duration::from_secs(600));
    let wall = start.elapsed().as_secs_f64();
    let ((cpu_tx, rss_tx), (cpu_rx, rss_rx)) = (read_time(&tx_time), read_time(&rx_time));
    Run {
        wall,
        cpu: cpu_tx + cpu_rx,
        rss_tx,
        rss_rx,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn loopback() -> String {
    require(PEERS);
    let dir = bench_dir();
    let mib = env_num("BENCH_SIZE_MIB", 1024);
    let rounds = env_num("BENCH_ROUNDS", 5) as usize;
    let inp = input(&dir, mib);
    let want = sha256(&inp);
    // Output goes to memory (tmpfs) where there is one: a disk's writeback of
    // the previous run's gigabyte would otherwise dominate the timings.
    let shm = Path::new("/dev/shm");
    let out = if shm.is_dir() {
        shm.join("viamillipede-bench-out.bin")
    } else {
        dir.join("out.bin")
    };
    let vm = env!("CARGO_BIN_EXE_viamillipede");
    let q = |p: &Path| p.display().to_string();

    let mut tools: Vec<Tool> = vec![
        Tool {
            name: "nc".into(),
            rx: Box::new(move |port, out| format!("nc -l 127.0.0.1 {port} > {}", q(out))),
            tx: Box::new(move |port, inp| format!("nc -N 127.0.0.1 {port} < {}", q(inp))),
            reports_port: false,
        },
        Tool {
            name: "mbuffer -m 64M".into(),
            rx: Box::new(move |port, out| {
                format!("mbuffer -q -m 64M -I 127.0.0.1:{port} -o {}", q(out))
            }),
            tx: Box::new(move |port, inp| {
                format!("mbuffer -q -m 64M -i {} -O 127.0.0.1:{port}", q(inp))
            }),
            reports_port: false,
        },
        Tool {
            name: "socat".into(),
            rx: Box::new(move |port, out| {
                format!(
                    "socat -u TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr CREATE:{}",
                    q(out)
                )
            }),
            tx: Box::new(move |port, inp| format!("socat -u OPEN:{} TCP:127.0.0.1:{port}", q(inp))),
            reports_port: false,
        },
    ];
    for threads in [1, 4, 16] {
        tools.push(Tool {
            name: format!("viamillipede threads {threads}"),
            rx: Box::new(move |_, out| format!("{vm} rx 127.0.0.1:0 > {}", q(out))),
            tx: Box::new(move |port, inp| {
                format!("{vm} tx 127.0.0.1 {port} threads {threads} < {}", q(inp))
            }),
            reports_port: true,
        });
    }
    // The datagram plane on a path with no loss and no delay: its cost.
    tools.push(Tool {
        name: "viamillipede --udp (threads 16)".into(),
        rx: Box::new(move |_, out| format!("{vm} rx 127.0.0.1:0 > {}", q(out))),
        tx: Box::new(move |port, inp| format!("{vm} tx 127.0.0.1 {port} --udp < {}", q(inp))),
        reports_port: true,
    });
    // The cost of authentication plus AES-256-GCM on every frame.
    let key = key_file(&dir).display().to_string();
    let key2 = key.clone();
    tools.push(Tool {
        name: "viamillipede threads 4 --encrypt".into(),
        rx: Box::new(move |_, out| format!("{vm} rx 127.0.0.1:0 --key-file {key} > {}", q(out))),
        tx: Box::new(move |port, inp| {
            format!(
                "{vm} tx 127.0.0.1 {port} threads 4 --key-file {key2} --encrypt < {}",
                q(inp)
            )
        }),
        reports_port: true,
    });

    let mut runs: Vec<Vec<Run>> = tools.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        // Each round starts one tool later, so no tool always runs in the
        // same place (right after the same neighbour, or first on a machine
        // that has just been idle).
        for i in (0..tools.len()).map(|k| (k + round) % tools.len()) {
            let tool = &tools[i];
            let _ = fs::remove_file(&out);
            let r = run_tool(tool, &inp, &out, &dir, LOOPBACK);
            let got = sha256(&out);
            assert_eq!(got, want, "{}: output differs from input", tool.name);
            eprintln!(
                "round {} {:<26} {:6.2} s wall {:6.2} s cpu",
                round + 1,
                tool.name,
                r.wall,
                r.cpu
            );
            runs[i].push(r);
        }
    }
    let _ = fs::remove_file(&out);

    let nc_wall = median(runs[0].iter().map(|r| r.wall).collect());
    let nc_cpu = median(runs[0].iter().map(|r| r.cpu).collect());
    let mut t = String::new();
    let _ = writeln!(
        t,
        "### loopback: {mib} MiB of random data, median of {rounds} interleaved rounds\n"
    );
    let _ = writeln!(
        t,
        "| tool | goodput | wall s | wall / nc | CPU s | CPU / nc | peak RSS tx | peak RSS rx |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (tool, rs) in tools.iter().zip(&runs) {
        let wall = median(rs.iter().map(|r| r.wall).collect());
        let cpu = median(rs.iter().map(|r| r.cpu).collect());
        let rss_tx = rs.iter().map(|r| r.rss_tx).max().unwrap_or(0);
        let rss_rx = rs.iter().map(|r| r.rss_rx).max().unwrap_or(0);
        let _ = writeln!(
            t,
            "| {} | {:.0} MiB/s | {:.2} | {:.2} | {:.2} | {:.2} | {} MiB | {} MiB |",
            tool.name,
            mib as f64 / wall,
            wall,
            wall / nc_wall,
            cpu,
            cpu / nc_cpu,
            rss_tx / 1024,
            rss_rx / 1024
        );
    }
    t.push('\n');
    t
}
