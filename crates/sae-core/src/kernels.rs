//! The CPU kernels of the hot path: dense products through `gemm` on the rayon threads (the
//! encoder product's `gemm` path; `f32_product` picks it or its own kernel) and the small
//! dense-vector helpers the sparse passes are built from.

#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use gemm::{gemm, Parallelism};

/// Whether this CPU has every x86 feature named (`cpu_has!("avx2", "fma")`); false off x86_64.
macro_rules! cpu_has {
    ($($feature:tt),+) => {{
        #[cfg(target_arch = "x86_64")]
        {
            true $(&& std::arch::is_x86_feature_detected!($feature))+
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }};
}
pub(crate) use cpu_has;

/// `gemm`'s threading: the rayon pool's threads.
pub(crate) fn parallelism() -> Parallelism {
    let t = rayon::current_num_threads();
    if t <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(t)
    }
}

/// A pointer to one output buffer that rayon tasks writing disjoint parts of it share. Each
/// user keeps its tasks' regions apart (said at each `unsafe` write).
pub struct SharedMut<T = f32>(pub *mut T);
// SAFETY: only written through by tasks whose regions do not overlap.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Through a method so closures capture the wrapper, not the bare pointer.
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// `out[b, j] = sum_i x[b, i] * w_t[j, i]`: `x` is `[n, d_in]`, `w_t` is `[d_sae, d_in]`
/// (the encoder stored transposed), `out` is `[n, d_sae]`, all row-major.
pub fn matmul_xt(x: &[f32], n: usize, d_in: usize, w_t: &[f32], d_sae: usize, out: &mut [f32]) {
    assert_eq!(x.len(), n * d_in);
    assert_eq!(w_t.len(), d_sae * d_in);
    assert_eq!(out.len(), n * d_sae);
    if n == 0 || d_sae == 0 {
        return;
    }
    // SAFETY: the asserts above make every strided access stay inside the slices.
    unsafe {
        gemm(
            n,
            d_sae,
            d_in,
            out.as_mut_ptr(),
            1,
            d_sae as isize,
            false,
            x.as_ptr(),
            1,
            d_in as isize,
            w_t.as_ptr(),
            d_in as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        )
    }
}

/// Rows per block of [`gram`]: each block computes its rows from its own diagonal on.
const GRAM_BLOCK: usize = 1024;

/// The Gram matrix `out[i, j] = w[i] . w[j]` of the `m` rows of `w` (`[m, d]`), `out`
/// `[m, m]`. It is symmetric, so each block of rows is computed from its diagonal on (about
/// half of the full product's work) and the lower triangle is copied from the upper one.
pub fn gram(w: &[f32], m: usize, d: usize, out: &mut [f32]) {
    gram_in_blocks(w, m, d, out, GRAM_BLOCK)
}

/// [`gram`] with `block` rows per block.
#[doc(hidden)]
pub fn gram_in_blocks(w: &[f32], m: usize, d: usize, out: &mut [f32], block: usize) {
    assert!(block > 0);
    assert_eq!(w.len(), m * d);
    assert_eq!(out.len(), m * m);
    if m == 0 {
        return;
    }
    for i0 in (0..m).step_by(block) {
        let rows = block.min(m - i0);
        let cols = m - i0;
        // SAFETY: rows i0..i0+rows of `out` from column i0 on, and rows i0.. of `w`, all
        // inside the slices asserted above.
        unsafe {
            gemm(
                rows,
                cols,
                d,
                out.as_mut_ptr().add(i0 * m + i0),
                1,
                m as isize,
                false,
                w.as_ptr().add(i0 * d),
                1,
                d as isize,
                w.as_ptr().add(i0 * d),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism(),
            )
        }
    }
    mirror_upper(out, m);
}

/// Copies the upper triangle of the square `[m, m]` matrix onto the lower one, in tiles so
/// that both sides stay in cache.
fn mirror_upper(a: &mut [f32], m: usize) {
    const T: usize = 64;
    for bi in (0..m).step_by(T) {
        for bj in (0..=bi).step_by(T) {
            for i in bi..(bi + T).min(m) {
                for j in bj..(bj + T).min(i) {
                    a[i * m + j] = a[j * m + i];
                }
            }
        }
    }
}

/// `out[b, j] = sum_i x[b, i] * w[i, j]` with `w` in SAELens layout `[d_in, d_sae]`.
pub fn matmul(x: &[f32], n: usize, d_in: usize, w: &[f32], d_sae: usize, out: &mut [f32]) {
    assert_eq!(x.len(), n * d_in);
    assert_eq!(w.len(), d_sae * d_in);
    assert_eq!(out.len(), n * d_sae);
    if n == 0 || d_sae == 0 {
        return;
    }
    // SAFETY: as in `matmul_xt`.
    unsafe {
        gemm(
            n,
            d_sae,
            d_in,
            out.as_mut_ptr(),
            1,
            d_sae as isize,
            false,
            x.as_ptr(),
            1,
            d_in as isize,
            w.as_ptr(),
            1,
            d_sae as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        )
    }
}

/// `out[j, i] (+)= sum_b a[b, j] * x[b, i]`: `a` is `[n, m]`, `x` is `[n, d]`, `out` is
/// `[m, d]` (a transposed-left product); `accumulate` adds to `out` instead of overwriting.
pub fn matmul_tn(
    a: &[f32],
    n: usize,
    m: usize,
    x: &[f32],
    d: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(a.len(), n * m);
    assert_eq!(x.len(), n * d);
    assert_eq!(out.len(), m * d);
    if m == 0 || d == 0 {
        return;
    }
    if n == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    // SAFETY: lhs element (j, b) is a[b * m + j], rhs (b, i) is x[b * d + i]: all in bounds.
    unsafe {
        gemm(
            m,
            d,
            n,
            out.as_mut_ptr(),
            1,
            d as isize,
            accumulate,
            a.as_ptr(),
            m as isize,
            1,
            x.as_ptr(),
            1,
            d as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism(),
        )
    }
}

/// The instruction sets the `multiversion` kernels are compiled for, narrowest first. Their
/// bodies spell out the order of every sum (16 lanes, then a fixed tree), so each path gives
/// the same bits; AVX-512 runs the 16 lanes as one register where AVX2 needs two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SimdPath {
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
    Avx2,
    Avx512,
}

impl SimdPath {
    /// The paths this CPU can run.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<SimdPath> {
        let mut paths = vec![SimdPath::Portable];
        if cpu_has!("avx2", "fma") {
            paths.push(SimdPath::Avx2);
        }
        if cpu_has!("avx512f", "avx512vl") {
            paths.push(SimdPath::Avx512);
        }
        paths
    }
}

#[cfg(test)]
thread_local! {
    static SIMD_CAP: std::cell::Cell<SimdPath> = const { std::cell::Cell::new(SimdPath::Avx512) };
}

/// Runs `f` with this thread's `multiversion` kernels on `cap` at widest (tests force each
/// path with it; rayon workers take it from their pool's start handler).
#[cfg(test)]
pub(crate) fn with_simd_cap<R>(cap: SimdPath, f: impl FnOnce() -> R) -> R {
    let before = SIMD_CAP.with(|c| c.replace(cap));
    let out = f();
    SIMD_CAP.with(|c| c.set(before));
    out
}

/// Sets this thread's widest path for good (a test pool's start handler).
#[cfg(test)]
pub(crate) fn set_simd_cap(cap: SimdPath) {
    SIMD_CAP.with(|c| c.set(cap));
}

