//! `sae harvest` as a library call: the model's activations at one or several hooks (one
//! forward pass per batch for all of them), written to activation stores (resumed when
//! unfinished) or collected in memory. The binary and the Python package both call these, so
//! they refuse and write the same things.

use crate::corpus::PackedContexts;
use crate::harvest::{harvest, harvest_hooks, harvest_with_grad, HarvestOptions, HarvestStats};
use crate::Hook;
use crate::{LanguageModel, ProductPrecision};
use anyhow::{bail, Context, Result};
use sae_output::{
    check_output, check_output_folder, ensure_space, mark, Input, OutputKind, OutputLock,
};
use sae_store::writer::{Manifest, ShardWriter, StoreDtype};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The settings of `sae harvest`.
#[derive(Clone, Debug)]
pub struct StoreHarvest {
    /// Model name or path, as `LanguageModel::load` takes it.
    pub model: String,
    /// Hook points (distinct). Several share one forward pass per batch, which stops after
    /// the deepest of them.
    pub hooks: Vec<String>,
    pub corpus: String,
    /// Activation rows (tokens) to store.
    pub tokens: usize,
    /// The store for one hook; for several, the folder of their stores (`<out>/<hook>/`).
    pub out: PathBuf,
    /// Context length, BOS included.
    pub ctx: usize,
    pub dtype: StoreDtype,
    /// Contexts per forward pass.
    pub batch: usize,
    /// How the model's weight products run.
    pub products: ProductPrecision,
    /// Also store token ids and (context, position) of every row.
    pub store_tokens: bool,
    /// Keep the BOS position's rows.
    pub include_bos: bool,
    /// Rows per shard file (rounded down to whole contexts).
    pub shard_rows: usize,
    /// Also store the gradient of the next-token loss beside each activation (one hook only;
    /// Llama-family models).
    pub with_grad: bool,
    /// Draw the terminal progress bar.
    pub progress: bool,
}

/// What a harvest into stores did.
pub struct StoreHarvestResult {
    /// `None` when the stores already held the tokens asked for (nothing was run).
    pub stats: Option<HarvestStats>,
    /// Each hook's store and its manifest after the run, in the order of the hooks.
    pub stores: Vec<HookStore>,
}

pub struct HookStore {
    pub hook: String,
    pub out: PathBuf,
    pub manifest: Manifest,
}

/// What a store's gradients are the gradient of (`Manifest::grads`).
pub const GRAD_OF: &str = "sum over each context of the next-token cross-entropy at positions \
     0..ctx-1 (BOS's prediction included), w.r.t. the activation at the hook";

/// Checks the counts shared by both kinds of harvest.
fn check_counts(ctx: usize, tokens: usize) -> Result<()> {
    if ctx < 2 {
        bail!("--ctx must be at least 2");
    }
    if tokens == 0 {
        bail!("--tokens must be positive");
    }
    Ok(())
}

/// Loads `spec` with its products in `products`, and checks `hook`; returns the model and
/// the hook's width.
pub fn open_model(
    spec: &str,
    hook: &str,
    products: ProductPrecision,
) -> Result<(LanguageModel, usize)> {
    let model = LanguageModel::load_with_products(spec, products)?;
    let width = model.hook_width(model.hook(hook)?);
    Ok((model, width))
}

/// Rows one context gives: all its positions, or all but BOS.
pub fn rows_per_context(ctx: usize, include_bos: bool) -> usize {
    if include_bos {
        ctx
    } else {
        ctx - 1
    }
}

/// Packs enough contexts of `corpus` for `tokens` rows, saying on stderr how many there are
/// and warning when the corpus is shorter.
pub fn pack_for_rows(
    model: &LanguageModel,
    corpus: &str,
    ctx: usize,
    include_bos: bool,
    tokens: usize,
) -> Result<PackedContexts> {
    let t1 = Instant::now();
    let rows_per_ctx = rows_per_context(ctx, include_bos);
    let n_contexts = tokens.div_ceil(rows_per_ctx);
    let contexts =
        crate::corpus::pack_corpus(corpus, model.tokenizer(), ctx, n_contexts * (ctx - 1), 0)
            .with_context(|| format!("reading corpus '{corpus}'"))?;
    eprintln!(
        "corpus {corpus}: {} contexts of {ctx} tokens ({:.1}s)",
        contexts.n_contexts(),
        t1.elapsed().as_secs_f64()
    );
    if contexts.n_contexts() < n_contexts {
        eprintln!(
            "warning: the corpus gives only {} tokens; storing those",
            contexts.n_contexts() * rows_per_ctx
        );
    }
    Ok(contexts)
}

