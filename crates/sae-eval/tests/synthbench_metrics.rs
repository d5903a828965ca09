//! SynthSAEBench metrics on cases with known answers, and the assignment solver against brute
//! force.

use sae_core::sparse::SparseCode;
use sae_eval::synthbench::*;
use sae_store::synthbench::{SparseActs, SynthBench, SynthBenchConfig};

/// xorshift64*: uniform numbers in [0, 1) for test matrices.
struct Uniform(u64);
impl Uniform {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32) / (1u64 << 24) as f32
    }
}

/// Minimum total cost over all injective row -> column maps, by enumeration.
fn brute_force(cost: &[f32], rows: usize, cols: usize) -> f64 {
    fn go(cost: &[f32], rows: usize, cols: usize, r: usize, used: &mut Vec<bool>) -> f64 {
        if r == rows {
            return 0.0;
        }
        let mut best = f64::INFINITY;
        for c in 0..cols {
            if !used[c] {
                used[c] = true;
                let v = cost[r * cols + c] as f64 + go(cost, rows, cols, r + 1, used);
                used[c] = false;
                best = best.min(v);
            }
        }
        best
    }
    go(cost, rows, cols, 0, &mut vec![false; cols])
}

#[test]
fn assignment_is_optimal_on_small_random_matrices() {
    let mut u = Uniform(0x9e37_79b9_7f4a_7c15);
    for trial in 0..400 {
        let rows = 1 + trial % 5;
        let cols = rows + (trial / 5) % 4;
        // Every third matrix has small integer costs, to exercise ties.
        let cost: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let x = u.next();
                if trial % 3 == 0 {
                    (x * 4.0).floor()
                } else {
                    x
                }
            })
            .collect();
        let a = linear_sum_assignment(&cost, rows, cols).unwrap();
        let mut used = vec![false; cols];
        for &c in &a {
            assert!(!used[c], "trial {trial}: column {c} used twice");
            used[c] = true;
        }
        let got: f64 = a
            .iter()
            .enumerate()
            .map(|(r, &c)| cost[r * cols + c] as f64)
            .sum();
        let want = brute_force(&cost, rows, cols);
        assert!(
            (got - want).abs() < 1e-5,
            "trial {trial} ({rows}x{cols}): {got} vs optimum {want}"
        );
    }
}

#[test]
fn assignment_refuses_bad_shapes_and_values() {
    assert!(linear_sum_assignment(&[0.0; 6], 3, 2).is_err());
    assert!(linear_sum_assignment(&[0.0; 5], 2, 3).is_err());
    assert!(linear_sum_assignment(&[0.0, f32::NAN], 1, 2).is_err());
}

fn small_bench(seed: u64) -> SynthBench {
    SynthBench::new(SynthBenchConfig {
        seed,
        ..SynthBenchConfig::synthsaebench_small()
    })
    .unwrap()
}

/// Rows of `x` with their true activations; the SAE under test uses the features in `latents`
/// (latent k = feature latents[k]) with the true values as codes and the true bias as b_dec.
fn evaluate_oracle(b: &SynthBench, latents: &[usize], rows: usize) -> SynthMetrics {
    let d = b.d_in();
    let w_dec: Vec<f32> = latents
        .iter()
        .flat_map(|&f| b.features[f * d..(f + 1) * d].to_vec())
        .collect();
    let mut ev = SynthEvaluator::new(&w_dec, &b.features, d).unwrap();
    let mut x = vec![0f32; rows * d];
    let mut truth: Vec<SparseActs> = Vec::new();
    b.sample_batch(0, &mut x, Some(&mut truth));
    let mut code = SparseCode {
        n_rows: rows,
        d_sae: latents.len(),
        row_ptr: vec![0],
        idx: Vec::new(),
        val: Vec::new(),
    };
    let mut recon = vec![0f32; rows * d];
    for (r, t) in truth.iter().enumerate() {
        let mut row: Vec<(u32, f32)> = Vec::new();
        for &(f, a) in t {
            if let Some(k) = latents.iter().position(|&l| l == f as usize) {
                row.push((k as u32, a));
            }
        }
        row.sort_by_key(|&(k, _)| k);
        let xr = &mut recon[r * d..(r + 1) * d];
        xr.copy_from_slice(&b.bias);
        for &(k, a) in &row {
            code.idx.push(k);
            code.val.push(a);
            let v = &w_dec[k as usize * d..(k as usize + 1) * d];
            xr.iter_mut().zip(v).for_each(|(x, v)| *x += a * v);
        }
        code.row_ptr.push(code.idx.len());
    }
    ev.add_batch(&x, &recon, &code, &truth);
    ev.finish()
}

#[test]
fn the_true_dictionary_with_true_codes_scores_perfectly() {
    let b = small_bench(3);
    let all: Vec<usize> = (0..b.n_features()).collect();
    let m = evaluate_oracle(&b, &all, 3000);
    assert!((m.mcc - 1.0).abs() < 1e-6, "MCC {}", m.mcc);
    assert_eq!(m.uniqueness, 1.0);
    // Rare features may never fire in 3000 rows; they are dead latents with F1 0.
    let alive = (b.n_features() - m.dead_latents) as f64 / b.n_features() as f64;
    assert!(
        (m.f1 - alive).abs() < 1e-9,
        "F1 {} vs alive share {alive}",
        m.f1
    );
    assert!((m.precision - alive).abs() < 1e-9 && (m.recall - alive).abs() < 1e-9);
    assert!(
        (m.explained_variance - 1.0).abs() < 1e-5,
        "EV {}",
        m.explained_variance
    );
    assert!((m.l0 - m.true_l0).abs() < 1e-12);
    assert!((m.shrinkage - 1.0).abs() < 1e-5);
    assert_eq!(m.accuracy, 1.0);
}

