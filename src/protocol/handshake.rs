//! The per-connection handshake: tx sends a [`Hello`], rx answers a [`Reply`].
//!
//! ```text
//! Hello (44 bytes + extension):
//!   magic "VIAMPEDE" [8] | version u16 | flags u16 | checkphrase [4]
//!   | session id [16] | foot size u32 | window u32 | worker u16
//!   | extension length u16 | extension [..]
//! Reply (34 bytes + message + extension):
//!   magic "VIAMPEDE" [8] | version u16 | status u8 | reason u8 | flags u16
//!   | delivered u64 | receiver id [8] | message length u16
//!   | extension length u16
//!   | message (UTF-8) [..] | extension [..]
//! ```
//!
//! The first ten bytes (magic and version) of both messages stay the same in
//! every protocol version, so a peer speaking another version is answered
//! with a clear refusal rather than garbage. `flags` and the extension block
//! leave room for authentication data without changing the layout.

use super::{be_u16, be_u32, be_u64, MAX_EXTENSION, MAX_MESSAGE};
use std::fmt;

/// Opens every handshake message.
pub const MAGIC: [u8; 8] = *b"VIAMPEDE";

/// The protocol version this build speaks.
pub const VERSION: u16 = 2;

/// Hello flag: tx holds a key; the extension is its nonce, and rx must
/// answer with a challenge.
pub const FLAG_AUTH: u16 = 0x0001;
/// Hello flag: tx asks for encryption. Reply flag: the connection is sealed.
pub const FLAG_ENCRYPT: u16 = 0x0002;
/// Hello flag: tx asks for per-foot checksums. Reply flag: feet carry them.
pub const FLAG_CHECKSUMS: u16 = 0x0004;
/// Hello flag: tx asks to send feet as UDP datagrams (`--udp`). Reply
/// flag: rx agrees, and the extension starts with [`UDP_TERMS_LEN`] bytes:
/// its UDP port (u16) and the connection's datagram token (u64).
pub const FLAG_UDP: u16 = 0x0008;
/// Length of the UDP terms in a reply's extension.
pub const UDP_TERMS_LEN: usize = 10;
/// Hello flag: the stream has a name (`--name`): the extension's bytes
/// after the nonce (all of them without a key) are that name, one that
/// [`crate::protocol::check_name`] accepts.
pub const FLAG_NAME: u16 = 0x0010;
/// Every flag this version knows.
pub const KNOWN_FLAGS: u16 = FLAG_AUTH | FLAG_ENCRYPT | FLAG_CHECKSUMS | FLAG_UDP | FLAG_NAME;

/// Length of a [`Hello`] without its extension.
pub const HELLO_FIXED_LEN: usize = 44;

/// Length of a [`Reply`] without its message and extension.
pub const REPLY_FIXED_LEN: usize = 34;

/// tx's opening message on every connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Feature flags; none are defined in version 1, so they must be zero.
    pub flags: u16,
    /// The 4-byte phrase both sides must agree on.
    pub checkphrase: [u8; 4],
    /// Random id chosen by tx for the whole stream.
    pub session: [u8; 16],
    /// Largest foot payload tx will send.
    pub foot_size: u32,
    /// How many feet tx may run ahead of the receiver's written position.
    pub window: u32,
    /// Which tx worker opened this connection (for logs).
    pub worker: u16,
    /// Opaque extension data (reserved; empty in version 1).
    pub extension: Vec<u8>,
}

/// rx's verdict on a [`Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Go ahead and send feet.
    Accept = 0,
    /// The stream is already complete: every byte was written.
    Complete = 1,
    /// Refused; see the reason and message.
    Reject = 2,
    /// Prove the key: the extension is rx's nonce and rx's own proof; tx
    /// answers with its proof, and then gets the final reply.
    Challenge = 3,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// No refusal.
    None = 0,
    /// Another stream is in progress on this receiver.
    Busy = 1,
    /// The checkphrases differ.
    Checkphrase = 2,
    /// The protocol versions differ.
    Version = 3,
    /// Foot size or window is outside what the receiver accepts.
    Parameters = 4,
    /// The receiver's stream has failed (e.g. its output closed).
    Failed = 5,
    /// Keys missing on one side, or not matching.
    Auth = 6,
    /// A relay could not reach its next hop: try again, or elsewhere.
    Unavailable = 7,
    /// Anything else; see the message.
    Other = 255,
}

