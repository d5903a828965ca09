//! The scan against brute force on random sparse codes.

use crate::hist::GrowingHist;
use crate::scan::{Example, ScanConfig, Scanner};
use sae_core::SparseCode;

/// Deterministic pseudo-random numbers for building test data.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn unit(&mut self) -> f32 {
        (self.next() % 1_000_000) as f32 / 1_000_000.0
    }
}

/// Dense `[rows, d_sae]` activations (mostly zero; latent j fires with rate ~ (j+1)/2d),
/// with duplicate values sprinkled in to exercise tie-breaking.
fn random_dense(rows: usize, d_sae: usize, seed: u64) -> Vec<f32> {
    let mut rng = Lcg(seed);
    let mut x = vec![0.0; rows * d_sae];
    for r in 0..rows {
        for j in 0..d_sae {
            let p = (j + 1) as f32 / (2 * d_sae) as f32;
            if rng.unit() < p {
                let v = if rng.next().is_multiple_of(7) {
                    1.5
                } else {
                    0.01 + 5.0 * rng.unit() * rng.unit()
                };
                x[r * d_sae + j] = v;
            }
        }
    }
    x
}

fn to_csr(dense: &[f32], rows: usize, d_sae: usize) -> SparseCode {
    let mut code = SparseCode {
        n_rows: rows,
        d_sae,
        row_ptr: vec![0],
        idx: vec![],
        val: vec![],
    };
    for r in 0..rows {
        // Reverse latent order within a row: the scan must not rely on sorted rows.
        for j in (0..d_sae).rev() {
            let v = dense[r * d_sae + j];
            if v != 0.0 {
                code.idx.push(j as u32);
                code.val.push(v);
            }
        }
        code.row_ptr.push(code.idx.len());
    }
    code
}

fn tokens_for(rows: usize, seed: u64) -> Vec<u32> {
    let mut rng = Lcg(seed ^ 0xabc);
    (0..rows).map(|_| (rng.next() % 1000) as u32).collect()
}

/// Scans `dense` in batches of the given context counts.
fn scan(
    dense: &[f32],
    tokens: &[u32],
    d_sae: usize,
    ctx: usize,
    batches: &[usize],
    cfg: &ScanConfig,
) -> crate::scan::ScanResult {
    let mut s = Scanner::new(d_sae, ctx, cfg.clone()).unwrap();
    let mut at = 0;
    for &b in batches {
        let rows = b * ctx;
        let code = to_csr(&dense[at * d_sae..(at + rows) * d_sae], rows, d_sae);
        s.add_batch(&tokens[at..at + rows], &code).unwrap();
        at += rows;
    }
    assert_eq!(at * d_sae, dense.len(), "batches must cover the data");
    s.finish()
}

/// The example a brute-force reader expects around (context, pos).
#[allow(clippy::too_many_arguments)]
fn expected_example(
    dense: &[f32],
    tokens: &[u32],
    d_sae: usize,
    ctx: usize,
    j: usize,
    c: usize,
    pos: usize,
    cfg: &ScanConfig,
) -> Example {
    let lo = pos.saturating_sub(cfg.left);
    let hi = (pos + cfg.right + 1).min(ctx);
    Example {
        act: dense[(c * ctx + pos) * d_sae + j],
        context: c as u32,
        pos: pos as u32,
        center: (pos - lo) as u32,
        tokens: (lo..hi).map(|p| tokens[c * ctx + p]).collect(),
        acts: (lo..hi).map(|p| dense[(c * ctx + p) * d_sae + j]).collect(),
    }
}

