//! SynthSAEBench: a synthetic "LLM-like" activation generator with known ground-truth
//! features (Chanin & Garriga-Alonso, SAELens `sae_lens/synthetic`), rebuilt natively.
//!
//! The deterministic parts (Zipf firing probabilities, the hierarchy forest, probability
//! compensation, mean magnitudes) follow the reference formulas exactly; the random parts
//! (directions, bias, magnitude spreads, copula factors, every sample) come from seeded
//! ChaCha streams, so they match the reference in distribution, not bit for bit.
//!
//! Every sample row is a pure function of (seed, row index): batches are generated in parallel
//! and a stream can be restarted at any row.

#![allow(clippy::needless_range_loop)]
// The AS 241 coefficients keep their published digits.
#![allow(clippy::excessive_precision)]

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

/// Name of the benchmark instance published as `decoderesearch/synth-sae-bench-16k-v2`.
pub const PRESET_16K: &str = "synthsaebench-16k";
/// A small instance with the same structure, for tests and quick runs.
pub const PRESET_SMALL: &str = "synthsaebench-small";
pub const PRESETS: [&str; 2] = [PRESET_16K, PRESET_SMALL];

/// Everything that defines a generator. Field names follow SAELens' `SyntheticModelConfig`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SynthBenchConfig {
    pub n_features: usize,
    pub d_in: usize,
    /// Zipf firing probabilities: p_i interpolates (i+1)^-exponent linearly onto [p_min, p_max].
    pub zipf_exponent: f64,
    pub p_max: f64,
    pub p_min: f64,
    /// Hierarchy forest: `n_roots` roots, each node `branching` children, depths 0..=max_depth.
    pub n_roots: usize,
    pub branching: usize,
    pub max_depth: usize,
    /// Whether every parent keeps at most one active child.
    pub mutually_exclusive: bool,
    /// Whether a child's value is scaled by its parent's value over the parent's mean.
    pub scale_children_by_parent: bool,
    /// Raise children's probabilities so their effective rates approach the base ones.
    pub compensate_probabilities: bool,
    /// Mean magnitude: linear from start (feature 0) to end (feature N-1).
    pub mean_magnitude_start: f32,
    pub mean_magnitude_end: f32,
    /// Magnitude std per feature: |mean + std * xi|, xi ~ N(0,1).
    pub std_magnitude_mean: f32,
    pub std_magnitude_std: f32,
    /// Gaussian copula with correlation F F^T + diag(1 - |F_i|^2), F ~ N(0, scale^2)^{N x rank}.
    pub correlation_rank: usize,
    pub correlation_scale: f32,
    /// Adam steps (and learning rate) that push the random directions apart.
    pub ortho_steps: usize,
    pub ortho_lr: f32,
    /// Norm of the constant bias added to every sample.
    pub bias_norm: f32,
    pub seed: u64,
}

impl SynthBenchConfig {
    /// SynthSAEBench-16k as built by `create_synth_bench_16k_model.py` (v2, child scaling on).
    pub fn synthsaebench_16k() -> Self {
        SynthBenchConfig {
            n_features: 16384,
            d_in: 768,
            zipf_exponent: 0.5,
            p_max: 0.4,
            p_min: 5e-4,
            n_roots: 128,
            branching: 4,
            max_depth: 3,
            mutually_exclusive: true,
            scale_children_by_parent: true,
            compensate_probabilities: true,
            mean_magnitude_start: 5.0,
            mean_magnitude_end: 4.0,
            std_magnitude_mean: 0.5,
            std_magnitude_std: 0.5,
            correlation_rank: 25,
            correlation_scale: 0.1,
            ortho_steps: 100,
            ortho_lr: 3e-4,
            bias_norm: 0.5,
            seed: 42,
        }
    }

