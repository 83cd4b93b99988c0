//! The candidate policy: how a run generates candidates, decided per run from measurements on the store.
//!
//! The one place where the engine decides the candidate path. For every modality that generates
//! candidates at cosine `c` (see [`crate::fusion`]'s budgets), a **pilot** measures on this store what the
//! IVF partition needs to reach the pairs at or above `c`:
//! 1. a seeded sample of rows (independent of the audit's sample) is searched exactly against every row
//!    (the i8 threshold join where the store keeps i8 codes, else the blocked f32 GEMM; both exact): the pairs found are *natural* pilot pairs (duplicates, look-alikes, relatives —
//!    whatever this store holds near `c`);
//! 2. *synthetic boundary pairs* are always added: for a sampled row `x` and another sampled store row `z`,
//!    `y = c·x + √(1−c²)·w` with `w` the unit part of `z` orthogonal to `x`, a pair exactly at `c` whose
//!    difference points at real data. Natural pairs alone are not enough even when they are many: on a
//!    store of dense clusters they are mostly easy within-cluster pairs, and a rule sized on them alone
//!    missed 8 of 1 091 planted mates at 100 k (skewed clusters, BENCHMARKS.md); the audit judges a
//!    partition path with synthetic pairs too, so the pilot must plan for them;
//! 3. for every pilot pair, [`Ivf::score_rows`] gives each side's rank and score gap of the other side's
//!    home list ([`Reach`]); a [`ProbeRule`] reaches the pair if it makes either side probe the other's
//!    home (two-way visits; one-way for identify, where only the query probes);
//! 4. among rules `(min, margin)` the pilot keeps the cheapest that reaches **every** pilot pair, widened by
//!    a safety slack (depth × 1.25, margin × 1.15 + 0.01), where the cost is the predicted sketch comparisons (each pilot row's probed lists'
//!    member counts, scaled to the store), and compares it with a brute-force sketch join
//!    (`N²/2` comparisons, [`Ivf::brute`]), which needs no partition at all. The cheaper wins.
//!
//! A dedup's pilot runs these steps first on a **screen**, the first [`PILOT_SCREEN_ROWS`] rows of its
//! sample: where that already prices the partition at [`PILOT_SCREEN_MARGIN`]× the best path without it
//! (the low cosines of fused runs), the pilot stops; otherwise the rest of the sample extends the screen's
//! rows (each row searched once).
//!
//! The pilot is a tuner, not the proof: every run's completeness audit ([`crate::audit`]) measures the
//! result on an independent sample.

use crate::store::Snapshot;
use crate::{AnnSet, EngineError};
use pacha_index::RowsF32;
use pacha_index::ivf::{Ivf, JoinCuts, JoinPair, JoinStats, ProbeRule, QuantStage, Reach};
use pacha_index::kernels::dot_f32;
use pacha_index::quant::l1_bounds;
use pacha_index::rng::SplitMix;
use pacha_index::sketch::{CutChoice, Sketches, StagedCut};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::OnceCell;
use std::ops::Range;
use std::time::Instant;

/// Rows sampled by a pilot.
pub const PILOT_ROWS: usize = 1500;
/// Most natural pilot pairs kept (a seeded subsample beyond).
pub const MAX_PILOT_PAIRS: usize = 40_000;
/// Seed of pilot samples (distinct from the audit's).
const PILOT_SEED: u64 = 0x9170_7e57;
/// Synthetic boundary partners per pilot row.
const SYNTHETIC_PER_PILOT_ROW: usize = 4;
/// Relative widening of the fixed depth the pilot pairs need.
const MIN_SLACK: f64 = 1.25;
/// Relative widening of the margin the pilot pairs need.
const MARGIN_SLACK: f32 = 0.15;
/// Absolute widening of that margin.
const MARGIN_PAD: f32 = 0.01;
/// One pilot pair in this many decides first whether the partition can win at all (see [`plan_modality`]).
const SAMPLE_STRIDE: usize = 8;
/// Rows of the pilot's screen: the first rows of its sample, on which a partition that loses by
/// [`PILOT_SCREEN_MARGIN`] stops the pilot (see [`plan_modality`]).
pub const PILOT_SCREEN_ROWS: usize = 300;
/// How many times slower than the best path without the partition the screen must predict the partition
/// (the rule fewer pairs need is never wider, so the screen errs towards the partition; what can err the
/// other way is the sampling of rows, their list sizes and synthetic partners).
pub const PILOT_SCREEN_MARGIN: f64 = 2.0;
/// Most pairs of the screen whose list ranks are computed (evenly spaced over its pairs).
const PILOT_SCREEN_PAIRS: usize = 4000;

/// Seconds per sketch product of the packed first stage in the join, both cores, with the AVX-512 filter
/// (measured in the join; the kernel alone runs ≈ 2 G products/s per core).
const SKETCH_PRODUCT_S_AVX512: f64 = 0.8e-9;
/// As [`SKETCH_PRODUCT_S_AVX512`] with the AVX2 filter: 2.4× (its single-core rate against AVX-512's at 5 %
/// pass, `cargo bench --bench ivf -- sketch_filter_512bit_pass5`, BENCHMARKS.md fourteenth session).
const SKETCH_PRODUCT_S_AVX2: f64 = 1.9e-9;
/// As [`SKETCH_PRODUCT_S_AVX512`] with the portable filter: 19× (`sketch_filter_512bit`, same bench).
const SKETCH_PRODUCT_S_PORTABLE: f64 = 15e-9;

/// Seconds per sketch product of the first stage with the filter kernel this CPU runs.
fn sketch_product_seconds() -> f64 {
    match pacha_index::sketch::filter_kernel() {
        "avx512" => SKETCH_PRODUCT_S_AVX512,
        "avx2" => SKETCH_PRODUCT_S_AVX2,
        _ => SKETCH_PRODUCT_S_PORTABLE,
    }
}
/// Seconds per second-stage (whole-sketch) test of a first-stage survivor.
const STAGE2_S: f64 = 3e-9;
/// Seconds per exact rescoring of a 512-d survivor (scattered f32 read, `dot_f32`, verdict), both cores.
/// Measured at 100 k rows (face + 2 fingers, complete cuts): 845 M rescorings in about 140 s.
const RESCORE_S_512: f64 = 150e-9;
/// How much more often a partition's products pass the sketch stages than random pairs (the impostor
/// model's share): visited pairs are nearer. Measured at 100 k rows (structured face, cosine 0.33): 0.84
/// vs 0.47 predicted at the first stage, 0.29 vs 0.17 at the second.
const IVF_PASS_FACTOR: f64 = 1.8;
/// Sustained f32 GEMM rate of the exact join on both cores (measured 150–176 GFLOP/s; BENCHMARKS.md).
const GEMM_FLOPS: f64 = 130e9;
/// Seconds per 512-d pair product of the i8 threshold join's scan (integer dot product and error-bound
/// filter), both cores, by kernel (`pacha_index::exact_i8`). Measured against the f32 join in the same
/// bench run (`bench/benches/exact.rs`, BENCHMARKS.md "i8 threshold join"): VNNI 3.5×, AVX2 1.3× and the
/// portable kernel 1/14 of the f32 join's product rate, scaled to [`GEMM_FLOPS`] (7.9 ns per product).
const I8_PRODUCT_S_VNNI: f64 = 2.3e-9;
/// As [`I8_PRODUCT_S_VNNI`], AMX-INT8 kernel (tile products, the same AVX-512 filter): the VNNI figure
/// scaled by the two kernels' ratio in one bench run on a Sapphire-Rapids-class machine (8.7 against
/// 17.1 ms, `join_products_4096x512x4096`; BENCHMARKS.md "AMX tiles").
const I8_PRODUCT_S_AMX: f64 = 1.2e-9;
/// As [`I8_PRODUCT_S_VNNI`], AVX2 kernel.
const I8_PRODUCT_S_AVX2: f64 = 6.1e-9;
/// As [`I8_PRODUCT_S_VNNI`], portable kernel.
const I8_PRODUCT_S_SCALAR: f64 = 115e-9;
/// Rows sampled to estimate a modality's typical i8 error bound.
const I8_BOUND_SAMPLE: usize = 2000;

