//! `pacha`: the analyst's command-line tool for biometric deduplication.
//!
//! Exit codes: 0 success; 1 the command ran and found what it was asked to look for (`check` found
//! corruption); 2 usage or input error.
//!
//! Store access: `info`, `verify`, `identify`, `dedup`, `eval` and `check` only read the store (no lock, nothing
//! written into it: they run beside each other, beside a writer, and on a read-only mount); `ingest`, `index`,
//! `calibrate` and `delete` take the store's writer lock and are refused (exit 2) while another writer runs.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod commands;
mod demo;
mod report;
mod ui;

use clap::{Args, Parser, Subcommand, ValueEnum};
use pacha_engine::audit::AuditOptions;
use pacha_engine::fusion::DEFAULT_FPIR;
use std::path::PathBuf;
use std::process::ExitCode;
use ui::Ui;

/// pacha: find people enrolled twice in a biometric registry (face + fingerprint templates).
#[derive(Parser, Debug)]
#[command(name = "pacha", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Machine-readable JSON on stdout (one object per command).
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars and no informational messages.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// More log output (-v info, -vv debug); also honours RUST_LOG.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a synthetic population with planted duplicates and ground truth.
    Generate(GenerateArgs),
    /// Ingest templates (.npy / .fvecs and a subjects CSV, or one Parquet table) into a store (created if absent).
    Ingest(IngestArgs),
    /// Build (or rebuild) the candidate index of a store.
    Index(IndexArgs),
    /// Fit the score models (impostor tails from the store; genuine models from a truth file).
    Calibrate(CalibrateArgs),
    /// Deduplicate the whole store, or the rows from a given row on, and write hits and clusters (or, with
    /// `--tile I/N`, one tile of the run, for `merge`).
    Dedup(DedupArgs),
    /// Merge the tile directories of one tiled dedup run into the run's hits, clusters and summary.
    Merge(MergeArgs),
    /// Identify probes (rows of template files) against the store.
    Identify(IdentifyArgs),
    /// Verify two enrolled subjects against each other (1:1).
    Verify(VerifyArgs),
    /// Delete enrolments by subject ID.
    Delete(DeleteArgs),
    /// Evaluate a dedup run against ground truth (recall, precision, FNIR at FPIR, DET, calibration).
    Eval(EvalArgs),
    /// Write the HTML report of an evaluation.
    Report(ReportArgs),
    /// Show schema, counts, sizes, index and calibration state, SIMD level.
    Info(StoreArg),
    /// Verify every checksum and invariant of a store (exit 1 if problems are found).
    Check(StoreArg),
    /// Generate, ingest, index, calibrate, deduplicate, evaluate and report on a generated population.
    Demo(DemoArgs),
}

/// A store directory.
#[derive(Args, Debug)]
pub struct StoreArg {
    /// The store directory.
    #[arg(long, short)]
    pub store: PathBuf,
}

/// Arguments of `index`.
#[derive(Args, Debug)]
pub struct IndexArgs {
    /// The store directory.
    #[arg(long, short)]
    pub store: PathBuf,
    /// IVF lists per modality (default: 2·√rows).
    #[arg(long)]
    pub lists: Option<usize>,
    /// Lists every row probes in the dedup join (default 48; at a million rows 24 with wide rows is
    /// faster at higher recall, see BENCHMARKS.md).
    #[arg(long)]
    pub probes: Option<usize>,
    /// Share of rows, those the partition serves worst, that probe `--wide-probes` lists (default 0).
    #[arg(long, default_value_t = 0.0)]
    pub wide_share: f64,
    /// Lists the wide rows probe.
    #[arg(long, default_value_t = 128)]
    pub wide_probes: usize,
}

/// Preset of the generator.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PresetArg {
    /// Clustered, anisotropic templates with families (like real embeddings).
    Structured,
    /// Pure random unit vectors (the hardest case for ANN indexes).
    Isotropic,
    /// Test population: uniform random identities, mates at cosine 0.70.
    IsotropicMates,
    /// Test population: look-alike families, member cosines ≈ 0.30–0.65.
    LookalikeFamilies,
    /// Test population: Student-t scale mixture, heavy impostor upper tail.
    HeavyTail,
    /// Test population: power-law spectrum k^-1.5 over the full dimension, rotated.
    PowerLaw,
    /// Test population: power-law cluster sizes, tight clusters.
    SkewedClusters,
    /// Test population: fingers 2 and 7 only (no face), 5 % miss one finger.
    FingersOnly,
}

