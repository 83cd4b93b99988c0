//! Small durable-file helpers shared by the engine's side files (calibration, checkpoints), and the private
//! file/directory helpers (mode 0600 / 0700 whatever the umask) every pacha crate creates files with.

use crate::EngineError;
pub use pacha_datasets::private::{
    DIR_MODE, FILE_MODE, create_private, create_private_dir_all, private_options, restrict_file,
    write_private,
};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Writes `bytes` to `path` atomically and durably (mode 0600): temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let io = |e| EngineError::io("writing", path, e);
    {
        let mut f = create_private(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| EngineError::io("accessing", dir, e))
}

/// Identity and change times of the file at `path`; `None` if it cannot be examined (e.g. it is missing).
fn stamp(path: &Path) -> Option<[i64; 7]> {
    let m = std::fs::metadata(path).ok()?;
    Some([
        m.dev() as i64,
        m.ino() as i64,
        m.len() as i64,
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ])
}

/// Runs `load`, which reads a set of side files of the store in `dir` that a writer publishes by atomically
/// replacing `marker` last, and runs it again while `marker` changes under it (a writer replacing the set
/// concurrently, e.g. an index build or a compaction beside a read-only open). An error of `load` is
/// returned as is when `marker` did not change; after three unstable loads the result is
/// [`EngineError::StoreChanged`]. Writes nothing.
pub(crate) fn load_stable<T>(
    dir: &Path,
    marker: &Path,
    mut load: impl FnMut() -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    const ATTEMPTS: usize = 3;
    for _ in 0..ATTEMPTS {
        let before = stamp(marker);
        let result = load();
        if stamp(marker) == before {
            return result;
        }
        tracing::info!(file = %marker.display(), "side file replaced while being read; reloading");
    }
    Err(EngineError::StoreChanged {
        dir: dir.to_path_buf(),
        attempts: ATTEMPTS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_stable_reloads_while_the_marker_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("index.json");
        write_atomic(&marker, b"{}").unwrap();
        // Replaced during the first load only: loaded twice, the second result returned.
        let mut calls = 0;
        let got = load_stable(tmp.path(), &marker, || {
            calls += 1;
            if calls == 1 {
                write_atomic(&marker, b"{\"v\": 2}").unwrap();
            }
            Ok::<_, EngineError>(calls)
        });
        assert_eq!((got.unwrap(), calls), (2, 2));
        // A marker that appears during the load counts as a change too.
        let fresh = tmp.path().join("fresh.json");
        let mut calls = 0;
        let got = load_stable(tmp.path(), &fresh, || {
            calls += 1;
            if calls == 1 {
                write_atomic(&fresh, b"{}").unwrap();
            }
            Ok::<_, EngineError>(calls)
        });
        assert_eq!(got.unwrap(), 2);
        // Always replaced: a retryable error after three loads.
        let mut calls = 0;
        let got = load_stable(tmp.path(), &marker, || {
            calls += 1;
            write_atomic(&marker, format!("{calls}").as_bytes())?;
            Ok(())
        });
        assert!(matches!(
            got,
            Err(EngineError::StoreChanged { attempts: 3, .. })
        ));
        assert_eq!(calls, 3);
        // A stable marker: one load, its error returned as is.
        let got: Result<(), _> = load_stable(tmp.path(), &marker, || {
            Err(EngineError::InvalidArgument("x".into()))
        });
        assert!(matches!(got, Err(EngineError::InvalidArgument(_))));
    }
}
