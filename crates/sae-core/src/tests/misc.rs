//! Trainer behaviour, inference helpers and metrics.

use super::{randn, random_sae, step_any};
use crate::metrics::{mmcs, ReconMetrics};
use crate::{ArchKind, Sae, SaeTrainer, SparseCode, TrainHyper};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Sparse non-negative combinations of `n_feat` random unit directions (+ small noise).
pub(super) fn synthetic(n: usize, d_in: usize, n_feat: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut dirs = randn(&mut rng, n_feat * d_in);
    for r in dirs.chunks_mut(d_in) {
        let nrm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        r.iter_mut().for_each(|v| *v /= nrm);
    }
    let mut x = vec![0.0f32; n * d_in];
    for row in x.chunks_mut(d_in) {
        for f in 0..n_feat {
            if rng.gen::<f32>() < 3.0 / n_feat as f32 {
                let c = rng.gen_range(0.5..2.0f32);
                for (v, d) in row.iter_mut().zip(&dirs[f * d_in..(f + 1) * d_in]) {
                    *v += c * d;
                }
            }
        }
        for v in row.iter_mut() {
            *v += 0.01 * rng.sample::<f32, _>(rand_distr::StandardNormal);
        }
    }
    (x, dirs)
}

fn row_norms(w: &[f32], d: usize) -> Vec<f32> {
    w.chunks(d)
        .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt())
        .collect()
}

#[test]
fn training_lowers_loss_and_keeps_unit_norm_decoder() {
    let (d_in, d_sae, n) = (16, 48, 256);
    let (x, _) = synthetic(n, d_in, 12, 3);
    // Training noise of a fixed standard deviation (1 for vSAE) drowns these rows (norm about
    // 2): rules with noise get them 4 times larger, and twice the steps.
    let x_scaled: Vec<f32> = x.iter().map(|v| 4.0 * v).collect();
    for arch in ArchKind::all() {
        let sae = Sae::init(arch, d_in, d_sae, 4, 5);
        let noisy = arch
            .family()
            .rule(&sae, &TrainHyper::default())
            .pre_noise()
            .is_some();
        let (x, steps) = if noisy { (&x_scaled, 120) } else { (&x, 60) };
        let mut tr = SaeTrainer::new(sae, TrainHyper::default());
        let lambda = if arch == ArchKind::JUMPRELU {
            1e-3
        } else {
            0.05
        };
        let first = step_any(&mut tr, x, n, 1e-3, lambda);
        let mut last = first.clone();
        for _ in 0..steps {
            last = step_any(&mut tr, x, n, 1e-3, lambda);
        }
        assert!(
            last.mse < 0.7 * first.mse,
            "{arch}: mse {} -> {}",
            first.mse,
            last.mse
        );
        assert_eq!(tr.steps_done(), steps + 1);
        let snap = tr.snapshot();
        for nrm in row_norms(&snap.w_dec, d_in) {
            assert!((nrm - 1.0).abs() < 1e-4, "{arch}: decoder row norm {nrm}");
        }
    }
}

#[test]
fn decoder_norm_l1_variant_has_no_norm_constraint() {
    let (d_in, d_sae, n) = (16, 32, 128);
    let (x, _) = synthetic(n, d_in, 10, 4);
    let hyper = TrainHyper {
        arch_opts: crate::arch::TrainOpts::from([(
            "decoder_norm_l1".to_string(),
            serde_json::json!(true),
        )]),
        ..TrainHyper::default()
    };
    let mut tr = SaeTrainer::new(Sae::init(ArchKind::RELU, d_in, d_sae, 0, 1), hyper);
    for _ in 0..20 {
        tr.step(&x, n, 1e-2, 0.1);
    }
    let norms = row_norms(&tr.snapshot().w_dec, d_in);
    assert!(norms.iter().any(|v| (v - 1.0).abs() > 1e-3));
}

#[test]
fn same_seed_same_bits() {
    let (d_in, d_sae, n) = (16, 40, 96);
    let (x, _) = synthetic(n, d_in, 10, 8);
    for arch in ArchKind::all() {
        let run = || {
            let mut tr =
                SaeTrainer::new(Sae::init(arch, d_in, d_sae, 3, 42), TrainHyper::default());
            for _ in 0..4 {
                step_any(&mut tr, &x, n, 1e-3, 0.01);
            }
            tr.snapshot()
        };
        assert_eq!(run(), run(), "{arch}");
    }
    assert_ne!(
        Sae::init(ArchKind::GATED, 8, 8, 0, 1).w_dec,
        Sae::init(ArchKind::GATED, 8, 8, 0, 2).w_dec
    );
}

#[test]
fn non_finite_loss_leaves_state_untouched() {
    let (d_in, d_sae, n) = (8, 16, 10);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut x = randn(&mut rng, n * d_in);
    let mut tr = SaeTrainer::new(
        random_sae(ArchKind::GATED, d_in, d_sae, 0, 3),
        TrainHyper::default(),
    );
    tr.step(&x, n, 1e-3, 0.1);
    let before = tr.snapshot();
    x[5] = f32::NAN;
    let st = tr.step(&x, n, 1e-3, 0.1);
    assert!(st.loss.is_nan());
    assert_eq!(tr.steps_done(), 1);
    assert_eq!(tr.snapshot(), before);
}

#[test]
fn resume_from_saved_state_is_exact() {
    let (d_in, d_sae, n) = (16, 40, 64);
    let (x, _) = synthetic(4 * n, d_in, 10, 9);
    let dir = tempfile::tempdir().unwrap();
    for arch in ArchKind::all() {
        let hyper = TrainHyper {
            dead_window_tokens: 128,
            ..TrainHyper::default()
        };
        let batch = |i: usize| &x[i * n * d_in..(i + 1) * n * d_in];
        let mut a = SaeTrainer::new(Sae::init(arch, d_in, d_sae, 3, 1), hyper.clone());
        step_any(&mut a, batch(0), n, 1e-3, 0.01);
        step_any(&mut a, batch(1), n, 1e-3, 0.01);
        let sae_dir = dir.path().join(format!("{arch}"));
        let state = dir.path().join(format!("{arch}.state.safetensors"));
        crate::saelens::save(&a.snapshot(), &sae_dir).unwrap();
        a.save_state(&state).unwrap();
        step_any(&mut a, batch(2), n, 1e-3, 0.01);
        step_any(&mut a, batch(3), n, 1e-3, 0.01);

        let mut b = SaeTrainer::new(crate::saelens::load(&sae_dir).unwrap(), hyper.clone());
        b.load_state(&state).unwrap();
        assert_eq!(b.steps_done(), 2);
        step_any(&mut b, batch(2), n, 1e-3, 0.01);
        step_any(&mut b, batch(3), n, 1e-3, 0.01);
        assert_eq!(a.snapshot(), b.snapshot(), "{arch}");
        assert_eq!(a.tokens_since_fired(), b.tokens_since_fired());

        // A state from another architecture is refused with a clear message.
        let other = if arch == ArchKind::RELU {
            ArchKind::GATED
        } else {
            ArchKind::RELU
        };
        let mut c = SaeTrainer::new(Sae::init(other, d_in, d_sae, 3, 1), hyper);
        let err = c.load_state(&state).unwrap_err().to_string();
        assert!(
            err.contains("state.safetensors") && err.contains("arch"),
            "{err}"
        );
    }
}

