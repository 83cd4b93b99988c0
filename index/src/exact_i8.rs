//! Exact threshold joins through the i8 codes: an integer blocked scan whose rigorous error bound rejects
//! most pairs, then an exact f32 rescoring of the survivors. Complete by construction, like the f32 GEMM
//! join of [`crate::exact`] (which stays the oracle).
//!
//! # Filter
//! Every row carries i8 codes `q` and a scale `s` ([`crate::quant`]) with `|v·w − sv·sw·(qv·qw)| ≤
//! bound(v, w)` ([`crate::quant::code_error_bound`], from the scales and the per-row L1 bounds alone, no f32
//! read; it includes [`crate::quant::CODE_BOUND_SLACK`] for the f32 kernel's own rounding). A pair is kept iff
//! `sa·sb·(qa·qb) + bound ≥ t`, so no pair whose [`crate::kernels::dot_f32`] score is `≥ t` is ever
//! rejected; the survivors are rescored with `dot_f32` on the f32 rows and reported iff that score is
//! `≥ t`. The integer product `qa·qb` is exact (i32).
//!
//! **Rounding of the filter itself.** The test is evaluated in f32 as
//! `x̂ = ((sa·sb)·(dot + d/4) + sa·(ub/2)) + (ua/2)·sb` (mul/add, no FMA, the same order in every kernel, so
//! all kernels take the same decisions). Each of its six roundings (the `i32 → f32` conversion, the sum
//! `dot + d/4`, three products, two sums; the conversion is exact below 2²⁴) adds a relative error of at
//! most `u = 2⁻²⁴` of a partial sum whose magnitude is at most `sa·sb·(|dot| + d/4) + sa·ub/2 + sb·ua/2 ≤
//! N + B`, where `N = max‖sa·qa‖₂ · max‖sb·qb‖₂` (Cauchy–Schwarz bounds `|sa·sb·dot|`) and `B` is the
//! largest bound term over the join (both per join, from the rows' maxima). So `|x̂ − x| ≤ 8u·(N + B) = E`,
//! and the join compares `x̂` against `t − SLACK − E` rounded down: a pair with `x ≥ t − SLACK` always
//! passes. For unit rows `N ≈ 1` and `E ≈ 5·10⁻⁷`, far below the bound itself (≈ 0.02 at 512-d), so the
//! widening costs no measurable survivors.
//!
//! # Kernels
//! Chosen at run time ([`I8Kernel::detect`]; `PACHA_SIMD=scalar` forces the scalar one). Both SIMD kernels
//! work on *packed* tiles: the base tile is cut into panels of `NR` rows stored as `[k/4][NR rows][4 bytes]`,
//! so one 4-byte group of a probe row, broadcast, meets `NR` base rows in one instruction and every lane
//! accumulates one pair's dot product: no horizontal sums at all. `MR` probe rows × `NR` base rows of
//! accumulators stay in registers for the whole `k` loop.
//! - AVX-512 VNNI (`vpdpbusd`, u8 × i8 → i32, `MR = 8`, `NR = 32`, 16 accumulators): the base codes are
//!   packed offset by 128 as u8 (`b + 128 = b ^ 0x80`), so `Σ a·(b + 128) = a·b + 128·Σa` and the probe row's
//!   `128·Σa` is subtracted once per block. `vpdpbusd` sums four u8·i8 products into i32 without any i16
//!   intermediate, so nothing saturates; i32 sums wrap only past [`crate::kernels::MAX_I8_LEN`].
//! - AVX2 (`MR = 4`, `NR = 16`): `vpsignb` moves the base code's sign onto the probe code, `vpabsb` takes
//!   the base code's magnitude, `vpmaddubsw` multiplies `|b|·(a·sign b) = a·b` and adds adjacent pairs in
//!   i16, `vpmaddwd` by ones widens to i32. The i16 pair sum is at most `2·127·127 = 32 258 < 32 767`: no
//!   saturation, because codes are in `[−127, 127]` ([`crate::quant::quantize_i8`] clamps; a code of −128,
//!   which would break `vpsignb`, is rejected with an error before any kernel runs).
//! - scalar: [`crate::kernels::scalar::dot_i8`] per pair.
//!
//! All three give the same i32 dot products (property tests) and the same filter decisions.
//!
//! # Tiling and determinism
//! Probe bands of [`QUERY_TILE`] rows × base tiles of [`BASE_TILE`] rows are the rayon work items; tile
//! shapes depend only on the row counts, never on the thread count, and the output is sorted by `(a, b)`.

use std::ops::Range;

use rayon::prelude::*;

use crate::IndexError;
use crate::exact::{Pair, RowFilter, check_threshold};
use crate::kernels::MAX_I8_LEN;
use crate::quant::CODE_BOUND_SLACK;
use crate::view::{RowsF32, RowsI8};

/// Probe rows per band (one work item: a band × a base tile).
pub const QUERY_TILE: usize = 512;
/// Base rows per tile.
pub const BASE_TILE: usize = 1024;
/// Most probe rows of any kernel's block (AMX: 32).
pub(crate) const MAX_MR: usize = 32;
/// Largest block (`MR × NR`) of any kernel (AMX: 32 × 32).
pub(crate) const MAX_BLOCK: usize = MAX_MR * 32;

/// One side of an i8 join: the f32 rows (for the exact rescoring), their i8 codes and scales, and the
/// codes' L1 bounds ([`crate::quant::l1_bounds`]), all with the same row numbers.
#[derive(Clone, Copy, Debug)]
pub struct QuantRows<'a> {
    pub(crate) f32: RowsF32<'a>,
    pub(crate) codes: RowsI8<'a>,
    pub(crate) l1: &'a [f32],
}

impl<'a> QuantRows<'a> {
    /// Checks that the three parts describe the same rows (row counts and dimensions).
    pub fn new(f32: RowsF32<'a>, codes: RowsI8<'a>, l1: &'a [f32]) -> Result<Self, IndexError> {
        if f32.dim() != codes.dim() {
            return Err(IndexError::Dim {
                expected: f32.dim(),
                got: codes.dim(),
            });
        }
        if f32.rows() != codes.rows() || l1.len() != codes.rows() {
            return Err(IndexError::Shape(format!(
                "i8 join: {} f32 rows, {} i8 rows, {} L1 bounds",
                f32.rows(),
                codes.rows(),
                l1.len()
            )));
        }
        if codes.dim() > MAX_I8_LEN {
            return Err(IndexError::Shape(format!(
                "i8 join: dimension {} > {MAX_I8_LEN} (i32 sums could overflow)",
                codes.dim()
            )));
        }
        if codes.rows() > u32::MAX as usize {
            return Err(IndexError::Shape("more than 2^32 rows: ids are u32".into()));
        }
        Ok(Self { f32, codes, l1 })
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.codes.rows()
    }
    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.codes.dim()
    }
    /// Rows `start..end` as a view of their own.
    pub fn slice_rows(&self, start: usize, end: usize) -> QuantRows<'a> {
        let codes = self.codes.slice_rows(start, end);
        let (s, e) = (
            start.min(self.rows()),
            end.min(self.rows()).max(start.min(self.rows())),
        );
        QuantRows {
            f32: self.f32.slice_rows(start, end),
            codes,
            l1: &self.l1[s..e],
        }
    }
}

