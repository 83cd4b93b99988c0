//! Synthetic biometric populations with planted duplicates and ground truth.
//!
//! # Model (preset `Structured`, the default)
//! Every modality (face, each finger) has its own independent latent space of dimension `d`:
//! * a fixed random basis `B` of rank `r` (`rank`; entries N(0, 1/d)) with a decaying spectrum
//!   `λ_k ∝ k^-spectrum_decay` (Σλ = 1), and a global mean direction `μ` with `|μ|² = mean_energy`;
//! * a *latent draw* is `v = √low_rank_share · Σ_k √λ_k z_k B_k + √(1-low_rank_share) · g/√d`
//!   (`z ~ N(0,1)`, `g ~ N(0, I)`): anisotropic, with an effective dimension far below `d`;
//! * persons come in consecutive groups of `family_size`; a `family_share` of groups are *families* that share
//!   a family latent `F`: a member's identity is `√(1-w)·v + √w·F` (`w = family_weight`), so relatives are
//!   look-alikes (the heavier impostor upper tail);
//! * identity `u = normalise(normalise(v or family mix) + μ)` (μ gives impostors a small positive mean);
//! * each capture has a quality `q ~ Beta(quality_alpha, quality_beta)`, or with probability
//!   `degraded_share` (`duplicate_degraded_share` for re-enrolments) a degraded capture with
//!   `q ~ U(0.05, 0.35)`; the template is `normalise(u + s(q)·n/√d)` with `n ~ N(0, I)` and
//!   `s(q) = noise_min + (noise_max - noise_min)·(1 - q)`: lower quality, more noise.
//!
//! Two captures of one person score about `1/√((1+s₁²)(1+s₂²))`; two persons score about
//! `u₁·u₂ × that`. With the defaults, the statistics measured on generated populations (the
//! `population_statistics_in_documented_ranges` test asserts them, and `population.json` reports them) land in:
//!
//! | modality | genuine mean | genuine sd | impostor mean | impostor sd |
//! |---|---|---|---|---|
//! | face (512-d)   | 0.60 – 0.70 | 0.07 – 0.13 | 0.00 – 0.05 | 0.06 – 0.10 |
//! | finger (256-d) | 0.45 – 0.60 | 0.11 – 0.16 | -0.02 – 0.02 | 0.06 – 0.09 |
//!
//! # Preset `Isotropic`
//! Identities are uniform random unit vectors (no basis, mean or families); captures are
//! `normalise(u + s·n/√d)` with `s = √(1/c - 1)` for `c = isotropic_genuine_cosine` (≈ 0.7), quality 1: the
//! stress case for ANN indexes (no cluster structure to exploit). Missing-template rates still apply.
//!
//! # Test-population presets
//! `IsotropicMates`, `LookalikeFamilies`, `HeavyTail`, `PowerLaw`, `SkewedClusters` and `FingersOnly` use the
//! independent models of [`crate::testpop`] for the templates (identities, captures, missing templates); the
//! duplicate plan, subject IDs, ground truth and statistics below are shared by every preset.
//!
//! # Duplicates and ground truth
//! `round(records × duplicate_rate)` records are re-enrolments of an earlier person under a new subject ID
//! (fresh capture noise, same missing/degraded rates, degraded more often). A `chain_share` of duplicated persons
//! appear three times. Subject IDs are `{id_prefix}{record:0width$}` (e.g. `P000000123`), sortable in record
//! order. Ground truth: every pair of records of one person (`truth.csv`) and the persons with ≥ 2 records
//! (`clusters.csv`).
//!
//! # Determinism and memory
//! Every random draw comes from a generator seeded by splitmix64 of (seed, purpose, modality, record or
//! person), so the output is identical for any thread count and batch size. Memory is bounded by one batch
//! plus the duplicate plan (`O(records × duplicate_rate)`), the basis (`r × d` per modality) and the statistics
//! samples.

use crate::error::{DatasetError, Result};
use crate::modality::{Modality, ModalityBlock, RecordBatch};
use crate::npy::NpyWriter;
use crate::subjects::{SubjectsWriter, Table, write_csv};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::{Beta, Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

/// Which generative model to use.
///
/// `Structured` and `Isotropic` are this module's models; the other presets are the independent test
/// populations of [`crate::testpop`] (the candidate index was not tuned on them). In `population.json` a preset
/// is written by its variant name (`"LookalikeFamilies"`); the kebab-case [`Preset::name`] is accepted too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Preset {
    /// Low-rank-plus-noise identities, families, quality-dependent noise (realistic score distributions).
    #[default]
    #[serde(alias = "structured")]
    Structured,
    /// Uniform random unit identities with planted mates at a fixed genuine cosine (ANN stress case).
    #[serde(alias = "isotropic")]
    Isotropic,
    /// Test population: uniform random identities, captures at cosine `isotropic_genuine_cosine` (≈ 0.70).
    #[serde(alias = "isotropic-mates")]
    IsotropicMates,
    /// Test population: families of 2–12 look-alikes, member-to-member cosines spread over ≈ 0.30–0.65.
    #[serde(alias = "lookalike-families")]
    LookalikeFamilies,
    /// Test population: Student-t (ν = 3) scale mixture, a heavy impostor upper tail.
    #[serde(alias = "heavy-tail")]
    HeavyTail,
    /// Test population: Gaussian with power-law spectrum `λ_k ∝ k^-1.5` over the full dimension, rotated.
    #[serde(alias = "power-law")]
    PowerLaw,
    /// Test population: clusters of power-law sizes with elevated within-cluster cosines.
    #[serde(alias = "skewed-clusters")]
    SkewedClusters,
    /// Test population: no face; each finger its own anisotropic model; 5 % of records miss one finger.
    #[serde(alias = "fingers-only")]
    FingersOnly,
}

impl Preset {
    /// Every preset, the generator's own first.
    pub const ALL: [Preset; 8] = [
        Preset::Structured,
        Preset::Isotropic,
        Preset::IsotropicMates,
        Preset::LookalikeFamilies,
        Preset::HeavyTail,
        Preset::PowerLaw,
        Preset::SkewedClusters,
        Preset::FingersOnly,
    ];

