#![allow(clippy::needless_range_loop)]
//! Statistics of the SynthSAEBench generator against the reference's formulas and the values
//! derived from them (docs: shared reference, sections 2.1-2.7).

use sae_store::synthbench::*;

/// The 16k preset without the orthogonalisation, which only moves directions and is tested
/// on its own below; everything sampling depends on is built as in the preset.
fn bench16k_fast() -> SynthBench {
    SynthBench::new(SynthBenchConfig {
        ortho_steps: 0,
        ..SynthBenchConfig::synthsaebench_16k()
    })
    .unwrap()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-12)
}

#[test]
fn zipf_and_compensated_probabilities_match_the_formulas() {
    let b = bench16k_fast();
    let p = &b.p_base;
    for (i, want) in [
        (0, 0.4),
        (1, 0.28207),
        (127, 0.032944),
        (4095, 0.0036457),
        (16383, 5e-4),
    ] {
        assert!(
            close(p[i] as f64, want, 2e-4),
            "p[{i}] = {} not {want}",
            p[i]
        );
    }
    let sum: f64 = p.iter().map(|&x| x as f64).sum();
    let sum4096: f64 = p[..4096].iter().map(|&x| x as f64).sum();
    assert!((sum - 59.14).abs() < 0.01, "sum p = {sum}");
    assert!((sum4096 - 40.12).abs() < 0.01, "sum p[..4096] = {sum4096}");

    // Compensation from the formula, independently of the library's block arithmetic.
    for i in 128..10880 {
        let par = b.parent[i] as usize;
        let kids = b.children(par);
        assert!(kids.contains(&i));
        let sib: f64 = kids.map(|j| p[j] as f64).sum();
        let pp = p[par] as f64;
        let c = (1.0 / pp) * (1.0 + (sib - p[i] as f64) / pp);
        let want = (p[i] as f64 * c).min(1.0);
        assert!(close(b.p_fire[i] as f64, want, 1e-6), "p~[{i}]");
    }
    for i in (0..128).chain(10880..16384) {
        assert_eq!(
            b.p_fire[i], p[i],
            "feature {i} is not a child: no compensation"
        );
    }
    let max = b.p_fire.iter().cloned().fold(0f32, f32::max);
    assert!((max - 0.9151).abs() < 5e-5, "max p~ = {max}");
    assert!(b.p_fire.iter().all(|&x| x < 1.0), "no feature is clamped");
    let range = |r: std::ops::Range<usize>| {
        let v = &b.p_fire[r];
        let lo = v.iter().cloned().fold(1f32, f32::min);
        let hi = v.iter().cloned().fold(0f32, f32::max);
        (lo, hi)
    };
    // Depth ranges quoted to two digits in the reference.
    for (r, lo, hi) in [
        (0..128, 0.033, 0.4),
        (128..640, 0.10, 0.89),
        (640..2688, 0.83, 0.92),
        (2688..10880, 0.41, 0.83),
    ] {
        let (a, z) = range(r.clone());
        assert!(
            (a as f64 - lo).abs() < 0.006 && (z as f64 - hi).abs() < 0.006,
            "{r:?}: {a}..{z}"
        );
    }
    // Mean magnitudes: torch.linspace(5, 4, N).
    assert_eq!(b.mean_magnitude[0], 5.0);
    assert_eq!(b.mean_magnitude[16383], 4.0);
    assert!(close(
        b.mean_magnitude[8000] as f64,
        5.0 - 8000.0 / 16383.0,
        1e-6
    ));
}

#[test]
fn hierarchy_topology_is_the_reference_index_map() {
    let b = bench16k_fast();
    assert_eq!(b.level_starts, vec![0, 128, 640, 2688, 10880]);
    for r in 0..128 {
        assert_eq!(b.parent[r], NO_PARENT);
        assert_eq!(b.children(r), 128 + 4 * r..132 + 4 * r);
    }
    for k in 128..640 {
        assert_eq!(b.children(k), 640 + 4 * (k - 128)..644 + 4 * (k - 128));
    }
    for k in 640..2688 {
        assert_eq!(b.children(k), 2688 + 4 * (k - 640)..2692 + 4 * (k - 640));
    }
    for k in 128..10880 {
        assert!(b.children(b.parent[k] as usize).contains(&k));
    }
    for k in 2688..16384 {
        assert!(b.children(k).is_empty(), "{k} has no children");
    }
    for k in 10880..16384 {
        assert_eq!(b.parent[k], NO_PARENT, "{k} is outside the hierarchy");
    }
}

