//! rx's UDP sockets (`--udp`): one on each address and TCP port number a
//! sender's connection reached, opened the first time a sender asks there, read by one thread that checks each
//! datagram, puts pieces together per connection ([`Inbound`]) and hands
//! whole ones to the sequencer as a TCP connection would.
//!
//! A datagram is read only if its token names a connection that finished
//! its handshake, and, with a key, only once its tag checks out under that
//! connection's datagram key: before then nothing in it is believed, so a
//! stranger's datagrams reach neither stdout nor the sender's reports.
//! Reports and acknowledgements go back on the connection's TCP socket.

use super::conn::{hand_over, Piece};
use super::state::{Conn, Session, State};
use crate::crypto::{DatagramKey, TAG_LEN};
use crate::protocol::datagram::{Header, HEADER_LEN};
use crate::udp::recv::{Arrival, Inbound, Meter};
use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use zstd::bulk::Decompressor;

/// The receive buffer asked for: a few milliseconds of a fast path, so a
/// thread that is late to read does not lose what arrived meanwhile.
const RCVBUF: usize = 8 << 20;
/// How often the reader looks up from the socket to send reports that are
/// due while nothing arrives.
const TICK: Duration = Duration::from_millis(2);

/// One connection's datagrams, as the reader sees them.
pub struct Flow {
    /// The stream it carries.
    pub state: Arc<State>,
    /// The connection: its acknowledgements and reports go here.
    pub conn: Arc<Conn>,
    /// Its stream.
    pub session: Session,
    /// With a key: what its datagrams are checked (and opened) with.
    pub key: Option<DatagramKey>,
    /// Whether pieces end in a checksum.
    pub checksums: bool,
    /// To drop the connection when a datagram breaks the rules.
    pub closer: TcpStream,
    /// Where its pieces stand.
    inbound: Mutex<Inbound>,
    /// Where its datagrams come from (the sender's socket for its path).
    source: Mutex<Option<SocketAddr>>,
}

impl Flow {
    /// A flow for a connection that agreed on datagrams.
    pub fn new(
        state: Arc<State>,
        conn: Arc<Conn>,
        session: Session,
        key: Option<DatagramKey>,
        checksums: bool,
        closer: TcpStream,
    ) -> Flow {
        Flow {
            state,
            conn,
            session,
            key,
            checksums,
            closer,
            inbound: Mutex::new(Inbound::new()),
            source: Mutex::new(None),
        }
    }

    fn inbound(&self) -> MutexGuard<'_, Inbound> {
        self.inbound.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The receiver's UDP socket and the connections using it.
pub struct UdpRx {
    socket: UdpSocket,
    /// The port it is bound to.
    pub port: u16,
    flows: Mutex<HashMap<u64, Arc<Flow>>>,
    /// How fast each sender socket's datagrams arrive.
    meters: Mutex<HashMap<SocketAddr, Meter>>,
}

impl std::fmt::Debug for UdpRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UdpRx(port {})", self.port)
    }
}

impl UdpRx {
    /// Binds `local` (the address and port a sender's TCP connection
    /// reached) and starts its reader, which ends once `closed` is set.
    pub fn open(local: SocketAddr, closed: Arc<AtomicBool>) -> std::io::Result<Arc<UdpRx>> {
        let socket = UdpSocket::bind(local)?;
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(RCVBUF);
        socket.set_read_timeout(Some(TICK))?;
        let rx = Arc::new(UdpRx {
            port: socket.local_addr()?.port(),
            socket,
            flows: Mutex::new(HashMap::new()),
            meters: Mutex::new(HashMap::new()),
        });
        let me = Arc::clone(&rx);
        std::thread::Builder::new()
            .name("rx-udp".into())
            .spawn(move || me.run(&closed))?;
        Ok(rx)
    }

    fn flows(&self) -> MutexGuard<'_, HashMap<u64, Arc<Flow>>> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh token, not used by another connection.
    pub fn token(&self) -> u64 {
        loop {
            let mut b = [0u8; 8];
            if getrandom::getrandom(&mut b).is_err() {
                b = (Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64)
                    .to_be_bytes();
            }
            let t = u64::from_be_bytes(b);
            if t != 0 && !self.flows().contains_key(&t) {
                return t;
            }
        }
    }

    /// Datagrams under `token` belong to `flow` from now on.
    pub fn join(&self, token: u64, flow: Flow) {
        self.flows().insert(token, Arc::new(flow));
    }

    /// The connection under `token` is over: its datagrams are dropped from
    /// now on, and what its pieces held is released.
    pub fn leave(&self, token: u64) {
        if let Some(f) = self.flows().remove(&token) {
            f.state.release(f.inbound().held());
        }
    }

