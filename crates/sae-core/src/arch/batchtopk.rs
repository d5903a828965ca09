//! BatchTopK SAE (Bussmann et al. 2024): keep the k*B largest `relu(pre + b_enc)` of the whole
//! batch, AuxK as TopK. At inference a single threshold (estimated during training by the
//! trainer, an EMA of each batch's selection threshold) gives JumpReLU behaviour.

use super::topk::{auxk_backward, push_auxk};
use super::{candidates, loosen, Arch, ArchKind, AuxMode, Entry, EntryGrad, RowOut, StepCtx};
use rayon::prelude::*;

pub struct BatchTopK {
    pub k: usize,
    pub k_aux: usize,
}

impl Arch for BatchTopK {
    fn kind(&self) -> ArchKind {
        ArchKind::BatchTopK
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_enc"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::AuxK
    }

    /// The (k*B)-th largest positive `pre + b_enc` of the batch; entries `>=` it are kept
    /// (ties at the threshold may keep a few more). `ctx.batch_threshold` holds the previous
    /// batch's value and serves as a hint to avoid collecting every positive value.
    fn prepare_batch(&self, ctx: &StepCtx, pre: &[f32]) -> f32 {
        let d_sae = ctx.d_sae;
        let want = self.k * ctx.n;
        let b_enc = &ctx.params[0][..];
        let collect = |lb: f32| -> Vec<f32> {
            let parts: Vec<Vec<f32>> = pre
                .par_chunks(d_sae * 16)
                .map(|rows| {
                    let mut v = Vec::new();
                    for row in rows.chunks(d_sae) {
                        for (&p, &b) in row.iter().zip(b_enc) {
                            let a = p + b;
                            if a > lb {
                                v.push(a);
                            }
                        }
                    }
                    v
                })
                .collect();
            parts.concat()
        };
        let hint = ctx.batch_threshold * 0.5;
        let mut vals = if hint > 0.0 {
            collect(hint)
        } else {
            Vec::new()
        };
        if vals.len() < want {
            vals = collect(0.0);
        }
        if vals.is_empty() {
            return f32::MIN_POSITIVE;
        }
        if vals.len() <= want {
            return vals.iter().cloned().fold(f32::INFINITY, f32::min);
        }
        let (_, kth, _) = vals.select_nth_unstable_by(want - 1, |a, b| b.total_cmp(a));
        *kth
    }

    fn prefilter(&self, params: &[Vec<f32>], batch_value: f32, out: &mut Vec<f32>) -> bool {
        out.clear();
        let t = batch_value.max(0.0);
        out.extend(params[0].iter().map(|b| loosen(t - b)));
        true
    }

    fn select_row(&self, ctx: &StepCtx, pre: &[f32], out: &mut RowOut) {
        let b_enc = &ctx.params[0][..];
        let t = ctx.batch_threshold;
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
