//! Candidate generation for dedup tiles: which pairs are worth rescoring exactly.
//!
//! Two sources, chosen per run ([`CandidateMode`]): exact blocked GEMM threshold joins over the mmap'd f32
//! rows (complete by construction: the oracle, and the path for small galleries), or the engine's IVF index
//! ([`crate::annset`]). With the index, a tile's pairs `(q, p)`, `q < p`, `p` in the tile, come from three
//! places: both rows indexed → the IVF join; `p` newer than the index → an IVF search for `p` (indexed `q`)
//! plus an exact join against the other new rows. So rows committed after the index was built are never
//! missed.

use crate::annset::SketchFilter;
use crate::store::Snapshot;
use crate::{AnnSet, EngineError};
use pacha_datasets::Modality;
use pacha_index::ivf::JoinStats;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Galleries up to this many live rows use exact joins in `Auto` mode. Measured (BENCHMARKS.md, "Candidate
/// path crossover"): with an index built, the IVF path is already faster at 5 000 rows (0.70 s vs 1.03 s) and
/// at 20 000 (5.5 s vs 9.5 s) with identical hits; below 5 000 both take about a second, so the complete exact
/// path is kept there.
pub const AUTO_EXACT_MAX_ROWS: usize = 5_000;

/// Lists probed per new (unindexed) row when searching the IVF index.
pub const NEW_ROW_NPROBE: usize = 16;

/// How a dedup run generates candidate pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CandidateMode {
    /// Exact up to [`AUTO_EXACT_MAX_ROWS`] live rows or without an index; the index above.
    Auto,
    /// Exact blocked GEMM threshold joins (complete; the ground-truth path).
    Exact,
    /// The IVF index (falls back to exact when no index covers the snapshot).
    Index,
}

/// Resolves `Auto` into a concrete mode for this snapshot.
pub fn resolve_mode(mode: CandidateMode, snap: &Snapshot, ann: Option<&AnnSet>) -> CandidateMode {
    let usable = ann.is_some_and(|a| a.covers(snap));
    match mode {
        CandidateMode::Auto if usable && snap.live() > AUTO_EXACT_MAX_ROWS => CandidateMode::Index,
        CandidateMode::Auto => CandidateMode::Exact,
        CandidateMode::Index if !usable => CandidateMode::Exact,
        m => m,
    }
}

/// Appends to `out` the candidate pairs `(earlier row, later row)` of modality `m` (schema position `mi`)
/// whose later row is in `probes`: cosine at least `min_cos`, both templates present. `sketch` turns on the
/// sign-sketch stages of the IVF join (indexed rows only); its pairs are also kept only if `accept`, and its
/// work counters are added to `stats`. Pairs from the other paths are all returned. Returns how many of the
/// appended pairs came from the index join.
#[allow(clippy::too_many_arguments)]
pub fn pairs_for_tile(
    snap: &Snapshot,
    ann: Option<&AnnSet>,
    mode: CandidateMode,
    m: Modality,
    mi: usize,
    probes: Range<usize>,
    min_cos: f32,
    sketch: Option<SketchFilter>,
    accept: &(dyn Fn(u32, u32, f32) -> bool + Sync),
    stats: &mut JoinStats,
    out: &mut Vec<(u32, u32)>,
) -> Result<usize, EngineError> {
    let Some(view) = snap.f32_rows(m) else {
        return Ok(0);
    };
    let absent = |r: u32| !snap.is_present(m, r as usize) || snap.is_deleted(r as usize);
    let mut joined = 0;
    let indexed = match (mode, ann) {
        (CandidateMode::Index, Some(a)) if a.covers(snap) => a.rows(),
        _ => 0,
    };
    if let (Some(ann), true) = (ann, indexed > 0) {
        // Both rows indexed.
        let (pairs, st) = ann.join_rows(snap, mi, probes.clone(), min_cos, sketch, accept)?;
        *stats = stats.add(&st);
        joined = pairs.len();
        out.extend(pairs.into_iter().map(|(a, b, _)| (a, b)));
        // New rows against the indexed ones.
        let new_probes = probes.start.max(indexed)..probes.end;
        let found: Vec<(u32, u32)> = new_probes
            .clone()
            .into_par_iter()
            .filter(|&p| !absent(p as u32))
            .flat_map_iter(|p| {
                ann.search(snap, mi, view.row(p), min_cos, NEW_ROW_NPROBE)
                    .into_iter()
                    .filter(|&(q, _)| (q as usize) < indexed && !absent(q))
                    .map(move |(q, _)| (q, p as u32))
            })
            .collect();
        out.extend(found);
        // New rows against each other: exact.
        if !new_probes.is_empty() {
            exact_pairs(view, new_probes, indexed, min_cos, &absent, out)?;
        }
    } else {
        exact_pairs(view, probes, 0, min_cos, &absent, out)?;
    }
    Ok(joined)
}

/// Exact pairs `(q, p)`: `p` in `probes`, `base_start ≤ q < p`, cosine ≥ `t`, neither absent.
fn exact_pairs(
    view: pacha_index::RowsF32<'_>,
    probes: Range<usize>,
    base_start: usize,
    t: f32,
    absent: &(dyn Fn(u32) -> bool + Sync),
    out: &mut Vec<(u32, u32)>,
) -> Result<(), EngineError> {
    let probe_view = view.slice_rows(probes.start, probes.end);
    let base = view.slice_rows(base_start, probes.end);
    let skip_probe = |i: u32| absent(probes.start as u32 + i);
    let skip_base = |i: u32| absent(base_start as u32 + i);
    for pair in pacha_index::exact::threshold_join(
        probe_view,
        base,
        t,
        Some(&skip_probe),
        Some(&skip_base),
    )? {
        let (p, q) = (probes.start + pair.a as usize, base_start + pair.b as usize);
        if q < p {
            out.push((q as u32, p as u32));
        }
    }
    Ok(())
}
