//! Evaluation of a deduplication run against ground truth: pair recall and precision at the decision
//! threshold, identification error rates (FNIR at FPIR, DET curve), genuine/impostor score histograms,
//! a calibration check of the predicted false-match rate, and duplicate-cluster sizes.
//!
//! This module is pure: it takes scores and ground truth as plain data (`std` + `serde` only) and does
//! not touch the store.
//!
//! # Definitions
//!
//! Deduplication is a whole-store self-search: every record of the store is a probe against all the
//! others. Scores are on the calibrated scale `-10·log10(estimated false-match rate)` (higher is
//! stronger; 60 ≈ one in a million). A pair is a *hit* at threshold `t` when its score is `≥ t`.
//!
//! * **Ground truth.** A list of duplicate pairs `(subject_a, subject_b)`: records of the same person.
//!   It is closed transitively (union-find): if A~B and B~C are listed, A, B and C are one person and
//!   A~C is a true pair too. `truth_pairs` counts the pairs of that closure, `Σ k·(k−1)/2` over the
//!   persons with `k ≥ 2` records in the store. Truth pairs naming a record that is not in the store
//!   are ignored (and counted in `ignored_truth`).
//! * **Mated / non-mated.** A record is *mated* if it has at least one true partner in the store,
//!   *non-mated* otherwise.
//! * **Mate score** of a mated probe: the maximum score among its reported pairs with true partners,
//!   `−∞` if none was reported (a candidate-generation miss then counts as a miss at every threshold).
//! * **Top score** of a non-mated probe: the maximum score among all its reported pairs (`−∞` if none).
//! * **FNIR(t)** (false-negative identification rate) = share of mated probes with mate score `< t`.
//! * **FPIR(t)** (false-positive identification rate) = share of non-mated probes with top score `≥ t`.
//!   These are the ISO/IEC 19795-1 / NIST FRVT definitions applied to the self-search.
//! * **FNIR at FPIR x** = FNIR at the smallest `t` with `FPIR(t) ≤ x`. With the non-mated top scores
//!   `u₁ ≥ u₂ ≥ …` and `k = ⌊x·N_nonmated⌋`, that set of thresholds is `(u_{k+1}, ∞)`: the reported
//!   threshold is the next `f64` above `u_{k+1}`. It is *not reported* (`None`, with the reason in
//!   `note`) when there are no mated or no non-mated probes, when there are fewer than `1/x` non-mated
//!   probes (an FPIR of `x` cannot be estimated from them), or when at most `k` non-mated probes have
//!   any reported pair (the operating threshold then lies below the lowest reported score, where the
//!   run reported nothing).
//! * **Pair recall** = true hits / truth pairs; **pair precision** = true hits / hits (both at the
//!   decision threshold; `NaN`, serialised as `null`, when the denominator is zero).
//! * **DET** points `(threshold, FPIR, FNIR)` at every distinct mate score and non-mated top score (and
//!   just above the highest non-mated top score, where FPIR reaches 0), ascending in threshold, thinned
//!   to about [`DET_MAX_POINTS`] by even spacing along the curve in log-log space.
//! * **Calibration**: for each `(t, predicted FMR)` the measured FMR is the share of sampled impostor
//!   pairs whose calibrated fused score is `≥ t`.
//! * **Clusters**: union-find over the hits at the threshold; `cluster_sizes` lists
//!   `(cluster size, number of clusters)` for clusters of two or more records.
//!
//! Scored pairs are unordered: `(a, b)` and `(b, a)` are one pair and keep the higher score. Pairs
//! naming an unknown record, self-pairs and `NaN` scores are ignored and counted in `ignored_pairs`.

use serde::{Deserialize, Serialize};

/// Most missed truth pairs listed in [`EvalReport::missed_pairs`] (the total is in `missed_total`).
pub const MISSED_PAIRS_CAP: usize = 1000;
/// The FPIR values at which FNIR is reported.
pub const FPIR_TARGETS: [f64; 3] = [1e-2, 1e-3, 1e-4];
/// Approximate largest number of DET points kept after thinning.
pub const DET_MAX_POINTS: usize = 500;
/// Number of bins of each genuine/impostor histogram.
pub const HISTOGRAM_BINS: usize = 50;

/// A candidate pair and its calibrated score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoredPair {
    /// Subject ID of one record.
    pub a: String,
    /// Subject ID of the other record.
    pub b: String,
    /// Calibrated score, `-10·log10(FMR)`.
    pub score: f64,
}

/// Everything [`evaluate`] needs, borrowed from the caller.
#[derive(Clone, Copy, Debug)]
pub struct EvalInput<'a> {
    /// Every record in the evaluated store (the probes).
    pub subjects: &'a [String],
    /// All scored pairs the run reported, down to some floor (may include pairs below the threshold).
    pub pairs: &'a [ScoredPair],
    /// Ground-truth duplicate pairs.
    pub truth: &'a [(String, String)],
    /// The decision threshold (calibrated scale) the run used.
    pub threshold: f64,
    /// Genuine score samples per label ("face", "finger2", "fused"...): cosines, calibrated for fused.
    pub genuine: &'a [(String, Vec<f64>)],
    /// Impostor score samples per label, same conventions as `genuine`.
    pub impostor: &'a [(String, Vec<f64>)],
    /// `(threshold on the calibrated scale, FMR the model predicts)` for the calibration check.
    pub predicted_fmr: &'a [(f64, f64)],
    /// Calibrated fused scores of sampled impostor pairs, for the measured FMR.
    pub impostor_fused: &'a [f64],
}

/// FNIR at one target FPIR.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FnirAtFpir {
    /// The target FPIR `x`.
    pub target_fpir: f64,
    /// FNIR at the smallest threshold with `FPIR ≤ x`; `None` when the data cannot tell (see `note`).
    pub fnir: Option<f64>,
    /// That threshold (calibrated scale; hits are scores `≥` it).
    pub threshold: Option<f64>,
    /// The FPIR actually reached at that threshold (`≤ target_fpir`).
    pub achieved_fpir: Option<f64>,
    /// Why `fnir` is `None`.
    pub note: Option<String>,
    /// True when the threshold lies below the run's decision threshold in an index-mode run whose pairs
    /// there are not proven complete (see [`EvalReport::notes`]).
    #[serde(default)]
    pub incomplete: bool,
}

