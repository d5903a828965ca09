//! JumpReLU SAE (Rajamanoharan et al. 2024b): `f = pi * H(pi - theta)`, `pi = pre + b_enc`,
//! L0 penalty, straight-through estimators with a rectangle kernel of width `bandwidth` for the
//! threshold. theta is stored as `log_threshold` (positive by construction).

use super::{candidates, loosen, Arch, ArchKind, AuxMode, Entry, EntryGrad, RowOut, StepCtx};

pub struct JumpRelu {
    pub bandwidth: f32,
}

const B_ENC: usize = 0;
const LOG_THETA: usize = 1;

impl Arch for JumpRelu {
    fn kind(&self) -> ArchKind {
        ArchKind::JumpRelu
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_enc", "log_threshold"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::None
    }

    /// Emits active entries (pi > theta) and the inactive ones inside the kernel window
    /// (|pi - theta| < bandwidth / 2), which carry threshold gradient.
    fn select_row(&self, ctx: &StepCtx, pre: &[f32], out: &mut RowOut) {
        let (b_enc, log_theta) = (&ctx.params[B_ENC][..], &ctx.params[LOG_THETA][..]);
        let half = 0.5 * self.bandwidth;
        let mut l0 = 0u32;
        let mut cands = std::mem::take(&mut out.cands);
        for &j in candidates(ctx, pre, &mut cands) {
            let (j, p) = (j as usize, pre[j as usize]);
            let pi = p + b_enc[j];
            let theta = log_theta[j].exp();
            if pi > theta - half {
                let active = pi > theta;
                out.push(j, if active { pi } else { 0.0 }, 0.0, p);
                l0 += active as u32;
            }
        }
        out.sparsity += l0 as f64;
        out.cands = cands;
    }

    fn prefilter(&self, params: &[Vec<f32>], _batch_value: f32, out: &mut Vec<f32>) -> bool {
        out.clear();
        let half = 0.5 * self.bandwidth;
        let (b_enc, log_theta) = (&params[B_ENC], &params[LOG_THETA]);
        out.extend(
            b_enc
                .iter()
                .zip(log_theta)
                .map(|(b, lt)| loosen(lt.exp() - half - b)),
        );
        true
    }

    fn entry_backward(&self, ctx: &StepCtx, e: Entry, df: f32, _da: f32) -> EntryGrad {
        let Entry { j, pre, .. } = e;
        let pi = pre + ctx.params[B_ENC][j];
        let theta = ctx.params[LOG_THETA][j].exp();
        let eps = self.bandwidth;
        // The true gradient through z: H(pi - theta). The L0 term passes none to pi.
        let g_pi = if pi > theta { df } else { 0.0 };
        let u = (pi - theta) / eps;
        let kernel = if u > -0.5 && u < 0.5 { 1.0 } else { 0.0 };
        // eq 11 (JumpReLU wrt theta) and eq 12 (Heaviside wrt theta), times the L0 weight.
        let lambda = ctx.sparsity_coeff / ctx.n as f32;
        let g_theta = kernel * (-(theta / eps) * df - lambda / eps);
        EntryGrad {
            gpre: g_pi,
            params: [g_pi, g_theta * theta, 0.0],
        }
    }
}
