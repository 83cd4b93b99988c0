//! Batch deduplication: every pair of enrolments whose fused score passes the threshold, clustered.
//!
//! ## How a run works
//! The work is a grid of **tiles**: a probe block of rows `[p0, p1)` against the gallery rows `[0, p1)` that
//! come before each probe (each unordered pair is compared once, from its later row). For every tile:
//! 1. *candidates*, per modality: all pairs whose cosine reaches that modality's candidate cosine (derived
//!    from the fused threshold by pigeonhole, so no pair that can pass is dropped — see [`crate::fusion`]),
//!    from exact blocked GEMM or from the ANN index plus an exact scan of rows the index does not cover;
//! 2. *scoring*: the union of candidates is rescored exactly in f32 on every modality both records have,
//!    fused, and kept when its calibrated score reaches the report floor (default: the threshold).
//!
//! Tiles are independent and their outputs merge by concatenation and sorting, so a run is deterministic
//! regardless of thread count, can be checkpointed after every tile (resumable: an interrupted run restarts
//! from its last finished tile and produces the same output), and can be scheduled tile by tile elsewhere.

use crate::annset::SketchFilter;
use crate::audit::{Audit, AuditOptions, Recorder};
use crate::candidates::{self, CandidateMode};
use crate::fusion::{Calibration, threshold_for_fpir};
use crate::identity::{RunIdentity, run_identity};
use crate::matcher::{Comparison, compare_rows, fused_rows};
use crate::policy::{FilterModel, ModalityPlan, RunIndex};
use crate::store::Snapshot;
use crate::{AnnSet, EngineError};
use pacha_index::ivf::JoinStats;
use pacha_index::sketch::{CutChoice, CutPolicy, StagedCut, choose_cut};
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
    /// Index mode: force every candidate modality onto one path (`"ivf"`, `"brute"` or `"exact"`) instead
    /// of the planner's choice (for tests and measurements; `"ivf"` needs a saved index).
    #[serde(default)]
    pub force_path: Option<String>,
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
            target_fpir: 1e-3,
            scope: DedupScope::WholeStore,
            mode: CandidateMode::Auto,
            block_rows: 8192,
            report_floor: None,
            checkpoint_dir: None,
            sketch: Some(complete_cuts()),
            genuine_miss: 0.0,
            audit: AuditOptions::default(),
            force_path: None,
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
    /// The completeness audit (index mode with auditing on).
    #[serde(default)]
    pub audit: Option<Audit>,
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
}

