//! The emulated-WAN scenarios: one long lossy path, clean paths, and three
//! ranked paths (throughput, preference, an outage). Each builds its own
//! namespaces through the emulator and tears them down afterwards.

use crate::emulator::{Count, PathSpec, Wan};
use crate::{input, median, require, run_tool, sha256, Place, Run, Tool};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the WAN scenarios need besides the loopback peers.
const PEERS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iperf3", "iperf3"),
    ("ping", "iputils-ping"),
    ("pv", "pv"),
    ("nc", "netcat-openbsd"),
];

const PORT: u16 = 8834;
const IPERF_PORT: u16 = 5201;
const SEED: u64 = 0x5EED;

/// Skips (with the reason) when this process cannot build namespaces.
fn can_run(what: &str) -> bool {
    match crate::emulator::have_root() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("skipping the {what} scenarios: {why}");
            false
        }
    }
}

/// One row of a scenario's table.
struct Row {
    tool: String,
    mbit: f64,
    run: Option<Run>,
    note: String,
}

/// The table of one scenario, with ratios to row `reference`.
fn table(title: &str, rows: &[Row], reference: usize, target: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "### {title}\n");
    let _ = writeln!(
        t,
        "| tool | goodput | ratio to {} | CPU s | peak RSS tx / rx | notes |",
        rows[reference].tool
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---|");
    let base = rows[reference].mbit;
    for r in rows {
        let (cpu, rss) = match &r.run {
            Some(run) => (
                format!("{:.1}", run.cpu),
                format!("{} / {} MiB", run.rss_tx / 1024, run.rss_rx / 1024),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            t,
            "| {} | {:.1} Mbit/s | {:.2} | {cpu} | {rss} | {} |",
            r.tool,
            r.mbit,
            r.mbit / base,
            r.note
        );
    }
    if !target.is_empty() {
        let _ = writeln!(t, "\nTarget: {target}");
    }
    t.push('\n');
    t
}

/// Output file on tmpfs where there is one.
fn out_path(dir: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.join("viamillipede-bench-wan.bin")
    } else {
        dir.join("wan-out.bin")
    }
}