/// The subfolder of a hook's store: its name, which must be a plain folder name (checked
/// before any hook is looked up in the model, so before anything is written).
pub fn store_folder_name(hook: &str) -> Result<&str> {
    if hook.contains(['/', '\\']) || hook == "." || hook == ".." {
        bail!(
            "--hook '{hook}' is not a hook name (like blocks.5.hook_resid_post; `sae hooks` \
             lists them)"
        );
    }
    Ok(hook)
}

/// The hooks given (each once) and the store each goes to: `out` itself for one hook,
/// `out/<hook>/` for several.
fn hook_outputs(hooks: &[String], out: &Path) -> Result<Vec<(String, PathBuf)>> {
    let hooks: Vec<String> = hooks.iter().map(|h| h.trim().to_string()).collect();
    if hooks.is_empty() {
        bail!("--hook: give at least one hook, e.g. blocks.5.hook_resid_post");
    }
    for (i, h) in hooks.iter().enumerate() {
        if h.is_empty() {
            bail!(
                "--hook: an empty hook name in '{}'; give names like blocks.5.hook_resid_post, \
                 separated by commas",
                hooks.join(",")
            );
        }
        if hooks[..i].contains(h) {
            bail!("--hook {h} is given twice; give each hook once");
        }
    }
    if let [hook] = &hooks[..] {
        return Ok(vec![(hook.clone(), out.to_path_buf())]);
    }
    check_output_folder(out)?;
    hooks
        .into_iter()
        .map(|h| {
            let dir = out.join(store_folder_name(&h)?);
            Ok((h, dir))
        })
        .collect()
}

/// `sae harvest`: checks every store's folder (a new or empty directory, or an unfinished
/// store of its own, which is resumed; never the corpus), locks them, runs the model once per
/// batch for all hooks and writes the stores. `after_rows(rows)` is called with the rows the
/// stores hold after each batch is written; an error from it stops the run with the shards
/// written so far kept (a later call resumes after them). With several hooks, a refused or
/// failed run leaves no folder it created and left empty.
pub fn harvest_to_store(
    a: &StoreHarvest,
    after_rows: &mut (dyn FnMut(usize) -> Result<()> + Send),
) -> Result<StoreHarvestResult> {
    let folder_existed = a.out.exists();
    let result = harvest_into(a, after_rows);
    if result.is_err() && !folder_existed && a.hooks.len() > 1 {
        // `remove_dir` removes only an empty folder.
        let _ = std::fs::remove_dir(&a.out);
    }
    result
}

