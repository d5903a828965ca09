//! The training loop.

use crate::checkpoint::{self, Progress, Window};
use crate::config::{
    lr_at, resample_lr_factor, resolve, sparsity_at, BDecInit, Resolved, TrainConfig,
};
use crate::init;
use crate::l0_target::L0Target;
use crate::model_source::{ModelSource, ModelSourceOptions};
use crate::source::{BatchSource, StoreSource};
use anyhow::{bail, Context, Result};
use sae_core::metrics::ReconMetrics;
use sae_core::{Sae, SaeTrainer, StepStats};
use sae_output::{outdir::Input, OutputKind, OutputLock, ProgressGroup};
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
    /// Step at which this run was resumed or extended, if it was.
    pub resumed_at_step: Option<u64>,
    /// Each time this run was extended (`--extend`) after it had finished.
    #[serde(default)]
    pub extensions: Vec<Extension>,
    /// With `--target-l0`: the coefficient controller at the end (its `multiplier` times
    /// `resolved.sparsity_coeff` is the last coefficient).
    #[serde(default)]
    pub l0_target: Option<L0Target>,
    pub last_step: StepStats,
    pub final_metrics: FinalMetrics,
}

/// A finished run trained on further.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Extension {
    pub from_step: u64,
    pub from_tokens: u64,
    /// False: the run had no kept checkpoint, so Adam restarted with fresh moments (and a
    /// new lr warm-up) at `from_step`.
    pub optimizer_state_kept: bool,
}

/// `<out>.partial`: the working directory with the log and checkpoints of an unfinished run.
pub fn partial_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("{}: not a directory name", out.display()))?;
    Ok(out.with_file_name(format!("{}.partial", name.to_string_lossy())))
}

/// Trains on the activation files of `cfg.acts`, or straight from `cfg.model` at `cfg.hook`
/// (one hook; [`run_hooks`] trains several).
pub fn run(cfg: &TrainConfig) -> Result<TrainSummary> {
    let mut source = open_source(cfg)?;
    run_with_source(cfg, source.as_mut())
}

/// The batch source `cfg` names, as [`run`] trains on it: the store of `cfg.acts` (with the
/// loss gradients when the family trains on them), the `cfg.synth` preset, or `cfg.model` at
/// its one hook (the model is loaded here). `cfg.out` is checked first, before any data is
/// read or a model loaded.
pub fn open_source(cfg: &TrainConfig) -> Result<Box<dyn BatchSource>> {
    check_sources(cfg)?;
    if hook_list(cfg)?.len() > 1 {
        bail!("several hooks in --hook train one SAE each: use run_hooks");
    }
    // Before any data is read or a model loaded.
    check_out(cfg)?;
    if let Some(preset) = &cfg.synth {
        check_grad_source(cfg, "--synth (no model)")?;
        if cfg.steps.is_none() && cfg.tokens.is_none() {
            bail!("training from --synth needs --steps or --tokens (the stream is endless)");
        }
        return Ok(Box::new(crate::source::SynthBenchSource::preset(preset)?));
    }
    if let Some(acts) = &cfg.acts {
        return Ok(Box::new(if cfg.arch.family().trains_on_input_grad() {
            StoreSource::open_with_grads(acts, cfg.seed)
                .with_context(|| format!("--acts for --arch {}", cfg.arch))?
        } else {
            StoreSource::open(acts, cfg.seed)?
        }));
    }
    let (Some(model), Some(hook)) = (&cfg.model, &cfg.hook) else {
        bail!("no activations given: pass --acts DIR_OR_FILE, or --model M --hook H --corpus C");
    };
    Ok(Box::new(ModelSource::start(model_source_options(
        cfg, model, hook,
    )?)?))
}

/// Families that train on the model's loss gradient need a source that has it: a store
/// harvested with it (checked where it is opened) or one model hook (computed on the fly).
fn check_grad_source(cfg: &TrainConfig, what: &str) -> Result<()> {
    if cfg.arch.family().trains_on_input_grad() {
        bail!(
            "--arch {} needs the gradient of the model's loss beside every activation, which \
             {what} cannot give: harvest a store with it (sae harvest --with-grad --hook H \
             --out DIR) and train with --acts DIR, or train from --model at one --hook",
            cfg.arch,
        );
    }
    Ok(())
}

/// The sources given may be used together.
fn check_sources(cfg: &TrainConfig) -> Result<()> {
    if cfg.acts.is_some() && cfg.model.is_some() {
        bail!("give either --acts or --model, not both");
    }
    if cfg.synth.is_some() && (cfg.acts.is_some() || cfg.model.is_some()) {
        bail!("--synth generates its own data: give it without --acts and --model");
    }
    if cfg.compute != sae_lm::ProductPrecision::F32 && cfg.model.is_none() {
        bail!("--compute sets the precision of the model's forward pass; it needs --model");
    }
    Ok(())
}

/// The hooks of `cfg.hook`: one, or several separated by commas, each once (none without it).
pub fn hook_list(cfg: &TrainConfig) -> Result<Vec<String>> {
    let Some(text) = &cfg.hook else {
        return Ok(Vec::new());
    };
    let hooks: Vec<String> = text.split(',').map(|h| h.trim().to_string()).collect();
    for (i, h) in hooks.iter().enumerate() {
        if h.is_empty() {
            bail!("--hook {text}: an empty hook name; give names like blocks.5.hook_resid_post, separated by commas");
        }
        if hooks[..i].contains(h) {
            bail!("--hook {h} is given twice; give each hook once");
        }
        if hooks.len() > 1 && (h.contains(['/', '\\']) || h == "." || h == "..") {
            bail!("--hook '{h}' is not a hook name (like blocks.5.hook_resid_post; `sae hooks` lists them)");
        }
    }
    Ok(hooks)
}

