//! One function per subcommand: parse arguments into library calls, drive progress bars, print results.

use crate::ui::Ui;
use crate::{Command, Failure, ModeArg, PresetArg};
use anyhow::{Context, anyhow, bail};
use pacha_datasets::Modality;
use pacha_engine::audit::AuditOptions;
use pacha_engine::candidates::CandidateMode;
use pacha_engine::dedup::{DedupOptions, DedupScope};
use pacha_engine::engine::{CalibrateOptions, IdentifyOptions};
use pacha_engine::{Engine, runio};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Runs one subcommand.
pub fn run(cmd: Command, ui: Ui) -> Result<(), Failure> {
    match cmd {
        Command::Generate(a) => generate(&a, ui),
        Command::Ingest(a) => ingest(&a, ui),
        Command::Index(a) => index(&a, ui),
        Command::Calibrate(a) => calibrate(&a, ui),
        Command::Dedup(a) => dedup(&a, ui),
        Command::Merge(a) => merge(&a, ui),
        Command::Identify(a) => identify(&a, ui),
        Command::Verify(a) => verify(&a, ui),
        Command::Delete(a) => delete(&a, ui),
        Command::Eval(a) => eval(&a, ui),
        Command::Report(a) => report(&a, ui),
        Command::Info(a) => info(&a.store, ui),
        Command::Check(a) => check(&a.store, ui),
        Command::Demo(a) => crate::demo::run(&a, ui),
    }
}

/// Parses `POS:DIM` finger specs.
pub fn parse_finger_dims(specs: &[String]) -> anyhow::Result<Vec<(u8, usize)>> {
    if specs.is_empty() {
        return Ok(vec![(2, 256), (7, 256)]);
    }
    specs
        .iter()
        .map(|s| {
            let (p, d) = s
                .split_once(':')
                .ok_or_else(|| anyhow!("--finger {s:?}: expected POS:DIM, e.g. 2:256"))?;
            let pos: u8 = p
                .parse()
                .with_context(|| format!("--finger {s:?}: position {p:?} is not a number"))?;
            Modality::finger(pos).map_err(|e| anyhow!("--finger {s:?}: {e}"))?;
            let dim: usize = d
                .parse()
                .with_context(|| format!("--finger {s:?}: dimension {d:?} is not a number"))?;
            Ok((pos, dim))
        })
        .collect()
}

/// Parses `POS=FILE` finger file specs plus an optional face file into a modality list.
pub fn parse_template_files(
    face: Option<&Path>,
    fingers: &[String],
) -> anyhow::Result<Vec<(Modality, PathBuf)>> {
    let mut out = Vec::new();
    if let Some(f) = face {
        out.push((Modality::Face, f.to_path_buf()));
    }
    for s in fingers {
        let (p, f) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("--finger {s:?}: expected POS=FILE, e.g. 2=ri.npy"))?;
        let m: Modality = p.parse().map_err(|e| anyhow!("--finger {s:?}: {e}"))?;
        if out.iter().any(|(x, _)| *x == m) {
            bail!("--finger {s:?}: {m} given twice");
        }
        out.push((m, PathBuf::from(f)));
    }
    if out.is_empty() {
        bail!("no template files: give --face FILE and/or --finger POS=FILE");
    }
    Ok(out)
}

/// The generator configuration for the command-line options (`face_dim` `None`: the preset's default).
pub fn population_config(
    records: u64,
    seed: u64,
    preset: PresetArg,
    face_dim: Option<usize>,
    fingers: Vec<(u8, usize)>,
    duplicate_rate: f64,
) -> pacha_datasets::generate::PopulationConfig {
    let preset = preset.preset();
    pacha_datasets::generate::PopulationConfig {
        records,
        seed,
        preset,
        face_dim: face_dim.unwrap_or(preset.default_face_dim()),
        fingers,
        duplicate_rate,
        ..Default::default()
    }
}

fn generate(a: &crate::GenerateArgs, ui: Ui) -> Result<(), Failure> {
    let cfg = population_config(
        a.records,
        a.seed,
        a.preset,
        a.face_dim,
        parse_finger_dims(&a.fingers)?,
        a.duplicate_rate,
    );
    let t = Instant::now();
    let summary = generate_into(&cfg, &a.out, ui)?;
    let secs = t.elapsed().as_secs_f64();
    ui.out(format!(
        "generated {} enrolments ({} duplicate pairs) in {} in {secs:.1} s ({:.0} records/s)",
        a.records,
        summary.manifest.truth_pairs,
        a.out.display(),
        a.records as f64 / secs.max(1e-9)
    ));
    ui.json_out(&json!({"command": "generate", "out": a.out, "records": a.records, "seconds": secs, "truth_pairs": summary.manifest.truth_pairs, "persons": summary.manifest.persons, "stats": summary.manifest.stats}));
    Ok(())
}

