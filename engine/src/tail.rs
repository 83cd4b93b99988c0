//! Impostor upper-tail models fitted where decisions are made, and the counts that check them.
//!
//! Decisions are taken where the false-match rate is `FPIR / N`: 1e-8 at 100 k enrolments, 1e-9 at 1 M.
//! A Gaussian through two quantiles of a million sampled pairs extrapolates three or more decades there and
//! was measured 0.6× to 2.8× off at 1e-7. Here instead:
//!
//! 1. **Count exhaustively.** Every pair among a pool of `P` rows is scored by the blocked GEMM self-join
//!    ([`count_tail`]): `P = 40 000` rows give 8·10⁸ pairs in seconds. The join keeps only the pairs above a
//!    low threshold `u` (the score the sampled pairs put at survival ≈ 3·10⁻⁴), so memory is the tail alone.
//!    Labelled genuine pairs are left out of the count.
//! 2. **Fit a generalised Pareto distribution** to the exceedances over `u` by maximum likelihood
//!    ([`TailModel::fit`]), the peaks-over-threshold model of extreme-value theory: whatever the parent
//!    distribution, the excesses over a high threshold tend to a GPD. Without labels, the deepest counted
//!    pairs may be duplicates of one person (genuine pairs are about `D / (N²/2)` of all pairs, 2·10⁻⁸ for 1 %
//!    duplicates in 1 M), so the fit is then **truncated** at survival [`UNLABELLED_TRUNCATION`]: the
//!    likelihood uses the exceedances below that level only, conditioned on staying below it.
//!    Where a labelled count resolves more than a decade of survival, the model **reads the count itself** down
//!    to the share held by the highest [`TOP_EXCEEDANCES`] pairs and uses a GPD fitted to those pairs only
//!    beyond it ([`TopPiece`]): it extrapolates only beyond what was counted, from the shape of the top of
//!    the count. The single GPD over `u` stays in the file and the notes for comparison.
//! 3. **Check it** ([`check_tail`]): at FMR 1e-4, 1e-5, … the model's score is compared with the counted
//!    share of pairs at or above it, with a 95 % interval and the number of events; beyond the count the
//!    model extrapolates, and the check says so instead of printing a ratio.

use crate::EngineError;
use crate::audit::clopper_pearson_real;
use pacha_index::exact::{Pair, self_join_with};
use pacha_index::view::RowsF32;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ops::ControlFlow;

/// Survival level at which an unlabelled fit is truncated (see the module doc).
pub const UNLABELLED_TRUNCATION: f64 = 1e-6;
/// Survival the exceedance threshold `u` aims at.
pub const TAIL_START: f64 = 3e-4;
/// Fewest exceedances a tail fit accepts.
pub const MIN_EXCEEDANCES: usize = 200;
/// FMR levels at which a fit is checked against its count.
pub const CHECK_LEVELS: [f64; 7] = [1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10];

/// A generalised Pareto tail above `u`: `P(S ≥ s) = p_u · (1 + ξ (s − u) / σ)^(−1/ξ)` for `s ≥ u`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TailModel {
    /// The exceedance threshold (a cosine).
    pub u: f64,
    /// The counted share of impostor pairs at or above `u`.
    pub p_u: f64,
    /// Shape ξ (0: exponential tail; < 0: bounded; > 0: heavy).
    pub xi: f64,
    /// Scale σ, in cosine units.
    pub sigma: f64,
    /// Impostor pairs counted.
    pub pairs: u64,
    /// Of those, pairs at or above `u` that the fit used.
    pub exceedances: u64,
    /// The cosine the fit was truncated at (unlabelled stores), if any.
    pub truncated_at: Option<f64>,
    /// The shape of the highest counted scores, where it differs from the fit's (see [`TopPiece`]).
    #[serde(default)]
    pub top: Option<TopPiece>,
}

/// The counted tail itself where the count resolves it, and a GPD beyond: the survival from the tail's
/// threshold down to the level `p_top` is read off the count (log-linear between [`COUNTED_KNOTS`] knots,
/// the cosines at which the counted share is log-spaced from `p_u` to `p_top`); above the last knot `u` it
/// is `p_top` times a GPD fitted to the counted excesses over `u` alone. So the model extrapolates only
/// beyond what was counted, from the shape of the highest counted scores. A single GPD over the whole tail
/// misplaces a bump in the impostor distribution (families of look-alikes: ξ ≈ 1.6, 0.09× the count at
/// 1e-5 in sample, and a survival that never ends though the counted pairs do).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopPiece {
    /// The cosines at which the counted share is at the knot levels, ascending (the first is the tail's
    /// threshold, the last is `u`).
    pub cosines: [f64; COUNTED_KNOTS],
    /// The counted share at or above `u`.
    pub p_top: f64,
    /// The threshold of the GPD beyond the counted knots (the last knot).
    pub u: f64,
    /// Shape ξ of the counted excesses over `u`.
    pub xi: f64,
    /// Scale σ, in cosine units.
    pub sigma: f64,
    /// Counted scores over `u` the GPD was fitted to.
    pub exceedances: u64,
}

/// Knots of the counted part of a tail ([`TopPiece`]).
pub const COUNTED_KNOTS: usize = 24;
/// Fewest counted scores above the last knot: the counted part stops where this many remain for the GPD.
pub const TOP_EXCEEDANCES: usize = 1000;

impl TopPiece {
    /// The level of knot `k`, log-spaced from `p_u` down to `p_top`.
    fn level(p_u: f64, p_top: f64, k: usize) -> f64 {
        p_u * (p_top / p_u).powf(k as f64 / (COUNTED_KNOTS - 1) as f64)
    }

    /// The survival at `s` and its log density, `s` at or above the first knot.
    fn sf_and_ln_pdf(&self, p_u: f64, s: f64) -> (f64, f64) {
        if s >= self.u {
            return (
                self.p_top * gpd_sf(s - self.u, self.xi, self.sigma),
                self.p_top.ln() + gpd_ln_pdf(s - self.u, self.xi, self.sigma),
            );
        }
        let c = &self.cosines;
        let k = c.partition_point(|&x| x <= s).clamp(1, COUNTED_KNOTS - 1);
        let (c0, c1) = (c[k - 1], c[k]);
        let (l0, l1) = (
            Self::level(p_u, self.p_top, k - 1).ln(),
            Self::level(p_u, self.p_top, k).ln(),
        );
        if c1 <= c0 {
            return (l1.exp(), f64::NEG_INFINITY);
        }
        let ln_sf = l0 + (l1 - l0) * (s - c0) / (c1 - c0);
        (ln_sf.exp(), ln_sf + ((l0 - l1) / (c1 - c0)).ln())
    }
}

/// GPD survival of an excess `y ≥ 0` relative to the threshold.
fn gpd_sf(y: f64, xi: f64, sigma: f64) -> f64 {
    if y <= 0.0 {
        return 1.0;
    }
    if xi.abs() < 1e-9 {
        return (-y / sigma).exp();
    }
    let t = 1.0 + xi * y / sigma;
    if t <= 0.0 { 0.0 } else { t.powf(-1.0 / xi) }
}

/// GPD log density of an excess `y ≥ 0` (−∞ outside the support).
fn gpd_ln_pdf(y: f64, xi: f64, sigma: f64) -> f64 {
    if xi.abs() < 1e-9 {
        return -sigma.ln() - y / sigma;
    }
    let t = 1.0 + xi * y / sigma;
    if t <= 0.0 {
        f64::NEG_INFINITY
    } else {
        -sigma.ln() - (1.0 + 1.0 / xi) * t.ln()
    }
}

/// Negative log-likelihood of excesses `ys` (the largest `y_max`) under a GPD (ξ, σ), conditioned on staying
/// below `ymax_trunc`; each excess weighs `ws[k]` (empty: every excess weighs 1), the pseudo-likelihood of a
/// weighted sample.
fn gpd_nll(
    ys: &[f64],
    ws: &[f64],
    y_max: f64,
    xi: f64,
    sigma: f64,
    ymax_trunc: Option<f64>,
) -> f64 {
    if sigma.is_nan() || sigma <= 0.0 {
        return f64::INFINITY;
    }
    if xi < 0.0 && 1.0 + xi * y_max / sigma <= 0.0 {
        return f64::INFINITY;
    }
    let (mut ll, mass_weight): (f64, f64) = if ws.is_empty() {
        (
            ys.iter().map(|&y| gpd_ln_pdf(y, xi, sigma)).sum(),
            ys.len() as f64,
        )
    } else {
        (
            ys.iter()
                .zip(ws)
                .map(|(&y, &w)| w * gpd_ln_pdf(y, xi, sigma))
                .sum(),
            ws.iter().sum(),
        )
    };
    if let Some(t) = ymax_trunc {
        let mass = 1.0 - gpd_sf(t, xi, sigma);
        if mass <= 0.0 {
            return f64::INFINITY;
        }
        ll -= mass_weight * mass.ln();
    }
    if ll.is_finite() { -ll } else { f64::INFINITY }
}

