//! The engine's candidate index: one IVF partitioning per modality over the store's f32 rows.
//!
//! The index covers rows `0..rows()` of one store generation; rows committed after it was built (the second
//! tier) are always compared exactly, so a search or dedup sees every enrolment that was committed before it
//! started. Compaction renumbers rows, so an index of another generation is ignored and removed.

use crate::EngineError;
use crate::store::Snapshot;
use pacha_index::ivf::{Ivf, IvfParams, JoinPair, JoinStats, QuantStage};
use pacha_index::quant::l1_bounds;
use pacha_index::sketch::{Sketcher, Sketches, StagedCut};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

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

/// Probe lists searched per query in identify.
pub const IDENTIFY_NPROBE: usize = 16;

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
    /// Sign sketches of the indexed rows per modality, computed on first use (not saved: recomputing is
    /// one GEMM per modality, a few seconds at a million rows).
    sketches: Vec<OnceLock<Sketches>>,
    /// Per modality, the L1 bounds of the indexed rows' i8 codes (the join's i8 rescoring stage), computed
    /// on first use.
    l1: Vec<OnceLock<Vec<f32>>>,
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
            sketches: ivf.iter().map(|_| OnceLock::new()).collect(),
            l1: ivf.iter().map(|_| OnceLock::new()).collect(),
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

    /// Candidate pairs `(q, p)` with `q < p`, `p` in `probes ∩ 0..rows()`, both indexed, exact cosine ≥ `t`.
    /// With `sketch`, the IVF's products are pre-filtered by sign sketch (Hamming distance within the cuts)
    /// instead of scored by f32 GEMM; survivors are still rescored exactly. A pair reaching `t` is kept only
    /// if `accept(q, p, cosine)` (the dedup's fused verdict: the sketched join never materialises candidates).
    /// Also returns the join's work counters (the GEMM path counts only `above`).
    pub fn join_rows(
        &self,
        snap: &Snapshot,
        mi: usize,
        probes: Range<usize>,
        t: f32,
        sketch: Option<SketchFilter>,
        accept: &(dyn Fn(u32, u32, f32) -> bool + Sync),
    ) -> Result<(Vec<JoinPair>, JoinStats), EngineError> {
        let (Some(Some(ivf)), Some(view)) = (
            self.ivf.get(mi),
            snap.f32_rows(snap.schema().modalities[mi].modality),
        ) else {
            return Ok((Vec::new(), JoinStats::default()));
        };
        let end = probes.end.min(self.rows);
        let start = probes.start.min(end);
        let base = view.slice_rows(0, self.rows);
        match sketch {
            Some(f) => {
                let sk = self.sketches(snap, mi)?;
                // Past RAM, survivors are scored from the i8 codes first (the f32 rows stay on disk).
                let quant = if snap.past_ram() {
                    self.quant(snap, mi)?
                } else {
                    None
                };
                Ok(ivf.self_join_rows_sketched_with(
                    base,
                    sk,
                    quant,
                    start..end,
                    t,
                    f.cut,
                    accept,
                )?)
            }
            None => {
                let mut pairs = ivf.self_join_rows(base, start..end, t)?;
                let stats = JoinStats {
                    above: pairs.len() as u64,
                    ..JoinStats::default()
                };
                pairs.retain(|&(a, b, s)| accept(a, b, s));
                Ok((pairs, stats))
            }
        }
    }

    /// The IVF of modality `mi` (schema position), if it has one.
    pub fn ivf(&self, mi: usize) -> Option<&Ivf> {
        self.ivf.get(mi).and_then(|i| i.as_ref())
    }

    /// Sign sketches of modality `mi`'s indexed rows, computed on first use.
    fn sketches(&self, snap: &Snapshot, mi: usize) -> Result<&Sketches, EngineError> {
        let slot = self.sketches.get(mi).ok_or_else(|| {
            EngineError::InvalidArgument(format!("no modality at schema position {mi}"))
        })?;
        if let Some(s) = slot.get() {
            return Ok(s);
        }
        let spec = &snap.schema().modalities[mi];
        let view = snap.f32_rows(spec.modality).ok_or_else(|| {
            EngineError::InvalidArgument(format!("no {} rows in the store", spec.modality))
        })?;
        let m = spec.modality;
        let sk = Sketcher::new(spec.dim, SKETCH_BITS, SKETCH_SEED)?.sketch_rows_streaming(
            view.slice_rows(0, self.rows),
            &|r| snap.is_present(m, r),
            &snap.f32_pager(m),
        )?;
        // Another thread may have won the race; either value is the same deterministic sketch.
        Ok(slot.get_or_init(|| sk))
    }

    /// The i8 rescoring stage of modality `mi`'s sketched join: the store's codes of the indexed rows and
    /// their L1 bounds (computed on first use); `None` if the store has no codes for it.
    fn quant<'s>(
        &'s self,
        snap: &'s Snapshot,
        mi: usize,
    ) -> Result<Option<QuantStage<'s>>, EngineError> {
        let (Some(slot), Some(spec)) = (self.l1.get(mi), snap.schema().modalities.get(mi)) else {
            return Ok(None);
        };
        let Some(codes) = snap.i8_rows(spec.modality) else {
            return Ok(None);
        };
        let codes = codes.slice_rows(0, self.rows);
        let l1 = slot.get_or_init(|| l1_bounds(codes));
        Ok(Some(QuantStage::new(codes, l1)?))
    }

    /// Indexed rows whose exact cosine with `query` is at least `t`, from the query's `nprobe` best lists.
    pub fn search(
        &self,
        snap: &Snapshot,
        mi: usize,
        query: &[f32],
        t: f32,
        nprobe: usize,
    ) -> Vec<(u32, f32)> {
        match (
            self.ivf.get(mi),
            snap.f32_rows(snap.schema().modalities[mi].modality),
        ) {
            (Some(Some(ivf)), Some(view)) => {
                ivf.search(view.slice_rows(0, self.rows), query, t, nprobe)
            }
            _ => Vec::new(),
        }
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
            sketches: ivf.iter().map(|_| OnceLock::new()).collect(),
            l1: ivf.iter().map(|_| OnceLock::new()).collect(),
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
