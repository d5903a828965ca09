//! Settings are checked before any work: each range check names its flag (and, from a config
//! file, the file and field); `--resume` refuses another run's settings or data, naming the
//! difference; a working directory without a checkpoint has a way forward.

mod common;
use common::{flags, Killed};
use sae_core::ArchKind;
use sae_store::synth::{write_synthetic, SynthConfig};
use sae_train::config::resolve;
use sae_train::{StoreSource, TrainConfig};
use std::path::{Path, PathBuf};

fn synth(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let out = dir.join(name);
    let cfg = SynthConfig {
        d_in: 8,
        n_features: 16,
        n_tokens: 3000,
        l0: 3.0,
        noise: 0.01,
        seed,
        rows_per_shard: 8192,
        ..Default::default()
    };
    write_synthetic(&out, &cfg).unwrap();
    out
}

/// Each bad value with the flag its message must name.
fn bad_configs() -> Vec<(TrainConfig, &'static str)> {
    let base = TrainConfig {
        steps: Some(10),
        ..Default::default()
    };
    let topk = TrainConfig {
        arch: ArchKind::TOPK,
        ..base.clone()
    };
    let c = |f: fn(&mut TrainConfig)| {
        let mut c = base.clone();
        f(&mut c);
        c
    };
    vec![
        (c(|c| c.adam_beta1 = 1.0), "--adam-beta1"),
        (c(|c| c.adam_beta1 = -0.1), "--adam-beta1"),
        (c(|c| c.adam_beta2 = 1.5), "--adam-beta2"),
        (c(|c| c.adam_beta2 = f32::NAN), "--adam-beta2"),
        (c(|c| c.adam_eps = -1e-8), "--adam-eps"),
        (c(|c| c.adam_eps = f32::NAN), "--adam-eps"),
        (c(|c| c.adam_eps = 0.0), "--adam-eps"),
        (
            c(|c| c.jumprelu_bandwidth = Some(0.0)),
            "--jumprelu-bandwidth",
        ),
        (
            c(|c| c.jumprelu_bandwidth = Some(-1.0)),
            "--jumprelu-bandwidth",
        ),
        (c(|c| c.init_sample = 0), "--init-sample"),
        (c(|c| c.l1 = Some(f32::NAN)), "--l1"),
        (c(|c| c.l1 = Some(-1.0)), "--l1"),
        (c(|c| c.aux_coeff = Some(-1.0)), "--aux-coeff"),
        (c(|c| c.aux_coeff = Some(f32::NAN)), "--aux-coeff"),
        (c(|c| c.lr = Some(-1.0)), "--lr"),
        (c(|c| c.lr = Some(0.0)), "--lr"),
        (c(|c| c.lr = Some(f32::INFINITY)), "--lr"),
        (c(|c| c.max_norm_ratio = -2.0), "--max-norm-ratio"),
        (c(|c| c.max_norm_ratio = 0.5), "--max-norm-ratio"),
        (c(|c| c.max_norm_ratio = f32::NAN), "--max-norm-ratio"),
        (TrainConfig { k: 0, ..topk }, "--k"),
        (c(|c| c.batch_size = 0), "--batch-size"),
        (c(|c| c.log_every = 0), "--log-every"),
        (c(|c| c.dead_window_tokens = 0), "--dead-window-tokens"),
        (c(|c| c.eval_tokens = 0), "--eval-tokens"),
        (c(|c| c.threads = Some(0)), "--threads"),
        (c(|c| c.steps = Some(0)), "--steps"),
        (c(|c| c.tokens = Some(0)), "--tokens"),
        (c(|c| c.d_sae = Some(0)), "--d-sae"),
        (c(|c| c.ctx = 1), "--ctx"),
        (c(|c| c.buffer_rows = 0), "--buffer-rows"),
        (c(|c| c.out = PathBuf::from("/")), "--out"),
        (
            c(|c| c.relu_decoder_norm_l1 = Some(true)),
            "--relu-decoder-norm-l1",
        ),
    ]
}

