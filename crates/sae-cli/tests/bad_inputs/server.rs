//! Bad-input cases: server.

use crate::harness::*;
