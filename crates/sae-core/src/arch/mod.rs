//! One module per SAE architecture behind one small trait.
//!
//! The trainer owns the shared pieces (the dense encoder product, sparse decode, the residuals,
//! the per-latent gradient pass and Adam). An [`Arch`] says only:
//! * how one row of encoder pre-activations becomes sparse entries (`select_row`): each entry
//!   carries `f` (its coefficient in the reconstruction) and `a` (its coefficient in the auxiliary
//!   reconstruction, 0 when unused), plus the raw pre-activation for the backward pass;
//! * how the loss gradients w.r.t. `f` and `a` of one entry become the gradient w.r.t. the
//!   pre-activation and w.r.t. its own per-latent parameters (`entry_backward`).
//!
//! Every entry whose pre-activation gradient can be non-zero must be emitted, so the gradient
//! w.r.t. the pre-activations is exactly sparse on the emitted entries.

use std::fmt;
use std::str::FromStr;

use crate::trainer::TrainHyper;

mod batchtopk;
mod gated;
mod jumprelu;
mod relu;
mod topk;

pub use batchtopk::BatchTopK;
pub use gated::Gated;
pub use jumprelu::JumpRelu;
pub use relu::Relu;
pub use topk::TopK;

/// The SAE families this toolkit trains. The string forms are the `--arch` values and
/// SAELens' `architecture` field where one exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchKind {
    /// Rajamanoharan et al. 2024: gate + magnitude paths tied by r_mag.
    Gated,
    /// The paper's baseline: ReLU + L1 with unit-norm decoder columns.
    Relu,
    /// Gao et al. 2024: TopK with the AuxK loss.
    TopK,
    /// Bussmann et al. 2024: top k*B over the batch, JumpReLU threshold at inference.
    BatchTopK,
    /// Rajamanoharan et al. 2024b: JumpReLU with STE and L0 penalty.
    JumpRelu,
}

impl ArchKind {
    pub const ALL: [ArchKind; 5] = [
        ArchKind::Gated,
        ArchKind::Relu,
        ArchKind::TopK,
        ArchKind::BatchTopK,
        ArchKind::JumpRelu,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ArchKind::Gated => "gated",
            ArchKind::Relu => "relu",
            ArchKind::TopK => "topk",
            ArchKind::BatchTopK => "batchtopk",
            ArchKind::JumpRelu => "jumprelu",
        }
    }
}

impl fmt::Display for ArchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ArchKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        ArchKind::ALL
            .into_iter()
            .find(|a| a.as_str() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown architecture '{s}': expected one of gated, relu, topk, batchtopk, jumprelu"
                )
            })
    }
}

/// How an architecture's auxiliary reconstruction (entries' `a` coefficients) enters the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuxMode {
    /// No auxiliary term.
    None,
    /// Gated: `||x - (sg(W_dec) a + sg(b_dec))||^2`, decoder frozen (stop-gradient copy).
    FrozenDecoder,
    /// TopK/BatchTopK AuxK: `coeff * sum_b ||e_b - W_dec a_b||^2 / sum_b ||e_b - mean(e)||^2`
    /// with `e = x - x_hat` detached; the decoder is trained by it.
    AuxK,
}

/// What every architecture may read during one step.
pub struct StepCtx<'a> {
    /// Tokens in the batch.
    pub n: usize,
    pub d_sae: usize,
    pub sparsity_coeff: f32,
    pub hyper: &'a TrainHyper,
    /// Per-latent parameters of the architecture, in `Arch::param_names` order.
    pub params: &'a [Vec<f32>],
    /// Decoder row norms (only filled for the decoder-norm-weighted L1 ReLU).
    pub dec_norm: &'a [f32],
    /// Latents dead at the start of this step (AuxK), ascending.
    pub dead: &'a [u32],
    /// BatchTopK: this batch's selection threshold (from `prepare_batch`).
    pub batch_threshold: f32,
    /// Per-latent lower bounds from `Arch::prefilter` (empty when the arch has none).
    pub cutoff: &'a [f32],
}

/// Entries of one row, appended by `select_row`.
#[derive(Default)]
pub struct RowOut {
    pub idx: Vec<u32>,
    pub f: Vec<f32>,
    pub a: Vec<f32>,
    pub pre: Vec<f32>,
    /// Unweighted sparsity penalty of the rows written so far (multiplied by lambda later).
    pub sparsity: f64,
    /// Scratch for selections.
    pub scratch: Vec<(f32, u32)>,
    /// Scratch: candidate latents of the current row.
    pub cands: Vec<u32>,
}

impl RowOut {
    #[inline]
    pub fn push(&mut self, j: usize, f: f32, a: f32, pre: f32) {
        self.idx.push(j as u32);
        self.f.push(f);
        self.a.push(a);
        self.pre.push(pre);
    }
    pub fn clear(&mut self) {
        self.idx.clear();
        self.f.clear();
        self.a.clear();
        self.pre.clear();
        self.sparsity = 0.0;
    }
}

