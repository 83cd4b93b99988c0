//! [`HnswIndex`]: the [`AnnIndex`] implementation over `hnsw_rs` 0.3.5, wrapped so nothing of it leaks.
//!
//! # What the wrapper guards against (see CRATES.md, hnsw_rs pitfalls)
//! - Distances are our own simsimd kernels, clamped to ≥ 0: `1 − a·b` can be −1.2e−7 for a unit vector
//!   against itself, and hnsw_rs asserts non-negative distances inside rayon workers.
//!   The distance types' short names (`PachaDot`, `PachaCosI8`) are written in dumps: never rename them.
//! - Every input is validated before hnsw_rs sees it (dimension, finite, non-zero; `M ≤ 64`;
//!   dump files checked against our checksummed sidecar), because hnsw_rs calls `process::exit` on some
//!   errors and panics on others.
//! - hnsw_rs has no delete and no uniqueness check: ids are row numbers appended in order (an insert must
//!   start at `len()`), and deleted rows are hidden at search time: with under 10 % tombstones by
//!   oversampling an unfiltered search and dropping them; otherwise (or if that came up short) by a
//!   [`FilterT`] over our [`Bitset`], with `ef` doubled until `k'` live results are found or the whole graph
//!   has been offered.
//! - A reloaded `Hnsw` borrows its `HnswIo` loader: [`Graph`] owns both, the loader boxed behind a raw
//!   pointer, the borrow's lifetime erased, and the graph dropped before the loader (see the SAFETY notes).
//!
//! # f32 or i8 in the graph
//! [`GraphPrecision::I8`] (the default) stores i8 codes (per-row symmetric quantisation, see
//! [`crate::quant`]) and navigates with the cosine of the codes; [`GraphPrecision::F32`] stores f32 rows
//! and navigates with `1 − a·b`. hnsw_rs copies every vector into the graph, so the i8 graph holds 4× less
//! vector memory (512 B instead of 2 KiB per 512-d row) and its distance kernel is cheaper; the price is
//! approximate navigation scores, which does not matter because every candidate is rescored exactly in
//! f32 ([`crate::search_rescored`]). Measured on the tests' structured population (20 200 × 512-d,
//! M = 16, ef_construction = 64, k = 10, k' = 50, ef = 100; `cargo test -p pacha-index --test ann --
//! --ignored --nocapture compare`, a shared 2-core machine, so rates are indicative): f32 graph
//! 396 inserts/s, recall@10 0.9913, dump 56.4 MB; i8 graph 439 inserts/s, recall@10 0.9927, dump 25.3 MB.
//! Same recall after rescoring, slightly faster, less than half the memory: i8 it is.
//!
//! # Persistence
//! `save` writes hnsw_rs's `pacha.hnsw.graph` / `pacha.hnsw.data` and then our sidecar `pacha.meta`
//! (bincode: magic, version, precision, dim, count, M, ef_construction, the length and CRC-32 of both dump
//! files; followed by a CRC-32 of the sidecar itself), written to a temporary name and renamed. `load`
//! verifies the sidecar and both files' lengths and checksums before calling hnsw_rs's loader.

use std::io::Write;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use hnsw_rs::prelude::{AnnT, Distance, FilterT, Hnsw, HnswIo};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::ann::{AnnBuild, AnnIndex, validate_vector};
use crate::exact::Neighbour;
use crate::{Bitset, IndexError, RowsF32, kernels, quant};

/// Largest accepted `M` (hnsw_rs exits the process above 256; more than 64 is never useful here).
pub const MAX_M: usize = 64;
const BASENAME: &str = "pacha";
const META: &str = "pacha.meta";
const META_MAGIC: u32 = 0x5041_4348; // "PACH"
const META_VERSION: u32 = 1;
/// hnsw_rs's maximum number of layers.
const MAX_LAYER: usize = 16;
/// Rows quantised and inserted per batch (bounds the temporary i8 buffer).
const INSERT_BATCH: usize = 1 << 16;

