//! Bad-input cases: the vSAE family. Its KL coefficient and k are checked before any data is
//! read or any directory created; a vSAE file whose `beta` is negative or missing is refused
//! on load, the directory left byte-identical.

use crate::harness::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A tiny store and a vSAE (d_in 8, d_sae 16, k 3) trained on it, made once per process.
fn valid() -> &'static (PathBuf, PathBuf) {
    static VALID: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    VALID.get_or_init(|| {
        let root = scratch("vsae-valid");
        let (acts, sae_dir) = (root.join("acts"), root.join("sae"));
        synth_store(&acts, 2000, &[]);
        ok(&train(
            &acts,
            &sae_dir,
            &["--k", "3", "--arch-opt", "beta=0.5"],
        ));
        ok(&["info", s(&sae_dir)]);
        (acts, sae_dir)
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
        "vsae",
        "--d-sae",
        "16",
        "--steps",
        "5",
        "--batch-size",
        "64",
        "--quiet",
    ];
    a.extend_from_slice(extra);
    a
}

fn train_refused(name: &str, extra: &[&str], needles: &[&str]) {
    let acts = &valid().0;
    let dir = scratch(&format!("vsae-{name}"));
    let out = dir.join("run");
    refused(&train(acts, &out, extra), needles, &[acts, &dir]);
    assert!(!out.exists(), "{name}: created {}", out.display());
    assert!(
        !dir.join("run.partial").exists(),
        "{name}: created run.partial"
    );
}

#[test]
fn negative_kl_coefficient() {
    train_refused(
        "beta-negative",
        &["--k", "3", "--arch-opt", "beta=-1"],
        &["--arch-opt", "beta = -1", "finite number >= 0"],
    );
}

#[test]
fn kl_coefficient_that_is_not_a_number() {
    train_refused(
        "beta-text",
        &["--k", "3", "--arch-opt", "beta=lots"],
        &["--arch-opt", "'lots' is not a number", "beta=0.5"],
    );
}

#[test]
fn k_larger_than_d_sae() {
    train_refused(
        "k",
        &["--k", "17"],
        &["--k must be between 1 and d_sae = 16 for vsae"],
    );
}

/// A vSAE file with a negative or missing KL coefficient is refused by `sae info`.
#[test]
fn saved_kl_coefficient_that_is_negative_or_missing() {
    for (case, beta) in [("negative", Some(-2.0)), ("missing", None)] {
        let dir = scratch(&format!("vsae-file-{case}")).join("sae");
        std::fs::create_dir(&dir).unwrap();
        for e in std::fs::read_dir(&valid().1).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
            }
        }
        let p = dir.join("cfg.json");
        let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(cfg["architecture"], "topk");
        assert_eq!(cfg["sae_core"]["architecture"], "vsae");
        match beta {
            Some(b) => cfg["sae_core"]["beta"] = b.into(),
            None => {
                cfg["sae_core"].as_object_mut().unwrap().remove("beta");
            }
        }
        std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let needle = if beta.is_some() {
            "beta = -2"
        } else {
            "sae_core.beta"
        };
        refused(&["info", s(&dir)], &["cfg.json", needle], &[&dir]);
    }
}
