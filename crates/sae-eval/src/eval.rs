//! Evaluating an SAE on held-out text with the language model's own loss.
//!
//! Conditions, all on the same contexts:
//! * clean: the model as is;
//! * SAE: the hook activation replaced by the SAE's reconstruction;
//! * zero ablation: replaced by 0; mean ablation: replaced by the mean activation of the
//!   evaluation data.
//!
//! BOS (position 0 of every context) is never replaced and is left out of the reconstruction
//! metrics; the loss of the prediction made at BOS is left out of every CE (it would be
//! identical in every condition). The clean, zero and mean conditions do not depend on the
//! SAE, so a sweep computes them once (`Baseline`) and runs one forward pass per SAE.

use crate::metrics::{self, CeSum, FiringStats, DENSE_FRACTION};
use crate::splice;
use anyhow::{bail, Context, Result};
use sae_core::metrics::ReconMetrics;
use sae_core::Sae;
use sae_lm::LanguageModel;
use serde::{Deserialize, Serialize};

/// Held-out contexts to evaluate on.
pub struct EvalData {
    pub corpus: String,
    pub hook: String,
    /// Width of the activation at `hook`.
    pub width: usize,
    pub ctx: usize,
    /// Contexts per forward pass.
    pub batch: usize,
    /// Stream tokens skipped before the first context (the SAE's training text).
    pub skip_tokens: usize,
    /// `[n_contexts, ctx]` token ids, BOS first in each.
    pub tokens: Vec<u32>,
}

impl EvalData {
    /// Packs `n_tokens` non-BOS tokens of `corpus` after skipping `skip_tokens`, checking
    /// the hook against the model first.
    pub fn load(
        model: &LanguageModel,
        corpus: &str,
        hook: &str,
        n_tokens: usize,
        ctx: usize,
        batch: usize,
        skip_tokens: usize,
    ) -> Result<EvalData> {
        let width = hook_width(model, hook)?;
        if batch == 0 {
            bail!("--batch must be at least 1");
        }
        let packed =
            sae_lm::corpus::pack_corpus(corpus, model.tokenizer(), ctx, n_tokens, skip_tokens)
                .with_context(|| format!("packing evaluation text from corpus '{corpus}'"))?;
        Ok(EvalData {
            corpus: corpus.to_string(),
            hook: hook.to_string(),
            width,
            ctx,
            batch,
            skip_tokens,
            tokens: packed.tokens,
        })
    }

    pub fn n_contexts(&self) -> usize {
        self.tokens.len() / self.ctx
    }

    /// Tokens whose activation is reconstructed (all but BOS).
    pub fn n_recon_tokens(&self) -> usize {
        self.n_contexts() * (self.ctx - 1)
    }

    /// Token batches: (tokens, number of contexts).
    pub fn batches(&self) -> impl Iterator<Item = (&[u32], usize)> {
        self.tokens
            .chunks(self.batch * self.ctx)
            .map(move |c| (c, c.len() / self.ctx))
    }

    pub fn n_batches(&self) -> usize {
        self.n_contexts().div_ceil(self.batch)
    }
}

/// The width of `hook` on `model`, or a clear error listing how to find valid hooks.
pub fn hook_width(model: &LanguageModel, hook: &str) -> Result<usize> {
    model.hook(hook)?;
    model
        .hook_points()
        .into_iter()
        .find(|h| h.name == hook)
        .map(|h| h.width)
        .with_context(|| {
            format!(
                "hook '{hook}' does not exist on model '{}' (see `sae hooks`)",
                model.name
            )
        })
}

/// Checks an SAE fits the model at `hook` before any long work.
pub fn check_sae_fits(
    sae: &Sae,
    sae_dir: &str,
    model: &LanguageModel,
    hook: &str,
) -> Result<usize> {
    let width = hook_width(model, hook)?;
    if sae.d_in != width {
        bail!(
            "SAE {sae_dir} has d_in {} but hook '{hook}' of model '{}' is {width} wide; \
             evaluate it at the hook it was trained on (--hook) or with its model (--model)",
            sae.d_in,
            model.name
        );
    }
    Ok(width)
}

