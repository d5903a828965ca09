//! f32 CPU kernels of the Llama forward pass, on row-major slices: products through `gemm`
//! (strided, so head slices and fused-weight halves are read in place, no copies), and the
//! row-wise steps (RMSNorm, RoPE, causal softmax, SiLU gating) in parallel over rows.

#![allow(clippy::too_many_arguments)]

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Rows per rayon task in the row-wise kernels: enough work to amortise the task.
const ROW_CHUNK: usize = 16;

pub(crate) fn parallelism() -> Parallelism {
    let t = rayon::current_num_threads();
    if t <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(t)
    }
}

/// `out[r, j] (+)= sum_i a[r, i] * b[i, j]` for `m` rows. `a` has row stride `a_rs` (its
/// first `k` columns are used), `b` is `[k, n]` contiguous, `out` has row stride `out_rs`.
/// With `accumulate` the product is added to what `out` holds.
pub(crate) fn matmul(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k <= a_rs && n <= out_rs);
    assert!(a.len() >= (m - 1) * a_rs + k);
    assert_eq!(b.len(), k * n);
    assert!(out.len() >= (m - 1) * out_rs + n);
    // SAFETY: the asserts above keep every strided access inside the slices.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            accumulate,
            a.as_ptr(),
            1,
            a_rs as isize,
            b.as_ptr(),
            1,
            n as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// RMSNorm of each `d`-wide row of `x` into `out`, scaled by `weight`, computed as candle's
/// `rms_norm` does (f32 sum of squares, divide by the root, then scale).
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert_eq!(x.len(), out.len());
    out.par_chunks_mut(d * ROW_CHUNK)
        .zip(x.par_chunks(d * ROW_CHUNK))
        .for_each(|(out, x)| {
            for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let sum2: f32 = x.iter().map(|v| v * v).sum();
                let m = (sum2 / d as f32 + eps).sqrt();
                for ((o, &v), &w) in o.iter_mut().zip(x).zip(weight) {
                    *o = v / m * w;
                }
            }
        });
}

/// Rotates the first `n_rot_heads` heads (`d_head` wide) of each row of `qkv` (row stride
/// `width`) in place; row `r` is at position `r % ctx`. `cos`/`sin` are `[positions, d_head/2]`.
/// Interleaved pairs `(2i, 2i+1)` (GGUF's permuted q/k) or split halves `(i, i + d_head/2)`.
pub(crate) fn rope_in_place(
    qkv: &mut [f32],
    width: usize,
    ctx: usize,
    n_rot_heads: usize,
    d_head: usize,
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    let half = d_head / 2;
    assert!(n_rot_heads * d_head <= width);
    assert!(cos.len() >= ctx * half && sin.len() >= ctx * half);
    qkv.par_chunks_mut(width * ROW_CHUNK)
        .enumerate()
        .for_each(|(chunk, rows)| {
            for (i, row) in rows.chunks_exact_mut(width).enumerate() {
                let pos = (chunk * ROW_CHUNK + i) % ctx;
                let (cos, sin) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                for head in row[..n_rot_heads * d_head].chunks_exact_mut(d_head) {
                    if interleaved {
                        for (j, pair) in head.chunks_exact_mut(2).enumerate() {
                            let (a, b) = (pair[0], pair[1]);
                            pair[0] = a * cos[j] - b * sin[j];
                            pair[1] = a * sin[j] + b * cos[j];
                        }
                    } else {
                        let (lo, hi) = head.split_at_mut(half);
                        for j in 0..half {
                            let (a, b) = (lo[j], hi[j]);
                            lo[j] = a * cos[j] - b * sin[j];
                            hi[j] = a * sin[j] + b * cos[j];
                        }
                    }
                }
            }
        });
}

/// A pointer that rayon tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used for writes to regions no two tasks share (see `causal_attention`).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method so closures capture the wrapper, not the bare pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Causal grouped-query attention for `batch` contexts of `ctx` rows. Each row of `qkv`
/// (stride `width`) holds `n_heads` query heads, then `n_kv_heads` key heads, then
/// `n_kv_heads` value heads, all `d_head` wide, RoPE already applied. Writes the per-head
/// outputs to `z` (`[batch * ctx, n_heads * d_head]`). One task per (context, query head).
pub(crate) fn causal_attention(
    qkv: &[f32],
    width: usize,
    batch: usize,
    ctx: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
    z: &mut [f32],
) {
    let z_width = n_heads * d_head;
    assert!((n_heads + 2 * n_kv_heads) * d_head <= width);
    assert!(n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads));
    assert!(qkv.len() >= batch * ctx * width);
    assert_eq!(z.len(), batch * ctx * z_width);
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (d_head as f32).sqrt();
    let z_ptr = SharedMut(z.as_mut_ptr());
    (0..batch * n_heads).into_par_iter().for_each_init(
        || vec![0f32; ctx * ctx],
        |scores, task| {
            let (b, h) = (task / n_heads, task % n_heads);
            let kv = h / group;
            let base = b * ctx * width;
            let q = &qkv[base + h * d_head..];
            let k = &qkv[base + (n_heads + kv) * d_head..];
            let v = &qkv[base + (n_heads + n_kv_heads + kv) * d_head..];
            // SAFETY: `scores` is ctx x ctx; q and k rows are d_head wide at stride `width`
            // within this context's rows (asserted above); k is read transposed.
            unsafe {
                gemm(
                    ctx,
                    ctx,
                    d_head,
                    scores.as_mut_ptr(),
                    1,
                    ctx as isize,
                    false,
                    q.as_ptr(),
                    1,
                    width as isize,
                    k.as_ptr(),
                    width as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for (i, row) in scores.chunks_exact_mut(ctx).enumerate() {
                let (seen, future) = row.split_at_mut(i + 1);
                let max = seen.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut sum = 0f32;
                for s in seen.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                seen.iter_mut().for_each(|s| *s *= inv);
                future.fill(0.0);
            }
            // SAFETY: this task alone writes columns h*d_head..(h+1)*d_head of the rows of
            // context b in z (z is batch*ctx x z_width, asserted above); v as q above.
            unsafe {
                gemm(
                    ctx,
                    d_head,
                    ctx,
                    z_ptr.get().add(b * ctx * z_width + h * d_head),
                    1,
                    z_width as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    ctx as isize,
                    v.as_ptr(),
                    1,
                    width as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
}

/// SwiGLU in place on rows of `gate | up` (each `d_mlp` wide): the gate half becomes
/// `silu(gate) * up`, which the down projection then reads with row stride `2 * d_mlp`.
pub(crate) fn silu_gate_in_place(gate_up: &mut [f32], d_mlp: usize) {
    gate_up
        .par_chunks_mut(2 * d_mlp * ROW_CHUNK)
        .for_each(|rows| {
            for row in rows.chunks_exact_mut(2 * d_mlp) {
                let (gate, up) = row.split_at_mut(d_mlp);
                for (g, &u) in gate.iter_mut().zip(up.iter()) {
                    *g = *g / (1.0 + (-*g).exp()) * u;
                }
            }
        });
}
