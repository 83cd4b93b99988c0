//! IVF threshold join: a sub-quadratic candidate generator for deduplication, with exact f32 scores.
//!
//! (Design notes and measurements: see the end of this comment.)
//!
//! # Structure
//! - **Centroids**: spherical k-means (Lloyd iterations on a seeded sample, centroids re-normalised).
//! - **Per row**: its `probes` best lists by centroid similarity (ranked), of which the first `home`
//!   (1 ≤ home ≤ `assign`, the margin rule: rank r < `assign` is a home list if its similarity is within
//!   `margin` of the best) are lists the row is a *member* of. Absent rows have no lists at all. With
//!   `wide_share > 0`, the rows the partition serves worst probe `wide_probes` lists. The per-row table is CSR
//!   (offsets + one flat array), so wide rows cost only their own lists.
//! - **Centring** (optional, `centre`): lists are cells of `x − mean` (mean of the training sample); a row's
//!   list score is `centroid · x − centroid · mean`, so assignment stays one GEMM.
//! - **Per list**: its members (rows with the list among their homes) and its visitors (rows with the
//!   list among their probes — with `one_way`, only lists with an id ≥ the row's home), both sorted by row
//!   id, plus each visitor's home beside it. Derived from the per-row table; not saved.
//!
//! # Join
//! For every list `j`, a blocked GEMM (faer, `Par::Seq`, rayon across lists) of its visitors × its members.
//! A pair `{x, y}` is a candidate iff some list is visited by one and a home of the other. A pair seen
//! several times is reported only by its canonical discovery, the lexicographically smallest
//! (list, visitor row) among all discoveries, which each worker decides locally from the per-row table:
//! no global dedup is needed. Candidates whose GEMM score is ≥ `t − 1e-3` are rescored with
//! [`crate::kernels::dot_f32`] and kept iff that exact score is ≥ `t`; reported scores are therefore
//! bit-identical to `dot_f32`. Output is sorted by (a, b), a < b.
//!
//! `self_join_rows(probes, t)` returns only pairs whose larger row is in `probes`: per list, visitors
//! in the range × members below its end, plus visitors below its start × members in the range. Tiles
//! of a partition of `0..rows` together do exactly the work of one full join, so a dedup can be run
//! (and resumed) range by range with memory bounded by one range's pairs.
//!
//! # Determinism
//! Sampling uses a seeded SplitMix64; k-means sums run in sample order; every GEMM tile has a fixed
//! shape; top-p selection breaks ties by list id. Results do not depend on the thread count.
//!
//! # Why this design, and what it costs (measured)
//! Per-row asymmetric probing (visitor × member GEMM blocks) keeps every score a GEMM product and needs
//! no global dedup. Recall vs the exact join, release build, 2 shared (loaded) cores, d = 512, auto lists
//! (2·√N = 283 at 20 k), `PACHA_IVF_N=20000 PACHA_IVF_PROBES=p cargo test --release -p pacha-index
//! --test ivf_recall -- --ignored --nocapture scale` (products/N² = share of ordered pairs scored):
//!
//! | probes | products/N² | structured t=.35 | iso mates@.7 | iso mates@.5 t=.35 / .45 | join s (exact s) |
//! |---|---|---|---|---|---|
//! | 16 | 0.06–0.08 | 0.983 | 1.000 | 0.885 / 0.889 | 0.5–0.7 (3.0–3.4) |
//! | 48 | 0.17–0.21 | 0.99999 | 1.000 | 0.995 / 1.000 | 1.3–3.9 (4.1–6.7) |
//! | 96 | 0.34–0.37 | 1.000 | 1.000 | 1.000 / 1.000 | 3.9–7.1 (4.4–6.7) |
//!
//! At 100 k, isotropic mates@0.5, 16 probes of 632 lists: recall 0.67 (t=.35) / 0.69 (t=.45), join 5–11 s,
//! exact 130–140 s (machine shared). **Limitation**: on isotropic 512-d data, pairs near cos 0.45 are
//! barely separable from cos 0 by any partition (a Gaussian model of centroid scores predicts the same);
//! recall 0.999 there costs a large share of all pairs, and small lists make the GEMMs less efficient
//! than the exact join's, so IVF does not beat the exact join for that preset. Structured data and
//! mates at cos ≥ 0.6 are where this index pays off. Defaults: 48 probes.

use std::io::Write;
use std::ops::Range;
use std::path::Path;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

mod probe;
pub use probe::{ProbeRule, Reach};

use crate::IndexError;
use crate::kernels::{dot_f32, dot_i8, prefetch_row};
use crate::quant::code_error_bound;
use crate::rng::SplitMix;
use crate::sketch::{
    FILTER_CLASSES, PackedBlock, Sketches, StagedCut, filter_packed, filter_packed_classed, hamming,
};
use crate::view::{RowPager, RowsF32, RowsI8, stream_batches};

/// GEMM tile: rows of the visitor side.
const VIS_TILE: usize = 512;
/// GEMM tile: rows of the member side.
const MEM_TILE: usize = 1024;
/// Rows assigned per GEMM block when assigning rows to centroids.
const ASSIGN_TILE: usize = 256;
/// Rows per streamed assignment batch (the granularity of [`Ivf::build_streaming`]'s `release`).
const ASSIGN_BATCH: usize = 1 << 16;
/// GEMM scores at least `t - SLACK` are rescored with `dot_f32` (GEMM and kernel differ by rounding only).
const SLACK: f32 = 1e-3;
/// File magic of a saved index.
const MAGIC: &[u8; 8] = b"PACHAIVF";
/// File format version.
const VERSION: u32 = 3;
/// Probe counts above this use selection ([`top_select`]) rather than insertion ([`top_p`]).
const SELECT_ABOVE: usize = 32;
/// Marker of "no list" in the padded per-row probe table of saved versions 1 and 2.
const NONE: u32 = u32::MAX;

/// Build parameters of an [`Ivf`].
#[derive(Clone, Debug, PartialEq)]
pub struct IvfParams {
    /// Number of lists; `None` = automatic from the number of present rows (see [`auto_lists`]).
    pub lists: Option<usize>,
    /// Maximum number of lists a row is a member of (≥ 1).
    pub assign: usize,
    /// A list of rank < `assign` is a home list if its centroid similarity is within `margin` of the best.
    pub margin: f32,
    /// Number of lists every row probes in the self-join (≥ `assign`).
    pub probes: usize,
    /// Rows sampled to train the centroids.
    pub train_sample: usize,
    /// Lloyd iterations.
    pub iterations: usize,
    /// Seed of the sampling.
    pub seed: u64,
    /// One-way visits (needs `assign == 1`): a row visits only those of its probe lists whose id is at least
    /// its home's. A pair within both rows' probes is then compared once, not twice (the canonical test
    /// dropped the second), so the join does about half the products for the same probes; a pair is found
    /// iff the home with the larger id is among the other row's probes.
    pub one_way: bool,
    /// Share of present rows (those whose best centroid similarity is lowest: noisy captures, sparse
    /// regions, where the partition serves a row worst) that probe `wide_probes` lists instead of `probes`.
    /// The similarity cut is the share's quantile on seeded rows held out of training, so the share is
    /// approximate.
    pub wide_share: f64,
    /// Probe lists of the wide rows (≥ `probes`; used only if `wide_share > 0`).
    pub wide_probes: usize,
    /// Partition the rows centred on their mean (estimated on the training sample): lists are cells of
    /// `x − mean` by cosine, against the hub lists that uncentred k-means grows near a population's common
    /// mean direction. Measured at 1 M rows (structured preset, face): 7 % fewer join products at the same
    /// recall, so not the default yet (the 10 M figures in BENCHMARKS.md are uncentred).
    pub centre: bool,
}

impl Default for IvfParams {
    fn default() -> Self {
        Self {
            lists: None,
            assign: 1,
            margin: 0.0,
            probes: 48,
            train_sample: 32_768,
            iterations: 6,
            seed: 0x5eed_51f0,
            one_way: false,
            wide_share: 0.0,
            wide_probes: 0,
            centre: false,
        }
    }
}

