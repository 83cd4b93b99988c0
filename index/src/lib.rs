//! pacha-index: pure vector search. It knows nothing about people.
//!
//! SIMD kernels (simsimd, with a scalar reference), i8 quantisation, exact blocked search (faer), and an
//! approximate-nearest-neighbour index with exact rescoring. Vectors are read through borrowed views
//! ([`RowsF32`], [`RowsI8`]); the index never owns a second f32 copy of the gallery.

/// Re-export of the `half` crate whose `f16` the f16 kernels take.
pub use half;

mod amx;
pub mod ann;
pub mod bitset;
pub mod exact;
pub mod exact_i8;
#[cfg(feature = "hnsw")]
pub mod hnsw;
pub mod ivf;
pub mod joint;
pub mod kernels;
pub mod quant;
pub mod rng;
pub mod sketch;
pub mod view;

pub use ann::{AnnIndex, search_rescored};
pub use bitset::Bitset;
pub use exact::{JoinStats, Neighbour, Pair, RowFilter, self_join, threshold_join, top_k};
#[cfg(feature = "hnsw")]
pub use hnsw::{GraphPrecision, HnswIndex, HnswParams};
pub use kernels::{dot_f16, dot_f32, dot_i8, dot_many, simd_level};
pub use quant::{QuantizedRows, quantize_i8, quantize_rows};
pub use view::{RowPager, RowsF32, RowsI8, padded_stride, stream_batches};

/// Errors of the vector-search layer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A view or matrix does not have the shape the operation needs.
    #[error("shape error: {0}")]
    Shape(String),
    /// Dimensions of two operands differ.
    #[error("dimension mismatch: expected {expected}, got {got}")]
    Dim {
        /// The dimension the index or base has.
        expected: usize,
        /// The dimension that was supplied.
        got: usize,
    },
    /// A vector contains NaN or infinity, or has zero norm.
    #[error("invalid vector {id}: {problem}")]
    InvalidVector {
        /// Row or query number.
        id: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// Reading or writing an index file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A persisted index is corrupt or of another format.
    #[error("corrupt index file {path}: {problem}")]
    Corrupt {
        /// The file involved.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}