#[test]
fn dead_latents_are_counted_and_auxk_is_active() {
    let (d_in, d_sae, n) = (16, 64, 64);
    let (x, _) = synthetic(n, d_in, 8, 2);
    let hyper = TrainHyper {
        dead_window_tokens: 2 * n as u64,
        ..TrainHyper::default()
    };
    let mut tr = SaeTrainer::new(Sae::init(ArchKind::TOPK, d_in, d_sae, 2, 1), hyper);
    let mut last = Default::default();
    for _ in 0..4 {
        last = tr.step(&x, n, 1e-4, 0.0);
    }
    let st: crate::StepStats = last;
    assert!(st.dead_latents > 0 && st.dead_latents < d_sae);
    let expect = tr
        .tokens_since_fired()
        .iter()
        .filter(|&&t| t >= 2 * n as u64)
        .count();
    assert_eq!(st.dead_latents, expect);
    assert!(st.aux_loss > 0.0);
}

#[test]
fn batchtopk_mean_l0_is_k_and_threshold_is_learned() {
    let (d_in, d_sae, n, k) = (16, 64, 128, 5);
    let (x, _) = synthetic(n, d_in, 10, 5);
    let mut tr = SaeTrainer::new(
        Sae::init(ArchKind::BATCHTOPK, d_in, d_sae, k, 1),
        TrainHyper::default(),
    );
    let st = tr.step(&x, n, 1e-3, 0.0);
    assert!((st.l0 - k as f64).abs() < 0.05, "l0 {}", st.l0);
    for _ in 0..10 {
        tr.step(&x, n, 1e-3, 0.0);
    }
    let snap = tr.snapshot();
    assert!(snap.param("threshold")[0] > 0.0);
    // At inference the threshold gives roughly k active latents per token.
    let l0 = snap.encode(&x, n).mean_l0();
    assert!(
        l0 > 0.3 * k as f64 && l0 < 3.0 * k as f64,
        "inference l0 {l0}"
    );
}

/// encode + decode reproduce the training forward pass (all but BatchTopK, whose inference
/// rule differs by design).
#[test]
fn encode_decode_matches_training_forward() {
    let (d_in, d_sae, n) = (8, 20, 12);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = randn(&mut rng, n * d_in);
    for arch in [
        ArchKind::GATED,
        ArchKind::RELU,
        ArchKind::TOPK,
        ArchKind::JUMPRELU,
    ] {
        let sae = random_sae(arch, d_in, d_sae, 4, 3);
        let mut tr = SaeTrainer::new(sae.clone(), TrainHyper::default());
        let (st, _) = tr.gradients(&x, n, 0.0);
        let code = sae.encode(&x, n);
        let x_hat = sae.decode(&code);
        let mut m = ReconMetrics::new(d_in, d_sae);
        m.add(&x, &x_hat, &code);
        assert!(
            (m.mse() - st.mse).abs() < 1e-4 * st.mse,
            "{arch}: {} vs {}",
            m.mse(),
            st.mse
        );
        assert!(
            (m.l0() - st.l0).abs() < 1e-9,
            "{arch}: l0 {} vs {}",
            m.l0(),
            st.l0
        );
    }
}

#[test]
fn gated_exports_as_equivalent_jumprelu() {
    let (d_in, d_sae, n) = (8, 30, 20);
    let sae = random_sae(ArchKind::GATED, d_in, d_sae, 0, 6);
    let jr = sae.gated_to_jumprelu().unwrap();
    assert_eq!(jr.arch, ArchKind::JUMPRELU);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = randn(&mut rng, n * d_in);
    let (a, b) = (sae.encode(&x, n), jr.encode(&x, n));
    assert!(a.nnz() > 0);
    assert_eq!(a.row_ptr, b.row_ptr);
    assert_eq!(a.idx, b.idx);
    for (u, v) in a.val.iter().zip(&b.val) {
        assert!((u - v).abs() < 1e-4 * u.abs().max(1.0));
    }
    assert!(Sae::init(ArchKind::RELU, 4, 4, 0, 0)
        .gated_to_jumprelu()
        .is_err());
}

#[test]
fn fold_activation_scale_maps_raw_to_raw() {
    let (d_in, d_sae, n, s) = (8, 16, 10, 3.7f32);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = randn(&mut rng, n * d_in);
    let xs: Vec<f32> = x.iter().map(|v| v * s).collect();
    for arch in ArchKind::all() {
        let sae = random_sae(arch, d_in, d_sae, 4, 2);
        let want: Vec<f32> = sae
            .decode(&sae.encode(&xs, n))
            .iter()
            .map(|v| v / s)
            .collect();
        let mut folded = sae.clone();
        folded.fold_activation_scale(s);
        let code = folded.encode(&x, n);
        assert_eq!(code.idx, sae.encode(&xs, n).idx, "{arch}");
        let got = folded.decode(&code);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-4 * w.abs().max(1.0),
                "{arch}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn metrics_on_a_hand_computed_case() {
    // Two tokens in 2-d: x = (1, 0), (3, 2); x_hat = (1, 1), (2, 2).
    let x = [1.0, 0.0, 3.0, 2.0];
    let x_hat = [1.0, 1.0, 2.0, 2.0];
    let code = SparseCode {
        n_rows: 2,
        d_sae: 3,
        row_ptr: vec![0, 2, 3],
        idx: vec![0, 2, 2],
        val: vec![1.0, 0.5, 2.0],
    };
    let mut m = ReconMetrics::new(2, 3);
    m.add(&x, &x_hat, &code);
    // errors: ||(0,-1)||^2 = 1, ||(1,0)||^2 = 1 -> mse 1.
    assert!((m.mse() - 1.0).abs() < 1e-12);
    // Var per dim: dim0 values 1,3 -> 1; dim1 values 0,2 -> 1; total 2 -> fvu 0.5.
    assert!((m.fvu() - 0.5).abs() < 1e-12);
    // gamma = mean||x_hat||^2 / mean(x_hat . x) = (2 + 8) / (1 + 10) = 10/11.
    assert!((m.gamma() - 10.0 / 11.0).abs() < 1e-12);
    assert!((m.l0() - 1.5).abs() < 1e-12);
    assert_eq!(m.fire_counts(), &[1, 0, 2]);
    // Accumulating the same batch again changes nothing but the counts.
    m.add(&x, &x_hat, &code);
    assert!((m.fvu() - 0.5).abs() < 1e-12);
    assert_eq!(m.n_tokens, 4);
}

#[test]
fn mmcs_cases() {
    let truth = [1.0, 0.0, 0.0, 1.0];
    // Perfect recovery, up to scale, plus an unrelated extra row.
    let w = [0.0, 2.0, 3.0, 0.0, 1.0, 1.0];
    assert!((mmcs(&w, &truth, 2) - 1.0).abs() < 1e-9);
    // One direction at 45 degrees to both truths -> cos = 1/sqrt 2.
    let w = [1.0, 1.0];
    assert!((mmcs(&w, &truth, 2) - 0.5f64.sqrt()).abs() < 1e-6);
    // Anti-aligned rows do not count as recovered: the best is the orthogonal one (cos 0).
    let w = [-1.0, 0.0, 0.0, -1.0];
    assert!(mmcs(&w, &truth, 2).abs() < 1e-9);
}

#[test]
fn bench_rows_are_filled() {
    let rows = crate::bench::run_bench(
        &[ArchKind::GATED, ArchKind::TOPK],
        &[256],
        16,
        64,
        1,
        crate::bench::BENCH_L0,
    );
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert!(r.tokens_per_s > 0.0 && r.limit_tokens_per_s > 0.0);
        assert!((r.ratio - r.tokens_per_s / r.limit_tokens_per_s).abs() < 1e-12);
        assert!(r.l0 > 0.0);
        assert!(r.to_string().starts_with(r.arch.as_str()));
    }
}

