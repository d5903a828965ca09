//! The paper's baseline: `f = relu(pre + b_enc)`, L1 penalty, unit-norm decoder rows.
//! With `decoder_norm_l1` (Anthropic April 2024 update): penalty `sum_j f_j ||d_j||` and no
//! norm constraint.

use super::{
    batch_state, each_candidate, loosen, parse_train_opts, train_opts_from, train_opts_of, Arch,
    ArchKind, AuxMode, BatchInput, BatchRef, BatchSlot, Entry, EntryGrad, Family, LatentParam,
    OptValue, RowCode, RowOut, Sparsity, StepCtx, TrainOption, TrainOpts,
};
use crate::sae::Sae;
use crate::trainer::TrainHyper;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// The ReLU + L1 family (SAELens "standard").
pub struct Relu;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&Relu);

impl ArchKind {
    pub const RELU: ArchKind = KIND;
}

/// The ReLU + L1 training rule.
pub struct ReluRule {
    pub decoder_norm_l1: bool,
}

/// The decoder row norms of this step, `[d_sae]` (the weighted penalty's batch state).
#[derive(Default)]
struct DecoderNorms(Vec<f32>);

/// ReLU's training options.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ReluOpts {
    /// The April-update recipe: L1 weighted by the decoder row norms, no unit-norm constraint.
    pub decoder_norm_l1: bool,
}

const OPTIONS: &[TrainOption] = &[TrainOption {
    name: "decoder_norm_l1",
    value: OptValue::Flag,
    help: "true: Anthropic's April 2024 update, L1 weighted by the decoder row norms and no \
           unit-norm constraint; its L1 warms up over 5% of the steps (default false)",
}];

impl Family for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }
    fn about(&self) -> &'static str {
        "the Gated paper's baseline: ReLU + L1 with unit-norm decoder rows"
    }
    fn saelens_name(&self) -> &'static str {
        "standard"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &["standard"]
    }
    fn latent_params(&self) -> &'static [LatentParam] {
        &[LatentParam {
            name: "b_enc",
            init: 0.0,
        }]
    }
    fn sparsity(&self) -> Sparsity {
        Sparsity::Penalty { default: 2.0 }
    }
    fn default_lr(&self, _d_sae: usize) -> f32 {
        3e-4
    }
    /// The April-update recipe warms its L1 up over the first 5% of steps.
    fn default_sparsity_warmup(&self, steps: u64, hyper: &TrainHyper) -> u64 {
        if train_opts_of::<ReluOpts>(hyper).decoder_norm_l1 {
            steps / 20
        } else {
            0
        }
    }
    fn resamplable(&self) -> bool {
        true
    }
    fn train_options(&self) -> &'static [TrainOption] {
        OPTIONS
    }
    fn train_opts(
        &self,
        _d_sae: usize,
        opts: &BTreeMap<String, String>,
    ) -> Result<TrainOpts, String> {
        Ok(train_opts_from(&parse_train_opts::<ReluOpts>(
            OPTIONS, opts,
        )?))
    }
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        let b_enc = sae.param("b_enc");
        for (j, &p) in pre.iter().enumerate() {
            out.push(j, p + b_enc[j]);
        }
    }
    fn set_sparsity(&self, sae: &mut Sae, _l0: usize, cutoff: f32) {
        sae.param_mut("b_enc").fill(-cutoff);
    }
    fn rule(&self, _sae: &Sae, hyper: &TrainHyper) -> Box<dyn Arch> {
        Box::new(ReluRule {
            decoder_norm_l1: train_opts_of::<ReluOpts>(hyper).decoder_norm_l1,
        })
    }
}

impl Arch for ReluRule {
    fn kind(&self) -> ArchKind {
        ArchKind::RELU
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_enc"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::None
    }
    fn unit_norm_decoder(&self) -> bool {
        !self.decoder_norm_l1
    }

    /// The decoder row norms, with `decoder_norm_l1` only (the plain penalty reads none).
    fn prepare_batch(&self, batch: &BatchInput, state: &mut BatchSlot) {
        if !self.decoder_norm_l1 {
            return;
        }
        let (w_dec, d_in) = (batch.w_dec, batch.d_in);
        let norms = &mut batch_state::<DecoderNorms>(state).0;
        norms.clear();
        norms.resize(batch.d_sae, 0.0);
        norms.par_iter_mut().enumerate().for_each(|(j, nrm)| {
            let r = &w_dec[j * d_in..(j + 1) * d_in];
            *nrm = crate::kernels::dot(r, r).sqrt();
        });
    }

    fn select_row(&self, ctx: &StepCtx, row: usize, pre: &[f32], out: &mut RowOut) {
        let b_enc = &ctx.params[0][..];
        let dec_norm: &[f32] = if self.decoder_norm_l1 {
            &ctx.batch.get::<DecoderNorms>().0
        } else {
            &[]
        };
        let mut l1 = 0.0f64;
        each_candidate(ctx, row, pre, out, |out, j, p| {
            let pi = p + b_enc[j];
            if pi > 0.0 {
                out.push(j, pi, 0.0, p);
                let w = if self.decoder_norm_l1 {
                    dec_norm[j]
                } else {
                    1.0
                };
                l1 += (pi * w) as f64;
            }
        });
        out.sparsity += l1;
    }

    fn prefilter(&self, params: &[Vec<f32>], _batch: BatchRef, out: &mut Vec<f32>) -> bool {
        self.screen_cutoff(params, out)
    }
    fn screen_cutoff(&self, params: &[Vec<f32>], out: &mut Vec<f32>) -> bool {
        out.clear();
        out.extend(params[0].iter().map(|b| loosen(-b)));
        true
    }

    fn entry_backward(&self, ctx: &StepCtx, e: Entry, df: f32, _da: f32) -> EntryGrad {
        let Entry { j, .. } = e;
        let w = if self.decoder_norm_l1 {
            ctx.batch.get::<DecoderNorms>().0[j]
        } else {
            1.0
        };
        let g = df + ctx.sparsity_coeff * w / ctx.n as f32;
        EntryGrad {
            gpre: g,
            params: [g, 0.0, 0.0],
        }
    }

    /// d/d(d_j) of `lambda/B * sum_b f_bj ||d_j||` is `lambda/B * sum_b f_bj * d_j / ||d_j||`:
    /// returns the coefficient of `d_j / ||d_j||`.
    fn dec_row_extra(&self, ctx: &StepCtx, _j: usize, sum_f: f32) -> Option<f32> {
        self.decoder_norm_l1
            .then(|| ctx.sparsity_coeff * sum_f / ctx.n as f32)
    }
}
