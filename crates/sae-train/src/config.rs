//! `TrainConfig`: every option of `sae train`. A TOML or JSON file given with `--config`
//! holds the same fields as the flags (flag `--d-sae` = field `d_sae`); flags override it.

use anyhow::{bail, Context, Result};
use sae_core::arch::{Settings, Sparsity, TrainOpts};
use sae_core::{ArchKind, Precision, TrainHyper};
use sae_lm::ProductPrecision;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How b_dec starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BDecInit {
    /// Geometric median of a sample (Weiszfeld), as OpenAI's TopK code does.
    GeometricMedian,
    /// Mean of a sample.
    Mean,
    /// Zero (the Gated paper's reference code).
    Zero,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Activation file or directory (not needed when training from another source).
    pub acts: Option<PathBuf>,
    /// Without `acts`: train on samples generated on the fly by this synthetic benchmark
    /// (`synthsaebench-16k`, `synthsaebench-small`).
    pub synth: Option<String>,
    /// Without `acts`: train straight from this model (see `sae_lm::LanguageModel::load`)...
    pub model: Option<String>,
    /// ... at this hook point (or these, comma-separated: one SAE each, see `run_hooks`) ...
    pub hook: Option<String>,
    /// ... over this corpus ...
    pub corpus: String,
    /// ... in contexts of this many tokens (BOS included) ...
    pub ctx: usize,
    /// ... drawing batches at random from this many buffered rows, ...
    pub buffer_rows: usize,
    /// ... with the model's weight products in this precision (as `sae harvest --compute`).
    pub compute: ProductPrecision,
    /// Output directory (SAELens layout + train_log.jsonl + train_summary.json).
    pub out: PathBuf,
    pub arch: ArchKind,
    /// Dictionary size; default 8 x d_in.
    pub d_sae: Option<usize>,
    /// Sparsity coefficient (relu/gated: L1, jumprelu: L0). Default per architecture.
    pub l1: Option<f32>,
    /// Active latents per token for topk/batchtopk.
    pub k: usize,
    /// Peak learning rate; default per architecture (gated/relu 3e-4, jumprelu 7e-5,
    /// topk/batchtopk 2e-4 / sqrt(d_sae / 2^14)).
    pub lr: Option<f32>,
    pub batch_size: usize,
    /// Training steps; or `tokens` / batch_size; default one pass over the activations.
    pub steps: Option<u64>,
    pub tokens: Option<u64>,
    /// Linear lr warm-up; default min(1000, steps / 10).
    pub lr_warmup_steps: Option<u64>,
    /// Linear lr decay to 0 over the last this many steps (0 = constant lr, as the Gated paper).
    pub lr_decay_steps: u64,
    /// Linear sparsity-coefficient warm-up from 0; default 0 for gated/relu (paper), steps / 20
    /// for relu with the decoder-norm L1 (April update), min(10000, steps / 10) for jumprelu.
    pub l1_warmup_steps: Option<u64>,
    /// Penalty families: steer the sparsity coefficient toward this training L0, as a
    /// multiplier on the scheduled coefficient adjusted every step after the sparsity
    /// warm-up (SynthSAEBench's autotuner; see `l0_target`).
    pub target_l0: Option<f64>,
    /// Largest relative change of that multiplier per step; default 8 / (steps after the
    /// warm-up), within [3e-4, 1e-2].
    pub target_l0_rate: Option<f64>,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_eps: f32,
    pub b_dec_init: BDecInit,
    /// Rows sampled for b_dec and the normalisation constant.
    pub init_sample: usize,
    /// Scale inputs by one constant so that E||x||^2 = d_in (folded into the saved weights).
    pub normalize: bool,
    /// Leave out input rows whose norm exceeds this multiple of the median norm of the
    /// initialisation sample (massive activations on a few tokens; 0 = keep every row).
    pub max_norm_ratio: f32,
    /// A latent is dead when it has not fired for this many tokens.
    pub dead_window_tokens: u64,
    /// Relu/gated: resample dead latents after these steps (Bricken et al.'s neuron
    /// resampling, as the Gated paper did at 25k/50k/75k/100k); empty = never.
    pub resample_steps: Vec<u64>,
    /// A latent is resampled when it has not fired for this many tokens; default
    /// `dead_window_tokens`.
    pub resample_window: Option<u64>,
    /// Rows whose reconstruction error is scored to draw the new directions (the paper used
    /// 819,200; the default is a sixth of that, a few dozen steps' work at batch 4096).
    pub resample_sample: usize,
    /// After a resampling the lr drops to 0.1x and returns to 1x along a cosine over this many
    /// steps (0 = no drop).
    pub resample_lr_warmup_steps: u64,
    /// The AuxK families' `--arch-opt aux_coeff` and `k_aux` under their older names (see
    /// [`OPTION_ALIASES`]).
    pub aux_coeff: Option<f32>,
    pub k_aux: Option<usize>,
    /// JumpReLU's `--arch-opt bandwidth`.
    pub jumprelu_bandwidth: Option<f32>,
    /// ReLU's `--arch-opt decoder_norm_l1`.
    pub relu_decoder_norm_l1: Option<bool>,
    /// The family's own options (`--arch-opt name=value`; `sae archs` lists them).
    pub arch_opt: BTreeMap<String, String>,
    /// Steps between checkpoints (0 = none).
    pub checkpoint_every: u64,
    /// Steps between lines of train_log.jsonl.
    pub log_every: u64,
    pub seed: u64,
    /// Rayon threads (results are bit-for-bit reproducible for a given count); default all.
    pub threads: Option<usize>,
    /// Precision of the encoder product: f32, or bf16 (a bf16 copy of W_enc times the
    /// bf16-rounded inputs, f32 sums; weights, gradients and Adam stay f32).
    pub precision: Precision,
    /// Rows of the final evaluation (sampled from the activations).
    pub eval_tokens: usize,
    /// Continue from the last checkpoint in `<out>.partial`.
    pub resume: bool,
    /// Train the finished SAE in `out` on to `steps`/`tokens` (more than it has seen), with
    /// its schedule and data stream. With its kept final checkpoint (`keep_state`) the run
    /// continues exactly; without one, Adam restarts from fresh moments and the lr warms up
    /// again over `lr_warmup_steps`.
    pub extend: bool,
    /// Keep the final checkpoint (training-scale weights, optimiser state) in
    /// `<out>/checkpoint/`, so that `extend` can continue the run exactly.
    pub keep_state: bool,
    /// Replace a trained SAE that `out` already holds (refused without it).
    pub overwrite: bool,
    /// No progress bar.
    pub quiet: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            acts: None,
            synth: None,
            model: None,
            hook: None,
            corpus: "python-docs".into(),
            ctx: 128,
            buffer_rows: 65_536,
            compute: ProductPrecision::F32,
            out: PathBuf::from("runs/sae"),
            arch: ArchKind::GATED,
            d_sae: None,
            l1: None,
            k: 32,
            lr: None,
            batch_size: 4096,
            steps: None,
            tokens: None,
            lr_warmup_steps: None,
            lr_decay_steps: 0,
            l1_warmup_steps: None,
            target_l0: None,
            target_l0_rate: None,
            adam_beta1: 0.0,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            b_dec_init: BDecInit::GeometricMedian,
            init_sample: 32_768,
            normalize: true,
            max_norm_ratio: 10.0,
            dead_window_tokens: 10_000_000,
            resample_steps: Vec::new(),
            resample_window: None,
            resample_sample: 131_072,
            resample_lr_warmup_steps: 1000,
            aux_coeff: None,
            k_aux: None,
            jumprelu_bandwidth: None,
            relu_decoder_norm_l1: None,
            arch_opt: BTreeMap::new(),
            checkpoint_every: 1000,
            log_every: 100,
            seed: 0,
            threads: None,
            precision: Precision::F32,
            eval_tokens: 16_384,
            resume: false,
            extend: false,
            keep_state: false,
            overwrite: false,
            quiet: false,
        }
    }
}

