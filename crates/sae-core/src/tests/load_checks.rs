//! Every SAE is checked on load and on save: broken sizes, k, non-finite weights, thresholds,
//! cfg keys that change the math; SAELens' TopK decoder-norm rescaling folded exactly.

use super::{randn, random_sae};
use crate::sae::Invalid;
use crate::saelens::{load, save, CFG_FILE, WEIGHTS_FILE};
use crate::{ArchKind, Sae};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::{tensor::TensorView, Dtype};
use serde_json::{json, Value};
use std::path::Path;

/// Writes a SAELens-layout directory from a cfg and f32 tensors.
fn write_dir(dir: &Path, cfg: &Value, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s)| {
            (
                n.to_string(),
                TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(d)).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join(WEIGHTS_FILE),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join(CFG_FILE), cfg.to_string()).unwrap();
}

fn tensors_of(sae: &Sae) -> Vec<(&'static str, Vec<f32>, Vec<usize>)> {
    sae.tensors()
        .into_iter()
        .map(|(n, d, s)| (n, d.to_vec(), s))
        .collect()
}

fn cfg_of(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(CFG_FILE)).unwrap()).unwrap()
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", load(dir).unwrap_err())
}

fn assert_has(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "'{n}' missing from: {err}");
    }
}

#[test]
fn validate_names_each_problem() {
    let good = random_sae(ArchKind::TOPK, 4, 8, 3, 1);
    assert_eq!(good.validate(), Ok(()));
    let config_key = |s: &Sae| match s.validate() {
        Err(Invalid::Config { key, .. }) => key,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        config_key(&Sae {
            d_sae: 0,
            ..good.clone()
        }),
        "d_sae"
    );
    assert_eq!(
        config_key(&Sae {
            d_in: 0,
            ..good.clone()
        }),
        "d_in"
    );
    assert_eq!(
        config_key(&Sae {
            settings: crate::arch::Settings::from([("k".into(), 0.into())]),
            ..good.clone()
        }),
        "k"
    );
    assert_eq!(
        config_key(&Sae {
            settings: crate::arch::Settings::from([("k".into(), 9.into())]),
            ..good.clone()
        }),
        "k"
    );
    assert_eq!(
        Sae {
            settings: crate::arch::Settings::from([("k".into(), 8.into())]),
            ..good.clone()
        }
        .validate(),
        Ok(())
    );

    let mut nan = good.clone();
    nan.w_enc[0] = f32::NAN;
    nan.w_enc[5] = f32::NAN;
    nan.w_enc[7] = f32::INFINITY;
    match nan.validate() {
        Err(Invalid::Tensor {
            tensor: "W_enc",
            msg,
            non_finite: true,
        }) => assert_eq!(msg, "W_enc holds 2 NaN and 1 infinite values"),
        other => panic!("{other:?}"),
    }
    let mut short = good.clone();
    short.b_dec.pop();
    assert!(matches!(
        short.validate(),
        Err(Invalid::Tensor {
            tensor: "b_dec",
            non_finite: false,
            ..
        })
    ));
    let mut jr = random_sae(ArchKind::JUMPRELU, 4, 8, 0, 2);
    jr.param_mut("threshold")[3] = -0.25;
    match jr.validate() {
        Err(Invalid::Tensor {
            tensor: "threshold",
            msg,
            ..
        }) => assert!(msg.contains("1 negative") && msg.contains("-0.25"), "{msg}"),
        other => panic!("{other:?}"),
    }
    jr.param_mut("threshold")[3] = 0.0;
    assert_eq!(jr.validate(), Ok(()));
    let mut gated = random_sae(ArchKind::GATED, 4, 8, 0, 3);
    gated.param_mut("b_gate")[1] = f32::NEG_INFINITY;
    assert!(matches!(
        gated.validate(),
        Err(Invalid::Tensor {
            tensor: "b_gate",
            ..
        })
    ));
}

