//! Exact search by blocked matrix products: the ground-truth oracle and the small-gallery path.
//!
//! # Tiling
//! Scores are computed tile by tile as `S = Q·Bᵀ` with `faer`'s GEMM into a per-worker buffer that is
//! reused across tiles. Query (probe) rows are processed in bands of [`QUERY_TILE`] rows; within a band
//! the base is cut into tiles of [`BASE_TILE`] rows that rayon processes in parallel (joins: the tiles of
//! [`BANDS_PER_GROUP`] bands at once, so the short bands of a self-join triangle do not idle a core), each with a
//! *sequential* GEMM (`Par::Seq`). Parallelism across tiles, rather than inside one GEMM, keeps every
//! core busy on the scan that follows the product (threshold test or top-k heap) as well, and makes every
//! score depend only on the fixed tile shapes, never on the thread count.
//! A 512×1024 f32 tile is 2 MiB: the buffer of one worker stays in L2/L3, and the product of a
//! 512-row band by a 1024-row tile at d = 512 is 0.5 GFLOP, large enough for faer to reach its
//! full rate. Memory is bounded: one buffer per worker, plus the pairs of one group of bands.
//!
//! Views are used in place (zero copy): `MatRef::from_row_major_slice_with_stride` takes the view's row
//! stride, so padded rows of a memory-mapped store feed the GEMM directly.
//!
//! # Scores
//! GEMM scores are f32 sums in faer's order: they agree with [`crate::kernels::dot_f32`] to rounding, not
//! bit for bit. Callers that need the kernel's exact value rescore with [`crate::kernels::dot_many`].
//! Inputs are assumed finite (the store rejects NaN/∞ at ingest).
//!
//! # Order and determinism
//! `top_k` lists are sorted by (score desc, id asc) and the k-set is chosen under that total order, so
//! ties are resolved by id. Join pairs are sorted by (a, b) and streamed band by band in that order.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::ControlFlow;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::IndexError;
use crate::view::RowsF32;

/// Rows of the query/probe side per band.
pub const QUERY_TILE: usize = 512;
/// Rows of the base side per tile.
pub const BASE_TILE: usize = 1024;
/// Bands whose tiles form one parallel work list in a join (and one sorted batch for the sink).
pub const BANDS_PER_GROUP: usize = 4;

/// A search result: a base row number and its similarity score (dot product of unit vectors = cosine).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Neighbour {
    /// Row number in the base.
    pub id: u32,
    /// Similarity (higher is more similar).
    pub score: f32,
}

/// A pair found by a threshold join: `a` from the probe (or the lower row of a self-join), `b` from the base.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    /// Probe row (self-join: the smaller row number).
    pub a: u32,
    /// Base row (self-join: the larger row number).
    pub b: u32,
    /// Similarity score.
    pub score: f32,
}

/// A per-row predicate; rows for which it returns `true` are excluded (e.g. deleted rows).
pub type RowFilter<'a> = &'a (dyn Fn(u32) -> bool + Sync);

/// Counters of a join run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinStats {
    /// Pairs emitted.
    pub pairs: u64,
    /// Tiles multiplied.
    pub tiles: u64,
    /// True if the sink stopped the join early.
    pub stopped: bool,
}

/// Orders candidates so that "better" is greater: higher score, then lower id.
#[derive(Clone, Copy, Debug)]
struct Cand(f32, u32);
impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then_with(|| o.1.cmp(&self.1))
    }
}

/// A bounded set of the k best candidates under (score desc, id asc).
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<std::cmp::Reverse<Cand>>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }
    #[inline]
    pub(crate) fn push(&mut self, id: u32, score: f32) {
        let c = Cand(score, id);
        if self.heap.len() < self.k {
            self.heap.push(std::cmp::Reverse(c));
        } else if let Some(mut worst) = self.heap.peek_mut()
            && c > worst.0
        {
            *worst = std::cmp::Reverse(c);
        }
    }
    /// The kept candidates, sorted by (score desc, id asc).
    pub(crate) fn into_sorted(self) -> Vec<Neighbour> {
        // into_sorted_vec is ascending in Reverse order = descending in Cand order (best first).
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|r| Neighbour {
                id: r.0.1,
                score: r.0.0,
            })
            .collect()
    }
}

