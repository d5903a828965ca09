//! Reading weights (GGUF or a Hugging Face directory) into f32 candle tensors.

use crate::gpt2::Gpt2;
use crate::llama::{Llama, LlamaConfig, LlamaLayer};
use crate::model::Net;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// `[out, in]` -> contiguous `[in, out]`, so projections are `x.matmul(w)`.
fn transposed(w: Tensor) -> Result<Tensor> {
    Ok(w.t()?.contiguous()?)
}

pub fn load_gguf(path: &Path) -> Result<(Llama, Tokenizer)> {
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("opening model file {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a readable GGUF file ({e}); re-download it or pass another --model",
            path.display()
        )
    })?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" && arch != "qwen2" {
        bail!(
            "{}: GGUF architecture '{arch}' is not supported (llama and qwen2 are)",
            path.display()
        );
    }
    let get = |key: &str| -> Result<&gguf_file::Value> {
        md.get(&format!("{arch}.{key}"))
            .with_context(|| format!("{}: GGUF metadata {arch}.{key} missing", path.display()))
    };
    let u = |key: &str| -> Result<usize> {
        Ok(get(key)?.to_u32().map_err(anyhow::Error::msg)? as usize)
    };
    let d_model = u("embedding_length")?;
    let n_heads = u("attention.head_count")?;
    let tokenizer = gguf_tokenizer(md, path)?;
    let mut tensor = |name: &str| -> Result<Tensor> {
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .with_context(|| {
                format!(
                    "{}: reading tensor {name} (file truncated or corrupt?)",
                    path.display()
                )
            })?;
        Ok(q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
    };
    let embed = tensor("token_embd.weight")?;
    let cfg = LlamaConfig {
        d_model,
        n_layers: u("block_count")?,
        n_heads,
        n_kv_heads: u("attention.head_count_kv").unwrap_or(n_heads),
        d_head: d_model / n_heads,
        d_mlp: u("feed_forward_length")?,
        vocab_size: embed.dim(0)?,
        rope_theta: get("rope.freq_base")
            .and_then(|v| Ok(v.to_f32()? as f64))
            .unwrap_or(10_000.0),
        rms_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
        max_positions: u("context_length").unwrap_or(2048),
        interleaved_rope: arch == "llama",
    };
    let has_bias = content.tensor_infos.contains_key("blk.0.attn_q.bias");
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let mut t = |n: &str| tensor(&format!("blk.{l}.{n}"));
        layers.push(LlamaLayer {
            attn_norm: t("attn_norm.weight")?,
            wq: transposed(t("attn_q.weight")?)?,
            wk: transposed(t("attn_k.weight")?)?,
            wv: transposed(t("attn_v.weight")?)?,
            bq: if has_bias {
                Some(t("attn_q.bias")?)
            } else {
                None
            },
            bk: if has_bias {
                Some(t("attn_k.bias")?)
            } else {
                None
            },
            bv: if has_bias {
                Some(t("attn_v.bias")?)
            } else {
                None
            },
            wo: transposed(t("attn_output.weight")?)?,
            mlp_norm: t("ffn_norm.weight")?,
            w_gate: transposed(t("ffn_gate.weight")?)?,
            w_up: transposed(t("ffn_up.weight")?)?,
            w_down: transposed(t("ffn_down.weight")?)?,
        });
    }
    let final_norm = tensor("output_norm.weight")?;
    let unembed = if content.tensor_infos.contains_key("output.weight") {
        transposed(tensor("output.weight")?)?
    } else {
        transposed(embed.clone())? // tied embeddings (SmolLM2)
    };
    Ok((
        Llama::new(cfg, embed, layers, final_norm, unembed)?,
        tokenizer,
    ))
}

fn gguf_tokenizer(md: &HashMap<String, gguf_file::Value>, path: &Path) -> Result<Tokenizer> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        bail!(
            "{}: tokenizer model '{model}' is not supported (only byte-level BPE 'gpt2')",
            path.display()
        );
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        let arr = md
            .get(key)
            .with_context(|| format!("{}: GGUF metadata {key} missing", path.display()))?
            .to_vec()?;
        arr.iter().map(|v| Ok(v.to_string()?.clone())).collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let bos_id = md
        .get("tokenizer.ggml.bos_token_id")
        .and_then(|v| v.to_u32().ok());
    let pre_name = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let pre = Tokenizer::pre_from_gguf_name(pre_name.as_deref().unwrap_or("gpt-2"))?;
    // Control (3) and user-defined (4) tokens are matched literally before BPE.
    let special_ids: Vec<u32> = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t.to_i32(), Ok(3) | Ok(4)))
            .map(|(i, _)| i as u32)
            .collect(),
        None => Vec::new(),
    };
    Tokenizer::from_parts(tokens, &merges, bos_id, pre, &special_ids)
}

/// A Hugging Face model directory: config.json, *.safetensors, tokenizer.json.
pub fn load_hf_dir(dir: &Path) -> Result<(Net, Tokenizer)> {
    let config_path = dir.join("config.json");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let model_type = config["model_type"].as_str().unwrap_or("");
    if !["llama", "qwen2", "mistral", "gpt2"].contains(&model_type) {
        bail!(
            "{}: model_type '{model_type}' is not supported (llama, qwen2, mistral, gpt2)",
            config_path.display()
        );
    }
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut found = false;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            found = true;
            let part = candle_core::safetensors::load(&p, &Device::Cpu)
                .with_context(|| format!("{} is not a readable safetensors file", p.display()))?;
            weights.extend(part);
        }
    }
    if !found {
        bail!("{}: no .safetensors files", dir.display());
    }
    let net = if model_type == "gpt2" {
        Net::Gpt2(Gpt2::from_hf(dir, &config, weights)?)
    } else {
        Net::Llama(llama_from_hf(dir, &config, weights)?)
    };
    Ok((net, hf_tokenizer(dir, &config)?))
}

