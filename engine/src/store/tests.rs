//! Unit tests of the store: commit/reopen, idempotence, rejections, delete, compaction, torn tails.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const FACE: Modality = Modality::Face;
const F2: Modality = Modality::Finger(2);
const F7: Modality = Modality::Finger(7);

/// Per modality: the (vector, quality) of a template, or `None` when absent.
type Row = Vec<Option<(Vec<f32>, f32)>>;
/// A mutation of an enrolment and the modality it makes conflict.
type Mutation = (Box<dyn Fn(&mut Enrolment)>, Modality);

fn schema() -> Schema {
    Schema::new(vec![
        ModalitySpec {
            modality: FACE,
            dim: 24,
        },
        ModalitySpec {
            modality: F2,
            dim: 16,
        },
        ModalitySpec {
            modality: F7,
            dim: 5,
        },
    ])
    .unwrap()
}

/// Deterministic pseudo-random vector.
fn vector(seed: u64, dim: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..dim)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn enrolment(id: &str, seed: u64, mods: &[Modality]) -> Enrolment {
    let s = schema();
    Enrolment {
        subject_id: id.to_string(),
        templates: mods
            .iter()
            .enumerate()
            .map(|(k, &m)| Template {
                modality: m,
                vector: vector(seed * 31 + k as u64, s.dim(m).unwrap()),
                quality: ((seed + k as u64) % 11) as f32 / 10.0,
            })
            .collect(),
    }
}

fn people(range: std::ops::Range<u64>) -> Vec<Enrolment> {
    range
        .map(|i| {
            let mods: &[Modality] = match i % 3 {
                0 => &[FACE, F2, F7],
                1 => &[FACE],
                _ => &[F2, F7],
            };
            enrolment(&format!("UPI-{i:06}"), i, mods)
        })
        .collect()
}

/// Asserts the snapshot holds `e` (normalised) at its live row.
fn assert_holds(snap: &Snapshot, e: &Enrolment) {
    let row = snap
        .row_of(&e.subject_id)
        .unwrap_or_else(|| panic!("{} missing", e.subject_id));
    assert_eq!(snap.subject_id(row), e.subject_id);
    for spec in &snap.schema().modalities {
        let m = spec.modality;
        match e.templates.iter().find(|t| t.modality == m) {
            Some(t) => {
                let want = l2_normalize(&t.vector).unwrap();
                let got = snap.template(m, row).unwrap();
                assert!(
                    want.iter()
                        .zip(got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} {m}",
                    e.subject_id
                );
                assert!(snap.is_present(m, row));
                assert_eq!(snap.quality(m, row).to_bits(), t.quality.to_bits());
                let (codes, scale) = snap.template_i8(m, row).unwrap();
                let mut want_codes = vec![0i8; spec.dim];
                let s = pacha_index::quant::quantize_i8(&want, &mut want_codes);
                assert_eq!(codes, &want_codes[..]);
                assert_eq!(scale.to_bits(), s.to_bits());
            }
            None => {
                assert!(snap.template(m, row).is_none());
                assert!(!snap.is_present(m, row));
                assert_eq!(snap.quality(m, row), 0.0);
                assert!(snap.f32_rows(m).unwrap().row(row).iter().all(|&x| x == 0.0));
            }
        }
    }
}

/// Name → size of every file in the directory.
fn dir_state(dir: &Path) -> BTreeMap<String, u64> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

fn file_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn commit_reopen_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("reg");
    let all = people(0..50);
    {
        let store = Store::create(&dir, schema()).unwrap();
        assert_eq!(store.snapshot().rows(), 0);
        let r1 = store.insert(&all[..20]).unwrap();
        assert_eq!((r1.inserted, r1.unchanged), (20, 0));
        assert_eq!(r1.rows, (0..20).collect::<Vec<u32>>());
        let r2 = store.insert(&all[20..]).unwrap();
        assert_eq!(r2.rows, (20..50).collect::<Vec<u32>>());
        let snap = store.snapshot();
        assert_eq!(
            (
                snap.rows(),
                snap.live(),
                snap.commit_seq(),
                snap.generation()
            ),
            (50, 50, 2, 0)
        );
        all.iter().for_each(|e| assert_holds(&snap, e));
    }
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.schema(), &schema());
    assert_eq!(store.dir(), dir.as_path());
    let snap = store.snapshot();
    assert_eq!((snap.rows(), snap.live(), snap.commit_seq()), (50, 50, 2));
    all.iter().for_each(|e| assert_holds(&snap, e));
    let f = snap.f32_rows(FACE).unwrap();
    assert_eq!((f.rows(), f.dim(), f.stride()), (50, 24, 32));
    assert_eq!(
        f.as_slice().as_ptr() as usize % 64,
        0,
        "rows must be 64-byte aligned"
    );
    let q = snap.i8_rows(F7).unwrap();
    assert_eq!((q.rows(), q.dim(), q.stride()), (50, 5, 64));
    assert!(snap.f32_rows(Modality::Finger(9)).is_none());
    assert_eq!(snap.row_of("nobody"), None);
    assert_eq!(snap.subject_id(50), "");
    let report = check(&dir).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(report.rows, 50);
}

