//! The page in headless Chromium (Debian's chromium + playwright-core from e2e/): open the
//! list, search, open a latent, type text and see highlighted tokens; screenshots saved.
//!
//! Needs /usr/bin/chromium (or $SAE_CHROMIUM), node, and `npm ci` in crates/sae-browser/e2e.
//! Without them the test prints SKIPPED, unless $CI is set, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn missing_tools(e2e: &Path) -> Vec<String> {
    let chromium = std::env::var("SAE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut missing = Vec::new();
    if !Path::new(&chromium).exists() {
        missing.push(format!("{chromium} (apt-get install -y chromium)"));
    }
    if !e2e
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push(format!(
            "{}/node_modules/playwright-core (cd {} && npm ci)",
            e2e.display(),
            e2e.display()
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node (apt-get install -y nodejs)".into());
    }
    missing
}

#[test]
fn page_works_in_headless_chromium() {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e");
    let missing = missing_tools(&e2e);
    if !missing.is_empty() {
        if std::env::var_os("CI").is_some() {
            panic!(
                "browser test cannot run on CI, missing: {}",
                missing.join(", ")
            );
        }
        println!("SKIPPED browser test: missing {}", missing.join(", "));
        return;
    }
    let shots = std::env::var_os("SAE_BROWSER_SHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-e2e"));
    std::fs::create_dir_all(&shots).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let server = common::toy_server(&tmp.path().join("analysis"), true);

    let mut child = Command::new("node")
        .arg(e2e.join("browse.mjs"))
        .arg(server.url())
        .arg(&shots)
        .current_dir(&e2e)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    // A hung browser must not hang the test suite.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(150) {
            child.kill().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop();
    println!("{log}\nscreenshots in {}", shots.display());
    let status = status.unwrap_or_else(|| panic!("browser test timed out after 150 s:\n{log}"));
    assert!(status.success(), "browser test failed:\n{log}");
    for shot in ["list.png", "latent.png", "text.png"] {
        let len = std::fs::metadata(shots.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "{shot} missing or empty ({len} bytes)");
    }
}