/// Element type stored in the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GraphPrecision {
    /// f32 rows, distance `max(0, 1 − a·b)`.
    F32,
    /// i8 codes, distance `max(0, 1 − cos(codes))`.
    I8,
}

/// Build parameters of [`HnswIndex`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Links per node and layer (layer 0 keeps 2·M). 1..=64.
    pub m: usize,
    /// Candidate list size during construction.
    pub ef_construction: usize,
    /// Element type stored in the graph.
    pub precision: GraphPrecision,
    /// Insert in parallel (rayon). Parallel builds are not reproducible; sequential ones are.
    pub parallel: bool,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 200,
            precision: GraphPrecision::I8,
            parallel: true,
        }
    }
}

/// Distance over f32 rows: `max(0, 1 − a·b)`. Its short name is written in dumps: never rename it.
#[derive(Clone, Copy, Debug, Default)]
struct PachaDot;
impl Distance<f32> for PachaDot {
    #[inline]
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - kernels::dot_f32(a, b)).max(0.0)
    }
}

/// Distance over i8 codes: `max(0, 1 − cos)`. Its short name is written in dumps: never rename it.
#[derive(Clone, Copy, Debug, Default)]
struct PachaCosI8;
impl Distance<i8> for PachaCosI8 {
    #[inline]
    fn eval(&self, a: &[i8], b: &[i8]) -> f32 {
        let d = if kernels::simd_enabled() {
            kernels::simd::cos_distance_i8(a, b)
        } else {
            let ab = kernels::scalar::dot_i8(a, b) as f32;
            let aa = kernels::scalar::dot_i8(a, a) as f32;
            let bb = kernels::scalar::dot_i8(b, b) as f32;
            if aa == 0.0 || bb == 0.0 {
                1.0
            } else {
                1.0 - ab / (aa.sqrt() * bb.sqrt())
            }
        };
        if d.is_nan() { 1.0 } else { d.max(0.0) }
    }
}

/// Hides excluded ids from hnsw_rs's search.
struct Live<'a>(&'a Bitset);
impl FilterT for Live<'_> {
    fn hnsw_filter(&self, id: &usize) -> bool {
        u32::try_from(*id).is_ok_and(|id| !self.0.contains(id))
    }
}

/// An `Hnsw` together with the loader it may borrow from.
struct Owned<T: Clone + Send + Sync + 'static, D: Distance<T> + Send + Sync> {
    /// Dropped first (in `Drop`), while the loader it may borrow from is still alive.
    hnsw: ManuallyDrop<Hnsw<'static, T, D>>,
    /// The `HnswIo` the graph was loaded by, from `Box::into_raw`; never accessed except to free it.
    loader: Option<NonNull<HnswIo>>,
}

impl<T: Clone + Send + Sync + 'static, D: Distance<T> + Send + Sync> Owned<T, D> {
    fn built(hnsw: Hnsw<'static, T, D>) -> Self {
        Self {
            hnsw: ManuallyDrop::new(hnsw),
            loader: None,
        }
    }
}

impl<T: Clone + Send + Sync + 'static, D: Distance<T> + Send + Sync> Drop for Owned<T, D> {
    fn drop(&mut self) {
        // SAFETY: `hnsw` is dropped exactly once, here, and never used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.hnsw) };
        if let Some(p) = self.loader.take() {
            // SAFETY: `p` came from `Box::into_raw` in `load_graph` and is freed exactly once, here, after
            // the graph that borrowed from it has been dropped.
            drop(unsafe { Box::from_raw(p.as_ptr()) });
        }
    }
}

