//! Format tests: npy/fvecs round trips, CSV with awkward IDs, fuzzed/truncated input, ingest validation.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test helpers unwrap; the stats test prints its figures

use pacha_datasets::*;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// A hand-written numpy v1.0 file (as numpy itself writes it) with the given descr and shape.
fn numpy_style(descr: &str, fortran: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let dict = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}");
    let total = (10 + dict.len() + 1).div_ceil(16) * 16;
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&((total - 10) as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out.extend_from_slice(data);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn reads_numpy_written_headers_and_f16() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    write(
        &p,
        &numpy_style(
            "<f4",
            "False",
            "(2, 3)",
            &f32_bytes(&[1., 2., 3., 4., 5., 6.]),
        ),
    );
    let m = NpyMatrix::open(&p).unwrap();
    assert_eq!((m.rows(), m.dim(), m.dtype()), (2, 3, Dtype::F32));
    assert_eq!(m.row(1).unwrap(), vec![4., 5., 6.]);
    let mut out = vec![9.0];
    m.read_rows(0, 2, &mut out).unwrap();
    assert_eq!(out, vec![9., 1., 2., 3., 4., 5., 6.], "read_rows appends");
    assert!(matches!(
        m.read_rows(1, 2, &mut out),
        Err(DatasetError::RowsOutOfRange { .. })
    ));

    let halves: Vec<u8> = [0.5f32, -2.0, 65504.0, 0.0]
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect();
    write(&p, &numpy_style("<f2", "False", "(2, 2)", &halves));
    let m = NpyMatrix::open(&p).unwrap();
    assert_eq!(m.dtype(), Dtype::F16);
    let mut out = Vec::new();
    m.read_rows(0, 2, &mut out).unwrap();
    assert_eq!(out, vec![0.5, -2.0, 65504.0, 0.0]);

    // Version 2.0 header (u32 length).
    let mut v2 = numpy_style("<f4", "False", "(1, 2)", &f32_bytes(&[7., 8.]));
    let hl = u16::from_le_bytes([v2[8], v2[9]]) as u32 - 2;
    let mut fixed = b"\x93NUMPY\x02\x00".to_vec();
    fixed.extend_from_slice(&hl.to_le_bytes());
    fixed.extend_from_slice(&v2[10..10 + hl as usize]);
    fixed.extend_from_slice(&v2.split_off(v2.len() - 8));
    write(&p, &fixed);
    assert_eq!(NpyMatrix::open(&p).unwrap().row(0).unwrap(), vec![7., 8.]);
}

#[test]
fn npy_rejections_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    let d = f32_bytes(&[1., 2., 3., 4.]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            numpy_style(">f4", "False", "(2, 2)", &d),
            "UnsupportedDtype",
        ),
        (
            numpy_style("<f8", "False", "(1, 2)", &d),
            "UnsupportedDtype",
        ),
        (numpy_style("<f4", "True", "(2, 2)", &d), "FortranOrder"),
        (numpy_style("<f4", "False", "(4,)", &d), "BadShape"),
        (numpy_style("<f4", "False", "(1, 2, 2)", &d), "BadShape"),
        (numpy_style("<f4", "False", "(2, 0)", &[]), "BadShape"),
        (numpy_style("<f4", "False", "(3, 2)", &d), "Truncated"),
        (numpy_style("<f4", "False", "(1, 2)", &d), "TrailingBytes"),
        (numpy_style("<f4", "Maybe", "(2, 2)", &d), "BadHeader"),
        (b"\x93NUMPX\x01\x00\x00\x00".to_vec(), "BadHeader"),
        (b"\x93NUMPY\x04\x00\x00\x00".to_vec(), "BadHeader"),
        (b"".to_vec(), "Truncated"),
    ];
    for (bytes, want) in cases {
        write(&p, &bytes);
        let err = NpyMatrix::open(&p).unwrap_err();
        let got = format!("{err:?}");
        assert!(got.starts_with(want), "expected {want}, got {got}");
        assert!(
            err.to_string().contains("a.npy"),
            "error does not name the file: {err}"
        );
    }
}

