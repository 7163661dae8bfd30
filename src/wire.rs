//! Blocking frame and handshake I/O on top of [`crate::protocol`].
//!
//! These are the only functions that move protocol bytes through a
//! `Read`/`Write`; every length is checked by the codecs before a buffer is
//! sized from it.

use crate::protocol::{
    FrameError, HandshakeError, Header, Hello, Reply, HEADER_LEN, MAX_EXTENSION, MAX_MESSAGE,
};
use std::io::{self, IoSlice, Read, Write};

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
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

/// Writes a header and its payload, with one system call where possible.
pub fn write_frame<W: Write>(w: &mut W, header: &Header, payload: &[u8]) -> io::Result<()> {
    debug_assert_eq!(header.len as usize, payload.len());
    let head = header.encode();
    let mut bufs = [IoSlice::new(&head), IoSlice::new(payload)];
    let mut bufs = &mut bufs[..];
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

/// Writes a payload-less control frame.
pub fn write_control<W: Write>(w: &mut W, header: &Header) -> io::Result<()> {
    w.write_all(&header.encode())
}

/// Reads a length-prefixed handshake message: starts with the fixed part and
/// reads more only as far as the decoder asks, never beyond `limit` bytes.
fn read_message<R: Read, T>(
    r: &mut R,
    fixed: usize,
    limit: usize,
    decode: impl Fn(&[u8]) -> Result<(T, usize), HandshakeError>,
) -> Result<T, HandshakeError> {
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
            Ok((msg, _)) => return Ok(msg),
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

/// Reads a [`Hello`].
pub fn read_hello<R: Read>(r: &mut R) -> Result<Hello, HandshakeError> {
    use crate::protocol::handshake::HELLO_FIXED_LEN;
    read_message(
        r,
        HELLO_FIXED_LEN,
        HELLO_FIXED_LEN + MAX_EXTENSION,
        Hello::decode,
    )
}

/// Reads a [`Reply`].
pub fn read_reply<R: Read>(r: &mut R) -> Result<Reply, HandshakeError> {
    use crate::protocol::handshake::REPLY_FIXED_LEN;
    read_message(
        r,
        REPLY_FIXED_LEN,
        REPLY_FIXED_LEN + MAX_MESSAGE + MAX_EXTENSION,
        Reply::decode,
    )
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
