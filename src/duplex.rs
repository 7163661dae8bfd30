//! Both wings in one process: a two-way pipe, and TCP tunnels over it.
//!
//! `rx PORT tx HOST PORT` sends stdin to the destinations and writes what
//! the listener receives to stdout. With `terminate PORT` or `initiate
//! HOST:PORT`, a TCP connection takes the place of stdin and stdout: what
//! it sends goes out through tx, what rx receives goes into it, and the end
//! of either stream is passed on as a half-close, so the tunnel comes down
//! cleanly when both ends have closed.

use crate::config::{Config, Destination, Tunnel};
use crate::error::{Error, Result};
use crate::{net, rx, tx, Summary};
use crossbeam_channel::Receiver;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs both wings; succeeds when both do.
pub fn run(
    config: &Config,
    addr: Option<String>,
    port: u16,
    destinations: &[Destination],
    tunnel: Option<&Tunnel>,
) -> Result<Summary> {
    match tunnel {
        None => {
            let stdout = std::io::stdout().as_fd().try_clone_to_owned();
            let stdout = File::from(stdout.map_err(|e| Error::io("open stdout", e))?);
            both(config, addr, port, destinations, tx::input(config)?, stdout)
        }
        Some(tunnel) => {
            let (sockets, socket) = crossbeam_channel::bounded(2);
            match tunnel {
                Tunnel::Initiate(dest) => {
                    let s = net::connect(dest, CONNECT_TIMEOUT, &config.socket)
                        .map_err(|e| Error::io(format!("tunnel: connect to {dest}"), e))?;
                    log::info!("tunnel: connected to {dest}");
                    hand_over(&sockets, s)?;
                }
                Tunnel::Terminate(tport) => {
                    let listener = net::listen(None, *tport, &config.socket)
                        .map_err(|e| Error::io(format!("tunnel: listen on port {tport}"), e))?;
                    let local = listener
                        .local_addr()
                        .map_err(|e| Error::io("tunnel: listening address", e))?;
                    let _ = writeln!(io::stderr(), "viamillipede: tunnel listening on {local}");
                    // The pipe runs from the start; the tunnel's ends wait for
                    // the one connection it carries.
                    std::thread::Builder::new()
                        .name("tunnel-accept".into())
                        .spawn(move || match listener.accept() {
                            Ok((s, peer)) => {
                                log::info!("tunnel: {peer} connected");
                                let _ = hand_over(&sockets, s);
                            }
                            Err(e) => log::error!("tunnel: accept: {e}"),
                        })
                        .map_err(|e| Error::io("spawn the tunnel's acceptor", e))?;
                }
            }
            // Whatever the connection sends goes at once, not in full feet.
            let mut tunnel_config = config.clone();
            tunnel_config.pacing.charmode = true;
            let input = LazySocket {
                socket: socket.clone(),
                stream: None,
            };
            let output = LazySocket {
                socket,
                stream: None,
            };
            both(
                &tunnel_config,
                addr,
                port,
                destinations,
                input,
                HalfClose(output),
            )
        }
    }
}

fn hand_over(sockets: &crossbeam_channel::Sender<TcpStream>, s: TcpStream) -> Result<()> {
    let _ = s.set_nodelay(true);
    let clone = s
        .try_clone()
        .map_err(|e| Error::io("tunnel: clone socket", e))?;
    let _ = sockets.send(s);
    let _ = sockets.send(clone);
    Ok(())
}

fn both(
    config: &Config,
    addr: Option<String>,
    port: u16,
    destinations: &[Destination],
    input: impl Read + Send + 'static,
    output: impl Write + Send + 'static,
) -> Result<Summary> {
    // Both wings know this process's receiver, so tx never takes a
    // connection that was relayed back to it.
    let mut config = config.clone();
    config.local_receiver = Some(crate::rx::random_id());
    let config = &config;
    let rx_config = config.clone();
    let receiving = std::thread::Builder::new()
        .name("rx".into())
        .spawn(move || rx::run_into(&rx_config, addr.as_deref(), port, rx::hub::Plain(output)))
        .map_err(|e| Error::io("spawn the receiving side", e))?;
    let sent = tx::send(config, tx::Connections::Dial(destinations), input);
    if let Err(e) = sent {
        // The receiving side may wait for its sender without limit: the
        // pipe has failed either way.
        return Err(e);
    }
    let received = receiving
        .join()
        .unwrap_or_else(|_| Err(Error::Internal("the receiving side panicked".into())));
    match (sent, received) {
        (Ok(s), Ok(r)) => Ok(Summary {
            bytes: s.bytes + r.bytes,
            elapsed: s.elapsed.max(r.elapsed),
            detail: format!(
                "sent {} bytes ({}), received {} bytes ({})",
                s.bytes, s.detail, r.bytes, r.detail
            ),
        }),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(se), Err(re)) => {
            log::error!("receiving: {re}");
            Err(se)
        }
    }
}

/// One end of the tunnel's connection, which may not exist yet: the first
/// read or write waits for it.
struct LazySocket {
    socket: Receiver<TcpStream>,
    stream: Option<TcpStream>,
}

impl LazySocket {
    fn get(&mut self) -> io::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let s = self.socket.recv().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the tunnel's connection never came",
                )
            })?;
            self.stream = Some(s);
        }
        Ok(self.stream.as_mut().expect("set above"))
    }
}

impl Read for LazySocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.get()?.read(buf)
    }
}

impl Write for LazySocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.get()?.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Some(s) => s.flush(),
            None => Ok(()),
        }
    }
}

/// The receiving side's output into the tunnel: when the stream ends (the
/// sequencer drops it), the end is passed on as a half-close.
struct HalfClose(LazySocket);

impl Write for HalfClose {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Drop for HalfClose {
    fn drop(&mut self) {
        if let Some(s) = &self.0.stream {
            let _ = s.shutdown(Shutdown::Write);
        }
    }
}
