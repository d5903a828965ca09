//! One training step per call: the fused hot path of every architecture.

use crate::sae::Sae;

/// Hyperparameters that stay fixed during a run; lr and the sparsity coefficient are passed
/// per step so that schedules live in the caller.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainHyper {
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_eps: f32,
    /// TopK/BatchTopK: AuxK coefficient (1/32) and k_aux.
    pub aux_coeff: f32,
    pub k_aux: usize,
    /// JumpReLU STE rectangle-kernel bandwidth.
    pub jumprelu_bandwidth: f32,
    /// A latent is dead when it has not fired in this many tokens.
    pub dead_window_tokens: u64,
    /// ReLU variant: Anthropic April-update decoder-norm-weighted L1 without the unit-norm
    /// constraint.
    pub relu_decoder_norm_l1: bool,
}

/// What one step measured (means over the batch).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepStats {
    pub loss: f64,
    pub mse: f64,
    pub sparsity_loss: f64,
    pub aux_loss: f64,
    pub l0: f64,
    pub fvu: f64,
    pub dead_latents: usize,
}

/// An SAE plus its optimiser state.
/// Fields are private: the trainer may keep internal layouts (e.g. a transposed encoder)
/// that differ from SAELens'; `snapshot` returns the SAE in SAELens layout.
pub struct SaeTrainer {
    _private: (),
}

// CONTRACT (bodies by the sae-core owner).
impl SaeTrainer {
    pub fn new(sae: Sae, hyper: TrainHyper) -> Self {
        let _ = (sae, hyper);
        todo!("sae-core owner")
    }

    /// The current weights in SAELens layout.
    pub fn snapshot(&self) -> Sae {
        todo!("sae-core owner")
    }

    pub fn steps_done(&self) -> u64 {
        todo!("sae-core owner")
    }

    /// One optimiser step on `n` rows of `x` (`[n, d_in]`).
    pub fn step(&mut self, x: &[f32], n: usize, lr: f32, sparsity_coeff: f32) -> StepStats {
        let _ = (x, n, lr, sparsity_coeff);
        todo!("sae-core owner")
    }

    /// Optimiser state (Adam moments, step count, dead-latent counters) to a safetensors
    /// file, for `--resume`; the weights themselves are saved with `saelens::save`.
    pub fn save_state(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let _ = path;
        todo!("sae-core owner")
    }

    pub fn load_state(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        let _ = path;
        todo!("sae-core owner")
    }
}
