//! The parsed, validated options of one run: what `cli` produces and the
//! wings consume.

use crate::crypto::Key;
use std::time::Duration;

/// Default foot size: 2 MiB.
pub const DEFAULT_FOOT: u32 = 2 << 20;
/// Default number of connections per destination.
pub const DEFAULT_THREADS: u16 = 16;
/// The most connections per destination `threads auto` uses.
pub const AUTO_MAX_THREADS: u16 = 64;
/// Default flow-control window in feet.
pub const DEFAULT_WINDOW: u32 = 64;
/// Default time to keep trying to (re)connect before giving up.
pub const DEFAULT_RECONNECT: Duration = Duration::from_secs(300);
/// Time a new connection has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Feet a connection may have unacknowledged before it gets another one.
pub const DEFAULT_INFLIGHT: u32 = 2;
/// Flows a receiver with `--exec` serves at once.
pub const DEFAULT_MAX_FLOWS: usize = 8;
/// What the reorder buffers of a receiver's flows may hold together.
pub const DEFAULT_MAX_MEMORY: u64 = 2 << 30;

/// One `tx HOST PORT` destination; rank is its position in the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// Host name or address literal (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Local address to send from, pinning the traffic to an interface.
    pub local: Option<std::net::IpAddr>,
}

impl Destination {
    /// A destination sent to from any local address.
    pub fn new(host: impl Into<String>, port: u16) -> Destination {
        Destination {
            host: host.into(),
            port,
            local: None,
        }
    }
}

/// Options for every data socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketOptions {
    /// Send buffer size (SO_SNDBUF); the kernel's autotuning when unset.
    pub sndbuf: Option<usize>,
    /// Receive buffer size (SO_RCVBUF); the kernel's autotuning when unset.
    pub rcvbuf: Option<usize>,
    /// Disable Nagle's algorithm (on by default).
    pub nodelay: bool,
    /// TCP congestion control algorithm (Linux), e.g. bbr or cubic.
    pub cc: Option<String>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            sndbuf: None,
            rcvbuf: None,
            nodelay: true,
            cc: None,
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Which way the data flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Listen on an address and write the stream to stdout.
    Rx {
        /// Address to bind; `None` means every address (IPv6 and IPv4).
        addr: Option<String>,
        /// Port to bind; 0 picks a free one.
        port: u16,
    },
    /// Read stdin and send it to ranked destinations.
    Tx {
        /// Destinations, most preferred first.
        destinations: Vec<Destination>,
    },
    /// Send stdin over connections the receiver makes to this address
    /// (reverse mode, `--listen`).
    TxListen {
        /// Address to bind; `None` means every address.
        addr: Option<String>,
        /// Port to bind; 0 picks a free one.
        port: u16,
    },
    /// Receive over connections made to a listening sender (reverse mode,
    /// `--connect`), ranked like tx's destinations.
    RxConnect {
        /// Senders to connect to, most preferred first.
        destinations: Vec<Destination>,
    },
    /// Both at once: a two-way pipe (stdin to the destinations, what the
    /// listener receives to stdout).
    Duplex {
        /// Address to bind; `None` means every address.
        addr: Option<String>,
        /// Port to bind.
        port: u16,
        /// Destinations, most preferred first.
        destinations: Vec<Destination>,
        /// A TCP connection carried in place of stdin and stdout.
        tunnel: Option<Tunnel>,
    },
}

/// The TCP connection a two-way pipe carries instead of stdin and stdout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// Accept one connection on this port.
    Terminate(u16),
    /// Connect to this address.
    Initiate(Destination),
}

