//! bf16 matrix products with f32 sums, for the LM forward (`--dtype bf16`) and the SAE
//! encoder product (`--precision bf16`). Weights are rounded to bf16 and packed once per use
//! (per load, or per training step); activations are rounded per product; sums stay f32.
//!
//! Three paths, picked at run time (`Bf16Path::best`) or forced (`matmul_on`, for tests):
//! * `Amx`: Intel's tiles (`crate::amx`), 16 x 16 sums of 32 products per instruction, on the
//!   same operands as `Avx512Bf16`. Its sums are rounded in an order of the hardware's own,
//!   so its bits differ from the other two paths (within the same bounds; deterministic).
//! * `Avx512Bf16`: `vdpbf16ps`, 32 bf16 multiply-adds into 16 f32 sums per instruction.
//! * `Widen`: the same packed operands widened to f32 (a shift) and summed in the same order:
//!   an AVX2 register tile where the CPU has AVX2, else a plain loop with the same bits. It
//!   runs on every CPU and gives the `vdpbf16ps` bits (bf16 products are exact in f32, so
//!   each step is one rounding either way; `paths_agree_bit_for_bit` checks it), so a bf16
//!   run is reproducible across the two kinds of machine. It does the f32 product's
//!   arithmetic, so it is no faster than f32 `gemm`; what it saves is the bytes of the
//!   packed weights.
//!
//! Rounding is to nearest even with subnormals flushed to zero (`to_bf16`), which is what
//! the AVX512-BF16 conversions and `vdpbf16ps` do; NaN stays NaN.

#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

use crate::aligned::AlignedVec;
use crate::kernels::{cpu_has, SharedMut};

/// Output columns per packed panel: three 16-lane registers.
const NR: usize = 48;
/// `NR`, for kernels elsewhere that read `PackedBf16::panel`.
pub const PANEL_COLS: usize = NR;
/// Rows per register tile (8 x 3 accumulators of the 32 registers).
const MR: usize = 8;
/// Rows per rayon task.
const ROW_BLOCK: usize = 64;
/// Weights one thread sweeps over all its row blocks before moving on (`for_each_tile`): a
/// good part of a 2 MB L2, leaving room for the activation rows and the sums. On the AMX
/// Xeon blocks of 221, 442 and 884 KB ran 4096-column products at 1.49, 1.65 and 1.65
/// TFLOP/s per core, against 1.15 for all 1.8 MB at once.
const PANEL_BLOCK_BYTES: usize = 768 << 10;
/// Weights up to this size are swept whole: cutting a 1.1 MB q|k|v into two blocks cost it
/// a tenth of its speed, as each block reads the activation rows again.
const WHOLE_WEIGHT_BYTES: usize = 1280 << 10;
/// Rows per register tile of the AVX2 widened kernel: 4 rows x 16 columns is 8 accumulators,
/// with 4 registers of widened weights and 2 of broadcast activations (of 16).
const WIDE_ROWS: usize = 4;
/// Columns per register tile of the AVX2 widened kernel (two 8-lane registers).
const WIDE_COLS: usize = 16;

/// How a bf16 product is computed (see the module notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Path {
    Amx,
    Avx512Bf16,
    Widen,
}

impl Bf16Path {
    /// The fastest path this CPU runs.
    pub fn best() -> Self {
        if crate::amx::available() {
            Bf16Path::Amx
        } else if available() {
            Bf16Path::Avx512Bf16
        } else {
            Bf16Path::Widen
        }
    }

    /// The fastest path that takes rows rounded to bf16 pairs (`round_rows`): not `Widen`.
    /// Panics unless `available()`.
    pub fn best_on_pairs() -> Self {
        assert!(available(), "bf16 products need AVX512-BF16");
        match Self::best() {
            Bf16Path::Widen => unreachable!("AVX512-BF16 is there"),
            p => p,
        }
    }

    /// Every path this CPU runs, fastest first.
    pub fn all_available() -> Vec<Self> {
        [Bf16Path::Amx, Bf16Path::Avx512Bf16, Bf16Path::Widen]
            .into_iter()
            .filter(|p| p.runs_here())
            .collect()
    }

    pub fn runs_here(self) -> bool {
        match self {
            Bf16Path::Amx => crate::amx::available(),
            Bf16Path::Avx512Bf16 => available(),
            Bf16Path::Widen => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bf16Path::Amx => "amx-bf16",
            Bf16Path::Avx512Bf16 => "avx512-bf16",
            Bf16Path::Widen => "widened to f32",
        }
    }
}

/// Whether this CPU has AVX512-BF16 (`vdpbf16ps`), the fast path.
pub fn available() -> bool {
    cpu_has!("avx512f", "avx512bf16")
}

/// Whether split (three-term) products run here but without AMX tiles, where they are
/// several times slower than f32 (`vdpbf16ps` at a third of the rate per term).
pub fn split_is_slow_here() -> bool {
    available() && !crate::amx::available()
}

/// What to tell a user who chose `{option} bf16x3` for `products` on a CPU where the three
/// terms are slower than f32 (none elsewhere).
pub fn split_slow_note(option: &str, products: &str) -> Option<String> {
    split_is_slow_here().then(|| {
        format!(
            "note: {option} bf16x3: this CPU has no AMX tiles, so {products} runs as three \
             AVX512-BF16 products, likely slower than {option} f32"
        )
    })
}

/// `v` rounded to bf16 bits: nearest, ties to even; subnormals flushed to (signed) zero as
/// the AVX512-BF16 instructions do, so that both paths see the same operands.
#[inline(always)]
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Two bf16 values in one u32, the first in the low half (the order `vdpbf16ps` pairs them).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// A `[k, n]` weight matrix rounded to bf16, packed as panels of `NR` columns; within a panel,
/// one row of `NR` u32 per pair of consecutive k (zero-padded past `k` and `n`). Or, made by
/// `pack_split`, the three-term stack of such a matrix.
pub struct PackedBf16 {
    n: usize,
    k_pairs: usize,
    /// Inner dimension of the matrix this was made from (of the operand rows).
    src_k: usize,
    /// Packed by `pack_split`: `matmul` splits its rows to match.
    split: bool,
    data: AlignedVec<u32>,
}

