//! Bad-input cases: a family's training options (`--arch-opt k_aux=...`, `bandwidth=...`,
//! `decoder_norm_l1=...`) and the older flags that set them (`--k-aux`, `--aux-coeff`,
//! `--jumprelu-bandwidth`, `--relu-decoder-norm-l1`). An option or flag for a family that
//! lacks it, a value out of range and a flag that disagrees with `--arch-opt` are refused
//! before any data is read or any directory created.

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A tiny synthetic store (d_in 8, 2000 rows), written once per test process.
fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let acts = scratch("knobs-store").join("acts");
        synth_store(&acts, 2000, &[]);
        acts
    })
}

/// `sae train` on the tiny store with `extra` is refused naming `needles`, leaving the store
/// untouched and creating neither the output nor its working directory.
fn train_refused(name: &str, extra: &[&str], needles: &[&str]) {
    let dir = scratch(&format!("knobs-{name}"));
    let out = dir.join("run");
    let mut args = vec![
        "train",
        "--acts",
        s(store()),
        "--out",
        s(&out),
        "--d-sae",
        "16",
        "--batch-size",
        "64",
        "--steps",
        "5",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    refused(&args, needles, &[store(), &dir]);
    assert!(!out.exists(), "{name}: created {}", out.display());
    assert!(
        !dir.join("run.partial").exists(),
        "{name}: created run.partial"
    );
}

#[test]
fn older_flag_for_a_family_without_the_option() {
    train_refused(
        "k-aux-relu",
        &["--arch", "relu", "--k-aux", "5"],
        &[
            "--k-aux must be left out unless --arch is topk, batchtopk",
            "vsae",
            "5 with --arch relu",
        ],
    );
    train_refused(
        "aux-coeff-jumprelu",
        &["--arch", "jumprelu", "--aux-coeff", "0.5"],
        &["--aux-coeff", "--arch is topk", "--arch-opt aux_coeff"],
    );
    train_refused(
        "bandwidth-topk",
        &["--arch", "topk", "--k", "3", "--jumprelu-bandwidth", "0.05"],
        &[
            "--jumprelu-bandwidth must be left out unless --arch is jumprelu",
            "--arch-opt bandwidth",
        ],
    );
    train_refused(
        "decoder-norm-gated",
        &["--arch", "gated", "--relu-decoder-norm-l1"],
        &[
            "--relu-decoder-norm-l1 must be left out unless --arch is relu",
            "true with --arch gated",
        ],
    );
}

#[test]
fn arch_opt_for_a_family_without_the_option() {
    train_refused(
        "arch-opt-relu",
        &["--arch", "relu", "--arch-opt", "k_aux=5"],
        &[
            "--arch-opt must be one of decoder_norm_l1 for --arch relu",
            "k_aux",
        ],
    );
    train_refused(
        "arch-opt-topk",
        &["--arch", "topk", "--k", "3", "--arch-opt", "bandwidth=0.05"],
        &[
            "--arch-opt must be one of k_aux, aux_coeff for --arch topk",
            "bandwidth",
        ],
    );
}

#[test]
fn arch_opt_values_out_of_range() {
    train_refused(
        "bandwidth-zero",
        &["--arch", "jumprelu", "--arch-opt", "bandwidth=0"],
        &["--arch-opt: bandwidth = 0", "must be > 0"],
    );
    train_refused(
        "bandwidth-text",
        &["--arch", "jumprelu", "--arch-opt", "bandwidth=wide"],
        &["bandwidth: 'wide' is not a finite number", "bandwidth=0.05"],
    );
    train_refused(
        "init-threshold-negative",
        &["--arch", "jumprelu", "--arch-opt", "init_threshold=-0.5"],
        &["--arch-opt: init_threshold = -0.5", "must be > 0"],
    );
    train_refused(
        "init-l0-over-d-sae",
        &["--arch", "jumprelu", "--arch-opt", "init_l0=17"],
        &["init_l0 = 17 is more than d_sae = 16"],
    );
    train_refused(
        "k-aux-negative",
        &["--arch", "topk", "--k", "3", "--arch-opt", "k_aux=-2"],
        &["k_aux: '-2' is not a whole number >= 0"],
    );
    train_refused(
        "k-aux-over-d-sae",
        &["--arch", "batchtopk", "--k", "3", "--arch-opt", "k_aux=17"],
        &["k_aux = 17 is more than d_sae = 16"],
    );
    train_refused(
        "k-aux-flag-over-d-sae",
        &["--arch", "topk", "--k", "3", "--k-aux", "17"],
        &["--k-aux: k_aux = 17 is more than d_sae = 16"],
    );
    train_refused(
        "aux-coeff-negative",
        &[
            "--arch",
            "matryoshka",
            "--k",
            "3",
            "--arch-opt",
            "aux_coeff=-1",
        ],
        &["aux_coeff = -1", "must be >= 0"],
    );
    train_refused(
        "decoder-norm-yes",
        &["--arch", "relu", "--arch-opt", "decoder_norm_l1=yes"],
        &["decoder_norm_l1: 'yes' is not true or false"],
    );
}

#[test]
fn older_flag_disagreeing_with_arch_opt() {
    train_refused(
        "k-aux-conflict",
        &[
            "--arch",
            "topk",
            "--k",
            "3",
            "--k-aux",
            "3",
            "--arch-opt",
            "k_aux=4",
        ],
        &["--k-aux must be left out or equal to --arch-opt k_aux=4; got 3"],
    );
}

/// `sae synthbench --arch-opt FAMILY:KEY=VALUE`: a malformed option, one for a family not
/// benchmarked, an option the family lacks and a value out of range are refused before any
/// sample is generated or the output created.
#[test]
fn synthbench_family_options() {
    let dir = scratch("knobs-synthbench");
    let out = dir.join("bench");
    let bench = |opts: &[&str]| {
        let mut args = vec![
            "synthbench",
            "--bench",
            "synthsaebench-small",
            "--samples",
            "4096",
            "--archs",
            "vsae,topk",
            "--out",
            s(&out),
        ];
        for o in opts {
            args.extend(["--arch-opt", o]);
        }
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let cases: [(&str, &[&str]); 4] = [
        ("vsae", &["--arch-opt vsae", "FAMILY:KEY=VALUE"]),
        (
            "gated:nothing=1",
            &["--arch-opt gated:nothing=1", "gated is not in --archs"],
        ),
        ("topk:beta=0.5", &["beta", "topk"]),
        ("vsae:beta=-1", &["beta"]),
    ];
    for (opt, needles) in cases {
        let args = bench(&[opt]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&args, needles, &[&dir]);
        assert!(!out.exists(), "--arch-opt {opt} created the output");
    }
}
