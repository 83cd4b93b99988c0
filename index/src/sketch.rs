//! Sign sketches (SimHash): a cheap, analysable pre-filter for cosine threshold joins.
//!
//! # Model
//! A [`Sketcher`] holds `bits` hyperplanes with i.i.d. standard normal coefficients; the sketch of `x` is
//! the sign bit of each `⟨hₖ, x⟩`. For two vectors at angle `θ` the bits disagree independently with
//! probability `θ/π` (Charikar 2002), so the Hamming distance `H` of two sketches is exactly
//! `Binomial(bits, acos(cos)/π)`. A pair is kept iff `H ≤ cut`; the probability that a pair at cosine `c`
//! is dropped is the binomial upper tail [`drop_probability`], and [`cut_for_cosine`] picks the smallest cut
//! whose drop probability at a given cosine is below a bound. Filtering never changes a score: survivors are
//! rescored exactly by the caller.
//!
//! # Cost
//! 512 bits are 64 bytes per row (1/32 of a 512-d f32 row). Comparing two sketches is 8 XOR + POPCNT; the
//! kernel is compiled for `popcnt` + AVX2 and selected at run time (`PACHA_SIMD=scalar` forces the portable
//! path, which gives identical results). Sketching is one GEMM of the rows with the hyperplanes.

use rayon::prelude::*;
use std::sync::Arc;

use crate::IndexError;
use crate::kernels::{gather, gemm};
use crate::rng::SplitMix;
use crate::view::RowsF32;

/// Rows sketched per GEMM block.
const SKETCH_TILE: usize = 256;
/// Rows per streamed batch of [`Sketcher::sketch_rows_streaming`] (a multiple of `SKETCH_TILE`).
const SKETCH_BATCH: usize = 256 * SKETCH_TILE;

/// Random hyperplanes that turn f32 rows into sign sketches.
#[derive(Clone, Debug, PartialEq)]
pub struct Sketcher {
    dim: usize,
    bits: usize,
    /// `bits × dim`, row-major.
    planes: Vec<f32>,
}

/// Saved sketch words shared with their owner (e.g. a file mapping): row-major, a whole number of rows.
pub trait SketchWords: Send + Sync {
    /// The words, row after row.
    fn words(&self) -> &[u64];
}

/// Sketches of every row of a base (absent rows are all zero and must be skipped by the caller): rows
/// `0..head_rows` borrowed from shared saved words ([`SketchWords`], no copy), the rows after them owned.
#[derive(Clone)]
pub struct Sketches {
    words: usize,
    /// Saved words of rows `0..head_rows`, if any.
    head: Option<Arc<dyn SketchWords>>,
    head_rows: usize,
    /// Rows `head_rows..`, owned.
    data: Vec<u64>,
}

impl std::fmt::Debug for Sketches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sketches")
            .field("words", &self.words)
            .field("saved_rows", &self.head_rows)
            .field("rows", &self.rows())
            .finish()
    }
}

impl PartialEq for Sketches {
    fn eq(&self, other: &Sketches) -> bool {
        self.words == other.words
            && self.rows() == other.rows()
            && (0..self.rows()).all(|i| self.row(i) == other.row(i))
    }
}

impl Sketches {
    /// Sketches of `words` words per row: rows `0..saved_rows` from `saved` (which must hold exactly
    /// `saved_rows × words` words), then the rows of `owned` (a whole number of rows).
    pub fn from_parts(
        words: usize,
        saved: Option<(Arc<dyn SketchWords>, usize)>,
        owned: Vec<u64>,
    ) -> Result<Sketches, IndexError> {
        if words == 0 || !owned.len().is_multiple_of(words) {
            return Err(IndexError::Shape(format!(
                "{} owned sketch words are not whole rows of {words} words",
                owned.len()
            )));
        }
        let (head, head_rows) = match saved {
            Some((h, rows)) => {
                if h.words().len() != rows * words {
                    return Err(IndexError::Shape(format!(
                        "{} saved sketch words for {rows} rows of {words} words",
                        h.words().len()
                    )));
                }
                (Some(h), rows)
            }
            None => (None, 0),
        };
        Ok(Sketches {
            words,
            head,
            head_rows,
            data: owned,
        })
    }
    /// 64-bit words per sketch.
    pub fn words(&self) -> usize {
        self.words
    }
    /// Bits per sketch.
    pub fn bits(&self) -> usize {
        self.words * 64
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.head_rows + self.data.len() / self.words.max(1)
    }
    /// Rows served from saved words (`0..saved_rows()`); the rest were computed.
    pub fn saved_rows(&self) -> usize {
        self.head_rows
    }
    /// Appends every row of `range` (clipped to the rows held) whose sketch passes the staged test `cut`
    /// against `q` ([`scan_staged`]); nothing if `q` is not one sketch long.
    pub fn scan_rows(
        &self,
        range: std::ops::Range<usize>,
        q: &[u64],
        cut: StagedCut,
        out: &mut Vec<u32>,
    ) {
        let w = self.words;
        let end = range.end.min(self.rows());
        let mut a = range.start;
        if q.len() != w || a >= end {
            return;
        }
        if a < self.head_rows {
            let b = self.head_rows.min(end);
            if let Some(h) = &self.head {
                scan_staged(q, &h.words()[a * w..b * w], cut, a as u32, out);
            }
            a = b;
        }
        if a < end {
            let (o, e) = (a - self.head_rows, end - self.head_rows);
            scan_staged(q, &self.data[o * w..e * w], cut, a as u32, out);
        }
    }
    /// The sketch of row `i` (empty if out of range).
    #[inline]
    pub fn row(&self, i: usize) -> &[u64] {
        let w = self.words;
        if i < self.head_rows {
            return match &self.head {
                Some(h) => h.words().get(i * w..(i + 1) * w).unwrap_or(&[]),
                None => &[],
            };
        }
        let i = i - self.head_rows;
        self.data.get(i * w..(i + 1) * w).unwrap_or(&[])
    }
}

impl Sketcher {
    /// `bits` (a positive multiple of 64) seeded Gaussian hyperplanes in dimension `dim`.
    pub fn new(dim: usize, bits: usize, seed: u64) -> Result<Sketcher, IndexError> {
        if dim == 0 || bits == 0 || !bits.is_multiple_of(64) {
            return Err(IndexError::Shape(format!(
                "sketch needs dim > 0 and bits a positive multiple of 64 (dim {dim}, bits {bits})"
            )));
        }
        let mut rng = SplitMix(seed);
        let planes = (0..bits * dim).map(|_| rng.normal() as f32).collect();
        Ok(Sketcher { dim, bits, planes })
    }

