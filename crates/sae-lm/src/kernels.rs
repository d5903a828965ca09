//! f32 CPU kernels of the Llama forward pass, on row-major slices: the row-wise steps
//! (RMSNorm, RoPE, softmax, SiLU gating) in parallel over rows. Attention is in `attention`;
//! the weight products run in `sae_core::f32_product` (or `bf16`), on weights laid out once.

#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;
use sae_core::aligned::AlignedVec;

/// Rows per rayon task in the row-wise kernels: enough work to amortise the task.
const ROW_CHUNK: usize = 16;

/// RMSNorm of each `d`-wide row of `x` into `out`, scaled by `weight`, computed as candle's
/// `rms_norm` does (f32 sum of squares, divide by the root, then scale), except that the
/// sum runs in 16 lanes (`sum_squares`).
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert_eq!(x.len(), out.len());
    out.par_chunks_mut(d * ROW_CHUNK)
        .zip(x.par_chunks(d * ROW_CHUNK))
        .for_each(|(out, x)| {
            for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                with_avx512!(normalise_row(x, weight, eps, o));
            }
        });
}

/// One row of `rms_norm`.
#[inline(always)]
fn normalise_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let m = (sum_squares(x) / weight.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v / m * w;
    }
}

/// The sum of squares of `x` in sixteen running sums, so it vectorises (f32 addition is not
/// reassociated): a chain of one add per value would be the norm's whole cost.
#[inline(always)]
fn sum_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(l, &v)| *l += v * v);
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `rms_norm`, each row rounded to bf16 pairs into `pairs` (grown as needed, `d.div_ceil(2)`
/// u32 per row): the same values, then the same rounding as `bf16::round_rows`, without
/// the f32 rows going through memory. Panics unless `bf16::available()`.
pub(crate) fn rms_norm_pairs(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    split: bool,
    pairs: &mut AlignedVec<u32>,
) {
    let d = weight.len();
    let row = if split { 3 } else { 1 } * d.div_ceil(2);
    let rows = x.len() / d;
    if pairs.len() < rows * row {
        pairs.resize(rows * row);
    }
    pairs[..rows * row]
        .par_chunks_mut(row * ROW_CHUNK)
        .zip(x.par_chunks(d * ROW_CHUNK))
        .for_each_init(
            || vec![0f32; d],
            |normed, (pairs, x)| {
                for (p, x) in pairs.chunks_exact_mut(row).zip(x.chunks_exact(d)) {
                    with_avx512!(normalise_row(x, weight, eps, normed));
                    match split {
                        true => sae_core::bf16::split_row_pairs(normed, p),
                        false => sae_core::bf16::round_row_pairs(normed, p),
                    }
                }
            },
        );
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

/// `x += y`, elementwise, in parallel.
pub(crate) fn add_in_place(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    const CHUNK: usize = 1 << 14;
    x.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += y));
}

/// SwiGLU in place on rows of `gate | up` (each `d_mlp` wide): the gate half becomes
/// `silu(gate) * up`, which the down projection then reads with row stride `2 * d_mlp`.
pub(crate) fn silu_gate_in_place(gate_up: &mut [f32], d_mlp: usize) {
    gate_up
        .par_chunks_mut(2 * d_mlp * ROW_CHUNK)
        .for_each(|rows| {
            for row in rows.chunks_exact_mut(2 * d_mlp) {
                let (gate, up) = row.split_at_mut(d_mlp);
                with_avx512!(silu_gate(gate, up));
            }
        });
}

/// Runs a call to an `#[inline(always)]` function inside a function compiled for AVX-512
/// where the CPU has it, so its loops are vectorised 16 wide; plainly elsewhere.
macro_rules! with_avx512 {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn wide<T>(f: impl FnOnce() -> T) -> T {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                unsafe { wide(|| $f($($arg),*)) }
            } else {
                $f($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f($($arg),*)
        }
    }};
}
use with_avx512;

#[inline(always)]
fn silu_gate(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// Softmax of `row` in place.
pub(crate) fn softmax(row: &mut [f32]) {
    with_avx512!(softmax_inline(row))
}

#[inline(always)]
pub(crate) fn softmax_inline(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    row.iter_mut().for_each(|s| *s = exp(*s - max));
    // Sixteen running sums, so the sum vectorises (f32 addition is not reassociated).
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(l, &v)| *l += v);
    }
    let sum = lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|s| *s *= inv);
}

/// `e^x` in f32 without branches or calls, so loops over it vectorise: x = n ln2 + r with
/// |r| <= ln2/2, e^r by Cephes' expf polynomial (about 1 ulp), times 2^n built in the exponent
/// bits. Inputs are clamped to where 2^n stays a normal float, so below about -87.3 it
/// returns 1.2e-38 rather than a subnormal or 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // t lies in [2^23, 2^24), where a float's low bits count its units: they hold n + 2^22.
    // Read there, n needs no float-to-int conversion (whose saturating `as` kept loops of
    // `exp` from vectorising); the same integer as `n as i32` for every finite x.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    er * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_pairs_equals_rms_norm_then_rounding_or_splitting() {
        if !sae_core::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (rows, d) in [(1, 1), (5, 7), (37, 64), (40, 33)] {
            let x: Vec<f32> = (0..rows * d)
                .map(|i| (i as f32 * 0.37).sin() * 3.0)
                .collect();
            let weight: Vec<f32> = (0..d).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
            let mut h = vec![0f32; rows * d];
            rms_norm(&x, &weight, 1e-5, &mut h);
            for split in [false, true] {
                let mut want = AlignedVec::default();
                match split {
                    true => sae_core::bf16::split_rows(rows, &h, d, d, &mut want),
                    false => sae_core::bf16::round_rows(rows, &h, d, d, &mut want),
                }
                let len = rows * d.div_ceil(2) * if split { 3 } else { 1 };
                // Stale values, so an unwritten pair would show.
                let mut got = AlignedVec::zeroed(len);
                got.fill(u32::MAX);
                rms_norm_pairs(&x, &weight, 1e-5, split, &mut got);
                assert_eq!(got[..], want[..len], "{rows} x {d}, split {split}");
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:.2e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1.3e-38 && exp(-1000.0) > 0.0);
    }

    #[test]
    fn softmax_and_silu_match_scalar_formulas() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin() * 9.0).collect();
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let sum: f32 = row.iter().map(|s| (s - max).exp()).sum();
        let want: Vec<f32> = row.iter().map(|s| (s - max).exp() / sum).collect();
        softmax(&mut row);
        for (g, w) in row.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.max(1e-3), "{g} vs {w}");
        }
        let d = 21;
        let mut gate_up: Vec<f32> = (0..3 * 2 * d)
            .map(|i| (i as f32 * 0.37).cos() * 6.0)
            .collect();
        let want: Vec<f32> = gate_up
            .chunks(2 * d)
            .flat_map(|r| {
                (0..d)
                    .map(|i| r[i] / (1.0 + (-r[i]).exp()) * r[d + i])
                    .collect::<Vec<_>>()
            })
            .collect();
        silu_gate_in_place(&mut gate_up, d);
        let got: Vec<f32> = gate_up
            .chunks(2 * d)
            .flat_map(|r| r[..d].to_vec())
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
}
