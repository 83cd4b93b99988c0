//! The `Engine` facade the registry calls: insert, identify (1:N), verify (1:1), delete, batch dedup,
//! calibrate, index, compact.

use crate::candidates;
use crate::dedup::{self, DedupContext, DedupOptions, DedupProgress, DedupResult};
use crate::derived::{
    Artefact, ArtefactStatus, CALIBRATION_FILE, DerivedIdentity, DerivedProblem, ENGINE_DIR,
    INDEX_DIR, INDEX_META, seal, unseal,
};
use crate::fusion::{
    Calibration, Gaussian, GrowthRule, ImpostorBody, ModalityModel, ModalityTailCheck, PoolGrowth,
    QualityBands, threshold_for_fpir,
};
use crate::matcher::{Comparison, Probe, compare_probe, compare_rows};
use crate::store::{Enrolment, InsertReport, Schema, Snapshot, Store, Template};
use crate::tail::{self, TailModel};
use crate::{AnnSet, EngineError, fsutil};
use pacha_datasets::{Modality, RecordBatch};
use pacha_index::view::RowsF32;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

/// Options of a 1:N identification.
#[derive(Clone, Debug)]
pub struct IdentifyOptions<'a> {
    /// At most this many candidates are returned.
    pub max_results: usize,
    /// Target false-positive identification rate; the threshold is `FMR = FPIR / N` for a gallery of N.
    pub target_fpir: f64,
    /// Restrict the search to these subjects (scanned exactly).
    pub gallery: Option<&'a [String]>,
    /// Return candidates down to this calibrated score instead of the FPIR threshold (for investigation).
    pub min_score: Option<f64>,
    /// How [`Engine::identify_batch`] searches its probes (ignored by [`Engine::identify`]).
    pub batch_scan: crate::identify::BatchScan,
}

impl Default for IdentifyOptions<'_> {
    fn default() -> Self {
        IdentifyOptions {
            max_results: 10,
            target_fpir: crate::fusion::DEFAULT_FPIR,
            gallery: None,
            min_score: None,
            batch_scan: crate::identify::BatchScan::Auto,
        }
    }
}

/// One candidate of an identification.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The enrolled subject.
    pub subject_id: String,
    /// Per-modality evidence and the fused score.
    pub comparison: Comparison,
}

/// The answer to an identification.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IdentifyResult {
    /// Calibrated score threshold used.
    pub threshold: f64,
    /// Candidates at or above the threshold, by score descending then subject ID.
    pub candidates: Vec<Candidate>,
    /// Enrolments compared exactly.
    pub compared: usize,
}

/// The answer to a 1:1 verification.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerifyResult {
    /// Per-modality evidence and the fused score.
    pub comparison: Comparison,
    /// Whether the fused score reaches the threshold.
    pub is_match: bool,
    /// Calibrated score threshold used.
    pub threshold: f64,
}

/// Options of a calibration.
#[derive(Clone, Debug)]
pub struct CalibrateOptions<'a> {
    /// Random impostor pairs sampled from the store per modality.
    pub impostor_pairs: usize,
    /// Live rows the impostor pairs are drawn from: all of them up to this many, else a seeded sample of
    /// this many read in one streamed pass (default [`CALIBRATION_ROWS`]).
    pub pool_rows: usize,
    /// Labelled genuine pairs (subject IDs), e.g. from a ground-truth file; `None` keeps default genuine models.
    pub genuine: Option<&'a [(String, String)]>,
    /// Seed of the pair sampler.
    pub seed: u64,
    /// Rows whose every pair is scored to count and fit the impostor tail ([`crate::tail`]); 0 keeps the
    /// Gaussian upper-tail fit alone. Default [`TAIL_ROWS`].
    pub tail_rows: usize,
    /// Quality bands per modality ([`crate::fusion::QualityBands`]); below 2, pooled models only. Bands are
    /// kept only where the store's qualities vary and they move the impostor tail. Default
    /// [`QUALITY_BANDS`].
    pub quality_bands: usize,
    /// How the tail count's pool is drawn (default [`TailPool::Hubs`]).
    pub tail_pool: TailPool,
    /// Most rows the tail pool may grow to (default [`TAIL_ROWS_MAX`]): where a labelled count does not pin
    /// a modality's measured ÷ predicted FMR within [`crate::evaluation::TAIL_TOLERANCE`] at the decision FMR
    /// (`decision_fpir` / live rows), or any pool is too small for a tail fit, its pool is doubled and counted
    /// again, up to this many rows or the whole store, unless a larger pool cannot add events there
    /// ([`TAIL_GROWTH_COVERAGE_MAX`], [`TAIL_GROWTH_GAIN_MIN`]). At or below `tail_rows`, the pool never grows.
    pub tail_rows_max: usize,
    /// FPIR of the dedup this calibration serves (default [`crate::fusion::DEFAULT_FPIR`]): with the live
    /// rows, it sets the FMR the pool grows to resolve.
    pub decision_fpir: f64,
}

/// How a calibration draws the rows whose every pair it counts for the impostor tail. (`Uniform` is the
/// serde default: calibration files from before the hub pool were counted on uniform pools.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TailPool {
    /// A seeded uniform sample of live rows ([`tail_pool`]), shared by every modality. Its count of a
    /// store with hubs (rows near many others) varies from pool to pool far beyond Poisson: ±30 % at 1e-7
    /// on 60 000 of 100 000 rows (BENCHMARKS.md, "Hubs").
    #[default]
    Uniform,
    /// Per modality, rows drawn with a chance that grows with their hubness, each counted pair weighted by
    /// the inverse of its rows' chances ([`hub_pool`]): the hubs, which put many events into one count, are
    /// counted with certainty, so the count estimates the store's FMR with far less spread.
    Hubs,
}

/// Default number of quality bands per modality.
pub const QUALITY_BANDS: usize = 3;
/// Bands are kept only if some band's sampled survival at the pooled tail threshold differs from the pooled
/// one by at least this factor (either way); below it, quality does not measurably move the tail.
pub const BAND_EFFECT_MIN: f64 = 1.25;

/// Default pool of rows whose all pairs a calibration counts for the impostor tail: 60 000 rows are
/// 1.8·10⁹ pairs, enough to resolve an FMR of 1e-7 with 180 events. 40 000 rows (8·10⁸ pairs) left the
/// structured population's face 1.5–2.1× under its out-of-sample count at 1e-6–1e-7: where families put
/// correlated pairs in the tail, which families fall in the pool varies, and a larger pool averages more of
/// them (BENCHMARKS.md, "Calibration pool size"). The count costs about twice the 40 000 rows' time.
pub const TAIL_ROWS: usize = 60_000;

/// Default bound on a growing tail pool ([`CalibrateOptions::tail_rows_max`]): 320 000 rows (5·10¹⁰ pairs)
/// matched every pair of a 1 M store within 1.03× down to 1e-9 on face, finger 2 and finger 7, where the default
/// 60 000 rows read finger 7 at 0.62 (BENCHMARKS.md, "The count's memory bound"); they cost 2–3 min and
/// 2.5–4.2 GB per modality at 1 M.
pub const TAIL_ROWS_MAX: usize = 320_000;

/// A grown tail pool must multiply the independent events at the decision FMR (events over their design
/// effect) by at least this much, or it stops growing: at 1 M face, 120 000 → 240 000 hub-pool rows took them
/// from 24.3 to 24.1 (the tail's events sit on hub rows every pool counts), where an unsaturated doubling
/// multiplies them by 2.5–4.
pub const TAIL_GROWTH_GAIN_MIN: f64 = 1.25;

/// A tail pool that already counted this share of the pairs the store holds at the decision FMR (its
/// measured share times the store's pairs) stops growing: a larger pool could at most double its events.
/// At 100 k (face + 2 fingers) the default 60 000-row hub pool counts 46 / 42 / 53 events at 1e-8 where every
/// pair of the store gives 46 / 44 / 53: growing it to the whole store narrowed nothing. At 1 M the 120 000-row
/// pools hold 423 of ≈ 514 (face) and 336 of ≈ 476 (finger 7) (BENCHMARKS.md, "A tail pool that grows").
pub const TAIL_GROWTH_COVERAGE_MAX: f64 = 0.5;

/// When a labelled calibration's tail pool grows: the 1.5× tolerance and the two stops above.
const GROWTH_RULE: GrowthRule = GrowthRule {
    tolerance: crate::evaluation::TAIL_TOLERANCE,
    gain_min: TAIL_GROWTH_GAIN_MIN,
    coverage_max: TAIL_GROWTH_COVERAGE_MAX,
};

/// The live rows holding modality `m`, ascending.
fn rows_holding(snap: &Snapshot, m: Modality) -> impl Iterator<Item = usize> + '_ {
    (0..snap.rows()).filter(move |&r| !snap.is_deleted(r) && snap.template(m, r).is_some())
}

/// Live rows holding modality `m`, and the pairs among them.
fn store_pairs_of(snap: &Snapshot, m: Modality) -> (usize, f64) {
    let holding = rows_holding(snap, m).count();
    let n = holding as f64;
    (holding, n * (n - 1.0) / 2.0)
}