    /// Bits per sketch.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Sketch of one vector into `out` (`bits / 64` words).
    pub fn sketch_one(&self, v: &[f32], out: &mut [u64]) {
        out.iter_mut().for_each(|w| *w = 0);
        for k in 0..self.bits.min(out.len() * 64) {
            let h = &self.planes[k * self.dim..(k + 1) * self.dim];
            let s: f32 = h.iter().zip(v).map(|(a, b)| a * b).sum();
            if s > 0.0 {
                out[k / 64] |= 1 << (k % 64);
            }
        }
    }

    /// Sketches every row of `base` for which `present(row)` holds (others stay zero), in parallel blocks.
    pub fn sketch_rows(
        &self,
        base: RowsF32<'_>,
        present: &(dyn Fn(usize) -> bool + Sync),
    ) -> Result<Sketches, IndexError> {
        self.sketch_rows_streaming(base, present, &())
    }

    /// [`Sketcher::sketch_rows`] in ascending batches of rows, announcing each batch to `pager` before it
    /// is read and releasing it after (for a base that is a file mapping larger than RAM: see
    /// `Ivf::build_streaming`).
    pub fn sketch_rows_streaming(
        &self,
        base: RowsF32<'_>,
        present: &(dyn Fn(usize) -> bool + Sync),
        pager: &dyn crate::RowPager,
    ) -> Result<Sketches, IndexError> {
        let data = self.sketch_rows_from(base, 0, present, pager)?;
        Sketches::from_parts(self.bits / 64, None, data)
    }

    /// The sketch words of rows `start..base.rows()` (as [`Sketcher::sketch_rows_streaming`] computes them for
    /// a whole base: rows are sketched in the same GEMM blocks, aligned on row 0, so every row's sketch is
    /// bit-identical to the whole base's), streamed through `pager`.
    pub fn sketch_rows_from(
        &self,
        base: RowsF32<'_>,
        start: usize,
        present: &(dyn Fn(usize) -> bool + Sync),
        pager: &dyn crate::RowPager,
    ) -> Result<Vec<u64>, IndexError> {
        if base.dim() != self.dim {
            return Err(IndexError::Dim {
                expected: self.dim,
                got: base.dim(),
            });
        }
        let (n, words, bits) = (base.rows(), self.bits / 64, self.bits);
        let start = start.min(n);
        // Blocks start on multiples of SKETCH_TILE from row 0, whatever `start`.
        let a0 = start - start % SKETCH_TILE;
        let mut data = vec![0u64; (n - a0) * words];
        let span = |b: usize| a0 + b * SKETCH_BATCH..(a0 + (b + 1) * SKETCH_BATCH).min(n);
        if a0 < n {
            pager.will_read(span(0));
        }
        for (batch, part) in data.chunks_mut(SKETCH_BATCH * words).enumerate() {
            let b0 = a0 + batch * SKETCH_BATCH;
            if b0 + SKETCH_BATCH < n {
                pager.will_read(span(batch + 1));
            }
            part.par_chunks_mut(SKETCH_TILE * words)
                .enumerate()
                .for_each_init(
                    || (Vec::new(), Vec::new(), Vec::new()),
                    |(ids, rows, prod), (b, out)| {
                        let r0 = b0 + b * SKETCH_TILE;
                        ids.clear();
                        ids.extend(
                            (r0..(r0 + SKETCH_TILE).min(n))
                                .filter(|&r| present(r))
                                .map(|r| r as u32),
                        );
                        if ids.is_empty() {
                            return;
                        }
                        gather(base, ids, rows);
                        gemm(rows, ids.len(), &self.planes, bits, self.dim, prod);
                        for (i, &r) in ids.iter().enumerate() {
                            let o = (r as usize - r0) * words;
                            let sk = &mut out[o..o + words];
                            for (k, &s) in prod[i * bits..(i + 1) * bits].iter().enumerate() {
                                if s > 0.0 {
                                    sk[k / 64] |= 1 << (k % 64);
                                }
                            }
                        }
                    },
                );
            pager.release(span(batch));
        }
        data.drain(..(start - a0) * words);
        Ok(data)
    }
}

/// Hamming distance of two sketches (AVX-512 VPOPCNTDQ, else POPCNT, else portable; chosen at runtime).
pub fn hamming(a: &[u64], b: &[u64]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if a.len() >= 8
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vpopcntdq")
    {
        // SAFETY: `hamming_avx512` requires AVX-512F and VPOPCNTDQ (both detected just above); it reads
        // only within `a` and `b` (whole 8-word chunks of the shorter slice, then scalar words).
        return unsafe { hamming_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: `hamming_popcnt` only requires the POPCNT instruction, detected just above.
        return unsafe { hamming_popcnt(a, b) };
    }
    hamming_portable(a, b)
}

/// [`hamming`] without target features.
fn hamming_portable(a: &[u64], b: &[u64]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

/// [`hamming`] with AVX-512 VPOPCNTDQ: eight words per step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vpopcntdq")]
unsafe fn hamming_avx512(a: &[u64], b: &[u64]) -> u32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = _mm512_setzero_si512();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: words i..i+8 are within both slices (i + 8 ≤ n); unaligned loads.
        let (x, y) = unsafe {
            (
                _mm512_loadu_si512(a.as_ptr().add(i).cast()),
                _mm512_loadu_si512(b.as_ptr().add(i).cast()),
            )
        };
        acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(x, y)));
        i += 8;
    }
    let tail: u32 = a[i..n]
        .iter()
        .zip(&b[i..n])
        .map(|(x, y)| (x ^ y).count_ones())
        .sum();
    _mm512_reduce_add_epi64(acc) as u32 + tail
}

/// [`hamming`] compiled for POPCNT (`count_ones` becomes one instruction per word).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn hamming_popcnt(a: &[u64], b: &[u64]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

/// A two-stage sketch test: the first `prefix_words` words of each sketch against `prefix_cut` (the packed
/// SIMD filter over a block of members), then, for the survivors only, the whole sketch against `cut` (one
/// scalar Hamming distance each). More bits separate a pair near the threshold from impostors better; the
/// prefix keeps the per-product cost of the first stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StagedCut {
    /// Words of the first stage (at most the sketch's words).
    pub prefix_words: usize,
    /// Hamming cut of the first stage.
    pub prefix_cut: u32,
    /// Hamming cut over the whole sketch (unused when the prefix is the whole sketch).
    pub cut: u32,
}