/// Several L0s in rounds: each family at one L0 right after the other, the order of the L0s
/// reversed every other round, every row reported once, and the comparison's best and
/// ratios those of the reported figures.
#[test]
fn l0_rounds_alternate_and_compare_what_they_report() {
    let archs = [ArchKind::RELU, ArchKind::TOPK];
    let mut seen = Vec::new();
    let cmps = crate::bench::run_l0_rounds(
        &archs,
        &[128],
        16,
        64,
        1,
        &[4, 12],
        crate::Precision::F32,
        3,
        |round, l0, row| seen.push((round, l0, row.arch, row.tokens_per_s, row.l0)),
    );
    let order: Vec<(usize, usize, ArchKind)> = seen.iter().map(|r| (r.0, r.1, r.2)).collect();
    let mut want = Vec::new();
    for round in 1..=3 {
        for arch in archs {
            let l0s = if round % 2 == 1 { [4, 12] } else { [12, 4] };
            want.extend(l0s.map(|l0| (round, l0, arch)));
        }
    }
    assert_eq!(order, want);
    // The SAEs were set up for the L0 asked for.
    for &(_, l0, arch, _, got) in &seen {
        assert!(
            (got - l0 as f64).abs() < 0.5 * l0 as f64,
            "{arch} at L0 {l0}: {got}"
        );
    }
    assert_eq!(cmps.len(), 2);
    for c in &cmps {
        assert_eq!(c.l0s, [4, 12]);
        assert_eq!(c.tokens.len(), 3);
        let reported = |l0: usize| -> Vec<f64> {
            let rows = seen.iter().filter(|r| r.2 == c.arch && r.1 == l0);
            rows.map(|r| r.3).collect()
        };
        for (i, l0) in [4, 12].into_iter().enumerate() {
            let by_round: Vec<f64> = c.tokens.iter().map(|r| r[i]).collect();
            assert_eq!(by_round, reported(l0));
            assert_eq!(c.best(i), by_round.iter().cloned().fold(0.0, f64::max));
        }
        assert_eq!(c.best_ratio(1), c.best(1) / c.best(0));
        let ratios: Vec<f64> = c.tokens.iter().map(|r| r[1] / r[0]).collect();
        assert_eq!(c.round_ratios(1), ratios);
        assert!(c.best(0) > 0.0 && c.best(1) > 0.0);
    }
}

/// Matryoshka's loss makes its first prefix a dictionary on its own: trained the same way, the
/// first 4 of 32 latents alone reconstruct the data better than BatchTopK's first 4, while
/// the whole dictionary stays close.
#[test]
fn matryoshka_prefixes_reconstruct_on_their_own() {
    let (d_in, d_sae, n, k) = (16, 32, 256, 4);
    let (x, _) = synthetic(n, d_in, 24, 21);
    let train = |arch: ArchKind| {
        let mut sae = Sae::init(arch, d_in, d_sae, k, 3);
        if arch == ArchKind::MATRYOSHKA {
            sae.settings
                .insert("widths".into(), serde_json::json!([4, 16, 32]));
        }
        let mut tr = SaeTrainer::new(sae, TrainHyper::default());
        for _ in 0..300 {
            tr.step(&x, n, 3e-3, 0.0);
        }
        tr.snapshot()
    };
    let fvu_of = |sae: &Sae, width: usize| {
        let mut code = sae.encode_as_trained(&x, n);
        for (v, &j) in code.val.iter_mut().zip(&code.idx) {
            if j as usize >= width {
                *v = 0.0;
            }
        }
        let mut m = ReconMetrics::new(d_in, d_sae);
        m.add(&x, &sae.decode(&code), &code);
        m.fvu()
    };
    let (m, b) = (train(ArchKind::MATRYOSHKA), train(ArchKind::BATCHTOPK));
    let (m4, b4) = (fvu_of(&m, 4), fvu_of(&b, 4));
    let (m_all, b_all) = (fvu_of(&m, d_sae), fvu_of(&b, d_sae));
    assert!(
        m4 < 0.9 * b4,
        "first 4 latents: matryoshka FVU {m4} vs batchtopk {b4}"
    );
    assert!(m_all < b_all + 0.1, "whole dictionary: {m_all} vs {b_all}");
}

