//! `sae harvest` and `sae hooks`: the model's side of the pipeline.

use anyhow::{bail, Context};
use clap::Args;
use sae_lm::harvest::{harvest_hooks, HarvestOptions};
use sae_lm::{Hook, LanguageModel};
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

/// The hooks given (each once) and the store each goes to: `--out` itself for one hook,
/// `--out/<hook>/` for several.
fn hook_outputs(args: &HarvestArgs) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let hooks: Vec<String> = args.hook.iter().map(|h| h.trim().to_string()).collect();
    for (i, h) in hooks.iter().enumerate() {
        if h.is_empty() {
            bail!("--hook: an empty hook name in '{}'; give names like blocks.5.hook_resid_post, separated by commas", args.hook.join(","));
        }
        if hooks[..i].contains(h) {
            bail!("--hook {h} is given twice; give each hook once");
        }
    }
    if let [hook] = &hooks[..] {
        return Ok(vec![(hook.clone(), args.out.clone())]);
    }
    sae_output::check_output_folder(&args.out)?;
    hooks
        .into_iter()
        .map(|h| {
            let out = args.out.join(store_folder_name(&h)?);
            Ok((h, out))
        })
        .collect()
}

/// The subfolder of a hook's store: its name, which must be a plain folder name (checked
/// before any hook is looked up in the model, so before anything is written).
pub(crate) fn store_folder_name(hook: &str) -> anyhow::Result<&str> {
    if hook.contains(['/', '\\']) || hook == "." || hook == ".." {
        bail!("--hook '{hook}' is not a hook name (like blocks.5.hook_resid_post; `sae hooks` lists them)");
    }
    Ok(hook)
}

pub fn harvest(args: HarvestArgs) -> anyhow::Result<()> {
    let folder_existed = args.out.exists();
    let result = harvest_into(&args);
    // A refused or failed run with several hooks leaves no folder it created and left empty
    // (`remove_dir` removes only an empty one).
    if result.is_err() && !folder_existed && args.hook.len() > 1 {
        let _ = std::fs::remove_dir(&args.out);
    }
    result
}

fn harvest_into(args: &HarvestArgs) -> anyhow::Result<()> {
    if args.ctx < 2 {
        bail!("--ctx must be at least 2");
    }
    if args.tokens == 0 {
        bail!("--tokens must be positive");
    }
    let outputs = hook_outputs(args)?;
    // A store may go only into a new or empty directory or a store of its own (which is
    // resumed); never into the corpus it reads.
    let corpus_path = PathBuf::from(args.corpus.split('#').next().unwrap_or_default());
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
    let mut model = LanguageModel::load(&args.model)?;
    model
        .set_bf16_products(args.compute == "bf16")
        .context("--compute bf16 is not available here; use --compute f32")?;
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
    let bytes_per_value = match args.dtype {
        StoreDtype::F32 => 4,
        StoreDtype::Bf16 => 2,
    };
    let token_bytes = if args.store_tokens { 12 } else { 0 };
    let row_bytes = widths.iter().fold(0u64, |sum, &w| {
        sum.saturating_add((w as u64).saturating_mul(bytes_per_value))
            .saturating_add(token_bytes)
    });
    let width_text = if widths.windows(2).all(|w| w[0] == w[1]) {
        format!("width {}", widths[0])
    } else {
        format!("widths {widths:?}")
    };
    ensure_space(
        &args.out,
        (args.tokens as u64).saturating_mul(row_bytes),
        &match outputs.len() {
            1 => format!("{} tokens of {width_text}", args.tokens),
            n => format!("{} tokens of {width_text} at {n} hooks", args.tokens),
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

    let rows_per_ctx = if args.include_bos {
        args.ctx
    } else {
        args.ctx - 1
    };
    let rows_per_shard = (args.shard_rows / rows_per_ctx).max(1) * rows_per_ctx;
    let mut writers = Vec::new();
    for ((name, out), &width) in outputs.iter().zip(&widths) {
        let template = Manifest {
            model: args.model.clone(),
            hook: name.clone(),
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
            compute: Some(args.compute.clone()),
        };
        writers.push(ShardWriter::open(out, template, rows_per_shard)?);
    }
    // The stores of one run fill shard by shard together, but a run stopped while writing
    // them may leave some a shard ahead: resume from the one furthest behind, and leave out
    // of each store the rows it already holds.
    let done_each: Vec<usize> = writers.iter().map(|w| w.rows_done()).collect();
    let done = done_each.iter().copied().min().unwrap_or(0);
    if done >= args.tokens {
        for (w, (_, out)) in writers.into_iter().zip(&outputs) {
            eprintln!(
                "{} already holds {} tokens; nothing to do",
                out.display(),
                w.rows_done()
            );
            w.finish()?;
        }
        return Ok(());
    }
    // Shards hold whole contexts, so a resumed run restarts at a context boundary.
    let first_context = done / rows_per_ctx;
    if done_each.iter().any(|&d| d > 0) {
        let shards: Vec<usize> = writers.iter().map(|w| w.manifest().shards.len()).collect();
        eprintln!(
            "resuming after {done} stored tokens ({} shards)",
            shards
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut ahead: Vec<usize> = done_each.iter().map(|&d| d - done).collect();

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
        Ok(())
    })?;
    let manifests = writers
        .into_iter()
        .map(|w| w.finish())
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let ([manifest], [(hook, out)]) = (&manifests[..], &outputs[..]) {
        println!(
            "harvested {} tokens at {hook} in {:.1}s: {:.0} tokens/s; store {} holds {} tokens in {} shards ({:?}, compute {})",
            stats.rows,
            stats.seconds,
            stats.tokens_per_second(),
            out.display(),
            manifest.n_tokens,
            manifest.shards.len(),
            manifest.dtype,
            args.compute
        );
        return Ok(());
    }
    println!(
        "harvested {} tokens at {} hooks (one forward pass per batch) in {:.1}s: {:.0} tokens/s (compute {})",
        stats.rows,
        outputs.len(),
        stats.seconds,
        stats.tokens_per_second(),
        args.compute
    );
    for (manifest, (hook, out)) in manifests.iter().zip(&outputs) {
        println!(
            "  {hook}: store {} holds {} tokens in {} shards ({:?})",
            out.display(),
            manifest.n_tokens,
            manifest.shards.len(),
            manifest.dtype
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