    /// 1024 features in 64 dimensions: 16 roots, depths 0..=2 (336 hierarchy nodes).
    pub fn synthsaebench_small() -> Self {
        SynthBenchConfig {
            n_features: 1024,
            d_in: 64,
            n_roots: 16,
            max_depth: 2,
            correlation_rank: 8,
            ..Self::synthsaebench_16k()
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            PRESET_16K => Ok(Self::synthsaebench_16k()),
            PRESET_SMALL => Ok(Self::synthsaebench_small()),
            _ => bail!(
                "unknown synthetic benchmark '{name}': use one of {}",
                PRESETS.join(", ")
            ),
        }
    }

    /// Number of hierarchy nodes at each depth: n_roots * branching^depth.
    pub fn level_sizes(&self) -> Vec<usize> {
        (0..=self.max_depth)
            .map(|d| self.n_roots * self.branching.pow(d as u32))
            .collect()
    }

    pub fn validate(&self) -> Result<()> {
        if self.n_features == 0 || self.d_in == 0 {
            bail!("the synthetic benchmark needs at least one feature and one dimension");
        }
        if !(self.p_min > 0.0 && self.p_min <= self.p_max && self.p_max <= 1.0) {
            bail!(
                "firing probabilities need 0 < p_min <= p_max <= 1 (got {} and {})",
                self.p_min,
                self.p_max
            );
        }
        if self.n_roots > 0 && self.branching == 0 && self.max_depth > 0 {
            bail!("a hierarchy deeper than its roots needs a branching factor of at least 1");
        }
        let nodes: usize = self.level_sizes().iter().sum();
        if nodes > self.n_features {
            bail!(
                "the hierarchy has {nodes} nodes but there are only {} features",
                self.n_features
            );
        }
        if self.correlation_rank == 0 {
            bail!("the correlation rank must be at least 1");
        }
        if !(self.bias_norm >= 0.0 && self.bias_norm.is_finite()) {
            bail!("the bias norm must be finite and non-negative");
        }
        Ok(())
    }
}

/// Stream ids of the construction RNGs (one ChaCha stream each, all keyed by the seed).
const STREAM_DIRECTIONS: u64 = 1;
const STREAM_STD_MAGNITUDES: u64 = 2;
const STREAM_CORRELATION: u64 = 3;
/// Sample row `r` uses stream `r` under a key derived from the seed with this salt.
const SAMPLE_KEY_SALT: u64 = 0x5eed_5a4b_e4c4_0001;

/// A built generator: the ground truth and everything sampling needs.
pub struct SynthBench {
    pub cfg: SynthBenchConfig,
    /// Base Zipf probabilities p_i.
    pub p_base: Vec<f32>,
    /// Probabilities after hierarchy compensation (the marginal firing rates before the
    /// hierarchy step).
    pub p_fire: Vec<f32>,
    /// Firing thresholds on the latent standard Gaussians: Phi^-1(1 - p_fire).
    pub threshold: Vec<f32>,
    pub mean_magnitude: Vec<f32>,
    pub std_magnitude: Vec<f32>,
    /// Copula factor F, `[n_features, rank]`.
    pub corr_factor: Vec<f32>,
    /// F transposed, `[rank, n_features]`: F eps as `rank` contiguous axpys, which vectorise
    /// (a 25-long dot product per feature does not).
    corr_factor_t: Vec<f32>,
    /// sqrt(1 - |F_i|^2): the scale of each feature's own noise in its latent Gaussian.
    pub corr_sqrt_diag: Vec<f32>,
    /// Unit-norm feature directions, `[n_features, d_in]`.
    pub features: Vec<f32>,
    pub bias: Vec<f32>,
    /// Parent index of each feature, or `NO_PARENT`.
    pub parent: Vec<u32>,
    /// First index of each depth's block, plus the end of the hierarchy.
    pub level_starts: Vec<usize>,
    sample_key: [u8; 32],
}

pub const NO_PARENT: u32 = u32::MAX;

/// Reusable per-thread buffers for generating rows.
pub struct RowScratch {
    pub dense: Vec<f32>,
    pub active: Vec<u32>,
    /// The shared part F eps of the latent Gaussians.
    shared: Vec<f32>,
    /// The fired features of the hierarchy level being expanded, and of the next one.
    level: Vec<(u32, f32)>,
    next: Vec<(u32, f32)>,
}

