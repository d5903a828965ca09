//! BatchTopK SAE (Bussmann et al. 2024): keep the k*B largest `relu(pre + b_enc)` of the whole
//! batch, AuxK as TopK. At inference a single threshold (estimated during training by the
//! trainer, an EMA of each batch's selection threshold) gives JumpReLU behaviour.

use super::topk::{auxk_backward, auxk_train_opts, push_auxk, topk_lr, AuxKOpts, AUXK_OPTIONS};
use super::{
    batch_state, encode_jumprelu_row, kth_largest_positive, validate_threshold, Arch, ArchKind,
    AuxMode, BatchInput, BatchRef, BatchSlot, Entry, EntryGrad, Family, LatentParam, RowCode,
    RowOut, Sparsity, StepCtx, Stored, TopKScope, TrainOption, TrainOpts,
};
use crate::kernels::{entries_above, listed_entries_above, EntriesAbove};
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
        Box::new(BatchTopKRule::new(
            ArchKind::BATCHTOPK,
            sae,
            hyper,
            Vec::new(),
        ))
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

/// Rows of a batch per task of the threshold's pass.
const ROWS_PER_TASK: usize = 16;

/// BatchTopK's batch state: this batch's selection threshold, and the entries of each row
/// above the bound the threshold was found from (every entry the selection can keep), so
/// selection reads them instead of the whole `[n, d_sae]` batch again.
#[derive(Default)]
struct BatchThreshold {
    t: f32,
    /// Per task of `ROWS_PER_TASK` rows, in row order.
    parts: Vec<RowEntries>,
    /// Every part's sums, one slice for `kth_largest_positive`.
    all: Vec<f32>,
}

/// The entries above a bound of a few consecutive rows (latent, `pre + b_enc`, `pre`), row
/// by row, ascending in latent; `ends[r]` is where row r's end.
#[derive(Default)]
struct RowEntries {
    above: EntriesAbove,
    ends: Vec<usize>,
}

impl BatchThreshold {
    /// Row `b`'s entries above the bound: latents, sums and pre-activations.
    fn row(&self, b: usize) -> (&[u32], &[f32], &[f32]) {
        let part = &self.parts[b / ROWS_PER_TASK];
        let r = b % ROWS_PER_TASK;
        let start = if r == 0 { 0 } else { part.ends[r - 1] };
        let e = &part.above;
        let rows = start..part.ends[r];
        (&e.idx[rows.clone()], &e.sum[rows.clone()], &e.raw[rows])
    }
}

