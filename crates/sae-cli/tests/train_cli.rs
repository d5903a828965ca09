//! `sae train / info / synth` through the built binary: the happy path and the error paths
//! (non-zero exit, one line naming the file, no panic).

use sae_store::npy;
use sae_store::Dtype;
mod common;

use common::{fails_with, s, sae, scratch};
use std::path::Path;

fn write_npy(path: &Path, rows: usize, cols: usize, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, npy::encode(Dtype::F32, rows, cols, &bytes)).unwrap();
}

#[test]
fn synth_train_info() {
    let dir = scratch("happy");
    let acts = dir.join("acts");
    let out = sae(&[
        "synth",
        "--out",
        s(&acts),
        "--d-in",
        "8",
        "--n-features",
        "16",
        "--n-tokens",
        "3000",
        "--l0",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(acts.join("true_features.safetensors").exists());
    let run = dir.join("run");
    let out = sae(&[
        "train",
        "--acts",
        s(&acts),
        "--arch",
        "gated",
        "--d-sae",
        "32",
        "--l1",
        "3",
        "--steps",
        "30",
        "--batch-size",
        "64",
        "--out",
        s(&run),
        "--quiet",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("30 steps") && text.contains("FVU"), "{text}");
    let out = sae(&["info", s(&run)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "gated",
        "d_sae       32",
        "r_mag",
        "b_gate",
        "[8, 32]",
        "synthetic",
        "30 steps",
        "gamma",
    ] {
        assert!(text.contains(needle), "info lacks '{needle}': {text}");
    }
    // Synth refuses to overwrite.
    fails_with(&sae(&["synth", "--out", s(&acts)]), &["already exists"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_activations_name_the_file() {
    let dir = scratch("bad");
    let out_dir = dir.join("out");
    let train = |acts: &Path| {
        sae(&[
            "train",
            "--acts",
            s(acts),
            "--out",
            s(&out_dir),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--quiet",
        ])
    };

    fails_with(&train(&dir.join("missing")), &["missing"]);

    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails_with(&train(&empty), &["empty", "no activation files"]);

    let mixed = dir.join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    write_npy(&mixed.join("a.npy"), 4, 3, &[0.5; 12]);
    write_npy(&mixed.join("b.npy"), 4, 5, &[0.5; 20]);
    fails_with(&train(&mixed), &["b.npy", "d_in"]);

    let cut = dir.join("cut.npy");
    write_npy(&cut, 10, 4, &[1.0; 40]);
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 8]).unwrap();
    fails_with(&train(&cut), &["cut.npy", "truncated"]);

    let text = dir.join("notes.safetensors");
    std::fs::write(&text, "not a tensor file at all").unwrap();
    fails_with(
        &train(&text),
        &["notes.safetensors", "not a valid safetensors"],
    );

    let mut v = vec![1.0f32; 64 * 4];
    v[37 * 4 + 1] = f32::INFINITY;
    let nan = dir.join("inf.npy");
    write_npy(&nan, 64, 4, &v);
    fails_with(&train(&nan), &["inf.npy", "row 37"]);
    assert!(
        !out_dir.exists(),
        "a failed run must not leave output behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_options_fail_cleanly() {
    fails_with(
        &sae(&["train", "--arch", "gatd", "--acts", "x"]),
        &["unknown architecture 'gatd'"],
    );
    fails_with(
        &sae(&["train", "--learning-rate", "3"]),
        &["--learning-rate"],
    );
    fails_with(&sae(&["train", "--out", "/tmp/never"]), &["--acts"]);
    fails_with(
        &sae(&["bench", "--archs", "gated,nope"]),
        &["unknown architecture 'nope'"],
    );
    let dir = scratch("opts");
    fails_with(&sae(&["info", s(&dir)]), &["cfg.json"]);
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, "arch = \"gated\"\nbatchsize = 3\n").unwrap();
    fails_with(
        &sae(&["train", "--config", s(&cfg)]),
        &["c.toml", "batchsize"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Output into a pipe whose reader is gone (as `sae archs | head -1` leaves it once `head`
/// has its line): the command ends on SIGPIPE, as a Unix tool does, not in a panic.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_the_command_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sae"))
        .arg("archs")
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // SIGPIPE is 13 on Linux and the BSDs.
    assert_eq!(out.status.signal(), Some(13), "{:?}: {err}", out.status);
}

/// `sae bench` at two L0s in two rounds: the CPU line, every row with its round and L0,
/// then the best of each and the ratio; a zero count is refused.
#[test]
fn bench_compares_l0s_over_rounds() {
    let out = sae(&[
        "bench", "--archs", "relu", "--d-sae", "64", "--d-in", "16", "--batch", "64", "--steps",
        "1", "--l0", "4,8", "--rounds", "2",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.lines().any(|l| l.starts_with("cpu: ")), "{text}");
    for (round, l0) in [("1/2", 4), ("1/2", 8), ("2/2", 8), ("2/2", 4)] {
        let row = text.lines().find(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() > 3 && w[0] == round && w[1] == l0.to_string() && w[2] == "relu"
        });
        assert!(row.is_some(), "no row for round {round}, L0 {l0}: {text}");
    }
    let summary = text.split("best of 2 rounds").nth(1).expect("summary");
    assert!(summary.contains("8/4"), "{summary}");
    let line = summary
        .lines()
        .find(|l| l.starts_with("relu"))
        .expect("relu line");
    let w: Vec<&str> = line.split_whitespace().collect();
    let (best4, best8, ratio): (f64, f64, f64) = (
        w[2].parse().unwrap(),
        w[3].parse().unwrap(),
        w[4].parse().unwrap(),
    );
    assert!((ratio - best8 / best4).abs() < 0.006, "{line}");
    fails_with(
        &sae(&["bench", "--rounds", "0"]),
        &["--rounds must be positive"],
    );
    fails_with(&sae(&["bench", "--l0", "64,0"]), &["--l0"]);
}

/// `sae train --model --hook --corpus`: straight from a (tiny GPT-2) model, no store on disk.
#[test]
fn train_from_model_through_the_binary() {
    let d = scratch("from-model");
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../sae-lm/tests/fixtures/tiny-gpt2"
    );
    let corpus = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../sae-lm/tests/fixtures/docs_zstd.parquet"
    );
    let text = "the quick brown fox jumps over the lazy dog 12 times; sparse features ".repeat(40);
    std::fs::write(d.join("a.txt"), text).unwrap();
    let out = d.join("sae");
    let common = [
        "train",
        "--model",
        model,
        "--hook",
        "blocks.1.hook_resid_post",
        "--ctx",
        "32",
        "--arch",
        "topk",
        "--k",
        "4",
        "--d-sae",
        "128",
        "--batch-size",
        "64",
        "--buffer-rows",
        "256",
        "--init-sample",
        "64",
        "--eval-tokens",
        "64",
        "--quiet",
    ];
    let mut args = common.to_vec();
    args.extend(["--corpus", s(&d), "--steps", "5", "--out", s(&out)]);
    let o = sae(&args);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("5 steps, 320 tokens") && stdout.contains("d_in 64"),
        "{stdout}"
    );
    assert!(out.join("sae_weights.safetensors").is_file());

    // A parquet file with a codec we are built without, a missing length, an unknown hook.
    let (x, y) = (d.join("x"), d.join("y"));
    let mut args = common.to_vec();
    args.extend(["--corpus", corpus, "--steps", "5", "--out", s(&x)]);
    fails_with(&sae(&args), &["docs_zstd.parquet", "zstd"]);
    let mut args = common.to_vec();
    args.extend(["--corpus", s(&d), "--out", s(&y)]);
    fails_with(&sae(&args), &["--steps or --tokens"]);
    let o = sae(&[
        "train",
        "--model",
        model,
        "--hook",
        "blocks.7.hook_resid_post",
        "--steps",
        "2",
        "--out",
        s(&d.join("z")),
    ]);
    fails_with(&o, &["unknown hook", "sae hooks"]);
    let _ = std::fs::remove_dir_all(&d);
}

/// A synthetic store of 2,000 rows of width 8 (16 features) in `dir/acts`.
fn small_store(dir: &Path) -> std::path::PathBuf {
    let acts = dir.join("acts");
    let out = sae(&[
        "synth",
        "--out",
        s(&acts),
        "--d-in",
        "8",
        "--n-features",
        "16",
        "--n-tokens",
        "2000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    acts
}

#[test]
fn a_log_gets_progress_lines_when_stderr_is_not_a_terminal() {
    let dir = scratch("progress-lines");
    let acts = small_store(&dir);
    let run = dir.join("run");
    // stderr is a pipe here, as in a log file; a line at every chance (interval 0).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sae"))
        .args([
            "train",
            "--acts",
            s(&acts),
            "--arch",
            "relu",
            "--d-sae",
            "16",
            "--steps",
            "20",
            "--batch-size",
            "64",
            "--log-every",
            "5",
            "--out",
            s(&run),
        ])
        .env("SAE_PROGRESS_SECS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("train step: "))
        .collect();
    assert!(lines.len() >= 4, "progress lines: {err}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("20/20 (100.0%)") && l.contains("tok/s loss")),
        "a last line with the loss terms: {err}"
    );
    assert!(
        !err.contains('\r') && !err.contains("\x1b["),
        "no terminal drawing in a log"
    );
}

/// A JumpReLU run too short for Adam to move its thresholds far gets a note saying so and
/// what to change; a long enough one (or a quiet run) does not.
#[test]
fn a_short_jumprelu_run_is_told_its_thresholds_cannot_move_far() {
    let dir = scratch("jumprelu-note");
    let acts = small_store(&dir);
    let train = |name: &str, lr: &str, extra: &[&str]| {
        let run = dir.join(name);
        let mut args = vec![
            "train",
            "--acts",
            s(&acts),
            "--arch",
            "jumprelu",
            "--d-sae",
            "16",
            "--steps",
            "20",
            "--batch-size",
            "64",
            "--lr",
            lr,
            "--out",
            s(&run),
        ];
        args.extend_from_slice(extra);
        let out = sae(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let err = train("short", "1e-3", &[]);
    assert!(
        err.contains("note: jumprelu: Adam moves each log threshold by about lr per step")
            && err.contains("20 steps at lr 0.001 move the thresholds about 1.02-fold")
            && err.contains("init_threshold=0.5"),
        "{err}"
    );
    let err = train("long-enough", "0.2", &[]);
    assert!(!err.contains("note: jumprelu"), "{err}");
    let err = train("quiet", "1e-3", &["--quiet"]);
    assert!(!err.contains("note: jumprelu"), "{err}");
}
