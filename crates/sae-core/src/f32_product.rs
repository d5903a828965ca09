//! f32 matrix products against a weight laid out once for this CPU: the LM forward's four
//! weight products per block (`sae harvest`) and the trainer's encoder product.
//!
//! Two paths, picked at run time (`F32Path::best`) or forced (`PackedF32::pack_for`, for
//! tests and benchmarks):
//! * `Gemm`: the `gemm` crate on the row-major weight. Its AVX-512 kernels run near the f32
//!   peak of the AVX-512 machines measured here, so it is the choice wherever AVX-512 is.
//! * `Avx2Panels`: the weight packed once into panels of 16 columns (each panel `k` rows of
//!   16 contiguous floats), the activations packed per block of 96 rows into slivers of 6
//!   rows, and a 6 x 16 register tile of FMAs (12 accumulators, 2 weight loads and 6
//!   broadcasts per k). A whole sliver-by-panel product runs over up to `KC` values of k
//!   before the tile touches the output, so it is read and written once per `KC`, not per
//!   cache block. On the AVX2-only EPYC measured here `gemm`'s AVX2 kernel reached about
//!   65% of the FMA peak on the harvest's shapes and this one 80-90% (README "Harvest").
//!
//! Every output element is summed over k in order, by one task, in the same blocks of k
//! whatever the thread count, so results do not depend on it.

#![allow(clippy::too_many_arguments)]

use std::borrow::Cow;
use std::cell::RefCell;

use gemm::gemm;
use rayon::prelude::*;

use crate::kernels::{cpu_has, SharedMut};

/// Columns per packed panel: two 8-lane registers.
const NR: usize = 16;
/// Rows per register tile: 6 x 2 accumulators, 2 weight registers, 1 broadcast (of 16).
const MR: usize = 6;
/// Rows per task's packed block of activations (16 slivers; `MC x KC` floats stay in L2).
const MC: usize = 96;
/// Most values of k per pass over a tile. Larger keeps the output's read-modify-write rare;
/// one panel's `KC x 16` floats should stay near L1's size. `k` is cut into equal blocks.
const KC: usize = 640;

/// How an f32 product is computed (see the module notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Path {
    Gemm,
    Avx2Panels,
}

impl F32Path {
    /// The fastest path measured on CPUs like this one: `Avx2Panels` where AVX2 and FMA are
    /// the widest vectors, `gemm` where AVX-512 is (or AVX2 is not).
    pub fn best() -> Self {
        if F32Path::Avx2Panels.runs_here() && !cpu_has!("avx512f") {
            F32Path::Avx2Panels
        } else {
            F32Path::Gemm
        }
    }

    /// Every path this CPU runs.
    pub fn all_available() -> Vec<Self> {
        [F32Path::Gemm, F32Path::Avx2Panels]
            .into_iter()
            .filter(|p| p.runs_here())
            .collect()
    }

    pub fn runs_here(self) -> bool {
        match self {
            F32Path::Gemm => true,
            F32Path::Avx2Panels => cpu_has!("avx2", "fma"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            F32Path::Gemm => "gemm",
            F32Path::Avx2Panels => "avx2 panels",
        }
    }
}

/// A `[k, n]` f32 weight matrix laid out for one path: row-major for `Gemm`; for
/// `Avx2Panels`, panels of `NR` columns, each `k` rows of `NR` floats (zero past `n`).
pub struct PackedF32 {
    k: usize,
    n: usize,
    path: F32Path,
    data: Vec<f32>,
}

impl PackedF32 {
    /// `w` is `[k, n]` row-major, laid out for `F32Path::best()`.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        Self::pack_for(F32Path::best(), w, k, n)
    }

