//! Parquet in and out (feature `parquet`).
//!
//! # Input: [`ParquetSource`]
//! One table, one row per enrolment: a subject-ID column (`subject_id` by default; strings, or integers
//! written in decimal) and one column per modality named by its key (`face`, `finger1` … `finger10`, as
//! [`Modality::key`] spells them), each a `fixed_size_list` or `list`/`large_list` of `float` (f32) or
//! `halffloat` (f16). A null list is an absent template; a `<key>_quality` column (f32/f64, null = 1.0)
//! gives capture qualities as a subjects file's does. Names can be overridden ([`ParquetColumns`]).
//!
//! The file is never loaded whole: [`ParquetSource::open`] reads the schema, the ID and quality columns
//! (a few bytes per row) and, for a `list` column, the first non-null row (its dimension); the template
//! columns are then streamed by [`RecordSource::record_batches`] in batches of a few thousand rows, so memory
//! stays bounded by one batch whatever the row-group size. Every problem is a [`DatasetError`] naming the
//! file and the column ([`DatasetError::ParquetColumn`]) or the row and column ([`DatasetError::ParquetRow`]).
//!
//! # Output: [`TableWriter`]
//! A small typed-column writer (strings, u64, f64, nullable f64, bool) used for dedup hits and clusters;
//! [`write_records`] writes enrolments in the input layout above (fixtures, conversions).

use crate::error::{DatasetError, Result};
use crate::ingest::{MIN_TEMPLATE_NORM, RecordSource};
use crate::modality::{Modality, ModalityBlock, RecordBatch};
use crate::subjects::MAX_ID_BYTES;
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int32Type, Int64Type, UInt32Type, UInt64Type,
};
use arrow_array::{
    Array, ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Float64Array, ListArray,
    StringArray, UInt64Array,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows per batch read while scanning the ID and quality columns.
const SCAN_ROWS: usize = 65_536;

/// Which columns hold the subject IDs and each modality's templates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParquetColumns {
    /// The subject-ID column (default `subject_id`).
    pub id: String,
    /// Modality columns named explicitly; every other modality is looked up by its key (`face`, `finger2`).
    pub modalities: Vec<(Modality, String)>,
}

impl Default for ParquetColumns {
    fn default() -> Self {
        ParquetColumns {
            id: "subject_id".into(),
            modalities: Vec::new(),
        }
    }
}

impl ParquetColumns {
    /// Parses a `MODALITY=COLUMN` override (`face=emb_face`, `finger2=ri`, `2=ri`) into [`Self::modalities`].
    pub fn push_override(&mut self, spec: &str) -> std::result::Result<(), String> {
        let (m, c) = spec
            .split_once('=')
            .ok_or_else(|| format!("--column {spec:?}: expected MODALITY=COLUMN, e.g. face=emb"))?;
        let m: Modality = m.parse().map_err(|e| format!("--column {spec:?}: {e}"))?;
        if c.is_empty() {
            return Err(format!("--column {spec:?}: empty column name"));
        }
        if self.modalities.iter().any(|(x, _)| *x == m) {
            return Err(format!("--column: modality {m} given twice"));
        }
        self.modalities.push((m, c.to_string()));
        Ok(())
    }
}

/// Element type of a template column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F32,
    F16,
}

/// List layout of a template column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Fixed,
    List,
    LargeList,
}

/// One modality's template column.
#[derive(Clone, Debug)]
struct TemplateColumn {
    modality: Modality,
    name: String,
    root: usize,
    layout: Layout,
    elem: Elem,
    dim: usize,
}

/// A Parquet file of enrolments, checked and ready to stream (see the module docs).
#[derive(Debug)]
pub struct ParquetSource {
    path: PathBuf,
    rows: usize,
    ids: Vec<String>,
    id_column: String,
    columns: Vec<TemplateColumn>,
    /// Per template column: its quality column's name and values (null = `None`).
    quality: Vec<Option<(String, Vec<Option<f32>>)>>,
}

fn pq_err(path: &Path, e: impl std::fmt::Display) -> DatasetError {
    DatasetError::Parquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn col_err(path: &Path, column: &str, problem: impl Into<String>) -> DatasetError {
    DatasetError::ParquetColumn {
        path: path.to_path_buf(),
        column: column.to_string(),
        problem: problem.into(),
    }
}

fn builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let f = File::open(path).map_err(|e| DatasetError::io(path, "open", e))?;
    ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| pq_err(path, e))
}

