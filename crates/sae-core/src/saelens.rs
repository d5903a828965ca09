//! SAELens on-disk layout: `cfg.json` + `sae_weights.safetensors`.
//!
//! Tensors (f32 on save; f32/f16/bf16 on load):
//! * standard (our `relu`): `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`,
//!   `b_dec [d_in]`;
//! * gated: `W_enc`, `b_gate`, `r_mag`, `b_mag`, `W_dec`, `b_dec`;
//! * jumprelu: standard + `threshold [d_sae]` (also accepted: `log_threshold`);
//! * topk: standard tensors, `"architecture": "topk"` and `"k"` in cfg.json.
//!
//! BatchTopK is saved as SAELens saves it for inference: a `jumprelu` SAE whose threshold is
//! the estimated global threshold; our own `sae_core` block in cfg.json remembers it was
//! BatchTopK with its k. cfg.json follows SAELens v6 (`metadata{...}`); older files with
//! `hook_name` etc. at the top level and `activation_fn_str: "topk"` also load.

use crate::arch::ArchKind;
use crate::sae::{Sae, SaeMeta};
use anyhow::{bail, Context};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

pub const CFG_FILE: &str = "cfg.json";
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";

/// The SAELens `architecture` string used on disk.
fn saelens_arch(a: ArchKind) -> &'static str {
    match a {
        ArchKind::Relu => "standard",
        ArchKind::Gated => "gated",
        ArchKind::TopK => "topk",
        ArchKind::JumpRelu | ArchKind::BatchTopK => "jumprelu",
    }
}

fn cfg_json(sae: &Sae) -> Value {
    let mut cfg = json!({
        "architecture": saelens_arch(sae.arch),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": sae.meta.model_name,
            "hook_name": sae.meta.hook_name,
            "context_size": sae.meta.context_size,
            "prepend_bos": sae.meta.prepend_bos,
            "dataset_path": sae.meta.dataset_path,
        },
        "sae_core": { "architecture": sae.arch.as_str(), "k": sae.k },
    });
    if sae.arch == ArchKind::TopK {
        cfg["k"] = json!(sae.k);
    }
    cfg
}

/// `(name, data, shape)` of every tensor this SAE saves.
fn tensors_of(sae: &Sae) -> Vec<(&'static str, &[f32], Vec<usize>)> {
    let (d_in, d_sae) = (sae.d_in, sae.d_sae);
    let enc_bias = if sae.arch == ArchKind::Gated {
        "b_gate"
    } else {
        "b_enc"
    };
    let mut t = vec![
        ("W_enc", &sae.w_enc[..], vec![d_in, d_sae]),
        (enc_bias, &sae.b_enc[..], vec![d_sae]),
        ("W_dec", &sae.w_dec[..], vec![d_sae, d_in]),
        ("b_dec", &sae.b_dec[..], vec![d_in]),
    ];
    match sae.arch {
        ArchKind::Gated => {
            t.push(("r_mag", &sae.r_mag[..], vec![d_sae]));
            t.push(("b_mag", &sae.b_mag[..], vec![d_sae]));
        }
        ArchKind::JumpRelu | ArchKind::BatchTopK => {
            t.push(("threshold", &sae.threshold[..], vec![d_sae]))
        }
        _ => {}
    }
    t
}

