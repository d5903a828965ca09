//! Sparse codes in CSR form: per row, the active latents and their values.

/// A batch of sparse codes. Row r's active latents are `idx[row_ptr[r]..row_ptr[r+1]]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseCode {
    pub n_rows: usize,
    pub d_sae: usize,
    pub row_ptr: Vec<usize>,
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
}

impl SparseCode {
    /// Active (index, value) pairs of one row.
    pub fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.row_ptr[r], self.row_ptr[r + 1]);
        (&self.idx[a..b], &self.val[a..b])
    }

    /// Total number of non-zeros.
    pub fn nnz(&self) -> usize {
        self.idx.len()
    }

    /// Mean number of active latents per row.
    pub fn mean_l0(&self) -> f64 {
        if self.n_rows == 0 {
            0.0
        } else {
            self.nnz() as f64 / self.n_rows as f64
        }
    }
}
