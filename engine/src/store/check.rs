//! `check`: verify every checksum and invariant of a store directory without changing anything.

use super::format::{ABSENT_QUALITY, HEADER_LEN, parse_generation};
use super::intent::Intent;
use super::manifest::{MANIFEST, MANIFEST_TMP, Manifest, manifest_path};
use super::{LOCK, build_index, file_specs, map_committed, read_tombstones, verify_layout};
use crate::EngineError;
use memmap2::Mmap;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Per-row problems reported per file before they are summarised.
const MAX_ROW_PROBLEMS: usize = 10;

/// One finding of [`check`]: which file, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file concerned.
    pub file: PathBuf,
    /// What is wrong (or, for warnings, what was noticed).
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.what)
    }
}

/// The result of [`check`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Generation in the manifest (0 if the manifest is unreadable).
    pub generation: u64,
    /// Commit sequence number in the manifest.
    pub commit_seq: u64,
    /// Committed rows.
    pub rows: u64,
    /// Committed rows that are not tombstoned.
    pub live: u64,
    /// Files whose data checksum was verified.
    pub files_checked: usize,
    /// Corruption and broken invariants: the store is damaged if this is non-empty.
    pub problems: Vec<Problem>,
    /// Harmless findings: torn tails past the committed length, stray files (open cleans both up).
    pub warnings: Vec<Problem>,
}

impl CheckReport {
    /// True when no problem was found (warnings allowed).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Findings {
    problems: Vec<Problem>,
    per_file: HashMap<PathBuf, usize>,
}

impl Findings {
    fn add(&mut self, file: &Path, what: impl Into<String>) {
        self.problems.push(Problem {
            file: file.to_path_buf(),
            what: what.into(),
        });
    }
    /// A per-row problem: the first few per file are listed, the rest counted.
    fn row(&mut self, file: &Path, what: impl FnOnce() -> String) {
        let n = self.per_file.entry(file.to_path_buf()).or_insert(0);
        *n += 1;
        if *n <= MAX_ROW_PROBLEMS {
            let w = what();
            self.add(file, w);
        }
    }
    fn summarise(&mut self) {
        let mut extra: Vec<_> = self
            .per_file
            .iter()
            .filter(|(_, n)| **n > MAX_ROW_PROBLEMS)
            .collect();
        extra.sort();
        let lines: Vec<Problem> = extra
            .into_iter()
            .map(|(f, n)| Problem {
                file: f.clone(),
                what: format!("{} more row problems", n - MAX_ROW_PROBLEMS),
            })
            .collect();
        self.problems.extend(lines);
    }
}

/// Verifies every checksum and invariant of the store in `dir`; changes nothing and takes no lock, so it may
/// run beside a writer (it checks the commit whose manifest it read). Problems (with the file concerned) are
/// listed in the report; an `Err` means the directory could not be examined at all. If problems are found
/// and the manifest's generation moved on meanwhile (a concurrent compaction unlinked the files being
/// checked), the check is repeated on the new generation (at most three runs in all).
pub fn check(dir: &Path) -> Result<CheckReport, EngineError> {
    const ATTEMPTS: usize = 3;
    let mut report = check_once(dir)?;
    for _ in 1..ATTEMPTS {
        if report.problems.is_empty() {
            break;
        }
        match Manifest::read(dir) {
            Ok(m) if m.generation != report.generation => report = check_once(dir)?,
            _ => break,
        }
    }
    Ok(report)
}

