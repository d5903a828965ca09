//! The model side of the pipeline: corpus -> tokenizer -> language model with hook points.

mod attention;
pub use sae_core::bf16;
pub mod corpus;
pub mod fetch;
pub mod gpt2;
pub mod harvest;
pub mod harvest_store;
pub mod hooks;
pub mod hub;
mod kernels;
pub mod llama;
pub mod loader;
pub mod model;
pub mod parquet_text;
mod swiglu_bf16;
pub mod tokenizer;

pub use hooks::{Hook, HookKind};
pub use model::{HookInfo, LanguageModel, ProductPrecision};
pub use tokenizer::Tokenizer;