#[test]
fn broken_weights_are_refused_naming_file_and_tensor() {
    let root = tempfile::tempdir().unwrap();
    let sae = random_sae(ArchKind::JUMPRELU, 4, 8, 0, 4);
    let cfg = {
        let p = root.path().join("template");
        save(&sae, &p).unwrap();
        cfg_of(&p)
    };
    let with = |name: &str, edit: &dyn Fn(&mut Vec<f32>)| {
        let mut t = tensors_of(&sae);
        for (n, d, _) in t.iter_mut() {
            if *n == name {
                edit(d);
            }
        }
        let p = root.path().join(name);
        write_dir(&p, &cfg, &t);
        load_err(&p)
    };
    let err = with("W_enc", &|d| d[..3].fill(f32::NAN));
    assert_has(
        &err,
        &[
            WEIGHTS_FILE,
            "W_enc holds 3 NaN values",
            "retrain it or load another",
        ],
    );
    let err = with("W_dec", &|d| d[1] = f32::INFINITY);
    assert_has(&err, &[WEIGHTS_FILE, "W_dec holds 1 infinite values"]);
    let err = with("threshold", &|d| d[0] = -1.0);
    assert_has(&err, &[WEIGHTS_FILE, "threshold holds 1 negative values"]);
    let err = with("threshold", &|d| d[0] = f32::NAN);
    assert_has(&err, &[WEIGHTS_FILE, "threshold holds 1 NaN values"]);

    // Half precision NaNs count too.
    let p = root.path().join("f16");
    std::fs::create_dir(&p).unwrap();
    let mut t = tensors_of(&sae);
    t[2].1[0] = f32::NAN;
    let halves: Vec<(String, Vec<u8>, Vec<usize>)> = t
        .iter()
        .map(|(n, d, s)| {
            let b = d
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect();
            (n.to_string(), b, s.clone())
        })
        .collect();
    let views: Vec<_> = halves
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                TensorView::new(Dtype::F16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        p.join(WEIGHTS_FILE),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    std::fs::write(p.join(CFG_FILE), cfg.to_string()).unwrap();
    assert_has(&load_err(&p), &["W_dec holds 1 NaN values"]);

    // A tensor the architecture does not use means cfg.json and the weights disagree.
    let p = root.path().join("extra");
    let mut t = tensors_of(&sae);
    t.push(("r_mag", vec![0.0; 8], vec![8]));
    write_dir(&p, &cfg, &t);
    assert_has(&load_err(&p), &[WEIGHTS_FILE, "\"r_mag\"", "architecture"]);

    // Truncated file.
    let p = root.path().join("W_enc");
    let w = std::fs::read(p.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(p.join(WEIGHTS_FILE), &w[..w.len() - 7]).unwrap();
    assert_has(&load_err(&p), &[WEIGHTS_FILE, "truncated"]);
}

#[test]
fn bad_sizes_and_k_in_cfg_are_refused_naming_the_key() {
    let root = tempfile::tempdir().unwrap();
    let sae = random_sae(ArchKind::TOPK, 4, 8, 3, 5);
    let good = root.path().join("good");
    save(&sae, &good).unwrap();
    let cfg = cfg_of(&good);
    let case = |name: &str, edit: &dyn Fn(&mut Value)| {
        let mut c = cfg.clone();
        edit(&mut c);
        let p = root.path().join(name);
        write_dir(&p, &c, &tensors_of(&sae));
        load_err(&p)
    };
    let err = case("d_sae0", &|c| c["d_sae"] = json!(0));
    assert_has(&err, &[CFG_FILE, "d_sae is 0", "fix 'd_sae'"]);
    let err = case("k_big", &|c| c["sae_core"]["k"] = json!(9));
    assert_has(&err, &[CFG_FILE, "k = 9 is more than d_sae = 8"]);
    let err = case("k0", &|c| c["sae_core"]["k"] = json!(0));
    assert_has(&err, &[CFG_FILE, "k is 0"]);
    let err = case("k_frac", &|c| c["sae_core"]["k"] = json!(2.5));
    assert_has(&err, &[CFG_FILE, "'sae_core.k' is 2.5"]);
    let err = case("no_k", &|c| {
        c.as_object_mut().unwrap().remove("sae_core");
        c.as_object_mut().unwrap().remove("k");
    });
    assert_has(&err, &[CFG_FILE, "no 'k'"]);
    // A k written as a float without fraction (SAELens BatchTopK style) is fine.
    let p = root.path().join("k_float");
    let mut c = cfg.clone();
    c["sae_core"]["k"] = json!(3.0);
    write_dir(&p, &c, &tensors_of(&sae));
    assert_eq!(load(&p).unwrap().k(), 3);

    let p = root.path().join("not_json");
    write_dir(&p, &cfg, &tensors_of(&sae));
    std::fs::write(p.join(CFG_FILE), "{\"d_in\": 4,").unwrap();
    assert_has(&load_err(&p), &[CFG_FILE, "not valid JSON"]);
    std::fs::write(p.join(CFG_FILE), "[4, 8]").unwrap();
    assert_has(&load_err(&p), &[CFG_FILE, "JSON object"]);
}

#[test]
fn math_keys_we_do_not_implement_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let sae = random_sae(ArchKind::RELU, 4, 8, 0, 6);
    let base = json!({"architecture": "standard", "d_in": 4, "d_sae": 8,
        "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.1.hook_resid_post"}});
    let case = |name: &str, key: &str, v: Value| {
        let mut c = base.clone();
        c[key] = v;
        let p = root.path().join(name);
        write_dir(&p, &c, &tensors_of(&sae));
        load(&p).map_err(|e| format!("{e:#}"))
    };
    let refused = [
        ("arch", "architecture", json!("crosscoder")),
        ("norm", "normalize_activations", json!("layer_norm")),
        (
            "norm2",
            "normalize_activations",
            json!("constant_norm_rescale"),
        ),
        ("reshape", "reshape_activations", json!("hook_z")),
        ("act", "activation_fn_str", json!("tanh-relu")),
        ("head", "hook_head_index", json!(3)),
        ("bdec", "apply_b_dec_to_input", json!("yes")),
        ("rescale", "rescale_acts_by_decoder_norm", json!(1)),
    ];
    for (name, key, v) in refused {
        let err = case(name, key, v.clone()).unwrap_err();
        let shown = v.as_str().map(String::from).unwrap_or(v.to_string());
        assert_has(&err, &[CFG_FILE, key, &shown]);
    }
    let err = case("arch", "architecture", json!("transcoder")).unwrap_err();
    assert_has(
        &err,
        &[
            "unknown architecture 'transcoder'",
            "gated, standard, topk, batchtopk, jumprelu",
            "relu",
        ],
    );
    let mut ours = base.clone();
    ours["sae_core"] = json!({"architecture": "mystery", "k": 0});
    write_dir(&root.path().join("ours"), &ours, &tensors_of(&sae));
    assert_has(
        &load_err(&root.path().join("ours")),
        &[
            "sae_core.architecture",
            "'mystery'",
            "gated, relu, topk, batchtopk, jumprelu",
        ],
    );
    ours["sae_core"] = json!({"architecture": "gated", "k": 0});
    write_dir(&root.path().join("ours"), &ours, &tensors_of(&sae));
    assert_has(
        &load_err(&root.path().join("ours")),
        &["'standard'", "'gated'"],
    );

    // Keys we implement keep working, and SAELens ignores rescaling outside its TopK family.
    for (name, key, v) in [
        ("b1", "apply_b_dec_to_input", json!(false)),
        (
            "n1",
            "normalize_activations",
            json!("expected_average_only_in"),
        ),
        ("n2", "normalize_activations", json!(false)),
        ("r1", "reshape_activations", json!("none")),
        ("a1", "activation_fn_str", json!("relu")),
        ("h1", "hook_head_index", Value::Null),
        ("s1", "rescale_acts_by_decoder_norm", json!(true)),
        ("j1", "jumprelu_bandwidth", json!(0.05)),
    ] {
        let got = case(name, key, v).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(got.w_enc, sae.w_enc, "{key}");
        assert_eq!(got.apply_b_dec_to_input, name != "b1");
    }
}