/// An iperf3 run from a to b's address on path `path`: Mbit/s received.
fn iperf3(wan: &Wan, path: usize, streams: u32, seconds: u32, extra: &[&str]) -> f64 {
    let mut server = Wan::exec(&wan.b, "iperf3")
        .args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !crate::listening(server.id(), IPERF_PORT) {
        assert!(Instant::now() < deadline, "iperf3 server never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = Wan::exec(&wan.a, "iperf3")
        .args(["-c", &wan.addr_b(path), "-p", &IPERF_PORT.to_string()])
        .args(["-t", &seconds.to_string(), "-P", &streams.to_string(), "-J"])
        .args(extra)
        .output()
        .expect("run iperf3");
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 gave no result: {}", v["error"]));
    bps / 1e6
}

/// Round-trip time to path `path`'s far end, in ms (average of 20 pings).
fn ping(wan: &Wan, path: usize) -> f64 {
    let out = Wan::exec(&wan.a, "ping")
        .args(["-q", "-c", "20", "-i", "0.05", &wan.addr_b(path)])
        .output()
        .expect("run ping");
    let text = String::from_utf8_lossy(&out.stdout);
    // rtt min/avg/max/mdev = 50.1/50.2/50.4/0.1 ms
    let stats = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .unwrap_or_else(|| {
            let err = String::from_utf8_lossy(&out.stderr);
            panic!("no ping statistics in {text:?} {err}")
        });
    let nums = stats.split('=').nth(1).unwrap().trim();
    nums.split('/').nth(1).unwrap().parse().expect("avg rtt")
}

fn vm() -> &'static str {
    env!("CARGO_BIN_EXE_viamillipede")
}

fn nc(dest: &str) -> Tool {
    let dest = dest.to_string();
    Tool {
        name: "nc".into(),
        rx: Box::new(|port, out| format!("nc -l {port} > {}", out.display())),
        tx: Box::new(move |port, inp| format!("nc -N {dest} {port} < {}", inp.display())),
        reports_port: false,
    }
}

/// viamillipede with `tx` given as extra arguments after the destinations.
fn viamillipede(name: &str, dests: &[String], extra: &str, source: Option<&str>) -> Tool {
    let dests: String = dests.iter().map(|d| format!(" tx {d} {PORT}")).collect();
    let (extra, source) = (extra.to_string(), source.map(str::to_string));
    Tool {
        name: name.into(),
        rx: Box::new(|port, out| format!("{} rx {port} > {}", vm(), out.display())),
        tx: Box::new(move |_, inp| match &source {
            Some(src) => format!("{src} {} | {}{dests} {extra}", inp.display(), vm()),
            None => format!("{}{dests} {extra} < {}", vm(), inp.display()),
        }),
        reports_port: false,
    }
}

/// Runs `tool` from a to b, checks the output and returns goodput in Mbit/s.
fn transfer(wan: &Wan, tool: &Tool, inp: &Path, want: &str, dir: &Path) -> (f64, Run) {
    let out = out_path(dir);
    let _ = fs::remove_file(&out);
    let place = Place {
        rx_ns: Some(&wan.b),
        tx_ns: Some(&wan.a),
        port: Some(PORT),
    };
    let r = run_tool(tool, inp, &out, dir, place);
    assert_eq!(
        sha256(&out),
        want,
        "{}: output differs from input",
        tool.name
    );
    let _ = fs::remove_file(&out);
    let bytes = fs::metadata(inp).expect("input").len() as f64;
    let mbit = bytes * 8.0 / r.wall / 1e6;
    eprintln!("  {:<40} {:8.1} Mbit/s {:6.1} s", tool.name, mbit, r.wall);
    (mbit, r)
}

/// Median goodput of `rounds` runs, and the run with the median goodput.
fn transfer_n(wan: &Wan, tool: &Tool, inp: &Path, dir: &Path, rounds: usize) -> (f64, Run) {
    let want = sha256(inp);
    let mut runs: Vec<(f64, Run)> = (0..rounds)
        .map(|_| transfer(wan, tool, inp, &want, dir))
        .collect();
    let m = median(runs.iter().map(|r| r.0).collect());
    let i = runs.iter().position(|r| r.0 == m).unwrap();
    runs.swap_remove(i)
}

fn rounds() -> usize {
    crate::env_num("BENCH_WAN_ROUNDS", 1).max(1) as usize
}

/// Scenarios 2 and 3: one path, lossy and clean.
pub fn wan() -> String {
    if !can_run("wan") {
        return "### wan: skipped (needs root)\n\n".into();
    }
    let dir = crate::bench_dir();
    let mut report = validation();
    let lossy = PathSpec::new(200, 50.0, 0.001);
    let wan = Wan::new(&[lossy], "cubic", SEED).expect("build the emulated WAN");
    // Sizes for runs of 20 to 30 s, like iperf3's: the start and the last
    // feet weigh on a short transfer.
    let big = input(&dir, 512);
    let small = input(&dir, 48);

    // Scenario 2: 200 Mbit/s, 50 ms, 0.1 % loss, cubic.
    eprintln!("wan: {}, cubic", lossy.describe());
    let mut rows = vec![
        Row {
            tool: "iperf3 -P 16".into(),
            mbit: iperf3(&wan, 0, 16, 25, &[]),
            run: None,
            note: "25 s".into(),
        },
        Row {
            tool: "iperf3 (one stream)".into(),
            mbit: iperf3(&wan, 0, 1, 25, &[]),
            run: None,
            note: "25 s".into(),
        },
    ];
    let (mbit, run) = transfer_n(&wan, &nc(&wan.addr_b(0)), &small, &dir, rounds());
    rows.push(Row {
        tool: "nc".into(),
        mbit,
        run: Some(run),
        note: "48 MiB".into(),
    });
    let dest = [wan.addr_b(0)];
    for (name, extra) in [
        ("viamillipede threads 16", "threads 16"),
        (
            "viamillipede threads 16 --foot-size 512K",
            "threads 16 --foot-size 512K",
        ),
        ("viamillipede threads 16 --cc bbr", "threads 16 --cc bbr"),
    ] {
        let tool = viamillipede(name, &dest, extra, None);
        let (mbit, run) = transfer_n(&wan, &tool, &big, &dir, rounds());
        rows.push(Row {
            tool: name.into(),
            mbit,
            run: Some(run),
            note: "512 MiB".into(),
        });
    }
    report.push_str(&table(
        &format!("wan: {}, cubic", lossy.describe()),
        &rows,
        0,
        "threads 16 >= 0.95 x iperf3 -P 16; --cc bbr >= 175 Mbit/s",
    ));

    // Scenario 3: the same path without loss, and a short fat one.
    for (spec, mib) in [
        (PathSpec::new(200, 50.0, 0.0), 256),
        (PathSpec::new(1000, 2.0, 0.0), 1024),
    ] {
        wan.set_path(0, spec);
        eprintln!("wan: {}, cubic", spec.describe());
        let inp = input(&dir, mib);
        let mut rows = Vec::new();
        for tool in [
            nc(&dest[0]),
            viamillipede(
                "viamillipede (default, threads 16)",
                &dest,
                "threads 16",
                None,
            ),
            viamillipede("viamillipede threads 1", &dest, "threads 1", None),
        ] {
            let (mbit, run) = transfer_n(&wan, &tool, &inp, &dir, rounds());
            rows.push(Row {
                tool: tool.name.clone(),
                mbit,
                run: Some(run),
                note: format!("{mib} MiB"),
            });
        }
        rows.push(Row {
            tool: "iperf3 (one stream)".into(),
            mbit: iperf3(&wan, 0, 1, 10, &[]),
            run: None,
            note: "10 s".into(),
        });
        report.push_str(&table(
            &format!("wan: {}, cubic", spec.describe()),
            &rows,
            0,
            "viamillipede as run by default >= 0.95 x nc (threads 1 for information)",
        ));
    }
    report
}

/// Scenario 7: the slow links many users have (a DSL uplink, a congested
/// VPN), at the default settings, against nc on the same path, with cubic
/// and with bbr.
pub fn slow() -> String {
    if !can_run("slow") {
        return "### slow: skipped (needs root)\n\n".into();
    }
    require(PEERS);
    let dir = crate::bench_dir();
    let specs = [PathSpec::new(3, 50.0, 0.0), PathSpec::new(10, 20.0, 0.0)];
    let mut wan = Wan::new(&specs, "cubic", SEED).expect("build the emulated WAN");
    let mut report = String::new();
    for cc in ["cubic", "bbr"] {
        wan.set_cc(cc).expect("set the congestion control");
        for (i, (spec, sizes)) in specs.iter().zip([&[6][..], &[24, 48]]).enumerate() {
            let dest = [wan.addr_b(i)];
            for &mib in sizes {
                eprintln!("slow: {}, {cc}, {mib} MiB", spec.describe());
                let inp = input(&dir, mib);
                let mut rows = Vec::new();
                for tool in [
                    nc(&dest[0]),
                    viamillipede("viamillipede (defaults)", &dest, "", None),
                ] {
                    let (mbit, run) = transfer_n(&wan, &tool, &inp, &dir, rounds());
                    rows.push(Row {
                        tool: tool.name.clone(),
                        mbit,
                        run: Some(run),
                        note: format!("{mib} MiB"),
                    });
                }
                report.push_str(&table(
                    &format!("slow: {}, {cc}, {mib} MiB", spec.describe()),
                    &rows,
                    0,
                    "viamillipede at its defaults >= 0.95 x nc",
                ));
            }
        }
    }
    report
}

/// The emulator checked against its settings: ping RTT, loss counted on
/// the lossy path, iperf3 against the rate.
pub fn validation() -> String {
    if !can_run("validate") {
        return "### emulator validation: skipped (needs root)\n\n".into();
    }
    require(PEERS);
    eprintln!("wan: validating the emulator");
    let specs = [
        PathSpec::new(200, 50.0, 0.0),
        PathSpec::new(100, 20.0, 0.0),
        PathSpec::new(50, 20.0, 0.01),
    ];
    let wan = Wan::new(&specs, "cubic", SEED).expect("build the emulated WAN");
    let mut t = String::from(
        "### emulator validation\n\n| path | ping RTT | iperf3 -P 4 | loss a→b (packets) |\n|---|---:|---:|---:|\n",
    );
    for (i, spec) in specs.iter().enumerate() {
        let rtt = ping(&wan, i);
        let before = wan.count(i).0;
        let mbit = iperf3(&wan, i, 4, 5, &[]);
        let c = wan.count(i).0.since(&before);
        let seen = c.packets + c.lost + c.queue_drops;
        let loss = c.lost as f64 / seen.max(1) as f64;
        let _ = writeln!(
            t,
            "| {} | {rtt:.1} ms | {mbit:.1} Mbit/s | {:.3}% of {seen} |",
            spec.describe(),
            loss * 100.0
        );
        let want_rtt = spec.delay.as_secs_f64() * 2000.0;
        assert!(
            (rtt - want_rtt).abs() < 1.0 + want_rtt * 0.05,
            "path {i}: ping RTT {rtt} ms, set {want_rtt} ms"
        );
        // Binomial: within five standard deviations of the setting.
        let sd = (spec.loss * (1.0 - spec.loss) / seen as f64).sqrt();
        assert!(
            (loss - spec.loss).abs() <= 5.0 * sd + 1e-9,
            "path {i}: measured loss {loss}, set {}",
            spec.loss
        );
        if spec.loss == 0.0 {
            let ceiling = spec.rate as f64 / 1e6 * 1448.0 / 1500.0;
            assert!(
                mbit > 0.9 * ceiling,
                "path {i}: iperf3 reached {mbit} Mbit/s of {ceiling}"
            );
        }
    }
    t.push('\n');
    t
}

/// Samples every path's a→b byte counter once a second until stopped.
fn sample(wan: &Wan, stop: &AtomicBool) -> Vec<Vec<u64>> {
    let mut rows = Vec::new();
    let mut last = wan.forward_counts();
    let start = Instant::now();
    let mut tick = 1;
    while !stop.load(Ordering::Relaxed) {
        let next = start + Duration::from_secs(tick);
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let now = wan.forward_counts();
        rows.push(
            now.iter()
                .zip(&last)
                .map(|(n, l)| n.bytes - l.bytes)
                .collect(),
        );
        last = now;
        tick += 1;
    }
    rows
}

/// Runs `f`, with what crossed each path a → b meanwhile.
fn counted<T>(wan: &Wan, f: impl FnOnce() -> T) -> (T, Vec<Count>) {
    let before = wan.forward_counts();
    let out = f();
    let after = wan.forward_counts();
    let delta = after.iter().zip(&before).map(|(a, b)| a.since(b)).collect();
    (out, delta)
}

fn share(counts: &[Count], i: usize) -> f64 {
    let total: u64 = counts.iter().map(|c| c.bytes).sum();
    counts[i].bytes as f64 / total.max(1) as f64
}

/// Scenarios 4, 5 and 6: three ranked paths.
pub fn multipath() -> String {
    if !can_run("multipath") {
        return "### multipath: skipped (needs root)\n\n".into();
    }
    require(PEERS);
    let dir = crate::bench_dir();
    let specs = [
        PathSpec::new(100, 20.0, 0.0),
        PathSpec::new(50, 20.0, 0.0),
        PathSpec::new(20, 20.0, 0.0),
    ];
    let wan = Wan::new(&specs, "cubic", SEED).expect("build the emulated WAN");
    let dests: Vec<String> = (0..3).map(|i| wan.addr_b(i)).collect();
    let title = "multipath: 100 + 50 + 20 Mbit/s, 20 ms RTT, ranked in that order, cubic";
    eprintln!("{title}");
    let mut report = String::new();

    // Scenario 4: aggregate throughput.
    let singles: Vec<f64> = (0..3).map(|i| iperf3(&wan, i, 1, 10, &[])).collect();
    let sum: f64 = singles.iter().sum();
    let mut rows = vec![Row {
        tool: "sum of three single iperf3 streams".into(),
        mbit: sum,
        run: None,
        note: format!(
            "{} Mbit/s",
            singles
                .iter()
                .map(|m| format!("{m:.1}"))
                .collect::<Vec<_>>()
                .join(" + ")
        ),
    }];
    let inp = input(&dir, 384);
    let mut clean_wall = 0.0;
    for (name, extra) in [
        ("viamillipede threads 1", "threads 1"),
        ("viamillipede threads 4", "threads 4"),
        ("viamillipede (default, threads 16)", ""),
    ] {
        let tool = viamillipede(name, &dests, extra, None);
        let ((mbit, run), after) = counted(&wan, || transfer_n(&wan, &tool, &inp, &dir, rounds()));
        if extra == "threads 4" {
            clean_wall = run.wall;
        }
        rows.push(Row {
            tool: tool.name.clone(),
            mbit,
            run: Some(run),
            note: format!(
                "384 MiB; bytes per path {:.0}% / {:.0}% / {:.0}%",
                share(&after, 0) * 100.0,
                share(&after, 1) * 100.0,
                share(&after, 2) * 100.0
            ),
        });
    }
    report.push_str(&table(
        title,
        &rows,
        0,
        ">= 0.95 x the sum of single streams at any threads",
    ));

    // Scenario 5: a 60 Mbit/s source stays on the first path.
    let small = input(&dir, 96);
    let tool = viamillipede(
        "pv -L 60 Mbit/s into viamillipede threads 4",
        &dests,
        "threads 4",
        Some("pv -q -L 7500000"),
    );
    let ((mbit, run), after) = counted(&wan, || transfer_n(&wan, &tool, &small, &dir, 1));
    let first = share(&after, 0);
    let rows = vec![Row {
        tool: tool.name.clone(),
        mbit,
        run: Some(run),
        note: format!(
            "96 MiB; bytes on path 1: {:.1}% (then {:.1}% / {:.1}%)",
            first * 100.0,
            share(&after, 1) * 100.0,
            share(&after, 2) * 100.0
        ),
    }];
    report.push_str(&table(
        "multipath preference: a 60 Mbit/s source over the same three paths",
        &rows,
        0,
        ">= 90% of the bytes on the first path",
    ));

    // Scenario 6: the first path goes dark for 10 s in the middle.
    let tool = viamillipede(
        "viamillipede threads 4, path 1 dark 10 s",
        &dests,
        "threads 4",
        None,
    );
    let stop = AtomicBool::new(false);
    let (dark_at, dark_for) = (Duration::from_secs(6), Duration::from_secs(10));
    let (result, timeline) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(&wan, &stop));
        let outage = s.spawn(|| {
            let t0 = Instant::now();
            let wait = |until: Duration| {
                while t0.elapsed() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            wait(dark_at);
            wan.set_dark(0, true);
            wait(dark_at + dark_for);
            wan.set_dark(0, false);
        });
        let result = transfer(&wan, &tool, &inp, &sha256(&inp), &dir);
        stop.store(true, Ordering::Relaxed);
        outage.join().unwrap();
        (result, sampler.join().unwrap())
    });
    let (mbit, run) = result;
    let lost = run.wall - clean_wall;
    let (moved, back) = outage_times(&timeline, &specs, dark_at, dark_for);
    let rows = vec![Row {
        tool: tool.name.clone(),
        mbit,
        run: Some(run),
        note: format!(
            "384 MiB, byte-exact; {lost:.1} s lost against the clean run; other paths full {moved} after the cut; path 1 back to half its rate {back} after it returned"
        ),
    }];
    report.push_str(&table(
        "multipath outage: path 1 dark from 6 s to 16 s",
        &rows,
        0,
        "byte-exact, both exit 0, traffic moves within a few seconds and returns",
    ));
    report.push_str("Per-second Mbit/s on each path during the outage run:\n\n| s | path 1 | path 2 | path 3 |\n|---:|---:|---:|---:|\n");
    for (i, row) in timeline.iter().enumerate() {
        let _ = writeln!(
            report,
            "| {} | {:.0} | {:.0} | {:.0} |",
            i + 1,
            row[0] as f64 * 8e-6,
            row[1] as f64 * 8e-6,
            row[2] as f64 * 8e-6
        );
    }
    report.push('\n');
    drop(wan);
    report
}

