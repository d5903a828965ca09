//! The model side of the pipeline: corpus -> tokenizer -> language model with hook points.

pub mod corpus;
pub mod model;
pub mod tokenizer;

pub use model::{HookInfo, LanguageModel};
pub use tokenizer::Tokenizer;
