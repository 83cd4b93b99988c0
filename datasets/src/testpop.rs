//! Test populations the candidate index was not tuned on.
//!
//! The engine's approximate candidate path (IVF lists + sign sketches) was tuned on [`crate::generate`]'s
//! `Structured` and `Isotropic` models. The presets here are built independently (their own latent models and
//! random streams) to measure candidate recall against exact search on populations with other geometry. They
//! plug into [`crate::generate::Generator`] as [`Preset`] variants, so `write_population`, `pacha generate
//! --preset <name>` and the scale bench use them unchanged; the duplicate plan (which records re-enrol which
//! person, `duplicate_rate` ≈ 1 % by default, `chain_share` of them three times), subject IDs, `truth.csv` and
//! `clusters.csv` are the generator's.
//!
//! # Common capture model
//! Every modality of a record gets an identity `u` (unit, a pure function of seed, modality and person) and a
//! capture `t = normalise(u + s·n/√d)`, `n ~ N(0, I_d)`, with `s = √(1/c - 1)` for a per-capture *capture
//! cosine* `c = c_lo + (c_hi - c_lo)·q`, `q ~ U(0, 1)` the capture quality (written to `subjects.csv`). Then
//! `cos(t, u) ≈ √c`, two captures of one person score `≈ √(c₁c₂)`, and two persons score
//! `≈ (u₁·u₂)·√(c₁c₂)`. Originals and re-enrolments are captured alike. Unless stated otherwise every modality
//! listed in the config (face 512-d, fingers 2 and 7 at 256-d by default) gets its own independent draw of the
//! kind's model (families are a face phenomenon and clusters are drawn per modality, see below, so that
//! look-alikes in one modality are not look-alikes in all); templates go missing at the config's
//! `face_missing_rate` / `finger_missing_rate` (at least one stays).
//!
//! # Kinds
//! * **`isotropic-mates`** ([`Preset::IsotropicMates`]): `u = normalise(g)`, `g ~ N(0, I_d)`; quality 1 and
//!   `c = isotropic_genuine_cosine` (0.70) for every capture, so mates score 0.70 ± 0.02 (0.03 at 256-d)
//!   and impostors 0 ± 1/√d. No structure at all for a partition to exploit: the baseline.
//! * **`lookalike-families`** ([`Preset::LookalikeFamilies`]): persons are cut into families of 2–12
//!   (`2 + min(G, 10)`, `G` geometric with p = 0.3, mean ≈ 4.1; persons are partitioned in blocks of 64
//!   consecutive person numbers so a family is found in O(1)). A family has a latent unit `F`; member `i` has
//!   `u_i = normalise(√w_i·F + √(1-w_i)·g_i)` with `g_i` a unit Gaussian direction and
//!   `w_i = 0.40 + 0.55·sin²(πU/2)` (arcsine-distributed on [0.40, 0.95]); `c ∈ [0.60, 0.85]`. Two members score
//!   `≈ √(w_i w_j c_i c_j)`, spread roughly uniformly over 0.30–0.65 (10th–90th percentile ≈ 0.34–0.63, a few
//!   pairs of near-twins above 0.7, as high as genuine pairs), right where dedup candidate cosines sit
//!   (measured at 3000 records: 59 % of family pairs in 0.40–0.60): it stresses ranking (a person's
//!   mate competes with several relatives) and lists crowded with near neighbours. Only the face has the
//!   family term: relatives' fingerprints are not alike, so finger identities are plain `normalise(g)`.
//! * **`heavy-tail`** ([`Preset::HeavyTail`]): a Student-t-like scale mixture in an anisotropic space:
//!   `x = τ·Σ_k √λ_k z_k B_k + g/√d`, with a fixed random basis `B` of rank 16 (entries N(0, 1/d)),
//!   `λ_k ∝ 1/k`, `z, g` standard normal, and a per-person scale `τ² = κ·ν/χ²_ν` (ν = 3, κ = 0.1: the scale of
//!   a multivariate t). Most persons have small `τ` and sit near the isotropic floor; the heavy tail of `τ`
//!   puts about 1 % mostly in the 16-dim subspace, where two of them can score 0.4–0.6.
//!   `u = normalise(x)`, `c ∈ [0.55, 0.90]`. Stresses the impostor upper tail: at 512-d the impostor sd is
//!   ≈ 0.06, yet ≈ 3·10⁻⁴ of unrelated pairs lie above 5 sd (a Gaussian: 3·10⁻⁷) and ≈ 3·10⁻⁵ reach 0.4.
//! * **`power-law`** ([`Preset::PowerLaw`]): `x = Σ_{k=1..d} √λ_k z_k Q_k` with `λ_k ∝ k^-1.5` over the whole
//!   dimension (no isotropic floor) and `Q` a random rotation (Gram–Schmidt of a Gaussian matrix, per
//!   modality); `u = normalise(x)`, `c ∈ [0.50, 0.90]`. The effective dimension `(Σλ)²/Σλ²` is only ≈ 5–6 for
//!   any `d`, so identities concentrate around a few directions and impostor scores spread widely (sd ≈ 0.25
//!   at genuine ≈ 0.70 ± 0.09): a hard case for partitions and for score thresholds alike (on the face alone a
//!   calibrated threshold at a strict FPIR sits above most genuine scores). Normalising `x` compresses the
//!   leading ratios, so the templates' covariance spectrum falls as ≈ k^-1.25 over the first components.
//!   Costs `d²` per template.
//! * **`skewed-clusters`** ([`Preset::SkewedClusters`]): 2048 clusters per modality, person `p` in cluster `k`
//!   with probability `∝ (k+1)^-1.1`, drawn independently per modality (the largest ≈ 16–17 % of records, the
//!   next 8 %, 5 %, …, and hundreds of clusters of a handful of records at 1 M). Cluster `k` has a unit centre
//!   `C_k` and a weight `w_k ~ U(0.30, 0.65)`; `u = normalise(√w_k·C_k + √(1-w_k)·g)`, `c ∈ [0.60, 0.90]`. Two
//!   members of a cluster score `≈ w_k·√(c₁c₂)` ≈ 0.2–0.5. Stresses unbalanced partitions: huge dense lists
//!   next to near-empty ones.
//! * **`fingers-only`** ([`Preset::FingersOnly`]): no face (`face_dim` must be 0); each configured finger
//!   (default positions 2 and 7 at 256-d) has its own model `x = Σ_k √λ_k z_k Q_k` with a Lorentzian spectrum
//!   `λ_k = (1 + k/k₀)^-2`, `k = 0..d`, `k₀ = d/8` (effective dimension ≈ 75 at 256-d) and its own random
//!   rotation `Q`; `c ∈ [0.35, 0.85]` (finger captures vary more). 5 % of records miss exactly one finger
//!   (chosen uniformly; the config's missing rates are not used). Scores: genuine ≈ 0.59 ± 0.11, impostor
//!   0 ± 0.085. Stresses fusion without a face and partially present records.
//!
//! # Determinism and memory
//! Every draw comes from a generator seeded by splitmix64 of (seed, kind and purpose, modality, person or
//! record), so a record's templates depend only on the config and the record number: any batch split and
//! thread count gives identical output. The fixed state is per modality: a `d × d` rotation (power-law,
//! fingers-only), a `16 × d` basis (heavy-tail) or `2048 × d` centres (skewed-clusters), plus the generator's
//! duplicate plan; records stream in bounded memory.

