//! The engine's candidate index: one IVF partitioning per modality over the store's f32 rows.
//!
//! The index covers rows `0..rows()` of one store generation; rows committed after it was built (the second
//! tier) are always compared exactly, so a search or dedup sees every enrolment that was committed before it
//! started. Compaction renumbers rows, so the engine removes the index when it compacts. A saved index
//! carries its identity and checksums ([`crate::derived`]); a reader refuses one that fails either.

use crate::EngineError;
use crate::derived::{Artefact, DerivedIdentity, DerivedProblem, INDEX_META, seal, unseal};
use crate::idpath::{ForcedPath, IdentifyPath, IdentifyPlan};
use crate::sketchfile::{SavedSketches, SketchHeader, fingerprint_crc};
use crate::store::Snapshot;
use pacha_datasets::Modality;
use pacha_index::RowsF32;
use pacha_index::ivf::{Ivf, IvfParams};
use pacha_index::sketch::{SketchWords, Sketcher, Sketches, StagedCut};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Build parameters of the engine's index.
#[derive(Clone, Debug, Default)]
pub struct AnnParams {
    /// IVF parameters (defaults meet the recall bar on structured and isotropic populations).
    pub ivf: IvfParams,
}

/// Bits of the sign sketches kept per row (see `pacha_index::sketch`): the join's first stage compares the
/// first [`SKETCH_PREFIX_BITS`] of them for every product, the second all of them for the survivors only. At
/// 1 M rows (face + 2 fingers) the second stage cuts the exact rescorings 5× (BENCHMARKS.md).
pub const SKETCH_BITS: usize = 1024;
/// Bits of the first (packed SIMD) stage of the sketch test.
pub const SKETCH_PREFIX_BITS: usize = 512;

/// The two-stage sketch test of these cuts: `prefix` over the first [`SKETCH_PREFIX_BITS`], `full` over the
/// whole sketch.
pub fn staged_cut(
    prefix: &pacha_index::sketch::CutChoice,
    full: &pacha_index::sketch::CutChoice,
) -> pacha_index::sketch::StagedCut {
    pacha_index::sketch::StagedCut {
        prefix_words: SKETCH_PREFIX_BITS / 64,
        prefix_cut: prefix.cut,
        cut: full.cut,
    }
}
/// Seed of the sketch hyperplanes (fixed: the same store always gets the same sketches).
const SKETCH_SEED: u64 = 0x5ce7_c4e5;
/// Extension of a saved sketch file (`<modality>.sketch`, [`crate::sketchfile`]).
const SKETCH_EXT: &str = "sketch";

/// The sketch stages of an index join in the joined modality (see `pacha_index::sketch::choose_cut`).
#[derive(Clone, Copy, Debug)]
pub struct SketchFilter {
    /// Hamming cuts of the prefix stage and of the whole sketch.
    pub cut: StagedCut,
}

/// `index.json`: what the index was built on, and each modality's `.ivf` file with its length and checksum.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct SetMeta {
    identity: DerivedIdentity,
    modalities: Vec<String>,
    /// Per schema modality: its file, or `None` if the modality had no template when the index was built.
    files: Vec<Option<IvfEntry>>,
    /// Per schema modality: its saved sign sketches of rows `0..rows` (`<key>.sketch`), or `None`. Empty in
    /// an index saved before sketches were saved (runs then compute them).
    #[serde(default)]
    sketches: Vec<Option<IvfEntry>>,
}

/// One `.ivf` or `.sketch` file of a saved index.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct IvfEntry {
    file: String,
    len: u64,
    /// CRC-32 of the file's body (its last four bytes), 8 hex digits.
    crc32: String,
}

/// Kind of the sealed `index.json`.
const META_KIND: &str = "index";

