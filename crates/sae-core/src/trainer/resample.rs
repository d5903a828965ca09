//! Dead-latent resampling: Bricken et al. 2023 ("Towards Monosemanticity", Neuron
//! Resampling), as the Gated SAE paper (Rajamanoharan et al. 2024, App. D.1.1) used it for
//! both its ReLU and Gated SAEs. It runs only at the steps the caller schedules; the training
//! step does not look at it.
//!
//! At a resampling:
//! 1. Dead latents are those that have not fired in `window` tokens (the trainer's counters).
//! 2. The current SAE's squared reconstruction error `||x_b - x_hat_b||^2` is computed on the
//!    caller's sample; each row is drawn with probability proportional to the square of that
//!    loss. Draws are without replacement (Efraimidis-Spirakis keys), so two dead latents do
//!    not get the same direction; the paper is silent here, and the public reimplementations
//!    (`torch.multinomial` without replacement) do the same. Only if there are more dead latents
//!    than rows with a non-zero loss does a row serve again, in the same drawn order.
//! 3. Latent `j`'s decoder row becomes the drawn input, centred by `b_dec` when the encoder
//!    sees `x - b_dec` (so the direction is the one the encoder and decoder work in), scaled
//!    to unit norm; its encoder row the same direction times 0.2 times the mean encoder-row
//!    norm of the latents that are alive (all latents when none is: the paper is silent).
//! 4. Its encoder bias becomes 0. Gated: `b_gate` is that bias; `r_mag` becomes 0, so that
//!    `W_mag = W_gate` along the new direction as at initialisation, and `b_mag` becomes 0 like
//!    the gate bias, so the resampled latent starts as a plain ReLU latent on the new direction.
//! 5. Adam's moments of every changed row and entry are zeroed, its lazy-decay step is set to
//!    now, and its dead counter to 0 (it starts a fresh window).
//!
//! Adam's bias correction is global (step `t`), so a moment restarted from zero makes the
//! first updates of a resampled latent large; that is why the schedule drops the lr to 0.1x
//! and brings it back over the following steps (the caller's business).

use super::SaeTrainer;
use anyhow::bail;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Encoder-row norm of a resampled latent, relative to the mean of the alive latents.
pub const RESAMPLE_ENCODER_SCALE: f32 = 0.2;

/// What a resampling changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resampled {
    /// The dead latents that got new weights, ascending.
    pub latents: Vec<u32>,
    /// For each of them, the row of the sample its direction came from.
    pub rows: Vec<usize>,
}

impl SaeTrainer {
    /// Latents that have not fired in `window` tokens, ascending.
    pub fn dead_latents(&self, window: u64) -> Vec<u32> {
        (0..self.d_sae as u32)
            .filter(|&j| self.tokens_since_fired[j as usize] >= window)
            .collect()
    }

