//! Batch deduplication: every pair of enrolments whose fused score passes the threshold, clustered.
//!
//! ## How a run works
//! The work is a list of **blocks**: probe rows `[p0, p1)` against the gallery rows `[0, p1)` that come
//! before each probe (each unordered pair is compared once, from its later row). For every block:
//! 1. *candidates*, per modality: all pairs whose cosine reaches that modality's candidate cosine (derived
//!    from the fused threshold by pigeonhole, so no pair that can pass is dropped — see [`crate::fusion`]),
//!    from exact blocked GEMM or from the ANN index plus an exact scan of rows the index does not cover;
//! 2. *scoring*: the union of candidates is rescored exactly in f32 on every modality both records have,
//!    fused, and kept when its calibrated score reaches the report floor (default: the threshold).
//!
//! A run may be split into **tiles** ([`TileSpec`], contiguous probe-row shares of equal pair work) run as
//! independent processes ([`run_part`]) and merged ([`assemble`]); a single process is the one-tile case of
//! the same code, so the result is the same for any split and thread count. Inside a part, probe rows are
//! taken in **blocks** (`block_rows`), each checkpointed when finished (resumable: an interrupted part
//! restarts from its last finished block and produces the same output).

use crate::annset::SketchFilter;
use crate::audit::{Audit, AuditOptions, AuditPart, Recorder};
use crate::candidates::{self, CandidateMode};
use crate::fusedbound::FusedBound;
use crate::fusion::{Calibration, threshold_for_fpir};
use crate::identity::{RunIdentity, run_identity};
use crate::joint::{JointInfo, JointPlan};
use crate::matcher::{Comparison, compare_rows, fused_rows};
use crate::policy::{BandJoin, FilterModel, ModalityPlan, RunIndex};
use crate::store::Snapshot;
use crate::{AnnSet, EngineError};
use pacha_datasets::Modality;
use pacha_index::ivf::JoinStats;
use pacha_index::sketch::{CutChoice, CutPolicy, choose_cut};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Most tiles of an index-mode run (see `run`): each tile's join re-reads every list's earlier visitors.
const INDEX_TILES: usize = 4;

/// Which pairs a run considers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DedupScope {
    /// Every live enrolment against every other.
    WholeStore,
    /// Rows `from..` (a newly inserted batch) against the whole store and against each other.
    RowsFrom(usize),
}

/// Options of a dedup run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DedupOptions {
    /// Target false-positive identification rate per probe; the threshold is `FMR = FPIR / N`.
    pub target_fpir: f64,
    /// Which pairs to consider.
    pub scope: DedupScope,
    /// How candidates are generated.
    pub mode: CandidateMode,
    /// Probe rows per tile (index runs: at least a quarter of the probe rows, see `INDEX_TILES`).
    pub block_rows: usize,
    /// Also report pairs down to this calibrated score (for evaluation); `None` = the threshold.
    pub report_floor: Option<f64>,
    /// A directory for checkpoints: finished tiles are saved there and reused by a restarted run.
    pub checkpoint_dir: Option<PathBuf>,
    /// Sign-sketch pre-filter of the index join (`None` scores every IVF product with f32 GEMM). The cut per
    /// modality follows from the calibration's models and the candidate cosine ([`choose_cut`]); the
    /// choice and its predicted drop rates are reported in [`DedupSummary::sketch_cuts`].
    pub sketch: Option<CutPolicy>,
    /// Index mode only: the share of genuine pairs (under the calibration's genuine models) that the
    /// per-modality candidate cosines may leave to chance, in exchange for higher cosines and a cheaper
    /// multi-modal join ([`Calibration::candidate_cosines_relaxed`]). 0 (the default) keeps the complete
    /// budgets, which the completeness contract needs; exact mode always does. A relaxed run gives up
    /// fused hits with middling evidence in every modality — its audit measures how many.
    pub genuine_miss: f64,
    /// The completeness audit of index-mode runs ([`crate::audit`]).
    #[serde(default)]
    pub audit: AuditOptions,
    /// Index mode: force every candidate modality onto one path (`"ivf"`, `"brute"`, `"exact"` or `"exact-i8"`) instead
    /// of the planner's choice (for tests and measurements; `"ivf"` needs a saved index).
    #[serde(default)]
    pub force_path: Option<String>,
    /// Run only this tile of the probe rows ([`run_part`]; `None`: the whole run).
    #[serde(default)]
    pub tile: Option<TileSpec>,
    /// Index mode: compute every row's sign sketches in this run instead of reading the index's saved ones
    /// for the rows it covers (measurements and tests: the results are identical).
    #[serde(default)]
    pub recompute_sketches: bool,
}

/// The sketch cut policy of the contract: every cut is the complete one (a pair at the candidate cosine is
/// dropped with probability ≤ 1e-6 per stage), whatever the impostor load.
pub fn complete_cuts() -> CutPolicy {
    CutPolicy {
        impostor_budget: 1.0,
        genuine_drop: 0.0,
        genuine_drop_multimodal: 0.0,
        ..CutPolicy::default()
    }
}

impl Default for DedupOptions {
    fn default() -> Self {
        DedupOptions {
            target_fpir: crate::fusion::DEFAULT_FPIR,
            scope: DedupScope::WholeStore,
            mode: CandidateMode::Auto,
            block_rows: 8192,
            report_floor: None,
            checkpoint_dir: None,
            sketch: Some(complete_cuts()),
            genuine_miss: 0.0,
            audit: AuditOptions::default(),
            force_path: None,
            tile: None,
            recompute_sketches: false,
        }
    }
}

/// A reported pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DedupPair {
    /// Subject ID of the earlier row.
    pub a: String,
    /// Subject ID of the later row.
    pub b: String,
    /// Row of `a` in the snapshot.
    pub row_a: u32,
    /// Row of `b` in the snapshot.
    pub row_b: u32,
    /// Per-modality evidence and the fused score.
    pub comparison: Comparison,
}

impl DedupPair {
    /// The calibrated fused score.
    pub fn score(&self) -> f64 {
        self.comparison.fused.score
    }
}

/// Progress of a run, for progress bars.
#[derive(Clone, Copy, Debug)]
pub struct DedupProgress {
    /// Probe rows finished.
    pub done: usize,
    /// Probe rows in the run.
    pub total: usize,
    /// Pairs reported so far.
    pub pairs: usize,
}

