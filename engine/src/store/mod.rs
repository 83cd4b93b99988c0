//! The durable, memory-mapped template store.
//!
//! A store is a directory. Per schema modality it holds four fixed-stride files (L2-normalised f32 rows,
//! their i8-quantised twin, the per-row i8 scales, the per-row quality with a sentinel for "absent"), plus a
//! subject table (concatenated UTF-8 IDs and per-row end offsets) and an append-only tombstone log. Every
//! file starts with a self-describing, checksummed 64-byte header (magic, format version, dtype, modality,
//! dimension, stride, generation, header crc32) and carries a
//! generation number in its name (`face.g0.f32`, `subjects.g0.ids`, …).
//!
//! The `MANIFEST` is the single source of truth: the committed length and running crc32 of every file, the
//! committed row and tombstone counts, the schema, the generation and a commit sequence number. A commit
//! first records its append intent (the target length of every file) in the small `APPEND` journal and
//! fsyncs it, appends to the files, fsyncs them, then atomically replaces the manifest (write
//! `MANIFEST.tmp`, fsync, rename, fsync the directory). Bytes past a committed length that the journal
//! explains are a torn write: a writer's [`Store::open`] cuts them away. Bytes it does not explain were not
//! written by this store's writer, and the open refuses with [`EngineError::ForeignData`] naming the file
//! instead of truncating it (see `intent.rs`).
//!
//! Every open (writer and read-only) verifies the running crc32 of every committed file against the
//! manifest before serving a byte: the subject table and tombstones serially, the template files (f32, i8,
//! scales, qualities) in parallel 16 MiB blocks combined in order. A flipped bit anywhere is
//! [`EngineError::Checksum`] naming the file, never a silent 1e35 score. The cost is one pass over the data
//! (measured in BENCHMARKS.md, "Store open verification"); [`check`] additionally verifies every invariant
//! row by row.
//!
//! Every file the store creates is mode 0600 and a directory it creates 0700 (see [`crate::fsutil`]). A new
//! store is created only in a missing or empty directory.
//!
//! # Writers and readers
//!
//! A store is opened in one of two modes:
//!
//! - **Writer** ([`Store::create`], [`Store::open`]): takes a non-blocking exclusive `flock` on the `LOCK`
//!   file (created if missing) for as long as the `Store` lives. A second writer, in this or another process,
//!   is refused with [`EngineError::Locked`]. Only a writer repairs: it truncates torn tails and removes
//!   stray files of other generations.
//! - **Reader** ([`Store::open_read_only`]): takes no lock at all, opens every file read-only, never writes,
//!   truncates, creates or removes anything (it works on a read-only mount), and maps exactly the committed
//!   lengths of the manifest it read. Readers run beside each other and beside a writer; a writer is never
//!   refused because of readers.
//!
//! This is safe without a shared lock because of how the files change: within a generation, data files are
//! append-only and committed lengths only grow (a writer truncates only bytes past the *latest* committed
//! length, which is at least the length any reader mapped); the manifest is replaced atomically (rename), so a
//! reader reads either the old or the new one, whole; compaction writes the next generation's files under new
//! names and unlinks the old ones only after switching the manifest, and an unlinked file stays readable
//! through the mappings and handles a reader already holds. A reader therefore sees a consistent snapshot of
//! one commit (snapshot isolation) and never sees later commits: reopen to see them. The one race is a reader
//! that reads the manifest of generation g and then finds g's files already unlinked by a compaction:
//! `open_read_only` notices that the manifest's generation moved on and retries on the new manifest (up to
//! three attempts, then [`EngineError::StoreChanged`], which is retryable). Every write API of a read-only
//! store returns [`EngineError::ReadOnly`].
//!
//! Readers take an `Arc<Snapshot>`: memory maps covering exactly the committed lengths, the shared ID index
//! and the tombstone bitset. Publishing a snapshot after a commit costs O(files) (one `mmap` per file) plus
//! the new rows added to the shared ID index; the bitset is shared until a delete copies it.

mod check;
mod format;
mod intent;
mod manifest;
#[cfg(test)]
mod powerloss;
mod snapshot;
mod subjects;
#[cfg(test)]
mod tests;
pub(crate) mod vfs;

pub use check::{CheckReport, Problem, check};
pub use snapshot::Snapshot;
pub use subjects::{MAX_SUBJECT_ID_BYTES, validate_subject_id};

use crate::fsutil::{create_private_dir_all, private_options};
use crate::{EngineError, Modality, ModalityBlock, RecordBatch};
use format::{ABSENT_QUALITY, FileKind, FileSpec, HEADER_LEN, crc_extend, parse_generation};
use intent::{APPEND_JOURNAL, Intent};
use manifest::{FileState, MANIFEST_TMP, Manifest, manifest_path, sync_dir};
use memmap2::{Mmap, MmapOptions};
use serde::{Deserialize, Serialize};
use snapshot::ModView;
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use subjects::{IdIndex, id_hash};

/// Largest accepted vector dimension.
pub const MAX_DIM: usize = 4096;
/// Name of the lock file that keeps a second writer out (readers do not touch it).
const LOCK: &str = "LOCK";

/// One modality of the schema and its fixed vector dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModalitySpec {
    /// The modality.
    pub modality: Modality,
    /// Its vector dimension, 1..=4096.
    pub dim: usize,
}

/// The modalities a store holds, fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    /// At least one modality, no duplicates.
    pub modalities: Vec<ModalitySpec>,
}

impl Schema {
    /// A schema of `(modality, dimension)` pairs, in order (validated when a store is created from it).
    pub fn of(modalities: impl IntoIterator<Item = (Modality, usize)>) -> Schema {
        Schema {
            modalities: modalities
                .into_iter()
                .map(|(modality, dim)| ModalitySpec { modality, dim })
                .collect(),
        }
    }

    /// The modalities, in schema order.
    pub fn modality_list(&self) -> Vec<Modality> {
        self.modalities.iter().map(|s| s.modality).collect()
    }

    /// The modalities' stable keys (`face`, `finger2`, …), in schema order.
    pub fn keys(&self) -> Vec<String> {
        self.modalities.iter().map(|s| s.modality.key()).collect()
    }

    /// A validated schema.
    pub fn new(modalities: Vec<ModalitySpec>) -> Result<Schema, EngineError> {
        let s = Schema { modalities };
        s.validate()?;
        Ok(s)
    }

    /// Checks: at least one modality, no duplicate, finger positions 1..=10, dimensions 1..=[`MAX_DIM`].
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.modalities.is_empty() {
            return Err(EngineError::InvalidSchema("no modality".into()));
        }
        let mut seen = HashSet::new();
        for s in &self.modalities {
            if let Modality::Finger(p) = s.modality
                && !(1..=10).contains(&p)
            {
                return Err(EngineError::InvalidSchema(format!(
                    "finger position {p} is not in 1..=10"
                )));
            }
            if !seen.insert(s.modality) {
                return Err(EngineError::InvalidSchema(format!(
                    "{} appears twice",
                    s.modality
                )));
            }
            if !(1..=MAX_DIM).contains(&s.dim) {
                return Err(EngineError::InvalidSchema(format!(
                    "{} dimension {} is not in 1..={MAX_DIM}",
                    s.modality, s.dim
                )));
            }
        }
        Ok(())
    }

    /// The dimension of `m`, if it is in the schema.
    pub fn dim(&self, m: Modality) -> Option<usize> {
        self.modalities
            .iter()
            .find(|s| s.modality == m)
            .map(|s| s.dim)
    }
}