/// The incremental pursuit (Gram rows, rounds over the batch) chooses what the naive one
/// (every correlation recomputed each step) chooses, with the same codes, and coding one row
/// at a time gives the batch's codes.
#[test]
fn mp_pursuit_matches_the_naive_one() {
    use super::reference::{mp_steps, RefCfg, RefParams};
    let (d_in, d_sae, n, k) = (12, 40, 30, 6);
    let sae = random_sae(ArchKind::MP, d_in, d_sae, k, 9);
    sae.validate().unwrap();
    let x = randn(&mut ChaCha8Rng::seed_from_u64(10), n * d_in);
    let code = sae.encode(&x, n);
    let to64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
    let cfg = RefCfg {
        arch: ArchKind::MP,
        d_in,
        d_sae,
        k,
        k_aux: 0,
        lambda: 0.0,
        alpha: 0.0,
        bandwidth: 0.0,
        dnorm: false,
        apply_b_dec: true,
        dead: Vec::new(),
        widths: Vec::new(),
        beta: 0.0,
        noise_seed: 0,
        input_grad: Vec::new(),
    };
    let p = RefParams {
        w_enc_t: Vec::new(),
        w_dec: to64(&sae.w_dec),
        b_dec: to64(&sae.b_dec),
        lat: Vec::new(),
    };
    let naive = mp_steps(&cfg, &p, &to64(&x), n);
    let mut repeats = 0;
    for (r, atoms) in naive.iter().enumerate() {
        let mut want = atoms.clone();
        want.sort_unstable();
        want.dedup();
        repeats += atoms.len() - want.len();
        let got: Vec<usize> = code.row(r).0.iter().map(|&j| j as usize).collect();
        assert_eq!(got, want, "row {r}");
    }
    assert!(
        repeats > 0,
        "no row chose an atom twice; that path is untested"
    );
    // One row at a time (the family's per-row encoder).
    let pre = sae.pre_activations(&x, n);
    let family = ArchKind::MP.family();
    for r in 0..n {
        let mut one = crate::arch::RowCode::default();
        family.encode_row(&sae, &pre[r * d_sae..(r + 1) * d_sae], &mut one);
        let (idx, val) = code.row(r);
        assert_eq!(one.idx, idx, "row {r}");
        for (a, b) in one.val.iter().zip(val) {
            assert!((a - b).abs() < 1e-5, "row {r}: {a} vs {b}");
        }
    }
}

/// The two pursuit schedules (full Gram matrix with row blocks; Gram rows on demand in
/// rounds) choose the same atoms with the same coefficients.
#[test]
fn mp_pursuit_schedules_agree() {
    use crate::arch::mp::{pursue_full_gram, pursue_in_rounds};
    let (d_in, d_sae, n, k) = (16, 64, 50, 7);
    let sae = random_sae(ArchKind::MP, d_in, d_sae, k, 15);
    let x = randn(&mut ChaCha8Rng::seed_from_u64(16), n * d_in);
    let pre = sae.pre_activations(&x, n);
    let full = pursue_full_gram(&sae.w_dec, d_in, d_sae, &mut pre.clone(), n, k, &mut vec![]);
    let rounds = pursue_in_rounds(&sae.w_dec, d_in, d_sae, &mut pre.clone(), n, k);
    assert_eq!(full.len(), n);
    for (r, (a, b)) in full.iter().zip(&rounds).enumerate() {
        assert_eq!(a.len(), b.len(), "row {r}");
        for ((ja, va), (jb, vb)) in a.iter().zip(b) {
            assert_eq!(ja, jb, "row {r}");
            assert!(
                (va - vb).abs() <= 1e-5 * va.abs().max(1.0),
                "row {r}: {va} vs {vb}"
            );
        }
    }
}

/// The symmetric Gram product equals the plain product `W W^T` and is exactly symmetric,
/// with several row blocks and a partial last one, and with one block.
#[test]
fn gram_matches_the_full_product() {
    let (m, d) = (600, 37);
    let w = randn(&mut ChaCha8Rng::seed_from_u64(17), m * d);
    let mut full = vec![0f32; m * m];
    crate::kernels::matmul_xt(&w, m, d, &w, m, &mut full);
    for block in [64, 1024] {
        let mut half = vec![f32::NAN; m * m];
        crate::kernels::gram_in_blocks(&w, m, d, &mut half, block);
        for i in 0..m {
            for j in 0..m {
                let (a, b) = (full[i * m + j], half[i * m + j]);
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "({i}, {j}): {a} vs {b}"
                );
                assert_eq!(
                    half[i * m + j].to_bits(),
                    half[j * m + i].to_bits(),
                    "({i}, {j})"
                );
            }
        }
    }
}

/// vSAE's training noise is drawn from (seed, step, row) alone: a step on 1 or 4 threads
/// sees the same noise (equal losses up to the products' rounding), another seed other noise.
#[test]
fn training_noise_is_the_same_on_any_thread_count() {
    let (d_in, d_sae, n) = (16, 64, 100);
    let (x, _) = synthetic(n, d_in, 10, 4);
    let x: Vec<f32> = x.iter().map(|v| 4.0 * v).collect();
    let sae = Sae::init(ArchKind::VSAE, d_in, d_sae, 4, 2);
    let run = |threads: usize, seed: u64| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let hyper = TrainHyper {
                seed,
                ..TrainHyper::default()
            };
            let mut t = SaeTrainer::new(sae.clone(), hyper);
            t.step(&x, n, 1e-3, 0.0);
            t.step(&x, n, 1e-3, 0.0)
        })
    };
    let (one, four, other) = (run(1, 7), run(4, 7), run(4, 8));
    assert!(
        (one.loss - four.loss).abs() < 1e-5 * one.loss,
        "{one:?} vs {four:?}"
    );
    assert_eq!(one.l0, four.l0);
    assert!(
        (one.loss - other.loss).abs() > 1e-3 * one.loss,
        "{one:?} vs {other:?}"
    );
}

/// `top_k_into` against a full sort by (value desc, index asc), with many ties, candidates
/// in shuffled order, NaN, infinities, subnormals, signed zeros and k from 1 to past the
/// candidate count; the values come back with their indices.
#[test]
fn top_k_into_matches_a_full_sort() {
    use rand::seq::SliceRandom;
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut scratch = crate::arch::TopKScratch::default();
    for trial in 0..300 {
        let len = rng.gen_range(0..400usize);
        // Few distinct values so that ties are common; some NaN in a third of the trials.
        let mut cands: Vec<(f32, u32)> = (0..len as u32)
            .map(|i| {
                let v = rng.gen_range(-8i32..8) as f32 * 0.25;
                // Every part of the float order: huge, subnormal, infinite, signed zero.
                let v = match rng.gen_range(0..40) {
                    0 => v * 1e30,
                    1 => v * 1e-40,
                    2 => f32::INFINITY,
                    3 => f32::NEG_INFINITY,
                    4 => -0.0,
                    _ => v,
                };
                if trial % 3 == 0 && rng.gen::<f32>() < 0.05 {
                    (f32::NAN, i)
                } else {
                    (v, i)
                }
            })
            .collect();
        cands.shuffle(&mut rng);
        let k = rng.gen_range(1..len.max(1) + 40);
        crate::arch::top_k_into(k, cands.iter().copied(), &mut scratch);
        let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
        let mut want = cands.clone();
        want.sort_by(|a, b| key(b.0).partial_cmp(&key(a.0)).unwrap().then(a.1.cmp(&b.1)));
        want.truncate(k);
        want.sort_by_key(|&(_, i)| i);
        let got: Vec<u32> = scratch.best.iter().map(|&(_, i)| i).collect();
        let exp: Vec<u32> = want.iter().map(|&(_, i)| i).collect();
        assert_eq!(got, exp, "trial {trial}: len {len}, k {k}");
        // Values come back as given (NaN as -inf, -0 as +0).
        for &(v, i) in &scratch.best {
            let given = cands.iter().find(|c| c.1 == i).unwrap().0;
            assert_eq!(
                v.to_bits(),
                (key(given) + 0.0).to_bits(),
                "trial {trial}: index {i}"
            );
        }
    }
}

