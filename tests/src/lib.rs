//! Shared helpers of pacha's end-to-end tests: generated populations with ground truth, stores built from
//! them, and the path of the built `pacha` binary.
// Test support: a failed setup step is a test failure, so panicking with a message is the right behaviour.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use pacha_datasets::generate::{Generator, PopulationConfig};
use pacha_engine::store::Schema;
use pacha_engine::{Engine, Modality};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A generated population loaded into an engine, with its ground truth.
pub struct Loaded {
    /// The engine over the store.
    pub engine: Engine,
    /// Ground-truth duplicate pairs as subject IDs (a < b in record order).
    pub truth: Vec<(String, String)>,
}

impl Loaded {
    /// Truth pairs as an unordered set.
    pub fn truth_set(&self) -> HashSet<(String, String)> {
        self.truth.iter().map(|(a, b)| ordered(a, b)).collect()
    }
}

/// The pair with the smaller ID first.
pub fn ordered(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// The default test population configuration: structured, face 512 + fingers 2 and 7 at 256, 1 % duplicates.
pub fn config(records: u64, seed: u64) -> PopulationConfig {
    PopulationConfig {
        records,
        seed,
        ..PopulationConfig::default()
    }
}

/// Generates `cfg` straight into a new engine in `dir` (no intermediate files), keeping only `keep`
/// modalities (all when `None`).
pub fn load(dir: &Path, cfg: &PopulationConfig, keep: Option<&[Modality]>) -> Loaded {
    load_edited(dir, cfg, keep, &|_| {})
}

/// Like [`load`], with `edit` applied to each generated batch before it is inserted (to build populations
/// the generator does not make, e.g. modalities that move together).
pub fn load_edited(
    dir: &Path,
    cfg: &PopulationConfig,
    keep: Option<&[Modality]>,
    edit: &dyn Fn(&mut pacha_datasets::RecordBatch),
) -> Loaded {
    let g = Generator::new(cfg.clone()).expect("valid config");
    let kept = |m: Modality| keep.is_none_or(|k| k.contains(&m));
    let schema = Schema::of(g.modalities().into_iter().filter(|(m, _)| kept(*m)));
    let engine = Engine::create(dir, schema).expect("create engine");
    for mut b in g.batches(4096) {
        edit(&mut b.records);
        b.records.blocks.retain(|blk| kept(blk.modality));
        // A record left without any template (possible when modalities are dropped) is not enrollable.
        let keep_rows: Vec<bool> = (0..b.records.len())
            .map(|i| b.records.blocks.iter().any(|blk| blk.present[i]))
            .collect();
        if keep_rows.iter().all(|&k| k) {
            engine.insert_records(&b.records).expect("insert");
        } else {
            engine
                .insert_records(&filter_rows(&b.records, &keep_rows))
                .expect("insert");
        }
    }
    let snap = engine.snapshot();
    let truth = g
        .truth_pairs()
        .into_iter()
        .map(|t| (g.subject_id(t.a), g.subject_id(t.b)))
        .filter(|(a, b)| snap.row_of(a).is_some() && snap.row_of(b).is_some())
        .collect();
    Loaded { engine, truth }
}

/// Keeps the rows of `b` where `keep` is true.
pub fn filter_rows(b: &pacha_datasets::RecordBatch, keep: &[bool]) -> pacha_datasets::RecordBatch {
    let idx: Vec<usize> = (0..b.len()).filter(|&i| keep[i]).collect();
    pacha_datasets::RecordBatch {
        ids: idx.iter().map(|&i| b.ids[i].clone()).collect(),
        blocks: b
            .blocks
            .iter()
            .map(|blk| pacha_datasets::ModalityBlock {
                modality: blk.modality,
                dim: blk.dim,
                data: idx
                    .iter()
                    .flat_map(|&i| blk.row(i).iter().copied())
                    .collect(),
                present: idx.iter().map(|&i| blk.present[i]).collect(),
                quality: idx.iter().map(|&i| blk.quality[i]).collect(),
            })
            .collect(),
    }
}

/// The `pacha` binary built by `cargo test --workspace` (pacha-cli's integration tests make cargo build it),
/// or the one `PACHA_BIN` names (e.g. a copy, when several checkouts share one target directory).
pub fn pacha_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PACHA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/pacha
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let bin = dir.join(format!("pacha{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not found: run the suite with `cargo test --workspace` so the pacha binary is built",
        bin.display()
    );
    bin
}

/// A test part that cannot run on this machine (`why`): skipped with a message on a developer's machine, a
/// failure under CI (`CI=true`), where `.ci/run` installs what the tests need.
#[allow(clippy::print_stderr)]
pub fn cannot_run(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}, and CI=true: CI must run every test");
    }
    eprintln!("skipped: {why}");
}

