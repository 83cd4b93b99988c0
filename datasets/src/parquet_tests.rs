//! Unit tests of the Parquet reader and writer: fixtures are written with the parquet crate itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use arrow_array::Int32Array;
use tempfile::TempDir;

/// A record batch of `n` records with face (dim 4) and finger 2 (dim 3): record `i` lacks its face when
/// `i % 5 == 3` and its finger when `i % 7 == 2` (never both); qualities vary.
fn records(n: usize) -> RecordBatch {
    let mut face = ModalityBlock {
        modality: Modality::Face,
        dim: 4,
        data: Vec::new(),
        present: Vec::new(),
        quality: Vec::new(),
    };
    let mut finger = ModalityBlock {
        modality: Modality::Finger(2),
        dim: 3,
        data: Vec::new(),
        present: Vec::new(),
        quality: Vec::new(),
    };
    for i in 0..n {
        let x = i as f32;
        let fp = i % 5 != 3;
        face.present.push(fp);
        face.quality.push(if fp {
            0.25 + (i % 3) as f32 * 0.25
        } else {
            0.0
        });
        if fp {
            face.data.extend([1.0 + x, -0.5, 0.25 * x, 0.125]);
        } else {
            face.data.extend([0.0; 4]);
        }
        let gp = i % 7 != 2 || !fp;
        finger.present.push(gp);
        finger.quality.push(if gp { 1.0 } else { 0.0 });
        if gp {
            finger.data.extend([0.5, x, -2.0]);
        } else {
            finger.data.extend([0.0; 3]);
        }
    }
    RecordBatch {
        ids: (0..n).map(|i| format!("S{i:04}")).collect(),
        blocks: vec![face, finger],
    }
}

fn read_all(src: &ParquetSource, batch: usize) -> Result<RecordBatch> {
    let mut all = RecordBatch::default();
    for b in src.record_batches(batch) {
        let b = b?;
        if all.blocks.is_empty() {
            all.blocks = b
                .blocks
                .iter()
                .map(|x| ModalityBlock {
                    data: vec![],
                    present: vec![],
                    quality: vec![],
                    ..x.clone()
                })
                .collect();
        }
        all.ids.extend(b.ids);
        for (o, x) in all.blocks.iter_mut().zip(b.blocks) {
            o.data.extend(x.data);
            o.present.extend(x.present);
            o.quality.extend(x.quality);
        }
    }
    Ok(all)
}

fn row_groups(path: &Path) -> usize {
    builder(path).unwrap().metadata().num_row_groups()
}

#[test]
fn fixed_f32_round_trip_over_row_groups_with_nulls_and_quality() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("t.parquet");
    let recs = records(50);
    let halves = vec![
        Ok(RecordBatch {
            ids: recs.ids[..20].to_vec(),
            blocks: recs.blocks.iter().map(|b| slice_block(b, 0, 20)).collect(),
        }),
        Ok(RecordBatch {
            ids: recs.ids[20..].to_vec(),
            blocks: recs.blocks.iter().map(|b| slice_block(b, 20, 50)).collect(),
        }),
    ];
    let layout = RecordsLayout {
        row_group_rows: 7,
        ..Default::default()
    };
    assert_eq!(write_records(&p, halves, layout).unwrap(), 50);
    assert!(row_groups(&p) >= 7, "{} row groups", row_groups(&p));
    let src = ParquetSource::open(&p, &ParquetColumns::default()).unwrap();
    assert_eq!(src.len(), 50);
    assert_eq!(
        RecordSource::modalities(&src),
        vec![(Modality::Face, 4), (Modality::Finger(2), 3)]
    );
    // Batches smaller than, equal to and larger than a row group all give the same records.
    for batch in [1, 3, 7, 16, 1000] {
        let got = read_all(&src, batch).unwrap();
        assert_eq!(got, recs, "batch {batch}");
    }
}

fn slice_block(b: &ModalityBlock, lo: usize, hi: usize) -> ModalityBlock {
    ModalityBlock {
        modality: b.modality,
        dim: b.dim,
        data: b.data[lo * b.dim..hi * b.dim].to_vec(),
        present: b.present[lo..hi].to_vec(),
        quality: b.quality[lo..hi].to_vec(),
    }
}

