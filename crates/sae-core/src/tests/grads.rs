//! Fast gradients == dense reference == finite differences, for every architecture.

use super::reference::{grads, loss, RefCfg, RefParams};
use super::{input_grad, randn, random_sae, step_any};
use crate::arch::topk::AuxKOpts;
use crate::arch::TrainOpts;
use crate::{ArchKind, Sae, SaeTrainer, TrainHyper};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const D_IN: usize = 8;
const D_SAE: usize = 20;
const N: usize = 12;
const K: usize = 4;
/// JumpReLU's kernel width in these tests: wide, so that some entries fall inside it.
const BANDWIDTH: f32 = 0.3;

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

struct Case {
    cfg: RefCfg,
    params: RefParams,
    x: Vec<f64>,
    fast: crate::trainer::Grads,
    fast_loss: f64,
}

fn case(arch: ArchKind, dnorm: bool, seed: u64, dense: bool) -> Case {
    let sae = random_sae(arch, D_IN, D_SAE, K, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 10);
    let x = randn(&mut rng, N * D_IN);
    let hyper = TrainHyper {
        // Every latent counts as dead, so AuxK is exercised.
        dead_window_tokens: 0,
        // A wide kernel so that some JumpReLU entries fall inside it; each family reads its
        // own options.
        arch_opts: TrainOpts::from([
            ("bandwidth".to_string(), json!(BANDWIDTH)),
            ("k_aux".to_string(), json!(3)),
            ("decoder_norm_l1".to_string(), json!(dnorm)),
        ]),
        seed: 99,
        ..TrainHyper::default()
    };
    let lambda = 0.7f32;
    let mut trainer = SaeTrainer::new(sae.clone(), hyper.clone());
    trainer.set_dense_fraction(if dense { 0.0 } else { 2.0 });
    // The latent pass in tasks of 5 latents and blocks of 5 rows: uneven tasks, and each
    // latent's entries over three row blocks.
    trainer.set_latent_block(5);
    // Rules that select with the loss gradient get one, twice the stand-in's scale so that
    // it changes the selection.
    let grad: Vec<f32> = input_grad(&x).iter().map(|g| 2.0 * g).collect();
    let (stats, fast) = if trainer.needs_input_grad() {
        trainer.gradients_with_grad(&x, &grad, N, lambda)
    } else {
        trainer.gradients(&x, N, lambda)
    };
    // The parameters as trained: JumpReLU trains log(threshold); BatchTopK's threshold is
    // an inference estimate, not trained.
    let lat: Vec<Vec<f64>> = match arch.as_str() {
        "jumprelu" => vec![
            to64(sae.param("b_enc")),
            sae.param("threshold")
                .iter()
                .map(|t| (*t as f64).ln())
                .collect(),
        ],
        "batchtopk" | "matryoshka" | "mutualchoice" => vec![to64(sae.param("b_enc"))],
        _ => sae.params.iter().map(|p| to64(p)).collect(),
    };
    let mut w_enc_t = vec![0.0; D_IN * D_SAE];
    for i in 0..D_IN {
        for j in 0..D_SAE {
            w_enc_t[j * D_IN + i] = sae.w_enc[i * D_SAE + j] as f64;
        }
    }
    Case {
        cfg: RefCfg {
            arch,
            d_in: D_IN,
            d_sae: D_SAE,
            k: K,
            k_aux: 3,
            lambda: lambda as f64,
            alpha: AuxKOpts::default().aux_coeff as f64,
            bandwidth: BANDWIDTH as f64,
            dnorm,
            apply_b_dec: sae.apply_b_dec_to_input,
            dead: (0..D_SAE).collect(),
            widths: sae
                .settings
                .get("widths")
                .and_then(|w| serde_json::from_value(w.clone()).ok())
                .unwrap_or_default(),
            beta: sae
                .settings
                .get("beta")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0),
            noise_seed: hyper.seed,
            input_grad: to64(&grad),
        },
        params: RefParams {
            w_enc_t,
            w_dec: to64(&sae.w_dec),
            b_dec: to64(&sae.b_dec),
            lat,
        },
        x: to64(&x),
        fast,
        fast_loss: stats.loss,
    }
}