#[test]
fn saving_non_finite_weights_is_refused_and_keeps_the_old_dir() {
    let root = tempfile::tempdir().unwrap();
    let p = root.path().join("sae");
    let sae = random_sae(ArchKind::GATED, 4, 8, 0, 7);
    save(&sae, &p).unwrap();
    let before = std::fs::read(p.join(WEIGHTS_FILE)).unwrap();
    let mut diverged = sae.clone();
    diverged.w_enc[2] = f32::NAN;
    let err = format!("{:#}", save(&diverged, &p).unwrap_err());
    assert_has(
        &err,
        &[
            "sae",
            "W_enc holds 1 NaN values",
            "training diverged",
            "--lr",
        ],
    );
    assert_eq!(std::fs::read(p.join(WEIGHTS_FILE)).unwrap(), before);
    let fresh = root.path().join("fresh");
    assert!(save(&diverged, &fresh).is_err());
    assert!(!fresh.exists());
    let leftovers = std::fs::read_dir(root.path()).unwrap().count();
    assert_eq!(leftovers, 1);
    let mut k_big = random_sae(ArchKind::TOPK, 4, 8, 3, 7);
    k_big.settings.insert("k".into(), 9.into());
    assert!(format!("{:#}", save(&k_big, &fresh).unwrap_err()).contains("k = 9"));
}

