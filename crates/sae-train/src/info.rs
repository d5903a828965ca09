//! `sae info DIR`: what an SAE directory holds.

use crate::run::{TrainSummary, LOG_FILE, SUMMARY_FILE};
use anyhow::{Context, Result};
use sae_core::saelens::WEIGHTS_FILE;
use std::fmt::Write;
use std::path::Path;

pub fn describe(dir: &Path) -> Result<String> {
    if !dir.is_dir() {
        anyhow::bail!(
            "{}: not a directory (expected an SAE directory with cfg.json)",
            dir.display()
        );
    }
    let sae = sae_core::saelens::load(dir)?;
    let mut s = String::new();
    let m = &sae.meta;
    writeln!(s, "{}", dir.display())?;
    writeln!(
        s,
        "  arch        {}{}",
        sae.arch,
        if sae.k > 0 {
            format!(" (k = {})", sae.k)
        } else {
            String::new()
        }
    )?;
    writeln!(s, "  d_in        {}", sae.d_in)?;
    writeln!(s, "  d_sae       {}", sae.d_sae)?;
    writeln!(s, "  model       {}", or_dash(&m.model_name))?;
    writeln!(s, "  hook        {}", or_dash(&m.hook_name))?;
    writeln!(s, "  context     {}", m.context_size)?;
    writeln!(s, "  dataset     {}", or_dash(&m.dataset_path))?;
    let wpath = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&wpath).with_context(|| format!("reading {}", wpath.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", wpath.display()))?;
    let mut tensors: Vec<_> = header.tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    writeln!(s, "  tensors ({WEIGHTS_FILE}):")?;
    for (name, info) in tensors {
        writeln!(s, "    {name:<10} {:?} {:?}", info.dtype, info.shape)?;
    }
    let summary_path = dir.join(SUMMARY_FILE);
    if summary_path.exists() {
        let text = std::fs::read_to_string(&summary_path)?;
        let t: TrainSummary = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid training summary", summary_path.display()))?;
        let f = &t.final_metrics;
        writeln!(
            s,
            "  training    {} steps, {} tokens, {:.1} s ({:.0} tokens/s)",
            t.steps, t.tokens, t.seconds, t.tokens_per_s
        )?;
        writeln!(
            s,
            "              lr {:e}, sparsity coeff {}, input scale {} (folded into the weights)",
            t.resolved.lr, t.resolved.sparsity_coeff, t.scale
        )?;
        writeln!(
            s,
            "  final       L0 {:.2}, FVU {:.4}, MSE {:.4}, gamma {:.3}, dead {} / {} (on {} tokens)",
            f.l0, f.fvu, f.mse, f.gamma, f.dead_latents, t.d_sae, f.eval_tokens
        )?;
        let log = dir.join(LOG_FILE);
        if let Ok(text) = std::fs::read_to_string(&log) {
            writeln!(
                s,
                "  log         {} ({} lines)",
                log.display(),
                text.lines().count()
            )?;
        }
    } else {
        writeln!(
            s,
            "  training    no {SUMMARY_FILE} (not trained by `sae train`)"
        )?;
    }
    Ok(s)
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}