/// One template of an enrolment.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    /// Which modality.
    pub modality: Modality,
    /// The embedding (any non-zero norm; normalised on the way in).
    pub vector: Vec<f32>,
    /// Capture quality in [0, 1].
    pub quality: f32,
}

/// One person's enrolment: a subject ID and at least one template.
#[derive(Clone, Debug, PartialEq)]
pub struct Enrolment {
    /// External subject ID (non-empty UTF-8, no control characters, at most 256 bytes).
    pub subject_id: String,
    /// Templates, at most one per modality.
    pub templates: Vec<Template>,
}

/// What an insert did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InsertReport {
    /// Records appended as new rows.
    pub inserted: usize,
    /// Records already enrolled with identical templates (nothing written).
    pub unchanged: usize,
    /// The row of each input record, in input order.
    pub rows: Vec<u32>,
}

/// What a compaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactReport {
    /// Generation before the compaction.
    pub generation_before: u64,
    /// Generation after the compaction.
    pub generation: u64,
    /// Rows before (tombstoned included).
    pub rows_before: usize,
    /// Rows after (all live).
    pub rows_after: usize,
    /// Tombstoned rows dropped.
    pub removed: usize,
    /// Committed bytes of all files before.
    pub bytes_before: u64,
    /// Committed bytes of all files after.
    pub bytes_after: u64,
}

/// Smallest accepted L2 norm of a template before normalisation.
///
/// Real embeddings have norms of order 1 (unit-normalised models) to a few hundred (raw network outputs);
/// 1e-6 is a millionth of the smallest of those. Below it the vector is numerically empty: its components
/// are ~1e-8 or less, near the subnormal range (< 1.2e-38) where f32 keeps fewer significant bits, and
/// normalising multiplies any noise or rounding in it by more than a million. A 1e-42 template (all
/// subnormal) is therefore rejected like a zero one.
pub const MIN_TEMPLATE_NORM: f64 = pacha_datasets::ingest::MIN_TEMPLATE_NORM;

/// L2-normalises `v` the way the store does (f64 accumulation); `None` for NaN/inf or a norm below
/// [`MIN_TEMPLATE_NORM`].
pub fn l2_normalize(v: &[f32]) -> Option<Vec<f32>> {
    normalize(v).ok()
}

enum VecProblem {
    NonFinite,
    ZeroNorm,
}

fn normalize(v: &[f32]) -> Result<Vec<f32>, VecProblem> {
    if v.iter().any(|x| !x.is_finite()) {
        return Err(VecProblem::NonFinite);
    }
    let n2: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    if n2 < MIN_TEMPLATE_NORM * MIN_TEMPLATE_NORM {
        return Err(VecProblem::ZeroNorm);
    }
    let inv = 1.0 / n2.sqrt();
    Ok(v.iter().map(|&x| (f64::from(x) * inv) as f32).collect())
}

/// Converts enrolments to a columnar batch with one block per schema modality.
pub fn enrolments_to_batch(
    schema: &Schema,
    enrolments: &[Enrolment],
) -> Result<RecordBatch, EngineError> {
    let n = enrolments.len();
    let mut blocks: Vec<ModalityBlock> = schema
        .modalities
        .iter()
        .map(|s| ModalityBlock {
            modality: s.modality,
            dim: s.dim,
            data: vec![0.0; n * s.dim],
            present: vec![false; n],
            quality: vec![0.0; n],
        })
        .collect();
    for (i, e) in enrolments.iter().enumerate() {
        for t in &e.templates {
            let Some(b) = blocks.iter_mut().find(|b| b.modality == t.modality) else {
                return Err(EngineError::UnknownModality {
                    subject_id: e.subject_id.clone(),
                    modality: t.modality,
                });
            };
            if t.vector.len() != b.dim {
                return Err(EngineError::DimensionMismatch {
                    subject_id: e.subject_id.clone(),
                    modality: t.modality,
                    expected: b.dim,
                    actual: t.vector.len(),
                });
            }
            if b.present[i] {
                return Err(EngineError::DuplicateTemplate {
                    subject_id: e.subject_id.clone(),
                    modality: t.modality,
                });
            }
            b.present[i] = true;
            b.quality[i] = t.quality;
            b.data[i * b.dim..(i + 1) * b.dim].copy_from_slice(&t.vector);
        }
    }
    Ok(RecordBatch {
        ids: enrolments.iter().map(|e| e.subject_id.clone()).collect(),
        blocks,
    })
}

/// Maps exactly the first `len` bytes of `file` read-only. The only `unsafe` in the store.
pub(crate) fn map_committed(file: &File, len: u64, path: &Path) -> Result<Arc<Mmap>, EngineError> {
    let actual = file
        .metadata()
        .map_err(|e| EngineError::io("reading metadata of", path, e))?
        .len();
    if actual < len {
        return Err(EngineError::FileTooShort {
            path: path.to_path_buf(),
            expected: len,
            actual,
        });
    }
    let len = usize::try_from(len).map_err(|_| EngineError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("length {len}"),
    })?;
    // SAFETY: the map is read-only and covers only committed bytes, which we checked exist. pacha never
    // rewrites or truncates committed bytes of a store file (writers only append past the committed length
    // under the directory's LOCK; a writer's `open` and a failed append truncate only past the latest
    // committed length, which is at least any length a reader of that generation mapped; readers never
    // truncate; compaction writes files under the next generation's names and unlinks old ones, which stay
    // valid while mapped). Modification of the files by a foreign process is outside the store's contract,
    // as for any database file.
    let map = unsafe { MmapOptions::new().len(len).map(file) };
    map.map(Arc::new)
        .map_err(|e| EngineError::io("memory-mapping", path, e))
}

/// File specs in manifest order: per modality f32, i8, scale, quality; then IDs, offsets, tombstones.
pub(crate) fn file_specs(schema: &Schema, generation: u64) -> Vec<FileSpec> {
    let mut v = Vec::with_capacity(schema.modalities.len() * 4 + 3);
    for s in &schema.modalities {
        for k in FileKind::MODALITY_KINDS {
            v.push(FileSpec::modality(k, s.modality, s.dim, generation));
        }
    }
    for k in [FileKind::Ids, FileKind::Offsets, FileKind::Tombstones] {
        v.push(FileSpec::global(k, generation));
    }
    v
}

/// Checks the manifest's file list against the specs its schema and generation imply, and every fixed-row
/// file's committed length against the committed row and tombstone counts.
pub(crate) fn verify_layout(
    m: &Manifest,
    specs: &[FileSpec],
    mpath: &Path,
) -> Result<(), EngineError> {
    let bad = |reason: String| EngineError::Manifest {
        path: mpath.to_path_buf(),
        reason,
    };
    m.schema.validate().map_err(|e| bad(e.to_string()))?;
    if m.files.len() != specs.len() {
        return Err(bad(format!(
            "{} file entries, the schema implies {}",
            m.files.len(),
            specs.len()
        )));
    }
    if m.rows > u64::from(u32::MAX) || m.tombstones > m.rows {
        return Err(bad(format!(
            "{} rows with {} tombstones is impossible",
            m.rows, m.tombstones
        )));
    }
    for (spec, st) in specs.iter().zip(&m.files) {
        if st.name != spec.file_name() {
            return Err(bad(format!(
                "file entry {:?}, expected {:?}",
                st.name,
                spec.file_name()
            )));
        }
        let count = match spec.kind {
            FileKind::Ids => None,
            FileKind::Tombstones => Some(m.tombstones),
            _ => Some(m.rows),
        };
        let want = count.map(|c| HEADER_LEN as u64 + c * spec.row_bytes as u64);
        if st.len < HEADER_LEN as u64 || want.is_some_and(|w| w != st.len) {
            return Err(bad(format!(
                "{} commits {} bytes, inconsistent with {} rows / {} tombstones",
                st.name, st.len, m.rows, m.tombstones
            )));
        }
    }
    Ok(())
}

