//! SynthSAEBench metrics: how well an SAE recovers known ground-truth features, computed as
//! SAELens' `eval_sae_on_synthetic_data` does (reference section 3). They take decoder rows,
//! the true directions, codes and true activations; no model is involved.
//!
//! * MCC: one-to-one matching of latents to true features maximising the summed |cos|
//!   (a rectangular linear assignment), averaged over all latents, dead ones included.
//! * Uniqueness: distinct best-|cos| features over the number of latents.
//! * F1 / precision / recall / accuracy: each latent against its best-|cos| feature
//!   (many-to-one), "fires" meaning non-zero; per-latent counts over all samples, then the
//!   mean over all latents (a dead latent scores 0).
//! * Explained variance (pooled over dimensions, centred, f64), L0, true L0, dead latents,
//!   shrinkage (mean |x_hat|/|x|).

#![allow(clippy::needless_range_loop)]

use anyhow::{bail, Result};
use rayon::prelude::*;
use sae_core::sae::Sae;
use sae_core::sparse::SparseCode;
use sae_store::synthbench::SparseActs;

/// |cos(a_k, b_j)| for rows of `a` (`[n_a, d]`) and `b` (`[n_b, d]`), as `[n_a, n_b]`; norms
/// clamped at 1e-8 as in the reference.
pub fn abs_cosines(a: &[f32], b: &[f32], d: usize) -> Vec<f32> {
    let unit = |m: &[f32]| {
        let mut m = m.to_vec();
        m.par_chunks_mut(d).for_each(|r| {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-8);
            r.iter_mut().for_each(|x| *x /= n);
        });
        m
    };
    let (ua, ub) = (unit(a), unit(b));
    let (n_a, n_b) = (a.len() / d, b.len() / d);
    let mut c = vec![0f32; n_a * n_b];
    sae_core::kernels::matmul_xt(&ua, n_a, d, &ub, n_b, &mut c);
    c.par_iter_mut().for_each(|x| *x = x.abs());
    c
}

/// Minimum-cost assignment of every row of a `[rows, cols]` cost matrix (rows <= cols) to a
/// distinct column: the shortest-augmenting-path method (Jonker-Volgenant style, as in
/// Crouse 2016), one Dijkstra search on reduced costs per row. Returns each row's column.
pub fn linear_sum_assignment(cost: &[f32], rows: usize, cols: usize) -> Result<Vec<usize>> {
    if rows > cols {
        bail!("linear_sum_assignment: {rows} rows cannot get distinct columns among {cols}");
    }
    if cost.len() != rows * cols {
        bail!(
            "linear_sum_assignment: cost has {} entries, not {rows} x {cols}",
            cost.len()
        );
    }
    if cost.iter().any(|c| !c.is_finite()) {
        bail!("linear_sum_assignment: the cost matrix holds NaN or infinite values");
    }
    const NONE: usize = usize::MAX;
    let mut u = vec![0f64; rows];
    let mut v = vec![0f64; cols];
    let mut col4row = vec![NONE; rows];
    let mut row4col = vec![NONE; cols];
    let mut shortest = vec![f64::INFINITY; cols];
    let mut path = vec![NONE; cols];
    let mut in_sc = vec![false; cols];
    let mut remaining: Vec<usize> = Vec::with_capacity(cols);
    let mut visited_rows: Vec<usize> = Vec::new();
    for cur in 0..rows {
        shortest.fill(f64::INFINITY);
        path.fill(NONE);
        in_sc.fill(false);
        visited_rows.clear();
        remaining.clear();
        remaining.extend(0..cols);
        let mut min_val = 0f64;
        let mut i = cur;
        let sink = loop {
            visited_rows.push(i);
            let row = &cost[i * cols..(i + 1) * cols];
            let mut lowest = f64::INFINITY;
            let mut best_pos = NONE;
            for (pos, &j) in remaining.iter().enumerate() {
                let r = min_val + row[j] as f64 - u[i] - v[j];
                if r < shortest[j] {
                    path[j] = i;
                    shortest[j] = r;
                }
                // Prefer a free column among equals: the augmentation ends sooner.
                if shortest[j] < lowest || (shortest[j] == lowest && row4col[j] == NONE) {
                    lowest = shortest[j];
                    best_pos = pos;
                }
            }
            if best_pos == NONE {
                bail!("linear_sum_assignment: no feasible assignment");
            }
            min_val = lowest;
            let j = remaining.swap_remove(best_pos);
            in_sc[j] = true;
            if row4col[j] == NONE {
                break j;
            }
            i = row4col[j];
        };
        // Dual update keeps reduced costs non-negative on the tree just searched.
        u[cur] += min_val;
        for &r in &visited_rows {
            if r != cur {
                u[r] += min_val - shortest[col4row[r]];
            }
        }
        for j in 0..cols {
            if in_sc[j] {
                v[j] -= min_val - shortest[j];
            }
        }
        // Augment along the path back to `cur`.
        let mut j = sink;
        loop {
            let r = path[j];
            row4col[j] = r;
            let prev = col4row[r];
            col4row[r] = j;
            if r == cur {
                break;
            }
            j = prev;
        }
    }
    Ok(col4row)
}