/// Runs a dedup over the snapshot in `ctx`.
pub fn run(ctx: &DedupContext<'_>, opts: &DedupOptions) -> Result<DedupResult, EngineError> {
    let start = Instant::now();
    let snap = ctx.snapshot;
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
    // Per modality: the cut of the 512-bit prefix stage and of the whole 1024-bit sketch.
    let cuts: Vec<Option<(CutChoice, CutChoice)>> = snap
        .schema()
        .modalities
        .iter()
        .zip(&cand_cos)
        .map(|(spec, c)| {
            let (Some(policy), Some(c), CandidateMode::Index) = (&policy, c, mode) else {
                return None;
            };
            let model = ctx.calibration.model(spec.modality)?;
            let choose = |bits| {
                choose_cut(
                    bits,
                    f64::from(*c),
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
        })
        .collect();
    // The summary names the path; the checkpoint key also pins the cuts (a resumed run must filter alike).
    let mode_label = match cuts.iter().flatten().next() {
        Some(_) => format!("{mode:?}+sketch"),
        None => format!("{mode:?}"),
    };
    let key_mode = format!(
        "{mode_label} genuine_miss {genuine_miss:e} cuts {:?}",
        cuts.iter()
            .map(|c| c.map(|(p, f)| (p.cut, f.cut)))
            .collect::<Vec<_>>(),
    );
    // An index-join tile re-reads every list's visitors (those below the tile × its members), so index runs
    // use at most INDEX_TILES tiles: the join's pairs are verdicts, not candidates, so tiles stay small.
    let block_rows = match mode {
        CandidateMode::Index => opts
            .block_rows
            .max((rows - first_probe).div_ceil(INDEX_TILES)),
        _ => opts.block_rows,
    };
    let tiles: Vec<Range<usize>> = (first_probe..rows)
        .step_by(block_rows)
        .map(|s| s..(s + block_rows).min(rows))
        .collect();

    let identity = run_identity(snap, ctx.calibration, ann);
    let key = CheckpointKey {
        version: env!("CARGO_PKG_VERSION").to_string(),
        identity: identity.clone(),
        generation: snap.generation(),
        commit_seq: snap.commit_seq(),
        threshold_bits: threshold.to_bits(),
        floor_bits: floor.to_bits(),
        scope: opts.scope.clone(),
        mode: key_mode,
        block_rows,
        audit: opts.audit.clone(),
        force_path: opts.force_path.clone(),
    };
    let ckpt = match &opts.checkpoint_dir {
        Some(d) => Some(Checkpoint::open(d, &key)?),
        None => None,
    };

    let filters: Vec<Option<FilterModel>> = cuts
        .iter()
        .map(|c| {
            c.map(|(p, f)| FilterModel {
                prefix_pass: p.impostor_pass,
                full_pass: f.impostor_pass,
            })
        })
        .collect();
    // Index mode: plan each modality's candidate path on this store (pilots) and build the run's index.
    let t_prep = Instant::now();
    let run_index = match mode {
        CandidateMode::Index => Some(RunIndex::prepare(
            snap,
            ann,
            &cand_cos,
            &filters,
            opts.force_path.as_deref(),
            &|mi| match ann {
                Some(a) => a.sketches(snap, mi),
                None => Ok(std::sync::Arc::new(crate::annset::sketch_rows(snap, mi)?)),
            },
        )?),
        _ => None,
    };
    let prepare_seconds = t_prep.elapsed().as_secs_f64();
    // The audit's sample and what the candidate path reaches for it.
    let audit_sample: Vec<u32> = match (&run_index, opts.audit.probes) {
        (Some(_), k) if k > 0 => {
            crate::audit::sample_rows(snap, first_probe..rows, k, opts.audit.seed)
        }
        _ => Vec::new(),
    };
    let recorder = (!audit_sample.is_empty())
        .then(|| Recorder::new(&audit_sample, snap.schema().modalities.len()));

    let mut summary = DedupSummary {
        plans: run_index.as_ref().map(RunIndex::plans).unwrap_or_default(),
        calibration_source: ctx.calibration.source.clone(),
        prepare_seconds,
        identity,
        records: snap.live(),
        probes: rows - first_probe,
        mode: mode_label,
        threshold,
        genuine_miss,
        candidate_cosines: snap
            .schema()
            .modalities
            .iter()
            .zip(&cand_cos)
            .map(|(s, c)| (s.modality.key(), *c))
            .collect(),
        sketch_cuts: snap
            .schema()
            .modalities
            .iter()
            .zip(&cuts)
            .map(|(s, c)| (s.modality.key(), c.map(|c| c.0)))
            .collect(),
        sketch_full_cuts: snap
            .schema()
            .modalities
            .iter()
            .zip(&cuts)
            .map(|(s, c)| (s.modality.key(), c.map(|c| c.1)))
            .collect(),
        join_stats: snap
            .schema()
            .modalities
            .iter()
            .map(|s| (s.modality.key(), JoinStats::default()))
            .collect(),
        ..DedupSummary::default()
    };
    let mut pairs: Vec<DedupPair> = Vec::new();
    let mut done = 0usize;
    // Past RAM, the f32 pages read so far (calibration samples, then each tile's rescorings of pairs the i8
    // stage could not reject) are scattered: drop them from the resident set before the join and after each
    // tile, so that a store larger than RAM is matched with its i8 codes resident, not its f32 rows.
    let past_ram = snap.past_ram();
    let release_f32 = || {
        if past_ram {
            for spec in &snap.schema().modalities {
                snap.release_f32(spec.modality, 0..rows);
            }
        }
    };
    release_f32();
    for (ti, tile) in tiles.iter().enumerate() {
        if ctx.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(EngineError::Cancelled {
                finished_tiles: ti,
                total_tiles: tiles.len(),
            });
        }
        let out = match ckpt.as_ref().map(|c| c.load(ti)).transpose()?.flatten() {
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
                    tile.clone(),
                    floor,
                    &mut summary,
                )?;
                if let Some(c) = &ckpt {
                    c.save(ti, &t)?;
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
        done += tile.len();
        if let Some(p) = ctx.progress {
            p(DedupProgress {
                done,
                total: summary.probes,
                pairs: pairs.len(),
            });
        }
    }
    pairs.sort_by_key(|p| (p.row_a, p.row_b));
    let hit_rows: Vec<(usize, usize)> = pairs
        .iter()
        .filter(|p| p.score() >= threshold)
        .map(|p| (p.row_a as usize, p.row_b as usize))
        .collect();
    let clusters: Vec<Vec<String>> = crate::cluster::union_find(rows, &hit_rows)
        .into_iter()
        .map(|c| {
            c.into_iter()
                .map(|r| snap.subject_id(r).to_string())
                .collect()
        })
        .collect();
    if let Some(rec) = &recorder {
        // The boundary evidence is taken at the complete cosines: with relaxed budgets the pairs between them
        // and the run's cosines are never looked for, and count as missed.
        let complete = ctx.calibration.candidate_cosines(floor);
        let exact =
            crate::audit::exact_sample(snap, ctx.calibration, &audit_sample, floor, &complete)?;
        let reported: std::collections::HashSet<(u32, u32)> =
            pairs.iter().map(|p| (p.row_a, p.row_b)).collect();
        // With complete budgets and no partition, completeness follows from the sketch model alone.
        let construction = match &run_index {
            Some(ri) if genuine_miss == 0.0 && ri.plans().iter().all(|p| p.path != "ivf") => {
                // Only brute-force sketch joins can drop a pair; exact joins drop none.
                let drop: f64 = ri
                    .modalities
                    .iter()
                    .zip(&cuts)
                    .filter(|(rm, _)| rm.as_ref().is_some_and(|rm| rm.plan.path == "brute"))
                    .filter_map(|(_, c)| c.map(|(p, f)| p.drop_at_threshold + f.drop_at_threshold))
                    .sum();
                let how = if drop > 0.0 {
                    format!(
                        "every candidate modality searched without a partition (exact GEMM or every pair by sketch); sketch drop ≤ {drop:.1e} per pair at the candidate cosines"
                    )
                } else {
                    "every candidate modality searched by exact GEMM".to_string()
                };
                Some((1.0 - drop, how))
            }
            _ => None,
        };
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
                    &audit_sample,
                    crate::audit::SYNTHETIC_PER_ROW,
                    opts.audit.seed ^ 0x5e1f ^ mi as u64,
                );
                synthetic.push((rm.plan.modality.clone(), f, n));
            }
        }
        summary.audit = Some(crate::audit::assess(
            snap,
            &opts.audit,
            &audit_sample,
            rows - first_probe,
            &exact,
            &reported,
            rec,
            threshold,
            floor,
            construction,
            synthetic,
        ));
    }
    summary.reported_pairs = pairs.len();
    summary.hits = hit_rows.len();
    summary.clusters = clusters.len();
    summary.total_seconds = start.elapsed().as_secs_f64();
    summary.records_per_second = summary.probes as f64 / summary.total_seconds.max(1e-9);
    summary.score_histogram = histogram(pairs.iter().map(DedupPair::score), 5.0);
    if let Some(c) = ckpt {
        c.finish()?;
    }
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
    let mut join_stats = vec![JoinStats::default(); snap.schema().modalities.len()];
    for (mi, spec) in snap.schema().modalities.iter().enumerate() {
        let Some(c) = cand_cos.get(mi).copied().flatten() else {
            continue;
        };
        // The index join applies the fused verdict to its pairs as it finds them (candidates are not
        // stored); every pair it reaches for an audited row is noted first.
        let accept = |a: u32, b: u32, _: f32| {
            if recorder.is_some_and(|r| r.sampled(b)) {
                reached
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((mi as u8, a, b));
            }
            fused_rows(snap, cal, a as usize, b as usize).score >= floor
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
                cut: StagedCut {
                    prefix_words: crate::annset::SKETCH_PREFIX_BITS / 64,
                    prefix_cut: p.cut,
                    cut: f.cut,
                },
            }),
            &accept,
            &mut join_stats[mi],
            &mut cand,
        )?;
        // The exact path's pairs are all reached candidates (the join noted its own in `accept`).
        if !run.is_some_and(|r| r.joins(mi))
            && let Some(r) = recorder
        {
            let mut v = reached.lock().unwrap_or_else(|p| p.into_inner());
            v.extend(
                cand[before..]
                    .iter()
                    .filter(|p| r.sampled(p.1))
                    .map(|&(a, b)| (mi as u8, a, b)),
            );
        }
        // Pairs of the exact path are candidates; the index join counts those it rescored above `c`.
        candidates += (cand.len() - before - joined) as u64 + join_stats[mi].above;
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

/// Finished tiles of an interrupted run, keyed by everything that determines their content.
struct Checkpoint {
    dir: PathBuf,
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
        })
    }

    fn path(&self, tile: usize) -> PathBuf {
        self.dir.join(format!("tile-{tile:08}.json"))
    }

    fn load(&self, tile: usize) -> Result<Option<TileOutput>, EngineError> {
        let p = self.path(tile);
        match std::fs::read(&p) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(t) => Ok(Some(t)),
                // A torn checkpoint is recomputed, never trusted.
                Err(_) => Ok(None),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EngineError::io("reading", &p, e)),
        }
    }

    fn save(&self, tile: usize, out: &TileOutput) -> Result<(), EngineError> {
        let p = self.path(tile);
        let bytes = serde_json::to_vec(out).map_err(|e| EngineError::Corrupt {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        crate::fsutil::write_atomic(&p, &bytes)
    }

    fn finish(self) -> Result<(), EngineError> {
        crate::fsutil::write_private(&self.dir.join("complete"), b"ok")
            .map_err(|e| EngineError::io("writing", &self.dir, e))
    }
}