    /// `||x_b - x_hat_b||^2` of each of the `n` rows of `x` under the current weights.
    pub fn reconstruction_errors(&self, x: &[f32], n: usize) -> Vec<f64> {
        let d = self.d_in;
        assert_eq!(x.len(), n * d, "reconstruction_errors: x is not [n, d_in]");
        let sae = self.snapshot();
        let mut out = Vec::with_capacity(n);
        for chunk in x.chunks(4096 * d.max(1)) {
            let rows = chunk.len() / d.max(1);
            let x_hat = sae.decode(&sae.encode(chunk, rows));
            out.extend(chunk.chunks(d).zip(x_hat.chunks(d)).map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
            }));
        }
        out
    }

    /// Resamples the latents dead over `window` tokens from the `n` rows of `x` (`[n, d_in]`,
    /// at the training scale), as described in the module documentation. The draw is seeded
    /// by `(seed, stream)`: give the run's seed and the step, so that a resumed run draws the
    /// same rows. Live latents, `b_dec` and their optimiser state are not touched. Nothing
    /// changes when no sample row has a non-zero, finite loss.
    pub fn resample_dead(
        &mut self,
        window: u64,
        x: &[f32],
        n: usize,
        seed: u64,
        stream: u64,
    ) -> anyhow::Result<Resampled> {
        if !self.kind.family().resamplable() {
            bail!(
                "dead-latent resampling is defined for relu and gated SAEs, not {}",
                self.kind
            );
        }
        let d = self.d_in;
        assert_eq!(x.len(), n * d, "resample_dead: x is not [n, d_in]");
        let dead = self.dead_latents(window);
        if dead.is_empty() {
            return Ok(Resampled::default());
        }
        let centre = |row: &[f32], b_dec: &[f32], apply: bool| -> Vec<f32> {
            if apply {
                row.iter().zip(b_dec).map(|(v, b)| v - b).collect()
            } else {
                row.to_vec()
            }
        };
        let errors = self.reconstruction_errors(x, n);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        // Efraimidis-Spirakis: the k largest u^(1/w) are a weighted draw of k rows without
        // replacement; ln(u) / w orders the same way without underflow.
        let mut keyed: Vec<(f64, usize)> = Vec::with_capacity(n);
        for (b, &e) in errors.iter().enumerate() {
            let u: f64 = rng.gen::<f64>();
            let w = e * e;
            // A row equal to b_dec has no direction to give.
            let row = &x[b * d..(b + 1) * d];
            let norm2: f64 = if self.apply_b_dec_to_input {
                row.iter()
                    .zip(&self.b_dec)
                    .map(|(v, c)| ((v - c) as f64).powi(2))
                    .sum()
            } else {
                row.iter().map(|v| (*v as f64).powi(2)).sum()
            };
            if w > 0.0 && w.is_finite() && norm2 > 0.0 && norm2.is_finite() {
                keyed.push(((1.0 - u).ln() / w, b));
            }
        }
        // No row the SAE gets wrong (or none with a direction): nothing to point a latent at.
        if keyed.is_empty() {
            return Ok(Resampled::default());
        }
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));

        let is_dead = {
            let mut m = vec![false; self.d_sae];
            dead.iter().for_each(|&j| m[j as usize] = true);
            m
        };
        let norm = |r: &[f32]| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let rows = self.w_enc_t.chunks(d.max(1));
        let alive: Vec<f64> = rows
            .clone()
            .enumerate()
            .filter(|(j, _)| !is_dead[*j])
            .map(|(_, r)| norm(r))
            .collect();
        let mean_norm = if alive.is_empty() {
            rows.map(norm).sum::<f64>() / self.d_sae as f64
        } else {
            alive.iter().sum::<f64>() / alive.len() as f64
        };
        let enc_norm = RESAMPLE_ENCODER_SCALE as f64 * mean_norm;

        let mut out = Resampled::default();
        for (i, &j) in dead.iter().enumerate() {
            let b = keyed[i % keyed.len()].1;
            let v = centre(
                &x[b * d..(b + 1) * d],
                &self.b_dec,
                self.apply_b_dec_to_input,
            );
            let inv = 1.0 / norm(&v);
            let j_ = j as usize;
            let (lo, hi) = (j_ * d, (j_ + 1) * d);
            for ((dec, enc), vi) in self.w_dec[lo..hi]
                .iter_mut()
                .zip(&mut self.w_enc_t[lo..hi])
                .zip(&v)
            {
                let u = *vi as f64 * inv;
                *dec = u as f32;
                *enc = (u * enc_norm) as f32;
            }
            // b_enc, or b_gate, r_mag and b_mag (Gated): all start from 0.
            for p in self.params.iter_mut() {
                p[j_] = 0.0;
            }
            for m in [&mut self.mom_enc, &mut self.mom_dec] {
                m.v[lo..hi].fill(0.0);
                m.m_row(lo, d).fill(0.0);
            }
            for m in self.mom_params.iter_mut() {
                m.v[j_] = 0.0;
                m.m_row(j_, 1).fill(0.0);
            }
            self.last_update[j_] = self.steps;
            self.tokens_since_fired[j_] = 0;
            out.latents.push(j);
            out.rows.push(b);
        }
        Ok(out)
    }
}
