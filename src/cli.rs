//! The command line: the original tool's keyword grammar and dashed long
//! options, both turned into one [`Config`].
//!
//! The legacy words (`rx 8834 threads 4`) are rewritten into their dashed
//! twins (`--rx 8834 --threads 4`) before clap sees them, so both spellings
//! share one definition, one validation and one `--help`.

// The options' doc comments are clap's help text, written for a terminal:
// `[V6ADDR]:PORT` there is not a link.
#![allow(rustdoc::broken_intra_doc_links)]

use crate::config::{self, Config, Destination, Mode, Pacing, SocketOptions, Tunnel};
use crate::crypto::Key;
use crate::error::Error;
use crate::protocol::{MAX_FOOT, MAX_WINDOW};
use clap::{CommandFactory, Parser};
use std::ffi::OsString;
use std::time::Duration;

/// The one-line hint printed after a usage error.
pub const USAGE_HINT: &str =
    "usage: viamillipede rx [ADDR:]PORT | tx HOST PORT [tx HOST PORT ...] [threads N] [verbose N] | ssh HOST [OPTIONS] -- COMMAND | relay PORT tx HOST PORT | ctl PATH COMMAND (see --help)";

/// The forms of the command line, for `--help` and the man page.
const USAGE: &str = "\
viamillipede rx [ADDR:]PORT [OPTIONS] > OUTPUT
       viamillipede tx HOST PORT [tx HOST PORT]... [OPTIONS] < INPUT
       viamillipede ssh [--pull] HOST [OPTIONS] -- COMMAND...
       viamillipede tx --listen [ADDR:]PORT [OPTIONS] < INPUT
       viamillipede rx --connect HOST:PORT [OPTIONS] > OUTPUT
       viamillipede relay PORT [OPTIONS] tx HOST PORT... [OPTIONS] (see relay --help)
       viamillipede ctl PATH COMMAND (see ctl --help)
       viamillipede --genkey FILE | --completions SHELL";

const ABOUT: &str = "A fast, resilient pipe over many TCP connections.";

const LONG_ABOUT: &str = "\
A fast, resilient, network-transparent pipe over many TCP connections.

tx reads stdin, cuts it into numbered feet (2 MiB by default; smaller pieces
on a connection that has shown it carries less) and sends them over many TCP
connections to one or more ranked destinations; rx accepts the connections,
puts the feet back in order and writes them to stdout. Feet that a dropped or
stalled connection did not get acknowledged are sent again on another one.
Both sides exit 0 only when every byte has been written by the receiver.

The original keyword grammar works verbatim, words in any order:
  rx PORT, tx HOST PORT (repeatable), threads N, verbose N, checkphrase XXXX.
Each keyword also has a dashed long form: --rx, --tx HOST:PORT, --threads, ...

Memory: tx holds at most (window + 2) feet; rx holds at most
(window + 2 + connections) feet: 132 MiB and 164 MiB with the defaults, plus a
few MiB for the program itself.

Send SIGUSR1 (or SIGINFO, where the system has it) to either side for a
report of every connection on stderr; SIGINT or SIGTERM stops cleanly.";

/// Examples, for `--help` and the man page.
pub const EXAMPLES: &str = "\
Examples:
  Both ends from one command, over ssh (viamillipede on both hosts):
    zfs send -R pool/fs@snap | viamillipede ssh backup -- zfs recv -F tank/fs
    viamillipede ssh --pull backup -- zfs send tank/fs@snap | zfs recv pool/fs

  Simple operation:
    viamillipede rx 8834 > /tmp/despair
    cat /tmp/Osymandias | viamillipede tx host1.yoyodyne.com 8834

  zfs send and receive over 16 connections:
    zfs send dozer/visage | viamillipede tx foriegn.shore.net 8834 threads 16
    viamillipede rx 8834 | zfs recv trinity/destset

  Ranked links: fill the first, spill over to the next when it is saturated:
    viamillipede tx host1.40g-infiniband.yoyodyne.com 9090 \\
                 tx host1.internal10g.yoyodyne.com 9090 \\
                 tx host1.expensive-last-resort.yoyodyne.com 9090 < data

  A two-way pipe, sending what is typed at once (charmode):
    viamillipede rx 7788 tx host2 9900 charmode      (on host1)
    viamillipede rx 9900 tx host1 7788 charmode      (on host2)

  Tunnel ssh from port 9022 on host1 to port 22 on host2, then
  ssh -p 9022 localhost on host1:
    viamillipede rx 7788 tx host2 9900 terminate 9022         (on host1)
    viamillipede rx 9900 tx host1 7788 initiate localhost 22  (on host2)

  Test a path without disks: a pseudo-random stream of 500 feet, checked
  on arrival, with per-foot checksums; or both ends in one process:
    viamillipede rx 3434 prbs 0xd00f > /dev/null
    viamillipede tx host 3434 prbs 0xd00f leglimit 500 checksums
    viamillipede prbs 0xd00f tx localhost 3434 rx 3434 leglimit 50 > /dev/null

  Cut a connection every 1731 feet (fault injection); guard against a
  stale receiver with a checkphrase; log more:
    viamillipede rx 12334 checkphrase wat! verbose 5 > out
    viamillipede tx localhost 12334 chaos 1731 checkphrase wat! < in

  Pace the sender: wait 1 ms before each foot, or cap it at 50 MiB/s:
    viamillipede tx host 8834 delayus 1000 < in
    viamillipede tx host 8834 --rate 50M < in

  With a pre-shared key (copy the file to both hosts) and encryption:
    viamillipede --genkey key
    viamillipede rx 8834 --key-file key > out
    viamillipede tx host 8834 --key-file key --encrypt < in

  Dashed options, on any free port printed by rx:
    viamillipede --rx 0 > out
    viamillipede --tx host:PORT --threads 4 --checkphrase abcd < in
";

/// What the signals do, for `--help` and the man page.
pub const SIGNALS: &str = "\
SIGUSR1 (SIGINFO, ^T, where the system has it) prints a report of every
connection on stderr; SIGUSR2 cycles the log level (warn, info, debug,
trace); SIGINT and SIGTERM stop cleanly: the other side is told why, and a
receiver finishes the foot it is writing. A second SIGINT or SIGTERM exits at
once (when the program reading the output has stopped reading, say).
`viamillipede ctl PATH stop` on a --control socket stops as SIGINT does.";

