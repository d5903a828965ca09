//! GPT-2 forward pass: learned positions, pre-LayerNorm blocks with biases, fused qkv,
//! tanh-GELU MLP. Hugging Face stores GPT-2's projections as Conv1D, already `[in, out]`.

use crate::hooks::{Hook, HookKind, HookMode};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct Gpt2Config {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub eps: f64,
}

/// A weight and its bias; `x.matmul(w) + b`.
pub struct Linear {
    pub w: Tensor,
    pub b: Tensor,
}

impl Linear {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.w)?.broadcast_add(&self.b)?)
    }
}

pub struct Gpt2Layer {
    pub ln1: (Tensor, Tensor),
    pub qkv: Linear,
    pub out: Linear,
    pub ln2: (Tensor, Tensor),
    pub fc: Linear,
    pub proj: Linear,
}

pub struct Gpt2 {
    pub cfg: Gpt2Config,
    pub wte: Tensor,
    pub wpe: Tensor,
    pub layers: Vec<Gpt2Layer>,
    pub ln_f: (Tensor, Tensor),
    /// `[d_model, vocab]`.
    pub unembed: Tensor,
}

impl Gpt2 {
    /// `config` is the directory's config.json; `weights` its tensors (keys with or without
    /// the `transformer.` prefix).
    pub fn from_hf(
        dir: &Path,
        config: &serde_json::Value,
        mut weights: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let n = |key: &str| -> Result<usize> {
            config[key]
                .as_u64()
                .map(|v| v as usize)
                .with_context(|| format!("{}/config.json: '{key}' missing", dir.display()))
        };
        let act = config["activation_function"].as_str().unwrap_or("gelu_new");
        if !["gelu_new", "gelu_pytorch_tanh", "gelu_fast"].contains(&act) {
            bail!(
                "{}/config.json: activation_function '{act}' is not supported (gelu_new only)",
                dir.display()
            );
        }
        for flag in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
            if config[flag].as_bool() == Some(true) {
                bail!("{}/config.json: {flag} is not supported", dir.display());
            }
        }
        let d_model = n("n_embd")?;
        let mut take = |name: &str| -> Result<Tensor> {
            let t = weights
                .remove(&format!("transformer.{name}"))
                .or_else(|| weights.remove(name))
                .with_context(|| format!("{}: weight {name} missing", dir.display()))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let wte = take("wte.weight")?;
        let cfg = Gpt2Config {
            d_model,
            n_layers: n("n_layer")?,
            n_heads: n("n_head")?,
            vocab_size: wte.dim(0)?,
            max_positions: n("n_positions")?,
            eps: config["layer_norm_epsilon"].as_f64().unwrap_or(1e-5),
        };
        let wpe = take("wpe.weight")?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let mut t = |name: &str| take(&format!("h.{l}.{name}"));
            let mut lin = |name: &str| -> Result<Linear> {
                Ok(Linear {
                    w: t(&format!("{name}.weight"))?,
                    b: t(&format!("{name}.bias"))?,
                })
            };
            let ln1 = lin("ln_1")?;
            let qkv = lin("attn.c_attn")?;
            let out = lin("attn.c_proj")?;
            let ln2 = lin("ln_2")?;
            let fc = lin("mlp.c_fc")?;
            let proj = lin("mlp.c_proj")?;
            layers.push(Gpt2Layer {
                ln1: (ln1.w, ln1.b),
                qkv,
                out,
                ln2: (ln2.w, ln2.b),
                fc,
                proj,
            });
        }
        let ln_f = (take("ln_f.weight")?, take("ln_f.bias")?);
        let unembed = match take("lm_head.weight") {
            Ok(w) => w.t()?.contiguous()?,
            Err(_) => wte.t()?.contiguous()?, // tied (every released GPT-2)
        };
        // Old checkpoints keep the causal mask as buffers (h.N.attn.bias / masked_bias).
        let mut unused: Vec<String> = weights
            .into_keys()
            .filter(|k| !k.ends_with("attn.bias") && !k.ends_with("attn.masked_bias"))
            .collect();
        if !unused.is_empty() {
            unused.sort();
            bail!(
                "{}: weights not used by the GPT-2 forward pass ({}); this variant is not supported",
                dir.display(),
                unused.join(", ")
            );
        }
        Ok(Gpt2 {
            cfg,
            wte,
            wpe,
            layers,
            ln_f,
            unembed,
        })
    }

    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        ctx: usize,
        hooks: &[Hook],
        mode: &mut HookMode<'_>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        if ctx > c.max_positions {
            bail!(
                "context length {ctx} exceeds the model's {} positions",
                c.max_positions
            );
        }
        let ids = Tensor::from_slice(tokens, tokens.len(), &Device::Cpu)?;
        let pos = self.wpe.narrow(0, 0, ctx)?.repeat((batch, 1))?;
        let mut x = (self.wte.index_select(&ids, 0)? + pos)?;
        let mask = crate::llama::causal_mask(ctx)?;
        let d_head = c.d_model / c.n_heads;
        let eps = c.eps as f32;
        for (l, layer) in self.layers.iter().enumerate() {
            let at = |kind: HookKind| hooks.iter().any(|h| h.layer == l && h.kind == kind);
            macro_rules! hook_point {
                ($t:ident, $kind:expr) => {
                    if at($kind) {
                        match mode.apply(&$t)? {
                            Some(t) => $t = t,
                            None => return Ok($t),
                        }
                    }
                };
            }
            hook_point!(x, HookKind::ResidPre);
            let h = candle_nn::ops::layer_norm(&x, &layer.ln1.0, &layer.ln1.1, eps)?;
            let qkv = layer.qkv.apply(&h)?; // [rows, 3 * d_model]: q | k | v
            let heads = |i: usize| -> Result<Tensor> {
                Ok(qkv
                    .narrow(1, i * c.d_model, c.d_model)?
                    .reshape((batch, ctx, c.n_heads, d_head))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let q = (heads(0)? * (1.0 / (d_head as f64).sqrt()))?;
            let scores = q.matmul(&heads(1)?.t()?)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let mut z = probs
                .matmul(&heads(2)?)?
                .transpose(1, 2)?
                .reshape((batch * ctx, c.d_model))?;
            hook_point!(z, HookKind::AttnZ);
            let mut attn_out = layer.out.apply(&z)?;
            hook_point!(attn_out, HookKind::AttnOut);
            x = (x + attn_out)?;
            let h = candle_nn::ops::layer_norm(&x, &layer.ln2.0, &layer.ln2.1, eps)?;
            let mut mlp_out = layer.proj.apply(&layer.fc.apply(&h)?.gelu()?)?;
            hook_point!(mlp_out, HookKind::MlpOut);
            x = (x + mlp_out)?;
            hook_point!(x, HookKind::ResidPost);
        }
        Ok(x)
    }

    pub fn logits(&self, resid: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::layer_norm(resid, &self.ln_f.0, &self.ln_f.1, self.cfg.eps as f32)?;
        Ok(h.matmul(&self.unembed)?)
    }

    /// W_U through the final norm's scale (its centring and bias left out, as for a direction).
    pub fn direction_logits(&self, direction: &[f32]) -> Result<Vec<f32>> {
        let d = self.cfg.d_model;
        if direction.len() != d {
            bail!(
                "direction has {} values, the model's residual width is {d}",
                direction.len()
            );
        }
        let v = Tensor::from_slice(direction, (1, d), &Device::Cpu)?.broadcast_mul(&self.ln_f.0)?;
        Ok(v.matmul(&self.unembed)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
