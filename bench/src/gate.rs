//! CI bench gates: figures from a quick criterion run and a seeded scale run, compared with a baseline.
//!
//! Three kinds of figure ([`Gate`]):
//! - **exact**: machine-independent work counters of the seeded scale run (candidate pairs, sketch survivors,
//!   rescorings, hits, recall figures, plans) and the SIMD level; any change fails;
//! - **ratio**: two speeds measured in the same run (so machine load cancels out, mostly); higher is better and
//!   the gate fails when the run falls below `baseline × (1 − margin)`;
//! - **recorded**: absolute times and sizes; written to the history, never gated.
//!
//! The `gate` binary (`bench/src/bin/gate.rs`) and `bench/ci.sh` drive this module; BENCHMARKS.md ("Bench
//! gates in CI") gives the measured spread each margin was chosen from.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// How a figure is judged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Gate {
    /// Must equal the baseline exactly.
    Exact,
    /// A speed ratio (higher is better): fails below `baseline × (1 − margin)`.
    Ratio {
        /// Relative drop allowed.
        margin: f64,
    },
    /// Recorded only.
    Recorded,
}

impl Gate {
    /// Short name for the table.
    pub fn name(&self) -> &'static str {
        match self {
            Gate::Exact => "exact",
            Gate::Ratio { .. } => "ratio",
            Gate::Recorded => "record",
        }
    }
    /// True for the kinds a baseline holds.
    pub fn is_gated(&self) -> bool {
        !matches!(self, Gate::Recorded)
    }
}

/// One figure of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// Dotted name, e.g. `scale.dedup.hits` or `ratio.simd_dot_f32_512`.
    pub name: String,
    /// Its value (number, string or bool).
    pub value: Value,
    /// How it is judged.
    pub gate: Gate,
}

/// Errors of the gate: every one names the file or figure it is about.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The baseline is not what the gate expects.
    #[error("baseline {path}: {problem}")]
    Baseline {
        /// The baseline file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A criterion or scale output file is malformed.
    #[error("{path}: {problem}")]
    Input {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

fn read(path: &Path) -> Result<String, GateError> {
    std::fs::read_to_string(path).map_err(|source| GateError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Ratio gates: name, numerator bench (the slower or reference side), denominator bench, scale factor, margin.
/// The figure is `factor × median(numerator) / median(denominator)`: how many times faster the denominator is.
/// Margins: BENCHMARKS.md, "Bench gates in CI" (the spread measured at ambient load and with a build beside).
/// Each sits between the worst loaded run seen and what a break gives (a ratio near 1 for a lost dispatch).
pub const RATIOS: &[(&str, &str, &str, f64, f64)] = &[
    // SIMD dot (dispatched simsimd) vs the scalar reference, one pair of 512-d f32 vectors.
    (
        "ratio.simd_dot_f32_512",
        "dot_512/f32_scalar",
        "dot_512/f32",
        1.0,
        0.45,
    ),
    // Dispatched sign-sketch filter vs its portable kernel (1024 sketches of 512 bits).
    (
        "ratio.sketch_filter_dispatch",
        "sketch_filter_512bit/packed_portable",
        "sketch_filter_512bit/packed",
        1.0,
        0.35,
    ),
    // pacha's exact threshold join vs one raw faer GEMM of the same 4096×512×4096 product.
    (
        "ratio.threshold_join_vs_gemm",
        "exact_4096x512x4096/faer_gemm_raw",
        "exact_4096x512x4096/threshold_join",
        1.0,
        0.35,
    ),
    // Whole-store dedup of the same 5 000-record store: index mode vs exact mode.
    (
        "ratio.dedup_index_vs_exact",
        "dedup/exact 5000 records",
        "dedup/index 5000 records",
        1.0,
        0.35,
    ),
    // IVF self-join with sketch-filtered products vs f32 GEMM products (same partition).
    (
        "ratio.ivf_sketch_vs_gemm_join",
        "ivf_self_join_10000/gemm",
        "ivf_self_join_10000/sketch_cut_200",
        1.0,
        0.35,
    ),
    // Sketch-filter throughput (64 B of sketch per product, 1024 products) vs a one-thread streaming read of
    // 1 GiB: bytes/s of the filter over bytes/s of the read = (2^30 / 65 536) × t_filter⁻¹ / t_read⁻¹.
    (
        "ratio.sketch_filter_vs_stream_read",
        "stream/sum_1GiB",
        "sketch_filter_512bit/packed",
        65_536.0 / 1_073_741_824.0,
        0.40,
    ),
];

/// Scale-run fields that are not work counters: timings, and figures found to vary between runs or thread
/// counts (BENCHMARKS.md, "Bench gates in CI"). Matched against every path segment.
pub const NOT_EXACT: &[&str] = &[
    "seconds",
    "stages",
    "records_per_second",
    "peak_rss",
    "threads",
    "predicted_seconds",
];

/// Medians (ns) of every benchmark under a criterion output directory, by full id (`group/function`).
/// A `benchmark.json` without a readable `estimates.json` beside it is an error naming the file.
pub fn criterion_medians(dir: &Path) -> Result<BTreeMap<String, f64>, GateError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| GateError::Read {
            path: d.clone(),
            source,
        })?;
        for e in entries {
            let e = e.map_err(|source| GateError::Read {
                path: d.clone(),
                source,
            })?;
            let p = e.path();
            if p.is_dir() {
                // Criterion keeps `new` (this run), `base` and `change` (vs the previous run); read `new` only.
                let name = e.file_name();
                if name != "base" && name != "change" && name != "report" {
                    stack.push(p);
                }
            } else if p.file_name().is_some_and(|n| n == "benchmark.json")
                && d.file_name().is_some_and(|n| n == "new")
            {
                let meta: Value = parse_json(&p)?;
                let id = meta
                    .get("full_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| GateError::Input {
                        path: p.clone(),
                        problem: "no string field \"full_id\"".into(),
                    })?
                    .to_string();
                let est_path = d.join("estimates.json");
                let est: Value = parse_json(&est_path)?;
                let median = est
                    .pointer("/median/point_estimate")
                    .and_then(Value::as_f64)
                    .filter(|m| m.is_finite() && *m > 0.0)
                    .ok_or_else(|| GateError::Input {
                        path: est_path.clone(),
                        problem: "no positive median.point_estimate".into(),
                    })?;
                out.insert(id, median);
            }
        }
    }
    Ok(out)
}

