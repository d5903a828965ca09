//! The SAE parameters and inference (encode / decode).

use crate::arch::ArchKind;
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
    /// `(SAELens tensor name, values, shape)` of every tensor this SAE's architecture uses.
    pub fn tensors(&self) -> Vec<(&'static str, &[f32], Vec<usize>)> {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let enc_bias = if self.arch == ArchKind::Gated {
            "b_gate"
        } else {
            "b_enc"
        };
        let mut t = vec![
            ("W_enc", &self.w_enc[..], vec![d_in, d_sae]),
            (enc_bias, &self.b_enc[..], vec![d_sae]),
            ("W_dec", &self.w_dec[..], vec![d_sae, d_in]),
            ("b_dec", &self.b_dec[..], vec![d_in]),
        ];
        match self.arch {
            ArchKind::Gated => {
                t.push(("r_mag", &self.r_mag[..], vec![d_sae]));
                t.push(("b_mag", &self.b_mag[..], vec![d_sae]));
            }
            ArchKind::JumpRelu | ArchKind::BatchTopK => {
                t.push(("threshold", &self.threshold[..], vec![d_sae]))
            }
            ArchKind::Relu | ArchKind::TopK => {}
        }
        t
    }

    /// Checks that this SAE can encode and decode: positive sizes, `1 <= k <= d_sae` for
    /// TopK / BatchTopK, every tensor of the right length and finite, and thresholds `>= 0`
    /// (JumpReLU trains `log(threshold)`; relu makes a negative one act as 0 anyway, so a
    /// negative value means the file is not what it claims).
    pub fn validate(&self) -> Result<(), Invalid> {
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
        if matches!(self.arch, ArchKind::TopK | ArchKind::BatchTopK) {
            if self.k == 0 {
                return config("k", format!("k is 0; a {} SAE needs k >= 1", self.arch));
            }
            if self.k > self.d_sae {
                return config(
                    "k",
                    format!(
                        "k = {} is more than d_sae = {}; a {} SAE keeps at most d_sae latents",
                        self.k, self.d_sae, self.arch
                    ),
                );
            }
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
        let negative = self.threshold.iter().filter(|t| **t < 0.0).count();
        if negative > 0 {
            let lowest = self.threshold.iter().cloned().fold(f32::INFINITY, f32::min);
            return Err(Invalid::Tensor {
                tensor: "threshold",
                msg: format!(
                    "threshold holds {negative} negative values (lowest {lowest}); a {} \
                     threshold is >= 0",
                    self.arch
                ),
                non_finite: false,
            });
        }
        Ok(())
    }
}

