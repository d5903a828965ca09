//! Training loop: config file == flags, schedules, resume after a kill, NaN stop, output
//! safety, and the issue's acceptance test (gated recovers features without shrinkage).

mod common;
use clap::Parser;
use common::{flags, Cli, Killed};
use sae_core::ArchKind;
use sae_store::synth::{read_true_features, write_synthetic, SynthConfig};
use sae_train::config::{lr_at, resolve, sparsity_at};
use sae_train::{BatchSource, StoreSource, TrainConfig};
use std::path::Path;

#[test]
fn config_file_equals_flags_and_flags_override() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--acts",
        "data/acts",
        "--out",
        "runs/x",
        "--arch",
        "jumprelu",
        "--d-sae",
        "1024",
        "--l1",
        "0.5",
        "--lr",
        "1e-4",
        "--batch-size",
        "512",
        "--steps",
        "300",
        "--lr-warmup-steps",
        "20",
        "--lr-decay-steps",
        "50",
        "--l1-warmup-steps",
        "30",
        "--b-dec-init",
        "mean",
        "--normalize",
        "false",
        "--dead-window-tokens",
        "5000",
        "--checkpoint-every",
        "25",
        "--log-every",
        "5",
        "--seed",
        "7",
        "--threads",
        "2",
        "--jumprelu-bandwidth",
        "0.01",
    ];
    let from_flags = flags(&args).to_config().unwrap();
    let toml_text = r#"
acts = "data/acts"
out = "runs/x"
arch = "jumprelu"
d_sae = 1024
l1 = 0.5
lr = 1e-4
batch_size = 512
steps = 300
lr_warmup_steps = 20
lr_decay_steps = 50
l1_warmup_steps = 30
b_dec_init = "mean"
normalize = false
dead_window_tokens = 5000
checkpoint_every = 25
log_every = 5
seed = 7
threads = 2
jumprelu_bandwidth = 0.01
"#;
    let toml_path = dir.path().join("c.toml");
    std::fs::write(&toml_path, toml_text).unwrap();
    let toml_path_s = toml_path.to_str().unwrap();
    assert_eq!(
        flags(&["--config", toml_path_s]).to_config().unwrap(),
        from_flags
    );
    let json_path = dir.path().join("c.json");
    std::fs::write(&json_path, serde_json::to_string(&from_flags).unwrap()).unwrap();
    assert_eq!(
        flags(&["--config", json_path.to_str().unwrap()])
            .to_config()
            .unwrap(),
        from_flags
    );
    // A flag wins over the file.
    let c = flags(&["--config", toml_path_s, "--seed", "9", "--normalize"])
        .to_config()
        .unwrap();
    assert_eq!((c.seed, c.normalize, c.d_sae), (9, true, Some(1024)));
    // Unknown keys and unknown architectures are errors that name the file / value.
    std::fs::write(dir.path().join("bad.toml"), "lerning_rate = 3").unwrap();
    let e = flags(&["--config", dir.path().join("bad.toml").to_str().unwrap()])
        .to_config()
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("bad.toml") && e.contains("lerning_rate"), "{e}");
    let e = Cli::try_parse_from(["train", "--arch", "gatd"])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown architecture 'gatd'"), "{e}");
}

