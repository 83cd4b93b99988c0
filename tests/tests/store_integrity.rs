//! Store-level reliability through the CLI: template data is verified at open, ingest validates the whole
//! input before its first commit, and the small input errors (unknown delete IDs, `--block-rows` in index
//! mode, a store path that is a file, a non-empty non-store directory, OS errors) are clear exit-2 errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pacha_datasets::write_npy_f32;
use pacha_tests::{fingerprint, json_of, ok_json, path_arg as s, run_pacha};
use std::path::Path;

const DIM: usize = 16;

/// A deterministic unit-ish vector for record `i`.
fn vector(i: usize) -> Vec<f32> {
    (0..DIM)
        .map(|k| {
            (((i * 31 + k * 17) % 97) as f32 / 97.0) - 0.5 + if k == i % DIM { 1.0 } else { 0.0 }
        })
        .collect()
}

/// Writes `ids` and their face vectors (`vectors[i]`) as `subjects.csv` + `face.npy` in `dir`.
fn write_input(dir: &Path, ids: &[String], vectors: &[Vec<f32>]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut csv = String::from("subject_id\n");
    for id in ids {
        csv.push_str(id);
        csv.push('\n');
    }
    std::fs::write(dir.join("subjects.csv"), csv).unwrap();
    let mut data: Vec<f32> = vectors.iter().flatten().copied().collect();
    // The writer refuses NaN: write 0 there, then patch the NaN into the file's data (which ends the file).
    let nans: Vec<usize> = (0..data.len()).filter(|&k| data[k].is_nan()).collect();
    nans.iter().for_each(|&k| data[k] = 0.0);
    let path = dir.join("face.npy");
    write_npy_f32(&path, ids.len() as u64, DIM, &data).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let start = bytes.len() - data.len() * 4;
    for k in nans {
        bytes[start + k * 4..start + k * 4 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("P{i:05}")).collect()
}

fn vectors(n: usize) -> Vec<Vec<f32>> {
    (0..n).map(vector).collect()
}

fn ingest(store: &Path, input: &Path) -> std::process::Output {
    run_pacha(&[
        "--json",
        "ingest",
        "--store",
        s(store),
        "--face",
        s(&input.join("face.npy")),
        "--subjects",
        s(&input.join("subjects.csv")),
        "--batch",
        "100",
    ])
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn live(store: &Path) -> u64 {
    let j = ok_json(&["--json", "info", "--store", s(store)]);
    j["info"]["live"]
        .as_u64()
        .or_else(|| j["live"].as_u64())
        .unwrap_or_else(|| panic!("no live count in {j}"))
}

#[test]
fn a_bad_last_record_commits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 1000;
    // (what is wrong with the last record, how to make it so, what the error must say)
    type Spoil = fn(&mut Vec<String>, &mut Vec<Vec<f32>>);
    let cases: Vec<(&str, Spoil, &str)> = vec![
        (
            "1 MB ID",
            |ids, _| ids[999] = "X".repeat(1 << 20),
            "line 1001",
        ),
        (
            "near-zero template",
            |_, v| v[999].iter_mut().for_each(|x| *x = 1e-42),
            "near-zero",
        ),
        (
            "no template",
            |_, v| v[999].iter_mut().for_each(|x| *x = 0.0),
            "line 1001",
        ),
        ("NaN", |_, v| v[999][3] = f32::NAN, "NaN"),
        (
            "duplicate ID",
            |ids, _| ids[999] = ids[5].clone(),
            "appears twice",
        ),
    ];
    for (k, (what, spoil, says)) in cases.into_iter().enumerate() {
        let input = tmp.path().join(format!("in{k}"));
        let (mut i, mut v) = (ids(n), vectors(n));
        spoil(&mut i, &mut v);
        write_input(&input, &i, &v);
        let store = tmp.path().join(format!("store{k}"));
        let out = ingest(&store, &input);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains(says),
            "{what}: error does not say {says:?}: {err}"
        );
        assert!(
            err.len() < 2000,
            "{what}: error is {} bytes long",
            err.len()
        );
        assert!(
            !store.join("MANIFEST").exists(),
            "{what}: a store was created although the input is bad"
        );
    }
    // The long-ID error names the subjects file and shows the ID shortened with its length.
    let (mut i, v) = (ids(n), vectors(n));
    i[999] = "X".repeat(1 << 20);
    let input = tmp.path().join("long");
    write_input(&input, &i, &v);
    let err = stderr(&ingest(&tmp.path().join("long-store"), &input));
    assert!(
        err.contains(s(&input.join("subjects.csv"))) && err.contains("1048576 bytes"),
        "{err}"
    );
}

#[test]
fn a_conflict_with_the_store_at_the_end_commits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let first = tmp.path().join("first");
    write_input(&first, &ids(200), &vectors(200));
    let out = ingest(&store, &first);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(live(&store), 200);
    // 1000 new records whose last one re-enrols P00007 with a different face.
    let mut i: Vec<String> = (0..1000).map(|k| format!("Q{k:05}")).collect();
    let mut v: Vec<Vec<f32>> = (0..1000).map(|k| vector(k + 5000)).collect();
    i[999] = "P00007".into();
    v[999] = vector(123_456);
    let second = tmp.path().join("second");
    write_input(&second, &i, &v);
    let before = fingerprint(&store);
    let out = ingest(&store, &second);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("line 1001") && err.contains("P00007") && err.contains("different"),
        "{err}"
    );
    assert_eq!(
        fingerprint(&store),
        before,
        "the refused ingest wrote nothing"
    );
    assert_eq!(live(&store), 200);
}

