//! The completeness audit: how much of what an exact search reports a run's candidate path found.
//!
//! # The contract
//! A dedup run (or an identify batch) must report **every** pair whose fused score reaches the run's
//! decision threshold. *Recall* is the share of those pairs — all of them: duplicates, look-alikes,
//! relatives, poor captures of other people — that the run reports, measured against an exact search of
//! the same store. The target is ≥ 0.999 ([`AuditOptions::min_recall`]) on any input.
//!
//! # How a run proves it
//! Every index-mode run draws a seeded sample of its probe rows (rows of the run's scope, each pair being
//! owned by its later row, as in the run itself) and searches each exactly against every earlier row:
//! per modality a blocked GEMM threshold join ([`pacha_index::exact::threshold_join`] — none of the IVF,
//! sketch or i8 code of the candidate path) at the **complete** candidate cosine of the report floor, which
//! by the pigeonhole budgets of [`crate::fusion`] keeps every pair whose fused score can reach the floor;
//! the union is fused and kept at the floor. Against that oracle the audit reports:
//! - **contract recall**: pairs ≥ the threshold among the sampled probes, how many the run reported, and
//!   a two-sided 95 % Clopper–Pearson interval;
//! - **below-threshold recall** (when the run reports pairs under the threshold, `--floor`): the same for
//!   pairs in `[floor, threshold)`, reported separately — outputs that use them say so;
//! - **boundary recall**, per modality: the pairs whose cosine reaches that modality's candidate cosine
//!   (the join's own bar, far more numerous than hits and concentrated at the bar, where the partition
//!   and the sketch filter miss most) and how many the candidate path reached.
//!
//! A sample of a well-deduplicated store holds few hits: 0 misses among `n` pairs bounds recall at
//! 0.999 only from `n ≈ 3 700` (`0.025^(1/n)`). When the contract sample is too small and has no miss, the
//! run's verdict uses the boundary evidence instead: its pairs sit at the candidate cosine, where every
//! stage of the candidate path is weakest (the partition separates pairs more the lower their cosine;
//! the sketch's drop probability, `P(Binomial(bits, acos(c)/π) > cut)`, falls as the cosine rises), so a
//! path that reaches them reaches the higher-cosine pairs that make up the hits at least as well. The
//! summary names the evidence used ([`Audit::evidence`]); a lower bound below `min_recall` fails the run
//! (the CLI's exit code 3).
//!
//! Runs whose every candidate modality is searched without a partition — an exact path (f32 GEMM, or the
//! i8 join whose error-bound filter rejects only pairs below the cosine before an f32 rescoring), or the
//! brute-force sketch join, which compares every pair and drops one at the candidate cosine with a
//! probability the binomial model of sign sketches bounds exactly — are complete by construction, with
//! complete budgets: their verdict is that bound (`1 −` the per-pair drop bound), provided the sample
//! shows no miss (a miss would be a defect, and the sample's figure is used instead).

use crate::EngineError;
use crate::fusion::Calibration;
use crate::matcher::fused_rows;
use crate::store::Snapshot;
use pacha_index::RowsF32;
use pacha_index::bitset::Bitset;
use pacha_index::kernels::dot_f32;
use pacha_index::rng::SplitMix;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Instant;

/// Default sampled probe rows of an audit.
pub const DEFAULT_AUDIT_PROBES: usize = 1000;
/// Synthetic boundary pairs made per sampled row for an IVF path's evidence.
pub const SYNTHETIC_PER_ROW: usize = 4;
/// Default recall a run must prove (the lower end of its 95 % interval).
pub const DEFAULT_MIN_RECALL: f64 = 0.999;

/// Most probe rows an audit samples when it grows its sample, as a multiple of the requested probes.
pub const MAX_SAMPLE_GROWTH: usize = 4;

/// Least probe rows the audit of a run complete by construction samples (when the run has as many).
pub const MIN_CONSTRUCTION_PROBES: usize = 200;
/// The share of its probe rows the audit of a run complete by construction samples (at least
/// [`MIN_CONSTRUCTION_PROBES`], at most the requested probes): the exact f32 search of one probe row costs
/// about four times the i8 scan of it, so one row in 40 keeps the audit near a tenth of an exhaustive run.
pub const CONSTRUCTION_SHARE: f64 = 0.025;