/// Scores of a dictionary against the true directions, from decoder rows alone.
#[derive(Clone, Debug)]
pub struct DictionaryScores {
    pub mcc: f64,
    pub uniqueness: f64,
    /// Each latent's best-|cos| true feature (the classification match).
    pub best_match: Vec<u32>,
}

/// MCC and uniqueness of decoder rows `w_dec` (`[d_sae, d]`) against `features` (`[n, d]`).
pub fn dictionary_scores(w_dec: &[f32], features: &[f32], d: usize) -> Result<DictionaryScores> {
    let (d_sae, n) = (w_dec.len() / d, features.len() / d);
    if d_sae == 0 || n == 0 {
        bail!("dictionary_scores: no latents or no true features");
    }
    let cos = abs_cosines(w_dec, features, d);
    let best_match: Vec<u32> = cos
        .par_chunks(n)
        .map(|row| {
            let mut best = 0;
            for j in 1..n {
                if row[j] > row[best] {
                    best = j;
                }
            }
            best as u32
        })
        .collect();
    let mut seen = vec![false; n];
    best_match.iter().for_each(|&j| seen[j as usize] = true);
    let uniqueness = seen.iter().filter(|&&s| s).count() as f64 / d_sae as f64;
    let (rows, cols, transposed) = if d_sae <= n {
        (d_sae, n, false)
    } else {
        (n, d_sae, true)
    };
    let cost: Vec<f32> = if transposed {
        (0..n * d_sae)
            .map(|k| 1.0 - cos[(k % d_sae) * n + k / d_sae])
            .collect()
    } else {
        cos.iter().map(|c| 1.0 - c).collect()
    };
    let assignment = linear_sum_assignment(&cost, rows, cols)?;
    // The reference averages over the matched pairs: min(d_sae, n) of them.
    let total: f64 = assignment
        .iter()
        .enumerate()
        .map(|(r, &c)| 1.0 - cost[r * cols + c] as f64)
        .sum();
    Ok(DictionaryScores {
        mcc: total / rows as f64,
        uniqueness,
        best_match,
    })
}

/// All SynthSAEBench metrics of one SAE.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SynthMetrics {
    pub mcc: f64,
    pub uniqueness: f64,
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
    pub accuracy: f64,
    pub explained_variance: f64,
    pub l0: f64,
    pub true_l0: f64,
    pub dead_latents: usize,
    pub shrinkage: f64,
    pub n_samples: u64,
}

/// Accumulates the sample-based metrics batch by batch.
pub struct SynthEvaluator {
    dict: DictionaryScores,
    /// Latents matched to each true feature (inverse of `best_match`).
    matched_by: Vec<Vec<u32>>,
    d: usize,
    fires: Vec<u64>,
    truth_fires: Vec<u64>,
    both: Vec<u64>,
    n: u64,
    sum_err2: f64,
    sum_x: Vec<f64>,
    sum_x2: f64,
    l0_sum: u64,
    true_l0_sum: u64,
    shrink_sum: f64,
    shrink_n: u64,
}

impl SynthEvaluator {
    pub fn new(w_dec: &[f32], features: &[f32], d: usize) -> Result<Self> {
        let dict = dictionary_scores(w_dec, features, d)?;
        let d_sae = w_dec.len() / d;
        let mut matched_by = vec![Vec::new(); features.len() / d];
        for (k, &j) in dict.best_match.iter().enumerate() {
            matched_by[j as usize].push(k as u32);
        }
        Ok(SynthEvaluator {
            dict,
            matched_by,
            d,
            fires: vec![0; d_sae],
            truth_fires: vec![0; d_sae],
            both: vec![0; d_sae],
            n: 0,
            sum_err2: 0.0,
            sum_x: vec![0.0; d],
            sum_x2: 0.0,
            l0_sum: 0,
            true_l0_sum: 0,
            shrink_sum: 0.0,
            shrink_n: 0,
        })
    }