/// Generates a population with a progress bar.
pub fn generate_into(
    cfg: &pacha_datasets::generate::PopulationConfig,
    out: &Path,
    ui: Ui,
) -> anyhow::Result<pacha_datasets::generate::PopulationSummary> {
    let pb = ui.bar(cfg.records, "generate");
    let s = pacha_datasets::generate::write_population(cfg, out, &mut |done, _total| {
        pb.set_position(done)
    })
    .with_context(|| format!("generating a population into {}", out.display()))?;
    pb.finish_and_clear();
    Ok(s)
}

fn ingest(a: &crate::IngestArgs, ui: Ui) -> Result<(), Failure> {
    let t = Instant::now();
    let report = match (&a.parquet, &a.subjects) {
        (Some(pq), _) => {
            let mut cols = pacha_datasets::parquet::ParquetColumns {
                id: a.id_column.clone(),
                ..Default::default()
            };
            for c in &a.columns {
                cols.push_override(c).map_err(|e| anyhow!(e))?;
            }
            let pb = ui.bar(0, "ingest");
            let r = pacha_engine::ingest::ingest_parquet(
                &a.store,
                pq,
                &cols,
                a.batch,
                &|stage, done, total| {
                    pb.set_prefix(stage.to_string());
                    pb.set_length(total);
                    pb.set_position(done);
                },
            )
            .with_context(|| format!("ingesting into {}", a.store.display()))?;
            pb.finish_and_clear();
            r
        }
        (None, Some(subjects)) => {
            let files = parse_template_files(a.face.as_deref(), &a.fingers)?;
            ingest_files(&a.store, &files, subjects, a.batch, ui)?
        }
        (None, None) => {
            return Err(anyhow!("give --subjects with --face/--finger, or --parquet").into());
        }
    };
    let secs = t.elapsed().as_secs_f64();
    ui.out(format!(
        "ingested {} enrolments ({} already present) into {} in {secs:.1} s ({:.0} records/s)",
        report.inserted,
        report.unchanged,
        a.store.display(),
        (report.inserted + report.unchanged) as f64 / secs.max(1e-9)
    ));
    ui.json_out(&json!({"command": "ingest", "store": a.store, "report": report, "seconds": secs}));
    Ok(())
}

/// Validates and ingests files with a progress bar.
pub fn ingest_files(
    store: &Path,
    files: &[(Modality, PathBuf)],
    subjects: &Path,
    batch: usize,
    ui: Ui,
) -> anyhow::Result<pacha_engine::ingest::IngestReport> {
    let pb = ui.bar(0, "ingest");
    let report =
        pacha_engine::ingest::ingest(store, files, subjects, batch, &|stage, done, total| {
            pb.set_prefix(stage.to_string());
            pb.set_length(total);
            pb.set_position(done);
        })
        .with_context(|| format!("ingesting into {}", store.display()))?;
    pb.finish_and_clear();
    Ok(report)
}

fn index(a: &crate::IndexArgs, ui: Ui) -> Result<(), Failure> {
    let engine = open(&a.store)?;
    let t = Instant::now();
    let mut params = pacha_engine::annset::AnnParams::default();
    params.ivf.lists = a.lists;
    if let Some(p) = a.probes {
        params.ivf.probes = p;
    }
    params.ivf.wide_share = a.wide_share;
    params.ivf.wide_probes = a.wide_probes;
    build_index_with(&engine, &params, ui)?;
    let secs = t.elapsed().as_secs_f64();
    let info = engine.info();
    ui.out(format!(
        "indexed {} rows in {secs:.1} s",
        info.indexed_rows.unwrap_or(0)
    ));
    ui.json_out(&json!({"command": "index", "seconds": secs, "indexed_rows": info.indexed_rows}));
    Ok(())
}

/// Builds the engine's index (default parameters) with a progress bar.
pub fn build_index(engine: &Engine, ui: Ui) -> anyhow::Result<()> {
    build_index_with(engine, &Default::default(), ui)
}

/// Builds the engine's index with `params` and a progress bar.
fn build_index_with(
    engine: &Engine,
    params: &pacha_engine::annset::AnnParams,
    ui: Ui,
) -> anyhow::Result<()> {
    let pb = ui.bar(engine.snapshot().rows() as u64, "index");
    engine
        .build_index(
            params,
            Some(&|done, total| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
            }),
        )
        .context("building the index")?;
    pb.finish_and_clear();
    Ok(())
}

