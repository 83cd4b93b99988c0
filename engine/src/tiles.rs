//! Tiled runs on many machines: a tile's directory, the run manifest every run carries, and the merge.
//!
//! `pacha dedup --tile I/N` runs one [`TileSpec`] of a dedup ([`crate::dedup::run_part`]) and writes a
//! **tile directory**: `part.json` (the part's counters, audit evidence and the run's setup), `pairs.jsonl`
//! (its pairs) and, last, `manifest.json`. `pacha merge` reads the tile directories of one run, checks them
//! ([`read_tile`]: the manifest's own checksum, each file's length and crc32, every tile `0..N` exactly
//! once, all of one setup — store, index and calibration identity, parameters, version) and writes the
//! merged run, whose `hits.csv`, `hits.jsonl`, `clusters.csv` and `summary.json` (timings aside) are byte
//! for byte those of a single-process run of the same store: one process is the one-tile case of the same
//! [`crate::dedup::assemble`].
//!
//! Every run directory (single process or merged) also gets a `manifest.json` ([`RunManifest`]): what the
//! run was derived from, its parameters, the pacha version, SIMD level, threads, host, start and end, and a
//! checksum of each output file — the evidence that lets a reviewer check a result later.

use crate::EngineError;
use crate::dedup::{DedupPair, DedupResult, RunParameters, RunPart, TileSpec};
use crate::identity::RunIdentity;
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Format tag of run manifests.
pub const MANIFEST_FORMAT: &str = "pacha-run-manifest/1";
/// The manifest's file name in a run or tile directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// A tile's part file.
pub const PART_FILE: &str = "part.json";
/// A tile's pairs file.
pub const PAIRS_FILE: &str = "pairs.jsonl";

/// One output file's size and checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    /// File name within the run directory.
    pub name: String,
    /// Length in bytes.
    pub bytes: u64,
    /// crc32 of the contents, hex.
    pub crc32: String,
}

/// The evidence a run directory carries about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunManifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// `"tile"` (one part of a run) or `"run"` (a whole run: one process, or merged tiles).
    pub kind: String,
    /// pacha version.
    pub pacha_version: String,
    /// SIMD level of the kernels.
    pub simd: String,
    /// Worker threads.
    pub threads: usize,
    /// Host name.
    pub host: String,
    /// The tile (`kind = "tile"`), or `0/N` for a whole run of `N` tiles.
    pub tile: TileSpec,
    /// Start, seconds since the Unix epoch.
    pub started_unix: f64,
    /// End, seconds since the Unix epoch.
    pub finished_unix: f64,
    /// Store, index and calibration identity.
    pub identity: RunIdentity,
    /// The run's parameters.
    pub parameters: RunParameters,
    /// Output files with their checksums.
    pub files: Vec<FileSum>,
    /// For a merged run: the checksums of the tile manifests it was merged from, in tile order.
    pub sources: Vec<String>,
    /// crc32 of this manifest serialised with this field empty.
    pub checksum: String,
}

impl RunManifest {
    /// A manifest of `kind` for a run with `identity` and `parameters` (files and checksum filled later).
    pub fn new(
        kind: &str,
        tile: TileSpec,
        identity: RunIdentity,
        parameters: RunParameters,
        started_unix: f64,
    ) -> RunManifest {
        RunManifest {
            format: MANIFEST_FORMAT.into(),
            kind: kind.into(),
            pacha_version: env!("CARGO_PKG_VERSION").into(),
            simd: pacha_index::kernels::simd_level().into(),
            threads: rayon::current_num_threads(),
            host: host_name(),
            tile,
            started_unix,
            finished_unix: started_unix,
            identity,
            parameters,
            files: Vec::new(),
            sources: Vec::new(),
            checksum: String::new(),
        }
    }

    /// The checksum of this manifest's content (everything but `checksum`).
    fn content_checksum(&self) -> Result<String, EngineError> {
        let bare = RunManifest {
            checksum: String::new(),
            ..self.clone()
        };
        let bytes = serde_json::to_vec(&bare)
            .map_err(|e| EngineError::InvalidArgument(format!("cannot serialise manifest: {e}")))?;
        Ok(format!("{:08x}", crc32fast::hash(&bytes)))
    }

