//! The `sae train` flags. Each is optional so that a `--config` file can supply it; a flag
//! given on the command line overrides the file.
//!
//! Numeric flags accept a negative number after a space (`--lr -1`), so that it reaches the
//! range check and its message ("--lr must be a positive number") instead of clap's
//! "unexpected argument '-1'".

use crate::config::{BDecInit, BadSetting, TrainConfig};
use anyhow::{bail, Context, Result};
use clap::Args;
use sae_core::{ArchKind, Precision};
use sae_lm::ProductPrecision;
use std::path::PathBuf;

fn parse_precision(s: &str) -> Result<Precision, String> {
    s.parse()
}

fn parse_arch(s: &str) -> Result<ArchKind, String> {
    s.parse::<ArchKind>().map_err(|e| e.to_string())
}

#[derive(Args, Clone, Debug, Default)]
pub struct TrainFlags {
    /// TOML or JSON file with the same fields as these flags (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Activation file or directory (.safetensors / .npy shards).
    #[arg(long)]
    pub acts: Option<PathBuf>,
    /// Train on samples generated on the fly by a synthetic benchmark instead of --acts:
    /// synthsaebench-16k or synthsaebench-small; needs --steps or --tokens.
    #[arg(long)]
    pub synth: Option<String>,
    /// Train straight from this model instead of --acts ("smollm2-135m", a .gguf, a Hugging
    /// Face directory or repo id); needs --hook and --steps or --tokens.
    #[arg(long)]
    pub model: Option<String>,
    /// Hook point for --model, e.g. blocks.15.hook_resid_post. Several (a comma list, or the
    /// flag repeated) train one SAE each, into --out/<hook>/, from one forward pass per batch.
    #[arg(long, value_delimiter = ',')]
    pub hook: Vec<String>,
    /// Corpus for --model: "python-docs", a directory or file of .txt/.jsonl/.parquet
    /// (PATH#NAME reads field/column NAME instead of "text").
    #[arg(long)]
    pub corpus: Option<String>,
    /// Context length for --model (BOS included).
    #[arg(long, allow_negative_numbers = true)]
    pub ctx: Option<usize>,
    /// Rows in the shuffle buffer for --model.
    #[arg(long, allow_negative_numbers = true)]
    pub buffer_rows: Option<usize>,
    /// Precision of the model's weight products for --model: f32, bf16 or bf16x3, as
    /// `sae harvest --compute`.
    #[arg(long)]
    pub compute: Option<ProductPrecision>,
    /// Output directory (SAELens layout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// SAE family: gated, relu, topk, batchtopk, jumprelu, ... (`sae archs` lists every one
    /// with its options).
    #[arg(long, value_parser = parse_arch)]
    pub arch: Option<ArchKind>,
    #[arg(long, allow_negative_numbers = true)]
    pub d_sae: Option<usize>,
    /// Sparsity coefficient for relu/gated (L1) and jumprelu (L0).
    #[arg(long, allow_negative_numbers = true)]
    pub l1: Option<f32>,
    /// Active latents per token for topk/batchtopk.
    #[arg(long, allow_negative_numbers = true)]
    pub k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub batch_size: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub steps: Option<u64>,
    #[arg(long, allow_negative_numbers = true)]
    pub tokens: Option<u64>,
    #[arg(long, allow_negative_numbers = true)]
    pub lr_warmup_steps: Option<u64>,
    #[arg(long, allow_negative_numbers = true)]
    pub lr_decay_steps: Option<u64>,
    #[arg(long, allow_negative_numbers = true)]
    pub l1_warmup_steps: Option<u64>,
    /// relu, gated, jumprelu: steer the sparsity coefficient toward this training L0 (a
    /// multiplier on --l1, adjusted every step after the sparsity warm-up).
    #[arg(long, allow_negative_numbers = true)]
    pub target_l0: Option<f64>,
    /// Largest relative change of the coefficient per step under --target-l0 (default
    /// 8 / steps after the warm-up, within [3e-4, 1e-2]).
    #[arg(long, allow_negative_numbers = true)]
    pub target_l0_rate: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub adam_beta1: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub adam_beta2: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub adam_eps: Option<f32>,
    #[arg(long, value_enum)]
    pub b_dec_init: Option<BDecInit>,
    #[arg(long, allow_negative_numbers = true)]
    pub init_sample: Option<usize>,
    /// Normalise inputs to E||x||^2 = d_in (`--normalize false` to turn off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub normalize: Option<bool>,
    /// Leave out rows with a norm over this multiple of the median norm (massive activations
    /// on a few tokens; 0 keeps every row) [default: 10].
    #[arg(long, allow_negative_numbers = true)]
    pub max_norm_ratio: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub dead_window_tokens: Option<u64>,
    /// Relu/gated: resample dead latents after these steps, e.g. 25000,50000,75000,100000
    /// (Bricken et al.; the lr then drops to 0.1x and returns over --resample-lr-warmup-steps).
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 1,
        allow_negative_numbers = true
    )]
    pub resample_steps: Option<Vec<u64>>,
    /// Tokens without firing that make a latent dead for resampling [default:
    /// --dead-window-tokens].
    #[arg(long, allow_negative_numbers = true)]
    pub resample_window: Option<u64>,
    /// Rows scored to draw the resampled directions [default: 131072].
    #[arg(long, allow_negative_numbers = true)]
    pub resample_sample: Option<usize>,
    /// Steps over which the lr returns from 0.1x to 1x after a resampling [default: 1000].
    #[arg(long, allow_negative_numbers = true)]
    pub resample_lr_warmup_steps: Option<u64>,
    /// Same as --arch-opt aux_coeff=X (the AuxK families: topk, batchtopk, ...).
    #[arg(long, allow_negative_numbers = true)]
    pub aux_coeff: Option<f32>,
    /// Same as --arch-opt k_aux=N (the AuxK families: topk, batchtopk, ...).
    #[arg(long, allow_negative_numbers = true)]
    pub k_aux: Option<usize>,
    /// Same as --arch-opt bandwidth=X (jumprelu).
    #[arg(long, allow_negative_numbers = true)]
    pub jumprelu_bandwidth: Option<f32>,
    /// An option of the family itself, NAME=VALUE (repeatable; `sae archs` lists them).
    #[arg(long = "arch-opt", value_name = "NAME=VALUE")]
    pub arch_opt: Vec<String>,
    /// Same as --arch-opt decoder_norm_l1=true (relu): decoder-norm-weighted L1 and no
    /// unit-norm constraint.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub relu_decoder_norm_l1: Option<bool>,
    #[arg(long, allow_negative_numbers = true)]
    pub checkpoint_every: Option<u64>,
    #[arg(long, allow_negative_numbers = true)]
    pub log_every: Option<u64>,
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    #[arg(long, allow_negative_numbers = true)]
    pub threads: Option<usize>,
    /// f32 [default]; bf16: the encoder product in bf16 (bf16 copy of W_enc, f32 sums and
    /// Adam; fast with AMX or AVX512-BF16, slower than f32 without either); bf16-sparse:
    /// that, and the sparse passes gather bf16 copies of W_dec, the inputs and the residuals;
    /// f32-bf16-sparse: the f32 encoder product with those bf16 gathers (for CPUs without
    /// bf16 units); f32-screened: f32 results, the encoder product screened in bf16 and every
    /// entry that may pass the cutoff recomputed in f32 (relu, gated, jumprelu, topk,
    /// batchtopk, matryoshka, mutualchoice; the others, and CPUs without bf16 units, run
    /// the f32 product); bf16x3: the encoder product
    /// as three bf16 products (each operand a bf16 part and a bf16 remainder, ~16 significant
    /// bits; pre-activations within ~1e-5 of f32's), the rest f32, faster than f32 on AMX.
    #[arg(long, value_parser = parse_precision)]
    pub precision: Option<Precision>,
    #[arg(long, allow_negative_numbers = true)]
    pub eval_tokens: Option<usize>,
    /// Continue from the last checkpoint of this --out.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub resume: Option<bool>,
    /// Train the finished SAE in --out on to a larger --tokens/--steps. Exact with a kept
    /// final checkpoint (--keep-state); otherwise Adam restarts and the lr warms up again.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub extend: Option<bool>,
    /// Keep the final checkpoint (weights, optimiser state) in <out>/checkpoint/ for --extend.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub keep_state: Option<bool>,
    /// Replace the trained SAE that --out already holds (without it, such an --out is refused).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite: Option<bool>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub quiet: Option<bool>,
}

