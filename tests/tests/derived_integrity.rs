//! Derived artefacts (the index under `engine/index/` and `engine/calibration.json`) carry checksums and the
//! identity of what they were built on: every flipped byte of every file under `engine/` is reported by
//! `check` and refused by dedup with the command that rebuilds it; `pacha index` / `pacha calibrate` rebuild
//! over the damage and everything works again; a deleted index file is detected; appends keep them valid; a
//! file from another store, or of the old unsealed format, is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use pacha_engine::dedup::{DedupOptions, DedupScope};
use pacha_engine::derived::ArtefactState;
use pacha_engine::engine::IdentifyOptions;
use pacha_engine::store::Template;
use pacha_engine::{Engine, EngineError, Modality, check_store_dir};
use pacha_tests::{json_of, ok_json, path_arg as s, run_pacha as run};
use std::path::{Path, PathBuf};

/// Records of the test population (face 64-d + finger 2 at 32-d).
const RECORDS: &str = "3000";

fn generate(pop: &Path, records: &str, seed: &str) {
    ok_json(&[
        "--json",
        "generate",
        "--out",
        s(pop),
        "--records",
        records,
        "--face-dim",
        "64",
        "--finger",
        "2:32",
        "--seed",
        seed,
    ]);
}

fn ingest(store: &Path, pop: &Path) {
    let f2 = format!("2={}", s(&pop.join("finger2.npy")));
    ok_json(&[
        "--json",
        "ingest",
        "--store",
        s(store),
        "--face",
        s(&pop.join("face.npy")),
        "--finger",
        &f2,
        "--subjects",
        s(&pop.join("subjects.csv")),
    ]);
}

/// A store of [`RECORDS`] enrolments, indexed and calibrated through the CLI.
fn build_store(dir: &Path, seed: &str) -> PathBuf {
    let (pop, store) = (dir.join("pop"), dir.join("store"));
    generate(&pop, RECORDS, seed);
    ingest(&store, &pop);
    ok_json(&["--json", "index", "--store", s(&store)]);
    ok_json(&[
        "--json",
        "calibrate",
        "--store",
        s(&store),
        "--pairs",
        "200000",
    ]);
    store
}