/// Index of the IDs, offsets and tombstone files in the manifest file list.
fn ids_ix(schema: &Schema) -> usize {
    schema.modalities.len() * 4
}

/// Words a tombstone bitset needs for `rows` rows.
fn words(rows: usize) -> usize {
    rows.div_ceil(64)
}

/// Makes `bits` long enough for `rows` rows, growing geometrically (copying only when it grows).
fn ensure_bits(bits: &mut Arc<Vec<u64>>, rows: usize) {
    if bits.len() < words(rows) {
        let new_len = words(rows).max(bits.len() * 2).max(16);
        let mut v = vec![0u64; new_len];
        v[..bits.len()].copy_from_slice(bits);
        *bits = Arc::new(v);
    }
}

/// The writer's state, behind the store's mutex.
struct Writer {
    manifest: Manifest,
    /// Open read-write handles, in manifest order.
    files: Vec<File>,
    deleted: Arc<Vec<u64>>,
    index: Arc<IdIndex>,
    /// Set when a commit reached the disk but the in-memory state could not follow.
    poisoned: Option<String>,
    /// The append-intent journal (`APPEND`), open read-write; `None` when the store is open read-only.
    journal: Option<File>,
    /// The exclusive lock on `LOCK` (held until drop); `None` when the store is open read-only.
    _lock: Option<File>,
}

