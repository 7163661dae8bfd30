//! Frames: the unit of every message after the handshake.
//!
//! A frame is a fixed 16-byte header, optionally followed by a payload:
//!
//! ```text
//! 0      1       2          4          8                 16
//! | kind | flags | reserved | len: u32 | id: u64          | payload (len bytes)
//! ```
//!
//! `Foot` frames carry data from tx to rx; the other kinds flow back from rx
//! to tx on the same connection. Only `Foot`, `Abort`, `Cancel` and
//! `Datagrams` frames carry a payload, and its length is checked against a bound before anyone
//! allocates for it.

use super::{be_u32, be_u64, MAX_MESSAGE};
use std::fmt;

/// Length of every frame header in bytes.
pub const HEADER_LEN: usize = 16;

/// `Foot` flag: this is the last foot of the stream (its payload may be empty).
pub const FLAG_END: u8 = 0x01;

/// `Foot` flag: the payload is zstd-compressed; it decompresses to at most
/// the foot size.
pub const FLAG_COMPRESSED: u8 = 0x02;

/// What a frame means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// tx -> rx: foot `id`, `len` payload bytes.
    Foot = 1,
    /// rx -> tx: foot `id` has been received and will be written.
    Ack = 2,
    /// rx -> tx: every foot below `id` has been written to stdout.
    Window = 3,
    /// rx -> tx: the whole stream (`id` bytes) is written and flushed.
    Done = 4,
    /// rx -> tx: the receiver failed; the payload is the reason in UTF-8.
    Abort = 5,
    /// tx -> rx: the sender stopped (interrupted); the payload is why.
    Cancel = 6,
    /// rx -> tx: `id` bytes in all have arrived on this connection; sent
    /// every so often while a foot is arriving, so a slow connection is
    /// seen to move long before its foot is whole.
    Progress = 7,
    /// rx -> tx: a report on the datagrams of this connection (`--udp`);
    /// the payload is a [`super::datagram::Report`].
    Datagrams = 8,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Foot,
            2 => Kind::Ack,
            3 => Kind::Window,
            4 => Kind::Done,
            5 => Kind::Abort,
            6 => Kind::Cancel,
            7 => Kind::Progress,
            8 => Kind::Datagrams,
            _ => return None,
        })
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The frame kind.
    pub kind: Kind,
    /// Kind-specific flags ([`FLAG_END`]).
    pub flags: u8,
    /// Payload length in bytes.
    pub len: u32,
    /// Foot id, acknowledged id, window edge or byte count, by kind.
    pub id: u64,
}

/// Why a header could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer than [`HEADER_LEN`] bytes were given.
    Truncated,
    /// The kind byte names no known frame.
    UnknownKind(u8),
    /// Reserved bits are set, or flags unknown to this version.
    BadFlags,
    /// The payload is longer than allowed for this kind.
    Oversize {
        /// The announced length.
        len: u32,
        /// The largest length allowed.
        max: u32,
    },
    /// A sealed frame too short to hold its authentication tag.
    Undersize {
        /// The announced length.
        len: u32,
        /// The shortest length allowed.
        min: u32,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Truncated => write!(f, "truncated frame header"),
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::BadFlags => write!(f, "unknown flags or reserved bits set"),
            FrameError::Undersize { len, min } => {
                write!(
                    f,
                    "sealed frame of {len} bytes is shorter than its {min}-byte tag"
                )
            }
            FrameError::Oversize { len, max } => {
                write!(f, "frame payload of {len} bytes exceeds the limit of {max}")
            }
        }
    }
}

impl std::error::Error for FrameError {}

impl Header {
    /// A foot header for `len` payload bytes.
    pub fn foot(id: u64, len: u32, end: bool) -> Header {
        let flags = if end { FLAG_END } else { 0 };
        Header {
            kind: Kind::Foot,
            flags,
            len,
            id,
        }
    }

    /// A payload-less control header.
    pub fn control(kind: Kind, id: u64) -> Header {
        Header {
            kind,
            flags: 0,
            len: 0,
            id,
        }
    }

