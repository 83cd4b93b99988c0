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
    let mut report = crate::eval::evaluate(&input);
    mark_incomplete(&mut report, &run.summary, run.threshold);
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
}
