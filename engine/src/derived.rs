//! The store's derived artefacts — the index (`engine/index/index.json` + one `<modality>.ivf` per indexed
//! modality) and the calibration (`engine/calibration.json`) — and what makes them trustworthy: each carries
//! the identity of what it was derived from ([`DerivedIdentity`]) and a checksum of every byte, every reader
//! verifies both, and [`check_derived`] verifies them for `check`.
//!
//! **Sealed files.** `index.json`, `calibration.json` and dedup checkpoint tiles are written as one header
//! line and a body: `pacha-derived <kind> v1 len=<body bytes> crc32=<crc32 of the body, 8 hex>\n<body>`.
//! [`unseal`] re-renders the header from the values it parsed and requires the exact bytes, so a flip
//! anywhere in the file (header, body, whitespace) is detected. The `.ivf` files have their own trailing
//! crc32 of their body ([`pacha_index::ivf::Ivf::save`]); `index.json` lists each one's length and that
//! crc32, so they are bound to the index they belong to.
//!
//! **Identity.** An artefact built on rows `0..R` of a store stays valid while rows are appended (new rows
//! are compared by re-probing / exact scan, and a calibration is a statistic of the population), and
//! while rows are deleted (tombstones are filtered at match time); it is invalid for another generation
//! (compaction renumbers rows), for another store, and for another pacha version. The identity therefore
//! names the generation, `R`, and a fingerprint of rows `0..R` only ([`store_fingerprint`]: every subject
//! ID and a strided sample of template rows; not the tombstones, not the commit sequence).

use crate::EngineError;
use crate::store::{Problem, Snapshot};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Directory of the engine's side files inside a store directory.
pub const ENGINE_DIR: &str = "engine";
/// The calibration file inside [`ENGINE_DIR`].
pub const CALIBRATION_FILE: &str = "calibration.json";
/// The index directory inside [`ENGINE_DIR`].
pub const INDEX_DIR: &str = "index";
/// The index's metadata file inside [`INDEX_DIR`] (written last by a build).
pub const INDEX_META: &str = "index.json";
/// Version of the sealed-file header and of the identity.
const SEAL_VERSION: u32 = 1;
/// Template rows per modality whose bytes enter the fingerprint.
const FINGERPRINT_ROWS: usize = 4096;

/// Which derived artefact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Artefact {
    /// `engine/index/`.
    Index,
    /// `engine/calibration.json`.
    Calibration,
}

impl Artefact {
    /// The command that rebuilds the artefact of the store in `store_dir`.
    pub fn rebuild_command(self, store_dir: &Path) -> String {
        let what = match self {
            Artefact::Index => "index",
            Artefact::Calibration => "calibrate",
        };
        format!("pacha {what} --store {}", store_dir.display())
    }

    /// Name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Artefact::Index => "index",
            Artefact::Calibration => "calibration",
        }
    }
}

/// Why a derived artefact cannot be used; turned into [`EngineError::Derived`] by the operations that
/// need the artefact (an index build or a calibration replaces it instead).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DerivedProblem {
    /// The artefact.
    pub artefact: Artefact,
    /// The file concerned.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: String,
    /// The command that rebuilds it.
    pub rebuild: String,
}

impl DerivedProblem {
    /// A problem with `artefact` of the store in `store_dir`, found in `path`.
    pub fn new(
        artefact: Artefact,
        store_dir: &Path,
        path: &Path,
        problem: impl Into<String>,
    ) -> Self {
        DerivedProblem {
            artefact,
            path: path.to_path_buf(),
            problem: problem.into(),
            rebuild: artefact.rebuild_command(store_dir),
        }
    }

    /// The error an operation needing the artefact returns.
    pub fn to_error(&self) -> EngineError {
        EngineError::Derived {
            artefact: self.artefact.name(),
            path: self.path.clone(),
            problem: self.problem.clone(),
            rebuild: self.rebuild.clone(),
        }
    }
}

/// What a derived artefact was derived from (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DerivedIdentity {
    /// Version of this identity format.
    pub format: u32,
    /// The pacha version that built the artefact.
    pub pacha_version: String,
    /// Store generation.
    pub generation: u64,
    /// Rows `0..rows` the artefact was built on.
    pub rows: usize,
    /// Commit the artefact was built at (informational: appends do not invalidate it).
    pub commit_seq: u64,
    /// Schema: modality keys and dimensions.
    pub schema: Vec<(String, usize)>,
    /// Fingerprint of rows `0..rows` ([`store_fingerprint`]).
    pub fingerprint: String,
    /// The build parameters, as text.
    pub params: String,
}