fn llama_from_hf(
    dir: &Path,
    config: &serde_json::Value,
    mut weights: HashMap<String, Tensor>,
) -> Result<Llama> {
    let config_path = dir.join("config.json");
    let n = |key: &str| -> Result<usize> {
        config[key]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("{}: '{key}' missing", config_path.display()))
    };
    let mut take = |name: &str| -> Result<Tensor> {
        let t = weights
            .remove(name)
            .with_context(|| format!("{}: weight {name} missing", dir.display()))?;
        Ok(t.to_dtype(DType::F32)?)
    };
    // RoPE scaling (Llama 3.1 "llama3", "yarn", ...) changes the rotation; only plain RoPE is
    // implemented. transformers 5 keeps it in rope_parameters, older configs in rope_scaling.
    for key in ["rope_parameters", "rope_scaling"] {
        let kind = config[key]["rope_type"]
            .as_str()
            .or(config[key]["type"].as_str())
            .unwrap_or("default");
        if kind != "default" {
            bail!(
                "{}: RoPE scaling '{kind}' ({key}) is not supported (plain RoPE only)",
                config_path.display()
            );
        }
    }
    let d_model = n("hidden_size")?;
    let n_heads = n("num_attention_heads")?;
    let embed = take("model.embed_tokens.weight")?;
    let cfg = LlamaConfig {
        d_model,
        n_layers: n("num_hidden_layers")?,
        n_heads,
        n_kv_heads: n("num_key_value_heads").unwrap_or(n_heads),
        d_head: n("head_dim").unwrap_or(d_model / n_heads),
        d_mlp: n("intermediate_size")?,
        vocab_size: embed.dim(0)?,
        // Older configs: rope_theta; transformers 5: rope_parameters.rope_theta.
        rope_theta: config["rope_theta"]
            .as_f64()
            .or(config["rope_parameters"]["rope_theta"].as_f64())
            .unwrap_or(10_000.0),
        rms_eps: config["rms_norm_eps"].as_f64().unwrap_or(1e-5),
        max_positions: n("max_position_embeddings").unwrap_or(2048),
        interleaved_rope: false,
    };
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}.");
        let has_bias = take(&format!("{p}self_attn.q_proj.bias")).ok();
        let mut t = |n: &str| take(&format!("{p}{n}"));
        layers.push(LlamaLayer {
            attn_norm: t("input_layernorm.weight")?,
            wq: transposed(t("self_attn.q_proj.weight")?)?,
            wk: transposed(t("self_attn.k_proj.weight")?)?,
            wv: transposed(t("self_attn.v_proj.weight")?)?,
            bk: if has_bias.is_some() {
                Some(t("self_attn.k_proj.bias")?)
            } else {
                None
            },
            bv: if has_bias.is_some() {
                Some(t("self_attn.v_proj.bias")?)
            } else {
                None
            },
            bq: has_bias,
            wo: transposed(t("self_attn.o_proj.weight")?)?,
            mlp_norm: t("post_attention_layernorm.weight")?,
            w_gate: transposed(t("mlp.gate_proj.weight")?)?,
            w_up: transposed(t("mlp.up_proj.weight")?)?,
            w_down: transposed(t("mlp.down_proj.weight")?)?,
        });
    }
    let final_norm = take("model.norm.weight")?;
    let tied = config["tie_word_embeddings"].as_bool().unwrap_or(false);
    let unembed = match take("lm_head.weight") {
        Ok(w) => transposed(w)?,
        Err(_) if tied => transposed(embed.clone())?,
        Err(e) => return Err(e.context("config.json says tie_word_embeddings is false")),
    };
    // Weights this forward pass does not use (o_proj/MLP biases, extra norms...) mean a
    // variant it does not implement: refuse rather than compute something else.
    let mut unused: Vec<&String> = weights
        .keys()
        .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
        .collect();
    if !unused.is_empty() {
        unused.sort();
        bail!(
            "{}: weights not used by the Llama forward pass ({}{}); this model variant is not supported",
            dir.display(),
            unused.iter().take(5).map(|k| k.as_str()).collect::<Vec<_>>().join(", "),
            if unused.len() > 5 { ", ..." } else { "" }
        );
    }
    Llama::new(cfg, embed, layers, final_norm, unembed)
}

/// tokenizer.json with the model's own BOS.
fn hf_tokenizer(dir: &Path, config: &serde_json::Value) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_tokenizer_json(&dir.join("tokenizer.json"))?;
    // The model's own BOS: config.json, else tokenizer_config.json (SmolLM2-Instruct's is
    // <|im_start|>, which tokenizer.json alone does not say).
    let from_config = config["bos_token_id"].as_u64().map(|id| id as u32);
    let from_tok_config = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|j| {
            let name = j["bos_token"]
                .as_str()
                .or(j["bos_token"]["content"].as_str())?
                .to_string();
            tokenizer.token_id(&name)
        });
    if let Some(id) = from_config.or(from_tok_config) {
        if (id as usize) < tokenizer.vocab_size() {
            tokenizer.bos_id = Some(id);
        }
    }
    Ok(tokenizer)
}
