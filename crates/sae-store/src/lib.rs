//! Activation store.
//!
//! On-disk format (written by `writer`, read by the reader; the reader also takes any
//! `.safetensors` / `.npy` file holding one 2-D float tensor `[n_tokens, d_in]`):
//!
//! * `DIR/shard_00000.safetensors`, ...: tensor `activations` `[n_rows, d_in]` (f32 or bf16);
//!   optionally `tokens` `[n_rows]` (u32 token ids at those positions) and `positions`
//!   `[n_rows, 2]` (u32 context index, position in context).
//! * `DIR/manifest.json`: `{ "model", "hook", "d_in", "context_size", "n_tokens", "corpus",
//!   "dtype", "shards": [{"file", "n_rows"}], "complete": bool, ... }`. Shards are written to a
//!   temp name then renamed, and listed in the manifest only once complete, so a killed harvest
//!   keeps its finished shards and resumes after them.
//!
//! Reading (`reader`, `shuffle`): a file, or a directory (its manifest's shards, or without a
//! manifest every `.safetensors`/`.npy` file sorted by name), read with positioned reads (a
//! file changed by another process meanwhile is an error naming it), f32/f16/bf16 converted to
//! f32 per batch; batches follow a seeded permutation of all rows, epoch after
//! epoch. `synth` writes synthetic sets in this format plus `true_features.safetensors`.

pub mod npy;
pub mod reader;
pub mod shuffle;
pub mod synth;
pub mod synthbench;
pub mod writer;

pub use reader::{ActivationFile, ActivationStore, Dtype};
pub use shuffle::{BatchStream, Order, Permutation, StreamPosition};