/// From the per-second timeline: how long after the cut the other paths
/// ran at 80% of their rates, and how long after the path returned it
/// carried half its rate again.
fn outage_times(
    timeline: &[Vec<u64>],
    specs: &[PathSpec],
    dark_at: Duration,
    dark_for: Duration,
) -> (String, String) {
    let mbit = |row: &Vec<u64>, i: usize| row[i] as f64 * 8e-6;
    let rate = |i: usize| specs[i].rate as f64 / 1e6;
    let cut = dark_at.as_secs() as usize;
    let back = (dark_at + dark_for).as_secs() as usize;
    let others = (1..specs.len()).map(rate).sum::<f64>();
    let moved = timeline
        .iter()
        .enumerate()
        .skip(cut)
        .find(|(_, row)| (1..specs.len()).map(|i| mbit(row, i)).sum::<f64>() >= 0.8 * others)
        .map(|(s, _)| format!("within {} s", s + 1 - cut))
        .unwrap_or_else(|| "never".into());
    let returned = timeline
        .iter()
        .enumerate()
        .skip(back)
        .find(|(_, row)| mbit(row, 0) >= 0.5 * rate(0))
        .map(|(s, _)| format!("within {} s", s + 1 - back))
        .unwrap_or_else(|| "not before the end".into());
    (moved, returned)
}

