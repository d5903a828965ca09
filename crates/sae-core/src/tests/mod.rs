//! Tests of the fast kernels against the dense reference and finite differences, plus the
//! SAELens files, metrics and inference helpers.

mod files;
mod grads;
mod hugepage;
mod load_checks;
mod misc;
mod precision;
mod reference;
mod resample;

use crate::{ArchKind, Sae, SaeTrainer, StepStats};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub(crate) fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// A stand-in for a language model's loss gradient at each input row (for rules that select
/// with it): a fixed smooth function of the row, of the same size.
pub(crate) fn input_grad(x: &[f32]) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, v)| (1.7 * v + 0.3 * (i % 7) as f32).sin())
        .collect()
}

/// One optimiser step of any family: rules that select with the loss gradient get
/// `input_grad(x)`.
pub(crate) fn step_any(t: &mut SaeTrainer, x: &[f32], n: usize, lr: f32, coeff: f32) -> StepStats {
    if t.needs_input_grad() {
        t.step_with_grad(x, &input_grad(x), n, lr, coeff)
    } else {
        t.step(x, n, lr, coeff)
    }
}

/// A small SAE with every parameter moved away from its init, so gradients are generic.
pub(crate) fn random_sae(arch: ArchKind, d_in: usize, d_sae: usize, k: usize, seed: u64) -> Sae {
    let mut sae = Sae::init(arch, d_in, d_sae, k, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let mut jitter = |v: &mut Vec<f32>, s: f32| {
        for x in v.iter_mut() {
            *x += s * rng.sample::<f32, _>(StandardNormal);
        }
    };
    jitter(&mut sae.w_enc, 0.2);
    jitter(&mut sae.b_dec, 0.2);
    let names = arch.family().latent_params();
    for (p, v) in names.iter().zip(sae.params.iter_mut()) {
        match p.name {
            "threshold" => {}
            "r_mag" => jitter(v, 0.4),
            _ => jitter(v, 0.3),
        }
    }
    if arch.as_str() == "mp" {
        // Its encoder is its dictionary.
        for j in 0..d_sae {
            for i in 0..d_in {
                sae.w_enc[i * d_sae + j] = sae.w_dec[j * d_in + i];
            }
        }
    }
    if arch == ArchKind::JUMPRELU {
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 2);
        *sae.param_mut("threshold") = (0..d_sae).map(|_| rng.gen_range(0.05..0.6)).collect();
    }
    sae
}