/// Counters of an i8 join.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct I8JoinStats {
    /// i8 dot products the filter tested (pairs of the join's shape whose probe row is not skipped).
    pub products: u64,
    /// Products the error bound could not reject (base row not skipped): each read in f32 and rescored.
    pub survivors: u64,
    /// Pairs at or above the threshold (exact score), before any keep predicate.
    pub pairs: u64,
    /// Work items (band × tile) scanned.
    pub tiles: u64,
}

impl I8JoinStats {
    fn add(&mut self, o: &I8JoinStats) {
        self.products += o.products;
        self.survivors += o.survivors;
        self.pairs += o.pairs;
        self.tiles += o.tiles;
    }
}

/// An i8 product kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum I8Kernel {
    /// AMX-INT8 tiles (`tdpbssd`), with the AVX-512 filters ([`crate::amx`]).
    Amx,
    /// AVX-512 VNNI `vpdpbusd` (needs AVX-512F, BW and VNNI).
    Vnni,
    /// AVX2 `vpsignb` + `vpabsb` + `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    /// Portable i32 sums.
    Scalar,
}

impl I8Kernel {
    /// The best kernel this CPU runs, or [`I8Kernel::Scalar`] when SIMD is off
    /// ([`crate::kernels::simd_enabled`], `PACHA_SIMD=scalar`).
    pub fn detect() -> I8Kernel {
        if !crate::kernels::simd_enabled() {
            return I8Kernel::Scalar;
        }
        if I8Kernel::Amx.available() {
            I8Kernel::Amx
        } else if I8Kernel::Vnni.available() {
            I8Kernel::Vnni
        } else if I8Kernel::Avx2.available() {
            I8Kernel::Avx2
        } else {
            I8Kernel::Scalar
        }
    }
    /// True iff this CPU has the kernel's instructions.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            I8Kernel::Amx => crate::amx::supported(),
            #[cfg(target_arch = "x86_64")]
            I8Kernel::Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            I8Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            I8Kernel::Scalar => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
    /// Short name (`"amx"`, `"vnni"`, `"avx2"`, `"scalar"`).
    pub fn name(self) -> &'static str {
        match self {
            I8Kernel::Amx => "amx",
            I8Kernel::Vnni => "vnni",
            I8Kernel::Avx2 => "avx2",
            I8Kernel::Scalar => "scalar",
        }
    }
    /// Probe rows per register block.
    pub(crate) fn mr(self) -> usize {
        match self {
            I8Kernel::Amx => crate::amx::MR,
            I8Kernel::Vnni => 8,
            I8Kernel::Avx2 | I8Kernel::Scalar => 4,
        }
    }
    /// Base rows per register block (one packed panel).
    pub(crate) fn nr(self) -> usize {
        match self {
            I8Kernel::Amx => crate::amx::NR,
            I8Kernel::Vnni => 32,
            I8Kernel::Avx2 | I8Kernel::Scalar => 16,
        }
    }
    /// The byte the base codes are XORed with when packed (VNNI: the +128 offset).
    pub(crate) fn base_xor(self) -> u8 {
        match self {
            I8Kernel::Vnni => 0x80,
            _ => 0,
        }
    }
    /// Groups of 4 bytes of `k` per packed row at dimension `d`: `d/4` rounded up, and for AMX up to a whole
    /// tile step of 64 bytes (the padding is zero codes, which add nothing to any product).
    pub(crate) fn k4(self, d: usize) -> usize {
        match self {
            I8Kernel::Amx => d.div_ceil(crate::amx::K_STEP) * (crate::amx::K_STEP / 4),
            _ => d.div_ceil(4),
        }
    }
}

/// Per-row quantities of one side of a join.
#[derive(Clone)]
pub(crate) struct RowParams {
    /// Scales.
    pub(crate) s: Vec<f32>,
    /// Half the L1 bounds.
    pub(crate) uh: Vec<f32>,
    /// `128·Σq` (the VNNI offset's correction).
    pub(crate) corr: Vec<i32>,
    /// max ‖s·q‖₂.
    norm_max: f64,
    /// max s.
    s_max: f64,
    /// max of half the L1 bound.
    uh_max: f64,
}

impl RowParams {
    /// Appends `more`'s rows (the rows that follow), keeping the maxima over all of them.
    pub(crate) fn append(&mut self, more: RowParams) {
        self.s.extend(more.s);
        self.uh.extend(more.uh);
        self.corr.extend(more.corr);
        self.norm_max = self.norm_max.max(more.norm_max);
        self.s_max = self.s_max.max(more.s_max);
        self.uh_max = self.uh_max.max(more.uh_max);
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        12 * self.s.len()
    }
}

pub(crate) fn row_params(q: &QuantRows<'_>) -> Result<RowParams, IndexError> {
    let rows: Vec<(f32, f32, i32, f64)> = (0..q.rows())
        .into_par_iter()
        .map(|i| {
            let codes = q.codes.row(i);
            if codes.contains(&i8::MIN) {
                return Err(IndexError::InvalidVector {
                    id: i,
                    problem: "i8 code -128 (codes must lie in [-127, 127])".into(),
                });
            }
            let s = q.codes.scale(i);
            let uh = 0.5 * q.l1[i];
            if !s.is_finite() || s < 0.0 || !uh.is_finite() || uh < 0.0 {
                return Err(IndexError::InvalidVector {
                    id: i,
                    problem: format!("i8 scale {s} or L1 bound {} not finite and ≥ 0", q.l1[i]),
                });
            }
            let sum: i32 = codes.iter().map(|&c| i32::from(c)).sum();
            let sq: i64 = codes.iter().map(|&c| i64::from(c) * i64::from(c)).sum();
            Ok((
                s,
                uh,
                sum.wrapping_mul(128),
                f64::from(s) * (sq as f64).sqrt(),
            ))
        })
        .collect::<Result<_, _>>()?;
    let mut p = RowParams {
        s: Vec::with_capacity(rows.len()),
        uh: Vec::with_capacity(rows.len()),
        corr: Vec::with_capacity(rows.len()),
        norm_max: 0.0,
        s_max: 0.0,
        uh_max: 0.0,
    };
    for (s, uh, c, n) in rows {
        p.s.push(s);
        p.uh.push(uh);
        p.corr.push(c);
        p.norm_max = p.norm_max.max(n);
        p.s_max = p.s_max.max(f64::from(s));
        p.uh_max = p.uh_max.max(f64::from(uh));
    }
    Ok(p)
}

/// The f32 threshold the filter's `x̂` is compared with (see the module docs): `t − SLACK − E`, rounded down.
fn filter_threshold(t: f32, a: &RowParams, b: &RowParams, d: usize) -> f32 {
    ((f64::from(t) - f64::from(CODE_BOUND_SLACK) - rounding_bound(a, b, d).0) as f32).next_down()
}