/// One sample's non-zero true activations, ascending by feature.
pub type SparseActs = Vec<(u32, f32)>;

impl SynthBench {
    pub fn new(cfg: SynthBenchConfig) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.n_features;
        let p_base = zipf_probabilities(n, cfg.zipf_exponent, cfg.p_max, cfg.p_min);
        let (parent, level_starts) = hierarchy_topology(&cfg);
        let p_fire = if cfg.compensate_probabilities {
            compensated_probabilities(&p_base, &parent, &level_starts, cfg.branching)
        } else {
            p_base.clone()
        };
        let threshold = p_fire
            .iter()
            .map(|&p| -inverse_normal_cdf(p as f64) as f32)
            .collect();
        let mean_magnitude = linspace(cfg.mean_magnitude_start, cfg.mean_magnitude_end, n);
        let mut rng = construction_rng(cfg.seed, STREAM_STD_MAGNITUDES);
        let std_magnitude = (0..n)
            .map(|_| {
                let xi: f32 = StandardNormal.sample(&mut rng);
                (cfg.std_magnitude_mean + cfg.std_magnitude_std * xi).abs()
            })
            .collect();
        let (corr_factor, corr_sqrt_diag) =
            low_rank_correlation(n, cfg.correlation_rank, cfg.correlation_scale, cfg.seed);
        let rank = cfg.correlation_rank;
        let mut corr_factor_t = vec![0f32; n * rank];
        for i in 0..n {
            for r in 0..rank {
                corr_factor_t[r * n + i] = corr_factor[i * rank + r];
            }
        }
        let (features, bias) = directions_and_bias(&cfg);
        let mut key_rng = construction_rng(cfg.seed ^ SAMPLE_KEY_SALT, 0);
        let mut sample_key = [0u8; 32];
        key_rng.fill(&mut sample_key);
        Ok(SynthBench {
            cfg,
            p_base,
            p_fire,
            threshold,
            mean_magnitude,
            std_magnitude,
            corr_factor,
            corr_factor_t,
            corr_sqrt_diag,
            features,
            bias,
            parent,
            level_starts,
            sample_key,
        })
    }

    pub fn n_features(&self) -> usize {
        self.cfg.n_features
    }

    pub fn d_in(&self) -> usize {
        self.cfg.d_in
    }

    /// Children of feature `f` (a contiguous block), empty for leaves and free features.
    pub fn children(&self, f: usize) -> std::ops::Range<usize> {
        let depths = self.level_starts.len() - 1;
        for d in 0..depths.saturating_sub(1) {
            let (start, end) = (self.level_starts[d], self.level_starts[d + 1]);
            if (start..end).contains(&f) {
                let first = end + self.cfg.branching * (f - start);
                return first..first + self.cfg.branching;
            }
        }
        0..0
    }

    /// The RNG of sample row `row`: independent of how rows are split across threads.
    pub fn row_rng(&self, row: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::from_seed(self.sample_key);
        rng.set_stream(row);
        rng
    }

    pub fn scratch(&self) -> RowScratch {
        RowScratch {
            dense: vec![0.0; self.cfg.n_features],
            active: Vec::new(),
            shared: vec![0.0; self.cfg.n_features],
            level: Vec::new(),
            next: Vec::new(),
        }
    }

    /// F eps for a fresh eps ~ N(0, I_rank), into `shared`.
    fn shared_latent(&self, rng: &mut ChaCha8Rng, shared: &mut [f32]) {
        let n = self.cfg.n_features;
        shared.fill(0.0);
        for r in 0..self.cfg.correlation_rank {
            let e: f32 = StandardNormal.sample(rng);
            let col = &self.corr_factor_t[r * n..(r + 1) * n];
            shared.iter_mut().zip(col).for_each(|(z, f)| *z += e * f);
        }
    }

    /// The latent Gaussians z = F eps + sqrt(d) * eta of one sample (unit variance each),
    /// drawn exactly as `fire` draws them.
    pub fn latent_gaussians(&self, rng: &mut ChaCha8Rng, z: &mut [f32]) {
        self.shared_latent(rng, z);
        for (i, zi) in z.iter_mut().enumerate() {
            let own: f32 = StandardNormal.sample(rng);
            *zi += self.corr_sqrt_diag[i] * own;
        }
    }

    /// Steps 1-2 of a sample: which features fire (z_i > threshold_i) and their magnitudes
    /// ReLU(mu + sigma xi). Writes them into `s.dense` (zero on entry) and lists the fired
    /// features in `s.active`, ascending.
    pub fn fire(&self, rng: &mut ChaCha8Rng, s: &mut RowScratch) {
        self.shared_latent(rng, &mut s.shared);
        s.active.clear();
        for i in 0..self.cfg.n_features {
            let own: f32 = StandardNormal.sample(rng);
            if s.shared[i] + self.corr_sqrt_diag[i] * own > self.threshold[i] {
                let xi: f32 = StandardNormal.sample(rng);
                let a = (self.mean_magnitude[i] + self.std_magnitude[i] * xi).max(0.0);
                s.dense[i] = a;
                s.active.push(i as u32);
            }
        }
    }

    /// Step 3: the hierarchy. Processing fired features in ascending index order equals the
    /// reference's level-by-level pass: a feature's parent (smaller index) is final before the
    /// feature is scaled, and a parent's exclusive-child choice happens before any child is
    /// visited. Leaves `s.active` holding only the features still non-zero.
    pub fn apply_hierarchy(&self, rng: &mut ChaCha8Rng, s: &mut RowScratch) {
        let hierarchy_end = *self.level_starts.last().unwrap_or(&0);
        for pos in 0..s.active.len() {
            let f = s.active[pos] as usize;
            if f >= hierarchy_end {
                break;
            }
            if s.dense[f] <= 0.0 {
                continue;
            }
            let p = self.parent[f];
            if p != NO_PARENT {
                let ap = s.dense[p as usize];
                if ap <= 0.0 {
                    s.dense[f] = 0.0;
                    continue;
                }
                if self.cfg.scale_children_by_parent {
                    s.dense[f] *= ap / self.mean_magnitude[p as usize];
                }
            }
            if self.cfg.mutually_exclusive {
                let kids = self.children(f);
                let n_on = kids.clone().filter(|&c| s.dense[c] > 0.0).count();
                if n_on > 1 {
                    // A uniformly random survivor, as the reference's argmax of uniform scores.
                    let keep = rng.gen_range(0..n_on);
                    let mut k = 0;
                    for c in kids {
                        if s.dense[c] > 0.0 {
                            if k != keep {
                                s.dense[c] = 0.0;
                            }
                            k += 1;
                        }
                    }
                }
            }
        }
        // The reference's final ReLU: every value is already >= 0 (dropped ones are set to 0),
        // so only the zero entries leave the active list and the dense buffer stays clean.
        let dense = &s.dense;
        s.active.retain(|&f| dense[f as usize] > 0.0);
    }

    /// Feature `i`'s magnitude in this sample, 0 when it does not fire: its latent Gaussian
    /// `shared[i] + sqrt(d_i) eta` against its threshold, then ReLU(mu + sigma xi).
    fn draw(&self, i: usize, shared: &[f32], rng: &mut ChaCha8Rng) -> f32 {
        let own: f32 = StandardNormal.sample(rng);
        if shared[i] + self.corr_sqrt_diag[i] * own > self.threshold[i] {
            let xi: f32 = StandardNormal.sample(rng);
            (self.mean_magnitude[i] + self.std_magnitude[i] * xi).max(0.0)
        } else {
            0.0
        }
    }

    /// The true activations of sample `row`, ascending by feature.
    ///
    /// The same distribution as `fire` then `apply_hierarchy`, drawn level by level: a
    /// feature whose parent ends up inactive is zero whatever its own draw, and given the
    /// shared factor its draw is independent of every other feature's, so it is not drawn
    /// at all. That leaves about 5,700 of 16,384 latent Gaussians per row of the 16k preset
    /// (the roots, the features outside the hierarchy, and the children of active parents),
    /// where the two-step form draws every one plus a magnitude for each of the ~7,000 that
    /// fire before the hierarchy. The random stream differs from the two-step form's, so rows
    /// differ sample by sample, not in distribution (tested).
    pub fn sample_acts(&self, row: u64, s: &mut RowScratch, acts: &mut SparseActs) {
        let mut rng = self.row_rng(row);
        self.shared_latent(&mut rng, &mut s.shared);
        acts.clear();
        let hierarchy_end = *self.level_starts.last().unwrap_or(&0);
        let roots_end = self.level_starts.get(1).copied().unwrap_or(hierarchy_end);
        s.level.clear();
        for i in 0..roots_end {
            let a = self.draw(i, &s.shared, &mut rng);
            if a > 0.0 {
                s.level.push((i as u32, a));
            }
        }
        while !s.level.is_empty() {
            acts.extend_from_slice(&s.level);
            s.next.clear();
            for &(f, a) in &s.level {
                let kids = self.children(f as usize);
                if kids.is_empty() {
                    continue;
                }
                let first = s.next.len();
                for c in kids {
                    let v = self.draw(c, &s.shared, &mut rng);
                    if v > 0.0 {
                        s.next.push((c as u32, v));
                    }
                }
                let n_on = s.next.len() - first;
                if self.cfg.mutually_exclusive && n_on > 1 {
                    // A uniformly random survivor, as in `apply_hierarchy`.
                    let keep = first + rng.gen_range(0..n_on);
                    s.next[first] = s.next[keep];
                    s.next.truncate(first + 1);
                }
                if self.cfg.scale_children_by_parent {
                    let factor = a / self.mean_magnitude[f as usize];
                    s.next[first..].iter_mut().for_each(|(_, v)| *v *= factor);
                }
            }
            std::mem::swap(&mut s.level, &mut s.next);
        }
        for i in hierarchy_end..self.cfg.n_features {
            let a = self.draw(i, &s.shared, &mut rng);
            if a > 0.0 {
                acts.push((i as u32, a));
            }
        }
    }

    /// The two-step form of `sample_acts` (`fire`, then `apply_hierarchy`): every latent
    /// Gaussian drawn, as the reference does. Leaves the scratch zeroed.
    pub fn sample_acts_two_step(&self, row: u64, s: &mut RowScratch, acts: &mut SparseActs) {
        let mut rng = self.row_rng(row);
        self.fire(&mut rng, s);
        self.apply_hierarchy(&mut rng, s);
        acts.clear();
        for &f in &s.active {
            acts.push((f, s.dense[f as usize]));
            s.dense[f as usize] = 0.0;
        }
    }

    /// x = a W + b for sparse activations `acts`.
    pub fn embed(&self, acts: &SparseActs, x: &mut [f32]) {
        let d = self.cfg.d_in;
        x.copy_from_slice(&self.bias);
        for &(f, a) in acts {
            let v = &self.features[f as usize * d..(f as usize + 1) * d];
            x.iter_mut().zip(v).for_each(|(xi, vi)| *xi += a * vi);
        }
    }

    /// Rows `first_row..first_row + n` into `x` (`[n, d_in]`), in parallel; with `acts`,
    /// also each row's true activations.
    pub fn sample_batch(&self, first_row: u64, x: &mut [f32], acts: Option<&mut Vec<SparseActs>>) {
        let d = self.cfg.d_in;
        assert_eq!(x.len() % d, 0);
        let n = x.len() / d;
        match acts {
            Some(out) => {
                out.resize_with(n, Vec::new);
                x.par_chunks_mut(d)
                    .zip(out.par_iter_mut())
                    .enumerate()
                    .for_each_init(
                        || self.scratch(),
                        |s, (i, (xr, a))| {
                            self.sample_acts(first_row + i as u64, s, a);
                            self.embed(a, xr);
                        },
                    );
            }
            None => {
                x.par_chunks_mut(d).enumerate().for_each_init(
                    || (self.scratch(), Vec::new()),
                    |(s, a), (i, xr)| {
                        self.sample_acts(first_row + i as u64, s, a);
                        self.embed(a, xr);
                    },
                );
            }
        }
    }
}