impl Reason {
    fn from_u8(b: u8) -> Reason {
        match b {
            0 => Reason::None,
            1 => Reason::Busy,
            2 => Reason::Checkphrase,
            3 => Reason::Version,
            4 => Reason::Parameters,
            5 => Reason::Failed,
            6 => Reason::Auth,
            7 => Reason::Unavailable,
            _ => Reason::Other,
        }
    }
}

/// rx's answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Accept, complete or reject.
    pub status: Status,
    /// Why, when rejected.
    pub reason: Reason,
    /// Feature flags (zero in version 1).
    pub flags: u16,
    /// Every foot below this id has been written by the receiver.
    pub delivered: u64,
    /// Random id of the receiving process, so tx can tell that all its
    /// destinations reach the same receiver, and that it was not restarted.
    pub receiver: [u8; 8],
    /// A human-readable explanation.
    pub message: String,
    /// Opaque extension data (reserved; empty in version 1).
    pub extension: Vec<u8>,
}

/// Why a handshake message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// More bytes are needed: the whole message is `need` bytes long.
    Truncated {
        /// Total length of the message once complete.
        need: usize,
    },
    /// The bytes do not start with [`MAGIC`]: not a viamillipede peer.
    BadMagic,
    /// The peer speaks another protocol version.
    Version(u16),
    /// A field is out of its allowed range.
    Invalid(&'static str),
    /// The connection failed or closed before the message was complete.
    Io(std::io::ErrorKind, String),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Truncated { need } => {
                write!(f, "truncated handshake ({need} bytes expected)")
            }
            HandshakeError::BadMagic => write!(f, "not a viamillipede handshake (bad magic)"),
            HandshakeError::Version(v) => {
                write!(
                    f,
                    "peer speaks protocol version {v}, this build speaks {VERSION}"
                )
            }
            HandshakeError::Invalid(what) => write!(f, "invalid handshake: {what}"),
            HandshakeError::Io(_, e) => write!(f, "handshake: {e}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// Checks magic and version, the part of the layout every version shares.
fn check_prefix(b: &[u8], fixed: usize) -> Result<(), HandshakeError> {
    let magic_len = b.len().min(MAGIC.len());
    if b[..magic_len] != MAGIC[..magic_len] {
        return Err(HandshakeError::BadMagic);
    }
    if b.len() < 10 {
        return Err(HandshakeError::Truncated { need: fixed });
    }
    let version = be_u16(b, 8);
    if version != VERSION {
        return Err(HandshakeError::Version(version));
    }
    if b.len() < fixed {
        return Err(HandshakeError::Truncated { need: fixed });
    }
    Ok(())
}

impl Hello {
    /// Appends the encoded hello to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        assert!(self.extension.len() <= MAX_EXTENSION, "extension too long");
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.checkphrase);
        out.extend_from_slice(&self.session);
        out.extend_from_slice(&self.foot_size.to_be_bytes());
        out.extend_from_slice(&self.window.to_be_bytes());
        out.extend_from_slice(&self.worker.to_be_bytes());
        out.extend_from_slice(&(self.extension.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.extension);
    }

    /// Decodes a hello from the start of `b`, returning it and its length.
    pub fn decode(b: &[u8]) -> Result<(Hello, usize), HandshakeError> {
        check_prefix(b, HELLO_FIXED_LEN)?;
        let ext_len = be_u16(b, 42) as usize;
        if ext_len > MAX_EXTENSION {
            return Err(HandshakeError::Invalid("extension too long"));
        }
        let need = HELLO_FIXED_LEN + ext_len;
        if b.len() < need {
            return Err(HandshakeError::Truncated { need });
        }
        let hello = Hello {
            flags: be_u16(b, 10),
            checkphrase: b[12..16].try_into().expect("4 bytes"),
            session: b[16..32].try_into().expect("16 bytes"),
            foot_size: be_u32(b, 32),
            window: be_u32(b, 36),
            worker: be_u16(b, 40),
            extension: b[HELLO_FIXED_LEN..need].to_vec(),
        };
        Ok((hello, need))
    }
}

impl Reply {
    /// An acceptance, telling tx how far the receiver has written.
    pub fn accept(delivered: u64) -> Reply {
        Reply::new(Status::Accept, Reason::None, delivered, String::new())
    }

    /// A refusal with a reason and a message for the sender's user.
    pub fn reject(reason: Reason, message: impl Into<String>) -> Reply {
        Reply::new(Status::Reject, reason, 0, message.into())
    }

    /// A reply with every field given.
    pub fn new(status: Status, reason: Reason, delivered: u64, message: String) -> Reply {
        Reply {
            status,
            reason,
            flags: 0,
            delivered,
            receiver: [0; 8],
            message,
            extension: Vec::new(),
        }
    }

    /// Appends the encoded reply to `out`; an over-long message is cut at a
    /// character boundary.
    pub fn encode(&self, out: &mut Vec<u8>) {
        assert!(self.extension.len() <= MAX_EXTENSION, "extension too long");
        let message = truncate_utf8(&self.message, MAX_MESSAGE);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.push(self.status as u8);
        out.push(self.reason as u8);
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.delivered.to_be_bytes());
        out.extend_from_slice(&self.receiver);
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.extension.len() as u16).to_be_bytes());
        out.extend_from_slice(message.as_bytes());
        out.extend_from_slice(&self.extension);
    }

    /// Decodes a reply from the start of `b`, returning it and its length.
    pub fn decode(b: &[u8]) -> Result<(Reply, usize), HandshakeError> {
        check_prefix(b, REPLY_FIXED_LEN)?;
        let status = match b[10] {
            0 => Status::Accept,
            1 => Status::Complete,
            2 => Status::Reject,
            3 => Status::Challenge,
            _ => return Err(HandshakeError::Invalid("unknown status")),
        };
        let msg_len = be_u16(b, 30) as usize;
        let ext_len = be_u16(b, 32) as usize;
        if msg_len > MAX_MESSAGE {
            return Err(HandshakeError::Invalid("message too long"));
        }
        if ext_len > MAX_EXTENSION {
            return Err(HandshakeError::Invalid("extension too long"));
        }
        let need = REPLY_FIXED_LEN + msg_len + ext_len;
        if b.len() < need {
            return Err(HandshakeError::Truncated { need });
        }
        let msg_end = REPLY_FIXED_LEN + msg_len;
        let reply = Reply {
            status,
            reason: Reason::from_u8(b[11]),
            flags: be_u16(b, 12),
            delivered: be_u64(b, 14),
            receiver: b[22..30].try_into().expect("8 bytes"),
            message: String::from_utf8_lossy(&b[REPLY_FIXED_LEN..msg_end]).into_owned(),
            extension: b[msg_end..need].to_vec(),
        };
        Ok((reply, need))
    }
}

