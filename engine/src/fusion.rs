//! Score fusion and calibration: per-modality cosines → log-likelihood ratios → a fused score on the
//! calibrated scale `-10·log10(estimated false-match rate)`.
//!
//! ## Model
//! For each modality `m` two score models are kept: the *impostor* model (cosines of pairs of different
//! people) and the *genuine* model (the same person twice), each a Gaussian. The impostor model is fitted to
//! the **upper tail** of sampled impostor scores (quantile matching at the 99th and 99.99th percentiles), not
//! to the moments: decisions are taken far out in that tail, and real (and our synthetic) impostor
//! distributions have heavier upper tails than a moment-fitted Gaussian predicts. Above the score where the
//! sampled survival is 3·10⁻⁴, a calibration replaces the Gaussian by a generalised Pareto tail fitted to every
//! pair of a pool of rows ([`crate::tail`], [`ModalityModel::impostor_tail`]): the Gaussian through two
//! quantiles was measured 0.25× to 2× off at FMR 1e-7 (BENCHMARKS.md, "Calibration").
//!
//! The per-modality evidence is a log-likelihood ratio `L_m(s) = ln g_m(s) − ln f̂_m(s)` on the impostor
//! density the model reads its FMRs off: `g_m` the genuine Gaussian, `f̂_m = −d/ds impostor_sf` (the GPD tail
//! above its threshold, the sampled body's piecewise density below it, the Gaussian where neither is fitted).
//! It is made monotone non-decreasing in `s`, so a higher cosine is never weaker evidence: held flat below its
//! minimum, and above it raised at each step of a fine cosine grid by at least the impostor log-rarity
//! `ln(sf(s_prev)/sf(s))`, so it keeps rising wherever the impostor survival falls and reaches the cap only
//! where that survival is ~0 (see [`ModalityModel::llr`]; tabulated once per model). A model with neither
//! tail nor body (defaults, older files) keeps the Gaussian ratio `ln g − ln i` with the same monotone rule,
//! exactly as before ([`ModalityModel::gaussian_llr`]). The fused statistic is `F = Σ L_m` over the
//! modalities *both* records have; a missing modality contributes nothing (neither for nor against).
//!
//! ## Calibration
//! Under the impostor hypothesis the modalities are independent, so the distribution of `F` for a given set
//! of shared modalities is the convolution of the impostor distributions of each `L_m`. We compute it once per
//! modality subset on a grid (step [`GRID_STEP`] nats, probability masses in f64, which reach 1e-300 without
//! underflow) and read the false-match rate `FMR(F ≥ f)` off its survival function. The public score is
//! `-10·log10(FMR)`: 30 ≈ one in a thousand, 60 ≈ one in a million. A decision threshold comes from a target
//! FPIR and the gallery size: `FMR = FPIR / N`, score threshold `10·log10(N / FPIR)`.
//!
//! ## Candidate thresholds (why the cheap pass cannot lose a hit)
//! If `Σ_{m∈S} L_m ≥ T_S` then some `L_m ≥ T_S / |S|` (pigeonhole). So a candidate pass that keeps, per
//! modality, every pair with `L_m ≥ min_{S∋m} T_S/|S|` — a cosine threshold, since `L_m` is monotone — keeps
//! every pair that can pass the fused threshold. [`Calibration::candidate_cosines`] computes those cosines.
//!
//! ## Quality bands
//! Capture quality moves the impostor tail: on the project's populations pairs of two high-quality captures
//! reach a given cosine 3–8× as often as the pooled pairs, pairs with a poor capture far less often
//! (BENCHMARKS.md, "Quality bands"). Where the store records varying qualities, a calibration cuts each
//! modality's pairs into [`QualityBands`] by the lower quality of the two templates and fits every band's own
//! impostor body and tail. The LLR stays the pooled one (so the fusion's weighting is unchanged), but a pair's
//! FMR is read off the fused-LLR distribution *of its bands* ([`Calibration::fuse_q`]): its score is the
//! false-match rate among impostor pairs of the same qualities, so every band is held to the same FMR and the
//! pooled FMR (their mixture) stays the target. The evidence is the pooled model's statistic, built on the
//! pooled impostor density; a band's FMRs come from the band's own survival of that same statistic.
//! Candidate cosines take, per modality, the pointwise lowest survival over the bands (a distribution
//! stochastically below every band's; the convolution keeps that order), so a pair that reaches the
//! threshold in any band is still kept.

use crate::EngineError;
use crate::tail::{CHECK_LEVELS, TailCheckRow, TailCount, TailModel, check_tail};
use pacha_datasets::Modality;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

/// Grid step for the fused-LLR distributions, in nats.
pub const GRID_STEP: f64 = 0.02;
/// Smallest FMR reported; scores are capped at `-10·log10(MIN_FMR)` = 300.
pub const MIN_FMR: f64 = 1e-30;
/// Cap on a single modality's LLR, in nats (keeps the grids bounded; 60 nats ≈ 1e-26 odds).
pub const LLR_CAP: f64 = 60.0;
/// Floor on a single modality's LLR, in nats.
pub const LLR_FLOOR: f64 = -20.0;
/// Genuine-model draws behind [`Calibration::candidate_cosines_relaxed`].
pub const RELAX_DRAWS: usize = 200_000;
/// Most modalities fused (face + ten fingers fit).
pub const MAX_MODALITIES: usize = 12;

/// A Gaussian score model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gaussian {
    /// Mean cosine.
    pub mean: f64,
    /// Standard deviation.
    pub sd: f64,
}

impl Gaussian {
    /// Log density at `x`.
    pub fn ln_pdf(&self, x: f64) -> f64 {
        let z = (x - self.mean) / self.sd;
        -0.5 * z * z - self.sd.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
    }
    /// Upper-tail probability `P(X ≥ x)`, accurate far into the tail.
    pub fn sf(&self, x: f64) -> f64 {
        0.5 * erfc((x - self.mean) / (self.sd * std::f64::consts::SQRT_2))
    }
    /// Fits a Gaussian whose upper tail matches the empirical quantiles at `p_lo` and `p_hi` (e.g. 0.99
    /// and 0.9999) of `samples`.
    pub fn fit_upper_tail(
        samples: &mut [f64],
        p_lo: f64,
        p_hi: f64,
    ) -> Result<Gaussian, EngineError> {
        if samples.len() < 100 {
            return Err(EngineError::Calibration(format!(
                "need at least 100 impostor scores to fit a tail, got {}",
                samples.len()
            )));
        }
        samples.sort_by(f64::total_cmp);
        let q = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        let (x_lo, x_hi) = (q(p_lo), q(p_hi));
        let (z_lo, z_hi) = (norm_quantile(p_lo), norm_quantile(p_hi));
        let sd = (x_hi - x_lo) / (z_hi - z_lo);
        let moments = Gaussian::fit_moments(samples)?;
        if !(sd.is_finite() && sd > 1e-6) {
            return Ok(moments);
        }
        // The tail fit may not be narrower than the body: a heavier tail is what we are modelling.
        let sd = sd.max(moments.sd);
        Ok(Gaussian {
            mean: x_hi - z_hi * sd,
            sd,
        })
    }
    /// Fits mean and standard deviation.
    pub fn fit_moments(samples: &[f64]) -> Result<Gaussian, EngineError> {
        if samples.len() < 2 {
            return Err(EngineError::Calibration(format!(
                "need at least 2 scores to fit a model, got {}",
                samples.len()
            )));
        }
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let var = samples.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
        let sd = var.sqrt().max(1e-4);
        if !mean.is_finite() || !sd.is_finite() {
            return Err(EngineError::Calibration(
                "non-finite scores in calibration sample".into(),
            ));
        }
        Ok(Gaussian { mean, sd })
    }
}

/// Complementary error function, relative error below 1.2e-7 everywhere (Numerical Recipes' Chebyshev
/// fit), so tail probabilities stay accurate down to 1e-300.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Standard normal quantile (Acklam's rational approximation refined by one Newton step).
pub fn norm_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let plow = 0.02425;
    let x = if p < plow {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - plow {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    // One Newton step on Φ(x) = p.
    let e = 0.5 * erfc(-x / std::f64::consts::SQRT_2) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

/// Genuine and impostor models of one modality.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModalityModel {
    /// Scores of the same person captured twice.
    pub genuine: Gaussian,
    /// Scores of two different people (upper-tail fit): the body below the tail model's threshold, and the
    /// whole distribution when there is no tail model.
    pub impostor: Gaussian,
    /// The impostor tail above its threshold, fitted to exhaustively counted pairs ([`crate::tail`]);
    /// `None` in calibrations without one (defaults, older files, stores too small to count a tail).
    #[serde(default)]
    pub impostor_tail: Option<TailModel>,
    /// The impostor body between survival 0.999 and the tail's start, read off the sampled pairs; `None` keeps
    /// the Gaussian there (defaults, older files, too few sampled pairs).
    #[serde(default)]
    pub impostor_body: Option<ImpostorBody>,
    /// The evidence statistic of a model with a counted tail or a sampled body, tabulated on first use
    /// ([`ModalityModel::llr`]). Not saved; a clone starts without it, so change a model's fields only
    /// before its first `llr` (or on a clone).
    #[serde(skip)]
    pub(crate) llr_table: LlrTable,
}

impl PartialEq for ModalityModel {
    /// Equal fitted models; the evidence table is derived from them (built or not) and is not compared.
    fn eq(&self, other: &Self) -> bool {
        // Destructured so that a new field cannot be left out of the comparison unnoticed.
        let ModalityModel {
            genuine,
            impostor,
            impostor_tail,
            impostor_body,
            llr_table: _,
        } = self;
        *genuine == other.genuine
            && *impostor == other.impostor
            && *impostor_tail == other.impostor_tail
            && *impostor_body == other.impostor_body
    }
}

/// Cosine steps of the tabulated evidence statistic over [-1, 1] (step ≈ 1.2·10⁻⁴).
const LLR_TABLE_STEPS: usize = 16_384;

/// A model's evidence statistic at `LLR_TABLE_STEPS + 1` equally spaced cosines from -1 to 1, built once.
#[derive(Default)]
pub(crate) struct LlrTable(OnceLock<BuiltTable>);

/// A built [`LlrTable`] with the model it was built for (checked in debug builds).
struct BuiltTable {
    values: Box<[f64]>,
    built_for: (Gaussian, Gaussian, Option<TailModel>, Option<ImpostorBody>),
}

impl Clone for LlrTable {
    /// A clone starts empty: the cloned model's fields may be changed before its first use.
    fn clone(&self) -> Self {
        LlrTable::default()
    }
}

impl std::fmt::Debug for LlrTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.0.get().is_some() {
            "built"
        } else {
            "not built"
        };
        write!(f, "LlrTable({state})")
    }
}

/// Knots of an [`ImpostorBody`].
pub const BODY_KNOTS: usize = 32;

/// The survival level of body knot `k`: log-spaced from 0.999 down to [`crate::tail::TAIL_START`].
pub fn body_level(k: usize) -> f64 {
    let (lo, hi) = (0.999f64.log10(), crate::tail::TAIL_START.log10());
    10f64.powf(lo + (hi - lo) * k as f64 / (BODY_KNOTS - 1) as f64)
}

/// The empirical impostor survival of sampled pairs at fixed levels ([`body_level`]), interpolated
/// log-linearly between knots: the Gaussian through two tail quantiles misplaces the body by up to 1.7× at
/// fused scores 10–35, where most of the fused mass comes from the bodies of the modalities.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImpostorBody {
    /// The cosine at which the sampled survival is `body_level(k)`, ascending.
    pub cosines: [f64; BODY_KNOTS],
}

impl ImpostorBody {
    /// Fewest sampled pairs a body is read from (the last knot then has 3 pairs above it at least).
    pub const MIN_SAMPLES: usize = 10_000;

    /// Reads the knots off `sorted` (ascending sampled impostor cosines); `None` with too few samples.
    pub fn from_sorted(sorted: &[f64]) -> Option<ImpostorBody> {
        if sorted.len() < Self::MIN_SAMPLES {
            return None;
        }
        let n = sorted.len() - 1;
        let mut cosines = [0.0; BODY_KNOTS];
        for (k, c) in cosines.iter_mut().enumerate() {
            *c = sorted[(n as f64 * (1.0 - body_level(k))).round() as usize];
        }
        cosines
            .iter()
            .all(|c| c.is_finite())
            .then_some(ImpostorBody { cosines })
    }

    /// The survival at `s` within the knots' span and its log density (the slope of the log-linear piece
    /// times the survival; −∞ between coinciding knots); `None` outside the span.
    fn sf_and_ln_pdf(&self, s: f64) -> Option<(f64, f64)> {
        let c = &self.cosines;
        if s < c[0] || s > c[BODY_KNOTS - 1] {
            return None;
        }
        let k = c.partition_point(|&x| x <= s).clamp(1, BODY_KNOTS - 1);
        let (c0, c1) = (c[k - 1], c[k]);
        let (l0, l1) = (body_level(k - 1).ln(), body_level(k).ln());
        if c1 <= c0 {
            return Some((body_level(k), f64::NEG_INFINITY));
        }
        let ln_sf = l0 + (l1 - l0) * (s - c0) / (c1 - c0);
        Some((ln_sf.exp(), ln_sf + ((l0 - l1) / (c1 - c0)).ln()))
    }
}