impl PackedBf16 {
    /// `w` is `[k, n]` row-major f32.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n);
        let mut p = Self::empty(k, n);
        p.data
            .par_chunks_mut(p.k_pairs * NR)
            .enumerate()
            .for_each(|(panel_i, panel)| {
                for (kp, row) in panel.chunks_exact_mut(NR).enumerate() {
                    for (c, v) in row.iter_mut().enumerate() {
                        let col = panel_i * NR + c;
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
        p
    }

    /// `w` (`[k, n]` row-major f32) for a three-term product with rows from `split_rows`:
    /// stacked along k as `[w_hi; w_lo; w_hi]`, each segment `k.div_ceil(2)` pairs long, where
    /// `w_hi` is `w` rounded to bf16 and `w_lo` what that rounding left, rounded again. Against
    /// rows `[a_hi | a_hi | a_lo]` one bf16 product then sums `a_hi w_hi + a_hi w_lo +
    /// a_lo w_hi`: each term's operands carry about 16 of f32's 24 significant bits.
    pub fn pack_split(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n);
        let seg = 2 * k.div_ceil(2);
        let mut stacked = vec![0.0f32; 3 * seg * n];
        let (hi, rest) = stacked.split_at_mut(seg * n);
        let (lo, hi2) = rest.split_at_mut(seg * n);
        for (i, &v) in w.iter().enumerate() {
            let (h, l) = split_value(v);
            hi[i] = h;
            hi2[i] = h;
            lo[i] = l;
        }
        Self {
            src_k: k,
            split: true,
            ..Self::pack(&stacked, 3 * seg, n)
        }
    }

    /// `pack_split` of the matrix whose transpose is `w_t` (`[n, k]` row-major).
    pub fn pack_split_transposed(w_t: &[f32], k: usize, n: usize) -> Self {
        let kp = k.div_ceil(2);
        let mut p = Self {
            src_k: k,
            split: true,
            ..Self::empty(6 * kp, n)
        };
        p.repack_transposed(w_t);
        p
    }

    /// Whether this was packed for three-term products (`pack_split`).
    pub fn is_split(&self) -> bool {
        self.split
    }

    /// `w_t` is the transpose, `[n, k]` row-major (the trainer's encoder layout).
    pub fn pack_transposed(w_t: &[f32], k: usize, n: usize) -> Self {
        let mut p = Self::empty(k, n);
        p.repack_transposed(w_t);
        p
    }

    /// Packs `w_t` (`[n, k]`, the shape this was made for) into the existing buffer, split
    /// into three terms if this is a split matrix (per column the pairs of its hi parts, of
    /// its lo parts and of its hi parts again: `pack_split`'s stack).
    pub fn repack_transposed(&mut self, w_t: &[f32]) {
        let (k, n, split) = (self.src_k, self.n, self.split);
        let seg = k.div_ceil(2);
        assert_eq!(w_t.len(), k * n);
        if !split {
            return self.repack_rows(w_t, available());
        }
        self.data
            .par_chunks_mut(self.k_pairs * NR)
            .enumerate()
            .for_each(|(panel_i, panel)| {
                for c in 0..NR {
                    let col = panel_i * NR + c;
                    if col >= n {
                        break;
                    }
                    let mut put = |j: usize, a: f32, b: f32| {
                        if split {
                            let ((h0, l0), (h1, l1)) = (split_value(a), split_value(b));
                            panel[j * NR + c] = pair(h0, h1);
                            panel[(seg + j) * NR + c] = pair(l0, l1);
                            panel[(2 * seg + j) * NR + c] = pair(h0, h1);
                        } else {
                            panel[j * NR + c] = pair(a, b);
                        }
                    };
                    let src = &w_t[col * k..][..k];
                    let mut pairs = src.chunks_exact(2);
                    for (j, two) in (&mut pairs).enumerate() {
                        put(j, two[0], two[1]);
                    }
                    if let [last] = pairs.remainder() {
                        put(seg - 1, *last, 0.0);
                    }
                }
            });
    }

    /// `repack_transposed` of a plain matrix: per panel, each column's source row rounded
    /// to pairs in one vector pass (as activation rows are), then moved into the panel's
    /// layout. Rounding value by value into the panel's strided places took a fifth of a
    /// screened step's product at d_sae 4608. `vector`: round with AVX512-BF16 (which
    /// `available()` must allow).
    fn repack_rows(&mut self, w_t: &[f32], vector: bool) {
        let (k, n, kp) = (self.src_k, self.n, self.k_pairs);
        assert!(!vector || available());
        thread_local! {
            /// One panel's rounded rows, kept between steps.
            static ROUNDED: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        self.data
            .par_chunks_mut(kp * NR)
            .enumerate()
            .for_each(|(panel_i, panel)| {
                ROUNDED.with_borrow_mut(|rounded| {
                    let cols = NR.min(n - panel_i * NR);
                    rounded.resize(cols * kp, 0);
                    for (c, dst) in rounded.chunks_exact_mut(kp).enumerate() {
                        let src = &w_t[(panel_i * NR + c) * k..][..k];
                        if vector {
                            // SAFETY: asserted above; `available()` includes AVX512-BF16.
                            unsafe { round_row(src, dst) }
                        } else {
                            round_row_portable(src, dst)
                        }
                    }
                    for (j, out) in panel.chunks_exact_mut(NR).enumerate() {
                        for (c, v) in out[..cols].iter_mut().enumerate() {
                            *v = rounded[c * kp + j];
                        }
                    }
                })
            });
    }

    fn empty(k: usize, n: usize) -> Self {
        let k_pairs = k.div_ceil(2);
        Self {
            n,
            k_pairs,
            src_k: k,
            split: false,
            data: AlignedVec::zeroed(n.div_ceil(NR) * k_pairs * NR),
        }
    }

    /// Inner dimension (of the rows it multiplies) and output columns.
    pub fn shape(&self) -> (usize, usize) {
        (self.src_k, self.n)
    }

    /// Pairs of k per panel row (`k.div_ceil(2)`; three times the source's for a split
    /// matrix), the length of an operand row for `matmul_pairs`.
    pub fn k_pairs(&self) -> usize {
        self.k_pairs
    }

    /// Panel `p`: columns `p * PANEL_COLS ..`, one row of `PANEL_COLS` u32 (a bf16 pair each:
    /// k even in the low half) per pair of k.
    pub fn panel(&self, p: usize) -> &[u32] {
        &self.data[p * self.k_pairs * NR..][..self.k_pairs * NR]
    }
}

/// `matmul_on` with the fastest path this CPU runs.
pub fn matmul(
    m: usize,
    a: &[f32],
    a_rs: usize,
    w: &PackedBf16,
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
    a_pairs: &mut AlignedVec<u32>,
) {
    matmul_on(
        Bf16Path::best(),
        m,
        a,
        a_rs,
        w,
        out,
        out_rs,
        accumulate,
        a_pairs,
    )
}

/// `out[r, j] (+)= sum_i a[r, i] * w[i, j]` for `m` rows, with `a` (row stride `a_rs`, first
/// `w.shape().0` columns used) rounded to bf16, or split into three terms for a split `w`
/// (`PackedBf16::pack_split`). `a_pairs` is scratch for the rounded rows. Every
/// output element is summed by one task in a fixed order: the result does not depend on the
/// thread count. Panics unless `path.runs_here()`.
pub fn matmul_on(
    path: Bf16Path,
    m: usize,
    a: &[f32],
    a_rs: usize,
    w: &PackedBf16,
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
    a_pairs: &mut AlignedVec<u32>,
) {
    matmul_impl(path, false, m, a, a_rs, w, out, out_rs, accumulate, a_pairs)
}

/// `matmul_on`; `portable` runs the plain code where a path has it, for the tests that
/// compare the two: the widened path without its AVX2 kernel, and the AMX path on emulated
/// tiles (`amx::Tiles::Emulated`, with the rows rounded and the staged sums written by plain
/// code), which runs on any CPU.
fn matmul_impl(
    path: Bf16Path,
    portable: bool,
    m: usize,
    a: &[f32],
    a_rs: usize,
    w: &PackedBf16,
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
    a_pairs: &mut AlignedVec<u32>,
) {
    assert!(
        path.runs_here() || (portable && path == Bf16Path::Amx),
        "bf16 path {} does not run on this CPU",
        path.name()
    );
    if m == 0 || w.n == 0 {
        return;
    }
    let a_row = round_rows_on(path, portable, w.split, m, a, a_rs, w.src_k, a_pairs);
    product_on(
        path,
        portable,
        m,
        &a_pairs[..m * a_row],
        a_row,
        w,
        out,
        out_rs,
        accumulate,
    );
}

/// Rows of `a` (row stride `a_rs`, first `k` columns) rounded to bf16 for `path` into the
/// first `m * row` values of `a_pairs`; returns `row`. `vdpbf16ps` takes them as bf16 pairs
/// (`k.div_ceil(2)` per row); the widened path takes them already widened, as the f32 bits
/// of each rounded value (two u32 per pair). With `split` (for a `PackedBf16::pack_split`
/// matrix) each row is three such segments, `[hi | hi | lo]`: hi the row rounded to bf16, lo
/// what that left, rounded again. Every value of those rows is written; `plain` rounds the
/// pairs with plain code (the same bits).
#[allow(clippy::too_many_arguments)]
fn round_rows_on(
    path: Bf16Path,
    plain: bool,
    split: bool,
    m: usize,
    a: &[f32],
    a_rs: usize,
    k: usize,
    a_pairs: &mut AlignedVec<u32>,
) -> usize {
    let kp = k.div_ceil(2);
    assert!(m == 0 || (k <= a_rs && a.len() >= (m - 1) * a_rs + k));
    let segment = match path {
        Bf16Path::Amx | Bf16Path::Avx512Bf16 => kp,
        Bf16Path::Widen => 2 * kp,
    };
    let a_row = if split { 3 * segment } else { segment };
    if a_pairs.len() < m * a_row {
        a_pairs.resize(m * a_row);
    }
    a_pairs[..m * a_row]
        .par_chunks_mut(a_row * ROW_BLOCK)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (i, dst) in rows.chunks_exact_mut(a_row).enumerate() {
                let src = &a[(blk * ROW_BLOCK + i) * a_rs..][..k];
                let vector = matches!(path, Bf16Path::Amx | Bf16Path::Avx512Bf16);
                match (vector, split) {
                    (true, false) if plain => round_row_portable(src, dst),
                    (true, true) if plain => {
                        let (hi, rest) = dst.split_at_mut(segment);
                        let (hi2, lo) = rest.split_at_mut(segment);
                        split_row_portable(src, hi, hi2, lo)
                    }
                    // SAFETY (both): the callers checked `path.runs_here()`, which for both
                    // vector paths includes AVX512-BF16.
                    (true, false) => unsafe { round_row(src, dst) },
                    (true, true) => unsafe { split_row(src, dst) },
                    (false, false) => round_row_widened(src, dst),
                    (false, true) => split_row_widened(src, dst),
                }
            }
        });
    a_row
}

/// Rows of `a` (row stride `a_rs`, first `k` columns) rounded to bf16 pairs, `k.div_ceil(2)`
/// u32 per row (k even in the low half, zero-padded), into the first values of `pairs`: the
/// operand of `matmul_pairs`. Panics unless `available()`.
pub fn round_rows(m: usize, a: &[f32], a_rs: usize, k: usize, pairs: &mut AlignedVec<u32>) {
    assert!(available(), "bf16 rounding needs AVX512-BF16");
    round_rows_on(Bf16Path::Avx512Bf16, false, false, m, a, a_rs, k, pairs);
}

/// One row `src` rounded to bf16 pairs into `dst` (`src.len().div_ceil(2)` u32, as
/// `round_rows` writes each row). Panics unless `available()`.
pub fn round_row_pairs(src: &[f32], dst: &mut [u32]) {
    assert!(available(), "bf16 rounding needs AVX512-BF16");
    assert_eq!(dst.len(), src.len().div_ceil(2));
    // SAFETY: AVX512-BF16 checked just above.
    unsafe { round_row(src, dst) }
}

/// `round_rows` for a split matrix (`PackedBf16::pack_split`): each row as three segments of
/// `k.div_ceil(2)` pairs, `[hi | hi | lo]`, the operand of `matmul_pairs` with that matrix.
/// Panics unless `available()`.
pub fn split_rows(m: usize, a: &[f32], a_rs: usize, k: usize, pairs: &mut AlignedVec<u32>) {
    assert!(available(), "bf16 rounding needs AVX512-BF16");
    round_rows_on(Bf16Path::Avx512Bf16, false, true, m, a, a_rs, k, pairs);
}

/// One row `src` split into `dst` (`3 * src.len().div_ceil(2)` u32, as `split_rows` writes
/// each row). Panics unless `available()`.
pub fn split_row_pairs(src: &[f32], dst: &mut [u32]) {
    assert!(available(), "bf16 rounding needs AVX512-BF16");
    assert_eq!(dst.len(), 3 * src.len().div_ceil(2));
    // SAFETY: AVX512-BF16 checked just above.
    unsafe { split_row(src, dst) }
}

/// `v` as a bf16 value and what that rounding left, as f32: the two parts of a split operand.
#[inline(always)]
fn split_value(v: f32) -> (f32, f32) {
    let h = from_bf16(to_bf16(v));
    (h, v - h)
}

/// `round_rows_on`'s split row for the widened path: `[hi | hi | lo]`, each segment the f32
/// bits of `src.len()` values, zero-padded to whole pairs.
fn split_row_widened(src: &[f32], dst: &mut [u32]) {
    let seg = dst.len() / 3;
    let (hi, rest) = dst.split_at_mut(seg);
    let (hi2, lo) = rest.split_at_mut(seg);
    for (j, &v) in src.iter().enumerate() {
        // Rounding a bf16 value again changes nothing, as the other paths' operands are
        // rounded once.
        let (h, l) = split_value(v);
        hi[j] = h.to_bits();
        lo[j] = from_bf16(to_bf16(l)).to_bits();
    }
    hi[src.len()..].fill(0);
    lo[src.len()..].fill(0);
    hi2.copy_from_slice(hi);
}

/// `round_rows_on`'s split row as bf16 pairs, plain code: the same bits as `split_row`.
fn split_row_portable(src: &[f32], hi: &mut [u32], hi2: &mut [u32], lo: &mut [u32]) {
    let part = |i: usize| split_value(src.get(i).copied().unwrap_or(0.0));
    for j in 0..hi.len() {
        let ((h0, l0), (h1, l1)) = (part(2 * j), part(2 * j + 1));
        hi[j] = pair(h0, h1);
        hi2[j] = hi[j];
        lo[j] = pair(l0, l1);
    }
}

/// One split row of `round_rows_on` as bf16 pairs (`dst.len() == 3 * src.len().div_ceil(2)`), 32
/// values per step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn split_row(src: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let kp = src.len().div_ceil(2);
    debug_assert_eq!(dst.len(), 3 * kp);
    let (hi, rest) = dst.split_at_mut(kp);
    let (hi2, lo) = rest.split_at_mut(kp);
    let widen = |h: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    let whole = src.len() / 32;
    for i in 0..whole {
        let s = src.as_ptr().add(32 * i);
        let (a, b) = (_mm512_loadu_ps(s), _mm512_loadu_ps(s.add(16)));
        let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
        let (ha, hb) = (
            widen(_mm512_castsi512_si256(h)),
            widen(_mm512_extracti64x4_epi64(h, 1)),
        );
        let l: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
            _mm512_sub_ps(b, hb),
            _mm512_sub_ps(a, ha),
        ));
        _mm512_storeu_si512(hi.as_mut_ptr().add(16 * i) as *mut __m512i, h);
        _mm512_storeu_si512(hi2.as_mut_ptr().add(16 * i) as *mut __m512i, h);
        _mm512_storeu_si512(lo.as_mut_ptr().add(16 * i) as *mut __m512i, l);
    }
    split_row_portable(
        &src[32 * whole..],
        &mut hi[16 * whole..],
        &mut hi2[16 * whole..],
        &mut lo[16 * whole..],
    );
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn split_row(_src: &[f32], _dst: &mut [u32]) {
    unreachable!("the AVX512-BF16 path is x86_64 only");
}

