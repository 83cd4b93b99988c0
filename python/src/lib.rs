//! `pacha._pacha`: the compiled core of the `pacha` Python package. The user-facing API (`pacha.Store`,
//! result objects, pandas/pyarrow helpers) is the Python layer in `pacha/__init__.py`; this module binds the
//! engine's calls, converts numpy arrays in and out, releases the GIL for long calls and maps errors.

mod errors;
mod input;
mod watch;

use crate::errors::{Fail, PachaError, py_err};
use crate::input::{Block, Held, HeldColumns};
use numpy::PyArray1;
use numpy::PyReadonlyArray1;
use pacha_engine::audit::AuditOptions;
use pacha_engine::candidates::CandidateMode;
use pacha_engine::dedup::{DedupOptions, DedupResult, DedupScope, RunParameters};
use pacha_engine::engine::{CalibrateOptions, IdentifyOptions};
use pacha_engine::identify::BatchScan;
use pacha_engine::store::{ModalitySpec, Schema, Template};
use pacha_engine::{Engine as CoreEngine, EngineError, Modality, ModalityBlock, RecordBatch};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Smallest template norm the engine accepts (as the CLI's ingest).
const MIN_NORM: f64 = pacha_datasets::ingest::MIN_TEMPLATE_NORM;

fn json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| PachaError::new_err(format!("cannot serialise: {e}")))
}

/// An open store (a registry engine): the handle `pacha.Store` wraps.
#[pyclass(frozen, module = "pacha._pacha")]
struct Engine {
    inner: Mutex<Option<Arc<CoreEngine>>>,
    path: PathBuf,
    read_only: bool,
}

impl Engine {
    fn get(&self) -> PyResult<Arc<CoreEngine>> {
        let g = self
            .inner
            .lock()
            .map_err(|_| PachaError::new_err("store handle poisoned"))?;
        g.clone().ok_or_else(|| {
            PyValueError::new_err(format!("store {} is closed", self.path.display()))
        })
    }
}

/// Builds records `start..end` of the caller's arrays as a batch, applying the CLI's `.npy` rules: a row
/// declared absent becomes zeros; without a declaration an all-zero row is absent; a present row must be
/// finite with norm ≥ 1e-6; quality defaults to 1.0; a record needs at least one template.
fn build_batch(
    ids: &[String],
    blocks: &[Block<'_>],
    start: usize,
    end: usize,
) -> Result<RecordBatch, Fail> {
    let n = end - start;
    let mut out = Vec::with_capacity(blocks.len());
    for b in blocks {
        let dim = b.matrix.dim();
        let mut data = Vec::with_capacity(n * dim);
        let mut present = Vec::with_capacity(n);
        let mut quality = Vec::with_capacity(n);
        for i in start..end {
            let declared = b.present.as_ref().map(|p| p[i]);
            let at = data.len();
            if declared == Some(false) {
                data.resize(at + dim, 0.0);
                present.push(false);
                quality.push(0.0);
                continue;
            }
            b.matrix.push_row(i, &mut data);
            let row = &data[at..];
            let bad = |problem: &str| {
                Fail::Value(format!(
                    "row {i} (subject {:?}): {} template {problem}",
                    ids[i],
                    b.modality.key()
                ))
            };
            if row.iter().any(|x| !x.is_finite()) {
                return Err(bad("contains NaN or infinity"));
            }
            if row.iter().all(|&x| x == 0.0) {
                if declared == Some(true) {
                    return Err(bad("is all zeros (zero norm) but marked present"));
                }
                present.push(false);
                quality.push(0.0);
                continue;
            }
            let n2: f64 = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            if n2 < MIN_NORM * MIN_NORM {
                return Err(bad("has a near-zero norm (below 1e-6): numerically empty"));
            }
            present.push(true);
            quality.push(b.quality.as_ref().map_or(1.0, |q| q[i]));
        }
        out.push(ModalityBlock {
            modality: b.modality,
            dim,
            data,
            present,
            quality,
        });
    }
    for i in 0..n {
        if !out.iter().any(|b| b.present[i]) {
            return Err(Fail::Value(format!(
                "row {} (subject {:?}): no template (every modality absent or all zeros)",
                start + i,
                ids[start + i]
            )));
        }
    }
    Ok(RecordBatch {
        ids: ids[start..end].to_vec(),
        blocks: out,
    })
}

/// Names the row of the record an engine check refused (records `start..` of the caller's arrays).
fn locate(ids: &[String], start: usize, e: EngineError) -> Fail {
    let pos = pacha_engine::store::subject_of(&e)
        .and_then(|id| ids[start..].iter().position(|x| x == id));
    match pos {
        Some(p) => Fail::Row {
            row: start + p,
            subject: ids[start + p].clone(),
            error: Box::new(e),
        },
        None => Fail::Engine(Box::new(e)),
    }
}

/// The IDs are unique: a repeated one is named with both rows.
fn check_unique(ids: &[String]) -> Result<(), Fail> {
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        if let Some(first) = seen.insert(id.as_str(), i) {
            return Err(Fail::Value(format!(
                "subject {id:?} appears more than once: rows {first} and {i}"
            )));
        }
    }
    Ok(())
}