/// Counts and timings of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DedupSummary {
    /// Live records in the snapshot.
    pub records: usize,
    /// Probe rows in the run.
    pub probes: usize,
    /// Candidate generation used.
    pub mode: String,
    /// Decision threshold on the calibrated scale.
    pub threshold: f64,
    /// Per-modality candidate cosines used.
    pub candidate_cosines: Vec<(String, Option<f32>)>,
    /// Genuine-miss allowance the candidate cosines were relaxed by (0: complete budgets).
    #[serde(default)]
    pub genuine_miss: f64,
    /// Per-modality sign-sketch cuts of the index join's first stage (512-bit prefix; `None`: no filter).
    pub sketch_cuts: Vec<(String, Option<CutChoice>)>,
    /// Per-modality cuts of the second stage (the whole 1024-bit sketch, survivors of the first only; would
    /// equal `sketch_cuts` if the sketch had one stage, `SKETCH_BITS == SKETCH_PREFIX_BITS`).
    #[serde(default)]
    pub sketch_full_cuts: Vec<(String, Option<CutChoice>)>,
    /// Per modality joined at a cosine per quality band of the pair ([`crate::policy::BandJoin`]): the band
    /// cosines, lowest band first (`candidate_cosines` and the sketch cuts above are then the lowest's).
    #[serde(default)]
    pub band_cosines: Vec<(String, Vec<f32>)>,
    /// Candidate pairs: per modality, the pairs whose exact cosine reached its candidate cosine (a pair found
    /// by two modalities counts twice).
    pub candidate_pairs: u64,
    /// Per-modality work counters of the sketched index join (zero on other paths).
    #[serde(default)]
    pub join_stats: Vec<(String, JoinStats)>,
    /// Pairs at or above the report floor.
    pub reported_pairs: usize,
    /// Pairs at or above the threshold.
    pub hits: usize,
    /// Duplicate groups (clusters of ≥ 2 enrolments).
    pub clusters: usize,
    /// Tiles reused from checkpoints.
    pub tiles_resumed: usize,
    /// Seconds spent generating candidates.
    pub candidate_seconds: f64,
    /// Seconds spent rescoring and fusing.
    pub scoring_seconds: f64,
    /// Wall-clock seconds of the whole run.
    pub total_seconds: f64,
    /// Probe records per second.
    pub records_per_second: f64,
    /// Histogram of reported calibrated scores: (bin lower edge, count), bins of 5 points.
    pub score_histogram: Vec<(f64, usize)>,
    /// Per candidate modality, how the index path was chosen (index mode only).
    #[serde(default)]
    pub plans: Vec<ModalityPlan>,
    /// Seconds spent planning and preparing the candidate index (pilots, re-probing, sketches).
    #[serde(default)]
    pub prepare_seconds: f64,
    /// Seconds of `prepare_seconds` spent making the sign sketches (reading the saved ones, computing the
    /// rest).
    #[serde(default)]
    pub sketch_seconds: f64,
    /// Per modality whose join filters by sign sketch: where its rows' sketches came from (for a merge, the
    /// first tile's: every tile prepares every row).
    #[serde(default)]
    pub sketch_rows: Vec<SketchRows>,
    /// The completeness audit (index mode with auditing on).
    #[serde(default)]
    pub audit: Option<Audit>,
    /// The joint path, when the run scanned its fused modalities together ([`crate::joint`]).
    #[serde(default)]
    pub joint: Option<JointInfo>,
    /// What the run was derived from.
    #[serde(default)]
    pub identity: RunIdentity,
    /// Where the score models came from (`calibrate`, or fitted from the store for this run).
    #[serde(default)]
    pub calibration_source: String,
}

/// The result of a run: pairs sorted by (row_a, row_b), clusters, and a summary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DedupResult {
    /// Decision threshold on the calibrated scale.
    pub threshold: f64,
    /// Every pair at or above the report floor, sorted by (row_a, row_b).
    pub pairs: Vec<DedupPair>,
    /// Duplicate groups over the hits (pairs ≥ threshold), each sorted by row; sorted by first row.
    pub clusters: Vec<Vec<String>>,
    /// Counts and timings.
    pub summary: DedupSummary,
}

impl DedupResult {
    /// The pairs at or above the threshold.
    pub fn hits(&self) -> impl Iterator<Item = &DedupPair> {
        self.pairs
            .iter()
            .filter(move |p| p.score() >= self.threshold)
    }
}

/// Everything a run needs besides its options.
pub struct DedupContext<'a> {
    /// The committed snapshot to deduplicate.
    pub snapshot: &'a Snapshot,
    /// Score models.
    pub calibration: &'a Calibration,
    /// ANN indexes, if built.
    pub ann: Option<&'a AnnSet>,
    /// Called after every tile.
    pub progress: Option<&'a (dyn Fn(DedupProgress) + Sync)>,
    /// Set to stop the run after the current tile (finished tiles stay checkpointed).
    pub cancel: Option<&'a AtomicBool>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct CheckpointKey {
    version: String,
    identity: RunIdentity,
    generation: u64,
    commit_seq: u64,
    threshold_bits: u64,
    floor_bits: u64,
    scope: DedupScope,
    mode: String,
    block_rows: usize,
    audit: AuditOptions,
    force_path: Option<String>,
    tile: TileSpec,
}

/// A deterministic share of a run's probe rows: tile `index` of `count` (0-based). A run split into `count`
/// tiles runs as `count` independent processes (any machines that can read the store), each writing a
/// [`RunPart`]; [`assemble`] merges the parts into the result a single process gives, whatever `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileSpec {
    /// This tile, `0..count`.
    pub index: usize,
    /// Tiles the run is split into.
    pub count: usize,
}

/// Most tiles a run may be split into.
pub const MAX_TILES: usize = 1 << 20;

impl TileSpec {
    /// The whole run as one tile.
    pub const WHOLE: TileSpec = TileSpec { index: 0, count: 1 };

    /// Tile `index` of `count`; an error unless `index < count ≤ MAX_TILES`.
    pub fn new(index: usize, count: usize) -> Result<TileSpec, EngineError> {
        if count == 0 || count > MAX_TILES || index >= count {
            return Err(EngineError::InvalidArgument(format!(
                "tile {index}/{count}: need 0 <= I < N <= {MAX_TILES} (tiles are numbered from 0)"
            )));
        }
        Ok(TileSpec { index, count })
    }

    /// This tile's probe rows within `range`: contiguous shares of equal pair work. A probe row `r` is
    /// compared with the `r` rows before it, so the work up to row `x` grows as `x²` and the boundaries
    /// follow its square root.
    pub fn rows(&self, range: Range<usize>) -> Range<usize> {
        let edge = |i: usize| -> usize {
            if i == 0 {
                return range.start;
            }
            if i >= self.count {
                return range.end;
            }
            let (s, e) = (range.start as f64, range.end as f64);
            let x = (s * s + (e * e - s * s) * i as f64 / self.count as f64).sqrt();
            (x.round() as usize).clamp(range.start, range.end)
        };
        edge(self.index)..edge(self.index + 1)
    }
}

impl std::fmt::Display for TileSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for TileSpec {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            EngineError::InvalidArgument(format!(
                "tile {s:?} is not I/N (tile I of N, numbered from 0, e.g. 0/4)"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse::<usize>().map_err(|_| bad())?;
        let n = n.trim().parse::<usize>().map_err(|_| bad())?;
        TileSpec::new(i, n)
    }
}

/// What every part of one run shares: the run's inputs, parameters and everything derived from them before
/// any tile starts. Parts of one run have equal setups; [`assemble`] refuses parts whose setups differ.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSetup {
    /// pacha version that ran the part.
    pub version: String,
    /// What the run was derived from.
    pub identity: RunIdentity,
    /// Where the score models came from.
    pub calibration_source: String,
    /// The run's parameters (everything of [`DedupOptions`] that shapes its output).
    pub parameters: RunParameters,
    /// Rows of the snapshot.
    pub rows: usize,
    /// Live records of the snapshot.
    pub records: usize,
    /// First probe row of the run.
    pub first_probe: usize,
    /// Decision threshold.
    pub threshold: f64,
    /// Report floor.
    pub floor: f64,
    /// Candidate generation used (with `+sketch` when a filter runs).
    pub mode: String,
    /// Genuine-miss allowance used.
    pub genuine_miss: f64,
    /// Per-modality candidate cosines.
    pub candidate_cosines: Vec<(String, Option<f32>)>,
    /// Per-modality first-stage sketch cuts.
    pub sketch_cuts: Vec<(String, Option<CutChoice>)>,
    /// Per-modality second-stage sketch cuts.
    pub sketch_full_cuts: Vec<(String, Option<CutChoice>)>,
    /// Per modality joined per quality band: the band cosines.
    #[serde(default)]
    pub band_cosines: Vec<(String, Vec<f32>)>,
    /// Audit: the construction bound (no partition on any candidate modality): (bound, why).
    pub construction: Option<(f64, String)>,
    /// The joint path of the run ([`crate::joint`]; `None`: modality by modality).
    #[serde(default)]
    pub joint: Option<JointInfo>,
    /// Audit: rows sampled over the whole run (0: no audit).
    pub audit_sampled: usize,
}