#[test]
fn identical_reinsert_is_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::create(tmp.path(), schema()).unwrap();
    let all = people(0..10);
    store.insert(&all[..6]).unwrap();
    let before = (store.snapshot().commit_seq(), dir_state(tmp.path()));
    let r = store.insert(&all[..6]).unwrap();
    assert_eq!((r.inserted, r.unchanged), (0, 6));
    assert_eq!(r.rows, (0..6).collect::<Vec<u32>>());
    assert_eq!(
        (store.snapshot().commit_seq(), dir_state(tmp.path())),
        before
    );
    // A retried batch mixing old and new records only appends the new ones.
    let mixed = vec![all[7].clone(), all[2].clone(), all[8].clone()];
    let r = store.insert(&mixed).unwrap();
    assert_eq!((r.inserted, r.unchanged), (2, 1));
    assert_eq!(r.rows, vec![6, 2, 7]);
    assert_eq!(store.snapshot().rows(), 8);
    // Scaling the vector does not change the normalised template: still identical.
    let mut scaled = all[0].clone();
    scaled
        .templates
        .iter_mut()
        .for_each(|t| t.vector.iter_mut().for_each(|x| *x *= 4.0));
    assert_eq!(store.insert(&[scaled]).unwrap().unchanged, 1);
}

fn expect_rejected(
    store: &Store,
    dir: &Path,
    batch: &RecordBatch,
    pred: impl Fn(&EngineError) -> bool,
) {
    let before_rows = store.snapshot().rows();
    let before_seq = store.snapshot().commit_seq();
    let before = file_bytes(dir);
    let err = store.insert_batch(batch).unwrap_err();
    assert!(pred(&err), "unexpected error: {err:?}");
    assert_eq!(store.snapshot().rows(), before_rows);
    assert_eq!(store.snapshot().commit_seq(), before_seq);
    assert!(
        file_bytes(dir) == before,
        "files changed after rejected batch ({err})"
    );
}

fn batch_of(store: &Store, e: &[Enrolment]) -> RecordBatch {
    enrolments_to_batch(store.schema(), e).unwrap()
}