/// Borrowed template blocks as given from Python: (modality key, matrix, present or None, quality or None).
type BlockArgs<'py> = Vec<(
    String,
    Bound<'py, PyAny>,
    Option<PyReadonlyArray1<'py, bool>>,
    Option<PyReadonlyArray1<'py, f32>>,
)>;

fn hold_blocks<'py>(
    blocks: BlockArgs<'py>,
) -> PyResult<Vec<(Modality, Held<'py>, HeldColumns<'py>)>> {
    let mut out: Vec<(Modality, Held<'py>, HeldColumns<'py>)> = Vec::new();
    for (key, arr, present, quality) in blocks {
        let m = input::modality(&key)?;
        if out.iter().any(|(x, _, _)| *x == m) {
            return Err(PyValueError::new_err(format!("{m} given twice")));
        }
        let held = Held::extract(&arr, &m.key())?;
        out.push((m, held, HeldColumns { present, quality }));
    }
    Ok(out)
}

fn views<'a>(held: &'a [(Modality, Held<'_>, HeldColumns<'_>)]) -> Vec<Block<'a>> {
    held.iter()
        .map(|(m, h, c)| Block {
            modality: *m,
            matrix: h.view(),
            present: c.present.as_ref().map(|p| p.as_array()),
            quality: c.quality.as_ref().map(|q| q.as_array()),
        })
        .collect()
}

fn mode_of(mode: &str) -> PyResult<CandidateMode> {
    match mode {
        "auto" => Ok(CandidateMode::Auto),
        "exact" => Ok(CandidateMode::Exact),
        "index" => Ok(CandidateMode::Index),
        other => Err(PyValueError::new_err(format!(
            "mode {other:?}: expected \"auto\", \"exact\" or \"index\""
        ))),
    }
}

#[pymethods]
impl Engine {
    /// Creates a new store in `path` (missing or empty directory) with `modalities`: (key, dim) pairs.
    #[staticmethod]
    fn create(py: Python<'_>, path: PathBuf, modalities: Vec<(String, usize)>) -> PyResult<Engine> {
        let specs = modalities
            .iter()
            .map(|(k, d)| {
                Ok(ModalitySpec {
                    modality: input::modality(k)?,
                    dim: *d,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let schema = Schema { modalities: specs };
        let p = path.clone();
        let e = py
            .detach(|| CoreEngine::create(&p, schema))
            .map_err(py_err)?;
        Ok(Engine {
            inner: Mutex::new(Some(Arc::new(e))),
            path,
            read_only: false,
        })
    }

    /// Opens an existing store, as its writer or read-only (no lock, nothing written).
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf, read_only: bool) -> PyResult<Engine> {
        let p = path.clone();
        let e = py
            .detach(|| {
                if read_only {
                    CoreEngine::open_read_only(&p)
                } else {
                    CoreEngine::open(&p)
                }
            })
            .map_err(py_err)?;
        Ok(Engine {
            inner: Mutex::new(Some(Arc::new(e))),
            path,
            read_only,
        })
    }

    /// Releases the store (and the writer lock): later calls raise ValueError.
    fn close(&self) -> PyResult<()> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| PachaError::new_err("store handle poisoned"))?;
        *g = None;
        Ok(())
    }

    /// Whether the store is closed.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().map(|g| g.is_none()).unwrap_or(true)
    }