fn close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: {x} vs {y} (scale {scale})"
        );
    }
}

fn check_against_reference(arch: ArchKind, dnorm: bool) {
    for dense in [false, true] {
        check_path(arch, dnorm, dense);
    }
}

fn check_path(arch: ArchKind, dnorm: bool, dense: bool) {
    let arch_name = format!("{arch}{}", if dense { " (dense)" } else { "" });
    let arch = &arch_name;
    let kind: ArchKind = arch_name.split(' ').next().unwrap().parse().unwrap();
    let c = case(kind, dnorm, 7, dense);
    let r = grads(&c.cfg, &c.params, &c.x, N);
    let ref_loss = loss(&c.cfg, &c.params, &c.params, &c.x, N);
    assert!(
        (c.fast_loss - ref_loss).abs() < 1e-4 * ref_loss.abs().max(1.0),
        "{arch}: loss {} vs reference {ref_loss}",
        c.fast_loss
    );
    let tol = 2e-4;
    close(
        &format!("{arch} W_enc"),
        &to64(&c.fast.w_enc_t),
        &r.w_enc_t,
        tol,
    );
    close(
        &format!("{arch} W_dec"),
        &to64(&c.fast.w_dec),
        &r.w_dec,
        tol,
    );
    close(
        &format!("{arch} b_dec"),
        &to64(&c.fast.b_dec),
        &r.b_dec,
        tol,
    );
    for (k, (f, rr)) in c.fast.params.iter().zip(&r.lat).enumerate() {
        close(&format!("{arch} param {k}"), &to64(f), rr, tol);
    }
    // The gradients must not be trivially zero.
    // Matching pursuit's encoder is its dictionary: its gradient is all in W_dec.
    assert!(
        kind.as_str() == "mp" || r.w_enc_t.iter().any(|v| v.abs() > 1e-6),
        "{arch}: zero W_enc grad"
    );
    assert!(
        r.w_dec.iter().any(|v| v.abs() > 1e-6),
        "{arch}: zero W_dec grad"
    );
}

/// Central differences of the reference loss (stop-gradient copies held fixed).
fn check_finite_differences(arch: ArchKind, dnorm: bool) {
    let c = case(arch, dnorm, 11, false);
    let g = grads(&c.cfg, &c.params, &c.x, N);
    let h = 1e-6;
    let frozen = c.params.clone();
    let fd = |set: &dyn Fn(&mut RefParams, f64)| -> f64 {
        let mut p = c.params.clone();
        set(&mut p, h);
        let up = loss(&c.cfg, &p, &frozen, &c.x, N);
        let mut p = c.params.clone();
        set(&mut p, -h);
        let down = loss(&c.cfg, &p, &frozen, &c.x, N);
        (up - down) / (2.0 * h)
    };
    let mut checked = 0;
    let mut cmp = |what: String, num: f64, ana: f64| {
        assert!(
            (num - ana).abs() <= 1e-5 + 1e-4 * ana.abs(),
            "{arch} {what}: finite difference {num} vs analytic {ana}"
        );
        checked += 1;
    };
    for e in 0..c.params.w_enc_t.len() {
        cmp(
            format!("W_enc[{e}]"),
            fd(&|p, d| p.w_enc_t[e] += d),
            g.w_enc_t[e],
        );
    }
    for e in 0..c.params.w_dec.len() {
        cmp(
            format!("W_dec[{e}]"),
            fd(&|p, d| p.w_dec[e] += d),
            g.w_dec[e],
        );
    }
    for e in 0..D_IN {
        cmp(
            format!("b_dec[{e}]"),
            fd(&|p, d| p.b_dec[e] += d),
            g.b_dec[e],
        );
    }
    for k in 0..c.params.lat.len() {
        // The JumpReLU threshold has a pseudo-gradient (STE), not a true one.
        if arch == ArchKind::JUMPRELU && k == 1 {
            continue;
        }
        // GBA's bias is set outside gradient descent: the loss depends on it, the rule
        // gives it no gradient on purpose.
        if arch == ArchKind::GBA {
            continue;
        }
        for j in 0..D_SAE {
            cmp(
                format!("param{k}[{j}]"),
                fd(&|p, d| p.lat[k][j] += d),
                g.lat[k][j],
            );
        }
    }
    assert!(checked > 300);
}