impl std::fmt::Display for FnirAtFpir {
    /// One line: `FNIR 0.1176 at FPIR 1e-2 (threshold 30.32, achieved FPIR 0.0100)`, or the reason.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.fnir, self.threshold, self.achieved_fpir) {
            (Some(fnir), Some(t), Some(a)) => write!(
                f,
                "FNIR {fnir:.4} at FPIR {:.0e} (threshold {t:.2}, achieved FPIR {a:.4})",
                self.target_fpir
            ),
            _ => write!(
                f,
                "FNIR n/a at FPIR {:.0e}: {}",
                self.target_fpir,
                self.note
                    .as_deref()
                    .unwrap_or("not reachable with the data")
            ),
        }
    }
}

/// One point of the DET curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetPoint {
    /// Threshold on the calibrated scale.
    pub threshold: f64,
    /// FPIR at that threshold.
    pub fpir: f64,
    /// FNIR at that threshold.
    pub fnir: f64,
    /// True when computed from pairs the run does not prove complete (below its threshold in index mode).
    #[serde(default)]
    pub incomplete: bool,
}

/// Genuine and impostor score counts of one label on common bins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Label ("face", "finger2", "fused"...).
    pub label: String,
    /// Bin edges, `bins + 1` ascending values (empty when the label has no finite sample); bin `i` is
    /// `[edges[i], edges[i+1])`, the last bin also holds its upper edge.
    pub edges: Vec<f64>,
    /// Genuine counts per bin.
    pub genuine: Vec<usize>,
    /// Impostor counts per bin.
    pub impostor: Vec<usize>,
    /// Genuine samples left out because they were not finite.
    pub genuine_non_finite: usize,
    /// Impostor samples left out because they were not finite.
    pub impostor_non_finite: usize,
    /// The decision threshold, when this label is on the calibrated scale (labels starting "fused").
    pub threshold: Option<f64>,
}

/// Predicted against measured false-match rate at one threshold.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationPoint {
    /// Threshold on the calibrated scale.
    #[serde(with = "nan_as_null")]
    pub threshold: f64,
    /// FMR the score model predicts at that threshold: the share of the compared pairs it gives a score at
    /// or above it, each pair at the lowest score it can attain there
    /// ([`crate::fusion::Calibration::attainable_fmr`]; at most the nominal `10^(−threshold/10)`).
    #[serde(with = "nan_as_null")]
    pub predicted_fmr: f64,
    /// Share of sampled impostor pairs scoring `≥ threshold` (`None` without impostor samples).
    pub measured_fmr: Option<f64>,
    /// Number of sampled impostor pairs scoring `≥ threshold`.
    pub false_matches: usize,
    /// Number of (finite) impostor samples the measurement used.
    pub impostor_samples: usize,
    /// Two-sided 95 % Clopper–Pearson interval of the measured FMR (`None` without impostor samples): with
    /// few false matches the measurement cannot tell predicted from measured, and the interval says how far.
    #[serde(default)]
    pub measured_ci: Option<(f64, f64)>,
    /// Where the measurement counted every pair of a pool (the fused check): how much its events cluster on
    /// shared rows ([`crate::tail::design_effect`]); `measured_ci` is then the interval of the effective
    /// count. `None` for sampled pairs.
    #[serde(default)]
    pub design_effect: Option<f64>,
}

/// The result of [`evaluate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Distinct records in the evaluated store.
    pub records: usize,
    /// Records with at least one true partner in the store.
    pub mated_records: usize,
    /// Records without a true partner in the store.
    pub non_mated_records: usize,
    /// True pairs within the store (transitive closure of the ground truth).
    pub truth_pairs: usize,
    /// The decision threshold.
    #[serde(with = "nan_as_null")]
    pub threshold: f64,
    /// Distinct pairs scoring `≥ threshold`.
    pub hits: usize,
    /// Hits that are true pairs.
    pub true_hits: usize,
    /// Hits that are not true pairs.
    pub false_hits: usize,
    /// `true_hits / truth_pairs` (`NaN` / `null` without truth pairs).
    #[serde(with = "nan_as_null")]
    pub pair_recall: f64,
    /// `true_hits / hits` (`NaN` / `null` without hits).
    #[serde(with = "nan_as_null")]
    pub pair_precision: f64,
    /// Truth pairs not hit at the threshold, at most [`MISSED_PAIRS_CAP`] of them.
    pub missed_pairs: Vec<(String, String)>,
    /// Number of truth pairs not hit at the threshold.
    pub missed_total: usize,
    /// Mated probes none of whose true pairs was reported at all (mate score `−∞`).
    pub unreported_mates: usize,
    /// FNIR at each FPIR of [`FPIR_TARGETS`].
    pub fnir_at_fpir: Vec<FnirAtFpir>,
    /// DET curve, ascending threshold.
    pub det: Vec<DetPoint>,
    /// Per label: genuine and impostor counts on common bins.
    pub histograms: Vec<Histogram>,
    /// Predicted against measured FMR.
    pub calibration: Vec<CalibrationPoint>,
    /// `(cluster size, number of clusters)` from union-find over the hits, ascending size.
    pub cluster_sizes: Vec<(usize, usize)>,
    /// Scored pairs ignored: unknown record, self-pair or `NaN` score.
    pub ignored_pairs: usize,
    /// Truth pairs ignored: record not in the store, or a record paired with itself.
    pub ignored_truth: usize,
    /// Human-readable remarks about the input (ignored entries, duplicated subject IDs) and the limits of
    /// the figures (pairs the run does not prove complete).
    pub notes: Vec<String>,
    /// The evaluated run's completeness audit (index-mode runs).
    #[serde(default)]
    pub run_audit: Option<crate::audit::Audit>,
    /// Per modality, the calibration's impostor tail checked against every pair of a pool disjoint from the
    /// calibration's own (out of sample), labelled genuine pairs left out.
    #[serde(default)]
    pub tail_checks: Vec<crate::fusion::ModalityTailCheck>,
    /// The fused score checked against every pair of a pool of rows, labelled genuine pairs left out.
    #[serde(default)]
    pub fused_count: Option<FusedCount>,
    /// How often modalities of the same impostor pair exceed their tails together, against independence.
    #[serde(default)]
    pub dependence: Vec<CoExceedance>,
}

