//! bf16 products on CPUs with AVX512-BF16 (`vdpbf16ps`: 32 bf16 multiply-adds into 16 f32
//! sums per instruction, twice the work of an f32 FMA). Weights are rounded to bf16 once and
//! packed at load; activations are rounded per product; sums stay f32.

#![allow(clippy::too_many_arguments)]

use half::bf16;
use rayon::prelude::*;

/// Output columns per packed panel: three 16-lane registers.
const NR: usize = 48;
/// Rows per register tile (8 x 3 accumulators of the 32 registers).
const MR: usize = 8;
/// Rows per rayon task; its activation rows stay in L2 across the panels it visits.
const ROW_BLOCK: usize = 64;

/// Whether this CPU runs the bf16 products.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Two bf16 values in one u32, the first in the low half (the order `vdpbf16ps` pairs them).
fn pair(lo: f32, hi: f32) -> u32 {
    bf16::from_f32(lo).to_bits() as u32 | (bf16::from_f32(hi).to_bits() as u32) << 16
}

/// A `[k, n]` weight matrix rounded to bf16, packed as panels of `NR` columns; within a panel,
/// one row of `NR` u32 per pair of consecutive k (zero-padded past `k` and `n`).
pub struct PackedBf16 {
    k: usize,
    n: usize,
    k_pairs: usize,
    data: Vec<u32>,
}

impl PackedBf16 {
    /// `w` is `[k, n]` row-major f32.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n);
        let k_pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * k_pairs * NR];
        data.par_chunks_mut(k_pairs * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for (kp, row) in panel.chunks_exact_mut(NR).enumerate() {
                    for (c, v) in row.iter_mut().enumerate() {
                        let col = p * NR + c;
                        if col >= n {
                            break;
                        }
                        let hi = if 2 * kp + 1 < k {
                            w[(2 * kp + 1) * n + col]
                        } else {
                            0.0
                        };
                        *v = pair(w[2 * kp * n + col], hi);
                    }
                }
            });
        Self {
            k,
            n,
            k_pairs,
            data,
        }
    }
}

#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: tasks write disjoint (row block, panel) tiles of the output (see `matmul`).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method so closures capture the wrapper, not the bare pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[r, j] (+)= sum_i a[r, i] * w[i, j]` for `m` rows, with `a` (row stride `a_rs`, first
/// `w.k` columns used) rounded to bf16. `a_pairs` is scratch for the rounded rows.
/// Panics unless `available()`.
pub fn matmul(
    m: usize,
    a: &[f32],
    a_rs: usize,
    w: &PackedBf16,
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
    a_pairs: &mut Vec<u32>,
) {
    assert!(available(), "bf16 products need AVX512-BF16");
    if m == 0 || w.n == 0 {
        return;
    }
    let (k, kp) = (w.k, w.k_pairs);
    assert!(k <= a_rs && a.len() >= (m - 1) * a_rs + k);
    assert!(w.n <= out_rs && out.len() >= (m - 1) * out_rs + w.n);
    a_pairs.clear();
    a_pairs.resize(m * kp, 0);
    a_pairs
        .par_chunks_mut(kp * ROW_BLOCK)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (i, dst) in rows.chunks_exact_mut(kp).enumerate() {
                // SAFETY: `available()` was checked above.
                unsafe { round_row(&a[(blk * ROW_BLOCK + i) * a_rs..][..k], dst) };
            }
        });
    let panels = w.n.div_ceil(NR);
    let blocks = m.div_ceil(ROW_BLOCK);
    let out_ptr = SharedMut(out.as_mut_ptr());
    let a_pairs = &a_pairs[..];
    (0..blocks * panels).into_par_iter().for_each(|task| {
        let (blk, p) = (task / panels, task % panels);
        let cols = NR.min(w.n - p * NR);
        let panel = &w.data[p * kp * NR..][..kp * NR];
        let end = m.min((blk + 1) * ROW_BLOCK);
        let mut r = blk * ROW_BLOCK;
        while r < end {
            let rows = MR.min(end - r);
            let a_tile = &a_pairs[r * kp..][..rows * kp];
            // SAFETY: `available()` was checked; this task alone writes rows r..r+rows,
            // columns p*NR..p*NR+cols of `out`, inside it by the asserts above.
            unsafe {
                let dst = out_ptr.get().add(r * out_rs + p * NR);
                tile_any(rows, a_tile, kp, panel, dst, out_rs, cols, accumulate);
            }
            r += rows;
        }
    });
}