/// SAELens 6 reads `metadata` only when `metadata.sae_lens_version` is >= 6.0; older files of
/// ours (no version) and SAELens' own pre-6 layout still load.
#[test]
fn cfg_carries_saelens_6_metadata_and_old_files_still_load() {
    let root = tempfile::tempdir().unwrap();
    let mut sae = random_sae(ArchKind::TOPK, 4, 8, 3, 8);
    sae.meta.model_name = "smollm2-135m".into();
    sae.meta.hook_name = "blocks.3.hook_resid_post".into();
    sae.meta.context_size = 128;
    sae.meta.dataset_path = "acts/x".into();
    let p = root.path().join("new");
    save(&sae, &p).unwrap();
    let cfg = cfg_of(&p);
    let version = cfg["metadata"]["sae_lens_version"].as_str().unwrap();
    let major: u32 = version.split('.').next().unwrap().parse().unwrap();
    assert!(major >= 6, "{version}");
    for (k, v) in [
        ("hook_name", json!("blocks.3.hook_resid_post")),
        ("model_name", json!("smollm2-135m")),
        ("context_size", json!(128)),
        ("dataset_path", json!("acts/x")),
        ("prepend_bos", json!(false)),
    ] {
        assert_eq!(cfg["metadata"][k], v, "{k}");
    }
    assert_eq!(cfg["k"], 3);
    assert_eq!(cfg["rescale_acts_by_decoder_norm"], false);
    assert_eq!(load(&p).unwrap(), sae);

    // What we wrote before: the same without the version fields.
    let mut old = cfg.clone();
    let m = old["metadata"].as_object_mut().unwrap();
    m.remove("sae_lens_version");
    m.remove("sae_lens_training_version");
    m.remove("hook_head_index");
    old.as_object_mut()
        .unwrap()
        .remove("rescale_acts_by_decoder_norm");
    let q = root.path().join("old");
    write_dir(&q, &old, &tensors_of(&sae));
    assert_eq!(load(&q).unwrap(), sae);
}