/// Whether this thread's kernels may take `path` (always, outside the tests).
#[inline(always)]
pub(crate) fn simd_allows(path: SimdPath) -> bool {
    #[cfg(test)]
    {
        SIMD_CAP.with(|c| c.get()) >= path
    }
    #[cfg(not(test))]
    {
        let _ = path;
        true
    }
}

/// Defines a kernel three times: a portable body and the same body compiled for AVX2+FMA and
/// for AVX-512, the widest the CPU has picked at run time. The bodies use explicit independent
/// accumulators, so every version gives bit-identical results (LLVM does not reassociate float
/// sums or fuse mul+add by itself). On the AVX-512 Zen 4 the AVX-512 versions took the latent
/// pass at d_sae 4608, L0 64 from 30.3 to 27.0 ms and the decode from 13.1 to 11.0 (medians of
/// three paired runs). The kernels written with intrinsics (`dot4_axpy4`, `dot2`,
/// `indices_above`, `entries_above`) have AVX-512, AVX2 and portable paths of their own.
macro_rules! multiversion_impl {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        #[inline]
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::kernels::{simd_allows, SimdPath};
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                if simd_allows(SimdPath::Avx512) && $crate::kernels::cpu_has!("avx512f", "avx512vl") {
                    // SAFETY: the CPU supports the enabled features.
                    return unsafe { avx512($($arg),*) };
                }
                if simd_allows(SimdPath::Avx2) && $crate::kernels::cpu_has!("avx2", "fma") {
                    // SAFETY: the CPU supports the enabled features.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion_impl as multiversion;

const LANES: usize = 16;

#[inline(always)]
fn hsum(acc: &[f32; LANES]) -> f32 {
    let mut s = [0.0f32; 4];
    for l in 0..4 {
        s[l] = (acc[l] + acc[l + 4]) + (acc[l + 8] + acc[l + 12]);
    }
    (s[0] + s[2]) + (s[1] + s[3])
}

multiversion_impl! {
    /// Dot product with 16 independent accumulators.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0.0f32; LANES];
        let mut ca = a.chunks_exact(LANES);
        let mut cb = b.chunks_exact(LANES);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..LANES {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s = 0.0;
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            s += x * y;
        }
        hsum(&acc) + s
    }
}

multiversion_impl! {
    /// `[x . w[0], .., x . w[3]]` reading `x` once: each sum in `dot`'s order, so the same
    /// bits as four calls of `dot`, with four independent chains in flight.
    pub fn dot4(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
        let n = w.iter().fold(x.len(), |n, r| n.min(r.len()));
        let (x, w0, w1, w2, w3) = (&x[..n], &w[0][..n], &w[1][..n], &w[2][..n], &w[3][..n]);
        let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
        let chunks = x
            .chunks_exact(LANES)
            .zip(w0.chunks_exact(LANES))
            .zip(w1.chunks_exact(LANES))
            .zip(w2.chunks_exact(LANES))
            .zip(w3.chunks_exact(LANES));
        for ((((xs, c0), c1), c2), c3) in chunks {
            for l in 0..LANES {
                a0[l] += xs[l] * c0[l];
                a1[l] += xs[l] * c1[l];
                a2[l] += xs[l] * c2[l];
                a3[l] += xs[l] * c3[l];
            }
        }
        let whole = n / LANES * LANES;
        let mut s = [0.0f32; 4];
        for i in whole..n {
            s[0] += x[i] * w0[i];
            s[1] += x[i] * w1[i];
            s[2] += x[i] * w2[i];
            s[3] += x[i] * w3[i];
        }
        [hsum(&a0) + s[0], hsum(&a1) + s[1], hsum(&a2) + s[2], hsum(&a3) + s[3]]
    }
}

multiversion_impl! {
    /// The screened step's per-row lowered cutoffs:
    /// `lo[j] = cut[j] - p * ew[j] - q * nw[j] - c`.
    pub fn screen_bounds(cut: &[f32], ew: &[f32], nw: &[f32], p: f32, q: f32, c: f32, lo: &mut [f32]) -> () {
        for (((l, cj), e), w) in lo.iter_mut().zip(cut).zip(ew).zip(nw) {
            *l = cj - p * e - q * w - c;
        }
    }
}

multiversion_impl! {
    /// `(|v|, |v - bf16(v)|)`: a row's norm and the norm of what rounding it to bf16
    /// (`bf16::to_bf16`, as the bf16 products do) moves.
    pub fn norm_and_bf16_error(v: &[f32]) -> (f32, f32) {
        let mut nrm = [0.0f32; LANES];
        let mut err = [0.0f32; LANES];
        let whole = v.len() / LANES * LANES;
        for i in (0..whole).step_by(LANES) {
            let vs: &[f32; LANES] = v[i..i + LANES].try_into().unwrap();
            for l in 0..LANES {
                let e = vs[l] - crate::bf16::from_bf16(crate::bf16::to_bf16(vs[l]));
                nrm[l] += vs[l] * vs[l];
                err[l] += e * e;
            }
        }
        let (mut sn, mut se) = (0.0f32, 0.0f32);
        for &x in &v[whole..] {
            let e = x - crate::bf16::from_bf16(crate::bf16::to_bf16(x));
            sn += x * x;
            se += e * e;
        }
        ((hsum(&nrm) + sn).sqrt(), (hsum(&err) + se).sqrt())
    }
}

multiversion_impl! {
    /// `y += alpha * x`.
    pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) -> () {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += alpha * xi;
        }
    }
}

multiversion_impl! {
    /// `y += a1 * x` and `z += a2 * x` in one pass over `x`.
    pub fn axpy2(a1: f32, a2: f32, x: &[f32], y: &mut [f32], z: &mut [f32]) -> () {
        let n = x.len().min(y.len()).min(z.len());
        let (x, y, z) = (&x[..n], &mut y[..n], &mut z[..n]);
        for i in 0..n {
            y[i] += a1 * x[i];
            z[i] += a2 * x[i];
        }
    }
}