    /// The kebab-case name used on the command line (`structured`, `lookalike-families`, …).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Structured => "structured",
            Preset::Isotropic => "isotropic",
            Preset::IsotropicMates => "isotropic-mates",
            Preset::LookalikeFamilies => "lookalike-families",
            Preset::HeavyTail => "heavy-tail",
            Preset::PowerLaw => "power-law",
            Preset::SkewedClusters => "skewed-clusters",
            Preset::FingersOnly => "fingers-only",
        }
    }

    /// Whether this preset is one of the [`crate::testpop`] test populations.
    pub fn is_test_population(self) -> bool {
        !matches!(self, Preset::Structured | Preset::Isotropic)
    }

    /// Whether the preset generates a face (all but `FingersOnly`, which needs `face_dim` 0).
    pub fn has_face(self) -> bool {
        self != Preset::FingersOnly
    }

    /// The face dimension a front end should use when the user gives none: 512, or 0 without a face.
    pub fn default_face_dim(self) -> usize {
        if self.has_face() { 512 } else { 0 }
    }
}

impl std::str::FromStr for Preset {
    type Err = DatasetError;
    /// Parses a kebab-case [`Preset::name`] (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == t)
            .ok_or_else(|| {
                let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
                DatasetError::Config(format!(
                    "unknown preset {s:?} (expected one of {})",
                    names.join(", ")
                ))
            })
    }
}

/// Parameters of one modality's latent model (see the module docs for the formulas).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModalityModel {
    /// Rank `r` of the shared basis.
    pub rank: usize,
    /// Spectrum decay: `λ_k ∝ k^-spectrum_decay`.
    pub spectrum_decay: f64,
    /// Share of a latent draw's energy in the low-rank part (the rest is isotropic).
    pub low_rank_share: f64,
    /// Squared norm of the global mean direction added to identities (raises the impostor mean).
    pub mean_energy: f64,
    /// Weight of the family latent in a family member's identity.
    pub family_weight: f64,
    /// Capture noise scale at quality 1.
    pub noise_min: f64,
    /// Capture noise scale at quality 0.
    pub noise_max: f64,
    /// Alpha of the Beta distribution of capture quality.
    pub quality_alpha: f64,
    /// Beta of the Beta distribution of capture quality.
    pub quality_beta: f64,
}

impl ModalityModel {
    /// Defaults for 512-d face embeddings.
    pub fn face() -> Self {
        ModalityModel {
            rank: 96,
            spectrum_decay: 1.0,
            low_rank_share: 0.5,
            mean_energy: 0.05,
            family_weight: 0.3,
            noise_min: 0.35,
            noise_max: 1.6,
            quality_alpha: 5.0,
            quality_beta: 2.0,
        }
    }
    /// Defaults for 256-d fixed-length fingerprint embeddings.
    pub fn finger() -> Self {
        ModalityModel {
            rank: 48,
            spectrum_decay: 1.0,
            low_rank_share: 0.35,
            mean_energy: 0.0,
            family_weight: 0.05,
            noise_min: 0.3,
            noise_max: 2.0,
            quality_alpha: 3.0,
            quality_beta: 2.0,
        }
    }
    fn validate(&self, what: &str) -> Result<()> {
        let bad = |m: &str| Err(DatasetError::Config(format!("{what}: {m}")));
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        if self.rank == 0 {
            return bad("rank must be positive");
        }
        if !self.spectrum_decay.is_finite() || self.spectrum_decay < 0.0 {
            return bad("spectrum_decay must be finite and >= 0");
        }
        if !unit(self.low_rank_share) || !unit(self.family_weight) {
            return bad("low_rank_share and family_weight must be in [0, 1]");
        }
        if !(self.mean_energy.is_finite() && self.mean_energy >= 0.0) {
            return bad("mean_energy must be finite and >= 0");
        }
        if !(self.noise_min.is_finite() && self.noise_max.is_finite() && 0.0 <= self.noise_min)
            || self.noise_max < self.noise_min
        {
            return bad("need 0 <= noise_min <= noise_max, finite");
        }
        if Beta::new(self.quality_alpha, self.quality_beta).is_err() {
            return bad("quality_alpha and quality_beta must be positive");
        }
        Ok(())
    }
}

impl Default for ModalityModel {
    fn default() -> Self {
        Self::face()
    }
}

/// Configuration of a synthetic population. `Default` is the structured preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PopulationConfig {
    /// Number of enrolments (records) N.
    pub records: u64,
    /// Master seed: the same seed gives byte-identical output.
    pub seed: u64,
    /// Generative model.
    pub preset: Preset,
    /// Face embedding dimension (0 = no face modality).
    pub face_dim: usize,
    /// Fingers: (ISO/IEC 19794 position 1..=10, dimension).
    pub fingers: Vec<(u8, usize)>,
    /// Share of enrolments that re-enrol an earlier person under a new ID, in [0, 0.5].
    pub duplicate_rate: f64,
    /// Share of duplicated persons that appear three times (chains), in [0, 1].
    pub chain_share: f64,
    /// Probability that a face capture failed (template missing).
    pub face_missing_rate: f64,
    /// Probability that a finger was not captured (per finger).
    pub finger_missing_rate: f64,
    /// Probability that a capture is degraded (quality U(0.05, 0.35)).
    pub degraded_share: f64,
    /// Probability that a re-enrolment's capture is degraded (used instead of `degraded_share`).
    pub duplicate_degraded_share: f64,
    /// Share of person groups that are families (share a family latent).
    pub family_share: f64,
    /// Persons per family group (consecutive person numbers).
    pub family_size: u32,
    /// Subject ID prefix.
    pub id_prefix: String,
    /// Minimum digits in subject IDs (widened when N needs more).
    pub id_width: usize,
    /// Isotropic preset: expected cosine between two captures of one person.
    pub isotropic_genuine_cosine: f64,
    /// Random impostor pairs sampled for the statistics in `population.json`.
    pub impostor_pairs: u64,
    /// Face model parameters.
    pub face: ModalityModel,
    /// Finger model parameters (shared by all finger positions; each finger has its own basis).
    pub finger: ModalityModel,
}

