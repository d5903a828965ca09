//! `--model DIR` (a Hugging Face directory) against transformers on the same files, repo ids
//! through a hub-cache layout, and .parquet corpora. The model is a tiny random Llama written
//! by tools/make_hf_fixture.py; the parquet files by tools/make_parquet_fixture.py.

mod common;

use common::{floats, rel_err};
use sae_lm::{LanguageModel, ProductPrecision};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny_dir() -> PathBuf {
    fixtures().join("tiny-llama")
}

/// A fixture model with transformers' reference values.
struct Fixture {
    model: LanguageModel,
    reference: Value,
}

fn load_fixture(name: &str) -> Fixture {
    let dir = fixtures().join(name);
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    Fixture {
        model: LanguageModel::load(dir.to_str().unwrap()).unwrap(),
        reference: serde_json::from_str(&text).unwrap(),
    }
}

fn llama() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| load_fixture("tiny-llama"))
}

fn gpt2() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| load_fixture("tiny-gpt2"))
}

fn model() -> &'static LanguageModel {
    &llama().model
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn contexts_of(f: &Fixture) -> (Vec<u32>, usize, usize) {
    let rows = f.reference["contexts"].as_array().unwrap();
    let tokens = rows.iter().flat_map(ids).collect();
    (
        tokens,
        rows.len(),
        f.reference["ctx"].as_u64().unwrap() as usize,
    )
}

fn contexts() -> (Vec<u32>, usize, usize) {
    contexts_of(llama())
}

fn activations_match(f: &Fixture) {
    let (tokens, batch, ctx) = contexts_of(f);
    let m = &f.model;
    let hooks = f.reference["hooks"].as_object().unwrap();
    assert!(hooks.len() >= 6);
    for (name, want) in hooks {
        let acts = m.activations(&tokens, batch, ctx, name).unwrap();
        assert_eq!(
            m.hook_width(m.hook(name).unwrap()),
            want["width"].as_u64().unwrap() as usize
        );
        let e = rel_err(&acts, &floats(&want["values"]));
        eprintln!("{name}: rel err {e:.2e}");
        assert!(e <= 1e-3, "{name}: rel err {e:.2e}");
    }
}

fn loss_matches(f: &Fixture) {
    let (tokens, batch, ctx) = contexts_of(f);
    let loss = f.model.per_token_loss(&tokens, batch, ctx, None).unwrap();
    let e = rel_err(&loss, &floats(&f.reference["per_token_loss"]));
    eprintln!("per-token loss rel err {e:.2e}");
    assert!(e <= 1e-3, "per-token loss rel err {e:.2e}");
}

fn tokenizer_matches(f: &Fixture) {
    let tok = f.model.tokenizer();
    // BOS from config.json (<|im_start|>), not the first special token of tokenizer.json.
    assert_eq!(
        tok.bos_id,
        Some(f.reference["bos_id"].as_u64().unwrap() as u32)
    );
    for case in f.reference["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text), ids(&case["ids"]), "text {text:?}");
        assert_eq!(tok.decode(&tok.encode(text)), text);
    }
}

#[test]
fn hf_dir_activations_match_transformers() {
    activations_match(llama());
}

#[test]
fn hf_dir_loss_matches_transformers() {
    loss_matches(llama());
}

#[test]
fn hf_dir_tokenizer_matches_transformers() {
    tokenizer_matches(llama());
}

#[test]
fn gpt2_matches_transformers() {
    let f = gpt2();
    activations_match(f);
    loss_matches(f);
    tokenizer_matches(f);
    // Splicing the identity changes nothing; layers and widths are the model's.
    let (tokens, batch, ctx) = contexts_of(f);
    let clean = f.model.per_token_loss(&tokens, batch, ctx, None).unwrap();
    let mut same = |_: &mut [f32]| Ok(());
    let spliced = f
        .model
        .per_token_loss(
            &tokens,
            batch,
            ctx,
            Some(("blocks.1.hook_mlp_out", &mut same)),
        )
        .unwrap();
    assert_eq!(clean, spliced);
    assert_eq!(f.model.hook_points().len(), 3 * 5);
    let logits = f.model.direction_logits(&[0.5; 64]).unwrap();
    assert_eq!(logits.len(), f.model.tokenizer().vocab_size());
    let e = format!(
        "{:#}",
        f.model
            .activations(&[1; 65], 1, 65, "blocks.0.hook_resid_pre")
            .unwrap_err()
    );
    assert!(e.contains("exceeds the model's 64 positions"), "{e}");
}

