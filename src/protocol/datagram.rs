//! The UDP data plane's two messages (`--udp`): a *datagram* carries one
//! range of one piece from tx to rx, and a *report* goes back from rx to tx
//! on the TCP connection the datagrams belong to.
//!
//! ```text
//! Datagram (36-byte header, then the range, then a 16-byte tag with a key):
//!   magic "VD" [2] | version u8 | flags u8 | token u64 | counter u64
//!   | piece id u64 | piece length u32 | offset u32 | bytes [..] | tag [16]
//! Report (the payload of a `Kind::Datagrams` frame):
//!   largest u64 | settled u64 | ack delay (µs) u32 | arrival rate u32 (KiB/s)
//!   | lost ranges: count u16 | reserved u16 | (start u64, end u64) x count
//! ```
//!
//! The *token* names the TCP connection the datagram belongs to (rx chose it
//! at random in that connection's handshake); a datagram with an unknown
//! token is dropped unread. The *counter* numbers the datagrams sent for one
//! connection, from zero, never reused: it is the AEAD nonce and what loss
//! is reckoned in. The *piece length* is the length of the piece's bytes as
//! sent (after compression, with the checksum), so any datagram of a piece
//! tells rx how much is missing.
//!
//! A report says: every counter below `settled` has arrived or has been
//! reported lost (in this report or an earlier one on the same connection,
//! which TCP delivers in order), `largest` is the highest counter that
//! arrived, `ack delay` how long before the report that was, and `lost`
//! the counters newly found missing, and `arrival rate` how fast this
//! sender's datagrams (all its connections') have lately been arriving: the
//! rate the path delivers, measured where it is delivered, so that reports
//! held up on their way back (a TCP connection waiting out a lost segment)
//! do not read as a burst of speed. Each loss is reported once; what tx
//! sends again goes under new counters.

use super::{be_u16, be_u32, be_u64};

/// Opens every datagram.
pub const MAGIC: [u8; 2] = *b"VD";
/// The datagram format this build speaks.
pub const VERSION: u8 = 1;
/// Length of every datagram header.
pub const HEADER_LEN: usize = 36;
/// Flag: the piece ends the stream.
pub const FLAG_END: u8 = 0x01;
/// Flag: the piece is zstd-compressed.
pub const FLAG_COMPRESSED: u8 = 0x02;
const KNOWN_FLAGS: u8 = FLAG_END | FLAG_COMPRESSED;
/// The most lost ranges one report carries; more go in the next.
pub const MAX_LOST: usize = 64;
/// Length of a report without its ranges.
pub const REPORT_FIXED_LEN: usize = 28;
/// The longest report.
pub const MAX_REPORT: usize = REPORT_FIXED_LEN + 16 * MAX_LOST;

/// A datagram's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`FLAG_END`], [`FLAG_COMPRESSED`].
    pub flags: u8,
    /// The connection it belongs to.
    pub token: u64,
    /// Its number on that connection.
    pub counter: u64,
    /// The piece.
    pub piece: u64,
    /// The piece's length as sent.
    pub piece_len: u32,
    /// Where in the piece these bytes go.
    pub offset: u32,
}

/// Why a datagram was not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatagramError {
    /// Shorter than a header.
    Truncated,
    /// Not a datagram of this protocol.
    BadMagic,
    /// Another version, or unknown flags.
    Unsupported,
    /// The range lies outside its piece, or the piece is too long.
    BadRange,
}

impl std::fmt::Display for DatagramError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatagramError::Truncated => "datagram shorter than its header",
            DatagramError::BadMagic => "not a viamillipede datagram",
            DatagramError::Unsupported => "another datagram version, or unknown flags",
            DatagramError::BadRange => "range outside its piece",
        })
    }
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = self.flags;
        b[4..12].copy_from_slice(&self.token.to_be_bytes());
        b[12..20].copy_from_slice(&self.counter.to_be_bytes());
        b[20..28].copy_from_slice(&self.piece.to_be_bytes());
        b[28..32].copy_from_slice(&self.piece_len.to_be_bytes());
        b[32..36].copy_from_slice(&self.offset.to_be_bytes());
        b
    }

    /// Decodes a header from the start of `b`; `body` is the length of the
    /// bytes after it (without a tag), `max_piece` bounds a piece's length.
    pub fn decode(b: &[u8], body: usize, max_piece: u32) -> Result<Header, DatagramError> {
        if b.len() < HEADER_LEN {
            return Err(DatagramError::Truncated);
        }
        if b[0..2] != MAGIC {
            return Err(DatagramError::BadMagic);
        }
        if b[2] != VERSION || b[3] & !KNOWN_FLAGS != 0 {
            return Err(DatagramError::Unsupported);
        }
        let h = Header {
            flags: b[3],
            token: be_u64(b, 4),
            counter: be_u64(b, 12),
            piece: be_u64(b, 20),
            piece_len: be_u32(b, 28),
            offset: be_u32(b, 32),
        };
        let end = u64::from(h.offset) + body as u64;
        if h.piece_len > max_piece || end > u64::from(h.piece_len) || (body == 0 && h.piece_len > 0)
        {
            return Err(DatagramError::BadRange);
        }
        Ok(h)
    }

    /// The token of a datagram, if it is long enough to have one: read
    /// before anything else, to find its connection (and key).
    pub fn token_of(b: &[u8]) -> Option<u64> {
        (b.len() >= HEADER_LEN && b[0..2] == MAGIC).then(|| be_u64(b, 4))
    }
}