fn open(store: &Path) -> anyhow::Result<Engine> {
    Engine::open(store).with_context(|| format!("opening store {}", store.display()))
}

/// Opens the store for a command that only reads it: no lock, runs beside a writer (see `Store::open_read_only`).
fn open_read_only(store: &Path) -> anyhow::Result<Engine> {
    Engine::open_read_only(store)
        .with_context(|| format!("opening store {} read-only", store.display()))
}

fn calibrate(a: &crate::CalibrateArgs, ui: Ui) -> Result<(), Failure> {
    let engine = open(&a.store)?;
    let truth = match &a.truth {
        Some(p) => Some(
            pacha_datasets::generate::read_truth(p)
                .with_context(|| format!("reading {}", p.display()))?,
        ),
        None => None,
    };
    let opts = CalibrateOptions {
        impostor_pairs: a.pairs,
        genuine: truth.as_deref(),
        seed: a.seed,
        tail_rows: a.tail_rows,
        tail_rows_max: a.tail_rows_max,
        quality_bands: a.quality_bands,
        tail_pool: a.tail_pool.pool(),
        ..CalibrateOptions::default()
    };
    let t = Instant::now();
    engine.calibrate(&opts)?;
    let seconds = t.elapsed().as_secs_f64();
    let cal = engine.calibration();
    ui.out(format!("calibrated in {seconds:.1} s: {}", cal.source));
    for c in &cal.tail_checks {
        ui.out(tail_check_table(c));
    }
    let (decision_fmr, resolution) = engine.resolution_notes(pacha_engine::fusion::DEFAULT_FPIR);
    for n in &resolution {
        ui.out(format!("  note: {n}"));
    }
    ui.json_out(&json!({
        "command": "calibrate", "models": cal.models, "source": cal.source,
        "tail_checks": cal.tail_checks, "quality_bands": cal.quality_bands, "seconds": seconds,
        "decision_fmr": decision_fmr, "resolution_notes": resolution,
    }));
    Ok(())
}

/// A modality's tail check as text: measured ÷ predicted FMR per level, for the model in use and for the
/// Gaussian alone, with the events behind each figure.
fn tail_check_table(c: &pacha_engine::fusion::ModalityTailCheck) -> String {
    let cell = |r: &pacha_engine::tail::TailCheckRow| match (r.ratio, r.ratio_ci) {
        (Some(q), Some((lo, hi))) => format!(
            "{q:>6.2} [{lo:.2}, {hi:.2}] {:>7} ×{:<5.1}",
            r.events,
            r.design_effect.unwrap_or(1.0)
        ),
        _ => format!("{:>35}", "not counted"),
    };
    let pool = match c.pool_kind {
        pacha_engine::engine::TailPool::Uniform => "",
        pacha_engine::engine::TailPool::Hubs => " hub-stratified, shares weighted",
    };
    let mut out = format!(
        "  {} impostor tail vs {} counted pairs (a pool of up to {} rows{pool}; {} labelled genuine left out): measured/predicted FMR [95 % CI] events ×design effect\n  {:>8}  {:>35}  {:>35}",
        c.modality,
        c.pairs,
        c.pool_cap,
        c.excluded_genuine,
        "FMR",
        "model in use",
        "gaussian alone"
    );
    if let Some(below) = c.sampled_below {
        out.push_str(&format!(
            "\n  (every pair at or above cosine {below:.4} kept; below it a hashed sample, weighted back, to bound memory)"
        ));
    }
    for (m, g) in c.model.iter().zip(&c.gaussian) {
        out.push_str(&format!("\n  {:>8.0e}  {}  {}", m.level, cell(m), cell(g)));
    }
    for b in &c.bands {
        out.push_str(&format!(
            "\n  {} pairs of quality [{:.3}, {:.3}): {} counted\n  {:>8}  {:>35}  {:>35}",
            c.modality, b.lo, b.hi, b.pairs, "FMR", "band model", "pooled model"
        ));
        for (m, p) in b.model.iter().zip(&b.pooled) {
            out.push_str(&format!("\n  {:>8.0e}  {}  {}", m.level, cell(m), cell(p)));
        }
    }
    out
}

fn mode_of(m: ModeArg) -> CandidateMode {
    match m {
        ModeArg::Auto => CandidateMode::Auto,
        ModeArg::Exact => CandidateMode::Exact,
        ModeArg::Index => CandidateMode::Index,
    }
}

