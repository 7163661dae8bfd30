//! The blocking shell over each receiver address's [`Lane`] (`--udp`): one
//! sender thread per address paces its datagrams onto a connected UDP
//! socket, while the connections' workers hand it pieces and their
//! acknowledgement readers hand it rx's reports.
//!
//! The datagram size is the path MTU as the kernel knows it (the route's
//! MTU, with the don't-fragment bit set, so a smaller hop on the way is
//! learned as the kernel learns it, and the lane cuts smaller).

use crate::crypto::{DatagramKey, TAG_LEN};
use crate::pool::Shared;
use crate::protocol::datagram::{Report, HEADER_LEN};
use crate::udp::send::Lane;
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65_507;
/// The send buffer asked for.
const SNDBUF: usize = 4 << 20;

struct Inner {
    lane: Lane,
    keys: HashMap<usize, Arc<DatagramKey>>,
    stopped: bool,
    /// Why datagrams cannot get through, once that is known.
    failed: Option<String>,
}

/// One receiver address's datagrams.
pub struct Path {
    state: Mutex<Inner>,
    /// The sender thread waits here.
    wake: Condvar,
    /// Workers wait here for their piece to be out.
    out: Condvar,
    socket: UdpSocket,
    addr: SocketAddr,
}

impl Path {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, s: &mut Inner) {
        let e = s.lane.take_effects();
        if !e.out.is_empty() {
            self.out.notify_all();
        }
        if let Some(after) = e.silent {
            s.failed = Some(format!(
                "no UDP datagram reached the receiver at {} in {} s, though its TCP connections work: does a firewall block UDP to port {}? (leave out --udp to send over TCP only)",
                self.addr,
                after.as_secs(),
                self.addr.port()
            ));
            s.stopped = true;
            self.out.notify_all();
        }
    }

    /// The sender thread: paces datagrams until the run is over.
    fn run(&self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut s = self.lock();
        let mut told = Instant::now();
        loop {
            if s.stopped {
                return;
            }
            let now = Instant::now();
            if now >= told + Duration::from_secs(1) {
                told = now;
                let l = &s.lane;
                let r = l.rate();
                log::debug!(
                    "udp {}: pacing {:.1} Mbit/s, delivery {:.1} Mbit/s, rtt {:?} (min {:?}), {} KiB in flight of {} KiB; {} datagrams, {} sent again, {} probes, gave way {}{}",
                    self.addr,
                    r.pacing_rate() * 8e-6,
                    r.bandwidth().unwrap_or(0.0) * 8e-6,
                    r.srtt().unwrap_or_default(),
                    r.min_rtt().unwrap_or_default(),
                    l.inflight() >> 10,
                    r.window() >> 10,
                    l.sent,
                    l.resent,
                    l.probes,
                    r.yields,
                    if r.in_startup() { ", starting" } else { "" }
                );
            }
            if s.lane.poll_timeout(now).is_some_and(|t| t <= now) {
                s.lane.handle_timeout(now);
            }
            let Some(t) = s.lane.poll_transmit(now) else {
                self.apply(&mut s);
                s = match s.lane.poll_timeout(now) {
                    Some(at) => {
                        let wait = at.saturating_duration_since(Instant::now());
                        self.wake
                            .wait_timeout(s, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    None => self.wake.wait(s).unwrap_or_else(|p| p.into_inner()),
                };
                continue;
            };
            let key = s.keys.get(&t.w).cloned();
            self.apply(&mut s);
            drop(s);
            let len = t.range.len();
            let head = t.header.encode();
            buf[..HEADER_LEN].copy_from_slice(&head);
            buf[HEADER_LEN..HEADER_LEN + len].copy_from_slice(&t.data[t.range.clone()]);
            let mut n = HEADER_LEN + len;
            if let Some(key) = key {
                let (h, rest) = buf.split_at_mut(HEADER_LEN);
                let tag = key.protect(t.header.counter, h, &mut rest[..len]);
                buf[n..n + TAG_LEN].copy_from_slice(&tag);
                n += TAG_LEN;
            }
            let sent = self.socket.send(&buf[..n]);
            s = self.lock();
            if let Err(e) = sent {
                // The datagram is lost like any other (rx sees its counter
                // missing); a smaller path MTU is taken on.
                if e.raw_os_error() == Some(rustix::io::Errno::MSGSIZE.raw_os_error()) {
                    let size = datagram_size(&self.socket, self.addr);
                    log::info!(
                        "udp {}: the path takes datagrams of {size} bytes",
                        self.addr
                    );
                    s.lane.shrink(size);
                } else {
                    log::debug!("udp {}: send: {e}", self.addr);
                }
            }
        }
    }
}

/// The largest datagram the route to `addr` takes without fragmenting.
fn datagram_size(socket: &UdpSocket, addr: SocketAddr) -> usize {
    let (mtu, headers) = match addr {
        SocketAddr::V4(_) => (rustix::net::sockopt::ip_mtu(socket), 28),
        SocketAddr::V6(_) => (rustix::net::sockopt::ipv6_mtu(socket), 48),
    };
    let mtu = mtu.map(|m| m as usize).unwrap_or(1500);
    mtu.saturating_sub(headers).clamp(512, MAX_DATAGRAM)
}

/// Every receiver address's path, for one run.
pub struct Paths {
    paths: Mutex<HashMap<SocketAddr, Arc<Path>>>,
    /// `--rate`, in bytes per second.
    cap: Option<f64>,
    /// Whether datagrams carry a tag.
    keyed: bool,
    /// `--datagram-size`.
    largest: Option<usize>,
}

impl Paths {
    /// No paths yet; each is opened when its first connection agrees on UDP.
    pub fn new(cap: Option<f64>, keyed: bool, largest: Option<usize>) -> Paths {
        Paths {
            paths: Mutex::new(HashMap::new()),
            cap,
            keyed,
            largest,
        }
    }

    fn path(&self, addr: SocketAddr) -> std::io::Result<Arc<Path>> {
        let mut paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = paths.get(&addr) {
            return Ok(Arc::clone(p));
        }
        let any: SocketAddr = match addr {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(any)?;
        match addr {
            SocketAddr::V4(_) => rustix::net::sockopt::set_ip_mtu_discover(
                &socket,
                rustix::net::sockopt::Ipv4PathMtuDiscovery::DO,
            )?,
            SocketAddr::V6(_) => rustix::net::sockopt::set_ipv6_mtu_discover(
                &socket,
                rustix::net::sockopt::Ipv6PathMtuDiscovery::DO,
            )?,
        }
        let _ = socket2::SockRef::from(&socket).set_send_buffer_size(SNDBUF);
        socket.connect(addr)?;
        let size = datagram_size(&socket, addr).min(self.largest.unwrap_or(MAX_DATAGRAM));
        log::info!("udp {addr}: datagrams of {size} bytes");
        let tag = if self.keyed { TAG_LEN } else { 0 };
        let path = Arc::new(Path {
            state: Mutex::new(Inner {
                lane: Lane::new(size, tag, self.cap, Instant::now()),
                keys: HashMap::new(),
                stopped: false,
                failed: None,
            }),
            wake: Condvar::new(),
            out: Condvar::new(),
            socket,
            addr,
        });
        let p = Arc::clone(&path);
        std::thread::Builder::new()
            .name(format!("tx-udp-{addr}"))
            .spawn(move || p.run())?;
        paths.insert(addr, Arc::clone(&path));
        Ok(path)
    }

    /// Connection `w` sends its pieces to `addr` as datagrams under `token`.
    pub fn join(
        &self,
        w: usize,
        addr: SocketAddr,
        token: u64,
        key: Option<DatagramKey>,
    ) -> std::io::Result<Flow> {
        let path = self.path(addr)?;
        {
            let mut s = path.lock();
            s.lane.open(w, token);
            match key {
                Some(k) => s.keys.insert(w, Arc::new(k)),
                None => s.keys.remove(&w),
            };
            path.apply(&mut s);
        }
        Ok(Flow { path, w })
    }

    /// Stops every path's sender thread.
    pub fn stop(&self) {
        for p in self
            .paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            p.lock().stopped = true;
            p.wake.notify_all();
            p.out.notify_all();
        }
    }

    /// Datagrams sent and sent again, over all paths.
    pub fn counts(&self) -> (u64, u64) {
        let paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        paths.values().fold((0, 0), |(a, b), p| {
            let s = p.lock();
            (a + s.lane.sent, b + s.lane.resent)
        })
    }
}

impl Drop for Paths {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One connection's share of a path.
pub struct Flow {
    path: Arc<Path>,
    w: usize,
}

/// Why a piece could not be sent.
#[derive(Debug)]
pub enum Gone {
    /// The connection's flow was closed (the run is ending, or the flow
    /// was replaced).
    Closed,
    /// Datagrams do not get through: the transfer cannot go on this way.
    Failed(String),
}

impl Flow {
    /// Sends piece `id` (its bytes as they go: compressed, with their
    /// checksum); returns once its last byte went for the first time.
    pub fn send(&self, id: u64, data: Shared, flags: u8) -> Result<(), Gone> {
        let p = &self.path;
        let mut s = p.lock();
        if !s.lane.submit(self.w, id, data, flags) {
            return Err(Gone::Closed);
        }
        p.wake.notify_all();
        loop {
            if let Some(why) = &s.failed {
                return Err(Gone::Failed(why.clone()));
            }
            if s.stopped || !s.lane.is_open(self.w) {
                return Err(Gone::Closed);
            }
            if !s.lane.is_pending(self.w, id) {
                return Ok(());
            }
            s = p
                .out
                .wait_timeout(s, Duration::from_secs(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// rx acknowledged piece `id`.
    pub fn acked(&self, id: u64) {
        let mut s = self.path.lock();
        s.lane.acked(self.w, id);
        self.path.apply(&mut s);
    }

    /// rx's report on this connection's datagrams.
    pub fn report(&self, bytes: &[u8]) -> Result<(), String> {
        let r = Report::decode(bytes).map_err(|e| e.to_string())?;
        let mut s = self.path.lock();
        let out = s.lane.on_report(self.w, &r, Instant::now());
        self.path.apply(&mut s);
        self.path.wake.notify_all();
        out
    }
}

impl Flow {
    /// The connection is gone: what it had in flight is forgotten, and its
    /// worker, if waiting for a piece to go out, is woken.
    pub fn close(&self) {
        let mut s = self.path.lock();
        s.lane.close(self.w);
        s.keys.remove(&self.w);
        self.path.apply(&mut s);
        self.path.wake.notify_all();
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        let mut s = self.path.lock();
        s.lane.close(self.w);
        s.keys.remove(&self.w);
        self.path.apply(&mut s);
        self.path.wake.notify_all();
    }
}