/// Two or more modalities of the same impostor pairs exceeding their own tail levels together, counted on
/// every pair of a pool, against what independence predicts from the counted marginals. The fused model
/// adds modality LLRs and convolves their impostor distributions, which assumes independence given the
/// quality bands; a ratio near 1 shows the assumption holds at that level, a ratio well above 1 that the
/// fused FMR there is optimistic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoExceedance {
    /// The modalities (keys) counted together.
    pub modalities: Vec<String>,
    /// The impostor tail level each modality's cosine is set at (from its calibrated model).
    pub level: f64,
    /// Per modality, the cosine at `level`.
    pub cosines: Vec<f32>,
    /// Per modality, the pool's pairs at or above its cosine.
    pub marginal: Vec<u64>,
    /// Pairs of the pool (labelled genuine pairs left out).
    pub pairs: u64,
    /// Pairs at or above every modality's cosine at once.
    pub joint: u64,
    /// What independence predicts: `pairs · Π (marginal / pairs)`.
    pub expected: f64,
    /// `joint / expected` (`None` when fewer than one joint event is expected).
    pub ratio: Option<f64>,
    /// Two-sided 95 % Clopper–Pearson interval of the ratio (the marginals' own error is far smaller).
    pub ratio_ci: Option<(f64, f64)>,
}

/// Predicted against measured fused FMR over every pair of a pool of rows (not a sample of pairs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedCount {
    /// Rows in the pool.
    pub pool_rows: usize,
    /// Pairs counted (labelled genuine pairs left out).
    pub pairs: u64,
    /// One point per fused-score threshold; `measured_fmr` is `None` where the count expects under one event.
    pub points: Vec<CalibrationPoint>,
    /// Per point, the rows of the nested sub-pool it was counted on (low scores, whose candidates are many,
    /// on fewer rows; see [`crate::evaluation::fused_count`]). Empty in reports written before it existed.
    #[serde(default)]
    pub point_rows: Vec<usize>,
}

/// Serialises non-finite `f64` as `null` and reads `null` back as `NaN` (JSON has no NaN).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `v`, or `null` when it is not finite.
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    /// Reads a number, or `null` as `NaN`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Union-find over `pairs` of indices into `subjects`: the clusters of two or more records, members
/// ascending, clusters ordered by their smallest member. Out-of-range indices and self-pairs are ignored.
pub fn clusters_from_pairs(
    subjects: &[String],
    pairs: impl Iterator<Item = (usize, usize)>,
) -> Vec<Vec<usize>> {
    let pairs: Vec<(usize, usize)> = pairs.collect();
    crate::cluster::union_find(subjects.len(), &pairs)
}

/// Mate scores of mated probes and top scores of non-mated probes, each sorted ascending.
struct IdentScores {
    mate: Vec<f64>,
    nonmated_top: Vec<f64>,
}

impl IdentScores {
    fn new(mut mate: Vec<f64>, mut nonmated_top: Vec<f64>) -> Self {
        mate.sort_unstable_by(f64::total_cmp);
        nonmated_top.sort_unstable_by(f64::total_cmp);
        Self { mate, nonmated_top }
    }

    /// Share of mated probes with mate score `< t` (`NaN` without mated probes).
    fn fnir(&self, t: f64) -> f64 {
        let below = self.mate.partition_point(|&s| s < t);
        below as f64 / self.mate.len() as f64
    }

    /// Share of non-mated probes with top score `≥ t` (`NaN` without non-mated probes).
    fn fpir(&self, t: f64) -> f64 {
        let below = self.nonmated_top.partition_point(|&s| s < t);
        (self.nonmated_top.len() - below) as f64 / self.nonmated_top.len() as f64
    }

    /// FNIR at the smallest threshold with `FPIR ≤ x`; `lowest` is the lowest reported score.
    fn fnir_at_fpir(&self, x: f64, lowest: Option<f64>) -> FnirAtFpir {
        let none = |note: String| FnirAtFpir {
            target_fpir: x,
            fnir: None,
            threshold: None,
            achieved_fpir: None,
            note: Some(note),
            incomplete: false,
        };
        let (m, n) = (self.mate.len(), self.nonmated_top.len());
        if m == 0 {
            return none(
                "no mated probes: the ground truth has no duplicate within the store".into(),
            );
        }
        if n == 0 {
            return none("no non-mated probes: every record has a true partner".into());
        }
        if x.is_nan() || x <= 0.0 || (n as f64) * x < 1.0 {
            let need = if x > 0.0 {
                format!("at least {:.0}", (1.0 / x).ceil())
            } else {
                "infinitely many".to_string()
            };
            return none(format!(
                "needs {need} non-mated probes to estimate, have {n}"
            ));
        }
        // Largest number of non-mated probes allowed at or above the threshold: k/n ≤ x (with a
        // relative tolerance so that e.g. x = 1e-3, n = 1000 allows exactly one).
        let k = ((n as f64) * x * (1.0 + 1e-9)).floor() as usize;
        let reported = n - self
            .nonmated_top
            .partition_point(|&s| s == f64::NEG_INFINITY);
        if reported <= k {
            let (at, bound) = match lowest {
                Some(l) => (format!("{l:.3}"), format!("{:.6}", self.fnir(l))),
                None => ("(none)".into(), "1".into()),
            };
            return none(format!(
                "FPIR is already ≤ {x:e} at the lowest reported score {at}: the operating threshold \
                 lies below the reporting floor (FNIR there ≤ {bound})"
            ));
        }
        // Non-mated top scores descending: u_{k+1} is the (k+1)-th largest.
        let u = self.nonmated_top[n - 1 - k];
        if !u.is_finite() {
            return none(format!(
                "more than {k} non-mated probes have an infinite top score: no threshold reaches it"
            ));
        }
        let t = u.next_up();
        FnirAtFpir {
            target_fpir: x,
            fnir: Some(self.fnir(t)),
            threshold: Some(t),
            achieved_fpir: Some(self.fpir(t)),
            note: None,
            incomplete: false,
        }
    }