/// Sorts neighbours by (score desc, id asc) with a total order on scores.
pub fn sort_neighbours(v: &mut [Neighbour]) {
    v.sort_unstable_by(|x, y| y.score.total_cmp(&x.score).then_with(|| x.id.cmp(&y.id)));
}

fn check_dims(a: &RowsF32<'_>, b: &RowsF32<'_>) -> Result<(), IndexError> {
    if a.dim() != b.dim() {
        return Err(IndexError::Dim {
            expected: b.dim(),
            got: a.dim(),
        });
    }
    if a.rows() > u32::MAX as usize || b.rows() > u32::MAX as usize {
        return Err(IndexError::Shape("more than 2^32 rows: ids are u32".into()));
    }
    Ok(())
}

/// `buf[i * b.rows() + j] = a.row(i) · b.row(j)`, computed by a sequential faer GEMM.
fn gemm_tile(a: RowsF32<'_>, b: RowsF32<'_>, buf: &mut Vec<f32>) {
    let (m, n, d) = (a.rows(), b.rows(), a.dim());
    if buf.len() < m * n {
        buf.resize(m * n, 0.0);
    }
    let am = MatRef::from_row_major_slice_with_stride(a.as_slice(), m, d, a.stride());
    let bm = MatRef::from_row_major_slice_with_stride(b.as_slice(), n, d, b.stride());
    let c = MatMut::from_row_major_slice_mut(&mut buf[..m * n], m, n);
    matmul(c, Accum::Replace, am, bm.transpose(), 1.0f32, Par::Seq);
}

fn tiles(n: usize, size: usize) -> impl Iterator<Item = (usize, usize)> + Clone {
    (0..n.div_ceil(size)).map(move |t| (t * size, ((t + 1) * size).min(n)))
}

/// Exact top-`k` of every query against `base`, skipping base rows for which `exclude` returns true.
/// Each list is sorted by (score desc, id asc) and has `min(k, eligible rows)` entries.
pub fn top_k(
    queries: RowsF32<'_>,
    base: RowsF32<'_>,
    k: usize,
    exclude: Option<RowFilter<'_>>,
) -> Result<Vec<Vec<Neighbour>>, IndexError> {
    check_dims(&queries, &base)?;
    let mut out = Vec::with_capacity(queries.rows());
    if k == 0 || base.rows() == 0 {
        out.resize(queries.rows(), Vec::new());
        return Ok(out);
    }
    let base_tiles: Vec<(usize, usize)> = tiles(base.rows(), BASE_TILE).collect();
    for (q0, q1) in tiles(queries.rows(), QUERY_TILE) {
        let band = queries.slice_rows(q0, q1);
        let nq = q1 - q0;
        let partial: Vec<Vec<TopK>> = base_tiles
            .par_iter()
            .map_init(Vec::new, |buf, &(b0, b1)| {
                let tile = base.slice_rows(b0, b1);
                gemm_tile(band, tile, buf);
                let nb = b1 - b0;
                (0..nq)
                    .map(|i| {
                        let mut t = TopK::new(k);
                        for (j, &s) in buf[i * nb..(i + 1) * nb].iter().enumerate() {
                            let id = (b0 + j) as u32;
                            if exclude.is_none_or(|f| !f(id)) {
                                t.push(id, s);
                            }
                        }
                        t
                    })
                    .collect()
            })
            .collect();
        let mut merged: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
        for tile in partial {
            for (m, t) in merged.iter_mut().zip(tile) {
                for c in t.heap {
                    m.push(c.0.1, c.0.0);
                }
            }
        }
        out.extend(merged.into_iter().map(TopK::into_sorted));
    }
    Ok(out)
}

/// Refuses a NaN join threshold (every comparison with it is false: the join would silently return nothing).
pub(crate) fn check_threshold(t: f32) -> Result<(), IndexError> {
    if t.is_nan() {
        return Err(IndexError::Shape("threshold is NaN".into()));
    }
    Ok(())
}

