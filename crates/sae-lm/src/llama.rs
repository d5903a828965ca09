//! Llama-family forward pass (SmolLM2, Llama, Qwen2 style): RMSNorm, RoPE, grouped-query
//! attention, SiLU-gated MLP, in f32 on the CPU. Weights are stored transposed (`[in, out]`)
//! and fused at load (q|k|v into one matrix, gate|up into another), so a block is four
//! products over all rows of the batch; every buffer is allocated once per forward pass.

use crate::bf16::PackedBf16;
use crate::hooks::{Hook, HookKind, HookMode};
use crate::kernels;
use crate::model::ProductPrecision;
use crate::swiglu_bf16;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use sae_core::aligned::AlignedVec;
use sae_core::f32_product::{self, PackedF32};
use std::sync::Mutex;

mod grad;

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

/// One block's weights as loaded, projections transposed to `[in, out]`.
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

/// A block's weights as the forward pass reads them: f32, fused, the four product weights
/// laid out for this CPU's fastest f32 product.
struct Block {
    attn_norm: Vec<f32>,
    /// `[d_model, (n_heads + 2 * n_kv_heads) * d_head]`: columns q | k | v.
    w_qkv: PackedF32,
    /// q | k | v biases (Qwen2), same column order.
    b_qkv: Option<Vec<f32>>,
    /// `[n_heads * d_head, d_model]`.
    wo: PackedF32,
    mlp_norm: Vec<f32>,
    /// `[d_model, 2 * d_mlp]`: columns gate | up.
    w_gate_up: PackedF32,
    /// `[d_mlp, d_model]`.
    w_down: PackedF32,
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A `[k, n]` weight, laid out for this CPU's f32 product.
fn packed(t: &Tensor) -> Result<PackedF32> {
    let (k, n) = t.dims2()?;
    Ok(PackedF32::pack(&values(t)?, k, n))
}

impl Block {
    fn fuse(layer: LlamaLayer, cfg: &LlamaConfig) -> Result<Self> {
        let (d, dh) = (cfg.d_model, cfg.d_head);
        let expect = |t: &Tensor, dims: (usize, usize), what: &str| -> Result<()> {
            if t.dims2()? != dims {
                bail!("{what} has shape {:?}, expected {dims:?}", t.dims());
            }
            Ok(())
        };
        expect(&layer.wq, (d, cfg.n_heads * dh), "q projection")?;
        expect(&layer.wk, (d, cfg.n_kv_heads * dh), "k projection")?;
        expect(&layer.wv, (d, cfg.n_kv_heads * dh), "v projection")?;
        expect(&layer.wo, (cfg.n_heads * dh, d), "output projection")?;
        expect(&layer.w_gate, (d, cfg.d_mlp), "gate projection")?;
        expect(&layer.w_up, (d, cfg.d_mlp), "up projection")?;
        expect(&layer.w_down, (cfg.d_mlp, d), "down projection")?;
        let w_qkv = Tensor::cat(&[&layer.wq, &layer.wk, &layer.wv], 1)?;
        let b_qkv = match (&layer.bq, &layer.bk, &layer.bv) {
            (Some(q), Some(k), Some(v)) => Some(values(&Tensor::cat(&[q, k, v], 0)?)?),
            (None, None, None) => None,
            _ => bail!("q, k and v biases must be all present or all absent"),
        };
        Ok(Self {
            attn_norm: values(&layer.attn_norm)?,
            w_qkv: packed(&w_qkv)?,
            b_qkv,
            wo: packed(&layer.wo)?,
            mlp_norm: values(&layer.mlp_norm)?,
            w_gate_up: packed(&Tensor::cat(&[&layer.w_gate, &layer.w_up], 1)?)?,
            w_down: packed(&layer.w_down)?,
        })
    }
}

pub struct Llama {
    pub cfg: LlamaConfig,
    /// `[vocab, d_model]`.
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    /// `[d_model, vocab]`.
    unembed: Tensor,
    /// `[positions, d_head / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// How the blocks' weight products run, with their weights in that form.
    products: Products,
    /// Kept between passes: fresh buffers this size cost a page fault per 4 KiB. Boxed so
    /// `Net`'s variants stay of similar size.
    buffers: Box<Mutex<Buffers>>,
}

/// A forward pass's rows.
#[derive(Default)]
struct Buffers {
    /// The residual stream.
    x: Vec<f32>,
    /// Normalised residual stream.
    h: Vec<f32>,
    /// Aligned, as the products' outputs (see `sae_core::aligned`).
    qkv: AlignedVec<f32>,
    z: Vec<f32>,
    gate_up: Vec<f32>,
    /// A block output (attention or MLP) before it is added to the residual stream.
    out: AlignedVec<f32>,
    /// Activations rounded to bf16.
    scratch: AlignedVec<u32>,
    /// The bf16 MLP's gated rows, rounded (the down product's input).
    gated: AlignedVec<u32>,
}

/// The gate and up halves of a block's fused `[d_model, 2 * d_mlp]` weight, each
/// `[d_model, d_mlp]`.
fn gate_and_up(b: &Block, d_mlp: usize) -> [Vec<f32>; 2] {
    let gate_up = b.w_gate_up.values();
    [0, 1].map(|second| {
        gate_up
            .chunks_exact(2 * d_mlp)
            .flat_map(|row| &row[second * d_mlp..][..d_mlp])
            .copied()
            .collect()
    })
}

/// How the blocks' four weight products run.
enum Products {
    /// `Block`'s f32 weights.
    F32,
    /// In bf16, the weights packed one bf16 term each, or three (`split`, bf16x3).
    Bf16 { blocks: Vec<Bf16Block>, split: bool },
}

/// A block's four products' weights in bf16, packed (same matrices as `Block`): rounded
/// (`PackedBf16::pack`) or split into three terms (`PackedBf16::pack_split`).
struct Bf16Block {
    w_qkv: PackedBf16,
    wo: PackedBf16,
    /// Gate and up apart, so a panel of each covers the same columns (`swiglu_pairs`).
    w_gate: PackedBf16,
    w_up: PackedBf16,
    w_down: PackedBf16,
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
        if cfg.n_kv_heads == 0
            || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads)
            || !cfg.d_head.is_multiple_of(2)
        {
            bail!(
                "unsupported attention shape: {} heads, {} kv heads, head width {}",
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.d_head
            );
        }
        let blocks = layers
            .into_iter()
            .enumerate()
            .map(|(l, layer)| Block::fuse(layer, &cfg).map_err(|e| e.context(format!("layer {l}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            // `embed_into` reads it as one f32 slice.
            embed: embed.to_dtype(DType::F32)?.contiguous()?,
            blocks,
            final_norm,
            unembed,
            cos,
            sin,
            products: Products::F32,
            buffers: Box::default(),
        })
    }

    /// How the four weight products of every block run (`ProductPrecision`); weights are
    /// rounded or split once, here, activations per product, sums in f32. Attention, norms
    /// and the residual stream stay f32 every way.
    pub fn set_products(&mut self, precision: ProductPrecision) -> Result<()> {
        if precision != ProductPrecision::F32 && !crate::bf16::available() {
            bail!(
                "{precision} products need a CPU with AVX512-BF16, which this one lacks; \
                 compute in f32"
            );
        }
        let c = &self.cfg;
        let (d, qkv, z) = (
            c.d_model,
            (c.n_heads + 2 * c.n_kv_heads) * c.d_head,
            c.n_heads * c.d_head,
        );
        let split = match precision {
            ProductPrecision::F32 => {
                self.products = Products::F32;
                return Ok(());
            }
            ProductPrecision::Bf16 => false,
            ProductPrecision::Bf16x3 => true,
        };
        let pack = match split {
            true => PackedBf16::pack_split,
            false => PackedBf16::pack,
        };
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                let [gate, up] = gate_and_up(b, c.d_mlp);
                Bf16Block {
                    w_qkv: pack(&b.w_qkv.values(), d, qkv),
                    wo: pack(&b.wo.values(), z, d),
                    w_gate: pack(&gate, d, c.d_mlp),
                    w_up: pack(&up, d, c.d_mlp),
                    w_down: pack(&b.w_down.values(), c.d_mlp, d),
                }
            })
            .collect();
        self.products = Products::Bf16 { blocks, split };
        Ok(())
    }

    /// Block `l`'s attention input: RMSNorm of the residual stream `x`, then q|k|v into `qkv`
    /// (added onto what is there when `accumulate`, the biases). In bf16 (bf16x3) the norm
    /// writes rounded (split) rows straight away, the product's operand.
    #[allow(clippy::too_many_arguments)]
    fn qkv(
        &self,
        l: usize,
        rows: usize,
        x: &[f32],
        h: &mut [f32],
        qkv: &mut [f32],
        accumulate: bool,
        s: &mut AlignedVec<u32>,
    ) {
        let (b, c) = (&self.blocks[l], &self.cfg);
        let width = (c.n_heads + 2 * c.n_kv_heads) * c.d_head;
        let eps = c.rms_eps as f32;
        match &self.products {
            Products::Bf16 { blocks, split } => {
                kernels::rms_norm_pairs(x, &b.attn_norm, eps, *split, s);
                crate::bf16::matmul_pairs(rows, s, &blocks[l].w_qkv, qkv, width, accumulate);
            }
            Products::F32 => {
                kernels::rms_norm(x, &b.attn_norm, eps, h);
                f32_product::matmul(rows, h, c.d_model, &b.w_qkv, qkv, width, accumulate);
            }
        }
    }

    /// Block `l`'s attention output: the heads `z` times W_O into `out`.
    fn attn_out(&self, l: usize, rows: usize, z: &[f32], out: &mut [f32], s: &mut AlignedVec<u32>) {
        let c = &self.cfg;
        let (z_width, d) = (c.n_heads * c.d_head, c.d_model);
        match &self.products {
            // A split matrix splits the rows it multiplies.
            Products::Bf16 { blocks, .. } => {
                crate::bf16::matmul(rows, z, z_width, &blocks[l].wo, out, d, false, s)
            }
            Products::F32 => {
                f32_product::matmul(rows, z, z_width, &self.blocks[l].wo, out, d, false)
            }
        }
    }

    /// Block `l`'s MLP on the residual stream `x` into `out`: RMSNorm, gate|up, SiLU gating,
    /// down. In bf16 (bf16x3) the norm writes rounded (split) rows and the gating is fused
    /// into the gate and up products (`swiglu_pairs`), whose rounded (split) output the down
    /// product reads.
    #[allow(clippy::too_many_arguments)]
    fn mlp(
        &self,
        l: usize,
        rows: usize,
        x: &[f32],
        h: &mut [f32],
        out: &mut [f32],
        gate_up: &mut Vec<f32>,
        gated: &mut AlignedVec<u32>,
        s: &mut AlignedVec<u32>,
    ) {
        let (b, c) = (&self.blocks[l], &self.cfg);
        let (d, dm, eps) = (c.d_model, c.d_mlp, c.rms_eps as f32);
        let (bb, split) = match &self.products {
            Products::Bf16 { blocks, split } => (&blocks[l], *split),
            Products::F32 => {
                kernels::rms_norm(x, &b.mlp_norm, eps, h);
                // Every element is written before it is read, so old contents do not matter.
                gate_up.resize(rows * 2 * dm, 0.0);
                f32_product::matmul(rows, h, d, &b.w_gate_up, gate_up, 2 * dm, false);
                kernels::silu_gate_in_place(gate_up, dm);
                // The down projection reads the gated half of each row in place.
                f32_product::matmul(rows, gate_up, 2 * dm, &b.w_down, out, d, false);
                return;
            }
        };
        kernels::rms_norm_pairs(x, &b.mlp_norm, eps, split, s);
        swiglu_bf16::swiglu_pairs(rows, s, &bb.w_gate, &bb.w_up, split, gated);
        crate::bf16::matmul_pairs(rows, gated, &bb.w_down, out, d, false);
    }

    /// Runs the blocks over `tokens` (`[batch * ctx]`). With `HookMode::Capture` it returns
    /// the hook's activation as soon as it is computed (`HookMode::Record`: copies each
    /// hook's into the mode's rows, stops after the last and returns an empty tensor);
    /// otherwise the final residual stream (after the last block, before the final norm),
    /// splicing at the hooks if asked.
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
        let rows = batch * ctx;
        let (d, dh) = (c.d_model, c.d_head);
        let qkv_width = (c.n_heads + 2 * c.n_kv_heads) * dh;
        let z_width = c.n_heads * dh;
        // The buffers of the last pass, unless another thread is running one now.
        let mut kept = self.buffers.try_lock().ok();
        let mut fresh = Buffers::default();
        let Buffers {
            x,
            h,
            qkv,
            z,
            gate_up,
            out,
            scratch,
            gated,
        } = kept.as_deref_mut().unwrap_or(&mut fresh);
        // Every element is written before it is read, so old contents do not matter.
        x.resize(rows * d, 0.0);
        self.embed_into(tokens, x)?;
        h.resize(rows * d, 0.0);
        qkv.resize(rows * qkv_width);
        z.resize(rows * z_width, 0.0);
        let record = matches!(mode, HookMode::Record { .. });
        let done = |v: &[f32], width: usize| -> Result<Tensor> {
            if record {
                return Ok(Tensor::zeros((0, width), DType::F32, &Device::Cpu)?);
            }
            Ok(Tensor::from_slice(
                &v[..rows * width],
                (rows, width),
                &Device::Cpu,
            )?)
        };
        for (l, b) in self.blocks.iter().enumerate() {
            let at = |kind: HookKind| hooks.iter().any(|h| h.layer == l && h.kind == kind);
            if at(HookKind::ResidPre) && mode.apply_in_place(x)? {
                return done(x, d);
            }
            // Biases go in first; the product then adds onto them.
            if let Some(bias) = &b.b_qkv {
                qkv.chunks_exact_mut(qkv_width)
                    .for_each(|row| row.copy_from_slice(bias));
            }
            let s = &mut *scratch;
            self.qkv(l, rows, x, h, qkv, b.b_qkv.is_some(), s);
            kernels::rope_in_place(
                qkv,
                qkv_width,
                ctx,
                c.n_heads + c.n_kv_heads,
                dh,
                &self.cos,
                &self.sin,
                c.interleaved_rope,
            );
            let heads = crate::attention::Heads {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                d_head: dh,
            };
            crate::attention::causal_attention(qkv, qkv_width, batch, ctx, heads, z);
            if at(HookKind::AttnZ) && mode.apply_in_place(z)? {
                return done(z, z_width);
            }
            // Each block output goes to a buffer of its own and is then added to the residual
            // stream, hooked or not, so an identity splice changes no rounding.
            out.resize(rows * d);
            self.attn_out(l, rows, z, out, s);
            if at(HookKind::AttnOut) && mode.apply_in_place(out)? {
                return done(out, d);
            }
            kernels::add_in_place(x, out);
            self.mlp(l, rows, x, h, out, gate_up, gated, s);
            if at(HookKind::MlpOut) && mode.apply_in_place(out)? {
                return done(out, d);
            }
            kernels::add_in_place(x, out);
            if at(HookKind::ResidPost) && mode.apply_in_place(x)? {
                return done(x, d);
            }
        }
        done(x, d)
    }

    /// The embedding rows of `tokens` into `x`, read straight from the table (no tensor per
    /// pass: fresh buffers this size cost page faults).
    fn embed_into(&self, tokens: &[u32], x: &mut [f32]) -> Result<()> {
        let d = self.cfg.d_model;
        let (storage, layout) = self.embed.storage_and_layout();
        let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            bail!("the embedding table is not a contiguous tensor in CPU memory");
        };
        let table = &cpu.as_slice::<f32>()?[start..end];
        for (row, &t) in x.chunks_exact_mut(d).zip(tokens) {
            let Some(src) = table.get(t as usize * d..(t as usize + 1) * d) else {
                bail!(
                    "token id {t} is outside the embedding table ({} rows)",
                    table.len() / d
                );
            };
            row.copy_from_slice(src);
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    //! The fused forward pass against a plain one built from candle ops (unfused weights,
    //! per-head tensors, a masked full softmax), on random weights with q/k/v biases, grouped
    //! kv heads and both RoPE layouts, at every hook.
    use super::*;

    fn cfg(interleaved_rope: bool) -> LlamaConfig {
        LlamaConfig {
            d_model: 24,
            n_layers: 2,
            n_heads: 6,
            n_kv_heads: 2,
            d_head: 4,
            d_mlp: 40,
            vocab_size: 50,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            max_positions: 80,
            interleaved_rope,
        }
    }

    /// Deterministic values in [-scale, scale) (a 64-bit LCG), as a candle tensor.
    fn random(seed: &mut u64, dims: &[usize], scale: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn layers(c: &LlamaConfig, seed: u64) -> Vec<LlamaLayer> {
        let mut s = seed;
        let (d, dh, q, kv) = (c.d_model, c.d_head, c.n_heads, c.n_kv_heads);
        (0..c.n_layers)
            .map(|_| LlamaLayer {
                attn_norm: (random(&mut s, &[d], 0.5) + 1.0).unwrap(),
                wq: random(&mut s, &[d, q * dh], 0.4),
                wk: random(&mut s, &[d, kv * dh], 0.4),
                wv: random(&mut s, &[d, kv * dh], 0.4),
                bq: Some(random(&mut s, &[q * dh], 0.3)),
                bk: Some(random(&mut s, &[kv * dh], 0.3)),
                bv: Some(random(&mut s, &[kv * dh], 0.3)),
                wo: random(&mut s, &[q * dh, d], 0.4),
                mlp_norm: (random(&mut s, &[d], 0.5) + 1.0).unwrap(),
                w_gate: random(&mut s, &[d, c.d_mlp], 0.4),
                w_up: random(&mut s, &[d, c.d_mlp], 0.4),
                w_down: random(&mut s, &[c.d_mlp, d], 0.3),
            })
            .collect()
    }

    /// Every hook's activation, in the order (layer, HookKind::ALL), from candle ops.
    fn reference(
        m: &Llama,
        layers: &[LlamaLayer],
        tokens: &[u32],
        b: usize,
        t: usize,
    ) -> Vec<Vec<f32>> {
        let c = &m.cfg;
        let (dh, half) = (c.d_head, c.d_head / 2);
        let cos = Tensor::from_slice(&m.cos[..t * half], (t, half), &Device::Cpu).unwrap();
        let sin = Tensor::from_slice(&m.sin[..t * half], (t, half), &Device::Cpu).unwrap();
        let mask = causal_mask(t).unwrap();
        let ids = Tensor::from_slice(tokens, tokens.len(), &Device::Cpu).unwrap();
        let mut x = m.embed.index_select(&ids, 0).unwrap();
        let mut out = Vec::new();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = c.rms_eps as f32;
        for layer in layers {
            out.push(flat(&x));
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps).unwrap();
            let proj = |w: &Tensor, bias: &Option<Tensor>, heads: usize| {
                let y = h
                    .matmul(w)
                    .unwrap()
                    .broadcast_add(bias.as_ref().unwrap())
                    .unwrap();
                y.reshape((b, t, heads, dh))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let q = proj(&layer.wq, &layer.bq, c.n_heads);
            let k = proj(&layer.wk, &layer.bk, c.n_kv_heads);
            let v = proj(&layer.wv, &layer.bv, c.n_kv_heads);
            let rope = |x: &Tensor| {
                if c.interleaved_rope {
                    candle_nn::rotary_emb::rope_i(x, &cos, &sin).unwrap()
                } else {
                    candle_nn::rotary_emb::rope(x, &cos, &sin).unwrap()
                }
            };
            let (q, k) = (rope(&q), rope(&k));
            // Each query head with its own copy of its kv head.
            let group = c.n_heads / c.n_kv_heads;
            let expand = |x: &Tensor| {
                let heads: Vec<Tensor> = (0..c.n_heads)
                    .map(|hd| x.narrow(1, hd / group, 1).unwrap())
                    .collect();
                Tensor::cat(&heads, 1).unwrap()
            };
            let (k, v) = (expand(&k), expand(&v));
            let scores = (q.matmul(&k.t().unwrap()).unwrap() / (dh as f64).sqrt())
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let z = probs
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b * t, c.n_heads * dh))
                .unwrap();
            out.push(flat(&z));
            let attn_out = z.matmul(&layer.wo).unwrap();
            out.push(flat(&attn_out));
            x = (x + attn_out).unwrap();
            let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, eps).unwrap();
            let act = (h.matmul(&layer.w_gate).unwrap().silu().unwrap()
                * h.matmul(&layer.w_up).unwrap())
            .unwrap();
            let mlp_out = act.matmul(&layer.w_down).unwrap();
            out.push(flat(&mlp_out));
            x = (x + mlp_out).unwrap();
            out.push(flat(&x));
        }
        out
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    #[test]
    fn recording_several_hooks_gives_each_hooks_single_capture() {
        let c = cfg(false);
        let mut s = 3;
        let embed = random(&mut s, &[c.vocab_size, c.d_model], 1.0);
        let norm = Tensor::ones(c.d_model, DType::F32, &Device::Cpu).unwrap();
        let unembed = embed.t().unwrap().contiguous().unwrap();
        let m = Llama::new(c.clone(), embed, layers(&c, 5), norm, unembed).unwrap();
        let (batch, ctx) = (2, 7);
        let tokens: Vec<u32> = (0..batch * ctx).map(|i| (i * 13 % 50) as u32).collect();
        let single = |hook: Hook| {
            let t = m
                .forward(&tokens, batch, ctx, &[hook], &mut HookMode::Capture)
                .unwrap();
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        // Out of forward order, with a z hook of another width among them.
        let last = c.n_layers - 1;
        let hooks = [
            Hook {
                layer: last,
                kind: HookKind::ResidPost,
            },
            Hook {
                layer: 0,
                kind: HookKind::AttnZ,
            },
            Hook {
                layer: 0,
                kind: HookKind::ResidPost,
            },
            Hook {
                layer: last,
                kind: HookKind::MlpOut,
            },
        ];
        let mut rows = Vec::new();
        let mut mode = HookMode::Record {
            rows: &mut rows,
            remaining: hooks.len(),
            recorded: 0,
        };
        m.forward(&tokens, batch, ctx, &hooks, &mut mode).unwrap();
        let mut by_order = hooks.to_vec();
        by_order.sort_by_key(|h| h.forward_order());
        assert_eq!(rows.len(), hooks.len());
        for (h, got) in by_order.iter().zip(&rows) {
            assert!(*got == single(*h), "{}: recorded values differ", h.name());
        }
    }

    #[test]
    fn fused_forward_matches_candle_ops_at_every_hook() {
        // ctx 75 spans three blocks of causal attention's query rows, the last one partial.
        for (interleaved, ctx) in [(true, 9), (false, 9), (true, 75)] {
            let c = cfg(interleaved);
            let mut s = 7;
            let embed = random(&mut s, &[c.vocab_size, c.d_model], 1.0);
            let norm = Tensor::ones(c.d_model, DType::F32, &Device::Cpu).unwrap();
            let unembed = embed.t().unwrap().contiguous().unwrap();
            let m = Llama::new(c.clone(), embed, layers(&c, 11), norm, unembed).unwrap();
            let batch = 3;
            let tokens: Vec<u32> = (0..batch * ctx).map(|i| (i * 17 % 50) as u32).collect();
            let want = reference(&m, &layers(&c, 11), &tokens, batch, ctx);
            let mut i = 0;
            for layer in 0..c.n_layers {
                for kind in HookKind::ALL {
                    let hook = Hook { layer, kind };
                    let got = m
                        .forward(&tokens, batch, ctx, &[hook], &mut HookMode::Capture)
                        .unwrap();
                    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let e = rel_err(&got, &want[i]);
                    assert!(
                        e < 1e-5,
                        "{} (interleaved {interleaved}): rel err {e:.2e}",
                        hook.name()
                    );
                    i += 1;
                }
            }
            // With no hook the pass runs to the end: the last block's output.
            let all = m
                .forward(&tokens, batch, ctx, &[], &mut HookMode::Pass)
                .unwrap();
            let all = all.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(rel_err(&all, &want[i - 1]) < 1e-5);
        }
    }
}