/// Defines `(x . a, x . b)` reading `x` once, for rows `x` of element type `$t` (widened to
/// f32 by `$widen`, eight at a time by `$load8`): a portable body and AVX2 intrinsics with
/// the lane structure of [`dot`], so both give the same bits (LLVM does not vectorise this
/// one well by itself).
macro_rules! dot2_impl {
    ($(#[$m:meta])* $name:ident, $portable:ident, $inner:ident, $avx2:ident, $avx512:ident, $t:ty, |$v:ident| $widen:expr, |$p:ident| $load8:expr, |$q:ident| $load16:expr) => {
        $(#[$m])*
        #[inline]
        pub fn $name(x: &[$t], a: &[f32], b: &[f32]) -> (f32, f32) {
            $inner::<true>(x, a, b)
        }

        /// The portable body alone, for the tests on any CPU.
        #[cfg(test)]
        pub(crate) fn $portable(x: &[$t], a: &[f32], b: &[f32]) -> (f32, f32) {
            $inner::<false>(x, a, b)
        }

        #[inline(always)]
        fn $inner<const SIMD: bool>(x: &[$t], a: &[f32], b: &[f32]) -> (f32, f32) {
            let widen = |$v: $t| -> f32 { $widen };
            let n = x.len().min(a.len()).min(b.len());
            let (x, a, b) = (&x[..n], &a[..n], &b[..n]);
            let full = n / LANES * LANES;
            let (mut acc, mut acc_b) = ([0.0f32; LANES], [0.0f32; LANES]);
            #[cfg(target_arch = "x86_64")]
            let done = if SIMD && simd_allows(SimdPath::Avx512) && cpu_has!("avx512f") {
                // SAFETY: AVX-512F is present; all loads are within `full <= n`.
                unsafe { $avx512(x, a, b, full, &mut acc, &mut acc_b) };
                true
            } else if SIMD && simd_allows(SimdPath::Avx2) && cpu_has!("avx2") {
                // SAFETY: AVX2 is present; all loads are within `full <= n`.
                unsafe { $avx2(x, a, b, full, &mut acc, &mut acc_b) };
                true
            } else {
                false
            };
            #[cfg(not(target_arch = "x86_64"))]
            let done = false;
            if !done {
                for i0 in (0..full).step_by(LANES) {
                    for l in 0..LANES {
                        let w = widen(x[i0 + l]);
                        acc[l] += w * a[i0 + l];
                        acc_b[l] += w * b[i0 + l];
                    }
                }
            }
            let (mut s, mut sb) = (0.0, 0.0);
            for i in full..n {
                s += widen(x[i]) * a[i];
                sb += widen(x[i]) * b[i];
            }
            (hsum(&acc) + s, hsum(&acc_b) + sb)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2(
            x: &[$t],
            a: &[f32],
            b: &[f32],
            full: usize,
            acc: &mut [f32; LANES],
            acc_b: &mut [f32; LANES],
        ) {
            use std::arch::x86_64::*;
            let (px, pa, pb) = (x.as_ptr(), a.as_ptr(), b.as_ptr());
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (mut b0, mut b1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i < full {
                let x0 = { let $p = px.add(i); $load8 };
                let x1 = { let $p = px.add(i + 8); $load8 };
                a0 = _mm256_add_ps(a0, _mm256_mul_ps(x0, _mm256_loadu_ps(pa.add(i))));
                a1 = _mm256_add_ps(a1, _mm256_mul_ps(x1, _mm256_loadu_ps(pa.add(i + 8))));
                b0 = _mm256_add_ps(b0, _mm256_mul_ps(x0, _mm256_loadu_ps(pb.add(i))));
                b1 = _mm256_add_ps(b1, _mm256_mul_ps(x1, _mm256_loadu_ps(pb.add(i + 8))));
                i += LANES;
            }
            _mm256_storeu_ps(acc.as_mut_ptr(), a0);
            _mm256_storeu_ps(acc.as_mut_ptr().add(8), a1);
            _mm256_storeu_ps(acc_b.as_mut_ptr(), b0);
            _mm256_storeu_ps(acc_b.as_mut_ptr().add(8), b1);
        }

        /// The sixteen lanes in one register: lane l sums what lane l of the AVX2 pair and
        /// of the portable body sum, in the same order.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512(
            x: &[$t],
            a: &[f32],
            b: &[f32],
            full: usize,
            acc: &mut [f32; LANES],
            acc_b: &mut [f32; LANES],
        ) {
            use std::arch::x86_64::*;
            let (px, pa, pb) = (x.as_ptr(), a.as_ptr(), b.as_ptr());
            let (mut sa, mut sb) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut i = 0;
            while i < full {
                let xs = { let $q = px.add(i); $load16 };
                sa = _mm512_add_ps(sa, _mm512_mul_ps(xs, _mm512_loadu_ps(pa.add(i))));
                sb = _mm512_add_ps(sb, _mm512_mul_ps(xs, _mm512_loadu_ps(pb.add(i))));
                i += LANES;
            }
            _mm512_storeu_ps(acc.as_mut_ptr(), sa);
            _mm512_storeu_ps(acc_b.as_mut_ptr(), sb);
        }
    };
}

dot2_impl!(
    /// `(x . a, x . b)` reading `x` once.
    dot2, dot2_portable, dot2_inner, dot2_avx2, dot2_avx512, f32, |v| v, |p| _mm256_loadu_ps(p),
    |p| _mm512_loadu_ps(p)
);

/// The element types of the rows the sparse passes gather: f32, and bf16 (`u16` bits),
/// widened to f32 exactly by a shift into the high half.
pub trait GatherRow: Copy {
    fn widen(self) -> f32;
}

impl GatherRow for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl GatherRow for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

// Grouped kernels: several gathered rows per pass over the output. A random row misses the
// cache; four rows in one loop keep four misses in flight and store the output once instead
// of four times. Per element they add in the order of the one-row kernels, so a group gives
// exactly the bits of the same calls one row at a time.

#[inline(always)]
fn axpy4_body<T: GatherRow>(a: [f32; 4], x: [&[T]; 4], y: &mut [f32]) {
    let n = x.iter().fold(y.len(), |n, r| n.min(r.len()));
    let (x0, x1, x2, x3, y) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n], &mut y[..n]);
    for i in 0..n {
        let mut v = y[i];
        v += a[0] * x0[i].widen();
        v += a[1] * x1[i].widen();
        v += a[2] * x2[i].widen();
        v += a[3] * x3[i].widen();
        y[i] = v;
    }
}

#[inline(always)]
fn axpy2x4_body<T: GatherRow>(
    a1: [f32; 4],
    a2: [f32; 4],
    x: [&[T]; 4],
    y: &mut [f32],
    z: &mut [f32],
) {
    let n = x.iter().fold(y.len().min(z.len()), |n, r| n.min(r.len()));
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    let (y, z) = (&mut y[..n], &mut z[..n]);
    for i in 0..n {
        let w = [x0[i].widen(), x1[i].widen(), x2[i].widen(), x3[i].widen()];
        let (mut u, mut v) = (y[i], z[i]);
        for q in 0..4 {
            u += a1[q] * w[q];
            v += a2[q] * w[q];
        }
        y[i] = u;
        z[i] = v;
    }
}

multiversion_impl! {
    /// `y += a[0] * x[0]`, then `a[1] * x[1]`, ... : four [`axpy`] calls in one pass.
    pub fn axpy4(a: [f32; 4], x: [&[f32]; 4], y: &mut [f32]) -> () {
        axpy4_body(a, x, y)
    }
}

multiversion_impl! {
    /// [`axpy4`] with bf16 rows.
    pub fn axpy4_h(a: [f32; 4], x: [&[u16]; 4], y: &mut [f32]) -> () {
        axpy4_body(a, x, y)
    }
}

multiversion_impl! {
    /// Four [`axpy2`] calls (`y += a1[q] * x[q]`, `z += a2[q] * x[q]`) in one pass.
    pub fn axpy2x4(a1: [f32; 4], a2: [f32; 4], x: [&[f32]; 4], y: &mut [f32], z: &mut [f32]) -> () {
        axpy2x4_body(a1, a2, x, y, z)
    }
}

multiversion_impl! {
    /// [`axpy2x4`] with bf16 rows.
    pub fn axpy2x4_h(a1: [f32; 4], a2: [f32; 4], x: [&[u16]; 4], y: &mut [f32], z: &mut [f32]) -> () {
        axpy2x4_body(a1, a2, x, y, z)
    }
}

/// Defines `[x[0] . y, .., x[3] . y]` and `g += c[0] * x[0]`, then `c[1] * x[1]`, ... in one
/// pass over four gathered rows of element type `$t` (loaded eight at a time by `$load8`):
/// a portable body and AVX2 intrinsics. Each dot keeps [`dot`]'s lanes and remainder and
/// `g` gets [`axpy`]'s order, so the result is four `dot` and four `axpy` calls' bits (LLVM
/// does not vectorise this one well by itself).
macro_rules! dot4_axpy4_impl {
    ($(#[$m:meta])* $name:ident, $portable:ident, $inner:ident, $avx2:ident, $avx512:ident, $t:ty, |$p:ident| $load8:expr, |$p16:ident| $load16:expr) => {
        $(#[$m])*
        #[inline]
        pub fn $name(x: [&[$t]; 4], y: &[f32], c: [f32; 4], g: &mut [f32]) -> [f32; 4] {
            $inner::<true>(x, y, c, g)
        }

        /// The portable body alone, for the tests on any CPU.
        #[cfg(test)]
        pub(crate) fn $portable(x: [&[$t]; 4], y: &[f32], c: [f32; 4], g: &mut [f32]) -> [f32; 4] {
            $inner::<false>(x, y, c, g)
        }

        #[inline(always)]
        fn $inner<const SIMD: bool>(x: [&[$t]; 4], y: &[f32], c: [f32; 4], g: &mut [f32]) -> [f32; 4] {
            let n = x.iter().fold(y.len().min(g.len()), |n, r| n.min(r.len()));
            let x = x.map(|r| &r[..n]);
            let (y, g) = (&y[..n], &mut g[..n]);
            let full = n / LANES * LANES;
            let mut acc = [[0.0f32; LANES]; 4];
            #[cfg(target_arch = "x86_64")]
            let done = if SIMD && simd_allows(SimdPath::Avx512) && cpu_has!("avx512f") {
                // SAFETY: AVX-512F is present; all loads and stores are within `full <= n`.
                unsafe { $avx512(x, y, c, g, full, &mut acc) };
                true
            } else if SIMD && simd_allows(SimdPath::Avx2) && cpu_has!("avx2") {
                // SAFETY: AVX2 is present; all loads and stores are within `full <= n`.
                unsafe { $avx2(x, y, c, g, full, &mut acc) };
                true
            } else {
                false
            };
            #[cfg(not(target_arch = "x86_64"))]
            let done = false;
            if !done {
                for i0 in (0..full).step_by(LANES) {
                    for l in 0..LANES {
                        let i = i0 + l;
                        let mut u = g[i];
                        for q in 0..4 {
                            let v = x[q][i].widen();
                            acc[q][l] += v * y[i];
                            u += c[q] * v;
                        }
                        g[i] = u;
                    }
                }
            }
            for i in full..n {
                let mut u = g[i];
                for q in 0..4 {
                    u += c[q] * x[q][i].widen();
                }
                g[i] = u;
            }
            std::array::from_fn(|q| {
                let mut s = 0.0;
                for i in full..n {
                    s += x[q][i].widen() * y[i];
                }
                hsum(&acc[q]) + s
            })
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2(
            x: [&[$t]; 4],
            y: &[f32],
            c: [f32; 4],
            g: &mut [f32],
            full: usize,
            acc: &mut [[f32; LANES]; 4],
        ) {
            use std::arch::x86_64::*;
            let (py, pg) = (y.as_ptr(), g.as_mut_ptr());
            let px = x.map(|r| r.as_ptr());
            let cv = c.map(|v| _mm256_set1_ps(v));
            let mut lo = [_mm256_setzero_ps(); 4];
            let mut hi = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < full {
                let (y0, y1) = (_mm256_loadu_ps(py.add(i)), _mm256_loadu_ps(py.add(i + 8)));
                let (mut g0, mut g1) = (_mm256_loadu_ps(pg.add(i)), _mm256_loadu_ps(pg.add(i + 8)));
                for q in 0..4 {
                    let x0 = { let $p = px[q].add(i); $load8 };
                    let x1 = { let $p = px[q].add(i + 8); $load8 };
                    lo[q] = _mm256_add_ps(lo[q], _mm256_mul_ps(x0, y0));
                    hi[q] = _mm256_add_ps(hi[q], _mm256_mul_ps(x1, y1));
                    g0 = _mm256_add_ps(g0, _mm256_mul_ps(cv[q], x0));
                    g1 = _mm256_add_ps(g1, _mm256_mul_ps(cv[q], x1));
                }
                _mm256_storeu_ps(pg.add(i), g0);
                _mm256_storeu_ps(pg.add(i + 8), g1);
                i += LANES;
            }
            for q in 0..4 {
                _mm256_storeu_ps(acc[q].as_mut_ptr(), lo[q]);
                _mm256_storeu_ps(acc[q].as_mut_ptr().add(8), hi[q]);
            }
        }

        /// The AVX2 loop with the 16 lanes in one register: the same operations per lane.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512(
            x: [&[$t]; 4],
            y: &[f32],
            c: [f32; 4],
            g: &mut [f32],
            full: usize,
            acc: &mut [[f32; LANES]; 4],
        ) {
            use std::arch::x86_64::*;
            let (py, pg) = (y.as_ptr(), g.as_mut_ptr());
            let px = x.map(|r| r.as_ptr());
            let cv = c.map(|v| _mm512_set1_ps(v));
            let mut sums = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i < full {
                let yv = _mm512_loadu_ps(py.add(i));
                let mut gv = _mm512_loadu_ps(pg.add(i));
                for q in 0..4 {
                    let xv = { let $p16 = px[q].add(i); $load16 };
                    sums[q] = _mm512_add_ps(sums[q], _mm512_mul_ps(xv, yv));
                    gv = _mm512_add_ps(gv, _mm512_mul_ps(cv[q], xv));
                }
                _mm512_storeu_ps(pg.add(i), gv);
                i += LANES;
            }
            for q in 0..4 {
                _mm512_storeu_ps(acc[q].as_mut_ptr(), sums[q]);
            }
        }
    };
}

dot4_axpy4_impl!(
    /// Four [`dot`]s of gathered rows with `y` and four [`axpy`]s of them into `g`, reading
    /// each row once.
    dot4_axpy4,
    dot4_axpy4_portable,
    dot4_axpy4_inner,
    dot4_axpy4_avx2,
    dot4_axpy4_avx512,
    f32,
    |p| _mm256_loadu_ps(p),
    |p| _mm512_loadu_ps(p)
);

dot4_axpy4_impl!(
    /// [`dot4_axpy4`] with bf16 rows.
    dot4_axpy4_h,
    dot4_axpy4_h_portable,
    dot4_axpy4_h_inner,
    dot4_axpy4_h_avx2,
    dot4_axpy4_h_avx512,
    u16,
    |p| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
        p as *const __m128i
    )))),
    |p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
        p as *const __m256i
    ))))
);

