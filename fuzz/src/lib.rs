//! Fuzz targets: each takes the fuzzer's bytes, puts them where pacha reads a file from, and runs the reader.
//! A reader may refuse the input with its typed error; it may not panic, abort or hang. The binaries in
//! `src/bin/` wrap each target in `afl::fuzz!`; `seeds` writes the seed corpora in `corpus/`. Without the
//! default `engine` feature only the reader targets (npy, fvecs, subjects) build: CI's short run uses that, so
//! its instrumented build skips the engine and its GEMM dependencies.

#[cfg(feature = "engine")]
use pacha_engine::Modality;
#[cfg(feature = "engine")]
use pacha_engine::store::{Enrolment, Schema, Store, Template};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A scratch directory for the process (tmpfs when there is one).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let b = tempfile::Builder::new()
            .prefix("pacha-fuzz")
            .tempdir_in(if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            });
        b.expect("scratch directory")
    })
    .path()
}

fn write(name: &str, data: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, data).expect("writing the input");
    p
}

/// `.npy` reader: header, rows, finiteness check.
pub fn npy(data: &[u8]) {
    let p = write("x.npy", data);
    if let Ok(m) = pacha_datasets::npy::NpyMatrix::open(&p) {
        let mut out = Vec::new();
        let _ = m.read_rows(0, (m.rows() as usize).min(64), &mut out);
        let _ = m.check_finite();
        if m.rows() > 0 {
            let _ = m.row(m.rows() - 1);
        }
    }
}

/// `.fvecs` reader.
pub fn fvecs(data: &[u8]) {
    let p = write("x.fvecs", data);
    if let Ok(m) = pacha_datasets::fvecs::FvecsMatrix::open(&p) {
        let _ = m.validate();
        let mut out = Vec::new();
        let _ = m.read_rows(0, (m.rows() as usize).min(64), &mut out);
    }
}

/// Subjects CSV reader.
pub fn subjects(data: &[u8]) {
    let p = write("subjects.csv", data);
    let _ = pacha_datasets::subjects::read_subjects(&p);
}

#[cfg(feature = "engine")]
/// `.ivf` index file loader.
pub fn ivf(data: &[u8]) {
    let p = write("x.ivf", data);
    let _ = pacha_index::ivf::Ivf::load(&p);
}

#[cfg(feature = "engine")]
/// The schema of the seed store.
pub fn store_schema() -> Schema {
    Schema::of([(Modality::Face, 8), (Modality::Finger(2), 4)])
}

#[cfg(feature = "engine")]
/// A small deterministic enrolment.
pub fn enrolment(id: &str, seed: u32) -> Enrolment {
    let v = |d: usize, s: u32| -> Vec<f32> {
        (0..d)
            .map(|i| ((s as usize * 31 + i * 17) % 23) as f32 - 11.0 + 0.5)
            .collect()
    };
    Enrolment {
        subject_id: id.into(),
        templates: vec![
            Template {
                modality: Modality::Face,
                vector: v(8, seed),
                quality: 0.5,
            },
            Template {
                modality: Modality::Finger(2),
                vector: v(4, seed + 1),
                quality: 0.9,
            },
        ],
    }
}

#[cfg(feature = "engine")]
/// Builds the seed store (3 commits, one delete) in `dir`.
pub fn build_store(dir: &Path) {
    let s = Store::create(dir, store_schema()).expect("creating the seed store");
    s.insert(&[enrolment("a", 1), enrolment("b", 2)])
        .expect("insert");
    s.insert(&[enrolment("c", 3)]).expect("insert");
    s.delete("b").expect("delete");
}

#[cfg(feature = "engine")]
/// The names of a store directory's files, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("listing")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[cfg(feature = "engine")]
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("creating");
    for n in file_names(from) {
        std::fs::copy(from.join(&n), to.join(&n)).expect("copying");
    }
}

