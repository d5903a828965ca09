//! Bad-input cases: dead-latent resampling. A schedule the run cannot follow (another
//! architecture, a step at or past the end, steps out of order) and out-of-range resampling
//! settings are refused before any data is read or any directory created.

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A tiny synthetic store (d_in 8, 4000 rows), written once per test process.
fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let acts = scratch("resample-store").join("acts");
        synth_store(&acts, 4000, &[]);
        acts
    })
}

/// `sae train` with `bad` on the tiny store (20 steps) is refused naming `needles`, leaving
/// the store untouched and creating neither the output nor its working directory.
fn train_refused(name: &str, bad: &[&str], needles: &[&str]) {
    let dir = scratch(name);
    let out = dir.join("run");
    let mut args = vec![
        "train",
        "--acts",
        s(store()),
        "--out",
        s(&out),
        "--quiet",
        "--d-sae",
        "16",
        "--batch-size",
        "64",
        "--steps",
        "20",
        "--init-sample",
        "256",
        "--eval-tokens",
        "256",
    ];
    args.extend_from_slice(bad);
    refused(&args, needles, &[store(), &dir]);
    assert!(!out.exists(), "{name}: created {}", out.display());
    assert!(
        !dir.join("run.partial").exists(),
        "{name}: created run.partial"
    );
}

#[test]
fn resampling_another_architecture() {
    for arch in ["topk", "batchtopk", "jumprelu"] {
        train_refused(
            &format!("resample-{arch}"),
            &["--arch", arch, "--resample-steps", "10"],
            &["--resample-steps", "--arch relu or gated", arch],
        );
    }
}

#[test]
fn resampling_at_or_past_the_end() {
    for steps in ["5,20", "30"] {
        train_refused(
            "resample-end",
            &["--arch", "relu", "--resample-steps", steps],
            &["--resample-steps", "20 steps", "--steps"],
        );
    }
}

#[test]
fn resampling_steps_out_of_order_or_zero() {
    for steps in ["10,5", "5,5", "0,10"] {
        train_refused(
            "resample-order",
            &["--arch", "gated", "--resample-steps", steps],
            &["--resample-steps must be increasing step numbers", steps],
        );
    }
    train_refused(
        "resample-negative",
        &["--arch", "gated", "--resample-steps", "-5"],
        &["--resample-steps"],
    );
}

#[test]
fn resampling_window_or_sample_of_zero() {
    train_refused(
        "resample-window",
        &["--resample-steps", "10", "--resample-window", "0"],
        &["--resample-window must be at least 1"],
    );
    train_refused(
        "resample-sample",
        &["--resample-steps", "10", "--resample-sample", "0"],
        &["--resample-sample must be at least 1"],
    );
}

#[test]
fn resampling_in_a_config_file_for_topk() {
    let dir = scratch("resample-config");
    let cfg = dir.join("train.toml");
    std::fs::write(&cfg, "arch = \"topk\"\nk = 4\nresample_steps = [10]\n").unwrap();
    train_refused(
        "resample-config-run",
        &["--config", s(&cfg)],
        &["train.toml", "resample_steps", "--resample-steps"],
    );
}
