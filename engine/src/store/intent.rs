//! The append-intent journal: what a writer is about to append, recorded durably before it writes.
//!
//! A writer's open may cut bytes past a file's committed length only when they can be a torn append of this
//! store. Before every append, the writer overwrites the small fixed-size file `APPEND` with the generation
//! and commit sequence number the append starts from and the target length of every file, and fsyncs it;
//! only then does it write data. A byte past a committed length is therefore explained when the journal is
//! intact, names the manifest's generation and commit sequence number, and the file's length does not exceed
//! its target. Anything else past a committed length was not written by this store's writer (a foreign or
//! replaced file, an old store with a torn tail from before the journal existed) and the open refuses with
//! [`EngineError::ForeignData`] instead of truncating it.
//!
//! Layout (little-endian): `b"PACHAAPP"`, format version (u32), generation (u64), base commit sequence
//! number (u64), file count (u32), one target length (u64) per manifest file entry, crc32 of everything
//! before it (u32).

use super::format::{FORMAT_VERSION, le_u32};
use super::manifest::Manifest;
use crate::EngineError;
use std::fs::File;
use std::path::Path;

/// Name of the journal file in the store directory.
pub(crate) const APPEND_JOURNAL: &str = "APPEND";
const MAGIC: &[u8; 8] = b"PACHAAPP";
const FIXED: usize = 8 + 4 + 8 + 8 + 4;

/// An append about to happen: the manifest it starts from and the length every file may reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Intent {
    /// Generation of the manifest the append starts from.
    pub generation: u64,
    /// Commit sequence number of the manifest the append starts from.
    pub commit_seq: u64,
    /// Target length of every file, in manifest order.
    pub targets: Vec<u64>,
}

impl Intent {
    /// The encoded journal (fixed size for a given file count).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED + self.targets.len() * 8 + 4);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.commit_seq.to_le_bytes());
        b.extend_from_slice(&(self.targets.len() as u32).to_le_bytes());
        for t in &self.targets {
            b.extend_from_slice(&t.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a journal; `None` when it is truncated, damaged or of another version (then it explains
    /// nothing).
    pub(crate) fn decode(b: &[u8]) -> Option<Intent> {
        if b.len() < FIXED + 4 || &b[..8] != MAGIC || le_u32(&b[8..12]) != FORMAT_VERSION {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let n = le_u32(&b[28..32]) as usize;
        let end = FIXED.checked_add(n.checked_mul(8)?)?;
        if b.len() < end + 4 || le_u32(&b[end..end + 4]) != crc32fast::hash(&b[..end]) {
            return None;
        }
        Some(Intent {
            generation: u64_at(12),
            commit_seq: u64_at(20),
            targets: (0..n).map(|k| u64_at(FIXED + k * 8)).collect(),
        })
    }

    /// Reads `dir/APPEND`; `None` when it is missing or unusable.
    pub(crate) fn read(dir: &Path) -> Option<Intent> {
        std::fs::read(dir.join(APPEND_JOURNAL))
            .ok()
            .and_then(|b| Intent::decode(&b))
    }

    /// How far file `j` of manifest `m` may extend past its committed length as a torn append: its target
    /// length when this journal belongs to `m`'s commit, else the committed length itself.
    pub(crate) fn allowed_len(this: Option<&Intent>, m: &Manifest, j: usize) -> u64 {
        let committed = m.files[j].len;
        match this {
            Some(i)
                if i.generation == m.generation
                    && i.commit_seq == m.commit_seq
                    && i.targets.len() == m.files.len() =>
            {
                i.targets[j].max(committed)
            }
            _ => committed,
        }
    }

    /// Overwrites the journal through `f` and makes it durable before any data is appended.
    pub(crate) fn write(&self, f: &File, path: &Path) -> Result<(), EngineError> {
        let b = self.encode();
        super::vfs::write_at(f, path, &b, 0).map_err(|e| EngineError::io("writing", path, e))?;
        super::vfs::sync_data(f, path).map_err(|e| EngineError::io("syncing", path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_any_damage_explains_nothing() {
        let i = Intent {
            generation: 2,
            commit_seq: 17,
            targets: vec![64, 4160, 99],
        };
        let b = i.encode();
        assert_eq!(Intent::decode(&b), Some(i));
        for k in 0..b.len() {
            let mut c = b.clone();
            c[k] ^= 0x04;
            assert_eq!(Intent::decode(&c), None, "flip at byte {k} went unnoticed");
        }
        for cut in 0..b.len() {
            assert_eq!(Intent::decode(&b[..cut]), None);
        }
    }
}