/// The parameters of a run that shape its output (not where it checkpoints or which tile it runs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunParameters {
    /// See [`DedupOptions::target_fpir`].
    pub target_fpir: f64,
    /// See [`DedupOptions::scope`].
    pub scope: DedupScope,
    /// See [`DedupOptions::mode`] (as requested).
    pub mode: CandidateMode,
    /// See [`DedupOptions::block_rows`].
    pub block_rows: usize,
    /// See [`DedupOptions::report_floor`].
    pub report_floor: Option<f64>,
    /// See [`DedupOptions::sketch`].
    pub sketch: Option<CutPolicy>,
    /// See [`DedupOptions::genuine_miss`].
    pub genuine_miss: f64,
    /// See [`DedupOptions::audit`].
    pub audit: AuditOptions,
    /// See [`DedupOptions::force_path`].
    pub force_path: Option<String>,
}

impl RunParameters {
    /// The output-shaping parameters of `opts`.
    pub fn of(opts: &DedupOptions) -> RunParameters {
        RunParameters {
            target_fpir: opts.target_fpir,
            scope: opts.scope.clone(),
            mode: opts.mode,
            block_rows: opts.block_rows,
            report_floor: opts.report_floor,
            sketch: opts.sketch,
            genuine_miss: opts.genuine_miss,
            audit: opts.audit.clone(),
            force_path: opts.force_path.clone(),
        }
    }
}

/// Where one modality's sign sketches came from in a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SketchRows {
    /// Modality key.
    pub modality: String,
    /// Rows read from the index's saved sketches.
    pub saved: usize,
    /// Rows sketched by the run (rows committed after the index, or every row without saved sketches).
    pub computed: usize,
}

/// Timings of one part (never compared between parts).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PartTimings {
    /// Planning and preparing the candidate index.
    pub prepare_seconds: f64,
    /// Of which making the sign sketches.
    #[serde(default)]
    pub sketch_seconds: f64,
    /// Generating candidates.
    pub candidate_seconds: f64,
    /// Rescoring and fusing.
    pub scoring_seconds: f64,
    /// The whole part.
    pub total_seconds: f64,
}

/// One tile's share of a run: its pairs, counters, audit evidence and the setup it ran under.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunPart {
    /// Which tile.
    pub tile: TileSpec,
    /// Its probe rows `[start, end)`.
    pub probe_rows: (usize, usize),
    /// The run's shared setup.
    pub setup: RunSetup,
    /// Per candidate modality, how its path was chosen (equal in every part but for the pilot's seconds).
    pub plans: Vec<ModalityPlan>,
    /// Pairs at or above the floor whose later row is one of this part's probe rows, sorted by rows.
    #[serde(skip)]
    pub pairs: Vec<DedupPair>,
    /// `pairs.len()` (kept when the pairs travel in another file).
    pub pair_count: usize,
    /// Candidate pairs (see [`DedupSummary::candidate_pairs`]).
    pub candidate_pairs: u64,
    /// Per-modality work counters of the index join.
    pub join_stats: Vec<(String, JoinStats)>,
    /// Where each sketched modality's sketches came from.
    #[serde(default)]
    pub sketch_rows: Vec<SketchRows>,
    /// Checkpointed blocks reused.
    pub tiles_resumed: usize,
    /// Timings.
    pub timings: PartTimings,
    /// Audit evidence of the sampled rows among this part's probes (`None`: no audit).
    pub audit: Option<AuditPart>,
}

/// Runs a dedup over the snapshot in `ctx`: the whole run in one process ([`run_part`] of
/// [`TileSpec::WHOLE`], then [`assemble`]; `opts.tile` must be unset or `0/1`).
pub fn run(ctx: &DedupContext<'_>, opts: &DedupOptions) -> Result<DedupResult, EngineError> {
    if opts.tile.is_some_and(|t| t.count != 1) {
        return Err(EngineError::InvalidArgument(
            "a tiled run's parts come from run_part and merge with assemble".into(),
        ));
    }
    assemble(vec![run_part(ctx, opts)?])
}

