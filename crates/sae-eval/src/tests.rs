//! Metric code against hand-computed small cases.

use crate::eval::sae_reconstruct;
use crate::metrics::*;
use crate::splice::splice_non_bos;
use sae_core::metrics::ReconMetrics;
use sae_core::{ArchKind, Sae};

#[test]
fn ce_sum_leaves_out_the_bos_prediction() {
    // Two contexts of ctx 4: 3 predictions each; the first of each is dropped.
    let losses = [9.0, 1.0, 2.0, 9.0, 3.0, 6.0];
    let mut ce = CeSum::default();
    ce.add_contexts(&losses, 4);
    assert_eq!(ce.n, 4);
    assert_eq!(ce.mean(), 3.0);
    assert!(CeSum::default().mean().is_nan());
}

#[test]
fn loss_deltas_by_hand() {
    assert!((delta_lm_loss(2.5, 2.25) - 0.25).abs() < 1e-15);
    // zero 6, clean 2, sae 3: (6 - 3) / (6 - 2) = 0.75.
    assert_eq!(loss_recovered(6.0, 3.0, 2.0), 0.75);
    assert_eq!(loss_recovered(6.0, 2.0, 2.0), 1.0);
    assert_eq!(loss_recovered(6.0, 6.0, 2.0), 0.0);
    // Worse than zero ablation is negative.
    assert_eq!(loss_recovered(6.0, 8.0, 2.0), -0.5);
}

#[test]
fn firing_stats_by_hand() {
    let counts = [0, 5, 50, 100, 10, 11];
    let s = FiringStats::from_counts(&counts, 100, 0.1);
    assert_eq!(s.n_latents, 6);
    assert_eq!(s.dead, 1);
    // 0.5, 1.0 and 0.11 are above 10%; exactly 10% is not dense.
    assert_eq!(s.dense, 3);
    let h = &s.hist;
    assert_eq!(h.counts.len(), 28);
    assert_eq!(h.counts.iter().sum::<u64>(), 5);
    // log10(0.05) = -1.301 -> bin floor((7 - 1.301) / 0.25) = 22.
    assert_eq!(h.counts[22], 1);
    // 0.1 and 0.11: log10 -1 and -0.959 -> bin 24.
    assert_eq!(h.counts[24], 2);
    // 0.5 -> -0.301 -> bin 26; 1.0 -> the last bin.
    assert_eq!(h.counts[26], 1);
    assert_eq!(h.counts[27], 1);
    assert_eq!(h.edges(22), (-1.5, -1.25));
}

#[test]
fn histogram_clamps_tiny_frequencies_into_the_first_bin() {
    let h = LogHistogram::of_log10(&[1e-9, 1e-7], -7.0, 0.5);
    assert_eq!(h.counts.len(), 14);
    assert_eq!(h.counts[0], 2);
}

#[test]
fn interpolation_by_hand() {
    let pts = [(3.0, 30.0), (1.0, 10.0), (2.0, 40.0)];
    assert_eq!(interpolate(&pts, 1.5), Some(25.0));
    assert_eq!(interpolate(&pts, 2.5), Some(35.0));
    assert_eq!(interpolate(&pts, 3.0), Some(30.0));
    assert_eq!(interpolate(&pts, 0.5), None);
    assert_eq!(interpolate(&pts, 3.5), None);
}

/// A ReLU SAE with d_sae = d_in, W_enc = I, W_dec = c I and no biases: x_hat = c x for x >= 0.
fn scaled_identity_sae(d: usize, c: f32) -> Sae {
    let mut sae = Sae::init(ArchKind::RELU, d, d, 0, 0);
    sae.w_enc = vec![0.0; d * d];
    sae.w_dec = vec![0.0; d * d];
    for i in 0..d {
        sae.w_enc[i * d + i] = 1.0;
        sae.w_dec[i * d + i] = c;
    }
    sae
}

#[test]
fn gamma_of_a_scaled_reconstruction_is_the_scale() {
    let d = 3;
    let x: Vec<f32> = vec![
        1.0, 2.0, 0.5, 3.0, 0.25, 4.0, 0.0, 1.5, 2.5, 7.0, 0.125, 0.75,
    ];
    let n = x.len() / d;
    for c in [0.5f32, 0.8, 1.25] {
        let sae = scaled_identity_sae(d, c);
        let mut m = ReconMetrics::new(d, d);
        let x_hat = sae_reconstruct(&sae, &mut m, &x, n).unwrap();
        for (a, b) in x_hat.iter().zip(&x) {
            assert_eq!(*a, c * b);
        }
        assert!(
            (m.gamma() - c as f64).abs() < 1e-7,
            "c {c}: gamma {}",
            m.gamma()
        );
    }
    // A power-of-two scale is exact in floating point: gamma is exactly c.
    let mut m = ReconMetrics::new(d, d);
    sae_reconstruct(&scaled_identity_sae(d, 0.5), &mut m, &x, n).unwrap();
    assert_eq!(m.gamma(), 0.5);
}