    /// Sums each of `names` in `dir`, stamps the end time and the checksum, and writes the manifest into
    /// `dir` atomically (last: a directory without a manifest is unfinished).
    pub fn seal(mut self, dir: &Path, names: &[&str]) -> Result<RunManifest, EngineError> {
        self.files = names
            .iter()
            .map(|n| {
                let p = dir.join(n);
                let bytes = std::fs::read(&p).map_err(|e| EngineError::io("reading", &p, e))?;
                Ok(FileSum {
                    name: (*n).to_string(),
                    bytes: bytes.len() as u64,
                    crc32: format!("{:08x}", crc32fast::hash(&bytes)),
                })
            })
            .collect::<Result<_, EngineError>>()?;
        self.finished_unix = unix_now();
        self.checksum = self.content_checksum()?;
        let p = dir.join(MANIFEST_FILE);
        let bytes = serde_json::to_vec_pretty(&self)
            .map_err(|e| EngineError::io("writing", &p, e.into()))?;
        crate::fsutil::write_atomic(&p, &bytes)?;
        Ok(self)
    }

    /// Reads and checks the manifest in `dir`: its own checksum and every listed file's length and crc32.
    pub fn verify(dir: &Path) -> Result<RunManifest, EngineError> {
        let p = dir.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::Tiles(format!(
                    "{} has no {MANIFEST_FILE}: the run or tile did not finish (run it again)",
                    dir.display()
                )));
            }
            Err(e) => return Err(EngineError::io("reading", &p, e)),
        };
        let m: RunManifest = serde_json::from_slice(&bytes).map_err(|e| {
            EngineError::Tiles(format!("{} is not a run manifest: {e}", p.display()))
        })?;
        if m.format != MANIFEST_FORMAT {
            return Err(EngineError::Tiles(format!(
                "{} has format {:?}, this pacha reads {MANIFEST_FORMAT:?}",
                p.display(),
                m.format
            )));
        }
        let want = m.content_checksum()?;
        if m.checksum != want {
            return Err(EngineError::Tiles(format!(
                "{} was altered after it was written (its checksum {} does not match its content {want})",
                p.display(),
                m.checksum
            )));
        }
        for f in &m.files {
            if f.name.contains('/') || f.name.contains("..") {
                return Err(EngineError::Tiles(format!(
                    "{} lists a file outside its directory: {:?}",
                    p.display(),
                    f.name
                )));
            }
            let fp = dir.join(&f.name);
            let data = match std::fs::read(&fp) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(EngineError::Tiles(format!(
                        "{} is missing (listed in {})",
                        fp.display(),
                        p.display()
                    )));
                }
                Err(e) => return Err(EngineError::io("reading", &fp, e)),
            };
            let crc = format!("{:08x}", crc32fast::hash(&data));
            if data.len() as u64 != f.bytes || crc != f.crc32 {
                return Err(EngineError::Tiles(format!(
                    "{} is damaged: {} bytes with crc32 {crc}, the manifest says {} bytes with crc32 {}",
                    fp.display(),
                    data.len(),
                    f.bytes,
                    f.crc32
                )));
            }
        }
        Ok(m)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's host name (`unknown` when it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Writes `part` as a tile directory `dir` (created if needed; a previous tile there is replaced). The
/// manifest is removed first and written last, so a tile killed while writing is never taken as finished.
pub fn write_tile(
    dir: &Path,
    part: &RunPart,
    started_unix: f64,
) -> Result<RunManifest, EngineError> {
    crate::fsutil::create_private_dir_all(dir).map_err(|e| EngineError::io("creating", dir, e))?;
    let mp = dir.join(MANIFEST_FILE);
    match std::fs::remove_file(&mp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(EngineError::io("removing", &mp, e)),
    }
    let p = dir.join(PAIRS_FILE);
    crate::runio::write_pairs_jsonl(&p, &part.pairs)?
        .sync_all()
        .map_err(|e| EngineError::io("writing", &p, e))?;
    let p = dir.join(PART_FILE);
    let bytes =
        serde_json::to_vec_pretty(part).map_err(|e| EngineError::io("writing", &p, e.into()))?;
    crate::fsutil::write_atomic(&p, &bytes)?;
    RunManifest::new(
        "tile",
        part.tile,
        part.setup.identity.clone(),
        part.setup.parameters.clone(),
        started_unix,
    )
    .seal(dir, &[PART_FILE, PAIRS_FILE])
}