/// The durable template store. `Send + Sync`: one writer at a time (internal mutex), any number of
/// concurrent readers through [`Store::snapshot`]. Opened read-only ([`Store::open_read_only`]), it serves
/// the snapshot of the commit it opened and refuses every write.
pub struct Store {
    dir: PathBuf,
    schema: Arc<Schema>,
    current: RwLock<Arc<Snapshot>>,
    writer: Mutex<Writer>,
    /// Opened with [`Store::open_read_only`]: no lock held, every write refused.
    read_only: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// Normalised, validated columns of one batch, one per schema modality.
struct Column {
    present: Vec<bool>,
    quality: Vec<f32>,
    /// `n * dim` normalised values (zeros where absent).
    data: Vec<f32>,
}

fn lock_dir(dir: &Path) -> Result<File, EngineError> {
    let path = dir.join(LOCK);
    let f =
        vfs::create(&path, false).map_err(|e| EngineError::io("opening lock file", &path, e))?;
    // File::try_lock is stable since 1.89; the toolchain here is 1.95 (the workspace MSRV field says 1.88).
    #[allow(clippy::incompatible_msrv)]
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(EngineError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(EngineError::io("locking", &path, e)),
    }
}

impl Store {
    /// Creates an empty store in `dir` (created mode 0700 if missing). Fails if `dir` already holds a
    /// store, is not a directory, or is a non-empty directory that holds no store.
    pub fn create(dir: &Path, schema: Schema) -> Result<Store, EngineError> {
        schema.validate()?;
        ensure_directory(dir)?;
        create_private_dir_all(dir).map_err(|e| EngineError::io("creating directory", dir, e))?;
        if manifest_path(dir).exists() {
            return Err(EngineError::AlreadyExists {
                dir: dir.to_path_buf(),
            });
        }
        // Only a missing or empty directory becomes a store (a `LOCK` left by an interrupted create is
        // allowed): a store's files never mix with someone else's.
        let rd = std::fs::read_dir(dir).map_err(|e| EngineError::io("listing", dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| EngineError::io("listing", dir, e))?;
            if entry.file_name() != LOCK {
                return Err(EngineError::DirNotEmpty {
                    dir: dir.to_path_buf(),
                    example: entry.file_name().to_string_lossy().into_owned(),
                });
            }
        }
        let lock = lock_dir(dir)?;
        if manifest_path(dir).exists() {
            return Err(EngineError::AlreadyExists {
                dir: dir.to_path_buf(),
            });
        }
        let specs = file_specs(&schema, 0);
        let mut files = Vec::with_capacity(specs.len());
        for spec in &specs {
            let path = dir.join(spec.file_name());
            let f = vfs::create(&path, true).map_err(|e| EngineError::io("creating", &path, e))?;
            vfs::write_at(&f, &path, &spec.header(), 0)
                .map_err(|e| EngineError::io("writing", &path, e))?;
            vfs::sync_all(&f, &path).map_err(|e| EngineError::io("syncing", &path, e))?;
            files.push(FileState {
                name: spec.file_name(),
                len: HEADER_LEN as u64,
                crc: 0,
            });
        }
        let m = Manifest {
            generation: 0,
            commit_seq: 0,
            rows: 0,
            tombstones: 0,
            schema,
            files,
        };
        // The files' entries durable before the MANIFEST that names them (see `write_compacted`).
        sync_dir(dir)?;
        m.write_atomic(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Store::load(dir, Manifest::read(dir)?, Some(lock))
    }

    /// Opens an existing store for writing (exclusive `LOCK`, see the module docs): validates the manifest,
    /// every file header, the subject table and the crc32 of every committed byte, truncates torn tails the
    /// append journal explains (refusing others with [`EngineError::ForeignData`]), removes files of other
    /// generations.
    pub fn open(dir: &Path) -> Result<Store, EngineError> {
        ensure_directory(dir)?;
        if !manifest_path(dir).exists() {
            return Err(EngineError::NotAStore {
                dir: dir.to_path_buf(),
            });
        }
        let lock = lock_dir(dir)?;
        Store::load(dir, Manifest::read(dir)?, Some(lock))
    }

    /// Opens an existing store read-only: no lock, no write of any kind (torn tails and stray files are
    /// left alone), every file mapped to the committed length of the manifest read; the same validation as
    /// [`Store::open`]. Runs beside writers and other readers (see the module docs); write APIs return
    /// [`EngineError::ReadOnly`]. Retries when a concurrent compaction unlinks the generation being opened.
    pub fn open_read_only(dir: &Path) -> Result<Store, EngineError> {
        ensure_directory(dir)?;
        Store::open_read_only_from(dir, Manifest::read(dir)?)
    }

    /// [`Store::open_read_only`] starting from manifest `m`, read earlier (possibly stale).
    fn open_read_only_from(dir: &Path, mut m: Manifest) -> Result<Store, EngineError> {
        /// Opens attempted before giving up with [`EngineError::StoreChanged`].
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let generation = m.generation;
            match Store::load(dir, m, None) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    // Only a generation switch (compaction) unlinks files a reader may be opening; with the
                    // same generation the error is the store's real state.
                    let now = Manifest::read(dir)?;
                    if now.generation == generation {
                        return Err(e);
                    }
                    tracing::info!(
                        from = generation,
                        to = now.generation,
                        error = %e,
                        "store compacted while being opened read-only; retrying"
                    );
                    m = now;
                }
            }
        }
        Err(EngineError::StoreChanged {
            dir: dir.to_path_buf(),
            attempts: ATTEMPTS,
        })
    }

    /// Opens the files of manifest `m`: for writing (repairing torn tails and stray files) when `lock` is
    /// the held writer lock, read-only and changing nothing when it is `None`.
    fn load(dir: &Path, m: Manifest, lock: Option<File>) -> Result<Store, EngineError> {
        let writable = lock.is_some();
        let specs = file_specs(&m.schema, m.generation);
        verify_layout(&m, &specs, &manifest_path(dir))?;
        let mut files = Vec::with_capacity(specs.len());
        let mut header = [0u8; HEADER_LEN];
        let intent = Intent::read(dir);
        for (j, (spec, st)) in specs.iter().zip(&m.files).enumerate() {
            let path = dir.join(&st.name);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(writable)
                .open(&path)
                .map_err(|e| EngineError::io("opening", &path, e))?;
            let len = f
                .metadata()
                .map_err(|e| EngineError::io("reading metadata of", &path, e))?
                .len();
            if len < st.len {
                return Err(EngineError::FileTooShort {
                    path,
                    expected: st.len,
                    actual: len,
                });
            }
            f.read_exact_at(&mut header, 0)
                .map_err(|e| EngineError::io("reading header of", &path, e))?;
            spec.verify_header(&header)
                .map_err(|reason| EngineError::BadHeader {
                    path: path.clone(),
                    reason,
                })?;
            // A reader leaves bytes past the committed length alone: they may be a writer's append in
            // progress, and only a writer repairs, and only what the append journal explains.
            if len > st.len && writable {
                let allowed = Intent::allowed_len(intent.as_ref(), &m, j);
                if len > allowed {
                    return Err(EngineError::ForeignData {
                        path,
                        committed: st.len,
                        actual: len,
                        allowed,
                    });
                }
                tracing::warn!(file = %path.display(), torn_bytes = len - st.len, "truncating torn write");
                vfs::set_len(&f, &path, st.len)
                    .map_err(|e| EngineError::io("truncating torn tail of", &path, e))?;
                vfs::sync_all(&f, &path).map_err(|e| EngineError::io("syncing", &path, e))?;
            }
            files.push(f);
        }
        let rows = m.rows as usize;
        let ix = ids_ix(&m.schema);
        let paths: Vec<PathBuf> = m.files.iter().map(|st| dir.join(&st.name)).collect();
        let ids = map_committed(&files[ix], m.files[ix].len, &paths[ix])?;
        let offs = map_committed(&files[ix + 1], m.files[ix + 1].len, &paths[ix + 1])?;
        for (k, map) in [(ix, &ids), (ix + 1, &offs)] {
            let actual = crc32fast::hash(&map[HEADER_LEN..]);
            if actual != m.files[k].crc {
                return Err(EngineError::Checksum {
                    path: paths[k].clone(),
                    expected: m.files[k].crc,
                    actual,
                });
            }
        }
        let index = Arc::new(build_index(&ids, &offs, rows, &paths[ix], &paths[ix + 1])?);
        let deleted = Arc::new(read_tombstones(
            &files[ix + 2],
            &m.files[ix + 2],
            rows,
            &paths[ix + 2],
        )?);
        let journal = if writable {
            remove_strays(dir, m.generation)?;
            Some(open_journal(dir)?)
        } else {
            None
        };
        let mods = map_modalities(&m, &files, &paths)?;
        verify_modalities(&m, &mods, &paths)?;
        let snap = Snapshot {
            generation: m.generation,
            commit_seq: m.commit_seq,
            rows,
            live: rows - m.tombstones as usize,
            schema: Arc::new(m.schema.clone()),
            slots: Snapshot::slots_for(&mods),
            mods,
            ids,
            offs,
            deleted: deleted.clone(),
            index: index.clone(),
        };
        let schema = snap.schema.clone();
        Ok(Store {
            dir: dir.to_path_buf(),
            schema,
            current: RwLock::new(Arc::new(snap)),
            read_only: !writable,
            writer: Mutex::new(Writer {
                manifest: m,
                files,
                deleted,
                index,
                poisoned: None,
                journal,
                _lock: lock,
            }),
        })
    }

    /// The schema fixed at creation.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current committed snapshot (an `Arc` clone).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, snap: Snapshot) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
    }

    /// True when the store was opened with [`Store::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// `Ok` on a writable store, [`EngineError::ReadOnly`] naming `op` on a read-only one.
    pub fn ensure_writable(&self, op: &'static str) -> Result<(), EngineError> {
        if self.is_read_only() {
            return Err(EngineError::ReadOnly {
                dir: self.dir.clone(),
                op,
            });
        }
        Ok(())
    }

    fn lock_writer(
        &self,
        op: &'static str,
    ) -> Result<std::sync::MutexGuard<'_, Writer>, EngineError> {
        self.ensure_writable(op)?;
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reason) = &w.poisoned {
            return Err(EngineError::Poisoned {
                dir: self.dir.clone(),
                reason: reason.clone(),
            });
        }
        Ok(w)
    }

    /// Inserts enrolments (converted to a [`RecordBatch`] with one block per schema modality).
    pub fn insert(&self, enrolments: &[Enrolment]) -> Result<InsertReport, EngineError> {
        self.insert_batch(&enrolments_to_batch(&self.schema, enrolments)?)
    }

    /// Runs every check [`Store::insert_batch`] would run on `batch` (IDs, qualities, norms, templates,
    /// conflicts with enrolled subjects) and writes nothing; `Ok` means inserting it now would not be
    /// refused for its content.
    pub fn check_batch(&self, batch: &RecordBatch) -> Result<(), EngineError> {
        let cols = validate_batch(&self.schema, batch)?;
        let snap = self.snapshot();
        for (i, id) in batch.ids.iter().enumerate() {
            if let Some(r) = snap.row_of(id) {
                compare_existing(&self.schema, &snap, r, i, &cols, id)?;
            }
        }
        Ok(())
    }

    /// Validates the whole batch, then appends its new records and commits durably: when this returns `Ok`
    /// the records survive power loss. Records already enrolled with identical templates are `unchanged`.
    /// On any validation error nothing is written.
    pub fn insert_batch(&self, batch: &RecordBatch) -> Result<InsertReport, EngineError> {
        let mut w = self.lock_writer("insert")?;
        let snap = self.snapshot();
        let cols = validate_batch(&self.schema, batch)?;
        let n = batch.len();
        let mut rows = vec![0u32; n];
        let mut new_recs = Vec::new();
        for (i, id) in batch.ids.iter().enumerate() {
            match snap.row_of(id) {
                Some(r) => {
                    compare_existing(&self.schema, &snap, r, i, &cols, id)?;
                    rows[i] = r as u32;
                }
                None => new_recs.push(i),
            }
        }
        let unchanged = n - new_recs.len();
        if new_recs.is_empty() {
            return Ok(InsertReport {
                inserted: 0,
                unchanged,
                rows,
            });
        }
        let base = w.manifest.rows;
        let total = base + new_recs.len() as u64;
        if total > u64::from(u32::MAX) {
            return Err(EngineError::Full {
                dir: self.dir.clone(),
                rows: total,
            });
        }
        for (k, &i) in new_recs.iter().enumerate() {
            rows[i] = (base + k as u64) as u32;
        }
        let bufs = encode_rows(&self.schema, &cols, batch, &new_recs, w.ids_end());
        let mut m = w.manifest.clone();
        self.append_and_sync(&mut w, &mut m, &bufs)?;
        m.rows = total;
        m.commit_seq += 1;
        self.commit_manifest(&mut w, m)?;
        w.index
            .add_all(new_recs.iter().map(|&i| (id_hash(&batch.ids[i]), rows[i])));
        let total = total as usize;
        ensure_bits(&mut w.deleted, total);
        let next = self
            .remap(&w, total)
            .inspect_err(|e| w.poisoned = Some(e.to_string()))?;
        self.publish(next);
        Ok(InsertReport {
            inserted: new_recs.len(),
            unchanged,
            rows,
        })
    }

    /// Tombstones the live row of `subject_id` durably; `false` if no live row has that ID.
    pub fn delete(&self, subject_id: &str) -> Result<bool, EngineError> {
        match self.delete_all(&[subject_id]) {
            Ok(_) => Ok(true),
            Err(EngineError::UnknownSubject(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Tombstones the live rows of every ID in `subject_ids` in one durable commit: all or nothing. An ID
    /// with no live row is [`EngineError::UnknownSubject`] naming it, and nothing is deleted. Repeated IDs
    /// count once. Returns the rows tombstoned, in input order of first occurrence.
    pub fn delete_all(&self, subject_ids: &[&str]) -> Result<Vec<usize>, EngineError> {
        let mut w = self.lock_writer("delete")?;
        let snap = self.snapshot();
        let mut rows = Vec::with_capacity(subject_ids.len());
        for id in subject_ids {
            let Some(row) = snap.row_of(id) else {
                return Err(EngineError::UnknownSubject(pacha_datasets::error::shorten(
                    id,
                )));
            };
            if !rows.contains(&row) {
                rows.push(row);
            }
        }
        if rows.is_empty() {
            return Ok(rows);
        }
        let ix = ids_ix(&self.schema) + 2;
        let mut m = w.manifest.clone();
        let mut bufs: Vec<Option<Vec<u8>>> = vec![None; m.files.len()];
        bufs[ix] = Some(
            rows.iter()
                .flat_map(|&r| (r as u32).to_le_bytes())
                .collect(),
        );
        self.append_and_sync(&mut w, &mut m, &bufs)?;
        m.tombstones += rows.len() as u64;
        m.commit_seq += 1;
        self.commit_manifest(&mut w, m)?;
        let bits = Arc::make_mut(&mut w.deleted);
        for &row in &rows {
            bits[row / 64] |= 1u64 << (row % 64);
        }
        let next = Snapshot {
            generation: snap.generation,
            commit_seq: w.manifest.commit_seq,
            rows: snap.rows,
            live: snap.live - rows.len(),
            schema: snap.schema.clone(),
            mods: snap.mods.clone(),
            slots: snap.slots,
            ids: snap.ids.clone(),
            offs: snap.offs.clone(),
            deleted: w.deleted.clone(),
            index: snap.index.clone(),
        };
        self.publish(next);
        Ok(rows)
    }

    /// Rewrites the store without tombstoned rows into files of a new generation, switches to them
    /// atomically through the manifest, then removes the old files. Row numbers change; snapshots taken
    /// before keep reading the old (unlinked) files until dropped.
    pub fn compact(&self) -> Result<CompactReport, EngineError> {
        let mut w = self.lock_writer("compact")?;
        let snap = self.snapshot();
        let old = w.manifest.clone();
        let gen_new = old.generation + 1;
        let specs = file_specs(&self.schema, gen_new);
        let live_rows: Vec<usize> = (0..snap.rows).filter(|&r| !snap.is_deleted(r)).collect();
        let written = write_compacted(&self.dir, &specs, &snap, &live_rows);
        let (files, states) = match written {
            Ok(x) => x,
            Err(e) => {
                for s in &specs {
                    let _ = vfs::remove(&self.dir.join(s.file_name()));
                }
                return Err(e);
            }
        };
        let m = Manifest {
            generation: gen_new,
            commit_seq: old.commit_seq + 1,
            rows: live_rows.len() as u64,
            tombstones: 0,
            schema: old.schema.clone(),
            files: states,
        };
        if let Err(e) = m.write_atomic(&self.dir) {
            w.poisoned = Some(e.to_string());
            return Err(e);
        }
        let switched = (|| -> Result<(), EngineError> {
            let ix = ids_ix(&self.schema);
            let paths: Vec<PathBuf> = m.files.iter().map(|st| self.dir.join(&st.name)).collect();
            let ids = map_committed(&files[ix], m.files[ix].len, &paths[ix])?;
            let offs = map_committed(&files[ix + 1], m.files[ix + 1].len, &paths[ix + 1])?;
            let rows = live_rows.len();
            let index = Arc::new(build_index(&ids, &offs, rows, &paths[ix], &paths[ix + 1])?);
            let mut deleted = Arc::new(Vec::new());
            ensure_bits(&mut deleted, rows);
            let mods = map_modalities(&m, &files, &paths)?;
            let next = Snapshot {
                generation: m.generation,
                commit_seq: m.commit_seq,
                rows,
                live: rows,
                schema: snap.schema.clone(),
                slots: Snapshot::slots_for(&mods),
                mods,
                ids,
                offs,
                deleted: deleted.clone(),
                index: index.clone(),
            };
            w.files = files;
            w.deleted = deleted;
            w.index = index;
            w.manifest = m.clone();
            self.publish(next);
            Ok(())
        })();
        if let Err(e) = switched {
            w.poisoned = Some(e.to_string());
            return Err(e);
        }
        // The new generation is committed; the old files are garbage (open would remove them too).
        for st in &old.files {
            let p = self.dir.join(&st.name);
            if let Err(e) = vfs::remove(&p) {
                tracing::warn!(file = %p.display(), error = %e, "could not remove old generation file");
            }
        }
        sync_dir(&self.dir)?;
        Ok(CompactReport {
            generation_before: old.generation,
            generation: gen_new,
            rows_before: snap.rows,
            rows_after: live_rows.len(),
            removed: snap.rows - live_rows.len(),
            bytes_before: old.files.iter().map(|f| f.len).sum(),
            bytes_after: m.files.iter().map(|f| f.len).sum(),
        })
    }

    /// Appends `bufs[j]` to file `j` at its committed length, updating `m`'s lengths and crcs, then fsyncs
    /// every touched file. On failure the files are cut back to their committed lengths (best effort).
    fn append_and_sync(
        &self,
        w: &mut Writer,
        m: &mut Manifest,
        bufs: &[Option<Vec<u8>>],
    ) -> Result<(), EngineError> {
        let res = (|| {
            // Record the target lengths durably first: a writer's open cuts bytes past a committed length
            // only up to them, and refuses anything beyond as foreign.
            let intent = Intent {
                generation: m.generation,
                commit_seq: m.commit_seq,
                targets: m
                    .files
                    .iter()
                    .zip(bufs)
                    .map(|(st, b)| st.len + b.as_ref().map_or(0, |b| b.len() as u64))
                    .collect(),
            };
            let jpath = self.dir.join(APPEND_JOURNAL);
            let journal = w.journal.as_ref().ok_or_else(|| EngineError::ReadOnly {
                dir: self.dir.clone(),
                op: "append",
            })?;
            intent.write(journal, &jpath)?;
            for (j, buf) in bufs.iter().enumerate() {
                let Some(buf) = buf else { continue };
                let st = &mut m.files[j];
                let path = self.dir.join(&st.name);
                vfs::write_at(&w.files[j], &path, buf, st.len)
                    .map_err(|e| EngineError::io("appending to", &path, e))?;
                st.crc = crc_extend(st.crc, st.len - HEADER_LEN as u64, buf);
                st.len += buf.len() as u64;
            }
            for (j, buf) in bufs.iter().enumerate() {
                if buf.is_some() {
                    let path = self.dir.join(&m.files[j].name);
                    vfs::sync_data(&w.files[j], &path)
                        .map_err(|e| EngineError::io("syncing", &path, e))?;
                }
            }
            Ok(())
        })();
        if res.is_err() {
            for (f, st) in w.files.iter().zip(&w.manifest.files) {
                let _ = vfs::set_len(f, &self.dir.join(&st.name), st.len);
            }
        }
        res
    }

    /// Durably replaces the manifest; on failure the store is poisoned (the rename may or may not have
    /// happened, only a reopen can tell).
    fn commit_manifest(&self, w: &mut Writer, m: Manifest) -> Result<(), EngineError> {
        if let Err(e) = m.write_atomic(&self.dir) {
            w.poisoned = Some(e.to_string());
            return Err(e);
        }
        w.manifest = m;
        Ok(())
    }

    /// A snapshot of the writer's committed state with every file remapped.
    fn remap(&self, w: &Writer, rows: usize) -> Result<Snapshot, EngineError> {
        let m = &w.manifest;
        let paths: Vec<PathBuf> = m.files.iter().map(|st| self.dir.join(&st.name)).collect();
        let ix = ids_ix(&self.schema);
        let mods = map_modalities(m, &w.files, &paths)?;
        Ok(Snapshot {
            generation: m.generation,
            commit_seq: m.commit_seq,
            rows,
            live: rows - m.tombstones as usize,
            schema: self.schema.clone(),
            slots: Snapshot::slots_for(&mods),
            mods,
            ids: map_committed(&w.files[ix], m.files[ix].len, &paths[ix])?,
            offs: map_committed(&w.files[ix + 1], m.files[ix + 1].len, &paths[ix + 1])?,
            deleted: w.deleted.clone(),
            index: w.index.clone(),
        })
    }
}

impl Writer {
    /// End offset of the last committed subject ID in the IDs data.
    fn ids_end(&self) -> u64 {
        let ix = ids_ix(&self.manifest.schema);
        self.manifest.files[ix].len - HEADER_LEN as u64
    }
}

/// Test support: reproduces on disk what a writer interrupted mid-append leaves behind.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// Appends `junk` to the store file `name` of the store in `dir` the way an interrupted append would:
    /// the append journal first (target: committed length + `junk.len()` for that file), then the bytes,
    /// with no manifest commit. A writer's open then cuts the tail; without the journal it would refuse it.
    pub fn torn_append(dir: &Path, name: &str, junk: &[u8]) -> Result<(), EngineError> {
        use std::io::Write;
        let m = Manifest::read(dir)?;
        let intent = Intent {
            generation: m.generation,
            commit_seq: m.commit_seq,
            targets: m
                .files
                .iter()
                .map(|f| f.len + if f.name == name { junk.len() as u64 } else { 0 })
                .collect(),
        };
        let jpath = dir.join(APPEND_JOURNAL);
        let j = private_options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&jpath)
            .map_err(|e| EngineError::io("opening", &jpath, e))?;
        intent.write(&j, &jpath)?;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| EngineError::io("opening", &path, e))?;
        f.write_all(junk)
            .map_err(|e| EngineError::io("appending to", &path, e))
    }
}

