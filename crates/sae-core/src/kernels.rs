//! The CPU kernels of the hot path: the single dense encoder product (via `gemm`, rayon
//! threads) and the small dense-vector helpers the sparse passes are built from.

use gemm::{gemm, Parallelism};

fn parallelism() -> Parallelism {
    let t = rayon::current_num_threads();
    if t <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(t)
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

/// Dot product with 8 independent accumulators (vectorises without fast-math).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + s
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `y += a1 * x` and `z += a2 * x` in one pass over `x`.
#[inline]
pub fn axpy2(a1: f32, a2: f32, x: &[f32], y: &mut [f32], z: &mut [f32]) {
    for ((yi, zi), xi) in y.iter_mut().zip(z.iter_mut()).zip(x) {
        *yi += a1 * xi;
        *zi += a2 * xi;
    }
}

/// Two dot products sharing `x`: `(x . a, x . b)`.
#[inline]
pub fn dot2(x: &[f32], a: &[f32], b: &[f32]) -> (f32, f32) {
    (dot(x, a), dot(x, b))
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