impl PresetArg {
    /// The generator preset.
    pub fn preset(self) -> pacha_datasets::generate::Preset {
        use pacha_datasets::generate::Preset;
        match self {
            PresetArg::Structured => Preset::Structured,
            PresetArg::Isotropic => Preset::Isotropic,
            PresetArg::IsotropicMates => Preset::IsotropicMates,
            PresetArg::LookalikeFamilies => Preset::LookalikeFamilies,
            PresetArg::HeavyTail => Preset::HeavyTail,
            PresetArg::PowerLaw => Preset::PowerLaw,
            PresetArg::SkewedClusters => Preset::SkewedClusters,
            PresetArg::FingersOnly => Preset::FingersOnly,
        }
    }
}

/// Arguments of `generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Output directory.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Number of enrolments.
    #[arg(long, short = 'n', default_value_t = 100_000)]
    pub records: u64,
    /// Random seed (same seed, same files).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Population model.
    #[arg(long, value_enum, default_value_t = PresetArg::Structured)]
    pub preset: PresetArg,
    /// Face dimension (0 = no face; default 512, or 0 for `fingers-only`).
    #[arg(long)]
    pub face_dim: Option<usize>,
    /// Finger positions and dimensions, e.g. `2:256` (repeatable; default right and left index at 256).
    #[arg(long = "finger", value_name = "POS:DIM")]
    pub fingers: Vec<String>,
    /// Share of enrolments that are a person enrolled again.
    #[arg(long, default_value_t = 0.01)]
    pub duplicate_rate: f64,
}

/// Arguments of `ingest`.
#[derive(Args, Debug)]
pub struct IngestArgs {
    /// The store directory (created with a schema from the files if it does not exist).
    #[arg(long, short)]
    pub store: PathBuf,
    /// Face templates (.npy f32/f16, or .fvecs).
    #[arg(long, conflicts_with = "parquet")]
    pub face: Option<PathBuf>,
    /// Finger templates as `POS=FILE`, e.g. `2=ri.npy` (repeatable).
    #[arg(long = "finger", value_name = "POS=FILE", conflicts_with = "parquet")]
    pub fingers: Vec<String>,
    /// Subjects CSV/TSV (`subject_id` column, optional `<modality>_present`/`_quality` columns).
    #[arg(long, required_unless_present = "parquet", conflicts_with = "parquet")]
    pub subjects: Option<PathBuf>,
    /// One Parquet table instead of --face/--finger/--subjects: a subject-ID column and one list<float> or
    /// list<halffloat> column (fixed-size or not) per modality named `face`, `finger1` … `finger10` (a null
    /// = absent template), optional `<modality>_quality` float columns. Streamed in batches.
    #[arg(long, value_name = "FILE")]
    pub parquet: Option<PathBuf>,
    /// The Parquet subject-ID column (strings or integers).
    #[arg(long, default_value = "subject_id", requires = "parquet")]
    pub id_column: String,
    /// A Parquet template column with another name, as `MODALITY=COLUMN` (`face=emb_face`, `finger2=ri`;
    /// repeatable).
    #[arg(long = "column", value_name = "MODALITY=COLUMN", requires = "parquet")]
    pub columns: Vec<String>,
    /// Records per committed batch.
    #[arg(long, default_value_t = 10_000)]
    pub batch: usize,
}