impl StagedCut {
    /// A single stage over the whole sketch.
    pub fn single(cut: u32) -> StagedCut {
        StagedCut {
            prefix_words: usize::MAX,
            prefix_cut: cut,
            cut,
        }
    }
}

/// Appends `first + i` for every row `i` of `rows` (row-major sketches of `q.len()` words each, a whole
/// number of rows) that passes the staged test against `q`: Hamming distance over the first
/// `cut.prefix_words` words ≤ `cut.prefix_cut`, then over the whole sketch ≤ `cut.cut` (when the prefix
/// is shorter than the sketch). A linear scan for one query over many rows (identify's sketch path);
/// AVX-512 VPOPCNTDQ for an 8-word prefix where the CPU has it, POPCNT or portable otherwise, identical
/// results.
pub fn scan_staged(q: &[u64], rows: &[u64], cut: StagedCut, first: u32, out: &mut Vec<u32>) {
    let w = q.len();
    if w == 0 || !rows.len().is_multiple_of(w) {
        return;
    }
    let prefix = cut.prefix_words.min(w);
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd_enabled() {
        if prefix == 8
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vpopcntdq")
        {
            // SAFETY: `scan_staged_avx512` requires AVX-512F and VPOPCNTDQ (both detected just above); it
            // reads row `i` at `rows[i·w .. i·w + w]` for `i < rows.len() / w` and `q[..w]` only, with
            // `w ≥ prefix = 8`.
            unsafe { scan_staged_avx512(q, rows, cut, first, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("popcnt") {
            // SAFETY: `scan_staged_popcnt` only requires the POPCNT instruction, detected just above.
            unsafe { scan_staged_popcnt(q, rows, cut, first, out) };
            return;
        }
    }
    scan_staged_portable(q, rows, cut, first, out);
}

/// Portable path of [`scan_staged`].
fn scan_staged_portable(q: &[u64], rows: &[u64], cut: StagedCut, first: u32, out: &mut Vec<u32>) {
    let w = q.len();
    let p = cut.prefix_words.min(w);
    for (i, row) in rows.chunks_exact(w).enumerate() {
        let h = hamming_portable(&q[..p], &row[..p]);
        if h <= cut.prefix_cut && (p == w || h + hamming_portable(&q[p..], &row[p..]) <= cut.cut) {
            out.push(first + i as u32);
        }
    }
}

/// [`scan_staged`] compiled for POPCNT.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn scan_staged_popcnt(q: &[u64], rows: &[u64], cut: StagedCut, first: u32, out: &mut Vec<u32>) {
    let w = q.len();
    let p = cut.prefix_words.min(w);
    for (i, row) in rows.chunks_exact(w).enumerate() {
        let h: u32 = q[..p]
            .iter()
            .zip(&row[..p])
            .map(|(x, y)| (x ^ y).count_ones())
            .sum();
        if h <= cut.prefix_cut {
            let rest: u32 = q[p..]
                .iter()
                .zip(&row[p..])
                .map(|(x, y)| (x ^ y).count_ones())
                .sum();
            if p == w || h + rest <= cut.cut {
                out.push(first + i as u32);
            }
        }
    }
}

/// AVX-512 kernel of [`scan_staged`] for an 8-word prefix: one 64-byte load, XOR, `vpopcntq` and a
/// horizontal sum per row; the rest of the sketch (8 words at a time, then scalar words) only for rows
/// that pass the prefix.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vpopcntdq")]
unsafe fn scan_staged_avx512(
    q: &[u64],
    rows: &[u64],
    cut: StagedCut,
    first: u32,
    out: &mut Vec<u32>,
) {
    use std::arch::x86_64::*;
    let w = q.len();
    let n = rows.len() / w;
    // SAFETY: q has w ≥ 8 words (the caller's prefix is 8 and at most w).
    let q0 = unsafe { _mm512_loadu_si512(q.as_ptr().cast()) };
    let ptr = rows.as_ptr();
    for i in 0..n {
        // SAFETY: row i occupies rows[i·w .. i·w + w] with w ≥ 8, inside `rows` since i < n = len / w.
        let v = unsafe { _mm512_loadu_si512(ptr.add(i * w).cast()) };
        let h = _mm512_reduce_add_epi64(_mm512_popcnt_epi64(_mm512_xor_si512(v, q0))) as u32;
        if h > cut.prefix_cut {
            continue;
        }
        if w > 8 {
            let row = &rows[i * w..(i + 1) * w];
            // SAFETY: this function runs with the same target features (avx512f, avx512vpopcntdq) that
            // `hamming_avx512` needs; it bounds its own loads by both slices' lengths.
            let rest = unsafe { hamming_avx512(&row[8..], &q[8..]) };
            if h + rest > cut.cut {
                continue;
            }
        }
        out.push(first + i as u32);
    }
}

/// Sketches regrouped for the SIMD kernels: groups of [`GROUP`] sketches stored word-major (word `w` of
/// sketches `8g..8g+8` are contiguous), zero-padded to a multiple of the group. Built once per block of
/// members and compared with many queries.
#[derive(Clone, Debug, Default)]
pub struct PackedBlock {
    words: usize,
    len: usize,
    data: Vec<u64>,
    /// Per lane, the sketch's class (filled by [`PackedBlock::push_classed`], padded like the groups).
    classes: Vec<u8>,
}

/// Sketches per group of a [`PackedBlock`]: one AVX-512 register, or two AVX2 registers, per word.
const GROUP: usize = 8;

impl PackedBlock {
    /// Empties the block for sketches of `words` words.
    pub fn clear(&mut self, words: usize) {
        self.words = words;
        self.len = 0;
        self.data.clear();
        self.classes.clear();
    }
    /// Appends one sketch of class `class` (below [`FILTER_CLASSES`]) for [`filter_packed_classed`].
    pub fn push_classed(&mut self, sketch: &[u64], class: u8) {
        if self.len.is_multiple_of(GROUP) {
            self.classes.resize(self.classes.len() + GROUP, 0);
        }
        self.classes[self.len] = class % FILTER_CLASSES as u8;
        self.push(sketch);
    }
    /// True if every lane has a class (built by [`PackedBlock::push_classed`] only).
    fn classed(&self) -> bool {
        self.classes.len() == self.len.div_ceil(GROUP) * GROUP
    }
    /// Appends one sketch (`words` words).
    pub fn push(&mut self, sketch: &[u64]) {
        let w = self.words;
        if self.len.is_multiple_of(GROUP) {
            self.data.resize(self.data.len() + GROUP * w, 0);
        }
        let (g, l) = (self.len / GROUP, self.len % GROUP);
        for (i, &x) in sketch.iter().take(w).enumerate() {
            self.data[g * GROUP * w + i * GROUP + l] = x;
        }
        self.len += 1;
    }
    /// Number of sketches.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True if the block holds no sketch.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Word `w` of sketch `k` (portable access, for the fallback path).
    fn word(&self, k: usize, w: usize) -> u64 {
        self.data[(k / GROUP) * GROUP * self.words + w * GROUP + k % GROUP]
    }
}

/// The kernel [`filter_packed`] runs on this CPU: `"avx512"` (AVX-512F, VPOPCNTDQ and VL), `"avx2"`, or
/// `"portable"` (no SIMD, or `PACHA_SIMD=scalar`). The planner prices sketch products by it; the bench gate
/// records it.
pub fn filter_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd_enabled() {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vpopcntdq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "portable"
}

/// Appends to `out` the index of every sketch of `block` within Hamming distance `cut` of `q`
/// (`q.len()` must equal the block's words; otherwise nothing is appended).
pub fn filter_packed(q: &[u64], block: &PackedBlock, cut: u32, out: &mut Vec<u32>) {
    filter_dispatch::<false>(filter_kernel(), q, block, cut, &[0; FILTER_CLASSES], out);
}

/// Classes a classed filter tells apart ([`filter_packed_classed`]): one AVX-512 register of cuts.
pub const FILTER_CLASSES: usize = 8;

/// Like [`filter_packed`], but each sketch is compared with the cut of its own class: a sketch pushed with
/// class `k` ([`PackedBlock::push_classed`]) passes within Hamming distance `table[k]` of `q`. One pass over
/// the block whatever the classes (a block per class cost a call and a partial group each). A block built
/// with [`PackedBlock::push`] counts as all class 0.
pub fn filter_packed_classed(
    q: &[u64],
    block: &PackedBlock,
    table: &[u32; FILTER_CLASSES],
    out: &mut Vec<u32>,
) {
    filter_dispatch::<true>(filter_kernel(), q, block, 0, table, out);
}

/// One kernel of [`filter_packed`] by name, for benches and tests: "avx512", "avx2", else portable. Falls
/// back to the portable path when the CPU lacks the named kernel's features.
#[doc(hidden)]
pub fn filter_packed_variant(
    variant: &str,
    q: &[u64],
    block: &PackedBlock,
    cut: u32,
    out: &mut Vec<u32>,
) {
    filter_dispatch::<false>(variant, q, block, cut, &[0; FILTER_CLASSES], out);
}

/// One kernel of [`filter_packed_classed`] by name (as [`filter_packed_variant`]).
#[doc(hidden)]
pub fn filter_packed_classed_variant(
    variant: &str,
    q: &[u64],
    block: &PackedBlock,
    table: &[u32; FILTER_CLASSES],
    out: &mut Vec<u32>,
) {
    filter_dispatch::<true>(variant, q, block, 0, table, out);
}

/// Runs the kernel `variant` ("avx512", "avx2", else portable; the portable one where the CPU lacks the
/// named kernel's features, or, `CLASSED`, where the block was not built with classes) with one `cut`, or
/// with `CLASSED` each lane's class's cut from `table`.
fn filter_dispatch<const CLASSED: bool>(
    variant: &str,
    q: &[u64],
    block: &PackedBlock,
    cut: u32,
    table: &[u32; FILTER_CLASSES],
    out: &mut Vec<u32>,
) {
    if q.len() != block.words || block.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if !CLASSED || block.classed() {
        if variant == "avx512"
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vpopcntdq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the kernel's target features were detected just above; it reads only within
            // `block.data` (`GROUP · words · ⌈len/GROUP⌉` words by construction) and, classed, within
            // `block.classes` (`GROUP · ⌈len/GROUP⌉` bytes: `classed` checked just above), and
            // writes only within the capacity it reserves in `out`.
            unsafe { filter_packed_avx512::<CLASSED>(q, block, cut, table, out) };
            return;
        }
        if variant == "avx2" && std::arch::is_x86_feature_detected!("avx2") && q.len() <= 31 {
            // SAFETY: as above, for AVX2.
            unsafe { filter_packed_avx2::<CLASSED>(q, block, cut, table, out) };
            return;
        }
    }
    filter_packed_portable::<CLASSED>(q, block, cut, table, out);
}

/// Portable path of [`filter_packed`].
fn filter_packed_portable<const CLASSED: bool>(
    q: &[u64],
    block: &PackedBlock,
    cut: u32,
    table: &[u32; FILTER_CLASSES],
    out: &mut Vec<u32>,
) {
    for k in 0..block.len {
        let h: u32 = (0..block.words)
            .map(|w| (q[w] ^ block.word(k, w)).count_ones())
            .sum();
        let cut = if CLASSED {
            table[usize::from(block.classes.get(k).copied().unwrap_or(0)) % FILTER_CLASSES]
        } else {
            cut
        };
        if h <= cut {
            out.push(k as u32);
        }
    }
}

/// The lanes of a group that hold sketches: all 8, or the first `len % GROUP` in a partial last group.
#[inline]
fn valid_lanes(g: usize, len: usize) -> u32 {
    let left = len - g * GROUP;
    if left >= GROUP {
        0xff
    } else {
        (1u32 << left) - 1
    }
}

/// AVX-512 kernel of [`filter_packed`]: per group of 8 sketches and per word, XOR with the broadcast query
/// word and `vpopcntq` into eight 64-bit distances; one unsigned compare against the cut gives the mask.
/// The kept indices are written without a branch (the mask compresses the group's eight indices in a
/// register, a full store, the length advances by the mask's popcount): with a few per cent of products
/// passing, a branch per group mispredicted often enough to halve the rate (BENCHMARKS.md).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vpopcntdq,avx512vl")]
unsafe fn filter_packed_avx512<const CLASSED: bool>(
    q: &[u64],
    block: &PackedBlock,
    cut: u32,
    table: &[u32; FILTER_CLASSES],
    out: &mut Vec<u32>,
) {
    use std::arch::x86_64::*;
    let w = block.words;
    let groups = block.len.div_ceil(GROUP);
    let cutv = _mm512_set1_epi64(i64::from(cut));
    let tab: [i64; FILTER_CLASSES] = table.map(i64::from);
    // SAFETY: eight i64, one unaligned 512-bit load.
    let tabv = unsafe { _mm512_loadu_si512(tab.as_ptr().cast()) };
    let cls = block.classes.as_ptr();
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let ptr = block.data.as_ptr();
    // Each group stores 8 indices at the current end and keeps the first popcount(mask) of them, so the
    // stores reach at most `groups · GROUP` entries past the old length.
    out.reserve(groups * GROUP);
    let start = out.len();
    // SAFETY: `start ≤ capacity`; the offset stays within the allocation reserved just above.
    let dst = unsafe { out.as_mut_ptr().add(start) };
    let mut kept = 0usize;
    for g in 0..groups {
        let mut acc = _mm512_setzero_si512();
        for (i, &qw) in q.iter().enumerate() {
            // SAFETY: group g's word i occupies data[(g·w + i)·8 .. +8], within the block's allocation.
            let v = unsafe { _mm512_loadu_si512(ptr.add((g * w + i) * GROUP).cast()) };
            let x = _mm512_xor_si512(v, _mm512_set1_epi64(qw as i64));
            acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(x));
        }
        let cuts = if CLASSED {
            // SAFETY: a classed block holds GROUP class bytes per group: bytes [g·8, g·8 + 8) exist.
            let c = unsafe { _mm_loadl_epi64(cls.add(g * GROUP).cast()) };
            _mm512_permutexvar_epi64(_mm512_cvtepu8_epi64(c), tabv)
        } else {
            cutv
        };
        let keep = _mm512_cmple_epu64_mask(acc, cuts) & valid_lanes(g, block.len) as u8;
        let idx = _mm256_add_epi32(lanes, _mm256_set1_epi32((g * GROUP) as i32));
        let packed = _mm256_maskz_compress_epi32(keep, idx);
        // SAFETY: `kept ≤ g · GROUP`, so the 8 lanes stored land within the `groups · GROUP` reserved.
        unsafe { _mm256_storeu_si256(dst.add(kept).cast(), packed) };
        kept += keep.count_ones() as usize;
    }
    // SAFETY: the first `kept` entries past `start` were written above (each group's kept lanes first).
    unsafe { out.set_len(start + kept) };
}