impl Default for PopulationConfig {
    fn default() -> Self {
        PopulationConfig {
            records: 10_000,
            seed: 42,
            preset: Preset::Structured,
            face_dim: 512,
            fingers: vec![(2, 256), (7, 256)],
            duplicate_rate: 0.01,
            chain_share: 0.1,
            face_missing_rate: 0.005,
            finger_missing_rate: 0.02,
            degraded_share: 0.03,
            duplicate_degraded_share: 0.08,
            family_share: 0.3,
            family_size: 3,
            id_prefix: "P".to_string(),
            id_width: 9,
            isotropic_genuine_cosine: 0.7,
            impostor_pairs: 100_000,
            face: ModalityModel::face(),
            finger: ModalityModel::finger(),
        }
    }
}

impl PopulationConfig {
    /// Check every parameter; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DatasetError::Config(m));
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        if self.face_dim == 0 && self.fingers.is_empty() {
            return bad("no modalities: face_dim is 0 and fingers is empty".into());
        }
        if self.preset == Preset::FingersOnly && self.face_dim != 0 {
            return bad(format!(
                "preset fingers-only has no face: face_dim must be 0, not {}",
                self.face_dim
            ));
        }
        if self.preset == Preset::FingersOnly && self.fingers.is_empty() {
            return bad("preset fingers-only needs at least one finger".into());
        }
        let mut seen = HashSet::new();
        for &(p, d) in &self.fingers {
            if !(1..=10).contains(&p) {
                return bad(format!("finger position {p} is not in 1..=10"));
            }
            if d == 0 {
                return bad(format!("finger {p} has dimension 0"));
            }
            if !seen.insert(p) {
                return bad(format!("finger position {p} listed twice"));
            }
        }
        if !(0.0..=0.5).contains(&self.duplicate_rate) {
            return bad(format!(
                "duplicate_rate {} is not in [0, 0.5]",
                self.duplicate_rate
            ));
        }
        for (name, v) in [
            ("chain_share", self.chain_share),
            ("face_missing_rate", self.face_missing_rate),
            ("finger_missing_rate", self.finger_missing_rate),
            ("degraded_share", self.degraded_share),
            ("duplicate_degraded_share", self.duplicate_degraded_share),
            ("family_share", self.family_share),
        ] {
            if !unit(v) {
                return bad(format!("{name} {v} is not in [0, 1]"));
            }
        }
        if self.family_size == 0 {
            return bad("family_size must be positive".into());
        }
        if !(self.isotropic_genuine_cosine > 0.0 && self.isotropic_genuine_cosine <= 1.0) {
            return bad("isotropic_genuine_cosine must be in (0, 1]".into());
        }
        if self.id_width > 40 {
            return bad("id_width must be at most 40".into());
        }
        if self.id_prefix.chars().any(char::is_control) || self.id_prefix.contains([',', '"']) {
            return bad("id_prefix must not contain control characters, commas or quotes".into());
        }
        self.face.validate("face")?;
        self.finger.validate("finger")?;
        Ok(())
    }
    /// The modalities generated, in block order: face first, then fingers as listed.
    pub fn modalities(&self) -> Vec<(Modality, usize)> {
        let mut v = Vec::new();
        if self.face_dim > 0 {
            v.push((Modality::Face, self.face_dim));
        }
        v.extend(self.fingers.iter().map(|&(p, d)| (Modality::Finger(p), d)));
        v
    }
}

// ---------------------------------------------------------------------------------------------------------
// Seeding

pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const TAG_PLAN: u64 = 1;
const TAG_BASIS: u64 = 2;
const TAG_MEAN: u64 = 3;
const TAG_IDENTITY: u64 = 4;
const TAG_FAMILY: u64 = 5;
const TAG_FAMILY_MEMBER: u64 = 6;
const TAG_CAPTURE: u64 = 7;
const TAG_PRESENCE: u64 = 8;
const TAG_STATS: u64 = 9;

pub(crate) fn rng_for(seed: u64, tag: u64, a: u64, b: u64) -> Xoshiro256PlusPlus {
    let s = splitmix64(splitmix64(splitmix64(seed ^ splitmix64(tag)) ^ a) ^ b);
    Xoshiro256PlusPlus::seed_from_u64(s)
}

pub(crate) fn modality_code(m: Modality) -> u64 {
    match m {
        Modality::Face => 0,
        Modality::Finger(p) => u64::from(p),
    }
}

pub(crate) fn normal(rng: &mut Xoshiro256PlusPlus) -> f32 {
    StandardNormal.sample(rng)
}