fn dedup(a: &crate::DedupArgs, ui: Ui) -> Result<(), Failure> {
    let started = pacha_engine::tiles::unix_now();
    if a.block_rows.is_some() && matches!(a.mode, ModeArg::Index) {
        return Err(anyhow!(
            "--block-rows applies to exact mode only: index runs size their blocks themselves (drop the flag or use --mode exact)"
        )
        .into());
    }
    let engine = open_read_only(&a.store)?;
    // A tile checkpoints into its own directory by default, so a requeued task resumes where it stopped.
    let checkpoint = match (&a.checkpoint, a.tile) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(_)) => Some(a.out.join("checkpoint")),
        (None, None) => None,
    };
    let opts = DedupOptions {
        target_fpir: a.target_fpir,
        scope: a
            .from_row
            .map_or(DedupScope::WholeStore, DedupScope::RowsFrom),
        mode: mode_of(a.mode),
        block_rows: a.block_rows.unwrap_or(DedupOptions::default().block_rows),
        report_floor: a.floor,
        checkpoint_dir: checkpoint.clone(),
        sketch: if a.no_sketch {
            None
        } else {
            DedupOptions::default().sketch
        },
        genuine_miss: a.genuine_miss,
        audit: AuditOptions {
            probes: a.audit_probes,
            seed: a.audit_seed,
            min_recall: a.min_recall,
        },
        force_path: a.force_path.clone(),
        tile: a.tile,
        recompute_sketches: a.recompute_sketches,
    };
    if !(0.0..=1.0).contains(&a.min_recall) {
        return Err(anyhow!("--min-recall {} is not in [0, 1]", a.min_recall).into());
    }
    if let Some(tile) = a.tile {
        let part = with_dedup_bar(ui, "dedup tile", |progress| {
            engine.dedup_part(&opts, Some(progress), None)
        })?;
        let m = pacha_engine::tiles::write_tile(&a.out, &part, started)
            .with_context(|| format!("writing tile {tile} to {}", a.out.display()))?;
        if a.checkpoint.is_none()
            && let Some(c) = &checkpoint
        {
            std::fs::remove_dir_all(c).with_context(|| {
                format!("removing the finished tile's checkpoint {}", c.display())
            })?;
        }
        ui.out(format!(
            "tile {tile}: probe rows {}..{}, {} pairs at or above the floor, {} candidate pairs, {:.1} s; tile directory {} (merge the {} tiles with `pacha merge`)",
            part.probe_rows.0,
            part.probe_rows.1,
            part.pair_count,
            part.candidate_pairs,
            part.timings.total_seconds,
            a.out.display(),
            tile.count
        ));
        ui.json_out(
            &json!({"command": "dedup", "tile": tile.to_string(), "out": a.out, "manifest": m,
            "probe_rows": part.probe_rows, "pairs": part.pair_count, "timings": part.timings}),
        );
        return Ok(());
    }
    let result = run_dedup(&engine, &opts, ui)?;
    pacha_engine::tiles::write_whole_run_as(
        &a.out,
        &result,
        pacha_engine::dedup::RunParameters::of(&opts),
        started,
        &[],
        a.format.format(),
    )
    .with_context(|| format!("writing results to {}", a.out.display()))?;
    report_run(&result.summary, &a.out, ui, "dedup")
}