// SAFETY: `Owned` is `Hnsw` plus a pointer to an `HnswIo` that nothing reads or writes after loading (it
// only lends its memory to the graph and is freed in `Drop`). `Hnsw<T, D>` is itself Send + Sync for these
// T and D (checked by `assert_send_sync` below) and `HnswIo` is Send (same check), so moving or sharing
// `Owned` across threads is exactly as safe as moving or sharing the `Hnsw` alone.
unsafe impl<T: Clone + Send + Sync + 'static, D: Distance<T> + Send + Sync> Send for Owned<T, D> {}
// SAFETY: see the `Send` impl: shared access only ever reaches the `Hnsw`, which is Sync.
unsafe impl<T: Clone + Send + Sync + 'static, D: Distance<T> + Send + Sync> Sync for Owned<T, D> {}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<X: Send + Sync>() {}
    fn is_send<X: Send>() {}
    is::<Hnsw<'static, f32, PachaDot>>();
    is::<Hnsw<'static, i8, PachaCosI8>>();
    is_send::<HnswIo>();
}

enum Graph {
    F32(Owned<f32, PachaDot>),
    I8(Owned<i8, PachaCosI8>),
}

/// HNSW index over row numbers, built with `hnsw_rs`; see the module docs.
pub struct HnswIndex {
    graph: Graph,
    params: HnswParams,
    dim: usize,
    len: usize,
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex")
            .field("params", &self.params)
            .field("dim", &self.dim)
            .field("len", &self.len)
            .finish()
    }
}

fn validate_params(p: &HnswParams) -> Result<(), IndexError> {
    if p.m == 0 || p.m > MAX_M {
        return Err(IndexError::Shape(format!(
            "HNSW M = {} outside 1..={MAX_M}",
            p.m
        )));
    }
    if p.ef_construction == 0 {
        return Err(IndexError::Shape("HNSW ef_construction = 0".into()));
    }
    Ok(())
}

fn validate_rows(base: RowsF32<'_>, from: usize, to: usize) -> Result<(), IndexError> {
    (from..to)
        .into_par_iter()
        .try_for_each(|i| validate_vector(base.row(i), base.dim(), i))
}

impl HnswIndex {
    /// An empty index for vectors of `dim` values, with room hinted for `capacity` rows.
    pub fn new(dim: usize, capacity: usize, params: &HnswParams) -> Result<Self, IndexError> {
        validate_params(params)?;
        if dim == 0 {
            return Err(IndexError::Shape("dimension 0".into()));
        }
        let (m, ef, cap) = (params.m, params.ef_construction, capacity.max(1));
        let graph = match params.precision {
            GraphPrecision::F32 => {
                Graph::F32(Owned::built(Hnsw::new(m, cap, MAX_LAYER, ef, PachaDot)))
            }
            GraphPrecision::I8 => {
                Graph::I8(Owned::built(Hnsw::new(m, cap, MAX_LAYER, ef, PachaCosI8)))
            }
        };
        Ok(Self {
            graph,
            params: params.clone(),
            dim,
            len: 0,
        })
    }

    /// The build parameters.
    pub fn params(&self) -> &HnswParams {
        &self.params
    }

    fn raw_search(
        &self,
        q: &[f32],
        qi8: &[i8],
        k: usize,
        ef: usize,
        f: Option<&dyn FilterT>,
    ) -> Vec<(usize, f32)> {
        let res = match &self.graph {
            Graph::F32(g) => g.hnsw.search_filter(q, k, ef, f),
            Graph::I8(g) => g.hnsw.search_filter(qi8, k, ef, f),
        };
        res.into_iter()
            .map(|n| (n.d_id, 1.0 - n.distance))
            .collect()
    }
}