pub(crate) fn normalise(v: &mut [f32]) {
    let n = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if n > 0.0 {
        let inv = (1.0 / n) as f32;
        v.iter_mut().for_each(|x| *x *= inv);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Duplicate plan

#[derive(Clone, Debug)]
struct Group {
    person: u64,
    /// All records of the person, ascending (first appearance first).
    records: Vec<u64>,
}

#[derive(Debug, Default)]
struct Plan {
    n: u64,
    /// Duplicate record positions, ascending.
    dup_pos: Vec<u64>,
    /// Group index of each duplicate position.
    dup_group: Vec<u32>,
    groups: Vec<Group>,
}

struct Fenwick(Vec<u32>);
impl Fenwick {
    fn add(&mut self, mut i: usize) {
        i += 1;
        while i <= self.0.len() {
            self.0[i - 1] += 1;
            i += i & i.wrapping_neg();
        }
    }
    /// Sum of marks at indices < i.
    fn prefix(&self, mut i: usize) -> u64 {
        let mut s = 0u64;
        while i > 0 {
            s += u64::from(self.0[i - 1]);
            i -= i & i.wrapping_neg();
        }
        s
    }
}

impl Plan {
    fn build(cfg: &PopulationConfig) -> Plan {
        let n = cfg.records;
        let mut rng = rng_for(cfg.seed, TAG_PLAN, 0, 0);
        let d = ((n as f64 * cfg.duplicate_rate).round() as u64).min(n.saturating_sub(1));
        if d == 0 {
            return Plan {
                n,
                ..Plan::default()
            };
        }
        let m = ((d as f64 / (1.0 + cfg.chain_share)).round() as u64).clamp(d.div_ceil(2), d);
        let chains = d - m;
        // Distinct random positions in 1..n (rejection sampling; d <= n/2 so it terminates quickly).
        let mut set = HashSet::with_capacity(d as usize);
        while (set.len() as u64) < d {
            set.insert(rng.random_range(1..n));
        }
        let mut sorted: Vec<u64> = set.into_iter().collect();
        sorted.sort_unstable();
        let mut shuffled = sorted.clone();
        for i in (1..shuffled.len()).rev() {
            let j = rng.random_range(0..=i);
            shuffled.swap(i, j);
        }
        let mut raw: Vec<Vec<u64>> = Vec::with_capacity(m as usize);
        let mut it = shuffled.into_iter();
        for g in 0..m {
            let take = if g < chains { 2 } else { 1 };
            let mut v: Vec<u64> = it.by_ref().take(take).collect();
            v.sort_unstable();
            raw.push(v);
        }
        raw.sort_unstable_by_key(|v| v[0]);
        let rank = |p: u64| sorted.partition_point(|&x| x < p);
        let mut fen = Fenwick(vec![0; sorted.len()]);
        let mut used = HashSet::with_capacity(m as usize);
        let mut kept: Vec<(Vec<u64>, u64)> = Vec::with_capacity(raw.len());
        for dups in raw {
            let e = dups[0];
            let avail = e - fen.prefix(rank(e));
            let mut chosen = None;
            for _ in 0..64 {
                let p = rng.random_range(0..avail);
                if !used.contains(&p) {
                    chosen = Some(p);
                    break;
                }
            }
            if let Some(p) = chosen {
                used.insert(p);
                for &x in &dups {
                    fen.add(rank(x));
                }
                kept.push((dups, p));
            }
        }
        let mut dup_pos: Vec<(u64, u32)> = Vec::new();
        let mut groups = Vec::with_capacity(kept.len());
        let mut all_kept: Vec<u64> = kept.iter().flat_map(|(v, _)| v.iter().copied()).collect();
        all_kept.sort_unstable();
        for (gi, (dups, person)) in kept.into_iter().enumerate() {
            let first = first_record_of(&all_kept, n, person);
            let mut records = vec![first];
            records.extend(dups.iter().copied());
            dup_pos.extend(dups.iter().map(|&x| (x, gi as u32)));
            groups.push(Group { person, records });
        }
        dup_pos.sort_unstable();
        Plan {
            n,
            dup_pos: dup_pos.iter().map(|x| x.0).collect(),
            dup_group: dup_pos.iter().map(|x| x.1).collect(),
            groups,
        }
    }

    fn duplicate_index(&self, record: u64) -> Option<usize> {
        self.dup_pos.binary_search(&record).ok()
    }

    fn person_of(&self, record: u64) -> u64 {
        match self.dup_pos.binary_search(&record) {
            Ok(k) => self.groups[self.dup_group[k] as usize].person,
            Err(k) => record - k as u64,
        }
    }

    fn persons(&self) -> u64 {
        self.n - self.dup_pos.len() as u64
    }
}

/// The record index of person `p`'s first appearance: the non-duplicate record with exactly `p`
/// non-duplicates before it.
fn first_record_of(dups: &[u64], n: u64, p: u64) -> u64 {
    // f(r) = number of non-duplicate records in [0, r); find the smallest r with f(r) > p, minus one.
    let f = |r: u64| r - dups.partition_point(|&x| x < r) as u64;
    let (mut lo, mut hi) = (p + 1, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if f(mid) > p { hi = mid } else { lo = mid + 1 }
    }
    lo - 1
}

// ---------------------------------------------------------------------------------------------------------
// Latent models

#[derive(Debug)]
struct ModelState {
    modality: Modality,
    code: u64,
    dim: usize,
    params: ModalityModel,
    /// rank × dim, entries N(0, 1/dim).
    basis: Vec<f32>,
    /// √λ_k.
    weights: Vec<f32>,
    /// Global mean direction scaled to √mean_energy.
    mean: Vec<f32>,
}

impl ModelState {
    fn new(
        seed: u64,
        modality: Modality,
        dim: usize,
        params: &ModalityModel,
        preset: Preset,
    ) -> Self {
        let code = modality_code(modality);
        let rank = if preset == Preset::Structured {
            params.rank
        } else {
            0
        };
        let mut rng = rng_for(seed, TAG_BASIS, code, 0);
        let scale = 1.0 / (dim as f32).sqrt();
        let basis: Vec<f32> = (0..rank * dim).map(|_| normal(&mut rng) * scale).collect();
        let lam: Vec<f64> = (1..=rank)
            .map(|k| (k as f64).powf(-params.spectrum_decay))
            .collect();
        let total: f64 = lam.iter().sum();
        let weights = lam.iter().map(|l| (l / total).sqrt() as f32).collect();
        let mut mrng = rng_for(seed, TAG_MEAN, code, 0);
        let mut mean: Vec<f32> = (0..dim).map(|_| normal(&mut mrng)).collect();
        normalise(&mut mean);
        let ms = if preset == Preset::Structured {
            params.mean_energy.sqrt() as f32
        } else {
            0.0
        };
        mean.iter_mut().for_each(|x| *x *= ms);
        ModelState {
            modality,
            code,
            dim,
            params: params.clone(),
            basis,
            weights,
            mean,
        }
    }

    /// A latent draw `v` (see module docs), added into `out` with weight `w`.
    fn add_latent(&self, rng: &mut Xoshiro256PlusPlus, w: f32, out: &mut [f32]) {
        let lr = (self.params.low_rank_share as f32).sqrt() * w;
        let iso = (1.0 - self.params.low_rank_share as f32).max(0.0).sqrt() * w
            / (self.dim as f32).sqrt();
        // Σ_k c_k B_k, four basis rows per pass over `out` (fewer loads/stores of `out`).
        let d = self.dim;
        let coef: Vec<f32> = self
            .weights
            .iter()
            .map(|wk| lr * wk * normal(rng))
            .collect();
        crate::testpop::add_rows(&coef, &self.basis, d, out);
        out.iter_mut().for_each(|o| *o += iso * normal(rng));
    }
}

/// One generated record's templates (all modalities concatenated, in [`PopulationConfig::modalities`] order).
#[derive(Debug, Clone)]
pub(crate) struct RecordOut {
    /// Whether each modality's template is present.
    pub(crate) present: Vec<bool>,
    /// Capture quality of each modality (0 when absent).
    pub(crate) quality: Vec<f32>,
    /// All modalities' templates, concatenated (zeros when absent).
    pub(crate) data: Vec<f32>,
}

/// A batch of generated records with the hidden person of each.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedBatch {
    /// Index of the first record of the batch.
    pub start: u64,
    /// The records.
    pub records: RecordBatch,
    /// Person number of each record (records of one person share it).
    pub persons: Vec<u64>,
}

/// One ground-truth duplicate pair (record indices, `a < b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TruthPair {
    /// Earlier record.
    pub a: u64,
    /// Later record.
    pub b: u64,
    /// Their person.
    pub person: u64,
}