fn harvest_into(
    a: &StoreHarvest,
    after_rows: &mut (dyn FnMut(usize) -> Result<()> + Send),
) -> Result<StoreHarvestResult> {
    check_counts(a.ctx, a.tokens)?;
    let outputs = hook_outputs(&a.hooks, &a.out)?;
    if a.with_grad && outputs.len() > 1 {
        bail!(
            "--with-grad takes one --hook (each hook's gradient is its own backward pass); \
             harvest the hooks one at a time"
        );
    }
    // A store may go only into a new or empty directory or a store of its own (which is
    // resumed); never into the corpus it reads.
    let corpus_path = PathBuf::from(a.corpus.split('#').next().unwrap_or_default());
    let inputs: Vec<Input> = corpus_path
        .exists()
        .then(|| Input::new("--corpus", &corpus_path))
        .into_iter()
        .collect();
    for (_, out) in &outputs {
        check_output(out, OutputKind::Store, &inputs, false)?;
    }
    let mut locks = Vec::new();
    for (_, out) in &outputs {
        locks.push(OutputLock::acquire(out)?);
        check_output(out, OutputKind::Store, &inputs, false)?;
    }
    let t0 = Instant::now();
    let model = LanguageModel::load_with_products(&a.model, a.products)?;
    if a.with_grad {
        model
            .check_loss_grad()
            .context("--with-grad: use a Llama-family model, or harvest without --with-grad")?;
    }
    let mut hooks: Vec<Hook> = Vec::new();
    for (name, _) in &outputs {
        let hook = model.hook(name)?;
        if let Some(j) = hooks.iter().position(|h| *h == hook) {
            bail!(
                "--hook {name} and --hook {} are the same hook; give each hook once",
                outputs[j].0
            );
        }
        hooks.push(hook);
    }
    let widths: Vec<usize> = hooks.iter().map(|&h| model.hook_width(h)).collect();
    let bytes_per_value = match a.dtype {
        StoreDtype::F32 => 4,
        StoreDtype::Bf16 => 2,
    };
    let token_bytes = if a.store_tokens { 12 } else { 0 };
    let per_value = bytes_per_value * if a.with_grad { 2 } else { 1 };
    let row_bytes = widths.iter().fold(0u64, |sum, &w| {
        sum.saturating_add((w as u64).saturating_mul(per_value))
            .saturating_add(token_bytes)
    });
    let width_text = if widths.windows(2).all(|w| w[0] == w[1]) {
        format!("width {}", widths[0])
    } else {
        format!("widths {widths:?}")
    };
    ensure_space(
        &a.out,
        (a.tokens as u64).saturating_mul(row_bytes),
        &match outputs.len() {
            1 => format!("{} tokens of {width_text}", a.tokens),
            n => format!("{} tokens of {width_text} at {n} hooks", a.tokens),
        },
        "free space, store bf16 (--dtype bf16), or ask for fewer --tokens",
    )?;
    for (_, out) in &outputs {
        mark(out, OutputKind::Store).with_context(|| format!("creating {}", out.display()))?;
    }
    let names: Vec<&str> = outputs.iter().map(|(h, _)| h.as_str()).collect();
    eprintln!(
        "model {} loaded in {:.1}s; {} {} {width_text}",
        model.name,
        t0.elapsed().as_secs_f64(),
        if names.len() == 1 { "hook" } else { "hooks" },
        names.join(", ")
    );

    let rows_per_ctx = rows_per_context(a.ctx, a.include_bos);
    let rows_per_shard = (a.shard_rows / rows_per_ctx).max(1) * rows_per_ctx;
    let mut writers = Vec::new();
    for ((name, out), &width) in outputs.iter().zip(&widths) {
        let template = Manifest {
            model: a.model.clone(),
            hook: name.clone(),
            d_in: width,
            context_size: a.ctx,
            n_tokens: 0,
            corpus: a.corpus.clone(),
            dtype: a.dtype,
            shards: Vec::new(),
            complete: false,
            target_tokens: a.tokens,
            bos_excluded: !a.include_bos,
            has_tokens: a.store_tokens,
            compute: Some(a.products.to_string()),
            grads: a.with_grad.then(|| GRAD_OF.to_string()),
        };
        writers.push(ShardWriter::open(out, template, rows_per_shard)?);
    }
    let finish = |writers: Vec<ShardWriter>| -> Result<Vec<HookStore>> {
        writers
            .into_iter()
            .zip(&outputs)
            .map(|(w, (hook, out))| {
                Ok(HookStore {
                    hook: hook.clone(),
                    out: out.clone(),
                    manifest: w.finish()?,
                })
            })
            .collect()
    };
    // The stores of one run fill shard by shard together, but a run stopped while writing
    // them may leave some a shard ahead: resume from the one furthest behind, and leave out
    // of each store the rows it already holds.
    let done_each: Vec<usize> = writers.iter().map(|w| w.rows_done()).collect();
    let done = done_each.iter().copied().min().unwrap_or(0);
    if done >= a.tokens {
        for (w, (_, out)) in writers.iter().zip(&outputs) {
            eprintln!(
                "{} already holds {} tokens; nothing to do",
                out.display(),
                w.rows_done()
            );
        }
        return Ok(StoreHarvestResult {
            stats: None,
            stores: finish(writers)?,
        });
    }
    // Shards hold whole contexts, so a resumed run restarts at a context boundary.
    let first_context = done / rows_per_ctx;
    if done_each.iter().any(|&d| d > 0) {
        let shards: Vec<String> = writers
            .iter()
            .map(|w| w.manifest().shards.len().to_string())
            .collect();
        eprintln!(
            "resuming after {done} stored tokens ({} shards)",
            shards.join(", ")
        );
    }
    let mut ahead: Vec<usize> = done_each.iter().map(|&d| d - done).collect();
    let contexts = pack_for_rows(&model, &a.corpus, a.ctx, a.include_bos, a.tokens)?;
    let opts = HarvestOptions {
        batch: a.batch,
        include_bos: a.include_bos,
        max_rows: a.tokens - done,
        first_context,
        progress: a.progress,
    };
    let mut held = done;
    if a.with_grad {
        let (writer, skip) = (&mut writers[0], &mut ahead[0]);
        let width = widths[0];
        let stats = harvest_with_grad(&model, &contexts, hooks[0], &opts, |r, grads| {
            let n = (*skip).min(r.tokens.len());
            *skip -= n;
            if n < r.tokens.len() {
                let (a, g) = (&r.acts[n * width..], &grads[n * width..]);
                writer.push_with_grads(a, g, &r.tokens[n..], &r.positions[n..])?;
            }
            held += r.tokens.len();
            after_rows(held)
        })?;
        return Ok(StoreHarvestResult {
            stats: Some(stats),
            stores: finish(writers)?,
        });
    }
    let stats = harvest_hooks(&model, &contexts, &hooks, &opts, |rows| {
        for (((writer, r), skip), &width) in
            writers.iter_mut().zip(rows).zip(&mut ahead).zip(&widths)
        {
            let n = (*skip).min(r.tokens.len());
            *skip -= n;
            if n < r.tokens.len() {
                writer.push(&r.acts[n * width..], &r.tokens[n..], &r.positions[n..])?;
            }
        }
        held += rows.first().map_or(0, |r| r.tokens.len());
        after_rows(held)
    })?;
    Ok(StoreHarvestResult {
        stats: Some(stats),
        stores: finish(writers)?,
    })
}

