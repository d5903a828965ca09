//! A linear activation histogram over `[0, hi)` whose range grows by doubling.
//!
//! The range is not known before the scan, so `hi` starts at the first power of two above
//! the first value and doubles (merging neighbouring bins, which is exact) whenever a larger
//! value arrives. At the end `hi < 2 * max`, so at least half of the bins are in use.

#[derive(Clone, Debug, PartialEq)]
pub struct GrowingHist {
    /// Upper edge of the last bin; 0 while empty.
    pub hi: f32,
    pub bins: Vec<u32>,
}

impl GrowingHist {
    /// `n_bins` must be even (it is halved when the range doubles).
    pub fn new(n_bins: usize) -> Self {
        assert!(
            n_bins >= 2 && n_bins.is_multiple_of(2),
            "histogram needs an even bin count"
        );
        Self {
            hi: 0.0,
            bins: vec![0; n_bins],
        }
    }

    /// Counts one positive finite value.
    pub fn add(&mut self, v: f32) {
        debug_assert!(v > 0.0 && v.is_finite());
        if self.hi == 0.0 {
            self.hi = pow2_above(v);
        }
        while v >= self.hi {
            self.double();
        }
        let n = self.bins.len();
        let b = ((v / self.hi) * n as f32) as usize;
        self.bins[b.min(n - 1)] += 1;
    }

    fn double(&mut self) {
        let n = self.bins.len();
        for i in 0..n / 2 {
            self.bins[i] = self.bins[2 * i] + self.bins[2 * i + 1];
        }
        self.bins[n / 2..].iter_mut().for_each(|b| *b = 0);
        self.hi *= 2.0;
    }

    pub fn total(&self) -> u64 {
        self.bins.iter().map(|&b| b as u64).sum()
    }
}

/// Smallest power of two strictly above `v` (v > 0).
fn pow2_above(v: f32) -> f32 {
    let mut p = 2f32.powi(v.log2().floor() as i32);
    while p <= v {
        p *= 2.0;
    }
    while p / 2.0 > v {
        p /= 2.0;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_above_is_strict() {
        assert_eq!(pow2_above(1.0), 2.0);
        assert_eq!(pow2_above(0.75), 1.0);
        assert_eq!(pow2_above(3.0), 4.0);
        assert_eq!(pow2_above(1e-3), 1.0 / 512.0);
    }

    /// After growth the bins equal a histogram built directly with the final range.
    #[test]
    fn growing_matches_direct_binning() {
        let values: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.013 + 0.001)
            .collect();
        let mut h = GrowingHist::new(16);
        // Small values first, so the range has to double several times.
        let mut sorted = values.clone();
        sorted.sort_by(f32::total_cmp);
        for &v in &sorted {
            h.add(v);
        }
        let max = *sorted.last().unwrap();
        assert!(
            h.hi > max && h.hi <= 2.0 * max * 1.0001,
            "hi {} max {max}",
            h.hi
        );
        let mut direct = vec![0u32; 16];
        for &v in &values {
            direct[((v / h.hi * 16.0) as usize).min(15)] += 1;
        }
        assert_eq!(h.bins, direct);
        assert_eq!(h.total(), values.len() as u64);
    }
}