/// The FMR a dedup at `fpir` over `live` rows decides at: each probe meets every other row once.
pub fn decision_fmr(fpir: f64, live: usize) -> f64 {
    fpir / live.max(1) as f64
}

impl Default for CalibrateOptions<'_> {
    fn default() -> Self {
        CalibrateOptions {
            impostor_pairs: 1_000_000,
            pool_rows: CALIBRATION_ROWS,
            genuine: None,
            seed: 0x5eed,
            tail_rows: TAIL_ROWS,
            quality_bands: QUALITY_BANDS,
            tail_pool: TailPool::Hubs,
            tail_rows_max: TAIL_ROWS_MAX,
            decision_fpir: crate::fusion::DEFAULT_FPIR,
        }
    }
}

/// Raw score samples a calibration used (for evaluation plots).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CalibrationSamples {
    /// Per modality key: impostor cosines sampled.
    pub impostor: Vec<(String, Vec<f64>)>,
    /// Per modality key: genuine cosines of the labelled pairs.
    pub genuine: Vec<(String, Vec<f64>)>,
}

/// Counts and state for `info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineInfo {
    /// Store directory.
    pub dir: PathBuf,
    /// Schema.
    pub schema: Schema,
    /// Committed rows, including deleted ones.
    pub rows: usize,
    /// Live enrolments.
    pub live: usize,
    /// Store generation (bumps on compaction).
    pub generation: u64,
    /// Rows covered by the ANN index, if a valid one is saved.
    pub indexed_rows: Option<usize>,
    /// The index: ok (what it covers), none, or corrupt (why, and how to rebuild it).
    pub index_state: ArtefactStatus,
    /// Where the score models came from.
    pub calibration: String,
    /// The calibration: ok, none (uncalibrated: dedup and identify fit impostor models at match time), or
    /// corrupt (why, and how to rebuild it).
    pub calibration_state: ArtefactStatus,
    /// SIMD level the kernels use.
    pub simd: String,
    /// Kernel of the i8 joins and joint scans (`"amx"`, `"vnni"`, `"avx2"`, `"scalar"`).
    pub i8_kernel: String,
}

/// The registry: a store, its score calibration and its ANN index. `Send + Sync`: identifies may run on many
/// threads alongside one writer; every identify sees every insert that returned before it.
pub struct Engine {
    store: Store,
    calibration: RwLock<Arc<Calibration>>,
    /// Whether `engine/calibration.json` was loaded, is missing, or is unusable (then `calibration` holds
    /// the defaults and every matching call is refused until `calibrate` replaces the file).
    cal_state: RwLock<CalState>,
    ann: RwLock<Option<Arc<AnnSet>>>,
    /// Why the saved index is unusable, if it is (dedup and identify are refused until `build_index`).
    ann_problem: RwLock<Option<DerivedProblem>>,
    /// Stored rows prepared for identify batches' joint scans, kept between batches.
    pub(crate) scan_cache: crate::joint::ScanCache,
}

/// State of the saved calibration.
#[derive(Clone, Debug)]
enum CalState {
    Missing,
    Saved(DerivedIdentity),
    Invalid(DerivedProblem),
}

/// Kind of the sealed `calibration.json`.
const CALIBRATION_KIND: &str = "calibration";

/// The body of `calibration.json`.
#[derive(Serialize, Deserialize)]
struct SavedCalibration {
    identity: DerivedIdentity,
    calibration: Calibration,
}

fn read_lock<T: Clone>(l: &RwLock<T>) -> T {
    l.read()
        .map(|g| g.clone())
        .unwrap_or_else(|p| p.into_inner().clone())
}

fn write_lock<T>(l: &RwLock<T>, v: T) {
    match l.write() {
        Ok(mut g) => *g = v,
        Err(p) => *p.into_inner() = v,
    }
}

/// Reads and verifies `<store_dir>/engine/calibration.json`: `None` if there is none; the calibration and
/// its identity; or why it cannot be used (unreadable, old format, checksum, schema, or derived from another
/// generation, store or pacha version — the identity is verified only when `snap` is given).
pub(crate) fn load_calibration_file(
    store_dir: &Path,
    snap: Option<&Snapshot>,
) -> Result<Option<(Calibration, DerivedIdentity)>, DerivedProblem> {
    let path = store_dir.join(ENGINE_DIR).join(CALIBRATION_FILE);
    let problem = |what: String| DerivedProblem::new(Artefact::Calibration, store_dir, &path, what);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(problem(format!("cannot read: {e}"))),
    };
    let body = unseal(CALIBRATION_KIND, &bytes).map_err(problem)?;
    let saved: SavedCalibration =
        serde_json::from_slice(body).map_err(|e| problem(format!("does not decode: {e}")))?;
    let keys: Vec<String> = saved
        .identity
        .schema
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    let models: Vec<String> = saved
        .calibration
        .models
        .iter()
        .map(|(m, _)| m.key())
        .collect();
    if keys != models {
        return Err(problem(format!(
            "models for {models:?}, identity schema {keys:?}"
        )));
    }
    if let Some(snap) = snap {
        saved.identity.verify(snap).map_err(problem)?;
    }
    Ok(Some((saved.calibration, saved.identity)))
}

/// Writes `cal` as the sealed calibration of the store in `store_dir` with `identity`.
fn save_calibration_file(
    store_dir: &Path,
    cal: &Calibration,
    identity: &DerivedIdentity,
) -> Result<(), EngineError> {
    let dir = store_dir.join(ENGINE_DIR);
    crate::fsutil::create_private_dir_all(&dir)
        .map_err(|e| EngineError::io("creating", &dir, e))?;
    let json = serde_json::to_vec_pretty(&SavedCalibration {
        identity: identity.clone(),
        calibration: cal.clone(),
    })
    .map_err(|e| EngineError::InvalidArgument(format!("cannot serialise calibration: {e}")))?;
    fsutil::write_atomic(&dir.join(CALIBRATION_FILE), &seal(CALIBRATION_KIND, &json))
}

impl Engine {
    /// Creates a new registry in `dir` with `schema`.
    pub fn create(dir: &Path, schema: Schema) -> Result<Engine, EngineError> {
        let store = Store::create(dir, schema)?;
        let cal = Calibration::defaults(&store.schema().modality_list());
        Ok(Engine {
            store,
            calibration: RwLock::new(Arc::new(cal)),
            cal_state: RwLock::new(CalState::Missing),
            ann: RwLock::new(None),
            ann_problem: RwLock::new(None),
            scan_cache: Default::default(),
        })
    }

    /// Opens an existing registry: validates the store, loads the calibration and the ANN index if present.
    pub fn open(dir: &Path) -> Result<Engine, EngineError> {
        Engine::with_store(Store::open(dir)?)
    }

    /// Opens an existing registry read-only ([`Store::open_read_only`]): no lock, nothing written, runs
    /// beside a writer and other readers on the snapshot of the commit it opened. Inserts, deletes,
    /// compaction, calibration and index builds return [`EngineError::ReadOnly`].
    pub fn open_read_only(dir: &Path) -> Result<Engine, EngineError> {
        Engine::with_store(Store::open_read_only(dir)?)
    }

    /// Loads the calibration and the ANN index of `store`. A corrupt, old-format or foreign calibration or
    /// index does not fail the open: the problem is kept, reported by [`Engine::info`], and returned by the
    /// operations that need the artefact ([`EngineError::Derived`]), while [`Engine::calibrate`] and
    /// [`Engine::build_index`] replace it.
    fn with_store(store: Store) -> Result<Engine, EngineError> {
        let dir = store.dir().to_path_buf();
        let mods = store.schema().modality_list();
        let snap = store.snapshot();
        let (cal, cal_state) = match load_calibration_file(&dir, Some(&snap)) {
            Ok(Some((cal, id))) => (cal, CalState::Saved(id)),
            Ok(None) => (Calibration::defaults(&mods), CalState::Missing),
            Err(p) => {
                tracing::warn!("{}", p.to_error());
                (Calibration::defaults(&mods), CalState::Invalid(p))
            }
        };
        // `index.json` is replaced last by a save: a reader running beside `build_index` reloads if it moved.
        let index_dir = dir.join(ENGINE_DIR).join(INDEX_DIR);
        let loaded =
            fsutil::load_stable(&dir, &index_dir.join(INDEX_META), || {
                match AnnSet::load(&dir, &index_dir, &snap) {
                    Ok(a) => Ok(Ok(a)),
                    Err(EngineError::Derived {
                        artefact,
                        path,
                        problem,
                        rebuild,
                    }) => Ok(Err(DerivedProblem {
                        artefact: if artefact == "index" {
                            Artefact::Index
                        } else {
                            Artefact::Calibration
                        },
                        path,
                        problem,
                        rebuild,
                    })),
                    Err(e) => Err(e),
                }
            })?;
        let (ann, ann_problem) = match loaded {
            Ok(a) => (a, None),
            Err(p) => {
                tracing::warn!("{}", p.to_error());
                (None, Some(p))
            }
        };
        Ok(Engine {
            store,
            calibration: RwLock::new(Arc::new(cal)),
            cal_state: RwLock::new(cal_state),
            ann: RwLock::new(ann.map(Arc::new)),
            ann_problem: RwLock::new(ann_problem),
            scan_cache: Default::default(),
        })
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The current committed snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.store.snapshot()
    }