/// `(E, N + B)` of the module docs for a join of `a` against `b` at dimension `d`: the filter's rounding
/// bound `E` and the bound `N + B` on the magnitude of its partial sums.
pub(crate) fn rounding_bound(a: &RowParams, b: &RowParams, d: usize) -> (f64, f64) {
    let n = a.norm_max * b.norm_max;
    let bound = a.s_max * b.uh_max + b.s_max * a.uh_max + 0.25 * d as f64 * a.s_max * b.s_max;
    (8.0 * f64::from(f32::EPSILON) * 0.5 * (n + bound), n + bound)
}

/// Copies rows `rows` of `codes` into `out` in `kernel`'s probe layout, `kp` bytes per row (zero padded), the
/// row count padded with zero rows to a multiple of the kernel's `mr`. Row-major for every kernel but AMX,
/// whose blocks of 32 rows are stored tile by tile ([`probe_offset`]) so each tile load reads 1 KB in a row.
pub(crate) fn pack_probe(
    kernel: I8Kernel,
    codes: &RowsI8<'_>,
    rows: Range<usize>,
    kp: usize,
    out: &mut Vec<i8>,
) {
    let mr = kernel.mr();
    let n = rows.len().div_ceil(mr) * mr;
    out.clear();
    out.resize(n * kp, 0);
    let d = codes.dim();
    for (k, r) in rows.enumerate() {
        let row = codes.row(r);
        if kernel == I8Kernel::Amx {
            let (b, rr) = (k / mr, k % mr);
            let base = b * mr * kp;
            for (c, chunk) in row.chunks(crate::amx::K_STEP).enumerate() {
                let o = base + probe_offset(kernel, kp, rr, c * crate::amx::K_STEP);
                out[o..o + chunk.len()].copy_from_slice(chunk);
            }
        } else {
            out[k * kp..k * kp + d].copy_from_slice(row);
        }
    }
}

/// Offset of byte `k` of row `r` within one packed probe block of `kernel` (`kp` bytes per row): `r·kp + k`,
/// or for AMX tile `(k/64, r/16)` (1 KB each, `k/64` major) row `r % 16` (64 bytes each).
pub(crate) fn probe_offset(kernel: I8Kernel, kp: usize, r: usize, k: usize) -> usize {
    match kernel {
        I8Kernel::Amx => {
            let ks = crate::amx::K_STEP;
            ((k / ks) * 2 + r / 16) * 16 * ks + (r % 16) * ks + k % ks
        }
        _ => r * kp + k,
    }
}

/// Packs rows `rows` of `codes` into panels of `nr` rows laid out `[k/4][nr][4]` (byte `x ^ xor`; padding
/// lanes and the `k` tail hold `0 ^ xor`, a zero code).
pub(crate) fn pack_base(
    codes: &RowsI8<'_>,
    rows: Range<usize>,
    nr: usize,
    k4: usize,
    xor: u8,
    out: &mut Vec<u8>,
) {
    let panels = rows.len().div_ceil(nr);
    let panel_bytes = k4 * nr * 4;
    out.clear();
    out.resize(panels * panel_bytes, xor);
    for (r, row) in rows.enumerate() {
        let p = r / nr;
        pack_row(
            &mut out[p * panel_bytes..(p + 1) * panel_bytes],
            r % nr,
            nr,
            codes.row(row),
            xor,
        );
    }
}

/// Writes one row's `codes` into lane `lane` of a panel of `nr` lanes (see [`pack_base`]; the panel's
/// other bytes are left as they are, `0 ^ xor` where nothing was written).
pub(crate) fn pack_row(panel: &mut [u8], lane: usize, nr: usize, codes: &[i8], xor: u8) {
    let x4 = u32::from_ne_bytes([xor; 4]);
    // Whole 4-byte groups as one u32 each (the row's bytes in order, XORed together); the tail byte by
    // byte (its padding keeps `0 ^ xor`).
    let whole = codes.len() / 4;
    for (k, ch) in codes.chunks_exact(4).enumerate() {
        let w = u32::from_ne_bytes([ch[0] as u8, ch[1] as u8, ch[2] as u8, ch[3] as u8]) ^ x4;
        let o = (k * nr + lane) * 4;
        panel[o..o + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let o = (whole * nr + lane) * 4;
    for (b, &c) in codes[whole * 4..].iter().enumerate() {
        panel[o + b] = (c as u8) ^ xor;
    }
}

/// `out[r·nr + l] = a_r · b_l` for the `mr` rows of a packed probe block `a` (`kp` bytes each) and the packed
/// panel `b`; `corr[r]` is subtracted (the VNNI offset's correction).
pub(crate) fn block_dots(
    kernel: I8Kernel,
    a: &[i8],
    kp: usize,
    b: &[u8],
    corr: &[i32],
    out: &mut [i32; MAX_BLOCK],
) {
    let (mr, nr) = (kernel.mr(), kernel.nr());
    assert!(
        a.len() >= mr * kp && b.len() >= kp * nr && corr.len() >= mr && kp.is_multiple_of(4),
        "block_dots: operand sizes"
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Vnni if kernel.available() => {
            // SAFETY: the CPU has AVX-512F/BW/VNNI (`available` just checked); the operand sizes the kernel
            // reads (`8·kp` probe bytes, `kp·32` panel bytes, 8 corrections) were asserted above.
            unsafe { block_vnni(a, kp, b, corr, out) }
        }
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Avx2 if kernel.available() => {
            // SAFETY: the CPU has AVX2 (`available` just checked); the operand sizes were asserted above.
            unsafe { block_avx2(a, kp, b, out) }
        }
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Amx if kernel.available() => {
            assert!(
                kp.is_multiple_of(crate::amx::K_STEP),
                "block_dots: AMX rows must be padded to 64 bytes"
            );
            // SAFETY: `available` checked the CPU's AMX-INT8 and the OS's grant; the operand sizes (`32·kp`
            // probe bytes, `kp·32` panel bytes) were asserted above, `kp` is a multiple of 64 and `out` holds
            // MAX_BLOCK = 1 024 values.
            unsafe { crate::amx::block(a, kp, b, out) }
        }
        _ => block_scalar(kernel, a, kp, b, corr, out),
    }
}

/// Portable [`block_dots`] over the packed layouts (the reference the SIMD kernels are tested against).
/// Reads `kernel`'s layouts ([`probe_offset`], [`pack_base`]) whichever kernel packed them; a panel byte
/// XORed back is the signed code, so no offset correction applies (`corr` is not read).
fn block_scalar(
    kernel: I8Kernel,
    a: &[i8],
    kp: usize,
    b: &[u8],
    _corr: &[i32],
    out: &mut [i32; MAX_BLOCK],
) {
    let (mr, nr, xor) = (kernel.mr(), kernel.nr(), kernel.base_xor());
    let mut gathered = Vec::new();
    for r in 0..mr {
        let row = if kernel == I8Kernel::Amx {
            gathered.clear();
            gathered.extend((0..kp).map(|k| a[probe_offset(kernel, kp, r, k)]));
            &gathered[..]
        } else {
            &a[r * kp..(r + 1) * kp]
        };
        for l in 0..nr {
            let mut acc = 0i32;
            for (k, ch) in row.chunks_exact(4).enumerate() {
                let o = (k * nr + l) * 4;
                for (j, &x) in ch.iter().enumerate() {
                    let y = i32::from((b[o + j] ^ xor) as i8);
                    acc = acc.wrapping_add(i32::from(x) * y);
                }
            }
            out[r * nr + l] = acc;
        }
    }
}

/// VNNI kernel of [`block_dots`]: 8 probe rows × 32 base rows, 16 zmm accumulators.
///
/// # Safety
/// `a` holds at least `8·kp` bytes, `b` at least `kp·32`, `corr` at least 8 values, `kp % 4 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_vnni(a: &[i8], kp: usize, b: &[u8], corr: &[i32], out: &mut [i32; MAX_BLOCK]) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_si512(); 2]; 8];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for k in 0..kp / 4 {
        // SAFETY: panel bytes k·128 .. k·128 + 128 lie within `b` (kp·32 bytes, k < kp/4).
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_si512(bp.add(k * 128).cast()),
                _mm512_loadu_si512(bp.add(k * 128 + 64).cast()),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: bytes r·kp + 4k .. +4 lie within `a` (8·kp bytes); unaligned read of an i32.
            let x = unsafe { std::ptr::read_unaligned(ap.add(r * kp + 4 * k).cast::<i32>()) };
            let av = _mm512_set1_epi32(x);
            acc[0] = _mm512_dpbusd_epi32(acc[0], b0, av);
            acc[1] = _mm512_dpbusd_epi32(acc[1], b1, av);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let c = _mm512_set1_epi32(corr[r]);
        // SAFETY: `out` has MAX_BLOCK = 1 024 values; r·32 + 32 ≤ 256.
        unsafe {
            _mm512_storeu_si512(
                out.as_mut_ptr().add(r * 32).cast(),
                _mm512_sub_epi32(acc[0], c),
            );
            _mm512_storeu_si512(
                out.as_mut_ptr().add(r * 32 + 16).cast(),
                _mm512_sub_epi32(acc[1], c),
            );
        }
    }
}

