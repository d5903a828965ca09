//! Synthetic activations with known ground-truth features: each row is a sparse non-negative
//! combination of unit directions plus Gaussian noise.

use crate::writer::{Manifest, ShardWriter, StoreDtype};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

/// File holding the true directions, tensor `features` `[n_features, d_in]`.
pub const TRUE_FEATURES_FILE: &str = "true_features.safetensors";
pub const TRUE_FEATURES_TENSOR: &str = "features";

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SynthConfig {
    pub d_in: usize,
    pub n_features: usize,
    pub n_tokens: usize,
    /// Mean number of active features per row (each feature fires with prob l0 / n_features).
    pub l0: f64,
    /// Standard deviation of the per-dimension Gaussian noise.
    pub noise: f32,
    pub seed: u64,
    pub rows_per_shard: usize,
    pub dtype: StoreDtype,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            d_in: 64,
            n_features: 256,
            n_tokens: 200_000,
            l0: 5.0,
            noise: 0.01,
            seed: 0,
            rows_per_shard: 65_536,
            dtype: StoreDtype::F32,
        }
    }
}

impl SynthConfig {
    /// Refuses sizes and rates that make no set, or one that cannot be built in memory; the
    /// messages name the `sae synth` flag of each field.
    pub fn validate(&self) -> Result<()> {
        for (flag, v) in [
            ("--d-in", self.d_in),
            ("--n-features", self.n_features),
            ("--n-tokens", self.n_tokens),
            ("--rows-per-shard", self.rows_per_shard),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        if !(self.l0 > 0.0 && self.l0 <= self.n_features as f64) {
            bail!(
                "--l0 {} is out of range: the mean number of active features per row must be \
                 above 0 and at most --n-features ({})",
                self.l0,
                self.n_features
            );
        }
        if !(self.noise >= 0.0 && self.noise.is_finite()) {
            bail!(
                "--noise {} is out of range: the noise standard deviation must be a finite \
                 number, 0 or more",
                self.noise
            );
        }
        let stored = match self.dtype {
            StoreDtype::F32 => 4,
            StoreDtype::Bf16 => 2,
        };
        if sae_output::product(&[self.n_tokens, self.d_in, stored]).is_none() {
            bail!(
                "--n-tokens {} of --d-in {} is more than 2^64 bytes; ask for fewer tokens",
                self.n_tokens,
                self.d_in
            );
        }
        // The directions and their serialized copy, one sampled chunk and the shard being
        // written are in memory together.
        let features = sae_output::product(&[self.n_features, self.d_in, 4, 2]);
        let chunk = sae_output::product(&[SAMPLE_CHUNK.min(self.n_tokens), self.d_in, 4]);
        let shard = crate::writer::shard_buffer_bytes(
            self.d_in,
            self.rows_per_shard.min(self.n_tokens),
            self.dtype,
            false,
            false,
        );
        let need = [features, chunk, shard]
            .into_iter()
            .try_fold(0u64, |acc, b| acc.checked_add(b?));
        sae_output::ensure_memory(
            need,
            &format!(
                "a synthetic set of --d-in {} with --n-features {} and --rows-per-shard {}",
                self.d_in,
                self.n_features,
                self.rows_per_shard.min(self.n_tokens)
            ),
            "lower --d-in, --n-features or --rows-per-shard",
        )?;
        Ok(())
    }
}

/// Rows sampled at a time.
const SAMPLE_CHUNK: usize = 4096;

/// Feature magnitudes are uniform in this range: clearly present when active.
const MAG_RANGE: std::ops::Range<f32> = 0.5..1.5;

/// Unit-norm Gaussian directions `[n, d]`.
pub fn random_directions(rng: &mut ChaCha8Rng, n: usize, d: usize) -> Vec<f32> {
    let mut dirs: Vec<f32> = (0..n * d).map(|_| StandardNormal.sample(rng)).collect();
    for r in dirs.chunks_mut(d) {
        let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= norm);
    }
    dirs
}

