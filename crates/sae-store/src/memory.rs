//! How much memory a new allocation can take (and how much disk a new file), so that sizes
//! given by a user or read from a file are refused with a message before an allocation aborts
//! the process or a long write fills the disk.

use anyhow::{bail, Result};

/// Bytes available for new allocations: `MemAvailable` from /proc/meminfo, lowered to what the
/// process's cgroup (v2) still allows when it has a limit. `None` where neither can be read.
pub fn available_bytes() -> Option<u64> {
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
    let dir = std::path::Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?; // "max" (no limit) fails here
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Bytes free for an unprivileged user on the file system holding `dir`, when known.
pub fn free_disk_bytes(dir: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    st.f_bavail.checked_mul(st.f_frsize)
}

/// `bytes` in the largest unit that keeps it at least 1.
pub fn human(bytes: u64) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The product of sizes, `None` when it overflows 64 bits.
pub fn product(sizes: &[usize]) -> Option<u64> {
    sizes
        .iter()
        .try_fold(1u64, |acc, &s| acc.checked_mul(s as u64))
}

/// Refuses `need` bytes (`None`: a size that overflowed) when they cannot be allocated.
/// `what` says what needs them and `fix` what to change; both go into the message.
pub fn check_fits(need: Option<u64>, what: &str, fix: &str) -> Result<()> {
    let Some(need) = need else {
        bail!("{what} needs more than 2^64 bytes of memory; {fix}");
    };
    if let Some(avail) = available_bytes() {
        if need > avail {
            bail!(
                "{what} needs about {} of memory but only {} is available; {fix}",
                human(need),
                human(avail)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_units() {
        assert_eq!(product(&[3, 4, 5]), Some(60));
        assert_eq!(product(&[usize::MAX, 2]), None);
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(3 << 30), "3.0 GiB");
        // Linux always reports MemAvailable; a machine running these tests has some.
        if cfg!(target_os = "linux") {
            assert!(available_bytes().unwrap() > 0);
        }
        assert!(free_disk_bytes(&std::env::temp_dir()).is_some());
        assert!(check_fits(Some(1), "one byte", "").is_ok());
        let e = check_fits(Some(u64::MAX), "everything", "ask for less")
            .unwrap_err()
            .to_string();
        assert!(e.contains("16.0 EiB") && e.contains("ask for less"), "{e}");
        let e = check_fits(None, "overflow", "ask for less")
            .unwrap_err()
            .to_string();
        assert!(e.contains("2^64"), "{e}");
    }
}
