//! `sae harvest` and `sae hooks`: the model's side of the pipeline.

use anyhow::{bail, Context};
use clap::Args;
use sae_lm::harvest::{harvest as run_model, HarvestOptions};
use sae_lm::LanguageModel;
use sae_output::{check_output, ensure_space, mark, Input, OutputKind, OutputLock};
use sae_store::writer::{Manifest, ShardWriter, StoreDtype};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Parses counts like `2_000_000` or `2000000`.
fn parse_count(s: &str) -> Result<usize, String> {
    s.replace('_', "")
        .parse::<usize>()
        .map_err(|e| format!("'{s}' is not a count: {e}"))
}

/// A count of 1 or more.
fn parse_positive(s: &str) -> Result<usize, String> {
    match parse_count(s)? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

#[derive(Args)]
pub struct HarvestArgs {
    /// "smollm2-135m" (fetched on first use), a .gguf file, a Hugging Face model directory, or
    /// a Hugging Face repo id (org/name[@rev]) in the local hub cache.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Hook point, e.g. blocks.15.hook_resid_post (`sae hooks` lists them).
    #[arg(long)]
    pub hook: String,
    /// "python-docs", a directory of .txt/.jsonl/.parquet files, or one such file; PATH#NAME
    /// reads the .jsonl field / .parquet column NAME instead of "text".
    #[arg(long, default_value = "python-docs")]
    pub corpus: String,
    /// Activation rows (tokens) to store.
    #[arg(long, value_parser = parse_count, default_value = "2_000_000")]
    pub tokens: usize,
    /// Output directory (created; an unfinished run there is resumed).
    #[arg(long)]
    pub out: PathBuf,
    /// Context length (BOS included).
    #[arg(long, default_value_t = 128)]
    pub ctx: usize,
    /// Stored dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: StoreDtype,
    /// Contexts per forward pass.
    #[arg(long, default_value = "16", value_parser = parse_positive)]
    pub batch: usize,
    /// Precision of the model's weight products: f32, or bf16 (faster on CPUs with
    /// AVX512-BF16; Llama-family models; the activations then differ slightly from f32's).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub compute: String,
    /// Also store token ids and (context, position) of every row.
    #[arg(long)]
    pub store_tokens: bool,
    /// Keep the BOS position's activations (left out by default).
    #[arg(long)]
    pub include_bos: bool,
    /// Rows per shard file (rounded down to whole contexts).
    #[arg(long, value_parser = parse_positive, default_value = "32768")]
    pub shard_rows: usize,
}

pub fn harvest(args: HarvestArgs) -> anyhow::Result<()> {
    if args.ctx < 2 {
        bail!("--ctx must be at least 2");
    }
    if args.tokens == 0 {
        bail!("--tokens must be positive");
    }
    // A store may go only into a new or empty directory or a store of its own (which is
    // resumed); never into the corpus it reads.
    let corpus_path = PathBuf::from(args.corpus.split('#').next().unwrap_or_default());
    let inputs: Vec<Input> = corpus_path
        .exists()
        .then(|| Input::new("--corpus", &corpus_path))
        .into_iter()
        .collect();
    check_output(&args.out, OutputKind::Store, &inputs, false)?;
    let _lock = OutputLock::acquire(&args.out)?;
    check_output(&args.out, OutputKind::Store, &inputs, false)?;
    let t0 = Instant::now();
    let mut model = LanguageModel::load(&args.model)?;
    model
        .set_bf16_products(args.compute == "bf16")
        .context("--compute bf16 is not available here; use --compute f32")?;
    let hook = model.hook(&args.hook)?;
    let width = model.hook_width(hook);
    let row_bytes = (width as u64)
        .saturating_mul(match args.dtype {
            StoreDtype::F32 => 4,
            StoreDtype::Bf16 => 2,
        })
        .saturating_add(if args.store_tokens { 12 } else { 0 });
    ensure_space(
        &args.out,
        (args.tokens as u64).saturating_mul(row_bytes),
        &format!("{} tokens of width {width}", args.tokens),
        "free space, store bf16 (--dtype bf16), or ask for fewer --tokens",
    )?;
    mark(&args.out, OutputKind::Store)
        .with_context(|| format!("creating {}", args.out.display()))?;
    eprintln!(
        "model {} loaded in {:.1}s; hook {} width {width}",
        model.name,
        t0.elapsed().as_secs_f64(),
        args.hook
    );

    let rows_per_ctx = if args.include_bos {
        args.ctx
    } else {
        args.ctx - 1
    };
    let rows_per_shard = (args.shard_rows / rows_per_ctx).max(1) * rows_per_ctx;
    let template = Manifest {
        model: args.model.clone(),
        hook: args.hook.clone(),
        d_in: width,
        context_size: args.ctx,
        n_tokens: 0,
        corpus: args.corpus.clone(),
        dtype: args.dtype,
        shards: Vec::new(),
        complete: false,
        target_tokens: args.tokens,
        bos_excluded: !args.include_bos,
        has_tokens: args.store_tokens,
    };
    let mut writer = ShardWriter::open(&args.out, template, rows_per_shard)?;
    let done = writer.rows_done();
    if done >= args.tokens {
        eprintln!(
            "{} already holds {done} tokens; nothing to do",
            args.out.display()
        );
        writer.finish()?;
        return Ok(());
    }
    // Shards hold whole contexts, so a resumed run restarts at a context boundary.
    let first_context = done / rows_per_ctx;
    if done > 0 {
        eprintln!(
            "resuming after {done} stored tokens ({} shards)",
            writer.manifest().shards.len()
        );
    }

    let t1 = Instant::now();
    let n_contexts = args.tokens.div_ceil(rows_per_ctx);
    let contexts = sae_lm::corpus::pack_corpus(
        &args.corpus,
        model.tokenizer(),
        args.ctx,
        n_contexts * (args.ctx - 1),
        0,
    )
    .with_context(|| format!("reading corpus '{}'", args.corpus))?;
    eprintln!(
        "corpus {}: {} contexts of {} tokens ({:.1}s)",
        args.corpus,
        contexts.n_contexts(),
        args.ctx,
        t1.elapsed().as_secs_f64()
    );
    if contexts.n_contexts() < n_contexts {
        eprintln!(
            "warning: the corpus gives only {} tokens; storing those",
            contexts.n_contexts() * rows_per_ctx
        );
    }

    let opts = HarvestOptions {
        batch: args.batch,
        include_bos: args.include_bos,
        max_rows: args.tokens - done,
        first_context,
        progress: true,
    };
    let stats = run_model(&model, &contexts, &args.hook, &opts, |rows| {
        writer.push(rows.acts, rows.tokens, rows.positions)
    })?;
    let manifest = writer.finish()?;
    println!(
        "harvested {} tokens at {} in {:.1}s: {:.0} tokens/s; store {} holds {} tokens in {} shards ({:?})",
        stats.rows,
        args.hook,
        stats.seconds,
        stats.tokens_per_second(),
        args.out.display(),
        manifest.n_tokens,
        manifest.shards.len(),
        manifest.dtype
    );
    Ok(())
}

#[derive(Args)]
pub struct HooksArgs {
    /// "smollm2-135m", a .gguf file, a Hugging Face model directory or cached repo id.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
}

pub fn hooks(args: HooksArgs) -> anyhow::Result<()> {
    let model = LanguageModel::load(&args.model)?;
    let mut out = std::io::stdout().lock();
    for h in model.hook_points() {
        match writeln!(out, "{}\t{}", h.name, h.width) {
            Ok(()) => {}
            // `sae hooks | head`: the reader has enough.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
