//! Bad-input cases: stores.

#[allow(unused_imports)]
use crate::harness::*;
