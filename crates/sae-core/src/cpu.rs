//! What the kernels and the benchmarks need to know about this CPU beyond the instruction
//! sets each kernel checks: its cache sizes (read once from Linux's sysfs), and a summary for
//! the benchmarks to print beside their figures.

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

/// The CPU, for the line beside a benchmark's figures: its model name, which of the vector
/// units the kernels choose between at run time it has, and one core's L2 (which some
/// choices read).
pub fn summary() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // The first processor's fields; a virtual machine may name only the vendor's line, so
    // family and model tell its generation.
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut model = field("model name").unwrap_or_else(|| "unknown CPU".to_string());
    if let (Some(family), Some(number)) = (field("cpu family"), field("model")) {
        model = format!("{model}, family {family} model {number}");
    }
    let units: Vec<&str> = [
        ("avx2", crate::kernels::cpu_has!("avx2", "fma")),
        ("avx512f", crate::kernels::cpu_has!("avx512f")),
        ("avx512-bf16", crate::bf16::available()),
        ("amx-bf16", crate::amx::available()),
    ]
    .into_iter()
    .filter_map(|(name, has)| has.then_some(name))
    .collect();
    let units = match units.is_empty() {
        true => "no AVX2".to_string(),
        false => units.join(", "),
    };
    let l2 = match l2_bytes() {
        Some(b) if b >= 1 << 20 && b % (1 << 20) == 0 => format!("; L2 {} MB", b >> 20),
        Some(b) => format!("; L2 {} KB", b >> 10),
        None => String::new(),
    };
    format!("{model} ({units}{l2})")
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