/// The sketch filter of a modality's join: the predicted impostor pass share of each stage.
#[derive(Clone, Copy, Debug)]
pub struct FilterModel {
    /// Share of products passing the first (prefix) stage.
    pub prefix_pass: f64,
    /// Share of products passing both stages (rescored).
    pub full_pass: f64,
}

/// What the planner knows of a modality's i8 threshold join: its kernel and the share of products the
/// error-bound filter is predicted to pass (each then read in f32 and rescored).
#[derive(Clone, Copy, Debug)]
pub struct I8Model {
    /// The kernel the join runs.
    pub kernel: pacha_index::exact_i8::I8Kernel,
    /// Predicted share of products that survive the filter.
    pub pass: f64,
}

impl I8Model {
    /// The model of modality `mi` of `snap` for a join at cosine `c`, from the Gaussian impostor model
    /// `impostor = (mean, sd)` of its cosines: a product survives when its score plus the error bound reaches
    /// `c`, so the predicted share is `P(impostor ≥ c − β)` with `β` the mean error bound of a seeded sample of
    /// rows. `None` when the store keeps no i8 codes of the modality.
    pub fn of(snap: &Snapshot, mi: usize, c: f32, impostor: (f64, f64)) -> Option<I8Model> {
        let spec = &snap.schema().modalities[mi];
        let codes = snap.i8_rows(spec.modality)?;
        let live: Vec<u32> = (0..snap.rows())
            .filter(|&r| snap.is_present(spec.modality, r) && !snap.is_deleted(r))
            .map(|r| r as u32)
            .collect();
        let k = I8_BOUND_SAMPLE.min(live.len());
        let mut pool = live;
        SplitMix(PILOT_SEED ^ 0x18 ^ mi as u64).shuffle_prefix(&mut pool, k);
        let (mut s_sum, mut u_sum) = (0.0f64, 0.0f64);
        for &r in &pool[..k] {
            let s = f64::from(codes.scale(r as usize));
            let l1: i64 = codes
                .row(r as usize)
                .iter()
                .map(|&q| i64::from(q).abs())
                .sum();
            s_sum += s;
            u_sum += s * (l1 as f64 + 0.5 * spec.dim as f64);
        }
        let n = k.max(1) as f64;
        // Mean of 0.5·(sa·ub + sb·ua) + d/4·sa·sb over independent rows, plus the rounding slack.
        let beta = s_sum / n * u_sum / n
            + 0.25 * spec.dim as f64 * (s_sum / n).powi(2)
            + f64::from(pacha_index::quant::CODE_BOUND_SLACK);
        let (mean, sd) = impostor;
        let z = (f64::from(c) - beta - mean) / sd.max(1e-6);
        Some(I8Model {
            kernel: pacha_index::exact_i8::I8Kernel::detect(),
            pass: (0.5 * crate::fusion::erfc(z / std::f64::consts::SQRT_2)).clamp(0.0, 1.0),
        })
    }
}

/// Predicted seconds of an i8 threshold join of `products` pair products of `d`-dimensional rows.
fn i8_join_seconds(products: f64, d: usize, m: I8Model) -> f64 {
    use pacha_index::exact_i8::I8Kernel;
    let per = match m.kernel {
        I8Kernel::Amx => I8_PRODUCT_S_AMX,
        I8Kernel::Vnni => I8_PRODUCT_S_VNNI,
        I8Kernel::Avx2 => I8_PRODUCT_S_AVX2,
        I8Kernel::Scalar => I8_PRODUCT_S_SCALAR,
    };
    products * (per + m.pass * RESCORE_S_512) * d as f64 / 512.0
}

/// Predicted seconds of a join of `products` sketch products (or, without a filter, GEMM products) of
/// `d`-dimensional rows.
fn join_seconds(products: f64, d: usize, filter: Option<FilterModel>) -> f64 {
    match filter {
        Some(f) => {
            products
                * (sketch_product_seconds()
                    + f.prefix_pass * STAGE2_S
                    + f.full_pass * RESCORE_S_512 * d as f64 / 512.0)
        }
        None => products * 2.0 * d as f64 / GEMM_FLOPS,
    }
}

/// Which side of a pair probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Visits {
    /// Either row may visit the other's home (the dedup self-join).
    TwoWay,
    /// Only the first row (a query) visits (identify).
    OneWay,
}

/// How one modality's candidates are generated in a run, and the measurements behind the choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModalityPlan {
    /// Modality key.
    pub modality: String,
    /// Candidate cosine of the run.
    pub cosine: f32,
    /// `"ivf"` (the partition, probed by `rule`), `"brute"` (every pair compared by sketch), `"exact"`
    /// (blocked f32 GEMM over every pair: where the candidate cosine is too low for sketches to filter) or
    /// `"exact-i8"` (every pair scanned through the i8 codes, the error bound's survivors rescored in f32:
    /// exact like `"exact"`, cheaper where the store keeps i8 codes).
    pub path: String,
    /// Probe rule of the IVF path.
    pub rule: Option<ProbeRule>,
    /// Lists of the partition.
    pub lists: usize,
    /// Rows the pilot sampled.
    pub pilot_rows: usize,
    /// Pilot pairs found by exact search.
    pub natural_pairs: usize,
    /// Synthetic boundary pairs added.
    pub synthetic_pairs: usize,
    /// Mean lists probed per row (pilot rows, chosen rule).
    pub mean_probes: f64,
    /// Predicted sketch comparisons of the IVF path over the run's rows.
    pub predicted_products: f64,
    /// Sketch comparisons of the brute-force path.
    pub brute_products: f64,
    /// Predicted seconds of each path considered: `(path, seconds)`.
    #[serde(default)]
    pub predicted_seconds: Vec<(String, f64)>,
    /// The cheapest probe rule the pilot found for the partition, also when another path was chosen
    /// (what `--force-path ivf` runs).
    #[serde(default)]
    pub ivf_rule: Option<ProbeRule>,
    /// Seconds the pilot took.
    pub seconds: f64,
}

impl ModalityPlan {
    /// Scales the predictions (products, seconds) from the self-join of all `rows` rows to the pairs
    /// `(a, b)`, `a < b`, `b` in `probes` — a share `(end² − start²) / rows²` of them — so a `--from-row`
    /// batch or a tile predicts its own cost. The path choice is unchanged (every path scales alike).
    pub fn restrict_to(&mut self, probes: Range<usize>, rows: usize) {
        let end = probes.end.min(rows) as f64;
        let start = (probes.start as f64).min(end);
        let share = if rows == 0 {
            1.0
        } else {
            (end * end - start * start) / (rows as f64 * rows as f64)
        };
        self.predicted_products *= share;
        self.brute_products *= share;
        for p in &mut self.predicted_seconds {
            p.1 *= share;
        }
    }
}

/// A pilot pair's requirement: the reach of each direction (`None` where that side does not probe).
struct Need {
    fwd: Reach,
    back: Option<Reach>,
}

impl Need {
    /// True iff `rule` makes one side probe the other's home list.
    fn reached_by(&self, rule: &ProbeRule) -> bool {
        rule.reaches(self.fwd.rank, self.fwd.gap)
            || self.back.is_some_and(|b| rule.reaches(b.rank, b.gap))
    }
}

/// What each pair needs from a probe rule: pair `p` joins row `owners[p]` (whose list scores and home are
/// in `row_scores`, `row_homes`) and partner `p` of `partners` (dense vectors).
fn pair_needs(
    ivf: &Ivf,
    row_scores: &[f32],
    row_homes: &[u32],
    partners: &[f32],
    owners: &[usize],
    visits: Visits,
) -> Vec<Need> {
    let lists = ivf.lists();
    let mut partner_scores = Vec::new();
    let partner_homes = ivf.homes_and_scores(partners, owners.len(), &mut partner_scores);
    owners
        .par_iter()
        .enumerate()
        .map(|(p, &i)| Need {
            fwd: Reach::of(
                &row_scores[i * lists..(i + 1) * lists],
                partner_homes[p] as usize,
            ),
            back: match visits {
                Visits::TwoWay => Some(Reach::of(
                    &partner_scores[p * lists..(p + 1) * lists],
                    row_homes[i] as usize,
                )),
                Visits::OneWay => None,
            },
        })
        .collect()
}

