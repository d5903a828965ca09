//! Bad-input cases: sae_files.

use crate::harness::*;