#[test]
fn inverse_normal_cdf_matches_known_quantiles() {
    for (p, z) in [
        (0.5, 0.0),
        (0.6, 0.2533471031357997),
        (0.975, 1.959963984540054),
        (0.9995, 3.2905267314919255),
        (0.025, -1.959963984540054),
        (1e-10, -6.361340902404056),
    ] {
        let got = inverse_normal_cdf(p);
        assert!(
            (got - z).abs() < 1e-12 * z.abs().max(1.0),
            "Phi^-1({p}) = {got}, not {z}"
        );
    }
}

/// Rows sampled for the sampling statistics: standard errors of rates scale as 1/sqrt(ROWS).
const ROWS: u64 = 20_000;

#[test]
fn sampling_statistics_of_the_16k_preset() {
    let b = bench16k_fast();
    let n = b.n_features();
    let mut s = b.scratch();
    let mut fired = vec![0u64; n];
    let mut per_depth = [0f64; 5];
    let (mut l0_all, mut l0_4096, mut l0_sq) = (0f64, 0f64, 0f64);
    let mut raw = vec![0f32; n];
    for row in 0..ROWS {
        let mut rng = b.row_rng(row);
        b.fire(&mut rng, &mut s);
        for &f in &s.active {
            fired[f as usize] += 1;
            raw[f as usize] = s.dense[f as usize];
        }
        let before = s.active.clone();
        b.apply_hierarchy(&mut rng, &mut s);
        let on = |f: usize| s.dense[f] > 0.0;
        for &f in &s.active {
            let f = f as usize;
            let p = b.parent[f];
            if p != NO_PARENT {
                let p = p as usize;
                assert!(
                    on(p),
                    "row {row}: child {f} active under inactive parent {p}"
                );
                let want = raw[f] * (s.dense[p] / b.mean_magnitude[p]);
                assert!(
                    (s.dense[f] - want).abs() <= 1e-5 * want,
                    "row {row}: child {f} = {} not raw * a_P / mu_P = {want}",
                    s.dense[f]
                );
            }
            let active_kids = b.children(f).filter(|&c| on(c)).count();
            assert!(
                active_kids <= 1,
                "row {row}: {f} has {active_kids} active children"
            );
            let depth = b
                .level_starts
                .iter()
                .rposition(|&st| st <= f)
                .unwrap()
                .min(4);
            per_depth[depth] += 1.0;
        }
        l0_all += s.active.len() as f64;
        l0_sq += (s.active.len() as f64).powi(2);
        l0_4096 += s.active.iter().filter(|&&f| f < 4096).count() as f64;
        for &f in &before {
            raw[f as usize] = 0.0;
            s.dense[f as usize] = 0.0;
        }
    }
    // Marginal firing before the hierarchy: each count is Binomial(ROWS, p~_i); among 16384
    // features a |z| above 5.5 has probability ~1e-3 in total when the rates are right.
    let mut worst = (0usize, 0f64);
    for i in 0..n {
        let p = b.p_fire[i] as f64;
        let z = (fired[i] as f64 - ROWS as f64 * p) / (ROWS as f64 * p * (1.0 - p)).sqrt();
        if z.abs() > worst.1 {
            worst = (i, z.abs());
        }
    }
    assert!(
        worst.1 < 5.5,
        "feature {} fires off its rate: z = {}",
        worst.0,
        worst.1
    );

    // True L0: the reference derives 34.50 / 25.17 analytically, ignoring the copula
    // correlations (which shift parent-child co-firing) and magnitudes clipped to 0. The
    // standard error over 20k rows is about 0.08 (printed below); the tolerance 0.5 (1.5%)
    // allows for the copula's shift while still catching a wrong compensation or hierarchy
    // rule (e.g. no compensation gives 13.5 overall by the same analytic count).
    let (l0_all, l0_4096) = (l0_all / ROWS as f64, l0_4096 / ROWS as f64);
    assert!((l0_all - 34.50).abs() < 0.5, "true L0 = {l0_all}");
    assert!(
        (l0_4096 - 25.17).abs() < 0.5,
        "true L0 over the first 4096 = {l0_4096}"
    );
    let want_depth = [8.20, 7.32, 7.32, 7.13, 4.52];
    for (d, w) in want_depth.iter().enumerate() {
        let got = per_depth[d] / ROWS as f64;
        assert!((got - w).abs() < 0.25, "depth {d}: {got} vs {w}");
    }
    let stderr = ((l0_sq / ROWS as f64 - l0_all * l0_all) / ROWS as f64).sqrt();
    eprintln!(
        "true L0 {l0_all:.3} +- {stderr:.3} (first 4096: {l0_4096:.3}); per depth {:?}",
        per_depth.map(|x| x / ROWS as f64)
    );
}