/// Maximum-likelihood GPD (ξ, σ) of excesses `ys` weighing `ws` (empty: 1 each; truncated at `ymax_trunc`).
fn gpd_fit(ys: &[f64], ws: &[f64], ymax_trunc: Option<f64>) -> (f64, f64) {
    let mean = if ws.is_empty() {
        ys.iter().sum::<f64>() / ys.len().max(1) as f64
    } else {
        let total: f64 = ws.iter().sum();
        ys.iter().zip(ws).map(|(y, w)| y * w).sum::<f64>() / total.max(f64::MIN_POSITIVE)
    };
    let y_max = ys.iter().copied().fold(0.0f64, f64::max);
    let start = [0.0, mean.max(1e-6).ln()];
    let (best, _) = nelder_mead(
        |p| gpd_nll(ys, ws, y_max, p[0], p[1].exp(), ymax_trunc),
        start,
        [0.1, 0.3],
        400,
    );
    (best[0], best[1].exp())
}

impl TailModel {
    /// `P(S ≥ s)` for `s ≥ u` (for `s < u`, `p_u`: the caller models the body).
    pub fn sf(&self, s: f64) -> f64 {
        self.sf_and_ln_pdf(s).0
    }

    /// `ln(−d/ds P(S ≥ s))` for `s ≥ u`: the log density of the tail (−∞ beyond a bounded tail's end).
    pub fn ln_pdf(&self, s: f64) -> f64 {
        self.sf_and_ln_pdf(s).1
    }

    /// The survival and log density at `s ≥ u`: the counted knots and the GPD beyond them where the count
    /// resolved them ([`TopPiece`]), the single GPD over `u` otherwise.
    pub fn sf_and_ln_pdf(&self, s: f64) -> (f64, f64) {
        match &self.top {
            Some(t) if s >= self.u => t.sf_and_ln_pdf(self.p_u, s),
            _ => {
                let y = (s - self.u).max(0.0);
                (
                    self.p_u * gpd_sf(y, self.xi, self.sigma),
                    self.p_u.ln() + gpd_ln_pdf(y, self.xi, self.sigma),
                )
            }
        }
    }

    /// Fits the tail by maximum likelihood to `scores` (the counted impostor scores at or above `u`, any
    /// order) out of `pairs` counted pairs; with `truncate_at = Some(v)`, only scores below `v` are used and
    /// the likelihood is conditioned on `S < v`.
    pub fn fit(
        scores: &[f64],
        u: f64,
        pairs: u64,
        truncate_at: Option<f64>,
    ) -> Result<TailModel, EngineError> {
        Self::fit_weighted(scores, &[], u, pairs, pairs as f64, truncate_at)
    }

    /// [`TailModel::fit`] to a count's scores with their weights ([`TailCount::weights`]).
    pub fn fit_count(
        count: &TailCount,
        u: f64,
        truncate_at: Option<f64>,
    ) -> Result<TailModel, EngineError> {
        Self::fit_weighted(
            &count.scores,
            &count.weights,
            u,
            count.pairs,
            count.weighted_pairs,
            truncate_at,
        )
    }

    /// [`TailModel::fit`] to scores weighing `weights` (parallel to `scores`; empty: 1 each) out of `pairs`
    /// counted pairs that stand for `total` pairs (their weights summed): a hub-stratified pool's count
    /// ([`TailCount::weights`]). Shares are weighted; the fewest-exceedances rule counts scores.
    pub fn fit_weighted(
        scores: &[f64],
        weights: &[f64],
        u: f64,
        pairs: u64,
        total: f64,
        truncate_at: Option<f64>,
    ) -> Result<TailModel, EngineError> {
        if !weights.is_empty() && weights.len() != scores.len() {
            return Err(EngineError::Calibration(format!(
                "a tail fit got {} weights for {} scores",
                weights.len(),
                scores.len()
            )));
        }
        let w = |k: usize| weights.get(k).copied().unwrap_or(1.0);
        let all = scores.iter().filter(|&&s| s >= u).count();
        let all_weight: f64 = if weights.is_empty() {
            all as f64
        } else {
            (0..scores.len()).filter(|&k| scores[k] >= u).map(w).sum()
        };
        let kept: Vec<usize> = (0..scores.len())
            .filter(|&k| scores[k] >= u && truncate_at.is_none_or(|v| scores[k] < v))
            .collect();
        let ys: Vec<f64> = kept.iter().map(|&k| scores[k] - u).collect();
        let ws: Vec<f64> = if weights.is_empty() {
            Vec::new()
        } else {
            kept.iter().map(|&k| w(k)).collect()
        };
        if ys.len() < MIN_EXCEEDANCES || pairs == 0 || total <= 0.0 {
            return Err(EngineError::Calibration(format!(
                "a tail fit needs at least {MIN_EXCEEDANCES} impostor scores above {u:.4}, got {} of {pairs} pairs",
                ys.len()
            )));
        }
        let ymax_trunc = truncate_at.map(|v| v - u);
        // The whole tail's GPD and the top piece are fitted side by side (each alone is one thread's
        // likelihood search; neither reads the other).
        let ((xi, sigma), top) = rayon::join(
            || gpd_fit(&ys, &ws, ymax_trunc),
            || {
                if weights.is_empty() {
                    Self::fit_top(scores, u, all, pairs, truncate_at)
                } else {
                    Self::fit_top_weighted(scores, weights, u, total, truncate_at)
                }
            },
        );
        if !(xi.is_finite() && sigma.is_finite() && sigma > 0.0) {
            return Err(EngineError::Calibration(format!(
                "the tail fit above {u:.4} did not converge (xi {xi}, sigma {sigma})"
            )));
        }
        Ok(TailModel {
            u,
            p_u: all_weight / total,
            xi,
            sigma,
            pairs,
            exceedances: ys.len() as u64,
            truncated_at: truncate_at,
            top,
        })
    }

    /// The counted part and top GPD of a tail over `u` ([`TopPiece`]) from all counted `scores` (`all` of
    /// them at or above `u`) out of `pairs`: knots down to the share of the highest [`TOP_EXCEEDANCES`]
    /// scores, a GPD fitted to those beyond. `None` for a truncated (unlabelled) fit, where that leaves less
    /// than a decade of counted survival, or where the GPD does not fit.
    fn fit_top(
        scores: &[f64],
        u: f64,
        all: usize,
        pairs: u64,
        truncate_at: Option<f64>,
    ) -> Option<TopPiece> {
        // Without labels the highest counted pairs may be duplicates of one person: a few among the top
        // 1 000 make that GPD heavy (isotropic mates at 0.7 over impostors ending near 0.25), so an
        // unlabelled fit keeps the single truncated GPD over all its exceedances.
        if truncate_at.is_some() {
            return None;
        }
        let mut sorted: Vec<f64> = scores.iter().copied().filter(|&s| s >= u).collect();
        sorted.sort_by(f64::total_cmp);
        let n = pairs as f64;
        let p_u = all as f64 / n;
        let p_top = TOP_EXCEEDANCES as f64 / n;
        if p_top * 10.0 > p_u {
            return None;
        }
        // The cosine with (at least) `level · pairs` counted scores at or above it.
        let at_level = |level: f64| -> f64 {
            let k = ((level * n).round() as usize).clamp(1, sorted.len());
            sorted[sorted.len() - k]
        };
        let mut cosines = [0.0; COUNTED_KNOTS];
        for (k, c) in cosines.iter_mut().enumerate() {
            *c = at_level(TopPiece::level(p_u, p_top, k));
        }
        cosines[0] = u;
        let top_u = cosines[COUNTED_KNOTS - 1];
        let ys: Vec<f64> = sorted
            .iter()
            .filter(|&&s| s >= top_u)
            .map(|&s| s - top_u)
            .collect();
        if ys.len() < MIN_EXCEEDANCES {
            return None;
        }
        let (xi, sigma) = gpd_fit(&ys, &[], None);
        let counted_top = (sorted.len() - sorted.partition_point(|&x| x < top_u)) as f64 / n;
        (xi.is_finite() && sigma.is_finite() && sigma > 0.0).then_some(TopPiece {
            cosines,
            p_top: counted_top,
            u: top_u,
            xi,
            sigma,
            exceedances: ys.len() as u64,
        })
    }