/// Per-modality IVF indexes over rows `0..rows` of one store generation.
pub struct AnnSet {
    generation: u64,
    rows: usize,
    /// Index of each schema modality (by schema position); `None` if the modality has no template at all.
    ivf: Vec<Option<Ivf>>,
    /// Sign sketches of every row of the last snapshot sketched, per modality, made on first use: the saved
    /// sketches of the indexed rows plus those computed for the rows after them (or, after a build, the
    /// build's own).
    sketches: Vec<Mutex<Option<Arc<Sketches>>>>,
    /// The saved sketches of rows `0..rows`, per modality (verified at load; `None`: not saved).
    saved_sketches: Vec<Option<Arc<SavedSketches>>>,
    /// Identify plans already chosen, per (modality, candidate cosine bits).
    identify_plans: Mutex<Vec<(usize, u32, Arc<IdentifyPlan>)>>,
    /// An identify path imposed by the caller (measurement, tests).
    forced_path: Mutex<Option<ForcedPath>>,
    /// The sketchers of the indexed modalities (the saved sketches' hyperplanes), made on first use.
    sketchers: Vec<std::sync::OnceLock<Option<Arc<Sketcher>>>>,
    /// What the index was built on (saved in `index.json`).
    identity: DerivedIdentity,
}

impl AnnSet {
    /// Builds indexes over every committed row of `snap`.
    pub fn build(
        snap: &Snapshot,
        params: &AnnParams,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
    ) -> Result<AnnSet, EngineError> {
        let mods = &snap.schema().modalities;
        let mut ivf = Vec::with_capacity(mods.len());
        let mut built: Vec<Option<Arc<Sketches>>> = Vec::with_capacity(mods.len());
        for (i, spec) in mods.iter().enumerate() {
            if let Some(p) = progress {
                p(i, mods.len());
            }
            let Some(view) = snap.f32_rows(spec.modality) else {
                ivf.push(None);
                built.push(None);
                continue;
            };
            let m = spec.modality;
            let present = |r: usize| snap.is_present(m, r) && !snap.is_deleted(r);
            if (0..snap.rows()).any(present) {
                // Streamed: each batch's f32 pages are prefetched, and leave the resident set once read.
                ivf.push(Some(Ivf::build_streaming(
                    view,
                    &present,
                    &params.ivf,
                    &snap.f32_pager(m),
                )?));
                // The sign sketches of every row, saved with the index so runs need not recompute them.
                built.push(Some(Arc::new(sketch_rows(snap, i)?)));
            } else {
                ivf.push(None);
                built.push(None);
            }
        }
        if let Some(p) = progress {
            p(mods.len(), mods.len());
        }
        Ok(AnnSet {
            generation: snap.generation(),
            rows: snap.rows(),
            sketches: built.into_iter().map(Mutex::new).collect(),
            saved_sketches: ivf.iter().map(|_| None).collect(),
            identify_plans: Mutex::new(Vec::new()),
            forced_path: Mutex::new(None),
            sketchers: mods.iter().map(|_| std::sync::OnceLock::new()).collect(),
            identity: DerivedIdentity::of(snap, format!("{:?}", params.ivf)),
            ivf,
        })
    }

    /// What the index was built on.
    pub fn identity(&self) -> &DerivedIdentity {
        &self.identity
    }

    /// Rows covered.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// True if this index belongs to the snapshot's generation and covers no row it lacks.
    pub fn covers(&self, snap: &Snapshot) -> bool {
        self.generation == snap.generation()
            && self.rows <= snap.rows()
            && self.ivf.len() == snap.schema().modalities.len()
    }

    /// The IVF of modality `mi` (schema position), if it has one.
    pub fn ivf(&self, mi: usize) -> Option<&Ivf> {
        self.ivf.get(mi).and_then(|i| i.as_ref())
    }

    /// Sign sketches of every row of `snap` in modality `mi`, made on first use for this row count: the
    /// saved sketches of the indexed rows (read in place) and, computed now, those of the rows committed
    /// after the index; every row computed if the index has no saved sketches or does not cover `snap`.
    pub fn sketches(&self, snap: &Snapshot, mi: usize) -> Result<Arc<Sketches>, EngineError> {
        let slot = self.sketches.get(mi).ok_or_else(|| {
            EngineError::InvalidArgument(format!("no modality at schema position {mi}"))
        })?;
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = guard.as_ref().filter(|s| s.rows() == snap.rows()) {
            return Ok(s.clone());
        }
        let saved = self.saved_sketches.get(mi).cloned().flatten();
        let sk = match saved {
            Some(saved) if self.covers(snap) && saved.rows() == self.rows => {
                let tail = sketch_rows_from(snap, mi, self.rows)?;
                let head: Arc<dyn SketchWords> = saved;
                Arc::new(Sketches::from_parts(
                    SKETCH_BITS / 64,
                    Some((head, self.rows)),
                    tail,
                )?)
            }
            _ => Arc::new(sketch_rows(snap, mi)?),
        };
        *guard = Some(sk.clone());
        Ok(sk)
    }

