//! Causal grouped-query attention of the Llama forward pass, f32, in place on the q|k|v rows
//! (head slices are read where they are, no copies of q or v).
//!
//! Two paths, picked at run time: on AVX-512 (head width a multiple of 64) register tiles of
//! our own with K transposed once per head, which skip the masked keys tile by tile; elsewhere
//! `gemm` over blocks of query rows. Both compute the same sums in f32 (the order of terms
//! may differ); a test checks each against a plain loop.

#![allow(clippy::too_many_arguments)]

use crate::kernels::softmax;
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use sae_core::kernels::SharedMut;

/// Query rows per block on the `gemm` path: block `[i0, i1)` attends to keys `0..i1` only.
const QUERY_BLOCK: usize = 32;
/// Keys per score tile on the AVX-512 path: three 16-lane registers.
const KEY_TILE: usize = 48;
/// Query rows per score tile: 8 rows x 3 registers of sums.
const SCORE_ROWS: usize = 8;
/// Query rows per output tile: 4 rows x 4 registers (64 columns) of sums.
const OUT_ROWS: usize = 4;
/// Output columns per output tile.
const OUT_COLS: usize = 64;

/// One task's scratch: scores, and K transposed (AVX-512 path).
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    k_t: Vec<f32>,
}

/// The heads of grouped-query attention: `n_heads` query heads share `n_kv_heads` key and
/// value heads, all `d_head` wide.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
}

/// Causal grouped-query attention for `batch` contexts of `ctx` rows. Each row of `qkv`
/// (stride `width`) holds the query heads, then the key heads, then the value heads, RoPE
/// already applied. Writes the per-head outputs to `z` (`[batch * ctx, n_heads * d_head]`).
/// One task per (context, kv head).
pub(crate) fn causal_attention(
    qkv: &[f32],
    width: usize,
    batch: usize,
    ctx: usize,
    heads: Heads,
    z: &mut [f32],
) {
    let path = match avx512_fits(heads.d_head) {
        true => Path::Avx512,
        false => Path::Gemm,
    };
    attention_on(path, qkv, width, batch, ctx, heads, z);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Avx512,
    Gemm,
}

fn avx512_fits(d_head: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    d_head.is_multiple_of(OUT_COLS) && avx512
}

fn attention_on(
    path: Path,
    qkv: &[f32],
    width: usize,
    batch: usize,
    ctx: usize,
    heads: Heads,
    z: &mut [f32],
) {
    let Heads {
        n_heads,
        n_kv_heads,
        d_head,
    } = heads;
    let z_width = n_heads * d_head;
    assert!((n_heads + 2 * n_kv_heads) * d_head <= width);
    assert!(n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads));
    assert!(qkv.len() >= batch * ctx * width);
    assert_eq!(z.len(), batch * ctx * z_width);
    assert!(path == Path::Gemm || avx512_fits(d_head));
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (d_head as f32).sqrt();
    let z_ptr = SharedMut(z.as_mut_ptr());
    // One task per (context, kv head): the query heads of its group share K (transposed
    // once on the AVX-512 path) and V.
    (0..batch * n_kv_heads)
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, task| {
            let (b, kv) = (task / n_kv_heads, task % n_kv_heads);
            let base = b * ctx * width;
            let k = &qkv[base + (n_heads + kv) * d_head..];
            let v = &qkv[base + (n_heads + n_kv_heads + kv) * d_head..];
            if path == Path::Avx512 {
                transpose_keys(k, width, ctx, d_head, &mut scratch.k_t);
            }
            for h in kv * group..(kv + 1) * group {
                // SAFETY: this task alone writes rows b*ctx..(b+1)*ctx, columns
                // h*d_head..(h+1)*d_head of z (z is batch*ctx x z_width, asserted above).
                let z = unsafe { z_ptr.get().add(b * ctx * z_width + h * d_head) };
                let head = Head {
                    q: &qkv[base + h * d_head..],
                    k,
                    v,
                    width,
                    ctx,
                    d_head,
                    scale,
                    z,
                    z_width,
                };
                match path {
                    // SAFETY: AVX-512F checked by `avx512_fits`, asserted above; `k_t` holds
                    // this head's keys.
                    Path::Avx512 => unsafe { attend_avx512(&head, scratch) },
                    Path::Gemm => attend_gemm(&head, &mut scratch.scores),
                }
            }
        });
}