/// Runs the `pacha` binary ([`pacha_bin`]) with `args` and waits for it.
pub fn run_pacha(args: &[&str]) -> std::process::Output {
    std::process::Command::new(pacha_bin())
        .args(args)
        .output()
        .expect("run pacha")
}

/// The JSON object a `--json` command printed as its last stdout line (panics, with its stderr, if none).
pub fn json_of(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_else(|| {
        panic!(
            "no stdout; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text}"))
}

/// Runs `pacha args`, asserts that it succeeded, and returns its JSON line.
pub fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = run_pacha(args);
    assert!(
        out.status.success(),
        "pacha {args:?} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    json_of(&out)
}

/// A path as a command-line argument.
pub fn path_arg(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Loads only the first `n` records of `cfg`'s population (all modalities) and returns the generator, so a
/// test can insert later records of the same population itself.
pub fn load_first(dir: &Path, cfg: &PopulationConfig, n: u64) -> (Loaded, Generator) {
    let g = Generator::new(cfg.clone()).expect("valid config");
    let schema = Schema::of(g.modalities());
    let engine = Engine::create(dir, schema).expect("create engine");
    let mut start = 0;
    while start < n {
        let count = (n - start).min(4096) as usize;
        engine
            .insert_records(&g.generate(start, count).records)
            .expect("insert");
        start += count as u64;
    }
    let truth = g
        .truth_pairs()
        .into_iter()
        .filter(|t| t.b < n)
        .map(|t| (g.subject_id(t.a), g.subject_id(t.b)))
        .collect();
    (Loaded { engine, truth }, g)
}

/// Every file under `dir` (recursively) with its size, modification time (ns), inode and a hash of its
/// content: two equal fingerprints mean nothing in the directory was written, truncated, replaced, created
/// or removed in between.
pub fn fingerprint(dir: &Path) -> std::collections::BTreeMap<PathBuf, (u64, i128, u64, u64)> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list store directory") {
            let p = e.expect("directory entry").path();
            let m = std::fs::symlink_metadata(&p).expect("stat");
            if m.is_dir() {
                stack.push(p);
                continue;
            }
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&p).expect("read file").hash(&mut h);
            let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
            out.insert(p, (m.len(), mtime, m.ino(), h.finish()));
        }
    }
    out
}

/// The process holding an exclusive `flock` on `path` (from `/proc/locks`), if any. Lets a test wait until a
/// child writer has really taken a store's `LOCK`, without touching the lock itself.
pub fn exclusive_flock_holder(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").expect("read /proc/locks");
    // e.g. "1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234567 0 EOF"
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let ours = f.len() >= 6
            && f[1] == "FLOCK"
            && f[3] == "WRITE"
            && f[5].rsplit(':').next() == Some(ino.to_string().as_str());
        if ours { f[4].parse().ok() } else { None }
    })
}

/// Removes the timings (`*seconds`, `records_per_second`) from a summary: what measures one execution rather
/// than the run's result.
pub fn strip_timings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| !k.ends_with("seconds") && k != "records_per_second");
            m.values_mut().for_each(strip_timings);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_timings),
        _ => {}
    }
}

/// Asserts that two run directories hold the same results: the three output files byte for byte, the
/// summary equal but for what [`strip_timings`] removes.
pub fn assert_same_run(a: &Path, b: &Path) {
    for f in ["hits.csv", "hits.jsonl", "clusters.csv"] {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(
            x == y,
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
    let summary = |d: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("summary.json")).unwrap()).unwrap();
        strip_timings(&mut v);
        v
    };
    assert_eq!(
        summary(a),
        summary(b),
        "summary.json differs beyond timings"
    );
}
