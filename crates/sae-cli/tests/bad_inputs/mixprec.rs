//! Bad-input cases: the encoder product's precision (`--precision`), as a flag, in a config
//! file, and on `--resume` of a run started in the other precision.

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A tiny synthetic store (d_in 8), written once per test process.
fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let acts = scratch("mixprec-store").join("acts");
        synth_store(&acts, 4000, &[]);
        acts
    })
}

fn train_args<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--acts",
        s(store()),
        "--out",
        s(out),
        "--quiet",
        "--d-sae",
        "16",
        "--batch-size",
        "64",
        "--init-sample",
        "256",
        "--eval-tokens",
        "256",
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn unknown_precision() {
    let dir = scratch("mixprec-flag");
    let out = dir.join("run");
    refused(
        &train_args(&out, &["--steps", "5", "--precision", "fp8"]),
        &[
            "--precision",
            "fp8",
            "use f32, bf16, bf16-sparse, f32-bf16-sparse, f32-screened or bf16x3",
        ],
        &[store(), &dir],
    );
    assert!(!out.exists());
    refused(
        &["bench", "--precision", "f16"],
        &[
            "--precision",
            "use f32, bf16, bf16-sparse, f32-bf16-sparse, f32-screened or bf16x3",
        ],
        &[],
    );
    refused(
        &[
            "synthbench",
            "--samples",
            "1000",
            "--out",
            s(&out),
            "--precision",
            "half",
        ],
        &[
            "--precision",
            "use f32, bf16, bf16-sparse, f32-bf16-sparse, f32-screened or bf16x3",
        ],
        &[&dir],
    );
    assert!(!out.exists());
    refused(
        &["harvest", "--compute", "f16", "--out", s(&out)],
        &["--compute", "f16", "use f32, bf16 or bf16x3"],
        &[&dir],
    );
    assert!(!out.exists());
}

/// A family without an encoder product has nothing to run in bf16.
#[test]
fn bf16_for_a_pursuit_family() {
    let dir = scratch("mixprec-mp");
    let out = dir.join("run");
    refused(
        &train_args(
            &out,
            &[
                "--steps",
                "5",
                "--arch",
                "mp",
                "--k",
                "2",
                "--precision",
                "bf16",
            ],
        ),
        &["--precision", "f32 for --arch mp", "got bf16"],
        &[store(), &dir],
    );
    assert!(!out.exists());
}

#[test]
fn config_file_with_an_unknown_precision() {
    let dir = scratch("mixprec-config");
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, "precision = \"fp16\"\n").unwrap();
    let out = dir.join("run");
    refused(
        &train_args(&out, &["--steps", "5", "--config", s(&cfg)]),
        &["run.toml", "fp16", "bf16"],
        &[store(), &dir],
    );
    assert!(!out.exists());
}

/// A run started in bf16 that diverged (lr 1e30) after a checkpoint is not continued in f32.
#[test]
fn resume_in_the_other_precision() {
    let dir = scratch("mixprec-resume");
    let out = dir.join("run");
    let diverge = [
        "--steps",
        "20",
        "--lr",
        "1e30",
        "--lr-warmup-steps",
        "0",
        "--checkpoint-every",
        "1",
    ];
    let mut first = diverge.to_vec();
    first.extend(["--precision", "bf16"]);
    refused(
        &train_args(&out, &first),
        &["the loss is", "checkpoint at step"],
        &[store()],
    );
    assert!(dir.join("run.partial/checkpoint/progress.json").exists());
    let mut again = diverge.to_vec();
    again.push("--resume");
    refused(
        &train_args(&out, &again),
        &["--resume:", "--precision (precision) was bf16, now f32"],
        &[store(), &dir],
    );
    assert!(!out.exists());
}
