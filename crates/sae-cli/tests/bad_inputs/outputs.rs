//! Bad-input cases: output paths. An `--out` may be replaced only when it holds an output of
//! the same kind, a trained SAE only with `--overwrite`; never the user's files, an input, a
//! file, or an output another process is writing.

use crate::harness::*;
use std::path::{Path, PathBuf};

/// A tiny store at `<dir>/acts`.
fn store(dir: &Path) -> PathBuf {
    let acts = dir.join("acts");
    synth_store(&acts, 2000, &["--l0", "2"]);
    acts
}

fn train_args<'a>(acts: &'a Path, out: &'a Path, l1: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--acts",
        s(acts),
        "--arch",
        "relu",
        "--d-sae",
        "16",
        "--l1",
        l1,
        "--steps",
        "4",
        "--batch-size",
        "64",
        "--init-sample",
        "256",
        "--eval-tokens",
        "256",
        "--quiet",
        "--out",
        s(out),
    ]
}

/// A store and a trained SAE at `<dir>/run`.
fn store_and_run(dir: &Path) -> (PathBuf, PathBuf) {
    let acts = store(dir);
    let run = dir.join("run");
    ok(&train_args(&acts, &run, "1"));
    (acts, run)
}

/// A folder of the user's own files, with a subfolder.
fn users_folder(dir: &Path) -> PathBuf {
    let f = dir.join("mine");
    std::fs::create_dir_all(f.join("notes")).unwrap();
    std::fs::write(f.join("thesis.tex"), b"\\section{Results}").unwrap();
    std::fs::write(f.join("notes/todo.txt"), b"train an SAE").unwrap();
    f
}

#[test]
fn train_refuses_a_folder_of_the_users_files() {
    let d = scratch("out-train-user");
    let acts = store(&d);
    let mine = users_folder(&d);
    refused(
        &train_args(&acts, &mine, "1"),
        &["thesis.tex", "--out"],
        &[&d],
    );
}

#[test]
fn train_refuses_the_activation_store_as_out() {
    let d = scratch("out-train-acts");
    let acts = store(&d);
    refused(
        &train_args(&acts, &acts, "1"),
        &["is the input --acts", "Choose another --out"],
        &[&d],
    );
}

#[test]
fn train_refuses_an_out_that_contains_or_sits_inside_the_store() {
    let d = scratch("out-train-around-acts");
    let acts = store(&d);
    refused(
        &train_args(&acts, &d, "1"),
        &["contains the input --acts"],
        &[&d],
    );
    let inside = acts.join("run");
    refused(
        &train_args(&acts, &inside, "1"),
        &["inside the input --acts"],
        &[&d],
    );
    // The same store spelled with `..`.
    let odd = d.join("acts/../acts");
    refused(
        &train_args(&acts, &odd, "1"),
        &["is the input --acts"],
        &[&d],
    );
}

#[test]
fn train_refuses_a_regular_file_as_out() {
    let d = scratch("out-train-file");
    let acts = store(&d);
    let f = d.join("results.csv");
    std::fs::write(&f, b"a,b\n1,2\n").unwrap();
    refused(&train_args(&acts, &f, "1"), &["is a file"], &[&d]);
}

#[test]
fn train_replaces_a_finished_run_only_with_overwrite() {
    let d = scratch("out-train-finished");
    let (acts, run) = store_and_run(&d);
    // Other settings, no --overwrite: refused, the finished run untouched.
    refused(
        &train_args(&acts, &run, "3"),
        &["--overwrite", "--extend"],
        &[&d],
    );
    let before = std::fs::read(run.join("train_config.json")).unwrap();
    let mut args = train_args(&acts, &run, "3");
    args.push("--overwrite");
    ok(&args);
    let after = std::fs::read(run.join("train_config.json")).unwrap();
    assert_ne!(before, after, "--overwrite replaced the run");
    assert!(!d.join(".run.lock").exists(), "the lock went with the run");
}

#[test]
fn train_keeps_a_finished_run_that_holds_the_users_files_even_with_overwrite() {
    let d = scratch("out-train-finished-plus");
    let (acts, run) = store_and_run(&d);
    std::fs::write(run.join("my-notes.md"), b"good run").unwrap();
    let mut args = train_args(&acts, &run, "3");
    args.push("--overwrite");
    refused(&args, &["my-notes.md"], &[&d]);
}