/// Runs tile `opts.tile` (default: the whole run) of a dedup over the snapshot in `ctx`.
pub fn run_part(ctx: &DedupContext<'_>, opts: &DedupOptions) -> Result<RunPart, EngineError> {
    let start = Instant::now();
    let snap = ctx.snapshot;
    let tile = opts.tile.unwrap_or(TileSpec::WHOLE);
    TileSpec::new(tile.index, tile.count)?;
    if opts.block_rows == 0 {
        return Err(EngineError::InvalidArgument(
            "block_rows must be at least 1".into(),
        ));
    }
    let threshold = threshold_for_fpir(opts.target_fpir, snap.live())?;
    let floor = opts.report_floor.unwrap_or(threshold).min(threshold);
    let rows = snap.rows();
    let first_probe = match opts.scope {
        DedupScope::WholeStore => 0,
        DedupScope::RowsFrom(r) => {
            if r > rows {
                return Err(EngineError::InvalidArgument(format!(
                    "scope starts at row {r} beyond {rows} rows"
                )));
            }
            r
        }
    };
    let part_rows = tile.rows(first_probe..rows);
    let mode = candidates::resolve_mode(opts.mode, snap);
    let ann = ctx.ann.filter(|a| a.covers(snap));
    if !(0.0..1.0).contains(&opts.genuine_miss) {
        return Err(EngineError::InvalidArgument(format!(
            "genuine_miss {} is not in [0, 1)",
            opts.genuine_miss
        )));
    }
    let genuine_miss = match mode {
        CandidateMode::Index => opts.genuine_miss,
        _ => 0.0,
    };
    let cand_cos = ctx
        .calibration
        .candidate_cosines_relaxed(floor, genuine_miss);
    if cand_cos.iter().all(Option::is_none) {
        // Complete, and empty: the user must hear that the models, not the data, decided it.
        tracing::warn!(
            "no pair can reach score {floor:.1} under this calibration: no modality's evidence reaches it at any cosine, so nothing is searched and no pair is reported (summary.calibration_source says how the models were fitted; a model fitted without labelled pairs can read look-alikes and duplicates as impostors: calibrate with --truth, or target a higher FPIR)"
        );
    }
    // With several candidate modalities a genuine pair is lost only if every modality that could catch it
    // drops it, so each cut may drop more (`genuine_drop_multimodal`).
    let multimodal = cand_cos.iter().flatten().count() > 1;
    let policy = opts.sketch.map(|p| CutPolicy {
        genuine_drop: if multimodal {
            p.genuine_drop_multimodal
        } else {
            p.genuine_drop
        },
        ..p
    });
    // The cut of the 512-bit prefix stage and of the whole 1024-bit sketch for modality `m` at cosine `c`.
    let stage_cuts = |m: Modality, c: f32| -> Option<(CutChoice, CutChoice)> {
        let (Some(policy), CandidateMode::Index) = (&policy, mode) else {
            return None;
        };
        let model = ctx.calibration.model(m)?;
        let choose = |bits| {
            choose_cut(
                bits,
                f64::from(c),
                (model.impostor.mean, model.impostor.sd),
                (model.genuine.mean, model.genuine.sd),
                policy,
            )
        };
        let prefix = choose(crate::annset::SKETCH_PREFIX_BITS);
        // One stage when the prefix is the whole sketch: the same choice serves both.
        let full = if crate::annset::SKETCH_BITS > crate::annset::SKETCH_PREFIX_BITS {
            choose(crate::annset::SKETCH_BITS)
        } else {
            prefix
        };
        Some((prefix, full))
    };
    let cuts: Vec<Option<(CutChoice, CutChoice)>> = snap
        .schema()
        .modalities
        .iter()
        .zip(&cand_cos)
        .map(|(spec, c)| stage_cuts(spec.modality, (*c)?))
        .collect();
    // A single candidate modality with quality bands is joined at each pair's band cosine: the verdict of
    // a pair scored on one modality is its band's alone (with several modalities the budgets are shared,
    // and every pair keeps the envelope's cosines).
    let bands: Vec<Option<BandJoin>> = snap
        .schema()
        .modalities
        .iter()
        .enumerate()
        .map(|(mi, spec)| {
            cuts.get(mi).copied().flatten()?;
            if multimodal {
                return None;
            }
            BandJoin::of(snap, ctx.calibration, mi, floor, &|c| {
                stage_cuts(spec.modality, c)
            })
        })
        .collect();
    // The summary names the path; the checkpoint key also pins the cuts (a resumed run must filter alike).
    let mode_label = match cuts.iter().flatten().next() {
        Some(_) => format!("{mode:?}+sketch"),
        None => format!("{mode:?}"),
    };
    let key_mode = format!(
        "{mode_label} genuine_miss {genuine_miss:e} cuts {:?} bands {:?}",
        cuts.iter()
            .map(|c| c.map(|(p, f)| (p.cut, f.cut)))
            .collect::<Vec<_>>(),
        bands
            .iter()
            .map(|b| b.as_ref().map(|b| &b.classes))
            .collect::<Vec<_>>(),
    );
    // An index-join block re-reads every list's visitors (those below the block × its members), so index
    // runs use at most INDEX_TILES blocks per part: the join's pairs are verdicts, not candidates, so blocks
    // stay small.
    let block_rows = match mode {
        CandidateMode::Index => opts.block_rows.max(part_rows.len().div_ceil(INDEX_TILES)),
        _ => opts.block_rows,
    };
    let blocks: Vec<Range<usize>> = part_rows
        .clone()
        .step_by(block_rows.max(1))
        .map(|s| s..(s + block_rows).min(part_rows.end))
        .collect();

    // What the planner predicts the sketch stages pass: with a band join, each band at its own cut.
    let filters: Vec<Option<FilterModel>> = cuts
        .iter()
        .zip(&bands)
        .map(|(c, b)| match b {
            Some(b) => Some(b.filter()),
            None => c.map(|(p, f)| FilterModel {
                prefix_pass: p.impostor_pass,
                full_pass: f.impostor_pass,
            }),
        })
        .collect();
    // The impostor cosine models the planner predicts the i8 join's survivors from.
    let impostors: Vec<Option<(f64, f64)>> = snap
        .schema()
        .modalities
        .iter()
        .map(|spec| {
            ctx.calibration
                .model(spec.modality)
                .map(|m| (m.impostor.mean, m.impostor.sd))
        })
        .collect();
    // Index mode: plan each modality's candidate path on this store (pilots) and build the run's index.
    let t_prep = Instant::now();
    let sketch_acc: std::sync::Mutex<(f64, Vec<SketchRows>)> = Default::default();
    let run_index = match mode {
        // The run's probe rows (every tile of a run plans, and predicts, the same whole run).
        CandidateMode::Index => Some(RunIndex::prepare(
            snap,
            ann,
            first_probe..rows,
            &cand_cos,
            &filters,
            &impostors,
            opts.force_path.as_deref().filter(|&f| f != "joint"),
            &|mi| {
                let t = Instant::now();
                let sk = match ann {
                    Some(a) if !opts.recompute_sketches => a.sketches(snap, mi)?,
                    _ => std::sync::Arc::new(crate::annset::sketch_rows(snap, mi)?),
                };
                let mut acc = sketch_acc.lock().unwrap_or_else(|p| p.into_inner());
                acc.0 += t.elapsed().as_secs_f64();
                acc.1.push(SketchRows {
                    modality: snap.schema().modalities[mi].modality.key(),
                    saved: sk.saved_rows(),
                    computed: sk.rows() - sk.saved_rows(),
                });
                Ok(sk)
            },
        )?),
        _ => None,
    };
    let prepare_seconds = t_prep.elapsed().as_secs_f64();
    let (sketch_seconds, sketch_rows) = sketch_acc.into_inner().unwrap_or_else(|p| p.into_inner());
    // With several fused modalities, each planned onto the exact i8 join, one joint scan tests every pair's
    // summed evidence instead of a join per modality at a cosine the others could complete.
    let fused = snap
        .schema()
        .modalities
        .iter()
        .filter(|s| ctx.calibration.position(s.modality).is_some())
        .count();
    let force_joint = opts.force_path.as_deref() == Some("joint");
    let joint = match &run_index {
        Some(ri) if (fused > 1 && opts.force_path.is_none()) || force_joint => {
            JointPlan::new(snap, ctx.calibration, floor, ri, force_joint)?
        }
        None if force_joint => {
            return Err(EngineError::InvalidArgument(
                "the joint path runs in index mode only".into(),
            ));
        }
        _ => None,
    };
    if let Some(j) = &joint {
        tracing::info!(
            "{}: every pair scanned through the members' i8 codes, kept where its summed evidence can reach the floor (needed sums {:?})",
            j.info.key,
            j.info.needed
        );
    }
    let identity = run_identity(snap, ctx.calibration, ann);
    let key = CheckpointKey {
        version: env!("CARGO_PKG_VERSION").to_string(),
        identity: identity.clone(),
        generation: snap.generation(),
        commit_seq: snap.commit_seq(),
        threshold_bits: threshold.to_bits(),
        floor_bits: floor.to_bits(),
        scope: opts.scope.clone(),
        mode: match &joint {
            Some(j) => format!(
                "{key_mode} {}",
                serde_json::to_string(&j.info).unwrap_or_default()
            ),
            None => key_mode,
        },
        block_rows,
        audit: opts.audit.clone(),
        force_path: opts.force_path.clone(),
        tile,
    };
    let ckpt = match &opts.checkpoint_dir {
        Some(d) => Some(Checkpoint::open(d, &key)?),
        None => None,
    };

    // True iff a modality's candidates come from the partition (a joint path's members are not searched by
    // their own plans).
    let partitioned = |ri: &RunIndex| {
        ri.modalities.iter().enumerate().any(|(mi, rm)| {
            rm.as_ref().is_some_and(|rm| rm.plan.path == "ivf")
                && !joint.as_ref().is_some_and(|j| j.has(mi))
        })
    };
    // The audit's sample is drawn over the whole run; each part audits the sampled rows among its probes.
    let audit_sample: Vec<u32> = match (&run_index, opts.audit.probes) {
        (Some(ri), k) if k > 0 => {
            // Complete by construction: complete budgets and no partition (the verdict below).
            let construction = genuine_miss == 0.0 && !partitioned(ri);
            let k = crate::audit::sample_size(
                k,
                opts.audit.min_recall,
                &ri.plans(),
                construction,
                first_probe,
                rows,
            );
            crate::audit::sample_rows(snap, first_probe..rows, k, opts.audit.seed)
        }
        _ => Vec::new(),
    };
    let part_sample: Vec<u32> = audit_sample
        .iter()
        .copied()
        .filter(|&r| part_rows.contains(&(r as usize)))
        .collect();
    let recorder = (!audit_sample.is_empty()).then(|| {
        Recorder::new(
            &part_sample,
            snap.schema().modalities.len() + joint.is_some() as usize,
        )
    });
    // With complete budgets and no partition, completeness follows from the sketch model alone.
    let construction = match &run_index {
        Some(ri) if genuine_miss == 0.0 && !partitioned(ri) => {
            // Only brute-force sketch joins can drop a pair; exact joins drop none.
            // (A joint path's members are not searched by their own plans.)
            let drop: f64 = ri
                .modalities
                .iter()
                .zip(&cuts)
                .zip(&bands)
                .enumerate()
                .filter(|(mi, _)| !joint.as_ref().is_some_and(|j| j.has(*mi)))
                .map(|(_, x)| x)
                .filter(|((rm, _), _)| rm.as_ref().is_some_and(|rm| rm.plan.path == "brute"))
                .filter_map(|((_, c), b)| match b {
                    Some(b) => Some(b.drop_at_threshold()),
                    None => c.map(|(p, f)| p.drop_at_threshold + f.drop_at_threshold),
                })
                .sum();
            // The exact i8 join (complete: its filter rejects only pairs below the cosine, its survivors are
            // rescored in f32) is named where a run uses it.
            let exact = if ri.plans().iter().any(|p| p.path == "exact-i8") {
                "exact GEMM or i8 join"
            } else {
                "exact GEMM"
            };
            let how = if let Some(j) = &joint {
                format!(
                    "every pair scanned through the i8 codes of {} (the {}: a rigorous bound on each pair's summed evidence, its survivors scored exactly)",
                    j.info.members.join(", "),
                    j.info.key
                )
            } else if ri.plans().is_empty() {
                "no candidate modality: under this calibration no pair can reach the floor at any cosine, so nothing was searched and nothing can be missed".to_string()
            } else if drop > 0.0 {
                format!(
                    "every candidate modality searched without a partition ({exact} or every pair by sketch); sketch drop ≤ {drop:.1e} per pair at the candidate cosines"
                )
            } else {
                format!("every candidate modality searched by {exact}")
            };
            Some((1.0 - drop, how))
        }
        _ => None,
    };
    let keys: Vec<String> = snap
        .schema()
        .modalities
        .iter()
        .map(|s| s.modality.key())
        .collect();
    // The joint path's counters and audit evidence go under its own name, after the modalities'.
    let stat_keys: Vec<String> = keys
        .iter()
        .cloned()
        .chain(joint.as_ref().map(|j| j.info.key.clone()))
        .collect();
    let setup = RunSetup {
        version: env!("CARGO_PKG_VERSION").to_string(),
        identity,
        calibration_source: ctx.calibration.source.clone(),
        parameters: RunParameters::of(opts),
        rows,
        records: snap.live(),
        first_probe,
        threshold,
        floor,
        mode: mode_label,
        genuine_miss,
        candidate_cosines: keys.iter().cloned().zip(cand_cos.iter().copied()).collect(),
        sketch_cuts: keys
            .iter()
            .cloned()
            .zip(cuts.iter().map(|c| c.map(|c| c.0)))
            .collect(),
        sketch_full_cuts: keys
            .iter()
            .cloned()
            .zip(cuts.iter().map(|c| c.map(|c| c.1)))
            .collect(),
        band_cosines: keys
            .iter()
            .zip(&bands)
            .filter_map(|(k, b)| Some((k.clone(), b.as_ref()?.cosines())))
            .collect(),
        construction,
        audit_sampled: audit_sample.len(),
        joint: joint.as_ref().map(|j| j.info.clone()),
    };

    let mut summary = DedupSummary {
        join_stats: stat_keys
            .iter()
            .map(|k| (k.clone(), JoinStats::default()))
            .collect(),
        ..DedupSummary::default()
    };
    let mut pairs: Vec<DedupPair> = Vec::new();
    let mut done = 0usize;
    // Past RAM, the f32 pages read so far (calibration samples, then each block's rescorings of pairs the i8
    // stage could not reject) are scattered: drop them from the resident set before the join and after each
    // block, so that a store larger than RAM is matched with its i8 codes resident, not its f32 rows.
    let past_ram = snap.past_ram();
    let release_f32 = || {
        if past_ram {
            for spec in &snap.schema().modalities {
                snap.release_f32(spec.modality, 0..rows);
            }
        }
    };
    release_f32();
    // With several fused modalities a join's pairs are mostly decided by the others: the fused bound drops,
    // from their i8 codes, those that cannot reach the floor before any f32 read.
    let bound = match (&run_index, fused > 1 && joint.is_none()) {
        (Some(ri), true) => {
            let known_l1 = |mi: usize| ri.modalities.get(mi)?.as_ref()?.l1.as_deref();
            FusedBound::new(snap, ctx.calibration, floor, &known_l1)
        }
        _ => None,
    };
    for (bi, block) in blocks.iter().enumerate() {
        if ctx.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(EngineError::Cancelled {
                finished_tiles: bi,
                total_tiles: blocks.len(),
            });
        }
        let out = match ckpt.as_ref().map(|c| c.load(bi)).transpose()?.flatten() {
            Some(t) => {
                summary.tiles_resumed += 1;
                t
            }
            None => {
                let t = run_tile(
                    ctx,
                    run_index.as_ref(),
                    recorder.as_ref(),
                    &cand_cos,
                    &cuts,
                    &bands,
                    bound.as_ref(),
                    joint.as_ref(),
                    block.clone(),
                    floor,
                    &mut summary,
                )?;
                if let Some(c) = &ckpt {
                    c.save(bi, &t)?;
                }
                t
            }
        };
        if let Some(r) = &recorder {
            for &(mi, a, b) in &out.reached {
                r.note(mi as usize, a, b);
            }
        }
        summary.candidate_pairs += out.candidates;
        for (acc, st) in summary.join_stats.iter_mut().zip(&out.join_stats) {
            acc.1 = acc.1.add(st);
        }
        pairs.extend(out.pairs);
        release_f32();
        done += block.len();
        if let Some(p) = ctx.progress {
            p(DedupProgress {
                done,
                total: part_rows.len(),
                pairs: pairs.len(),
            });
        }
    }
    pairs.sort_by_key(|p| (p.row_a, p.row_b));
    let audit = match &recorder {
        Some(rec) => {
            // The boundary evidence is taken at the complete cosines: with relaxed budgets the pairs between
            // them and the run's cosines are never looked for, and count as missed.
            // A joint path's members have no cosine of their own: its boundary is the joint test's.
            let complete: Vec<Option<f32>> = ctx
                .calibration
                .candidate_cosines(floor)
                .into_iter()
                .enumerate()
                .map(|(mi, c)| c.filter(|_| !joint.as_ref().is_some_and(|j| j.has(mi))))
                .collect();
            let exact = crate::audit::exact_sample(
                snap,
                ctx.calibration,
                &part_sample,
                floor,
                &complete,
                &bands,
                joint.as_ref(),
            )?;
            let reported: std::collections::HashSet<(u32, u32)> =
                pairs.iter().map(|p| (p.row_a, p.row_b)).collect();
            // Synthetic boundary pairs for the IVF paths (several per sampled row, an independent seed).
            let mut synthetic = Vec::new();
            if let Some(ri) = &run_index {
                for (mi, rm) in ri.modalities.iter().enumerate() {
                    let Some(rm) = rm else { continue };
                    let (Some(ivf), Some(rule)) = (&rm.ivf, rm.plan.rule) else {
                        continue;
                    };
                    if rm.plan.path != "ivf" {
                        continue;
                    }
                    let (f, n) = crate::policy::synthetic_reach(
                        snap,
                        ivf,
                        mi,
                        rm.plan.cosine,
                        rule,
                        &part_sample,
                        crate::audit::SYNTHETIC_PER_ROW,
                        opts.audit.seed ^ 0x5e1f ^ mi as u64,
                    );
                    synthetic.push((rm.plan.modality.clone(), f, n));
                }
            }
            Some(crate::audit::audit_part(
                snap,
                part_sample.len(),
                &exact,
                &reported,
                rec,
                threshold,
                synthetic,
            ))
        }
        None => None,
    };
    if let Some(c) = ckpt {
        c.finish()?;
    }
    Ok(RunPart {
        tile,
        probe_rows: (part_rows.start, part_rows.end),
        setup,
        plans: run_index.as_ref().map(RunIndex::plans).unwrap_or_default(),
        pair_count: pairs.len(),
        pairs,
        candidate_pairs: summary.candidate_pairs,
        join_stats: summary.join_stats,
        sketch_rows,
        tiles_resumed: summary.tiles_resumed,
        timings: PartTimings {
            prepare_seconds,
            sketch_seconds,
            candidate_seconds: summary.candidate_seconds,
            scoring_seconds: summary.scoring_seconds,
            total_seconds: start.elapsed().as_secs_f64(),
        },
        audit,
    })
}

