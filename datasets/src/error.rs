//! The one error type of this crate: every variant names the file (or record) and the problem.

use crate::modality::Modality;
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

/// Everything that can go wrong reading, writing or generating datasets.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// An I/O operation on a file failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`open`, `read`, `write`, …).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file ends before the data its header promises.
    #[error(
        "{path}: truncated: {what} needs {expected} bytes from offset {offset}, but the file has {available}"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: &'static str,
        /// Byte offset where the missing part starts.
        offset: u64,
        /// Bytes needed from `offset`.
        expected: u64,
        /// Bytes present from `offset`.
        available: u64,
    },
    /// The file has bytes after the data its header describes.
    #[error("{path}: {extra} unexpected trailing bytes after the data ending at offset {offset}")]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Where the described data ends.
        offset: u64,
        /// How many bytes follow.
        extra: u64,
    },
    /// A malformed file header.
    #[error("{path}: bad header at offset {offset}: {reason}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// Byte offset of the problem.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An element type this crate does not read (only little-endian f32 and f16).
    #[error("{path}: unsupported dtype {descr:?} (expected '<f4' or '<f2')")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The `descr` found.
        descr: String,
    },
    /// A Fortran-order (column-major) array: rows would not be contiguous.
    #[error("{path}: fortran_order is True; only C-order (row-major) arrays are supported")]
    FortranOrder {
        /// The file.
        path: PathBuf,
    },
    /// The array is not 2-D, or has a zero dimension.
    #[error("{path}: shape {shape:?} is not a 2-D (rows, dim) shape with dim > 0")]
    BadShape {
        /// The file.
        path: PathBuf,
        /// The shape found.
        shape: Vec<u64>,
    },
    /// An `.fvecs` row whose dimension differs from the first row's.
    #[error("{path}: row {row} at offset {offset} has dimension {found}, expected {expected}")]
    DimMismatch {
        /// The file.
        path: PathBuf,
        /// 0-based row.
        row: u64,
        /// Byte offset of the row.
        offset: u64,
        /// Dimension of the first row.
        expected: usize,
        /// Dimension found.
        found: i64,
    },
    /// Rows requested past the end of a matrix.
    #[error("{path}: rows {start}..{end} out of range: the file has {rows} rows")]
    RowsOutOfRange {
        /// The file.
        path: PathBuf,
        /// First requested row.
        start: u64,
        /// One past the last requested row.
        end: u64,
        /// Rows in the file.
        rows: u64,
    },
    /// A row containing NaN or infinity.
    #[error("{path}: row {row} contains a non-finite value (NaN or infinity) at column {column}")]
    NonFiniteRow {
        /// The file.
        path: PathBuf,
        /// 0-based row.
        row: u64,
        /// 0-based column of the first bad value.
        column: usize,
    },
    /// Data handed to a writer that is not a whole number of rows, or not finite.
    #[error("{path}: cannot write {len} values as rows of dimension {dim}: {reason}")]
    BadRowData {
        /// The file.
        path: PathBuf,
        /// Values given.
        len: usize,
        /// Row dimension.
        dim: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A vector file whose row count differs from the subject list.
    #[error(
        "{path}: has {rows} rows but the subjects file {subjects_path} lists {subjects} subjects"
    )]
    ShapeMismatch {
        /// The vector file.
        path: PathBuf,
        /// Its rows.
        rows: u64,
        /// The subjects file.
        subjects_path: PathBuf,
        /// Subjects listed.
        subjects: u64,
    },
    /// A present template that cannot be used (NaN/inf, zero norm).
    #[error("subject {subject:?} (row {row}), {modality}: {problem} in {path}")]
    BadTemplate {
        /// The vector file.
        path: PathBuf,
        /// The subject ID.
        subject: String,
        /// 0-based row.
        row: u64,
        /// The modality.
        modality: Modality,
        /// What is wrong.
        problem: &'static str,
    },
    /// Malformed CSV/TSV (unterminated quote, stray quote, wrong field count, …).
    #[error("{path}: line {line}: {reason}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// 1-based physical line where the record starts.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// A CSV field that is not valid UTF-8.
    #[error("{path}: line {line}: column {column:?} is not valid UTF-8")]
    NonUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// Column name (or index when the header itself is bad).
        column: String,
    },
    /// A required column is missing from the header.
    #[error("{path}: header has no {column:?} column")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column needed.
        column: String,
    },
    /// An empty subject ID.
    #[error("{path}: line {line}: empty subject ID")]
    EmptyId {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
    },
    /// A subject ID longer than [`crate::subjects::MAX_ID_BYTES`] (shown shortened).
    #[error("{path}: line {line}: subject ID {id:?} is {len} bytes, more than {max}")]
    IdTooLong {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// The ID's first bytes (see [`shorten`]).
        id: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A record whose every template is absent.
    #[error("{path}: line {line}: subject {subject:?} has no template in any of the files given")]
    NoTemplate {
        /// The subjects file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// The subject ID.
        subject: String,
    },
    /// A subject ID with characters not allowed in IDs (control characters).
    #[error("{path}: line {line}: subject ID {id:?} contains a control character")]
    InvalidId {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// The offending ID.
        id: String,
    },
    /// The same subject ID twice.
    #[error("{path}: subject ID {id:?} appears twice, on lines {first_line} and {second_line}")]
    DuplicateId {
        /// The file.
        path: PathBuf,
        /// The ID.
        id: String,
        /// Line of the first occurrence.
        first_line: u64,
        /// Line of the second occurrence.
        second_line: u64,
    },
    /// A field whose value cannot be parsed (presence flag, quality, person number).
    #[error("{path}: line {line}: column {column:?}: invalid value {value:?} ({expected})")]
    InvalidValue {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// Column name.
        column: String,
        /// The value found.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The same modality given twice to an ingest source.
    #[error("modality {modality} given twice: {first} and {second}")]
    DuplicateModality {
        /// The modality.
        modality: Modality,
        /// First file.
        first: PathBuf,
        /// Second file.
        second: PathBuf,
    },
    /// A vector file with an extension this crate does not read.
    #[error("{path}: unknown vector file type (expected .npy or .fvecs)")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// An invalid generator configuration.
    #[error("invalid population config: {0}")]
    Config(String),
    /// A Parquet file that cannot be read (not Parquet, corrupt, unsupported encoding) or written.
    #[error("{path}: Parquet: {reason}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A Parquet column that is missing or of the wrong type or shape.
    #[error("{path}: column {column:?}: {problem}")]
    ParquetColumn {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
        /// What is wrong.
        problem: String,
    },
    /// A Parquet row refused: bad or duplicate subject ID, a template of the wrong length, NaN, zero, ….
    #[error("{path}: row {row}{}, column {column:?}: {problem}", subject.as_ref().map_or(String::new(), |s| format!(" (subject {s:?})")))]
    ParquetRow {
        /// The file.
        path: PathBuf,
        /// 0-based row in the file.
        row: u64,
        /// The subject ID of the row, when it has a readable one.
        subject: Option<String>,
        /// The column.
        column: String,
        /// What is wrong.
        problem: String,
    },
    /// JSON (de)serialisation failed.
    #[error("{path}: JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// A value for an error message: `s` itself when it is at most 64 bytes, else its first 64 bytes (cut at a
/// character boundary), an ellipsis and its length, so a 1 MB field never floods the terminal.
pub fn shorten(s: &str) -> String {
    const SHOWN: usize = 64;
    if s.len() <= SHOWN {
        return s.to_string();
    }
    let mut end = SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

impl DatasetError {
    /// Wrap an I/O error with its file and operation.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}