/// Automatic list count for `n` present rows: `2·√n`, at least 1 and at most `n`.
pub fn auto_lists(n: usize) -> usize {
    (((n as f64).sqrt() * 2.0).round() as usize).clamp(1, n.max(1))
}

/// An inverted-file partition of a base for threshold joins. Holds centroids and row ids, never vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct Ivf {
    dim: usize,
    rows: usize,
    lists: usize,
    probes: usize,
    /// `lists × dim`, unit-norm rows (directions of `x − mean`).
    centroids: Vec<f32>,
    /// The mean the rows are centred on (empty: not centred).
    mean: Vec<f32>,
    /// Per list, `centroid · mean`: a row's score for list j is `centroid_j · x − bias_j` (empty: not centred).
    bias: Vec<f32>,
    /// Per row: number of home lists (0 = absent row).
    home: Vec<u8>,
    /// CSR offsets into `probe` (len `rows + 1`).
    probe_off: Vec<usize>,
    /// Every row's probe lists, best first (none for absent rows; wide rows have more).
    probe: Vec<u32>,
    /// CSR offsets into `members` (len `lists + 1`).
    mem_off: Vec<usize>,
    /// Members of every list, ascending row ids.
    members: Vec<u32>,
    /// CSR offsets into `visitors` (len `lists + 1`).
    vis_off: Vec<usize>,
    /// Visitors of every list, ascending row ids.
    visitors: Vec<u32>,
    /// Parallel to `visitors`: each visitor's best (first home) list, so that the join's canonical test
    /// needs no random read of the visitor's probe table when every row has one home.
    vis_home: Vec<u32>,
    /// True iff every present row has exactly one home list (`assign == 1` or no margin ties).
    single_home: bool,
    /// One-way visits (see [`IvfParams::one_way`]).
    one_way: bool,
    /// Brute-force index ([`Ivf::brute`]): one list, a visitor is compared only with the members after it.
    triangle: bool,
}

/// The i8 first stage of a sketched join's rescoring: the base's codes (same rows) and their
/// [`crate::quant::l1_bounds`].
#[derive(Clone, Copy, Debug)]
pub struct QuantStage<'a> {
    codes: RowsI8<'a>,
    l1: &'a [f32],
}

impl<'a> QuantStage<'a> {
    /// Pairs codes with their L1 bounds; errors if the bounds do not cover every row.
    pub fn new(codes: RowsI8<'a>, l1: &'a [f32]) -> Result<Self, IndexError> {
        if l1.len() != codes.rows() {
            return Err(IndexError::Shape(format!(
                "{} L1 bounds for {} rows of codes",
                l1.len(),
                codes.rows()
            )));
        }
        Ok(Self { codes, l1 })
    }
}

/// A joined pair `(a, b, exact score)`, `a < b`.
pub type JoinPair = (u32, u32, f32);

/// Most pair classes a sketched join takes ([`JoinCuts`]).
pub const MAX_JOIN_CLASSES: usize = FILTER_CLASSES;

/// The thresholds of a sketched join: a rescoring threshold and a sketch cut for every pair, or one per
/// class of pairs, where each row has a class and a pair belongs to the lower of its two rows' classes
/// (quality bands: a pair is scored in the band of its poorer template, so the band of the lower quality
/// is the lower band). A pair of class `c` passes iff its sketches pass `classes[c].1` and its exact score
/// reaches `classes[c].0`.
#[derive(Clone, Copy, Debug)]
pub struct JoinCuts<'a> {
    /// Per base row, its class; empty with one class.
    pub row_class: &'a [u8],
    /// Per class: its threshold `t` and staged sketch cut (every class with the same prefix words).
    pub classes: &'a [(f32, StagedCut)],
}

impl<'a> JoinCuts<'a> {
    /// One threshold and cut for every pair.
    pub fn uniform(class: &'a (f32, StagedCut)) -> JoinCuts<'a> {
        JoinCuts {
            row_class: &[],
            classes: std::slice::from_ref(class),
        }
    }

    /// The lowest threshold of any class (the join's rescoring floor).
    pub fn min_t(&self) -> f32 {
        self.classes
            .iter()
            .map(|c| c.0)
            .fold(f32::INFINITY, f32::min)
    }

    /// The class of row `r` (0 with one class).
    fn of(&self, r: u32) -> usize {
        if self.classes.len() == 1 {
            0
        } else {
            usize::from(self.row_class[r as usize])
        }
    }

    /// Errors unless the classes are 1 to [`MAX_JOIN_CLASSES`], share one prefix, have no NaN threshold,
    /// and (with more than one) every one of `rows` rows has a class among them.
    fn check(&self, rows: usize) -> Result<(), IndexError> {
        let n = self.classes.len();
        if n == 0 || n > MAX_JOIN_CLASSES {
            return Err(IndexError::Shape(format!(
                "{n} join classes (1 to {MAX_JOIN_CLASSES})"
            )));
        }
        if self.classes.iter().any(|c| c.0.is_nan()) {
            return Err(IndexError::Shape("threshold is NaN".into()));
        }
        if self
            .classes
            .iter()
            .any(|c| c.1.prefix_words != self.classes[0].1.prefix_words)
        {
            return Err(IndexError::Shape(
                "join classes differ in their sketch prefix".into(),
            ));
        }
        if n > 1 {
            if self.row_class.len() != rows {
                return Err(IndexError::Shape(format!(
                    "{} row classes for {rows} rows",
                    self.row_class.len()
                )));
            }
            if let Some(r) = self.row_class.iter().position(|&c| usize::from(c) >= n) {
                return Err(IndexError::Shape(format!(
                    "row {r} has class {} of {n}",
                    self.row_class[r]
                )));
            }
        }
        Ok(())
    }
}

/// Work counters of a sketched join (per-stage pair counts, for benchmarks and run summaries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinStats {
    /// Visitor × member products compared by sketch (in the one-list triangle, those with visitor < member:
    /// the count is then the same however the rows are blocked or tiled).
    pub products: u64,
    /// Products within the sketch cut (counted like `products`).
    pub sketch_pass: u64,
    /// Canonical discoveries rescored (by the i8 stage if the join has one, else with `dot_f32`).
    pub rescored: u64,
    /// Rescorings read in f32 and scored with `dot_f32`: all of them without an i8 stage, else only those
    /// the i8 stage's error bound could not reject.
    #[serde(default)]
    pub exact_reads: u64,
    /// Rescored pairs whose exact score reached the join threshold.
    pub above: u64,
}

