//! Parquet end to end through the CLI: `pacha ingest --parquet` gives the same store as the `.npy` + CSV
//! ingest of the same data (same dedup hits, byte for byte), refuses bad files with nothing committed, and
//! `pacha dedup/merge --format parquet|both` write hits and clusters tables equal to the CSVs, listed with their
//! checksums in the run manifest.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use pacha_datasets::Modality;
use pacha_datasets::ingest::IngestSource;
use pacha_datasets::parquet::{ColumnData, RecordsLayout, read_table, write_records};
use pacha_engine::tiles::RunManifest;
use pacha_tests::{assert_same_run, ok_json, path_arg as s, run_pacha};
use std::path::{Path, PathBuf};

/// Generates a population of `n` records (face 512 + fingers 2 and 7 at 256) with the CLI into `dir`.
fn generate(dir: &Path, n: u64) {
    ok_json(&[
        "--json",
        "-q",
        "generate",
        "--out",
        s(dir),
        "-n",
        &n.to_string(),
        "--seed",
        "7",
        "--duplicate-rate",
        "0.05",
    ]);
}

/// The `--face/--finger` files of a generated population.
fn files(pop: &Path) -> Vec<(Modality, PathBuf)> {
    vec![
        (Modality::Face, pop.join("face.npy")),
        (Modality::Finger(2), pop.join("finger2.npy")),
        (Modality::Finger(7), pop.join("finger7.npy")),
    ]
}

/// Converts a generated population to one Parquet table with the library writer.
fn to_parquet(pop: &Path, out: &Path, layout: RecordsLayout) -> u64 {
    let src = IngestSource::open(pop.join("subjects.csv"), &files(pop)).unwrap();
    write_records(out, src.batches(1000), layout).unwrap()
}

fn npy_ingest(pop: &Path, store: &Path) {
    ok_json(&[
        "--json",
        "-q",
        "ingest",
        "--store",
        s(store),
        "--face",
        s(&pop.join("face.npy")),
        "--finger",
        &format!("2={}", s(&pop.join("finger2.npy"))),
        "--finger",
        &format!("7={}", s(&pop.join("finger7.npy"))),
        "--subjects",
        s(&pop.join("subjects.csv")),
        "--batch",
        "1000",
    ]);
}