    pub fn dictionary(&self) -> &DictionaryScores {
        &self.dict
    }

    /// One batch: inputs `x` and reconstructions `recon` (`[n, d]`), the SAE's codes (stored
    /// entries count as firing only when non-zero) and each row's true activations.
    pub fn add_batch(
        &mut self,
        x: &[f32],
        recon: &[f32],
        codes: &SparseCode,
        truth: &[SparseActs],
    ) {
        let d = self.d;
        let n = truth.len();
        assert_eq!(x.len(), n * d);
        assert_eq!(recon.len(), n * d);
        assert_eq!(codes.n_rows, n);
        for r in 0..n {
            let xr = &x[r * d..(r + 1) * d];
            let hr = &recon[r * d..(r + 1) * d];
            let (mut x2, mut h2) = (0f64, 0f64);
            for k in 0..d {
                let (a, b) = (xr[k] as f64, hr[k] as f64);
                self.sum_err2 += (a - b) * (a - b);
                self.sum_x[k] += a;
                x2 += a * a;
                h2 += b * b;
            }
            self.sum_x2 += x2;
            if x2.sqrt() > 1e-6 {
                self.shrink_sum += (h2 / x2).sqrt();
                self.shrink_n += 1;
            }
            let t = &truth[r];
            let gt_on = |j: u32| {
                t.binary_search_by_key(&j, |&(f, _)| f)
                    .is_ok_and(|p| t[p].1 > 0.0)
            };
            let mut true_l0 = 0;
            for &(j, a) in t {
                if a > 0.0 {
                    true_l0 += 1;
                    for &k in &self.matched_by[j as usize] {
                        self.truth_fires[k as usize] += 1;
                    }
                }
            }
            self.true_l0_sum += true_l0;
            let (idx, val) = codes.row(r);
            for (&k, &v) in idx.iter().zip(val) {
                if v != 0.0 {
                    self.l0_sum += 1;
                    self.fires[k as usize] += 1;
                    if gt_on(self.dict.best_match[k as usize]) {
                        self.both[k as usize] += 1;
                    }
                }
            }
        }
        self.n += n as u64;
    }

    pub fn finish(&self) -> SynthMetrics {
        let d_sae = self.fires.len();
        let n = self.n as f64;
        let (mut f1, mut prec, mut rec, mut acc) = (0f64, 0f64, 0f64, 0f64);
        for k in 0..d_sae {
            let tp = self.both[k] as f64;
            let fp = (self.fires[k] - self.both[k]) as f64;
            let fneg = (self.truth_fires[k] - self.both[k]) as f64;
            let tn = n - tp - fp - fneg;
            let p = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
            let r = if tp + fneg > 0.0 {
                tp / (tp + fneg)
            } else {
                0.0
            };
            prec += p;
            rec += r;
            f1 += if p + r > 0.0 {
                2.0 * p * r / (p + r)
            } else {
                0.0
            };
            acc += if n > 0.0 { (tp + tn) / n } else { 0.0 };
        }
        let mean_x2: f64 = self.sum_x.iter().map(|s| (s / n) * (s / n)).sum();
        let total_var = self.sum_x2 / n - mean_x2;
        let explained_variance = if total_var < 1e-10 {
            if self.sum_err2 / n < 1e-10 {
                1.0
            } else {
                0.0
            }
        } else {
            1.0 - self.sum_err2 / (n * total_var)
        };
        SynthMetrics {
            mcc: self.dict.mcc,
            uniqueness: self.dict.uniqueness,
            f1: f1 / d_sae as f64,
            precision: prec / d_sae as f64,
            recall: rec / d_sae as f64,
            accuracy: acc / d_sae as f64,
            explained_variance,
            l0: self.l0_sum as f64 / n,
            true_l0: self.true_l0_sum as f64 / n,
            dead_latents: self.fires.iter().filter(|&&f| f == 0).count(),
            shrinkage: if self.shrink_n > 0 {
                self.shrink_sum / self.shrink_n as f64
            } else {
                0.0
            },
            n_samples: self.n,
        }
    }
}