impl DerivedIdentity {
    /// The identity of an artefact built now on every row of `snap` with `params`.
    pub fn of(snap: &Snapshot, params: String) -> DerivedIdentity {
        DerivedIdentity {
            format: SEAL_VERSION,
            pacha_version: env!("CARGO_PKG_VERSION").to_string(),
            generation: snap.generation(),
            rows: snap.rows(),
            commit_seq: snap.commit_seq(),
            schema: schema_of(snap),
            fingerprint: store_fingerprint(snap, snap.rows()),
            params,
        }
    }

    /// Checks that the artefact belongs to `snap` (its generation, schema and rows `0..rows`) and to this
    /// pacha version; the reason otherwise.
    pub fn verify(&self, snap: &Snapshot) -> Result<(), String> {
        let here = env!("CARGO_PKG_VERSION");
        if self.format != SEAL_VERSION {
            return Err(format!(
                "identity format {}, expected {SEAL_VERSION}",
                self.format
            ));
        }
        if self.pacha_version != here {
            return Err(format!(
                "built by pacha {}, this is pacha {here}",
                self.pacha_version
            ));
        }
        if self.schema != schema_of(snap) {
            return Err(format!(
                "built for schema {:?}, the store has {:?}",
                self.schema,
                schema_of(snap)
            ));
        }
        if self.generation != snap.generation() {
            return Err(format!(
                "built on store generation {}, the store is at generation {} (compacted since)",
                self.generation,
                snap.generation()
            ));
        }
        if self.rows > snap.rows() {
            return Err(format!(
                "built on {} rows, the store has {} (another store, or a later commit than this reader's snapshot)",
                self.rows,
                snap.rows()
            ));
        }
        let fp = store_fingerprint(snap, self.rows);
        if self.fingerprint != fp {
            return Err(format!(
                "built on other data: fingerprint of rows 0..{} is {fp}, the artefact names {} (another store?)",
                self.rows, self.fingerprint
            ));
        }
        Ok(())
    }
}

fn schema_of(snap: &Snapshot) -> Vec<(String, usize)> {
    snap.schema()
        .modalities
        .iter()
        .map(|s| (s.modality.key(), s.dim))
        .collect()
}

/// Fingerprint of rows `0..rows` of `snap` (`crc32:<hex>`): generation, schema, every subject ID, and the
/// template bytes (or absence) of a strided sample of [`FINGERPRINT_ROWS`] rows per modality. Appends and
/// deletions do not change it.
pub fn store_fingerprint(snap: &Snapshot, rows: usize) -> String {
    let rows = rows.min(snap.rows());
    let mut h = crc32fast::Hasher::new();
    h.update(&snap.generation().to_le_bytes());
    h.update(&(rows as u64).to_le_bytes());
    for (key, dim) in schema_of(snap) {
        h.update(key.as_bytes());
        h.update(&(dim as u64).to_le_bytes());
    }
    for r in 0..rows {
        h.update(snap.subject_id(r).as_bytes());
        h.update(&[0]);
    }
    let step = (rows / FINGERPRINT_ROWS).max(1);
    for spec in &snap.schema().modalities {
        for r in (0..rows).step_by(step) {
            match snap.template(spec.modality, r) {
                Some(t) => {
                    h.update(&[1]);
                    h.update(bytemuck::cast_slice(t));
                }
                None => h.update(&[0]),
            }
        }
    }
    format!("crc32:{:08x}", h.finalize())
}

/// The sealed form of `body` (see the module docs).
pub fn seal(kind: &str, body: &[u8]) -> Vec<u8> {
    let mut out = header(kind, body.len(), crc32fast::hash(body)).into_bytes();
    out.extend_from_slice(body);
    out
}

fn header(kind: &str, len: usize, crc: u32) -> String {
    format!("pacha-derived {kind} v{SEAL_VERSION} len={len} crc32={crc:08x}\n")
}

/// The body of a sealed file of `kind`, after verifying its header, length and checksum; the reason
/// otherwise (an old unsealed JSON file is named as such).
pub fn unseal<'a>(kind: &str, bytes: &'a [u8]) -> Result<&'a [u8], String> {
    if bytes.first() == Some(&b'{') {
        return Err(
            "old format without a checksum (written before pacha sealed its derived files)".into(),
        );
    }
    let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
        return Err("no header line".into());
    };
    let (head, body) = (&bytes[..=nl], &bytes[nl + 1..]);
    let text = std::str::from_utf8(head).map_err(|_| "header is not UTF-8".to_string())?;
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .ok_or_else(|| format!("header {:?} has no {name}", text.trim_end()))
    };
    let len: usize = field("len=")?
        .parse()
        .map_err(|_| format!("header {:?}: bad length", text.trim_end()))?;
    let crc = u32::from_str_radix(field("crc32=")?, 16)
        .map_err(|_| format!("header {:?}: bad checksum", text.trim_end()))?;
    if text != header(kind, len, crc) {
        return Err(format!(
            "header {:?} is not a {kind} v{SEAL_VERSION} header",
            text.trim_end()
        ));
    }
    if body.len() != len {
        return Err(format!(
            "body is {} bytes, the header says {len} (truncated or extended)",
            body.len()
        ));
    }
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(format!(
            "checksum mismatch: body has crc32 {actual:08x}, the header says {crc:08x}"
        ));
    }
    Ok(body)
}