    /// True if the index carries saved sketches for modality `mi`.
    pub fn has_saved_sketches(&self, mi: usize) -> bool {
        matches!(self.saved_sketches.get(mi), Some(Some(_)))
    }

    /// Indexed rows whose exact cosine with `query` is at least `t`, by the modality's identify path for
    /// this cosine (chosen on first use by predicted cost per query, see [`crate::idpath`]): the IVF rule of
    /// a one-way pilot, a scan of every indexed row's sign sketch, or an exact scan. `impostor` is the
    /// calibration's Gaussian impostor cosine model of the modality (predicts the sketch survivors).
    pub fn search(
        &self,
        snap: &Snapshot,
        mi: usize,
        query: &[f32],
        t: f32,
        impostor: Option<(f64, f64)>,
    ) -> Result<Vec<(u32, f32)>, EngineError> {
        let (Some(Some(ivf)), Some(view)) = (
            self.ivf.get(mi),
            snap.f32_rows(snap.schema().modalities[mi].modality),
        ) else {
            return Ok(Vec::new());
        };
        let m = snap.schema().modalities[mi].modality;
        let base = view.slice_rows(0, self.rows);
        let plan = self.identify_plan(snap, mi, t, impostor)?;
        let sk = match plan.path {
            IdentifyPath::Sketch(_) => self.indexed_sketches(mi),
            _ => None,
        };
        let sketcher = match plan.path {
            IdentifyPath::Sketch(_) => self.sketcher(mi),
            _ => None,
        };
        let pair = match (&sketcher, &sk) {
            (Some(a), Some(b)) => Some((a.as_ref(), b.as_ref())),
            _ => None,
        };
        crate::idpath::search(
            ivf,
            base,
            &|r| snap.is_present(m, r),
            query,
            t,
            plan.path,
            pair,
        )
    }

    /// Imposes an identify path on every modality (`None`: choose by predicted cost), dropping the plans
    /// already chosen. For measurements and tests; the sketch path still needs the indexed rows' sketches.
    pub fn force_identify_path(&self, path: Option<ForcedPath>) {
        *self.forced_path.lock().unwrap_or_else(|p| p.into_inner()) = path;
        self.identify_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The identify plans chosen so far (modality order of first use).
    pub fn identify_plans(&self) -> Vec<IdentifyPlan> {
        self.identify_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|e| (*e.2).clone())
            .collect()
    }

    /// The identify plan of modality `mi` at cosine `t`, planned on first use (the one-way pilot included)
    /// and cached.
    pub fn identify_plan(
        &self,
        snap: &Snapshot,
        mi: usize,
        t: f32,
        impostor: Option<(f64, f64)>,
    ) -> Result<Arc<IdentifyPlan>, EngineError> {
        {
            let cache = self
                .identify_plans
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(e) = cache.iter().find(|e| e.0 == mi && e.1 == t.to_bits()) {
                return Ok(e.2.clone());
            }
        }
        let Some(Some(ivf)) = self.ivf.get(mi) else {
            return Err(EngineError::InvalidArgument(format!(
                "no index of the modality at schema position {mi}"
            )));
        };
        let force = *self.forced_path.lock().unwrap_or_else(|p| p.into_inner());
        let sketches = self.indexed_sketches(mi).is_some() && self.sketcher(mi).is_some();
        let plan = Arc::new(crate::idpath::plan(
            snap, ivf, mi, t, impostor, sketches, force,
        )?);
        tracing::info!(
            "identify {}: path {:?} at cosine {t:.4} (predicted ms per query {:?}, pilot rule {:?}, {:.2} s)",
            plan.modality,
            plan.path,
            plan.predicted_ms,
            plan.ivf_rule,
            plan.seconds
        );
        let mut cache = self
            .identify_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        cache.push((mi, t.to_bits(), plan.clone()));
        Ok(plan)
    }

