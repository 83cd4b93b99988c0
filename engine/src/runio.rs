//! The files of a dedup run: `hits.csv` (for spreadsheets), `hits.jsonl` (every reported pair with its
//! per-modality evidence), `clusters.csv` (duplicate groups) and `summary.json` (threshold, counts, timings).
//!
//! [`OutputFormat`] chooses the tables: CSV (the default), Parquet (`hits.parquet` and `clusters.parquet`
//! instead of the CSVs: same columns in the same order, typed — strings, f64 scores, nullable f64 cosines,
//! bool, u64 cluster numbers — and unrounded), or both. `hits.jsonl` and `summary.json` are always written:
//! `eval`, `report` and [`read_run`] read them. The Parquet writers ([`write_hits_parquet`],
//! [`write_clusters_parquet`]) need the crate's `parquet` feature.

use crate::EngineError;
use crate::dedup::{DedupPair, DedupResult, DedupSummary};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

/// A dedup run read back from its directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunData {
    /// Decision threshold on the calibrated scale.
    pub threshold: f64,
    /// Every reported pair (down to the run's report floor).
    pub pairs: Vec<DedupPair>,
    /// The run's summary.
    pub summary: DedupSummary,
}

#[derive(Serialize, Deserialize)]
struct SummaryFile {
    threshold: f64,
    summary: DedupSummary,
    files: Vec<String>,
}

/// Quotes a CSV field when needed, and neutralises a cell a spreadsheet would run as a formula (one led by
/// `=`, `+`, `-`, `@`, tab or carriage return) by prefixing `'` (OWASP CSV injection).
pub fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Which tables a run directory gets (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// `hits.csv` and `clusters.csv`.
    #[default]
    Csv,
    /// `hits.parquet` and `clusters.parquet` (needs the `parquet` feature).
    Parquet,
    /// Both the CSV and the Parquet tables.
    Both,
}

impl OutputFormat {
    /// Whether the CSV tables are written.
    pub fn csv(self) -> bool {
        matches!(self, OutputFormat::Csv | OutputFormat::Both)
    }
    /// Whether the Parquet tables are written.
    pub fn parquet(self) -> bool {
        matches!(self, OutputFormat::Parquet | OutputFormat::Both)
    }
    /// Every file a whole run in this format holds (the manifest sums them), in writing order.
    pub fn run_files(self) -> Vec<&'static str> {
        let mut v = Vec::with_capacity(6);
        if self.csv() {
            v.push("hits.csv");
        }
        if self.parquet() {
            v.push("hits.parquet");
        }
        v.push("hits.jsonl");
        if self.csv() {
            v.push("clusters.csv");
        }
        if self.parquet() {
            v.push("clusters.parquet");
        }
        v.push("summary.json");
        v
    }
}

/// The modality keys of a run's `<key>_cosine` columns, in order.
fn cosine_modalities(r: &DedupResult) -> Vec<String> {
    r.summary
        .candidate_cosines
        .iter()
        .map(|(m, _)| m.clone())
        .collect()
}

/// The hits table's column names: `subject_a, subject_b, score, llr, fmr, <key>_cosine…, is_hit`.
pub fn hits_columns(r: &DedupResult) -> Vec<String> {
    let mut header = vec![
        "subject_a".to_string(),
        "subject_b".into(),
        "score".into(),
        "llr".into(),
        "fmr".into(),
    ];
    header.extend(cosine_modalities(r).iter().map(|m| format!("{m}_cosine")));
    header.push("is_hit".into());
    header
}

/// The cosine of modality `key` in `pair`, if both sides have it.
fn pair_cosine(pair: &DedupPair, key: &str) -> Option<f32> {
    pair.comparison
        .modalities
        .iter()
        .find(|s| s.modality.key() == key)
        .map(|c| c.cosine)
}

/// Writes a run's files into `dir` (created if needed) as CSV (see [`write_run_as`]).
pub fn write_run(dir: &Path, r: &DedupResult) -> Result<(), EngineError> {
    write_run_as(dir, r, OutputFormat::Csv).map(|_| ())
}

