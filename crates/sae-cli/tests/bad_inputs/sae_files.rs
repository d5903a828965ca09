//! Bad-input cases: sae_files.

#[allow(unused_imports)]
use crate::harness::*;