/// A deterministic, streaming population generator.
#[derive(Debug)]
pub struct Generator {
    cfg: PopulationConfig,
    plan: Plan,
    models: Vec<ModelState>,
    offsets: Vec<usize>,
    total_dim: usize,
    id_width: usize,
    quality: [Beta<f64>; 2],
    /// The test-population model, for the [`crate::testpop`] presets.
    testpop: Option<crate::testpop::TestPopulation>,
}

impl Generator {
    /// Validate `cfg` and build the duplicate plan and latent bases.
    pub fn new(cfg: PopulationConfig) -> Result<Self> {
        cfg.validate()?;
        let plan = Plan::build(&cfg);
        let models: Vec<ModelState> = cfg
            .modalities()
            .into_iter()
            .map(|(m, d)| {
                let params = if m == Modality::Face {
                    &cfg.face
                } else {
                    &cfg.finger
                };
                ModelState::new(cfg.seed, m, d, params, cfg.preset)
            })
            .collect();
        let mut offsets = Vec::with_capacity(models.len());
        let mut total_dim = 0;
        for m in &models {
            offsets.push(total_dim);
            total_dim += m.dim;
        }
        let digits = cfg.records.saturating_sub(1).to_string().len();
        let beta = |p: &ModalityModel| Beta::new(p.quality_alpha, p.quality_beta);
        let quality = [
            beta(&cfg.face).map_err(|e| DatasetError::Config(format!("face quality: {e}")))?,
            beta(&cfg.finger).map_err(|e| DatasetError::Config(format!("finger quality: {e}")))?,
        ];
        let testpop = crate::testpop::TestPopulation::new(&cfg);
        Ok(Generator {
            testpop,
            id_width: cfg.id_width.max(digits),
            cfg,
            plan,
            models,
            offsets,
            total_dim,
            quality,
        })
    }
    /// The configuration.
    pub fn config(&self) -> &PopulationConfig {
        &self.cfg
    }
    /// Number of records.
    pub fn records(&self) -> u64 {
        self.cfg.records
    }
    /// Number of distinct persons.
    pub fn persons(&self) -> u64 {
        self.plan.persons()
    }
    /// Number of duplicate records (re-enrolments).
    pub fn duplicate_records(&self) -> u64 {
        self.plan.dup_pos.len() as u64
    }
    /// The modalities generated, in block order, with their dimensions.
    pub fn modalities(&self) -> Vec<(Modality, usize)> {
        self.models.iter().map(|m| (m.modality, m.dim)).collect()
    }
    /// The person of `record`.
    pub fn person_of(&self, record: u64) -> u64 {
        self.plan.person_of(record)
    }
    /// The hidden group of `person`, for the test populations that have one: the family (its first person
    /// number) in `LookalikeFamilies` (face look-alikes), the cluster in the first modality (`0..2048`, 0 the
    /// most likely) in `SkewedClusters`; `None` for every other preset. Persons of one group are different
    /// people who look alike.
    pub fn group_of(&self, person: u64) -> Option<u64> {
        self.testpop.as_ref().and_then(|t| t.group_of(person))
    }
    /// The subject ID of `record`, e.g. `P000000123`.
    pub fn subject_id(&self, record: u64) -> String {
        format!("{}{:0w$}", self.cfg.id_prefix, record, w = self.id_width)
    }
    /// Every duplicate pair, sorted by `(a, b)`.
    pub fn truth_pairs(&self) -> Vec<TruthPair> {
        let mut out = Vec::new();
        for g in &self.plan.groups {
            for (i, &a) in g.records.iter().enumerate() {
                for &b in &g.records[i + 1..] {
                    out.push(TruthPair {
                        a,
                        b,
                        person: g.person,
                    });
                }
            }
        }
        out.sort_unstable();
        out
    }
    /// Persons with two or more records, with their records ascending, sorted by person.
    pub fn clusters(&self) -> Vec<(u64, Vec<u64>)> {
        let mut out: Vec<(u64, Vec<u64>)> = self
            .plan
            .groups
            .iter()
            .map(|g| (g.person, g.records.clone()))
            .collect();
        out.sort_unstable();
        out
    }

    fn is_family_member(&self, person: u64) -> Option<u64> {
        let g = person / u64::from(self.cfg.family_size);
        let mut r = rng_for(self.cfg.seed, TAG_FAMILY_MEMBER, 0, g);
        (r.random::<f64>() < self.cfg.family_share).then_some(g)
    }

