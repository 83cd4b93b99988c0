//! `pacha demo`: the whole pipeline on a generated population, as an analyst would run it step by step.

use crate::commands::{
    self, build_index, evaluate, generate_into, ingest_files, population_config, run_dedup,
};
use crate::ui::Ui;
use crate::{DemoArgs, Failure};
use anyhow::Context;
use pacha_datasets::Modality;
use pacha_engine::dedup::DedupOptions;
use pacha_engine::engine::CalibrateOptions;
use pacha_engine::{Engine, runio};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Runs the demo.
pub fn run(a: &DemoArgs, ui: Ui) -> Result<(), Failure> {
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            let d = tempfile::Builder::new()
                .prefix("pacha-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            d.keep()
        }
    };
    pacha_engine::fsutil::create_private_dir_all(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let (pop, store, run_dir) = (dir.join("population"), dir.join("store"), dir.join("dedup"));
    if store.exists() {
        return Err(anyhow::anyhow!(
            "{} already holds a store: give a fresh --dir",
            store.display()
        )
        .into());
    }
    ui.info(format!(
        "pacha demo: {} enrolments in {}",
        a.records,
        dir.display()
    ));
    let mut stages: Vec<(String, f64)> = Vec::new();
    let total = Instant::now();

    let t = Instant::now();
    let cfg = population_config(
        a.records,
        a.seed,
        a.preset,
        None,
        vec![(2, 256), (7, 256)],
        0.01,
    );
    let generated = generate_into(&cfg, &pop, ui)?;
    stages.push(("generate".into(), t.elapsed().as_secs_f64()));
    ui.info(format!(
        "  generated   {:>8.1} s  ({} planted duplicate pairs)",
        stages[0].1, generated.manifest.truth_pairs
    ));

    let t = Instant::now();
    let files: Vec<(Modality, PathBuf)> = cfg
        .modalities()
        .into_iter()
        .map(|(m, _)| (m, pop.join(format!("{}.npy", m.key()))))
        .collect();
    let ing = ingest_files(&store, &files, &pop.join("subjects.csv"), 10_000, ui)?;
    stages.push(("ingest".into(), t.elapsed().as_secs_f64()));
    ui.info(format!(
        "  ingested    {:>8.1} s  ({} enrolments)",
        stages[1].1, ing.inserted
    ));

    let engine = Engine::open(&store).context("opening the new store")?;
    let t = Instant::now();
    build_index(&engine, ui)?;
    stages.push(("index".into(), t.elapsed().as_secs_f64()));
    ui.info(format!("  indexed     {:>8.1} s", stages[2].1));

    let t = Instant::now();
    engine
        .calibrate(&CalibrateOptions::default())
        .context("calibrating")?;
    stages.push(("calibrate".into(), t.elapsed().as_secs_f64()));
    ui.info(format!("  calibrated  {:>8.1} s", stages[3].1));
    for n in engine
        .resolution_notes(pacha_engine::fusion::DEFAULT_FPIR)
        .1
    {
        ui.info(format!("    note: {n}"));
    }

    let t = Instant::now();
    // Report pairs 10 points (a factor 10 in FMR) below the threshold too, so the evaluation can draw the DET
    // curve around the operating point.
    let threshold = pacha_engine::fusion::threshold_for_fpir(
        pacha_engine::fusion::DEFAULT_FPIR,
        engine.count(),
    )?;
    let opts = DedupOptions {
        report_floor: Some(threshold - 10.0),
        ..DedupOptions::default()
    };
    let result = run_dedup(&engine, &opts, ui)?;
    runio::write_run(&run_dir, &result)?;
    stages.push(("dedup".into(), t.elapsed().as_secs_f64()));
    ui.info(format!(
        "  deduped     {:>8.1} s  ({:.0} records/s, {} candidate pairs)",
        stages[4].1, result.summary.records_per_second, result.summary.candidate_pairs
    ));
    for line in crate::commands::audit_lines(&result.summary) {
        ui.info(format!("  {line}"));
    }

    let t = Instant::now();
    let report = evaluate(
        &engine,
        &run_dir,
        &pop.join("truth.csv"),
        200_000,
        pacha_engine::evaluation::EvalCounts::default(),
    )?;
    pacha_engine::fsutil::write_private(
        &run_dir.join("eval.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    let summary_rows: Vec<(String, String)> = stages
        .iter()
        .map(|(s, secs)| (format!("{s} time"), format!("{secs:.1} s")))
        .chain([
            ("records".to_string(), a.records.to_string()),
            (
                "planted duplicate pairs".to_string(),
                generated.manifest.truth_pairs.to_string(),
            ),
            (
                "dedup throughput".to_string(),
                format!("{:.0} records/s", result.summary.records_per_second),
            ),
            (
                "candidate generation".to_string(),
                result.summary.mode.clone(),
            ),
        ])
        .collect();
    let html_path: PathBuf = dir.join("report.html");
    pacha_engine::fsutil::write_private(
        &html_path,
        crate::report::render_html("pacha demo", &summary_rows, &report).as_bytes(),
    )?;
    stages.push(("evaluate+report".into(), t.elapsed().as_secs_f64()));

    let secs = total.elapsed().as_secs_f64();
    let layout: Vec<String> = cfg
        .modalities()
        .iter()
        .map(|(m, d)| format!("{m} {d}-d"))
        .collect();
    ui.out(format!(
        "pacha demo: {} enrolments ({}: {}), {} planted duplicate pairs",
        a.records,
        cfg.preset.name(),
        layout.join(" + "),
        report.truth_pairs
    ));
    ui.out(format!(
        "  found {} of {} duplicate pairs (recall {:.4}), {} false hits (precision {:.4}) at threshold {:.1} (target FPIR 1e-3)",
        report.true_hits, report.truth_pairs, report.pair_recall, report.false_hits, report.pair_precision, report.threshold
    ));
    ui.out(format!("  {} duplicate groups", result.clusters.len()));
    commands::print_eval(&report, ui);
    let times: Vec<String> = stages.iter().map(|(s, t)| format!("{s} {t:.1}s")).collect();
    ui.out(format!("  time: {} (total {secs:.1} s)", times.join(", ")));
    ui.out(format!("  report: {}", html_path.display()));
    ui.json_out(&json!({
        "command": "demo", "dir": dir, "records": a.records, "stages": stages, "seconds": secs,
        "truth_pairs": report.truth_pairs, "true_hits": report.true_hits, "false_hits": report.false_hits,
        "pair_recall": report.pair_recall, "pair_precision": report.pair_precision, "report": html_path,
    }));
    Ok(())
}
