//! Candidate generation for dedup tiles: which pairs are worth rescoring exactly.
//!
//! Two sources, chosen per run ([`CandidateMode`]): exact blocked GEMM threshold joins over the mmap'd f32
//! rows (complete by construction: the oracle, and the path for small galleries), or the run's candidate
//! index ([`crate::policy::RunIndex`]): the saved IVF partition re-probed over **every** row of the
//! snapshot by a rule a pilot chose for this run, or a brute-force sketch join where the partition gives no
//! leverage. Rows committed after the index was built get a home in the partition like the others, so
//! they go through the same join (no separate, weaker path for new rows).

use crate::EngineError;
use crate::annset::SketchFilter;
use crate::policy::RunIndex;
use crate::store::Snapshot;
use pacha_datasets::Modality;
use pacha_index::ivf::JoinStats;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Galleries up to this many live rows use exact joins in `Auto` mode. Measured (BENCHMARKS.md, "Candidate
/// path crossover"): with an index built, the IVF path is already faster at 5 000 rows (0.70 s vs 1.03 s) and
/// at 20 000 (5.5 s vs 9.5 s) with identical hits; below 5 000 both take about a second, so the complete exact
/// path is kept there.
pub const AUTO_EXACT_MAX_ROWS: usize = 5_000;

/// How a dedup run generates candidate pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CandidateMode {
    /// Exact up to [`AUTO_EXACT_MAX_ROWS`] live rows; the run's candidate index above.
    Auto,
    /// Exact blocked GEMM threshold joins (complete; the ground-truth path).
    Exact,
    /// The run's candidate index: the IVF partition probed by a pilot-chosen rule, or a brute-force sketch
    /// join (also without a saved index).
    Index,
}

/// Resolves `Auto` into a concrete mode for this snapshot.
pub fn resolve_mode(mode: CandidateMode, snap: &Snapshot) -> CandidateMode {
    match mode {
        CandidateMode::Auto if snap.live() > AUTO_EXACT_MAX_ROWS => CandidateMode::Index,
        CandidateMode::Auto => CandidateMode::Exact,
        m => m,
    }
}

/// Appends to `out` the candidate pairs `(earlier row, later row)` of modality `m` (schema position `mi`)
/// whose later row is in `probes`: cosine at least `min_cos`, both templates present, neither deleted.
/// With `run` (index mode) they come from the run's candidate index, where `verdict` also decides (the
/// fused verdict inside the join), `sketch` filters products (per pair band with `bands`) and the work
/// counters go to `stats`; or from the i8 join where the run planned `"exact-i8"`, where `keep` decides
/// (its counters go to `stats`: `products` i8 products, all `rescored` by the i8 filter, `exact_reads` its
/// survivors, `above` the pairs at or above `min_cos`); otherwise from the exact f32 GEMM join (all
/// appended). Returns true when a join decided on the pairs (its candidates counted in `stats.above`,
/// its reached pairs noted by `verdict`/`keep`), false for the exact GEMM join (every pair appended).
#[allow(clippy::too_many_arguments)]
pub fn pairs_for_tile(
    snap: &Snapshot,
    run: Option<&RunIndex>,
    m: Modality,
    mi: usize,
    probes: Range<usize>,
    min_cos: f32,
    sketch: Option<SketchFilter>,
    bands: Option<&crate::policy::BandJoin>,
    verdict: &(dyn Fn(u32, u32, f32) -> bool + Sync),
    keep: &(dyn Fn(u32, u32, f32) -> bool + Sync),
    stats: &mut JoinStats,
    out: &mut Vec<(u32, u32)>,
) -> Result<bool, EngineError> {
    let Some(view) = snap.f32_rows(m) else {
        return Ok(true);
    };
    let absent = |r: u32| !snap.is_present(m, r as usize) || snap.is_deleted(r as usize);
    if let Some(run) = run.filter(|r| r.joins(mi)) {
        let live_accept = |a: u32, b: u32, c: f32| !absent(a) && !absent(b) && verdict(a, b, c);
        let (pairs, st) = run.join(
            snap,
            mi,
            probes,
            min_cos,
            sketch.map(|s| s.cut),
            bands,
            &live_accept,
        )?;
        *stats = stats.add(&st);
        out.extend(pairs.iter().map(|&(a, b, _)| (a, b)));
        return Ok(true);
    }
    if let (Some(l1), Some(codes)) = (run.and_then(|r| r.exact_i8(mi)), snap.i8_rows(m)) {
        // The exact i8 join: every pair scanned through the codes, the error bound's survivors rescored in
        // f32 (complete by construction, like the GEMM join); `keep` drops pairs as they are found.
        let t0 = std::time::Instant::now();
        let rows = pacha_index::exact_i8::QuantRows::new(view, codes, l1)?;
        let (pairs, st) = pacha_index::exact_i8::probe_join_i8_kept(
            rows,
            probes.clone(),
            min_cos,
            Some(&absent),
            keep,
        )?;
        tracing::debug!(
            "{m}: i8 join of rows {probes:?} at cosine {min_cos:.4}: {} products, {} survivors, {} pairs, {} kept, {:.2} s",
            st.products,
            st.survivors,
            st.pairs,
            pairs.len(),
            t0.elapsed().as_secs_f64()
        );
        *stats = stats.add(&JoinStats {
            products: st.products,
            sketch_pass: 0,
            rescored: st.products,
            exact_reads: st.survivors,
            above: st.pairs,
        });
        out.extend(pairs.iter().map(|p| (p.a, p.b)));
        return Ok(true);
    }
    exact_pairs(view, probes, min_cos, &absent, out)?;
    Ok(false)
}

/// Exact pairs `(q, p)`: `p` in `probes`, `q < p`, cosine ≥ `t`, neither absent.
fn exact_pairs(
    view: pacha_index::RowsF32<'_>,
    probes: Range<usize>,
    t: f32,
    absent: &(dyn Fn(u32) -> bool + Sync),
    out: &mut Vec<(u32, u32)>,
) -> Result<(), EngineError> {
    let probe_view = view.slice_rows(probes.start, probes.end);
    let base = view.slice_rows(0, probes.end);
    let skip_probe = |i: u32| absent(probes.start as u32 + i);
    for pair in
        pacha_index::exact::threshold_join(probe_view, base, t, Some(&skip_probe), Some(absent))?
    {
        let (p, q) = (probes.start + pair.a as usize, pair.b as usize);
        if q < p {
            out.push((q as u32, p as u32));
        }
    }
    Ok(())
}
