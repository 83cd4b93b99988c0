//! Ingest of analysts' files into a store: validate everything first, then commit batch by batch.

use crate::EngineError;
use crate::store::{Schema, Store, Template};
use pacha_datasets::Modality;
use pacha_datasets::ingest::{IngestSource, RecordSource, VectorFile};
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

/// Validates `files` and `subjects` completely before committing anything, then creates the store if
/// `store_dir` holds none (schema from the files) and commits batches of `batch` records.
///
/// The validation pass reads every record and runs every check an insert would: the subjects file (IDs
/// non-empty, at most 256 bytes, no control characters, unique), every row (finite, norm at least
/// [`crate::store::MIN_TEMPLATE_NORM`], at least one template per record), the dimensions against the
/// store's schema, and each record against the store (a subject already enrolled must carry identical
/// templates). So a bad record anywhere, even the last, commits nothing; errors name the file and the line
/// or row. A new store is created only in a missing or empty directory. `progress(stage, done, total)`
/// reports "validate" and then "ingest". A failure after validation (I/O, a concurrent writer) reports
/// exactly how many records were committed before it.
pub fn ingest(
    store_dir: &Path,
    files: &[(Modality, PathBuf)],
    subjects: &Path,
    batch: usize,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<IngestReport, EngineError> {
    let existing = prepare_store_dir(store_dir, batch)?;
    let source = IngestSource::open(subjects, files)?;
    ingest_checked(store_dir, existing, &source, batch, progress)
}

/// Ingests a Parquet table of enrolments ([`pacha_datasets::parquet::ParquetSource`]: an ID column and one
/// list-of-float column per modality, nulls = absent), streamed in batches, with every check and the
/// validate-then-commit order of [`ingest`]; refused records name the file and the row.
#[cfg(feature = "parquet")]
pub fn ingest_parquet(
    store_dir: &Path,
    path: &Path,
    columns: &pacha_datasets::parquet::ParquetColumns,
    batch: usize,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<IngestReport, EngineError> {
    let existing = prepare_store_dir(store_dir, batch)?;
    let source = pacha_datasets::parquet::ParquetSource::open(path, columns)?;
    ingest_checked(store_dir, existing, &source, batch, progress)
}

/// Ingests any [`RecordSource`] as [`ingest`] does (validate everything, then commit batch by batch).
pub fn ingest_source(
    store_dir: &Path,
    source: &dyn RecordSource,
    batch: usize,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<IngestReport, EngineError> {
    let existing = prepare_store_dir(store_dir, batch)?;
    ingest_checked(store_dir, existing, source, batch, progress)
}

/// Checks the batch size and the store directory; true when it already holds a store.
fn prepare_store_dir(store_dir: &Path, batch: usize) -> Result<bool, EngineError> {
    if batch == 0 {
        return Err(EngineError::InvalidArgument(
            "batch size must be at least 1".into(),
        ));
    }
    if let Ok(md) = std::fs::metadata(store_dir)
        && !md.is_dir()
    {
        return Err(EngineError::NotADirectory {
            path: store_dir.to_path_buf(),
        });
    }
    let existing = store_dir.join("MANIFEST").exists();
    if !existing {
        check_new_store_dir(store_dir)?;
    }
    Ok(existing)
}

fn ingest_checked(
    store_dir: &Path,
    existing: bool,
    source: &dyn RecordSource,
    batch: usize,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<IngestReport, EngineError> {
    let n = source.len();
    let mut report = IngestReport {
        records: n,
        ..IngestReport::default()
    };
    let file_schema = Schema::of(source.modalities());
    let store = if existing {
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
        Some(s)
    } else {
        file_schema.validate()?;
        None
    };
    // Validation pass: everything an insert would refuse, before the first commit.
    progress("validate", 0, n as u64);
    let step = batch.min(4096);
    let mut start = 0usize;
    for b in source.record_batches(step) {
        let b = b?;
        let checked = match &store {
            Some(s) => s.check_batch(&b),
            None => crate::store::check_new_batch(&file_schema, &b),
        };
        checked.map_err(|e| locate(source, start, &b.ids, e))?;
        start += b.len();
        progress("validate", start as u64, n as u64);
    }
    if start != n {
        return Err(EngineError::InvalidArgument(format!(
            "{}: {start} records read but the source announced {n}",
            source.source_path().display()
        )));
    }
    let store = match store {
        Some(s) => s,
        None => {
            report.created = true;
            Store::create(store_dir, file_schema)?
        }
    };
    for b in source.record_batches(batch) {
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

/// Refuses to make a new store in `dir` unless it is missing or empty.
fn check_new_store_dir(dir: &Path) -> Result<(), EngineError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(EngineError::Io {
                op: "listing",
                path: dir.to_path_buf(),
                source: e,
            });
        }
    };
    if let Some(entry) = rd.flatten().find(|e| e.file_name() != "LOCK") {
        return Err(EngineError::DirNotEmpty {
            dir: dir.to_path_buf(),
            example: entry.file_name().to_string_lossy().into_owned(),
        });
    }
    Ok(())
}

/// Names the file and line (or row) of the record an insert check refused (records `start..` of `source`).
fn locate(source: &dyn RecordSource, start: usize, ids: &[String], e: EngineError) -> EngineError {
    let at = crate::store::subject_of(&e)
        .and_then(|id| ids.iter().position(|x| x == id))
        .map(|i| source.place(start + i));
    EngineError::InputRecord {
        path: source.source_path().to_path_buf(),
        at,
        source: Box::new(e),
    }
}

/// The probe rows `rows` selects among `n` (empty = all), each checked to lie within `of` (the files named in
/// the error).
fn probe_rows(rows: &[u64], n: u64, of: &str) -> Result<Vec<u64>, EngineError> {
    if let Some(r) = rows.iter().find(|&&r| r >= n) {
        return Err(EngineError::InvalidArgument(format!(
            "probe row {r} is beyond the {n} rows of {of}"
        )));
    }
    Ok(if rows.is_empty() {
        (0..n).collect()
    } else {
        rows.to_vec()
    })
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
    let wanted = probe_rows(rows, n, "the probe files")?;
    let mut out = Vec::with_capacity(wanted.len());
    for r in wanted {
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

/// Reads probes with their subjects file (the ingest format: `subject_id`, optional `<modality>_present` and
/// `<modality>_quality` columns): like [`read_probes`], but every template carries its capture quality, so a
/// quality-banded calibration scores the probe in its own band (probes without one are quality 1, the top
/// band). The subjects file must have one line per row of the probe files; rows are checked as at ingest
/// (non-finite or zero-norm templates marked present, records with no template: a typed error naming them).
pub fn read_probes_with_subjects(
    subjects: &Path,
    files: &[(Modality, PathBuf)],
    rows: &[u64],
) -> Result<Vec<(u64, Vec<Template>)>, EngineError> {
    let source = IngestSource::open(subjects, files)?;
    let n = source.len() as u64;
    let wanted = probe_rows(rows, n, &subjects.display().to_string())?;
    let mut out = Vec::with_capacity(wanted.len());
    for r in wanted {
        let batch = source.read_batch(r as usize, 1)?;
        let templates = batch
            .blocks
            .iter()
            .filter(|b| b.present[0])
            .map(|b| Template {
                modality: b.modality,
                vector: b.data.clone(),
                quality: b.quality[0],
            })
            .collect();
        out.push((r, templates));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pacha_datasets::npy::write_npy_f32;

    /// Three probe rows of a 4-d face and a 2-d finger: row 1 has no finger (marked absent).
    fn probe_files(dir: &Path, subjects: &str) -> (PathBuf, Vec<(Modality, PathBuf)>) {
        let face = dir.join("face.npy");
        let finger = dir.join("f2.npy");
        write_npy_f32(
            &face,
            3,
            4,
            &[1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0.],
        )
        .unwrap();
        write_npy_f32(&finger, 3, 2, &[1., 0., 0., 0., 0., 1.]).unwrap();
        let subj = dir.join("subjects.csv");
        std::fs::write(&subj, subjects).unwrap();
        (
            subj,
            vec![(Modality::Face, face), (Modality::Finger(2), finger)],
        )
    }

    #[test]
    fn probes_read_with_subjects_carry_their_qualities_and_presence() {
        let dir = tempfile::tempdir().unwrap();
        let (subj, files) = probe_files(
            dir.path(),
            "subject_id,face_quality,finger2_present,finger2_quality\n\
             A,0.25,1,0.5\nB,0.75,0,0.9\nC,1.0,1,0.125\n",
        );
        let p = read_probes_with_subjects(&subj, &files, &[]).unwrap();
        assert_eq!(p.len(), 3);
        let q =
            |row: usize, m: Modality| p[row].1.iter().find(|t| t.modality == m).map(|t| t.quality);
        assert_eq!(q(0, Modality::Face), Some(0.25));
        assert_eq!(q(0, Modality::Finger(2)), Some(0.5));
        assert_eq!(q(1, Modality::Face), Some(0.75));
        assert_eq!(q(1, Modality::Finger(2)), None, "absent finger kept");
        assert_eq!(q(2, Modality::Finger(2)), Some(0.125));
        // Without the subjects file every probe is quality 1; the vectors are the same.
        let plain = read_probes(&files, &[2]).unwrap();
        assert!(plain[0].1.iter().all(|t| t.quality == 1.0));
        let with = read_probes_with_subjects(&subj, &files, &[2]).unwrap();
        assert_eq!(plain[0].0, 2);
        assert_eq!(plain[0].1[0].vector, with[0].1[0].vector);
    }

    #[test]
    fn probe_subjects_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        // Two subject lines for three vector rows.
        let (subj, files) = probe_files(dir.path(), "subject_id\nA\nB\n");
        assert!(read_probes_with_subjects(&subj, &files, &[]).is_err());
        // A row beyond the file.
        let (subj, files) = probe_files(dir.path(), "subject_id\nA\nB\nC\n");
        let e = read_probes_with_subjects(&subj, &files, &[3]).unwrap_err();
        assert!(e.to_string().contains("probe row 3"), "{e}");
        // A quality outside [0, 1] is refused when the subjects file is read.
        let (subj, files) = probe_files(dir.path(), "subject_id,face_quality\nA,1.5\nB,1\nC,1\n");
        let e = read_probes_with_subjects(&subj, &files, &[]).unwrap_err();
        assert!(e.to_string().contains("quality"), "{e}");
    }
}
