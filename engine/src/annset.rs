//! The engine's candidate index: one IVF partitioning per modality over the store's f32 rows.
//!
//! The index covers rows `0..rows()` of one store generation; rows committed after it was built (the second
//! tier) are always compared exactly, so a search or dedup sees every enrolment that was committed before it
//! started. Compaction renumbers rows, so an index of another generation is ignored and removed.

use crate::EngineError;
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

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct SetMeta {
    generation: u64,
    rows: usize,
    modalities: Vec<String>,
}

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
            ivf,
        })
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
        let plan = plan_modality(snap, ivf, mi, t, Visits::OneWay, None)?;
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

    /// Saves the indexes into `dir` (replacing what was there).
    pub fn save(&self, dir: &Path, snap: &Snapshot) -> Result<(), EngineError> {
        Self::remove(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io("creating", dir, e))?;
        let mods: Vec<String> = snap.schema().keys();
        for (ivf, key) in self.ivf.iter().zip(&mods) {
            if let Some(ivf) = ivf {
                ivf.save(&dir.join(format!("{key}.ivf")))?;
            }
        }
        let meta = SetMeta {
            generation: self.generation,
            rows: self.rows,
            modalities: mods,
        };
        let p = dir.join("index.json");
        let bytes = serde_json::to_vec_pretty(&meta)
            .map_err(|e| EngineError::io("writing", &p, e.into()))?;
        // The meta file is written last: an index without it is incomplete and ignored.
        crate::fsutil::write_atomic(&p, &bytes)
    }

    /// Loads a saved index if it exists and belongs to `snap`'s generation; `None` otherwise.
    pub fn load(dir: &Path, snap: &Snapshot) -> Result<Option<AnnSet>, EngineError> {
        let p = dir.join("index.json");
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EngineError::io("reading", &p, e)),
        };
        let meta: SetMeta = serde_json::from_slice(&bytes).map_err(|e| EngineError::Corrupt {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        let mods: Vec<String> = snap.schema().keys();
        if meta.generation != snap.generation()
            || meta.rows > snap.rows()
            || meta.modalities != mods
        {
            tracing::info!(
                "ignoring index in {} built for another store generation",
                dir.display()
            );
            return Ok(None);
        }
        let mut ivf = Vec::with_capacity(mods.len());
        for key in &mods {
            let f = dir.join(format!("{key}.ivf"));
            ivf.push(if f.exists() {
                Some(Ivf::load(&f)?)
            } else {
                None
            });
        }
        Ok(Some(AnnSet {
            generation: meta.generation,
            rows: meta.rows,
            sketches: ivf.iter().map(|_| Mutex::new(None)).collect(),
            identify_rules: Mutex::new(Vec::new()),
            ivf,
        }))
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
