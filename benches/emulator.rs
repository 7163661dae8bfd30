//! A user-space WAN emulator for the benchmarks (this kernel has no netem).
//!
//! Two network namespaces, the sender's side `a` and the receiver's side
//! `b`, are joined only through this process: each path is a pair of TUN
//! devices, one moved into each namespace, and two threads per direction
//! carry the packets across. On the way a packet meets, in order:
//!
//! 1. the outage switch (a dark path drops everything);
//! 2. random loss, from a seeded generator per path and direction;
//! 3. a drop-tail queue in front of a rate limiter: the link serialises one
//!    packet after another at the path's rate, and a packet that would wait
//!    longer than the queue holds is dropped;
//! 4. the one-way propagation delay.
//!
//! Path `i` has 10.77.i.1 in `a` and 10.77.i.2 in `b`. Each namespace gets
//! its own congestion control default and 64 MiB `tcp_rmem`/`tcp_wmem`
//! maxima; the global list of allowed algorithms is widened if needed and
//! restored on drop, as is everything else this module changes.

use std::collections::VecDeque;
use std::io;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The shape of one path, the same in both directions.
#[derive(Clone, Copy, Debug)]
pub struct PathSpec {
    /// Link rate in bits per second.
    pub rate: u64,
    /// One-way propagation delay.
    pub delay: Duration,
    /// Probability that a packet is lost, in each direction.
    pub loss: f64,
    /// Drop-tail queue in bytes; `None` means one bandwidth-delay product.
    pub queue: Option<u64>,
}

impl PathSpec {
    /// A path of `mbit` Mbit/s, `rtt_ms` round trip and `loss` per packet.
    pub fn new(mbit: u64, rtt_ms: f64, loss: f64) -> PathSpec {
        PathSpec {
            rate: mbit * 1_000_000,
            delay: Duration::from_secs_f64(rtt_ms / 2000.0),
            loss,
            queue: None,
        }
    }

    fn queue_bytes(&self) -> u64 {
        self.queue.unwrap_or_else(|| {
            let bdp = self.rate as f64 / 8.0 * self.delay.as_secs_f64() * 2.0;
            (bdp as u64).max(64 * 1024)
        })
    }

    /// Mbit/s, RTT and loss, for tables.
    pub fn describe(&self) -> String {
        format!(
            "{} Mbit/s, {} ms RTT, {}% loss",
            self.rate / 1_000_000,
            (self.delay.as_secs_f64() * 2000.0).round(),
            self.loss * 100.0
        )
    }
}

/// Counters of one direction of one path.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets and bytes delivered.
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Packets dropped by random loss, the full queue, an outage.
    pub lost: AtomicU64,
    pub queue_drops: AtomicU64,
    pub dark_drops: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
    pub lost: u64,
    pub queue_drops: u64,
    pub dark_drops: u64,
}

impl Count {
    /// The change since `before`.
    pub fn since(&self, before: &Count) -> Count {
        Count {
            packets: self.packets - before.packets,
            bytes: self.bytes - before.bytes,
            lost: self.lost - before.lost,
            queue_drops: self.queue_drops - before.queue_drops,
            dark_drops: self.dark_drops - before.dark_drops,
        }
    }
}

impl Counters {
    fn read(&self) -> Count {
        Count {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            queue_drops: self.queue_drops.load(Ordering::Relaxed),
            dark_drops: self.dark_drops.load(Ordering::Relaxed),
        }
    }
}

struct Path {
    spec: Mutex<PathSpec>,
    dark: AtomicBool,
    /// a → b (the data direction in the benchmarks) and b → a.
    forward: Counters,
    backward: Counters,
}

impl Path {
    fn counters(&self, forward: bool) -> &Counters {
        if forward {
            &self.forward
        } else {
            &self.backward
        }
    }
}

/// The emulated WAN; dropping it tears everything down.
pub struct Wan {
    /// Namespace names: the sender's side and the receiver's side.
    pub a: String,
    pub b: String,
    paths: Vec<Arc<Path>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    restore_allowed_cc: Option<String>,
}

fn sh(args: &[&str]) -> io::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether this process may build namespaces and TUN devices.
pub fn have_root() -> Result<(), String> {
    let uid = sh(&["id", "-u"]).map_err(|e| e.to_string())?;
    if uid != "0" {
        return Err(format!("needs root (uid is {uid})"));
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing".into());
    }
    sh(&["ip", "-V"]).map_err(|e| format!("needs iproute2 (ip): {e}"))?;
    Ok(())
}