/// Flags (and config fields) older than `--arch-opt` that set a family's training option:
/// (field, option). A run's identity records such an option under the field's name, as it did
/// before the option moved into its family, so that those runs still resume.
pub const OPTION_ALIASES: &[(&str, &str)] = &[
    ("k_aux", "k_aux"),
    ("aux_coeff", "aux_coeff"),
    ("jumprelu_bandwidth", "bandwidth"),
    ("relu_decoder_norm_l1", "decoder_norm_l1"),
];

/// The families that have training option `option`, as "a, b or c".
fn families_with(option: &str) -> String {
    let names: Vec<&str> = ArchKind::all()
        .filter(|a| a.family().train_options().iter().any(|o| o.name == option))
        .map(ArchKind::as_str)
        .collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => "none".into(),
    }
}

/// The default of training option `option` (of the first family that has it).
fn option_default(option: &str) -> Option<serde_json::Value> {
    ArchKind::all().find_map(|a| {
        let f = a.family();
        f.train_options()
            .iter()
            .any(|o| o.name == option)
            .then(|| {
                f.train_opts(usize::MAX, &BTreeMap::new())
                    .ok()
                    .and_then(|o| o.get(option).cloned())
            })?
    })
}

/// A setting outside its range: the config field, the rule it breaks and the value given.
#[derive(Debug, Clone, PartialEq)]
pub struct BadSetting {
    /// Field name (`adam_beta2`); the flag is the same with dashes (`--adam-beta2`).
    pub field: &'static str,
    pub rule: String,
    pub got: String,
}