fn construction_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// p_i = p_min + (p_max - p_min) (r_i - r_min) / (r_max - r_min), r_i = (i+1)^-exponent.
pub fn zipf_probabilities(n: usize, exponent: f64, p_max: f64, p_min: f64) -> Vec<f32> {
    let r = |i: usize| ((i + 1) as f64).powf(-exponent);
    let (r_max, r_min) = (r(0), r(n - 1));
    (0..n)
        .map(|i| {
            if n == 1 {
                p_max as f32
            } else {
                (p_min + (p_max - p_min) * (r(i) - r_min) / (r_max - r_min)) as f32
            }
        })
        .collect()
}

/// Breadth-first forest with consecutive indices: roots first, then each depth's block, the
/// children of node k (block start s) at next_start + branching * (k - s) + 0..branching.
/// Returns the parent of every feature and the start of each depth's block (plus the end).
pub fn hierarchy_topology(cfg: &SynthBenchConfig) -> (Vec<u32>, Vec<usize>) {
    let mut parent = vec![NO_PARENT; cfg.n_features];
    let sizes = cfg.level_sizes();
    let mut starts = vec![0usize];
    for s in &sizes {
        starts.push(starts.last().unwrap() + s);
    }
    if cfg.n_roots == 0 {
        return (parent, vec![0]);
    }
    for d in 1..sizes.len() {
        for (k, c) in (starts[d]..starts[d + 1]).enumerate() {
            parent[c] = (starts[d - 1] + k / cfg.branching) as u32;
        }
    }
    (parent, starts)
}