#[test]
fn a_flipped_bit_in_template_data_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let input = tmp.path().join("in");
    write_input(&input, &ids(300), &vectors(300));
    assert!(ingest(&store, &input).status.success());
    let f32_file = store.join("face.g0.f32");
    let mut b = std::fs::read(&f32_file).unwrap();
    // The exponent's top bit of one value: a 0.2 becomes ~7e37 if nothing checks.
    b[64 + 4 * 100 + 3] ^= 0x40;
    std::fs::write(&f32_file, &b).unwrap();
    let dedup_out = tmp.path().join("run");
    for args in [
        vec!["info", "--store", s(&store)],
        vec!["dedup", "--store", s(&store), "--out", s(&dedup_out)],
        vec!["delete", "--store", s(&store), "P00001"],
    ] {
        let out = run_pacha(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} accepted corrupt data");
        assert!(
            err.contains(s(&f32_file)) && err.contains("checksum"),
            "{args:?}: {err}"
        );
    }
    assert!(!dedup_out.join("hits.csv").exists());
}

#[test]
fn foreign_bytes_past_a_committed_length_are_refused_not_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let input = tmp.path().join("in");
    write_input(&input, &ids(40), &vectors(40));
    assert!(ingest(&store, &input).status.success());
    let f32_file = store.join("face.g0.f32");
    let mut b = std::fs::read(&f32_file).unwrap();
    let committed = b.len() as u64;
    b.extend_from_slice(&[0x5A; 4096]);
    std::fs::write(&f32_file, &b).unwrap();
    // A writer refuses (naming the file) and truncates nothing; check reports it; readers still work.
    let out = run_pacha(&["delete", "--store", s(&store), "P00001"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains(s(&f32_file)) && err.contains("refusing to truncate"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&f32_file).unwrap().len(),
        committed + 4096
    );
    let out = run_pacha(&["check", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(live(&store), 40);
    // A tail the append journal explains (an interrupted append) is cut by the next writer.
    std::fs::write(&f32_file, &b[..committed as usize]).unwrap();
    pacha_engine::store::testing::torn_append(&store, "face.g0.f32", &[0x5A; 4096]).unwrap();
    let j = ok_json(&["--json", "delete", "--store", s(&store), "P00001"]);
    assert_eq!(j["deleted"].as_array().map(Vec::len), Some(1));
    assert_eq!(std::fs::metadata(&f32_file).unwrap().len(), committed);
    assert_eq!(live(&store), 39);
}

#[test]
fn small_input_errors_are_clear_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let input = tmp.path().join("in");
    write_input(&input, &ids(50), &vectors(50));
    assert!(ingest(&store, &input).status.success());

    // delete: an unknown ID refuses the whole command, nothing deleted.
    let out = run_pacha(&[
        "delete",
        "--store",
        s(&store),
        "P00001",
        "ghost-17",
        "P00002",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("ghost-17"), "{}", stderr(&out));
    assert_eq!(live(&store), 50, "nothing deleted");
    let j = ok_json(&["--json", "delete", "--store", s(&store), "P00001", "P00002"]);
    assert_eq!(j["deleted"].as_array().map(Vec::len), Some(2), "{j}");
    assert_eq!(live(&store), 48);

    // --block-rows with --mode index: a usage error, not silently ignored.
    let out = run_pacha(&[
        "dedup",
        "--store",
        s(&store),
        "--out",
        s(&tmp.path().join("run")),
        "--mode",
        "index",
        "--block-rows",
        "64",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--block-rows"), "{}", stderr(&out));

    // A --store that is a file.
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    for args in [
        vec!["info", "--store", s(&file)],
        vec!["delete", "--store", s(&file), "P00003"],
    ] {
        let out = run_pacha(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&out).contains("is not a directory"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = ingest(&file, &input);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not a directory"),
        "{}",
        stderr(&out)
    );

    // Ingest into a non-empty directory that holds no store: refused, nothing created there.
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("thesis.tex"), b"mine").unwrap();
    let out = ingest(&busy, &input);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
    // An empty directory is fine.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(ingest(&empty, &input).status.success());

    // An OS error is printed once, not once per layer.
    let out = run_pacha(&[
        "--json",
        "ingest",
        "--store",
        s(&tmp.path().join("s2")),
        "--face",
        "/nonexistent/face.npy",
        "--subjects",
        "/nonexistent/s.csv",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    let j = json_of(&out);
    assert_eq!(
        j["error"].as_str().unwrap().matches("os error 2").count(),
        1,
        "{j}"
    );
}

#[test]
fn formula_cells_are_neutralised_in_csv_output() {
    use pacha_engine::runio::csv_field;
    for (id, want) in [
        ("=HYPERLINK(\"x\")", "\"'=HYPERLINK(\"\"x\"\")\""),
        ("+1", "'+1"),
        ("-2", "'-2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "\"'\rx\""),
        ("P-1", "P-1"),
        ("a,b", "\"a,b\""),
    ] {
        assert_eq!(csv_field(id), want, "{id:?}");
    }
}