/// The exit statuses, for `--help` and the man page.
pub const EXIT_STATUS: &str = "\
0 when every byte was written by the receiver (with ssh: and the far command
exited 0); 1 when the transfer failed, with the reason on stderr; 2 for a bad
command line or an unusable key file; 128 + N when stopped by signal N (130
for SIGINT, 143 for SIGTERM).";

/// The files it reads and writes, for the man page.
pub const FILES: &str = "\
--key-file FILE (or VIAMILLIPEDE_KEY_FILE): the pre-shared key, 32 random bytes
or 64 hex digits, readable by its owner only; --genkey FILE writes one.
--stats-json FILE: written at exit whatever the outcome (checked at start).
--control PATH: a Unix socket (mode 600) served while running, removed at exit.
~/.ssh/config and the ssh client's other files: used by viamillipede ssh
through the system's ssh.";

/// The stats document's schema, for the man page.
pub const STATS_SCHEMA: &str = r#"{ "schema": "viamillipede-stats/1", "exit_code": 0, "status": "ok" | "failed",
  "error": null | "why it failed",
  "sides": [ { "role": "tx" | "rx",
               "payload_bytes": N, "wire_bytes": N, "seconds": S,
               "feet": N, "retransmits": N, "reconnects": N,
               "throughput": [bytes in second 1, second 2, ...],
               "connections": [ { "peer": "...", "bytes": N, "wire_bytes": N,
                                  "feet": N, "reconnects": N } ] } ] }
Fields are only ever added; a run with both rx and tx has two sides."#;

/// After `--help`'s options: the examples, the signals and the exit status.
fn after_help() -> String {
    format!("{EXAMPLES}\n\nSignals:\n{SIGNALS}\n\nExit status:\n{EXIT_STATUS}")
}

/// The dashed command-line definition.
#[derive(Parser, Debug)]
#[command(name = "viamillipede", version, about = ABOUT, long_about = LONG_ABOUT,
          after_help = after_help(), override_usage = USAGE)]
pub struct Cli {
    /// Receive: listen on [ADDR:]PORT (all addresses, IPv6 and IPv4, when ADDR
    /// is left out; port 0 picks a free port and prints it) and write the
    /// stream to stdout. Legacy form: `rx PORT`.
    #[arg(long, value_name = "[ADDR:]PORT")]
    pub rx: Option<String>,

    /// Transmit stdin to HOST:PORT ([V6ADDR]:PORT for IPv6). Repeat for ranked
    /// destinations: the first is filled, the next is used only when the ones
    /// before it are saturated. Legacy form: `tx HOST PORT`.
    #[arg(long, value_name = "HOST:PORT")]
    pub tx: Vec<String>,

    /// Connections (worker threads) per destination, 1 to 64; or auto (tx):
    /// start with 4 per destination, and double them while the delivery
    /// rate grows by 15% or more with each doubling, up to 64 (rx's memory
    /// bound grows with the connections, see above).
    #[arg(long, value_name = "N|auto", default_value = "16", value_parser = parse_threads)]
    pub threads: u16,

    /// Log verbosity 0 to 20: 0 warnings and errors, 1 connections and a
    /// summary at exit, 2 debug, 3 and up trace. RUST_LOG overrides it.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = |s: &str| number::<u8>(s, 0, 20))]
    pub verbose: u8,

    /// A 4-byte phrase both sides must give alike; a sender with another
    /// phrase is refused.
    #[arg(long, value_name = "XXXX", value_parser = parse_checkphrase)]
    pub checkphrase: Option<[u8; 4]>,

    /// Foot size in bytes, 1K to 64M; set on tx. Sizes here and below take
    /// fractions and units: K, M, G (and KiB, MiB, GiB) are powers of 1024,
    /// KB, MB, GB powers of 1000: 512K, 1.5G, 100MB.
    #[arg(long, value_name = "BYTES", default_value = "2M", value_parser = parse_foot_size)]
    pub foot_size: u32,