    /// Predicted milliseconds per query of identify's search of modality `mi` at cosine `t`: the cached
    /// plan's chosen path, or without one (no pilot run) the cheaper of the exact and sketch scans; with the
    /// predicted milliseconds of the pilot the first search would run to plan it (0 when cached).
    pub fn identify_estimate(
        &self,
        snap: &Snapshot,
        mi: usize,
        t: f32,
        impostor: Option<(f64, f64)>,
    ) -> (f64, f64) {
        {
            let cache = self
                .identify_plans
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(e) = cache.iter().find(|e| e.0 == mi && e.1 == t.to_bits())
                && let Some(ms) =
                    e.2.predicted_ms
                        .iter()
                        .find(|(name, _)| name == e.2.path.name())
            {
                return (ms.1, 0.0);
            }
        }
        let sketches = self.indexed_sketches(mi).is_some() && self.sketcher(mi).is_some();
        (
            crate::idpath::pilotless_ms(snap, self.rows, mi, t, impostor, sketches),
            crate::idpath::pilot_ms(snap, snap.rows(), mi),
        )
    }

    /// The sign sketches of the indexed rows `0..rows()` of modality `mi` without computing any: the saved
    /// ones, or those of an index built in this process; `None` if neither is at hand.
    fn indexed_sketches(&self, mi: usize) -> Option<Arc<Sketches>> {
        if let Some(Some(saved)) = self.saved_sketches.get(mi)
            && saved.rows() == self.rows
        {
            let head: Arc<dyn SketchWords> = saved.clone();
            return Sketches::from_parts(SKETCH_BITS / 64, Some((head, self.rows)), Vec::new())
                .ok()
                .map(Arc::new);
        }
        self.sketches
            .get(mi)?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|s| s.rows() >= self.rows)
    }

    /// The sketcher of modality `mi` (the hyperplanes of its saved sketches).
    fn sketcher(&self, mi: usize) -> Option<Arc<Sketcher>> {
        self.sketchers
            .get(mi)?
            .get_or_init(|| {
                let dim = self.identity.schema.get(mi).map(|(_, d)| *d)?;
                Sketcher::new(dim, SKETCH_BITS, SKETCH_SEED)
                    .ok()
                    .map(Arc::new)
            })
            .clone()
    }

    /// Saves the indexes into `dir` (replacing what was there): one `.ivf` per indexed modality, then the
    /// sealed `index.json` naming the identity and each file's length and checksum (written last: an index
    /// directory without it is an interrupted build, ignored by readers and reported by `check`).
    pub fn save(&self, dir: &Path, snap: &Snapshot) -> Result<(), EngineError> {
        Self::remove(dir)?;
        crate::fsutil::create_private_dir_all(dir)
            .map_err(|e| EngineError::io("creating", dir, e))?;
        let mods: Vec<String> = snap.schema().keys();
        let mut files = Vec::with_capacity(mods.len());
        let mut sketch_files = Vec::with_capacity(mods.len());
        for (mi, (ivf, key)) in self.ivf.iter().zip(&mods).enumerate() {
            sketch_files.push(match ivf {
                Some(_) => Some(self.save_sketches(dir, snap, mi, key)?),
                None => None,
            });
            files.push(match ivf {
                Some(ivf) => {
                    let file = format!("{key}.ivf");
                    let path = dir.join(&file);
                    let crc = ivf.save(&path)?;
                    let len = std::fs::metadata(&path)
                        .map_err(|e| EngineError::io("reading", &path, e))?
                        .len();
                    Some(IvfEntry {
                        file,
                        len,
                        crc32: format!("{crc:08x}"),
                    })
                }
                None => None,
            });
        }
        let meta = SetMeta {
            identity: self.identity.clone(),
            modalities: mods,
            files,
            sketches: sketch_files,
        };
        let p = dir.join(INDEX_META);
        let bytes = serde_json::to_vec_pretty(&meta)
            .map_err(|e| EngineError::io("writing", &p, e.into()))?;
        crate::fsutil::write_atomic(&p, &seal(META_KIND, &bytes))
    }

    /// Writes the sign sketches of rows `0..rows` of modality `mi` to `<dir>/<key>.sketch` (the build's
    /// own, or computed now from `snap`); its entry for `index.json`.
    fn save_sketches(
        &self,
        dir: &Path,
        snap: &Snapshot,
        mi: usize,
        key: &str,
    ) -> Result<IvfEntry, EngineError> {
        let cached = self
            .sketches
            .get(mi)
            .and_then(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let sk = match cached {
            Some(s) if s.rows() >= self.rows => s,
            _ if snap.rows() >= self.rows && snap.generation() == self.generation => {
                Arc::new(sketch_rows(snap, mi)?)
            }
            _ => {
                return Err(EngineError::InvalidArgument(format!(
                    "cannot save the sketches of an index of {} rows from a snapshot of {} rows",
                    self.rows,
                    snap.rows()
                )));
            }
        };
        let file = format!("{key}.{SKETCH_EXT}");
        let path = dir.join(&file);
        let header = self.sketch_header(mi)?;
        let crc = crate::sketchfile::write(&path, &header, &sk)?;
        Ok(IvfEntry {
            file,
            len: header.file_len(),
            crc32: format!("{crc:08x}"),
        })
    }

    /// What a saved sketch file of modality `mi` must describe.
    fn sketch_header(&self, mi: usize) -> Result<SketchHeader, EngineError> {
        let dim = self
            .identity
            .schema
            .get(mi)
            .map(|(_, d)| *d)
            .ok_or_else(|| {
                EngineError::InvalidArgument(format!("no modality at schema position {mi}"))
            })?;
        Ok(sketch_header_of(&self.identity, dim))
    }

    /// Loads the index saved in `dir` (`<store_dir>/engine/index`): `None` if there is none (no
    /// `index.json`); [`EngineError::Derived`] if it is corrupt, of an old format, has a listed file
    /// missing or altered, or was built on another generation, store or pacha version.
    pub fn load(
        store_dir: &Path,
        dir: &Path,
        snap: &Snapshot,
    ) -> Result<Option<AnnSet>, EngineError> {
        match read_saved(store_dir, dir, Some(snap), true) {
            Ok(None) => Ok(None),
            Ok(Some((meta, ivf, saved_sketches))) => Ok(Some(AnnSet {
                generation: meta.identity.generation,
                rows: meta.identity.rows,
                sketches: ivf.iter().map(|_| Mutex::new(None)).collect(),
                saved_sketches,
                identify_plans: Mutex::new(Vec::new()),
                forced_path: Mutex::new(None),
                sketchers: ivf.iter().map(|_| std::sync::OnceLock::new()).collect(),
                identity: meta.identity,
                ivf,
            })),
            Err((p, _)) => Err(p.to_error()),
        }
    }

    /// Removes a saved index directory.
    pub fn remove(dir: &Path) -> Result<(), EngineError> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EngineError::io("removing", dir, e)),
        }
    }
}

