//! The analysis directory: compact little-endian binary tables, memory-mapped when served.
//!
//! ```text
//! meta.json      AnalysisMeta (what was scanned, with which settings)
//! vocab.json     token strings, once: ["<s>", "the", ...]
//! latents.bin    header (32 B) + d_sae fixed-size records:
//!                  n_fired u64, sum_act f64, max_act f32, hist_hi f32, ex_start u64,
//!                  n_top u32, n_random u32, hist [hist_bins] u32,
//!                  logits_top [n_logits] (token u32, value f32), logits_bottom (same)
//! examples.bin   header (16 B) + fixed-size example records, each latent's
//!                  n_top + n_random examples contiguous from ex_start:
//!                  act f32, context u32, pos u32, center u32, len u32,
//!                  tokens [window] u32, acts [window] f32 (zero past len)
//! ```
//! A latent page reads one record and its examples straight from the maps, so the server's
//! memory does not grow with d_sae beyond the small per-latent search index.

use crate::scan::{Example, ScanConfig, ScanResult};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const META_FILE: &str = "meta.json";
pub const VOCAB_FILE: &str = "vocab.json";
pub const LATENTS_FILE: &str = "latents.bin";
pub const EXAMPLES_FILE: &str = "examples.bin";
const LATENTS_MAGIC: &[u8; 8] = b"SAEBLAT1";
const EXAMPLES_MAGIC: &[u8; 8] = b"SAEBEX01";
const LATENTS_HEADER: usize = 32;
const EXAMPLES_HEADER: usize = 16;
const FIXED_RECORD: usize = 40;
const EXAMPLE_FIXED: usize = 20;
pub const FORMAT_VERSION: u32 = 1;

/// Where an analysis came from and how it was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnalysisMeta {
    pub format_version: u32,
    /// SAE directory as given to `sae analyze` (used by `sae serve` for the live text box).
    pub sae: String,
    pub model: String,
    pub hook: String,
    pub corpus: String,
    pub arch: String,
    pub d_in: usize,
    pub d_sae: usize,
    pub ctx: usize,
    pub n_contexts: u64,
    /// Tokens counted in frequencies (BOS positions excluded when `skip_first`).
    pub n_tokens: u64,
    pub vocab_size: usize,
    pub n_logits: usize,
    pub top_k: usize,
    pub n_random: usize,
    pub reservoir: usize,
    pub left: usize,
    pub right: usize,
    pub hist_bins: usize,
    pub skip_first: bool,
    pub seed: u64,
}

/// Where the scanned data came from (everything the scan itself does not know).
#[derive(Clone, Debug, Default)]
pub struct Provenance {
    pub sae: String,
    pub model: String,
    pub hook: String,
    pub corpus: String,
    pub arch: String,
    pub d_in: usize,
}

/// Top and bottom tokens of a decoder direction's logit effect, strongest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogitEffect {
    pub top: Vec<(u32, f32)>,
    pub bottom: Vec<(u32, f32)>,
}

/// The `n` largest and `n` smallest entries of a logit vector.
pub fn logit_effect(logits: &[f32], n: usize) -> LogitEffect {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(logits.len());
    let by_value = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    let pick = |order: &mut Vec<u32>, desc: bool| -> Vec<(u32, f32)> {
        if n == 0 {
            return Vec::new();
        }
        let cmp = |a: &u32, b: &u32| {
            let o = by_value(a, b);
            if desc {
                o
            } else {
                o.reverse()
            }
        };
        order.select_nth_unstable_by(n - 1, cmp);
        let mut best = order[..n].to_vec();
        best.sort_by(cmp);
        best.into_iter().map(|i| (i, logits[i as usize])).collect()
    };
    LogitEffect {
        top: pick(&mut order, true),
        bottom: pick(&mut order, false),
    }
}