/// Pairs needed for a sample with no miss to bound recall at `min_recall` (two-sided 95 %:
/// `0.025^(1/n) ≥ min_recall`).
pub fn pairs_needed(min_recall: f64) -> u64 {
    (0.025f64.ln() / min_recall.clamp(1e-9, 1.0 - 1e-12).ln()).ceil() as u64
}

/// Probe rows an audit samples: the requested `probes`, grown (up to [`MAX_SAMPLE_GROWTH`] times) when a
/// candidate modality takes a partition path and the pilots predict fewer boundary pairs than the sample
/// needs to bound recall at `min_recall` on its own (with a 1.5× margin). The prediction uses only the
/// plans (the same in every tile of a run), so every tile draws the same sample. A pilot row's pairs
/// reach every other row; a probe row's pairs only earlier ones, on average `(first + rows) / 2rows` of
/// them.
///
/// A run complete by construction (`construction`: no partition, complete budgets) rests its verdict on
/// the construction; its sample only has to show no miss, so it takes [`CONSTRUCTION_SHARE`] of the
/// probe rows (at least [`MIN_CONSTRUCTION_PROBES`], at most `probes`): a daily batch of 10 000 rows
/// samples 250, not 1 000 (whose exact search cost a third of the run).
pub fn sample_size(
    probes: usize,
    min_recall: f64,
    plans: &[crate::policy::ModalityPlan],
    construction: bool,
    first_probe: usize,
    rows: usize,
) -> usize {
    if construction {
        let share = (CONSTRUCTION_SHARE * rows.saturating_sub(first_probe) as f64).ceil() as usize;
        return probes.min(share.max(MIN_CONSTRUCTION_PROBES));
    }
    if probes == 0 || !plans.iter().any(|p| p.path == "ivf") || rows == 0 {
        return probes;
    }
    let earlier = (first_probe + rows) as f64 / (2.0 * rows as f64);
    let per_row: f64 = plans
        .iter()
        .filter(|p| p.pilot_rows > 0)
        .map(|p| p.natural_pairs as f64 / p.pilot_rows as f64 * earlier)
        .sum();
    if per_row <= 0.0 {
        return probes;
    }
    let want = (1.5 * pairs_needed(min_recall) as f64 / per_row).ceil() as usize;
    want.clamp(probes, probes.saturating_mul(MAX_SAMPLE_GROWTH))
}

/// How a run audits its candidate path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditOptions {
    /// Probe rows sampled (0 turns the audit off; capped at the run's probe rows; grown by [`sample_size`]
    /// when the pilots predict too few boundary pairs for the sample to bound recall).
    pub probes: usize,
    /// Seed of the sample.
    pub seed: u64,
    /// Recall the run must prove: a 95 % lower bound below it fails the audit.
    pub min_recall: f64,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            probes: DEFAULT_AUDIT_PROBES,
            seed: 0xa0d1_7000,
            min_recall: DEFAULT_MIN_RECALL,
        }
    }
}

/// A recall measured on a sample: pairs the oracle reports, how many the run found, a 95 % interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecallFigure {
    /// Pairs the exact search reports.
    pub pairs: u64,
    /// Of those, pairs the run reported.
    pub found: u64,
    /// `found / pairs` (1 when there are no pairs).
    pub recall: f64,
    /// Lower end of the two-sided 95 % Clopper–Pearson interval (0 when there are no pairs).
    pub lower: f64,
    /// Upper end of that interval.
    pub upper: f64,
}

impl RecallFigure {
    /// The figure of `found` out of `pairs`.
    pub fn new(found: u64, pairs: u64) -> Self {
        let (lower, upper) = clopper_pearson(found, pairs, 0.95);
        RecallFigure {
            pairs,
            found,
            recall: if pairs == 0 {
                1.0
            } else {
                found as f64 / pairs as f64
            },
            lower,
            upper,
        }
    }
}