/// The losses that do not depend on the SAE.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Baseline {
    pub ce_clean: f64,
    pub ce_zero: f64,
    pub ce_mean_ablation: f64,
    /// Number of next-token predictions averaged in each CE.
    pub n_predictions: u64,
    /// Mean activation at the hook over the evaluation tokens (non-BOS).
    #[serde(skip)]
    pub mean_act: Vec<f32>,
}

/// Clean, zero-ablated and mean-ablated CE. `progress(done, total)` after each forward pass;
/// an error from it stops the passes and is returned.
pub fn baseline(
    model: &LanguageModel,
    data: &EvalData,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Baseline> {
    let (ctx, width) = (data.ctx, data.width);
    let total = 3 * data.n_batches();
    let mut done = 0;
    let (mut clean, mut zero, mut mean_ab) = (CeSum::default(), CeSum::default(), CeSum::default());
    let mut sum = vec![0f64; width];
    let mut n_rows = 0u64;
    for (toks, b) in data.batches() {
        // Clean pass; the hook only reads the activation (to get its mean) and writes it back.
        let mut observe = |x: &[f32], n: usize| -> Result<Vec<f32>> {
            for row in x.chunks(width) {
                sum.iter_mut().zip(row).for_each(|(s, v)| *s += *v as f64);
            }
            n_rows += n as u64;
            Ok(x.to_vec())
        };
        let l = splice::spliced_loss(model, toks, b, ctx, &data.hook, width, &mut observe)?;
        clean.add_contexts(&l, ctx);
        done += 1;
        progress(done, total)?;
        let l = splice::spliced_loss(
            model,
            toks,
            b,
            ctx,
            &data.hook,
            width,
            &mut splice::zero_rows,
        )?;
        zero.add_contexts(&l, ctx);
        done += 1;
        progress(done, total)?;
    }
    let mean_act: Vec<f32> = sum
        .iter()
        .map(|s| (s / n_rows.max(1) as f64) as f32)
        .collect();
    for (toks, b) in data.batches() {
        let mut f = splice::mean_rows(&mean_act);
        let l = splice::spliced_loss(model, toks, b, ctx, &data.hook, width, &mut f)?;
        mean_ab.add_contexts(&l, ctx);
        done += 1;
        progress(done, total)?;
    }
    Ok(Baseline {
        ce_clean: clean.mean(),
        ce_zero: zero.mean(),
        ce_mean_ablation: mean_ab.mean(),
        n_predictions: clean.n,
        mean_act,
    })
}

/// Everything `sae eval` reports about one SAE.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub sae: String,
    pub arch: String,
    pub d_in: usize,
    pub d_sae: usize,
    pub model: String,
    pub hook: String,
    pub corpus: String,
    pub skip_tokens: usize,
    pub context_size: usize,
    pub n_contexts: usize,
    /// Tokens in the reconstruction metrics (BOS excluded).
    pub n_tokens: u64,
    pub l0: f64,
    pub mse: f64,
    pub fvu: f64,
    pub gamma: f64,
    pub ce_clean: f64,
    pub ce_sae: f64,
    pub ce_zero: f64,
    pub ce_mean_ablation: f64,
    pub delta_lm_loss: f64,
    /// (CE_zero - CE_sae) / (CE_zero - CE_clean).
    pub loss_recovered: f64,
    /// The same with mean ablation as the reference: (CE_mean - CE_sae) / (CE_mean - CE_clean).
    pub loss_recovered_vs_mean: f64,
    pub firing: FiringStats,
    /// Rows over this norm were left out of the SAE's training, so they are left unspliced
    /// (clean) here and out of the reconstruction metrics; none when absent.
    #[serde(default)]
    pub max_norm: Option<f32>,
    /// Non-BOS tokens left unspliced for their norm.
    #[serde(default)]
    pub n_unspliced: u64,
    /// How the model's weight products ran (`sae eval --compute`; f32 before it existed).
    #[serde(default)]
    pub compute: sae_lm::ProductPrecision,
}