/// p~_i = min(p_i c_i, 1) with c_i = (1/p_P)(1 + (sum_{j in siblings incl. i} p_j - p_i)/p_P)
/// for children, 1 elsewhere; uses base probabilities throughout.
pub fn compensated_probabilities(
    p: &[f32],
    parent: &[u32],
    level_starts: &[usize],
    branching: usize,
) -> Vec<f32> {
    let end = *level_starts.last().unwrap_or(&0);
    let first_child = level_starts.get(1).copied().unwrap_or(end);
    (0..p.len())
        .map(|i| {
            if i < first_child || i >= end {
                return p[i];
            }
            let pp = p[parent[i] as usize] as f64;
            let block = first_child + (i - first_child) / branching * branching;
            let siblings: f64 = p[block..block + branching].iter().map(|&x| x as f64).sum();
            let c = (1.0 / pp) * (1.0 + (siblings - p[i] as f64) / pp);
            ((p[i] as f64 * c).min(1.0)) as f32
        })
        .collect()
}

/// torch.linspace(start, end, n).
fn linspace(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    (0..n)
        .map(|i| (start as f64 + (end as f64 - start as f64) * i as f64 / (n - 1) as f64) as f32)
        .collect()
}

/// F ~ N(0, scale^2) of shape `[n, rank]`, rows rescaled to |F_i|^2 = 0.99 when
/// 1 - |F_i|^2 < 0.01 (the reference's guard); returns F and sqrt(1 - |F_i|^2).
fn low_rank_correlation(n: usize, rank: usize, scale: f32, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = construction_rng(seed, STREAM_CORRELATION);
    let mut f: Vec<f32> = (0..n * rank)
        .map(|_| scale * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng))
        .collect();
    let sqrt_diag = f
        .chunks_mut(rank)
        .map(|row| {
            let norm2: f32 = row.iter().map(|v| v * v).sum();
            if 1.0 - norm2 < 0.01 {
                let s = (0.99 / norm2).sqrt();
                row.iter_mut().for_each(|v| *v *= s);
                0.01f32.sqrt()
            } else {
                (1.0 - norm2).sqrt()
            }
        })
        .collect();
    (f, sqrt_diag)
}

