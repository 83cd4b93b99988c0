//! Immutable committed views of the store.

use super::format::{ABSENT_QUALITY, HEADER_LEN};
use super::subjects::{IdIndex, id_hash};
use super::{ModalitySpec, Schema};
use crate::Modality;
use memmap2::Mmap;
use pacha_index::{RowsF32, RowsI8};
use std::sync::Arc;

/// The memory maps of one modality's files, each covering exactly the committed length.
#[derive(Debug, Clone)]
pub(crate) struct ModView {
    pub spec: ModalitySpec,
    pub stride_f32: usize,
    pub stride_i8: usize,
    pub f32: Arc<Mmap>,
    pub i8: Arc<Mmap>,
    pub scale: Arc<Mmap>,
    pub qual: Arc<Mmap>,
}

/// [`pacha_index::RowPager`] over one modality's f32 map: prefetches what a streaming pass will read and,
/// past RAM, releases what it has read.
pub struct F32Pager<'a> {
    snap: &'a Snapshot,
    m: Modality,
    /// Release what was read only past RAM ([`Snapshot::past_ram`]); otherwise keep it resident.
    past_ram: bool,
}

impl pacha_index::RowPager for F32Pager<'_> {
    fn will_read(&self, rows: std::ops::Range<usize>) {
        self.snap.prefetch_f32(self.m, rows);
    }
    fn release(&self, rows: std::ops::Range<usize>) {
        if self.past_ram {
            self.snap.release_f32(self.m, rows);
        }
    }
}

