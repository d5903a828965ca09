//! SwiGLU's gate and up products in bf16 with the gating done in the products' registers:
//! `silu(h W_gate) * (h W_up)` is rounded to bf16 pairs, the down product's operand, and is
//! never written in f32. It skips what the unfused path spends outside the products: the
//! `[rows, 2 * d_mlp]` f32 output, the SiLU pass over it and the rounding pass after.
//!
//! Same sums as `bf16::matmul` on the same path (`vdpbf16ps` lane by lane over the same pairs
//! of k, in the same order; or the AMX tiles of `sae_core::amx`, which give each sum the same
//! bits wherever it lies in a tile), the same SiLU arithmetic as
//! `kernels::silu_gate_in_place` (the same operations, so the same bits) and the same
//! rounding as `bf16::round_rows`: the result equals `bf16::matmul`, then
//! `silu_gate_in_place`, then `round_rows`, bit for bit (tested below).

#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;
use sae_core::aligned::AlignedVec;
use sae_core::amx;
use sae_core::bf16::{self, Bf16Path, PackedBf16, PANEL_COLS};
use sae_core::kernels::SharedMut;

/// Rows per register tile: 4 rows x (3 gate + 3 up) registers of 16 sums is 24 of the 32.
const TILE_ROWS: usize = 4;

/// `out` (grown as needed; the first `m * d.div_ceil(2)` values are written) gets `m` rows of
/// `silu(a W_gate) * (a W_up)` rounded to bf16 pairs (column `2i` in the low half, an odd `d`
/// padded with zero), where `a_pairs` holds `m` input rows rounded by `bf16::round_rows`
/// (`gate.k_pairs()` u32 each) and `gate`, `up` are `[k, d]`. With `split` each row is three
/// such segments instead, `[hi | hi | lo]` as `bf16::split_rows` writes them (three times as
/// many values): the operand of a split down product. Every output is computed by one tile
/// in a fixed order (`bf16::for_each_tile`): the result does not depend on the thread count.
/// Panics unless `bf16::available()`.
pub(crate) fn swiglu_pairs(
    m: usize,
    a_pairs: &[u32],
    gate: &PackedBf16,
    up: &PackedBf16,
    split: bool,
    out: &mut AlignedVec<u32>,
) {
    swiglu_pairs_on(Bf16Path::best_on_pairs(), m, a_pairs, gate, up, split, out)
}