impl BadSetting {
    pub fn flag(&self) -> String {
        flag_name(self.field)
    }
}

impl std::fmt::Display for BadSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} must be {}; got {}", self.flag(), self.rule, self.got)
    }
}

impl std::error::Error for BadSetting {}

/// The flag of a config field: `adam_beta2` -> `--adam-beta2`.
pub fn flag_name(field: &str) -> String {
    format!("--{}", field.replace('_', "-"))
}

fn bad(field: &'static str, rule: &str, got: impl std::fmt::Display) -> BadSetting {
    BadSetting {
        field,
        rule: rule.to_string(),
        got: got.to_string(),
    }
}

/// A count that must be at least 1.
pub fn check_count(field: &'static str, v: u64, what: &str) -> Result<(), BadSetting> {
    if v == 0 {
        return Err(bad(field, &format!("at least 1 ({what})"), v));
    }
    Ok(())
}

/// A finite number > 0.
pub fn check_positive(field: &'static str, v: f32) -> Result<(), BadSetting> {
    if !(v.is_finite() && v > 0.0) {
        return Err(bad(field, "a positive number", v));
    }
    Ok(())
}

/// A finite number >= 0.
pub fn check_non_negative(field: &'static str, v: f32) -> Result<(), BadSetting> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(bad(field, "a non-negative number", v));
    }
    Ok(())
}

impl TrainConfig {
    /// Checks every setting against its own range (relations that need the data, such as
    /// `k <= d_sae` or `lr_decay_steps <= steps`, are checked by `resolve`). Run before any
    /// data is read or any directory created. The error is a `BadSetting` for a field out of
    /// range.
    pub fn validate(&self) -> Result<()> {
        self.check_ranges()?;
        if self.resume && self.extend {
            bail!("give --resume (an unfinished run) or --extend (a finished one), not both");
        }
        Ok(())
    }

