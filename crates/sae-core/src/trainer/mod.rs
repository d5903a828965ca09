//! One training step per call: the fused hot path of every architecture.
//!
//! # Loss convention
//! Every term is summed over `d_in` (or over latents) per token and then averaged over the
//! tokens of the batch, as in the Gated paper's pseudo-code:
//! `loss = mean_b( ||x_b - x_hat_b||^2 + lambda * S(x_b) + aux_b )`.
//! The paper's own infrastructure divided the L2 term by `d_in`; its lambda values therefore
//! map to ours as `lambda_ours = d_in * lambda_paper` (the whole loss is `d_in` times larger,
//! which Adam does not care about apart from eps). TopK/BatchTopK's AuxK term is
//! `aux_coeff * sum_b ||e_b - e_hat_b||^2 / sum_b ||e_b - mean(e)||^2` as in the reference code,
//! and zero when no latent is dead.
//!
//! # Non-finite losses
//! `step` computes the loss before any parameter changes. If it is not finite, `step` returns
//! the stats (with the NaN/Inf) WITHOUT applying the update and without counting the step, so
//! the caller can stop and keep its last checkpoint.
//!
//! # One step (`step.rs`, one method per phase)
//! 1. `encode`: `xc = x - b_dec`; `pre = xc @ W_enc`: the only dense product (`gemm`, rayon;
//!    or with `TrainHyper::precision` bf16, a bf16 copy of W_enc packed afresh each step).
//!    With `f32-screened` (rules with `Arch::screen_cutoff`) the product runs in bf16 and
//!    `screen` recomputes in f32 every entry within a proven margin of its cutoff.
//!    Rules with a dense penalty (`Arch::dense_penalty`) then get its value and gradient on
//!    every pre-activation, and rules with training noise (`Arch::pre_noise`) get the noise
//!    added to `pre`, drawn from (seed, step, row) alone. The penalty's W_enc gradient is one
//!    more product, `Gpen^T xc` (folded into the dense path's encoder product).
//! 2. `prepare_selection`, `select`: the architecture first computes what it needs from the
//!    whole batch (`Arch::prepare_batch`, into a state of its own type the trainer holds
//!    without reading), then turns each row of `pre` into sparse entries (row-parallel, with a
//!    vectorised candidate prefilter), flattened to CSR.
//! 3. `decode`: per row, sparse decode (and the auxiliary reconstruction), the residual of each
//!    reconstruction head (nested dictionary prefixes, Matryoshka), loss terms, and
//!    per entry in the aux reconstruction `d_j . r_aux_b` while the rows `d_j` are still in
//!    cache (with the frozen decoder's aux, every entry's `d_j . r_b` along with it).
//! 4. `transpose_entries`: the entries indexed per latent.
//! 5. `latent_pass`: per latent, over that index (each task owns a chunk of latents, so no
//!    write races): `d_j . r_b` in the same pass over the gathered residual rows `r_b` as
//!    the W_dec row gradient (unless the decode gave it), the architecture's gradient w.r.t.
//!    each pre-activation and its own parameters, the W_enc row gradient, fused with Adam,
//!    the unit-norm
//!    projection and renormalisation.
//! 6. `dense_params`: dense Adam on the small vectors (b_dec, per-latent parameters) and
//!    the inference estimate of the batch threshold (`Arch::batch_threshold`, BatchTopK).
//!
//! When more than 1/16 of the (token, latent) pairs are active (e.g. right after the paper's
//! initialisation, where half the latents fire), steps 3 and 5 use GEMMs on dense copies of the
//! code instead; both paths are checked against the same dense reference in the tests.
//!
//! # Adam and sparsity
//! With beta1 = 0 (the default) a latent without entries gets a zero update; its rows are
//! skipped and the second-moment decay is applied when it next has a gradient
//! (`v * beta2^missed`, equal to the dense update up to float rounding). With beta1 != 0
//! every row is updated every step.

pub(crate) mod noise;
mod pursuit;
mod resample;
mod state;
mod step;
#[cfg(test)]
pub(crate) use step::ScreenedPre;

pub use resample::{Resampled, RESAMPLE_ENCODER_SCALE};

use step::{Buffers, DENSE_FRACTION, THRESHOLD_EMA_BETA};