    fn run(&self, closed: &AtomicBool) {
        let mut buf = vec![0u8; 65536];
        let mut decompressors: HashMap<u64, Option<Decompressor<'static>>> = HashMap::new();
        let mut ticked = Instant::now();
        while !closed.load(Ordering::Acquire) {
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(token) = Header::token_of(&buf[..n]) {
                        let flow = self.flows().get(&token).cloned();
                        if let Some(flow) = flow {
                            // Counted before its check: a forged datagram
                            // can at most raise the rate the sender is told
                            // it reaches, never a stream's bytes.
                            self.meter(from, n);
                            *flow.source.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
                            let d = decompressors.entry(token).or_default();
                            if let Err(e) = self.take(&flow, &mut buf[..n], d) {
                                log::warn!("{from}: {e}; its connection is dropped");
                                flow.state.refused.fetch_add(1, Ordering::Relaxed);
                                crate::net::abortive_close(&flow.closer);
                                let _ = flow.closer.shutdown(Shutdown::Both);
                                self.leave(token);
                            }
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    log::warn!("udp: {e}");
                    std::thread::sleep(TICK);
                }
            }
            let now = Instant::now();
            if now >= ticked + TICK {
                ticked = now;
                let flows: Vec<Arc<Flow>> = self.flows().values().cloned().collect();
                decompressors.retain(|t, _| self.flows().contains_key(t));
                for f in flows {
                    self.report(&f, now);
                }
            }
        }
    }

    /// Reads one datagram of `flow`. An error when it breaks the rules
    /// after its tag checked out (only the sender could have sent it).
    fn take(
        &self,
        flow: &Flow,
        datagram: &mut [u8],
        decompressor: &mut Option<Decompressor<'static>>,
    ) -> Result<(), String> {
        let tag_len = if flow.key.is_some() { TAG_LEN } else { 0 };
        let Some(body) = datagram.len().checked_sub(HEADER_LEN + tag_len) else {
            return Ok(());
        };
        let max_piece = flow.session.foot_size + crate::wire::CHECKSUM_LEN as u32;
        let Ok(h) = Header::decode(datagram, body, max_piece) else {
            return Ok(());
        };
        let (head, rest) = datagram.split_at_mut(HEADER_LEN);
        let (bytes, tag) = rest.split_at_mut(body);
        if let Some(key) = &flow.key {
            let tag: &[u8; TAG_LEN] = (&*tag).try_into().expect("tag length");
            if key.check(h.counter, head, bytes, tag).is_err() {
                // Anyone may send a datagram: one that fails its check
                // changes nothing.
                log::debug!("udp: a datagram failed authentication; dropped");
                return Ok(());
            }
        }
        let (session, state) = (flow.session, &*flow.state);
        let delivered = state.delivered.load(Ordering::Acquire);
        let ids = crate::protocol::id_window(session.window);
        let arrival = flow
            .inbound()
            .on_datagram(&h, bytes, delivered, Instant::now(), |len| {
                h.piece < delivered + ids && state.reserve(session, u64::from(len))
            });
        flow.conn.link.count_wire((datagram.len() + 28) as u64);
        let now = Instant::now();
        let received = flow.inbound().received();
        flow.conn.outbox.progress(received, now);
        let Arrival::Whole(piece) = arrival else {
            self.report(flow, now);
            return Ok(());
        };
        let mut data = piece.data;
        if flow.checksums {
            let at = data
                .len()
                .checked_sub(crate::wire::CHECKSUM_LEN)
                .ok_or_else(|| format!("piece {} is too short for its checksum", piece.id))?;
            let sum = crate::wire::checksum(&data[..at]);
            state.release(crate::wire::CHECKSUM_LEN as u64);
            if data[at..] != sum {
                state.release(at as u64);
                return Err(format!("piece {} failed its checksum", piece.id));
            }
            data.truncate(at);
        }
        let piece = Piece {
            id: piece.id,
            data: data.into(),
            compressed: piece.flags & crate::protocol::datagram::FLAG_COMPRESSED != 0,
            end: piece.flags & crate::protocol::datagram::FLAG_END != 0,
        };
        hand_over(state, session, &flow.conn, piece, decompressor).map_err(|e| e.to_string())?;
        self.report(flow, now);
        Ok(())
    }

    fn meter(&self, from: SocketAddr, n: usize) {
        let now = Instant::now();
        let mut meters = self.meters.lock().unwrap_or_else(|p| p.into_inner());
        if meters.len() > 4096 && !meters.contains_key(&from) {
            // Bounded, whoever sends: the oldest senders are long gone.
            meters.clear();
        }
        meters
            .entry(from)
            .or_insert_with(|| Meter::new(now))
            .add(n + 28, now);
    }

    /// Posts `flow`'s report if one is due, with its sender's arrival rate.
    fn report(&self, flow: &Flow, now: Instant) {
        let r = flow.inbound().poll_report(now);
        if let Some(mut r) = r {
            let source = *flow.source.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) =
                source.and_then(|s| self.meters.lock().ok()?.get(&s).map(Meter::rate_kib))
            {
                r.rate_kib = m;
            }
            flow.conn.outbox.datagrams(r);
        }
    }
}