/// A reader of the root columns `roots` (indices into the file's schema), `batch` rows at a time.
fn reader(path: &Path, roots: &[usize], batch: usize) -> Result<ParquetRecordBatchReader> {
    let b = builder(path)?;
    let mask = ProjectionMask::roots(b.parquet_schema(), roots.iter().copied());
    b.with_projection(mask)
        .with_batch_size(batch.max(1))
        .build()
        .map_err(|e| pq_err(path, e))
}

fn describe(t: &DataType) -> String {
    format!("{t}")
}

/// The layout and element type of a template column, or why it is not one.
fn template_type(t: &DataType) -> std::result::Result<(Layout, Elem, Option<usize>), String> {
    let (layout, inner, fixed) = match t {
        DataType::FixedSizeList(f, n) => (Layout::Fixed, f.data_type(), Some(*n)),
        DataType::List(f) => (Layout::List, f.data_type(), None),
        DataType::LargeList(f) => (Layout::LargeList, f.data_type(), None),
        other => {
            return Err(format!(
                "type {} is not a list of float or halffloat (expected fixed_size_list<float>, list<float> or list<halffloat>)",
                describe(other)
            ));
        }
    };
    let elem = match inner {
        DataType::Float32 => Elem::F32,
        DataType::Float16 => Elem::F16,
        other => {
            return Err(format!(
                "a list of {} is not a list of float or halffloat",
                describe(other)
            ));
        }
    };
    let dim = match fixed {
        Some(n) if n <= 0 => return Err(format!("fixed_size_list of size {n}")),
        Some(n) => Some(n as usize),
        None => None,
    };
    Ok((layout, elem, dim))
}