impl AnnIndex for HnswIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.len
    }

    fn insert(&mut self, base: RowsF32<'_>, upto: usize) -> Result<(), IndexError> {
        if base.dim() != self.dim {
            return Err(IndexError::Dim {
                expected: self.dim,
                got: base.dim(),
            });
        }
        if upto > base.rows() || upto > u32::MAX as usize {
            return Err(IndexError::Shape(format!(
                "insert up to row {upto}: base has {} rows (ids are u32)",
                base.rows()
            )));
        }
        if upto <= self.len {
            return Ok(());
        }
        validate_rows(base, self.len, upto)?;
        let parallel = self.params.parallel;
        let mut start = self.len;
        while start < upto {
            let end = (start + INSERT_BATCH).min(upto);
            match &self.graph {
                Graph::F32(g) => {
                    let items: Vec<(&[f32], usize)> =
                        (start..end).map(|i| (base.row(i), i)).collect();
                    if parallel {
                        g.hnsw.parallel_insert_slice(&items);
                    } else {
                        items.iter().for_each(|&it| g.hnsw.insert_slice(it));
                    }
                }
                Graph::I8(g) => {
                    let q = quant::quantize_rows(base.slice_rows(start, end));
                    let v = q.view();
                    let items: Vec<(&[i8], usize)> =
                        (0..end - start).map(|i| (v.row(i), start + i)).collect();
                    if parallel {
                        g.hnsw.parallel_insert_slice(&items);
                    } else {
                        items.iter().for_each(|&it| g.hnsw.insert_slice(it));
                    }
                }
            }
            start = end;
            self.len = end;
        }
        Ok(())
    }

    fn search(
        &self,
        query: &[f32],
        k_prime: usize,
        ef: usize,
        exclude: Option<&Bitset>,
    ) -> Result<Vec<Neighbour>, IndexError> {
        validate_vector(query, self.dim, 0)?;
        if k_prime == 0 || self.len == 0 {
            return Ok(Vec::new());
        }
        let mut qi8 = Vec::new();
        if matches!(self.graph, Graph::I8(_)) {
            qi8 = vec![0i8; self.dim];
            quant::quantize_i8(query, &mut qi8);
        }
        let exclude = exclude.filter(|b| !b.is_empty());
        let live_only = |raw: Vec<(usize, f32)>| -> Vec<Neighbour> {
            raw.into_iter()
                .filter(|&(id, _)| id < self.len && exclude.is_none_or(|b| !b.contains(id as u32)))
                .map(|(id, s)| Neighbour {
                    id: id as u32,
                    score: s,
                })
                .collect()
        };
        let ef = ef.max(k_prime);
        // Few tombstones (< 10 %, the usual state between compactions): search without a filter, asking for
        // k' plus the expected number of deleted hits, and drop those. hnsw_rs's filtered search never stops
        // early, so it is only used when many rows are deleted or the cheap path came up short.
        let n_excl = exclude.map_or(0, Bitset::len);
        if n_excl.saturating_mul(10) < self.len {
            let extra =
                (k_prime * n_excl).div_ceil(self.len.max(1)) * 2 + usize::from(n_excl > 0) * 4;
            let kk = k_prime + extra;
            let out = live_only(self.raw_search(query, &qi8, kk, ef.max(kk), None));
            if out.len() >= k_prime || (exclude.is_none() && ef.max(kk) >= self.len) {
                return Ok(out.into_iter().take(k_prime).collect());
            }
        }
        let live = exclude.map(Live);
        let filter: Option<&dyn FilterT> = live.as_ref().map(|l| l as &dyn FilterT);
        let mut ef = ef;
        loop {
            let out = live_only(self.raw_search(query, &qi8, k_prime, ef, filter));
            // Widen the search until k' live results (or the whole graph has been offered to it).
            if out.len() >= k_prime || ef >= self.len {
                return Ok(out);
            }
            ef = (ef * 2).min(self.len.max(ef));
        }
    }

    fn save(&self, dir: &Path) -> Result<(), IndexError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IndexError::Io { path, source }
        };
        create_private_dir(dir).map_err(io(dir))?;
        // hnsw_rs creates its dump files with the umask's mode (often 0644): dump into a fresh 0700 staging
        // directory nobody else can enter, make the files 0600, then move them into place. (It also picks a
        // random basename when a dump already exists where it writes; the staging directory is always empty.)
        let stage = dir.join(".dump.tmp");
        if stage.exists() {
            std::fs::remove_dir_all(&stage).map_err(io(&stage))?;
        }
        create_private_dir(&stage).map_err(io(&stage))?;
        let dumped = match &self.graph {
            Graph::F32(g) => g.hnsw.file_dump(&stage, BASENAME),
            Graph::I8(g) => g.hnsw.file_dump(&stage, BASENAME),
        }
        .map_err(|e| IndexError::Io {
            path: stage.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        if dumped != BASENAME {
            return Err(IndexError::Corrupt {
                path: dir.to_path_buf(),
                problem: format!("hnsw_rs dumped under basename {dumped:?}, expected {BASENAME:?}"),
            });
        }
        for (from, to) in [
            (graph_path(&stage), graph_path(dir)),
            (data_path(&stage), data_path(dir)),
        ] {
            std::fs::set_permissions(&from, perms(0o600)).map_err(io(&from))?;
            std::fs::rename(&from, &to).map_err(io(&to))?;
        }
        std::fs::remove_dir(&stage).map_err(io(&stage))?;
        let (graph_len, graph_crc) = file_crc(&graph_path(dir))?;
        let (data_len, data_crc) = file_crc(&data_path(dir))?;
        let meta = Meta {
            magic: META_MAGIC,
            version: META_VERSION,
            params: self.params.clone(),
            dim: self.dim as u64,
            count: self.len as u64,
            graph_len,
            graph_crc,
            data_len,
            data_crc,
        };
        let mut bytes =
            bincode::serde::encode_to_vec(&meta, bincode::config::standard()).map_err(|e| {
                IndexError::Corrupt {
                    path: dir.join(META),
                    problem: e.to_string(),
                }
            })?;
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let tmp = dir.join(format!("{META}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.set_permissions(perms(0o600)).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, dir.join(META)).map_err(io(&dir.join(META)))?;
        Ok(())
    }
}

impl AnnBuild for HnswIndex {
    type Params = HnswParams;

    fn build(base: RowsF32<'_>, params: &HnswParams) -> Result<Self, IndexError> {
        let mut idx = Self::new(base.dim(), base.rows(), params)?;
        idx.insert(base, base.rows())?;
        Ok(idx)
    }

    fn load(dir: &Path) -> Result<Self, IndexError> {
        let meta = read_meta(dir)?;
        for (path, len, crc) in [
            (graph_path(dir), meta.graph_len, meta.graph_crc),
            (data_path(dir), meta.data_len, meta.data_crc),
        ] {
            let (l, c) = file_crc(&path)?;
            if l != len || c != crc {
                return Err(IndexError::Corrupt {
                    path,
                    problem: format!("length/CRC {l}/{c:08x}, sidecar says {len}/{crc:08x}"),
                });
            }
        }
        let dim = usize::try_from(meta.dim).unwrap_or(usize::MAX);
        let count = usize::try_from(meta.count).unwrap_or(usize::MAX);
        let graph = match meta.params.precision {
            GraphPrecision::F32 => Graph::F32(load_graph(dir)?),
            GraphPrecision::I8 => Graph::I8(load_graph(dir)?),
        };
        let (n, d) = match &graph {
            Graph::F32(g) => (
                g.hnsw.get_nb_point(),
                g.hnsw.get_point_indexation().get_data_dimension(),
            ),
            Graph::I8(g) => (
                g.hnsw.get_nb_point(),
                g.hnsw.get_point_indexation().get_data_dimension(),
            ),
        };
        if n != count || (count > 0 && d != dim) {
            return Err(IndexError::Corrupt {
                path: graph_path(dir),
                problem: format!("loaded {n} points of dim {d}, sidecar says {count} of dim {dim}"),
            });
        }
        Ok(Self {
            graph,
            params: meta.params,
            dim,
            len: count,
        })
    }
}

fn load_graph<T, D>(dir: &Path) -> Result<Owned<T, D>, IndexError>
where
    T: 'static + Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + std::fmt::Debug,
    D: Distance<T> + Default + Send + Sync,
{
    let raw = NonNull::from(Box::leak(Box::new(HnswIo::new(dir, BASENAME))));
    // SAFETY: `raw` points to a live, heap-allocated `HnswIo` that nobody else references. The `'static`
    // borrow created here is erased lifetime: it is sound because (1) the box is never moved, read or
    // written again except by `Owned::drop`, which frees it only after dropping the graph, and (2) on the
    // error path below no graph exists and the box is freed immediately.
    let loader: &'static mut HnswIo = unsafe { &mut *raw.as_ptr() };
    match loader.load_hnsw::<T, D>() {
        Ok(hnsw) => Ok(Owned {
            hnsw: ManuallyDrop::new(hnsw),
            loader: Some(raw),
        }),
        Err(e) => {
            // SAFETY: the load failed, so no value borrows from the loader; `raw` is from `Box::leak`
            // above and is freed exactly once.
            drop(unsafe { Box::from_raw(raw.as_ptr()) });
            Err(IndexError::Corrupt {
                path: graph_path(dir),
                problem: e.to_string(),
            })
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    magic: u32,
    version: u32,
    params: HnswParams,
    dim: u64,
    count: u64,
    graph_len: u64,
    graph_crc: u32,
    data_len: u64,
    data_crc: u32,
}

/// Permissions of the given mode (index files hold data derived from biometric templates: 0600, dirs 0700).
fn perms(mode: u32) -> std::fs::Permissions {
    <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode)
}

/// Creates `dir` (and missing parents) and makes a directory created here 0700 whatever the umask.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, perms(0o700))
}

fn graph_path(dir: &Path) -> PathBuf {
    dir.join(format!("{BASENAME}.hnsw.graph"))
}
fn data_path(dir: &Path) -> PathBuf {
    dir.join(format!("{BASENAME}.hnsw.data"))
}

fn file_crc(path: &Path) -> Result<(u64, u32), IndexError> {
    use std::io::Read;
    let err = |source| IndexError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, h.finalize()))
}

