//! Tiled dedup runs: `pacha dedup --tile I/N` in separate processes (in sequence, under `xargs -P`, with
//! different thread counts), `pacha merge`, and what the merge guarantees: the merged run's files are byte
//! for byte those of a single-process run (summary timings aside), and a missing, duplicated, foreign or
//! damaged tile is refused by name with nothing written.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use pacha_engine::candidates::CandidateMode;
use pacha_engine::dedup::{DedupOptions, TileSpec};
use pacha_engine::engine::CalibrateOptions;
use pacha_engine::{Engine, Modality};
use pacha_tests::{assert_same_run, config, load, pacha_bin, path_arg as s, run_pacha};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// A calibrated, indexed store of `records` (face + right index finger) in `dir`.
fn store(dir: &Path, records: u64, seed: u64) -> PathBuf {
    let p = dir.to_path_buf();
    let pop = load(
        &p,
        &config(records, seed),
        Some(&[Modality::Face, Modality::Finger(2)]),
    );
    pop.engine.calibrate(&CalibrateOptions::default()).unwrap();
    pop.engine.build_index(&Default::default(), None).unwrap();
    p
}

/// Runs `pacha args` and asserts success.
fn ok(args: &[&str]) {
    let out = run_pacha(args);
    assert!(
        out.status.success(),
        "pacha {args:?} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `dedup` arguments of the runs compared here (index mode, pairs down to a floor under the threshold).
fn dedup_args<'a>(store: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "-q",
        "dedup",
        "--store",
        s(store),
        "--out",
        s(out),
        "--mode",
        "index",
        "--floor",
        "35",
    ];
    v.extend_from_slice(extra);
    v
}

/// Runs the `n` tiles of a run with `extra` flags into `tiles/0..n`, `parallel` at a time under `xargs -P`,
/// with `threads` rayon threads each.
fn run_tiles(store: &Path, tiles: &Path, n: usize, parallel: usize, threads: usize, extra: &str) {
    let script = format!(
        "seq 0 {last} | xargs -P {parallel} -I{{}} {bin} -q dedup --store {store} --out {tiles}/{{}} \
         --mode index --floor 35 --tile {{}}/{n} {extra}",
        last = n - 1,
        bin = pacha_bin().display(),
        store = store.display(),
        tiles = tiles.display(),
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tile_dirs(tiles: &Path, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| s(&tiles.join(i.to_string())).to_string())
        .collect()
}

#[test]
fn tiles_merge_to_the_single_process_run_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(&dir.path().join("store"), 8000, 11);
    // The planner's own path, and the partition forced (its audit rests on boundary and synthetic pairs).
    for (name, extra) in [("plan", ""), ("ivf", "--force-path ivf")] {
        let single = dir.path().join(format!("single-{name}"));
        let mut args = dedup_args(&st, &single, &[]);
        if !extra.is_empty() {
            args.extend(extra.split(' '));
        }
        let out = run_pacha(&args);
        // Exit 3 (audit not proven) still writes the run; the merged run must say the same.
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (n, parallel, threads) in [(4, 2, 1), (3, 1, 2)] {
            let tiles = dir.path().join(format!("tiles-{name}-{n}"));
            run_tiles(&st, &tiles, n, parallel, threads, extra);
            let merged = dir.path().join(format!("merged-{name}-{n}"));
            let mut args = vec!["-q", "merge", "--out", s(&merged)];
            let dirs = tile_dirs(&tiles, n);
            // Tiles in any order.
            args.extend(dirs.iter().rev().map(String::as_str));
            let m = run_pacha(&args);
            assert_eq!(
                m.status.code(),
                out.status.code(),
                "merge exit code differs from the single run's: {}",
                String::from_utf8_lossy(&m.stderr)
            );
            assert_same_run(&single, &merged);
            let manifest: Value =
                serde_json::from_slice(&std::fs::read(merged.join("manifest.json")).unwrap())
                    .unwrap();
            assert_eq!(manifest["kind"], "run");
            assert_eq!(manifest["sources"].as_array().unwrap().len(), n);
            assert_eq!(manifest["files"].as_array().unwrap().len(), 4);
        }
        // The single run's summary has pairs, so the comparison compared something.
        let v: Value =
            serde_json::from_slice(&std::fs::read(single.join("summary.json")).unwrap()).unwrap();
        assert!(v["summary"]["hits"].as_u64().unwrap() > 10, "{v}");
        assert!(v["summary"]["audit"]["sampled_probes"].as_u64().unwrap() > 0);
    }
}

/// Runs `pacha merge` over `tiles` into `out` and asserts that it is refused with exit 2, a message
/// containing `expect`, and nothing written.
fn refused(out: &Path, tiles: &[String], expect: &str) {
    let mut args = vec!["merge", "--out", s(out)];
    args.extend(tiles.iter().map(String::as_str));
    let r = run_pacha(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "merge {tiles:?}: {err}");
    assert!(
        err.contains(expect),
        "merge {tiles:?}: expected {expect:?} in: {err}"
    );
    assert!(!out.exists(), "a refused merge wrote {}", out.display());
}