/// A pair the exact search reports and the run did not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MissedPair {
    /// Earlier row.
    pub row_a: u32,
    /// Later (sampled) row.
    pub row_b: u32,
    /// Fused calibrated score.
    pub score: f64,
    /// Per-modality cosines (`None`: not shared).
    pub cosines: Vec<(String, Option<f32>)>,
}

/// The audit of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Audit {
    /// Probe rows sampled.
    pub sampled_probes: usize,
    /// Probe rows of the run.
    pub probe_rows: usize,
    /// Seed of the sample.
    pub seed: u64,
    /// The run's decision threshold.
    pub threshold: f64,
    /// The run's report floor.
    pub floor: f64,
    /// Recall of the pairs at or above the threshold (the contract).
    pub contract: RecallFigure,
    /// Recall of the pairs in `[floor, threshold)` (only when the floor is below the threshold).
    pub below_threshold: Option<RecallFigure>,
    /// Per modality: recall of the pairs at or above the run's candidate cosine (the candidate path's own
    /// bar); `None` where the modality generates no candidates.
    pub boundary: Vec<(String, Option<RecallFigure>)>,
    /// All modalities' boundary pairs pooled.
    pub boundary_pooled: RecallFigure,
    /// Per IVF-path modality: synthetic boundary pairs (at the candidate cosine, leaning towards other
    /// store rows) of the sampled rows that the run's probe rule reaches.
    #[serde(default)]
    pub synthetic: Vec<(String, RecallFigure)>,
    /// The recall the verdict rests on (a 95 % lower bound).
    pub lower_bound: f64,
    /// Which evidence `lower_bound` comes from, in words.
    pub evidence: String,
    /// The recall the run had to prove.
    pub min_recall: f64,
    /// True iff `lower_bound ≥ min_recall`.
    pub passed: bool,
    /// Up to 20 missed contract pairs (lowest rows first), for inspection.
    pub missed: Vec<MissedPair>,
    /// Seconds the exact search of the sample took.
    pub seconds: f64,
}

/// Two-sided Clopper–Pearson interval of a binomial proportion `k / n` at confidence `conf`.
pub fn clopper_pearson(k: u64, n: u64, conf: f64) -> (f64, f64) {
    clopper_pearson_real(k.min(n) as f64, n as f64, conf)
}

/// [`clopper_pearson`] for a real-valued effective count `k` of `n` (a clustered count divided by its
/// design effect: the Korn–Graubard interval).
pub fn clopper_pearson_real(k: f64, n: f64, conf: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let alpha = (1.0 - conf) / 2.0;
    let (k, nf) = (k.clamp(0.0, n), n);
    let lower = if k == 0.0 {
        0.0
    } else {
        beta_quantile(alpha, k, nf - k + 1.0)
    };
    let upper = if k == nf {
        1.0
    } else {
        beta_quantile(1.0 - alpha, k + 1.0, nf - k)
    };
    (lower, upper)
}

