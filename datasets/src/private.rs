//! Private files: every file pacha creates is mode 0600 and every directory 0700, whatever the umask.
//!
//! Biometric templates and anything derived from them (hit lists, clusters, checkpoints, generated
//! populations) must not be readable by other users of the machine. These helpers are the one place that
//! creates files and directories; the engine re-exports them as `pacha_engine::fsutil`.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every file pacha creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory pacha creates.
pub const DIR_MODE: u32 = 0o700;

/// Open options that create files with mode 0600 (`read`/`write`/`create`/`truncate` left to the caller).
pub fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates (or truncates) `path` for writing with mode 0600; a file that already existed with another mode
/// is set to 0600 too.
pub fn create_private(path: &Path) -> io::Result<File> {
    let f = private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    restrict_file(&f)?;
    Ok(f)
}

/// Sets an open file's mode to 0600 (a no-op when it already is).
pub fn restrict_file(f: &File) -> io::Result<()> {
    if f.metadata()?.permissions().mode() & 0o7777 != FILE_MODE {
        f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` (created 0600 or truncated and set to 0600), like `std::fs::write`.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    create_private(path)?.write_all(bytes)
}

/// Creates `dir` and any missing parents with mode 0700 (the umask cannot widen or narrow it); directories
/// that already exist are left as they are.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut p = Some(dir);
    while let Some(d) = p.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d.to_path_buf());
        p = d.parent();
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    // DirBuilder's mode is filtered by the umask: set it explicitly on every directory created here.
    for d in missing {
        std::fs::set_permissions(&d, Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_dirs_get_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("a/b/c");
        create_private_dir_all(&d).unwrap();
        for p in [tmp.path().join("a"), tmp.path().join("a/b"), d.clone()] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, DIR_MODE, "{}", p.display());
        }
        let f = d.join("x");
        std::fs::write(&f, b"old").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        write_private(&f, b"new").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"new");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, FILE_MODE);
    }
}
