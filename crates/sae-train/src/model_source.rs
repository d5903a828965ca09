//! Training straight from a language model: a background thread runs the model over the corpus
//! and sends activation rows; the trainer draws its batches at random from a buffer of them, so
//! rows of one context are spread over many batches.

use crate::source::BatchSource;
use anyhow::{bail, Result};
use sae_core::sae::SaeMeta;
use sae_lm::harvest::{harvest, HarvestOptions};
use sae_lm::LanguageModel;
use std::sync::mpsc::{sync_channel, Receiver};

pub struct ModelSourceOptions {
    pub model: String,
    pub hook: String,
    pub corpus: String,
    /// Context length, BOS included (BOS rows are not used).
    pub ctx: usize,
    /// Rows the model should be able to give without repeating text; more wraps around.
    pub tokens: usize,
    /// Rows in the shuffle buffer.
    pub buffer_rows: usize,
    /// Contexts per forward pass.
    pub batch_contexts: usize,
    pub seed: u64,
}

pub struct ModelSource {
    d_in: usize,
    meta: SaeMeta,
    rx: Receiver<Result<Vec<f32>>>,
    /// Rows received and not yet placed in the buffer.
    incoming: Vec<f32>,
    incoming_at: usize,
    buffer: Vec<f32>,
    buffer_rows: usize,
    rng: u64,
}

impl ModelSource {
    /// Loads the model (so a bad model or hook fails here) and starts the producer thread.
    pub fn start(o: ModelSourceOptions) -> Result<Self> {
        if o.ctx < 2 {
            bail!("--ctx must be at least 2");
        }
        let model = LanguageModel::load(&o.model)?;
        let d_in = model.hook_width(model.hook(&o.hook)?);
        let meta = SaeMeta {
            model_name: o.model.clone(),
            hook_name: o.hook.clone(),
            context_size: o.ctx,
            prepend_bos: true,
            dataset_path: o.corpus.clone(),
        };
        // A few forward passes in flight: the model keeps working while the trainer steps.
        let (tx, rx) = sync_channel::<Result<Vec<f32>>>(4);
        std::thread::spawn(move || {
            let contexts =
                match sae_lm::corpus::pack_corpus(&o.corpus, model.tokenizer(), o.ctx, o.tokens, 0)
                {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e.context(format!("reading corpus '{}'", o.corpus))));
                        return;
                    }
                };
            let opts = HarvestOptions {
                batch: o.batch_contexts.max(1),
                include_bos: false,
                max_rows: usize::MAX,
                first_context: 0,
                progress: false,
            };
            let mut warned = false;
            loop {
                // Ends with an error once the receiver is gone (training over).
                let res = harvest(&model, &contexts, &o.hook, &opts, |rows| {
                    tx.send(Ok(rows.acts.to_vec()))
                        .map_err(|_| anyhow::anyhow!("training ended"))
                });
                if let Err(e) = res {
                    let _ = tx.send(Err(e));
                    return;
                }
                if !warned {
                    eprintln!(
                        "note: corpus '{}' used up ({} contexts); training repeats it",
                        o.corpus,
                        contexts.n_contexts()
                    );
                    warned = true;
                }
            }
        });
        Ok(ModelSource {
            d_in,
            meta,
            rx,
            incoming: Vec::new(),
            incoming_at: 0,
            buffer: Vec::with_capacity(o.buffer_rows.max(1) * d_in),
            buffer_rows: o.buffer_rows.max(1),
            rng: o.seed ^ 0x9e37_79b9_7f4a_7c15,
        })
    }

    /// Offset in `incoming` of the next row from the model.
    fn next_row(&mut self) -> Result<usize> {
        if self.incoming_at >= self.incoming.len() {
            self.incoming = match self.rx.recv() {
                Ok(chunk) => chunk?,
                Err(_) => bail!("the activation producer stopped"),
            };
            self.incoming_at = 0;
        }
        self.incoming_at += self.d_in;
        Ok(self.incoming_at - self.d_in)
    }

    /// SplitMix64: small, seeded, reproducible for a given model and corpus.
    fn random_index(&mut self, n: usize) -> usize {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

impl BatchSource for ModelSource {
    fn d_in(&self) -> usize {
        self.d_in
    }

    fn next_batch(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        let d = self.d_in;
        while self.buffer.len() < self.buffer_rows * d {
            let at = self.next_row()?;
            self.buffer.extend_from_slice(&self.incoming[at..at + d]);
        }
        for o in out[..n * d].chunks_mut(d) {
            // Hand out a random buffered row and put a fresh one in its place.
            let j = self.random_index(self.buffer_rows);
            let slot = j * d..(j + 1) * d;
            o.copy_from_slice(&self.buffer[slot.clone()]);
            let at = self.next_row()?;
            self.buffer[slot].copy_from_slice(&self.incoming[at..at + d]);
        }
        Ok(())
    }

    fn meta(&self) -> SaeMeta {
        self.meta.clone()
    }
}