/// The norm limit an SAE was trained with (`train_summary.json` next to its weights).
pub fn trained_max_norm(sae_dir: &std::path::Path) -> Option<f32> {
    let text = std::fs::read_to_string(sae_dir.join(sae_train::run::SUMMARY_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["max_norm"].as_f64().map(|m| m as f32)
}

/// One SAE on `data`: one spliced forward pass per batch (reconstruction metrics are taken
/// from the activations inside that pass). Rows with a norm over `max_norm` keep their clean
/// activation.
pub fn evaluate_sae(
    model: &LanguageModel,
    sae: &Sae,
    sae_name: &str,
    data: &EvalData,
    base: &Baseline,
    max_norm: Option<f32>,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<EvalReport> {
    if sae.d_in != data.width {
        bail!(
            "SAE {sae_name}: d_in {} does not match hook width {}",
            sae.d_in,
            data.width
        );
    }
    let ctx = data.ctx;
    let mut recon = ReconMetrics::new(sae.d_in, sae.d_sae);
    let mut ce = CeSum::default();
    let total = data.n_batches();
    let d = sae.d_in;
    let limit2 = max_norm.map_or(f32::INFINITY, |m| m * m);
    let mut n_unspliced = 0u64;
    for (i, (toks, b)) in data.batches().enumerate() {
        let mut reconstruct = |x: &[f32], n: usize| -> Result<Vec<f32>> {
            let keep: Vec<bool> = x
                .chunks(d)
                .map(|r| r.iter().map(|v| v * v).sum::<f32>() <= limit2)
                .collect();
            let n_keep = keep.iter().filter(|k| **k).count();
            if n_keep == n {
                return sae_reconstruct(sae, &mut recon, x, n);
            }
            n_unspliced += (n - n_keep) as u64;
            let kept: Vec<f32> = x
                .chunks(d)
                .zip(&keep)
                .filter(|(_, k)| **k)
                .flat_map(|(r, _)| r.iter().copied())
                .collect();
            let x_hat = sae_reconstruct(sae, &mut recon, &kept, n_keep)?;
            let mut out = x.to_vec();
            let mut next = x_hat.chunks(d);
            for (row, k) in out.chunks_mut(d).zip(&keep) {
                if *k {
                    row.copy_from_slice(next.next().expect("one reconstruction per kept row"));
                }
            }
            Ok(out)
        };
        let l = splice::spliced_loss(
            model,
            toks,
            b,
            ctx,
            &data.hook,
            data.width,
            &mut reconstruct,
        )?;
        ce.add_contexts(&l, ctx);
        progress(i + 1, total)?;
    }
    let ce_sae = ce.mean();
    Ok(EvalReport {
        sae: sae_name.to_string(),
        arch: sae.arch.as_str().to_string(),
        d_in: sae.d_in,
        d_sae: sae.d_sae,
        model: model.name.clone(),
        hook: data.hook.clone(),
        corpus: data.corpus.clone(),
        skip_tokens: data.skip_tokens,
        context_size: ctx,
        n_contexts: data.n_contexts(),
        n_tokens: recon.n_tokens,
        l0: recon.l0(),
        mse: recon.mse(),
        fvu: recon.fvu(),
        gamma: recon.gamma(),
        ce_clean: base.ce_clean,
        ce_sae,
        ce_zero: base.ce_zero,
        ce_mean_ablation: base.ce_mean_ablation,
        delta_lm_loss: metrics::delta_lm_loss(ce_sae, base.ce_clean),
        loss_recovered: metrics::loss_recovered(base.ce_zero, ce_sae, base.ce_clean),
        loss_recovered_vs_mean: metrics::loss_recovered(
            base.ce_mean_ablation,
            ce_sae,
            base.ce_clean,
        ),
        firing: FiringStats::from_counts(recon.fire_counts(), recon.n_tokens, DENSE_FRACTION),
        max_norm,
        n_unspliced,
        compute: model.products(),
    })
}

/// Encode + decode `n` rows, adding them to `recon`; errors on non-finite reconstructions.
pub fn sae_reconstruct(
    sae: &Sae,
    recon: &mut ReconMetrics,
    x: &[f32],
    n: usize,
) -> Result<Vec<f32>> {
    let code = sae.encode(x, n);
    let x_hat = sae.decode(&code);
    if x_hat.iter().any(|v| !v.is_finite()) {
        bail!("the SAE produced a non-finite reconstruction (NaN/inf weights?)");
    }
    recon.add(x, &x_hat, &code);
    Ok(x_hat)
}
