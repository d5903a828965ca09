//! Helpers shared by the sae-train integration tests.
#![allow(dead_code)]

use clap::Parser;
use sae_train::{BatchSource, StoreSource, TrainConfig, TrainFlags};
use std::path::Path;

#[derive(Parser)]
pub struct Cli {
    #[command(flatten)]
    pub flags: TrainFlags,
}

pub fn flags(args: &[&str]) -> TrainFlags {
    let mut v = vec!["train"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).unwrap().flags
}

/// A store source that fails (like a kill) after a number of batches.
pub struct Killed<S: BatchSource = StoreSource> {
    pub inner: S,
    pub batches_left: usize,
}

impl<S: BatchSource> BatchSource for Killed<S> {
    fn d_in(&self) -> usize {
        self.inner.d_in()
    }
    fn next_batch(&mut self, out: &mut [f32], n: usize) -> anyhow::Result<()> {
        if self.batches_left == 0 {
            anyhow::bail!("killed");
        }
        self.batches_left -= 1;
        self.inner.next_batch(out, n)
    }
    fn sample(&mut self, out: &mut [f32], n: usize) -> anyhow::Result<()> {
        self.inner.sample(out, n)
    }
    fn n_rows(&self) -> Option<u64> {
        self.inner.n_rows()
    }
    fn position(&self) -> Option<serde_json::Value> {
        self.inner.position()
    }
    fn seek(&mut self, p: &serde_json::Value) -> anyhow::Result<()> {
        self.inner.seek(p)
    }
}

/// A short run on `acts` (40 steps of 64, checkpoints every 10, 2 threads).
pub fn small_cfg(acts: &Path, out: &Path, d_sae: usize) -> TrainConfig {
    TrainConfig {
        acts: Some(acts.to_path_buf()),
        out: out.to_path_buf(),
        d_sae: Some(d_sae),
        batch_size: 64,
        steps: Some(40),
        checkpoint_every: 10,
        log_every: 5,
        l1: Some(0.5),
        lr: Some(1e-3),
        init_sample: 512,
        eval_tokens: 512,
        quiet: true,
        threads: Some(2),
        ..Default::default()
    }
}
