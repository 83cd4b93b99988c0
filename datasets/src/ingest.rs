//! Ingest sources: a subjects file plus one vector file (`.npy` or `.fvecs`) per modality, validated up front
//! and then streamed as [`RecordBatch`]es in subject order.

use crate::error::{DatasetError, Result};
use crate::fvecs::FvecsMatrix;
use crate::modality::{Modality, ModalityBlock, RecordBatch};
use crate::npy::NpyMatrix;
use crate::subjects::{Subjects, read_subjects};
use std::path::{Path, PathBuf};

/// Smallest accepted L2 norm of a present template (the store's floor; see
/// `pacha_engine::store::MIN_TEMPLATE_NORM` for why 1e-6).
pub const MIN_TEMPLATE_NORM: f64 = 1e-6;

/// Records to ingest from any input format: validated up front by the caller (every batch read once before
/// the first commit), then streamed again to commit. Implemented by [`IngestSource`] (subjects file + vector
/// files) and, with the `parquet` feature, `ParquetSource`.
pub trait RecordSource {
    /// Number of records.
    fn len(&self) -> usize;
    /// True when there are no records.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Modalities and their dimensions, in modality order.
    fn modalities(&self) -> Vec<(Modality, usize)>;
    /// Stream all records in order, in batches of at most `batch_size` records; each read checks every
    /// template (finite, norm, dimension, at least one per record) and stops at the first problem.
    fn record_batches(
        &self,
        batch_size: usize,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch>> + '_>;
    /// The file to name when a record is refused.
    fn source_path(&self) -> &Path;
    /// Where record `index` (0-based, in stream order) is in that file: `line 12`, `row 11`.
    fn place(&self, index: usize) -> String;
}

impl RecordSource for IngestSource {
    fn len(&self) -> usize {
        self.subjects.len()
    }
    fn modalities(&self) -> Vec<(Modality, usize)> {
        IngestSource::modalities(self)
    }
    fn record_batches(
        &self,
        batch_size: usize,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch>> + '_> {
        Box::new(self.batches(batch_size))
    }
    fn source_path(&self) -> &Path {
        &self.subjects_path
    }
    fn place(&self, index: usize) -> String {
        format!("line {}", self.subjects.line(index))
    }
}

/// A row-major matrix file of one modality: `.npy` (f32/f16) or `.fvecs`.
#[derive(Debug)]
pub enum VectorFile {
    /// A NumPy matrix.
    Npy(NpyMatrix),
    /// An `.fvecs` matrix.
    Fvecs(FvecsMatrix),
}

impl VectorFile {
    /// Open by extension (`.npy`, `.fvecs`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("npy") => Ok(VectorFile::Npy(NpyMatrix::open(path)?)),
            Some("fvecs") => Ok(VectorFile::Fvecs(FvecsMatrix::open(path)?)),
            _ => Err(DatasetError::UnknownFormat {
                path: path.to_path_buf(),
            }),
        }
    }
    /// The file's path.
    pub fn path(&self) -> &Path {
        match self {
            VectorFile::Npy(m) => m.path(),
            VectorFile::Fvecs(m) => m.path(),
        }
    }
    /// Number of rows.
    pub fn rows(&self) -> u64 {
        match self {
            VectorFile::Npy(m) => m.rows(),
            VectorFile::Fvecs(m) => m.rows(),
        }
    }
    /// Row dimension.
    pub fn dim(&self) -> usize {
        match self {
            VectorFile::Npy(m) => m.dim(),
            VectorFile::Fvecs(m) => m.dim(),
        }
    }
    /// Append rows `start..start+count` as f32 to `out`.
    pub fn read_rows(&self, start: u64, count: usize, out: &mut Vec<f32>) -> Result<()> {
        match self {
            VectorFile::Npy(m) => m.read_rows(start, count, out),
            VectorFile::Fvecs(m) => m.read_rows(start, count, out),
        }
    }
}

/// A validated set of modality files and their subject list.
#[derive(Debug)]
pub struct IngestSource {
    subjects_path: PathBuf,
    subjects: Subjects,
    files: Vec<(Modality, VectorFile)>,
}

