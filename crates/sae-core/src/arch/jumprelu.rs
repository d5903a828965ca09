//! JumpReLU SAE (Rajamanoharan et al. 2024b): `f = pi * H(pi - theta)`, `pi = pre + b_enc`,
//! L0 penalty, straight-through estimators with a rectangle kernel of width `bandwidth` for the
//! threshold. theta is stored as `log_threshold` (positive by construction).

use super::{
    each_candidate, encode_jumprelu_row, loosen, parse_train_opts, train_opts_from, train_opts_of,
    validate_threshold, Arch, ArchKind, AuxMode, BatchRef, Entry, EntryGrad, Family, LatentParam,
    OptValue, RowCode, RowOut, Sparsity, StepCtx, Stored, TrainOption, TrainOpts,
};
use crate::sae::{Invalid, Sae};
use crate::trainer::TrainHyper;
use std::collections::BTreeMap;

/// The JumpReLU family.
pub struct JumpRelu;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&JumpRelu);

impl ArchKind {
    pub const JUMPRELU: ArchKind = KIND;
}

/// The JumpReLU training rule (trains `log_threshold`).
pub struct JumpReluRule {
    pub bandwidth: f32,
}

/// JumpReLU's training options.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct JumpReluOpts {
    /// Width of the straight-through estimators' rectangle kernel.
    pub bandwidth: f32,
    /// Every threshold's starting value.
    pub init_threshold: f32,
    /// When > 0: start every threshold at the one value that makes about this many latents
    /// fire per row of the initialisation sample (overrides `init_threshold`).
    pub init_l0: u64,
}

impl Default for JumpReluOpts {
    /// The JumpReLU paper's bandwidth and starting threshold, both 0.001, for inputs of unit
    /// mean squared norm.
    fn default() -> Self {
        JumpReluOpts {
            bandwidth: 0.001,
            init_threshold: 0.001,
            init_l0: 0,
        }
    }
}

const OPTIONS: &[TrainOption] = &[
    TrainOption {
        name: "bandwidth",
        value: OptValue::Number,
        help: "width of the straight-through estimators' rectangle kernel around each threshold, \
               > 0 (default 0.001, the paper's for inputs of unit mean squared norm)",
    },
    TrainOption {
        name: "init_threshold",
        value: OptValue::Number,
        help: "every threshold's starting value, > 0 (default 0.001, the paper's)",
    },
    TrainOption {
        name: "init_l0",
        value: OptValue::Count,
        help: "when > 0, start all thresholds at the value that makes about this many latents \
               fire per token of the initialisation sample, instead of init_threshold (on \
               SmolLM2 a start at the target L0 let L0 collapse far below it; a start above it \
               worked better: README \"JumpReLU's thresholds in short runs\")",
    },
];

impl Family for JumpRelu {
    fn name(&self) -> &'static str {
        "jumprelu"
    }
    fn about(&self) -> &'static str {
        "Rajamanoharan et al. 2024b: JumpReLU, L0 penalty through straight-through estimators"
    }
    fn saelens_name(&self) -> &'static str {
        "jumprelu"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &["jumprelu"]
    }
    fn latent_params(&self) -> &'static [LatentParam] {
        &[
            LatentParam {
                name: "b_enc",
                init: 0.0,
            },
            LatentParam {
                name: "threshold",
                init: 0.001,
            },
        ]
    }
    fn stored_as(&self, name: &'static str) -> Vec<(&'static str, Stored)> {
        match name {
            "threshold" => vec![("threshold", Stored::AsIs), ("log_threshold", Stored::Log)],
            _ => vec![(name, Stored::AsIs)],
        }
    }
    /// JumpReLU eq 8 has no b_dec subtraction on the input.
    fn apply_b_dec_to_input(&self) -> bool {
        false
    }
    fn sparsity(&self) -> Sparsity {
        Sparsity::Penalty { default: 0.1 }
    }
    fn default_lr(&self, _d_sae: usize) -> f32 {
        7e-5
    }
    /// The JumpReLU paper ramps its L0 coefficient over the first 10k steps.
    fn default_sparsity_warmup(&self, steps: u64, _hyper: &TrainHyper) -> u64 {
        (steps / 10).min(10_000)
    }
    fn train_options(&self) -> &'static [TrainOption] {
        OPTIONS
    }
    fn train_opts(
        &self,
        d_sae: usize,
        opts: &BTreeMap<String, String>,
    ) -> Result<TrainOpts, String> {
        let o: JumpReluOpts = parse_train_opts(OPTIONS, opts)?;
        if o.bandwidth <= 0.0 {
            return Err(format!(
                "bandwidth = {}; the kernel width must be > 0 (default 0.001)",
                o.bandwidth
            ));
        }
        if o.init_threshold <= 0.0 {
            return Err(format!(
                "init_threshold = {}; thresholds are trained as log theta, so it must be > 0 \
                 (default 0.001)",
                o.init_threshold
            ));
        }
        if o.init_l0 as usize > d_sae {
            return Err(format!(
                "init_l0 = {} is more than d_sae = {d_sae}; give at most d_sae, or 0 to start at \
                 init_threshold",
                o.init_l0
            ));
        }
        Ok(train_opts_from(&o))
    }
    fn validate_params(&self, sae: &Sae) -> Result<(), Invalid> {
        validate_threshold(sae, "threshold")
    }
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        encode_jumprelu_row(sae, pre, out)
    }
    fn set_sparsity(&self, sae: &mut Sae, _l0: usize, cutoff: f32) {
        sae.param_mut("threshold").fill(cutoff);
    }
    /// Adam moves log theta by about lr per step, so a run whose lr x steps is small cannot
    /// move the thresholds far from their start.
    fn start_note(&self, hyper: &TrainHyper, steps: u64, lr: f32) -> Option<String> {
        let o: JumpReluOpts = train_opts_of(hyper);
        let reach = lr as f64 * steps as f64;
        if o.init_l0 > 0 || reach >= 3.0 {
            return None;
        }
        Some(format!(
            "jumprelu: Adam moves each log threshold by about lr per step, so {steps} steps at \
             lr {lr} move the thresholds about {:.2}-fold from their start {}; a target L0 far \
             below the starting L0 may not be reached. For short runs start them higher, e.g. \
             --lr 3e-4 --arch-opt init_threshold=0.5 (README: \"JumpReLU's thresholds in short \
             runs\")",
            reach.exp(),
            o.init_threshold
        ))
    }
    fn init_from_sample(&self, sae: &mut Sae, hyper: &TrainHyper, sample: &[f32]) {
        let o: JumpReluOpts = train_opts_of(hyper);
        let theta = match o.init_l0 {
            0 => o.init_threshold,
            l0 => threshold_for_l0(sae, sample, l0 as usize),
        };
        sae.param_mut("threshold").fill(theta);
    }
    fn rule(&self, _sae: &Sae, hyper: &TrainHyper) -> Box<dyn Arch> {
        let o: JumpReluOpts = train_opts_of(hyper);
        Box::new(JumpReluRule {
            bandwidth: o.bandwidth,
        })
    }
}

