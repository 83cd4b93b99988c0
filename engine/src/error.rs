//! The error type of pacha-engine.

use crate::Modality;
use std::path::PathBuf;

/// Everything that can go wrong in the engine. Each variant names the record, modality or file involved.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An I/O operation on a file of the store failed.
    #[error("I/O error while {op} {path}: {source}")]
    Io {
        /// What was being done (e.g. "writing", "syncing").
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `create` was asked to create a store where one already exists.
    #[error("{dir} already holds a store (MANIFEST exists)")]
    AlreadyExists {
        /// The store directory.
        dir: PathBuf,
    },
    /// A store path that exists but is not a directory.
    #[error("{path} is not a directory (a store is a directory)")]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// `create` was asked to make a store in a directory that already holds other files.
    #[error(
        "{dir} is not empty (it holds {example:?}, …) and holds no store: a new store is created only in a missing or empty directory"
    )]
    DirNotEmpty {
        /// The directory.
        dir: PathBuf,
        /// One of the entries found.
        example: String,
    },
    /// A store file is longer than its committed length by more than any recorded append explains: the
    /// bytes were not written by this store's writer, so they are not truncated.
    #[error(
        "{path} is {actual} bytes but the manifest commits {committed} and no recorded append reaches past {allowed}: the extra bytes were not written by this store (foreign or replaced file); refusing to truncate it (move the file away, or truncate it to {committed} bytes if you are sure)"
    )]
    ForeignData {
        /// The file.
        path: PathBuf,
        /// Its committed length.
        committed: u64,
        /// Its length on disk.
        actual: u64,
        /// The longest length a recorded append explains.
        allowed: u64,
    },
    /// `open` found no store (no MANIFEST) in the directory.
    #[error("{dir} does not hold a store (no MANIFEST)")]
    NotAStore {
        /// The directory.
        dir: PathBuf,
    },
    /// Another process (or another `Store` in this process) has the store open for writing.
    #[error("store {dir} is locked by another writer")]
    Locked {
        /// The store directory.
        dir: PathBuf,
    },
    /// A write (insert, delete, compaction, calibration, index build) was asked of a store or engine opened
    /// read-only.
    #[error("store {dir} is open read-only: reopen it for writing to {op}")]
    ReadOnly {
        /// The store directory.
        dir: PathBuf,
        /// The refused operation.
        op: &'static str,
    },
    /// An open kept racing a concurrent writer that replaced what was being read (a compaction unlinking
    /// the generation being opened, an index build replacing the index); retrying the open will succeed.
    #[error(
        "store {dir} kept changing while being opened ({attempts} attempts; a concurrent compaction or index build); retry"
    )]
    StoreChanged {
        /// The store directory.
        dir: PathBuf,
        /// Opens attempted.
        attempts: usize,
    },
    /// The MANIFEST is truncated, fails its checksum, or does not decode.
    #[error("manifest {path} is unreadable: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A store file's header has the wrong magic, version, checksum or shape.
    #[error("bad header in {path}: {reason}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A store file's committed data does not match the checksum recorded in the manifest.
    #[error("checksum mismatch in {path}: manifest says {expected:#010x}, data has {actual:#010x}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The crc32 recorded in the manifest.
        expected: u32,
        /// The crc32 of the bytes on disk.
        actual: u32,
    },
    /// A store file is shorter than its committed length: committed data has been lost.
    #[error("{path} is {actual} bytes but the manifest commits {expected} bytes")]
    FileTooShort {
        /// The file.
        path: PathBuf,
        /// Committed length from the manifest.
        expected: u64,
        /// Length on disk.
        actual: u64,
    },
    /// A store file breaks an invariant of the format (e.g. unordered subject offsets, invalid UTF-8).
    #[error("corrupt store file {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The schema is invalid (no modality, a duplicate modality, a dimension outside 1..=4096).
    #[error("invalid schema: {0}")]
    InvalidSchema(String),
    /// A subject ID is empty, too long, or contains control characters.
    #[error("invalid subject ID {subject_id:?}: {reason}")]
    InvalidSubjectId {
        /// The offending ID.
        subject_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same subject ID appears twice in one batch.
    #[error("subject {subject_id:?} appears more than once in the batch")]
    DuplicateInBatch {
        /// The repeated ID.
        subject_id: String,
    },
    /// A record carries a template for a modality that is not in the store's schema.
    #[error("subject {subject_id:?}: modality {modality} is not in the store schema")]
    UnknownModality {
        /// The record.
        subject_id: String,
        /// The modality.
        modality: Modality,
    },
    /// A record carries two templates for the same modality.
    #[error("subject {subject_id:?}: more than one {modality} template")]
    DuplicateTemplate {
        /// The record.
        subject_id: String,
        /// The modality.
        modality: Modality,
    },
    /// A template has the wrong dimension for its modality.
    #[error(
        "subject {subject_id:?}: {modality} template has dimension {actual}, schema says {expected}"
    )]
    DimensionMismatch {
        /// The record.
        subject_id: String,
        /// The modality.
        modality: Modality,
        /// Dimension in the schema.
        expected: usize,
        /// Dimension supplied.
        actual: usize,
    },
    /// A template contains NaN or infinity.
    #[error("subject {subject_id:?}: {modality} template contains NaN or infinity")]
    NonFinite {
        /// The record.
        subject_id: String,
        /// The modality.
        modality: Modality,
    },
    /// A template is the zero vector and cannot be normalised.
    #[error("subject {subject_id:?}: {modality} template has zero or near-zero norm (below 1e-6)")]
    ZeroNorm {
        /// The record.
        subject_id: String,
        /// The modality.
        modality: Modality,
    },
    /// A template's quality is NaN or outside [0, 1].
    #[error("subject {subject_id:?}: {modality} quality {quality} is outside [0, 1]")]
    BadQuality {
        /// The record.
        subject_id: String,
        /// The modality.
        modality: Modality,
        /// The quality supplied.
        quality: f32,
    },
    /// A record has no template at all.
    #[error("subject {subject_id:?} has no template")]
    NoTemplates {
        /// The record.
        subject_id: String,
    },
    /// The subject is already enrolled (live) with different templates.
    #[error("subject {subject_id:?} is already enrolled with a different {modality} template")]
    Conflict {
        /// The record.
        subject_id: String,
        /// The first modality whose template (presence, vector or quality) differs.
        modality: Modality,
    },
    /// A record batch is structurally inconsistent (block lengths, duplicate blocks).
    #[error("malformed record batch: {0}")]
    MalformedBatch(String),
    /// The store would exceed its maximum row count (u32 row numbers).
    #[error("store {dir} is full: {rows} rows would exceed the u32 row limit")]
    Full {
        /// The store directory.
        dir: PathBuf,
        /// Rows the store would have held.
        rows: u64,
    },
    /// An earlier commit reached the disk but the in-memory state could not follow; reopen the store.
    #[error("store {dir} must be reopened: {reason}")]
    Poisoned {
        /// The store directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A calibration could not be fitted.
    #[error("calibration failed: {0}")]
    Calibration(String),
    /// An argument is outside its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A probe's templates are invalid.
    #[error("invalid probe {probe}: {problem}")]
    InvalidProbe {
        /// The probe's name.
        probe: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A subject ID is not enrolled (or deleted).
    #[error("subject {0:?} is not enrolled")]
    UnknownSubject(String),
    /// A dedup run was cancelled; finished tiles are checkpointed.
    #[error("dedup cancelled after {finished_tiles} of {total_tiles} tiles")]
    Cancelled {
        /// Tiles finished.
        finished_tiles: usize,
        /// Tiles in the run.
        total_tiles: usize,
    },
    /// A record of an input file that an insert would refuse (found by ingest's validation pass).
    #[error("{}: {}refused", path.display(), at.as_ref().map_or(String::new(), |l| format!("{l}: ")))]
    InputRecord {
        /// The subjects file (or the Parquet file).
        path: PathBuf,
        /// Where the record is (`line 12` of a subjects file, `row 11` of a Parquet file), when the error
        /// names one subject.
        at: Option<String>,
        /// Why it is refused.
        source: Box<EngineError>,
    },
    /// An ingest failed after validation; `committed` records were committed before the failure.
    #[error("ingest stopped after committing {committed} of {total} records")]
    Ingest {
        /// Records committed before the failure.
        committed: usize,
        /// Records in the source.
        total: usize,
        /// The failure.
        source: Box<EngineError>,
    },
    /// A derived artefact of the store (its index or calibration, under `engine/`) is corrupt, of an old
    /// format, or was derived from something else; the operation needing it is refused until it is rebuilt.
    #[error(
        "the store's {artefact} cannot be used: {path}: {problem}; rebuild it with `{rebuild}`"
    )]
    Derived {
        /// `index` or `calibration`.
        artefact: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// The command that rebuilds it.
        rebuild: String,
    },
    /// The vector-search layer failed.
    #[error(transparent)]
    Index(#[from] pacha_index::IndexError),
    /// Reading a dataset file failed.
    #[error(transparent)]
    Dataset(#[from] pacha_datasets::DatasetError),
    /// Tiles of a dedup run cannot be merged: one is missing, given twice, foreign, or damaged.
    #[error("tiles do not merge: {0}")]
    Tiles(String),
}

impl EngineError {
    /// Wraps an I/O error with the operation and path.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