impl ParquetSource {
    /// Opens `path`, checks its schema against `cols`, and reads its ID and quality columns (checking every
    /// ID: non-null, non-empty, at most 256 bytes, no control characters, unique; every quality in [0, 1]).
    pub fn open(path: impl AsRef<Path>, cols: &ParquetColumns) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let b = builder(&path)?;
        let schema: SchemaRef = b.schema().clone();
        let rows = usize::try_from(b.metadata().file_metadata().num_rows())
            .map_err(|_| pq_err(&path, "negative row count in the footer"))?;
        drop(b);
        let index_of = |name: &str| schema.fields().iter().position(|f| f.name() == name);
        let id_root = index_of(&cols.id).ok_or_else(|| {
            col_err(
                &path,
                &cols.id,
                "missing: no subject-ID column of this name (--id-column names another)",
            )
        })?;
        match schema.field(id_root).data_type() {
            DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt32
            | DataType::UInt64 => {}
            other => {
                return Err(col_err(
                    &path,
                    &cols.id,
                    format!(
                        "subject IDs must be strings or integers, not {}",
                        describe(other)
                    ),
                ));
            }
        }
        // Template columns: explicit ones first, then every other modality by its key.
        let mut wanted: Vec<(Modality, String, bool)> = cols
            .modalities
            .iter()
            .map(|(m, c)| (*m, c.clone(), true))
            .collect();
        let conventional = std::iter::once(Modality::Face).chain((1..=10).map(Modality::Finger));
        for m in conventional {
            if !wanted.iter().any(|(x, _, _)| *x == m) && index_of(&m.key()).is_some() {
                wanted.push((m, m.key(), false));
            }
        }
        wanted.sort_by_key(|w| w.0);
        let mut columns = Vec::with_capacity(wanted.len());
        for (m, name, _) in &wanted {
            let root = index_of(name).ok_or_else(|| {
                col_err(&path, name, format!("missing: --column names it for {m}"))
            })?;
            if root == id_root {
                return Err(col_err(
                    &path,
                    name,
                    "is the subject-ID column; it cannot hold templates",
                ));
            }
            if let Some(other) = columns.iter().find(|c: &&TemplateColumn| c.root == root) {
                return Err(col_err(
                    &path,
                    name,
                    format!("given for both {} and {m}", other.modality),
                ));
            }
            let (layout, elem, dim) = template_type(schema.field(root).data_type())
                .map_err(|p| col_err(&path, name, p))?;
            columns.push(TemplateColumn {
                modality: *m,
                name: name.clone(),
                root,
                layout,
                elem,
                dim: dim.unwrap_or(0),
            });
        }
        if columns.is_empty() {
            return Err(col_err(
                &path,
                "face",
                "no template column: expected `face` or `finger1` … `finger10` (or name them with --column MODALITY=COLUMN)",
            ));
        }
        // Quality columns, `<key>_quality`.
        let mut quality_roots: Vec<Option<(usize, String)>> = Vec::with_capacity(columns.len());
        for c in &columns {
            let qname = format!("{}_quality", c.modality.key());
            match index_of(&qname) {
                Some(r) => match schema.field(r).data_type() {
                    DataType::Float32 | DataType::Float64 => quality_roots.push(Some((r, qname))),
                    other => {
                        return Err(col_err(
                            &path,
                            &qname,
                            format!("quality must be float or double, not {}", describe(other)),
                        ));
                    }
                },
                None => quality_roots.push(None),
            }
        }
        let mut src = ParquetSource {
            path,
            rows,
            ids: Vec::with_capacity(rows),
            id_column: cols.id.clone(),
            columns,
            quality: quality_roots
                .iter()
                .map(|q| {
                    q.as_ref()
                        .map(|(_, n)| (n.clone(), Vec::with_capacity(rows)))
                })
                .collect(),
        };
        src.scan_ids_and_quality(id_root, &quality_roots)?;
        for k in 0..src.columns.len() {
            if src.columns[k].layout != Layout::Fixed {
                src.columns[k].dim = src.first_list_len(k)?;
            }
        }
        Ok(src)
    }

    /// Reads and checks every ID and quality value.
    fn scan_ids_and_quality(
        &mut self,
        id_root: usize,
        quality_roots: &[Option<(usize, String)>],
    ) -> Result<()> {
        let mut roots = vec![id_root];
        roots.extend(quality_roots.iter().flatten().map(|(r, _)| *r));
        let path = self.path.clone();
        let mut seen: std::collections::HashMap<String, u64> =
            std::collections::HashMap::with_capacity(self.rows);
        for batch in reader(&path, &roots, SCAN_ROWS)? {
            let batch = batch.map_err(|e| pq_err(&path, e))?;
            let start = self.ids.len() as u64;
            let ids = batch
                .column_by_name(&self.id_column)
                .ok_or_else(|| col_err(&path, &self.id_column, "not returned by the reader"))?;
            for i in 0..batch.num_rows() {
                let row = start + i as u64;
                let bad = |problem: String, subject: Option<String>| DatasetError::ParquetRow {
                    path: path.clone(),
                    row,
                    subject,
                    column: self.id_column.clone(),
                    problem,
                };
                if ids.is_null(i) {
                    return Err(bad("null subject ID".into(), None));
                }
                let id = id_at(ids.as_ref(), i)
                    .ok_or_else(|| bad("unreadable subject ID".into(), None))?;
                if id.trim().is_empty() {
                    return Err(bad("empty subject ID".into(), None));
                }
                if id.len() > MAX_ID_BYTES {
                    return Err(bad(
                        format!("subject ID is {} bytes, more than {MAX_ID_BYTES}", id.len()),
                        Some(crate::error::shorten(&id)),
                    ));
                }
                if id.chars().any(char::is_control) {
                    return Err(bad(
                        "subject ID contains a control character".into(),
                        Some(crate::error::shorten(&id)),
                    ));
                }
                if let Some(first) = seen.insert(id.clone(), row) {
                    return Err(bad(
                        format!("subject ID appears twice, on rows {first} and {row}"),
                        Some(crate::error::shorten(&id)),
                    ));
                }
                self.ids.push(id);
            }
            for (q, out) in quality_roots.iter().zip(self.quality.iter_mut()) {
                let (Some((_, qname)), Some((_, values))) = (q, out) else {
                    continue;
                };
                let col = batch
                    .column_by_name(qname)
                    .ok_or_else(|| col_err(&path, qname, "not returned by the reader"))?;
                for i in 0..batch.num_rows() {
                    let v = if col.is_null(i) {
                        None
                    } else if let Some(a) = col.as_primitive_opt::<Float32Type>() {
                        Some(f64::from(a.value(i)))
                    } else if let Some(a) = col.as_primitive_opt::<Float64Type>() {
                        Some(a.value(i))
                    } else {
                        return Err(col_err(&path, qname, "quality must be float or double"));
                    };
                    if let Some(v) = v
                        && !(0.0..=1.0).contains(&v)
                    {
                        return Err(DatasetError::ParquetRow {
                            path: path.clone(),
                            row: start + i as u64,
                            subject: self.ids.get(start as usize + i).cloned(),
                            column: qname.clone(),
                            problem: format!("quality {v} is not in [0, 1]"),
                        });
                    }
                    values.push(v.map(|v| v as f32));
                }
            }
        }
        if self.ids.len() != self.rows {
            return Err(pq_err(
                &path,
                format!(
                    "the footer promises {} rows but {} were read",
                    self.rows,
                    self.ids.len()
                ),
            ));
        }
        Ok(())
    }

    /// The length of the first non-null list of template column `k` (streams that column only until found).
    fn first_list_len(&self, k: usize) -> Result<usize> {
        let c = &self.columns[k];
        let mut row = 0u64;
        for batch in reader(&self.path, &[c.root], 4096)? {
            let batch = batch.map_err(|e| pq_err(&self.path, e))?;
            let a = batch
                .column_by_name(&c.name)
                .ok_or_else(|| col_err(&self.path, &c.name, "not returned by the reader"))?;
            let lens: Vec<Option<usize>> = match c.layout {
                Layout::List => {
                    let l = a.as_list::<i32>();
                    (0..l.len())
                        .map(|i| (!l.is_null(i)).then(|| l.value_length(i) as usize))
                        .collect()
                }
                Layout::LargeList => {
                    let l = a.as_list::<i64>();
                    (0..l.len())
                        .map(|i| (!l.is_null(i)).then(|| l.value_length(i) as usize))
                        .collect()
                }
                Layout::Fixed => return Ok(c.dim),
            };
            for (i, len) in lens.into_iter().enumerate() {
                match len {
                    Some(0) => {
                        return Err(DatasetError::ParquetRow {
                            path: self.path.clone(),
                            row: row + i as u64,
                            subject: self.ids.get(row as usize + i).cloned(),
                            column: c.name.clone(),
                            problem: "empty list: a template needs at least one value".into(),
                        });
                    }
                    Some(n) => return Ok(n),
                    None => {}
                }
            }
            row += batch.num_rows() as u64;
        }
        Err(col_err(
            &self.path,
            &c.name,
            "every row is null: the column holds no template, so its dimension is unknown (drop the column)",
        ))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Subject IDs in row order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }
    /// `(modality, column name, dimension)` of each template column, in modality order.
    pub fn columns(&self) -> Vec<(Modality, String, usize)> {
        self.columns
            .iter()
            .map(|c| (c.modality, c.name.clone(), c.dim))
            .collect()
    }

    /// Reads a streamed batch starting at row `start` into a [`RecordBatch`], checking every template.
    fn convert(&self, start: usize, batch: &arrow_array::RecordBatch) -> Result<RecordBatch> {
        let n = batch.num_rows();
        let end = start + n;
        if end > self.ids.len() {
            return Err(pq_err(
                &self.path,
                format!("more rows than the {} the footer promises", self.rows),
            ));
        }
        let mut blocks = Vec::with_capacity(self.columns.len());
        for (k, c) in self.columns.iter().enumerate() {
            let a = batch
                .column_by_name(&c.name)
                .ok_or_else(|| col_err(&self.path, &c.name, "not returned by the reader"))?;
            let rows = ListRows::of(a, c).map_err(|p| col_err(&self.path, &c.name, p))?;
            let quality = self.quality[k].as_ref().map(|(_, q)| &q[start..end]);
            let mut block = ModalityBlock {
                modality: c.modality,
                dim: c.dim,
                data: vec![0.0; n * c.dim],
                present: vec![false; n],
                quality: vec![0.0; n],
            };
            for i in 0..n {
                let s = start + i;
                let bad = |problem: String| DatasetError::ParquetRow {
                    path: self.path.clone(),
                    row: s as u64,
                    subject: Some(crate::error::shorten(&self.ids[s])),
                    column: c.name.clone(),
                    problem,
                };
                let Some((lo, hi)) = rows.range(i) else {
                    continue;
                };
                if hi - lo != c.dim {
                    return Err(bad(format!(
                        "template has {} values, expected {} (the column's dimension)",
                        hi - lo,
                        c.dim
                    )));
                }
                if rows.values_have_nulls && (lo..hi).any(|j| rows.values.is_null(j)) {
                    return Err(bad("null value inside the template".into()));
                }
                let out = &mut block.data[i * c.dim..(i + 1) * c.dim];
                match (rows.f32s, rows.f16s) {
                    (Some(v), _) => out.copy_from_slice(&v[lo..hi]),
                    (None, Some(v)) => out
                        .iter_mut()
                        .zip(&v[lo..hi])
                        .for_each(|(o, h)| *o = h.to_f32()),
                    (None, None) => return Err(bad("values are not float or halffloat".into())),
                }
                if out.iter().any(|x| !x.is_finite()) {
                    return Err(bad("NaN or infinite value".into()));
                }
                if out.iter().all(|&x| x == 0.0) {
                    return Err(bad(
                        "all-zero (zero-norm) template; write a null for an absent template".into(),
                    ));
                }
                let n2: f64 = out.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                if n2 < MIN_TEMPLATE_NORM * MIN_TEMPLATE_NORM {
                    return Err(bad("near-zero norm (below 1e-6): numerically empty".into()));
                }
                block.present[i] = true;
                block.quality[i] = quality.and_then(|q| q[i]).unwrap_or(1.0);
            }
            blocks.push(block);
        }
        for i in 0..n {
            if !blocks.iter().any(|b| b.present[i]) {
                let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
                return Err(DatasetError::ParquetRow {
                    path: self.path.clone(),
                    row: (start + i) as u64,
                    subject: Some(crate::error::shorten(&self.ids[start + i])),
                    column: names.join(","),
                    problem: "no template: every template column is null".into(),
                });
            }
        }
        Ok(RecordBatch {
            ids: self.ids[start..end].to_vec(),
            blocks,
        })
    }
}