impl ModalityModel {
    /// Defaults for a modality when no labelled data is available, from the ranges published for ArcFace-like
    /// face embeddings and fixed-length fingerprint embeddings (see pacha-datasets' generator docs).
    pub fn default_for(m: Modality) -> Self {
        match m {
            Modality::Face => ModalityModel {
                genuine: Gaussian {
                    mean: 0.65,
                    sd: 0.10,
                },
                impostor: Gaussian {
                    mean: 0.02,
                    sd: 0.08,
                },
                impostor_tail: None,
                impostor_body: None,
                llr_table: LlrTable::default(),
            },
            Modality::Finger(_) => ModalityModel {
                genuine: Gaussian {
                    mean: 0.50,
                    sd: 0.14,
                },
                impostor: Gaussian {
                    mean: 0.0,
                    sd: 0.08,
                },
                impostor_tail: None,
                impostor_body: None,
                llr_table: LlrTable::default(),
            },
        }
    }

    /// A model from its parts (the evidence table is built on first use).
    pub fn new(
        genuine: Gaussian,
        impostor: Gaussian,
        impostor_tail: Option<TailModel>,
        impostor_body: Option<ImpostorBody>,
    ) -> Self {
        ModalityModel {
            genuine,
            impostor,
            impostor_tail,
            impostor_body,
            llr_table: LlrTable::default(),
        }
    }

    /// The impostor survival `P(S ≥ s)`: the tail model above its threshold, the sampled body below it, the
    /// Gaussian where neither is fitted.
    pub fn impostor_sf(&self, s: f64) -> f64 {
        self.impostor_sf_and_ln_pdf(s).0
    }

    /// The impostor survival at `s` (as [`ModalityModel::impostor_sf`]) and the log of the density it implies,
    /// `ln(−d/ds sf)`: the GPD density above the tail's threshold, the body's piecewise density between its
    /// knots, the Gaussian density where neither is fitted, and −∞ where the survival is held flat (clamped
    /// to a body level or to the tail's mass).
    pub fn impostor_sf_and_ln_pdf(&self, s: f64) -> (f64, f64) {
        if let Some(t) = &self.impostor_tail
            && s >= t.u
        {
            return (t.sf(s), t.ln_pdf(s));
        }
        let g = &self.impostor;
        let gauss = || (g.sf(s), g.ln_pdf(s));
        let flat = |level: f64| (level, f64::NEG_INFINITY);
        let below_tail = match &self.impostor_body {
            Some(b) => match b.sf_and_ln_pdf(s) {
                Some(p) => p,
                None if s < b.cosines[0] => {
                    let p = gauss();
                    if p.0 > body_level(0) {
                        p
                    } else {
                        flat(body_level(0))
                    }
                }
                None => {
                    let p = gauss();
                    let last = body_level(BODY_KNOTS - 1);
                    if p.0 < last { p } else { flat(last) }
                }
            },
            None => gauss(),
        };
        // Never below the tail's mass, so the survival stays monotone across the tail's threshold.
        match self.impostor_tail {
            Some(t) if below_tail.0 < t.p_u => flat(t.p_u),
            _ => below_tail,
        }
    }

    /// The raw (quadratic) log-likelihood ratio at cosine `s`.
    fn raw_llr(&self, s: f64) -> f64 {
        self.genuine.ln_pdf(s) - self.impostor.ln_pdf(s)
    }

    /// The turning point of the quadratic LLR and whether it is a minimum (convex) — `None` when linear.
    fn turning_point(&self) -> Option<(f64, bool)> {
        let (a, b) = (
            1.0 / (self.genuine.sd * self.genuine.sd),
            1.0 / (self.impostor.sd * self.impostor.sd),
        );
        // L'(s) = -(s-μg)·a + (s-μi)·b = s(b-a) + μg·a - μi·b
        let k = b - a;
        if k.abs() < 1e-12 {
            return None;
        }
        Some((
            (self.impostor.mean * b - self.genuine.mean * a) / k,
            k > 0.0,
        ))
    }

    /// The modality's evidence at cosine `s`: a monotone non-decreasing statistic, clamped to
    /// `[LLR_FLOOR, LLR_CAP]`, built on the impostor density the model reads its FMRs off.
    ///
    /// With a counted tail or a sampled body it is `L(s) = ln g(s) − ln f̂(s)`, `g` the genuine Gaussian's
    /// density and `f̂ = −d/ds impostor_sf` ([`ModalityModel::impostor_sf_and_ln_pdf`]), made monotone on a
    /// grid of [`LLR_TABLE_STEPS`] cosine steps (tabulated once, interpolated linearly): held flat below its
    /// minimum, and above it raised at each step by the larger of `L`'s own rise and the impostor log-rarity
    /// of the step, `ln(sf(s_prev)/sf(s))`. So it rises strictly wherever the impostor survival falls and
    /// reaches the cap only where the survival is ~0; a heavy counted tail gives slowly growing evidence
    /// instead of a Gaussian ratio saturated at the cap (which made one fused value — an atom with the FMR
    /// of its lowest member — of every look-alike pair past cosine 0.55: BENCHMARKS.md, "Quality bands").
    ///
    /// A model with neither tail nor body (defaults, older calibration files) keeps the Gaussian ratio
    /// exactly as before ([`ModalityModel::gaussian_llr`]).
    pub fn llr(&self, s: f64) -> f64 {
        let s = s.clamp(-1.0, 1.0);
        if self.impostor_tail.is_none() && self.impostor_body.is_none() {
            return self.gaussian_llr(s);
        }
        let t = self.llr_table.0.get_or_init(|| BuiltTable {
            values: self.evidence_table(),
            built_for: (
                self.genuine,
                self.impostor,
                self.impostor_tail,
                self.impostor_body,
            ),
        });
        debug_assert!(
            t.built_for
                == (
                    self.genuine,
                    self.impostor,
                    self.impostor_tail,
                    self.impostor_body
                ),
            "a model's fields changed after its evidence table was built"
        );
        let v = &t.values;
        let x = (s + 1.0) * (LLR_TABLE_STEPS as f64 / 2.0);
        let k = (x.floor() as usize).min(LLR_TABLE_STEPS - 1);
        let frac = x - k as f64;
        v[k] + frac * (v[k + 1] - v[k])
    }

    /// The evidence statistic of [`ModalityModel::llr`] at the table's cosines (see there).
    fn evidence_table(&self) -> Box<[f64]> {
        let n = LLR_TABLE_STEPS;
        let at = |k: usize| {
            if k == n {
                1.0
            } else {
                -1.0 + k as f64 * (2.0 / n as f64)
            }
        };
        let pieces: Vec<(f64, f64)> = (0..=n)
            .map(|k| self.impostor_sf_and_ln_pdf(at(k)))
            .collect();
        // The density ratio, NaN where the impostor density is 0 (the survival held flat there).
        let ratio: Vec<f64> = (0..=n)
            .map(|k| {
                let ln_f = pieces[k].1;
                if ln_f.is_finite() {
                    self.genuine.ln_pdf(at(k)) - ln_f
                } else {
                    f64::NAN
                }
            })
            .collect();
        let Some(kmin) = (0..=n)
            .filter(|&k| ratio[k].is_finite())
            .min_by(|&a, &b| ratio[a].total_cmp(&ratio[b]))
        else {
            // No impostor density anywhere on the grid (cannot happen with a Gaussian part): the old ratio.
            return (0..=n).map(|k| self.gaussian_llr(at(k))).collect();
        };
        let mut m = vec![ratio[kmin]; n + 1];
        let mut last = ratio[kmin];
        for k in kmin + 1..=n {
            let (prev, sf) = (pieces[k - 1].0, pieces[k].0);
            let rarity = if sf >= prev {
                0.0
            } else if sf > 0.0 {
                (prev / sf).ln()
            } else {
                f64::INFINITY
            };
            let rise = if ratio[k].is_finite() {
                let d = ratio[k] - last;
                last = ratio[k];
                d
            } else {
                0.0
            };
            m[k] = m[k - 1] + rise.max(rarity);
        }
        m.iter().map(|v| v.clamp(LLR_FLOOR, LLR_CAP)).collect()
    }

    /// The Gaussian log-likelihood ratio made monotone, clamped to a bounded range: the evidence of a model
    /// with neither counted tail nor sampled body.
    ///
    /// Below a convex LLR's minimum the quadratic rises again: it is held flat there (low cosines, FMR ≈ 1).
    /// Beyond a concave LLR's maximum (an impostor model wider than the genuine one) the quadratic falls; it
    /// is continued by the impostor log-rarity `ln(sf(t) / sf(s))` instead of being held flat, so it keeps
    /// rising wherever the impostor survival falls. Held flat, every pair past the maximum would share one
    /// fused value, an atom whose FMR is that of its lowest member; continued, each pair's FMR follows its own
    /// cosine.
    pub fn gaussian_llr(&self, s: f64) -> f64 {
        let s = s.clamp(-1.0, 1.0);
        match self.turning_point() {
            Some((t, true)) => self.raw_llr(s.max(t)).clamp(LLR_FLOOR, LLR_CAP),
            Some((t, false)) if s > t => {
                let (at, beyond) = (self.impostor_sf(t), self.impostor_sf(s));
                let rarity = if beyond > 0.0 {
                    (at / beyond).ln().max(0.0)
                } else {
                    LLR_CAP
                };
                (self.raw_llr(t) + rarity).clamp(LLR_FLOOR, LLR_CAP)
            }
            _ => self.raw_llr(s).clamp(LLR_FLOOR, LLR_CAP),
        }
    }

    /// The smallest cosine whose LLR reaches `l` (bisection on the monotone LLR); -1 if every cosine does,
    /// and `None` if no cosine up to 1 does.
    pub fn cosine_for_llr(&self, l: f64) -> Option<f64> {
        if self.llr(-1.0) >= l {
            return Some(-1.0);
        }
        if self.llr(1.0) < l {
            return None;
        }
        let (mut lo, mut hi) = (-1.0f64, 1.0f64);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if self.llr(mid) >= l {
                hi = mid
            } else {
                lo = mid
            }
        }
        Some(hi)
    }

    /// The distribution of `stat`'s evidence ([`ModalityModel::llr`]) under this model's impostor survival,
    /// as masses on the LLR grid (a band's impostors on the pooled model's statistic).
    fn impostor_llr_pmf(&self, stat: &ModalityModel) -> Pmf {
        let g = &self.impostor;
        let sf = |s: f64| self.impostor_sf(s);
        let (s_lo, s_hi) = ((g.mean - 12.0 * g.sd).max(-1.0), 1.0);
        let steps = 20_000usize;
        let ds = (s_hi - s_lo) / steps as f64;
        let lo = (LLR_FLOOR / GRID_STEP).floor() as i64;
        let hi = (LLR_CAP / GRID_STEP).ceil() as i64;
        let mut mass = vec![0.0f64; (hi - lo + 1) as usize];
        // Mass below s_lo goes to the LLR at s_lo.
        let mut prev_sf = 1.0f64;
        for i in 0..steps {
            let s1 = s_lo + (i + 1) as f64 * ds;
            let sf1 = if i + 1 == steps { 0.0 } else { sf(s1) };
            let w = prev_sf - sf1;
            prev_sf = sf1;
            let l = stat.llr(s1 - 0.5 * ds);
            let bin = ((l / GRID_STEP).round() as i64).clamp(lo, hi);
            mass[(bin - lo) as usize] += w.max(0.0);
        }
        Pmf { offset: lo, mass }
    }
}

/// A probability mass function on the integer grid `k·GRID_STEP`, `mass[i]` at `k = offset + i`.
#[derive(Clone, Debug)]
struct Pmf {
    offset: i64,
    mass: Vec<f64>,
}

impl Pmf {
    fn convolve(&self, other: &Pmf) -> Pmf {
        let mut out = vec![0.0f64; self.mass.len() + other.mass.len() - 1];
        for (i, &a) in self.mass.iter().enumerate() {
            if a < 1e-320 {
                continue;
            }
            for (j, &b) in other.mass.iter().enumerate() {
                out[i + j] += a * b;
            }
        }
        Pmf {
            offset: self.offset + other.offset,
            mass: out,
        }
    }
    /// The distribution whose survival is, at every grid point, the lowest of `pmfs`' survivals (a valid
    /// distribution: the pointwise minimum of survival functions is one).
    fn lowest(pmfs: impl Iterator<Item = Pmf>) -> Pmf {
        let sfs: Vec<Survival> = pmfs.map(|p| p.survival()).collect();
        let lo = sfs.iter().map(|s| s.offset).min().unwrap_or(0);
        let hi = sfs
            .iter()
            .map(|s| s.offset + s.sf.len() as i64)
            .max()
            .unwrap_or(1);
        let sf: Vec<f64> = (lo..hi)
            .map(|k| {
                sfs.iter()
                    .map(|s| s.fmr(k as f64 * GRID_STEP + 0.5 * GRID_STEP))
                    .fold(1.0f64, f64::min)
            })
            .collect();
        let mass = (0..sf.len())
            .map(|i| (sf[i] - sf.get(i + 1).copied().unwrap_or(0.0)).max(0.0))
            .collect();
        Pmf { offset: lo, mass }
    }

    /// Survival function: `sf[i] = P(X ≥ (offset+i)·step)`.
    fn survival(&self) -> Survival {
        let mut sf = vec![0.0f64; self.mass.len()];
        let mut acc = 0.0;
        for i in (0..self.mass.len()).rev() {
            acc += self.mass[i];
            sf[i] = acc;
        }
        Survival {
            offset: self.offset,
            sf,
        }
    }
}

/// The survival function of a fused-LLR distribution on the grid.
#[derive(Clone, Debug)]
struct Survival {
    offset: i64,
    sf: Vec<f64>,
}

