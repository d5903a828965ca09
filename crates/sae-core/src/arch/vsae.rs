//! vSAE, TopK variant (Baker, Li et al. 2025, arXiv 2509.22994): the encoder gives the mean
//! `mu = W_enc (x - b_dec) + b_enc` of a Gaussian posterior whose variance is fixed at 1.
//! Training samples `z = mu + eps`, `eps ~ N(0, I)` (reparameterisation), keeps the k largest
//! `z` of each row with ReLU on them (TopK as `topk`, with its AuxK on the same noisy values),
//! and adds `beta KL(N(mu, I) || N(0, I)) = beta/2 sum_j mu_j^2` over every latent to the loss.
//!
//! The KL covers all latents, so its gradient w.r.t. the pre-activations is dense: its W_enc
//! gradient `X^T (beta mu) / n` is a second dense product per step (the trainer's dense
//! penalty slot), on top of the encoder's. The noise comes from the trainer's noise slot,
//! drawn from (seed, step, row) alone.
//!
//! Inference uses the mean, no noise: the k largest `mu` with ReLU, exactly TopK, so files are
//! SAELens `topk` SAEs (SAELens' TopK also applies ReLU to the kept values).

use super::topk::{
    auxk_train_opts, topk_lr, KCoefficient, TopK, TopKRule, AUXK_OPTIONS, B_ENC_ONLY,
};
use super::{
    Arch, ArchKind, AuxMode, BatchInput, BatchRef, BatchSlot, DensePenalty, Entry, EntryGrad,
    Family, LatentParam, OptionSpec, RowCode, RowOut, Settings, Sparsity, StepCtx, TrainOption,
    TrainOpts,
};
use crate::sae::{Invalid, Sae};
use crate::trainer::TrainHyper;
use std::collections::BTreeMap;

/// The vSAE family (TopK variant).
pub struct Vsae;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&Vsae);

impl ArchKind {
    pub const VSAE: ArchKind = KIND;
}

const BETA: &str = "beta";
/// The KL coefficient of the authors' runs (`kl1.0` in their run names), with the loss summed
/// over d_in and latents and averaged over tokens, as ours.
const DEFAULT_BETA: f64 = 1.0;
/// The posterior's fixed standard deviation.
const NOISE_STD: f32 = 1.0;

const BETA_COEFF: KCoefficient = KCoefficient {
    key: BETA,
    default: DEFAULT_BETA,
    what: "KL coefficient",
    zero_means: "no KL term",
    family: "vsae",
};

impl Family for Vsae {
    fn name(&self) -> &'static str {
        "vsae"
    }
    fn about(&self) -> &'static str {
        "Baker, Li et al. 2025: TopK on the mean plus unit Gaussian noise in training, with a \
         KL penalty (beta) pulling every mean to 0"
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
            help: "KL coefficient: the loss adds beta/2 times the sum of every latent's squared \
                   mean (default 1)",
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
    /// The mean's TopK, as `topk`.
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        TopK.encode_row(sae, pre, out);
    }
    fn set_sparsity(&self, sae: &mut Sae, l0: usize, _cutoff: f32) {
        BETA_COEFF.set_k(sae, l0);
    }
    fn rule(&self, sae: &Sae, hyper: &TrainHyper) -> Box<dyn Arch> {
        Box::new(VsaeRule {
            topk: TopKRule::new(sae, hyper),
            beta: BETA_COEFF.value(sae),
        })
    }
}

/// The vSAE training rule: TopK's selection and AuxK on the noisy values, plus the KL.
pub struct VsaeRule {
    topk: TopKRule,
    beta: f32,
}

