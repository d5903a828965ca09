//! The training loop.

use crate::checkpoint::{self, Progress, Window};
use crate::config::{lr_at, resolve, sparsity_at, BDecInit, Resolved, TrainConfig};
use crate::init;
use crate::model_source::{ModelSource, ModelSourceOptions};
use crate::source::{BatchSource, StoreSource};
use anyhow::{bail, Context, Result};
use sae_core::metrics::ReconMetrics;
use sae_core::{Sae, SaeTrainer, StepStats, TrainHyper};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const LOG_FILE: &str = "train_log.jsonl";
pub const SUMMARY_FILE: &str = "train_summary.json";
pub const CONFIG_FILE: &str = "train_config.json";

/// Metrics of the finished SAE (folded weights, raw inputs) on a sample of the activations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalMetrics {
    pub eval_tokens: u64,
    pub l0: f64,
    pub mse: f64,
    pub fvu: f64,
    /// Relative reconstruction bias: E||x_hat||^2 / E[x_hat . x] (1 = no shrinkage).
    pub gamma: f64,
    /// Latents that did not fire in the last `dead_window_tokens` training tokens.
    pub dead_latents: usize,
    /// Latents that fired on no token of the evaluation sample.
    pub unfired_in_eval: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub out_dir: PathBuf,
    pub arch: String,
    pub d_in: usize,
    pub d_sae: usize,
    pub steps: u64,
    pub tokens: u64,
    pub resolved: Resolved,
    /// Input scale folded into the saved weights (1 without normalisation).
    pub scale: f32,
    /// Rows with a larger norm (raw scale) were left out of training; none when absent.
    #[serde(default)]
    pub max_norm: Option<f32>,
    /// Rows left out for their norm.
    #[serde(default)]
    pub rows_skipped: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Step at which this run was resumed, if it was.
    pub resumed_at_step: Option<u64>,
    pub last_step: StepStats,
    pub final_metrics: FinalMetrics,
}

/// `<out>.partial`: the working directory with the log and checkpoints of an unfinished run.
pub fn partial_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("{}: not a directory name", out.display()))?;
    Ok(out.with_file_name(format!("{}.partial", name.to_string_lossy())))
}

/// Trains on the activation files of `cfg.acts`, or straight from `cfg.model` at `cfg.hook`.
pub fn run(cfg: &TrainConfig) -> Result<TrainSummary> {
    if let Some(acts) = &cfg.acts {
        if cfg.model.is_some() {
            bail!("give either --acts or --model, not both");
        }
        let mut source = StoreSource::open(acts, cfg.seed)?;
        return run_with_source(cfg, &mut source);
    }
    let (Some(model), Some(hook)) = (&cfg.model, &cfg.hook) else {
        bail!("no activations given: pass --acts DIR_OR_FILE, or --model M --hook H --corpus C");
    };
    let (steps, tokens) = (cfg.steps, cfg.tokens);
    let rows = match (steps, tokens) {
        (Some(s), _) => s.saturating_mul(cfg.batch_size as u64),
        (None, Some(t)) => t,
        (None, None) => bail!("training from --model needs --steps or --tokens"),
    };
    // The corpus should cover training, the initialisation sample, the final evaluation and
    // what sits in the buffer, without repeating.
    let need = rows as usize + cfg.init_sample + cfg.eval_tokens + cfg.buffer_rows;
    let mut source = ModelSource::start(ModelSourceOptions {
        model: model.clone(),
        hook: hook.clone(),
        corpus: cfg.corpus.clone(),
        ctx: cfg.ctx,
        tokens: need,
        buffer_rows: cfg.buffer_rows,
        batch_contexts: 16,
        seed: cfg.seed,
    })?;
    run_with_source(cfg, &mut source)
}

/// Trains on any batch source (the store, a model, memory).
pub fn run_with_source(cfg: &TrainConfig, source: &mut dyn BatchSource) -> Result<TrainSummary> {
    match cfg.threads {
        Some(t) => {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
            pool.install(|| train(cfg, source))
        }
        None => train(cfg, source),
    }
}

