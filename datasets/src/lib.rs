//! pacha-datasets: synthetic biometric populations with ground truth, and the file formats analysts bring.
//!
//! # Generator ([`generate`])
//! [`Generator`] streams a population of enrolments (face 512-d and fingers 256-d by default, f32, unit
//! norm) with planted duplicates: `duplicate_rate` of the records re-enrol an earlier person under a new
//! subject ID, some persons three times (`chain_share`). Identities come from a low-rank-plus-noise latent model
//! with a decaying spectrum, a global mean and shared family components (look-alike relatives); each capture
//! adds noise scaled by a per-capture quality; templates go missing (face ~0.5 %, finger ~2 %) and captures
//! degrade at configurable rates. The defaults give ArcFace-like face scores (genuine ≈ 0.65 ± 0.1, impostor
//! ≈ 0.03 ± 0.08) and lower, more variable finger scores; the `Isotropic` preset gives uniform random identities
//! (the ANN stress case). Output is deterministic by seed for any thread count, and streams in bounded
//! memory. The [`testpop`] presets (`isotropic-mates`, `lookalike-families`, `heavy-tail`, `power-law`,
//! `skewed-clusters`, `fingers-only`) are independently built test populations for measuring candidate recall
//! on geometry the index was not tuned on. [`write_population`] writes `face.npy`, `finger<N>.npy`, `subjects.csv`, `truth.csv`,
//! `clusters.csv` and `population.json` (config + measured genuine/impostor statistics).
//!
//! # Formats
//! * [`npy`]: memory-mapped `.npy` reader (`<f4`, `<f2`, C order, 2-D; versions 1.0–3.0) and a streaming
//!   writer that patches the row count on `finish`.
//! * [`fvecs`]: memory-mapped `.fvecs` reader and a writer.
//! * [`subjects`]: our own CSV/TSV parser (quotes, CRLF, BOM) and the subjects file reader/writer
//!   (`subject_id`, `<modality>_present`, `<modality>_quality`).
//! * [`ingest`]: [`IngestSource`] validates a subjects file and its modality files together and streams
//!   [`RecordBatch`]es; [`RecordSource`] is what ingest consumes, whatever the format.
//! * `parquet` (feature `parquet`): `ParquetSource` streams a Parquet table of enrolments (ID column, one
//!   list-of-float column per modality, nulls = absent) in bounded memory; `TableWriter` writes typed tables
//!   (dedup hits and clusters).
//!
//! Every failure is a [`DatasetError`] naming the file and the line, row or offset; bad input never panics.

pub mod error;
pub mod fvecs;
pub mod generate;
pub mod ingest;
pub mod modality;
pub mod npy;
#[cfg(feature = "parquet")]
pub mod parquet;
pub mod private;
pub mod subjects;
pub mod testpop;

pub use error::{DatasetError, Result};
pub use fvecs::{FvecsMatrix, write_fvecs};
pub use generate::{
    GeneratedBatch, Generator, ModalityModel, ModalityStats, PopulationConfig, PopulationManifest,
    PopulationSummary, Preset, ScoreStats, TruthPair, read_clusters, read_truth, write_population,
};
pub use ingest::{IngestSource, RecordSource, VectorFile};
pub use modality::{Modality, ModalityBlock, ModalityParseError, RecordBatch};
pub use npy::{Dtype, NpyMatrix, NpyWriter, write_npy_f32};
pub use subjects::{SubjectModality, Subjects, SubjectsWriter, read_subjects, write_subjects};
