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

/// Connects to the first address of `dest` that answers within `timeout`,
/// from `dest.local` if given (only addresses of its family are tried).
pub fn connect(
    dest: &Destination,
    timeout: Duration,
    opts: &SocketOptions,
) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolves to no address");
    for sa in (dest.host.as_str(), dest.port).to_socket_addrs()? {
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