#[test]
fn top_k_stats_and_histogram_match_brute_force() {
    let (d_sae, ctx, n_ctx) = (24, 12, 60);
    let rows = ctx * n_ctx;
    let dense = random_dense(rows, d_sae, 7);
    let tokens = tokens_for(rows, 7);
    let cfg = ScanConfig {
        top_k: 5,
        reservoir: 6,
        n_random: 3,
        left: 3,
        right: 2,
        hist_bins: 8,
        skip_first: true,
        seed: 1,
    };
    let res = scan(&dense, &tokens, d_sae, ctx, &[7, 1, 20, 32], &cfg);
    assert_eq!(res.n_contexts, n_ctx as u64);
    assert_eq!(res.n_tokens, (n_ctx * (ctx - 1)) as u64);
    for j in 0..d_sae {
        let l = &res.latents[j];
        // Per-context maxima over positions >= 1 (first position on ties).
        let mut best: Vec<(f32, usize, usize)> = Vec::new();
        let (mut n, mut sum, mut max) = (0u64, 0f64, 0f32);
        let mut values = Vec::new();
        for c in 0..n_ctx {
            let mut b: Option<(f32, usize)> = None;
            for p in 1..ctx {
                let v = dense[(c * ctx + p) * d_sae + j];
                if v > 0.0 {
                    n += 1;
                    sum += v as f64;
                    max = max.max(v);
                    values.push(v);
                    if b.is_none_or(|(bv, _)| v > bv) {
                        b = Some((v, p));
                    }
                }
            }
            if let Some((v, p)) = b {
                best.push((v, c, p));
            }
        }
        best.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        best.truncate(cfg.top_k);
        let want: Vec<Example> = best
            .iter()
            .map(|&(_, c, p)| expected_example(&dense, &tokens, d_sae, ctx, j, c, p, &cfg))
            .collect();
        assert_eq!(l.top, want, "latent {j} top-k");
        assert_eq!(l.n_fired, n, "latent {j} count");
        assert!(
            (l.sum_act - sum).abs() < 1e-6 * sum.max(1.0),
            "latent {j} sum"
        );
        assert_eq!(l.max_act, max);
        // The histogram equals direct binning over its final range.
        let mut direct = GrowingHist::new(cfg.hist_bins);
        direct.hi = l.hist.hi;
        for &v in &values {
            let b = ((v / direct.hi) * cfg.hist_bins as f32) as usize;
            direct.bins[b.min(cfg.hist_bins - 1)] += 1;
        }
        assert_eq!(l.hist.bins, direct.bins, "latent {j} histogram");
        if n > 0 {
            assert!(l.hist.hi > max && l.hist.hi <= 2.0 * max);
        }
        // Random examples: real firings with correct windows, strongest first.
        assert_eq!(l.random.len(), (n as usize).min(cfg.n_random));
        for e in &l.random {
            let want = expected_example(
                &dense,
                &tokens,
                d_sae,
                ctx,
                j,
                e.context as usize,
                e.pos as usize,
                &cfg,
            );
            assert_eq!(e, &want);
            assert!(e.pos > 0 && e.act > 0.0);
        }
        assert!(l.random.windows(2).all(|w| w[0].act >= w[1].act));
    }
}

/// Batch boundaries change nothing, not even the reservoir's random choices.
#[test]
fn batching_does_not_change_results() {
    let (d_sae, ctx, n_ctx) = (10, 8, 40);
    let dense = random_dense(ctx * n_ctx, d_sae, 3);
    let tokens = tokens_for(ctx * n_ctx, 3);
    let cfg = ScanConfig {
        top_k: 4,
        reservoir: 5,
        n_random: 5,
        left: 2,
        right: 2,
        hist_bins: 4,
        skip_first: false,
        seed: 9,
    };
    let one = scan(&dense, &tokens, d_sae, ctx, &[40], &cfg);
    let many = scan(&dense, &tokens, d_sae, ctx, &[1, 2, 3, 4, 10, 20], &cfg);
    assert_eq!(one.latents, many.latents);
    assert_eq!(one.n_tokens, (ctx * n_ctx) as u64);
}

