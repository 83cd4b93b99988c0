//! Every file pacha creates is mode 0600 and every directory 0700, even under `umask 000`: a generated
//! population, a store, its calibration, a dedup run with checkpoints, an evaluation and a report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pacha_tests::{pacha_bin, path_arg as s};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Runs `pacha args` under `umask 000` (through `sh`, so the test process's umask is untouched).
fn pacha_umask0(args: &[&str]) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(pacha_bin())
        .args(args)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "pacha {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every path under `root`, `root` included.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if out[i].is_dir() {
            let mut kids: Vec<PathBuf> = std::fs::read_dir(&out[i])
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            kids.sort();
            out.extend(kids);
        }
        i += 1;
    }
    out
}

#[test]
fn everything_pacha_creates_is_private_under_umask_000() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (pop, store, run, ckpt) = (
        t.join("pop"),
        t.join("store"),
        t.join("out/run"),
        t.join("out/ckpt"),
    );
    pacha_umask0(&["generate", "--out", s(&pop), "--records", "300"]);
    pacha_umask0(&[
        "ingest",
        "--store",
        s(&store),
        "--face",
        s(&pop.join("face.npy")),
        "--finger",
        &format!("2={}", s(&pop.join("finger2.npy"))),
        "--subjects",
        s(&pop.join("subjects.csv")),
    ]);
    pacha_umask0(&["index", "--store", s(&store)]);
    pacha_umask0(&[
        "calibrate",
        "--store",
        s(&store),
        "--truth",
        s(&pop.join("truth.csv")),
    ]);
    pacha_umask0(&[
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&run),
        "--checkpoint",
        s(&ckpt),
        "--mode",
        "exact",
    ]);
    pacha_umask0(&[
        "eval",
        "--store",
        s(&store),
        "--run",
        s(&run),
        "--truth",
        s(&pop.join("truth.csv")),
    ]);
    // A tile of a split run and the merge of a one-tile run.
    let tile = t.join("out/tiles/0");
    pacha_umask0(&[
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&tile),
        "--mode",
        "exact",
        "--tile",
        "0/1",
    ]);
    pacha_umask0(&["merge", "--out", s(&t.join("out/merged")), s(&tile)]);
    let report = t.join("out/report.html");
    pacha_umask0(&[
        "report",
        "--eval",
        s(&run.join("eval.json")),
        "--out",
        s(&report),
    ]);
    let mut checked = 0;
    let mut bad = Vec::new();
    for root in [&pop, &store, &t.join("out")] {
        for p in walk(root) {
            let md = std::fs::symlink_metadata(&p).unwrap();
            let mode = md.permissions().mode() & 0o7777;
            // `out/` is the parent the test named; pacha created it for the run (mkdir -p), so it counts.
            let want = if md.is_dir() { 0o700 } else { 0o600 };
            if mode != want {
                bad.push(format!("{} is {mode:o}, want {want:o}", p.display()));
            }
            checked += 1;
        }
    }
    assert!(bad.is_empty(), "not private:\n{}", bad.join("\n"));
    for must in [
        pop.join("face.npy"),
        pop.join("population.json"),
        store.join("MANIFEST"),
        store.join("LOCK"),
        store.join("APPEND"),
        store.join("face.g0.f32"),
        run.join("hits.csv"),
        run.join("manifest.json"),
        tile.join("pairs.jsonl"),
        store.join("engine").join("index").join("face.ivf"),
        store.join("engine").join("index").join("face.sketch"),
        run.join("hits.jsonl"),
        run.join("clusters.csv"),
        run.join("summary.json"),
        run.join("eval.json"),
        report.clone(),
        ckpt.join("run.json"),
    ] {
        assert!(must.exists(), "{} was not written", must.display());
    }
    assert!(checked > 20, "{checked} paths checked");
}
