//! Group Bias Adaptation (Chen, Sheen, Xiong, Wang, Yang 2025, arXiv 2506.14002): a ReLU SAE,
//! `f = relu(pre + b_enc)`, trained on the reconstruction alone (no sparsity penalty). The
//! sparsity comes from the encoder biases, which gradient descent does not touch: after each
//! step every latent's bias moves towards the value at which it would have fired on its
//! group's target fraction of the batch (its Target Activation Frequency, TAF). Latents are
//! split into contiguous groups of equal size, each with its own TAF.
//!
//! The bias rule is ours (the paper's exact update was not available): with `q_j` the
//! `ceil(TAF n)`-th largest raw pre-activation of latent `j` over the batch of `n` tokens,
//! `b_j <- b_j + BIAS_ADAPT_RATE (-q_j - b_j)`, so a latent firing more often than its
//! target lowers its bias and one firing less (a silent one included) raises it.
//! Inference is the ReLU's; saved as a SAELens `standard` SAE.

use super::topk::{topk_lr, B_ENC_ONLY};
use super::{
    batch_state, each_candidate, loosen, validate_k, AfterStep, Arch, ArchKind, AuxMode,
    BatchInput, BatchRef, BatchSlot, Entry, EntryGrad, Family, LatentParam, OptionSpec, RowCode,
    RowOut, Settings, Sparsity, StepCtx,
};
use crate::sae::{Invalid, Sae};
use crate::trainer::TrainHyper;
use rayon::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;

/// The Group Bias Adaptation family.
pub struct Gba;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&Gba);

impl ArchKind {
    pub const GBA: ArchKind = KIND;
}

const TARGETS: &str = "targets";
/// The fraction of the way each bias moves to its batch target per step (a time constant of
/// 20 steps, smoothing the noise of one batch's quantile).
pub(crate) const BIAS_ADAPT_RATE: f32 = 0.05;
/// Default groups: four, each target a quarter of the one before.
const DEFAULT_GROUPS: usize = 4;
const DEFAULT_RATIO: f64 = 0.25;
/// Latents per task when collecting the batch's columns.
const COL_CHUNK: usize = 64;

/// The default targets: `DEFAULT_GROUPS` geometric TAFs whose mean is `k / d_sae`, so that
/// about k latents fire per token.
fn default_targets(k: usize, d_sae: usize) -> Vec<f64> {
    let groups = DEFAULT_GROUPS.min(d_sae.max(1));
    let weights: Vec<f64> = (0..groups).map(|g| DEFAULT_RATIO.powi(g as i32)).collect();
    let mean_weight = weights.iter().sum::<f64>() / groups as f64;
    let first = k as f64 / d_sae.max(1) as f64 / mean_weight;
    weights.iter().map(|w| first * w).collect()
}

/// Why these targets cannot be the groups' TAFs.
fn check_targets(targets: &[f64], d_sae: usize) -> Result<(), String> {
    if targets.is_empty() {
        return Err(format!(
            "{TARGETS} is empty; give one target activation frequency per group, e.g. \
             {TARGETS}=0.01,0.003,0.001"
        ));
    }
    if let Some(t) = targets
        .iter()
        .find(|t| t.is_nan() || **t <= 0.0 || **t >= 1.0)
    {
        return Err(format!(
            "{TARGETS}: {t} is not a frequency in (0, 1); every group's target fraction of \
             tokens must be above 0 and below 1 (e.g. {TARGETS}=0.01,0.003,0.001), or a \
             smaller k for the default targets"
        ));
    }
    if targets.len() > d_sae {
        return Err(format!(
            "{TARGETS} gives {} groups but d_sae = {d_sae}; give at most one group per latent",
            targets.len()
        ));
    }
    Ok(())
}

fn targets_of(settings: &Settings) -> Option<Vec<f64>> {
    settings
        .get(TARGETS)?
        .as_array()?
        .iter()
        .map(serde_json::Value::as_f64)
        .collect()
}

