//! Subject IDs: validation and the shared ID → rows index.
//!
//! The index maps a hash of each subject ID to every row ever assigned to that ID within the current
//! generation. It is append-only within a generation and shared by every snapshot of that generation: a
//! snapshot only accepts rows below its own row count that its own tombstone bitset does not mark, and
//! checks the ID bytes in the memory map, so hash collisions and later appends are harmless. Publishing a new
//! snapshot therefore never copies the index.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::RwLock;

/// Longest accepted subject ID, in UTF-8 bytes.
pub const MAX_SUBJECT_ID_BYTES: usize = pacha_datasets::subjects::MAX_ID_BYTES;

/// Checks a subject ID: non-empty, at most [`MAX_SUBJECT_ID_BYTES`] bytes, no control characters.
pub fn validate_subject_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty".into());
    }
    if id.len() > MAX_SUBJECT_ID_BYTES {
        return Err(format!(
            "{} bytes, more than {MAX_SUBJECT_ID_BYTES}",
            id.len()
        ));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(format!("contains control character U+{:04X}", u32::from(c)));
    }
    Ok(())
}

/// The hash the index is keyed by (deterministic within a process).
pub(crate) fn id_hash(id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// Rows that carry IDs with one hash value: almost always one.
#[derive(Debug)]
enum RowList {
    One(u32),
    Many(Vec<u32>),
}

/// ID-hash → rows index shared by every snapshot of one generation.
#[derive(Debug, Default)]
pub(crate) struct IdIndex {
    map: RwLock<HashMap<u64, RowList>>,
}

impl IdIndex {
    /// An empty index with room for `n` IDs.
    pub(crate) fn with_capacity(n: usize) -> Self {
        IdIndex {
            map: RwLock::new(HashMap::with_capacity(n)),
        }
    }

    /// Records that `row` carries an ID with hash `h`. Rows must be added in increasing order.
    pub(crate) fn add_all(&self, entries: impl IntoIterator<Item = (u64, u32)>) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        for (h, row) in entries {
            match map.get_mut(&h) {
                None => {
                    map.insert(h, RowList::One(row));
                }
                Some(list) => match list {
                    RowList::One(r) => *list = RowList::Many(vec![*r, row]),
                    RowList::Many(v) => v.push(row),
                },
            }
        }
    }

    /// The first row (highest first) among those with hash `h` that satisfies `accept`.
    pub(crate) fn find(&self, h: u64, mut accept: impl FnMut(u32) -> bool) -> Option<u32> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        match map.get(&h)? {
            RowList::One(r) => accept(*r).then_some(*r),
            RowList::Many(v) => v.iter().rev().copied().find(|&r| accept(r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rules() {
        assert!(validate_subject_id("UPI-0001").is_ok());
        assert!(validate_subject_id("Zoë 李").is_ok());
        assert!(validate_subject_id("").is_err());
        assert!(validate_subject_id("a\nb").is_err());
        assert!(validate_subject_id("a\u{7f}").is_err());
        assert!(validate_subject_id(&"x".repeat(256)).is_ok());
        assert!(validate_subject_id(&"x".repeat(257)).is_err());
    }

    #[test]
    fn index_keeps_every_row_of_a_hash() {
        let ix = IdIndex::with_capacity(4);
        ix.add_all([(7, 0), (9, 1), (7, 5)]);
        assert_eq!(ix.find(7, |_| true), Some(5));
        assert_eq!(ix.find(7, |r| r < 5), Some(0));
        assert_eq!(ix.find(9, |r| r != 1), None);
        assert_eq!(ix.find(8, |_| true), None);
    }
}
