//! Sharded activation writer (owned by the sae-lm / harvest helper).
