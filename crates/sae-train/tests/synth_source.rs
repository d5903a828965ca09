//! Training straight from the SynthSAEBench generator (`--synth`), with nothing on disk.

use sae_train::source::{BatchSource, SynthBenchSource};
use sae_train::{run, TrainConfig};

#[test]
fn the_synthetic_stream_is_deterministic_and_seekable() {
    let mut a = SynthBenchSource::preset("synthsaebench-small").unwrap();
    let d = a.d_in();
    assert_eq!(d, 64);
    let mut first = vec![0f32; 8 * d];
    a.next_batch(&mut first, 8).unwrap();
    let pos = a.position().unwrap();
    let mut second = vec![0f32; 8 * d];
    a.next_batch(&mut second, 8).unwrap();
    assert_ne!(first, second);
    let mut b = SynthBenchSource::new(a.bench().clone(), "synthsaebench-small");
    b.seek(&pos).unwrap();
    let mut again = vec![0f32; 8 * d];
    b.next_batch(&mut again, 8).unwrap();
    assert_eq!(second, again, "seek restores the stream");
    // The sample range is disjoint from the training rows.
    let mut sample = vec![0f32; 8 * d];
    b.sample(&mut sample, 8).unwrap();
    assert_ne!(sample, first);
    assert!(b.seek(&serde_json::json!({"epoch": 0})).is_err());
}

#[test]
fn unknown_presets_are_refused_naming_the_flag() {
    let e = SynthBenchSource::preset("synthsaebench-64k").err().unwrap();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("--synth") && msg.contains("synthsaebench-16k"),
        "{msg}"
    );
}

#[test]
fn trains_from_the_generator_without_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sae");
    let cfg = TrainConfig {
        synth: Some("synthsaebench-small".into()),
        out: out.clone(),
        arch: sae_core::ArchKind::TOPK,
        k: 8,
        d_sae: Some(128),
        batch_size: 256,
        steps: Some(60),
        init_sample: 1024,
        eval_tokens: 1024,
        quiet: true,
        ..TrainConfig::default()
    };
    let summary = run(&cfg).unwrap();
    assert_eq!(summary.d_in, 64);
    assert_eq!(summary.tokens, 60 * 256);
    assert!(out.join("cfg.json").is_file());
    let cfg_json = std::fs::read_to_string(out.join("cfg.json")).unwrap();
    assert!(
        cfg_json.contains("synthetic:synthsaebench-small"),
        "{cfg_json}"
    );

    let both = TrainConfig {
        acts: Some(dir.path().join("acts")),
        out: dir.path().join("other"),
        ..cfg.clone()
    };
    let e = format!("{:#}", run(&both).unwrap_err());
    assert!(e.contains("--synth") && e.contains("--acts"), "{e}");
    let endless = TrainConfig {
        steps: None,
        tokens: None,
        out: dir.path().join("endless"),
        ..cfg
    };
    let e = format!("{:#}", run(&endless).unwrap_err());
    assert!(e.contains("--steps or --tokens"), "{e}");
    assert!(
        !dir.path().join("endless").exists(),
        "a refused run leaves nothing behind"
    );
}
