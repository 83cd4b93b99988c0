//! i8 scalar quantisation with a per-vector scale.
//!
//! `q[i] = round(v[i] / s)` with `s = max|v| / 127`, so every component's error is at most `s / 2`.
//! For two vectors the dot-product error is bounded by
//! `|a·b − sa·sb·(qa·qb)| ≤ (sa/2)·‖b‖₁ + (sb/2)·‖a‖₁ + d·sa·sb/4`; for unit vectors `‖x‖₁ ≤ √d`, so at
//! 512-d with typical `max|v| ≈ 0.2` the bound is about 0.02 and the observed error is far smaller.

/// Quantises `v` into `out` (same length) and returns the scale `s` with `v ≈ s * out`.
/// A zero vector, or one holding NaN or infinity, gets scale 0 and all-zero codes.
pub fn quantize_i8(v: &[f32], out: &mut [i8]) -> f32 {
    debug_assert_eq!(v.len(), out.len());
    // NaN-sticky maximum (`f32::max` ignores NaN): a vector with any NaN or infinity gets scale 0.
    let max = v.iter().fold(0.0f32, |m, x| {
        let a = x.abs();
        if a > m || a.is_nan() { a } else { m }
    });
    if max == 0.0 || !max.is_finite() {
        out.iter_mut().for_each(|o| *o = 0);
        return 0.0;
    }
    let s = max / 127.0;
    let inv = 1.0 / s;
    for (o, x) in out.iter_mut().zip(v) {
        *o = (x * inv).round().clamp(-127.0, 127.0) as i8;
    }
    s
}

/// The worst-case absolute error of the quantised dot product of `a` and `b` (see the module docs).
pub fn dot_error_bound(a: &[f32], sa: f32, b: &[f32], sb: f32) -> f32 {
    let l1a: f32 = a.iter().map(|x| x.abs()).sum();
    let l1b: f32 = b.iter().map(|x| x.abs()).sum();
    0.5 * sa * l1b + 0.5 * sb * l1a + a.len() as f32 * sa * sb * 0.25
}

/// Upper bound of every row's ‖v‖₁ from its codes alone, `s·(‖q‖₁ + d/2)` (each component is within
/// `s/2` of `s·q`), so that [`code_error_bound`] needs no f32 read. Computed in parallel (rayon).
pub fn l1_bounds(rows: crate::RowsI8<'_>) -> Vec<f32> {
    use rayon::prelude::*;
    let half = rows.dim() as f32 * 0.5;
    (0..rows.rows())
        .into_par_iter()
        .map(|i| {
            let l1: i32 = rows.row(i).iter().map(|&c| i32::from(c).abs()).sum();
            rows.scale(i) * (l1 as f32 + half)
        })
        .collect()
}

/// [`dot_error_bound`] from the scales and the [`l1_bounds`] of two rows of dimension `d`: an upper bound
/// of `|a·b − sa·sb·(qa·qb)|`, plus a margin for the f32 rounding of the products involved.
#[inline]
pub fn code_error_bound(sa: f32, ua: f32, sb: f32, ub: f32, d: usize) -> f32 {
    0.5 * (sa * ub + sb * ua) + 0.25 * d as f32 * sa * sb + CODE_BOUND_SLACK
}

/// Absolute margin [`code_error_bound`] adds for rounding (f32 products, the f32 kernel's own error).
pub const CODE_BOUND_SLACK: f32 = 1e-4;

/// A contiguous, padded buffer of i8-quantised rows with their scales (owned; see [`quantize_rows`]).
#[derive(Clone, Debug, Default)]
pub struct QuantizedRows {
    data: Vec<i8>,
    scales: Vec<f32>,
    rows: usize,
    dim: usize,
    stride: usize,
}

impl QuantizedRows {
    /// A borrowed view of the quantised rows.
    pub fn view(&self) -> crate::RowsI8<'_> {
        crate::RowsI8::from_parts_unchecked(
            &self.data,
            &self.scales,
            self.rows,
            self.dim,
            self.stride,
        )
    }
    /// The padded code buffer (`rows * stride` values).
    pub fn codes(&self) -> &[i8] {
        &self.data
    }
    /// Per-row scales.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Row stride in elements (a multiple of 64 bytes).
    pub fn stride(&self) -> usize {
        self.stride
    }
}