/// Writes a run's files into `dir` (created if needed) with tables in `format`; returns the names of the
/// files written ([`OutputFormat::run_files`]).
pub fn write_run_as(
    dir: &Path,
    r: &DedupResult,
    format: OutputFormat,
) -> Result<Vec<&'static str>, EngineError> {
    if format.parquet() && !cfg!(feature = "parquet") {
        return Err(EngineError::InvalidArgument(
            "this build has no Parquet support (pacha-engine's `parquet` feature)".into(),
        ));
    }
    crate::fsutil::create_private_dir_all(dir).map_err(|e| EngineError::io("creating", dir, e))?;
    if format.csv() {
        write_hits_csv(&dir.join("hits.csv"), r)?;
    }
    #[cfg(feature = "parquet")]
    if format.parquet() {
        write_hits_parquet(&dir.join("hits.parquet"), r)?;
    }
    write_pairs_jsonl(&dir.join("hits.jsonl"), &r.pairs)?;
    if format.csv() {
        write_clusters_csv(&dir.join("clusters.csv"), &r.clusters)?;
    }
    #[cfg(feature = "parquet")]
    if format.parquet() {
        write_clusters_parquet(&dir.join("clusters.parquet"), &r.clusters)?;
    }
    let files = format.run_files();
    let s = SummaryFile {
        threshold: r.threshold,
        summary: r.summary.clone(),
        files: files
            .iter()
            .filter(|f| **f != "summary.json")
            .map(|f| f.to_string())
            .collect(),
    };
    let p = dir.join("summary.json");
    let bytes =
        serde_json::to_vec_pretty(&s).map_err(|e| EngineError::io("writing", &p, e.into()))?;
    crate::fsutil::write_atomic(&p, &bytes)?;
    Ok(files)
}

/// Writes `hits.csv` (rounded for reading: score 3 decimals, llr 4, cosines 5; fmr in `e` notation).
fn write_hits_csv(p: &Path, r: &DedupResult) -> Result<(), EngineError> {
    let modalities = cosine_modalities(r);
    let mut w = BufWriter::new(
        crate::fsutil::create_private(p).map_err(|e| EngineError::io("writing", p, e))?,
    );
    let header = hits_columns(r);
    writeln!(w, "{}", header.join(",")).map_err(|e| EngineError::io("writing", p, e))?;
    for pair in &r.pairs {
        let mut row = vec![
            csv_field(&pair.a),
            csv_field(&pair.b),
            format!("{:.3}", pair.score()),
            format!("{:.4}", pair.comparison.fused.llr),
            format!("{:e}", pair.comparison.fused.fmr),
        ];
        for m in &modalities {
            row.push(pair_cosine(pair, m).map_or(String::new(), |c| format!("{c:.5}")));
        }
        row.push((pair.score() >= r.threshold).to_string());
        writeln!(w, "{}", row.join(",")).map_err(|e| EngineError::io("writing", p, e))?;
    }
    w.flush().map_err(|e| EngineError::io("writing", p, e))
}

/// Writes `clusters.csv`: `cluster,subject_id`, one row per member.
fn write_clusters_csv(p: &Path, clusters: &[Vec<String>]) -> Result<(), EngineError> {
    let mut w = BufWriter::new(
        crate::fsutil::create_private(p).map_err(|e| EngineError::io("writing", p, e))?,
    );
    writeln!(w, "cluster,subject_id").map_err(|e| EngineError::io("writing", p, e))?;
    for (i, c) in clusters.iter().enumerate() {
        for id in c {
            writeln!(w, "{i},{}", csv_field(id)).map_err(|e| EngineError::io("writing", p, e))?;
        }
    }
    w.flush().map_err(|e| EngineError::io("writing", p, e))
}

/// Rows per Parquet write call (bounds the arrays built at once).
#[cfg(feature = "parquet")]
const PARQUET_CHUNK: usize = 65_536;