/// Random unit directions pushed apart by `ortho_steps` Adam steps, and the bias
/// bias_norm * g/|g| (drawn right after the directions, as in the reference).
fn directions_and_bias(cfg: &SynthBenchConfig) -> (Vec<f32>, Vec<f32>) {
    let (n, d) = (cfg.n_features, cfg.d_in);
    let mut rng = construction_rng(cfg.seed, STREAM_DIRECTIONS);
    let mut w: Vec<f32> = (0..n * d)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    sae_core::kernels::normalize_rows(&mut w, d);
    let g: Vec<f32> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
    let g_norm = g.iter().map(|v| v * v).sum::<f32>().sqrt();
    let bias = g.iter().map(|v| cfg.bias_norm * v / g_norm).collect();
    orthogonalize(&mut w, n, d, cfg.ortho_steps, cfg.ortho_lr);
    sae_core::kernels::normalize_rows(&mut w, d);
    (w, bias)
}

/// Loss of `orthogonalize`: sum_{i != j} (v_i.v_j)^2 + n sum_i (|v_i|^2 - 1)^2, computed the
/// same cheap way (via the d x d Gram matrix V^T V).
pub fn orthogonality_loss(v: &[f32], n: usize, d: usize) -> f64 {
    let mut gram = vec![0f32; d * d];
    sae_core::kernels::matmul_tn(v, n, d, v, d, &mut gram, false);
    // sum_{i,j} (v_i.v_j)^2 = |V V^T|_F^2 = |V^T V|_F^2.
    let all: f64 = gram.iter().map(|&g| (g as f64) * (g as f64)).sum();
    let norms: Vec<f64> = v
        .chunks(d)
        .map(|r| r.iter().map(|&x| x as f64 * x as f64).sum())
        .collect();
    let diag: f64 = norms.iter().map(|s| s * s).sum();
    let penalty: f64 = norms.iter().map(|s| (s - 1.0) * (s - 1.0)).sum();
    all - diag + n as f64 * penalty
}

