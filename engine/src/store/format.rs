//! On-disk layout: file kinds, names, the 64-byte self-describing header, running checksums.
//!
//! Every store file starts with a 64-byte header (little-endian):
//!
//! | bytes  | field |
//! |--------|-------|
//! | 0..8   | magic (one per file kind) |
//! | 8..12  | format version |
//! | 12..16 | dtype code (1 f32, 2 i8, 3 utf-8 bytes, 4 u64, 5 u32) |
//! | 16..20 | modality code (0 face, 1..=10 finger position, `u32::MAX` none) |
//! | 20..24 | vector dimension (0 when not a vector file) |
//! | 24..28 | row stride in elements (0 when rows are not fixed-size) |
//! | 28..32 | bytes per row (0 when rows are not fixed-size) |
//! | 32..40 | generation the file belongs to |
//! | 40..60 | reserved, zero |
//! | 60..64 | crc32 of bytes 0..60 |
//!
//! The data region follows at byte 64, so it is 64-byte aligned in a memory map.

use crate::Modality;
use pacha_index::padded_stride;

/// Length of every file header; data starts here (64-byte aligned).
pub(crate) const HEADER_LEN: usize = 64;
/// Current format version of every store file and the manifest.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Quality value stored for an absent template (valid qualities are in [0, 1]).
pub(crate) const ABSENT_QUALITY: f32 = -1.0;

/// The kinds of file in a store directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// L2-normalised f32 rows of one modality, padded stride.
    F32,
    /// i8-quantised rows of one modality, padded stride.
    I8,
    /// Per-row f32 scale of the i8 rows.
    Scale,
    /// Per-row f32 quality; [`ABSENT_QUALITY`] where the template is absent.
    Quality,
    /// Concatenated UTF-8 subject IDs.
    Ids,
    /// Per-row u64 end offset of the row's ID in the IDs file data.
    Offsets,
    /// Append-only log of deleted row numbers (u32).
    Tombstones,
}

impl FileKind {
    /// The four per-modality kinds, in manifest order.
    pub(crate) const MODALITY_KINDS: [FileKind; 4] = [
        FileKind::F32,
        FileKind::I8,
        FileKind::Scale,
        FileKind::Quality,
    ];

    fn magic(self) -> &'static [u8; 8] {
        match self {
            FileKind::F32 => b"PACHAF32",
            FileKind::I8 => b"PACHAI8Q",
            FileKind::Scale => b"PACHASCL",
            FileKind::Quality => b"PACHAQUA",
            FileKind::Ids => b"PACHASID",
            FileKind::Offsets => b"PACHASOF",
            FileKind::Tombstones => b"PACHADEL",
        }
    }

    fn dtype(self) -> u32 {
        match self {
            FileKind::F32 | FileKind::Scale | FileKind::Quality => 1,
            FileKind::I8 => 2,
            FileKind::Ids => 3,
            FileKind::Offsets => 4,
            FileKind::Tombstones => 5,
        }
    }

    /// File-name extension.
    pub(crate) fn ext(self) -> &'static str {
        match self {
            FileKind::F32 => "f32",
            FileKind::I8 => "i8",
            FileKind::Scale => "scale",
            FileKind::Quality => "qual",
            FileKind::Ids => "ids",
            FileKind::Offsets => "offs",
            FileKind::Tombstones => "del",
        }
    }

    /// Whether `ext` is one of our extensions.
    pub(crate) fn is_store_ext(ext: &str) -> bool {
        ["f32", "i8", "scale", "qual", "ids", "offs", "del"].contains(&ext)
    }
}

/// Everything the header of one file records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileSpec {
    /// Which kind of file.
    pub kind: FileKind,
    /// Its modality (per-modality files only).
    pub modality: Option<Modality>,
    /// Vector dimension (vector files only, else 0).
    pub dim: usize,
    /// Row stride in elements (fixed-row files, else 0).
    pub stride: usize,
    /// Bytes per row (fixed-row files, else 0).
    pub row_bytes: usize,
    /// Generation the file belongs to.
    pub generation: u64,
}

impl FileSpec {
    /// The spec of a per-modality file.
    pub(crate) fn modality(
        kind: FileKind,
        modality: Modality,
        dim: usize,
        generation: u64,
    ) -> Self {
        let (d, stride, row_bytes) = match kind {
            FileKind::F32 => {
                let s = padded_stride(dim, 4);
                (dim, s, s * 4)
            }
            FileKind::I8 => {
                let s = padded_stride(dim, 1);
                (dim, s, s)
            }
            _ => (0, 1, 4),
        };
        FileSpec {
            kind,
            modality: Some(modality),
            dim: d,
            stride,
            row_bytes,
            generation,
        }
    }

    /// The spec of a global (not per-modality) file.
    pub(crate) fn global(kind: FileKind, generation: u64) -> Self {
        let (stride, row_bytes) = match kind {
            FileKind::Offsets => (1, 8),
            FileKind::Tombstones => (1, 4),
            _ => (0, 0),
        };
        FileSpec {
            kind,
            modality: None,
            dim: 0,
            stride,
            row_bytes,
            generation,
        }
    }

