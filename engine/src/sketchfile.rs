//! Saved sign sketches: one `<modality>.sketch` file per indexed modality under the index directory,
//! written by `pacha index` beside the `.ivf` files and listed (length and crc32) in the sealed
//! `index.json`, so a run reads the sketches of every indexed row instead of recomputing them.
//!
//! **Format** (little-endian; ARCHITECTURE.md, "Formats"): a 64-byte header — magic `PACHASKT`, version
//! `u32`, bits per sketch `u32`, hyperplane seed `u64`, dimension `u64`, rows `u64`, store generation
//! `u64`, crc32 of the identity's fingerprint string `u32`, 12 zero bytes — then `rows × bits/8` bytes of
//! sketches, row-major (row `r` at byte `64 + r·bits/8`; word `k` of a row holds bits `64k..64k+63`,
//! absent rows all zero), then the crc32 of every byte before it. The sketch words start at byte 64 of a
//! page-aligned mapping, so they are read in place as `u64`s ([`SavedSketches`]: no copy, pages resident
//! only as the join touches them, and file-backed: the kernel can drop them under memory pressure).

use crate::EngineError;
use memmap2::Mmap;
use pacha_index::sketch::{SketchWords, Sketches};
use std::io::Write;
use std::path::Path;

/// Magic bytes of a sketch file.
const MAGIC: &[u8; 8] = b"PACHASKT";
/// Version of the sketch file format.
const VERSION: u32 = 1;
/// Bytes of the header (a multiple of 8: the words after it stay aligned).
pub const HEADER_BYTES: usize = 64;

/// What a sketch file must describe to be used: the sketch parameters and what it was derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SketchHeader {
    /// Bits per sketch (a multiple of 64).
    pub bits: u32,
    /// Seed of the hyperplanes.
    pub seed: u64,
    /// Dimension of the sketched rows.
    pub dim: u64,
    /// Rows `0..rows` sketched.
    pub rows: u64,
    /// Store generation.
    pub generation: u64,
    /// crc32 of the index identity's fingerprint string ([`fingerprint_crc`]).
    pub fingerprint: u32,
}

impl SketchHeader {
    fn words(&self) -> usize {
        self.bits as usize / 64
    }

    /// Bytes of a file with this header.
    pub fn file_len(&self) -> u64 {
        HEADER_BYTES as u64 + self.rows * u64::from(self.bits / 8) + 4
    }

    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.bits.to_le_bytes());
        h[16..24].copy_from_slice(&self.seed.to_le_bytes());
        h[24..32].copy_from_slice(&self.dim.to_le_bytes());
        h[32..40].copy_from_slice(&self.rows.to_le_bytes());
        h[40..48].copy_from_slice(&self.generation.to_le_bytes());
        h[48..52].copy_from_slice(&self.fingerprint.to_le_bytes());
        h
    }

    fn decode(h: &[u8]) -> Result<SketchHeader, String> {
        let u32_at = |o: usize| {
            h.get(o..o + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
        };
        let u64_at = |o: usize| {
            h.get(o..o + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        if h.len() < HEADER_BYTES || &h[0..8] != MAGIC {
            return Err("not a pacha sketch file (bad magic)".into());
        }
        let version = u32_at(8).unwrap_or_default();
        if version != VERSION {
            return Err(format!("sketch file version {version}, expected {VERSION}"));
        }
        if h[52..HEADER_BYTES].iter().any(|&b| b != 0) {
            return Err("reserved header bytes are not zero".into());
        }
        Ok(SketchHeader {
            bits: u32_at(12).unwrap_or_default(),
            seed: u64_at(16).unwrap_or_default(),
            dim: u64_at(24).unwrap_or_default(),
            rows: u64_at(32).unwrap_or_default(),
            generation: u64_at(40).unwrap_or_default(),
            fingerprint: u32_at(48).unwrap_or_default(),
        })
    }
}

/// crc32 of an identity's fingerprint string, as a sketch file's header carries it.
pub fn fingerprint_crc(fingerprint: &str) -> u32 {
    crc32fast::hash(fingerprint.as_bytes())
}

/// Writes rows `0..header.rows` of `sketches` to `path` (mode 0600; temp file, fsync, rename; the caller
/// fsyncs the directory) and returns the file's trailing crc32.
pub fn write(path: &Path, header: &SketchHeader, sketches: &Sketches) -> Result<u32, EngineError> {
    let io = |e| EngineError::io("writing", path, e);
    if sketches.words() != header.words() || (sketches.rows() as u64) < header.rows {
        return Err(EngineError::InvalidArgument(format!(
            "{} sketches of {} bits cannot fill a sketch file of {} rows of {} bits",
            sketches.rows(),
            sketches.bits(),
            header.rows,
            header.bits
        )));
    }
    let tmp = path.with_extension("tmp");
    let file = crate::fsutil::create_private(&tmp).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut crc = crc32fast::Hasher::new();
    let head = header.encode();
    crc.update(&head);
    out.write_all(&head).map_err(io)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    for r in 0..header.rows as usize {
        buf.extend(sketches.row(r).iter().flat_map(|w| w.to_le_bytes()));
        if buf.len() >= 1 << 16 {
            crc.update(&buf);
            out.write_all(&buf).map_err(io)?;
            buf.clear();
        }
    }
    crc.update(&buf);
    out.write_all(&buf).map_err(io)?;
    let sum = crc.finalize();
    out.write_all(&sum.to_le_bytes()).map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(sum)
}

/// Where a saved file's words live.
enum Backing {
    /// The file mapping (little-endian host): the words are bytes `HEADER_BYTES..` of the map.
    Mapped(Mmap),
    /// Decoded words (big-endian host).
    Owned(Vec<u64>),
}

/// The verified sketches of a saved sketch file, read in place.
pub struct SavedSketches {
    backing: Backing,
    rows: usize,
    words: usize,
}

impl std::fmt::Debug for SavedSketches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedSketches")
            .field("rows", &self.rows)
            .field("words", &self.words)
            .finish()
    }
}

