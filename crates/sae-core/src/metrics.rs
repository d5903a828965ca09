//! Reconstruction metrics accumulated over batches.

use crate::sparse::SparseCode;

/// Running sums for L0, MSE, FVU and the relative reconstruction bias gamma.
#[derive(Clone, Debug, Default)]
pub struct ReconMetrics {
    pub n_tokens: u64,
}

// CONTRACT (bodies by the sae-core owner).
impl ReconMetrics {
    pub fn new(d_in: usize, d_sae: usize) -> Self {
        let _ = (d_in, d_sae);
        todo!("sae-core owner")
    }
    /// Add `n` rows: inputs `x`, reconstructions `x_hat` (`[n, d_in]`), and their codes.
    pub fn add(&mut self, x: &[f32], x_hat: &[f32], code: &SparseCode) {
        let _ = (x, x_hat, code);
        todo!("sae-core owner")
    }
    pub fn l0(&self) -> f64 {
        todo!("sae-core owner")
    }
    pub fn mse(&self) -> f64 {
        todo!("sae-core owner")
    }
    /// 1 - E||x - x_hat||^2 / sum_d Var(x_d) subtracted from 1, i.e. the unexplained part.
    pub fn fvu(&self) -> f64 {
        todo!("sae-core owner")
    }
    /// gamma = E||x_hat||^2 / E[x_hat . x]; 1 = no shrinkage.
    pub fn gamma(&self) -> f64 {
        todo!("sae-core owner")
    }
    /// Per-latent firing counts over everything added.
    pub fn fire_counts(&self) -> &[u64] {
        todo!("sae-core owner")
    }
}

/// Mean over true directions of the max cosine similarity with any learned decoder row.
pub fn mmcs(w_dec: &[f32], true_dirs: &[f32], d_in: usize) -> f64 {
    let _ = (w_dec, true_dirs, d_in);
    todo!("sae-core owner")
}
