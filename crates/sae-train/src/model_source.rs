//! Training straight from a language model: a background thread runs the model over the corpus
//! and sends activation rows; the trainer draws its batches at random from a buffer of them, so
//! rows of one context are spread over many batches. Several hooks share the thread and its
//! forward passes, each with a source of its own.

use crate::source::BatchSource;
use anyhow::{bail, Result};
use sae_core::sae::SaeMeta;
use sae_lm::harvest::{harvest_hooks, harvest_with_grad, HarvestOptions};
use sae_lm::{Hook, LanguageModel, ProductPrecision};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

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
    /// How the model's weight products run (`LanguageModel::set_products`).
    pub products: ProductPrecision,
    pub seed: u64,
    /// Also compute the gradient of the model's next-token loss at every row (one hook;
    /// Llama-family models), for `next_batch_with_grads`.
    pub with_grads: bool,
}

pub struct ModelSource {
    d_in: usize,
    /// Values per row as sent and buffered: the activation, then its gradient when asked.
    row: usize,
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
        let hook = o.hook.clone();
        let mut sources = Self::start_hooks(o, &[hook])?;
        Ok(sources.remove(0))
    }

    /// One source per hook of `hooks` (distinct; `o.hook` is not used), all fed by one thread
    /// that runs the model once per batch, stopping after the deepest hook. Each source sees
    /// exactly the rows and batches that [`ModelSource::start`] at its hook would give.
    pub fn start_hooks(o: ModelSourceOptions, hooks: &[String]) -> Result<Vec<Self>> {
        if o.ctx < 2 {
            bail!("--ctx must be at least 2");
        }
        if o.with_grads && hooks.len() != 1 {
            bail!(
                "the loss gradient is computed at one hook per run; train the hooks one at a time"
            );
        }
        let model = LanguageModel::load_with_products(&o.model, o.products)?;
        if o.with_grads {
            model.check_loss_grad()?;
        }
        let mut parsed: Vec<Hook> = Vec::new();
        for name in hooks {
            let hook = model.hook(name)?;
            if let Some(j) = parsed.iter().position(|h| *h == hook) {
                bail!(
                    "--hook {name} and {} are the same hook; give each hook once",
                    hooks[j]
                );
            }
            parsed.push(hook);
        }
        let mut senders = Vec::new();
        let mut sources = Vec::new();
        for (name, &hook) in hooks.iter().zip(&parsed) {
            let d_in = model.hook_width(hook);
            let row = if o.with_grads { 2 * d_in } else { d_in };
            // A few forward passes in flight: the model keeps working while the trainer steps.
            let (tx, rx) = sync_channel::<Result<Vec<f32>>>(4);
            senders.push(tx);
            sources.push(ModelSource {
                d_in,
                row,
                meta: SaeMeta {
                    model_name: o.model.clone(),
                    hook_name: name.clone(),
                    context_size: o.ctx,
                    prepend_bos: true,
                    dataset_path: o.corpus.clone(),
                },
                rx,
                incoming: Vec::new(),
                incoming_at: 0,
                buffer: Vec::with_capacity(o.buffer_rows.max(1) * row),
                buffer_rows: o.buffer_rows.max(1),
                rng: o.seed ^ 0x9e37_79b9_7f4a_7c15,
            });
        }
        std::thread::spawn(move || produce(model, parsed, senders, o));
        Ok(sources)
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
        self.incoming_at += self.row;
        Ok(self.incoming_at - self.row)
    }

    /// Random buffered rows (each replaced by a fresh one): the activation of each into
    /// `out`, and its gradient into `grads` when given.
    fn draw(&mut self, out: &mut [f32], mut grads: Option<&mut [f32]>, n: usize) -> Result<()> {
        let (d, w) = (self.d_in, self.row);
        while self.buffer.len() < self.buffer_rows * w {
            let at = self.next_row()?;
            self.buffer.extend_from_slice(&self.incoming[at..at + w]);
        }
        for (i, o) in out[..n * d].chunks_mut(d).enumerate() {
            let j = self.random_index(self.buffer_rows);
            let slot = j * w..(j + 1) * w;
            o.copy_from_slice(&self.buffer[slot.start..slot.start + d]);
            if let Some(g) = grads.as_deref_mut() {
                g[i * d..(i + 1) * d].copy_from_slice(&self.buffer[slot.start + d..slot.end]);
            }
            let at = self.next_row()?;
            self.buffer[slot].copy_from_slice(&self.incoming[at..at + w]);
        }
        Ok(())
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
        self.draw(out, None, n)
    }

    fn has_grads(&self) -> bool {
        self.row > self.d_in
    }

    fn next_batch_with_grads(
        &mut self,
        out: &mut [f32],
        grads: &mut [f32],
        n: usize,
    ) -> Result<()> {
        if !self.has_grads() {
            bail!("this model source computes no loss gradients");
        }
        self.draw(out, Some(grads), n)
    }

    fn meta(&self) -> SaeMeta {
        self.meta.clone()
    }
}

/// The producer thread: runs the model over the corpus (repeating it as long as any source is
/// read) and sends each hook's rows to its source. A source dropped (its training over) is
/// no longer fed; the thread ends when none is left.
fn produce(
    model: LanguageModel,
    hooks: Vec<Hook>,
    senders: Vec<SyncSender<Result<Vec<f32>>>>,
    o: ModelSourceOptions,
) {
    let send_error = |e: anyhow::Error| {
        for tx in &senders {
            let _ = tx.send(Err(anyhow::anyhow!("{e:#}")));
        }
    };
    let contexts =
        match sae_lm::corpus::pack_corpus(&o.corpus, model.tokenizer(), o.ctx, o.tokens, 0) {
            Ok(c) => c,
            Err(e) => return send_error(e.context(format!("reading corpus '{}'", o.corpus))),
        };
    let opts = HarvestOptions {
        batch: o.batch_contexts.max(1),
        include_bos: false,
        max_rows: usize::MAX,
        first_context: 0,
        progress: false,
    };
    let mut open = vec![true; senders.len()];
    let mut warned = false;
    loop {
        // Ends with an error once every receiver is gone (training over).
        let res = if o.with_grads {
            // Each row sent as its activation followed by its gradient.
            let d = model.hook_width(hooks[0]);
            harvest_with_grad(&model, &contexts, hooks[0], &opts, |r, g| {
                let mut rows = Vec::with_capacity(2 * r.acts.len());
                for (a, g) in r.acts.chunks(d).zip(g.chunks(d)) {
                    rows.extend_from_slice(a);
                    rows.extend_from_slice(g);
                }
                if senders[0].send(Ok(rows)).is_err() {
                    bail!("training ended");
                }
                Ok(())
            })
        } else {
            harvest_hooks(&model, &contexts, &hooks, &opts, |rows| {
                for ((tx, r), open) in senders.iter().zip(rows).zip(&mut open) {
                    if *open && tx.send(Ok(r.acts.to_vec())).is_err() {
                        *open = false;
                    }
                }
                if !open.contains(&true) {
                    bail!("training ended");
                }
                Ok(())
            })
        };
        if let Err(e) = res {
            return send_error(e);
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
}
