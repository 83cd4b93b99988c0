//! Scale bench: generate (or reuse) a population, ingest it, build the index, calibrate, run the whole-store
//! dedup, and measure it against ground truth and against exact search. Prints one JSON line on stdout
//! (progress goes to stderr).
//!
//! ```text
//! cargo run --release -p pacha-bench --bin scale -- --records 100000 --preset isotropic
//! cargo run --release -p pacha-bench --bin scale -- --records 1000000 --preset lookalike-families --direct
//! cargo run --release -p pacha-bench --bin scale -- --records 1000000 --fingers 2:256,7:256
//! cargo run --release -p pacha-bench --bin scale -- --face-npy face.npy --subjects subjects.csv --truth truth.csv
//! ```
//!
//! Recall figures:
//! - `planted_recall`: planted duplicate pairs reported as hits / all planted pairs.
//! - `planted_recall_vs_exact`: planted pairs reported / planted pairs whose exact fused score reaches the
//!   threshold (the pairs an exhaustive search would report). This is the bar's metric; it needs no exact
//!   search, because exact search reports a pair iff its exact score reaches the threshold.
//! - `sample_recall_vs_exact`: on the last `--exact-sample` rows as probes, hits (planted or not) of the run /
//!   hits of an exact blocked-GEMM dedup of those rows against the whole store.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use pacha_datasets::Modality;
use pacha_datasets::generate::{Generator, PopulationConfig, Preset, read_truth, write_population};
use pacha_engine::Engine;
use pacha_engine::candidates::CandidateMode;
use pacha_engine::dedup::{DedupOptions, DedupScope};
use pacha_engine::engine::CalibrateOptions;
use pacha_engine::matcher::{compare_rows, fused_rows};
use pacha_engine::store::{Schema, Template};
use pacha_index::rng::SplitMix;
use pacha_index::sketch::CutPolicy;
use serde_json::json;
use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// `--preset` values: the generator's presets by their kebab-case names.
/// `--preset`: a generator preset by its name ([`Preset::name`]), parsed by [`Preset`]'s own `FromStr`.
fn preset_parser() -> impl clap::builder::TypedValueParser<Value = Preset> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Preset::ALL.map(Preset::name))
        .try_map(|s| s.parse::<Preset>())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Auto,
    Exact,
    Index,
}

/// `--visits` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Visits {
    OneWay,
    TwoWay,
}

