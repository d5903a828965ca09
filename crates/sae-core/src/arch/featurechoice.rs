//! Feature Choice SAE (Ayonrinde 2024, arXiv 2411.02124): each latent chooses the tokens of
//! the batch it codes: latent `j` keeps its `m_j` largest positive `pre + b_enc` over the
//! batch (a per-column top-m). The capacities follow a Zipf law over the latent index,
//! `m_j ~ B k (j+1)^-a / sum_i (i+1)^-a`, so they share the batch's budget of k*B. No
//! auxiliary loss: every latent codes its share of every batch, so none can die.
//!
//! Inference has no batch: each latent keeps its own threshold, a bias-corrected EMA of its
//! batch cut-offs (the `m_j`-th largest value) during training, and runs as JumpReLU; saved
//! as a SAELens `jumprelu` SAE.

use super::topk::topk_lr;
use super::{
    batch_state, encode_jumprelu_row, validate_k, validate_threshold, AfterStep, Arch, ArchKind,
    AuxMode, BatchInput, BatchSlot, Entry, EntryGrad, Family, LatentParam, OptionSpec, RowCode,
    RowOut, Settings, Sparsity, StepCtx, Stored,
};
use crate::sae::{Invalid, Sae};
use crate::sparse::SparseCode;
use crate::trainer::TrainHyper;
use rayon::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;

/// The Feature Choice family.
pub struct FeatureChoice;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&FeatureChoice);

impl ArchKind {
    pub const FEATURECHOICE: ArchKind = KIND;
}

const EXPONENT: &str = "zipf_exponent";
/// The EMA of each latent's batch cut-off, as BatchTopK's global one.
const THRESHOLD_EMA_BETA: f64 = 0.999;
/// Latents per task when collecting the batch's columns.
const COL_CHUNK: usize = 64;

const PARAMS: &[LatentParam] = &[
    LatentParam {
        name: "b_enc",
        init: 0.0,
    },
    LatentParam {
        name: "threshold",
        init: 0.0,
    },
];

/// Each latent's share of the tokens: `k (j+1)^-a / sum_i (i+1)^-a`, summing to k.
pub(crate) fn zipf_densities(k: usize, d_sae: usize, exponent: f64) -> Vec<f64> {
    let w: Vec<f64> = (0..d_sae)
        .map(|j| ((j + 1) as f64).powf(-exponent))
        .collect();
    let total: f64 = w.iter().sum();
    w.iter().map(|v| k as f64 * v / total).collect()
}

