//! Reusable foot buffers.
//!
//! A foot is megabytes; allocating a fresh one per foot costs page faults
//! and kernel zeroing on every foot once the allocator hands freed memory
//! back to the system, which on loopback doubles the CPU time of a
//! single-connection transfer. A [`Buffer`] goes back to its [`Pool`] when
//! dropped, so the steady state allocates nothing. The pool holds at most
//! as many buffers as the window, so it never raises the memory bound.

use crossbeam_channel::{Receiver, Sender};
use std::ops::Deref;

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

    /// An empty buffer with the pool's capacity, reused when one is free.
    pub fn take(&self) -> Buffer {
        let data = match self.get.try_recv() {
            Ok(mut v) => {
                v.clear();
                v
            }
            Err(_) => Vec::with_capacity(self.capacity),
        };
        Buffer {
            data,
            home: Some(self.put.clone()),
        }
    }
}

/// Bytes that return to their pool when dropped.
#[derive(Debug, Default)]
pub struct Buffer {
    data: Vec<u8>,
    home: Option<Sender<Vec<u8>>>,
}

impl Buffer {
    /// The vector to fill.
    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }
}

impl From<Vec<u8>> for Buffer {
    /// A buffer that belongs to no pool.
    fn from(data: Vec<u8>) -> Buffer {
        Buffer { data, home: None }
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl PartialEq for Buffer {
    fn eq(&self, other: &Buffer) -> bool {
        self.data == other.data
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_and_keep_their_memory() {
        let pool = Pool::new(2, 1024);
        let mut b = pool.take();
        b.vec_mut().extend_from_slice(b"hello");
        let ptr = b.as_ptr();
        drop(b);
        let b = pool.take();
        assert!(b.is_empty());
        assert_eq!(b.as_ptr(), ptr);
        assert!(b.data.capacity() >= 1024);
    }

    #[test]
    fn a_full_pool_drops_extra_buffers() {
        let pool = Pool::new(1, 16);
        let (a, b) = (pool.take(), pool.take());
        drop(a);
        drop(b);
        assert_eq!(pool.get.len(), 1);
    }
}
