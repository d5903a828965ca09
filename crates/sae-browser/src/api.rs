//! The JSON behind the page: latent list, latent detail, live text encoding.

use crate::format::{Analysis, LatentRecord};
use crate::scan::Example;
use crate::source::{EncodedText, TextEncoder, TOO_LONG};
use serde_json::{json, Value};
use std::collections::HashMap;

/// An API failure: HTTP status and message (sent as `{"error": message}`).
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

pub type ApiResult = Result<Value, ApiError>;

/// Per-latent text that the list search matches, and the tokens shown in the list.
struct LatentIndex {
    /// Lower-cased token strings (top-context tokens, then top logits), NUL-separated.
    haystack: String,
    top_tokens: Vec<u32>,
    top_logits: Vec<u32>,
    n_fired: u64,
    mean: f32,
    max: f32,
}

/// The analysis plus what the list page needs in memory (a few dozen bytes per latent).
pub struct Browser {
    pub analysis: Analysis,
    index: Vec<LatentIndex>,
    pub encoder: Option<Box<dyn TextEncoder>>,
    /// Longest text accepted by the text box, in bytes.
    pub max_text_bytes: usize,
}

/// Latents per list page at most.
const MAX_LIMIT: usize = 500;
/// Latents listed per token in the text-box answer.
const PER_TOKEN: usize = 10;

impl Browser {
    pub fn new(analysis: Analysis, encoder: Option<Box<dyn TextEncoder>>) -> Self {
        let index = (0..analysis.d_sae())
            .map(|j| {
                let rec = analysis.latent(j).expect("index below d_sae");
                let (top, _) = analysis.examples(&rec);
                let top_tokens = frequent_center_tokens(&top, 3);
                let top_logits: Vec<u32> = rec.logits_top.iter().map(|p| p.0).take(5).collect();
                let mut haystack = String::new();
                let mut seen = Vec::new();
                for e in &top {
                    let t = e.tokens.get(e.center as usize).copied().unwrap_or(0);
                    if !seen.contains(&t) {
                        seen.push(t);
                        haystack.push_str(&analysis.token_text(t).to_lowercase());
                        haystack.push('\0');
                    }
                }
                for &(t, _) in &rec.logits_top {
                    haystack.push_str(&analysis.token_text(t).to_lowercase());
                    haystack.push('\0');
                }
                LatentIndex {
                    haystack,
                    top_tokens,
                    top_logits,
                    n_fired: rec.n_fired,
                    mean: rec.mean_act(),
                    max: rec.max_act,
                }
            })
            .collect();
        Self {
            analysis,
            index,
            encoder,
            max_text_bytes: 8 * 1024,
        }
    }

    fn freq(&self, n_fired: u64) -> f64 {
        n_fired as f64 / self.analysis.meta.n_tokens.max(1) as f64
    }

    fn tokens(&self, ids: &[u32]) -> Vec<&str> {
        ids.iter().map(|&t| self.analysis.token_text(t)).collect()
    }

    /// `/api/meta`: what was analysed, plus the density histogram over all latents.
    pub fn meta(&self) -> Value {
        // log10(frequency) in half-decade bins from 1e-7 to 1; dead latents counted apart.
        let (lo, n_bins) = (-7.0f64, 14usize);
        let mut bins = vec![0u64; n_bins];
        let mut dead = 0u64;
        for l in &self.index {
            if l.n_fired == 0 {
                dead += 1;
                continue;
            }
            let b = ((self.freq(l.n_fired).log10() - lo) * 2.0).floor();
            bins[(b.max(0.0) as usize).min(n_bins - 1)] += 1;
        }
        let enc = self.encoder.as_ref();
        json!({
            "meta": self.analysis.meta,
            "live": enc.is_some(),
            "max_tokens": enc.map(|e| e.max_tokens()).unwrap_or(0),
            "max_text_bytes": self.max_text_bytes,
            "density": { "log10_lo": lo, "step": 0.5, "bins": bins, "dead": dead },
        })
    }