#[test]
fn every_rejection_leaves_store_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = Store::create(dir, schema()).unwrap();
    store.insert(&people(0..5)).unwrap();
    let good = people(100..103);
    let with = |f: &dyn Fn(&mut Enrolment)| {
        let mut v = good.clone();
        f(&mut v[2]);
        batch_of(&store, &v)
    };
    let id2 = good[2].subject_id.clone();
    let is_subject = |e: &EngineError, s: &str, m: Modality| {
        let text = e.to_string();
        text.contains(s) && text.contains(&m.key())
    };

    let b = with(&|e| e.templates[0].vector[3] = f32::NAN);
    expect_rejected(&store, dir, &b, |e| {
        matches!(e, EngineError::NonFinite { modality: FACE, .. }) && is_subject(e, &id2, FACE)
    });
    let b = with(&|e| e.templates[1].vector[0] = f32::INFINITY);
    expect_rejected(
        &store,
        dir,
        &b,
        |e| matches!(e, EngineError::NonFinite { subject_id, modality: F2 } if *subject_id == id2),
    );
    let b = with(&|e| e.templates[0].vector.iter_mut().for_each(|x| *x = 0.0));
    expect_rejected(
        &store,
        dir,
        &b,
        |e| matches!(e, EngineError::ZeroNorm { subject_id, modality: FACE } if *subject_id == id2),
    );
    for q in [1.5, -0.1, f32::NAN] {
        let b = with(&|e| e.templates[2].quality = q);
        expect_rejected(
            &store,
            dir,
            &b,
            |e| matches!(e, EngineError::BadQuality { subject_id, modality: F7, .. } if *subject_id == id2),
        );
    }
    // Wrong dimension: through a batch block and through an enrolment.
    let mut b = batch_of(&store, &good);
    let blk = b.blocks.iter_mut().find(|b| b.modality == F7).unwrap();
    blk.dim = 4;
    blk.data.truncate(4 * 3);
    expect_rejected(&store, dir, &b, |e| {
        matches!(
            e,
            EngineError::DimensionMismatch {
                modality: F7,
                expected: 5,
                actual: 4,
                ..
            }
        )
    });
    let mut bad = good.clone();
    bad[0].templates[0].vector.push(1.0);
    let err = store.insert(&bad).unwrap_err();
    assert!(
        matches!(&err, EngineError::DimensionMismatch { subject_id, modality: FACE, expected: 24, actual: 25 } if *subject_id == good[0].subject_id),
        "{err:?}"
    );
    // Modality not in the schema.
    let mut b = batch_of(&store, &good);
    b.blocks.push(ModalityBlock {
        modality: Modality::Finger(9),
        dim: 3,
        data: vec![1.0; 9],
        present: vec![false, true, false],
        quality: vec![0.5; 3],
    });
    expect_rejected(
        &store,
        dir,
        &b,
        |e| matches!(e, EngineError::UnknownModality { subject_id, modality: Modality::Finger(9) } if *subject_id == good[1].subject_id),
    );
    let mut bad = good.clone();
    bad[0].templates.push(Template {
        modality: Modality::Finger(1),
        vector: vec![1.0; 3],
        quality: 0.5,
    });
    assert!(matches!(
        store.insert(&bad).unwrap_err(),
        EngineError::UnknownModality {
            modality: Modality::Finger(1),
            ..
        }
    ));
    let mut bad = good.clone();
    let t = bad[0].templates[0].clone();
    bad[0].templates.push(t);
    assert!(matches!(
        store.insert(&bad).unwrap_err(),
        EngineError::DuplicateTemplate { modality: FACE, .. }
    ));
    // Duplicate subject in the batch.
    let mut dup = good.clone();
    dup[2].subject_id = dup[0].subject_id.clone();
    let b = batch_of(&store, &dup);
    expect_rejected(
        &store,
        dir,
        &b,
        |e| matches!(e, EngineError::DuplicateInBatch { subject_id } if *subject_id == good[0].subject_id),
    );
    // Bad IDs.
    for id in ["", "tab\there", &"x".repeat(257)] {
        let b = with(&|e| e.subject_id = id.to_string());
        expect_rejected(
            &store,
            dir,
            &b,
            |e| matches!(e, EngineError::InvalidSubjectId { subject_id, .. } if *subject_id == pacha_datasets::error::shorten(id)),
        );
    }
    // No template at all.
    let b = with(&|e| e.templates.clear());
    expect_rejected(
        &store,
        dir,
        &b,
        |e| matches!(e, EngineError::NoTemplates { subject_id } if *subject_id == id2),
    );
    // Already enrolled with a different vector, quality, or presence.
    let existing = people(0..5);
    let conflicts: Vec<Mutation> = vec![
        (Box::new(|e| e.templates[1].vector[0] += 0.25), F2),
        (
            Box::new(|e| {
                e.templates[0].quality = if e.templates[0].quality == 0.5 {
                    0.6
                } else {
                    0.5
                }
            }),
            FACE,
        ),
        (
            Box::new(|e| {
                e.templates.pop();
            }),
            F7,
        ),
        (
            Box::new(|e| {
                e.templates.push(Template {
                    modality: F7,
                    vector: vector(1, 5),
                    quality: 0.2,
                })
            }),
            F7,
        ),
    ];
    for (target, (f, m)) in [0usize, 0, 0, 1].into_iter().zip(conflicts) {
        let mut v = good.clone();
        let mut e = existing[target].clone();
        f(&mut e);
        v.push(e);
        let b = batch_of(&store, &v);
        let id = existing[target].subject_id.clone();
        expect_rejected(
            &store,
            dir,
            &b,
            |e| matches!(e, EngineError::Conflict { subject_id, modality } if *subject_id == id && *modality == m),
        );
    }
    // Structurally malformed batch.
    let mut b = batch_of(&store, &good);
    b.blocks[0].present.pop();
    expect_rejected(&store, dir, &b, |e| {
        matches!(e, EngineError::MalformedBatch(_))
    });
    let mut b = batch_of(&store, &good);
    let again = b.blocks[0].clone();
    b.blocks.push(again);
    expect_rejected(&store, dir, &b, |e| {
        matches!(e, EngineError::MalformedBatch(_))
    });
    // After all that, the good batch still goes in and the store checks clean.
    assert_eq!(store.insert(&good).unwrap().inserted, 3);
    assert!(check(dir).unwrap().is_clean());
}

#[test]
fn delete_then_reinsert() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = people(0..8);
    let store = Store::create(dir, schema()).unwrap();
    store.insert(&all).unwrap();
    let before = store.snapshot();
    assert!(store.delete("UPI-000003").unwrap());
    assert!(!store.delete("UPI-000003").unwrap());
    assert!(!store.delete("never-enrolled").unwrap());
    let snap = store.snapshot();
    assert_eq!((snap.rows(), snap.live()), (8, 7));
    assert_eq!(snap.row_of("UPI-000003"), None);
    assert!(snap.is_deleted(3) && !snap.is_deleted(2));
    assert_eq!(snap.deleted_words(), &[1u64 << 3]);
    assert_eq!(
        snap.subject_id(3),
        "UPI-000003",
        "deleted rows keep their ID"
    );
    // The older snapshot is unaffected.
    assert_eq!(before.row_of("UPI-000003"), Some(3));
    assert!(!before.is_deleted(3));
    // Re-enrol the deleted ID with different templates: a new row.
    let again = enrolment("UPI-000003", 999, &[F7]);
    let r = store.insert(std::slice::from_ref(&again)).unwrap();
    assert_eq!((r.inserted, r.rows.clone()), (1, vec![8]));
    assert_holds(&store.snapshot(), &again);
    drop(store);
    let store = Store::open(dir).unwrap();
    let snap = store.snapshot();
    assert_eq!((snap.rows(), snap.live()), (9, 8));
    assert_eq!(snap.row_of("UPI-000003"), Some(8));
    assert!(snap.is_deleted(3));
    assert_holds(&snap, &again);
    for e in all.iter().filter(|e| e.subject_id != "UPI-000003") {
        assert_holds(&snap, e);
    }
    assert!(check(dir).unwrap().is_clean());
}