/// Writes the analysis to `dir` atomically: a temp dir beside it, then rename (an existing
/// analysis there is replaced only once the new one is complete).
pub fn write_analysis(
    dir: &Path,
    scan: &ScanResult,
    logits: &[LogitEffect],
    vocab: &[String],
    prov: &Provenance,
) -> Result<AnalysisMeta> {
    let d_sae = scan.latents.len();
    let n_logits = logits.first().map(|l| l.top.len()).unwrap_or(0);
    if !logits.is_empty() && logits.len() != d_sae {
        bail!("{} logit effects for {d_sae} latents", logits.len());
    }
    if logits
        .iter()
        .any(|l| l.top.len() != n_logits || l.bottom.len() != n_logits)
    {
        bail!("every latent needs the same number of top and bottom logits");
    }
    let cfg: &ScanConfig = &scan.config;
    let meta = AnalysisMeta {
        format_version: FORMAT_VERSION,
        sae: prov.sae.clone(),
        model: prov.model.clone(),
        hook: prov.hook.clone(),
        corpus: prov.corpus.clone(),
        arch: prov.arch.clone(),
        d_in: prov.d_in,
        d_sae,
        ctx: scan.ctx,
        n_contexts: scan.n_contexts,
        n_tokens: scan.n_tokens,
        vocab_size: vocab.len(),
        n_logits,
        top_k: cfg.top_k,
        n_random: cfg.n_random,
        reservoir: cfg.reservoir,
        left: cfg.left,
        right: cfg.right,
        hist_bins: cfg.hist_bins,
        skip_first: cfg.skip_first,
        seed: cfg.seed,
    };

    sae_core::saelens::replace_dir_atomic(dir, |tmp| write_files(tmp, scan, logits, vocab, &meta))
        .with_context(|| format!("writing the analysis into {}", dir.display()))?;
    Ok(meta)
}

fn write_files(
    dir: &Path,
    scan: &ScanResult,
    logits: &[LogitEffect],
    vocab: &[String],
    meta: &AnalysisMeta,
) -> Result<()> {
    std::fs::write(dir.join(META_FILE), serde_json::to_vec_pretty(meta)?)?;
    std::fs::write(dir.join(VOCAB_FILE), serde_json::to_vec(vocab)?)?;

    let window = scan.config.window();
    let mut lat = BufWriter::new(File::create(dir.join(LATENTS_FILE))?);
    let mut ex = BufWriter::new(File::create(dir.join(EXAMPLES_FILE))?);
    let bins = meta.hist_bins;
    let rec = record_size(bins, meta.n_logits);
    lat.write_all(LATENTS_MAGIC)?;
    for v in [
        meta.d_sae as u32,
        bins as u32,
        meta.n_logits as u32,
        rec as u32,
    ] {
        lat.write_all(&v.to_le_bytes())?;
    }
    lat.write_all(&[0u8; 8])?;
    ex.write_all(EXAMPLES_MAGIC)?;
    ex.write_all(&(window as u32).to_le_bytes())?;
    ex.write_all(&[0u8; 4])?;

    let mut ex_start = 0u64;
    for (j, l) in scan.latents.iter().enumerate() {
        if l.hist.bins.len() != bins {
            bail!(
                "latent {j}: histogram has {} bins, expected {bins}",
                l.hist.bins.len()
            );
        }
        lat.write_all(&l.n_fired.to_le_bytes())?;
        lat.write_all(&l.sum_act.to_le_bytes())?;
        lat.write_all(&l.max_act.to_le_bytes())?;
        lat.write_all(&l.hist.hi.to_le_bytes())?;
        lat.write_all(&ex_start.to_le_bytes())?;
        lat.write_all(&(l.top.len() as u32).to_le_bytes())?;
        lat.write_all(&(l.random.len() as u32).to_le_bytes())?;
        for b in &l.hist.bins {
            lat.write_all(&b.to_le_bytes())?;
        }
        if let Some(le) = logits.get(j) {
            for (id, v) in le.top.iter().chain(&le.bottom) {
                lat.write_all(&id.to_le_bytes())?;
                lat.write_all(&v.to_le_bytes())?;
            }
        }
        for e in l.top.iter().chain(&l.random) {
            write_example(&mut ex, e, window)?;
            ex_start += 1;
        }
    }
    lat.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    ex.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

fn write_example(w: &mut impl Write, e: &Example, window: usize) -> Result<()> {
    let len = e.tokens.len();
    if len > window || e.acts.len() != len {
        bail!("example window of {len} tokens exceeds {window}");
    }
    w.write_all(&e.act.to_le_bytes())?;
    for v in [e.context, e.pos, e.center, len as u32] {
        w.write_all(&v.to_le_bytes())?;
    }
    for i in 0..window {
        w.write_all(&e.tokens.get(i).copied().unwrap_or(0).to_le_bytes())?;
    }
    for i in 0..window {
        w.write_all(&e.acts.get(i).copied().unwrap_or(0.0).to_le_bytes())?;
    }
    Ok(())
}

/// The bytes an analysis of `d_sae` latents takes on disk at most (every latent with its full
/// share of examples), for a free-space check before the scan; saturates instead of wrapping.
pub fn max_analysis_bytes(d_sae: usize, cfg: &ScanConfig, n_logits: usize, vocab: usize) -> u64 {
    let per_example =
        (EXAMPLE_FIXED as u64).saturating_add(8u64.saturating_mul(cfg.window() as u64));
    let examples = (cfg.top_k as u64)
        .saturating_add(cfg.n_random as u64)
        .saturating_mul(per_example);
    let record = (FIXED_RECORD as u64)
        .saturating_add(4u64.saturating_mul(cfg.hist_bins as u64))
        .saturating_add(16u64.saturating_mul(n_logits as u64));
    (d_sae as u64)
        .saturating_mul(record.saturating_add(examples))
        .saturating_add((vocab as u64).saturating_mul(24))
        .saturating_add(1 << 16)
}

fn record_size(bins: usize, n_logits: usize) -> usize {
    FIXED_RECORD + 4 * bins + 16 * n_logits
}

/// One latent's record as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentRecord {
    pub n_fired: u64,
    pub sum_act: f64,
    pub max_act: f32,
    pub hist_hi: f32,
    pub hist: Vec<u32>,
    pub logits_top: Vec<(u32, f32)>,
    pub logits_bottom: Vec<(u32, f32)>,
    ex_start: u64,
    pub n_top: u32,
    pub n_random: u32,
}