fn parse_json(path: &Path) -> Result<Value, GateError> {
    serde_json::from_str(&read(path)?).map_err(|e| GateError::Input {
        path: path.to_path_buf(),
        problem: format!("not JSON: {e}"),
    })
}

/// The figures of the criterion medians: every ratio of [`RATIOS`] whose two benches ran, and every median as a
/// recorded figure. A ratio whose bench is missing is left out (the comparison then reports it missing).
pub fn criterion_figures(medians: &BTreeMap<String, f64>) -> Vec<Figure> {
    let mut out = Vec::new();
    for &(name, num, den, factor, margin) in RATIOS {
        if let (Some(n), Some(d)) = (medians.get(num), medians.get(den)) {
            out.push(Figure {
                name: name.to_string(),
                value: json!(round_sig(factor * n / d, 4)),
                gate: Gate::Ratio { margin },
            });
        }
    }
    for (id, ns) in medians {
        out.push(Figure {
            name: format!("criterion.{id}.median_ns"),
            value: json!(round_sig(*ns, 4)),
            gate: Gate::Recorded,
        });
    }
    out
}

/// `x` rounded to `s` significant digits (the history stays readable; ratios carry noise far above that).
fn round_sig(x: f64, s: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let p = 10f64.powi(s - 1 - x.abs().log10().floor() as i32);
    (x * p).round() / p
}