fn dedup(store: &Path, out: &Path, format: &str) {
    let o = run_pacha(&[
        "-q",
        "dedup",
        "--store",
        s(store),
        "--out",
        s(out),
        "--mode",
        "exact",
        "--floor",
        "20",
        "--format",
        format,
    ]);
    assert!(
        o.status.success(),
        "dedup failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The CSV cells of a file, header row first.
fn csv_rows(p: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// A Parquet table as the CSV writer would print it (same rounding), header row first.
fn parquet_as_csv(p: &Path) -> Vec<Vec<String>> {
    let t = read_table(p).unwrap();
    let rows = match &t[0].1 {
        ColumnData::Utf8(v) => v.len(),
        ColumnData::U64(v) => v.len(),
        other => panic!("first column {other:?}"),
    };
    let mut out = vec![t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()];
    for i in 0..rows {
        out.push(
            t.iter()
                .map(|(name, c)| match c {
                    ColumnData::Utf8(v) => v[i].clone(),
                    ColumnData::U64(v) => v[i].to_string(),
                    ColumnData::F64(v) => match name.as_str() {
                        "score" => format!("{:.3}", v[i]),
                        "llr" => format!("{:.4}", v[i]),
                        "fmr" => format!("{:e}", v[i]),
                        other => panic!("unexpected f64 column {other}"),
                    },
                    ColumnData::NullableF64(v) => {
                        v[i].map_or(String::new(), |x| format!("{:.5}", x as f32))
                    }
                    ColumnData::Bool(v) => v[i].to_string(),
                })
                .collect(),
        );
    }
    out
}

fn manifest_files(run: &Path) -> Vec<String> {
    RunManifest::verify(run)
        .unwrap()
        .files
        .iter()
        .map(|f| f.name.clone())
        .collect()
}

#[test]
fn parquet_ingest_gives_the_npy_store_and_parquet_hits_equal_the_csv() {
    let dir = tempfile::tempdir().unwrap();
    let pop = dir.path().join("pop");
    generate(&pop, 3000);
    let (npy_store, pq_store) = (dir.path().join("npy-store"), dir.path().join("pq-store"));
    npy_ingest(&pop, &npy_store);

    // Fixed-size float lists in row groups of 700 rows (several per ingest batch and batches across them).
    let pq = dir.path().join("pop.parquet");
    let layout = RecordsLayout {
        row_group_rows: 700,
        ..Default::default()
    };
    assert_eq!(to_parquet(&pop, &pq, layout), 3000);
    let j = ok_json(&[
        "--json",
        "-q",
        "ingest",
        "--store",
        s(&pq_store),
        "--parquet",
        s(&pq),
        "--batch",
        "1000",
    ]);
    assert_eq!(j["report"]["inserted"], 3000);

    let (npy_run, pq_run) = (dir.path().join("npy-run"), dir.path().join("pq-run"));
    // Same batches committed, so the same store identity too: the summaries agree (timings aside).
    dedup(&npy_store, &npy_run, "both");
    dedup(&pq_store, &pq_run, "both");
    assert_same_run(&npy_run, &pq_run);
    assert_eq!(
        std::fs::read(npy_run.join("hits.parquet")).unwrap(),
        std::fs::read(pq_run.join("hits.parquet")).unwrap()
    );
    let hits = csv_rows(&pq_run.join("hits.csv"));
    assert!(hits.len() > 50, "only {} hits rows", hits.len());

    // hits.parquet / clusters.parquet read back equal the CSVs, and the manifest sums them.
    assert_eq!(parquet_as_csv(&pq_run.join("hits.parquet")), hits);
    assert_eq!(
        parquet_as_csv(&pq_run.join("clusters.parquet")),
        csv_rows(&pq_run.join("clusters.csv"))
    );
    assert_eq!(
        manifest_files(&pq_run),
        [
            "hits.csv",
            "hits.parquet",
            "hits.jsonl",
            "clusters.csv",
            "clusters.parquet",
            "summary.json"
        ]
    );
    // A damaged Parquet output is caught by the manifest.
    let hp = pq_run.join("hits.parquet");
    let mut bytes = std::fs::read(&hp).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&hp, &bytes).unwrap();
    let e = RunManifest::verify(&pq_run).expect_err("damage detected");
    assert!(e.to_string().contains("hits.parquet"), "{e}");

    // --format parquet writes the Parquet tables instead of the CSVs, byte for byte those of `both`.
    let only = dir.path().join("pq-only");
    dedup(&pq_store, &only, "parquet");
    assert!(!only.join("hits.csv").exists() && !only.join("clusters.csv").exists());
    assert_eq!(
        manifest_files(&only),
        [
            "hits.parquet",
            "hits.jsonl",
            "clusters.parquet",
            "summary.json"
        ]
    );
    assert_eq!(parquet_as_csv(&only.join("hits.parquet")), hits);
    dedup(&pq_store, &pq_run, "both");
    assert_eq!(
        std::fs::read(only.join("hits.parquet")).unwrap(),
        std::fs::read(pq_run.join("hits.parquet")).unwrap()
    );
    // Rewriting a run directory in another format leaves no stale table of the old one.
    dedup(&pq_store, &pq_run, "parquet");
    assert!(!pq_run.join("hits.csv").exists());
    RunManifest::verify(&pq_run).unwrap();

    // Tiles merged with --format parquet give the single run's Parquet bytes.
    for i in 0..2 {
        let t = dir.path().join(format!("tile{i}"));
        let o = run_pacha(&[
            "-q",
            "dedup",
            "--store",
            s(&pq_store),
            "--out",
            s(&t),
            "--mode",
            "exact",
            "--floor",
            "20",
            "--tile",
            &format!("{i}/2"),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let merged = dir.path().join("merged");
    let o = run_pacha(&[
        "-q",
        "merge",
        "--out",
        s(&merged),
        "--format",
        "parquet",
        s(&dir.path().join("tile1")),
        s(&dir.path().join("tile0")),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["hits.parquet", "clusters.parquet", "hits.jsonl"] {
        assert_eq!(
            std::fs::read(merged.join(f)).unwrap(),
            std::fs::read(only.join(f)).unwrap(),
            "{f}"
        );
    }

    // Re-ingesting the same file changes nothing.
    let j = ok_json(&[
        "--json",
        "-q",
        "ingest",
        "--store",
        s(&pq_store),
        "--parquet",
        s(&pq),
    ]);
    assert_eq!(j["report"]["unchanged"], 3000);
    assert_eq!(j["report"]["inserted"], 0);
}

#[test]
fn list_half_parquet_ingests_to_the_same_store_as_f16_npy_values() {
    // A list<halffloat> table is read as its f16 values: the store equals an ingest of those same values
    // written as fixed-size f32 lists.
    let dir = tempfile::tempdir().unwrap();
    let pop = dir.path().join("pop");
    generate(&pop, 800);
    let half = dir.path().join("half.parquet");
    to_parquet(
        &pop,
        &half,
        RecordsLayout {
            fixed: false,
            half: true,
            row_group_rows: 300,
            quality: true,
        },
    );
    // The same values rounded to f16 and back, as f32.
    let src = IngestSource::open(pop.join("subjects.csv"), &files(&pop)).unwrap();
    let rounded = src.batches(1000).map(|b| {
        b.map(|mut b| {
            for blk in &mut b.blocks {
                for x in &mut blk.data {
                    *x = half::f16::from_f32(*x).to_f32();
                }
            }
            b
        })
    });
    let f32s = dir.path().join("f32.parquet");
    write_records(&f32s, rounded, RecordsLayout::default()).unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for (store, file) in [(&a, &half), (&b, &f32s)] {
        ok_json(&[
            "--json",
            "-q",
            "ingest",
            "--store",
            s(store),
            "--parquet",
            s(file),
        ]);
    }
    let (ra, rb) = (dir.path().join("ra"), dir.path().join("rb"));
    dedup(&a, &ra, "csv");
    dedup(&b, &rb, "csv");
    assert_same_run(&ra, &rb);
}

#[test]
fn bad_parquet_is_refused_with_exit_2_and_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let pop = dir.path().join("pop");
    generate(&pop, 400);
    let src = IngestSource::open(pop.join("subjects.csv"), &files(&pop)).unwrap();
    // Row 333's face gets a NaN: refused when streamed, after 333 good rows.
    let bad = dir.path().join("bad.parquet");
    let poisoned = src.batches(100).enumerate().map(|(k, b)| {
        b.map(|mut b| {
            if k == 3 {
                let face = b
                    .blocks
                    .iter_mut()
                    .find(|x| x.modality == Modality::Face)
                    .unwrap();
                let row = 33;
                assert!(face.present[row]);
                face.data[row * face.dim + 5] = f32::NAN;
            }
            b
        })
    });
    write_records(&bad, poisoned, RecordsLayout::default()).unwrap();
    let store = dir.path().join("store");
    let out = run_pacha(&[
        "-q",
        "ingest",
        "--store",
        s(&store),
        "--parquet",
        s(&bad),
        "--batch",
        "50",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.parquet") && err.contains("row 333") && err.contains("\"face\""),
        "{err}"
    );
    assert!(err.contains("NaN"), "{err}");
    assert!(!store.join("MANIFEST").exists(), "a store was created");

    // An existing store: a record already enrolled with other templates is refused naming the row, and
    // nothing of the file is committed.
    npy_ingest(&pop, &store);
    let before = pacha_tests::fingerprint(&store);
    let changed = dir.path().join("changed.parquet");
    let src = IngestSource::open(pop.join("subjects.csv"), &files(&pop)).unwrap();
    let mut batches: Vec<_> = src.batches(100).map(Result::unwrap).collect();
    let f = batches[2]
        .blocks
        .iter_mut()
        .find(|x| x.modality == Modality::Finger(2))
        .unwrap();
    let row = (0..f.present.len()).find(|&i| f.present[i]).unwrap();
    f.data[row * f.dim] += 0.25;
    write_records(
        &changed,
        batches.into_iter().map(Ok),
        RecordsLayout::default(),
    )
    .unwrap();
    let out = run_pacha(&[
        "-q",
        "ingest",
        "--store",
        s(&store),
        "--parquet",
        s(&changed),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("changed.parquet: row {}: refused", 200 + row)),
        "{err}"
    );
    assert_eq!(
        pacha_tests::fingerprint(&store),
        before,
        "the store changed"
    );

    // Usage: --parquet excludes --subjects/--face; --column needs --parquet; a bad --column; a missing column.
    let pq = dir.path().join("good.parquet");
    to_parquet(&pop, &pq, RecordsLayout::default());
    let fresh = dir.path().join("fresh");
    for args in [
        vec!["--subjects", "x.csv"],
        vec!["--face", "f.npy"],
        vec!["--column", "nose=emb"],
        vec!["--column", "face=emb"],
        vec!["--id-column", "id"],
    ] {
        let mut a = vec!["-q", "ingest", "--store", s(&fresh), "--parquet", s(&pq)];
        a.extend(args.iter().copied());
        let out = run_pacha(&a);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!fresh.join("MANIFEST").exists());
    }
    let out = run_pacha(&[
        "-q",
        "ingest",
        "--store",
        s(&fresh),
        "--parquet",
        s(&pq),
        "--column",
        "face=emb",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("column \"emb\"") && err.contains("missing"),
        "{err}"
    );
    let out = run_pacha(&[
        "-q",
        "ingest",
        "--store",
        s(&fresh),
        "--column",
        "face=emb",
        "--subjects",
        "x.csv",
    ]);
    assert_eq!(out.status.code(), Some(2));
}