/// AVX2 kernel of [`filter_packed`]: per half group of 4 sketches, XOR with the broadcast query words,
/// nibble popcount by `vpshufb` accumulated in bytes (≤ 8 per word, so ≤ 31 words fit a byte), `vpsadbw` to
/// four 64-bit distances, one compare against the cut; the kept indices written without a branch like the
/// AVX-512 kernel's, compressed by a permutation table.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn filter_packed_avx2<const CLASSED: bool>(
    q: &[u64],
    block: &PackedBlock,
    cut: u32,
    table: &[u32; FILTER_CLASSES],
    out: &mut Vec<u32>,
) {
    use std::arch::x86_64::*;
    let w = block.words;
    // SAFETY: eight u32, one unaligned 256-bit load.
    let tabv = unsafe { _mm256_loadu_si256(table.as_ptr().cast()) };
    let cls = block.classes.as_ptr();
    let lut = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3,
        3, 4,
    );
    let low = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let cutv = _mm256_set1_epi64x(i64::from(cut));
    let mut qb = [zero; 31];
    for (b, &x) in qb.iter_mut().zip(q) {
        *b = _mm256_set1_epi64x(x as i64);
    }
    let ptr = block.data.as_ptr();
    let groups = block.len.div_ceil(GROUP);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    out.reserve(groups * GROUP);
    let start = out.len();
    // SAFETY: `start ≤ capacity`; the offset stays within the allocation reserved just above.
    let dst = unsafe { out.as_mut_ptr().add(start) };
    let mut kept = 0usize;
    for g in 0..groups {
        let (mut acc0, mut acc1) = (zero, zero);
        for (i, &qv) in qb.iter().take(w).enumerate() {
            let at = (g * w + i) * GROUP;
            // SAFETY: group g's word i occupies data[at .. at + 8], within the block's allocation.
            let (v0, v1) = unsafe {
                (
                    _mm256_loadu_si256(ptr.add(at).cast::<__m256i>()),
                    _mm256_loadu_si256(ptr.add(at + 4).cast::<__m256i>()),
                )
            };
            for (acc, v) in [(&mut acc0, v0), (&mut acc1, v1)] {
                let v = _mm256_xor_si256(v, qv);
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                *acc = _mm256_add_epi8(
                    *acc,
                    _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi)),
                );
            }
        }
        let (cut0, cut1) = if CLASSED {
            // SAFETY: a classed block holds GROUP class bytes per group: bytes [g·8, g·8 + 8) exist.
            let c = unsafe { _mm_loadl_epi64(cls.add(g * GROUP).cast()) };
            let cuts = _mm256_permutevar8x32_epi32(tabv, _mm256_cvtepu8_epi32(c));
            (
                _mm256_cvtepu32_epi64(_mm256_castsi256_si128(cuts)),
                _mm256_cvtepu32_epi64(_mm256_extracti128_si256::<1>(cuts)),
            )
        } else {
            (cutv, cutv)
        };
        let over0 = _mm256_cmpgt_epi64(_mm256_sad_epu8(acc0, zero), cut0);
        let over1 = _mm256_cmpgt_epi64(_mm256_sad_epu8(acc1, zero), cut1);
        let keep = ((!_mm256_movemask_pd(_mm256_castsi256_pd(over0)) & 0xf)
            | ((!_mm256_movemask_pd(_mm256_castsi256_pd(over1)) & 0xf) << 4))
            as u32
            & valid_lanes(g, block.len);
        // The kept lanes' indices moved to the front by a permutation from the table, one full store.
        // SAFETY: a table row is 8 u32, one 256-bit load.
        let perm = unsafe { _mm256_loadu_si256(COMPRESS_LANES[keep as usize].as_ptr().cast()) };
        let idx = _mm256_add_epi32(lanes, _mm256_set1_epi32((g * GROUP) as i32));
        // SAFETY: `kept ≤ g · GROUP`, so the 8 lanes stored land within the `groups · GROUP` reserved.
        unsafe {
            _mm256_storeu_si256(dst.add(kept).cast(), _mm256_permutevar8x32_epi32(idx, perm))
        };
        kept += keep.count_ones() as usize;
    }
    // SAFETY: the first `kept` entries past `start` were written above (each group's kept lanes first).
    unsafe { out.set_len(start + kept) };
}