/// The figures of one scale-bench JSON line, under `prefix` (e.g. `scale.face100k`): its work counters as
/// exact figures (every leaf of `dedup`, `planted` and `exact_sample` except those matching [`NOT_EXACT`] and
/// the long diagnostic lists) and its timings and sizes as recorded ones.
pub fn scale_figures(prefix: &str, line: &Value) -> Vec<Figure> {
    let mut out = Vec::new();
    let Some(obj) = line.as_object() else {
        return out;
    };
    for (k, v) in obj {
        let path = format!("{prefix}.{k}");
        match k.as_str() {
            "records" | "preset" | "dims" | "dedup" | "planted" | "exact_sample" => {
                flatten(&path, v, &mut out)
            }
            _ => {}
        }
    }
    // Timings and sizes: recorded.
    if let Some(stages) = obj.get("stages").and_then(Value::as_array) {
        for s in stages {
            if let (Some(n), Some(t)) = (s.get(0).and_then(Value::as_str), s.get(1)) {
                out.push(Figure {
                    name: format!("{prefix}.stages.{n}_seconds"),
                    value: t.clone(),
                    gate: Gate::Recorded,
                });
            }
        }
    }
    for k in [
        "matching_seconds",
        "dedup_records_per_second",
        "peak_rss_bytes",
        "threads",
    ] {
        if let Some(v) = obj.get(k) {
            out.push(Figure {
                name: format!("{prefix}.{k}"),
                value: v.clone(),
                gate: Gate::Recorded,
            });
        }
    }
    out
}

/// Diagnostic lists of the scale line that are long and not counters: their lengths are gated, not their items.
const LISTS_BY_LENGTH: &[&str] = &["missed", "hard", "recall_by_probes", "list_balance"];

fn flatten(path: &str, v: &Value, out: &mut Vec<Figure>) {
    let last = path.rsplit('.').next().unwrap_or(path);
    if NOT_EXACT.iter().any(|x| last.contains(x)) {
        return;
    }
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                flatten(&format!("{path}.{k}"), x, out);
            }
        }
        Value::Array(items) if LISTS_BY_LENGTH.contains(&last) => out.push(Figure {
            name: format!("{path}.len"),
            value: json!(items.len()),
            gate: Gate::Exact,
        }),
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                // `[key, value]` pairs and objects with a `modality` are keyed by it; other items by position.
                match x {
                    Value::Array(kv) if kv.len() == 2 && kv[0].is_string() => {
                        let key = kv[0].as_str().unwrap_or_default();
                        flatten(&format!("{path}.{key}"), &kv[1], out);
                    }
                    Value::Object(m) if m.get("modality").is_some_and(Value::is_string) => {
                        let key = m
                            .get("modality")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        let rest: Map<String, Value> = m
                            .iter()
                            .filter(|(k, _)| *k != "modality")
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        flatten(&format!("{path}.{key}"), &Value::Object(rest), out);
                    }
                    _ => flatten(&format!("{path}.{i}"), x, out),
                }
            }
        }
        _ => out.push(Figure {
            name: path.to_string(),
            value: v.clone(),
            gate: Gate::Exact,
        }),
    }
}

/// A parsed baseline: the value of every gated figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Baseline {
    /// Figure name → value.
    pub figures: BTreeMap<String, Value>,
    /// The machine the baseline was recorded on (`simd_level`, `sketch_kernel`), if the file says.
    pub machine: Option<Value>,
}

/// Ratios whose value depends on the SIMD level (a kernel against its scalar or portable twin, or a sketch
/// path against GEMM): on a machine of another SIMD level than the baseline's they are judged against these
/// fixed floors — each well above what a lost dispatch or a missing filter gives (≈ 1) — instead of the
/// baseline's value.
pub const CROSS_MACHINE_FLOORS: &[(&str, f64)] = &[
    ("ratio.simd_dot_f32_512", 1.3),
    ("ratio.sketch_filter_dispatch", 2.0),
    ("ratio.sketch_filter_vs_stream_read", 0.5),
    ("ratio.ivf_sketch_vs_gemm_join", 2.0),
];

/// Relative tolerance of exact numeric figures on a machine of another SIMD level than the baseline's: GEMM and
/// dot kernels round differently there, so a sketch bit or a pair exactly at a threshold may flip.
pub const CROSS_MACHINE_TOLERANCE: f64 = 1e-3;

/// True iff `baseline` was recorded on a machine with the SIMD levels of `machine` (or does not say).
pub fn same_machine(baseline: &Baseline, machine: &Value) -> bool {
    let Some(b) = &baseline.machine else {
        return true;
    };
    ["simd_level", "sketch_kernel"]
        .iter()
        .all(|k| b.get(k) == machine.get(k))
}

