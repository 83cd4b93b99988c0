//! The engine's candidate index: one IVF partitioning per modality over the store's f32 rows.
//!
//! The index covers rows `0..rows()` of one store generation; rows committed after it was built (the second
//! tier) are always compared exactly, so a search or dedup sees every enrolment that was committed before it
//! started. Compaction renumbers rows, so the engine removes the index when it compacts. A saved index
//! carries its identity and checksums ([`crate::derived`]); a reader refuses one that fails either.

use crate::EngineError;
use crate::derived::{Artefact, DerivedIdentity, DerivedProblem, INDEX_META, seal, unseal};
use crate::policy::{Visits, plan_modality};
use crate::store::Snapshot;
use pacha_index::ivf::{Ivf, IvfParams, ProbeRule};
use pacha_index::sketch::{Sketcher, Sketches, StagedCut};
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
/// Seed of the sketch hyperplanes (fixed: the same store always gets the same sketches).
const SKETCH_SEED: u64 = 0x5ce7_c4e5;

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
}

/// One `.ivf` file of a saved index.
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
    /// Sign sketches of every row of the last snapshot sketched, per modality, computed on first use (not
    /// saved: recomputing is one GEMM per modality, a few seconds at a million rows).
    sketches: Vec<Mutex<Option<Arc<Sketches>>>>,
    /// Identify probe rules already chosen, per (modality, candidate cosine bits).
    identify_rules: Mutex<Vec<(usize, u32, Option<ProbeRule>)>>,
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
        for (i, spec) in mods.iter().enumerate() {
            if let Some(p) = progress {
                p(i, mods.len());
            }
            let Some(view) = snap.f32_rows(spec.modality) else {
                ivf.push(None);
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
            } else {
                ivf.push(None);
            }
        }
        if let Some(p) = progress {
            p(mods.len(), mods.len());
        }
        Ok(AnnSet {
            generation: snap.generation(),
            rows: snap.rows(),
            sketches: ivf.iter().map(|_| Mutex::new(None)).collect(),
            identify_rules: Mutex::new(Vec::new()),
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

    /// Sign sketches of every row of `snap` in modality `mi`, computed on first use for this row count.
    pub fn sketches(&self, snap: &Snapshot, mi: usize) -> Result<Arc<Sketches>, EngineError> {
        let slot = self.sketches.get(mi).ok_or_else(|| {
            EngineError::InvalidArgument(format!("no modality at schema position {mi}"))
        })?;
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = guard.as_ref().filter(|s| s.rows() == snap.rows()) {
            return Ok(s.clone());
        }
        let sk = Arc::new(sketch_rows(snap, mi)?);
        *guard = Some(sk.clone());
        Ok(sk)
    }

    /// Indexed rows whose exact cosine with `query` is at least `t`, from the lists the modality's identify
    /// probe rule gives the query (chosen by a one-way pilot for this cosine on first use, see
    /// [`crate::policy`]); every indexed row when the pilot finds the partition no cheaper than a scan.
    pub fn search(
        &self,
        snap: &Snapshot,
        mi: usize,
        query: &[f32],
        t: f32,
    ) -> Result<Vec<(u32, f32)>, EngineError> {
        let (Some(Some(ivf)), Some(view)) = (
            self.ivf.get(mi),
            snap.f32_rows(snap.schema().modalities[mi].modality),
        ) else {
            return Ok(Vec::new());
        };
        let base = view.slice_rows(0, self.rows);
        let rule = self
            .identify_rule(snap, mi, t)?
            .unwrap_or(ProbeRule::fixed(ivf.lists()));
        Ok(ivf.search_rule(base, query, t, rule))
    }

    /// The identify probe rule of modality `mi` at cosine `t` (`None`: scan every list).
    pub fn identify_rule(
        &self,
        snap: &Snapshot,
        mi: usize,
        t: f32,
    ) -> Result<Option<ProbeRule>, EngineError> {
        {
            let cache = self
                .identify_rules
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(&(_, _, r)) = cache.iter().find(|e| e.0 == mi && e.1 == t.to_bits()) {
                return Ok(r);
            }
        }
        let Some(Some(ivf)) = self.ivf.get(mi) else {
            return Ok(None);
        };
        let plan = plan_modality(snap, ivf, mi, t, Visits::OneWay, None, None)?;
        tracing::info!(
            "identify {}: rule {:?} at cosine {t:.4} ({} natural + {} synthetic pilot pairs, {:.2} s)",
            plan.modality,
            plan.rule,
            plan.natural_pairs,
            plan.synthetic_pairs,
            plan.seconds
        );
        let mut cache = self
            .identify_rules
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        cache.push((mi, t.to_bits(), plan.rule));
        Ok(plan.rule)
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
        for (ivf, key) in self.ivf.iter().zip(&mods) {
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
        };
        let p = dir.join(INDEX_META);
        let bytes = serde_json::to_vec_pretty(&meta)
            .map_err(|e| EngineError::io("writing", &p, e.into()))?;
        crate::fsutil::write_atomic(&p, &seal(META_KIND, &bytes))
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
            Ok(Some((meta, ivf))) => Ok(Some(AnnSet {
                generation: meta.identity.generation,
                rows: meta.identity.rows,
                sketches: ivf.iter().map(|_| Mutex::new(None)).collect(),
                identify_rules: Mutex::new(Vec::new()),
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
    Ok(read_saved(store_dir, dir, snap, false)?.map(|(meta, _)| {
        let files = meta.files.into_iter().flatten().map(|f| f.file).collect();
        (meta.identity, files)
    }))
}

/// Reads and verifies the saved index in `dir`: the sealed `index.json`, the identity (against `snap` when
/// given) and every listed `.ivf` (length, body checksum, and that checksum against the listed one). With
/// `newer_is_absent`, an index of the snapshot's generation covering more rows than the snapshot has (built
/// after a reader took its snapshot: a benign race) is no index for that reader rather than an error.
#[allow(clippy::type_complexity)]
fn read_saved(
    store_dir: &Path,
    dir: &Path,
    snap: Option<&Snapshot>,
    newer_is_absent: bool,
) -> Result<Option<(SetMeta, Vec<Option<Ivf>>)>, (DerivedProblem, Vec<String>)> {
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
        .flatten()
        .map(|f| f.file.clone())
        .collect();
    let schema_keys: Vec<String> = meta
        .identity
        .schema
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    if meta.modalities != schema_keys || meta.files.len() != meta.modalities.len() {
        return Err(problem(
            &p,
            format!(
                "lists modalities {:?} and {} files for identity schema {:?}",
                meta.modalities,
                meta.files.len(),
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
    let mut ivf = Vec::with_capacity(meta.files.len());
    for ((entry, key), (_, dim)) in meta
        .files
        .iter()
        .zip(&meta.modalities)
        .zip(&meta.identity.schema)
    {
        let Some(entry) = entry else {
            ivf.push(None);
            continue;
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
        ivf.push(Some(loaded));
    }
    Ok(Some((meta, ivf)))
}

/// Sign sketches ([`SKETCH_BITS`]) of every row of `snap` in modality `mi` (absent rows stay zero),
/// streamed through the store's pager.
pub fn sketch_rows(snap: &Snapshot, mi: usize) -> Result<Sketches, EngineError> {
    let spec = snap.schema().modalities.get(mi).ok_or_else(|| {
        EngineError::InvalidArgument(format!("no modality at schema position {mi}"))
    })?;
    let view = snap.f32_rows(spec.modality).ok_or_else(|| {
        EngineError::InvalidArgument(format!("no {} rows in the store", spec.modality))
    })?;
    let m = spec.modality;
    Ok(
        Sketcher::new(spec.dim, SKETCH_BITS, SKETCH_SEED)?.sketch_rows_streaming(
            view,
            &|r| snap.is_present(m, r),
            &snap.f32_pager(m),
        )?,
    )
}
