//! The files of a dedup run: `hits.csv` (for spreadsheets), `hits.jsonl` (every reported pair with its
//! per-modality evidence), `clusters.csv` (duplicate groups) and `summary.json` (threshold, counts, timings).

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

/// Writes a run's files into `dir` (created if needed).
pub fn write_run(dir: &Path, r: &DedupResult) -> Result<(), EngineError> {
    crate::fsutil::create_private_dir_all(dir).map_err(|e| EngineError::io("creating", dir, e))?;
    let modalities: Vec<String> = r
        .summary
        .candidate_cosines
        .iter()
        .map(|(m, _)| m.clone())
        .collect();

    let p = dir.join("hits.csv");
    let mut w = BufWriter::new(
        crate::fsutil::create_private(&p).map_err(|e| EngineError::io("writing", &p, e))?,
    );
    let mut header = vec![
        "subject_a".to_string(),
        "subject_b".into(),
        "score".into(),
        "llr".into(),
        "fmr".into(),
    ];
    header.extend(modalities.iter().map(|m| format!("{m}_cosine")));
    header.push("is_hit".into());
    writeln!(w, "{}", header.join(",")).map_err(|e| EngineError::io("writing", &p, e))?;
    for pair in &r.pairs {
        let mut row = vec![
            csv_field(&pair.a),
            csv_field(&pair.b),
            format!("{:.3}", pair.score()),
            format!("{:.4}", pair.comparison.fused.llr),
            format!("{:e}", pair.comparison.fused.fmr),
        ];
        for m in &modalities {
            let c = pair
                .comparison
                .modalities
                .iter()
                .find(|s| &s.modality.key() == m);
            row.push(c.map_or(String::new(), |c| format!("{:.5}", c.cosine)));
        }
        row.push((pair.score() >= r.threshold).to_string());
        writeln!(w, "{}", row.join(",")).map_err(|e| EngineError::io("writing", &p, e))?;
    }
    w.flush().map_err(|e| EngineError::io("writing", &p, e))?;

    write_pairs_jsonl(&dir.join("hits.jsonl"), &r.pairs)?;

    let p = dir.join("clusters.csv");
    let mut w = BufWriter::new(
        crate::fsutil::create_private(&p).map_err(|e| EngineError::io("writing", &p, e))?,
    );
    writeln!(w, "cluster,subject_id").map_err(|e| EngineError::io("writing", &p, e))?;
    for (i, c) in r.clusters.iter().enumerate() {
        for id in c {
            writeln!(w, "{i},{}", csv_field(id)).map_err(|e| EngineError::io("writing", &p, e))?;
        }
    }
    w.flush().map_err(|e| EngineError::io("writing", &p, e))?;

    let s = SummaryFile {
        threshold: r.threshold,
        summary: r.summary.clone(),
        files: ["hits.csv", "hits.jsonl", "clusters.csv"]
            .map(String::from)
            .to_vec(),
    };
    let p = dir.join("summary.json");
    let bytes =
        serde_json::to_vec_pretty(&s).map_err(|e| EngineError::io("writing", &p, e.into()))?;
    crate::fsutil::write_atomic(&p, &bytes)
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