/// Writes a run's hits as Parquet at `path` (a new private file): the columns of `hits.csv` in its order
/// ([`hits_columns`]), typed and unrounded — `subject_a`/`subject_b` string, `score`/`llr`/`fmr` double,
/// `<key>_cosine` double (null where a side lacks the modality), `is_hit` bool.
#[cfg(feature = "parquet")]
pub fn write_hits_parquet(path: &Path, r: &DedupResult) -> Result<(), EngineError> {
    use pacha_datasets::parquet::{ColumnData, ColumnKind, TableWriter};
    let modalities = cosine_modalities(r);
    let names = hits_columns(r);
    let kinds: Vec<(&str, ColumnKind)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let k = match i {
                0 | 1 => ColumnKind::Utf8,
                2..=4 => ColumnKind::F64,
                _ if i == names.len() - 1 => ColumnKind::Bool,
                _ => ColumnKind::NullableF64,
            };
            (n.as_str(), k)
        })
        .collect();
    let file =
        crate::fsutil::create_private(path).map_err(|e| EngineError::io("writing", path, e))?;
    let mut w = TableWriter::new(file, path, &kinds)?;
    for chunk in r.pairs.chunks(PARQUET_CHUNK) {
        let mut cols = vec![
            ColumnData::Utf8(chunk.iter().map(|p| p.a.clone()).collect()),
            ColumnData::Utf8(chunk.iter().map(|p| p.b.clone()).collect()),
            ColumnData::F64(chunk.iter().map(|p| p.score()).collect()),
            ColumnData::F64(chunk.iter().map(|p| p.comparison.fused.llr).collect()),
            ColumnData::F64(chunk.iter().map(|p| p.comparison.fused.fmr).collect()),
        ];
        for m in &modalities {
            cols.push(ColumnData::NullableF64(
                chunk
                    .iter()
                    .map(|p| pair_cosine(p, m).map(f64::from))
                    .collect(),
            ));
        }
        cols.push(ColumnData::Bool(
            chunk.iter().map(|p| p.score() >= r.threshold).collect(),
        ));
        w.write(cols)?;
    }
    w.finish()?;
    Ok(())
}

/// Writes clusters as Parquet at `path` (a new private file): `cluster` (uint64, the cluster's number) and
/// `subject_id` (string), one row per member, as `clusters.csv`.
#[cfg(feature = "parquet")]
pub fn write_clusters_parquet(path: &Path, clusters: &[Vec<String>]) -> Result<(), EngineError> {
    use pacha_datasets::parquet::{ColumnData, ColumnKind, TableWriter};
    let file =
        crate::fsutil::create_private(path).map_err(|e| EngineError::io("writing", path, e))?;
    let mut w = TableWriter::new(
        file,
        path,
        &[
            ("cluster", ColumnKind::U64),
            ("subject_id", ColumnKind::Utf8),
        ],
    )?;
    let mut numbers = Vec::new();
    let mut ids = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        for id in c {
            numbers.push(i as u64);
            ids.push(id.clone());
            if ids.len() == PARQUET_CHUNK {
                w.write(vec![
                    ColumnData::U64(std::mem::take(&mut numbers)),
                    ColumnData::Utf8(std::mem::take(&mut ids)),
                ])?;
            }
        }
    }
    if !ids.is_empty() || clusters.is_empty() {
        w.write(vec![ColumnData::U64(numbers), ColumnData::Utf8(ids)])?;
    }
    w.finish()?;
    Ok(())
}

/// Writes `pairs` to a new private file at `path`, one JSON object per line (the `hits.jsonl` format), and
/// returns the flushed file.
pub(crate) fn write_pairs_jsonl(
    path: &Path,
    pairs: &[DedupPair],
) -> Result<std::fs::File, EngineError> {
    let io = |e| EngineError::io("writing", path, e);
    let mut w = BufWriter::new(crate::fsutil::create_private(path).map_err(io)?);
    for pair in pairs {
        serde_json::to_writer(&mut w, pair).map_err(|e| io(e.into()))?;
        w.write_all(b"\n").map_err(io)?;
    }
    w.into_inner().map_err(|e| io(e.into_error()))
}