impl Survival {
    /// `P(F ≥ f)`, conservatively rounding `f` down to the grid.
    fn fmr(&self, f: f64) -> f64 {
        let k = (f / GRID_STEP).floor() as i64 - self.offset;
        if k < 0 {
            1.0
        } else if k as usize >= self.sf.len() {
            0.0
        } else {
            self.sf[k as usize]
        }
    }
    /// The smallest grid LLR with `P(F ≥ f) ≤ fmr`.
    fn llr_for_fmr(&self, fmr: f64) -> f64 {
        let k = self
            .sf
            .iter()
            .position(|&p| p <= fmr)
            .unwrap_or(self.sf.len());
        (k as i64 + self.offset) as f64 * GRID_STEP
    }
}

/// One modality's impostor models checked against the pairs counted at calibration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModalityTailCheck {
    /// Modality key (`face`, `finger2`, …).
    pub modality: String,
    /// Pairs counted and the cosine above which their scores were kept.
    pub pairs: u64,
    /// Labelled genuine pairs left out of the count.
    pub excluded_genuine: u64,
    /// The model in use (Gaussian body + fitted tail) at each FMR level.
    pub model: Vec<TailCheckRow>,
    /// The Gaussian upper-tail fit alone, for comparison.
    pub gaussian: Vec<TailCheckRow>,
    /// Seed of the counted pool (see [`crate::engine::tail_pool`]).
    #[serde(default)]
    pub pool_seed: u64,
    /// Rows the counted pool was capped at.
    #[serde(default)]
    pub pool_cap: usize,
    /// How the counted pool was drawn: uniform (its rows are [`crate::engine::tail_pool`]'s), or
    /// hub-stratified with weighted pairs ([`crate::engine::hub_pool`]).
    #[serde(default)]
    pub pool_kind: crate::engine::TailPool,
    /// Per quality band (when the modality is banded): the band's own model and the pooled model, each
    /// checked against the band's pairs.
    #[serde(default)]
    pub bands: Vec<BandTailCheck>,
    /// The cosine below which the count kept a hashed sample of its pairs, weighted back, to bound its
    /// memory ([`TailCount::sampled_below`]); `None`: every pair above the kept threshold was kept.
    #[serde(default)]
    pub sampled_below: Option<f64>,
}

/// One quality band's tail check: its pairs (those whose lower template quality lies in `[lo, hi)`) against
/// the band's model and against the pooled model a band-blind score would use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BandTailCheck {
    /// Lower edge of the band's pair quality.
    pub lo: f32,
    /// Upper edge (exclusive; 1 for the top band, inclusive).
    pub hi: f32,
    /// Pairs of the band counted.
    pub pairs: u64,
    /// The band's model at each FMR level.
    pub model: Vec<TailCheckRow>,
    /// The pooled model at each FMR level, counted on the band's pairs.
    pub pooled: Vec<TailCheckRow>,
}

/// The band of a pair quality `q` under inner `edges` (ascending): the number of edges at or below `q`.
pub fn quality_band(edges: &[f32], q: f32) -> usize {
    edges.partition_point(|&e| e <= q)
}

impl ModalityTailCheck {
    /// Checks `model` (and its Gaussian alone) against `count`, a count of modality `m` on the pool drawn
    /// (as `pool_kind`) with `pool_seed` and `pool_cap`.
    pub fn new(
        m: Modality,
        model: &ModalityModel,
        count: &TailCount,
        pool_seed: u64,
        pool_cap: usize,
        pool_kind: crate::engine::TailPool,
    ) -> Self {
        let body = model.impostor;
        ModalityTailCheck {
            modality: m.key(),
            pairs: count.pairs,
            excluded_genuine: count.excluded,
            model: check_tail(&|s| model.impostor_sf(s), count, &CHECK_LEVELS),
            gaussian: check_tail(&|s| body.sf(s), count, &CHECK_LEVELS),
            pool_seed,
            pool_cap,
            pool_kind,
            bands: Vec::new(),
            sampled_below: count.sampled_below,
        }
    }

    /// The model row read at a decision FMR `fmr`: the shallowest checked level at or below it, else the
    /// deepest.
    pub fn decision_row(&self, fmr: f64) -> Option<&TailCheckRow> {
        self.model
            .iter()
            .filter(|r| r.level <= fmr * 1.000_001)
            .max_by(|a, b| a.level.total_cmp(&b.level))
            .or_else(|| self.model.iter().min_by(|a, b| a.level.total_cmp(&b.level)))
    }

    /// Independent events the count holds at a decision FMR `fmr` ([`Self::decision_row`]): its events over
    /// their design effect (0 where nothing was counted there). The interval's width goes as its inverse root.
    pub fn effective_events_at(&self, fmr: f64) -> f64 {
        self.decision_row(fmr)
            .filter(|r| r.measured.is_some())
            .map_or(0.0, TailCheckRow::effective_events)
    }

    /// What this labelled count asks of its pool at a decision FMR `fmr` (see `fit_tail_growing` in
    /// [`crate::engine`]): nothing where it pins the model within `rule.tolerance`; else a larger pool, unless
    /// a larger one cannot add the events that would narrow it — the pool already counted at least
    /// `rule.coverage_max` of the pairs the store holds there (its measured share times `store_pairs`, the
    /// store's pairs), or `before` (the independent events at `fmr` of the count on half as many rows) shows
    /// the last doubling multiplied them by less than `rule.gain_min`. Either way the tail's events sit on
    /// rows the pool already counts.
    pub fn pool_growth(
        &self,
        fmr: f64,
        rule: &GrowthRule,
        before: Option<f64>,
        store_pairs: f64,
    ) -> PoolGrowth {
        let Some(why) = self.resolution_at(fmr, rule.tolerance, false) else {
            return PoolGrowth::Pinned;
        };
        let now = self.effective_events_at(fmr);
        let held = self
            .decision_row(fmr)
            .and_then(|r| Some((r.events, r.measured.filter(|&m| m > 0.0)? * store_pairs)));
        if let Some((events, store)) =
            held.filter(|&(e, st)| st > 0.0 && e as f64 >= rule.coverage_max * st)
        {
            return PoolGrowth::Saturated {
                why,
                reason: format!(
                    "the pool already counted {events} of the ≈ {store:.0} pairs the store holds at the \
                     decision FMR: no larger pool can narrow it"
                ),
            };
        }
        match before {
            Some(b) if b > 0.0 && now < b * rule.gain_min => PoolGrowth::Saturated {
                why,
                reason: format!(
                    "doubling the pool took the independent events at the decision FMR only from {b:.1} to \
                     {now:.1} (the tail's events sit on rows every pool counts): no larger pool can narrow it"
                ),
            },
            _ => PoolGrowth::Grow(why),
        }
    }

    /// Whether this check pins the model at `fmr` (a run's decision FMR, `FPIR / N`) within `tolerance`: a
    /// sentence saying why not — the count does not reach that level, or its 95 % interval of measured ÷
    /// predicted is wider than `[1/tolerance, tolerance]` — or `None`. The row read is the shallowest checked
    /// level at or below `fmr` (the deepest row where `fmr` lies beyond every checked level).
    ///
    /// `unlabelled`: the calibration had no genuine pairs to leave out, so its count above the survival
    /// [`crate::tail::UNLABELLED_TRUNCATION`] may hold duplicates and its fit stops there; a decision FMR
    /// below that is extrapolated, whatever the count shows.
    pub fn resolution_at(&self, fmr: f64, tolerance: f64, unlabelled: bool) -> Option<String> {
        if unlabelled && fmr < crate::tail::UNLABELLED_TRUNCATION {
            return Some(format!(
                "{}: calibrated without labelled pairs, the fit stops at FMR {:.0e} (deeper counted pairs may be \
                 duplicates), so at the decision FMR {fmr:.1e} the model extrapolates; --truth counts deeper",
                self.modality,
                crate::tail::UNLABELLED_TRUNCATION
            ));
        }
        let row = self.decision_row(fmr)?;
        match row.ratio_ci {
            None => Some(format!(
                "{}: the count does not reach FMR {:.0e} (decision FMR {fmr:.1e}): the model extrapolates there",
                self.modality, row.level
            )),
            Some((lo, hi)) if lo < 1.0 / tolerance || hi > tolerance => Some(format!(
                "{}: at FMR {:.0e} (decision FMR {fmr:.1e}) the count pins measured ÷ predicted only to [{lo:.2}, \
                 {hi:.2}] (95 %, {} events, design effect {:.1}), wider than {tolerance}×",
                self.modality,
                row.level,
                row.events,
                row.design_effect.unwrap_or(1.0)
            )),
            Some(_) => None,
        }
    }

    /// This check made on a pool other than the calibration's, each model row's `ratio_ci` widened by the
    /// sampling spread of the calibration's own count at that level (`fitted`, the calibration's check of the
    /// same model; see [`TailCheckRow::against_model_count`]). The Gaussian rows are left as they are.
    pub fn against_calibration(mut self, fitted: &ModalityTailCheck) -> Self {
        fn widen(rows: Vec<TailCheckRow>, fitted: &[TailCheckRow]) -> Vec<TailCheckRow> {
            rows.into_iter()
                .map(|r| match fitted.iter().find(|f| f.level == r.level) {
                    Some(f) => r.against_model_count(f),
                    None => r,
                })
                .collect()
        }
        self.model = widen(std::mem::take(&mut self.model), &fitted.model);
        for b in &mut self.bands {
            if let Some(fb) = fitted
                .bands
                .iter()
                .find(|fb| fb.lo == b.lo && fb.hi == b.hi)
            {
                b.model = widen(std::mem::take(&mut b.model), &fb.model);
            }
        }
        self
    }

    /// Adds the per-band checks of `bands` against `counts` (one per band) and of the pooled `model`.
    pub fn with_bands(
        mut self,
        model: &ModalityModel,
        bands: &QualityBands,
        counts: &[TailCount],
    ) -> Self {
        self.bands = bands
            .models
            .iter()
            .zip(counts)
            .enumerate()
            .map(|(k, (band, count))| BandTailCheck {
                lo: if k == 0 { 0.0 } else { bands.edges[k - 1] },
                hi: bands.edges.get(k).copied().unwrap_or(1.0),
                pairs: count.pairs,
                model: check_tail(&|s| band.impostor_sf(s), count, &CHECK_LEVELS),
                pooled: check_tail(&|s| model.impostor_sf(s), count, &CHECK_LEVELS),
            })
            .collect();
        self
    }
}

/// Most quality bands per modality (band indices pack into 4 bits per modality in the survival cache key).
pub const MAX_QUALITY_BANDS: usize = 8;

/// One modality's impostor models per quality band: pairs are banded by the lower capture quality of their
/// two templates (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QualityBands {
    /// Inner edges on the pair quality, ascending: band `k` holds qualities in `[edges[k-1], edges[k])`.
    pub edges: Vec<f32>,
    /// Per band: the pooled LLR's Gaussians with the band's own impostor body and tail.
    pub models: Vec<ModalityModel>,
    /// Per band: its share of the sampled impostor pairs.
    pub share: Vec<f64>,
}

impl QualityBands {
    /// The band of a pair whose lower template quality is `q`.
    pub fn band(&self, q: f32) -> usize {
        quality_band(&self.edges, q).min(self.models.len().saturating_sub(1))
    }
}

/// Which fused distribution scores a pair: the modalities it shares (bit `i` for model index `i`) and the
/// quality band of each (4 bits per modality, band `k` coded `k + 1`, 0 for the pooled model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FusedKey {
    mask: u32,
    code: u64,
}

impl FusedKey {
    /// The shared modalities: bit `i` for model index `i`.
    pub fn mask(&self) -> u32 {
        self.mask
    }
}

/// Fitted score models for every modality of a schema, with cached fused-LLR distributions.
#[derive(Debug, Serialize, Deserialize)]
pub struct Calibration {
    /// Modalities in schema order with their models.
    pub models: Vec<(Modality, ModalityModel)>,
    /// Where the models came from (for reports): e.g. "defaults", "fitted: 1000000 impostor pairs, …".
    pub source: String,
    /// Per modality, the impostor tail models checked against the pairs counted at calibration
    /// ([`crate::tail::check_tail`]); empty when no tail was counted.
    #[serde(default)]
    pub tail_checks: Vec<ModalityTailCheck>,
    /// Per modality (parallel to `models`), its quality bands; empty or `None`: pooled models only.
    #[serde(default)]
    pub quality_bands: Vec<Option<QualityBands>>,
    /// Fused-LLR survival functions, one lazily built slot per modality subset (lock-free once built).
    #[serde(skip)]
    cache: OnceLock<Vec<OnceLock<Survival>>>,
    /// Per modality subset, the survival of the per-modality lowest band survivals (candidate cosines).
    #[serde(skip)]
    envelope_cache: OnceLock<Vec<OnceLock<Survival>>>,
    /// Fused-LLR survivals per (modality subset, band combination), built on first use.
    #[serde(skip)]
    banded_cache: RwLock<HashMap<u64, Arc<Survival>>>,
}

impl Clone for Calibration {
    fn clone(&self) -> Self {
        Calibration {
            models: self.models.clone(),
            source: self.source.clone(),
            tail_checks: self.tail_checks.clone(),
            quality_bands: self.quality_bands.clone(),
            cache: OnceLock::new(),
            envelope_cache: OnceLock::new(),
            banded_cache: RwLock::default(),
        }
    }
}

