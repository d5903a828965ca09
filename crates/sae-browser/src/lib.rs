//! sae-browser