impl JoinStats {
    /// Field-wise sum.
    pub fn add(&self, o: &JoinStats) -> JoinStats {
        JoinStats {
            products: self.products + o.products,
            sketch_pass: self.sketch_pass + o.sketch_pass,
            rescored: self.rescored + o.rescored,
            exact_reads: self.exact_reads + o.exact_reads,
            above: self.above + o.above,
        }
    }
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

/// The first of `ids` (rows gathered into `rows`, `d` values each) holding NaN or infinity, as an error.
fn check_finite(rows: &[f32], ids: &[u32], d: usize) -> Result<(), IndexError> {
    match rows
        .chunks_exact(d)
        .zip(ids)
        .find(|(r, _)| r.iter().any(|x| !x.is_finite()))
    {
        Some((_, &id)) => Err(IndexError::InvalidVector {
            id: id as usize,
            problem: "NaN or infinity".into(),
        }),
        None => Ok(()),
    }
}

/// Centres every row of `rows` (`d` values each) on `mean` and re-normalises it; no-op if `mean` is empty.
fn centre_rows(rows: &mut [f32], mean: &[f32], d: usize) {
    if mean.is_empty() {
        return;
    }
    for r in rows.chunks_exact_mut(d) {
        for (x, &m) in r.iter_mut().zip(mean) {
            *x -= m;
        }
        normalise(r);
    }
}

/// Per list, `centroid · mean` (the centred score's offset); empty if `mean` is (not centred).
fn list_biases(centroids: &[f32], mean: &[f32], d: usize) -> Vec<f32> {
    if mean.is_empty() {
        return Vec::new();
    }
    centroids
        .chunks_exact(d)
        .map(|cj| dot_f32(cj, mean))
        .collect()
}

/// One assignment tile's output: per row its home count and probe count, and the probe lists in a row.
#[derive(Default)]
struct AssignedChunk {
    homes: Vec<u8>,
    counts: Vec<usize>,
    lists: Vec<u32>,
}

/// A per-row table: each row's number of home lists (0 = absent row) and its probe lists, best first
/// (CSR offsets, `rows + 1` of them, into one flat array).
struct ProbeTable {
    home: Vec<u8>,
    probe_off: Vec<usize>,
    probe: Vec<u32>,
}

/// Scores of `n` dense rows (`n × d`) for each of the `c` unit `centroids` (`out`, `n × c`): their cosines,
/// of the rows centred on `mean` when it is not empty (`bias[j] = centroid_j · mean`).
#[allow(clippy::too_many_arguments)]
fn score_against(
    rows: &[f32],
    n: usize,
    centroids: &[f32],
    c: usize,
    d: usize,
    mean: &[f32],
    bias: &[f32],
    out: &mut Vec<f32>,
) {
    gemm(rows, n, centroids, c, d, out);
    if mean.is_empty() {
        return;
    }
    let mm = dot_f32(mean, mean);
    for i in 0..n {
        let x = &rows[i * d..(i + 1) * d];
        let (xx, xm) = (dot_f32(x, x), dot_f32(x, mean));
        let norm = (xx - 2.0 * xm + mm).max(0.0).sqrt();
        let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        for (v, &b) in out[i * c..(i + 1) * c].iter_mut().zip(bias) {
            *v = (*v - b) * inv;
        }
    }
}

/// Fills a tile's list scores from its dense rows: `(rows, row count, out)`.
type ScoreFn<'a> = dyn Fn(&[f32], usize, &mut Vec<f32>) + Sync + 'a;
/// Puts a row's probe lists (best first) in `top` from its list scores; returns its number of homes.
type PickFn<'a> = dyn Fn(&[f32], &mut Vec<(f32, u32)>) -> u8 + Sync + 'a;

/// Assigns every row of `ids` (ascending) of `base` in streamed batches announced to and released from
/// `pager`: `score` fills a tile's list scores (`rows × lists`, from the tile's dense rows), `pick` puts a
/// row's probe lists in `top` (best first) and returns its number of homes. Rows are checked finite as
/// they are read. Rows not in `ids` get no lists.
fn assign_streaming(
    base: RowsF32<'_>,
    ids: &[u32],
    lists: usize,
    pager: &dyn RowPager,
    score: &ScoreFn<'_>,
    pick: &PickFn<'_>,
) -> Result<ProbeTable, IndexError> {
    let (n, d, c) = (base.rows(), base.dim(), lists);
    let mut home = vec![0u8; n];
    let mut probe_off = vec![0usize; n + 1];
    let mut probe: Vec<u32> = Vec::new();
    stream_batches(
        ids,
        ASSIGN_BATCH,
        |i| i as usize,
        pager,
        |_, batch| {
            let chunks: Vec<&[u32]> = batch.chunks(ASSIGN_TILE).collect();
            let results: Vec<Result<AssignedChunk, IndexError>> = chunks
                .par_iter()
                .map_init(
                    || (Vec::new(), Vec::new(), Vec::new()),
                    |(rows, buf, top), chunk| {
                        gather(base, chunk, rows);
                        check_finite(rows, chunk, d)?;
                        score(rows, chunk.len(), buf);
                        let mut out = AssignedChunk::default();
                        for i in 0..chunk.len() {
                            let h = pick(&buf[i * c..(i + 1) * c], top);
                            out.homes.push(h);
                            out.counts.push(top.len());
                            out.lists.extend(top.iter().map(|t| t.1));
                        }
                        Ok(out)
                    },
                )
                .collect();
            for (chunk, res) in chunks.iter().zip(results) {
                let res = res?;
                for ((&i, &h), &k) in chunk.iter().zip(&res.homes).zip(&res.counts) {
                    home[i as usize] = h;
                    probe_off[i as usize + 1] = k;
                }
                probe.extend_from_slice(&res.lists);
            }
            Ok(())
        },
    )?;
    for i in 0..n {
        probe_off[i + 1] += probe_off[i];
    }
    probe.shrink_to_fit();
    Ok(ProbeTable {
        home,
        probe_off,
        probe,
    })
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

fn normalise(v: &mut [f32]) -> bool {
    let n: f64 = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if n > 0.0 && n.is_finite() {
        for x in v.iter_mut() {
            *x = (f64::from(*x) / n) as f32;
        }
        true
    } else {
        false
    }
}

/// Keeps the `k` best (score desc, id asc) of `scores` in `top` (sorted best first).
fn top_p(scores: &[f32], k: usize, top: &mut Vec<(f32, u32)>) {
    top.clear();
    for (j, &s) in scores.iter().enumerate() {
        if top.len() == k {
            match top.last() {
                Some(&(ws, _)) if s > ws => {}
                _ => continue,
            }
            top.pop();
        }
        // Insert keeping (score desc, id asc); equal scores keep the earlier (smaller) id first.
        let pos = top.partition_point(|&(ts, _)| ts >= s);
        top.insert(pos, (s, j as u32));
    }
}

/// The `k` best of `scores` as (score, list), by (score desc, list asc): [`top_p`]'s order, by selection
/// (for large `k`, where insertion would cost `k` per accepted score).
fn top_select(scores: &[f32], k: usize, top: &mut Vec<(f32, u32)>) {
    top.clear();
    if k == 0 {
        return;
    }
    // The k-th largest score by selection on a copy of the bare scores, then only the entries at or
    // above it are paired with their ids and sorted (ties at the cut may add a few; truncation drops them).
    let cut = if k < scores.len() {
        let mut v = scores.to_vec();
        let (_, kth, _) = v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        Some(*kth)
    } else {
        None
    };
    top.extend(
        scores
            .iter()
            .enumerate()
            .filter(|(_, s)| cut.is_none_or(|c| s.total_cmp(&c).is_ge()))
            .map(|(j, &s)| (s, j as u32)),
    );
    top.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    top.truncate(k);
}

/// Per sample row: index of the best centroid and its score.
fn assign_best(sample: &[f32], s: usize, cents: &[f32], c: usize, d: usize) -> Vec<(u32, f32)> {
    let blocks: Vec<Vec<(u32, f32)>> = (0..s.div_ceil(ASSIGN_TILE))
        .into_par_iter()
        .map_init(Vec::new, |buf, b| {
            let r0 = b * ASSIGN_TILE;
            let r1 = (r0 + ASSIGN_TILE).min(s);
            let m = r1 - r0;
            gemm(&sample[r0 * d..r1 * d], m, cents, c, d, buf);
            (0..m)
                .map(|i| {
                    let row = &buf[i * c..(i + 1) * c];
                    let mut best = (0u32, f32::NEG_INFINITY);
                    for (j, &v) in row.iter().enumerate() {
                        if v > best.1 {
                            best = (j as u32, v);
                        }
                    }
                    best
                })
                .collect()
        })
        .collect();
    blocks.into_iter().flatten().collect()
}

fn check_base(base: &RowsF32<'_>) -> Result<(), IndexError> {
    if base.rows() > u32::MAX as usize {
        return Err(IndexError::Shape(format!(
            "{} rows exceed the u32 row-id range",
            base.rows()
        )));
    }
    Ok(())
}

impl Ivf {
    /// Trains centroids on a sample of the present rows and assigns every present row to its lists.
    pub fn build(
        base: RowsF32<'_>,
        present: &(dyn Fn(usize) -> bool + Sync),
        params: &IvfParams,
    ) -> Result<Ivf, IndexError> {
        Self::build_streaming(base, present, params, &())
    }

    /// [`Ivf::build`] that tells `pager` which rows it reads next and which it has read for the last time
    /// (the assignment runs in ascending batches), so that a caller whose base is a file mapping can
    /// prefetch those pages and drop them from its resident set: the build then streams a base larger than
    /// RAM with bounded memory. Rows of the training samples are read first and released as a whole range
    /// `0..n`.
    pub fn build_streaming(
        base: RowsF32<'_>,
        present: &(dyn Fn(usize) -> bool + Sync),
        params: &IvfParams,
        pager: &dyn RowPager,
    ) -> Result<Ivf, IndexError> {
        check_base(&base)?;
        if params.assign == 0 || params.assign > 255 {
            return Err(IndexError::Shape(format!(
                "assign {} not in 1..=255",
                params.assign
            )));
        }
        if params.one_way && params.assign != 1 {
            return Err(IndexError::Shape(format!(
                "one-way visits need assign 1, not {}",
                params.assign
            )));
        }
        if params.probes < params.assign {
            return Err(IndexError::Shape(format!(
                "probes {} < assign {}",
                params.probes, params.assign
            )));
        }
        if !(0.0..=1.0).contains(&params.wide_share) {
            return Err(IndexError::Shape(format!(
                "wide_share {} not in [0, 1]",
                params.wide_share
            )));
        }
        if params.margin.is_nan() || params.margin < 0.0 {
            return Err(IndexError::Shape(format!(
                "margin {} is not ≥ 0",
                params.margin
            )));
        }
        let (n, d) = (base.rows(), base.dim());
        let ids: Vec<u32> = (0..n).filter(|&i| present(i)).map(|i| i as u32).collect();
        let np = ids.len();
        let c = params
            .lists
            .unwrap_or_else(|| auto_lists(np))
            .clamp(1, np.max(1));
        let narrow = params.probes.min(c);
        let wide = params.wide_share > 0.0 && params.wide_probes > narrow;
        // The widest row (wide rows probe more lists than narrow ones).
        let probes = if wide {
            params.wide_probes.min(c)
        } else {
            narrow
        };
        let assign = params.assign.min(narrow);

        // Seeded sample of the present rows (partial Fisher–Yates).
        let mut rng = SplitMix(params.seed);
        let mut pool = ids.clone();
        let s = params.train_sample.max(c).min(np);
        rng.shuffle_prefix(&mut pool, s);
        let mut sample_ids = pool[..s].to_vec();
        sample_ids.sort_unstable();
        let mut sample = Vec::new();
        gather(base, &sample_ids, &mut sample);
        check_finite(&sample, &sample_ids, d)?;
        let mean: Vec<f32> = if params.centre && s > 0 {
            let mut acc = vec![0f64; d];
            for r in sample.chunks_exact(d) {
                for (a, &x) in acc.iter_mut().zip(r) {
                    *a += f64::from(x);
                }
            }
            acc.iter().map(|&a| (a / s as f64) as f32).collect()
        } else {
            Vec::new()
        };
        centre_rows(&mut sample, &mean, d);

        // Initial centroids: c distinct sample rows chosen by the seeded generator.
        let mut order: Vec<usize> = (0..s).collect();
        rng.shuffle_prefix(&mut order, c);
        let mut cents = vec![0.0f32; c * d];
        for (j, &r) in order.iter().take(c).enumerate() {
            cents[j * d..(j + 1) * d].copy_from_slice(&sample[r * d..(r + 1) * d]);
            normalise(&mut cents[j * d..(j + 1) * d]);
        }
        if np > 0 {
            for _ in 0..params.iterations {
                let best = assign_best(&sample, s, &cents, c, d);
                let mut sums = vec![0.0f64; c * d];
                let mut counts = vec![0usize; c];
                for (i, &(j, _)) in best.iter().enumerate() {
                    let j = j as usize;
                    counts[j] += 1;
                    for (acc, &x) in sums[j * d..(j + 1) * d]
                        .iter_mut()
                        .zip(&sample[i * d..(i + 1) * d])
                    {
                        *acc += f64::from(x);
                    }
                }
                // Lists left empty are re-seeded by splitting the largest lists: each takes a member of the
                // largest list not yet split this iteration (its sample row at the median similarity), and
                // the next iteration shares that list's rows between the two (before, they took the sample
                // rows worst served by their centroid: outliers). Splitting also the lists under a quarter of
                // the mean size was tried at 1 M rows (structured preset): no better balance, 7 % more
                // products, so it is not done.
                let mut donors: Vec<usize> = (0..c).filter(|&j| counts[j] >= 2).collect();
                donors.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
                let mut donors = donors.into_iter();
                let mut members: Vec<Vec<usize>> = Vec::new();
                for j in 0..c {
                    let cj = &mut cents[j * d..(j + 1) * d];
                    let ok = counts[j] > 0 && {
                        for (x, &acc) in cj.iter_mut().zip(&sums[j * d..(j + 1) * d]) {
                            *x = acc as f32;
                        }
                        normalise(cj)
                    };
                    if ok {
                        continue;
                    }
                    if members.is_empty() {
                        members = vec![Vec::new(); c];
                        for (i, &(l, _)) in best.iter().enumerate() {
                            members[l as usize].push(i);
                        }
                    }
                    let Some(donor) = donors.next() else {
                        continue;
                    };
                    let mut rows = members[donor].clone();
                    rows.sort_by(|&a, &b| best[a].1.total_cmp(&best[b].1).then(a.cmp(&b)));
                    if let Some(&r) = rows.get(rows.len() / 2) {
                        let cj = &mut cents[j * d..(j + 1) * d];
                        cj.copy_from_slice(&sample[r * d..(r + 1) * d]);
                        normalise(cj);
                    }
                }
            }
        }
        // Wide rows: best centroid similarity below the `wide_share` quantile, estimated on up to
        // `train_sample` seeded rows held out of training (training rows sit closer to the centroids fitted
        // on them), so each row is decided as it is assigned.
        let wide_below = if wide && np > 0 {
            let held: Vec<u32> = if np > s {
                // A second seeded sample, of the rows left out of the training sample.
                let mut rest = pool[s..].to_vec();
                let h = s.min(rest.len());
                SplitMix(params.seed ^ 0x0000_ff5e_ed0f_4e1d).shuffle_prefix(&mut rest, h);
                rest.truncate(h);
                rest.sort_unstable();
                rest
            } else {
                sample_ids.clone()
            };
            let mut rows = Vec::new();
            gather(base, &held, &mut rows);
            centre_rows(&mut rows, &mean, d);
            let mut bests: Vec<f32> = assign_best(&rows, held.len(), &cents, c, d)
                .into_iter()
                .map(|b| b.1)
                .collect();
            bests.sort_by(f32::total_cmp);
            let k = ((bests.len() as f64) * params.wide_share).round() as usize;
            bests
                .get(k.min(bests.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f32::NEG_INFINITY)
        } else {
            f32::NEG_INFINITY
        };
        drop(sample);

        let bias = list_biases(&cents, &mean, d);
        // The samples' scattered rows are read: let them go before the streamed assignment.
        pager.release(0..n);

        // Assign every present row: its probe lists, best first, and how many of them are homes.
        let table = assign_streaming(
            base,
            &ids,
            c,
            pager,
            &|rows, m, buf| score_against(rows, m, &cents, c, d, &mean, &bias, buf),
            &|scores, top| {
                // Insertion is cheaper for a few lists, selection for many.
                if narrow <= SELECT_ABOVE {
                    top_p(scores, narrow, top);
                } else {
                    top_select(scores, narrow, top);
                }
                let best = top.first().map_or(0.0, |t| t.0);
                if best < wide_below {
                    top_select(scores, probes, top);
                }
                top.iter()
                    .take(assign)
                    .enumerate()
                    .take_while(|(r, t)| *r == 0 || t.0 >= best - params.margin)
                    .count() as u8
            },
        )?;
        Ok(Ivf::assemble(
            d,
            c,
            probes,
            (cents, mean, bias),
            table,
            params.one_way,
            false,
        ))
    }

    /// An index from its partition (`(centroids, mean, bias)`, the last two empty when not centred) and
    /// per-row table, with the per-list tables derived. `probes`: the widest row's probe count.
    fn assemble(
        dim: usize,
        lists: usize,
        probes: usize,
        (centroids, mean, bias): (Vec<f32>, Vec<f32>, Vec<f32>),
        table: ProbeTable,
        one_way: bool,
        triangle: bool,
    ) -> Ivf {
        let mut ivf = Ivf {
            dim,
            rows: table.home.len(),
            lists,
            probes,
            centroids,
            mean,
            bias,
            home: table.home,
            probe_off: table.probe_off,
            probe: table.probe,
            mem_off: Vec::new(),
            members: Vec::new(),
            vis_off: Vec::new(),
            visitors: Vec::new(),
            vis_home: Vec::new(),
            single_home: true,
            one_way,
            triangle,
        };
        ivf.derive_lists();
        ivf
    }

    /// Builds the per-list member and visitor CSR tables from the per-row table.
    fn derive_lists(&mut self) {
        let c = self.lists;
        let mut mcount = vec![0usize; c + 1];
        let mut vcount = vec![0usize; c + 1];
        for i in 0..self.rows {
            let h = self.home[i] as usize;
            if h == 0 {
                continue;
            }
            let lists = self.row_lists(i as u32).0;
            let Some(&best) = lists.first() else {
                continue;
            };
            for (r, &j) in lists.iter().enumerate() {
                if !self.one_way || j >= best {
                    vcount[j as usize + 1] += 1;
                }
                if r < h {
                    mcount[j as usize + 1] += 1;
                }
            }
        }
        for j in 0..c {
            mcount[j + 1] += mcount[j];
            vcount[j + 1] += vcount[j];
        }
        let mut members = vec![0u32; mcount[c]];
        let mut visitors = vec![0u32; vcount[c]];
        let mut vis_home = vec![0u32; vcount[c]];
        let (mut mpos, mut vpos) = (mcount.clone(), vcount.clone());
        for i in 0..self.rows {
            let h = self.home[i] as usize;
            if h == 0 {
                continue;
            }
            let lists = self.row_lists(i as u32).0;
            let Some(&best) = lists.first() else {
                continue;
            };
            for (r, &j) in lists.iter().enumerate() {
                let j = j as usize;
                if !self.one_way || j >= best as usize {
                    visitors[vpos[j]] = i as u32;
                    vis_home[vpos[j]] = best;
                    vpos[j] += 1;
                }
                if r < h {
                    members[mpos[j]] = i as u32;
                    mpos[j] += 1;
                }
            }
        }
        self.mem_off = mcount;
        self.members = members;
        self.vis_off = vcount;
        self.visitors = visitors;
        self.vis_home = vis_home;
        self.single_home = self.home.iter().all(|&h| h <= 1);
    }

    /// Number of rows of the base the index was built on.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of lists.
    pub fn lists(&self) -> usize {
        self.lists
    }
    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Members of list `j` (ascending row ids); empty if `j` is out of range.
    pub fn members(&self, j: usize) -> &[u32] {
        if j >= self.lists {
            return &[];
        }
        &self.members[self.mem_off[j]..self.mem_off[j + 1]]
    }
    /// Visitors of list `j` (rows probing it, ascending); empty if `j` is out of range.
    fn visitors(&self, j: usize) -> &[u32] {
        &self.visitors[self.vis_off[j]..self.vis_off[j + 1]]
    }
    /// Row or query `x`'s score for list `j` (its ranking key: the centred cosine up to a per-row factor).
    fn list_score(&self, x: &[f32], j: usize) -> f32 {
        let s = dot_f32(x, &self.centroids[j * self.dim..(j + 1) * self.dim]);
        self.bias.get(j).map_or(s, |b| s - b)
    }

    /// Per list: its number of members and of visitors (for balance analyses: the join's products are
    /// their products, summed).
    pub fn list_sizes(&self) -> Vec<(usize, usize)> {
        (0..self.lists)
            .map(|j| (self.members(j).len(), self.visitors(j).len()))
            .collect()
    }
    /// Candidate pairs the self-join scores (ordered visitor × member products, before dedup).
    pub fn candidate_products(&self) -> u64 {
        (0..self.lists)
            .map(|j| self.members(j).len() as u64 * self.visitors(j).len() as u64)
            .sum()
    }

    /// Row `i`'s probe lists (ranked; empty for absent rows) and its
    /// number of homes.
    fn row_lists(&self, i: u32) -> (&[u32], usize) {
        let i = i as usize;
        (
            &self.probe[self.probe_off[i]..self.probe_off[i + 1]],
            self.home[i] as usize,
        )
    }

    /// True iff (list `j`, visitor `x`) is the smallest discovery of the pair `{x, y}` (y a member of j).
    fn canonical(&self, j: u32, x: u32, y: u32) -> bool {
        if self.single_home {
            return self.canonical_single(j, x, self.probe[self.probe_off[x as usize]], y);
        }
        let (px, hx) = self.row_lists(x);
        let (py, hy) = self.row_lists(y);
        let me = (j, x);
        // Discoveries with x visiting a home of y.
        for &l in &py[..hy] {
            if (l, x) < me && px.contains(&l) {
                return false;
            }
        }
        // Discoveries with y visiting a home of x.
        for &l in &px[..hx] {
            if (l, y) < me && py.contains(&l) {
                return false;
            }
        }
        true
    }

    /// [`Ivf::canonical`] with the visitor's probe lists as a bitset (`xbits`, over list ids): one scan of
    /// `y`'s probe lists instead of two.
    fn canonical_with(&self, xbits: &[u64], j: u32, x: u32, y: u32) -> bool {
        let (px, hx) = self.row_lists(x);
        let (py, hy) = self.row_lists(y);
        let me = (j, x);
        let in_x = |l: u32| xbits[l as usize / 64] >> (l % 64) & 1 == 1;
        for &l in &py[..hy] {
            if (l, x) < me && in_x(l) {
                return false;
            }
        }
        for &l in &px[..hx] {
            if (l, y) < me && py.contains(&l) {
                return false;
            }
        }
        true
    }

    /// [`Ivf::canonical`] when every row has one home: `y`'s home is `j`, `x`'s is `hx`, so the only other
    /// discovery is (`hx`, `y`), which exists iff `hx` is among `y`'s probes (read only when it would win).
    /// With one-way visits, `y` visits `hx` only if `hx ≥ j`, and `x` visited `j` so `j ≥ hx`: two
    /// discoveries only within one list, no probe table read at all.
    fn canonical_single(&self, j: u32, x: u32, hx: u32, y: u32) -> bool {
        if self.one_way {
            return hx != j || x < y;
        }
        !((hx, y) < (j, x) && self.row_lists(y).0.contains(&hx))
    }

    fn check(&self, base: &RowsF32<'_>, t: f32) -> Result<(), IndexError> {
        if base.dim() != self.dim {
            return Err(IndexError::Dim {
                expected: self.dim,
                got: base.dim(),
            });
        }
        if base.rows() != self.rows {
            return Err(IndexError::Shape(format!(
                "base has {} rows, the index was built on {}",
                base.rows(),
                self.rows
            )));
        }
        if t.is_nan() {
            return Err(IndexError::Shape("threshold is NaN".into()));
        }
        Ok(())
    }

    /// All pairs `a < b` with exact score (`dot_f32`) ≥ `t` among the candidates. Emitted range by range
    /// of the larger row `b` (ranges of 2¹⁸ rows), sorted by (a, b) within a range: globally (a, b) order
    /// for bases up to 262,144 rows.
    pub fn self_join(
        &self,
        base: RowsF32<'_>,
        t: f32,
        sink: &mut dyn FnMut(u32, u32, f32),
    ) -> Result<(), IndexError> {
        self.check(&base, t)?;
        // Bound memory by joining in row ranges; one range does the same work as part of the full join.
        const RANGE: usize = 1 << 18;
        let mut lo = 0;
        while lo < self.rows {
            let hi = (lo + RANGE).min(self.rows);
            for (a, b, s) in self.self_join_rows(base, lo..hi, t)? {
                sink(a, b, s);
            }
            lo = hi;
        }
        Ok(())
    }

    /// Pairs `a < b` (exact score ≥ `t`) whose larger row `b` is in `probes`, sorted by (a, b).
    pub fn self_join_rows(
        &self,
        base: RowsF32<'_>,
        probes: Range<usize>,
        t: f32,
    ) -> Result<Vec<(u32, u32, f32)>, IndexError> {
        self.check(&base, t)?;
        let (lo, hi) = (probes.start.min(self.rows), probes.end.min(self.rows));
        if lo >= hi {
            return Ok(Vec::new());
        }
        let units = self.units(lo, hi);
        let d = self.dim;
        let mut pairs: Vec<(u32, u32, f32)> = units
            .par_iter()
            .map_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(va, ma, buf), (j, vr, mc)| {
                    let (j, vc, mc) = (*j, &self.visitors[vr.clone()], *mc);
                    gather(base, vc, va);
                    gather(base, mc, ma);
                    gemm(va, vc.len(), ma, mc.len(), d, buf);
                    let mut out = Vec::new();
                    for (i, &x) in vc.iter().enumerate() {
                        let row = &buf[i * mc.len()..(i + 1) * mc.len()];
                        for (k, &s) in row.iter().enumerate() {
                            let y = mc[k];
                            if s < t - SLACK || x == y || !self.canonical(j, x, y) {
                                continue;
                            }
                            let (a, b) = if x < y { (x, y) } else { (y, x) };
                            let exact = dot_f32(base.row(a as usize), base.row(b as usize));
                            if exact >= t {
                                out.push((a, b, exact));
                            }
                        }
                    }
                    out
                },
            )
            .flatten()
            .collect();
        pairs.sort_unstable_by_key(|p| (p.0, p.1));
        Ok(pairs)
    }

    /// Work units of the rows-`lo..hi` join: (list, visitor range as indices into `self.visitors`, member
    /// slice), tiled. Per list, visitors in the range × members below `hi`, and visitors below `lo` × members
    /// in the range.
    fn units(&self, lo: usize, hi: usize) -> Vec<(u32, Range<usize>, &[u32])> {
        let (lo32, hi32) = (lo as u32, hi as u32);
        let mut units: Vec<(u32, Range<usize>, &[u32])> = Vec::new();
        for j in 0..self.lists {
            let off = self.vis_off[j];
            let vis = self.visitors(j);
            let mem = self.members(j);
            let (v_lo, v_hi) = (
                vis.partition_point(|&x| x < lo32),
                vis.partition_point(|&x| x < hi32),
            );
            let (m_lo, m_hi) = (
                mem.partition_point(|&x| x < lo32),
                mem.partition_point(|&x| x < hi32),
            );
            if self.triangle {
                // One list, each pair once: every member chunk in range × the visitors before its last member
                // (the canonical test keeps visitor < member).
                for mc in mem[m_lo..m_hi].chunks(MEM_TILE) {
                    let Some(&last) = mc.last() else { continue };
                    let v_end = vis.partition_point(|&x| x < last);
                    for vs in (0..v_end).step_by(VIS_TILE) {
                        units.push((j as u32, off + vs..off + (vs + VIS_TILE).min(v_end), mc));
                    }
                }
                continue;
            }
            // Visitors in range × members below hi; visitors below lo × members in range.
            for (v, m) in [(v_lo..v_hi, &mem[..m_hi]), (0..v_lo, &mem[m_lo..m_hi])] {
                if v.is_empty() || m.is_empty() {
                    continue;
                }
                for vs in v.clone().step_by(VIS_TILE) {
                    let ve = (vs + VIS_TILE).min(v.end);
                    for mc in m.chunks(MEM_TILE) {
                        units.push((j as u32, off + vs..off + ve, mc));
                    }
                }
            }
        }
        units
    }

    /// Like [`Ivf::self_join_rows`], but every visitor × member product is first filtered by sign sketch:
    /// only pairs with Hamming distance ≤ `cut` (see [`crate::sketch`]) are rescored with `dot_f32`. `sketches`
    /// must hold the sketches of `base`'s rows. No f32 GEMM: a product costs one sketch comparison.
    pub fn self_join_rows_sketched(
        &self,
        base: RowsF32<'_>,
        sketches: &Sketches,
        probes: Range<usize>,
        t: f32,
        cut: StagedCut,
    ) -> Result<Vec<JoinPair>, IndexError> {
        let class = (t, cut);
        Ok(self
            .self_join_rows_sketched_with(
                base,
                sketches,
                None,
                probes,
                JoinCuts::uniform(&class),
                &|_, _, _| true,
            )?
            .0)
    }

    /// [`Ivf::self_join_rows_sketched`] with per-class thresholds and cuts ([`JoinCuts`]) and a verdict: a
    /// pair whose exact score reaches its class's `t` is kept only if `accept(a, b, score)` (e.g. a fused
    /// multi-modal score, computed inside the join so that candidates are never materialised). With several
    /// classes each member tile is packed with its members' classes and filtered in one call per visitor
    /// ([`filter_packed_classed`]), every product at its own pair's cut.
    /// With `quant`, survivors are first scored from their i8 codes, and read in f32
    /// only if the codes' error bound leaves the pair possibly at or above `t`: the result is the same, but
    /// the join's random reads go to the 4× smaller codes (a base larger than RAM then need not be resident).
    /// Also returns the join's work counters.
    #[allow(clippy::too_many_arguments)]
    pub fn self_join_rows_sketched_with(
        &self,
        base: RowsF32<'_>,
        sketches: &Sketches,
        quant: Option<QuantStage<'_>>,
        probes: Range<usize>,
        cuts: JoinCuts<'_>,
        accept: &(dyn Fn(u32, u32, f32) -> bool + Sync),
    ) -> Result<(Vec<JoinPair>, JoinStats), IndexError> {
        cuts.check(self.rows)?;
        self.check(&base, cuts.min_t())?;
        if sketches.rows() != self.rows {
            return Err(IndexError::Shape(format!(
                "{} sketches for an index of {} rows",
                sketches.rows(),
                self.rows
            )));
        }
        if let Some(q) = quant
            && (q.codes.rows() != self.rows || q.codes.dim() != self.dim)
        {
            return Err(IndexError::Shape(format!(
                "i8 codes of {} rows × {} for an index of {} rows × {}",
                q.codes.rows(),
                q.codes.dim(),
                self.rows,
                self.dim
            )));
        }
        let (lo, hi) = (probes.start.min(self.rows), probes.end.min(self.rows));
        if lo >= hi {
            return Ok((Vec::new(), JoinStats::default()));
        }
        let units = self.units(lo, hi);
        let words = sketches.words();
        let d = self.dim;
        // Starts loading the row a survivor is rescored from.
        let prefetch = |y: u32| match quant {
            Some(q) => prefetch_row(q.codes.row(y as usize)),
            None => prefetch_row(base.row(y as usize)),
        };
        let prefix = cuts.classes[0].1.prefix_words.clamp(1, words.max(1));
        let nc = cuts.classes.len();
        // Per visitor class, the prefix cut of each member class: a pair is cut at the lower class's.
        let tables: Vec<[u32; FILTER_CLASSES]> = (0..nc)
            .map(|cx| std::array::from_fn(|cy| cuts.classes[cx.min(cy).min(nc - 1)].1.prefix_cut))
            .collect();
        let (pairs, stats): (Vec<Vec<JoinPair>>, Vec<JoinStats>) = units
            .par_iter()
            .map_init(
                || {
                    (
                        PackedBlock::default(),
                        Vec::new(),
                        vec![0u64; self.lists.div_ceil(64)],
                        Vec::new(),
                    )
                },
                |(block, hits, xbits, surv), (j, vr, mc)| {
                    let (j, mc) = (*j, *mc);
                    let (vc, vh) = (&self.visitors[vr.clone()], &self.vis_home[vr.clone()]);
                    // The member tile packed once, each member with its class where there are several.
                    block.clear(prefix);
                    for &y in mc.iter() {
                        let sy = &sketches.row(y as usize)[..prefix];
                        if nc == 1 {
                            block.push(sy);
                        } else {
                            block.push_classed(sy, cuts.of(y) as u8);
                        }
                    }
                    let mut out = Vec::new();
                    // The triangle's units hold some visitor ≥ member products (cut by the canonical test);
                    // counting only visitor < member keeps the counters the same for any blocking of the rows.
                    let mut st = JoinStats {
                        products: if self.triangle {
                            mc.iter()
                                .map(|&y| vc.partition_point(|&x| x < y) as u64)
                                .sum()
                        } else {
                            (vc.len() * mc.len()) as u64
                        },
                        ..JoinStats::default()
                    };
                    for (i, (&x, &hx)) in vc.iter().zip(vh).enumerate() {
                        // Visitors' sketches are scattered rows: start loading the next one.
                        if let Some(&next) = vc.get(i + 1) {
                            prefetch_row(&sketches.row(next as usize)[..prefix]);
                        }
                        hits.clear();
                        let sx = sketches.row(x as usize);
                        let cx = cuts.of(x);
                        if nc == 1 {
                            filter_packed(&sx[..prefix], block, cuts.classes[0].1.prefix_cut, hits);
                        } else {
                            filter_packed_classed(&sx[..prefix], block, &tables[cx], hits);
                        }
                        if hits.is_empty() {
                            continue;
                        }
                        st.sketch_pass += if self.triangle {
                            hits.iter().filter(|&&k| mc[k as usize] > x).count() as u64
                        } else {
                            hits.len() as u64
                        };
                        // With one home per row, the canonical test needs only `hx` (no bitset).
                        let px = if self.single_home {
                            &[][..]
                        } else {
                            self.row_lists(x).0
                        };
                        for &l in px {
                            xbits[l as usize / 64] |= 1 << (l % 64);
                        }
                        surv.clear();
                        for &k in hits.iter() {
                            let y = mc[k as usize];
                            let c = cx.min(cuts.of(y));
                            if prefix < words
                                && hamming(sx, sketches.row(y as usize)) > cuts.classes[c].1.cut
                            {
                                continue;
                            }
                            let canonical = if self.single_home {
                                self.canonical_single(j, x, hx, y)
                            } else {
                                self.canonical_with(xbits, j, x, y)
                            };
                            if x != y && canonical {
                                surv.push((y, cuts.classes[c].0));
                            }
                        }
                        st.rescored += surv.len() as u64;
                        // Rescoring reads each survivor's row from memory: start loading the next one
                        // while the current one is scored.
                        if let Some(&(y, _)) = surv.first() {
                            prefetch(y);
                        }
                        for (i, &(y, t)) in surv.iter().enumerate() {
                            if let Some(&(next, _)) = surv.get(i + 1) {
                                prefetch(next);
                            }
                            let (a, b) = if x < y { (x, y) } else { (y, x) };
                            let (a_, b_) = (a as usize, b as usize);
                            if let Some(q) = quant {
                                let (sa, sb) = (q.codes.scale(a_), q.codes.scale(b_));
                                let est = sa * sb * dot_i8(q.codes.row(a_), q.codes.row(b_)) as f32;
                                let err = code_error_bound(sa, q.l1[a_], sb, q.l1[b_], d);
                                if est + err < t {
                                    continue;
                                }
                            }
                            st.exact_reads += 1;
                            let exact = dot_f32(base.row(a_), base.row(b_));
                            if exact >= t {
                                st.above += 1;
                                if accept(a, b, exact) {
                                    out.push((a, b, exact));
                                }
                            }
                        }
                        for &l in px {
                            xbits[l as usize / 64] = 0;
                        }
                    }
                    (out, st)
                },
            )
            .unzip();
        let stats = stats
            .into_iter()
            .fold(JoinStats::default(), |a, b| a.add(&b));
        let mut pairs: Vec<JoinPair> = pairs.into_iter().flatten().collect();
        pairs.sort_unstable_by_key(|p| (p.0, p.1));
        Ok((pairs, stats))
    }

    /// How deep row `a` must probe to reach one of row `b`'s home lists: the best rank (0 = best, ties by
    /// list id) of `b`'s homes among `a`'s centroid similarities; `None` if either row is absent or out of
    /// range. With two-way visits the join compares `a` and `b` iff either rank (a→b, b→a) is below
    /// `probes`; with one-way visits (one home per row) iff the rank towards the home with the larger id is.
    /// For recall analysis.
    pub fn probe_rank(&self, base: RowsF32<'_>, a: usize, b: usize) -> Option<usize> {
        if a >= self.rows || b >= self.rows || self.home[a] == 0 || self.home[b] == 0 {
            return None;
        }
        let q = base.row(a);
        let scores: Vec<f32> = (0..self.lists).map(|j| self.list_score(q, j)).collect();
        let (pb, hb) = self.row_lists(b as u32);
        pb[..hb]
            .iter()
            .map(|&t| {
                let (t, st) = (t as usize, scores[t as usize]);
                scores
                    .iter()
                    .enumerate()
                    .filter(|&(j, &s)| s > st || (s == st && j < t))
                    .count()
            })
            .min()
    }

    /// How the join's visit rule reaches the pair {`a`, `b`}: the probe depth it needs (the smaller
    /// [`Ivf::probe_rank`] of the directions the rule allows: both two-way; one-way, only the visit towards
    /// the home with the larger id) and whether this index's own per-row probe counts reach it. `None` if
    /// either row is absent or out of range. For recall analysis.
    pub fn pair_reach(&self, base: RowsF32<'_>, a: usize, b: usize) -> Option<(usize, bool)> {
        let (ra, rb) = (self.probe_rank(base, a, b)?, self.probe_rank(base, b, a)?);
        let (ka, kb) = (self.row_probes(a), self.row_probes(b));
        Some(if !self.one_way {
            (ra.min(rb), ra < ka || rb < kb)
        } else if self.home_list(b) >= self.home_list(a) {
            (ra, ra < ka)
        } else {
            (rb, rb < kb)
        })
    }

    /// Number of lists `row` probes (0 if absent or out of range; wide rows probe more).
    pub fn row_probes(&self, row: usize) -> usize {
        if row >= self.rows {
            return 0;
        }
        self.row_lists(row as u32).0.len()
    }

    /// The first home list of `row` (`None` if absent or out of range).
    pub fn home_list(&self, row: usize) -> Option<u32> {
        (row < self.rows && self.home[row] > 0).then(|| self.probe[self.probe_off[row]])
    }

    /// True if rows visit only probe lists with an id at least their home's ([`IvfParams::one_way`]).
    pub fn one_way(&self) -> bool {
        self.one_way
    }

    /// Writes the index to `path` (own binary format, CRC-32 checked), streamed through a buffer, and returns
    /// the CRC-32 of the body it wrote (the file's last four bytes), so a caller can bind the file to its own
    /// metadata.
    pub fn save(&self, path: &Path) -> Result<u32, IndexError> {
        let io = |source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp).map_err(io)?;
        // Index files are derived from biometric templates: private to the owner, whatever the umask.
        file.set_permissions(perms_0600()).map_err(io)?;
        let mut w = CrcWriter {
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
        };
        w.put(MAGIC).map_err(io)?;
        w.put(&VERSION.to_le_bytes()).map_err(io)?;
        for v in [
            self.dim as u64,
            self.rows as u64,
            self.lists as u64,
            self.probes as u64,
            u64::from(self.one_way) | (u64::from(!self.mean.is_empty()) << 1),
        ] {
            w.put(&v.to_le_bytes()).map_err(io)?;
        }
        let mut buf = Vec::with_capacity(1 << 16);
        let mut put_u32s = |w: &mut CrcWriter, xs: &mut dyn Iterator<Item = u32>| {
            loop {
                buf.clear();
                buf.extend(xs.take(1 << 14).flat_map(u32::to_le_bytes));
                if buf.is_empty() {
                    return Ok(());
                }
                w.put(&buf)?;
            }
        };
        put_u32s(&mut w, &mut self.centroids.iter().map(|x| x.to_bits())).map_err(io)?;
        put_u32s(&mut w, &mut self.mean.iter().map(|x| x.to_bits())).map_err(io)?;
        w.put(&self.home).map_err(io)?;
        put_u32s(
            &mut w,
            &mut self.probe_off.windows(2).map(|o| (o[1] - o[0]) as u32),
        )
        .map_err(io)?;
        put_u32s(&mut w, &mut self.probe.iter().copied()).map_err(io)?;
        let crc = w.crc.clone().finalize();
        w.out.write_all(&crc.to_le_bytes()).map_err(io)?;
        let file = w.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(crc)
    }

    /// Reads an index written by [`Ivf::save`] (this version or the padded-table versions 1 and 2),
    /// streamed, validating checksum, shape and every list id.
    pub fn load(path: &Path) -> Result<Ivf, IndexError> {
        Ivf::load_with_crc(path).map(|(ivf, _)| ivf)
    }

    /// [`Ivf::load`], also returning the verified CRC-32 of the file's body (what [`Ivf::save`] returned).
    pub fn load_with_crc(path: &Path) -> Result<(Ivf, u32), IndexError> {
        let bad = |problem: String| IndexError::Corrupt {
            path: path.to_path_buf(),
            problem,
        };
        let io = |source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut r = CrcReader {
            inp: std::io::BufReader::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            left: len,
        };
        const HEAD: u64 = 8 + 4 + 4 * 8;
        if len < HEAD + 4 {
            return Err(bad(format!("{len} bytes is too short for a header")));
        }
        // A read past the end is a truncated file; any other failure is an I/O error.
        let short = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("file is truncated".into())
            } else {
                io(e)
            }
        };
        let mut magic = [0u8; 8];
        r.take(&mut magic).map_err(short)?;
        if &magic != MAGIC {
            return Err(bad("not an IVF index (bad magic)".into()));
        }
        let version = r.u32().map_err(short)?;
        if !(1..=VERSION).contains(&version) {
            return Err(bad(format!("version {version}, expected {VERSION}")));
        }
        let mut head = [0u64; 5];
        // Version 1 had no flags word (two-way visits).
        let words = if version == 1 { 4 } else { 5 };
        for h in head.iter_mut().take(words) {
            *h = r.u64().map_err(short)?;
        }
        let flags = head[4];
        if flags > 3 || (version < 3 && flags > 1) {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let one_way = flags & 1 == 1;
        let centred = flags & 2 == 2;
        let to_usize = |v: u64, what: &str| {
            usize::try_from(v).map_err(|_| bad(format!("{what} {v} does not fit in memory")))
        };
        let dim = to_usize(head[0], "dim")?;
        let rows = to_usize(head[1], "rows")?;
        let lists = to_usize(head[2], "lists")?;
        let probes = to_usize(head[3], "probes")?;
        if dim == 0 || lists == 0 || probes == 0 || probes > lists || rows > u32::MAX as usize {
            return Err(bad(format!(
                "bad shape: dim {dim}, rows {rows}, lists {lists}, probes {probes}"
            )));
        }
        // Sizes known before the probe lists: centroids, homes, and the padded table or the counts.
        // Checked throughout: a damaged header may hold any value.
        let fixed = (lists as u64)
            .checked_add(u64::from(centred))
            .and_then(|x| x.checked_mul((dim as u64).checked_mul(4)?))
            .and_then(|x| x.checked_add(rows as u64))
            .and_then(|x| {
                let table = if version < 3 { probes as u64 } else { 1 };
                x.checked_add((rows as u64).checked_mul(table.checked_mul(4)?)?)
            });
        if fixed.is_none_or(|f| f > r.left.saturating_sub(4)) {
            return Err(bad(format!(
                "{len} bytes is too short for the shape in the header"
            )));
        }
        let mut bits = Vec::with_capacity(lists * dim);
        r.u32s(lists * dim, &mut bits).map_err(short)?;
        let centroids: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
        if let Some(k) = centroids.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("non-finite centroid value {k}")));
        }
        let mut mean = Vec::new();
        if centred {
            let mut bits = Vec::with_capacity(dim);
            r.u32s(dim, &mut bits).map_err(short)?;
            mean = bits.into_iter().map(f32::from_bits).collect();
            if mean.iter().any(|x| !x.is_finite()) {
                return Err(bad("non-finite mean value".into()));
            }
        }
        let bias = list_biases(&centroids, &mean, dim);
        let mut home = vec![0u8; rows];
        r.take(&mut home).map_err(short)?;
        let mut probe_off = vec![0usize; rows + 1];
        let mut probe = Vec::new();
        if version < 3 {
            // The padded table: rows probing fewer lists than its width end in NONE.
            let mut row = Vec::with_capacity(probes);
            for i in 0..rows {
                row.clear();
                r.u32s(probes, &mut row).map_err(short)?;
                let used = row.iter().position(|&l| l == NONE).unwrap_or(probes);
                if row[used..].iter().any(|&l| l != NONE) {
                    return Err(bad(format!("row {i}: bad NONE padding of its probe lists")));
                }
                probe.extend_from_slice(&row[..used]);
                probe_off[i + 1] = probe.len();
            }
        } else {
            let mut counts = Vec::with_capacity(rows);
            r.u32s(rows, &mut counts).map_err(short)?;
            for (i, &k) in counts.iter().enumerate() {
                let k = k as usize;
                if k > probes {
                    return Err(bad(format!("row {i}: {k} probe lists > {probes}")));
                }
                probe_off[i + 1] = probe_off[i] + k;
            }
            let total = probe_off[rows];
            if (total as u64).checked_mul(4) != Some(r.left.saturating_sub(4)) {
                return Err(bad(format!(
                    "{} bytes left for {total} probe lists",
                    r.left.saturating_sub(4)
                )));
            }
            probe.reserve_exact(total);
            r.u32s(total, &mut probe).map_err(short)?;
        }
        if r.left != 4 {
            return Err(bad(format!(
                "{} bytes after the body, expected a 4-byte checksum",
                r.left
            )));
        }
        let computed = r.crc.clone().finalize();
        let mut tail = [0u8; 4];
        std::io::Read::read_exact(&mut r.inp, &mut tail).map_err(short)?;
        if computed != u32::from_le_bytes(tail) {
            return Err(bad("checksum mismatch".into()));
        }
        for i in 0..rows {
            let h = home[i] as usize;
            let p = &probe[probe_off[i]..probe_off[i + 1]];
            if h == 0 {
                if !p.is_empty() {
                    return Err(bad(format!("absent row {i} has lists")));
                }
                continue;
            }
            if h > p.len() {
                return Err(bad(format!(
                    "row {i}: {h} home lists > {} probe lists",
                    p.len()
                )));
            }
            for (k, &l) in p.iter().enumerate() {
                if l as usize >= lists || p[..k].contains(&l) {
                    return Err(bad(format!("row {i}: invalid or repeated list id {l}")));
                }
            }
        }
        if one_way && home.iter().any(|&h| h > 1) {
            return Err(bad("one-way visits with a row of several homes".into()));
        }
        let ivf = Ivf::assemble(
            dim,
            lists,
            probes,
            (centroids, mean, bias),
            ProbeTable {
                home,
                probe_off,
                probe,
            },
            one_way,
            false,
        );
        Ok((ivf, computed))
    }
}

