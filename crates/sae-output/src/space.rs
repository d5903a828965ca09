//! Free space, checked before writing something large, so a command refuses up front instead
//! of filling the disk.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{what} needs about {} but {} has {} free; {fix}", human_bytes(*.need), .dir.display(), human_bytes(*.free))]
pub struct SpaceError {
    pub what: String,
    pub dir: PathBuf,
    pub need: u64,
    pub free: u64,
    pub fix: String,
}

/// Bytes free to this user on the file system that holds `path` (or its nearest existing
/// ancestor); `None` where that cannot be read.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let mut p = if path.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        path.to_path_buf()
    };
    while std::fs::symlink_metadata(&p).is_err() {
        p = match p.parent() {
            Some(q) if !q.as_os_str().is_empty() => q.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if p == Path::new(".") {
            break;
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
}

/// Refuses when `need` bytes (plus a margin of 1% and 64 MiB, for the file system's own use)
/// do not fit in the free space at `dir`.
pub fn ensure_space(dir: &Path, need: u64, what: &str, fix: &str) -> Result<(), SpaceError> {
    let Some(free) = free_bytes(dir) else {
        return Ok(());
    };
    let want = need.saturating_add(need / 100).saturating_add(64 << 20);
    if want > free {
        return Err(SpaceError {
            what: what.to_string(),
            dir: dir.to_path_buf(),
            need,
            free,
            fix: fix.to_string(),
        });
    }
    Ok(())
}

/// `1.5 GB`, `320 MB`, `12 KB`, `9 B` (powers of 1000).
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_the_disk_is_refused_with_the_estimate() {
        let t = tempfile::tempdir().unwrap();
        let free = free_bytes(t.path()).expect("statvfs works here");
        assert!(free > 0);
        assert!(ensure_space(t.path(), 1 << 10, "a small file", "").is_ok());
        let e = ensure_space(
            &t.path().join("not/yet"),
            free * 2,
            "the analysis",
            "lower --top-k",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&human_bytes(free * 2)), "{msg}");
        assert!(msg.contains("lower --top-k"), "{msg}");
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(9), "9 B");
        assert_eq!(human_bytes(1_500_000_000), "1.5 GB");
        assert_eq!(human_bytes(u64::MAX), "18.4 EB");
    }
}