fn read_meta(dir: &Path) -> Result<Meta, IndexError> {
    let path = dir.join(META);
    let bytes = std::fs::read(&path).map_err(|source| IndexError::Io {
        path: path.clone(),
        source,
    })?;
    let corrupt = |problem: String| IndexError::Corrupt {
        path: path.clone(),
        problem,
    };
    if bytes.len() < 4 {
        return Err(corrupt(format!("sidecar of {} bytes", bytes.len())));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if crc32fast::hash(body) != stored {
        return Err(corrupt("sidecar checksum mismatch".into()));
    }
    let (meta, used): (Meta, usize) =
        bincode::serde::decode_from_slice(body, bincode::config::standard())
            .map_err(|e| corrupt(format!("sidecar does not decode: {e}")))?;
    if used != body.len() || meta.magic != META_MAGIC {
        return Err(corrupt("not a pacha HNSW sidecar".into()));
    }
    if meta.version != META_VERSION {
        return Err(corrupt(format!(
            "sidecar version {} (supported: {META_VERSION})",
            meta.version
        )));
    }
    validate_params(&meta.params).map_err(|e| corrupt(e.to_string()))?;
    if meta.dim == 0 || meta.count > u64::from(u32::MAX) {
        return Err(corrupt(format!("dim {} count {}", meta.dim, meta.count)));
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn dumps_are_private_and_can_be_rewritten() {
        let (rows, dim) = (40, 8);
        let data: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 7919 % 97) as f32 - 48.0) / 50.0 + if i % dim == 0 { 3.0 } else { 0.0 })
            .collect();
        let base = RowsF32::new(&data, rows, dim, dim).unwrap();
        let params = HnswParams {
            parallel: false,
            ..HnswParams::default()
        };
        let idx = HnswIndex::build(base, &params).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hnsw");
        // Saved twice into the same directory: the second save replaces the first (no random basename).
        for _ in 0..2 {
            idx.save(&dir).unwrap();
            let mut names = Vec::new();
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                assert_eq!(mode(&p), 0o600, "{} is not private", p.display());
                names.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
            names.sort();
            assert_eq!(names, ["pacha.hnsw.data", "pacha.hnsw.graph", "pacha.meta"]);
            assert_eq!(mode(&dir), 0o700);
        }
        let back = HnswIndex::load(&dir).unwrap();
        assert_eq!(back.len, rows);
    }
}
