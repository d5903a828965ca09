//! `sae train`, `sae info`, `sae synth` and `sae bench`.

use anyhow::{bail, Result};
use clap::Args;
use sae_core::ArchKind;
use sae_store::synth::{write_synthetic, SynthConfig};
use sae_store::writer::StoreDtype;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub flags: sae_train::TrainFlags,
}

pub fn train(args: TrainArgs) -> Result<()> {
    let cfg = args.flags.to_config()?;
    let s = sae_train::run(&cfg)?;
    let f = &s.final_metrics;
    println!(
        "trained {} SAE d_in {} d_sae {}: {} steps, {} tokens in {:.1} s ({:.0} tokens/s)",
        s.arch, s.d_in, s.d_sae, s.steps, s.tokens, s.seconds, s.tokens_per_s
    );
    println!(
        "final ({} tokens): L0 {:.2}  FVU {:.4}  MSE {:.4}  gamma {:.3}  dead {}",
        f.eval_tokens, f.l0, f.fvu, f.mse, f.gamma, f.dead_latents
    );
    println!("saved to {}", s.out_dir.display());
    Ok(())
}

#[derive(Args)]
pub struct InfoArgs {
    /// SAE directory (cfg.json + sae_weights.safetensors).
    pub dir: PathBuf,
}

pub fn info(args: InfoArgs) -> Result<()> {
    print!("{}", sae_train::info::describe(&args.dir)?);
    Ok(())
}

/// A size flag: a whole number, 1 or more.
fn positive_size(s: &str) -> Result<usize, String> {
    match s.replace('_', "").parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!(
            "'{s}' is not a whole number from 1 to {} ({e})",
            usize::MAX
        )),
    }
}

/// A mean count of active features: a number above 0 (at most --n-features, checked later).
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        Ok(_) => Err("must be a number above 0 and at most --n-features".into()),
        Err(e) => Err(format!("'{s}' is not a number ({e})")),
    }
}

/// A standard deviation: a finite number, 0 or more.
fn non_negative(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        Ok(_) => Err("must be a finite number, 0 or more".into()),
        Err(e) => Err(format!("'{s}' is not a number ({e})")),
    }
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "64", value_parser = positive_size)]
    pub d_in: usize,
    #[arg(long, default_value = "256", value_parser = positive_size)]
    pub n_features: usize,
    #[arg(long, default_value = "200_000", value_parser = positive_size)]
    pub n_tokens: usize,
    /// Mean number of active features per token (above 0, at most --n-features).
    #[arg(long, default_value = "5", value_parser = positive_rate)]
    pub l0: f64,
    /// Standard deviation of the Gaussian noise per dimension (0 or more).
    #[arg(long, default_value = "0.01", value_parser = non_negative)]
    pub noise: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "65_536", value_parser = positive_size)]
    pub rows_per_shard: usize,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: StoreDtype,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    let cfg = SynthConfig {
        d_in: a.d_in,
        n_features: a.n_features,
        n_tokens: a.n_tokens,
        l0: a.l0,
        noise: a.noise,
        seed: a.seed,
        rows_per_shard: a.rows_per_shard,
        dtype: a.dtype,
    };
    let m = write_synthetic(&a.out, &cfg)?;
    println!(
        "wrote {} tokens (d_in {}) in {} shards and {} true features to {}",
        m.n_tokens,
        m.d_in,
        m.shards.len(),
        a.n_features,
        a.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct BenchArgs {
    /// Comma-separated architectures [default: every family `sae archs` lists].
    #[arg(long, value_delimiter = ',')]
    pub archs: Vec<String>,
    /// Comma-separated dictionary sizes.
    #[arg(long, value_delimiter = ',', default_value = "4608,9216")]
    pub d_sae: Vec<usize>,
    #[arg(long, default_value_t = 576)]
    pub d_in: usize,
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Timed steps per configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Active latents per token the benchmark SAEs are set up for (k of topk).
    #[arg(long, default_value_t = sae_core::bench::BENCH_L0)]
    pub l0: usize,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let archs = if a.archs.is_empty() {
        ArchKind::all().map(|k| k.as_str().to_string()).collect()
    } else {
        a.archs.clone()
    };
    let archs = archs
        .iter()
        .map(|s| s.parse::<ArchKind>().map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    if a.d_sae.is_empty() || a.d_sae.contains(&0) || a.d_in == 0 || a.batch == 0 || a.l0 == 0 {
        bail!("--d-sae, --d-in, --batch and --l0 must be positive");
    }
    println!(
        "sae bench: d_in {}, batch {}, L0 about {}, {} timed steps, {} threads",
        a.d_in,
        a.batch,
        a.l0,
        a.steps,
        rayon_threads()
    );
    println!("{}", sae_core::bench::BenchRow::header());
    for &d_sae in &a.d_sae {
        for row in sae_core::bench::run_bench(&archs, &[d_sae], a.d_in, a.batch, a.steps, a.l0) {
            println!("{row}");
        }
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `sae archs`: every registered family with what a user sets for it.
pub fn archs() {
    use sae_core::arch::Sparsity;
    for a in ArchKind::all() {
        let f = a.family();
        let sparsity = match f.sparsity() {
            Sparsity::K => "--k (active latents per token)".to_string(),
            Sparsity::Penalty { default } => format!("--l1 (default {default})"),
        };
        println!("{}: {}", f.name(), f.about());
        println!(
            "  saved as SAELens '{}'; sparsity {sparsity}; lr default {} at d_sae 16384",
            f.saelens_name(),
            f.default_lr(16384)
        );
        if f.resamplable() {
            println!("  dead-latent resampling: --resample-steps");
        }
        for o in f.options() {
            println!("  --arch-opt {}=...  {}", o.name, o.help);
        }
    }
}
