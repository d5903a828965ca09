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

use crate::arch::{ArchKind, Settings, Stored};
use crate::sae::{Invalid, Sae, SaeMeta};
use anyhow::{bail, Context};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

pub const CFG_FILE: &str = "cfg.json";
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";

/// The SAELens cfg layout written here is SAELens 6.0's (`SAEConfig.to_dict` in
/// sae_lens/saes/sae.py, unchanged through 6.18). SAELens 6 takes a cfg without
/// `metadata.sae_lens_version >= 6.0.0` for a pre-6.0 file and keeps only top-level metadata
/// keys, which would drop the nested hook, model, context size and dataset.
const SAELENS_LAYOUT_VERSION: &str = "6.0.0";

/// The cfg.json that [`save`] writes for `sae` (SAELens keys plus our `sae_core` block).
pub fn cfg_json(sae: &Sae) -> Value {
    let mut cfg = json!({
        "architecture": sae.arch.family().saelens_name(),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "sae_lens_training_version": SAELENS_LAYOUT_VERSION,
            "model_name": sae.meta.model_name,
            "hook_name": sae.meta.hook_name,
            "hook_head_index": null,
            "context_size": sae.meta.context_size,
            "prepend_bos": sae.meta.prepend_bos,
            "dataset_path": sae.meta.dataset_path,
        },
    });
    let mut ours = serde_json::Map::new();
    ours.insert("architecture".into(), sae.arch.as_str().into());
    for (key, v) in &sae.settings {
        ours.insert(key.clone(), v.clone());
    }
    cfg["sae_core"] = Value::Object(ours);
    if let Some(map) = cfg.as_object_mut() {
        sae.arch.family().saelens_cfg(sae, map);
    }
    cfg
}

/// Write `dir/cfg.json` and `dir/sae_weights.safetensors` atomically (temp dir, then rename).
/// An existing `dir` is moved aside first and only deleted once the new one is in place.
/// An SAE that fails [`Sae::validate`] is refused before anything is written.
pub fn save(sae: &Sae, dir: &Path) -> anyhow::Result<()> {
    match sae.validate() {
        Ok(()) => {}
        Err(
            e @ Invalid::Tensor {
                non_finite: true, ..
            },
        ) => bail!(
            "refusing to save {}: {e}: training diverged; nothing was written there. Train \
             again with a lower --lr, or from an earlier checkpoint",
            dir.display()
        ),
        Err(e) => bail!("refusing to save {}: {e}", dir.display()),
    }
    let views = sae
        .tensors()
        .into_iter()
        .map(|(name, data, shape)| {
            Ok((
                name.to_string(),
                TensorView::new(Dtype::F32, shape, bytemuck::cast_slice(data))?,
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

/// SAELens `architecture` values this loader reads, comma-separated (`batchtopk` is a
/// SAELens training checkpoint; SAELens saves BatchTopK for inference as `jumprelu`).
fn saelens_archs() -> String {
    let mut names: Vec<&str> = Vec::new();
    for a in ArchKind::all() {
        for n in a.family().saelens_reads() {
            if !names.contains(n) {
                names.push(n);
            }
        }
    }
    names.join(", ")
}

/// What cfg.json says about the math, once every key that changes it has been checked.
#[derive(Debug, PartialEq)]
struct CfgSpec {
    arch: ArchKind,
    /// The family's settings found in cfg.json (`k` also from SAELens' own keys).
    settings: Settings,
    apply_b_dec_to_input: bool,
    /// SAELens TopK `rescale_acts_by_decoder_norm`: folded into the weights on load.
    rescale_by_decoder_norm: bool,
    /// Pre-6.0 SAELens `finetuning_scaling_factor`: a per-latent scale on the codes before
    /// decoding, folded into W_dec on load.
    finetuning_scaling_factor: bool,
    meta: SaeMeta,
}

fn is_null(v: Option<&Value>) -> bool {
    v.is_none_or(Value::is_null)
}

fn bool_key(cfg: &Value, key: &str, default: bool) -> Result<bool, String> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("'{key}' is {v}, expected true or false")),
    }
}

/// A k written as an integer, or as a float with no fraction (SAELens' BatchTopK k is a float).
fn k_value(key: &str, v: &Value) -> Result<usize, String> {
    v.as_u64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < 1e15)
                .map(|f| f as u64)
        })
        .map(|k| k as usize)
        .ok_or_else(|| format!("'{key}' is {v}, expected a whole number of active latents"))
}