#[test]
fn gated_gradients() {
    check_against_reference(ArchKind::GATED, false);
    check_finite_differences(ArchKind::GATED, false);
}

#[test]
fn relu_gradients() {
    check_against_reference(ArchKind::RELU, false);
    check_finite_differences(ArchKind::RELU, false);
}

#[test]
fn relu_decoder_norm_l1_gradients() {
    check_against_reference(ArchKind::RELU, true);
    check_finite_differences(ArchKind::RELU, true);
}

#[test]
fn topk_gradients() {
    check_against_reference(ArchKind::TOPK, false);
    check_finite_differences(ArchKind::TOPK, false);
}

#[test]
fn batchtopk_gradients() {
    check_against_reference(ArchKind::BATCHTOPK, false);
    check_finite_differences(ArchKind::BATCHTOPK, false);
}

#[test]
fn mutualchoice_gradients() {
    check_against_reference(ArchKind::MUTUALCHOICE, false);
    check_finite_differences(ArchKind::MUTUALCHOICE, false);
}

#[test]
fn featurechoice_gradients() {
    check_against_reference(ArchKind::FEATURECHOICE, false);
    check_finite_differences(ArchKind::FEATURECHOICE, false);
}

#[test]
fn gba_gradients() {
    check_against_reference(ArchKind::GBA, false);
    check_finite_differences(ArchKind::GBA, false);
}

#[test]
fn gsae_gradients() {
    check_against_reference(ArchKind::GSAE, false);
    check_finite_differences(ArchKind::GSAE, false);
    // The gradient term must change the selection here, or this is TopK's test again.
    let c = case(ArchKind::GSAE, false, 7, false);
    assert!(c.cfg.beta > 0.0);
    let topk_like = RefCfg {
        beta: 0.0,
        ..c.cfg.clone()
    };
    let with = loss(&c.cfg, &c.params, &c.params, &c.x, N);
    let without = loss(&topk_like, &c.params, &c.params, &c.x, N);
    assert!(
        (with - without).abs() > 1e-6 * with.abs(),
        "{with} vs {without}"
    );
}

#[test]
fn vsae_gradients() {
    check_against_reference(ArchKind::VSAE, false);
    check_finite_differences(ArchKind::VSAE, false);
    // The KL term must be on (beta > 0) and reach latents outside the selection.
    let c = case(ArchKind::VSAE, false, 7, false);
    assert!(c.cfg.beta > 0.0);
    let r = grads(&c.cfg, &c.params, &c.x, N);
    assert!(r.lat[0].iter().all(|v| v.abs() > 0.0));
}

#[test]
fn jumprelu_gradients() {
    check_against_reference(ArchKind::JUMPRELU, false);
    check_finite_differences(ArchKind::JUMPRELU, false);
    // The kernel window must actually have been hit, or the threshold test is vacuous.
    let c = case(ArchKind::JUMPRELU, false, 7, false);
    let r = grads(&c.cfg, &c.params, &c.x, N);
    assert!(r.lat[1].iter().filter(|v| v.abs() > 0.0).count() >= 3);
}

