//! Whole-file and whole-directory replacement: the new content is written beside the target
//! and renamed into place, so a failure at any point leaves the old content as it was.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn name_of(path: &Path) -> io::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a file or directory name", path.display()),
            )
        })
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// A hidden sibling of `path` for this process: `.NAME.TAG-PID`.
pub fn sibling(path: &Path, tag: &str) -> io::Result<PathBuf> {
    Ok(parent_of(path).join(format!(".{}.{tag}-{}", name_of(path)?, std::process::id())))
}

/// Writes `bytes` to a file and syncs it to disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| with_path(e, "creating", path))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| with_path(e, "writing", path))
}

/// Writes a file atomically: a synced temporary sibling, then a rename over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = sibling(path, "tmp")?;
    if let Err(e) = write_synced(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        with_path(e, "renaming into", path)
    })
}

/// Replaces directory `dir` as a whole: `fill` writes a temporary sibling, which is renamed
/// into place once complete; an existing `dir` is moved aside first and put back if that
/// rename fails. Whether `dir` may be replaced at all is the caller's check
/// ([`crate::check_output`]), made before this.
pub fn replace_dir<E: From<io::Error>>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(&parent).map_err(|e| with_path(e, "creating", &parent))?;
    let tmp = sibling(dir, "tmp")?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| with_path(e, "creating", &tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = sibling(dir, "old")?;
    let had_old = std::fs::symlink_metadata(dir).is_ok();
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
        if let Err(e) = std::fs::rename(dir, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(with_path(e, "moving aside the previous", dir).into());
        }
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(with_path(e, "renaming into", dir).into());
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_the_old_directory_and_no_temporary() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("out");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a"), b"old").unwrap();
        let r: Result<(), io::Error> = replace_dir(&dir, |tmp| {
            std::fs::write(tmp.join("a"), b"new")?;
            Err(io::Error::other("disk full"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only out/ is left");
    }

    #[test]
    fn a_complete_fill_replaces_the_directory_whole() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("out");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("stale"), b"x").unwrap();
        replace_dir::<io::Error>(&dir, |tmp| std::fs::write(tmp.join("a"), b"new")).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"new");
        assert!(!dir.join("stale").exists());
        write_atomic(&dir.join("a"), b"newer").unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"newer");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
    }
}
