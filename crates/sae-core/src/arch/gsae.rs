//! g-SAE, gradient TopK (Olmo et al. 2024, arXiv 2411.10397): TopK whose selection also
//! weighs each latent by how much it moves the language model's loss. With `z = pre + b_enc`
//! and `g` the gradient of the model's next-token loss with respect to the SAE's input row,
//! a row keeps the k latents with the largest
//!
//! `s_j = z_j + beta * z_j * |W_dec[j] . g|`
//!
//! and codes them with ReLU of `z_j` (the selection score only picks the indices). `W_dec[j] .
//! g` is the loss derivative with respect to latent j's activation, so `z_j |W_dec[j] . g|`
//! is, to first order, how much the loss moves when the latent is dropped. The index choice is
//! piecewise constant, so the gradient reaches the kept `z` only, as in TopK; AuxK is TopK's,
//! on `z`.
//!
//! Cost: the scores need `G W_dec^T` for the whole batch, a second dense product `[n, d_in] x
//! [d_in, d_sae]` per step beside the encoder's, and a full scan of every row (TopK's
//! prefilter on `z` does not bound `s`).
//!
//! Inference has no gradient: it is TopK on `z`, exactly SAELens' `topk`, so files are `topk`
//! files with `gsae`, `k` and `beta` in our `sae_core` block.

use super::topk::{
    auxk_backward, auxk_train_opts, push_auxk, topk_lr, KCoefficient, TopK, TopKRule, AUXK_OPTIONS,
    B_ENC_ONLY,
};
use super::{
    top_k_into, Arch, ArchKind, AuxMode, Entry, EntryGrad, Family, LatentParam, OptionSpec,
    RowCode, RowOut, Settings, Sparsity, StepCtx, TrainOption, TrainOpts,
};
use crate::sae::{Invalid, Sae};
use crate::trainer::TrainHyper;
use std::collections::BTreeMap;

/// The g-SAE family.
pub struct Gsae;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&Gsae);

impl ArchKind {
    pub const GSAE: ArchKind = KIND;
}

const BETA: &str = "beta";
/// The weight of the gradient term when none is given (ours; the paper's value was not
/// available to us).
pub const DEFAULT_BETA: f64 = 1.0;

const BETA_COEFF: KCoefficient = KCoefficient {
    key: BETA,
    default: DEFAULT_BETA,
    what: "gradient weight",
    zero_means: "plain TopK",
    family: "gsae",
};

impl Family for Gsae {
    fn name(&self) -> &'static str {
        "gsae"
    }
    fn about(&self) -> &'static str {
        "Olmo et al. 2024: TopK selecting by z + beta z |W_dec . dLoss/dx| (needs a store \
         harvested with --with-grad); inference is TopK"
    }
    fn saelens_name(&self) -> &'static str {
        "topk"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &[]
    }
    fn setting_keys(&self) -> &'static [&'static str] {
        &["k", BETA]
    }
    fn latent_params(&self) -> &'static [LatentParam] {
        B_ENC_ONLY
    }
    fn sparsity(&self) -> Sparsity {
        Sparsity::K
    }
    fn default_lr(&self, d_sae: usize) -> f32 {
        topk_lr(d_sae)
    }
    fn reads_decoder_norm_rescale(&self) -> bool {
        true
    }
    fn trains_on_input_grad(&self) -> bool {
        true
    }
    fn train_options(&self) -> &'static [TrainOption] {
        AUXK_OPTIONS
    }
    fn train_opts(
        &self,
        d_sae: usize,
        opts: &BTreeMap<String, String>,
    ) -> Result<TrainOpts, String> {
        auxk_train_opts(d_sae, opts)
    }
    fn options(&self) -> &'static [OptionSpec] {
        &[OptionSpec {
            name: BETA,
            help: "weight of the gradient term in the selection score z + beta z |W_dec . g| \
                   (default 1; 0 is TopK)",
        }]
    }
    fn settings(
        &self,
        k: usize,
        _d_sae: usize,
        opts: &BTreeMap<String, String>,
    ) -> Result<Settings, String> {
        BETA_COEFF.settings(k, opts)
    }
    fn validate_settings(&self, sae: &Sae) -> Result<(), Invalid> {
        BETA_COEFF.validate(sae)
    }
    fn saelens_cfg(&self, sae: &Sae, cfg: &mut serde_json::Map<String, serde_json::Value>) {
        TopK.saelens_cfg(sae, cfg);
    }
    /// No gradient at inference: TopK of `z`.
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        TopK.encode_row(sae, pre, out);
    }
    fn set_sparsity(&self, sae: &mut Sae, l0: usize, _cutoff: f32) {
        BETA_COEFF.set_k(sae, l0);
    }
    fn rule(&self, sae: &Sae, hyper: &TrainHyper) -> Box<dyn Arch> {
        Box::new(GsaeRule {
            topk: TopKRule::new(sae, hyper),
            beta: BETA_COEFF.value(sae),
        })
    }
}

/// The g-SAE training rule.
pub struct GsaeRule {
    topk: TopKRule,
    beta: f32,
}

