//! TransformerLens hook names and what the forward pass does at a hook.

use crate::model::SpliceFn;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    ResidPre,
    AttnZ,
    AttnOut,
    MlpOut,
    ResidPost,
}

impl HookKind {
    /// In the order the forward pass reaches them within a block.
    pub const ALL: [HookKind; 5] = [
        HookKind::ResidPre,
        HookKind::AttnZ,
        HookKind::AttnOut,
        HookKind::MlpOut,
        HookKind::ResidPost,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            HookKind::ResidPre => "hook_resid_pre",
            HookKind::AttnZ => "attn.hook_z",
            HookKind::AttnOut => "hook_attn_out",
            HookKind::MlpOut => "hook_mlp_out",
            HookKind::ResidPost => "hook_resid_post",
        }
    }
}

/// A hook point: `blocks.{layer}.{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    pub layer: usize,
    pub kind: HookKind,
}

impl Hook {
    /// Where the forward pass reaches this hook: earlier hooks sort first.
    pub fn forward_order(&self) -> (usize, usize) {
        let kind = HookKind::ALL.iter().position(|k| *k == self.kind);
        (self.layer, kind.unwrap_or(0))
    }

    pub fn name(&self) -> String {
        format!("blocks.{}.{}", self.layer, self.kind.suffix())
    }

    /// Parses a TransformerLens name, checking the layer exists.
    pub fn parse(name: &str, n_layers: usize) -> Result<Hook> {
        let parsed = name.strip_prefix("blocks.").and_then(|rest| {
            let (layer, suffix) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let kind = HookKind::ALL.into_iter().find(|k| k.suffix() == suffix)?;
            Some(Hook { layer, kind })
        });
        match parsed {
            Some(h) if h.layer < n_layers => Ok(h),
            _ => bail!(
                "unknown hook '{name}'; valid hooks are blocks.L.{{{}}} for L in 0..{} (see `sae hooks`)",
                HookKind::ALL.map(|k| k.suffix()).join(","),
                n_layers
            ),
        }
    }
}

/// What the forward pass does when it reaches the hook.
pub enum HookMode<'a> {
    /// Return the activation and stop.
    Capture,
    /// Replace the activation in place and go on.
    Splice(SpliceFn<'a>),
    /// Nothing (no hook).
    Pass,
    /// Copy the activation at each hook point reached into `rows` (in the order the forward
    /// pass reaches them) and stop once `remaining` more have been copied. `recorded` counts
    /// them: the n-th copy overwrites `rows[recorded]` where the caller left a buffer there
    /// (kept from an earlier pass, so no fresh pages are faulted in), else is pushed; the
    /// caller truncates `rows` to `recorded` afterwards.
    Record {
        rows: &'a mut Vec<Vec<f32>>,
        remaining: usize,
        recorded: usize,
    },
}

impl HookMode<'_> {
    /// `None` means stop and return `t`; `Some` is the (possibly replaced) activation.
    pub fn apply(&mut self, t: &Tensor) -> Result<Option<Tensor>> {
        match self {
            HookMode::Capture => Ok(None),
            HookMode::Pass => Ok(Some(t.clone())),
            HookMode::Record {
                rows,
                remaining,
                recorded,
            } => {
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                match rows.get_mut(*recorded) {
                    Some(row) => *row = values,
                    None => rows.push(values),
                }
                *recorded += 1;
                *remaining = remaining.saturating_sub(1);
                Ok((*remaining > 0).then(|| t.clone()))
            }
            HookMode::Splice(f) => {
                let shape = t.shape().clone();
                let mut values = t.flatten_all()?.to_vec1::<f32>()?;
                f(&mut values)?;
                if values.len() != shape.elem_count() {
                    bail!("splice changed the activation size");
                }
                Ok(Some(Tensor::from_vec(values, shape, &Device::Cpu)?))
            }
        }
    }

    /// The same on a row-major buffer the forward pass owns: `true` means stop (capture),
    /// a splice edits `values` in place.
    pub fn apply_in_place(&mut self, values: &mut [f32]) -> Result<bool> {
        match self {
            HookMode::Capture => Ok(true),
            HookMode::Pass => Ok(false),
            HookMode::Record {
                rows,
                remaining,
                recorded,
            } => {
                record_into(rows, recorded, values);
                *remaining = remaining.saturating_sub(1);
                Ok(*remaining == 0)
            }
            HookMode::Splice(f) => {
                f(values)?;
                Ok(false)
            }
        }
    }
}

/// `values` into `rows[*recorded]`, reusing the buffer there if there is one.
fn record_into(rows: &mut Vec<Vec<f32>>, recorded: &mut usize, values: &[f32]) {
    match rows.get_mut(*recorded) {
        Some(row) => {
            row.clear();
            row.extend_from_slice(values);
        }
        None => rows.push(values.to_vec()),
    }
    *recorded += 1;
}
