//! SAELens on-disk layout: `cfg.json` + `sae_weights.safetensors`.

use crate::sae::Sae;
use std::path::Path;

// CONTRACT (bodies by the sae-core owner).

/// Write `dir/cfg.json` and `dir/sae_weights.safetensors` atomically (temp dir, then rename).
pub fn save(sae: &Sae, dir: &Path) -> anyhow::Result<()> {
    let _ = (sae, dir);
    todo!("sae-core owner")
}

/// Read an SAE in SAELens layout (ours or SAELens'), checking cfg against the weights.
pub fn load(dir: &Path) -> anyhow::Result<Sae> {
    let _ = dir;
    todo!("sae-core owner")
}
