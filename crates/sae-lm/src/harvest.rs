//! Running the model over packed contexts and handing activation rows to a sink (a shard
//! writer for `sae harvest`, a shuffle buffer for training straight from the model). Several
//! hooks share one forward pass per batch, which stops after the deepest of them.

use crate::corpus::PackedContexts;
use crate::hooks::Hook;
use crate::model::LanguageModel;
use anyhow::Result;
use std::time::Instant;

pub struct HarvestOptions {
    /// Contexts per forward pass.
    pub batch: usize,
    /// Keep position 0 (BOS) rows.
    pub include_bos: bool,
    /// Stop after this many rows in all.
    pub max_rows: usize,
    /// Start at this context (resuming).
    pub first_context: usize,
    pub progress: bool,
}

/// Rows handed to the sink: activations `[n, width]`, the token at each row, and (context
/// index, position in context) of each row.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub acts: &'a [f32],
    pub tokens: &'a [u32],
    pub positions: &'a [(u32, u32)],
}

pub struct HarvestStats {
    pub rows: usize,
    pub seconds: f64,
}

impl HarvestStats {
    pub fn tokens_per_second(&self) -> f64 {
        self.rows as f64 / self.seconds.max(1e-9)
    }
}

/// Runs `model` over `contexts` from `first_context`, `batch` contexts per forward pass,
/// and calls `sink` with the rows of each batch until `max_rows` rows are out.
pub fn harvest(
    model: &LanguageModel,
    contexts: &PackedContexts,
    hook: &str,
    opts: &HarvestOptions,
    mut sink: impl FnMut(Rows<'_>) -> Result<()>,
) -> Result<HarvestStats> {
    let hook = model.hook(hook)?;
    harvest_hooks(model, contexts, &[hook], opts, |rows| sink(rows[0]))
}

/// [`harvest`] at several hooks from one forward pass per batch: `sink` gets one [`Rows`]
/// per hook, in the order of `hooks` (distinct), all for the same tokens.
pub fn harvest_hooks(
    model: &LanguageModel,
    contexts: &PackedContexts,
    hooks: &[Hook],
    opts: &HarvestOptions,
    mut sink: impl FnMut(&[Rows<'_>]) -> Result<()>,
) -> Result<HarvestStats> {
    let pass = |tokens: &[u32], b: usize, all: &mut Vec<Vec<f32>>| {
        model.activations_into(tokens, b, contexts.ctx, hooks, all)
    };
    harvest_passes(model, contexts, hooks, opts, pass, |rows| sink(rows))
}

/// [`harvest`] with the gradient of the next-token loss beside each activation row (see
/// `LanguageModel::activations_with_loss_grad`): `sink` gets the rows and their gradients,
/// `[n, width]` each. One backward pass through the layers above `hook` per batch.
pub fn harvest_with_grad(
    model: &LanguageModel,
    contexts: &PackedContexts,
    hook: Hook,
    opts: &HarvestOptions,
    mut sink: impl FnMut(Rows<'_>, &[f32]) -> Result<()>,
) -> Result<HarvestStats> {
    model.check_loss_grad()?;
    let pass = |tokens: &[u32], b: usize, all: &mut Vec<Vec<f32>>| {
        let (acts, grads, _) = model.activations_with_loss_grad(tokens, b, contexts.ctx, hook)?;
        *all = vec![acts, grads];
        Ok(())
    };
    // The gradient rides along as a second "hook" of the same width.
    harvest_passes(model, contexts, &[hook, hook], opts, pass, |rows| {
        sink(rows[0], rows[1].acts)
    })
}

/// The loop of the harvests above: `pass(tokens, contexts, all)` puts one `[b * ctx, width]`
/// buffer per entry of `hooks` (whose widths they have) in `all`, kept between passes.
fn harvest_passes(
    model: &LanguageModel,
    contexts: &PackedContexts,
    hooks: &[Hook],
    opts: &HarvestOptions,
    pass: impl Fn(&[u32], usize, &mut Vec<Vec<f32>>) -> Result<()>,
    mut sink: impl FnMut(&[Rows<'_>]) -> Result<()>,
) -> Result<HarvestStats> {
    let ctx = contexts.ctx;
    let widths: Vec<usize> = hooks.iter().map(|&h| model.hook_width(h)).collect();
    let first_pos = if opts.include_bos { 0 } else { 1 };
    let rows_per_ctx = ctx - first_pos;
    let n_ctx = contexts.n_contexts();
    let total_rows = opts
        .max_rows
        .min(n_ctx.saturating_sub(opts.first_context) * rows_per_ctx);
    let bar = if opts.progress {
        sae_output::Progress::new(
            total_rows as u64,
            "harvest tokens",
            "{bar:40} {pos}/{len} tokens  {per_sec}  eta {eta}",
        )
    } else {
        sae_output::Progress::hidden()
    };
    let start = Instant::now();
    let mut rows_out = 0;
    let mut c = opts.first_context;
    let mut acts: Vec<Vec<f32>> = vec![Vec::new(); hooks.len()];
    let (mut toks, mut pos) = (Vec::new(), Vec::new());
    let mut all = Vec::new();
    while c < n_ctx && rows_out < total_rows {
        let b = opts.batch.max(1).min(n_ctx - c);
        let tokens = &contexts.tokens[c * ctx..(c + b) * ctx];
        pass(tokens, b, &mut all)?;
        acts.iter_mut().for_each(Vec::clear);
        toks.clear();
        pos.clear();
        'rows: for i in 0..b {
            for p in first_pos..ctx {
                if rows_out + toks.len() == total_rows {
                    break 'rows;
                }
                let row = i * ctx + p;
                for ((out, hook_acts), &width) in acts.iter_mut().zip(&all).zip(&widths) {
                    out.extend_from_slice(&hook_acts[row * width..(row + 1) * width]);
                }
                toks.push(tokens[row]);
                pos.push(((c + i) as u32, p as u32));
            }
        }
        rows_out += toks.len();
        let rows: Vec<Rows<'_>> = acts
            .iter()
            .map(|a| Rows {
                acts: a,
                tokens: &toks,
                positions: &pos,
            })
            .collect();
        sink(&rows)?;
        bar.inc(toks.len() as u64);
        c += b;
    }
    bar.finish_and_clear();
    Ok(HarvestStats {
        rows: rows_out,
        seconds: start.elapsed().as_secs_f64(),
    })
}
