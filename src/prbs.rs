//! A pseudo-random bit stream for testing a path without disks: tx sends
//! it instead of stdin (`prbs SEED`), rx given the same seed checks what it
//! writes against it and reports the first byte that differs.
//!
//! The stream depends only on the seed, never on how it is read in pieces.

use std::io::{self, Read};

/// The byte stream of one seed.
#[derive(Clone, Debug)]
pub struct Prbs {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Prbs {
    /// The stream for `seed` (every seed, zero included, gives a stream).
    pub fn new(seed: u64) -> Prbs {
        // splitmix64 spreads small seeds; xorshift must not start at zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Prbs {
            state: (z ^ (z >> 31)) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.used < 8 {
            buf[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let mut words = buf[i..].chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_word());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            tail.copy_from_slice(&self.word[..tail.len()]);
            self.used = tail.len();
        }
    }
}

impl Read for Prbs {
    /// Never ends: bound it with `leglimit` or by the reader.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.fill(buf);
        Ok(buf.len())
    }
}

/// Checks a stream, piece by piece, against the stream of a seed.
#[derive(Debug)]
pub struct Verifier {
    expected: Prbs,
    offset: u64,
    mismatch: Option<u64>,
    scratch: Vec<u8>,
}

impl Verifier {
    /// A verifier for `seed`'s stream.
    pub fn new(seed: u64) -> Verifier {
        Verifier {
            expected: Prbs::new(seed),
            offset: 0,
            mismatch: None,
            scratch: Vec::new(),
        }
    }

    /// Checks the next piece of the stream.
    pub fn check(&mut self, data: &[u8]) {
        if self.mismatch.is_none() {
            self.scratch.resize(data.len(), 0);
            self.expected.fill(&mut self.scratch);
            if let Some(i) = data.iter().zip(&self.scratch).position(|(a, b)| a != b) {
                self.mismatch = Some(self.offset + i as u64);
            }
        }
        self.offset += data.len() as u64;
    }

    /// The offset of the first byte that differed, if any.
    pub fn mismatch(&self) -> Option<u64> {
        self.mismatch
    }

    /// Bytes checked so far.
    pub fn checked(&self) -> u64 {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_does_not_depend_on_how_it_is_read() {
        let mut whole = vec![0u8; 1000];
        Prbs::new(5).fill(&mut whole);
        let mut pieces = Vec::new();
        let mut p = Prbs::new(5);
        for n in [1, 7, 8, 9, 3, 100, 872] {
            let mut b = vec![0u8; n];
            p.fill(&mut b);
            pieces.extend(b);
        }
        assert_eq!(pieces, whole);
        let mut other = vec![0u8; 1000];
        Prbs::new(6).fill(&mut other);
        assert_ne!(other, whole);
    }

    #[test]
    fn the_verifier_finds_the_first_difference() {
        let mut data = vec![0u8; 500];
        Prbs::new(1).fill(&mut data);
        let mut v = Verifier::new(1);
        v.check(&data[..123]);
        v.check(&data[123..]);
        assert_eq!((v.mismatch(), v.checked()), (None, 500));
        data[321] ^= 4;
        data[400] ^= 4;
        let mut v = Verifier::new(1);
        v.check(&data[..300]);
        v.check(&data[300..]);
        assert_eq!(v.mismatch(), Some(321));
        assert_eq!(Verifier::new(2).mismatch(), None);
    }
}