#[test]
fn every_range_check_names_its_flag() {
    assert!(TrainConfig::default().validate().is_ok());
    assert!(resolve(&bad_configs()[0].0.clone(), 8, None).is_err());
    for (cfg, flag) in bad_configs() {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.starts_with(&format!("{flag} must be")), "{flag}: {e}");
        // resolve (what every run goes through) refuses it too.
        let e = resolve(&cfg, 8, Some(4000)).unwrap_err().to_string();
        assert!(e.contains(flag), "{flag}: {e}");
    }
}

#[test]
fn range_checks_need_data_sizes_in_resolve() {
    let topk = TrainConfig {
        arch: ArchKind::TOPK,
        steps: Some(10),
        d_sae: Some(16),
        ..Default::default()
    };
    let e = resolve(
        &TrainConfig {
            k: 17,
            ..topk.clone()
        },
        8,
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("--k must be between 1 and d_sae = 16"),
        "{e}"
    );
    let e = resolve(
        &TrainConfig {
            k_aux: Some(17),
            k: 4,
            ..topk
        },
        8,
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("--k-aux"), "{e}");
}

#[test]
fn flags_take_negative_numbers_and_refuse_them_by_range() {
    let f = flags(&["--lr", "-1", "--out", "x"]);
    assert_eq!(f.lr, Some(-1.0));
    let e = f.to_config().unwrap_err().to_string();
    assert_eq!(e, "--lr must be a positive number; got -1");
    let e = flags(&["--adam-beta2", "1"])
        .to_config()
        .unwrap_err()
        .to_string();
    assert!(e.contains("--adam-beta2 must be in [0, 1)"), "{e}");
    let e = flags(&["--eval-tokens", "0"])
        .to_config()
        .unwrap_err()
        .to_string();
    assert!(e.contains("--eval-tokens must be at least 1"), "{e}");
    assert!(flags(&["--lr", "1e-3"]).to_config().is_ok());
}

#[test]
fn a_config_file_value_out_of_range_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("run.toml");
    std::fs::write(&toml, "adam_beta2 = 1.5\nlr = 1e-3\n").unwrap();
    let e = flags(&["--config", toml.to_str().unwrap()])
        .to_config()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("run.toml") && e.contains("adam_beta2 must be in [0, 1)"),
        "{e}"
    );
    assert!(e.contains("--adam-beta2"), "{e}");
    // The flag overrides the file, and then it is the flag that is named.
    let e = flags(&["--config", toml.to_str().unwrap(), "--adam-beta2", "2"])
        .to_config()
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--adam-beta2 must be"), "{e}");
    assert!(
        flags(&["--config", toml.to_str().unwrap(), "--adam-beta2", "0.99"])
            .to_config()
            .is_ok()
    );
    let json = dir.path().join("run.json");
    std::fs::write(&json, r#"{"log_every": 0}"#).unwrap();
    let e = flags(&["--config", json.to_str().unwrap()])
        .to_config()
        .unwrap_err()
        .to_string();
    assert!(e.contains("run.json") && e.contains("log_every"), "{e}");
}

/// Runs `cfg` until it is killed after `batches` batches.
fn kill_after(cfg: &TrainConfig, batches: usize) {
    let mut killed = Killed {
        inner: StoreSource::open(cfg.acts.as_ref().unwrap(), cfg.seed).unwrap(),
        batches_left: batches,
    };
    let e = sae_train::run_with_source(cfg, &mut killed).unwrap_err();
    assert!(e.to_string().contains("killed"), "{e}");
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(files(&p));
        } else {
            v.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    v.sort();
    v
}