/// Per 8-bit lane mask, the lanes set in it in ascending order, then zeros: the permutation that moves a
/// group's kept indices to the front (the AVX2 filter's branch-free output).
static COMPRESS_LANES: [[u32; 8]; 256] = compress_lanes();

const fn compress_lanes() -> [[u32; 8]; 256] {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut l, mut k) = (0, 0);
        while l < 8 {
            if m & (1 << l) != 0 {
                t[m][k] = l as u32;
                k += 1;
            }
            l += 1;
        }
        m += 1;
    }
    t
}

/// Probability that one sketch bit differs for two vectors at cosine `cos`: `acos(cos)/π`.
pub fn bit_flip_probability(cos: f64) -> f64 {
    cos.clamp(-1.0, 1.0).acos() / std::f64::consts::PI
}

/// `P(H ≤ h)` for `h = 0..=bits`, `H ~ Binomial(bits, p)` (computed in log space, exact to f64 rounding).
pub fn binomial_cdf(bits: usize, p: f64) -> Vec<f64> {
    let n = bits as f64;
    let mut cdf = Vec::with_capacity(bits + 1);
    if p <= 0.0 {
        return vec![1.0; bits + 1];
    }
    if p >= 1.0 {
        let mut v = vec![0.0; bits + 1];
        v[bits] = 1.0;
        return v;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut ln_choose = 0.0f64;
    let mut acc = 0.0f64;
    for k in 0..=bits {
        if k > 0 {
            ln_choose += ((n - k as f64 + 1.0) / k as f64).ln();
        }
        acc += (ln_choose + k as f64 * lp + (n - k as f64) * lq).exp();
        cdf.push(acc.min(1.0));
    }
    cdf
}

/// Probability that a pair at cosine `cos` is dropped by the filter `H ≤ cut` (`P(H > cut)`).
pub fn drop_probability(bits: usize, cos: f64, cut: u32) -> f64 {
    let cdf = binomial_cdf(bits, bit_flip_probability(cos));
    1.0 - cdf.get(cut as usize).copied().unwrap_or(1.0)
}

/// The smallest cut whose drop probability for a pair at cosine `cos` is at most `delta`.
pub fn cut_for_cosine(bits: usize, cos: f64, delta: f64) -> u32 {
    let cdf = binomial_cdf(bits, bit_flip_probability(cos));
    cdf.iter().position(|&c| 1.0 - c <= delta).unwrap_or(bits) as u32
}

/// How a sketch cut is chosen for a threshold join (see [`choose_cut`]).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CutPolicy {
    /// Drop probability allowed for a pair exactly at the join threshold (the "complete" cut).
    pub delta_at_threshold: f64,
    /// Share of impostor pairs allowed through the filter (the rescoring budget).
    pub impostor_budget: f64,
    /// Expected share of genuine pairs above the threshold that the filter may drop.
    pub genuine_drop: f64,
    /// `genuine_drop` when several modalities generate candidates (a caller's choice: see the engine's
    /// dedup, where a pair is lost only if every modality that could catch it drops it).
    pub genuine_drop_multimodal: f64,
}