/// Arguments of `calibrate`.
#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// The store directory.
    #[arg(long, short)]
    pub store: PathBuf,
    /// Ground-truth pairs (`subject_a,subject_b`) for the genuine models.
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Random impostor pairs sampled per modality.
    #[arg(long, default_value_t = 1_000_000)]
    pub pairs: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Rows whose every pair is scored to count and fit the impostor tail (0: Gaussian tail fit only).
    #[arg(long, default_value_t = pacha_engine::engine::TAIL_ROWS)]
    pub tail_rows: usize,
    /// With `--truth`: where the count of `--tail-rows` rows does not pin a modality's measured ÷ predicted FMR
    /// within 1.5× at the FMR a dedup at the default FPIR decides at, its pool is doubled and counted again, up
    /// to this many rows or the whole store (≤ --tail-rows: never grows).
    #[arg(long, default_value_t = pacha_engine::engine::TAIL_ROWS_MAX)]
    pub tail_rows_max: usize,
    /// Quality bands per modality: pairs are scored against the impostor tail of their band (the lower
    /// template quality); kept only where qualities vary and move the tail. 0 or 1: pooled models only.
    #[arg(long, default_value_t = pacha_engine::engine::QUALITY_BANDS)]
    pub quality_bands: usize,
    /// How the tail count's rows are drawn: `hubs` (per modality, rows near many others kept with
    /// certainty, the others sampled, each pair weighted by the inverse of its rows' chances: the store's
    /// FMR with far less spread; one more join of every row against 2 000–10 000 reference rows) or
    /// `uniform` (a seeded sample shared by every modality, the default until the eleventh session).
    #[arg(long, value_enum, default_value_t = TailPoolArg::Hubs)]
    pub tail_pool: TailPoolArg,
}

/// How `calibrate` draws the rows of its tail count.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TailPoolArg {
    /// A seeded uniform sample of live rows.
    Uniform,
    /// Hub-stratified, Horvitz–Thompson weighted.
    Hubs,
}

impl TailPoolArg {
    /// The engine's pool kind.
    pub fn pool(self) -> pacha_engine::engine::TailPool {
        match self {
            TailPoolArg::Uniform => pacha_engine::engine::TailPool::Uniform,
            TailPoolArg::Hubs => pacha_engine::engine::TailPool::Hubs,
        }
    }
}

/// Format of a run's hits and clusters tables.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    /// hits.csv and clusters.csv.
    Csv,
    /// hits.parquet and clusters.parquet instead of the CSVs (same columns, typed, unrounded).
    Parquet,
    /// Both the CSV and the Parquet tables.
    Both,
}

impl FormatArg {
    /// The engine's output format.
    pub fn format(self) -> pacha_engine::runio::OutputFormat {
        use pacha_engine::runio::OutputFormat;
        match self {
            FormatArg::Csv => OutputFormat::Csv,
            FormatArg::Parquet => OutputFormat::Parquet,
            FormatArg::Both => OutputFormat::Both,
        }
    }
}

/// Candidate generation mode.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    /// Exact for small stores, the index for large ones.
    Auto,
    /// Exact blocked GEMM joins (complete; slow at scale).
    Exact,
    /// The candidate index.
    Index,
}

