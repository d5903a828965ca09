//! `--target-l0`: the coefficient controller reaches the target, travels in checkpoints
//! (resume and extend give the bits of one run), and is refused where it has no meaning.

mod common;
use common::Killed;
use sae_core::ArchKind;
use sae_store::synth::{write_synthetic, SynthConfig};
use sae_train::{StoreSource, TrainConfig};
use std::path::{Path, PathBuf};

fn acts(dir: &Path) -> PathBuf {
    let out = dir.join("acts");
    let cfg = SynthConfig {
        d_in: 16,
        n_features: 48,
        n_tokens: 8192,
        l0: 4.0,
        noise: 0.01,
        seed: 5,
        rows_per_shard: 8192,
        ..Default::default()
    };
    write_synthetic(&out, &cfg).unwrap();
    out
}

fn cfg(acts: &Path, out: &Path, arch: ArchKind, target: Option<f64>) -> TrainConfig {
    TrainConfig {
        arch,
        target_l0: target,
        steps: Some(2000),
        l1_warmup_steps: Some(50),
        lr_warmup_steps: Some(20),
        // A coefficient far too small: without the controller L0 stays high.
        l1: Some(0.1),
        log_every: 50,
        lr: Some(3e-3),
        // With the default 0.001 almost no pre-activation of this small set lies within a
        // bandwidth of a threshold, so no coefficient moves JumpReLU's L0 in 2000 steps.
        jumprelu_bandwidth: (arch == ArchKind::JUMPRELU).then_some(0.05),
        ..common::small_cfg(acts, out, 64)
    }
}

/// Mean L0 over the log lines of the last 100 steps.
fn late_l0(out: &Path) -> f64 {
    let text = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let l0: Vec<f64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["step"].as_u64().is_some_and(|s| s > 1900))
        .filter_map(|v| v["l0"].as_f64())
        .collect();
    l0.iter().sum::<f64>() / l0.len() as f64
}

#[test]
fn penalty_families_reach_the_target_l0() {
    let dir = tempfile::tempdir().unwrap();
    let acts = acts(dir.path());
    for arch in [ArchKind::RELU, ArchKind::GATED, ArchKind::JUMPRELU] {
        let free = cfg(&acts, &dir.path().join(format!("free-{arch}")), arch, None);
        sae_train::run(&free).unwrap();
        let steered = cfg(
            &acts,
            &dir.path().join(format!("t-{arch}")),
            arch,
            Some(6.0),
        );
        let s = sae_train::run(&steered).unwrap();
        let (l0_free, l0) = (late_l0(&free.out), late_l0(&steered.out));
        assert!(
            (l0 - 6.0).abs() < 1.5,
            "{arch}: L0 {l0} with the target, {l0_free} without; {:?}",
            s.l0_target
        );
        assert!(l0_free > 9.0, "{arch}: L0 {l0_free} without the target");
        let t = s.l0_target.expect("the summary keeps the controller");
        assert!(t.multiplier > 1.0, "{arch}: multiplier {}", t.multiplier);
    }
}

#[test]
fn the_controller_travels_in_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let acts = acts(dir.path());
    let w = |o: &Path| std::fs::read(o.join("sae_weights.safetensors")).unwrap();
    let short = |name: &str| TrainConfig {
        steps: Some(120),
        checkpoint_every: 20,
        ..cfg(&acts, &dir.path().join(name), ArchKind::RELU, Some(6.0))
    };
    let a = short("whole");
    let sa = sae_train::run(&a).unwrap();

    // Killed after 70 batches (the checkpoint at step 60), then resumed.
    let b = short("resumed");
    let mut killed = Killed {
        inner: StoreSource::open(&acts, b.seed).unwrap(),
        batches_left: 70,
    };
    assert!(sae_train::run_with_source(&b, &mut killed).is_err());
    let sb = sae_train::run(&TrainConfig {
        resume: true,
        ..b.clone()
    })
    .unwrap();
    assert_eq!(sb.resumed_at_step, Some(60));
    assert_eq!(w(&a.out), w(&b.out), "resumed weights differ");
    assert_eq!(sa.l0_target, sb.l0_target);

    // Trained to step 60 with its state kept, then extended to 120.
    let c = short("extended");
    sae_train::run(&TrainConfig {
        steps: Some(60),
        keep_state: true,
        ..c.clone()
    })
    .unwrap();
    let sc = sae_train::run(&TrainConfig {
        extend: true,
        ..c.clone()
    })
    .unwrap();
    assert_eq!(w(&a.out), w(&c.out), "extended weights differ");
    assert_eq!(sa.l0_target, sc.l0_target);
}

#[test]
fn refused_where_it_has_no_meaning() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let base = TrainConfig {
        out: out.clone(),
        ..Default::default()
    };
    let e = TrainConfig {
        arch: ArchKind::TOPK,
        target_l0: Some(20.0),
        ..base.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("--target-l0") && e.contains("--k"), "{e}");
    for bad in [0.0, -3.0, f64::NAN] {
        let e = TrainConfig {
            target_l0: Some(bad),
            ..base.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--target-l0 must be a positive number"), "{e}");
    }
    let e = TrainConfig {
        target_l0_rate: Some(0.01),
        ..base.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("without --target-l0"), "{e}");
    let e = TrainConfig {
        target_l0: Some(20.0),
        target_l0_rate: Some(1.5),
        ..base
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("--target-l0-rate must be in (0, 1)"), "{e}");
    assert!(!out.exists());
}