#[test]
fn merge_refuses_missing_duplicated_foreign_or_damaged_tiles() {
    let dir = tempfile::tempdir().unwrap();
    let a = store(&dir.path().join("a"), 6000, 21);
    let b = store(&dir.path().join("b"), 6000, 22);
    let tiles = dir.path().join("tiles");
    run_tiles(&a, &tiles, 3, 1, 2, "");
    let t = tile_dirs(&tiles, 3);
    let out = dir.path().join("merged");
    let other = |name: &str, st: &Path, extra: &[&str]| -> String {
        let d = dir.path().join(name);
        let mut args = dedup_args(st, &d, &["--tile"]);
        args.extend_from_slice(extra);
        ok(&args);
        s(&d).to_string()
    };

    refused(&out, &t[..2], "tile(s) [2] of 3 missing");
    refused(
        &out,
        &[t[0].clone(), t[1].clone(), t[1].clone(), t[2].clone()],
        "given twice",
    );
    let copy = dir.path().join("copy-of-1");
    std::fs::create_dir(&copy).unwrap();
    for f in ["manifest.json", "part.json", "pairs.jsonl"] {
        std::fs::copy(tiles.join("1").join(f), copy.join(f)).unwrap();
    }
    refused(
        &out,
        &[t[0].clone(), t[1].clone(), s(&copy).into(), t[2].clone()],
        "given twice",
    );
    // Tile 2 of a run over another store, and with another threshold.
    let foreign = other("foreign", &b, &["2/3"]);
    refused(
        &out,
        &[t[0].clone(), t[1].clone(), foreign],
        "identity.store",
    );
    let fpir = other("fpir", &a, &["2/3", "--target-fpir", "1e-2"]);
    refused(
        &out,
        &[t[0].clone(), t[1].clone(), fpir],
        "parameters.target_fpir",
    );
    // Tile 2 of a four-tile run.
    let four = other("four", &a, &["2/4"]);
    refused(&out, &[t[0].clone(), t[1].clone(), four], "run of 4 tiles");

    // Damage, one file at a time, restored after each case.
    let damage = |file: &str, edit: &dyn Fn(&mut Vec<u8>), expect: &str| {
        let p = tiles.join("1").join(file);
        let orig = std::fs::read(&p).unwrap();
        let mut bytes = orig.clone();
        edit(&mut bytes);
        std::fs::write(&p, &bytes).unwrap();
        refused(&out, &t, expect);
        std::fs::write(&p, &orig).unwrap();
    };
    damage(
        "pairs.jsonl",
        &|b| {
            let n = b.len() / 2;
            b.truncate(n);
        },
        "is damaged",
    );
    damage("part.json", &|b| b.push(b' '), "is damaged");
    damage(
        "manifest.json",
        &|b| {
            let s = String::from_utf8(b.clone()).unwrap();
            let edited = s.replacen("\"threads\": ", "\"threads\": 9", 1);
            assert_ne!(s, edited);
            *b = edited.into_bytes();
        },
        "was altered",
    );
    let m = tiles.join("1").join("manifest.json");
    let orig = std::fs::read(&m).unwrap();
    std::fs::remove_file(&m).unwrap();
    refused(&out, &t, "did not finish");
    std::fs::write(&m, &orig).unwrap();

    // Restored, the tiles merge.
    let mut args = vec!["-q", "merge", "--out", s(&out)];
    args.extend(t.iter().map(String::as_str));
    let r = run_pacha(&args);
    assert!(
        matches!(r.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(out.join("hits.csv").exists());
}

#[test]
fn an_interrupted_tile_resumes_from_its_checkpoint_and_tiles_never_share_one() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(&dir.path().join("store"), 6000, 31);
    let e = Engine::open_read_only(&st).unwrap();
    let ck = dir.path().join("ck");
    let opts = |tile: usize, ck: Option<PathBuf>| DedupOptions {
        mode: CandidateMode::Exact,
        block_rows: 700,
        report_floor: Some(35.0),
        checkpoint_dir: ck,
        tile: Some(TileSpec::new(tile, 2).unwrap()),
        ..DedupOptions::default()
    };
    let whole = e.dedup_part(&opts(1, None), None, None).unwrap();
    assert!(!whole.pairs.is_empty());
    // Cancelled after its first block, then resumed.
    let cancel = AtomicBool::new(false);
    let stop = |_: pacha_engine::dedup::DedupProgress| cancel.store(true, Ordering::Relaxed);
    let err = e
        .dedup_part(&opts(1, Some(ck.clone())), Some(&stop), Some(&cancel))
        .unwrap_err();
    assert!(
        matches!(err, pacha_engine::EngineError::Cancelled { .. }),
        "{err}"
    );
    let resumed = e
        .dedup_part(&opts(1, Some(ck.clone())), None, None)
        .unwrap();
    assert!(resumed.tiles_resumed >= 1, "nothing was resumed");
    assert_eq!(resumed.pairs, whole.pairs);
    assert_eq!(resumed.candidate_pairs, whole.candidate_pairs);
    // Tile 0 in the same checkpoint directory reuses none of tile 1's blocks.
    let t0 = e
        .dedup_part(&opts(0, Some(ck.clone())), None, None)
        .unwrap();
    assert_eq!(t0.tiles_resumed, 0);
    assert!(
        t0.pairs
            .iter()
            .all(|p| (p.row_b as usize) < whole.probe_rows.0)
    );
}
