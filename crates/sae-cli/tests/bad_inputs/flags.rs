//! Bad-input cases: flags. Every setting is checked before any data is read or any directory
//! created; `--resume` refuses another run's settings or data; a run that stopped before its
//! first checkpoint has a way forward.

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A tiny synthetic store (d_in 8, 4000 rows), written once per test process.
fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| seeded_store("flags-store", 0))
}

fn seeded_store(name: &str, seed: u64) -> PathBuf {
    let acts = scratch(name).join("acts");
    synth_store(&acts, 4000, &["--seed", &seed.to_string()]);
    acts
}

/// `sae train` on the tiny store with quick settings, `extra` replacing any of them (clap
/// takes a flag once).
fn train_args<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let quick = [
        ("--d-sae", "16"),
        ("--batch-size", "64"),
        ("--steps", "20"),
        ("--init-sample", "256"),
        ("--eval-tokens", "256"),
    ];
    let mut a = vec!["train", "--acts", s(store()), "--out", s(out), "--quiet"];
    for (flag, value) in quick {
        if !extra.iter().any(|e| e.split('=').next() == Some(flag)) {
            a.extend([flag, value]);
        }
    }
    a.extend_from_slice(extra);
    a
}

/// `sae train` with `bad` is refused naming `needles`, leaving the store untouched and
/// creating neither the output nor its working directory.
fn train_refused(name: &str, bad: &[&str], needles: &[&str]) -> String {
    let dir = scratch(name);
    let out = dir.join("run");
    let err = refused(&train_args(&out, bad), needles, &[store(), &dir]);
    assert!(!out.exists(), "{name}: created {}", out.display());
    assert!(
        !dir.join("run.partial").exists(),
        "{name}: created run.partial"
    );
    err
}

#[test]
fn adam_beta2_of_one() {
    train_refused(
        "beta2",
        &["--adam-beta2", "1"],
        &["--adam-beta2 must be in [0, 1)"],
    );
}

#[test]
fn adam_beta1_negative_after_a_space() {
    train_refused(
        "beta1",
        &["--adam-beta1", "-0.5"],
        &["--adam-beta1 must be in [0, 1)"],
    );
}

#[test]
fn adam_eps_negative_or_nan() {
    train_refused(
        "eps-neg",
        &["--adam-eps=-1e-8"],
        &["--adam-eps must be a positive number"],
    );
    train_refused(
        "eps-nan",
        &["--adam-eps", "NaN"],
        &["--adam-eps must be a positive number"],
    );
}

#[test]
fn jumprelu_bandwidth_zero() {
    train_refused(
        "bandwidth",
        &["--arch", "jumprelu", "--jumprelu-bandwidth", "0"],
        &["--jumprelu-bandwidth must be a positive number"],
    );
}

#[test]
fn init_sample_zero() {
    train_refused(
        "init-sample",
        &["--init-sample", "0"],
        &["--init-sample must be at least 1"],
    );
}

#[test]
fn l1_nan_and_aux_coeff_negative() {
    train_refused(
        "l1-nan",
        &["--l1", "nan"],
        &["--l1 must be a non-negative number"],
    );
    train_refused(
        "aux-coeff",
        &["--arch", "topk", "--k", "4", "--aux-coeff", "-1"],
        &["--aux-coeff must be a non-negative number"],
    );
}

#[test]
fn lr_negative_after_a_space() {
    train_refused(
        "lr-neg",
        &["--lr", "-1"],
        &["--lr must be a positive number; got -1"],
    );
}

#[test]
fn max_norm_ratio_below_one() {
    train_refused(
        "max-norm",
        &["--max-norm-ratio", "0.5"],
        &["--max-norm-ratio must be 0"],
    );
}

#[test]
fn k_zero_for_topk() {
    train_refused(
        "k0",
        &["--arch", "topk", "--k", "0"],
        &["--k must be at least 1"],
    );
}

#[test]
fn counts_of_zero() {
    for (flag, name) in [
        ("--batch-size", "bs0"),
        ("--log-every", "log0"),
        ("--dead-window-tokens", "dead0"),
        ("--eval-tokens", "evaltok0"),
        ("--steps", "steps0"),
        ("--threads", "threads0"),
    ] {
        train_refused(name, &[flag, "0"], &[&format!("{flag} must be at least 1")]);
    }
}

#[test]
fn count_flag_negative_is_not_a_count() {
    // Parsed as a number, so clap names the flag rather than "unexpected argument '-5'".
    let err = train_refused("steps-neg", &["--steps", "-5"], &["--steps"]);
    assert!(!err.contains("unexpected argument"), "{err}");
}