#[test]
fn a_second_writer_is_refused_while_the_first_lives_and_a_dead_ones_lock_is_taken_over() {
    let d = scratch("out-lock");
    let acts = store(&d);
    let run = d.join("run");
    let lock = d.join(".run.lock");
    let mut holder = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    std::fs::write(&lock, format!("{}\n", holder.id())).unwrap();
    refused(
        &train_args(&acts, &run, "1"),
        &[&format!("pid {}", holder.id()), "another sae process"],
        &[&d],
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    ok(&train_args(&acts, &run, "1"));
    assert!(run.join("sae_weights.safetensors").is_file());
    assert!(!lock.exists());
}

#[test]
fn eval_refuses_the_users_folder_the_sae_itself_and_a_store() {
    let d = scratch("out-eval");
    let (acts, run) = store_and_run(&d);
    let mine = users_folder(&d);
    for (out, needle) in [
        (&mine, "thesis.tex"),
        (&run, "is the input --sae"),
        (&acts, "an activation store"),
    ] {
        refused(
            &[
                "eval",
                "--sae",
                s(&run),
                "--out",
                s(out),
                "--tokens",
                "1000",
            ],
            &[needle],
            &[&d],
        );
    }
}

#[test]
fn analyze_refuses_the_users_folder_and_the_sae_itself() {
    let d = scratch("out-analyze");
    let (_acts, run) = store_and_run(&d);
    let mine = users_folder(&d);
    for (out, needle) in [(&mine, "notes"), (&run, "is the input --sae")] {
        refused(
            &["analyze", "--sae", s(&run), "--out", s(out)],
            &[needle],
            &[&d],
        );
    }
}

#[test]
fn analyze_refuses_sizes_no_one_means_before_any_work() {
    let d = scratch("out-analyze-sizes");
    let (_acts, run) = store_and_run(&d);
    let out = d.join("an");
    refused(
        &[
            "analyze",
            "--sae",
            s(&run),
            "--out",
            s(&out),
            "--top-k",
            "5000000",
        ],
        &["--top-k", "at most 10000"],
        &[&d],
    );
    refused(
        &[
            "analyze",
            "--sae",
            s(&run),
            "--out",
            s(&out),
            "--left",
            "100000000",
        ],
        &["--left", "below the context length"],
        &[&d],
    );
}

#[test]
fn harvest_and_sweep_refuse_the_users_folder_before_loading_anything() {
    let d = scratch("out-harvest-sweep");
    let acts = store(&d);
    let mine = users_folder(&d);
    refused(
        &[
            "harvest",
            "--hook",
            "blocks.1.hook_resid_post",
            "--out",
            s(&mine),
            "--tokens",
            "100",
        ],
        &["thesis.tex"],
        &[&d],
    );
    let f = d.join("file.bin");
    std::fs::write(&f, b"x").unwrap();
    refused(
        &[
            "harvest",
            "--hook",
            "blocks.1.hook_resid_post",
            "--out",
            s(&f),
            "--tokens",
            "100",
        ],
        &["is a file"],
        &[&d],
    );
    refused(
        &[
            "sweep",
            "--acts",
            s(&acts),
            "--arch",
            "relu",
            "--l1",
            "1",
            "--steps",
            "2",
            "--out",
            s(&mine),
        ],
        &["thesis.tex"],
        &[&d],
    );
    refused(
        &[
            "sweep",
            "--acts",
            s(&acts),
            "--arch",
            "relu",
            "--l1",
            "1",
            "--steps",
            "2",
            "--out",
            s(&acts),
        ],
        &["--acts"],
        &[&d],
    );
}

#[test]
fn synth_refuses_an_existing_out() {
    let d = scratch("out-synth");
    let mine = users_folder(&d);
    refused(
        &[
            "synth",
            "--out",
            s(&mine),
            "--d-in",
            "8",
            "--n-features",
            "16",
        ],
        &["already exists"],
        &[&d],
    );
}
