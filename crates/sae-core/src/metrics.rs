//! Reconstruction metrics accumulated over batches.

use crate::kernels::dot;
use crate::sparse::SparseCode;
use rayon::prelude::*;

/// Running sums for L0, MSE, FVU and the relative reconstruction bias gamma.
/// Sums are kept in f64.
#[derive(Clone, Debug, Default)]
pub struct ReconMetrics {
    pub n_tokens: u64,
    pub d_in: usize,
    /// Sum over tokens of x (per dimension) and of ||x||^2.
    pub sum_x: Vec<f64>,
    pub sum_x2: f64,
    /// Sums of ||x - x_hat||^2, ||x_hat||^2 and x_hat . x.
    pub sum_err2: f64,
    pub sum_xhat2: f64,
    pub sum_xhat_x: f64,
    /// Total number of non-zero code entries.
    pub sum_l0: u64,
    pub fires: Vec<u64>,
}

impl ReconMetrics {
    pub fn new(d_in: usize, d_sae: usize) -> Self {
        ReconMetrics {
            d_in,
            sum_x: vec![0.0; d_in],
            fires: vec![0; d_sae],
            ..Default::default()
        }
    }

    /// Add `n` rows: inputs `x`, reconstructions `x_hat` (`[n, d_in]`), and their codes.
    pub fn add(&mut self, x: &[f32], x_hat: &[f32], code: &SparseCode) {
        let d = self.d_in;
        assert_eq!(
            x.len(),
            x_hat.len(),
            "metrics: x and x_hat differ in length"
        );
        assert_eq!(
            x.len(),
            code.n_rows * d,
            "metrics: x does not match the code's rows"
        );
        // Per-row sums in parallel, combined in row order (deterministic).
        let rows: Vec<[f64; 4]> = x
            .par_chunks(d)
            .zip(x_hat.par_chunks(d))
            .map(|(xr, hr)| {
                let mut err = 0.0f64;
                for (a, b) in xr.iter().zip(hr) {
                    let e = (a - b) as f64;
                    err += e * e;
                }
                [
                    err,
                    dot(hr, hr) as f64,
                    dot(hr, xr) as f64,
                    dot(xr, xr) as f64,
                ]
            })
            .collect();
        for r in rows {
            self.sum_err2 += r[0];
            self.sum_xhat2 += r[1];
            self.sum_xhat_x += r[2];
            self.sum_x2 += r[3];
        }
        for row in x.chunks(d) {
            for (s, v) in self.sum_x.iter_mut().zip(row) {
                *s += *v as f64;
            }
        }
        for (&j, &v) in code.idx.iter().zip(&code.val) {
            if v != 0.0 {
                self.fires[j as usize] += 1;
                self.sum_l0 += 1;
            }
        }
        self.n_tokens += code.n_rows as u64;
    }

    /// Mean number of non-zero latents per token.
    pub fn l0(&self) -> f64 {
        self.sum_l0 as f64 / self.n_tokens.max(1) as f64
    }

    /// Mean over tokens of ||x - x_hat||^2 (summed over d_in, like the training loss).
    pub fn mse(&self) -> f64 {
        self.sum_err2 / self.n_tokens.max(1) as f64
    }

    /// Fraction of variance unexplained: E||x - x_hat||^2 / sum_d Var(x_d).
    /// (The doc of the skeleton called it "1 - FVE subtracted from 1": the unexplained part.)
    pub fn fvu(&self) -> f64 {
        let n = self.n_tokens as f64;
        let mean_sq: f64 = self.sum_x.iter().map(|s| (s / n) * (s / n)).sum();
        let total_var = self.sum_x2 / n - mean_sq;
        (self.sum_err2 / n) / total_var
    }

    /// gamma = E||x_hat||^2 / E[x_hat . x]; 1 = no shrinkage.
    pub fn gamma(&self) -> f64 {
        self.sum_xhat2 / self.sum_xhat_x
    }

    /// Per-latent firing counts over everything added.
    pub fn fire_counts(&self) -> &[u64] {
        &self.fires
    }
}

/// Mean over true directions of the max cosine similarity with any learned decoder row.
/// `w_dec` is `[d_sae, d_in]`, `true_dirs` is `[n_true, d_in]`.
pub fn mmcs(w_dec: &[f32], true_dirs: &[f32], d_in: usize) -> f64 {
    let norm = |r: &[f32]| (dot(r, r) as f64).sqrt();
    let dec_norms: Vec<f64> = w_dec.par_chunks(d_in).map(norm).collect();
    let best: Vec<f64> = true_dirs
        .par_chunks(d_in)
        .map(|t| {
            let tn = norm(t);
            w_dec
                .chunks(d_in)
                .zip(&dec_norms)
                .map(|(d, dn)| {
                    let den = tn * dn;
                    if den > 0.0 {
                        dot(d, t) as f64 / den
                    } else {
                        0.0
                    }
                })
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect();
    if best.is_empty() {
        return 0.0;
    }
    best.iter().sum::<f64>() / best.len() as f64
}
