//! A growable bitset of row numbers (used for tombstones / exclusion filters).

/// A set of `u32` row numbers stored as bits. Rows past the end are absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bitset {
    words: Vec<u64>,
    count: usize,
}

impl Bitset {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }
    /// An empty set with room for rows `0..n` without reallocating.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            words: vec![0; n.div_ceil(64)],
            count: 0,
        }
    }
    /// Builds a set from row numbers.
    pub fn from_ids(ids: impl IntoIterator<Item = u32>) -> Self {
        let mut b = Self::new();
        for id in ids {
            b.insert(id);
        }
        b
    }
    /// Adds `id`; returns true if it was not present.
    pub fn insert(&mut self, id: u32) -> bool {
        let (w, bit) = (id as usize / 64, 1u64 << (id % 64));
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let new = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.count += usize::from(new);
        new
    }
    /// Removes `id`; returns true if it was present.
    pub fn remove(&mut self, id: u32) -> bool {
        let (w, bit) = (id as usize / 64, 1u64 << (id % 64));
        let Some(word) = self.words.get_mut(w) else {
            return false;
        };
        let had = *word & bit != 0;
        *word &= !bit;
        self.count -= usize::from(had);
        had
    }
    /// True if `id` is in the set.
    #[inline]
    pub fn contains(&self, id: u32) -> bool {
        self.words
            .get(id as usize / 64)
            .is_some_and(|w| w & (1u64 << (id % 64)) != 0)
    }
    /// Number of rows in the set.
    pub fn len(&self) -> usize {
        self.count
    }
    /// True if the set is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// The members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64u32)
                .filter(move |b| bits & (1u64 << b) != 0)
                .map(move |b| w as u32 * 64 + b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_contains_count() {
        let mut b = Bitset::with_capacity(10);
        assert!(b.insert(3));
        assert!(!b.insert(3));
        assert!(b.insert(200));
        assert!(b.contains(3) && b.contains(200) && !b.contains(4) && !b.contains(100_000));
        assert_eq!(b.len(), 2);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![3, 200]);
        assert!(b.remove(3));
        assert!(!b.remove(3));
        assert!(!b.remove(9999));
        assert_eq!(b.len(), 1);
        assert_eq!(
            Bitset::from_ids([5, 1, 5]).iter().collect::<Vec<_>>(),
            vec![1, 5]
        );
    }
}