/// State of one derived artefact, for `info` and `check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtefactState {
    /// Present and verified.
    Ok,
    /// Not built (a never-indexed or never-calibrated store).
    Missing,
    /// Present but unusable: corrupt, old format, or derived from something else.
    Invalid,
}

/// State and a one-line description of a derived artefact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtefactStatus {
    /// The state.
    pub state: ArtefactState,
    /// What it covers, or what is wrong and how to rebuild it.
    pub detail: String,
}

impl std::fmt::Display for ArtefactStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl ArtefactStatus {
    /// Status of a verified artefact with `identity`, on a store of `rows` rows.
    pub fn ok(artefact: Artefact, identity: &DerivedIdentity, rows: usize) -> ArtefactStatus {
        let since = rows.saturating_sub(identity.rows);
        let after = match artefact {
            Artefact::Index => "compared by re-probing the partition",
            Artefact::Calibration => "a calibration stays valid as rows are appended",
        };
        ArtefactStatus {
            state: ArtefactState::Ok,
            detail: format!(
                "ok: built on rows 0..{} of generation {} (commit {}, pacha {}); {since} rows since ({after})",
                identity.rows, identity.generation, identity.commit_seq, identity.pacha_version
            ),
        }
    }

    /// Status of an artefact that was never built.
    pub fn missing(artefact: Artefact, store_dir: &Path) -> ArtefactStatus {
        let detail = match artefact {
            Artefact::Index => format!(
                "none: not indexed (dedup plans without a partition); build it with `{}`",
                artefact.rebuild_command(store_dir)
            ),
            Artefact::Calibration => format!(
                "none: uncalibrated (dedup and identify fit impostor models from the store at match time and say so); keep a calibration with `{}`",
                artefact.rebuild_command(store_dir)
            ),
        };
        ArtefactStatus {
            state: ArtefactState::Missing,
            detail,
        }
    }

    /// Status of an unusable artefact.
    pub fn invalid(p: &DerivedProblem) -> ArtefactStatus {
        ArtefactStatus {
            state: ArtefactState::Invalid,
            detail: format!(
                "corrupt ({}: {}) — rebuild with `{}`",
                p.path.display(),
                p.problem,
                p.rebuild
            ),
        }
    }
}

/// What [`check_derived`] found under `engine/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DerivedReport {
    /// The index's state.
    pub index: ArtefactStatus,
    /// The calibration's state.
    pub calibration: ArtefactStatus,
    /// Files verified (checksum and identity).
    pub files_checked: usize,
    /// Corrupt, old-format, foreign or missing files, and stray files: `check` fails on any.
    pub problems: Vec<Problem>,
    /// Findings that are not damage: an unindexed or uncalibrated store, identities not verifiable.
    pub warnings: Vec<Problem>,
}