use crate::arch::{Arch, ArchKind, Settings, TrainOpts};
use crate::bf16::Precision;
use crate::optim::Moments;
use crate::sae::{Sae, SaeMeta};
use rayon::prelude::*;

/// Hyperparameters that stay fixed during a run; lr and the sparsity coefficient are passed
/// per step so that schedules live in the caller.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainHyper {
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_eps: f32,
    /// A latent is dead when it has not fired in this many tokens.
    pub dead_window_tokens: u64,
    /// The family's own training options (AuxK's `k_aux`, JumpReLU's `bandwidth`, ...), from
    /// `Family::train_opts`; the family's defaults for those missing.
    #[serde(default)]
    pub arch_opts: TrainOpts,
    /// Seeds the training-time noise of rules that add any (`Arch::pre_noise`), with the
    /// step and the row.
    #[serde(default)]
    pub seed: u64,
    /// Precision of the encoder product (`bf16::Precision`; f32 unless asked).
    #[serde(default)]
    pub precision: Precision,
}

impl Default for TrainHyper {
    /// The papers' values: Adam (0, 0.999) (Gated App D.1.1), eps 1e-8, dead after 10M tokens
    /// (OAI); each family's own defaults.
    fn default() -> Self {
        TrainHyper {
            adam_beta1: 0.0,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            dead_window_tokens: 10_000_000,
            arch_opts: TrainOpts::new(),
            seed: 0,
            precision: Precision::F32,
        }
    }
}

/// What one step measured (means over the batch).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepStats {
    pub loss: f64,
    pub mse: f64,
    pub sparsity_loss: f64,
    pub aux_loss: f64,
    pub l0: f64,
    pub fvu: f64,
    pub dead_latents: usize,
}

/// Raw loss gradients of one batch (before the unit-norm projection), for tests and tools.
/// `w_enc_t` and `w_dec` are `[d_sae, d_in]`; `params` follow `Arch::param_names`.
#[derive(Clone, Debug, Default)]
pub struct Grads {
    pub w_enc_t: Vec<f32>,
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    pub params: Vec<Vec<f32>>,
}

/// An SAE plus its optimiser state.
/// Fields are private: the trainer keeps the encoder transposed (`[d_sae, d_in]`, one row per
/// latent for the sparse gradient pass); `snapshot` returns the SAE in SAELens layout.
pub struct SaeTrainer {
    arch: std::sync::Arc<dyn Arch>,
    kind: ArchKind,
    d_in: usize,
    d_sae: usize,
    settings: Settings,
    apply_b_dec_to_input: bool,
    meta: SaeMeta,
    hyper: TrainHyper,
    w_enc_t: Vec<f32>,
    w_dec: Vec<f32>,
    b_dec: Vec<f32>,
    params: Vec<Vec<f32>>,
    mom_enc: Moments,
    mom_dec: Moments,
    mom_bdec: Moments,
    mom_params: Vec<Moments>,
    /// Step at which each latent's W_enc/W_dec rows last got an Adam update (lazy decay).
    last_update: Vec<u64>,
    tokens_since_fired: Vec<u64>,
    steps: u64,
    /// BatchTopK: EMA numerator of the batch thresholds, and the last batch's threshold.
    threshold_ema: f64,
    last_batch_threshold: f32,
    dense_fraction: f64,
    buf: Buffers,
    /// The pursuit step's correlations and per-step atom gradients (rules that select
    /// against the residual).
    buf_pursuit: Vec<f32>,
    /// Working space of a residual-selecting rule (matching pursuit's Gram matrix).
    buf_select: Vec<f32>,
    buf_atom_grads: Vec<f32>,
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    out.par_chunks_mut(rows.max(1))
        .enumerate()
        .for_each(|(c, dst)| {
            for (r, d) in dst.iter_mut().enumerate() {
                *d = w[r * cols + c];
            }
        });
    out
}