/// Fields that must match for `--resume` to continue a run.
fn run_identity(cfg: &TrainConfig, r: &Resolved) -> serde_json::Value {
    serde_json::json!({
        "arch": cfg.arch, "d_in": r.d_in, "d_sae": r.d_sae, "k": cfg.k, "batch_size": cfg.batch_size,
        "seed": cfg.seed, "normalize": cfg.normalize, "b_dec_init": cfg.b_dec_init,
        // Floats as their shortest f32 text, so they compare equal after a JSON round trip.
        "adam_beta1": cfg.adam_beta1.to_string(), "adam_beta2": cfg.adam_beta2.to_string(),
        "adam_eps": cfg.adam_eps.to_string(),
        "relu_decoder_norm_l1": cfg.relu_decoder_norm_l1,
    })
}

fn hyper_of(cfg: &TrainConfig) -> TrainHyper {
    TrainHyper {
        adam_beta1: cfg.adam_beta1,
        adam_beta2: cfg.adam_beta2,
        adam_eps: cfg.adam_eps,
        aux_coeff: cfg.aux_coeff,
        k_aux: cfg.k_aux,
        jumprelu_bandwidth: cfg.jumprelu_bandwidth,
        dead_window_tokens: cfg.dead_window_tokens,
        relu_decoder_norm_l1: cfg.relu_decoder_norm_l1,
    }
}

/// A fresh SAE with b_dec from the data, and the input scale.
fn initialise(
    cfg: &TrainConfig,
    r: &Resolved,
    source: &mut dyn BatchSource,
) -> Result<(SaeTrainer, f32, f32)> {
    let d = r.d_in;
    let n = match source.n_rows() {
        Some(rows) => (cfg.init_sample as u64).min(rows) as usize,
        None => cfg.init_sample,
    }
    .max(1);
    let mut sample = vec![0.0f32; n * d];
    source
        .sample(&mut sample, n)
        .context("reading the initialisation sample")?;
    let max_norm = if cfg.max_norm_ratio > 0.0 {
        crate::source::norm_limit(&sample, d, cfg.max_norm_ratio)
    } else {
        f32::INFINITY
    };
    let mut sample: Vec<f32> = sample
        .chunks(d)
        .filter(|r| crate::source::row_norm2(r) <= max_norm * max_norm)
        .flatten()
        .copied()
        .collect();
    let scale = if cfg.normalize {
        init::normalisation_scale(&sample, d)
    } else {
        1.0
    };
    sample.iter_mut().for_each(|v| *v *= scale);
    let mut sae = Sae::init(cfg.arch, d, r.d_sae, cfg.k, cfg.seed);
    sae.meta = source.meta();
    sae.b_dec = match cfg.b_dec_init {
        BDecInit::GeometricMedian => init::geometric_median(&sample, d, 100),
        BDecInit::Mean => init::mean(&sample, d),
        BDecInit::Zero => vec![0.0; d],
    };
    Ok((SaeTrainer::new(sae, hyper_of(cfg)), scale, max_norm))
}

struct Log {
    path: PathBuf,
    file: std::fs::File,
}

impl Log {
    fn open(path: PathBuf, truncate_to: Option<u64>) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if let Some(len) = truncate_to {
            file.set_len(len)
                .with_context(|| format!("truncating {}", path.display()))?;
        }
        Ok(Log { path, file })
    }

    fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}").with_context(|| format!("writing {}", self.path.display()))
    }

    fn len(&self) -> Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

fn progress_bar(cfg: &TrainConfig, steps: u64, start: u64) -> indicatif::ProgressBar {
    if cfg.quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:25}] step {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position(start);
    bar
}