impl Arch for GsaeRule {
    fn kind(&self) -> ArchKind {
        ArchKind::GSAE
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_enc"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::AuxK
    }
    fn aux_coeff(&self) -> f32 {
        self.topk.aux_coeff
    }
    fn reads_input_grad(&self) -> bool {
        true
    }
    /// Without scores the gradient term is 0: TopK's selection (the trainer always passes
    /// scores to this rule, through `select_row_scored`).
    fn select_row(&self, ctx: &StepCtx, row: usize, pre: &[f32], out: &mut RowOut) {
        self.topk.select_row(ctx, row, pre, out);
    }
    fn select_row_scored(
        &self,
        ctx: &StepCtx,
        row: usize,
        pre: &[f32],
        scores: &[f32],
        out: &mut RowOut,
    ) {
        let b_enc = &ctx.params[0][..];
        let beta = self.beta;
        let mut scratch = std::mem::take(&mut out.scratch);
        let s = pre
            .iter()
            .zip(b_enc)
            .zip(scores)
            .enumerate()
            .map(|(j, ((&p, &b), &u))| {
                let z = p + b;
                (z + beta * z * u.abs(), j as u32)
            });
        top_k_into(self.topk.k, s, &mut scratch);
        for &(s, j) in &scratch.best {
            // beta >= 0 and u >= 0, so s > 0 exactly when z > 0.
            if s > 0.0 {
                let j = j as usize;
                out.push(j, pre[j] + b_enc[j], 0.0, pre[j]);
            }
        }
        push_auxk(self.topk.k_aux, ctx, row, pre, &mut scratch, out);
        out.scratch = scratch;
    }
    fn entry_backward(&self, _ctx: &StepCtx, e: Entry, df: f32, da: f32) -> EntryGrad {
        auxk_backward(e.f, e.a, df, da)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SaeTrainer;
    use serde_json::json;

    fn opts(v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(BETA.to_string(), v.to_string())])
    }

    #[test]
    fn bad_beta_and_k_are_refused() {
        for bad in ["-1", "nan", "inf", "x", ""] {
            let err = Gsae.settings(4, 32, &opts(bad)).unwrap_err();
            assert!(err.contains(BETA), "{bad}: {err}");
        }
        let ok = Gsae.settings(4, 32, &opts("0.25")).unwrap();
        assert_eq!(BETA_COEFF.of(&ok), Some(0.25));
        assert_eq!(
            BETA_COEFF.of(&Gsae.settings(4, 32, &BTreeMap::new()).unwrap()),
            Some(DEFAULT_BETA)
        );
        let mut sae = Sae::init(ArchKind::GSAE, 8, 16, 4, 1);
        assert!(Gsae.validate_settings(&sae).is_ok());
        sae.settings.insert("k".into(), json!(17));
        assert!(matches!(
            Gsae.validate_settings(&sae),
            Err(Invalid::Config { key: "k", .. })
        ));
        sae.settings.insert("k".into(), json!(4));
        sae.settings.insert(BETA.into(), json!(-0.5));
        assert!(matches!(
            Gsae.validate_settings(&sae),
            Err(Invalid::Config { key: BETA, .. })
        ));
        sae.settings.remove(BETA);
        assert!(matches!(
            Gsae.validate_settings(&sae),
            Err(Invalid::Config { key: BETA, .. })
        ));
    }

    /// The gradient changes which latents a row keeps: a gradient along one latent's
    /// decoder row pulls that latent into the code over a larger `z`, and training codes
    /// differ from inference's (TopK of z); with beta 0 they are TopK's.
    #[test]
    fn gradient_moves_the_selection_and_beta_zero_is_topk() {
        use rand::SeedableRng;
        let (d_in, d_sae, n, k) = (8, 32, 16, 3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let x = crate::tests::randn(&mut rng, n * d_in);
        let sae = crate::tests::random_sae(ArchKind::GSAE, d_in, d_sae, k, 4);
        let code = sae.encode(&x, n);
        // For each row, the gradient points along the decoder row of a latent that TopK
        // leaves out but whose z is positive.
        let pre = sae.pre_activations(&x, n);
        let b = sae.param("b_enc");
        let mut g = vec![0.0f32; n * d_in];
        let mut wanted = Vec::new();
        for r in 0..n {
            let kept = &code.idx[code.row_ptr[r]..code.row_ptr[r + 1]];
            let left_out = (0..d_sae)
                .filter(|j| !kept.contains(&(*j as u32)) && pre[r * d_sae + j] + b[*j] > 0.0)
                .max_by(|&a, &c| {
                    (pre[r * d_sae + a] + b[a]).total_cmp(&(pre[r * d_sae + c] + b[c]))
                });
            if let Some(j) = left_out {
                for i in 0..d_in {
                    g[r * d_in + i] = 100.0 * sae.w_dec[j * d_in + i];
                }
                wanted.push((r, j));
            }
        }
        assert!(wanted.len() > n / 2);
        // No latent is dead, so no AuxK entry: a latent's b_enc gradient is non-zero
        // exactly when the row selected it.
        let hyper = TrainHyper {
            dead_window_tokens: u64::MAX,
            ..TrainHyper::default()
        };
        let selected = |beta: f64, r: usize| -> Vec<u32> {
            let mut s = sae.clone();
            s.settings.insert(BETA.into(), json!(beta));
            let mut t = SaeTrainer::new(s, hyper.clone());
            let row = |v: &[f32]| v[r * d_in..(r + 1) * d_in].to_vec();
            let (_, grads) = t.gradients_with_grad(&row(&x), &row(&g), 1, 0.0);
            (0..d_sae as u32)
                .filter(|&j| grads.params[0][j as usize] != 0.0)
                .collect()
        };
        for &(r, j) in &wanted {
            let sel = selected(1.0, r);
            assert!(sel.len() <= k);
            assert!(
                sel.contains(&(j as u32)),
                "row {r}: latent {j} not in {sel:?}"
            );
        }
        for r in 0..n {
            let kept = &code.idx[code.row_ptr[r]..code.row_ptr[r + 1]];
            assert_eq!(selected(0.0, r), kept, "row {r}: beta 0 is not TopK");
        }
    }
}