impl Wan {
    /// Builds the namespaces and `paths.len()` paths, all using congestion
    /// control `cc` by default.
    pub fn new(paths: &[PathSpec], cc: &str, seed: u64) -> io::Result<Wan> {
        let tag = std::process::id() % 10_000;
        let (a, b) = (format!("vmp{tag}a"), format!("vmp{tag}b"));
        let mut wan = Wan {
            a: a.clone(),
            b: b.clone(),
            paths: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            restore_allowed_cc: None,
        };
        sh(&["ip", "netns", "add", &a])?;
        sh(&["ip", "netns", "add", &b])?;
        for ns in [&a, &b] {
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            for (key, value) in [
                ("net.ipv4.tcp_rmem", "4096 131072 67108864"),
                ("net.ipv4.tcp_wmem", "4096 16384 67108864"),
                // Every run starts from a clean slate, not from the
                // ssthresh the previous run left in the route cache.
                ("net.ipv4.tcp_no_metrics_save", "1"),
            ] {
                wan.sysctl(ns, key, value)?;
            }
        }
        wan.set_cc(cc)?;
        for (i, spec) in paths.iter().enumerate() {
            wan.add_path(i, *spec, seed)?;
        }
        Ok(wan)
    }

    fn sysctl(&self, ns: &str, key: &str, value: &str) -> io::Result<()> {
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ])
        .map(drop)
    }

    /// Makes `cc` the default congestion control in both namespaces,
    /// allowing it globally first if it is not (restored on drop).
    pub fn set_cc(&mut self, cc: &str) -> io::Result<()> {
        const ALLOWED: &str = "net.ipv4.tcp_allowed_congestion_control";
        let allowed = sh(&["sysctl", "-n", ALLOWED])?;
        if !allowed.split_whitespace().any(|x| x == cc) {
            self.restore_allowed_cc.get_or_insert(allowed.clone());
            sh(&["sysctl", "-q", "-w", &format!("{ALLOWED}={allowed} {cc}")])?;
        }
        for ns in [&self.a, &self.b] {
            self.sysctl(ns, "net.ipv4.tcp_congestion_control", cc)?;
        }
        Ok(())
    }

    fn add_path(&mut self, i: usize, spec: PathSpec, seed: u64) -> io::Result<()> {
        let tag = &self.a[..self.a.len() - 1];
        let path = Arc::new(Path {
            spec: Mutex::new(spec),
            dark: AtomicBool::new(false),
            forward: Counters::default(),
            backward: Counters::default(),
        });
        let mut ends = Vec::new();
        for (side, ns, local, peer) in [("a", &self.a, 1, 2), ("b", &self.b, 2, 1)] {
            let name = format!("{tag}{side}{i}");
            let mut config = tun::Configuration::default();
            config.tun_name(&name).mtu(1500);
            config.platform_config(|p| {
                p.ensure_root_privileges(false);
            });
            let dev =
                tun::create(&config).map_err(|e| io::Error::other(format!("tun {name}: {e}")))?;
            sh(&["ip", "link", "set", "dev", &name, "netns", ns])?;
            let (l, p) = (format!("10.77.{i}.{local}"), format!("10.77.{i}.{peer}/32"));
            sh(&["ip", "-n", ns, "addr", "add", &l, "peer", &p, "dev", &name])?;
            sh(&[
                "ip",
                "-n",
                ns,
                "link",
                "set",
                "dev",
                &name,
                "mtu",
                "1500",
                "txqueuelen",
                "1000",
                "up",
            ])?;
            dev.set_nonblock()?;
            ends.push(Arc::new(dev));
        }
        for (from, to, forward) in [(0, 1, true), (1, 0, false)] {
            let (src, dst) = (Arc::clone(&ends[from]), Arc::clone(&ends[to]));
            let (tx, rx) = crossbeam_channel::unbounded::<(Instant, Vec<u8>)>();
            let p = Arc::clone(&path);
            let stop = Arc::clone(&self.stop);
            let rng = seed ^ ((i as u64) << 32) ^ u64::from(forward);
            let dir = if forward { "ab" } else { "ba" };
            let spawn = |name: String| std::thread::Builder::new().name(name);
            self.threads.push(
                spawn(format!("emu-in-{i}{dir}"))
                    .spawn(move || carry_in(&src, &p, forward, rng, &stop, &tx))?,
            );
            let p = Arc::clone(&path);
            let stop = Arc::clone(&self.stop);
            self.threads.push(std::thread::spawn(move || {
                carry_out(&dst, &p, forward, &stop, &rx)
            }));
        }
        self.paths.push(path);
        Ok(())
    }

    /// The receiver's address on path `i`.
    pub fn addr_b(&self, i: usize) -> String {
        format!("10.77.{i}.2")
    }

    /// Changes path `i` (takes effect from the next packet).
    pub fn set_path(&self, i: usize, spec: PathSpec) {
        *self.paths[i].spec.lock().unwrap() = spec;
    }

    /// Cuts path `i` (every packet dropped) or restores it.
    pub fn set_dark(&self, i: usize, dark: bool) {
        self.paths[i].dark.store(dark, Ordering::SeqCst);
    }

    /// Path `i`'s counters: a → b, b → a.
    pub fn count(&self, i: usize) -> (Count, Count) {
        (self.paths[i].forward.read(), self.paths[i].backward.read())
    }

    /// Counters of every path, a → b.
    pub fn forward_counts(&self) -> Vec<Count> {
        (0..self.paths.len()).map(|i| self.count(i).0).collect()
    }

    /// A command run inside namespace `ns`.
    pub fn exec(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in [&self.a, &self.b] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        if let Some(allowed) = self.restore_allowed_cc.take() {
            let _ = sh(&[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv4.tcp_allowed_congestion_control={allowed}"),
            ]);
        }
    }
}