impl Arch for VsaeRule {
    fn kind(&self) -> ArchKind {
        ArchKind::VSAE
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
    fn pre_noise(&self) -> Option<f32> {
        Some(NOISE_STD)
    }
    fn dense_penalty(&self) -> Option<&dyn DensePenalty> {
        Some(self)
    }
    /// TopK's row floor, from the noisy values `select_row` sees.
    fn prepare_batch(&self, batch: &BatchInput, state: &mut BatchSlot) {
        self.topk.prepare_batch(batch, state)
    }
    fn prefilter(&self, params: &[Vec<f32>], batch: BatchRef, out: &mut Vec<f32>) -> bool {
        self.topk.prefilter(params, batch, out)
    }
    fn select_row(&self, ctx: &StepCtx, row: usize, pre: &[f32], out: &mut RowOut) {
        self.topk.select_row(ctx, row, pre, out);
    }
    /// `z = mu + eps`: the selected entries' gradients reach `mu` unchanged.
    fn entry_backward(&self, ctx: &StepCtx, e: Entry, df: f32, da: f32) -> EntryGrad {
        self.topk.entry_backward(ctx, e, df, da)
    }
}

impl DensePenalty for VsaeRule {
    /// `beta/2 sum_j mu_j^2` with `mu = pre + b_enc`; gradient `beta mu`.
    fn row(&self, params: &[Vec<f32>], pre: &[f32], grad: &mut [f32]) -> f64 {
        let mut sum = 0.0f64;
        for ((g, &p), &b) in grad.iter_mut().zip(pre).zip(&params[0]) {
            let mu = p + b;
            *g = self.beta * mu;
            sum += (mu * mu) as f64;
        }
        0.5 * self.beta as f64 * sum
    }
    fn param_grads(&self, _j: usize, colsum: f32) -> [f32; 3] {
        [colsum, 0.0, 0.0]
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
            let err = Vsae.settings(4, 32, &opts(bad)).unwrap_err();
            assert!(err.contains(BETA), "{bad}: {err}");
        }
        let ok = Vsae.settings(4, 32, &opts("0.25")).unwrap();
        assert_eq!(BETA_COEFF.of(&ok), Some(0.25));
        assert_eq!(
            BETA_COEFF.of(&Vsae.settings(4, 32, &BTreeMap::new()).unwrap()),
            Some(1.0)
        );
        // A file with k > d_sae, a negative beta or none is refused by validation.
        let mut sae = Sae::init(ArchKind::VSAE, 8, 16, 4, 1);
        assert!(Vsae.validate_settings(&sae).is_ok());
        sae.settings.insert("k".into(), json!(17));
        assert!(matches!(
            Vsae.validate_settings(&sae),
            Err(Invalid::Config { key: "k", .. })
        ));
        sae.settings.insert("k".into(), json!(4));
        sae.settings.insert(BETA.into(), json!(-0.5));
        assert!(matches!(
            Vsae.validate_settings(&sae),
            Err(Invalid::Config { key: BETA, .. })
        ));
        sae.settings.remove(BETA);
        assert!(matches!(
            Vsae.validate_settings(&sae),
            Err(Invalid::Config { key: BETA, .. })
        ));
    }

    /// Inference is TopK of the mean: the same codes as a TopK SAE with the same weights.
    #[test]
    fn inference_is_topk_of_the_mean() {
        use rand::SeedableRng;
        let (d_in, d_sae, n) = (8, 32, 20);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let x = crate::tests::randn(&mut rng, n * d_in);
        let mut v = crate::tests::random_sae(ArchKind::VSAE, d_in, d_sae, 5, 4);
        let mut t = v.clone();
        t.arch = ArchKind::TOPK;
        t.settings.remove(BETA);
        let (a, b) = (v.encode(&x, n), t.encode(&x, n));
        assert_eq!((a.row_ptr, a.idx, a.val), (b.row_ptr, b.idx, b.val));
        // Training draws noise: the training code differs from inference's.
        v.settings.insert(BETA.into(), json!(0.0));
        let mut tr = SaeTrainer::new(v.clone(), TrainHyper::default());
        let stats = tr.gradients(&x, n, 0.0).0;
        let x_hat = v.decode(&v.encode(&x, n));
        let clean_mse = x
            .iter()
            .zip(&x_hat)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / n as f64;
        assert!((stats.mse - clean_mse).abs() > 1e-3 * clean_mse);
    }

    /// With beta > 0 the means shrink, the unselected ones too: against the same run
    /// without the KL, the mean of mu^2 over every (token, latent) ends far lower.
    #[test]
    fn kl_pulls_every_mean_to_zero() {
        use rand::SeedableRng;
        let (d_in, d_sae, n) = (8, 32, 64);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let x = crate::tests::randn(&mut rng, n * d_in);
        let mean_sq = |s: &Sae| {
            let pre = s.pre_activations(&x, n);
            let b = s.param("b_enc");
            pre.chunks(d_sae)
                .flat_map(|r| r.iter().zip(b).map(|(p, b)| ((p + b) as f64).powi(2)))
                .sum::<f64>()
                / (n * d_sae) as f64
        };
        let train = |beta: &str| {
            let mut sae = Sae::init(ArchKind::VSAE, d_in, d_sae, 2, 6);
            sae.settings = Vsae.settings(2, d_sae, &opts(beta)).unwrap();
            let mut t = SaeTrainer::new(sae, TrainHyper::default());
            for _ in 0..30 {
                t.step(&x, n, 1e-2, 0.0);
            }
            mean_sq(&t.snapshot())
        };
        let (with_kl, without) = (train("50"), train("0"));
        assert!(
            with_kl < 0.6 * without,
            "mean mu^2 {with_kl} vs {without} without KL"
        );
    }
}
