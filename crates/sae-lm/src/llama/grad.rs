//! The gradient of the next-token loss with respect to the activation at a hook.
//!
//! The fast forward (`Llama::forward`) has no autograd, so the layers above the hook are run
//! a second time from candle ops that have a backward pass (RMSNorm, RoPE and softmax are
//! composed from basic ops: candle's fused versions have none). The LM head is done in row
//! chunks, each with its own small graph, so the `[rows, vocab]` logits never all sit in
//! memory; its gradient then seeds the blocks' backward through `sum(resid * G)`.
//!
//! The loss is the sum of the next-token cross-entropies of every predicted position
//! (position t predicts t+1, t < ctx - 1, BOS included, as `per_token_loss`): the mean over
//! the batch's `batch * (ctx - 1)` predictions times their number, so a row's gradient does
//! not depend on the batch size or on how many positions share its context.

use super::{causal_mask, Block, Llama};
use crate::hooks::{Hook, HookKind, HookMode};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};

/// Where in a block the upper forward starts: before its attention or before its MLP.
#[derive(Clone, Copy, PartialEq)]
enum Stage {
    Attn,
    Mlp,
}

/// The LM head's rows per autograd graph.
const HEAD_CHUNK: usize = 256;

fn tensor(v: &[f32], dims: (usize, usize)) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, dims, &Device::Cpu)?)
}

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension, from differentiable ops.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)? as f64;
    let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / d)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

/// Log-softmax over the last dimension; the shift by the maximum is a constant for autograd.
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