#[test]
fn list_f16_reads_as_the_f16_values() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("t.parquet");
    let recs = records(30);
    let layout = RecordsLayout {
        fixed: false,
        half: true,
        row_group_rows: 8,
        quality: false,
    };
    write_records(&p, vec![Ok(recs.clone())], layout).unwrap();
    let src = ParquetSource::open(&p, &ParquetColumns::default()).unwrap();
    assert_eq!(
        RecordSource::modalities(&src),
        vec![(Modality::Face, 4), (Modality::Finger(2), 3)]
    );
    let got = read_all(&src, 5).unwrap();
    assert_eq!(got.ids, recs.ids);
    for (g, r) in got.blocks.iter().zip(&recs.blocks) {
        assert_eq!(g.present, r.present);
        let want: Vec<f32> = r
            .data
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        assert_eq!(g.data, want);
        // No quality column: 1.0 where present, 0.0 where absent.
        let q: Vec<f32> = r
            .present
            .iter()
            .map(|&p| if p { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(g.quality, q);
    }
}

/// Writes one batch of arbitrary columns as a Parquet file, in row groups of `rg` rows.
fn write_arrays(p: &Path, cols: Vec<(&str, ArrayRef)>, rg: usize) {
    let batch = arrow_array::RecordBatch::try_from_iter(cols).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(rg))
        .build();
    let mut w =
        ArrowWriter::try_new(File::create(p).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn ids(v: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}

/// A `list<float>` column from rows (None = null).
fn list(rows: Vec<Option<Vec<f32>>>) -> ArrayRef {
    Arc::new(ListArray::from_iter_primitive::<Float32Type, _, _>(
        rows.into_iter()
            .map(|r| r.map(|v| v.into_iter().map(Some).collect::<Vec<_>>())),
    ))
}

/// A `fixed_size_list<float, d>` column from rows (None = null).
fn fixed(d: i32, rows: Vec<Option<Vec<f32>>>) -> ArrayRef {
    Arc::new(
        FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
            rows.into_iter()
                .map(|r| r.map(|v| v.into_iter().map(Some).collect::<Vec<_>>())),
            d,
        ),
    )
}

fn open_err(p: &Path, cols: &ParquetColumns) -> DatasetError {
    ParquetSource::open(p, cols).expect_err("refused")
}

/// The first error of streaming the whole file.
fn stream_err(p: &Path) -> DatasetError {
    let src = ParquetSource::open(p, &ParquetColumns::default()).expect("schema accepted");
    read_all(&src, 2).expect_err("a row is refused")
}

fn assert_column(e: DatasetError, column: &str, needle: &str) {
    match &e {
        DatasetError::ParquetColumn {
            column: c, problem, ..
        } => {
            assert_eq!(c, column, "{e}");
            assert!(problem.contains(needle), "{e}");
        }
        other => panic!("expected a column error on {column}, got {other}"),
    }
}

fn assert_row(e: DatasetError, row: u64, column: &str, needle: &str) {
    match &e {
        DatasetError::ParquetRow {
            row: r,
            column: c,
            problem,
            ..
        } => {
            assert_eq!((*r, c.as_str()), (row, column), "{e}");
            assert!(problem.contains(needle), "{e}");
        }
        other => panic!("expected a row error at row {row} column {column}, got {other}"),
    }
}

#[test]
fn bad_schemas_are_refused_naming_the_column() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("t.parquet");
    let v = || Some(vec![1.0f32, 0.0, 0.0]);
    // No ID column.
    write_arrays(
        &p,
        vec![("id", ids(&["a"])), ("face", fixed(3, vec![v()]))],
        10,
    );
    assert_column(
        open_err(&p, &ParquetColumns::default()),
        "subject_id",
        "missing",
    );
    // ... but --id-column finds it.
    let cols = ParquetColumns {
        id: "id".into(),
        modalities: vec![],
    };
    assert!(ParquetSource::open(&p, &cols).is_ok());
    // A float ID column.
    write_arrays(
        &p,
        vec![
            (
                "subject_id",
                Arc::new(Float32Array::from(vec![1.0f32])) as ArrayRef,
            ),
            ("face", fixed(3, vec![v()])),
        ],
        10,
    );
    assert_column(
        open_err(&p, &ParquetColumns::default()),
        "subject_id",
        "strings or integers",
    );
    // A modality column that is not a list.
    write_arrays(
        &p,
        vec![
            ("subject_id", ids(&["a"])),
            (
                "face",
                Arc::new(Float32Array::from(vec![1.0f32])) as ArrayRef,
            ),
        ],
        10,
    );
    assert_column(
        open_err(&p, &ParquetColumns::default()),
        "face",
        "not a list of float",
    );
    // A list of integers.
    let ints: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
        Some(vec![Some(1), Some(2)]),
    ]));
    write_arrays(&p, vec![("subject_id", ids(&["a"])), ("finger2", ints)], 10);
    assert_column(
        open_err(&p, &ParquetColumns::default()),
        "finger2",
        "list of Int32",
    );
    // No template column at all.
    write_arrays(
        &p,
        vec![("subject_id", ids(&["a"])), ("emb", fixed(3, vec![v()]))],
        10,
    );
    assert_column(
        open_err(&p, &ParquetColumns::default()),
        "face",
        "no template column",
    );
    // --column naming a column that does not exist; --column finding it.
    let mut cols = ParquetColumns::default();
    cols.push_override("face=embedding").unwrap();
    assert_column(open_err(&p, &cols), "embedding", "missing");
    let mut cols = ParquetColumns::default();
    cols.push_override("face=emb").unwrap();
    let src = ParquetSource::open(&p, &cols).unwrap();
    assert_eq!(src.columns(), vec![(Modality::Face, "emb".to_string(), 3)]);
    // A list column whose every row is null: dimension unknown.
    write_arrays(
        &p,
        vec![
            ("subject_id", ids(&["a", "b"])),
            ("face", fixed(3, vec![v(), v()])),
            ("finger7", list(vec![None, None])),
        ],
        10,
    );
    assert_column(
        open_err(&p, &ParquetColumns::default()),
        "finger7",
        "every row is null",
    );
    // A quality column of the wrong type.
    write_arrays(
        &p,
        vec![
            ("subject_id", ids(&["a"])),
            ("face", fixed(3, vec![v()])),
            ("face_quality", ids(&["high"])),
        ],
        10,
    );
    assert_column(
        open_err(&p, &ParquetColumns::default()),
        "face_quality",
        "float or double",
    );
    // Bad overrides.
    let mut cols = ParquetColumns::default();
    assert!(cols.push_override("nose=x").is_err());
    assert!(cols.push_override("face").is_err());
    cols.push_override("2=x").unwrap();
    assert!(cols.push_override("finger2=y").is_err());
}