/// AVX2 kernel of [`block_dots`]: 4 probe rows × 16 base rows, 8 ymm accumulators.
///
/// # Safety
/// `a` holds at least `4·kp` bytes, `b` at least `kp·16`, `kp % 4 == 0`, and no code is −128.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_avx2(a: &[i8], kp: usize, b: &[u8], out: &mut [i32; MAX_BLOCK]) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); 2]; 4];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for k in 0..kp / 4 {
        // SAFETY: panel bytes k·64 .. k·64 + 64 lie within `b` (kp·16 bytes, k < kp/4).
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_si256(bp.add(k * 64).cast()),
                _mm256_loadu_si256(bp.add(k * 64 + 32).cast()),
            )
        };
        let (m0, m1) = (_mm256_abs_epi8(b0), _mm256_abs_epi8(b1));
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: bytes r·kp + 4k .. +4 lie within `a` (4·kp bytes); unaligned read of an i32.
            let x = unsafe { std::ptr::read_unaligned(ap.add(r * kp + 4 * k).cast::<i32>()) };
            let av = _mm256_set1_epi32(x);
            // |b| · (a·sign b) = a·b; adjacent pairs summed in i16 (≤ 2·127² = 32 258: no saturation).
            let p0 = _mm256_maddubs_epi16(m0, _mm256_sign_epi8(av, b0));
            let p1 = _mm256_maddubs_epi16(m1, _mm256_sign_epi8(av, b1));
            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(p0, ones));
            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(p1, ones));
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: `out` has MAX_BLOCK = 1 024 values; r·16 + 16 ≤ 64.
        unsafe {
            _mm256_storeu_si256(out.as_mut_ptr().add(r * 16).cast(), acc[0]);
            _mm256_storeu_si256(out.as_mut_ptr().add(r * 16 + 8).cast(), acc[1]);
        }
    }
}

/// Per-lane quantities of a packed base panel.
struct Panel {
    sb: [f32; 32],
    ubh: [f32; 32],
}

/// Row quantities of a probe block.
struct Block<'p> {
    sa: &'p [f32],
    uah: &'p [f32],
}

/// `masks[r]` bit `l` set iff `x̂(r, l) ≥ tlo` (see the module docs for `x̂`).
fn block_filter(
    kernel: I8Kernel,
    dots: &[i32; MAX_BLOCK],
    blk: &Block<'_>,
    panel: &Panel,
    qd: f32,
    tlo: f32,
    masks: &mut [u32; MAX_MR],
) {
    let (mr, nr) = (kernel.mr(), kernel.nr());
    match kernel {
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Vnni | I8Kernel::Amx if kernel.available() => {
            // SAFETY: the CPU has AVX-512F (`available` checked it with BW and VNNI, or with AMX).
            unsafe { filter_avx512(mr, dots, blk, panel, qd, tlo, masks) }
        }
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Avx2 if kernel.available() => {
            // SAFETY: the CPU has AVX2 (`available` just checked).
            unsafe { filter_avx2(dots, blk, panel, qd, tlo, masks) }
        }
        _ => filter_scalar(mr, nr, dots, blk, panel, qd, tlo, masks),
    }
}

#[allow(clippy::too_many_arguments)]
fn filter_scalar(
    mr: usize,
    nr: usize,
    dots: &[i32; MAX_BLOCK],
    blk: &Block<'_>,
    panel: &Panel,
    qd: f32,
    tlo: f32,
    masks: &mut [u32; MAX_MR],
) {
    for r in 0..mr {
        let (sa, uah) = (blk.sa[r], blk.uah[r]);
        let mut m = 0u32;
        for l in 0..nr {
            let sb = panel.sb[l];
            let x = (sa * sb) * (dots[r * nr + l] as f32 + qd) + sa * panel.ubh[l] + uah * sb;
            if x >= tlo {
                m |= 1 << l;
            }
        }
        masks[r] = m;
    }
}

/// AVX-512 [`block_filter`] for the VNNI and AMX blocks (`mr` × 32), same operations and order as the
/// scalar one.
///
/// # Safety
/// The CPU supports AVX-512F; `mr ≤ MAX_MR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn filter_avx512(
    mr: usize,
    dots: &[i32; MAX_BLOCK],
    blk: &Block<'_>,
    panel: &Panel,
    qd: f32,
    tlo: f32,
    masks: &mut [u32; MAX_MR],
) {
    use std::arch::x86_64::*;
    let (qdv, tv) = (_mm512_set1_ps(qd), _mm512_set1_ps(tlo));
    // SAFETY: `panel.sb` and `panel.ubh` hold 32 f32 each: halves 0..16 and 16..32.
    let (sb, ubh) = unsafe {
        (
            [
                _mm512_loadu_ps(panel.sb.as_ptr()),
                _mm512_loadu_ps(panel.sb.as_ptr().add(16)),
            ],
            [
                _mm512_loadu_ps(panel.ubh.as_ptr()),
                _mm512_loadu_ps(panel.ubh.as_ptr().add(16)),
            ],
        )
    };
    for (r, m) in masks.iter_mut().enumerate().take(mr) {
        let (sa, uah) = (_mm512_set1_ps(blk.sa[r]), _mm512_set1_ps(blk.uah[r]));
        let mut bits = 0u32;
        for h in 0..2 {
            // SAFETY: dots[r·32 + 16h .. +16] lies within the block (r < mr ≤ MAX_MR rows of 32).
            let d = unsafe { _mm512_loadu_si512(dots.as_ptr().add(r * 32 + 16 * h).cast()) };
            let df = _mm512_add_ps(_mm512_cvtepi32_ps(d), qdv);
            let w = _mm512_mul_ps(_mm512_mul_ps(sa, sb[h]), df);
            let y = _mm512_add_ps(w, _mm512_mul_ps(sa, ubh[h]));
            let x = _mm512_add_ps(y, _mm512_mul_ps(uah, sb[h]));
            let k = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, tv);
            bits |= u32::from(k) << (16 * h);
        }
        *m = bits;
    }
}

