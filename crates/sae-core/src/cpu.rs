//! What the kernels and the benchmarks need to know about this CPU beyond its instruction
//! sets: its cache sizes (read once from Linux's sysfs).

use std::sync::OnceLock;

/// One core's L2 in bytes, or None where the system does not say (not Linux, or no sysfs).
pub fn l2_bytes() -> Option<usize> {
    static L2: OnceLock<Option<usize>> = OnceLock::new();
    *L2.get_or_init(|| cache_bytes(2))
}

/// The size of CPU 0's unified or data cache of `level`.
fn cache_bytes(level: u32) -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.flatten().find_map(|entry| {
        let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
        let this_level = read("level")?.trim().parse::<u32>().ok()?;
        let kind = read("type")?;
        if this_level != level || kind.trim() == "Instruction" {
            return None;
        }
        parse_size(read("size")?.trim())
    })
}

/// sysfs writes sizes as `512K`, `2048K`, `32M` or plain bytes.
fn parse_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => s.split_at(at),
        None => (s, ""),
    };
    let n: usize = digits.parse().ok()?;
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    Some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_sizes_parse() {
        assert_eq!(parse_size("512K"), Some(512 << 10));
        assert_eq!(parse_size("2048K"), Some(2 << 20));
        assert_eq!(parse_size("32M"), Some(32 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size(""), None);
        // Where sysfs has it (Linux), an L2 of a plausible size.
        if let Some(l2) = l2_bytes() {
            assert!((64 << 10..=64 << 20).contains(&l2), "L2 of {l2} bytes");
        }
    }
}