/// [`compare`] for a run on a machine of another SIMD level than the baseline's: exact numeric figures within
/// [`CROSS_MACHINE_TOLERANCE`], SIMD-dependent ratios against [`CROSS_MACHINE_FLOORS`].
pub fn compare_cross_machine(baseline: &Baseline, figures: &[Figure]) -> Vec<Row> {
    let mut rows = compare(baseline, figures);
    let by_name: BTreeMap<&str, &Figure> = figures.iter().map(|f| (f.name.as_str(), f)).collect();
    for row in &mut rows {
        if !matches!(row.status, Status::Fail(_)) {
            continue;
        }
        let (Some(f), Some(base)) = (by_name.get(row.name.as_str()), &row.baseline) else {
            continue;
        };
        match f.gate {
            Gate::Exact => {
                if let (Some(x), Some(b)) = (f.value.as_f64(), base.as_f64())
                    && (x - b).abs() <= CROSS_MACHINE_TOLERANCE * b.abs().max(1.0)
                {
                    row.change = format!("{:+.4} % (other SIMD level)", (x / b - 1.0) * 100.0);
                    row.status = Status::Pass;
                }
            }
            Gate::Ratio { .. } => {
                if let (Some(&(_, floor)), Some(x)) = (
                    CROSS_MACHINE_FLOORS.iter().find(|(n, _)| *n == row.name),
                    f.value.as_f64(),
                ) {
                    row.status = if x >= floor {
                        Status::Pass
                    } else {
                        Status::Fail(format!(
                            "ratio {x} below {floor} (fixed floor: baseline from another SIMD level)"
                        ))
                    };
                    row.change = format!("floor {floor} (other SIMD level)");
                }
            }
            Gate::Recorded => {}
        }
    }
    rows
}

/// Parses a baseline file's text. Anything but `{"version": 1, "figures": {name: number|string|bool, ...}}`
/// with at least one figure is an error naming `path`.
pub fn parse_baseline(path: &Path, text: &str) -> Result<Baseline, GateError> {
    let bad = |problem: String| GateError::Baseline {
        path: path.to_path_buf(),
        problem,
    };
    let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    match v.get("version").and_then(Value::as_u64) {
        Some(1) => {}
        other => return Err(bad(format!("\"version\" must be 1, found {other:?}"))),
    }
    let figs = v
        .get("figures")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no \"figures\" object".into()))?;
    if figs.is_empty() {
        return Err(bad("\"figures\" is empty: nothing would be gated".into()));
    }
    let mut figures = BTreeMap::new();
    for (k, x) in figs {
        match x {
            Value::Number(_) | Value::String(_) | Value::Bool(_) | Value::Null => {
                figures.insert(k.clone(), x.clone());
            }
            _ => {
                return Err(bad(format!(
                    "figure {k:?}: expected a number, string or bool"
                )));
            }
        }
    }
    Ok(Baseline {
        figures,
        machine: v.get("machine").cloned(),
    })
}

/// Reads and parses the baseline at `path` (a missing file is an error naming it).
pub fn load_baseline(path: &Path) -> Result<Baseline, GateError> {
    parse_baseline(path, &read(path)?)
}

/// The baseline file's JSON for the gated figures of a run.
pub fn baseline_json(
    figures: &[Figure],
    machine: &Value,
    commit: Option<&str>,
    date: &str,
) -> Value {
    let figs: Map<String, Value> = figures
        .iter()
        .filter(|f| f.gate.is_gated())
        .map(|f| (f.name.clone(), f.value.clone()))
        .collect();
    json!({
        "version": 1,
        "about": "bench/ci.sh gates: exact figures must match, ratio figures may not fall more than their margin \
                  (bench/src/gate.rs) below these. Update with `bench/ci.sh --update-baseline` in the commit that \
                  changes them, with the reason in the commit message (README, Benchmarks in CI).",
        "written": date,
        "commit": commit,
        "machine": machine,
        "figures": figs,
    })
}

/// Outcome of one figure.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// Within its gate.
    Pass,
    /// Recorded only.
    Recorded,
    /// Outside its gate; the reason.
    Fail(String),
}