    /// `w` laid out for `path`. Panics unless `path.runs_here()`.
    pub fn pack_for(path: F32Path, w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n);
        assert!(
            path.runs_here(),
            "f32 path {} needs AVX2 and FMA",
            path.name()
        );
        if path == F32Path::Gemm {
            return Self {
                k,
                n,
                path,
                data: w.to_vec(),
            };
        }
        let mut data = vec![0.0f32; n.div_ceil(NR) * k * NR];
        data.par_chunks_mut((k * NR).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                let (c0, cols) = (p * NR, NR.min(n - p * NR));
                for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
                    row[..cols].copy_from_slice(&w[kk * n + c0..][..cols]);
                }
            });
        Self { k, n, path, data }
    }

    /// `w_t` is the transpose, `[n, k]` row-major (the trainer's encoder layout), packed for
    /// `Avx2Panels`; the `gemm` path reads the transpose in place and needs no copy.
    pub fn pack_transposed(w_t: &[f32], k: usize, n: usize) -> Self {
        let path = F32Path::Avx2Panels;
        assert!(
            path.runs_here(),
            "f32 path {} needs AVX2 and FMA",
            path.name()
        );
        let mut p = Self {
            k,
            n,
            path,
            data: vec![0.0; n.div_ceil(NR) * k * NR],
        };
        p.repack_transposed(w_t);
        p
    }

    /// Packs `w_t` (`[n, k]`, the shape this was made for) into the existing panels.
    pub fn repack_transposed(&mut self, w_t: &[f32]) {
        let (k, n) = (self.k, self.n);
        assert_eq!(w_t.len(), k * n);
        assert_eq!(
            self.path,
            F32Path::Avx2Panels,
            "transposed packing is for the panels"
        );
        self.data
            .par_chunks_mut((k * NR).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..NR.min(n - p * NR) {
                    let src = &w_t[(p * NR + c) * k..][..k];
                    for (kk, &v) in src.iter().enumerate() {
                        panel[kk * NR + c] = v;
                    }
                }
            });
    }

    /// Inner dimension and output columns.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The matrix, `[k, n]` row-major.
    pub fn values(&self) -> Cow<'_, [f32]> {
        let (k, n) = (self.k, self.n);
        match self.path {
            F32Path::Gemm => Cow::Borrowed(&self.data),
            F32Path::Avx2Panels => {
                let mut w = vec![0.0f32; k * n];
                for (p, panel) in self.data.chunks_exact((k * NR).max(1)).enumerate() {
                    let (c0, cols) = (p * NR, NR.min(n - p * NR));
                    for (kk, row) in panel.chunks_exact(NR).enumerate() {
                        w[kk * n + c0..][..cols].copy_from_slice(&row[..cols]);
                    }
                }
                Cow::Owned(w)
            }
        }
    }
}

/// `out[r, j] (+)= sum_i a[r, i] * w[i, j]` for `m` rows, on the path `w` was packed for.
/// `a` has row stride `a_rs` (its first `k` columns are used), `out` row stride `out_rs`;
/// with `accumulate` the product is added to what `out` holds.
pub fn matmul(
    m: usize,
    a: &[f32],
    a_rs: usize,
    w: &PackedF32,
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
) {
    let (k, n) = (w.k, w.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(k <= a_rs && a.len() >= (m - 1) * a_rs + k);
    assert!(n <= out_rs && out.len() >= (m - 1) * out_rs + n);
    match w.path {
        // SAFETY: the asserts above keep every strided access inside the slices.
        F32Path::Gemm => unsafe {
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
                w.data.as_ptr(),
                1,
                n as isize,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                crate::kernels::parallelism(),
            )
        },
        F32Path::Avx2Panels => matmul_panels(m, a, a_rs, w, out, out_rs, accumulate),
    }
}

thread_local! {
    /// Each worker's packed activations, kept between products.
    static A_SLIVERS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn matmul_panels(
    m: usize,
    a: &[f32],
    a_rs: usize,
    w: &PackedF32,
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
) {
    let (k, n) = (w.k, w.n);
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                out[r * out_rs..][..n].fill(0.0);
            }
        }
        return;
    }
    let panels = n.div_ceil(NR);
    let row_blocks = m.div_ceil(MC);
    // Few row blocks (a short batch): split the columns too, so every thread has work.
    let want = 4 * rayon::current_num_threads();
    let per_group = panels.div_ceil(want.div_ceil(row_blocks).clamp(1, panels));
    let groups = panels.div_ceil(per_group);
    let kc_max = k.div_ceil(k.div_ceil(KC));
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let (rb, g) = (task / groups, task % groups);
        let (r0, rows) = (rb * MC, MC.min(m - rb * MC));
        let slivers = rows.div_ceil(MR);
        let panel_range = g * per_group..panels.min((g + 1) * per_group);
        A_SLIVERS.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(MC * kc_max, 0.0);
            let mut p0 = 0;
            while p0 < k {
                let kc = kc_max.min(k - p0);
                let packed = &mut buf[..slivers * MR * kc];
                pack_slivers(&a[r0 * a_rs..], a_rs, rows, p0, kc, packed);
                for p in panel_range.clone() {
                    let cols = NR.min(n - p * NR);
                    let panel = &w.data[(p * k + p0) * NR..][..kc * NR];
                    for s in 0..slivers {
                        let sliver = &packed[s * MR * kc..][..MR * kc];
                        let tile_rows = MR.min(rows - s * MR);
                        // SAFETY: `runs_here()` held when `w` was packed; this task alone
                        // writes rows r0..r0+rows, columns of panels `panel_range`, all
                        // inside `out` by the asserts in `matmul`.
                        unsafe {
                            let dst = out_ptr.get().add((r0 + s * MR) * out_rs + p * NR);
                            tile(
                                kc,
                                sliver,
                                panel,
                                dst,
                                out_rs,
                                tile_rows,
                                cols,
                                accumulate || p0 > 0,
                            );
                        }
                    }
                }
                p0 += kc;
            }
        });
    });
}