    /// The store directory.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Whether the store was opened read-only.
    #[getter]
    fn read_only(&self) -> bool {
        self.read_only
    }

    /// `pacha info` as JSON: schema, rows, live count, index and calibration state, SIMD level.
    fn info(&self, py: Python<'_>) -> PyResult<String> {
        let e = self.get()?;
        let info = py.detach(|| e.info());
        json(&info)
    }

    /// Live enrolments.
    fn live(&self) -> PyResult<usize> {
        Ok(self.get()?.count())
    }

    /// Committed rows (deleted ones included).
    fn rows(&self) -> PyResult<usize> {
        Ok(self.get()?.snapshot().rows())
    }

    /// Subject ID of every committed row (deleted rows included), in row order.
    fn subject_ids(&self) -> PyResult<Vec<String>> {
        let snap = self.get()?.snapshot();
        Ok((0..snap.rows())
            .map(|r| snap.subject_id(r).to_string())
            .collect())
    }

    /// Whether each committed row is deleted.
    fn deleted<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<bool>>> {
        let snap = self.get()?.snapshot();
        let v: Vec<bool> = (0..snap.rows()).map(|r| snap.is_deleted(r)).collect();
        Ok(PyArray1::from_vec(py, v))
    }

    /// The stored (L2-normalised) f32 templates of modality `key` for every committed row, zeros where
    /// absent, and the per-row quality (−1 where absent).
    #[allow(clippy::type_complexity)]
    fn templates<'py>(
        &self,
        py: Python<'py>,
        key: &str,
    ) -> PyResult<(Bound<'py, numpy::PyArray2<f32>>, Bound<'py, PyArray1<f32>>)> {
        let m = input::modality(key)?;
        let snap = self.get()?.snapshot();
        let dim = snap
            .schema()
            .modalities
            .iter()
            .find(|s| s.modality == m)
            .map(|s| s.dim)
            .ok_or_else(|| PyValueError::new_err(format!("{m} is not in the store's schema")))?;
        let rows = snap.rows();
        let mut data = vec![0f32; rows * dim];
        let mut qual = vec![-1f32; rows];
        for r in 0..rows {
            if let Some(t) = snap.template(m, r) {
                data[r * dim..(r + 1) * dim].copy_from_slice(t);
                qual[r] = snap.quality(m, r);
            }
        }
        let arr = numpy::ndarray::Array2::from_shape_vec((rows, dim), data)
            .map_err(|e| PachaError::new_err(e.to_string()))?;
        Ok((
            numpy::PyArray2::from_owned_array(py, arr),
            PyArray1::from_vec(py, qual),
        ))
    }

    /// Validates every record, then commits batches of `batch` records; returns the report as JSON.
    #[pyo3(signature = (ids, blocks, batch, progress=None))]
    fn ingest<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<String>,
        blocks: BlockArgs<'py>,
        batch: usize,
        progress: Option<Bound<'py, PyAny>>,
    ) -> PyResult<String> {
        let e = self.get()?;
        if batch == 0 {
            return Err(PyValueError::new_err("batch_size must be at least 1"));
        }
        if blocks.is_empty() {
            return Err(PyValueError::new_err(
                "no templates: give face=... and/or finger={position: array}",
            ));
        }
        e.store().ensure_writable("ingest").map_err(py_err)?;
        let held = hold_blocks(blocks)?;
        let n = ids.len();
        let schema = e.snapshot().schema().clone();
        for (m, h, _) in &held {
            match schema.modalities.iter().find(|s| s.modality == *m) {
                None => {
                    return Err(PyValueError::new_err(format!(
                        "{}: modality {m} is not in the store's schema ({})",
                        m.key(),
                        schema.keys().join(", ")
                    )));
                }
                Some(s) if s.dim != h.view().dim() => {
                    return Err(PyValueError::new_err(format!(
                        "{}: dimension {} but the store's {} dimension is {}",
                        m.key(),
                        h.view().dim(),
                        m.key(),
                        s.dim
                    )));
                }
                Some(_) => {}
            }
        }
        let blocks = views(&held);
        let report = watch::run(py, progress.as_ref(), |w| {
            input::check_shapes(&blocks, n, "subject IDs")?;
            check_unique(&ids)?;
            let store = e.store();
            let step = batch.min(4096);
            w.progress("validate", 0, n as u64);
            let mut start = 0;
            while start < n {
                let end = (start + step).min(n);
                let b = build_batch(&ids, &blocks, start, end)?;
                store
                    .check_batch(&b)
                    .map_err(|er| locate(&ids, start, er))?;
                w.progress("validate", end as u64, n as u64);
                if w.cancelled() {
                    return Err(Fail::Value(
                        "ingest cancelled during validation: nothing committed".into(),
                    )
                    .into());
                }
                start = end;
            }
            let (mut inserted, mut unchanged, mut batches) = (0usize, 0usize, 0usize);
            start = 0;
            while start < n {
                if w.cancelled() {
                    return Err(pyo3::exceptions::PyKeyboardInterrupt::new_err(format!(
                        "ingest cancelled after committing {} of {n} records",
                        inserted + unchanged
                    )));
                }
                let end = (start + batch).min(n);
                let b = build_batch(&ids, &blocks, start, end)?;
                let r = store.insert_batch(&b).map_err(|er| {
                    Fail::from(EngineError::Ingest {
                        committed: inserted + unchanged,
                        total: n,
                        source: Box::new(er),
                    })
                })?;
                inserted += r.inserted;
                unchanged += r.unchanged;
                batches += 1;
                w.progress("ingest", end as u64, n as u64);
                start = end;
            }
            Ok(pacha_engine::ingest::IngestReport {
                records: n,
                inserted,
                unchanged,
                batches,
                created: false,
            })
        })?;
        json(&report)
    }

    /// Builds (or rebuilds) the candidate index over every committed row.
    #[pyo3(signature = (progress=None))]
    fn build_index(&self, py: Python<'_>, progress: Option<Bound<'_, PyAny>>) -> PyResult<()> {
        let e = self.get()?;
        watch::run(py, progress.as_ref(), |w| {
            let cb = |done: usize, total: usize| w.progress("index", done as u64, total as u64);
            e.build_index(&Default::default(), Some(&cb))
                .map_err(py_err)
        })
    }

    /// Fits and saves the score models; returns `{"source", "models", "tail_checks", "quality_bands",
    /// "decision_fmr", "resolution_notes"}` as JSON.
    #[pyo3(signature = (truth, impostor_pairs, seed, tail_rows, quality_bands, tail_pool, tail_rows_max))]
    #[allow(clippy::too_many_arguments)] // one Python keyword each
    fn calibrate(
        &self,
        py: Python<'_>,
        truth: Option<Vec<(String, String)>>,
        impostor_pairs: usize,
        seed: u64,
        tail_rows: usize,
        quality_bands: usize,
        tail_pool: &str,
        tail_rows_max: usize,
    ) -> PyResult<String> {
        let tail_pool = match tail_pool {
            "uniform" => pacha_engine::engine::TailPool::Uniform,
            "hubs" => pacha_engine::engine::TailPool::Hubs,
            other => {
                return Err(PyValueError::new_err(format!(
                    "tail_pool must be \"uniform\" or \"hubs\", not {other:?}"
                )));
            }
        };
        let e = self.get()?;
        let cal = py.detach(|| {
            let opts = CalibrateOptions {
                impostor_pairs,
                genuine: truth.as_deref(),
                seed,
                tail_rows,
                quality_bands,
                tail_pool,
                tail_rows_max,
                ..CalibrateOptions::default()
            };
            e.calibrate(&opts).map(|_| {
                let notes = e.resolution_notes(opts.decision_fpir);
                (e.calibration(), notes)
            })
        });
        let (cal, (decision_fmr, notes)) = cal.map_err(py_err)?;
        json(&serde_json::json!({
            "source": cal.source,
            "models": cal.models,
            "tail_checks": cal.tail_checks,
            "quality_bands": cal.quality_bands,
            "decision_fmr": decision_fmr,
            "resolution_notes": notes,
        }))
    }

    /// Runs a dedup (the CLI's `pacha dedup` options); Ctrl-C cancels it between blocks.
    #[pyo3(signature = (target_fpir, from_row, mode, block_rows, floor, checkpoint, sketch, genuine_miss, audit_probes, audit_seed, min_recall, progress=None, force_path=None))]
    #[allow(clippy::too_many_arguments)]
    fn dedup(
        &self,
        py: Python<'_>,
        target_fpir: f64,
        from_row: Option<usize>,
        mode: &str,
        block_rows: Option<usize>,
        floor: Option<f64>,
        checkpoint: Option<PathBuf>,
        sketch: bool,
        genuine_miss: f64,
        audit_probes: usize,
        audit_seed: Option<u64>,
        min_recall: f64,
        progress: Option<Bound<'_, PyAny>>,
        force_path: Option<String>,
    ) -> PyResult<RunOutput> {
        let started = pacha_engine::tiles::unix_now();
        let mode = mode_of(mode)?;
        if block_rows.is_some() && matches!(mode, CandidateMode::Index) {
            return Err(PyValueError::new_err(
                "block_rows applies to exact mode only: index runs size their blocks themselves",
            ));
        }
        if !(0.0..=1.0).contains(&min_recall) {
            return Err(PyValueError::new_err(format!(
                "min_recall {min_recall} is not in [0, 1]"
            )));
        }
        let defaults = DedupOptions::default();
        let opts = DedupOptions {
            target_fpir,
            scope: from_row.map_or(DedupScope::WholeStore, DedupScope::RowsFrom),
            mode,
            block_rows: block_rows.unwrap_or(defaults.block_rows),
            report_floor: floor,
            checkpoint_dir: checkpoint,
            sketch: if sketch { defaults.sketch } else { None },
            genuine_miss,
            audit: AuditOptions {
                probes: audit_probes,
                seed: audit_seed.unwrap_or(AuditOptions::default().seed),
                min_recall,
            },
            force_path,
            tile: None,
            recompute_sketches: false,
        };
        let e = self.get()?;
        let result = watch::run(py, progress.as_ref(), |w| {
            let cb = |p: pacha_engine::dedup::DedupProgress| {
                w.progress("dedup", p.done as u64, p.total as u64)
            };
            e.dedup(&opts, Some(&cb), Some(&w.cancel)).map_err(py_err)
        })?;
        Ok(RunOutput {
            result: Arc::new(result),
            parameters: RunParameters::of(&opts),
            started,
        })
    }

    /// Identifies every probe row (blocks as for ingest, without presence/quality); returns one dict of
    /// columns per probe, the audit as JSON (or None) and the per-probe latency summary as JSON.
    #[pyo3(signature = (blocks, max_results, target_fpir, gallery, min_score, audit_probes, audit_seed, min_recall, batch_scan))]
    #[allow(clippy::too_many_arguments)]
    fn identify<'py>(
        &self,
        py: Python<'py>,
        blocks: Vec<(String, Bound<'py, PyAny>)>,
        max_results: usize,
        target_fpir: f64,
        gallery: Option<Vec<String>>,
        min_score: Option<f64>,
        audit_probes: usize,
        audit_seed: Option<u64>,
        min_recall: f64,
        batch_scan: &str,
    ) -> PyResult<(Vec<Bound<'py, PyDict>>, Option<String>, String)> {
        let e = self.get()?;
        if !(0.0..=1.0).contains(&min_recall) {
            return Err(PyValueError::new_err(format!(
                "min_recall {min_recall} is not in [0, 1]"
            )));
        }
        let batch_scan = match batch_scan {
            "auto" => BatchScan::Auto,
            "joint" => BatchScan::Joint,
            "per-probe" => BatchScan::PerProbe,
            other => {
                return Err(PyValueError::new_err(format!(
                    "batch_scan {other:?} is not one of \"auto\", \"joint\", \"per-probe\""
                )));
            }
        };
        let held = hold_blocks(
            blocks
                .into_iter()
                .map(|(k, a)| (k, a, None, None))
                .collect(),
        )?;
        let n = held.first().map_or(0, |(_, h, _)| h.view().rows());
        let mut probes: Vec<Vec<Template>> = Vec::with_capacity(n);
        {
            let bl = views(&held);
            input::check_shapes(&bl, n, "probes in the first array")?;
            for i in 0..n {
                let mut ts = Vec::new();
                for b in &bl {
                    let mut v = Vec::with_capacity(b.matrix.dim());
                    b.matrix.push_row(i, &mut v);
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(Fail::Value(format!(
                            "probe {i}: {} template contains NaN or infinity",
                            b.modality.key()
                        ))
                        .into());
                    }
                    if v.iter().any(|&x| x != 0.0) {
                        ts.push(Template {
                            modality: b.modality,
                            vector: v,
                            quality: 1.0,
                        });
                    }
                }
                probes.push(ts);
            }
        }
        let keys: Vec<String> = e.snapshot().schema().keys();
        let batch = py
            .detach(|| {
                let opts = IdentifyOptions {
                    max_results,
                    target_fpir,
                    gallery: gallery.as_deref(),
                    min_score,
                    batch_scan,
                };
                e.identify_batch(
                    &probes,
                    &opts,
                    &AuditOptions {
                        probes: audit_probes,
                        seed: audit_seed.unwrap_or(AuditOptions::default().seed),
                        min_recall,
                    },
                )
            })
            .map_err(py_err)?;
        let mut out = Vec::with_capacity(batch.results.len());
        for r in &batch.results {
            let d = PyDict::new(py);
            let ids: Vec<&str> = r.candidates.iter().map(|c| c.subject_id.as_str()).collect();
            d.set_item("subject_id", PyList::new(py, ids)?)?;
            let col = |f: &dyn Fn(&pacha_engine::engine::Candidate) -> f64| {
                PyArray1::from_vec(py, r.candidates.iter().map(f).collect())
            };
            d.set_item("score", col(&|c| c.comparison.fused.score))?;
            d.set_item("llr", col(&|c| c.comparison.fused.llr))?;
            d.set_item("fmr", col(&|c| c.comparison.fused.fmr))?;
            for k in &keys {
                let v: Vec<f32> = r
                    .candidates
                    .iter()
                    .map(|c| cosine_of(&c.comparison, k))
                    .collect();
                d.set_item(format!("{k}_cosine"), PyArray1::from_vec(py, v))?;
            }
            d.set_item("threshold", r.threshold)?;
            d.set_item("compared", r.compared)?;
            out.push(d);
        }
        let audit = batch.audit.as_ref().map(json).transpose()?;
        Ok((out, audit, json(&batch.latency)?))
    }

    /// 1:1 verification of two enrolled subjects; the result as JSON.
    fn verify(&self, py: Python<'_>, a: String, b: String, threshold: f64) -> PyResult<String> {
        let e = self.get()?;
        let r = py
            .detach(|| e.verify(&a, &b, Some(threshold)))
            .map_err(py_err)?;
        json(&r)
    }

    /// Deletes every ID in one commit (all or nothing: an ID not enrolled refuses the whole call); returns
    /// how many distinct IDs were deleted.
    fn delete(&self, py: Python<'_>, ids: Vec<String>) -> PyResult<usize> {
        let e = self.get()?;
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        py.detach(|| e.store().delete_all(&refs)).map_err(py_err)?;
        let mut distinct = refs;
        distinct.sort_unstable();
        distinct.dedup();
        Ok(distinct.len())
    }

    /// Evaluates a run (a result of `dedup`, or a run directory written by it or the CLI) against truth pairs.
    fn evaluate(
        &self,
        py: Python<'_>,
        run: &Bound<'_, PyAny>,
        truth: Vec<(String, String)>,
        impostor_pairs: usize,
    ) -> PyResult<String> {
        let e = self.get()?;
        let data = if let Ok(r) = run.cast::<RunOutput>() {
            let r = r.get();
            pacha_engine::runio::RunData {
                threshold: r.result.threshold,
                pairs: r.result.pairs.clone(),
                summary: r.result.summary.clone(),
            }
        } else {
            let dir: PathBuf = run.extract()?;
            py.detach(|| pacha_engine::runio::read_run(&dir))
                .map_err(py_err)?
        };
        let report = py
            .detach(|| {
                pacha_engine::evaluation::evaluate_run(
                    &e,
                    &data,
                    &truth,
                    impostor_pairs,
                    pacha_engine::evaluation::EvalCounts::default(),
                )
            })
            .map_err(py_err)?;
        json(&report)
    }

    /// `pacha check`: verifies every file of the store directory; the report as JSON.
    fn check(&self, py: Python<'_>) -> PyResult<String> {
        let dir = self.path.clone();
        check_dir(py, dir)
    }
}