/// Algorithm R keeps every firing with probability R / n: over many seeds each part of
/// the stream is picked about equally often.
#[test]
fn reservoir_is_uniform_over_firings() {
    let (ctx, n_ctx, reservoir) = (50, 40, 20);
    let rows = ctx * n_ctx;
    // One latent firing on every token with a value that names the row.
    let code = SparseCode {
        n_rows: rows,
        d_sae: 1,
        row_ptr: (0..=rows).collect(),
        idx: vec![0; rows],
        val: (0..rows).map(|r| 1.0 + r as f32).collect(),
    };
    let tokens = vec![5u32; rows];
    let n_buckets = 10;
    let mut hits = vec![0u32; n_buckets];
    let n_seeds = 150;
    for seed in 0..n_seeds {
        let cfg = ScanConfig {
            top_k: 1,
            reservoir,
            n_random: reservoir,
            left: 0,
            right: 0,
            hist_bins: 2,
            skip_first: false,
            seed,
        };
        let mut s = Scanner::new(1, ctx, cfg).unwrap();
        s.add_batch(&tokens, &code).unwrap();
        let res = s.finish();
        let picked = &res.latents[0].random;
        assert_eq!(picked.len(), reservoir);
        let mut rows_seen: Vec<usize> = picked.iter().map(|e| e.act as usize - 1).collect();
        rows_seen.sort();
        rows_seen.dedup();
        assert_eq!(rows_seen.len(), reservoir, "a firing was kept twice");
        for r in rows_seen {
            hits[r * n_buckets / rows] += 1;
        }
    }
    // Expected per bucket: 150 * 20 / 10 = 300 (sd ~ 16); a scheme biased toward the
    // start (no replacement) or the end (always replace) would put 0 in some bucket.
    let expected = (n_seeds as usize * reservoir / n_buckets) as f64;
    for (b, &h) in hits.iter().enumerate() {
        assert!(
            (h as f64 - expected).abs() < 0.25 * expected,
            "bucket {b}: {h} picks, expected ~{expected}: {hits:?}"
        );
    }
}

#[test]
fn random_examples_spread_over_the_activation_range() {
    let (ctx, rows) = (100, 100);
    let code = SparseCode {
        n_rows: rows,
        d_sae: 1,
        row_ptr: (0..=rows).collect(),
        idx: vec![0; rows],
        val: (0..rows).map(|r| 1.0 + r as f32).collect(),
    };
    // A reservoir as large as the stream keeps everything; 4 picks at quantiles 1/8, 3/8...
    let cfg = ScanConfig {
        top_k: 0,
        reservoir: 100,
        n_random: 4,
        left: 0,
        right: 0,
        hist_bins: 2,
        skip_first: false,
        seed: 0,
    };
    let mut s = Scanner::new(1, ctx, cfg).unwrap();
    s.add_batch(&vec![1; rows], &code).unwrap();
    let acts: Vec<f32> = s.finish().latents[0].random.iter().map(|e| e.act).collect();
    assert_eq!(acts, vec![88.0, 63.0, 38.0, 13.0]);
}

#[test]
fn bad_batches_are_clear_errors() {
    let mut s = Scanner::new(3, 4, ScanConfig::default()).unwrap();
    let ok = |vals: Vec<f32>, idx: Vec<u32>| SparseCode {
        n_rows: 4,
        d_sae: 3,
        row_ptr: vec![0, idx.len(), idx.len(), idx.len(), idx.len()],
        idx,
        val: vals,
    };
    let e = s
        .add_batch(&[1, 2, 3, 4], &ok(vec![f32::NAN], vec![1]))
        .unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
    let e = s
        .add_batch(&[1, 2, 3, 4], &ok(vec![1.0], vec![7]))
        .unwrap_err();
    assert!(e.to_string().contains("latent 7"), "{e}");
    let e = s.add_batch(&[1, 2, 3], &ok(vec![], vec![])).unwrap_err();
    assert!(e.to_string().contains("whole contexts"), "{e}");
    let e = s
        .add_batch(&[1, 2, 3, 4, 5, 6, 7, 8], &ok(vec![], vec![]))
        .unwrap_err();
    assert!(e.to_string().contains("sparse code is [4, 3]"), "{e}");
    assert!(Scanner::new(
        3,
        4,
        ScanConfig {
            hist_bins: 3,
            ..ScanConfig::default()
        }
    )
    .is_err());
}