impl IngestSource {
    /// Open the subjects file and every `(modality, vector file)`, and check that IDs are valid and unique,
    /// each modality is given once, and every file has one row per subject. Row contents are checked when
    /// read ([`batches`](Self::batches)) or by [`validate_all`](Self::validate_all).
    pub fn open(subjects_path: impl AsRef<Path>, files: &[(Modality, PathBuf)]) -> Result<Self> {
        let subjects_path = subjects_path.as_ref().to_path_buf();
        let subjects = read_subjects(&subjects_path)?;
        let mut opened: Vec<(Modality, VectorFile)> = Vec::with_capacity(files.len());
        for (m, path) in files {
            if let Some((_, f)) = opened.iter().find(|(x, _)| x == m) {
                return Err(DatasetError::DuplicateModality {
                    modality: *m,
                    first: f.path().to_path_buf(),
                    second: path.clone(),
                });
            }
            let f = VectorFile::open(path)?;
            if f.rows() != subjects.len() as u64 {
                return Err(DatasetError::ShapeMismatch {
                    path: path.clone(),
                    rows: f.rows(),
                    subjects_path: subjects_path.clone(),
                    subjects: subjects.len() as u64,
                });
            }
            opened.push((*m, f));
        }
        for sm in &subjects.modalities {
            if !opened.iter().any(|(m, _)| *m == sm.modality) {
                tracing::warn!(
                    "{}: columns for {} but no vector file was given; ignored",
                    subjects_path.display(),
                    sm.modality
                );
            }
        }
        Ok(IngestSource {
            subjects_path,
            subjects,
            files: opened,
        })
    }
    /// Number of subjects (records).
    pub fn len(&self) -> usize {
        self.subjects.len()
    }
    /// True when there are no subjects.
    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty()
    }
    /// The subject list.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }
    /// The subjects file.
    pub fn subjects_path(&self) -> &Path {
        &self.subjects_path
    }
    /// Modalities and their dimensions, in the order given to [`open`](Self::open).
    pub fn modalities(&self) -> Vec<(Modality, usize)> {
        self.files.iter().map(|(m, f)| (*m, f.dim())).collect()
    }

    /// Read records `start..start+count` (clamped to the subject count) as a batch. Rows the subjects file
    /// marks absent become zeros; without a presence column an all-zero row means absent. A present row that
    /// is non-finite or has a norm below [`MIN_TEMPLATE_NORM`] is a [`DatasetError::BadTemplate`]; a record
    /// with no present template in any file is a [`DatasetError::NoTemplate`].
    pub fn read_batch(&self, start: usize, count: usize) -> Result<RecordBatch> {
        let end = start.saturating_add(count).min(self.len());
        let start = start.min(end);
        let n = end - start;
        let mut blocks = Vec::with_capacity(self.files.len());
        for (m, f) in &self.files {
            let dim = f.dim();
            let mut data = Vec::with_capacity(n * dim);
            f.read_rows(start as u64, n, &mut data)?;
            let cols = self.subjects.modality(*m);
            let present_col = cols.and_then(|c| c.present.as_ref());
            let quality_col = cols.and_then(|c| c.quality.as_ref());
            let mut present = Vec::with_capacity(n);
            let mut quality = Vec::with_capacity(n);
            for (i, row) in data.chunks_exact_mut(dim).enumerate() {
                let s = start + i;
                let declared = present_col.and_then(|p| p.get(s).copied());
                if declared == Some(false) {
                    row.iter_mut().for_each(|x| *x = 0.0);
                    present.push(false);
                    quality.push(0.0);
                    continue;
                }
                let bad = |problem| DatasetError::BadTemplate {
                    path: f.path().to_path_buf(),
                    subject: self.subjects.ids[s].clone(),
                    row: s as u64,
                    modality: *m,
                    problem,
                };
                if row.iter().any(|x| !x.is_finite()) {
                    return Err(bad("NaN or infinite value"));
                }
                let zero = row.iter().all(|&x| x == 0.0);
                if zero {
                    if declared == Some(true) {
                        return Err(bad("all-zero (zero-norm) template marked present"));
                    }
                    present.push(false);
                    quality.push(0.0);
                    continue;
                }
                let n2: f64 = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                if n2 < MIN_TEMPLATE_NORM * MIN_TEMPLATE_NORM {
                    return Err(bad("near-zero norm (below 1e-6): numerically empty"));
                }
                present.push(true);
                quality.push(quality_col.and_then(|q| q.get(s).copied()).unwrap_or(1.0));
            }
            blocks.push(ModalityBlock {
                modality: *m,
                dim,
                data,
                present,
                quality,
            });
        }
        for i in 0..n {
            if !blocks.iter().any(|b| b.present[i]) {
                return Err(DatasetError::NoTemplate {
                    path: self.subjects_path.clone(),
                    line: self.subjects.line(start + i),
                    subject: self.subjects.ids[start + i].clone(),
                });
            }
        }
        Ok(RecordBatch {
            ids: self.subjects.ids[start..end].to_vec(),
            blocks,
        })
    }

    /// Stream all records in batches of `batch_size`, in subject order.
    pub fn batches(&self, batch_size: usize) -> impl Iterator<Item = Result<RecordBatch>> + '_ {
        let step = batch_size.max(1);
        (0..self.len().div_ceil(step)).map(move |b| self.read_batch(b * step, step))
    }

    /// Scan every row of every file (streaming) and return the first problem, so ingest can validate
    /// everything before committing anything.
    pub fn validate_all(&self) -> Result<()> {
        for b in self.batches(4096) {
            b?;
        }
        Ok(())
    }
}
