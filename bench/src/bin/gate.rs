//! CI bench gate: reads a criterion output directory and scale-bench JSON lines, compares their figures with
//! `bench/baseline.json`, prints the comparison table, appends the run to `bench/history.jsonl`, and exits
//! non-zero naming every failed figure. Driven by `bench/ci.sh`; the comparison logic is `pacha_bench::gate`.
//!
//! ```text
//! gate --criterion target/ci-bench/criterion --scale face100k=target/ci-bench/scale-face100k.json
//! gate ... --update-baseline        # write the run's gated figures as the new baseline
//! ```
//! Exit codes: 0 every gate passed, 1 a gate failed (or a bench step failed / produced no figures), 2 usage
//! error or a missing or malformed baseline.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use clap::Parser;
use pacha_bench::gate::{
    CROSS_MACHINE_TOLERANCE, Figure, Gate, GateError, baseline_json, compare,
    compare_cross_machine, criterion_figures, criterion_medians, failures, iso_utc, load_baseline,
    render_table, same_machine, scale_figures,
};
use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Compare a bench run with the baseline.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Criterion output directory of this run (`CRITERION_HOME`).
    #[arg(long)]
    criterion: PathBuf,
    /// A scale-bench JSON output as `LABEL=FILE` (its figures are named `scale.LABEL.…`); repeatable.
    #[arg(long)]
    scale: Vec<String>,
    /// Baseline file.
    #[arg(long, default_value = "bench/baseline.json")]
    baseline: PathBuf,
    /// History file (one JSON line appended per run).
    #[arg(long, default_value = "bench/history.jsonl")]
    history: PathBuf,
    /// Do not append to the history.
    #[arg(long)]
    no_history: bool,
    /// Directory for this run's `figures.json` and `table.txt`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A bench step that exited non-zero (named by `bench/ci.sh`); it fails the gate. Repeatable.
    #[arg(long)]
    failed: Vec<String>,
    /// Write this run's gated figures as the new baseline (refused if a step failed).
    #[arg(long)]
    update_baseline: bool,
}

fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The last non-empty line of a scale-bench output, as JSON.
fn scale_line(path: &Path) -> Result<Value, GateError> {
    let text = std::fs::read_to_string(path).map_err(|source| GateError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| GateError::Input {
            path: path.to_path_buf(),
            problem: "empty: the scale bench printed no JSON line".into(),
        })?;
    let v: Value = serde_json::from_str(line).map_err(|e| GateError::Input {
        path: path.to_path_buf(),
        problem: format!("last line is not JSON: {e}"),
    })?;
    if v.get("bench").and_then(Value::as_str) != Some("scale") {
        return Err(GateError::Input {
            path: path.to_path_buf(),
            problem: "not a scale-bench line (no \"bench\": \"scale\")".into(),
        });
    }
    Ok(v)
}