fn merge(a: &crate::MergeArgs, ui: Ui) -> Result<(), Failure> {
    let started = pacha_engine::tiles::unix_now();
    let merged = pacha_engine::tiles::merge_tiles(&a.tiles).context("merging tiles")?;
    let mut result = merged.result;
    if let (Some(min), Some(audit)) = (a.min_recall, result.summary.audit.as_mut()) {
        if !(0.0..=1.0).contains(&min) {
            return Err(anyhow!("--min-recall {min} is not in [0, 1]").into());
        }
        audit.min_recall = min;
        audit.passed = audit.lower_bound >= min;
    }
    let params = merged
        .tiles
        .first()
        .map(|m| m.parameters.clone())
        .context("no tiles")?;
    pacha_engine::tiles::write_whole_run_as(
        &a.out,
        &result,
        params,
        started,
        &merged.tiles,
        a.format.format(),
    )
    .with_context(|| format!("writing the merged run to {}", a.out.display()))?;
    ui.out(format!(
        "merged {} tiles ({} pairs) from {}",
        merged.tiles.len(),
        result.pairs.len(),
        merged
            .dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report_run(&result.summary, &a.out, ui, "merge")
}

/// Prints a whole run's summary and audit; exit code 3 when the audit did not prove its recall.
fn report_run(
    s: &pacha_engine::dedup::DedupSummary,
    out: &std::path::Path,
    ui: Ui,
    command: &str,
) -> Result<(), Failure> {
    ui.out(format!(
        "{} records, {} hits in {} duplicate groups (threshold {:.1}), {} candidate pairs, {:.1} s ({:.0} records/s); results in {}",
        s.records,
        s.hits,
        s.clusters,
        s.threshold,
        s.candidate_pairs,
        s.total_seconds,
        s.records_per_second,
        out.display()
    ));
    if s.calibration_source
        .starts_with("fitted from the store at match time")
    {
        ui.out(format!("calibration: {}", s.calibration_source));
    }
    for line in audit_lines(s) {
        ui.out(line);
    }
    ui.json_out(&json!({"command": command, "out": out, "summary": s}));
    match &s.audit {
        Some(audit) if !audit.passed => Err(Failure {
            code: 3,
            error: anyhow!(
                "completeness not proven: recall lower bound {:.5} < --min-recall {} ({}); results were written to {}",
                audit.lower_bound,
                audit.min_recall,
                audit.evidence,
                out.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// The audit's summary lines for a terminal (empty without an audit).
pub fn audit_lines(s: &pacha_engine::dedup::DedupSummary) -> Vec<String> {
    let Some(a) = &s.audit else {
        return vec![format!(
            "completeness: {} mode (exact search, complete by construction)",
            s.mode
        )];
    };
    let mut out = vec![format!(
        "completeness audit ({} of {} probe rows searched exactly, {:.1} s): recall {}/{} = {:.5} (95 % CI {:.5}–{:.5}) of the pairs at or above the threshold",
        a.sampled_probes,
        a.probe_rows,
        a.seconds,
        a.contract.found,
        a.contract.pairs,
        a.contract.recall,
        a.contract.lower,
        a.contract.upper
    )];
    if let Some(b) = &a.below_threshold {
        out.push(format!(
            "  pairs between the floor {:.1} and the threshold (not held to the contract): {}/{} = {:.5}",
            a.floor, b.found, b.pairs, b.recall
        ));
    }
    out.push(format!(
        "  boundary pairs (at the candidate cosines): {}/{} = {:.5} (95 % CI {:.5}–{:.5})",
        a.boundary_pooled.found,
        a.boundary_pooled.pairs,
        a.boundary_pooled.recall,
        a.boundary_pooled.lower,
        a.boundary_pooled.upper
    ));
    for (m, f) in &a.synthetic {
        out.push(format!(
            "  {m}: synthetic boundary pairs reached by the probe rule: {}/{} = {:.5}",
            f.found, f.pairs, f.recall
        ));
    }
    out.push(format!(
        "  verdict: {} — lower bound {:.5} vs --min-recall {} ({})",
        if a.passed { "PROVEN" } else { "NOT PROVEN" },
        a.lower_bound,
        a.min_recall,
        a.evidence
    ));
    for p in s.plans.iter() {
        // A band join names each quality band's cosine (the plan's is the lowest band's).
        let bands = s
            .band_cosines
            .iter()
            .find(|(m, _)| *m == p.modality)
            .map(|(_, c)| {
                let c: Vec<String> = c.iter().map(|c| format!("{c:.4}")).collect();
                format!(" (per quality band of the pair: {})", c.join(" / "))
            })
            .unwrap_or_default();
        out.push(format!(
            "  {}: {} path{} at cosine {:.4}{bands} (pilot: {} rows, {} natural + {} synthetic pairs)",
            p.modality,
            p.path,
            p.rule
                .map(|r| format!(
                    " (≥ {} lists, + those within {:.3} of the best, mean {:.1})",
                    r.min, r.margin, p.mean_probes
                ))
                .unwrap_or_default(),
            p.cosine,
            p.pilot_rows,
            p.natural_pairs,
            p.synthetic_pairs
        ));
    }
    if let Some(j) = &s.joint {
        let kept = s
            .join_stats
            .iter()
            .find(|(k, _)| *k == j.key)
            .map(|(_, st)| st.above)
            .unwrap_or_default();
        out.push(format!(
            "  {}: every pair scanned through the members' i8 codes together, kept where its summed evidence can reach the floor: {kept} pairs kept and scored exactly",
            j.key
        ));
    }
    out
}

/// Runs a dedup with a progress bar.
pub fn run_dedup(
    engine: &Engine,
    opts: &DedupOptions,
    ui: Ui,
) -> anyhow::Result<pacha_engine::dedup::DedupResult> {
    with_dedup_bar(ui, "dedup", |progress| {
        engine.dedup(opts, Some(progress), None)
    })
}

/// Runs a dedup (`run` gets the progress callback) behind a progress bar labelled `label`.
fn with_dedup_bar<T>(
    ui: Ui,
    label: &str,
    run: impl FnOnce(
        &(dyn Fn(pacha_engine::dedup::DedupProgress) + Sync),
    ) -> Result<T, pacha_engine::EngineError>,
) -> anyhow::Result<T> {
    let pb = ui.bar(0, label);
    let r = run(&|p: pacha_engine::dedup::DedupProgress| {
        pb.set_length(p.total as u64);
        pb.set_position(p.done as u64);
    })
    .context("deduplicating")?;
    pb.finish_and_clear();
    Ok(r)
}

fn identify(a: &crate::IdentifyArgs, ui: Ui) -> Result<(), Failure> {
    let engine = open_read_only(&a.store)?;
    let files = parse_template_files(a.face.as_deref(), &a.fingers)?;
    let probes = match &a.subjects {
        Some(subj) => pacha_engine::ingest::read_probes_with_subjects(subj, &files, &a.rows),
        None => pacha_engine::ingest::read_probes(&files, &a.rows),
    }
    .context("reading probes")?;
    let gallery = (!a.gallery.is_empty()).then_some(a.gallery.as_slice());
    let opts = IdentifyOptions {
        max_results: a.max_results,
        target_fpir: a.target_fpir,
        gallery,
        min_score: a.min_score,
        batch_scan: match a.batch_scan {
            crate::BatchScanArg::Auto => pacha_engine::identify::BatchScan::Auto,
            crate::BatchScanArg::Joint => pacha_engine::identify::BatchScan::Joint,
            crate::BatchScanArg::PerProbe => pacha_engine::identify::BatchScan::PerProbe,
        },
    };
    if !(0.0..=1.0).contains(&a.min_recall) {
        return Err(anyhow!("--min-recall {} is not in [0, 1]", a.min_recall).into());
    }
    let (rows, templates): (Vec<u64>, Vec<Vec<pacha_engine::store::Template>>) =
        probes.into_iter().unzip();
    let batch = engine
        .identify_batch(
            &templates,
            &opts,
            &AuditOptions {
                probes: a.audit_probes,
                seed: a.audit_seed,
                min_recall: a.min_recall,
            },
        )
        .context("identifying (probe N counts the probes from 0, in file or --rows order)")?;
    let mut all = Vec::new();
    for (row, r) in rows.iter().zip(&batch.results) {
        ui.out(format!(
            "probe {row}: {} candidate(s) at threshold {:.1}",
            r.candidates.len(),
            r.threshold
        ));
        for c in &r.candidates {
            ui.out(format!(
                "  {:<20} score {:6.1}  {}",
                c.subject_id,
                c.comparison.fused.score,
                cosines(&c.comparison)
            ));
        }
        all.push(json!({"probe_row": row, "result": r}));
    }
    let l = &batch.latency;
    for j in &l.joint_scans {
        ui.out(format!(
            "joint scan {}: {} probes x every enrolment in {:.2} s ({:.2} ms per probe; predicted {:.2} ms{}), {} of {} pairs kept",
            j.key,
            j.probes,
            j.seconds,
            j.seconds * 1e3 / j.probes.max(1) as f64,
            j.predicted_ms_per_probe,
            j.predicted_ms_one_by_one
                .map_or(", asked for".to_string(), |o| format!(" vs {o:.2} ms one by one")),
            j.kept,
            j.pairs
        ));
    }
    let joint: usize = l.joint_scans.iter().map(|j| j.probes).sum();
    ui.out(format!(
        "latency per probe ({} probes: {} one at a time, {joint} by joint scans, charged their share): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; first {:.2} ms",
        l.probes, l.probes - joint, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.first_ms
    ));
    if let Some(au) = &batch.audit {
        ui.out(format!(
            "completeness audit ({} of {} probes searched exactly, {:.1} s): {}/{} candidates at or above the threshold found; boundary {}/{}; verdict: {} — lower bound {:.5} vs --min-recall {} ({})",
            au.sampled_probes,
            au.probes,
            au.seconds,
            au.contract.found,
            au.contract.pairs,
            au.boundary_pooled.found,
            au.boundary_pooled.pairs,
            if au.passed { "PROVEN" } else { "NOT PROVEN" },
            au.lower_bound,
            au.min_recall,
            au.evidence
        ));
    }
    ui.json_out(&json!({"command": "identify", "probes": all, "audit": batch.audit, "latency": batch.latency}));
    match &batch.audit {
        Some(au) if !au.passed => Err(Failure {
            code: 3,
            error: anyhow!(
                "completeness not proven: recall lower bound {:.5} < --min-recall {} ({})",
                au.lower_bound,
                au.min_recall,
                au.evidence
            ),
        }),
        _ => Ok(()),
    }
}

/// Per-modality cosines of a comparison, e.g. `face=0.712 finger2=0.455`.
fn cosines(c: &pacha_engine::matcher::Comparison) -> String {
    let parts: Vec<String> = c
        .modalities
        .iter()
        .map(|m| format!("{}={:.3}", m.modality, m.cosine))
        .collect();
    parts.join(" ")
}

fn verify(a: &crate::VerifyArgs, ui: Ui) -> Result<(), Failure> {
    let engine = open_read_only(&a.store)?;
    let r = engine.verify(&a.a, &a.b, Some(a.threshold))?;
    ui.out(format!(
        "{} vs {}: score {:.1} ({}) -> {}",
        a.a,
        a.b,
        r.comparison.fused.score,
        cosines(&r.comparison),
        if r.is_match { "MATCH" } else { "no match" }
    ));
    ui.json_out(&json!({"command": "verify", "a": a.a, "b": a.b, "result": r}));
    Ok(())
}

fn delete(a: &crate::DeleteArgs, ui: Ui) -> Result<(), Failure> {
    let engine = open(&a.store)?;
    let ids: Vec<&str> = a.ids.iter().map(String::as_str).collect();
    // One commit for all IDs: an ID that is not enrolled refuses the whole command (exit 2), nothing deleted.
    let rows = engine
        .store()
        .delete_all(&ids)
        .with_context(|| format!("deleting from {} (nothing was deleted)", a.store.display()))?;
    let mut deleted: Vec<&str> = Vec::with_capacity(rows.len());
    for id in &ids {
        if !deleted.contains(id) {
            deleted.push(id);
        }
    }
    ui.out(format!("deleted {} enrolments", deleted.len()));
    ui.json_out(&json!({"command": "delete", "deleted": deleted}));
    Ok(())
}

fn eval(a: &crate::EvalArgs, ui: Ui) -> Result<(), Failure> {
    let engine = open_read_only(&a.store)?;
    let counts = pacha_engine::evaluation::EvalCounts {
        tail_rows: a.tail_rows,
        fused_rows: a.fused_rows,
    };
    let report = evaluate(&engine, &a.run, &a.truth, a.impostor_pairs, counts)?;
    let out = a.out.clone().unwrap_or_else(|| a.run.join("eval.json"));
    let bytes = serde_json::to_vec_pretty(&report)?;
    pacha_engine::fsutil::write_private(&out, &bytes)
        .with_context(|| format!("writing {}", out.display()))?;
    print_eval(&report, ui);
    ui.json_out(&json!({"command": "eval", "out": out, "eval": report}));
    Ok(())
}

/// Evaluates a dedup run directory against a truth file.
pub fn evaluate(
    engine: &Engine,
    run: &Path,
    truth: &Path,
    impostor_pairs: usize,
    counts: pacha_engine::evaluation::EvalCounts,
) -> anyhow::Result<pacha_engine::eval::EvalReport> {
    let truth = pacha_datasets::generate::read_truth(truth)
        .with_context(|| format!("reading {}", truth.display()))?;
    let run =
        runio::read_run(run).with_context(|| format!("reading dedup run {}", run.display()))?;
    Ok(pacha_engine::evaluation::evaluate_run(
        engine,
        &run,
        &truth,
        impostor_pairs,
        counts,
    )?)
}

/// Prints the headline figures of an evaluation.
pub fn print_eval(r: &pacha_engine::eval::EvalReport, ui: Ui) {
    ui.out(format!(
        "pairs: recall {:.4} ({} of {} duplicate pairs found), precision {:.4} ({} false hits) at threshold {:.1}",
        r.pair_recall,
        r.true_hits,
        r.truth_pairs,
        r.pair_precision,
        r.false_hits,
        r.threshold
    ));
    for f in &r.fnir_at_fpir {
        ui.out(format!("  {f}"));
    }
    for c in &r.tail_checks {
        ui.out(tail_check_table(c));
    }
    if let Some(f) = &r.fused_count {
        let cells: Vec<String> = f
            .points
            .iter()
            .map(|p| match p.measured_fmr {
                Some(m) => format!(
                    "{:.0}: {:.2} ({}{})",
                    p.threshold,
                    m / p.predicted_fmr,
                    p.false_matches,
                    match p.design_effect {
                        Some(d) if d >= 1.05 => format!(", ×{d:.1}"),
                        _ => String::new(),
                    }
                ),
                // Under one predicted event: the count cannot resolve the prediction (0 events agree with it).
                None if p.predicted_fmr * p.impostor_samples as f64 >= 1.0 => {
                    format!("{:.0}: not counted", p.threshold)
                }
                None => format!(
                    "{:.0}: unresolved ({} events, {:.1e} predicted)",
                    p.threshold,
                    p.false_matches,
                    p.predicted_fmr * p.impostor_samples as f64
                ),
            })
            .collect();
        ui.out(format!(
            "  fused score, measured/predicted FMR (events, ×design effect) over every pair of pools of up to {} rows ({} pairs): {}",
            f.pool_rows,
            f.pairs,
            cells.join(", ")
        ));
    }
    if let Some(d) = r.dependence.first() {
        let cells: Vec<String> = r
            .dependence
            .iter()
            .map(|d| match d.ratio {
                Some(q) => format!(
                    "{} at {:.0e}: {q:.2} ({} vs {:.0})",
                    d.modalities.join("+"),
                    d.level,
                    d.joint,
                    d.expected
                ),
                None => format!(
                    "{} at {:.0e}: under one expected",
                    d.modalities.join("+"),
                    d.level
                ),
            })
            .collect();
        ui.out(format!(
            "  modalities exceeding their impostor tails together ÷ independence (pairs together vs expected, {} \
             pairs): {}",
            d.pairs,
            cells.join(", ")
        ));
    }
}

fn report(a: &crate::ReportArgs, ui: Ui) -> Result<(), Failure> {
    let bytes = std::fs::read(&a.eval).with_context(|| format!("reading {}", a.eval.display()))?;
    let report: pacha_engine::eval::EvalReport =
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not an evaluation written by `pacha eval`",
                a.eval.display()
            )
        })?;
    let html = crate::report::render_html("pacha evaluation", &[], &report);
    pacha_engine::fsutil::write_private(&a.out, html.as_bytes())
        .with_context(|| format!("writing {}", a.out.display()))?;
    ui.out(format!("wrote {}", a.out.display()));
    ui.json_out(&json!({"command": "report", "out": a.out}));
    Ok(())
}

fn info(store: &Path, ui: Ui) -> Result<(), Failure> {
    let engine = open_read_only(store)?;
    let info = engine.info();
    let size: u64 = walk_size(store);
    ui.out(format!("store       {}", info.dir.display()));
    for s in &info.schema.modalities {
        ui.out(format!(
            "modality    {:<10} dim {}",
            s.modality.to_string(),
            s.dim
        ));
    }
    ui.out(format!(
        "enrolments  {} live, {} rows (generation {})",
        info.live, info.rows, info.generation
    ));
    ui.out(format!("size        {:.1} MB", size as f64 / 1e6));
    ui.out(format!("index       {}", info.index_state));
    ui.out(format!("calibration {}", info.calibration_state));
    ui.out(format!("            models: {}", info.calibration));
    ui.out(format!("simd        {}", info.simd));
    ui.out(format!("i8 kernel   {}", info.i8_kernel));
    ui.json_out(&json!({"command": "info", "info": info, "bytes": size}));
    Ok(())
}

fn walk_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `check`: the store files, then every file under `engine/` (index and calibration checksums and
/// identities, listed files missing, stray files). Exit 1 on any problem; an unindexed or uncalibrated store is
/// reported (warnings, `index` / `calibration` states) but is not a problem.
fn check(store: &Path, ui: Ui) -> Result<(), Failure> {
    let report = pacha_engine::check_store_dir(store)
        .with_context(|| format!("checking {}", store.display()))?;
    let problems: Vec<String> = report.problems().iter().map(ToString::to_string).collect();
    let warnings: Vec<String> = report
        .store
        .warnings
        .iter()
        .chain(&report.derived.warnings)
        .map(ToString::to_string)
        .collect();
    ui.json_out(&json!({
        "command": "check", "ok": problems.is_empty(), "rows": report.store.rows, "live": report.store.live,
        "generation": report.store.generation,
        "files_checked": report.store.files_checked + report.derived.files_checked,
        "index": report.derived.index, "calibration": report.derived.calibration,
        "problems": problems, "warnings": warnings,
    }));
    ui.out(format!("index       {}", report.derived.index));
    ui.out(format!("calibration {}", report.derived.calibration));
    if problems.is_empty() {
        ui.out(format!("{}: ok", store.display()));
        Ok(())
    } else {
        for p in &problems {
            ui.out(format!("problem: {p}"));
        }
        Err(Failure {
            code: 1,
            error: anyhow!("{} problem(s) found in {}", problems.len(), store.display()),
        })
    }
}
