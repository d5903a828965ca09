//! The gradient of the next-token loss at a hook (`activations_with_loss_grad`, candle
//! autograd through the layers above the hook) against central finite differences of the
//! loss with the activation spliced in the fast forward pass, on the tiny random Llama
//! fixture at every kind of hook and on SmolLM2 at layer 15.

use sae_lm::{Hook, HookKind, LanguageModel};
use std::path::Path;

fn tiny() -> LanguageModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    LanguageModel::load(dir.to_str().unwrap()).unwrap()
}

/// The summed next-token loss with `delta` added to row `row` of the activation at `hook`.
fn spliced_sum(
    m: &LanguageModel,
    tokens: &[u32],
    batch: usize,
    ctx: usize,
    hook: Hook,
    row: usize,
    delta: &[f32],
) -> f64 {
    let width = delta.len();
    let mut add = |acts: &mut [f32]| {
        for (a, d) in acts[row * width..(row + 1) * width].iter_mut().zip(delta) {
            *a += d;
        }
        Ok(())
    };
    let losses = m
        .per_token_loss(tokens, batch, ctx, Some((&hook.name(), &mut add)))
        .unwrap();
    losses.iter().map(|&l| l as f64).sum()
}

/// Deterministic unit vector (64-bit LCG).
fn random_unit(seed: &mut u64, n: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

/// Checks the gradient at `rows` of `hook` along the gradient's own direction (relative
/// tolerance `rel`) and a random one (error within `rel` of the row's gradient norm).
#[allow(clippy::too_many_arguments)]
fn check(
    m: &LanguageModel,
    tokens: &[u32],
    batch: usize,
    ctx: usize,
    hook: Hook,
    rows: &[usize],
    eps: f32,
    rel: f64,
) {
    let (acts, grad, loss) = m
        .activations_with_loss_grad(tokens, batch, ctx, hook)
        .unwrap();
    let width = m.hook_width(hook);
    assert_eq!(acts.len(), batch * ctx * width);
    assert_eq!(grad.len(), acts.len());
    // The activation is the one the plain forward pass captures.
    let plain = m.activations(tokens, batch, ctx, &hook.name()).unwrap();
    assert_eq!(acts, plain, "{}: activation differs", hook.name());
    let base: f64 = spliced_sum(m, tokens, batch, ctx, hook, 0, &vec![0.0; width]);
    assert!(
        (loss - base).abs() <= 1e-4 * base.abs(),
        "{}: loss {loss} vs forward {base}",
        hook.name()
    );
    // A context's last row predicts nothing and no later row reads it.
    for b in 0..batch {
        let last = (b * ctx + ctx - 1) * width;
        assert!(grad[last..last + width].iter().all(|&x| x == 0.0));
    }
    let mut seed = 17 + hook.layer as u64;
    for &row in rows {
        let g = &grad[row * width..(row + 1) * width];
        let g_norm = g.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
        assert!(g_norm > 0.0, "{} row {row}: zero gradient", hook.name());
        let along: Vec<f32> = g.iter().map(|&x| (x as f64 / g_norm) as f32).collect();
        for (which, dir) in [
            ("gradient", along),
            ("random", random_unit(&mut seed, width)),
        ] {
            let plus: Vec<f32> = dir.iter().map(|d| d * eps).collect();
            let minus: Vec<f32> = dir.iter().map(|d| -d * eps).collect();
            let fd = (spliced_sum(m, tokens, batch, ctx, hook, row, &plus)
                - spliced_sum(m, tokens, batch, ctx, hook, row, &minus))
                / (2.0 * eps as f64);
            let analytic: f64 = g.iter().zip(&dir).map(|(&a, &b)| a as f64 * b as f64).sum();
            let err = (fd - analytic).abs();
            assert!(
                err <= rel * g_norm,
                "{} row {row}, {which} direction: finite difference {fd:.6e}, gradient \
                 {analytic:.6e} (|g| {g_norm:.3e})",
                hook.name()
            );
        }
    }
}

#[test]
fn loss_gradient_matches_finite_differences_on_the_tiny_llama_at_every_hook() {
    let m = tiny();
    let vocab = m.tokenizer().vocab_size() as u32;
    let (batch, ctx) = (2, 7);
    let tokens: Vec<u32> = (0..batch * ctx)
        .map(|i| (i as u32 * 37 + 5) % vocab)
        .collect();
    let last = m.n_layers() - 1;
    for layer in [0, last] {
        for kind in HookKind::ALL {
            let hook = Hook { layer, kind };
            // BOS, a middle row, and a row of the second context.
            check(&m, &tokens, batch, ctx, hook, &[0, 3, ctx + 4], 1e-2, 2e-3);
        }
    }
}

#[test]
fn loss_gradient_matches_finite_differences_on_smollm2_layer_15() {
    let m = LanguageModel::load("smollm2-135m").expect("loading smollm2-135m");
    let tok = m.tokenizer();
    let mut tokens: Vec<u32> = tok.bos_id.into_iter().collect();
    tokens.extend(tok.encode(
        "The gradient of the loss tells the sparse autoencoder which latents matter for the \
         next token, not only which ones are large.",
    ));
    let ctx = 16;
    tokens.truncate(ctx);
    assert_eq!(tokens.len(), ctx);
    let hook = Hook {
        layer: 15,
        kind: HookKind::ResidPost,
    };
    check(&m, &tokens, 1, ctx, hook, &[1, 7, 13], 5e-2, 1e-2);
}
