//! Steering a penalty family's sparsity coefficient toward a target L0 (`--target-l0`).
//!
//! The rule is the coefficient autotuner of SynthSAEBench's experiments
//! (decoderesearch/synth-sae-bench-experiments, `coefficient_autotuner.py`), which is how
//! its Standard L1 and JumpReLU rows reach L0 20 and 25 without a coefficient sweep. Every
//! step it smooths the batch L0 (`ema <- 0.99 ema + 0.01 L0`) and that average's change
//! (`trend <- 0.95 trend + 0.05 d(ema)`); once adjusting has started it multiplies the
//! coefficient by `1 +- rate * gain * tanh(10 |ema - target| / target)`, up when the L0 is
//! above the target, with `gain` 0.01 while the L0 already moves toward the target and 1
//! otherwise. The multiplier stays in [`MIN_MULTIPLIER`, `MAX_MULTIPLIER`].
//!
//! Three choices differ from that code, all because our runs are far shorter than its
//! 195,312 steps:
//! * the rate (3e-4 there) defaults to `8 / steps adjusted` within [3e-4, 1e-2], so that
//!   the multiplier can move by e^8 over the run;
//! * the small gain applies only while the L0 moves toward the target fast enough to reach
//!   it within [`HORIZON`] steps at its current pace. With the original rule any movement
//!   toward the target slows the controller a hundredfold, and an L0 that answers the
//!   coefficient at once then crawls (on the toy response of the tests: a multiplier of
//!   1.09 after 4,000 steps where 16 was needed);
//! * the multiplier's range is [1e-3, 1e3] instead of [0.01, 100], because our default
//!   coefficients are not tuned to every dataset.
//!
//! Adjusting starts when the sparsity warm-up ends (the experiments start Standard L1's at
//! the end of its warm-up; JumpReLU's has none there).

use serde::{Deserialize, Serialize};

pub const MIN_MULTIPLIER: f64 = 1e-3;
pub const MAX_MULTIPLIER: f64 = 1e3;
const EMA_DECAY: f64 = 0.99;
const TREND_DECAY: f64 = 0.95;
const GAIN_TOWARD: f64 = 0.01;
/// Steps within which an L0 moving toward the target must reach it to count as on its way.
pub const HORIZON: f64 = 500.0;

/// The default largest relative change per step for a run adjusting over `steps` steps.
pub fn default_rate(steps: u64) -> f64 {
    (8.0 / steps.max(1) as f64).clamp(3e-4, 1e-2)
}

/// The controller's whole state; it travels in checkpoints, so a resumed run steers exactly
/// as an uninterrupted one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct L0Target {
    pub target: f64,
    /// Largest relative change of the multiplier per step.
    pub rate: f64,
    /// First step (0-based) that adjusts the multiplier.
    pub start: u64,
    /// Smoothed batch L0; none before the first step.
    pub ema: Option<f64>,
    pub trend: f64,
    /// Factor on the scheduled sparsity coefficient.
    pub multiplier: f64,
}

impl L0Target {
    pub fn new(target: f64, rate: f64, start: u64) -> Self {
        L0Target {
            target,
            rate,
            start,
            ema: None,
            trend: 0.0,
            multiplier: 1.0,
        }
    }

    /// The coefficient for a step whose schedule gives `scheduled`.
    pub fn coefficient(&self, scheduled: f32) -> f32 {
        (scheduled as f64 * self.multiplier) as f32
    }

    /// Takes the batch L0 of step `step` (0-based).
    pub fn observe(&mut self, step: u64, l0: f64) {
        let ema = match self.ema {
            None => l0,
            Some(prev) => {
                let next = EMA_DECAY * prev + (1.0 - EMA_DECAY) * l0;
                self.trend = TREND_DECAY * self.trend + (1.0 - TREND_DECAY) * (next - prev);
                next
            }
        };
        self.ema = Some(ema);
        if step < self.start {
            return;
        }
        let err = ema - self.target;
        let on_its_way = err * self.trend < 0.0 && err.abs() < HORIZON * self.trend.abs();
        let gain = if on_its_way { GAIN_TOWARD } else { 1.0 };
        let adj = self.rate * gain * (10.0 * err.abs() / self.target).tanh();
        self.multiplier *= if err > 0.0 { 1.0 + adj } else { 1.0 - adj };
        self.multiplier = self.multiplier.clamp(MIN_MULTIPLIER, MAX_MULTIPLIER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy response: L0 falls as the coefficient grows (L0 = 400 / coefficient).
    fn settle(target: f64, steps: u64) -> (L0Target, f64) {
        let mut t = L0Target::new(target, default_rate(steps), 0);
        let mut l0 = 0.0;
        for step in 0..steps {
            l0 = 400.0 / t.coefficient(1.0) as f64;
            t.observe(step, l0);
        }
        (t, l0)
    }

    #[test]
    fn reaches_the_target_from_either_side() {
        // L0 400 at multiplier 1: the coefficient must grow 16-fold for L0 25.
        let (t, l0) = settle(25.0, 4000);
        assert!(
            (l0 - 25.0).abs() < 1.5,
            "L0 {l0}, multiplier {}",
            t.multiplier
        );
        // L0 400 at multiplier 1, target 800: the coefficient must halve.
        let (t, l0) = settle(800.0, 4000);
        assert!(
            (l0 - 800.0).abs() < 40.0,
            "L0 {l0}, multiplier {}",
            t.multiplier
        );
    }

    #[test]
    fn waits_for_its_start_but_keeps_averaging() {
        let mut t = L0Target::new(10.0, 1e-2, 5);
        for step in 0..5 {
            t.observe(step, 100.0 + step as f64);
        }
        assert_eq!(t.multiplier, 1.0);
        assert!(t.trend > 0.0);
        t.observe(5, 105.0);
        assert!(t.multiplier > 1.0);
    }

    #[test]
    fn stays_in_range_and_the_default_rate_is_bounded() {
        let mut t = L0Target::new(1.0, 1e-2, 0);
        for step in 0..100_000 {
            t.observe(step, 1e6);
        }
        assert_eq!(t.multiplier, MAX_MULTIPLIER);
        assert_eq!(default_rate(195_312 - 65_104), 3e-4);
        assert_eq!(default_rate(10), 1e-2);
        assert!((default_rate(2000) - 4e-3).abs() < 1e-12);
    }
}