fn check_dir(py: Python<'_>, dir: PathBuf) -> PyResult<String> {
    let report = py
        .detach(|| pacha_engine::check_store_dir(&dir))
        .map_err(py_err)?;
    let problems: Vec<String> = report.problems().iter().map(ToString::to_string).collect();
    let warnings: Vec<String> = report
        .store
        .warnings
        .iter()
        .chain(&report.derived.warnings)
        .map(ToString::to_string)
        .collect();
    json(&serde_json::json!({
        "ok": problems.is_empty(), "rows": report.store.rows, "live": report.store.live,
        "generation": report.store.generation,
        "files_checked": report.store.files_checked + report.derived.files_checked,
        "index": report.derived.index.to_string(), "calibration": report.derived.calibration.to_string(),
        "problems": problems, "warnings": warnings,
    }))
}

/// The cosine of modality `key` in a comparison (NaN when the pair does not share it).
fn cosine_of(c: &pacha_engine::matcher::Comparison, key: &str) -> f32 {
    c.modalities
        .iter()
        .find(|s| s.modality.key() == key)
        .map_or(f32::NAN, |s| s.cosine)
}

/// A finished dedup run: pairs, clusters, summary; `pacha.DedupResult` wraps it.
#[pyclass(frozen, module = "pacha._pacha")]
struct RunOutput {
    result: Arc<DedupResult>,
    parameters: RunParameters,
    started: f64,
}

