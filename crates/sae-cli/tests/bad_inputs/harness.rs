//! Running a bad-input case and checking what it left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn sae(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("running sae")
}

/// A fresh scratch directory, unique to this test process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sae-bad-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `root` (recursively) with its bytes; directories as `None`.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut m = BTreeMap::new();
    fn walk(p: &Path, m: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        if meta.is_dir() {
            m.insert(p.to_path_buf(), None);
            let mut entries: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, m);
            }
        } else {
            m.insert(p.to_path_buf(), Some(std::fs::read(p).unwrap_or_default()));
        }
    }
    walk(root, &mut m);
    m
}

/// Runs `sae args` and asserts the case failed cleanly: a non-zero exit, no panic, stderr
/// holding every needle, and everything under each of `keep` byte-identical afterwards.
pub fn refused(args: &[&str], needles: &[&str], keep: &[&Path]) -> String {
    let before: Vec<_> = keep.iter().map(|p| snapshot(p)).collect();
    // One line per case, so `--nocapture` output counts them.
    println!("bad-input case: sae {}", args.join(" "));
    let out = sae(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "should fail: sae {args:?}\nstderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: sae {args:?}\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "sae {args:?}: stderr lacks '{n}':\n{err}");
    }
    for (p, b) in keep.iter().zip(before) {
        let after = snapshot(p);
        assert!(
            after == b,
            "sae {args:?} changed what was under {}:\nbefore {:?}\nafter  {:?}",
            p.display(),
            b.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );
    }
    err
}

/// Runs `sae args`, which must succeed (the valid inputs the cases then spoil).
pub fn ok(args: &[&str]) -> Output {
    let out = sae(args);
    assert!(
        out.status.success(),
        "sae {args:?} should succeed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A valid synthetic store at `acts` (d_in 8, 16 features) of `n_tokens` rows; `extra` flags
/// go to `sae synth` as they are.
pub fn synth_store(acts: &Path, n_tokens: usize, extra: &[&str]) {
    let n = n_tokens.to_string();
    let mut args = vec![
        "synth",
        "--out",
        s(acts),
        "--d-in",
        "8",
        "--n-features",
        "16",
        "--n-tokens",
        &n,
    ];
    args.extend_from_slice(extra);
    ok(&args);
}
