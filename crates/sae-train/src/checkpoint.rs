//! Checkpoints in `<out>.partial/checkpoint/`: the training-scale weights in SAELens layout
//! (`sae/`), the optimiser state (`optimizer.safetensors`) and `progress.json`. A new
//! checkpoint is built beside the old one and swapped in by renames, so a kill at any moment
//! leaves one complete checkpoint (`checkpoint/`, or `checkpoint.old/` mid-swap).

use anyhow::{Context, Result};
use sae_core::{Sae, SaeTrainer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const CHECKPOINT: &str = "checkpoint";
const SAE_DIR: &str = "sae";
const OPTIMIZER: &str = "optimizer.safetensors";
const PROGRESS: &str = "progress.json";

/// Running sums of step statistics since the last log line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub steps: u64,
    pub loss: f64,
    pub mse: f64,
    pub sparsity_loss: f64,
    pub aux_loss: f64,
    pub l0: f64,
    pub fvu: f64,
}

impl Window {
    pub fn add(&mut self, s: &sae_core::StepStats) {
        self.steps += 1;
        self.loss += s.loss;
        self.mse += s.mse;
        self.sparsity_loss += s.sparsity_loss;
        self.aux_loss += s.aux_loss;
        self.l0 += s.l0;
        self.fvu += s.fvu;
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub step: u64,
    pub tokens: u64,
    /// Input scale (f32 bits, so it round-trips exactly).
    pub scale_bits: u32,
    /// Norm limit of the input rows (f32 bits; infinity = none).
    #[serde(default = "no_norm_limit")]
    pub max_norm_bits: u32,
    pub source_position: Option<serde_json::Value>,
    /// Rows the norm filter left out so far (with the position, where the stream is).
    #[serde(default)]
    pub rows_skipped: u64,
    /// Length of train_log.jsonl at this checkpoint (a resumed run truncates to it).
    pub log_bytes: u64,
    pub window: Window,
    /// Seconds of training before this checkpoint.
    pub seconds: f64,
    /// Steps whose resampling gave some latent a new direction; the lr drops after each.
    #[serde(default)]
    pub lr_drops: Vec<u64>,
    /// The sparsity-coefficient controller of a run with `--target-l0`.
    #[serde(default)]
    pub l0_target: Option<crate::l0_target::L0Target>,
}

fn no_norm_limit() -> u32 {
    f32::INFINITY.to_bits()
}

pub fn dir(partial: &Path) -> PathBuf {
    partial.join(CHECKPOINT)
}

pub fn write(partial: &Path, trainer: &SaeTrainer, progress: &Progress) -> Result<()> {
    let final_dir = dir(partial);
    let new = partial.join("checkpoint.new");
    let old = partial.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&new);
    std::fs::create_dir_all(&new).with_context(|| format!("creating {}", new.display()))?;
    sae_core::saelens::save(&trainer.snapshot(), &new.join(SAE_DIR))?;
    trainer.save_state(&new.join(OPTIMIZER))?;
    let text = serde_json::to_string_pretty(progress)?;
    sae_core::saelens::write_atomic(&new.join(PROGRESS), text.as_bytes())?;
    if final_dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&final_dir, &old)
            .with_context(|| format!("moving {} aside", final_dir.display()))?;
    }
    std::fs::rename(&new, &final_dir)
        .with_context(|| format!("renaming into {}", final_dir.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The last complete checkpoint: weights, the path of the optimiser state, and progress.
pub fn read(partial: &Path) -> Result<Option<(Sae, PathBuf, Progress)>> {
    let mut d = dir(partial);
    if !d.join(PROGRESS).exists() {
        d = partial.join("checkpoint.old");
        if !d.join(PROGRESS).exists() {
            return Ok(None);
        }
    }
    let sae = sae_core::saelens::load(&d.join(SAE_DIR))?;
    let p = d.join(PROGRESS);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let progress: Progress = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid progress file", p.display()))?;
    Ok(Some((sae, d.join(OPTIMIZER), progress)))
}