/// Reads every cfg.json key that changes what the SAE computes; refuses values we do not
/// implement. Keys that only matter for training (l1_coefficient, jumprelu_bandwidth,
/// aux_loss_coefficient, ...) or for where the file came from are not read here.
fn parse_cfg(cfg: &Value) -> Result<CfgSpec, String> {
    let ours = cfg.get("sae_core");
    let saelens = match cfg.get("architecture") {
        None | Some(Value::Null) => "standard",
        Some(Value::String(a)) => a.as_str(),
        Some(v) => {
            return Err(format!(
                "'architecture' is {v}, expected one of {}",
                saelens_archs()
            ))
        }
    };
    let act_fn_key = ["activation_fn_str", "activation_fn"]
        .into_iter()
        .find(|k| !is_null(cfg.get(*k)));
    let act_fn = match act_fn_key {
        None => None,
        Some(key) => match cfg[key].as_str() {
            Some(f @ ("relu" | "topk")) => Some(f),
            _ => {
                return Err(format!(
                    "'{key}' = {} is not supported; only relu and topk activations load",
                    cfg[key]
                ))
            }
        },
    };
    // Old SAELens files say TopK with a topk activation on a standard SAE.
    let saelens = match (saelens, act_fn) {
        ("standard", Some("topk")) => "topk",
        ("topk", _) | (_, None | Some("relu")) => saelens,
        (other, _) => {
            return Err(format!(
                "'architecture' = '{other}' with a topk activation is not an SAE we know; \
                 expected architecture 'topk'"
            ))
        }
    };
    let from_saelens = ArchKind::all().find(|a| a.family().saelens_reads().contains(&saelens));
    let arch = match ours.and_then(|o| o.get("architecture")) {
        None => from_saelens.ok_or_else(|| {
            format!(
                "unknown architecture '{saelens}'; the architectures this loader knows are \
                 {} (SAELens names) and {} (ours, under sae_core)",
                saelens_archs(),
                ArchKind::names()
            )
        })?,
        Some(a) => {
            let a = a
                .as_str()
                .ok_or_else(|| format!("'sae_core.architecture' is {a}, expected a string"))?;
            let a = a
                .parse::<ArchKind>()
                .map_err(|e| format!("sae_core.architecture: {e}"))?;
            // Our files may save a family as the SAELens one it runs as at inference; anything
            // else disagreeing means one of the two was edited, and SAELens would run the
            // other architecture.
            let f = a.family();
            if f.saelens_name() != saelens && !f.saelens_reads().contains(&saelens) {
                return Err(format!(
                    "'architecture' is '{saelens}' but sae_core.architecture is '{a}' (saved as \
                     '{}'); set one to match the other",
                    f.saelens_name()
                ));
            }
            a
        }
    };
    let family = arch.family();
    let mut settings = Settings::new();
    for &key in family.setting_keys() {
        if let Some(v) = ours.and_then(|o| o.get(key)).filter(|v| !v.is_null()) {
            settings.insert(key.to_string(), v.clone());
        }
    }
    family.settings_from_saelens(cfg, &mut settings);
    if family.setting_keys().contains(&"k") {
        let k_src = [
            ours.and_then(|o| o.get("k")).map(|v| ("sae_core.k", v)),
            cfg.get("k").map(|v| ("k", v)),
            cfg.get("activation_fn_kwargs")
                .and_then(|kw| kw.get("k"))
                .map(|v| ("activation_fn_kwargs.k", v)),
        ];
        if let Some((key, v)) = k_src.into_iter().flatten().find(|(_, v)| !v.is_null()) {
            settings.insert("k".into(), json!(k_value(key, v)?));
        }
    }
    // SAELens itself runs `expected_average_only_in` as the identity at inference: its
    // dataset-wide scale is folded into the weights when it saves. Pre-6.0 files wrote a
    // bool for the same thing. The per-token normalisations would need run-time work.
    match cfg.get("normalize_activations") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(Value::String(n))
            if matches!(n.as_str(), "none" | "" | "expected_average_only_in") => {}
        Some(v) => {
            return Err(format!(
                "'normalize_activations' = {v} (a per-token normalisation) is not supported; \
                 only 'none' and 'expected_average_only_in' SAEs can be loaded"
            ))
        }
    }
    match cfg.get("reshape_activations") {
        None | Some(Value::Null) => {}
        Some(Value::String(r)) if r == "none" => {}
        Some(v) => {
            return Err(format!(
                "'reshape_activations' = {v} is not supported; only SAEs on a flat hook \
                 ('none') can be loaded"
            ))
        }
    }
    let apply_b_dec_to_input = bool_key(cfg, "apply_b_dec_to_input", true)?;
    // SAELens reads the flag only for its TopK family.
    let rescale_by_decoder_norm = bool_key(cfg, "rescale_acts_by_decoder_norm", false)?
        && family.reads_decoder_norm_rescale();
    let finetuning_scaling_factor = bool_key(cfg, "finetuning_scaling_factor", false)?;

    let meta_src = cfg.get("metadata").filter(|m| m.is_object()).unwrap_or(cfg);
    let field = |k: &str| {
        meta_src
            .get(k)
            .filter(|v| !v.is_null())
            .or_else(|| cfg.get(k).filter(|v| !v.is_null()))
    };
    for key in ["hook_head_index", "hook_point_head_index"] {
        if let Some(v) = field(key) {
            return Err(format!(
                "'{key}' = {v}: an SAE on one attention head is not supported; only SAEs on a \
                 whole hook can be loaded"
            ));
        }
    }
    let text = |k: &str| field(k).and_then(Value::as_str).unwrap_or("").to_string();
    let meta = SaeMeta {
        model_name: text("model_name"),
        hook_name: field("hook_name")
            .or_else(|| field("hook_point"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
        context_size: field("context_size").and_then(Value::as_u64).unwrap_or(0) as usize,
        prepend_bos: field("prepend_bos")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        dataset_path: text("dataset_path"),
    };
    Ok(CfgSpec {
        arch,
        settings,
        apply_b_dec_to_input,
        rescale_by_decoder_norm,
        finetuning_scaling_factor,
        meta,
    })
}

/// Read an SAE in SAELens layout (ours or SAELens'), checking cfg against the weights and the
/// result with [`Sae::validate`]. Every error names the file and what is wrong with it.
pub fn load(dir: &Path) -> anyhow::Result<Sae> {
    let cfg_path = dir.join(CFG_FILE);
    let w_path = dir.join(WEIGHTS_FILE);
    let cfg_text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "reading {} (an SAE directory needs cfg.json and {WEIGHTS_FILE})",
            cfg_path.display()
        )
    })?;
    let bad = |what: String| anyhow::anyhow!("{}: {what}", cfg_path.display());
    let cfg: Value = serde_json::from_str(&cfg_text).map_err(|e| {
        bad(format!(
            "not valid JSON ({e}); restore it from where the SAE came from"
        ))
    })?;
    if !cfg.is_object() {
        return Err(bad(
            "expected a JSON object with d_in, d_sae and architecture".into(),
        ));
    }
    let get_usize = |k: &str| -> anyhow::Result<usize> {
        cfg.get(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("missing or non-integer '{k}'")))
    };
    let d_in = get_usize("d_in")?;
    let d_sae = get_usize("d_sae")?;
    let spec = parse_cfg(&cfg).map_err(bad)?;
    let arch = spec.arch;
    let family = arch.family();
    if family.setting_keys().contains(&"k") && !spec.settings.contains_key("k") {
        return Err(bad(format!(
            "no 'k'; a {arch} SAE needs k, the number of active latents per token"
        )));
    }
    // Sizes and settings before the weights, so a bad cfg.json is reported as such.
    let mut sae = Sae {
        arch,
        d_in,
        d_sae,
        w_enc: Vec::new(),
        w_dec: Vec::new(),
        b_dec: Vec::new(),
        params: Vec::new(),
        settings: spec.settings,
        apply_b_dec_to_input: spec.apply_b_dec_to_input,
        meta: spec.meta,
    };
    if let Err(Invalid::Config { key, msg }) = sae.validate_config() {
        return Err(bad(format!("{msg}; fix '{key}' or load another SAE")));
    }

    let bytes = std::fs::read(&w_path).with_context(|| format!("reading {}", w_path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a valid safetensors file ({e}); it is damaged or truncated, copy it again \
             or retrain the SAE",
            w_path.display()
        )
    })?;
    let names: HashMap<String, ()> = st
        .names()
        .into_iter()
        .map(|n| (n.to_string(), ()))
        .collect();
    let tensor = |name: &str| {
        st.tensor(name).map_err(|_| {
            anyhow::anyhow!(
                "{}: no tensor '{name}', which a {arch} SAE ({}) needs; the file has {:?}",
                w_path.display(),
                cfg_path.display(),
                sorted(&names)
            )
        })
    };
    let read = |name: &str, shape: &[usize]| -> anyhow::Result<Vec<f32>> {
        let t = tensor(name)?;
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
    let mut used = vec!["W_enc", "W_dec", "b_dec"];
    sae.w_enc = read("W_enc", &[d_in, d_sae])?;
    sae.w_dec = read("W_dec", &[d_sae, d_in])?;
    sae.b_dec = read("b_dec", &[d_in])?;
    for p in family.latent_params() {
        let sources = family.stored_as(p.name);
        let Some(&(name, stored)) = sources.iter().find(|(n, _)| names.contains_key(*n)) else {
            return Err(tensor(p.name).unwrap_err());
        };
        used.push(name);
        let values = match stored {
            Stored::AsIs => read(name, &[d_sae])?,
            Stored::Log => read(name, &[d_sae])?.into_iter().map(f32::exp).collect(),
            Stored::Broadcast => {
                // One value for every latent, broadcast as SAELens does when it saves one
                // for inference.
                let t = tensor(name)?;
                let v = to_f32(t.dtype(), t.data())
                    .with_context(|| format!("{}: tensor '{name}'", w_path.display()))?;
                if v.len() != 1 {
                    bail!(
                        "{}: tensor '{name}' has shape {:?}, expected one value",
                        w_path.display(),
                        t.shape()
                    );
                }
                vec![v[0]; d_sae]
            }
        };
        sae.params.push(values);
    }
    let scale_name = ["scaling_factor", "finetuning_scaling_factor"]
        .into_iter()
        .find(|n| names.contains_key(*n));
    let finetuning_scale = match scale_name {
        Some(name) => {
            used.push(name);
            let s = read(name, &[d_sae])?;
            // As SAELens: a scale of all ones is a no-op left over from older versions.
            if !spec.finetuning_scaling_factor && s.iter().any(|v| *v != 1.0) {
                bail!(
                    "{}: tensor '{name}' scales the codes but {} has no \
                     'finetuning_scaling_factor: true'; set it if the scale belongs to the SAE",
                    w_path.display(),
                    cfg_path.display()
                );
            }
            Some(s)
        }
        None if spec.finetuning_scaling_factor => {
            return Err(tensor("scaling_factor").unwrap_err().context(format!(
                "{} sets 'finetuning_scaling_factor'",
                cfg_path.display()
            )))
        }
        None => None,
    };
    let extra: Vec<&str> = sorted(&names)
        .into_iter()
        .filter(|n| !used.contains(n))
        .collect();
    if !extra.is_empty() {
        bail!(
            "{}: tensors {extra:?} are not part of a {arch} SAE, so {} names the wrong \
             architecture or the weights belong to another SAE; fix 'architecture' or load \
             another SAE",
            w_path.display(),
            cfg_path.display()
        );
    }
    let broken = |e: Invalid| match e {
        Invalid::Config { key, msg } => bad(format!("{msg}; fix '{key}' or load another SAE")),
        Invalid::Tensor { msg, .. } => anyhow::anyhow!(
            "{}: {msg}; the SAE is broken, retrain it or load another",
            w_path.display()
        ),
    };
    sae.validate().map_err(broken)?;
    let folded = spec.rescale_by_decoder_norm || finetuning_scale.is_some();
    if let Some(s) = finetuning_scale {
        for (row, s) in sae.w_dec.chunks_mut(d_in).zip(s) {
            row.iter_mut().for_each(|w| *w *= s);
        }
    }
    if spec.rescale_by_decoder_norm {
        fold_decoder_norms(&mut sae);
    }
    if folded {
        sae.validate().map_err(broken)?;
    }
    Ok(sae)
}