/// Rows `[n, d_in]` from `dirs`; deterministic for the rng state.
pub fn sample_rows(rng: &mut ChaCha8Rng, dirs: &[f32], cfg: &SynthConfig, n: usize) -> Vec<f32> {
    let d = cfg.d_in;
    let p = (cfg.l0 / cfg.n_features as f64).min(1.0);
    let mut x = vec![0.0f32; n * d];
    for row in x.chunks_mut(d) {
        for f in 0..cfg.n_features {
            if rng.gen::<f64>() < p {
                let c = rng.gen_range(MAG_RANGE);
                for (v, u) in row.iter_mut().zip(&dirs[f * d..(f + 1) * d]) {
                    *v += c * u;
                }
            }
        }
        if cfg.noise > 0.0 {
            for v in row.iter_mut() {
                let z: f32 = StandardNormal.sample(rng);
                *v += cfg.noise * z;
            }
        }
    }
    x
}

/// Writes the set into `out` (which must not exist yet): shards + manifest + true features.
/// Everything goes to a temporary sibling first and is renamed into place at the end.
pub fn write_synthetic(out: &Path, cfg: &SynthConfig) -> Result<Manifest> {
    cfg.validate()?;
    if out.exists() {
        bail!(
            "{} already exists; choose another --out or delete it",
            out.display()
        );
    }
    let name = out
        .file_name()
        .with_context(|| format!("{}: not a directory name", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let stored = match cfg.dtype {
        StoreDtype::F32 => 4,
        StoreDtype::Bf16 => 2,
    };
    let size = |parts: &[usize]| sae_output::product(parts).unwrap_or(u64::MAX);
    let need = size(&[cfg.n_tokens, cfg.d_in, stored]).saturating_add(size(&[
        cfg.n_features,
        cfg.d_in,
        4,
    ]));
    sae_output::ensure_space(
        parent,
        need,
        &format!("--n-tokens {} of --d-in {}", cfg.n_tokens, cfg.d_in),
        "ask for fewer tokens or choose another --out",
    )?;
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = write_into(&tmp, cfg).and_then(|m| {
        std::fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
        Ok(m)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_into(dir: &Path, cfg: &SynthConfig) -> Result<Manifest> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let dirs = random_directions(&mut rng, cfg.n_features, cfg.d_in);
    let template = Manifest {
        model: "synthetic".into(),
        hook: "synthetic".into(),
        d_in: cfg.d_in,
        context_size: 0,
        n_tokens: 0,
        corpus: format!(
            "synthetic: d_in={} n_features={} l0={} noise={} seed={}",
            cfg.d_in, cfg.n_features, cfg.l0, cfg.noise, cfg.seed
        ),
        dtype: cfg.dtype,
        shards: Vec::new(),
        complete: false,
        target_tokens: cfg.n_tokens,
        bos_excluded: false,
        has_tokens: false,
        compute: None,
        grads: None,
    };
    let mut w = ShardWriter::open(dir, template, cfg.rows_per_shard)?;
    let chunk = SAMPLE_CHUNK;
    let mut done = 0;
    while done < cfg.n_tokens {
        let n = chunk.min(cfg.n_tokens - done);
        let rows = sample_rows(&mut rng, &dirs, cfg, n);
        w.push(&rows, &[], &[])?;
        done += n;
    }
    let manifest = w.finish()?;
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![cfg.n_features, cfg.d_in],
        bytemuck::cast_slice(&dirs),
    )?;
    let meta = [("synth_config".to_string(), serde_json::to_string(cfg)?)]
        .into_iter()
        .collect();
    let bytes = safetensors::serialize(vec![(TRUE_FEATURES_TENSOR, view)], Some(meta))?;
    let path = dir.join(TRUE_FEATURES_FILE);
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(manifest)
}

/// Reads `true_features.safetensors` from a synthetic set (or the file itself):
/// `(features [n, d_in], n, d_in)`.
pub fn read_true_features(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let file = if path.is_dir() {
        path.join(TRUE_FEATURES_FILE)
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", file.display()))?;
    let t = st
        .tensor(TRUE_FEATURES_TENSOR)
        .map_err(|_| anyhow::anyhow!("{}: no tensor '{TRUE_FEATURES_TENSOR}'", file.display()))?;
    if t.dtype() != safetensors::Dtype::F32 || t.shape().len() != 2 {
        bail!(
            "{}: '{TRUE_FEATURES_TENSOR}' must be a 2-D F32 tensor",
            file.display()
        );
    }
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((v, t.shape()[0], t.shape()[1]))
}