/// Copies the tiny model into `cache` laid out as huggingface_hub does: blobs, a snapshot of
/// symlinks, refs/main.
fn fake_hub_cache(cache: &Path, repo: &str, commit: &str) -> PathBuf {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snap = root.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(tiny_dir()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        let blob = root.join("blobs").join(format!("blob-{name}"));
        std::fs::copy(&p, &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob-{name}"), snap.join(&name)).unwrap();
    }
    snap
}

#[test]
fn repo_id_resolves_from_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let snap = fake_hub_cache(&cache, "acme/tiny-llama", "0123abcd");
    use sae_lm::hub::{looks_like_repo_id, resolve_in};
    assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M"));
    assert!(looks_like_repo_id("acme/tiny-llama@v1"));
    assert!(!looks_like_repo_id("./models/x"));
    assert!(!looks_like_repo_id("/abs/path"));
    assert!(!looks_like_repo_id("a/b/c"));
    assert!(!looks_like_repo_id("smollm2-135m"));
    assert_eq!(resolve_in(&cache, "acme/tiny-llama").unwrap(), snap);
    assert_eq!(
        resolve_in(&cache, "acme/tiny-llama@0123abcd").unwrap(),
        snap
    );

    // Not cached: the error says how to fetch it.
    let err = format!("{:#}", resolve_in(&cache, "acme/other").unwrap_err());
    assert!(
        err.contains("not in the Hugging Face cache") && err.contains("hf download acme/other"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        resolve_in(&cache, "acme/tiny-llama@feedbeef").unwrap_err()
    );
    assert!(err.contains("feedbeef"), "{err}");

    // Through LanguageModel::load with HF_HUB_CACHE: same model as the directory. (The only
    // test in this binary that sets the variable.)
    std::env::set_var("HF_HUB_CACHE", &cache);
    let m = LanguageModel::load("acme/tiny-llama").unwrap();
    assert_eq!(m.name, "acme/tiny-llama");
    let (tokens, batch, ctx) = contexts();
    let hook = "blocks.1.hook_resid_post";
    assert_eq!(
        m.activations(&tokens, batch, ctx, hook).unwrap(),
        model().activations(&tokens, batch, ctx, hook).unwrap()
    );
    let err = LanguageModel::load("acme/missing")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("hf download acme/missing"), "{err}");
}

#[test]
fn parquet_corpus_reads_the_text_column() {
    let tok = model().tokenizer();
    let pq = fixtures().join("docs.parquet");
    let spec = pq.to_str().unwrap();
    // The same documents as .jsonl (the null row left out) pack to the same contexts.
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Sparse autoencoders find interpretable features in the residual stream.",
        "def add(a, b):\n    return a + b\n",
        "Numbers like 12345 and 3.14159 appear in documentation. naïve café 東京",
    ];
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("docs.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .map(|t| serde_json::json!({ "body": t }).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let want =
        sae_lm::corpus::pack_corpus(&format!("{}#body", jsonl.display()), tok, 8, 1000, 0).unwrap();
    let got = sae_lm::corpus::pack_corpus(spec, tok, 8, 1000, 0).unwrap();
    assert!(got.n_contexts() >= 4);
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.origins, want.origins);

    // Another column by name.
    let content = sae_lm::corpus::pack_corpus(&format!("{spec}#content"), tok, 8, 1000, 0).unwrap();
    let first: Vec<u32> =
        tok.encode("Python's for statement iterates over the items of any sequence.");
    assert_eq!(&content.tokens[1..8], &first[..7]);

    // Bad columns and codecs: errors name the file and the way out.
    let err = format!(
        "{:#}",
        sae_lm::corpus::pack_corpus(&format!("{spec}#body"), tok, 8, 100, 0).unwrap_err()
    );
    assert!(
        err.contains("docs.parquet") && err.contains("no column 'body'") && err.contains("content"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        sae_lm::corpus::pack_corpus(&format!("{spec}#id"), tok, 8, 100, 0).unwrap_err()
    );
    assert!(err.contains("not text"), "{err}");
    let zstd = fixtures().join("docs_zstd.parquet");
    let err = format!(
        "{:#}",
        sae_lm::corpus::pack_corpus(zstd.to_str().unwrap(), tok, 8, 100, 0).unwrap_err()
    );
    assert!(
        err.contains("docs_zstd.parquet") && err.contains("snappy"),
        "{err}"
    );
    eprintln!("zstd: {err}");
    let junk = tmp.path().join("junk.parquet");
    std::fs::write(&junk, b"not parquet at all").unwrap();
    let err = format!(
        "{:#}",
        sae_lm::corpus::pack_corpus(junk.to_str().unwrap(), tok, 8, 100, 0).unwrap_err()
    );
    assert!(
        err.contains("junk.parquet") && err.contains("not a readable parquet"),
        "{err}"
    );
}

