//! Dead-latent resampling in training runs: the schedule and its checks, the lr drop and
//! its cosine return, fewer dead latents, the log line, and resume through a resampling.

mod common;
use common::{flags, Killed};
use sae_core::ArchKind;
use sae_store::synth::{write_synthetic, SynthConfig};
use sae_train::config::{resample_lr_factor, resolve};
use sae_train::{BDecInit, BatchSource, MemorySource, StoreSource, TrainConfig};
use std::path::{Path, PathBuf};

fn synth(dir: &Path) -> PathBuf {
    let out = dir.join("acts");
    let cfg = SynthConfig {
        d_in: D_IN,
        n_features: 24,
        n_tokens: 4000,
        l0: 3.0,
        noise: 0.01,
        seed: 3,
        rows_per_shard: 8192,
        ..Default::default()
    };
    write_synthetic(&out, &cfg).unwrap();
    out
}

const D_IN: usize = 12;

/// The synthetic store's rows moved by a constant offset larger than their spread, in
/// memory. With b_dec starting at 0, the latents whose direction points away from the offset
/// never fire (as with the activation outliers of real models) and, without a gradient, stay
/// dead: the case resampling is for.
fn offset_rows(acts: &Path) -> MemorySource {
    let mut store = StoreSource::open(acts, 0).unwrap();
    let n = store.n_rows().unwrap() as usize;
    let mut data = vec![0.0f32; n * D_IN];
    store.sample(&mut data, n).unwrap();
    data.iter_mut().for_each(|v| *v += 1.5);
    MemorySource {
        data,
        d_in: D_IN,
        next: 0,
    }
}

fn dying_cfg(out: &Path, arch: ArchKind) -> TrainConfig {
    TrainConfig {
        out: out.to_path_buf(),
        arch,
        d_sae: Some(48),
        batch_size: 64,
        steps: Some(60),
        checkpoint_every: 10,
        log_every: 5,
        l1: Some(1.0),
        lr: Some(3e-3),
        b_dec_init: BDecInit::Zero,
        normalize: false,
        max_norm_ratio: 0.0,
        init_sample: 512,
        eval_tokens: 512,
        dead_window_tokens: 64 * 10,
        resample_steps: vec![20, 40],
        resample_sample: 1024,
        resample_lr_warmup_steps: 8,
        quiet: true,
        threads: Some(2),
        ..Default::default()
    }
}

fn log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path.join("train_log.jsonl"))
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
fn the_lr_drops_to_a_tenth_and_returns_along_a_cosine() {
    let f = |step| resample_lr_factor(&[100, 5000], 1000, step);
    assert_eq!(f(0), 1.0);
    assert_eq!(f(99), 1.0);
    assert!((f(100) - 0.1).abs() < 1e-12, "{}", f(100));
    assert!((f(600) - 0.55).abs() < 1e-12, "{}", f(600));
    let cosine = |t: f64| 0.1 + 0.9 * (1.0 - (std::f64::consts::PI * t / 1000.0).cos()) / 2.0;
    for t in [1u64, 250, 750, 999] {
        assert!((f(100 + t) - cosine(t as f64)).abs() < 1e-12, "{t}");
        assert!(f(100 + t) > f(100 + t - 1));
    }
    assert_eq!(f(1100), 1.0);
    assert_eq!(f(4999), 1.0);
    assert!((f(5000) - 0.1).abs() < 1e-12);
    assert_eq!(f(6000), 1.0);
    // A second resampling inside the first one's return starts the drop again.
    assert!((resample_lr_factor(&[100, 300], 1000, 300) - 0.1).abs() < 1e-12);
    // No warm-up: no drop.
    assert_eq!(resample_lr_factor(&[100], 0, 100), 1.0);
}

#[test]
fn the_schedule_is_checked_before_any_work() {
    let base = ["--acts", "a", "--out", "runs/x", "--steps", "100"];
    let cfg = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        flags(&a).to_config()
    };
    let c = cfg(&["--arch", "relu", "--resample-steps", "25,50,75"]).unwrap();
    assert_eq!(c.resample_steps, vec![25, 50, 75]);
    assert_eq!(c.resample_window_tokens(), c.dead_window_tokens);
    let r = resolve(&c, 8, None).unwrap();
    assert_eq!(r.steps, 100);
    for arch in ["topk", "batchtopk", "jumprelu"] {
        let e = cfg(&["--arch", arch, "--resample-steps", "25"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--resample-steps") && e.contains(arch),
            "{arch}: {e}"
        );
    }
    for bad in ["0,10", "50,25", "25,25"] {
        let e = cfg(&["--arch", "gated", "--resample-steps", bad])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--resample-steps") && e.contains("increasing"),
            "{e}"
        );
    }
    for (flag, v) in [("--resample-window", "0"), ("--resample-sample", "0")] {
        let e = cfg(&["--arch", "relu", "--resample-steps", "25", flag, v])
            .unwrap_err()
            .to_string();
        assert!(e.contains(flag), "{e}");
    }
    // A step at or past the end of the run trains nothing on what it resamples.
    for last in ["100", "250"] {
        let c = cfg(&["--arch", "relu", "--resample-steps", &format!("10,{last}")]).unwrap();
        let e = resolve(&c, 8, None).unwrap_err().to_string();
        assert!(
            e.contains("--resample-steps") && e.contains(last) && e.contains("100 steps"),
            "{e}"
        );
    }
}

