//! `sae harvest --with-grad`: the store holds, beside each activation row, the gradient of the
//! loss at that row (the same as `activations_with_loss_grad` of its context), the manifest
//! records it, a resumed run continues it, and a store without gradients says how to get one.

use sae_lm::harvest_store::{harvest_to_store, StoreHarvest, GRAD_OF};
use sae_lm::LanguageModel;
use sae_store::writer::{Manifest, StoreDtype};
use sae_store::ActivationStore;

const HOOK: &str = "blocks.1.hook_resid_post";

fn tiny() -> String {
    format!("{}/tests/fixtures/tiny-llama", env!("CARGO_MANIFEST_DIR"))
}

fn settings(corpus: &str, out: &std::path::Path, tokens: usize, with_grad: bool) -> StoreHarvest {
    StoreHarvest {
        model: tiny(),
        hooks: vec![HOOK.into()],
        corpus: corpus.into(),
        tokens,
        out: out.to_path_buf(),
        ctx: 8,
        dtype: StoreDtype::F32,
        batch: 3,
        products: sae_lm::ProductPrecision::F32,
        store_tokens: true,
        include_bos: false,
        shard_rows: 14,
        with_grad,
        progress: false,
    }
}

fn close(got: &[f32], want: &[f32], what: &str) {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    assert!(
        num.sqrt() <= 1e-5 * den.sqrt().max(1e-12),
        "{what}: differs"
    );
}

#[test]
fn stored_gradients_are_the_models_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "def add(a, b):\n    return a + b\n".repeat(40)).unwrap();
    let corpus = text.to_str().unwrap();
    let out = dir.path().join("acts");
    // Stopped after the first shard, then resumed.
    let stop = harvest_to_store(&settings(corpus, &out, 42, true), &mut |rows| {
        anyhow::ensure!(rows < 14, "stop");
        Ok(())
    });
    assert!(stop.is_err());
    let r = harvest_to_store(&settings(corpus, &out, 42, true), &mut |_| Ok(())).unwrap();
    let m = &r.stores[0].manifest;
    assert_eq!(m.grads.as_deref(), Some(GRAD_OF));
    assert_eq!(m.n_tokens, 42);
    assert_eq!(
        Manifest::read(&out).unwrap().grads.as_deref(),
        Some(GRAD_OF)
    );

    let acts = ActivationStore::open(&out).unwrap();
    let grads = ActivationStore::open_grads(&out).unwrap();
    assert_eq!((grads.n_rows(), grads.d_in()), (acts.n_rows(), acts.d_in()));
    // Recompute each context: rows are positions 1..8 of contexts 0, 1, ... in order.
    let model = LanguageModel::load(&tiny()).unwrap();
    let contexts = sae_lm::corpus::pack_corpus(corpus, model.tokenizer(), 8, 6 * 7, 0).unwrap();
    let hook = model.hook(HOOK).unwrap();
    let d = acts.d_in();
    let (mut a, mut g) = (vec![0f32; d], vec![0f32; d]);
    for c in 0..6 {
        let tokens = &contexts.tokens[c * 8..(c + 1) * 8];
        let (want_a, want_g, _) = model
            .activations_with_loss_grad(tokens, 1, 8, hook)
            .unwrap();
        for p in 1..8 {
            let row = (c * 7 + p - 1) as u64;
            acts.read_row(row, &mut a).unwrap();
            grads.read_row(row, &mut g).unwrap();
            // Batches of 3 contexts there, 1 here: the same up to rounding.
            close(
                &a,
                &want_a[p * d..(p + 1) * d],
                &format!("context {c} position {p}"),
            );
            close(
                &g,
                &want_g[p * d..(p + 1) * d],
                &format!("context {c} position {p} grad"),
            );
        }
    }
    // The last position of a context predicts nothing and nothing reads it: zero gradient.
    grads.read_row(6, &mut g).unwrap();
    assert!(g.iter().all(|&v| v == 0.0));
    grads.read_row(5, &mut g).unwrap();
    assert!(g.iter().any(|&v| v != 0.0));

    // A store without gradients: readable as before, and no gradients to open.
    let plain = dir.path().join("plain");
    harvest_to_store(&settings(corpus, &plain, 14, false), &mut |_| Ok(())).unwrap();
    assert_eq!(Manifest::read(&plain).unwrap().grads, None);
    let text = std::fs::read_to_string(plain.join("manifest.json")).unwrap();
    assert!(!text.contains("grads"), "{text}");
    assert_eq!(ActivationStore::open(&plain).unwrap().n_rows(), 14);
    let e = ActivationStore::open_grads(&plain)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sae harvest --with-grad"), "{e}");
    // Nor may a run with gradients continue one without.
    let e = harvest_to_store(&settings(corpus, &plain, 28, true), &mut |_| Ok(()))
        .err()
        .unwrap();
    assert!(e.to_string().contains("another run"), "{e}");
}