/// Why parts of a run do not merge.
fn refuse(reason: String) -> EngineError {
    EngineError::Tiles(reason)
}

/// The fields in which two setups differ, by name.
fn setup_differences(a: &RunSetup, b: &RunSetup) -> Vec<String> {
    let (Ok(serde_json::Value::Object(x)), Ok(serde_json::Value::Object(y))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["(unserialisable setup)".into()];
    };
    let mut out: Vec<String> = Vec::new();
    for (k, v) in &x {
        match (v, y.get(k)) {
            (serde_json::Value::Object(vo), Some(serde_json::Value::Object(wo))) => {
                for (k2, v2) in vo {
                    if wo.get(k2) != Some(v2) {
                        out.push(format!("{k}.{k2}"));
                    }
                }
            }
            (v, w) if w != Some(v) => out.push(k.clone()),
            _ => {}
        }
    }
    out
}

/// A plan without its timing, for comparing parts.
fn untimed(p: &ModalityPlan) -> ModalityPlan {
    ModalityPlan {
        seconds: 0.0,
        ..p.clone()
    }
}

/// Merges the parts of one run — every tile `0..N` exactly once, all of the same setup — into its result:
/// pairs sorted by rows, clusters over all hits, one summary and one audit. The result is the same for any
/// split of the run (timings aside); a single process's run is the one-part case.
pub fn assemble(mut parts: Vec<RunPart>) -> Result<DedupResult, EngineError> {
    let Some(first) = parts.first() else {
        return Err(refuse("no tiles given".into()));
    };
    let count = first.tile.count;
    let mut seen = vec![0usize; count];
    for p in &parts {
        if p.tile.count != count {
            return Err(refuse(format!(
                "tile {} belongs to a run of {} tiles, tile {} to a run of {count}",
                p.tile, p.tile.count, first.tile
            )));
        }
        if let Some(s) = seen.get_mut(p.tile.index) {
            *s += 1;
        }
    }
    let missing: Vec<usize> = (0..count).filter(|&i| seen[i] == 0).collect();
    if !missing.is_empty() {
        return Err(refuse(format!(
            "tile(s) {missing:?} of {count} missing: run them (pacha dedup --tile I/{count}) before merging"
        )));
    }
    let twice: Vec<usize> = (0..count).filter(|&i| seen[i] > 1).collect();
    if !twice.is_empty() {
        return Err(refuse(format!(
            "tile(s) {twice:?} of {count} given more than once"
        )));
    }
    parts.sort_by_key(|p| p.tile.index);
    let setup = parts[0].setup.clone();
    let plans = parts[0].plans.clone();
    let sketch_rows = parts[0].sketch_rows.clone();
    let range = setup.first_probe..setup.rows;
    for p in &parts {
        let diff = setup_differences(&setup, &p.setup);
        if !diff.is_empty() {
            return Err(refuse(format!(
                "tile {} ran on other inputs or parameters than tile {}: {} differ",
                p.tile,
                parts[0].tile,
                diff.join(", ")
            )));
        }
        if p.plans.iter().map(untimed).ne(plans.iter().map(untimed)) {
            return Err(refuse(format!(
                "tile {} planned its candidate paths differently from tile {}",
                p.tile, parts[0].tile
            )));
        }
        let want = p.tile.rows(range.clone());
        if p.probe_rows != (want.start, want.end) {
            return Err(refuse(format!(
                "tile {} covers probe rows {:?}, but tile {} of this run covers {want:?}",
                p.tile, p.probe_rows, p.tile
            )));
        }
        if p.pairs.len() != p.pair_count {
            return Err(refuse(format!(
                "tile {} holds {} pairs but says {}",
                p.tile,
                p.pairs.len(),
                p.pair_count
            )));
        }
        if let Some(bad) = p.pairs.iter().find(|q| {
            q.row_a >= q.row_b || !want.contains(&(q.row_b as usize)) || q.score() < setup.floor
        }) {
            return Err(refuse(format!(
                "tile {} holds pair ({}, {}) (rows {}, {}, score {:.3}), which is not one of its pairs",
                p.tile,
                bad.a,
                bad.b,
                bad.row_a,
                bad.row_b,
                bad.score()
            )));
        }
        if p.audit.is_some() != (setup.audit_sampled > 0) {
            return Err(refuse(format!(
                "tile {} has {} audit evidence, the run {}",
                p.tile,
                if p.audit.is_some() { "" } else { "no" },
                if setup.audit_sampled > 0 {
                    "audits"
                } else {
                    "does not audit"
                }
            )));
        }
    }
    let audit_parts: Vec<AuditPart> = parts.iter().filter_map(|p| p.audit.clone()).collect();
    if !audit_parts.is_empty() {
        let sampled: usize = audit_parts.iter().map(|a| a.sampled).sum();
        if sampled != setup.audit_sampled {
            return Err(refuse(format!(
                "the tiles' audit evidence covers {sampled} sampled rows, the run sampled {}",
                setup.audit_sampled
            )));
        }
    }
    let mut summary = DedupSummary {
        records: setup.records,
        probes: setup.rows - setup.first_probe,
        mode: setup.mode.clone(),
        threshold: setup.threshold,
        candidate_cosines: setup.candidate_cosines.clone(),
        genuine_miss: setup.genuine_miss,
        sketch_cuts: setup.sketch_cuts.clone(),
        sketch_full_cuts: setup.sketch_full_cuts.clone(),
        band_cosines: setup.band_cosines.clone(),
        join_stats: setup
            .candidate_cosines
            .iter()
            .map(|(k, _)| k.clone())
            .chain(setup.joint.as_ref().map(|j| j.key.clone()))
            .map(|k| (k, JoinStats::default()))
            .collect(),
        joint: setup.joint.clone(),
        plans,
        sketch_rows,
        identity: setup.identity.clone(),
        calibration_source: setup.calibration_source.clone(),
        ..DedupSummary::default()
    };
    let mut pairs: Vec<DedupPair> = Vec::with_capacity(parts.iter().map(|p| p.pairs.len()).sum());
    let mut wall = 0.0f64;
    for p in parts {
        summary.candidate_pairs += p.candidate_pairs;
        for (acc, (k, st)) in summary.join_stats.iter_mut().zip(&p.join_stats) {
            if &acc.0 != k {
                return Err(refuse(format!(
                    "tile {} counts the join of {k} where the run has {}",
                    p.tile, acc.0
                )));
            }
            acc.1 = acc.1.add(st);
        }
        summary.tiles_resumed += p.tiles_resumed;
        summary.prepare_seconds += p.timings.prepare_seconds;
        summary.sketch_seconds += p.timings.sketch_seconds;
        summary.candidate_seconds += p.timings.candidate_seconds;
        summary.scoring_seconds += p.timings.scoring_seconds;
        wall += p.timings.total_seconds;
        pairs.extend(p.pairs);
    }
    pairs.sort_by_key(|p| (p.row_a, p.row_b));
    if let Some(w) = pairs
        .windows(2)
        .find(|w| w[0].row_a == w[1].row_a && w[0].row_b == w[1].row_b)
    {
        return Err(refuse(format!(
            "pair ({}, {}) appears twice among the tiles",
            w[0].a, w[0].b
        )));
    }
    let threshold = setup.threshold;
    let hit_rows: Vec<(usize, usize)> = pairs
        .iter()
        .filter(|p| p.score() >= threshold)
        .map(|p| (p.row_a as usize, p.row_b as usize))
        .collect();
    // Clusters over the hits' rows (union-find over the rows that occur, each group sorted by row and
    // the groups by first row), named by the subject IDs the pairs carry.
    let mut ids: std::collections::BTreeMap<usize, &str> = std::collections::BTreeMap::new();
    for p in pairs.iter().filter(|p| p.score() >= threshold) {
        ids.insert(p.row_a as usize, &p.a);
        ids.insert(p.row_b as usize, &p.b);
    }
    let dense: Vec<usize> = ids.keys().copied().collect();
    let local: Vec<(usize, usize)> = hit_rows
        .iter()
        .map(|&(a, b)| {
            (
                dense.binary_search(&a).unwrap_or_default(),
                dense.binary_search(&b).unwrap_or_default(),
            )
        })
        .collect();
    let clusters: Vec<Vec<String>> = crate::cluster::union_find(dense.len(), &local)
        .into_iter()
        .map(|c| {
            c.into_iter()
                .map(|i| ids.get(&dense[i]).copied().unwrap_or_default().to_string())
                .collect()
        })
        .collect();
    if !audit_parts.is_empty() {
        let keys: Vec<String> = setup
            .candidate_cosines
            .iter()
            .map(|(k, _)| k.clone())
            .chain(setup.joint.as_ref().map(|j| j.key.clone()))
            .collect();
        summary.audit = Some(crate::audit::assess(
            &crate::audit::AuditFrame {
                opts: &setup.parameters.audit,
                modalities: &keys,
                probe_rows: summary.probes,
                threshold,
                floor: setup.floor,
                construction: setup.construction.clone(),
            },
            &audit_parts,
        ));
    }
    summary.reported_pairs = pairs.len();
    summary.hits = hit_rows.len();
    summary.clusters = clusters.len();
    summary.total_seconds = wall;
    summary.records_per_second = summary.probes as f64 / summary.total_seconds.max(1e-9);
    summary.score_histogram = histogram(pairs.iter().map(DedupPair::score), 5.0);
    Ok(DedupResult {
        threshold,
        pairs,
        clusters,
        summary,
    })
}