    /// The file name in the store directory, e.g. `finger3.g2.i8`, `subjects.g0.ids`.
    pub(crate) fn file_name(&self) -> String {
        let stem = match (self.modality, self.kind) {
            (Some(m), _) => m.key(),
            (None, FileKind::Tombstones) => "tombstones".to_string(),
            (None, _) => "subjects".to_string(),
        };
        format!("{stem}.g{}.{}", self.generation, self.kind.ext())
    }

    /// The 64-byte header.
    pub(crate) fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(self.kind.magic());
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.kind.dtype().to_le_bytes());
        h[16..20].copy_from_slice(&modality_code(self.modality).to_le_bytes());
        h[20..24].copy_from_slice(&(self.dim as u32).to_le_bytes());
        h[24..28].copy_from_slice(&(self.stride as u32).to_le_bytes());
        h[28..32].copy_from_slice(&(self.row_bytes as u32).to_le_bytes());
        h[32..40].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32fast::hash(&h[0..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Checks that `h` is a valid header equal to the one this spec would write; returns what differs.
    pub(crate) fn verify_header(&self, h: &[u8]) -> Result<(), String> {
        if h.len() < HEADER_LEN {
            return Err(format!(
                "file is {} bytes, shorter than the {HEADER_LEN}-byte header",
                h.len()
            ));
        }
        let magic = &h[0..8];
        if magic != self.kind.magic() {
            return Err(format!(
                "magic {:?} is not {:?}",
                String::from_utf8_lossy(magic),
                String::from_utf8_lossy(self.kind.magic())
            ));
        }
        let stored = le_u32(&h[60..64]);
        let actual = crc32fast::hash(&h[0..60]);
        if stored != actual {
            return Err(format!(
                "header checksum {stored:#010x} does not match contents {actual:#010x}"
            ));
        }
        let version = le_u32(&h[8..12]);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version} is not supported (expected {FORMAT_VERSION})"
            ));
        }
        let want = self.header();
        let fields: [(&str, std::ops::Range<usize>); 6] = [
            ("dtype", 12..16),
            ("modality", 16..20),
            ("dim", 20..24),
            ("stride", 24..28),
            ("row bytes", 28..32),
            ("generation", 32..40),
        ];
        for (name, r) in fields {
            if h[r.clone()] != want[r.clone()] {
                return Err(format!(
                    "header field {name} is {:?}, expected {:?}",
                    &h[r.clone()],
                    &want[r]
                ));
            }
        }
        if h[40..60].iter().any(|&b| b != 0) {
            return Err("reserved header bytes are not zero".into());
        }
        Ok(())
    }
}

fn modality_code(m: Option<Modality>) -> u32 {
    match m {
        None => u32::MAX,
        Some(Modality::Face) => 0,
        Some(Modality::Finger(p)) => u32::from(p),
    }
}

/// Little-endian u32 from a 4-byte slice (shorter slices read as zero-padded).
pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    let n = b.len().min(4);
    a[..n].copy_from_slice(&b[..n]);
    u32::from_le_bytes(a)
}

/// Extends the crc32 `crc` of `len` bytes with `more`.
pub(crate) fn crc_extend(crc: u32, len: u64, more: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial_len(crc, len);
    h.update(more);
    h.finalize()
}

/// Parses a store file name `stem.gN.ext` into its generation, if it looks like one of ours.
pub(crate) fn parse_generation(name: &str) -> Option<u64> {
    let (rest, ext) = name.rsplit_once('.')?;
    if !FileKind::is_store_ext(ext) {
        return None;
    }
    let (_, g) = rest.rsplit_once(".g")?;
    g.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_mismatch() {
        let s = FileSpec::modality(FileKind::F32, Modality::Finger(3), 100, 7);
        assert_eq!(s.stride, 112);
        assert_eq!(s.file_name(), "finger3.g7.f32");
        let h = s.header();
        assert!(s.verify_header(&h).is_ok());
        let mut bad = h;
        bad[21] ^= 1;
        assert!(s.verify_header(&bad).unwrap_err().contains("checksum"));
        let other = FileSpec::modality(FileKind::F32, Modality::Finger(3), 101, 7);
        assert!(other.verify_header(&h).unwrap_err().contains("dim"));
        let i8s = FileSpec::modality(FileKind::I8, Modality::Finger(3), 100, 7);
        assert!(i8s.verify_header(&h).unwrap_err().contains("magic"));
        assert!(s.verify_header(&h[..10]).is_err());
    }

    #[test]
    fn generation_parsing_and_crc_extension() {
        assert_eq!(parse_generation("face.g12.f32"), Some(12));
        assert_eq!(parse_generation("subjects.g0.ids"), Some(0));
        assert_eq!(parse_generation("MANIFEST"), None);
        assert_eq!(parse_generation("notes.g1.txt"), None);
        let a = b"hello ";
        let b = b"world";
        let whole = crc32fast::hash(b"hello world");
        assert_eq!(crc_extend(crc32fast::hash(a), a.len() as u64, b), whole);
        assert_eq!(crc_extend(0, 0, b"hello world"), whole);
    }
}