    /// [`TailModel::fit_top`] for weighted scores: the knots sit where the weighted counted share reaches
    /// their levels, the top piece holds the highest [`TOP_EXCEEDANCES`] scores (their weighted share is
    /// `p_top`), and its GPD weighs them.
    fn fit_top_weighted(
        scores: &[f64],
        weights: &[f64],
        u: f64,
        total: f64,
        truncate_at: Option<f64>,
    ) -> Option<TopPiece> {
        if truncate_at.is_some() || weights.len() != scores.len() {
            return None;
        }
        let mut sorted: Vec<(f64, f64)> = scores
            .iter()
            .zip(weights)
            .filter(|(s, _)| **s >= u)
            .map(|(&s, &w)| (s, w))
            .collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        if sorted.len() <= TOP_EXCEEDANCES {
            return None;
        }
        // Weighted share at or above each position, from the top.
        let mut above = vec![0.0f64; sorted.len()];
        let mut acc = 0.0;
        for k in (0..sorted.len()).rev() {
            acc += sorted[k].1;
            above[k] = acc / total;
        }
        let p_u = above[0];
        let first_top = sorted.len() - TOP_EXCEEDANCES;
        let p_top = above[first_top];
        if p_top * 10.0 > p_u {
            return None;
        }
        // The highest cosine whose weighted share at or above it reaches `level`.
        let at_level = |level: f64| -> f64 {
            let k = above.partition_point(|&a| a >= level).saturating_sub(1);
            sorted[k].0
        };
        let mut cosines = [0.0; COUNTED_KNOTS];
        for (k, c) in cosines.iter_mut().enumerate() {
            *c = at_level(TopPiece::level(p_u, p_top, k));
        }
        cosines[0] = u;
        let top_u = cosines[COUNTED_KNOTS - 1];
        let from = sorted.partition_point(|x| x.0 < top_u);
        let ys: Vec<f64> = sorted[from..].iter().map(|x| x.0 - top_u).collect();
        let ws: Vec<f64> = sorted[from..].iter().map(|x| x.1).collect();
        if ys.len() < MIN_EXCEEDANCES {
            return None;
        }
        let (xi, sigma) = gpd_fit(&ys, &ws, None);
        (xi.is_finite() && sigma.is_finite() && sigma > 0.0).then_some(TopPiece {
            cosines,
            p_top: above[from],
            u: top_u,
            xi,
            sigma,
            exceedances: ys.len() as u64,
        })
    }
}

/// Minimises `f` over two parameters from `start` with initial steps `step` (Nelder–Mead, `iters` rounds).
fn nelder_mead(
    f: impl Fn([f64; 2]) -> f64,
    start: [f64; 2],
    step: [f64; 2],
    iters: usize,
) -> ([f64; 2], f64) {
    let mut simplex = [
        start,
        [start[0] + step[0], start[1]],
        [start[0], start[1] + step[1]],
    ];
    let mut vals = simplex.map(&f);
    for _ in 0..iters {
        // Order: best, middle, worst.
        let mut idx = [0usize, 1, 2];
        idx.sort_by(|&a, &b| vals[a].total_cmp(&vals[b]));
        let (b, m, w) = (idx[0], idx[1], idx[2]);
        let centroid = [
            0.5 * (simplex[b][0] + simplex[m][0]),
            0.5 * (simplex[b][1] + simplex[m][1]),
        ];
        let at = |t: f64| {
            [
                centroid[0] + t * (simplex[w][0] - centroid[0]),
                centroid[1] + t * (simplex[w][1] - centroid[1]),
            ]
        };
        let r = at(-1.0);
        let fr = f(r);
        if fr < vals[b] {
            let e = at(-2.0);
            let fe = f(e);
            if fe < fr {
                (simplex[w], vals[w]) = (e, fe);
            } else {
                (simplex[w], vals[w]) = (r, fr);
            }
        } else if fr < vals[m] {
            (simplex[w], vals[w]) = (r, fr);
        } else {
            let c = at(0.5);
            let fc = f(c);
            if fc < vals[w] {
                (simplex[w], vals[w]) = (c, fc);
            } else {
                // Shrink towards the best.
                for k in [m, w] {
                    simplex[k] = [
                        simplex[b][0] + 0.5 * (simplex[k][0] - simplex[b][0]),
                        simplex[b][1] + 0.5 * (simplex[k][1] - simplex[b][1]),
                    ];
                    vals[k] = f(simplex[k]);
                }
            }
        }
        let spread = (vals[w] - vals[b]).abs();
        if spread.is_finite() && spread < 1e-10 * (1.0 + vals[b].abs()) {
            break;
        }
    }
    let best = (0..3)
        .min_by(|&a, &b| vals[a].total_cmp(&vals[b]))
        .unwrap_or(0);
    (simplex[best], vals[best])
}

/// The upper tail of all pairs among a pool of rows: every score at or above `threshold`, and how many
/// pairs were counted in all.
#[derive(Clone, Debug, Default)]
pub struct TailCount {
    /// Pairs counted (all `i < j` pairs of the pool minus the excluded ones).
    pub pairs: u64,
    /// Scores at or above the threshold, ascending.
    pub scores: Vec<f64>,
    /// The two pool rows (positions in the counted pool) of each kept score, parallel to `scores`; empty
    /// where the count did not keep them (then [`TailCount::design_effect`] is 1).
    pub members: Vec<(u32, u32)>,
    /// The Horvitz–Thompson weight of each kept score, parallel to `scores` (`1 / (π_a π_b)`, the inverse of
    /// the chance that both its rows were drawn into a hub-stratified pool); empty: every pair weighs 1.
    pub weights: Vec<f64>,
    /// The pairs the count stands for: `pairs` for a uniform pool, the weights of all its pairs summed for a
    /// hub-stratified one.
    pub weighted_pairs: f64,
    /// The threshold the join kept scores from.
    pub threshold: f64,
    /// Pairs left out because the caller labelled them genuine.
    pub excluded: u64,
    /// Where the count ran past [`TAIL_KEPT_MAX`] scores: the cosine below which it kept a hashed sample of
    /// the pairs (one in 2, 4, … the lower the score; each kept score weighted back by its factor in
    /// [`TailCount::weights`]). Every pair at or above it was kept. `None`: every pair at or above the
    /// threshold was kept.
    pub sampled_below: Option<f64>,
}

impl TailCount {
    /// Counted pairs scoring at or above `s` (`s` must be at or above the threshold to be exact).
    pub fn at_or_above(&self, s: f64) -> u64 {
        (self.scores.len() - self.scores.partition_point(|&x| x < s)) as u64
    }
    /// How much the pairs at or above `s` cluster on shared rows: the variance of their count over the
    /// variance a count of independent pairs would have (1 for independent pairs, never below 1).
    ///
    /// The pairs of a pool are not independent: every row takes part in `n − 1` of them, and a row near many
    /// others (a hub) puts many events into one count. With `S_i` the events row `i` takes part in and `C`
    /// their total, the count's variance is estimated as `C (1 − p) + Σ S_i (S_i − 1) − 4 C² (n − 2) / (n (n − 1))`
    /// (the covariance of pairs sharing a row, minus what independent pairs would share by chance; `n` rows
    /// as the pool's pair count implies). A design effect `d` makes `C` events worth `C / d` independent ones.
    pub fn design_effect(&self, s: f64) -> f64 {
        if self.members.len() != self.scores.len() {
            return 1.0;
        }
        let from = self.scores.partition_point(|&x| x < s);
        let members = self.members[from..]
            .iter()
            .map(|&(a, b)| (u64::from(a), u64::from(b)));
        if self.weights.is_empty() {
            design_effect(self.pairs, members)
        } else {
            weighted_design_effect(members.zip(self.weights[from..].iter().copied()))
        }
    }

    /// The weight of kept score `k` (1 in a uniform pool).
    pub fn weight(&self, k: usize) -> f64 {
        self.weights.get(k).copied().unwrap_or(1.0)
    }

    /// The share of pairs at or above `s` the count estimates (weighted; `s` at or above the threshold).
    pub fn share_at_or_above(&self, s: f64) -> f64 {
        let from = self.scores.partition_point(|&x| x < s);
        if self.weights.is_empty() {
            (self.scores.len() - from) as f64 / self.pairs as f64
        } else {
            self.weights[from..].iter().sum::<f64>() / self.weighted_pairs
        }
    }

    /// The highest kept score whose weighted share at or above it reaches `share`, if the count reaches it.
    pub fn score_at_share(&self, share: f64) -> Option<f64> {
        let target = share * self.weighted_pairs;
        let mut acc = 0.0;
        for k in (0..self.scores.len()).rev() {
            acc += self.weight(k);
            if acc >= target {
                return Some(self.scores[k]);
            }
        }
        None
    }