#[test]
fn schedules_and_defaults() {
    let cfg = TrainConfig {
        steps: Some(100),
        lr_decay_steps: 20,
        ..Default::default()
    };
    let r = resolve(&cfg, 64, None).unwrap();
    assert_eq!(
        (r.d_sae, r.lr, r.lr_warmup_steps, r.l1_warmup_steps),
        (512, 3e-4, 10, 0)
    );
    assert!((lr_at(&r, 20, 0, 0) - 3e-5).abs() < 1e-10);
    assert!((lr_at(&r, 20, 9, 9) - 3e-4).abs() < 1e-10);
    assert_eq!(lr_at(&r, 20, 50, 50), 3e-4);
    assert!((lr_at(&r, 20, 80, 80) - 3e-4).abs() < 1e-10);
    assert!((lr_at(&r, 20, 90, 90) - 1.5e-4).abs() < 1e-9);
    assert!((lr_at(&r, 20, 99, 99) - 1.5e-5).abs() < 1e-9);
    // A fresh optimiser at step 50 (an extension without state) warms up again...
    assert!((lr_at(&r, 20, 50, 0) - 3e-5).abs() < 1e-10);
    assert!((lr_at(&r, 20, 54, 4) - 1.5e-4).abs() < 1e-9);
    // ... and the decay, which counts the run's steps, still applies.
    assert!((lr_at(&r, 20, 99, 0) - 1.5e-5).abs() < 1e-9);
    assert_eq!(sparsity_at(&r, 0), r.sparsity_coeff);
    let j = TrainConfig {
        arch: ArchKind::JUMPRELU,
        steps: Some(200),
        l1: Some(2.0),
        ..Default::default()
    };
    let r = resolve(&j, 64, None).unwrap();
    assert_eq!((r.lr, r.l1_warmup_steps), (7e-5, 20));
    assert!((sparsity_at(&r, 9) - 1.0).abs() < 1e-6);
    assert_eq!(sparsity_at(&r, 25), 2.0);
    // One pass over the data by default; topk rejects --l1; no size and no steps is an error.
    let t = TrainConfig {
        arch: ArchKind::TOPK,
        batch_size: 100,
        ..Default::default()
    };
    assert_eq!(resolve(&t, 8, Some(1050)).unwrap().steps, 11);
    assert!(resolve(
        &TrainConfig {
            l1: Some(1.0),
            ..t.clone()
        },
        8,
        Some(10)
    )
    .is_err());
    assert!(resolve(&TrainConfig::default(), 8, None).is_err());
}

fn synth(
    dir: &Path,
    d_in: usize,
    n_features: usize,
    n_tokens: usize,
    l0: f64,
) -> std::path::PathBuf {
    let out = dir.join("acts");
    let cfg = SynthConfig {
        d_in,
        n_features,
        n_tokens,
        l0,
        noise: 0.01,
        seed: 3,
        rows_per_shard: 8192,
        ..Default::default()
    };
    write_synthetic(&out, &cfg).unwrap();
    out
}

fn log_without_speed(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_s");
            v
        })
        .collect()
}

#[test]
fn resume_after_a_kill_gives_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), 12, 24, 3000, 3.0);
    for arch in [
        ArchKind::GATED,
        ArchKind::TOPK,
        ArchKind::JUMPRELU,
        ArchKind::VSAE,
    ] {
        let k_or_l1 = |c: TrainConfig| {
            if arch.uses_k() {
                TrainConfig {
                    arch,
                    k: 4,
                    l1: None,
                    ..c
                }
            } else {
                TrainConfig { arch, ..c }
            }
        };
        let a = k_or_l1(small_cfg(&acts, &dir.path().join(format!("a-{arch}"))));
        let sa = sae_train::run(&a).unwrap();
        assert_eq!((sa.steps, sa.tokens), (40, 2560));
        assert!(!sae_train::partial_dir(&a.out).unwrap().exists());

        let b = k_or_l1(small_cfg(&acts, &dir.path().join(format!("b-{arch}"))));
        let mut killed = Killed {
            inner: StoreSource::open(&acts, b.seed).unwrap(),
            batches_left: 25,
        };
        let e = sae_train::run_with_source(&b, &mut killed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("killed"), "{e}");
        assert!(!b.out.exists(), "a failed run must not create its output");
        let again = sae_train::run(&b).unwrap_err().to_string();
        assert!(again.contains("--resume"), "{again}");
        let sb = sae_train::run(&TrainConfig {
            resume: true,
            ..b.clone()
        })
        .unwrap();
        assert_eq!(sb.resumed_at_step, Some(20));
        let w = |o: &Path| std::fs::read(o.join("sae_weights.safetensors")).unwrap();
        assert_eq!(w(&a.out), w(&b.out), "{arch}: resumed weights differ");
        assert_eq!(sa.final_metrics, sb.final_metrics);
        assert_eq!(
            log_without_speed(&a.out.join("train_log.jsonl")),
            log_without_speed(&b.out.join("train_log.jsonl"))
        );
    }
}

