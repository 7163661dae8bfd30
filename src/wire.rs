//! Blocking frame and handshake I/O on top of [`crate::protocol`].
//!
//! These are the only functions that move protocol bytes through a
//! `Read`/`Write`; every length is checked by the codecs before a buffer is
//! sized from it.

use crate::crypto::{Opener, Sealer, TAG_LEN};
use crate::pool::Buffer;
use crate::protocol::{
    FrameError, HandshakeError, Header, Hello, Kind, Reply, HEADER_LEN, MAX_EXTENSION, MAX_MESSAGE,
};
use std::io::{self, IoSlice, Read, Write};

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn invalid_msg(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Length of a foot's checksum, when checksums are on.
pub const CHECKSUM_LEN: usize = 8;

/// A foot's checksum: xxh3-64 of its payload, big-endian.
pub fn checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    xxhash_rust::xxh3::xxh3_64(payload).to_be_bytes()
}

/// Reads one frame header; decoding failures become `InvalidData` errors.
pub fn read_header<R: Read>(r: &mut R, max_foot: u32) -> io::Result<Header> {
    let mut b = [0u8; HEADER_LEN];
    r.read_exact(&mut b)?;
    Header::decode(&b, max_foot).map_err(invalid)
}

/// Reads a short frame payload (an abort's message) of exactly `len` bytes;
/// the header decoder has already bounded `len`.
pub fn read_payload<R: Read>(r: &mut R, len: u32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes all of `bufs`, with as few system calls as the kernel allows.
fn write_all_vectored<W: Write>(w: &mut W, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut bufs = bufs;
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a header and its payload, with one system call where possible.
pub fn write_frame<W: Write>(w: &mut W, header: &Header, payload: &[u8]) -> io::Result<()> {
    debug_assert_eq!(header.len as usize, payload.len());
    let head = header.encode();
    write_all_vectored(w, &mut [IoSlice::new(&head), IoSlice::new(payload)])
}

/// Writes a payload-less control frame.
pub fn write_control<W: Write>(w: &mut W, header: &Header) -> io::Result<()> {
    w.write_all(&header.encode())
}

/// The sending half of a connection: frames go out plain, or with a tag
/// (sealed when the connection is encrypted, authenticated in the clear
/// otherwise) when it is keyed.
#[derive(Debug)]
pub struct FrameWriter<W> {
    w: W,
    sealer: Option<Sealer>,
    scratch: Vec<u8>,
    checksums: bool,
    sent: u64,
}

impl<W: Write> FrameWriter<W> {
    /// Frames to `w`, protected by `sealer` if given.
    pub fn new(w: W, sealer: Option<Sealer>) -> FrameWriter<W> {
        FrameWriter {
            w,
            sealer,
            scratch: Vec::new(),
            checksums: false,
            sent: 0,
        }
    }

    /// Appends an xxh3 checksum of each foot's payload to the foot.
    pub fn with_checksums(mut self, on: bool) -> FrameWriter<W> {
        self.checksums = on;
        self
    }

    /// Sends one frame; `header.len` is the plain payload's length.
    pub fn send(&mut self, header: &Header, payload: &[u8]) -> io::Result<()> {
        debug_assert_eq!(header.len as usize, payload.len());
        let sum = (self.checksums && header.kind == Kind::Foot).then(|| checksum(payload));
        let trailer: &[u8] = match &sum {
            Some(sum) => sum,
            None => &[],
        };
        let Some(sealer) = &mut self.sealer else {
            let plain = Header {
                len: header.len + trailer.len() as u32,
                ..*header
            };
            let head = plain.encode();
            let mut bufs = [
                IoSlice::new(&head),
                IoSlice::new(payload),
                IoSlice::new(trailer),
            ];
            write_all_vectored(&mut self.w, &mut bufs)?;
            self.sent += (HEADER_LEN + payload.len() + trailer.len()) as u64;
            return Ok(());
        };
        // The header, with the tag counted in its length, is covered too.
        let sealed = Header {
            len: header.len + (trailer.len() + TAG_LEN) as u32,
            ..*header
        };
        let head = sealed.encode();
        if !sealer.encrypts() {
            // Authenticated only: the payload goes as it is, no copy.
            let tag = sealer.sign(&head, &[payload, trailer]);
            let mut bufs = [
                IoSlice::new(&head),
                IoSlice::new(payload),
                IoSlice::new(trailer),
                IoSlice::new(&tag),
            ];
            write_all_vectored(&mut self.w, &mut bufs)?;
            self.sent += (HEADER_LEN + payload.len() + trailer.len() + TAG_LEN) as u64;
            return Ok(());
        }
        // The shared foot may be sent again elsewhere, so it is sealed in a
        // copy.
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        self.scratch.extend_from_slice(trailer);
        let tag = sealer.seal(&head, &mut self.scratch);
        let mut bufs = [
            IoSlice::new(&head),
            IoSlice::new(&self.scratch),
            IoSlice::new(&tag),
        ];
        write_all_vectored(&mut self.w, &mut bufs)?;
        self.sent += (HEADER_LEN + self.scratch.len() + TAG_LEN) as u64;
        Ok(())
    }

    /// Bytes sent on the wire so far: headers, payloads, checksums, tags.
    pub fn wire_bytes(&self) -> u64 {
        self.sent
    }

    /// Writes a plain foot's header and only the first part of its payload:
    /// a broken frame, for fault injection.
    pub fn send_partial(&mut self, header: &Header, part: &[u8]) -> io::Result<()> {
        let head = header.encode();
        write_all_vectored(&mut self.w, &mut [IoSlice::new(&head), IoSlice::new(part)])
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.w
    }
}

/// The receiving half of a connection: headers are checked before any
/// payload is read, and sealed frames are opened (or refused) before their
/// payload is used.
#[derive(Debug)]
pub struct FrameReader<R> {
    r: R,
    opener: Option<Opener>,
    max_foot: u32,
    checksums: bool,
    received: u64,
    /// The last header as received: the associated data of its payload.
    raw: [u8; HEADER_LEN],
}

impl<R: Read> FrameReader<R> {
    /// Frames from `r`, feet at most `max_foot` bytes, opened with `opener`
    /// if given.
    pub fn new(r: R, opener: Option<Opener>, max_foot: u32) -> FrameReader<R> {
        FrameReader {
            r,
            opener,
            max_foot,
            checksums: false,
            received: 0,
            raw: [0; HEADER_LEN],
        }
    }

    /// Expects an xxh3 checksum after each foot's payload, and checks it.
    pub fn with_checksums(mut self, on: bool) -> FrameReader<R> {
        self.checksums = on;
        self
    }

    fn tag_len(&self) -> u32 {
        if self.opener.is_some() {
            TAG_LEN as u32
        } else {
            0
        }
    }

    fn trailer_len(&self, kind: Kind) -> u32 {
        if self.checksums && kind == Kind::Foot {
            CHECKSUM_LEN as u32
        } else {
            0
        }
    }

    /// Reads the next header; its `len` is the plain payload's length. The
    /// payload must be read next, with [`FrameReader::payload`] (also for
    /// frames without one, whose tag it checks).
    pub fn header(&mut self) -> io::Result<Header> {
        self.r.read_exact(&mut self.raw)?;
        self.received += HEADER_LEN as u64;
        let tag = self.tag_len();
        // A foot may carry its checksum beyond the foot size.
        let max_foot = self
            .max_foot
            .saturating_add(CHECKSUM_LEN as u32 * u32::from(self.checksums));
        let mut h = Header::decode_sealed(&self.raw, max_foot, tag).map_err(invalid)?;
        let trailer = self.trailer_len(h.kind);
        if h.len - tag < trailer {
            return Err(invalid_msg("foot too short to hold its checksum"));
        }
        h.len -= tag + trailer;
        Ok(h)
    }

    /// Reads the payload of the header just read into `buf` (exactly
    /// `header.len` bytes), opening it on a sealed connection and checking
    /// a foot's checksum.
    pub fn payload(&mut self, header: &Header, buf: &mut Buffer) -> io::Result<()> {
        let trailer = self.trailer_len(header.kind) as usize;
        buf.read_exact_from(&mut self.r, header.len as usize + trailer)?;
        self.received += (header.len as usize + trailer) as u64;
        self.open(buf.content_mut())?;
        if trailer > 0 {
            let n = header.len as usize;
            if buf[n..] != checksum(&buf[..n]) {
                return Err(invalid_msg("foot checksum mismatch"));
            }
            buf.truncate(n);
        }
        Ok(())
    }

    /// Reads a short payload (an abort's message) into a fresh vector.
    pub fn small_payload(&mut self, header: &Header) -> io::Result<Vec<u8>> {
        let mut data = read_payload(&mut self.r, header.len)?;
        self.received += u64::from(header.len);
        self.open(&mut data)?;
        Ok(data)
    }

    fn open(&mut self, data: &mut [u8]) -> io::Result<()> {
        let Some(opener) = &mut self.opener else {
            return Ok(());
        };
        let mut tag = [0u8; TAG_LEN];
        self.r.read_exact(&mut tag)?;
        self.received += TAG_LEN as u64;
        opener.open(&self.raw, data, &tag).map_err(invalid)
    }

    /// Bytes received on the wire so far: headers, payloads, checksums, tags.
    pub fn wire_bytes(&self) -> u64 {
        self.received
    }

    /// The underlying reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }
}

/// Reads a length-prefixed handshake message: starts with the fixed part and
/// reads more only as far as the decoder asks, never beyond `limit` bytes.
/// Returns the message and its bytes as they came.
fn read_message<R: Read, T>(
    r: &mut R,
    fixed: usize,
    limit: usize,
    decode: impl Fn(&[u8]) -> Result<(T, usize), HandshakeError>,
) -> Result<(T, Vec<u8>), HandshakeError> {
    let mut buf = vec![0u8; fixed];
    let mut have = 0;
    loop {
        if let Err(e) = fill(r, &mut buf, &mut have) {
            // A stream that ends early still gets its prefix checked, so
            // garbage is reported as garbage rather than as a short read.
            return match decode(&buf[..have]) {
                Err(HandshakeError::Truncated { .. }) | Ok(_) => Err(io_error(e)),
                Err(other) => Err(other),
            };
        }
        match decode(&buf) {
            Ok((msg, _)) => return Ok((msg, buf)),
            Err(HandshakeError::Truncated { need }) if need > buf.len() && need <= limit => {
                buf.resize(need, 0)
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads until `buf` is full, keeping count in `have` even on failure.
fn fill<R: Read>(r: &mut R, buf: &mut [u8], have: &mut usize) -> io::Result<()> {
    while *have < buf.len() {
        match r.read(&mut buf[*have..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => *have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn io_error(e: io::Error) -> HandshakeError {
    HandshakeError::Io(e.kind(), e.to_string())
}

/// Reads a [`Hello`] and its bytes.
pub fn read_hello_bytes<R: Read>(r: &mut R) -> Result<(Hello, Vec<u8>), HandshakeError> {
    use crate::protocol::handshake::HELLO_FIXED_LEN;
    read_message(
        r,
        HELLO_FIXED_LEN,
        HELLO_FIXED_LEN + MAX_EXTENSION,
        Hello::decode,
    )
}

/// Reads a [`Hello`].
pub fn read_hello<R: Read>(r: &mut R) -> Result<Hello, HandshakeError> {
    read_hello_bytes(r).map(|(h, _)| h)
}

/// Reads a [`Reply`] and its bytes.
pub fn read_reply_bytes<R: Read>(r: &mut R) -> Result<(Reply, Vec<u8>), HandshakeError> {
    use crate::protocol::handshake::REPLY_FIXED_LEN;
    read_message(
        r,
        REPLY_FIXED_LEN,
        REPLY_FIXED_LEN + MAX_MESSAGE + MAX_EXTENSION,
        Reply::decode,
    )
}

/// Reads a [`Reply`].
pub fn read_reply<R: Read>(r: &mut R) -> Result<Reply, HandshakeError> {
    read_reply_bytes(r).map(|(r, _)| r)
}

/// Maps a frame decoding error into an I/O error (for `?` in I/O loops).
pub fn frame_error(e: FrameError) -> io::Error {
    invalid(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Kind, Reason};

    #[test]
    fn frames_round_trip_through_a_buffer() {
        let mut b = Vec::new();
        write_frame(&mut b, &Header::foot(5, 3, false), b"abc").unwrap();
        write_control(&mut b, &Header::control(Kind::Ack, 5)).unwrap();
        let mut r = &b[..];
        let h = read_header(&mut r, 10).unwrap();
        assert_eq!(read_payload(&mut r, h.len).unwrap(), b"abc");
        assert_eq!(
            read_header(&mut r, 10).unwrap(),
            Header::control(Kind::Ack, 5)
        );
        assert_eq!(
            read_header(&mut r, 10).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn sealed_frames_round_trip_and_tampering_is_refused() {
        let key = crate::crypto::test_key(9);
        let (seal, _) = key.channel(b"t", b"r", true, true);
        let mut w = FrameWriter::new(Vec::new(), Some(seal));
        w.send(&Header::foot(0, 5, false), b"hello").unwrap();
        w.send(&Header::foot(1, 0, true), b"").unwrap();
        let wire = w.get_ref().clone();
        assert_eq!(wire.len(), 2 * (HEADER_LEN + TAG_LEN) + 5);
        assert!(
            !wire.windows(5).any(|x| x == b"hello"),
            "payload sent in the clear"
        );

        let read_all = |bytes: &[u8]| -> io::Result<Vec<(Header, Vec<u8>)>> {
            let (_, open) = key.channel(b"t", b"r", false, true);
            let mut r = FrameReader::new(bytes, Some(open), 10);
            let mut out = Vec::new();
            for _ in 0..2 {
                let h = r.header()?;
                let mut buf = Buffer::default();
                r.payload(&h, &mut buf)?;
                out.push((h, buf.to_vec()));
            }
            Ok(out)
        };
        let frames = read_all(&wire).unwrap();
        assert_eq!(frames[0], (Header::foot(0, 5, false), b"hello".to_vec()));
        assert_eq!(frames[1], (Header::foot(1, 0, true), Vec::new()));
        for i in [0, 9, HEADER_LEN + 2, HEADER_LEN + 5 + 3, wire.len() - 1] {
            let mut bad = wire.clone();
            bad[i] ^= 1;
            let e = read_all(&bad).unwrap_err();
            assert_eq!(
                e.kind(),
                io::ErrorKind::InvalidData,
                "flip at {i} went unnoticed"
            );
        }
    }

    #[test]
    fn short_payload_is_an_error() {
        let mut b = Vec::new();
        write_frame(&mut b, &Header::foot(5, 3, false), b"abc").unwrap();
        b.pop();
        let mut r = &b[..];
        let h = read_header(&mut r, 10).unwrap();
        assert_eq!(
            read_payload(&mut r, h.len).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn handshake_runs_in_memory() {
        let mut b = Vec::new();
        let reply = Reply::reject(Reason::Checkphrase, "checkphrase mismatch");
        reply.encode(&mut b);
        assert_eq!(read_reply(&mut &b[..]).unwrap(), reply);
        assert_eq!(
            read_hello(&mut &b"hello there, I am not a peer at all........."[..]),
            Err(HandshakeError::BadMagic)
        );
        assert!(matches!(
            read_hello(&mut &b"VIAMPE"[..]),
            Err(HandshakeError::Io(..))
        ));
        assert_eq!(read_hello(&mut &b"GET"[..]), Err(HandshakeError::BadMagic));
    }
}
