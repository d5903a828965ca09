//! Training-throughput benchmark: full steps vs the one-GEMM limit, same threads, same run.

use crate::bf16::EncoderBf16;
use crate::f32_product::TransposedF32;
use crate::{ArchKind, Precision, Sae, SaeTrainer, TrainHyper};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::fmt;
use std::time::Instant;

/// Mean number of active latents the benchmark SAEs are set up for (and k for TopK).
pub const BENCH_L0: usize = 64;

/// One line of `sae bench`.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub arch: ArchKind,
    pub d_in: usize,
    pub d_sae: usize,
    pub batch: usize,
    /// Median tokens/s of full training steps.
    pub tokens_per_s: f64,
    /// Median tokens/s of the dense encoder product alone (the one-GEMM limit), in the
    /// steps' precision (bf16: the packing of W_enc included).
    pub limit_tokens_per_s: f64,
    pub ratio: f64,
    /// Mean L0 during the timed steps.
    pub l0: f64,
    pub threads: usize,
    pub precision: Precision,
}

impl BenchRow {
    pub fn header() -> String {
        format!(
            "{:<10} {:>6} {:>7} {:>6} {:>12} {:>14} {:>7} {:>7}",
            "arch", "d_in", "d_sae", "batch", "tokens/s", "1-GEMM tok/s", "ratio", "L0"
        )
    }
}

impl fmt::Display for BenchRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<10} {:>6} {:>7} {:>6} {:>12.0} {:>14.0} {:>6.1}% {:>7.1}",
            self.arch.as_str(),
            self.d_in,
            self.d_sae,
            self.batch,
            self.tokens_per_s,
            self.limit_tokens_per_s,
            100.0 * self.ratio,
            self.l0
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// An SAE whose biases/thresholds give about `l0` active latents on N(0, I) inputs.
fn bench_sae(arch: ArchKind, d_in: usize, d_sae: usize, l0: usize, sample: &[f32]) -> Sae {
    let mut sae = Sae::init(arch, d_in, d_sae, l0, 0);
    let n = sample.len() / d_in;
    let mut pre = sae.pre_activations(sample, n);
    let keep = (l0 * n).min(pre.len() - 1);
    let (_, q, _) = pre.select_nth_unstable_by(keep, |a, b| b.total_cmp(a));
    let q = *q;
    arch.family().set_sparsity(&mut sae, l0, q);
    sae
}

/// Median tokens/s of `steps` full training steps (after 2 warm-up steps) and of the dense
/// encoder product alone (timed alternately with the steps), for every arch and width, on
/// N(0, I) data with about `l0` active latents per token (`BENCH_L0` is the usual choice;
/// real runs sit anywhere from ten to a few hundred).
pub fn run_bench(
    archs: &[ArchKind],
    d_sae_list: &[usize],
    d_in: usize,
    batch: usize,
    steps: usize,
    l0: usize,
) -> Vec<BenchRow> {
    run_bench_in(archs, d_sae_list, d_in, batch, steps, l0, Precision::F32)
}