/// Columns `p0..p0+kc` of `rows` rows of `a` (row stride `a_rs`) as slivers of `MR` rows:
/// sliver `s` holds, for each k, its `MR` rows' values (zero past `rows`).
fn pack_slivers(a: &[f32], a_rs: usize, rows: usize, p0: usize, kc: usize, dst: &mut [f32]) {
    for (s, sliver) in dst.chunks_exact_mut(MR * kc).enumerate() {
        for r in 0..MR {
            let row = s * MR + r;
            if row < rows {
                let src = &a[row * a_rs + p0..][..kc];
                for (kk, &v) in src.iter().enumerate() {
                    sliver[kk * MR + r] = v;
                }
            } else {
                for kk in 0..kc {
                    sliver[kk * MR + r] = 0.0;
                }
            }
        }
    }
}

/// One `rows x cols` tile (at most `MR x NR`): `sliver` times `panel` over `kc` values of k,
/// written to (or, with `add`, added to) `dst` (row stride `dst_rs`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile(
    kc: usize,
    sliver: &[f32],
    panel: &[f32],
    dst: *mut f32,
    dst_rs: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(sliver.len() >= kc * MR && panel.len() >= kc * NR);
    // The tile's output rows are usually far in memory; ask for them now so the loads (or
    // the stores' line fills) at the end do not stall.
    for r in 0..rows {
        let p = dst.add(r * dst_rs) as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(p);
        _mm_prefetch::<_MM_HINT_T0>(p.add(4 * NR - 4));
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (sliver.as_ptr(), panel.as_ptr());
    for _ in 0..kc {
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_broadcast_ss(&*a.add(r));
            acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let p = dst.add(r * dst_rs);
        if cols == NR {
            let (mut v0, mut v1) = (acc[0], acc[1]);
            if add {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
            }
            _mm256_storeu_ps(p, v0);
            _mm256_storeu_ps(p.add(8), v1);
        } else {
            let mut t = [0.0f32; NR];
            _mm256_storeu_ps(t.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(t.as_mut_ptr().add(8), acc[1]);
            for (j, &v) in t.iter().enumerate().take(cols) {
                let o = p.add(j);
                *o = if add { *o + v } else { v };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile(
    _kc: usize,
    _sliver: &[f32],
    _panel: &[f32],
    _dst: *mut f32,
    _dst_rs: usize,
    _rows: usize,
    _cols: usize,
    _add: bool,
) {
    unreachable!("the AVX2 panel path is x86_64 only");
}

/// The trainer's f32 products with a weight stored transposed (`[d_out, k]`: the encoder's
/// W_enc^T, the decoder's W_dec) on this CPU's path: `gemm` reads the weight in place; the
/// panel path packs it into one buffer, refreshed before every product, whichever weight.
#[derive(Default)]
pub struct TransposedF32 {
    packed: Option<PackedF32>,
}

impl TransposedF32 {
    /// `out[b, j] = sum_i x[b, i] * w_t[j, i]`, the shapes of `kernels::matmul_xt`.
    pub fn matmul_xt(
        &mut self,
        x: &[f32],
        n: usize,
        d_in: usize,
        w_t: &[f32],
        d_sae: usize,
        out: &mut [f32],
    ) {
        if F32Path::best() == F32Path::Gemm {
            crate::kernels::matmul_xt(x, n, d_in, w_t, d_sae, out);
            return;
        }
        assert_eq!(x.len(), n * d_in);
        assert_eq!(out.len(), n * d_sae);
        match &mut self.packed {
            Some(p) if p.shape() == (d_in, d_sae) => p.repack_transposed(w_t),
            slot => *slot = Some(PackedF32::pack_transposed(w_t, d_in, d_sae)),
        }
        let packed = self.packed.as_ref().expect("packed above");
        matmul(n, x, d_in, packed, out, d_sae, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row, column and k remainders of the tiles, blocks and panels; k above `KC` (two and
    /// three blocks of k); rows above `MC`.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (5, 3, 17),
        (7, 16, 15),
        (13, 50, 33),
        (97, 9, 64),
        (200, 700, 40),
        (31, 1400, 18),
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

    /// The plain f64 product, rounded once.
    fn reference(m: usize, a: &[f32], a_rs: usize, w: &[f32], k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|i| a[r * a_rs + i] as f64 * w[i * n + j] as f64)
                    .sum();
                out[r * n + j] = s as f32;
            }
        }
        out
    }

    fn close(got: f32, want: f32, k: usize) -> bool {
        (got - want).abs() <= 1e-5 * (k as f32).sqrt() * (1.0 + want.abs())
    }

    #[test]
    fn every_path_matches_the_reference_with_strides_and_accumulation() {
        let paths = F32Path::all_available();
        eprintln!("f32 paths here: {paths:?}");
        for path in paths {
            for &(m, k, n) in SHAPES {
                let (a_rs, out_rs) = (k + 3, n + 5);
                let (a, w) = operands(m, a_rs, k, n);
                let want = reference(m, &a, a_rs, &w, k, n);
                let packed = PackedF32::pack_for(path, &w, k, n);
                assert_eq!(packed.values().as_ref(), &w[..], "{path:?} values");
                let mut out = vec![7.0f32; m * out_rs];
                matmul(m, &a, a_rs, &packed, &mut out, out_rs, false);
                let mut again = vec![0.5f32; m * out_rs];
                matmul(m, &a, a_rs, &packed, &mut again, out_rs, true);
                for r in 0..m {
                    for j in 0..out_rs {
                        let (o, g) = (out[r * out_rs + j], again[r * out_rs + j]);
                        if j >= n {
                            assert_eq!((o, g), (7.0, 0.5), "{path:?} wrote past n");
                            continue;
                        }
                        let e = want[r * n + j];
                        assert!(close(o, e, k), "{path:?} {m}x{k}x{n} [{r},{j}] {o} vs {e}");
                        assert!(close(g, e + 0.5, k), "{path:?} accumulate [{r},{j}]");
                    }
                }
            }
        }
    }

    #[test]
    fn transposed_packing_is_the_packing_of_the_transpose() {
        let path = F32Path::Avx2Panels;
        if !path.runs_here() {
            eprintln!("skipped: no AVX2 and FMA here");
            return;
        }
        for &(_, k, n) in SHAPES {
            let (_, w) = operands(0, 0, k, n);
            let mut w_t = vec![0.0f32; k * n];
            for i in 0..k {
                for j in 0..n {
                    w_t[j * k + i] = w[i * n + j];
                }
            }
            let direct = PackedF32::pack_for(path, &w, k, n);
            let mut from_t = PackedF32::pack_transposed(&vec![1.0; k * n], k, n);
            from_t.repack_transposed(&w_t);
            assert_eq!(direct.data, from_t.data, "{k}x{n}");
        }
    }

    #[test]
    fn panel_results_do_not_depend_on_the_thread_count() {
        if !F32Path::Avx2Panels.runs_here() {
            eprintln!("skipped: no AVX2 and FMA here");
            return;
        }
        let (m, k, n) = (300, 1300, 70);
        let (a, w) = operands(m, k, k, n);
        let packed = PackedF32::pack_for(F32Path::Avx2Panels, &w, k, n);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0.0f32; m * n];
            pool.install(|| matmul(m, &a, k, &packed, &mut out, n, false));
            out
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(5));
    }

    #[test]
    fn the_encoder_product_matches_the_gemm_one() {
        let (n, d_in, d_sae) = (37, 70, 90);
        let (x, w_t) = operands(n, d_in, d_sae, d_in);
        let mut want = vec![0.0f32; n * d_sae];
        crate::kernels::matmul_xt(&x, n, d_in, &w_t, d_sae, &mut want);
        let mut enc = TransposedF32::default();
        let mut got = vec![0.0f32; n * d_sae];
        for _ in 0..2 {
            enc.matmul_xt(&x, n, d_in, &w_t, d_sae, &mut got);
            for (g, e) in got.iter().zip(&want) {
                assert!(close(*g, *e, d_in), "{g} vs {e}");
            }
        }
    }
}
