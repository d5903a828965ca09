//! Llama-family forward pass (SmolLM2, Llama, Qwen2 style): RMSNorm, RoPE, grouped-query
//! attention, SiLU-gated MLP. Weights are f32, stored transposed (`[in, out]`) so every
//! projection is one `x.matmul(w)` over all batch rows at once.

use crate::hooks::{Hook, HookKind, HookMode};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub max_positions: usize,
    /// GGUF files store q/k rows permuted for llama.cpp's interleaved RoPE; HF files use the
    /// half-split rotation. Both give the same activations with the matching rotation.
    pub interleaved_rope: bool,
}

pub struct LlamaLayer {
    pub attn_norm: Tensor,
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub wo: Tensor,
    pub mlp_norm: Tensor,
    pub w_gate: Tensor,
    pub w_up: Tensor,
    pub w_down: Tensor,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    /// `[vocab, d_model]`.
    pub embed: Tensor,
    pub layers: Vec<LlamaLayer>,
    pub final_norm: Tensor,
    /// `[d_model, vocab]`.
    pub unembed: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    pub fn new(
        cfg: LlamaConfig,
        embed: Tensor,
        layers: Vec<LlamaLayer>,
        final_norm: Tensor,
        unembed: Tensor,
    ) -> Result<Self> {
        let half = cfg.d_head / 2;
        let n_pos = cfg.max_positions.max(1);
        let mut cos = Vec::with_capacity(n_pos * half);
        let mut sin = Vec::with_capacity(n_pos * half);
        for p in 0..n_pos {
            for i in 0..half {
                // Same f32 frequencies as the reference implementation.
                let inv_freq =
                    1.0f32 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.d_head as f32);
                let angle = p as f32 * inv_freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (n_pos, half), &Device::Cpu)?;
        let sin = Tensor::from_vec(sin, (n_pos, half), &Device::Cpu)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            final_norm,
            unembed,
            cos,
            sin,
        })
    }

    /// Runs the blocks over `tokens` (`[batch * ctx]`). With `HookMode::Capture` it returns
    /// the hook's activation as soon as it is computed; otherwise the final residual stream
    /// (after the last block, before the final norm), splicing at the hook if asked.
    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        ctx: usize,
        hook: Option<Hook>,
        mode: &mut HookMode<'_>,
    ) -> Result<Tensor> {
        if ctx > self.cfg.max_positions {
            bail!(
                "context length {ctx} exceeds the model's {} positions",
                self.cfg.max_positions
            );
        }
        let ids = Tensor::from_slice(tokens, tokens.len(), &Device::Cpu)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let cos = self.cos.narrow(0, 0, ctx)?;
        let sin = self.sin.narrow(0, 0, ctx)?;
        let mask = causal_mask(ctx)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let at = |kind: HookKind| hook.is_some_and(|h| h.layer == l && h.kind == kind);
            if at(HookKind::ResidPre) {
                match mode.apply(&x)? {
                    Some(t) => x = t,
                    None => return Ok(x),
                }
            }
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.rms_eps as f32)?;
            let mut z = self.attention(layer, &h, batch, ctx, &cos, &sin, &mask)?;
            if at(HookKind::AttnZ) {
                match mode.apply(&z)? {
                    Some(t) => z = t,
                    None => return Ok(z),
                }
            }
            let mut attn_out = z.matmul(&layer.wo)?;
            if at(HookKind::AttnOut) {
                match mode.apply(&attn_out)? {
                    Some(t) => attn_out = t,
                    None => return Ok(attn_out),
                }
            }
            x = (x + attn_out)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, self.cfg.rms_eps as f32)?;
            let act = (h.matmul(&layer.w_gate)?.silu()? * h.matmul(&layer.w_up)?)?;
            let mut mlp_out = act.matmul(&layer.w_down)?;
            if at(HookKind::MlpOut) {
                match mode.apply(&mlp_out)? {
                    Some(t) => mlp_out = t,
                    None => return Ok(mlp_out),
                }
            }
            x = (x + mlp_out)?;
            if at(HookKind::ResidPost) {
                match mode.apply(&x)? {
                    Some(t) => x = t,
                    None => return Ok(x),
                }
            }
        }
        Ok(x)
    }

    /// Attention up to the per-head outputs `z`: `[batch * ctx, n_heads * d_head]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &LlamaLayer,
        h: &Tensor,
        batch: usize,
        ctx: usize,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let proj = |w: &Tensor, b: &Option<Tensor>| -> Result<Tensor> {
            let y = h.matmul(w)?;
            Ok(match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        };
        // [batch, heads, ctx, d_head]
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.reshape((batch, ctx, heads, c.d_head))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(proj(&layer.wq, &layer.bq)?, c.n_heads)?;
        let k = split(proj(&layer.wk, &layer.bk)?, c.n_kv_heads)?;
        let v = split(proj(&layer.wv, &layer.bv)?, c.n_kv_heads)?;
        let (q, k) = if c.interleaved_rope {
            (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            )
        } else {
            (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            )
        };
        // Grouped-query attention without copying k/v: the query heads sharing one kv head are
        // consecutive, so view q as [batch, kv_heads, group * ctx, d_head].
        let group = c.n_heads / c.n_kv_heads;
        let q = (q * (1.0 / (c.d_head as f64).sqrt()))?.reshape((
            batch,
            c.n_kv_heads,
            group * ctx,
            c.d_head,
        ))?;
        let scores = q.matmul(&k.t()?)?; // [batch, kv, group * ctx, ctx]
        let scores = scores
            .reshape((batch, c.n_heads, ctx, ctx))?
            .broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let probs = probs.reshape((batch, c.n_kv_heads, group * ctx, ctx))?;
        let out = probs.matmul(&v)?; // [batch, kv, group * ctx, d_head]
        let out = out
            .reshape((batch, c.n_heads, ctx, c.d_head))?
            .transpose(1, 2)?;
        Ok(out.reshape((batch * ctx, c.n_heads * c.d_head))?)
    }

    /// Logits `[rows, vocab]` from final residuals `[rows, d_model]`.
    pub fn logits(&self, resid: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::rms_norm(resid, &self.final_norm, self.cfg.rms_eps as f32)?;
        Ok(h.matmul(&self.unembed)?)
    }

    pub fn direction_logits(&self, direction: &[f32]) -> Result<Vec<f32>> {
        if direction.len() != self.cfg.d_model {
            bail!(
                "direction has {} values, the model's residual width is {}",
                direction.len(),
                self.cfg.d_model
            );
        }
        let d = Tensor::from_slice(direction, (1, self.cfg.d_model), &Device::Cpu)?;
        let d = d.broadcast_mul(&self.final_norm)?;
        Ok(d.matmul(&self.unembed)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// `[ctx, ctx]` additive mask: 0 on and below the diagonal, -inf above.
pub(crate) fn causal_mask(ctx: usize) -> Result<Tensor> {
    let mut m = vec![0f32; ctx * ctx];
    for i in 0..ctx {
        for j in i + 1..ctx {
            m[i * ctx + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Tensor::from_vec(m, (ctx, ctx), &Device::Cpu)?.to_dtype(DType::F32)?)
}