impl SaeTrainer {
    pub fn new(sae: Sae, hyper: TrainHyper) -> Self {
        // The buffers the sparse passes gather from go on huge pages (`hugepage`).
        let _huge = crate::hugepage::scope();
        let (d_in, d_sae) = (sae.d_in, sae.d_sae);
        let arch: std::sync::Arc<dyn Arch> = sae.arch.family().rule(&sae, &hyper).into();
        let params = arch.trained_params(&sae);
        let th = arch.initial_batch_threshold(&sae);
        let b1 = hyper.adam_beta1;
        SaeTrainer {
            kind: sae.arch,
            d_in,
            d_sae,
            settings: sae.settings,
            apply_b_dec_to_input: sae.apply_b_dec_to_input,
            w_enc_t: transpose(&sae.w_enc, d_in, d_sae),
            // A copy made here, in the huge-page scope.
            w_dec: sae.w_dec.as_slice().to_vec(),
            b_dec: sae.b_dec,
            mom_enc: Moments::new(d_sae * d_in, b1),
            mom_dec: Moments::new(d_sae * d_in, b1),
            mom_bdec: Moments::new(d_in, b1),
            mom_params: params.iter().map(|p| Moments::new(p.len(), b1)).collect(),
            params,
            last_update: vec![0; d_sae],
            tokens_since_fired: vec![0; d_sae],
            steps: 0,
            threshold_ema: 0.0,
            last_batch_threshold: th,
            dense_fraction: DENSE_FRACTION,
            meta: sae.meta,
            arch,
            buf: Buffers::new(hyper.precision),
            hyper,
            buf_pursuit: Vec::new(),
            buf_select: Vec::new(),
            buf_atom_grads: Vec::new(),
        }
    }

    /// The current weights in SAELens layout.
    pub fn snapshot(&self) -> Sae {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        Sae {
            arch: self.kind,
            d_in,
            d_sae,
            w_enc: transpose(&self.w_enc_t, d_sae, d_in),
            w_dec: self.w_dec.clone(),
            b_dec: self.b_dec.clone(),
            params: self
                .arch
                .saved_params(&self.params, self.inference_threshold()),
            settings: self.settings.clone(),
            apply_b_dec_to_input: self.apply_b_dec_to_input,
            meta: self.meta.clone(),
        }
    }

    /// The inference threshold estimated so far (rules that select per batch).
    pub fn inference_threshold(&self) -> f32 {
        if self.steps == 0 {
            return self.last_batch_threshold;
        }
        let bc = 1.0 - THRESHOLD_EMA_BETA.powf(self.steps as f64);
        (self.threshold_ema / bc) as f32
    }

    /// Code density above which a step switches to dense GEMMs (tests force each path).
    #[doc(hidden)]
    pub fn set_dense_fraction(&mut self, fraction: f64) {
        self.dense_fraction = fraction;
    }

    /// Bytes of W_dec the decode, and of W_enc the screen, gathers from per pass (0: the
    /// default); tests take small matrices in slices with it.
    #[cfg(test)]
    pub(crate) fn set_gather_slice_bytes(&mut self, bytes: usize) {
        self.buf.gather_slice_bytes = bytes;
    }

    /// Rows per block of the sliced decode and screen (0: the default).
    #[cfg(test)]
    pub(crate) fn set_gather_row_block(&mut self, rows: usize) {
        self.buf.gather_row_block = rows;
    }

    /// Latents per latent-pass task and batch rows per block of its entries (0: sized for
    /// L2 from d_in); tests take several blocks of a small batch with it.
    #[cfg(test)]
    pub(crate) fn set_latent_block(&mut self, block: usize) {
        self.buf.latent_block = block;
    }

    /// Whether to take this CPU for one with bf16 units (`Precision::F32Screened` screens
    /// only there); `true` runs the screen on the widened product where it has none.
    #[cfg(test)]
    pub(crate) fn set_bf16_units(&mut self, units: bool) {
        self.buf.bf16_units = units;
    }

    /// Screens (`Precision::F32Screened`) whatever fraction of the entries it recomputes.
    #[cfg(test)]
    pub(crate) fn screen_any_density(&mut self) {
        self.buf.screen_max_fraction = f64::INFINITY;
    }

    /// The fraction of the batch's first rows' k*m-th bf16 score a batch top-k screen
    /// raises its cutoffs by (0: the default); tests set it past the batch's threshold.
    #[cfg(test)]
    pub(crate) fn set_screen_batch_guess(&mut self, guess: f32) {
        self.buf.screen_batch_guess = guess;
    }

    /// Screened steps whose batch top-k guess proved too high (they ran the f32 product).
    #[cfg(test)]
    pub(crate) fn screen_misses(&self) -> u64 {
        self.buf.screen_misses
    }

    pub fn steps_done(&self) -> u64 {
        self.steps
    }

    pub fn hyper(&self) -> &TrainHyper {
        &self.hyper
    }