#[test]
fn truncated_and_garbled_npy_and_fvecs_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.npy");
    write_npy_f32(&good, 3, 4, &(0..12).map(|x| x as f32).collect::<Vec<_>>()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let p = dir.path().join("t.npy");
    for len in 0..bytes.len() {
        write(&p, &bytes[..len]);
        assert!(
            NpyMatrix::open(&p).is_err(),
            "prefix of {len} bytes accepted"
        );
    }
    let data_offset = NpyMatrix::open(&good).unwrap().header().data_offset as usize;
    // Garble every header byte with several values: must be an error or a valid parse, never a panic.
    for i in 0..data_offset {
        for v in [0u8, b'(', b')', b',', b'\'', b'9', 0xff, b' '] {
            let mut g = bytes.clone();
            g[i] = v;
            write(&p, &g);
            if let Ok(m) = NpyMatrix::open(&p) {
                // Accepted garbling (e.g. a space in padding) must still describe the same data.
                assert_eq!((m.rows(), m.dim()), (3, 4), "byte {i} -> {v}");
            }
        }
    }
    let fv = dir.path().join("good.fvecs");
    write_fvecs(&fv, 3, &[1., 2., 3., 4., 5., 6.]).unwrap();
    let bytes = std::fs::read(&fv).unwrap();
    let p = dir.path().join("t.fvecs");
    for len in 0..bytes.len() {
        write(&p, &bytes[..len]);
        match FvecsMatrix::open(&p) {
            // A prefix that ends on a row boundary is a valid, shorter file.
            Ok(m) => assert!(
                len > 0 && len % 16 == 0 && m.rows() == (len / 16) as u64,
                "fvecs prefix {len} accepted"
            ),
            Err(e) => assert!(
                len == 0 || len % 16 != 0,
                "whole-row prefix {len} rejected: {e}"
            ),
        }
    }
}

#[test]
fn fvecs_round_trip_and_dim_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.fvecs");
    let data: Vec<f32> = (0..12).map(|x| x as f32 * 0.5).collect();
    write_fvecs(&p, 4, &data).unwrap();
    let m = FvecsMatrix::open(&p).unwrap();
    assert_eq!((m.rows(), m.dim()), (3, 4));
    let mut out = Vec::new();
    m.read_rows(0, 3, &mut out).unwrap();
    assert_eq!(out, data);
    m.validate().unwrap();
    // Second row claims dimension 5 (same byte length overall keeps the file size valid).
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[20..24].copy_from_slice(&5i32.to_le_bytes());
    write(&p, &bytes);
    let m = FvecsMatrix::open(&p).unwrap();
    match m.validate().unwrap_err() {
        DatasetError::DimMismatch {
            row,
            offset,
            expected,
            found,
            ..
        } => {
            assert_eq!((row, offset, expected, found), (1, 20, 4, 5));
        }
        e => panic!("unexpected {e:?}"),
    }
    // NaN row is named.
    let mut d2 = data.clone();
    d2[9] = f32::NAN;
    write_fvecs(&p, 4, &d2).unwrap();
    assert!(matches!(
        FvecsMatrix::open(&p).unwrap().validate(),
        Err(DatasetError::NonFiniteRow {
            row: 2,
            column: 1,
            ..
        })
    ));
}