/// The subject ID at row `i` of an ID column (strings, or integers in decimal).
fn id_at(a: &dyn Array, i: usize) -> Option<String> {
    if let Some(s) = a.as_string_opt::<i32>() {
        return Some(s.value(i).to_string());
    }
    if let Some(s) = a.as_string_opt::<i64>() {
        return Some(s.value(i).to_string());
    }
    if let Some(s) = a.as_string_view_opt() {
        return Some(s.value(i).to_string());
    }
    if let Some(v) = a.as_primitive_opt::<Int32Type>() {
        return Some(v.value(i).to_string());
    }
    if let Some(v) = a.as_primitive_opt::<Int64Type>() {
        return Some(v.value(i).to_string());
    }
    if let Some(v) = a.as_primitive_opt::<UInt32Type>() {
        return Some(v.value(i).to_string());
    }
    if let Some(v) = a.as_primitive_opt::<UInt64Type>() {
        return Some(v.value(i).to_string());
    }
    None
}

/// Row ranges of a list column over its flat values.
struct ListRows<'a> {
    /// `(lo, hi)` into the values per row, `None` for a null row.
    ranges: Vec<Option<(usize, usize)>>,
    values: &'a ArrayRef,
    values_have_nulls: bool,
    f32s: Option<&'a [f32]>,
    f16s: Option<&'a [half::f16]>,
}

