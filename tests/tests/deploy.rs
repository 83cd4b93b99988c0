//! The deployment files of `deploy/`: the Kubernetes manifests have the structure a tiled run needs (no
//! cluster here to apply them), and the Slurm scripts parse (they run for real in `slurm.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use serde_json::Value;
use std::path::{Path, PathBuf};

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn manifest(rel: &str) -> Value {
    let p = deploy(rel);
    serde_json::from_slice(&std::fs::read(&p).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// The value of env var `name` of container `c`.
fn env<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name}"))
}

#[test]
fn kubernetes_tiles_job_is_indexed_and_each_pod_runs_its_own_tile() {
    let j = manifest("k8s/tiles-job.json");
    assert_eq!(j["apiVersion"], "batch/v1");
    assert_eq!(j["kind"], "Job");
    let spec = &j["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    let n = spec["completions"].as_u64().unwrap();
    assert!(n >= 2);
    assert_eq!(spec["parallelism"].as_u64(), Some(n));
    assert!(spec["backoffLimitPerIndex"].as_u64().unwrap() >= 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let c = &pod["containers"][0];
    let cmd = c["args"][0].as_str().unwrap();
    // The tile is the pod's completion index, of N = completions.
    assert!(
        cmd.contains("--tile $JOB_COMPLETION_INDEX/$(TILES)"),
        "{cmd}"
    );
    assert!(cmd.contains("tiles/$JOB_COMPLETION_INDEX"), "{cmd}");
    assert_eq!(env(c, "TILES")["value"].as_str().unwrap(), n.to_string());
    // Exit code 2 (bad input) fails the Job instead of being retried.
    let rules = spec["podFailurePolicy"]["rules"].as_array().unwrap();
    assert!(rules.iter().any(|r| {
        r["action"] == "FailJob"
            && r["onExitCodes"]["values"]
                .as_array()
                .unwrap()
                .contains(&Value::from(2))
    }));
    // The store is mounted read-only; the runs volume is shared with the merge Job.
    let mounts = c["volumeMounts"].as_array().unwrap();
    let store = mounts.iter().find(|m| m["mountPath"] == "/store").unwrap();
    assert_eq!(store["readOnly"], true);
    let vols = pod["volumes"].as_array().unwrap();
    let runs = vols.iter().find(|v| v["name"] == "runs").unwrap();
    let merge = manifest("k8s/merge-job.json");
    let mpod = &merge["spec"]["template"]["spec"];
    let mruns = mpod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "runs")
        .unwrap();
    assert_eq!(
        runs["persistentVolumeClaim"]["claimName"],
        mruns["persistentVolumeClaim"]["claimName"]
    );
    // The merge covers the same N tiles, from the same run directory.
    let mc = &mpod["containers"][0];
    assert_eq!(env(mc, "TILES")["value"], env(c, "TILES")["value"]);
    assert_eq!(env(mc, "RUN_NAME")["value"], env(c, "RUN_NAME")["value"]);
    let mcmd = mc["args"][0].as_str().unwrap();
    assert!(
        mcmd.contains("pacha merge --out /runs/$(RUN_NAME)/merged"),
        "{mcmd}"
    );
    assert!(mcmd.contains("/runs/$(RUN_NAME)/tiles/$i"), "{mcmd}");
}

#[test]
fn slurm_scripts_parse_and_requeue() {
    for f in [
        "slurm/tiles.sbatch",
        "slurm/merge.sbatch",
        "slurm/submit.sh",
        "slurm/local-cluster.sh",
    ] {
        let p = deploy(f);
        let o = std::process::Command::new("bash")
            .arg("-n")
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let tiles = std::fs::read_to_string(deploy("slurm/tiles.sbatch")).unwrap();
    assert!(tiles.contains("#SBATCH --requeue"));
    assert!(tiles.contains("--tile \"$i/$PACHA_TILES\""));
    let submit = std::fs::read_to_string(deploy("slurm/submit.sh")).unwrap();
    assert!(submit.contains("--dependency=\"afterok:$array\""));
}