/// Write `dir/cfg.json` and `dir/sae_weights.safetensors` atomically (temp dir, then rename).
/// An existing `dir` is moved aside first and only deleted once the new one is in place.
pub fn save(sae: &Sae, dir: &Path) -> anyhow::Result<()> {
    check_shapes(sae).with_context(|| format!("refusing to save {}", dir.display()))?;
    let tensors = tensors_of(sae);
    let views = tensors
        .iter()
        .map(|(name, data, shape)| {
            Ok((
                name.to_string(),
                TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)?;
    let cfg = serde_json::to_string_pretty(&cfg_json(sae))?;

    replace_dir_atomic(dir, |tmp| {
        sae_output::atomic::write_synced(&tmp.join(WEIGHTS_FILE), &bytes)?;
        Ok(sae_output::atomic::write_synced(
            &tmp.join(CFG_FILE),
            cfg.as_bytes(),
        )?)
    })
    .with_context(|| format!("writing SAE to {}", dir.display()))
}

/// Replace directory `dir` as a whole (see [`sae_output::replace_dir`]).
pub fn replace_dir_atomic(
    dir: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    sae_output::replace_dir(dir, write)
}

/// Write a file atomically: a temporary sibling, then rename over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(sae_output::write_atomic(path, bytes)?)
}

fn check_shapes(sae: &Sae) -> anyhow::Result<()> {
    let (d_in, d_sae) = (sae.d_in, sae.d_sae);
    for (name, data, shape) in tensors_of(sae) {
        let want: usize = shape.iter().product();
        if data.len() != want {
            bail!(
                "tensor {name} has {} values, expected {want} ({shape:?})",
                data.len()
            );
        }
    }
    if matches!(sae.arch, ArchKind::TopK | ArchKind::BatchTopK) && sae.k == 0 {
        bail!("{} SAE with k = 0", sae.arch);
    }
    let _ = (d_in, d_sae);
    Ok(())
}

/// Read an SAE in SAELens layout (ours or SAELens'), checking cfg against the weights.
pub fn load(dir: &Path) -> anyhow::Result<Sae> {
    let cfg_path = dir.join(CFG_FILE);
    let w_path = dir.join(WEIGHTS_FILE);
    let cfg_text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "reading {} (an SAE directory needs cfg.json and {WEIGHTS_FILE})",
            cfg_path.display()
        )
    })?;
    let cfg: Value = serde_json::from_str(&cfg_text)
        .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    let bad = |what: String| anyhow::anyhow!("{}: {what}", cfg_path.display());
    let get_usize = |k: &str| -> anyhow::Result<usize> {
        cfg.get(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("missing or non-integer '{k}'")))
    };
    let d_in = get_usize("d_in")?;
    let d_sae = get_usize("d_sae")?;
    let ours = cfg.get("sae_core");
    let saelens_arch = cfg
        .get("architecture")
        .and_then(Value::as_str)
        .unwrap_or("standard");
    let act_fn = cfg.get("activation_fn_str").and_then(Value::as_str);
    let mut k = cfg
        .get("k")
        .and_then(Value::as_u64)
        .or_else(|| {
            cfg.get("activation_fn_kwargs")
                .and_then(|kw| kw.get("k"))
                .and_then(Value::as_u64)
        })
        .unwrap_or(0) as usize;
    let arch = if let Some(a) = ours
        .and_then(|o| o.get("architecture"))
        .and_then(Value::as_str)
    {
        if let Some(kk) = ours.and_then(|o| o.get("k")).and_then(Value::as_u64) {
            k = kk as usize;
        }
        a.parse::<ArchKind>().map_err(|e| bad(e.to_string()))?
    } else {
        match (saelens_arch, act_fn) {
            ("standard", Some("topk")) => ArchKind::TopK,
            ("standard", _) => ArchKind::Relu,
            ("gated", _) => ArchKind::Gated,
            ("jumprelu", _) => ArchKind::JumpRelu,
            ("topk", _) => ArchKind::TopK,
            ("batchtopk", _) => ArchKind::BatchTopK,
            (other, _) => {
                return Err(bad(format!(
                    "unsupported SAELens architecture '{other}' (supported: standard, gated, jumprelu, topk)"
                )))
            }
        }
    };
    if matches!(arch, ArchKind::TopK | ArchKind::BatchTopK) && k == 0 {
        return Err(bad(format!("a {arch} SAE needs a positive 'k'")));
    }
    // SAELens folds its dataset-wide scaling factor into the weights when it saves
    // (`expected_average_only_in`); per-token normalisations would need run-time work.
    if let Some(norm) = cfg.get("normalize_activations").and_then(Value::as_str) {
        if !matches!(norm, "none" | "" | "expected_average_only_in") {
            return Err(bad(format!(
                "normalize_activations = '{norm}' (a per-token normalisation) is not supported; \
                 only 'none' and 'expected_average_only_in' SAEs can be loaded"
            )));
        }
    }
    let apply_b_dec_to_input = cfg
        .get("apply_b_dec_to_input")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let meta_src = cfg.get("metadata").unwrap_or(&cfg);
    let field = |k: &str| meta_src.get(k).or_else(|| cfg.get(k));
    let meta = SaeMeta {
        model_name: field("model_name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
        hook_name: field("hook_name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
        context_size: field("context_size").and_then(Value::as_u64).unwrap_or(0) as usize,
        prepend_bos: field("prepend_bos")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        dataset_path: field("dataset_path")
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
    };

    let bytes = std::fs::read(&w_path).with_context(|| format!("reading {}", w_path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", w_path.display()))?;
    let names: HashMap<String, ()> = st
        .names()
        .into_iter()
        .map(|n| (n.to_string(), ()))
        .collect();
    let read = |name: &str, shape: &[usize]| -> anyhow::Result<Vec<f32>> {
        let t = st.tensor(name).map_err(|_| {
            anyhow::anyhow!(
                "{}: no tensor '{name}', which a {arch} SAE ({}) needs; the file has {:?}",
                w_path.display(),
                cfg_path.display(),
                sorted(&names)
            )
        })?;
        if t.shape() != shape {
            bail!(
                "{}: tensor '{name}' has shape {:?} but {} says d_in = {d_in}, d_sae = {d_sae} (expected {shape:?})",
                w_path.display(),
                t.shape(),
                cfg_path.display()
            );
        }
        to_f32(t.dtype(), t.data())
            .with_context(|| format!("{}: tensor '{name}'", w_path.display()))
    };
    let enc_bias = if arch == ArchKind::Gated {
        "b_gate"
    } else {
        "b_enc"
    };
    let mut sae = Sae {
        arch,
        d_in,
        d_sae,
        w_enc: read("W_enc", &[d_in, d_sae])?,
        b_enc: read(enc_bias, &[d_sae])?,
        w_dec: read("W_dec", &[d_sae, d_in])?,
        b_dec: read("b_dec", &[d_in])?,
        r_mag: Vec::new(),
        b_mag: Vec::new(),
        threshold: Vec::new(),
        k: if matches!(arch, ArchKind::TopK | ArchKind::BatchTopK) {
            k
        } else {
            0
        },
        apply_b_dec_to_input,
        meta,
    };
    match arch {
        ArchKind::Gated => {
            sae.r_mag = read("r_mag", &[d_sae])?;
            sae.b_mag = read("b_mag", &[d_sae])?;
        }
        ArchKind::JumpRelu | ArchKind::BatchTopK => {
            sae.threshold = if names.contains_key("threshold") {
                read("threshold", &[d_sae])?
            } else {
                read("log_threshold", &[d_sae])?
                    .into_iter()
                    .map(f32::exp)
                    .collect()
            };
        }
        _ => {}
    }
    Ok(sae)
}

fn sorted(names: &HashMap<String, ()>) -> Vec<&str> {
    let mut v: Vec<&str> = names.keys().map(|s| s.as_str()).collect();
    v.sort();
    v
}

/// Little-endian f32/f16/bf16/f64 bytes to f32.
pub fn to_f32(dtype: Dtype, data: &[u8]) -> anyhow::Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => bail!("unsupported dtype {other:?} (expected float32, float16 or bfloat16)"),
    })
}