/// Arguments of `dedup`.
#[derive(Args, Debug)]
pub struct DedupArgs {
    /// The store directory.
    #[arg(long, short)]
    pub store: PathBuf,
    /// Output directory for hits.csv, hits.jsonl, clusters.csv and summary.json.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Tables of hits and clusters: csv, parquet (hits.parquet, clusters.parquet instead) or both;
    /// hits.jsonl and summary.json are always written.
    #[arg(long, value_enum, default_value_t = FormatArg::Csv)]
    pub format: FormatArg,
    /// Target false-positive identification rate per probe.
    #[arg(long, default_value_t = DEFAULT_FPIR)]
    pub target_fpir: f64,
    /// Only rows from this row on are probes (a newly ingested batch against the store and itself).
    #[arg(long)]
    pub from_row: Option<usize>,
    /// Candidate generation.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
    /// Also write pairs down to this calibrated score (for evaluation and threshold tuning).
    #[arg(long)]
    pub floor: Option<f64>,
    /// Checkpoint directory: an interrupted run restarts from its last finished tile.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Probe rows per tile of an exact-mode run (default 8192). Index runs size their tiles themselves:
    /// with `--mode index` this flag is a usage error; with `--mode auto` it applies only if the planner
    /// picks exact mode.
    #[arg(long)]
    pub block_rows: Option<usize>,
    /// Skip the binary-sketch pre-filter of index candidates (slower; for measuring its misses).
    #[arg(long)]
    pub no_sketch: bool,
    /// Index mode: share of genuine pairs the multi-modal candidate cosines may leave to chance under the
    /// calibrated genuine models (0, the default = complete candidate budgets, as the completeness contract
    /// needs; a relaxed run gives up hits with middling evidence in every modality, and its audit shows it).
    #[arg(long, default_value_t = 0.0)]
    pub genuine_miss: f64,
    /// Index mode: probe rows the completeness audit searches exactly (0 turns the audit off).
    #[arg(long, default_value_t = pacha_engine::audit::DEFAULT_AUDIT_PROBES)]
    pub audit_probes: usize,
    /// Seed of the audit's sample.
    #[arg(long, default_value_t = AuditOptions::default().seed)]
    pub audit_seed: u64,
    /// Index mode: force every candidate modality onto one path (ivf, brute, exact = f32 GEMM, or exact-i8 =
    /// i8 scan with exact f32 rescoring, one join per modality) instead of the plan, or scan all fused
    /// modalities together (joint: the default where every fused modality plans exact-i8).
    #[arg(long)]
    pub force_path: Option<String>,
    /// Index mode: compute every row's sign sketches in this run instead of reading the sketches `pacha
    /// index` saved (for measurements: the results are identical).
    #[arg(long)]
    pub recompute_sketches: bool,
    /// Recall the run must prove: if the audit's 95 % lower bound is below it, the run exits with code 3.
    #[arg(long, default_value_t = pacha_engine::audit::DEFAULT_MIN_RECALL)]
    pub min_recall: f64,
    /// Run only tile I of N (0-based, e.g. `3/16`) of the probe rows and write a tile directory to `--out`
    /// (checkpointed in `--out/checkpoint` unless `--checkpoint` says otherwise); `pacha merge` joins them.
    #[arg(long, value_name = "I/N")]
    pub tile: Option<pacha_engine::dedup::TileSpec>,
}

/// Arguments of `merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Output directory of the merged run (hits.csv, hits.jsonl, clusters.csv, summary.json, manifest.json).
    #[arg(long, short)]
    pub out: PathBuf,
    /// The tile directories, every tile 0..N of one run exactly once (any order).
    #[arg(required = true)]
    pub tiles: Vec<PathBuf>,
    /// Recall the merged run must prove (as for `dedup`): exit code 3 below it.
    #[arg(long)]
    pub min_recall: Option<f64>,
    /// Tables of hits and clusters, as for `dedup`: csv, parquet or both.
    #[arg(long, value_enum, default_value_t = FormatArg::Csv)]
    pub format: FormatArg,
}

/// Arguments of `identify`.
#[derive(Args, Debug)]
pub struct IdentifyArgs {
    /// The store directory.
    #[arg(long, short)]
    pub store: PathBuf,
    /// Probe face templates (.npy/.fvecs), one probe per row.
    #[arg(long)]
    pub face: Option<PathBuf>,
    /// Probe finger templates as `POS=FILE` (repeatable; same rows as --face).
    #[arg(long = "finger", value_name = "POS=FILE")]
    pub fingers: Vec<String>,
    /// Only these rows of the probe files.
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<u64>,
    /// Subjects file of the probe files (ingest format; `<modality>_present` and `<modality>_quality`
    /// columns): probes carry their capture quality and are scored in their quality band (without it every
    /// probe has quality 1, the top band).
    #[arg(long)]
    pub subjects: Option<PathBuf>,
    /// Candidates per probe.
    #[arg(long, default_value_t = 10)]
    pub max_results: usize,
    /// Target false-positive identification rate.
    #[arg(long, default_value_t = DEFAULT_FPIR)]
    pub target_fpir: f64,
    /// Restrict the search to these subject IDs.
    #[arg(long, value_delimiter = ',')]
    pub gallery: Vec<String>,
    /// Report candidates down to this calibrated score instead of the FPIR threshold.
    #[arg(long)]
    pub min_score: Option<f64>,
    /// Probes the completeness audit searches exactly against the whole store (0 turns it off).
    #[arg(long, default_value_t = pacha_engine::identify::DEFAULT_IDENTIFY_AUDIT_PROBES)]
    pub audit_probes: usize,
    /// Seed of the audit's sample.
    #[arg(long, default_value_t = AuditOptions::default().seed)]
    pub audit_seed: u64,
    /// Recall the batch must prove: if the audit's 95 % lower bound is below it, exit code 3.
    #[arg(long, default_value_t = pacha_engine::audit::DEFAULT_MIN_RECALL)]
    pub min_recall: f64,
    /// How the batch searches its probes: `auto` runs one joint i8 scan of every enrolment per group of
    /// probes holding the same modalities where it is predicted cheaper than searching them one by one.
    #[arg(long, value_enum, default_value_t = BatchScanArg::Auto)]
    pub batch_scan: BatchScanArg,
}

