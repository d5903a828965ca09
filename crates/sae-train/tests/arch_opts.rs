//! A family's training options: the older flags (`--k-aux`, `--aux-coeff`,
//! `--jumprelu-bandwidth`, `--relu-decoder-norm-l1`) and `--arch-opt` give the same bits, and a
//! run recorded when those options were flat fields of the config still resumes to the bits of
//! an uninterrupted run.

mod common;
use common::{flags, Killed};
use sae_core::ArchKind;
use sae_store::synth::{write_synthetic, SynthConfig};
use sae_train::config::resolve;
use sae_train::{StoreSource, TrainConfig};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn synth(dir: &Path) -> PathBuf {
    let out = dir.join("acts");
    let cfg = SynthConfig {
        d_in: 8,
        n_features: 16,
        n_tokens: 3000,
        l0: 3.0,
        noise: 0.01,
        seed: 5,
        rows_per_shard: 8192,
        ..Default::default()
    };
    write_synthetic(&out, &cfg).unwrap();
    out
}

fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A short run of `arch` (k 4 where the family uses k); latents count as dead after one
/// batch, so that AuxK works from the start.
fn base(acts: &Path, out: &Path, arch: ArchKind) -> TrainConfig {
    let mut c = common::small_cfg(acts, out, 32);
    c.arch = arch;
    c.dead_window_tokens = 64;
    if arch.uses_k() {
        c.k = 4;
        c.l1 = None;
    }
    c
}

/// Each case: a family, the older flags setting its options, the same as `--arch-opt`.
type Case = (
    ArchKind,
    fn(&mut TrainConfig),
    &'static [(&'static str, &'static str)],
);

fn cases() -> Vec<Case> {
    vec![
        (
            ArchKind::TOPK,
            |c| {
                c.k_aux = Some(3);
                c.aux_coeff = Some(0.25);
            },
            &[("k_aux", "3"), ("aux_coeff", "0.25")],
        ),
        (
            ArchKind::JUMPRELU,
            |c| c.jumprelu_bandwidth = Some(0.05),
            &[("bandwidth", "0.05")],
        ),
        (
            ArchKind::RELU,
            |c| c.relu_decoder_norm_l1 = Some(true),
            &[("decoder_norm_l1", "true")],
        ),
    ]
}

fn weights(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("sae_weights.safetensors")).unwrap()
}

#[test]
fn older_flags_and_arch_opts_give_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path());
    // The flags parse into the older fields.
    let f = flags(&[
        "--k-aux",
        "3",
        "--aux-coeff",
        "0.25",
        "--jumprelu-bandwidth",
        "0.05",
        "--relu-decoder-norm-l1",
    ]);
    assert_eq!(
        (
            f.k_aux,
            f.aux_coeff,
            f.jumprelu_bandwidth,
            f.relu_decoder_norm_l1
        ),
        (Some(3), Some(0.25), Some(0.05), Some(true))
    );
    for (arch, older, new) in cases() {
        let mut a = base(&acts, &dir.path().join(format!("flags-{arch}")), arch);
        older(&mut a);
        let b = TrainConfig {
            arch_opt: opts(new),
            ..base(&acts, &dir.path().join(format!("opts-{arch}")), arch)
        };
        let plain = base(&acts, &dir.path().join(format!("plain-{arch}")), arch);
        let (ra, rb) = (resolve(&a, 8, None).unwrap(), resolve(&b, 8, None).unwrap());
        assert_eq!(ra.arch_opts, rb.arch_opts, "{arch}");
        assert_eq!(ra.l1_warmup_steps, rb.l1_warmup_steps, "{arch}");
        for (name, _) in new.iter() {
            assert!(ra.arch_opts.contains_key(*name), "{arch}: {name} resolved");
        }
        sae_train::run(&a).unwrap();
        sae_train::run(&b).unwrap();
        sae_train::run(&plain).unwrap();
        assert_eq!(
            weights(&a.out),
            weights(&b.out),
            "{arch}: flags vs --arch-opt"
        );
        // The option reaches the rule: the defaults train other weights.
        assert_ne!(
            weights(&a.out),
            weights(&plain.out),
            "{arch}: option ignored"
        );
        // Both record the option under the older name in the run identity.
        let id = |o: &Path| -> serde_json::Value {
            let text = std::fs::read_to_string(o.join("train_config.json")).unwrap();
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["identity"].clone()
        };
        assert_eq!(id(&a.out), id(&b.out), "{arch}");
    }
}