/// Appends every `j` with `v[j] > cutoff[j]` to `out` (NaN on either side never passes).
///
/// Without branches on the comparisons: which latents pass is data (a few percent of a
/// row, at random places), so a branch per passing latent would mispredict.
pub fn indices_above(v: &[f32], cutoff: &[f32], out: &mut Vec<u32>) {
    #[cfg(target_arch = "x86_64")]
    {
        if cpu_has!("avx512f") && simd_allows(SimdPath::Avx512) {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { indices_above_avx512(v, cutoff, out) };
        }
        if cpu_has!("avx2") && simd_allows(SimdPath::Avx2) {
            // SAFETY: the CPU has AVX2.
            return unsafe { indices_above_avx2(v, cutoff, out) };
        }
    }
    indices_above_plain(v, cutoff, out)
}

/// [`indices_above`] on any CPU: every index is written, the length moves past the passing
/// ones.
pub(crate) fn indices_above_plain(v: &[f32], cutoff: &[f32], out: &mut Vec<u32>) {
    let n = v.len().min(cutoff.len());
    let start = out.len();
    out.resize(start + n, 0);
    let mut len = start;
    for (i, (x, c)) in v[..n].iter().zip(&cutoff[..n]).enumerate() {
        out[len] = i as u32;
        len += (x > c) as usize;
    }
    out.truncate(len);
}