/// rx's report on one connection's datagrams.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The highest counter that arrived.
    pub largest: u64,
    /// Every counter below this arrived or is reported lost.
    pub settled: u64,
    /// Microseconds between the arrival of `largest` and the report.
    pub ack_delay_us: u32,
    /// KiB per second of the sender's datagrams arriving lately (0: not
    /// measured yet).
    pub rate_kib: u32,
    /// Counter ranges `[start, end)` newly found missing.
    pub lost: Vec<(u64, u64)>,
}

/// A report that could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadReport;

impl std::fmt::Display for BadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("malformed datagram report")
    }
}

impl Report {
    /// Encodes the report.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.lost.len() <= MAX_LOST, "too many ranges in one report");
        let mut b = Vec::with_capacity(REPORT_FIXED_LEN + 16 * self.lost.len());
        b.extend_from_slice(&self.largest.to_be_bytes());
        b.extend_from_slice(&self.settled.to_be_bytes());
        b.extend_from_slice(&self.ack_delay_us.to_be_bytes());
        b.extend_from_slice(&self.rate_kib.to_be_bytes());
        b.extend_from_slice(&(self.lost.len() as u16).to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        for (s, e) in &self.lost {
            b.extend_from_slice(&s.to_be_bytes());
            b.extend_from_slice(&e.to_be_bytes());
        }
        b
    }

    /// Decodes a report; ranges must be non-empty and below `settled`.
    pub fn decode(b: &[u8]) -> Result<Report, BadReport> {
        if b.len() < REPORT_FIXED_LEN {
            return Err(BadReport);
        }
        let count = be_u16(b, 24) as usize;
        if count > MAX_LOST || b.len() != REPORT_FIXED_LEN + 16 * count {
            return Err(BadReport);
        }
        let settled = be_u64(b, 8);
        let lost: Vec<(u64, u64)> = (0..count)
            .map(|i| {
                let at = REPORT_FIXED_LEN + 16 * i;
                (be_u64(b, at), be_u64(b, at + 8))
            })
            .collect();
        if lost.iter().any(|&(s, e)| s >= e || e > settled) {
            return Err(BadReport);
        }
        Ok(Report {
            largest: be_u64(b, 0),
            settled,
            ack_delay_us: be_u32(b, 16),
            rate_kib: be_u32(b, 20),
            lost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            flags: FLAG_END,
            token: 0x0102_0304_0506_0708,
            counter: 77,
            piece: 9,
            piece_len: 5000,
            offset: 1400,
        }
    }

    #[test]
    fn a_header_round_trips_and_is_checked() {
        let h = header();
        let b = h.encode();
        assert_eq!(Header::decode(&b, 1400, 1 << 20), Ok(h));
        assert_eq!(Header::token_of(&b), Some(h.token));
        assert_eq!(
            Header::decode(&b, 3601, 1 << 20),
            Err(DatagramError::BadRange)
        );
        assert_eq!(Header::decode(&b, 1400, 4999), Err(DatagramError::BadRange));
        assert_eq!(
            Header::decode(&b[..35], 0, 1 << 20),
            Err(DatagramError::Truncated)
        );
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(
            Header::decode(&bad, 1, 1 << 20),
            Err(DatagramError::BadMagic)
        );
        assert_eq!(Header::token_of(&bad), None);
        let mut bad = b;
        bad[3] = 0x80;
        assert_eq!(
            Header::decode(&bad, 1, 1 << 20),
            Err(DatagramError::Unsupported)
        );
    }

    #[test]
    fn a_report_round_trips_and_bad_ranges_are_refused() {
        let r = Report {
            largest: 100,
            settled: 90,
            ack_delay_us: 1234,
            rate_kib: 5,
            lost: vec![(3, 5), (80, 90)],
        };
        assert_eq!(Report::decode(&r.encode()), Ok(r.clone()));
        let mut beyond = r.clone();
        beyond.lost[1].1 = 91;
        assert_eq!(Report::decode(&beyond.encode()), Err(BadReport));
        let mut empty = r.clone();
        empty.lost[0] = (4, 4);
        assert_eq!(Report::decode(&empty.encode()), Err(BadReport));
        let b = r.encode();
        assert_eq!(Report::decode(&b[..b.len() - 1]), Err(BadReport));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Header::decode(&b, b.len().saturating_sub(HEADER_LEN), 1 << 20);
            let _ = Report::decode(&b);
        }
    }
}