/// AVX2 [`block_filter`] for the AVX2 block (4 × 16), same operations and order as the scalar one.
///
/// # Safety
/// The CPU supports AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn filter_avx2(
    dots: &[i32; MAX_BLOCK],
    blk: &Block<'_>,
    panel: &Panel,
    qd: f32,
    tlo: f32,
    masks: &mut [u32; MAX_MR],
) {
    use std::arch::x86_64::*;
    let (qdv, tv) = (_mm256_set1_ps(qd), _mm256_set1_ps(tlo));
    // SAFETY: `panel.sb` and `panel.ubh` hold 32 f32 each; halves 0..8 and 8..16 are read.
    let (sb, ubh) = unsafe {
        (
            [
                _mm256_loadu_ps(panel.sb.as_ptr()),
                _mm256_loadu_ps(panel.sb.as_ptr().add(8)),
            ],
            [
                _mm256_loadu_ps(panel.ubh.as_ptr()),
                _mm256_loadu_ps(panel.ubh.as_ptr().add(8)),
            ],
        )
    };
    for (r, m) in masks.iter_mut().take(4).enumerate() {
        let (sa, uah) = (_mm256_set1_ps(blk.sa[r]), _mm256_set1_ps(blk.uah[r]));
        let mut bits = 0u32;
        for h in 0..2 {
            // SAFETY: dots[r·16 + 8h .. +8] lies within the 256-value block.
            let d = unsafe { _mm256_loadu_si256(dots.as_ptr().add(r * 16 + 8 * h).cast()) };
            let df = _mm256_add_ps(_mm256_cvtepi32_ps(d), qdv);
            let w = _mm256_mul_ps(_mm256_mul_ps(sa, sb[h]), df);
            let y = _mm256_add_ps(w, _mm256_mul_ps(sa, ubh[h]));
            let x = _mm256_add_ps(y, _mm256_mul_ps(uah, sb[h]));
            let k = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(x, tv)) as u32;
            bits |= (k & 0xff) << (8 * h);
        }
        *m = bits;
    }
}

/// `a.rows() × b.rows()` i8 dot products (row-major) through `kernel`'s packing and register blocks: what
/// the join scans, exposed for the property tests and benches (`kernel` must be [`I8Kernel::available`],
/// else the portable path runs).
#[doc(hidden)]
pub fn dot_matrix(kernel: I8Kernel, a: RowsI8<'_>, b: RowsI8<'_>) -> Result<Vec<i32>, IndexError> {
    if a.dim() != b.dim() {
        return Err(IndexError::Dim {
            expected: b.dim(),
            got: a.dim(),
        });
    }
    let (mr, nr) = (kernel.mr(), kernel.nr());
    let k4 = kernel.k4(a.dim());
    let kp = k4 * 4;
    let (mut ap, mut bp) = (Vec::new(), Vec::new());
    pack_probe(kernel, &a, 0..a.rows(), kp, &mut ap);
    pack_base(&b, 0..b.rows(), nr, k4, kernel.base_xor(), &mut bp);
    let corr: Vec<i32> = (0..ap.len() / kp)
        .map(|r| {
            let s: i32 = ap[r * kp..(r + 1) * kp].iter().map(|&c| i32::from(c)).sum();
            if kernel == I8Kernel::Vnni {
                s.wrapping_mul(128)
            } else {
                0
            }
        })
        .collect();
    let mut out = vec![0i32; a.rows() * b.rows()];
    let mut dots = [0i32; MAX_BLOCK];
    for p in 0..b.rows().div_ceil(nr) {
        let panel = &bp[p * kp * nr..(p + 1) * kp * nr];
        for g in 0..a.rows().div_ceil(mr) {
            block_dots(
                kernel,
                &ap[g * mr * kp..(g + 1) * mr * kp],
                kp,
                panel,
                &corr[g * mr..(g + 1) * mr],
                &mut dots,
            );
            for r in 0..mr.min(a.rows() - g * mr) {
                for l in 0..nr.min(b.rows() - p * nr) {
                    out[(g * mr + r) * b.rows() + p * nr + l] = dots[r * nr + l];
                }
            }
        }
    }
    Ok(out)
}

/// All pairs (probe row `a`, base row `b`) whose exact score (`dot_f32`) is ≥ `t`, sorted by `(a, b)`, and
/// the join's counters. Rows for which a skip predicate returns true (by their own row number) give no pairs.
pub fn threshold_join_i8(
    probe: QuantRows<'_>,
    base: QuantRows<'_>,
    t: f32,
    skip_probe: Option<RowFilter<'_>>,
    skip_base: Option<RowFilter<'_>>,
) -> Result<(Vec<Pair>, I8JoinStats), IndexError> {
    join_with_kernel(
        I8Kernel::detect(),
        probe,
        base,
        None,
        t,
        skip_probe,
        skip_base,
        None,
    )
}

/// Self-join: all pairs `a < b` of `rows` with exact score ≥ `t`, sorted by `(a, b)`; skipped rows give no
/// pairs.
pub fn self_join_i8(
    rows: QuantRows<'_>,
    t: f32,
    skip: Option<RowFilter<'_>>,
) -> Result<(Vec<Pair>, I8JoinStats), IndexError> {
    probe_join_i8(rows, 0..rows.rows(), t, skip)
}

/// The dedup form: all pairs `(a, b)` with `b` in `probes`, `a < b`, exact score ≥ `t`, neither skipped
/// (row numbers of `rows`), sorted by `(a, b)`. Only rows `0..probes.end` are read.
pub fn probe_join_i8(
    rows: QuantRows<'_>,
    probes: Range<usize>,
    t: f32,
    skip: Option<RowFilter<'_>>,
) -> Result<(Vec<Pair>, I8JoinStats), IndexError> {
    probe_join_with_kernel(I8Kernel::detect(), rows, probes, t, skip, None)
}

/// A predicate on a pair `(a, b, exact score)` in row numbers: false drops the pair as the join finds it.
pub type PairFilter<'a> = &'a (dyn Fn(u32, u32, f32) -> bool + Sync);