    fn identity(&self, model: &ModelState, person: u64, out: &mut [f32]) {
        out.iter_mut().for_each(|x| *x = 0.0);
        let mut rng = rng_for(self.cfg.seed, TAG_IDENTITY, model.code, person);
        match self.cfg.preset {
            // Isotropic (the test-population presets never get here: `record` hands them to testpop).
            Preset::Isotropic
            | Preset::IsotropicMates
            | Preset::LookalikeFamilies
            | Preset::HeavyTail
            | Preset::PowerLaw
            | Preset::SkewedClusters
            | Preset::FingersOnly => {
                out.iter_mut().for_each(|x| *x = normal(&mut rng));
            }
            Preset::Structured => {
                let fw = model.params.family_weight as f32;
                match self.is_family_member(person) {
                    Some(f) if fw > 0.0 => {
                        model.add_latent(&mut rng, (1.0 - fw).sqrt(), out);
                        let mut frng = rng_for(self.cfg.seed, TAG_FAMILY, model.code, f);
                        model.add_latent(&mut frng, fw.sqrt(), out);
                    }
                    _ => model.add_latent(&mut rng, 1.0, out),
                }
                normalise(out);
                out.iter_mut().zip(&model.mean).for_each(|(o, m)| *o += m);
            }
        }
        normalise(out);
    }

    fn record(&self, record: u64) -> RecordOut {
        let person = self.plan.person_of(record);
        if let Some(t) = &self.testpop {
            return t.record(record, person);
        }
        let is_dup = self.plan.duplicate_index(record).is_some();
        let k = self.models.len();
        let mut present = Vec::with_capacity(k);
        let mut prng = rng_for(self.cfg.seed, TAG_PRESENCE, 0, record);
        for m in &self.models {
            let rate = if m.modality == Modality::Face {
                self.cfg.face_missing_rate
            } else {
                self.cfg.finger_missing_rate
            };
            present.push(prng.random::<f64>() >= rate);
        }
        if !present.iter().any(|&p| p) {
            present[0] = true;
        }
        let mut quality = vec![0.0f32; k];
        let mut data = vec![0.0f32; self.total_dim];
        for (mi, m) in self.models.iter().enumerate() {
            if !present[mi] {
                continue;
            }
            let out = &mut data[self.offsets[mi]..self.offsets[mi] + m.dim];
            self.identity(m, person, out);
            let mut rng = rng_for(self.cfg.seed, TAG_CAPTURE, m.code, record);
            let (q, s) = match self.cfg.preset {
                // As in `identity`: the test-population presets never get here.
                Preset::Isotropic
                | Preset::IsotropicMates
                | Preset::LookalikeFamilies
                | Preset::HeavyTail
                | Preset::PowerLaw
                | Preset::SkewedClusters
                | Preset::FingersOnly => (
                    1.0,
                    (1.0 / self.cfg.isotropic_genuine_cosine - 1.0)
                        .max(0.0)
                        .sqrt(),
                ),
                Preset::Structured => {
                    let share = if is_dup {
                        self.cfg.duplicate_degraded_share
                    } else {
                        self.cfg.degraded_share
                    };
                    let q = if rng.random::<f64>() < share {
                        0.05 + 0.3 * rng.random::<f64>()
                    } else {
                        let b = if m.modality == Modality::Face {
                            &self.quality[0]
                        } else {
                            &self.quality[1]
                        };
                        b.sample(&mut rng)
                    };
                    let p = &m.params;
                    (q, p.noise_min + (p.noise_max - p.noise_min) * (1.0 - q))
                }
            };
            let scale = (s / (m.dim as f64).sqrt()) as f32;
            out.iter_mut().for_each(|x| *x += scale * normal(&mut rng));
            normalise(out);
            quality[mi] = q as f32;
        }
        RecordOut {
            present,
            quality,
            data,
        }
    }

    /// Generate records `start..start+count` (clamped to the population) in parallel.
    pub fn generate(&self, start: u64, count: usize) -> GeneratedBatch {
        let end = start.saturating_add(count as u64).min(self.records());
        let start = start.min(end);
        let outs: Vec<RecordOut> = (start..end)
            .into_par_iter()
            .map(|r| self.record(r))
            .collect();
        self.assemble(start, &outs)
    }

    fn assemble(&self, start: u64, outs: &[RecordOut]) -> GeneratedBatch {
        let n = outs.len();
        let blocks = self
            .models
            .iter()
            .enumerate()
            .map(|(mi, m)| {
                let mut data = Vec::with_capacity(n * m.dim);
                for o in outs {
                    data.extend_from_slice(&o.data[self.offsets[mi]..self.offsets[mi] + m.dim]);
                }
                ModalityBlock {
                    modality: m.modality,
                    dim: m.dim,
                    data,
                    present: outs.iter().map(|o| o.present[mi]).collect(),
                    quality: outs.iter().map(|o| o.quality[mi]).collect(),
                }
            })
            .collect();
        let ids = (0..n as u64).map(|i| self.subject_id(start + i)).collect();
        let persons = (0..n as u64).map(|i| self.person_of(start + i)).collect();
        GeneratedBatch {
            start,
            records: RecordBatch { ids, blocks },
            persons,
        }
    }

    /// Stream the whole population in batches of `batch_size` records (each generated in parallel).
    pub fn batches(&self, batch_size: usize) -> impl Iterator<Item = GeneratedBatch> + '_ {
        let step = batch_size.max(1) as u64;
        (0..self.records().div_ceil(step)).map(move |b| self.generate(b * step, step as usize))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Statistics

/// Summary statistics of a score sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreStats {
    /// Number of scores sampled.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub sd: f64,
    /// 1st percentile.
    pub p01: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl ScoreStats {
    /// Statistics of `values` (empty → all zero).
    pub fn from_values(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return ScoreStats::default();
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        let mut s = values.to_vec();
        s.sort_unstable_by(f64::total_cmp);
        let pct = |p: f64| {
            let x = p * (n - 1) as f64;
            let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
            s[lo] + (s[hi] - s[lo]) * (x - lo as f64)
        };
        ScoreStats {
            count: n as u64,
            mean,
            sd: var.sqrt(),
            p01: pct(0.01),
            p99: pct(0.99),
        }
    }
}

/// Genuine and impostor cosine statistics of one modality.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModalityStats {
    /// Modality key (`face`, `finger2`, …).
    pub modality: String,
    /// Dimension.
    pub dim: usize,
    /// Records with this template present.
    pub present: u64,
    /// Cosines between records of the same person.
    pub genuine: ScoreStats,
    /// Cosines between random records of different persons.
    pub impostor: ScoreStats,
}