/// All pairs (probe row `a`, base row `b`) with score ≥ `threshold`, sorted by (a, b).
/// Rows for which `skip` returns true (on either side, by their own row number) produce no pairs.
pub fn threshold_join(
    probe: RowsF32<'_>,
    base: RowsF32<'_>,
    threshold: f32,
    skip_probe: Option<RowFilter<'_>>,
    skip_base: Option<RowFilter<'_>>,
) -> Result<Vec<Pair>, IndexError> {
    let mut all = Vec::new();
    threshold_join_with(
        probe,
        base,
        threshold,
        skip_probe,
        skip_base,
        &mut |p: &[Pair]| {
            all.extend_from_slice(p);
            ControlFlow::Continue(())
        },
    )?;
    Ok(all)
}

/// Streaming [`threshold_join`]: `sink` receives the pairs in batches (one per group of bands), in (a, b)
/// order overall;
/// returning `ControlFlow::Break` stops the join. Memory: one band's pairs plus one buffer per worker.
pub fn threshold_join_with(
    probe: RowsF32<'_>,
    base: RowsF32<'_>,
    threshold: f32,
    skip_probe: Option<RowFilter<'_>>,
    skip_base: Option<RowFilter<'_>>,
    sink: &mut dyn FnMut(&[Pair]) -> ControlFlow<()>,
) -> Result<JoinStats, IndexError> {
    check_dims(&probe, &base)?;
    check_threshold(threshold)?;
    join_impl(probe, base, threshold, skip_probe, skip_base, false, sink)
}

/// Self-join: all pairs `i < j` of `base` with score ≥ `threshold` (no self-pairs, upper triangle only),
/// sorted by (a, b). Rows for which `skip` returns true produce no pairs.
pub fn self_join(
    base: RowsF32<'_>,
    threshold: f32,
    skip: Option<RowFilter<'_>>,
) -> Result<Vec<Pair>, IndexError> {
    let mut all = Vec::new();
    self_join_with(base, threshold, skip, &mut |p: &[Pair]| {
        all.extend_from_slice(p);
        ControlFlow::Continue(())
    })?;
    Ok(all)
}

/// Streaming [`self_join`]; see [`threshold_join_with`] for the sink contract.
pub fn self_join_with(
    base: RowsF32<'_>,
    threshold: f32,
    skip: Option<RowFilter<'_>>,
    sink: &mut dyn FnMut(&[Pair]) -> ControlFlow<()>,
) -> Result<JoinStats, IndexError> {
    check_dims(&base, &base)?;
    check_threshold(threshold)?;
    join_impl(base, base, threshold, skip, skip, true, sink)
}