/// [`probe_join_i8`] keeping only the pairs `keep` accepts (called once per pair at or above `t`, from
/// the join's worker threads; [`I8JoinStats::pairs`] still counts every pair at or above `t`).
pub fn probe_join_i8_kept(
    rows: QuantRows<'_>,
    probes: Range<usize>,
    t: f32,
    skip: Option<RowFilter<'_>>,
    keep: PairFilter<'_>,
) -> Result<(Vec<Pair>, I8JoinStats), IndexError> {
    probe_join_with_kernel(I8Kernel::detect(), rows, probes, t, skip, Some(keep))
}

/// [`probe_join_i8_kept`] with a chosen kernel (tests and benches; an unavailable kernel runs the portable
/// path).
#[doc(hidden)]
pub fn probe_join_with_kernel(
    kernel: I8Kernel,
    rows: QuantRows<'_>,
    probes: Range<usize>,
    t: f32,
    skip: Option<RowFilter<'_>>,
    keep: Option<PairFilter<'_>>,
) -> Result<(Vec<Pair>, I8JoinStats), IndexError> {
    let end = probes.end.min(rows.rows());
    let start = probes.start.min(end);
    let probe = rows.slice_rows(start, end);
    let base = rows.slice_rows(0, end);
    let skip_probe = |i: u32| skip.is_some_and(|f| f(start as u32 + i));
    let keep_local = keep.map(|k| move |i: u32, j: u32, s: f32| k(j, start as u32 + i, s));
    let keep_local = keep_local
        .as_ref()
        .map(|k| k as &(dyn Fn(u32, u32, f32) -> bool + Sync));
    let (pairs, stats) = join_with_kernel(
        kernel,
        probe,
        base,
        Some(start),
        t,
        Some(&skip_probe),
        skip,
        keep_local,
    )?;
    // Probe-local (p, q) with q < start + p → (q, p) in row numbers, sorted.
    let mut out: Vec<Pair> = pairs
        .into_iter()
        .map(|p| Pair {
            a: p.b,
            b: start as u32 + p.a,
            score: p.score,
        })
        .collect();
    out.sort_unstable_by_key(|p| (p.a, p.b));
    Ok((out, stats))
}

/// The join: probe-local `a`, base `b`; with `lower = Some(off)` only pairs `b < off + a`; with `keep`,
/// only the pairs it accepts (called with probe-local `a`, base `b` and the exact score).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn join_with_kernel(
    kernel: I8Kernel,
    probe: QuantRows<'_>,
    base: QuantRows<'_>,
    lower: Option<usize>,
    t: f32,
    skip_probe: Option<RowFilter<'_>>,
    skip_base: Option<RowFilter<'_>>,
    keep: Option<PairFilter<'_>>,
) -> Result<(Vec<Pair>, I8JoinStats), IndexError> {
    check_threshold(t)?;
    if probe.dim() != base.dim() {
        return Err(IndexError::Dim {
            expected: base.dim(),
            got: probe.dim(),
        });
    }
    let kernel = if kernel.available() {
        kernel
    } else {
        I8Kernel::Scalar
    };
    let (pa, pb) = (row_params(&probe)?, row_params(&base)?);
    let d = probe.dim();
    let tlo = filter_threshold(t, &pa, &pb, d);
    let qd = 0.25 * d as f32;
    // Work items: (band, tile), base tiles cut short where no pair of the band can lie beyond.
    let mut items = Vec::new();
    for q0 in (0..probe.rows()).step_by(QUERY_TILE) {
        let q1 = (q0 + QUERY_TILE).min(probe.rows());
        let b_end = match lower {
            Some(off) => (off + q1 - 1).min(base.rows()),
            None => base.rows(),
        };
        for b0 in (0..b_end).step_by(BASE_TILE) {
            items.push((q0..q1, b0..(b0 + BASE_TILE).min(b_end)));
        }
    }
    let ctx = Ctx {
        kernel,
        probe,
        base,
        pa: &pa,
        pb: &pb,
        lower,
        t,
        tlo,
        qd,
        skip_probe,
        skip_base,
        keep,
    };
    let parts: Vec<(Vec<Pair>, I8JoinStats)> = items
        .par_iter()
        .map_init(Scratch::default, |sc, (band, tile)| {
            ctx.item(sc, band.clone(), tile.clone())
        })
        .collect();
    let mut stats = I8JoinStats::default();
    let mut pairs = Vec::with_capacity(parts.iter().map(|p| p.0.len()).sum());
    for (p, s) in parts {
        pairs.extend(p);
        stats.add(&s);
    }
    pairs.sort_unstable_by_key(|p| (p.a, p.b));
    Ok((pairs, stats))
}

#[derive(Default)]
struct Scratch {
    a: Vec<i8>,
    b: Vec<u8>,
    survivors: Vec<(u32, u32)>,
}

struct Ctx<'a, 'p> {
    kernel: I8Kernel,
    probe: QuantRows<'a>,
    base: QuantRows<'a>,
    pa: &'p RowParams,
    pb: &'p RowParams,
    lower: Option<usize>,
    t: f32,
    tlo: f32,
    qd: f32,
    skip_probe: Option<RowFilter<'p>>,
    skip_base: Option<RowFilter<'p>>,
    keep: Option<PairFilter<'p>>,
}