/// Opens a connection that rx dialed (reverse mode, `rx --connect`): which
/// of rx's ranked destinations it went through, and its number there, so
/// tx can rank it. Then tx sends its [`Hello`] as usual.
///
/// ```text
/// magic "VIAMDIAL" [8] | version u16 | rank u16 | index u16
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dial {
    /// Position of the destination in rx's `--connect` list.
    pub rank: u16,
    /// Which of that destination's connections this is.
    pub index: u16,
}

/// The magic of a [`Dial`].
pub const DIAL_MAGIC: [u8; 8] = *b"VIAMDIAL";
/// Length of a [`Dial`].
pub const DIAL_LEN: usize = 14;

impl Dial {
    /// Encodes the dial preamble.
    pub fn encode(&self) -> [u8; DIAL_LEN] {
        let mut b = [0u8; DIAL_LEN];
        b[..8].copy_from_slice(&DIAL_MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_be_bytes());
        b[10..12].copy_from_slice(&self.rank.to_be_bytes());
        b[12..14].copy_from_slice(&self.index.to_be_bytes());
        b
    }

    /// Decodes a dial preamble.
    pub fn decode(b: &[u8]) -> Result<Dial, HandshakeError> {
        let magic_len = b.len().min(DIAL_MAGIC.len());
        if b[..magic_len] != DIAL_MAGIC[..magic_len] {
            return Err(HandshakeError::BadMagic);
        }
        if b.len() < DIAL_LEN {
            return Err(HandshakeError::Truncated { need: DIAL_LEN });
        }
        let version = be_u16(b, 8);
        if version != VERSION {
            return Err(HandshakeError::Version(version));
        }
        Ok(Dial {
            rank: be_u16(b, 10),
            index: be_u16(b, 12),
        })
    }
}

