//! sae-train