impl<'a> ListRows<'a> {
    fn of(a: &'a ArrayRef, c: &TemplateColumn) -> std::result::Result<Self, String> {
        let (ranges, values): (Vec<Option<(usize, usize)>>, &ArrayRef) = match c.layout {
            Layout::Fixed => {
                let l = a
                    .as_fixed_size_list_opt()
                    .ok_or("not a fixed_size_list column")?;
                let d = l.value_length() as usize;
                (
                    (0..l.len())
                        .map(|i| {
                            (!l.is_null(i)).then(|| {
                                let lo = l.value_offset_at(i);
                                (lo, lo + d)
                            })
                        })
                        .collect(),
                    l.values(),
                )
            }
            Layout::List => {
                let l = a.as_list_opt::<i32>().ok_or("not a list column")?;
                let o = l.value_offsets();
                (
                    (0..l.len())
                        .map(|i| (!l.is_null(i)).then(|| (o[i] as usize, o[i + 1] as usize)))
                        .collect(),
                    l.values(),
                )
            }
            Layout::LargeList => {
                let l = a.as_list_opt::<i64>().ok_or("not a large_list column")?;
                let o = l.value_offsets();
                (
                    (0..l.len())
                        .map(|i| (!l.is_null(i)).then(|| (o[i] as usize, o[i + 1] as usize)))
                        .collect(),
                    l.values(),
                )
            }
        };
        let (f32s, f16s) = match c.elem {
            Elem::F32 => (
                Some(
                    values
                        .as_primitive_opt::<Float32Type>()
                        .ok_or("values are not float")?
                        .values()
                        .as_ref(),
                ),
                None,
            ),
            Elem::F16 => (
                None,
                Some(
                    values
                        .as_primitive_opt::<Float16Type>()
                        .ok_or("values are not halffloat")?
                        .values()
                        .as_ref(),
                ),
            ),
        };
        Ok(ListRows {
            ranges,
            values,
            values_have_nulls: values.null_count() > 0,
            f32s,
            f16s,
        })
    }
    fn range(&self, i: usize) -> Option<(usize, usize)> {
        self.ranges[i]
    }
}