#[test]
fn same_seed_same_bits_and_output_replaced_whole() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), 12, 24, 2000, 3.0);
    let out = dir.path().join("run");
    let cfg = TrainConfig {
        checkpoint_every: 0,
        ..small_cfg(&acts, &out)
    };
    sae_train::run(&cfg).unwrap();
    let first = std::fs::read(out.join("sae_weights.safetensors")).unwrap();
    // A trained SAE is replaced only with --overwrite, and never with the user's file in it.
    let e = format!("{:#}", sae_train::run(&cfg).unwrap_err());
    assert!(e.contains("--overwrite"), "{e}");
    let cfg = TrainConfig {
        overwrite: true,
        ..cfg
    };
    std::fs::write(out.join("marker"), "old").unwrap();
    let e = format!("{:#}", sae_train::run(&cfg).unwrap_err());
    assert!(e.contains("marker"), "{e}");
    assert!(out.join("marker").exists());
    std::fs::remove_file(out.join("marker")).unwrap();
    // A failing run leaves the existing output untouched.
    let mut killed = Killed {
        inner: StoreSource::open(&acts, 0).unwrap(),
        batches_left: 5,
    };
    sae_train::run_with_source(&cfg, &mut killed).unwrap_err();
    assert_eq!(
        std::fs::read(out.join("sae_weights.safetensors")).unwrap(),
        first
    );
    std::fs::remove_dir_all(sae_train::partial_dir(&out).unwrap()).unwrap();
    // A finished one replaces it whole, with the same bits.
    std::fs::write(out.join("train_log.jsonl"), "").unwrap();
    sae_train::run(&cfg).unwrap();
    assert!(
        std::fs::metadata(out.join("train_log.jsonl"))
            .unwrap()
            .len()
            > 0
    );
    assert_eq!(
        std::fs::read(out.join("sae_weights.safetensors")).unwrap(),
        first
    );
    for f in [
        "cfg.json",
        "train_log.jsonl",
        "train_summary.json",
        "train_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let sae = sae_core::saelens::load(&out).unwrap();
    assert_eq!((sae.arch, sae.d_in, sae.d_sae), (ArchKind::GATED, 12, 48));
    assert_eq!(sae.meta.model_name, "synthetic");
}

#[test]
fn nan_loss_stops_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), 12, 24, 2000, 3.0);
    let out = dir.path().join("run");
    let cfg = TrainConfig {
        lr: Some(1e30),
        lr_warmup_steps: Some(0),
        checkpoint_every: 1,
        steps: Some(30),
        ..small_cfg(&acts, &out)
    };
    let e = sae_train::run(&cfg).unwrap_err().to_string();
    assert!(e.contains("the loss is") && e.contains("checkpoint"), "{e}");
    assert!(!out.exists());
    let ckpt = sae_train::partial_dir(&out).unwrap().join("checkpoint");
    assert!(ckpt.join("progress.json").exists());
    assert!(sae_core::saelens::load(&ckpt.join("sae")).is_ok());
}

/// The issue's acceptance test: on an easy synthetic set, gated recovers the true features
/// (MMCS >= 0.9) with gamma near 1, while the relu baseline shrinks (gamma clearly below 1).
#[test]
fn gated_recovers_features_without_shrinkage_relu_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    let (d_in, n_feat) = (32, 64);
    let acts = synth(dir.path(), d_in, n_feat, 60_000, 3.0);
    let (truth, _, _) = read_true_features(&acts).unwrap();
    let mut results = Vec::new();
    // Each at its own sparsity coefficient (lambda is not comparable across architectures).
    for (arch, l1) in [(ArchKind::GATED, 5.0), (ArchKind::RELU, 2.0)] {
        let cfg = TrainConfig {
            acts: Some(acts.clone()),
            out: dir.path().join(arch.as_str()),
            arch,
            d_sae: Some(128),
            l1: Some(l1),
            lr: Some(3e-3),
            batch_size: 256,
            steps: Some(1500),
            checkpoint_every: 0,
            eval_tokens: 8192,
            quiet: true,
            ..Default::default()
        };
        let s = sae_train::run(&cfg).unwrap();
        let sae = sae_core::saelens::load(&cfg.out).unwrap();
        let mmcs = sae_core::metrics::mmcs(&sae.w_dec, &truth, d_in);
        eprintln!(
            "{arch}: mmcs {mmcs:.3} gamma {:.3} L0 {:.2} FVU {:.4}",
            s.final_metrics.gamma, s.final_metrics.l0, s.final_metrics.fvu
        );
        results.push((mmcs, s.final_metrics));
    }
    let (g_mmcs, g) = &results[0];
    let (_, r) = &results[1];
    assert!(*g_mmcs >= 0.9, "gated MMCS {g_mmcs}");
    assert!((g.gamma - 1.0).abs() < 0.05, "gated gamma {}", g.gamma);
    assert!(r.gamma < 0.9, "relu gamma {}", r.gamma);
    assert!(g.fvu < 0.2, "gated FVU {}", g.fvu);
}

