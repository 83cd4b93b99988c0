//! The MANIFEST: the single source of truth for what is committed.
//!
//! Framing: `b"PACHAMAN"`, format version (u32 LE), payload length (u32 LE), crc32 of the payload (u32 LE),
//! then the payload: a [`Manifest`] encoded with bincode 2 (serde, standard config). It is replaced
//! atomically on every commit: written to `MANIFEST.tmp`, fsynced, renamed over `MANIFEST`, then the directory
//! is fsynced.

use super::Schema;
use super::format::{FORMAT_VERSION, le_u32};
use super::vfs;
use crate::EngineError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Name of the manifest file.
pub(crate) const MANIFEST: &str = "MANIFEST";
/// Name of the temporary manifest written before the atomic rename.
pub(crate) const MANIFEST_TMP: &str = "MANIFEST.tmp";
const MAGIC: &[u8; 8] = b"PACHAMAN";
const FRAME_LEN: usize = 20;
/// Refuse manifests larger than this (they hold a few dozen file entries).
const MAX_PAYLOAD: usize = 1 << 20;

/// Committed state of one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileState {
    /// File name inside the store directory.
    pub name: String,
    /// Committed length in bytes, header included.
    pub len: u64,
    /// crc32 of the committed data region (bytes after the header).
    pub crc: u32,
}

/// The committed state of the whole store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// Bumps on every compaction; part of every file name.
    pub generation: u64,
    /// Bumps on every commit.
    pub commit_seq: u64,
    /// Committed rows, tombstoned ones included.
    pub rows: u64,
    /// Committed entries of the tombstone log.
    pub tombstones: u64,
    /// The schema fixed at creation.
    pub schema: Schema,
    /// Per modality in schema order: f32, i8, scale, quality; then subject IDs, offsets, tombstones.
    pub files: Vec<FileState>,
}

impl Manifest {
    /// Encodes the framed manifest.
    pub(crate) fn encode(&self, path: &Path) -> Result<Vec<u8>, EngineError> {
        let payload =
            bincode::serde::encode_to_vec(self, bincode::config::standard()).map_err(|e| {
                EngineError::Manifest {
                    path: path.to_path_buf(),
                    reason: format!("encode: {e}"),
                }
            })?;
        let mut out = Vec::with_capacity(FRAME_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes and verifies a framed manifest; `path` names the file in errors.
    pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<Manifest, EngineError> {
        let bad = |reason: String| EngineError::Manifest {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < FRAME_LEN {
            return Err(bad(format!(
                "truncated: {} bytes, the frame alone is {FRAME_LEN}",
                bytes.len()
            )));
        }
        if &bytes[0..8] != MAGIC {
            return Err(bad("bad magic (not a pacha manifest)".into()));
        }
        let version = le_u32(&bytes[8..12]);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version} is not supported (expected {FORMAT_VERSION})"
            )));
        }
        let len = le_u32(&bytes[12..16]) as usize;
        if len > MAX_PAYLOAD {
            return Err(bad(format!("payload length {len} is implausible")));
        }
        let payload = &bytes[FRAME_LEN..];
        if payload.len() != len {
            return Err(bad(format!(
                "truncated or padded: payload is {} bytes, frame says {len}",
                payload.len()
            )));
        }
        let stored = le_u32(&bytes[16..20]);
        let actual = crc32fast::hash(payload);
        if stored != actual {
            return Err(bad(format!(
                "checksum {stored:#010x} does not match payload {actual:#010x}"
            )));
        }
        let (m, used): (Manifest, usize) = bincode::serde::decode_from_slice(
            payload,
            bincode::config::standard().with_limit::<MAX_PAYLOAD>(),
        )
        .map_err(|e| bad(format!("decode: {e}")))?;
        if used != len {
            return Err(bad(format!(
                "{} trailing bytes after the manifest",
                len - used
            )));
        }
        Ok(m)
    }

    /// Reads and verifies `dir/MANIFEST`.
    pub(crate) fn read(dir: &Path) -> Result<Manifest, EngineError> {
        let path = dir.join(MANIFEST);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::NotAStore {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(EngineError::io("reading", path, e)),
        };
        Manifest::decode(&bytes, &path)
    }

    /// Atomically and durably replaces `dir/MANIFEST` with this manifest.
    pub(crate) fn write_atomic(&self, dir: &Path) -> Result<(), EngineError> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(MANIFEST_TMP);
        let bytes = self.encode(&path)?;
        let f = vfs::create(&tmp, true).map_err(|e| EngineError::io("creating", &tmp, e))?;
        vfs::write_at(&f, &tmp, &bytes, 0).map_err(|e| EngineError::io("writing", &tmp, e))?;
        vfs::sync_all(&f, &tmp).map_err(|e| EngineError::io("syncing", &tmp, e))?;
        drop(f);
        vfs::rename(&tmp, &path).map_err(|e| EngineError::io("renaming into place", &path, e))?;
        sync_dir(dir)
    }
}

/// fsyncs a directory so renames, creations and removals in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), EngineError> {
    vfs::sync_dir(dir).map_err(|e| EngineError::io("syncing directory", dir, e))
}

/// The path of the manifest in `dir`.
pub(crate) fn manifest_path(dir: &Path) -> PathBuf {
    dir.join(MANIFEST)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Modality;
    use crate::store::ModalitySpec;

    fn sample() -> Manifest {
        Manifest {
            generation: 3,
            commit_seq: 9,
            rows: 12,
            tombstones: 1,
            schema: Schema {
                modalities: vec![ModalitySpec {
                    modality: Modality::Face,
                    dim: 8,
                }],
            },
            files: vec![FileState {
                name: "face.g3.f32".into(),
                len: 64,
                crc: 0,
            }],
        }
    }

    #[test]
    fn encode_decode_round_trip_and_damage() {
        let p = Path::new("MANIFEST");
        let m = sample();
        let b = m.encode(p).unwrap();
        assert_eq!(Manifest::decode(&b, p).unwrap(), m);
        for cut in [0, 5, FRAME_LEN, b.len() - 1] {
            let e = Manifest::decode(&b[..cut], p).unwrap_err();
            assert!(matches!(e, EngineError::Manifest { .. }), "{e}");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(
                Manifest::decode(&c, p).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }
}