const RESERVOIR: usize = 1024;
const GENUINE_MAX: usize = 200_000;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa > 0.0 && bb > 0.0 {
        ab / (aa * bb).sqrt()
    } else {
        0.0
    }
}

/// Streaming collector of genuine/impostor cosines (deterministic given the batch sequence).
struct StatsCollector {
    genuine: Vec<Vec<f64>>,
    genuine_seen: Vec<u64>,
    impostor: Vec<Vec<f64>>,
    present: Vec<u64>,
    reservoir: Vec<(u64, RecordOut)>,
    seen: u64,
    rng: Xoshiro256PlusPlus,
}

impl StatsCollector {
    fn new(g: &Generator) -> Self {
        let k = g.models.len();
        StatsCollector {
            genuine: vec![Vec::new(); k],
            genuine_seen: vec![0; k],
            impostor: vec![Vec::new(); k],
            present: vec![0; k],
            reservoir: Vec::new(),
            seen: 0,
            rng: rng_for(g.cfg.seed, TAG_STATS, 0, 0),
        }
    }

    fn add_batch(&mut self, g: &Generator, start: u64, outs: &[RecordOut], persons: &[u64]) {
        let k = g.models.len();
        let range = |mi: usize| g.offsets[mi]..g.offsets[mi] + g.models[mi].dim;
        for o in outs {
            for mi in 0..k {
                self.present[mi] += u64::from(o.present[mi]);
            }
        }
        // Genuine: each duplicate record against its person's earlier records (regenerated if not in batch).
        for (j, o) in outs.iter().enumerate() {
            let r = start + j as u64;
            let Some(di) = g.plan.duplicate_index(r) else {
                continue;
            };
            let group = &g.plan.groups[g.plan.dup_group[di] as usize];
            for &e in group.records.iter().take_while(|&&e| e < r) {
                let regenerated;
                let other = if e >= start {
                    &outs[(e - start) as usize]
                } else {
                    regenerated = g.record(e);
                    &regenerated
                };
                for mi in 0..k {
                    if o.present[mi] && other.present[mi] {
                        let c = cosine(&o.data[range(mi)], &other.data[range(mi)]);
                        self.genuine_seen[mi] += 1;
                        if self.genuine[mi].len() < GENUINE_MAX {
                            self.genuine[mi].push(c);
                        } else {
                            let slot = self.rng.random_range(0..self.genuine_seen[mi]);
                            if (slot as usize) < GENUINE_MAX {
                                self.genuine[mi][slot as usize] = c;
                            }
                        }
                    }
                }
            }
        }
        // Impostor: this batch's share of the pair budget, against a uniform reservoir of earlier records
        // (or within the batch for the first one).
        let n = g.records().max(1);
        let total = g.cfg.impostor_pairs;
        let end = start + outs.len() as u64;
        let quota = (u128::from(total) * u128::from(end) / u128::from(n)) as u64
            - (u128::from(total) * u128::from(start) / u128::from(n)) as u64;
        if outs.len() >= 2 || !self.reservoir.is_empty() {
            for _ in 0..quota {
                for _attempt in 0..8 {
                    let j = self.rng.random_range(0..outs.len());
                    let (pi, other) = if self.reservoir.is_empty() {
                        let i = self.rng.random_range(0..outs.len());
                        if i == j {
                            continue;
                        }
                        (persons[i], &outs[i])
                    } else {
                        let (p, o) =
                            &self.reservoir[self.rng.random_range(0..self.reservoir.len())];
                        (*p, o)
                    };
                    if pi == persons[j] {
                        continue;
                    }
                    for mi in 0..k {
                        if outs[j].present[mi] && other.present[mi] {
                            self.impostor[mi]
                                .push(cosine(&outs[j].data[range(mi)], &other.data[range(mi)]));
                        }
                    }
                    break;
                }
            }
        }
        // Reservoir update (Algorithm R).
        for (j, o) in outs.iter().enumerate() {
            self.seen += 1;
            if self.reservoir.len() < RESERVOIR {
                self.reservoir.push((persons[j], o.clone()));
            } else {
                let slot = self.rng.random_range(0..self.seen);
                if (slot as usize) < RESERVOIR {
                    self.reservoir[slot as usize] = (persons[j], o.clone());
                }
            }
        }
    }