// CONTRACT (signatures relied on by sae-train, sae-eval and sae-browser).
impl Sae {
    /// A freshly initialised SAE as its paper does it (see ../shared/reference/sae-methods.md):
    /// W_dec rows are Gaussian directions normalised to unit norm, W_enc = W_dec^T, all biases
    /// 0, r_mag 0 (W_mag = W_gate), JumpReLU threshold 0.001, BatchTopK threshold 0 until
    /// trained. Deterministic for a seed (ChaCha8, serial).
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
        let per_latent = |on: bool, v: f32| if on { vec![v; d_sae] } else { Vec::new() };
        Sae {
            arch,
            d_in,
            d_sae,
            w_enc,
            b_enc: vec![0.0; d_sae],
            w_dec,
            b_dec: vec![0.0; d_in],
            r_mag: per_latent(arch == ArchKind::Gated, 0.0),
            b_mag: per_latent(arch == ArchKind::Gated, 0.0),
            threshold: match arch {
                ArchKind::JumpRelu => vec![0.001; d_sae],
                ArchKind::BatchTopK => vec![0.0; d_sae],
                _ => Vec::new(),
            },
            k: if matches!(arch, ArchKind::TopK | ArchKind::BatchTopK) {
                k
            } else {
                0
            },
            // JumpReLU eq 8 has no b_dec subtraction on the input.
            apply_b_dec_to_input: arch != ArchKind::JumpRelu,
            meta: SaeMeta::default(),
        }
    }

    /// A ReLU SAE whose reconstruction is exactly `scale * x`: W_enc = [I, -I], W_dec =
    /// scale [I; -I], biases 0 (relu(x) - relu(-x) = x). For checking evaluation plumbing:
    /// scale 1 must give the clean loss, scale 0 the zero-ablation loss.
    pub fn scaled_identity(d_in: usize, scale: f32) -> Sae {
        let d_sae = 2 * d_in;
        let mut sae = Sae::init(ArchKind::Relu, d_in, d_sae, 0, 0);
        sae.w_enc.fill(0.0);
        sae.w_dec.fill(0.0);
        sae.b_enc.fill(0.0);
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
        let d_sae = self.d_sae;
        let rows: Vec<(Vec<u32>, Vec<f32>)> = pre
            .par_chunks(d_sae.max(1))
            .map(|row| self.encode_row(row))
            .collect();
        let mut code = SparseCode {
            n_rows: n,
            d_sae,
            row_ptr: Vec::with_capacity(n + 1),
            idx: Vec::new(),
            val: Vec::new(),
        };
        code.row_ptr.push(0);
        for (i, v) in rows {
            code.idx.extend_from_slice(&i);
            code.val.extend_from_slice(&v);
            code.row_ptr.push(code.idx.len());
        }
        code
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

    /// One row of inference-time codes from raw pre-activations.
    fn encode_row(&self, pre: &[f32]) -> (Vec<u32>, Vec<f32>) {
        let (mut idx, mut val) = (Vec::new(), Vec::new());
        let mut push = |j: usize, v: f32| {
            if v > 0.0 {
                idx.push(j as u32);
                val.push(v);
            }
        };
        match self.arch {
            ArchKind::Gated => {
                for (j, &p) in pre.iter().enumerate() {
                    if p + self.b_enc[j] > 0.0 {
                        push(j, self.r_mag[j].exp() * p + self.b_mag[j]);
                    }
                }
            }
            ArchKind::Relu => {
                for (j, &p) in pre.iter().enumerate() {
                    push(j, p + self.b_enc[j]);
                }
            }
            ArchKind::TopK => {
                let mut scratch = Vec::new();
                let cands = pre.iter().zip(&self.b_enc).enumerate();
                crate::arch::top_k_into(
                    self.k,
                    cands.map(|(j, (&p, &b))| (p + b, j as u32)),
                    &mut scratch,
                );
                for (v, j) in scratch {
                    push(j as usize, v);
                }
            }
            // SAELens JumpReLU: relu(pi) * 1[pi > threshold].
            ArchKind::JumpRelu | ArchKind::BatchTopK => {
                for (j, &p) in pre.iter().enumerate() {
                    let pi = p + self.b_enc[j];
                    if pi > self.threshold[j] {
                        push(j, pi);
                    }
                }
            }
        }
        (idx, val)
    }

    /// Fold a training-time input scale into the weights: the SAE was trained on `x * scale`
    /// and afterwards takes raw `x` and reconstructs raw `x`. As SAELens does it: W_enc is
    /// multiplied by `scale`, W_dec and b_dec divided by it, so the feature activations (and
    /// thresholds, biases, r_mag) stay those of training.
    pub fn fold_activation_scale(&mut self, scale: f32) {
        self.w_enc.iter_mut().for_each(|w| *w *= scale);
        self.w_dec.iter_mut().for_each(|w| *w /= scale);
        self.b_dec.iter_mut().for_each(|b| *b /= scale);
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

    /// A trained Gated SAE as the equivalent JumpReLU SAE (reference §1.2):
    /// W_enc <- W_mag = exp(r_mag) * W_gate, b_enc <- b_mag,
    /// threshold <- max(b_mag - exp(r_mag) * b_gate, 0).
    pub fn gated_to_jumprelu(&self) -> anyhow::Result<Sae> {
        if self.arch != ArchKind::Gated {
            anyhow::bail!(
                "only a gated SAE can be exported as JumpReLU (this one is {})",
                self.arch
            );
        }
        let scale: Vec<f32> = self.r_mag.iter().map(|r| r.exp()).collect();
        let mut w_enc = self.w_enc.clone();
        for row in w_enc.chunks_mut(self.d_sae) {
            row.iter_mut().zip(&scale).for_each(|(w, s)| *w *= s);
        }
        let threshold = (0..self.d_sae)
            .map(|j| (self.b_mag[j] - scale[j] * self.b_enc[j]).max(0.0))
            .collect();
        Ok(Sae {
            arch: ArchKind::JumpRelu,
            w_enc,
            b_enc: self.b_mag.clone(),
            r_mag: Vec::new(),
            b_mag: Vec::new(),
            threshold,
            k: 0,
            ..self.clone()
        })
    }
}
