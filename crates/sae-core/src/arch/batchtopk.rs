//! BatchTopK SAE (Bussmann et al. 2024): keep the k*B largest `relu(pre + b_enc)` of the whole
//! batch, AuxK as TopK. At inference a single threshold (estimated during training by the
//! trainer, an EMA of each batch's selection threshold) gives JumpReLU behaviour.

use super::topk::{auxk_backward, auxk_train_opts, push_auxk, topk_lr, AuxKOpts, AUXK_OPTIONS};
use super::{
    batch_state, candidates, encode_jumprelu_row, kth_largest_positive, loosen, validate_threshold, Arch, ArchKind,
    AuxMode, BatchInput, BatchRef, BatchSlot, Entry, EntryGrad, Family, LatentParam, RowCode,
    RowOut, Sparsity, StepCtx, Stored, TrainOption, TrainOpts,
};
use crate::kernels::sums_above;
use crate::sae::{Invalid, Sae};
use crate::sparse::SparseCode;
use crate::trainer::TrainHyper;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// The BatchTopK family; saved as SAELens saves it for inference, a `jumprelu` SAE whose
/// threshold is the estimated global threshold.
pub struct BatchTopK;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&BatchTopK);

impl ArchKind {
    pub const BATCHTOPK: ArchKind = KIND;
}

/// Parameters of a family trained by batch selection and run with a threshold.
pub(crate) const B_ENC_THRESHOLD: &[LatentParam] = &[
    LatentParam {
        name: "b_enc",
        init: 0.0,
    },
    LatentParam {
        name: "threshold",
        init: 0.0,
    },
];

/// Where a batch-selected family's threshold may be stored: ours, SAELens' log form, or a
/// SAELens BatchTopK training checkpoint's single `topk_threshold`.
pub(crate) fn threshold_stored_as(name: &'static str) -> Vec<(&'static str, Stored)> {
    match name {
        "threshold" => vec![
            ("threshold", Stored::AsIs),
            ("log_threshold", Stored::Log),
            ("topk_threshold", Stored::Broadcast),
        ],
        _ => vec![(name, Stored::AsIs)],
    }
}

impl Family for BatchTopK {
    fn name(&self) -> &'static str {
        "batchtopk"
    }
    fn about(&self) -> &'static str {
        "Bussmann et al. 2024: the k*B largest of the batch, a global threshold at inference"
    }
    fn saelens_name(&self) -> &'static str {
        "jumprelu"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &["batchtopk"]
    }
    fn latent_params(&self) -> &'static [LatentParam] {
        B_ENC_THRESHOLD
    }
    fn stored_as(&self, name: &'static str) -> Vec<(&'static str, Stored)> {
        threshold_stored_as(name)
    }
    fn sparsity(&self) -> Sparsity {
        Sparsity::K
    }
    fn default_lr(&self, d_sae: usize) -> f32 {
        topk_lr(d_sae)
    }
    fn reads_decoder_norm_rescale(&self) -> bool {
        true
    }
    fn train_options(&self) -> &'static [TrainOption] {
        AUXK_OPTIONS
    }
    fn train_opts(
        &self,
        d_sae: usize,
        opts: &BTreeMap<String, String>,
    ) -> Result<TrainOpts, String> {
        auxk_train_opts(d_sae, opts)
    }
    fn validate_params(&self, sae: &Sae) -> Result<(), Invalid> {
        validate_threshold(sae, "threshold")
    }
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        encode_jumprelu_row(sae, pre, out)
    }
    fn encode_batch(&self, sae: &Sae, x: &[f32], n: usize) -> Option<SparseCode> {
        Some(encode_batch_top_k(sae, x, n))
    }
    fn rule(&self, sae: &Sae, hyper: &TrainHyper) -> Box<dyn Arch> {
        Box::new(BatchTopKRule::new(ArchKind::BATCHTOPK, sae, hyper, Vec::new()))
    }
}

/// The BatchTopK training rule, with one reconstruction head or several nested ones.
pub struct BatchTopKRule {
    pub kind: ArchKind,
    pub k: usize,
    pub k_aux: usize,
    pub aux_coeff: f32,
    /// Prefix widths whose reconstructions the loss sums (empty: the whole dictionary).
    pub heads: Vec<usize>,
}

impl BatchTopKRule {
    /// The rule of `sae` for family `kind`, with the run's AuxK options.
    pub(crate) fn new(kind: ArchKind, sae: &Sae, hyper: &TrainHyper, heads: Vec<usize>) -> Self {
        let aux = AuxKOpts::of(hyper);
        BatchTopKRule {
            kind,
            k: sae.k(),
            k_aux: aux.k_aux(sae.d_in),
            aux_coeff: aux.aux_coeff,
            heads,
        }
    }
}

/// BatchTopK's batch state: this batch's selection threshold.
#[derive(Default)]
struct BatchThreshold(f32);