    fn check_ranges(&self) -> Result<(), BadSetting> {
        let c = self;
        // Where a field is unbounded its full range is valid: seed; checkpoint_every (0 = none);
        // lr_decay_steps, lr_warmup_steps, l1_warmup_steps (0 = none, bounded by steps in
        // `resolve`); k_aux (0 = d_in / 2, bounded by d_sae in `resolve`); acts, model, hook
        // and corpus are checked when the source opens.
        if c.out.file_name().is_none() {
            return Err(bad(
                "out",
                "a directory path ending in a name (the run writes <name>.partial beside it)",
                c.out.display(),
            ));
        }
        if c.ctx < 2 {
            return Err(bad("ctx", "at least 2 (BOS and one token)", c.ctx));
        }
        check_count(
            "buffer_rows",
            c.buffer_rows as u64,
            "rows in the shuffle buffer",
        )?;
        if let Some(d) = c.d_sae {
            check_count("d_sae", d as u64, "latents in the dictionary")?;
        }
        if let Some(v) = c.l1 {
            check_non_negative("l1", v)?;
        }
        check_count("k", c.k as u64, "active latents per token")?;
        if let Some(v) = c.lr {
            check_positive("lr", v)?;
        }
        check_count("batch_size", c.batch_size as u64, "rows per step")?;
        if let Some(s) = c.steps {
            check_count("steps", s, "training steps")?;
        }
        if let Some(t) = c.tokens {
            check_count("tokens", t, "training tokens")?;
        }
        for (field, v) in [("adam_beta1", c.adam_beta1), ("adam_beta2", c.adam_beta2)] {
            // A decay of 1 never forgets its first moment; below 0 is no moving average.
            if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                return Err(bad(field, "in [0, 1)", v));
            }
        }
        // 0 would divide by zero for a parameter whose gradient has always been 0.
        check_positive("adam_eps", c.adam_eps)?;
        check_count(
            "init_sample",
            c.init_sample as u64,
            "rows for b_dec and the input scale",
        )?;
        // At a ratio <= 1 at least half the rows (those above the median norm) would be left out.
        if !(c.max_norm_ratio.is_finite() && (c.max_norm_ratio == 0.0 || c.max_norm_ratio > 1.0)) {
            return Err(bad(
                "max_norm_ratio",
                "0 (keep every row) or above 1 (a multiple of the median norm)",
                c.max_norm_ratio,
            ));
        }
        check_count("dead_window_tokens", c.dead_window_tokens, "tokens")?;
        c.check_resampling()?;
        c.check_l0_target()?;
        if let Some(v) = c.aux_coeff {
            check_non_negative("aux_coeff", v)?;
        }
        if let Some(v) = c.jumprelu_bandwidth {
            check_positive("jumprelu_bandwidth", v)?;
        }
        c.check_option_aliases()?;
        let family = c.arch.family();
        if c.precision != Precision::F32 && !family.has_encoder_product() {
            return Err(bad(
                "precision",
                &format!(
                    "f32 for --arch {} (its pursuit step has neither the encoder product nor the gathers that run in bf16)",
                    c.arch
                ),
                c.precision,
            ));
        }
        let names: Vec<&str> = family
            .options()
            .iter()
            .map(|o| o.name)
            .chain(family.train_options().iter().map(|o| o.name))
            .collect();
        if let Some(key) = c.arch_opt.keys().find(|k| !names.contains(&k.as_str())) {
            let listed = if names.is_empty() {
                format!("left out: {} has no options of its own", c.arch)
            } else {
                format!("one of {} for --arch {}", names.join(", "), c.arch)
            };
            return Err(bad("arch_opt", &listed, key));
        }
        check_count("log_every", c.log_every, "steps between log lines")?;
        if let Some(t) = c.threads {
            check_count("threads", t as u64, "leave it out to use every core")?;
        }
        // The final metrics of zero rows are 0/0: NaN in the summary, which no reader accepts.
        check_count(
            "eval_tokens",
            c.eval_tokens as u64,
            "rows of the final evaluation",
        )?;
        Ok(())
    }

    /// The trainer's fixed hyperparameters, with the family's resolved training options.
    pub fn hyper(&self, r: &Resolved) -> TrainHyper {
        self.hyper_with(r.arch_opts.clone())
    }

    fn hyper_with(&self, arch_opts: TrainOpts) -> TrainHyper {
        TrainHyper {
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_eps: self.adam_eps,
            dead_window_tokens: self.dead_window_tokens,
            arch_opts,
            seed: self.seed,
            precision: self.precision,
        }
    }

    /// The older flags given, as (field, option, value text).
    fn option_alias_values(&self) -> Vec<(&'static str, &'static str, String)> {
        let given = [
            self.k_aux.map(|v| v.to_string()),
            self.aux_coeff.map(|v| v.to_string()),
            self.jumprelu_bandwidth.map(|v| v.to_string()),
            self.relu_decoder_norm_l1.map(|v| v.to_string()),
        ];
        OPTION_ALIASES
            .iter()
            .zip(given)
            .filter_map(|(&(field, option), text)| Some((field, option, text?)))
            .collect()
    }

    /// An older flag for a family without its option is refused unless it holds the
    /// option's default (config files that list every field keep loading); one that
    /// disagrees with `--arch-opt` is refused.
    fn check_option_aliases(&self) -> Result<(), BadSetting> {
        let family = self.arch.family();
        for (field, option, text) in self.option_alias_values() {
            let spec = family.train_options().iter().find(|o| o.name == option);
            let Some(spec) = spec else {
                let is_default = ArchKind::all()
                    .flat_map(|a| a.family().train_options())
                    .find(|o| o.name == option)
                    .and_then(|o| o.parse(&text).ok())
                    .is_some_and(|v| Some(v) == option_default(option));
                if is_default {
                    continue;
                }
                return Err(bad(
                    field,
                    &format!(
                        "left out unless --arch is {} (the families with option {option}, \
                         also set by --arch-opt {option}=...)",
                        families_with(option)
                    ),
                    format!("{text} with --arch {}", self.arch),
                ));
            };
            if let Some(other) = self.arch_opt.get(option) {
                if spec.parse(other) != spec.parse(&text) {
                    return Err(bad(
                        field,
                        &format!("left out or equal to --arch-opt {option}={other}"),
                        text,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The family's training options, defaults filled in, from `--arch-opt` and the older
    /// flags; errors name the flag that gave the value.
    pub fn train_opts(&self, d_sae: usize) -> Result<TrainOpts> {
        let family = self.arch.family();
        let mut given = self.arch_opt.clone();
        for (field, option, text) in self.option_alias_values() {
            if !family.train_options().iter().any(|o| o.name == option) {
                continue;
            }
            let one = BTreeMap::from([(option.to_string(), text.clone())]);
            family
                .train_opts(d_sae, &one)
                .map_err(|e| anyhow::anyhow!("{}: {e}", flag_name(field)))?;
            given.insert(option.to_string(), text);
        }
        family
            .train_opts(d_sae, &given)
            .map_err(|e| anyhow::anyhow!("--arch-opt: {e}"))
    }

    /// The resampling settings on their own (the end of the run is checked in `resolve`).
    fn check_resampling(&self) -> Result<(), BadSetting> {
        let c = self;
        if c.resample_steps.is_empty() {
            return Ok(());
        }
        let list = || {
            c.resample_steps
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        if !c.arch.family().resamplable() {
            return Err(bad(
                "resample_steps",
                "left out unless --arch relu or gated (the architectures the Gated paper \
                 resampled; topk and batchtopk revive dead latents with AuxK instead)",
                format!("{} with --arch {}", list(), c.arch),
            ));
        }
        if c.resample_steps[0] == 0 || c.resample_steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad(
                "resample_steps",
                "increasing step numbers, each at least 1, separated by commas (e.g. \
                 25000,50000,75000,100000)",
                list(),
            ));
        }
        if let Some(w) = c.resample_window {
            check_count(
                "resample_window",
                w,
                "tokens without firing that make a latent dead",
            )?;
        }
        check_count(
            "resample_sample",
            c.resample_sample as u64,
            "rows scored to draw new directions",
        )?;
        Ok(())
    }

    fn check_l0_target(&self) -> Result<(), BadSetting> {
        let c = self;
        if let Some(t) = c.target_l0 {
            if !(t.is_finite() && t > 0.0) {
                return Err(bad("target_l0", "a positive number of active latents", t));
            }
            if c.arch.uses_k() {
                return Err(bad(
                    "target_l0",
                    &format!(
                        "left out for --arch {}, which reaches its L0 through --k",
                        c.arch
                    ),
                    t,
                ));
            }
        }
        if let Some(r) = c.target_l0_rate {
            if c.target_l0.is_none() {
                return Err(bad(
                    "target_l0_rate",
                    "left out without --target-l0, which it tunes",
                    r,
                ));
            }
            if !(r.is_finite() && r > 0.0 && r < 1.0) {
                return Err(bad(
                    "target_l0_rate",
                    "in (0, 1): the largest relative change of the coefficient per step",
                    r,
                ));
            }
        }
        Ok(())
    }

    /// Tokens without firing after which a latent is resampled.
    pub fn resample_window_tokens(&self) -> u64 {
        self.resample_window.unwrap_or(self.dead_window_tokens)
    }

    /// Reads a `.toml` or `.json` config file (unknown keys are an error).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        if is_json {
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        } else {
            toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim()))
        }
    }
}