use crate::generate::{
    PopulationConfig, Preset, RecordOut, modality_code, normal, normalise, rng_for,
};
use crate::modality::Modality;
use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;
use rayon::prelude::*;

type Rng = Xoshiro256PlusPlus;

/// Tag base of this module's random streams (distinct from `generate`'s small tags).
const TAG_BASE: u64 = 0x7e57_0000;
const P_IDENTITY: u64 = 1;
const P_CAPTURE: u64 = 2;
const P_PRESENCE: u64 = 3;
const P_FAMILY_PLAN: u64 = 4;
const P_FAMILY: u64 = 5;
const P_CLUSTER: u64 = 6;
const P_CENTRE: u64 = 7;
const P_ROTATION: u64 = 8;
const P_BASIS: u64 = 9;

/// Persons per family-partition block.
const FAMILY_BLOCK: u64 = 64;
const FAMILY_MIN: u64 = 2;
const FAMILY_MAX: u64 = 12;
const FAMILY_GEOMETRIC_P: f64 = 0.3;
const FAMILY_WEIGHT: (f64, f64) = (0.40, 0.95);

const HEAVY_RANK: usize = 16;
const HEAVY_NU: u32 = 3;
const HEAVY_KAPPA: f64 = 0.1;

const POWER_EXPONENT: f64 = 1.5;