/// `matmul` on rows already rounded by `round_rows` (`w.k_pairs()` u32 each): for products
/// whose input is made in bf16 (a fused SwiGLU, say). Panics unless `available()`.
pub fn matmul_pairs(
    m: usize,
    a_pairs: &[u32],
    w: &PackedBf16,
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
) {
    assert!(available(), "bf16 products need AVX512-BF16");
    if m == 0 || w.n == 0 {
        return;
    }
    assert!(a_pairs.len() >= m * w.k_pairs);
    let a_pairs = &a_pairs[..m * w.k_pairs];
    product_on(
        Bf16Path::best_on_pairs(),
        false,
        m,
        a_pairs,
        w.k_pairs,
        w,
        out,
        out_rs,
        accumulate,
    );
}

/// The product over rounded rows (`a_row` u32 each, as `round_rows_on` wrote them).
fn product_on(
    path: Bf16Path,
    portable: bool,
    m: usize,
    a_pairs: &[u32],
    a_row: usize,
    w: &PackedBf16,
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
) {
    let kp = w.k_pairs;
    assert!(w.n <= out_rs && out.len() >= (m - 1) * out_rs + w.n);
    assert_eq!(a_pairs.len(), m * a_row);
    let wide_avx2 = !portable && path == Bf16Path::Widen && cpu_has!("avx2");
    let panels = w.n.div_ceil(NR);
    let out_ptr = SharedMut(out.as_mut_ptr());
    let tile_rows = if path == Bf16Path::Amx {
        crate::amx::ROWS
    } else {
        MR
    };
    let panel_bytes = kp * NR * 4;
    for_each_tile(m, panels, tile_rows, panel_bytes, |r, rows, ps| {
        let a_tile = &a_pairs[r * a_row..][..rows * a_row];
        let cols = |p: usize| NR.min(w.n - p * NR);
        let panel = |p: usize| &w.data[p * kp * NR..][..kp * NR];
        // SAFETY (both branches): `runs_here()` was checked (and AVX2 for `wide_avx2`); this
        // tile alone writes rows r..r+rows, columns p*NR..p*NR+cols(p) of `out` for p in `ps`,
        // inside it by the asserts above.
        let dst = |p: usize| unsafe { out_ptr.get().add(r * out_rs + p * NR) };
        if path == Bf16Path::Amx {
            // A whole panel's sums go straight to `out`, whose rows hold its NR columns; the
            // others through `sums`, then `write_sums`. Only the matrix's last panel can be
            // partial, so those are the last of `ps` (all of them when adding onto `out`).
            let direct = |p: usize| cols(p) == NR && !accumulate;
            let staged = ps.clone().find(|&p| !direct(p)).unwrap_or(ps.end);
            crate::amx::with_sums(ps.end - staged, |sums| {
                let target = |i: usize| {
                    let p = ps.start + i;
                    let (out, out_rs) = match p.checked_sub(staged) {
                        Some(j) => (sums[j].as_mut_ptr(), PANEL_COLS),
                        None => (dst(p), out_rs),
                    };
                    crate::amx::Target {
                        panel: panel(p),
                        cols: cols(p),
                        out,
                        out_rs,
                    }
                };
                let tiles = match portable {
                    true => crate::amx::Tiles::Emulated,
                    false => crate::amx::Tiles::Hardware,
                };
                unsafe { crate::amx::chunked_sums(tiles, rows, a_tile, kp, ps.len(), target) };
                for (p, sums) in (staged..ps.end).zip(sums.iter()) {
                    let (sums, to) = (sums.as_ptr(), (dst(p), out_rs));
                    unsafe { write_sums(portable, rows, sums, to, cols(p), accumulate) }
                }
            });
            return;
        }
        for p in ps {
            let (cols, panel, dst) = (cols(p), panel(p), dst(p));
            unsafe {
                match path {
                    Bf16Path::Amx => unreachable!("handled above"),
                    Bf16Path::Avx512Bf16 => {
                        tile_any(rows, a_tile, kp, panel, dst, out_rs, cols, accumulate)
                    }
                    Bf16Path::Widen if wide_avx2 => {
                        tile_widen_avx2(rows, a_tile, kp, panel, dst, out_rs, cols, accumulate)
                    }
                    Bf16Path::Widen => {
                        tile_widen(rows, a_tile, kp, panel, dst, out_rs, cols, accumulate)
                    }
                }
            }
        }
    });
}