/// The model stream for `cfg`, long enough for training, the initialisation sample, the final
/// evaluation and what sits in the buffer, without repeating.
fn model_source_options(cfg: &TrainConfig, model: &str, hook: &str) -> Result<ModelSourceOptions> {
    let rows = match (cfg.steps, cfg.tokens) {
        (Some(s), _) => s.saturating_mul(cfg.batch_size as u64),
        (None, Some(t)) => t,
        (None, None) => bail!("training from --model needs --steps or --tokens"),
    };
    let need = rows as usize + cfg.init_sample + cfg.eval_tokens + cfg.buffer_rows;
    Ok(ModelSourceOptions {
        model: model.to_string(),
        hook: hook.to_string(),
        corpus: cfg.corpus.clone(),
        ctx: cfg.ctx,
        tokens: need,
        buffer_rows: cfg.buffer_rows,
        batch_contexts: 16,
        products: cfg.compute,
        seed: cfg.seed,
        with_grads: cfg.arch.family().trains_on_input_grad(),
    })
}

/// Trains one SAE per hook of `cfg.hook`. One hook (or none: `--acts`, `--synth`) is [`run`].
/// Several train straight from `cfg.model`, each into `cfg.out/<hook>/` with a trainer of its
/// own: one forward pass per batch, stopping after the deepest hook, feeds all of them, and
/// the trainers run in threads of their own that share one thread pool. Each SAE is the one
/// that [`run`] at its hook alone with the same settings gives. A run that fails does not stop
/// the others; the error names it.
pub fn run_hooks(cfg: &TrainConfig) -> Result<Vec<TrainSummary>> {
    check_sources(cfg)?;
    let hooks = hook_list(cfg)?;
    if hooks.len() <= 1 {
        return Ok(vec![run(cfg)?]);
    }
    let Some(model) = &cfg.model else {
        bail!(
            "several hooks in --hook train straight from a model: give --model (and --corpus), \
             or train on one store at a time with --acts"
        );
    };
    check_grad_source(cfg, "several --hook values")?;
    // Before the model is loaded.
    sae_output::check_output_folder(&cfg.out)?;
    let runs: Vec<TrainConfig> = hooks
        .iter()
        .map(|h| TrainConfig {
            hook: Some(h.clone()),
            out: cfg.out.join(h),
            ..cfg.clone()
        })
        .collect();
    for r in &runs {
        check_out(r)?;
    }
    let sources = ModelSource::start_hooks(model_source_options(cfg, model, &hooks[0])?, &hooks)?;
    let pool = match cfg.threads {
        Some(t) => Some(rayon::ThreadPoolBuilder::new().num_threads(t).build()?),
        None => None,
    };
    let bars = (!cfg.quiet).then(ProgressGroup::new);
    let results: Vec<Result<TrainSummary>> = std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter()
            .zip(sources)
            .map(|(r, mut source)| {
                let (bars, pool) = (bars.as_ref(), pool.as_ref());
                scope.spawn(move || run_locked(r, &mut source, bars, pool))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the training thread panicked")))
            })
            .collect()
    });
    let mut summaries = Vec::new();
    let mut failed = Vec::new();
    for (h, r) in hooks.iter().zip(results) {
        match r {
            Ok(s) => summaries.push(s),
            Err(e) => failed.push(format!("{h}: {e:#}")),
        }
    }
    if !failed.is_empty() {
        let saved: Vec<String> = summaries
            .iter()
            .map(|s| s.out_dir.display().to_string())
            .collect();
        bail!(
            "training failed at {} of {} hooks:\n  {}\n{}",
            failed.len(),
            hooks.len(),
            failed.join("\n  "),
            if saved.is_empty() {
                "no SAE was saved".to_string()
            } else {
                format!("the others were saved: {}", saved.join(", "))
            }
        );
    }
    Ok(summaries)
}

/// Whether `cfg.out` may receive a trained SAE: it holds nothing, or a trained SAE the user
/// agreed to replace (`--overwrite`) or continues (`--extend`); never the user's own files or
/// the activations it trains on.
fn check_out(cfg: &TrainConfig) -> Result<()> {
    let inputs: Vec<Input> = cfg.acts.iter().map(|a| Input::new("--acts", a)).collect();
    sae_output::check_output(
        &cfg.out,
        OutputKind::Sae,
        &inputs,
        cfg.overwrite || cfg.extend,
    )?;
    Ok(())
}

/// Trains on any batch source (the store, a model, memory).
pub fn run_with_source(cfg: &TrainConfig, source: &mut dyn BatchSource) -> Result<TrainSummary> {
    run_locked(cfg, source, None, None)
}

/// [`run_with_source`], its progress drawn in `bars` (one of several runs) and its work done
/// in `pool` when given (shared by several runs; otherwise `cfg.threads` or the global pool).
fn run_locked(
    cfg: &TrainConfig,
    source: &mut dyn BatchSource,
    bars: Option<&ProgressGroup>,
    pool: Option<&rayon::ThreadPool>,
) -> Result<TrainSummary> {
    check_out(cfg)?;
    // One writer per output; checked again under the lock, which the first check did not hold.
    let _lock = OutputLock::acquire(&cfg.out)?;
    check_out(cfg)?;
    if cfg.precision.bf16_encoder() && !sae_core::bf16::available() && !cfg.quiet {
        eprintln!(
            "note: --precision {}: this CPU has no AVX512-BF16, so the bf16 product runs \
             widened to f32 (the same results, slower than --precision f32)",
            cfg.precision
        );
    }
    if cfg.model.is_some() && !cfg.quiet {
        if let Some(note) = cfg.compute.slow_here() {
            eprintln!("{note}");
        }
    }
    if cfg.precision.split_encoder() && !cfg.quiet {
        if let Some(note) = sae_core::bf16::split_slow_note("--precision", "the encoder product") {
            eprintln!("{note}");
        }
    }
    match (pool, cfg.threads) {
        (Some(pool), _) => pool.install(|| train(cfg, source, bars)),
        (None, Some(t)) => {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
            pool.install(|| train(cfg, source, bars))
        }
        (None, None) => train(cfg, source, bars),
    }
}

