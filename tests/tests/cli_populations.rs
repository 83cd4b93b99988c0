//! The test populations through the built `pacha` binary: `generate --preset <kind>` then `ingest` of the
//! files it wrote (only `--finger` files for `fingers-only`), and the whole pipeline on the face-less kind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use pacha_tests::{ok_json, path_arg as s};
use serde_json::Value;
use std::path::Path;

/// `pacha ingest` of every vector file listed in the population's `population.json`.
fn ingest(store: &Path, pop: &Path) -> Value {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(pop.join("population.json")).unwrap()).unwrap();
    let mut args: Vec<String> = ["--json", "ingest", "--store", s(store)]
        .map(String::from)
        .to_vec();
    for f in manifest["files"].as_array().unwrap() {
        let (key, file) = (f[0].as_str().unwrap(), f[1].as_str().unwrap());
        let path = s(&pop.join(file)).to_string();
        match key.strip_prefix("finger") {
            Some(pos) => args.extend(["--finger".into(), format!("{pos}={path}")]),
            None => args.extend(["--face".into(), path]),
        }
    }
    args.extend(["--subjects".into(), s(&pop.join("subjects.csv")).into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok_json(&refs)
}

#[test]
fn every_test_population_generates_and_ingests() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [
        "isotropic-mates",
        "lookalike-families",
        "heavy-tail",
        "power-law",
        "skewed-clusters",
        "fingers-only",
    ] {
        let (pop, store) = (
            dir.path().join(kind),
            dir.path().join(format!("{kind}.store")),
        );
        let g = ok_json(&[
            "--json",
            "generate",
            "--out",
            s(&pop),
            "--records",
            "3000",
            "--preset",
            kind,
        ]);
        assert_eq!(g["records"], 3000, "{kind}");
        assert!(g["truth_pairs"].as_u64().unwrap() >= 25, "{kind}: {g}");
        let face = kind != "fingers-only";
        assert_eq!(pop.join("face.npy").exists(), face, "{kind}");
        let i = ingest(&store, &pop);
        assert_eq!(i["report"]["inserted"], 3000, "{kind}: {i}");
        let info = ok_json(&["--json", "info", "--store", s(&store)]);
        assert_eq!(info["info"]["live"], 3000, "{kind}");
        let mods = info["info"]["schema"]["modalities"].as_array().unwrap();
        assert_eq!(mods.len(), if face { 3 } else { 2 }, "{kind}: {mods:?}");
    }
    // The face-less kind through the rest of the pipeline.
    let (pop, store, run) = (
        dir.path().join("fingers-only"),
        dir.path().join("fingers-only.store"),
        dir.path().join("fingers-only.run"),
    );
    ok_json(&["--json", "index", "--store", s(&store)]);
    let truth = pop.join("truth.csv");
    ok_json(&[
        "--json",
        "calibrate",
        "--store",
        s(&store),
        "--truth",
        s(&truth),
    ]);
    ok_json(&["--json", "dedup", "--store", s(&store), "--out", s(&run)]);
    let e = ok_json(&[
        "--json",
        "eval",
        "--store",
        s(&store),
        "--run",
        s(&run),
        "--truth",
        s(&truth),
    ]);
    let recall = e["eval"]["pair_recall"]
        .as_f64()
        .unwrap_or_else(|| panic!("{e}"));
    assert!(recall >= 0.9, "fingers-only pair recall {recall}: {e}");
}