#[test]
fn compaction_renumbers_and_old_snapshot_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = people(0..30);
    let store = Store::create(dir, schema()).unwrap();
    store.insert(&all).unwrap();
    for i in [0, 7, 8, 29] {
        assert!(store.delete(&all[i].subject_id).unwrap());
    }
    let old = store.snapshot();
    let old_files: Vec<String> = dir_state(dir)
        .into_keys()
        .filter(|n| n.contains(".g0."))
        .collect();
    assert_eq!(old_files.len(), 3 * 4 + 3);
    let rep = store.compact().unwrap();
    assert_eq!(
        (
            rep.generation_before,
            rep.generation,
            rep.rows_before,
            rep.rows_after,
            rep.removed
        ),
        (0, 1, 30, 26, 4)
    );
    assert!(rep.bytes_after < rep.bytes_before);
    let snap = store.snapshot();
    assert_eq!((snap.generation(), snap.rows(), snap.live()), (1, 26, 26));
    assert!(snap.commit_seq() > old.commit_seq());
    assert!(snap.deleted_words().iter().all(|&w| w == 0));
    let kept: Vec<&Enrolment> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| ![0, 7, 8, 29].contains(i))
        .map(|(_, e)| e)
        .collect();
    for (new_row, e) in kept.iter().enumerate() {
        assert_eq!(
            snap.row_of(&e.subject_id),
            Some(new_row),
            "rows are renumbered densely in order"
        );
        assert_holds(&snap, e);
    }
    assert_eq!(snap.row_of(&all[0].subject_id), None);
    // Old files are gone, yet the old snapshot still reads them, deleted rows included.
    let names = dir_state(dir);
    assert!(
        old_files.iter().all(|n| !names.contains_key(n)),
        "{names:?}"
    );
    assert_eq!(old.row_of(&all[1].subject_id), Some(1));
    assert_holds(&old, &all[1]);
    let t = old.template(FACE, 0).unwrap();
    assert_eq!(t, &l2_normalize(&all[0].templates[0].vector).unwrap()[..]);
    // Writes keep working after compaction, and everything survives a reopen.
    let extra = people(100..102);
    assert_eq!(store.insert(&extra).unwrap().rows, vec![26, 27]);
    assert!(store.delete(&kept[0].subject_id).unwrap());
    drop(store);
    let store = Store::open(dir).unwrap();
    let snap = store.snapshot();
    assert_eq!((snap.generation(), snap.rows(), snap.live()), (1, 28, 27));
    extra.iter().for_each(|e| assert_holds(&snap, e));
    kept[1..].iter().for_each(|e| assert_holds(&snap, e));
    assert!(check(dir).unwrap().is_clean());
}

/// Writes the append journal a writer would have written before appending `extra` bytes to each of `names`
/// (and nothing to the other files) on top of the current manifest.
fn journal_append(dir: &Path, names: &[&str], extra: u64) {
    let m = Manifest::read(dir).unwrap();
    let intent = Intent {
        generation: m.generation,
        commit_seq: m.commit_seq,
        targets: m
            .files
            .iter()
            .map(|f| {
                f.len
                    + if names.contains(&f.name.as_str()) {
                        extra
                    } else {
                        0
                    }
            })
            .collect(),
    };
    std::fs::write(dir.join(APPEND_JOURNAL), intent.encode()).unwrap();
}

/// Appends `n` bytes of 0xAB to `dir/name`.
fn grow(dir: &Path, name: &str, n: usize) {
    let p = dir.join(name);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.extend_from_slice(&vec![0xAB; n]);
    std::fs::write(&p, bytes).unwrap();
}