/// Fields that must match for `--resume` (and `--extend`) to continue a run: what it learns
/// from (the data) and everything that shapes the SAE, its objective, its optimiser and its
/// schedule, since a run continued under other values would be a mix of two runs that its
/// saved config describes as one. Floats are kept as their shortest f32 text, so they compare
/// equal after a JSON round trip.
///
/// Left out, because they may change on resume without changing what is learnt step by step:
/// `steps`/`tokens` (a run may be lengthened or shortened; the warm-ups stay those it started
/// with, and a linear decay follows the new end), `threads` (only the order of float sums, so
/// the last bits), `quiet`, `log_every` and `checkpoint_every` (bookkeeping), `eval_tokens`
/// (only the final evaluation), `keep_state` (only what is kept at the end), `out` (the same
/// directory by construction), and `resume`/`extend` themselves. `init_sample`, `normalize`,
/// `b_dec_init` and `max_norm_ratio` act only at the start, but a resumed run keeps the
/// start's values, so a new value would be silently ignored: they are part of the identity.
fn run_identity(cfg: &TrainConfig, r: &Resolved) -> serde_json::Value {
    let mut id = serde_json::json!({
        "arch": cfg.arch, "d_in": r.d_in, "d_sae": r.d_sae, "k": cfg.k, "batch_size": cfg.batch_size,
        "seed": cfg.seed, "normalize": cfg.normalize, "b_dec_init": cfg.b_dec_init,
        "adam_beta1": cfg.adam_beta1.to_string(), "adam_beta2": cfg.adam_beta2.to_string(),
        "adam_eps": cfg.adam_eps.to_string(),
        "precision": cfg.precision,
        // The resolved values: a default and the same value given as a flag are one setting.
        "lr": r.lr.to_string(), "sparsity_coeff": r.sparsity_coeff.to_string(),
        // As given: the resolved warm-ups depend on the number of steps, which may change.
        "lr_warmup_steps": cfg.lr_warmup_steps, "l1_warmup_steps": cfg.l1_warmup_steps,
        "target_l0": cfg.target_l0, "target_l0_rate": cfg.target_l0_rate,
        "lr_decay_steps": cfg.lr_decay_steps,
        "init_sample": cfg.init_sample, "max_norm_ratio": cfg.max_norm_ratio.to_string(),
        "dead_window_tokens": cfg.dead_window_tokens,
        "resample_steps": cfg.resample_steps, "resample_window": cfg.resample_window_tokens(),
        "resample_sample": cfg.resample_sample,
        "resample_lr_warmup_steps": cfg.resample_lr_warmup_steps,
    });
    if let (Some(obj), serde_json::Value::Object(data)) = (id.as_object_mut(), data_identity(cfg)) {
        obj.extend(data);
    }
    if let Some(obj) = id.as_object_mut() {
        obj.extend(arch_opts_identity(&r.arch_opts));
    }
    id
}

/// The family's training options in a run's identity: under the name of the flag that set
/// each before `--arch-opt` did (`jumprelu_bandwidth`; see `OPTION_ALIASES`), so that runs
/// recorded then compare equal, and `arch_opt.NAME` for the others. Numbers with a fraction
/// are kept as their shortest f32 text, as the other floats.
fn arch_opts_identity(
    opts: &sae_core::arch::TrainOpts,
) -> impl Iterator<Item = (String, serde_json::Value)> + '_ {
    opts.iter().map(|(name, v)| {
        let key = match crate::config::OPTION_ALIASES
            .iter()
            .find(|(_, option)| option == name)
        {
            Some((field, _)) => field.to_string(),
            None => format!("arch_opt.{name}"),
        };
        let value = match v.as_f64() {
            Some(x) if v.is_f64() => serde_json::Value::from((x as f32).to_string()),
            _ => v.clone(),
        };
        (key, value)
    })
}

/// The data a run learns from. Every key is always present (null where it does not apply),
/// so that a key missing from a saved identity means a run recorded before it existed.
/// A store: its canonical path, and its size and manifest, so that a store rewritten in
/// place is told apart. A model: the model, hook, corpus, context, shuffle buffer and the
/// precision of its products, which together fix the stream. Another source (a library caller's) records nothing here.
fn data_identity(cfg: &TrainConfig) -> serde_json::Value {
    let (mut acts, mut acts_rows, mut acts_d_in, mut acts_manifest) = (None, None, None, None);
    if let Some(path) = &cfg.acts {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        // The store opened a moment ago to build the source; a failure here leaves its size out.
        if let Ok(store) = sae_store::ActivationStore::open(&path) {
            acts_rows = Some(store.n_rows());
            acts_d_in = Some(store.d_in());
            acts_manifest = store.manifest.as_ref().map(|m| {
                format!(
                    "model {}, hook {}, corpus {}, context {}, {} tokens, {:?}",
                    m.model, m.hook, m.corpus, m.context_size, m.n_tokens, m.dtype
                )
            });
        }
        acts = Some(path.display().to_string());
    }
    let from_model = cfg.acts.is_none() && cfg.model.is_some();
    serde_json::json!({
        "acts": acts, "acts_rows": acts_rows, "acts_d_in": acts_d_in, "acts_manifest": acts_manifest,
        "model": cfg.model.as_ref().filter(|_| from_model),
        "hook": cfg.hook.as_ref().filter(|_| from_model),
        "corpus": from_model.then_some(&cfg.corpus),
        "ctx": from_model.then_some(cfg.ctx),
        "buffer_rows": from_model.then_some(cfg.buffer_rows),
        "compute": from_model.then_some(cfg.compute),
        "synth": cfg.synth,
    })
}