impl Default for CutPolicy {
    fn default() -> Self {
        CutPolicy {
            delta_at_threshold: 1e-6,
            impostor_budget: 1e-3,
            genuine_drop: 1e-5,
            genuine_drop_multimodal: 1e-3,
        }
    }
}

/// A chosen cut and the figures that justify it (all computed from the binomial model).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CutChoice {
    /// Sketch bits.
    pub bits: usize,
    /// The cut used: keep pairs with Hamming distance ≤ `cut`.
    pub cut: u32,
    /// Smallest cut dropping a pair at the threshold with probability ≤ `delta_at_threshold`.
    pub complete_cut: u32,
    /// Largest cut letting through at most `impostor_budget` of impostor pairs.
    pub budget_cut: u32,
    /// Smallest cut dropping at most `genuine_drop` of the genuine pairs above the threshold.
    pub genuine_cut: u32,
    /// Predicted probability that a pair exactly at the threshold is dropped, at `cut`.
    pub drop_at_threshold: f64,
    /// Predicted share of genuine pairs above the threshold dropped, at `cut`.
    pub genuine_dropped: f64,
    /// Predicted share of impostor pairs that pass, at `cut`.
    pub impostor_pass: f64,
}

/// Mixture CDF `Σ w(c)·P(H ≤ h | c)` over a cosine grid, for every `h`, with weights normalised.
fn mixture_cdf(bits: usize, grid: &[(f64, f64)]) -> Vec<f64> {
    let total: f64 = grid.iter().map(|g| g.1).sum();
    let mut acc = vec![0.0; bits + 1];
    if total <= 0.0 {
        return acc;
    }
    for &(c, w) in grid {
        for (a, p) in acc
            .iter_mut()
            .zip(binomial_cdf(bits, bit_flip_probability(c)))
        {
            *a += w / total * p;
        }
    }
    acc
}

/// Gaussian density grid on `[lo, hi] ∩ [-1, 1]`, within 9 sd of the mean (step ≤ 0.002).
fn gaussian_grid(mean: f64, sd: f64, lo: f64, hi: f64) -> Vec<(f64, f64)> {
    let sd = sd.max(1e-4);
    let (a, b) = (
        lo.max(mean - 9.0 * sd).max(-1.0),
        hi.min(mean + 9.0 * sd).min(1.0),
    );
    if a >= b {
        return Vec::new();
    }
    let steps = (((b - a) / 0.002).ceil() as usize).max(8);
    (0..=steps)
        .map(|i| {
            let c = a + (b - a) * i as f64 / steps as f64;
            let z = (c - mean) / sd;
            (c, (-0.5 * z * z).exp())
        })
        .collect()
}