/// SAELens TopK with `rescale_acts_by_decoder_norm`: hand-computed SAELens math
/// (pre * ||W_dec_j||, top k, relu; decode (f / ||W_dec_j||) @ W_dec + b_dec) against our
/// encode / decode of the loaded, folded SAE.
#[test]
fn topk_decoder_norm_rescaling_is_folded_exactly() {
    let (d_in, d_sae, k, n) = (5, 12, 3, 40);
    let mut sae = random_sae(ArchKind::TOPK, d_in, d_sae, k, 9);
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    // Decoder rows far from unit norm, as in a SAELens training checkpoint.
    sae.w_dec = randn(&mut rng, d_sae * d_in)
        .into_iter()
        .enumerate()
        .map(|(i, v)| v * (0.2 + (i / d_in) as f32 * 0.3))
        .collect();
    sae.w_dec[7 * d_in..8 * d_in].fill(0.0);
    let x = randn(&mut rng, n * d_in);

    let norms: Vec<f64> = sae
        .w_dec
        .chunks(d_in)
        .map(|r| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
        .collect();
    // SAELens' hidden_pre before rescaling: (x - b_dec) @ W_enc + b_enc.
    let pre = |r: usize, j: usize| -> f64 {
        (0..d_in)
            .map(|i| (x[r * d_in + i] - sae.b_dec[i]) as f64 * sae.w_enc[i * d_sae + j] as f64)
            .sum::<f64>()
            + sae.params[0][j] as f64
    };
    let mut want_codes = vec![vec![0.0f64; d_sae]; n];
    let mut want_recon = vec![vec![0.0f64; d_in]; n];
    for r in 0..n {
        let mut h: Vec<(f64, usize)> = (0..d_sae).map(|j| (pre(r, j) * norms[j], j)).collect();
        h.sort_by(|a, b| b.0.total_cmp(&a.0));
        for &(v, j) in &h[..k] {
            want_codes[r][j] = v.max(0.0);
        }
        for (i, out) in want_recon[r].iter_mut().enumerate() {
            *out = sae.b_dec[i] as f64
                + (0..d_sae)
                    .map(|j| {
                        want_codes[r][j] / norms[j].max(1e-30) * sae.w_dec[j * d_in + i] as f64
                    })
                    .sum::<f64>();
        }
    }

    let root = tempfile::tempdir().unwrap();
    let write = |name: &str, rescale: bool| {
        let cfg = json!({"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k,
            "rescale_acts_by_decoder_norm": rescale, "apply_b_dec_to_input": true,
            "normalize_activations": "none", "metadata": {"sae_lens_version": "6.5.0"}});
        let p = root.path().join(name);
        write_dir(&p, &cfg, &tensors_of(&sae));
        load(&p).unwrap()
    };
    let got = write("rescaled", true);
    let plain = write("plain", false).encode(&x, n);
    let code = got.encode(&x, n);
    let recon = got.decode(&code);
    let mut differs = false;
    for r in 0..n {
        let (idx, val) = code.row(r);
        let mut dense = vec![0.0f64; d_sae];
        for (&j, &v) in idx.iter().zip(val) {
            dense[j as usize] = v as f64;
        }
        for j in 0..d_sae {
            let w = want_codes[r][j];
            assert!(
                (dense[j] - w).abs() <= 1e-4 * w.abs().max(1.0),
                "row {r} latent {j}: {} vs {w}",
                dense[j]
            );
        }
        for i in 0..d_in {
            let w = want_recon[r][i];
            let g = recon[r * d_in + i] as f64;
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                "row {r} dim {i}: {g} vs {w}"
            );
        }
        // Without the fold the top k would differ on some rows.
        differs |= plain.row(r).0 != idx;
    }
    assert!(
        differs,
        "the rescaling changed no selection; the test proves nothing"
    );

    // A SAELens BatchTopK training checkpoint: the same rescaling, one scalar threshold.
    let mut t = tensors_of(&sae);
    t.push(("topk_threshold", vec![0.4], vec![]));
    let cfg = json!({"architecture": "batchtopk", "d_in": d_in, "d_sae": d_sae, "k": 3.0,
        "rescale_acts_by_decoder_norm": true, "metadata": {"sae_lens_version": "6.5.0"}});
    let p = root.path().join("btk");
    write_dir(&p, &cfg, &t);
    let btk = load(&p).unwrap();
    assert_eq!(btk.param("threshold"), vec![0.4; d_sae]);
    let code = btk.encode(&x, n);
    for r in 0..n {
        let (idx, val) = code.row(r);
        let want: Vec<usize> = (0..d_sae).filter(|&j| pre(r, j) * norms[j] > 0.4).collect();
        assert_eq!(
            idx.iter().map(|&j| j as usize).collect::<Vec<_>>(),
            want,
            "row {r}"
        );
        assert!(val.iter().all(|v| *v > 0.4));
    }
}

