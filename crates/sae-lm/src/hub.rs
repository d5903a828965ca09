//! Hugging Face repo ids (`org/name`, optionally `@revision`) resolved from the local hub
//! cache that `huggingface-cli download` / `transformers` fill. No network: a model that is not
//! cached is an error that says how to fetch it.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (as huggingface_hub).
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `spec` has the shape of a repo id: `org/name` or `org/name@rev`, nothing else.
pub fn looks_like_repo_id(spec: &str) -> bool {
    let id = spec.split_once('@').map_or(spec, |(id, _)| id);
    let mut parts = id.split('/');
    let ok = |s: Option<&str>| {
        s.is_some_and(|s| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The snapshot directory of `spec` (`org/name[@rev]`) in `cache`. The revision is a branch or
/// tag under `refs/` or a commit hash; by default `main`, or the only snapshot there is.
pub fn resolve_in(cache: &Path, spec: &str) -> Result<PathBuf> {
    let (id, rev) = match spec.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (spec, None),
    };
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let fetch = format!(
        "fetch it where a network exists with `hf download {id}` (older huggingface_hub: \
         `huggingface-cli download {id}`), set HF_HOME or HF_HUB_CACHE to the cache holding \
         it, or pass a local directory"
    );
    if !repo.is_dir() {
        bail!(
            "model '{spec}' is not in the Hugging Face cache ({} not found); {fetch}",
            repo.display()
        );
    }
    let snapshots = repo.join("snapshots");
    let wanted = rev.unwrap_or("main");
    let commit = match std::fs::read_to_string(repo.join("refs").join(wanted)) {
        Ok(hash) => hash.trim().to_string(),
        Err(_) if rev.is_some() => wanted.to_string(),
        Err(_) => {
            // No refs/main (e.g. a cache copied by hand): take the only snapshot.
            let all: Vec<PathBuf> = std::fs::read_dir(&snapshots)
                .with_context(|| format!("reading {}", snapshots.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            match all.as_slice() {
                [one] => return Ok(one.clone()),
                [] => bail!(
                    "model '{spec}': no snapshot in {}; {fetch}",
                    snapshots.display()
                ),
                _ => bail!(
                    "model '{spec}': {} has several snapshots and no refs/main; name one \
                     with '{id}@REVISION'",
                    snapshots.display()
                ),
            }
        }
    };
    let dir = snapshots.join(&commit);
    if !dir.is_dir() {
        bail!(
            "model '{spec}': revision '{wanted}' ({commit}) is not in {}; {fetch}",
            snapshots.display()
        );
    }
    if !dir.join("config.json").exists() {
        bail!(
            "model '{spec}': {} has no config.json (partly downloaded?); {fetch}",
            dir.display()
        );
    }
    Ok(dir)
}

/// [`resolve_in`] the default cache.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    resolve_in(&hub_cache_dir(), spec)
}
