//! Bad-input cases: flags.

#[allow(unused_imports)]
use crate::harness::*;