/// The run identity and config as the version with flat option fields wrote them: every
/// one of the four recorded for every family (floats as their f32 text in the identity).
fn flatten_recorded(config_path: &Path, flat: &[(&str, serde_json::Value)]) {
    let mut old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(config_path).unwrap()).unwrap();
    let defaults = [
        ("k_aux", json!(0)),
        ("aux_coeff", json!(1.0f32 / 32.0)),
        ("jumprelu_bandwidth", json!(0.001f32)),
        ("relu_decoder_norm_l1", json!(false)),
    ];
    for (field, default) in defaults {
        let v = flat
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, v)| v.clone())
            .unwrap_or(default);
        let in_identity = match v.as_f64() {
            Some(x) if v.is_f64() => json!((x as f32).to_string()),
            _ => v.clone(),
        };
        old["identity"][field] = in_identity;
        old["config"][field] = v;
    }
    old["config"]["arch_opt"] = json!({});
    old["resolved"].as_object_mut().unwrap().remove("arch_opts");
    std::fs::write(config_path, serde_json::to_string_pretty(&old).unwrap()).unwrap();
}

#[test]
fn a_run_recorded_with_flat_option_fields_resumes_to_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let acts = synth(dir.path());
    // A family, the older flags of the run, its options as the flat fields recorded them,
    // and another value of one of them.
    type Flat = Vec<(&'static str, serde_json::Value)>;
    type Run = (ArchKind, fn(&mut TrainConfig), Flat, fn(&mut TrainConfig));
    let runs: Vec<Run> = vec![
        (
            ArchKind::TOPK,
            |c| {
                c.k_aux = Some(3);
                c.aux_coeff = Some(0.25);
            },
            vec![("k_aux", json!(3)), ("aux_coeff", json!(0.25f32))],
            |c| c.k_aux = Some(5),
        ),
        (
            ArchKind::JUMPRELU,
            |c| c.jumprelu_bandwidth = Some(0.05),
            vec![("jumprelu_bandwidth", json!(0.05f32))],
            |c| c.jumprelu_bandwidth = Some(0.5),
        ),
    ];
    for (arch, older, flat, other) in runs {
        let mut whole = base(&acts, &dir.path().join(format!("whole-{arch}")), arch);
        older(&mut whole);
        sae_train::run(&whole).unwrap();

        let mut cfg = base(&acts, &dir.path().join(format!("killed-{arch}")), arch);
        older(&mut cfg);
        let mut killed = Killed {
            inner: StoreSource::open(cfg.acts.as_ref().unwrap(), cfg.seed).unwrap(),
            batches_left: 25,
        };
        let e = sae_train::run_with_source(&cfg, &mut killed).unwrap_err();
        assert!(e.to_string().contains("killed"), "{e}");
        let partial = sae_train::partial_dir(&cfg.out).unwrap();
        flatten_recorded(&partial.join("train_config.json"), &flat);

        // Another value of the option is refused, naming the flag and the option.
        let mut changed = TrainConfig {
            resume: true,
            ..cfg.clone()
        };
        other(&mut changed);
        let e = sae_train::run(&changed).unwrap_err().to_string();
        let field = flat[0].0;
        let flag = format!("--{}", field.replace('_', "-"));
        assert!(
            e.contains(&format!("{flag} (--arch-opt")) && e.contains("was "),
            "{arch}: {e}"
        );

        // The same options, given as --arch-opt, continue it to the uninterrupted run's bits.
        let new_spelling: BTreeMap<String, String> = cases()
            .into_iter()
            .find(|(a, _, _)| *a == arch)
            .map(|(_, _, o)| opts(o))
            .unwrap();
        let resumed = TrainConfig {
            resume: true,
            arch_opt: new_spelling,
            ..base(&acts, &cfg.out, arch)
        };
        let s = sae_train::run(&resumed).unwrap();
        assert_eq!(s.resumed_at_step, Some(20), "{arch}");
        assert_eq!(
            weights(&whole.out),
            weights(&cfg.out),
            "{arch}: resumed bits differ"
        );
    }
}