fn train(cfg: &TrainConfig, source: &mut dyn BatchSource) -> Result<TrainSummary> {
    let d_in = source.d_in();
    let r = resolve(cfg, d_in, source.n_rows())?;
    let partial = partial_dir(&cfg.out)?;
    let identity = run_identity(cfg, &r);
    let config_path = partial.join(CONFIG_FILE);

    let (mut trainer, scale, max_norm, mut tokens, mut window, mut log, seconds_before, resumed_at) =
        if cfg.resume {
            let (sae, state, progress) = checkpoint::read(&partial)?.with_context(|| {
                format!(
                    "--resume: no checkpoint in {}; start without --resume",
                    partial.display()
                )
            })?;
            let old: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&config_path)
                    .with_context(|| format!("reading {}", config_path.display()))?,
            )
            .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
            let old_id = &old["identity"];
            if let Some(obj) = identity.as_object() {
                for (k, v) in obj {
                    if &old_id[k] != v {
                        bail!(
                        "--resume: {} was started with {k} = {}, now {k} = {v}; use the same settings or another --out",
                        partial.display(),
                        old_id[k]
                    );
                    }
                }
            }
            let mut trainer = SaeTrainer::new(sae, hyper_of(cfg));
            trainer.load_state(&state)?;
            match &progress.source_position {
                Some(p) => source
                    .seek(p)
                    .context("--resume: restoring the data position")?,
                None => eprintln!(
                "note: this activation source cannot seek; the resumed run sees different batches"
            ),
            }
            let log = Log::open(partial.join(LOG_FILE), Some(progress.log_bytes))?;
            let step = progress.step;
            (
                trainer,
                f32::from_bits(progress.scale_bits),
                f32::from_bits(progress.max_norm_bits),
                progress.tokens,
                progress.window,
                log,
                progress.seconds,
                Some(step),
            )
        } else {
            if partial.exists() {
                bail!(
                "{} holds an unfinished run; pass --resume to continue it, or delete it to start over",
                partial.display()
            );
            }
            std::fs::create_dir_all(&partial)
                .with_context(|| format!("creating {}", partial.display()))?;
            let (trainer, scale, max_norm) = initialise(cfg, &r, source)?;
            let text = serde_json::to_string_pretty(&serde_json::json!({
                "identity": identity, "config": cfg, "resolved": r,
            }))?;
            sae_core::saelens::write_atomic(&config_path, text.as_bytes())?;
            let log = Log::open(partial.join(LOG_FILE), Some(0))?;
            (
                trainer,
                scale,
                max_norm,
                0u64,
                Window::default(),
                log,
                0.0,
                None,
            )
        };
    let mut filtered = crate::source::NormFilter::new(source, max_norm);
    let source = &mut filtered;

    let bs = cfg.batch_size;
    let mut batch = vec![0.0f32; bs * d_in];
    let start = trainer.steps_done();
    let bar = progress_bar(cfg, r.steps, start);
    let t0 = Instant::now();
    let mut t_window = Instant::now();
    let mut tokens_window = 0u64;
    let mut last = StepStats::default();
    let log_every = cfg.log_every.max(1);
    while trainer.steps_done() < r.steps {
        let step = trainer.steps_done();
        source.next_batch(&mut batch, bs)?;
        if scale != 1.0 {
            batch.iter_mut().for_each(|v| *v *= scale);
        }
        let lr = lr_at(&r, cfg.lr_decay_steps, step);
        let coeff = sparsity_at(&r, step);
        let stats = trainer.step(&batch, bs, lr, coeff);
        if !stats.loss.is_finite() {
            bar.abandon();
            bail!(
                "step {step}: the loss is {} (mse {}, sparsity {}); training stopped. The last good checkpoint is in {}; \
                 lower --lr (now {lr}) or check the activations, then rerun with --resume or delete that directory",
                stats.loss,
                stats.mse,
                stats.sparsity_loss,
                checkpoint::dir(&partial).display()
            );
        }
        tokens += bs as u64;
        tokens_window += bs as u64;
        window.add(&stats);
        let done = trainer.steps_done();
        if done % log_every == 0 || done == r.steps {
            let w = window.steps.max(1) as f64;
            let secs = t_window.elapsed().as_secs_f64();
            let tps = tokens_window as f64 / secs.max(1e-9);
            log.write(&serde_json::json!({
                "step": done, "tokens": tokens, "lr": lr, "sparsity_coeff": coeff,
                "loss": window.loss / w, "mse": window.mse / w, "sparsity_loss": window.sparsity_loss / w,
                "aux_loss": window.aux_loss / w, "l0": window.l0 / w, "fvu": window.fvu / w,
                "dead_latents": stats.dead_latents, "tokens_per_s": tps,
            }))?;
            bar.set_message(format!(
                "{tps:.0} tok/s loss {:.4} (mse {:.4} sp {:.4} aux {:.4}) L0 {:.1} FVU {:.4} dead {}",
                window.loss / w,
                window.mse / w,
                window.sparsity_loss / w,
                window.aux_loss / w,
                window.l0 / w,
                window.fvu / w,
                stats.dead_latents
            ));
            window = Window::default();
            t_window = Instant::now();
            tokens_window = 0;
        }
        bar.set_position(done);
        if cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0 && done < r.steps {
            let progress = Progress {
                step: done,
                tokens,
                scale_bits: scale.to_bits(),
                max_norm_bits: max_norm.to_bits(),
                source_position: source.position(),
                log_bytes: log.len()?,
                window: window.clone(),
                seconds: seconds_before + t0.elapsed().as_secs_f64(),
            };
            checkpoint::write(&partial, &trainer, &progress)?;
        }
        last = stats;
    }
    bar.finish();
    let seconds = seconds_before + t0.elapsed().as_secs_f64();

    // The SAE for raw inputs, evaluated on a sample of raw activations.
    let mut sae = trainer.snapshot();
    sae.fold_activation_scale(scale);
    let final_metrics = evaluate(
        &sae,
        source,
        cfg.eval_tokens,
        &trainer,
        cfg.dead_window_tokens,
    )?;
    let summary = TrainSummary {
        out_dir: cfg.out.clone(),
        arch: cfg.arch.to_string(),
        d_in,
        d_sae: r.d_sae,
        steps: trainer.steps_done(),
        tokens,
        resolved: r.clone(),
        scale,
        max_norm: max_norm.is_finite().then_some(max_norm),
        rows_skipped: source.rows_skipped,
        seconds,
        tokens_per_s: (tokens - resumed_at.map_or(0, |s| s * bs as u64)) as f64
            / t0.elapsed().as_secs_f64().max(1e-9),
        resumed_at_step: resumed_at,
        last_step: last,
        final_metrics,
    };
    drop(log);
    publish(&cfg.out, &partial, &sae, &summary)?;
    Ok(summary)
}