#[derive(Serialize, Deserialize)]
struct TileOutput {
    candidates: u64,
    #[serde(default)]
    join_stats: Vec<JoinStats>,
    pairs: Vec<DedupPair>,
    /// Pairs `(modality, a, b)` the candidate path reached whose later row is in the audit sample.
    #[serde(default)]
    reached: Vec<(u8, u32, u32)>,
}

#[allow(clippy::too_many_arguments)]
fn run_tile(
    ctx: &DedupContext<'_>,
    run: Option<&RunIndex>,
    recorder: Option<&Recorder>,
    cand_cos: &[Option<f32>],
    cuts: &[Option<(CutChoice, CutChoice)>],
    bands: &[Option<BandJoin>],
    bound: Option<&FusedBound>,
    joint: Option<&JointPlan>,
    probes: Range<usize>,
    floor: f64,
    summary: &mut DedupSummary,
) -> Result<TileOutput, EngineError> {
    let snap = ctx.snapshot;
    let t0 = Instant::now();
    let cal = ctx.calibration;
    let reached = std::sync::Mutex::new(Vec::new());
    let mut cand: Vec<(u32, u32)> = Vec::new();
    let mut candidates = 0u64;
    let nm = snap.schema().modalities.len();
    let mut join_stats = vec![JoinStats::default(); nm + joint.is_some() as usize];
    if let (Some(jp), Some(run)) = (joint, run) {
        let t = Instant::now();
        let (pairs, st) = jp.join(snap, run, probes.clone())?;
        tracing::debug!(
            "{}: rows {probes:?}: {} pairs scanned, {} kept, {:.2} s",
            jp.info.key,
            st.pairs,
            st.kept,
            t.elapsed().as_secs_f64()
        );
        if let Some(r) = recorder {
            let mut v = reached.lock().unwrap_or_else(|p| p.into_inner());
            v.extend(
                pairs
                    .iter()
                    .filter(|p| r.sampled(p.1))
                    .map(|&(a, b)| (nm as u8, a, b)),
            );
        }
        join_stats[nm] = crate::joint::join_stats(&st);
        candidates += st.kept;
        cand.extend(pairs);
    }
    for (mi, spec) in snap.schema().modalities.iter().enumerate() {
        let Some(c) = cand_cos.get(mi).copied().flatten() else {
            continue;
        };
        if joint.is_some_and(|j| j.has(mi)) {
            continue;
        }
        // The joins apply the fused verdict to their pairs as they find them (candidates are not stored):
        // the fused bound first (the i8 codes of the other modalities), then, in the index join, the exact
        // fused score (the i8 join's pairs are scored below). Every pair reached for an audited row is
        // noted first.
        let accept = |a: u32, b: u32, c: f32| {
            if recorder.is_some_and(|r| r.sampled(b)) {
                reached
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((mi as u8, a, b));
            }
            bound.is_none_or(|fb| fb.may_reach(a as usize, b as usize, Some((mi, c))))
        };
        let verdict = |a: u32, b: u32, c: f32| {
            accept(a, b, c) && fused_rows(snap, cal, a as usize, b as usize).score >= floor
        };
        let before = cand.len();
        let joined = candidates::pairs_for_tile(
            snap,
            run,
            spec.modality,
            mi,
            probes.clone(),
            c,
            cuts.get(mi).copied().flatten().map(|(p, f)| SketchFilter {
                cut: crate::annset::staged_cut(&p, &f),
            }),
            bands.get(mi).and_then(Option::as_ref),
            &verdict,
            &accept,
            &mut join_stats[mi],
            &mut cand,
        )?;
        // The exact GEMM path's pairs are all reached candidates (the joins noted theirs in `accept`).
        if !joined && let Some(r) = recorder {
            let mut v = reached.lock().unwrap_or_else(|p| p.into_inner());
            v.extend(
                cand[before..]
                    .iter()
                    .filter(|p| r.sampled(p.1))
                    .map(|&(a, b)| (mi as u8, a, b)),
            );
        }
        // Pairs of the exact path are candidates; the index join counts those it rescored above `c`.
        candidates += if joined {
            join_stats[mi].above
        } else {
            (cand.len() - before) as u64
        };
    }
    cand.par_sort_unstable();
    cand.dedup();
    summary.candidate_seconds += t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let pairs: Vec<DedupPair> = cand
        .par_iter()
        .filter(|&&(a, b)| !snap.is_deleted(a as usize) && !snap.is_deleted(b as usize))
        // The allocation-free score decides; the full evidence (equal fused score, tested) is built only
        // for the pairs that pass.
        .filter(|&&(a, b)| fused_rows(snap, cal, a as usize, b as usize).score >= floor)
        .map(|&(a, b)| DedupPair {
            a: snap.subject_id(a as usize).to_string(),
            b: snap.subject_id(b as usize).to_string(),
            row_a: a,
            row_b: b,
            comparison: compare_rows(snap, cal, a as usize, b as usize),
        })
        .collect();
    summary.scoring_seconds += t1.elapsed().as_secs_f64();
    let mut reached = reached.into_inner().unwrap_or_else(|p| p.into_inner());
    reached.sort_unstable();
    Ok(TileOutput {
        candidates,
        join_stats,
        pairs,
        reached,
    })
}