/// The longest prefix of `s` that fits in `max` bytes without splitting a
/// character.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello {
            flags: 0,
            checkphrase: *b"abcd",
            session: [7; 16],
            foot_size: 2 << 20,
            window: 64,
            worker: 3,
            extension: vec![1, 2, 3],
        }
    }

    #[test]
    fn hello_round_trip() {
        let mut b = Vec::new();
        hello().encode(&mut b);
        assert_eq!(b.len(), HELLO_FIXED_LEN + 3);
        assert_eq!(Hello::decode(&b), Ok((hello(), b.len())));
    }

    #[test]
    fn hello_truncation_says_how_much_is_needed() {
        let mut b = Vec::new();
        hello().encode(&mut b);
        for n in 10..HELLO_FIXED_LEN {
            assert_eq!(
                Hello::decode(&b[..n]),
                Err(HandshakeError::Truncated {
                    need: HELLO_FIXED_LEN
                })
            );
        }
        assert_eq!(
            Hello::decode(&b[..HELLO_FIXED_LEN + 1]),
            Err(HandshakeError::Truncated {
                need: HELLO_FIXED_LEN + 3
            })
        );
    }

    #[test]
    fn garbage_and_other_versions_are_named() {
        assert_eq!(
            Hello::decode(b"GET / HTTP/1.1\r\n"),
            Err(HandshakeError::BadMagic)
        );
        assert_eq!(
            Hello::decode(b"VIA"),
            Err(HandshakeError::Truncated {
                need: HELLO_FIXED_LEN
            })
        );
        assert_eq!(Hello::decode(b"VIX"), Err(HandshakeError::BadMagic));
        let mut b = Vec::new();
        hello().encode(&mut b);
        b[9] = 9;
        assert_eq!(Hello::decode(&b), Err(HandshakeError::Version(9)));
    }

    #[test]
    fn reply_round_trip_and_long_messages_are_cut() {
        let long = "é".repeat(MAX_MESSAGE);
        let r = Reply::reject(Reason::Busy, long.clone());
        let mut b = Vec::new();
        r.encode(&mut b);
        let (d, n) = Reply::decode(&b).unwrap();
        assert_eq!(n, b.len());
        assert_eq!(d.reason, Reason::Busy);
        assert_eq!(d.status, Status::Reject);
        assert_eq!(d.message, truncate_utf8(&long, MAX_MESSAGE));
        assert!(d.message.len() <= MAX_MESSAGE);

        let mut accept = Reply::accept(42);
        accept.receiver = *b"rx-12345";
        let mut b = Vec::new();
        accept.encode(&mut b);
        assert_eq!(b.len(), REPLY_FIXED_LEN);
        assert_eq!(Reply::decode(&b).unwrap().0, accept);
    }

    #[test]
    fn reply_with_oversize_fields_is_rejected() {
        let mut b = Vec::new();
        Reply::accept(0).encode(&mut b);
        b[30..32].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            Reply::decode(&b),
            Err(HandshakeError::Invalid("message too long"))
        );
    }

    #[test]
    fn dials_round_trip_and_garbage_is_named() {
        let d = Dial { rank: 2, index: 15 };
        assert_eq!(Dial::decode(&d.encode()), Ok(d));
        assert_eq!(Dial::decode(b"GET /"), Err(HandshakeError::BadMagic));
        assert_eq!(
            Dial::decode(&d.encode()[..9]),
            Err(HandshakeError::Truncated { need: DIAL_LEN })
        );
        let mut b = d.encode();
        b[9] = 7;
        assert_eq!(Dial::decode(&b), Err(HandshakeError::Version(7)));
    }

    proptest! {
        #[test]
        fn dial_decoder_never_panics(b in proptest::collection::vec(any::<u8>(), 0..20)) {
            let _ = Dial::decode(&b);
        }

        #[test]
        fn hello_decoder_never_panics(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Hello::decode(&b);
        }

        #[test]
        fn reply_decoder_never_panics(mut b in proptest::collection::vec(any::<u8>(), 0..80), magic: bool) {
            if magic && b.len() >= 10 {
                b[..8].copy_from_slice(&MAGIC);
                b[8..10].copy_from_slice(&VERSION.to_be_bytes());
            }
            let _ = Reply::decode(&b);
        }

        #[test]
        fn any_hello_round_trips(flags: u16, cp: [u8; 4], session: [u8; 16], foot: u32, window: u32,
                                 worker: u16, ext in proptest::collection::vec(any::<u8>(), 0..64)) {
            let h = Hello { flags, checkphrase: cp, session, foot_size: foot, window, worker, extension: ext };
            let mut b = Vec::new();
            h.encode(&mut b);
            prop_assert_eq!(Hello::decode(&b), Ok((h, b.len())));
        }
    }
}