/// Verifies the index saved in `dir` for `check`: `None` if there is none; else its identity and the files
/// `index.json` lists; or the problem and the files it lists (as far as it could be read).
#[allow(clippy::type_complexity)]
pub(crate) fn verify_saved(
    store_dir: &Path,
    dir: &Path,
    snap: Option<&Snapshot>,
) -> Result<Option<(DerivedIdentity, Vec<String>)>, (DerivedProblem, Vec<String>)> {
    Ok(
        read_saved(store_dir, dir, snap, false)?.map(|(meta, _, _)| {
            let files = meta
                .files
                .into_iter()
                .chain(meta.sketches)
                .flatten()
                .map(|f| f.file)
                .collect();
            (meta.identity, files)
        }),
    )
}

/// Reads and verifies the saved index in `dir`: the sealed `index.json`, the identity (against `snap` when
/// given), every listed `.ivf` (length, body checksum, and that checksum against the listed one) and every
/// listed `.sketch` (header against the identity and the sketch parameters, length, checksum). With
/// `newer_is_absent`, an index of the snapshot's generation covering more rows than the snapshot has (built
/// after a reader took its snapshot: a benign race) is no index for that reader rather than an error.
#[allow(clippy::type_complexity)]
fn read_saved(
    store_dir: &Path,
    dir: &Path,
    snap: Option<&Snapshot>,
    newer_is_absent: bool,
) -> Result<
    Option<(SetMeta, Vec<Option<Ivf>>, Vec<Option<Arc<SavedSketches>>>)>,
    (DerivedProblem, Vec<String>),
