//! The scan driver: contexts -> model activations -> SAE codes -> per-latent statistics,
//! then the decoder directions' logit effects, then the analysis directory.

use crate::format::{logit_effect, write_analysis, AnalysisMeta, LogitEffect, Provenance};
use crate::scan::{ScanConfig, ScanResult, Scanner};
use crate::source::{check_widths, ActivationSource};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use sae_core::Sae;
use sae_output::Progress;
use std::path::Path;

/// How to run a scan.
#[derive(Clone, Debug)]
pub struct AnalyzeOptions {
    pub scan: ScanConfig,
    /// Contexts per model forward.
    pub batch: usize,
    /// Top and bottom tokens stored per decoder direction (0: no logit effects).
    pub n_logits: usize,
    pub progress: bool,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        Self {
            scan: ScanConfig::default(),
            batch: 8,
            n_logits: 10,
            progress: false,
        }
    }
}

fn bar(len: u64, what: &str, show: bool) -> Progress {
    if !show {
        return Progress::hidden();
    }
    Progress::new(
        len,
        what,
        &format!(
            "{what:>9} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {{msg}} (eta {{eta}})"
        ),
    )
}

/// Scans `tokens` (`[n_contexts, ctx]`, BOS first in each) through the source and the SAE.
pub fn scan_contexts(
    source: &dyn ActivationSource,
    sae: &Sae,
    tokens: &[u32],
    ctx: usize,
    opts: &AnalyzeOptions,
) -> Result<ScanResult> {
    check_widths(source, sae)?;
    if ctx == 0 || !tokens.len().is_multiple_of(ctx) {
        bail!("{} tokens are not whole contexts of {ctx}", tokens.len());
    }
    let mut scanner = Scanner::new(sae.d_sae, ctx, opts.scan.clone())?;
    let n_ctx = tokens.len() / ctx;
    let batch = opts.batch.max(1);
    let pb = bar(tokens.len() as u64, "scanning", opts.progress);
    pb.set_message("tokens");
    for chunk in tokens.chunks(batch * ctx) {
        let b = chunk.len() / ctx;
        let acts = source
            .activations(chunk, b, ctx)
            .context("running the model over the corpus")?;
        if acts.len() != chunk.len() * sae.d_in {
            bail!(
                "the model returned {} activations for {} tokens of width {}",
                acts.len(),
                chunk.len(),
                sae.d_in
            );
        }
        let code = sae.encode(&acts, chunk.len());
        scanner.add_batch(chunk, &code)?;
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    debug_assert_eq!(scanner.n_contexts(), n_ctx as u64);
    Ok(scanner.finish())
}

/// Top/bottom `n` tokens of every decoder row's logit effect.
pub fn logit_effects(
    source: &dyn ActivationSource,
    sae: &Sae,
    n: usize,
    progress: bool,
) -> Result<Vec<LogitEffect>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let pb = bar(sae.d_sae as u64, "logits", progress);
    pb.set_message("latents");
    let d = sae.d_in;
    let out = (0..sae.d_sae)
        .into_par_iter()
        .with_min_len(16)
        .map(|j| {
            let l = source.direction_logits(&sae.w_dec[j * d..(j + 1) * d])?;
            pb.inc(1);
            Ok(logit_effect(&l, n))
        })
        .collect::<Result<Vec<_>>>()
        .context("computing the decoder directions' logit effects")?;
    pb.finish_and_clear();
    Ok(out)
}

/// The whole analysis: scan, logit effects, write `out` atomically.
pub fn analyze(
    source: &dyn ActivationSource,
    sae: &Sae,
    tokens: &[u32],
    ctx: usize,
    opts: &AnalyzeOptions,
    prov: &Provenance,
    out: &Path,
) -> Result<AnalysisMeta> {
    let scan = scan_contexts(source, sae, tokens, ctx, opts)?;
    let logits = logit_effects(source, sae, opts.n_logits, opts.progress)?;
    let vocab = source.vocab();
    let prov = Provenance {
        hook: source.hook().to_string(),
        arch: sae.arch.to_string(),
        d_in: sae.d_in,
        ..prov.clone()
    };
    write_analysis(out, &scan, &logits, &vocab, &prov)
}