/// One row of the comparison table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Figure name.
    pub name: String,
    /// Gate kind name.
    pub gate: String,
    /// Baseline value, if any.
    pub baseline: Option<Value>,
    /// This run's value, if any.
    pub run: Option<Value>,
    /// The change, in words (`+3.1 %`, `=`, `changed`).
    pub change: String,
    /// Outcome.
    pub status: Status,
}

/// Compares a run's figures with the baseline. Every baseline figure must be in the run; every gated run
/// figure must be in the baseline (a new gated figure needs `--update-baseline`); exact figures must be equal;
/// ratios may not fall below `baseline × (1 − margin)`. Rows come out in name order, recorded figures last.
pub fn compare(baseline: &Baseline, figures: &[Figure]) -> Vec<Row> {
    let mut rows = Vec::new();
    let by_name: BTreeMap<&str, &Figure> = figures.iter().map(|f| (f.name.as_str(), f)).collect();
    for (name, base) in &baseline.figures {
        let Some(f) = by_name.get(name.as_str()) else {
            rows.push(Row {
                name: name.clone(),
                gate: "?".into(),
                baseline: Some(base.clone()),
                run: None,
                change: "missing".into(),
                status: Status::Fail("in the baseline, missing from this run".into()),
            });
            continue;
        };
        rows.push(judge(f, base));
    }
    for f in figures {
        if f.gate.is_gated() && !baseline.figures.contains_key(&f.name) {
            rows.push(Row {
                name: f.name.clone(),
                gate: f.gate.name().into(),
                baseline: None,
                run: Some(f.value.clone()),
                change: "new".into(),
                status: Status::Fail(
                    "not in the baseline (run --update-baseline if intended)".into(),
                ),
            });
        }
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    for f in figures.iter().filter(|f| !f.gate.is_gated()) {
        rows.push(Row {
            name: f.name.clone(),
            gate: f.gate.name().into(),
            baseline: None,
            run: Some(f.value.clone()),
            change: String::new(),
            status: Status::Recorded,
        });
    }
    rows
}

fn judge(f: &Figure, base: &Value) -> Row {
    let (change, status) = match f.gate {
        Gate::Exact => {
            if values_equal(&f.value, base) {
                ("=".to_string(), Status::Pass)
            } else {
                (
                    "changed".to_string(),
                    Status::Fail("exact figure differs from the baseline".into()),
                )
            }
        }
        Gate::Ratio { margin } => match (f.value.as_f64(), base.as_f64()) {
            (Some(r), Some(b)) if b > 0.0 && r.is_finite() => {
                let change = format!("{:+.1} %", (r / b - 1.0) * 100.0);
                let floor = b * (1.0 - margin);
                if r >= floor {
                    (change, Status::Pass)
                } else {
                    (
                        change,
                        Status::Fail(format!(
                            "ratio {r} below {floor:.4} (baseline {b} − {:.0} % margin)",
                            margin * 100.0
                        )),
                    )
                }
            }
            _ => (
                "?".to_string(),
                Status::Fail("ratio or its baseline is not a positive number".into()),
            ),
        },
        Gate::Recorded => (String::new(), Status::Recorded),
    };
    Row {
        name: f.name.clone(),
        gate: f.gate.name().into(),
        baseline: Some(base.clone()),
        run: Some(f.value.clone()),
        change,
        status,
    }
}

/// Equality of two JSON leaves; numbers compare as f64 when either is not an integer (`1` equals `1.0`).
fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

/// The rows that failed.
pub fn failures(rows: &[Row]) -> Vec<&Row> {
    rows.iter()
        .filter(|r| matches!(r.status, Status::Fail(_)))
        .collect()
}

/// A value for the table: long strings (the audit's evidence) are cut to 24 characters (`figures.json` and
/// the history hold them whole; the comparison uses the whole value).
fn show(v: &Option<Value>) -> String {
    let s = match v {
        None => "—".into(),
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
    };
    if s.chars().count() > 24 {
        let cut: String = s.chars().take(23).collect();
        format!("{cut}…")
    } else {
        s
    }
}

/// The comparison as a plain-text table: gated figures (failures marked `FAIL`), then recorded ones.
pub fn render_table(rows: &[Row]) -> String {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<w$}  {:<6}  {:>14}  {:>14}  {:>9}  result",
        "figure", "gate", "baseline", "run", "change"
    );
    for r in rows {
        let result = match &r.status {
            Status::Pass => "pass".to_string(),
            Status::Recorded => "recorded".to_string(),
            Status::Fail(why) => format!("FAIL: {why}"),
        };
        let _ = writeln!(
            s,
            "{:<w$}  {:<6}  {:>14}  {:>14}  {:>9}  {result}",
            r.name,
            r.gate,
            show(&r.baseline),
            show(&r.run),
            r.change
        );
    }
    s
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (UTC).
pub fn iso_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fig(name: &str, value: Value, gate: Gate) -> Figure {
        Figure {
            name: name.into(),
            value,
            gate,
        }
    }

    fn base(pairs: &[(&str, Value)]) -> Baseline {
        Baseline {
            figures: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            machine: None,
        }
    }

    #[test]
    fn equal_exact_and_ratio_within_margin_pass() {
        let b = base(&[("a", json!(42)), ("r", json!(2.0)), ("s", json!("haswell"))]);
        let run = [
            fig("a", json!(42), Gate::Exact),
            fig("r", json!(1.5), Gate::Ratio { margin: 0.3 }),
            fig("s", json!("haswell"), Gate::Exact),
            fig("t", json!(9.9), Gate::Recorded),
        ];
        let rows = compare(&b, &run);
        assert!(failures(&rows).is_empty(), "{rows:?}");
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[3].status, Status::Recorded);
        assert_eq!(rows[1].change, "-25.0 %");
    }

    #[test]
    fn exact_mismatch_fails_naming_the_figure() {
        let b = base(&[("scale.dedup.hits", json!(846))]);
        let rows = compare(&b, &[fig("scale.dedup.hits", json!(845), Gate::Exact)]);
        let f = failures(&rows);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].name, "scale.dedup.hits");
        assert!(render_table(&rows).contains("FAIL: exact figure differs"));
        // A string figure too (the plan a modality chose).
        let b = base(&[("p", json!("ivf"))]);
        assert_eq!(
            failures(&compare(&b, &[fig("p", json!("exact"), Gate::Exact)])).len(),
            1
        );
        // 1 and 1.0 are the same number.
        let b = base(&[("x", json!(1.0))]);
        assert!(failures(&compare(&b, &[fig("x", json!(1), Gate::Exact)])).is_empty());
    }

    #[test]
    fn ratio_below_margin_fails_and_above_passes() {
        let b = base(&[("r", json!(2.0))]);
        let m = Gate::Ratio { margin: 0.3 };
        // Floor 1.4: 1.39 fails, 1.41 passes, a large gain passes.
        assert_eq!(failures(&compare(&b, &[fig("r", json!(1.39), m)])).len(), 1);
        assert!(failures(&compare(&b, &[fig("r", json!(1.41), m)])).is_empty());
        assert!(failures(&compare(&b, &[fig("r", json!(9.0), m)])).is_empty());
        // A broken SIMD dispatch (ratio ≈ 1 against a baseline of 2) fails.
        let rows = compare(&b, &[fig("r", json!(1.02), m)]);
        assert!(matches!(&rows[0].status, Status::Fail(w) if w.contains("below 1.4000")));
        // A non-numeric ratio fails rather than passing.
        assert_eq!(failures(&compare(&b, &[fig("r", json!("x"), m)])).len(), 1);
    }

    #[test]
    fn missing_and_new_figures_fail() {
        let b = base(&[("gone", json!(1)), ("kept", json!(2))]);
        let rows = compare(
            &b,
            &[
                fig("kept", json!(2), Gate::Exact),
                fig("fresh", json!(3), Gate::Exact),
            ],
        );
        let f = failures(&rows);
        let names: Vec<&str> = f.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["fresh", "gone"]);
        assert!(matches!(&f[1].status, Status::Fail(w) if w.contains("missing from this run")));
        // A run with no figures at all fails every baseline figure.
        assert_eq!(failures(&compare(&b, &[])).len(), 2);
    }

    #[test]
    fn malformed_baselines_are_errors_naming_the_file() {
        let p = Path::new("bench/baseline.json");
        for (text, what) in [
            ("", "not JSON"),
            ("{\"version\": 1, \"figures\": {\"a\": 1", "not JSON"),
            ("[1, 2]", "\"version\" must be 1"),
            (
                "{\"version\": 2, \"figures\": {\"a\": 1}}",
                "\"version\" must be 1",
            ),
            ("{\"version\": 1}", "no \"figures\" object"),
            ("{\"version\": 1, \"figures\": {}}", "is empty"),
            (
                "{\"version\": 1, \"figures\": {\"a\": [1]}}",
                "expected a number",
            ),
        ] {
            let e = parse_baseline(p, text).unwrap_err().to_string();
            assert!(e.starts_with("baseline bench/baseline.json: "), "{e}");
            assert!(e.contains(what), "{text:?} → {e}");
        }
        let e = load_baseline(Path::new("/nonexistent/baseline.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/baseline.json"), "{e}");
        let ok =
            parse_baseline(p, "{\"version\": 1, \"figures\": {\"a\": 1, \"b\": \"x\"}}").unwrap();
        assert_eq!(ok.figures.len(), 2);
    }

    #[test]
    fn baseline_round_trips_the_gated_figures() {
        let run = [
            fig("a", json!(7), Gate::Exact),
            fig("r", json!(1.25), Gate::Ratio { margin: 0.3 }),
            fig("t", json!(3.5), Gate::Recorded),
        ];
        let text = baseline_json(&run, &json!({"cores": 2}), Some("abc"), "2026-11-29").to_string();
        let b = parse_baseline(Path::new("b.json"), &text).unwrap();
        assert_eq!(b.figures.len(), 2);
        assert!(failures(&compare(&b, &run)).is_empty());
    }

    #[test]
    fn ratios_come_from_the_named_medians() {
        let mut m = BTreeMap::new();
        m.insert("dot_512/f32_scalar".to_string(), 150.0);
        m.insert("dot_512/f32".to_string(), 50.0);
        m.insert("stream/sum_1GiB".to_string(), 1.0e8);
        m.insert("sketch_filter_512bit/packed".to_string(), 1000.0);
        let f = criterion_figures(&m);
        let get = |n: &str| f.iter().find(|x| x.name == n).map(|x| x.value.clone());
        assert_eq!(get("ratio.simd_dot_f32_512"), Some(json!(3.0)));
        // 65 536 B / 1 µs = 65.5 GB/s against 1 GiB / 0.1 s = 10.7 GB/s.
        assert_eq!(
            get("ratio.sketch_filter_vs_stream_read"),
            Some(json!(6.104))
        );
        // A ratio whose bench did not run is absent (and so fails as missing against a baseline).
        assert_eq!(get("ratio.threshold_join_vs_gemm"), None);
        assert_eq!(get("criterion.dot_512/f32.median_ns"), Some(json!(50.0)));
    }

    #[test]
    fn scale_line_flattens_counters_and_skips_timings() {
        let line = json!({
            "records": 100, "threads": 2, "stages": [["dedup", 1.5]], "matching_seconds": 2.0,
            "dedup": {"hits": 5, "candidate_seconds": 0.3, "candidate_cosines": [["face", 0.56]],
                      "join_stats": [["face", {"products": 10, "above": 2}]],
                      "plans": [{"modality": "face", "path": "brute", "seconds": 0.1, "predicted_seconds": [["ivf", 1.0]]}],
                      "audit": {"contract": {"pairs": 3, "found": 3}, "missed": [1, 2], "seconds": 0.5}},
        });
        let f = scale_figures("scale.x", &line);
        let exact: BTreeMap<&str, &Value> = f
            .iter()
            .filter(|x| x.gate == Gate::Exact)
            .map(|x| (x.name.as_str(), &x.value))
            .collect();
        let names: Vec<&str> = exact.keys().copied().collect();
        assert_eq!(
            names,
            [
                "scale.x.dedup.audit.contract.found",
                "scale.x.dedup.audit.contract.pairs",
                "scale.x.dedup.audit.missed.len",
                "scale.x.dedup.candidate_cosines.face",
                "scale.x.dedup.hits",
                "scale.x.dedup.join_stats.face.above",
                "scale.x.dedup.join_stats.face.products",
                "scale.x.dedup.plans.face.path",
                "scale.x.records",
            ]
        );
        let recorded: Vec<&str> = f
            .iter()
            .filter(|x| x.gate == Gate::Recorded)
            .map(|x| x.name.as_str())
            .collect();
        assert_eq!(
            recorded,
            [
                "scale.x.stages.dedup_seconds",
                "scale.x.matching_seconds",
                "scale.x.threads"
            ]
        );
    }

    #[test]
    fn criterion_dir_reads_new_medians_and_rejects_broken_estimates() {
        let d = tempfile::tempdir().unwrap();
        let new = d.path().join("dot_512/f32/new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("benchmark.json"), r#"{"full_id": "dot_512/f32"}"#).unwrap();
        std::fs::write(
            new.join("estimates.json"),
            r#"{"median": {"point_estimate": 61.5}}"#,
        )
        .unwrap();
        // A stale `base` copy is ignored.
        let old = d.path().join("dot_512/f32/base");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("benchmark.json"), r#"{"full_id": "stale"}"#).unwrap();
        let m = criterion_medians(d.path()).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m["dot_512/f32"], 61.5);
        std::fs::write(new.join("estimates.json"), r#"{"median": {}}"#).unwrap();
        let e = criterion_medians(d.path()).unwrap_err().to_string();
        assert!(e.contains("estimates.json") && e.contains("median"), "{e}");
    }

    #[test]
    fn committed_baseline_parses_and_gates_every_ratio_and_the_scale_run() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("baseline.json");
        let b = load_baseline(&p).unwrap();
        for (name, ..) in RATIOS {
            let v = b.figures.get(*name).and_then(Value::as_f64);
            assert!(v.is_some_and(|v| v > 0.0), "{name} missing from {p:?}");
        }
        for name in [
            "machine.simd_dispatched",
            "scale.face100k.dedup.hits",
            "scale.face100k.dedup.candidate_pairs",
            "scale.face100k.dedup.audit.passed",
            "scale.face100k.dedup.plans.face.path",
            "scale.face100k.planted.planted_recall",
        ] {
            assert!(b.figures.contains_key(name), "{name} missing from {p:?}");
        }
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_utc(1_795_975_200), "2026-11-29T18:00:00Z");
    }
}