/// One pass of [`check`] over the manifest as it is now.
fn check_once(dir: &Path) -> Result<CheckReport, EngineError> {
    let mut report = CheckReport::default();
    let mut fx = Findings {
        problems: Vec::new(),
        per_file: HashMap::new(),
    };
    let mpath = manifest_path(dir);
    let m = match Manifest::read(dir) {
        Ok(m) => m,
        Err(e @ (EngineError::NotAStore { .. } | EngineError::Io { .. })) => return Err(e),
        Err(e) => {
            report.problems.push(Problem {
                file: mpath,
                what: e.to_string(),
            });
            return Ok(report);
        }
    };
    report.generation = m.generation;
    report.commit_seq = m.commit_seq;
    report.rows = m.rows;
    report.live = m.rows.saturating_sub(m.tombstones);
    let specs = file_specs(&m.schema, m.generation);
    if let Err(e) = verify_layout(&m, &specs, &mpath) {
        report.problems.push(Problem {
            file: mpath,
            what: e.to_string(),
        });
        return Ok(report);
    }
    let rows = m.rows as usize;
    let paths: Vec<PathBuf> = m.files.iter().map(|st| dir.join(&st.name)).collect();
    let mut handles: Vec<Option<File>> = Vec::with_capacity(specs.len());
    let mut maps: Vec<Option<Arc<Mmap>>> = Vec::with_capacity(specs.len());
    let mut header = [0u8; HEADER_LEN];
    let intent = Intent::read(dir);
    for (j, ((spec, st), path)) in specs.iter().zip(&m.files).zip(&paths).enumerate() {
        let opened = (|| -> Result<(File, Arc<Mmap>), String> {
            let f = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
            let len = f.metadata().map_err(|e| format!("cannot stat: {e}"))?.len();
            if len < st.len {
                return Err(format!(
                    "{len} bytes but the manifest commits {} (committed data lost)",
                    st.len
                ));
            }
            f.read_exact_at(&mut header, 0)
                .map_err(|e| format!("cannot read header: {e}"))?;
            spec.verify_header(&header)
                .map_err(|r| format!("bad header: {r}"))?;
            let allowed = Intent::allowed_len(intent.as_ref(), &m, j);
            // A writer that committed since `m` was read explains its own bytes (the journal moved on).
            let moved = || Manifest::read(dir).is_ok_and(|n| n.commit_seq != m.commit_seq);
            if len > allowed && !moved() {
                return Err(format!(
                    "{} bytes past the committed length, more than any recorded append explains (foreign data; a writer's open refuses the store)",
                    len - st.len
                ));
            }
            if len > st.len {
                report.warnings.push(Problem {
                    file: path.clone(),
                    what: format!(
                        "{} bytes past the committed length (torn write, or a writer's append in progress; a writer's open truncates)",
                        len - st.len
                    ),
                });
            }
            let map = map_committed(&f, st.len, path).map_err(|e| e.to_string())?;
            let actual = crc32fast::hash(&map[HEADER_LEN..]);
            if actual != st.crc {
                return Err(format!(
                    "data checksum {actual:#010x} does not match the manifest's {:#010x}",
                    st.crc
                ));
            }
            Ok((f, map))
        })();
        match opened {
            Ok((f, map)) => {
                report.files_checked += 1;
                handles.push(Some(f));
                maps.push(Some(map));
            }
            Err(what) => {
                fx.add(path, what);
                handles.push(None);
                maps.push(None);
            }
        }
    }
    let ix = m.schema.modalities.len() * 4;
    // Tombstones.
    let deleted = match &handles[ix + 2] {
        Some(f) => match read_tombstones(f, &m.files[ix + 2], rows, &paths[ix + 2]) {
            Ok(b) => Some(b),
            Err(e) => {
                fx.add(&paths[ix + 2], e.to_string());
                None
            }
        },
        None => None,
    };
    let is_deleted = |r: usize| {
        deleted
            .as_ref()
            .is_some_and(|b| (b[r / 64] >> (r % 64)) & 1 == 1)
    };
    // Subject table.
    if let (Some(ids), Some(offs)) = (&maps[ix], &maps[ix + 1]) {
        match build_index(ids, offs, rows, &paths[ix], &paths[ix + 1]) {
            Err(e) => fx.add(&paths[ix], e.to_string()),
            Ok(_) => {
                let offs: &[u64] = bytemuck::try_cast_slice(&offs[HEADER_LEN..]).unwrap_or(&[]);
                let data = &ids[HEADER_LEN..];
                let mut live: HashMap<&[u8], usize> = HashMap::with_capacity(rows);
                let mut start = 0usize;
                for (r, &end) in offs.iter().enumerate() {
                    let end = end as usize;
                    let id = data.get(start..end).unwrap_or(&[]);
                    start = end;
                    if is_deleted(r) {
                        continue;
                    }
                    if let Some(prev) = live.insert(id, r) {
                        fx.row(&paths[ix], || {
                            format!(
                                "subject {:?} is live in rows {prev} and {r}",
                                String::from_utf8_lossy(id)
                            )
                        });
                    }
                }
            }
        }
    }
    // Per-modality rows.
    let mut has_template = vec![false; rows];
    for (mi, spec) in m.schema.modalities.iter().enumerate() {
        let four: Vec<&Arc<Mmap>> = maps[mi * 4..mi * 4 + 4].iter().flatten().collect();
        let [f32m, i8m, scm, qm] = four.as_slice() else {
            continue;
        };
        let p = |k: usize| &paths[mi * 4 + k];
        let d = spec.dim;
        let sf = pacha_index::padded_stride(d, 4);
        let si = pacha_index::padded_stride(d, 1);
        let f: &[f32] = bytemuck::try_cast_slice(&f32m[HEADER_LEN..]).unwrap_or(&[]);
        let q: &[i8] = bytemuck::cast_slice(&i8m[HEADER_LEN..]);
        let sc: &[f32] = bytemuck::try_cast_slice(&scm[HEADER_LEN..]).unwrap_or(&[]);
        let qu: &[f32] = bytemuck::try_cast_slice(&qm[HEADER_LEN..]).unwrap_or(&[]);
        if f.len() < rows * sf || q.len() < rows * si || sc.len() < rows || qu.len() < rows {
            fx.add(
                p(0),
                format!("{} files too short for {rows} rows", spec.modality),
            );
            continue;
        }
        let mut codes = vec![0i8; d];
        for r in 0..rows {
            let frow = &f[r * sf..(r + 1) * sf];
            let qrow = &q[r * si..(r + 1) * si];
            let quality = qu[r];
            if quality == ABSENT_QUALITY {
                if frow.iter().any(|&x| x != 0.0) {
                    fx.row(p(0), || {
                        format!("row {r}: absent template has non-zero values")
                    });
                }
                if qrow.iter().any(|&x| x != 0) || sc[r] != 0.0 {
                    fx.row(p(1), || {
                        format!("row {r}: absent template has non-zero codes or scale")
                    });
                }
                continue;
            }
            has_template[r] = true;
            if !(0.0..=1.0).contains(&quality) {
                fx.row(p(3), || {
                    format!("row {r}: quality {quality} outside [0, 1]")
                });
            }
            let v = &frow[..d];
            let n2: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            if !n2.is_finite() || (n2 - 1.0).abs() > 1e-4 {
                fx.row(p(0), || format!("row {r}: squared norm {n2} is not 1"));
            }
            if frow[d..].iter().any(|&x| x != 0.0) {
                fx.row(p(0), || format!("row {r}: non-zero padding"));
            }
            let s = pacha_index::quant::quantize_i8(v, &mut codes);
            if codes != qrow[..d] || qrow[d..].iter().any(|&x| x != 0) {
                fx.row(p(1), || {
                    format!("row {r}: i8 codes do not match the f32 row")
                });
            }
            if s.to_bits() != sc[r].to_bits() {
                fx.row(p(2), || {
                    format!("row {r}: scale {} does not match the f32 row ({s})", sc[r])
                });
            }
        }
    }
    let all_mods_readable = maps[..ix].iter().all(Option::is_some);
    if all_mods_readable && let Some(r) = has_template.iter().position(|&t| !t) {
        fx.add(
            &paths[3],
            format!("row {r} has no template in any modality"),
        );
    }
    fx.summarise();
    report.problems.extend(fx.problems);
    // Stray files.
    if let Ok(rd) = std::fs::read_dir(dir) {
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = name == MANIFEST || name == LOCK || m.files.iter().any(|f| f.name == name);
            if !ours && (name == MANIFEST_TMP || parse_generation(name).is_some()) {
                report.warnings.push(Problem {
                    file: entry.path(),
                    what: "stray file (not in the manifest; a writer's open removes it)".into(),
                });
            }
        }
    }
    Ok(report)
}