/// Gradient of `orthogonality_loss`: 4 (V V^T - diag|v|^2) V + 4n diag(|v|^2 - 1) V. The
/// product (V V^T) V is computed as V (V^T V): exact, and 2 n d^2 flops instead of 2 n^2 d
/// (the n x n matrix of pairs is never formed). `gram` is `[d, d]` scratch.
pub fn orthogonality_grad(v: &[f32], n: usize, d: usize, gram: &mut [f32], grad: &mut [f32]) {
    sae_core::kernels::matmul_tn(v, n, d, v, d, gram, false);
    sae_core::kernels::matmul(v, n, d, gram, d, grad);
    grad.par_chunks_mut(d)
        .zip(v.par_chunks(d))
        .for_each(|(g, row)| {
            let norm2: f32 = row.iter().map(|x| x * x).sum();
            let self_coef = 4.0 * (n as f32 * (norm2 - 1.0) - norm2);
            g.iter_mut()
                .zip(row)
                .for_each(|(gk, vk)| *gk = 4.0 * *gk + self_coef * vk);
        });
}

/// Full-batch Adam (torch defaults: betas 0.9/0.999, eps 1e-8) on `orthogonality_loss`.
pub fn orthogonalize(v: &mut [f32], n: usize, d: usize, steps: usize, lr: f32) {
    let (beta1, beta2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let mut m = vec![0f32; n * d];
    let mut s = vec![0f32; n * d];
    let mut gram = vec![0f32; d * d];
    let mut grad = vec![0f32; n * d];
    for t in 1..=steps {
        orthogonality_grad(v, n, d, &mut gram, &mut grad);
        let step = (lr as f64 / (1.0 - (beta1 as f64).powi(t as i32))) as f32;
        let bc2_sqrt = (1.0 - (beta2 as f64).powi(t as i32)).sqrt() as f32;
        v.par_chunks_mut(d)
            .zip(grad.par_chunks(d))
            .zip(m.par_chunks_mut(d).zip(s.par_chunks_mut(d)))
            .for_each(|((row, g), (mr, sr))| {
                for k in 0..d {
                    mr[k] = beta1 * mr[k] + (1.0 - beta1) * g[k];
                    sr[k] = beta2 * sr[k] + (1.0 - beta2) * g[k] * g[k];
                    row[k] -= step * mr[k] / (sr[k].sqrt() / bc2_sqrt + eps);
                }
            });
    }
}

/// Phi^-1(p), the standard normal quantile, by Wichura's algorithm AS 241 (PPND16, relative
/// error about 1e-16).
pub fn inverse_normal_cdf(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180625 - q * q;
        return q * poly(&AS241_A, r) / poly(&AS241_B, r);
    }
    let r = if q < 0.0 { p } else { 1.0 - p };
    let r = (-r.ln()).sqrt();
    let val = if r <= 5.0 {
        let r = r - 1.6;
        poly(&AS241_C, r) / poly(&AS241_D, r)
    } else {
        let r = r - 5.0;
        poly(&AS241_E, r) / poly(&AS241_F, r)
    };
    if q < 0.0 {
        -val
    } else {
        val
    }
}