impl RecordSource for ParquetSource {
    fn len(&self) -> usize {
        self.rows
    }
    fn modalities(&self) -> Vec<(Modality, usize)> {
        self.columns.iter().map(|c| (c.modality, c.dim)).collect()
    }
    fn record_batches(
        &self,
        batch_size: usize,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch>> + '_> {
        let roots: Vec<usize> = self.columns.iter().map(|c| c.root).collect();
        let mut inner = match reader(&self.path, &roots, batch_size) {
            Ok(r) => r,
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        let mut start = 0usize;
        let mut failed = false;
        Box::new(std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let next = match inner.next()? {
                Ok(b) => self.convert(start, &b).inspect(|r| start += r.len()),
                Err(e) => Err(pq_err(&self.path, e)),
            };
            failed = next.is_err();
            Some(next)
        }))
    }
    fn source_path(&self) -> &Path {
        &self.path
    }
    fn place(&self, index: usize) -> String {
        format!("row {index}")
    }
}

/// Type of a column written by [`TableWriter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// UTF-8 strings (`string`).
    Utf8,
    /// Unsigned 64-bit integers (`uint64`).
    U64,
    /// 64-bit floats (`double`), never null.
    F64,
    /// 64-bit floats (`double`), nullable.
    NullableF64,
    /// Booleans (`bool`).
    Bool,
}

/// Values of one column for [`TableWriter::write`], in the column's [`ColumnKind`].
#[derive(Clone, Debug, PartialEq)]
pub enum ColumnData {
    /// For [`ColumnKind::Utf8`].
    Utf8(Vec<String>),
    /// For [`ColumnKind::U64`].
    U64(Vec<u64>),
    /// For [`ColumnKind::F64`].
    F64(Vec<f64>),
    /// For [`ColumnKind::NullableF64`].
    NullableF64(Vec<Option<f64>>),
    /// For [`ColumnKind::Bool`].
    Bool(Vec<bool>),
}

impl ColumnData {
    fn len(&self) -> usize {
        match self {
            ColumnData::Utf8(v) => v.len(),
            ColumnData::U64(v) => v.len(),
            ColumnData::F64(v) => v.len(),
            ColumnData::NullableF64(v) => v.len(),
            ColumnData::Bool(v) => v.len(),
        }
    }
}

/// Writes a Parquet table of typed columns, chunk by chunk (zstd-compressed; each [`write`](Self::write)
/// call adds rows; row groups of at most 1 Mi rows).
pub struct TableWriter {
    path: PathBuf,
    schema: SchemaRef,
    kinds: Vec<ColumnKind>,
    writer: ArrowWriter<BufWriter<File>>,
}

