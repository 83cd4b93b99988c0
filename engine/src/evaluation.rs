//! Evaluation of a dedup run against ground truth: gathers the genuine and impostor score samples from the
//! store and hands everything to [`crate::eval::evaluate`].

use crate::Modality;
use crate::audit::clopper_pearson;
use crate::engine::{
    TAIL_ROWS, TailPool, count_pool_tail_banded, count_pool_tail_pairs, hub_pool,
    stream_pool_pairs, tail_pool,
};
use crate::eval::{CalibrationPoint, CoExceedance, EvalInput, EvalReport, FusedCount, ScoredPair};
use crate::fusion::{Calibration, FusedKey, ModalityTailCheck};
use crate::matcher::{compare_rows, fused_rows};
use crate::runio::RunData;
use crate::tail::{TAIL_START, cosine_at};
use crate::{Engine, EngineError};
use pacha_index::kernels::dot_f32;
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};

/// Calibrated-score thresholds at which the calibration check compares predicted and measured FMR.
const CHECK_THRESHOLDS: [f64; 9] = [10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0];

/// Evaluates `run` against `truth` (pairs of subject IDs), sampling `impostor_pairs` random pairs of
/// different people for the impostor histograms and the calibration check.
pub fn evaluate_run(
    engine: &Engine,
    run: &RunData,
    truth: &[(String, String)],
    impostor_pairs: usize,
    counts: EvalCounts,
) -> Result<EvalReport, EngineError> {
    let snap = engine.snapshot();
    let cal = engine.usable_calibration()?;
    let live: Vec<usize> = (0..snap.rows()).filter(|&r| !snap.is_deleted(r)).collect();
    let subjects: Vec<String> = live
        .iter()
        .map(|&r| snap.subject_id(r).to_string())
        .collect();
    let pairs: Vec<ScoredPair> = run
        .pairs
        .iter()
        .map(|p| ScoredPair {
            a: p.a.clone(),
            b: p.b.clone(),
            score: p.score(),
        })
        .collect();
    let truth_rows: Vec<(usize, usize)> = truth
        .iter()
        .filter_map(|(a, b)| Some((snap.row_of(a)?, snap.row_of(b)?)))
        .collect();
    let truth_set: HashSet<(usize, usize)> = truth_rows
        .iter()
        .map(|&(a, b)| (a.min(b), a.max(b)))
        .collect();
    let labels: Vec<String> = snap.schema().keys();

    let collect = |rows: &[(usize, usize)]| -> (Vec<(String, Vec<f64>)>, Vec<f64>) {
        let comps: Vec<_> = rows
            .par_iter()
            .map(|&(a, b)| compare_rows(&snap, &cal, a, b))
            .collect();
        let mut per: Vec<(String, Vec<f64>)> =
            labels.iter().map(|l| (l.clone(), Vec::new())).collect();
        let mut fused = Vec::with_capacity(comps.len());
        for c in &comps {
            for s in &c.modalities {
                if let Some(slot) = per.iter_mut().find(|(l, _)| *l == s.modality.key()) {
                    slot.1.push(f64::from(s.cosine));
                }
            }
            fused.push(c.fused.score);
        }
        (per, fused)
    };
    let (mut genuine, gen_fused) = collect(&truth_rows);
    genuine.push(("fused".to_string(), gen_fused));

    let mut rng_state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let mut imp_rows = Vec::with_capacity(impostor_pairs);
    if live.len() >= 2 {
        let mut attempts = 0usize;
        while imp_rows.len() < impostor_pairs && attempts < impostor_pairs * 4 {
            attempts += 1;
            let (a, b) = (
                live[(next() % live.len() as u64) as usize],
                live[(next() % live.len() as u64) as usize],
            );
            if a != b && !truth_set.contains(&(a.min(b), a.max(b))) {
                imp_rows.push((a, b));
            }
        }
    }
    let (mut impostor, imp_fused) = collect(&imp_rows);
    impostor.push(("fused".to_string(), imp_fused.clone()));
    let mut sample_keys: HashMap<FusedKey, u64> = HashMap::new();
    for &(a, b) in &imp_rows {
        let key = pair_key(
            &cal,
            &row_members(&snap, &cal, a),
            &row_members(&snap, &cal, b),
        );
        *sample_keys.entry(key).or_default() += 1;
    }
    let predicted: Vec<(f64, f64)> = CHECK_THRESHOLDS
        .iter()
        .copied()
        .zip(predicted_shares(&sample_keys, &cal, &CHECK_THRESHOLDS))
        .collect();
    let mut attain_notes = Vec::new();
    attainable_notes("calibration check", &predicted, &mut attain_notes);

    let input = EvalInput {
        subjects: &subjects,
        pairs: &pairs,
        truth,
        threshold: run.threshold,
        genuine: &genuine,
        impostor: &impostor,
        predicted_fmr: &predicted,
        impostor_fused: &imp_fused,
    };
    let mut report = crate::eval::evaluate(&input);
    report.notes.extend(attain_notes);
    mark_incomplete(&mut report, &run.summary, run.threshold);
    if counts.tail_rows >= 2 {
        report.tail_checks =
            out_of_sample_tails(&snap, &cal, &truth_set, counts.tail_rows, &mut report.notes)?;
    }
    if counts.fused_rows >= 2 {
        report.fused_count = fused_count(
            &snap,
            &cal,
            &truth_set,
            counts.fused_rows,
            &mut report.notes,
        )?;
    }
    if counts.fused_rows >= 2 && cal.models.len() >= 2 {
        report.dependence = modality_dependence(
            &snap,
            &cal,
            &truth_set,
            counts.fused_rows.min(DEPENDENCE_ROWS),
        )?;
    }
    // The calibration check resolves only FMRs its impostor sample can see.
    let unresolved: Vec<String> = report
        .calibration
        .iter()
        .filter(|c| c.false_matches < MIN_RESOLVED_EVENTS && c.impostor_samples > 0)
        .map(|c| format!("{:.0}", c.threshold))
        .collect();
    if !unresolved.is_empty() {
        report.notes.push(format!(
            "calibration check: {} impostor pairs sampled; at thresholds {} fewer than {MIN_RESOLVED_EVENTS} false \
             matches were counted, so the measured FMR there is only bounded by its 95 % interval (measured_ci), \
             not resolved: it cannot confirm the model's prediction (`pacha calibrate` counts far more pairs)",
            impostor_pairs,
            unresolved.join(", ")
        ));
    }
    Ok(report)
}

