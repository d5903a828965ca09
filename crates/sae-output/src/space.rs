//! Free disk and memory, checked before writing or allocating something large, so a size
//! given by a user or read from a file is refused up front with the estimate in the message,
//! instead of filling the disk or aborting the process on allocation.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{what} needs about {} of disk but {} has only {} free; {fix}", human_bytes(*.need), .dir.display(), human_bytes(*.free))]
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

/// The product of sizes, `None` when it overflows 64 bits.
pub fn product(sizes: &[usize]) -> Option<u64> {
    sizes
        .iter()
        .try_fold(1u64, |acc, &s| acc.checked_mul(s as u64))
}

/// Bytes available for new allocations: `MemAvailable` from /proc/meminfo, lowered to what the
/// process's cgroup (v2) still allows when it has a limit. `None` where neither can be read.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let system = meminfo.as_deref().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    });
    match (system, cgroup_headroom()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `memory.max - memory.current` of this process's cgroup, when it has a limit.
fn cgroup_headroom() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = groups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    // "max" (no limit) does not parse, which is the answer.
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{what} needs more than 2^64 bytes of memory; {fix}")]
    Overflow { what: String, fix: String },
    #[error("{what} needs about {} of memory but only {} is available; {fix}", human_bytes(*.need), human_bytes(*.available))]
    TooLarge {
        what: String,
        need: u64,
        available: u64,
        fix: String,
    },
}

/// Refuses `need` bytes (`None`: a size that overflowed) when they cannot be allocated.
/// `what` says what needs them and `fix` what to change; both go into the message.
pub fn ensure_memory(need: Option<u64>, what: &str, fix: &str) -> Result<(), MemoryError> {
    let Some(need) = need else {
        return Err(MemoryError::Overflow {
            what: what.into(),
            fix: fix.into(),
        });
    };
    match available_memory() {
        Some(available) if need > available => Err(MemoryError::TooLarge {
            what: what.into(),
            need,
            available,
            fix: fix.into(),
        }),
        _ => Ok(()),
    }
}

/// `512 bytes`, `3.0 GiB`: the largest binary unit that keeps the number at least 1.
pub fn human_bytes(n: u64) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
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
    fn sizes_products_and_memory() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(product(&[3, 4, 5]), Some(60));
        assert_eq!(product(&[usize::MAX, 2]), None);
        // Linux always reports MemAvailable; a machine running these tests has some.
        if cfg!(target_os = "linux") {
            assert!(available_memory().unwrap() > 0);
        }
        assert!(ensure_memory(Some(1), "one byte", "").is_ok());
        let e = ensure_memory(Some(u64::MAX), "everything", "ask for less").unwrap_err();
        let e = e.to_string();
        assert!(e.contains("16.0 EiB") && e.contains("ask for less"), "{e}");
        let e = ensure_memory(None, "overflow", "ask for less").unwrap_err();
        assert!(e.to_string().contains("2^64"), "{e}");
    }
}
