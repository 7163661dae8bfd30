//! Socket set-up: listening on every address family, connecting with a
//! deadline, and the options every data connection gets.

use crate::config::{Destination, SocketOptions};
use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

const BACKLOG: i32 = 1024;

/// How long sent data may stay unacknowledged by the peer's TCP before the
/// connection is aborted: a path that goes dark without a reset would
/// otherwise hold its connection's feet for the kernel's ~15 minutes.
#[cfg(any(target_os = "linux", target_os = "android"))]
const USER_TIMEOUT: Duration = Duration::from_secs(20);

/// Binds a listener; with no address, on every IPv6 and IPv4 address (one
/// dual-stack socket), falling back to IPv4 alone where IPv6 is missing.
/// Buffer sizes and congestion control set here are inherited by every
/// accepted connection (buffers must be set before the handshake to count
/// for TCP's window scaling).
pub fn listen(addr: Option<&str>, port: u16, opts: &SocketOptions) -> io::Result<TcpListener> {
    match addr {
        None => {
            let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            bind(any6, true, opts)
                .or_else(|_| bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false, opts))
        }
        Some(host) => {
            let mut last = io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} resolves to no address"),
            );
            for sa in (host, port).to_socket_addrs()? {
                match bind(sa, false, opts) {
                    Ok(l) => return Ok(l),
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }
}

fn bind(sa: SocketAddr, dual_stack: bool, opts: &SocketOptions) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))?;
    if sa.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_reuse_address(true)?;
    apply(&socket, opts)?;
    socket.bind(&SockAddr::from(sa))?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Options that must be in place before a connection is made.
fn apply(socket: &Socket, opts: &SocketOptions) -> io::Result<()> {
    if let Some(n) = opts.sndbuf {
        socket.set_send_buffer_size(n)?;
    }
    if let Some(n) = opts.rcvbuf {
        socket.set_recv_buffer_size(n)?;
    }
    set_cc(socket, opts.cc.as_deref())
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn set_cc(socket: &Socket, cc: Option<&str>) -> io::Result<()> {
    match cc {
        Some(name) => socket.set_tcp_congestion(name.as_bytes()),
        None => Ok(()),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn set_cc(_: &Socket, cc: Option<&str>) -> io::Result<()> {
    match cc {
        Some(_) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this system cannot choose congestion control per socket",
        )),
        None => Ok(()),
    }
}

/// Checks that the kernel lets this process use congestion control `name`,
/// so a wrong `--cc` is refused at start with what is allowed.
pub fn check_cc(name: &str) -> Result<(), String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("create a socket: {e}"))?;
    set_cc(&socket, Some(name)).map_err(|e| {
        let allowed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .map(|s| format!(" (allowed here: {})", s.trim()))
            .unwrap_or_default();
        format!("--cc {name}: the kernel refused it: {e}{allowed}")
    })
}

/// A host name that does not resolve (see [`is_unresolved`]).
#[derive(Debug)]
struct Unresolved(String);

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unresolved {}

/// Whether [`connect`] failed because the host name did not resolve.
pub fn is_unresolved(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Unresolved>())
}

/// Connects to the first address of `dest` that answers within `timeout`,
/// from `dest.local` if given (only addresses of its family are tried).
pub fn connect(
    dest: &Destination,
    timeout: Duration,
    opts: &SocketOptions,
) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolves to no address");
    let addrs = (dest.host.as_str(), dest.port)
        .to_socket_addrs()
        .map_err(|e| io::Error::other(Unresolved(e.to_string())))?;
    for sa in addrs {
        if dest.local.is_some_and(|l| l.is_ipv4() != sa.is_ipv4()) {
            last = io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no address of the local address's family",
            );
            continue;
        }
        match connect_one(sa, dest.local, timeout, opts) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn connect_one(
    sa: SocketAddr,
    local: Option<IpAddr>,
    timeout: Duration,
    opts: &SocketOptions,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))?;
    apply(&socket, opts)?;
    if let Some(ip) = local {
        socket
            .bind(&SockAddr::from(SocketAddr::new(ip, 0)))
            .map_err(|e| io::Error::new(e.kind(), format!("bind to {ip}: {e}")))?;
    }
    socket.connect_timeout(&SockAddr::from(sa), timeout)?;
    Ok(socket.into())
}

/// Options for every data connection: no Nagle delay unless asked
/// (acknowledgements are small and time-critical; feet are large writes
/// anyway), keepalives so a silently dead peer is noticed, and (on Linux) a
/// limit on how long sent data may go unacknowledged.
pub fn tune(stream: &TcpStream, opts: &SocketOptions) -> io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    sock.set_nodelay(opts.nodelay)?;
    let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(10));
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    ))]
    let keepalive = keepalive
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    Ok(())
}

/// Sets the socket to send a reset, not a FIN, when it is closed: for
/// connections dropped because the peer broke the protocol.
pub fn abortive_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Connections allowed in their handshake at once, from one source address
/// and in all: one sender opens up to 64 per destination at once.
pub const HANDSHAKES_PER_SOURCE: usize = 64;
/// The same, in all.
pub const HANDSHAKES: usize = 256;