/// Quantises every row of `rows` in parallel (rayon) into a contiguous buffer whose rows are padded to
/// 64-byte boundaries ([`crate::padded_stride`]); padding bytes are zero.
pub fn quantize_rows(rows: crate::RowsF32<'_>) -> QuantizedRows {
    use rayon::prelude::*;
    let dim = rows.dim();
    let stride = crate::padded_stride(dim, 1);
    let n = rows.rows();
    let mut data = vec![0i8; n * stride];
    let mut scales = vec![0.0f32; n];
    data.par_chunks_mut(stride)
        .zip(scales.par_iter_mut())
        .enumerate()
        .for_each(|(i, (out, s))| *s = quantize_i8(rows.row(i), &mut out[..dim]));
    QuantizedRows {
        data,
        scales,
        rows: n,
        dim,
        stride,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unit(v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n.max(1e-12)).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn round_trip_error_is_at_most_half_a_step(v in proptest::collection::vec(-3.0f32..3.0, 1..600)) {
            let mut q = vec![0i8; v.len()];
            let s = quantize_i8(&v, &mut q);
            for (x, &c) in v.iter().zip(&q) {
                prop_assert!(c != -128);
                prop_assert!((x - s * f32::from(c)).abs() <= s * 0.5 + 1e-6, "{x} vs {}", s * f32::from(c));
            }
        }

        #[test]
        fn quantised_dot_error_within_bound(
            (a, b) in (1usize..1100).prop_flat_map(|n| (
                proptest::collection::vec(-1.0f32..1.0, n),
                proptest::collection::vec(-1.0f32..1.0, n)))
        ) {
            let (a, b) = (unit(a), unit(b));
            let (mut qa, mut qb) = (vec![0i8; a.len()], vec![0i8; b.len()]);
            let sa = quantize_i8(&a, &mut qa);
            let sb = quantize_i8(&b, &mut qb);
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            let approx = f64::from(sa) * f64::from(sb) * f64::from(crate::kernels::dot_i8(&qa, &qb));
            let bound = f64::from(dot_error_bound(&a, sa, &b, sb));
            prop_assert!((exact - approx).abs() <= bound * (1.0 + 1e-4) + 1e-7,
                "error {} > bound {bound}", (exact - approx).abs());
            // The bound from the codes alone holds against the f32 kernel's score too.
            let view = |q: &[i8], s: f32| (q.to_vec(), vec![s]);
            let ((ca, cs), (cb, ct)) = (view(&qa, sa), view(&qb, sb));
            let ua = l1_bounds(crate::RowsI8::new(&ca, &cs, 1, a.len(), a.len()).unwrap())[0];
            let ub = l1_bounds(crate::RowsI8::new(&cb, &ct, 1, b.len(), b.len()).unwrap())[0];
            prop_assert!(ua >= a.iter().map(|x| x.abs()).sum::<f32>() * (1.0 - 1e-5));
            let kernel = f64::from(crate::kernels::dot_f32(&a, &b));
            let code_bound = f64::from(code_error_bound(sa, ua, sb, ub, a.len()));
            prop_assert!((kernel - approx).abs() <= code_bound,
                "kernel error {} > code bound {code_bound}", (kernel - approx).abs());
        }
    }

    #[test]
    fn zero_and_non_finite_vectors_get_scale_zero() {
        let mut q = [5i8; 3];
        assert_eq!(quantize_i8(&[0.0; 3], &mut q), 0.0);
        assert_eq!(q, [0; 3]);
        assert_eq!(quantize_i8(&[1.0, f32::NAN, 0.0], &mut q), 0.0);
    }

    #[test]
    fn quantize_rows_matches_per_row_quantisation() {
        let dim = 70;
        let data: Vec<f32> = (0..dim * 33)
            .map(|i| ((i * 31) % 17) as f32 - 8.0)
            .collect();
        let rows = crate::RowsF32::dense(&data, dim).unwrap();
        let q = quantize_rows(rows);
        assert_eq!(q.stride(), 128);
        assert_eq!(q.rows(), 33);
        let v = q.view();
        for i in 0..33 {
            let mut one = vec![0i8; dim];
            let s = quantize_i8(rows.row(i), &mut one);
            assert_eq!(v.row(i), &one[..]);
            assert_eq!(v.scale(i), s);
            assert!(
                q.codes()[i * 128 + dim..(i + 1) * 128]
                    .iter()
                    .all(|&c| c == 0)
            );
        }
    }
}