/// Each latent's TAF: `targets.len()` contiguous groups of equal size (the first ones one
/// latent larger when d_sae does not divide).
pub(crate) fn latent_targets(targets: &[f64], d_sae: usize) -> Vec<f64> {
    let g = targets.len().max(1);
    let (base, extra) = (d_sae / g, d_sae % g);
    let mut out = Vec::with_capacity(d_sae);
    for (q, &t) in targets.iter().enumerate() {
        out.extend(std::iter::repeat_n(t, base + (q < extra) as usize));
    }
    out
}

fn gba_settings(k: usize, targets: &[f64]) -> Settings {
    Settings::from([
        ("k".to_string(), json!(k)),
        (TARGETS.to_string(), json!(targets)),
    ])
}

impl Family for Gba {
    fn name(&self) -> &'static str {
        "gba"
    }
    fn about(&self) -> &'static str {
        "Chen et al. 2025: ReLU without a penalty, biases adapted to per-group target \
         frequencies"
    }
    fn saelens_name(&self) -> &'static str {
        "standard"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &[]
    }
    fn setting_keys(&self) -> &'static [&'static str] {
        &["k", TARGETS]
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
    fn options(&self) -> &'static [OptionSpec] {
        &[OptionSpec {
            name: TARGETS,
            help: "target activation frequencies in (0, 1), one per group of latents, \
                   comma-separated (default: 4 groups, each a quarter of the one before, \
                   averaging k/d_sae)",
        }]
    }
    fn settings(
        &self,
        k: usize,
        d_sae: usize,
        opts: &BTreeMap<String, String>,
    ) -> Result<Settings, String> {
        let targets = match opts.get(TARGETS) {
            None => default_targets(k, d_sae),
            Some(text) => text
                .split(',')
                .map(|t| {
                    t.trim().parse::<f64>().map_err(|_| {
                        format!(
                            "{TARGETS}: '{}' is not a number; write e.g. \
                             {TARGETS}=0.01,0.003,0.001",
                            t.trim()
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        check_targets(&targets, d_sae)?;
        Ok(gba_settings(k, &targets))
    }
    fn validate_settings(&self, sae: &Sae) -> Result<(), Invalid> {
        validate_k(sae)?;
        let Some(targets) = targets_of(&sae.settings) else {
            return Err(Invalid::Config {
                key: TARGETS,
                msg: format!(
                    "no target frequencies ('sae_core.{TARGETS}', a list of numbers in (0, 1)); \
                     a gba SAE needs them"
                ),
            });
        };
        check_targets(&targets, sae.d_sae).map_err(|msg| Invalid::Config { key: TARGETS, msg })
    }
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        let b_enc = sae.param("b_enc");
        for (j, &p) in pre.iter().enumerate() {
            out.push(j, p + b_enc[j]);
        }
    }
    fn set_sparsity(&self, sae: &mut Sae, l0: usize, cutoff: f32) {
        let k = l0.clamp(1, sae.d_sae);
        let mut targets = default_targets(k, sae.d_sae);
        targets.iter_mut().for_each(|t| *t = t.min(0.5));
        sae.settings = gba_settings(k, &targets);
        sae.param_mut("b_enc").fill(-cutoff);
    }
    fn rule(&self, sae: &Sae, _hyper: &TrainHyper) -> Box<dyn Arch> {
        let targets = targets_of(&sae.settings).unwrap_or_default();
        Box::new(GbaRule {
            targets: latent_targets(&targets, sae.d_sae),
        })
    }
}

/// The GBA training rule.
pub struct GbaRule {
    /// Each latent's target activation frequency.
    targets: Vec<f64>,
}

/// GBA's batch state: each latent's `column_quantiles` of this batch.
#[derive(Default)]
struct ColumnQuantiles(Vec<f32>);

/// Each latent's `ceil(target n)`-th largest raw pre-activation over the `n` rows of `pre`.
fn column_quantiles(pre: &[f32], targets: &[f64], n: usize, out: &mut Vec<f32>) {
    let d_sae = targets.len();
    out.clear();
    out.resize(d_sae, 0.0);
    out.par_chunks_mut(COL_CHUNK)
        .enumerate()
        .for_each(|(c, dst)| {
            let first = c * COL_CHUNK;
            let mut cols: Vec<Vec<f32>> = vec![Vec::with_capacity(n); dst.len()];
            for row in pre.chunks(d_sae) {
                for (col, &p) in cols.iter_mut().zip(&row[first..]) {
                    col.push(p);
                }
            }
            for (l, col) in cols.iter_mut().enumerate() {
                let m = ((targets[first + l] * n as f64).ceil() as usize).clamp(1, n);
                dst[l] = *col.select_nth_unstable_by(m - 1, |a, b| b.total_cmp(a)).1;
            }
        });
}

impl Arch for GbaRule {
    fn kind(&self) -> ArchKind {
        ArchKind::GBA
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_enc"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::None
    }
    fn prepare_batch(&self, batch: &BatchInput, state: &mut BatchSlot) {
        let quantiles = &mut batch_state::<ColumnQuantiles>(state).0;
        column_quantiles(batch.pre, &self.targets, batch.n, quantiles);
    }
    fn prefilter(&self, params: &[Vec<f32>], _batch: BatchRef, out: &mut Vec<f32>) -> bool {
        out.clear();
        out.extend(params[0].iter().map(|b| loosen(-b)));
        true
    }
    fn select_row(&self, ctx: &StepCtx, row: usize, pre: &[f32], out: &mut RowOut) {
        let b_enc = &ctx.params[0][..];
        each_candidate(ctx, row, pre, out, |out, j, p| {
            let f = p + b_enc[j];
            if f > 0.0 {
                out.push(j, f, 0.0, p);
            }
        });
    }
    /// The ReLU's gradient; none for the bias, which `after_step` sets.
    fn entry_backward(&self, _ctx: &StepCtx, e: Entry, df: f32, _da: f32) -> EntryGrad {
        EntryGrad {
            gpre: if e.f > 0.0 { df } else { 0.0 },
            params: [0.0; 3],
        }
    }
    fn after_step(&self, step: &AfterStep, params: &mut [Vec<f32>]) {
        for (b, &q) in params[0]
            .iter_mut()
            .zip(&step.batch.get::<ColumnQuantiles>().0)
        {
            *b += BIAS_ADAPT_RATE * (-q - *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SaeTrainer;

    #[test]
    fn targets_outside_zero_one_are_refused() {
        let opts = |v: &str| BTreeMap::from([(TARGETS.to_string(), v.to_string())]);
        for bad in ["0.1,1", "0,0.1", "-0.2", "0.1,nan", "x"] {
            let err = Gba.settings(4, 32, &opts(bad)).unwrap_err();
            assert!(err.contains(TARGETS), "{bad}: {err}");
        }
        // Defaults too large for the frequencies (k near d_sae).
        assert!(Gba.settings(30, 32, &BTreeMap::new()).is_err());
        let ok = Gba.settings(4, 32, &opts("0.2,0.05")).unwrap();
        assert_eq!(targets_of(&ok).unwrap(), vec![0.2, 0.05]);
        assert_eq!(
            latent_targets(&[0.2, 0.05], 5),
            vec![0.2, 0.2, 0.2, 0.05, 0.05]
        );
    }

    /// Each group's firing frequency ends near its target.
    #[test]
    fn groups_fire_at_their_targets() {
        use rand::SeedableRng;
        let (d_in, d_sae, n) = (8, 32, 512);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let x = crate::tests::randn(&mut rng, n * d_in);
        let mut sae = Sae::init(ArchKind::GBA, d_in, d_sae, 4, 8);
        let opts = BTreeMap::from([(TARGETS.to_string(), "0.2,0.02".to_string())]);
        sae.settings = Gba.settings(4, d_sae, &opts).unwrap();
        let mut t = SaeTrainer::new(sae, TrainHyper::default());
        for _ in 0..150 {
            t.step(&x, n, 1e-3, 0.0);
        }
        let code = t.snapshot().encode(&x, n);
        let mut fired = vec![0usize; d_sae];
        code.idx.iter().for_each(|&j| fired[j as usize] += 1);
        let freq = |r: std::ops::Range<usize>| {
            let len = r.len();
            r.map(|j| fired[j]).sum::<usize>() as f64 / (len * n) as f64
        };
        let (hi, lo) = (freq(0..16), freq(16..32));
        assert!((hi - 0.2).abs() < 0.05, "group 0 fires {hi}");
        assert!((lo - 0.02).abs() < 0.01, "group 1 fires {lo}");
    }
}