impl TrainFlags {
    /// The config: the `--config` file (or the defaults) with the given flags on top.
    pub fn to_config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_file(p).context("loading --config")?,
            None => TrainConfig::default(),
        };
        // Fields given on the command line, so an out-of-range value is reported as the
        // user wrote it: as a flag, or as a field of the config file.
        let mut given: Vec<&str> = Vec::new();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f {
                c.$f = v.clone();
                given.push(stringify!($f));
            } )* };
        }
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f {
                c.$f = Some(v.clone());
                given.push(stringify!($f));
            } )* };
        }
        set!(corpus, ctx, buffer_rows, compute);
        set_opt!(synth, model);
        if !self.hook.is_empty() {
            c.hook = Some(self.hook.join(","));
            given.push("hook");
        }
        set!(
            out,
            arch,
            k,
            batch_size,
            lr_decay_steps,
            adam_beta1,
            adam_beta2,
            adam_eps,
            b_dec_init
        );
        set!(
            init_sample,
            normalize,
            max_norm_ratio,
            dead_window_tokens,
            resample_steps,
            resample_sample,
            resample_lr_warmup_steps
        );
        set!(
            checkpoint_every,
            log_every,
            seed,
            eval_tokens,
            resume,
            extend,
            keep_state,
            overwrite,
            quiet
        );
        set_opt!(
            acts,
            d_sae,
            l1,
            lr,
            steps,
            tokens,
            lr_warmup_steps,
            l1_warmup_steps,
            target_l0,
            target_l0_rate,
            resample_window,
            threads,
            aux_coeff,
            k_aux,
            jumprelu_bandwidth,
            relu_decoder_norm_l1
        );
        set!(precision);
        for opt in &self.arch_opt {
            let Some((name, value)) = opt.split_once('=') else {
                bail!(
                    "--arch-opt {opt}: write NAME=VALUE (`sae archs` lists each family's options)"
                );
            };
            c.arch_opt
                .insert(name.trim().to_string(), value.trim().to_string());
            given.push("arch_opt");
        }
        if let Err(e) = c.validate() {
            if let (Some(path), Some(b)) = (&self.config, e.downcast_ref::<BadSetting>()) {
                if !given.contains(&b.field) {
                    bail!(
                        "{}: {} must be {} (flag {}); got {}",
                        path.display(),
                        b.field,
                        b.rule,
                        b.flag(),
                        b.got
                    );
                }
            }
            return Err(e);
        }
        Ok(c)
    }
}