impl PartialEq for Calibration {
    fn eq(&self, other: &Self) -> bool {
        self.models == other.models
            && self.source == other.source
            && self.quality_bands == other.quality_bands
    }
}

/// The per-modality evidence and fused scores of one compared pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedScore {
    /// Sum of the per-modality LLRs over shared modalities, in nats.
    pub llr: f64,
    /// Estimated false-match rate of a fused score at least this high.
    pub fmr: f64,
    /// Calibrated score `-10·log10(fmr)`.
    pub score: f64,
}

impl Calibration {
    /// Default models for the given modalities.
    pub fn defaults(modalities: &[Modality]) -> Self {
        Self::from_models(
            modalities
                .iter()
                .map(|&m| (m, ModalityModel::default_for(m)))
                .collect(),
            "defaults",
        )
    }

    /// Builds a calibration from explicit models.
    pub fn from_models(models: Vec<(Modality, ModalityModel)>, source: impl Into<String>) -> Self {
        Calibration {
            models,
            source: source.into(),
            tail_checks: Vec::new(),
            quality_bands: Vec::new(),
            cache: OnceLock::new(),
            envelope_cache: OnceLock::new(),
            banded_cache: RwLock::default(),
        }
    }

    /// The quality bands of the model at position `i`, if it has any.
    pub fn bands(&self, i: usize) -> Option<&QualityBands> {
        self.quality_bands.get(i).and_then(Option::as_ref)
    }

    /// True iff some modality's pairs are scored by quality band.
    pub fn has_bands(&self) -> bool {
        self.quality_bands.iter().any(Option::is_some)
    }

    /// Index of `m` in the model list.
    pub fn position(&self, m: Modality) -> Option<usize> {
        self.models.iter().position(|(x, _)| *x == m)
    }

    /// The model of modality `m`.
    pub fn model(&self, m: Modality) -> Option<&ModalityModel> {
        self.models
            .iter()
            .find(|(x, _)| *x == m)
            .map(|(_, model)| model)
    }

    /// The survival function of the fused LLR over the modalities in `mask` (bits index `models`, only the
    /// first [`MAX_MODALITIES`] count), built on first use and shared without locking or reference counting.
    fn survival(&self, mask: u32) -> &Survival {
        self.cached_survival(&self.cache, mask, &|_, model| model.impostor_llr_pmf(model))
    }

    /// Like [`Calibration::survival`], but each banded modality contributes the pointwise lowest survival
    /// of its bands and its pooled model: stochastically below every band, so limits read off it are never
    /// above any band's.
    fn envelope_survival(&self, mask: u32) -> &Survival {
        if !self.has_bands() {
            return self.survival(mask);
        }
        self.cached_survival(&self.envelope_cache, mask, &|i, model| {
            let pooled = model.impostor_llr_pmf(model);
            match self.bands(i) {
                Some(b) => Pmf::lowest(
                    std::iter::once(pooled)
                        .chain(b.models.iter().map(|m| m.impostor_llr_pmf(model))),
                ),
                None => pooled,
            }
        })
    }

    fn cached_survival<'a>(
        &self,
        cache: &'a OnceLock<Vec<OnceLock<Survival>>>,
        mask: u32,
        pmf_of: &dyn Fn(usize, &ModalityModel) -> Pmf,
    ) -> &'a Survival {
        let n = self.models.len().min(MAX_MODALITIES);
        let mask = mask & ((1u32 << n) - 1);
        let slots = cache.get_or_init(|| (0..1usize << n).map(|_| OnceLock::new()).collect());
        slots[mask as usize].get_or_init(|| self.convolved(mask, &|i| pmf_of(i, &self.models[i].1)))
    }

    /// The survival of the sum over the modalities in `mask` of the LLRs distributed as `pmf_of(i)`.
    fn convolved(&self, mask: u32, pmf_of: &dyn Fn(usize) -> Pmf) -> Survival {
        let n = self.models.len().min(MAX_MODALITIES);
        let mut pmf: Option<Pmf> = None;
        for i in (0..n).filter(|i| mask & (1 << i) != 0) {
            let p = pmf_of(i);
            pmf = Some(match pmf {
                None => p,
                Some(acc) => acc.convolve(&p),
            });
        }
        pmf.map(|p| p.survival()).unwrap_or(Survival {
            offset: 0,
            sf: vec![1.0],
        })
    }

    /// The fused survival of modality subset `mask` where `code` holds, 4 bits per modality, `k + 1` for a
    /// modality scored in its band `k` and 0 for one scored by its pooled model; built on first use, cached.
    fn banded_survival(&self, mask: u32, code: u64) -> Arc<Survival> {
        let key = u64::from(mask) | (code << MAX_MODALITIES);
        if let Some(s) = read_guard(&self.banded_cache).get(&key) {
            return s.clone();
        }
        let built = Arc::new(self.convolved(mask, &|i| {
            let nibble = ((code >> (4 * i)) & 0xf) as usize;
            let pooled = &self.models[i].1;
            match self.bands(i) {
                Some(b) if nibble > 0 => {
                    b.models[(nibble - 1).min(b.models.len() - 1)].impostor_llr_pmf(pooled)
                }
                _ => pooled.impostor_llr_pmf(pooled),
            }
        }));
        let mut w = self
            .banded_cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        w.entry(key).or_insert(built).clone()
    }

    /// Fuses per-modality cosines (by model index) into the fused LLR and the calibrated score, with the
    /// pooled models (no quality known). An empty set of shared modalities gives FMR 1 (score 0): no evidence.
    pub fn fuse(&self, cosines: &[(usize, f32)]) -> FusedScore {
        let mut q = [(0usize, 0f32, None); MAX_MODALITIES];
        let n = cosines.len().min(MAX_MODALITIES);
        for (k, &(i, s)) in cosines.iter().take(n).enumerate() {
            q[k] = (i, s, None);
        }
        self.fuse_q(&q[..n])
    }

    /// Fuses per-modality `(model index, cosine, pair quality)`: the pair quality (the lower of the two
    /// templates' qualities) picks the band of a banded modality, and the FMR is read off the fused
    /// distribution of those bands (pooled where a modality has no bands or the quality is unknown).
    pub fn fuse_q(&self, scores: &[(usize, f32, Option<f32>)]) -> FusedScore {
        let mut key = FusedKey::default();
        let mut llr = 0.0;
        for &(i, s, q) in scores {
            if self.add_to_key(&mut key, i, q) {
                llr += self.models[i].1.llr(f64::from(s));
            }
        }
        if key.mask == 0 {
            return FusedScore {
                llr: 0.0,
                fmr: 1.0,
                score: 0.0,
            };
        }
        let fmr = self.with_survival(key, |s| s.fmr(llr)).clamp(MIN_FMR, 1.0);
        FusedScore {
            llr,
            fmr,
            score: score_from_fmr(fmr),
        }
    }

    /// Adds modality `i` scored at pair quality `q` to `key` as [`Calibration::fuse_q`] scores it; false
    /// (and `key` unchanged) when `i` is not a fused modality of this calibration.
    fn add_to_key(&self, key: &mut FusedKey, i: usize, q: Option<f32>) -> bool {
        if i >= MAX_MODALITIES || i >= self.models.len() {
            return false;
        }
        key.mask |= 1 << i;
        if let (Some(b), Some(q)) = (self.bands(i), q) {
            // Band k is coded k + 1; 0 means pooled.
            key.code |= (b.band(q) as u64 + 1) << (4 * i);
        }
        true
    }

    /// Runs `f` on the fused survival that scores pairs of `key`.
    fn with_survival<T>(&self, key: FusedKey, f: impl FnOnce(&Survival) -> T) -> T {
        if key.code == 0 {
            f(self.survival(key.mask))
        } else {
            f(&self.banded_survival(key.mask, key.code))
        }
    }

    /// The fused distribution a pair is scored on, from its shared modalities as `(model index, pair
    /// quality)`: what [`Calibration::attainable_fmr`] needs to predict a share of pairs without cosines.
    pub fn fused_key(&self, members: &[(usize, Option<f32>)]) -> FusedKey {
        let mut key = FusedKey::default();
        for &(i, q) in members {
            self.add_to_key(&mut key, i, q);
        }
        key
    }

    /// The share of impostor pairs of `key` the model gives a fused score of at least `score`.
    ///
    /// Scores are read off a distribution with atoms (every modality's LLR floor, the grid), so they jump:
    /// with most impostor mass at the floor, a single modality gives score 0 or at least the score of the
    /// mass above the floor, and no pair can score in between. The nominal FMR `10^(−score/10)` then
    /// overstates the share predicted at or above `score`; this is the model's FMR at the lowest attainable
    /// score at or above it, which a measured count must be compared with. At most the nominal FMR.
    pub fn attainable_fmr(&self, key: FusedKey, score: f64) -> f64 {
        if key.mask == 0 {
            // No shared modality: score 0, never above a positive threshold.
            return if score <= 0.0 { 1.0 } else { 0.0 };
        }
        let nominal = fmr_from_score(score);
        self.with_survival(key, |s| {
            // The grid's sums carry rounding (the total mass can read 1 + 1e-16): compare with a margin.
            s.sf.iter()
                .copied()
                .find(|&p| p <= nominal * (1.0 + 1e-9))
                .map_or(0.0, |p| p.min(nominal))
        })
    }

    /// The lowest fused LLR at which a pair scored on `key` reaches `score`: a pair whose LLR sum stays
    /// below it scores below `score`, because the fused FMR only falls as the LLR grows. `-∞` when every
    /// pair reaches it (`score ≤ 0`), `+∞` when none does.
    pub fn llr_needed(&self, key: FusedKey, score: f64) -> f64 {
        if score <= 0.0 {
            return f64::NEG_INFINITY;
        }
        if key.mask == 0 {
            return f64::INFINITY;
        }
        self.with_survival(key, |s| needed_on(s, score))
    }

    /// [`Calibration::llr_needed`] of every band combination of the modalities in `mask` at once: at most
    /// the least of them, read off the survival that takes each banded modality's pointwise lowest band
    /// survival (stochastically below every band, so its passing LLRs start no later than any band's).
    pub fn llr_needed_any_band(&self, mask: u32, score: f64) -> f64 {
        if score <= 0.0 {
            return f64::NEG_INFINITY;
        }
        if mask == 0 {
            return f64::INFINITY;
        }
        needed_on(self.envelope_survival(mask), score)
    }

    /// Every fused key of a pair sharing a non-empty subset of the models `positions` (each banded model
    /// in each of its bands), or `None` when there are more than `limit`.
    pub fn fused_keys(&self, positions: &[usize], limit: usize) -> Option<Vec<FusedKey>> {
        let positions: Vec<usize> = positions
            .iter()
            .copied()
            .filter(|&i| i < MAX_MODALITIES && i < self.models.len())
            .collect();
        if positions.len() > 16 {
            return None;
        }
        let mut keys = Vec::new();
        for subset in 1u32..(1 << positions.len()) {
            let mut partial = vec![FusedKey::default()];
            for (k, &i) in positions.iter().enumerate() {
                if subset & (1 << k) == 0 {
                    continue;
                }
                let bands = self.bands(i).map_or(0, |b| b.models.len());
                let mut next = Vec::with_capacity(partial.len() * bands.max(1));
                for key in &partial {
                    let with = FusedKey {
                        mask: key.mask | 1 << i,
                        code: key.code,
                    };
                    if bands == 0 {
                        next.push(with);
                    }
                    for band in 0..bands {
                        next.push(FusedKey {
                            code: with.code | (band as u64 + 1) << (4 * i),
                            ..with
                        });
                    }
                }
                partial = next;
                if keys.len() + partial.len() > limit {
                    return None;
                }
            }
            keys.extend(partial);
        }
        Some(keys)
    }

    /// Greedy relaxation of complete budgets `b` (see [`Calibration::candidate_cosines_relaxed`]).
    fn relax_budgets(
        &self,
        mut b: Vec<f64>,
        limits: &[(u32, f64)],
        genuine_miss: f64,
        cost: &dyn Fn(&[f64]) -> f64,
    ) -> Vec<f64> {
        let n = b.len();
        let singles: Vec<f64> = (0..n)
            .map(|i| {
                limits
                    .iter()
                    .find(|&&(m, _)| m == 1 << i)
                    .map_or(f64::INFINITY, |&(_, t)| t)
            })
            .collect();
        // Genuine draws of every modality's LLR (seeded: the same calibration gives the same budgets).
        let mut rng = pacha_index::rng::SplitMix(0x9e1a);
        let draws: Vec<f64> = (0..RELAX_DRAWS)
            .flat_map(|_| {
                self.models[..n]
                    .iter()
                    .map(|(_, m)| m.llr(m.genuine.mean + m.genuine.sd * rng.normal()))
                    .collect::<Vec<_>>()
            })
            .collect();
        // Per multi-modal subset: its limit, its number of genuine hits, and the hits no single modality can
        // carry alone (only those can be missed by raised budgets below the single limits).
        struct Subset {
            mask: u32,
            limit: f64,
            hits: usize,
            weak: Vec<usize>,
        }
        let subsets: Vec<Subset> = limits
            .iter()
            .filter(|&&(m, _)| m.count_ones() >= 2)
            .map(|&(mask, limit)| {
                let members: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
                let mut hits = 0;
                let mut weak = Vec::new();
                for k in 0..RELAX_DRAWS {
                    let l = &draws[k * n..(k + 1) * n];
                    if members.iter().map(|&i| l[i]).sum::<f64>() >= limit {
                        hits += 1;
                        if members.iter().all(|&i| l[i] < singles[i]) {
                            weak.push(k);
                        }
                    }
                }
                Subset {
                    mask,
                    limit,
                    hits,
                    weak,
                }
            })
            .collect();
        let feasible = |b: &[f64]| {
            if (0..n).any(|i| b[i] > singles[i] + 1e-9) {
                return false;
            }
            subsets.iter().all(|s| {
                let members = (0..n).filter(|i| s.mask & (1 << i) != 0);
                if members.clone().map(|i| b[i]).sum::<f64>() <= s.limit + 1e-9 {
                    return true;
                }
                let missed = s
                    .weak
                    .iter()
                    .filter(|&&k| members.clone().all(|i| draws[k * n + i] < b[i]))
                    .count();
                missed as f64 <= genuine_miss * s.hits as f64
            })
        };
        let mut best = cost(&b);
        let mut step = 2.0;
        while step >= GRID_STEP {
            let mut pick: Option<(usize, f64)> = None;
            for i in 0..n {
                let mut t = b.clone();
                t[i] = (t[i] + step).min(singles[i]);
                if t[i] <= b[i] || !feasible(&t) {
                    continue;
                }
                let c = cost(&t);
                if c < best && pick.is_none_or(|(_, pc)| c < pc) {
                    pick = Some((i, c));
                }
            }
            match pick {
                Some((i, c)) => {
                    b[i] = (b[i] + step).min(singles[i]);
                    best = c;
                }
                None => step /= 2.0,
            }
        }
        b
    }

    /// Per-modality cosine thresholds that keep every pair whose fused score can reach `score_threshold`
    /// (see the module docs). `None` for a modality means no cosine up to 1 can matter on its own.
    ///
    /// The per-modality LLR budgets `b_m` satisfy `Σ_{m∈S} b_m ≤ T_S` for every subset `S` of modalities a
    /// pair can share, so a pair that passes within `S` has some `L_m ≥ b_m` and is kept. Among such budgets,
    /// a local search picks ones that minimise the expected share of impostor pairs kept, `Σ P(L_m ≥ b_m)`:
    /// weak modalities (fingers) get higher cosine thresholds than an equal split would give them.
    pub fn candidate_cosines(&self, score_threshold: f64) -> Vec<Option<f32>> {
        self.candidate_cosines_relaxed(score_threshold, 0.0)
    }

    /// Like [`Calibration::candidate_cosines`], but a multi-modal subset constraint `Σ_{m∈S} b_m ≤ T_S` may
    /// be exceeded where the *genuine* models say it costs little: after the complete budgets are found,
    /// budgets are raised greedily (cheapest impostor share first) as long as, for every subset `S` of two
    /// or more modalities that no longer holds, at most `genuine_miss` of genuine pairs that pass the fused
    /// threshold within `S` have every `L_m < b_m` (estimated from [`RELAX_DRAWS`] seeded draws of the
    /// genuine models). Single-modality limits stay hard. `genuine_miss = 0` gives the complete budgets.
    ///
    /// Why: with face + two fingers the complete split gives every modality about a third of the fused
    /// threshold, so each per-modality join runs at a cosine (≈ 0.3) where a large share of the pairs an
    /// index visits must be rescored, though a genuine pair that weak in *every* modality at once is rare.
    pub fn candidate_cosines_relaxed(
        &self,
        score_threshold: f64,
        genuine_miss: f64,
    ) -> Vec<Option<f32>> {
        self.budget_cosines(score_threshold, genuine_miss, u32::MAX)
    }

    /// [`Calibration::candidate_cosines`] for a probe that has only the models in `within` (bit `i`: model
    /// `i`): its pairs share a subset of `within`, so only those subsets' limits bind and the budgets (and
    /// cosines) are never lower than they need to be for it; models outside `within` get `None`. A face-only
    /// probe against a face + 2 fingers store is searched at the cosine where the face alone reaches the
    /// threshold, not at the third of it the three-modality split leaves the face.
    pub fn candidate_cosines_within(&self, score_threshold: f64, within: u32) -> Vec<Option<f32>> {
        self.budget_cosines(score_threshold, 0.0, within)
    }

    /// The budget cosines of [`Calibration::candidate_cosines_relaxed`] over the subsets of `within`.
    fn budget_cosines(
        &self,
        score_threshold: f64,
        genuine_miss: f64,
        within: u32,
    ) -> Vec<Option<f32>> {
        let fmr = fmr_from_score(score_threshold);
        let n = self.models.len().min(MAX_MODALITIES);
        let masks: Vec<u32> = if n <= 8 {
            (1u32..(1 << n)).filter(|m| m & !within == 0).collect()
        } else {
            // Too many subsets to enumerate: singles, pairs and the full set (documented limitation).
            let mut v: Vec<u32> = (0..n).map(|i| 1 << i).collect();
            for i in 0..n {
                for j in i + 1..n {
                    v.push((1 << i) | (1 << j));
                }
            }
            v.push((1 << n) - 1);
            v.retain(|m| m & !within == 0);
            v
        };
        // Subset limits, lowered by one grid step per modality to absorb the grid's rounding.
        let limits: Vec<(u32, f64)> = masks
            .iter()
            .map(|&mask| {
                (
                    mask,
                    self.envelope_survival(mask).llr_for_fmr(fmr)
                        - f64::from(mask.count_ones()) * GRID_STEP,
                )
            })
            .collect();
        let mut b = vec![f64::INFINITY; n];
        for &(mask, t) in &limits {
            for (i, bi) in b.iter_mut().enumerate() {
                if mask & (1 << i) != 0 {
                    *bi = bi.min(t / f64::from(mask.count_ones()));
                }
            }
        }
        let feasible = |b: &[f64]| {
            limits.iter().all(|&(mask, t)| {
                let sum: f64 = (0..n).filter(|i| mask & (1 << i) != 0).map(|i| b[i]).sum();
                sum <= t + 1e-9
            })
        };
        let kept = |i: usize, bi: f64| -> f64 {
            let model = &self.models[i].1;
            model
                .cosine_for_llr(bi)
                .map_or(0.0, |c| model.impostor.sf(c))
        };
        let cost = |b: &[f64]| -> f64 { (0..n).map(|i| kept(i, b[i])).sum() };
        if feasible(&b) && n > 1 {
            let mut best = cost(&b);
            let mut step = 2.0;
            while step >= GRID_STEP {
                let mut improved = false;
                for i in 0..n {
                    for j in 0..n {
                        if i == j {
                            continue;
                        }
                        let mut t = b.clone();
                        t[i] += step;
                        t[j] -= step;
                        if feasible(&t) {
                            let c = cost(&t);
                            if c < best {
                                best = c;
                                b = t;
                                improved = true;
                            }
                        }
                    }
                }
                if !improved {
                    step /= 2.0;
                }
            }
        }
        if genuine_miss > 0.0 && n > 1 && feasible(&b) {
            b = self.relax_budgets(b, &limits, genuine_miss, &cost);
        }
        // A budget at or below the LLR floor would admit every pair (every cosine has LLR ≥ floor). That
        // happens when the threshold sits at the floor itself (a genuine model far from the impostor tail
        // saturates the LLR there) and the rounding margin above pushes it down. Every LLR is either exactly
        // the floor or above it, and a pair at the floor alone never passes (P(L ≥ floor) = 1), so the
        // budget is raised to half a grid step above the floor; only pairs within 0.01 nats of the floor
        // could be affected.
        b.iter()
            .zip(&self.models)
            .enumerate()
            .map(|(i, (&l, (_, model)))| {
                // `i < n ≤ MAX_MODALITIES`: the shift stays in range.
                (within & (1 << i) != 0)
                    .then(|| budget_cosine(model, l))
                    .flatten()
            })
            .collect()
    }

    /// Per quality band of model `i` (band order), the lowest cosine at which a pair of that band scored on
    /// modality `i` alone reaches `score_threshold`, with the rounding of [`Calibration::candidate_cosines`]
    /// (`None`: no cosine up to 1 does); empty when `i` has no bands. The single-modality candidate cosine
    /// is the lowest of these and the pooled model's: a join that knows each pair's band may cut higher.
    pub fn band_candidate_cosines(&self, i: usize, score_threshold: f64) -> Vec<Option<f32>> {
        let (Some(bands), Some((_, model))) = (self.bands(i), self.models.get(i)) else {
            return Vec::new();
        };
        if i >= MAX_MODALITIES {
            return Vec::new();
        }
        let fmr = fmr_from_score(score_threshold);
        (0..bands.models.len())
            .map(|k| {
                let l = self
                    .banded_survival(1 << i, (k as u64 + 1) << (4 * i))
                    .llr_for_fmr(fmr)
                    - GRID_STEP;
                budget_cosine(model, l)
            })
            .collect()
    }
}

