//! The UDP data plane (`--udp`): feet as datagrams, at a paced rate that
//! follows what the path delivers, with only the missing ranges sent again.
//!
//! The TCP connections stay: each still does its handshake (which agrees
//! the datagram token and, with a key, the datagram keys), carries the
//! acknowledgements, the window and the end of the stream, and is what the
//! schedule gives pieces to. Only the pieces' bytes travel as datagrams,
//! which a connection's worker hands to its destination's [`send::Lane`]
//! instead of writing them to its socket. So ranked destinations, the
//! window, reconnects, checksums, compression and keys all hold as they do
//! over TCP, and a connection that goes dark is found and its pieces moved
//! by the same rules.
//!
//! - [`send`]: tx's lane (pacing, loss recovery) over [`rate`] (the rate
//!   and window model);
//! - [`recv`]: rx's assembly of pieces and its reports;
//! - the wire formats are in [`crate::protocol::datagram`].
//!
//! All three are state machines without I/O; the simulation below runs
//! them over a modelled path in virtual time, from 1 Mbit/s to 1 Gbit/s,
//! 0 to 300 ms and 0 to 2 % loss, and through a path that goes dark.

pub mod rate;
pub mod recv;
pub mod send;

#[cfg(test)]
mod sim;