/// Refuses a path that exists but is not a directory (a `--store` naming a file).
fn ensure_directory(dir: &Path) -> Result<(), EngineError> {
    match std::fs::metadata(dir) {
        Ok(md) if !md.is_dir() => Err(EngineError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// Opens (creating it 0600 if missing, durably) the append-intent journal of a writer.
fn open_journal(dir: &Path) -> Result<File, EngineError> {
    let path = dir.join(APPEND_JOURNAL);
    let existed = path.exists();
    let f = vfs::create(&path, false).map_err(|e| EngineError::io("opening", &path, e))?;
    if !existed {
        sync_dir(dir)?;
    }
    Ok(f)
}

/// Size of the blocks the template files are checksummed in, in parallel, at open.
const VERIFY_BLOCK: usize = 16 << 20;

/// Verifies the running crc32 of every modality file's committed data against the manifest: blocks of
/// [`VERIFY_BLOCK`] bytes hashed in parallel, combined in order. A mismatch is [`EngineError::Checksum`]
/// naming the file.
fn verify_modalities(m: &Manifest, mods: &[ModView], paths: &[PathBuf]) -> Result<(), EngineError> {
    use rayon::prelude::*;
    let jobs: Vec<(&Mmap, usize)> = mods
        .iter()
        .enumerate()
        .flat_map(|(mi, mv)| {
            [&mv.f32, &mv.i8, &mv.scale, &mv.qual]
                .into_iter()
                .enumerate()
                .map(move |(k, map)| (&**map, mi * 4 + k))
        })
        .collect();
    let t = std::time::Instant::now();
    let bytes: usize = jobs.iter().map(|(map, _)| map.len() - HEADER_LEN).sum();
    let res = jobs.par_iter().try_for_each(|&(map, j)| {
        let data = &map[HEADER_LEN..];
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        let hashers: Vec<crc32fast::Hasher> = data
            .par_chunks(VERIFY_BLOCK)
            .map(|c| {
                let mut h = crc32fast::Hasher::new();
                h.update(c);
                h
            })
            .collect();
        #[cfg(unix)]
        let _ = map.advise(if j % 4 == 0 {
            memmap2::Advice::Random
        } else {
            memmap2::Advice::Normal
        });
        let mut all = crc32fast::Hasher::new();
        for h in &hashers {
            all.combine(h);
        }
        let actual = all.finalize();
        if actual != m.files[j].crc {
            return Err(EngineError::Checksum {
                path: paths[j].clone(),
                expected: m.files[j].crc,
                actual,
            });
        }
        Ok(())
    });
    let secs = t.elapsed().as_secs_f64();
    tracing::info!(
        bytes,
        secs,
        gb_per_s = bytes as f64 / secs.max(1e-9) / 1e9,
        "verified template data"
    );
    res
}

/// Maps every modality's four files.
fn map_modalities(
    m: &Manifest,
    files: &[File],
    paths: &[PathBuf],
) -> Result<Vec<ModView>, EngineError> {
    let mut mods = Vec::with_capacity(m.schema.modalities.len());
    for (mi, spec) in m.schema.modalities.iter().enumerate() {
        let map = |k: usize| {
            map_committed(
                &files[mi * 4 + k],
                m.files[mi * 4 + k].len,
                &paths[mi * 4 + k],
            )
        };
        mods.push(ModView {
            spec: *spec,
            stride_f32: pacha_index::padded_stride(spec.dim, 4),
            stride_i8: pacha_index::padded_stride(spec.dim, 1),
            f32: {
                // Outside the streaming passes (which prefetch, see `Snapshot::prefetch_f32`), f32 rows
                // are read at random (rescoring, calibration samples): no read-around of 128 KB per fault.
                let f = map(0)?;
                #[cfg(unix)]
                let _ = f.advise(memmap2::Advice::Random);
                f
            },
            i8: map(1)?,
            scale: map(2)?,
            qual: map(3)?,
        });
    }
    Ok(mods)
}

/// Validates the subject table (offsets, UTF-8, ID rules) and builds the ID index.
fn build_index(
    ids: &Mmap,
    offs: &Mmap,
    rows: usize,
    ids_path: &Path,
    offs_path: &Path,
) -> Result<IdIndex, EngineError> {
    let data = &ids[HEADER_LEN..];
    let offs: &[u64] =
        bytemuck::try_cast_slice(&offs[HEADER_LEN..]).map_err(|e| EngineError::Corrupt {
            path: offs_path.to_path_buf(),
            reason: format!("offsets are not a u64 array: {e}"),
        })?;
    if offs.len() != rows {
        return Err(EngineError::Corrupt {
            path: offs_path.to_path_buf(),
            reason: format!("{} offsets for {rows} rows", offs.len()),
        });
    }
    let index = IdIndex::with_capacity(rows);
    let mut start = 0usize;
    let mut batch = Vec::with_capacity(4096.min(rows));
    for (r, &end) in offs.iter().enumerate() {
        let end = end as usize;
        if end < start || end > data.len() || end - start > MAX_SUBJECT_ID_BYTES {
            return Err(EngineError::Corrupt {
                path: offs_path.to_path_buf(),
                reason: format!("row {r}: ID offset {end} out of order or out of range"),
            });
        }
        let id = std::str::from_utf8(&data[start..end]).map_err(|e| EngineError::Corrupt {
            path: ids_path.to_path_buf(),
            reason: format!("row {r}: subject ID is not UTF-8: {e}"),
        })?;
        validate_subject_id(id).map_err(|reason| EngineError::Corrupt {
            path: ids_path.to_path_buf(),
            reason: format!("row {r}: subject ID {id:?} {reason}"),
        })?;
        batch.push((id_hash(id), r as u32));
        if batch.len() == batch.capacity() {
            index.add_all(batch.drain(..));
        }
        start = end;
    }
    index.add_all(batch);
    if start != data.len() {
        return Err(EngineError::Corrupt {
            path: ids_path.to_path_buf(),
            reason: format!("{} bytes of IDs, offsets end at {start}", data.len()),
        });
    }
    Ok(index)
}

/// Reads and verifies the tombstone log into a bitset.
fn read_tombstones(
    f: &File,
    st: &FileState,
    rows: usize,
    path: &Path,
) -> Result<Vec<u64>, EngineError> {
    let mut buf = vec![0u8; (st.len as usize).saturating_sub(HEADER_LEN)];
    f.read_exact_at(&mut buf, HEADER_LEN as u64)
        .map_err(|e| EngineError::io("reading", path, e))?;
    let actual = crc32fast::hash(&buf);
    if actual != st.crc {
        return Err(EngineError::Checksum {
            path: path.to_path_buf(),
            expected: st.crc,
            actual,
        });
    }
    let mut bits = Arc::new(Vec::new());
    ensure_bits(&mut bits, rows);
    let mut bits = Arc::unwrap_or_clone(bits);
    for c in buf.chunks_exact(4) {
        let r = format::le_u32(c) as usize;
        if r >= rows || (bits[r / 64] >> (r % 64)) & 1 == 1 {
            return Err(EngineError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("tombstone for row {r} is out of range or repeated ({rows} rows)"),
            });
        }
        bits[r / 64] |= 1u64 << (r % 64);
    }
    Ok(bits)
}

/// Removes `MANIFEST.tmp` and store files of generations other than `generation` (left by a crash during
/// compaction, before or after the switch).
fn remove_strays(dir: &Path, generation: u64) -> Result<(), EngineError> {
    let rd = std::fs::read_dir(dir).map_err(|e| EngineError::io("listing", dir, e))?;
    let mut removed = false;
    for entry in rd {
        let entry = entry.map_err(|e| EngineError::io("listing", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stray = name == MANIFEST_TMP || parse_generation(name).is_some_and(|g| g != generation);
        if stray {
            let p = entry.path();
            vfs::remove(&p).map_err(|e| EngineError::io("removing stray file", &p, e))?;
            tracing::info!(file = %p.display(), "removed stray file");
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Validates a batch completely and returns its normalised columns (one per schema modality).
fn validate_batch(schema: &Schema, batch: &RecordBatch) -> Result<Vec<Column>, EngineError> {
    let n = batch.len();
    let mut seen_blocks = HashSet::new();
    for b in &batch.blocks {
        if !seen_blocks.insert(b.modality) {
            return Err(EngineError::MalformedBatch(format!(
                "two blocks for {}",
                b.modality
            )));
        }
        if b.present.len() != n
            || b.quality.len() != n
            || Some(b.data.len()) != n.checked_mul(b.dim)
        {
            return Err(EngineError::MalformedBatch(format!(
                "{} block: {} values, {} presence flags, {} qualities for {n} records of dim {}",
                b.modality,
                b.data.len(),
                b.present.len(),
                b.quality.len(),
                b.dim
            )));
        }
        let first_present = b.present.iter().position(|&p| p);
        let Some(i) = first_present else { continue };
        let subject_id = batch.ids[i].clone();
        match schema.dim(b.modality) {
            None => {
                return Err(EngineError::UnknownModality {
                    subject_id,
                    modality: b.modality,
                });
            }
            Some(d) if d != b.dim => {
                return Err(EngineError::DimensionMismatch {
                    subject_id,
                    modality: b.modality,
                    expected: d,
                    actual: b.dim,
                });
            }
            Some(_) => {}
        }
    }
    let blocks: Vec<Option<&ModalityBlock>> = schema
        .modalities
        .iter()
        .map(|s| batch.block(s.modality).filter(|b| b.dim == s.dim))
        .collect();
    let mut cols: Vec<Column> = schema
        .modalities
        .iter()
        .map(|s| Column {
            present: vec![false; n],
            quality: vec![0.0; n],
            data: vec![0.0; n * s.dim],
        })
        .collect();
    let mut ids = HashSet::with_capacity(n);
    for (i, id) in batch.ids.iter().enumerate() {
        validate_subject_id(id).map_err(|reason| EngineError::InvalidSubjectId {
            subject_id: pacha_datasets::error::shorten(id),
            reason,
        })?;
        if !ids.insert(id.as_str()) {
            return Err(EngineError::DuplicateInBatch {
                subject_id: id.clone(),
            });
        }
        let mut any = false;
        for ((spec, block), col) in schema.modalities.iter().zip(&blocks).zip(&mut cols) {
            let Some(b) = block else { continue };
            if !b.present[i] {
                continue;
            }
            let modality = spec.modality;
            let q = b.quality[i];
            if !(0.0..=1.0).contains(&q) {
                return Err(EngineError::BadQuality {
                    subject_id: id.clone(),
                    modality,
                    quality: q,
                });
            }
            let v = normalize(b.row(i)).map_err(|p| match p {
                VecProblem::NonFinite => EngineError::NonFinite {
                    subject_id: id.clone(),
                    modality,
                },
                VecProblem::ZeroNorm => EngineError::ZeroNorm {
                    subject_id: id.clone(),
                    modality,
                },
            })?;
            col.present[i] = true;
            col.quality[i] = q;
            col.data[i * spec.dim..(i + 1) * spec.dim].copy_from_slice(&v);
            any = true;
        }
        if !any {
            return Err(EngineError::NoTemplates {
                subject_id: id.clone(),
            });
        }
    }
    Ok(cols)
}

/// Runs every content check of an insert of `batch` into a new, empty store of `schema`; writes nothing.
pub fn check_new_batch(schema: &Schema, batch: &RecordBatch) -> Result<(), EngineError> {
    validate_batch(schema, batch).map(|_| ())
}

/// The subject ID an insert error is about, if it names one.
pub fn subject_of(e: &EngineError) -> Option<&str> {
    match e {
        EngineError::InvalidSubjectId { subject_id, .. }
        | EngineError::DuplicateInBatch { subject_id }
        | EngineError::UnknownModality { subject_id, .. }
        | EngineError::DuplicateTemplate { subject_id, .. }
        | EngineError::DimensionMismatch { subject_id, .. }
        | EngineError::NonFinite { subject_id, .. }
        | EngineError::ZeroNorm { subject_id, .. }
        | EngineError::BadQuality { subject_id, .. }
        | EngineError::NoTemplates { subject_id }
        | EngineError::Conflict { subject_id, .. } => Some(subject_id),
        _ => None,
    }
}

/// Checks that record `i` of the batch equals stored row `r` bit-exactly (presence, quality, vector).
fn compare_existing(
    schema: &Schema,
    snap: &Snapshot,
    r: usize,
    i: usize,
    cols: &[Column],
    id: &str,
) -> Result<(), EngineError> {
    for (spec, col) in schema.modalities.iter().zip(cols) {
        let m = spec.modality;
        let same = match (col.present[i], snap.template(m, r)) {
            (false, None) => true,
            (true, Some(stored)) => {
                let new = &col.data[i * spec.dim..(i + 1) * spec.dim];
                snap.quality(m, r).to_bits() == col.quality[i].to_bits()
                    && stored
                        .iter()
                        .zip(new)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
            }
            _ => false,
        };
        if !same {
            return Err(EngineError::Conflict {
                subject_id: id.to_string(),
                modality: m,
            });
        }
    }
    Ok(())
}

/// Builds the bytes to append to every file for the new records `new_recs` (manifest order).
fn encode_rows(
    schema: &Schema,
    cols: &[Column],
    batch: &RecordBatch,
    new_recs: &[usize],
    ids_end: u64,
) -> Vec<Option<Vec<u8>>> {
    let k = new_recs.len();
    let mut out = Vec::with_capacity(schema.modalities.len() * 4 + 3);
    for (spec, col) in schema.modalities.iter().zip(cols) {
        let d = spec.dim;
        let sf = pacha_index::padded_stride(d, 4);
        let si = pacha_index::padded_stride(d, 1);
        let mut f = vec![0f32; k * sf];
        let mut q = vec![0i8; k * si];
        let mut scale = vec![0f32; k];
        let mut qual = vec![ABSENT_QUALITY; k];
        for (j, &i) in new_recs.iter().enumerate() {
            if !col.present[i] {
                continue;
            }
            let v = &col.data[i * d..(i + 1) * d];
            f[j * sf..j * sf + d].copy_from_slice(v);
            scale[j] = pacha_index::quant::quantize_i8(v, &mut q[j * si..j * si + d]);
            qual[j] = col.quality[i];
        }
        out.push(Some(bytemuck::cast_slice(&f).to_vec()));
        out.push(Some(bytemuck::cast_slice(&q).to_vec()));
        out.push(Some(bytemuck::cast_slice(&scale).to_vec()));
        out.push(Some(bytemuck::cast_slice(&qual).to_vec()));
    }
    let mut ids = Vec::new();
    let mut offs = Vec::with_capacity(k * 8);
    for &i in new_recs {
        ids.extend_from_slice(batch.ids[i].as_bytes());
        offs.extend_from_slice(&(ids_end + ids.len() as u64).to_le_bytes());
    }
    out.push(Some(ids));
    out.push(Some(offs));
    out.push(None);
    out
}

/// Writes the files of a compacted generation holding `live_rows` of `snap`; returns the open handles and
/// their committed states (all fsynced).
fn write_compacted(
    dir: &Path,
    specs: &[FileSpec],
    snap: &Snapshot,
    live_rows: &[usize],
) -> Result<(Vec<File>, Vec<FileState>), EngineError> {
    const CHUNK: usize = 4 << 20;
    let mut files = Vec::with_capacity(specs.len());
    let mut states = Vec::with_capacity(specs.len());
    let nmods = snap.mods.len();
    for (j, spec) in specs.iter().enumerate() {
        let path = dir.join(spec.file_name());
        let f = vfs::create(&path, true).map_err(|e| EngineError::io("creating", &path, e))?;
        vfs::write_at(&f, &path, &spec.header(), 0)
            .map_err(|e| EngineError::io("writing", &path, e))?;
        let mut st = FileState {
            name: spec.file_name(),
            len: HEADER_LEN as u64,
            crc: 0,
        };
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK.min(64 << 10));
        let flush = |buf: &mut Vec<u8>, st: &mut FileState| -> Result<(), EngineError> {
            vfs::write_at(&f, &path, buf, st.len)
                .map_err(|e| EngineError::io("writing", &path, e))?;
            st.crc = crc_extend(st.crc, st.len - HEADER_LEN as u64, buf);
            st.len += buf.len() as u64;
            buf.clear();
            Ok(())
        };
        if j < nmods * 4 {
            let mv = &snap.mods[j / 4];
            let (map, row_bytes) = match j % 4 {
                0 => (&mv.f32, mv.stride_f32 * 4),
                1 => (&mv.i8, mv.stride_i8),
                2 => (&mv.scale, 4),
                _ => (&mv.qual, 4),
            };
            let data = &map[HEADER_LEN..];
            for &r in live_rows {
                buf.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
                if buf.len() >= CHUNK {
                    flush(&mut buf, &mut st)?;
                }
            }
        } else if j == nmods * 4 {
            for &r in live_rows {
                buf.extend_from_slice(snap.subject_id(r).as_bytes());
                if buf.len() >= CHUNK {
                    flush(&mut buf, &mut st)?;
                }
            }
        } else if j == nmods * 4 + 1 {
            let mut end = 0u64;
            for &r in live_rows {
                end += snap.subject_id(r).len() as u64;
                buf.extend_from_slice(&end.to_le_bytes());
                if buf.len() >= CHUNK {
                    flush(&mut buf, &mut st)?;
                }
            }
        }
        if !buf.is_empty() {
            flush(&mut buf, &mut st)?;
        }
        vfs::sync_all(&f, &path).map_err(|e| EngineError::io("syncing", &path, e))?;
        files.push(f);
        states.push(st);
    }
    // The new files' directory entries must be durable before a MANIFEST that names them can be: the
    // MANIFEST's rename is made durable by a later directory fsync, but a file system that reorders metadata
    // may persist that rename and lose the creations (found by the power-loss simulation).
    sync_dir(dir)?;
    Ok((files, states))
}