/// After a vector pass over `v[..full]` that wrote `end - out.len()` indices past the end:
/// keeps them, and appends the tail's (counted from `full`).
///
/// # Safety
/// Those `end - out.len()` indices must have been written, within the capacity.
#[cfg(target_arch = "x86_64")]
unsafe fn indices_above_finish(
    v: &[f32],
    cutoff: &[f32],
    full: usize,
    end: usize,
    out: &mut Vec<u32>,
) {
    let n = v.len().min(cutoff.len());
    out.set_len(end);
    indices_above_plain(&v[full..n], &cutoff[full..n], out);
    out[end..].iter_mut().for_each(|j| *j += full as u32);
}

/// [`indices_above`] with AVX-512: sixteen comparisons into a mask; where any pass, one
/// compress of the lane indices and one store. Most rows of a sparse code pass nowhere in a
/// step, which is a branch the AVX2 version's shuffle does not have.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn indices_above_avx512(v: &[f32], cutoff: &[f32], out: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    let n = v.len().min(cutoff.len());
    let full = n / 16 * 16;
    let start = out.len();
    // Each store writes sixteen lanes; only the passing ones are kept.
    out.reserve(full + 16);
    let dst = out.as_mut_ptr().add(start);
    let mut len = 0usize;
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let step = _mm512_set1_epi32(16);
    let mut i = 0;
    while i < full {
        let x = _mm512_loadu_ps(v.as_ptr().add(i));
        let c = _mm512_loadu_ps(cutoff.as_ptr().add(i));
        let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, c);
        if m != 0 {
            // `len + 16 <= full + 16`: inside the reserved capacity.
            _mm512_storeu_si512(
                dst.add(len) as *mut __m512i,
                _mm512_maskz_compress_epi32(m, idx),
            );
            len += m.count_ones() as usize;
        }
        idx = _mm512_add_epi32(idx, step);
        i += 16;
    }
    indices_above_finish(v, cutoff, full, start + len, out);
}

/// Appends every `j` with `v[j] > cut[j] - p * ew[j] - q * wn[j] - c` (the margin terms of
/// `t`; NaN never passes) to `out`: [`indices_above`] against `kernels::screen_bounds`'
/// cutoffs with the same bits, without writing those cutoffs out. The screened step's test
/// of a row.
pub fn indices_above_margin(v: &[f32], cut: &[f32], t: MarginTerms, out: &mut Vec<u32>) {
    #[cfg(target_arch = "x86_64")]
    {
        if cpu_has!("avx512f") && simd_allows(SimdPath::Avx512) {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { indices_above_margin_avx512(v, cut, t, out) };
        }
        if cpu_has!("avx2") && simd_allows(SimdPath::Avx2) {
            // SAFETY: the CPU has AVX2.
            return unsafe { indices_above_margin_avx2(v, cut, t, out) };
        }
    }
    indices_above_margin_from(0, v, cut, t, out)
}

/// [`indices_above_margin`] over the indices from `from` on, on any CPU.
pub(crate) fn indices_above_margin_from(
    from: usize,
    v: &[f32],
    cut: &[f32],
    t: MarginTerms,
    out: &mut Vec<u32>,
) {
    for j in from..bounds_len(v, cut, &t) {
        if v[j] > t.lowered(cut[j], j) {
            out.push(j as u32);
        }
    }
}

/// [`indices_above_margin`] with AVX-512: sixteen cutoffs (the plain version's operations in
/// its order), one comparison mask, and where any pass, one compress and store.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn indices_above_margin_avx512(
    v: &[f32],
    cut: &[f32],
    t: MarginTerms,
    out: &mut Vec<u32>,
) {
    use std::arch::x86_64::*;
    let n = bounds_len(v, cut, &t);
    let full = n / 16 * 16;
    let start = out.len();
    // Each store writes sixteen lanes; only the passing ones are kept.
    out.reserve(full + 16);
    let dst = out.as_mut_ptr().add(start);
    let (p, q, c) = (
        _mm512_set1_ps(t.p),
        _mm512_set1_ps(t.q),
        _mm512_set1_ps(t.c),
    );
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let step = _mm512_set1_epi32(16);
    let mut len = 0usize;
    let mut i = 0;
    while i < full {
        let lo = _mm512_sub_ps(
            _mm512_sub_ps(
                _mm512_sub_ps(
                    _mm512_loadu_ps(cut.as_ptr().add(i)),
                    _mm512_mul_ps(p, _mm512_loadu_ps(t.ew.as_ptr().add(i))),
                ),
                _mm512_mul_ps(q, _mm512_loadu_ps(t.wn.as_ptr().add(i))),
            ),
            c,
        );
        let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_loadu_ps(v.as_ptr().add(i)), lo);
        if m != 0 {
            // `len + 16 <= full + 16`: inside the reserved capacity.
            _mm512_storeu_si512(
                dst.add(len) as *mut __m512i,
                _mm512_maskz_compress_epi32(m, idx),
            );
            len += m.count_ones() as usize;
        }
        idx = _mm512_add_epi32(idx, step);
        i += 16;
    }
    // The first `len` values past `start` were written above.
    out.set_len(start + len);
    indices_above_margin_from(full, v, cut, t, out)
}

/// [`indices_above_margin`] with AVX2: eight cutoffs, one mask, one lane shuffle and one
/// store per step.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn indices_above_margin_avx2(
    v: &[f32],
    cut: &[f32],
    t: MarginTerms,
    out: &mut Vec<u32>,
) {
    use std::arch::x86_64::*;
    let n = bounds_len(v, cut, &t);
    let full = n / 8 * 8;
    let start = out.len();
    // Each store writes eight lanes; only the passing ones are kept.
    out.reserve(full + 8);
    let dst = out.as_mut_ptr().add(start);
    let (p, q, c) = (
        _mm256_set1_ps(t.p),
        _mm256_set1_ps(t.q),
        _mm256_set1_ps(t.c),
    );
    let mut idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let step = _mm256_set1_epi32(8);
    let mut len = 0usize;
    let mut i = 0;
    while i < full {
        let lo = _mm256_sub_ps(
            _mm256_sub_ps(
                _mm256_sub_ps(
                    _mm256_loadu_ps(cut.as_ptr().add(i)),
                    _mm256_mul_ps(p, _mm256_loadu_ps(t.ew.as_ptr().add(i))),
                ),
                _mm256_mul_ps(q, _mm256_loadu_ps(t.wn.as_ptr().add(i))),
            ),
            c,
        );
        let x = _mm256_loadu_ps(v.as_ptr().add(i));
        let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, lo)) as usize;
        let order = _mm256_loadu_si256(LEFT_PACK[m].as_ptr() as *const __m256i);
        // `len + 8 <= full + 8`: inside the reserved capacity.
        _mm256_storeu_si256(
            dst.add(len) as *mut __m256i,
            _mm256_permutevar8x32_epi32(idx, order),
        );
        len += m.count_ones() as usize;
        idx = _mm256_add_epi32(idx, step);
        i += 8;
    }
    // The first `len` values past `start` were written above.
    out.set_len(start + len);
    indices_above_margin_from(full, v, cut, t, out)
}

