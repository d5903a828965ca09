//! `sae eval` and `sae sweep` through the built binary: an identity SAE on the real default
//! model (its spliced CE must equal the clean CE, and the report files must appear), and the
//! bad-input paths, which must fail before any long work.

mod common;

use common::{fails_with, s, sae, scratch};
use sae_core::{saelens, Sae};
use std::path::{Path, PathBuf};

const HOOK: &str = "blocks.3.hook_resid_post";

/// An SAE whose reconstruction is exactly x, saved for `HOOK`.
fn identity_sae(d_in: usize) -> Sae {
    let mut sae = Sae::scaled_identity(d_in, 1.0);
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
    // `sae eval` of that SAE into `out` with its products in `compute`.
    let eval = |out: &Path, compute: &str| {
        sae(&[
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
            "--compute",
            compute,
            "--out",
            s(out),
        ])
    };
    let out = eval(&out_dir, "f32");
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
    assert_eq!(json["compute"], "f32");
    assert!((json["loss_recovered"].as_f64().unwrap() - 1.0).abs() < 1e-3);

    // The same evaluation with three-term bf16 products: recorded, and within 1e-3 of f32's
    // losses (where the CPU has no bf16 products, refused before any pass, nothing written).
    let out3 = dir.join("eval3");
    let run3 = eval(&out3, "bf16x3");
    let stdout3 = String::from_utf8_lossy(&run3.stdout);
    if !sae_core::bf16::available() {
        let err = String::from_utf8_lossy(&run3.stderr);
        assert!(
            !run3.status.success() && err.contains("--compute bf16x3"),
            "{err}"
        );
        assert!(!out3.exists());
        return;
    }
    assert!(
        run3.status.success(),
        "{stdout3}\n{}",
        String::from_utf8_lossy(&run3.stderr)
    );
    let json3: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out3.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json3["compute"], "bf16x3");
    for key in ["ce_clean", "ce_zero", "ce_mean_ablation"] {
        let (f, t) = (json[key].as_f64().unwrap(), json3[key].as_f64().unwrap());
        eprintln!("{key}: f32 {f}, bf16x3 {t}");
        assert!((f - t).abs() < 1e-3, "{key}: f32 {f}, bf16x3 {t}");
    }
    // Not the f32 passes under another name.
    assert_ne!(json["ce_clean"], json3["ce_clean"]);
    assert!((number_after(&stdout3, "CE clean") - number_after(&stdout3, "SAE")).abs() < 1e-4);
    let report = std::fs::read_to_string(out3.join("report.md")).unwrap();
    assert!(report.contains("weight products ran in bf16x3"), "{report}");
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

