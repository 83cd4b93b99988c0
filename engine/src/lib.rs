//! pacha-engine: the registry. Durable memory-mapped template store, matcher, fusion, batch
//! deduplication and the `Engine` facade the registry calls.
//!
//! ```
//! use pacha_engine::{Engine, Modality};
//! use pacha_engine::engine::IdentifyOptions;
//! use pacha_engine::store::{Enrolment, ModalitySpec, Schema, Template};
//!
//! # fn main() -> Result<(), pacha_engine::EngineError> {
//! let schema = Schema { modalities: vec![ModalitySpec { modality: Modality::Face, dim: 4 }] };
//! let dir = tempfile::tempdir().map_err(|e| pacha_engine::EngineError::InvalidArgument(e.to_string()))?;
//! let engine = Engine::create(dir.path(), schema)?;
//! let face = |v: [f32; 4]| vec![Template { modality: Modality::Face, vector: v.to_vec(), quality: 0.9 }];
//! engine.insert(&Enrolment { subject_id: "UPI-1".into(), templates: face([1.0, 0.1, 0.0, 0.0]) })?; // durable now
//! let result = engine.identify(&face([1.0, 0.1, 0.0, 0.01]), &IdentifyOptions::default())?;
//! assert_eq!(result.candidates[0].subject_id, "UPI-1");
//! assert!(result.candidates[0].comparison.fused.score > result.threshold);
//! # Ok(())
//! # }
//! ```

pub mod annset;
pub mod audit;
pub mod candidates;
pub mod cluster;
pub mod dedup;
pub mod derived;
pub mod engine;
pub mod error;
pub mod eval;
pub mod evaluation;
pub mod fsutil;
pub mod fusedbound;
pub mod fusion;
pub mod identify;
pub mod identity;
pub mod idpath;
pub mod ingest;
pub mod joint;
pub mod matcher;
pub mod policy;
pub mod runio;
pub mod sketchfile;
pub mod store;
pub mod tail;
pub mod tiles;

pub use annset::AnnSet;
pub use derived::check_store_dir;
pub use engine::Engine;
pub use error::EngineError;
pub use pacha_datasets::{Modality, ModalityBlock, RecordBatch};