    /// Feet (of bytes) tx may run ahead of what rx has written; bounds both
    /// sides' memory (see above).
    #[arg(long, value_name = "FEET", default_value_t = config::DEFAULT_WINDOW,
          value_parser = |s: &str| number::<u32>(s, 2, u64::from(MAX_WINDOW)))]
    pub window: u32,

    /// Feet one connection may have unacknowledged before it is given
    /// another (more while they are less than a second of what it
    /// delivers): a faster connection is acknowledged sooner and carries more.
    #[arg(long, value_name = "FEET", default_value_t = config::DEFAULT_INFLIGHT,
          value_parser = |s: &str| number::<u32>(s, 1, 64))]
    pub inflight: u32,

    /// Seconds to keep trying when no connection to the peer can be
    /// (re)established, or (tx) connections are made but nothing is
    /// delivered, then give up with exit status 1. rx waits without limit
    /// for the first sender, and applies this once a stream started.
    #[arg(long, value_name = "SECS", default_value_t = config::DEFAULT_RECONNECT.as_secs(),
          value_parser = |s: &str| number::<u64>(s, 1, 86_400 * 365))]
    pub reconnect_timeout: u64,

    /// tx: send a pseudo-random stream from SEED instead of stdin (until
    /// leglimit, or forever). rx: check the stream against SEED's, report the
    /// first byte that differs and exit 1 if any did (still writing it all).
    /// A disk-free test of a path: `tx host 8834 prbs 7 leglimit 500`.
    #[arg(long, value_name = "SEED", value_parser = parse_seed)]
    pub prbs: Option<u64>,

    /// Stop after N feet (tx).
    #[arg(long, value_name = "N", value_parser = |s: &str| number::<u64>(s, 1, u64::MAX))]
    pub leglimit: Option<u64>,

    /// Wait N microseconds before each foot (tx).
    #[arg(long, value_name = "N")]
    pub delayus: Option<u64>,

    /// Cap tx's sending rate, in bytes per second (50M, 10MB).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub rate: Option<u64>,

    /// Send what has been read at once, without waiting to fill a foot:
    /// for interactive use (tx). Without it, feet stay full-size.
    #[arg(long)]
    pub charmode: bool,

    /// Fault injection (tx): every N-th foot sent, the connection carrying
    /// it is cut in the middle of the foot. The output stays exact; the run
    /// reports how many faults it injected. N is at least 2.
    #[arg(long, value_name = "N", value_parser = |s: &str| number::<u64>(s, 2, u64::MAX))]
    pub chaos: Option<u64>,

    /// Tunnel (with rx and tx): accept one TCP connection on PORT and carry
    /// it over the two-way pipe, both directions, EOF passed through. The
    /// other end gives --initiate.
    #[arg(long, value_name = "PORT", conflicts_with = "initiate")]
    pub terminate: Option<u16>,

    /// Tunnel (with rx and tx): connect to HOST:PORT and carry that
    /// connection over the two-way pipe. The other end gives --terminate.
    #[arg(long, value_name = "HOST:PORT")]
    pub initiate: Option<String>,

    /// Check every foot with an xxh3 checksum before it is written (a
    /// mismatch drops the connection and the foot is sent again). Either
    /// side asking is enough. At exit (verbose 1) rx prints a digest of the
    /// whole stream, and so does tx when it was given checksums, to compare.
    #[arg(long, alias = "checksum")]
    pub checksums: bool,

    /// Send every connection from this local address (tx), pinning the
    /// traffic to an interface; `--tx HOST:PORT@ADDR` sets it per destination.
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<std::net::IpAddr>,

    /// Socket send buffer in bytes (256K, 4M); the kernel autotunes it
    /// when unset.
    #[arg(long, value_name = "BYTES", value_parser = parse_buffer)]
    pub sndbuf: Option<usize>,

    /// Socket receive buffer in bytes (256K, 4M); the kernel autotunes
    /// it when unset.
    #[arg(long, value_name = "BYTES", value_parser = parse_buffer)]
    pub rcvbuf: Option<usize>,

    /// Disable Nagle's algorithm on every connection.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub nodelay: bool,

    /// TCP congestion control for every connection (Linux), e.g. bbr or
    /// cubic; refused at start if the kernel does not allow it.
    #[arg(long, value_name = "ALGO")]
    pub cc: Option<String>,

    /// A file holding a pre-shared key, given on both sides: 32 random bytes
    /// (or 64 hex digits; a final line ending is ignored), never a
    /// passphrase. Both ends of every connection then prove the key before
    /// any foot is accepted, and every frame is authenticated; the key never
    /// crosses the wire. Make one with: viamillipede --genkey FILE
    #[arg(long, value_name = "FILE", env = "VIAMILLIPEDE_KEY_FILE")]
    pub key_file: Option<std::path::PathBuf>,

    /// Also encrypt every frame (AES-256-GCM, keys derived per connection
    /// from the key file and fresh nonces). Needs --key-file; either side
    /// asking is enough.
    #[arg(long)]
    pub encrypt: bool,

    /// Send the feet's bytes as UDP datagrams (tx), paced at the rate the
    /// path delivers and with only lost ranges sent again: for long paths
    /// with random loss, where TCP's congestion control collapses. The TCP
    /// connections stay for the handshake, acknowledgements and the end of
    /// the stream; rx needs no option (it opens UDP on its TCP port number
    /// when asked), but its firewall must let UDP to that port in.
    /// Keys, --encrypt (AES-GCM per datagram), checksums and compression
    /// work as over TCP.
    #[arg(long)]
    pub udp: bool,

    /// With --udp: the largest datagram (UDP payload bytes, 512 to 65507)
    /// to send, when it must be smaller than the route's MTU allows: a
    /// tunnel on the way that drops what does not fit instead of saying so.
    /// Default: the route MTU as the kernel knows it (1472 on Ethernet).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(512..=65507))]
    pub datagram_size: Option<u16>,

    /// Compress each foot with zstd (tx), on the worker threads in parallel;
    /// a foot that does not shrink is sent as it is, and rx decompresses on
    /// its own. LEVEL -7 (fastest) to 19, 3 when left out: --compress or
    /// --compress=9.
    #[arg(long, value_name = "LEVEL", num_args = 0..=1, require_equals = true,
          default_missing_value = "3", value_parser = compress_level)]
    pub compress: Option<i32>,

    /// Show progress on stderr: bytes written by the receiver (and, on tx,
    /// those on their way), rate, elapsed time, and percent and ETA when the
    /// size is known (--size, or stdin is a file or a block device);
    /// redrawn in place on a terminal, a line every 2 s otherwise. Never on
    /// stdout.
    #[arg(long)]
    pub progress: bool,

    /// The expected size of the stream in bytes (1.5G, 700MB), for
    /// --progress's percent and ETA.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,

    /// At exit, write a JSON document of what each side did to FILE: bytes
    /// on and off the wire, seconds, feet, retransmits, reconnects, each
    /// connection, a one-second throughput series and the exit status
    /// (schema in README).
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<std::path::PathBuf>,

    /// Serve a control socket at PATH (a Unix socket, mode 600) while
    /// running: `viamillipede ctl PATH status` prints the live status as
    /// JSON (exit 0 when healthy, 1 when degraded); on the sender, `add`,
    /// `drain`, `undrain`, `threads` and `rate` change its destinations
    /// while the stream goes on; `stop` stops as SIGINT does.
    #[arg(long, value_name = "PATH")]
    pub control: Option<std::path::PathBuf>,

    /// Reverse connections, sending side: listen on [ADDR:]PORT and let the
    /// receiver connect (through a firewall or NAT that only lets the
    /// receiver's side dial out). Replaces `tx HOST PORT`.
    #[arg(long, value_name = "[ADDR:]PORT")]
    pub listen: Option<String>,

    /// Reverse connections, receiving side: connect to a sender started
    /// with --listen, `threads` connections to each HOST:PORT; repeat for
    /// ranked paths, as with tx. Replaces `rx PORT`.
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: Vec<String>,

    /// Print a completion script for this shell and exit, e.g.
    /// `viamillipede --completions bash > /etc/bash_completion.d/viamillipede`.
    #[arg(long, value_name = "SHELL")]
    pub completions: Option<clap_complete::Shell>,

    /// Write a new random key to FILE (mode 600; never over an existing
    /// file) and exit; copy it to the other host and give both sides
    /// --key-file FILE.
    #[arg(long, value_name = "FILE")]
    pub genkey: Option<std::path::PathBuf>,

    /// The stream's name (tx), told to the receiver: 1 to 128 letters,
    /// digits and . _ - + : @ /, not starting with - . or /. A receiver with
    /// --exec gives it to the command as $VIAMILLIPEDE_NAME.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// Serve many senders at once (rx): run COMMAND (with /bin/sh -c) once
    /// per incoming stream, the stream's bytes on its stdin and its sender's
    /// --name in $VIAMILLIPEDE_NAME (empty without one), never spliced into
    /// the command's text; also $VIAMILLIPEDE_SESSION and
    /// $VIAMILLIPEDE_PEER. A sender is told its stream is complete only once
    /// its command read it all and exited 0; a stream that fails has its
    /// command's process group sent SIGTERM (SIGKILL 5 s later) before its
    /// stdin closes. Each start and end is told on stderr. Runs until SIGINT or
    /// SIGTERM; without --exec rx writes one stream to stdout, refusing
    /// others as busy. Example: rx 8834 --exec 'zfs recv -F "tank/$VIAMILLIPEDE_NAME"'
    #[arg(long, value_name = "COMMAND")]
    pub exec: Option<String>,

    /// With --exec: streams served at once (default 8); a sender beyond
    /// them is refused as busy.
    #[arg(long, value_name = "N", value_parser = |s: &str| number::<usize>(s, 1, 4096))]
    pub max_flows: Option<usize>,

    /// With --exec: what the streams served at once may hold in memory
    /// together, counted as each stream's (window + 2) feet; a new stream
    /// that does not fit is refused as busy. Default 2G.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub max_memory: Option<u64>,

    /// Seconds a new connection has to complete its handshake.
    #[arg(long, value_name = "SECS", default_value_t = config::HANDSHAKE_TIMEOUT.as_secs(),
          value_parser = |s: &str| number::<u64>(s, 1, 3600))]
    pub handshake_timeout: u64,
}