/// The `p`-quantile of Beta(a, b), by bisection on the regularised incomplete beta function.
fn beta_quantile(p: f64, a: f64, b: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if inc_beta(a, b, mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Regularised incomplete beta function `I_x(a, b)` (continued fraction, Lentz's method).
fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    // The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    // Lentz's method: a denominator that would vanish is replaced by a tiny number.
    let nonzero = |v: f64| if v.abs() < 1e-300 { 1e-300 } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / nonzero(1.0 - qab * x / qap);
    let mut h = d;
    for m in 1..10_000 {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        // The even and the odd step of the fraction, each one Lentz update of (c, d).
        let even = m * (b - m) * x / ((qam + m2) * (a + m2));
        let odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        let mut del = 1.0;
        for aa in [even, odd] {
            d = 1.0 / nonzero(1.0 + aa * d);
            c = nonzero(1.0 + aa / c);
            del = d * c;
            h *= del;
        }
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, 9 terms; ~1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, &g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// A seeded sample of up to `k` live rows of `range` (ascending; partial Fisher–Yates over the range).
pub fn sample_rows(
    snap: &Snapshot,
    range: std::ops::Range<usize>,
    k: usize,
    seed: u64,
) -> Vec<u32> {
    let mut pool: Vec<u32> = range
        .filter(|&r| !snap.is_deleted(r))
        .map(|r| r as u32)
        .collect();
    let k = k.min(pool.len());
    SplitMix(seed).shuffle_prefix(&mut pool, k);
    pool.truncate(k);
    pool.sort_unstable();
    pool
}

/// Exact pairs of sampled rows: `(earlier row, sampled row)` with `earlier < sampled`, both live, found by
/// an exact search independent of the candidate path.
#[derive(Clone, Debug, Default)]
pub struct ExactSample {
    /// Pairs whose fused score reaches the floor, with that score.
    pub fused: Vec<(u32, u32, f64)>,
    /// Per modality (schema position): pairs whose cosine reaches the run's candidate cosine.
    pub boundary: Vec<Vec<(u32, u32)>>,
    /// Seconds of exact search.
    pub seconds: f64,
}

/// Searches every sampled row exactly against all earlier rows (see the module docs). `run_cosines` are
/// the run's per-modality candidate cosines (the boundary sets), or per pair its band's where `bands`
/// gives a modality's band join; the fused set uses the complete cosines of `floor`. With `joint`, one more
/// boundary set follows the modalities': the pairs of that set whose exact cosines pass the joint path's
/// test ([`crate::joint::JointPlan::exact_passes`]).
pub fn exact_sample(
    snap: &Snapshot,
    cal: &Calibration,
    sample: &[u32],
    floor: f64,
    run_cosines: &[Option<f32>],
    bands: &[Option<crate::policy::BandJoin>],
    joint: Option<&crate::joint::JointPlan>,
) -> Result<ExactSample, EngineError> {
    let t0 = Instant::now();
    let complete = cal.candidate_cosines(floor);
    let mods = &snap.schema().modalities;
    let mut union: HashSet<(u32, u32)> = HashSet::new();
    let mut boundary = vec![Vec::new(); mods.len() + joint.is_some() as usize];
    let Some(&last) = sample.last() else {
        return Ok(ExactSample {
            boundary,
            ..ExactSample::default()
        });
    };
    for (mi, spec) in mods.iter().enumerate() {
        let m = spec.modality;
        let (Some(view), run_c) = (snap.f32_rows(m), run_cosines.get(mi).copied().flatten()) else {
            continue;
        };
        let full = complete.get(mi).copied().flatten();
        let band = bands.get(mi).and_then(Option::as_ref);
        // A band join's boundary: each pair at its band's cosine (every band's at or above the envelope's).
        let run_c = match (band, run_c) {
            (Some(b), Some(c)) => Some(b.cuts().min_t().min(c)),
            (_, c) => c,
        };
        let t = match (full, run_c) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => continue,
        };
        let rows: Vec<u32> = sample
            .iter()
            .copied()
            .filter(|&r| snap.is_present(m, r as usize))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let mut dense = Vec::with_capacity(rows.len() * spec.dim);
        for &r in &rows {
            dense.extend_from_slice(view.row(r as usize));
        }
        let probe = RowsF32::dense(&dense, spec.dim)?;
        let base = view.slice_rows(0, last as usize);
        let skip = |q: u32| !snap.is_present(m, q as usize) || snap.is_deleted(q as usize);
        // GEMM and the scoring kernel differ by rounding: search a hair lower, decide on `dot_f32` (the
        // score the run itself compares).
        let pairs = pacha_index::exact::threshold_join(probe, base, t - 1e-4, None, Some(&skip))?;
        // Each pair rescored with the run's kernel (in parallel): (pair, in the union, on the boundary).
        let marked: Vec<((u32, u32), bool, bool)> = pairs
            .par_iter()
            .filter_map(|p| {
                let (s, q) = (rows[p.a as usize], p.b);
                if q >= s {
                    return None;
                }
                let c = dot_f32(view.row(q as usize), view.row(s as usize));
                let at = match band {
                    Some(b) => Some(b.cosine(q, s)),
                    None => run_c,
                };
                Some((
                    (q, s),
                    full.is_some_and(|f| c >= f),
                    at.is_some_and(|r| c >= r),
                ))
            })
            .collect();
        for (pair, in_union, on_boundary) in marked {
            if in_union {
                union.insert(pair);
            }
            if on_boundary {
                boundary[mi].push(pair);
            }
        }
    }
    let union: Vec<(u32, u32)> = union.into_iter().collect();
    if let Some(j) = joint {
        boundary[mods.len()] = union
            .par_iter()
            .copied()
            .filter(|&(q, s)| j.exact_passes(snap, q as usize, s as usize))
            .collect();
    }
    let mut fused: Vec<(u32, u32, f64)> = union
        .into_par_iter()
        .map(|(q, s)| (q, s, fused_rows(snap, cal, q as usize, s as usize).score))
        .filter(|&(_, _, score)| score >= floor)
        .collect();
    fused.sort_unstable_by_key(|p| (p.1, p.0));
    for b in &mut boundary {
        b.sort_unstable_by_key(|p| (p.1, p.0));
    }
    Ok(ExactSample {
        fused,
        boundary,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What the candidate path reached for the sampled rows: per modality, pairs `(earlier, sampled)` whose
/// exact cosine it confirmed at or above the candidate cosine. Filled concurrently by the join.
pub struct Recorder {
    sample: Bitset,
    reached: Vec<std::sync::Mutex<Vec<(u32, u32)>>>,
}

impl Recorder {
    /// A recorder for `sample` over `modalities` schema positions.
    pub fn new(sample: &[u32], modalities: usize) -> Self {
        Recorder {
            sample: Bitset::from_ids(sample.iter().copied()),
            reached: (0..modalities)
                .map(|_| std::sync::Mutex::new(Vec::new()))
                .collect(),
        }
    }

    /// True iff `row` is sampled.
    pub fn sampled(&self, row: u32) -> bool {
        self.sample.contains(row)
    }

    /// Notes that modality `mi`'s candidate path reached pair `(a, b)`, `a < b` (ignored unless `b` is
    /// sampled).
    pub fn note(&self, mi: usize, a: u32, b: u32) {
        if self.sample.contains(b)
            && let Some(slot) = self.reached.get(mi)
            && let Ok(mut v) = slot.lock()
        {
            v.push((a, b));
        }
    }

    /// The reached pairs of modality `mi` (sorted, unique).
    pub fn reached(&self, mi: usize) -> HashSet<(u32, u32)> {
        self.reached
            .get(mi)
            .and_then(|s| s.lock().ok())
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// One share of a run's audit evidence: what the exact search found for the sampled rows of one part of
/// the run (see [`crate::dedup::TileSpec`]) and how much of it that part reported or reached. Parts hold
/// only counts and the first missed pairs, so they add up to the evidence of the whole run in any split.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditPart {
    /// Sampled probe rows in this part.
    pub sampled: usize,
    /// Pairs at or above the threshold: (reported, all).
    pub contract: (u64, u64),
    /// Pairs in `[floor, threshold)`: (reported, all).
    pub below: (u64, u64),
    /// Per modality (schema order): boundary pairs (reached, all).
    pub boundary: Vec<(u64, u64)>,
    /// Per IVF-path modality: synthetic boundary pairs (reached, all).
    pub synthetic: Vec<(String, u64, u64)>,
    /// Up to [`MISSED_SHOWN`] missed contract pairs, in (sampled row, earlier row) order.
    pub missed: Vec<MissedPair>,
    /// Seconds of exact search.
    pub seconds: f64,
}

/// Missed contract pairs an audit lists for inspection.
pub const MISSED_SHOWN: usize = 20;

/// The audit evidence of one part: `exact` (the exact search of the part's `sampled` rows) against the
/// part's reported pairs and what its candidate path reached (`recorder`).
pub fn audit_part(
    snap: &Snapshot,
    sampled: usize,
    exact: &ExactSample,
    reported: &HashSet<(u32, u32)>,
    recorder: &Recorder,
    threshold: f64,
    synthetic: Vec<(String, u64, u64)>,
) -> AuditPart {
    let mut contract = (0u64, 0u64);
    let mut below = (0u64, 0u64);
    let mut missed = Vec::new();
    for &(a, b, score) in &exact.fused {
        let found = reported.contains(&(a, b));
        let slot = if score >= threshold {
            &mut contract
        } else {
            &mut below
        };
        slot.1 += 1;
        slot.0 += u64::from(found);
        if !found && score >= threshold && missed.len() < MISSED_SHOWN {
            missed.push(MissedPair {
                row_a: a,
                row_b: b,
                score,
                cosines: snap
                    .schema()
                    .modalities
                    .iter()
                    .map(|s| {
                        let c = match (
                            snap.template(s.modality, a as usize),
                            snap.template(s.modality, b as usize),
                        ) {
                            (Some(x), Some(y)) => Some(dot_f32(x, y)),
                            _ => None,
                        };
                        (s.modality.key(), c)
                    })
                    .collect(),
            });
        }
    }
    let boundary = (0..exact.boundary.len())
        .map(|mi| {
            let pairs = exact.boundary.get(mi).map_or(&[][..], |v| &v[..]);
            let reached = recorder.reached(mi);
            let found = pairs.iter().filter(|p| reached.contains(p)).count() as u64;
            (found, pairs.len() as u64)
        })
        .collect();
    AuditPart {
        sampled,
        contract,
        below,
        boundary,
        synthetic,
        missed,
        seconds: exact.seconds,
    }
}

/// What the verdict of a run's audit needs besides its parts' evidence.
pub struct AuditFrame<'a> {
    /// The audit's options.
    pub opts: &'a AuditOptions,
    /// Modality keys in schema order.
    pub modalities: &'a [String],
    /// Probe rows of the whole run.
    pub probe_rows: usize,
    /// The run's decision threshold.
    pub threshold: f64,
    /// The run's report floor.
    pub floor: f64,
    /// The construction bound, when no candidate modality uses a partition: (bound, why).
    pub construction: Option<(f64, String)>,
}

/// Builds the audit of a run from its parts' evidence (in probe-row order); the result does not depend on
/// how the run was split.
pub fn assess(frame: &AuditFrame<'_>, parts: &[AuditPart]) -> Audit {
    let opts = frame.opts;
    let mut contract = (0u64, 0u64);
    let mut below = (0u64, 0u64);
    let mut bnd = vec![(0u64, 0u64); frame.modalities.len()];
    let mut synthetic: Vec<(String, u64, u64)> = Vec::new();
    let mut missed = Vec::new();
    let mut sampled = 0usize;
    let mut seconds = 0.0;
    for p in parts {
        sampled += p.sampled;
        seconds += p.seconds;
        contract = (contract.0 + p.contract.0, contract.1 + p.contract.1);
        below = (below.0 + p.below.0, below.1 + p.below.1);
        for (acc, b) in bnd.iter_mut().zip(&p.boundary) {
            *acc = (acc.0 + b.0, acc.1 + b.1);
        }
        for (k, f, n) in &p.synthetic {
            match synthetic.iter_mut().find(|s| &s.0 == k) {
                Some(s) => {
                    s.1 += f;
                    s.2 += n;
                }
                None => synthetic.push((k.clone(), *f, *n)),
            }
        }
        missed.extend(
            p.missed
                .iter()
                .take(MISSED_SHOWN.saturating_sub(missed.len()))
                .cloned(),
        );
    }
    let mut pooled = (0u64, 0u64);
    let boundary: Vec<(String, Option<RecallFigure>)> = frame
        .modalities
        .iter()
        .zip(&bnd)
        .map(|(k, &(found, pairs))| {
            pooled.0 += found;
            pooled.1 += pairs;
            (
                k.clone(),
                (pairs > 0).then(|| RecallFigure::new(found, pairs)),
            )
        })
        .collect();
    let contract = RecallFigure::new(contract.0, contract.1);
    let pooled = RecallFigure::new(pooled.0, pooled.1);
    let needed = pairs_needed(opts.min_recall);
    let clean = contract.found == contract.pairs && pooled.found == pooled.pairs;
    let syn = synthetic
        .iter()
        .fold((0u64, 0u64), |a, s| (a.0 + s.1, a.1 + s.2));
    let (lower_bound, evidence) = if let (Some((bound, why)), true) = (&frame.construction, clean) {
        (
            *bound,
            format!(
                "complete by construction: {why}; the sample agrees ({} of {} contract pairs, {} of {} boundary pairs)",
                contract.found, contract.pairs, pooled.found, pooled.pairs
            ),
        )
    } else if contract.pairs >= needed || contract.found < contract.pairs {
        (
            contract.lower,
            format!(
                "contract pairs: {} of {} pairs at or above the threshold found",
                contract.found, contract.pairs
            ),
        )
    } else if pooled.pairs >= needed || pooled.found < pooled.pairs || syn.1 == 0 {
        (
            pooled.lower,
            format!(
                "boundary pairs: {} contract pairs (all {} found) cannot bound recall at {} (needs {needed}); \
                 {} of {} pairs at the candidate cosines reached — the hardest pairs for the candidate path",
                contract.pairs, contract.found, opts.min_recall, pooled.found, pooled.pairs
            ),
        )
    } else if syn.1 > 0 {
        let both = RecallFigure::new(pooled.found + syn.0, pooled.pairs + syn.1);
        (
            both.lower,
            format!(
                "boundary pairs with synthetic ones: {} contract and {} boundary pairs (all found) cannot bound \
                 recall at {} (needs {needed}); with {} of {} synthetic pairs at the candidate cosines (each a \
                 sampled row mixed with another store row) reached by the probe rule: {} of {}",
                contract.pairs, pooled.pairs, opts.min_recall, syn.0, syn.1, both.found, both.pairs
            ),
        )
    } else {
        (
            contract.lower,
            format!(
                "contract pairs only ({} of {} found): no boundary evidence",
                contract.found, contract.pairs
            ),
        )
    };
    Audit {
        sampled_probes: sampled,
        probe_rows: frame.probe_rows,
        seed: opts.seed,
        threshold: frame.threshold,
        floor: frame.floor,
        contract,
        below_threshold: (frame.floor < frame.threshold)
            .then(|| RecallFigure::new(below.0, below.1)),
        boundary,
        boundary_pooled: pooled,
        synthetic: synthetic
            .into_iter()
            .map(|(k, f, n)| (k, RecallFigure::new(f, n)))
            .collect(),
        lower_bound,
        evidence,
        min_recall: opts.min_recall,
        passed: lower_bound >= opts.min_recall,
        missed,
        seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clopper_pearson_matches_known_values() {
        // 0 of n: upper = 1 - 0.025^(1/n); n of n: lower = 0.025^(1/n).
        let (lo, hi) = clopper_pearson(100, 100, 0.95);
        assert!((lo - 0.025f64.powf(1.0 / 100.0)).abs() < 1e-9, "{lo}");
        assert_eq!(hi, 1.0);
        let (lo, hi) = clopper_pearson(0, 10, 0.95);
        assert_eq!(lo, 0.0);
        assert!((hi - (1.0 - 0.025f64.powf(0.1))).abs() < 1e-9, "{hi}");
        // 5 of 10 (R: binom.test(5, 10)$conf.int = 0.187086 0.812914).
        let (lo, hi) = clopper_pearson(5, 10, 0.95);
        assert!((lo - 0.187_086).abs() < 1e-5, "{lo}");
        assert!((hi - 0.812_914).abs() < 1e-5, "{hi}");
        // 3 700 of 3 700 bounds recall at 0.999; 3 600 does not.
        assert!(clopper_pearson(3700, 3700, 0.95).0 >= 0.999);
        assert!(clopper_pearson(3600, 3600, 0.95).0 < 0.999);
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        for (x, f) in [(1.0, 1.0f64), (5.0, 24.0), (10.0, 362_880.0)] {
            assert!((ln_gamma(x) - f.ln()).abs() < 1e-10, "{x}");
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-10);
    }
}
