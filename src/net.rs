//! Socket set-up: listening on every address family, connecting with a
//! deadline, and the options every data connection gets.

use crate::config::Destination;
use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

const BACKLOG: i32 = 1024;

/// How long sent data may stay unacknowledged by the peer's TCP before the
/// connection is aborted: a path that goes dark without a reset would
/// otherwise hold its connection's feet for the kernel's ~15 minutes.
#[cfg(any(target_os = "linux", target_os = "android"))]
const USER_TIMEOUT: Duration = Duration::from_secs(20);

/// Binds a listener; with no address, on every IPv6 and IPv4 address (one
/// dual-stack socket), falling back to IPv4 alone where IPv6 is missing.
pub fn listen(addr: Option<&str>, port: u16) -> io::Result<TcpListener> {
    match addr {
        None => {
            let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            bind(any6, true)
                .or_else(|_| bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false))
        }
        Some(host) => {
            let mut last = io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} resolves to no address"),
            );
            for sa in (host, port).to_socket_addrs()? {
                match bind(sa, false) {
                    Ok(l) => return Ok(l),
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }
}

fn bind(sa: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))?;
    if sa.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(sa))?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Connects to the first address of `dest` that answers within `timeout`.
pub fn connect(dest: &Destination, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolves to no address");
    for sa in (dest.host.as_str(), dest.port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&sa, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Options for every data connection: no Nagle delay (acknowledgements are
/// small and time-critical; feet are large writes anyway), keepalives so a
/// silently dead peer is noticed, and (on Linux) a limit on how long sent
/// data may go unacknowledged.
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    sock.set_nodelay(true)?;
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
