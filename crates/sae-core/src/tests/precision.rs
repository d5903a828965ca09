//! Training with the bf16 encoder product: reproducible, close to f32, and really bf16; and
//! the screened f32 step: f32 values wherever selection looks.

use super::misc::synthetic;
use crate::bf16::Precision;
use crate::{ArchKind, Sae, SaeTrainer, TrainHyper};

fn hyper(precision: Precision) -> TrainHyper {
    TrainHyper {
        precision,
        ..TrainHyper::default()
    }
}

/// `steps` steps over `x` in batches of `n` rows (`dims` is d_in, d_sae, n) on a pool of `threads` threads; the final
/// SAE and the loss of each step.
fn train(
    arch: ArchKind,
    precision: Precision,
    x: &[f32],
    (d_in, d_sae, n): (usize, usize, usize),
    steps: usize,
    threads: usize,
) -> (Sae, Vec<f64>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let k = 4;
        let mut tr = SaeTrainer::new(Sae::init(arch, d_in, d_sae, k, 7), hyper(precision));
        let batches = x.len() / (n * d_in);
        let losses = (0..steps)
            .map(|s| {
                let b = &x[(s % batches) * n * d_in..][..n * d_in];
                tr.step(b, n, 3e-3, 0.05).fvu
            })
            .collect();
        (tr.snapshot(), losses)
    })
}

