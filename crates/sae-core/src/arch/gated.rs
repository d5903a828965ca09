//! Gated SAE (Rajamanoharan et al. 2024), exactly as the paper:
//! `pi_gate = pre + b_gate`, `pi_mag = exp(r_mag) * pre + b_mag` from the SAME product `pre`,
//! `f = 1[pi_gate > 0] * relu(pi_mag)`, L1 on `relu(pi_gate)`, and the auxiliary reconstruction
//! of `relu(pi_gate)` through a stop-gradient copy of the decoder.

use super::{
    each_candidate, loosen, Arch, ArchKind, AuxMode, BatchRef, Entry, EntryGrad, Family,
    LatentParam, RowCode, RowOut, Sparsity, StepCtx,
};
use crate::sae::Sae;
use crate::trainer::TrainHyper;

/// The Gated family.
pub struct Gated;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&Gated);

impl ArchKind {
    pub const GATED: ArchKind = KIND;
}

/// The Gated training rule.
pub struct GatedRule;

const B_GATE: usize = 0;
const R_MAG: usize = 1;
const B_MAG: usize = 2;

impl Arch for GatedRule {
    fn kind(&self) -> ArchKind {
        ArchKind::GATED
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_gate", "r_mag", "b_mag"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::FrozenDecoder
    }

    fn select_row(&self, ctx: &StepCtx, row: usize, pre: &[f32], out: &mut RowOut) {
        let (b_gate, r_mag, b_mag) = (
            &ctx.params[B_GATE][..],
            &ctx.params[R_MAG][..],
            &ctx.params[B_MAG][..],
        );
        let mut l1 = 0.0f64;
        each_candidate(ctx, row, pre, out, |out, j, p| {
            let pi_gate = p + b_gate[j];
            if pi_gate > 0.0 {
                let pi_mag = r_mag[j].exp() * p + b_mag[j];
                out.push(j, pi_mag.max(0.0), pi_gate, p);
                l1 += pi_gate as f64;
            }
        });
        out.sparsity += l1;
    }

    fn prefilter(&self, params: &[Vec<f32>], _batch: BatchRef, out: &mut Vec<f32>) -> bool {
        self.screen_cutoff(params, out)
    }
    fn screen_cutoff(&self, params: &[Vec<f32>], out: &mut Vec<f32>) -> bool {
        out.clear();
        out.extend(params[B_GATE].iter().map(|b| loosen(-b)));
        true
    }

    fn entry_backward(&self, ctx: &StepCtx, e: Entry, df: f32, da: f32) -> EntryGrad {
        let Entry { j, pre, .. } = e;
        let scale = ctx.params[R_MAG][j].exp();
        let pi_mag = scale * pre + ctx.params[B_MAG][j];
        // Reconstruction reaches pi_mag only where relu(pi_mag) is positive; the Heaviside gate
        // passes no gradient to pi_gate.
        let g_mag = if pi_mag > 0.0 { df } else { 0.0 };
        // L1 on relu(pi_gate) and the frozen-decoder auxiliary reconstruction.
        let g_gate = da + ctx.sparsity_coeff / ctx.n as f32;
        EntryGrad {
            gpre: g_gate + scale * g_mag,
            params: [g_gate, g_mag * scale * pre, g_mag],
        }
    }
}

impl Family for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn about(&self) -> &'static str {
        "Rajamanoharan et al. 2024: gate and magnitude paths tied by r_mag, L1 on the gate"
    }
    fn saelens_name(&self) -> &'static str {
        "gated"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &["gated"]
    }
    /// W_mag = exp(r_mag) * W_gate starts equal to W_gate.
    fn latent_params(&self) -> &'static [LatentParam] {
        &[
            LatentParam {
                name: "b_gate",
                init: 0.0,
            },
            LatentParam {
                name: "r_mag",
                init: 0.0,
            },
            LatentParam {
                name: "b_mag",
                init: 0.0,
            },
        ]
    }
    /// Good on the synthetic acceptance set (inputs normalised); sweep on real data.
    fn sparsity(&self) -> Sparsity {
        Sparsity::Penalty { default: 5.0 }
    }
    fn default_lr(&self, _d_sae: usize) -> f32 {
        3e-4
    }
    fn resamplable(&self) -> bool {
        true
    }
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        let (b_gate, r_mag, b_mag) = (sae.param("b_gate"), sae.param("r_mag"), sae.param("b_mag"));
        for (j, &p) in pre.iter().enumerate() {
            if p + b_gate[j] > 0.0 {
                out.push(j, r_mag[j].exp() * p + b_mag[j]);
            }
        }
    }
    fn set_sparsity(&self, sae: &mut Sae, _l0: usize, cutoff: f32) {
        sae.param_mut("b_gate").fill(-cutoff);
    }
    fn rule(&self, _sae: &Sae, _hyper: &TrainHyper) -> Box<dyn Arch> {
        Box::new(GatedRule)
    }
}

impl Sae {
    /// A trained Gated SAE as the equivalent JumpReLU SAE (reference §1.2):
    /// W_enc <- W_mag = exp(r_mag) * W_gate, b_enc <- b_mag,
    /// threshold <- max(b_mag - exp(r_mag) * b_gate, 0).
    pub fn gated_to_jumprelu(&self) -> anyhow::Result<Sae> {
        if self.arch != ArchKind::GATED {
            anyhow::bail!(
                "only a gated SAE can be exported as JumpReLU (this one is {})",
                self.arch
            );
        }
        let (b_gate, r_mag, b_mag) = (
            self.param("b_gate"),
            self.param("r_mag"),
            self.param("b_mag"),
        );
        let scale: Vec<f32> = r_mag.iter().map(|r| r.exp()).collect();
        let mut w_enc = self.w_enc.clone();
        for row in w_enc.chunks_mut(self.d_sae) {
            row.iter_mut().zip(&scale).for_each(|(w, s)| *w *= s);
        }
        let threshold = (0..self.d_sae)
            .map(|j| (b_mag[j] - scale[j] * b_gate[j]).max(0.0))
            .collect();
        Ok(Sae {
            arch: ArchKind::JUMPRELU,
            w_enc,
            params: vec![b_mag.to_vec(), threshold],
            settings: Default::default(),
            ..self.clone()
        })
    }
}