impl TableWriter {
    /// A writer of `columns` into `file` (already created by the caller, e.g. with private permissions);
    /// `path` is only used in error messages.
    pub fn new(file: File, path: &Path, columns: &[(&str, ColumnKind)]) -> Result<Self> {
        let fields: Vec<Field> = columns
            .iter()
            .map(|(name, kind)| {
                let (t, nullable) = match kind {
                    ColumnKind::Utf8 => (DataType::Utf8, false),
                    ColumnKind::U64 => (DataType::UInt64, false),
                    ColumnKind::F64 => (DataType::Float64, false),
                    ColumnKind::NullableF64 => (DataType::Float64, true),
                    ColumnKind::Bool => (DataType::Boolean, false),
                };
                Field::new(*name, t, nullable)
            })
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(Default::default()))
            .build();
        let writer = ArrowWriter::try_new(
            BufWriter::with_capacity(1 << 20, file),
            schema.clone(),
            Some(props),
        )
        .map_err(|e| pq_err(path, e))?;
        Ok(TableWriter {
            path: path.to_path_buf(),
            schema,
            kinds: columns.iter().map(|(_, k)| *k).collect(),
            writer,
        })
    }

    /// Appends rows: one [`ColumnData`] per column, in order, all of the same length and of the declared kinds.
    pub fn write(&mut self, data: Vec<ColumnData>) -> Result<()> {
        let bad = |reason: String| pq_err(&self.path, reason);
        if data.len() != self.kinds.len() {
            return Err(bad(format!(
                "{} columns given for a table of {}",
                data.len(),
                self.kinds.len()
            )));
        }
        let rows = data.first().map_or(0, ColumnData::len);
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(data.len());
        for (i, (d, k)) in data.into_iter().zip(&self.kinds).enumerate() {
            if d.len() != rows {
                return Err(bad(format!(
                    "column {} has {} values, column 0 has {rows}",
                    i,
                    d.len()
                )));
            }
            let a: ArrayRef = match (d, k) {
                (ColumnData::Utf8(v), ColumnKind::Utf8) => Arc::new(StringArray::from(v)),
                (ColumnData::U64(v), ColumnKind::U64) => Arc::new(UInt64Array::from(v)),
                (ColumnData::F64(v), ColumnKind::F64) => Arc::new(Float64Array::from(v)),
                (ColumnData::NullableF64(v), ColumnKind::NullableF64) => {
                    Arc::new(Float64Array::from(v))
                }
                (ColumnData::Bool(v), ColumnKind::Bool) => Arc::new(BooleanArray::from(v)),
                (_, k) => return Err(bad(format!("column {i}: values are not of kind {k:?}"))),
            };
            arrays.push(a);
        }
        let batch = arrow_array::RecordBatch::try_new(self.schema.clone(), arrays)
            .map_err(|e| bad(e.to_string()))?;
        self.writer.write(&batch).map_err(|e| bad(e.to_string()))
    }

    /// Writes the footer and returns the flushed file (for `sync_all`).
    pub fn finish(self) -> Result<File> {
        let path = self.path;
        let w = self.writer.into_inner().map_err(|e| pq_err(&path, e))?;
        w.into_inner()
            .map_err(|e| DatasetError::io(&path, "write", e.into_error()))
    }
}

/// How [`write_records`] lays out template columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordsLayout {
    /// `fixed_size_list` (true) or `list` (false).
    pub fixed: bool,
    /// `halffloat` (true) or `float` (false) values.
    pub half: bool,
    /// Rows per row group.
    pub row_group_rows: usize,
    /// Also write `<key>_quality` columns (float; null where the template is absent).
    pub quality: bool,
}

impl Default for RecordsLayout {
    fn default() -> Self {
        RecordsLayout {
            fixed: true,
            half: false,
            row_group_rows: 65_536,
            quality: true,
        }
    }
}