/// The output tiles of a product over `m` rows and `panels` column panels, each of whose
/// calls reads `panel_bytes` of weights. One rayon task per (block of panels, block of
/// rows), the panel blocks outermost: a thread then visits one block of weights (at most
/// `PANEL_BLOCK_BYTES`, so it stays in that core's L2) for many row blocks in a row, and a
/// tile's activation rows stay in L1 across the panels of the block. Sweeping every panel per
/// row block instead streamed the whole weight matrix from L3 once per 64 rows: a third of
/// the AMX product's speed on a 2 MB-L2 Xeon.
///
/// `tile(first_row, rows, panels)` computes the tiles of at most `tile_rows` rows against a
/// range of panels; each output is made by one call, whatever the thread count and order.
pub fn for_each_tile(
    m: usize,
    panels: usize,
    tile_rows: usize,
    panel_bytes: usize,
    tile: impl Fn(usize, usize, std::ops::Range<usize>) + Sync + Send,
) {
    let most = if panels * panel_bytes <= WHOLE_WEIGHT_BYTES {
        panels.max(1)
    } else {
        (PANEL_BLOCK_BYTES / panel_bytes.max(1)).clamp(1, panels.max(1))
    };
    // Blocks of equal size, so the threads' shares of them are even.
    let panel_blocks = panels.div_ceil(most);
    let per_block = panels.div_ceil(panel_blocks.max(1));
    let row_blocks = m.div_ceil(ROW_BLOCK);
    (0..panel_blocks * row_blocks)
        .into_par_iter()
        .for_each(|task| {
            let (pb, blk) = (task / row_blocks, task % row_blocks);
            let ps = pb * per_block..panels.min((pb + 1) * per_block);
            let end = m.min((blk + 1) * ROW_BLOCK);
            let mut r = blk * ROW_BLOCK;
            while r < end {
                let rows = tile_rows.min(end - r);
                tile(r, rows, ps.clone());
                r += rows;
            }
        });
}

/// `src` rounded to bf16 and widened back to f32, as bits, zero-padded to `dst.len()` (an
/// even length: two per pair of k).
fn round_row_widened(src: &[f32], dst: &mut [u32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = (to_bf16(*s) as u32) << 16;
    }
    dst[src.len()..].fill(0);
}

fn round_row_portable(src: &[f32], dst: &mut [u32]) {
    for (j, d) in dst.iter_mut().enumerate() {
        let hi = src.get(2 * j + 1).copied().unwrap_or(0.0);
        *d = pair(src[2 * j], hi);
    }
}

/// `src` rounded to bf16 into `dst` as pairs (`dst.len() == src.len().div_ceil(2)`), 32
/// values per instruction; the same rounding as `to_bf16`.
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
    round_row_portable(&src[32 * whole..], &mut dst[16 * whole..]);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn round_row(_src: &[f32], _dst: &mut [u32]) {
    unreachable!("the AVX512-BF16 path is x86_64 only");
}

/// The widened tile: per pair of k, the high product is added first, then the low one,
/// each rounded once, as `vdpbf16ps` does lane by lane. `a` holds the rows widened (two f32
/// per pair: low, high).
fn widen_body(rows: usize, a: &[u32], kp: usize, panel: &[u32], acc: &mut [[f32; NR]; MR]) {
    for j in 0..kp {
        let b = &panel[j * NR..][..NR];
        let (mut b_lo, mut b_hi) = ([0.0f32; NR], [0.0f32; NR]);
        for c in 0..NR {
            b_lo[c] = f32::from_bits(b[c] << 16);
            b_hi[c] = f32::from_bits(b[c] & 0xffff_0000);
        }
        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
            let a_lo = f32::from_bits(a[r * 2 * kp + 2 * j]);
            let a_hi = f32::from_bits(a[r * 2 * kp + 2 * j + 1]);
            for c in 0..NR {
                acc[c] += a_hi * b_hi[c];
                acc[c] += a_lo * b_lo[c];
            }
        }
    }
}

/// One `rows x NR` tile on the widened path, plain code, written (or added) to `dst` like
/// `tile`.
unsafe fn tile_widen(
    rows: usize,
    a: &[u32],
    kp: usize,
    panel: &[u32],
    dst: *mut f32,
    dst_rs: usize,
    cols: usize,
    accumulate: bool,
) {
    let mut acc = [[0.0f32; NR]; MR];
    widen_body(rows, a, kp, panel, &mut acc);
    for (r, acc) in acc.iter().enumerate().take(rows) {
        write_row(dst.add(r * dst_rs), acc, cols, accumulate);
    }
}

/// The first `cols` sums of `acc` written to (or added to) the `cols` floats at `dst`.
unsafe fn write_row(dst: *mut f32, acc: &[f32], cols: usize, accumulate: bool) {
    let out = std::slice::from_raw_parts_mut(dst, cols);
    for (o, &v) in out.iter_mut().zip(acc) {
        *o = if accumulate { *o + v } else { v };
    }
}

