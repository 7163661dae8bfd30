//! The `--stats-json` document: what each side of a run did, written once
//! at exit whatever the outcome.
//!
//! Schema `viamillipede-stats/1` (fields are only ever added):
//!
//! ```text
//! { "schema": "viamillipede-stats/1",
//!   "exit_code": 0, "status": "ok" | "failed", "error": null | "...",
//!   "sides": [ { "role": "tx" | "rx",
//!                "payload_bytes", "wire_bytes", "feet",
//!                "retransmits", "reconnects",          (counts)
//!                "seconds": 1.5,
//!                "throughput": [bytes in second 1, second 2, ...],
//!                "connections": [ { "peer", "bytes", "wire_bytes",
//!                                   "feet", "reconnects" } ] } ] }
//! ```
//!
//! A run with both rx and tx has two sides. Each side records itself here
//! when it ends; `main` writes the file.

use crate::stats::Link;
use serde::Serialize;
use std::path::Path;

/// The schema name and version written in every document.
pub const SCHEMA: &str = "viamillipede-stats/1";

/// One connection's counters.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Connection {
    /// Destination (tx) or peer address (rx).
    pub peer: String,
    /// Payload bytes carried.
    pub bytes: u64,
    /// Bytes on the wire: frame headers, payloads, checksums and tags.
    pub wire_bytes: u64,
    /// Feet carried.
    pub feet: u64,
    /// Reconnections (tx).
    pub reconnects: u64,
}

impl From<&Link> for Connection {
    fn from(l: &Link) -> Connection {
        Connection {
            peer: l.peer.clone(),
            bytes: l.bytes(),
            wire_bytes: l.wire_bytes(),
            feet: l.feet(),
            reconnects: l.reconnects(),
        }
    }
}

/// What one side of the run did.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Side {
    /// "tx" or "rx".
    pub role: &'static str,
    /// Payload bytes read from stdin (tx) or written to stdout (rx).
    pub payload_bytes: u64,
    /// Bytes on the wire over all connections.
    pub wire_bytes: u64,
    /// Seconds from start to end.
    pub seconds: f64,
    /// Feet sent (tx, resends included) or received (rx).
    pub feet: u64,
    /// Feet sent again after a connection was lost (tx).
    pub retransmits: u64,
    /// Reconnections over all connections (tx).
    pub reconnects: u64,
    /// Payload bytes moved in each second of the run.
    pub throughput: Vec<u64>,
    /// Per connection.
    pub connections: Vec<Connection>,
}

#[derive(Serialize)]
struct Document<'a> {
    schema: &'static str,
    exit_code: u8,
    status: &'static str,
    error: Option<String>,
    sides: &'a [Side],
}

/// Records what a side did (called once by each side as it ends) with the
/// run's controls, for the binary's stats document; nothing without them.
pub fn record(controls: Option<&crate::control::Controls>, side: Side) {
    if let Some(c) = controls {
        c.record(side);
    }
}

/// Writes the document for `sides`.
pub fn write(
    path: &Path,
    sides: &[Side],
    exit_code: u8,
    error: Option<String>,
) -> std::io::Result<()> {
    let doc = Document {
        schema: SCHEMA,
        exit_code,
        status: if exit_code == 0 { "ok" } else { "failed" },
        error,
        sides,
    };
    let mut text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(path, text)
}
