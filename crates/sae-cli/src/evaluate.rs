//! `sae eval`, `sae sweep`, `sae demo` (owner: sae-eval). Flags only; the work is in
//! `sae_eval::pipeline`.

use anyhow::{bail, Result};
use clap::Args;
use sae_core::ArchKind;
use sae_eval::pipeline::{self, EvalOptions, SweepOptions};
use sae_lm::ProductPrecision;
use sae_train::config::{check_count, check_positive};
use std::path::PathBuf;

/// Parses counts like `200_000` or `200000`.
fn parse_count(s: &str) -> Result<usize, String> {
    s.replace('_', "")
        .parse::<usize>()
        .map_err(|e| format!("'{s}' is not a count: {e}"))
}

fn parse_list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    s.split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.replace('_', "")
                .parse::<T>()
                .map_err(|e| format!("'{v}': {e}"))
        })
        .collect()
}

#[derive(Args)]
pub struct EvalArgs {
    /// SAE directory (cfg.json + sae_weights.safetensors).
    #[arg(long)]
    pub sae: PathBuf,
    /// "smollm2-135m", a .gguf file, or a Hugging Face model directory.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// "python-docs", a directory of .txt/.jsonl files, or one such file.
    #[arg(long, default_value = "python-docs")]
    pub corpus: String,
    /// Held-out tokens to evaluate on (BOS not counted).
    #[arg(long, value_parser = parse_count, default_value = "200_000", allow_negative_numbers = true)]
    pub tokens: usize,
    /// Context length (BOS included).
    #[arg(long, default_value_t = 128)]
    pub ctx: usize,
    /// Contexts per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Hook to splice at (default: the SAE's, from cfg.json).
    #[arg(long)]
    pub hook: Option<String>,
    /// Corpus tokens to skip before the evaluation text (default: the size of the activation
    /// store the SAE was trained on, so evaluation text is held out).
    #[arg(long, value_parser = parse_count)]
    pub skip_tokens: Option<usize>,
    /// Output directory (default: <sae>/eval).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Precision of the model's weight products in the evaluation: f32 (the default), bf16
    /// or bf16x3, as `sae harvest --compute`. Clean and spliced passes use the same; the
    /// report records it.
    #[arg(long, default_value = "f32")]
    pub compute: ProductPrecision,
}

/// Range checks of the `sae eval` flags, before the model or the text is loaded.
fn check_eval_flags(a: &EvalArgs) -> Result<()> {
    check_count("tokens", a.tokens as u64, "held-out tokens to evaluate on")?;
    check_ctx("ctx", a.ctx)?;
    check_count("batch", a.batch as u64, "contexts per forward pass")?;
    Ok(())
}

fn check_ctx(field: &'static str, ctx: usize) -> Result<()> {
    if ctx < 2 {
        bail!(
            "--{} must be at least 2 (BOS and one token); got {ctx}",
            field
        );
    }
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    check_eval_flags(&a)?;
    if let Some(note) = a.compute.slow_here() {
        eprintln!("{note}");
    }
    let r = pipeline::run_eval(&EvalOptions {
        sae: a.sae,
        model: a.model,
        corpus: a.corpus,
        tokens: a.tokens,
        ctx: a.ctx,
        batch: a.batch,
        hook: a.hook,
        skip_tokens: a.skip_tokens,
        out: a.out,
        products: a.compute,
    })?;
    println!(
        "L0 {:.2}  FVU {:.4}  MSE {:.4}  gamma {:.4}  CE clean {:.4}  SAE {:.4}  zero {:.4}  mean {:.4}  delta LM loss {:.4}  loss recovered {:.4}  dead {}  dense {}",
        r.l0, r.fvu, r.mse, r.gamma, r.ce_clean, r.ce_sae, r.ce_zero, r.ce_mean_ablation,
        r.delta_lm_loss, r.loss_recovered, r.firing.dead, r.firing.dense
    );
    Ok(())
}