/// `cargo bench --bench transfer -- shell [MBIT/RTT_MS/LOSS_PERCENT]... [cc=NAME]`:
/// builds the emulated WAN (one path per spec; default one 200/50/0.1
/// path) and keeps it until stdin closes, for experiments by hand with
/// `ip netns exec`.
pub fn shell(args: &[String]) {
    if !can_run("shell") {
        std::process::exit(1);
    }
    let mut cc = "cubic".to_string();
    let mut specs = Vec::new();
    for a in args {
        if let Some(name) = a.strip_prefix("cc=") {
            cc = name.to_string();
            continue;
        }
        let f: Vec<f64> = a
            .split('/')
            .map(|x| x.parse().expect("MBIT/RTT_MS/LOSS_PERCENT"))
            .collect();
        assert_eq!(f.len(), 3, "MBIT/RTT_MS/LOSS_PERCENT, not {a}");
        specs.push(PathSpec::new(f[0] as u64, f[1], f[2] / 100.0));
    }
    if specs.is_empty() {
        specs.push(PathSpec::new(200, 50.0, 0.001));
    }
    let wan = Wan::new(&specs, &cc, SEED).expect("build the emulated WAN");
    for (i, s) in specs.iter().enumerate() {
        println!(
            "path {}: {} -> {}: {}",
            i + 1,
            wan.a,
            wan.addr_b(i),
            s.describe()
        );
    }
    println!(
        "namespaces {} (sender) and {} (receiver), cc {cc}; close stdin to tear down",
        wan.a, wan.b
    );
    let mut sink = String::new();
    while std::io::stdin()
        .read_line(&mut sink)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        for i in 0..specs.len() {
            let (f, b) = wan.count(i);
            println!("path {}: a->b {:?}\n        b->a {:?}", i + 1, f, b);
        }
    }
}