fn parse_name(s: &str) -> Result<String, String> {
    crate::protocol::check_name(s).map(|()| s.to_string())
}

fn parse_checkphrase(s: &str) -> Result<[u8; 4], String> {
    s.as_bytes()
        .try_into()
        .map_err(|_| format!("checkphrase must be exactly 4 bytes, '{s}' has {}", s.len()))
}

fn compress_level(s: &str) -> Result<i32, String> {
    let n: i32 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    match n {
        -7..=19 => Ok(n),
        _ => Err(format!("{n} is out of range: give -7 to 19")),
    }
}

/// `threads N` or `threads auto` (0 here).
fn parse_threads(s: &str) -> Result<u16, String> {
    match s.trim() {
        "auto" => Ok(0),
        n => number::<u16>(n, 1, 64).map_err(|e| format!("{e}, or auto")),
    }
}

/// A whole number from `lo` to `hi`, with a message that says so.
fn number<T: TryFrom<u64>>(s: &str, lo: u64, hi: u64) -> Result<T, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    if n < lo || n > hi {
        return Err(match hi {
            u64::MAX => format!("{n} is too small: give {lo} or more"),
            _ => format!("{n} is out of range: give {lo} to {hi}"),
        });
    }
    T::try_from(n).map_err(|_| format!("{n} is too large"))
}

/// Parses a byte count: a number (a fraction too: `1.5G`) with an
/// optional unit. K, M, G and T are powers of 1024, as are KiB, MiB, GiB and
/// TiB; KB, MB, GB and TB are powers of 1000. Case does not matter.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || {
        format!(
            "'{s}' is not a size: a number with an optional unit (K, M, G, T: powers of 1024, as KiB, MiB, GiB; KB, MB, GB: powers of 1000)"
        )
    };
    let unit: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let too_large = || format!("'{s}' is too large");
    if digits.contains('.') {
        let f: f64 = digits.parse().map_err(|_| bad())?;
        let n = (f * unit as f64).round();
        if !n.is_finite() || n >= u64::MAX as f64 {
            return Err(too_large());
        }
        Ok(n as u64)
    } else {
        let n: u64 = digits.parse().map_err(|_| bad())?;
        n.checked_mul(unit).ok_or_else(too_large)
    }
}

/// A seed in decimal or, as the original tool's examples give it, hex
/// (`0xd00f`).
fn parse_seed(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("'{s}' is not a seed (a number, decimal or 0x hex)"))
}

fn parse_buffer(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    if !(4096..=1 << 30).contains(&n) {
        return Err(format!(
            "a socket buffer must be between 4K and 1G, not {s}"
        ));
    }
    Ok(n as usize)
}

fn parse_ip(s: &str, what: &str) -> Result<std::net::IpAddr, Error> {
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| Error::Usage(format!("'{s}' in {what} is not an IP address")))
}

/// A rate in bytes per second, as `--rate` takes it (`10M`).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("the rate must be above 0".into()),
        n => Ok(n),
    }
}

fn parse_foot_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    if !(1024..=u64::from(MAX_FOOT)).contains(&n) {
        return Err(format!("foot size must be between 1K and 64M, not {s}"));
    }
    Ok(n as u32)
}

/// Whether `word` is one of the original keywords (`threads`, `tx`, ...).
pub fn is_keyword(word: &str) -> bool {
    legacy_arity(word).is_some()
}

/// How many values each legacy keyword takes.
fn legacy_arity(word: &str) -> Option<usize> {
    Some(match word {
        "charmode" | "checksums" | "checksum" => 0,
        "rx" | "threads" | "verbose" | "checkphrase" | "prbs" | "leglimit" | "delayus"
        | "chaos" | "terminate" => 1,
        "tx" | "initiate" => 2,
        _ => return None,
    })
}