#[cfg(feature = "engine")]
/// Store open and `check` on a damaged store directory: the first byte picks a file of the seed store
/// (sorted names), the rest replaces its contents; then read-only open, `check`, writer open and an insert.
pub fn store(data: &[u8]) {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let d = scratch().join("store-base");
        build_store(&d);
        d
    });
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch().join("store");
    copy_dir(base, &dir);
    let names = file_names(base);
    let name = &names[sel as usize % names.len()];
    std::fs::write(dir.join(name), rest).expect("writing the damaged file");
    if let Ok(s) = Store::open_read_only(&dir) {
        let snap = s.snapshot();
        for r in 0..snap.rows() {
            let _ = snap.subject_id(r);
            let _ = snap.template(Modality::Face, r);
        }
    }
    let _ = pacha_engine::store::check(&dir);
    if let Ok(s) = Store::open(&dir) {
        let _ = s.insert(&[enrolment("z", 9)]);
    }
}

#[cfg(feature = "engine")]
/// The derived-file readers: the first byte picks `engine/index/index.json` or `engine/calibration.json`;
/// the rest, sealed as pacha seals it (so the JSON parser behind the checksum is reached), is written there;
/// then `check_store_dir` and a read-only engine open.
pub fn derived(data: &[u8]) {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let d = scratch().join("derived-base");
        build_store(&d);
        d
    });
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let dir = scratch().join("derived");
    copy_dir(base, &dir);
    let engine = dir.join(pacha_engine::derived::ENGINE_DIR);
    let (path, kind) = if sel & 1 == 0 {
        (
            engine
                .join(pacha_engine::derived::INDEX_DIR)
                .join(pacha_engine::derived::INDEX_META),
            "index",
        )
    } else {
        (
            engine.join(pacha_engine::derived::CALIBRATION_FILE),
            "calibration",
        )
    };
    std::fs::create_dir_all(path.parent().expect("parent")).expect("creating");
    let bytes = if sel & 2 == 0 {
        pacha_engine::derived::seal(kind, body)
    } else {
        body.to_vec()
    };
    std::fs::write(&path, bytes).expect("writing");
    let _ = pacha_engine::check_store_dir(&dir);
    let _ = pacha_engine::Engine::open_read_only(&dir);
}

#[cfg(feature = "engine")]
/// Run and tile manifest readers: the bytes are a directory's `manifest.json`.
pub fn tiles(data: &[u8]) {
    let dir = scratch().join("tile");
    let _ = std::fs::create_dir_all(&dir);
    std::fs::write(dir.join(pacha_engine::tiles::MANIFEST_FILE), data).expect("writing");
    let _ = pacha_engine::tiles::RunManifest::verify(&dir);
    let _ = pacha_engine::tiles::read_tile(&dir);
}

#[cfg(feature = "engine")]
/// HNSW dump loader: the first byte picks the sidecar, the graph or the data file of a seed dump; the rest
/// replaces it.
pub fn hnsw(data: &[u8]) {
    use pacha_index::ann::AnnBuild;
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let d = scratch().join("hnsw-base");
        build_hnsw(&d);
        d
    });
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch().join("hnsw");
    copy_dir(base, &dir);
    let names = file_names(base);
    std::fs::write(dir.join(&names[sel as usize % names.len()]), rest).expect("writing");
    let _ = pacha_index::HnswIndex::load(&dir);
}

#[cfg(feature = "engine")]
/// Saves a small HNSW index in `dir`.
pub fn build_hnsw(dir: &Path) {
    use pacha_index::ann::{AnnBuild, AnnIndex};
    let (rows, dim) = (24, 8);
    let data: Vec<f32> = (0..rows * dim)
        .map(|i| ((i * 7919 % 97) as f32 - 48.0) / 50.0 + 0.1)
        .collect();
    let base = pacha_index::RowsF32::new(&data, rows, dim, dim).expect("rows");
    let params = pacha_index::HnswParams {
        parallel: false,
        ..Default::default()
    };
    let idx = pacha_index::HnswIndex::build(base, &params).expect("build");
    idx.save(dir).expect("save");
}