/// Pre-6.0 SAELens `finetuning_scaling_factor`: codes are scaled per latent before decoding.
#[test]
fn finetuning_scaling_factor_is_folded_into_the_decoder() {
    let (d_in, d_sae) = (4, 6);
    let sae = random_sae(ArchKind::RELU, d_in, d_sae, 0, 11);
    let scale: Vec<f32> = (0..d_sae).map(|j| 0.5 + j as f32 * 0.25).collect();
    let mut t = tensors_of(&sae);
    t.push(("scaling_factor", scale.clone(), vec![d_sae]));
    let root = tempfile::tempdir().unwrap();
    let cfg = json!({"d_in": d_in, "d_sae": d_sae, "hook_name": "blocks.0.hook_resid_pre",
        "finetuning_scaling_factor": true});
    let p = root.path().join("ft");
    write_dir(&p, &cfg, &t);
    let got = load(&p).unwrap();
    let x = randn(&mut ChaCha8Rng::seed_from_u64(12), 3 * d_in);
    let code = sae.encode(&x, 3);
    assert_eq!(got.encode(&x, 3), code);
    let mut scaled = code.clone();
    for (v, &j) in scaled.val.iter_mut().zip(&code.idx) {
        *v *= scale[j as usize];
    }
    let (a, b) = (got.decode(&code), sae.decode(&scaled));
    for (a, b) in a.iter().zip(&b) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // The same tensor without the flag is refused, as SAELens refuses it; all ones is a no-op.
    let cfg = json!({"d_in": d_in, "d_sae": d_sae});
    write_dir(&p, &cfg, &t);
    assert_has(
        &load_err(&p),
        &[WEIGHTS_FILE, "scaling_factor", "finetuning_scaling_factor"],
    );
    t.last_mut().unwrap().1 = vec![1.0; d_sae];
    write_dir(&p, &cfg, &t);
    assert_eq!(load(&p).unwrap().w_dec, sae.w_dec);
}

/// A SAELens Matryoshka BatchTopK training checkpoint: prefixes from `matryoshka_widths`, one
/// scalar threshold; bad prefixes are refused before the weights are read.
#[test]
fn saelens_matryoshka_checkpoint_loads() {
    let (d_in, d_sae) = (4, 8);
    let sae = random_sae(ArchKind::BATCHTOPK, d_in, d_sae, 2, 13);
    let mut t: Vec<_> = tensors_of(&sae)
        .into_iter()
        .filter(|(n, _, _)| *n != "threshold")
        .collect();
    t.push(("topk_threshold", vec![0.3], vec![]));
    let root = tempfile::tempdir().unwrap();
    let p = root.path().join("m");
    let cfg = json!({"architecture": "matryoshka_batchtopk", "d_in": d_in, "d_sae": d_sae,
        "k": 2.0, "matryoshka_widths": [2, 4, 8]});
    write_dir(&p, &cfg, &t);
    let m = load(&p).unwrap();
    assert_eq!(m.arch, ArchKind::MATRYOSHKA);
    assert_eq!((m.k(), m.param("threshold")), (2, &vec![0.3; d_sae][..]));
    assert_eq!(m.settings["widths"], json!([2, 4, 8]));
    for (widths, needle) in [
        (json!([4, 2, 8]), "increasing"),
        (json!([2, 4]), "must end at d_sae = 8"),
    ] {
        let mut bad = cfg.clone();
        bad["matryoshka_widths"] = widths;
        write_dir(&p, &bad, &t);
        assert_has(&load_err(&p), &[CFG_FILE, needle, "fix 'widths'"]);
    }
}

/// An mp SAE's encoder is its dictionary: a file where they differ, or that skips the b_dec
/// centring its pursuit needs, is refused.
#[test]
fn mp_files_keep_the_encoder_tied() {
    let (d_in, d_sae) = (4, 8);
    let sae = random_sae(ArchKind::MP, d_in, d_sae, 3, 14);
    let root = tempfile::tempdir().unwrap();
    let p = root.path().join("mp");
    crate::saelens::save(&sae, &p).unwrap();
    assert_eq!(load(&p).unwrap(), sae);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(p.join(CFG_FILE)).unwrap()).unwrap();
    let mut t = tensors_of(&sae);
    t.iter_mut().find(|(n, _, _)| *n == "W_enc").unwrap().1[5] += 0.5;
    write_dir(&p, &cfg, &t);
    assert_has(
        &load_err(&p),
        &[
            WEIGHTS_FILE,
            "W_enc differs from W_dec transposed in 1 places",
        ],
    );
    let mut no_centring = cfg.clone();
    no_centring["apply_b_dec_to_input"] = false.into();
    write_dir(&p, &no_centring, &tensors_of(&sae));
    assert_has(&load_err(&p), &[CFG_FILE, "apply_b_dec_to_input is false"]);
}