/// The lowest cosine whose LLR on `model` reaches budget `l`, the budget raised to half a grid step above the
/// LLR floor (see [`Calibration::candidate_cosines_relaxed`]); `None` if no cosine up to 1 does.
fn budget_cosine(model: &ModalityModel, l: f64) -> Option<f32> {
    model
        .cosine_for_llr(l.max(LLR_FLOOR + 0.5 * GRID_STEP))
        .map(|c| c as f32)
}

/// Reads a lock, recovering the data of a poisoned one (the cache holds only derived values).
fn read_guard<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The lowest fused LLR at which survival `s` reaches `score` (see [`Calibration::llr_needed`]).
fn needed_on(s: &Survival, score: f64) -> f64 {
    // Grid cell k (LLRs in [(k + offset)·step, (k + offset + 1)·step)) reads sf[k]; past the last cell the
    // FMR is 0. The first cell whose FMR scores `score` starts the passing LLRs.
    (0..=s.sf.len())
        .find(|&k| {
            let fmr = s.sf.get(k).copied().unwrap_or(0.0);
            score_from_fmr(fmr) >= score
        })
        .map_or(f64::INFINITY, |k| (k as i64 + s.offset) as f64 * GRID_STEP)
}

/// Calibrated score of a false-match rate: `-10·log10(fmr)`.
pub fn score_from_fmr(fmr: f64) -> f64 {
    // `max(0.0)` also turns the -0.0 of FMR = 1 into 0.
    (-10.0 * fmr.clamp(MIN_FMR, 1.0).log10()).max(0.0)
}

/// False-match rate of a calibrated score.
pub fn fmr_from_score(score: f64) -> f64 {
    10f64.powf(-score / 10.0)
}

/// The target FPIR (false hits per probe) of a dedup or identify that names none: one probe in a thousand.
pub const DEFAULT_FPIR: f64 = 1e-3;

/// When a labelled calibration's tail pool grows ([`ModalityTailCheck::pool_growth`]).
#[derive(Clone, Copy, Debug)]
pub struct GrowthRule {
    /// The count must pin measured ÷ predicted within `[1/tolerance, tolerance]` at the decision FMR.
    pub tolerance: f64,
    /// Least factor by which a doubling must multiply the independent events at the decision FMR.
    pub gain_min: f64,
    /// Share of the store's estimated pairs at the decision FMR past which the pool holds them all but a few.
    pub coverage_max: f64,
}

/// What a labelled tail count asks of its calibration pool ([`ModalityTailCheck::pool_growth`]).
#[derive(Clone, Debug, PartialEq)]
pub enum PoolGrowth {
    /// The count pins measured ÷ predicted at the decision FMR: keep this pool.
    Pinned,
    /// It does not, and a larger pool could narrow it (why).
    Grow(String),
    /// It does not (`why`), and a larger pool cannot add the events that would narrow it (`reason`).
    Saturated {
        /// Why the count does not pin the model ([`ModalityTailCheck::resolution_at`]).
        why: String,
        /// Why a larger pool would not help.
        reason: String,
    },
}