    /// Whether a foot's payload is compressed.
    pub fn is_compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// Whether this is the last foot of the stream.
    pub fn is_end(&self) -> bool {
        self.flags & FLAG_END != 0
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.len.to_be_bytes());
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b
    }

    /// Decodes and validates a header; `max_foot` bounds a foot's payload.
    pub fn decode(b: &[u8], max_foot: u32) -> Result<Header, FrameError> {
        Header::decode_sealed(b, max_foot, 0)
    }

    /// Decodes a header whose payload carries `tag` more bytes (an AEAD tag
    /// on a sealed connection): every kind's payload is then at least `tag`
    /// and at most its plain bound plus `tag` bytes long.
    pub fn decode_sealed(b: &[u8], max_foot: u32, tag: u32) -> Result<Header, FrameError> {
        if b.len() < HEADER_LEN {
            return Err(FrameError::Truncated);
        }
        let kind = Kind::from_u8(b[0]).ok_or(FrameError::UnknownKind(b[0]))?;
        let flags = b[1];
        if b[2] != 0 || b[3] != 0 {
            return Err(FrameError::BadFlags);
        }
        let allowed_flags = if kind == Kind::Foot {
            FLAG_END | FLAG_COMPRESSED
        } else {
            0
        };
        if flags & !allowed_flags != 0 {
            return Err(FrameError::BadFlags);
        }
        let len = be_u32(b, 4);
        let max = match kind {
            Kind::Foot => max_foot,
            Kind::Abort | Kind::Cancel => MAX_MESSAGE as u32,
            Kind::Datagrams => super::datagram::MAX_REPORT as u32,
            Kind::Ack | Kind::Window | Kind::Done | Kind::Progress => 0,
        };
        let max = max.saturating_add(tag);
        if len > max {
            return Err(FrameError::Oversize { len, max });
        }
        if len < tag {
            return Err(FrameError::Undersize { len, min: tag });
        }
        Ok(Header {
            kind,
            flags,
            len,
            id: be_u64(b, 8),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn foot_round_trip() {
        let h = Header::foot(7, 1234, true);
        let d = Header::decode(&h.encode(), 2 << 20).unwrap();
        assert_eq!(d, h);
        assert!(d.is_end());
    }

    #[test]
    fn truncated_header_is_rejected() {
        let b = Header::control(Kind::Ack, 3).encode();
        for n in 0..HEADER_LEN {
            assert_eq!(Header::decode(&b[..n], 10), Err(FrameError::Truncated));
        }
    }

    #[test]
    fn oversize_foot_is_rejected() {
        let b = Header::foot(0, 1025, false).encode();
        assert_eq!(
            Header::decode(&b, 1024),
            Err(FrameError::Oversize {
                len: 1025,
                max: 1024
            })
        );
    }

    #[test]
    fn sealed_frames_carry_a_tag() {
        let b = Header::control(Kind::Ack, 1).encode();
        assert_eq!(
            Header::decode_sealed(&b, 10, 16),
            Err(FrameError::Undersize { len: 0, min: 16 })
        );
        let h = Header {
            kind: Kind::Ack,
            flags: 0,
            len: 16,
            id: 1,
        };
        assert_eq!(Header::decode_sealed(&h.encode(), 10, 16), Ok(h));
        let h = Header::foot(1, 26, false);
        assert_eq!(Header::decode_sealed(&h.encode(), 10, 16), Ok(h));
        let h = Header::foot(1, 27, false);
        assert!(Header::decode_sealed(&h.encode(), 10, 16).is_err());
    }

    #[test]
    fn control_frames_carry_no_payload() {
        let mut b = Header::control(Kind::Window, 9).encode();
        b[7] = 1;
        assert!(matches!(
            Header::decode(&b, 1 << 20),
            Err(FrameError::Oversize { .. })
        ));
    }

    #[test]
    fn unknown_kind_and_flags_are_rejected() {
        let mut b = Header::foot(1, 1, false).encode();
        b[0] = 99;
        assert_eq!(Header::decode(&b, 10), Err(FrameError::UnknownKind(99)));
        let mut b = Header::foot(1, 1, false).encode();
        b[1] = 0x80;
        assert_eq!(Header::decode(&b, 10), Err(FrameError::BadFlags));
        let mut b = Header::foot(1, 1, false).encode();
        b[1] = FLAG_COMPRESSED | FLAG_END;
        assert!(Header::decode(&b, 10).unwrap().is_compressed());
        let mut b = Header::foot(1, 1, false).encode();
        b[1] = 0x04;
        assert_eq!(Header::decode(&b, 10), Err(FrameError::BadFlags));
        let mut b = Header::control(Kind::Ack, 1).encode();
        b[1] = FLAG_END;
        assert_eq!(Header::decode(&b, 10), Err(FrameError::BadFlags));
        let mut b = Header::control(Kind::Ack, 1).encode();
        b[2] = 1;
        assert_eq!(Header::decode(&b, 10), Err(FrameError::BadFlags));
    }

    proptest! {
        #[test]
        fn any_valid_header_round_trips(kind in 1u8..=8, end: bool, len in 0u32..=1024, id: u64) {
            let kind = Kind::from_u8(kind).unwrap();
            let h = match kind {
                Kind::Foot => Header::foot(id, len, end),
                Kind::Abort | Kind::Cancel | Kind::Datagrams => Header { kind, flags: 0, len, id },
                _ => Header::control(kind, id),
            };
            prop_assert_eq!(Header::decode(&h.encode(), 1024), Ok(h));
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(h) = Header::decode(&b, 4096) {
                prop_assert!(h.len <= 4096);
                prop_assert_eq!(&h.encode()[..], &b[..HEADER_LEN]);
            }
        }
    }
}