/// Lane orders that move the lanes set in an 8-bit mask to the front, in order.
#[cfg(target_arch = "x86_64")]
const LEFT_PACK: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut l, mut k) = (0, 0);
        while l < 8 {
            if m >> l & 1 == 1 {
                t[m][k] = l as u32;
                k += 1;
            }
            l += 1;
        }
        m += 1;
    }
    t
};

/// [`indices_above`] with AVX2: eight comparisons, one mask, one lane shuffle and one store
/// per step.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn indices_above_avx2(v: &[f32], cutoff: &[f32], out: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    let n = v.len().min(cutoff.len());
    let full = n / 8 * 8;
    let start = out.len();
    // Each store writes eight lanes; only the passing ones are kept.
    out.reserve(full + 8);
    let dst = out.as_mut_ptr().add(start);
    let mut len = 0usize;
    let mut idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let step = _mm256_set1_epi32(8);
    let mut i = 0;
    while i < full {
        let x = _mm256_loadu_ps(v.as_ptr().add(i));
        let c = _mm256_loadu_ps(cutoff.as_ptr().add(i));
        let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, c)) as usize;
        let order = _mm256_loadu_si256(LEFT_PACK[m].as_ptr() as *const __m256i);
        // `len + 8 <= full + 8`: inside the reserved capacity.
        _mm256_storeu_si256(
            dst.add(len) as *mut __m256i,
            _mm256_permutevar8x32_epi32(idx, order),
        );
        len += m.count_ones() as usize;
        idx = _mm256_add_epi32(idx, step);
        i += 8;
    }
    // The first `len` values past `start` were written above.
    out.set_len(start + len);
    for i in full..n {
        if v[i] > cutoff[i] {
            out.push(i as u32);
        }
    }
}

/// Entries of a row kept by [`entries_above`], appended in order of `j`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EntriesAbove {
    pub idx: Vec<u32>,
    /// `v[j] + b[j]`.
    pub sum: Vec<f32>,
    /// `v[j]`.
    pub raw: Vec<f32>,
}

impl EntriesAbove {
    pub fn len(&self) -> usize {
        self.idx.len()
    }
    pub fn is_empty(&self) -> bool {
        self.idx.is_empty()
    }
    pub fn clear(&mut self) {
        self.idx.clear();
        self.sum.clear();
        self.raw.clear();
    }
    /// Room for `extra` more entries, and where the next one goes in each column.
    #[cfg(target_arch = "x86_64")]
    fn spare(&mut self, extra: usize) -> (*mut u32, *mut f32, *mut f32) {
        let start = self.len();
        self.idx.reserve(extra);
        self.sum.reserve(extra);
        self.raw.reserve(extra);
        // SAFETY: `start` is each column's length, within its capacity.
        unsafe {
            (
                self.idx.as_mut_ptr().add(start),
                self.sum.as_mut_ptr().add(start),
                self.raw.as_mut_ptr().add(start),
            )
        }
    }

    fn truncate(&mut self, len: usize) {
        self.idx.truncate(len);
        self.sum.truncate(len);
        self.raw.truncate(len);
    }
}

/// Appends every `j` with `v[j] + b[j] > lb` to `out`, with that sum and `v[j]` (NaN never
/// passes), without branches on the comparisons, as [`indices_above`].
pub fn entries_above(v: &[f32], b: &[f32], lb: f32, out: &mut EntriesAbove) {
    #[cfg(target_arch = "x86_64")]
    {
        if cpu_has!("avx512f") && simd_allows(SimdPath::Avx512) {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { entries_above_avx512(v, b, lb, out) };
        }
        if cpu_has!("avx2") && simd_allows(SimdPath::Avx2) {
            // SAFETY: the CPU has AVX2.
            return unsafe { entries_above_avx2(v, b, lb, out) };
        }
    }
    entries_above_plain(v, b, lb, out)
}

/// [`entries_above`] over the latents `js` only (ascending), whose values are `vals`, as a
/// screened step lists them.
pub fn listed_entries_above(vals: &[f32], b: &[f32], js: &[u32], lb: f32, out: &mut EntriesAbove) {
    for (&j, &x) in js.iter().zip(vals) {
        let c = b[j as usize];
        let s = x + c;
        if s > lb {
            out.idx.push(j);
            out.sum.push(s);
            out.raw.push(x);
        }
    }
}

/// [`entries_above`] on any CPU: every entry is written, the length moves past the passing
/// ones.
pub(crate) fn entries_above_plain(v: &[f32], b: &[f32], lb: f32, out: &mut EntriesAbove) {
    let n = v.len().min(b.len());
    let start = out.len();
    out.idx.resize(start + n, 0);
    out.sum.resize(start + n, 0.0);
    out.raw.resize(start + n, 0.0);
    let mut len = start;
    for (j, (x, c)) in v[..n].iter().zip(&b[..n]).enumerate() {
        let s = x + c;
        out.idx[len] = j as u32;
        out.sum[len] = s;
        out.raw[len] = *x;
        len += (s > lb) as usize;
    }
    out.truncate(len);
}

/// After a vector pass over `v[..full]` that wrote `end - out.len()` entries past the end:
/// keeps them, and appends the tail's entries (indices counted from `full`).
///
/// # Safety
/// Those `end - out.len()` entries must have been written, within the capacity.
#[cfg(target_arch = "x86_64")]
unsafe fn entries_above_finish(
    v: &[f32],
    b: &[f32],
    lb: f32,
    full: usize,
    end: usize,
    out: &mut EntriesAbove,
) {
    let n = v.len().min(b.len());
    out.idx.set_len(end);
    out.sum.set_len(end);
    out.raw.set_len(end);
    entries_above_plain(&v[full..n], &b[full..n], lb, out);
    out.idx[end..].iter_mut().for_each(|j| *j += full as u32);
}

/// [`entries_above`] with AVX-512: sixteen sums and one mask; where any pass, the indices,
/// sums and values compressed by that mask and stored.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn entries_above_avx512(v: &[f32], b: &[f32], lb: f32, out: &mut EntriesAbove) {
    use std::arch::x86_64::*;
    let n = v.len().min(b.len());
    let full = n / 16 * 16;
    let start = out.len();
    // Each store writes sixteen lanes; only the passing ones are kept.
    let (di, ds, dr) = out.spare(full + 16);
    let mut len = 0usize;
    let bound = _mm512_set1_ps(lb);
    let mut lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let step = _mm512_set1_epi32(16);
    let mut i = 0;
    while i < full {
        let x = _mm512_loadu_ps(v.as_ptr().add(i));
        let s = _mm512_add_ps(x, _mm512_loadu_ps(b.as_ptr().add(i)));
        let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, bound);
        if m != 0 {
            // `len + 16 <= full + 16`: inside the reserved capacities.
            _mm512_storeu_si512(
                di.add(len) as *mut __m512i,
                _mm512_maskz_compress_epi32(m, lanes),
            );
            _mm512_storeu_ps(ds.add(len), _mm512_maskz_compress_ps(m, s));
            _mm512_storeu_ps(dr.add(len), _mm512_maskz_compress_ps(m, x));
            len += m.count_ones() as usize;
        }
        lanes = _mm512_add_epi32(lanes, step);
        i += 16;
    }
    entries_above_finish(v, b, lb, full, start + len, out);
}

