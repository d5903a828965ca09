//! `sae eval` and `sae sweep` through the built binary: an identity SAE on the real default
//! model (its spliced CE must equal the clean CE, and the report files must appear), and the
//! bad-input paths, which must fail before any long work.

use sae_core::{saelens, ArchKind, Sae};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const HOOK: &str = "blocks.3.hook_resid_post";

fn sae(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .output()
        .expect("running sae")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sae-eval-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail; stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks '{n}': {err}");
    }
}

/// relu SAE with W_enc = [I, -I], W_dec = [I; -I]: x_hat = x exactly.
fn identity_sae(d_in: usize) -> Sae {
    let d_sae = 2 * d_in;
    let mut sae = Sae::init(ArchKind::Relu, d_in, d_sae, 0, 0);
    sae.w_enc.iter_mut().for_each(|w| *w = 0.0);
    sae.w_dec.iter_mut().for_each(|w| *w = 0.0);
    sae.b_enc.iter_mut().for_each(|b| *b = 0.0);
    sae.b_dec.iter_mut().for_each(|b| *b = 0.0);
    for i in 0..d_in {
        sae.w_enc[i * d_sae + i] = 1.0;
        sae.w_enc[i * d_sae + d_in + i] = -1.0;
        sae.w_dec[i * d_in + i] = 1.0;
        sae.w_dec[(d_in + i) * d_in + i] = -1.0;
    }
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