#[test]
fn recon_metrics_by_hand() {
    // d = 2, rows x = (2, 0), (0, 4); x_hat = x / 2 (c = 0.5).
    let x = [2.0f32, 0.0, 0.0, 4.0];
    let sae = scaled_identity_sae(2, 0.5);
    let mut m = ReconMetrics::new(2, 2);
    sae_reconstruct(&sae, &mut m, &x, 2).unwrap();
    // Errors: (1, 0) and (0, 2): squared 1 and 4, mean 2.5.
    assert_eq!(m.mse(), 2.5);
    // Mean (1, 2); variances: dim0 (1 + 1) / 2 = 1, dim1 (4 + 4) / 2 = 4: total 5.
    assert_eq!(m.fvu(), 0.5);
    // Each row has one active latent.
    assert_eq!(m.l0(), 1.0);
    assert_eq!(m.fire_counts(), &[1, 1]);
    let stats = FiringStats::from_counts(m.fire_counts(), m.n_tokens, DENSE_FRACTION);
    assert_eq!((stats.dead, stats.dense), (0, 2));
}

#[test]
fn splice_keeps_bos_rows_and_replaces_the_rest_in_order() {
    // batch 2, ctx 3, width 2: rows 0 and 3 are BOS.
    let mut acts: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let mut seen = Vec::new();
    let mut f = |x: &[f32], n: usize| -> anyhow::Result<Vec<f32>> {
        seen = x.to_vec();
        assert_eq!(n, 4);
        Ok(x.iter().map(|v| -v).collect())
    };
    splice_non_bos(&mut acts, 3, 2, &mut f).unwrap();
    assert_eq!(seen, vec![2.0, 3.0, 4.0, 5.0, 8.0, 9.0, 10.0, 11.0]);
    assert_eq!(
        acts,
        vec![0.0, 1.0, -2.0, -3.0, -4.0, -5.0, 6.0, 7.0, -8.0, -9.0, -10.0, -11.0]
    );
    // A reconstruction of the wrong size is an error, not a panic.
    let mut bad = |x: &[f32], _n: usize| -> anyhow::Result<Vec<f32>> { Ok(x[1..].to_vec()) };
    assert!(splice_non_bos(&mut acts, 3, 2, &mut bad).is_err());
}

#[test]
fn non_finite_reconstruction_is_an_error() {
    let mut sae = scaled_identity_sae(2, 1.0);
    sae.w_dec[0] = f32::NAN;
    let mut m = ReconMetrics::new(2, 2);
    let e = sae_reconstruct(&sae, &mut m, &[1.0, 1.0], 1).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
}

#[test]
fn plots_are_written_as_png() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("curves.png");
    let series = vec![
        (
            "gated".to_string(),
            vec![(10.0, 0.2), (30.0, 0.1), (80.0, 0.05)],
        ),
        ("relu".to_string(), vec![(20.0, 0.25), (60.0, 0.12)]),
    ];
    crate::plot::curves_log_x(
        &p,
        "L0 vs delta LM loss",
        "L0",
        "delta LM loss",
        &series,
        None,
    )
    .unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    let h = LogHistogram::of_log10(&[0.001, 0.01, 0.02, 0.3], -7.0, 0.25);
    let p2 = dir.path().join("hist.png");
    crate::plot::firing_histogram(&p2, "firing", &h, 3).unwrap();
    assert_eq!(&std::fs::read(&p2).unwrap()[1..4], b"PNG");
}

#[test]
fn fvu_at_l0_interpolates_in_log_l0() {
    let curve = [(100.0, 0.1), (10.0, 0.3)];
    // sqrt(10 * 100) is half-way in log L0.
    let f = crate::sweep::fvu_at_l0(&curve, 1000f64.sqrt()).unwrap();
    assert!((f - 0.2).abs() < 1e-12, "{f}");
    assert_eq!(crate::sweep::fvu_at_l0(&curve, 10.0), Some(0.3));
    assert_eq!(crate::sweep::fvu_at_l0(&curve, 5.0), None);
    assert_eq!(crate::sweep::fvu_at_l0(&curve, 200.0), None);
    assert_eq!(crate::sweep::fvu_at_l0(&curve, 0.0), None);
}
