//! `sae synthbench` through the built binary: a small benchmark end to end, and its refusals.

mod common;

use common::{fails_with, s, sae, scratch};

fn small(out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "synthbench",
        "--bench",
        "synthsaebench-small",
        "--samples",
        "20000",
        "--d-sae",
        "128",
        "--batch-size",
        "512",
        "--eval-samples",
        "3000",
        "--ortho-steps",
        "10",
        "--quiet",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    sae(&args)
}

#[test]
fn trains_scores_and_reports() {
    let dir = scratch("synthbench-happy");
    let out = dir.join("bench");
    let o = small(
        s(&out),
        &[
            "--archs",
            "topk,relu,gated",
            "--l0",
            "6",
            "--coeff",
            "relu=2",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("topk_k6 (ours)")
            && stdout.contains("relu_c2 (ours)")
            && stdout.contains("gated_l0_6 (ours)"),
        "{stdout}"
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| topk_k6 (ours) | 6.00 |"), "{report}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("runs/synthbench.json")).unwrap())
            .unwrap();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    // The penalty family without --coeff is steered toward the L0 by the controller.
    let gated = runs.iter().find(|r| r["name"] == "gated_l0_6").unwrap();
    assert_eq!(gated["target_l0"].as_u64(), Some(6));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("runs/gated_l0_6/train_summary.json")).unwrap(),
    )
    .unwrap();
    assert!(
        summary["l0_target"]["multiplier"].as_f64().is_some(),
        "{summary}"
    );
    for r in runs {
        let m = &r["metrics"];
        for key in ["mcc", "uniqueness", "f1", "explained_variance"] {
            let v = m[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
        assert_eq!(m["n_samples"].as_u64(), Some(3000));
    }
    assert!(out.join("runs/topk_k6/cfg.json").is_file());
    // A second run replaces the benchmark output it recognises.
    let o = small(s(&out), &["--archs", "topk", "--l0", "4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn refuses_bad_settings_before_any_work() {
    let dir = scratch("synthbench-bad");
    let out = dir.join("bench");
    fails_with(
        &small(s(&out), &["--archs", "relu", "--l0", ","]),
        &["--l0 is empty"],
    );
    fails_with(
        &small(
            s(&out),
            &["--archs", "topk", "--l0", "4", "--coeff", "relu=2"],
        ),
        &["--coeff relu=2", "not in --archs"],
    );
    fails_with(&small(s(&out), &["--archs", "nope"]), &["--archs"]);
    fails_with(
        &small(s(&out), &["--archs", "topk", "--coeff", "topk=3"]),
        &["--coeff topk=3", "--l0"],
    );
    fails_with(
        &small(s(&out), &["--coeff", "relu=-1", "--archs", "relu"]),
        &["--coeff relu=-1", "positive"],
    );
    fails_with(&small(s(&out), &["--l0", "0"]), &["--l0", "positive"]);
    let bad_bench = sae(&[
        "synthbench",
        "--bench",
        "synthsaebench-64k",
        "--samples",
        "1000",
        "--out",
        s(&out),
    ]);
    fails_with(&bad_bench, &["--bench", "synthsaebench-16k"]);
    assert!(!out.exists(), "refused runs leave nothing behind");
    // An --out holding the user's own files is not touched.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    fails_with(
        &small(s(&out), &["--archs", "topk", "--l0", "4"]),
        &[s(&out)],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}