impl Llama {
    /// RoPE on `[batch, heads, ctx, d_head]` from differentiable ops, in the layout the
    /// fused kernel uses (interleaved pairs or split halves).
    fn rope_ops(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, h, t, dh) = x.dims4()?;
        let half = dh / 2;
        let rotate = |a: &Tensor, c: &Tensor| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = (cos.broadcast_as(a.shape())?, sin.broadcast_as(a.shape())?);
            Ok((((a * &cos)? - (c * &sin)?)?, ((a * &sin)? + (c * &cos)?)?))
        };
        if self.cfg.interleaved_rope {
            let pairs = x.reshape((b, h, t, half, 2))?;
            let a = pairs.narrow(4, 0, 1)?.squeeze(4)?;
            let c = pairs.narrow(4, 1, 1)?.squeeze(4)?;
            let (lo, hi) = rotate(&a, &c)?;
            Ok(Tensor::stack(&[lo, hi], 4)?.reshape((b, h, t, dh))?)
        } else {
            let a = x.narrow(3, 0, half)?;
            let c = x.narrow(3, half, half)?;
            let (lo, hi) = rotate(&a, &c)?;
            Ok(Tensor::cat(&[lo, hi], 3)?)
        }
    }

    /// Attention of block `b` on residuals `x` `[rows, d]`: `z` `[rows, n_heads * d_head]`.
    fn attention_ops(&self, b: &Block, x: &Tensor, batch: usize, ctx: usize) -> Result<Tensor> {
        let c = &self.cfg;
        let (d, dh, nh, nkv) = (c.d_model, c.d_head, c.n_heads, c.n_kv_heads);
        let qkv_width = (nh + 2 * nkv) * dh;
        let h = rms_norm(
            x,
            &Tensor::from_slice(&b.attn_norm, d, &Device::Cpu)?,
            c.rms_eps,
        )?;
        let mut qkv = h.matmul(&tensor(&b.w_qkv.values(), (d, qkv_width))?)?;
        if let Some(bias) = &b.b_qkv {
            qkv = qkv.broadcast_add(&Tensor::from_slice(bias, qkv_width, &Device::Cpu)?)?;
        }
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(1, start * dh, n * dh)?
                .reshape((batch, ctx, n, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let half = dh / 2;
        let cos = tensor(&self.cos[..ctx * half], (ctx, half))?;
        let sin = tensor(&self.sin[..ctx * half], (ctx, half))?;
        let q = self.rope_ops(&heads(0, nh)?, &cos, &sin)?;
        let k = self.rope_ops(&heads(nh, nkv)?, &cos, &sin)?;
        let v = heads(nh + nkv, nkv)?;
        // Query head j reads kv head j / group.
        let group = nh / nkv;
        let expand = |x: &Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((batch, nkv, group, ctx, dh))?
                .reshape((batch, nh, ctx, dh))?)
        };
        let (k, v) = (expand(&k)?, expand(&v)?);
        let scores =
            (q.matmul(&k.t()?)? / (dh as f64).sqrt())?.broadcast_add(&causal_mask(ctx)?)?;
        let probs = log_softmax(&scores)?.exp()?;
        Ok(probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch * ctx, nh * dh))?)
    }

    /// The blocks from (`layer`, `stage`) to the end on residuals `x` `[rows, d]`: the final
    /// residual stream (before the final norm), from differentiable ops.
    fn upper_ops(
        &self,
        x: &Tensor,
        layer: usize,
        stage: Stage,
        batch: usize,
        ctx: usize,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (d, dm, zw) = (c.d_model, c.d_mlp, c.n_heads * c.d_head);
        let mut x = x.clone();
        for (l, b) in self.blocks.iter().enumerate().skip(layer) {
            if l > layer || stage == Stage::Attn {
                let z = self.attention_ops(b, &x, batch, ctx)?;
                x = (x + z.matmul(&tensor(&b.wo.values(), (zw, d))?)?)?;
            }
            let h = rms_norm(
                &x,
                &Tensor::from_slice(&b.mlp_norm, d, &Device::Cpu)?,
                c.rms_eps,
            )?;
            let gate_up = h.matmul(&tensor(&b.w_gate_up.values(), (d, 2 * dm))?)?;
            let act = (gate_up.narrow(1, 0, dm)?.silu()? * gate_up.narrow(1, dm, dm)?)?;
            x = (x + act.matmul(&tensor(&b.w_down.values(), (dm, d))?)?)?;
        }
        Ok(x)
    }

    /// The summed next-token loss of final residuals `[rows, d]` and its gradient with
    /// respect to them, `HEAD_CHUNK` rows per graph.
    fn head_loss_grad(&self, resid: &[f32], tokens: &[u32], ctx: usize) -> Result<(f64, Vec<f32>)> {
        let d = self.cfg.d_model;
        let rows = tokens.len();
        let mut grad = Vec::with_capacity(rows * d);
        let mut loss = 0f64;
        for start in (0..rows).step_by(HEAD_CHUNK) {
            let n = HEAD_CHUNK.min(rows - start);
            let r = Var::from_tensor(&tensor(&resid[start * d..(start + n) * d], (n, d))?)?;
            let logp = log_softmax(
                &rms_norm(r.as_tensor(), &self.final_norm, self.cfg.rms_eps)?
                    .matmul(&self.unembed)?,
            )?;
            // The last position of a context predicts nothing: weight 0, any target.
            let (targets, weights): (Vec<u32>, Vec<f32>) = (start..start + n)
                .map(|row| match row % ctx + 1 < ctx {
                    true => (tokens[row + 1], 1.0),
                    false => (0, 0.0),
                })
                .unzip();
            let targets = Tensor::from_vec(targets, (n, 1), &Device::Cpu)?;
            let weights = Tensor::from_vec(weights, (n, 1), &Device::Cpu)?;
            let chunk_loss = (logp.gather(&targets, 1)? * weights)?.sum_all()?.neg()?;
            loss += chunk_loss.to_scalar::<f32>()? as f64;
            let g = chunk_loss.backward()?;
            let g = g.get(r.as_tensor()).context("LM head gradient")?;
            grad.extend(g.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((loss, grad))
    }

    /// The activation at `hook` `[batch * ctx, width]`, the gradient of the summed
    /// next-token loss (see the module) with respect to it, same shape, and the loss.
    pub fn activation_and_loss_grad(
        &self,
        tokens: &[u32],
        batch: usize,
        ctx: usize,
        hook: Hook,
    ) -> Result<(Vec<f32>, Vec<f32>, f64)> {
        let c = &self.cfg;
        let (l, d) = (hook.layer, c.d_model);
        if l >= c.n_layers {
            bail!(
                "hook {} is past the model's {} layers",
                hook.name(),
                c.n_layers
            );
        }
        // The hooks to record, in forward order, and where the residual stream they give
        // enters the layers above.
        let at = |kind| Hook { layer: l, kind };
        let (record, start): (Vec<Hook>, (usize, Stage)) = match hook.kind {
            HookKind::ResidPre => (vec![hook], (l, Stage::Attn)),
            HookKind::ResidPost => (vec![hook], (l + 1, Stage::Attn)),
            HookKind::MlpOut => (vec![hook, at(HookKind::ResidPost)], (l + 1, Stage::Attn)),
            HookKind::AttnOut => (vec![at(HookKind::ResidPre), hook], (l, Stage::Mlp)),
            HookKind::AttnZ => (
                vec![at(HookKind::ResidPre), hook, at(HookKind::AttnOut)],
                (l, Stage::Mlp),
            ),
        };
        let mut rows = Vec::with_capacity(record.len());
        let mut mode = HookMode::Record {
            rows: &mut rows,
            remaining: record.len(),
            recorded: 0,
        };
        self.forward(tokens, batch, ctx, &record, &mut mode)?;
        if rows.len() != record.len() {
            bail!(
                "the forward pass reached {} of {} hooks",
                rows.len(),
                record.len()
            );
        }
        let (act, resid) = match hook.kind {
            HookKind::ResidPre | HookKind::ResidPost => (rows[0].clone(), rows.swap_remove(0)),
            HookKind::MlpOut => (rows[0].clone(), rows.swap_remove(1)),
            HookKind::AttnOut | HookKind::AttnZ => {
                let out = rows.pop().unwrap_or_default();
                let mid: Vec<f32> = rows[0].iter().zip(&out).map(|(a, b)| a + b).collect();
                let act = if hook.kind == HookKind::AttnZ {
                    rows.swap_remove(1)
                } else {
                    out
                };
                (act, mid)
            }
        };
        let n = batch * ctx;
        let x = Var::from_tensor(&tensor(&resid, (n, d))?)?;
        let top = self.upper_ops(x.as_tensor(), start.0, start.1, batch, ctx)?;
        let top_values = top.flatten_all()?.to_vec1::<f32>()?;
        let (loss, head_grad) = self.head_loss_grad(&top_values, tokens, ctx)?;
        // d/dx of sum(top * G) with G fixed is the chain rule through the blocks.
        let seed = (top * tensor(&head_grad, (n, d))?)?.sum_all()?;
        let grads = seed.backward()?;
        let g = grads
            .get(x.as_tensor())
            .context("no gradient reached the hooked activation")?
            .to_dtype(DType::F32)?;
        let grad = if hook.kind == HookKind::AttnZ {
            // out = z W_o, so dL/dz = dL/dout W_o^T.
            let zw = c.n_heads * c.d_head;
            let wo = tensor(&self.blocks[l].wo.values(), (zw, d))?;
            g.matmul(&wo.t()?)?.flatten_all()?.to_vec1::<f32>()?
        } else {
            g.flatten_all()?.to_vec1::<f32>()?
        };
        Ok((act, grad, loss))
    }
}
