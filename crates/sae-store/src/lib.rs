//! sae-store