#[test]
fn unexplained_tails_are_refused_not_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = people(0..12);
    Store::create(dir, schema()).unwrap().insert(&all).unwrap();
    // A successful commit leaves a journal whose targets are the committed lengths: nothing is explained.
    grow(dir, "face.g0.f32", 37);
    let before = file_bytes(dir);
    let e = Store::open(dir).unwrap_err();
    assert!(
        matches!(&e, EngineError::ForeignData { path, .. } if path.ends_with("face.g0.f32")),
        "{e}"
    );
    assert_eq!(file_bytes(dir), before, "a refused open truncates nothing");
    // A journal of an older commit explains nothing either.
    journal_append(dir, &["face.g0.f32"], 64);
    let mut m = Manifest::read(dir).unwrap();
    m.commit_seq += 1;
    m.write_atomic(dir).unwrap();
    assert!(matches!(
        Store::open(dir).unwrap_err(),
        EngineError::ForeignData { .. }
    ));
    m.commit_seq -= 1;
    m.write_atomic(dir).unwrap();
    // A journal for this commit that allows fewer bytes than are there: refused.
    journal_append(dir, &["face.g0.f32"], 36);
    assert!(matches!(
        Store::open(dir).unwrap_err(),
        EngineError::ForeignData { actual, allowed, .. } if actual == allowed + 1
    ));
    // No journal at all (a store from before the journal, or a deleted one): refused.
    std::fs::remove_file(dir.join(APPEND_JOURNAL)).unwrap();
    assert!(matches!(
        Store::open(dir).unwrap_err(),
        EngineError::ForeignData { .. }
    ));
    // A damaged journal explains nothing.
    journal_append(dir, &["face.g0.f32"], 37);
    let mut j = std::fs::read(dir.join(APPEND_JOURNAL)).unwrap();
    j[30] ^= 1;
    std::fs::write(dir.join(APPEND_JOURNAL), j).unwrap();
    assert!(matches!(
        Store::open(dir).unwrap_err(),
        EngineError::ForeignData { .. }
    ));
    // The reader never truncates and reads only committed bytes, so it still opens.
    let r = Store::open_read_only(dir).unwrap();
    all.iter().for_each(|e| assert_holds(&r.snapshot(), e));
    // The journal as written: explained, cut, and the store is whole.
    journal_append(dir, &["face.g0.f32"], 37);
    let w = Store::open(dir).unwrap();
    all.iter().for_each(|e| assert_holds(&w.snapshot(), e));
    assert!(check(dir).unwrap().is_clean());
}

#[test]
fn every_open_verifies_template_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = people(0..12);
    Store::create(dir, schema()).unwrap().insert(&all).unwrap();
    for name in [
        "face.g0.f32",
        "finger2.g0.i8",
        "finger7.g0.scale",
        "face.g0.qual",
    ] {
        let p = dir.join(name);
        let pristine = std::fs::read(&p).unwrap();
        // One flipped bit of an exponent: 0.2 becomes ~1e37 if nothing checks.
        let mut bad = pristine.clone();
        bad[HEADER_LEN + 4 * 3 + 3] ^= 0x40;
        std::fs::write(&p, &bad).unwrap();
        for e in [
            Store::open(dir).unwrap_err(),
            Store::open_read_only(dir).unwrap_err(),
        ] {
            assert!(
                matches!(&e, EngineError::Checksum { path, .. } if *path == p),
                "{name}: {e}"
            );
        }
        std::fs::write(&p, &pristine).unwrap();
    }
    assert!(Store::open(dir).is_ok());
}

#[test]
fn near_zero_templates_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::create(tmp.path(), schema()).unwrap();
    for scale in [1e-42f32, 1e-9, 0.0] {
        let mut e = enrolment("tiny", 1, &[FACE]);
        e.templates[0].vector.iter_mut().for_each(|x| *x *= scale);
        let err = store.insert(&[e]).unwrap_err();
        assert!(
            matches!(err, EngineError::ZeroNorm { .. }),
            "{scale}: {err}"
        );
        assert!(l2_normalize(&[scale; 24]).is_none());
    }
    // Just above the floor is accepted.
    let mut e = enrolment("small", 1, &[FACE]);
    let n: f64 = e.templates[0]
        .vector
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let k = (4.0 * MIN_TEMPLATE_NORM / n) as f32;
    e.templates[0].vector.iter_mut().for_each(|x| *x *= k);
    store.insert(&[e]).unwrap();
    assert_eq!(store.snapshot().rows(), 1);
}

#[test]
fn delete_all_is_all_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::create(tmp.path(), schema()).unwrap();
    let all = people(0..6);
    store.insert(&all).unwrap();
    let ids: Vec<&str> = all.iter().map(|e| e.subject_id.as_str()).collect();
    let before = file_bytes(tmp.path());
    let e = store.delete_all(&[ids[0], "nobody", ids[1]]).unwrap_err();
    assert!(
        matches!(&e, EngineError::UnknownSubject(id) if id == "nobody"),
        "{e}"
    );
    assert_eq!(file_bytes(tmp.path()), before, "nothing written");
    assert_eq!(store.snapshot().live(), 6);
    assert_eq!(
        store.delete_all(&[ids[2], ids[0], ids[2]]).unwrap(),
        vec![2, 0]
    );
    let snap = store.snapshot();
    assert_eq!(snap.live(), 4);
    assert!(snap.row_of(ids[0]).is_none() && snap.row_of(ids[2]).is_none());
    drop(store);
    assert_eq!(Store::open(tmp.path()).unwrap().snapshot().live(), 4);
}

