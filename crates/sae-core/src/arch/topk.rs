//! TopK SAE (Gao et al. 2024): keep the k largest `pre + b_enc` of each row, ReLU on them,
//! plus AuxK: the top `k_aux` dead latents reconstruct the (detached) residual.

use super::{top_k_into, Arch, ArchKind, AuxMode, Entry, EntryGrad, RowOut, StepCtx};

pub struct TopK {
    pub k: usize,
    pub k_aux: usize,
}

impl Arch for TopK {
    fn kind(&self) -> ArchKind {
        ArchKind::TopK
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_enc"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::AuxK
    }

    fn select_row(&self, ctx: &StepCtx, pre: &[f32], out: &mut RowOut) {
        let b_enc = &ctx.params[0][..];
        let mut scratch = std::mem::take(&mut out.scratch);
        let cands = pre.iter().zip(b_enc).enumerate();
        top_k_into(
            self.k,
            cands.map(|(j, (&p, &b))| (p + b, j as u32)),
            &mut scratch,
        );
        for &(v, j) in &scratch {
            if v > 0.0 {
                out.push(j as usize, v, 0.0, pre[j as usize]);
            }
        }
        push_auxk(self.k_aux, ctx, pre, &mut scratch, out);
        out.scratch = scratch;
    }

    fn entry_backward(&self, _ctx: &StepCtx, e: Entry, df: f32, da: f32) -> EntryGrad {
        let Entry { f, a, .. } = e;
        auxk_backward(f, a, df, da)
    }
}

/// AuxK entries: the `k_aux` largest positive `pre + b_enc` among dead latents (f = 0, a = value).
pub(crate) fn push_auxk(
    k_aux: usize,
    ctx: &StepCtx,
    pre: &[f32],
    scratch: &mut Vec<(f32, u32)>,
    out: &mut RowOut,
) {
    if ctx.dead.is_empty() {
        return;
    }
    let b_enc = &ctx.params[0][..];
    let cands = ctx
        .dead
        .iter()
        .map(|&j| (pre[j as usize] + b_enc[j as usize], j));
    top_k_into(k_aux, cands, scratch);
    for &(v, j) in scratch.iter() {
        if v > 0.0 {
            out.push(j as usize, 0.0, v, pre[j as usize]);
        }
    }
}

/// Main entries carry f > 0, AuxK entries a > 0; ReLU passes the gradient of whichever is set.
pub(crate) fn auxk_backward(f: f32, a: f32, df: f32, da: f32) -> EntryGrad {
    let g = if f > 0.0 { df } else { 0.0 } + if a > 0.0 { da } else { 0.0 };
    EntryGrad {
        gpre: g,
        params: [g, 0.0, 0.0],
    }
}