/// The settings of a harvest into memory (`sae harvest` without a store).
#[derive(Clone, Debug)]
pub struct MemoryHarvest {
    pub model: String,
    pub hook: String,
    pub corpus: String,
    pub tokens: usize,
    pub ctx: usize,
    pub batch: usize,
    pub products: ProductPrecision,
    pub include_bos: bool,
    pub progress: bool,
}

/// Activation rows `[rows, width]` (row-major f32) in corpus order, as `sae harvest` would
/// store them with `--dtype f32`. `after_rows(rows)` is called with the rows collected so
/// far after each batch; an error from it stops the run and is returned.
pub fn harvest_to_memory(
    a: &MemoryHarvest,
    after_rows: &mut (dyn FnMut(usize) -> Result<()> + Send),
) -> Result<(Vec<f32>, usize, HarvestStats)> {
    check_counts(a.ctx, a.tokens)?;
    let (model, width) = open_model(&a.model, &a.hook, a.products)?;
    sae_output::ensure_memory(
        (a.tokens as u64).checked_mul(width as u64 * 4),
        &format!("{} tokens of width {width} in float32", a.tokens),
        "ask for fewer tokens, or harvest to a store (out=...) and train from it",
    )?;
    let contexts = pack_for_rows(&model, &a.corpus, a.ctx, a.include_bos, a.tokens)?;
    let opts = HarvestOptions {
        batch: a.batch,
        include_bos: a.include_bos,
        max_rows: a.tokens,
        first_context: 0,
        progress: a.progress,
    };
    let expected = a
        .tokens
        .min(contexts.n_contexts() * rows_per_context(a.ctx, a.include_bos));
    let mut acts = Vec::with_capacity(expected * width);
    let stats = harvest(&model, &contexts, &a.hook, &opts, |rows| {
        acts.extend_from_slice(rows.acts);
        after_rows(acts.len() / width)
    })?;
    Ok((acts, width, stats))
}
