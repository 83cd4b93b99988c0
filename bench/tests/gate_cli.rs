//! The `gate` binary end to end on small fake inputs: a passing run, a regression, a missing or malformed
//! baseline, a failed bench step and an empty scale output each give the documented exit code and name the
//! figure or file.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

/// Writes a fake criterion result `id` with median `ns` under `dir`.
fn bench_result(dir: &Path, id: &str, ns: f64) {
    let d = dir.join(id.replace(' ', "_")).join("new");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("benchmark.json"),
        serde_json::json!({ "full_id": id }).to_string(),
    )
    .unwrap();
    std::fs::write(
        d.join("estimates.json"),
        serde_json::json!({"median": {"point_estimate": ns}}).to_string(),
    )
    .unwrap();
}

fn gate(dir: &Path, extra: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gate"));
    c.arg("--criterion")
        .arg(dir.join("criterion"))
        .arg("--scale")
        .arg(format!("s={}", dir.join("scale.json").display()))
        .arg("--baseline")
        .arg(dir.join("baseline.json"))
        .arg("--history")
        .arg(dir.join("history.jsonl"))
        .args(extra);
    c.output().unwrap()
}

fn setup(dir: &Path, simd_ns: f64) {
    let crit = dir.join("criterion");
    bench_result(&crit, "dot_512/f32_scalar", 120.0);
    bench_result(&crit, "dot_512/f32", simd_ns);
    std::fs::write(
        dir.join("scale.json"),
        r#"{"bench": "scale", "records": 1000, "dedup": {"hits": 7, "plans": [{"modality": "face", "path": "brute"}]}}"#,
    )
    .unwrap();
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn update_then_pass_then_regressions_fail() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    setup(d, 50.0);
    // No baseline yet: exit 2 naming the file.
    let o = gate(d, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("baseline.json"), "{}", stderr(&o));

    let o = gate(d, &["--update-baseline"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = gate(d, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        table.contains("ratio.simd_dot_f32_512") && table.contains("pass"),
        "{table}"
    );

    // Broken SIMD dispatch: the dot is as slow as the scalar reference.
    bench_result(&d.join("criterion"), "dot_512/f32", 118.0);
    let o = gate(d, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("FAIL: ratio.simd_dot_f32_512"),
        "{}",
        stderr(&o)
    );

    // A work counter changed.
    setup(d, 50.0);
    std::fs::write(
        d.join("scale.json"),
        r#"{"bench": "scale", "records": 1000, "dedup": {"hits": 8, "plans": [{"modality": "face", "path": "brute"}]}}"#,
    )
    .unwrap();
    let o = gate(d, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("FAIL: scale.s.dedup.hits"),
        "{}",
        stderr(&o)
    );

    // A bench that did not run: its ratio is missing from the run.
    setup(d, 50.0);
    std::fs::remove_dir_all(d.join("criterion/dot_512/f32")).unwrap();
    let o = gate(d, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("FAIL: ratio.simd_dot_f32_512"),
        "{}",
        stderr(&o)
    );

    // Every run appended one history line.
    let history = std::fs::read_to_string(d.join("history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 6);
    let last: serde_json::Value = serde_json::from_str(history.lines().last().unwrap()).unwrap();
    assert_eq!(last["passed"], false);
    assert!(last["figures"]["machine.simd_level"].is_string());
}

#[test]
fn failed_step_empty_scale_and_malformed_baseline_fail() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    setup(d, 50.0);
    assert_eq!(gate(d, &["--update-baseline"]).status.code(), Some(0));

    // A bench step that exited non-zero fails the gate even though every figure matches.
    let o = gate(d, &["--failed", "engine", "--no-history"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("\"engine\" exited non-zero"),
        "{}",
        stderr(&o)
    );
    // ... and the baseline is not updated from such a run.
    let o = gate(
        d,
        &["--failed", "engine", "--update-baseline", "--no-history"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("NOT updated"), "{}", stderr(&o));

    // The scale bench printed nothing (it panicked): named, failed.
    std::fs::write(d.join("scale.json"), "").unwrap();
    let o = gate(d, &["--no-history"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("scale.json: empty"), "{}", stderr(&o));

    // A truncated baseline: exit 2, naming the file.
    setup(d, 50.0);
    std::fs::write(d.join("baseline.json"), "{\"version\": 1, \"figures\": {").unwrap();
    let o = gate(d, &["--no-history"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("baseline.json: not JSON"),
        "{}",
        stderr(&o)
    );
}
