//! Dot-product kernels: one safe API over `simsimd`, with a scalar reference that is always compiled.
//!
//! # Dispatch
//! Every public kernel (`dot_f32`, `dot_f16`, `dot_i8`, `dot_many`) goes through [`simd_enabled`]:
//! - the environment variable `PACHA_SIMD=scalar` (read once, cached in a [`OnceLock`]) forces the
//!   scalar path for the whole process, so runs are reproducible and both paths can be exercised;
//! - [`set_simd_override`] overrides that programmatically (for tests and benches).
//!
//! The two paths are also callable directly through the [`simd`] and [`scalar`] modules, which is what the
//! property tests compare.
//!
//! # Lengths
//! The hot-path kernels require equal lengths. They never cause UB: on unequal lengths they compute over
//! the common prefix (documented, not an error, so the hot path has no branch on a `Result`). The
//! `try_*` wrappers return [`IndexError::Dim`] instead.
//!
//! # Precision
//! simsimd returns an `f64`; the f32 kernel's value is rounded to `f32`. The i8 kernel is exact
//! (integer products summed): it returns `i32`, exact while `len * 127² < 2³¹`, i.e. for lengths up to
//! [`MAX_I8_LEN`]; the `try_dot_i8` wrapper rejects longer inputs.
//! The f32 and f16 SIMD paths differ from the scalar path only by summation order: the property tests
//! bound the difference by `1e-5 · (1 + ‖a‖·‖b‖)` at lengths up to 1100 (f32 rounding over `n` terms is at most
//! `n·ε·Σ|aᵢbᵢ| ≤ n·ε·‖a‖‖b‖`, and the observed error is far below that worst case).

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use simsimd::SpatialSimilarity;

use crate::IndexError;
use crate::view::RowsF32;

/// Longest i8 vectors whose dot product is guaranteed to fit an `i32` (`⌊(2³¹−1) / 127²⌋`).
pub const MAX_I8_LEN: usize = (i32::MAX as usize) / (127 * 127);

const MODE_UNSET: u8 = 0;
const MODE_SIMD: u8 = 1;
const MODE_SCALAR: u8 = 2;

static OVERRIDE: AtomicU8 = AtomicU8::new(MODE_UNSET);
static ENV_MODE: OnceLock<u8> = OnceLock::new();

/// Which kernel implementation to force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdMode {
    /// simsimd with runtime CPU dispatch.
    Simd,
    /// The portable scalar reference.
    Scalar,
}

/// Forces a kernel path for the whole process (`Some`), or returns to the `PACHA_SIMD` setting (`None`).
pub fn set_simd_override(mode: Option<SimdMode>) {
    let v = match mode {
        None => MODE_UNSET,
        Some(SimdMode::Simd) => MODE_SIMD,
        Some(SimdMode::Scalar) => MODE_SCALAR,
    };
    OVERRIDE.store(v, Ordering::Relaxed);
}

fn env_mode() -> u8 {
    *ENV_MODE.get_or_init(|| match std::env::var("PACHA_SIMD") {
        Ok(v) if v.eq_ignore_ascii_case("scalar") || v == "0" || v.eq_ignore_ascii_case("off") => {
            MODE_SCALAR
        }
        _ => MODE_SIMD,
    })
}

/// True when the kernels use simsimd, false when the scalar path is forced.
#[inline]
pub fn simd_enabled() -> bool {
    match OVERRIDE.load(Ordering::Relaxed) {
        MODE_SIMD => true,
        MODE_SCALAR => false,
        _ => env_mode() == MODE_SIMD,
    }
}

/// The kernel level in use: `"scalar"` when forced, else simsimd's best backend on this CPU
/// (e.g. `"haswell"`, `"skylake"`, `"neon"`), or `"serial"` if simsimd found no SIMD extension.
pub fn simd_level() -> &'static str {
    if !simd_enabled() {
        return "scalar";
    }
    simsimd_backend()
}

/// simsimd's best backend on this CPU, regardless of any override.
pub fn simsimd_backend() -> &'static str {
    use simsimd::capabilities as c;
    type Probe = (fn() -> bool, &'static str);
    let table: [Probe; 10] = [
        (c::uses_sapphire, "sapphire"),
        (c::uses_turin, "turin"),
        (c::uses_genoa, "genoa"),
        (c::uses_ice, "ice"),
        (c::uses_skylake, "skylake"),
        (c::uses_haswell, "haswell"),
        (c::uses_sve, "sve"),
        (c::uses_neon_i8, "neon_i8"),
        (c::uses_neon, "neon"),
        (c::uses_sierra, "sierra"),
    ];
    table
        .iter()
        .find(|(f, _)| f())
        .map_or("serial", |(_, name)| name)
}