#[test]
fn latent_gaussians_have_the_copula_correlation() {
    let b = bench16k_fast();
    let rank = b.cfg.correlation_rank;
    let watched: Vec<usize> = (0..400).collect();
    let f = |i: usize| &b.corr_factor[i * rank..(i + 1) * rank];
    let mut z = vec![0f32; b.n_features()];
    let mut sum = vec![0f64; watched.len()];
    let mut sq = vec![0f64; watched.len()];
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    for i in 0..watched.len() {
        for j in i + 1..watched.len() {
            pairs.push((i, j));
        }
    }
    let mut cross = vec![0f64; pairs.len()];
    for row in 0..ROWS {
        let mut rng = b.row_rng(row);
        b.latent_gaussians(&mut rng, &mut z);
        for (k, &i) in watched.iter().enumerate() {
            sum[k] += z[i] as f64;
            sq[k] += (z[i] as f64).powi(2);
        }
        for (k, &(i, j)) in pairs.iter().enumerate() {
            cross[k] += z[watched[i]] as f64 * z[watched[j]] as f64;
        }
    }
    let r = ROWS as f64;
    for k in 0..watched.len() {
        assert!((sum[k] / r).abs() < 5.0 / r.sqrt(), "mean of z_{k}");
        assert!(
            (sq[k] / r - 1.0).abs() < 5.0 * (2.0 / r).sqrt(),
            "variance of z_{k}"
        );
    }
    // Each empirical correlation has standard error about 1/sqrt(ROWS) = 0.007, against
    // off-diagonal targets with std 0.05: check every pair within 5.5 standard errors and the
    // pairs' agreement as a whole.
    let (mut se, mut st) = (0f64, 0f64);
    for (k, &(i, j)) in pairs.iter().enumerate() {
        let want: f64 = f(i).iter().zip(f(j)).map(|(a, b)| (a * b) as f64).sum();
        let got = cross[k] / r;
        assert!(
            (got - want).abs() < 5.5 / r.sqrt(),
            "corr({i},{j}) = {got} vs F_i.F_j = {want}"
        );
        se += (got - want).powi(2);
        st += want.powi(2);
    }
    assert!(
        se / st < 0.1,
        "F_i.F_j explains too little of the correlations: {}",
        se / st
    );
}

#[test]
fn directions_are_unit_and_bias_has_its_norm() {
    let b = SynthBench::new(SynthBenchConfig::synthsaebench_small()).unwrap();
    let d = b.d_in();
    for row in b.features.chunks(d) {
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "|v| = {norm}");
    }
    let bn: f32 = b.bias.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((bn - 0.5).abs() < 1e-6, "|b| = {bn}");
}

#[test]
fn orthogonality_gradient_matches_finite_differences() {
    let (n, d) = (7, 5);
    let v: Vec<f32> = (0..n * d)
        .map(|k| ((k * 37 % 11) as f32 - 5.0) / 7.0)
        .collect();
    let mut gram = vec![0f32; d * d];
    let mut grad = vec![0f32; n * d];
    orthogonality_grad(&v, n, d, &mut gram, &mut grad);
    let h = 1e-2f32;
    for k in 0..n * d {
        let mut up = v.clone();
        up[k] += h;
        let mut down = v.clone();
        down[k] -= h;
        let num =
            (orthogonality_loss(&up, n, d) - orthogonality_loss(&down, n, d)) / (2.0 * h as f64);
        assert!(
            (num - grad[k] as f64).abs() < 1e-2 * num.abs().max(1.0),
            "d/dv[{k}]: numeric {num}, analytic {}",
            grad[k]
        );
    }
}