const CLUSTERS: usize = 2048;
const CLUSTER_ZIPF: f64 = 1.1;
const CLUSTER_WEIGHT: (f64, f64) = (0.30, 0.65);

const FINGERS_MISSING_ONE: f64 = 0.05;

/// Per-modality fixed state.
#[derive(Debug)]
struct Model {
    code: u64,
    dim: usize,
    offset: usize,
    is_face: bool,
    /// Rows of length `dim`: rotation (power-law, fingers-only), basis (heavy-tail), unit centres
    /// (skewed-clusters); empty otherwise.
    rows: Vec<f32>,
    /// √λ per row (rotation, basis), or √w per cluster (skewed-clusters).
    coef: Vec<f32>,
}

/// A test-population model (one of the [`Preset::is_test_population`] presets) over a config's modalities.
#[derive(Debug)]
pub(crate) struct TestPopulation {
    kind: Preset,
    seed: u64,
    models: Vec<Model>,
    total_dim: usize,
    face_missing: f64,
    finger_missing: f64,
    iso_cosine: f64,
    /// Skewed clusters: cumulative cluster probabilities.
    cluster_cdf: Vec<f64>,
}

impl TestPopulation {
    /// The model for `cfg`, or `None` when its preset is not a test population. `cfg` must be valid.
    pub(crate) fn new(cfg: &PopulationConfig) -> Option<Self> {
        let kind = cfg.preset;
        if !kind.is_test_population() {
            return None;
        }
        let mut models = Vec::new();
        let mut offset = 0;
        for (m, dim) in cfg.modalities() {
            let code = modality_code(m);
            let t = |p| tag(kind, p);
            let (rows, coef) = match kind {
                Preset::HeavyTail => {
                    let mut rows = vec![0.0f32; HEAVY_RANK * dim];
                    let scale = 1.0 / (dim as f32).sqrt();
                    rows.par_chunks_mut(dim).enumerate().for_each(|(k, row)| {
                        let mut rng = rng_for(cfg.seed, t(P_BASIS), code, k as u64);
                        row.iter_mut().for_each(|x| *x = scale * normal(&mut rng));
                    });
                    (rows, spectrum(HEAVY_RANK, |k| 1.0 / (k + 1) as f64))
                }
                Preset::PowerLaw => (
                    random_rotation(cfg.seed, t(P_ROTATION), code, dim),
                    spectrum(dim, |k| ((k + 1) as f64).powf(-POWER_EXPONENT)),
                ),
                Preset::FingersOnly => {
                    let k0 = (dim as f64 / 8.0).max(1.0);
                    (
                        random_rotation(cfg.seed, t(P_ROTATION), code, dim),
                        spectrum(dim, |k| (1.0 + k as f64 / k0).powi(-2)),
                    )
                }
                Preset::SkewedClusters => {
                    let mut rows = vec![0.0f32; CLUSTERS * dim];
                    let mut coef = vec![0.0f32; CLUSTERS];
                    rows.par_chunks_mut(dim)
                        .zip(coef.par_iter_mut())
                        .enumerate()
                        .for_each(|(k, (row, w))| {
                            let mut rng = rng_for(cfg.seed, t(P_CENTRE), code, k as u64);
                            row.iter_mut().for_each(|x| *x = normal(&mut rng));
                            normalise(row);
                            let (lo, hi) = CLUSTER_WEIGHT;
                            *w = (lo + (hi - lo) * rng.random::<f64>()).sqrt() as f32;
                        });
                    (rows, coef)
                }
                _ => (Vec::new(), Vec::new()),
            };
            models.push(Model {
                code,
                dim,
                offset,
                is_face: m == Modality::Face,
                rows,
                coef,
            });
            offset += dim;
        }
        let cluster_cdf = if kind == Preset::SkewedClusters {
            let w: Vec<f64> = (1..=CLUSTERS)
                .map(|k| (k as f64).powf(-CLUSTER_ZIPF))
                .collect();
            let total: f64 = w.iter().sum();
            let mut acc = 0.0;
            w.iter()
                .map(|x| {
                    acc += x / total;
                    acc
                })
                .collect()
        } else {
            Vec::new()
        };
        Some(TestPopulation {
            kind,
            seed: cfg.seed,
            models,
            total_dim: offset,
            face_missing: cfg.face_missing_rate,
            finger_missing: cfg.finger_missing_rate,
            iso_cosine: cfg.isotropic_genuine_cosine,
            cluster_cdf,
        })
    }

