//! Splicing a reconstruction into the model's forward pass at a hook.
//!
//! The activation at the hook is `[batch * ctx, width]`. Position 0 of every context is BOS;
//! it is left untouched in every condition (SAE, zero and mean ablation): its activation is
//! an outlier the SAE was not meant to model, and SAELens' evaluation excludes it too.

use anyhow::{bail, Result};
use sae_lm::LanguageModel;

/// Maps `n` rows `[n, width]` to their replacements `[n, width]`.
pub type Reconstruct<'a> = dyn FnMut(&[f32], usize) -> Result<Vec<f32>> + 'a;

/// Replace every non-BOS row of `acts` (`[batch * ctx, width]`) by `reconstruct` of it.
pub fn splice_non_bos(
    acts: &mut [f32],
    ctx: usize,
    width: usize,
    reconstruct: &mut Reconstruct<'_>,
) -> Result<()> {
    if width == 0 || !acts.len().is_multiple_of(ctx * width) {
        bail!(
            "splice: activation of {} values is not [batch * {ctx}, {width}]",
            acts.len()
        );
    }
    let rows = acts.len() / width;
    let kept: Vec<usize> = (0..rows).filter(|r| r % ctx != 0).collect();
    let mut x = Vec::with_capacity(kept.len() * width);
    for &r in &kept {
        x.extend_from_slice(&acts[r * width..(r + 1) * width]);
    }
    let x_hat = reconstruct(&x, kept.len())?;
    if x_hat.len() != x.len() {
        bail!(
            "splice: reconstruction has {} values, expected {}",
            x_hat.len(),
            x.len()
        );
    }
    for (i, &r) in kept.iter().enumerate() {
        acts[r * width..(r + 1) * width].copy_from_slice(&x_hat[i * width..(i + 1) * width]);
    }
    Ok(())
}

/// Per-token losses `[batch * (ctx - 1)]` with `reconstruct` spliced in at `hook` (BOS kept).
pub fn spliced_loss(
    model: &LanguageModel,
    tokens: &[u32],
    batch: usize,
    ctx: usize,
    hook: &str,
    width: usize,
    reconstruct: &mut Reconstruct<'_>,
) -> Result<Vec<f32>> {
    let mut f = |acts: &mut [f32]| splice_non_bos(acts, ctx, width, reconstruct);
    model.per_token_loss(tokens, batch, ctx, Some((hook, &mut f)))
}

/// Zero ablation: every non-BOS row becomes 0.
pub fn zero_rows(x: &[f32], _n: usize) -> Result<Vec<f32>> {
    Ok(vec![0.0; x.len()])
}

/// Mean ablation: every non-BOS row becomes `mean`.
pub fn mean_rows(mean: &[f32]) -> impl FnMut(&[f32], usize) -> Result<Vec<f32>> + '_ {
    move |_x, n| Ok(mean.repeat(n))
}
