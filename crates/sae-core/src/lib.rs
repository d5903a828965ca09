//! SAE core: the math of sparse autoencoders, independent of any language model.
//!
//! Layout follows SAELens: `w_enc` is `[d_in, d_sae]` row-major, `w_dec` is `[d_sae, d_in]`
//! row-major (row i of `w_dec` is dictionary feature i). Everything is f32.
//!
//! A training step does ONE dense product (pre-activations = (x - b_dec) @ w_enc); every
//! other pass is O(batch x L0 x d_in) on the sparse code.

pub mod arch;
pub mod bench;
pub mod kernels;
pub mod metrics;
pub mod optim;
pub mod sae;
pub mod saelens;
pub mod sparse;
pub mod trainer;

pub use arch::ArchKind;
pub use sae::Sae;
pub use sparse::SparseCode;
pub use trainer::{SaeTrainer, StepStats, TrainHyper};

#[cfg(test)]
mod tests;
