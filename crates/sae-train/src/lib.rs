//! sae-train: the training loop around `sae_core::SaeTrainer`.
//!
//! Schedules (lr warm-up and decay, sparsity warm-up), input normalisation to E||x||^2 = d_in
//! (folded into the saved weights), b_dec initialisation, checkpoints, `--resume` (an unfinished
//! run) and `--extend` (a finished one, trained on), the JSONL log and progress bar, and the
//! SAELens-layout output.
//!
//! Output of a run with `out = runs/x`:
//! * `runs/x/`: `cfg.json`, `sae_weights.safetensors` (SAELens), `train_log.jsonl`,
//!   `train_config.json`, `train_summary.json`; swapped in whole when the run ends. With
//!   `keep_state`, also `checkpoint/` (the final optimiser state, for an exact `--extend`).
//! * `runs/x.partial/` while it runs: the log, the config and `checkpoint/`; removed at the end.
//!
//! With several hooks (`hook = "A,B"`, training from a model), `runs/x/A/` and `runs/x/B/`,
//! each laid out as above.

pub mod checkpoint;
pub mod config;
pub mod flags;
pub mod info;
pub mod init;
pub mod l0_target;
pub mod model_source;
pub mod run;
pub mod source;

pub use config::{BDecInit, Resolved, TrainConfig};
pub use flags::TrainFlags;
pub use model_source::{ModelSource, ModelSourceOptions};
pub use run::{
    hook_list, open_source, partial_dir, run, run_hooks, run_with_source, FinalMetrics,
    TrainSummary,
};
pub use source::{BatchSource, MemorySource, StoreSource};