#[test]
fn new_stores_only_in_missing_or_empty_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), b"mine").unwrap();
    let e = Store::create(&busy, schema()).unwrap_err();
    assert!(matches!(e, EngineError::DirNotEmpty { .. }), "{e}");
    assert_eq!(
        std::fs::read_dir(&busy).unwrap().count(),
        1,
        "nothing created"
    );
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    for e in [
        Store::create(&file, schema()).unwrap_err(),
        Store::open(&file).unwrap_err(),
        Store::open_read_only(&file).unwrap_err(),
    ] {
        assert!(matches!(e, EngineError::NotADirectory { .. }), "{e}");
        assert!(e.to_string().contains("is not a directory"), "{e}");
    }
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    Store::create(&empty, schema()).unwrap();
    Store::create(&tmp.path().join("new/nested"), schema()).unwrap();
}

#[test]
fn torn_tails_are_truncated_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = people(0..12);
    {
        let store = Store::create(dir, schema()).unwrap();
        store.insert(&all).unwrap();
        store.delete(&all[4].subject_id).unwrap();
    }
    let committed = dir_state(dir);
    let torn = [
        "face.g0.f32",
        "finger7.g0.i8",
        "finger2.g0.qual",
        "subjects.g0.ids",
        "subjects.g0.offs",
        "tombstones.g0.del",
    ];
    // The journal of an append that crashed halfway: it explains up to 40 bytes past every committed length.
    journal_append(dir, &torn, 40);
    for name in torn {
        let p = dir.join(name);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(&[0xAB; 37]);
        std::fs::write(&p, bytes).unwrap();
    }
    std::fs::write(dir.join(MANIFEST_TMP), b"half a manifest").unwrap();
    std::fs::write(dir.join("face.g1.f32"), b"left by a crashed compaction").unwrap();
    let rep = check(dir).unwrap();
    assert!(rep.is_clean(), "{:?}", rep.problems);
    assert_eq!(rep.warnings.len(), 8, "{:?}", rep.warnings);
    let store = Store::open(dir).unwrap();
    assert_eq!(
        dir_state(dir),
        committed,
        "torn tails cut and stray files removed"
    );
    let snap = store.snapshot();
    assert_eq!((snap.rows(), snap.live()), (12, 11));
    all.iter()
        .filter(|e| e.subject_id != all[4].subject_id)
        .for_each(|e| assert_holds(&snap, e));
    let rep = check(dir).unwrap();
    assert!(rep.is_clean() && rep.warnings.is_empty(), "{rep:?}");
}

#[test]
fn read_only_open_runs_beside_the_writer_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let first = people(0..20);
    let writer = Store::create(dir, schema()).unwrap();
    writer.insert(&first).unwrap();
    assert!(!writer.is_read_only());
    let before = file_bytes(dir);
    // Two readers beside the writer; neither blocks the other nor the writer.
    let r1 = Store::open_read_only(dir).unwrap();
    let r2 = Store::open_read_only(dir).unwrap();
    assert!(r1.is_read_only() && r2.is_read_only());
    assert_eq!(file_bytes(dir), before, "a read-only open writes nothing");
    for r in [&r1, &r2] {
        let snap = r.snapshot();
        assert_eq!((snap.rows(), snap.live()), (20, 20));
        first.iter().for_each(|e| assert_holds(&snap, e));
    }
    // A second writer is still refused.
    assert!(matches!(
        Store::open(dir).unwrap_err(),
        EngineError::Locked { .. }
    ));
    // The writer commits beside the readers; a reader keeps its snapshot, a new reader sees the commit.
    let second = people(20..25);
    writer.insert(&second).unwrap();
    assert!(writer.delete(&first[0].subject_id).unwrap());
    assert_eq!(r1.snapshot().rows(), 20);
    assert_eq!(r1.snapshot().row_of(&first[0].subject_id), Some(0));
    let r3 = Store::open_read_only(dir).unwrap();
    let snap = r3.snapshot();
    assert_eq!((snap.rows(), snap.live()), (25, 24));
    second.iter().for_each(|e| assert_holds(&snap, e));
    // Every write API of a read-only store is a typed error, and the files stay as they are.
    let now = file_bytes(dir);
    let ro = |e: EngineError| matches!(e, EngineError::ReadOnly { .. });
    assert!(ro(r3.insert(&people(30..31)).unwrap_err()));
    assert!(ro(r3.delete(&first[1].subject_id).unwrap_err()));
    assert!(ro(r3.compact().unwrap_err()));
    assert!(ro(r3.ensure_writable("test").unwrap_err()));
    assert_eq!(file_bytes(dir), now);
    assert_eq!(r3.snapshot().live(), 24);
    drop((r1, r2, r3));
    // Compaction beside a reader: the reader keeps reading the unlinked generation.
    let r4 = Store::open_read_only(dir).unwrap();
    writer.compact().unwrap();
    let old = r4.snapshot();
    assert_eq!((old.generation(), old.rows()), (0, 25));
    assert_holds(&old, &first[1]);
    let r5 = Store::open_read_only(dir).unwrap();
    assert_eq!((r5.snapshot().generation(), r5.snapshot().rows()), (1, 24));
}

