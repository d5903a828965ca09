//! What the `sae` commands write, and how: an output directory is checked before any work
//! (it may be replaced only when it holds an output of the same kind, never when it holds the
//! user's own files or an input of the command), written beside itself and renamed into place,
//! guarded by a lock against a second writer, and sized against the free space first.
//! Long work reports progress as a bar on a terminal and as a line every few seconds in a log.

pub mod atomic;
pub mod lock;
pub mod outdir;
pub mod progress;
pub mod space;

pub use atomic::{replace_dir, write_atomic};
pub use lock::{LockError, OutputLock};
pub use outdir::{
    check_output, check_output_folder, mark, Existing, Input, OutputError, OutputKind, MARK_FILE,
};
pub use progress::{Progress, ProgressGroup};
pub use space::{
    available_memory, ensure_memory, ensure_space, free_bytes, human_bytes, product, MemoryError,
    SpaceError,
};