/// How an identity key is named to the user: its flag and its --config field where it has
/// them.
fn identity_label(key: &str) -> String {
    match key {
        "d_in" => "d_in (the width of the activations)".into(),
        "sparsity_coeff" => "--l1 (the sparsity coefficient)".into(),
        "acts" => "--acts (the store's path)".into(),
        "acts_rows" => "the rows in the --acts store".into(),
        "acts_d_in" => "the width of the --acts store".into(),
        "acts_manifest" => "the --acts store's manifest".into(),
        _ if key.starts_with("arch_opt.") => format!("--arch-opt {}", &key["arch_opt.".len()..]),
        _ if crate::config::OPTION_ALIASES.iter().any(|(f, _)| *f == key) => {
            let (_, option) = crate::config::OPTION_ALIASES
                .iter()
                .find(|(f, _)| *f == key)
                .copied()
                .unwrap_or_default();
            format!("{} (--arch-opt {option})", crate::config::flag_name(key))
        }
        _ => format!("{} ({key})", crate::config::flag_name(key)),
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
    sae.settings = r.settings.clone();
    sae.meta = source.meta();
    sae.b_dec = match cfg.b_dec_init {
        BDecInit::GeometricMedian => init::geometric_median(&sample, d, 100),
        BDecInit::Mean => init::mean(&sample, d),
        BDecInit::Zero => vec![0.0; d],
    };
    let hyper = cfg.hyper(r);
    cfg.arch
        .family()
        .init_from_sample(&mut sae, &hyper, &sample);
    Ok((SaeTrainer::new(sae, hyper), scale, max_norm))
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

fn progress_bar(
    cfg: &TrainConfig,
    steps: u64,
    start: u64,
    bars: Option<&ProgressGroup>,
) -> sae_output::Progress {
    if cfg.quiet {
        return sae_output::Progress::hidden();
    }
    let bar = match (bars, &cfg.hook) {
        (Some(group), Some(hook)) => group.add(
            steps,
            &format!("train step {hook}"),
            &format!("{hook:>26} {{elapsed_precise}} [{{bar:25}}] step {{pos}}/{{len}} {{msg}}"),
        ),
        _ => sae_output::Progress::new(
            steps,
            "train step",
            "{elapsed_precise} [{bar:25}] step {pos}/{len} {msg}",
        ),
    };
    bar.set_position(start);
    bar
}

/// Where a run starts: a fresh SAE, a checkpoint (`--resume`) or a finished run (`--extend`).
struct Start {
    trainer: SaeTrainer,
    scale: f32,
    max_norm: f32,
    /// Steps and tokens already trained, and rows left out for their norm.
    step: u64,
    tokens: u64,
    rows_skipped: u64,
    window: Window,
    log: Log,
    seconds: f64,
    extensions: Vec<Extension>,
    /// Steps whose resampling resampled latents (the lr drops after each).
    lr_drops: Vec<u64>,
    l0_target: Option<L0Target>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// Identity keys an extension may change: a finished run trained on may decay its lr to 0
/// at its new end (the run itself must not have decayed; `--extend` checks that).
const EXTEND_MAY_CHANGE: &[&str] = &["lr_decay_steps"];

/// Fails unless every field of `identity` equals the one `dir` was started with, naming each
/// difference. A field that the saved identity lacks was recorded by an older version of
/// this program: it is not compared (so those runs stay resumable), and a note says so.
fn check_identity(
    old: &serde_json::Value,
    identity: &serde_json::Value,
    flag: &str,
    dir: &Path,
) -> Result<()> {
    let Some(old_id) = old.get("identity").and_then(|v| v.as_object()) else {
        bail!(
            "{flag}: {} records no run settings (no \"identity\" in its {CONFIG_FILE}), so this run \
             cannot be checked against it; give another --out",
            dir.display()
        );
    };
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "none".into(),
        v => v.to_string(),
    };
    let (mut diffs, mut unrecorded) = (Vec::new(), Vec::new());
    for (k, v) in identity.as_object().into_iter().flatten() {
        if flag == "--extend" && EXTEND_MAY_CHANGE.contains(&k.as_str()) {
            continue;
        }
        match old_id.get(k) {
            None => unrecorded.push(identity_label(k)),
            Some(o) if o != v => diffs.push(format!(
                "{} was {}, now {}",
                identity_label(k),
                text(o),
                text(v)
            )),
            Some(_) => {}
        }
    }
    if !diffs.is_empty() {
        let fix = if flag == "--resume" {
            format!(
                "resume with the settings and data it was started with, or delete {} to start over",
                dir.display()
            )
        } else {
            "use the settings and data it was trained with, or give another --out".into()
        };
        bail!(
            "{flag}: {} was started with other settings or data: {}; {fix}",
            dir.display(),
            diffs.join("; ")
        );
    }
    if !unrecorded.is_empty() {
        eprintln!(
            "note: {flag}: {} was started by an older sae, which did not record {}; those are not checked",
            dir.display(),
            unrecorded.join(", ")
        );
    }
    Ok(())
}

/// The warm-ups were fixed when the run started (a longer run would resolve others).
fn keep_warmups(r: &mut Resolved, old: &Resolved) {
    r.lr_warmup_steps = old.lr_warmup_steps;
    r.l1_warmup_steps = old.l1_warmup_steps;
    if old.target_l0_rate.is_some() {
        r.target_l0_rate = old.target_l0_rate;
    }
}

/// A fresh coefficient controller for a run that asked for one.
fn new_l0_target(cfg: &TrainConfig, r: &Resolved) -> Option<L0Target> {
    let target = cfg.target_l0?;
    let rate = r.target_l0_rate?;
    Some(L0Target::new(target, rate, r.l1_warmup_steps))
}

fn write_config(
    path: &Path,
    identity: &serde_json::Value,
    cfg: &TrainConfig,
    r: &Resolved,
    extensions: &[Extension],
) -> Result<()> {
    let text = serde_json::to_string_pretty(&serde_json::json!({
        "identity": identity, "config": cfg, "resolved": r, "extensions": extensions,
    }))?;
    sae_core::saelens::write_atomic(path, text.as_bytes())
}

/// The checkpoint `checkpoint::read` would restore, described ("a checkpoint at step 20"),
/// or `None` when the run stopped before writing one.
fn saved_checkpoint(partial: &Path) -> Option<String> {
    [checkpoint::dir(partial), partial.join("checkpoint.old")]
        .iter()
        .map(|d| d.join("progress.json"))
        .find(|p| p.exists())
        .map(|p| {
            match read_json(&p).ok().and_then(|v| v["step"].as_u64()) {
                Some(step) => format!("a checkpoint at step {step}"),
                // Unreadable: still not deleted automatically; --resume reports why.
                None => format!("a checkpoint ({})", p.display()),
            }
        })
}

/// What a working directory without a checkpoint may hold: the config, the log, and a first
/// checkpoint that was still being written.
const NO_CHECKPOINT_FILES: &[&str] = &[
    CONFIG_FILE,
    LOG_FILE,
    checkpoint::CHECKPOINT,
    "checkpoint.new",
    "checkpoint.old",
];

/// What to do after the loss became NaN or infinite. A checkpoint was trained with the same
/// settings, and `--resume` must keep them, so resuming would only diverge again.
fn after_divergence(partial: &Path, lr: f32) -> String {
    match saved_checkpoint(partial) {
        Some(ckpt) => format!(
            "{} keeps {ckpt}, but resuming it with the same settings would diverge again: lower --lr \
             (now {lr}) or check the activations, then delete {} and run again",
            partial.display(),
            partial.display()
        ),
        None => format!(
            "No checkpoint was written yet, so nothing is kept: lower --lr (now {lr}) or check the \
             activations and run again (without --resume; the fresh start replaces {})",
            partial.display()
        ),
    }
}

fn start_fresh(
    cfg: &TrainConfig,
    r: &Resolved,
    partial: &Path,
    identity: &serde_json::Value,
    source: &mut dyn BatchSource,
) -> Result<Start> {
    if partial.exists() {
        if let Some(ckpt) = saved_checkpoint(partial) {
            bail!(
                "{} holds an unfinished run with {ckpt}; pass --resume to continue it (with the \
                 settings it was started with), or delete that directory to start over",
                partial.display()
            );
        }
        // A run that stopped before its first checkpoint: nothing in it can be resumed.
        // Anything but our own files means the directory is not ours to remove.
        let entries: Vec<String> = std::fs::read_dir(partial)
            .with_context(|| format!("listing {}", partial.display()))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("listing {}", partial.display()))?;
        if let Some(other) = entries
            .iter()
            .find(|e| !NO_CHECKPOINT_FILES.contains(&e.as_str()))
        {
            bail!(
                "{} exists but is not the working directory of an sae train run (it holds {other}); \
                 move it away or give another --out",
                partial.display()
            );
        }
        eprintln!(
            "note: {} holds a run that stopped before its first checkpoint, so nothing in it is \
             worth keeping; starting over",
            partial.display()
        );
        std::fs::remove_dir_all(partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    if !cfg.quiet {
        if let Some(note) = cfg.arch.family().start_note(&cfg.hyper(r), r.steps, r.lr) {
            eprintln!("note: {note}");
        }
    }
    // The initialisation sample is read first, so bad data leaves no working directory.
    let (trainer, scale, max_norm) = initialise(cfg, r, source)?;
    std::fs::create_dir_all(partial).with_context(|| format!("creating {}", partial.display()))?;
    write_config(&partial.join(CONFIG_FILE), identity, cfg, r, &[])?;
    Ok(Start {
        trainer,
        scale,
        max_norm,
        step: 0,
        tokens: 0,
        rows_skipped: 0,
        window: Window::default(),
        log: Log::open(partial.join(LOG_FILE), Some(0))?,
        seconds: 0.0,
        extensions: Vec::new(),
        lr_drops: Vec::new(),
        l0_target: new_l0_target(cfg, r),
    })
}

/// A trainer with a checkpoint's weights and optimiser state, the stream at its position.
fn restore(
    cfg: &TrainConfig,
    r: &Resolved,
    sae: Sae,
    state: &Path,
    progress: &Progress,
    source: &mut dyn BatchSource,
    flag: &str,
) -> Result<SaeTrainer> {
    let mut trainer = SaeTrainer::new(sae, cfg.hyper(r));
    trainer.load_state(state)?;
    match &progress.source_position {
        Some(p) => source
            .seek(p)
            .with_context(|| format!("{flag}: restoring the data position"))?,
        None => {
            eprintln!("note: this activation source cannot seek; {flag} sees different batches")
        }
    }
    Ok(trainer)
}

fn start_resumed(
    cfg: &TrainConfig,
    r: &mut Resolved,
    partial: &Path,
    identity: &serde_json::Value,
    source: &mut dyn BatchSource,
) -> Result<Start> {
    if !partial.exists() {
        if cfg.out.join(SUMMARY_FILE).is_file() {
            bail!(
                "--resume: there is no unfinished run in {}; {} is finished: train it on with \
                 --extend and a larger --tokens/--steps, or drop --resume to train it again",
                partial.display(),
                cfg.out.display()
            );
        }
        bail!(
            "--resume: there is no unfinished run in {}; start without --resume",
            partial.display()
        );
    }
    let old = read_json(&partial.join(CONFIG_FILE))?;
    if saved_checkpoint(partial).is_none() {
        let extension = old["extensions"].as_array().is_some_and(|e| !e.is_empty());
        let way = if extension {
            format!(
                "delete it and run again with --extend (the finished run in {} is untouched)",
                cfg.out.display()
            )
        } else {
            "run again without --resume (the fresh start replaces it)".into()
        };
        let every = match old["config"]["checkpoint_every"].as_u64() {
            Some(0) => " (it ran with --checkpoint-every 0, which writes none)".to_string(),
            Some(n) => format!(" (one every {n} steps)"),
            None => String::new(),
        };
        bail!(
            "--resume: {} holds no checkpoint: the run stopped before its first one{every}, so \
             nothing in it is worth keeping; {way}",
            partial.display()
        );
    }
    check_identity(&old, identity, "--resume", partial)?;
    let (sae, state, progress) = checkpoint::read(partial)?.with_context(|| {
        format!(
            "--resume: the checkpoint in {} could not be read; delete {} to start over",
            checkpoint::dir(partial).display(),
            partial.display()
        )
    })?;
    if let Ok(old_r) = serde_json::from_value::<Resolved>(old["resolved"].clone()) {
        keep_warmups(r, &old_r);
    }
    if r.steps < progress.step {
        bail!(
            "--resume: the checkpoint in {} is at step {}, past the {} steps now asked for; ask for \
             at least {} steps with --steps (or --tokens)",
            partial.display(),
            progress.step,
            r.steps,
            progress.step
        );
    }
    let extensions: Vec<Extension> =
        serde_json::from_value(old["extensions"].clone()).unwrap_or_default();
    // The published config describes how the run ended (its steps, threads, ...).
    write_config(&partial.join(CONFIG_FILE), identity, cfg, r, &extensions)?;
    Ok(Start {
        trainer: restore(cfg, r, sae, &state, &progress, source, "--resume")?,
        scale: f32::from_bits(progress.scale_bits),
        max_norm: f32::from_bits(progress.max_norm_bits),
        step: progress.step,
        tokens: progress.tokens,
        rows_skipped: progress.rows_skipped,
        window: progress.window,
        log: Log::open(partial.join(LOG_FILE), Some(progress.log_bytes))?,
        seconds: progress.seconds,
        extensions,
        l0_target: progress.l0_target.or_else(|| new_l0_target(cfg, r)),
        lr_drops: progress.lr_drops,
    })
}

/// A finished run in `cfg.out` trained on: its weights, schedule and data stream; its
/// optimiser state when it kept one (`--keep-state`), otherwise fresh Adam moments.
fn start_extended(
    cfg: &TrainConfig,
    r: &mut Resolved,
    partial: &Path,
    identity: &serde_json::Value,
    source: &mut dyn BatchSource,
) -> Result<Start> {
    let out = &cfg.out;
    let summary_path = out.join(SUMMARY_FILE);
    if !summary_path.is_file() {
        bail!(
            "--extend: {} holds no finished run (no {SUMMARY_FILE}); train it first, or drop --extend",
            out.display()
        );
    }
    if partial.exists() {
        bail!(
            "{} holds an unfinished run (an interrupted extension?); pass --resume to continue it, or delete it",
            partial.display()
        );
    }
    let old_summary: TrainSummary = serde_json::from_value(read_json(&summary_path)?)
        .with_context(|| format!("{}: not a training summary", summary_path.display()))?;
    let old = read_json(&out.join(CONFIG_FILE))?;
    check_identity(&old, identity, "--extend", out)?;
    let o = &old_summary.resolved;
    if r.lr != o.lr || r.sparsity_coeff != o.sparsity_coeff {
        bail!(
            "--extend: {} was trained with lr {} and sparsity coefficient {}, now {} and {}; pass its --lr and --l1",
            out.display(),
            o.lr,
            o.sparsity_coeff,
            r.lr,
            r.sparsity_coeff
        );
    }
    if old["config"]["lr_decay_steps"].as_u64().unwrap_or(0) > 0 {
        bail!(
            "--extend: {} decayed its lr to 0 at its end (--lr-decay-steps), so it cannot be continued; train a longer run instead",
            out.display()
        );
    }
    if r.steps <= old_summary.steps {
        bail!(
            "--extend: {} has already trained {} steps ({} tokens); ask for more with --tokens or --steps",
            out.display(),
            old_summary.steps,
            old_summary.tokens
        );
    }
    keep_warmups(r, o);
    let kept = checkpoint::read(out)?;
    if let Some((_, _, p)) = &kept {
        if p.step != old_summary.steps {
            bail!(
                "--extend: the checkpoint kept in {} is at step {}, the SAE at step {}; delete that checkpoint to extend without it",
                checkpoint::dir(out).display(),
                p.step,
                old_summary.steps
            );
        }
    }
    let mut extensions = old_summary.extensions.clone();
    extensions.push(Extension {
        from_step: old_summary.steps,
        from_tokens: old_summary.tokens,
        optimizer_state_kept: kept.is_some(),
    });
    std::fs::create_dir_all(partial).with_context(|| format!("creating {}", partial.display()))?;
    std::fs::copy(out.join(LOG_FILE), partial.join(LOG_FILE))
        .with_context(|| format!("copying {}", out.join(LOG_FILE).display()))?;
    write_config(&partial.join(CONFIG_FILE), identity, cfg, r, &extensions)?;
    let scale = old_summary.scale;
    let max_norm = old_summary.max_norm.unwrap_or(f32::INFINITY);
    let (trainer, window, log_bytes, lr_drops, l0_target) = match kept {
        Some((sae, state, p)) => {
            let trainer = restore(cfg, r, sae, &state, &p, source, "--extend")?;
            (
                trainer,
                p.window,
                Some(p.log_bytes),
                p.lr_drops,
                p.l0_target,
            )
        }
        None => {
            // The saved SAE has the input scale folded in; train at the training scale.
            let mut sae = sae_core::saelens::load(out)?;
            sae.fold_activation_scale(1.0 / scale);
            // The stream read exactly the trained and the left-out rows.
            if source
                .seek_rows(old_summary.tokens + old_summary.rows_skipped)
                .is_err()
            {
                eprintln!(
                    "note: this activation source cannot seek; the extension sees different batches"
                );
            }
            // A fresh Adam warms up anew; earlier lr drops are over.
            let fresh = SaeTrainer::new(sae, cfg.hyper(r));
            // The controller goes on from where the run ended (its summary keeps it).
            (
                fresh,
                Window::default(),
                None,
                Vec::new(),
                old_summary.l0_target.clone(),
            )
        }
    };
    let l0_target = l0_target.or_else(|| new_l0_target(cfg, r));
    Ok(Start {
        trainer,
        scale,
        max_norm,
        step: old_summary.steps,
        tokens: old_summary.tokens,
        rows_skipped: old_summary.rows_skipped,
        window,
        log: Log::open(partial.join(LOG_FILE), log_bytes)?,
        seconds: old_summary.seconds,
        extensions,
        lr_drops,
        l0_target,
    })
}

fn train(
    cfg: &TrainConfig,
    source: &mut dyn BatchSource,
    bars: Option<&ProgressGroup>,
) -> Result<TrainSummary> {
    let d_in = source.d_in();
    let with_grads = cfg.arch.family().trains_on_input_grad();
    if with_grads && !source.has_grads() {
        bail!(
            "--arch {} needs the gradient of the model's loss beside every activation, and this \
             source has none: train from a store harvested with sae harvest --with-grad",
            cfg.arch
        );
    }
    let mut r = resolve(cfg, d_in, source.n_rows())?;
    let partial = partial_dir(&cfg.out)?;
    let identity = run_identity(cfg, &r);
    if cfg.resume && cfg.extend {
        bail!("give --resume (an unfinished run) or --extend (a finished one), not both");
    }
    let Start {
        mut trainer,
        scale,
        max_norm,
        step: start_step,
        tokens: start_tokens,
        rows_skipped,
        mut window,
        mut log,
        seconds: seconds_before,
        extensions,
        mut lr_drops,
        mut l0_target,
    } = if cfg.resume {
        start_resumed(cfg, &mut r, &partial, &identity, source)?
    } else if cfg.extend {
        start_extended(cfg, &mut r, &partial, &identity, source)?
    } else {
        start_fresh(cfg, &r, &partial, &identity, source)?
    };
    if cfg.precision.screened() && !trainer.screens() && !cfg.quiet {
        let why = match sae_core::bf16::available() {
            false => "this CPU has no AVX512-BF16, where a bf16 product is slower than f32".into(),
            true => format!(
                "--arch {} has no per-latent cutoff to screen against",
                cfg.arch
            ),
        };
        eprintln!(
            "note: --precision f32-screened: {why}, so the encoder product runs in f32 (the \
             --precision f32 step)"
        );
    }
    let mut tokens = start_tokens;
    // The run's step is the optimiser's, plus the steps trained before Adam's moments started
    // (non-zero only in a run extended without its optimiser state).
    let offset = start_step - trainer.steps_done();
    let mut filtered = crate::source::NormFilter::new(source, max_norm);
    filtered.rows_skipped = rows_skipped;
    let source = &mut filtered;

    let bs = cfg.batch_size;
    let mut batch = vec![0.0f32; bs * d_in];
    let mut grads = vec![0.0f32; if with_grads { bs * d_in } else { 0 }];
    let bar = progress_bar(cfg, r.steps, start_step, bars);
    let t0 = Instant::now();
    let mut t_window = Instant::now();
    let mut tokens_window = 0u64;
    let mut last = StepStats::default();
    let log_every = cfg.log_every.max(1);
    // The last resampling, shown after the progress message.
    let mut resample_note = String::new();
    while offset + trainer.steps_done() < r.steps {
        let step = offset + trainer.steps_done();
        if with_grads {
            source.next_batch_with_grads(&mut batch, &mut grads, bs)?;
        } else {
            source.next_batch(&mut batch, bs)?;
        }
        if scale != 1.0 {
            batch.iter_mut().for_each(|v| *v *= scale);
            // The loss gradient w.r.t. `scale * x` is the raw one divided by `scale`.
            grads.iter_mut().for_each(|g| *g /= scale);
        }
        let mut lr = lr_at(&r, cfg.lr_decay_steps, step, trainer.steps_done());
        if !lr_drops.is_empty() {
            let f = resample_lr_factor(&lr_drops, cfg.resample_lr_warmup_steps, step);
            lr = (lr as f64 * f) as f32;
        }
        let scheduled = sparsity_at(&r, step);
        let coeff = l0_target
            .as_ref()
            .map_or(scheduled, |t| t.coefficient(scheduled));
        let stats = if with_grads {
            trainer.step_with_grad(&batch, &grads, bs, lr, coeff)
        } else {
            trainer.step(&batch, bs, lr, coeff)
        };
        if !stats.loss.is_finite() {
            bar.abandon();
            bail!(
                "step {step}: the loss is {} (mse {}, sparsity {}); training stopped. {}",
                stats.loss,
                stats.mse,
                stats.sparsity_loss,
                after_divergence(&partial, lr)
            );
        }
        if let Some(t) = l0_target.as_mut() {
            t.observe(step, stats.l0);
        }
        tokens += bs as u64;
        tokens_window += bs as u64;
        window.add(&stats);
        let done = offset + trainer.steps_done();
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
            ) + &resample_note);
            window = Window::default();
            t_window = Instant::now();
            tokens_window = 0;
        }
        bar.set_position(done);
        // After the step and its log line, before its checkpoint: a checkpoint at this step
        // holds the resampled weights, and a run resumed from an earlier one redoes the
        // resampling with the same draw.
        if cfg.resample_steps.binary_search(&done).is_ok() {
            // The norm filter leaves massive rows out of the sample too (their loss would
            // take every draw), but they are not rows of the training stream.
            let skipped = source.rows_skipped;
            let (dead, resampled) = resample(cfg, &mut trainer, source, scale, done)?;
            source.rows_skipped = skipped;
            // A resampling that changed nothing leaves the lr alone.
            if resampled > 0 {
                lr_drops.push(done);
            }
            log.write(&serde_json::json!({
                "step": done, "tokens": tokens, "dead_latents": dead, "resampled_latents": resampled,
            }))?;
            resample_note = format!(" | resampled {resampled} dead latents at step {done}");
            bar.set_message(format!(
                "resampled {resampled} of {dead} dead latents at step {done}"
            ));
        }
        // The last step's checkpoint is written only to be kept (`--keep-state`).
        let keep = if done == r.steps {
            cfg.keep_state
        } else {
            cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0
        };
        if keep {
            let progress = Progress {
                step: done,
                tokens,
                scale_bits: scale.to_bits(),
                max_norm_bits: max_norm.to_bits(),
                source_position: source.position(),
                rows_skipped: source.rows_skipped,
                log_bytes: log.len()?,
                window: window.clone(),
                seconds: seconds_before + t0.elapsed().as_secs_f64(),
                lr_drops: lr_drops.clone(),
                l0_target: l0_target.clone(),
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
        steps: offset + trainer.steps_done(),
        tokens,
        resolved: r.clone(),
        scale,
        max_norm: max_norm.is_finite().then_some(max_norm),
        rows_skipped: source.rows_skipped,
        seconds,
        tokens_per_s: (tokens - start_tokens) as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        resumed_at_step: (cfg.resume || cfg.extend).then_some(start_step),
        extensions,
        l0_target,
        last_step: last,
        final_metrics,
    };
    drop(log);
    publish(cfg, &partial, &sae, &summary)?;
    Ok(summary)
}

/// Resamples the latents dead at `step` from the source's sample rows (at the training
/// scale); returns how many were dead and how many got new weights. The draw is seeded by the
/// run's seed and the step, and the sample does not move the training stream, so a resumed
/// run repeats it exactly.
fn resample(
    cfg: &TrainConfig,
    trainer: &mut SaeTrainer,
    source: &mut dyn BatchSource,
    scale: f32,
    step: u64,
) -> Result<(usize, usize)> {
    let window = cfg.resample_window_tokens();
    let dead = trainer.dead_latents(window).len();
    if dead == 0 {
        return Ok((0, 0));
    }
    let d = source.d_in();
    let n = match source.n_rows() {
        Some(rows) => (cfg.resample_sample as u64).min(rows) as usize,
        None => cfg.resample_sample,
    }
    .max(1);
    let mut x = vec![0.0f32; n * d];
    source
        .sample(&mut x, n)
        .with_context(|| format!("step {step}: reading the --resample-sample rows"))?;
    if scale != 1.0 {
        x.iter_mut().for_each(|v| *v *= scale);
    }
    let r = trainer
        .resample_dead(window, &x, n, cfg.seed, step)
        .with_context(|| format!("step {step}: resampling dead latents (--resample-steps)"))?;
    Ok((dead, r.latents.len()))
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
/// only once the new one is complete, and only if it may be (checked again here: the user may
/// have put files there while the run trained). Removes the working directory afterwards.
fn publish(cfg: &TrainConfig, partial: &Path, sae: &Sae, summary: &TrainSummary) -> Result<()> {
    let out = &cfg.out;
    if let Err(e) = check_out(cfg) {
        // Training is not thrown away: the SAE goes into the run's own working directory.
        let kept = partial.join("trained");
        sae_core::saelens::save(sae, &kept)?;
        let text = serde_json::to_string_pretty(summary)?;
        sae_core::saelens::write_atomic(&kept.join(SUMMARY_FILE), text.as_bytes())?;
        return Err(e.context(format!(
            "--out changed while training; the trained SAE was saved to {} instead",
            kept.display()
        )));
    }
    sae_output::replace_dir(out, |staging| -> Result<()> {
        sae_core::saelens::save(sae, staging)?;
        std::fs::copy(partial.join(LOG_FILE), staging.join(LOG_FILE))
            .with_context(|| format!("copying {}", LOG_FILE))?;
        std::fs::copy(partial.join(CONFIG_FILE), staging.join(CONFIG_FILE))
            .with_context(|| format!("copying {}", CONFIG_FILE))?;
        let text = serde_json::to_string_pretty(summary)?;
        sae_core::saelens::write_atomic(&staging.join(SUMMARY_FILE), text.as_bytes())?;
        if cfg.keep_state {
            let from = checkpoint::dir(partial);
            std::fs::rename(&from, checkpoint::dir(staging))
                .with_context(|| format!("keeping {}", from.display()))?;
        }
        Ok(())
    })
    .with_context(|| format!("writing the SAE to {}", out.display()))?;
    let _ = std::fs::remove_dir_all(partial);
    Ok(())
}