/// [`entries_above`] with AVX2: eight sums, one mask and the same lane shuffle for the
/// indices, the sums and the values per step.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn entries_above_avx2(v: &[f32], b: &[f32], lb: f32, out: &mut EntriesAbove) {
    use std::arch::x86_64::*;
    let n = v.len().min(b.len());
    let full = n / 8 * 8;
    let start = out.len();
    // Each store writes eight lanes; only the passing ones are kept.
    let (di, ds, dr) = out.spare(full + 8);
    let mut len = 0usize;
    let bound = _mm256_set1_ps(lb);
    let mut lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let step = _mm256_set1_epi32(8);
    let mut i = 0;
    while i < full {
        let x = _mm256_loadu_ps(v.as_ptr().add(i));
        let s = _mm256_add_ps(x, _mm256_loadu_ps(b.as_ptr().add(i)));
        let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(s, bound)) as usize;
        let order = _mm256_loadu_si256(LEFT_PACK[m].as_ptr() as *const __m256i);
        // `len + 8 <= full + 8`: inside the reserved capacities.
        _mm256_storeu_si256(
            di.add(len) as *mut __m256i,
            _mm256_permutevar8x32_epi32(lanes, order),
        );
        _mm256_storeu_ps(ds.add(len), _mm256_permutevar8x32_ps(s, order));
        _mm256_storeu_ps(dr.add(len), _mm256_permutevar8x32_ps(x, order));
        len += m.count_ones() as usize;
        lanes = _mm256_add_epi32(lanes, step);
        i += 8;
    }
    entries_above_finish(v, b, lb, full, start + len, out);
}

/// A row's margin terms in the screened step: latent `j`'s margin is
/// `p * ew[j] + q * wn[j] + c`.
#[derive(Clone, Copy, Debug)]
pub struct MarginTerms<'a> {
    pub ew: &'a [f32],
    pub wn: &'a [f32],
    pub p: f32,
    pub q: f32,
    pub c: f32,
}

impl MarginTerms<'_> {
    /// Latent `j`'s margin.
    #[inline(always)]
    pub fn margin(&self, j: usize) -> f32 {
        self.p * self.ew[j] + self.q * self.wn[j] + self.c
    }

    /// `cut` lowered by latent `j`'s margin, in the order of operations every screen kernel
    /// takes (`screen_bounds`, `indices_above_margin`), so with their bits.
    #[inline(always)]
    pub fn lowered(&self, cut: f32, j: usize) -> f32 {
        cut - self.p * self.ew[j] - self.q * self.wn[j] - self.c
    }
}

/// A value at or under the f32 score of an entry whose bf16 score is `score` and whose
/// margin is `margin` (lowered below its own rounding; 0 at least). The k-th largest of
/// these over a set is under the set's k-th largest f32 score: each of the k entries it
/// ranks first scores at least that in f32.
pub fn score_floor(score: f32, margin: f32) -> f32 {
    let floor = score - margin * (1.0 + 2f32.powi(-20)) - score.abs() * 2f32.powi(-20);
    floor.max(0.0)
}

/// `score_floor` as bits that order as the values do (it is at least +0; adding +0 turns
/// -0 into +0).
fn floor_key(score: f32, margin: f32) -> u32 {
    (score_floor(score, margin) + 0.0).to_bits()
}

/// Appends every `j` with `v[j] - base[j] > floor` to `idx` and, beside it in `keys`, the
/// bound under that entry's f32 score (`score_floor` of that difference and the entry's
/// margin, as ordered bits), in one pass and without branches on the comparisons. A top-k
/// screen's candidates for the k-th score of a row (NaN never passes).
pub fn bounds_above(
    v: &[f32],
    base: &[f32],
    terms: MarginTerms,
    floor: f32,
    idx: &mut Vec<u32>,
    keys: &mut Vec<u32>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if cpu_has!("avx512f") && simd_allows(SimdPath::Avx512) {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { bounds_above_avx512(v, base, terms, floor, idx, keys) };
        }
        if cpu_has!("avx2") && simd_allows(SimdPath::Avx2) {
            // SAFETY: the CPU has AVX2.
            return unsafe { bounds_above_avx2(v, base, terms, floor, idx, keys) };
        }
    }
    bounds_above_from(0, v, base, terms, floor, idx, keys)
}

/// The length every input of [`bounds_above`] has.
fn bounds_len(v: &[f32], base: &[f32], t: &MarginTerms) -> usize {
    v.len().min(base.len()).min(t.ew.len()).min(t.wn.len())
}

/// [`bounds_above`] over the indices from `from` on, on any CPU.
pub(crate) fn bounds_above_from(
    from: usize,
    v: &[f32],
    base: &[f32],
    t: MarginTerms,
    floor: f32,
    idx: &mut Vec<u32>,
    keys: &mut Vec<u32>,
) {
    for j in from..bounds_len(v, base, &t) {
        let s = v[j] - base[j];
        if s > floor {
            idx.push(j as u32);
            keys.push(floor_key(s, t.margin(j)));
        }
    }
}

/// [`bounds_above`] with AVX-512: sixteen differences, their margins and bounds (the plain
/// version's operations in its order, so the same bits) and one mask; the indices and
/// bounds compressed by it and stored.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn bounds_above_avx512(
    v: &[f32],
    base: &[f32],
    t: MarginTerms,
    floor: f32,
    idx: &mut Vec<u32>,
    keys: &mut Vec<u32>,
) {
    use std::arch::x86_64::*;
    let n = bounds_len(v, base, &t);
    let full = n / 16 * 16;
    let (si, sk) = (idx.len(), keys.len());
    // Each store writes sixteen lanes; only the passing ones are kept.
    idx.reserve(full + 16);
    keys.reserve(full + 16);
    let (di, dk) = (idx.as_mut_ptr().add(si), keys.as_mut_ptr().add(sk));
    let (p, q, c) = (
        _mm512_set1_ps(t.p),
        _mm512_set1_ps(t.q),
        _mm512_set1_ps(t.c),
    );
    let (up, tiny) = (
        _mm512_set1_ps(1.0 + 2f32.powi(-20)),
        _mm512_set1_ps(2f32.powi(-20)),
    );
    let (fl, zero) = (_mm512_set1_ps(floor), _mm512_setzero_ps());
    let mut lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let step = _mm512_set1_epi32(16);
    let mut len = 0usize;
    let mut i = 0;
    while i < full {
        let s = _mm512_sub_ps(
            _mm512_loadu_ps(v.as_ptr().add(i)),
            _mm512_loadu_ps(base.as_ptr().add(i)),
        );
        let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, fl);
        let margin = _mm512_add_ps(
            _mm512_add_ps(
                _mm512_mul_ps(p, _mm512_loadu_ps(t.ew.as_ptr().add(i))),
                _mm512_mul_ps(q, _mm512_loadu_ps(t.wn.as_ptr().add(i))),
            ),
            c,
        );
        let abs = _mm512_abs_ps(s);
        let under = _mm512_sub_ps(
            _mm512_sub_ps(s, _mm512_mul_ps(margin, up)),
            _mm512_mul_ps(abs, tiny),
        );
        // `max` gives its second operand (+0) for NaN, as `f32::max` gives the other one.
        let key = _mm512_add_ps(_mm512_max_ps(under, zero), zero);
        // `len + 16 <= full + 16`: inside the reserved capacities.
        _mm512_storeu_si512(
            di.add(len) as *mut __m512i,
            _mm512_maskz_compress_epi32(m, lanes),
        );
        _mm512_storeu_si512(
            dk.add(len) as *mut __m512i,
            _mm512_maskz_compress_epi32(m, _mm512_castps_si512(key)),
        );
        len += m.count_ones() as usize;
        lanes = _mm512_add_epi32(lanes, step);
        i += 16;
    }
    // The first `len` values past the lengths were written above.
    idx.set_len(si + len);
    keys.set_len(sk + len);
    bounds_above_from(full, v, base, t, floor, idx, keys)
}