    /// The current calibration.
    pub fn calibration(&self) -> Arc<Calibration> {
        self.calibration
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Where a dedup at `fpir` decides on this store (the FMR [`decision_fmr`] of the live rows) and, per
    /// modality whose current calibration's count does not pin measured ÷ predicted there within
    /// [`crate::evaluation::TAIL_TOLERANCE`] ([`ModalityTailCheck::resolution_at`]), a note saying so and what
    /// could narrow it: a larger pool (`tail_rows_max`), `--truth` labels, or nothing once every pair was counted.
    pub fn resolution_notes(&self, fpir: f64) -> (f64, Vec<String>) {
        let snap = self.snapshot();
        let live = snap.live().max(1);
        let fmr = decision_fmr(fpir, live);
        let cal = self.calibration();
        let notes = cal
            .tail_checks
            .iter()
            .filter_map(|c| {
                let (m, model) = cal.models.iter().find(|(m, _)| m.key() == c.modality)?;
                // A larger pool narrows a count's interval, not a fit that stops short for want of labels.
                let unlabelled = model
                    .impostor_tail
                    .is_some_and(|t| t.truncated_at.is_some());
                let n = c.resolution_at(fmr, crate::evaluation::TAIL_TOLERANCE, unlabelled)?;
                let (holding, store_pairs) = store_pairs_of(&snap, *m);
                let advice = if unlabelled {
                    String::new()
                } else if c.pool_cap >= holding {
                    "; every pair of the store was counted: no pool can narrow it".to_string()
                } else if let PoolGrowth::Saturated { reason, .. } =
                    c.pool_growth(fmr, &GROWTH_RULE, None, store_pairs)
                {
                    format!("; {reason}")
                } else {
                    format!(
                        "; a pool larger than its {} rows (tail_rows_max, --tail-rows-max) narrows it",
                        c.pool_cap
                    )
                };
                Some(format!(
                    "{n} (a dedup at FPIR {fpir:.0e} over {live} rows decides at FMR {fmr:.1e}){advice}"
                ))
            })
            .collect();
        (fmr, notes)
    }

    /// The calibration a matching call uses: the saved one, or — on a store never calibrated — impostor
    /// models fitted from the store itself now (default genuine models; kept in memory, not saved, and
    /// named as such in the calibration's `source`), never the built-in guesses.
    /// A saved calibration that is corrupt or belongs to something else is an error
    /// ([`EngineError::Derived`]: rebuild it with `pacha calibrate`).
    pub fn matching_calibration(&self, snap: &Snapshot) -> Result<Arc<Calibration>, EngineError> {
        let cal = self.usable_calibration()?;
        if cal.source != "defaults" || snap.live() < 2 {
            return Ok(cal);
        }
        tracing::warn!(
            "the store has no calibration: fitting impostor models from the store itself (run `pacha calibrate` to keep them)"
        );
        let (mut fitted, _) = fit_calibration(snap, &cal, &CalibrateOptions::default())?;
        fitted.source = format!(
            "fitted from the store at match time (uncalibrated store; impostor models from {} live rows, default genuine models)",
            snap.live()
        );
        let fitted = Arc::new(fitted);
        if let Ok(mut c) = self.calibration.write() {
            *c = fitted.clone();
        }
        Ok(fitted)
    }

    /// The current calibration, or [`EngineError::Derived`] if the saved one is unusable (a store never
    /// calibrated gives the defaults; [`Engine::matching_calibration`] fits from the store instead).
    pub fn usable_calibration(&self) -> Result<Arc<Calibration>, EngineError> {
        if let CalState::Invalid(p) = read_lock(&self.cal_state) {
            return Err(p.to_error());
        }
        Ok(self.calibration())
    }

    pub(crate) fn ann(&self) -> Option<Arc<AnnSet>> {
        read_lock(&self.ann)
    }

    /// The loaded index (`None` if there is none), or [`EngineError::Derived`] if the saved one is unusable.
    pub(crate) fn usable_ann(&self) -> Result<Option<Arc<AnnSet>>, EngineError> {
        match read_lock(&self.ann_problem) {
            Some(p) => Err(p.to_error()),
            None => Ok(self.ann()),
        }
    }

    /// Why the saved index or calibration cannot be used, if either cannot.
    pub fn derived_problems(&self) -> Vec<DerivedProblem> {
        let mut out: Vec<DerivedProblem> = read_lock(&self.ann_problem).into_iter().collect();
        if let CalState::Invalid(p) = read_lock(&self.cal_state) {
            out.push(p);
        }
        out
    }

    /// Live enrolments.
    pub fn count(&self) -> usize {
        self.snapshot().live()
    }

    /// Enrols one person; durable on return. Re-inserting an identical enrolment is Ok.
    pub fn insert(&self, enrolment: &Enrolment) -> Result<InsertReport, EngineError> {
        self.store.insert(std::slice::from_ref(enrolment))
    }

    /// Enrols a batch atomically (all or nothing); durable on return.
    pub fn insert_batch(&self, enrolments: &[Enrolment]) -> Result<InsertReport, EngineError> {
        self.store.insert(enrolments)
    }

    /// Enrols a columnar batch atomically; durable on return.
    pub fn insert_records(&self, batch: &RecordBatch) -> Result<InsertReport, EngineError> {
        self.store.insert_batch(batch)
    }

    /// Deletes an enrolment (durable tombstone). Returns false if the subject was not enrolled.
    pub fn delete(&self, subject_id: &str) -> Result<bool, EngineError> {
        self.store.delete(subject_id)
    }

    /// Rewrites the store without deleted rows. Row numbers change, so the ANN index is dropped (rebuild it
    /// with [`Engine::build_index`]).
    pub fn compact(&self) -> Result<crate::store::CompactReport, EngineError> {
        let report = self.store.compact()?;
        write_lock(&self.ann, None);
        write_lock(&self.ann_problem, None);
        AnnSet::remove(&self.store.dir().join(ENGINE_DIR).join(INDEX_DIR))?;
        // A saved calibration is a statistic of the population, which compaction keeps (minus deleted rows):
        // it is re-stamped with the new generation's identity, keeping the parameters it was fitted with.
        if let CalState::Saved(old) = read_lock(&self.cal_state) {
            let snap = self.snapshot();
            let id = DerivedIdentity::of(
                &snap,
                format!(
                    "{} (carried over from generation {})",
                    old.params, old.generation
                ),
            );
            save_calibration_file(self.store.dir(), &self.calibration(), &id)?;
            write_lock(&self.cal_state, CalState::Saved(id));
        }
        Ok(report)
    }

    /// The loaded ANN index, if any (for analysis tools such as the scale bench's recall breakdown).
    pub fn index(&self) -> Option<Arc<AnnSet>> {
        self.ann()
    }

    /// Builds (or rebuilds) the ANN index over every committed row and saves it, replacing a saved index
    /// whatever its state (corrupt, old format, foreign).
    pub fn build_index(
        &self,
        params: &crate::annset::AnnParams,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
    ) -> Result<(), EngineError> {
        self.store.ensure_writable("build the index")?;
        let snap = self.snapshot();
        let set = AnnSet::build(&snap, params, progress)?;
        set.save(&self.store.dir().join(ENGINE_DIR).join(INDEX_DIR), &snap)?;
        write_lock(&self.ann, Some(Arc::new(set)));
        write_lock(&self.ann_problem, None);
        Ok(())
    }

    /// 1:N identification of a probe against the registry (or against `options.gallery` only).
    pub fn identify(
        &self,
        probe: &[Template],
        options: &IdentifyOptions<'_>,
    ) -> Result<IdentifyResult, EngineError> {
        let snap = self.snapshot();
        let cal = self.matching_calibration(&snap)?;
        let probe = Probe::new("probe", probe, snap.schema())?;
        self.identify_probe(&snap, &cal, &probe, options)
    }

    /// [`Engine::identify`] of a validated probe against one snapshot and calibration (a batch searches
    /// every probe, and audits them, against the same ones).
    pub(crate) fn identify_probe(
        &self,
        snap: &Snapshot,
        cal: &Calibration,
        probe: &Probe,
        options: &IdentifyOptions<'_>,
    ) -> Result<IdentifyResult, EngineError> {
        if options.max_results == 0 {
            return Err(EngineError::InvalidArgument(
                "max_results must be at least 1".into(),
            ));
        }
        let gallery_rows: Option<Vec<usize>> = match options.gallery {
            Some(ids) => Some(
                ids.iter()
                    .map(|id| {
                        snap.row_of(id)
                            .ok_or_else(|| EngineError::UnknownSubject(id.clone()))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            None => None,
        };
        let n = gallery_rows.as_ref().map_or(snap.live(), Vec::len);
        let threshold = threshold_for_fpir(options.target_fpir, n)?;
        let floor = options.min_score.unwrap_or(threshold);
        let rows: Vec<usize> = match gallery_rows {
            Some(r) => r,
            None => {
                let mut rows: Vec<usize> = self
                    .identify_candidates(snap, cal, probe, floor)?
                    .into_iter()
                    .flatten()
                    .collect();
                rows.sort_unstable();
                rows.dedup();
                rows
            }
        };
        Ok(answer(
            snap,
            cal,
            probe,
            &rows,
            threshold,
            floor,
            options.max_results,
        ))
    }

    /// Rows worth comparing exactly with `probe`, per modality (schema order): rows whose cosine can matter
    /// for `floor`, from the index and an exact scan of the rows it does not cover.
    pub(crate) fn identify_candidates(
        &self,
        snap: &Snapshot,
        cal: &Calibration,
        probe: &Probe,
        floor: f64,
    ) -> Result<Vec<Vec<usize>>, EngineError> {
        let cand_cos = probe_candidate_cosines(snap, cal, probe, floor);
        let ann = self.usable_ann()?.filter(|a| a.covers(snap));
        let mut per = vec![Vec::new(); snap.schema().modalities.len()];
        for (mi, spec) in snap.schema().modalities.iter().enumerate() {
            let rows = &mut per[mi];
            let (Some(q), Some(view), Some(c)) = (
                &probe.templates[mi],
                snap.f32_rows(spec.modality),
                cand_cos.get(mi).copied().flatten(),
            ) else {
                continue;
            };
            let from = match &ann {
                Some(a) if snap.live() > candidates::AUTO_EXACT_MAX_ROWS => {
                    let impostor = cal
                        .model(spec.modality)
                        .map(|m| (m.impostor.mean, m.impostor.sd));
                    rows.extend(
                        a.search(snap, mi, q, c, impostor)?
                            .into_iter()
                            .map(|(r, _)| r as usize),
                    );
                    a.rows()
                }
                _ => 0,
            };
            // Exact scan of every row the index does not cover (all rows without an index): the second tier.
            let fresh: Vec<usize> = (from..snap.rows())
                .into_par_iter()
                .filter(|&r| {
                    snap.is_present(spec.modality, r)
                        && pacha_index::kernels::dot_f32(q, view.row(r)) >= c
                })
                .collect();
            rows.extend(fresh);
        }
        Ok(per)
    }

    /// 1:1 verification of two enrolled subjects. `threshold` is a calibrated score (default 50: FMR 1e-5).
    pub fn verify(
        &self,
        a: &str,
        b: &str,
        threshold: Option<f64>,
    ) -> Result<VerifyResult, EngineError> {
        let snap = self.snapshot();
        let cal = self.usable_calibration()?;
        let ra = snap
            .row_of(a)
            .ok_or_else(|| EngineError::UnknownSubject(a.to_string()))?;
        let rb = snap
            .row_of(b)
            .ok_or_else(|| EngineError::UnknownSubject(b.to_string()))?;
        let comparison = compare_rows(&snap, &cal, ra, rb);
        let threshold = threshold.unwrap_or(50.0);
        Ok(VerifyResult {
            is_match: comparison.fused.score >= threshold,
            comparison,
            threshold,
        })
    }

    /// 1:1 verification of a probe against an enrolled subject.
    pub fn verify_probe(
        &self,
        probe: &[Template],
        subject: &str,
        threshold: Option<f64>,
    ) -> Result<VerifyResult, EngineError> {
        let snap = self.snapshot();
        let cal = self.usable_calibration()?;
        let probe = Probe::new("probe", probe, snap.schema())?;
        let r = snap
            .row_of(subject)
            .ok_or_else(|| EngineError::UnknownSubject(subject.to_string()))?;
        let comparison = compare_probe(&snap, &cal, &probe, r);
        let threshold = threshold.unwrap_or(50.0);
        Ok(VerifyResult {
            is_match: comparison.fused.score >= threshold,
            comparison,
            threshold,
        })
    }

    /// Batch deduplication over the current snapshot (see [`crate::dedup`]).
    pub fn dedup(
        &self,
        options: &DedupOptions,
        progress: Option<&(dyn Fn(DedupProgress) + Sync)>,
        cancel: Option<&AtomicBool>,
    ) -> Result<DedupResult, EngineError> {
        self.with_dedup_context(progress, cancel, |ctx| dedup::run(ctx, options))
    }

    /// Runs tile `options.tile` of a dedup ([`dedup::run_part`]): one share of the probe rows, for runs split
    /// over processes or machines; [`dedup::assemble`] (or [`crate::tiles::merge_tiles`] on tile
    /// directories) merges the parts.
    pub fn dedup_part(
        &self,
        options: &DedupOptions,
        progress: Option<&(dyn Fn(DedupProgress) + Sync)>,
        cancel: Option<&AtomicBool>,
    ) -> Result<dedup::RunPart, EngineError> {
        self.with_dedup_context(progress, cancel, |ctx| dedup::run_part(ctx, options))
    }

    /// Runs `f` on the dedup context of the current snapshot (its matching calibration and usable index).
    fn with_dedup_context<T>(
        &self,
        progress: Option<&(dyn Fn(DedupProgress) + Sync)>,
        cancel: Option<&AtomicBool>,
        f: impl FnOnce(&DedupContext<'_>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let snap = self.snapshot();
        let cal = self.matching_calibration(&snap)?;
        let ann = self.usable_ann()?;
        f(&DedupContext {
            snapshot: &snap,
            calibration: &cal,
            ann: ann.as_deref(),
            progress,
            cancel,
        })
    }

    /// Enrols a batch and deduplicates it against the registry and against itself (MOSIP-style batch
    /// insert + identify). The batch is durable before matching starts.
    pub fn dedup_batch(
        &self,
        batch: &RecordBatch,
        options: &DedupOptions,
        progress: Option<&(dyn Fn(DedupProgress) + Sync)>,
    ) -> Result<(InsertReport, DedupResult), EngineError> {
        let before = self.snapshot().rows();
        let report = self.store.insert_batch(batch)?;
        let opts = DedupOptions {
            scope: dedup::DedupScope::RowsFrom(before),
            ..options.clone()
        };
        let result = self.dedup(&opts, progress, None)?;
        Ok((report, result))
    }

    /// Fits the score models from the store (impostor tails from random pairs; genuine models from labelled
    /// pairs when given), saves them (sealed, with the identity of the rows they were fitted on), and returns
    /// the samples used. Replaces a saved calibration whatever its state (corrupt, old format, foreign).
    pub fn calibrate(
        &self,
        options: &CalibrateOptions<'_>,
    ) -> Result<CalibrationSamples, EngineError> {
        self.store.ensure_writable("calibrate")?;
        let snap = self.snapshot();
        // The current models are the fallback for a modality with too few pairs: never an unusable file's.
        let current = match read_lock(&self.cal_state) {
            CalState::Saved(_) => self.calibration(),
            _ => Arc::new(Calibration::defaults(&snap.schema().modality_list())),
        };
        let (cal, samples) = fit_calibration(&snap, &current, options)?;
        let params = format!(
            "impostor_pairs {} pool_rows {} seed {:#x} genuine_pairs {} tail_rows {} quality_bands {}{}{}",
            options.impostor_pairs,
            options.pool_rows,
            options.seed,
            options.genuine.map_or(0, <[_]>::len),
            options.tail_rows,
            options.quality_bands,
            if options.tail_rows_max > options.tail_rows {
                format!(
                    " tail_rows_max {} decision_fpir {:e}",
                    options.tail_rows_max, options.decision_fpir
                )
            } else {
                String::new()
            },
            match options.tail_pool {
                TailPool::Uniform => "",
                TailPool::Hubs => " tail_pool hubs",
            }
        );
        let id = DerivedIdentity::of(&snap, params);
        save_calibration_file(self.store.dir(), &cal, &id)?;
        write_lock(&self.calibration, Arc::new(cal));
        write_lock(&self.cal_state, CalState::Saved(id));
        Ok(samples)
    }

    /// Schema, counts, index and calibration state, and SIMD level.
    pub fn info(&self) -> EngineInfo {
        let snap = self.snapshot();
        let dir = self.store.dir();
        let index_state = match (read_lock(&self.ann_problem), self.ann()) {
            (Some(p), _) => ArtefactStatus::invalid(&p),
            (None, Some(a)) => ArtefactStatus::ok(Artefact::Index, a.identity(), snap.rows()),
            (None, None) => ArtefactStatus::missing(Artefact::Index, dir),
        };
        let calibration_state = match read_lock(&self.cal_state) {
            CalState::Saved(id) => ArtefactStatus::ok(Artefact::Calibration, &id, snap.rows()),
            CalState::Missing => ArtefactStatus::missing(Artefact::Calibration, dir),
            CalState::Invalid(p) => ArtefactStatus::invalid(&p),
        };
        EngineInfo {
            index_state,
            calibration_state,
            dir: self.store.dir().to_path_buf(),
            schema: snap.schema().clone(),
            rows: snap.rows(),
            live: snap.live(),
            generation: snap.generation(),
            indexed_rows: self.ann().filter(|a| a.covers(&snap)).map(|a| a.rows()),
            calibration: self.calibration().source.clone(),
            simd: pacha_index::kernels::simd_level().to_string(),
            i8_kernel: pacha_index::exact_i8::I8Kernel::detect().name().to_string(),
        }
    }
}

/// splitmix64: a tiny deterministic hash for sampling.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Live rows a calibration draws its impostor pairs from: all of them up to this many, else a seeded sample
/// of this many, read in one ascending streamed pass. A million pairs among 2²⁰ rows sample the impostor
/// distribution as well as pairs among all rows, and two million random reads of a store larger than RAM
/// would each go to disk (tens of microseconds apiece).
pub const CALIBRATION_ROWS: usize = 1 << 20;

/// Rows `pool` (ascending) of modality `m` copied densely, and whether each is present, read in ascending
/// batches that are prefetched before and released after.
fn gather_streamed(
    snap: &Snapshot,
    m: Modality,
    dim: usize,
    pool: &[usize],
) -> (Vec<f32>, Vec<bool>) {
    const BATCH: usize = 8192;
    let mut rows = vec![0f32; pool.len() * dim];
    let mut present = vec![false; pool.len()];
    let Ok(()) = pacha_index::stream_batches::<_, std::convert::Infallible>(
        pool,
        BATCH,
        |r| r,
        &snap.f32_pager(m),
        |bi, batch| {
            for (k, &r) in batch.iter().enumerate() {
                let at = bi * BATCH + k;
                if let Some(t) = snap.template(m, r) {
                    rows[at * dim..(at + 1) * dim].copy_from_slice(t);
                    present[at] = true;
                }
            }
            Ok(())
        },
    );
    (rows, present)
}

/// Fits a calibration from a snapshot; see [`Engine::calibrate`].
pub fn fit_calibration(
    snap: &Snapshot,
    current: &Calibration,
    options: &CalibrateOptions<'_>,
) -> Result<(Calibration, CalibrationSamples), EngineError> {
    let live: Vec<usize> = (0..snap.rows()).filter(|&r| !snap.is_deleted(r)).collect();
    if live.len() < 2 {
        return Err(EngineError::Calibration(format!(
            "need at least 2 live enrolments, have {}",
            live.len()
        )));
    }
    let genuine_rows: Vec<(usize, usize)> = match options.genuine {
        Some(pairs) => pairs
            .iter()
            .filter_map(|(a, b)| Some((snap.row_of(a)?, snap.row_of(b)?)))
            .collect(),
        None => Vec::new(),
    };
    let genuine_set: HashSet<(usize, usize)> = genuine_rows
        .iter()
        .map(|&(a, b)| (a.min(b), a.max(b)))
        .collect();
    let mut models = Vec::new();
    let mut tail_checks = Vec::new();
    let mut quality_bands = Vec::new();
    let mut samples = CalibrationSamples::default();
    let mut notes = Vec::new();
    // Impostor pairs are drawn among at most `pool_rows` live rows (a seeded sample in a larger store).
    let cap = options.pool_rows.max(2);
    let pool: Vec<usize> = if live.len() <= cap {
        live
    } else {
        let mut p = live;
        p.select_nth_unstable_by_key(cap, |&r| mix(options.seed ^ r as u64));
        p.truncate(cap);
        p.sort_unstable();
        p
    };
    let sampled = pool.len() < snap.live();
    for spec in &snap.schema().modalities {
        let m = spec.modality;
        let n = options.impostor_pairs;
        // A sampled pool is read in one ascending streamed pass, not at random.
        let gathered = if sampled {
            Some(gather_streamed(snap, m, spec.dim, &pool))
        } else {
            None
        };
        let template = |k: usize| match &gathered {
            Some((rows, present)) => present[k].then(|| &rows[k * spec.dim..(k + 1) * spec.dim]),
            None => snap.template(m, pool[k]),
        };
        let sampled_pairs: Vec<(f64, f32)> = (0..n as u64)
            .into_par_iter()
            .filter_map(|i| {
                let h = mix(options.seed ^ mix(i ^ (u64::from(m_key(m)) << 40)));
                let ka = (h % pool.len() as u64) as usize;
                let kb = ((h >> 32) % pool.len() as u64) as usize;
                let (a, b) = (pool[ka], pool[kb]);
                if a == b || genuine_set.contains(&(a.min(b), a.max(b))) {
                    return None;
                }
                let (x, y) = (template(ka)?, template(kb)?);
                Some((
                    f64::from(pacha_index::kernels::dot_f32(x, y)),
                    crate::matcher::pair_quality(snap, m, a, b),
                ))
            })
            .collect();
        drop(gathered);
        let mut imp: Vec<f64> = sampled_pairs.iter().map(|&(s, _)| s).collect();
        let default = current
            .model(m)
            .cloned()
            .unwrap_or_else(|| ModalityModel::default_for(m));
        let impostor = if imp.len() >= 10_000 {
            Gaussian::fit_upper_tail(&mut imp, 0.99, 0.9999)?
        } else {
            notes.push(format!(
                "{m}: only {} impostor pairs, kept the default impostor model",
                imp.len()
            ));
            default.impostor
        };
        let gen_scores: Vec<f64> = genuine_rows
            .iter()
            .filter_map(|&(a, b)| {
                let (x, y) = (snap.template(m, a)?, snap.template(m, b)?);
                Some(f64::from(pacha_index::kernels::dot_f32(x, y)))
            })
            .collect();
        let genuine = if gen_scores.len() >= 30 {
            Gaussian::fit_moments(&gen_scores)?
        } else {
            if options.genuine.is_some() {
                notes.push(format!(
                    "{m}: only {} genuine pairs, kept the default genuine model",
                    gen_scores.len()
                ));
            }
            default.genuine
        };
        notes.push(format!(
            "{m}: impostor N({:.4}, {:.4}) from {} pairs, genuine N({:.4}, {:.4}) from {} pairs",
            impostor.mean,
            impostor.sd,
            imp.len(),
            genuine.mean,
            genuine.sd,
            gen_scores.len()
        ));
        // `imp` is sorted by the Gaussian fit: the body's knots and the tail's threshold come from it.
        let mut model =
            ModalityModel::new(genuine, impostor, None, ImpostorBody::from_sorted(&imp));
        let mut check = None;
        let mut bands = None;
        if options.tail_rows >= 2 && imp.len() >= ImpostorBody::MIN_SAMPLES {
            let u = tail_threshold(&imp);
            let band_plan = (options.quality_bands >= 2)
                .then(|| {
                    plan_bands(
                        snap,
                        m,
                        &pool,
                        &sampled_pairs,
                        options.quality_bands,
                        (u, sf_at(&imp, u)),
                    )
                })
                .flatten();
            match fit_tail_growing(
                snap,
                m,
                options,
                &genuine_set,
                u,
                &model,
                band_plan.as_ref(),
                &mut notes,
            )? {
                Ok(fit) => {
                    model = fit.model;
                    check = Some(fit.check);
                    match fit.bands {
                        Ok(b) => {
                            if let Some(b) = &b {
                                notes.push(format!(
                                    "{m}: {} quality bands (pair quality edges {:?})",
                                    b.models.len(),
                                    b.edges
                                ));
                            }
                            bands = b;
                        }
                        Err(why) => notes.push(format!("{m}: no quality bands ({why})")),
                    }
                }
                Err(why) => notes.push(format!("{m}: no tail model ({why})")),
            }
            if let Some(Err(why)) = &band_plan {
                notes.push(format!("{m}: no quality bands ({why})"));
            }
        } else if options.quality_bands >= 2 && options.tail_rows >= 2 {
            notes.push(format!(
                "{m}: no quality bands (only {} sampled pairs, fewer than {} per band)",
                imp.len(),
                ImpostorBody::MIN_SAMPLES
            ));
        }
        drop(sampled_pairs);
        if let Some(t) = &model.impostor_tail {
            notes.push(format!(
                "{m}: tail GPD above {:.4} (p_u {:.2e}, xi {:.3}, sigma {:.4}) from {} of {} counted pairs{}{}",
                t.u,
                t.p_u,
                t.xi,
                t.sigma,
                t.exceedances,
                t.pairs,
                t.truncated_at
                    .map_or(String::new(), |v| format!(", truncated at {v:.4} (unlabelled)")),
                t.top.map_or(String::new(), |p| format!(
                    "; the model reads the count itself down to {:.2e} (cosine {:.4}) and a GPD fitted to the {} \
                     counted pairs above it beyond (xi {:.3}, sigma {:.4})",
                    p.p_top, p.u, p.exceedances, p.xi, p.sigma
                ))
            ));
        }
        tail_checks.extend(check);
        quality_bands.push(bands);
        models.push((m, model));
        samples.impostor.push((m.key(), imp));
        samples.genuine.push((m.key(), gen_scores));
    }
    let mut cal = Calibration::from_models(models, format!("fitted: {}", notes.join("; ")));
    cal.tail_checks = tail_checks;
    if quality_bands.iter().any(Option::is_some) {
        cal.quality_bands = quality_bands;
    }
    Ok((cal, samples))
}

/// A seeded pool of up to `cap` live rows for counting a tail: the rows whose hash under `seed` is smallest
/// (`from_top = false`, the calibration's pool) or largest (`from_top = true`, the evaluation's pool, disjoint
/// from the calibration's while `2·cap ≤` live rows), ascending.
pub fn tail_pool(snap: &Snapshot, seed: u64, cap: usize, from_top: bool) -> Vec<usize> {
    let mut live: Vec<usize> = (0..snap.rows()).filter(|&r| !snap.is_deleted(r)).collect();
    if live.len() > cap {
        let key = |r: usize| {
            let k = mix(seed ^ 0x7a11 ^ mix(r as u64));
            if from_top { !k } else { k }
        };
        live.select_nth_unstable_by_key(cap, |&r| key(r));
        live.truncate(cap);
        live.sort_unstable();
    }
    live
}

/// Each drawn row's chance of being drawn into a hub-stratified pool ([`hub_pool`]), by row.
pub type InclusionChances = HashMap<usize, f64>;

/// Most rows of the reference sample a hub pool ranks every row against ([`hub_pool`]).
pub const HUB_REFERENCE_ROWS: usize = 10_000;
/// Fewest reference rows, whatever the store's size.
pub const HUB_REFERENCE_MIN: usize = 2_000;
/// Row pairs the hub ranking may score (rows × reference rows): 10 000 reference rows up to 300 000 rows,
/// 3 000 at 1 M, 2 000 from 1.5 M on (a 10 M store's ranking is then 2·10¹⁰ pairs).
pub const HUB_RANKING_PAIRS: f64 = 3e9;

/// A hub-stratified pool of about `cap` live rows holding modality `m`, with each drawn row's chance `π` of
/// being drawn. Every row's hubness `h` is its number of neighbours at cosine `u` or above among a seeded
/// reference sample of [`HUB_REFERENCE_MIN`]…[`HUB_REFERENCE_ROWS`] rows (as many as keep the ranking within
/// [`HUB_RANKING_PAIRS`]; one exact join of all rows against the sample); row `i`
/// is then drawn, by a seeded hash, with chance `π_i = min(1, c · √(h_i + 1))`, `c` set so the chances sum
/// to `cap`. Rows near many others are kept with certainty, the quiet ones sampled. The chances are `None`
/// where every row is drawn with certainty (at most `cap` rows hold `m`): the plain, unweighted count. Measured offline against every pair of 100 k stores (BENCHMARKS.md,
/// "Hubs"): the count's spread at 1e-7 falls from ±30 % (uniform) to ±1 %.
pub fn hub_pool(
    snap: &Snapshot,
    m: Modality,
    seed: u64,
    cap: usize,
    u: f64,
) -> Result<(Vec<usize>, Option<InclusionChances>), EngineError> {
    let live: Vec<usize> = rows_holding(snap, m).collect();
    if live.len() <= cap {
        return Ok((live, None));
    }
    let dim = snap
        .schema()
        .dim(m)
        .ok_or_else(|| EngineError::Calibration(format!("the store has no {m} modality")))?;
    let mut reference = live.clone();
    let key = |r: usize| mix(seed ^ 0x4eb5 ^ mix(r as u64));
    let reference_rows = ((HUB_RANKING_PAIRS / live.len() as f64) as usize)
        .clamp(HUB_REFERENCE_MIN, HUB_REFERENCE_ROWS);
    if reference.len() > reference_rows {
        reference.select_nth_unstable_by_key(reference_rows, |&r| key(r));
        reference.truncate(reference_rows);
    }
    reference.sort_unstable();
    let (ref_data, ref_rows) = gather_present(snap, m, dim, &reference);
    let ref_view = RowsF32::dense(&ref_data, dim)
        .map_err(|e| EngineError::Calibration(format!("hub reference of {m}: {e}")))?;
    let mut hubness = vec![0u32; live.len()];
    const BLOCK: usize = 65_536;
    for (bi, block) in live.chunks(BLOCK).enumerate() {
        let (data, rows) = gather_present(snap, m, dim, block);
        let view = RowsF32::dense(&data, dim)
            .map_err(|e| EngineError::Calibration(format!("hub ranking of {m}: {e}")))?;
        pacha_index::exact::threshold_join_with(
            view,
            ref_view,
            u as f32,
            None,
            None,
            &mut |batch| {
                for p in batch {
                    // A row is not its own neighbour.
                    if rows[p.a as usize] != ref_rows[p.b as usize] {
                        hubness[bi * BLOCK + p.a as usize] += 1;
                    }
                }
                std::ops::ControlFlow::Continue(())
            },
        )
        .map_err(|e| EngineError::Calibration(format!("ranking hubs of {m}: {e}")))?;
    }
    let g: Vec<f64> = hubness
        .iter()
        .map(|&h| (f64::from(h) + 1.0).sqrt())
        .collect();
    // Scale the chances to sum to `cap`, re-scaling the uncapped ones after each round of capping at 1.
    let mut scale = cap as f64 / g.iter().sum::<f64>();
    for _ in 0..20 {
        let (capped, free): (f64, f64) = g.iter().fold((0.0, 0.0), |(c, f), &x| {
            if x * scale >= 1.0 {
                (c + 1.0, f)
            } else {
                (c, f + x)
            }
        });
        if free <= 0.0 {
            break;
        }
        let next = (cap as f64 - capped).max(0.0) / free;
        if (next / scale - 1.0).abs() < 1e-9 {
            break;
        }
        scale = next;
    }
    let mut pool = Vec::new();
    let mut pi = HashMap::new();
    for (k, &r) in live.iter().enumerate() {
        let chance = (g[k] * scale).min(1.0);
        let draw = (mix(seed ^ 0xd4a3 ^ mix(r as u64)) >> 11) as f64 / (1u64 << 53) as f64;
        if draw < chance {
            pool.push(r);
            pi.insert(r, chance);
        }
    }
    let weighted = pi.values().any(|&p| p < 1.0);
    Ok((pool, weighted.then_some(pi)))
}

/// The rows of `pool` holding modality `m`, copied densely (streamed in ascending order), with their row
/// numbers.
fn gather_present(
    snap: &Snapshot,
    m: Modality,
    dim: usize,
    pool: &[usize],
) -> (Vec<f32>, Vec<usize>) {
    let (rows, present) = gather_streamed(snap, m, dim, pool);
    let mut data = Vec::with_capacity(rows.len());
    let mut kept = Vec::new();
    for (k, &r) in pool.iter().enumerate() {
        if present[k] {
            data.extend_from_slice(&rows[k * dim..(k + 1) * dim]);
            kept.push(r);
        }
    }
    (data, kept)
}

/// Counts every pair of `pool` rows holding modality `m` ([`tail::count_tail`]), keeping scores at or above
/// `u`; pairs in `genuine` (row pairs, smaller row first) are left out. `None` when fewer than 2 rows hold `m`.
pub fn count_pool_tail(
    snap: &Snapshot,
    m: Modality,
    pool: &[usize],
    u: f64,
    genuine: &HashSet<(usize, usize)>,
) -> Result<Option<tail::TailCount>, EngineError> {
    Ok(count_pool_tail_banded(snap, m, pool, u, genuine, &[], None)?.map(|(all, _)| all))
}

/// [`count_pool_tail`] split by the quality bands of inner `edges` (pairs banded by their lower template
/// quality): the pooled count and one count per band (none without edges). `None` when fewer than 2 rows
/// hold `m`. With `inclusion` (a hub-stratified pool: each pool row's chance `π` of being drawn), every
/// counted pair weighs `1 / (π_a π_b)` ([`tail::TailCount::weights`]).
pub fn count_pool_tail_banded(
    snap: &Snapshot,
    m: Modality,
    pool: &[usize],
    u: f64,
    genuine: &HashSet<(usize, usize)>,
    edges: &[f32],
    inclusion: Option<&InclusionChances>,
) -> Result<Option<(tail::TailCount, Vec<tail::TailCount>)>, EngineError> {
    let Some((data, pool_rows, dim)) = pool_templates(snap, m, pool)? else {
        return Ok(None);
    };
    let row_band: Vec<u8> = pool_rows
        .iter()
        .map(|&r| crate::fusion::quality_band(edges, snap.quality(m, r)) as u8)
        .collect();
    let at: HashMap<usize, usize> = pool_rows.iter().enumerate().map(|(i, &r)| (r, i)).collect();
    let inverse: Vec<f64> = match inclusion {
        Some(pi) => pool_rows
            .iter()
            .map(|r| 1.0 / pi.get(r).copied().unwrap_or(1.0).max(f64::MIN_POSITIVE))
            .collect(),
        None => Vec::new(),
    };
    let mut excluded = vec![0u64; edges.len() + 1];
    let mut excluded_weight = vec![0.0f64; edges.len() + 1];
    for (a, b) in genuine {
        if let (Some(&i), Some(&j)) = (at.get(a), at.get(b)) {
            let band = usize::from(row_band[i].min(row_band[j]));
            excluded[band] += 1;
            if !inverse.is_empty() {
                excluded_weight[band] += inverse[i] * inverse[j];
            }
        }
    }
    let weights = tail::RowWeights {
        inverse_inclusion: inverse,
        excluded: excluded_weight,
    };
    let exclude = |i: usize, j: usize| {
        let (a, b) = (pool_rows[i], pool_rows[j]);
        genuine.contains(&(a.min(b), a.max(b)))
    };
    let view = RowsF32::dense(&data, dim)
        .map_err(|e| EngineError::Calibration(format!("tail pool of {m}: {e}")))?;
    let mut bands = tail::count_tail_banded(
        view,
        u as f32,
        &exclude,
        &row_band,
        &excluded,
        &weights,
        tail::TAIL_KEPT_MAX,
    )?;
    // Without edges the one band is the pooled count: moved, not copied (it can hold 10⁷ scores).
    if edges.is_empty()
        && let Some(all) = bands.pop()
    {
        return Ok(Some((all, Vec::new())));
    }
    let all = tail::TailCount::merge(&bands, u);
    Ok(Some((all, bands)))
}

/// Every pair `(a, b)` (rows, `a < b`) of `pool` rows holding modality `m` whose cosine is at least `c`, by
/// the exact GEMM self-join; `None` when fewer than 2 rows hold `m`.
pub fn count_pool_tail_pairs(
    snap: &Snapshot,
    m: Modality,
    pool: &[usize],
    c: f64,
) -> Result<Option<Vec<(usize, usize)>>, EngineError> {
    let mut out = Vec::new();
    let held = stream_pool_pairs(snap, m, pool, c, &mut |batch| out.extend_from_slice(batch))?;
    Ok(held.then_some(out))
}

/// A consumer of batches of row pairs.
pub type PairSink<'a> = dyn FnMut(&[(usize, usize)]) + 'a;

/// Streams to `sink`, batch by batch, every pair `(a, b)` (store rows, `a < b`) of `pool` whose modality-`m`
/// cosine is at least `c` (exact GEMM self-join); false when fewer than 2 pool rows hold `m`. Memory is one
/// batch, whatever the number of pairs.
pub fn stream_pool_pairs(
    snap: &Snapshot,
    m: Modality,
    pool: &[usize],
    c: f64,
    sink: &mut PairSink<'_>,
) -> Result<bool, EngineError> {
    let Some((data, pool_rows, dim)) = pool_templates(snap, m, pool)? else {
        return Ok(false);
    };
    let view = RowsF32::dense(&data, dim)
        .map_err(|e| EngineError::Calibration(format!("pool of {m}: {e}")))?;
    let mut rows = Vec::new();
    pacha_index::exact::self_join_with(view, c as f32, None, &mut |batch| {
        rows.clear();
        rows.extend(batch.iter().map(|p| {
            let (a, b) = (pool_rows[p.a as usize], pool_rows[p.b as usize]);
            (a.min(b), a.max(b))
        }));
        sink(&rows);
        std::ops::ControlFlow::Continue(())
    })
    .map_err(|e| EngineError::Calibration(format!("joining the pool of {m}: {e}")))?;
    Ok(true)
}

/// Templates of one modality held by a pool of rows: dense data, their row numbers, the dimension.
type PoolTemplates = (Vec<f32>, Vec<usize>, usize);

/// The templates of modality `m` held by `pool` rows; `None` when fewer than 2 rows hold `m`. Shared by the
/// tail count and the fused check's candidate joins.
fn pool_templates(
    snap: &Snapshot,
    m: Modality,
    pool: &[usize],
) -> Result<Option<PoolTemplates>, EngineError> {
    let dim = snap
        .schema()
        .modalities
        .iter()
        .find(|s| s.modality == m)
        .map(|s| s.dim)
        .ok_or_else(|| EngineError::Calibration(format!("the store has no {m} modality")))?;
    let (data, rows) = gather_present(snap, m, dim, pool);
    Ok((rows.len() >= 2).then_some((data, rows, dim)))
}

/// Quality bands planned from the sampled impostor pairs of one modality: the edges, and per band its
/// sample's body, tail threshold and share. `Err` says why a modality is not banded.
type BandPlan = Result<PlannedBands, String>;

/// See [`BandPlan`].
struct PlannedBands {
    edges: Vec<f32>,
    /// Per band: tail threshold (the band sample's `1 − TAIL_START` quantile), body, share of the sample.
    bands: Vec<(f64, Option<ImpostorBody>, f64)>,
}

/// Plans `bands` quality bands for modality `m`: edges at the quantiles of the pool rows' qualities that give
/// every band an equal share of pairs (the lower of two qualities is below the row quantile `x` with
/// probability `1 − (1 − x)²`), each band's body and tail threshold from the sampled pairs; refused when the
/// qualities do not vary, a band has too few samples, or no band's survival at the pooled tail threshold
/// (`pooled = (u, sampled survival at u)`) differs from the pooled one by [`BAND_EFFECT_MIN`].
fn plan_bands(
    snap: &Snapshot,
    m: Modality,
    pool: &[usize],
    sampled: &[(f64, f32)],
    bands: usize,
    pooled: (f64, f64),
) -> Option<BandPlan> {
    let bands = bands.min(crate::fusion::MAX_QUALITY_BANDS);
    let mut q: Vec<f32> = pool
        .iter()
        .filter(|&&r| snap.is_present(m, r))
        .map(|&r| snap.quality(m, r))
        .collect();
    if q.len() < 2 {
        return None;
    }
    q.sort_by(f32::total_cmp);
    let edges: Vec<f32> = (1..bands)
        .map(|k| {
            let x = 1.0 - (1.0 - k as f64 / bands as f64).sqrt();
            q[((q.len() - 1) as f64 * x).round() as usize]
        })
        .collect();
    if edges.windows(2).any(|w| w[0] >= w[1])
        || edges[0] <= q[0]
        || edges[edges.len() - 1] > q[q.len() - 1]
    {
        return Some(Err(format!(
            "the qualities do not spread over {bands} bands (edges {edges:?})"
        )));
    }
    let mut per_band: Vec<Vec<f64>> = vec![Vec::new(); bands];
    for &(s, pq) in sampled {
        per_band[crate::fusion::quality_band(&edges, pq)].push(s);
    }
    if let Some(k) = per_band
        .iter()
        .position(|b| b.len() < ImpostorBody::MIN_SAMPLES)
    {
        return Some(Err(format!(
            "band {k} holds {} sampled pairs, fewer than {}",
            per_band[k].len(),
            ImpostorBody::MIN_SAMPLES
        )));
    }
    for b in &mut per_band {
        b.sort_by(f64::total_cmp);
    }
    let (u, pooled_sf) = (pooled.0, TAIL_START_SF.max(pooled.1));
    let effect = per_band
        .iter()
        .map(|b| sf_at(b, u).max(1.0 / b.len() as f64) / pooled_sf)
        .fold(1.0f64, |acc, r| acc.max(r).max(1.0 / r));
    if effect < BAND_EFFECT_MIN {
        return Some(Err(format!(
            "quality does not move the tail (largest band ratio {effect:.2} at cosine {u:.4})"
        )));
    }
    let total = sampled.len() as f64;
    let planned = per_band
        .iter()
        .map(|b| {
            let share = b.len() as f64 / total;
            (tail_threshold(b), ImpostorBody::from_sorted(b), share)
        })
        .collect();
    Some(Ok(PlannedBands {
        edges,
        bands: planned,
    }))
}

/// The tail's threshold in ascending sampled scores: the score with sampled survival [`tail::TAIL_START`].
fn tail_threshold(sorted: &[f64]) -> f64 {
    sorted[((sorted.len() - 1) as f64 * (1.0 - tail::TAIL_START)).round() as usize]
}

/// Smallest sampled survival resolved at the tail threshold (a guard against dividing by zero).
const TAIL_START_SF: f64 = 1e-12;

/// Share of the ascending `sorted` at or above `s`.
fn sf_at(sorted: &[f64], s: f64) -> f64 {
    (sorted.len() - sorted.partition_point(|&x| x < s)) as f64 / sorted.len().max(1) as f64
}

/// A modality's fitted tail: the pooled model and its check, and the quality bands (`Ok(None)`: not
/// planned; `Err`: planned but not fitted, and why).
struct TailFit {
    model: ModalityModel,
    check: ModalityTailCheck,
    bands: Result<Option<QualityBands>, String>,
    /// The pool was every live row (holding the modality, for a hub pool): no larger pool exists.
    whole_store: bool,
}

/// Why a tail could not be fitted on a pool ([`fit_tail`]), and whether that pool was the whole store.
struct TailMiss {
    why: String,
    whole_store: bool,
}

/// [`fit_tail`] on a pool of `options.tail_rows` rows, doubled (up to `options.tail_rows_max`) and counted
/// again while a labelled count does not pin measured ÷ predicted within [`crate::evaluation::TAIL_TOLERANCE`]
/// at the decision FMR ([`ModalityTailCheck::resolution_at`]) and a larger pool can add events there (it has
/// counted less than [`TAIL_GROWTH_COVERAGE_MAX`] of the store's, and the last doubling multiplied its
/// independent events by at least [`TAIL_GROWTH_GAIN_MIN`]), or while the pool holds too few exceedances for a tail
/// fit at all (labelled or not); each growth or stop, and why, goes into `notes`. A fitted unlabelled tail
/// stops at [`tail::UNLABELLED_TRUNCATION`] for want of labels, which a larger pool cannot mend: it does not
/// grow for resolution.
#[allow(clippy::too_many_arguments)]
fn fit_tail_growing(
    snap: &Snapshot,
    m: Modality,
    options: &CalibrateOptions<'_>,
    genuine: &HashSet<(usize, usize)>,
    u: f64,
    base: &ModalityModel,
    plan: Option<&BandPlan>,
    notes: &mut Vec<String>,
) -> Result<Result<TailFit, String>, EngineError> {
    let fmr = decision_fmr(options.decision_fpir, snap.live());
    let (_, store_pairs) = store_pairs_of(snap, m);
    let mut rows = options.tail_rows;
    // Independent events at the decision FMR in the previous count, once one was fitted.
    let mut before: Option<f64> = None;
    loop {
        let fit = fit_tail(snap, m, options, rows, genuine, u, base.clone(), plan)?;
        let why = match &fit {
            Err(miss) if !miss.whole_store => Some(miss.why.clone()),
            Ok(f) if options.genuine.is_some() && !f.whole_store => {
                let growth = f.check.pool_growth(fmr, &GROWTH_RULE, before, store_pairs);
                before = Some(f.check.effective_events_at(fmr));
                match growth {
                    PoolGrowth::Pinned => None,
                    PoolGrowth::Grow(why) => Some(why),
                    PoolGrowth::Saturated { why, reason } => {
                        notes.push(format!(
                            "{m}: tail pool stops at {rows} rows: {why}; {reason}"
                        ));
                        None
                    }
                }
            }
            _ => None,
        };
        let Some(why) = why.filter(|_| rows < options.tail_rows_max) else {
            return Ok(fit.map_err(|miss| miss.why));
        };
        let next = rows.saturating_mul(2).min(options.tail_rows_max);
        notes.push(format!(
            "{m}: tail pool grown from {rows} to {next} rows: {why}"
        ));
        rows = next;
    }
}

/// Counts the tail of modality `m` on a calibration pool of `rows` rows (split by the planned quality bands, if any),
/// fits it ([`TailModel::fit`], truncated when no genuine pairs are labelled), pooled and per band, and
/// returns `base` with the pooled tail, checked (with the Gaussian alone, and per band) against the count.
/// The inner `Err` is a reason the tail could not be fitted (too few rows or exceedances): the calibration
/// goes on without one.
#[allow(clippy::too_many_arguments)]
fn fit_tail(
    snap: &Snapshot,
    m: Modality,
    options: &CalibrateOptions<'_>,
    rows: usize,
    genuine: &HashSet<(usize, usize)>,
    u: f64,
    base: ModalityModel,
    plan: Option<&BandPlan>,
) -> Result<Result<TailFit, TailMiss>, EngineError> {
    let plan = plan.and_then(|p| p.as_ref().ok());
    let edges = plan.map_or(&[][..], |p| &p.edges[..]);
    let lowest = plan.map_or(u, |p| p.bands.iter().fold(u, |acc, b| acc.min(b.0)));
    let (pool, inclusion) = match options.tail_pool {
        TailPool::Uniform => (tail_pool(snap, options.seed, rows, false), None),
        TailPool::Hubs => hub_pool(snap, m, options.seed, rows, u)?,
    };
    // A hub pool draws each row by its own chance (its size varies about `rows`) and has no chances only
    // when it is every row holding `m`; a uniform pool is every live row once `rows` reaches them.
    let whole_store = match options.tail_pool {
        TailPool::Uniform => pool.len() == snap.live(),
        TailPool::Hubs => inclusion.is_none(),
    };
    let Some((count, band_counts)) =
        count_pool_tail_banded(snap, m, &pool, lowest, genuine, edges, inclusion.as_ref())?
    else {
        return Ok(Err(TailMiss {
            why: format!("fewer than 2 rows hold {m}"),
            whole_store,
        }));
    };
    let unlabelled = options.genuine.is_none();
    let fit = |count: &tail::TailCount, u: f64| {
        let truncate = if !unlabelled {
            None
        } else if count.weights.is_empty() {
            let k = (tail::UNLABELLED_TRUNCATION * count.pairs as f64).round() as u64;
            count.kth_highest(k.max(1))
        } else {
            count.score_at_share(tail::UNLABELLED_TRUNCATION)
        };
        TailModel::fit_count(count, u, truncate)
    };
    // The pooled tail and each band's are fitted side by side (independent fits; the bands' only used when
    // the pooled one succeeds, and kept in band order).
    let (pooled, band_fits) = rayon::join(
        || fit(&count, u),
        || {
            plan.map(|p| {
                p.bands
                    .par_iter()
                    .zip(&band_counts)
                    .map(|((ub, _, _), bc)| fit(bc, *ub))
                    .collect::<Vec<_>>()
            })
        },
    );
    let model = match pooled {
        Ok(t) => t,
        Err(e) => {
            return Ok(Err(TailMiss {
                why: e.to_string(),
                whole_store,
            }));
        }
    };
    let with_tail = ModalityModel {
        impostor_tail: Some(model),
        ..base.clone()
    };
    let check =
        ModalityTailCheck::new(m, &with_tail, &count, options.seed, rows, options.tail_pool);
    let Some(plan) = plan else {
        return Ok(Ok(TailFit {
            model: with_tail,
            check,
            bands: Ok(None),
            whole_store,
        }));
    };
    let bands = plan
        .bands
        .iter()
        .zip(band_fits.unwrap_or_default())
        .enumerate()
        .map(|(k, ((_, body, _), fitted))| {
            fitted
                .map(|t| ModalityModel {
                    impostor_tail: Some(t),
                    impostor_body: *body,
                    ..base.clone()
                })
                .map_err(|e| format!("band {k}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|models| QualityBands {
            edges: plan.edges.clone(),
            models,
            share: plan.bands.iter().map(|b| b.2).collect(),
        });
    let check = match &bands {
        Ok(b) => check.with_bands(&with_tail, b, &band_counts),
        Err(_) => check,
    };
    Ok(Ok(TailFit {
        model: with_tail,
        check,
        bands: bands.map(Some),
        whole_store,
    }))
}

/// The answer to `probe` from the rows worth comparing (`rows`): each compared exactly, those at or above
/// `floor` kept, best first (ties by subject ID), at most `max_results`.
pub(crate) fn answer(
    snap: &Snapshot,
    cal: &Calibration,
    probe: &Probe,
    rows: &[usize],
    threshold: f64,
    floor: f64,
    max_results: usize,
) -> IdentifyResult {
    let mut cands: Vec<(usize, Comparison)> = rows
        .par_iter()
        .filter(|&&r| !snap.is_deleted(r))
        .map(|&r| (r, compare_probe(snap, cal, probe, r)))
        .filter(|(_, c)| c.fused.score >= floor)
        .collect();
    cands.sort_by(|a, b| {
        b.1.fused
            .score
            .total_cmp(&a.1.fused.score)
            .then_with(|| snap.subject_id(a.0).cmp(snap.subject_id(b.0)))
    });
    cands.dedup_by_key(|c| c.0);
    cands.truncate(max_results);
    let candidates = cands
        .into_iter()
        .map(|(r, comparison)| Candidate {
            subject_id: snap.subject_id(r).to_string(),
            comparison,
        })
        .collect();
    IdentifyResult {
        threshold,
        candidates,
        compared: rows.len(),
    }
}

fn m_key(m: Modality) -> u8 {
    match m {
        Modality::Face => 0,
        Modality::Finger(p) => p,
    }
}

/// The candidate cosine of each schema modality (schema order) for `probe` at `floor`: the complete budgets
/// over the modality subsets the probe has ([`Calibration::candidate_cosines_within`]), since a pair of the
/// probe and an enrolment shares only modalities the probe has; `None` where the probe has no template or no
/// cosine up to 1 can reach `floor`. Identify searches at these, and its audit checks them.
pub fn probe_candidate_cosines(
    snap: &Snapshot,
    cal: &Calibration,
    probe: &Probe,
    floor: f64,
) -> Vec<Option<f32>> {
    let positions: Vec<Option<usize>> = snap
        .schema()
        .modalities
        .iter()
        .map(|s| cal.position(s.modality).filter(|&p| p < 32))
        .collect();
    let within = positions
        .iter()
        .zip(&probe.templates)
        .filter_map(|(p, t)| t.as_ref().and(*p))
        .fold(0u32, |m, p| m | 1 << p);
    let cos = cal.candidate_cosines_within(floor, within);
    positions
        .iter()
        .zip(&probe.templates)
        .map(|(p, t)| {
            t.as_ref()
                .and(*p)
                .and_then(|p| cos.get(p).copied().flatten())
        })
        .collect()
}
