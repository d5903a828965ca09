//! Bad-input cases: outputs.

#[allow(unused_imports)] use crate::harness::*;
