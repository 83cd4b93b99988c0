//! How identify searches one modality's indexed rows for one query: the IVF partition probed by the
//! one-way pilot's rule, a scan of every row's saved sign sketch, or an exact scan — the cheapest by
//! predicted milliseconds **per query**, chosen once per candidate cosine and cached by the [`crate::AnnSet`].
//!
//! - **IVF** (`Ivf::search_rule`): the query scores the lists, then every member of the probed lists is
//!   scored with `dot_f32` (rayon over the members). Reach is bounded empirically only (the pilot, then the
//!   identify audit).
//! - **Sketch scan**: the query is sketched with the index's [`Sketcher`] (same seed and bits as the saved
//!   `.sketch` files), every indexed row's sketch is compared (rayon over chunks of rows,
//!   [`pacha_index::sketch::scan_staged`]: 512-bit prefix, then the whole 1024 bits), and the survivors are
//!   rescored with `dot_f32`. The cuts are the contract's complete ones (`dedup::complete_cuts`): a row at
//!   the candidate cosine is dropped with probability ≤ 1e-6 per stage under the binomial model, so at most
//!   the sum of the two stages' drop probabilities ([`IdentifyPlan::drop_bound`]); rows above it less.
//!   Needs the sketches of the indexed rows (saved with the index, or those of an index built in this
//!   process); without them the path is not offered.
//! - **Exact**: `dot_f32` against every indexed row (rayon): complete by construction.
//!
//! Rows committed after the index are scanned exactly by the caller whatever the path.
//!
//! The cost constants are seconds per row (or per member, per survivor) of one query with both cores,
//! estimated from memory traffic (64 B of sketch prefix, 2 KB of f32 row), not fitted: at 1 M rows on a
//! loaded machine (load ≈ 9) the sketch path measured 24 ms p50 against 4.9 ms predicted and the IVF rule
//! 400 ms against 45 ms (BENCHMARKS.md "Identify latency"). The order held, and the choice is between
//! paths an order of magnitude apart, so it is not sensitive to them; refit them on an idle machine.

use crate::EngineError;
use crate::policy::{Visits, plan_modality};
use crate::store::Snapshot;
use pacha_index::ivf::{Ivf, ProbeRule};
use pacha_index::kernels::dot_f32;
use pacha_index::sketch::{Sketcher, Sketches, StagedCut, choose_cut, drop_probability};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::OnceCell;
use std::time::Instant;

/// Seconds per indexed row of the exact scan (a streamed 512-d f32 row and `dot_f32`), both cores.
pub(crate) const EXACT_ROW_S_512: f64 = 60e-9;
/// Seconds per indexed row of the sketch scan's first stage (one 64-byte prefix), both cores.
const SCAN_ROW_S: f64 = 4e-9;
/// Seconds per first-stage survivor of the sketch scan's second stage (the rest of the sketch).
const SCAN_STAGE2_S: f64 = 6e-9;
/// Seconds per rescored survivor (a scattered 512-d f32 row read and `dot_f32`), both cores.
const RESCORE_S_512: f64 = 150e-9;
/// Seconds per probed IVF member (a scattered 512-d f32 row and `dot_f32`), both cores.
const IVF_MEMBER_S_512: f64 = 90e-9;
/// Rows per rayon work item of the scans.
const SCAN_CHUNK: usize = 16_384;

/// Which search identify runs over one modality's indexed rows.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum IdentifyPath {
    /// The partition, probed by this one-way rule.
    Ivf(ProbeRule),
    /// Every indexed row's sign sketch against these cuts, survivors rescored exactly.
    Sketch(StagedCut),
    /// Every indexed row scored exactly.
    Exact,
}

impl IdentifyPath {
    /// The path's name: `"ivf"`, `"sketch"` or `"exact"`.
    pub fn name(&self) -> &'static str {
        match self {
            IdentifyPath::Ivf(_) => "ivf",
            IdentifyPath::Sketch(_) => "sketch",
            IdentifyPath::Exact => "exact",
        }
    }
}

/// A path that [`crate::AnnSet::force_identify_path`] can impose (for measurement and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForcedPath {
    /// The IVF rule of the pilot (every list when the pilot found none).
    Ivf,
    /// The sketch scan (falls back to the cheapest other path without sketches).
    Sketch,
    /// The exact scan.
    Exact,
}