/// Physical memory in bytes (Linux `/proc/meminfo` `MemTotal`), if known.
/// Read once per process: it does not change while pacha runs.
fn physical_memory() -> Option<u64> {
    static TOTAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(|| {
        let s = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// Slot of a modality in [`Snapshot::slots`]: face is 0, finger p is p.
fn slot_of(m: Modality) -> Option<usize> {
    match m {
        Modality::Face => Some(0),
        Modality::Finger(p) if (1..=10).contains(&p) => Some(usize::from(p)),
        Modality::Finger(_) => None,
    }
}

/// The data region (after the header) of a map.
fn data(m: &Mmap) -> &[u8] {
    m.get(HEADER_LEN..).unwrap_or(&[])
}

fn f32s(m: &Mmap) -> &[f32] {
    bytemuck::try_cast_slice(data(m)).unwrap_or(&[])
}

/// An immutable, consistent committed view of the store. Cheap to take ([`super::Store::snapshot`]) and
/// safe to hold across commits and compactions: its memory maps keep the files it sees alive.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) generation: u64,
    pub(crate) commit_seq: u64,
    pub(crate) rows: usize,
    pub(crate) live: usize,
    pub(crate) schema: Arc<Schema>,
    pub(crate) mods: Vec<ModView>,
    /// Index into `mods` by modality slot (face 0, finger p at p).
    pub(crate) slots: [Option<usize>; 11],
    pub(crate) ids: Arc<Mmap>,
    pub(crate) offs: Arc<Mmap>,
    /// Tombstone bitset; may be longer than `rows` needs (capacity shared with later snapshots).
    pub(crate) deleted: Arc<Vec<u64>>,
    pub(crate) index: Arc<IdIndex>,
}

impl Snapshot {
    /// Builds the slot table for `mods`.
    pub(crate) fn slots_for(mods: &[ModView]) -> [Option<usize>; 11] {
        let mut s = [None; 11];
        for (i, mv) in mods.iter().enumerate() {
            if let Some(k) = slot_of(mv.spec.modality) {
                s[k] = Some(i);
            }
        }
        s
    }

    fn view(&self, m: Modality) -> Option<&ModView> {
        let i = self.slots[slot_of(m)?]?;
        self.mods.get(i)
    }

    /// Bumps on every compaction (row numbers change only then).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bumps on every commit (insert, delete, compaction).
    pub fn commit_seq(&self) -> u64 {
        self.commit_seq
    }

    /// Committed rows, tombstoned ones included.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Committed rows that are not tombstoned.
    pub fn live(&self) -> usize {
        self.live
    }

    /// The store's schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Zero-copy view of the L2-normalised f32 rows of `m` (zero rows where absent); `None` if `m` is not in
    /// the schema.
    pub fn f32_rows(&self, m: Modality) -> Option<RowsF32<'_>> {
        let v = self.view(m)?;
        RowsF32::new(f32s(&v.f32), self.rows, v.spec.dim, v.stride_f32).ok()
    }

    /// Asks the OS to start reading rows `rows` of `m`'s f32 map into the page cache (a hint: the f32 maps
    /// are advised for random access, so a streaming pass announces the batch it will read next).
    pub fn prefetch_f32(&self, m: Modality, rows: std::ops::Range<usize>) {
        if let Some((v, lo, hi)) = self.f32_byte_range(m, rows) {
            #[cfg(unix)]
            let _ = v.f32.advise_range(memmap2::Advice::WillNeed, lo, hi - lo);
        }
    }

    /// The byte range of rows `rows` in `m`'s f32 map, if not empty.
    fn f32_byte_range(
        &self,
        m: Modality,
        rows: std::ops::Range<usize>,
    ) -> Option<(&ModView, usize, usize)> {
        let v = self.view(m)?;
        let row_bytes = v.stride_f32 * 4;
        let lo = HEADER_LEN.saturating_add(rows.start.saturating_mul(row_bytes));
        let hi = HEADER_LEN
            .saturating_add(rows.end.min(self.rows).saturating_mul(row_bytes))
            .min(v.f32.len());
        (lo < hi).then_some((v, lo, hi))
    }

    /// True if this snapshot's f32 rows are too large to keep resident: more than half the machine's
    /// physical memory (Linux `MemTotal`; elsewhere never), or forced either way by the environment variable
    /// `PACHA_PAST_RAM` (`1` / `0`). Joins then rescore from the i8 codes first and release the f32 pages
    /// they read; below it they keep the f32 rows resident and rescore with f32 directly (faster while
    /// everything fits).
    pub fn past_ram(&self) -> bool {
        match std::env::var("PACHA_PAST_RAM").as_deref() {
            Ok("1") => return true,
            Ok("0") => return false,
            _ => {}
        }
        let f32_bytes: usize = self.mods.iter().map(|v| v.f32.len()).sum();
        physical_memory().is_some_and(|m| f32_bytes as u64 > m / 2)
    }

    /// Paging hints for a pass streaming `m`'s f32 rows (see [`pacha_index::RowPager`]).
    pub fn f32_pager(&self, m: Modality) -> F32Pager<'_> {
        F32Pager {
            snap: self,
            m,
            past_ram: self.past_ram(),
        }
    }

    /// Drops rows `rows` of `m`'s f32 map from this process's resident set (a hint, no-op if unsupported):
    /// for passes that stream a modality larger than RAM once, such as the index build and the sketches.
    /// The pages stay in the OS page cache and are read again on the next access, unchanged.
    pub fn release_f32(&self, m: Modality, rows: std::ops::Range<usize>) {
        let Some((v, lo, hi)) = self.f32_byte_range(m, rows) else {
            return;
        };
        #[cfg(unix)]
        {
            // SAFETY: the map is a read-only shared mapping of a store file whose committed bytes are never
            // rewritten in place (commits append; compaction writes new files). MADV_DONTNEED on such a
            // mapping only unmaps the pages from this process: a later access (including through slices
            // borrowed from this map) faults them in again from the page cache or the file, with the same
            // contents, so no borrowed data changes. `lo..hi` lies within the map.
            let _ = unsafe {
                v.f32
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
            };
        }
    }

    /// Zero-copy view of the i8-quantised twin of [`Snapshot::f32_rows`], same row numbers.
    pub fn i8_rows(&self, m: Modality) -> Option<RowsI8<'_>> {
        let v = self.view(m)?;
        let q: &[i8] = bytemuck::cast_slice(data(&v.i8));
        RowsI8::new(q, f32s(&v.scale), self.rows, v.spec.dim, v.stride_i8).ok()
    }

    fn raw_quality(&self, m: Modality, row: usize) -> Option<f32> {
        if row >= self.rows {
            return None;
        }
        f32s(&self.view(m)?.qual).get(row).copied()
    }

    /// Whether `row` has a template for `m` (false for rows out of range or modalities not in the schema).
    pub fn is_present(&self, m: Modality, row: usize) -> bool {
        self.raw_quality(m, row)
            .is_some_and(|q| q != ABSENT_QUALITY)
    }

    /// Capture quality of `row`'s `m` template in [0, 1]; 0 where absent.
    pub fn quality(&self, m: Modality, row: usize) -> f32 {
        match self.raw_quality(m, row) {
            Some(q) if q != ABSENT_QUALITY => q,
            _ => 0.0,
        }
    }

    /// Whether `row` is tombstoned (false for rows out of range).
    pub fn is_deleted(&self, row: usize) -> bool {
        row < self.rows
            && self
                .deleted
                .get(row / 64)
                .is_some_and(|w| (w >> (row % 64)) & 1 == 1)
    }

    /// Tombstone bitset covering `rows()` rows: bit `r` of word `r / 64` set means row `r` is deleted.
    pub fn deleted_words(&self) -> &[u64] {
        let n = self.rows.div_ceil(64).min(self.deleted.len());
        &self.deleted[..n]
    }

    /// Subject ID of `row` (deleted rows keep their ID); empty for rows out of range.
    pub fn subject_id(&self, row: usize) -> &str {
        if row >= self.rows {
            return "";
        }
        let offs: &[u64] = bytemuck::try_cast_slice(data(&self.offs)).unwrap_or(&[]);
        let end = offs.get(row).copied().unwrap_or(0) as usize;
        let start = if row == 0 {
            0
        } else {
            offs.get(row - 1).copied().unwrap_or(0) as usize
        };
        data(&self.ids)
            .get(start..end)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// The live row of `subject_id`, if it is enrolled and not deleted in this snapshot.
    pub fn row_of(&self, subject_id: &str) -> Option<usize> {
        self.index
            .find(id_hash(subject_id), |r| {
                let r = r as usize;
                r < self.rows && !self.is_deleted(r) && self.subject_id(r) == subject_id
            })
            .map(|r| r as usize)
    }

    /// The L2-normalised `m` template of `row`; `None` if absent, out of range or not in the schema.
    pub fn template(&self, m: Modality, row: usize) -> Option<&[f32]> {
        if row >= self.rows {
            return None;
        }
        let v = self.view(m)?;
        if f32s(&v.qual).get(row).is_none_or(|&q| q == ABSENT_QUALITY) {
            return None;
        }
        let start = row * v.stride_f32;
        f32s(&v.f32).get(start..start + v.spec.dim)
    }

    /// The i8 codes and scale of `row`'s `m` template; `None` if absent.
    pub fn template_i8(&self, m: Modality, row: usize) -> Option<(&[i8], f32)> {
        if !self.is_present(m, row) {
            return None;
        }
        let v = self.view(m)?;
        let q: &[i8] = bytemuck::cast_slice(data(&v.i8));
        let start = row * v.stride_i8;
        Some((q.get(start..start + v.spec.dim)?, *f32s(&v.scale).get(row)?))
    }
}
