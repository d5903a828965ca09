//! sae-eval