#[test]
fn npy_writer_rejects_bad_rows_and_check_finite_names_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.npy");
    let mut w = NpyWriter::create(&p, 3).unwrap();
    assert!(w.write_rows(&[1.0, 2.0]).is_err());
    assert!(w.write_rows(&[1.0, f32::NAN, 2.0]).is_err());
    w.write_rows(&[1.0, 2.0, 3.0]).unwrap();
    assert_eq!(w.finish().unwrap(), 1);
    // A NaN written by someone else is found by check_finite.
    write(
        &p,
        &numpy_style(
            "<f4",
            "False",
            "(2, 2)",
            &f32_bytes(&[1., 2., 3., f32::INFINITY]),
        ),
    );
    match NpyMatrix::open(&p).unwrap().check_finite().unwrap_err() {
        DatasetError::NonFiniteRow { row, column, .. } => assert_eq!((row, column), (1, 1)),
        e => panic!("unexpected {e:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn npy_round_trips(rows in 0usize..40, dim in 1usize..20, f16 in any::<bool>(), seed in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.npy");
        let data: Vec<f32> = (0..rows * dim)
            .map(|i| ((seed.wrapping_add(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f32 / 1e6) - 4.0)
            .collect();
        let dtype = if f16 { Dtype::F16 } else { Dtype::F32 };
        let mut w = NpyWriter::create_with_dtype(&p, dim, dtype).unwrap();
        // Write in two uneven pieces to exercise streaming.
        let split = (rows / 3) * dim;
        w.write_rows(&data[..split]).unwrap();
        w.write_rows(&data[split..]).unwrap();
        prop_assert_eq!(w.finish().unwrap(), rows as u64);
        let m = NpyMatrix::open(&p).unwrap();
        prop_assert_eq!((m.rows(), m.dim(), m.dtype()), (rows as u64, dim, dtype));
        let mut out = Vec::new();
        for chunk in m.chunks(7) {
            out.extend(chunk.unwrap().1);
        }
        let want: Vec<f32> = if f16 { data.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect() } else { data };
        prop_assert_eq!(out, want);
    }

    #[test]
    fn subjects_csv_round_trips_awkward_ids(
        ids in proptest::collection::hash_set("[a-zA-Z0-9 ,\"';é\u{1F600}-]{1,12}", 1..30),
        tsv in any::<bool>(),
        flags in proptest::collection::vec((any::<bool>(), 0u32..=1000), 30),
    ) {
        let ids: Vec<String> = ids.into_iter().filter(|s| !s.trim().is_empty()).collect();
        prop_assume!(!ids.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(if tsv { "s.tsv" } else { "s.csv" });
        let present: Vec<bool> = ids.iter().enumerate().map(|(i, _)| flags[i].0).collect();
        let quality: Vec<f32> = ids.iter().enumerate().map(|(i, _)| if flags[i].0 { flags[i].1 as f32 / 1000.0 } else { 0.0 }).collect();
        let s = Subjects {
            ids: ids.clone(),
            lines: vec![],
            modalities: vec![SubjectModality { modality: Modality::Finger(7), present: Some(present.clone()), quality: Some(quality.clone()) }],
        };
        write_subjects(&p, &s).unwrap();
        let r = read_subjects(&p).unwrap();
        prop_assert_eq!(&r.ids, &ids);
        let m = r.modality(Modality::Finger(7)).unwrap();
        prop_assert_eq!(m.present.as_ref().unwrap(), &present);
        prop_assert_eq!(m.quality.as_ref().unwrap(), &quality);
    }

    #[test]
    fn garbled_csv_never_panics(bytes in proptest::collection::vec(prop_oneof![
        Just(b','), Just(b'"'), Just(b'\n'), Just(b'\r'), Just(b'a'), Just(b'1'), Just(0xffu8), Just(b'\t')], 0..80)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.csv");
        let mut content = b"subject_id,face_present\n".to_vec();
        content.extend_from_slice(&bytes);
        std::fs::write(&p, &content).unwrap();
        if let Ok(s) = read_subjects(&p) {
            prop_assert!(s.ids.iter().all(|id| !id.trim().is_empty()));
        }
    }
}

#[test]
fn subjects_errors_name_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.csv");
    let cases: Vec<(&[u8], &str)> = vec![
        (
            b"subject_id\r\nA\r\nB\r\nA\r\n",
            "DuplicateId { path: \"X\", id: \"A\", first_line: 2, second_line: 4 }",
        ),
        (
            b"subject_id,face_present\nA,1\n,1\n",
            "EmptyId { path: \"X\", line: 3 }",
        ),
        (
            b"subject_id\nA\nB\xff\n",
            "NonUtf8 { path: \"X\", line: 3, column: \"subject_id\" }",
        ),
        (
            b"id,face_present\nA,1\n",
            "MissingColumn { path: \"X\", column: \"subject_id\" }",
        ),
        (
            b"subject_id,face_present\nA,maybe\n",
            "InvalidValue { path: \"X\", line: 2, column: \"face_present\", value: \"maybe\"",
        ),
        (
            b"subject_id,face_quality\nA,1.5\n",
            "InvalidValue { path: \"X\", line: 2",
        ),
        (
            b"subject_id,face_present\nA,1,extra\n",
            "Csv { path: \"X\", line: 2",
        ),
        (b"subject_id\n\"A\n", "Csv { path: \"X\", line: 2"),
        (b"", "Csv { path: \"X\", line: 1"),
    ];
    for (bytes, want) in cases {
        write(&p, bytes);
        let got =
            format!("{:?}", read_subjects(&p).unwrap_err()).replace(&format!("{:?}", p), "\"X\"");
        assert!(got.starts_with(want), "want {want}\n got {got}");
    }
    // Quoted IDs with delimiters and doubled quotes, CRLF, a BOM, and sniffed semicolons.
    let q = dir.path().join("s.txt");
    write(
        &q,
        b"\xEF\xBB\xBFsubject_id;Face_Present;other\r\n\"a;b\"\"c\";yes;x\r\nplain;0;y\r\n",
    );
    let s = read_subjects(&q).unwrap();
    assert_eq!(s.ids, vec!["a;b\"c", "plain"]);
    assert_eq!(
        s.modality(Modality::Face).unwrap().present,
        Some(vec![true, false])
    );
    assert_eq!(s.lines, vec![2, 3]);
}

fn unit(dim: usize, k: usize) -> Vec<f32> {
    let mut v = vec![0.0; dim];
    v[k % dim] = 1.0;
    v
}

#[test]
fn ingest_validates_and_streams() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        &d.join("s.csv"),
        b"subject_id,face_present,face_quality\nA,1,0.9\nB,0,\nC,1,\n",
    );
    let mut face = Vec::new();
    face.extend(unit(4, 0));
    face.extend([f32::NAN; 4]); // absent per subjects: ignored and zeroed
    face.extend(unit(4, 2));
    let raw = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    // The NaN row is absent per the subjects file; our writer refuses NaN, so write the file by hand.
    write(
        &d.join("face.npy"),
        &numpy_style("<f4", "False", "(3, 4)", &raw(&face)),
    );
    let mut fing = Vec::new();
    fing.extend(unit(3, 1));
    fing.extend(unit(3, 0)); // B's only template
    fing.extend([0.0; 3]); // no presence column: all-zero row means absent
    write_fvecs(d.join("f2.fvecs"), 3, &fing).unwrap();
    let files = vec![
        (Modality::Face, d.join("face.npy")),
        (Modality::Finger(2), d.join("f2.fvecs")),
    ];
    let src = IngestSource::open(d.join("s.csv"), &files).unwrap();
    src.validate_all().unwrap();
    assert_eq!(
        src.modalities(),
        vec![(Modality::Face, 4), (Modality::Finger(2), 3)]
    );
    let batches: Vec<RecordBatch> = src.batches(2).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].ids, vec!["A", "B"]);
    let f = batches[0].block(Modality::Face).unwrap();
    assert_eq!(f.present, vec![true, false]);
    assert_eq!(f.quality, vec![0.9, 0.0]);
    assert_eq!(f.row(1), &[0.0; 4]);
    let g = batches[0].block(Modality::Finger(2)).unwrap();
    assert_eq!(g.present, vec![true, true]);
    assert_eq!(g.quality, vec![1.0, 1.0]);
    assert_eq!(batches[1].block(Modality::Face).unwrap().quality, vec![1.0]);
    assert_eq!(
        batches[1].block(Modality::Finger(2)).unwrap().present,
        vec![false]
    );

    // Without the finger file, B has no template at all: an error naming the subjects file and line.
    let src = IngestSource::open(d.join("s.csv"), &files[..1]).unwrap();
    match src.validate_all().unwrap_err() {
        DatasetError::NoTemplate { line, subject, .. } => {
            assert_eq!((line, subject.as_str()), (3, "B"))
        }
        e => panic!("unexpected {e:?}"),
    }

    // Present NaN row: error names subject and modality.
    face[8] = f32::NAN;
    assert!(
        write_npy_f32(d.join("w.npy"), 3, 4, &face).is_err(),
        "the writer refuses NaN"
    );
    write(
        &d.join("bad.npy"),
        &numpy_style("<f4", "False", "(3, 4)", &raw(&face)),
    );
    let src = IngestSource::open(d.join("s.csv"), &[(Modality::Face, d.join("bad.npy"))]).unwrap();
    let err = src.validate_all().unwrap_err();
    match &err {
        DatasetError::BadTemplate {
            subject,
            modality,
            row,
            ..
        } => {
            assert_eq!(
                (subject.as_str(), *modality, *row),
                ("C", Modality::Face, 2)
            );
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(err.to_string().contains("\"C\""));

    // Present but all-zero row.
    let mut zero = face.clone();
    zero[8..12].fill(0.0);
    write_npy_f32(
        d.join("zero.npy"),
        3,
        4,
        &zero
            .iter()
            .map(|x| if x.is_nan() { 0.0 } else { *x })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let src = IngestSource::open(d.join("s.csv"), &[(Modality::Face, d.join("zero.npy"))]).unwrap();
    assert!(matches!(
        src.validate_all(),
        Err(DatasetError::BadTemplate { row: 2, .. })
    ));

    // Shape mismatch, duplicate modality, unknown extension.
    write_npy_f32(d.join("two.npy"), 2, 4, &[0.5; 8]).unwrap();
    let e =
        IngestSource::open(d.join("s.csv"), &[(Modality::Face, d.join("two.npy"))]).unwrap_err();
    assert!(
        matches!(
            e,
            DatasetError::ShapeMismatch {
                rows: 2,
                subjects: 3,
                ..
            }
        ),
        "{e:?}"
    );
    let e = IngestSource::open(
        d.join("s.csv"),
        &[
            (Modality::Face, d.join("zero.npy")),
            (Modality::Face, d.join("zero.npy")),
        ],
    )
    .unwrap_err();
    assert!(matches!(e, DatasetError::DuplicateModality { .. }));
    let e = IngestSource::open(d.join("s.csv"), &[(Modality::Face, PathBuf::from("x.bin"))])
        .unwrap_err();
    assert!(matches!(e, DatasetError::UnknownFormat { .. }));
}

#[test]
fn ingest_reads_a_generated_population() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = PopulationConfig {
        records: 700,
        seed: 1,
        impostor_pairs: 1000,
        ..PopulationConfig::default()
    };
    write_population(&cfg, dir.path(), &mut |_, _| {}).unwrap();
    let g = Generator::new(cfg).unwrap();
    let files: Vec<(Modality, PathBuf)> = g
        .modalities()
        .iter()
        .map(|(m, _)| (*m, dir.path().join(format!("{}.npy", m.key()))))
        .collect();
    let src = IngestSource::open(dir.path().join("subjects.csv"), &files).unwrap();
    src.validate_all().unwrap();
    let read: Vec<RecordBatch> = src.batches(300).map(|b| b.unwrap()).collect();
    let generated: Vec<RecordBatch> = g.batches(300).map(|b| b.records).collect();
    assert_eq!(read, generated);
}