    /// Merges counts of disjoint pair sets of one pool (the bands of a banded count) into one.
    pub fn merge(parts: &[TailCount], threshold: f64) -> TailCount {
        let complete = parts.iter().all(|b| b.members.len() == b.scores.len());
        let weighted = parts.iter().any(|b| !b.weights.is_empty());
        let mut kept: Vec<(f64, (u32, u32), f64)> = Vec::new();
        for b in parts {
            for (k, &s) in b.scores.iter().enumerate() {
                let rows = b.members.get(k).copied().unwrap_or_default();
                kept.push((s, rows, b.weight(k)));
            }
        }
        kept.sort_by(|x, y| x.0.total_cmp(&y.0));
        TailCount {
            pairs: parts.iter().map(|b| b.pairs).sum(),
            scores: kept.iter().map(|k| k.0).collect(),
            // Members only where every part kept them: a partial list would misplace the design effect.
            members: if complete {
                kept.iter().map(|k| k.1).collect()
            } else {
                Vec::new()
            },
            weights: if weighted {
                kept.iter().map(|k| k.2).collect()
            } else {
                Vec::new()
            },
            weighted_pairs: parts.iter().map(|b| b.weighted_pairs).sum(),
            threshold,
            excluded: parts.iter().map(|b| b.excluded).sum(),
            sampled_below: parts
                .iter()
                .filter_map(|b| b.sampled_below)
                .reduce(f64::max),
        }
    }

    /// The score with `k` counted pairs at or above it (the k-th highest), if at least `k` were kept.
    pub fn kth_highest(&self, k: u64) -> Option<f64> {
        let k = usize::try_from(k).ok()?;
        (k >= 1 && k <= self.scores.len()).then(|| self.scores[self.scores.len() - k])
    }
}

/// Counts every pair `i < j` of `rows` by the blocked GEMM self-join, keeping the scores at or above
/// `threshold`; pairs for which `exclude(i, j)` holds (labelled genuine) are counted out entirely.
pub fn count_tail(
    rows: RowsF32<'_>,
    threshold: f32,
    exclude: &(dyn Fn(usize, usize) -> bool + Sync),
    excluded_total: u64,
) -> Result<TailCount, EngineError> {
    let row_band = vec![0u8; rows.rows()];
    let mut counts = count_tail_banded(
        rows,
        threshold,
        exclude,
        &row_band,
        &[excluded_total],
        &RowWeights::default(),
        TAIL_KEPT_MAX,
    )?;
    Ok(counts.pop().unwrap_or_default())
}

/// The Horvitz–Thompson weights of a hub-stratified pool's rows (see [`TailCount::weights`]): empty for a
/// uniform pool.
#[derive(Clone, Debug, Default)]
pub struct RowWeights {
    /// `1 / π_i` per pool row, in pool order.
    pub inverse_inclusion: Vec<f64>,
    /// Per band, the summed weights of the labelled genuine pairs left out (parallel to `excluded_total`).
    pub excluded: Vec<f64>,
}

/// Most scores a tail count keeps in memory (about 12 bytes each while counting, 24 in the result). A hub
/// pool, or every pair of a store of a million rows, puts 10⁸ and more pairs above a tail threshold; beyond
/// this the count samples its lower scores instead ([`TailCount::sampled_below`]).
pub const TAIL_KEPT_MAX: usize = 1 << 24;

/// Halvings of the kept scores a count may make (far more than `TAIL_KEPT_MAX` and 2⁶⁴ pairs need).
const MAX_HALVINGS: usize = 48;

/// The scores a tail count keeps, per band, with memory bounded by thinning: when more than `max` are kept,
/// it finds the cosine `c` above which the highest `max / 8` lie and from then on keeps a pair scoring
/// below `c` only if the hash of its rows has one more low zero bit. A pair scoring `s` is thus kept iff its
/// hash has `level(s)` low zero bits (`level(s)` = the cuts above `s`): the kept sets are nested, so the
/// pairs kept at the end are exactly those the final cuts would have kept from the start, each a sample of
/// one in `2^level(s)` (weighted back by [`KeptTail::factor`]), and every pair above the highest cut is kept.
struct KeptTail {
    /// Per band: (score, row a, row b).
    bands: Vec<Vec<(f32, u32, u32)>>,
    /// Ascending cosines; a pair's thinning level is the number of cuts above its score.
    cuts: Vec<f32>,
    max: usize,
    len: usize,
}

impl KeptTail {
    fn new(bands: usize, max: usize) -> Self {
        KeptTail {
            bands: vec![Vec::new(); bands],
            cuts: Vec::new(),
            max: max.max(8),
            len: 0,
        }
    }

    /// A score's thinning level: the cuts above it.
    fn level_in(cuts: &[f32], s: f32) -> usize {
        cuts.len() - cuts.partition_point(|&c| c <= s)
    }

    fn level(&self, s: f32) -> usize {
        Self::level_in(&self.cuts, s)
    }

    /// The weight a kept score carries for the pairs its thinning level stood for.
    fn factor(&self, s: f32) -> f64 {
        (self.level(s) as f64).exp2()
    }

    /// Whether the pair (`a`, `b`) scoring `s` is kept under `cuts`.
    fn keeps(cuts: &[f32], s: f32, a: u32, b: u32) -> bool {
        let level = Self::level_in(cuts, s);
        level == 0 || pair_hash(a, b).trailing_zeros() as usize >= level
    }

    fn push(&mut self, band: usize, s: f32, a: u32, b: u32) {
        if Self::keeps(&self.cuts, s, a, b) {
            self.bands[band].push((s, a, b));
            self.len += 1;
            if self.len > self.max {
                self.thin();
            }
        }
    }

    /// Adds cuts at the cosine of the highest `max / 8` kept scores until at most `5 max / 8` are kept.
    fn thin(&mut self) {
        while self.len > self.max / 8 * 5 && self.cuts.len() < MAX_HALVINGS {
            let mut all: Vec<f32> = self.bands.iter().flatten().map(|x| x.0).collect();
            let at = all.len() - self.max / 8;
            let (_, &mut cut, _) = all.select_nth_unstable_by(at, f32::total_cmp);
            drop(all);
            let k = self.cuts.partition_point(|&c| c <= cut);
            self.cuts.insert(k, cut);
            let mut len = 0;
            for band in &mut self.bands {
                let cuts = &self.cuts;
                band.retain(|&(s, a, b)| Self::keeps(cuts, s, a, b));
                len += band.len();
            }
            self.len = len;
        }
    }
}