/// `top_k_in_order` (candidates in index order, by value) against `top_k_into` on the same
/// candidates: same positions, on ties, NaN, infinities, signed zeros and k past the count.
#[test]
fn top_k_in_order_matches_top_k_into() {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (mut a, mut b) = (
        crate::arch::TopKScratch::default(),
        crate::arch::TopKScratch::default(),
    );
    for trial in 0..400 {
        let len = rng.gen_range(0..500usize);
        b.vals.clear();
        b.vals.extend((0..len).map(|_| match rng.gen_range(0..60) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => -0.0,
            4 => 0.0,
            5 => 1e-42,
            // Few distinct values, so that the k-th often has ties on both sides.
            _ => rng.gen_range(-6i32..6) as f32 * 0.5,
        }));
        let k = rng.gen_range(0..len + 20);
        let cands = b.vals.iter().enumerate().map(|(i, &v)| (v, i as u32));
        crate::arch::top_k_into(k, cands, &mut a);
        crate::arch::top_k_in_order(k, &mut b);
        let want: Vec<u32> = a.best.iter().map(|&(_, i)| i).collect();
        assert_eq!(b.positions, want, "trial {trial}: len {len}, k {k}");
    }
}

/// `kth_largest_positive` against a full sort: ties, values spread over many and over one
/// histogram bucket, infinities and subnormals, `want` from 1 to the count.
#[test]
fn kth_largest_positive_matches_a_full_sort() {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for trial in 0..60 {
        let len = rng.gen_range(1..200_000usize);
        let vals: Vec<f32> = (0..len)
            .map(|_| match (trial % 3, rng.gen_range(0..50)) {
                // Many values inside one bucket of the high 16 bits.
                (0, _) => 1.0 + rng.gen_range(0..64) as f32 * 1e-6,
                (_, 0) => f32::INFINITY,
                (_, 1) => 1e-41,
                (_, 2) => 0.5,
                _ => rng.gen::<f32>() * 10.0 + 1e-30,
            })
            .collect();
        let mut sorted = vals.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for want in [1, 2, len / 3 + 1, len / 2 + 1, len] {
            let got = crate::arch::kth_largest_positive(&vals, want);
            assert_eq!(
                got.to_bits(),
                sorted[want - 1].to_bits(),
                "trial {trial}: want {want} of {len}"
            );
        }
    }
}

/// `indices_above` on every path this CPU has against a plain filter: NaN on either side,
/// equal values, lengths around the eight-lane steps, and appending to what `out` holds.
#[test]
fn indices_above_matches_a_plain_filter_on_every_path() {
    use crate::kernels::{indices_above, indices_above_plain};
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for len in (0..40).chain([4608, 4613]) {
        let pick = |rng: &mut ChaCha8Rng| match rng.gen_range(0..20) {
            0 => f32::NAN,
            1 => 0.5,
            _ => rng.gen_range(-1.0f32..1.0),
        };
        let v: Vec<f32> = (0..len).map(|_| pick(&mut rng)).collect();
        let cut: Vec<f32> = (0..len).map(|_| pick(&mut rng)).collect();
        let mut want = vec![7u32, 9];
        want.extend((0..len as u32).filter(|&i| v[i as usize] > cut[i as usize]));
        let mut paths: Vec<(&str, Vec<u32>)> = Vec::new();
        let mut got = vec![7u32, 9];
        indices_above(&v, &cut, &mut got);
        paths.push(("dispatched", got));
        let mut got = vec![7u32, 9];
        indices_above_plain(&v, &cut, &mut got);
        paths.push(("plain", got));
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            let mut got = vec![7u32, 9];
            // SAFETY: checked above.
            unsafe { crate::kernels::indices_above_avx2(&v, &cut, &mut got) };
            paths.push(("avx2", got));
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            let mut got = vec![7u32, 9];
            // SAFETY: checked above.
            unsafe { crate::kernels::indices_above_avx512(&v, &cut, &mut got) };
            paths.push(("avx512", got));
        }
        for (path, got) in paths {
            assert_eq!(got, want, "{path}, length {len}");
        }
    }
}

/// `bounds_above` on every path this CPU has against a plain loop of `score_floor`: NaN in
/// the row, the base and the margins, differences equal to the floor, negative and zero
/// bounds, lengths around the lane steps, and appending to what the outputs hold.
#[test]
fn bounds_above_matches_a_plain_loop_on_every_path() {
    use crate::kernels::{bounds_above, bounds_above_from, score_floor, MarginTerms};
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for len in (0..40).chain([4608, 4613]) {
        let pick = |rng: &mut ChaCha8Rng, nan: bool| match rng.gen_range(0..20) {
            0 if nan => f32::NAN,
            1 => 0.25,
            2 => 0.0,
            _ => rng.gen_range(-1.0f32..1.0),
        };
        let v: Vec<f32> = (0..len).map(|_| pick(&mut rng, true)).collect();
        let base: Vec<f32> = (0..len).map(|_| pick(&mut rng, true)).collect();
        let ew: Vec<f32> = (0..len).map(|_| pick(&mut rng, true).abs()).collect();
        let wn: Vec<f32> = (0..len).map(|_| pick(&mut rng, false).abs()).collect();
        let terms = MarginTerms {
            ew: &ew,
            wn: &wn,
            p: 0.125,
            q: 0.03,
            c: 1e-3,
        };
        let floor = 0.0f32;
        let (mut want_idx, mut want_keys) = (vec![7u32], vec![1u32, 2]);
        for j in 0..len {
            let s = v[j] - base[j];
            if s > floor {
                want_idx.push(j as u32);
                let margin = terms.p * ew[j] + terms.q * wn[j] + terms.c;
                want_keys.push((score_floor(s, margin) + 0.0).to_bits());
            }
        }
        let run = |f: &dyn Fn(&mut Vec<u32>, &mut Vec<u32>)| {
            let (mut idx, mut keys) = (vec![7u32], vec![1u32, 2]);
            f(&mut idx, &mut keys);
            (idx, keys)
        };
        let mut paths = vec![
            (
                "dispatched",
                run(&|i, k| bounds_above(&v, &base, terms, floor, i, k)),
            ),
            (
                "plain",
                run(&|i, k| bounds_above_from(0, &v, &base, terms, floor, i, k)),
            ),
        ];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: checked above.
            let f = |i: &mut Vec<u32>, k: &mut Vec<u32>| unsafe {
                crate::kernels::bounds_above_avx2(&v, &base, terms, floor, i, k)
            };
            paths.push(("avx2", run(&f)));
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: checked above.
            let f = |i: &mut Vec<u32>, k: &mut Vec<u32>| unsafe {
                crate::kernels::bounds_above_avx512(&v, &base, terms, floor, i, k)
            };
            paths.push(("avx512", run(&f)));
        }
        for (path, (idx, keys)) in paths {
            assert_eq!(idx, want_idx, "{path}, length {len}");
            assert_eq!(keys, want_keys, "{path}, length {len}");
        }
    }
}

