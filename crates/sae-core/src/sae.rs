//! The SAE parameters and inference (encode / decode).

use crate::arch::ArchKind;
use crate::sparse::SparseCode;

/// Where an SAE was trained; saved into SAELens' cfg.json (`metadata`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SaeMeta {
    pub model_name: String,
    pub hook_name: String,
    pub context_size: usize,
    pub prepend_bos: bool,
    pub dataset_path: String,
}

/// A sparse autoencoder's weights in SAELens layout.
///
/// * `w_enc`: `[d_in, d_sae]` row-major. For `Gated` this is W_gate.
/// * `b_enc`: `[d_sae]`. For `Gated` this is b_gate.
/// * `w_dec`: `[d_sae, d_in]` row-major; row i is feature i's direction.
/// * `b_dec`: `[d_in]`, subtracted from the input before encoding when
///   `apply_b_dec_to_input` (always for the paper's architectures).
/// * `r_mag`, `b_mag`: `[d_sae]`, Gated only (empty otherwise).
/// * `threshold`: `[d_sae]`, JumpReLU and BatchTopK-at-inference (empty otherwise).
/// * `k`: TopK / BatchTopK only (0 otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct Sae {
    pub arch: ArchKind,
    pub d_in: usize,
    pub d_sae: usize,
    pub w_enc: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    pub r_mag: Vec<f32>,
    pub b_mag: Vec<f32>,
    pub threshold: Vec<f32>,
    pub k: usize,
    pub apply_b_dec_to_input: bool,
    pub meta: SaeMeta,
}

// CONTRACT (bodies to be written by the sae-core owner; signatures are relied on by
// sae-train, sae-eval and sae-browser).
impl Sae {
    /// A freshly initialised SAE as its paper does it (see ../shared/reference/sae-methods.md).
    pub fn init(arch: ArchKind, d_in: usize, d_sae: usize, k: usize, seed: u64) -> Sae {
        let _ = (arch, d_in, d_sae, k, seed);
        todo!("sae-core owner")
    }

    /// Sparse code of `n` rows of `x` (`[n, d_in]` row-major), inference semantics
    /// (BatchTopK uses its threshold here, like JumpReLU).
    pub fn encode(&self, x: &[f32], n: usize) -> SparseCode {
        let _ = (x, n);
        todo!("sae-core owner")
    }

    /// Fold a training-time input scale into the weights: the SAE was trained on `x * scale`
    /// and afterwards takes raw `x` and reconstructs raw `x`.
    pub fn fold_activation_scale(&mut self, scale: f32) {
        let _ = scale;
        todo!("sae-core owner")
    }

    /// Reconstruction `[n, d_in]` of a sparse code: W_dec^T f + b_dec.
    pub fn decode(&self, code: &SparseCode) -> Vec<f32> {
        let _ = code;
        todo!("sae-core owner")
    }
}