/// Scalar reference implementations (always compiled; the `PACHA_SIMD=scalar` path).
pub mod scalar {
    /// f32 dot product over the common prefix, 8 independent f32 accumulators.
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0.0f32; 8];
        let mut ca = a.chunks_exact(8);
        let mut cb = b.chunks_exact(8);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut tail = 0.0f32;
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            tail += x * y;
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
    }

    /// f16 dot product over the common prefix, products and sums in f32.
    pub fn dot_f16(a: &[half::f16], b: &[half::f16]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = [0.0f32; 8];
        for i in 0..n {
            acc[i % 8] += a[i].to_f32() * b[i].to_f32();
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    }

    /// i8 dot product over the common prefix, exact in i32 (wrapping past [`super::MAX_I8_LEN`]).
    pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
        a.iter().zip(b).fold(0i32, |s, (&x, &y)| {
            s.wrapping_add(i32::from(x) * i32::from(y))
        })
    }
}

/// The simsimd path, callable directly regardless of the override (for tests and benches).
pub mod simd {
    use super::SpatialSimilarity;

    /// simsimd f32 dot product over the common prefix.
    #[inline]
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        <f32 as SpatialSimilarity>::dot(&a[..n], &b[..n]).map_or(0.0, |d| d as f32)
    }

    /// f16 dot product over the common prefix, accumulated in f32: F16C conversion + FMA where the CPU has
    /// them, else simsimd. simsimd's own f16 kernel is not used where F16C exists because on AVX512-FP16
    /// CPUs (Sapphire Rapids) it picks a "sapphire" kernel that accumulates in f16, off by ≈ 10⁻⁴ relative
    /// (seen here: −2.1934 for −2.1932 at length ≈ 1 000).
    #[inline]
    pub fn dot_f16(a: &[half::f16], b: &[half::f16]) -> f32 {
        let n = a.len().min(b.len());
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("avx")
        {
            // SAFETY: the CPU has F16C, FMA and AVX (just checked); both slices hold at least `n` values.
            return unsafe { dot_f16_f16c(&a[..n], &b[..n]) };
        }
        let (a, b) = (as_simsimd_f16(&a[..n]), as_simsimd_f16(&b[..n]));
        <simsimd::f16 as SpatialSimilarity>::dot(a, b).map_or(0.0, |d| d as f32)
    }

    /// [`dot_f16`] with F16C: 8 halves at a time widened to f32, two FMA chains, the tail in scalar f32.
    ///
    /// # Safety
    /// The CPU supports F16C, FMA and AVX; `a.len() == b.len()`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx,f16c,fma")]
    unsafe fn dot_f16_f16c(a: &[half::f16], b: &[half::f16]) -> f32 {
        use std::arch::x86_64::*;
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr().cast::<u16>(), b.as_ptr().cast::<u16>());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: values i..i + 16 lie within both slices (checked by the loop condition); unaligned
            // 16-byte loads of 8 halves each.
            unsafe {
                let x0 = _mm256_cvtph_ps(_mm_loadu_si128(pa.add(i).cast()));
                let y0 = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i).cast()));
                let x1 = _mm256_cvtph_ps(_mm_loadu_si128(pa.add(i + 8).cast()));
                let y1 = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i + 8).cast()));
                s0 = _mm256_fmadd_ps(x0, y0, s0);
                s1 = _mm256_fmadd_ps(x1, y1, s1);
            }
            i += 16;
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(s0, s1)) };
        let mut tail = 0.0f32;
        for k in i..n {
            tail += a[k].to_f32() * b[k].to_f32();
        }
        ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
            + tail
    }

    /// simsimd i8 dot product over the common prefix (exact; see [`super::MAX_I8_LEN`]).
    #[inline]
    pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len().min(b.len());
        <i8 as SpatialSimilarity>::dot(&a[..n], &b[..n]).map_or(0, |d| d as i32)
    }

    /// simsimd cosine *distance* (`1 − cos`) of two i8 vectors, computed on the codes.
    #[inline]
    pub fn cos_distance_i8(a: &[i8], b: &[i8]) -> f32 {
        let n = a.len().min(b.len());
        <i8 as SpatialSimilarity>::cos(&a[..n], &b[..n]).map_or(1.0, |d| d as f32)
    }

    fn as_simsimd_f16(s: &[half::f16]) -> &[simsimd::f16] {
        // SAFETY: `half::f16` and `simsimd::f16` are both `#[repr(transparent)]` wrappers of a `u16`
        // holding IEEE binary16 bits, so they have the same size, alignment and validity (every bit
        // pattern is valid); the new slice covers exactly the same memory with the same lifetime.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<simsimd::f16>(), s.len()) }
    }
}

