//! IVF threshold join: a sub-quadratic candidate generator for deduplication, with exact f32 scores.
//!
//! (Design notes and measurements: see the end of this comment.)
//!
//! # Structure
//! - **Centroids**: spherical k-means (Lloyd iterations on a seeded sample, centroids re-normalised).
//! - **Per row**: its `probes` best lists by centroid similarity (ranked), of which the first `home`
//!   (1 ≤ home ≤ `assign`, the margin rule: rank r < `assign` is a home list if its similarity is within
//!   `margin` of the best) are lists the row is a *member* of. Absent rows have no lists at all. With
//!   `wide_share > 0`, the rows the partition serves worst probe `wide_probes` lists; the table is as wide
//!   as the widest row and shorter rows end in `NONE`.
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

use crate::IndexError;
use crate::kernels::{dot_f32, prefetch_row};
use crate::rng::SplitMix;
use crate::sketch::{PackedBlock, Sketches, StagedCut, filter_packed, hamming};
use crate::view::RowsF32;

/// GEMM tile: rows of the visitor side.
const VIS_TILE: usize = 512;
/// GEMM tile: rows of the member side.
const MEM_TILE: usize = 1024;
/// Rows assigned per GEMM block when assigning rows to centroids.
const ASSIGN_TILE: usize = 256;
/// GEMM scores at least `t - SLACK` are rescored with `dot_f32` (GEMM and kernel differ by rounding only).
const SLACK: f32 = 1e-3;
/// File magic of a saved index.
const MAGIC: &[u8; 8] = b"PACHAIVF";
/// File format version.
const VERSION: u32 = 2;
/// Probe counts above this use selection ([`top_select`]) rather than insertion ([`top_p`]).
const SELECT_ABOVE: usize = 32;
/// Marker of "no list" in the per-row probe table (absent rows).
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
    /// `lists × dim`, unit-norm rows.
    centroids: Vec<f32>,
    /// Per row: number of home lists (0 = absent row).
    home: Vec<u8>,
    /// Per row: `probes` list ids, best first (all `NONE` for absent rows).
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
}

/// A joined pair `(a, b, exact score)`, `a < b`.
pub type JoinPair = (u32, u32, f32);

