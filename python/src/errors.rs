//! Engine errors as Python exceptions: the engine's message (with its causes), in the exception class a
//! Python user expects for the kind of failure.

use pacha_datasets::DatasetError;
use pacha_engine::EngineError;
use pyo3::PyErr;
use pyo3::exceptions::{
    PyBlockingIOError, PyFileExistsError, PyFileNotFoundError, PyKeyboardInterrupt,
    PyNotADirectoryError, PyOSError, PyPermissionError, PyRuntimeError, PyValueError,
};

pyo3::create_exception!(
    _pacha,
    PachaError,
    PyRuntimeError,
    "An engine failure that is neither bad input nor an I/O error (an unusable index or calibration, a poisoned or full store)."
);

/// The exception class of an engine error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Value,
    Os,
    NotFound,
    Exists,
    NotADir,
    Blocking,
    Permission,
    Interrupt,
    Engine,
}

fn kind(e: &EngineError) -> Kind {
    #[allow(unreachable_patterns)]
    match e {
        EngineError::Io { .. }
        | EngineError::FileTooShort { .. }
        | EngineError::Checksum { .. }
        | EngineError::Manifest { .. }
        | EngineError::BadHeader { .. }
        | EngineError::Corrupt { .. }
        | EngineError::ForeignData { .. }
        | EngineError::StoreChanged { .. } => Kind::Os,
        EngineError::NotAStore { .. } => Kind::NotFound,
        EngineError::AlreadyExists { .. } | EngineError::DirNotEmpty { .. } => Kind::Exists,
        EngineError::NotADirectory { .. } => Kind::NotADir,
        EngineError::Locked { .. } => Kind::Blocking,
        EngineError::ReadOnly { .. } => Kind::Permission,
        EngineError::InvalidSchema(_)
        | EngineError::InvalidSubjectId { .. }
        | EngineError::DuplicateInBatch { .. }
        | EngineError::UnknownModality { .. }
        | EngineError::DuplicateTemplate { .. }
        | EngineError::DimensionMismatch { .. }
        | EngineError::NonFinite { .. }
        | EngineError::ZeroNorm { .. }
        | EngineError::BadQuality { .. }
        | EngineError::NoTemplates { .. }
        | EngineError::Conflict { .. }
        | EngineError::MalformedBatch(_)
        | EngineError::InvalidArgument(_)
        | EngineError::InvalidProbe { .. }
        | EngineError::UnknownSubject(_)
        | EngineError::Calibration(_) => Kind::Value,
        EngineError::InputRecord { source, .. } | EngineError::Ingest { source, .. } => {
            kind(source)
        }
        EngineError::Cancelled { .. } => Kind::Interrupt,
        EngineError::Dataset(DatasetError::Io { .. }) => Kind::Os,
        EngineError::Dataset(_) => Kind::Value,
        // Derived (unusable index/calibration), Poisoned, Full, Index, Tiles, and any variant added later.
        _ => Kind::Engine,
    }
}

/// The error and its causes joined by ": ", skipping a cause the text already ends with (as the CLI prints).
pub fn render(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

/// A failure of a binding call.
#[derive(Debug)]
pub enum Fail {
    /// An engine error (class chosen by its kind).
    Engine(Box<EngineError>),
    /// An engine error about record `row` of the caller's arrays.
    Row {
        /// Row of the input arrays (0-based).
        row: usize,
        /// The subject ID at that row.
        subject: String,
        /// The error.
        error: Box<EngineError>,
    },
    /// Bad input found by the bindings themselves.
    Value(String),
}

impl From<EngineError> for Fail {
    fn from(e: EngineError) -> Self {
        Fail::Engine(Box::new(e))
    }
}

fn raise(k: Kind, msg: String) -> PyErr {
    match k {
        Kind::Value => PyValueError::new_err(msg),
        Kind::Os => PyOSError::new_err(msg),
        Kind::NotFound => PyFileNotFoundError::new_err(msg),
        Kind::Exists => PyFileExistsError::new_err(msg),
        Kind::NotADir => PyNotADirectoryError::new_err(msg),
        Kind::Blocking => PyBlockingIOError::new_err(msg),
        Kind::Permission => PyPermissionError::new_err(msg),
        Kind::Interrupt => PyKeyboardInterrupt::new_err(msg),
        Kind::Engine => PachaError::new_err(msg),
    }
}

impl From<Fail> for PyErr {
    fn from(f: Fail) -> PyErr {
        match f {
            Fail::Engine(e) => raise(kind(&e), render(&e)),
            Fail::Row {
                row,
                subject,
                error,
            } => raise(
                kind(&error),
                format!("row {row} (subject {subject:?}): {}", render(&error)),
            ),
            Fail::Value(m) => PyValueError::new_err(m),
        }
    }
}

/// Converts an engine error to a Python exception.
pub fn py_err(e: EngineError) -> PyErr {
    Fail::Engine(Box::new(e)).into()
}
