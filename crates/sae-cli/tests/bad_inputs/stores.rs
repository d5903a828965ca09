//! Bad-input cases: activation stores given to `sae train --acts` (corrupt, inconsistent,
//! crafted or of another kind), and sizes given to `sae synth` / `sae harvest`.

use crate::harness::*;
use std::path::{Path, PathBuf};

/// A valid store of 2000 rows of width 8 in four shards of 500, written by `sae synth`.
fn base_store(dir: &Path) -> PathBuf {
    let acts = dir.join("acts");
    synth_store(&acts, 2000, &["--rows-per-shard", "500"]);
    acts
}

/// `sae train` on `acts` is refused with `needles` in the message; everything under `dir`
/// (the store included) is unchanged, and neither the run nor its working directory exists.
fn train_refused(dir: &Path, acts: &Path, needles: &[&str]) {
    let run = dir.join("run");
    refused(
        &[
            "train",
            "--acts",
            s(acts),
            "--out",
            s(&run),
            "--steps",
            "2",
            "--quiet",
        ],
        needles,
        &[dir],
    );
    assert!(!run.exists(), "{} was created", run.display());
    assert!(!dir.join("run.partial").exists(), "run.partial was created");
}

fn edit_manifest(acts: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = acts.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

/// The bytes of a `.npy` file of `rows` x `cols` f32 declared in its header, with `data`.
fn npy_file(rows: usize, cols: usize, data: &[f32]) -> Vec<u8> {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    sae_store::npy::encode(sae_store::Dtype::F32, rows, cols, &bytes)
}

/// A safetensors file of one F32 tensor `name` of `shape` holding `data` (written by hand:
/// the format is an 8-byte header length, the JSON header, the data).
fn safetensors_file(name: &str, shape: [usize; 2], data: &[u8]) -> Vec<u8> {
    let header = format!(
        r#"{{"{name}":{{"dtype":"F32","shape":[{},{}],"data_offsets":[0,{}]}}}}"#,
        shape[0],
        shape[1],
        data.len()
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn the_valid_base_store_trains() {
    // The refusals below come from the corruption, not from the base store or the flags.
    let dir = scratch("stores-base");
    let acts = base_store(&dir);
    let run = dir.join("run");
    let out = sae(&[
        "train",
        "--acts",
        s(&acts),
        "--out",
        s(&run),
        "--steps",
        "2",
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run.join("cfg.json").exists());
}

#[test]
fn truncated_shard() {
    let dir = scratch("stores-truncated");
    let acts = base_store(&dir);
    let shard = acts.join("shard_00001.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    train_refused(
        &dir,
        &acts,
        &["shard_00001.safetensors", "not a valid safetensors"],
    );
}

#[test]
fn npy_header_whose_size_overflows() {
    let dir = scratch("stores-npy-overflow");
    // 2^62 x 2^62 x 4 bytes wraps around to 0 in 64-bit arithmetic.
    let big = 1usize << 62;
    let file = dir.join("huge.npy");
    std::fs::write(&file, npy_file(big, big, &[0.0; 16])).unwrap();
    train_refused(&dir, &file, &["huge.npy", "impossibly large"]);
    // Large without overflowing: the file's real length refuses it.
    std::fs::write(&file, npy_file(1 << 40, 1 << 20, &[0.0; 16])).unwrap();
    train_refused(&dir, &file, &["huge.npy", "truncated file"]);
}

#[test]
fn absurd_sizes_in_the_manifest() {
    let dir = scratch("stores-manifest-sizes");
    let acts = base_store(&dir);
    edit_manifest(&acts, |m| m["d_in"] = (u64::MAX / 3).into());
    train_refused(&dir, &acts, &["manifest.json", "d_in", "re-harvest"]);

    let dir = scratch("stores-manifest-rows");
    let acts = base_store(&dir);
    edit_manifest(&acts, |m| m["shards"][2]["n_rows"] = u64::MAX.into());
    train_refused(
        &dir,
        &acts,
        &["shard_00002.safetensors", "holds 500 rows", "re-harvest"],
    );
}

#[test]
fn manifest_that_is_not_json() {
    let dir = scratch("stores-manifest-text");
    let acts = base_store(&dir);
    std::fs::write(acts.join("manifest.json"), "shards: 4\n").unwrap();
    train_refused(
        &dir,
        &acts,
        &[
            "manifest.json",
            "not a valid activation manifest",
            "re-harvest",
        ],
    );
}

#[test]
fn manifest_naming_a_missing_shard() {
    let dir = scratch("stores-missing");
    let acts = base_store(&dir);
    std::fs::remove_file(acts.join("shard_00003.safetensors")).unwrap();
    train_refused(
        &dir,
        &acts,
        &["shard_00003.safetensors", "missing", "re-harvest"],
    );
}

#[test]
fn shard_dtype_disagrees_with_the_manifest() {
    let dir = scratch("stores-dtype");
    let acts = base_store(&dir);
    edit_manifest(&acts, |m| m["dtype"] = "bf16".into());
    train_refused(
        &dir,
        &acts,
        &["shard_00000.safetensors", "F32", "Bf16", "re-harvest"],
    );
}

#[test]
fn shard_of_zero_rows() {
    let dir = scratch("stores-zero-rows");
    let acts = base_store(&dir);
    // Replace the last shard by a well-formed file of shape [0, 8].
    std::fs::write(
        acts.join("shard_00003.safetensors"),
        safetensors_file("activations", [0, 8], &[]),
    )
    .unwrap();
    train_refused(&dir, &acts, &["shard_00003.safetensors", "holds no rows"]);
}

#[test]
fn rows_that_are_not_finite() {
    let dir = scratch("stores-nan");
    let mut rows = vec![0.5f32; 64 * 8];
    rows[5 * 8 + 3] = f32::NAN;
    let file = dir.join("nan.npy");
    std::fs::write(&file, npy_file(64, 8, &rows)).unwrap();
    let run = dir.join("run");
    refused(
        &[
            "train",
            "--acts",
            s(&file),
            "--out",
            s(&run),
            "--steps",
            "2",
            "--quiet",
        ],
        &["nan.npy", "row 5", "non-finite"],
        &[&dir],
    );
}

#[test]
fn empty_directory_as_acts() {
    let dir = scratch("stores-empty");
    let acts = dir.join("acts");
    std::fs::create_dir(&acts).unwrap();
    train_refused(&dir, &acts, &["acts", "no activation files", "sae harvest"]);
}

#[test]
fn files_of_another_kind_as_acts() {
    let dir = scratch("stores-other-kind");
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not activations\n").unwrap();
    train_refused(&dir, &text, &["notes.txt", "expected .safetensors or .npy"]);

    let fake = dir.join("fake.safetensors");
    std::fs::write(&fake, "{\"hello\": 1}").unwrap();
    train_refused(
        &dir,
        &fake,
        &["fake.safetensors", "not a valid safetensors"],
    );

    // A trained SAE directory instead of the store it was trained on.
    let sae_dir = dir.join("an_sae");
    std::fs::create_dir(&sae_dir).unwrap();
    std::fs::write(sae_dir.join("cfg.json"), "{}").unwrap();
    std::fs::write(
        sae_dir.join("sae_weights.safetensors"),
        safetensors_file("W_dec", [2, 2], &[0u8; 16]),
    )
    .unwrap();
    train_refused(&dir, &sae_dir, &["an_sae", "trained SAE, not activations"]);
}

/// `sae synth` with `flags` is refused naming `needles`, and nothing appears in `dir`.
fn synth_refused(name: &str, flags: &[&str], needles: &[&str]) {
    let dir = scratch(name);
    let out = dir.join("synth");
    let mut args = vec!["synth", "--out", s(&out)];
    args.extend_from_slice(flags);
    refused(&args, needles, &[&dir]);
    assert!(
        !out.exists(),
        "sae synth {flags:?} created {}",
        out.display()
    );
}

#[test]
fn synth_zero_sizes() {
    for flag in ["--d-in", "--n-features", "--n-tokens", "--rows-per-shard"] {
        synth_refused("synth-zero", &[flag, "0"], &[flag, "at least 1"]);
    }
}

#[test]
fn synth_rates_out_of_range() {
    let small = ["--d-in", "8", "--n-features", "16", "--n-tokens", "100"];
    for (flag, value, needle) in [
        ("--l0", "NaN", "above 0"),
        ("--l0", "-2", "above 0"),
        ("--l0", "0", "above 0"),
        ("--l0", "17", "at most --n-features (16)"),
        ("--noise", "NaN", "0 or more"),
        ("--noise", "-0.1", "0 or more"),
        ("--noise", "inf", "0 or more"),
    ] {
        let mut flags = small.to_vec();
        // `--flag=value` so that clap takes "-2" as the value.
        let arg = format!("{flag}={value}");
        flags.push(&arg);
        synth_refused("synth-rates", &flags, &[flag, needle]);
    }
}

#[test]
fn synth_sizes_that_cannot_fit() {
    // The true-feature matrix alone: 2^30 x 2^20 f32 = 4 PiB.
    synth_refused(
        "synth-memory",
        &["--d-in", "1048576", "--n-features", "1073741824"],
        &[
            "of memory but only",
            "lower --d-in, --n-features or --rows-per-shard",
        ],
    );
    // One shard of 2^40 rows.
    synth_refused(
        "synth-shard",
        &[
            "--n-tokens",
            "1099511627776",
            "--rows-per-shard",
            "1099511627776",
        ],
        &["of memory but only", "--rows-per-shard"],
    );
    // More tokens than the disk holds (4 PiB); each shard alone fits in memory.
    synth_refused(
        "synth-disk",
        &["--n-tokens", "17592186044416", "--d-in", "64"],
        &["--n-tokens", "of disk but", "ask for fewer tokens"],
    );
    // Sizes whose byte count overflows 64 bits.
    synth_refused(
        "synth-overflow",
        &["--d-in", "18446744073709551615", "--n-tokens", "4"],
        &["more than 2^64 bytes"],
    );
    // Not a size at all.
    synth_refused(
        "synth-huge",
        &["--d-in", "99999999999999999999999"],
        &["--d-in", "not a whole number"],
    );
}

#[test]
fn harvest_zero_sizes() {
    // Refused while parsing: no model is loaded.
    for flag in ["--shard-rows", "--batch"] {
        let dir = scratch("harvest-zero");
        let out = dir.join("acts");
        refused(
            &[
                "harvest",
                "--hook",
                "blocks.0.hook_resid_post",
                "--out",
                s(&out),
                flag,
                "0",
            ],
            &[flag, "at least 1"],
            &[&dir],
        );
        assert!(!out.exists());
    }
}