impl LatentRecord {
    pub fn mean_act(&self) -> f32 {
        if self.n_fired == 0 {
            0.0
        } else {
            (self.sum_act / self.n_fired as f64) as f32
        }
    }
}

/// An analysis directory opened for reading. The tables are read into memory, not mapped: a
/// mapped file that someone truncates would kill the server with SIGBUS.
pub struct Analysis {
    pub dir: PathBuf,
    pub meta: AnalysisMeta,
    pub vocab: Vec<String>,
    latents: Vec<u8>,
    examples: Vec<u8>,
    record: usize,
    window: usize,
    n_examples: u64,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn le_f32(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le_f64(b: &[u8], at: usize) -> f64 {
    f64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn read_table(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!(
            "reading {} (is this an analysis directory written by `sae analyze`?)",
            path.display()
        )
    })
}

impl Analysis {
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "reading {} (run `sae analyze --out {}` first)",
                meta_path.display(),
                dir.display()
            )
        })?;
        let meta: AnalysisMeta = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not an analysis meta file; re-run `sae analyze`",
                meta_path.display()
            )
        })?;
        if meta.format_version != FORMAT_VERSION {
            bail!(
                "{}: format version {} but this build reads {FORMAT_VERSION}; re-run `sae analyze`",
                meta_path.display(),
                meta.format_version
            );
        }
        let vocab_path = dir.join(VOCAB_FILE);
        let vocab: Vec<String> = serde_json::from_slice(
            &std::fs::read(&vocab_path)
                .with_context(|| format!("reading {}", vocab_path.display()))?,
        )
        .with_context(|| format!("{}: not a JSON list of strings", vocab_path.display()))?;

        let lat_path = dir.join(LATENTS_FILE);
        let latents = read_table(&lat_path)?;
        let bad = |p: &Path, what: String| {
            anyhow::anyhow!(
                "{}: {what}; the analysis is damaged, re-run `sae analyze`",
                p.display()
            )
        };
        if latents.len() < LATENTS_HEADER || &latents[..8] != LATENTS_MAGIC {
            return Err(bad(&lat_path, "not a latents table".into()));
        }
        let (d_sae, bins, n_logits, record) = (
            le_u32(&latents, 8) as usize,
            le_u32(&latents, 12) as usize,
            le_u32(&latents, 16) as usize,
            le_u32(&latents, 20) as usize,
        );
        if d_sae != meta.d_sae || bins != meta.hist_bins || n_logits != meta.n_logits {
            return Err(bad(&lat_path, "header disagrees with meta.json".into()));
        }
        if record != record_size(bins, n_logits) || latents.len() != LATENTS_HEADER + d_sae * record
        {
            return Err(bad(
                &lat_path,
                format!(
                    "{} bytes, expected {}",
                    latents.len(),
                    LATENTS_HEADER + d_sae * record
                ),
            ));
        }

        let ex_path = dir.join(EXAMPLES_FILE);
        let examples = read_table(&ex_path)?;
        if examples.len() < EXAMPLES_HEADER || &examples[..8] != EXAMPLES_MAGIC {
            return Err(bad(&ex_path, "not an examples table".into()));
        }
        let window = le_u32(&examples, 8) as usize;
        if window != meta.left + 1 + meta.right {
            return Err(bad(&ex_path, "window disagrees with meta.json".into()));
        }
        let ex_size = EXAMPLE_FIXED + 8 * window;
        let body = examples.len() - EXAMPLES_HEADER;
        if !body.is_multiple_of(ex_size) {
            return Err(bad(
                &ex_path,
                format!("truncated ({} bytes)", examples.len()),
            ));
        }
        let n_examples = (body / ex_size) as u64;
        let a = Analysis {
            dir: dir.to_path_buf(),
            meta,
            vocab,
            latents,
            examples,
            record,
            window,
            n_examples,
        };
        for j in 0..d_sae {
            let at = LATENTS_HEADER + j * record;
            let start = le_u64(&a.latents, at + 24);
            let n = le_u32(&a.latents, at + 32) as u64 + le_u32(&a.latents, at + 36) as u64;
            if start.checked_add(n).is_none_or(|end| end > n_examples) {
                return Err(bad(
                    &ex_path,
                    format!("latent {j} points past the last example"),
                ));
            }
        }
        Ok(a)
    }

    pub fn d_sae(&self) -> usize {
        self.meta.d_sae
    }

    pub fn latent(&self, j: usize) -> Option<LatentRecord> {
        if j >= self.d_sae() {
            return None;
        }
        let b = &self.latents[LATENTS_HEADER + j * self.record..][..self.record];
        let bins = self.meta.hist_bins;
        let n_logits = self.meta.n_logits;
        let hist = (0..bins).map(|i| le_u32(b, FIXED_RECORD + 4 * i)).collect();
        let lo = FIXED_RECORD + 4 * bins;
        let pair = |k: usize| (le_u32(b, lo + 8 * k), le_f32(b, lo + 8 * k + 4));
        Some(LatentRecord {
            n_fired: le_u64(b, 0),
            sum_act: le_f64(b, 8),
            max_act: le_f32(b, 16),
            hist_hi: le_f32(b, 20),
            ex_start: le_u64(b, 24),
            n_top: le_u32(b, 32),
            n_random: le_u32(b, 36),
            hist,
            logits_top: (0..n_logits).map(pair).collect(),
            logits_bottom: (n_logits..2 * n_logits).map(pair).collect(),
        })
    }

    /// Firing frequency and max activation of a latent without decoding the whole record.
    pub fn quick_stats(&self, j: usize) -> (u64, f64, f32) {
        let b = &self.latents[LATENTS_HEADER + j * self.record..];
        (le_u64(b, 0), le_f64(b, 8), le_f32(b, 16))
    }

    /// (top examples, random examples) of a latent.
    pub fn examples(&self, rec: &LatentRecord) -> (Vec<Example>, Vec<Example>) {
        let read = |k: u64| self.example(rec.ex_start + k);
        let top = (0..rec.n_top as u64).map(read).collect();
        let random = (rec.n_top as u64..(rec.n_top + rec.n_random) as u64)
            .map(read)
            .collect();
        (top, random)
    }

    fn example(&self, k: u64) -> Example {
        debug_assert!(k < self.n_examples);
        let w = self.window;
        let size = EXAMPLE_FIXED + 8 * w;
        let b = &self.examples[EXAMPLES_HEADER + k as usize * size..][..size];
        let len = (le_u32(b, 16) as usize).min(w);
        Example {
            act: le_f32(b, 0),
            context: le_u32(b, 4),
            pos: le_u32(b, 8),
            center: le_u32(b, 12),
            tokens: (0..len).map(|i| le_u32(b, EXAMPLE_FIXED + 4 * i)).collect(),
            acts: (0..len)
                .map(|i| le_f32(b, EXAMPLE_FIXED + 4 * w + 4 * i))
                .collect(),
        }
    }

    /// Display text of a token id (a marker for ids outside the stored vocabulary).
    pub fn token_text(&self, id: u32) -> &str {
        self.vocab
            .get(id as usize)
            .map(|s| s.as_str())
            .unwrap_or("\u{fffd}")
    }
}