fn join_impl(
    probe: RowsF32<'_>,
    base: RowsF32<'_>,
    t: f32,
    skip_probe: Option<RowFilter<'_>>,
    skip_base: Option<RowFilter<'_>>,
    upper: bool,
    sink: &mut dyn FnMut(&[Pair]) -> ControlFlow<()>,
) -> Result<JoinStats, IndexError> {
    let mut stats = JoinStats::default();
    let bands: Vec<(usize, usize)> = tiles(probe.rows(), QUERY_TILE).collect();
    for group in bands.chunks(BANDS_PER_GROUP) {
        // All (band, tile) products of a group of bands form one parallel work list, so the short bands
        // near the end of a self-join's triangle still keep every core busy.
        let mut items: Vec<(usize, usize, usize, usize)> = Vec::new();
        for &(q0, q1) in group {
            // Self-join: columns start just right of the band's first row; tiles entirely below the
            // diagonal are never formed.
            let c_start = if upper { q0 + 1 } else { 0 };
            if c_start < base.rows() {
                items.extend(
                    tiles(base.rows() - c_start, BASE_TILE)
                        .map(|(a, b)| (q0, q1, a + c_start, b + c_start)),
                );
            }
        }
        stats.tiles += items.len() as u64;
        let mut pairs: Vec<Pair> = items
            .par_iter()
            .map_init(Vec::new, |buf, &(q0, q1, b0, b1)| {
                let band = probe.slice_rows(q0, q1);
                let tile = base.slice_rows(b0, b1);
                gemm_tile(band, tile, buf);
                let nb = b1 - b0;
                let mut found = Vec::new();
                for i in 0..q1 - q0 {
                    let a = (q0 + i) as u32;
                    if skip_probe.is_some_and(|f| f(a)) {
                        continue;
                    }
                    let row = &buf[i * nb..(i + 1) * nb];
                    // Self-join: only j > i within this tile.
                    let j_from = if upper {
                        (q0 + i + 1).saturating_sub(b0).min(nb)
                    } else {
                        0
                    };
                    for (j, &s) in row.iter().enumerate().skip(j_from) {
                        if s >= t {
                            let b = (b0 + j) as u32;
                            if skip_base.is_none_or(|f| !f(b)) {
                                found.push(Pair { a, b, score: s });
                            }
                        }
                    }
                }
                found
            })
            .flatten()
            .collect();
        pairs.sort_unstable_by_key(|p| (p.a, p.b));
        stats.pairs += pairs.len() as u64;
        if !pairs.is_empty() && sink(&pairs).is_break() {
            stats.stopped = true;
            break;
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::scalar;

    fn data(n: usize, dim: usize, stride: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut v = vec![0.0f32; n * stride];
        for i in 0..n {
            let mut norm = 0.0f32;
            for j in 0..dim {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let x = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                v[i * stride + j] = x;
                norm += x * x;
            }
            for j in 0..dim {
                v[i * stride + j] /= norm.sqrt();
            }
            for j in dim..stride {
                v[i * stride + j] = f32::NAN; // padding must never be read
            }
        }
        v
    }

    #[test]
    fn top_k_matches_brute_force_with_padding_and_exclusion() {
        let (dim, stride) = (20, 32);
        let b = data(2300, dim, stride, 1);
        let q = data(600, dim, stride, 2);
        let base = RowsF32::new(&b, 2300, dim, stride).unwrap();
        let qs = RowsF32::new(&q, 600, dim, stride).unwrap();
        let excl = |id: u32| id % 7 == 3;
        let got = top_k(qs, base, 5, Some(&excl)).unwrap();
        assert_eq!(got.len(), 600);
        for (qi, res) in got.iter().enumerate() {
            let mut all: Vec<Neighbour> = (0..2300u32)
                .filter(|&id| !excl(id))
                .map(|id| Neighbour {
                    id,
                    score: scalar::dot_f32(qs.row(qi), base.row(id as usize)),
                })
                .collect();
            sort_neighbours(&mut all);
            assert_eq!(res.len(), 5);
            for (g, e) in res.iter().zip(&all) {
                assert!(!excl(g.id));
                assert!((g.score - e.score).abs() < 1e-5, "{g:?} vs {e:?}");
            }
            // Sorted by (score desc, id asc).
            assert!(res.windows(2).all(
                |w| w[0].score > w[1].score || (w[0].score == w[1].score && w[0].id < w[1].id)
            ));
        }
    }

    #[test]
    fn top_k_ties_resolved_by_id_and_k_larger_than_base() {
        let v = vec![1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let base = RowsF32::dense(&v, 2).unwrap();
        let q = RowsF32::dense(&v[..2], 2).unwrap();
        let r = top_k(q, base, 2, None).unwrap();
        assert_eq!(r[0].iter().map(|n| n.id).collect::<Vec<_>>(), vec![0, 1]);
        let r = top_k(q, base, 10, None).unwrap();
        assert_eq!(
            r[0].iter().map(|n| n.id).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert!(top_k(q, RowsF32::dense(&v, 4).unwrap(), 1, None).is_err());
    }

    fn brute_pairs(p: RowsF32<'_>, b: RowsF32<'_>, t: f32, upper: bool) -> Vec<(u32, u32)> {
        let mut v = Vec::new();
        for i in 0..p.rows() {
            for j in 0..b.rows() {
                if upper && j <= i {
                    continue;
                }
                if scalar::dot_f32(p.row(i), b.row(j)) >= t {
                    v.push((i as u32, j as u32));
                }
            }
        }
        v
    }

    #[test]
    fn joins_match_brute_force() {
        let dim = 6; // low dimension: many pairs above the threshold
        let b = data(1700, dim, 8, 3);
        let p = data(700, dim, 8, 4);
        let base = RowsF32::new(&b, 1700, dim, 8).unwrap();
        let probe = RowsF32::new(&p, 700, dim, 8).unwrap();
        let t = 0.95;
        // Scores near t may differ by rounding between GEMM and the scalar kernel: compare away from t.
        let near = |a: RowsF32<'_>, x: u32, c: RowsF32<'_>, y: u32| {
            (scalar::dot_f32(a.row(x as usize), c.row(y as usize)) - t).abs() < 1e-5
        };
        let got = threshold_join(probe, base, t, None, None).unwrap();
        let exp = brute_pairs(probe, base, t, false);
        let g: Vec<(u32, u32)> = got.iter().map(|p| (p.a, p.b)).collect();
        assert!(g.windows(2).all(|w| w[0] < w[1]));
        let diff: Vec<_> = g
            .iter()
            .filter(|x| !exp.contains(x))
            .chain(exp.iter().filter(|x| !g.contains(x)))
            .collect();
        assert!(
            diff.iter().all(|&&(x, y)| near(probe, x, base, y)),
            "{diff:?}"
        );
        assert!(exp.len() > 100, "test needs pairs: {}", exp.len());

        let skip = |r: u32| r.is_multiple_of(5);
        let got = self_join(base, t, Some(&skip)).unwrap();
        let exp: Vec<(u32, u32)> = brute_pairs(base, base, t, true)
            .into_iter()
            .filter(|&(a, b)| !skip(a) && !skip(b))
            .collect();
        let g: Vec<(u32, u32)> = got.iter().map(|p| (p.a, p.b)).collect();
        assert!(g.iter().all(|&(a, b)| a < b && !skip(a) && !skip(b)));
        assert!(g.windows(2).all(|w| w[0] < w[1]));
        let diff: Vec<_> = g
            .iter()
            .filter(|x| !exp.contains(x))
            .chain(exp.iter().filter(|x| !g.contains(x)))
            .collect();
        assert!(
            diff.iter().all(|&&(x, y)| near(base, x, base, y)),
            "{diff:?}"
        );
        assert!(exp.len() > 100);
    }

    #[test]
    fn streaming_join_is_ordered_and_can_stop() {
        let dim = 4;
        let b = data(2600, dim, 4, 9); // 6 bands = 2 groups: at least 2 sink calls
        let base = RowsF32::dense(&b, dim).unwrap();
        let full = self_join(base, 0.9, None).unwrap();
        let mut streamed = Vec::new();
        let mut calls = 0;
        let st = self_join_with(base, 0.9, None, &mut |p: &[Pair]| {
            calls += 1;
            streamed.extend_from_slice(p);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(streamed, full);
        assert!(calls > 1);
        assert_eq!(st.pairs as usize, full.len());
        let mut first = 0;
        let st = self_join_with(base, 0.9, None, &mut |p: &[Pair]| {
            first = p.len();
            ControlFlow::Break(())
        })
        .unwrap();
        assert!(st.stopped);
        assert!(first > 0 && first < full.len());
        assert!(self_join(base, f32::NAN, None).is_err());
    }

    #[test]
    fn join_is_deterministic_across_thread_counts() {
        let dim = 16;
        let b = data(2100, dim, dim, 11);
        let base = RowsF32::dense(&b, dim).unwrap();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| self_join(base, 0.5, None).unwrap())
        };
        let one = run(1);
        let three = run(3);
        assert!(!one.is_empty());
        assert_eq!(one.len(), three.len());
        assert!(
            one.iter()
                .zip(&three)
                .all(|(x, y)| x.a == y.a && x.b == y.b && x.score.to_bits() == y.score.to_bits())
        );
    }
}
