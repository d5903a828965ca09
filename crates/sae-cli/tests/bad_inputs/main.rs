//! The bad-input suite: each case runs the `sae` binary (or the server) on input a careless or
//! hostile user could give and asserts a non-zero exit, a message naming the file or flag and
//! the fix, no panic, and every file that was there before byte-identical afterwards.
//! One module per class of input.

mod harness;

mod flags;
mod gsae;
mod knobs;
mod mixprec;
mod multihook;
mod outputs;
mod resample;
mod sae_files;
mod server;
mod stores;
mod vsae;
