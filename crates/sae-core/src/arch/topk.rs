//! TopK SAE (Gao et al. 2024): keep the k largest `pre + b_enc` of each row, ReLU on them,
//! plus AuxK: the top `k_aux` dead latents reconstruct the (detached) residual.

use super::{
    batch_state, candidates, loosen, parse_train_opts, top_k_in_order, top_k_into, train_opts_from,
    train_opts_of, validate_k, Arch, ArchKind, AuxMode, BatchInput, BatchRef, BatchSlot, Entry,
    EntryGrad, Family, LatentParam, OptValue, RowCode, RowOut, Settings, Sparsity, StepCtx,
    TopKScope, TopKScratch, TrainOption, TrainOpts,
};
use crate::sae::{Invalid, Sae};
use crate::trainer::TrainHyper;
use serde_json::json;
use std::collections::BTreeMap;

/// The TopK family.
pub struct TopK;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&TopK);

impl ArchKind {
    pub const TOPK: ArchKind = KIND;
}

/// The TopK training rule.
pub struct TopKRule {
    pub k: usize,
    pub k_aux: usize,
    pub aux_coeff: f32,
}

/// The training options of the families with the AuxK loss (topk and those that reuse its
/// loss: batchtopk, matryoshka, mutualchoice, vsae).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AuxKOpts {
    /// Latents per token in the auxiliary reconstruction; 0 means d_in / 2 (DL's top_k
    /// default).
    pub k_aux: usize,
    /// The AuxK loss coefficient.
    pub aux_coeff: f32,
}

impl Default for AuxKOpts {
    /// Gao et al.: coefficient 1/32; k_aux d_in / 2 as their reference code.
    fn default() -> Self {
        AuxKOpts {
            k_aux: 0,
            aux_coeff: 1.0 / 32.0,
        }
    }
}

/// `--arch-opt` options of the AuxK families.
pub(crate) const AUXK_OPTIONS: &[TrainOption] = &[
    TrainOption {
        name: "k_aux",
        value: OptValue::Count,
        help: "latents per token in the AuxK reconstruction of the residual, at most d_sae \
               (default 0: d_in / 2)",
    },
    TrainOption {
        name: "aux_coeff",
        value: OptValue::Number,
        help: "coefficient of the AuxK loss, >= 0 (default 1/32; 0: no AuxK loss)",
    },
];

impl AuxKOpts {
    /// The options of a run (defaults where `hyper` has none).
    pub(crate) fn of(hyper: &TrainHyper) -> Self {
        train_opts_of(hyper)
    }
    /// k_aux for inputs of width `d_in`.
    pub(crate) fn k_aux(&self, d_in: usize) -> usize {
        if self.k_aux == 0 {
            d_in / 2
        } else {
            self.k_aux
        }
    }
}

/// `Family::train_opts` of the AuxK families.
pub(crate) fn auxk_train_opts(
    d_sae: usize,
    opts: &BTreeMap<String, String>,
) -> Result<TrainOpts, String> {
    let o: AuxKOpts = parse_train_opts(AUXK_OPTIONS, opts)?;
    if o.aux_coeff < 0.0 {
        return Err(format!(
            "aux_coeff = {}; the AuxK coefficient must be >= 0 (0: no AuxK loss; default 1/32)",
            o.aux_coeff
        ));
    }
    if o.k_aux > d_sae {
        return Err(format!(
            "k_aux = {} is more than d_sae = {d_sae}; give at most d_sae (0 = d_in / 2)",
            o.k_aux
        ));
    }
    Ok(train_opts_from(&o))
}

/// The OpenAI TopK lr rule: 2e-4 at 16k latents, scaled by 1/sqrt(d_sae / 16384).
pub(crate) fn topk_lr(d_sae: usize) -> f32 {
    2e-4 / (d_sae as f32 / 16384.0).sqrt()
}

pub(crate) const B_ENC_ONLY: &[LatentParam] = &[LatentParam {
    name: "b_enc",
    init: 0.0,
}];

impl Family for TopK {
    fn name(&self) -> &'static str {
        "topk"
    }
    fn about(&self) -> &'static str {
        "Gao et al. 2024: the k largest pre-activations per token, with the AuxK loss"
    }
    fn saelens_name(&self) -> &'static str {
        "topk"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &["topk"]
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
    fn saelens_cfg(&self, sae: &Sae, cfg: &mut serde_json::Map<String, serde_json::Value>) {
        cfg.insert("k".into(), serde_json::json!(sae.k()));
        // Our TopK picks the k largest raw pre-activations.
        cfg.insert("rescale_acts_by_decoder_norm".into(), false.into());
    }
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        let b_enc = sae.param("b_enc");
        let mut scratch = std::mem::take(&mut out.scratch);
        let cands = pre.iter().zip(b_enc).enumerate();
        top_k_into(
            sae.k(),
            cands.map(|(j, (&p, &b))| (p + b, j as u32)),
            &mut scratch,
        );
        for &(v, j) in &scratch.best {
            out.push(j as usize, v);
        }
        out.scratch = scratch;
    }
    fn rule(&self, sae: &Sae, hyper: &TrainHyper) -> Box<dyn Arch> {
        Box::new(TopKRule::new(sae, hyper))
    }
}