/// The steepest Zipf exponent up to 1 whose most-used latent fits in the batch (a share of
/// at most one per token). Exponent 0 (uniform shares k / d_sae) fits whenever k <= d_sae.
pub(crate) fn default_exponent(k: usize, d_sae: usize) -> f64 {
    let first = |a: f64| zipf_densities(k, d_sae, a).first().copied().unwrap_or(0.0);
    if first(1.0) <= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..50 {
        let mid = 0.5 * (lo + hi);
        if first(mid) <= 1.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // Two decimals, rounded down, so the saved value still fits.
    (lo * 100.0).floor() / 100.0
}

/// Why capacities with this exponent cannot be met: a latent cannot code more tokens than
/// the batch has.
fn check_exponent(k: usize, d_sae: usize, exponent: f64) -> Result<(), String> {
    if !exponent.is_finite() || exponent < 0.0 {
        return Err(format!(
            "{EXPONENT} = {exponent}; give a finite exponent >= 0 (0: every latent the same \
             capacity)"
        ));
    }
    if k == 0 || k > d_sae {
        // validate_k names this.
        return Ok(());
    }
    let first = zipf_densities(k, d_sae, exponent)[0];
    if first > 1.0 + 1e-9 {
        return Err(format!(
            "{EXPONENT} = {exponent} gives latent 0 a capacity of {first:.3} tokens per batch \
             token, more than the batch has, so the batch's budget of k*B = {k}*B matches \
             cannot be met; use {EXPONENT} <= {} for k = {k}, d_sae = {d_sae}, or a smaller k",
            default_exponent(k, d_sae)
        ));
    }
    Ok(())
}

fn exponent_of(settings: &Settings) -> Option<f64> {
    settings.get(EXPONENT)?.as_f64()
}

/// Capacities of a batch of `n` tokens: the shares `densities[j] * n` rounded by largest
/// remainder (ties: lower index), so that they sum to `k * n`; a latent whose share rounds to
/// nothing still gets one token, so none is starved (the total then exceeds k * n by those).
pub(crate) fn capacities(densities: &[f64], n: usize) -> Vec<usize> {
    let shares: Vec<f64> = densities.iter().map(|p| p * n as f64).collect();
    let mut caps: Vec<usize> = shares.iter().map(|s| s.floor() as usize).collect();
    let budget = shares.iter().sum::<f64>().round() as usize;
    let left = budget.saturating_sub(caps.iter().sum());
    let mut order: Vec<usize> = (0..caps.len()).collect();
    order.sort_by(|&a, &b| {
        let (fa, fb) = (shares[a] - shares[a].floor(), shares[b] - shares[b].floor());
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &j in order.iter().take(left) {
        caps[j] += 1;
    }
    for c in caps.iter_mut() {
        *c = (*c).clamp(1, n.max(1));
    }
    caps
}

/// Each latent's cut-off in a batch: the `caps[j]`-th largest positive `pre_j + b_enc_j`
/// over the rows (the smallest positive one when fewer are positive; infinite when none is).
/// Values at or above it are kept.
fn column_cutoffs(pre: &[f32], b_enc: &[f32], caps: &[usize], out: &mut Vec<f32>) {
    let d_sae = b_enc.len();
    out.clear();
    out.resize(d_sae, f32::INFINITY);
    out.par_chunks_mut(COL_CHUNK)
        .enumerate()
        .for_each(|(c, dst)| {
            let first = c * COL_CHUNK;
            let mut cols: Vec<Vec<f32>> = vec![Vec::new(); dst.len()];
            for row in pre.chunks(d_sae) {
                let (row, bias) = (&row[first..], &b_enc[first..]);
                for ((col, &p), &b) in cols.iter_mut().zip(row).zip(bias) {
                    let a = p + b;
                    if a > 0.0 {
                        col.push(a);
                    }
                }
            }
            for (l, col) in cols.iter_mut().enumerate() {
                let m = caps[first + l];
                dst[l] = if col.is_empty() || m == 0 {
                    f32::INFINITY
                } else if col.len() <= m {
                    col.iter().copied().fold(f32::INFINITY, f32::min)
                } else {
                    *col.select_nth_unstable_by(m - 1, |a, b| b.total_cmp(a)).1
                };
            }
        });
}

fn feature_settings(k: usize, exponent: f64) -> Settings {
    Settings::from([
        ("k".to_string(), json!(k)),
        (EXPONENT.to_string(), json!(exponent)),
    ])
}

impl Family for FeatureChoice {
    fn name(&self) -> &'static str {
        "featurechoice"
    }
    fn about(&self) -> &'static str {
        "Ayonrinde 2024: each latent keeps its Zipf share of the batch's tokens; per-latent \
         thresholds at inference"
    }
    fn saelens_name(&self) -> &'static str {
        "jumprelu"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &[]
    }
    fn setting_keys(&self) -> &'static [&'static str] {
        &["k", EXPONENT]
    }
    fn latent_params(&self) -> &'static [LatentParam] {
        PARAMS
    }
    fn stored_as(&self, name: &'static str) -> Vec<(&'static str, Stored)> {
        match name {
            "threshold" => vec![("threshold", Stored::AsIs), ("log_threshold", Stored::Log)],
            _ => vec![(name, Stored::AsIs)],
        }
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
    fn options(&self) -> &'static [OptionSpec] {
        &[OptionSpec {
            name: EXPONENT,
            help: "Zipf exponent of the per-latent capacities, >= 0 (default: the steepest up \
                   to 1 whose largest capacity fits in the batch)",
        }]
    }
    fn settings(
        &self,
        k: usize,
        d_sae: usize,
        opts: &BTreeMap<String, String>,
    ) -> Result<Settings, String> {
        let exponent = match opts.get(EXPONENT) {
            None => default_exponent(k, d_sae),
            Some(text) => text.trim().parse::<f64>().map_err(|_| {
                format!(
                    "{EXPONENT}: '{}' is not a number; write e.g. {EXPONENT}=0.5",
                    text.trim()
                )
            })?,
        };
        check_exponent(k, d_sae, exponent)?;
        Ok(feature_settings(k, exponent))
    }
    fn validate_settings(&self, sae: &Sae) -> Result<(), Invalid> {
        validate_k(sae)?;
        let Some(exponent) = exponent_of(&sae.settings) else {
            return Err(Invalid::Config {
                key: EXPONENT,
                msg: format!(
                    "no Zipf exponent ('sae_core.{EXPONENT}', a number >= 0); a featurechoice \
                     SAE needs it"
                ),
            });
        };
        check_exponent(sae.k(), sae.d_sae, exponent)
            .map_err(|msg| Invalid::Config { key: EXPONENT, msg })
    }
    fn validate_params(&self, sae: &Sae) -> Result<(), Invalid> {
        validate_threshold(sae, "threshold")
    }
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        encode_jumprelu_row(sae, pre, out)
    }
    /// The training form: every latent keeps its capacity's worth of the batch.
    fn encode_batch(&self, sae: &Sae, x: &[f32], n: usize) -> Option<SparseCode> {
        let d_sae = sae.d_sae;
        let exponent = exponent_of(&sae.settings)?;
        let caps = capacities(&zipf_densities(sae.k(), d_sae, exponent), n);
        let pre = sae.pre_activations(x, n);
        let b_enc = sae.param("b_enc");
        let mut cut = Vec::new();
        column_cutoffs(&pre, b_enc, &caps, &mut cut);
        let mut code = SparseCode {
            n_rows: n,
            d_sae,
            row_ptr: vec![0],
            idx: Vec::new(),
            val: Vec::new(),
        };
        for row in pre.chunks(d_sae.max(1)) {
            for (j, (&p, &b)) in row.iter().zip(b_enc).enumerate() {
                let a = p + b;
                if a > 0.0 && a >= cut[j] {
                    code.idx.push(j as u32);
                    code.val.push(a);
                }
            }
            code.row_ptr.push(code.idx.len());
        }
        Some(code)
    }
    fn set_sparsity(&self, sae: &mut Sae, l0: usize, cutoff: f32) {
        let k = l0.clamp(1, sae.d_sae);
        sae.settings = feature_settings(k, default_exponent(k, sae.d_sae));
        sae.param_mut("threshold").fill(cutoff.max(0.0));
    }
    fn rule(&self, sae: &Sae, _hyper: &TrainHyper) -> Box<dyn Arch> {
        let exponent = exponent_of(&sae.settings).unwrap_or(0.0);
        Box::new(FeatureChoiceRule {
            densities: zipf_densities(sae.k(), sae.d_sae, exponent),
        })
    }
}