/// The one threshold above which about `l0` of the `d_sae` pre-activations `W_enc x + b_enc`
/// lie per row, over up to 4,096 rows of `sample`; floored at 1e-6 (thresholds are positive).
fn threshold_for_l0(sae: &Sae, sample: &[f32], l0: usize) -> f32 {
    let d = sae.d_in.max(1);
    let n = (sample.len() / d).min(4096);
    if n == 0 {
        return JumpReluOpts::default().init_threshold;
    }
    let mut pi = sae.pre_activations(&sample[..n * d], n);
    let b_enc = sae.param("b_enc");
    for row in pi.chunks_mut(sae.d_sae) {
        row.iter_mut().zip(b_enc).for_each(|(p, b)| *p += b);
    }
    pi.retain(|p| p.is_finite());
    if pi.is_empty() {
        return JumpReluOpts::default().init_threshold;
    }
    let above = (l0 * n).min(pi.len() - 1);
    let at = pi.len() - 1 - above;
    let (_, theta, _) = pi.select_nth_unstable_by(at, f32::total_cmp);
    theta.max(1e-6)
}

const B_ENC: usize = 0;
const LOG_THETA: usize = 1;

impl Arch for JumpReluRule {
    fn kind(&self) -> ArchKind {
        ArchKind::JUMPRELU
    }
    fn trained_params(&self, sae: &Sae) -> Vec<Vec<f32>> {
        let log_t = sae
            .param("threshold")
            .iter()
            .map(|t| t.max(1e-12).ln())
            .collect();
        vec![sae.param("b_enc").to_vec(), log_t]
    }
    fn saved_params(&self, trained: &[Vec<f32>], _batch_threshold: f32) -> Vec<Vec<f32>> {
        let threshold = trained[LOG_THETA].iter().map(|l| l.exp()).collect();
        vec![trained[B_ENC].clone(), threshold]
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["b_enc", "log_threshold"]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::None
    }

    /// Emits active entries (pi > theta) and the inactive ones inside the kernel window
    /// (|pi - theta| < bandwidth / 2), which carry threshold gradient.
    fn select_row(&self, ctx: &StepCtx, row: usize, pre: &[f32], out: &mut RowOut) {
        let (b_enc, log_theta) = (&ctx.params[B_ENC][..], &ctx.params[LOG_THETA][..]);
        let half = 0.5 * self.bandwidth;
        let mut l0 = 0u32;
        each_candidate(ctx, row, pre, out, |out, j, p| {
            let pi = p + b_enc[j];
            let theta = log_theta[j].exp();
            if pi > theta - half {
                let active = pi > theta;
                out.push(j, if active { pi } else { 0.0 }, 0.0, p);
                l0 += active as u32;
            }
        });
        out.sparsity += l0 as f64;
    }

    fn prefilter(&self, params: &[Vec<f32>], _batch: BatchRef, out: &mut Vec<f32>) -> bool {
        self.screen_cutoff(params, out)
    }

    fn screen_cutoff(&self, params: &[Vec<f32>], out: &mut Vec<f32>) -> bool {
        out.clear();
        let half = 0.5 * self.bandwidth;
        let (b_enc, log_theta) = (&params[B_ENC], &params[LOG_THETA]);
        out.extend(
            b_enc
                .iter()
                .zip(log_theta)
                .map(|(b, lt)| loosen(lt.exp() - half - b)),
        );
        true
    }

    fn entry_backward(&self, ctx: &StepCtx, e: Entry, df: f32, _da: f32) -> EntryGrad {
        let Entry { j, pre, .. } = e;
        let pi = pre + ctx.params[B_ENC][j];
        let theta = ctx.params[LOG_THETA][j].exp();
        let eps = self.bandwidth;
        // The true gradient through z: H(pi - theta). The L0 term passes none to pi.
        let g_pi = if pi > theta { df } else { 0.0 };
        let u = (pi - theta) / eps;
        let kernel = if u > -0.5 && u < 0.5 { 1.0 } else { 0.0 };
        // eq 11 (JumpReLU wrt theta) and eq 12 (Heaviside wrt theta), times the L0 weight.
        let lambda = ctx.sparsity_coeff / ctx.n as f32;
        let g_theta = kernel * (-(theta / eps) * df - lambda / eps);
        EntryGrad {
            gpre: g_pi,
            params: [g_pi, g_theta * theta, 0.0],
        }
    }
}