#[test]
fn resume_refuses_another_runs_settings_or_data() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), "acts", 3);
    let other = synth(dir.path(), "other", 4);
    let cfg = small_cfg(&acts, &dir.path().join("run"));
    kill_after(&cfg, 25);
    let partial = sae_train::partial_dir(&cfg.out).unwrap();
    let before = files(&partial);
    let resume = TrainConfig {
        resume: true,
        ..cfg.clone()
    };
    let cases = [
        (
            TrainConfig {
                l1: Some(2.0),
                ..resume.clone()
            },
            "--l1 (the sparsity coefficient) was 0.5, now 2",
        ),
        (
            TrainConfig {
                acts: Some(other.clone()),
                ..resume.clone()
            },
            "--acts (the store's path) was",
        ),
        (
            TrainConfig {
                d_sae: Some(64),
                ..resume.clone()
            },
            "--d-sae (d_sae) was 32, now 64",
        ),
        (
            TrainConfig {
                lr: Some(2e-3),
                ..resume.clone()
            },
            "--lr (lr) was 0.001, now 0.002",
        ),
        (
            TrainConfig {
                adam_beta2: 0.99,
                ..resume.clone()
            },
            "--adam-beta2 (adam_beta2) was 0.999, now 0.99",
        ),
        (
            TrainConfig {
                max_norm_ratio: 0.0,
                ..resume.clone()
            },
            "--max-norm-ratio (max_norm_ratio) was 10, now 0",
        ),
    ];
    for (c, needle) in cases {
        let e = sae_train::run(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("--resume:") && e.contains(needle),
            "{needle}: {e}"
        );
        assert!(e.contains("delete"), "{e}");
        assert_eq!(files(&partial), before, "a refused resume changed {needle}");
        assert!(!cfg.out.exists());
    }
    // A store rewritten in place with other rows (same path) is another store too.
    let acts_copy = dir.path().join("acts-copy");
    std::fs::rename(&acts, &acts_copy).unwrap();
    let bigger = SynthConfig {
        d_in: 8,
        n_features: 16,
        n_tokens: 3500,
        seed: 3,
        ..Default::default()
    };
    write_synthetic(&acts, &bigger).unwrap();
    let e = sae_train::run(&resume).unwrap_err().to_string();
    assert!(
        e.contains("the rows in the --acts store was 3000, now 3500"),
        "{e}"
    );
    std::fs::remove_dir_all(&acts).unwrap();
    std::fs::rename(&acts_copy, &acts).unwrap();

    // Settings that may change on resume: a longer run, threads, log and checkpoint frequency,
    // the evaluation size; and the store by another (non-canonical) path.
    let indirect = dir.path().join("x").join("..").join("acts");
    std::fs::create_dir_all(dir.path().join("x")).unwrap();
    let s = sae_train::run(&TrainConfig {
        acts: Some(indirect),
        steps: Some(50),
        threads: Some(1),
        log_every: 10,
        checkpoint_every: 0,
        eval_tokens: 256,
        ..resume.clone()
    })
    .unwrap();
    assert_eq!((s.resumed_at_step, s.steps), (Some(20), 50));
}

#[test]
fn resume_same_settings_continues_and_old_partials_stay_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), "acts", 3);
    let cfg = small_cfg(&acts, &dir.path().join("run"));
    kill_after(&cfg, 25);
    let partial = sae_train::partial_dir(&cfg.out).unwrap();
    // A working directory written before the data and schedule were recorded: only the
    // fields it has are compared.
    let config_path = partial.join("train_config.json");
    let mut old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let id = old["identity"].as_object_mut().unwrap();
    for k in [
        "acts",
        "acts_rows",
        "lr",
        "sparsity_coeff",
        "max_norm_ratio",
    ] {
        assert!(id.remove(k).is_some(), "{k} is recorded");
    }
    std::fs::write(&config_path, serde_json::to_string(&old).unwrap()).unwrap();
    let resume = TrainConfig {
        resume: true,
        ..cfg.clone()
    };
    // A field it does record is still compared.
    let e = sae_train::run(&TrainConfig {
        d_sae: Some(40),
        ..resume.clone()
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("--d-sae (d_sae) was 32, now 40"),
        "{e}"
    );
    let s = sae_train::run(&resume).unwrap();
    assert_eq!((s.resumed_at_step, s.steps), (Some(20), 40));
    // The published config records the whole identity again.
    let published: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.out.join("train_config.json")).unwrap())
            .unwrap();
    assert_eq!(published["identity"]["lr"], "0.001");
    assert!(published["identity"]["acts"]
        .as_str()
        .unwrap()
        .ends_with("acts"));
}