/// [`bounds_above`] with AVX2: eight differences, margins and bounds, one mask and the same
/// lane shuffle for the indices and the bounds.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn bounds_above_avx2(
    v: &[f32],
    base: &[f32],
    t: MarginTerms,
    floor: f32,
    idx: &mut Vec<u32>,
    keys: &mut Vec<u32>,
) {
    use std::arch::x86_64::*;
    let n = bounds_len(v, base, &t);
    let full = n / 8 * 8;
    let (si, sk) = (idx.len(), keys.len());
    // Each store writes eight lanes; only the passing ones are kept.
    idx.reserve(full + 8);
    keys.reserve(full + 8);
    let (di, dk) = (idx.as_mut_ptr().add(si), keys.as_mut_ptr().add(sk));
    let (p, q, c) = (
        _mm256_set1_ps(t.p),
        _mm256_set1_ps(t.q),
        _mm256_set1_ps(t.c),
    );
    let (up, tiny) = (
        _mm256_set1_ps(1.0 + 2f32.powi(-20)),
        _mm256_set1_ps(2f32.powi(-20)),
    );
    let (fl, zero) = (_mm256_set1_ps(floor), _mm256_setzero_ps());
    let sign = _mm256_set1_ps(-0.0);
    let mut lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let step = _mm256_set1_epi32(8);
    let mut len = 0usize;
    let mut i = 0;
    while i < full {
        let s = _mm256_sub_ps(
            _mm256_loadu_ps(v.as_ptr().add(i)),
            _mm256_loadu_ps(base.as_ptr().add(i)),
        );
        let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(s, fl)) as usize;
        let margin = _mm256_add_ps(
            _mm256_add_ps(
                _mm256_mul_ps(p, _mm256_loadu_ps(t.ew.as_ptr().add(i))),
                _mm256_mul_ps(q, _mm256_loadu_ps(t.wn.as_ptr().add(i))),
            ),
            c,
        );
        let abs = _mm256_andnot_ps(sign, s);
        let under = _mm256_sub_ps(
            _mm256_sub_ps(s, _mm256_mul_ps(margin, up)),
            _mm256_mul_ps(abs, tiny),
        );
        // `max` gives its second operand (+0) for NaN, as `f32::max` gives the other one.
        let key = _mm256_add_ps(_mm256_max_ps(under, zero), zero);
        let order = _mm256_loadu_si256(LEFT_PACK[m].as_ptr() as *const __m256i);
        // `len + 8 <= full + 8`: inside the reserved capacities.
        _mm256_storeu_si256(
            di.add(len) as *mut __m256i,
            _mm256_permutevar8x32_epi32(lanes, order),
        );
        _mm256_storeu_si256(
            dk.add(len) as *mut __m256i,
            _mm256_permutevar8x32_epi32(_mm256_castps_si256(key), order),
        );
        len += m.count_ones() as usize;
        lanes = _mm256_add_epi32(lanes, step);
        i += 8;
    }
    // The first `len` values past the lengths were written above.
    idx.set_len(si + len);
    keys.set_len(sk + len);
    bounds_above_from(full, v, base, t, floor, idx, keys)
}

/// Hint the CPU to load `v[start..start + len]` into L2 (no-op off x86_64). The sparse
/// passes prefetch a few 2.3 KB rows ahead, more lines than L1 tracks: into L2 their latent
/// pass at d_sae 4608, L0 64 took 30-34 ms against 38-59 into L1 (Zen 4, paired runs).
#[inline(always)]
pub fn prefetch_rows<T>(v: &[T], start: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let end = (start + len).min(v.len());
        let line = (64 / std::mem::size_of::<T>().max(1)).max(1);
        let mut i = start;
        while i < end {
            // SAFETY: prefetching an in-bounds address has no side effects.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(v.as_ptr().add(i) as *const i8) };
            i += line;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, start, len);
}

/// Splits `data` into consecutive pieces of the given lengths.
pub fn split_by_lengths<'a, T>(mut data: &'a mut [T], lens: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(lens.len());
    for &l in lens {
        let (head, tail) = data.split_at_mut(l);
        out.push(head);
        data = tail;
    }
    out
}

/// Normalise each `d`-long row of `w` to unit L2 norm (rows of norm 0 are left alone).
pub fn normalize_rows(w: &mut [f32], d: usize) {
    use rayon::prelude::*;
    w.par_chunks_mut(d).for_each(|row| {
        let n = dot(row, row).sqrt();
        if n > 0.0 {
            let inv = 1.0 / n;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    });
}

// The sparse passes' kernels on bf16 rows (`Precision::Bf16Sparse`): the bf16 operand is
// widened exactly (a shift), then the arithmetic is that of the f32 kernels above, with the
// same lane structure, so the portable and AVX2 versions give the same bits.

#[inline(always)]
fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

multiversion_impl! {
    /// [`dot`] with `a` in bf16.
    pub fn dot_h(a: &[u16], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0.0f32; LANES];
        let mut ca = a.chunks_exact(LANES);
        let mut cb = b.chunks_exact(LANES);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..LANES {
                acc[l] += widen(x[l]) * y[l];
            }
        }
        let mut s = 0.0;
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            s += widen(*x) * y;
        }
        hsum(&acc) + s
    }
}

dot2_impl!(
    /// [`dot2`] with `x` in bf16. Eight bf16 values widen to f32 by a zero-extension to 32
    /// bits and a shift into the high half.
    dot2_h,
    dot2_h_portable,
    dot2_h_inner,
    dot2_h_avx2,
    dot2_h_avx512,
    u16,
    |v| widen(v),
    |p| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
        p as *const __m128i
    )))),
    |p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
        p as *const __m256i
    ))))
);

multiversion_impl! {
    /// [`axpy`] with `x` in bf16.
    pub fn axpy_h(alpha: f32, x: &[u16], y: &mut [f32]) -> () {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += alpha * widen(*xi);
        }
    }
}

multiversion_impl! {
    /// [`axpy2`] with `x` in bf16.
    pub fn axpy2_h(a1: f32, a2: f32, x: &[u16], y: &mut [f32], z: &mut [f32]) -> () {
        let n = x.len().min(y.len()).min(z.len());
        let (x, y, z) = (&x[..n], &mut y[..n], &mut z[..n]);
        for i in 0..n {
            let w = widen(x[i]);
            y[i] += a1 * w;
            z[i] += a2 * w;
        }
    }
}

multiversion_impl! {
    /// `dst[i] = bf16(src[i])`, rounded as [`crate::bf16::to_bf16`].
    pub fn round_to_bf16(src: &[f32], dst: &mut [u16]) -> () {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = crate::bf16::to_bf16(*s);
        }
    }
}
