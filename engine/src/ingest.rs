//! Ingest of analysts' files into a store: validate everything first, then commit batch by batch.

use crate::EngineError;
use crate::store::{Schema, Store, Template};
use pacha_datasets::Modality;
use pacha_datasets::ingest::{IngestSource, VectorFile};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What an ingest did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IngestReport {
    /// Records in the source files.
    pub records: usize,
    /// Enrolments newly committed.
    pub inserted: usize,
    /// Enrolments already present with identical templates (idempotent re-ingest).
    pub unchanged: usize,
    /// Batches committed.
    pub batches: usize,
    /// Whether the store was created by this ingest.
    pub created: bool,
}

/// Validates `files` and `subjects` completely (shapes, IDs, every row finite and non-zero where present),
/// then creates the store if `store_dir` holds none (schema from the files) and commits batches of
/// `batch` records. `progress(stage, done, total)` reports "validate" and then "ingest". A failure after
/// validation reports exactly how many records were committed before it.
pub fn ingest(
    store_dir: &Path,
    files: &[(Modality, PathBuf)],
    subjects: &Path,
    batch: usize,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<IngestReport, EngineError> {
    if batch == 0 {
        return Err(EngineError::InvalidArgument(
            "batch size must be at least 1".into(),
        ));
    }
    let source = IngestSource::open(subjects, files)?;
    let n = source.len();
    progress("validate", 0, n as u64);
    source.validate_all()?;
    progress("validate", n as u64, n as u64);
    let mut report = IngestReport {
        records: n,
        ..IngestReport::default()
    };
    let file_schema = Schema::of(source.modalities());
    let store = if store_dir.join("MANIFEST").exists() {
        let s = Store::open(store_dir)?;
        for spec in &file_schema.modalities {
            match s
                .schema()
                .modalities
                .iter()
                .find(|x| x.modality == spec.modality)
            {
                Some(x) if x.dim == spec.dim => {}
                Some(x) => {
                    return Err(EngineError::InvalidArgument(format!(
                        "{} has dimension {} in the files but {} in the store {}",
                        spec.modality,
                        spec.dim,
                        x.dim,
                        store_dir.display()
                    )));
                }
                None => {
                    return Err(EngineError::InvalidArgument(format!(
                        "modality {} is not in the schema of store {}",
                        spec.modality,
                        store_dir.display()
                    )));
                }
            }
        }
        s
    } else {
        report.created = true;
        Store::create(store_dir, file_schema)?
    };
    for b in source.batches(batch) {
        let b = b?;
        let r = store.insert_batch(&b).map_err(|e| EngineError::Ingest {
            committed: report.inserted + report.unchanged,
            total: n,
            source: Box::new(e),
        })?;
        report.inserted += r.inserted;
        report.unchanged += r.unchanged;
        report.batches += 1;
        progress(
            "ingest",
            (report.inserted + report.unchanged) as u64,
            n as u64,
        );
    }
    Ok(report)
}

/// Reads probes for identification: row `i` of every file is one probe (all-zero rows are absent
/// templates). `rows` selects rows (empty = all).
pub fn read_probes(
    files: &[(Modality, PathBuf)],
    rows: &[u64],
) -> Result<Vec<(u64, Vec<Template>)>, EngineError> {
    let opened: Vec<(Modality, VectorFile)> = files
        .iter()
        .map(|(m, p)| Ok((*m, VectorFile::open(p)?)))
        .collect::<Result<_, EngineError>>()?;
    let n = opened.first().map_or(0, |(_, f)| f.rows());
    for (m, f) in &opened {
        if f.rows() != n {
            return Err(EngineError::InvalidArgument(format!(
                "probe file {} ({m}) has {} rows but the first has {n}",
                f.path().display(),
                f.rows()
            )));
        }
    }
    let wanted: Vec<u64> = if rows.is_empty() {
        (0..n).collect()
    } else {
        rows.to_vec()
    };
    let mut out = Vec::with_capacity(wanted.len());
    for r in wanted {
        if r >= n {
            return Err(EngineError::InvalidArgument(format!(
                "probe row {r} is beyond the {n} rows of the probe files"
            )));
        }
        let mut templates = Vec::new();
        for (m, f) in &opened {
            let mut v = Vec::with_capacity(f.dim());
            f.read_rows(r, 1, &mut v)?;
            if v.iter().any(|x| *x != 0.0) {
                templates.push(Template {
                    modality: *m,
                    vector: v,
                    quality: 1.0,
                });
            }
        }
        out.push((r, templates));
    }
    Ok(out)
}
