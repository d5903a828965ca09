//! Pure metric functions: LM-loss aggregates and latent firing statistics.
//!
//! Reconstruction sums (L0, MSE, FVU, gamma, firing counts) live in
//! `sae_core::metrics::ReconMetrics`; this module adds what needs the language model's loss
//! and what is derived from firing counts.

use serde::{Deserialize, Serialize};

/// A latent is "dense" when it fires on more than this fraction of tokens (10%).
pub const DENSE_FRACTION: f64 = 0.1;

/// Lower edge of the firing-frequency histogram, in log10 (frequency 1e-7).
pub const HIST_LOG10_MIN: f64 = -7.0;
/// Width of one histogram bin in log10 units.
pub const HIST_BIN_WIDTH: f64 = 0.25;

/// Running sum of next-token cross-entropies (in nats), in f64.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CeSum {
    pub sum: f64,
    pub n: u64,
}

impl CeSum {
    /// Add the losses of `batch` contexts, `[batch * (ctx - 1)]` as `per_token_loss` returns
    /// them, leaving out the prediction made at position 0 (the BOS position): its loss is the
    /// same in every condition, because nothing is spliced at BOS.
    pub fn add_contexts(&mut self, losses: &[f32], ctx: usize) {
        let per = ctx - 1;
        for row in losses.chunks(per.max(1)) {
            for &l in row.iter().skip(1) {
                self.sum += l as f64;
                self.n += 1;
            }
        }
    }

    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.sum / self.n as f64
        }
    }
}

/// Delta LM loss: CE with the SAE spliced in minus the clean CE (0 is perfect).
pub fn delta_lm_loss(ce_sae: f64, ce_clean: f64) -> f64 {
    ce_sae - ce_clean
}

/// Fraction of loss recovered relative to zero ablation:
/// (CE_zero - CE_sae) / (CE_zero - CE_clean). 1 is perfect, 0 is no better than zeroing.
pub fn loss_recovered(ce_zero: f64, ce_sae: f64, ce_clean: f64) -> f64 {
    (ce_zero - ce_sae) / (ce_zero - ce_clean)
}

/// Per-latent firing frequencies (fires / tokens).
pub fn firing_frequencies(fire_counts: &[u64], n_tokens: u64) -> Vec<f64> {
    let n = n_tokens.max(1) as f64;
    fire_counts.iter().map(|&c| c as f64 / n).collect()
}

/// Dead (never fired) and dense (fires on more than `dense_fraction` of tokens) latents,
/// plus a log10 histogram of the frequencies of the latents that fired.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FiringStats {
    pub n_latents: usize,
    pub n_tokens: u64,
    pub dead: usize,
    pub dense: usize,
    pub dense_fraction: f64,
    pub hist: LogHistogram,
}

impl FiringStats {
    pub fn from_counts(fire_counts: &[u64], n_tokens: u64, dense_fraction: f64) -> Self {
        let freqs = firing_frequencies(fire_counts, n_tokens);
        let dead = fire_counts.iter().filter(|&&c| c == 0).count();
        let dense = freqs.iter().filter(|&&f| f > dense_fraction).count();
        let alive: Vec<f64> = freqs.iter().copied().filter(|&f| f > 0.0).collect();
        FiringStats {
            n_latents: fire_counts.len(),
            n_tokens,
            dead,
            dense,
            dense_fraction,
            hist: LogHistogram::of_log10(&alive, HIST_LOG10_MIN, HIST_BIN_WIDTH),
        }
    }
}

/// Histogram of log10(value) over fixed bins `[lo + i*width, lo + (i+1)*width)` up to 0
/// (frequency 1). Values below `lo` go in the first bin, 1 itself in the last.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogHistogram {
    pub log10_lo: f64,
    pub bin_width: f64,
    pub counts: Vec<u64>,
}

impl LogHistogram {
    /// `values` must be positive and at most 1.
    pub fn of_log10(values: &[f64], lo: f64, width: f64) -> Self {
        let n_bins = ((-lo) / width).round().max(1.0) as usize;
        let mut counts = vec![0u64; n_bins];
        for &v in values {
            let b = ((v.log10() - lo) / width).floor();
            let b = (b.max(0.0) as usize).min(n_bins - 1);
            counts[b] += 1;
        }
        LogHistogram {
            log10_lo: lo,
            bin_width: width,
            counts,
        }
    }

    /// (lower edge, upper edge) of bin `i` in log10 units.
    pub fn edges(&self, i: usize) -> (f64, f64) {
        let a = self.log10_lo + i as f64 * self.bin_width;
        (a, a + self.bin_width)
    }
}

/// Linear interpolation of `y` at `x` on a curve given as points, after sorting by x.
/// `None` outside the range of the curve (no extrapolation).
pub fn interpolate(points: &[(f64, f64)], x: f64) -> Option<f64> {
    let mut pts: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(a, b)| a.is_finite() && b.is_finite())
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    if pts.is_empty() || x < pts[0].0 || x > pts[pts.len() - 1].0 {
        return None;
    }
    for w in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x >= x0 && x <= x1 {
            if x1 == x0 {
                return Some(y0.min(y1));
            }
            return Some(y0 + (y1 - y0) * (x - x0) / (x1 - x0));
        }
    }
    Some(pts[0].1)
}
