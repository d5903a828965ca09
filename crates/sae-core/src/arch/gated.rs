//! Gated SAE (Rajamanoharan et al. 2024), exactly as the paper:
//! `pi_gate = pre + b_gate`, `pi_mag = exp(r_mag) * pre + b_mag` from the SAME product `pre`,
//! `f = 1[pi_gate > 0] * relu(pi_mag)`, L1 on `relu(pi_gate)`, and the auxiliary reconstruction
//! of `relu(pi_gate)` through a stop-gradient copy of the decoder.

use super::{candidates, loosen, Arch, ArchKind, AuxMode, Entry, EntryGrad, RowOut, StepCtx};

pub struct Gated;

const B_GATE: usize = 0;
const R_MAG: usize = 1;
const B_MAG: usize = 2;

impl Arch for Gated {
    fn kind(&self) -> ArchKind {
        ArchKind::Gated
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_gate", "r_mag", "b_mag"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::FrozenDecoder
    }

    fn select_row(&self, ctx: &StepCtx, pre: &[f32], out: &mut RowOut) {
        let (b_gate, r_mag, b_mag) = (
            &ctx.params[B_GATE][..],
            &ctx.params[R_MAG][..],
            &ctx.params[B_MAG][..],
        );
        let mut l1 = 0.0f64;
        let mut cands = std::mem::take(&mut out.cands);
        for &j in candidates(ctx, pre, &mut cands) {
            let (j, p) = (j as usize, pre[j as usize]);
            let pi_gate = p + b_gate[j];
            if pi_gate > 0.0 {
                let pi_mag = r_mag[j].exp() * p + b_mag[j];
                out.push(j, pi_mag.max(0.0), pi_gate, p);
                l1 += pi_gate as f64;
            }
        }
        out.sparsity += l1;
        out.cands = cands;
    }

    fn prefilter(&self, params: &[Vec<f32>], _batch_value: f32, out: &mut Vec<f32>) -> bool {
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