impl TopKRule {
    /// TopK's rule for `sae`, with the run's AuxK options.
    pub(crate) fn new(sae: &Sae, hyper: &TrainHyper) -> Self {
        let aux = AuxKOpts::of(hyper);
        TopKRule {
            k: sae.k(),
            k_aux: aux.k_aux(sae.d_in),
            aux_coeff: aux.aux_coeff,
        }
    }
}

/// One non-negative coefficient that a TopK variant keeps beside `k` in its settings (vSAE's
/// KL weight, g-SAE's gradient weight): parsed from `--arch-opt`, checked on load, and kept
/// when the sparsity is set.
pub(crate) struct KCoefficient {
    pub key: &'static str,
    pub default: f64,
    /// What it is, for messages ("KL coefficient").
    pub what: &'static str,
    /// What 0 means, for messages ("no KL term").
    pub zero_means: &'static str,
    pub family: &'static str,
}

impl KCoefficient {
    fn check(&self, v: f64) -> Result<(), String> {
        if !v.is_finite() || v < 0.0 {
            return Err(format!(
                "{} = {v}; the {} must be a finite number >= 0 (0: {}; default {})",
                self.key, self.what, self.zero_means, self.default
            ));
        }
        Ok(())
    }

    pub fn of(&self, settings: &Settings) -> Option<f64> {
        settings.get(self.key)?.as_f64()
    }

    /// The value in `sae`'s settings, or the default (for a rule of a checked SAE).
    pub fn value(&self, sae: &Sae) -> f32 {
        self.of(&sae.settings).unwrap_or(self.default) as f32
    }

    /// `Family::settings`: `k` and the coefficient from `--arch-opt`.
    pub fn settings(&self, k: usize, opts: &BTreeMap<String, String>) -> Result<Settings, String> {
        let key = self.key;
        let v = match opts.get(key) {
            None => self.default,
            Some(text) => text.trim().parse::<f64>().map_err(|_| {
                format!(
                    "{key}: '{}' is not a number; write e.g. {key}=0.5",
                    text.trim()
                )
            })?,
        };
        self.check(v)?;
        Ok(Settings::from([
            ("k".to_string(), json!(k)),
            (key.to_string(), json!(v)),
        ]))
    }

    /// `Family::validate_settings`: `k` in range and the coefficient present and valid.
    pub fn validate(&self, sae: &Sae) -> Result<(), Invalid> {
        validate_k(sae)?;
        let key = self.key;
        let Some(v) = self.of(&sae.settings) else {
            return Err(Invalid::Config {
                key,
                msg: format!(
                    "no {} ('sae_core.{key}', a number >= 0); a {} SAE needs it",
                    self.what, self.family
                ),
            });
        };
        self.check(v).map_err(|msg| Invalid::Config { key, msg })
    }

    /// `Family::set_sparsity`: the new `k`, the coefficient kept (or the default).
    pub fn set_k(&self, sae: &mut Sae, l0: usize) {
        sae.settings
            .insert("k".into(), json!(l0.clamp(1, sae.d_sae)));
        sae.settings
            .entry(self.key.to_string())
            .or_insert(json!(self.default));
    }
}

impl Arch for TopKRule {
    fn kind(&self) -> ArchKind {
        ArchKind::TOPK
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_enc"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::AuxK
    }
    fn aux_coeff(&self) -> f32 {
        self.aux_coeff
    }

    /// A value that most rows' k-th largest `pre + b_enc` exceeds, from a sample of rows:
    /// rows with at least k latents above it only need to look at those (exact), the others
    /// fall back to a full scan.
    fn prepare_batch(&self, batch: &BatchInput, state: &mut BatchSlot) {
        batch_state::<RowFloor>(state).0 = row_kth_floor(self.k, batch);
    }

    fn prefilter(&self, params: &[Vec<f32>], batch: BatchRef, out: &mut Vec<f32>) -> bool {
        let floor = batch.get::<RowFloor>().0;
        out.clear();
        out.extend(params[0].iter().map(|b| loosen(floor - b)));
        true
    }

    /// ReLU after the top k: only `pre + b_enc > 0` is ever selected (main or AuxK).
    fn screen_cutoff(&self, params: &[Vec<f32>], out: &mut Vec<f32>) -> bool {
        out.clear();
        out.extend(params[0].iter().map(|b| -b));
        true
    }

    fn screen_top_k(&self) -> Option<TopKScope> {
        Some(TopKScope::Row(self.k))
    }