/// A small seedable generator (splitmix64) for the loss decisions.
pub struct Rng(pub u64);

impl Rng {
    /// A uniform draw in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The link's serialiser: when the last admitted packet has left.
pub struct Link {
    /// When the link will be idle.
    pub busy_until: Instant,
}

impl Link {
    /// Admits a packet of `len` bytes arriving `now`: when it will have been
    /// sent, or `None` if the queue in front of the link is full.
    pub fn admit(&mut self, now: Instant, len: usize, spec: &PathSpec) -> Option<Instant> {
        if self.busy_until < now {
            self.busy_until = now;
        }
        let backlog = (self.busy_until - now).as_secs_f64() * spec.rate as f64 / 8.0;
        if backlog + len as f64 > spec.queue_bytes() as f64 {
            return None;
        }
        self.busy_until += Duration::from_secs_f64(len as f64 * 8.0 / spec.rate as f64);
        Some(self.busy_until)
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    )
}

/// Reads packets entering the path, decides their fate and when they arrive.
fn carry_in(
    src: &tun::Device,
    path: &Path,
    forward: bool,
    seed: u64,
    stop: &AtomicBool,
    out: &crossbeam_channel::Sender<(Instant, Vec<u8>)>,
) {
    let counters = path.counters(forward);
    let mut rng = Rng(seed);
    let mut link = Link {
        busy_until: Instant::now(),
    };
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // Non-blocking: under load a read succeeds at once and costs one
        // system call; only an idle device is polled (with a timeout, to
        // notice the stop flag).
        let n = match src.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match src.recv_timeout(&mut buf, Duration::from_millis(100)) {
                    Ok(n) => n,
                    Err(e) if is_transient(&e) => continue,
                    Err(_) => return,
                }
            }
            Err(e) if is_transient(&e) => continue,
            Err(_) => return,
        };
        let spec = *path.spec.lock().unwrap();
        if path.dark.load(Ordering::Relaxed) {
            counters.dark_drops.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if spec.loss > 0.0 && rng.unit() < spec.loss {
            counters.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Some(sent) = link.admit(Instant::now(), n, &spec) else {
            counters.queue_drops.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if out.send((sent + spec.delay, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

/// Delivers packets to the far end when their time comes.
fn carry_out(
    dst: &tun::Device,
    path: &Path,
    forward: bool,
    stop: &AtomicBool,
    input: &crossbeam_channel::Receiver<(Instant, Vec<u8>)>,
) {
    let counters = path.counters(forward);
    // Close enough: waking up costs about this much anyway.
    const SLACK: Duration = Duration::from_micros(100);
    let mut pending: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        if pending.is_empty() {
            match input.recv_timeout(Duration::from_millis(100)) {
                Ok(p) => pending.push_back(p),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(_) => return,
            }
        }
        pending.extend(input.try_iter());
        let now = Instant::now();
        while let Some((due, _)) = pending.front() {
            if *due > now + SLACK {
                break;
            }
            let (_, packet) = pending.pop_front().unwrap();
            // A dark path also loses what was already on the wire.
            if path.dark.load(Ordering::Relaxed) {
                counters.dark_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if dst.send(&packet).is_ok() {
                counters.packets.fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
        }
        if let Some((due, _)) = pending.front() {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    }
}