/// Work counters of a sketched join (per-stage pair counts, for benchmarks and run summaries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinStats {
    /// Visitor × member products compared by sketch.
    pub products: u64,
    /// Products within the sketch cut.
    pub sketch_pass: u64,
    /// Canonical discoveries rescored exactly with `dot_f32`.
    pub rescored: u64,
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
        for &i in &ids {
            let r = base.row(i as usize);
            if r.iter().any(|x| !x.is_finite()) {
                return Err(IndexError::InvalidVector {
                    id: i as usize,
                    problem: "NaN or infinity".into(),
                });
            }
        }
        let np = ids.len();
        let c = params
            .lists
            .unwrap_or_else(|| auto_lists(np))
            .clamp(1, np.max(1));
        let narrow = params.probes.min(c);
        let wide = params.wide_share > 0.0 && params.wide_probes > narrow;
        // The table's width; narrow rows pad their tail with NONE.
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
                // Empty lists are re-seeded with the sample rows worst served by their centroid.
                let mut worst: Vec<usize> = (0..s).collect();
                worst.sort_by(|&a, &b| best[a].1.total_cmp(&best[b].1).then(a.cmp(&b)));
                let mut next_worst = worst.into_iter();
                for j in 0..c {
                    let cj = &mut cents[j * d..(j + 1) * d];
                    let ok = counts[j] > 0 && {
                        for (x, &acc) in cj.iter_mut().zip(&sums[j * d..(j + 1) * d]) {
                            *x = acc as f32;
                        }
                        normalise(cj)
                    };
                    if !ok && let Some(r) = next_worst.next() {
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

        // Assign every present row: its `probes` best lists, and how many of them are homes.
        let mut home = vec![0u8; n];
        let mut probe = vec![NONE; n * probes];
        let chunks: Vec<&[u32]> = ids.chunks(ASSIGN_TILE).collect();
        let results: Vec<Vec<(u8, Vec<u32>)>> = chunks
            .par_iter()
            .map_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(rows, buf, top), chunk| {
                    gather(base, chunk, rows);
                    gemm(rows, chunk.len(), &cents, c, d, buf);
                    (0..chunk.len())
                        .map(|i| {
                            let scores = &buf[i * c..(i + 1) * c];
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
                            let h = top
                                .iter()
                                .take(assign)
                                .enumerate()
                                .take_while(|(r, t)| *r == 0 || t.0 >= best - params.margin)
                                .count();
                            (h as u8, top.iter().map(|t| t.1).collect())
                        })
                        .collect()
                },
            )
            .collect();
        for (&i, (h, p)) in ids.iter().zip(results.into_iter().flatten()) {
            let i = i as usize;
            home[i] = h;
            probe[i * probes..i * probes + p.len()].copy_from_slice(&p);
        }
        let mut ivf = Ivf {
            dim: d,
            rows: n,
            lists: c,
            probes,
            centroids: cents,
            home,
            probe,
            mem_off: Vec::new(),
            members: Vec::new(),
            vis_off: Vec::new(),
            visitors: Vec::new(),
            vis_home: Vec::new(),
            single_home: true,
            one_way: params.one_way,
        };
        ivf.derive_lists();
        Ok(ivf)
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
    /// Candidate pairs the self-join scores (ordered visitor × member products, before dedup).
    pub fn candidate_products(&self) -> u64 {
        (0..self.lists)
            .map(|j| self.members(j).len() as u64 * self.visitors(j).len() as u64)
            .sum()
    }

    /// Row `i`'s probe lists (ranked, without the table's NONE padding; empty for absent rows) and its
    /// number of homes.
    fn row_lists(&self, i: u32) -> (&[u32], usize) {
        let i = i as usize;
        let row = &self.probe[i * self.probes..(i + 1) * self.probes];
        let used = row.iter().position(|&l| l == NONE).unwrap_or(row.len());
        (&row[..used], self.home[i] as usize)
    }

    /// True iff (list `j`, visitor `x`) is the smallest discovery of the pair `{x, y}` (y a member of j).
    fn canonical(&self, j: u32, x: u32, y: u32) -> bool {
        if self.single_home {
            return self.canonical_single(j, x, self.probe[x as usize * self.probes], y);
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
        Ok(self
            .self_join_rows_sketched_with(base, sketches, probes, t, cut, &|_, _, _| true)?
            .0)
    }

    /// [`Ivf::self_join_rows_sketched`] with a verdict: a pair whose exact score reaches `t` is kept only if
    /// `accept(a, b, score)` (e.g. a fused multi-modal score, computed inside the join so that candidates are
    /// never materialised). Also returns the join's work counters.
    pub fn self_join_rows_sketched_with(
        &self,
        base: RowsF32<'_>,
        sketches: &Sketches,
        probes: Range<usize>,
        t: f32,
        cut: StagedCut,
        accept: &(dyn Fn(u32, u32, f32) -> bool + Sync),
    ) -> Result<(Vec<JoinPair>, JoinStats), IndexError> {
        self.check(&base, t)?;
        if sketches.rows() != self.rows {
            return Err(IndexError::Shape(format!(
                "{} sketches for an index of {} rows",
                sketches.rows(),
                self.rows
            )));
        }
        let (lo, hi) = (probes.start.min(self.rows), probes.end.min(self.rows));
        if lo >= hi {
            return Ok((Vec::new(), JoinStats::default()));
        }
        let units = self.units(lo, hi);
        let words = sketches.words();
        let prefix = cut.prefix_words.clamp(1, words.max(1));
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
                |(ms, hits, xbits, surv), (j, vr, mc)| {
                    let (j, mc) = (*j, *mc);
                    let (vc, vh) = (&self.visitors[vr.clone()], &self.vis_home[vr.clone()]);
                    ms.clear(prefix);
                    for &y in mc {
                        ms.push(&sketches.row(y as usize)[..prefix]);
                    }
                    let mut out = Vec::new();
                    let mut st = JoinStats {
                        products: (vc.len() * mc.len()) as u64,
                        ..JoinStats::default()
                    };
                    for (i, (&x, &hx)) in vc.iter().zip(vh).enumerate() {
                        // Visitors' sketches are scattered rows: start loading the next one.
                        if let Some(&next) = vc.get(i + 1) {
                            prefetch_row(&sketches.row(next as usize)[..prefix]);
                        }
                        hits.clear();
                        let sx = sketches.row(x as usize);
                        filter_packed(&sx[..prefix], ms, cut.prefix_cut, hits);
                        if hits.is_empty() {
                            continue;
                        }
                        st.sketch_pass += hits.len() as u64;
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
                            if prefix < words && hamming(sx, sketches.row(y as usize)) > cut.cut {
                                continue;
                            }
                            let canonical = if self.single_home {
                                self.canonical_single(j, x, hx, y)
                            } else {
                                self.canonical_with(xbits, j, x, y)
                            };
                            if x != y && canonical {
                                surv.push(y);
                            }
                        }
                        st.rescored += surv.len() as u64;
                        // Rescoring reads each survivor's row from memory: start loading the next one
                        // while the current one is scored.
                        if let Some(&y) = surv.first() {
                            prefetch_row(base.row(y as usize));
                        }
                        for (i, &y) in surv.iter().enumerate() {
                            if let Some(&next) = surv.get(i + 1) {
                                prefetch_row(base.row(next as usize));
                            }
                            let (a, b) = if x < y { (x, y) } else { (y, x) };
                            let exact = dot_f32(base.row(a as usize), base.row(b as usize));
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

    /// 1:N search: rows with exact score ≥ `t` among the members of the query's `nprobe` best lists,
    /// sorted by (score desc, row asc). A query of the wrong dimension or with NaN finds nothing.
    pub fn search(
        &self,
        base: RowsF32<'_>,
        query: &[f32],
        t: f32,
        nprobe: usize,
    ) -> Vec<(u32, f32)> {
        if query.len() != self.dim
            || base.dim() != self.dim
            || base.rows() != self.rows
            || t.is_nan()
        {
            return Vec::new();
        }
        let scores: Vec<f32> = (0..self.lists)
            .map(|j| dot_f32(query, &self.centroids[j * self.dim..(j + 1) * self.dim]))
            .collect();
        if scores.iter().any(|s| s.is_nan()) {
            return Vec::new();
        }
        let mut top = Vec::new();
        top_p(&scores, nprobe.min(self.lists), &mut top);
        let mut rows: Vec<u32> = top
            .iter()
            .flat_map(|&(_, j)| self.members(j as usize).iter().copied())
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let mut out: Vec<(u32, f32)> = rows
            .into_iter()
            .filter_map(|r| {
                let s = dot_f32(query, base.row(r as usize));
                (s >= t).then_some((r, s))
            })
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
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
        let scores: Vec<f32> = (0..self.lists)
            .map(|j| dot_f32(q, &self.centroids[j * self.dim..(j + 1) * self.dim]))
            .collect();
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
        (row < self.rows && self.home[row] > 0).then(|| self.probe[row * self.probes])
    }

    /// True if rows visit only probe lists with an id at least their home's ([`IvfParams::one_way`]).
    pub fn one_way(&self) -> bool {
        self.one_way
    }

    /// Writes the index to `path` (own binary format, CRC-32 checked).
    pub fn save(&self, path: &Path) -> Result<(), IndexError> {
        let io = |source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut body: Vec<u8> = Vec::with_capacity(
            64 + self.centroids.len() * 4 + self.home.len() + self.probe.len() * 4,
        );
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&VERSION.to_le_bytes());
        for v in [
            self.dim as u64,
            self.rows as u64,
            self.lists as u64,
            self.probes as u64,
            u64::from(self.one_way),
        ] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        for &x in &self.centroids {
            body.extend_from_slice(&x.to_le_bytes());
        }
        body.extend_from_slice(&self.home);
        for &x in &self.probe {
            body.extend_from_slice(&x.to_le_bytes());
        }
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads an index written by [`Ivf::save`], validating checksum, shape and every list id.
    pub fn load(path: &Path) -> Result<Ivf, IndexError> {
        let bytes = std::fs::read(path).map_err(|source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |problem: String| IndexError::Corrupt {
            path: path.to_path_buf(),
            problem,
        };
        const HEAD: usize = 8 + 4 + 4 * 8;
        if bytes.len() < HEAD + 4 {
            return Err(bad(format!(
                "{} bytes is too short for a header",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not an IVF index (bad magic)".into()));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        if crc32fast::hash(body) != stored {
            return Err(bad("checksum mismatch".into()));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(b)
        };
        // Version 1 had no flags word (two-way visits).
        let version = u32_at(8);
        let head = match version {
            1 => HEAD,
            VERSION if body.len() >= HEAD + 8 => HEAD + 8,
            VERSION => return Err(bad("header is truncated".into())),
            v => return Err(bad(format!("version {v}, expected {VERSION}"))),
        };
        let flags = if version == 1 { 0 } else { u64_at(HEAD) };
        if flags > 1 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let one_way = flags == 1;
        let to_usize = |v: u64, what: &str| {
            usize::try_from(v).map_err(|_| bad(format!("{what} {v} does not fit in memory")))
        };
        let dim = to_usize(u64_at(12), "dim")?;
        let rows = to_usize(u64_at(20), "rows")?;
        let lists = to_usize(u64_at(28), "lists")?;
        let probes = to_usize(u64_at(36), "probes")?;
        if dim == 0 || lists == 0 || probes == 0 || probes > lists || rows > u32::MAX as usize {
            return Err(bad(format!(
                "bad shape: dim {dim}, rows {rows}, lists {lists}, probes {probes}"
            )));
        }
        let need = lists
            .checked_mul(dim)
            .and_then(|x| x.checked_mul(4))
            .and_then(|x| x.checked_add(rows))
            .and_then(|x| rows.checked_mul(probes)?.checked_mul(4)?.checked_add(x))
            .and_then(|x| x.checked_add(head));
        if need != Some(body.len()) {
            return Err(bad(format!(
                "body is {} bytes, the header implies {need:?}",
                body.len()
            )));
        }
        let mut o = head;
        let mut centroids = Vec::with_capacity(lists * dim);
        for _ in 0..lists * dim {
            let x = f32::from_le_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]]);
            if !x.is_finite() {
                return Err(bad(format!("non-finite centroid value at byte {o}")));
            }
            centroids.push(x);
            o += 4;
        }
        let home = body[o..o + rows].to_vec();
        o += rows;
        let mut probe = Vec::with_capacity(rows * probes);
        for _ in 0..rows * probes {
            probe.push(u32_at(o));
            o += 4;
        }
        for i in 0..rows {
            let h = home[i] as usize;
            let p = &probe[i * probes..(i + 1) * probes];
            if h == 0 {
                if p.iter().any(|&l| l != NONE) {
                    return Err(bad(format!("absent row {i} has lists")));
                }
                continue;
            }
            if h > probes {
                return Err(bad(format!("row {i}: {h} home lists > {probes} probes")));
            }
            // Rows probing fewer lists than the table's width pad the tail with NONE.
            let used = p.iter().position(|&l| l == NONE).unwrap_or(probes);
            if used < h.max(1) || p[used..].iter().any(|&l| l != NONE) {
                return Err(bad(format!("row {i}: bad NONE padding of its probe lists")));
            }
            for (r, &l) in p[..used].iter().enumerate() {
                if l as usize >= lists || p[..r].contains(&l) {
                    return Err(bad(format!("row {i}: invalid or repeated list id {l}")));
                }
            }
        }
        let mut ivf = Ivf {
            dim,
            rows,
            lists,
            probes,
            centroids,
            home,
            probe,
            mem_off: Vec::new(),
            members: Vec::new(),
            vis_off: Vec::new(),
            visitors: Vec::new(),
            vis_home: Vec::new(),
            single_home: true,
            one_way,
        };
        if one_way && ivf.home.iter().any(|&h| h > 1) {
            return Err(bad("one-way visits with a row of several homes".into()));
        }
        ivf.derive_lists();
        Ok(ivf)
    }
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