/// A well-mixed hash of a pool pair (splitmix64's finaliser), independent of its score.
fn pair_hash(a: u32, b: u32) -> u64 {
    let mut z = (u64::from(a) << 32 | u64::from(b)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// [`count_tail`] split by quality band: row `i` is in band `row_band[i]`, a pair in the lower of its rows'
/// bands (the band of its lower quality); one count per band (`excluded_total.len()` bands, each with its
/// labelled pairs left out). With `weights` (a hub-stratified pool), each kept score carries its pair's
/// weight and each band the weighted number of its pairs. At most about `max_kept` scores are held
/// ([`TAIL_KEPT_MAX`] for the calibration and the eval; see [`TailCount::sampled_below`]).
pub fn count_tail_banded(
    rows: RowsF32<'_>,
    threshold: f32,
    exclude: &(dyn Fn(usize, usize) -> bool + Sync),
    row_band: &[u8],
    excluded_total: &[u64],
    weights: &RowWeights,
    max_kept: usize,
) -> Result<Vec<TailCount>, EngineError> {
    let bands = excluded_total.len();
    let rw = &weights.inverse_inclusion;
    if !rw.is_empty() && (rw.len() != rows.rows() || weights.excluded.len() != bands) {
        return Err(EngineError::Calibration(format!(
            "tail count: {} row weights and {} band exclusions for {} rows and {bands} bands",
            rw.len(),
            weights.excluded.len(),
            rows.rows()
        )));
    }
    if row_band.len() != rows.rows() || row_band.iter().any(|&b| usize::from(b) >= bands) {
        return Err(EngineError::Calibration(format!(
            "tail count: {} row bands for {} rows and {bands} bands",
            row_band.len(),
            rows.rows()
        )));
    }
    let mut kept = KeptTail::new(bands, max_kept);
    let mut excluded_seen = vec![0u64; bands];
    self_join_with(rows, threshold, None, &mut |batch: &[Pair]| {
        for p in batch {
            let (i, j) = (p.a as usize, p.b as usize);
            let band = usize::from(row_band[i].min(row_band[j]));
            if exclude(i, j) {
                excluded_seen[band] += 1;
            } else {
                kept.push(band, p.score, p.a, p.b);
            }
        }
        ControlFlow::Continue(())
    })
    .map_err(|e| EngineError::Calibration(format!("counting the impostor tail: {e}")))?;
    let sampled_below = kept.cuts.last().map(|&c| f64::from(c));
    let mut members = vec![0u64; bands];
    for &b in row_band {
        members[usize::from(b)] += 1;
    }
    // Per band, the rows' summed weights and squared weights (weighted pair totals).
    let (mut wsum, mut wsq) = (vec![0.0f64; bands], vec![0.0f64; bands]);
    for (i, &w) in rw.iter().enumerate() {
        let b = usize::from(row_band[i]);
        wsum[b] += w;
        wsq[b] += w * w;
    }
    Ok((0..bands)
        .map(|k| {
            let n = members[k];
            let above: u64 = members[k + 1..].iter().sum();
            let all = n * n.saturating_sub(1) / 2 + n * above;
            let mut s = std::mem::take(&mut kept.bands[k]);
            s.sort_by(|x, y| x.0.total_cmp(&y.0));
            // Excluded pairs below the threshold never reached the sink; the caller knows how many there are.
            let excluded = excluded_total[k].max(excluded_seen[k]);
            let pairs = all.saturating_sub(excluded);
            let row_weight = |x: &(f32, u32, u32)| {
                if rw.is_empty() {
                    1.0
                } else {
                    rw[x.1 as usize] * rw[x.2 as usize]
                }
            };
            let weighted = !rw.is_empty() || sampled_below.is_some();
            let weights_out = if weighted {
                s.iter().map(|x| row_weight(x) * kept.factor(x.0)).collect()
            } else {
                Vec::new()
            };
            let weighted_pairs = if rw.is_empty() {
                pairs as f64
            } else {
                let above: f64 = wsum[k + 1..].iter().sum();
                let within = 0.5 * (wsum[k] * wsum[k] - wsq[k]) + wsum[k] * above;
                (within - weights.excluded[k]).max(0.0)
            };
            TailCount {
                pairs,
                scores: s.iter().map(|x| f64::from(x.0)).collect(),
                members: s.iter().map(|x| (x.1, x.2)).collect(),
                weights: weights_out,
                weighted_pairs,
                threshold: f64::from(threshold),
                excluded,
                sampled_below,
            }
        })
        .collect())
}

/// The design effect of a count of `events` (each given by its two rows) among `pairs` pairs of a pool: see
/// [`TailCount::design_effect`]. 1 without events.
pub fn design_effect(pairs: u64, events: impl Iterator<Item = (u64, u64)>) -> f64 {
    let mut per_row: HashMap<u64, u64> = HashMap::new();
    let mut c = 0u64;
    for (a, b) in events {
        *per_row.entry(a).or_default() += 1;
        *per_row.entry(b).or_default() += 1;
        c += 1;
    }
    if c == 0 || pairs < 3 {
        return 1.0;
    }
    let c = c as f64;
    let shared: f64 = per_row.values().map(|&k| (k * (k - 1)) as f64).sum();
    let n = 0.5 * (1.0 + (1.0 + 8.0 * pairs as f64).sqrt());
    let p = c / pairs as f64;
    let chance = 4.0 * c * c * (n - 2.0) / (n * (n - 1.0));
    ((c * (1.0 - p) + shared - chance) / c).max(1.0)
}

/// The design effect of a weighted count (a hub-stratified pool's): `events` are (rows, weight). The weighted
/// total's variance is estimated with the covariance of events sharing a row,
/// `Σ_e w_e² + Σ_i ((Σ_{e∋i} w_e)² − Σ_{e∋i} w_e²)`, and the design effect is `C · Var / (Σ w)²` for `C`
/// events, so `C / d` is the effective number of events as for an unweighted count (no chance term is
/// subtracted: the estimate errs wide).
pub fn weighted_design_effect(events: impl Iterator<Item = ((u64, u64), f64)>) -> f64 {
    let mut per_row: HashMap<u64, (f64, f64)> = HashMap::new();
    let (mut c, mut total, mut squares) = (0u64, 0.0f64, 0.0f64);
    for ((a, b), w) in events {
        for r in [a, b] {
            let e = per_row.entry(r).or_default();
            e.0 += w;
            e.1 += w * w;
        }
        c += 1;
        total += w;
        squares += w * w;
    }
    if c == 0 || total <= 0.0 {
        return 1.0;
    }
    let shared: f64 = per_row.values().map(|&(s, q)| s * s - q).sum();
    (c as f64 * (squares + shared) / (total * total)).max(1.0)
}

/// The 95 % interval of `events` among `pairs` when they cluster with design effect `d`: Clopper–Pearson on
/// the effective count (events and pairs divided by `d`; Korn–Graubard).
pub fn clustered_interval(events: u64, pairs: f64, d: f64) -> (f64, f64) {
    clopper_pearson_real(events as f64 / d, pairs / d, 0.95)
}

/// One row of a tail check: a model's prediction at an FMR level against the count.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TailCheckRow {
    /// The FMR level the model was asked for.
    pub level: f64,
    /// The cosine at which the model predicts that FMR.
    pub cosine: f64,
    /// Counted pairs at or above that cosine (kept pairs: below [`TailCount::sampled_below`], the sample).
    pub events: u64,
    /// Pairs counted in all.
    pub pairs: u64,
    /// The share of pairs at or above the cosine (`events / pairs`; weighted where the pool or the count
    /// sampled), or `None` where the count cannot resolve the level (fewer than one expected event, or the
    /// cosine below the kept threshold): there the model extrapolates.
    pub measured: Option<f64>,
    /// `measured / level`.
    pub ratio: Option<f64>,
    /// Two-sided 95 % interval of the measured FMR: Clopper–Pearson on the effective count (events and pairs
    /// divided by `design_effect`), so it widens where the events cluster on a few rows.
    pub ci: Option<(f64, f64)>,
    /// The count's design effect at this cosine ([`TailCount::design_effect`]); `None` where unresolved.
    #[serde(default)]
    pub design_effect: Option<f64>,
    /// 95 % interval of `ratio`. Checked against its own count: `ci / level`. Checked out of sample
    /// ([`TailCheckRow::against_model_count`]): widened by the sampling spread of the count the model was
    /// fitted to, so it says whether two pools of one population could disagree this much by chance.
    #[serde(default)]
    pub ratio_ci: Option<(f64, f64)>,
}

impl TailCheckRow {
    /// The events the count is worth as independent pairs (`events / design_effect`).
    pub fn effective_events(&self) -> f64 {
        self.events as f64 / self.design_effect.unwrap_or(1.0)
    }

    /// This row checked out of sample, its `ratio_ci` widened by `fitted`, the same model's check at the same
    /// level against the count it was fitted to: where the model reads its own count, its prediction carries
    /// that count's sampling error, `design_effect / events` in relative variance (a lower bound where it
    /// extrapolates). The two pools are independent, so the log-ratio's variance is the sum of both
    /// (normal approximation on the log scale). Unchanged where either side is unresolved or has no events.
    pub fn against_model_count(mut self, fitted: &TailCheckRow) -> Self {
        let (Some(r), Some(d1), Some(d2)) = (self.ratio, fitted.design_effect, self.design_effect)
        else {
            return self;
        };
        if fitted.events == 0 || self.events == 0 || r <= 0.0 {
            return self;
        }
        let sd = (d1 / fitted.events as f64 + d2 / self.events as f64).sqrt();
        self.ratio_ci = Some((r * (-1.96 * sd).exp(), r * (1.96 * sd).exp()));
        self
    }
}

/// Where a model's survival `sf` (decreasing in the cosine) equals `level` (bisection over `[-1, 1]`).
pub fn cosine_at(sf: &dyn Fn(f64) -> f64, level: f64) -> f64 {
    let (mut lo, mut hi) = (-1.0f64, 1.0f64);
    if sf(hi) >= level {
        return hi;
    }
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if sf(mid) > level { lo = mid } else { hi = mid }
    }
    hi
}