/// `swiglu_pairs` on `path` (`Amx` or `Avx512Bf16`; forced by the tests).
fn swiglu_pairs_on(
    path: Bf16Path,
    m: usize,
    a_pairs: &[u32],
    gate: &PackedBf16,
    up: &PackedBf16,
    split: bool,
    out: &mut AlignedVec<u32>,
) {
    assert!(bf16::available(), "bf16 products need AVX512-BF16");
    assert!(
        path != Bf16Path::Widen && path.runs_here(),
        "{path:?} does not run here"
    );
    let (k, d) = gate.shape();
    assert_eq!(up.shape(), (k, d), "gate and up weights differ in shape");
    let kp = gate.k_pairs();
    assert!(a_pairs.len() >= m * kp);
    // Pairs per segment, and per output row.
    let seg_pairs = d.div_ceil(2);
    let out_row = if split { 3 } else { 1 } * seg_pairs;
    // Where a split row's second and third segments start, in bf16 values (0: no split).
    let seg = if split { 2 * seg_pairs } else { 0 };
    if out.len() < m * out_row {
        out.resize(m * out_row);
    }
    if m == 0 || d == 0 {
        return;
    }
    let panels = d.div_ceil(PANEL_COLS);
    // Written as bf16 values: on little-endian x86_64 value `2i` of a row is pair i's low half.
    let out_ptr = SharedMut(out.as_mut_ptr() as *mut u16);
    let tile_rows = if path == Bf16Path::Amx {
        amx::ROWS
    } else {
        TILE_ROWS
    };
    // A tile reads a panel of each of the two weights.
    let panel_bytes = 2 * kp * PANEL_COLS * 4;
    bf16::for_each_tile(m, panels, tile_rows, panel_bytes, |r, rows, ps| {
        let a = &a_pairs[r * kp..][..rows * kp];
        let cols = |p: usize| PANEL_COLS.min(d - p * PANEL_COLS);
        // SAFETY (both branches): `available()` was checked above; this tile alone writes
        // rows r..r+rows, values p*PANEL_COLS..p*PANEL_COLS+cols(p) of `out` for p in `ps`,
        // whose rows hold 2 * out_row >= d values.
        let dst = |p: usize| unsafe { out_ptr.get().add(r * 2 * out_row + p * PANEL_COLS) };
        if path == Bf16Path::Amx {
            let n = ps.len();
            amx::with_sums(2 * n, |sums| {
                // Panel i of gate into sums 2i, of up into 2i + 1.
                let target = |i: usize| {
                    let p = ps.start + i / 2;
                    amx::Target {
                        panel: if i.is_multiple_of(2) {
                            gate.panel(p)
                        } else {
                            up.panel(p)
                        },
                        cols: cols(p),
                        out: sums[i].as_mut_ptr(),
                        out_rs: PANEL_COLS,
                    }
                };
                unsafe { amx::chunked_sums(amx::Tiles::Hardware, rows, a, kp, 2 * n, target) };
                for (gu, p) in sums.chunks_exact(2).zip(ps.clone()) {
                    let (g, u) = (gu[0].as_ptr(), gu[1].as_ptr());
                    unsafe { gate_sums(rows, g, u, dst(p), 2 * out_row, cols(p), seg) };
                }
            });
            return;
        }
        for p in ps {
            unsafe {
                tile_any(
                    rows,
                    a,
                    kp,
                    gate.panel(p),
                    up.panel(p),
                    dst(p),
                    2 * out_row,
                    cols(p),
                    seg,
                )
            };
        }
    });
    if d % 2 == 1 {
        // Nothing wrote the pad half of each segment's last pair.
        out[..m * out_row]
            .par_chunks_mut(seg_pairs)
            .for_each(|segment| segment[seg_pairs - 1] &= 0xffff);
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn tile_any(
    rows: usize,
    a: &[u32],
    kp: usize,
    g: &[u32],
    u: &[u32],
    dst: *mut u16,
    dst_rs: usize,
    cols: usize,
    seg: usize,
) {
    match rows {
        1 => tile::<1>(a, kp, g, u, dst, dst_rs, cols, seg),
        2 => tile::<2>(a, kp, g, u, dst, dst_rs, cols, seg),
        3 => tile::<3>(a, kp, g, u, dst, dst_rs, cols, seg),
        TILE_ROWS => tile::<TILE_ROWS>(a, kp, g, u, dst, dst_rs, cols, seg),
        _ => unreachable!("tile rows are 1..=TILE_ROWS"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_any(
    _rows: usize,
    _a: &[u32],
    _kp: usize,
    _g: &[u32],
    _u: &[u32],
    _dst: *mut u16,
    _dst_rs: usize,
    _cols: usize,
    _seg: usize,
) {
    unreachable!("bf16 products are x86_64 only");
}

/// `R` rows of rounded inputs (`kp` pairs each) against one gate panel and the up panel of
/// the same columns; the first `cols` gated values of each row go to `dst` (row stride
/// `dst_rs` bf16 values) as bf16 (`store_gated`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn tile<const R: usize>(
    a: &[u32],
    kp: usize,
    g: &[u32],
    u: &[u32],
    dst: *mut u16,
    dst_rs: usize,
    cols: usize,
    seg: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= R * kp && g.len() >= kp * PANEL_COLS && u.len() >= kp * PANEL_COLS);
    let mut acc = [[_mm512_setzero_ps(); 6]; R];
    let (a, g, u) = (a.as_ptr(), g.as_ptr(), u.as_ptr());
    for j in 0..kp {
        let gj = g.add(j * PANEL_COLS) as *const __m512i;
        let uj = u.add(j * PANEL_COLS) as *const __m512i;
        macro_rules! load {
            ($p:expr) => {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512($p))
            };
        }
        let b = [
            load!(gj),
            load!(gj.add(1)),
            load!(gj.add(2)),
            load!(uj),
            load!(uj.add(1)),
            load!(uj.add(2)),
        ];
        for (r, acc) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * kp + j) as i32));
            for (acc, &b) in acc.iter_mut().zip(&b) {
                *acc = _mm512_dpbf16_ps(*acc, av, b);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for z in 0..3 {
            let c0 = z * 16;
            if c0 >= cols {
                break;
            }
            let mask = sae_core::bf16::lane_mask(cols - c0);
            let gated = silu_times(acc[z], acc[3 + z]);
            store_gated(gated, dst.add(r * dst_rs + c0), mask, seg);
        }
    }
}

/// The AMX sums of the first `rows` rows and `cols` columns (row stride `PANEL_COLS`, as
/// `amx::chunked_sums` wrote them) gated as `tile` gates its registers, and written the
/// same way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn gate_sums(
    rows: usize,
    g: *const f32,
    u: *const f32,
    dst: *mut u16,
    dst_rs: usize,
    cols: usize,
    seg: usize,
) {
    use std::arch::x86_64::*;
    for r in 0..rows {
        for c0 in (0..cols).step_by(16) {
            let mask = sae_core::bf16::lane_mask(cols - c0);
            let gv = _mm512_loadu_ps(g.add(r * PANEL_COLS + c0));
            let uv = _mm512_loadu_ps(u.add(r * PANEL_COLS + c0));
            store_gated(silu_times(gv, uv), dst.add(r * dst_rs + c0), mask, seg);
        }
    }
}