/// Reads and checks the tile directory `dir`: its manifest (checksum, files), its part and its pairs, and
/// that they agree with each other.
pub fn read_tile(dir: &Path) -> Result<(RunManifest, RunPart), EngineError> {
    let m = RunManifest::verify(dir)?;
    if m.kind != "tile" {
        return Err(EngineError::Tiles(format!(
            "{} holds a {} manifest, not a tile's",
            dir.display(),
            m.kind
        )));
    }
    for need in [PART_FILE, PAIRS_FILE] {
        if !m.files.iter().any(|f| f.name == need) {
            return Err(EngineError::Tiles(format!(
                "{}'s manifest does not list {need}",
                dir.display()
            )));
        }
    }
    let p = dir.join(PART_FILE);
    let bytes = std::fs::read(&p).map_err(|e| EngineError::io("reading", &p, e))?;
    let mut part: RunPart = serde_json::from_slice(&bytes)
        .map_err(|e| EngineError::Tiles(format!("{} is not a tile's part: {e}", p.display())))?;
    let p = dir.join(PAIRS_FILE);
    let f = std::fs::File::open(&p).map_err(|e| EngineError::io("reading", &p, e))?;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| EngineError::io("reading", &p, e))?;
        let pair: DedupPair = serde_json::from_str(&line)
            .map_err(|e| EngineError::Tiles(format!("{} line {}: {e}", p.display(), i + 1)))?;
        part.pairs.push(pair);
    }
    if m.tile != part.tile
        || m.identity != part.setup.identity
        || m.parameters != part.setup.parameters
    {
        return Err(EngineError::Tiles(format!(
            "{}: the manifest (tile {}) and the part (tile {}) describe different runs",
            dir.display(),
            m.tile,
            part.tile
        )));
    }
    Ok((m, part))
}

/// A merged run, checked and assembled, ready to be written.
pub struct Merged {
    /// The run's result, as one process would give it.
    pub result: DedupResult,
    /// The tiles' manifests, in tile order.
    pub tiles: Vec<RunManifest>,
    /// The tile directories, in tile order.
    pub dirs: Vec<PathBuf>,
}

/// Reads, checks and assembles the tile directories `dirs` of one run (see the module docs). Refuses
/// ([`EngineError::Tiles`]) a missing, duplicated, foreign or damaged tile, naming it; writes nothing.
pub fn merge_tiles(dirs: &[PathBuf]) -> Result<Merged, EngineError> {
    let mut read = Vec::with_capacity(dirs.len());
    for d in dirs {
        let (m, p) = read_tile(d)?;
        read.push((m, p, d.clone()));
    }
    read.sort_by_key(|(m, _, _)| m.tile.index);
    for w in read.windows(2) {
        if w[0].0.tile == w[1].0.tile {
            return Err(EngineError::Tiles(format!(
                "tile {} is given twice: {} and {}",
                w[0].0.tile,
                w[0].2.display(),
                w[1].2.display()
            )));
        }
    }
    let mut tiles = Vec::with_capacity(read.len());
    let mut parts = Vec::with_capacity(read.len());
    let mut out_dirs = Vec::with_capacity(read.len());
    for (m, p, d) in read {
        tiles.push(m);
        parts.push(p);
        out_dirs.push(d);
    }
    let result = crate::dedup::assemble(parts)?;
    Ok(Merged {
        result,
        tiles,
        dirs: out_dirs,
    })
}

/// The files a whole run's manifest sums with CSV tables (see [`crate::runio::OutputFormat::run_files`]).
pub const RUN_FILES: [&str; 4] = ["hits.csv", "hits.jsonl", "clusters.csv", "summary.json"];

/// Writes a whole run (its files by [`crate::runio::write_run`], then its manifest) into `dir`, with CSV
/// tables ([`write_whole_run_as`] chooses). `tiles`: the manifests of the tiles it was merged from (empty
/// for a single process).
pub fn write_whole_run(
    dir: &Path,
    result: &DedupResult,
    parameters: RunParameters,
    started_unix: f64,
    tiles: &[RunManifest],
) -> Result<RunManifest, EngineError> {
    write_whole_run_as(
        dir,
        result,
        parameters,
        started_unix,
        tiles,
        crate::runio::OutputFormat::Csv,
    )
}

/// [`write_whole_run`] with tables in `format`: the manifest sums every file written
/// ([`crate::runio::OutputFormat::run_files`]), the Parquet tables included.
pub fn write_whole_run_as(
    dir: &Path,
    result: &DedupResult,
    parameters: RunParameters,
    started_unix: f64,
    tiles: &[RunManifest],
    format: crate::runio::OutputFormat,
) -> Result<RunManifest, EngineError> {
    // A previous run's tables of the other format would be left beside the new ones, unsummed: remove them.
    for stale in [
        "hits.csv",
        "clusters.csv",
        "hits.parquet",
        "clusters.parquet",
    ] {
        let p = dir.join(stale);
        if !format.run_files().contains(&stale) && p.exists() {
            std::fs::remove_file(&p).map_err(|e| EngineError::io("removing", &p, e))?;
        }
    }
    let files = crate::runio::write_run_as(dir, result, format)?;
    let mut m = RunManifest::new(
        "run",
        TileSpec {
            index: 0,
            count: tiles.len().max(1),
        },
        result.summary.identity.clone(),
        parameters,
        started_unix,
    );
    m.sources = tiles.iter().map(|t| t.checksum.clone()).collect();
    m.seal(dir, &files)
}