/// SAELens' `rescale_acts_by_decoder_norm` (TopK family): it multiplies the pre-activations
/// by the decoder row norms `n_j` before choosing the top k (BatchTopK: before its
/// threshold), and divides the codes by `n_j` again before decoding. Scaling W_enc's column j
/// and b_enc[j] by `n_j` and dividing W_dec's row j by it gives the same pre-activations,
/// codes and reconstruction with plain TopK math (SAELens does the same fold when it saves a
/// TopK SAE for inference). A zero row stays zero: that latent's pre-activation is then 0, so
/// it never holds a positive code.
fn fold_decoder_norms(sae: &mut Sae) {
    let (d_in, d_sae) = (sae.d_in, sae.d_sae);
    let norms: Vec<f32> = sae
        .w_dec
        .chunks(d_in)
        .map(|row| row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() as f32)
        .collect();
    for (row, &n) in sae.w_dec.chunks_mut(d_in).zip(&norms) {
        if n > 0.0 {
            row.iter_mut().for_each(|w| *w /= n);
        }
    }
    for row in sae.w_enc.chunks_mut(d_sae) {
        row.iter_mut().zip(&norms).for_each(|(w, n)| *w *= n);
    }
    sae.params[0]
        .iter_mut()
        .zip(&norms)
        .for_each(|(b, n)| *b *= n);
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