> {
    let p = dir.join(INDEX_META);
    let problem = |path: &Path, what: String, listed: &[String]| {
        (
            DerivedProblem::new(Artefact::Index, store_dir, path, what),
            listed.to_vec(),
        )
    };
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(problem(&p, format!("cannot read: {e}"), &[])),
    };
    let body = unseal(META_KIND, &bytes).map_err(|w| problem(&p, w, &[]))?;
    let meta: SetMeta = serde_json::from_slice(body)
        .map_err(|e| problem(&p, format!("does not decode: {e}"), &[]))?;
    let listed: Vec<String> = meta
        .files
        .iter()
        .chain(&meta.sketches)
        .flatten()
        .map(|f| f.file.clone())
        .collect();
    let schema_keys: Vec<String> = meta
        .identity
        .schema
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    if meta.modalities != schema_keys
        || meta.files.len() != meta.modalities.len()
        || !(meta.sketches.is_empty() || meta.sketches.len() == meta.modalities.len())
    {
        return Err(problem(
            &p,
            format!(
                "lists modalities {:?}, {} files and {} sketch files for identity schema {:?}",
                meta.modalities,
                meta.files.len(),
                meta.sketches.len(),
                meta.identity.schema
            ),
            &listed,
        ));
    }
    if let Some(snap) = snap {
        if newer_is_absent
            && meta.identity.generation == snap.generation()
            && meta.identity.rows > snap.rows()
        {
            tracing::info!(
                "index in {} covers {} rows, this snapshot has {}: built after the snapshot was taken; not used",
                dir.display(),
                meta.identity.rows,
                snap.rows()
            );
            return Ok(None);
        }
        meta.identity
            .verify(snap)
            .map_err(|w| problem(&p, w, &listed))?;
    }
    // The modalities' lists files load side by side (each read, checksummed, checked and its per-list
    // tables derived); a problem is reported for the first modality in schema order that has one.
    type Problem = (DerivedProblem, Vec<String>);
    let loads: Vec<Result<Option<Ivf>, Problem>> = meta
        .files
        .par_iter()
        .zip(&meta.modalities)
        .zip(&meta.identity.schema)
        .map(|((entry, key), (_, dim))| {
            let Some(entry) = entry else {
                return Ok(None);
            };
            let f = dir.join(&entry.file);
            if entry.file != format!("{key}.ivf") {
                return Err(problem(
                    &p,
                    format!("lists file {:?} for modality {key}", entry.file),
                    &listed,
                ));
            }
            let len = match std::fs::metadata(&f) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(problem(
                        &f,
                        "listed in index.json but missing".into(),
                        &listed,
                    ));
                }
                Err(e) => return Err(problem(&f, format!("cannot read: {e}"), &listed)),
            };
            if len != entry.len {
                return Err(problem(
                    &f,
                    format!("{len} bytes, index.json lists {}", entry.len),
                    &listed,
                ));
            }
            let (loaded, crc) =
                Ivf::load_with_crc(&f).map_err(|e| problem(&f, e.to_string(), &listed))?;
            if format!("{crc:08x}") != entry.crc32 {
                return Err(problem(
                    &f,
                    format!("body crc32 {crc:08x}, index.json lists {}", entry.crc32),
                    &listed,
                ));
            }
            if loaded.rows() != meta.identity.rows || loaded.dim() != *dim {
                return Err(problem(
                    &f,
                    format!(
                        "{} rows of dimension {}, index.json says {} rows of dimension {dim}",
                        loaded.rows(),
                        loaded.dim(),
                        meta.identity.rows
                    ),
                    &listed,
                ));
            }
            Ok(Some(loaded))
        })
        .collect();
    let ivf = loads.into_iter().collect::<Result<Vec<_>, _>>()?;
    let mut saved = Vec::with_capacity(meta.modalities.len());
    for (mi, key) in meta.modalities.iter().enumerate() {
        let Some(entry) = meta.sketches.get(mi).and_then(|e| e.as_ref()) else {
            saved.push(None);
            continue;
        };
        let f = dir.join(&entry.file);
        if entry.file != format!("{key}.{SKETCH_EXT}") || ivf.get(mi).is_none_or(|i| i.is_none()) {
            return Err(problem(
                &p,
                format!(
                    "lists sketch file {:?} for modality {key}, which has no .ivf file",
                    entry.file
                ),
                &listed,
            ));
        }
        let dim = meta.identity.schema.get(mi).map_or(0, |(_, d)| *d);
        let header = sketch_header_of(&meta.identity, dim);
        let (sk, crc) = match SavedSketches::open(&f, &header) {
            Ok(x) => x,
            Err(what) => {
                let what = match std::fs::metadata(&f) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        "listed in index.json but missing".to_string()
                    }
                    _ => what,
                };
                return Err(problem(&f, what, &listed));
            }
        };
        if format!("{crc:08x}") != entry.crc32 || header.file_len() != entry.len {
            return Err(problem(
                &f,
                format!(
                    "{} bytes with crc32 {crc:08x}, index.json lists {} bytes with {}",
                    header.file_len(),
                    entry.len,
                    entry.crc32
                ),
                &listed,
            ));
        }
        saved.push(Some(Arc::new(sk)));
    }
    Ok(Some((meta, ivf, saved)))
}