/// `indices_above_margin` on every path this CPU has against `screen_bounds` then
/// `indices_above`: the same cutoffs bit for bit, so the same indices, with NaN in the row,
/// the cutoffs and the margins, values equal to a cutoff, lengths around the lane steps, and
/// appending to what `out` holds.
#[test]
fn indices_above_margin_matches_the_written_cutoffs_on_every_path() {
    use crate::kernels::{indices_above, indices_above_margin, screen_bounds, MarginTerms};
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for len in (0..40).chain([4608, 4613]) {
        let pick = |rng: &mut ChaCha8Rng| match rng.gen_range(0..20) {
            0 => f32::NAN,
            1 => 0.25,
            _ => rng.gen_range(-1.0f32..1.0),
        };
        let cut: Vec<f32> = (0..len).map(|_| pick(&mut rng)).collect();
        let ew: Vec<f32> = (0..len).map(|_| pick(&mut rng).abs()).collect();
        let wn: Vec<f32> = (0..len).map(|_| pick(&mut rng).abs()).collect();
        let (p, q, c) = (0.125, 0.03, 1e-3);
        let mut lo = vec![0.0; len];
        screen_bounds(&cut, &ew, &wn, p, q, c, &mut lo);
        // Some values exactly at their cutoff.
        let v: Vec<f32> = (0..len)
            .map(|j| match rng.gen_range(0..10) {
                0 => lo[j],
                _ => pick(&mut rng),
            })
            .collect();
        let mut want = vec![7u32, 9];
        indices_above(&v, &lo, &mut want);
        let t = MarginTerms {
            ew: &ew,
            wn: &wn,
            p,
            q,
            c,
        };
        let mut paths: Vec<(&str, Vec<u32>)> = Vec::new();
        let mut got = vec![7u32, 9];
        indices_above_margin(&v, &cut, t, &mut got);
        paths.push(("dispatched", got));
        let mut got = vec![7u32, 9];
        crate::kernels::indices_above_margin_from(0, &v, &cut, t, &mut got);
        paths.push(("plain", got));
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            let mut got = vec![7u32, 9];
            // SAFETY: checked above.
            unsafe { crate::kernels::indices_above_margin_avx2(&v, &cut, t, &mut got) };
            paths.push(("avx2", got));
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            let mut got = vec![7u32, 9];
            // SAFETY: checked above.
            unsafe { crate::kernels::indices_above_margin_avx512(&v, &cut, t, &mut got) };
            paths.push(("avx512", got));
        }
        for (path, got) in paths {
            assert_eq!(got, want, "{path}, length {len}");
        }
    }
}

/// `entries_above` on every path this CPU has against a plain filter: NaN, sums equal to the
/// bound, lengths around the eight-lane steps, and appending to what the output holds.
#[test]
fn entries_above_matches_a_plain_filter_on_every_path() {
    use crate::kernels::{entries_above, entries_above_plain, EntriesAbove};
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let held = || EntriesAbove {
        idx: vec![3],
        sum: vec![7.0],
        raw: vec![-1.0],
    };
    for len in (0..40).chain([4608, 4613]) {
        let pick = |rng: &mut ChaCha8Rng| match rng.gen_range(0..20) {
            0 => f32::NAN,
            1 => 0.25,
            _ => rng.gen_range(-1.0f32..1.0),
        };
        let v: Vec<f32> = (0..len).map(|_| pick(&mut rng)).collect();
        let b: Vec<f32> = (0..len).map(|_| pick(&mut rng)).collect();
        let lb = 0.5;
        let mut want = held();
        for j in 0..len {
            let s = v[j] + b[j];
            if s > lb {
                want.idx.push(j as u32);
                want.sum.push(s);
                want.raw.push(v[j]);
            }
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        type Kernel = fn(&[f32], &[f32], f32, &mut EntriesAbove);
        let mut paths: Vec<(&str, Kernel)> = vec![
            ("dispatched", entries_above),
            ("plain", entries_above_plain),
        ];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: checked above.
            paths.push(("avx2", |v, b, lb, out| unsafe {
                crate::kernels::entries_above_avx2(v, b, lb, out)
            }));
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: checked above.
            paths.push(("avx512", |v, b, lb, out| unsafe {
                crate::kernels::entries_above_avx512(v, b, lb, out)
            }));
        }
        for (path, kernel) in paths {
            let mut got = held();
            kernel(&v, &b, lb, &mut got);
            assert_eq!(got.idx, want.idx, "{path}, length {len}");
            assert_eq!(bits(&got.sum), bits(&want.sum), "{path}, length {len}");
            assert_eq!(bits(&got.raw), bits(&want.raw), "{path}, length {len}");
        }
    }
}

/// The bf16-row kernels give exactly the f32 kernels' bits on the widened rows (widening is
/// exact and the arithmetic the same), at lengths with and without a remainder.
#[test]
fn bf16_row_kernels_match_f32_kernels_on_widened_rows() {
    use crate::bf16::{from_bf16, to_bf16};
    use crate::kernels::*;
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for len in [1usize, 15, 16, 17, 576, 77] {
        let h: Vec<u16> = randn(&mut rng, len).iter().map(|v| to_bf16(*v)).collect();
        let w: Vec<f32> = h.iter().map(|v| from_bf16(*v)).collect();
        let (a, b) = (randn(&mut rng, len), randn(&mut rng, len));
        assert_eq!(dot_h(&h, &a).to_bits(), dot(&w, &a).to_bits(), "dot {len}");
        let (p, q) = (dot2_h(&h, &a, &b), dot2(&w, &a, &b));
        assert_eq!(
            (p.0.to_bits(), p.1.to_bits()),
            (q.0.to_bits(), q.1.to_bits())
        );
        // The portable bodies give the same bits as the dispatched ones, on every path.
        let mut runs = vec![
            ("dot2_portable".to_string(), dot2_portable(&w, &a, &b)),
            ("dot2_h_portable".to_string(), dot2_h_portable(&h, &a, &b)),
        ];
        for cap in SimdPath::available() {
            runs.push((
                format!("dot2 {cap:?}"),
                with_simd_cap(cap, || dot2(&w, &a, &b)),
            ));
            runs.push((
                format!("dot2_h {cap:?}"),
                with_simd_cap(cap, || dot2_h(&h, &a, &b)),
            ));
        }
        for (path, r) in runs {
            assert_eq!(
                (r.0.to_bits(), r.1.to_bits()),
                (q.0.to_bits(), q.1.to_bits()),
                "{path} {len}"
            );
        }
        let (mut y1, mut y2) = (a.clone(), a.clone());
        axpy_h(0.7, &h, &mut y1);
        axpy(0.7, &w, &mut y2);
        assert_eq!(y1, y2, "axpy {len}");
        let (mut z1, mut z2) = (b.clone(), b.clone());
        axpy2_h(0.7, -1.3, &h, &mut y1, &mut z1);
        axpy2(0.7, -1.3, &w, &mut y2, &mut z2);
        assert_eq!((&y1, &z1), (&y2, &z2), "axpy2 {len}");
        let mut r = vec![0u16; len];
        round_to_bf16(&a, &mut r);
        assert!(
            r.iter().zip(&a).all(|(r, a)| *r == to_bf16(*a)),
            "round {len}"
        );
    }
}