#[test]
fn read_only_open_leaves_torn_tails_and_strays_for_the_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = people(0..12);
    Store::create(dir, schema()).unwrap().insert(&all).unwrap();
    let committed = dir_state(dir);
    journal_append(dir, &["face.g0.f32"], 37);
    let p = dir.join("face.g0.f32");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.extend_from_slice(&[0xAB; 37]);
    std::fs::write(&p, bytes).unwrap();
    std::fs::write(dir.join("face.g1.f32"), b"left by a crashed compaction").unwrap();
    let damaged = file_bytes(dir);
    let reader = Store::open_read_only(dir).unwrap();
    assert_eq!(file_bytes(dir), damaged, "a reader repairs nothing");
    let snap = reader.snapshot();
    assert_eq!(snap.rows(), 12);
    all.iter().for_each(|e| assert_holds(&snap, e));
    // The writer repairs, beside the reader, whose snapshot stays valid.
    let writer = Store::open(dir).unwrap();
    assert_eq!(dir_state(dir), committed);
    all.iter().for_each(|e| assert_holds(&snap, e));
    drop(writer);
    assert!(matches!(
        Store::open_read_only(&dir.join("nope")).unwrap_err(),
        EngineError::NotAStore { .. }
    ));
}

#[test]
fn read_only_open_retries_when_a_compaction_unlinked_its_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = people(0..10);
    let writer = Store::create(dir, schema()).unwrap();
    writer.insert(&all).unwrap();
    assert!(writer.delete(&all[0].subject_id).unwrap());
    // A reader read the manifest of generation 0, then a compaction switched to 1 and unlinked 0's files.
    let stale = Manifest::read(dir).unwrap();
    writer.compact().unwrap();
    assert!(matches!(
        Store::load(dir, stale.clone(), None).unwrap_err(),
        EngineError::Io { .. }
    ));
    let reader = Store::open_read_only_from(dir, stale).unwrap();
    let snap = reader.snapshot();
    assert_eq!((snap.generation(), snap.rows(), snap.live()), (1, 9, 9));
    all[1..].iter().for_each(|e| assert_holds(&snap, e));
    // Damage within one generation is reported as such, not retried away.
    std::fs::remove_file(dir.join("face.g1.qual")).unwrap();
    assert!(matches!(
        Store::open_read_only(dir).unwrap_err(),
        EngineError::Io { .. }
    ));
}

#[test]
fn read_only_opens_survive_concurrent_compactions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let store = Store::create(&dir, schema()).unwrap();
    store.insert(&people(0..400)).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (opened, raced) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let (mut opened, mut raced) = (0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match Store::open_read_only(&dir) {
                    Ok(r) => {
                        let snap = r.snapshot();
                        assert!(
                            snap.rows() - snap.live() <= 1,
                            "one delete between compactions"
                        );
                        // Every row is readable (the mapped files exist, even if unlinked since).
                        let last = snap.rows() - 1;
                        assert!(!snap.subject_id(last).is_empty());
                        opened += 1;
                    }
                    Err(EngineError::StoreChanged { .. }) => raced += 1,
                    Err(e) => panic!("read-only open failed beside a compaction: {e}"),
                }
            }
            (opened, raced)
        });
        for i in 0..60 {
            assert!(store.delete(&format!("UPI-{i:06}")).unwrap());
            store.compact().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap()
    });
    assert!(opened > 0, "{opened} opens, {raced} gave up");
    assert_eq!(store.snapshot().generation(), 60);
}

#[test]
fn create_open_lock_and_schema_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(matches!(
        Store::open(dir).unwrap_err(),
        EngineError::NotAStore { .. }
    ));
    assert!(matches!(
        check(dir).unwrap_err(),
        EngineError::NotAStore { .. }
    ));
    let store = Store::create(dir, schema()).unwrap();
    assert!(matches!(
        Store::open(dir).unwrap_err(),
        EngineError::Locked { .. }
    ));
    drop(store);
    assert!(matches!(
        Store::create(dir, schema()).unwrap_err(),
        EngineError::AlreadyExists { .. }
    ));
    let _reopened = Store::open(dir).unwrap();
    let bad =
        |mods: Vec<ModalitySpec>| matches!(Schema::new(mods), Err(EngineError::InvalidSchema(_)));
    assert!(bad(vec![]));
    assert!(bad(vec![ModalitySpec {
        modality: FACE,
        dim: 0
    }]));
    assert!(bad(vec![ModalitySpec {
        modality: FACE,
        dim: 4097
    }]));
    assert!(bad(vec![ModalitySpec {
        modality: Modality::Finger(11),
        dim: 4
    }]));
    assert!(bad(vec![
        ModalitySpec {
            modality: FACE,
            dim: 4
        },
        ModalitySpec {
            modality: FACE,
            dim: 8
        }
    ]));
    assert!(!bad(vec![ModalitySpec {
        modality: FACE,
        dim: 4096
    }]));
    let empty = Store::create(&tmp.path().join("other"), schema()).unwrap();
    assert_eq!(empty.insert(&[]).unwrap(), InsertReport::default());
}