/// `src` rounded to bf16 into `dst` as pairs (`dst.len() == src.len().div_ceil(2)`), 32
/// values per instruction; the same round-to-nearest-even as `pair`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_row(src: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(dst.len(), src.len().div_ceil(2));
    let whole = src.len() / 32;
    for i in 0..whole {
        let s = src.as_ptr().add(32 * i);
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
            _mm512_loadu_ps(s.add(16)),
            _mm512_loadu_ps(s),
        ));
        _mm512_storeu_si512(dst.as_mut_ptr().add(16 * i) as *mut __m512i, v);
    }
    for (j, d) in dst.iter_mut().enumerate().skip(16 * whole) {
        let hi = src.get(2 * j + 1).copied().unwrap_or(0.0);
        *d = pair(src[2 * j], hi);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn round_row(_src: &[f32], _dst: &mut [u32]) {
    unreachable!("bf16 products are x86_64 only");
}

#[cfg(target_arch = "x86_64")]
unsafe fn tile_any(
    rows: usize,
    a: &[u32],
    kp: usize,
    panel: &[u32],
    dst: *mut f32,
    dst_rs: usize,
    cols: usize,
    accumulate: bool,
) {
    macro_rules! by_rows {
        ($($n:literal)*) => {
            match rows {
                $($n => tile::<$n>(a, kp, panel, dst, dst_rs, cols, accumulate),)*
                _ => unreachable!("tile rows are 1..=MR"),
            }
        };
    }
    by_rows!(1 2 3 4 5 6 7 8)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_any(
    _rows: usize,
    _a: &[u32],
    _kp: usize,
    _panel: &[u32],
    _dst: *mut f32,
    _dst_rs: usize,
    _cols: usize,
    _accumulate: bool,
) {
    unreachable!("bf16 products are x86_64 only");
}

/// One `R x NR` output tile: `R` rows of rounded activations (`kp` pairs each) against one
/// packed panel, written (or added) to `dst`, of which only the first `cols` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const R: usize>(
    a: &[u32],
    kp: usize,
    panel: &[u32],
    dst: *mut f32,
    dst_rs: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= R * kp && panel.len() >= kp * NR);
    let mut acc = [[_mm512_setzero_ps(); 3]; R];
    let (a, b) = (a.as_ptr(), panel.as_ptr());
    for j in 0..kp {
        let bj = b.add(j * NR) as *const __m512i;
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bj));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bj.add(1)));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bj.add(2)));
        for (r, acc) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * kp + j) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            acc[2] = _mm512_dpbf16_ps(acc[2], av, b2);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (z, &v) in acc.iter().enumerate() {
            let c0 = z * 16;
            if c0 >= cols {
                break;
            }
            let mask: __mmask16 = if cols - c0 >= 16 {
                0xffff
            } else {
                (1u16 << (cols - c0)) - 1
            };
            let p = dst.add(r * dst_rs + c0);
            let v = if accumulate {
                _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), v)
            } else {
                v
            };
            _mm512_mask_storeu_ps(p, mask, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an f64 product of the same bf16-rounded inputs, on shapes with row, column and
    /// k remainders; both with and without accumulation, at a row stride wider than k.
    #[test]
    fn bf16_product_matches_rounded_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let round = |v: f32| bf16::from_f32(v).to_f32() as f64;
        for &(m, k, n) in &[(1, 2, 1), (13, 7, 50), (70, 33, 96), (9, 64, 47)] {
            let a_rs = k + 3;
            let a: Vec<f32> = (0..m * a_rs)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
                .collect();
            let packed = PackedBf16::pack(&w, k, n);
            let out_rs = n + 2;
            let init: Vec<f32> = (0..m * out_rs).map(|i| (i % 5) as f32).collect();
            for accumulate in [false, true] {
                let mut out = init.clone();
                matmul(
                    m,
                    &a,
                    a_rs,
                    &packed,
                    &mut out,
                    out_rs,
                    accumulate,
                    &mut Vec::new(),
                );
                for r in 0..m {
                    for c in 0..out_rs {
                        let got = out[r * out_rs + c] as f64;
                        if c >= n {
                            assert_eq!(got, init[r * out_rs + c] as f64, "padding ({r}, {c})");
                            continue;
                        }
                        let mut want: f64 = (0..k)
                            .map(|i| round(a[r * a_rs + i]) * round(w[i * n + c]))
                            .sum();
                        if accumulate {
                            want += init[r * out_rs + c] as f64;
                        }
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{m}x{k}x{n} ({r}, {c}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