/// Every number the run uses, after defaults that depend on the data and architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub d_in: usize,
    pub d_sae: usize,
    pub lr: f32,
    pub sparsity_coeff: f32,
    pub steps: u64,
    pub lr_warmup_steps: u64,
    pub l1_warmup_steps: u64,
    /// With `target_l0`: the largest relative change of the coefficient per step.
    #[serde(default)]
    pub target_l0_rate: Option<f64>,
    /// The family's settings saved with the SAE (k, prefix widths, ...).
    #[serde(default)]
    pub settings: Settings,
    /// The family's training options (k_aux, bandwidth, ...), defaults filled in.
    #[serde(default)]
    pub arch_opts: TrainOpts,
}

pub fn resolve(cfg: &TrainConfig, d_in: usize, n_rows: Option<u64>) -> Result<Resolved> {
    cfg.validate()?;
    let d_sae = cfg.d_sae.unwrap_or(8 * d_in);
    if d_sae == 0 {
        bail!("--d-sae must be at least 1 (the activations have d_in = 0)");
    }
    let family = cfg.arch.family();
    let topk = cfg.arch.uses_k();
    if topk && cfg.k > d_sae {
        bail!(
            "--k must be between 1 and d_sae = {d_sae} for {}; got {}",
            cfg.arch,
            cfg.k
        );
    }
    if topk && cfg.l1.is_some_and(|v| v != 0.0) {
        bail!(
            "{} has no sparsity coefficient; set its sparsity with --k instead of --l1",
            cfg.arch
        );
    }
    let settings = family
        .settings(cfg.k, d_sae, &cfg.arch_opt)
        .map_err(|e| anyhow::anyhow!("--arch-opt: {e}"))?;
    let arch_opts = cfg.train_opts(d_sae)?;
    let lr = cfg.lr.unwrap_or(family.default_lr(d_sae));
    let sparsity_coeff = match family.sparsity() {
        Sparsity::K => 0.0,
        Sparsity::Penalty { default } => cfg.l1.unwrap_or(default),
    };
    let bs = cfg.batch_size as u64;
    let steps = match (cfg.steps, cfg.tokens, n_rows) {
        (Some(s), _, _) => s,
        (None, Some(t), _) => t.div_ceil(bs),
        (None, None, Some(n)) => n.div_ceil(bs),
        (None, None, None) => bail!("give --steps or --tokens (the source has no fixed size)"),
    };
    if steps == 0 {
        bail!("training needs at least one step");
    }
    if cfg.lr_decay_steps > steps {
        bail!(
            "--lr-decay-steps ({}) exceeds the number of steps ({steps})",
            cfg.lr_decay_steps
        );
    }
    if let Some(&last) = cfg.resample_steps.last() {
        if last >= steps {
            bail!(
                "--resample-steps: step {last} is not before the end of the run ({steps} steps), \
                 so nothing would train on what it resamples; give steps below {steps}, or train \
                 longer with --steps or --tokens"
            );
        }
    }
    let lr_warmup_steps = cfg.lr_warmup_steps.unwrap_or((steps / 10).min(1000));
    let l1_warmup_steps = cfg
        .l1_warmup_steps
        .unwrap_or(family.default_sparsity_warmup(steps, &cfg.hyper_with(arch_opts.clone())));
    let target_l0_rate = cfg.target_l0.map(|_| {
        cfg.target_l0_rate.unwrap_or_else(|| {
            crate::l0_target::default_rate(steps.saturating_sub(l1_warmup_steps))
        })
    });
    Ok(Resolved {
        d_in,
        d_sae,
        lr,
        sparsity_coeff,
        steps,
        lr_warmup_steps,
        l1_warmup_steps,
        target_l0_rate,
        settings,
        arch_opts,
    })
}