/// How identify searches one modality at one candidate cosine, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IdentifyPlan {
    /// Modality key.
    pub modality: String,
    /// Candidate cosine.
    pub cosine: f32,
    /// The chosen path.
    pub path: IdentifyPath,
    /// Predicted milliseconds per query of each path offered: `(name, ms)`.
    pub predicted_ms: Vec<(String, f64)>,
    /// Upper bound on the probability that the chosen path drops a row at the candidate cosine: the
    /// binomial model's drop at both sketch cuts for `"sketch"`, 0 for `"exact"`; `None` for `"ivf"`
    /// (bounded empirically only).
    pub drop_bound: Option<f64>,
    /// The one-way pilot's rule (`None`: no partition to probe).
    pub ivf_rule: Option<ProbeRule>,
    /// Mean members one query's rule probes (pilot rows).
    pub ivf_members: f64,
    /// True iff the indexed rows' sketches were available.
    pub sketches: bool,
    /// Seconds the planning took (the pilot included).
    pub seconds: f64,
}

/// Plans identify's search of modality `mi` at cosine `t` over the `rows` indexed rows of `ivf`:
/// `impostor` is the calibration's Gaussian impostor cosine model `(mean, sd)` (predicts the sketch
/// survivors; without it every row is assumed to survive), `sketches` whether the indexed rows' sketches
/// are at hand, `force` a path imposed by the caller.
pub(crate) fn plan(
    snap: &Snapshot,
    ivf: &Ivf,
    mi: usize,
    t: f32,
    impostor: Option<(f64, f64)>,
    sketches: bool,
    force: Option<ForcedPath>,
) -> Result<IdentifyPlan, EngineError> {
    let t0 = Instant::now();
    let spec = &snap.schema().modalities[mi];
    let scale = spec.dim as f64 / 512.0;
    let n = ivf.member_counts().iter().sum::<usize>() as f64;
    let mut predicted = vec![("exact".to_string(), n * EXACT_ROW_S_512 * scale * 1e3)];
    let mut best = (IdentifyPath::Exact, predicted[0].1, Some(0.0));
    // The pilot (one-way: only the query probes).
    let pilot = plan_modality(
        snap,
        ivf,
        mi,
        t,
        Visits::OneWay,
        None,
        None,
        &OnceCell::new(),
        true,
    )?;
    let members = if n > 0.0 {
        pilot.predicted_products / n
    } else {
        0.0
    };
    if let Some(rule) = pilot.ivf_rule {
        let ms = (members * IVF_MEMBER_S_512 * scale
            + ivf.lists() as f64 * spec.dim as f64 * 2.0 / 20e9)
            * 1e3;
        predicted.push(("ivf".into(), ms));
        if ms < best.1 {
            best = (IdentifyPath::Ivf(rule), ms, None);
        }
    }
    if sketches {
        let (cut, ms, drop) = sketch_scan(n, scale, t, impostor);
        predicted.push(("sketch".into(), ms));
        if ms < best.1 || force == Some(ForcedPath::Sketch) {
            best = (IdentifyPath::Sketch(cut), ms, Some(drop));
        }
    }
    match force {
        Some(ForcedPath::Exact) => best = (IdentifyPath::Exact, 0.0, Some(0.0)),
        Some(ForcedPath::Ivf) => {
            let rule = pilot.ivf_rule.unwrap_or(ProbeRule::fixed(ivf.lists()));
            best = (IdentifyPath::Ivf(rule), 0.0, None);
        }
        _ => {}
    }
    Ok(IdentifyPlan {
        modality: spec.modality.key(),
        cosine: t,
        path: best.0,
        predicted_ms: predicted,
        drop_bound: best.2,
        ivf_rule: pilot.ivf_rule,
        ivf_members: members,
        sketches,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The sketch scan of `n` indexed rows at cosine `t` (`scale`: dimension / 512): its staged cut, predicted
/// milliseconds per query and drop bound at `t` (see [`plan`]).
fn sketch_scan(n: f64, scale: f64, t: f32, impostor: Option<(f64, f64)>) -> (StagedCut, f64, f64) {
    let policy = crate::dedup::complete_cuts();
    let model = impostor.unwrap_or((0.0, 1.0));
    let choose = |bits: usize| choose_cut(bits, f64::from(t), model, model, &policy);
    let (prefix, full) = (
        choose(crate::annset::SKETCH_PREFIX_BITS),
        choose(crate::annset::SKETCH_BITS),
    );
    let (p1, p2) = match impostor {
        Some(_) => (prefix.impostor_pass, full.impostor_pass),
        None => (1.0, 1.0),
    };
    let cut = crate::annset::staged_cut(&prefix, &full);
    let ms = n * (SCAN_ROW_S + p1 * SCAN_STAGE2_S + p2 * RESCORE_S_512 * scale) * 1e3;
    let drop = drop_probability(crate::annset::SKETCH_PREFIX_BITS, f64::from(t), prefix.cut)
        + drop_probability(crate::annset::SKETCH_BITS, f64::from(t), full.cut);
    (cut, ms, drop)
}

/// Seconds per stored row and dimension of an identify plan's pilot (its exact search of the pilot rows,
/// list scores, reach), both cores: measured at 1 M rows (`pacha -vv identify`'s pilot lines) 4.2 s for the
/// 512-d face (8.2 ns) and 1.65–1.75 s for each 256-d finger (6.4–6.8 ns), turin.
pub(crate) const PILOT_ROW_DIM_S: f64 = 7.0e-9;

/// Predicted milliseconds of the pilot that plans identify's search of modality `mi` over `rows` rows.
pub(crate) fn pilot_ms(snap: &Snapshot, rows: usize, mi: usize) -> f64 {
    rows as f64 * snap.schema().modalities[mi].dim as f64 * PILOT_ROW_DIM_S * 1e3
}

/// Predicted milliseconds per query of the cheaper of the exact scan and (with `sketches`) the sketch scan
/// of `n` indexed rows of modality `mi` at cosine `t`: [`plan`]'s figures without its pilot (the IVF path
/// is not priced), for choosing between one-by-one search and a batch's joint scan without planning.
pub(crate) fn pilotless_ms(
    snap: &Snapshot,
    n: usize,
    mi: usize,
    t: f32,
    impostor: Option<(f64, f64)>,
    sketches: bool,
) -> f64 {
    let scale = snap.schema().modalities[mi].dim as f64 / 512.0;
    let exact = n as f64 * EXACT_ROW_S_512 * scale * 1e3;
    if sketches {
        exact.min(sketch_scan(n as f64, scale, t, impostor).1)
    } else {
        exact
    }
}

/// Indexed rows (`0..rows` of `base`) whose exact cosine with `query` is at least `t`, by `path`, sorted
/// by (score desc, row asc). `sketches` must hold the sketches of rows `0..rows` for the sketch path;
/// `present` says which rows hold a template.
#[allow(clippy::too_many_arguments)]
pub(crate) fn search(
    ivf: &Ivf,
    base: pacha_index::RowsF32<'_>,
    present: &(dyn Fn(usize) -> bool + Sync),
    query: &[f32],
    t: f32,
    path: IdentifyPath,
    sketches: Option<(&Sketcher, &Sketches)>,
) -> Result<Vec<(u32, f32)>, EngineError> {
    let rows = base.rows();
    let score = |r: u32| {
        let s = dot_f32(query, base.row(r as usize));
        (s >= t).then_some((r, s))
    };
    let mut out: Vec<(u32, f32)> = match (path, sketches) {
        (IdentifyPath::Ivf(rule), _) => return Ok(ivf.search_rule(base, query, t, rule)),
        (IdentifyPath::Sketch(cut), Some((sketcher, sk))) if sk.rows() >= rows => {
            // The query's sketch by the same GEMM kernel as the saved rows' (one row).
            let one = sketcher
                .sketch_rows(pacha_index::RowsF32::dense(query, query.len())?, &|_| true)?;
            let q = one.row(0);
            let survivors: Vec<u32> = (0..rows.div_ceil(SCAN_CHUNK))
                .into_par_iter()
                .flat_map_iter(|c| {
                    let (a, b) = (c * SCAN_CHUNK, ((c + 1) * SCAN_CHUNK).min(rows));
                    let mut got = Vec::new();
                    sk.scan_rows(a..b, q, cut, &mut got);
                    got.into_iter()
                })
                .collect();
            survivors
                .into_par_iter()
                .with_min_len(256)
                .filter(|&r| present(r as usize))
                .filter_map(score)
                .collect()
        }
        _ => (0..rows as u32)
            .into_par_iter()
            .with_min_len(4096)
            .filter(|&r| present(r as usize))
            .filter_map(score)
            .collect(),
    };
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(out)
}