/// The long lossy path and a fast one, cubic in the namespaces: iperf3,
/// nc, TCP at the defaults, `threads auto` and `--udp` side by side; then
/// `--udp` beside one TCP flow on a clean shared path (fairness).
pub fn longhaul() -> String {
    if !can_run("longhaul") {
        return "### longhaul: skipped (needs root)\n\n".into();
    }
    require(PEERS);
    let dir = crate::bench_dir();
    let first = PathSpec::new(200, 150.0, 0.005);
    let wan = Wan::new(&[first], "cubic", SEED).expect("build the emulated WAN");
    let dest = [wan.addr_b(0)];
    let mut report = String::new();
    // nc is one cubic stream: a small input keeps its run within minutes.
    for (spec, mib, nc_mib) in [
        (first, 512, 16),
        (PathSpec::new(1000, 40.0, 0.001), 1024, 128),
    ] {
        wan.set_path(0, spec);
        eprintln!("longhaul: {}, cubic", spec.describe());
        let inp = input(&dir, mib);
        let small = input(&dir, nc_mib);
        let mut rows = vec![Row {
            tool: "iperf3 -P 16".into(),
            mbit: iperf3(&wan, 0, 16, 20, &[]),
            run: None,
            note: "20 s".into(),
        }];
        let (mbit, run) = transfer_n(&wan, &nc(&dest[0]), &small, &dir, rounds());
        rows.push(Row {
            tool: "nc".into(),
            mbit,
            run: Some(run),
            note: format!("{nc_mib} MiB"),
        });
        for (name, extra) in [
            ("viamillipede (defaults: threads 16)", ""),
            ("viamillipede threads auto", "threads auto"),
            ("viamillipede --udp", "--udp"),
        ] {
            let tool = viamillipede(name, &dest, extra, None);
            let (mbit, run) = transfer_n(&wan, &tool, &inp, &dir, rounds());
            rows.push(Row {
                tool: name.into(),
                mbit,
                run: Some(run),
                note: format!("{mib} MiB"),
            });
        }
        // The ceiling for TCP's 1448 payload bytes in a 1514-byte frame.
        let ceiling = spec.rate as f64 / 1e6 * 1448.0 / 1514.0;
        report.push_str(&table(
            &format!(
                "longhaul: {}, cubic (goodput ceiling {ceiling:.0} Mbit/s)",
                spec.describe()
            ),
            &rows,
            2,
            &format!(
                "--udp >= 0.9 x the ceiling ({:.0} Mbit/s) on the 200 Mbit/s path; threads auto >= 2 x the defaults there",
                0.9 * ceiling
            ),
        ));
    }
    report.push_str(&fairness(&wan, &dir));
    report
}