/// Chooses the sketch cut for a join at cosine `threshold`, given Gaussian models of impostor and genuine
/// cosines: `min(complete, max(budget, genuine))`. The cut is complete (every pair at or above the
/// threshold kept with probability ≥ 1 − `delta_at_threshold`) whenever that fits the impostor budget;
/// otherwise it lets through as many impostors as the budget allows, but never fewer genuine pairs than
/// the `genuine_drop` bound requires.
pub fn choose_cut(
    bits: usize,
    threshold: f64,
    impostor: (f64, f64),
    genuine: (f64, f64),
    policy: &CutPolicy,
) -> CutChoice {
    let complete_cut = cut_for_cosine(bits, threshold, policy.delta_at_threshold);
    let imp = mixture_cdf(bits, &gaussian_grid(impostor.0, impostor.1, -1.0, 1.0));
    let budget_cut = imp
        .iter()
        .rposition(|&p| p <= policy.impostor_budget)
        .unwrap_or(0) as u32;
    let gen_grid = gaussian_grid(genuine.0, genuine.1, threshold, 1.0);
    let genu = mixture_cdf(bits, &gen_grid);
    let genuine_cut = if gen_grid.is_empty() {
        0
    } else {
        genu.iter()
            .position(|&p| 1.0 - p <= policy.genuine_drop)
            .unwrap_or(bits) as u32
    };
    let cut = complete_cut.min(budget_cut.max(genuine_cut));
    CutChoice {
        bits,
        cut,
        complete_cut,
        budget_cut,
        genuine_cut,
        drop_at_threshold: drop_probability(bits, threshold, cut),
        genuine_dropped: if gen_grid.is_empty() {
            0.0
        } else {
            (1.0 - genu[cut as usize]).max(0.0)
        },
        impostor_pass: imp[cut as usize],
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::view::RowsF32;
    use proptest::prelude::*;

    fn unit(rng: &mut SplitMix, d: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    }

    #[test]
    fn gemm_sketch_equals_direct_sketch() {
        let (d, n) = (64, 300);
        let mut rng = SplitMix(3);
        let rows: Vec<f32> = (0..n).flat_map(|_| unit(&mut rng, d)).collect();
        let base = RowsF32::dense(&rows, d).unwrap();
        let sk = Sketcher::new(d, 128, 9).unwrap();
        let all = sk.sketch_rows(base, &|r| r != 7).unwrap();
        let mut one = [0u64; 2];
        let mut differing_bits = 0;
        for r in 0..n {
            sk.sketch_one(base.row(r), &mut one);
            if r == 7 {
                assert_eq!(all.row(r), &[0, 0]);
            } else {
                // GEMM and the direct loop may round a product near zero differently.
                differing_bits += hamming(all.row(r), &one);
            }
        }
        assert!(differing_bits <= 2, "{differing_bits} bits differ");
    }

    #[test]
    fn scan_staged_kernels_agree_with_a_direct_count() {
        // Random words: Hamming distances near 256 of 512 prefix bits; cuts around them keep a mix.
        let mut rng = SplitMix(17);
        for words in [8usize, 16, 12, 4] {
            let n = 333;
            let rows: Vec<u64> = (0..n * words).map(|_| rng.next_u64()).collect();
            let q: Vec<u64> = (0..words).map(|_| rng.next_u64()).collect();
            // Random sketches differ in half their bits: cuts a little below half keep a share.
            let p = 8.min(words) as u32;
            for cut in [
                StagedCut {
                    prefix_words: 8,
                    prefix_cut: 32 * p - 4,
                    cut: 32 * words as u32 - 6,
                },
                StagedCut::single(32 * words as u32),
            ] {
                let p = cut.prefix_words.min(words);
                let want: Vec<u32> = (0..n)
                    .filter(|&i| {
                        let r = &rows[i * words..(i + 1) * words];
                        let hp = hamming_portable(&q[..p], &r[..p]);
                        hp <= cut.prefix_cut && (p == words || hamming_portable(&q, r) <= cut.cut)
                    })
                    .map(|i| 1000 + i as u32)
                    .collect();
                assert!(
                    !want.is_empty() && want.len() < n,
                    "cut {cut:?} keeps {}",
                    want.len()
                );
                let mut got = Vec::new();
                scan_staged(&q, &rows, cut, 1000, &mut got);
                assert_eq!(got, want, "dispatched, {words} words, {cut:?}");
                let mut portable = Vec::new();
                scan_staged_portable(&q, &rows, cut, 1000, &mut portable);
                assert_eq!(portable, want, "portable, {words} words, {cut:?}");
            }
        }
        // Not whole rows: nothing.
        let mut none = Vec::new();
        scan_staged(&[1, 2], &[1, 2, 3], StagedCut::single(128), 0, &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn hamming_follows_the_binomial_model() {
        // Pairs at cosine 0.6: mean Hamming distance bits·acos(0.6)/π.
        let (d, bits, pairs) = (128, 512, 400);
        let mut rng = SplitMix(11);
        let sk = Sketcher::new(d, bits, 5).unwrap();
        let (mut a, mut b) = (vec![0u64; 8], vec![0u64; 8]);
        let mut total = 0.0;
        for _ in 0..pairs {
            let x = unit(&mut rng, d);
            let z = unit(&mut rng, d);
            // y = 0.6 x + 0.8 z⊥ (z made orthogonal to x).
            let dot: f32 = x.iter().zip(&z).map(|(p, q)| p * q).sum();
            let mut zp: Vec<f32> = z.iter().zip(&x).map(|(q, p)| q - dot * p).collect();
            let nz = zp.iter().map(|v| v * v).sum::<f32>().sqrt();
            zp.iter_mut().for_each(|v| *v /= nz);
            let y: Vec<f32> = x.iter().zip(&zp).map(|(p, q)| 0.6 * p + 0.8 * q).collect();
            sk.sketch_one(&x, &mut a);
            sk.sketch_one(&y, &mut b);
            total += f64::from(hamming(&a, &b));
        }
        let mean = total / pairs as f64;
        let expect = bits as f64 * bit_flip_probability(0.6);
        // sd of the mean of 400 binomials ≈ √(512·0.3·0.7/400) ≈ 0.5; allow 5 sd plus plane sampling noise.
        assert!((mean - expect).abs() < 4.0, "mean {mean} vs {expect}");
    }

    #[test]
    fn cut_bounds_the_drop_probability() {
        let cut = cut_for_cosine(512, 0.5, 1e-6);
        assert!(drop_probability(512, 0.5, cut) <= 1e-6);
        assert!(drop_probability(512, 0.5, cut - 1) > 1e-6);
        // Mean at cos 0.5 is 512/3 ≈ 170.7, sd ≈ 10.7: a 1e-6 bound sits about 4.75 sd above.
        assert!((215..=225).contains(&cut), "cut {cut}");
        let cdf = binomial_cdf(512, 0.3);
        assert!((cdf[512] - 1.0).abs() < 1e-9);
        assert!(cdf.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn cut_choice_is_complete_when_the_budget_allows() {
        let p = CutPolicy::default();
        // Threshold far above impostors: the complete cut fits the budget.
        let c = choose_cut(512, 0.6, (0.0, 0.05), (0.7, 0.05), &p);
        assert_eq!(c.cut, c.complete_cut);
        assert!(
            c.drop_at_threshold <= 1e-6 && c.impostor_pass <= 1e-3,
            "{c:?}"
        );
        // Threshold near impostors: the budget binds, but genuine pairs stay safe.
        let c = choose_cut(512, 0.25, (0.0, 0.045), (0.7, 0.02), &p);
        assert!(c.cut < c.complete_cut, "{c:?}");
        assert!(
            c.genuine_dropped <= 1e-5 && c.impostor_pass <= 1e-3,
            "{c:?}"
        );
        assert!(c.drop_at_threshold > 1e-3, "{c:?}");
    }

    /// Saved words standing in for a file mapping.
    struct Words(Vec<u64>);
    impl SketchWords for Words {
        fn words(&self) -> &[u64] {
            &self.0
        }
    }

    #[test]
    fn a_saved_head_and_a_computed_tail_equal_the_whole_base() {
        let (n, d) = (1000, 24);
        let mut rng = SplitMix(5);
        let rows: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let base = RowsF32::dense(&rows, d).unwrap();
        let sk = Sketcher::new(d, 128, 9).unwrap();
        let present = |r: usize| r % 7 != 2;
        let whole = sk.sketch_rows(base, &present).unwrap();
        assert_eq!((whole.rows(), whole.words(), whole.saved_rows()), (n, 2, 0));
        // Saved rows 0..cut (what an index over the first `cut` rows wrote), the rest computed: every split,
        // on and off the GEMM block boundaries, gives the whole base's sketches bit for bit.
        for cut in [0, 1, 255, 256, 257, 600, 999, 1000] {
            let head = sk.sketch_rows(base.slice_rows(0, cut), &present).unwrap();
            let saved: Vec<u64> = (0..cut).flat_map(|r| head.row(r).to_vec()).collect();
            let tail = sk.sketch_rows_from(base, cut, &present, &()).unwrap();
            assert_eq!(tail.len(), (n - cut) * 2);
            let joined =
                Sketches::from_parts(2, Some((Arc::new(Words(saved)), cut)), tail).unwrap();
            assert_eq!((joined.rows(), joined.saved_rows()), (n, cut));
            assert_eq!(joined, whole, "split at {cut}");
            assert!(joined.row(n).is_empty());
        }
        // Parts that are not whole rows are refused.
        assert!(Sketches::from_parts(2, None, vec![0; 3]).is_err());
        assert!(Sketches::from_parts(2, Some((Arc::new(Words(vec![0; 4])), 3)), vec![]).is_err());
    }

    proptest! {
        #[test]
        fn hamming_kernels_agree(
            words in 0usize..40,
            seed in any::<u64>(),
        ) {
            let mut rng = SplitMix(seed);
            let a: Vec<u64> = (0..words).map(|_| rng.next_u64()).collect();
            let b: Vec<u64> = (0..words).map(|_| rng.next_u64()).collect();
            let want = hamming_portable(&a, &b);
            prop_assert_eq!(hamming(&a, &b), want);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("popcnt") {
                // SAFETY: POPCNT detected just above.
                prop_assert_eq!(unsafe { hamming_popcnt(&a, &b) }, want);
            }
        }

        #[test]
        fn packed_filters_agree_with_hamming(
            words in prop::sample::select(vec![1usize, 4, 8, 16, 3, 40]),
            seed in any::<u64>(),
            n in 0usize..70,
            cut in 0u32..1024,
        ) {
            let mut rng = SplitMix(seed);
            let q: Vec<u64> = (0..words).map(|_| rng.next_u64()).collect();
            let block: Vec<u64> = (0..n * words).map(|_| rng.next_u64()).collect();
            let slow: Vec<u32> = (0..n)
                .filter(|&k| hamming(&q, &block[k * words..(k + 1) * words]) <= cut)
                .map(|k| k as u32)
                .collect();
            let mut packed = PackedBlock::default();
            packed.clear(words);
            for k in 0..n {
                packed.push(&block[k * words..(k + 1) * words]);
            }
            let mut via_packed = Vec::new();
            filter_packed(&q, &packed, cut, &mut via_packed);
            prop_assert_eq!(&via_packed, &slow);
            for variant in ["avx512", "avx2"] {
                let mut v = Vec::new();
                filter_packed_variant(variant, &q, &packed, cut, &mut v);
                prop_assert_eq!(&v, &slow, "{}", variant);
                // Appending keeps what the vector held (the branch-free stores start at its end).
                let mut after = vec![u32::MAX; 5];
                filter_packed_variant(variant, &q, &packed, cut, &mut after);
                prop_assert_eq!(&after[..5], &[u32::MAX; 5][..], "{}", variant);
                prop_assert_eq!(&after[5..], &slow[..], "{}", variant);
            }
            let mut packed_portable = Vec::new();
            filter_packed_portable::<false>(&q, &packed, cut, &[0; FILTER_CLASSES], &mut packed_portable);
            prop_assert_eq!(&packed_portable, &slow);
        }

        /// The classed filter keeps a sketch iff it is within its own class's cut, with every kernel, on
        /// random classes, cut tables, lengths (partial groups) and word counts; appending keeps what the
        /// vector held.
        #[test]
        fn classed_filters_agree_with_hamming(
            words in prop::sample::select(vec![1usize, 4, 8, 16, 3, 40]),
            seed in any::<u64>(),
            n in 0usize..70,
            table in prop::array::uniform8(0u32..1024),
        ) {
            let mut rng = SplitMix(seed);
            let q: Vec<u64> = (0..words).map(|_| rng.next_u64()).collect();
            let block: Vec<u64> = (0..n * words).map(|_| rng.next_u64()).collect();
            let classes: Vec<u8> = (0..n).map(|_| (rng.next_u64() % 8) as u8).collect();
            let slow: Vec<u32> = (0..n)
                .filter(|&k| {
                    hamming(&q, &block[k * words..(k + 1) * words])
                        <= table[usize::from(classes[k])]
                })
                .map(|k| k as u32)
                .collect();
            let mut packed = PackedBlock::default();
            packed.clear(words);
            for k in 0..n {
                packed.push_classed(&block[k * words..(k + 1) * words], classes[k]);
            }
            let mut got = Vec::new();
            filter_packed_classed(&q, &packed, &table, &mut got);
            prop_assert_eq!(&got, &slow);
            for variant in ["avx512", "avx2", "portable"] {
                let mut after = vec![u32::MAX; 5];
                filter_packed_classed_variant(variant, &q, &packed, &table, &mut after);
                prop_assert_eq!(&after[..5], &[u32::MAX; 5][..], "{}", variant);
                prop_assert_eq!(&after[5..], &slow[..], "{}", variant);
            }
            // A block pushed without classes is all class 0.
            let mut plain = PackedBlock::default();
            plain.clear(words);
            for k in 0..n {
                plain.push(&block[k * words..(k + 1) * words]);
            }
            let mut zero = Vec::new();
            filter_packed_classed(&q, &plain, &table, &mut zero);
            let mut uniform = Vec::new();
            filter_packed(&q, &plain, table[0], &mut uniform);
            prop_assert_eq!(zero, uniform);
        }
    }
}
