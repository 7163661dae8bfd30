//! Reusable foot buffers.
//!
//! A foot is megabytes; allocating a fresh one per foot costs page faults
//! and kernel zeroing on every foot once the allocator hands freed memory
//! back to the system, which on loopback doubles the CPU time of a
//! single-connection transfer. A [`Buffer`] goes back to its [`Pool`] when
//! dropped, so the steady state allocates nothing. The pool holds at most
//! as many buffers as the window, so it never raises the memory bound.
//!
//! Buffers are zeroed once, when first allocated, and then read into as
//! whole slices: each `read` asks for everything still missing, where
//! filling spare capacity (`read_to_end`) starts with small reads.

use crossbeam_channel::{Receiver, Sender};
use std::io::{self, Read};
use std::ops::Deref;
use std::sync::Arc;

/// A bounded stock of buffers of one capacity.
#[derive(Clone, Debug)]
pub struct Pool {
    put: Sender<Vec<u8>>,
    get: Receiver<Vec<u8>>,
    capacity: usize,
}

impl Pool {
    /// A pool keeping up to `count` buffers of `capacity` bytes.
    pub fn new(count: usize, capacity: usize) -> Pool {
        let (put, get) = crossbeam_channel::bounded(count.max(1));
        Pool { put, get, capacity }
    }

    /// A buffer for `len` bytes: the pool's, when `len` is most of its
    /// capacity; otherwise one of its own of just that size, so small
    /// pieces do not each hold a whole foot of memory.
    pub fn take_for(&self, len: usize) -> Buffer {
        if len > self.capacity / 2 {
            self.take()
        } else {
            Buffer::default()
        }
    }

    /// An empty buffer with the pool's capacity, reused when one is free.
    pub fn take(&self) -> Buffer {
        let data = self
            .get
            .try_recv()
            .unwrap_or_else(|_| vec![0; self.capacity]);
        Buffer {
            data,
            len: 0,
            home: Some(self.put.clone()),
        }
    }
}

/// Bytes that return to their pool when dropped.
#[derive(Debug, Default)]
pub struct Buffer {
    /// Initialised storage; only `..len` is content.
    data: Vec<u8>,
    len: usize,
    home: Option<Sender<Vec<u8>>>,
}

impl Buffer {
    fn storage(&mut self, n: usize) -> &mut [u8] {
        if self.data.len() < n {
            self.data.resize(n, 0);
        }
        &mut self.data[..n]
    }

    /// Replaces the content with exactly `n` bytes from `r`; an early end is
    /// an `UnexpectedEof` error.
    pub fn read_exact_from(&mut self, r: &mut impl Read, n: usize) -> io::Result<()> {
        self.len = 0;
        r.read_exact(self.storage(n))?;
        self.len = n;
        Ok(())
    }

    /// Replaces the content with what one read of up to `n` bytes returns
    /// (nothing only at the end of the input).
    pub fn read_some_from(&mut self, r: &mut impl Read, n: usize) -> io::Result<usize> {
        self.len = 0;
        let buf = self.storage(n);
        let got = loop {
            match r.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        self.len = got;
        Ok(got)
    }

    /// Replaces the content with up to `n` bytes from `r`, stopping short
    /// only at the end of the input; returns how many were read.
    pub fn read_full_from(&mut self, r: &mut impl Read, n: usize) -> io::Result<usize> {
        self.len = 0;
        let mut filled = 0;
        let buf = self.storage(n);
        while filled < n {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.len = filled;
                    return Err(e);
                }
            }
        }
        self.len = filled;
        Ok(filled)
    }
}

impl Buffer {
    /// Replaces the content with what `fill` writes into at most `max`
    /// bytes (it returns how many it wrote): for decompressing into a buffer.
    pub fn fill_with(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.len = 0;
        let n = fill(self.storage(max))?;
        self.len = n.min(max);
        Ok(self.len)
    }

    /// Keeps only the first `n` bytes of the content.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// The content in a buffer of its own size when it uses less than half
    /// of this one's memory (this one goes back to its pool).
    pub fn compact(self) -> Buffer {
        if self.len > self.data.len() / 2 {
            return self;
        }
        Buffer::from(self.to_vec())
    }