/// One 60-step run, and a 30-step run extended to 60 (across an epoch of the 3000-row store).
fn extension_cfgs(acts: &Path, dir: &Path, arch: ArchKind) -> (TrainConfig, TrainConfig) {
    let base = |name: &str| TrainConfig {
        arch,
        steps: Some(60),
        // Fixed warm-ups: resolved from the step count, they would differ between the runs.
        lr_warmup_steps: Some(10),
        l1_warmup_steps: Some(6),
        ..small_cfg(acts, &dir.join(format!("{name}-{arch}")))
    };
    (base("long"), base("extended"))
}

#[test]
fn extending_a_run_with_its_kept_state_gives_the_bits_of_one_long_run() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), 12, 24, 3000, 3.0);
    for arch in [ArchKind::GATED, ArchKind::RELU, ArchKind::JUMPRELU] {
        let (long, ext) = extension_cfgs(&acts, dir.path(), arch);
        let sl = sae_train::run(&long).unwrap();
        sae_train::run(&TrainConfig {
            steps: Some(30),
            keep_state: true,
            ..ext.clone()
        })
        .unwrap();
        assert!(ext.out.join("checkpoint").join("progress.json").is_file());
        let se = sae_train::run(&TrainConfig {
            extend: true,
            keep_state: true,
            ..ext.clone()
        })
        .unwrap();
        assert_eq!((se.steps, se.tokens), (60, 3840));
        assert_eq!(se.resumed_at_step, Some(30));
        assert_eq!(
            se.extensions,
            vec![sae_train::run::Extension {
                from_step: 30,
                from_tokens: 1920,
                optimizer_state_kept: true
            }]
        );
        let w = |o: &Path| std::fs::read(o.join("sae_weights.safetensors")).unwrap();
        assert_eq!(w(&long.out), w(&ext.out), "{arch}: extended weights differ");
        assert_eq!(sl.final_metrics, se.final_metrics);
        assert_eq!(
            log_without_speed(&long.out.join("train_log.jsonl")),
            log_without_speed(&ext.out.join("train_log.jsonl"))
        );
        // The kept checkpoint moved on with the run.
        assert!(ext.out.join("checkpoint").join("progress.json").is_file());
        let info = sae_train::info::describe(&ext.out).unwrap();
        assert!(
            info.contains("extended    from step 30 (1920 tokens), with its kept optimiser state"),
            "{info}"
        );
        assert!(info.contains("kept state"), "{info}");
        assert!(!sae_train::partial_dir(&ext.out).unwrap().exists());
    }
}

#[test]
fn extending_without_state_continues_the_data_and_warms_a_fresh_adam_up() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), 12, 24, 3000, 3.0);
    let (long, ext) = extension_cfgs(&acts, dir.path(), ArchKind::GATED);
    sae_train::run(&long).unwrap();
    sae_train::run(&TrainConfig {
        steps: Some(30),
        ..ext.clone()
    })
    .unwrap();
    assert!(!ext.out.join("checkpoint").exists());
    let se = sae_train::run(&TrainConfig {
        extend: true,
        ..ext.clone()
    })
    .unwrap();
    assert_eq!((se.steps, se.tokens), (60, 3840));
    assert!(!se.extensions[0].optimizer_state_kept);
    let info = sae_train::info::describe(&ext.out).unwrap();
    assert!(info.contains("with fresh Adam moments"), "{info}");
    let (l, e) = (
        log_without_speed(&long.out.join("train_log.jsonl")),
        log_without_speed(&ext.out.join("train_log.jsonl")),
    );
    // Up to step 30 the runs are the same; the log goes on with the run's step count.
    assert_eq!(l[..6], e[..6]);
    let steps: Vec<u64> = e.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=12).map(|i| 5 * i).collect::<Vec<_>>());
    // Step 35 is the fresh Adam's 5th: lr 5/10 of the peak, where the long run is at the peak.
    assert!(
        (e[6]["lr"].as_f64().unwrap() - 5e-4).abs() < 1e-9,
        "{}",
        e[6]
    );
    assert!((l[6]["lr"].as_f64().unwrap() - 1e-3).abs() < 1e-9);
    assert_eq!(e[11]["lr"], l[11]["lr"]);
    // Same weights and batches at the start of the extension: its first steps, at a fraction
    // of the lr, reconstruct about as well as the long run does there.
    let (fe, fl) = (e[6]["fvu"].as_f64().unwrap(), l[6]["fvu"].as_f64().unwrap());
    assert!((fe - fl).abs() < 0.25 * fl, "FVU at step 35: {fe} vs {fl}");
}

