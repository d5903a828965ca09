//! Running the model over packed contexts and handing activation rows to a sink (a shard
//! writer for `sae harvest`, a shuffle buffer for training straight from the model).

use crate::corpus::PackedContexts;
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
    let ctx = contexts.ctx;
    let width = model.hook_width(model.hook(hook)?);
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
    let (mut acts, mut toks, mut pos) = (Vec::new(), Vec::new(), Vec::new());
    while c < n_ctx && rows_out < total_rows {
        let b = opts.batch.max(1).min(n_ctx - c);
        let tokens = &contexts.tokens[c * ctx..(c + b) * ctx];
        let all = model.activations(tokens, b, ctx, hook)?;
        acts.clear();
        toks.clear();
        pos.clear();
        'rows: for i in 0..b {
            for p in first_pos..ctx {
                if rows_out + toks.len() == total_rows {
                    break 'rows;
                }
                let row = i * ctx + p;
                acts.extend_from_slice(&all[row * width..(row + 1) * width]);
                toks.push(tokens[row]);
                pos.push(((c + i) as u32, p as u32));
            }
        }
        rows_out += toks.len();
        sink(Rows {
            acts: &acts,
            tokens: &toks,
            positions: &pos,
        })?;
        bar.inc(toks.len() as u64);
        c += b;
    }
    bar.finish_and_clear();
    Ok(HarvestStats {
        rows: rows_out,
        seconds: start.elapsed().as_secs_f64(),
    })
}
