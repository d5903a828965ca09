//! The spliced-loss evaluation on the real default model (SmolLM2-135M, fetched on first use)
//! with hand-made SAEs whose reconstruction is known exactly:
//! * identity (relu with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x) must give
//!   the clean CE;
//! * all-zero weights must give the zero-ablation CE;
//! * zero weights with b_dec = the mean activation must give the mean-ablation CE;
//! * half the identity must give gamma = 0.5 exactly and FVU = 0.25 E||x||^2 / E||x - mean||^2.

use sae_core::Sae;
use sae_eval::eval::{self, Baseline, EvalData};
use sae_lm::LanguageModel;
use std::sync::OnceLock;

const HOOK: &str = "blocks.6.hook_resid_post";
const CTX: usize = 24;

fn model() -> &'static LanguageModel {
    static MODEL: OnceLock<LanguageModel> = OnceLock::new();
    MODEL.get_or_init(|| LanguageModel::load("smollm2-135m").expect("loading smollm2-135m"))
}

/// Three contexts of real text, BOS first in each.
fn data() -> EvalData {
    let m = model();
    let text = "The quick brown fox jumps over the lazy dog. Sparse autoencoders decompose \
                the activations of a language model into a few directions at a time, and a \
                good one keeps the model's loss close to what it was before. Python lists \
                are mutable sequences, typically used to store collections of items. A tuple is \
                an immutable sequence, and a dictionary maps hashable keys to arbitrary values; \
                both appear everywhere in the standard library.";
    let ids = m.tokenizer().encode(text);
    let bos = m.tokenizer().bos_id.expect("SmolLM2 has a BOS token");
    let per = CTX - 1;
    assert!(ids.len() >= 3 * per, "text too short: {} tokens", ids.len());
    let mut tokens = Vec::new();
    for c in 0..3 {
        tokens.push(bos);
        tokens.extend_from_slice(&ids[c * per..(c + 1) * per]);
    }
    EvalData {
        corpus: "inline".into(),
        hook: HOOK.into(),
        width: eval::hook_width(m, HOOK).unwrap(),
        ctx: CTX,
        batch: 2, // two batches, the second partial
        skip_tokens: 0,
        tokens,
    }
}

fn baseline(d: &EvalData) -> &'static Baseline {
    static BASE: OnceLock<Baseline> = OnceLock::new();
    BASE.get_or_init(|| eval::baseline(model(), d, &mut |_, _| Ok(())).unwrap())
}

fn zero_sae(d_in: usize, b_dec: Option<&[f32]>) -> Sae {
    let mut sae = Sae::scaled_identity(d_in, 1.0);
    sae.w_enc.fill(0.0);
    if let Some(b) = b_dec {
        sae.b_dec.copy_from_slice(b);
    }
    sae
}

fn evaluate(d: &EvalData, sae: &Sae, max_norm: Option<f32>) -> eval::EvalReport {
    eval::evaluate_sae(
        model(),
        sae,
        "test",
        d,
        baseline(d),
        max_norm,
        &mut |_, _| Ok(()),
    )
    .unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn identity_sae_gives_the_clean_loss() {
    let d = data();
    let base = baseline(&d);
    assert!(base.ce_zero > base.ce_clean + 1.0, "{base:?}");
    let r = evaluate(&d, &Sae::scaled_identity(d.width, 1.0), None);
    assert!(
        close(r.ce_sae, base.ce_clean, 1e-6),
        "{} vs {}",
        r.ce_sae,
        base.ce_clean
    );
    assert!(r.delta_lm_loss.abs() < 1e-5);
    assert!(close(r.loss_recovered, 1.0, 1e-5), "{}", r.loss_recovered);
    assert!(r.fvu < 1e-10 && close(r.gamma, 1.0, 1e-6), "{r:?}");
    assert_eq!(r.n_tokens, 3 * (CTX as u64 - 1));
}

#[test]
fn zero_sae_gives_the_zero_ablation_loss() {
    let d = data();
    let base = baseline(&d);
    let r = evaluate(&d, &zero_sae(d.width, None), None);
    assert!(
        close(r.ce_sae, base.ce_zero, 1e-6),
        "{} vs {}",
        r.ce_sae,
        base.ce_zero
    );
    assert!(r.loss_recovered.abs() < 1e-5, "{}", r.loss_recovered);
    assert_eq!(r.l0, 0.0);
    assert_eq!(r.firing.dead, d.width * 2);
}

#[test]
fn mean_sae_gives_the_mean_ablation_loss() {
    let d = data();
    let base = baseline(&d);
    assert_eq!(base.mean_act.len(), d.width);
    let r = evaluate(&d, &zero_sae(d.width, Some(&base.mean_act)), None);
    assert!(
        close(r.ce_sae, base.ce_mean_ablation, 1e-6),
        "{} vs {}",
        r.ce_sae,
        base.ce_mean_ablation
    );
    // A constant reconstruction at the mean explains no variance.
    assert!(close(r.fvu, 1.0, 1e-4), "fvu {}", r.fvu);
}

#[test]
fn half_identity_has_gamma_one_half() {
    let d = data();
    let base = baseline(&d);
    let r = evaluate(&d, &Sae::scaled_identity(d.width, 0.5), None);
    assert!(close(r.gamma, 0.5, 1e-6), "gamma {}", r.gamma);
    // Shrinking the residual stream by half costs the model loss.
    assert!(
        r.ce_sae > base.ce_clean,
        "{} vs {}",
        r.ce_sae,
        base.ce_clean
    );
    assert!(r.fvu > 0.25, "fvu {}", r.fvu);
}

#[test]
fn rows_over_the_norm_limit_stay_clean() {
    let d = data();
    let base = baseline(&d);
    let n = 3 * (CTX as u64 - 1);
    // A limit of 0 leaves every row clean: the zero SAE then costs nothing.
    let r = evaluate(&d, &zero_sae(d.width, None), Some(0.0));
    assert_eq!(r.n_unspliced, n);
    assert!(
        close(r.ce_sae, base.ce_clean, 1e-6),
        "{} vs {}",
        r.ce_sae,
        base.ce_clean
    );
    // An infinite limit splices every row.
    let r = evaluate(&d, &zero_sae(d.width, None), Some(f32::INFINITY));
    assert_eq!(r.n_unspliced, 0);
    assert!(close(r.ce_sae, base.ce_zero, 1e-6));
    assert_eq!(r.n_tokens, n);
}