/// [`run_bench`] with the encoder product (of the steps and of the limit) in `precision`.
pub fn run_bench_in(
    archs: &[ArchKind],
    d_sae_list: &[usize],
    d_in: usize,
    batch: usize,
    steps: usize,
    l0: usize,
    precision: Precision,
) -> Vec<BenchRow> {
    let steps = steps.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let n_batches = 3;
    let data: Vec<f32> = (0..n_batches * batch * d_in)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let mut rows = Vec::new();
    for &d_sae in d_sae_list {
        // The one-GEMM limit: the same product on the same threads, timed alternately with
        // the training steps so that both see the same machine load.
        let w_t: Vec<f32> = (0..d_sae * d_in)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let mut out = vec![0.0f32; batch * d_sae];
        for &arch in archs {
            let sae = bench_sae(
                arch,
                d_in,
                d_sae,
                l0.clamp(1, d_sae),
                &data[..batch.min(1024) * d_in],
            );
            let hyper = TrainHyper {
                precision,
                ..TrainHyper::default()
            };
            let mut trainer = SaeTrainer::new(sae, hyper);
            let mut enc_f32 = TransposedF32::default();
            let mut enc_bf16 = EncoderBf16::new(precision.split_encoder());
            let (mut times, mut gemm_times) = (Vec::new(), Vec::new());
            let mut l0_mean = 0.0;
            for s in 0..steps + 2 {
                let x = &data[(s % n_batches) * batch * d_in..][..batch * d_in];
                let t0 = Instant::now();
                match precision.bf16_encoder() || trainer.screens() {
                    false => enc_f32.matmul_xt(x, batch, d_in, &w_t, d_sae, &mut out),
                    true => enc_bf16.matmul_xt(x, batch, d_in, &w_t, d_sae, &mut out),
                }
                let t1 = Instant::now();
                let st = if trainer.needs_input_grad() {
                    // A stand-in loss gradient (the batch after this one): what it costs is
                    // the same whatever its values.
                    let g = &data[((s + 1) % n_batches) * batch * d_in..][..batch * d_in];
                    trainer.step_with_grad(x, g, batch, 1e-5, 1e-3)
                } else {
                    trainer.step(x, batch, 1e-5, 1e-3)
                };
                if s >= 2 {
                    gemm_times.push((t1 - t0).as_secs_f64());
                    times.push(t1.elapsed().as_secs_f64());
                    l0_mean += st.l0 / steps as f64;
                }
            }
            let tps = batch as f64 / median(times);
            let limit = batch as f64 / median(gemm_times);
            rows.push(BenchRow {
                arch,
                d_in,
                d_sae,
                batch,
                tokens_per_s: tps,
                limit_tokens_per_s: limit,
                ratio: tps / limit,
                l0: l0_mean,
                threads: rayon::current_num_threads(),
                precision,
            });
        }
    }
    rows
}

/// One configuration (family and width) timed at each of several L0s, in every round.
#[derive(Clone, Debug)]
pub struct L0Comparison {
    pub arch: ArchKind,
    pub d_sae: usize,
    /// The L0s the benchmark SAEs were set up for; the first is the one the others are
    /// compared with.
    pub l0s: Vec<usize>,
    /// Tokens/s per round, one per L0 (`tokens[round][i]` at `l0s[i]`).
    pub tokens: Vec<Vec<f64>>,
}

impl L0Comparison {
    /// The best tokens/s over the rounds at `l0s[i]`.
    pub fn best(&self, i: usize) -> f64 {
        self.tokens.iter().map(|r| r[i]).fold(0.0, f64::max)
    }

    /// Best at `l0s[i]` against best at `l0s[0]`: both at a quiet moment of a shared host.
    pub fn best_ratio(&self, i: usize) -> f64 {
        self.best(i) / self.best(0)
    }

    /// Each round's tokens/s at `l0s[i]` against the same round's at `l0s[0]`.
    pub fn round_ratios(&self, i: usize) -> Vec<f64> {
        self.tokens.iter().map(|r| r[i] / r[0]).collect()
    }
}

/// `rounds` rounds of [`run_bench_in`] at every L0 of `l0s`: each family and width at one L0
/// right after the other (the L0s in turn reversed from round to round, so that neither
/// always runs first), every row reported to `report` with its round (from 1) and L0 as it
/// is done. Returns each family and width's tokens/s by round and L0.
#[allow(clippy::too_many_arguments)]
pub fn run_l0_rounds(
    archs: &[ArchKind],
    d_sae_list: &[usize],
    d_in: usize,
    batch: usize,
    steps: usize,
    l0s: &[usize],
    precision: Precision,
    rounds: usize,
    mut report: impl FnMut(usize, usize, &BenchRow),
) -> Vec<L0Comparison> {
    let mut out: Vec<L0Comparison> = d_sae_list
        .iter()
        .flat_map(|&d_sae| {
            archs.iter().map(move |&arch| L0Comparison {
                arch,
                d_sae,
                l0s: l0s.to_vec(),
                tokens: Vec::new(),
            })
        })
        .collect();
    for round in 0..rounds.max(1) {
        for cmp in out.iter_mut() {
            let mut tokens = vec![0.0; l0s.len()];
            let order: Vec<usize> = match round % 2 {
                0 => (0..l0s.len()).collect(),
                _ => (0..l0s.len()).rev().collect(),
            };
            for i in order {
                let (arch, d_sae) = ([cmp.arch], [cmp.d_sae]);
                for row in run_bench_in(&arch, &d_sae, d_in, batch, steps, l0s[i], precision) {
                    report(round + 1, l0s[i], &row);
                    tokens[i] = row.tokens_per_s;
                }
            }
            cmp.tokens.push(tokens);
        }
    }
    out
}
