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
//!
//! # Files
//! - `train.rs`: spherical k-means on a sample, [`Ivf::build`] / [`Ivf::build_streaming`].
//! - `assign.rs`: scoring rows against the centroids, the per-row probe table and the per-list tables
//!   derived from it.
//! - `probe.rs`: run-time probe rules ([`ProbeRule`]), re-probing, what a rule needs to reach a pair.
//! - `join.rs`: the threshold self-joins (GEMM and sketched), their cuts and counters ([`JoinStats`]).
//! - `format.rs`: the saved file ([`Ivf::save`], [`Ivf::load`]), CRC-32 checked.

use crate::IndexError;
use crate::kernels::dot_f32;
use crate::view::RowsF32;

mod assign;
mod format;
mod join;
mod probe;
mod train;

use assign::{
    ASSIGN_TILE, ProbeTable, SELECT_ABOVE, assign_streaming, score_against, top_p, top_select,
};
use train::{check_finite, list_biases};

pub use join::{JoinCuts, JoinPair, JoinStats, MAX_JOIN_CLASSES, QuantStage};
pub use probe::{ProbeRule, Reach};

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
}