#[test]
fn config_file_with_a_bad_value() {
    let dir = scratch("config-bad");
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, "adam_beta2 = 1.5\n").unwrap();
    let out = dir.join("run");
    refused(
        &train_args(&out, &["--config", s(&cfg)]),
        &[
            "run.toml",
            "adam_beta2 must be in [0, 1)",
            "--adam-beta2",
            "got 1.5",
        ],
        &[store(), &dir],
    );
    assert!(!out.exists() && !dir.join("run.partial").exists());
}

#[test]
fn config_file_json_with_a_negative_lr() {
    let dir = scratch("config-json");
    let cfg = dir.join("run.json");
    std::fs::write(&cfg, r#"{"lr": -0.001}"#).unwrap();
    let out = dir.join("run");
    refused(
        &train_args(&out, &["--config", s(&cfg)]),
        &["run.json", "lr must be a positive number"],
        &[store(), &dir],
    );
    assert!(!out.exists());
}

#[test]
fn unknown_option() {
    let dir = scratch("unknown");
    let out = dir.join("run");
    refused(
        &train_args(&out, &["--learning-rate", "1e-3"]),
        &["--learning-rate"],
        &[store(), &dir],
    );
    assert!(!out.exists());
}

/// A run that diverges (lr 1e30) after a few steps, with a checkpoint every step: it leaves
/// `run.partial` with a checkpoint and no `run`.
fn diverged_run(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    let out = dir.join("run");
    let err = refused(
        &train_args(
            &out,
            &[
                "--lr",
                "1e30",
                "--lr-warmup-steps",
                "0",
                "--checkpoint-every",
                "1",
            ],
        ),
        &["the loss is", "checkpoint at step"],
        &[store()],
    );
    assert!(!out.exists(), "{err}");
    assert!(
        dir.join("run.partial/checkpoint/progress.json").exists(),
        "{err}"
    );
    (dir, out)
}

#[test]
fn resume_with_another_l1() {
    let (dir, out) = diverged_run("resume-l1");
    refused(
        &train_args(
            &out,
            &[
                "--lr",
                "1e30",
                "--lr-warmup-steps",
                "0",
                "--checkpoint-every",
                "1",
                "--l1",
                "9",
                "--resume",
            ],
        ),
        &["--resume:", "--l1 (the sparsity coefficient) was", "now 9"],
        &[store(), &dir],
    );
    assert!(!out.exists());
}

#[test]
fn resume_with_another_store() {
    let (dir, out) = diverged_run("resume-store");
    let other = seeded_store("flags-other-store", 1);
    let mut args = train_args(
        &out,
        &[
            "--lr",
            "1e30",
            "--lr-warmup-steps",
            "0",
            "--checkpoint-every",
            "1",
            "--resume",
        ],
    );
    args[2] = s(&other);
    refused(
        &args,
        &["--resume:", "--acts (the store's path) was"],
        &[store(), &other, &dir],
    );
    assert!(!out.exists());
}

#[test]
fn fresh_start_beside_a_checkpoint_names_resume_and_delete() {
    let (dir, out) = diverged_run("fresh-beside");
    refused(
        &train_args(&out, &[]),
        &[
            "holds an unfinished run with a checkpoint at step",
            "--resume",
            "delete",
        ],
        &[store(), &dir],
    );
}

#[test]
fn no_checkpoint_yet_resume_refused_then_a_fresh_start_works() {
    let dir = scratch("no-checkpoint");
    let out = dir.join("run");
    let diverge = [
        "--lr",
        "1e30",
        "--lr-warmup-steps",
        "0",
        "--checkpoint-every",
        "0",
    ];
    let err = refused(
        &train_args(&out, &diverge),
        &["the loss is", "No checkpoint was written yet"],
        &[store()],
    );
    assert!(
        !err.contains("checkpoint at") && !err.contains("--resume or"),
        "{err}"
    );
    assert!(dir.join("run.partial").exists() && !out.exists());
    let mut resume = diverge.to_vec();
    resume.push("--resume");
    refused(
        &train_args(&out, &resume),
        &["holds no checkpoint", "run again without --resume"],
        &[store(), &dir],
    );
    // The way forward both messages name.
    let ok = sae(&train_args(&out, &[]));
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{stderr}");
    assert!(stderr.contains("before its first checkpoint"), "{stderr}");
    assert!(out.join("sae_weights.safetensors").exists());
    assert!(!dir.join("run.partial").exists());
}

#[test]
fn eval_tokens_zero() {
    let dir = scratch("eval-tokens");
    refused(
        &["eval", "--sae", s(&dir.join("missing")), "--tokens", "0"],
        &["--tokens must be at least 1"],
        &[&dir],
    );
    refused(
        &["eval", "--sae", s(&dir.join("missing")), "--ctx", "1"],
        &["--ctx must be at least 2"],
        &[&dir],
    );
}

#[test]
fn sweep_bad_flags() {
    for (name, bad, needle) in [
        (
            "sweep-eval0",
            ["--eval-tokens", "0"],
            "--eval-tokens must be at least 1",
        ),
        ("sweep-lr", ["--lr", "-1"], "--lr must be a positive number"),
        (
            "sweep-bs0",
            ["--batch-size", "0"],
            "--batch-size must be at least 1",
        ),
        (
            "sweep-steps0",
            ["--steps", "0"],
            "--steps must be at least 1",
        ),
    ] {
        let dir = scratch(name);
        let out = dir.join("sweep");
        let mut args = vec![
            "sweep",
            "--acts",
            s(store()),
            "--out",
            s(&out),
            "--arch",
            "relu",
            "--l1",
            "1",
        ];
        args.extend_from_slice(&bad);
        refused(&args, &[needle], &[store(), &dir]);
        assert!(!out.exists(), "{name}: created {}", out.display());
    }
}

#[test]
fn unknown_family_lists_the_registered_ones() {
    train_refused(
        "arch-unknown",
        &["--arch", "sparsemax"],
        &[
            "unknown architecture 'sparsemax'",
            "gated, relu, topk, batchtopk, jumprelu, matryoshka",
        ],
    );
}

#[test]
fn family_options_are_checked_before_any_work() {
    let cases: [(&str, &[&str], &[&str]); 6] = [
        (
            "widths-order",
            &[
                "--arch",
                "matryoshka",
                "--k",
                "2",
                "--arch-opt",
                "widths=8,4,16",
            ],
            &["--arch-opt", "widths [8, 4, 16] must be increasing"],
        ),
        (
            "widths-end",
            &[
                "--arch",
                "matryoshka",
                "--k",
                "2",
                "--arch-opt",
                "widths=4,8",
            ],
            &["--arch-opt", "must end at d_sae = 16"],
        ),
        (
            "widths-text",
            &[
                "--arch",
                "matryoshka",
                "--k",
                "2",
                "--arch-opt",
                "widths=4,x,16",
            ],
            &["--arch-opt", "'x' is not a count"],
        ),
        (
            "opt-typo",
            &[
                "--arch",
                "matryoshka",
                "--k",
                "2",
                "--arch-opt",
                "width=4,16",
            ],
            &[
                "--arch-opt",
                "one of widths, k_aux, aux_coeff for --arch matryoshka",
                "width",
            ],
        ),
        (
            "opt-other-family",
            &["--arch", "mp", "--k", "2", "--arch-opt", "widths=4,16"],
            &["--arch-opt", "mp has no options of its own"],
        ),
        (
            "opt-no-value",
            &["--arch", "matryoshka", "--k", "2", "--arch-opt", "widths"],
            &["--arch-opt widths", "NAME=VALUE"],
        ),
    ];
    for (name, bad, needles) in cases {
        train_refused(name, bad, needles);
    }
}

#[test]
fn matryoshka_k_larger_than_d_sae() {
    train_refused(
        "matryoshka-k",
        &["--arch", "matryoshka", "--k", "17"],
        &["--k must be between 1 and d_sae = 16 for matryoshka"],
    );
}

#[test]
fn target_l0_on_a_k_family_negative_or_without_its_target() {
    train_refused(
        "target-l0-topk",
        &["--arch", "topk", "--k", "4", "--target-l0", "4"],
        &["--target-l0", "reaches its L0 through --k"],
    );
    train_refused(
        "target-l0-neg",
        &["--target-l0", "-5"],
        &["--target-l0 must be a positive number"],
    );
    train_refused(
        "target-l0-rate-alone",
        &["--target-l0-rate", "0.01"],
        &["--target-l0-rate", "without --target-l0"],
    );
    train_refused(
        "target-l0-rate-big",
        &["--target-l0", "5", "--target-l0-rate", "2"],
        &["--target-l0-rate must be in (0, 1)"],
    );
}