/// Four random rows of `len` and their bf16 roundings, for the kernel tests.
fn four_rows(rng: &mut ChaCha8Rng, len: usize) -> (Vec<Vec<f32>>, Vec<Vec<u16>>) {
    use crate::bf16::to_bf16;
    let rows: Vec<Vec<f32>> = (0..4).map(|_| randn(rng, len)).collect();
    let hrows = rows
        .iter()
        .map(|r| r.iter().map(|v| to_bf16(*v)).collect())
        .collect();
    (rows, hrows)
}

/// The grouped kernels (several gathered rows per pass) give exactly the bits of the
/// one-row kernels called in turn, for f32 and bf16 rows, with and without a remainder.
#[test]
fn grouped_kernels_match_the_one_row_kernels_in_turn() {
    use crate::bf16::from_bf16;
    use crate::kernels::*;
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    for len in [1usize, 15, 16, 17, 77, 576] {
        let (rows, hrows) = four_rows(&mut rng, len);
        let wrows: Vec<Vec<f32>> = hrows
            .iter()
            .map(|r| r.iter().map(|v| from_bf16(*v)).collect())
            .collect();
        let x4: [&[f32]; 4] = std::array::from_fn(|q| rows[q].as_slice());
        let w4: [&[f32]; 4] = std::array::from_fn(|q| wrows[q].as_slice());
        let h4: [&[u16]; 4] = std::array::from_fn(|q| hrows[q].as_slice());
        let (y0, z0) = (randn(&mut rng, len), randn(&mut rng, len));
        let (a1, a2) = ([0.7f32, -1.1, 0.0, 2.3], [0.4f32, 0.0, -0.9, 1.5]);

        let mut want = y0.clone();
        (0..4).for_each(|q| axpy(a1[q], x4[q], &mut want));
        let mut got = y0.clone();
        axpy4(a1, x4, &mut got);
        assert_eq!(got, want, "axpy4 {len}");
        let mut want = y0.clone();
        (0..4).for_each(|q| axpy(a1[q], w4[q], &mut want));
        let mut got = y0.clone();
        axpy4_h(a1, h4, &mut got);
        assert_eq!(got, want, "axpy4_h {len}");

        let (mut wy, mut wz) = (y0.clone(), z0.clone());
        (0..4).for_each(|q| axpy2(a1[q], a2[q], x4[q], &mut wy, &mut wz));
        let (mut gy, mut gz) = (y0.clone(), z0.clone());
        axpy2x4(a1, a2, x4, &mut gy, &mut gz);
        assert_eq!((&gy, &gz), (&wy, &wz), "axpy2x4 {len}");
        let (mut wy, mut wz) = (y0.clone(), z0.clone());
        (0..4).for_each(|q| axpy2(a1[q], a2[q], w4[q], &mut wy, &mut wz));
        let (mut gy, mut gz) = (y0.clone(), z0.clone());
        axpy2x4_h(a1, a2, h4, &mut gy, &mut gz);
        assert_eq!((&gy, &gz), (&wy, &wz), "axpy2x4_h {len}");

        let bits = |v: [f32; 4]| v.map(f32::to_bits);
        let want: [f32; 4] = std::array::from_fn(|q| dot(x4[q], &y0));
        let mut wz = z0.clone();
        (0..4).for_each(|q| axpy(a1[q], x4[q], &mut wz));
        let mut gz = z0.clone();
        let got = dot4_axpy4(x4, &y0, a1, &mut gz);
        assert_eq!((bits(got), &gz), (bits(want), &wz), "dot4_axpy4 {len}");
        let want: [f32; 4] = std::array::from_fn(|q| dot(w4[q], &y0));
        let mut wz = z0.clone();
        (0..4).for_each(|q| axpy(a1[q], w4[q], &mut wz));
        let mut gz = z0.clone();
        let got = dot4_axpy4_h(h4, &y0, a1, &mut gz);
        assert_eq!((bits(got), &gz), (bits(want), &wz), "dot4_axpy4_h {len}");
        let mut gz = z0.clone();
        let got = dot4_axpy4_h_portable(h4, &y0, a1, &mut gz);
        assert_eq!(
            (bits(got), &gz),
            (bits(want), &wz),
            "dot4_axpy4_h_portable {len}"
        );
        let want: [f32; 4] = std::array::from_fn(|q| dot(x4[q], &y0));
        let mut wz = z0.clone();
        (0..4).for_each(|q| axpy(a1[q], x4[q], &mut wz));
        let mut gz = z0.clone();
        let got = dot4_axpy4_portable(x4, &y0, a1, &mut gz);
        assert_eq!(
            (bits(got), &gz),
            (bits(want), &wz),
            "dot4_axpy4_portable {len}"
        );
    }
}

/// JumpReLU's `init_l0` starts every threshold where about that many latents fire per row of
/// the sample; without it the thresholds start at `init_threshold`; both are checked up front.
#[test]
fn jumprelu_threshold_starts_from_init_l0_or_init_threshold() {
    use std::collections::BTreeMap;
    let (d_in, d_sae, n) = (16, 64, 512);
    let family = ArchKind::JUMPRELU.family();
    let x = randn(&mut ChaCha8Rng::seed_from_u64(3), n * d_in);
    let opts = |pairs: &[(&str, &str)]| {
        let given: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        family.train_opts(d_sae, &given)
    };
    for l0 in [4usize, 20] {
        let mut sae = random_sae(ArchKind::JUMPRELU, d_in, d_sae, 0, 5);
        let hyper = TrainHyper {
            arch_opts: opts(&[("init_l0", &l0.to_string())]).unwrap(),
            ..TrainHyper::default()
        };
        family.init_from_sample(&mut sae, &hyper, &x);
        let theta = sae.param("threshold")[0];
        assert!(sae.param("threshold").iter().all(|&t| t == theta));
        let l0_got = sae.encode(&x, n).nnz() as f64 / n as f64;
        assert!(
            (l0_got - l0 as f64).abs() <= 0.05 * l0 as f64 + 0.01,
            "init_l0 {l0}: L0 on the sample {l0_got}"
        );
    }
    let mut sae = random_sae(ArchKind::JUMPRELU, d_in, d_sae, 0, 5);
    let hyper = TrainHyper {
        arch_opts: opts(&[("init_threshold", "0.25")]).unwrap(),
        ..TrainHyper::default()
    };
    family.init_from_sample(&mut sae, &hyper, &x);
    assert!(sae.param("threshold").iter().all(|&t| t == 0.25));
    let err = opts(&[("init_l0", "65")]).unwrap_err();
    assert!(
        err.contains("init_l0 = 65") && err.contains("d_sae = 64"),
        "{err}"
    );
    let err = opts(&[("init_threshold", "0")]).unwrap_err();
    assert!(
        err.contains("init_threshold = 0") && err.contains("> 0"),
        "{err}"
    );
}

