//! End-to-end runs of the built `pacha` binary: generate → ingest → index → calibrate → dedup → eval →
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure
//! report, `--json` output shapes, exit codes, and bad-input messages.

use pacha_tests::{json_of, ok_json, pacha_bin, path_arg as s, run_pacha as run};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// `pacha --json ingest` of a generated population's three modality files into `store`.
fn ingest_population(store: &Path, pop: &Path, extra: &[&str]) -> Value {
    let (face, subjects) = (pop.join("face.npy"), pop.join("subjects.csv"));
    let (f2, f7) = (
        format!("2={}", s(&pop.join("finger2.npy"))),
        format!("7={}", s(&pop.join("finger7.npy"))),
    );
    let mut args = vec!["--json", "ingest", "--store", s(store), "--face", s(&face)];
    args.extend([
        "--finger",
        f2.as_str(),
        "--finger",
        f7.as_str(),
        "--subjects",
        s(&subjects),
    ]);
    args.extend_from_slice(extra);
    ok_json(&args)
}

#[test]
fn full_pipeline_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (pop, store, run_dir) = (
        dir.path().join("pop"),
        dir.path().join("store"),
        dir.path().join("run"),
    );
    let g = ok_json(&[
        "--json",
        "generate",
        "--out",
        s(&pop),
        "--records",
        "3000",
        "--seed",
        "5",
    ]);
    assert_eq!(g["command"], "generate");
    assert_eq!(g["records"], 3000);
    let planted = g["truth_pairs"].as_u64().unwrap();
    assert!(
        planted > 20,
        "3000 records at 1 % should plant some duplicate pairs, got {planted}"
    );
    for f in [
        "face.npy",
        "finger2.npy",
        "finger7.npy",
        "subjects.csv",
        "truth.csv",
        "population.json",
    ] {
        assert!(pop.join(f).exists(), "generate did not write {f}");
    }

    let i = ingest_population(&store, &pop, &["--batch", "700"]);
    assert_eq!(i["report"]["inserted"], 3000);
    assert_eq!(i["report"]["batches"], 5);
    // Ingesting the same files again is idempotent.
    let again = ingest_population(&store, &pop, &[]);
    assert_eq!(again["report"]["inserted"], 0);
    assert_eq!(again["report"]["unchanged"], 3000);

    let info = ok_json(&["--json", "info", "--store", s(&store)]);
    assert_eq!(info["info"]["live"], 3000);
    // The i8 kernel this process runs, as the library detects it (the CLI is this test's child: same CPU,
    // same environment).
    assert_eq!(
        info["info"]["i8_kernel"],
        pacha_index::exact_i8::I8Kernel::detect().name()
    );
    assert_eq!(
        info["info"]["schema"]["modalities"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // An out-of-range knob is a clear error, and the store keeps working.
    let bad = run(&["index", "--store", s(&store), "--wide-share", "2"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("wide_share"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let idx = ok_json(&[
        "--json",
        "index",
        "--store",
        s(&store),
        "--probes",
        "12",
        "--wide-share",
        "0.2",
        "--wide-probes",
        "40",
    ]);
    assert_eq!(idx["indexed_rows"], 3000);
    let cal = ok_json(&[
        "--json",
        "calibrate",
        "--store",
        s(&store),
        "--pairs",
        "50000",
        "--truth",
        s(&pop.join("truth.csv")),
    ]);
    assert!(cal["source"].as_str().unwrap().starts_with("fitted"));
    // A dedup at FPIR 1e-3 over 3 000 rows decides at FMR 3.3e-7; the store's 4.5e6 pairs cannot count 1e-7,
    // and the calibration says so for every modality, and that no larger pool exists.
    let fmr = cal["decision_fmr"].as_f64().unwrap();
    assert!((fmr - 1e-3 / 3000.0).abs() < 1e-12, "{fmr}");
    let notes = cal["resolution_notes"].as_array().unwrap();
    assert_eq!(notes.len(), 3, "{notes:?}");
    assert!(notes.iter().all(|n| {
        let n = n.as_str().unwrap();
        n.contains("extrapolates") && n.ends_with("no pool can narrow it")
    }));

    let d = ok_json(&[
        "--json",
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&run_dir),
        "--floor",
        "40",
        "--mode",
        "index",
        "--force-path",
        "brute",
    ]);
    assert_eq!(d["summary"]["mode"], "Index+sketch");
    let cuts = d["summary"]["sketch_cuts"].as_array().unwrap();
    assert_eq!(cuts.len(), 3, "{cuts:?}");
    assert!(cuts.iter().all(|c| c[1]["cut"].as_u64().unwrap() < 512));
    // Every modality's join compared sketches, and rescored fewer pairs than it compared.
    let stats = d["summary"]["join_stats"].as_array().unwrap();
    assert_eq!(stats.len(), 3, "{stats:?}");
    for st in stats {
        let (products, rescored) = (
            st[1]["products"].as_u64().unwrap(),
            st[1]["rescored"].as_u64().unwrap(),
        );
        assert!(products > 0 && rescored < products, "{st:?}");
    }
    let hits = d["summary"]["hits"].as_u64().unwrap();
    assert!(
        hits >= planted * 95 / 100,
        "{hits} hits for {planted} planted pairs"
    );
    // The past-RAM path (f32 pages released) reports exactly the same pairs; like the resident run it rescores
    // through the i8 stage first, reading only a small share of its rescorings in f32.
    let past_dir = dir.path().join("run-past-ram");
    let out = Command::new(pacha_bin())
        .env("PACHA_PAST_RAM", "1")
        .args([
            "--json",
            "dedup",
            "--store",
            s(&store),
            "--out",
            s(&past_dir),
            "--floor",
            "40",
            "--mode",
            "index",
            "--force-path",
            "brute",
        ])
        .output()
        .expect("run pacha");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let past = json_of(&out);
    assert_eq!(past["summary"]["hits"], d["summary"]["hits"]);
    assert_eq!(
        std::fs::read_to_string(past_dir.join("hits.csv")).unwrap(),
        std::fs::read_to_string(run_dir.join("hits.csv")).unwrap()
    );
    for (st, resident) in past["summary"]["join_stats"]
        .as_array()
        .unwrap()
        .iter()
        .zip(stats)
    {
        let (reads, rescored) = (
            st[1]["exact_reads"].as_u64().unwrap(),
            st[1]["rescored"].as_u64().unwrap(),
        );
        assert_eq!(rescored, resident[1]["rescored"].as_u64().unwrap());
        // The sketched join scores its survivors through the i8 stage in RAM too: the same f32 reads.
        assert_eq!(
            resident[1]["exact_reads"].as_u64().unwrap(),
            reads,
            "{resident:?}"
        );
        assert!(reads < rescored, "{st:?}");
    }
    for f in ["hits.csv", "hits.jsonl", "clusters.csv", "summary.json"] {
        assert!(run_dir.join(f).exists(), "dedup did not write {f}");
    }
    let csv = std::fs::read_to_string(run_dir.join("hits.csv")).unwrap();
    assert!(csv.starts_with(
        "subject_a,subject_b,score,llr,fmr,face_cosine,finger2_cosine,finger7_cosine,is_hit"
    ));

    let e = ok_json(&[
        "--json",
        "eval",
        "--store",
        s(&store),
        "--run",
        s(&run_dir),
        "--truth",
        s(&pop.join("truth.csv")),
    ]);
    let recall = e["eval"]["pair_recall"].as_f64().unwrap();
    assert!(recall >= 0.95, "pair recall {recall}");
    assert_eq!(e["eval"]["fnir_at_fpir"].as_array().unwrap().len(), 3);
    // The run's audit travels into the evaluation; the brute-force path is complete by construction down to
    // the floor, and the notes say so.
    assert!(e["eval"]["run_audit"]["passed"].as_bool().unwrap());
    assert!(
        e["eval"]["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("complete by construction")),
        "{}",
        e["eval"]["notes"]
    );

    let html = dir.path().join("report.html");
    ok_json(&[
        "--json",
        "report",
        "--eval",
        s(&run_dir.join("eval.json")),
        "--out",
        s(&html),
    ]);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("id=\"det\"") && page.contains("<svg"),
        "report lacks the DET plot"
    );
    assert!(page.contains("id=\"audit\""), "report lacks the audit");

    // verify: a planted pair matches.
    let truth = std::fs::read_to_string(pop.join("truth.csv")).unwrap();
    let first = truth.lines().nth(1).unwrap();
    let ids: Vec<&str> = first.split(',').collect();
    let v = ok_json(&["--json", "verify", "--store", s(&store), ids[0], ids[1]]);
    assert_eq!(v["result"]["is_match"], true);

    // identify: probe row = record ids[1]'s row in the population files finds ids[0].
    let row: usize = ids[1].trim_start_matches('P').parse().unwrap();
    let (face, subjects) = (pop.join("face.npy"), pop.join("subjects.csv"));
    let identify = |extra: &[&str]| {
        let mut args = vec![
            "--json",
            "identify",
            "--store",
            s(&store),
            "--face",
            s(&face),
        ];
        args.extend_from_slice(extra);
        ok_json(&args)
    };
    let idf = identify(&["--rows", &row.to_string()]);
    let cands: Vec<String> = idf["probes"][0]["result"]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["subject_id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        cands.contains(&ids[0].to_string()),
        "identify of {} did not return {}: {cands:?}",
        ids[1],
        ids[0]
    );
    // The batch reports its per-probe latency: one probe timed, its median is that probe's time.
    let lat = &idf["latency"];
    assert_eq!(lat["probes"], 1, "latency: {lat}");
    let (p50, first) = (
        lat["p50_ms"].as_f64().unwrap(),
        lat["first_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 == first, "latency: {lat}");
    // With the population's subjects file the probe carries its capture qualities and still finds its mate.
    let idq = identify(&["--subjects", s(&subjects), "--rows", &row.to_string()]);
    let found_q = idq["probes"][0]["result"]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["subject_id"] == ids[0]);
    assert!(found_q, "identify with --subjects lost {}: {idq}", ids[0]);
    // A batch of 20 probes answered by one joint scan gives the answers the per-probe search gives, says
    // so in its latency, and its audit checks the scan's boundary.
    let lo = row.min(3000 - 20);
    let rows: Vec<String> = (lo..lo + 20).map(|r| r.to_string()).collect();
    let batch = |mode: &str| identify(&["--rows", &rows.join(","), "--batch-scan", mode]);
    let (joint, one) = (batch("joint"), batch("per-probe"));
    let answers = |j: &serde_json::Value| -> Vec<Vec<String>> {
        j["probes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                p["result"]["candidates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["subject_id"].as_str().unwrap().to_string())
                    .collect()
            })
            .collect()
    };
    assert_eq!(answers(&joint), answers(&one));
    assert!(answers(&joint)[row - lo].contains(&ids[0].to_string()));
    let scans = &joint["latency"]["joint_scans"];
    assert_eq!(scans[0]["key"], "joint(face)", "{scans}");
    assert_eq!(scans[0]["probes"], 20, "{scans}");
    assert!(one["latency"]["joint_scans"].as_array().unwrap().is_empty());
    assert_eq!(joint["audit"]["passed"], true, "{}", joint["audit"]);
    assert!(
        joint["audit"]["paths"].to_string().contains("\"joint\""),
        "{}",
        joint["audit"]
    );

    // delete, then check is clean (exit 0).
    // An ID that is not enrolled refuses the whole delete (exit 2, naming it); then the real one goes.
    let out = run(&["delete", "--store", s(&store), ids[0], "NOBODY"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOBODY"));
    let del = ok_json(&["--json", "delete", "--store", s(&store), ids[0]]);
    assert_eq!(del["deleted"].as_array().unwrap().len(), 1);
    let c = ok_json(&["--json", "check", "--store", s(&store)]);
    assert_eq!(c["ok"], true);

    // Corrupt a data byte: check exits 1 and names the file.
    let f32_file = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("face") && p.extension().is_some_and(|x| x == "f32"))
        .expect("face f32 file");
    let mut bytes = std::fs::read(&f32_file).unwrap();
    let n = bytes.len();
    bytes[n - 7] ^= 0x40;
    std::fs::write(&f32_file, bytes).unwrap();
    let out = run(&["--json", "check", "--store", s(&store)]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "check of a corrupt store must exit 1"
    );
    let j = json_of(&out);
    assert_eq!(j["ok"], false);
    let name = f32_file.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        j["problems"].to_string().contains(&name),
        "problems do not name {name}: {}",
        j["problems"]
    );
}

#[test]
fn bad_input_gives_exit_2_and_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // Missing file.
    let out = run(&[
        "ingest",
        "--store",
        s(&store),
        "--face",
        "/nonexistent/face.npy",
        "--subjects",
        "/nonexistent/s.csv",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/"),
        "error does not name the missing file: {err}"
    );
    // Not a store.
    let out = run(&["info", "--store", s(dir.path())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MANIFEST"));
    // Wrong dimension: a store made with 512-d faces, then a 128-d face file.
    let pop = dir.path().join("pop");
    ok_json(&["--json", "generate", "--out", s(&pop), "--records", "200"]);
    ingest_population(&store, &pop, &[]);
    let small = dir.path().join("small");
    ok_json(&[
        "--json",
        "generate",
        "--out",
        s(&small),
        "--records",
        "200",
        "--face-dim",
        "128",
        "--seed",
        "9",
    ]);
    let out = run(&[
        "--json",
        "ingest",
        "--store",
        s(&store),
        "--face",
        s(&small.join("face.npy")),
        "--subjects",
        s(&small.join("subjects.csv")),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let j = json_of(&out);
    assert!(
        j["error"].as_str().unwrap().contains("dimension 128"),
        "{j}"
    );
    // Bad finger spec.
    let out = run(&[
        "ingest",
        "--store",
        s(&store),
        "--finger",
        "eleven=x.npy",
        "--subjects",
        "x.csv",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("eleven"));
}