    /// `/api/latents?sort=freq|max|mean|id&order=desc|asc&q=text&offset=0&limit=100`.
    pub fn list(&self, query: &HashMap<String, String>) -> ApiResult {
        let get = |k: &str| query.get(k).map(|s| s.as_str());
        let sort = get("sort").unwrap_or("freq");
        let desc = match get("order").unwrap_or("desc") {
            "desc" => true,
            "asc" => false,
            o => {
                return Err(ApiError::new(
                    400,
                    format!("order must be asc or desc, not '{o}'"),
                ))
            }
        };
        let num = |k: &str, default: usize| -> Result<usize, ApiError> {
            match get(k) {
                None | Some("") => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| ApiError::new(400, format!("{k} must be a number, not '{v}'"))),
            }
        };
        let offset = num("offset", 0)?;
        let limit = num("limit", 100)?.min(MAX_LIMIT);
        let q = get("q").unwrap_or("").trim().to_lowercase();
        let hide_dead = get("dead") == Some("hide");

        let mut ids: Vec<usize> = (0..self.index.len())
            .filter(|&j| !hide_dead || self.index[j].n_fired > 0)
            .filter(|&j| q.is_empty() || self.index[j].haystack.contains(&q))
            .collect();
        let key = |j: usize| -> f64 {
            let l = &self.index[j];
            match sort {
                "max" => l.max as f64,
                "mean" => l.mean as f64,
                "id" => j as f64,
                _ => l.n_fired as f64,
            }
        };
        if !matches!(sort, "freq" | "max" | "mean" | "id") {
            return Err(ApiError::new(
                400,
                format!("sort must be freq, max, mean or id, not '{sort}'"),
            ));
        }
        ids.sort_by(|&a, &b| {
            let o = key(a).total_cmp(&key(b)).then(a.cmp(&b));
            if desc {
                o.reverse()
            } else {
                o
            }
        });
        let total = ids.len();
        let items: Vec<Value> = ids
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|j| {
                let l = &self.index[j];
                json!({
                    "id": j,
                    "n_fired": l.n_fired,
                    "freq": self.freq(l.n_fired),
                    "mean": l.mean,
                    "max": l.max,
                    "top_tokens": self.tokens(&l.top_tokens),
                    "top_logits": self.tokens(&l.top_logits),
                })
            })
            .collect();
        Ok(json!({ "total": total, "offset": offset, "items": items }))
    }

    /// `/api/latent/{id}`.
    pub fn latent(&self, id: &str) -> ApiResult {
        let d_sae = self.analysis.d_sae();
        let not_found = || {
            ApiError::new(
                404,
                format!(
                    "unknown latent '{id}': ids are 0 to {}",
                    d_sae.saturating_sub(1)
                ),
            )
        };
        let j: usize = id.parse().map_err(|_| not_found())?;
        let rec: LatentRecord = self.analysis.latent(j).ok_or_else(not_found)?;
        let (top, random) = self.analysis.examples(&rec);
        let logits = |v: &[(u32, f32)]| -> Vec<Value> {
            v.iter()
                .map(|&(t, x)| json!({ "token": self.analysis.token_text(t), "value": x }))
                .collect()
        };
        Ok(json!({
            "id": j,
            "d_sae": d_sae,
            "n_fired": rec.n_fired,
            "freq": self.freq(rec.n_fired),
            "mean": rec.mean_act(),
            "max": rec.max_act,
            "hist": { "hi": rec.hist_hi, "bins": rec.hist },
            "top": top.iter().map(|e| self.example(e)).collect::<Vec<_>>(),
            "random": random.iter().map(|e| self.example(e)).collect::<Vec<_>>(),
            "logits": { "top": logits(&rec.logits_top), "bottom": logits(&rec.logits_bottom) },
        }))
    }

    fn example(&self, e: &Example) -> Value {
        json!({
            "act": e.act,
            "context": e.context,
            "pos": e.pos,
            "center": e.center,
            "tokens": self.tokens(&e.tokens),
            "acts": e.acts,
        })
    }

    /// `POST /api/encode` with `{"text": "..."}`.
    pub fn encode(&self, body: &[u8]) -> ApiResult {
        // A malformed request is the client's fault (400) whether or not a model is loaded.
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, format!("body must be JSON {{\"text\": ...}}: {e}")))?;
        let text = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| ApiError::new(400, "body must be JSON {\"text\": \"...\"}"))?;
        let Some(enc) = &self.encoder else {
            return Err(ApiError::new(
                503,
                "this server has no model loaded; start `sae serve` with the SAE and model available to use the text box",
            ));
        };
        if text.len() > self.max_text_bytes {
            return Err(ApiError::new(
                413,
                format!(
                    "{TOO_LONG}: {} bytes, at most {} are accepted",
                    text.len(),
                    self.max_text_bytes
                ),
            ));
        }
        if text.trim().is_empty() {
            return Err(ApiError::new(400, "type some text first"));
        }
        let out = enc.encode_text(text).map_err(|e| {
            let msg = format!("{e:#}");
            let status = if msg.starts_with(TOO_LONG) { 413 } else { 500 };
            ApiError::new(status, msg)
        })?;
        Ok(self.encoded_json(&out))
    }

    fn encoded_json(&self, out: &EncodedText) -> Value {
        let skip = usize::from(out.first_is_bos);
        let n = out.tokens.len();
        // Per token: its strongest latents. Per latent: activations over all tokens.
        let mut per_token: Vec<Vec<(u32, f32)>> = Vec::with_capacity(n);
        let mut per_latent: HashMap<u32, Vec<f32>> = HashMap::new();
        for r in 0..n {
            let (idx, val) = out.code.row(r);
            let mut pairs: Vec<(u32, f32)> = idx.iter().copied().zip(val.iter().copied()).collect();
            pairs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if r >= skip {
                for &(j, v) in &pairs {
                    per_latent.entry(j).or_insert_with(|| vec![0.0; n])[r] = v;
                }
            }
            pairs.truncate(PER_TOKEN);
            per_token.push(pairs);
        }
        let mut latents: Vec<(u32, Vec<f32>)> = per_latent.into_iter().collect();
        let max_of = |a: &[f32]| a.iter().fold(0f32, |m, &v| m.max(v));
        latents.sort_by(|a, b| max_of(&b.1).total_cmp(&max_of(&a.1)).then(a.0.cmp(&b.0)));
        latents.truncate(200);
        let latents: Vec<Value> = latents
            .iter()
            .map(|(j, acts)| {
                let l = self.index.get(*j as usize);
                json!({
                    "id": j,
                    "max": max_of(acts),
                    "count": acts.iter().filter(|&&v| v > 0.0).count(),
                    "acts": acts,
                    "freq": l.map(|l| self.freq(l.n_fired)),
                    "max_in_corpus": l.map(|l| l.max),
                    "top_tokens": l.map(|l| self.tokens(&l.top_tokens)),
                })
            })
            .collect();
        json!({
            "tokens": out.token_text,
            "first_is_bos": out.first_is_bos,
            "per_token": per_token,
            "latents": latents,
        })
    }
}

/// The `k` most frequent example tokens (ties: the earlier, i.e. stronger, example first).
fn frequent_center_tokens(top: &[Example], k: usize) -> Vec<u32> {
    let mut counts: Vec<(u32, usize, usize)> = Vec::new();
    for (rank, e) in top.iter().enumerate() {
        let t = e.tokens.get(e.center as usize).copied().unwrap_or(0);
        match counts.iter_mut().find(|c| c.0 == t) {
            Some(c) => c.1 += 1,
            None => counts.push((t, 1, rank)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    counts.into_iter().take(k).map(|c| c.0).collect()
}