impl SketchWords for SavedSketches {
    fn words(&self) -> &[u64] {
        match &self.backing {
            Backing::Mapped(m) => m
                .get(HEADER_BYTES..HEADER_BYTES + self.rows * self.words * 8)
                .and_then(|b| bytemuck::try_cast_slice(b).ok())
                .unwrap_or(&[]),
            Backing::Owned(v) => v,
        }
    }
}

impl SavedSketches {
    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Opens the sketch file at `path` and verifies it completely: its length, its header against
    /// `expected` (sketch parameters, rows, generation, fingerprint), and its trailing crc32 over every byte
    /// before it. Returns the sketches and that crc32, or what is wrong.
    pub fn open(path: &Path, expected: &SketchHeader) -> Result<(SavedSketches, u32), String> {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
        let len = file
            .metadata()
            .map_err(|e| format!("cannot read: {e}"))?
            .len();
        if len < HEADER_BYTES as u64 + 4 {
            return Err(format!("{len} bytes: shorter than a sketch file's header"));
        }
        // SAFETY: the map is read-only. pacha writes a sketch file once, under a temporary name, and renames
        // it into place; it never writes to, truncates or extends a sketch file after that (a rebuild
        // unlinks the index directory and writes new files, and an unlinked file stays valid for an
        // existing map). Another process changing the file while it is mapped is outside the store's
        // contract, as for the store's own files (`store::map_committed`).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot map: {e}"))?;
        if map.len() as u64 != len {
            return Err(format!(
                "mapped {} bytes of a {len}-byte file (changed while opening)",
                map.len()
            ));
        }
        let header = SketchHeader::decode(&map[..HEADER_BYTES])?;
        if header != *expected {
            return Err(format!(
                "describes {} rows of {} bits (seed {:#x}, dimension {}, generation {}, fingerprint crc {:08x}); the index needs {} rows of {} bits (seed {:#x}, dimension {}, generation {}, fingerprint crc {:08x})",
                header.rows,
                header.bits,
                header.seed,
                header.dim,
                header.generation,
                header.fingerprint,
                expected.rows,
                expected.bits,
                expected.seed,
                expected.dim,
                expected.generation,
                expected.fingerprint
            ));
        }
        if len != expected.file_len() {
            return Err(format!(
                "{len} bytes, {} rows of {} bits make {} (truncated or extended)",
                expected.rows,
                expected.bits,
                expected.file_len()
            ));
        }
        let body = len as usize - 4;
        let mut tail = [0u8; 4];
        tail.copy_from_slice(&map[body..]);
        let listed = u32::from_le_bytes(tail);
        let actual = crc32fast::hash(&map[..body]);
        if actual != listed {
            return Err(format!(
                "checksum mismatch: the file's bytes have crc32 {actual:08x}, its trailer says {listed:08x}"
            ));
        }
        let (rows, words) = (expected.rows as usize, expected.words());
        let backing = if cfg!(target_endian = "little") {
            let _ = map.advise(memmap2::Advice::Random);
            Backing::Mapped(map)
        } else {
            Backing::Owned(
                map[HEADER_BYTES..body]
                    .chunks_exact(8)
                    .map(|b| {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(b);
                        u64::from_le_bytes(w)
                    })
                    .collect(),
            )
        };
        let saved = SavedSketches {
            backing,
            rows,
            words,
        };
        if saved.words().len() != rows * words {
            return Err("sketch words are not aligned in the mapping".into());
        }
        Ok((saved, actual))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pacha_index::sketch::Sketcher;
    use pacha_index::view::RowsF32;
    use std::sync::Arc;

    fn sample(rows: usize, dim: usize) -> (Sketches, SketchHeader) {
        let mut x = 1u64;
        let data: Vec<f32> = (0..rows * dim)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        let base = RowsF32::dense(&data, dim).unwrap();
        let sk = Sketcher::new(dim, 128, 7)
            .unwrap()
            .sketch_rows(base, &|r| r % 5 != 3)
            .unwrap();
        let header = SketchHeader {
            bits: 128,
            seed: 7,
            dim: dim as u64,
            rows: rows as u64,
            generation: 3,
            fingerprint: fingerprint_crc("crc32:0badf00d"),
        };
        (sk, header)
    }

    #[test]
    fn round_trip_reads_every_row_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("face.sketch");
        let (sk, h) = sample(300, 16);
        let crc = write(&p, &h, &sk).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), h.file_len());
        assert_eq!(meta.len(), 64 + 300 * 16 + 4);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let (saved, crc2) = SavedSketches::open(&p, &h).unwrap();
        assert_eq!((crc2, saved.rows()), (crc, 300));
        let back = Sketches::from_parts(2, Some((Arc::new(saved), 300)), Vec::new()).unwrap();
        assert_eq!(back.saved_rows(), 300);
        assert_eq!(back, sk);
        // Absent rows were saved as zeros, present rows not.
        assert!(back.row(3).iter().all(|&w| w == 0));
        assert!(back.row(4).iter().any(|&w| w != 0));
    }

    #[test]
    fn damaged_or_foreign_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("face.sketch");
        let (sk, h) = sample(100, 8);
        write(&p, &h, &sk).unwrap();
        let good = std::fs::read(&p).unwrap();
        // Every byte flipped (one bit each): header, body and trailer.
        for at in 0..good.len() {
            let mut b = good.clone();
            b[at] ^= 1 << (at % 8);
            std::fs::write(&p, &b).unwrap();
            assert!(
                SavedSketches::open(&p, &h).is_err(),
                "flip at byte {at} undetected"
            );
        }
        // Truncated and extended.
        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        assert!(
            SavedSketches::open(&p, &h)
                .unwrap_err()
                .contains("truncated")
        );
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 8]);
        std::fs::write(&p, &longer).unwrap();
        assert!(SavedSketches::open(&p, &h).is_err());
        std::fs::write(&p, &good[..10]).unwrap();
        assert!(SavedSketches::open(&p, &h).is_err());
        // A sound file for another generation, other parameters, other rows or other data.
        std::fs::write(&p, &good).unwrap();
        assert!(SavedSketches::open(&p, &h).is_ok());
        for other in [
            SketchHeader { generation: 4, ..h },
            SketchHeader { bits: 256, ..h },
            SketchHeader { seed: 8, ..h },
            SketchHeader { dim: 9, ..h },
            SketchHeader { rows: 99, ..h },
            SketchHeader {
                fingerprint: fingerprint_crc("crc32:00000000"),
                ..h
            },
        ] {
            let e = SavedSketches::open(&p, &other).unwrap_err();
            assert!(e.contains("the index needs"), "{e}");
        }
        // A missing file.
        let e = SavedSketches::open(&tmp.path().join("none.sketch"), &h).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }
}