/// f32 dot product. Requires `a.len() == b.len()` (otherwise: the common prefix; see module docs).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    if simd_enabled() {
        simd::dot_f32(a, b)
    } else {
        scalar::dot_f32(a, b)
    }
}

/// f16 dot product, accumulated in f32 or wider. Requires equal lengths (otherwise: the common prefix).
#[inline]
pub fn dot_f16(a: &[half::f16], b: &[half::f16]) -> f32 {
    if simd_enabled() {
        simd::dot_f16(a, b)
    } else {
        scalar::dot_f16(a, b)
    }
}

/// Exact i8 dot product as `i32`. Requires equal lengths ≤ [`MAX_I8_LEN`] (see module docs).
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    if simd_enabled() {
        simd::dot_i8(a, b)
    } else {
        scalar::dot_i8(a, b)
    }
}

/// Hints the CPU to start loading `row` into cache; never changes a result (a scan that reads rows at random
/// prefetches the next row while it scores the current one).
#[inline]
pub fn prefetch_row<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let p = row.as_ptr().cast::<i8>();
        for off in (0..std::mem::size_of_val(row)).step_by(64) {
            // SAFETY: `off` is within `row`, so `p.add(off)` stays inside its allocation; a prefetch is a
            // hint that never faults and writes nothing (SSE, part of the x86_64 baseline).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Checked [`dot_f32`]: errors on unequal lengths.
pub fn try_dot_f32(a: &[f32], b: &[f32]) -> Result<f32, IndexError> {
    check_len(a.len(), b.len())?;
    Ok(dot_f32(a, b))
}

/// Checked [`dot_f16`]: errors on unequal lengths.
pub fn try_dot_f16(a: &[half::f16], b: &[half::f16]) -> Result<f32, IndexError> {
    check_len(a.len(), b.len())?;
    Ok(dot_f16(a, b))
}

/// Checked [`dot_i8`]: errors on unequal lengths or lengths above [`MAX_I8_LEN`].
pub fn try_dot_i8(a: &[i8], b: &[i8]) -> Result<i32, IndexError> {
    check_len(a.len(), b.len())?;
    if a.len() > MAX_I8_LEN {
        return Err(IndexError::Shape(format!(
            "i8 vectors of length {} exceed {MAX_I8_LEN}, the longest whose dot fits an i32",
            a.len()
        )));
    }
    Ok(dot_i8(a, b))
}

fn check_len(a: usize, b: usize) -> Result<(), IndexError> {
    if a != b {
        return Err(IndexError::Dim {
            expected: a,
            got: b,
        });
    }
    Ok(())
}

/// Scores `query` against the listed rows of `base`: `out[i] = dot_f32(query, base.row(rows[i]))`,
/// bit for bit the same value [`dot_f32`] gives. Used to rescore ANN candidates exactly.
///
/// Errors if `query.len() != base.dim()`, `out.len() != rows.len()`, or a row number is out of range
/// (checked before any work is done).
pub fn dot_many(
    query: &[f32],
    base: RowsF32<'_>,
    rows: &[u32],
    out: &mut [f32],
) -> Result<(), IndexError> {
    check_len(base.dim(), query.len())?;
    if out.len() != rows.len() {
        return Err(IndexError::Shape(format!(
            "dot_many: {} outputs for {} rows",
            out.len(),
            rows.len()
        )));
    }
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= base.rows()) {
        return Err(IndexError::Shape(format!(
            "dot_many: row {bad} out of range (base has {} rows)",
            base.rows()
        )));
    }
    // Decide the path once for the whole batch, so every value comes from the same kernel.
    let kernel: fn(&[f32], &[f32]) -> f32 = if simd_enabled() {
        simd::dot_f32
    } else {
        scalar::dot_f32
    };
    for (o, &r) in out.iter_mut().zip(rows) {
        *o = kernel(query, base.row(r as usize));
    }
    Ok(())
}

/// Copies rows `ids` of `base` into `buf`, densely.
pub(crate) fn gather(base: RowsF32<'_>, ids: &[u32], buf: &mut Vec<f32>) {
    let d = base.dim();
    buf.clear();
    buf.reserve(ids.len() * d);
    for &i in ids {
        buf.extend_from_slice(base.row(i as usize));
    }
}