/// A copy of the tiny model with `config.json` edited and tensors added.
fn variant(dir: &Path, edit: impl Fn(&mut Value), extra: &[&str]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(tiny_dir()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    if !extra.is_empty() {
        let dev = candle_core::Device::Cpu;
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = extra
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    candle_core::Tensor::zeros(64, candle_core::DType::F32, &dev).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("extra.safetensors")).unwrap();
    }
    dir.to_str().unwrap().to_string()
}

#[test]
fn hf_dir_refuses_variants_it_does_not_compute() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |spec: String| format!("{:#}", LanguageModel::load(&spec).err().unwrap());
    let e = err(variant(
        &tmp.path().join("a"),
        |c| c["rope_parameters"]["rope_type"] = "llama3".into(),
        &[],
    ));
    assert!(
        e.contains("RoPE scaling 'llama3'") && e.contains("config.json"),
        "{e}"
    );
    let e = err(variant(
        &tmp.path().join("b"),
        |c| c["tie_word_embeddings"] = false.into(),
        &[],
    ));
    assert!(e.contains("lm_head.weight missing"), "{e}");
    let e = err(variant(
        &tmp.path().join("c"),
        |_| {},
        &["model.layers.0.self_attn.o_proj.bias"],
    ));
    assert!(e.contains("not used") && e.contains("o_proj.bias"), "{e}");
    let e = err(variant(
        &tmp.path().join("d"),
        |c| c["model_type"] = "gpt_neox".into(),
        &[],
    ));
    assert!(e.contains("'gpt_neox' is not supported"), "{e}");
    // The unedited copy loads.
    assert!(LanguageModel::load(&variant(&tmp.path().join("e"), |_| {}, &[])).is_ok());
}

#[test]
fn bf16_products_stay_near_transformers_and_gpt2_refuses_them() {
    for p in [ProductPrecision::Bf16, ProductPrecision::Bf16x3] {
        let e = format!(
            "{:#}",
            LanguageModel::load(fixtures().join("tiny-gpt2").to_str().unwrap())
                .unwrap()
                .set_products(p)
                .unwrap_err()
        );
        assert!(e.contains("Llama-family models only"), "{e}");
    }
    let mut m = LanguageModel::load(tiny_dir().to_str().unwrap()).unwrap();
    if !sae_lm::bf16::available() {
        assert!(m.set_products(ProductPrecision::Bf16).is_err());
        assert!(m.set_products(ProductPrecision::Bf16x3).is_err());
        return;
    }
    let (tokens, batch, ctx) = contexts();
    for (name, want) in llama().reference["hooks"].as_object().unwrap() {
        let want = floats(&want["values"]);
        let f32_err = rel_err(
            &model().activations(&tokens, batch, ctx, name).unwrap(),
            &want,
        );
        m.set_products(ProductPrecision::Bf16).unwrap();
        let e = rel_err(&m.activations(&tokens, batch, ctx, name).unwrap(), &want);
        m.set_products(ProductPrecision::Bf16x3).unwrap();
        let e3 = rel_err(&m.activations(&tokens, batch, ctx, name).unwrap(), &want);
        eprintln!("{name}: bf16 rel err {e:.2e}, bf16x3 {e3:.2e} (f32 {f32_err:.2e})");
        // bf16 keeps 8 significant bits: ~0.4% per rounding, well short of 1e-3 matches.
        assert!(
            e <= 3e-2 && e > 10.0 * f32_err,
            "{name}: bf16 rel err {e:.2e}"
        );
        // Three terms keep about 16: within the f32 path's 1e-3 match, far nearer than bf16.
        assert!(
            e3 <= 1e-3 && e3 < e / 30.0,
            "{name}: bf16x3 rel err {e3:.2e}"
        );
    }
    m.set_products(ProductPrecision::F32).unwrap();
    let name = "blocks.2.hook_resid_post";
    assert_eq!(
        m.activations(&tokens, batch, ctx, name).unwrap(),
        model().activations(&tokens, batch, ctx, name).unwrap()
    );
}