/// Only the fairness run of [`longhaul`].
pub fn fair() -> String {
    if !can_run("fairness") {
        return "### fairness: skipped (needs root)\n\n".into();
    }
    require(PEERS);
    let spec = PathSpec::new(200, 50.0, 0.0);
    let wan = Wan::new(&[spec], "cubic", SEED).expect("build the emulated WAN");
    fairness(&wan, &crate::bench_dir())
}

/// `--udp` sharing a clean 200 Mbit/s 50 ms path with one iperf3 (cubic)
/// flow for 30 s: each one's goodput over those 30 s.
fn fairness(wan: &Wan, dir: &Path) -> String {
    let spec = PathSpec::new(200, 50.0, 0.0);
    wan.set_path(0, spec);
    eprintln!("longhaul: fairness on {}", spec.describe());
    let alone = iperf3(wan, 0, 1, 30, &[]);
    let inp = input(dir, 1024);
    let out = out_path(dir);
    let stats = dir.join("fairness-stats.json");
    let _ = fs::remove_file(&stats);
    let mut rx = Wan::exec(&wan.b, vm())
        .args(["rx", &PORT.to_string(), "--stats-json"])
        .arg(&stats)
        .stdout(fs::File::create(&out).expect("output file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start rx");
    std::thread::sleep(Duration::from_millis(300));
    let mut tx = Wan::exec(&wan.a, vm())
        .args(["tx", &wan.addr_b(0), &PORT.to_string(), "--udp"])
        .stdin(fs::File::open(&inp).expect("input"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start tx");
    // iperf3 joins once --udp has found the path's rate.
    let lead = 5;
    std::thread::sleep(Duration::from_secs(lead));
    let beside = iperf3(wan, 0, 1, 30, &[]);
    let tx_ok = tx.wait().map(|s| s.success()).unwrap_or(false);
    let rx_ok = rx.wait().map(|s| s.success()).unwrap_or(false);
    assert!(tx_ok && rx_ok, "the fairness transfer failed");
    assert_eq!(sha256(&out), sha256(&inp), "fairness: output differs");
    let _ = fs::remove_file(&out);
    let doc: serde_json::Value =
        serde_json::from_slice(&fs::read(&stats).expect("stats document")).expect("stats JSON");
    let series: Vec<f64> = doc["sides"][0]["throughput"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default();
    // rx's clock starts with the first connection, about when tx started.
    let window =
        &series[(lead as usize + 1).min(series.len())..(lead as usize + 30).min(series.len())];
    let udp = window.iter().sum::<f64>() * 8.0 / 1e6 / window.len().max(1) as f64;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "### fairness: {}, cubic, 30 s\n\n| flow | goodput |\n|---|---:|\n| iperf3 (one stream) alone | {alone:.1} Mbit/s |\n| iperf3 (one stream) beside --udp | {beside:.1} Mbit/s |\n| --udp beside iperf3 | {udp:.1} Mbit/s |\n\n--udp took {:.2} x the TCP flow's goodput while they shared the path.\n",
        spec.describe(),
        udp / beside.max(0.1)
    );
    t
}