/// A histogram of `values` with bins of width `w`: (lower edge, count), sorted.
pub fn histogram(values: impl Iterator<Item = f64>, w: f64) -> Vec<(f64, usize)> {
    let mut bins: std::collections::BTreeMap<i64, usize> = std::collections::BTreeMap::new();
    for v in values {
        *bins.entry((v / w).floor() as i64).or_default() += 1;
    }
    bins.into_iter().map(|(k, n)| (k as f64 * w, n)).collect()
}

/// Finished tiles of an interrupted run, keyed by everything that determines their content (`run.json`:
/// store identity and commit, calibration, index, options, pacha version). Each tile file is sealed
/// ([`crate::derived::seal`]: length and crc32 of every byte) and names the crc32 of the run key and its tile
/// number; a tile that fails any of these is recomputed (with a warning), never trusted.
struct Checkpoint {
    dir: PathBuf,
    /// crc32 of the run key's JSON, 8 hex digits.
    key_crc: String,
}

/// Kind of a sealed checkpoint tile.
const TILE_KIND: &str = "dedup-tile";

/// A saved tile: the run key it belongs to, its number, and its output.
#[derive(Deserialize)]
struct SavedTile {
    key_crc32: String,
    tile: usize,
    output: TileOutput,
}

impl Checkpoint {
    fn open(dir: &Path, key: &CheckpointKey) -> Result<Checkpoint, EngineError> {
        let io = |e| EngineError::io("accessing", dir, e);
        crate::fsutil::create_private_dir_all(dir).map_err(io)?;
        let key_path = dir.join("run.json");
        let key_json = serde_json::to_string(key).map_err(|e| EngineError::Corrupt {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        match std::fs::read_to_string(&key_path) {
            Ok(existing) if existing == key_json => {}
            _ => {
                // A different (or no) run: start afresh.
                for entry in std::fs::read_dir(dir).map_err(io)?.flatten() {
                    if entry.file_name().to_string_lossy().starts_with("tile-") {
                        std::fs::remove_file(entry.path()).map_err(io)?;
                    }
                }
                crate::fsutil::write_atomic(&key_path, key_json.as_bytes())?;
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            key_crc: format!("{:08x}", crc32fast::hash(key_json.as_bytes())),
        })
    }

    fn path(&self, tile: usize) -> PathBuf {
        self.dir.join(format!("tile-{tile:08}.json"))
    }

    fn load(&self, tile: usize) -> Result<Option<TileOutput>, EngineError> {
        let p = self.path(tile);
        let bytes = match std::fs::read(&p) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EngineError::io("reading", &p, e)),
        };
        let checked = crate::derived::unseal(TILE_KIND, &bytes).and_then(|body| {
            let t: SavedTile =
                serde_json::from_slice(body).map_err(|e| format!("does not decode: {e}"))?;
            if t.key_crc32 != self.key_crc || t.tile != tile {
                return Err(format!(
                    "belongs to run key {} tile {}, not {} tile {tile}",
                    t.key_crc32, t.tile, self.key_crc
                ));
            }
            Ok(t.output)
        });
        match checked {
            Ok(out) => Ok(Some(out)),
            // A torn or damaged checkpoint is recomputed, never trusted.
            Err(why) => {
                tracing::warn!(
                    "checkpoint {} is unusable ({why}); recomputing the tile",
                    p.display()
                );
                Ok(None)
            }
        }
    }