    fn rng(&self, purpose: u64, a: u64, b: u64) -> Rng {
        rng_for(self.seed, tag(self.kind, purpose), a, b)
    }

    /// The family (its first person number) or cluster of `person`, for the kinds that have one.
    pub(crate) fn group_of(&self, person: u64) -> Option<u64> {
        match self.kind {
            Preset::LookalikeFamilies => Some(self.family_of(person)),
            Preset::SkewedClusters => self
                .models
                .first()
                .map(|m| self.cluster_of(person, m.code) as u64),
            _ => None,
        }
    }

    /// First person number of `person`'s family: each block of 64 persons is cut into families of
    /// 2..=12 by the block's own random stream.
    fn family_of(&self, person: u64) -> u64 {
        let block = person / FAMILY_BLOCK;
        let within = person % FAMILY_BLOCK;
        let mut rng = self.rng(P_FAMILY_PLAN, 0, block);
        let mut start = 0;
        loop {
            let rem = FAMILY_BLOCK - start;
            let mut size = FAMILY_MIN;
            while size < FAMILY_MAX && rng.random::<f64>() >= FAMILY_GEOMETRIC_P {
                size += 1;
            }
            size = size.min(rem);
            if rem - size == 1 {
                // Never leave a single person at the end of the block.
                size = if size < FAMILY_MAX {
                    size + 1
                } else {
                    size - 1
                };
            }
            if within < start + size || start + size >= FAMILY_BLOCK {
                return block * FAMILY_BLOCK + start;
            }
            start += size;
        }
    }

    /// `person`'s cluster in the modality with code `code`.
    fn cluster_of(&self, person: u64, code: u64) -> usize {
        let u = self.rng(P_CLUSTER, code, person).random::<f64>();
        self.cluster_cdf
            .partition_point(|&c| c <= u)
            .min(CLUSTERS - 1)
    }

    /// Which modalities of `record` are present.
    fn presence(&self, record: u64) -> Vec<bool> {
        let k = self.models.len();
        let mut rng = self.rng(P_PRESENCE, 0, record);
        if self.kind == Preset::FingersOnly {
            let mut present = vec![true; k];
            if k >= 2 && rng.random::<f64>() < FINGERS_MISSING_ONE {
                present[rng.random_range(0..k)] = false;
            }
            return present;
        }
        let mut present: Vec<bool> = self
            .models
            .iter()
            .map(|m| {
                let rate = if m.is_face {
                    self.face_missing
                } else {
                    self.finger_missing
                };
                rng.random::<f64>() >= rate
            })
            .collect();
        if !present.iter().any(|&p| p)
            && let Some(first) = present.first_mut()
        {
            *first = true;
        }
        present
    }