/// `k` (`ctx` rows at stride `width`, `d_head` wide) transposed into `k_t`: `d_head` rows of
/// `ctx.next_multiple_of(KEY_TILE)` keys, the padding left as it was.
fn transpose_keys(k: &[f32], width: usize, ctx: usize, d_head: usize, k_t: &mut Vec<f32>) {
    let ctx_pad = ctx.next_multiple_of(KEY_TILE);
    k_t.resize(d_head * ctx_pad, 0.0);
    for (d, row) in k_t.chunks_exact_mut(ctx_pad).enumerate() {
        for (j, t) in row[..ctx].iter_mut().enumerate() {
            *t = k[j * width + d];
        }
    }
}

/// One (context, query head): q, k and v rows at stride `width` (`ctx` rows each, `d_head`
/// wide), the output rows at `z` (stride `z_width`).
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    width: usize,
    ctx: usize,
    d_head: usize,
    scale: f32,
    z: *mut f32,
    z_width: usize,
}

fn attend_gemm(hd: &Head<'_>, scores: &mut Vec<f32>) {
    let (ctx, width, d_head) = (hd.ctx, hd.width, hd.d_head);
    scores.resize(ctx * ctx, 0.0);
    // Masked scores inside a block are zeros, which add nothing to z.
    let mut i0 = 0;
    while i0 < ctx {
        let i1 = ctx.min(i0 + QUERY_BLOCK);
        // SAFETY: `scores` is ctx x ctx and rows i0..i1, columns 0..i1 are written; q and k
        // rows are d_head wide at stride `width` within this context's rows (asserted by
        // `attention_on`); k is read transposed.
        unsafe {
            gemm(
                i1 - i0,
                i1,
                d_head,
                scores.as_mut_ptr().add(i0 * ctx),
                1,
                ctx as isize,
                false,
                hd.q.as_ptr().add(i0 * width),
                1,
                width as isize,
                hd.k.as_ptr(),
                width as isize,
                1,
                0.0,
                hd.scale,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        for i in i0..i1 {
            let (seen, future) = scores[i * ctx..][..i1].split_at_mut(i + 1);
            softmax(seen);
            future.fill(0.0);
        }
        // SAFETY: rows i0..i1 of this head's output (see `attention_on`); v as q above.
        unsafe {
            gemm(
                i1 - i0,
                d_head,
                i1,
                hd.z.add(i0 * hd.z_width),
                1,
                hd.z_width as isize,
                false,
                scores.as_ptr().add(i0 * ctx),
                1,
                ctx as isize,
                hd.v.as_ptr(),
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
        i0 = i1;
    }
}

/// The AVX-512 path: K transposed once (`d_head` rows of keys, padded to whole tiles), then
/// per block of `SCORE_ROWS` query rows the scores against the keys they see (whole tiles of
/// `KEY_TILE`; scores past the block's last key come from the padding and are never read),
/// the softmax, and the outputs over those keys.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(hd: &Head<'_>, s: &mut Scratch) {
    let (ctx, width, dh) = (hd.ctx, hd.width, hd.d_head);
    let ctx_pad = ctx.next_multiple_of(KEY_TILE);
    debug_assert_eq!(s.k_t.len(), dh * ctx_pad);
    s.scores.resize(SCORE_ROWS * ctx_pad, 0.0);
    let mut i0 = 0;
    while i0 < ctx {
        let rows = SCORE_ROWS.min(ctx - i0);
        let n_keys = i0 + rows;
        for j0 in (0..n_keys).step_by(KEY_TILE) {
            score_tile(
                rows,
                hd.q.as_ptr().add(i0 * width),
                width,
                s.k_t.as_ptr().add(j0),
                ctx_pad,
                dh,
                hd.scale,
                s.scores.as_mut_ptr().add(j0),
                ctx_pad,
            );
        }
        for (r, row) in s.scores.chunks_exact_mut(ctx_pad).take(rows).enumerate() {
            // Rows are padded to whole tiles of keys, so the softmax runs over whole
            // registers (a multiple of 16 <= ctx_pad, a multiple of 48).
            let seen = i0 + r + 1;
            let lanes = seen.next_multiple_of(16);
            softmax_padded(&mut row[..lanes], seen);
            if n_keys > lanes {
                row[lanes..n_keys].fill(0.0);
            }
        }
        for r0 in (0..rows).step_by(OUT_ROWS) {
            for c0 in (0..dh).step_by(OUT_COLS) {
                out_tile(
                    OUT_ROWS.min(rows - r0),
                    s.scores.as_ptr().add(r0 * ctx_pad),
                    ctx_pad,
                    n_keys,
                    hd.v.as_ptr().add(c0),
                    width,
                    hd.z.add((i0 + r0) * hd.z_width + c0),
                    hd.z_width,
                );
            }
        }
        i0 += rows;
    }
}

/// Softmax of `row[..n]` in place and zeros after it, where `row.len()` is a multiple of 16:
/// the padding enters as -inf (e^x of the clamped `exp` gives 1.2e-38 there, which adds
/// nothing to a sum that holds a 1, the maximum's term) so every pass runs over whole
/// 16-lane chunks, without a scalar tail.
#[inline(always)]
fn softmax_padded(row: &mut [f32], n: usize) {
    debug_assert!(row.len().is_multiple_of(16) && n <= row.len() && n > 0);
    row[n..].fill(f32::NEG_INFINITY);
    let mut max = [f32::NEG_INFINITY; 16];
    for c in row.chunks_exact(16) {
        max.iter_mut().zip(c).for_each(|(m, &s)| *m = m.max(s));
    }
    let max = max.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut lanes = [0f32; 16];
    for c in row.chunks_exact_mut(16) {
        c.iter_mut()
            .for_each(|s| *s = crate::kernels::exp(*s - max));
        lanes.iter_mut().zip(&*c).for_each(|(l, &v)| *l += v);
    }
    let inv = 1.0 / lanes.iter().sum::<f32>();
    row[..n].iter_mut().for_each(|s| *s *= inv);
    row[n..].fill(0.0);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn attend_avx512(_hd: &Head<'_>, _s: &mut Scratch) {
    unreachable!("the AVX-512 path is x86_64 only");
}

/// `scale * q k^T` for `rows` (<= SCORE_ROWS) query rows at `q` (stride `q_rs`) against
/// `KEY_TILE` keys of `k_t` (`dh` rows, stride `k_rs`), into `out` (stride `out_rs`). Rows
/// past `rows` repeat the last one and are not stored, so the loop has no branches.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn score_tile(
    rows: usize,
    q: *const f32,
    q_rs: usize,
    k_t: *const f32,
    k_rs: usize,
    dh: usize,
    scale: f32,
    out: *mut f32,
    out_rs: usize,
) {
    use std::arch::x86_64::*;
    let q_rows: [*const f32; SCORE_ROWS] = std::array::from_fn(|r| q.add(r.min(rows - 1) * q_rs));
    let mut acc = [[_mm512_setzero_ps(); 3]; SCORE_ROWS];
    for d in 0..dh {
        let b = k_t.add(d * k_rs);
        let b = [
            _mm512_loadu_ps(b),
            _mm512_loadu_ps(b.add(16)),
            _mm512_loadu_ps(b.add(32)),
        ];
        for (acc, qr) in acc.iter_mut().zip(&q_rows) {
            let a = _mm512_set1_ps(*qr.add(d));
            for (acc, &b) in acc.iter_mut().zip(&b) {
                *acc = _mm512_fmadd_ps(a, b, *acc);
            }
        }
    }
    let scale = _mm512_set1_ps(scale);
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (c, &v) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * out_rs + 16 * c), _mm512_mul_ps(v, scale));
        }
    }
}