#[test]
fn resume_refuses_fewer_steps_than_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), "acts", 3);
    let cfg = small_cfg(&acts, &dir.path().join("run"));
    kill_after(&cfg, 25);
    let e = sae_train::run(&TrainConfig {
        resume: true,
        steps: Some(15),
        ..cfg.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("at step 20, past the 15 steps"), "{e}");
}

#[test]
fn a_run_that_stopped_before_its_first_checkpoint_has_a_way_forward() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), "acts", 3);
    let cfg = small_cfg(&acts, &dir.path().join("run"));
    // Killed at step 5, before the first checkpoint (step 10).
    kill_after(&cfg, 5);
    let partial = sae_train::partial_dir(&cfg.out).unwrap();
    assert!(partial.join("train_config.json").exists());
    assert!(!partial.join("checkpoint").exists());
    let e = sae_train::run(&TrainConfig {
        resume: true,
        ..cfg.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("holds no checkpoint") && e.contains("run again without --resume"),
        "{e}"
    );
    assert!(!e.contains("checkpoint at"), "{e}");
    // A fresh start replaces it.
    let s = sae_train::run(&cfg).unwrap();
    assert_eq!(s.steps, 40);
    assert!(!partial.exists());

    // Not if it holds anything the trainer did not write (the finished run in --out is
    // replaced only with --overwrite).
    let cfg = TrainConfig {
        overwrite: true,
        ..cfg
    };
    kill_after(&cfg, 5);
    std::fs::write(partial.join("notes.txt"), "mine").unwrap();
    let e = sae_train::run(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("notes.txt") && e.contains("another --out"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(partial.join("notes.txt")).unwrap(),
        "mine"
    );

    // With no unfinished run at all, --resume says what to do instead.
    let fresh = dir.path().join("never");
    let e = sae_train::run(&TrainConfig {
        resume: true,
        ..small_cfg(&acts, &fresh)
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("start without --resume"), "{e}");
    // cfg.out is finished (the fresh start above): --extend is the way to train it on.
    std::fs::remove_dir_all(&partial).unwrap();
    let e = sae_train::run(&TrainConfig {
        resume: true,
        ..cfg.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("is finished: train it on with --extend"), "{e}");
}

#[test]
fn a_fresh_start_beside_a_checkpoint_names_the_checkpoint_step() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), "acts", 3);
    let cfg = small_cfg(&acts, &dir.path().join("run"));
    kill_after(&cfg, 25);
    let e = sae_train::run(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("a checkpoint at step 20") && e.contains("pass --resume"),
        "{e}"
    );
}

#[test]
fn nan_loss_message_names_a_checkpoint_only_when_there_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path(), "acts", 3);
    let diverging = |out: &str, checkpoint_every: u64| TrainConfig {
        lr: Some(1e30),
        lr_warmup_steps: Some(0),
        checkpoint_every,
        steps: Some(30),
        ..small_cfg(&acts, &dir.path().join(out))
    };
    let none = diverging("none", 0);
    let e = sae_train::run(&none).unwrap_err().to_string();
    assert!(e.contains("the loss is"), "{e}");
    assert!(
        e.contains("No checkpoint was written yet") && !e.contains("checkpoint at"),
        "{e}"
    );
    // The way forward the message names works: a fresh start with a lower lr.
    let s = sae_train::run(&TrainConfig {
        lr: Some(1e-3),
        ..none.clone()
    })
    .unwrap();
    assert_eq!(s.steps, 30);

    let every = diverging("every", 1);
    let e = sae_train::run(&every).unwrap_err().to_string();
    let partial = sae_train::partial_dir(&every.out).unwrap();
    let ckpt: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(partial.join("checkpoint/progress.json")).unwrap(),
    )
    .unwrap();
    let at = format!("checkpoint at step {}", ckpt["step"]);
    assert!(e.contains(&at) && e.contains("delete"), "{e}");
}

fn small_cfg(acts: &Path, out: &Path) -> TrainConfig {
    common::small_cfg(acts, out, 32)
}
