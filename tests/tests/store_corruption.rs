//! Corruption detection: flip one byte in the header and in the data region of every kind of store file;
//! `open` or `check` must report an error or problem naming that file. A truncated manifest or data file
//! is a clear error.
// Test code: helpers outside #[test] functions may unwrap.
#![allow(clippy::unwrap_used)]

use pacha_engine::store::{Enrolment, ModalitySpec, Schema, Store, Template, check};
use pacha_engine::{EngineError, Modality};
use std::path::{Path, PathBuf};

fn build(dir: &Path) {
    let schema = Schema::new(vec![
        ModalitySpec {
            modality: Modality::Face,
            dim: 40,
        },
        ModalitySpec {
            modality: Modality::Finger(6),
            dim: 20,
        },
    ])
    .unwrap();
    let store = Store::create(dir, schema).unwrap();
    let recs: Vec<Enrolment> = (0..25)
        .map(|i| Enrolment {
            subject_id: format!("ID-{i:03}"),
            templates: vec![
                Template {
                    modality: Modality::Face,
                    vector: (0..40)
                        .map(|k| ((i * 41 + k * 7) % 13) as f32 - 6.0)
                        .collect(),
                    quality: 0.75,
                },
                Template {
                    modality: Modality::Finger(6),
                    vector: (0..20)
                        .map(|k| ((i * 17 + k * 3) % 11) as f32 + 0.5)
                        .collect(),
                    quality: 0.5,
                },
            ],
        })
        .collect();
    store.insert(&recs).unwrap();
    assert!(store.delete("ID-004").unwrap());
    assert!(store.delete("ID-017").unwrap());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x5A;
    std::fs::write(path, b).unwrap();
}

fn names(e: &EngineError, file: &Path) -> bool {
    e.to_string().contains(&file.display().to_string())
}

#[test]
fn every_flipped_byte_is_reported_with_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    build(&pristine);
    assert!(check(&pristine).unwrap().is_clean());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&pristine)
        .unwrap()
        .map(|e| e.unwrap().path())
        // LOCK holds nothing; APPEND (the append-intent journal) only ever widens what a writer may cut,
        // and a damaged one explains nothing (tested in the store's unit tests).
        .filter(|p| p.file_name().is_some_and(|n| n != "LOCK" && n != "APPEND"))
        .collect();
    files.sort();
    let exts: Vec<String> = files
        .iter()
        .map(|p| {
            p.extension()
                .map_or("MANIFEST".into(), |e| e.to_string_lossy().into())
        })
        .collect();
    for want in [
        "MANIFEST", "f32", "i8", "scale", "qual", "ids", "offs", "del",
    ] {
        assert!(
            exts.iter().any(|e| e == want),
            "no {want} file in {files:?}"
        );
    }
    let mut cases = 0;
    for (k, file) in files.iter().enumerate() {
        let len = std::fs::metadata(file).unwrap().len() as usize;
        let name = file.file_name().unwrap().to_owned();
        // Header byte, first data byte, last data byte.
        let offsets: Vec<(usize, &str)> = if name == "MANIFEST" {
            vec![(3, "frame"), (20, "payload"), (len - 1, "payload end")]
        } else {
            vec![(9, "header"), (64, "data"), (len - 1, "data end")]
        };
        for (at, region) in offsets {
            let case = tmp.path().join(format!("case-{k}-{at}"));
            copy_dir(&pristine, &case);
            let target = case.join(&name);
            flip(&target, at);
            let report = check(&case).unwrap();
            assert!(
                report.problems.iter().any(|p| p.file == target),
                "{} byte {at} ({region}) flipped: check did not name it: {:?}",
                name.to_string_lossy(),
                report.problems
            );
            // Every open, writer or read-only, verifies every committed byte against the manifest.
            for opened in [Store::open_read_only(&case), Store::open(&case)] {
                match opened {
                    Err(e) => assert!(
                        names(&e, &target),
                        "open error does not name {}: {e}",
                        target.display()
                    ),
                    Ok(_) => panic!(
                        "open accepted a corrupt {} ({region}, ext {})",
                        name.to_string_lossy(),
                        exts[k]
                    ),
                }
            }
            cases += 1;
        }
    }
    assert!(cases >= 3 * 12, "{cases} cases");
}

#[test]
fn truncations_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    build(&pristine);
    for cut in [0usize, 10, 30] {
        let case = tmp.path().join(format!("manifest-{cut}"));
        copy_dir(&pristine, &case);
        let m = case.join("MANIFEST");
        let b = std::fs::read(&m).unwrap();
        let keep = if cut == 30 { b.len() - 1 } else { cut };
        std::fs::write(&m, &b[..keep]).unwrap();
        let e = Store::open(&case).unwrap_err();
        assert!(
            matches!(&e, EngineError::Manifest { path, reason } if *path == m && reason.contains("truncated")),
            "{e}"
        );
        assert!(check(&case).unwrap().problems.iter().any(|p| p.file == m));
    }
    // A data file shorter than its committed length: committed data lost.
    let case = tmp.path().join("short");
    copy_dir(&pristine, &case);
    let f = case.join("face.g0.f32");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = Store::open(&case).unwrap_err();
    assert!(
        matches!(&e, EngineError::FileTooShort { path, .. } if *path == f),
        "{e}"
    );
    assert!(check(&case).unwrap().problems.iter().any(|p| p.file == f));
    // A missing file.
    let case = tmp.path().join("missing");
    copy_dir(&pristine, &case);
    let f = case.join("finger6.g0.scale");
    std::fs::remove_file(&f).unwrap();
    assert!(names(&Store::open(&case).unwrap_err(), &f));
    assert!(check(&case).unwrap().problems.iter().any(|p| p.file == f));
}