    /// Tokens since each latent last fired (f > 0).
    pub fn tokens_since_fired(&self) -> &[u64] {
        &self.tokens_since_fired
    }

    /// One optimiser step on `n` rows of `x` (`[n, d_in]`).
    ///
    /// If the loss is not finite (NaN/Inf in `x` or a diverged run), the returned stats carry
    /// it and NOTHING was changed: no update, no step counted. The caller should stop and keep
    /// its last checkpoint. Panics if `x.len() != n * d_in` (a programming error, not bad data).
    pub fn step(&mut self, x: &[f32], n: usize, lr: f32, sparsity_coeff: f32) -> StepStats {
        self.dispatch(x, None, n, sparsity_coeff, Mode::Apply(lr))
    }

    /// Whether the steps may screen the encoder product in bf16 (`Precision::F32Screened`
    /// with a rule that has `Arch::screen_cutoff`, on a CPU with bf16 units); otherwise that
    /// precision runs the f32 product. A step whose code is too dense to screen runs the f32
    /// product as well, as does a batch top-k step whose guess at the batch's threshold
    /// proves too high.
    pub fn screens(&self) -> bool {
        self.hyper.precision.screened()
            && self.buf.bf16_units
            && self.arch.screen_cutoff(&self.params, &mut Vec::new())
    }

    /// Whether this trainer's rule selects with the loss gradient of each input row
    /// (g-SAE): it must be stepped with `step_with_grad`, and `step` panics.
    pub fn needs_input_grad(&self) -> bool {
        self.arch.reads_input_grad()
    }

    /// `step` with `grad` (`[n, d_in]`), the gradient of the language model's loss w.r.t.
    /// each row of `x` (at the scale of `x`), for rules that select with it; others ignore it.
    pub fn step_with_grad(
        &mut self,
        x: &[f32],
        grad: &[f32],
        n: usize,
        lr: f32,
        sparsity_coeff: f32,
    ) -> StepStats {
        self.dispatch(x, Some(grad), n, sparsity_coeff, Mode::Apply(lr))
    }

    /// The step of this trainer's rule: the shared sparse step, or the pursuit step of rules
    /// that select against the residual.
    fn dispatch(
        &mut self,
        x: &[f32],
        grad: Option<&[f32]>,
        n: usize,
        sparsity_coeff: f32,
        mode: Mode,
    ) -> StepStats {
        // Buffers the step grows (first step, larger batch) go on huge pages too.
        let _huge = crate::hugepage::scope();
        if self.arch.residual_select().is_none() {
            return self.run(x, grad, n, sparsity_coeff, mode);
        }
        assert_eq!(
            x.len(),
            n * self.d_in,
            "step: x has {} values, expected n * d_in",
            x.len()
        );
        if n == 0 {
            return StepStats::default();
        }
        self.run_pursuit(x, n, mode)
    }

    /// The raw gradients of the loss on this batch, without changing any state.
    pub fn gradients(&mut self, x: &[f32], n: usize, sparsity_coeff: f32) -> (StepStats, Grads) {
        self.collect(x, None, n, sparsity_coeff)
    }

    /// `gradients` with each row's loss gradient (see `step_with_grad`).
    pub fn gradients_with_grad(
        &mut self,
        x: &[f32],
        grad: &[f32],
        n: usize,
        sparsity_coeff: f32,
    ) -> (StepStats, Grads) {
        self.collect(x, Some(grad), n, sparsity_coeff)
    }

    fn collect(
        &mut self,
        x: &[f32],
        grad: Option<&[f32]>,
        n: usize,
        sparsity_coeff: f32,
    ) -> (StepStats, Grads) {
        let mut g = Grads {
            w_enc_t: vec![0.0; self.d_sae * self.d_in],
            w_dec: vec![0.0; self.d_sae * self.d_in],
            b_dec: vec![0.0; self.d_in],
            params: self.params.iter().map(|p| vec![0.0; p.len()]).collect(),
        };
        let stats = self.dispatch(x, grad, n, sparsity_coeff, Mode::Collect(&mut g));
        (stats, g)
    }

    fn count_dead(&self) -> usize {
        let w = self.hyper.dead_window_tokens;
        self.tokens_since_fired.iter().filter(|&&t| t >= w).count()
    }
}

enum Mode<'g> {
    Apply(f32),
    Collect(&'g mut Grads),
}