#[test]
fn bf16_training_is_bit_for_bit_reproducible() {
    let dims @ (d_in, _, n) = (48, 96, 64);
    let (x, _) = synthetic(4 * n, d_in, 24, 11);
    for arch in [ArchKind::TOPK, ArchKind::GATED] {
        for p in [
            Precision::Bf16,
            Precision::Bf16Sparse,
            Precision::F32Bf16Sparse,
            Precision::F32Screened,
            Precision::Bf16x3,
        ] {
            for threads in [1, 2] {
                let a = train(arch, p, &x, dims, 12, threads);
                let b = train(arch, p, &x, dims, 12, threads);
                assert_eq!(a, b, "{arch} {p} on {threads} threads");
            }
        }
        // Neither option is a no-op: the rounded product changes the trajectory, and the
        // bf16 gathers change it again.
        let f = train(arch, Precision::F32, &x, dims, 12, 2);
        let h = train(arch, Precision::Bf16, &x, dims, 12, 2);
        let s = train(arch, Precision::Bf16Sparse, &x, dims, 12, 2);
        let fs = train(arch, Precision::F32Bf16Sparse, &x, dims, 12, 2);
        let x3 = train(arch, Precision::Bf16x3, &x, dims, 12, 2);
        assert!(
            f.0.w_enc != h.0.w_enc,
            "{arch}: bf16 trained the f32 weights"
        );
        // Three terms are not f32, but far nearer to it than one.
        let dist = |a: &[f32], b: &[f32]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(p, q)| ((p - q) as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let (d3, d1) = (dist(&x3.0.w_enc, &f.0.w_enc), dist(&h.0.w_enc, &f.0.w_enc));
        eprintln!("{arch}: |W_enc - f32's| after 12 steps: bf16x3 {d3:.2e}, bf16 {d1:.2e}");
        assert!(
            d3 > 0.0 && d3 < d1 / 20.0,
            "{arch}: bf16x3 {d3} vs bf16 {d1}"
        );
        // Gated's code is dense this early (the GEMM path, which gathers no rows).
        if arch == ArchKind::TOPK {
            assert!(
                h.0.w_dec != s.0.w_dec,
                "{arch}: bf16-sparse trained as bf16"
            );
            assert!(
                f.0.w_dec != fs.0.w_dec && fs.0.w_dec != s.0.w_dec,
                "{arch}: f32-bf16-sparse trained as f32 or as bf16-sparse"
            );
        }
    }
}

/// A short training on sparse synthetic data reaches about the f32 run's FVU. A broken bf16
/// product (wrong layout, stale copy, lost rows) leaves the FVU far above it.
#[test]
fn bf16_training_reaches_the_f32_loss() {
    let dims @ (d_in, _, n) = (64, 128, 128);
    let (x, _) = synthetic(8 * n, d_in, 32, 12);
    for arch in [ArchKind::TOPK, ArchKind::GATED] {
        let steps = 300;
        let (_, f) = train(arch, Precision::F32, &x, dims, steps, 2);
        // The mean FVU over the last 20 steps (one batch's FVU is noisy).
        let tail = |v: &[f64]| v[v.len() - 20..].iter().sum::<f64>() / 20.0;
        let f_end = tail(&f);
        assert!(
            f_end < 0.5 * f[0],
            "{arch}: the f32 run did not learn ({f_end} from {})",
            f[0]
        );
        for p in [
            Precision::Bf16,
            Precision::Bf16Sparse,
            Precision::F32Bf16Sparse,
            Precision::F32Screened,
            Precision::Bf16x3,
        ] {
            let (_, h) = train(arch, p, &x, dims, steps, 2);
            let h_end = tail(&h);
            eprintln!(
                "{arch}: FVU f32 {f_end:.4}, {p} {h_end:.4} (first step {:.3})",
                f[0]
            );
            assert!(
                (h_end - f_end).abs() <= 0.1 * f_end + 0.005,
                "{arch}: {p} FVU {h_end} vs f32 {f_end}"
            );
        }
    }
}

/// The optimiser state records the precision, and a trainer of the other precision refuses
/// it (a resumed run keeps the arithmetic it started with).
#[test]
fn saved_state_keeps_the_precision() {
    let (d_in, d_sae, n) = (16, 32, 32);
    let (x, _) = synthetic(n, d_in, 8, 13);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    let sae = Sae::init(ArchKind::TOPK, d_in, d_sae, 4, 1);
    let mut tr = SaeTrainer::new(sae.clone(), hyper(Precision::Bf16));
    tr.step(&x, n, 1e-3, 0.0);
    tr.save_state(&path).unwrap();
    let mut same = SaeTrainer::new(tr.snapshot(), hyper(Precision::Bf16));
    same.load_state(&path).unwrap();
    let mut other = SaeTrainer::new(tr.snapshot(), hyper(Precision::F32));
    let err = other.load_state(&path).unwrap_err().to_string();
    assert!(err.contains("precision = bf16"), "{err}");
}

/// The bf16 gathers change only the rounding of the sparse passes' operands: for every
/// family with an encoder product, on its sparse path, the gradients of one batch stay
/// within bf16 rounding of those with f32 gathers (same bf16 encoder product, so the same
/// selection), and differ from them (the rows really are bf16); with the f32 product too.
#[test]
fn bf16_sparse_gradients_match_f32_gathers() {
    use super::{input_grad, randn, random_sae};
    use rand::SeedableRng;
    let (d_in, d_sae, n) = (40, 96, 48);
    for arch in ArchKind::all() {
        if arch == ArchKind::MP {
            continue;
        }
        let sae = random_sae(arch, d_in, d_sae, 6, 3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let x = randn(&mut rng, n * d_in);
        let grads = |p: Precision| {
            let mut t = SaeTrainer::new(
                sae.clone(),
                TrainHyper {
                    dead_window_tokens: 0,
                    ..hyper(p)
                },
            );
            t.set_dense_fraction(2.0);
            let (stats, g) = if t.needs_input_grad() {
                t.gradients_with_grad(&x, &input_grad(&x), n, 0.3)
            } else {
                t.gradients(&x, n, 0.3)
            };
            (stats.loss, g)
        };
        // Each encoder product with and without the bf16 gathers.
        for (full, half) in [
            (Precision::Bf16, Precision::Bf16Sparse),
            (Precision::F32, Precision::F32Bf16Sparse),
        ] {
            let ((lh, h), (ls, s)) = (grads(full), grads(half));
            assert!(
                (lh - ls).abs() <= 1e-2 * lh.abs(),
                "{arch} {half}: loss {ls} with bf16 gathers, {lh} without"
            );
            for (name, worst, scale) in differences(&h, &s) {
                assert!(
                    worst <= 2e-2 * scale,
                    "{arch} {half} {name}: differs by {worst} at scale {scale}"
                );
            }
            assert_ne!(
                h.w_dec, s.w_dec,
                "{arch} {half}: W_dec gradient of f32 rows"
            );
        }
    }
}

/// The families whose selection reads only pre-activations above a per-latent cutoff.
const SCREENING: [ArchKind; 3] = [ArchKind::RELU, ArchKind::GATED, ArchKind::JUMPRELU];
/// The families that screen against a bound under the batch's k*n-th score.
const BATCH_TOP_K: [ArchKind; 3] = [
    ArchKind::BATCHTOPK,
    ArchKind::MATRYOSHKA,
    ArchKind::MUTUALCHOICE,
];

/// `f32-screened` leaves, wherever selection can look, exactly the f32 dot product: every
/// entry above its cutoff in f32, and every entry above it as held, is `kernels::dot` bit
/// for bit. A third of the latents get the cutoff moved onto one of their entries (a hair
/// below it), where the bf16 product alone would misplace the entry; and the screen
/// recomputes only a small part of the matrix.
#[test]
fn screened_pre_activations_are_the_f32_dots_wherever_selection_looks() {
    use super::{randn, random_sae};
    use crate::kernels::dot;
    use rand::SeedableRng;
    let (d_in, d_sae, n) = (576, 300, 40);
    for arch in SCREENING {
        let mut sae = random_sae(arch, d_in, d_sae, 6, 5);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let x = randn(&mut rng, n * d_in);
        let mut probe = SaeTrainer::new(sae.clone(), hyper(Precision::F32Screened));
        probe.set_bf16_units(true);
        probe.screen_any_density();
        let first = probe.screened_pre(&x, n);
        let exact = |p: &crate::trainer::ScreenedPre, b: usize, j: usize| {
            dot(
                &p.xc[b * d_in..(b + 1) * d_in],
                &p.w_enc_t[j * d_in..(j + 1) * d_in],
            )
        };
        // The parameter each family's cutoff subtracts: b_enc (relu, jumprelu) or b_gate.
        let bias = if arch == ArchKind::GATED {
            "b_gate"
        } else {
            "b_enc"
        };
        for j in (0..d_sae).step_by(3) {
            let b = j % n;
            let target = exact(&first, b, j);
            let moved = first.cutoff[j] - target;
            let v = &mut sae.param_mut(bias)[j];
            *v += moved * (1.0 - 2e-6);
        }
        let mut tr = SaeTrainer::new(sae.clone(), hyper(Precision::F32Screened));
        tr.set_bf16_units(true);
        tr.screen_any_density();
        let got = tr.screened_pre(&x, n);
        // W_enc^T in slices of latents (as large dictionaries are gathered): the same values.
        let mut sliced = SaeTrainer::new(sae.clone(), hyper(Precision::F32Screened));
        sliced.set_gather_slice_bytes(100_000);
        sliced.set_gather_row_block(32);
        sliced.set_bf16_units(true);
        sliced.screen_any_density();
        let other = sliced.screened_pre(&x, n);
        assert_eq!(other.pre, got.pre, "{arch}: sliced");
        assert_eq!(other.refined, got.refined, "{arch}: sliced");
        let (mut above, mut near) = (0, 0);
        for b in 0..n {
            for j in 0..d_sae {
                let (e, held, cut) = (exact(&got, b, j), got.pre[b * d_sae + j], got.cutoff[j]);
                if e > cut || held > cut {
                    assert_eq!(
                        held.to_bits(),
                        e.to_bits(),
                        "{arch} ({b}, {j}): held {held}, f32 {e}, cutoff {cut}"
                    );
                    above += 1;
                }
                if (e - cut).abs() <= 1e-3 * e.abs().max(cut.abs()) {
                    near += 1;
                }
            }
        }
        eprintln!(
            "{arch}: {above} entries above the cutoff, {near} within 1e-3 of it, {} recomputed of {}",
            got.refined,
            n * d_sae
        );
        assert!(
            near >= d_sae / 3,
            "{arch}: only {near} entries at the cutoff"
        );
        assert!(got.refined >= above, "{arch}");
        assert!(
            got.refined - above < n * d_sae / 10,
            "{arch}: the screen recomputed {} entries for {above} above the cutoff",
            got.refined,
        );
    }
}

/// TopK's raised cutoffs hold where bf16 rounding reorders a row: b_enc is set so that every
/// latent of row 0 scores 1 up to f32 rounding, and each row's top k taken from the held
/// values is the top k of the `kernels::dot` values, bit for bit. It fails when both the
/// bound under the k-th f32 score and the scan's test leave out the margins (either one
/// alone still covers the actual rounding of these random rows, far under the bound).
#[test]
fn screened_top_k_rows_select_as_the_f32_dots() {
    use super::{randn, random_sae};
    use crate::arch::{top_k_into, TopKScratch};
    use crate::kernels::dot;
    use rand::SeedableRng;
    let (d_in, d_sae, n, k) = (576, 300, 40, 6);
    let mut sae = random_sae(ArchKind::TOPK, d_in, d_sae, k, 5);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
    let x = randn(&mut rng, n * d_in);
    let mut probe = SaeTrainer::new(sae.clone(), hyper(Precision::F32Screened));
    probe.set_bf16_units(true);
    probe.screen_any_density();
    let first = probe.screened_pre(&x, n);
    let exact = |b: usize, j: usize| {
        dot(
            &first.xc[b * d_in..(b + 1) * d_in],
            &first.w_enc_t[j * d_in..(j + 1) * d_in],
        )
    };
    for j in 0..d_sae {
        sae.param_mut("b_enc")[j] = 1.0 - exact(0, j);
    }
    let b_enc = sae.param("b_enc").to_vec();
    let mut t = SaeTrainer::new(sae, hyper(Precision::F32Screened));
    t.set_bf16_units(true);
    t.screen_any_density();
    let got = t.screened_pre(&x, n);
    assert_eq!(got.xc, first.xc);
    let top = |score: &dyn Fn(usize) -> f32| {
        let mut scratch = TopKScratch::default();
        top_k_into(k, (0..d_sae).map(|j| (score(j), j as u32)), &mut scratch);
        let kept: Vec<(u32, u32)> = scratch
            .best
            .iter()
            .filter(|(v, _)| *v > 0.0)
            .map(|&(v, j)| (j, v.to_bits()))
            .collect();
        kept
    };
    let near = (0..d_sae)
        .filter(|&j| (exact(0, j) + b_enc[j] - 1.0).abs() < 1e-6)
        .count();
    assert!(near > d_sae / 2, "only {near} latents of row 0 tie");
    for b in 0..n {
        let want = top(&|j| exact(b, j) + b_enc[j]);
        let held = top(&|j| got.pre[b * d_sae + j] + b_enc[j]);
        assert_eq!(held, want, "row {b}");
    }
    assert!(
        got.refined < n * d_sae / 4,
        "the screen recomputed {} of {} entries",
        got.refined,
        n * d_sae
    );
}

/// The same loss and gradients, bit for bit.
fn same_bits(
    (sa, a): (&crate::StepStats, &crate::trainer::Grads),
    (sb, b): &(crate::StepStats, crate::trainer::Grads),
    what: &str,
) {
    assert_eq!(sa.loss.to_bits(), sb.loss.to_bits(), "{what}: loss");
    assert_eq!(a.w_enc_t, b.w_enc_t, "{what}: W_enc");
    assert_eq!(a.w_dec, b.w_dec, "{what}: W_dec");
    assert_eq!(a.params, b.params, "{what}: parameters");
}

/// A screened step is an f32 step: the same loss, L0 and gradients up to the order of the
/// f32 sums, for each screening family (TopK also with every latent in AuxK, whose cutoffs
/// the top-k does not raise; BatchTopK and Matryoshka, whose raise is a guess the screen
/// checks; mutual choice, which selects as BatchTopK with AuxK candidates of its own). Where
/// the screen would recompute too much (these random SAEs fire on about half the entries)
/// the step runs the f32 product, bit for bit the f32 step; so does a batch top-k step whose
/// guess is too high, a step on a CPU without bf16 units (taken for one here), and a family
/// without a screen (feature choice).
#[test]
fn screened_steps_are_f32_steps() {
    use super::{randn, random_sae};
    use rand::SeedableRng;
    let (d_in, d_sae, n) = (64, 160, 48);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let x = randn(&mut rng, n * d_in);
    let window = TrainHyper::default().dead_window_tokens;
    let cases = SCREENING
        .into_iter()
        .chain(BATCH_TOP_K)
        .chain([ArchKind::TOPK])
        .map(|a| (a, window))
        .chain([
            (ArchKind::TOPK, 0),
            (ArchKind::BATCHTOPK, 0),
            (ArchKind::FEATURECHOICE, window),
        ]);
    for (arch, window) in cases {
        let sae = random_sae(arch, d_in, d_sae, 6, 3);
        let screens = arch != ArchKind::FEATURECHOICE;
        let batch_top_k = BATCH_TOP_K.contains(&arch);
        let top_k = batch_top_k || arch == ArchKind::TOPK;
        let trainer = |p: Precision, any_density: bool, guess: f32| {
            let hyper = TrainHyper {
                dead_window_tokens: window,
                ..hyper(p)
            };
            let mut t = SaeTrainer::new(sae.clone(), hyper);
            t.set_dense_fraction(2.0);
            t.set_bf16_units(true);
            if any_density {
                t.screen_any_density();
            }
            t.set_screen_batch_guess(guess);
            assert_eq!(t.screens(), p.screened() && screens, "{arch}");
            t
        };
        let grads = |p: Precision, any_density: bool| {
            let mut t = trainer(p, any_density, 0.0);
            let g = t.gradients(&x, n, 0.3);
            assert_eq!(t.screen_misses(), 0, "{arch}");
            g
        };
        let (sf, f) = grads(Precision::F32, false);
        if !screens || !top_k {
            let (sd, d) = grads(Precision::F32Screened, false);
            assert!(
                !screens || sf.l0 > d_sae as f64 / 10.0,
                "{arch}: L0 {}",
                sf.l0
            );
            assert_eq!(sf.loss.to_bits(), sd.loss.to_bits(), "{arch}: dense code");
            assert_eq!(f.w_enc_t, d.w_enc_t, "{arch}: dense code");
            assert_eq!(f.w_dec, d.w_dec, "{arch}: dense code");
        }
        if !screens {
            continue;
        }
        // On a CPU without bf16 units the f32 product runs (the widened bf16 one is slower):
        // the f32 step's bits, even where the screen would take any density.
        let mut t = trainer(Precision::F32Screened, true, 0.0);
        t.set_bf16_units(false);
        assert!(!t.screens(), "{arch}: screens without bf16 units");
        same_bits(
            (&sf, &f),
            &t.gradients(&x, n, 0.3),
            &format!("{arch}: no bf16 units"),
        );
        if batch_top_k {
            // A guess above the batch's threshold is caught: the f32 product's bits.
            let mut t = trainer(Precision::F32Screened, true, 3.0);
            let high = t.gradients(&x, n, 0.3);
            assert_eq!(t.screen_misses(), 1, "{arch}: the high guess went unseen");
            same_bits((&sf, &f), &high, &format!("{arch}: high guess"));
        }
        let (ss, s) = grads(Precision::F32Screened, true);
        assert_ne!(s.w_enc_t, f.w_enc_t, "{arch}: screened as f32");
        if batch_top_k {
            // W_enc^T in slices: the batch's bound first, then each slice's entries.
            let mut t = trainer(Precision::F32Screened, true, 0.0);
            t.set_gather_slice_bytes(10_000);
            t.set_gather_row_block(16);
            let sliced = t.gradients(&x, n, 0.3);
            assert_eq!(t.screen_misses(), 0, "{arch}: sliced");
            same_bits((&ss, &s), &sliced, &format!("{arch}: sliced"));
        }
        // Each recomputed entry is one dot product, whatever the threads.
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let other = pool.install(|| grads(Precision::F32Screened, true));
            same_bits((&ss, &s), &other, &format!("{arch} {threads} threads"));
        }
        assert!(
            (sf.loss - ss.loss).abs() <= 1e-5 * sf.loss.abs(),
            "{arch} window {window}: loss {} screened, {} f32",
            ss.loss,
            sf.loss
        );
        assert_eq!(
            sf.l0, ss.l0,
            "{arch} window {window}: the selections differ"
        );
        // AuxK's part of the loss is small beside the rest: its values checked alone.
        assert!(
            (sf.aux_loss - ss.aux_loss).abs() <= 1e-5 * sf.aux_loss.abs(),
            "{arch} window {window}: aux loss {} screened, {} f32",
            ss.aux_loss,
            sf.aux_loss
        );
        for (name, worst, scale) in differences(&f, &s) {
            assert!(
                worst <= 1e-4 * scale,
                "{arch} window {window} {name}: differs by {worst} at scale {scale}"
            );
        }
    }
}

/// Per gradient (W_enc, W_dec, b_dec, then each per-latent parameter): the largest
/// difference between `a` and `b`, and `a`'s scale. A per-latent parameter's gradient can be
/// a sum of terms that cancel (JumpReLU's threshold: the reconstruction part against the L0
/// part), which leaves the rounding of the terms; those are measured at the scale of all
/// the family's per-latent gradients.
fn differences(
    a: &crate::trainer::Grads,
    b: &crate::trainer::Grads,
) -> Vec<(&'static str, f32, f32)> {
    let max_abs = |v: &[f32]| v.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let param_scale = a.params.iter().map(|p| max_abs(p)).fold(0.0, f32::max);
    let params = a.params.iter().zip(&b.params).map(|(u, v)| ("param", u, v));
    [
        ("W_enc", &a.w_enc_t, &b.w_enc_t),
        ("W_dec", &a.w_dec, &b.w_dec),
        ("b_dec", &a.b_dec, &b.b_dec),
    ]
    .into_iter()
    .chain(params)
    .map(|(name, u, v)| {
        let worst = u
            .iter()
            .zip(v)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        let scale = match name {
            "param" => param_scale,
            _ => max_abs(u),
        };
        (name, worst, scale)
    })
    .collect()
}