impl Ctx<'_, '_> {
    /// One band × tile: packed scan, filter, exact rescoring of the survivors.
    fn item(
        &self,
        sc: &mut Scratch,
        band: Range<usize>,
        tile: Range<usize>,
    ) -> (Vec<Pair>, I8JoinStats) {
        let k = self.kernel;
        let (mr, nr) = (k.mr(), k.nr());
        let d = self.probe.dim();
        let k4 = k.k4(d);
        let kp = k4 * 4;
        let mut st = I8JoinStats {
            tiles: 1,
            ..I8JoinStats::default()
        };
        pack_probe(k, &self.probe.codes, band.clone(), kp, &mut sc.a);
        pack_base(
            &self.base.codes,
            tile.clone(),
            nr,
            k4,
            k.base_xor(),
            &mut sc.b,
        );
        // Probe block quantities, padded to whole blocks (padding rows: scale 0, skipped).
        let nb = band.len().div_ceil(mr) * mr;
        let mut sa = vec![0.0f32; nb];
        let mut uah = vec![0.0f32; nb];
        let mut corr = vec![0i32; nb];
        let mut live = vec![false; nb];
        for (r, i) in band.clone().enumerate() {
            sa[r] = self.pa.s[i];
            uah[r] = self.pa.uh[i];
            corr[r] = if k == I8Kernel::Vnni {
                self.pa.corr[i]
            } else {
                0
            };
            live[r] = self.skip_probe.is_none_or(|f| !f(i as u32));
        }
        sc.survivors.clear();
        let mut dots = [0i32; MAX_BLOCK];
        let mut masks = [0u32; MAX_MR];
        let mut panel = Panel {
            sb: [0.0; 32],
            ubh: [0.0; 32],
        };
        for p in 0..tile.len().div_ceil(nr) {
            let j0 = tile.start + p * nr;
            let jn = nr.min(tile.end - j0);
            panel.sb = [0.0; 32];
            panel.ubh = [0.0; 32];
            for l in 0..jn {
                panel.sb[l] = self.pb.s[j0 + l];
                panel.ubh[l] = self.pb.uh[j0 + l];
            }
            let pbytes = &sc.b[p * kp * nr..(p + 1) * kp * nr];
            for g in 0..nb / mr {
                let r0 = g * mr;
                let rn = mr.min(band.len() - r0);
                // Lower mode: lanes j < off + i only; skip blocks with none.
                if let Some(off) = self.lower
                    && j0 >= off + band.start + r0 + rn - 1
                {
                    continue;
                }
                if !live[r0..r0 + rn].iter().any(|&x| x) {
                    continue;
                }
                block_dots(
                    k,
                    &sc.a[r0 * kp..(r0 + mr) * kp],
                    kp,
                    pbytes,
                    &corr[r0..r0 + mr],
                    &mut dots,
                );
                let blk = Block {
                    sa: &sa[r0..r0 + mr],
                    uah: &uah[r0..r0 + mr],
                };
                block_filter(k, &dots, &blk, &panel, self.qd, self.tlo, &mut masks);
                for r in 0..rn {
                    if !live[r0 + r] {
                        continue;
                    }
                    let i = band.start + r0 + r;
                    let lanes = match self.lower {
                        Some(off) => (off + i).saturating_sub(j0).min(jn),
                        None => jn,
                    };
                    st.products += lanes as u64;
                    let mut m = masks[r] & lane_mask(lanes);
                    while m != 0 {
                        let l = m.trailing_zeros() as usize;
                        m &= m - 1;
                        sc.survivors.push((i as u32, (j0 + l) as u32));
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (k, &(i, j)) in sc.survivors.iter().enumerate() {
            // The survivors' base rows are scattered over the tile: start loading the next one while this
            // pair is scored (its probe row, from the band, is mostly the same as this one's or near it).
            if let Some(&(_, jn)) = sc.survivors.get(k + 1) {
                crate::kernels::prefetch_row(self.base.f32.row(jn as usize));
            }
            if self.skip_base.is_some_and(|f| f(j)) {
                continue;
            }
            st.survivors += 1;
            let s = crate::kernels::dot_f32(
                self.probe.f32.row(i as usize),
                self.base.f32.row(j as usize),
            );
            if s >= self.t {
                st.pairs += 1;
                if self.keep.is_none_or(|k| k(i, j, s)) {
                    out.push(Pair {
                        a: i,
                        b: j,
                        score: s,
                    });
                }
            }
        }
        (out, st)
    }
}

/// The low `n` bits set (`n ≤ 32`).
pub(crate) fn lane_mask(n: usize) -> u32 {
    if n >= 32 { u32::MAX } else { (1u32 << n) - 1 }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::scalar;
    use crate::quant::{l1_bounds, quantize_rows};
    use proptest::prelude::*;

    pub(crate) fn kernels() -> Vec<I8Kernel> {
        [
            I8Kernel::Amx,
            I8Kernel::Vnni,
            I8Kernel::Avx2,
            I8Kernel::Scalar,
        ]
        .into_iter()
        .filter(|k| k.available())
        .collect()
    }

    fn codes(n: usize, d: usize, seed: u64, extreme: bool) -> Vec<i8> {
        let mut s = crate::rng::SplitMix(seed);
        (0..n * d)
            .map(|_| {
                let x = s.next_u64();
                if extreme {
                    if x & 1 == 0 { 127 } else { -127 }
                } else {
                    ((x % 255) as i32 - 127) as i8
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every available SIMD kernel equals the scalar dot products bit for bit (integer sums), on random
        /// lengths (most not multiples of 4 or 32), random row counts (partial blocks) and extreme codes.
        #[test]
        fn kernels_equal_scalar(d in 1usize..700, na in 1usize..21, nb in 1usize..70, seed in any::<u64>(),
                                extreme in any::<bool>()) {
            let a = codes(na, d, seed, extreme);
            let b = codes(nb, d, seed ^ 0x55, extreme);
            let sc = vec![1.0f32; na.max(nb)];
            let av = RowsI8::new(&a, &sc, na, d, d).unwrap();
            let bv = RowsI8::new(&b, &sc, nb, d, d).unwrap();
            let want: Vec<i32> = (0..na)
                .flat_map(|i| (0..nb).map(move |j| (i, j)))
                .map(|(i, j)| scalar::dot_i8(av.row(i), bv.row(j)))
                .collect();
            for k in kernels() {
                prop_assert_eq!(&dot_matrix(k, av, bv).unwrap(), &want, "kernel {}", k.name());
            }
            // The AMX layouts (tile-by-tile probe blocks, rows padded to 64 bytes) read back by the portable
            // block kernel on any CPU: `dot_matrix` runs it wherever the AMX kernel is not available.
            if !I8Kernel::Amx.available() {
                prop_assert_eq!(&dot_matrix(I8Kernel::Amx, av, bv).unwrap(), &want, "AMX layout");
            }
        }
    }

    /// Unit rows: `n` random ones, plus near-duplicates of some at chosen cosines (clustered data).
    fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut s = crate::rng::SplitMix(seed);
        let mut v = vec![0.0f32; n * d];
        for r in v.chunks_exact_mut(d) {
            for x in r.iter_mut() {
                *x = (s.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
        }
        // Clusters: every 7th row leans towards the row 3 before it.
        for i in (3..n).step_by(7) {
            let (lo, hi) = v.split_at_mut(i * d);
            let src = &lo[(i - 3) * d..(i - 2) * d];
            for (x, &y) in hi[..d].iter_mut().zip(src) {
                *x = 0.5 * *x + y;
            }
        }
        for r in v.chunks_exact_mut(d) {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= n);
        }
        v
    }

    fn brute(
        p: RowsF32<'_>,
        b: RowsF32<'_>,
        t: f32,
        ok: impl Fn(usize, usize) -> bool,
    ) -> Vec<(u32, u32, f32)> {
        let mut v = Vec::new();
        for i in 0..p.rows() {
            for j in 0..b.rows() {
                if !ok(i, j) {
                    continue;
                }
                let s = crate::kernels::dot_f32(p.row(i), b.row(j));
                if s >= t {
                    v.push((i as u32, j as u32, s));
                }
            }
        }
        v
    }

    fn triples(p: &[Pair]) -> Vec<(u32, u32, f32)> {
        p.iter().map(|p| (p.a, p.b, p.score)).collect()
    }

    #[test]
    fn joins_equal_brute_force_with_every_kernel() {
        let d = 50; // not a multiple of 4 or 32
        let (n, m) = (1300, 700);
        let bv = rows(n, d, 1);
        // Probes lean towards base rows by varying amounts: cosines spread over (0, 1).
        let mut pv = rows(m, d, 2);
        for (i, r) in pv.chunks_exact_mut(d).enumerate() {
            let src = &bv[(5 * i % n) * d..(5 * i % n + 1) * d];
            let w = (i % 10) as f32 * 0.25;
            for (x, &y) in r.iter_mut().zip(src) {
                *x += w * y;
            }
            let nn = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= nn);
        }
        let (bq, pq) = (
            quantize_rows(RowsF32::dense(&bv, d).unwrap()),
            quantize_rows(RowsF32::dense(&pv, d).unwrap()),
        );
        let (bl, pl) = (l1_bounds(bq.view()), l1_bounds(pq.view()));
        let base = QuantRows::new(RowsF32::dense(&bv, d).unwrap(), bq.view(), &bl).unwrap();
        let probe = QuantRows::new(RowsF32::dense(&pv, d).unwrap(), pq.view(), &pl).unwrap();
        let skip_b = |r: u32| r % 11 == 4;
        let skip_p = |r: u32| r % 13 == 2;
        for t in [0.3f32, 0.7] {
            let want = brute(probe.f32, base.f32, t, |i, j| {
                !skip_p(i as u32) && !skip_b(j as u32)
            });
            assert!(want.len() > 50, "t {t}: {} pairs", want.len());
            // Pairs exactly at the threshold: the threshold set to an existing pair's exact score.
            let at = want[want.len() / 2].2;
            let want_at = brute(probe.f32, base.f32, at, |i, j| {
                !skip_p(i as u32) && !skip_b(j as u32)
            });
            for k in kernels() {
                let (got, st) =
                    join_with_kernel(k, probe, base, None, t, Some(&skip_p), Some(&skip_b), None)
                        .unwrap();
                assert_eq!(triples(&got), want, "kernel {} t {t}", k.name());
                assert_eq!(st.pairs as usize, want.len());
                assert!(st.survivors >= st.pairs && st.products >= st.survivors);
                let (got, _) =
                    join_with_kernel(k, probe, base, None, at, Some(&skip_p), Some(&skip_b), None)
                        .unwrap();
                assert_eq!(triples(&got), want_at, "kernel {} at {at}", k.name());
                assert!(want_at.iter().any(|p| p.2 == at));
            }
        }
        // The public entry point agrees with the oracle's pair set (scores: GEMM vs kernel rounding).
        let (got, _) = threshold_join_i8(probe, base, 0.7, None, None).unwrap();
        let oracle = crate::exact::threshold_join(probe.f32, base.f32, 0.7, None, None).unwrap();
        let near = |a: u32, b: u32| {
            (crate::kernels::dot_f32(probe.f32.row(a as usize), base.f32.row(b as usize)) - 0.7)
                .abs()
                < 1e-5
        };
        let g: std::collections::HashSet<(u32, u32)> = got.iter().map(|p| (p.a, p.b)).collect();
        let o: std::collections::HashSet<(u32, u32)> = oracle.iter().map(|p| (p.a, p.b)).collect();
        assert!(g.symmetric_difference(&o).all(|&(a, b)| near(a, b)));
        assert!(o.len() > 50);
    }

    #[test]
    fn probe_and_self_joins_equal_brute_force_near_the_threshold() {
        // Many pairs within the quantisation error of the threshold: rows of a low-dimensional cloud.
        let d = 12;
        let n = 2600; // several bands and tiles, a partial last band
        let v = rows(n, d, 5);
        let f = RowsF32::dense(&v, d).unwrap();
        let q = quantize_rows(f);
        let l1 = l1_bounds(q.view());
        let all = QuantRows::new(f, q.view(), &l1).unwrap();
        let skip = |r: u32| r % 9 == 1;
        let t = 0.8;
        let within: usize = (0..300)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .filter(|&(i, j)| (crate::kernels::dot_f32(f.row(i), f.row(j)) - t).abs() < 0.01)
            .count();
        assert!(within > 100, "near-threshold pairs: {within}");
        for probes in [0..n, 700..1900, 1023..1025, 2599..2600, 5..5] {
            let want: Vec<(u32, u32, f32)> = brute(f, f, t, |a, b| {
                a < b && probes.contains(&b) && !skip(a as u32) && !skip(b as u32)
            });
            for k in kernels() {
                let (got, st) =
                    probe_join_with_kernel(k, all, probes.clone(), t, Some(&skip), None).unwrap();
                assert_eq!(triples(&got), want, "kernel {} probes {probes:?}", k.name());
                // Products: every pair (a < b, b a probe not skipped) once.
                let live_probes: u64 = probes
                    .clone()
                    .filter(|&b| !skip(b as u32))
                    .map(|b| b as u64)
                    .sum();
                assert_eq!(st.products, live_probes, "kernel {}", k.name());
            }
        }
        let (whole, _) = self_join_i8(all, t, Some(&skip)).unwrap();
        let (pj, _) = probe_join_i8(all, 0..n, t, Some(&skip)).unwrap();
        assert_eq!(triples(&whole), triples(&pj));
        assert!(!whole.is_empty());
        // A keep predicate sees each pair once, in row numbers with its exact score, and drops those it
        // refuses; the counters still count every pair at or above the threshold.
        for probes in [0..n, 700..1900] {
            let (plain, plain_st) = probe_join_i8(all, probes.clone(), t, Some(&skip)).unwrap();
            let seen = std::sync::Mutex::new(Vec::new());
            let keep = |a: u32, b: u32, s: f32| {
                seen.lock().unwrap().push((a, b, s));
                !(a + b).is_multiple_of(3)
            };
            let (kept, st) =
                probe_join_i8_kept(all, probes.clone(), t, Some(&skip), &keep).unwrap();
            let mut seen = seen.into_inner().unwrap();
            seen.sort_by_key(|p| (p.0, p.1));
            assert_eq!(seen, triples(&plain), "probes {probes:?}");
            let want: Vec<(u32, u32, f32)> = triples(&plain)
                .into_iter()
                .filter(|p| !(p.0 + p.1).is_multiple_of(3))
                .collect();
            assert_eq!(triples(&kept), want);
            assert!(kept.len() < plain.len() && !kept.is_empty());
            assert_eq!(st.pairs, plain_st.pairs);
            assert_eq!(st.pairs, plain.len() as u64);
        }
    }

    #[test]
    fn deterministic_across_thread_counts_and_rejects_bad_input() {
        let d = 40;
        let v = rows(2100, d, 9);
        let f = RowsF32::dense(&v, d).unwrap();
        let q = quantize_rows(f);
        let l1 = l1_bounds(q.view());
        let all = QuantRows::new(f, q.view(), &l1).unwrap();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| self_join_i8(all, 0.5, None).unwrap())
        };
        let (one, s1) = run(1);
        let (three, s3) = run(3);
        assert!(!one.is_empty());
        assert_eq!(s1, s3);
        assert_eq!(triples(&one), triples(&three));
        assert!(self_join_i8(all, f32::NAN, None).is_err());
        // A code of −128 is an error naming the row, not a wrong sum.
        let mut codes = q.codes().to_vec();
        codes[3 * q.stride() + 5] = i8::MIN;
        let bad = RowsI8::new(&codes, q.scales(), 2100, d, q.stride()).unwrap();
        let badq = QuantRows::new(f, bad, &l1).unwrap();
        assert!(matches!(
            self_join_i8(badq, 0.5, None),
            Err(IndexError::InvalidVector { id: 3, .. })
        ));
        assert!(QuantRows::new(f, q.view(), &l1[..10]).is_err());
    }
}