/// The `mask` lanes of `v` rounded to bf16 at `dst`; with `seg` > 0 (a split row) also at
/// `dst + seg`, and what the rounding left, rounded again, at `dst + 2 * seg`: the values
/// `bf16::split_rows` writes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn store_gated(v: std::arch::x86_64::__m512, dst: *mut u16, mask: u16, seg: usize) {
    use std::arch::x86_64::*;
    let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
    _mm256_mask_storeu_epi16(dst as *mut i16, mask, hi);
    if seg > 0 {
        let widened = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)));
        let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_sub_ps(v, widened)));
        _mm256_mask_storeu_epi16(dst.add(seg) as *mut i16, mask, hi);
        _mm256_mask_storeu_epi16(dst.add(2 * seg) as *mut i16, mask, lo);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gate_sums(
    _rows: usize,
    _g: *const f32,
    _u: *const f32,
    _dst: *mut u16,
    _dst_rs: usize,
    _cols: usize,
    _seg: usize,
) {
    unreachable!("bf16 products are x86_64 only");
}

/// `g / (1 + e^-g) * u`, 16 lanes, with `kernels::exp`'s operations in its order (a multiply
/// then an add, never fused), so each lane has the bits of the scalar code.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn silu_times(
    g: std::arch::x86_64::__m512,
    u: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let set = _mm512_set1_ps;
    let (add, sub, mul) = (_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps);
    let sign = _mm512_set1_epi32(i32::MIN);
    let x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), sign));
    // `clamp`: NaN lanes differ from the scalar code here, but g NaN gives NaN either way.
    let x = _mm512_min_ps(_mm512_max_ps(x, set(-87.3)), set(88.3));
    let round = set(12_582_912.0);
    let n = sub(add(mul(x, set(std::f32::consts::LOG2_E)), round), round);
    let r = sub(
        sub(x, mul(n, set(0.693_359_4))),
        mul(n, set(-2.121_944_4e-4)),
    );
    let mut p = set(1.987_569_2e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = add(mul(p, r), set(c));
    }
    let er = add(add(mul(mul(p, r), r), r), set(1.0));
    let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvttps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    let e = mul(er, _mm512_castsi512_ps(two_n));
    mul(_mm512_div_ps(g, add(set(1.0), e)), u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::silu_gate_in_place;

    /// Values that reach every part of the SiLU: large negative and positive gates (the
    /// clamp), exact zeros, and the column and row remainders of the tiles.
    fn operands(m: usize, k: usize, d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let a = (0..m * k)
            .map(|i| match i % 11 {
                0 => 0.0,
                _ => ((i * 37 % 101) as f32 - 50.0) / 9.0,
            })
            .collect();
        let gate = (0..k * d)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 4.0)
            .collect();
        let up = (0..k * d)
            .map(|i| ((i * 29 % 89) as f32 - 44.0) / 30.0)
            .collect();
        (a, gate, up)
    }

    #[test]
    fn fused_swiglu_equals_product_then_silu_then_rounding() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let paths: Vec<Bf16Path> = Bf16Path::all_available()
            .into_iter()
            .filter(|&p| p != Bf16Path::Widen)
            .collect();
        eprintln!("paths: {paths:?}");
        let mut clamped = 0;
        for path in paths {
            for (m, k, d) in [
                (1, 2, 1),
                (7, 9, 17),
                (70, 33, 96),
                (130, 64, 101),
                (40, 600, 60),
            ] {
                for split in [false, true] {
                    let (a, gate, up) = operands(m, k, d);
                    let mut pairs = AlignedVec::default();
                    let pack = |w: &[f32], n: usize| match split {
                        true => PackedBf16::pack_split(w, k, n),
                        false => PackedBf16::pack(w, k, n),
                    };
                    match split {
                        true => bf16::split_rows(m, &a, k, k, &mut pairs),
                        false => bf16::round_rows(m, &a, k, k, &mut pairs),
                    }
                    let (pg, pu) = (pack(&gate, d), pack(&up, d));
                    // Stale values everywhere, so an unwritten pad would show.
                    let mut fused = AlignedVec::zeroed(m * d.div_ceil(2) / 2);
                    fused.fill(u32::MAX);
                    swiglu_pairs_on(path, m, &pairs, &pg, &pu, split, &mut fused);

                    let gate_up: Vec<f32> = (0..k)
                        .flat_map(|i| gate[i * d..][..d].iter().chain(&up[i * d..][..d]).copied())
                        .collect();
                    let packed = pack(&gate_up, 2 * d);
                    let mut out = vec![0f32; m * 2 * d];
                    bf16::matmul_on(
                        path,
                        m,
                        &a,
                        k,
                        &packed,
                        &mut out,
                        2 * d,
                        false,
                        &mut AlignedVec::default(),
                    );
                    clamped += out
                        .chunks(2 * d)
                        .flat_map(|r| &r[..d])
                        .filter(|v| v.abs() > 87.3)
                        .count();
                    silu_gate_in_place(&mut out, d);
                    let mut want = AlignedVec::default();
                    match split {
                        true => bf16::split_rows(m, &out, 2 * d, d, &mut want),
                        false => bf16::round_rows(m, &out, 2 * d, d, &mut want),
                    }
                    let row = d.div_ceil(2) * if split { 3 } else { 1 };
                    assert_eq!(
                        fused[..m * row],
                        want[..m * row],
                        "{path:?} {m}x{k}x{d} split {split}"
                    );
                }
            }
        }
        assert!(clamped > 0, "no gate reaches the clamp");
    }
}