    fn save(&self, tile: usize, out: &TileOutput) -> Result<(), EngineError> {
        let p = self.path(tile);
        #[derive(Serialize)]
        struct Ref<'a> {
            key_crc32: &'a str,
            tile: usize,
            output: &'a TileOutput,
        }
        let bytes = serde_json::to_vec(&Ref {
            key_crc32: &self.key_crc,
            tile,
            output: out,
        })
        .map_err(|e| EngineError::Corrupt {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        crate::fsutil::write_atomic(&p, &crate::derived::seal(TILE_KIND, &bytes))
    }

    fn finish(self) -> Result<(), EngineError> {
        crate::fsutil::write_private(&self.dir.join("complete"), b"ok")
            .map_err(|e| EngineError::io("writing", &self.dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_probe_rows_once_in_shares_of_equal_work() {
        for (range, n) in [
            (0..100_000usize, 7usize),
            (90_000..100_000, 4),
            (0..5, 8),
            (3..3, 2),
        ] {
            let mut next = range.start;
            let mut work = Vec::new();
            for i in 0..n {
                let r = TileSpec::new(i, n).unwrap().rows(range.clone());
                assert_eq!(r.start, next, "tile {i}/{n} of {range:?} leaves a gap");
                assert!(r.end >= r.start);
                next = r.end;
                work.push(r.map(|x| x as f64).sum::<f64>());
            }
            assert_eq!(next, range.end, "tiles of {range:?} stop short");
            if range.len() >= 10_000 {
                let mean = work.iter().sum::<f64>() / n as f64;
                for w in &work {
                    assert!((w / mean - 1.0).abs() < 0.01, "{work:?}");
                }
            }
        }
    }

    #[test]
    fn tile_specs_parse_and_refuse_nonsense() {
        assert_eq!(
            "3/16".parse::<TileSpec>().unwrap(),
            TileSpec {
                index: 3,
                count: 16
            }
        );
        assert_eq!(TileSpec::new(0, 1).unwrap(), TileSpec::WHOLE);
        for bad in [
            "",
            "3",
            "16/16",
            "-1/4",
            "a/b",
            "1/0",
            "0/2/3",
            "1/99999999",
        ] {
            assert!(bad.parse::<TileSpec>().is_err(), "{bad:?} parsed");
        }
    }
}