/// `out[i*n + k] = a_i · b_k` for dense row-major `a` (m × d) and `b` (n × d).
pub(crate) fn gemm(a: &[f32], m: usize, b: &[f32], n: usize, d: usize, out: &mut Vec<f32>) {
    if out.len() < m * n {
        out.resize(m * n, 0.0);
    }
    let am = MatRef::from_row_major_slice(&a[..m * d], m, d);
    let bm = MatRef::from_row_major_slice(&b[..n * d], n, d);
    let c = MatMut::from_row_major_slice_mut(&mut out[..m * n], m, n);
    matmul(c, Accum::Replace, am, bm.transpose(), 1.0f32, Par::Seq);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(v: &[f32]) -> f32 {
        v.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    fn vec_pair(max: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        (1..max).prop_flat_map(|n| {
            (
                proptest::collection::vec(-2.0f32..2.0, n),
                proptest::collection::vec(-2.0f32..2.0, n),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn f32_simd_matches_scalar((a, b) in vec_pair(1100)) {
            let s = scalar::dot_f32(&a, &b);
            let v = simd::dot_f32(&a, &b);
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            let tol = 1e-5 * (1.0 + norm(&a) * norm(&b));
            prop_assert!((s - v).abs() <= tol, "scalar {s} simd {v} tol {tol}");
            prop_assert!((f64::from(v) - exact).abs() <= f64::from(tol));
        }

        #[test]
        fn f16_simd_matches_scalar((a, b) in vec_pair(1100)) {
            let a: Vec<half::f16> = a.iter().map(|&x| half::f16::from_f32(x)).collect();
            let b: Vec<half::f16> = b.iter().map(|&x| half::f16::from_f32(x)).collect();
            let af: Vec<f32> = a.iter().map(|x| x.to_f32()).collect();
            let bf: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
            let s = scalar::dot_f16(&a, &b);
            let v = simd::dot_f16(&a, &b);
            let tol = 1e-5 * (1.0 + norm(&af) * norm(&bf));
            prop_assert!((s - v).abs() <= tol, "scalar {s} simd {v} tol {tol}");
        }

        #[test]
        fn i8_simd_equals_scalar(
            (a, b) in (1usize..1100).prop_flat_map(|n| (
                proptest::collection::vec(any::<i8>(), n),
                proptest::collection::vec(any::<i8>(), n)))
        ) {
            let exact: i64 = a.iter().zip(&b).map(|(&x, &y)| i64::from(x) * i64::from(y)).sum();
            prop_assert_eq!(i64::from(scalar::dot_i8(&a, &b)), exact);
            prop_assert_eq!(i64::from(simd::dot_i8(&a, &b)), exact);
        }
    }

    #[test]
    fn checked_wrappers_reject_length_mismatch() {
        assert!(matches!(
            try_dot_f32(&[1.0, 2.0], &[1.0]),
            Err(IndexError::Dim { .. })
        ));
        let h = [half::f16::ONE; 3];
        assert!(try_dot_f16(&h, &h[..2]).is_err());
        assert!(try_dot_i8(&[1, 2], &[1]).is_err());
        assert_eq!(try_dot_f32(&[1.0, 2.0], &[3.0, 4.0]).unwrap(), 11.0);
        assert_eq!(try_dot_i8(&[1, -2], &[3, 4]).unwrap(), -5);
        // The unchecked kernels use the common prefix, never reading past either slice.
        assert_eq!(dot_f32(&[1.0, 2.0, 9.0], &[3.0, 4.0]), 11.0);
        assert_eq!(simd::dot_i8(&[1, 2, 9], &[3, 4]), 11);
    }

    #[test]
    fn dot_many_is_bitwise_dot_f32_and_checks_input() {
        let dim = 37;
        let stride = crate::padded_stride(dim, 4);
        let rows = 20;
        let data: Vec<f32> = (0..rows * stride)
            .map(|i| ((i * 7919) % 113) as f32 / 57.0 - 1.0)
            .collect();
        let base = RowsF32::new(&data, rows, dim, stride).unwrap();
        let q: Vec<f32> = (0..dim).map(|i| (i as f32).sin()).collect();
        let ids = [3u32, 0, 19, 3, 7];
        let mut out = [0.0f32; 5];
        dot_many(&q, base, &ids, &mut out).unwrap();
        for (o, &r) in out.iter().zip(&ids) {
            assert_eq!(o.to_bits(), dot_f32(&q, base.row(r as usize)).to_bits());
        }
        assert!(dot_many(&q, base, &[20], &mut [0.0]).is_err());
        assert!(dot_many(&q[..5], base, &[1], &mut [0.0]).is_err());
        assert!(dot_many(&q, base, &[1, 2], &mut [0.0]).is_err());
    }

    #[test]
    fn simsimd_backend_is_named() {
        assert!(!simsimd_backend().is_empty());
    }
}