/// Feature Choice's batch state: each latent's cut-off in this batch (`column_cutoffs`).
#[derive(Default)]
struct ColumnCutoffs(Vec<f32>);

/// The Feature Choice training rule.
pub struct FeatureChoiceRule {
    /// Each latent's share of the batch's tokens.
    densities: Vec<f64>,
}

impl Arch for FeatureChoiceRule {
    fn kind(&self) -> ArchKind {
        ArchKind::FEATURECHOICE
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_enc", "threshold"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::None
    }
    fn prepare_batch(&self, batch: &BatchInput, state: &mut BatchSlot) {
        let caps = capacities(&self.densities, batch.n);
        let cut = &mut batch_state::<ColumnCutoffs>(state).0;
        column_cutoffs(batch.pre, &batch.params[0], &caps, cut);
    }
    fn select_row(&self, ctx: &StepCtx, _row: usize, pre: &[f32], out: &mut RowOut) {
        let (b_enc, cut) = (&ctx.params[0][..], &ctx.batch.get::<ColumnCutoffs>().0);
        for (j, ((&p, &b), &t)) in pre.iter().zip(b_enc).zip(cut).enumerate() {
            let a = p + b;
            if a > 0.0 && a >= t {
                out.push(j, a, 0.0, p);
            }
        }
    }
    fn entry_backward(&self, _ctx: &StepCtx, e: Entry, df: f32, _da: f32) -> EntryGrad {
        let g = if e.f > 0.0 { df } else { 0.0 };
        EntryGrad {
            gpre: g,
            params: [g, 0.0, 0.0],
        }
    }
    /// The inference thresholds: each latent's bias-corrected EMA of its batch cut-offs
    /// (`c_t = c_{t-1} + (x_t - c_{t-1}) (1 - beta) / (1 - beta^t)`, the mean of the cut-offs
    /// early on). A batch where the latent had no positive value leaves it unchanged.
    fn after_step(&self, step: &AfterStep, params: &mut [Vec<f32>]) {
        let beta = THRESHOLD_EMA_BETA;
        let w = ((1.0 - beta) / (1.0 - beta.powf(step.t as f64))) as f32;
        for (th, &cut) in params[1]
            .iter_mut()
            .zip(&step.batch.get::<ColumnCutoffs>().0)
        {
            if cut.is_finite() {
                *th += (cut - *th) * w;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SaeTrainer;

    #[test]
    fn capacities_share_the_budget_and_impossible_ones_are_refused() {
        let (k, d) = (32, 64);
        let a = default_exponent(k, d);
        assert!(a > 0.0 && a < 1.0, "{a}");
        let shares = zipf_densities(k, d, a);
        assert!(shares[0] <= 1.0 && shares.windows(2).all(|w| w[0] >= w[1]));
        let caps = capacities(&shares, 100);
        assert_eq!(caps.iter().sum::<usize>(), k * 100);
        assert!(caps.iter().all(|&m| (1..=100).contains(&m)));
        // Exponent 1 would give latent 0 more tokens than the batch has.
        let opts = |v: &str| BTreeMap::from([(EXPONENT.to_string(), v.to_string())]);
        let err = FeatureChoice.settings(k, d, &opts("1")).unwrap_err();
        assert!(
            err.contains("cannot be met") && err.contains(EXPONENT),
            "{err}"
        );
        assert!(FeatureChoice.settings(k, d, &opts("-0.5")).is_err());
        assert!(FeatureChoice.settings(k, d, &opts("zipf")).is_err());
        assert!(FeatureChoice.settings(k, d, &opts("0")).is_ok());
    }

    /// Training keeps every latent within its capacity and learns a threshold per latent
    /// that lets about k latents per token through at inference.
    #[test]
    fn columns_keep_their_capacity_and_thresholds_are_learned() {
        use rand::SeedableRng;
        let (d_in, d_sae, n, k) = (8, 32, 128, 4);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let x = crate::tests::randn(&mut rng, n * d_in);
        let mut t = SaeTrainer::new(
            Sae::init(ArchKind::FEATURECHOICE, d_in, d_sae, k, 6),
            TrainHyper::default(),
        );
        for _ in 0..30 {
            t.step(&x, n, 1e-3, 0.0);
        }
        let sae = t.snapshot();
        let caps = capacities(
            &zipf_densities(k, d_sae, exponent_of(&sae.settings).unwrap()),
            n,
        );
        let batch = sae.encode_as_trained(&x, n);
        let mut per_latent = vec![0usize; d_sae];
        batch.idx.iter().for_each(|&j| per_latent[j as usize] += 1);
        assert!(per_latent.iter().zip(&caps).all(|(c, m)| c <= m));
        assert!(sae.param("threshold").iter().all(|t| *t > 0.0));
        let l0 = sae.encode(&x, n).idx.len() as f64 / n as f64;
        assert!((l0 - k as f64).abs() < 0.5 * k as f64, "inference L0 {l0}");
    }
}