/// Plans modality `mi` (schema position) of `snap` for a join at cosine `c` over rows `0..snap.rows()`,
/// against the partition `ivf` (the saved index's centroids; rows need not be indexed). `l1` holds the L1
/// bounds of the modality's i8 codes once computed: the pilot's i8 join fills it if it needs them, so a
/// caller that needs them afterwards computes them at most once. Unless `exhaustive`, the partition's rule
/// is not worked out where a sample of the pilot's pairs already shows it losing (`ivf_rule` is then `None`
/// and its predicted time a lower bound).
#[allow(clippy::too_many_arguments)]
pub fn plan_modality(
    snap: &Snapshot,
    ivf: &Ivf,
    mi: usize,
    c: f32,
    visits: Visits,
    filter: Option<FilterModel>,
    i8: Option<I8Model>,
    l1: &OnceCell<Vec<f32>>,
    exhaustive: bool,
) -> Result<ModalityPlan, EngineError> {
    let t0 = Instant::now();
    let spec = &snap.schema().modalities[mi];
    let m = spec.modality;
    let d = spec.dim;
    if snap.f32_rows(m).is_none() {
        return Err(EngineError::InvalidArgument(format!(
            "no {m} rows in the store"
        )));
    }
    let live = |r: usize| snap.is_present(m, r) && !snap.is_deleted(r);
    let present: Vec<u32> = (0..snap.rows())
        .filter(|&r| live(r))
        .map(|r| r as u32)
        .collect();
    let n = present.len();
    let lists = ivf.lists();
    let brute_products = n as f64 * n.saturating_sub(1) as f64 / 2.0;
    let mut plan = ModalityPlan {
        modality: m.key(),
        cosine: c,
        path: "brute".into(),
        rule: None,
        lists,
        pilot_rows: 0,
        natural_pairs: 0,
        synthetic_pairs: 0,
        mean_probes: 0.0,
        predicted_products: brute_products,
        brute_products,
        predicted_seconds: Vec::new(),
        ivf_rule: None,
        seconds: 0.0,
    };
    choose_without_partition(&mut plan, d, filter, i8);
    if n < 2 || lists < 2 {
        plan.seconds = t0.elapsed().as_secs_f64();
        return Ok(plan);
    }
    let mut pool = present.clone();
    let k = PILOT_ROWS.min(n);
    SplitMix(PILOT_SEED ^ mi as u64).shuffle_prefix(&mut pool, k);
    let members = ivf.member_counts();
    let scale = n as f64 / members.iter().sum::<usize>().max(1) as f64;
    let sample = |rows: &[u32], part: u64| -> Result<PilotSample, EngineError> {
        PilotSample::measure(snap, ivf, mi, c, l1, rows, &present, &members, scale, part)
    };
    // The partition's products are nearer pairs than random ones: its survivors are at least as many per
    // product as a brute-force join's.
    let nearer = filter.map(|f| FilterModel {
        prefix_pass: (f.prefix_pass * IVF_PASS_FACTOR).min(1.0),
        full_pass: (f.full_pass * IVF_PASS_FACTOR).min(1.0),
    });
    let best_other = plan
        .predicted_seconds
        .iter()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min);
    let cheapest = |needs: &[Need], s: &PilotSample| {
        cheapest_rule(needs, &s.sorted_rows, lists, s.rows.len(), n).map(
            |(products, probes, rule)| (join_seconds(products, d, nearer), products, probes, rule),
        )
    };
    // 0. A screen on the first rows of the sample: where the partition already loses by a wide margin on
    // them (every pair of theirs), the rest of the pilot is not run. The pilot's exact search costs
    // `k` × n products, a sizable share of a `--from-row` batch's own join at low cosines; the screen costs
    // a fifth of it. Only the choice of path rests on it (the exact paths it keeps are complete).
    let k1 = PILOT_SCREEN_ROWS.min(k);
    let mut screen = None;
    if !exhaustive && k1 < k {
        let s1 = sample(&pool[..k1], 0)?;
        // At most PILOT_SCREEN_PAIRS of its pairs, evenly spaced (natural and synthetic alike): the rule
        // fewer pairs need is never wider, so this errs towards the partition.
        let stride = s1.owners.len().div_ceil(PILOT_SCREEN_PAIRS).max(1);
        let needs = s1.needs_every(stride, ivf, visits, d);
        let screened = cheapest(&needs, &s1).map(|c| c.0);
        tracing::debug!(
            "{} pilot screen: the partition at {screened:.1?} s on {} of the first {k1} rows' {} pairs, against {best_other:.1} s",
            plan.modality,
            needs.len(),
            s1.owners.len()
        );
        if let Some(secs) = screened
            && secs >= PILOT_SCREEN_MARGIN * best_other
        {
            plan.pilot_rows = k1;
            plan.natural_pairs = s1.natural;
            plan.synthetic_pairs = s1.synthetic;
            plan.predicted_seconds.push(("ivf".into(), secs));
            plan.seconds = t0.elapsed().as_secs_f64();
            tracing::debug!(
                "{} pilot screen: the partition loses; exact search {:.2} s, sample {:.2} s, {:.2} s in all",
                plan.modality,
                s1.search_seconds,
                s1.seconds,
                plan.seconds
            );
            return Ok(plan);
        }
        screen = Some(s1);
    }
    // 1. The pilot sample, its exact pairs, their list scores and synthetic boundary partners (the
    // screen's rows measured once: the rest of the sample extends them).
    let s = match screen {
        Some(s1) => s1.extend(sample(&pool[k1..k], 1)?, d),
        None => sample(&pool[..k], 0)?,
    };
    plan.pilot_rows = k;
    plan.natural_pairs = s.natural;
    plan.synthetic_pairs = s.synthetic;
    let t_search = s.search_seconds;
    let t_sampled = Instant::now();
    // 2. What each pair needs: one pair in SAMPLE_STRIDE first. The rule a subset of the pairs needs is
    // never wider than the rule all of them need (its margin is a maximum over fewer pairs), so its time is
    // a lower bound of the partition's: where that already loses to a path without the partition (an
    // exact join at a low cosine), the other pairs' list scores are not computed and no rule is kept.
    if !exhaustive && s.owners.len().div_ceil(SAMPLE_STRIDE) < s.owners.len() {
        let sub = s.needs_every(SAMPLE_STRIDE, ivf, visits, d);
        if let Some((secs, ..)) = cheapest(&sub, &s)
            && secs >= best_other
        {
            plan.predicted_seconds.push(("ivf".into(), secs));
            plan.seconds = t0.elapsed().as_secs_f64();
            tracing::debug!(
                "{} pilot: exact search {t_search:.2} s; the partition loses on {} of {} pairs already ({secs:.1} s at least against {best_other:.1} s), {:.2} s in all",
                plan.modality,
                sub.len(),
                s.owners.len(),
                plan.seconds
            );
            return Ok(plan);
        }
    }
    let needs = s.needs_every(1, ivf, visits, d);
    let t_needs = t_sampled.elapsed().as_secs_f64();

    // 3. The cheapest rule that reaches every pair, against the paths without the partition.
    if let Some((secs, products, probes, rule)) = cheapest(&needs, &s) {
        plan.predicted_seconds.push(("ivf".into(), secs));
        plan.ivf_rule = Some(rule);
        if secs < best_other {
            plan.path = "ivf".into();
            plan.rule = Some(rule);
            plan.mean_probes = probes;
            plan.predicted_products = products;
        }
    }
    plan.seconds = t0.elapsed().as_secs_f64();
    tracing::debug!(
        "{} pilot: exact search {t_search:.2} s, list scores + synthetic pairs {:.2} s, reach {t_needs:.2} s, rules {:.2} s",
        plan.modality,
        s.seconds - t_search,
        t_sampled.elapsed().as_secs_f64() - t_needs
    );
    Ok(plan)
}

/// What a pilot measured on its sample rows: their exact pairs at the candidate cosine, synthetic boundary
/// partners, and every row's list scores.
struct PilotSample {
    /// The sampled rows, ascending within each measured part (a pair's owner is an index into them).
    rows: Vec<u32>,
    /// Per row, its score against every list (row-major).
    scores: Vec<f32>,
    /// Per row, its home list.
    homes: Vec<u32>,
    /// The partners' vectors: natural partners first, then synthetic ones.
    partner: Vec<f32>,
    /// Per partner, the index of its sampled row.
    owners: Vec<usize>,
    /// Natural pairs kept (at most [`MAX_PILOT_PAIRS`]): the first `natural` partners.
    natural: usize,
    /// Natural pairs found before that cap.
    found: usize,
    /// Synthetic pairs.
    synthetic: usize,
    /// Per row, its list scores best first and the cumulative (scaled) members of those lists.
    sorted_rows: Vec<(Vec<f32>, Vec<f64>)>,
    /// Seconds of the exact search.
    search_seconds: f64,
    /// Seconds in all.
    seconds: f64,
}