    /// DET points at every distinct finite score (and just above the top non-mated score), thinned.
    fn det(&self) -> Vec<DetPoint> {
        if self.mate.is_empty() || self.nonmated_top.is_empty() {
            return Vec::new();
        }
        let mut ts: Vec<f64> = self
            .mate
            .iter()
            .chain(self.nonmated_top.iter())
            .copied()
            .filter(|s| s.is_finite())
            .collect();
        if let Some(&max_top) = self.nonmated_top.iter().rev().find(|s| s.is_finite()) {
            ts.push(max_top.next_up());
        }
        ts.sort_unstable_by(f64::total_cmp);
        ts.dedup();
        let points: Vec<DetPoint> = ts
            .into_iter()
            .map(|t| DetPoint {
                threshold: t,
                fpir: self.fpir(t),
                fnir: self.fnir(t),
                incomplete: false,
            })
            .collect();
        let floor_x = 0.5 / self.nonmated_top.len() as f64;
        let floor_y = 0.5 / self.mate.len() as f64;
        thin_det(points, floor_x, floor_y, DET_MAX_POINTS)
    }
}

/// Keeps about `max` points evenly spaced along the curve in log-log space (zeros at `floor_*`),
/// always the first and the last.
fn thin_det(points: Vec<DetPoint>, floor_x: f64, floor_y: f64, max: usize) -> Vec<DetPoint> {
    if points.len() <= max || max < 3 {
        return points;
    }
    let pos = |p: &DetPoint| (p.fpir.max(floor_x).log10(), p.fnir.max(floor_y).log10());
    let mut cum = Vec::with_capacity(points.len());
    let mut total = 0.0f64;
    let mut prev = pos(&points[0]);
    for p in &points {
        let q = pos(p);
        total += (q.0 - prev.0).hypot(q.1 - prev.1);
        cum.push(total);
        prev = q;
    }
    let step = total / (max - 2) as f64;
    let last = points.len() - 1;
    let mut kept = Vec::with_capacity(max + 1);
    let mut last_cum = f64::NEG_INFINITY;
    for (i, p) in points.into_iter().enumerate() {
        if i == 0 || i == last || (step > 0.0 && cum[i] - last_cum >= step) {
            last_cum = cum[i];
            kept.push(p);
        }
    }
    kept
}

/// Genuine and impostor histograms on common bins, one per label (genuine labels first, in order).
fn histograms(
    genuine: &[(String, Vec<f64>)],
    impostor: &[(String, Vec<f64>)],
    threshold: f64,
) -> Vec<Histogram> {
    let mut labels: Vec<&str> = Vec::new();
    for (l, _) in genuine.iter().chain(impostor.iter()) {
        if !labels.contains(&l.as_str()) {
            labels.push(l);
        }
    }
    labels
        .into_iter()
        .map(|label| {
            let collect = |side: &[(String, Vec<f64>)]| {
                let mut finite = Vec::new();
                let mut non_finite = 0usize;
                for (_, v) in side.iter().filter(|(l, _)| l == label) {
                    for &s in v {
                        if s.is_finite() {
                            finite.push(s);
                        } else {
                            non_finite += 1;
                        }
                    }
                }
                (finite, non_finite)
            };
            let (g, g_bad) = collect(genuine);
            let (i, i_bad) = collect(impostor);
            let calibrated = label.to_ascii_lowercase().starts_with("fused");
            let mark = (calibrated && threshold.is_finite()).then_some(threshold);
            let mut lo = f64::INFINITY;
            let mut hi = f64::NEG_INFINITY;
            for &s in g.iter().chain(i.iter()) {
                lo = lo.min(s);
                hi = hi.max(s);
            }
            let (edges, gc, ic) = if lo > hi {
                (Vec::new(), Vec::new(), Vec::new())
            } else {
                if let Some(t) = mark {
                    lo = lo.min(t);
                    hi = hi.max(t);
                }
                if lo == hi {
                    lo -= 0.5;
                    hi += 0.5;
                }
                let width = (hi - lo) / HISTOGRAM_BINS as f64;
                let edges: Vec<f64> = (0..=HISTOGRAM_BINS)
                    .map(|k| {
                        if k == HISTOGRAM_BINS {
                            hi
                        } else {
                            lo + width * k as f64
                        }
                    })
                    .collect();
                let count = |v: &[f64]| {
                    let mut c = vec![0usize; HISTOGRAM_BINS];
                    for &s in v {
                        // `as` saturates (NaN → 0), so the index is always in range.
                        let k = (((s - lo) / width).floor() as usize).min(HISTOGRAM_BINS - 1);
                        c[k] += 1;
                    }
                    c
                };
                let (gc, ic) = (count(&g), count(&i));
                (edges, gc, ic)
            };
            Histogram {
                label: label.to_string(),
                edges,
                genuine: gc,
                impostor: ic,
                genuine_non_finite: g_bad,
                impostor_non_finite: i_bad,
                threshold: mark,
            }
        })
        .collect()
}

/// Measured against predicted FMR at each threshold of `predicted`.
fn calibration(predicted: &[(f64, f64)], impostor_fused: &[f64]) -> Vec<CalibrationPoint> {
    let mut imp: Vec<f64> = impostor_fused
        .iter()
        .copied()
        .filter(|s| !s.is_nan())
        .collect();
    imp.sort_unstable_by(f64::total_cmp);
    let n = imp.len();
    predicted
        .iter()
        .map(|&(t, p)| {
            let false_matches = if t.is_nan() {
                0
            } else {
                n - imp.partition_point(|&s| s < t)
            };
            CalibrationPoint {
                threshold: t,
                predicted_fmr: p,
                measured_fmr: (n > 0).then(|| false_matches as f64 / n as f64),
                false_matches,
                impostor_samples: n,
                measured_ci: (n > 0)
                    .then(|| crate::audit::clopper_pearson(false_matches as u64, n as u64, 0.95)),
                design_effect: None,
            }
        })
        .collect()
}

/// `num / den`, `NaN` when `den` is zero.
fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        f64::NAN
    } else {
        num as f64 / den as f64
    }
}