/// Every kernel's outputs as bits that has paths per instruction set (the `multiversion`
/// ones and `dot4_axpy4`), on this thread's path.
fn multiversion_kernel_bits() -> Vec<u32> {
    use crate::kernels::*;
    use crate::optim::{adam_momentum, adam_no_momentum};
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let mut out: Vec<f32> = Vec::new();
    for len in [1usize, 15, 16, 17, 77, 576] {
        let (rows, hrows) = four_rows(&mut rng, len);
        let x4: [&[f32]; 4] = std::array::from_fn(|q| rows[q].as_slice());
        let h4: [&[u16]; 4] = std::array::from_fn(|q| hrows[q].as_slice());
        let (y0, z0) = (randn(&mut rng, len), randn(&mut rng, len));
        let (a1, a2) = ([0.7f32, -1.1, 0.0, 2.3], [0.4f32, 0.0, -0.9, 1.5]);
        out.push(dot(x4[0], &y0));
        out.extend(dot4(&y0, x4));
        out.push(dot_h(h4[1], &y0));
        let (n, e) = norm_and_bf16_error(x4[2]);
        out.extend([n, e]);
        let mut lo = vec![0.0; len];
        screen_bounds(x4[0], x4[1], x4[2], 0.3, -0.2, 0.1, &mut lo);
        out.extend(&lo);
        let mut h = vec![0u16; len];
        round_to_bf16(&y0, &mut h);
        out.extend(h.iter().map(|v| *v as f32));
        let (mut y, mut z) = (y0.clone(), z0.clone());
        axpy(0.3, x4[0], &mut y);
        axpy_h(-0.6, h4[0], &mut y);
        axpy2(0.3, -0.8, x4[1], &mut y, &mut z);
        axpy2_h(1.3, 0.2, h4[1], &mut y, &mut z);
        axpy4(a1, x4, &mut y);
        axpy4_h(a2, h4, &mut z);
        axpy2x4(a1, a2, x4, &mut y, &mut z);
        axpy2x4_h(a2, a1, h4, &mut y, &mut z);
        out.extend(dot4_axpy4(x4, &z0, a1, &mut y));
        out.extend(dot4_axpy4_h(h4, &y0, a2, &mut z));
        out.extend(&y);
        out.extend(&z);
        let (mut p, mut m, mut v) = (
            y0.clone(),
            z0.clone(),
            rows[3].iter().map(|x| x * x).collect::<Vec<f32>>(),
        );
        adam_momentum(&mut p, &mut m, &mut v, x4[0], [0.9, 0.999], 1e-3, 1e-8);
        adam_no_momentum(&mut p, &mut v, x4[1], 0.999, 1e-3, 1e-8);
        out.extend(p.iter().chain(&m).chain(&v));
    }
    out.iter().map(|v| v.to_bits()).collect()
}

/// Each instruction set the kernels are built for (every one this CPU has) gives the
/// portable body's bits.
#[test]
fn multiversion_kernels_give_the_same_bits_on_every_path() {
    use crate::kernels::{with_simd_cap, SimdPath};
    let paths = SimdPath::available();
    let want = with_simd_cap(SimdPath::Portable, multiversion_kernel_bits);
    for path in paths {
        let got = with_simd_cap(path, multiversion_kernel_bits);
        assert!(got == want, "{path:?} differs from the portable kernels");
    }
}

/// Training takes the same bits on every kernel path this CPU has, f32 and bf16 gathers:
/// two Adam steps, then the gradients of a third (bit differences in a gradient can vanish
/// in Adam's rounded updates, so the gradients themselves are compared). d_in 40: two full
/// 16-lane blocks and a remainder, so every lane sums more than one product.
#[test]
fn training_gives_the_same_bits_on_every_simd_path() {
    use crate::bf16::Precision;
    use crate::kernels::{set_simd_cap, SimdPath};
    let (d_in, d_sae, n) = (40, 48, 96);
    let (x, _) = synthetic(n, d_in, 10, 8);
    let grad = super::input_grad(&x);
    let run = |path: SimdPath, arch: ArchKind, precision: Precision| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .start_handler(move |_| set_simd_cap(path))
            .build()
            .unwrap();
        pool.install(|| {
            let hyper = TrainHyper {
                precision,
                ..TrainHyper::default()
            };
            let mut tr = SaeTrainer::new(Sae::init(arch, d_in, d_sae, 3, 42), hyper);
            tr.set_dense_fraction(2.0);
            for _ in 0..2 {
                step_any(&mut tr, &x, n, 1e-3, 0.01);
            }
            let (_, g) = match tr.needs_input_grad() {
                true => tr.gradients_with_grad(&x, &grad, n, 0.01),
                false => tr.gradients(&x, n, 0.01),
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            let mut all = bits(&g.w_enc_t);
            all.extend(bits(&g.w_dec));
            all.extend(bits(&g.b_dec));
            g.params.iter().for_each(|p| all.extend(bits(p)));
            (all, tr.snapshot())
        })
    };
    for precision in [Precision::F32, Precision::Bf16Sparse] {
        for arch in ArchKind::all() {
            let want = run(SimdPath::Portable, arch, precision);
            for path in SimdPath::available() {
                let got = run(path, arch, precision);
                assert!(
                    got.0 == want.0,
                    "{arch}, {precision}: {path:?} gradients differ from the portable kernels'"
                );
                assert!(
                    got.1 == want.1,
                    "{arch}, {precision}: {path:?} weights differ from the portable kernels'"
                );
            }
        }
    }
}

/// The bf16x3 note names the option both ways, and only where the three terms are slow.
#[test]
fn split_slow_note_names_the_option() {
    use crate::bf16::{split_is_slow_here, split_slow_note};
    let note = split_slow_note("--compute", "each product");
    assert_eq!(note.is_some(), split_is_slow_here());
    if let Some(note) = note {
        assert!(note.starts_with("note: --compute bf16x3: "), "{note}");
        assert!(note.contains("each product runs as three"), "{note}");
        assert!(note.ends_with("slower than --compute f32"), "{note}");
    }
}
