//! The store's write layer: every call that changes a store directory on disk goes through here.
//!
//! Creating a file, writing bytes at an offset, truncating, fsyncing a file, renaming, removing and
//! fsyncing the directory: the store makes no other kind of change (its memory maps are read-only). In a
//! normal build each function is the plain `std` call. In the engine's unit tests a thread-local recorder
//! ([`trace`]) can be switched on: it logs every operation on the traced directory, in order, with the
//! bytes written, and a copy of the directory's files after each operation. The power-loss harness
//! (`store/powerloss.rs`) rebuilds from that log the states a power cut could leave on disk; the copies let
//! it prove that the log explains every byte on disk, so a write that bypassed this layer would fail the
//! harness instead of going unseen.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Opens `path` read-write, creating it (mode 0600) when missing and truncating it when `truncate`.
pub(crate) fn create(path: &Path, truncate: bool) -> io::Result<File> {
    #[cfg(test)]
    let existed = path.exists();
    let f = crate::fsutil::private_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)?;
    #[cfg(test)]
    {
        if !existed {
            trace::record(path, trace::Op::Create);
        } else if truncate {
            trace::record(path, |name| trace::Op::SetLen(name, 0));
        }
    }
    Ok(f)
}

/// Writes all of `buf` at `offset` of `f` (the file at `path`).
pub(crate) fn write_at(f: &File, path: &Path, buf: &[u8], offset: u64) -> io::Result<()> {
    f.write_all_at(buf, offset)?;
    #[cfg(not(test))]
    let _ = path;
    #[cfg(test)]
    trace::record(path, |name| trace::Op::Write(name, offset, buf.to_vec()));
    Ok(())
}

/// Sets the length of `f` (the file at `path`) to `len`.
pub(crate) fn set_len(f: &File, path: &Path, len: u64) -> io::Result<()> {
    f.set_len(len)?;
    #[cfg(not(test))]
    let _ = path;
    #[cfg(test)]
    trace::record(path, |name| trace::Op::SetLen(name, len));
    Ok(())
}

/// fsyncs the data of `f` (the file at `path`) and the metadata needed to read it back (`fdatasync`).
pub(crate) fn sync_data(f: &File, path: &Path) -> io::Result<()> {
    #[cfg(test)]
    if trace::skip(trace::Skip::FileSync) {
        return Ok(());
    }
    f.sync_data()?;
    #[cfg(test)]
    trace::record(path, trace::Op::Fsync);
    #[cfg(not(test))]
    let _ = path;
    Ok(())
}

/// fsyncs `f` (the file at `path`), data and metadata (`fsync`).
pub(crate) fn sync_all(f: &File, path: &Path) -> io::Result<()> {
    #[cfg(test)]
    if trace::skip(trace::Skip::FileSync) {
        return Ok(());
    }
    f.sync_all()?;
    #[cfg(test)]
    trace::record(path, trace::Op::Fsync);
    #[cfg(not(test))]
    let _ = path;
    Ok(())
}

/// Renames `from` to `to` (replacing `to` atomically); durable only after [`sync_dir`].
pub(crate) fn rename(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    #[cfg(test)]
    trace::record(from, |name| {
        let to = to
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        trace::Op::Rename(name, to)
    });
    Ok(())
}

/// Removes the file at `path`; durable only after [`sync_dir`].
pub(crate) fn remove(path: &Path) -> io::Result<()> {
    std::fs::remove_file(path)?;
    #[cfg(test)]
    trace::record(path, trace::Op::Remove);
    Ok(())
}

/// fsyncs the directory `dir`, making creations, renames and removals in it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    if trace::skip(trace::Skip::DirSync) {
        return Ok(());
    }
    File::open(dir)?.sync_all()?;
    #[cfg(test)]
    trace::record_dir(dir);
    Ok(())
}

