//! Training straight from a model (no store on disk), on the tiny Llama fixture of sae-lm.

use sae_lm::harvest::{harvest, HarvestOptions};
use sae_lm::LanguageModel;
use sae_train::{BatchSource, ModelSource, ModelSourceOptions, TrainConfig};
use std::path::Path;

const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../sae-lm/tests/fixtures/tiny-llama"
);
const HOOK: &str = "blocks.1.hook_resid_post";
const CTX: usize = 16;

/// Words in a pseudo-random order, so that no two contexts (and rows) are the same.
fn corpus(dir: &Path) -> String {
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "sparse", "features",
        "residual", "stream", "def", "add", "return", "for", "in", "sequence", "12", "3.5",
    ];
    let mut x = 7u64;
    let text: Vec<&str> = (0..3000)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            words[(x >> 33) as usize % words.len()]
        })
        .collect();
    std::fs::write(dir.join("a.txt"), text.join(" ")).unwrap();
    dir.to_str().unwrap().to_string()
}

/// The tiny model at `HOOK` over `spec`, 128 buffered rows, 4 contexts per pass.
fn source_options(spec: &str, seed: u64, bf16_compute: bool) -> ModelSourceOptions {
    ModelSourceOptions {
        model: TINY.into(),
        hook: HOOK.into(),
        corpus: spec.to_string(),
        ctx: CTX,
        tokens: 10_000,
        buffer_rows: 128,
        batch_contexts: 4,
        products: match bf16_compute {
            true => sae_lm::ProductPrecision::Bf16,
            false => sae_lm::ProductPrecision::F32,
        },
        seed,
        with_grads: false,
    }
}

#[test]
fn model_source_gives_shuffled_model_activations() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = corpus(tmp.path());
    let mut src = ModelSource::start(source_options(&spec, 1, false)).unwrap();
    let d = src.d_in();
    assert_eq!(d, 64);
    assert_eq!(src.meta().hook_name, HOOK);
    let n = 256;
    let mut got = vec![0f32; n * d];
    src.next_batch(&mut got, n).unwrap();

    // The same rows computed directly, in corpus order (BOS rows left out).
    let model = LanguageModel::load(TINY).unwrap();
    let contexts = sae_lm::corpus::pack_corpus(&spec, model.tokenizer(), CTX, 10_000, 0).unwrap();
    let mut all = Vec::new();
    let opts = HarvestOptions {
        batch: 4,
        include_bos: false,
        max_rows: usize::MAX,
        first_context: 0,
        progress: false,
    };
    harvest(&model, &contexts, HOOK, &opts, |r| {
        all.extend_from_slice(r.acts);
        Ok(())
    })
    .unwrap();
    // Every row handed out is one of the model's rows; they do not come in corpus order.
    let mut index = Vec::new();
    for row in got.chunks(d) {
        let i = all
            .chunks(d)
            .position(|a| a.iter().zip(row).all(|(x, y)| (x - y).abs() <= 1e-5))
            .expect("a row that the model does not produce");
        index.push(i);
    }
    let in_order = index.windows(2).filter(|w| w[1] == w[0] + 1).count();
    assert!(
        in_order < n / 4,
        "{in_order} of {n} rows follow their predecessor"
    );
    let mut distinct = index.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() > n * 3 / 4,
        "{} distinct of {n}",
        distinct.len()
    );
}

#[test]
fn train_straight_from_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = corpus(tmp.path());
    let out = tmp.path().join("sae");
    let cfg = TrainConfig {
        model: Some(TINY.into()),
        hook: Some(HOOK.into()),
        corpus: spec.clone(),
        ctx: CTX,
        buffer_rows: 256,
        out: out.clone(),
        d_sae: Some(128),
        batch_size: 64,
        steps: Some(6),
        init_sample: 128,
        eval_tokens: 128,
        checkpoint_every: 0,
        quiet: true,
        ..Default::default()
    };
    let s = sae_train::run(&cfg).unwrap();
    assert_eq!((s.steps, s.tokens, s.d_in, s.d_sae), (6, 384, 64, 128));
    assert_eq!(s.final_metrics.eval_tokens, 128);
    assert!(s.final_metrics.fvu.is_finite() && s.final_metrics.fvu > 0.0);
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["metadata"]["hook_name"], HOOK);
    assert_eq!(cfg_json["metadata"]["model_name"], TINY);
    assert!(out.join("sae_weights.safetensors").is_file());

    // Clear errors: no length, a bad hook, both sources (into a new --out: the trained
    // SAE in `out` would be refused first).
    let cfg = TrainConfig {
        out: tmp.path().join("sae2"),
        ..cfg
    };
    let err = sae_train::run(&TrainConfig {
        steps: None,
        ..cfg.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("--steps or --tokens"), "{err}");
    let err = format!(
        "{:#}",
        sae_train::run(&TrainConfig {
            hook: Some("blocks.9.hook_resid_post".into()),
            ..cfg.clone()
        })
        .unwrap_err()
    );
    assert!(
        err.contains("unknown hook") && err.contains("0..3"),
        "{err}"
    );
    let err = sae_train::run(&TrainConfig {
        acts: Some(tmp.path().into()),
        ..cfg.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("not both"), "{err}");
    let err = format!(
        "{:#}",
        sae_train::run(&TrainConfig {
            corpus: tmp.path().join("nope").display().to_string(),
            out: tmp.path().join("sae2"),
            ..cfg
        })
        .unwrap_err()
    );
    assert!(err.contains("nope") && err.contains("not found"), "{err}");
}

/// `bf16_compute` runs the model's products in bf16: the same stream of rows (same order), each
/// close to its f32 value but not equal to it; where the CPU has no bf16 products, `start`
/// refuses with an error that says so.
#[test]
fn model_source_runs_the_model_in_bf16_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = corpus(tmp.path());
    let options = |bf16_compute: bool| source_options(&spec, 3, bf16_compute);
    if !sae_lm::bf16::available() {
        let err = ModelSource::start(options(true))
            .err()
            .expect("no bf16 products here");
        assert!(format!("{err:#}").contains("bf16"), "{err:#}");
        eprintln!("skipped the comparison: this CPU has no AVX512-BF16");
        return;
    }
    let (mut f32_src, mut bf16_src) = (
        ModelSource::start(options(false)).unwrap(),
        ModelSource::start(options(true)).unwrap(),
    );
    let (n, d) = (256, f32_src.d_in());
    let (mut exact, mut rounded) = (vec![0f32; n * d], vec![0f32; n * d]);
    f32_src.next_batch(&mut exact, n).unwrap();
    bf16_src.next_batch(&mut rounded, n).unwrap();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let mut differ = 0;
    for (e, r) in exact.chunks(d).zip(rounded.chunks(d)) {
        let diff: Vec<f32> = e.iter().zip(r).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(e);
        assert!(rel < 3e-2, "a bf16 row {rel:.2e} away from its f32 value");
        differ += usize::from(rel > 0.0);
    }
    assert!(
        differ > n / 2,
        "only {differ} of {n} rows differ: bf16 was not used"
    );
}