impl BatchTopKRule {
    /// The (k*B)-th largest positive `pre + b_enc` of the batch. `previous` (the last batch's
    /// value, 0 at first) is a hint that avoids collecting every positive value; the result
    /// does not depend on it.
    fn threshold(&self, batch: &BatchInput, previous: f32) -> f32 {
        let (d_sae, pre) = (batch.d_sae, batch.pre);
        let want = self.k * batch.n;
        let b_enc = &batch.params[0][..];
        // Every `pre + b_enc > lb`, per thread, without branches on the comparison (a few
        // percent pass, at random places).
        let collect = |lb: f32| -> Vec<f32> {
            pre.par_chunks(d_sae * 16)
                .fold(Vec::new, |mut v, rows| {
                    for row in rows.chunks(d_sae) {
                        sums_above(row, b_enc, lb, &mut v);
                    }
                    v
                })
                .reduce(Vec::new, |mut a, b| {
                    a.extend_from_slice(&b);
                    a
                })
        };
        // The threshold moves little from batch to batch: most batches need only the values
        // above 0.8 of the last one (a few times `want`); lower bounds are the fallbacks.
        let bounds = [previous * 0.8, previous * 0.5, 0.0];
        let mut vals = Vec::new();
        for (i, &lb) in bounds.iter().enumerate() {
            if lb > 0.0 || i + 1 == bounds.len() {
                vals = collect(lb);
                if vals.len() >= want {
                    break;
                }
            }
        }
        if vals.is_empty() {
            return f32::MIN_POSITIVE;
        }
        if vals.len() <= want {
            return vals.iter().cloned().fold(f32::INFINITY, f32::min);
        }
        kth_largest_positive(&vals, want)
    }
}

impl Arch for BatchTopKRule {
    fn kind(&self) -> ArchKind {
        self.kind
    }
    fn heads(&self) -> &[usize] {
        &self.heads
    }
    fn trained_params(&self, sae: &Sae) -> Vec<Vec<f32>> {
        vec![sae.param("b_enc").to_vec()]
    }
    fn saved_params(&self, trained: &[Vec<f32>], batch_threshold: f32) -> Vec<Vec<f32>> {
        vec![trained[0].clone(), vec![batch_threshold; trained[0].len()]]
    }
    fn batch_threshold(&self, batch: BatchRef) -> Option<f32> {
        Some(batch.get::<BatchThreshold>().0)
    }
    fn initial_batch_threshold(&self, sae: &Sae) -> f32 {
        sae.param("threshold").first().copied().unwrap_or(0.0)
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_enc"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::AuxK
    }
    fn aux_coeff(&self) -> f32 {
        self.aux_coeff
    }

    /// This batch's threshold: entries `>=` it are kept (ties at the threshold may keep a
    /// few more).
    fn prepare_batch(&self, batch: &BatchInput, state: &mut BatchSlot) {
        let threshold = &mut batch_state::<BatchThreshold>(state).0;
        *threshold = self.threshold(batch, *threshold);
    }

    fn prefilter(&self, params: &[Vec<f32>], batch: BatchRef, out: &mut Vec<f32>) -> bool {
        out.clear();
        let t = batch.get::<BatchThreshold>().0.max(0.0);
        out.extend(params[0].iter().map(|b| loosen(t - b)));
        true
    }

    fn select_row(&self, ctx: &StepCtx, pre: &[f32], out: &mut RowOut) {
        let b_enc = &ctx.params[0][..];
        let t = ctx.batch.get::<BatchThreshold>().0;
        let mut cands = std::mem::take(&mut out.cands);
        for &j in candidates(ctx, pre, &mut cands) {
            let (j, p, b) = (j as usize, pre[j as usize], b_enc[j as usize]);
            let a = p + b;
            if a >= t && a > 0.0 {
                out.push(j, a, 0.0, p);
            }
        }
        out.cands = cands;
        let mut scratch = std::mem::take(&mut out.scratch);
        push_auxk(self.k_aux, ctx, pre, &mut scratch, out);
        out.scratch = scratch;
    }

    fn entry_backward(&self, _ctx: &StepCtx, e: Entry, df: f32, da: f32) -> EntryGrad {
        let Entry { f, a, .. } = e;
        auxk_backward(f, a, df, da)
    }
}

/// Codes of `n` rows in BatchTopK's training form: the k*n largest positive `pre + b_enc`
/// of the whole batch (entries equal to the cut-off kept), as the reference evaluates it.
pub(crate) fn encode_batch_top_k(sae: &Sae, x: &[f32], n: usize) -> SparseCode {
    let d_sae = sae.d_sae;
    let mut pre = sae.pre_activations(x, n);
    pre.par_chunks_mut(d_sae.max(1)).for_each(|row| {
        row.iter_mut()
            .zip(sae.param("b_enc"))
            .for_each(|(p, b)| *p += b);
    });
    let positive: Vec<f32> = pre.par_iter().copied().filter(|&v| v > 0.0).collect();
    let want = sae.k() * n;
    let cutoff = if positive.len() > want && want > 0 {
        kth_largest_positive(&positive, want)
    } else if want == 0 {
        f32::INFINITY
    } else {
        f32::MIN_POSITIVE
    };
    let mut code = SparseCode {
        n_rows: n,
        d_sae,
        row_ptr: vec![0],
        idx: Vec::new(),
        val: Vec::new(),
    };
    for row in pre.chunks(d_sae.max(1)) {
        for (j, &v) in row.iter().enumerate() {
            if v > 0.0 && v >= cutoff {
                code.idx.push(j as u32);
                code.val.push(v);
            }
        }
        code.row_ptr.push(code.idx.len());
    }
    code
}