impl PilotSample {
    /// Measures `rows` (live rows of modality `mi`) against the `present` rows at cosine `c`; `members`
    /// are the lists' member counts and `scale` the live rows per indexed row; `part` seeds the synthetic
    /// partners apart from another part's of the same pilot.
    #[allow(clippy::too_many_arguments)]
    fn measure(
        snap: &Snapshot,
        ivf: &Ivf,
        mi: usize,
        c: f32,
        l1: &OnceCell<Vec<f32>>,
        rows: &[u32],
        present: &[u32],
        members: &[usize],
        scale: f64,
        part: u64,
    ) -> Result<PilotSample, EngineError> {
        let t0 = Instant::now();
        let m = snap.schema().modalities[mi].modality;
        let view = snap
            .f32_rows(m)
            .ok_or_else(|| EngineError::InvalidArgument(format!("no {m} rows in the store")))?;
        let d = view.dim();
        let k = rows.len();
        let lists = ivf.lists();
        let mut pilot = rows.to_vec();
        pilot.sort_unstable();
        let mut dense = Vec::with_capacity(k * d);
        for &r in &pilot {
            dense.extend_from_slice(view.row(r as usize));
        }
        let skip = |q: u32| !snap.is_present(m, q as usize) || snap.is_deleted(q as usize);
        let mut pairs: Vec<(usize, u32)> =
            pilot_pairs(view, snap.i8_rows(m), l1, &pilot, &dense, c, &skip)?
                .into_iter()
                .filter(|p| pilot[p.a as usize] != p.b)
                .map(|p| (p.a as usize, p.b))
                .collect();
        let found = pairs.len();
        if pairs.len() > MAX_PILOT_PAIRS {
            SplitMix(PILOT_SEED ^ 0x5a5a).shuffle_prefix(&mut pairs, MAX_PILOT_PAIRS);
            pairs.truncate(MAX_PILOT_PAIRS);
        }
        let search_seconds = t0.elapsed().as_secs_f64();
        let mut scores = Vec::new();
        let homes = ivf.homes_and_scores(&dense, k, &mut scores);
        // Partner vectors: natural partners, then synthetic boundary points.
        let mut partner = Vec::with_capacity(pairs.len() * d);
        for &(_, q) in &pairs {
            partner.extend_from_slice(view.row(q as usize));
        }
        let mut owners: Vec<usize> = pairs.iter().map(|p| p.0).collect();
        // Several synthetic partners per pilot row (each leaning towards another store row).
        let reps: Vec<u32> = pilot
            .iter()
            .flat_map(|&r| std::iter::repeat_n(r, SYNTHETIC_PER_PILOT_ROW))
            .collect();
        let (syn, syn_owners) = synthetic_partners(
            view,
            &reps,
            present,
            c,
            PILOT_SEED ^ 0x0b0d_a7e5 ^ mi as u64 ^ part.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let synthetic = syn_owners.len();
        partner.extend_from_slice(&syn);
        owners.extend(syn_owners.into_iter().map(|i| i / SYNTHETIC_PER_PILOT_ROW));
        let sorted_rows: Vec<(Vec<f32>, Vec<f64>)> = (0..k)
            .into_par_iter()
            .map(|i| {
                let s = &scores[i * lists..(i + 1) * lists];
                let mut order: Vec<usize> = (0..lists).collect();
                order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
                let mut cum = Vec::with_capacity(lists + 1);
                cum.push(0.0);
                let mut acc = 0.0;
                for &j in &order {
                    acc += members[j] as f64 * scale;
                    cum.push(acc);
                }
                (order.iter().map(|&j| s[j]).collect(), cum)
            })
            .collect();
        Ok(PilotSample {
            rows: pilot,
            scores,
            homes,
            partner,
            owners,
            natural: pairs.len(),
            found,
            synthetic,
            sorted_rows,
            search_seconds,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// What every `stride`-th pair needs ([`pair_needs`]; natural and synthetic alike, `d` their dimension):
    /// the rule fewer pairs need is never wider than the rule all of them need.
    fn needs_every(&self, stride: usize, ivf: &Ivf, visits: Visits, d: usize) -> Vec<Need> {
        if stride <= 1 {
            return pair_needs(
                ivf,
                &self.scores,
                &self.homes,
                &self.partner,
                &self.owners,
                visits,
            );
        }
        let picked: Vec<usize> = (0..self.owners.len()).step_by(stride).collect();
        let partner: Vec<f32> = picked
            .iter()
            .flat_map(|&p| self.partner[p * d..(p + 1) * d].iter().copied())
            .collect();
        let owners: Vec<usize> = picked.iter().map(|&p| self.owners[p]).collect();
        pair_needs(ivf, &self.scores, &self.homes, &partner, &owners, visits)
    }

    /// This sample followed by `more`, measured on other rows: as if both had been measured at once,
    /// the natural pairs kept at most [`MAX_PILOT_PAIRS`] over both, each sample's share in proportion to
    /// the pairs it found (so the rows of neither weigh more).
    fn extend(self, more: PilotSample, d: usize) -> PilotSample {
        let k1 = self.rows.len();
        let found = self.found + more.found;
        let keep = found.min(MAX_PILOT_PAIRS);
        // Share of the kept pairs from the first sample, by the pairs each found.
        let first = if found == 0 {
            0
        } else {
            ((keep as f64 * self.found as f64 / found as f64).round() as usize).min(self.natural)
        };
        let second = (keep - first).min(more.natural);
        let pick = |n: usize, want: usize, seed: u64| -> Vec<usize> {
            let mut idx: Vec<usize> = (0..n).collect();
            if want < n {
                SplitMix(seed).shuffle_prefix(&mut idx, want);
                idx.truncate(want);
                idx.sort_unstable();
            }
            idx
        };
        let (p1, p2) = (
            pick(self.natural, first, PILOT_SEED ^ 0x5a5b),
            pick(more.natural, second, PILOT_SEED ^ 0x5a5c),
        );
        let mut partner = Vec::with_capacity((p1.len() + p2.len()) * d + self.partner.len());
        let mut owners = Vec::with_capacity(p1.len() + p2.len() + self.synthetic + more.synthetic);
        for &i in &p1 {
            partner.extend_from_slice(&self.partner[i * d..(i + 1) * d]);
            owners.push(self.owners[i]);
        }
        for &i in &p2 {
            partner.extend_from_slice(&more.partner[i * d..(i + 1) * d]);
            owners.push(more.owners[i] + k1);
        }
        partner.extend_from_slice(&self.partner[self.natural * d..]);
        owners.extend_from_slice(&self.owners[self.natural..]);
        partner.extend_from_slice(&more.partner[more.natural * d..]);
        owners.extend(more.owners[more.natural..].iter().map(|&o| o + k1));
        fn cat<T>(mut a: Vec<T>, b: Vec<T>) -> Vec<T> {
            a.extend(b);
            a
        }
        PilotSample {
            rows: cat(self.rows, more.rows),
            scores: cat(self.scores, more.scores),
            homes: cat(self.homes, more.homes),
            partner,
            owners,
            natural: p1.len() + p2.len(),
            found,
            synthetic: self.synthetic + more.synthetic,
            sorted_rows: cat(self.sorted_rows, more.sorted_rows),
            search_seconds: self.search_seconds + more.search_seconds,
            seconds: self.seconds + more.seconds,
        }
    }
}

/// The rule over the grid of fixed depths that reaches every pair of `needs` (each fixed depth widened by
/// a margin that reaches the pairs it alone does not) at the fewest predicted products, with those products
/// (scaled from the `k` pilot rows to `n`) and the mean lists probed; `sorted_rows` holds per pilot row its
/// list scores best first and the cumulative member counts.
fn cheapest_rule(
    needs: &[Need],
    sorted_rows: &[(Vec<f32>, Vec<f64>)],
    lists: usize,
    k: usize,
    n: usize,
) -> Option<(f64, f64, ProbeRule)> {
    let cost = |rule: &ProbeRule| -> (f64, f64) {
        let (mut products, mut probes) = (0.0, 0.0);
        for (sorted, cum) in sorted_rows {
            let cnt = rule.count(sorted);
            products += cum[cnt];
            probes += cnt as f64;
        }
        (products / k as f64 * n as f64, probes / k as f64)
    };
    let mut grid: Vec<usize> = [
        1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320,
        384, 512, 768, 1024, 1536, 2048, 3072, 4096,
    ]
    .into_iter()
    .filter(|&g| g < lists)
    .collect();
    grid.push(lists);
    let mut best: Option<(f64, f64, ProbeRule)> = None;
    for &min in &grid {
        // The margin that reaches every pair `min` alone does not.
        let need = needs
            .iter()
            .filter(|nd| !nd.reached_by(&ProbeRule::fixed(min)))
            .map(|nd| {
                let f = nd.fwd.gap;
                nd.back.map_or(f, |b| f.min(b.gap))
            })
            .fold(None::<f32>, |a, g| Some(a.map_or(g, |a| a.max(g))));
        let margin = need.map_or(0.0, |g| g * (1.0 + MARGIN_SLACK) + MARGIN_PAD);
        let rule = ProbeRule {
            min: ((min as f64 * MIN_SLACK).ceil() as usize).min(lists),
            margin,
            max: lists,
        };
        let (products, probes) = cost(&rule);
        if best.as_ref().is_none_or(|b| products < b.0) {
            best = Some((products, probes, rule));
        }
    }
    best
}

/// Every pair (pilot row `a` — an index into `pilot`, whose rows of `view` `dense` holds —, store row `b`)
/// with exact cosine (`dot_f32`) at least `c`, `b` not skipped, sorted by `(a, b)`: through the i8 codes
/// where the store keeps them (`codes`) and a SIMD kernel runs ([`pilot_pairs_i8`]: 3.5× cheaper than the
/// f32 GEMM with VNNI, 1.3× with AVX2 — BENCHMARKS.md "i8 threshold join"), else [`pilot_pairs_f32`].
/// Both return the same pairs.
fn pilot_pairs(
    view: RowsF32<'_>,
    codes: Option<pacha_index::RowsI8<'_>>,
    l1: &OnceCell<Vec<f32>>,
    pilot: &[u32],
    dense: &[f32],
    c: f32,
    skip: &(dyn Fn(u32) -> bool + Sync),
) -> Result<Vec<pacha_index::Pair>, EngineError> {
    use pacha_index::exact_i8::I8Kernel;
    match codes {
        Some(codes) if I8Kernel::detect() != I8Kernel::Scalar => {
            pilot_pairs_i8(view, codes, l1, pilot, dense, c, skip)
        }
        _ => pilot_pairs_f32(view, dense, c, skip),
    }
}

/// [`pilot_pairs`] by the blocked f32 GEMM join (a small margin below `c`), filtered by `dot_f32`.
fn pilot_pairs_f32(
    view: RowsF32<'_>,
    dense: &[f32],
    c: f32,
    skip: &(dyn Fn(u32) -> bool + Sync),
) -> Result<Vec<pacha_index::Pair>, EngineError> {
    let probe = RowsF32::dense(dense, view.dim())?;
    Ok(
        pacha_index::exact::threshold_join(probe, view, c - 1e-4, None, Some(skip))?
            .into_iter()
            .filter(|p| dot_f32(probe.row(p.a as usize), view.row(p.b as usize)) >= c)
            .collect(),
    )
}

/// [`pilot_pairs`] by the i8 threshold join (every pair scanned through the codes, the rigorous error
/// bound's survivors rescored with `dot_f32`: exact, like the GEMM join). The pilot rows' codes, scales and
/// L1 bounds are copied out of the store's; `l1` holds the store's bounds, computed here if it is empty.
fn pilot_pairs_i8(
    view: RowsF32<'_>,
    codes: pacha_index::RowsI8<'_>,
    l1: &OnceCell<Vec<f32>>,
    pilot: &[u32],
    dense: &[f32],
    c: f32,
    skip: &(dyn Fn(u32) -> bool + Sync),
) -> Result<Vec<pacha_index::Pair>, EngineError> {
    use pacha_index::exact_i8::{QuantRows, threshold_join_i8};
    let d = codes.dim();
    let l1 = l1.get_or_init(|| l1_bounds(codes));
    let mut pcodes: Vec<i8> = Vec::with_capacity(pilot.len() * d);
    let mut pscales = Vec::with_capacity(pilot.len());
    let mut pl1 = Vec::with_capacity(pilot.len());
    for &r in pilot {
        let r = r as usize;
        pcodes.extend_from_slice(codes.row(r));
        pscales.push(codes.scale(r));
        pl1.push(l1[r]);
    }
    let pcodes = pacha_index::RowsI8::new(&pcodes, &pscales, pilot.len(), d, d)?;
    let (pairs, _) = threshold_join_i8(
        QuantRows::new(RowsF32::dense(dense, d)?, pcodes, &pl1)?,
        QuantRows::new(view, codes, l1)?,
        c,
        None,
        Some(skip),
    )?;
    Ok(pairs)
}

/// Sets `plan` to the cheapest of the paths that need no partition — the brute-force sketch join (with a
/// filter), the exact f32 GEMM join and the exact i8 join (with an [`I8Model`]) — and records their
/// predictions.
fn choose_without_partition(
    plan: &mut ModalityPlan,
    d: usize,
    filter: Option<FilterModel>,
    i8: Option<I8Model>,
) {
    let pairs = plan.brute_products;
    let exact = join_seconds(pairs, d, None);
    plan.predicted_seconds.push(("exact".into(), exact));
    let mut best = ("exact", exact);
    if let Some(m) = i8 {
        let s = i8_join_seconds(pairs, d, m);
        plan.predicted_seconds.push(("exact-i8".into(), s));
        if s < best.1 {
            best = ("exact-i8", s);
        }
    }
    if let Some(f) = filter {
        let s = join_seconds(pairs, d, Some(f));
        plan.predicted_seconds.push(("brute".into(), s));
        if s < best.1 {
            best = ("brute", s);
        }
    }
    plan.path = best.0.into();
    plan.rule = None;
    plan.predicted_products = pairs;
}

/// Synthetic boundary partners of `rows` (see the module docs): for each row `x`, `y = c·x + √(1−c²)·w`,
/// `w` the unit part orthogonal to `x` of a seeded random row of `pool`. Returns the partners (dense) and,
/// for each, the index into `rows` of its row.
pub fn synthetic_partners(
    view: RowsF32<'_>,
    rows: &[u32],
    pool: &[u32],
    c: f32,
    seed: u64,
) -> (Vec<f32>, Vec<usize>) {
    let d = view.dim();
    let mut out = Vec::with_capacity(rows.len() * d);
    let mut owners = Vec::with_capacity(rows.len());
    if pool.is_empty() {
        return (out, owners);
    }
    let mut rng = SplitMix(seed);
    let s = (1.0 - f64::from(c).powi(2)).max(0.0).sqrt() as f32;
    for (i, &x) in rows.iter().enumerate() {
        let xv = view.row(x as usize);
        let z = pool[(rng.next_u64() % pool.len() as u64) as usize];
        if z == x {
            continue;
        }
        let zv = view.row(z as usize);
        let proj = dot_f32(xv, zv);
        let mut w: Vec<f32> = zv.iter().zip(xv).map(|(&a, &b)| a - proj * b).collect();
        let norm = dot_f32(&w, &w).sqrt();
        if norm.is_nan() || norm <= 1e-3 {
            continue;
        }
        for v in &mut w {
            *v /= norm;
        }
        out.extend(xv.iter().zip(&w).map(|(&a, &b)| c * a + s * b));
        owners.push(i);
    }
    (out, owners)
}

/// Synthetic boundary evidence for a run's IVF path: of `per_row` synthetic partners at cosine `c` of each
/// of `rows` (an independent seed from the pilot's), how many the run's rule reaches (two-way), and how
/// many there were. The join compares a pair iff one side probes the other's home, so this is the path's
/// reach of such pairs; the sketch stage's drop is bounded separately by its binomial model.
#[allow(clippy::too_many_arguments)]
pub fn synthetic_reach(
    snap: &Snapshot,
    ivf: &Ivf,
    mi: usize,
    c: f32,
    rule: ProbeRule,
    rows: &[u32],
    per_row: usize,
    seed: u64,
) -> (u64, u64) {
    let spec = &snap.schema().modalities[mi];
    let m = spec.modality;
    let Some(view) = snap.f32_rows(m) else {
        return (0, 0);
    };
    let live = |r: usize| snap.is_present(m, r) && !snap.is_deleted(r);
    let rows: Vec<u32> = rows.iter().copied().filter(|&r| live(r as usize)).collect();
    let pool: Vec<u32> = (0..snap.rows())
        .filter(|&r| live(r))
        .map(|r| r as u32)
        .collect();
    let per_row = per_row.max(1);
    // Each row's partners come from a seed of its own, so its evidence is the same in any split of the run.
    let mut partners = Vec::new();
    let mut owners: Vec<usize> = Vec::new();
    for (i, &r) in rows.iter().enumerate() {
        let row_seed = seed ^ u64::from(r).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let (p, o) = synthetic_partners(view, &vec![r; per_row], &pool, c, row_seed);
        partners.extend(p);
        owners.extend(o.into_iter().map(|_| i));
    }
    let mut dense = Vec::with_capacity(rows.len() * spec.dim);
    for &r in &rows {
        dense.extend_from_slice(view.row(r as usize));
    }
    let mut row_scores = Vec::new();
    let row_homes = ivf.homes_and_scores(&dense, rows.len(), &mut row_scores);
    let needs = pair_needs(
        ivf,
        &row_scores,
        &row_homes,
        &partners,
        &owners,
        Visits::TwoWay,
    );
    let reached = needs.iter().filter(|n| n.reached_by(&rule)).count();
    (reached as u64, needs.len() as u64)
}

/// A single-modality join's thresholds per quality band of a pair: a pair is scored in the band of its
/// poorer template ([`crate::fusion::QualityBands`]), and each band reaches the decision at its own cosine
/// ([`crate::fusion::Calibration::band_candidate_cosines`]), so the join rescoring every pair at the lowest
/// band's cosine (the envelope) does work no verdict needs. With a `BandJoin` each product is cut at its
/// own band's cosine and sketch cut; the audit's boundary pairs are taken at the same per-pair cosine.
#[derive(Clone, Debug)]
pub struct BandJoin {
    /// Per snapshot row, the band of its template's quality (0 where the row holds none).
    pub row_band: Vec<u8>,
    /// Per band: its pairs' candidate cosine and staged sketch cut.
    pub classes: Vec<(f32, StagedCut)>,
    /// Per band: the cut choices of the prefix and whole-sketch stages (their predicted drops).
    pub choices: Vec<(CutChoice, CutChoice)>,
    /// Per band: its share of the live pairs (from the live rows' bands), for the planner's cost model.
    pub pair_share: Vec<f64>,
}

impl BandJoin {
    /// The per-band cosines and cuts of modality `mi`'s pairs, or `None` where bands cannot help: the
    /// calibration has no bands for it, a band cannot reach `floor` on this modality alone, or the bands
    /// hold more classes than a join takes. `cut` chooses a band cosine's (prefix, whole-sketch) cuts
    /// (`None`: no sketch filter, and no band join).
    pub fn of(
        snap: &Snapshot,
        cal: &crate::fusion::Calibration,
        mi: usize,
        floor: f64,
        cut: &dyn Fn(f32) -> Option<(CutChoice, CutChoice)>,
    ) -> Option<BandJoin> {
        let m = snap.schema().modalities.get(mi)?.modality;
        let pos = cal.position(m)?;
        let bands = cal.bands(pos)?;
        let cosines: Option<Vec<f32>> =
            cal.band_candidate_cosines(pos, floor).into_iter().collect();
        let cosines = cosines?;
        if cosines.len() < 2 || cosines.len() > pacha_index::ivf::MAX_JOIN_CLASSES {
            return None;
        }
        // Each row's band, counting the live rows per band on the way. A pair's band is the lower of its
        // rows': with `above[k]` live rows in band k or higher, the pairs of band k are those within
        // `above[k]` less those within `above[k + 1]`.
        let mut above = vec![0f64; cosines.len() + 1];
        let row_band: Vec<u8> = (0..snap.rows())
            .map(|r| {
                if !snap.is_present(m, r) {
                    return 0;
                }
                let b = bands.band(snap.quality(m, r)).min(cosines.len() - 1);
                if !snap.is_deleted(r) {
                    above[b] += 1.0;
                }
                b as u8
            })
            .collect();
        for k in (0..cosines.len()).rev() {
            above[k] += above[k + 1];
        }
        let all = (above[0] * above[0]).max(1.0);
        let pair_share = (0..cosines.len())
            .map(|k| (above[k] * above[k] - above[k + 1] * above[k + 1]) / all)
            .collect();
        let choices: Vec<(CutChoice, CutChoice)> =
            cosines.iter().map(|&c| cut(c)).collect::<Option<_>>()?;
        let classes = cosines
            .iter()
            .zip(&choices)
            .map(|(&c, (p, f))| (c, crate::annset::staged_cut(p, f)))
            .collect();
        Some(BandJoin {
            row_band,
            classes,
            choices,
            pair_share,
        })
    }

    /// The candidate cosine of pair `(a, b)`: its band's (the lower of its rows' bands).
    pub fn cosine(&self, a: u32, b: u32) -> f32 {
        let band = |r: u32| self.row_band.get(r as usize).copied().unwrap_or(0);
        let k = usize::from(band(a).min(band(b)));
        self.classes.get(k).map_or(f32::NEG_INFINITY, |c| c.0)
    }

    /// The band cosines, in band order.
    pub fn cosines(&self) -> Vec<f32> {
        self.classes.iter().map(|c| c.0).collect()
    }

    /// The join's view of these thresholds.
    pub fn cuts(&self) -> JoinCuts<'_> {
        JoinCuts {
            row_class: &self.row_band,
            classes: &self.classes,
        }
    }

    /// The sketch stages' predicted impostor pass shares, each band's weighted by its share of the pairs.
    pub fn filter(&self) -> FilterModel {
        let mix = |f: &dyn Fn(&(CutChoice, CutChoice)) -> f64| -> f64 {
            self.choices
                .iter()
                .zip(&self.pair_share)
                .map(|(c, w)| w * f(c))
                .sum()
        };
        FilterModel {
            prefix_pass: mix(&|c| c.0.impostor_pass),
            full_pass: mix(&|c| c.1.impostor_pass),
        }
    }

    /// The largest predicted drop of a pair at its band's cosine through both sketch stages.
    pub fn drop_at_threshold(&self) -> f64 {
        self.choices
            .iter()
            .map(|(p, f)| p.drop_at_threshold + f.drop_at_threshold)
            .fold(0.0, f64::max)
    }
}

/// One modality's candidate structure for a run: the partition re-probed over every row of the snapshot
/// (or the brute-force one-list index), its rows' sign sketches and, past RAM, the i8 rescoring stage.
pub struct RunModality {
    /// The run's partition (`None`: the exact path).
    pub ivf: Option<Ivf>,
    /// Sign sketches of every row of the snapshot (`None`: the exact path, or no filter).
    pub sketches: Option<std::sync::Arc<Sketches>>,
    /// L1 bounds of the rows' i8 codes: the i8 rescoring stage of a sketched join (in RAM too) or past RAM,
    /// and the `"exact-i8"` path.
    pub l1: Option<Vec<f32>>,
    /// How it was chosen.
    pub plan: ModalityPlan,
}

/// The candidate structures of one run, per schema modality (`None`: the modality generates no candidates).
pub struct RunIndex {
    /// Per schema position.
    pub modalities: Vec<Option<RunModality>>,
}

impl RunIndex {
    /// Plans and builds the run's candidate structures for joins at `cosines` over every row of `snap`:
    /// per modality, a pilot against the saved partition (when `ann` has one) picks a probe rule, the
    /// brute-force sketch join or an exact join (f32 GEMM, or the i8 join where the store keeps i8 codes and
    /// `impostors` gives the modality's Gaussian impostor cosine model `(mean, sd)`); `sketches` computes (or
    /// fetches) every row's sign sketch. `probes` are the rows the run joins against their earlier rows
    /// (all rows, or a `--from-row` batch's): the plans' predicted products and seconds are those of its
    /// pairs. Every tile of a run passes the whole run's probes, so tiles plan identically (`merge` checks).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        snap: &Snapshot,
        ann: Option<&AnnSet>,
        probes: Range<usize>,
        cosines: &[Option<f32>],
        filters: &[Option<FilterModel>],
        impostors: &[Option<(f64, f64)>],
        force: Option<&str>,
        sketches: &dyn Fn(usize) -> Result<std::sync::Arc<Sketches>, EngineError>,
    ) -> Result<RunIndex, EngineError> {
        let mut out = Vec::with_capacity(cosines.len());
        for (mi, spec) in snap.schema().modalities.iter().enumerate() {
            let Some(c) = cosines.get(mi).copied().flatten() else {
                out.push(None);
                continue;
            };
            let m = spec.modality;
            let Some(view) = snap.f32_rows(m) else {
                out.push(None);
                continue;
            };
            let live = |r: usize| snap.is_present(m, r) && !snap.is_deleted(r);
            let saved = ann.and_then(|a| a.ivf(mi));
            let filter = filters.get(mi).copied().flatten();
            let i8 = impostors
                .get(mi)
                .copied()
                .flatten()
                .and_then(|imp| I8Model::of(snap, mi, c, imp));
            // The codes' L1 bounds, computed at most once: by the pilot's i8 join if it runs, and kept for
            // the run if its path or the store's size needs them.
            let l1 = OnceCell::new();
            let plan = match saved {
                Some(ivf) => plan_modality(
                    snap,
                    ivf,
                    mi,
                    c,
                    Visits::TwoWay,
                    filter,
                    i8,
                    &l1,
                    force == Some("ivf"),
                )?,
                None => {
                    let n = (0..snap.rows()).filter(|&r| live(r)).count() as f64;
                    let mut plan = ModalityPlan {
                        modality: m.key(),
                        cosine: c,
                        path: String::new(),
                        rule: None,
                        lists: 1,
                        pilot_rows: 0,
                        natural_pairs: 0,
                        synthetic_pairs: 0,
                        mean_probes: 1.0,
                        predicted_products: 0.0,
                        brute_products: n * (n - 1.0).max(0.0) / 2.0,
                        predicted_seconds: Vec::new(),
                        ivf_rule: None,
                        seconds: 0.0,
                    };
                    choose_without_partition(&mut plan, spec.dim, filter, i8);
                    plan
                }
            };
            let mut plan = plan;
            plan.restrict_to(probes.clone(), snap.rows());
            match force {
                Some("ivf") => match plan.ivf_rule {
                    Some(rule) => {
                        plan.path = "ivf".into();
                        plan.rule = Some(rule);
                    }
                    None => {
                        return Err(EngineError::InvalidArgument(format!(
                            "{}: the ivf path needs a saved index (run `pacha index`)",
                            plan.modality
                        )));
                    }
                },
                Some("exact-i8") if snap.i8_rows(m).is_none() => {
                    return Err(EngineError::InvalidArgument(format!(
                        "{}: the exact-i8 path needs the store's i8 codes of this modality",
                        plan.modality
                    )));
                }
                Some(p @ ("brute" | "exact" | "exact-i8")) => {
                    plan.path = p.to_string();
                    plan.rule = None;
                }
                Some(p) => {
                    return Err(EngineError::InvalidArgument(format!(
                        "unknown candidate path {p:?} (ivf, brute, exact or exact-i8)"
                    )));
                }
                None => {}
            }
            let ivf = match (saved, plan.rule, plan.path.as_str()) {
                (Some(saved), Some(rule), "ivf") => {
                    Some(saved.reprobe(view, &live, rule, &snap.f32_pager(m))?)
                }
                (_, _, "brute") => Some(Ivf::brute(snap.rows(), spec.dim, &live)?),
                _ => None,
            };
            // The i8 stage also serves a sketched join in RAM: its survivors are scored from the 4× smaller
            // codes, and only those the codes' error bound cannot reject are read in f32.
            let l1 = match (
                snap.past_ram() || matches!(plan.path.as_str(), "exact-i8" | "brute" | "ivf"),
                snap.i8_rows(m),
            ) {
                (true, Some(codes)) => Some(l1.into_inner().unwrap_or_else(|| l1_bounds(codes))),
                _ => None,
            };
            tracing::info!(
                "{}: candidate path {} at cosine {c:.4} (rule {:?}, {:.3e} predicted products, pilot {} natural + {} synthetic pairs, {:.2} s)",
                plan.modality,
                plan.path,
                plan.rule,
                plan.predicted_products,
                plan.natural_pairs,
                plan.synthetic_pairs,
                plan.seconds
            );
            let sketches = match (&ivf, filter) {
                (Some(_), Some(_)) => Some(sketches(mi)?),
                _ => None,
            };
            out.push(Some(RunModality {
                ivf,
                sketches,
                l1,
                plan,
            }));
        }
        Ok(RunIndex { modalities: out })
    }

    /// The plans, per schema modality.
    pub fn plans(&self) -> Vec<ModalityPlan> {
        self.modalities
            .iter()
            .flatten()
            .map(|m| m.plan.clone())
            .collect()
    }

    /// True iff modality `mi` runs a join of this index (false: an exact path or no candidates).
    pub fn joins(&self, mi: usize) -> bool {
        matches!(self.modalities.get(mi), Some(Some(rm)) if rm.ivf.is_some())
    }

    /// The codes' L1 bounds of modality `mi` when its plan is the exact i8 join (`None`: another path).
    pub fn exact_i8(&self, mi: usize) -> Option<&[f32]> {
        match self.modalities.get(mi) {
            Some(Some(rm)) if rm.plan.path == "exact-i8" => rm.l1.as_deref(),
            _ => None,
        }
    }

    /// Pairs `(q, p, cosine)`, `q < p`, `p` in `probes`, both live and present, cosine ≥ `t`, that the
    /// run's candidate path of modality `mi` reaches and `accept` keeps. With `cut`, products are filtered
    /// by sign sketch (rescored exactly), at each pair's band cosine and cut where `bands` gives them
    /// (`t` and `cut` are then the lowest band's); without, scored by f32 GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &self,
        snap: &Snapshot,
        mi: usize,
        probes: Range<usize>,
        t: f32,
        cut: Option<StagedCut>,
        bands: Option<&BandJoin>,
        accept: &(dyn Fn(u32, u32, f32) -> bool + Sync),
    ) -> Result<(Vec<JoinPair>, JoinStats), EngineError> {
        let (Some(Some(rm)), Some(view)) = (
            self.modalities.get(mi),
            snap.f32_rows(snap.schema().modalities[mi].modality),
        ) else {
            return Ok((Vec::new(), JoinStats::default()));
        };
        let Some(ivf) = &rm.ivf else {
            return Ok((Vec::new(), JoinStats::default()));
        };
        match (cut, &rm.sketches) {
            (Some(cut), Some(sketches)) => {
                let quant = match (&rm.l1, snap.i8_rows(snap.schema().modalities[mi].modality)) {
                    (Some(l1), Some(codes)) => Some(QuantStage::new(codes, l1)?),
                    _ => None,
                };
                let class = (t, cut);
                let cuts = bands.map_or(JoinCuts::uniform(&class), BandJoin::cuts);
                Ok(ivf.self_join_rows_sketched_with(view, sketches, quant, probes, cuts, accept)?)
            }
            _ => {
                let mut pairs = ivf.self_join_rows(view, probes, t)?;
                let stats = JoinStats {
                    above: pairs.len() as u64,
                    ..JoinStats::default()
                };
                pairs.retain(|&(a, b, s)| accept(a, b, s));
                Ok((pairs, stats))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Engine;
    use crate::Modality;
    use crate::store::{Enrolment, ModalitySpec, Schema, Template};

    /// A batch of the last 10 % of rows predicts 19 % of the whole self-join's pairs; the whole run all.
    #[test]
    fn plans_restricted_to_a_batch_predict_its_share_of_pairs() {
        let plan = |path: &str| ModalityPlan {
            modality: "face".into(),
            cosine: 0.5,
            path: path.into(),
            rule: None,
            lists: 1,
            pilot_rows: 0,
            natural_pairs: 0,
            synthetic_pairs: 0,
            mean_probes: 0.0,
            predicted_products: 4e9,
            brute_products: 5e9,
            predicted_seconds: vec![("exact".into(), 10.0), ("brute".into(), 2.0)],
            ivf_rule: None,
            seconds: 0.0,
        };
        let mut whole = plan("brute");
        whole.restrict_to(0..100_000, 100_000);
        assert_eq!(whole, plan("brute"));
        let mut batch = plan("brute");
        batch.restrict_to(90_000..100_000, 100_000);
        assert!((batch.brute_products - 0.19 * 5e9).abs() < 1.0);
        assert!((batch.predicted_products - 0.19 * 4e9).abs() < 1.0);
        assert!((batch.predicted_seconds[0].1 - 1.9).abs() < 1e-9);
        assert!((batch.predicted_seconds[1].1 - 0.38).abs() < 1e-9);
        assert_eq!(batch.path, "brute");
        // A tile of the first half: a quarter of the pairs.
        let mut tile = plan("brute");
        tile.restrict_to(0..50_000, 100_000);
        assert!((tile.brute_products - 0.25 * 5e9).abs() < 1.0);
    }

    /// A 64-d face store of 3 000 rows in `dir`: random unit rows, every third a near pair (cosine ≈ 0.3–0.9)
    /// of the row before it; with the rows.
    fn near_pairs_store(dir: &std::path::Path) -> (Engine, Vec<Vec<f32>>) {
        let d = 64;
        let schema = Schema {
            modalities: vec![ModalitySpec {
                modality: Modality::Face,
                dim: d,
            }],
        };
        let engine = Engine::create(dir, schema).unwrap();
        let mut rng = SplitMix(7);
        let unit = |v: Vec<f32>| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for i in 0..3000 {
            let noise = unit((0..d).map(|_| rng.normal() as f32).collect());
            let v = if i % 3 == 1 {
                // A near pair of the previous row, at cosine about 0.3–0.9.
                let w = 0.3 + 0.6 * (rng.below(1000) as f32 / 1000.0);
                unit(
                    rows[i - 1]
                        .iter()
                        .zip(&noise)
                        .map(|(a, b)| w * a + (1.0 - w) * b)
                        .collect(),
                )
            } else {
                noise
            };
            rows.push(v);
        }
        let batch: Vec<Enrolment> = rows
            .iter()
            .enumerate()
            .map(|(i, v)| Enrolment {
                subject_id: format!("S{i}"),
                templates: vec![Template {
                    modality: Modality::Face,
                    vector: v.clone(),
                    quality: 0.9,
                }],
            })
            .collect();
        engine.insert_batch(&batch).unwrap();
        (engine, rows)
    }

    /// The pilot's two exact searches (i8 join, f32 GEMM join) return the same pairs, on a store of
    /// random rows with near pairs planted at cosines spread around the pilot's cosine.
    #[test]
    fn pilot_pairs_by_i8_codes_equal_those_by_f32_gemm() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, rows) = near_pairs_store(dir.path());
        let snap = engine.snapshot();
        let view = snap.f32_rows(Modality::Face).unwrap();
        let codes = snap
            .i8_rows(Modality::Face)
            .expect("the store keeps i8 codes");
        let pilot: Vec<u32> = (0..3000).step_by(7).collect();
        let mut dense = Vec::new();
        for &r in &pilot {
            dense.extend_from_slice(&rows[r as usize]);
        }
        let skip = |q: u32| q % 11 == 5;
        for c in [0.35f32, 0.5, 0.7] {
            let key = |p: &pacha_index::Pair| (p.a, p.b);
            let a: Vec<(u32, u32)> =
                pilot_pairs_i8(view, codes, &OnceCell::new(), &pilot, &dense, c, &skip)
                    .unwrap()
                    .iter()
                    .map(key)
                    .collect();
            let b: Vec<(u32, u32)> = pilot_pairs_f32(view, &dense, c, &skip)
                .unwrap()
                .iter()
                .map(key)
                .collect();
            assert!(a.len() > 20, "cosine {c}: only {} pairs", a.len());
            assert!(a.iter().all(|&(_, q)| q % 11 != 5), "a skipped row paired");
            assert_eq!(a, b, "cosine {c}");
            // The caller's L1 bounds (the run's, computed once) give the same pairs, and an empty cell is
            // filled with the store's bounds.
            let filled = OnceCell::new();
            pilot_pairs_i8(view, codes, &filled, &pilot, &dense, c, &skip).unwrap();
            assert_eq!(filled.get(), Some(&l1_bounds(codes)), "cosine {c}");
            let given: Vec<(u32, u32)> =
                pilot_pairs_i8(view, codes, &filled, &pilot, &dense, c, &skip)
                    .unwrap()
                    .iter()
                    .map(key)
                    .collect();
            assert_eq!(given, a, "cosine {c}");
        }
    }

    /// A pilot measured as its screen plus the rest (each part's rows searched once) is the pilot measured
    /// at once: the same rows, list scores and pairs found; every kept natural pair a real one (its partner
    /// a store row at the cosine), and where the pairs exceed the cap, each part keeps its share in
    /// proportion to the pairs it found.
    #[test]
    fn a_pilot_extended_from_its_screen_keeps_real_pairs_in_proportion() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _) = near_pairs_store(dir.path());
        engine.build_index(&Default::default(), None).unwrap();
        let ann = engine.index().unwrap();
        let ivf = ann.ivf(0).expect("a face partition");
        let snap = engine.snapshot();
        let present: Vec<u32> = (0..3000).collect();
        let members = ivf.member_counts();
        let lists = ivf.lists();
        let l1 = OnceCell::new();
        let mut pool = present.clone();
        SplitMix(3).shuffle_prefix(&mut pool, PILOT_ROWS);
        let (k, k1) = (PILOT_ROWS, PILOT_SCREEN_ROWS);
        // 0.5: a few pairs per row, under the cap; 0.05: about 45 % of all pairs, over it.
        for c in [0.5f32, 0.05] {
            let measure = |r: &[u32], part| {
                PilotSample::measure(&snap, ivf, 0, c, &l1, r, &present, &members, 1.0, part)
                    .unwrap()
            };
            let whole = measure(&pool[..k], 0);
            let (s1, s2) = (measure(&pool[..k1], 0), measure(&pool[k1..k], 1));
            let (found1, syn) = (s1.found, s1.synthetic + s2.synthetic);
            let e = s1.extend(s2, 64);
            let mut a = e.rows.clone();
            a.sort_unstable();
            assert_eq!(a, whole.rows, "cosine {c}");
            assert_eq!(e.found, whole.found, "cosine {c}");
            assert_eq!(e.natural, whole.found.min(MAX_PILOT_PAIRS), "cosine {c}");
            assert_eq!(e.synthetic, syn);
            assert_eq!(e.owners.len(), e.natural + e.synthetic);
            assert_eq!(e.partner.len(), e.owners.len() * 64);
            for (i, &r) in e.rows.iter().enumerate() {
                let j = whole.rows.binary_search(&r).unwrap();
                assert_eq!(
                    e.scores[i * lists..(i + 1) * lists],
                    whole.scores[j * lists..(j + 1) * lists]
                );
                assert_eq!(e.homes[i], whole.homes[j]);
            }
            let view = snap.f32_rows(Modality::Face).unwrap();
            for (p, &o) in e.owners[..e.natural].iter().enumerate() {
                let v = &e.partner[p * 64..(p + 1) * 64];
                let own = view.row(e.rows[o] as usize);
                let cos: f32 = v.iter().zip(own).map(|(x, y)| x * y).sum();
                assert!(cos >= c - 1e-3, "cosine {c}: pair {p} at {cos}");
                if p % 97 == 0 {
                    assert!(
                        (0..view.rows()).any(|q| view.row(q) == v),
                        "cosine {c}: partner {p} is no store row"
                    );
                }
            }
            if whole.found > MAX_PILOT_PAIRS {
                let first = e.owners[..e.natural].iter().filter(|&&o| o < k1).count();
                let want = (MAX_PILOT_PAIRS as f64 * found1 as f64 / whole.found as f64).round();
                assert_eq!(first as f64, want, "cosine {c}");
            } else {
                assert!(c > 0.3, "the low cosine should exceed the cap");
            }
        }
    }
}
