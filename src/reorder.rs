//! The reorder buffer: puts feet that arrive in any order back in sequence.
//!
//! Pure data structure, no threads or I/O. Feet are keyed by id in an ordered
//! map (a min-heap that can also spot duplicates); `pop_ready` yields the
//! foot the output is waiting for, if it has arrived. The caller bounds what
//! it pushes (ids within the flow-control window), so memory stays bounded.

use std::collections::BTreeMap;

/// A received foot waiting for its turn.
#[derive(Debug, PartialEq, Eq)]
pub struct Ready<T> {
    /// The foot's id.
    pub id: u64,
    /// Its payload.
    pub data: T,
    /// Whether it ends the stream.
    pub end: bool,
}

/// What became of a pushed foot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored until its turn.
    Stored,
    /// Already written or already waiting: dropped.
    Duplicate,
}

/// Feet that arrived ahead of their turn; `T` is the payload type.
#[derive(Debug)]
pub struct Reorder<T> {
    next: u64,
    waiting: BTreeMap<u64, (T, bool)>,
    bytes: usize,
}

impl<T: AsRef<[u8]>> Default for Reorder<T> {
    fn default() -> Self {
        Reorder::new()
    }
}

impl<T: AsRef<[u8]>> Reorder<T> {
    /// An empty buffer expecting foot 0.
    pub fn new() -> Reorder<T> {
        Reorder {
            next: 0,
            waiting: BTreeMap::new(),
            bytes: 0,
        }
    }

    /// The id of the next foot to be written.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// How many feet are waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether no foot is waiting.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Stores a foot unless it was seen before.
    pub fn push(&mut self, id: u64, data: T, end: bool) -> Pushed {
        if id < self.next || self.waiting.contains_key(&id) {
            return Pushed::Duplicate;
        }
        self.bytes += data.as_ref().len();
        self.waiting.insert(id, (data, end));
        Pushed::Stored
    }

    /// Takes the next foot in sequence, if it has arrived.
    pub fn pop_ready(&mut self) -> Option<Ready<T>> {
        let entry = self.waiting.first_entry()?;
        if *entry.key() != self.next {
            return None;
        }
        let (id, (data, end)) = entry.remove_entry();
        self.bytes -= data.as_ref().len();
        self.next += 1;
        Some(Ready { id, data, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn drain(r: &mut Reorder<Vec<u8>>) -> Vec<u64> {
        std::iter::from_fn(|| r.pop_ready().map(|f| f.id)).collect()
    }

    #[test]
    fn in_order_feet_pass_straight_through() {
        let mut r: Reorder<Vec<u8>> = Reorder::new();
        for id in 0..5 {
            assert_eq!(r.push(id, vec![id as u8], id == 4), Pushed::Stored);
            let f = r.pop_ready().unwrap();
            assert_eq!((f.id, f.data, f.end), (id, vec![id as u8], id == 4));
        }
        assert!(r.is_empty());
    }

    #[test]
    fn a_gap_holds_back_later_feet() {
        let mut r: Reorder<Vec<u8>> = Reorder::new();
        r.push(1, vec![1; 10], false);
        r.push(2, vec![2; 10], false);
        assert_eq!(r.pop_ready(), None);
        assert_eq!((r.len(), r.bytes()), (2, 20));
        r.push(0, vec![0; 5], false);
        assert_eq!(drain(&mut r), vec![0, 1, 2]);
        assert_eq!((r.len(), r.bytes(), r.next()), (0, 0, 3));
    }

    #[test]
    fn duplicates_are_dropped_before_and_after_writing() {
        let mut r: Reorder<Vec<u8>> = Reorder::new();
        assert_eq!(r.push(1, vec![1], false), Pushed::Stored);
        assert_eq!(r.push(1, vec![9], false), Pushed::Duplicate);
        r.push(0, vec![0], false);
        assert_eq!(drain(&mut r), vec![0, 1]);
        assert_eq!(r.push(0, vec![0], false), Pushed::Duplicate);
        assert_eq!(r.push(1, vec![1], false), Pushed::Duplicate);
    }

    proptest! {
        #[test]
        fn shuffled_and_duplicated_ids_come_out_in_order_once(
            ids in Just((0u64..200).collect::<Vec<_>>()).prop_shuffle(),
            dups in proptest::collection::vec(0u64..200, 0..100),
        ) {
            let mut r: Reorder<Vec<u8>> = Reorder::new();
            let mut out = Vec::new();
            let mut all: Vec<u64> = ids.clone();
            // Duplicates arrive interleaved with the originals.
            for (i, d) in dups.iter().enumerate() {
                all.insert((i * 7) % (all.len() + 1), *d);
            }
            for id in all {
                r.push(id, id.to_be_bytes().to_vec(), false);
                while let Some(f) = r.pop_ready() {
                    prop_assert_eq!(f.data, f.id.to_be_bytes().to_vec());
                    out.push(f.id);
                }
            }
            prop_assert_eq!(out, (0u64..200).collect::<Vec<_>>());
            prop_assert!(r.is_empty());
            prop_assert_eq!(r.bytes(), 0);
        }
    }
}