    /// `person`'s unit identity in modality `m`, written to `out`.
    fn identity(&self, m: &Model, person: u64, out: &mut [f32]) {
        let mut rng = self.rng(P_IDENTITY, m.code, person);
        let d = m.dim;
        match self.kind {
            Preset::LookalikeFamilies if m.is_face => {
                let mut frng = self.rng(P_FAMILY, m.code, self.family_of(person));
                out.iter_mut().for_each(|x| *x = normal(&mut frng));
                normalise(out);
                let (lo, hi) = FAMILY_WEIGHT;
                let s = (std::f64::consts::FRAC_PI_2 * rng.random::<f64>()).sin();
                let w = lo + (hi - lo) * s * s;
                let mut g: Vec<f32> = (0..d).map(|_| normal(&mut rng)).collect();
                normalise(&mut g);
                let (a, b) = (w.sqrt() as f32, (1.0 - w).sqrt() as f32);
                out.iter_mut()
                    .zip(&g)
                    .for_each(|(o, x)| *o = a * *o + b * x);
            }
            Preset::HeavyTail => {
                let chi2: f64 = (0..HEAVY_NU)
                    .map(|_| f64::from(normal(&mut rng)).powi(2))
                    .sum();
                let tau = (HEAVY_KAPPA * f64::from(HEAVY_NU) / chi2.max(1e-12)).sqrt() as f32;
                let coef: Vec<f32> = m.coef.iter().map(|l| tau * l * normal(&mut rng)).collect();
                let iso = 1.0 / (d as f32).sqrt();
                out.iter_mut().for_each(|x| *x = iso * normal(&mut rng));
                add_rows(&coef, &m.rows, d, out);
            }
            Preset::PowerLaw | Preset::FingersOnly => {
                let coef: Vec<f32> = m.coef.iter().map(|l| l * normal(&mut rng)).collect();
                out.iter_mut().for_each(|x| *x = 0.0);
                add_rows(&coef, &m.rows, d, out);
            }
            Preset::SkewedClusters => {
                let k = self.cluster_of(person, m.code);
                out.iter_mut().for_each(|x| *x = normal(&mut rng));
                normalise(out);
                let a = m.coef.get(k).copied().unwrap_or(0.0);
                let b = (1.0 - a * a).max(0.0).sqrt();
                let centre = m.rows.get(k * d..(k + 1) * d).unwrap_or(&[]);
                out.iter_mut()
                    .zip(centre)
                    .for_each(|(o, c)| *o = a * c + b * *o);
            }
            _ => out.iter_mut().for_each(|x| *x = normal(&mut rng)),
        }
        normalise(out);
    }

    /// Quality and capture cosine of one capture.
    fn capture(&self, rng: &mut Rng) -> (f64, f64) {
        let (lo, hi) = match self.kind {
            Preset::IsotropicMates => return (1.0, self.iso_cosine),
            Preset::LookalikeFamilies => (0.60, 0.85),
            Preset::HeavyTail => (0.55, 0.90),
            Preset::PowerLaw => (0.50, 0.90),
            Preset::FingersOnly => (0.35, 0.85),
            _ => (0.60, 0.90),
        };
        let q = rng.random::<f64>();
        (q, lo + (hi - lo) * q)
    }