/// Learning rate at `step` (0-based): linear warm-up, constant, optional linear decay to 0.
/// The warm-up counts `optimizer_step`, the steps since Adam's moments started: equal to
/// `step`, except in a run extended without its optimiser state, whose fresh Adam warms up
/// again.
pub fn lr_at(r: &Resolved, decay_steps: u64, step: u64, optimizer_step: u64) -> f32 {
    let mut f = 1.0f64;
    if r.lr_warmup_steps > 0 && optimizer_step < r.lr_warmup_steps {
        f = (optimizer_step + 1) as f64 / r.lr_warmup_steps as f64;
    }
    let decay_start = r.steps - decay_steps;
    if decay_steps > 0 && step >= decay_start {
        f = f.min((r.steps - step) as f64 / decay_steps as f64);
    }
    (r.lr as f64 * f) as f32
}

/// Factor on the lr at `step` (0-based) after the resamplings at `resample_steps` (each
/// after that many steps; the training loop passes those that resampled some latent): as the
/// Gated paper (App. D.1.1), 0.1 at the first step after a resampling, back to 1 along a
/// cosine over `warmup` steps. The steps travel in the checkpoint, so a resumed run follows
/// the same schedule.
pub fn resample_lr_factor(resample_steps: &[u64], warmup: u64, step: u64) -> f64 {
    let Some(&last) = resample_steps.iter().filter(|&&s| s <= step).max() else {
        return 1.0;
    };
    let t = step - last;
    if t >= warmup {
        return 1.0;
    }
    // 1 at t = 0, 0 at t = warmup.
    let c = 0.5 * (1.0 + (std::f64::consts::PI * t as f64 / warmup as f64).cos());
    1.0 - 0.9 * c
}

/// Sparsity coefficient at `step`: linear warm-up from 0, then constant.
pub fn sparsity_at(r: &Resolved, step: u64) -> f32 {
    if r.l1_warmup_steps > 0 && step < r.l1_warmup_steps {
        (r.sparsity_coeff as f64 * (step + 1) as f64 / r.l1_warmup_steps as f64) as f32
    } else {
        r.sparsity_coeff
    }
}