/// Admission to the handshake: at most [`HANDSHAKES_PER_SOURCE`] connections
/// from one address and [`HANDSHAKES`] in all may be in their handshake.
/// A connection beyond either evicts the oldest one in the same position
/// (its socket is shut down, so its handshake fails at once) rather than
/// being refused: whoever holds many half-open connections only ever
/// pushes out their own, or the oldest, never locks out a sender that
/// completes its handshake in a round trip.
#[derive(Debug)]
pub struct Gate {
    per_source: usize,
    total: usize,
    inner: std::sync::Mutex<GateInner>,
}

#[derive(Debug, Default)]
struct GateInner {
    next: u64,
    open: std::collections::VecDeque<(u64, IpAddr, TcpStream)>,
    evicted: u64,
}

/// A connection's place in the handshake; given up when dropped.
#[derive(Debug)]
pub struct Pass {
    gate: std::sync::Arc<Gate>,
    id: u64,
}

impl Gate {
    /// A gate with the default limits.
    pub fn new() -> std::sync::Arc<Gate> {
        Gate::with_limits(HANDSHAKES_PER_SOURCE, HANDSHAKES)
    }

    /// A gate with other limits (for tests).
    pub fn with_limits(per_source: usize, total: usize) -> std::sync::Arc<Gate> {
        std::sync::Arc::new(Gate {
            per_source: per_source.max(1),
            total: total.max(1),
            inner: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `stream` from `source` to its handshake, evicting another if
    /// a limit is reached.
    pub fn enter(self: &std::sync::Arc<Gate>, stream: &TcpStream, source: IpAddr) -> Pass {
        let mut g = self.lock();
        let from_source = g.open.iter().filter(|(_, ip, _)| *ip == source).count();
        let evict = if from_source >= self.per_source {
            g.open.iter().position(|(_, ip, _)| *ip == source)
        } else if g.open.len() >= self.total {
            Some(0)
        } else {
            None
        };
        if let Some(at) = evict {
            if let Some((_, ip, old)) = g.open.remove(at) {
                log::debug!("{ip}: an old handshake was cut off to make room");
                let _ = old.shutdown(std::net::Shutdown::Both);
                g.evicted += 1;
            }
        }
        let id = g.next;
        g.next += 1;
        if let Ok(clone) = stream.try_clone() {
            g.open.push_back((id, source, clone));
        }
        Pass {
            gate: std::sync::Arc::clone(self),
            id,
        }
    }

    /// Connections in their handshake now.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// Handshakes cut off to make room so far.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut g = self.gate.lock();
        g.open.retain(|(id, _, _)| *id != self.id);
    }
}

/// Reads with one deadline for everything read through it, rather than a
/// timeout per read, which a peer sending a byte at a time would defeat.
pub struct Deadline<'a> {
    /// The stream read.
    pub stream: &'a TcpStream,
    /// When reading gives up.
    pub until: std::time::Instant,
}

impl io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

/// How long to wait after a failed accept (out of descriptors, say)
/// before the next, doubling from this.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// At most this.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` for `serve` until it returns false,
/// or `more` does (asked after each connection or failed accept: a
/// listener shut down from another thread fails its accept), backing off
/// (without spinning) while accepting fails.
pub fn accept_loop(
    listener: &TcpListener,
    more: impl Fn() -> bool,
    mut serve: impl FnMut(TcpStream, SocketAddr) -> bool,
) {
    let mut backoff = ACCEPT_BACKOFF;
    while more() {
        match listener.accept() {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF;
                if !more() || !serve(stream, peer) {
                    return;
                }
            }
            Err(_) if !more() => return,
            Err(e) => {
                log::warn!("accept: {e}; trying again in {} ms", backoff.as_millis());
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (s, c)
    }

    #[test]
    fn the_gate_evicts_the_oldest_of_a_source_then_the_oldest_in_all() {
        use std::io::Read;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let gate = Gate::with_limits(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let conns: Vec<(TcpStream, TcpStream)> = (0..5).map(|_| pair(&l)).collect();
        let p0 = gate.enter(&conns[0].0, a);
        let _p1 = gate.enter(&conns[1].0, a);
        // A third from the same source pushes out its first.
        let _p2 = gate.enter(&conns[2].0, a);
        let mut buf = [0u8; 1];
        let mut s0 = &conns[0].0;
        assert_eq!(s0.read(&mut buf).unwrap(), 0, "the oldest was shut down");
        assert_eq!((gate.open(), gate.evicted()), (2, 1));
        drop(p0);
        // Another source fills the gate; one more pushes out the oldest.
        let _p3 = gate.enter(&conns[3].0, b);
        let _p4 = gate.enter(&conns[4].0, b);
        assert_eq!((gate.open(), gate.evicted()), (3, 2));
        let mut s1 = &conns[1].0;
        assert_eq!(s1.read(&mut buf).unwrap(), 0);
    }
}