/// Scale bench of the whole dedup pipeline.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Enrolments to generate.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Population model of the generator (`structured`, `isotropic`, or a test population:
    /// `isotropic-mates`, `lookalike-families`, `heavy-tail`, `power-law`, `skewed-clusters`, `fingers-only`).
    #[arg(long, default_value = "structured", value_parser = preset_parser())]
    preset: Preset,
    /// Face dimension (0 = no face; default 512, or 0 for `fingers-only`).
    #[arg(long)]
    face_dim: Option<usize>,
    /// Fingers `POS:DIM,...` (e.g. `2:256,7:256`), or `none` (`fingers-only` then uses `2:256,7:256`).
    #[arg(long, default_value = "none")]
    fingers: String,
    /// Generator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of enrolments that re-enrol an earlier person.
    #[arg(long, default_value_t = 0.01)]
    duplicate_rate: f64,
    /// Work directory (population files, store, run). Default: a temporary directory, removed at the end.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Reuse the population and store already in `--dir` (skip generate and ingest).
    #[arg(long)]
    reuse: bool,
    /// Face templates from an existing `.npy` file (with `--subjects`) instead of generating.
    #[arg(long)]
    face_npy: Option<PathBuf>,
    /// Subjects CSV of `--face-npy` (column `subject_id`, row order of the file).
    #[arg(long)]
    subjects: Option<PathBuf>,
    /// Ground-truth pairs CSV (`subject_a,subject_b`) of `--face-npy`; without it no planted recall.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Candidate generation of the dedup.
    #[arg(long, value_enum, default_value = "auto")]
    mode: ModeArg,
    /// Target FPIR of the dedup.
    #[arg(long, default_value_t = 1e-3)]
    target_fpir: f64,
    /// Probe rows (the last ones) compared with an exact dedup; 0 skips the exact comparison.
    #[arg(long, default_value_t = 2000)]
    exact_sample: usize,
    /// Probe rows of the run's own completeness audit (recall vs exact on all pairs, with its interval).
    #[arg(long, default_value_t = pacha_engine::audit::DEFAULT_AUDIT_PROBES)]
    audit_probes: usize,
    /// Impostor-budget sketch cuts (the pre-contract policy: `--genuine-drop*` bound the drops) instead of
    /// the complete cuts.
    #[arg(long)]
    budget_cuts: bool,
    /// IVF lists (default: automatic, 2·√N).
    #[arg(long)]
    lists: Option<usize>,
    /// Index mode: force every candidate modality onto one path (`ivf`, `brute`, `exact` = f32 GEMM,
    /// `exact-i8`) instead of the plan.
    #[arg(long)]
    force_path: Option<String>,
    /// IVF lists every row probes in the join (default: the engine's).
    #[arg(long)]
    probes: Option<usize>,
    /// IVF: most home lists per row (default: the engine's).
    #[arg(long)]
    assign: Option<usize>,
    /// IVF: a list of rank < `--assign` is a home if its centroid similarity is within this of the best.
    #[arg(long)]
    margin: Option<f32>,
    /// IVF: share of rows (worst served by the partition) that probe `--wide-probes` lists.
    #[arg(long)]
    wide_share: Option<f64>,
    /// IVF: probe lists of the wide rows.
    #[arg(long)]
    wide_probes: Option<usize>,
    /// IVF visits: "one-way" (a row visits only probe lists with an id ≥ its home's) or "two-way"
    /// (default: the engine's).
    #[arg(long)]
    visits: Option<Visits>,
    /// Predict recall only: the dedup runs on the last row alone (for its threshold and candidate cosines) and
    /// the JSON reports `planted.recall_by_probes` from the index; found/recall figures are then meaningless.
    #[arg(long)]
    recall_only: bool,
    /// IVF: partition the rows centred on their mean (see `IvfParams::centre`)
    #[arg(long)]
    centre: bool,
    /// IVF lists are trained on this many sampled rows (default: the engine's)
    #[arg(long)]
    train_sample: Option<usize>,
    /// Use the index saved in the store if it covers it (no build: the matching time then excludes the
    /// index build; for recall analyses of a large store)
    #[arg(long)]
    reuse_index: bool,
    /// Score every IVF product with f32 GEMM instead of the sign-sketch pre-filter.
    #[arg(long)]
    no_sketch: bool,
    /// Share of genuine pairs the relaxed multi-modal candidate cosines may leave to chance (0: complete).
    #[arg(long, default_value_t = DedupOptions::default().genuine_miss)]
    genuine_miss: f64,
    /// Share of genuine pairs above the candidate cosine the sketch cut may drop (per modality; with
    /// several candidate modalities, `--genuine-drop-multimodal`).
    #[arg(long, default_value_t = CutPolicy::default().genuine_drop)]
    genuine_drop: f64,
    /// Per-modality sketch genuine-drop allowance when several modalities generate candidates.
    #[arg(long, default_value_t = CutPolicy::default().genuine_drop_multimodal)]
    genuine_drop_multimodal: f64,
    /// Fit the genuine score models from every other planted pair (the labelled-data workflow); the
    /// recall figures still count every planted pair.
    #[arg(long)]
    calibrate_genuine: bool,
    /// Generate straight into the store (batches of `--batch` records, each a durable commit) without
    /// writing `.npy` files: half the disk, for runs whose population files would not fit beside the store.
    #[arg(long)]
    direct: bool,
    /// Records per ingest batch (each batch is a durable commit).
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Identify probes answered after the dedup as one batch (`Engine::identify_batch`, every probe
    /// audited against exact search; see `--identify-batch-scan`): each is a seeded live row with every template moved to a cosine drawn
    /// uniformly in [0.5, 0.95] with its source, towards a random direction. Reports the per-probe latency
    /// (p50/p99), the audit's recall vs exact and how many sources come back. 0 skips.
    #[arg(long, default_value_t = 0)]
    identify_probes: usize,
    /// Identify path imposed on every modality (`ivf`, `sketch` or `exact`; default: chosen by predicted
    /// cost per query, see `pacha_engine::idpath`).
    #[arg(long)]
    identify_path: Option<IdPathArg>,
    /// How the identify batch searches its probes (`auto`, `joint`, `per-probe`; default `auto`, or
    /// `per-probe` when `--identify-path` imposes an index path).
    #[arg(long)]
    identify_batch_scan: Option<IdBatchArg>,
    /// Also search the identify probes' face templates with an HNSW graph (hnsw_rs, default build
    /// parameters) built over the face rows, at each of these ef values (comma-separated): build time,
    /// per-query latency and the share of exact search's rows at or above the candidate cosine and of the
    /// contract's rows (fused score at or above the threshold) it returns.
    #[arg(long, value_delimiter = ',')]
    identify_hnsw: Vec<usize>,
    /// Results asked of HNSW per query (`k'`, rescored exactly) with `--identify-hnsw`.
    #[arg(long, default_value_t = 50)]
    hnsw_k: usize,
}