    /// The content, for decrypting in place.
    pub fn content_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl From<Vec<u8>> for Buffer {
    /// A buffer that belongs to no pool.
    fn from(data: Vec<u8>) -> Buffer {
        let len = data.len();
        Buffer {
            data,
            len,
            home: None,
        }
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl PartialEq for Buffer {
    fn eq(&self, other: &Buffer) -> bool {
        **self == **other
    }
}

impl Eq for Buffer {}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            // A full pool just lets the buffer go.
            let _ = home.try_send(std::mem::take(&mut self.data));
        }
    }
}

/// A read-only view of part of a [`Buffer`], cheap to clone and to cut:
/// pieces cut from one buffer share its memory, which goes back to the pool
/// with the last of them.
#[derive(Clone, Debug)]
pub struct Shared {
    buf: Arc<Buffer>,
    start: usize,
    end: usize,
}

impl Shared {
    /// Cuts off the first `n` bytes (at most all of them) as a view of
    /// their own; `self` keeps the rest.
    pub fn split_to(&mut self, n: usize) -> Shared {
        let at = self.start + n.min(self.len());
        let head = Shared {
            buf: Arc::clone(&self.buf),
            start: self.start,
            end: at,
        };
        self.start = at;
        head
    }
}

impl From<Buffer> for Shared {
    fn from(buf: Buffer) -> Shared {
        let end = buf.len();
        Shared {
            buf: Arc::new(buf),
            start: 0,
            end,
        }
    }
}

impl From<Vec<u8>> for Shared {
    /// A view of bytes that belong to no pool.
    fn from(data: Vec<u8>) -> Shared {
        Buffer::from(data).into()
    }
}

impl Deref for Shared {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl PartialEq for Shared {
    fn eq(&self, other: &Shared) -> bool {
        **self == **other
    }
}

impl Eq for Shared {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_and_keep_their_memory() {
        let pool = Pool::new(2, 1024);
        let mut b = pool.take();
        b.read_exact_from(&mut &b"hello"[..], 5).unwrap();
        assert_eq!(&*b, b"hello");
        let ptr = b.as_ptr();
        drop(b);
        let b = pool.take();
        assert!(b.is_empty());
        assert_eq!(b.as_ptr(), ptr);
    }

    #[test]
    fn a_full_pool_drops_extra_buffers() {
        let pool = Pool::new(1, 16);
        let (a, b) = (pool.take(), pool.take());
        drop(a);
        drop(b);
        assert_eq!(pool.get.len(), 1);
    }

    #[test]
    fn reads_fill_whole_or_stop_at_the_end() {
        let pool = Pool::new(1, 4);
        let mut b = pool.take();
        // A reader that hands out one byte at a time still fills the buffer.
        struct OneByOne(u8);
        impl Read for OneByOne {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                buf[0] = self.0;
                Ok(1)
            }
        }
        assert_eq!(b.read_full_from(&mut OneByOne(7), 6).unwrap(), 6);
        assert_eq!(&*b, &[7; 6]);
        assert_eq!(b.read_full_from(&mut &b"ab"[..], 6).unwrap(), 2);
        assert_eq!(&*b, b"ab");
        let e = b.read_exact_from(&mut &b"ab"[..], 3).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(b.is_empty());
    }

    #[test]
    fn cut_views_share_the_buffer_until_the_last_goes() {
        let pool = Pool::new(1, 8);
        let mut b = pool.take();
        b.read_exact_from(&mut &b"abcdef"[..], 6).unwrap();
        let mut rest = Shared::from(b);
        let head = rest.split_to(2);
        assert_eq!((&*head, &*rest), (&b"ab"[..], &b"cdef"[..]));
        assert_eq!(&*rest.split_to(10), b"cdef");
        assert!(rest.is_empty());
        drop(rest);
        assert_eq!(pool.get.len(), 0, "a view is still held");
        drop(head);
        assert_eq!(pool.get.len(), 1);
    }
}
