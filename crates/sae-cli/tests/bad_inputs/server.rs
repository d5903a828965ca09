//! Bad-input cases: server.

#[allow(unused_imports)]
use crate::harness::*;