#[test]
fn bad_ids_are_refused_naming_the_row() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("t.parquet");
    let v = || Some(vec![1.0f32, 0.0, 0.0]);
    let case = |id_col: ArrayRef| {
        let n = id_col.len();
        write_arrays(
            &p,
            vec![("subject_id", id_col), ("face", fixed(3, vec![v(); n]))],
            2,
        );
        open_err(&p, &ParquetColumns::default())
    };
    assert_row(
        case(ids(&["a", "b", "c", "b"])),
        3,
        "subject_id",
        "rows 1 and 3",
    );
    assert_row(case(ids(&["a", " ", "c"])), 1, "subject_id", "empty");
    assert_row(
        case(ids(&["a", "b\u{7}"])),
        1,
        "subject_id",
        "control character",
    );
    let long = "x".repeat(300);
    assert_row(case(ids(&["a", &long])), 1, "subject_id", "more than 256");
    assert_row(
        case(Arc::new(StringArray::from(vec![Some("a"), None]))),
        1,
        "subject_id",
        "null subject ID",
    );
    // Integer IDs are read in decimal, and their duplicates found too.
    write_arrays(
        &p,
        vec![
            (
                "subject_id",
                Arc::new(Int32Array::from(vec![7, 8])) as ArrayRef,
            ),
            ("face", fixed(3, vec![v(), v()])),
        ],
        10,
    );
    assert_eq!(
        ParquetSource::open(&p, &ParquetColumns::default())
            .unwrap()
            .ids(),
        ["7", "8"]
    );
    assert_row(
        case(Arc::new(Int32Array::from(vec![7, 8, 7]))),
        2,
        "subject_id",
        "rows 0 and 2",
    );
}

