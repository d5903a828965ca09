//! SAE core: the math of sparse autoencoders, independent of any language model.
//!
//! Layout follows SAELens: `w_enc` is `[d_in, d_sae]` row-major, `w_dec` is `[d_sae, d_in]`
//! row-major (row i of `w_dec` is dictionary feature i). Everything is f32.
//!
//! * [`Sae`]: weights, paper initialisation, inference (`encode`/`decode`), scale folding,
//!   Gated -> JumpReLU export.
//! * [`SaeTrainer`]: one optimiser step per call (Adam, beta1 = 0 by default), dead-latent
//!   counters, optimiser state for resume. The loss convention (per-token sums over d_in,
//!   mean over tokens; lambda_ours = d_in * lambda_paper) and the NaN rule are documented in
//!   [`trainer`].
//! * [`arch`]: one module per architecture behind the small [`arch::Arch`] trait.
//! * [`saelens`]: `cfg.json` + `sae_weights.safetensors`, SAELens' names and shapes.
//! * [`metrics`]: L0, MSE, FVU, shrinkage gamma, firing counts, MMCS.
//! * [`mod@bench`]: tokens/s of full steps against the one-GEMM limit.
//! * [`f32_product`], [`bf16`]: the dense products, kernels picked at run time.
//! * [`hugepage`]: the allocator the binaries choose, huge pages under large buffers.
//!
//! A training step does ONE dense product (pre-activations = (x - b_dec) @ w_enc, on the
//! rayon threads through [`f32_product`]: `gemm`, or where AVX2 is the widest unit our own
//! packed kernel); every other pass is O(batch x L0 x d_in) on the sparse code. When the
//! code is dense (more than 1/16 of the entries active, e.g. right after initialisation) the
//! decode and the gradients switch to GEMMs instead. Results are bit-for-bit reproducible for
//! a seed and a thread count: every reduction runs over fixed-size chunks in a fixed order.

pub mod aligned;
pub mod amx;
pub mod arch;
pub mod bench;
pub mod bf16;
pub mod cpu;
pub mod f32_product;
pub mod hugepage;
pub mod kernels;
pub mod metrics;
pub mod optim;
pub mod sae;
pub mod saelens;
pub mod sparse;
pub mod trainer;

pub use arch::ArchKind;
pub use bf16::Precision;
pub use sae::Sae;
pub use sparse::SparseCode;
pub use trainer::{SaeTrainer, StepStats, TrainHyper};

#[cfg(test)]
mod tests;