/// Verifies every file under `<store_dir>/engine/`: the calibration's and the index's checksums, the
/// identity of each against `snap` (when given: without a snapshot only checksums are verified), every
/// `.ivf` listed in `index.json` (a missing one is a problem), and stray files. Reads only.
pub fn check_derived(store_dir: &Path, snap: Option<&Snapshot>) -> DerivedReport {
    let engine_dir = store_dir.join(ENGINE_DIR);
    let mut report = DerivedReport {
        index: ArtefactStatus::missing(Artefact::Index, store_dir),
        calibration: ArtefactStatus::missing(Artefact::Calibration, store_dir),
        files_checked: 0,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    if snap.is_none() {
        report.warnings.push(Problem {
            file: engine_dir.clone(),
            what: "identities not verified: the store could not be opened (only checksums were)"
                .into(),
        });
    }
    // Calibration.
    let cal_path = engine_dir.join(CALIBRATION_FILE);
    match crate::engine::load_calibration_file(store_dir, snap) {
        Ok(None) => report.warnings.push(Problem {
            file: cal_path.clone(),
            what: report.calibration.detail.clone(),
        }),
        Ok(Some((_, id))) => {
            report.files_checked += 1;
            report.calibration = match snap {
                Some(s) => ArtefactStatus::ok(Artefact::Calibration, &id, s.rows()),
                None => ArtefactStatus {
                    state: ArtefactState::Ok,
                    detail: "checksum ok (identity not verified)".into(),
                },
            };
        }
        Err(p) => {
            report.calibration = ArtefactStatus::invalid(&p);
            report.problems.push(Problem {
                file: p.path.clone(),
                what: format!("{} — rebuild with `{}`", p.problem, p.rebuild),
            });
        }
    }
    // Index.
    let index_dir = engine_dir.join(INDEX_DIR);
    let mut expected_index_files: Vec<String> = Vec::new();
    match crate::annset::verify_saved(store_dir, &index_dir, snap) {
        Ok(None) => report.warnings.push(Problem {
            file: index_dir.join(INDEX_META),
            what: report.index.detail.clone(),
        }),
        Ok(Some((id, files))) => {
            report.files_checked += 1 + files.len();
            expected_index_files = files;
            report.index = match snap {
                Some(s) => ArtefactStatus::ok(Artefact::Index, &id, s.rows()),
                None => ArtefactStatus {
                    state: ArtefactState::Ok,
                    detail: "checksums ok (identity not verified)".into(),
                },
            };
        }
        Err((p, listed)) => {
            expected_index_files = listed;
            report.index = ArtefactStatus::invalid(&p);
            report.problems.push(Problem {
                file: p.path.clone(),
                what: format!("{} — rebuild with `{}`", p.problem, p.rebuild),
            });
        }
    }
    // Stray files: anything else under engine/ and engine/index/.
    let stray = |file: PathBuf, hint: String| Problem {
        file,
        what: format!("stray file (not part of the index or the calibration); {hint}"),
    };
    if let Ok(rd) = std::fs::read_dir(&engine_dir) {
        let mut names: Vec<_> = rd.flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name == CALIBRATION_FILE || name == INDEX_DIR {
                continue;
            }
            report.problems.push(stray(
                e.path(),
                format!(
                    "`{}` rewrites the calibration; remove it by hand if it is not pacha's",
                    Artefact::Calibration.rebuild_command(store_dir)
                ),
            ));
        }
    }
    if let Ok(rd) = std::fs::read_dir(&index_dir) {
        let mut names: Vec<_> = rd.flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name();
            let name = name.to_string_lossy().to_string();
            if name == INDEX_META || expected_index_files.contains(&name) {
                continue;
            }
            report.problems.push(stray(
                e.path(),
                format!(
                    "an interrupted or deleted index? `{}` replaces the index directory",
                    Artefact::Index.rebuild_command(store_dir)
                ),
            ));
        }
    }
    report
}

/// Everything `check` verifies in a store directory: the store files ([`crate::store::check`]) and the
/// derived artefacts under `engine/` ([`check_derived`]).
#[derive(Clone, Debug)]
pub struct StoreDirReport {
    /// The store files.
    pub store: crate::store::CheckReport,
    /// The derived artefacts.
    pub derived: DerivedReport,
}

impl StoreDirReport {
    /// True when neither part found a problem (warnings allowed).
    pub fn is_clean(&self) -> bool {
        self.store.is_clean() && self.derived.problems.is_empty()
    }

    /// Every problem, store files first.
    pub fn problems(&self) -> Vec<&Problem> {
        self.store
            .problems
            .iter()
            .chain(&self.derived.problems)
            .collect()
    }
}

/// Checks every file of the store directory `dir`: the store files, then the index and calibration
/// (checksums, and identities against the store's current snapshot, opened read-only). Changes nothing and
/// takes no lock. `Err` only when the directory cannot be examined at all.
pub fn check_store_dir(dir: &Path) -> Result<StoreDirReport, EngineError> {
    let store = crate::store::check(dir)?;
    let opened = crate::store::Store::open_read_only(dir);
    let snap = opened.as_ref().ok().map(|s| s.snapshot());
    let mut derived = check_derived(dir, snap.as_deref());
    if let Err(e) = &opened {
        derived.warnings.push(Problem {
            file: dir.to_path_buf(),
            what: format!("store not opened for identity checks: {e}"),
        });
    }
    Ok(StoreDirReport { store, derived })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flip_of_a_sealed_file_is_detected() {
        let body = br#"{"a": [1, 2.5, "x"],  "b": null}"#;
        let sealed = seal("test", body);
        assert_eq!(unseal("test", &sealed).unwrap(), body);
        assert!(unseal("other", &sealed).is_err());
        for at in 0..sealed.len() {
            for bit in 0..8 {
                let mut b = sealed.clone();
                b[at] ^= 1 << bit;
                assert!(
                    unseal("test", &b).is_err(),
                    "flip of bit {bit} at byte {at} ({:?}) undetected",
                    sealed[at] as char
                );
            }
        }
        assert!(unseal("test", &sealed[..sealed.len() - 1]).is_err());
        let mut longer = sealed.clone();
        longer.push(b' ');
        assert!(unseal("test", &longer).is_err());
        assert!(
            unseal("test", b"{\"old\": 1}")
                .unwrap_err()
                .contains("old format")
        );
        assert!(unseal("test", b"").is_err());
    }
}