/// Everything one run needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Receive or transmit.
    pub mode: Mode,
    /// Connections per destination (with `auto_threads`, the most).
    pub threads: u16,
    /// `threads auto`: tx finds the count per destination (see
    /// [`crate::tx::count`]).
    pub auto_threads: bool,
    /// Log verbosity, 0..=20.
    pub verbose: u8,
    /// The 4-byte phrase both sides must share.
    pub checkphrase: [u8; 4],
    /// Largest foot in bytes.
    pub foot_size: u32,
    /// Feet tx may run ahead of the receiver's written position.
    pub window: u32,
    /// Feet one connection may have unacknowledged.
    pub inflight: u32,
    /// How long to keep trying when no connection to the peer exists.
    pub reconnect_timeout: Duration,
    /// How long a new connection has to complete its handshake.
    pub handshake_timeout: Duration,
    /// The pre-shared key, if any: connections must prove it.
    pub key: Option<Key>,
    /// Whether this side asks for encryption (needs a key).
    pub encrypt: bool,
    /// tx: send the feet's bytes as UDP datagrams (`--udp`).
    pub udp: bool,
    /// tx: the largest datagram, if smaller than the route allows.
    pub datagram_size: Option<usize>,
    /// Warnings found while parsing (printed once logging is up).
    pub warnings: Vec<String>,
    /// Options given that mean nothing on this side (see
    /// [`crate::cli::ignored_warning`]).
    pub ignored: Vec<&'static str>,
    /// tx: send this seed's pseudo-random stream; rx: check against it.
    pub prbs: Option<u64>,
    /// Per-foot checksums and a whole-stream digest.
    pub checksums: bool,
    /// Cut a connection every this many feet sent (tx).
    pub chaos: Option<u64>,
    /// Options for every data socket.
    pub socket: SocketOptions,
    /// Compress feet with zstd at this level (tx).
    pub compress: Option<i32>,
    /// What to show while running.
    pub display: crate::monitor::Display,
    /// Where to write the stats document at exit.
    pub stats_json: Option<std::path::PathBuf>,
    /// How tx cuts and paces its input.
    pub pacing: Pacing,
    /// In a two-way pipe, the id of this process's own receiver: rx takes it
    /// as its id, and tx refuses a connection that reaches it (with one key
    /// on both hosts, a connection relayed back to its own process would
    /// otherwise prove the key).
    pub local_receiver: Option<[u8; 8]>,
    /// Where the running sides attach for the binary's signals and the
    /// control socket to reach them ([`crate::control`]); a library
    /// caller's run has none unless it sets one.
    pub controls: Option<crate::control::Controls>,
    /// The control socket's path (`--control`), served by the binary.
    pub control: Option<std::path::PathBuf>,
    /// Where to tell a program embedding the library what happens.
    pub events: Option<crate::events::Sink>,
    /// tx: the stream's name (`--name`), told to the receiver.
    pub name: Option<String>,
    /// rx: run this shell command once per incoming flow, with the flow's
    /// bytes on its stdin (`--exec`), instead of writing one to stdout.
    pub exec: Option<String>,
    /// rx with `--exec`: flows served at once (`--max-flows`).
    pub max_flows: usize,
    /// rx with `--exec`: the bytes all flows' reorder buffers may hold
    /// together (`--max-memory`); a new flow that would take more is refused as busy.
    pub max_memory: u64,
}

/// How tx cuts its input into feet and paces them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pacing {
    /// Send each read at once instead of filling feet.
    pub charmode: bool,
    /// Stop after this many feet.
    pub leglimit: Option<u64>,
    /// Wait this long before each foot.
    pub delay: Option<Duration>,
    /// At most this many bytes per second.
    pub rate: Option<u64>,
}

impl Config {
    /// A configuration with every option at the command line's default.
    pub fn new(mode: Mode) -> Config {
        Config {
            mode,
            threads: DEFAULT_THREADS,
            auto_threads: false,
            verbose: 0,
            checkphrase: *b"\0\0\0\0",
            foot_size: DEFAULT_FOOT,
            window: DEFAULT_WINDOW,
            inflight: DEFAULT_INFLIGHT,
            reconnect_timeout: DEFAULT_RECONNECT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            key: None,
            encrypt: false,
            udp: false,
            datagram_size: None,
            warnings: Vec::new(),
            ignored: Vec::new(),
            prbs: None,
            checksums: false,
            chaos: None,
            socket: SocketOptions::default(),
            compress: None,
            display: crate::monitor::Display::default(),
            stats_json: None,
            pacing: Pacing::default(),
            local_receiver: None,
            controls: None,
            control: None,
            events: None,
            name: None,
            exec: None,
            max_flows: DEFAULT_MAX_FLOWS,
            max_memory: DEFAULT_MAX_MEMORY,
        }
    }

    /// Checks the options the command line checks as it parses them, for
    /// a configuration built in code.
    pub fn validate(&self) -> crate::error::Result<()> {
        use crate::error::Error::Usage;
        let max_threads = if self.auto_threads {
            AUTO_MAX_THREADS
        } else {
            64
        };
        if self.threads == 0 || self.threads > max_threads {
            return Err(Usage(format!(
                "threads: {} is out of range: give 1 to {max_threads}",
                self.threads
            )));
        }
        if !(1024..=crate::protocol::MAX_FOOT).contains(&self.foot_size) {
            return Err(Usage(format!(
                "foot size: {} is out of range: give 1 KiB to 64 MiB",
                self.foot_size
            )));
        }
        if !(2..=crate::protocol::MAX_WINDOW).contains(&self.window) {
            return Err(Usage(format!(
                "window: {} is out of range: give 2 to {}",
                self.window,
                crate::protocol::MAX_WINDOW
            )));
        }
        if self.encrypt && self.key.is_none() {
            return Err(Usage(
                "encryption needs a key: both sides must hold it".into(),
            ));
        }
        if let Some(level) = self.compress.filter(|l| !(-7..=19).contains(l)) {
            return Err(Usage(format!(
                "compress: level {level} is out of range: give -7 to 19"
            )));
        }
        Ok(())
    }

    /// The log level `verbose N` maps onto.
    pub fn log_level(&self) -> log::LevelFilter {
        match self.verbose {
            0 => log::LevelFilter::Warn,
            1 => log::LevelFilter::Info,
            2 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        }
    }
}