/// One selected entry: latent `j`, its raw pre-activation and its two coefficients.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub j: usize,
    pub pre: f32,
    pub f: f32,
    pub a: f32,
}

/// Gradient of one entry: w.r.t. its pre-activation and up to three per-latent parameters.
#[derive(Clone, Copy, Debug, Default)]
pub struct EntryGrad {
    pub gpre: f32,
    pub params: [f32; 3],
}

/// One SAE architecture's forward selection and backward rule.
pub trait Arch: Send + Sync {
    fn kind(&self) -> ArchKind;
    /// Names of the per-latent parameters (SAELens tensor names where one exists).
    fn param_names(&self) -> &'static [&'static str];
    fn aux_mode(&self) -> AuxMode;
    /// Decoder rows kept at exactly unit norm (gradient projection + renormalisation).
    fn unit_norm_decoder(&self) -> bool {
        true
    }
    /// Batch-level work before `select_row` (BatchTopK: its threshold). Returns the threshold.
    fn prepare_batch(&self, _ctx: &StepCtx, _pre: &[f32]) -> f32 {
        0.0
    }
    /// Per-latent values `c_j` such that only latents with `pre_j > c_j` can be selected
    /// (a vectorised prefilter; `select_row` still applies its exact test). Returns false
    /// when the arch has no such bound. `batch_value` is what `prepare_batch` returned.
    fn prefilter(&self, _params: &[Vec<f32>], _batch_value: f32, _out: &mut Vec<f32>) -> bool {
        false
    }
    /// Training-time selection for one row of raw pre-activations `(x - b_dec) @ W_enc`.
    fn select_row(&self, ctx: &StepCtx, pre: &[f32], out: &mut RowOut);
    /// `df`, `da`: loss gradients w.r.t. the entry's `f` and `a` (batch mean included).
    fn entry_backward(&self, ctx: &StepCtx, e: Entry, df: f32, da: f32) -> EntryGrad;
    /// Extra decoder-row gradient given `sum_b f_bj` (decoder-norm-weighted L1 only).
    fn dec_row_extra(&self, _ctx: &StepCtx, _j: usize, _sum_f: f32) -> Option<f32> {
        None
    }
}

/// Lower a cutoff slightly so that float rounding in `pre + b > t` versus `pre > t - b`
/// can never drop a candidate.
pub(crate) fn loosen(c: f32) -> f32 {
    c - c.abs() * 1e-5 - 1e-30
}

/// Candidate latents of a row (all of them when there is no prefilter).
pub(crate) fn candidates<'o>(ctx: &StepCtx, pre: &[f32], cands: &'o mut Vec<u32>) -> &'o [u32] {
    cands.clear();
    if ctx.cutoff.is_empty() {
        cands.extend(0..pre.len() as u32);
    } else {
        crate::kernels::indices_above(pre, ctx.cutoff, cands);
    }
    cands
}

/// The architecture object for a trainer.
pub fn make_arch(kind: ArchKind, k: usize, hyper: &TrainHyper, d_in: usize) -> Box<dyn Arch> {
    let k_aux = if hyper.k_aux == 0 {
        d_in / 2
    } else {
        hyper.k_aux
    };
    match kind {
        ArchKind::Gated => Box::new(Gated),
        ArchKind::Relu => Box::new(Relu {
            decoder_norm_l1: hyper.relu_decoder_norm_l1,
        }),
        ArchKind::TopK => Box::new(TopK { k, k_aux }),
        ArchKind::BatchTopK => Box::new(BatchTopK { k, k_aux }),
        ArchKind::JumpRelu => Box::new(JumpRelu {
            bandwidth: hyper.jumprelu_bandwidth,
        }),
    }
}

/// Indices and values of the `k` largest `vals[i]` among `cands` (ties: lower index first).
/// `scratch` is reused. Result is sorted by index.
pub(crate) fn top_k_into(
    k: usize,
    cands: impl Iterator<Item = (f32, u32)>,
    scratch: &mut Vec<(f32, u32)>,
) {
    scratch.clear();
    if k == 0 {
        return;
    }
    // Keep the k best seen so far and the position of the worst of them.
    let mut worst = 0usize;
    for (v, i) in cands {
        if scratch.len() < k {
            scratch.push((v, i));
            if scratch.len() == k {
                worst = argmin(scratch);
            }
        } else if v > scratch[worst].0 {
            scratch[worst] = (v, i);
            worst = argmin(scratch);
        }
    }
    scratch.sort_unstable_by_key(|&(_, i)| i);
}

fn argmin(s: &[(f32, u32)]) -> usize {
    let mut best = 0;
    for (p, &(v, i)) in s.iter().enumerate() {
        let (bv, bi) = s[best];
        if v < bv || (v == bv && i > bi) {
            best = p;
        }
    }
    best
}