/// The calibrated score threshold for a target FPIR against a gallery of `gallery_size` enrolments:
/// `FMR = FPIR / N`, threshold `-10·log10(FMR)`.
pub fn threshold_for_fpir(target_fpir: f64, gallery_size: usize) -> Result<f64, EngineError> {
    if !(target_fpir > 0.0 && target_fpir < 1.0) {
        return Err(EngineError::InvalidArgument(format!(
            "target FPIR {target_fpir} is not in (0, 1)"
        )));
    }
    let n = gallery_size.max(1) as f64;
    Ok(score_from_fmr(target_fpir / n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hub-pool check of `modality` over 10¹² pairs with these model rows (no Gaussian, no bands).
    fn check_of(modality: &str, model: Vec<TailCheckRow>) -> ModalityTailCheck {
        ModalityTailCheck {
            modality: modality.into(),
            pairs: 1_000_000_000_000,
            excluded_genuine: 0,
            model,
            gaussian: Vec::new(),
            pool_seed: 0,
            pool_cap: 0,
            pool_kind: crate::engine::TailPool::Hubs,
            bands: Vec::new(),
            sampled_below: None,
        }
    }

    /// A model row at `level` measured exactly as predicted, with `events` of design effect `d` and the ratio
    /// interval `ci` (`None`: the count does not reach `level`).
    fn row_at(level: f64, events: u64, d: f64, ci: Option<(f64, f64)>) -> TailCheckRow {
        TailCheckRow {
            level,
            cosine: 0.5,
            events,
            pairs: 1_000_000_000_000,
            measured: ci.map(|_| level),
            ratio: ci.map(|_| 1.0),
            ci: ci.map(|(lo, hi)| (lo * level, hi * level)),
            design_effect: ci.map(|_| d),
            ratio_ci: ci,
        }
    }

    #[test]
    fn resolution_at_the_decision_fmr_names_what_the_count_cannot_pin() {
        let row = |level: f64, ci: Option<(f64, f64)>| row_at(level, 100, 9.0, ci);
        let check = check_of(
            "finger7",
            vec![
                row(1e-8, Some((0.8, 1.25))),
                row(1e-9, Some((0.51, 1.85))),
                row(1e-10, None),
            ],
        );
        // 100 k rows at FPIR 1e-3: 1e-8, pinned within 1.5×.
        assert_eq!(check.resolution_at(1e-3 / 1e5, 1.5, false), None);
        // Without labels the count beyond 1e-6 may hold duplicates: extrapolated, whatever it shows.
        let unlabelled = check.resolution_at(1e-3 / 1e5, 1.5, true).expect("a note");
        assert!(
            unlabelled.contains("without labelled pairs"),
            "{unlabelled}"
        );
        // 1 M rows: 1e-9, an interval wider than 1.5×, named with its events.
        let note = check
            .resolution_at(1e-3 / 994_976.0, 1.5, false)
            .expect("a note");
        assert!(
            note.contains("[0.51, 1.85]") && note.contains("100 events"),
            "{note}"
        );
        // Between levels the deeper row is read: 3e-9 reads 1e-9.
        assert!(check.resolution_at(3e-9, 1.5, false).is_some());
        // Beyond every counted level: the model extrapolates, and says so.
        let deep = check.resolution_at(2.6e-11, 1.5, false).expect("a note");
        assert!(deep.contains("extrapolates"), "{deep}");
    }

    #[test]
    fn a_pool_grows_while_doubling_adds_independent_events_and_stops_when_it_adds_none() {
        // The decision row (1e-9) with `events` over design effect `d`, its interval `ci`.
        let check = |events: u64, d: f64, ci: Option<(f64, f64)>| {
            check_of("face", vec![row_at(1e-9, events, d, ci)])
        };
        let fmr = 1e-9;
        let rule = GrowthRule {
            tolerance: 1.5,
            gain_min: 1.25,
            coverage_max: 0.5,
        };
        // The 1 M face counts of the thirteenth session: 60 000 rows (122 events, d 14.9), 120 000 (423, 17.4),
        // 240 000 (509, 21.1); every pair of the store (4.95e11) held 511 at 1e-9.
        let c60 = check(122, 14.9, Some((0.45, 2.02)));
        let c120 = check(423, 17.4, Some((0.67, 1.54)));
        let c240 = check(509, 21.1, Some((0.66, 1.53)));
        let store = 4.95e11;
        assert!((c60.effective_events_at(fmr) - 122.0 / 14.9).abs() < 1e-9);
        assert!(matches!(
            c60.pool_growth(fmr, &rule, None, store),
            PoolGrowth::Grow(_)
        ));
        // 423 of the store's ≈ 495 pairs at 1e-9 are in the 120 000-row pool: it stops there.
        match c120.pool_growth(fmr, &rule, None, store) {
            PoolGrowth::Saturated { reason, .. } => {
                assert!(
                    reason.contains("counted 423 of the ≈ 495 pairs"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Without the store's size, the doubling's gain says the same one step later.
        let b60 = Some(c60.effective_events_at(fmr));
        assert!(matches!(
            c120.pool_growth(fmr, &rule, b60, 0.0),
            PoolGrowth::Grow(_)
        ));
        let b120 = Some(c120.effective_events_at(fmr));
        match c240.pool_growth(fmr, &rule, b120, 0.0) {
            PoolGrowth::Saturated { reason, .. } => {
                assert!(reason.contains("only from 24.3 to 24.1"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Pinned whatever came before; a count that reached nothing at the decision FMR always grows.
        let pinned = check(489, 17.5, Some((0.68, 1.47)));
        assert_eq!(
            pinned.pool_growth(fmr, &rule, b120, store),
            PoolGrowth::Pinned
        );
        let none = check(0, 1.0, None);
        assert_eq!(none.effective_events_at(fmr), 0.0);
        assert!(matches!(
            none.pool_growth(fmr, &rule, Some(0.0), store),
            PoolGrowth::Grow(_)
        ));
    }

    #[test]
    fn erfc_and_quantile_are_accurate() {
        // Reference values of erfc.
        for (x, want) in [
            (0.0, 1.0),
            (1.0, 0.157_299_207_050_285),
            (3.0, 2.209_049_699_858_544e-5),
            (6.0, 2.151_973_671_249_891e-17),
        ] {
            let got = erfc(x);
            assert!(
                ((got - want) / want).abs() < 2e-7,
                "erfc({x}) = {got}, want {want}"
            );
        }
        assert!((erfc(-1.0) - (2.0 - 0.157_299_207_050_285)).abs() < 1e-7);
        for p in [1e-12, 1e-6, 0.01, 0.3, 0.5, 0.9, 0.999, 0.999_999] {
            let z = norm_quantile(p);
            let back = 0.5 * erfc(-z / std::f64::consts::SQRT_2);
            assert!(((back - p) / p).abs() < 1e-6, "Φ(Φ⁻¹({p})) = {back}");
        }
    }

    #[test]
    fn llr_is_monotone_and_cosine_inverse_matches() {
        for m in [Modality::Face, Modality::Finger(2)] {
            let model = ModalityModel::default_for(m);
            let mut prev = f64::NEG_INFINITY;
            for i in 0..=2000 {
                let s = -1.0 + i as f64 * 0.001;
                let l = model.llr(s);
                assert!(l >= prev - 1e-12, "{m}: llr not monotone at {s}");
                prev = l;
            }
            let c = model.cosine_for_llr(5.0).unwrap();
            assert!((model.llr(c) - 5.0).abs() < 1e-6);
            assert!(model.llr(c - 1e-3) < 5.0);
        }
        // A concave LLR (genuine narrower than impostor) keeps rising past its maximum, by the impostor
        // log-rarity: strictly while the impostor survival falls, so no two cosines there share a value.
        let m = ModalityModel {
            genuine: Gaussian {
                mean: 0.5,
                sd: 0.05,
            },
            impostor: Gaussian { mean: 0.0, sd: 0.1 },
            impostor_tail: None,
            impostor_body: None,
            llr_table: LlrTable::default(),
        };
        let (t, convex) = m.turning_point().unwrap();
        assert!(!convex && t > 0.5 && t < 0.7, "{t}");
        let mut prev = m.llr(t);
        for i in 1..=20 {
            let s = t + f64::from(i) * 0.005;
            let l = m.llr(s);
            assert!(l > prev, "not rising at {s}: {l} <= {prev}");
            let want = m.raw_llr(t) + (m.impostor.sf(t) / m.impostor.sf(s)).ln();
            assert!((l - want.min(LLR_CAP)).abs() < 1e-9, "{s}: {l} vs {want}");
            prev = l;
        }
        let c = m.cosine_for_llr(m.llr(t) + 3.0).unwrap();
        assert!(c > t && (m.llr(c) - (m.llr(t) + 3.0)).abs() < 1e-6);
    }

    #[test]
    fn pairs_past_a_concave_maximum_get_their_own_fmr() {
        let m = ModalityModel {
            genuine: Gaussian {
                mean: 0.5,
                sd: 0.05,
            },
            impostor: Gaussian { mean: 0.0, sd: 0.1 },
            impostor_tail: None,
            impostor_body: None,
            llr_table: LlrTable::default(),
        };
        let cal = Calibration::from_models(vec![(Modality::Face, m.clone())], "concave");
        let (t, _) = m.turning_point().unwrap();
        let (a, b) = (
            cal.fuse(&[(0, t as f32 + 0.02)]),
            cal.fuse(&[(0, t as f32 + 0.08)]),
        );
        assert!(b.score > a.score + 1.0, "{a:?} vs {b:?}");
        // One modality: the FMR is the impostor survival at the cosine, past the maximum too.
        for s in [t + 0.02, t + 0.08] {
            let f = cal.fuse(&[(0, s as f32)]);
            let want = m.impostor_sf(s);
            assert!(
                f.fmr >= want * 0.98 && f.fmr <= want * 1.1,
                "{s}: {} vs {want}",
                f.fmr
            );
        }
    }

    #[test]
    fn single_modality_fmr_matches_the_gaussian_tail() {
        let cal = Calibration::defaults(&[Modality::Face]);
        let model = &cal.models[0].1;
        for s in [0.3f32, 0.4, 0.5] {
            let f = cal.fuse(&[(0, s)]);
            let want = model.impostor.sf(f64::from(s));
            // The grid rounds the LLR down by at most one step: FMR within a small factor, never below.
            assert!(f.fmr >= want * 0.999, "s={s}: fmr {} < tail {want}", f.fmr);
            assert!(f.fmr <= want * 1.6, "s={s}: fmr {} ≫ tail {want}", f.fmr);
        }
    }

    #[test]
    fn fused_fmr_matches_monte_carlo_for_two_modalities() {
        use rand::{RngExt, SeedableRng};
        let cal = Calibration::defaults(&[Modality::Face, Modality::Finger(2)]);
        let (mf, mg) = (&cal.models[0].1, &cal.models[1].1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 400_000;
        let mut fused = Vec::with_capacity(n);
        for _ in 0..n {
            // Box–Muller draws from the impostor models.
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            let r = (-2.0 * u1.ln()).sqrt();
            let (z1, z2) = (
                r * (2.0 * std::f64::consts::PI * u2).cos(),
                r * (2.0 * std::f64::consts::PI * u2).sin(),
            );
            let a = mf.impostor.mean + mf.impostor.sd * z1;
            let b = mg.impostor.mean + mg.impostor.sd * z2;
            fused.push(mf.llr(a) + mg.llr(b));
        }
        fused.sort_by(f64::total_cmp);
        for q in [0.99, 0.999, 0.9999] {
            let f = fused[(q * n as f64) as usize];
            let measured = 1.0 - q;
            let surv = cal.survival(0b11).fmr(f);
            assert!(
                surv > measured * 0.7 && surv < measured * 1.5,
                "q={q}: fused fmr {surv} vs MC {measured}"
            );
        }
    }

    #[test]
    fn attainable_fmr_is_the_largest_fmr_a_pair_at_or_above_the_score_gets() {
        // A narrow impostor model puts almost all impostor mass on the LLR floor (as look-alike families did).
        let narrow = ModalityModel {
            impostor: Gaussian {
                mean: 0.0,
                sd: 0.03,
            },
            ..ModalityModel::default_for(Modality::Face)
        };
        for cal in [
            Calibration::defaults(&[Modality::Face]),
            Calibration::from_models(vec![(Modality::Face, narrow)], "test"),
            Calibration::defaults(&[Modality::Face, Modality::Finger(2)]),
        ] {
            let n = cal.models.len();
            let key = cal.fused_key(&(0..n).map(|i| (i, None)).collect::<Vec<_>>());
            // Every cosine pair on a fine grid (the second modality coarser), fused.
            let steps: Vec<f32> = (-100..=1000).map(|k| k as f32 / 1000.0).collect();
            let mut fused = Vec::new();
            for &a in &steps {
                if n == 1 {
                    fused.push(cal.fuse(&[(0, a)]));
                } else {
                    for &b in steps.iter().step_by(10) {
                        fused.push(cal.fuse(&[(0, a), (1, b)]));
                    }
                }
            }
            let mut jumped = false;
            for t in (0..=90).map(f64::from) {
                let p = cal.attainable_fmr(key, t);
                let nominal = fmr_from_score(t);
                assert!(
                    p <= nominal,
                    "{n} modalities, score {t}: {p} > nominal {nominal}"
                );
                // No pair scoring at or above t has an FMR above p, and some pair has FMR p (up to the
                // cosine grid of the scan).
                let top = fused
                    .iter()
                    .filter(|f| f.score >= t)
                    .map(|f| f.fmr)
                    .fold(0.0, f64::max);
                assert!(top <= p * (1.0 + 1e-9), "{n}, {t}: a pair at {top} > {p}");
                assert!(
                    top >= p * 0.8 || p < 1e-12,
                    "{n}, {t}: {p} not attained ({top})"
                );
                jumped |= p < 0.7 * nominal;
            }
            // One modality: the floor atom makes scores just above 0 unattainable (two smooth it out).
            assert!(jumped || n > 1, "{n} modalities: no jump seen");
            assert_eq!(cal.attainable_fmr(FusedKey::default(), 10.0), 0.0);
        }
    }

    /// The LLR a key needs is where its fused score crosses the floor: every LLR sum at or above it
    /// scores at least the floor, one grid step below it scores less; every subset of three modalities is
    /// among the keys.
    #[test]
    fn llr_needed_is_where_the_fused_score_crosses_the_floor() {
        let cal =
            Calibration::defaults(&[Modality::Face, Modality::Finger(2), Modality::Finger(7)]);
        let keys = cal.fused_keys(&[0, 1, 2], 100).unwrap();
        assert_eq!(keys.len(), 7);
        assert!(cal.fused_keys(&[0, 1, 2], 6).is_none());
        for score in [20.0, 60.0, 80.0] {
            for &key in &keys {
                let need = cal.llr_needed(key, score);
                assert!(need.is_finite(), "{key:?} {score}");
                let at = |l: f64| {
                    cal.with_survival(key, |s| score_from_fmr(s.fmr(l).clamp(MIN_FMR, 1.0)))
                };
                for l in [need + 1e-9, need + 0.5 * GRID_STEP, need + 3.0] {
                    assert!(
                        at(l) >= score,
                        "{key:?}: LLR {l} scores {} < {score}",
                        at(l)
                    );
                }
                for l in [need - 0.5 * GRID_STEP, need - 3.0] {
                    assert!(at(l) < score, "{key:?}: LLR {l} scores {} ≥ {score}", at(l));
                }
            }
        }
        assert_eq!(cal.llr_needed(keys[0], 0.0), f64::NEG_INFINITY);
        assert_eq!(cal.llr_needed(keys[0], 1e6), f64::INFINITY);
    }

    #[test]
    fn candidate_cosines_keep_every_passing_pair() {
        let cal =
            Calibration::defaults(&[Modality::Face, Modality::Finger(2), Modality::Finger(7)]);
        let thr = threshold_for_fpir(1e-3, 1_000_000).unwrap();
        let c = cal.candidate_cosines(thr);
        assert_eq!(c.len(), 3);
        // Exhaustively: any cosine triple that passes must exceed at least one candidate cosine.
        let steps: Vec<f32> = (0..=50).map(|i| -0.2 + i as f32 * 0.024).collect();
        let mut passing = 0;
        for &a in &steps {
            for &b in &steps {
                for &d in &steps {
                    if cal.fuse(&[(0, a), (1, b), (2, d)]).score >= thr {
                        passing += 1;
                        let kept = [a, b, d]
                            .iter()
                            .zip(&c)
                            .any(|(&s, ci)| ci.is_some_and(|ci| s >= ci));
                        assert!(
                            kept,
                            "pair ({a},{b},{d}) passes but no candidate cosine keeps it: {c:?}"
                        );
                    }
                }
            }
        }
        assert!(passing > 100, "the grid should contain passing triples");
        // And the candidate cosines are far above the impostor means (the pass is selective).
        for ci in c.iter().flatten() {
            assert!(*ci > 0.2, "{c:?}");
        }
    }

    /// A probe with only some modalities: its cosines keep every passing pair that shares a subset of
    /// them, none is below what the whole split gives where that subset is one modality, the rest are `None`,
    /// and all modalities give exactly the split's cosines.
    #[test]
    fn candidate_cosines_within_keep_every_pair_of_the_probe_modalities() {
        let cal =
            Calibration::defaults(&[Modality::Face, Modality::Finger(2), Modality::Finger(7)]);
        let thr = threshold_for_fpir(1e-3, 1_000_000).unwrap();
        let split = cal.candidate_cosines(thr);
        assert_eq!(cal.candidate_cosines_within(thr, 0b111), split);
        assert_eq!(cal.candidate_cosines_within(thr, u32::MAX), split);
        let steps: Vec<f32> = (0..=40).map(|i| -0.2 + i as f32 * 0.03).collect();
        for within in 1u32..8 {
            let c = cal.candidate_cosines_within(thr, within);
            let members: Vec<usize> = (0..3).filter(|i| within & (1 << i) != 0).collect();
            for i in 0..3 {
                assert_eq!(c[i].is_some(), within & (1 << i) != 0, "{within:b}: {c:?}");
            }
            if members.len() == 1 {
                let i = members[0];
                assert!(
                    c[i].unwrap() > split[i].unwrap() + 0.05,
                    "{c:?} vs {split:?}"
                );
            }
            // Every pair sharing a non-empty subset of `within` that passes exceeds one of its cosines.
            let mut passing = 0;
            for shared in 1u32..8 {
                if shared & !within != 0 {
                    continue;
                }
                let idx: Vec<usize> = (0..3).filter(|i| shared & (1 << i) != 0).collect();
                let grid = steps.len().pow(idx.len() as u32);
                for g in 0..grid {
                    let mut rest = g;
                    let cos: Vec<(usize, f32)> = idx
                        .iter()
                        .map(|&i| {
                            let v = steps[rest % steps.len()];
                            rest /= steps.len();
                            (i, v)
                        })
                        .collect();
                    if cal.fuse(&cos).score >= thr {
                        passing += 1;
                        assert!(
                            cos.iter().any(|&(i, v)| c[i].is_some_and(|ci| v >= ci)),
                            "{within:b}: {cos:?} passes, cosines {c:?}"
                        );
                    }
                }
            }
            assert!(passing > 0, "{within:b}: no passing pair on the grid");
        }
        assert!(
            cal.candidate_cosines_within(thr, 0)
                .iter()
                .all(Option::is_none)
        );
    }

    #[test]
    fn relaxed_candidate_cosines_miss_few_genuine_hits_and_keep_single_modality_pairs() {
        let mods = [Modality::Face, Modality::Finger(2), Modality::Finger(7)];
        let cal = Calibration::defaults(&mods);
        let thr = threshold_for_fpir(1e-3, 1_000_000).unwrap();
        let complete = cal.candidate_cosines(thr);
        assert_eq!(cal.candidate_cosines_relaxed(thr, 0.0), complete);
        let relaxed = cal.candidate_cosines_relaxed(thr, 1e-4);
        // Raised (that is the point) but never above what one modality alone needs to pass.
        for (i, (r, c)) in relaxed.iter().zip(&complete).enumerate() {
            let (r, c) = (r.unwrap(), c.unwrap());
            assert!(r >= c, "{relaxed:?} vs {complete:?}");
            let alone = cal.fuse(&[(i, r)]).score;
            assert!(
                alone <= thr + 1e-9,
                "modality {i} at {r} passes alone ({alone})"
            );
        }
        assert!(
            relaxed
                .iter()
                .zip(&complete)
                .any(|(r, c)| r.unwrap() > c.unwrap() + 0.02),
            "{relaxed:?} vs {complete:?}"
        );
        // Independent draws of the genuine models (another seed than the relaxation's): of those whose fused
        // score passes, the share below every relaxed cosine stays near the allowance.
        let mut state = 12345u64;
        let mut unif = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (mut hits, mut missed) = (0u32, 0u32);
        for _ in 0..400_000 {
            let cos: Vec<f32> = cal
                .models
                .iter()
                .map(|(_, m)| {
                    let (u1, u2) = (unif(), unif());
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    (m.genuine.mean + m.genuine.sd * z) as f32
                })
                .collect();
            let idx: Vec<(usize, f32)> = cos.iter().copied().enumerate().collect();
            if cal.fuse(&idx).score >= thr {
                hits += 1;
                if cos.iter().zip(&relaxed).all(|(&s, r)| s < r.unwrap()) {
                    missed += 1;
                }
            }
        }
        assert!(hits > 300_000, "{hits}");
        // Allowance 1e-4 of ~400 000 hits ≈ 40; 3× for Monte Carlo noise and grid rounding.
        assert!(
            missed <= 120,
            "{missed} of {hits} genuine hits below every candidate cosine"
        );
    }

    #[test]
    fn score_scale_is_non_negative_and_inverts() {
        assert_eq!(
            score_from_fmr(1.0).to_bits(),
            0.0f64.to_bits(),
            "FMR 1 is score +0, not -0"
        );
        assert!((score_from_fmr(1e-6) - 60.0).abs() < 1e-9);
        assert!((fmr_from_score(score_from_fmr(3.7e-9)) - 3.7e-9).abs() < 1e-20);
    }

    #[test]
    fn threshold_grows_with_gallery_and_rejects_bad_fpir() {
        let a = threshold_for_fpir(1e-3, 1_000).unwrap();
        let b = threshold_for_fpir(1e-3, 1_000_000).unwrap();
        assert!((a - 60.0).abs() < 1e-9 && (b - 90.0).abs() < 1e-9);
        assert!(threshold_for_fpir(0.0, 10).is_err());
        assert!(threshold_for_fpir(f64::NAN, 10).is_err());
    }

    #[test]
    fn tail_fit_follows_a_heavy_tail() {
        // A mixture with a heavier upper tail: the tail fit must predict more mass at 0.4 than the moment fit.
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut xs: Vec<f64> = (0..200_000)
            .map(|i| {
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                if i % 50 == 0 {
                    0.1 + 0.12 * z
                } else {
                    0.0 + 0.07 * z
                }
            })
            .collect();
        let moments = Gaussian::fit_moments(&xs).unwrap();
        let tail = Gaussian::fit_upper_tail(&mut xs, 0.99, 0.9999).unwrap();
        let empirical = xs.iter().filter(|&&x| x >= 0.35).count() as f64 / xs.len() as f64;
        assert!(tail.sf(0.35) > moments.sf(0.35) * 10.0);
        assert!(
            tail.sf(0.35) > empirical * 0.3,
            "tail {} vs empirical {empirical}",
            tail.sf(0.35)
        );
    }

    #[test]
    fn body_follows_the_sample_and_the_survival_stays_monotone_across_its_pieces() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        // A skewed sample: the square of a uniform, which no Gaussian matches.
        let mut sample: Vec<f64> = (0..200_000)
            .map(|_| {
                let u: f64 = rng.random();
                u * u * 0.6 - 0.1
            })
            .collect();
        sample.sort_by(f64::total_cmp);
        let body = ImpostorBody::from_sorted(&sample).unwrap();
        assert!(ImpostorBody::from_sorted(&sample[..100]).is_none());
        let gauss = Gaussian::fit_moments(&sample).unwrap();
        let tail = TailModel {
            u: body.cosines[BODY_KNOTS - 1],
            p_u: 2.5e-4,
            xi: -0.1,
            sigma: 0.01,
            pairs: 1_000_000,
            exceedances: 250,
            truncated_at: None,
            top: None,
        };
        let model = ModalityModel {
            genuine: Gaussian { mean: 0.7, sd: 0.1 },
            impostor: gauss,
            impostor_tail: Some(tail),
            impostor_body: Some(body),
            llr_table: LlrTable::default(),
        };
        // At sampled points within the body the survival is the sample's, within a few per cent.
        for q in [0.5, 0.1, 0.01, 0.001] {
            let s = sample[((sample.len() - 1) as f64 * (1.0 - q)) as usize];
            let got = model.impostor_sf(s);
            assert!((got / q - 1.0).abs() < 0.06, "at {s}: {got} vs {q}");
        }
        let mut prev = 1.0f64;
        for i in 0..=4000 {
            let s = -1.0 + f64::from(i) * 0.0005;
            let p = model.impostor_sf(s);
            assert!(p <= prev + 1e-15, "survival rises at {s}: {p} > {prev}");
            assert!((0.0..=1.0).contains(&p));
            prev = p;
        }
        assert_eq!(model.impostor_sf(tail.u + 0.01), tail.sf(tail.u + 0.01));
    }

    /// A face + finger calibration whose face (and, with `finger_bands`, finger) has two quality bands: below
    /// quality 0.5 a light impostor tail, above it a heavy one; the pooled model sits between.
    fn banded(finger_bands: bool) -> Calibration {
        let tail = |sigma: f64| TailModel {
            u: 0.1,
            p_u: 0.05,
            xi: -0.05,
            sigma,
            pairs: 1_000_000,
            exceedances: 50_000,
            truncated_at: None,
            top: None,
        };
        let with = |m: &ModalityModel, sigma: f64| ModalityModel {
            impostor_tail: Some(tail(sigma)),
            ..m.clone()
        };
        let face = with(&ModalityModel::default_for(Modality::Face), 0.06);
        let finger = with(&ModalityModel::default_for(Modality::Finger(2)), 0.05);
        let bands = |m: &ModalityModel, light: f64, heavy: f64| QualityBands {
            edges: vec![0.5],
            models: vec![with(m, light), with(m, heavy)],
            share: vec![0.5, 0.5],
        };
        let mut cal = Calibration::from_models(
            vec![
                (Modality::Face, face.clone()),
                (Modality::Finger(2), finger.clone()),
            ],
            "test",
        );
        cal.quality_bands = vec![
            Some(bands(&face, 0.035, 0.09)),
            finger_bands.then(|| bands(&finger, 0.03, 0.07)),
        ];
        cal
    }

    #[test]
    fn banded_scores_hold_each_band_to_its_own_tail() {
        let cal = banded(false);
        let face = cal.models[0].1.clone();
        let bands = cal.bands(0).unwrap();
        for s in [0.3f32, 0.4, 0.5] {
            let light = cal.fuse_q(&[(0, s, Some(0.2))]);
            let heavy = cal.fuse_q(&[(0, s, Some(0.9))]);
            let pooled = cal.fuse_q(&[(0, s, None)]);
            assert!(
                light.score > pooled.score && pooled.score > heavy.score,
                "{s}"
            );
            assert_eq!(pooled, cal.fuse(&[(0, s)]));
            assert_eq!(light.llr, heavy.llr, "the LLR is the pooled one");
            // One modality: the FMR is the band's own survival at the cosine (to the LLR grid's rounding).
            for (got, model) in [
                (&light, &bands.models[0]),
                (&heavy, &bands.models[1]),
                (&pooled, &face),
            ] {
                let want = model.impostor_sf(f64::from(s));
                assert!(
                    (got.fmr / want - 1.0).abs() < 0.1,
                    "{s}: {} vs {want}",
                    got.fmr
                );
            }
        }
        // The band edge is inclusive below: quality 0.5 is the heavy band.
        assert_eq!(bands.band(0.5), 1);
        assert_eq!(bands.band(0.499), 0);
        assert_eq!(
            cal.fuse_q(&[(0, 0.4, Some(0.5))]),
            cal.fuse_q(&[(0, 0.4, Some(1.0))])
        );
    }

    #[test]
    fn banded_candidate_cosines_keep_every_pair_that_passes_in_any_band() {
        for finger_bands in [false, true] {
            let cal = banded(finger_bands);
            let thr = threshold_for_fpir(1e-3, 1_000_000).unwrap();
            let c = cal.candidate_cosines(thr);
            let pooled = Calibration::from_models(cal.models.clone(), "pooled");
            let cp = pooled.candidate_cosines(thr);
            for (b, p) in c.iter().zip(&cp) {
                assert!(b.unwrap() <= p.unwrap(), "banded {c:?} vs pooled {cp:?}");
            }
            let steps: Vec<f32> = (0..=60).map(|i| -0.1 + i as f32 * 0.015).collect();
            let qualities = [None, Some(0.1), Some(0.9)];
            let mut passing = 0;
            for &a in &steps {
                for &b in &steps {
                    for qa in qualities {
                        for qb in qualities {
                            if cal.fuse_q(&[(0, a, qa), (1, b, qb)]).score < thr {
                                continue;
                            }
                            passing += 1;
                            let kept = [a, b]
                                .iter()
                                .zip(&c)
                                .any(|(&s, ci)| ci.is_some_and(|ci| s >= ci));
                            assert!(kept, "({a} {qa:?}, {b} {qb:?}) passes, not kept by {c:?}");
                        }
                    }
                }
            }
            assert!(passing > 100);
        }
    }

    #[test]
    fn banded_calibrations_round_trip_and_older_files_have_none() {
        let cal = banded(true);
        let back: Calibration =
            serde_json::from_str(&serde_json::to_string(&cal).unwrap()).unwrap();
        assert_eq!(back, cal);
        assert_eq!(
            back.fuse_q(&[(0, 0.4, Some(0.9)), (1, 0.3, Some(0.2))]),
            cal.fuse_q(&[(0, 0.4, Some(0.9)), (1, 0.3, Some(0.2))])
        );
        let mut v = serde_json::to_value(&cal).unwrap();
        v.as_object_mut().unwrap().remove("quality_bands");
        let old: Calibration = serde_json::from_value(v).unwrap();
        assert!(!old.has_bands());
        assert_eq!(old.fuse_q(&[(0, 0.4, Some(0.9))]), old.fuse(&[(0, 0.4)]));
    }

    #[test]
    fn calibrations_saved_before_tails_and_bodies_still_load() {
        let cal = Calibration::defaults(&[Modality::Face, Modality::Finger(2)]);
        let mut v = serde_json::to_value(&cal).unwrap();
        v.as_object_mut().unwrap().remove("tail_checks");
        for entry in v["models"].as_array_mut().unwrap() {
            let model = entry[1].as_object_mut().unwrap();
            assert!(model.remove("impostor_tail").is_some());
            assert!(model.remove("impostor_body").is_some());
        }
        let back: Calibration = serde_json::from_value(v).unwrap();
        assert_eq!(back, cal);
        assert!(
            back.models
                .iter()
                .all(|(_, m)| m.impostor_tail.is_none() && m.impostor_body.is_none())
        );
    }

    /// The look-alike shape: a light Gaussian impostor body (N(−0.015, 0.05), its sampled body read off exact
    /// quantiles) under a heavy counted GPD tail (ξ 1.13: survival ~1e-5 at cosine 0.555, ~5e-6 at 1), and a
    /// genuine N(0.722, 0.054).
    fn heavy_tailed() -> ModalityModel {
        let imp = Gaussian {
            mean: -0.015,
            sd: 0.05,
        };
        let n = 40_000;
        let sorted: Vec<f64> = (0..n)
            .map(|i| imp.mean + imp.sd * norm_quantile((i as f64 + 0.5) / n as f64))
            .collect();
        let body = ImpostorBody::from_sorted(&sorted).unwrap();
        let tail = TailModel {
            u: body.cosines[BODY_KNOTS - 1],
            p_u: crate::tail::TAIL_START,
            xi: 1.13,
            sigma: 0.01,
            pairs: 800_000_000,
            exceedances: 240_000,
            truncated_at: None,
            top: None,
        };
        ModalityModel::new(
            Gaussian {
                mean: 0.722,
                sd: 0.054,
            },
            imp,
            Some(tail),
            Some(body),
        )
    }

    #[test]
    fn evidence_on_a_heavy_counted_tail_rises_strictly_and_keeps_each_cosines_fmr() {
        let m = heavy_tailed();
        let sf_555 = m.impostor_sf(0.555);
        assert!(sf_555 > 5e-6 && sf_555 < 2e-5, "{sf_555}");
        // The Gaussian ratio saturates at the cap there (the old atom); the statistic does not.
        assert_eq!(m.gaussian_llr(0.555), LLR_CAP);
        assert!(m.llr(0.555) < 30.0, "{}", m.llr(0.555));
        // Strictly increasing wherever the counted survival falls (above the floor), and below the cap
        // wherever that survival is still ≥ 1e-20 (here: every cosine up to 1).
        let mut prev: Option<(f64, f64)> = None;
        let mut checked = 0;
        for i in 0..=4000 {
            let s = -1.0 + f64::from(i) * 0.0005;
            let (l, sf) = (m.llr(s), m.impostor_sf(s));
            assert!((LLR_FLOOR..=LLR_CAP).contains(&l), "{s}: {l}");
            if sf >= 1e-20 {
                assert!(l < LLR_CAP, "capped at {s} where the survival is {sf}");
            }
            if let Some((pl, psf)) = prev
                && pl > LLR_FLOOR
                && sf < psf
            {
                assert!(l > pl, "not rising at {s}: {l} <= {pl}");
                checked += 1;
            }
            prev = Some((l, sf));
        }
        assert!(m.llr(0.35) > LLR_FLOOR, "the check covers the tail");
        assert!(checked > 1000, "{checked}");
        // Pairs past 0.555 spread over several nats instead of sharing one value.
        assert!(
            m.llr(0.95) - m.llr(0.555) > 1.5,
            "{} {}",
            m.llr(0.555),
            m.llr(0.95)
        );
        // One modality: each pair's FMR is its own cosine's counted survival (the LLR grid rounds down by at
        // most a step: never below it, a few per cent above).
        let cal = Calibration::from_models(vec![(Modality::Face, m.clone())], "heavy");
        // (Below about 0.3 the statistic sits at the floor: FMR 1, score 0, as for every model.)
        assert!(m.llr(0.4) > LLR_FLOOR + 1.0);
        for s in [0.4, 0.45, 0.5, 0.555, 0.6, 0.7, 0.8, 0.9, 0.99] {
            let f = cal.fuse(&[(0, s as f32)]);
            let want = m.impostor_sf(f64::from(s as f32));
            assert!(
                f.fmr >= want * 0.99 && f.fmr <= want * 1.1,
                "{s}: fmr {} vs survival {want}",
                f.fmr
            );
        }
        // The inverse still finds the smallest cosine with a given evidence.
        for l in [0.0, 5.0, 10.0] {
            let c = m.cosine_for_llr(l).unwrap();
            assert!(
                (m.llr(c) - l).abs() < 1e-6 && m.llr(c - 1e-4) < l,
                "{l}: {c}"
            );
        }
        // A clone (fresh table) and a saved-and-read copy give the same values.
        let back: ModalityModel =
            serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        for s in [0.1, 0.45, 0.9] {
            assert_eq!(back.llr(s), m.llr(s));
            assert_eq!(m.clone().llr(s), m.llr(s));
        }
    }

    /// The monotone Gaussian ratio as it was before the evidence table (copied from the code it replaced):
    /// models without a tail or body must keep exactly these values.
    fn old_llr(m: &ModalityModel, s: f64) -> f64 {
        let s = s.clamp(-1.0, 1.0);
        let raw = |s: f64| m.genuine.ln_pdf(s) - m.impostor.ln_pdf(s);
        match m.turning_point() {
            Some((t, true)) => raw(s.max(t)).clamp(LLR_FLOOR, LLR_CAP),
            Some((t, false)) if s > t => {
                let (at, beyond) = (m.impostor.sf(t), m.impostor.sf(s));
                let rarity = if beyond > 0.0 {
                    (at / beyond).ln().max(0.0)
                } else {
                    LLR_CAP
                };
                (raw(t) + rarity).clamp(LLR_FLOOR, LLR_CAP)
            }
            _ => raw(s).clamp(LLR_FLOOR, LLR_CAP),
        }
    }

    #[test]
    fn models_without_tail_or_body_score_exactly_as_before() {
        let concave = ModalityModel::new(
            Gaussian {
                mean: 0.5,
                sd: 0.05,
            },
            Gaussian { mean: 0.0, sd: 0.1 },
            None,
            None,
        );
        let models = [
            ModalityModel::default_for(Modality::Face),
            ModalityModel::default_for(Modality::Finger(2)),
            concave,
        ];
        for m in &models {
            for i in 0..=20_000 {
                let s = -1.0 + f64::from(i) * 0.0001;
                assert_eq!(m.llr(s).to_bits(), old_llr(m, s).to_bits(), "{s}");
            }
        }
        // An old calibration file (no tails, bodies or bands) fuses on the old values.
        let cal = Calibration::defaults(&[Modality::Face, Modality::Finger(2)]);
        let mut v = serde_json::to_value(&cal).unwrap();
        for entry in v["models"].as_array_mut().unwrap() {
            let model = entry[1].as_object_mut().unwrap();
            model.remove("impostor_tail");
            model.remove("impostor_body");
        }
        let old: Calibration = serde_json::from_value(v).unwrap();
        for (a, b) in [(0.2f32, 0.1f32), (0.45, 0.3), (0.7, 0.6)] {
            let f = old.fuse(&[(0, a), (1, b)]);
            let want =
                old_llr(&old.models[0].1, f64::from(a)) + old_llr(&old.models[1].1, f64::from(b));
            assert_eq!(f.llr.to_bits(), want.to_bits());
            assert_eq!(f, cal.fuse(&[(0, a), (1, b)]));
        }
    }

    #[test]
    fn candidate_cosines_keep_every_passing_pair_with_a_heavy_tail() {
        let mut finger = ModalityModel::default_for(Modality::Finger(2));
        finger.impostor_tail = Some(TailModel {
            u: 0.3,
            p_u: 1e-4,
            xi: 0.3,
            sigma: 0.04,
            pairs: 800_000_000,
            exceedances: 80_000,
            truncated_at: None,
            top: None,
        });
        let cal = Calibration::from_models(
            vec![
                (Modality::Face, heavy_tailed()),
                (Modality::Finger(2), finger),
                (
                    Modality::Finger(7),
                    ModalityModel::default_for(Modality::Finger(7)),
                ),
            ],
            "heavy",
        );
        for thr in [30.0, threshold_for_fpir(1e-3, 1_000_000).unwrap()] {
            let c = cal.candidate_cosines(thr);
            let steps: Vec<f32> = (0..=60).map(|i| -0.2 + i as f32 * 0.02).collect();
            let mut passing = 0;
            for &a in &steps {
                for &b in &steps {
                    for &d in &steps {
                        for subset in [&[0usize, 1, 2][..], &[0, 1], &[0, 2], &[1, 2], &[0]] {
                            let all = [a, b, d];
                            let pair: Vec<(usize, f32)> =
                                subset.iter().map(|&i| (i, all[i])).collect();
                            if cal.fuse(&pair).score < thr {
                                continue;
                            }
                            passing += 1;
                            let kept = pair.iter().any(|&(i, s)| c[i].is_some_and(|ci| s >= ci));
                            assert!(kept, "{thr}: {pair:?} passes, not kept by {c:?}");
                        }
                    }
                }
            }
            assert!(passing > 1000, "{thr}: {passing}");
        }
    }

    mod random_models {
        use super::*;
        use proptest::prelude::*;

        fn model() -> impl Strategy<Value = ModalityModel> {
            (
                (0.2f64..0.9, 0.02f64..0.2),
                (-0.1f64..0.2, 0.02f64..0.15),
                proptest::option::of((2.0f64..4.0, -0.6f64..1.6, 0.005f64..0.1, -4.5f64..-2.5)),
                proptest::option::of((-0.1f64..0.1, 0.02f64..0.15)),
            )
                .prop_map(|((gm, gs), (im, is), tail, body)| {
                    let impostor = Gaussian { mean: im, sd: is };
                    let body = body.and_then(|(bm, bs)| {
                        let n = 20_000;
                        let sorted: Vec<f64> = (0..n)
                            .map(|i| bm + bs * norm_quantile((i as f64 + 0.5) / n as f64))
                            .collect();
                        ImpostorBody::from_sorted(&sorted)
                    });
                    let tail = tail.map(|(z, xi, sigma, lp)| TailModel {
                        u: im + z * is,
                        p_u: 10f64.powf(lp),
                        xi,
                        sigma,
                        pairs: 1_000_000_000,
                        exceedances: 10_000,
                        truncated_at: None,
                        top: None,
                    });
                    ModalityModel::new(Gaussian { mean: gm, sd: gs }, impostor, tail, body)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            #[test]
            fn evidence_is_monotone_bounded_and_inverts(m in model()) {
                let mut prev = f64::NEG_INFINITY;
                for i in 0..=8000 {
                    let s = -1.0 + f64::from(i) * 0.00025;
                    let l = m.llr(s);
                    prop_assert!((LLR_FLOOR..=LLR_CAP).contains(&l), "{} at {}", l, s);
                    prop_assert!(l >= prev, "falls at {}: {} < {}", s, l, prev);
                    prev = l;
                }
                for l in [-5.0, 0.0, 5.0, 20.0] {
                    if let Some(c) = m.cosine_for_llr(l) {
                        prop_assert!(m.llr(c) >= l - 1e-9);
                        prop_assert!(c <= -1.0 || m.llr(c - 1e-6) <= l);
                    }
                }
            }
        }
    }
}