/// `tile_widen` with AVX2 register tiles of `WIDE_ROWS x WIDE_COLS`: the same products and
/// sums in the same order (a multiply, then an add, as the plain loop), so the same bits.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_widen_avx2(
    rows: usize,
    a: &[u32],
    kp: usize,
    panel: &[u32],
    dst: *mut f32,
    dst_rs: usize,
    cols: usize,
    accumulate: bool,
) {
    let a_rs = 2 * kp;
    for c0 in (0..cols).step_by(WIDE_COLS) {
        let n = WIDE_COLS.min(cols - c0);
        let mut r = 0;
        while r < rows {
            let take = WIDE_ROWS.min(rows - r);
            let mut acc = [[0.0f32; WIDE_COLS]; WIDE_ROWS];
            let a = a.as_ptr().add(r * a_rs) as *const f32;
            let b = panel.as_ptr().add(c0);
            match take {
                1 => widen_tile_avx2::<1>(a, a_rs, kp, b, &mut acc),
                2 => widen_tile_avx2::<2>(a, a_rs, kp, b, &mut acc),
                3 => widen_tile_avx2::<3>(a, a_rs, kp, b, &mut acc),
                _ => widen_tile_avx2::<4>(a, a_rs, kp, b, &mut acc),
            }
            for (i, acc) in acc.iter().enumerate().take(take) {
                write_row(dst.add((r + i) * dst_rs + c0), acc, n, accumulate);
            }
            r += take;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_widen_avx2(
    _rows: usize,
    _a: &[u32],
    _kp: usize,
    _panel: &[u32],
    _dst: *mut f32,
    _dst_rs: usize,
    _cols: usize,
    _accumulate: bool,
) {
    unreachable!("the AVX2 kernel is x86_64 only");
}

/// `R` widened rows (`a`, row stride `a_rs` f32) against `WIDE_COLS` columns of a packed
/// panel (`b`, row stride `NR`), over all `kp` pairs, into `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_tile_avx2<const R: usize>(
    a: *const f32,
    a_rs: usize,
    kp: usize,
    b: *const u32,
    out: &mut [[f32; WIDE_COLS]; WIDE_ROWS],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    for j in 0..kp {
        let bj = b.add(j * NR) as *const __m256i;
        let (u0, u1) = (_mm256_loadu_si256(bj), _mm256_loadu_si256(bj.add(1)));
        let lo0 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(u0));
        let lo1 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(u1));
        let hi0 = _mm256_castsi256_ps(_mm256_and_si256(u0, high));
        let hi1 = _mm256_castsi256_ps(_mm256_and_si256(u1, high));
        for (r, acc) in acc.iter_mut().enumerate() {
            let row = a.add(r * a_rs + 2 * j);
            let a_lo = _mm256_broadcast_ss(&*row);
            let a_hi = _mm256_broadcast_ss(&*row.add(1));
            acc[0] = _mm256_add_ps(acc[0], _mm256_mul_ps(a_hi, hi0));
            acc[1] = _mm256_add_ps(acc[1], _mm256_mul_ps(a_hi, hi1));
            acc[0] = _mm256_add_ps(acc[0], _mm256_mul_ps(a_lo, lo0));
            acc[1] = _mm256_add_ps(acc[1], _mm256_mul_ps(a_lo, lo1));
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(out[r].as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(out[r].as_mut_ptr().add(8), acc[1]);
    }
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

/// The first `rows` rows of `sums` (row stride `NR`, the first `cols.next_multiple_of(16)`
/// values of each written), their first `cols` columns, written to (or added to) `dst` (row
/// stride `dst_rs`); `plain` writes them with plain code (the emulated AMX tiles of the
/// tests, on any CPU), else with AVX-512.
///
/// # Safety
/// `sums` holds those rows and `dst` is valid for them; AVX-512F unless `plain`.
unsafe fn write_sums(
    plain: bool,
    rows: usize,
    sums: *const f32,
    (dst, dst_rs): (*mut f32, usize),
    cols: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if !plain {
        return write_sums_avx512(rows, sums, dst, dst_rs, cols, accumulate);
    }
    assert!(plain, "AMX is x86_64 only");
    for r in 0..rows {
        for c in 0..cols {
            let (v, p) = (*sums.add(r * NR + c), dst.add(r * dst_rs + c));
            *p = if accumulate { *p + v } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn write_sums_avx512(
    rows: usize,
    sums: *const f32,
    dst: *mut f32,
    dst_rs: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    for r in 0..rows {
        for c0 in (0..cols).step_by(16) {
            let mask = lane_mask(cols - c0);
            let p = dst.add(r * dst_rs + c0);
            let v = _mm512_loadu_ps(sums.add(r * NR + c0));
            let v = if accumulate {
                _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), v)
            } else {
                v
            };
            _mm512_mask_storeu_ps(p, mask, v);
        }
    }
}

/// The first `min(n, 16)` of a 16-lane register's lanes, for a panel's last columns.
pub fn lane_mask(n: usize) -> u16 {
    match n {
        16.. => 0xffff,
        _ => (1u16 << n) - 1,
    }
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
            let mask = lane_mask(cols - c0);
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

/// The precision of the training step's encoder product and sparse passes. Master weights,
/// gradient sums and Adam stay f32 in every mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// A bf16 copy of W_enc, refreshed from the f32 weights before every product, times the
    /// bf16-rounded centred inputs, summed in f32.
    Bf16,
    /// `Bf16`, and the sparse passes gather bf16 rows: a copy of W_dec made at the start of
    /// each step (decode and `d_j . r`), and the centred inputs and residuals rounded once
    /// per step (the W_enc and W_dec row gradients). It halves the bytes those memory-bound
    /// gathers move; the sums stay f32.
    #[serde(rename = "bf16-sparse")]
    Bf16Sparse,
    /// The f32 encoder product with `Bf16Sparse`'s bf16 gathers: for CPUs without bf16
    /// units, where the bf16 product is slower than f32 but the gathers still move half
    /// the bytes.
    #[serde(rename = "f32-bf16-sparse")]
    F32Bf16Sparse,
    /// f32 results from a bf16 product: the bf16 pre-activations are within a proven bound
    /// of the f32 ones ([`ScreenMargin`]), and every entry that could pass the rule's
    /// cutoff is recomputed as an f32 dot product, so selection and the gradients see f32
    /// values wherever they look. Rules without `Arch::screen_cutoff` run the f32 product.
    #[serde(rename = "f32-screened")]
    F32Screened,
    /// The encoder product as three bf16 products (`PackedBf16::pack_split`): each operand
    /// a bf16 part plus a bf16 remainder, about 16 significant bits instead of 8, so the
    /// pre-activations are within ~2^-15 of sum |x w| of the f32 ones (the "bf16x3" of JAX's
    /// `Precision.HIGH`). Everything else as `F32`. Three times `Bf16`'s product: faster than
    /// f32 only where bf16 products are (AMX).
    #[serde(rename = "bf16x3")]
    Bf16x3,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Bf16Sparse => "bf16-sparse",
            Precision::F32Bf16Sparse => "f32-bf16-sparse",
            Precision::F32Screened => "f32-screened",
            Precision::Bf16x3 => "bf16x3",
        }
    }

    /// Whether the encoder product runs in bf16 (one or three terms) and selection reads
    /// its sums.
    pub fn bf16_encoder(self) -> bool {
        matches!(
            self,
            Precision::Bf16 | Precision::Bf16Sparse | Precision::Bf16x3
        )
    }

    /// Whether the encoder product is split into three bf16 terms (`Precision::Bf16x3`).
    pub fn split_encoder(self) -> bool {
        self == Precision::Bf16x3
    }

    /// Whether the encoder product is screened in bf16 and refined in f32 (where the rule
    /// allows it).
    pub fn screened(self) -> bool {
        self == Precision::F32Screened
    }

    /// Whether the step runs a bf16 product at all (so wants bf16 units).
    pub fn bf16_product(self) -> bool {
        self.bf16_encoder() || self.screened()
    }

    /// Whether the sparse passes gather bf16 rows.
    pub fn bf16_sparse(self) -> bool {
        matches!(self, Precision::Bf16Sparse | Precision::F32Bf16Sparse)
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "bf16-sparse" => Ok(Precision::Bf16Sparse),
            "f32-bf16-sparse" => Ok(Precision::F32Bf16Sparse),
            "f32-screened" => Ok(Precision::F32Screened),
            "bf16x3" => Ok(Precision::Bf16x3),
            _ => Err(format!(
                "'{s}' is no precision; use f32, bf16, bf16-sparse, f32-bf16-sparse, f32-screened \
                 or bf16x3"
            )),
        }
    }
}

/// The trainer's bf16 encoder: a packed copy of W_enc (rounded, or split into three terms)
/// and the scratch for the rounded inputs.
#[derive(Default)]
pub struct EncoderBf16 {
    packed: Option<PackedBf16>,
    scratch: AlignedVec<u32>,
    split: bool,
}

impl EncoderBf16 {
    /// Products of one bf16 term, or of three (`split`, `Precision::Bf16x3`).
    pub fn new(split: bool) -> Self {
        Self {
            split,
            ..Self::default()
        }
    }

    /// `out[b, j] = sum_i x[b, i] * w_t[j, i]` (the shapes of `kernels::matmul_xt`) in bf16:
    /// `w_t` is packed afresh first, so the copy always follows the f32 weights.
    pub fn matmul_xt(
        &mut self,
        x: &[f32],
        n: usize,
        d_in: usize,
        w_t: &[f32],
        d_sae: usize,
        out: &mut [f32],
    ) {
        assert_eq!(x.len(), n * d_in);
        assert_eq!(out.len(), n * d_sae);
        self.refresh(w_t, d_in, d_sae);
        self.product(x, n, out);
    }

    /// Packs the bf16 copy of `w_t` (`[d_sae, d_in]`) afresh.
    pub fn refresh(&mut self, w_t: &[f32], d_in: usize, d_sae: usize) {
        let split = self.split;
        match &mut self.packed {
            Some(p) if p.shape() == (d_in, d_sae) && p.is_split() == split => {
                p.repack_transposed(w_t)
            }
            slot if split => *slot = Some(PackedBf16::pack_split_transposed(w_t, d_in, d_sae)),
            slot => *slot = Some(PackedBf16::pack_transposed(w_t, d_in, d_sae)),
        }
    }

    /// `out = x W` with the copy `refresh` packed last, `x` `[n, d_in]`.
    pub fn product(&mut self, x: &[f32], n: usize, out: &mut [f32]) {
        let packed = self
            .packed
            .as_ref()
            .expect("refresh packs the weights first");
        let (d_in, d_sae) = packed.shape();
        assert_eq!(x.len(), n * d_in);
        assert_eq!(out.len(), n * d_sae);
        matmul(n, x, d_in, packed, out, d_sae, false, &mut self.scratch);
    }
}

/// How far a bf16 product's sum can lie from the f32 dot product of the same two k-vectors
/// `x` and `w` (the value `kernels::dot` gives), from their norms `nx`, `nw` and the norms
/// `ex`, `ew` of what rounding them to bf16 moved (`kernels::norm_and_bf16_error`).
///
/// `|x~ . w~ - x . w| <= |x~| |w~ - w| + |x~ - x| |w| <= (nx + ex) ew + ex nw`
/// (Cauchy-Schwarz). Each f32 sum of k terms adds at most `g = (k + 8) 2^-24 / (1 - (k + 8)
/// 2^-24)` of its absolute sum: once for the bf16 sums, whose products are exact in f32
/// (`sum |x~_i w~_i| <= (nx + ex)(nw + ew)`), once for `dot` (`sum |x_i w_i| <= nx nw`, a
/// few more roundings than k there); with `ex <= 2^-8 nx` and `ew <= 2^-8 nw` (nearest
/// even to 8 significant bits) both are within `g (2 + 2^-7 + 2^-16) nx nw`. The norms are
/// f32 sums themselves (the differences `x - x~` are exact), so the total carries a further
/// factor `1 + 2g + 2^-10`. `t` covers products and sums that `vdpbf16ps` flushes to zero,
/// far below any normal value.
#[derive(Clone, Copy, Debug)]
pub struct ScreenMargin {
    /// `g (2 + 2^-7 + 2^-16)`.
    sums: f32,
    /// `1 + 2g + 2^-10`.
    safety: f32,
    t: f32,
}

impl ScreenMargin {
    pub fn new(k: usize) -> Self {
        let u = 2f64.powi(-24);
        let steps = (k + 8) as f64;
        let g = steps * u / (1.0 - steps * u).max(0.5);
        Self {
            sums: (g * (2.0 + 2f64.powi(-7) + 2f64.powi(-16))) as f32,
            safety: (1.0 + 2.0 * g + 2f64.powi(-10)) as f32,
            t: 2f32.powi(-100),
        }
    }

    /// For one row `x`: `(p, q, c)` with `margin = p ew + q nw + c` for every `w`.
    pub fn row(self, nx: f32, ex: f32) -> (f32, f32, f32) {
        (
            (nx + ex) * self.safety,
            (ex + self.sums * nx) * self.safety + self.t,
            self.t * (nx + 1.0),
        )
    }

    /// The bound for one pair.
    pub fn bound(self, (nx, ex): (f32, f32), (nw, ew): (f32, f32)) -> f32 {
        let (p, q, c) = self.row(nx, ex);
        p * ew + q * nw + c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Row, column and k remainders of the tiles and panels.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 2, 1),
        (13, 7, 50),
        (70, 33, 96),
        (9, 64, 47),
        (40, 600, 60),
    ];

    fn operands(m: usize, a_rs: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let a = (0..m * a_rs)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let w = (0..k * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
            .collect();
        (a, w)
    }

    /// Mixed magnitudes and exact zeros, so that rounding order matters.
    fn mixed(rng: &mut ChaCha8Rng) -> f32 {
        let v: f32 = rng.gen_range(-1.0..1.0);
        match rng.gen_range(0..8) {
            0 => 0.0,
            1 => v * 1e4,
            2 => v * 1e-4,
            _ => v,
        }
    }

    fn run(path: Bf16Path, m: usize, a: &[f32], a_rs: usize, w: &PackedBf16, out: &mut [f32]) {
        run_forced(Forced::on(path), m, a, a_rs, w, out);
    }

    /// A path as a test forces it; `portable` runs the plain code where the path has it (for
    /// AMX, emulated tiles, on any CPU).
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Forced {
        path: Bf16Path,
        portable: bool,
    }

    impl Forced {
        fn on(path: Bf16Path) -> Self {
            Forced {
                path,
                portable: false,
            }
        }

        const AMX_EMULATED: Forced = Forced {
            path: Bf16Path::Amx,
            portable: true,
        };
    }

    /// Every path this CPU runs, then the AMX path on emulated tiles.
    fn forced_paths() -> Vec<Forced> {
        let mut paths: Vec<Forced> = Bf16Path::all_available()
            .into_iter()
            .map(Forced::on)
            .collect();
        paths.push(Forced::AMX_EMULATED);
        paths
    }

    /// The AMX path on the tiles where the CPU has them, and emulated.
    fn amx_paths() -> Vec<Forced> {
        let paths = forced_paths().into_iter();
        paths.filter(|f| f.path == Bf16Path::Amx).collect()
    }

    fn run_forced(f: Forced, m: usize, a: &[f32], a_rs: usize, w: &PackedBf16, out: &mut [f32]) {
        let out_rs = out.len() / m;
        let pairs = &mut AlignedVec::default();
        matmul_impl(f.path, f.portable, m, a, a_rs, w, out, out_rs, false, pairs);
    }

    #[test]
    fn rounding_is_nearest_even_with_subnormals_flushed() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert_eq!(to_bf16(f32::MIN_POSITIVE / 4.0), 0);
        assert_eq!(to_bf16(-f32::MIN_POSITIVE / 4.0), 0x8000);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(to_bf16(f32::MAX), 0x7f80, "overflow rounds to infinity");
        // Everything a bf16 can hold comes back unchanged.
        for h in [0x3f80u16, 0x0080, 0x7f7f, 0xc2f7, 0x8000] {
            assert_eq!(to_bf16(from_bf16(h)), h);
        }
    }

    /// Against an f64 product of the same bf16-rounded inputs, on every path this CPU runs
    /// (each forced) and on emulated AMX tiles, both with and without accumulation, at a row
    /// stride wider than k.
    #[test]
    fn every_path_matches_the_rounded_reference() {
        let paths = forced_paths();
        eprintln!("bf16 paths on this CPU: {paths:?}");
        let round = |v: f32| from_bf16(to_bf16(v)) as f64;
        for Forced { path, portable } in paths {
            for &(m, k, n) in SHAPES {
                let a_rs = k + 3;
                let (a, w) = operands(m, a_rs, k, n);
                let packed = PackedBf16::pack(&w, k, n);
                let out_rs = n + 2;
                let init: Vec<f32> = (0..m * out_rs).map(|i| (i % 5) as f32).collect();
                for accumulate in [false, true] {
                    let mut out = init.clone();
                    matmul_impl(
                        path,
                        portable,
                        m,
                        &a,
                        a_rs,
                        &packed,
                        &mut out,
                        out_rs,
                        accumulate,
                        &mut AlignedVec::default(),
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
                                "{path:?} (portable {portable}) {m}x{k}x{n} ({r}, {c}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Against the plain f32 product of the unrounded inputs. Each input is within a relative
    /// 2^-8 of its bf16 rounding (unit roundoff of 8 significant bits), so each product is
    /// within (2^-7 + 2^-16) of the exact one, and f32 summation adds at most k * 2^-24 of
    /// the absolute sum: |bf16 - exact| <= (2^-7 + 2^-16 + k 2^-24) sum_i |a_i w_i|.
    /// The f32 reference has its own k * 2^-24, counted too.
    #[test]
    fn every_path_is_within_the_stated_bound_of_f32() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (m, k, n) = (37, 576, 100);
        let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let w: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-0.1..0.1)).collect();
        let packed = PackedBf16::pack(&w, k, n);
        let mut f32_out = vec![0.0f32; m * n];
        crate::kernels::matmul(&a, m, k, &w, n, &mut f32_out);
        let bound_rel = 2f64.powi(-7) + 2f64.powi(-16) + 2.0 * k as f64 * 2f64.powi(-24);
        for path in forced_paths() {
            let mut out = vec![0.0f32; m * n];
            run_forced(path, m, &a, k, &packed, &mut out);
            let mut worst = 0.0f64;
            for r in 0..m {
                for c in 0..n {
                    let abs_sum: f64 = (0..k)
                        .map(|i| (a[r * k + i] as f64 * w[i * n + c] as f64).abs())
                        .sum();
                    let err = (out[r * n + c] as f64 - f32_out[r * n + c] as f64).abs();
                    assert!(
                        err <= bound_rel * abs_sum,
                        "{path:?} ({r}, {c}): {err} > {bound_rel} * {abs_sum}"
                    );
                    worst = worst.max(err / abs_sum);
                }
            }
            eprintln!(
                "{path:?}: worst |bf16 - f32| / sum|a w| = {worst:.2e} (bound {bound_rel:.2e})"
            );
            // Not the f32 product by another name: rounding shows.
            assert!(worst > 1e-5, "{path:?} gave f32 results");
        }
    }

    /// Three-term products (`PackedBf16::pack_split`, rows split by `matmul`) on odd k,
    /// strided rows and mixed magnitudes, on every path this CPU has (and emulated AMX
    /// tiles): AVX512-BF16 and the widened path agree bit for bit, the transposed packing is
    /// the same matrix, and each sum is within about 2^-15 of sum |a w| (operands of ~16
    /// bits, plus f32 sums over 3k terms) of the exact product, where one bf16 product is
    /// ~2^-8 off.
    #[test]
    fn split_products_are_within_their_bound_of_the_exact_product() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let shapes = [
            (1, 1, 3, 1),
            (13, 77, 50, 80),
            (70, 576, 100, 576),
            (9, 1536, 64, 1600),
        ];
        for (m, k, n, a_rs) in shapes {
            let a: Vec<f32> = (0..m * a_rs).map(|_| mixed(&mut rng)).collect();
            let w: Vec<f32> = (0..k * n).map(|_| mixed(&mut rng) * 0.1).collect();
            let packed = PackedBf16::pack_split(&w, k, n);
            assert!(packed.is_split());
            assert_eq!(packed.k_pairs(), 3 * k.div_ceil(2));
            assert_eq!(packed.shape(), (k, n));
            let w_t: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let transposed = PackedBf16::pack_split_transposed(&w_t, k, n);
            assert_eq!(&packed.data[..], &transposed.data[..], "({m}, {k}, {n})");
            let bound_rel = 2f64.powi(-15) + 3.0 * k as f64 * 2f64.powi(-24);
            let mut first: Option<Vec<f32>> = None;
            for forced in forced_paths() {
                let path = forced.path;
                let mut out = vec![0.0f32; m * n];
                run_forced(forced, m, &a, a_rs, &packed, &mut out);
                let mut worst = 0.0f64;
                for r in 0..m {
                    for c in 0..n {
                        let (mut exact, mut abs_sum) = (0.0f64, 0.0f64);
                        for i in 0..k {
                            let p = a[r * a_rs + i] as f64 * w[i * n + c] as f64;
                            exact += p;
                            abs_sum += p.abs();
                        }
                        let err = (out[r * n + c] as f64 - exact).abs();
                        assert!(
                            err <= bound_rel * abs_sum,
                            "{forced:?} ({m}, {k}, {n}) at ({r}, {c}): {err} > {bound_rel} * {abs_sum}"
                        );
                        if abs_sum > 0.0 {
                            worst = worst.max(err / abs_sum);
                        }
                    }
                }
                eprintln!(
                    "{forced:?} ({m}, {k}, {n}): worst |bf16x3 - exact| / sum|a w| = {worst:.2e}"
                );
                // The widened path has `vdpbf16ps`'s bits (AMX sums in its own order).
                if path == Bf16Path::Amx {
                    continue;
                }
                match &first {
                    None => first = Some(out),
                    Some(f) => assert!(
                        f.iter().zip(&out).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{path:?} ({m}, {k}, {n}) differs from AVX512-BF16"
                    ),
                }
            }
            if available() {
                // The vector split and the plain one agree bit for bit.
                let kp = k.div_ceil(2);
                let mut pairs = AlignedVec::default();
                round_rows_on(
                    Bf16Path::Avx512Bf16,
                    false,
                    true,
                    m,
                    &a,
                    a_rs,
                    k,
                    &mut pairs,
                );
                for r in 0..m {
                    let mut want = vec![0u32; 3 * kp];
                    let (hi, rest) = want.split_at_mut(kp);
                    let (hi2, lo) = rest.split_at_mut(kp);
                    split_row_portable(&a[r * a_rs..][..k], hi, hi2, lo);
                    assert_eq!(&pairs[r * 3 * kp..][..3 * kp], &want[..], "row {r}, k {k}");
                }
            }
        }
    }

    /// `ScreenMargin` holds on every path against `kernels::dot`, the f32 value the screened
    /// step recomputes: mixed magnitudes, exact zeros, subnormal operands and a row that
    /// cancels, at k of a few lanes and of SmolLM2's width.
    #[test]
    fn screen_margin_bounds_every_path() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        for (m, k, n) in [(19, 5, 23), (33, 576, 70)] {
            let mut x: Vec<f32> = (0..m * k).map(|_| mixed(&mut rng)).collect();
            let w_t: Vec<f32> = (0..n * k).map(|_| mixed(&mut rng)).collect();
            x[..k].iter_mut().for_each(|v| *v *= 1e-40);
            // Row 1 is column 0 with every other sign flipped: its sum nearly cancels.
            for i in 0..k {
                x[k + i] = if i % 2 == 0 { w_t[i] } else { -w_t[i] };
            }
            let packed = PackedBf16::pack_transposed(&w_t, k, n);
            let margin = ScreenMargin::new(k);
            let norm = crate::kernels::norm_and_bf16_error;
            for path in Bf16Path::all_available() {
                let mut out = vec![0.0f32; m * n];
                run(path, m, &x, k, &packed, &mut out);
                let mut worst = 0.0f64;
                for r in 0..m {
                    let xr = &x[r * k..(r + 1) * k];
                    for c in 0..n {
                        let wc = &w_t[c * k..(c + 1) * k];
                        let exact = crate::kernels::dot(xr, wc);
                        let err = (out[r * n + c] - exact).abs();
                        let bound = margin.bound(norm(xr), norm(wc));
                        assert!(
                            err <= bound,
                            "{path:?} k {k} ({r}, {c}): |{} - {exact}| > {bound}",
                            out[r * n + c]
                        );
                        worst = worst.max(err as f64 / bound as f64);
                    }
                }
                eprintln!("{path:?} k {k}: worst error / margin {worst:.3}");
                assert!(worst > 1e-3, "{path:?}: no rounding seen");
            }
        }
    }

    /// Pairs where the bound is nearly reached: few terms (one dominant product), `x` equal
    /// to `w` up to signs, `w` a scaled `x`; magnitudes over seven decades.
    #[test]
    fn screen_margin_holds_where_cauchy_schwarz_is_tight() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut worst = 0.0f64;
        for trial in 0..20000 {
            let k = [1usize, 2, 3, 5, 16, 17, 33, 576][trial % 8];
            let n = 3;
            let mut w_t: Vec<f32> = (0..n * k)
                .map(|_| rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-3..4)))
                .collect();
            let mut x: Vec<f32> = (0..k)
                .map(|_| rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-3..4)))
                .collect();
            if trial % 3 == 0 {
                for i in 0..k {
                    x[i] = w_t[i] * if rng.gen() { 1.0 } else { -1.0 };
                }
            }
            if trial % 5 == 0 {
                for i in 0..k {
                    w_t[k + i] = x[i] * 1.0001;
                }
            }
            let packed = PackedBf16::pack_transposed(&w_t, k, n);
            let m = ScreenMargin::new(k);
            for path in Bf16Path::all_available() {
                let mut out = vec![0.0f32; n];
                matmul_on(
                    path,
                    1,
                    &x,
                    k,
                    &packed,
                    &mut out,
                    n,
                    false,
                    &mut AlignedVec::default(),
                );
                for c in 0..n {
                    let wc = &w_t[c * k..(c + 1) * k];
                    let exact = crate::kernels::dot(&x, wc);
                    let err = (out[c] - exact).abs();
                    let b = m.bound(
                        crate::kernels::norm_and_bf16_error(&x),
                        crate::kernels::norm_and_bf16_error(wc),
                    );
                    assert!(err <= b, "trial {trial} k {k}: {err} > {b}");
                    worst = worst.max(err as f64 / b as f64);
                }
            }
        }
        eprintln!("worst error / margin {worst:.4}");
    }

    /// The widened path gives the bits of `vdpbf16ps` (where this CPU has it), so a bf16
    /// training run is reproducible across machines with and without AVX512-BF16.
    #[test]
    fn paths_agree_bit_for_bit() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16 to compare with");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for &(m, k, n) in SHAPES.iter().chain(&[(100, 576, 200)]) {
            let a: Vec<f32> = (0..m * k).map(|_| mixed(&mut rng)).collect();
            let w: Vec<f32> = (0..k * n).map(|_| mixed(&mut rng)).collect();
            let packed = PackedBf16::pack(&w, k, n);
            let (mut x, mut y) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
            run(Bf16Path::Avx512Bf16, m, &a, k, &packed, &mut x);
            run(Bf16Path::Widen, m, &a, k, &packed, &mut y);
            for (i, (p, q)) in x.iter().zip(&y).enumerate() {
                assert_eq!(p.to_bits(), q.to_bits(), "{m}x{k}x{n} at {i}: {p} vs {q}");
            }
        }
    }

    /// An AMX sum has the same bits wherever it lies: a row alone (a tile of one row)
    /// against the same row inside tiles of 32 and 16 and their remainders; columns shifted
    /// across the tiles' column groups and panels; and k padded with zeros to whole tile
    /// steps against k with a remainder step. So no other row, column or padding reaches a
    /// sum, and the fused SwiGLU (which packs gate and up apart) matches the plain product.
    #[test]
    fn amx_sums_do_not_depend_on_their_neighbours() {
        for amx in amx_paths() {
            amx_sums_are_independent_on(amx);
        }
    }

    fn amx_sums_are_independent_on(amx: Forced) {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for &(m, k, n) in &[(70usize, 576usize, 100usize), (37, 47, 50), (33, 33, 17)] {
            let a: Vec<f32> = (0..m * k).map(|_| mixed(&mut rng)).collect();
            let w: Vec<f32> = (0..k * n).map(|_| mixed(&mut rng)).collect();
            let mut full = vec![0.0f32; m * n];
            run_forced(amx, m, &a, k, &PackedBf16::pack(&w, k, n), &mut full);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for r in 0..m {
                let mut one = vec![0.0f32; n];
                let packed = PackedBf16::pack(&w, k, n);
                run_forced(amx, 1, &a[r * k..][..k], k, &packed, &mut one);
                assert_eq!(bits(&one), bits(&full[r * n..][..n]), "{m}x{k}x{n} row {r}");
            }
            let skip = 5;
            let w_cut: Vec<f32> = (0..k)
                .flat_map(|i| w[i * n + skip..(i + 1) * n].iter().copied())
                .collect();
            let mut cut = vec![0.0f32; m * (n - skip)];
            let packed = PackedBf16::pack(&w_cut, k, n - skip);
            run_forced(amx, m, &a, k, &packed, &mut cut);
            for r in 0..m {
                let want = &full[r * n + skip..(r + 1) * n];
                let got = &cut[r * (n - skip)..][..n - skip];
                assert_eq!(
                    bits(got),
                    bits(want),
                    "{m}x{k}x{n} row {r}, columns from {skip}"
                );
            }
            let kz = k.next_multiple_of(32);
            let a_z: Vec<f32> = (0..m * kz)
                .map(|i| {
                    if i % kz < k {
                        a[i / kz * k + i % kz]
                    } else {
                        0.0
                    }
                })
                .collect();
            let w_z: Vec<f32> = (0..kz * n)
                .map(|i| if i / n < k { w[i] } else { 0.0 })
                .collect();
            let mut padded = vec![0.0f32; m * n];
            run_forced(
                amx,
                m,
                &a_z,
                kz,
                &PackedBf16::pack(&w_z, kz, n),
                &mut padded,
            );
            assert_eq!(
                bits(&padded),
                bits(&full),
                "{m}x{k}x{n} against k padded to {kz}"
            );
        }
    }

    /// The widened path's AVX2 register tiles give the bits of its plain loop (and so of
    /// `vdpbf16ps`), at every tile remainder, with and without accumulation.
    #[test]
    fn widened_avx2_tiles_match_the_plain_loop_bit_for_bit() {
        if !cpu_has!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &(m, k, n) in SHAPES.iter().chain(&[(100, 576, 200), (67, 33, 130)]) {
            let a_rs = k + 1;
            let a: Vec<f32> = (0..m * a_rs).map(|_| mixed(&mut rng)).collect();
            let w: Vec<f32> = (0..k * n).map(|_| mixed(&mut rng)).collect();
            let packed = PackedBf16::pack(&w, k, n);
            let out_rs = n + 3;
            let init: Vec<f32> = (0..m * out_rs).map(|_| mixed(&mut rng)).collect();
            for accumulate in [false, true] {
                let (mut x, mut y) = (init.clone(), init.clone());
                for (out, portable) in [(&mut x, true), (&mut y, false)] {
                    matmul_impl(
                        Bf16Path::Widen,
                        portable,
                        m,
                        &a,
                        a_rs,
                        &packed,
                        out,
                        out_rs,
                        accumulate,
                        &mut AlignedVec::default(),
                    );
                }
                for (i, (p, q)) in x.iter().zip(&y).enumerate() {
                    assert_eq!(
                        p.to_bits(),
                        q.to_bits(),
                        "{m}x{k}x{n} accumulate {accumulate} at {i}: {p} vs {q}"
                    );
                }
            }
        }
    }

    /// Packing the transpose gives the same panels as packing the matrix.
    #[test]
    fn transposed_packing_matches() {
        for &(_, k, n) in SHAPES {
            let (_, w) = operands(1, 1, k, n);
            let w_t: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let a = PackedBf16::pack(&w, k, n);
            let mut b = PackedBf16::pack_transposed(&vec![7.0; k * n], k, n);
            b.repack_transposed(&w_t);
            assert_eq!(a.data[..], b.data[..], "{k}x{n}");
            assert_eq!(b.shape(), (k, n));
            // Each rounding path this CPU has.
            for vector in [false, available()] {
                let mut c = PackedBf16::pack_transposed(&vec![7.0; k * n], k, n);
                c.repack_rows(&w_t, vector);
                assert_eq!(a.data[..], c.data[..], "{k}x{n}, vector rounding {vector}");
            }
        }
    }
}