fn main() -> ExitCode {
    let a = Args::parse();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let date = iso_utc(now);
    let commit = commit();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let simd = pacha_index::kernels::simd_level();
    let machine = json!({"simd_level": simd, "sketch_kernel": pacha_index::sketch::filter_kernel(), "cores": cores});

    // Problems with this run's outputs: each fails the gate (never a silent pass).
    let mut problems: Vec<String> = a
        .failed
        .iter()
        .map(|s| format!("bench step {s:?} exited non-zero (see its log above)"))
        .collect();
    let mut figures: Vec<Figure> = vec![
        // The levels themselves depend on the machine (recorded); that the kernels dispatch at all does not.
        Figure {
            name: "machine.simd_level".into(),
            value: json!(simd),
            gate: Gate::Recorded,
        },
        Figure {
            name: "machine.sketch_kernel".into(),
            value: json!(pacha_index::sketch::filter_kernel()),
            gate: Gate::Recorded,
        },
        Figure {
            name: "machine.simd_dispatched".into(),
            value: json!(simd != "scalar"),
            gate: Gate::Exact,
        },
        Figure {
            name: "machine.sketch_dispatched".into(),
            value: json!(pacha_index::sketch::filter_kernel() != "portable"),
            gate: Gate::Exact,
        },
        Figure {
            name: "machine.cores".into(),
            value: json!(cores),
            gate: Gate::Recorded,
        },
    ];
    match criterion_medians(&a.criterion) {
        Ok(m) if m.is_empty() => problems.push(format!(
            "{}: no criterion benchmark results",
            a.criterion.display()
        )),
        Ok(m) => figures.extend(criterion_figures(&m)),
        Err(e) => problems.push(e.to_string()),
    }
    for s in &a.scale {
        let Some((label, file)) = s.split_once('=') else {
            eprintln!("gate: --scale {s:?}: expected LABEL=FILE");
            return ExitCode::from(2);
        };
        match scale_line(Path::new(file)) {
            Ok(v) => figures.extend(scale_figures(&format!("scale.{label}"), &v)),
            Err(e) => problems.push(e.to_string()),
        }
    }

    let mut exit = 0u8;
    let rows = if a.update_baseline {
        if !problems.is_empty() {
            for p in &problems {
                eprintln!("gate: {p}");
            }
            eprintln!(
                "gate: baseline NOT updated: this run is incomplete ({} problems above)",
                problems.len()
            );
            return ExitCode::from(1);
        }
        let text = baseline_json(&figures, &machine, commit.as_deref(), &date);
        let write = serde_json::to_string_pretty(&text)
            .map_err(std::io::Error::other)
            .and_then(|t| std::fs::write(&a.baseline, t + "\n"));
        if let Err(e) = write {
            eprintln!("gate: cannot write {}: {e}", a.baseline.display());
            return ExitCode::from(1);
        }
        eprintln!(
            "gate: wrote {} ({} gated figures)",
            a.baseline.display(),
            figures.iter().filter(|f| f.gate.is_gated()).count()
        );
        match load_baseline(&a.baseline) {
            Ok(b) => compare(&b, &figures),
            Err(e) => {
                eprintln!("gate: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        match load_baseline(&a.baseline) {
            Ok(b) if same_machine(&b, &machine) => compare(&b, &figures),
            Ok(b) => {
                eprintln!(
                    "gate: the baseline was recorded on {} / {}, this machine is {simd} / {}: exact counters are \
                     compared within {CROSS_MACHINE_TOLERANCE:e} and SIMD-dependent ratios against fixed floors \
                     (record a baseline here with `bench/ci.sh --update-baseline` for exact gates)",
                    b.machine
                        .as_ref()
                        .and_then(|m| m.get("simd_level"))
                        .unwrap_or(&Value::Null),
                    b.machine
                        .as_ref()
                        .and_then(|m| m.get("sketch_kernel"))
                        .unwrap_or(&Value::Null),
                    pacha_index::sketch::filter_kernel()
                );
                compare_cross_machine(&b, &figures)
            }
            Err(e) => {
                problems.push(e.to_string());
                exit = 2;
                Vec::new()
            }
        }
    };

    let table = render_table(&rows);
    println!("{table}");
    let failed = failures(&rows);
    let passed = failed.is_empty() && problems.is_empty();

    let all: Map<String, Value> = figures
        .iter()
        .map(|f| (f.name.clone(), f.value.clone()))
        .collect();
    let record = json!({
        "commit": commit, "date": date, "simd_level": simd, "cores": cores, "machine": machine,
        "passed": passed, "failed": failed.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
        "problems": problems, "figures": all,
    });
    if let Some(dir) = &a.out {
        let res = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(dir.join("figures.json"), format!("{record:#}\n")))
            .and_then(|()| std::fs::write(dir.join("table.txt"), &table));
        if let Err(e) = res {
            eprintln!("gate: cannot write {}: {e}", dir.display());
            exit = exit.max(1);
        }
    }
    if !a.no_history {
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.history)
            .and_then(|mut f| writeln!(f, "{record}"));
        if let Err(e) = res {
            eprintln!("gate: cannot append to {}: {e}", a.history.display());
            exit = exit.max(1);
        }
    }

    for p in &problems {
        eprintln!("gate: FAIL: {p}");
    }
    for r in &failed {
        eprintln!("gate: FAIL: {}", r.name);
    }
    if passed {
        eprintln!(
            "gate: all {} gated figures within their gates",
            rows.iter().filter(|r| r.gate != "record").count()
        );
    } else {
        eprintln!(
            "gate: {} figure(s) failed, {} problem(s)",
            failed.len(),
            problems.len()
        );
        exit = exit.max(1);
    }
    ExitCode::from(exit)
}