/// `--identify-path` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum IdPathArg {
    Ivf,
    Sketch,
    Exact,
}

/// `--identify-batch-scan` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum IdBatchArg {
    Auto,
    Joint,
    PerProbe,
}

/// `n` identify probes made from seeded live rows of `engine`'s store: every present template of the row,
/// moved to a cosine drawn uniformly in [0.5, 0.95] with the row's template along a random orthogonal
/// direction. Returns the probes and their source rows.
fn identify_probes(engine: &Engine, n: usize, seed: u64) -> (Vec<Vec<Template>>, Vec<usize>) {
    let snap = engine.snapshot();
    let mut live: Vec<usize> = (0..snap.rows()).filter(|&r| !snap.is_deleted(r)).collect();
    let k = n.min(live.len());
    let mut rng = SplitMix(seed);
    rng.shuffle_prefix(&mut live, k);
    let mut probes = Vec::with_capacity(k);
    for &r in &live[..k] {
        let mut ts = Vec::new();
        for spec in &snap.schema().modalities {
            let (m, Some(view)) = (spec.modality, snap.f32_rows(spec.modality)) else {
                continue;
            };
            if !snap.is_present(m, r) {
                continue;
            }
            let x = view.row(r);
            let c = 0.5 + 0.45 * (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            // A random direction orthogonal to x, normalised.
            let mut w: Vec<f64> = (0..x.len()).map(|_| rng.normal()).collect();
            let dot: f64 = w.iter().zip(x).map(|(a, &b)| a * f64::from(b)).sum();
            w.iter_mut()
                .zip(x)
                .for_each(|(a, &b)| *a -= dot * f64::from(b));
            let norm = w.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
            let s = (1.0 - c * c).sqrt() / norm;
            let vector = x
                .iter()
                .zip(&w)
                .map(|(&b, a)| (c * f64::from(b) + s * a) as f32)
                .collect();
            ts.push(Template {
                modality: m,
                vector,
                quality: 1.0,
            });
        }
        probes.push(ts);
    }
    let sources = live[..k].to_vec();
    (probes, sources)
}

/// HNSW against the identify contract on the face templates of `probes`: builds a graph over the store's
/// face rows (hnsw_rs, `HnswParams::default()`: i8 graph, M 16, ef_construction 200, parallel inserts),
/// then for each `ef` searches every probe one at a time (`k'` results rescored exactly) and counts the
/// exact scan's rows at or above the probe's face candidate cosine (as identify searches it), and those
/// whose fused score reaches the threshold, that it returns.
fn hnsw_identify(
    engine: &Engine,
    probes: &[Vec<Template>],
    efs: &[usize],
    k: usize,
    target_fpir: f64,
) -> Result<serde_json::Value> {
    use pacha_index::ann::AnnBuild;
    let snap = engine.snapshot();
    let cal = engine.calibration();
    let mi = snap
        .schema()
        .modalities
        .iter()
        .position(|s| s.modality == Modality::Face)
        .context("--identify-hnsw needs a face modality")?;
    let view = snap.f32_rows(Modality::Face).context("no face rows")?;
    let threshold = pacha_engine::fusion::threshold_for_fpir(target_fpir, snap.live())?;
    let t = Instant::now();
    let graph = pacha_index::HnswIndex::build(view, &pacha_index::HnswParams::default())?;
    let build_s = t.elapsed().as_secs_f64();
    note(&format!(
        "hnsw: built over {} rows in {build_s:.1} s ({:.0} inserts/s)",
        view.rows(),
        view.rows() as f64 / build_s
    ));
    // Exact rows at or above the probe's own face candidate cosine (identify's: the complete budgets over
    // the modalities the probe has), and the contract's (fused score ≥ threshold), per probe.
    let faces: Vec<(usize, &[f32], f32)> = probes
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let face = p.iter().find(|t| t.modality == Modality::Face)?;
            let probe = pacha_engine::matcher::Probe::new("probe", p, snap.schema()).ok()?;
            let c = pacha_engine::engine::probe_candidate_cosines(&snap, &cal, &probe, threshold)
                .get(mi)
                .copied()
                .flatten()?;
            Some((i, face.vector.as_slice(), c))
        })
        .collect();
    let lowest = faces.iter().map(|f| f.2).reduce(f32::min);
    let highest = faces.iter().map(|f| f.2).reduce(f32::max);
    let exact: Vec<(HashSet<u32>, HashSet<u32>)> = faces
        .iter()
        .map(|&(i, q, c)| {
            let probe = pacha_engine::matcher::Probe::new("probe", &probes[i], snap.schema());
            let above: HashSet<u32> = (0..view.rows())
                .filter(|&r| {
                    snap.is_present(Modality::Face, r)
                        && !snap.is_deleted(r)
                        && pacha_index::dot_f32(q, view.row(r)) >= c
                })
                .map(|r| r as u32)
                .collect();
            let contract = match &probe {
                Ok(p) => above
                    .iter()
                    .copied()
                    .filter(|&r| {
                        pacha_engine::matcher::compare_probe(&snap, &cal, p, r as usize)
                            .fused
                            .score
                            >= threshold
                    })
                    .collect(),
                Err(_) => HashSet::new(),
            };
            (above, contract)
        })
        .collect();
    let mut rows = Vec::new();
    for &ef in efs {
        let mut ms = Vec::with_capacity(faces.len());
        let (mut b_found, mut b_all, mut c_found, mut c_all) = (0u64, 0u64, 0u64, 0u64);
        for (&(_, q, c), (above, contract)) in faces.iter().zip(&exact) {
            let t = Instant::now();
            let got = pacha_index::search_rescored(&graph, q, view, k, k, ef, None)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            let got: HashSet<u32> = got.iter().filter(|n| n.score >= c).map(|n| n.id).collect();
            b_all += above.len() as u64;
            b_found += above.iter().filter(|r| got.contains(r)).count() as u64;
            c_all += contract.len() as u64;
            c_found += contract.iter().filter(|r| got.contains(r)).count() as u64;
        }
        let lat = pacha_engine::identify::Latency::of(&ms);
        note(&format!(
            "hnsw ef {ef}: p50 {:.2} ms, p99 {:.2} ms; contract {c_found}/{c_all}, boundary {b_found}/{b_all}",
            lat.p50_ms, lat.p99_ms
        ));
        rows.push(json!({"ef": ef, "k": k, "latency": lat,
            "contract_found": c_found, "contract_pairs": c_all,
            "boundary_found": b_found, "boundary_pairs": b_all}));
    }
    Ok(
        json!({"rows": view.rows(), "build_seconds": build_s, "cosines": [lowest, highest],
              "threshold": threshold, "params": pacha_index::HnswParams::default(), "by_ef": rows}),
    )
}