/// The header a saved sketch file of a modality of dimension `dim` must have for an index of `identity`.
fn sketch_header_of(identity: &DerivedIdentity, dim: usize) -> SketchHeader {
    SketchHeader {
        bits: SKETCH_BITS as u32,
        seed: SKETCH_SEED,
        dim: dim as u64,
        rows: identity.rows as u64,
        generation: identity.generation,
        fingerprint: fingerprint_crc(&identity.fingerprint),
    }
}

/// The modality at schema position `mi` of `snap`, its dimension and its f32 rows; a typed error when the
/// schema has no such position or the store no such rows.
fn modality_rows(
    snap: &Snapshot,
    mi: usize,
) -> Result<(Modality, usize, RowsF32<'_>), EngineError> {
    let spec = snap.schema().modalities.get(mi).ok_or_else(|| {
        EngineError::InvalidArgument(format!("no modality at schema position {mi}"))
    })?;
    let view = snap.f32_rows(spec.modality).ok_or_else(|| {
        EngineError::InvalidArgument(format!("no {} rows in the store", spec.modality))
    })?;
    Ok((spec.modality, spec.dim, view))
}

/// The sketch words of rows `start..` of `snap` in modality `mi`, bit-identical to [`sketch_rows`]'s rows
/// (same GEMM blocks), streamed through the store's pager: only the f32 rows from `start`'s block on are read.
pub fn sketch_rows_from(snap: &Snapshot, mi: usize, start: usize) -> Result<Vec<u64>, EngineError> {
    let (m, dim, view) = modality_rows(snap, mi)?;
    Ok(
        Sketcher::new(dim, SKETCH_BITS, SKETCH_SEED)?.sketch_rows_from(
            view,
            start,
            &|r| snap.is_present(m, r),
            &snap.f32_pager(m),
        )?,
    )
}

/// Sign sketches ([`SKETCH_BITS`]) of every row of `snap` in modality `mi` (absent rows stay zero),
/// streamed through the store's pager.
pub fn sketch_rows(snap: &Snapshot, mi: usize) -> Result<Sketches, EngineError> {
    let (m, dim, view) = modality_rows(snap, mi)?;
    Ok(
        Sketcher::new(dim, SKETCH_BITS, SKETCH_SEED)?.sketch_rows_streaming(
            view,
            &|r| snap.is_present(m, r),
            &snap.f32_pager(m),
        )?,
    )
}
