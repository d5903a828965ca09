//! `sae train`, `sae info`, `sae synth` and `sae bench`.

use anyhow::{bail, Context, Result};
use clap::Args;
use sae_core::ArchKind;
use sae_store::synth::{write_synthetic, SynthConfig};
use sae_store::writer::{Manifest, StoreDtype, MANIFEST};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub flags: sae_train::TrainFlags,
}

pub fn train(args: TrainArgs) -> Result<()> {
    let cfg = args.flags.to_config()?;
    let start = std::time::Instant::now();
    let summaries = sae_train::run_hooks(&cfg)?;
    for s in &summaries {
        print_summary(s, summaries.len() > 1);
    }
    if summaries.len() > 1 {
        println!(
            "trained {} SAEs from one forward pass per batch in {:.1} s wall",
            summaries.len(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn print_summary(s: &sae_train::TrainSummary, with_hook: bool) {
    if with_hook {
        println!("{}:", s.out_dir.display());
    }
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
}

#[derive(Args)]
pub struct InfoArgs {
    /// SAE directory (cfg.json + sae_weights.safetensors), activation store (manifest.json),
    /// or a folder of them, one per hook (`--hook A,B` with `sae harvest` or `sae train`).
    pub dir: PathBuf,
}

pub fn info(args: InfoArgs) -> Result<()> {
    let dir = &args.dir;
    let is_sae = |d: &Path| d.join("cfg.json").is_file();
    let is_store = |d: &Path| d.join(MANIFEST).is_file();
    if is_sae(dir) || !dir.is_dir() {
        print!("{}", sae_train::info::describe(dir)?);
        return Ok(());
    }
    if is_store(dir) {
        print!("{}", describe_store(dir)?);
        return Ok(());
    }
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && (is_sae(p) || is_store(p)))
        .collect();
    if subs.is_empty() {
        // The SAE reader's message says what an SAE directory should hold.
        print!("{}", sae_train::info::describe(dir)?);
        return Ok(());
    }
    subs.sort();
    for sub in subs {
        if is_sae(&sub) {
            print!("{}", sae_train::info::describe(&sub)?);
        } else {
            print!("{}", describe_store(&sub)?);
        }
    }
    Ok(())
}

/// What an activation store's manifest records.
fn describe_store(dir: &Path) -> Result<String> {
    use std::fmt::Write;
    let m = Manifest::read(dir)?;
    let mut s = String::new();
    writeln!(s, "{} (activation store)", dir.display())?;
    writeln!(s, "  model       {}", m.model)?;
    writeln!(s, "  hook        {}", m.hook)?;
    writeln!(s, "  d_in        {}", m.d_in)?;
    writeln!(
        s,
        "  context     {}{}",
        m.context_size,
        if m.bos_excluded {
            " (BOS rows left out)"
        } else {
            ""
        }
    )?;
    writeln!(s, "  corpus      {}", m.corpus)?;
    writeln!(
        s,
        "  tokens      {} of {} asked for{}, in {} shards",
        m.n_tokens,
        m.target_tokens,
        if m.complete {
            ""
        } else {
            " (unfinished: rerun the same harvest to resume)"
        },
        m.shards.len()
    )?;
    writeln!(s, "  dtype       {:?}", m.dtype)?;
    writeln!(
        s,
        "  compute     {}",
        m.compute.as_deref().unwrap_or("not recorded")
    )?;
    writeln!(
        s,
        "  token ids   {}",
        if m.has_tokens { "stored" } else { "not stored" }
    )?;
    Ok(s)
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
    /// Active latents per token the benchmark SAEs are set up for (k of topk); several,
    /// comma-separated, are timed one right after the other and compared with the first.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub l0: Vec<usize>,
    /// Rounds over every configuration; with several, the best of each is compared (on a
    /// shared machine the best is the quietest moment) and each round's ratios are shown.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// f32, bf16, bf16-sparse, f32-bf16-sparse, f32-screened or bf16x3 (as `sae train
    /// --precision`).
    #[arg(long, default_value = "f32", value_parser = |s: &str| s.parse::<sae_core::Precision>())]
    pub precision: sae_core::Precision,
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
    let positive = |v: &[usize]| !v.is_empty() && !v.contains(&0);
    if !positive(&a.d_sae) || !positive(&a.l0) || a.d_in == 0 || a.batch == 0 || a.rounds == 0 {
        bail!("--d-sae, --d-in, --batch, --l0 and --rounds must be positive");
    }
    let l0s: Vec<String> = a.l0.iter().map(|l| l.to_string()).collect();
    println!(
        "sae bench: d_in {}, batch {}, L0 about {}, {} timed steps, {} round{}, {} threads, precision {}",
        a.d_in,
        a.batch,
        l0s.join(" and "),
        a.steps,
        a.rounds,
        if a.rounds == 1 { "" } else { "s" },
        rayon_threads(),
        a.precision
    );
    println!("cpu: {}", sae_core::cpu::summary());
    let several = a.rounds > 1 || a.l0.len() > 1;
    match several {
        true => println!(
            "{:<9} {:>6} {}",
            "round",
            "L0",
            sae_core::bench::BenchRow::header()
        ),
        false => println!("{}", sae_core::bench::BenchRow::header()),
    }
    let comparisons = sae_core::bench::run_l0_rounds(
        &archs,
        &a.d_sae,
        a.d_in,
        a.batch,
        a.steps,
        &a.l0,
        a.precision,
        a.rounds,
        |round, l0, row| match several {
            true => println!("{:<9} {:>6} {row}", format!("{round}/{}", a.rounds), l0),
            false => println!("{row}"),
        },
    );
    if several {
        print!("{}", l0_summary(&comparisons));
    }
    Ok(())
}

/// The best tokens/s of every configuration at each L0 over the rounds; with several L0s,
/// each against the first, best against best and round by round.
fn l0_summary(comparisons: &[sae_core::bench::L0Comparison]) -> String {
    use std::fmt::Write;
    let Some(first) = comparisons.first() else {
        return String::new();
    };
    let (l0s, rounds) = (&first.l0s, first.tokens.len());
    let mut s = format!(
        "\nbest of {rounds} round{}, tokens/s",
        if rounds == 1 { "" } else { "s" }
    );
    if l0s.len() > 1 {
        let _ = write!(
            s,
            "; L0 {} against L0 {} (best against best, then by round)",
            l0s[1..]
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            l0s[0]
        );
    }
    let _ = write!(s, "\n{:<10} {:>7}", "arch", "d_sae");
    for l in l0s {
        let _ = write!(s, " {:>10}", format!("L0 {l}"));
    }
    for l in &l0s[1..] {
        let _ = write!(s, " {:>8} {:>11}", format!("{l}/{}", l0s[0]), "by round");
    }
    s.push('\n');
    for c in comparisons {
        let _ = write!(s, "{:<10} {:>7}", c.arch.as_str(), c.d_sae);
        for i in 0..l0s.len() {
            let _ = write!(s, " {:>10.0}", c.best(i));
        }
        for i in 1..l0s.len() {
            let r = c.round_ratios(i);
            let (lo, hi) = r
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let _ = write!(
                s,
                " {:>8.2} {:>11}",
                c.best_ratio(i),
                format!("{lo:.2}-{hi:.2}")
            );
        }
        s.push('\n');
    }
    s
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
        for o in f.train_options() {
            println!("  --arch-opt {}=...  {} [training only]", o.name, o.help);
        }
    }
}
