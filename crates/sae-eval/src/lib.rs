//! sae-eval: evaluate SAEs the way the Gated SAE paper does (L0, FVU, MSE, shrinkage gamma,
//! LM loss with the reconstruction spliced in, zero/mean ablation), sweeps over
//! architectures and sparsity coefficients, PNG plots and Markdown/JSON reports.

pub mod eval;
pub mod metrics;
pub mod pipeline;
pub mod plot;
pub mod report;
pub mod splice;
pub mod sweep;
pub mod synthbench;

pub use eval::{baseline, evaluate_sae, Baseline, EvalData, EvalReport};

#[cfg(test)]
mod tests;