#[test]
fn a_permuted_subset_of_true_features_scores_perfectly() {
    let b = small_bench(4);
    // The 128 most frequent features, in a scrambled order.
    let latents: Vec<usize> = (0..128).map(|k| (k * 37 + 11) % 128).collect();
    let m = evaluate_oracle(&b, &latents, 3000);
    assert!((m.mcc - 1.0).abs() < 1e-6, "MCC {}", m.mcc);
    assert_eq!(m.uniqueness, 1.0);
    assert_eq!(m.dead_latents, 0);
    assert!((m.f1 - 1.0).abs() < 1e-12, "F1 {}", m.f1);
    assert!(
        m.explained_variance < 1.0,
        "the other features' variance is missing"
    );
}

#[test]
fn random_directions_score_at_chance() {
    // 4096 random unit directions against 16384 random unit features in 768 dimensions, as
    // the benchmark's shapes. Chance levels:
    // * uniqueness: 4096 best matches spread uniformly over 16384 features leave
    //   16384 (1 - (1 - 1/16384)^4096) / 4096 = 4 (1 - e^-0.25) = 0.8848 distinct;
    // * MCC: each |cos| is about |N(0, 1/768)|; the best of 16384 is the maximum of about
    //   32768 N(0,1) draws (both signs), E = sqrt(2 ln n) - (ln ln n + ln 4 pi - 2 gamma) /
    //   (2 sqrt(2 ln n)) = 4.15, over sqrt(768): 0.150. With 4x more features than latents
    //   the one-to-one assignment gives up almost nothing: expect 0.14-0.16.
    let cfg = |seed| SynthBenchConfig {
        seed,
        ortho_steps: 0,
        ..SynthBenchConfig::synthsaebench_16k()
    };
    let truth = SynthBench::new(cfg(1)).unwrap();
    let random = SynthBench::new(cfg(2)).unwrap();
    let d = 768;
    let s = dictionary_scores(&random.features[..4096 * d], &truth.features, d).unwrap();
    assert!(
        (s.uniqueness - 0.8848).abs() < 0.015,
        "uniqueness {}",
        s.uniqueness
    );
    assert!(s.mcc > 0.14 && s.mcc < 0.16, "MCC {}", s.mcc);
    // The assignment can do no better than each latent's best match.
    let cos = abs_cosines(&random.features[..4096 * d], &truth.features, d);
    let row_max: f64 = cos
        .chunks(16384)
        .map(|r| r.iter().cloned().fold(0f32, f32::max) as f64)
        .sum::<f64>()
        / 4096.0;
    assert!(
        s.mcc <= row_max + 1e-9 && s.mcc > row_max - 0.01,
        "MCC {} vs row max {row_max}",
        s.mcc
    );
    eprintln!(
        "random: MCC {} uniqueness {} row max {row_max}",
        s.mcc, s.uniqueness
    );
}

#[test]
fn explained_variance_and_shrinkage_have_their_known_values() {
    let b = small_bench(5);
    let d = b.d_in();
    let rows = 500;
    let mut x = vec![0f32; rows * d];
    let mut truth = Vec::new();
    b.sample_batch(0, &mut x, Some(&mut truth));
    let mut ev = SynthEvaluator::new(&b.features[..8 * d], &b.features, d).unwrap();
    let mean: Vec<f32> = (0..d)
        .map(|k| (0..rows).map(|r| x[r * d + k] as f64).sum::<f64>() as f32 / rows as f32)
        .collect();
    // Reconstructing every row as the mean explains nothing.
    let recon: Vec<f32> = (0..rows).flat_map(|_| mean.clone()).collect();
    let empty = SparseCode {
        n_rows: rows,
        d_sae: 8,
        row_ptr: vec![0; rows + 1],
        idx: Vec::new(),
        val: Vec::new(),
    };
    ev.add_batch(&x, &recon, &empty, &truth);
    let m = ev.finish();
    assert!(
        m.explained_variance.abs() < 1e-5,
        "EV {}",
        m.explained_variance
    );
    assert_eq!(m.dead_latents, 8);
    assert_eq!(m.f1, 0.0);
    assert_eq!(m.l0, 0.0);
    // Half-scale reconstructions: shrinkage 0.5, EV = 1 - 0.25 E|x|^2 / Var.
    let mut ev = SynthEvaluator::new(&b.features[..8 * d], &b.features, d).unwrap();
    let half: Vec<f32> = x.iter().map(|v| v * 0.5).collect();
    ev.add_batch(&x, &half, &empty, &truth);
    let m = ev.finish();
    assert!((m.shrinkage - 0.5).abs() < 1e-6);
    let ex2: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / rows as f64;
    let mean2: f64 = mean.iter().map(|&v| (v as f64).powi(2)).sum();
    let want = 1.0 - 0.25 * ex2 / (ex2 - mean2);
    assert!(
        (m.explained_variance - want).abs() < 1e-4,
        "EV {} vs {want}",
        m.explained_variance
    );
}

#[test]
fn more_latents_than_features_match_each_feature_once() {
    let b = small_bench(6);
    let d = b.d_in();
    let truth = &b.features[..64 * d];
    // Every feature twice: 64 matched pairs with |cos| 1, half the latents share a best match.
    let doubled: Vec<f32> = truth.iter().chain(truth.iter()).copied().collect();
    let s = dictionary_scores(&doubled, truth, d).unwrap();
    assert!((s.mcc - 1.0).abs() < 1e-6, "MCC {}", s.mcc);
    assert!(
        (s.uniqueness - 0.5).abs() < 1e-12,
        "uniqueness {}",
        s.uniqueness
    );
}
