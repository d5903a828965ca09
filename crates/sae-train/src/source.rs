//! Where training batches come from: the activation store, or (added elsewhere) a model.

use anyhow::{bail, Result};
use sae_core::sae::SaeMeta;
use sae_store::{ActivationStore, BatchStream, Order, StreamPosition};
use std::path::Path;

/// A stream of activation rows (Send: training may run inside its own rayon pool).
pub trait BatchSource: Send {
    fn d_in(&self) -> usize;

    /// Fills `out` (`[n, d_in]`, row-major f32) with the next `n` rows.
    fn next_batch(&mut self, out: &mut [f32], n: usize) -> Result<()>;

    /// `n` rows for initialisation (b_dec, normalisation) and the final evaluation.
    /// Default: the next rows of the stream.
    fn sample(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.next_batch(out, n)
    }

    /// Rows in one pass, when the source has a fixed size.
    fn n_rows(&self) -> Option<u64> {
        None
    }

    /// Model, hook, context size... saved into the SAE's cfg.json.
    fn meta(&self) -> SaeMeta {
        SaeMeta::default()
    }

    /// Where the stream is, saved in checkpoints; `None` if it cannot be restored.
    fn position(&self) -> Option<serde_json::Value> {
        None
    }

    /// Restore a `position()`.
    fn seek(&mut self, _pos: &serde_json::Value) -> Result<()> {
        bail!("this activation source cannot seek")
    }
}

/// Shuffled batches from `.safetensors`/`.npy` activation files.
pub struct StoreSource {
    stream: BatchStream,
}

impl StoreSource {
    pub fn open(path: &Path, seed: u64) -> Result<Self> {
        let store = ActivationStore::open(path)?;
        Ok(StoreSource {
            stream: BatchStream::new(store, Order::Shuffled, seed),
        })
    }

    pub fn store(&self) -> &ActivationStore {
        self.stream.store()
    }
}

impl BatchSource for StoreSource {
    fn d_in(&self) -> usize {
        self.stream.d_in()
    }

    fn next_batch(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.stream.next_batch(out, n)
    }

    fn sample(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.stream.sample(out, n)
    }

    fn n_rows(&self) -> Option<u64> {
        Some(self.stream.store().n_rows())
    }

    fn meta(&self) -> SaeMeta {
        let store = self.stream.store();
        let mut meta = SaeMeta {
            dataset_path: store.root.display().to_string(),
            prepend_bos: true,
            ..Default::default()
        };
        if let Some(m) = &store.manifest {
            meta.model_name = m.model.clone();
            meta.hook_name = m.hook.clone();
            meta.context_size = m.context_size;
        }
        meta
    }

    fn position(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.stream.position()).ok()
    }

    fn seek(&mut self, pos: &serde_json::Value) -> Result<()> {
        let p: StreamPosition = serde_json::from_value(pos.clone())?;
        self.stream.seek(p);
        Ok(())
    }
}

/// Rows held in memory (tests, tools): sequential, wrapping around.
pub struct MemorySource {
    pub data: Vec<f32>,
    pub d_in: usize,
    pub next: usize,
}

impl BatchSource for MemorySource {
    fn d_in(&self) -> usize {
        self.d_in
    }

    fn next_batch(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        let rows = self.data.len() / self.d_in;
        for o in out[..n * self.d_in].chunks_mut(self.d_in) {
            let r = self.next % rows;
            o.copy_from_slice(&self.data[r * self.d_in..(r + 1) * self.d_in]);
            self.next += 1;
        }
        Ok(())
    }

    fn sample(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        let rows = self.data.len() / self.d_in;
        for (i, o) in out[..n * self.d_in].chunks_mut(self.d_in).enumerate() {
            let r = i % rows;
            o.copy_from_slice(&self.data[r * self.d_in..(r + 1) * self.d_in]);
        }
        Ok(())
    }

    fn n_rows(&self) -> Option<u64> {
        Some((self.data.len() / self.d_in) as u64)
    }

    fn position(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!(self.next))
    }

    fn seek(&mut self, pos: &serde_json::Value) -> Result<()> {
        self.next = pos
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("bad position {pos}"))? as usize;
        Ok(())
    }
}
