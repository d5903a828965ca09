//! One forward pass at several hooks gives, at each hook, exactly what a pass at that hook
//! alone gives, for both model families.

use sae_lm::harvest::{harvest, harvest_hooks, HarvestOptions};
use sae_lm::{Hook, LanguageModel};

fn fixture(name: &str) -> LanguageModel {
    let dir = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    LanguageModel::load(&dir).unwrap()
}

fn tokens(model: &LanguageModel, batch: usize, ctx: usize) -> Vec<u32> {
    let vocab = model.tokenizer().vocab_size() as u32;
    (0..batch * ctx)
        .map(|i| (i as u32 * 37 + 5) % vocab)
        .collect()
}

#[test]
fn activations_at_several_hooks_equal_single_hook_passes() {
    for name in ["tiny-llama", "tiny-gpt2"] {
        let m = fixture(name);
        let (batch, ctx) = (3, 11);
        let t = tokens(&m, batch, ctx);
        let last = m.n_layers() - 1;
        // Out of forward order, with attn.hook_z (another width for Llama) among them.
        let names = [
            format!("blocks.{last}.hook_resid_post"),
            "blocks.0.hook_resid_pre".to_string(),
            format!("blocks.{last}.attn.hook_z"),
            "blocks.1.hook_mlp_out".to_string(),
        ];
        let hooks: Vec<Hook> = names.iter().map(|n| m.hook(n).unwrap()).collect();
        let all = m.activations_at(&t, batch, ctx, &hooks).unwrap();
        for (n, got) in names.iter().zip(&all) {
            let want = m.activations(&t, batch, ctx, n).unwrap();
            assert!(
                *got == want,
                "{name} {n}: differs from a pass at that hook alone"
            );
        }
        let twice = [hooks[0], hooks[1], hooks[0]];
        let e = m.activations_at(&t, batch, ctx, &twice).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}

/// Activations, token ids and (context, position) of the rows a harvest handed out.
type Collected = (Vec<f32>, Vec<u32>, Vec<(u32, u32)>);

#[test]
fn harvest_at_several_hooks_hands_out_each_hooks_rows() {
    let m = fixture("tiny-llama");
    let ctx = 9;
    let n_ctx = 7;
    let contexts = sae_lm::corpus::PackedContexts {
        tokens: tokens(&m, n_ctx, ctx),
        ctx,
        origins: vec![(0, 0); n_ctx],
    };
    let opts = HarvestOptions {
        batch: 3,
        include_bos: false,
        max_rows: 40,
        first_context: 1,
        progress: false,
    };
    let names = ["blocks.2.hook_resid_post", "blocks.0.attn.hook_z"];
    let hooks: Vec<Hook> = names.iter().map(|n| m.hook(n).unwrap()).collect();
    let mut multi: Vec<Collected> = vec![Default::default(); 2];
    let stats = harvest_hooks(&m, &contexts, &hooks, &opts, |rows| {
        assert_eq!(rows.len(), 2);
        for (acc, r) in multi.iter_mut().zip(rows) {
            acc.0.extend_from_slice(r.acts);
            acc.1.extend_from_slice(r.tokens);
            acc.2.extend_from_slice(r.positions);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(stats.rows, 40);
    for (name, got) in names.iter().zip(&multi) {
        let mut want: Collected = Default::default();
        harvest(&m, &contexts, name, &opts, |r| {
            want.0.extend_from_slice(r.acts);
            want.1.extend_from_slice(r.tokens);
            want.2.extend_from_slice(r.positions);
            Ok(())
        })
        .unwrap();
        assert_eq!(want.1.len(), 40);
        assert!(
            *got == want,
            "{name}: rows differ from a single-hook harvest"
        );
    }
}
