//! SAELens files: round trips, foreign files, bad input.

use super::random_sae;
use crate::saelens::{load, save, CFG_FILE, WEIGHTS_FILE};
use crate::{ArchKind, Sae};

#[test]
fn round_trip_every_arch() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ArchKind::all() {
        let mut sae = random_sae(arch, 6, 10, 3, 1);
        sae.meta.model_name = "pythia-70m".into();
        sae.meta.hook_name = "blocks.3.hook_resid_post".into();
        sae.meta.context_size = 128;
        let p = dir.path().join(arch.as_str());
        save(&sae, &p).unwrap();
        assert_eq!(load(&p).unwrap(), sae, "{arch}");
    }
    // Tensor names as SAELens expects them.
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("gated").join(CFG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["architecture"], "gated");
    assert_eq!(cfg["metadata"]["hook_name"], "blocks.3.hook_resid_post");
    let bytes = std::fs::read(dir.path().join("gated").join(WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]
    );
    assert_eq!(st.tensor("W_enc").unwrap().shape(), [6, 10]);
    assert_eq!(st.tensor("W_dec").unwrap().shape(), [10, 6]);
}

#[test]
fn replacing_a_directory_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sae");
    save(&random_sae(ArchKind::RELU, 4, 8, 0, 1), &p).unwrap();
    let second = random_sae(ArchKind::TOPK, 4, 8, 2, 2);
    save(&second, &p).unwrap();
    assert_eq!(load(&p).unwrap(), second);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["sae"]);
    // A failing save (wrong shapes) leaves the previous SAE in place.
    let mut bad = second.clone();
    bad.params[0].pop();
    assert!(save(&bad, &p).is_err());
    assert_eq!(load(&p).unwrap(), second);
}

#[test]
fn mismatched_cfg_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sae");
    save(&random_sae(ArchKind::GATED, 4, 8, 0, 1), &p).unwrap();
    let cfg_path = p.join(CFG_FILE);
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, text.replace("\"d_sae\": 8", "\"d_sae\": 9")).unwrap();
    let err = format!("{:#}", load(&p).unwrap_err());
    assert!(
        err.contains(WEIGHTS_FILE) && err.contains(CFG_FILE) && err.contains("W_enc"),
        "{err}"
    );

    // Architecture says jumprelu but there is no threshold.
    std::fs::write(&cfg_path, text.replace("\"gated\"", "\"jumprelu\"")).unwrap();
    let err = format!("{:#}", load(&p).unwrap_err());
    assert!(err.contains("b_enc") || err.contains("threshold"), "{err}");

    // Truncated weights.
    std::fs::write(&cfg_path, &text).unwrap();
    let w = p.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", load(&p).unwrap_err());
    assert!(err.contains(WEIGHTS_FILE), "{err}");

    // Missing directory.
    let err = format!("{:#}", load(&dir.path().join("nope")).unwrap_err());
    assert!(err.contains("nope") && err.contains(CFG_FILE), "{err}");
}

/// A file as older SAELens versions wrote it: hook_name at the top level, f16 / bf16 weights,
/// `activation_fn_str: "topk"` for TopK.
#[test]
fn loads_older_saelens_files_in_half_precision() {
    use safetensors::{tensor::TensorView, Dtype};
    let dir = tempfile::tempdir().unwrap();
    let (d_in, d_sae) = (4, 6);
    let sae = random_sae(ArchKind::TOPK, d_in, d_sae, 2, 3);
    for (dtype, tag) in [(Dtype::F16, "float16"), (Dtype::BF16, "bfloat16")] {
        let enc = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| match dtype {
                    Dtype::F16 => half::f16::from_f32(x).to_le_bytes(),
                    _ => half::bf16::from_f32(x).to_le_bytes(),
                })
                .collect()
        };
        let data = [
            ("W_enc", enc(&sae.w_enc), vec![d_in, d_sae]),
            ("b_enc", enc(sae.param("b_enc")), vec![d_sae]),
            ("W_dec", enc(&sae.w_dec), vec![d_sae, d_in]),
            ("b_dec", enc(&sae.b_dec), vec![d_in]),
        ];
        let views: Vec<_> = data
            .iter()
            .map(|(n, b, s)| (n.to_string(), TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        let p = dir.path().join(tag);
        std::fs::create_dir(&p).unwrap();
        std::fs::write(
            p.join(WEIGHTS_FILE),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        let cfg = serde_json::json!({
            "architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": tag,
            "model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8,
            "context_size": 128, "prepend_bos": true, "dataset_path": "x",
            "apply_b_dec_to_input": true, "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 2}, "normalize_activations": "none"
        });
        std::fs::write(p.join(CFG_FILE), cfg.to_string()).unwrap();
        let got: Sae = load(&p).unwrap();
        assert_eq!(got.arch, ArchKind::TOPK);
        assert_eq!(got.k(), 2);
        assert_eq!(got.meta.hook_name, "blocks.8.hook_resid_pre");
        assert_eq!(got.meta.context_size, 128);
        let tol = if dtype == Dtype::F16 { 2e-3 } else { 1e-2 };
        for (a, b) in got.w_enc.iter().zip(&sae.w_enc) {
            assert!((a - b).abs() <= tol * b.abs().max(1.0), "{tag}: {a} vs {b}");
        }
    }
}

#[test]
fn exported_gated_saves_as_jumprelu() {
    let dir = tempfile::tempdir().unwrap();
    let jr = random_sae(ArchKind::GATED, 4, 8, 0, 9)
        .gated_to_jumprelu()
        .unwrap();
    save(&jr, &dir.path().join("jr")).unwrap();
    let cfg = std::fs::read_to_string(dir.path().join("jr").join(CFG_FILE)).unwrap();
    assert!(cfg.contains("\"architecture\": \"jumprelu\""));
    assert_eq!(load(&dir.path().join("jr")).unwrap(), jr);
}