fn parse_fingers(s: &str) -> Result<Vec<(u8, usize)>> {
    if s.is_empty() || s == "none" {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|f| {
            let (p, d) = f
                .split_once(':')
                .with_context(|| format!("--fingers {f:?}: expected POS:DIM"))?;
            Ok((p.trim().parse()?, d.trim().parse()?))
        })
        .collect()
}

/// Resets the kernel's peak-RSS mark of this process (Linux `clear_refs` code 5), so that the peak measured
/// afterwards belongs to the stages that follow; false where unsupported.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size of this process in bytes (`VmHWM`), if the platform reports it.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn note(msg: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "[scale] {msg}");
}

struct Stages(Vec<(String, f64)>);
impl Stages {
    fn time<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let r = f()?;
        let s = t.elapsed().as_secs_f64();
        note(&format!("{name}: {s:.2} s"));
        self.0.push((name.to_string(), s));
        Ok(r)
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let tmp;
    let dir: PathBuf = match &a.dir {
        Some(d) => d.clone(),
        None => {
            if a.reuse {
                bail!("--reuse needs --dir");
            }
            tmp = tempfile::Builder::new().prefix("pacha-scale-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir)?;
    let (pop, store) = (dir.join("population"), dir.join("store"));
    let mut st = Stages(Vec::new());
    let preset = a.preset;
    let mut fingers = parse_fingers(&a.fingers)?;
    if fingers.is_empty() && !preset.has_face() {
        fingers = vec![(2, 256), (7, 256)];
    }
    let cfg = PopulationConfig {
        records: a.records,
        seed: a.seed,
        preset,
        face_dim: a.face_dim.unwrap_or(preset.default_face_dim()),
        fingers,
        duplicate_rate: a.duplicate_rate,
        ..PopulationConfig::default()
    };
    if !a.reuse && store.exists() {
        bail!(
            "{} already holds a store: use --reuse or a fresh --dir",
            store.display()
        );
    }
    // Ground truth as subject-ID pairs, from the generator, a truth CSV, or none.
    let truth: Option<Vec<(String, String)>> = if a.direct {
        if a.face_npy.is_some() {
            bail!("--direct generates the population: it cannot take --face-npy");
        }
        let generator = Generator::new(cfg)?;
        if !a.reuse {
            st.time("generate+ingest", || {
                let schema = Schema::of(generator.modalities());
                let engine = Engine::create(&store, schema)?;
                for b in generator.batches(a.batch) {
                    engine.insert_records(&b.records)?;
                }
                Ok(())
            })?;
        }
        Some(
            generator
                .truth_pairs()
                .iter()
                .map(|p| (generator.subject_id(p.a), generator.subject_id(p.b)))
                .collect(),
        )
    } else {
        let (files, subjects, truth_path): (Vec<(Modality, PathBuf)>, PathBuf, Option<PathBuf>) =
            match &a.face_npy {
                Some(f) => {
                    let subj = a.subjects.clone().context("--face-npy needs --subjects")?;
                    (vec![(Modality::Face, f.clone())], subj, a.truth.clone())
                }
                None => {
                    let files = cfg
                        .modalities()
                        .into_iter()
                        .map(|(m, _)| (m, pop.join(format!("{}.npy", m.key()))))
                        .collect();
                    if !a.reuse {
                        st.time("generate", || {
                            Ok(write_population(&cfg, &pop, &mut |_, _| {})?)
                        })?;
                    }
                    (files, pop.join("subjects.csv"), Some(pop.join("truth.csv")))
                }
            };
        if !a.reuse {
            st.time("ingest", || {
                Ok(pacha_engine::ingest::ingest(
                    &store,
                    &files,
                    &subjects,
                    a.batch,
                    &|_, _, _| {},
                )?)
            })?;
        }
        match &truth_path {
            Some(tp) => Some(read_truth(tp)?),
            None => None,
        }
    };
    let rss_before_dedup_stages = peak_rss();
    let peak_reset = reset_peak_rss();

    if !a.reuse_index {
        // The index is rebuilt below: a stale saved one would only be loaded by `open` and held in memory
        // beside the new one.
        let saved = store.join("engine").join("index");
        pacha_engine::annset::AnnSet::remove(&saved)?;
    }
    let engine = st.time("open", || Ok(Engine::open(&store)?))?;
    let n = engine.count();
    let mode = match a.mode {
        ModeArg::Auto => CandidateMode::Auto,
        ModeArg::Exact => CandidateMode::Exact,
        ModeArg::Index => CandidateMode::Index,
    };
    if !matches!(mode, CandidateMode::Exact) {
        let mut params = pacha_engine::annset::AnnParams::default();
        params.ivf.lists = a.lists;
        if let Some(p) = a.probes {
            params.ivf.probes = p;
        }
        if let Some(x) = a.assign {
            params.ivf.assign = x;
        }
        if let Some(x) = a.margin {
            params.ivf.margin = x;
        }
        if let Some(x) = a.wide_share {
            params.ivf.wide_share = x;
        }
        if let Some(x) = a.wide_probes {
            params.ivf.wide_probes = x;
        }
        if let Some(x) = a.train_sample {
            params.ivf.train_sample = x;
        }
        if a.centre {
            params.ivf.centre = true;
        }
        if let Some(v) = a.visits {
            params.ivf.one_way = matches!(v, Visits::OneWay);
        }
        let saved = a.reuse_index && engine.index().is_some_and(|i| i.covers(&engine.snapshot()));
        if saved {
            note("index: reusing the saved index (not timed)");
        } else {
            st.time("index", || Ok(engine.build_index(&params, None)?))?;
        }
    }
    let labelled: Option<Vec<(String, String)>> = match (&truth, a.calibrate_genuine) {
        (Some(t), true) => Some(t.iter().step_by(2).cloned().collect()),
        _ => None,
    };
    st.time("calibrate", || {
        Ok(engine.calibrate(&CalibrateOptions {
            genuine: labelled.as_deref(),
            ..CalibrateOptions::default()
        })?)
    })?;
    let opts = DedupOptions {
        target_fpir: a.target_fpir,
        mode,
        genuine_miss: a.genuine_miss,
        sketch: if a.no_sketch {
            None
        } else if a.budget_cuts {
            Some(CutPolicy {
                genuine_drop: a.genuine_drop,
                genuine_drop_multimodal: a.genuine_drop_multimodal,
                ..CutPolicy::default()
            })
        } else {
            Some(pacha_engine::dedup::complete_cuts())
        },
        audit: pacha_engine::audit::AuditOptions {
            probes: a.audit_probes,
            ..Default::default()
        },
        scope: if a.recall_only {
            DedupScope::RowsFrom(engine.snapshot().rows().saturating_sub(1))
        } else {
            DedupScope::WholeStore
        },
        force_path: a.force_path.clone(),
        ..DedupOptions::default()
    };
    let result = st.time("dedup", || Ok(engine.dedup(&opts, None, None)?))?;
    let matching_seconds: f64 =
        st.0.iter()
            .filter(|(s, _)| s == "index" || s == "dedup")
            .map(|(_, t)| t)
            .sum();
    let peak = peak_rss();

    // Recall against ground truth, and against what exact search would report.
    let snap = engine.snapshot();
    let cal = engine.calibration();
    let threshold = result.threshold;
    let hits: HashSet<(u32, u32)> = result.hits().map(|p| (p.row_a, p.row_b)).collect();
    let mut planted = json!(null);
    if let Some(truth) = &truth {
        let rows: Vec<(u32, u32)> = truth
            .iter()
            .filter_map(|(x, y)| {
                let (r, s) = (snap.row_of(x)?, snap.row_of(y)?);
                Some((r.min(s) as u32, r.max(s) as u32))
            })
            .collect();
        let findable: Vec<&(u32, u32)> = rows
            .iter()
            .filter(|&&(r, s)| fused_rows(&snap, &cal, r as usize, s as usize).score >= threshold)
            .collect();
        let found = rows.iter().filter(|p| hits.contains(p)).count();
        let found_findable = findable.iter().filter(|p| hits.contains(p)).count();
        // Per missed pair: each shared modality's exact cosine and whether it reached that modality's
        // candidate cosine (a miss with none reached is left by the relaxed budgets, else by the join).
        let cand: Vec<(String, Option<f32>)> = result.summary.candidate_cosines.clone();
        let missed: Vec<serde_json::Value> = findable
            .iter()
            .filter(|p| !hits.contains(p))
            .take(40)
            .map(|&&(r, s)| {
                let c = compare_rows(&snap, &cal, r as usize, s as usize);
                let mods: Vec<serde_json::Value> = c
                    .modalities
                    .iter()
                    .map(|m| {
                        let key = m.modality.key();
                        let budget = cand.iter().find(|(k, _)| *k == key).and_then(|(_, b)| *b);
                        json!([key, m.cosine, budget.is_some_and(|b| m.cosine >= b)])
                    })
                    .collect();
                json!({"rows": [r, s], "score": c.fused.score, "cosines": mods})
            })
            .collect();
        // The probes the join would need for each findable planted pair: per shared modality whose exact
        // cosine reaches its candidate cosine, the rank the visit rule needs (see `Ivf::probe_rank`); the
        // pair's need is the smallest. Recall by probes follows (sketch drops not modelled).
        let mut need: Vec<usize> = Vec::new();
        // Pairs the index's own per-row probe counts reach (wide rows included).
        let mut reached = 0usize;
        // Findable planted pairs the index needs ≥ 64 probes for: per reachable modality (cosine, probe depth
        // the visit rule needs, whether this index's probes reach it).
        let mut hard: Vec<serde_json::Value> = Vec::new();
        if let Some(ann) = engine.index() {
            let schema = snap.schema();
            for &&(r, s) in &findable {
                let c = compare_rows(&snap, &cal, r as usize, s as usize);
                let mut best = usize::MAX;
                let mut hit = false;
                let mut detail: Vec<serde_json::Value> = Vec::new();
                for m in &c.modalities {
                    let Some(mi) = schema
                        .modalities
                        .iter()
                        .position(|x| x.modality == m.modality)
                    else {
                        continue;
                    };
                    let budget = result.summary.candidate_cosines.get(mi).and_then(|x| x.1);
                    let (Some(b), Some(ivf), Some(view)) =
                        (budget, ann.ivf(mi), snap.f32_rows(m.modality))
                    else {
                        continue;
                    };
                    if m.cosine < b || (s as usize) >= ann.rows() {
                        continue;
                    }
                    let base = view.slice_rows(0, ann.rows());
                    let Some((rank, reached)) = ivf.pair_reach(base, r as usize, s as usize) else {
                        continue;
                    };
                    best = best.min(rank);
                    hit |= reached;
                    detail.push(json!([m.modality.key(), m.cosine, rank, reached]));
                }
                if best >= 64 && hard.len() < 40 {
                    let all: Vec<serde_json::Value> = c
                        .modalities
                        .iter()
                        .map(|m| json!([m.modality.key(), m.cosine]))
                        .collect();
                    hard.push(json!({"rows": [r, s], "score": c.fused.score, "reachable": detail, "cosines": all}));
                }
                need.push(best);
                reached += usize::from(hit);
            }
        }
        let recall_by_probes: Vec<(usize, f64)> = [8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
            .iter()
            .map(|&p| {
                let ok = need.iter().filter(|&&n| n < p).count();
                (p, ok as f64 / need.len().max(1) as f64)
            })
            .collect();
        let products: Vec<u64> = engine.index().map_or(Vec::new(), |ann| {
            (0..snap.schema().modalities.len())
                .map(|mi| ann.ivf(mi).map_or(0, |i| i.candidate_products()))
                .collect()
        });
        // List balance: member-count quantiles, and the products against those of equal lists.
        let balance: Vec<serde_json::Value> = engine.index().map_or(Vec::new(), |ann| {
            (0..snap.schema().modalities.len())
                .filter_map(|mi| ann.ivf(mi))
                .map(|ivf| {
                    let sizes = ivf.list_sizes();
                    let mut m: Vec<usize> = sizes.iter().map(|s| s.0).collect();
                    m.sort_unstable();
                    let q = |p: f64| m[((m.len() - 1) as f64 * p).round() as usize];
                    let (tm, tv) = sizes
                        .iter()
                        .fold((0u64, 0u64), |a, s| (a.0 + s.0 as u64, a.1 + s.1 as u64));
                    let even = tm as f64 * tv as f64 / sizes.len() as f64;
                    let prod: u64 = sizes.iter().map(|s| s.0 as u64 * s.1 as u64).sum();
                    json!({"lists": sizes.len(), "members_p50": q(0.5), "members_p90": q(0.9),
                           "members_p99": q(0.99), "members_max": q(1.0),
                           "products_vs_even_lists": prod as f64 / even.max(1.0)})
                })
                .collect()
        });
        planted = json!({
            "recall_by_probes": recall_by_probes,
            "join_products": products,
            "list_balance": balance,
            "predicted_recall": reached as f64 / need.len().max(1) as f64,
            "hard": hard,
            "pairs": truth.len(),
            "in_store": rows.len(),
            "exact_would_find": findable.len(),
            "found": found,
            "planted_recall": found as f64 / rows.len().max(1) as f64,
            "planted_recall_vs_exact": found_findable as f64 / findable.len().max(1) as f64,
            "missed_vs_exact": findable.len() - found_findable,
            "missed": missed,
        });
    }

    // All hits (planted or not) of the last rows against an exact dedup of those rows.
    let mut sample = json!(null);
    if a.exact_sample > 0 && !matches!(mode, CandidateMode::Exact) {
        let from = snap.rows().saturating_sub(a.exact_sample);
        let exact_opts = DedupOptions {
            scope: DedupScope::RowsFrom(from),
            mode: CandidateMode::Exact,
            ..opts.clone()
        };
        let t = Instant::now();
        let exact = engine.dedup(&exact_opts, None, None)?;
        let secs = t.elapsed().as_secs_f64();
        let ex: HashSet<(u32, u32)> = exact.hits().map(|p| (p.row_a, p.row_b)).collect();
        let run: HashSet<(u32, u32)> = hits
            .iter()
            .filter(|p| p.1 as usize >= from)
            .copied()
            .collect();
        let common = ex.intersection(&run).count();
        sample = json!({
            "probe_rows": snap.rows() - from,
            "exact_hits": ex.len(),
            "run_hits": run.len(),
            "common": common,
            "sample_recall_vs_exact": common as f64 / ex.len().max(1) as f64,
            "run_only": run.len() - common,
            "exact_seconds": secs,
        });
    }

    let mut identify = json!(null);
    if a.identify_probes > 0 {
        let (probes, sources) = identify_probes(&engine, a.identify_probes, a.seed ^ 0x1d3);
        use pacha_engine::identify::BatchScan;
        let opts = pacha_engine::engine::IdentifyOptions {
            target_fpir: a.target_fpir,
            batch_scan: match (a.identify_batch_scan, a.identify_path) {
                (Some(IdBatchArg::Auto), _) | (None, None) => BatchScan::Auto,
                (Some(IdBatchArg::Joint), _) => BatchScan::Joint,
                (Some(IdBatchArg::PerProbe), _) | (None, Some(_)) => BatchScan::PerProbe,
            },
            ..Default::default()
        };
        if let (Some(ann), Some(p)) = (engine.index(), a.identify_path) {
            use pacha_engine::idpath::ForcedPath;
            ann.force_identify_path(Some(match p {
                IdPathArg::Ivf => ForcedPath::Ivf,
                IdPathArg::Sketch => ForcedPath::Sketch,
                IdPathArg::Exact => ForcedPath::Exact,
            }));
        }
        let t = Instant::now();
        let batch = engine.identify_batch(
            &probes,
            &opts,
            &pacha_engine::audit::AuditOptions {
                probes: probes.len(),
                ..Default::default()
            },
        )?;
        let secs = t.elapsed().as_secs_f64();
        let back = batch
            .results
            .iter()
            .zip(&sources)
            .filter(|&(r, &src)| {
                r.candidates
                    .iter()
                    .any(|c| snap.row_of(&c.subject_id) == Some(src))
            })
            .count();
        let above = sources
            .iter()
            .zip(&probes)
            .filter(|&(&src, p)| {
                let probe = pacha_engine::matcher::Probe::new("probe", p, snap.schema());
                probe.is_ok_and(|pr| {
                    pacha_engine::matcher::compare_probe(&snap, &cal, &pr, src)
                        .fused
                        .score
                        >= batch.results.first().map_or(f64::INFINITY, |r| r.threshold)
                })
            })
            .count();
        note(&format!(
            "identify: {} probes, p50 {:.2} ms, p99 {:.2} ms; sources back {back} of {above} above the threshold",
            probes.len(),
            batch.latency.p50_ms,
            batch.latency.p99_ms
        ));
        let hnsw = if a.identify_hnsw.is_empty() {
            json!(null)
        } else {
            hnsw_identify(&engine, &probes, &a.identify_hnsw, a.hnsw_k, a.target_fpir)?
        };
        identify = json!({
            "hnsw": hnsw,
            "plans": engine.index().map(|i| i.identify_plans()),
            "forced_path": a.identify_path.map(|p| format!("{p:?}")),
            "probes": probes.len(),
            "latency": batch.latency,
            "audit": batch.audit,
            "sources_above_threshold": above,
            "sources_returned": back,
            "seconds_with_audit": secs,
        });
    }

    let dims: Vec<(String, usize)> = snap
        .schema()
        .modalities
        .iter()
        .map(|s| (s.modality.key(), s.dim))
        .collect();
    let line = json!({
        "bench": "scale",
        "records": n,
        "preset": if a.face_npy.is_some() { "npy".to_string() } else { preset.name().to_string() },
        "dims": dims,
        "threads": rayon::current_num_threads(),
        "stages": st.0,
        "matching_seconds": matching_seconds,
        "dedup_records_per_second": n as f64 / matching_seconds.max(1e-9),
        "dedup": {
            "mode": result.summary.mode,
            "audit": result.summary.audit,
            "plans": result.summary.plans,
            "prepare_seconds": result.summary.prepare_seconds,
            "threshold": threshold,
            "candidate_cosines": result.summary.candidate_cosines,
            "genuine_miss": result.summary.genuine_miss,
            "sketch_cuts": result.summary.sketch_cuts,
            "sketch_full_cuts": result.summary.sketch_full_cuts,
            "candidate_pairs": result.summary.candidate_pairs,
            "join_stats": result.summary.join_stats,
            "candidate_seconds": result.summary.candidate_seconds,
            "scoring_seconds": result.summary.scoring_seconds,
            "hits": result.summary.hits,
            "clusters": result.summary.clusters,
        },
        "planted": planted,
        "exact_sample": sample,
        "identify": identify,
        "peak_rss_bytes": peak,
        "peak_rss_bytes_generate_ingest": rss_before_dedup_stages,
        "peak_rss_is_matching_only": peak_reset,
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    Ok(())
}
