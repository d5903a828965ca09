//! Training-time noise drawn from its coordinates alone, so that a step's noise is the same
//! on any number of threads, in any chunking, and after a resume.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// ChaCha words reserved per row: rows never share a stretch of the key stream. Ziggurat
/// sampling takes two words per attempt and rarely retries, so a row of `d` values uses
/// about `2 d` words, far below this for any dictionary that fits in memory.
const WORDS_PER_ROW: u128 = 1 << 40;

/// Adds `std` times standard normal noise to every value of `row`. The noise of row `row` at
/// step `step` comes from the ChaCha8 stream `step` of `seed`, from the word `row` times
/// [`WORDS_PER_ROW`] on.
pub fn add_gaussian_row(seed: u64, step: u64, row: u64, std: f32, out: &mut [f32]) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step);
    rng.set_word_pos(row as u128 * WORDS_PER_ROW);
    for v in out.iter_mut() {
        let e: f32 = StandardNormal.sample(&mut rng);
        *v += std * e;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(seed: u64, step: u64, row: u64, d: usize) -> Vec<f32> {
        let mut v = vec![0.0; d];
        add_gaussian_row(seed, step, row, 1.0, &mut v);
        v
    }

    /// The same coordinates give the same bits; any other seed, step or row gives others.
    #[test]
    fn noise_depends_on_its_coordinates_only() {
        let a = draw(3, 5, 7, 64);
        assert_eq!(a, draw(3, 5, 7, 64));
        for other in [draw(4, 5, 7, 64), draw(3, 6, 7, 64), draw(3, 5, 8, 64)] {
            assert!(a.iter().zip(&other).all(|(x, y)| x != y));
        }
        // A longer row starts with the shorter one's values.
        assert_eq!(&draw(3, 5, 7, 200)[..64], &a[..]);
        // Scaled and added, not written.
        let mut v = vec![1.0f32; 64];
        add_gaussian_row(3, 5, 7, 0.5, &mut v);
        for (x, e) in v.iter().zip(&a) {
            assert!((x - (1.0 + 0.5 * e)).abs() < 1e-6);
        }
    }

    #[test]
    fn noise_is_standard_normal() {
        let v: Vec<f64> = (0..50)
            .flat_map(|r| draw(1, 1, r, 1000))
            .map(|x| x as f64)
            .collect();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }
}