#[test]
fn bad_rows_are_refused_naming_row_and_column_when_streamed() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("t.parquet");
    let v = |x: f32| Some(vec![x, 1.0, 0.0]);
    let with_face = |rows: Vec<Option<Vec<f32>>>, rg: usize| {
        let n = rows.len();
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        write_arrays(
            &p,
            vec![
                ("subject_id", ids(&refs)),
                ("face", list(rows)),
                ("finger2", fixed(3, vec![v(1.0); n])),
            ],
            rg,
        );
    };
    // NaN and infinity in the fifth row (second row group).
    with_face(vec![v(1.0), v(2.0), v(3.0), v(4.0), v(f32::NAN)], 3);
    assert_row(stream_err(&p), 4, "face", "NaN");
    with_face(vec![v(1.0), v(f32::INFINITY)], 3);
    assert_row(stream_err(&p), 1, "face", "infinite");
    // A zero vector (a null is how to say absent).
    with_face(vec![v(1.0), v(1.0), Some(vec![0.0; 3])], 2);
    assert_row(stream_err(&p), 2, "face", "all-zero");
    // A numerically empty one.
    with_face(vec![v(1.0), Some(vec![1e-8, 0.0, 0.0])], 2);
    assert_row(stream_err(&p), 1, "face", "near-zero");
    // Wrong length / mixed dims in a list column.
    with_face(vec![v(1.0), v(1.0), v(1.0), Some(vec![1.0, 2.0])], 2);
    assert_row(stream_err(&p), 3, "face", "has 2 values, expected 3");
    // An empty list as the first non-null value.
    with_face(vec![None, Some(vec![]), v(1.0)], 2);
    assert_row(
        open_err(&p, &ParquetColumns::default()),
        1,
        "face",
        "empty list",
    );
    // A null element inside a list.
    let with_null: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Float32Type, _, _>(vec![
        Some(vec![Some(1.0f32), Some(0.0), Some(0.0)]),
        Some(vec![Some(1.0f32), None, Some(0.0)]),
    ]));
    write_arrays(
        &p,
        vec![("subject_id", ids(&["a", "b"])), ("face", with_null)],
        10,
    );
    assert_row(stream_err(&p), 1, "face", "null value inside");
    // A record with every template null.
    write_arrays(
        &p,
        vec![
            ("subject_id", ids(&["a", "b", "c"])),
            ("face", list(vec![v(1.0), None, v(1.0)])),
            ("finger2", fixed(3, vec![v(1.0), None, None])),
        ],
        10,
    );
    assert_row(stream_err(&p), 1, "face,finger2", "no template");
    // Quality out of range (read when opening).
    write_arrays(
        &p,
        vec![
            ("subject_id", ids(&["a", "b"])),
            ("face", list(vec![v(1.0), v(1.0)])),
            (
                "face_quality",
                Arc::new(Float64Array::from(vec![0.5, 1.5])) as ArrayRef,
            ),
        ],
        10,
    );
    assert_row(
        open_err(&p, &ParquetColumns::default()),
        1,
        "face_quality",
        "not in [0, 1]",
    );
    // The error names the file.
    let msg = stream_err_or_open(&p);
    assert!(msg.contains("t.parquet"), "{msg}");
}

fn stream_err_or_open(p: &Path) -> String {
    match ParquetSource::open(p, &ParquetColumns::default()) {
        Err(e) => e.to_string(),
        Ok(s) => read_all(&s, 2).expect_err("refused").to_string(),
    }
}

#[test]
fn not_a_parquet_file_is_a_typed_error() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("t.parquet");
    std::fs::write(&p, b"subject_id,face\na,1\n").unwrap();
    let e = open_err(&p, &ParquetColumns::default());
    assert!(matches!(e, DatasetError::Parquet { .. }), "{e}");
    let e = open_err(
        &dir.path().join("missing.parquet"),
        &ParquetColumns::default(),
    );
    assert!(matches!(e, DatasetError::Io { .. }), "{e}");
}

#[test]
fn table_writer_round_trips_every_kind_and_checks_its_input() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("t.parquet");
    let cols = [
        ("s", ColumnKind::Utf8),
        ("n", ColumnKind::U64),
        ("x", ColumnKind::F64),
        ("y", ColumnKind::NullableF64),
        ("b", ColumnKind::Bool),
    ];
    let mut w = TableWriter::new(File::create(&p).unwrap(), &p, &cols).unwrap();
    let chunk = |k: u64| {
        vec![
            ColumnData::Utf8(vec![format!("a{k}"), "é,\"q\"".into()]),
            ColumnData::U64(vec![k, u64::MAX]),
            ColumnData::F64(vec![0.1 * k as f64, -1e300]),
            ColumnData::NullableF64(vec![None, Some(2.5)]),
            ColumnData::Bool(vec![true, false]),
        ]
    };
    w.write(chunk(1)).unwrap();
    w.write(chunk(2)).unwrap();
    // Wrong kind, wrong count, ragged lengths: refused, nothing written for them.
    assert!(w.write(vec![ColumnData::Bool(vec![]); 5]).is_err());
    assert!(w.write(chunk(3)[..4].to_vec()).is_err());
    let mut ragged = chunk(3);
    ragged[1] = ColumnData::U64(vec![1]);
    assert!(w.write(ragged).is_err());
    w.finish().unwrap();
    let t = read_table(&p).unwrap();
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["s", "n", "x", "y", "b"]);
    let mut want = chunk(1);
    for (w, more) in want.iter_mut().zip(chunk(2)) {
        match (w, more) {
            (ColumnData::Utf8(a), ColumnData::Utf8(b)) => a.extend(b),
            (ColumnData::U64(a), ColumnData::U64(b)) => a.extend(b),
            (ColumnData::F64(a), ColumnData::F64(b)) => a.extend(b),
            (ColumnData::NullableF64(a), ColumnData::NullableF64(b)) => a.extend(b),
            (ColumnData::Bool(a), ColumnData::Bool(b)) => a.extend(b),
            _ => unreachable!(),
        }
    }
    let got: Vec<ColumnData> = t.into_iter().map(|(_, c)| c).collect();
    assert_eq!(got, want);
}
