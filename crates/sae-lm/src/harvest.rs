//! Running the model over packed contexts and handing activation rows to a sink (a shard
//! writer for `sae harvest`, a shuffle buffer for training straight from the model). Several
//! hooks share one forward pass per batch, which stops after the deepest of them.

use crate::corpus::PackedContexts;
use crate::hooks::Hook;
use crate::model::LanguageModel;
use anyhow::Result;
use std::sync::mpsc;
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
    mut sink: impl FnMut(Rows<'_>) -> Result<()> + Send,
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
    mut sink: impl FnMut(&[Rows<'_>]) -> Result<()> + Send,
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
    mut sink: impl FnMut(Rows<'_>, &[f32]) -> Result<()> + Send,
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
/// buffer per entry of `hooks` (whose widths they have) in `all`. The rows go to `sink` on a
/// thread of its own, a batch behind the forward passes: run in turn, its copies and file
/// writes left a core idle for a tenth of a bf16 harvest's time. Buffers go back and forth,
/// so a steady run allocates none.
fn harvest_passes(
    model: &LanguageModel,
    contexts: &PackedContexts,
    hooks: &[Hook],
    opts: &HarvestOptions,
    pass: impl Fn(&[u32], usize, &mut Vec<Vec<f32>>) -> Result<()>,
    sink: impl FnMut(&[Rows<'_>]) -> Result<()> + Send,
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
    let layout = BatchLayout {
        tokens: &contexts.tokens,
        ctx,
        first_pos,
        widths: &widths,
    };
    let rows_out = std::thread::scope(|scope| -> Result<usize> {
        let (to_sink, batches) = mpsc::sync_channel::<Batch>(1);
        let (to_pass, spare) = mpsc::channel::<Vec<Vec<f32>>>();
        let writer = scope.spawn(move || layout.write(batches, to_pass, sink));
        let (mut rows_out, mut c, mut buffers) = (0, opts.first_context, 0);
        while c < n_ctx && rows_out < total_rows {
            let b = opts.batch.max(1).min(n_ctx - c);
            // One set being filled, one queued, one being written.
            let mut all = match spare.try_recv() {
                Ok(all) => all,
                Err(_) if buffers < 3 => {
                    buffers += 1;
                    Vec::new()
                }
                Err(_) => match spare.recv() {
                    Ok(all) => all,
                    // The sink stopped; its error comes from `join` below.
                    Err(_) => break,
                },
            };
            pass(&contexts.tokens[c * ctx..(c + b) * ctx], b, &mut all)?;
            let take = (b * rows_per_ctx).min(total_rows - rows_out);
            let batch = Batch {
                all,
                first_context: c,
                contexts: b,
                rows: take,
            };
            if to_sink.send(batch).is_err() {
                break;
            }
            rows_out += take;
            bar.inc(take as u64);
            c += b;
        }
        drop(to_sink);
        match writer.join() {
            Ok(written) => written.map(|()| rows_out),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })?;
    bar.finish_and_clear();
    Ok(HarvestStats {
        rows: rows_out,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// One forward pass's output on its way to the sink: `all` as `pass` wrote it, for contexts
/// `first_context..first_context + contexts`, of which the first `rows` rows are wanted.
struct Batch {
    all: Vec<Vec<f32>>,
    first_context: usize,
    contexts: usize,
    rows: usize,
}

/// What the sink's thread needs to cut a batch's rows out.
#[derive(Clone, Copy)]
struct BatchLayout<'a> {
    tokens: &'a [u32],
    ctx: usize,
    first_pos: usize,
    widths: &'a [usize],
}

impl BatchLayout<'_> {
    /// Hands each batch's wanted rows (positions from `first_pos` on) to `sink` and its
    /// buffers back through `spare`, until `batches` closes or `sink` fails.
    fn write(
        self,
        batches: mpsc::Receiver<Batch>,
        spare: mpsc::Sender<Vec<Vec<f32>>>,
        mut sink: impl FnMut(&[Rows<'_>]) -> Result<()>,
    ) -> Result<()> {
        let Self {
            tokens,
            ctx,
            first_pos,
            widths,
        } = self;
        let mut acts: Vec<Vec<f32>> = vec![Vec::new(); widths.len()];
        let (mut toks, mut pos) = (Vec::new(), Vec::new());
        for batch in batches {
            acts.iter_mut().for_each(Vec::clear);
            toks.clear();
            pos.clear();
            let c = batch.first_context;
            'rows: for i in 0..batch.contexts {
                for p in first_pos..ctx {
                    if toks.len() == batch.rows {
                        break 'rows;
                    }
                    let row = i * ctx + p;
                    for ((out, hook_acts), &width) in acts.iter_mut().zip(&batch.all).zip(widths) {
                        out.extend_from_slice(&hook_acts[row * width..(row + 1) * width]);
                    }
                    toks.push(tokens[(c + i) * ctx + p]);
                    pos.push(((c + i) as u32, p as u32));
                }
            }
            let rows: Vec<Rows<'_>> = acts
                .iter()
                .map(|a| Rows {
                    acts: a,
                    tokens: &toks,
                    positions: &pos,
                })
                .collect();
            sink(&rows)?;
            // The forward passes may have ended; then the buffers are not needed.
            let _ = spare.send(batch.all);
        }
        Ok(())
    }
}
