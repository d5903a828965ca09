//! The SAE parameters and inference (encode / decode).

use crate::arch::{ArchKind, Settings};
use crate::sparse::SparseCode;
use rayon::prelude::*;

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
/// * `w_enc`: `[d_in, d_sae]` row-major (for Gated this is W_gate).
/// * `w_dec`: `[d_sae, d_in]` row-major; row i is feature i's direction.
/// * `b_dec`: `[d_in]`, subtracted from the input before encoding when
///   `apply_b_dec_to_input`.
/// * `params`: the family's per-latent parameters, `[d_sae]` each, in the order and with the
///   names of `arch.family().latent_params()` (the first is the encoder bias).
/// * `settings`: the family's saved settings (`k`, prefix widths, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct Sae {
    pub arch: ArchKind,
    pub d_in: usize,
    pub d_sae: usize,
    pub w_enc: Vec<f32>,
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    pub params: Vec<Vec<f32>>,
    pub settings: Settings,
    pub apply_b_dec_to_input: bool,
    pub meta: SaeMeta,
}

/// Why an SAE cannot be used: a size or hyper-parameter (a cfg.json key) or a tensor's values.
#[derive(Clone, Debug, PartialEq)]
pub enum Invalid {
    /// `key` is the cfg.json key (`d_in`, `d_sae`, `k`).
    Config { key: &'static str, msg: String },
    /// `tensor` is the SAELens tensor name; `non_finite` when it holds NaN or infinite values.
    Tensor {
        tensor: &'static str,
        msg: String,
        non_finite: bool,
    },
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Config { msg, .. } | Invalid::Tensor { msg, .. } => f.write_str(msg),
        }
    }
}

impl std::error::Error for Invalid {}

impl Sae {
    /// Parameter `name` of this SAE's family. Panics on a name the family does not have (a
    /// programming error).
    pub fn param(&self, name: &str) -> &[f32] {
        let i = self.param_index(name);
        &self.params[i]
    }

    pub fn param_mut(&mut self, name: &str) -> &mut Vec<f32> {
        let i = self.param_index(name);
        &mut self.params[i]
    }

    fn param_index(&self, name: &str) -> usize {
        let names = self.arch.family().latent_params();
        names
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("a {} SAE has no parameter '{name}'", self.arch))
    }

    /// Active latents per token for families whose sparsity is k (0 otherwise).
    pub fn k(&self) -> usize {
        crate::arch::setting_usize(&self.settings, "k")
    }

    /// `(SAELens tensor name, values, shape)` of every tensor this SAE's family uses.
    pub fn tensors(&self) -> Vec<(&'static str, &[f32], Vec<usize>)> {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let names = self.arch.family().latent_params();
        let param = |i: usize| {
            (
                names[i].name,
                self.params.get(i).map(|v| &v[..]).unwrap_or(&[]),
                vec![d_sae],
            )
        };
        let mut t = vec![("W_enc", &self.w_enc[..], vec![d_in, d_sae])];
        t.extend((0..names.len().min(1)).map(param));
        t.push(("W_dec", &self.w_dec[..], vec![d_sae, d_in]));
        t.push(("b_dec", &self.b_dec[..], vec![d_in]));
        t.extend((1..names.len()).map(param));
        t
    }

    /// Checks that this SAE can encode and decode: positive sizes, one vector per family
    /// parameter, every tensor of the right length and finite, then the family's own checks
    /// (k in range, thresholds `>= 0`, ...).
    pub fn validate(&self) -> Result<(), Invalid> {
        self.validate_config()?;
        let names = self.arch.family().latent_params();
        if self.params.len() != names.len() {
            return Err(Invalid::Tensor {
                tensor: names.get(self.params.len()).map_or("params", |p| p.name),
                msg: format!(
                    "a {} SAE has {} per-latent parameters, this one {}",
                    self.arch,
                    names.len(),
                    self.params.len()
                ),
                non_finite: false,
            });
        }
        for (tensor, data, shape) in self.tensors() {
            let want = shape.iter().fold(1usize, |a, &d| a.saturating_mul(d));
            if data.len() != want {
                return Err(Invalid::Tensor {
                    tensor,
                    msg: format!(
                        "{tensor} has {} values, expected {want} ({shape:?})",
                        data.len()
                    ),
                    non_finite: false,
                });
            }
            let nan = data.iter().filter(|v| v.is_nan()).count();
            let inf = data.iter().filter(|v| v.is_infinite()).count();
            if nan + inf > 0 {
                let what = match (nan, inf) {
                    (n, 0) => format!("{n} NaN values"),
                    (0, i) => format!("{i} infinite values"),
                    (n, i) => format!("{n} NaN and {i} infinite values"),
                };
                return Err(Invalid::Tensor {
                    tensor,
                    msg: format!("{tensor} holds {what}"),
                    non_finite: true,
                });
            }
        }
        self.arch.family().validate_params(self)
    }

    /// Sizes and the family's settings (no tensor is read): what cfg.json alone decides.
    pub fn validate_config(&self) -> Result<(), Invalid> {
        let config = |key, msg| Err(Invalid::Config { key, msg });
        if self.d_in == 0 {
            return config(
                "d_in",
                "d_in is 0; an SAE needs a positive input width".into(),
            );
        }
        if self.d_sae == 0 {
            return config(
                "d_sae",
                "d_sae is 0; an SAE needs at least one latent".into(),
            );
        }
        self.arch.family().validate_settings(self)
    }
}