/// c[0] + c[1] x + ... by Horner's rule.
fn poly(c: &[f64; 8], x: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * x + k)
}

const AS241_A: [f64; 8] = [
    3.387_132_872_796_366_608,
    133.141_667_891_784_377_45,
    1_971.590_950_306_551_442_7,
    13_731.693_765_509_461_125,
    45_921.953_931_549_871_457,
    67_265.770_927_008_700_853,
    33_430.575_583_588_128_105,
    2_509.080_928_730_122_672_7,
];
const AS241_B: [f64; 8] = [
    1.0,
    42.313_330_701_600_911_252,
    687.187_007_492_057_908_3,
    5_394.196_021_424_751_107_7,
    21_213.794_301_586_595_867,
    39_307.895_800_092_710_61,
    28_729.085_735_721_942_674,
    5_226.495_278_852_854_561,
];
const AS241_C: [f64; 8] = [
    1.423_437_110_749_683_577_34,
    4.630_337_846_156_545_295_9,
    5.769_497_221_460_691_405_5,
    3.647_848_324_763_204_605_04,
    1.270_458_252_452_368_382_58,
    0.241_780_725_177_450_611_77,
    0.022_723_844_989_269_184_583_3,
    7.745_450_142_783_414_076_4e-4,
];
const AS241_D: [f64; 8] = [
    1.0,
    2.053_191_626_637_758_821_87,
    1.676_384_830_183_803_849_4,
    0.689_767_334_985_100_004_55,
    0.148_103_976_427_480_074_59,
    0.015_198_666_563_616_457_196_6,
    5.475_938_084_995_344_946e-4,
    1.050_750_071_644_416_843_24e-9,
];
const AS241_E: [f64; 8] = [
    6.657_904_643_501_103_777_2,
    5.463_784_911_164_114_369_9,
    1.784_826_539_917_291_335_8,
    0.296_560_571_828_504_891_23,
    0.026_532_189_526_576_123_093,
    0.001_242_660_947_388_078_438_6,
    2.711_555_568_743_487_578_15e-5,
    2.010_334_399_292_288_132_65e-7,
];
const AS241_F: [f64; 8] = [
    1.0,
    0.599_832_206_555_887_937_69,
    0.136_929_880_922_735_805_31,
    0.014_875_361_290_850_614_852_5,
    7.868_691_311_456_132_591e-4,
    1.846_318_317_510_054_681_8e-5,
    1.421_511_758_316_445_888_7e-7,
    2.044_263_103_389_939_785_64e-15,
];