/// The whole `sae sweep` path on a small store from the real model: every run trained and
/// evaluated, the CSV and report written with the comparison and the settling table, the plots
/// drawn, and a second call reusing the finished runs instead of training them again.
#[test]
fn sweep_trains_evaluates_and_reports_every_run() {
    let dir = scratch("sweep");
    let text = dir.join("text.txt");
    let para = "A sparse autoencoder reads the residual stream of a language model and writes \
                it back as a sum of a few directions. The model's loss with the reconstruction \
                spliced in tells how much of what the model uses survived. ";
    std::fs::write(&text, para.repeat(60)).unwrap();
    let acts = dir.join("acts");
    let out = sae(&[
        "harvest",
        "--hook",
        HOOK,
        "--corpus",
        s(&text),
        "--tokens",
        "1200",
        "--ctx",
        "32",
        "--out",
        s(&acts),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sweep_dir = dir.join("sweep");
    let args = [
        "sweep",
        "--acts",
        s(&acts),
        "--arch",
        "gated,relu",
        "--l1",
        "gated=0.5,2",
        "--l1",
        "relu=0.5,2",
        "--d-sae",
        "64",
        "--steps",
        "1000",
        "--batch-size",
        "32",
        "--lr",
        "1e-3",
        "--eval-tokens",
        "150",
        "--ctx",
        "32",
        "--out",
        s(&sweep_dir),
    ];
    let out = sae(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(sweep_dir.join("sweep.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(lines[0].ends_with("fvu_change_last_doubling,l0_change_last_doubling"));
    for row in &lines[1..] {
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells.len(), 20, "{row}");
        // FVU, delta LM loss and the settling columns are numbers.
        for i in [7, 14, 18, 19] {
            let v: f64 = cells[i].parse().unwrap_or_else(|_| panic!("{row}"));
            assert!(v.is_finite(), "{row}");
        }
    }
    let report = std::fs::read_to_string(sweep_dir.join("report.md")).unwrap();
    for needle in [
        "Did gated beat relu?",
        "Did the runs settle?",
        // 1000 steps log every 20 (50 windows): doublings end at 125, 250, 500, 1000 steps.
        "| gated-l1_0.5 | 4000, 8000, 16.0k, 32.0k |",
        "gated-l1_0.5",
        "relu-l1_2",
    ] {
        assert!(
            report.contains(needle),
            "report lacks '{needle}':\n{report}"
        );
    }
    for f in [
        "l0_vs_delta_loss.png",
        "l0_vs_fvu.png",
        "gamma.png",
        "sweep.json",
    ] {
        assert!(sweep_dir.join(f).is_file(), "{f}");
    }
    // A stronger L1 gives a sparser code, for both architectures.
    let l0 = |name: &str| -> f64 {
        let row = lines.iter().find(|l| l.starts_with(name)).unwrap();
        row.split(',').nth(6).unwrap().parse().unwrap()
    };
    assert!(l0("gated-l1_2,") < l0("gated-l1_0.5,"), "{csv}");
    assert!(l0("relu-l1_2,") < l0("relu-l1_0.5,"), "{csv}");

    // Run again: finished runs are evaluated, not retrained, and give the same numbers.
    let out = sae(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = std::fs::read_to_string(sweep_dir.join("sweep.csv")).unwrap();
    assert_eq!(again, csv);

    // --report-only redraws the same report and CSV from sweep.json alone.
    std::fs::remove_file(sweep_dir.join("sweep.csv")).unwrap();
    std::fs::remove_file(sweep_dir.join("report.md")).unwrap();
    std::fs::remove_file(sweep_dir.join("gamma.png")).unwrap();
    let out = sae(&["sweep", "--report-only", "--out", s(&sweep_dir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(sweep_dir.join("sweep.csv")).unwrap(),
        csv
    );
    assert_eq!(
        std::fs::read_to_string(sweep_dir.join("report.md")).unwrap(),
        report
    );
    assert!(sweep_dir.join("gamma.png").is_file());
    fails_with(
        &sae(&["sweep", "--report-only", "--out", s(&dir.join("nothing"))]),
        &["sweep.json", "--report-only"],
    );

    // --extend trains the finished runs on to the new length (keeping their state here).
    let mut longer: Vec<&str> = args.to_vec();
    let at = longer.iter().position(|a| *a == "1000").unwrap();
    longer[at] = "1500";
    longer.extend(["--extend", "--keep-state"]);
    let out = sae(&longer);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(sweep_dir.join("sweep.csv")).unwrap();
    for row in csv.lines().skip(1) {
        assert_eq!(row.split(',').nth(5), Some("48000"), "{row}");
    }
    let run = sweep_dir.join("runs").join("gated-l1_2");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train_summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["extensions"][0]["from_step"], 1000);
    assert_eq!(summary["extensions"][0]["optimizer_state_kept"], false);
    assert!(run
        .join("checkpoint")
        .join("optimizer.safetensors")
        .is_file());

    // --compute bf16x3: the finished runs evaluated again with three-term bf16 products, each
    // evaluation and the report saying so, the losses within 1e-3 of f32's. Where the CPU has
    // no bf16 products it is refused before any work and the sweep's files stay as they were.
    let f32_json = std::fs::read_to_string(sweep_dir.join("sweep.json")).unwrap();
    let f32_report = std::fs::read_to_string(sweep_dir.join("report.md")).unwrap();
    assert!(
        f32_report.contains("weight products ran in f32"),
        "{f32_report}"
    );
    longer.extend(["--compute", "bf16x3"]);
    let out = sae(&longer);
    if !sae_core::bf16::available() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("--compute bf16x3"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(sweep_dir.join("sweep.json")).unwrap(),
            f32_json
        );
        return;
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(sweep_dir.join("report.md")).unwrap();
    assert!(report.contains("weight products ran in bf16x3"), "{report}");
    let parse = |text: &str| -> serde_json::Value { serde_json::from_str(text).unwrap() };
    let (before, after) = (
        parse(&f32_json),
        parse(&std::fs::read_to_string(sweep_dir.join("sweep.json")).unwrap()),
    );
    let (before, after) = (
        before["runs"].as_array().unwrap(),
        after["runs"].as_array().unwrap(),
    );
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(after) {
        assert_eq!(b["eval"]["compute"], "f32");
        assert_eq!(a["eval"]["compute"], "bf16x3");
        for key in ["ce_clean", "ce_sae"] {
            let (f, t) = (
                b["eval"][key].as_f64().unwrap(),
                a["eval"][key].as_f64().unwrap(),
            );
            assert!((f - t).abs() < 1e-3, "{key}: f32 {f}, bf16x3 {t}");
        }
    }
}
