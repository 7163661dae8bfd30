//! Watching a transfer: --progress and --stats-json.

use crate::util::*;
use serde_json::Value;
use std::sync::Arc;

const FOOT: usize = 2 << 20;

fn stats_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("viamillipede-stats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn read_json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

#[test]
fn stats_json_describes_both_sides() {
    let (tx_json, rx_json) = (stats_path("tx.json"), stats_path("rx.json"));
    let input = data(5 * FOOT + 11, 41);
    let tx_words = [
        "threads",
        "3",
        "checksums",
        "--stats-json",
        tx_json.to_str().unwrap(),
    ];
    transfer(
        input.clone(),
        &tx_words,
        &["--stats-json", rx_json.to_str().unwrap()],
    );
    let len = input.len() as u64;
    for (path, role) in [(&tx_json, "tx"), (&rx_json, "rx")] {
        let doc = read_json(path);
        assert_eq!(doc["schema"], "viamillipede-stats/1");
        assert_eq!(
            (doc["exit_code"].as_u64(), doc["status"].as_str()),
            (Some(0), Some("ok")),
            "{doc}"
        );
        assert!(doc["error"].is_null());
        let side = &doc["sides"][0];
        assert_eq!(side["role"], role);
        assert_eq!(side["payload_bytes"].as_u64(), Some(len), "{role}: {side}");
        let feet = side["feet"].as_u64().unwrap();
        assert!(feet >= 6, "{role}: {feet} feet");
        // Each foot carries a 16-byte header and an 8-byte checksum.
        let wire = side["wire_bytes"].as_u64().unwrap();
        assert!(
            wire >= len + 24 * 6,
            "{role}: wire {wire} for {len} payload bytes"
        );
        let conns = side["connections"].as_array().unwrap();
        let carried: u64 = conns.iter().map(|c| c["bytes"].as_u64().unwrap()).sum();
        assert!(carried >= len, "{role}: connections carried {carried}");
        let series: u64 = side["throughput"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert!(series <= len, "{role}: the series counts {series} bytes");
        assert!(side["seconds"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(
        read_json(&tx_json)["sides"][0]["connections"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn stats_json_is_written_when_the_run_fails() {
    let path = stats_path("failed.json");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let args = [
        "tx",
        "127.0.0.1",
        &dead,
        "--reconnect-timeout",
        "1",
        "--stats-json",
        path.to_str().unwrap(),
    ];
    let mut t = tx(&args, Arc::new(b"x".to_vec()));
    assert_eq!(t.wait(DEADLINE).code(), Some(1));
    let doc = read_json(&path);
    assert_eq!(
        (doc["exit_code"].as_u64(), doc["status"].as_str()),
        (Some(1), Some("failed"))
    );
    assert!(
        doc["error"].as_str().unwrap().contains("giving up"),
        "{doc}"
    );
}

#[test]
fn progress_lines_on_a_non_terminal_stderr_never_touch_stdout() {
    let (mut r, port) = rx(&["--progress"]);
    let p = port.to_string();
    let input = Arc::new(data(5 << 20, 42));
    // About 2.5 s at 2 MiB/s: at least one periodic line and the last one.
    let args = [
        "tx",
        "127.0.0.1",
        &p,
        "--progress",
        "--size",
        "5M",
        "--rate",
        "2M",
        "--foot-size",
        "256K",
    ];
    let mut t = tx(&args, Arc::clone(&input));
    expect_delivered(&mut t, &mut r, &input, "with progress");
    let err = t.stderr();
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("viamillipede: delivered "))
        .collect();
    assert!(lines.len() >= 2, "too few progress lines:\n{err}");
    assert!(
        lines[0].contains('%') && lines[0].contains("ETA"),
        "{}",
        lines[0]
    );
    assert!(lines.last().unwrap().contains("100%"), "{err}");
    r.expect_stderr("viamillipede: written 5.0 MiB");
}

/// Sends `input` with --compress, returning (payload bytes, wire bytes) as
/// tx's stats document counts them.
fn compressed_transfer(input: Vec<u8>, name: &str) -> (u64, u64) {
    let path = stats_path(name);
    let tx_words = [
        "threads",
        "3",
        "--compress",
        "--stats-json",
        path.to_str().unwrap(),
    ];
    transfer(input, &tx_words, &[]);
    let side = read_json(&path)["sides"][0].clone();
    (
        side["payload_bytes"].as_u64().unwrap(),
        side["wire_bytes"].as_u64().unwrap(),
    )
}

#[test]
fn compression_shrinks_what_shrinks_and_sends_the_rest_as_it_is() {
    let text: Vec<u8> = (0..200_000)
        .flat_map(|i| {
            format!("line {i}: the quick brown fox jumps over the lazy dog\n").into_bytes()
        })
        .collect();
    let (payload, wire) = compressed_transfer(text, "text.json");
    eprintln!("compressible: {payload} bytes took {wire} on the wire");
    assert!(
        wire * 5 < payload,
        "text compressed only to {wire} of {payload}"
    );

    let (payload, wire) = compressed_transfer(data(6 * FOOT, 43), "random.json");
    eprintln!("random: {payload} bytes took {wire} on the wire");
    assert!(
        wire >= payload && wire < payload + 1024,
        "random data: {wire} on the wire for {payload}"
    );
}
