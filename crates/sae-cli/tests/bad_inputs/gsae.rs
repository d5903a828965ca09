//! Bad-input cases: the g-SAE family and the loss gradients it trains on. A store without
//! gradients, a synthetic set, several hooks with `--with-grad`, a GPT-2 model with
//! `--with-grad`, and a bad `beta` are refused before any work, the inputs left
//! byte-identical; a gsae file whose `beta` is missing is refused on load.

use crate::harness::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../sae-lm/tests/fixtures/tiny-llama"
);
const TINY_GPT2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../sae-lm/tests/fixtures/tiny-gpt2"
);
const HOOK: &str = "blocks.1.hook_resid_post";

fn corpus(dir: &Path) -> PathBuf {
    let text = dir.join("text.txt");
    std::fs::write(&text, "def add(a, b):\n    return a + b\n".repeat(50)).unwrap();
    text
}

/// A store with gradients from the tiny Llama, a store without, and a gsae trained on the
/// first (k 2, d_sae 16), made once per process.
fn valid() -> &'static (PathBuf, PathBuf, PathBuf) {
    static VALID: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    VALID.get_or_init(|| {
        let root = scratch("gsae-valid");
        let text = corpus(&root);
        let (with, without) = (root.join("with-grad"), root.join("no-grad"));
        for (out, flag) in [(&with, Some("--with-grad")), (&without, None)] {
            let mut a = vec![
                "harvest",
                "--model",
                TINY,
                "--hook",
                HOOK,
                "--corpus",
                s(&text),
                "--ctx",
                "16",
                "--tokens",
                "300",
                "--out",
                s(out),
            ];
            a.extend(flag);
            ok(&a);
        }
        let sae_dir = root.join("sae");
        ok(&train(&with, &sae_dir, &["--arch-opt", "beta=0.5"]));
        ok(&["info", s(&sae_dir)]);
        (with, without, sae_dir)
    })
}

fn train<'a>(acts: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--acts",
        s(acts),
        "--out",
        s(out),
        "--arch",
        "gsae",
        "--k",
        "2",
        "--d-sae",
        "16",
        "--steps",
        "3",
        "--batch-size",
        "32",
        "--init-sample",
        "64",
        "--eval-tokens",
        "32",
        "--quiet",
    ];
    a.extend_from_slice(extra);
    a
}

fn train_refused(name: &str, acts: &Path, extra: &[&str], needles: &[&str]) {
    let dir = scratch(&format!("gsae-{name}"));
    let out = dir.join("run");
    refused(&train(acts, &out, extra), needles, &[acts, &dir]);
    assert!(!out.exists(), "{name}: created {}", out.display());
    assert!(
        !dir.join("run.partial").exists(),
        "{name}: created run.partial"
    );
}

#[test]
fn a_store_without_gradients_says_how_to_harvest_one() {
    let without = &valid().1;
    train_refused(
        "no-grad",
        without,
        &[],
        &[
            "--arch gsae",
            "no loss gradients",
            "sae harvest --with-grad",
        ],
    );
}

#[test]
fn a_synthetic_set_has_no_gradients() {
    let dir = scratch("gsae-synth");
    let out = dir.join("run");
    refused(
        &[
            "train",
            "--synth",
            "synthsaebench-small",
            "--arch",
            "gsae",
            "--k",
            "2",
            "--steps",
            "2",
            "--out",
            s(&out),
        ],
        &["--arch gsae", "sae harvest --with-grad"],
        &[&dir],
    );
    assert!(!out.exists());
}

#[test]
fn bad_beta() {
    let with = &valid().0;
    train_refused(
        "beta-negative",
        with,
        &["--arch-opt", "beta=-1"],
        &["--arch-opt", "beta = -1", "finite number >= 0"],
    );
    train_refused(
        "beta-text",
        with,
        &["--arch-opt", "beta=big"],
        &["--arch-opt", "'big' is not a number", "beta=0.5"],
    );
}

#[test]
fn with_grad_refuses_several_hooks_and_gpt2() {
    let dir = scratch("gsae-harvest");
    let text = corpus(&dir);
    let out = dir.join("acts");
    let hooks = format!("{HOOK},blocks.0.hook_resid_post");
    refused(
        &[
            "harvest",
            "--model",
            TINY,
            "--hook",
            &hooks,
            "--corpus",
            s(&text),
            "--ctx",
            "16",
            "--tokens",
            "60",
            "--with-grad",
            "--out",
            s(&out),
        ],
        &["--with-grad takes one --hook"],
        &[&dir],
    );
    assert!(!out.exists());
    refused(
        &[
            "harvest",
            "--model",
            TINY_GPT2,
            "--hook",
            "blocks.0.hook_resid_post",
            "--corpus",
            s(&text),
            "--ctx",
            "16",
            "--tokens",
            "60",
            "--with-grad",
            "--out",
            s(&out),
        ],
        &["--with-grad", "Llama-family", "not GPT-2"],
        &[&dir],
    );
    assert!(!out.join("manifest.json").exists());
}

/// A gsae file whose `beta` is missing is refused by `sae info`.
#[test]
fn saved_gradient_weight_that_is_missing() {
    let dir = scratch("gsae-file").join("sae");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(&valid().2).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let p = dir.join("cfg.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "topk");
    assert_eq!(cfg["sae_core"]["architecture"], "gsae");
    cfg["sae_core"].as_object_mut().unwrap().remove("beta");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    refused(&["info", s(&dir)], &["cfg.json", "sae_core.beta"], &[&dir]);
}

/// Training a g-SAE straight from a GPT-2 model is refused before anything is written.
#[test]
fn training_from_gpt2_is_refused() {
    let dir = scratch("gsae-gpt2-train");
    let text = corpus(&dir);
    let out = dir.join("run");
    refused(
        &[
            "train",
            "--model",
            TINY_GPT2,
            "--hook",
            "blocks.0.hook_resid_post",
            "--corpus",
            s(&text),
            "--ctx",
            "16",
            "--arch",
            "gsae",
            "--k",
            "2",
            "--d-sae",
            "32",
            "--steps",
            "2",
            "--quiet",
            "--out",
            s(&out),
        ],
        &["--arch gsae", "Llama-family", "not GPT-2"],
        &[&dir],
    );
    assert!(!out.exists() && !dir.join("run.partial").exists());
}