#[test]
fn store_and_snapshot_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
    assert_send_sync::<Snapshot>();
    assert_send_sync::<Arc<Snapshot>>();
}

#[test]
fn readers_see_consistent_snapshots_during_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::create(tmp.path(), schema()).unwrap());
    let all = people(0..200);
    let reader = {
        let store = store.clone();
        let all = all.clone();
        std::thread::spawn(move || {
            let mut seen = 0;
            while seen < 200 {
                let snap = store.snapshot();
                assert!(snap.rows() >= seen);
                seen = snap.rows();
                for (r, e) in all.iter().enumerate().take(snap.rows()) {
                    assert_eq!(snap.subject_id(r), e.subject_id);
                    assert_eq!(snap.row_of(&e.subject_id), Some(r));
                }
                assert_eq!(
                    snap.row_of(&all[snap.rows().min(199)].subject_id).is_some(),
                    snap.rows() == 200
                );
            }
        })
    };
    for chunk in all.chunks(20) {
        store.insert(chunk).unwrap();
    }
    reader.join().unwrap();
}

fn arb_batch() -> impl Strategy<Value = (Vec<usize>, Vec<Vec<(String, Row)>>)> {
    // Schema of 1..=4 modalities with dims 1..=70; 1..=3 batches of 1..=12 records.
    (prop::collection::vec(1usize..=70, 1..=4)).prop_flat_map(|dims| {
        let nd = dims.len();
        let dims2 = dims.clone();
        let rec = prop::collection::vec(prop::option::weighted(0.7, (Just(()), 0.0f32..=1.0)), nd)
            .prop_flat_map(move |pres| {
                let parts: Vec<_> = pres
                    .iter()
                    .zip(&dims2)
                    .map(|(p, &d)| {
                        let q = p.map(|(_, q)| q);
                        prop::collection::vec(-1000.0f32..1000.0, d)
                            .prop_map(move |v| q.map(|q| (v, q)))
                    })
                    .collect();
                parts
            });
        let batches = prop::collection::vec(
            prop::collection::vec(("[A-Za-z0-9_é-]{1,12}", rec), 1..=12),
            1..=3,
        );
        (Just(dims), batches)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_batches_round_trip_bit_exact((dims, batches) in arb_batch()) {
        let tmp = tempfile::tempdir().unwrap();
        let mods: Vec<Modality> = (0..dims.len()).map(|i| if i == 0 { FACE } else { Modality::Finger(i as u8 * 3) }).collect();
        let schema = Schema::new(mods.iter().zip(&dims).map(|(&modality, &dim)| ModalitySpec { modality, dim }).collect()).unwrap();
        let mut expected: BTreeMap<String, Row> = BTreeMap::new();
        {
            let store = Store::create(tmp.path(), schema.clone()).unwrap();
            for batch in &batches {
                let mut seen = std::collections::HashSet::new();
                let recs: Vec<Enrolment> = batch
                    .iter()
                    .filter(|(id, t)| t.iter().any(|x| x.as_ref().is_some_and(|(v, _)| v.iter().any(|&x| x != 0.0))) && !expected.contains_key(id) && seen.insert(id.clone()))
                    .map(|(id, t)| Enrolment {
                        subject_id: id.clone(),
                        templates: t.iter().zip(&mods).filter_map(|(x, &m)| x.as_ref().filter(|(v, _)| v.iter().any(|&y| y != 0.0)).map(|(v, q)| Template { modality: m, vector: v.clone(), quality: *q })).collect(),
                    })
                    .collect();
                let rep = store.insert(&recs).unwrap();
                prop_assert_eq!(rep.inserted, recs.len());
                for e in &recs {
                    let row: Row = mods.iter().map(|&m| e.templates.iter().find(|t| t.modality == m).map(|t| (l2_normalize(&t.vector).unwrap(), t.quality))).collect();
                    expected.insert(e.subject_id.clone(), row);
                }
            }
        }
        let store = Store::open(tmp.path()).unwrap();
        let snap = store.snapshot();
        prop_assert_eq!(snap.rows(), expected.len());
        for (id, row) in &expected {
            let r = snap.row_of(id).unwrap();
            prop_assert_eq!(snap.subject_id(r), id.as_str());
            for (&m, want) in mods.iter().zip(row) {
                match want {
                    Some((v, q)) => {
                        let got = snap.template(m, r).unwrap();
                        prop_assert!(v.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits()));
                        let n: f64 = got.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                        prop_assert!((n - 1.0).abs() < 1e-5);
                        prop_assert_eq!(snap.quality(m, r).to_bits(), q.to_bits());
                    }
                    None => {
                        prop_assert!(!snap.is_present(m, r));
                        prop_assert!(snap.template(m, r).is_none());
                    }
                }
            }
        }
        prop_assert!(check(tmp.path()).unwrap().is_clean());
    }
}