    fn finish(&self, g: &Generator) -> Vec<ModalityStats> {
        g.models
            .iter()
            .enumerate()
            .map(|(mi, m)| ModalityStats {
                modality: m.modality.key(),
                dim: m.dim,
                present: self.present[mi],
                genuine: ScoreStats::from_values(&self.genuine[mi]),
                impostor: ScoreStats::from_values(&self.impostor[mi]),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Writing

/// The contents of `population.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PopulationManifest {
    /// Format tag, `pacha-population/1`.
    pub format: String,
    /// The configuration used.
    pub config: PopulationConfig,
    /// Records written.
    pub records: u64,
    /// Distinct persons.
    pub persons: u64,
    /// Re-enrolment records.
    pub duplicate_records: u64,
    /// Rows of `truth.csv`.
    pub truth_pairs: u64,
    /// Persons with two or more records.
    pub clusters: u64,
    /// Vector files: (modality key, file name, dim).
    pub files: Vec<(String, String, usize)>,
    /// Measured score statistics per modality.
    pub stats: Vec<ModalityStats>,
}

impl PopulationManifest {
    /// Read `population.json` from a population directory.
    pub fn read(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("population.json");
        let text = std::fs::read(&path).map_err(|e| DatasetError::io(&path, "read", e))?;
        serde_json::from_slice(&text).map_err(|source| DatasetError::Json { path, source })
    }
}

/// What [`write_population`] wrote, and how fast.
#[derive(Clone, Debug, PartialEq)]
pub struct PopulationSummary {
    /// The manifest written to `population.json`.
    pub manifest: PopulationManifest,
    /// Wall time of the whole write.
    pub elapsed_secs: f64,
    /// Records generated and written per second.
    pub records_per_sec: f64,
}

/// Records per batch when writing a population (fixed: the statistics sample depends on it).
pub const WRITE_BATCH: usize = 4096;

/// Generate the population for `cfg` into `out_dir` (created if needed): `face.npy`, `finger<N>.npy`,
/// `subjects.csv`, `truth.csv`, `clusters.csv` and `population.json`. `progress(done, total)` is called after
/// every batch.
pub fn write_population(
    cfg: &PopulationConfig,
    out_dir: impl AsRef<Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PopulationSummary> {
    let t0 = Instant::now();
    let dir = out_dir.as_ref();
    crate::private::create_private_dir_all(dir)
        .map_err(|e| DatasetError::io(dir, "create_dir", e))?;
    let g = Generator::new(cfg.clone())?;
    let mods = g.modalities();
    let mut writers = Vec::with_capacity(mods.len());
    let mut files = Vec::with_capacity(mods.len());
    for &(m, d) in &mods {
        let name = format!("{}.npy", m.key());
        writers.push(NpyWriter::create(dir.join(&name), d)?);
        files.push((m.key(), name, d));
    }
    let mkeys: Vec<Modality> = mods.iter().map(|x| x.0).collect();
    let mut subjects = SubjectsWriter::create(dir.join("subjects.csv"), &mkeys)?;
    let mut stats = StatsCollector::new(&g);
    let n = g.records();
    let step = WRITE_BATCH as u64;
    let mut cells = Vec::with_capacity(mods.len());
    let mut start = 0u64;
    progress(0, n);
    while start < n {
        let end = (start + step).min(n);
        let outs: Vec<RecordOut> = (start..end).into_par_iter().map(|r| g.record(r)).collect();
        let batch = g.assemble(start, &outs);
        for (w, b) in writers.iter_mut().zip(&batch.records.blocks) {
            w.write_rows(&b.data)?;
        }
        for (i, id) in batch.records.ids.iter().enumerate() {
            cells.clear();
            cells.extend(
                batch
                    .records
                    .blocks
                    .iter()
                    .map(|b| (b.present[i], b.quality[i])),
            );
            subjects.write_row(id, &cells)?;
        }
        stats.add_batch(&g, start, &outs, &batch.persons);
        start = end;
        progress(start, n);
    }
    for w in writers {
        w.finish()?;
    }
    subjects.finish()?;
    let truth = g.truth_pairs();
    write_csv(
        dir.join("truth.csv"),
        &["subject_a", "subject_b", "person"],
        truth.iter().map(|t| {
            vec![
                Cow::Owned(g.subject_id(t.a)),
                Cow::Owned(g.subject_id(t.b)),
                Cow::Owned(t.person.to_string()),
            ]
        }),
    )?;
    let clusters = g.clusters();
    write_csv(
        dir.join("clusters.csv"),
        &["person", "subject_id"],
        clusters
            .iter()
            .flat_map(|(p, recs)| recs.iter().map(move |&r| (p, r)))
            .map(|(p, r)| vec![Cow::Owned(p.to_string()), Cow::Owned(g.subject_id(r))]),
    )?;
    let manifest = PopulationManifest {
        format: "pacha-population/1".to_string(),
        config: cfg.clone(),
        records: n,
        persons: g.persons(),
        duplicate_records: g.duplicate_records(),
        truth_pairs: truth.len() as u64,
        clusters: clusters.len() as u64,
        files,
        stats: stats.finish(&g),
    };
    let json_path = dir.join("population.json");
    let mut json = serde_json::to_vec_pretty(&manifest).map_err(|source| DatasetError::Json {
        path: json_path.clone(),
        source,
    })?;
    json.push(b'\n');
    crate::private::write_private(&json_path, &json)
        .map_err(|e| DatasetError::io(&json_path, "write", e))?;
    let elapsed = t0.elapsed().as_secs_f64();
    tracing::info!(
        records = n,
        elapsed_secs = elapsed,
        "population written to {}",
        dir.display()
    );
    Ok(PopulationSummary {
        manifest,
        elapsed_secs: elapsed,
        records_per_sec: n as f64 / elapsed.max(1e-9),
    })
}

/// Read `truth.csv` (columns `subject_a`, `subject_b`; others ignored): the duplicate pairs.
pub fn read_truth(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let mut t = Table::open(path)?;
    let (a, b) = (t.column("subject_a")?, t.column("subject_b")?);
    let mut out = Vec::new();
    while let Some((line, mut f)) = t.next()? {
        let (x, y) = (std::mem::take(&mut f[a]), std::mem::take(&mut f[b]));
        crate::subjects::check_id(path, line, &x)?;
        crate::subjects::check_id(path, line, &y)?;
        out.push((x, y));
    }
    Ok(out)
}

/// Read `clusters.csv` (columns `person`, `subject_id`): clusters in order of first appearance, each with
/// its subject IDs in file order.
pub fn read_clusters(path: impl AsRef<Path>) -> Result<Vec<(String, Vec<String>)>> {
    let path = path.as_ref();
    let mut t = Table::open(path)?;
    let (p, s) = (t.column("person")?, t.column("subject_id")?);
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    while let Some((line, mut f)) = t.next()? {
        let (person, id) = (std::mem::take(&mut f[p]), std::mem::take(&mut f[s]));
        crate::subjects::check_id(path, line, &id)?;
        if person.trim().is_empty() {
            return Err(DatasetError::InvalidValue {
                path: path.to_path_buf(),
                line,
                column: "person".into(),
                value: person,
                expected: "a non-empty person key",
            });
        }
        let k = *index.entry(person.clone()).or_insert_with(|| {
            out.push((person, Vec::new()));
            out.len() - 1
        });
        out[k].1.push(id);
    }
    Ok(out)
}
