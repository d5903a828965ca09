//! Bad-input cases: SAE directories. A broken SAE (non-finite weights, a truncated weights
//! file, impossible sizes or k, a cfg.json that is not JSON, an architecture or cfg key we do
//! not implement, a missing file) is refused when it is loaded, before any model work, with a
//! message naming the file and what is wrong; the SAE directory is left byte-identical.

use crate::harness::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

struct Valid {
    acts: PathBuf,
    sae: PathBuf,
}

/// A tiny store and a TopK SAE (d_in 8, d_sae 16, k 3) trained on it, made once per process.
fn valid() -> &'static Valid {
    static VALID: OnceLock<Valid> = OnceLock::new();
    VALID.get_or_init(|| {
        let root = scratch("sae-files-valid");
        let (acts, sae_dir) = (root.join("acts"), root.join("sae"));
        synth_store(&acts, 2000, &[]);
        let run = |args: &[&str]| {
            ok(args);
        };
        run(&[
            "train",
            "--acts",
            s(&acts),
            "--out",
            s(&sae_dir),
            "--arch",
            "topk",
            "--k",
            "3",
            "--d-sae",
            "16",
            "--steps",
            "5",
            "--batch-size",
            "64",
            "--quiet",
        ]);
        run(&["info", s(&sae_dir)]);
        Valid { acts, sae: sae_dir }
    })
}

/// A copy of the valid SAE directory in a fresh scratch directory.
fn copy_of_valid(case: &str) -> PathBuf {
    let dir = scratch(&format!("sae-files-{case}")).join("sae");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(&valid().sae).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

fn edit_cfg(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let p = dir.join("cfg.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

/// The f32 tensors of a safetensors file: 8-byte header length, JSON header, data.
fn read_tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("sae_weights.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(name, info)| {
            assert_eq!(info["dtype"], "F32");
            let shape = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let (a, b) = (
                info["data_offsets"][0].as_u64().unwrap() as usize,
                info["data_offsets"][1].as_u64().unwrap() as usize,
            );
            let vals = data[a..b]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, shape, vals)
        })
        .collect()
}

fn write_tensors(dir: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, vals) in tensors {
        let start = data.len();
        data.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(data);
    std::fs::write(dir.join("sae_weights.safetensors"), bytes).unwrap();
}

fn edit_tensor(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<f32>)) {
    let mut t = read_tensors(dir);
    let (_, _, vals) = t.iter_mut().find(|(n, _, _)| n == name).unwrap();
    edit(vals);
    write_tensors(dir, &t);
}

/// `sae info DIR` and `sae eval --sae DIR` both refuse, with every needle, leaving DIR as is.
fn refused_on_load(dir: &Path, needles: &[&str]) {
    refused(&["info", s(dir)], needles, &[dir]);
    let out = dir.parent().unwrap().join("eval-out");
    refused(
        &[
            "eval",
            "--sae",
            s(dir),
            "--out",
            s(&out),
            "--tokens",
            "1000",
        ],
        needles,
        &[dir],
    );
    assert!(!out.exists());
}

#[test]
fn nan_in_the_encoder() {
    let dir = copy_of_valid("nan");
    edit_tensor(&dir, "W_enc", |v| v[..3].fill(f32::NAN));
    refused_on_load(
        &dir,
        &[
            "sae_weights.safetensors",
            "W_enc holds 3 NaN values",
            "retrain it or load another",
        ],
    );
}

#[test]
fn infinite_decoder_bias() {
    let dir = copy_of_valid("inf");
    edit_tensor(&dir, "b_dec", |v| v[2] = f32::NEG_INFINITY);
    refused_on_load(
        &dir,
        &["sae_weights.safetensors", "b_dec holds 1 infinite values"],
    );
    let out = dir.parent().unwrap().join("analysis");
    refused(
        &["analyze", "--sae", s(&dir), "--out", s(&out)],
        &["sae_weights.safetensors", "b_dec"],
        &[&dir],
    );
}