#[derive(Args)]
pub struct SweepArgs {
    /// Activation store from `sae harvest` (every run trains on it).
    #[arg(long, required_unless_present = "report_only")]
    pub acts: Option<PathBuf>,
    /// Architectures: gated, relu, topk, batchtopk, jumprelu (comma-separated).
    #[arg(long, default_value = "gated,relu")]
    pub arch: String,
    /// Sparsity coefficients for gated/relu/jumprelu (comma-separated), for every such
    /// architecture (`--l1 1,2,4`) or for one (`--l1 gated=1,2,4 --l1 relu=0.5,1`); repeatable.
    #[arg(long, allow_negative_numbers = true)]
    pub l1: Vec<String>,
    /// k values for topk/batchtopk (comma-separated).
    #[arg(long, default_value = "")]
    pub k: String,
    /// Dictionary size (default 8 x d_in).
    #[arg(long, value_parser = parse_count)]
    pub d_sae: Option<usize>,
    /// Training steps per run (or --tokens; default one pass over the store).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Training tokens per run.
    #[arg(long, value_parser = parse_count)]
    pub tokens: Option<usize>,
    #[arg(long, default_value_t = 4096)]
    pub batch_size: usize,
    /// Peak learning rate for every run (default: each architecture's, see `sae train --help`).
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Hook (default: the store's).
    #[arg(long)]
    pub hook: Option<String>,
    /// Evaluation corpus (default: the store's; its harvested text is skipped).
    #[arg(long)]
    pub corpus: Option<String>,
    /// Held-out tokens for each evaluation.
    #[arg(long, value_parser = parse_count, default_value = "50_000", allow_negative_numbers = true)]
    pub eval_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub ctx: usize,
    /// Contexts per evaluation forward pass.
    #[arg(long, default_value_t = 8)]
    pub eval_batch: usize,
    /// Precision of the model's weight products in the evaluation: f32 (the default), bf16
    /// or bf16x3, as `sae harvest --compute`. Clean and spliced passes use the same; the
    /// report records it.
    #[arg(long, default_value = "f32")]
    pub compute: ProductPrecision,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sweep directory (runs/<name>/, sweep.json, sweep.csv, report.md, plots); finished runs
    /// in it are evaluated again, not retrained.
    #[arg(long)]
    pub out: PathBuf,
    /// Train finished runs in --out that saw fewer tokens than --tokens/--steps on to that
    /// many (`sae train --extend`), instead of evaluating them as they are.
    #[arg(long)]
    pub extend: bool,
    /// Keep each run's final checkpoint (optimiser state) in runs/<name>/checkpoint/, so a
    /// later --extend continues it exactly (about 3x the SAE's size on disk).
    #[arg(long)]
    pub keep_state: bool,
    /// Redraw report.md, sweep.csv and the plots in --out from its sweep.json; trains and
    /// evaluates nothing.
    #[arg(long)]
    pub report_only: bool,
}

/// Sparsity coefficients per architecture.
type L1ByArch = Vec<(ArchKind, Vec<f32>)>;

/// `--l1` occurrences: "a,b" (every architecture) or "arch=a,b" (that one).
fn parse_l1(specs: &[String]) -> Result<(Vec<f32>, L1ByArch)> {
    let (mut all, mut by_arch) = (Vec::new(), L1ByArch::new());
    for spec in specs {
        let values = |v: &str| parse_list::<f32>(v).map_err(|e| anyhow::anyhow!("--l1 {e}"));
        match spec.split_once('=') {
            Some((arch, v)) => {
                let arch: ArchKind = arch
                    .trim()
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--l1 {spec}: {e}"))?;
                if by_arch.iter().any(|(a, _)| *a == arch) {
                    anyhow::bail!("--l1 {arch}=... given twice; list all its values in one (--l1 {arch}=1,2,4)");
                }
                by_arch.push((arch, values(v)?));
            }
            None => all.extend(values(spec)?),
        }
    }
    Ok((all, by_arch))
}

pub fn sweep(a: SweepArgs) -> Result<()> {
    if a.report_only {
        let r = pipeline::rerender(&a.out)?;
        print_result(&r, &a.out);
        return Ok(());
    }
    check_sweep_flags(&a)?;
    if let Some(note) = a.compute.slow_here() {
        eprintln!("{note}");
    }
    let (l1, l1_by_arch) = parse_l1(&a.l1)?;
    let Some(acts) = a.acts else {
        bail!("--acts is required (the activation store to train on)");
    };
    let r = pipeline::run_sweep(&SweepOptions {
        acts,
        archs: parse_list::<ArchKind>(&a.arch).map_err(|e| anyhow::anyhow!("--arch {e}"))?,
        l1,
        l1_by_arch,
        k: parse_list::<usize>(&a.k).map_err(|e| anyhow::anyhow!("--k {e}"))?,
        d_sae: a.d_sae,
        steps: a.steps,
        tokens: a.tokens.map(|t| t as u64),
        batch_size: a.batch_size,
        lr: a.lr,
        model: a.model,
        hook: a.hook,
        corpus: a.corpus,
        eval_tokens: a.eval_tokens,
        ctx: a.ctx,
        eval_batch: a.eval_batch,
        seed: a.seed,
        out: a.out.clone(),
        extend: a.extend,
        keep_state: a.keep_state,
        note: String::new(),
        products: a.compute,
    })?;
    print_result(&r, &a.out);
    Ok(())
}

/// Range checks of the `sae sweep` flags, before the store, the model or --out is touched
/// (each run's own training settings are checked again by `sae_train`).
fn check_sweep_flags(a: &SweepArgs) -> Result<()> {
    if let Some(d) = a.d_sae {
        check_count("d_sae", d as u64, "latents in the dictionary")?;
    }
    if let Some(s) = a.steps {
        check_count("steps", s, "training steps per run")?;
    }
    if let Some(t) = a.tokens {
        check_count("tokens", t as u64, "training tokens per run")?;
    }
    check_count("batch_size", a.batch_size as u64, "rows per training step")?;
    if let Some(lr) = a.lr {
        check_positive("lr", lr)?;
    }
    // No held-out tokens would evaluate nothing: every run's metrics would be 0/0.
    check_count(
        "eval_tokens",
        a.eval_tokens as u64,
        "held-out tokens for each evaluation",
    )?;
    check_ctx("ctx", a.ctx)?;
    check_count(
        "eval_batch",
        a.eval_batch as u64,
        "contexts per forward pass",
    )?;
    Ok(())
}

fn print_result(r: &pipeline::SweepResult, out: &std::path::Path) {
    for row in &r.rows {
        println!(
            "{:<22} L0 {:>8.2}  delta LM loss {:.4}  FVU {:.4}  gamma {:.4}  loss recovered {:.4}",
            row.run.name,
            row.eval.l0,
            row.eval.delta_lm_loss,
            row.eval.fvu,
            row.eval.gamma,
            row.eval.loss_recovered
        );
    }
    for (name, why) in &r.failed {
        println!("{name}: FAILED: {why}");
    }
    if let Some(c) = &r.comparison {
        println!("{}", c.verdict);
    }
    println!("report: {}", out.join("report.md").display());
}

#[derive(Args)]
pub struct DemoArgs {
    /// Output directory.
    #[arg(long, default_value = "demo")]
    pub out: PathBuf,
    /// A few-minute smoke run (4 x 576 latents, one run per architecture, far fewer tokens).
    #[arg(long)]
    pub quick: bool,
}

pub fn demo(a: DemoArgs) -> Result<()> {
    let r = pipeline::run_demo(&a.out, a.quick)?;
    print_result(&r, &a.out);
    Ok(())
}