    fn select_row(&self, ctx: &StepCtx, row: usize, pre: &[f32], out: &mut RowOut) {
        let b_enc = &ctx.params[0][..];
        let mut scratch = std::mem::take(&mut out.scratch);
        let (mut cands, mut vals) = (
            std::mem::take(&mut out.cands),
            std::mem::take(&mut out.cand_vals),
        );
        cands.clear();
        vals.clear();
        // A screened step's list holds every entry above the screen's raised cutoff: the
        // row's f32 top k and any ties with its k-th. It has fewer than k entries only
        // where the raise is 0, and then the others score at most 0 and are never kept.
        if ctx.screened.is_some() || !ctx.cutoff.is_empty() {
            candidates(ctx, row, pre, &mut cands, &mut vals);
        }
        if ctx.screened.is_some() || cands.len() >= self.k {
            scratch.vals.clear();
            let it = cands.iter().zip(&vals);
            scratch
                .vals
                .extend(it.map(|(&j, &p)| p + b_enc[j as usize]));
            top_k_in_order(self.k, &mut scratch);
            for i in scratch.positions.iter().map(|&i| i as usize) {
                let v = scratch.vals[i];
                if v > 0.0 {
                    out.push(cands[i] as usize, v, 0.0, vals[i]);
                }
            }
        } else {
            let it = pre.iter().zip(b_enc).enumerate();
            top_k_into(
                self.k,
                it.map(|(j, (&p, &b))| (p + b, j as u32)),
                &mut scratch,
            );
            for &(v, j) in &scratch.best {
                if v > 0.0 {
                    out.push(j as usize, v, 0.0, pre[j as usize]);
                }
            }
        }
        out.cands = cands;
        out.cand_vals = vals;
        push_auxk(self.k_aux, ctx, row, pre, &mut scratch, out);
        out.scratch = scratch;
    }

    fn entry_backward(&self, _ctx: &StepCtx, e: Entry, df: f32, da: f32) -> EntryGrad {
        let Entry { f, a, .. } = e;
        auxk_backward(f, a, df, da)
    }
}

/// TopK's batch state: the prefilter's floor (`row_kth_floor`).
#[derive(Default)]
struct RowFloor(f32);

/// A floor under the k-th largest `pre + b_enc` of most rows (0 at least): 0.8 times the
/// smallest k-th largest value among up to 16 sampled rows.
fn row_kth_floor(k: usize, batch: &BatchInput) -> f32 {
    let (d_sae, n, pre) = (batch.d_sae, batch.n, batch.pre);
    let b_enc = &batch.params[0][..];
    if k == 0 || k > d_sae || n == 0 {
        return 0.0;
    }
    let step = (n / 16).max(1);
    let mut row = Vec::with_capacity(d_sae);
    let mut floor = f32::INFINITY;
    for b in (0..n).step_by(step) {
        row.clear();
        row.extend(
            pre[b * d_sae..(b + 1) * d_sae]
                .iter()
                .zip(b_enc)
                .map(|(p, b)| p + b),
        );
        let (_, kth, _) = row.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        floor = floor.min(*kth);
    }
    if floor.is_finite() {
        (0.8 * floor).max(0.0)
    } else {
        0.0
    }
}

/// AuxK entries: the `k_aux` largest positive `pre + b_enc` among dead latents (f = 0, a = value).
pub(crate) fn push_auxk(
    k_aux: usize,
    ctx: &StepCtx,
    row: usize,
    pre: &[f32],
    scratch: &mut TopKScratch,
    out: &mut RowOut,
) {
    if ctx.dead.is_empty() {
        return;
    }
    let b_enc = &ctx.params[0][..];
    let Some(lists) = ctx.screened else {
        let cands = ctx
            .dead
            .iter()
            .map(|&j| (pre[j as usize] + b_enc[j as usize], j));
        top_k_into(k_aux, cands, scratch);
        for &(v, j) in scratch.best.iter() {
            if v > 0.0 {
                out.push(j as usize, 0.0, v, pre[j as usize]);
            }
        }
        return;
    };
    // A screened row lists every dead latent above its ReLU cutoff, with its f32 value;
    // the others score at most 0 and are never kept. Both lists ascend.
    let (js, vals) = lists.row(row);
    let dead_of = |d: &mut usize, j: u32| {
        while *d < ctx.dead.len() && ctx.dead[*d] < j {
            *d += 1;
        }
        *d < ctx.dead.len() && ctx.dead[*d] == j
    };
    let mut d = 0;
    let cands = js
        .iter()
        .zip(vals)
        .filter(|(&j, _)| dead_of(&mut d, j))
        .map(|(&j, &p)| (p + b_enc[j as usize], j));
    top_k_into(k_aux, cands, scratch);
    let mut at = 0;
    for &(v, j) in scratch.best.iter() {
        if v > 0.0 {
            while js[at] != j {
                at += 1;
            }
            out.push(j as usize, 0.0, v, vals[at]);
        }
    }
}

/// Main entries carry f > 0, AuxK entries a > 0; ReLU passes the gradient of whichever is set.
pub(crate) fn auxk_backward(f: f32, a: f32, df: f32, da: f32) -> EntryGrad {
    let g = if f > 0.0 { df } else { 0.0 } + if a > 0.0 { da } else { 0.0 };
    EntryGrad {
        gpre: g,
        params: [g, 0.0, 0.0],
    }
}