#[test]
fn truncated_weights_file() {
    let dir = copy_of_valid("truncated");
    let p = dir.join("sae_weights.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    refused_on_load(&dir, &["sae_weights.safetensors", "truncated"]);
}

#[test]
fn missing_weights_file() {
    let dir = copy_of_valid("no-weights");
    std::fs::remove_file(dir.join("sae_weights.safetensors")).unwrap();
    refused_on_load(&dir, &["sae_weights.safetensors"]);
}

#[test]
fn cfg_that_is_not_json() {
    let dir = copy_of_valid("bad-json");
    let p = dir.join("cfg.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, &text[..text.len() / 2]).unwrap();
    refused_on_load(&dir, &["cfg.json", "not valid JSON"]);
}

#[test]
fn zero_latents() {
    let dir = copy_of_valid("d-sae-0");
    edit_cfg(&dir, |c| c["d_sae"] = 0.into());
    refused_on_load(&dir, &["cfg.json", "d_sae is 0"]);
}

#[test]
fn k_larger_than_d_sae() {
    let dir = copy_of_valid("k-big");
    edit_cfg(&dir, |c| {
        c["k"] = 17.into();
        c["sae_core"]["k"] = 17.into();
    });
    refused_on_load(&dir, &["cfg.json", "k = 17 is more than d_sae = 16"]);
}

#[test]
fn k_zero() {
    let dir = copy_of_valid("k-0");
    edit_cfg(&dir, |c| {
        c["k"] = 0.into();
        c["sae_core"]["k"] = 0.into();
    });
    refused_on_load(&dir, &["cfg.json", "k is 0"]);
}

#[test]
fn unknown_architecture() {
    let dir = copy_of_valid("arch");
    edit_cfg(&dir, |c| {
        c["architecture"] = "sparsemax".into();
        c.as_object_mut().unwrap().remove("sae_core");
    });
    refused_on_load(
        &dir,
        &[
            "cfg.json",
            "unknown architecture 'sparsemax'",
            "gated, standard, topk, batchtopk, jumprelu",
        ],
    );
}

#[test]
fn architecture_and_our_block_disagree() {
    let dir = copy_of_valid("arch-mismatch");
    edit_cfg(&dir, |c| c["sae_core"]["architecture"] = "gated".into());
    refused_on_load(
        &dir,
        &[
            "cfg.json",
            "'architecture' is 'topk'",
            "sae_core.architecture is 'gated'",
        ],
    );
}

#[test]
fn math_key_we_do_not_implement() {
    let dir = copy_of_valid("layer-norm");
    edit_cfg(&dir, |c| c["normalize_activations"] = "layer_norm".into());
    refused_on_load(&dir, &["cfg.json", "normalize_activations", "layer_norm"]);
    let dir = copy_of_valid("hook-z");
    edit_cfg(&dir, |c| c["reshape_activations"] = "hook_z".into());
    refused_on_load(&dir, &["cfg.json", "reshape_activations", "hook_z"]);
}

#[test]
fn negative_jumprelu_threshold() {
    let dir = copy_of_valid("threshold");
    edit_cfg(&dir, |c| {
        c["architecture"] = "jumprelu".into();
        c["sae_core"] = serde_json::json!({"architecture": "jumprelu", "k": 0});
    });
    // Without a threshold tensor the file cannot be a JumpReLU SAE.
    refused_on_load(&dir, &["sae_weights.safetensors", "no tensor 'threshold'"]);
    let mut t = read_tensors(&dir);
    let mut threshold = vec![0.1f32; 16];
    threshold[4] = -0.5;
    t.push(("threshold".into(), vec![16], threshold));
    write_tensors(&dir, &t);
    refused_on_load(
        &dir,
        &[
            "sae_weights.safetensors",
            "threshold holds 1 negative values",
        ],
    );
}

#[test]
fn extend_from_a_broken_sae() {
    let dir = copy_of_valid("extend");
    edit_tensor(&dir, "W_dec", |v| v[5] = f32::NAN);
    refused(
        &[
            "train",
            "--acts",
            s(&valid().acts),
            "--out",
            s(&dir),
            "--extend",
            "--arch",
            "topk",
            "--k",
            "3",
            "--d-sae",
            "16",
            "--batch-size",
            "64",
            "--steps",
            "10",
            "--quiet",
        ],
        &["sae_weights.safetensors", "W_dec holds 1 NaN values"],
        &[&dir, &valid().acts],
    );
}

#[test]
fn matryoshka_prefixes_that_do_not_nest() {
    let dir = copy_of_valid("matryoshka-widths");
    edit_cfg(&dir, |c| {
        c["architecture"] = "jumprelu".into();
        c["sae_core"] =
            serde_json::json!({"architecture": "matryoshka", "k": 3, "widths": [8, 4, 16]});
    });
    refused_on_load(
        &dir,
        &[
            "cfg.json",
            "widths [8, 4, 16] must be increasing",
            "fix 'widths'",
        ],
    );
}