/// Scores `sae` on `n` fresh samples of `bench` (rows `first_row..first_row + n`), in batches
/// of `batch` (the last one shorter), each family in its training form where it has one
/// (BatchTopK: batch selection; see `Sae::encode_as_trained`).
pub fn evaluate_on_bench(
    sae: &Sae,
    bench: &sae_store::synthbench::SynthBench,
    first_row: u64,
    n: u64,
    batch: usize,
    progress: &sae_output::Progress,
) -> Result<SynthMetrics> {
    let d = bench.d_in();
    if sae.d_in != d {
        bail!(
            "the SAE reads {} dimensions but the benchmark's samples have {d}",
            sae.d_in
        );
    }
    if batch == 0 || n == 0 {
        bail!("the evaluation needs at least one sample and a batch of at least 1");
    }
    let mut eval = SynthEvaluator::new(&sae.w_dec, &bench.features, d)?;
    let mut x = vec![0f32; batch * d];
    let mut truth: Vec<SparseActs> = Vec::new();
    let mut done = 0u64;
    while done < n {
        let rows = (n - done).min(batch as u64) as usize;
        let x = &mut x[..rows * d];
        truth.truncate(0);
        bench.sample_batch(first_row + done, x, Some(&mut truth));
        let codes = sae.encode_as_trained(x, rows);
        let recon = sae.decode(&codes);
        eval.add_batch(x, &recon, &codes, &truth);
        done += rows as u64;
        progress.inc(rows as u64);
    }
    Ok(eval.finish())
}

/// Scores `sae` on rows generated beforehand (`x`, `[n, d]`, and each row's true
/// activations), in batches of `batch` as `evaluate_on_bench` does: the same rows can score
/// many SAEs without generating them again.
pub fn evaluate_on_rows(
    sae: &Sae,
    features: &[f32],
    x: &[f32],
    truth: &[SparseActs],
    batch: usize,
    progress: &sae_output::Progress,
) -> Result<SynthMetrics> {
    let d = sae.d_in;
    if d == 0 || x.len() != truth.len() * d {
        bail!(
            "the evaluation rows hold {} values for {} samples, not {} dimensions each",
            x.len(),
            truth.len(),
            d
        );
    }
    if !features.len().is_multiple_of(d) {
        bail!("the true directions do not have {d} dimensions like the SAE");
    }
    if batch == 0 || truth.is_empty() {
        bail!("the evaluation needs at least one sample and a batch of at least 1");
    }
    let mut eval = SynthEvaluator::new(&sae.w_dec, features, d)?;
    for (xb, tb) in x.chunks(batch * d).zip(truth.chunks(batch)) {
        let codes = sae.encode_as_trained(xb, tb.len());
        let recon = sae.decode(&codes);
        eval.add_batch(xb, &recon, &codes, tb);
        progress.inc(tb.len() as u64);
    }
    Ok(eval.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sae_core::ArchKind;
    use sae_store::synthbench::{SynthBench, SynthBenchConfig};

    /// Rows generated once and scored later give what scoring while generating gives,
    /// whatever the batching of the tail.
    #[test]
    fn stored_rows_score_as_generated_rows() {
        let bench = SynthBench::new(SynthBenchConfig {
            ortho_steps: 5,
            ..SynthBenchConfig::synthsaebench_small()
        })
        .unwrap();
        let d = bench.d_in();
        let sae = Sae::init(ArchKind::BATCHTOPK, d, 96, 6, 3);
        let (first, n, batch) = (1000u64, 1100usize, 256usize);
        let hidden = sae_output::Progress::hidden();
        let live = evaluate_on_bench(&sae, &bench, first, n as u64, batch, &hidden).unwrap();
        let mut x = vec![0f32; n * d];
        let mut truth = Vec::new();
        bench.sample_batch(first, &mut x, Some(&mut truth));
        let stored = evaluate_on_rows(&sae, &bench.features, &x, &truth, batch, &hidden).unwrap();
        assert_eq!(live, stored);
        assert_eq!(stored.n_samples, n as u64);
        // Another batching changes BatchTopK's selection (not its mean L0), so the
        // comparison above can fail.
        let other = evaluate_on_rows(&sae, &bench.features, &x, &truth, 100, &hidden).unwrap();
        assert_ne!(other.explained_variance, stored.explained_variance);
        let e = evaluate_on_rows(&sae, &bench.features, &x[..d * 10], &truth, batch, &hidden);
        assert!(e.is_err());
    }
}
