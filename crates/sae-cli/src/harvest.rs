//! `sae harvest` and `sae hooks`: the model's side of the pipeline.

use clap::Args;
use sae_lm::harvest_store::{harvest_to_store, StoreHarvest};
use sae_lm::{LanguageModel, ProductPrecision};
use sae_store::writer::StoreDtype;
use std::io::Write;
use std::path::PathBuf;

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
    /// Hook point, e.g. blocks.15.hook_resid_post (`sae hooks` lists them). Several hooks
    /// (repeat the flag, or give a comma list) share one forward pass per batch, which stops
    /// after the deepest of them; each gets its own store in --out/<hook>/.
    #[arg(long, required = true, value_delimiter = ',')]
    pub hook: Vec<String>,
    /// "python-docs", a directory of .txt/.jsonl/.parquet files, or one such file; PATH#NAME
    /// reads the .jsonl field / .parquet column NAME instead of "text".
    #[arg(long, default_value = "python-docs")]
    pub corpus: String,
    /// Activation rows (tokens) to store.
    #[arg(long, value_parser = parse_count, default_value = "2_000_000")]
    pub tokens: usize,
    /// Output directory (created; an unfinished run there is resumed). With several hooks, the
    /// folder of their stores: one store per hook in <out>/<hook>/.
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
    /// Precision of the model's weight products: f32; bf16 (on AMX tiles where the CPU has
    /// them, else AVX512-BF16, which is faster than f32 on some CPUs only; the activations
    /// then differ slightly from f32's); or bf16x3, three bf16 products per product with
    /// about 16 significant bits per operand (faster than f32 on AMX only). Other than f32:
    /// Llama-family models.
    #[arg(long, default_value = "f32")]
    pub compute: ProductPrecision,
    /// Also store token ids and (context, position) of every row.
    #[arg(long)]
    pub store_tokens: bool,
    /// Keep the BOS position's activations (left out by default).
    #[arg(long)]
    pub include_bos: bool,
    /// Rows per shard file (rounded down to whole contexts).
    #[arg(long, value_parser = parse_positive, default_value = "32768")]
    pub shard_rows: usize,
    /// Also store, beside each activation, the gradient of the model's next-token loss with
    /// respect to it (one backward pass through the layers above the hook per batch; what
    /// `sae train --arch gsae` needs). One hook; Llama-family models.
    #[arg(long)]
    pub with_grad: bool,
}

pub fn harvest(args: HarvestArgs) -> anyhow::Result<()> {
    if let Some(note) = args.compute.slow_here() {
        eprintln!("{note}");
    }
    let r = harvest_to_store(
        &StoreHarvest {
            model: args.model,
            hooks: args.hook.clone(),
            corpus: args.corpus,
            tokens: args.tokens,
            out: args.out.clone(),
            ctx: args.ctx,
            dtype: args.dtype,
            batch: args.batch,
            products: args.compute,
            store_tokens: args.store_tokens,
            include_bos: args.include_bos,
            shard_rows: args.shard_rows,
            with_grad: args.with_grad,
            progress: true,
        },
        &mut |_| Ok(()),
    )?;
    let Some(stats) = r.stats else {
        return Ok(());
    };
    if let [one] = &r.stores[..] {
        println!(
            "harvested {} tokens at {}{} in {:.1}s: {:.0} tokens/s; store {} holds {} tokens in {} shards ({:?}, compute {})",
            stats.rows,
            one.hook,
            if args.with_grad { " with loss gradients" } else { "" },
            stats.seconds,
            stats.tokens_per_second(),
            one.out.display(),
            one.manifest.n_tokens,
            one.manifest.shards.len(),
            one.manifest.dtype,
            args.compute
        );
        return Ok(());
    }
    println!(
        "harvested {} tokens at {} hooks (one forward pass per batch) in {:.1}s: {:.0} tokens/s (compute {})",
        stats.rows,
        r.stores.len(),
        stats.seconds,
        stats.tokens_per_second(),
        args.compute
    );
    for st in &r.stores {
        println!(
            "  {}: store {} holds {} tokens in {} shards ({:?})",
            st.hook,
            st.out.display(),
            st.manifest.n_tokens,
            st.manifest.shards.len(),
            st.manifest.dtype
        );
    }
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
