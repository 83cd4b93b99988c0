//! Evaluation of a dedup run against ground truth: gathers the genuine and impostor score samples from the
//! store and hands everything to [`crate::eval::evaluate`].

use crate::eval::{EvalInput, EvalReport, ScoredPair};
use crate::matcher::compare_rows;
use crate::runio::RunData;
use crate::{Engine, EngineError};
use rayon::prelude::*;
use std::collections::HashSet;

/// Calibrated-score thresholds at which the calibration check compares predicted and measured FMR.
const CHECK_THRESHOLDS: [f64; 9] = [10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0];

/// Evaluates `run` against `truth` (pairs of subject IDs), sampling `impostor_pairs` random pairs of
/// different people for the impostor histograms and the calibration check.
pub fn evaluate_run(
    engine: &Engine,
    run: &RunData,
    truth: &[(String, String)],
    impostor_pairs: usize,
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
    let predicted: Vec<(f64, f64)> = CHECK_THRESHOLDS
        .iter()
        .map(|&t| (t, crate::fusion::fmr_from_score(t)))
        .collect();

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
    Ok(crate::eval::evaluate(&input))
}