/// Rows whose every pair the fused check scores (2·10⁸ pairs: FMR 1e-7 expects 20 events).
pub const FUSED_POOL_ROWS: usize = 20_000;

/// Rows of the per-modality tail check's pool by default: 40 000 rows (8·10⁸ pairs, FMR 1e-7 expects 80
/// events), fully disjoint from the default calibration pool ([`TAIL_ROWS`]) from 100 000 live rows on.
pub const CHECK_ROWS: usize = 40_000;

/// How many rows the exhaustive checks of an evaluation count all pairs of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalCounts {
    /// Rows of the per-modality tail check's pool (disjoint from the calibration's while the store has twice
    /// as many live rows; 0 skips the check).
    pub tail_rows: usize,
    /// Rows of the fused check's pool (0 skips it).
    pub fused_rows: usize,
}

impl Default for EvalCounts {
    fn default() -> Self {
        EvalCounts {
            tail_rows: CHECK_ROWS,
            fused_rows: FUSED_POOL_ROWS,
        }
    }
}
/// Fused-score thresholds of the fused check.
pub const FUSED_THRESHOLDS: [f64; 7] = [30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0];

/// Checks each modality's impostor model on every pair of a pool disjoint from the calibration's (the rows
/// whose hash is largest where the calibration took the smallest), labelled genuine pairs left out; a
/// hub-stratified calibration on a second hub-stratified draw (see the notes it writes).
pub fn out_of_sample_tails(
    snap: &crate::store::Snapshot,
    cal: &Calibration,
    truth: &HashSet<(usize, usize)>,
    rows: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<ModalityTailCheck>, EngineError> {
    let mut out = Vec::new();
    for (i, (m, model)) in cal.models.iter().enumerate() {
        let fitted = cal.tail_checks.iter().find(|c| c.modality == m.key());
        let (seed, own_cap) =
            fitted.map_or((0x5eed, TAIL_ROWS), |c| (c.pool_seed, c.pool_cap.max(2)));
        let hubs = fitted.is_some_and(|c| c.pool_kind == TailPool::Hubs);
        // Count from the lower of the two models' starting points, so both are checked at 1e-4.
        let bands = cal.bands(i);
        let u = model
            .impostor_tail
            .map_or(1.0, |t| t.u)
            .min(cosine_at(&|s| model.impostor.sf(s), TAIL_START));
        // Banded: from the lowest band threshold too, so every band is checked from its own start.
        let u = bands.map_or(u, |b| {
            b.models
                .iter()
                .filter_map(|bm| bm.impostor_tail.map(|t| t.u))
                .fold(u, f64::min)
        });
        let edges = bands.map_or(&[][..], |b| &b.edges[..]);
        // A hub-stratified calibration is checked by another hub-stratified draw (another reference sample,
        // other quiet rows; the hubs are in both): a second estimate of every pair of the store.
        let (pool, inclusion) = if hubs {
            let hub_u = model.impostor_tail.map_or(u, |t| t.u);
            hub_pool(snap, *m, seed ^ CHECK_POOL_SALT, rows, hub_u)?
        } else {
            (tail_pool(snap, seed, rows, true), None)
        };
        let disjoint = own_cap + rows <= snap.live() && !hubs;
        // A pool as large as the store is every pair of it (a hub draw then keeps every row, unweighted).
        let whole = rows >= snap.live() || (hubs && inclusion.is_none());
        if whole && fitted.is_some() {
            notes.push(format!(
                "{m} tail check: every pair of the store's rows holding {m} counted ({} rows): the store's own \
                 FMR, which the calibration's {}pool of {own_cap} rows estimates (the yardstick, not another sample)",
                pool.len(),
                if hubs { "hub-stratified " } else { "" }
            ));
        } else if hubs {
            notes.push(format!(
                "{m} tail check: the calibration counted a hub-stratified pool; the check counts another \
                 ({} rows, the hubs in both, the quiet rows drawn again), weighted the same way: a second \
                 estimate of every pair of the store, not out of sample",
                pool.len()
            ));
        } else if !disjoint && fitted.is_some() {
            let own = tail_pool(snap, seed, own_cap, false);
            let shared = pool.iter().filter(|r| own.binary_search(r).is_ok()).count();
            notes.push(format!(
                "{m} tail check: the store has {} live rows, so the check's pool of {} shares {shared} rows with \
                 the calibration's (not fully out of sample)",
                snap.live(),
                pool.len()
            ));
        }
        if let Some((count, by_band)) =
            count_pool_tail_banded(snap, *m, &pool, u, truth, edges, inclusion.as_ref())?
        {
            let kind = if inclusion.is_some() {
                TailPool::Hubs
            } else {
                TailPool::Uniform
            };
            let check = ModalityTailCheck::new(*m, model, &count, seed, rows, kind);
            let check = match bands {
                Some(b) => check.with_bands(model, b, &by_band),
                None => check,
            };
            // Two disjoint pools sample independently: the model's own sampling spread adds to the check's.
            let check = match fitted {
                Some(f) if disjoint => check.against_calibration(f),
                _ => check,
            };
            spread_notes(&check, notes);
            out.push(check);
        }
    }
    Ok(out)
}

/// Salt of the seed of an evaluation's hub-stratified check pool (another draw than the calibration's).
pub const CHECK_POOL_SALT: u64 = 0xc4ec;

/// Events behind a ratio from which the tail check holds the model to [`TAIL_TOLERANCE`].
pub const TAIL_RESOLVED_EVENTS: u64 = 50;
/// How far measured ÷ predicted may stray from 1 where enough events were counted.
pub const TAIL_TOLERANCE: f64 = 1.5;

/// Notes, for each model row of an out-of-sample tail check with at least [`TAIL_RESOLVED_EVENTS`] events
/// whose ratio strays beyond [`TAIL_TOLERANCE`], whether the two pools' sampling spread (clustered events
/// included) accounts for it.
fn spread_notes(check: &ModalityTailCheck, notes: &mut Vec<String>) {
    for r in &check.model {
        let (Some(q), Some((lo, hi))) = (r.ratio, r.ratio_ci) else {
            continue;
        };
        if r.events < TAIL_RESOLVED_EVENTS || (1.0 / TAIL_TOLERANCE..=TAIL_TOLERANCE).contains(&q) {
            continue;
        }
        let verdict = if (lo..=hi).contains(&1.0) {
            "so the difference is within what two samples of one population can show by chance"
        } else {
            "so chance alone explains it only at odds under 5 %"
        };
        notes.push(format!(
            "{} tail check at FMR {:.0e}: measured ÷ predicted {q:.2} on {} events (design effect {:.1}: worth {:.0} \
             independent pairs); the 95 % interval, counting both pools' sampling spread where they are disjoint, \
             is {lo:.2}–{hi:.2}, {verdict}",
            check.modality,
            r.level,
            r.events,
            r.design_effect.unwrap_or(1.0),
            r.effective_events(),
        ));
    }
}

/// Candidate pairs (summed over modalities, as the impostor models predict them) one pass of the fused
/// check may stream: about a minute of fusing on two cores.
pub const FUSED_CANDIDATES: f64 = 2e8;

/// Scores every pair of a seeded pool of up to `pool_rows` live rows on the fused scale and compares the
/// share at or above each of [`FUSED_THRESHOLDS`] with the share the calibration predicts there. Pairs that
/// can reach a threshold are found per modality by the exact GEMM join at the calibration's complete
/// candidate cosines (pigeonhole: no pair that reaches it is missed) and streamed: each is fused in the first
/// modality (in model order) whose cosine it reaches, so it is counted once without holding the candidates.
/// (A pair whose cosine sits within f32 rounding of an earlier modality's candidate cosine could be counted
/// twice or not at all; the GEMM and the scalar dot agree to about 1e-7.)
///
/// A low threshold's candidate cosines are low: at score 30 a large share of all pairs are candidates, and a
/// pool of 320 000 rows (5·10¹⁰ pairs, what FMR 1e-9 needs) would fuse billions of them. So each threshold
/// is counted on the largest nested sub-pool (the same seeded order, fewer rows) whose predicted candidates
/// stay within [`FUSED_CANDIDATES`]; thresholds sharing a sub-pool share one pass. Low scores, which are
/// common, are resolved on fewer rows; each point's `impostor_samples` says how many pairs it counted, and a
/// note names the thresholds counted on fewer rows than asked for.
pub fn fused_count(
    snap: &crate::store::Snapshot,
    cal: &Calibration,
    truth: &HashSet<(usize, usize)>,
    pool_rows: usize,
    notes: &mut Vec<String>,
) -> Result<Option<FusedCount>, EngineError> {
    fused_count_within(snap, cal, truth, pool_rows, FUSED_CANDIDATES, notes)
}

/// Seed of the fused check's pool ([`tail_pool`] order: a smaller pool is the first rows of a larger one).
pub const FUSED_POOL_SEED: u64 = 0xf05e;

/// [`fused_count`] with the per-pass candidate budget `max_candidates`.
pub fn fused_count_within(
    snap: &crate::store::Snapshot,
    cal: &Calibration,
    truth: &HashSet<(usize, usize)>,
    pool_rows: usize,
    max_candidates: f64,
    notes: &mut Vec<String>,
) -> Result<Option<FusedCount>, EngineError> {
    let full = tail_pool(snap, FUSED_POOL_SEED, pool_rows, false).len();
    if full < 2 {
        return Ok(None);
    }
    // Per threshold, its complete candidate cosines and the rows of the sub-pool it is counted on (never
    // fewer than a lower threshold's).
    let cosines_at: Vec<Vec<Option<f32>>> = FUSED_THRESHOLDS
        .iter()
        .map(|&t| cal.candidate_cosines(t))
        .collect();
    let mut rows_at = Vec::with_capacity(FUSED_THRESHOLDS.len());
    for cosines in &cosines_at {
        let share: f64 = cal
            .models
            .iter()
            .zip(cosines)
            .map(|((_, model), c)| c.map_or(0.0, |c| model.impostor_sf(f64::from(c))))
            .sum();
        // n(n-1)/2 · share ≤ budget.
        let fit = (2.0 * max_candidates / share.max(f64::MIN_POSITIVE))
            .sqrt()
            .floor();
        let rows = if fit >= full as f64 {
            full
        } else {
            (fit as usize).max(2)
        };
        let prev = rows_at.last().copied().unwrap_or(2);
        rows_at.push(rows.max(prev));
    }
    let mut points = Vec::with_capacity(FUSED_THRESHOLDS.len());
    let mut point_rows = Vec::with_capacity(FUSED_THRESHOLDS.len());
    let mut largest = (0, 0);
    let mut k = 0;
    while k < FUSED_THRESHOLDS.len() {
        let rows = rows_at[k];
        let group = rows_at[k..].iter().take_while(|&&r| r == rows).count();
        let thresholds = &FUSED_THRESHOLDS[k..k + group];
        let pool = tail_pool(snap, FUSED_POOL_SEED, rows, false);
        let (pairs, pass) = fused_pass(snap, cal, truth, &pool, thresholds, &cosines_at[k], notes)?;
        if rows < full {
            notes.push(format!(
                "fused check: score{} {} counted on {} of the pool's {full} rows (their candidates would \
                 exceed {max_candidates:.0e} on the whole pool)",
                if group > 1 { "s" } else { "" },
                thresholds
                    .iter()
                    .map(|t| format!("{t:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                pool.len(),
            ));
        }
        largest = (pool.len(), pairs);
        point_rows.extend(std::iter::repeat_n(pool.len(), pass.len()));
        points.extend(pass);
        k += group;
    }
    Ok(Some(FusedCount {
        pool_rows: largest.0,
        pairs: largest.1,
        points,
        point_rows,
    }))
}

/// One pass of the fused check: every impostor pair of `pool` at or above each of `thresholds` (ascending, at
/// most [`FUSED_THRESHOLDS`]' count), found at `cosines` (the lowest threshold's complete candidate cosines),
/// against the calibration's prediction for the pool. Returns the pool's impostor pairs and one point per
/// threshold.
fn fused_pass(
    snap: &crate::store::Snapshot,
    cal: &Calibration,
    truth: &HashSet<(usize, usize)>,
    pool: &[usize],
    thresholds: &[f64],
    cosines: &[Option<f32>],
    notes: &mut Vec<String>,
) -> Result<(u64, Vec<CalibrationPoint>), EngineError> {
    // Impostor pairs at or above the lowest threshold, with how many thresholds each reaches (thresholds
    // ascend): the events, and the rows they share for the design effect.
    let mut hits: Vec<(usize, usize, usize)> = Vec::new();
    for (i, (m, _)) in cal.models.iter().enumerate() {
        let Some(Some(c)) = cosines.get(i) else {
            continue;
        };
        // The earlier modalities' candidate cosines: a pair reaching one was scored there.
        let earlier: Vec<(Modality, f32)> = cal.models[..i]
            .iter()
            .zip(cosines)
            .filter_map(|((m, _), c)| Some((*m, (*c)?)))
            .collect();
        stream_pool_pairs(snap, *m, pool, f64::from(*c), &mut |batch| {
            let counted = batch
                .par_iter()
                .filter(|p| !truth.contains(p))
                .filter(|&&(a, b)| {
                    !earlier.iter().any(|&(e, ce)| {
                        match (snap.template(e, a), snap.template(e, b)) {
                            (Some(x), Some(y)) => dot_f32(x, y) >= ce,
                            _ => false,
                        }
                    })
                })
                .filter_map(|&(a, b)| {
                    let s = fused_rows(snap, cal, a, b).score;
                    let reached = thresholds.iter().filter(|&&t| s >= t).count();
                    (reached > 0).then_some((a, b, reached))
                })
                .collect::<Vec<_>>();
            hits.extend(counted);
        })?;
    }
    let pairs = pool_impostor_pairs(pool, truth);
    let events: Vec<u64> = (0..thresholds.len())
        .map(|k| hits.iter().filter(|h| h.2 > k).count() as u64)
        .collect();
    let design_effects: Vec<f64> = (0..thresholds.len())
        .map(|k| {
            let at = hits.iter().filter(|h| h.2 > k);
            crate::tail::design_effect(pairs, at.map(|&(a, b, _)| (a as u64, b as u64)))
        })
        .collect();
    let predicted = predicted_shares(&pool_keys(snap, cal, pool), cal, thresholds);
    let labelled: Vec<(f64, f64)> = thresholds.iter().copied().zip(predicted).collect();
    attainable_notes("fused check", &labelled, notes);
    let points = labelled
        .iter()
        .zip(events.iter().zip(design_effects))
        .map(|(&(t, predicted), (&events, d))| {
            let resolved = predicted * pairs as f64 >= 1.0;
            CalibrationPoint {
                threshold: t,
                predicted_fmr: predicted,
                measured_fmr: resolved.then(|| events as f64 / pairs as f64),
                false_matches: usize::try_from(events).unwrap_or(usize::MAX),
                impostor_samples: usize::try_from(pairs).unwrap_or(usize::MAX),
                measured_ci: resolved
                    .then(|| crate::tail::clustered_interval(events, pairs as f64, d)),
                design_effect: resolved.then_some(d),
            }
        })
        .collect();
    Ok((pairs, points))
}

/// The pairs of `pool` minus the labelled genuine pairs among them.
fn pool_impostor_pairs(pool: &[usize], truth: &HashSet<(usize, usize)>) -> u64 {
    let in_pool: HashSet<usize> = pool.iter().copied().collect();
    let excluded = truth
        .iter()
        .filter(|(a, b)| in_pool.contains(a) && in_pool.contains(b))
        .count() as u64;
    let n = pool.len() as u64;
    (n * n.saturating_sub(1) / 2).saturating_sub(excluded)
}

/// Per fused model index, the row's pair quality for that modality when the row has its template.
fn row_members(snap: &crate::store::Snapshot, cal: &Calibration, r: usize) -> Vec<Option<f32>> {
    cal.models
        .iter()
        .map(|(m, _)| snap.template(*m, r).map(|_| snap.quality(*m, r)))
        .collect()
}

/// The fused distribution a pair of rows with these members is scored on, as
/// [`crate::matcher::compare_rows`] scores it: the modalities both have, at the lower of the two qualities.
fn pair_key(cal: &Calibration, a: &[Option<f32>], b: &[Option<f32>]) -> FusedKey {
    let shared: Vec<(usize, Option<f32>)> = a
        .iter()
        .zip(b)
        .enumerate()
        .filter_map(|(i, (x, y))| Some((i, Some(x.as_ref()?.min(*y.as_ref()?)))))
        .collect();
    cal.fused_key(&shared)
}

/// How many of the pairs of `pool` are scored on each fused distribution. Rows are grouped by what decides
/// their pairs' distribution (per modality: absent, or its quality band), so the count takes one key per pair
/// of groups, not per pair of rows; the band of a pair is the lower of its rows' bands (bands rise with
/// quality), which one representative quality per group gives.
fn pool_keys(
    snap: &crate::store::Snapshot,
    cal: &Calibration,
    pool: &[usize],
) -> HashMap<FusedKey, u64> {
    // Per group (each modality absent or in its band): its rows and one row's members.
    type Group = (u64, Vec<Option<f32>>);
    let mut groups: HashMap<Vec<Option<usize>>, Group> = HashMap::new();
    for &r in pool {
        let members = row_members(snap, cal, r);
        let group = members
            .iter()
            .enumerate()
            .map(|(i, q)| q.map(|q| cal.bands(i).map_or(0, |b| b.band(q))))
            .collect();
        groups.entry(group).or_insert((0, members)).0 += 1;
    }
    let groups: Vec<Group> = groups.into_values().collect();
    let mut keys: HashMap<FusedKey, u64> = HashMap::new();
    for (i, (na, a)) in groups.iter().enumerate() {
        for (j, (nb, b)) in groups.iter().enumerate().skip(i) {
            let pairs = if i == j {
                na * na.saturating_sub(1) / 2
            } else {
                na * nb
            };
            *keys.entry(pair_key(cal, a, b)).or_default() += pairs;
        }
    }
    keys
}

/// The share of pairs the calibration predicts at or above each threshold, over pairs counted per fused
/// distribution in `keys`: each at the lowest score it can attain at or above the threshold
/// ([`Calibration::attainable_fmr`]), which the measured share is compared with.
fn predicted_shares(
    keys: &HashMap<FusedKey, u64>,
    cal: &Calibration,
    thresholds: &[f64],
) -> Vec<f64> {
    let total: u64 = keys.values().sum();
    thresholds
        .iter()
        .map(|&t| {
            if total == 0 {
                return crate::fusion::fmr_from_score(t);
            }
            keys.iter()
                .map(|(k, &n)| n as f64 * cal.attainable_fmr(*k, t))
                .sum::<f64>()
                / total as f64
        })
        .collect()
}

/// Notes the thresholds whose predicted share lies well below the nominal FMR `10^(−t/10)`: scores jump
/// there, and the prediction is the model's share at the lowest score the pairs can attain.
fn attainable_notes(what: &str, predicted: &[(f64, f64)], notes: &mut Vec<String>) {
    let jumps: Vec<String> = predicted
        .iter()
        .filter(|&&(t, p)| p < 0.9 * crate::fusion::fmr_from_score(t))
        .map(|&(t, p)| {
            format!(
                "{t:.0}: {p:.3e} (nominal {:.0e})",
                crate::fusion::fmr_from_score(t)
            )
        })
        .collect();
    if !jumps.is_empty() {
        notes.push(format!(
            "{what}: the model's fused scores jump over these thresholds (atoms at the LLR floor), so each is \
             predicted at the lowest score its pairs can attain above it: {}",
            jumps.join(", ")
        ));
    }
}

/// Most rows of the dependence check's pool: at the 1e-2 level each modality keeps about 5 M of its 5·10⁸
/// pairs.
const DEPENDENCE_ROWS: usize = 30_000;
/// Impostor tail levels at which the dependence check counts modalities exceeding together.
pub const DEPENDENCE_LEVELS: [f64; 2] = [1e-2, 1e-3];

/// Counts, on every pair of a seeded pool of `pool_rows` rows (the fused check's pool, or its first rows),
/// how often each pair of modalities, and all of them when there are more than two, exceed their own
/// impostor tail level together, against independence (see [`CoExceedance`]). Labelled genuine pairs are
/// left out: a duplicate enrolment is expected to match in every modality.
pub fn modality_dependence(
    snap: &crate::store::Snapshot,
    cal: &Calibration,
    truth: &HashSet<(usize, usize)>,
    pool_rows: usize,
) -> Result<Vec<CoExceedance>, EngineError> {
    let pool = tail_pool(snap, FUSED_POOL_SEED, pool_rows, false);
    let n = cal.models.len();
    if pool.len() < 2 || n < 2 {
        return Ok(Vec::new());
    }
    let pairs = pool_impostor_pairs(&pool, truth);
    // Subsets: every pair of modalities, and all of them when there are more than two.
    let mut subsets: Vec<Vec<usize>> = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            subsets.push(vec![i, j]);
        }
    }
    if n > 2 {
        subsets.push((0..n).collect());
    }
    let mut out = Vec::new();
    for level in DEPENDENCE_LEVELS {
        let mut cosines = Vec::with_capacity(n);
        let mut sets: Vec<HashSet<(usize, usize)>> = Vec::with_capacity(n);
        for (m, model) in &cal.models {
            let c = cosine_at(&|s| model.impostor_sf(s), level);
            let found = count_pool_tail_pairs(snap, *m, &pool, c)?.unwrap_or_default();
            cosines.push(c as f32);
            sets.push(found.into_iter().filter(|q| !truth.contains(q)).collect());
        }
        for members in &subsets {
            let smallest = members
                .iter()
                .copied()
                .min_by_key(|&i| sets[i].len())
                .unwrap_or(members[0]);
            let joint = sets[smallest]
                .iter()
                .filter(|q| {
                    members
                        .iter()
                        .all(|&i| i == smallest || sets[i].contains(q))
                })
                .count() as u64;
            let marginal: Vec<u64> = members.iter().map(|&i| sets[i].len() as u64).collect();
            let expected = marginal
                .iter()
                .fold(pairs as f64, |e, &k| e * k as f64 / pairs.max(1) as f64);
            let resolved = expected >= 1.0;
            out.push(CoExceedance {
                modalities: members.iter().map(|&i| cal.models[i].0.key()).collect(),
                level,
                cosines: members.iter().map(|&i| cosines[i]).collect(),
                marginal,
                pairs,
                joint,
                expected,
                ratio: resolved.then(|| joint as f64 / expected),
                ratio_ci: resolved.then(|| {
                    let (lo, hi) = clopper_pearson(joint, pairs, 0.95);
                    let share = expected / pairs as f64;
                    (lo / share, hi / share)
                }),
            });
        }
    }
    Ok(out)
}

/// False matches a calibration point needs before its measured FMR counts as resolved (relative standard
/// error about 1/√50 ≈ 14 %).
pub const MIN_RESOLVED_EVENTS: usize = 50;

/// Marks what an evaluation computed from pairs the run does not prove complete: in an index-mode run with a
/// report floor under the threshold, the pairs between them are searched like the hits but the audit can
/// bound their recall only when the run is complete by construction; DET points and FNIR-at-FPIR figures
/// at thresholds below the run's then rest on them and are flagged, with a note naming the audit's figure.
pub fn mark_incomplete(
    report: &mut EvalReport,
    summary: &crate::dedup::DedupSummary,
    threshold: f64,
) {
    report.run_audit = summary.audit.clone();
    let Some(audit) = &summary.audit else {
        return;
    };
    let Some(below) = &audit.below_threshold else {
        return;
    };
    if audit.evidence.starts_with("complete by construction") && below.found == below.pairs {
        report.notes.push(format!(
            "pairs between the floor {:.1} and the threshold {threshold:.1}: complete by construction, as the hits \
             (the audit found {} of {} sampled ones)",
            audit.floor, below.found, below.pairs
        ));
        return;
    }
    let mut flagged = 0;
    for p in report.det.iter_mut().filter(|p| p.threshold < threshold) {
        p.incomplete = true;
        flagged += 1;
    }
    for f in report
        .fnir_at_fpir
        .iter_mut()
        .filter(|f| f.threshold.is_some_and(|t| t < threshold))
    {
        f.incomplete = true;
        flagged += 1;
    }
    report.notes.push(format!(
        "pairs between the floor {:.1} and the threshold {threshold:.1} come from an index-mode run, held to the \
         completeness contract only at the threshold: its audit found {} of {} sampled ones (recall {:.4}, 95 % CI \
         {:.4}–{:.4}); {flagged} DET point(s) and FNIR-at-FPIR figure(s) below the threshold are marked incomplete \
         and may understate false matches (rerun with --mode exact to measure them exactly)",
        audit.floor, below.found, below.pairs, below.recall, below.lower, below.upper
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Audit, RecallFigure};
    use crate::eval::{EvalInput, ScoredPair, evaluate};

    /// An evaluation of 40 probes: 20 mated pairs scored 20..58, non-mated tops 10..29.
    fn report() -> EvalReport {
        let subjects: Vec<String> = (0..80).map(|i| format!("s{i}")).collect();
        let mut pairs = Vec::new();
        let mut truth = Vec::new();
        for i in 0..20 {
            pairs.push(ScoredPair {
                a: format!("s{}", 2 * i),
                b: format!("s{}", 2 * i + 1),
                score: 20.0 + 2.0 * i as f64,
            });
            truth.push((format!("s{}", 2 * i), format!("s{}", 2 * i + 1)));
            pairs.push(ScoredPair {
                a: format!("s{}", 40 + i),
                b: format!("s{}", 60 + i),
                score: 10.0 + i as f64,
            });
        }
        evaluate(&EvalInput {
            subjects: &subjects,
            pairs: &pairs,
            truth: &truth,
            threshold: 40.0,
            genuine: &[],
            impostor: &[],
            predicted_fmr: &[],
            impostor_fused: &[],
        })
    }

    fn summary(evidence: &str, below: RecallFigure) -> crate::dedup::DedupSummary {
        crate::dedup::DedupSummary {
            audit: Some(Audit {
                sampled_probes: 10,
                probe_rows: 80,
                seed: 1,
                threshold: 40.0,
                floor: 10.0,
                contract: RecallFigure::new(5, 5),
                below_threshold: Some(below),
                boundary: Vec::new(),
                boundary_pooled: RecallFigure::new(50, 50),
                synthetic: Vec::new(),
                lower_bound: 0.9993,
                evidence: evidence.into(),
                min_recall: 0.999,
                passed: true,
                missed: Vec::new(),
                seconds: 0.0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn figures_below_an_index_runs_threshold_are_flagged_unless_complete_by_construction() {
        let mut r = report();
        assert!(r.det.iter().any(|p| p.threshold < 40.0));
        mark_incomplete(
            &mut r,
            &summary("boundary pairs: …", RecallFigure::new(30, 31)),
            40.0,
        );
        assert!(r.det.iter().all(|p| p.incomplete == (p.threshold < 40.0)));
        assert!(r.run_audit.is_some());
        let note = r.notes.last().unwrap();
        assert!(
            note.contains("30 of 31") && note.contains("marked incomplete"),
            "{note}"
        );

        let mut r = report();
        mark_incomplete(
            &mut r,
            &summary("complete by construction: exact", RecallFigure::new(31, 31)),
            40.0,
        );
        assert!(r.det.iter().all(|p| !p.incomplete));
        assert!(r.notes.last().unwrap().contains("complete by construction"));

        // Exact mode (no audit): nothing to flag, no note.
        let mut r = report();
        let n = r.notes.len();
        mark_incomplete(&mut r, &crate::dedup::DedupSummary::default(), 40.0);
        assert!(r.det.iter().all(|p| !p.incomplete) && r.notes.len() == n);
    }

    #[test]
    fn spread_notes_name_ratios_beyond_the_tolerance_and_say_whether_chance_explains_them() {
        use crate::tail::TailCheckRow;
        let row = |level: f64, events: u64, ratio: f64, ci: (f64, f64)| TailCheckRow {
            level,
            cosine: 0.5,
            events,
            pairs: 1_000_000_000,
            measured: Some(ratio * level),
            ratio: Some(ratio),
            ci: Some((ci.0 * level, ci.1 * level)),
            design_effect: Some(4.0),
            ratio_ci: Some(ci),
        };
        let check = ModalityTailCheck {
            modality: "face".into(),
            pairs: 1_000_000_000,
            excluded_genuine: 0,
            model: vec![
                row(1e-5, 10_000, 1.2, (1.1, 1.3)), // within 1.5×: no note
                row(1e-6, 1_000, 1.7, (0.9, 3.1)),  // beyond, but chance allows it
                row(1e-7, 100, 0.5, (0.3, 0.8)),    // beyond, outside the interval
                row(1e-8, 10, 3.0, (0.5, 9.0)),     // too few events to hold the model to 1.5×
            ],
            gaussian: Vec::new(),
            pool_seed: 0,
            pool_cap: 0,
            pool_kind: crate::engine::TailPool::Uniform,
            bands: Vec::new(),
            sampled_below: None,
        };
        let mut notes = Vec::new();
        spread_notes(&check, &mut notes);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[0].contains("1e-6") && notes[0].contains("1.70"),
            "{}",
            notes[0]
        );
        assert!(notes[0].contains("design effect 4.0") && notes[0].contains("worth 250"));
        assert!(notes[0].contains("by chance"), "{}", notes[0]);
        assert!(
            notes[1].contains("1e-7") && notes[1].contains("under 5 %"),
            "{}",
            notes[1]
        );
    }
}