fn engine_files(store: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![store.join("engine")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn dedup_opts() -> DedupOptions {
    DedupOptions {
        scope: DedupScope::WholeStore,
        ..DedupOptions::default()
    }
}

/// Sorted (a, b) hits of a dedup of `store` (read-only engine).
fn hits(store: &Path) -> Vec<(String, String)> {
    let e = Engine::open_read_only(store).unwrap();
    let r = e.dedup(&dedup_opts(), None, None).unwrap();
    let mut h: Vec<_> = r.hits().map(|p| (p.a.clone(), p.b.clone())).collect();
    h.sort();
    h
}

/// Byte positions to flip in a file of `len` bytes: all of them for small files, else the first 128 (the
/// header), the last 128 and a seeded sample of 250 in between.
fn positions(len: usize, seed: u64) -> Vec<usize> {
    if len <= 8192 {
        return (0..len).collect();
    }
    let mut p: Vec<usize> = (0..128).chain(len - 128..len).collect();
    let mut x = seed;
    for _ in 0..250 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        p.push(128 + (x >> 33) as usize % (len - 256));
    }
    p.sort_unstable();
    p.dedup();
    p
}

fn is_derived_error(e: &EngineError, file: &Path, rebuild: &str) -> bool {
    let msg = e.to_string();
    matches!(e, EngineError::Derived { .. })
        && msg.contains(&file.display().to_string())
        && msg.contains(rebuild)
}

#[test]
fn every_flipped_byte_under_engine_is_detected_and_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let store = build_store(tmp.path(), "11");
    let files = engine_files(&store);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into())
        .collect();
    assert_eq!(
        names,
        [
            "calibration.json",
            "face.ivf",
            "face.sketch",
            "finger2.ivf",
            "finger2.sketch",
            "index.json"
        ],
        "{files:?}"
    );
    let clean = check_store_dir(&store).unwrap();
    assert!(clean.is_clean(), "{:?}", clean.problems());
    assert_eq!(clean.derived.index.state, ArtefactState::Ok);
    assert_eq!(clean.derived.calibration.state, ArtefactState::Ok);
    assert_eq!(clean.derived.files_checked, 6);
    // The sketch files: 1024-bit sketches of every indexed row (128 bytes each), a 64-byte header and a
    // crc32 trailer, private like the other derived files.
    for f in ["face.sketch", "finger2.sketch"] {
        let m = std::fs::metadata(store.join("engine/index").join(f)).unwrap();
        assert_eq!(m.len(), 64 + 3000 * 128 + 4, "{f}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let baseline = hits(&store);
    assert!(!baseline.is_empty(), "the population plants duplicates");

    // Flip bytes of every file, one at a time: check names the file, dedup (and identify) refuse with the
    // rebuild command. The byte is restored after each case.
    let probe = {
        let e = Engine::open_read_only(&store).unwrap();
        let snap = e.snapshot();
        vec![Template {
            modality: Modality::Face,
            vector: snap.template(Modality::Face, 7).unwrap().to_vec(),
            quality: 0.9,
        }]
    };
    let (mut flipped, mut undetected) = (0usize, 0usize);
    for (k, file) in files.iter().enumerate() {
        let original = std::fs::read(file).unwrap();
        let rebuild = if file.ends_with("calibration.json") {
            format!("pacha calibrate --store {}", store.display())
        } else {
            format!("pacha index --store {}", store.display())
        };
        let pos = positions(original.len(), 0x5eed + k as u64);
        for (i, &at) in pos.iter().enumerate() {
            let mut bytes = original.clone();
            bytes[at] ^= 1 << ((at + i) % 8);
            std::fs::write(file, &bytes).unwrap();
            flipped += 1;
            let report = check_store_dir(&store).unwrap();
            let named = report.derived.problems.iter().any(|p| p.file == *file);
            let engine = Engine::open_read_only(&store).unwrap();
            let dedup = engine.dedup(&dedup_opts(), None, None);
            let refused = match &dedup {
                Err(e) => is_derived_error(e, file.parent().unwrap(), &rebuild),
                Ok(_) => false,
            };
            // Identify on every 8th flip (it refuses through the same state as dedup).
            let identify_refused = i % 8 != 0
                || engine
                    .identify(&probe, &IdentifyOptions::default())
                    .is_err();
            if report.is_clean() || !named || !refused || !identify_refused {
                undetected += 1;
                eprintln!(
                    "{} byte {at} undetected: check clean {} named {named}, dedup {:?}, identify refused {identify_refused}",
                    file.display(),
                    report.is_clean(),
                    dedup.as_ref().err()
                );
            }
        }
        std::fs::write(file, &original).unwrap();
        eprintln!(
            "derived_integrity: {}: {} bytes, {} flipped",
            file.display(),
            original.len(),
            pos.len()
        );
    }
    eprintln!("derived_integrity: {flipped} bytes flipped, {undetected} undetected");
    assert!(flipped > 1500, "{flipped} flips");
    assert_eq!(undetected, 0, "{undetected} of {flipped} flips undetected");
    assert!(check_store_dir(&store).unwrap().is_clean());

    // A flipped byte in the middle of a sketch file alone: `pacha dedup` exits 2 naming the file and the
    // rebuild command, `pacha check` names it, and `pacha index` rebuilds it.
    let sketch = store.join("engine/index/finger2.sketch");
    let mut bytes = std::fs::read(&sketch).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x04;
    std::fs::write(&sketch, &bytes).unwrap();
    let out = run(&[
        "--json",
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&tmp.path().join("sketch-run")),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("finger2.sketch")
            && err.contains("checksum mismatch")
            && err.contains("rebuild it with `pacha index --store"),
        "{err}"
    );
    let out = run(&["--json", "check", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        json_of(&out)["problems"]
            .to_string()
            .contains("finger2.sketch")
    );
    ok_json(&["--json", "index", "--store", s(&store)]);
    assert!(check_store_dir(&store).unwrap().is_clean());
    assert_eq!(hits(&store), baseline);

    // Through the CLI: damage every file, then check exits 1, info shows both states, dedup exits 2 with the
    // rebuild commands; `pacha index` and `pacha calibrate` work over the damage; all is well again.
    for file in &files {
        let mut bytes = std::fs::read(file).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        std::fs::write(file, &bytes).unwrap();
    }
    let out = run(&["--json", "check", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    let j = json_of(&out);
    assert_eq!(j["ok"], false);
    assert_eq!(j["index"]["state"], "invalid", "{j}");
    assert_eq!(j["calibration"]["state"], "invalid", "{j}");
    let info = ok_json(&["--json", "info", "--store", s(&store)]);
    let detail = info["info"]["index_state"]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("corrupt (") && detail.contains("pacha index --store"),
        "{detail}"
    );
    let detail = info["info"]["calibration_state"]["detail"]
        .as_str()
        .unwrap();
    assert!(detail.contains("pacha calibrate --store"), "{detail}");
    let run_dir = tmp.path().join("run");
    let out = run(&[
        "--json",
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&run_dir),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rebuild it with `pacha calibrate --store"),
        "{err}"
    );
    ok_json(&[
        "--json",
        "calibrate",
        "--store",
        s(&store),
        "--pairs",
        "200000",
    ]);
    let out = run(&[
        "--json",
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&run_dir),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rebuild it with `pacha index --store"),
        "{err}"
    );
    ok_json(&["--json", "index", "--store", s(&store)]);
    let c = ok_json(&["--json", "check", "--store", s(&store)]);
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(
        hits(&store),
        baseline,
        "the rebuilt artefacts give the same hits"
    );
    let d = ok_json(&[
        "--json",
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&run_dir),
        "--mode",
        "index",
    ]);
    assert_eq!(
        d["summary"]["hits"].as_u64(),
        Some(baseline.len() as u64),
        "{d}"
    );

    // Delete each index file in turn: detected by check, refused by dedup when a listed file is missing,
    // and rebuilt by `pacha index`.
    for name in ["face.ivf", "finger2.sketch", "index.json"] {
        let f = store.join("engine/index").join(name);
        std::fs::remove_file(&f).unwrap();
        let out = run(&["--json", "check", "--store", s(&store)]);
        assert_eq!(out.status.code(), Some(1), "{name} deleted");
        let j = json_of(&out);
        assert!(
            j["problems"].to_string().contains("engine/index"),
            "{name}: {j}"
        );
        let e = Engine::open_read_only(&store).unwrap();
        if name == "index.json" {
            // An index directory without its index.json (an interrupted build) is no index to readers;
            // check reports the left-over files.
            assert_eq!(e.info().index_state.state, ArtefactState::Missing);
            assert!(j["problems"].to_string().contains("stray file"), "{j}");
        } else {
            let err = e.dedup(&dedup_opts(), None, None).err().unwrap();
            assert!(
                err.to_string().contains("listed in index.json but missing"),
                "{err}"
            );
            assert_eq!(e.info().index_state.state, ArtefactState::Invalid);
        }
        ok_json(&["--json", "index", "--store", s(&store)]);
        assert!(check_store_dir(&store).unwrap().is_clean());
    }

    // A deleted calibration: dedup fits impostor models from the store and says so; info and check report
    // the store as uncalibrated (a warning, not a failure).
    std::fs::remove_file(store.join("engine/calibration.json")).unwrap();
    let c = ok_json(&["--json", "check", "--store", s(&store)]);
    assert_eq!(c["calibration"]["state"], "missing", "{c}");
    assert!(c["warnings"].to_string().contains("uncalibrated"), "{c}");
    let info = ok_json(&["--json", "info", "--store", s(&store)]);
    assert!(
        info["info"]["calibration_state"]["detail"]
            .as_str()
            .unwrap()
            .contains("uncalibrated"),
        "{info}"
    );
    let d = ok_json(&[
        "--json",
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&run_dir),
    ]);
    assert!(
        d["summary"]["calibration_source"]
            .as_str()
            .unwrap()
            .contains("fitted from the store at match time"),
        "{d}"
    );
}

/// `pacha dedup --mode index --force-path brute` (every modality joined by sign sketch) of `store` with the
/// index's saved sketches and with `--recompute-sketches`: the same `hits.csv`, `hits.jsonl` and
/// `clusters.csv` bytes, and the summaries say where the sketches came from (`saved` rows read, `computed`
/// rows sketched by the run).
fn same_hits_with_and_without_saved_sketches(
    store: &Path,
    dir: &Path,
    tag: &str,
    saved: u64,
    computed: u64,
) {
    let run_with = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{tag}-{name}"));
        let mut args = vec![
            "--json",
            "dedup",
            "--store",
            s(store),
            "--out",
            s(&out),
            "--mode",
            "index",
            "--force-path",
            "brute",
        ];
        args.extend_from_slice(extra);
        (ok_json(&args), out)
    };
    let (a, out_a) = run_with("saved", &[]);
    let (b, out_b) = run_with("recomputed", &["--recompute-sketches"]);
    for (j, saved, computed) in [(&a, saved, computed), (&b, 0, saved + computed)] {
        let rows = j["summary"]["sketch_rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "{j}");
        for r in rows {
            assert_eq!(r["saved"].as_u64(), Some(saved), "{r}");
            assert_eq!(r["computed"].as_u64(), Some(computed), "{r}");
        }
        assert_eq!(j["summary"]["mode"], "Index+sketch", "{j}");
    }
    assert!(a["summary"]["hits"].as_u64().unwrap() > 0, "{a}");
    for f in ["hits.csv", "hits.jsonl", "clusters.csv"] {
        let (x, y) = (
            std::fs::read(out_a.join(f)).unwrap(),
            std::fs::read(out_b.join(f)).unwrap(),
        );
        assert!(!x.is_empty(), "{f}");
        assert!(
            x == y,
            "{tag}: {f} differs with and without the saved sketches"
        );
    }
}

#[test]
fn identities_survive_appends_and_refuse_other_stores_and_old_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let store = build_store(tmp.path(), "11");
    same_hits_with_and_without_saved_sketches(&store, tmp.path(), "indexed", 3000, 0);
    // Appending rows keeps both artefacts valid (they cover rows 0..R; new rows are re-probed).
    let more = tmp.path().join("more");
    generate(&more, "500", "12");
    // The second population reuses subject IDs of the first: rename them.
    let csv = std::fs::read_to_string(more.join("subjects.csv")).unwrap();
    let renamed: String = csv
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                format!("{l}\n")
            } else {
                format!("B-{l}\n")
            }
        })
        .collect();
    std::fs::write(more.join("subjects.csv"), renamed).unwrap();
    ingest(&store, &more);
    let c = ok_json(&["--json", "check", "--store", s(&store)]);
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["index"]["state"], "ok");
    assert!(
        c["index"]["detail"]
            .as_str()
            .unwrap()
            .contains("500 rows since"),
        "{c}"
    );
    assert_eq!(c["calibration"]["state"], "ok");
    let e = Engine::open_read_only(&store).unwrap();
    assert_eq!(e.info().indexed_rows, Some(3000));
    e.dedup(&dedup_opts(), None, None).unwrap();
    drop(e);
    // The saved sketches serve the 3 000 indexed rows, the 500 appended rows are sketched by the run; a run
    // forced to sketch every row writes the same bytes.
    same_hits_with_and_without_saved_sketches(&store, tmp.path(), "appended", 3000, 500);

    // Another store's calibration and index are refused (built on other data), though their checksums hold.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let other_store = build_store(&other, "13");
    std::fs::copy(
        other_store.join("engine/calibration.json"),
        store.join("engine/calibration.json"),
    )
    .unwrap();
    let e = Engine::open_read_only(&store).unwrap();
    let err = e.dedup(&dedup_opts(), None, None).err().unwrap();
    assert!(
        matches!(err, EngineError::Derived { .. })
            && err.to_string().contains("built on other data"),
        "{err}"
    );
    drop(e);
    ok_json(&[
        "--json",
        "calibrate",
        "--store",
        s(&store),
        "--pairs",
        "200000",
    ]);
    // Another store's sketch file (sound in itself: header and trailer checksum hold) is refused by name.
    let sketch = store.join("engine/index/face.sketch");
    let own = std::fs::read(&sketch).unwrap();
    std::fs::copy(other_store.join("engine/index/face.sketch"), &sketch).unwrap();
    let e = Engine::open_read_only(&store).unwrap();
    let err = e.dedup(&dedup_opts(), None, None).err().unwrap();
    assert!(
        is_derived_error(&err, &sketch, "pacha index --store")
            && err.to_string().contains("the index needs"),
        "{err}"
    );
    drop(e);
    let r = check_store_dir(&store).unwrap();
    assert!(
        r.derived.problems.iter().any(|p| p.file == sketch),
        "{:?}",
        r.derived.problems
    );
    std::fs::write(&sketch, &own).unwrap();
    assert!(check_store_dir(&store).unwrap().is_clean());
    for f in ["index.json", "face.ivf", "finger2.ivf"] {
        std::fs::copy(
            other_store.join("engine/index").join(f),
            store.join("engine/index").join(f),
        )
        .unwrap();
    }
    let r = check_store_dir(&store).unwrap();
    assert!(!r.is_clean());
    assert!(
        r.derived.problems[0].what.contains("built on")
            && r.derived.problems[0].what.contains("pacha index --store"),
        "{:?}",
        r.derived.problems
    );
    ok_json(&["--json", "index", "--store", s(&store)]);
    assert!(check_store_dir(&store).unwrap().is_clean());

    // Old unsealed formats: a clear error asking for a rebuild.
    std::fs::write(
        store.join("engine/calibration.json"),
        br#"{"models": [], "source": "fitted"}"#,
    )
    .unwrap();
    let out = run(&["--json", "check", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    let j = json_of(&out);
    assert!(
        j["problems"].to_string().contains("old format")
            && j["problems"]
                .to_string()
                .contains("pacha calibrate --store"),
        "{j}"
    );
    let out = run(&["--json", "verify", "--store", s(&store), "a", "b"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("old format"));
    ok_json(&[
        "--json",
        "calibrate",
        "--store",
        s(&store),
        "--pairs",
        "200000",
    ]);

    // Compaction (library): the index is dropped, the calibration re-stamped for the new generation.
    let e = Engine::open(&store).unwrap();
    let victim = e.snapshot().subject_id(3).to_string();
    assert!(e.delete(&victim).unwrap());
    e.compact().unwrap();
    drop(e);
    let r = check_store_dir(&store).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems());
    assert_eq!(r.derived.calibration.state, ArtefactState::Ok);
    assert_eq!(r.derived.index.state, ArtefactState::Missing);
}

#[test]
fn damaged_checkpoint_tiles_are_recomputed_not_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let store = build_store(tmp.path(), "11");
    let ckpt = tmp.path().join("ckpt");
    let e = Engine::open_read_only(&store).unwrap();
    let opts = DedupOptions {
        checkpoint_dir: Some(ckpt.clone()),
        block_rows: 500,
        report_floor: Some(20.0),
        ..dedup_opts()
    };
    let first = e.dedup(&opts, None, None).unwrap();
    let mut tiles: Vec<PathBuf> = std::fs::read_dir(&ckpt)
        .unwrap()
        .flatten()
        .map(|d| d.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("tile-")
        })
        .collect();
    tiles.sort();
    assert!(tiles.len() >= 6, "{tiles:?}");
    let key = |r: &pacha_engine::dedup::DedupResult| {
        r.pairs
            .iter()
            .map(|p| (p.a.clone(), p.b.clone(), p.comparison.fused.score.to_bits()))
            .collect::<Vec<_>>()
    };
    // Flip one byte in the middle of each tile's body (a digit of a score, an ID, a row number — whatever
    // is there); a resumed run must give exactly the first run's pairs.
    for t in &tiles {
        let mut b = std::fs::read(t).unwrap();
        let at = b.len() * 2 / 3;
        b[at] ^= 0x01;
        std::fs::write(t, &b).unwrap();
    }
    // A tile saved under another tile's name is not reused either.
    std::fs::copy(&tiles[1], &tiles[0]).unwrap();
    let again = e.dedup(&opts, None, None).unwrap();
    assert_eq!(again.summary.tiles_resumed, 0, "a damaged tile was reused");
    assert_eq!(key(&again), key(&first));
    // Intact tiles are reused: the second run rewrote them, a third run resumes every one and agrees.
    let third = e.dedup(&opts, None, None).unwrap();
    assert_eq!(third.summary.tiles_resumed, tiles.len());
    assert_eq!(key(&third), key(&first));
}
