//! `sae harvest` as a library call: the model's activations at one hook, written to an
//! activation store (resumed when the store is unfinished) or collected in memory. The
//! binary and the Python package both call these, so they refuse and write the same things.

use crate::corpus::PackedContexts;
use crate::harvest::{harvest, HarvestOptions, HarvestStats};
use crate::LanguageModel;
use anyhow::{bail, Context, Result};
use sae_output::{check_output, ensure_space, mark, Input, OutputKind, OutputLock};
use sae_store::writer::{Manifest, ShardWriter, StoreDtype};
use std::path::PathBuf;
use std::time::Instant;

/// The settings of `sae harvest`.
#[derive(Clone, Debug)]
pub struct StoreHarvest {
    /// Model name or path, as `LanguageModel::load` takes it.
    pub model: String,
    pub hook: String,
    pub corpus: String,
    /// Activation rows (tokens) to store.
    pub tokens: usize,
    pub out: PathBuf,
    /// Context length, BOS included.
    pub ctx: usize,
    pub dtype: StoreDtype,
    /// Contexts per forward pass.
    pub batch: usize,
    /// Weight products in bf16 instead of f32.
    pub bf16_compute: bool,
    /// Also store token ids and (context, position) of every row.
    pub store_tokens: bool,
    /// Keep the BOS position's rows.
    pub include_bos: bool,
    /// Rows per shard file (rounded down to whole contexts).
    pub shard_rows: usize,
    /// Draw the terminal progress bar.
    pub progress: bool,
}

/// What a harvest into a store did.
pub struct StoreHarvestResult {
    /// `None` when the store already held the tokens asked for (nothing was run).
    pub stats: Option<HarvestStats>,
    /// The store's manifest after the run.
    pub manifest: Manifest,
}

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

/// Loads `spec` with the products in bf16 when asked, and checks `hook`; returns the model
/// and the hook's width.
pub fn open_model(spec: &str, hook: &str, bf16_compute: bool) -> Result<(LanguageModel, usize)> {
    let mut model = LanguageModel::load(spec)?;
    model
        .set_bf16_products(bf16_compute)
        .context("--compute bf16 is not available here; use --compute f32")?;
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

/// `sae harvest`: checks `out` (a new or empty directory, or an unfinished store of its own,
/// which is resumed; never the corpus), locks it, runs the model and writes the store.
/// `after_rows(rows)` is called with the rows the store holds after each batch is written;
/// an error from it stops the run with the shards written so far kept (a later call resumes
/// after them).
pub fn harvest_to_store(
    a: &StoreHarvest,
    after_rows: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<StoreHarvestResult> {
    check_counts(a.ctx, a.tokens)?;
    // A store may go only into a new or empty directory or a store of its own (which is
    // resumed); never into the corpus it reads.
    let corpus_path = PathBuf::from(a.corpus.split('#').next().unwrap_or_default());
    let inputs: Vec<Input> = corpus_path
        .exists()
        .then(|| Input::new("--corpus", &corpus_path))
        .into_iter()
        .collect();
    check_output(&a.out, OutputKind::Store, &inputs, false)?;
    let _lock = OutputLock::acquire(&a.out)?;
    check_output(&a.out, OutputKind::Store, &inputs, false)?;
    let t0 = Instant::now();
    let (model, width) = open_model(&a.model, &a.hook, a.bf16_compute)?;
    let row_bytes = (width as u64)
        .saturating_mul(match a.dtype {
            StoreDtype::F32 => 4,
            StoreDtype::Bf16 => 2,
        })
        .saturating_add(if a.store_tokens { 12 } else { 0 });
    ensure_space(
        &a.out,
        (a.tokens as u64).saturating_mul(row_bytes),
        &format!("{} tokens of width {width}", a.tokens),
        "free space, store bf16 (--dtype bf16), or ask for fewer --tokens",
    )?;
    mark(&a.out, OutputKind::Store).with_context(|| format!("creating {}", a.out.display()))?;
    eprintln!(
        "model {} loaded in {:.1}s; hook {} width {width}",
        model.name,
        t0.elapsed().as_secs_f64(),
        a.hook
    );

    let rows_per_ctx = rows_per_context(a.ctx, a.include_bos);
    let rows_per_shard = (a.shard_rows / rows_per_ctx).max(1) * rows_per_ctx;
    let template = Manifest {
        model: a.model.clone(),
        hook: a.hook.clone(),
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
    };
    let mut writer = ShardWriter::open(&a.out, template, rows_per_shard)?;
    let done = writer.rows_done();
    if done >= a.tokens {
        eprintln!(
            "{} already holds {done} tokens; nothing to do",
            a.out.display()
        );
        let manifest = writer.finish()?;
        return Ok(StoreHarvestResult {
            stats: None,
            manifest,
        });
    }
    // Shards hold whole contexts, so a resumed run restarts at a context boundary.
    let first_context = done / rows_per_ctx;
    if done > 0 {
        eprintln!(
            "resuming after {done} stored tokens ({} shards)",
            writer.manifest().shards.len()
        );
    }
    let contexts = pack_for_rows(&model, &a.corpus, a.ctx, a.include_bos, a.tokens)?;
    let opts = HarvestOptions {
        batch: a.batch,
        include_bos: a.include_bos,
        max_rows: a.tokens - done,
        first_context,
        progress: a.progress,
    };
    let mut held = done;
    let stats = harvest(&model, &contexts, &a.hook, &opts, |rows| {
        writer.push(rows.acts, rows.tokens, rows.positions)?;
        held += rows.tokens.len();
        after_rows(held)
    })?;
    let manifest = writer.finish()?;
    Ok(StoreHarvestResult {
        stats: Some(stats),
        manifest,
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
    pub bf16_compute: bool,
    pub include_bos: bool,
    pub progress: bool,
}

/// Activation rows `[rows, width]` (row-major f32) in corpus order, as `sae harvest` would
/// store them with `--dtype f32`. `after_rows(rows)` is called with the rows collected so
/// far after each batch; an error from it stops the run and is returned.
pub fn harvest_to_memory(
    a: &MemoryHarvest,
    after_rows: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<(Vec<f32>, usize, HarvestStats)> {
    check_counts(a.ctx, a.tokens)?;
    let (model, width) = open_model(&a.model, &a.hook, a.bf16_compute)?;
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