fn resample_lines(log: &[serde_json::Value]) -> Vec<(u64, u64, u64)> {
    log.iter()
        .filter(|v| v.get("resampled_latents").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["dead_latents"].as_u64().unwrap(),
                v["resampled_latents"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn resampling_revives_dead_latents_and_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path());
    for arch in [ArchKind::RELU, ArchKind::GATED] {
        let with = dying_cfg(&dir.path().join(format!("with-{arch}")), arch);
        // The same schedule, but no latent is ever dead long enough to be resampled (so
        // nothing is, and the lr is never dropped).
        let plain = TrainConfig {
            out: dir.path().join(format!("plain-{arch}")),
            resample_window: Some(u64::MAX),
            ..with.clone()
        };
        let sp = sae_train::run_with_source(&plain, &mut offset_rows(&acts)).unwrap();
        let sw = sae_train::run_with_source(&with, &mut offset_rows(&acts)).unwrap();
        let lines = resample_lines(&log(&with.out));
        let steps: Vec<u64> = lines.iter().map(|l| l.0).collect();
        assert_eq!(steps, with.resample_steps, "{arch}");
        assert!(lines.iter().all(|l| l.2 == l.1), "{arch}: {lines:?}");
        assert!(lines[0].2 > 0, "{arch}: nothing to resample: {lines:?}");
        let plain_lines = resample_lines(&log(&plain.out));
        assert!(plain_lines.iter().all(|l| l.2 == 0), "{plain_lines:?}");
        let (fp, fw) = (&sp.final_metrics, &sw.final_metrics);
        eprintln!(
            "{arch}: {lines:?} dead {} -> {}, unfired {} -> {}, fvu {:.3} -> {:.3}",
            fp.dead_latents,
            fw.dead_latents,
            fp.unfired_in_eval,
            fw.unfired_in_eval,
            fp.fvu,
            fw.fvu
        );
        assert!(
            fw.dead_latents < fp.dead_latents && fw.unfired_in_eval < fp.unfired_in_eval,
            "{arch}: with resampling {} dead ({} unfired in the evaluation), without {} ({})",
            fw.dead_latents,
            fw.unfired_in_eval,
            fp.dead_latents,
            fp.unfired_in_eval
        );
        // The step after a resampling runs at a tenth of the lr, and it comes back.
        let lr = |l: &[serde_json::Value], step: u64| {
            l.iter()
                .find(|v| v["step"] == step && v.get("lr").is_some())
                .and_then(|v| v["lr"].as_f64())
                .unwrap()
        };
        let lw = log(&with.out);
        let at = |step: u64| {
            let f = resample_lr_factor(&with.resample_steps, 8, step);
            (3e-3f32 as f64 * f) as f32 as f64
        };
        assert_eq!(lr(&lw, 15), 3e-3f32 as f64);
        // The log line after step 25 shows the lr of step index 24, 4 of 8 steps into the
        // return: 0.55x.
        assert!((resample_lr_factor(&with.resample_steps, 8, 24) - 0.55).abs() < 1e-12);
        assert_eq!(lr(&lw, 25), at(24));
        assert_eq!(lr(&lw, 30), 3e-3f32 as f64);
        assert_eq!(lr(&lw, 45), at(44));
        // A resampling that resampled nothing leaves the lr alone.
        assert_eq!(lr(&log(&plain.out), 25), 3e-3f32 as f64);
    }
}

/// Killed after the resampling at step 20 (resumed from its checkpoint, which holds the
/// resampled weights) or before it (resumed at step 10, the resampling done again with the
/// same draw): the same bits as the run that was never stopped.
#[test]
fn resume_through_a_resampling_gives_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path());
    for arch in [ArchKind::RELU, ArchKind::GATED] {
        let a = dying_cfg(&dir.path().join(format!("a-{arch}")), arch);
        let sa = sae_train::run_with_source(&a, &mut offset_rows(&acts)).unwrap();
        let lines = resample_lines(&log(&a.out));
        assert!(lines.iter().any(|l| l.2 > 0), "{arch}: {lines:?}");
        for (batches, resumed_at) in [(25, 20), (15, 10)] {
            let b = TrainConfig {
                out: dir.path().join(format!("b-{arch}-{batches}")),
                ..a.clone()
            };
            let mut killed = Killed {
                inner: offset_rows(&acts),
                batches_left: batches,
            };
            let e = sae_train::run_with_source(&b, &mut killed).unwrap_err();
            assert!(e.to_string().contains("killed"), "{e}");
            let resume = TrainConfig {
                resume: true,
                ..b.clone()
            };
            let sb = sae_train::run_with_source(&resume, &mut offset_rows(&acts)).unwrap();
            assert_eq!(sb.resumed_at_step, Some(resumed_at));
            let w = |o: &Path| std::fs::read(o.join("sae_weights.safetensors")).unwrap();
            assert!(
                w(&a.out) == w(&b.out),
                "{arch} {batches}: resumed weights differ"
            );
            assert_eq!(sa.final_metrics, sb.final_metrics, "{arch} {batches}");
            assert_eq!(log(&a.out), log(&b.out), "{arch} {batches}");
        }
    }
}