#[cfg(test)]
mod cross_machine_tests {
    use super::*;

    #[test]
    fn another_simd_level_tolerates_rounding_and_judges_dispatch_by_floors() {
        let text = r#"{"version": 1, "machine": {"simd_level": "genoa", "sketch_kernel": "avx512"},
            "figures": {"scale.x.hits": 1000000, "ratio.sketch_filter_dispatch": 19.6,
                        "ratio.threshold_join_vs_gemm": 0.98}}"#;
        let b = parse_baseline(Path::new("b.json"), text).unwrap();
        let here = json!({"simd_level": "haswell", "sketch_kernel": "avx2"});
        assert!(!same_machine(&b, &here));
        assert!(same_machine(
            &b,
            &json!({"simd_level": "genoa", "sketch_kernel": "avx512"})
        ));
        let run = |hits: u64, dispatch: f64| {
            vec![
                Figure {
                    name: "scale.x.hits".into(),
                    value: json!(hits),
                    gate: Gate::Exact,
                },
                Figure {
                    name: "ratio.sketch_filter_dispatch".into(),
                    value: json!(dispatch),
                    gate: Gate::Ratio { margin: 0.35 },
                },
                Figure {
                    name: "ratio.threshold_join_vs_gemm".into(),
                    value: json!(0.97),
                    gate: Gate::Ratio { margin: 0.35 },
                },
            ]
        };
        // A flipped pair passes across machines, not on the baseline's own.
        assert!(failures(&compare_cross_machine(&b, &run(1_000_001, 4.0))).is_empty());
        assert_eq!(failures(&compare(&b, &run(1_000_001, 19.6))).len(), 1);
        // A real change in a counter, or a lost dispatch, still fails.
        let rows = compare_cross_machine(&b, &run(1_010_000, 4.0));
        let f = failures(&rows);
        assert_eq!(f.len(), 1, "{f:?}");
        let rows = compare_cross_machine(&b, &run(1_000_000, 1.0));
        let f = failures(&rows);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].name, "ratio.sketch_filter_dispatch");
    }
}
