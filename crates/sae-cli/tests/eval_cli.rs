//! `sae eval` and `sae sweep` through the built binary: an identity SAE on the real default
//! model (its spliced CE must equal the clean CE, and the report files must appear), and the
//! bad-input paths, which must fail before any long work.

mod common;

use common::{fails_with, s, sae, scratch};
use sae_core::{saelens, Sae};
use std::path::{Path, PathBuf};

const HOOK: &str = "blocks.3.hook_resid_post";

/// An SAE whose reconstruction is exactly x, saved for `HOOK`.
fn identity_sae(d_in: usize) -> Sae {
    let mut sae = Sae::scaled_identity(d_in, 1.0);
    sae.meta.hook_name = HOOK.into();
    sae.meta.model_name = "smollm2-135m".into();
    sae
}

fn corpus(dir: &Path) -> PathBuf {
    let p = dir.join("text.txt");
    let para = "A sparse autoencoder reads the residual stream of a language model and writes \
                it back as a sum of a few directions. The model's loss with the reconstruction \
                spliced in tells how much of what the model uses survived. ";
    std::fs::write(&p, para.repeat(12)).unwrap();
    p
}

fn number_after(text: &str, key: &str) -> f64 {
    let rest = &text[text
        .find(key)
        .unwrap_or_else(|| panic!("no '{key}' in {text}"))
        + key.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn eval_identity_sae_gives_clean_loss_and_writes_the_report() {
    let dir = scratch("identity");
    let sae_dir = dir.join("sae");
    saelens::save(&identity_sae(576), &sae_dir).unwrap();
    let text = corpus(&dir);
    let out_dir = dir.join("eval");
    let out = sae(&[
        "eval",
        "--sae",
        s(&sae_dir),
        "--corpus",
        s(&text),
        "--tokens",
        "200",
        "--ctx",
        "32",
        "--skip-tokens",
        "0",
        "--out",
        s(&out_dir),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let clean = number_after(&stdout, "CE clean");
    let spliced = number_after(&stdout, "SAE");
    let zero = number_after(&stdout, "zero");
    assert!((clean - spliced).abs() < 1e-4, "{stdout}");
    assert!(zero > clean + 0.5, "{stdout}");
    assert!(
        (number_after(&stdout, "gamma") - 1.0).abs() < 1e-4,
        "{stdout}"
    );
    for f in ["eval.json", "report.md", "firing_hist.png"] {
        let p = out_dir.join(f);
        assert!(
            p.is_file() && std::fs::metadata(&p).unwrap().len() > 100,
            "{}",
            p.display()
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json["hook"], HOOK);
    assert!((json["loss_recovered"].as_f64().unwrap() - 1.0).abs() < 1e-3);
}

#[test]
fn eval_bad_inputs_fail_before_work() {
    let dir = scratch("bad");
    let missing = dir.join("nope");
    fails_with(&sae(&["eval", "--sae", s(&missing)]), &["does not exist"]);

    let half = dir.join("half");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("cfg.json"), "{}").unwrap();
    fails_with(
        &sae(&["eval", "--sae", s(&half)]),
        &["sae_weights.safetensors"],
    );

    // An SAE 8 wide against a 576-wide hook.
    let narrow = dir.join("narrow");
    let mut small = identity_sae(8);
    small.meta.hook_name = HOOK.into();
    saelens::save(&small, &narrow).unwrap();
    let text = corpus(&dir);
    fails_with(
        &sae(&[
            "eval",
            "--sae",
            s(&narrow),
            "--corpus",
            s(&text),
            "--skip-tokens",
            "0",
        ]),
        &["d_in 8", "576"],
    );
    // An unknown hook.
    fails_with(
        &sae(&[
            "eval",
            "--sae",
            s(&narrow),
            "--corpus",
            s(&text),
            "--skip-tokens",
            "0",
            "--hook",
            "blocks.99.hook_resid_post",
        ]),
        &["blocks.99"],
    );
}

#[test]
fn sweep_bad_grids_fail_before_work() {
    let dir = scratch("grid");
    let acts = dir.join("acts");
    // The grid is checked before the store is opened.
    fails_with(
        &sae(&[
            "sweep",
            "--acts",
            s(&acts),
            "--arch",
            "gated",
            "--out",
            s(&dir.join("o")),
        ]),
        &["no runs for gated", "--l1"],
    );
    fails_with(
        &sae(&[
            "sweep",
            "--acts",
            s(&acts),
            "--arch",
            "gated",
            "--l1",
            "topk=1",
            "--out",
            s(&dir.join("o")),
        ]),
        &["topk is not among the --arch"],
    );
    fails_with(
        &sae(&[
            "sweep",
            "--acts",
            s(&acts),
            "--arch",
            "gated",
            "--l1",
            "gated=x",
            "--out",
            s(&dir.join("o")),
        ]),
        &["--l1"],
    );
    fails_with(
        &sae(&[
            "sweep",
            "--acts",
            s(&acts),
            "--arch",
            "gated",
            "--l1",
            "1",
            "--out",
            s(&dir.join("o")),
        ]),
        &["activation store"],
    );
}