#[pymethods]
impl RunOutput {
    /// Decision threshold on the calibrated scale.
    #[getter]
    fn threshold(&self) -> f64 {
        self.result.threshold
    }

    /// Whether the completeness audit proved its recall (true without an audit: exact runs are complete by
    /// construction).
    #[getter]
    fn proven(&self) -> bool {
        self.result.summary.audit.as_ref().is_none_or(|a| a.passed)
    }

    /// Every reported pair as columns (the columns of `hits.csv`, plus the row numbers).
    fn hits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = &self.result;
        let d = PyDict::new(py);
        let pairs = &r.pairs;
        d.set_item(
            "subject_a",
            PyList::new(py, pairs.iter().map(|p| p.a.as_str()))?,
        )?;
        d.set_item(
            "subject_b",
            PyList::new(py, pairs.iter().map(|p| p.b.as_str()))?,
        )?;
        d.set_item(
            "row_a",
            PyArray1::from_vec(py, pairs.iter().map(|p| p.row_a).collect()),
        )?;
        d.set_item(
            "row_b",
            PyArray1::from_vec(py, pairs.iter().map(|p| p.row_b).collect()),
        )?;
        d.set_item(
            "score",
            PyArray1::from_vec(py, pairs.iter().map(|p| p.score()).collect()),
        )?;
        d.set_item(
            "llr",
            PyArray1::from_vec(py, pairs.iter().map(|p| p.comparison.fused.llr).collect()),
        )?;
        d.set_item(
            "fmr",
            PyArray1::from_vec(py, pairs.iter().map(|p| p.comparison.fused.fmr).collect()),
        )?;
        for (k, _) in &r.summary.candidate_cosines {
            let v: Vec<f32> = pairs.iter().map(|p| cosine_of(&p.comparison, k)).collect();
            d.set_item(format!("{k}_cosine"), PyArray1::from_vec(py, v))?;
        }
        d.set_item(
            "is_hit",
            PyArray1::from_vec(py, pairs.iter().map(|p| p.score() >= r.threshold).collect()),
        )?;
        Ok(d)
    }

    /// The duplicate groups as columns `cluster`, `subject_id` (the columns of `clusters.csv`).
    fn clusters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let mut cl = Vec::new();
        let mut ids = Vec::new();
        for (i, c) in self.result.clusters.iter().enumerate() {
            for id in c {
                cl.push(i as i64);
                ids.push(id.as_str());
            }
        }
        d.set_item("cluster", PyArray1::from_vec(py, cl))?;
        d.set_item("subject_id", PyList::new(py, ids)?)?;
        Ok(d)
    }

    /// The run's summary (`summary.json`'s `summary` object: counts, plans, timings, the audit) as JSON.
    fn summary_json(&self) -> PyResult<String> {
        json(&self.result.summary)
    }

    /// Writes the run directory the CLI writes (`hits.csv`, `hits.jsonl`, `clusters.csv`, `summary.json`,
    /// `manifest.json`); returns the manifest as JSON.
    fn write(&self, py: Python<'_>, dir: PathBuf) -> PyResult<String> {
        let m = py
            .detach(|| {
                pacha_engine::tiles::write_whole_run(
                    &dir,
                    &self.result,
                    self.parameters.clone(),
                    self.started,
                    &[],
                )
            })
            .map_err(py_err)?;
        json(&m)
    }

    fn __len__(&self) -> usize {
        self.result.pairs.len()
    }
}

