//! Data-dependent initialisation: the input scale and b_dec.

/// The constant `s` with `E||s x||^2 = d_in` over the sample (`[n, d]`), in f64.
pub fn normalisation_scale(sample: &[f32], d: usize) -> f32 {
    let n = sample.len() / d;
    let msq: f64 = sample.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n.max(1) as f64;
    if msq > 0.0 {
        (d as f64 / msq).sqrt() as f32
    } else {
        1.0
    }
}

pub fn mean(sample: &[f32], d: usize) -> Vec<f32> {
    let n = sample.len() / d;
    let mut m = vec![0.0f64; d];
    for row in sample.chunks(d) {
        for (a, &v) in m.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    m.iter().map(|&v| (v / n.max(1) as f64) as f32).collect()
}

/// Geometric median (the point minimising the sum of Euclidean distances) by Weiszfeld's
/// iteration, started at the mean; stops when a step moves less than 1e-6 of the scale.
pub fn geometric_median(sample: &[f32], d: usize, max_iter: usize) -> Vec<f32> {
    let mut y: Vec<f64> = mean(sample, d).iter().map(|&v| v as f64).collect();
    let scale: f64 = {
        let n = (sample.len() / d).max(1) as f64;
        (sample.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n)
            .sqrt()
            .max(1e-30)
    };
    for _ in 0..max_iter {
        let mut num = vec![0.0f64; d];
        let mut den = 0.0f64;
        for row in sample.chunks(d) {
            let dist = row
                .iter()
                .zip(&y)
                .map(|(&a, b)| (a as f64 - b).powi(2))
                .sum::<f64>()
                .sqrt();
            // Points on the current estimate are skipped (the usual Weiszfeld guard).
            if dist < 1e-12 * scale {
                continue;
            }
            let w = 1.0 / dist;
            for (a, &v) in num.iter_mut().zip(row) {
                *a += w * v as f64;
            }
            den += w;
        }
        if den == 0.0 {
            break;
        }
        let next: Vec<f64> = num.iter().map(|v| v / den).collect();
        let moved = next
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        y = next;
        if moved < 1e-6 * scale {
            break;
        }
    }
    y.iter().map(|&v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_gives_unit_mean_square_per_dim() {
        let x = [3.0f32, 0.0, 0.0, 4.0]; // ||x||^2 = 9 and 16, mean 12.5, d = 2
        let s = normalisation_scale(&x, 2);
        assert!((s as f64 - (2.0f64 / 12.5).sqrt()).abs() < 1e-7);
    }

    #[test]
    fn geometric_median_resists_outliers() {
        // Four points around (1, 1) and one far outlier: the mean moves far, the median stays
        // among the four (the outlier pulls it by less than the cluster's radius).
        let x = [0.0f32, 1.0, 2.0, 1.0, 1.0, 0.0, 1.0, 2.0, 1000.0, 1000.0];
        let m = mean(&x, 2);
        assert!(m[0] > 100.0);
        let g = geometric_median(&x, 2, 500);
        assert!(
            (g[0] - 1.0).abs() < 0.5 && (g[1] - 1.0).abs() < 0.5,
            "{g:?}"
        );
        // Collinear symmetric points: the median is the middle one.
        let y = [0.0f32, 0.0, 1.0, 0.0, 5.0, 0.0];
        let g = geometric_median(&y, 2, 500);
        assert!((g[0] - 1.0).abs() < 1e-3, "{g:?}");
    }
}
