//! pacha-engine: the registry. Durable memory-mapped template store, matcher, fusion, batch
//! deduplication and the `Engine` facade the registry calls.
//!
//! ```no_run
//! use pacha_engine::{Engine, Modality};
//! use pacha_engine::engine::IdentifyOptions;
//! use pacha_engine::store::{Enrolment, ModalitySpec, Schema, Template};
//!
//! # fn main() -> Result<(), pacha_engine::EngineError> {
//! let schema = Schema { modalities: vec![ModalitySpec { modality: Modality::Face, dim: 4 }] };
//! let engine = Engine::create(std::path::Path::new("/tmp/registry"), schema)?;
//! let face = |v: [f32; 4]| vec![Template { modality: Modality::Face, vector: v.to_vec(), quality: 0.9 }];
//! engine.insert(&Enrolment { subject_id: "UPI-1".into(), templates: face([1.0, 0.1, 0.0, 0.0]) })?; // durable now
//! let result = engine.identify(&face([1.0, 0.1, 0.0, 0.01]), &IdentifyOptions::default())?;
//! for c in &result.candidates {
//!     println!("{} score {:.1}", c.subject_id, c.comparison.fused.score);
//! }
//! # Ok(())
//! # }
//! ```

pub mod annset;
pub mod candidates;
pub mod cluster;
pub mod dedup;
pub mod engine;
pub mod error;
pub mod eval;
pub mod evaluation;
pub mod fsutil;
pub mod fusion;
pub mod ingest;
pub mod matcher;
pub mod runio;
pub mod store;

pub use annset::AnnSet;
pub use engine::Engine;
pub use error::EngineError;
pub use pacha_datasets::{Modality, ModalityBlock, RecordBatch};
