//! `sae analyze` (scan a corpus, store per-latent statistics) and `sae serve` (the feature
//! browser over such an analysis).

use anyhow::{bail, Context};
use clap::Args;
use sae_browser::format::Provenance;
use sae_browser::server::{start_with, ServeOptions};
use sae_browser::{Analysis, AnalyzeOptions, Browser, ModelSource, SaeTextEncoder, ScanConfig};
use sae_lm::LanguageModel;
use sae_output::{check_output, ensure_space, Input, OutputKind, OutputLock};
use std::path::{Path, PathBuf};

const DEFAULT_MODEL: &str = "smollm2-135m";

#[derive(Args)]
pub struct AnalyzeArgs {
    /// SAE directory (SAELens layout: cfg.json + sae_weights.safetensors).
    #[arg(long)]
    sae: PathBuf,
    /// Model: "smollm2-135m", a .gguf file or a Hugging Face model directory
    /// [default: the model named in the SAE's cfg.json, else smollm2-135m].
    #[arg(long)]
    model: Option<String>,
    /// Corpus: "python-docs", a directory of .txt/.jsonl files, or one such file.
    #[arg(long, default_value = "python-docs")]
    corpus: String,
    /// Tokens to scan (non-BOS).
    #[arg(long, default_value_t = 200_000)]
    tokens: usize,
    /// Tokens of the corpus to skip first (e.g. those the SAE was trained on).
    #[arg(long, default_value_t = 0)]
    skip_tokens: usize,
    /// Context length [default: the SAE's context_size, else 128].
    #[arg(long)]
    ctx: Option<usize>,
    /// Hook point [default: the SAE's hook_name].
    #[arg(long)]
    hook: Option<String>,
    /// Contexts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Top-activating contexts stored per latent.
    #[arg(long, default_value_t = 20)]
    top_k: usize,
    /// Random firing examples stored per latent (spread over the activation range).
    #[arg(long, default_value_t = 10)]
    examples: usize,
    /// Tokens shown before / after an example's token.
    #[arg(long, default_value_t = 24)]
    left: usize,
    #[arg(long, default_value_t = 8)]
    right: usize,
    /// Top and bottom tokens stored per decoder direction's logit effect.
    #[arg(long, default_value_t = 10)]
    logits: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory: new, empty, or an earlier analysis (replaced whole once the new one
    /// is complete).
    #[arg(long, default_value = "analysis")]
    out: PathBuf,
}

fn absolute(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// The most examples, top contexts or logits per latent an analysis stores.
const MAX_EXAMPLES: usize = 10_000;

pub fn analyze(a: AnalyzeArgs) -> anyhow::Result<()> {
    if a.tokens == 0 {
        bail!("--tokens must be positive");
    }
    // Sizes past these are typing mistakes, and each multiplies the output by d_sae.
    for (flag, v, max) in [
        ("--top-k", a.top_k, MAX_EXAMPLES),
        ("--examples", a.examples, MAX_EXAMPLES),
        ("--logits", a.logits, MAX_EXAMPLES),
    ] {
        if v > max {
            bail!("{flag} {v} is more than anyone can read per latent; use at most {max}");
        }
    }
    let sae_input = [Input::new("--sae", &a.sae)];
    check_output(&a.out, OutputKind::Analysis, &sae_input, false)?;
    let sae = sae_core::saelens::load(&a.sae)
        .with_context(|| format!("loading the SAE from {}", a.sae.display()))?;
    let hook = match a.hook.clone().or_else(|| non_empty(&sae.meta.hook_name)) {
        Some(h) => h,
        None => bail!(
            "{}/cfg.json names no hook_name; pass --hook (see `sae hooks`)",
            a.sae.display()
        ),
    };
    let ctx = a
        .ctx
        .or((sae.meta.context_size > 1).then_some(sae.meta.context_size))
        .unwrap_or(128);
    if ctx < 2 {
        bail!("--ctx must be at least 2");
    }
    if a.left >= ctx || a.right >= ctx {
        bail!(
            "--left {} / --right {}: an example shows tokens of its own context, so each must be below the context length {ctx}",
            a.left,
            a.right
        );
    }
    let model_spec = model_spec(a.model.as_deref(), &sae.meta.model_name);
    eprintln!("loading model {model_spec} ...");
    let model = LanguageModel::load(&model_spec)?;
    let source = ModelSource::new(model, &hook)?;
    sae_browser::source::check_widths(&source, &sae)?;
    eprintln!(
        "packing {} tokens of {} (ctx {ctx}) ...",
        a.tokens, a.corpus
    );
    let packed = sae_lm::corpus::pack_corpus(
        &a.corpus,
        source.model.tokenizer(),
        ctx,
        a.tokens,
        a.skip_tokens,
    )?;
    let opts = AnalyzeOptions {
        scan: ScanConfig {
            top_k: a.top_k,
            reservoir: (4 * a.examples).max(32),
            n_random: a.examples,
            left: a.left,
            right: a.right,
            hist_bins: 64,
            skip_first: true,
            seed: a.seed,
        },
        batch: a.batch,
        n_logits: a.logits,
        progress: true,
    };
    let prov = Provenance {
        sae: absolute(&a.sae),
        model: model_spec.clone(),
        corpus: a.corpus.clone(),
        ..Provenance::default()
    };
    let need = sae_browser::format::max_analysis_bytes(
        sae.d_sae,
        &opts.scan,
        a.logits,
        source.model.tokenizer().vocab_size(),
    );
    ensure_space(
        &a.out,
        need,
        &format!("the analysis of {} latents", sae.d_sae),
        "free space, or lower --top-k, --examples, --left/--right or --logits",
    )?;
    let _lock = OutputLock::acquire(&a.out)?;
    check_output(&a.out, OutputKind::Analysis, &sae_input, false)?;
    let t0 = std::time::Instant::now();
    let meta = sae_browser::analyze(&source, &sae, &packed.tokens, ctx, &opts, &prov, &a.out)?;
    println!(
        "analysed {} latents over {} tokens ({} contexts of {ctx}) in {:.1} s -> {}",
        meta.d_sae,
        meta.n_tokens,
        meta.n_contexts,
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    println!("view it with: sae serve --analysis {}", a.out.display());
    Ok(())
}

fn non_empty(s: &str) -> Option<String> {
    (!s.trim().is_empty()).then(|| s.to_string())
}

/// The model to load: the flag, else the name recorded with the SAE when it is one we can
/// load, else the default.
fn model_spec(flag: Option<&str>, recorded: &str) -> String {
    if let Some(m) = flag {
        return m.to_string();
    }
    if recorded == DEFAULT_MODEL || (!recorded.is_empty() && Path::new(recorded).exists()) {
        return recorded.to_string();
    }
    DEFAULT_MODEL.to_string()
}

#[derive(Args)]
pub struct ServeArgs {
    /// Analysis directory written by `sae analyze`.
    #[arg(long)]
    analysis: PathBuf,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to bind; the default only accepts connections from this machine.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// SAE for the live text box [default: the one recorded in the analysis].
    #[arg(long)]
    sae: Option<PathBuf>,
    /// Model for the live text box [default: the one recorded in the analysis].
    #[arg(long)]
    model: Option<String>,
    /// Serve the stored analysis only (no model loaded, no text box).
    #[arg(long)]
    no_model: bool,
    /// Most tokens the text box encodes at once.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Worker threads answering requests.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Seconds a client may take to send a request (and to read the answer); slower ones
    /// are cut off with 408, so they cannot tie up the server.
    #[arg(long, default_value_t = 10)]
    request_timeout: u64,
}

/// Refuses an `--analysis` path that is not an analysis directory, saying what it is instead.
fn check_analysis_dir(dir: &Path) -> anyhow::Result<()> {
    let shown = dir.display();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--analysis {shown}: no such directory; make it with `sae analyze --sae SAE_DIR --out {shown}`"
        ),
        Err(e) => bail!("--analysis {shown}: cannot read it ({e})"),
    };
    if !meta.is_dir() {
        bail!(
            "--analysis {shown}: is a file, not a directory; pass the directory `sae analyze --out` wrote"
        );
    }
    if dir.join(sae_browser::format::META_FILE).exists() {
        return Ok(());
    }
    let fix = "run `sae analyze --sae SAE_DIR --out ANALYSIS_DIR` and pass --analysis ANALYSIS_DIR";
    if dir.join("cfg.json").exists() {
        bail!(
            "--analysis {shown}: this is an SAE directory, not an analysis; run `sae analyze --sae {shown} --out ANALYSIS_DIR` and pass --analysis ANALYSIS_DIR"
        );
    }
    if dir.join("manifest.json").exists() {
        bail!("--analysis {shown}: this is an activation store, not an analysis; {fix}");
    }
    bail!("--analysis {shown}: not an analysis directory (it has no meta.json); {fix}")
}

pub fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if a.request_timeout == 0 {
        bail!("--request-timeout must be at least 1 (seconds)");
    }
    check_analysis_dir(&a.analysis)?;
    let analysis = Analysis::open(&a.analysis)
        .with_context(|| format!("--analysis {}", a.analysis.display()))?;
    let encoder: Option<Box<dyn sae_browser::TextEncoder>> = if a.no_model {
        None
    } else {
        let meta = &analysis.meta;
        let sae_dir = a.sae.clone().unwrap_or_else(|| PathBuf::from(&meta.sae));
        let sae = sae_core::saelens::load(&sae_dir).with_context(|| {
            format!(
                "loading the SAE {} for the text box (pass --sae DIR, or --no-model to serve without it)",
                sae_dir.display()
            )
        })?;
        if sae.d_sae != meta.d_sae {
            bail!(
                "the SAE in {} has {} latents but the analysis {}; pass the SAE it was made with (--sae)",
                sae_dir.display(),
                sae.d_sae,
                meta.d_sae
            );
        }
        let spec = a.model.clone().unwrap_or_else(|| meta.model.clone());
        eprintln!("loading model {spec} for the text box ...");
        let model = LanguageModel::load(&spec)
            .with_context(|| format!("loading model {spec} (pass --model, or --no-model)"))?;
        let source = ModelSource::new(model, &meta.hook)?;
        Some(Box::new(SaeTextEncoder::new(source, sae, a.max_tokens)?))
    };
    let n = analysis.d_sae();
    let live = encoder.is_some();
    let opts = ServeOptions {
        threads: a.threads,
        request_timeout: std::time::Duration::from_secs(a.request_timeout),
        ..ServeOptions::default()
    };
    let server = start_with(Browser::new(analysis, encoder), &a.host, a.port, &opts)?;
    let addr = server.addr();
    if !addr.ip().is_loopback() {
        eprintln!("warning: listening on {addr}, reachable from other machines");
    }
    println!(
        "serving {} ({n} latents{}) at {} (Ctrl+C to stop)",
        a.analysis.display(),
        if live {
            ", text box live"
        } else {
            ", no text box"
        },
        server.url()
    );
    server.wait();
    Ok(())
}