/// Generates a synthetic population with ground truth into `out` (the files `pacha generate` writes);
/// returns its manifest as JSON.
#[pyfunction]
#[pyo3(signature = (out, records, seed, preset, face_dim, fingers, duplicate_rate, progress=None))]
#[allow(clippy::too_many_arguments)]
fn generate(
    py: Python<'_>,
    out: PathBuf,
    records: u64,
    seed: u64,
    preset: &str,
    face_dim: Option<usize>,
    fingers: Vec<(u8, usize)>,
    duplicate_rate: f64,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let preset: pacha_datasets::generate::Preset = preset
        .parse()
        .map_err(|e: pacha_datasets::DatasetError| PyValueError::new_err(e.to_string()))?;
    for (p, _) in &fingers {
        Modality::finger(*p).map_err(|e| PyValueError::new_err(format!("finger {p}: {e}")))?;
    }
    let cfg = pacha_datasets::generate::PopulationConfig {
        records,
        seed,
        preset,
        face_dim: face_dim.unwrap_or(preset.default_face_dim()),
        fingers,
        duplicate_rate,
        ..Default::default()
    };
    let summary = watch::run(py, progress.as_ref(), |w| {
        pacha_datasets::generate::write_population(&cfg, &out, &mut |done, total| {
            w.progress("generate", done, total)
        })
        .map_err(|e| py_err(EngineError::Dataset(e)))
    })?;
    json(&summary.manifest)
}

/// Reads a truth file (`subject_a,subject_b` columns) into pairs.
#[pyfunction]
fn read_truth(py: Python<'_>, path: PathBuf) -> PyResult<Vec<(String, String)>> {
    py.detach(|| pacha_datasets::generate::read_truth(&path))
        .map_err(|e| py_err(EngineError::Dataset(e)))
}

/// `pacha check` on a store directory (no store handle needed); the report as JSON.
#[pyfunction]
fn check(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    check_dir(py, path)
}

/// The compiled core of the `pacha` package.
#[pymodule]
fn _pacha(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<RunOutput>()?;
    m.add_function(wrap_pyfunction!(generate, m)?)?;
    m.add_function(wrap_pyfunction!(read_truth, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add("PachaError", m.py().get_type::<PachaError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