/// `p v` for `rows` (<= OUT_ROWS) rows of probabilities at `p` (stride `p_rs`) over the
/// first `n_keys` keys, against `OUT_COLS` columns of the value rows at `v` (stride `v_rs`),
/// into `out` (stride `out_rs`).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn out_tile(
    rows: usize,
    p: *const f32,
    p_rs: usize,
    n_keys: usize,
    v: *const f32,
    v_rs: usize,
    out: *mut f32,
    out_rs: usize,
) {
    use std::arch::x86_64::*;
    let p_rows: [*const f32; OUT_ROWS] = std::array::from_fn(|r| p.add(r.min(rows - 1) * p_rs));
    let mut acc = [[_mm512_setzero_ps(); OUT_COLS / 16]; OUT_ROWS];
    for j in 0..n_keys {
        let vj = v.add(j * v_rs);
        let b: [__m512; OUT_COLS / 16] = std::array::from_fn(|c| _mm512_loadu_ps(vj.add(16 * c)));
        for (acc, pr) in acc.iter_mut().zip(&p_rows) {
            let a = _mm512_set1_ps(*pr.add(j));
            for (acc, &b) in acc.iter_mut().zip(&b) {
                *acc = _mm512_fmadd_ps(a, b, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (c, &v) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * out_rs + 16 * c), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain loops, f64 sums: the reference both paths are held to.
    fn reference(
        qkv: &[f32],
        width: usize,
        batch: usize,
        ctx: usize,
        n_heads: usize,
        n_kv_heads: usize,
        dh: usize,
    ) -> Vec<f32> {
        let z_width = n_heads * dh;
        let mut z = vec![0f32; batch * ctx * z_width];
        let scale = 1.0 / (dh as f64).sqrt();
        for b in 0..batch {
            for h in 0..n_heads {
                let kv = h / (n_heads / n_kv_heads);
                let at = |row: usize, col: usize| qkv[(b * ctx + row) * width + col] as f64;
                for i in 0..ctx {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..dh)
                                .map(|d| at(i, h * dh + d) * at(j, (n_heads + kv) * dh + d))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..dh {
                        let v_col = (n_heads + n_kv_heads + kv) * dh + d;
                        let o: f64 = (0..=i).map(|j| e[j] / sum * at(j, v_col)).sum();
                        z[(b * ctx + i) * z_width + h * dh + d] = o as f32;
                    }
                }
            }
        }
        z
    }

    #[test]
    fn every_path_matches_plain_attention() {
        let paths: Vec<Path> = [Path::Gemm, Path::Avx512]
            .into_iter()
            .filter(|&p| p == Path::Gemm || avx512_fits(64))
            .collect();
        // ctx 1, a partial score block, several key tiles with a partial last one; head
        // widths of one and two output tiles.
        for (batch, ctx, n_heads, n_kv_heads, dh) in [
            (1, 1, 2, 1, 64),
            (2, 75, 6, 2, 64),
            (1, 130, 3, 3, 64),
            (2, 21, 4, 2, 128),
            (3, 128, 9, 3, 64),
        ] {
            // A spare column past the heads, so strides differ from the heads' width.
            let width = (n_heads + 2 * n_kv_heads) * dh + 1;
            let qkv: Vec<f32> = (0..batch * ctx * width)
                .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 6.0)
                .collect();
            let want = reference(&qkv, width, batch, ctx, n_heads, n_kv_heads, dh);
            for &path in &paths {
                let mut z = vec![f32::NAN; want.len()];
                let heads = Heads {
                    n_heads,
                    n_kv_heads,
                    d_head: dh,
                };
                attention_on(path, &qkv, width, batch, ctx, heads, &mut z);
                let worst = z
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "{path:?} at batch {batch}, ctx {ctx}, d_head {dh}: worst {worst:.2e}"
                );
            }
        }
        if !paths.contains(&Path::Avx512) {
            eprintln!("AVX-512 path not tested: this CPU has no AVX-512F");
        }
    }
}