/// Evaluates a run: see the module documentation for every definition. Never panics on bad input:
/// unknown records, self-pairs and `NaN` scores are ignored and counted.
pub fn evaluate(input: &EvalInput) -> EvalReport {
    let subjects = input.subjects;
    let n = subjects.len();
    let mut notes = Vec::new();

    // Subject index; a repeated ID keeps its first position, later copies are not probes.
    let mut index: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(n);
    let mut canonical = vec![false; n];
    let mut repeated = 0usize;
    for (i, s) in subjects.iter().enumerate() {
        if index.contains_key(s.as_str()) {
            repeated += 1;
        } else {
            index.insert(s, i);
            canonical[i] = true;
        }
    }
    if repeated > 0 {
        notes.push(format!(
            "{repeated} repeated subject ID(s) in the store list were counted once"
        ));
    }
    let records = n - repeated;

    // Scored pairs: unordered, distinct, highest score kept.
    let mut pairs: Vec<(usize, usize, f64)> = Vec::with_capacity(input.pairs.len());
    let mut ignored_pairs = 0usize;
    let mut example_unknown: Option<&str> = None;
    for p in input.pairs {
        match (index.get(p.a.as_str()), index.get(p.b.as_str())) {
            (Some(&i), Some(&j)) if i != j && !p.score.is_nan() => {
                pairs.push((i.min(j), i.max(j), p.score));
            }
            (ia, ib) => {
                ignored_pairs += 1;
                if example_unknown.is_none() {
                    example_unknown = match (ia, ib) {
                        (None, _) => Some(&p.a),
                        (_, None) => Some(&p.b),
                        _ => None,
                    };
                }
            }
        }
    }
    if ignored_pairs > 0 {
        let eg = example_unknown
            .map(|s| format!(", e.g. unknown subject '{s}'"))
            .unwrap_or_default();
        notes.push(format!(
            "{ignored_pairs} scored pair(s) ignored (unknown subject, self-pair or NaN score{eg})"
        ));
    }
    pairs.sort_unstable_by(|x, y| (x.0, x.1).cmp(&(y.0, y.1)).then(y.2.total_cmp(&x.2)));
    pairs.dedup_by(|later, first| later.0 == first.0 && later.1 == first.1);

    // Ground truth, closed transitively.
    let mut truth = crate::cluster::Dsu::new(n);
    let mut ignored_truth = 0usize;
    for (a, b) in input.truth {
        match (index.get(a.as_str()), index.get(b.as_str())) {
            (Some(&i), Some(&j)) if i != j => truth.union(i, j),
            _ => ignored_truth += 1,
        }
    }
    if ignored_truth > 0 {
        notes.push(format!(
            "{ignored_truth} ground-truth pair(s) ignored (a subject not in the store, or a self-pair)"
        ));
    }
    let person: Vec<usize> = (0..n).map(|i| truth.find(i)).collect();
    let mated: Vec<bool> = (0..n).map(|i| truth.size_of_root(person[i]) >= 2).collect();
    let truth_pairs: usize = (0..n)
        .filter(|&i| person[i] == i)
        .map(|i| truth.size_of_root(i) * (truth.size_of_root(i) - 1) / 2)
        .sum();

    // One pass over the pairs: mate / top scores and hits.
    let threshold = input.threshold;
    let mut mate = vec![f64::NEG_INFINITY; n];
    let mut top = vec![f64::NEG_INFINITY; n];
    let mut hit_edges = Vec::new();
    let mut true_hit_pairs: Vec<(usize, usize)> = Vec::new();
    let mut lowest: Option<f64> = None;
    for &(i, j, s) in &pairs {
        let is_true = person[i] == person[j];
        if is_true {
            mate[i] = mate[i].max(s);
            mate[j] = mate[j].max(s);
        }
        top[i] = top[i].max(s);
        top[j] = top[j].max(s);
        if s.is_finite() {
            lowest = Some(lowest.map_or(s, |l: f64| l.min(s)));
        }
        if s >= threshold {
            hit_edges.push((i, j));
            if is_true {
                true_hit_pairs.push((i, j));
            }
        }
    }
    let hits = hit_edges.len();
    let true_hits = true_hit_pairs.len();

    // Missed truth pairs, listed person by person (store order), capped.
    let mut missed_pairs = Vec::new();
    'outer: for group in truth.groups() {
        for (x, &a) in group.iter().enumerate() {
            for &b in &group[x + 1..] {
                if missed_pairs.len() >= MISSED_PAIRS_CAP {
                    break 'outer;
                }
                if true_hit_pairs.binary_search(&(a, b)).is_err() {
                    missed_pairs.push((subjects[a].clone(), subjects[b].clone()));
                }
            }
        }
    }

    let mut mate_scores = Vec::new();
    let mut nonmated_tops = Vec::new();
    for i in (0..n).filter(|&i| canonical[i]) {
        if mated[i] {
            mate_scores.push(mate[i]);
        } else {
            nonmated_tops.push(top[i]);
        }
    }
    let unreported_mates = mate_scores
        .iter()
        .filter(|s| **s == f64::NEG_INFINITY)
        .count();
    let ident = IdentScores::new(mate_scores, nonmated_tops);

    let mut sizes: Vec<usize> = clusters_from_pairs(subjects, hit_edges.into_iter())
        .iter()
        .map(Vec::len)
        .collect();
    sizes.sort_unstable();
    let mut cluster_sizes: Vec<(usize, usize)> = Vec::new();
    for s in sizes {
        match cluster_sizes.last_mut() {
            Some((size, count)) if *size == s => *count += 1,
            _ => cluster_sizes.push((s, 1)),
        }
    }

    EvalReport {
        records,
        mated_records: ident.mate.len(),
        non_mated_records: ident.nonmated_top.len(),
        truth_pairs,
        threshold,
        hits,
        true_hits,
        false_hits: hits - true_hits,
        pair_recall: ratio(true_hits, truth_pairs),
        pair_precision: ratio(true_hits, hits),
        missed_pairs,
        missed_total: truth_pairs - true_hits,
        unreported_mates,
        fnir_at_fpir: FPIR_TARGETS
            .iter()
            .map(|&x| ident.fnir_at_fpir(x, lowest))
            .collect(),
        det: ident.det(),
        histograms: histograms(input.genuine, input.impostor, threshold),
        calibration: calibration(input.predicted_fmr, input.impostor_fused),
        cluster_sizes,
        ignored_pairs,
        ignored_truth,
        notes,
        run_audit: None,
        tail_checks: Vec::new(),
        fused_count: None,
        dependence: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn sp(a: &str, b: &str, score: f64) -> ScoredPair {
        ScoredPair {
            a: a.into(),
            b: b.into(),
            score,
        }
    }

    fn tp(a: &str, b: &str) -> (String, String) {
        (a.into(), b.into())
    }

    fn input<'a>(
        subjects: &'a [String],
        pairs: &'a [ScoredPair],
        truth: &'a [(String, String)],
        threshold: f64,
    ) -> EvalInput<'a> {
        EvalInput {
            subjects,
            pairs,
            truth,
            threshold,
            genuine: &[],
            impostor: &[],
            predicted_fmr: &[],
            impostor_fused: &[],
        }
    }

    /// A1~A2; B1~B2~B3 (B1~B3 by closure); C, D, E singletons.
    fn small() -> (Vec<String>, Vec<ScoredPair>, Vec<(String, String)>) {
        let subjects = ids(&["A1", "A2", "B1", "B2", "B3", "C", "D", "E"]);
        let pairs = vec![
            sp("A1", "A2", 70.0),
            sp("B1", "B2", 50.0),
            sp("B3", "B2", 20.0),
            sp("C", "D", 40.0),
            sp("E", "A1", 35.0),
            sp("D", "E", 10.0),
        ];
        let truth = vec![tp("A1", "A2"), tp("B1", "B2"), tp("B2", "B3")];
        (subjects, pairs, truth)
    }

    #[test]
    fn counts_recall_precision_and_missed_pairs_by_hand() {
        let (s, p, t) = small();
        let r = evaluate(&input(&s, &p, &t, 30.0));
        assert_eq!(r.records, 8);
        assert_eq!(r.mated_records, 5);
        assert_eq!(r.non_mated_records, 3);
        assert_eq!(r.truth_pairs, 4, "A1A2 + B1B2, B2B3 and the implied B1B3");
        assert_eq!((r.hits, r.true_hits, r.false_hits), (4, 2, 2));
        assert_eq!(r.pair_recall, 0.5);
        assert_eq!(r.pair_precision, 0.5);
        assert_eq!(r.missed_total, 2);
        assert_eq!(r.missed_pairs, vec![tp("B1", "B3"), tp("B2", "B3")]);
        assert_eq!(r.unreported_mates, 0);
        // Hits A1A2, B1B2, CD, EA1: clusters {A1,A2,E}, {B1,B2}, {C,D}.
        assert_eq!(r.cluster_sizes, vec![(2, 2), (3, 1)]);
        assert_eq!((r.ignored_pairs, r.ignored_truth), (0, 0));
        // A score equal to the threshold is a hit (E-A1 scores exactly 35).
        assert_eq!(evaluate(&input(&s, &p, &t, 35.0)).false_hits, 2);
        assert_eq!(evaluate(&input(&s, &p, &t, 35f64.next_up())).false_hits, 1);
    }

    #[test]
    fn det_points_by_hand() {
        let (s, p, t) = small();
        let r = evaluate(&input(&s, &p, &t, 30.0));
        // Mate scores A1 70, A2 70, B1 50, B2 50, B3 20; non-mated tops C 40, D 40, E 35.
        let want = [
            (20.0, 1.0, 0.0),
            (35.0, 1.0, 0.2),
            (40.0, 2.0 / 3.0, 0.2),
            (40f64.next_up(), 0.0, 0.2),
            (50.0, 0.0, 0.2),
            (70.0, 0.0, 0.6),
        ];
        let got: Vec<(f64, f64, f64)> = r
            .det
            .iter()
            .map(|d| (d.threshold, d.fpir, d.fnir))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn fnir_at_fpir_by_hand() {
        // 200 non-mated records N0..N199 paired (N2k, N2k+1) at score k: two tops at each of 0..99.
        // Mated pairs M0~M1 120, M2~M3 100, M4~M5 98, M6~M7 97, M8~M9 50.
        let mut subjects: Vec<String> = (0..200).map(|i| format!("N{i}")).collect();
        subjects.extend((0..10).map(|i| format!("M{i}")));
        let mut pairs: Vec<ScoredPair> = (0..100)
            .map(|k| sp(&format!("N{}", 2 * k), &format!("N{}", 2 * k + 1), k as f64))
            .collect();
        let mut truth = Vec::new();
        for (k, score) in [120.0, 100.0, 98.0, 97.0, 50.0].into_iter().enumerate() {
            let (a, b) = (format!("M{}", 2 * k), format!("M{}", 2 * k + 1));
            pairs.push(sp(&a, &b, score));
            truth.push((a, b));
        }
        let r = evaluate(&input(&subjects, &pairs, &truth, 60.0));
        assert_eq!(r.non_mated_records, 200);
        let at1 = &r.fnir_at_fpir[0];
        assert_eq!(at1.target_fpir, 1e-2);
        // FPIR ≤ 0.01 allows 2 of 200 tops ≥ t: the two at 99, so t just above 98.
        assert_eq!(at1.threshold, Some(98f64.next_up()));
        assert_eq!(at1.achieved_fpir, Some(0.01));
        // Mates ≤ 98: the pairs at 98, 97 and 50 → 6 of 10.
        assert_eq!(at1.fnir, Some(0.6));
        assert!(at1.note.is_none());
        assert_eq!(
            at1.to_string(),
            "FNIR 0.6000 at FPIR 1e-2 (threshold 98.00, achieved FPIR 0.0100)"
        );
        assert_eq!(
            r.fnir_at_fpir[1].to_string(),
            "FNIR n/a at FPIR 1e-3: needs at least 1000 non-mated probes to estimate, have 200"
        );
        // 1e-3 and 1e-4 need 1000 / 10000 non-mated probes.
        for at in &r.fnir_at_fpir[1..] {
            assert_eq!(at.fnir, None);
            assert!(
                at.note
                    .as_deref()
                    .unwrap_or("")
                    .contains("non-mated probes"),
                "{at:?}"
            );
        }
    }

    #[test]
    fn fnir_at_fpir_below_reporting_floor_is_not_reported() {
        // 200 non-mated, only one of them has a reported pair (with a mated record).
        let mut subjects: Vec<String> = (0..200).map(|i| format!("N{i}")).collect();
        subjects.extend(ids(&["M0", "M1"]));
        let pairs = vec![sp("M0", "M1", 80.0), sp("N0", "M0", 30.0)];
        let truth = vec![tp("M0", "M1")];
        let r = evaluate(&input(&subjects, &pairs, &truth, 60.0));
        let at1 = &r.fnir_at_fpir[0];
        assert_eq!(at1.fnir, None);
        assert!(
            at1.note
                .as_deref()
                .unwrap_or("")
                .contains("reporting floor"),
            "{at1:?}"
        );
    }

    #[test]
    fn unreported_mate_is_a_miss_at_every_threshold() {
        let subjects = ids(&["A", "B", "C", "D"]);
        let truth = vec![tp("A", "B"), tp("C", "D")];
        let pairs = vec![sp("A", "B", 40.0)];
        let r = evaluate(&input(&subjects, &pairs, &truth, 30.0));
        assert_eq!(r.unreported_mates, 2);
        assert_eq!(r.missed_pairs, vec![tp("C", "D")]);
        // No non-mated probes: no DET, FNIR at FPIR not reported.
        assert!(r.det.is_empty());
        assert!(r.fnir_at_fpir.iter().all(|f| f.fnir.is_none()));
        let ident = IdentScores::new(
            vec![40.0, 40.0, f64::NEG_INFINITY, f64::NEG_INFINITY],
            vec![],
        );
        assert_eq!(ident.fnir(-1e300), 0.5);
        assert_eq!(ident.fnir(40.0), 0.5);
        assert_eq!(ident.fnir(41.0), 1.0);
    }

    #[test]
    fn bad_and_repeated_pairs_are_ignored_or_merged() {
        let subjects = ids(&["A", "B", "C", "A"]);
        let truth = vec![tp("A", "B"), tp("A", "ghost"), tp("C", "C")];
        let pairs = vec![
            sp("A", "B", 10.0),
            sp("B", "A", 45.0), // same pair, higher score wins
            sp("A", "B", 20.0),
            sp("A", "ghost", 99.0),
            sp("C", "C", 99.0),
            sp("B", "C", f64::NAN),
        ];
        let r = evaluate(&input(&subjects, &pairs, &truth, 30.0));
        assert_eq!(r.records, 3);
        assert_eq!((r.ignored_pairs, r.ignored_truth), (3, 2));
        assert_eq!(
            (r.hits, r.true_hits),
            (1, 1),
            "one distinct pair, scored 45"
        );
        assert_eq!(r.truth_pairs, 1);
        assert_eq!(r.notes.len(), 3, "{:?}", r.notes);
        assert!(r.notes.iter().any(|n| n.contains("ghost")));
    }

    #[test]
    fn no_hits_gives_nan_precision_that_survives_json() {
        let (s, p, t) = small();
        let r = evaluate(&input(&s, &p, &t, 1000.0));
        assert_eq!(r.hits, 0);
        assert_eq!(r.pair_recall, 0.0);
        assert!(r.pair_precision.is_nan());
        assert!(r.cluster_sizes.is_empty());
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"pair_precision\":null"));
        let back: EvalReport = serde_json::from_str(&json).unwrap();
        assert!(back.pair_precision.is_nan());
        assert_eq!(back.det, r.det);
        assert_eq!(back.fnir_at_fpir, r.fnir_at_fpir);
    }

    #[test]
    fn histograms_share_bins_and_mark_threshold_on_fused_only() {
        let genuine = vec![
            ("face".to_string(), vec![0.5, 0.9, f64::NAN]),
            ("fused".to_string(), vec![70.0, 80.0]),
        ];
        let impostor = vec![
            ("face".to_string(), vec![0.1, 0.5]),
            ("fused".to_string(), vec![5.0]),
        ];
        let subjects = ids(&["A"]);
        let mut inp = input(&subjects, &[], &[], 100.0);
        inp.genuine = &genuine;
        inp.impostor = &impostor;
        let r = evaluate(&inp);
        assert_eq!(r.histograms.len(), 2);
        let face = &r.histograms[0];
        assert_eq!(face.label, "face");
        assert_eq!(face.edges.len(), HISTOGRAM_BINS + 1);
        assert_eq!((face.edges[0], face.edges[HISTOGRAM_BINS]), (0.1, 0.9));
        assert_eq!(face.genuine.iter().sum::<usize>(), 2);
        assert_eq!(face.impostor.iter().sum::<usize>(), 2);
        assert_eq!(
            face.genuine[HISTOGRAM_BINS - 1],
            1,
            "max lands in the last bin"
        );
        assert_eq!(face.impostor[0], 1, "min lands in the first bin");
        let g_half = face.genuine.iter().position(|&c| c > 0);
        let i_half = face.impostor.iter().rposition(|&c| c > 0);
        assert_eq!(g_half, i_half, "0.5 falls in the same bin on both sides");
        assert_eq!((face.genuine_non_finite, face.threshold), (1, None));
        let fused = &r.histograms[1];
        assert_eq!(fused.threshold, Some(100.0));
        // The range is widened to show the threshold line.
        assert_eq!((fused.edges[0], fused.edges[HISTOGRAM_BINS]), (5.0, 100.0));
    }

    #[test]
    fn calibration_measures_share_at_or_above_threshold() {
        let predicted = vec![(25.0, 0.3), (45.0, 0.01), (10.0, 0.5)];
        let imp = vec![10.0, 20.0, 30.0, 40.0, f64::NAN];
        let subjects = ids(&["A"]);
        let mut inp = input(&subjects, &[], &[], 30.0);
        inp.predicted_fmr = &predicted;
        inp.impostor_fused = &imp;
        let r = evaluate(&inp);
        let got: Vec<(Option<f64>, usize, usize)> = r
            .calibration
            .iter()
            .map(|c| (c.measured_fmr, c.false_matches, c.impostor_samples))
            .collect();
        assert_eq!(
            got,
            vec![(Some(0.5), 2, 4), (Some(0.0), 0, 4), (Some(1.0), 4, 4)]
        );
        assert_eq!(r.calibration[0].predicted_fmr, 0.3);
        inp.impostor_fused = &[];
        assert_eq!(evaluate(&inp).calibration[0].measured_fmr, None);
    }

    #[test]
    fn clusters_are_sorted_and_ignore_bad_indices() {
        let s = ids(&["a", "b", "c", "d", "e", "f"]);
        let got = clusters_from_pairs(&s, [(5, 3), (4, 1), (3, 3), (9, 0), (1, 5)].into_iter());
        assert_eq!(got, vec![vec![1, 3, 4, 5]]);
        let got = clusters_from_pairs(&s, [(5, 4), (2, 0)].into_iter());
        assert_eq!(got, vec![vec![0, 2], vec![4, 5]]);
    }

    #[test]
    fn det_is_thinned_keeping_ends_and_order() {
        // 1500 non-mated tops and 1500 mate scores at distinct values.
        let n = 1500usize;
        let mut subjects: Vec<String> = (0..2 * n).map(|i| format!("N{i}")).collect();
        subjects.extend((0..2 * n).map(|i| format!("M{i}")));
        let mut pairs = Vec::new();
        let mut truth = Vec::new();
        for k in 0..n {
            pairs.push(sp(
                &format!("N{}", 2 * k),
                &format!("N{}", 2 * k + 1),
                k as f64 * 0.01,
            ));
            let (a, b) = (format!("M{}", 2 * k), format!("M{}", 2 * k + 1));
            pairs.push(sp(&a, &b, 5.0 + k as f64 * 0.013));
            truth.push((a, b));
        }
        let r = evaluate(&input(&subjects, &pairs, &truth, 10.0));
        assert!(r.det.len() <= DET_MAX_POINTS + 1, "{}", r.det.len());
        assert!(r.det.len() >= DET_MAX_POINTS / 2, "{}", r.det.len());
        assert_eq!(r.det[0].threshold, 0.0);
        assert_eq!(r.det[0].fpir, 1.0);
        let last = r.det[r.det.len() - 1];
        assert_eq!(last.threshold, 5.0 + (n - 1) as f64 * 0.013);
        assert_eq!((last.fpir, last.fnir), (0.0, (n - 1) as f64 / n as f64));
        assert!(r.det.windows(2).all(|w| w[0].threshold < w[1].threshold));
    }

    fn naive_clusters(n: usize, edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
        let mut adj = vec![Vec::new(); n];
        for &(a, b) in edges {
            if a < n && b < n && a != b {
                adj[a].push(b);
                adj[b].push(a);
            }
        }
        let mut seen = vec![false; n];
        let mut out = Vec::new();
        for s in 0..n {
            if seen[s] {
                continue;
            }
            seen[s] = true;
            let mut comp = vec![s];
            let mut queue = std::collections::VecDeque::from([s]);
            while let Some(x) = queue.pop_front() {
                for &y in &adj[x] {
                    if !seen[y] {
                        seen[y] = true;
                        comp.push(y);
                        queue.push_back(y);
                    }
                }
            }
            if comp.len() >= 2 {
                comp.sort_unstable();
                out.push(comp);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn ident_rates_are_monotone_in_threshold(
            mate in prop::collection::vec(prop_oneof![Just(f64::NEG_INFINITY), -10.0f64..80.0], 1..40),
            tops in prop::collection::vec(prop_oneof![Just(f64::NEG_INFINITY), -10.0f64..80.0], 1..250),
            mut ts in prop::collection::vec(-20.0f64..90.0, 2..30),
        ) {
            let ident = IdentScores::new(mate, tops);
            ts.sort_unstable_by(f64::total_cmp);
            for w in ts.windows(2) {
                prop_assert!(ident.fpir(w[0]) >= ident.fpir(w[1]));
                prop_assert!(ident.fnir(w[0]) <= ident.fnir(w[1]));
            }
            for f in FPIR_TARGETS.iter().map(|&x| ident.fnir_at_fpir(x, Some(-10.0))) {
                if let (Some(t), Some(a)) = (f.threshold, f.achieved_fpir) {
                    prop_assert!(a <= f.target_fpir);
                    prop_assert_eq!(ident.fpir(t), a);
                    // Smallest: any lower threshold exceeds the target.
                    prop_assert!(ident.fpir(t.next_down()) > f.target_fpir);
                }
            }
        }

        #[test]
        fn union_find_equals_bfs(n in 0usize..40, edges in prop::collection::vec((0usize..45, 0usize..45), 0..60)) {
            let s: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            prop_assert_eq!(clusters_from_pairs(&s, edges.iter().copied()), naive_clusters(n, &edges));
        }

        #[test]
        fn fpir_non_increasing_fnir_non_decreasing(
            n in 2usize..30,
            truth in prop::collection::vec((0usize..30, 0usize..30), 0..15),
            pairs in prop::collection::vec((0usize..30, 0usize..30, -5i32..60), 0..80),
        ) {
            let s: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
            let name = |i: usize| format!("s{}", i % n);
            let truth: Vec<(String, String)> = truth.iter().map(|&(a, b)| (name(a), name(b))).collect();
            let pairs: Vec<ScoredPair> = pairs.iter().map(|&(a, b, x)| sp(&name(a), &name(b), x as f64 * 0.5)).collect();
            let r = evaluate(&input(&s, &pairs, &truth, 20.0));
            prop_assert!(r.det.windows(2).all(|w| w[0].threshold < w[1].threshold));
            prop_assert!(r.det.windows(2).all(|w| w[0].fpir >= w[1].fpir && w[0].fnir <= w[1].fnir));
            prop_assert_eq!(r.mated_records + r.non_mated_records, n);
            prop_assert_eq!(r.true_hits + r.missed_total, r.truth_pairs);
            // Rebuild the scores independently: brute force FNIR/FPIR per threshold.
            let idx = |x: &str| s.iter().position(|y| y == x);
            let mut persons: Vec<usize> = (0..n).collect();
            fn root(p: &mut Vec<usize>, x: usize) -> usize { if p[x] == x { x } else { let r = root(p, p[x]); p[x] = r; r } }
            for (a, b) in &truth { let (a, b) = (idx(a).unwrap(), idx(b).unwrap()); let (ra, rb) = (root(&mut persons, a), root(&mut persons, b)); persons[ra] = rb; }
            let per: Vec<usize> = (0..n).map(|i| root(&mut persons, i)).collect();
            let mated: Vec<bool> = (0..n).map(|i| (0..n).any(|j| j != i && per[j] == per[i])).collect();
            let brute = |t: f64| {
                let (mut fn_, mut m, mut fp, mut nm) = (0, 0, 0, 0);
                for i in 0..n {
                    let mine = pairs.iter().filter_map(|p| {
                        let (a, b) = (idx(&p.a).unwrap(), idx(&p.b).unwrap());
                        if a == b { return None; }
                        let other = if a == i { b } else if b == i { a } else { return None };
                        Some((other, p.score))
                    });
                    if mated[i] {
                        m += 1;
                        let best = mine.filter(|(o, _)| per[*o] == per[i]).map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                        if best < t { fn_ += 1; }
                    } else {
                        nm += 1;
                        let best = mine.map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                        if best >= t { fp += 1; }
                    }
                }
                (fn_ as f64 / m as f64, fp as f64 / nm as f64)
            };
            // And the DET agrees with brute force at its own thresholds.
            for d in &r.det {
                let (fnir, fpir) = brute(d.threshold);
                prop_assert_eq!((d.fnir, d.fpir), (fnir, fpir));
            }
        }
    }
}
