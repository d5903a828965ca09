//! Feature browser: a one-pass per-latent analysis of an SAE over a corpus (`analyze`,
//! `scan`, stored by `format`) and the local web page that shows it (`server`).

pub mod analyze;
pub mod api;
pub mod format;
pub mod hist;
pub mod scan;
pub mod server;
pub mod source;
pub mod toy;

pub use analyze::{analyze, scan_contexts, AnalyzeOptions};
pub use api::Browser;
pub use format::{Analysis, AnalysisMeta, Provenance};
pub use scan::{Example, ScanConfig, ScanResult, Scanner};
pub use source::{ActivationSource, EncodedText, ModelSource, SaeTextEncoder, TextEncoder};

#[cfg(test)]
mod tests;
