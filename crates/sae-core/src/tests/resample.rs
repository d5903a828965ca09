//! Dead-latent resampling: exactly the dead latents change, as Bricken et al. specify, and
//! everything else keeps its bits.

use super::{randn, random_sae};
use crate::trainer::RESAMPLE_ENCODER_SCALE;
use crate::{ArchKind, Sae, SaeTrainer, TrainHyper};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

const D_IN: usize = 8;
const D_SAE: usize = 16;
const N: usize = 32;
const STEPS: u64 = 4;
/// Latents whose encoder bias keeps them from ever firing.
const SILENCED: [usize; 3] = [3, 7, 11];
/// Sample rows scaled up so that their loss dwarfs the others'.
const LOUD_ROWS: usize = 16;

/// Every tensor of the optimiser state file, as f32 (the counters as i64 -> f32 would lose
/// nothing at these sizes, but they are kept apart).
fn state(t: &SaeTrainer) -> (HashMap<String, Vec<f32>>, HashMap<String, Vec<i64>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    t.save_state(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (mut f, mut i) = (HashMap::new(), HashMap::new());
    for (name, view) in st.tensors() {
        match view.dtype() {
            safetensors::Dtype::F32 => {
                let v = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                f.insert(name, v);
            }
            _ => {
                let v = view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                i.insert(name, v);
            }
        }
    }
    (f, i)
}

fn enc_col(sae: &Sae, j: usize) -> Vec<f32> {
    (0..sae.d_in)
        .map(|i| sae.w_enc[i * sae.d_sae + j])
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// A trainer with momentum (so both Adam moments exist) after one step on spread-out inputs,
/// in which most latents fire and get optimiser state, and then `STEPS` steps on inputs at
/// `b_dec`, where only latents with a positive encoder bias fire: the others die with
/// non-zero moments, which a resampling must clear.
fn trained(arch: ArchKind) -> SaeTrainer {
    let mut sae = random_sae(arch, D_IN, D_SAE, 4, 21);
    for j in SILENCED {
        sae.params[0][j] = -0.5;
    }
    let at_b_dec: Vec<f32> = sae.b_dec.repeat(N);
    let hyper = TrainHyper {
        adam_beta1: 0.9,
        ..TrainHyper::default()
    };
    let mut t = SaeTrainer::new(sae, hyper);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut spread = randn(&mut rng, N * D_IN);
    spread.iter_mut().for_each(|v| *v *= 10.0);
    assert!(t.step(&spread, N, 1e-3, 0.05).loss.is_finite());
    for _ in 0..STEPS {
        assert!(t.step(&at_b_dec, N, 1e-3, 0.05).loss.is_finite());
    }
    t
}

fn sample() -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut x = randn(&mut rng, 64 * D_IN);
    x[..LOUD_ROWS * D_IN].iter_mut().for_each(|v| *v *= 30.0);
    x
}

#[test]
fn resampling_sets_exactly_the_dead_latents_and_keeps_the_rest() {
    for arch in [ArchKind::RELU, ArchKind::GATED] {
        let mut t = trained(arch);
        let window = STEPS * N as u64;
        let dead = t.dead_latents(window);
        for j in SILENCED {
            assert!(
                dead.contains(&(j as u32)),
                "{arch}: latent {j} should be dead"
            );
        }
        assert!(
            dead.len() < D_SAE && dead.len() <= LOUD_ROWS,
            "{arch}: {dead:?}"
        );
        let before = t.snapshot();
        let (fb, ib) = state(&t);
        let x = sample();
        let r = t.resample_dead(window, &x, 64, 5, 9).unwrap();
        assert_eq!(r.latents, dead, "{arch}");
        let after = t.snapshot();
        let (fa, ia) = state(&t);

        // Drawn by loss^2: the loud rows (loss ~900x) take every draw, each once.
        let mut rows = r.rows.clone();
        rows.sort();
        rows.dedup();
        assert_eq!(rows.len(), r.rows.len(), "{arch}: a row was drawn twice");
        assert!(
            r.rows.iter().all(|&b| b < LOUD_ROWS),
            "{arch}: {:?}",
            r.rows
        );

        assert_eq!(before.b_dec, after.b_dec);
        let alive_mean = (0..D_SAE)
            .filter(|j| !dead.contains(&(*j as u32)))
            .map(|j| norm(&enc_col(&before, j)))
            .sum::<f64>()
            / (D_SAE - dead.len()) as f64;
        let dec = |s: &Sae, j: usize| s.w_dec[j * D_IN..(j + 1) * D_IN].to_vec();
        let per_latent: Vec<(&str, &Vec<f32>, &Vec<f32>)> = arch
            .family()
            .latent_params()
            .iter()
            .zip(before.params.iter().zip(&after.params))
            .map(|(p, (b, a))| (p.name, b, a))
            .collect();
        for j in 0..D_SAE {
            let Some(pos) = r.latents.iter().position(|&l| l as usize == j) else {
                // A live latent: every bit as before, weights and optimiser state.
                assert_eq!(dec(&before, j), dec(&after, j), "{arch} {j}");
                assert_eq!(enc_col(&before, j), enc_col(&after, j), "{arch} {j}");
                for (name, b, a) in &per_latent {
                    assert_eq!(b[j].to_bits(), a[j].to_bits(), "{arch} {name} {j}");
                }
                continue;
            };
            let b = r.rows[pos];
            let centred: Vec<f32> = x[b * D_IN..(b + 1) * D_IN]
                .iter()
                .zip(&before.b_dec)
                .map(|(v, c)| v - c)
                .collect();
            let d = dec(&after, j);
            assert!(
                (norm(&d) - 1.0).abs() < 1e-6,
                "{arch} {j}: |d| = {}",
                norm(&d)
            );
            let cos = d
                .iter()
                .zip(&centred)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
                / norm(&centred);
            assert!(cos > 1.0 - 1e-6, "{arch} {j}: cos = {cos}");
            let e = enc_col(&after, j);
            let want = RESAMPLE_ENCODER_SCALE as f64 * alive_mean;
            assert!(
                (norm(&e) - want).abs() < 1e-5 * want,
                "{arch} {j}: |e| = {}, want {want}",
                norm(&e)
            );
            for (ei, di) in e.iter().zip(&d) {
                assert!((*ei as f64 - *di as f64 * want).abs() < 1e-6, "{arch} {j}");
            }
            for (name, _, a) in &per_latent {
                assert_eq!(a[j], 0.0, "{arch} {name} {j}");
            }
        }

        // Optimiser state: the resampled rows and entries are zero, everything else unchanged.
        for (name, vb) in &fb {
            let va = &fa[name];
            let width = if name.starts_with("W_") { D_IN } else { 1 };
            if name.starts_with("b_dec") {
                assert_eq!(vb, va, "{arch} {name}");
                continue;
            }
            for j in 0..D_SAE {
                let (ob, oa) = (
                    &vb[j * width..(j + 1) * width],
                    &va[j * width..(j + 1) * width],
                );
                if r.latents.contains(&(j as u32)) {
                    assert!(
                        ob.iter().any(|v| *v != 0.0),
                        "{arch} {name} {j} had no state"
                    );
                    assert!(oa.iter().all(|v| *v == 0.0), "{arch} {name} {j}: {oa:?}");
                } else {
                    assert_eq!(ob, oa, "{arch} {name} {j}");
                }
            }
        }
        for j in 0..D_SAE {
            let resampled = r.latents.contains(&(j as u32));
            let (lu, tf) = (ia["last_update"][j], ia["tokens_since_fired"][j]);
            if resampled {
                assert_eq!((lu, tf), (STEPS as i64 + 1, 0), "{arch} {j}");
            } else {
                assert_eq!(lu, ib["last_update"][j], "{arch} {j}");
                assert_eq!(tf, ib["tokens_since_fired"][j], "{arch} {j}");
            }
        }
        assert!(t.dead_latents(window).is_empty());

        // The same state and seed draw the same rows.
        let mut again = trained(arch);
        assert_eq!(again.resample_dead(window, &x, 64, 5, 9).unwrap(), r);
        // And training goes on from the new weights.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let s = t.step(&randn(&mut rng, N * D_IN), N, 1e-4, 0.05);
        assert!(s.loss.is_finite());
    }
}

#[test]
fn nothing_dead_changes_nothing_and_other_architectures_refuse() {
    let mut t = trained(ArchKind::RELU);
    let before = t.snapshot();
    let r = t.resample_dead(u64::MAX, &sample(), 64, 5, 9).unwrap();
    assert!(r.latents.is_empty());
    let after = t.snapshot();
    assert_eq!(before.w_dec, after.w_dec);
    assert_eq!(before.w_enc, after.w_enc);

    // Dead latents, but every sample row equals b_dec: no direction to give them.
    let mut t = trained(ArchKind::RELU);
    let b_dec = t.snapshot().b_dec;
    let dead = t.dead_latents(STEPS * N as u64);
    assert!(!dead.is_empty());
    let r = t
        .resample_dead(STEPS * N as u64, &b_dec.repeat(4), 4, 5, 9)
        .unwrap();
    assert!(r.latents.is_empty());
    assert_eq!(t.dead_latents(STEPS * N as u64), dead);

    let sae = random_sae(ArchKind::TOPK, D_IN, D_SAE, 4, 3);
    let mut t = SaeTrainer::new(sae, TrainHyper::default());
    let e = t.resample_dead(0, &sample(), 64, 5, 9).unwrap_err();
    assert!(e.to_string().contains("relu and gated"), "{e}");
}

/// Rows are drawn with probability proportional to the square of their loss: over many
/// seeds, a row with about 9x the loss of the other is drawn first at the rate of e^2, not e.
#[test]
fn draws_follow_the_square_of_the_loss() {
    let sae = random_sae(ArchKind::RELU, D_IN, D_SAE, 4, 3);
    let hyper = TrainHyper {
        // Every latent counts as dead from the start.
        dead_window_tokens: 0,
        ..TrainHyper::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let row = randn(&mut rng, D_IN);
    let mut x: Vec<f32> = row.iter().zip(&sae.b_dec).map(|(r, b)| b + r).collect();
    x.extend(row.iter().zip(&sae.b_dec).map(|(r, b)| b + 3.0 * r));
    let e = SaeTrainer::new(sae.clone(), hyper.clone()).reconstruction_errors(&x, 2);
    let p_sq = e[1].powi(2) / (e[0].powi(2) + e[1].powi(2));
    let p_lin = e[1] / (e[0] + e[1]);
    assert!(p_sq - p_lin > 0.05, "rows too alike: {e:?}");
    let trials = 600;
    let mut second = 0;
    for stream in 0..trials {
        let mut t = SaeTrainer::new(sae.clone(), hyper.clone());
        let r = t.resample_dead(0, &x, 2, 11, stream).unwrap();
        assert_eq!(r.latents.len(), D_SAE);
        second += (r.rows[0] == 1) as u32;
    }
    let n = trials as f64;
    let sd = (n * p_sq * (1.0 - p_sq)).sqrt();
    let got = second as f64;
    assert!(
        (got - n * p_sq).abs() < 4.0 * sd + 1.0,
        "row 1 drawn first {second} of {trials} times; loss^2 expects {:.1}, loss {:.1}",
        n * p_sq,
        n * p_lin
    );
}