    /// Record `record` of `person`.
    pub(crate) fn record(&self, record: u64, person: u64) -> RecordOut {
        let present = self.presence(record);
        let mut quality = vec![0.0f32; self.models.len()];
        let mut data = vec![0.0f32; self.total_dim];
        for (mi, m) in self.models.iter().enumerate() {
            if !present[mi] {
                continue;
            }
            let out = &mut data[m.offset..m.offset + m.dim];
            self.identity(m, person, out);
            let mut rng = self.rng(P_CAPTURE, m.code, record);
            let (q, c) = self.capture(&mut rng);
            let s = ((1.0 / c - 1.0).max(0.0).sqrt() / (m.dim as f64).sqrt()) as f32;
            out.iter_mut().for_each(|x| *x += s * normal(&mut rng));
            normalise(out);
            quality[mi] = q as f32;
        }
        RecordOut {
            present,
            quality,
            data,
        }
    }
}

fn tag(kind: Preset, purpose: u64) -> u64 {
    let k = match kind {
        Preset::Structured => 0,
        Preset::Isotropic => 1,
        Preset::IsotropicMates => 2,
        Preset::LookalikeFamilies => 3,
        Preset::HeavyTail => 4,
        Preset::PowerLaw => 5,
        Preset::SkewedClusters => 6,
        Preset::FingersOnly => 7,
    };
    TAG_BASE + 64 * k + purpose
}

/// `√λ_k` for `k = 0..n`, with `λ` normalised to sum 1.
fn spectrum(n: usize, lambda: impl Fn(usize) -> f64) -> Vec<f32> {
    let l: Vec<f64> = (0..n).map(lambda).collect();
    let total: f64 = l.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    l.iter().map(|x| (x / total).sqrt() as f32).collect()
}

/// `out += Σ_k coef_k · row_k` over the `dim`-long rows of `rows`, four rows per pass over `out`.
pub(crate) fn add_rows(coef: &[f32], rows: &[f32], dim: usize, out: &mut [f32]) {
    if dim == 0 {
        return;
    }
    let mut rs = rows.chunks_exact(4 * dim);
    let mut cs = coef.chunks_exact(4);
    for (r4, c) in rs.by_ref().zip(cs.by_ref()) {
        let (r0, rest) = r4.split_at(dim);
        let (r1, rest) = rest.split_at(dim);
        let (r2, r3) = rest.split_at(dim);
        let (c0, c1, c2, c3) = (c[0], c[1], c[2], c[3]);
        for ((((o, x0), x1), x2), x3) in out.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3) {
            *o += c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3;
        }
    }
    for (r, c) in rs.remainder().chunks_exact(dim).zip(cs.remainder()) {
        out.iter_mut().zip(r).for_each(|(o, x)| *o += c * x);
    }
}

/// A random `dim × dim` rotation (orthonormal rows): modified Gram–Schmidt, in f64, of a Gaussian matrix
/// whose rows come from per-row random streams.
fn random_rotation(seed: u64, tag: u64, code: u64, dim: usize) -> Vec<f32> {
    let mut q = vec![0.0f64; dim * dim];
    q.par_chunks_mut(dim).enumerate().for_each(|(i, row)| {
        let mut rng = rng_for(seed, tag, code, i as u64);
        row.iter_mut()
            .for_each(|x| *x = f64::from(normal(&mut rng)));
    });
    for i in 0..dim {
        let (done, rest) = q.split_at_mut(i * dim);
        let v = &mut rest[..dim];
        // Twice ("twice is enough") keeps the rows orthonormal to rounding.
        for _ in 0..2 {
            for prev in done.chunks_exact(dim) {
                let p: f64 = v.iter().zip(prev).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(prev).for_each(|(a, b)| *a -= p * b);
            }
        }
        let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if n > 0.0 {
            v.iter_mut().for_each(|a| *a /= n);
        }
    }
    q.into_iter().map(|x| x as f32).collect()
}

/// The default configuration of a test population: `records` records from `seed`, face 512-d (none for
/// `FingersOnly`) and fingers 2 and 7 at 256-d, 1 % duplicates; everything else the generator's default.
pub fn config(preset: Preset, records: u64, seed: u64) -> PopulationConfig {
    PopulationConfig {
        records,
        seed,
        preset,
        face_dim: preset.default_face_dim(),
        ..PopulationConfig::default()
    }
}