/// Reads a run written by [`write_run`].
pub fn read_run(dir: &Path) -> Result<RunData, EngineError> {
    let p = dir.join("summary.json");
    let bytes = std::fs::read(&p).map_err(|e| EngineError::io("reading", &p, e))?;
    let s: SummaryFile = serde_json::from_slice(&bytes).map_err(|e| EngineError::Corrupt {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    let p = dir.join("hits.jsonl");
    let f = std::fs::File::open(&p).map_err(|e| EngineError::io("reading", &p, e))?;
    let mut pairs = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| EngineError::io("reading", &p, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let pair: DedupPair = serde_json::from_str(&line).map_err(|e| EngineError::Corrupt {
            path: p.clone(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        pairs.push(pair);
    }
    Ok(RunData {
        threshold: s.threshold,
        pairs,
        summary: s.summary,
    })
}

#[cfg(all(test, feature = "parquet"))]
mod parquet_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::fusion::FusedScore;
    use crate::matcher::{Comparison, ModalityScore};
    use pacha_datasets::Modality;
    use pacha_datasets::parquet::{ColumnData, read_table};
    use proptest::prelude::*;

    fn pair(
        a: String,
        b: String,
        score: f64,
        llr: f64,
        fmr: f64,
        face: Option<f32>,
        f7: Option<f32>,
    ) -> DedupPair {
        let mut modalities = Vec::new();
        if let Some(c) = face {
            modalities.push(ModalityScore {
                modality: Modality::Face,
                cosine: c,
                llr: 0.0,
            });
        }
        if let Some(c) = f7 {
            modalities.push(ModalityScore {
                modality: Modality::Finger(7),
                cosine: c,
                llr: 0.0,
            });
        }
        DedupPair {
            a,
            b,
            row_a: 0,
            row_b: 1,
            comparison: Comparison {
                modalities,
                fused: FusedScore { llr, fmr, score },
            },
        }
    }

    fn arb_pair() -> impl Strategy<Value = DedupPair> {
        (
            "[a-zA-Z0-9 ,\"=é-]{1,12}",
            "[a-zA-Z0-9_]{1,12}",
            -50.0f64..200.0,
            -1e3f64..1e3,
            0.0f64..1.0,
            proptest::option::of(-1.0f32..1.0),
            proptest::option::of(-1.0f32..1.0),
        )
            .prop_map(|(a, b, s, l, f, c1, c2)| pair(a, b, s, l, f, c1, c2))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Every hit written to Parquet reads back exactly (strings, f64 bits, nulls, is_hit), with the
        /// columns of hits.csv in its order; clusters too.
        #[test]
        fn hits_and_clusters_round_trip(
            pairs in proptest::collection::vec(arb_pair(), 0..200),
            threshold in 0.0f64..100.0,
            clusters in proptest::collection::vec(proptest::collection::vec("[a-z0-9]{1,6}", 2..5), 0..20),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let r = DedupResult {
                threshold,
                pairs: pairs.clone(),
                clusters: clusters.clone(),
                summary: crate::dedup::DedupSummary {
                    candidate_cosines: vec![("face".into(), None), ("finger7".into(), Some(0.1))],
                    ..Default::default()
                },
            };
            let files = write_run_as(dir.path(), &r, OutputFormat::Both).unwrap();
            prop_assert_eq!(files, OutputFormat::Both.run_files());
            let t = read_table(&dir.path().join("hits.parquet")).unwrap();
            let names: Vec<String> = t.iter().map(|(n, _)| n.clone()).collect();
            prop_assert_eq!(&names, &hits_columns(&r));
            let csv_header = std::fs::read_to_string(dir.path().join("hits.csv")).unwrap();
            prop_assert_eq!(csv_header.lines().next().unwrap(), names.join(","));
            let col = |k: usize| &t[k].1;
            prop_assert_eq!(col(0), &ColumnData::Utf8(pairs.iter().map(|p| p.a.clone()).collect()));
            prop_assert_eq!(col(1), &ColumnData::Utf8(pairs.iter().map(|p| p.b.clone()).collect()));
            let bits = |c: &ColumnData| match c {
                ColumnData::F64(v) => v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            };
            prop_assert_eq!(bits(col(2)), pairs.iter().map(|p| p.score().to_bits()).collect::<Vec<_>>());
            prop_assert_eq!(bits(col(3)), pairs.iter().map(|p| p.comparison.fused.llr.to_bits()).collect::<Vec<_>>());
            prop_assert_eq!(bits(col(4)), pairs.iter().map(|p| p.comparison.fused.fmr.to_bits()).collect::<Vec<_>>());
            prop_assert_eq!(col(5), &ColumnData::NullableF64(pairs.iter().map(|p| pair_cosine(p, "face").map(f64::from)).collect()));
            prop_assert_eq!(col(6), &ColumnData::NullableF64(pairs.iter().map(|p| pair_cosine(p, "finger7").map(f64::from)).collect()));
            prop_assert_eq!(col(7), &ColumnData::Bool(pairs.iter().map(|p| p.score() >= threshold).collect()));
            let c = read_table(&dir.path().join("clusters.parquet")).unwrap();
            let (mut nums, mut ids) = (Vec::new(), Vec::new());
            for (i, cl) in clusters.iter().enumerate() {
                for id in cl {
                    nums.push(i as u64);
                    ids.push(id.clone());
                }
            }
            prop_assert_eq!(&c[0], &("cluster".to_string(), ColumnData::U64(nums)));
            prop_assert_eq!(&c[1], &("subject_id".to_string(), ColumnData::Utf8(ids)));
        }
    }
}
