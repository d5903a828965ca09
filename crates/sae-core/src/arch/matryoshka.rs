//! Matryoshka BatchTopK SAE (Bussmann et al. 2025, arXiv 2503.17547): BatchTopK selection,
//! and a loss that asks every nested prefix of the dictionary (latents `0..m_1`, `0..m_2`, ...,
//! `0..d_sae`) to reconstruct the input on its own:
//! `L = sum_i ||x - (f_{0..m_i} W_dec[0..m_i] + b_dec)||^2 + alpha * AuxK`.
//! Every head has weight 1, as SAELens adds each inner MSE to the full one (the paper's
//! weighted sum with w_i = 1; dictionary_learning takes the mean instead, a constant factor).
//! Inference is BatchTopK's: a global threshold, saved as a SAELens `jumprelu` SAE.

use super::batchtopk::{encode_batch_top_k, threshold_stored_as, BatchTopKRule, B_ENC_THRESHOLD};
use super::topk::{auxk_train_opts, topk_lr, AUXK_OPTIONS};
use super::{
    encode_jumprelu_row, validate_k, validate_threshold, Arch, ArchKind, Family, LatentParam,
    OptionSpec, RowCode, Settings, Sparsity, Stored, TrainOption, TrainOpts,
};
use crate::sae::{Invalid, Sae};
use crate::sparse::SparseCode;
use crate::trainer::TrainHyper;
use serde_json::json;
use std::collections::BTreeMap;

/// The Matryoshka BatchTopK family.
pub struct Matryoshka;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&Matryoshka);

impl ArchKind {
    pub const MATRYOSHKA: ArchKind = KIND;
}

const WIDTHS: &str = "widths";

/// The default prefixes, as in the paper's 128/512/2048/4096 of 4096: d_sae/32, /8, /2, 1.
fn default_widths(d_sae: usize) -> Vec<usize> {
    let mut w: Vec<usize> = [32, 8, 2, 1]
        .iter()
        .map(|div| d_sae / div)
        .filter(|&w| w > 0)
        .collect();
    w.dedup();
    w
}

/// Why `widths` cannot be the prefixes of a `d_sae`-latent dictionary.
fn check_widths(widths: &[usize], d_sae: usize) -> Result<(), String> {
    if widths.is_empty() {
        return Err("widths is empty; give increasing prefix widths ending at d_sae".into());
    }
    if widths[0] == 0 || widths.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "widths {widths:?} must be increasing and positive (e.g. 128,512,2048,{d_sae})"
        ));
    }
    if *widths.last().unwrap() != d_sae {
        return Err(format!(
            "widths {widths:?} must end at d_sae = {d_sae} (the whole dictionary is the last \
             prefix)"
        ));
    }
    Ok(())
}

/// `settings["widths"]` as a list (None when absent or not a list of counts).
fn widths_of(settings: &Settings) -> Option<Vec<usize>> {
    settings
        .get(WIDTHS)?
        .as_array()?
        .iter()
        .map(|v| v.as_u64().map(|w| w as usize))
        .collect()
}

impl Family for Matryoshka {
    fn name(&self) -> &'static str {
        "matryoshka"
    }
    fn about(&self) -> &'static str {
        "Bussmann et al. 2025: BatchTopK whose nested dictionary prefixes each reconstruct"
    }
    fn saelens_name(&self) -> &'static str {
        "jumprelu"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &["matryoshka_batchtopk"]
    }
    fn setting_keys(&self) -> &'static [&'static str] {
        &["k", WIDTHS]
    }
    /// SAELens' Matryoshka BatchTopK names its prefixes `matryoshka_widths`.
    fn settings_from_saelens(&self, cfg: &serde_json::Value, settings: &mut Settings) {
        if let Some(w) = cfg.get("matryoshka_widths").filter(|w| !w.is_null()) {
            settings.entry(WIDTHS.into()).or_insert_with(|| w.clone());
        }
    }
    fn latent_params(&self) -> &'static [LatentParam] {
        B_ENC_THRESHOLD
    }
    fn stored_as(&self, name: &'static str) -> Vec<(&'static str, Stored)> {
        threshold_stored_as(name)
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
            name: WIDTHS,
            help: "increasing prefix widths ending at d_sae, comma-separated (default \
                   d_sae/32,d_sae/8,d_sae/2,d_sae: 128,512,2048,4096 at 4096)",
        }]
    }
    fn settings(
        &self,
        k: usize,
        d_sae: usize,
        opts: &BTreeMap<String, String>,
    ) -> Result<Settings, String> {
        let widths = match opts.get(WIDTHS) {
            None => default_widths(d_sae),
            Some(text) => text
                .split(',')
                .map(|w| {
                    w.trim().replace('_', "").parse::<usize>().map_err(|_| {
                        format!(
                            "widths: '{}' is not a count; write e.g. 128,512,{d_sae}",
                            w.trim()
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        check_widths(&widths, d_sae)?;
        Ok(Settings::from([
            ("k".to_string(), json!(k)),
            (WIDTHS.to_string(), json!(widths)),
        ]))
    }
    fn validate_settings(&self, sae: &Sae) -> Result<(), Invalid> {
        validate_k(sae)?;
        let Some(widths) = widths_of(&sae.settings) else {
            return Err(Invalid::Config {
                key: "widths",
                msg: "no prefix widths ('sae_core.widths', a list of counts); a matryoshka \
                      SAE needs them"
                    .into(),
            });
        };
        check_widths(&widths, sae.d_sae).map_err(|msg| Invalid::Config { key: "widths", msg })
    }
    fn validate_params(&self, sae: &Sae) -> Result<(), Invalid> {
        validate_threshold(sae, "threshold")
    }
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        encode_jumprelu_row(sae, pre, out)
    }
    fn encode_batch(&self, sae: &Sae, x: &[f32], n: usize) -> Option<SparseCode> {
        Some(encode_batch_top_k(sae, x, n))
    }
    fn rule(&self, sae: &Sae, hyper: &TrainHyper) -> Box<dyn Arch> {
        Box::new(BatchTopKRule::new(
            ArchKind::MATRYOSHKA,
            sae,
            hyper,
            widths_of(&sae.settings).unwrap_or_else(|| vec![sae.d_sae]),
        ))
    }
}