/// Rewrites legacy keywords into dashed options, leaving everything else as
/// it is.
pub fn normalize(args: impl IntoIterator<Item = OsString>) -> Result<Vec<OsString>, Error> {
    let mut args = args.into_iter();
    let mut out: Vec<OsString> = args.next().into_iter().collect();
    let words: Vec<OsString> = args.collect();
    let mut i = 0;
    while i < words.len() {
        let word = words[i].to_string_lossy();
        let Some(arity) = legacy_arity(&word) else {
            out.push(words[i].clone());
            i += 1;
            continue;
        };
        let values = &words[i + 1..];
        let first = values.first().map(|v| v.to_string_lossy());
        // `tx --listen PORT` and `rx --connect HOST:PORT`, as the reverse
        // mode reads: the keyword is only a label there.
        if (word == "tx" && first.as_ref().is_some_and(|v| v.starts_with("--listen")))
            || (word == "rx" && first.as_ref().is_some_and(|v| v.starts_with("--connect")))
        {
            i += 1;
            continue;
        }
        if arity == 2 {
            one_word_destination(&word, values)?;
        }
        if values.len() < arity {
            let need = if arity == 2 { "HOST PORT" } else { "a value" };
            return Err(Error::Usage(format!("'{word}' needs {need}")));
        }
        out.push(format!("--{word}").into());
        if arity == 2 {
            let host = values[0].to_string_lossy();
            let port = values[1].to_string_lossy();
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host.into()
            };
            out.push(format!("{host}:{port}").into());
        } else if arity == 1 {
            out.push(values[0].clone());
        }
        i += 1 + arity;
    }
    Ok(out)
}

/// Whether `s` is a port number.
fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// `tx host:8834` (the keyword takes two words) gets the right spelling.
fn one_word_destination(word: &str, values: &[OsString]) -> Result<(), Error> {
    let host = values.first().map(|v| v.to_string_lossy());
    let port_follows = values.get(1).is_some_and(|v| is_port(&v.to_string_lossy()));
    let Some((h, p)) = host.as_deref().and_then(|h| h.rsplit_once(':')) else {
        return Ok(());
    };
    if !port_follows && !h.contains(':') && !h.is_empty() && is_port(p) {
        return Err(Error::Usage(format!(
            "'{word}' takes the host and the port as two words: {word} {h} {p} (or --{word} {h}:{p})"
        )));
    }
    Ok(())
}

/// `--tx host 8834` (the dashed option takes one word) gets the right
/// spelling.
fn two_word_destination(words: &[OsString]) -> Result<(), Error> {
    for pair in words.windows(3) {
        let [opt, host, port] = pair else { continue };
        let opt = opt.to_string_lossy();
        let (host, port) = (host.to_string_lossy(), port.to_string_lossy());
        if matches!(opt.as_ref(), "--tx" | "--connect" | "--initiate")
            && !host.contains(':')
            && !host.starts_with('-')
            && is_port(&port)
        {
            let keyword = opt.trim_start_matches('-');
            let keyword = if keyword == "connect" {
                "--connect"
            } else {
                keyword
            };
            return Err(Error::Usage(format!(
                "{opt} takes HOST:PORT as one word: {opt} {host}:{port} (or {keyword} {host} {port})"
            )));
        }
    }
    Ok(())
}

/// The original keywords, as the command line, the typo hints and the
/// completion scripts know them.
pub const KEYWORDS: [&str; 13] = [
    "rx",
    "tx",
    "threads",
    "verbose",
    "checkphrase",
    "prbs",
    "leglimit",
    "delayus",
    "chaos",
    "terminate",
    "initiate",
    "charmode",
    "checksums",
];

/// The candidate nearest to `word` by Jaro-Winkler similarity, if any is
/// above `threshold`: the hint for a typo.
pub fn nearest<'a>(word: &str, candidates: &[&'a str], threshold: f64) -> Option<&'a str> {
    candidates
        .iter()
        .map(|&c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > threshold)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn parse_port(s: &str, what: &str) -> Result<u16, Error> {
    s.parse().map_err(|_| {
        Error::Usage(format!(
            "invalid port '{s}' in {what} (expected 0 to 65535)"
        ))
    })
}

/// Parses rx's `[ADDR:]PORT`.
fn parse_listen(rx: &str) -> Result<(Option<String>, u16), Error> {
    if rx.bytes().all(|b| b.is_ascii_digit()) {
        Ok((None, parse_port(rx, "rx")?))
    } else {
        let (addr, port) = split_host_port(rx, "rx")?;
        Ok((Some(addr), port))
    }
}

/// Splits `HOST:PORT` or `[V6]:PORT`.
fn split_host_port(s: &str, what: &str) -> Result<(String, u16), Error> {
    let bad = || Error::Usage(format!("'{s}' in {what} is not HOST:PORT"));
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
        (host, port)
    } else {
        s.rsplit_once(':').ok_or_else(bad)?
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), parse_port(port, what)?))
}