/// The test-only recorder behind the write layer (see the module docs).
#[cfg(test)]
pub(crate) mod trace {
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    /// One recorded operation on a file of the traced directory (files named by their name in it).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) enum Op {
        /// A new, empty file.
        Create(String),
        /// Bytes written at an offset.
        Write(String, u64, Vec<u8>),
        /// Length set (truncation or extension with zeros).
        SetLen(String, u64),
        /// `fsync`/`fdatasync` of the file.
        Fsync(String),
        /// Rename of the first name to the second (replacing it).
        Rename(String, String),
        /// Unlink.
        Remove(String),
        /// `fsync` of the directory.
        SyncDir,
        /// A harness marker (no disk effect), e.g. "insert 3 returned".
        Mark(usize),
    }

    /// The files of a directory: name to contents.
    pub(crate) type Files = BTreeMap<String, Vec<u8>>;

    /// Everything recorded: operations in order and the directory's files after each.
    #[derive(Default)]
    pub(crate) struct Trace {
        /// The operations, in order.
        pub ops: Vec<Op>,
        /// `disk[k]`: the traced directory's files right after `ops[k]`.
        pub disk: Vec<Files>,
    }

    struct Recorder {
        dir: PathBuf,
        trace: Trace,
    }

    thread_local! {
        static REC: RefCell<Option<Recorder>> = const { RefCell::new(None) };
        static SKIP: Cell<Option<Skip>> = const { Cell::new(None) };
    }

    /// A sync the write layer can be told to leave out (to show the harness catches a missing one).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Skip {
        /// Every file fsync.
        FileSync,
        /// Every directory fsync.
        DirSync,
    }

    /// Makes the write layer on this thread leave out `what` (or nothing with `None`).
    pub(crate) fn set_skip(what: Option<Skip>) {
        SKIP.with(|s| s.set(what));
    }

    pub(super) fn skip(what: Skip) -> bool {
        SKIP.with(|s| s.get()) == Some(what)
    }

    /// The regular files directly in `dir`, read whole.
    pub(crate) fn read_files(dir: &Path) -> Files {
        let mut out = Files::new();
        for e in std::fs::read_dir(dir).expect("listing the traced directory") {
            let e = e.expect("listing the traced directory");
            if e.file_type().expect("file type").is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                out.insert(
                    name,
                    std::fs::read(e.path()).expect("reading a traced file"),
                );
            }
        }
        out
    }

    /// Starts recording operations on files directly in `dir` on this thread.
    pub(crate) fn start(dir: &Path) {
        REC.with(|r| {
            *r.borrow_mut() = Some(Recorder {
                dir: dir.to_path_buf(),
                trace: Trace::default(),
            })
        });
    }

    /// Stops recording and returns what was recorded.
    pub(crate) fn stop() -> Trace {
        REC.with(|r| r.borrow_mut().take())
            .map(|r| r.trace)
            .unwrap_or_default()
    }

    /// Records a harness marker.
    pub(crate) fn mark(m: usize) {
        REC.with(|r| {
            if let Some(rec) = r.borrow_mut().as_mut() {
                let files = read_files(&rec.dir);
                rec.trace.ops.push(Op::Mark(m));
                rec.trace.disk.push(files);
            }
        });
    }

    fn push(rec: &mut Recorder, op: Op) {
        let files = read_files(&rec.dir);
        rec.trace.ops.push(op);
        rec.trace.disk.push(files);
    }

    /// Records `op(name)` when `path` is a file directly in the traced directory.
    pub(super) fn record(path: &Path, op: impl FnOnce(String) -> Op) {
        REC.with(|r| {
            let mut r = r.borrow_mut();
            let Some(rec) = r.as_mut() else { return };
            if path.parent() != Some(rec.dir.as_path()) {
                return;
            }
            let Some(name) = path.file_name() else { return };
            let op = op(name.to_string_lossy().into_owned());
            push(rec, op);
        });
    }

    /// Records a directory fsync when `dir` is the traced directory.
    pub(super) fn record_dir(dir: &Path) {
        REC.with(|r| {
            let mut r = r.borrow_mut();
            let Some(rec) = r.as_mut() else { return };
            if dir == rec.dir {
                push(rec, Op::SyncDir);
            }
        });
    }
}