impl BatchTopKRule {
    /// Sets `state.t` to the (k*B)-th largest positive `pre + b_enc` of the batch, and keeps
    /// every entry above the bound it was found from (`state.parts`). The last batch's
    /// threshold (`state.t` on entry, 0 at first) is a hint that avoids collecting every
    /// positive value; the result does not depend on it.
    fn threshold(&self, batch: &BatchInput, state: &mut BatchThreshold) {
        let (d_sae, pre) = (batch.d_sae, batch.pre);
        let want = self.k * batch.n;
        let b_enc = &batch.params[0][..];
        let n_parts = batch.n.div_ceil(ROWS_PER_TASK);
        state.parts.resize_with(n_parts, RowEntries::default);
        // Every `pre + b_enc > lb`, by tasks of rows, without branches on the comparison (a
        // few percent pass, at random places).
        // A screened step lists every entry that can reach the threshold (the others are
        // bf16 values under a bound below it), so only those are read.
        let collect = |lb: f32, parts: &mut [RowEntries]| -> usize {
            pre.par_chunks(d_sae * ROWS_PER_TASK)
                .zip(parts.par_iter_mut())
                .enumerate()
                .map(|(t, (rows, part))| {
                    part.above.clear();
                    part.ends.clear();
                    for (r, row) in rows.chunks(d_sae).enumerate() {
                        match batch.screened {
                            Some(lists) => {
                                let (js, vals) = lists.row(t * ROWS_PER_TASK + r);
                                listed_entries_above(vals, b_enc, js, lb, &mut part.above)
                            }
                            None => entries_above(row, b_enc, lb, &mut part.above),
                        }
                        part.ends.push(part.above.len());
                    }
                    part.above.len()
                })
                .sum()
        };
        // The threshold moves little from batch to batch: most batches need only the values
        // above 0.8 of the last one (a few times `want`); lower bounds are the fallbacks.
        let previous = state.t;
        let bounds = [previous * 0.8, previous * 0.5, 0.0];
        let mut found = 0;
        for (i, &lb) in bounds.iter().enumerate() {
            if lb > 0.0 || i + 1 == bounds.len() {
                found = collect(lb, &mut state.parts);
                if found >= want {
                    break;
                }
            }
        }
        state.t = if found == 0 {
            f32::MIN_POSITIVE
        } else {
            state.all.clear();
            for part in &state.parts {
                state.all.extend_from_slice(&part.above.sum);
            }
            if found <= want {
                state.all.iter().cloned().fold(f32::INFINITY, f32::min)
            } else {
                kth_largest_positive(&state.all, want)
            }
        };
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
        Some(batch.get::<BatchThreshold>().t)
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

    /// A selected entry has a positive `pre + b_enc`; the threshold's pass reads only
    /// entries above a bound of at least 0, and selection only those at or above the
    /// threshold, so entries under a bound below the threshold are never read.
    fn screen_cutoff(&self, params: &[Vec<f32>], out: &mut Vec<f32>) -> bool {
        out.clear();
        out.extend(params[0].iter().map(|b| -b));
        true
    }

    fn screen_top_k(&self) -> Option<TopKScope> {
        Some(TopKScope::Batch(self.k))
    }

    /// This batch's threshold: entries `>=` it are kept (ties at the threshold may keep a
    /// few more).
    fn prepare_batch(&self, batch: &BatchInput, state: &mut BatchSlot) {
        self.threshold(batch, batch_state::<BatchThreshold>(state));
    }

    fn select_row(&self, ctx: &StepCtx, row: usize, pre: &[f32], out: &mut RowOut) {
        let state = ctx.batch.get::<BatchThreshold>();
        // Every entry at or above the threshold is among those above the bound it was
        // found from (the bound is below it).
        let (idx, sum, raw) = state.row(row);
        for ((&j, &a), &p) in idx.iter().zip(sum).zip(raw) {
            if a >= state.t && a > 0.0 {
                out.push(j as usize, a, 0.0, p);
            }
        }
        let mut scratch = std::mem::take(&mut out.scratch);
        push_auxk(self.k_aux, ctx, row, pre, &mut scratch, out);
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The threshold and the entries kept for selection, from every hint (none, one whose
    /// 0.8 bound lets fewer than k*n through, one whose bounds all do, a close one), against
    /// a sort of every positive `pre + b_enc`; rows not a multiple of the task's rows.
    #[test]
    fn threshold_and_kept_entries_match_a_sort_whatever_the_hint() {
        let (n, d_sae, k) = (37, 96, 5);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let pre: Vec<f32> = (0..n * d_sae)
            .map(|i| match i % 97 {
                0 => f32::NAN,
                _ => rng.gen_range(-1.0f32..1.0),
            })
            .collect();
        let params = vec![(0..d_sae)
            .map(|_| rng.gen_range(-0.2f32..0.2))
            .collect::<Vec<_>>()];
        let batch = BatchInput {
            n,
            d_in: 4,
            d_sae,
            params: &params,
            pre: &pre,
            w_dec: &[],
            screened: None,
        };
        let sum = |i: usize| pre[i] + params[0][i % d_sae];
        let mut positive: Vec<f32> = (0..n * d_sae).map(sum).filter(|a| *a > 0.0).collect();
        positive.sort_by(|a, b| b.total_cmp(a));
        let want_t = positive[k * n - 1];
        let rule = BatchTopKRule {
            kind: KIND,
            k,
            k_aux: 0,
            aux_coeff: 0.0,
            heads: Vec::new(),
        };
        for hint in [0.0, want_t * 1.6, 100.0, want_t * 1.01, want_t * 0.5] {
            let mut state = BatchThreshold {
                t: hint,
                ..Default::default()
            };
            rule.threshold(&batch, &mut state);
            assert_eq!(state.t.to_bits(), want_t.to_bits(), "hint {hint}");
            for b in 0..n {
                let (idx, sums, raw) = state.row(b);
                let kept: Vec<u32> = idx
                    .iter()
                    .zip(sums)
                    .filter(|(_, &a)| a >= state.t)
                    .map(|(&j, _)| j)
                    .collect();
                let want: Vec<u32> = (0..d_sae as u32)
                    .filter(|&j| sum(b * d_sae + j as usize) >= want_t)
                    .collect();
                assert_eq!(kept, want, "hint {hint}, row {b}");
                for ((&j, &a), &p) in idx.iter().zip(sums).zip(raw) {
                    let i = b * d_sae + j as usize;
                    assert_eq!(
                        (a.to_bits(), p.to_bits()),
                        (sum(i).to_bits(), pre[i].to_bits())
                    );
                }
            }
        }
    }
}