/// Writes enrolments in the layout [`ParquetSource`] reads (`subject_id`, one column per modality named by its
/// key, null = absent, optional `<key>_quality`), one batch at a time; returns the rows written.
pub fn write_records<I>(path: &Path, batches: I, layout: RecordsLayout) -> Result<u64>
where
    I: IntoIterator<Item = Result<RecordBatch>>,
{
    let file = File::create(path).map_err(|e| DatasetError::io(path, "create", e))?;
    let mut writer: Option<ArrowWriter<BufWriter<File>>> = None;
    let mut schema: Option<SchemaRef> = None;
    let mut rows = 0u64;
    let mut file = Some(file);
    for b in batches {
        let b = b?;
        if schema.is_none() {
            let mut fields = vec![Field::new("subject_id", DataType::Utf8, false)];
            for blk in &b.blocks {
                let item = Arc::new(Field::new(
                    "item",
                    if layout.half {
                        DataType::Float16
                    } else {
                        DataType::Float32
                    },
                    true,
                ));
                let t = if layout.fixed {
                    DataType::FixedSizeList(item, blk.dim as i32)
                } else {
                    DataType::List(item)
                };
                fields.push(Field::new(blk.modality.key(), t, true));
                if layout.quality {
                    fields.push(Field::new(
                        format!("{}_quality", blk.modality.key()),
                        DataType::Float32,
                        true,
                    ));
                }
            }
            let s = Arc::new(Schema::new(fields));
            let props = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_max_row_group_row_count(Some(layout.row_group_rows.max(1)))
                .build();
            let f = file
                .take()
                .ok_or_else(|| pq_err(path, "writer already started"))?;
            writer = Some(
                ArrowWriter::try_new(BufWriter::new(f), s.clone(), Some(props))
                    .map_err(|e| pq_err(path, e))?,
            );
            schema = Some(s);
        }
        let (Some(w), Some(s)) = (writer.as_mut(), schema.as_ref()) else {
            continue;
        };
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(StringArray::from(b.ids.clone()))];
        for blk in &b.blocks {
            let nulls = Some(NullBuffer::from(blk.present.as_slice()));
            let values: ArrayRef = if layout.half {
                Arc::new(arrow_array::Float16Array::from(
                    blk.data
                        .iter()
                        .map(|&x| half::f16::from_f32(x))
                        .collect::<Vec<_>>(),
                ))
            } else {
                Arc::new(Float32Array::from(blk.data.clone()))
            };
            let item = Arc::new(Field::new("item", values.data_type().clone(), true));
            let list: ArrayRef = if layout.fixed {
                Arc::new(
                    FixedSizeListArray::try_new(item, blk.dim as i32, values, nulls)
                        .map_err(|e| pq_err(path, e))?,
                )
            } else {
                let offs = OffsetBuffer::<i32>::from_lengths(std::iter::repeat_n(
                    blk.dim,
                    blk.present.len(),
                ));
                Arc::new(
                    ListArray::try_new(item, offs, values, nulls).map_err(|e| pq_err(path, e))?,
                )
            };
            arrays.push(list);
            if layout.quality {
                arrays.push(Arc::new(Float32Array::from(
                    blk.present
                        .iter()
                        .zip(&blk.quality)
                        .map(|(&p, &q)| p.then_some(q))
                        .collect::<Vec<_>>(),
                )));
            }
        }
        let rb =
            arrow_array::RecordBatch::try_new(s.clone(), arrays).map_err(|e| pq_err(path, e))?;
        w.write(&rb).map_err(|e| pq_err(path, e))?;
        rows += b.len() as u64;
    }
    match writer {
        Some(w) => {
            let mut inner = w.into_inner().map_err(|e| pq_err(path, e))?;
            inner
                .flush()
                .map_err(|e| DatasetError::io(path, "write", e))?;
        }
        None => return Err(pq_err(path, "no records to write")),
    }
    Ok(rows)
}

/// Reads a whole (small) table of the kinds [`TableWriter`] writes, as `(column name, values)` in file order
/// (for tests and checks; dedup outputs are read back with it). Other column types are refused, naming them.
pub fn read_table(path: &Path) -> Result<Vec<(String, ColumnData)>> {
    let b = builder(path)?;
    let schema = b.schema().clone();
    let mut out: Vec<(String, ColumnData)> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let empty = match f.data_type() {
            DataType::Utf8 => ColumnData::Utf8(Vec::new()),
            DataType::UInt64 => ColumnData::U64(Vec::new()),
            DataType::Float64 if f.is_nullable() => ColumnData::NullableF64(Vec::new()),
            DataType::Float64 => ColumnData::F64(Vec::new()),
            DataType::Boolean => ColumnData::Bool(Vec::new()),
            other => {
                return Err(col_err(
                    path,
                    f.name(),
                    format!("type {other} is not one TableWriter writes"),
                ));
            }
        };
        out.push((f.name().clone(), empty));
    }
    let r = b.build().map_err(|e| pq_err(path, e))?;
    for batch in r {
        let batch = batch.map_err(|e| pq_err(path, e))?;
        for (k, (name, col)) in out.iter_mut().enumerate() {
            let a = batch.column(k);
            let wrong = || col_err(path, name, "unexpected array type");
            match col {
                ColumnData::Utf8(v) => {
                    let s = a.as_string_opt::<i32>().ok_or_else(wrong)?;
                    v.extend((0..s.len()).map(|i| s.value(i).to_string()));
                }
                ColumnData::U64(v) => {
                    let p = a.as_primitive_opt::<UInt64Type>().ok_or_else(wrong)?;
                    v.extend_from_slice(p.values());
                }
                ColumnData::F64(v) => {
                    let p = a.as_primitive_opt::<Float64Type>().ok_or_else(wrong)?;
                    v.extend_from_slice(p.values());
                }
                ColumnData::NullableF64(v) => {
                    let p = a.as_primitive_opt::<Float64Type>().ok_or_else(wrong)?;
                    v.extend((0..p.len()).map(|i| (!p.is_null(i)).then(|| p.value(i))));
                }
                ColumnData::Bool(v) => {
                    let p = a.as_boolean_opt().ok_or_else(wrong)?;
                    v.extend((0..p.len()).map(|i| p.value(i)));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "parquet_tests.rs"]
mod tests;