// CONTRACT (signatures relied on by sae-train, sae-eval and sae-browser).
impl Sae {
    /// A freshly initialised SAE as its paper does it (see ../shared/reference/sae-methods.md):
    /// W_dec rows are Gaussian directions normalised to unit norm, W_enc = W_dec^T, and the
    /// family's per-latent parameters at their initial values; `k` is used by the families
    /// whose sparsity is k. Deterministic for a seed (ChaCha8, serial).
    pub fn init(arch: ArchKind, d_in: usize, d_sae: usize, k: usize, seed: u64) -> Sae {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut w_dec: Vec<f32> = (0..d_in * d_sae)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        for row in w_dec.chunks_mut(d_in.max(1)) {
            let n = row
                .iter()
                .map(|v| (*v as f64) * (*v as f64))
                .sum::<f64>()
                .sqrt();
            if n > 0.0 {
                row.iter_mut().for_each(|v| *v = (*v as f64 / n) as f32);
            }
        }
        let mut w_enc = vec![0.0; d_in * d_sae];
        for j in 0..d_sae {
            for i in 0..d_in {
                w_enc[i * d_sae + j] = w_dec[j * d_in + i];
            }
        }
        let family = arch.family();
        let no_options = std::collections::BTreeMap::new();
        Sae {
            arch,
            d_in,
            d_sae,
            w_enc,
            w_dec,
            b_dec: vec![0.0; d_in],
            params: family
                .latent_params()
                .iter()
                .map(|p| vec![p.init; d_sae])
                .collect(),
            // Settings the family cannot make from k alone are refused by `validate`.
            settings: family.settings(k, d_sae, &no_options).unwrap_or_default(),
            apply_b_dec_to_input: family.apply_b_dec_to_input(),
            meta: SaeMeta::default(),
        }
    }

    /// A ReLU SAE whose reconstruction is exactly `scale * x`: W_enc = [I, -I], W_dec =
    /// scale [I; -I], biases 0 (relu(x) - relu(-x) = x). For checking evaluation plumbing:
    /// scale 1 must give the clean loss, scale 0 the zero-ablation loss.
    pub fn scaled_identity(d_in: usize, scale: f32) -> Sae {
        let d_sae = 2 * d_in;
        let mut sae = Sae::init(ArchKind::RELU, d_in, d_sae, 0, 0);
        sae.w_enc.fill(0.0);
        sae.w_dec.fill(0.0);
        sae.params[0].fill(0.0);
        sae.b_dec.fill(0.0);
        for i in 0..d_in {
            sae.w_enc[i * d_sae + i] = 1.0;
            sae.w_enc[i * d_sae + d_in + i] = -1.0;
            sae.w_dec[i * d_in + i] = scale;
            sae.w_dec[(d_in + i) * d_in + i] = -scale;
        }
        sae
    }

    /// Sparse code of `n` rows of `x` (`[n, d_in]` row-major), inference semantics
    /// (BatchTopK uses its threshold here, like JumpReLU). Only non-zero values are stored.
    pub fn encode(&self, x: &[f32], n: usize) -> SparseCode {
        let pre = self.pre_activations(x, n);
        self.arch.family().encode_pre(self, pre, n)
    }

    /// Codes in the family's training form where it has one (BatchTopK: the k*n largest of
    /// the batch), else as [`Sae::encode`].
    pub fn encode_as_trained(&self, x: &[f32], n: usize) -> SparseCode {
        self.arch
            .family()
            .encode_batch(self, x, n)
            .unwrap_or_else(|| self.encode(x, n))
    }

    /// `(x - b_dec) @ W_enc` (or `x @ W_enc` without `apply_b_dec_to_input`), `[n, d_sae]`.
    pub fn pre_activations(&self, x: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(x.len(), n * self.d_in, "encode: x has the wrong length");
        let xc: Vec<f32> = if self.apply_b_dec_to_input {
            x.chunks(self.d_in.max(1))
                .flat_map(|r| r.iter().zip(&self.b_dec).map(|(a, b)| a - b))
                .collect()
        } else {
            x.to_vec()
        };
        let mut pre = vec![0.0; n * self.d_sae];
        crate::kernels::matmul(&xc, n, self.d_in, &self.w_enc, self.d_sae, &mut pre);
        pre
    }

    /// Fold a training-time input scale into the weights: the SAE was trained on `x * scale`
    /// and afterwards takes raw `x` and reconstructs raw `x` (each family says how; see
    /// [`crate::arch::Family::fold_activation_scale`]).
    pub fn fold_activation_scale(&mut self, scale: f32) {
        self.arch.family().fold_activation_scale(self, scale)
    }

    /// Reconstruction `[n, d_in]` of a sparse code: W_dec^T f + b_dec.
    pub fn decode(&self, code: &SparseCode) -> Vec<f32> {
        let d_in = self.d_in;
        let mut out = vec![0.0; code.n_rows * d_in];
        out.par_chunks_mut(d_in.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                row.copy_from_slice(&self.b_dec);
                let (idx, val) = code.row(r);
                for (&j, &v) in idx.iter().zip(val) {
                    let j = j as usize;
                    crate::kernels::axpy(v, &self.w_dec[j * d_in..(j + 1) * d_in], row);
                }
            });
        out
    }
}