fn evaluate(
    sae: &Sae,
    source: &mut dyn BatchSource,
    n: usize,
    trainer: &SaeTrainer,
    window: u64,
) -> Result<FinalMetrics> {
    let d = sae.d_in;
    let n = match source.n_rows() {
        Some(rows) => (n as u64).min(rows) as usize,
        None => n,
    };
    let mut m = ReconMetrics::new(d, sae.d_sae);
    if n > 0 {
        let mut x = vec![0.0f32; n * d];
        source
            .sample(&mut x, n)
            .context("reading the evaluation sample")?;
        for chunk in x.chunks(4096 * d) {
            let rows = chunk.len() / d;
            let code = sae.encode(chunk, rows);
            let x_hat = sae.decode(&code);
            m.add(chunk, &x_hat, &code);
        }
    }
    Ok(FinalMetrics {
        eval_tokens: m.n_tokens,
        l0: m.l0(),
        mse: m.mse(),
        fvu: m.fvu(),
        gamma: m.gamma(),
        dead_latents: trainer
            .tokens_since_fired()
            .iter()
            .filter(|&&t| t >= window)
            .count(),
        unfired_in_eval: m.fire_counts().iter().filter(|&&c| c == 0).count(),
    })
}

/// Builds the output directory beside `out` and swaps it in: an existing `out` is replaced
/// only once the new one is complete. Removes the working directory afterwards.
fn publish(out: &Path, partial: &Path, sae: &Sae, summary: &TrainSummary) -> Result<()> {
    let name = out
        .file_name()
        .context("output has no directory name")?
        .to_string_lossy()
        .to_string();
    let staging = out.with_file_name(format!(".{name}.new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let built = (|| -> Result<()> {
        sae_core::saelens::save(sae, &staging)?;
        std::fs::copy(partial.join(LOG_FILE), staging.join(LOG_FILE))
            .with_context(|| format!("copying {}", LOG_FILE))?;
        std::fs::copy(partial.join(CONFIG_FILE), staging.join(CONFIG_FILE))
            .with_context(|| format!("copying {}", CONFIG_FILE))?;
        let text = serde_json::to_string_pretty(summary)?;
        sae_core::saelens::write_atomic(&staging.join(SUMMARY_FILE), text.as_bytes())?;
        Ok(())
    })();
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.context(format!("writing the SAE to {}", out.display())));
    }
    let old = out.with_file_name(format!(".{name}.old-{}", std::process::id()));
    let had_old = out.exists();
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(out, &old)
            .with_context(|| format!("moving the previous {} aside", out.display()))?;
    }
    if let Err(e) = std::fs::rename(&staging, out) {
        if had_old {
            let _ = std::fs::rename(&old, out);
        }
        return Err(anyhow::Error::new(e).context(format!("renaming into {}", out.display())));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    let _ = std::fs::remove_dir_all(partial);
    Ok(())
}