/// How `identify` searches a batch of probes.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BatchScanArg {
    /// The joint scan where predicted cheaper than searching the probes one by one.
    Auto,
    /// The joint scan for every group of probes it can serve (1 to 4 fused modalities with i8 codes).
    Joint,
    /// Every probe searched on its own (the index's paths, or an exact scan).
    PerProbe,
}

/// Arguments of `verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The store directory.
    #[arg(long, short)]
    pub store: PathBuf,
    /// First subject ID.
    pub a: String,
    /// Second subject ID.
    pub b: String,
    /// Calibrated score threshold (50 = one false match in 100 000).
    #[arg(long, default_value_t = 50.0)]
    pub threshold: f64,
}

/// Arguments of `delete`.
#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// The store directory.
    #[arg(long, short)]
    pub store: PathBuf,
    /// Subject IDs to delete.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

/// Arguments of `eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The store directory.
    #[arg(long, short)]
    pub store: PathBuf,
    /// The dedup output directory (hits.jsonl, summary.json).
    #[arg(long)]
    pub run: PathBuf,
    /// Ground-truth pairs CSV.
    #[arg(long)]
    pub truth: PathBuf,
    /// Write the evaluation as JSON here (default: <run>/eval.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Impostor pairs sampled for the histograms and the calibration check.
    #[arg(long, default_value_t = 200_000)]
    pub impostor_pairs: usize,
    /// Rows whose every pair the per-modality tail check counts (a pool disjoint from the calibration's
    /// where the store is large enough; 0 skips the check).
    #[arg(long, default_value_t = pacha_engine::evaluation::CHECK_ROWS)]
    pub tail_rows: usize,
    /// Rows whose every pair the fused-score check counts (0 skips it).
    #[arg(long, default_value_t = pacha_engine::evaluation::FUSED_POOL_ROWS)]
    pub fused_rows: usize,
}

/// Arguments of `report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The evaluation JSON written by `eval`.
    #[arg(long)]
    pub eval: PathBuf,
    /// The HTML file to write.
    #[arg(long, short)]
    pub out: PathBuf,
}

/// Arguments of `demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Working directory (default: a new temporary directory, kept and printed).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Number of enrolments.
    #[arg(long, short = 'n', default_value_t = 100_000)]
    pub records: u64,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Population model.
    #[arg(long, value_enum, default_value_t = PresetArg::Structured)]
    pub preset: PresetArg,
}

/// A failure with its exit code.
pub struct Failure {
    /// 1: a problem the command was asked to find; 2: usage or input error; 3: a dedup whose completeness
    /// audit could not prove `--min-recall` (its results are written all the same).
    pub code: u8,
    /// What went wrong, where, and how to fix it.
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 2,
            error: e.into(),
        }
    }
}

/// The error and its causes joined by ": ", skipping a cause whose text the message already ends with (an
/// error that prints its OS error, which is also its source, would otherwise show it twice).
pub fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let env = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let ui = Ui::new(cli.json, cli.quiet);
    match commands::run(cli.command, ui) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // Exit 1 means the command ran and printed its report (e.g. `check`); only errors that stopped the
            // command print an error object.
            let msg = render_error(&f.error);
            if cli.json && f.code == 2 {
                let v = serde_json::json!({"error": msg, "exit_code": f.code});
                println!("{v}");
            }
            eprintln!("error: {msg}");
            ExitCode::from(f.code)
        }
    }
}
