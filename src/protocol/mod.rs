//! The wire protocol: byte layouts and their codecs, with no I/O inside.
//!
//! Everything here encodes into caller-provided buffers and decodes from byte
//! slices, checking every length before it is used, so the codecs can be
//! tested in memory and fuzzed. Blocking socket I/O lives in [`crate::wire`].
//! All integers are big-endian; sizes are fixed on every architecture.

pub mod datagram;
pub mod frame;
pub mod handshake;
pub mod negotiate;

pub use frame::{FrameError, Header, Kind, FLAG_COMPRESSED, FLAG_END, HEADER_LEN};
pub use handshake::{HandshakeError, Hello, Reason, Reply, Status, MAGIC, VERSION};

/// The largest foot a peer may announce (64 MiB); bounds every allocation
/// made on a length read from the wire.
pub const MAX_FOOT: u32 = 64 << 20;

/// The largest window (in feet) a peer may announce.
pub const MAX_WINDOW: u32 = 4096;

/// The largest window in bytes (window x foot size) a receiver accepts; this
/// is the receiver's memory bound for its reorder buffer.
pub const MAX_WINDOW_BYTES: u64 = 4 << 30;

/// Piece ids may run this many times the window (in feet) ahead of the
/// receiver's written position. Pieces are often smaller than a foot (a slow
/// connection's, or the end of the input), and memory is bounded by bytes,
/// a window of feet, not by ids: a slow path's small pieces must not hold
/// up a fast one for want of ids.
pub const IDS_PER_FOOT: u64 = 4;

/// How far ahead of the written position a piece id may be, for `window`.
pub fn id_window(window: u32) -> u64 {
    IDS_PER_FOOT * u64::from(window)
}

/// The longest human-readable message carried in a reply or abort frame.
pub const MAX_MESSAGE: usize = 1024;

/// The longest extension block in a handshake, reserved for later
/// authentication data.
pub const MAX_EXTENSION: usize = 4096;

/// The longest stream name (`--name`).
pub const MAX_NAME: usize = 128;

/// Checks a stream's name (`--name`): 1 to [`MAX_NAME`] bytes of letters,
/// digits and `. _ - + : @ /`, not starting with `-`, `.` or `/`, and no
/// `..` between slashes. A receiver hands it to commands in an environment
/// variable: nothing in it means anything to a shell, to a command's
/// option parser, or as a path outside where it is used.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!(
            "the name must be 1 to {MAX_NAME} bytes, this one has {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-+:@/".contains(*c)))
    {
        return Err(format!(
            "the name may hold letters, digits and . _ - + : @ /, not {c:?}"
        ));
    }
    if name.starts_with(['-', '.', '/']) {
        return Err("the name may not start with '-', '.' or '/'".into());
    }
    if name.split('/').any(|part| part.is_empty() || part == "..") {
        return Err("the name may not hold '..' or an empty part between slashes".into());
    }
    Ok(())
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}