/// Checks the model `sf` against `count` at each of `levels`.
pub fn check_tail(sf: &dyn Fn(f64) -> f64, count: &TailCount, levels: &[f64]) -> Vec<TailCheckRow> {
    levels
        .iter()
        .map(|&level| {
            let cosine = cosine_at(sf, level);
            let events = count.at_or_above(cosine);
            let resolved =
                cosine >= count.threshold && count.pairs > 0 && level * count.pairs as f64 >= 1.0;
            let measured = resolved.then(|| count.share_at_or_above(cosine));
            let design_effect = resolved.then(|| count.design_effect(cosine));
            // A weighted count's events stand for as many pairs as keep the measured share.
            let ci = design_effect.zip(measured).map(|(d, m)| {
                let pairs = if count.weights.is_empty() || m <= 0.0 {
                    count.pairs as f64
                } else {
                    events as f64 / m
                };
                clustered_interval(events, pairs, d)
            });
            TailCheckRow {
                level,
                cosine,
                events,
                pairs: count.pairs,
                measured,
                ratio: measured.map(|m| m / level),
                ci,
                design_effect,
                ratio_ci: ci.map(|(lo, hi)| (lo / level, hi / level)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn gpd_draw(rng: &mut StdRng, xi: f64, sigma: f64) -> f64 {
        let v: f64 = rng.random::<f64>().max(1e-300);
        if xi.abs() < 1e-9 {
            -sigma * v.ln()
        } else {
            sigma * (v.powf(-xi) - 1.0) / xi
        }
    }

    #[test]
    fn fit_recovers_known_gpd_parameters() {
        for &(xi, sigma) in &[(0.0, 0.02), (-0.2, 0.03), (0.15, 0.01)] {
            let mut rng = StdRng::seed_from_u64(7);
            let u = 0.3;
            let scores: Vec<f64> = (0..20_000)
                .map(|_| u + gpd_draw(&mut rng, xi, sigma))
                .collect();
            let m = TailModel::fit(&scores, u, 1_000_000, None).expect("fit");
            assert!((m.xi - xi).abs() < 0.04, "xi {} vs {xi}", m.xi);
            assert!(
                (m.sigma / sigma - 1.0).abs() < 0.05,
                "sigma {} vs {sigma}",
                m.sigma
            );
            assert!((m.p_u - 0.02).abs() < 1e-12);
            // A pure GPD sample: the counted knots and the GPD beyond them follow the single fit.
            let top = m.top.expect("20 000 scores resolve a decade and more");
            assert!((top.xi - xi).abs() < 0.2, "top xi {} vs {xi}", top.xi);
            let single = TailModel { top: None, ..m };
            for y in [0.5, 1.0, 2.0, 3.0, 4.0] {
                let s = u + y * sigma;
                let q = m.sf(s) / single.sf(s);
                assert!((0.8..1.25).contains(&q), "xi {xi} at {y}σ: {q}");
            }
        }
    }

    #[test]
    fn a_bump_that_ends_gets_a_top_piece_that_ends_with_it() {
        // A light tail plus a bump of look-alike pairs spread over [u + 0.1, u + 0.25] and nothing above it.
        let mut rng = StdRng::seed_from_u64(5);
        let u = 0.3;
        let mut scores: Vec<f64> = (0..60_000)
            .map(|_| u + gpd_draw(&mut rng, -0.1, 0.02))
            .collect();
        scores.extend((0..6_000).map(|_| u + 0.1 + 0.15 * rng.random::<f64>()));
        let pairs = 100_000_000u64;
        let m = TailModel::fit(&scores, u, pairs, None).expect("fit");
        let top = m.top.expect("the count resolves the bump");
        assert!(top.u > u + 0.1, "{top:?}");
        let main = TailModel { top: None, ..m };
        // Continuous at both ends of the counted part, and monotone.
        assert!((m.sf(u) / m.p_u - 1.0).abs() < 1e-9);
        assert!((m.sf(top.u - 1e-9) / m.sf(top.u) - 1.0).abs() < 1e-3);
        let grid: Vec<f64> = (0..200).map(|k| u + 0.5 * f64::from(k) / 200.0).collect();
        assert!(grid.windows(2).all(|w| m.sf(w[1]) <= m.sf(w[0])));
        // The survival follows the count across the bump (where a single GPD cannot) and above the last knot.
        let counted = |s: f64| scores.iter().filter(|&&x| x >= s).count() as f64 / pairs as f64;
        let span = u + 0.25 - top.u;
        for s in [
            u + 0.05,
            u + 0.15,
            u + 0.2,
            top.u + 0.3 * span,
            top.u + 0.6 * span,
        ] {
            let q = m.sf(s) / counted(s);
            assert!(
                (0.67..1.5).contains(&q),
                "at {s}: model {} vs count {}",
                m.sf(s),
                counted(s)
            );
        }
        // Above the bump nothing was counted: the top piece ends there, the main fit does not.
        assert!(
            main.sf(u + 0.3) > 1e-7,
            "the main fit is heavy: {}",
            main.sf(u + 0.3)
        );
        assert!(
            m.sf(u + 0.3) < 1e-3 * main.sf(u + 0.3),
            "{} vs {}",
            m.sf(u + 0.3),
            main.sf(u + 0.3)
        );
    }

    #[test]
    fn truncated_fit_ignores_contamination_above_the_cut() {
        let mut rng = StdRng::seed_from_u64(11);
        let (xi, sigma, u) = (-0.1, 0.02, 0.3);
        let mut scores: Vec<f64> = (0..50_000)
            .map(|_| u + gpd_draw(&mut rng, xi, sigma))
            .collect();
        // Genuine pairs far above the impostor tail: they would fatten an untruncated fit.
        scores.extend((0..500).map(|i| 0.6 + 0.0005 * f64::from(i)));
        let plain = TailModel::fit(&scores, u, 10_000_000, None).expect("fit");
        let cut = u + sigma * 4.0;
        let trunc = TailModel::fit(&scores, u, 10_000_000, Some(cut)).expect("fit");
        assert!((trunc.xi - xi).abs() < 0.06, "truncated xi {}", trunc.xi);
        assert!(
            plain.xi > trunc.xi + 0.1,
            "contamination should fatten the plain fit"
        );
        // Unlabelled (truncated): no counted part, whose top GPD the contamination would fatten.
        assert_eq!(trunc.top, None);
        assert!(plain.top.is_some());
    }

    #[test]
    fn too_few_exceedances_is_a_typed_error() {
        let scores = vec![0.5; 10];
        assert!(matches!(
            TailModel::fit(&scores, 0.4, 1000, None),
            Err(EngineError::Calibration(_))
        ));
    }

    #[test]
    fn count_tail_counts_every_pair_and_check_matches_the_count() {
        let mut rng = StdRng::seed_from_u64(3);
        let (n, dim) = (600usize, 16usize);
        let data = unit_rows(&mut rng, n, dim);
        let rows = RowsF32::dense(&data, dim).expect("rows");
        let c = count_tail(rows, 0.3, &|_, _| false, 0).expect("count");
        let mut brute = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                let s: f32 = (0..dim)
                    .map(|k| data[i * dim + k] * data[j * dim + k])
                    .sum();
                if s >= 0.3 {
                    brute.push(s);
                }
            }
        }
        assert_eq!(c.pairs, (n * (n - 1) / 2) as u64);
        assert_eq!(c.scores.len(), brute.len());
        // A check of an empirical survival against its own count is exact where resolved.
        let total = c.pairs as f64;
        let scores = c.scores.clone();
        let sf = move |s: f64| (scores.len() - scores.partition_point(|&x| x < s)) as f64 / total;
        let rows = check_tail(&sf, &c, &[1e-2, 1e-3]);
        for r in &rows {
            let ratio = r.ratio.expect("resolved");
            assert!((ratio - 1.0).abs() < 0.05, "{r:?}");
        }
        // Excluding pairs removes them from the count and from the total.
        let ex = count_tail(rows_of(&data, dim), 0.3, &|a, b| a == 0 && b == 1, 1).expect("count");
        assert_eq!(ex.pairs, c.pairs - 1);
    }

    #[test]
    fn thinning_keeps_exactly_the_final_cuts_sample_within_its_bound() {
        let mut rng = StdRng::seed_from_u64(11);
        let max = 2_000;
        let mut kept = KeptTail::new(2, max);
        let mut pushed = Vec::new();
        let mut most = 0;
        for a in 0..400u32 {
            for b in a + 1..400 {
                let s = rng.random::<f32>();
                let band = usize::from(a % 2 == 0);
                kept.push(band, s, a, b);
                pushed.push((band, s, a, b));
                most = most.max(kept.len);
            }
        }
        assert!(most <= max, "kept {most} scores with a bound of {max}");
        assert!(
            kept.cuts.len() >= 5,
            "79 800 pairs into 2 000: {:?}",
            kept.cuts
        );
        // The kept set is what the final cuts would have kept from the first pair: nothing lost to the order.
        let want: Vec<Vec<(f32, u32, u32)>> = (0..2)
            .map(|band| {
                pushed
                    .iter()
                    .filter(|p| p.0 == band && KeptTail::keeps(&kept.cuts, p.1, p.2, p.3))
                    .map(|p| (p.1, p.2, p.3))
                    .collect()
            })
            .collect();
        assert_eq!(kept.bands, want);
        // Every pair above the highest cut is kept; below it the weighted count estimates the pairs.
        let top = *kept.cuts.last().expect("cuts");
        let above = pushed.iter().filter(|p| p.1 >= top).count();
        let kept_above = kept.bands.iter().flatten().filter(|x| x.0 >= top).count();
        assert_eq!(above, kept_above);
        let weighted: f64 = kept.bands.iter().flatten().map(|x| kept.factor(x.0)).sum();
        let ratio = weighted / pushed.len() as f64;
        assert!(
            (0.9..1.1).contains(&ratio),
            "weighted {weighted} of {}",
            pushed.len()
        );
    }

    #[test]
    fn a_thinned_count_estimates_the_full_count_and_keeps_its_top_whole() {
        let mut rng = StdRng::seed_from_u64(12);
        let (n, dim) = (1_600usize, 8usize);
        let data = unit_rows(&mut rng, n, dim);
        let band: Vec<u8> = (0..n).map(|i| u8::from(i % 3 == 0)).collect();
        let none = |_: usize, _: usize| false;
        let count = |max: usize, w: &RowWeights| {
            count_tail_banded(rows_of(&data, dim), 0.2, &none, &band, &[0, 0], w, max)
                .expect("count")
        };
        let full = count(usize::MAX, &RowWeights::default());
        let thin = count(40_000, &RowWeights::default());
        let held: usize = full.iter().map(|c| c.scores.len()).sum();
        assert!(held > 200_000, "{held} scores above 0.2");
        assert!(thin.iter().map(|c| c.scores.len()).sum::<usize>() <= 40_000);
        let cut = thin[0].sampled_below.expect("the bound was reached");
        assert!(full[0].sampled_below.is_none());
        for (f, t) in full.iter().zip(&thin) {
            assert_eq!(t.pairs, f.pairs);
            assert_eq!(
                t.weights.len(),
                t.scores.len(),
                "a thinned count is weighted"
            );
            // Above the cut, the very same pairs with weight 1.
            assert_eq!(t.at_or_above(cut), f.at_or_above(cut));
            assert_eq!(t.share_at_or_above(cut), f.share_at_or_above(cut));
            // Below it, an unbiased sample: the share at the threshold within a few per cent.
            let r = t.share_at_or_above(0.2) / f.share_at_or_above(0.2);
            assert!((0.95..1.05).contains(&r), "{r}");
            assert!(t.design_effect(0.2) >= 1.0);
        }
        // With row weights (a hub pool) the factors multiply them.
        let w = RowWeights {
            inverse_inclusion: (0..n).map(|i| 1.0 + (i % 2) as f64).collect(),
            excluded: vec![0.0, 0.0],
        };
        let (fw, tw) = (count(usize::MAX, &w), count(40_000, &w));
        for (f, t) in fw.iter().zip(&tw) {
            assert_eq!(t.weighted_pairs, f.weighted_pairs);
            let r = t.share_at_or_above(0.2) / f.share_at_or_above(0.2);
            assert!((0.95..1.05).contains(&r), "{r}");
        }
    }

    #[test]
    fn banded_counts_split_every_pair_by_its_lower_band() {
        let mut rng = StdRng::seed_from_u64(5);
        let (n, dim) = (500usize, 12usize);
        let data = unit_rows(&mut rng, n, dim);
        let band: Vec<u8> = (0..n).map(|_| rng.random_range(0..3u8)).collect();
        let genuine = |i: usize, j: usize| (i + j).is_multiple_of(97);
        let mut excluded = [0u64; 3];
        let mut brute: Vec<Vec<f32>> = vec![Vec::new(); 3];
        let mut all = [0u64; 3];
        for i in 0..n {
            for j in i + 1..n {
                let b = usize::from(band[i].min(band[j]));
                if genuine(i, j) {
                    excluded[b] += 1;
                    continue;
                }
                all[b] += 1;
                let s: f32 = (0..dim)
                    .map(|k| data[i * dim + k] * data[j * dim + k])
                    .sum();
                if s >= 0.25 {
                    brute[b].push(s);
                }
            }
        }
        let counts = count_tail_banded(
            rows_of(&data, dim),
            0.25,
            &genuine,
            &band,
            &excluded,
            &RowWeights::default(),
            TAIL_KEPT_MAX,
        )
        .expect("count");
        assert_eq!(counts.len(), 3);
        for b in 0..3 {
            assert_eq!(counts[b].pairs, all[b], "band {b}");
            assert_eq!(counts[b].scores.len(), brute[b].len(), "band {b}");
            assert_eq!(counts[b].excluded, excluded[b]);
        }
        // A band out of range is a typed error, not a panic.
        let bad = vec![3u8; n];
        assert!(
            count_tail_banded(
                rows_of(&data, dim),
                0.25,
                &genuine,
                &bad,
                &excluded,
                &RowWeights::default(),
                TAIL_KEPT_MAX,
            )
            .is_err()
        );
    }

    /// `n` random unit rows of `dim` (uniform components, normalised), row-major.
    fn unit_rows(rng: &mut StdRng, n: usize, dim: usize) -> Vec<f32> {
        let mut data = vec![0f32; n * dim];
        for r in data.chunks_mut(dim) {
            for x in r.iter_mut() {
                *x = rng.random::<f32>() - 0.5;
            }
            let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= norm);
        }
        data
    }

    fn rows_of(data: &[f32], dim: usize) -> RowsF32<'_> {
        RowsF32::dense(data, dim).expect("rows")
    }

    #[test]
    fn check_marks_levels_beyond_the_count_unresolved() {
        let c = TailCount {
            pairs: 1000,
            scores: vec![0.5, 0.6, 0.7],
            members: vec![(0, 1), (2, 3), (4, 5)],
            weights: Vec::new(),
            weighted_pairs: 1000.0,
            threshold: 0.4,
            excluded: 0,
            sampled_below: None,
        };
        // sf(s) = 10^{-1.875 (s + 1)}: 1e-1 at s ≈ -0.47, below the kept threshold; 1e-3 at s = 0.6.
        let sf = |s: f64| 10f64.powf(-1.875 * (s + 1.0));
        let rows = check_tail(&sf, &c, &[1e-1, 1e-3, 1e-5]);
        assert!(rows[0].cosine < 0.4);
        assert_eq!(
            rows[0].measured, None,
            "scores below the kept threshold were not kept"
        );
        assert!((rows[1].cosine - 0.6).abs() < 1e-9, "{:?}", rows[1]);
        assert_eq!(rows[1].events, 2, "0.6 and 0.7 are at or above 0.6");
        assert_eq!(rows[1].measured, Some(2e-3));
        assert_eq!(
            rows[2].measured, None,
            "1e-5 of 1000 pairs cannot be measured"
        );
        assert_eq!(rows[1].design_effect, Some(1.0), "two events on four rows");
        assert_eq!(rows[1].ci, Some(clopper_pearson_real(2.0, 1000.0, 0.95)));
    }

    /// A count of `pairs` pairs whose events (all scoring 1) are `members`.
    fn events_count(pairs: u64, members: Vec<(u32, u32)>) -> TailCount {
        TailCount {
            pairs,
            scores: vec![1.0; members.len()],
            members,
            weights: Vec::new(),
            weighted_pairs: pairs as f64,
            threshold: 0.5,
            excluded: 0,
            sampled_below: None,
        }
    }

    #[test]
    fn design_effect_counts_events_sharing_a_row() {
        // One hub holding 100 events with distinct partners among 1000 rows: S_hub = 100, the others 1.
        let c = events_count(499_500, (1..=100).map(|j| (0, j)).collect());
        let (n, k) = (1000.0f64, 100.0f64);
        let want = (k * (1.0 - k / 499_500.0) + k * (k - 1.0)
            - 4.0 * k * k * (n - 2.0) / (n * (n - 1.0)))
            / k;
        assert!(
            (c.design_effect(0.9) - want).abs() < 1e-9,
            "{}",
            c.design_effect(0.9)
        );
        assert!(c.design_effect(0.9) > 95.0);
        // The same events on disjoint rows: as independent as pairs can be.
        let c = events_count(499_500, (0..100).map(|j| (2 * j, 2 * j + 1)).collect());
        assert_eq!(c.design_effect(0.9), 1.0);
        // Above every score: no events, nothing to inflate.
        assert_eq!(c.design_effect(1.5), 1.0);
        // Scores without members (a count that did not keep them): no claim of clustering.
        let c = TailCount {
            members: Vec::new(),
            ..c
        };
        assert_eq!(c.design_effect(0.9), 1.0);
    }

    #[test]
    fn weighted_fit_recovers_the_tail_of_a_thinned_sample() {
        // A GPD sample over u = 0.3 out of 10⁶ pairs; the lower excesses are kept with chance 0.2 and
        // weighted 5, the upper ones all kept: the weighted fit must find the full sample's tail.
        let (xi, sigma, u) = (0.1, 0.02, 0.3);
        let mut rng = StdRng::seed_from_u64(3);
        let full: Vec<f64> = (0..20_000)
            .map(|_| u + gpd_draw(&mut rng, xi, sigma))
            .collect();
        let cut = u + sigma; // about 39 % of excesses lie above it
        let (mut scores, mut weights) = (Vec::new(), Vec::new());
        for &x in &full {
            if x >= cut {
                scores.push(x);
                weights.push(1.0);
            } else if rng.random::<f64>() < 0.2 {
                scores.push(x);
                weights.push(5.0);
            }
        }
        let m = TailModel::fit_weighted(&scores, &weights, u, 300_000, 1e6, None).expect("fit");
        assert!((m.xi - xi).abs() < 0.06, "xi {} vs {xi}", m.xi);
        assert!((m.sigma / sigma - 1.0).abs() < 0.08, "sigma {}", m.sigma);
        assert!((m.p_u / 0.02 - 1.0).abs() < 0.03, "p_u {}", m.p_u);
        let unweighted = TailModel::fit(&full, u, 1_000_000, None).expect("fit");
        for y in [1.0, 3.0, 6.0] {
            let q = m.sf(u + y * sigma) / unweighted.sf(u + y * sigma);
            assert!((0.85..1.18).contains(&q), "at {y}σ: {q}");
        }
        // Unit weights give the unweighted fit's tail.
        let ones = vec![1.0; full.len()];
        let same = TailModel::fit_weighted(&full, &ones, u, 1_000_000, 1e6, None).expect("fit");
        assert_eq!(
            (same.xi, same.sigma, same.p_u),
            (unweighted.xi, unweighted.sigma, unweighted.p_u)
        );
        for y in [0.5, 2.0, 5.0] {
            let q = same.sf(u + y * sigma) / unweighted.sf(u + y * sigma);
            assert!((q - 1.0).abs() < 0.01, "unit weights at {y}σ: {q}");
        }
        // Weights that do not match the scores: a typed error.
        assert!(TailModel::fit_weighted(&full, &[1.0], u, 1, 1.0, None).is_err());
    }

    #[test]
    fn weighted_count_weighs_each_pair_by_its_rows_and_totals_every_pair() {
        let mut rng = StdRng::seed_from_u64(21);
        let (n, dim) = (120, 8);
        let data = unit_rows(&mut rng, n, dim);
        let band: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
        let inv: Vec<f64> = (0..n).map(|_| 1.0 + 4.0 * rng.random::<f64>()).collect();
        let genuine = |a: usize, b: usize| a == 0 && b == 2;
        // Pair (0, 2) is in band 0 (both rows even); it is left out with its weight.
        let weights = RowWeights {
            inverse_inclusion: inv.clone(),
            excluded: vec![inv[0] * inv[2], 0.0],
        };
        let counts = count_tail_banded(
            rows_of(&data, dim),
            0.25,
            &genuine,
            &band,
            &[1, 0],
            &weights,
            TAIL_KEPT_MAX,
        )
        .expect("count");
        let dot = |i: usize, j: usize| -> f32 {
            (0..dim)
                .map(|k| data[i * dim + k] * data[j * dim + k])
                .sum()
        };
        for b in 0..2u8 {
            let (mut total, mut kept) = (0.0f64, Vec::new());
            for i in 0..n {
                for j in i + 1..n {
                    if band[i].min(band[j]) != b || genuine(i, j) {
                        continue;
                    }
                    total += inv[i] * inv[j];
                    if dot(i, j) >= 0.25 {
                        kept.push(inv[i] * inv[j]);
                    }
                }
            }
            let c = &counts[usize::from(b)];
            assert!((c.weighted_pairs / total - 1.0).abs() < 1e-9, "band {b}");
            assert_eq!(c.weights.len(), kept.len(), "band {b}");
            for (k, &(i, j)) in c.members.iter().enumerate() {
                assert!((c.weights[k] - inv[i as usize] * inv[j as usize]).abs() < 1e-12);
            }
            let want: f64 = kept.iter().sum::<f64>() / total;
            assert!(
                (c.share_at_or_above(0.25) / want - 1.0).abs() < 1e-9,
                "band {b}"
            );
        }
        // Weights for another number of rows: a typed error.
        let bad = RowWeights {
            inverse_inclusion: vec![1.0; 3],
            excluded: vec![0.0, 0.0],
        };
        assert!(
            count_tail_banded(
                rows_of(&data, dim),
                0.25,
                &genuine,
                &band,
                &[1, 0],
                &bad,
                64
            )
            .is_err()
        );
    }

    #[test]
    fn merged_bands_keep_each_score_with_its_rows() {
        let part = |scores: Vec<f64>, members: Vec<(u32, u32)>, pairs: u64| TailCount {
            pairs,
            scores,
            members,
            weights: Vec::new(),
            weighted_pairs: pairs as f64,
            threshold: 0.5,
            excluded: 1,
            sampled_below: None,
        };
        let a = part(vec![0.6, 0.9], vec![(0, 1), (2, 3)], 10);
        let b = part(vec![0.7], vec![(4, 5)], 5);
        let m = TailCount::merge(&[a.clone(), b], 0.5);
        assert_eq!(m.scores, vec![0.6, 0.7, 0.9]);
        assert_eq!(m.members, vec![(0, 1), (4, 5), (2, 3)]);
        assert_eq!((m.pairs, m.excluded), (15, 2));
        // A part without its rows: no members at all, so no design effect is claimed.
        let m = TailCount::merge(&[a, part(vec![0.7], Vec::new(), 5)], 0.5);
        assert!(m.members.is_empty());
        assert_eq!(m.design_effect(0.5), 1.0);
    }

    #[test]
    fn out_of_sample_interval_adds_the_model_counts_spread() {
        let row = |events: u64, d: Option<f64>, ratio: Option<f64>| TailCheckRow {
            level: 1e-6,
            cosine: 0.5,
            events,
            pairs: 100_000_000,
            measured: ratio.map(|r| r * 1e-6),
            ratio,
            ci: Some((0.5e-6, 2e-6)),
            design_effect: d,
            ratio_ci: Some((0.5, 2.0)),
        };
        // Log-ratio variance 4/100 + 2/50 = 0.08.
        let widened =
            row(50, Some(2.0), Some(1.6)).against_model_count(&row(100, Some(4.0), Some(1.0)));
        let sd = 0.08f64.sqrt();
        let (lo, hi) = widened.ratio_ci.unwrap();
        assert!((lo - 1.6 * (-1.96 * sd).exp()).abs() < 1e-12);
        assert!((hi - 1.6 * (1.96 * sd).exp()).abs() < 1e-12);
        // A side without events or unresolved: left as it was.
        let kept = row(50, Some(2.0), Some(1.6)).against_model_count(&row(0, Some(1.0), Some(0.0)));
        assert_eq!(kept.ratio_ci, Some((0.5, 2.0)));
        let kept = row(50, None, None).against_model_count(&row(100, Some(4.0), Some(1.0)));
        assert_eq!(kept.ratio_ci, Some((0.5, 2.0)));
    }

    /// The design effect predicts the spread of counts across pools: pairs are events with probability
    /// `p · w_i · w_j`, a few rows being hubs (`w` = 12), and the variance of the count over replicate
    /// pools is compared with the mean count times the mean estimated design effect.
    #[test]
    fn design_effect_predicts_the_spread_of_clustered_counts() {
        let mut rng = StdRng::seed_from_u64(11);
        let n = 400u32;
        let pairs = u64::from(n) * u64::from(n - 1) / 2;
        for hub_share in [0.0, 0.03] {
            let (mut counts, mut deffs) = (Vec::new(), Vec::new());
            for _ in 0..300 {
                let w: Vec<f64> = (0..n)
                    .map(|_| {
                        if rng.random::<f64>() < hub_share {
                            12.0
                        } else {
                            1.0
                        }
                    })
                    .collect();
                let p = 150.0 / pairs as f64 / (1.0 + hub_share * 11.0).powi(2);
                let mut members = Vec::new();
                for i in 0..n {
                    for j in i + 1..n {
                        if rng.random::<f64>() < p * w[i as usize] * w[j as usize] {
                            members.push((i, j));
                        }
                    }
                }
                let c = events_count(pairs, members);
                counts.push(c.scores.len() as f64);
                deffs.push(c.design_effect(0.9));
            }
            let k = counts.len() as f64;
            let mean = counts.iter().sum::<f64>() / k;
            let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (k - 1.0);
            let deff = deffs.iter().sum::<f64>() / k;
            let measured = var / mean;
            assert!(
                (measured / deff - 1.0).abs() < 0.3,
                "hub share {hub_share}: variance/mean {measured:.2}, mean design effect {deff:.2}"
            );
            if hub_share > 0.0 {
                assert!(deff > 3.0, "hubs must inflate the variance: {deff:.2}");
            } else {
                assert!(deff < 1.2, "independent pairs: {deff:.2}");
            }
        }
    }
}