#[test]
fn orthogonalisation_lowers_the_overlap() {
    let (n, d) = (512, 32);
    let cfg = SynthBenchConfig {
        n_features: n,
        d_in: d,
        n_roots: 0,
        ortho_steps: 0,
        ..SynthBenchConfig::synthsaebench_small()
    };
    let mut v = SynthBench::new(cfg).unwrap().features;
    let before = orthogonality_loss(&v, n, d);
    orthogonalize(&mut v, n, d, 100, 3e-3);
    let after = orthogonality_loss(&v, n, d);
    assert!(after < 0.97 * before, "loss {before} -> {after}");
}

#[test]
fn sampling_is_deterministic_and_independent_of_batching() {
    let b = SynthBench::new(SynthBenchConfig::synthsaebench_small()).unwrap();
    let d = b.d_in();
    let mut whole = vec![0f32; 64 * d];
    let mut acts = Vec::new();
    b.sample_batch(100, &mut whole, Some(&mut acts));
    let mut parts = vec![0f32; 64 * d];
    b.sample_batch(100, &mut parts[..10 * d], None);
    b.sample_batch(110, &mut parts[10 * d..], None);
    assert_eq!(whole, parts);
    // x = a W + b.
    let mut x = vec![0f32; d];
    b.embed(&acts[3], &mut x);
    assert_eq!(&whole[3 * d..4 * d], &x[..]);
    let other = SynthBench::new(SynthBenchConfig {
        seed: 7,
        ..SynthBenchConfig::synthsaebench_small()
    })
    .unwrap();
    let mut y = vec![0f32; 64 * d];
    other.sample_batch(100, &mut y, None);
    assert_ne!(whole, y, "another seed gives other samples");
}

#[test]
fn bad_configs_are_refused() {
    assert!(SynthBenchConfig::preset("nope").is_err());
    let too_deep = SynthBenchConfig {
        max_depth: 4,
        ..SynthBenchConfig::synthsaebench_small()
    };
    assert!(SynthBench::new(too_deep).is_err());
}

/// `sample_acts` (children drawn only under active parents) against the two-step form that
/// draws every latent Gaussian: the same distribution (different rows of one seed, so
/// independent samples), and the hierarchy invariants on every row.
#[test]
fn level_by_level_sampling_has_the_two_step_distribution() {
    let b = bench16k_fast();
    let n = b.n_features();
    let mut s = b.scratch();
    let mut acts = Vec::new();
    let rows = 20_000u64;
    let mut counts = [vec![0u64; n], vec![0u64; n]];
    let mut l0 = [0f64; 2];
    for row in 0..rows {
        b.sample_acts(row, &mut s, &mut acts);
        assert!(
            acts.windows(2).all(|w| w[0].0 < w[1].0),
            "row {row}: not ascending"
        );
        let on = |f: u32| acts.binary_search_by_key(&f, |a| a.0).is_ok();
        for &(f, a) in &acts {
            assert!(a > 0.0);
            let p = b.parent[f as usize];
            assert!(p == NO_PARENT || on(p), "row {row}: {f} under inactive {p}");
            let kids = b.children(f as usize).filter(|&c| on(c as u32)).count();
            assert!(kids <= 1, "row {row}: {f} has {kids} active children");
            counts[0][f as usize] += 1;
        }
        l0[0] += acts.len() as f64;
        // Rows of the two-step form far from the ones above.
        b.sample_acts_two_step(row + (1 << 40), &mut s, &mut acts);
        for &(f, _) in &acts {
            counts[1][f as usize] += 1;
        }
        l0[1] += acts.len() as f64;
    }
    let (a, c) = (l0[0] / rows as f64, l0[1] / rows as f64);
    // The L0's standard error over 20k rows is about 0.08 per form.
    assert!((a - c).abs() < 0.4, "L0 {a} level by level, {c} two-step");
    // Per feature, a two-sample test of the firing rates; among 16384 features a |z| above
    // 5.5 has probability ~1e-3 in total when both rates are equal.
    let mut worst = (0usize, 0f64);
    for i in 0..n {
        let (x, y) = (counts[0][i] as f64, counts[1][i] as f64);
        if x + y == 0.0 {
            continue;
        }
        let z = (x - y) / (x + y).sqrt();
        if z.abs() > worst.1 {
            worst = (i, z.abs());
        }
    }
    assert!(
        worst.1 < 5.5,
        "feature {} fires at another rate: z = {}",
        worst.0,
        worst.1
    );
    eprintln!(
        "L0 {a:.3} level by level, {c:.3} two-step; worst |z| {:.2}",
        worst.1
    );
}