#[test]
fn seek_rows_lands_where_reading_those_rows_does() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), 12, 24, 3000, 3.0);
    let mut read = StoreSource::open(&acts, 3).unwrap();
    let d = read.d_in();
    let mut skip = vec![0.0f32; 64 * d];
    for _ in 0..50 {
        read.next_batch(&mut skip, 64).unwrap();
    }
    let mut jumped = StoreSource::open(&acts, 3).unwrap();
    jumped.seek_rows(50 * 64).unwrap();
    let (mut a, mut b) = (vec![0.0f32; 64 * d], vec![0.0f32; 64 * d]);
    read.next_batch(&mut a, 64).unwrap();
    jumped.next_batch(&mut b, 64).unwrap();
    assert_eq!(a, b);
    assert_eq!(read.position(), jumped.position());
}

#[test]
fn extend_refuses_what_it_cannot_continue() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), 12, 24, 3000, 3.0);
    let (_, ext) = extension_cfgs(&acts, dir.path(), ArchKind::GATED);
    let err = |c: TrainConfig| sae_train::run(&c).unwrap_err().to_string();
    let e = err(TrainConfig {
        extend: true,
        ..ext.clone()
    });
    assert!(e.contains("no finished run"), "{e}");
    sae_train::run(&TrainConfig {
        steps: Some(30),
        ..ext.clone()
    })
    .unwrap();
    let e = err(TrainConfig {
        extend: true,
        steps: Some(30),
        ..ext.clone()
    });
    assert!(e.contains("already trained 30 steps"), "{e}");
    let e = err(TrainConfig {
        extend: true,
        l1: Some(0.7),
        ..ext.clone()
    });
    assert!(e.contains("--l1"), "{e}");
    let e = err(TrainConfig {
        extend: true,
        d_sae: Some(96),
        ..ext.clone()
    });
    assert!(e.contains("d_sae"), "{e}");
    let e = err(TrainConfig {
        extend: true,
        resume: true,
        ..ext.clone()
    });
    assert!(e.contains("not both"), "{e}");
    // None of these touched the finished run.
    assert!(!sae_train::partial_dir(&ext.out).unwrap().exists());
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ext.out.join("train_summary.json")).unwrap())
            .unwrap();
    assert_eq!(s["steps"], 30);
}

#[test]
fn a_resumed_run_counts_the_rows_left_out_before_the_kill() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), 12, 24, 3000, 3.0);
    // A tight norm limit, so that rows are left out on both sides of the kill.
    let cfg = |name: &str| TrainConfig {
        max_norm_ratio: 1.5,
        ..small_cfg(&acts, &dir.path().join(name))
    };
    let (a, b) = (cfg("a"), cfg("b"));
    let sa = sae_train::run(&a).unwrap();
    assert!(sa.rows_skipped > 0);
    let mut killed = Killed {
        inner: StoreSource::open(&acts, b.seed).unwrap(),
        batches_left: 30,
    };
    sae_train::run_with_source(&b, &mut killed).unwrap_err();
    let sb = sae_train::run(&TrainConfig {
        resume: true,
        ..b.clone()
    })
    .unwrap();
    assert!(sb.resumed_at_step.is_some_and(|s| s > 0));
    assert_eq!(sa.rows_skipped, sb.rows_skipped);
    let w = |o: &Path| std::fs::read(o.join("sae_weights.safetensors")).unwrap();
    assert_eq!(w(&a.out), w(&b.out));
}

fn small_cfg(acts: &Path, out: &Path) -> TrainConfig {
    common::small_cfg(acts, out, 48)
}
