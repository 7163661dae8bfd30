//! viamillipede: a fast, resilient, network-transparent pipe over many TCP
//! connections.
//!
//! `tx` cuts stdin into numbered feet and sends them over many connections
//! to ranked destinations; `rx` puts them back in order on stdout. Feet stay
//! with the sender until the receiver acknowledges them, so a dropped
//! connection costs a resend, never data.
//!
//! As a library: a [`Sender`] is an `io::Write` whose bytes go to a
//! [`Receiver`]'s [`Flow`], an `io::Read`; [`Sender::finish`] returns only
//! once the receiver has written every byte. Their builders take the
//! command line's options; nothing they do is process-wide (no signal
//! handlers, no exit). The other modules are public for the binary and the
//! tests, and may change.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod crypto;
pub mod duplex;
pub mod error;
pub mod events;
pub mod monitor;
pub mod net;
pub mod pool;
pub mod prbs;
pub mod protocol;
pub mod relay;
pub mod reorder;
pub mod report;
pub mod rx;
#[cfg(test)]
mod sim;
pub mod stats;
pub mod tx;
pub mod udp;
pub mod wire;

pub use api::{Flow, Receiver, ReceiverBuilder, Sender, SenderBuilder};
use config::{Config, Mode};
pub use events::Event;
use std::time::Duration;

/// What a successful run did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Payload bytes written by the receiver.
    pub bytes: u64,
    /// Time taken.
    pub elapsed: Duration,
    /// Wing-specific counters for the summary line ("3 retransmitted feet").
    pub detail: String,
}

/// Runs the wing the configuration asks for.
pub fn run(config: &Config) -> error::Result<Summary> {
    match &config.mode {
        // The two common modes, through the library's own entry points.
        Mode::Rx { .. } => rx::run(config),
        Mode::Tx { .. } => tx::run(config),
        Mode::TxListen { addr, port } => tx::run_listening(config, addr.as_deref(), *port),
        Mode::RxConnect { destinations } => rx::run_connecting(config, destinations),
        Mode::Duplex {
            addr,
            port,
            destinations,
            tunnel,
        } => duplex::run(config, addr.clone(), *port, destinations, tunnel.as_ref()),
    }
}