impl Cli {
    /// Validates the combination of options into a [`Config`].
    pub fn into_config(self) -> Result<Config, Error> {
        let listen = self.rx.as_deref().map(parse_listen).transpose()?;
        let destinations = self
            .tx
            .iter()
            .map(|t| {
                // HOST:PORT@LOCAL sends from a local address of its own.
                let (t, local) = match t.rsplit_once('@') {
                    Some((t, local)) => (t, Some(parse_ip(local, "tx")?)),
                    None => (t.as_str(), self.bind),
                };
                let (host, port) = split_host_port(t, "tx")?;
                if port == 0 {
                    return Err(Error::Usage(format!(
                        "port 0 in tx '{t}': give the port rx listens on"
                    )));
                }
                Ok(Destination { host, port, local })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let reverse = self.listen.is_some() || !self.connect.is_empty();
        if reverse && (listen.is_some() || !destinations.is_empty()) {
            return Err(Error::Usage(
                "--listen (tx) and --connect (rx) reverse the connections: give them instead of rx PORT and tx HOST PORT".into(),
            ));
        }
        if self.listen.is_some() && !self.connect.is_empty() {
            return Err(Error::Usage(
                "--listen is for the sending side and --connect for the receiving side: give one"
                    .into(),
            ));
        }
        if let Some(l) = &self.listen {
            let (addr, port) = parse_listen(l)?;
            return self.finish_config(Mode::TxListen { addr, port });
        }
        if !self.connect.is_empty() {
            let destinations = self
                .connect
                .iter()
                .map(|c| {
                    let (host, port) = split_host_port(c, "connect")?;
                    Ok(Destination {
                        host,
                        port,
                        local: self.bind,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            return self.finish_config(Mode::RxConnect { destinations });
        }
        let mode = match (listen, destinations.is_empty()) {
            (None, true) => {
                return Err(Error::Usage(
                    "nothing to do: give 'rx PORT' to receive or 'tx HOST PORT' to send".into(),
                ))
            }
            (Some((addr, port)), true) => Mode::Rx { addr, port },
            (None, false) => Mode::Tx { destinations },
            (Some((addr, port)), false) => Mode::Duplex {
                addr,
                port,
                destinations,
                tunnel: None,
            },
        };
        let tunnel = match (self.terminate, &self.initiate) {
            (Some(port), _) => Some(Tunnel::Terminate(port)),
            (None, Some(dest)) => {
                let (host, port) = split_host_port(dest, "initiate")?;
                Some(Tunnel::Initiate(Destination::new(host, port)))
            }
            (None, None) => None,
        };
        let mode = match (mode, tunnel) {
            (
                Mode::Duplex {
                    addr,
                    port,
                    destinations,
                    ..
                },
                tunnel,
            ) => Mode::Duplex {
                addr,
                port,
                destinations,
                tunnel,
            },
            (_, Some(_)) => {
                return Err(Error::Usage(
                    "a tunnel (terminate/initiate) runs over a two-way pipe: give both rx PORT and tx HOST PORT".into(),
                ))
            }
            (mode, None) => mode,
        };
        self.finish_config(mode)
    }

    /// The options every mode shares.
    fn finish_config(self, mode: Mode) -> Result<Config, Error> {
        let mut warnings = Vec::new();
        let key = match &self.key_file {
            Some(path) => {
                let (key, warning) = Key::load(path)?;
                warnings.extend(warning);
                Some(key)
            }
            None => None,
        };
        if self.encrypt && key.is_none() {
            return Err(Error::Usage(
                "--encrypt needs a key: give --key-file FILE".into(),
            ));
        }
        if let Some(cc) = &self.cc {
            crate::net::check_cc(cc).map_err(Error::Usage)?;
        }
        if let Some(path) = &self.stats_json {
            // Found out now, not after the whole transfer.
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(|e| Error::Usage(format!("--stats-json {}: {e}", path.display())))?;
        }
        if self.exec.is_some() && !matches!(mode, Mode::Rx { .. }) {
            return Err(Error::Usage(
                "--exec serves many senders on a listening receiver: give it with rx PORT alone (not with tx, --connect or --listen)".into(),
            ));
        }
        if self.exec.is_none() && (self.max_flows.is_some() || self.max_memory.is_some()) {
            return Err(Error::Usage(
                "--max-flows and --max-memory limit the streams of --exec: give --exec COMMAND too"
                    .into(),
            ));
        }
        if self.exec.is_some() && key.is_none() {
            warnings.push(
                "--exec without --key-file: anyone who can reach this port can start the command with a stream of their own".into(),
            );
        }
        if self.exec.is_some() && (self.progress || self.stats_json.is_some()) {
            warnings.push(
                "--progress and --stats-json follow one stream: with --exec, each stream's start and end are told on stderr instead".into(),
            );
        }
        let ignored = self.ignored_by(&mode);
        let dialing_rx = matches!(mode, Mode::RxConnect { .. });
        if self.threads == 0 && dialing_rx {
            warnings.push(format!(
                "threads auto is found by the sender: a receiver that connects uses {}",
                config::DEFAULT_THREADS
            ));
        }
        let (threads, auto_threads) = match (self.threads, dialing_rx) {
            (0, true) => (config::DEFAULT_THREADS, false),
            (0, false) => (config::AUTO_MAX_THREADS, true),
            (n, _) => (n, false),
        };
        Ok(Config {
            ignored,
            display: crate::monitor::Display {
                progress: self.progress,
                size: self.size,
            },
            stats_json: self.stats_json,
            control: self.control,
            controls: None,
            compress: self.compress,
            socket: SocketOptions {
                sndbuf: self.sndbuf,
                rcvbuf: self.rcvbuf,
                nodelay: self.nodelay,
                cc: self.cc,
            },
            key,
            encrypt: self.encrypt,
            udp: self.udp,
            datagram_size: self.datagram_size.map(usize::from),
            warnings,
            prbs: self.prbs,
            checksums: self.checksums,
            chaos: self.chaos,
            pacing: Pacing {
                charmode: self.charmode,
                leglimit: self.leglimit,
                delay: self.delayus.map(Duration::from_micros),
                rate: self.rate,
            },
            local_receiver: None,
            events: None,
            name: self.name,
            exec: self.exec,
            max_flows: self.max_flows.unwrap_or(config::DEFAULT_MAX_FLOWS),
            max_memory: self.max_memory.unwrap_or(config::DEFAULT_MAX_MEMORY),
            mode,
            threads,
            auto_threads,
            verbose: self.verbose,
            checkphrase: self.checkphrase.unwrap_or(*b"\0\0\0\0"),
            foot_size: self.foot_size,
            window: self.window,
            inflight: self.inflight,
            reconnect_timeout: Duration::from_secs(self.reconnect_timeout),
            handshake_timeout: Duration::from_secs(self.handshake_timeout),
        })
    }
}

impl Cli {
    /// The options given that mean nothing in `mode` (the sender's, given
    /// to a receiver).
    fn ignored_by(&self, mode: &Mode) -> Vec<&'static str> {
        let rx = matches!(mode, Mode::Rx { .. });
        if !rx && !matches!(mode, Mode::RxConnect { .. }) {
            return Vec::new();
        }
        [
            ("--compress", self.compress.is_some()),
            ("--rate", self.rate.is_some()),
            ("leglimit", self.leglimit.is_some()),
            ("delayus", self.delayus.is_some()),
            ("charmode", self.charmode),
            ("chaos", self.chaos.is_some()),
            ("--foot-size", self.foot_size != config::DEFAULT_FOOT),
            ("--inflight", self.inflight != config::DEFAULT_INFLIGHT),
            ("threads", rx && self.threads != config::DEFAULT_THREADS),
            ("--bind", rx && self.bind.is_some()),
            ("--udp", self.udp),
            ("--datagram-size", self.datagram_size.is_some()),
            ("--name", self.name.is_some()),
        ]
        .into_iter()
        .filter(|(_, given)| *given)
        .map(|(name, _)| name)
        .collect()
    }
}

/// The warning for options that mean nothing on this side.
pub fn ignored_warning(names: &[&str]) -> Option<String> {
    let (verb, them) = match names.len() {
        0 => return None,
        1 => ("means", "it"),
        _ => ("mean", "them"),
    };
    Some(format!(
        "{} only {verb} something to the sender (tx): the receiver ignores {them}",
        names.join(", ")
    ))
}

/// A completion script for `shell`: files only where a file is meant, and
/// the keywords as well as the dashed options.
fn completions(shell: clap_complete::Shell) -> String {
    let files = ["key_file", "stats_json", "genkey", "control"];
    let mut cmd = Cli::command().mut_args(|a| {
        if !a.get_action().takes_values() {
            a
        } else if files.contains(&a.get_id().as_str()) {
            a.value_hint(clap::ValueHint::FilePath)
        } else {
            a.value_hint(clap::ValueHint::Other)
        }
    });
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "viamillipede", &mut script);
    let script = String::from_utf8_lossy(&script).into_owned();
    // The keywords (and the ssh mode), offered beside the dashed options.
    let keywords = format!("rx tx ssh {}", KEYWORDS[2..].join(" "));
    match shell {
        clap_complete::Shell::Bash => script
            .replace("opts=\"-h ", &format!("opts=\"{keywords} -h "))
            .replace(
                "if [[ ${cur} == -* || ${COMP_CWORD} -eq 1 ]] ; then",
                "if [[ ${cur} == -* || ${prev} != -* ]] ; then",
            ),
        clap_complete::Shell::Fish => {
            format!("{script}complete -c viamillipede -f -a '{keywords}'\n")
        }
        clap_complete::Shell::Zsh => script.replacen(
            "'--version[Print version]' \\\n&& ret=0",
            &format!("'--version[Print version]' \\\n'*::keyword:({keywords})' \\\n&& ret=0"),
            1,
        ),
        _ => script,
    }
}

/// What parsing a command line led to.
#[derive(Debug)]
pub enum Parsed {
    /// Run with this configuration.
    Run(Box<Config>),
    /// Print this (help or version) to stdout and exit 0.
    Print(String),
}

/// Parses a whole command line (program name first).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, Error> {
    let args = normalize(args)?;
    two_word_destination(&args)?;
    match Cli::try_parse_from(args) {
        Ok(Cli {
            completions: Some(shell),
            ..
        }) => Ok(Parsed::Print(completions(shell))),
        Ok(Cli {
            genkey: Some(path), ..
        }) => {
            Key::generate(&path)?;
            Ok(Parsed::Print(String::new()))
        }
        Ok(cli) => cli.into_config().map(|c| Parsed::Run(Box::new(c))),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                Ok(Parsed::Print(e.render().to_string()))
            }
            kind => {
                let text = e.render().to_string();
                let first = text.lines().next().unwrap_or("invalid command line");
                let mut message = first.trim_start_matches("error: ").to_string();
                let word = match e.get(clap::error::ContextKind::InvalidArg) {
                    Some(clap::error::ContextValue::String(w)) => Some(w.clone()),
                    _ => None,
                };
                let near = word
                    .as_deref()
                    .filter(|w| !w.starts_with('-'))
                    .filter(|_| kind == clap::error::ErrorKind::UnknownArgument)
                    .and_then(|w| nearest(w, &KEYWORDS, 0.8));
                if let Some(k) = near {
                    message.push_str(&format!(": did you mean '{k}'?"));
                } else if let Some(tip) = text.lines().find_map(|l| l.trim().strip_prefix("tip: "))
                {
                    message.push_str(&format!(" ({tip})"));
                }
                Err(Error::Usage(message))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(line: &str) -> Result<Config, Error> {
        let args = std::iter::once("viamillipede")
            .chain(line.split_whitespace())
            .map(OsString::from);
        match parse(args)? {
            Parsed::Run(c) => Ok(*c),
            Parsed::Print(p) => panic!("unexpected print: {p}"),
        }
    }

    fn usage(line: &str) -> String {
        match config(line) {
            Err(Error::Usage(m)) => m,
            other => panic!("expected a usage error for {line:?}, got {other:?}"),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn legacy_and_dashed_forms_are_the_same() {
        let legacy =
            config("tx hostA 8834 threads 4 tx ::1 9000 verbose 2 checkphrase abcd").unwrap();
        let dashed =
            config("--tx hostA:8834 --threads 4 --tx [::1]:9000 --verbose 2 --checkphrase abcd")
                .unwrap();
        assert_eq!(legacy, dashed);
        let Mode::Tx { destinations } = &legacy.mode else {
            panic!()
        };
        assert_eq!(destinations[1], Destination::new("::1", 9000));
        assert_eq!(destinations[1].to_string(), "[::1]:9000");
        assert_eq!(config("rx 8834").unwrap(), config("--rx 8834").unwrap());
        assert_eq!(config("threads 2 rx 1").unwrap().threads, 2);
    }

    #[test]
    fn the_original_spellings_work() {
        let c = config("tx h 1 prbs 0xd00f checksum").unwrap();
        assert_eq!(c.prbs, Some(0xd00f));
        assert!(c.checksums);
        assert!(usage("tx h 1 prbs 0xgg").contains("seed"));
    }

    #[test]
    fn legacy_test_keywords() {
        let c =
            config("tx h 1 prbs 7 leglimit 5 delayus 250 charmode --rate 10M checksums").unwrap();
        assert_eq!(c.prbs, Some(7));
        assert_eq!(
            c.pacing,
            Pacing {
                charmode: true,
                leglimit: Some(5),
                delay: Some(Duration::from_micros(250)),
                rate: Some(10 << 20),
            }
        );
        assert_eq!(
            c,
            config(
                "--tx h:1 --prbs 7 --leglimit 5 --delayus 250 --charmode --rate 10M --checksums"
            )
            .unwrap()
        );
    }

    #[test]
    fn rx_and_tx_together_are_a_duplex_pipe() {
        assert_eq!(
            config("rx 4545 tx localhost 4546").unwrap().mode,
            Mode::Duplex {
                addr: None,
                port: 4545,
                destinations: vec![Destination::new("localhost", 4546)],
                tunnel: None,
            }
        );
        let Mode::Duplex { tunnel, .. } = config("rx 1 tx h 2 initiate ::1 80").unwrap().mode
        else {
            panic!("not duplex")
        };
        let dest = Destination::new("::1", 80);
        assert_eq!(tunnel, Some(Tunnel::Initiate(dest)));
        let Mode::Duplex { tunnel, .. } = config("rx 1 tx h 2 terminate 8080").unwrap().mode else {
            panic!("not duplex")
        };
        assert_eq!(tunnel, Some(Tunnel::Terminate(8080)));
        assert!(usage("rx 1 terminate 8080").contains("two-way pipe"));
        assert!(usage("rx 1 tx h 2 terminate 8 initiate h 9").contains("terminate"));
    }

    #[test]
    fn rx_takes_an_optional_address() {
        assert_eq!(
            config("rx 0").unwrap().mode,
            Mode::Rx {
                addr: None,
                port: 0
            }
        );
        assert_eq!(
            config("rx 127.0.0.1:5").unwrap().mode,
            Mode::Rx {
                addr: Some("127.0.0.1".into()),
                port: 5
            }
        );
        assert_eq!(
            config("rx [::1]:5").unwrap().mode,
            Mode::Rx {
                addr: Some("::1".into()),
                port: 5
            }
        );
    }

    #[test]
    fn defaults() {
        let c = config("rx 1").unwrap();
        assert_eq!(
            (c.threads, c.verbose, c.foot_size, c.window),
            (16, 0, 2 << 20, 64)
        );
        assert_eq!(c.reconnect_timeout, Duration::from_secs(300));
    }

    #[test]
    fn bad_command_lines_name_the_word() {
        assert!(usage("rx 1 frobnicate").contains("frobnicate"));
        assert!(usage("rx 1 threads 0").contains("threads"));
        assert!(usage("rx 1 threads 65").contains("65"));
        assert!(usage("rx 1 threads").contains("threads"));
        assert!(usage("tx host").contains("tx"));
        assert!(usage("tx host port").contains("port"));
        assert!(usage("rx 1 checkphrase abc").contains("checkphrase"));
        assert!(usage("rx 1 verbose 21").contains("21"));
        assert!(usage("tx h 1 chaos 1").contains("1"));
        assert!(usage("tx h 1 leglimit 0").contains("0"));
        assert!(usage("tx h 1 --rate 0").contains("rate"));
        assert!(usage("").contains("nothing to do"));
        assert!(usage("rx 1 --encrypt").contains("--key-file"));
        assert!(usage("rx 1 --key-file /nonexistent/key").contains("/nonexistent/key"));
        assert!(usage("rx 70000").contains("70000"));
        assert!(usage("rx 1 --foot-size 12").contains("foot size"));
        assert!(usage("tx host 0").contains("port 0"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("7"), Ok(7));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("2 KB"), Ok(2000));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1.5X").unwrap_err().contains("powers of 1000"));
        assert!(parse_size("99999999999999G").is_err());
        assert!(parse_size("1e30").is_err());
    }

    #[test]
    fn the_reverse_forms_read_as_the_recipes_write_them() {
        assert_eq!(
            config("tx --listen 8834").unwrap(),
            config("--listen 8834").unwrap()
        );
        assert_eq!(
            config("rx --connect h:1 threads 2").unwrap(),
            config("--connect h:1 --threads 2").unwrap()
        );
    }

    #[test]
    fn near_misses_get_the_right_spelling() {
        assert!(usage("rx 1 thread 4").contains("did you mean 'threads'"));
        assert!(usage("tx h 1 verbos 2").contains("did you mean 'verbose'"));
        assert!(usage("--tx localhost 8834").contains("--tx localhost:8834"));
        assert!(usage("tx localhost:8834").contains("tx localhost 8834"));
        // An IPv6 literal is two words as it should be.
        assert!(config("tx ::1 8834").is_ok());
        assert!(usage("rx 1 threads 65").contains("1 to 64"));
        assert!(usage("rx 1 --window 1").contains("2 to"));
        assert!(usage("tx h 1 chaos 1").contains("2 or more"));
        assert!(!usage("rx 1 --threds 2").contains(".."));
    }

    #[test]
    fn sender_options_on_a_receiver_are_named() {
        let c = config("rx 1 --compress threads 4 --rate 1M").unwrap();
        assert_eq!(c.ignored, ["--compress", "--rate", "threads"]);
        assert!(config("tx h 1 --compress").unwrap().ignored.is_empty());
        // A receiver that dials uses threads.
        assert!(config("--connect h:1 threads 4")
            .unwrap()
            .ignored
            .is_empty());
        let w = ignored_warning(&c.ignored).unwrap();
        assert!(w.contains("--compress, --rate, threads only mean"), "{w}");
        let auto = config("tx h 1 threads auto").unwrap();
        assert!(auto.auto_threads && auto.threads == config::AUTO_MAX_THREADS);
        let dialing = config("--connect h:1 threads auto").unwrap();
        assert!(!dialing.auto_threads && dialing.threads == config::DEFAULT_THREADS);
    }

    #[test]
    fn local_addresses_per_destination_and_for_all() {
        let c = config("--tx h:1@127.0.0.5 --tx [::1]:2@[::1] tx h 3 --bind 127.0.0.9").unwrap();
        let Mode::Tx { destinations } = c.mode else {
            panic!("not tx")
        };
        let locals: Vec<_> = destinations
            .iter()
            .map(|d| d.local.map(|l| l.to_string()))
            .collect();
        assert_eq!(
            locals,
            [
                Some("127.0.0.5".into()),
                Some("::1".into()),
                Some("127.0.0.9".into())
            ]
        );
        assert_eq!(destinations[1].host, "::1");
        assert!(
            matches!(config("--tx h:1@nowhere"), Err(Error::Usage(m)) if m.contains("nowhere"))
        );
    }

    #[test]
    fn socket_knobs() {
        let c = config("tx h 1 --sndbuf 256K --rcvbuf 1M --nodelay false").unwrap();
        assert_eq!(
            c.socket,
            SocketOptions {
                sndbuf: Some(256 << 10),
                rcvbuf: Some(1 << 20),
                nodelay: false,
                cc: None
            }
        );
        assert!(config("tx h 1").unwrap().socket.nodelay);
        assert!(matches!(config("tx h 1 --sndbuf 1"), Err(Error::Usage(m)) if m.contains("4K")));
        assert!(
            matches!(config("tx h 1 --cc no-such-algorithm"), Err(Error::Usage(m)) if m.contains("refused"))
        );
    }
}
