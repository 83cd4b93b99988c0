//! Tiled dedup on a real scheduler: `deploy/slurm/submit.sh` submits a job array of tiles and a merge job
//! with `--dependency=afterok` to a Slurm cluster (`.ci/run` starts a one-node cluster on localhost with
//! `deploy/slurm/local-cluster.sh`). The merged run must equal a single-process run byte for byte; with one
//! array task cancelled, the merge job never runs, `pacha merge` refuses, and resubmitting the task
//! completes the run with the same bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use pacha_engine::Modality;
use pacha_engine::engine::CalibrateOptions;
use pacha_tests::{assert_same_run, cannot_run, config, load, pacha_bin, path_arg as s, run_pacha};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TILES: usize = 4;

/// True iff a Slurm controller answers and has a usable node.
fn slurm_up() -> bool {
    Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| ["idle", "mixed", "allocated"].contains(&l.trim()))
        })
}

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("slurm")
}

/// Runs a command and returns its stdout, asserting success.
fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run command");
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The state of job `id` (`scontrol show job`), e.g. `COMPLETED`, `PENDING`, `CANCELLED`.
fn job_states(id: &str) -> Vec<String> {
    let o = Command::new("scontrol")
        .args(["show", "job", id])
        .output()
        .expect("scontrol");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("JobState="))
        .map(str::to_string)
        .collect()
}

/// Waits until no task of job `id` is pending or running; returns the final states.
fn wait_done(id: &str) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let st = job_states(id);
        if !st.is_empty()
            && st
                .iter()
                .all(|s| !["PENDING", "RUNNING", "CONFIGURING", "COMPLETING"].contains(&s.as_str()))
        {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(900),
            "job {id} still not done after 15 minutes: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Submits the tiled run of `store` into `run` (held when `hold`); returns (array job, merge job).
fn submit(store: &Path, run: &Path, hold: bool) -> (String, String) {
    let mut cmd = Command::new(deploy().join("submit.sh"));
    cmd.args([s(store), s(run), &TILES.to_string(), "--mode", "index"])
        .env("PACHA", pacha_bin());
    if hold {
        cmd.env("SBATCH_HOLD", "1");
    }
    let out = sh(&mut cmd);
    let ids: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(ids.len(), 2, "submit.sh printed {out:?}");
    (ids[0].to_string(), ids[1].to_string())
}

#[test]
fn slurm_array_tiles_merge_to_the_single_process_run_and_a_cancelled_task_blocks_the_merge() {
    if !slurm_up() {
        cannot_run(
            "no Slurm cluster answers `sinfo` (start one with `deploy/slurm/local-cluster.sh start`)",
        );
        return;
    }
    // The scheduler's tasks run as separate processes on this machine: keep everything under one
    // directory they can all read.
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    {
        let pop = load(&store, &config(30_000, 41), Some(&[Modality::Face]));
        pop.engine.calibrate(&CalibrateOptions::default()).unwrap();
        pop.engine.build_index(&Default::default(), None).unwrap();
    }
    let single = dir.path().join("single");
    let out = run_pacha(&[
        "-q",
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&single),
        "--mode",
        "index",
    ]);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 1. The array and the dependent merge job.
    let run = dir.path().join("run");
    let (array, merge) = submit(&store, &run, false);
    let st = wait_done(&array);
    assert!(st.iter().all(|s| s == "COMPLETED"), "array tasks: {st:?}");
    let st = wait_done(&merge);
    assert_eq!(st, vec!["COMPLETED"], "merge job");
    assert_same_run(&single, &run.join("merged"));

    // 2. One task cancelled (submitted held, so it is cancelled before it can start).
    let run2 = dir.path().join("run2");
    let (array, merge) = submit(&store, &run2, true);
    sh(Command::new("scancel").arg(format!("{array}_2")));
    sh(Command::new("scontrol").args(["release", &array]));
    sh(Command::new("scontrol").args(["release", &merge]));
    // The cancelled task is listed as CANCELLED, or (cancelled while still part of the pending array
    // record) not at all; the other three complete.
    let st = wait_done(&array);
    assert_eq!(
        st.iter().filter(|s| s.as_str() == "COMPLETED").count(),
        TILES - 1,
        "array tasks: {st:?}"
    );
    assert!(
        st.iter().all(|s| s == "COMPLETED" || s == "CANCELLED"),
        "array tasks: {st:?}"
    );
    assert!(!run2.join("tiles").join("2").join("manifest.json").exists());
    // The merge job's dependency can never be met: Slurm cancels it (--kill-on-invalid-dep).
    let st = wait_done(&merge);
    assert_eq!(st, vec!["CANCELLED"], "merge job");
    assert!(!run2.join("merged").exists());
    let tiles: Vec<String> = (0..TILES)
        .map(|i| s(&run2.join("tiles").join(i.to_string())).to_string())
        .collect();
    let merged = run2.join("merged");
    let mut args = vec!["merge", "--out", s(&merged)];
    args.extend(tiles.iter().map(String::as_str));
    let r = run_pacha(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("tiles/2") && err.contains("did not finish"),
        "{err}"
    );
    assert!(
        !merged.exists(),
        "a refused merge wrote {}",
        merged.display()
    );

    // Resubmitted, the task completes and the tiles merge to the same bytes.
    let again = sh(Command::new("sbatch")
        .args([
            "--parsable",
            "--array=2",
            &format!("--chdir={}", s(&run2.join("logs"))),
            "--export=ALL",
            s(&deploy().join("tiles.sbatch")),
        ])
        .env("PACHA", pacha_bin())
        .env("PACHA_STORE", &store)
        .env("PACHA_RUN", &run2)
        .env("PACHA_TILES", TILES.to_string())
        .env("PACHA_DEDUP_ARGS", "--mode index"));
    let st = wait_done(again.split(';').next().unwrap_or(&again));
    assert_eq!(st, vec!["COMPLETED"], "resubmitted task");
    let r = run_pacha(&args);
    assert!(
        matches!(r.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_same_run(&single, &merged);
}