/// The SAE, batch and settings of the tests that run whole steps two ways: every latent
/// counts as dead (AuxK's entries in play).
fn steps_case(arch: ArchKind, precision: crate::bf16::Precision) -> (Sae, Vec<f32>, TrainHyper) {
    let sae = random_sae(arch, D_IN, D_SAE, K, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let x = randn(&mut rng, N * D_IN);
    let hyper = TrainHyper {
        dead_window_tokens: 0,
        precision,
        arch_opts: TrainOpts::from([("bandwidth".to_string(), json!(BANDWIDTH))]),
        ..TrainHyper::default()
    };
    (sae, x, hyper)
}

/// A full optimiser step gives the same weights on the dense and the sparse path.
#[test]
fn dense_and_sparse_steps_agree() {
    for arch in ArchKind::all() {
        let (sae, x, hyper) = steps_case(arch, crate::bf16::Precision::F32);
        let run = |fraction: f64| {
            let mut t = SaeTrainer::new(sae.clone(), hyper.clone());
            t.set_dense_fraction(fraction);
            for _ in 0..3 {
                step_any(&mut t, &x, N, 1e-2, 0.3);
            }
            t.snapshot()
        };
        let (a, b) = (run(0.0), run(2.0));
        let params = a.params.iter().zip(&b.params).map(|(u, v)| ("param", u, v));
        for (name, u, v) in [
            ("W_enc", &a.w_enc, &b.w_enc),
            ("W_dec", &a.w_dec, &b.w_dec),
            ("b_dec", &a.b_dec, &b.b_dec),
        ]
        .into_iter()
        .chain(params)
        {
            close(&format!("{arch} {name}"), &to64(u), &to64(v), 1e-3);
        }
    }
}

/// The decode in slices of latents (a decoder larger than `GATHER_SLICE_BYTES`), in blocks
/// of rows, gives the bits of one pass, for every family, with AuxK's dead latents in play,
/// in f32 and with bf16 gathers.
#[test]
fn sliced_decode_gives_the_bits_of_one_pass() {
    use crate::bf16::Precision;
    // Two blocks of two chunks of rows (`ROW_CHUNK`), the second one short.
    let n = 53;
    let x = randn(&mut ChaCha8Rng::seed_from_u64(16), n * D_IN);
    for precision in [Precision::F32, Precision::Bf16Sparse] {
        for arch in ArchKind::all() {
            let (sae, _, hyper) = steps_case(arch, precision);
            let run = |slice_bytes: usize| {
                let mut t = SaeTrainer::new(sae.clone(), hyper.clone());
                t.set_dense_fraction(2.0);
                t.set_gather_slice_bytes(slice_bytes);
                t.set_gather_row_block(32);
                let losses: Vec<u64> = (0..3)
                    .map(|_| step_any(&mut t, &x, n, 1e-2, 0.3).loss.to_bits())
                    .collect();
                (losses, t.snapshot())
            };
            // Three latents' rows of W_dec per slice: several slices, some uneven.
            let ((la, a), (lb, b)) = (run(0), run(3 * D_IN * 2));
            let what = format!("{arch}, {precision}");
            assert_eq!(la, lb, "{what}: losses");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.w_enc), bits(&b.w_enc), "{what}: W_enc");
            assert_eq!(bits(&a.w_dec), bits(&b.w_dec), "{what}: W_dec");
            assert_eq!(bits(&a.b_dec), bits(&b.b_dec), "{what}: b_dec");
            for (u, v) in a.params.iter().zip(&b.params) {
                assert_eq!(bits(u), bits(v), "{what}: per-latent parameters");
            }
        }
    }
}

#[test]
fn matryoshka_gradients() {
    let c = case(ArchKind::MATRYOSHKA, false, 7, false);
    assert_eq!(c.cfg.widths, vec![2, 10, 20], "three heads at d_sae 20");
    check_against_reference(ArchKind::MATRYOSHKA, false);
    check_finite_differences(ArchKind::MATRYOSHKA, false);
}

#[test]
fn mp_gradients() {
    check_against_reference(ArchKind::MP, false);
    check_finite_differences(ArchKind::MP, false);
    // Some rows must pick an atom twice or stop early for the test to cover those paths;
    // at least the pursuit must have run its k steps on most rows.
    let c = case(ArchKind::MP, false, 7, false);
    let picks = super::reference::mp_steps(&c.cfg, &c.params, &c.x, N);
    assert!(picks.iter().filter(|s| s.len() == K).count() > N / 2);
}