/// A buffered writer that checksums what it writes (CRC-32).
struct CrcWriter {
    out: std::io::BufWriter<std::fs::File>,
    crc: crc32fast::Hasher,
}

impl CrcWriter {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }
}

/// A buffered reader that checksums what it reads (CRC-32) and counts the bytes left in the file.
struct CrcReader {
    inp: std::io::BufReader<std::fs::File>,
    crc: crc32fast::Hasher,
    left: u64,
}

impl CrcReader {
    fn take(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        if (buf.len() as u64) > self.left.saturating_sub(4) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        std::io::Read::read_exact(&mut self.inp, buf)?;
        self.crc.update(buf);
        self.left -= buf.len() as u64;
        Ok(())
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Appends `n` little-endian u32 values to `out`, read in blocks.
    fn u32s(&mut self, n: usize, out: &mut Vec<u32>) -> std::io::Result<()> {
        let mut buf = [0u8; 1 << 16];
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len() / 4);
            self.take(&mut buf[..k * 4])?;
            out.extend(
                buf[..k * 4]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            left -= k;
        }
        Ok(())
    }
}

/// Owner read/write only (index files hold data derived from biometric templates).
fn perms_0600() -> std::fs::Permissions {
    <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Selection and insertion agree on the top `k` lists, ties included.
        #[test]
        fn top_select_matches_top_p(
            scores in prop::collection::vec(prop::sample::select(vec![-0.5f32, 0.0, 0.1, 0.25, 0.7]), 1..60),
            k in 1usize..70,
        ) {
            let k = k.min(scores.len());
            let (mut a, mut b) = (Vec::new(), Vec::new());
            top_p(&scores, k, &mut a);
            top_select(&scores, k, &mut b);
            prop_assert_eq!(a, b);
        }
    }
}
