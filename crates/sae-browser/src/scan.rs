//! The single pass over (tokens, sparse codes) that gathers per-latent statistics.
//!
//! Memory is bounded per latent: a top-k min-heap of the best contexts, a fixed-size
//! reservoir of random firings, and a fixed-size histogram. Each batch's CSR code is
//! transposed once (counting sort) so latents are updated independently and in parallel.

use crate::hist::GrowingHist;
use anyhow::{bail, Result};
use rayon::prelude::*;
use sae_core::SparseCode;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// What the scan keeps per latent.
#[derive(Clone, Debug, PartialEq)]
pub struct ScanConfig {
    /// Top-activating contexts kept per latent (at most one example per context).
    pub top_k: usize,
    /// Random firing examples kept in the reservoir per latent (uniform over firings).
    pub reservoir: usize,
    /// Of those, how many are stored, spread over the reservoir's activation quantiles.
    pub n_random: usize,
    /// Tokens shown before / after the example's token.
    pub left: usize,
    pub right: usize,
    pub hist_bins: usize,
    /// Leave position 0 (BOS, an attention sink with outlier activations) out of the stats.
    pub skip_first: bool,
    pub seed: u64,
}

impl Default for ScanConfig {
    fn default() -> Self {
        Self {
            top_k: 20,
            reservoir: 32,
            n_random: 10,
            left: 24,
            right: 8,
            hist_bins: 64,
            skip_first: true,
            seed: 0,
        }
    }
}

impl ScanConfig {
    pub fn window(&self) -> usize {
        self.left + 1 + self.right
    }

    fn check(&self) -> Result<()> {
        if self.hist_bins < 2 || !self.hist_bins.is_multiple_of(2) {
            bail!(
                "histogram bins must be even and >= 2 (got {})",
                self.hist_bins
            );
        }
        if self.n_random > self.reservoir {
            bail!(
                "n_random ({}) cannot exceed the reservoir size ({})",
                self.n_random,
                self.reservoir
            );
        }
        Ok(())
    }
}

/// One firing shown with its surrounding tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The latent's activation at the example token.
    pub act: f32,
    /// Global index of the context (in scan order) and the token's position in it.
    pub context: u32,
    pub pos: u32,
    /// Index of the example token inside `tokens`.
    pub center: u32,
    /// Token ids of the window around the example token (cut at the context's edges).
    pub tokens: Vec<u32>,
    /// The latent's activation at each window token (0 where it did not fire).
    pub acts: Vec<f32>,
}

/// Heap entry ordered so that `BinaryHeap` pops the weakest example first
/// (lowest activation; on ties the later context, so earlier contexts win).
struct Weakest(Example);

impl Weakest {
    fn key(&self) -> (f32, std::cmp::Reverse<(u32, u32)>) {
        (self.0.act, std::cmp::Reverse((self.0.context, self.0.pos)))
    }
}
impl PartialEq for Weakest {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Weakest {}
impl PartialOrd for Weakest {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Weakest {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, ra) = self.key();
        let (b, rb) = other.key();
        // Reversed: the max-heap's top is the weakest.
        b.total_cmp(&a).then(rb.cmp(&ra))
    }
}

/// Statistics of one latent while scanning.
struct LatentState {
    n_fired: u64,
    sum: f64,
    max: f32,
    hist: GrowingHist,
    top: BinaryHeap<Weakest>,
    reservoir: Vec<Example>,
}

/// Final statistics of one latent.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentSummary {
    pub n_fired: u64,
    pub sum_act: f64,
    pub max_act: f32,
    pub hist: GrowingHist,
    /// Strongest first.
    pub top: Vec<Example>,
    /// Spread over the activation range, strongest first.
    pub random: Vec<Example>,
}

/// Everything a scan produced, ready to be written (see `format`).
#[derive(Clone, Debug)]
pub struct ScanResult {
    pub config: ScanConfig,
    pub ctx: usize,
    pub n_contexts: u64,
    /// Tokens counted in the statistics (BOS positions excluded when `skip_first`).
    pub n_tokens: u64,
    pub latents: Vec<LatentSummary>,
}

/// The per-latent accumulator. Feed it batches of whole contexts in order.
pub struct Scanner {
    cfg: ScanConfig,
    ctx: usize,
    d_sae: usize,
    n_contexts: u64,
    n_tokens: u64,
    states: Vec<LatentState>,
    // Scratch for the per-batch transpose, reused.
    col_ptr: Vec<usize>,
    col_row: Vec<u32>,
    col_val: Vec<f32>,
}

impl Scanner {
    pub fn new(d_sae: usize, ctx: usize, cfg: ScanConfig) -> Result<Self> {
        cfg.check()?;
        if ctx == 0 {
            bail!("context length must be positive");
        }
        let states = (0..d_sae)
            .map(|_| LatentState {
                n_fired: 0,
                sum: 0.0,
                max: 0.0,
                hist: GrowingHist::new(cfg.hist_bins),
                top: BinaryHeap::with_capacity(cfg.top_k + 1),
                reservoir: Vec::new(),
            })
            .collect();
        Ok(Self {
            cfg,
            ctx,
            d_sae,
            n_contexts: 0,
            n_tokens: 0,
            states,
            col_ptr: Vec::new(),
            col_row: Vec::new(),
            col_val: Vec::new(),
        })
    }

    pub fn d_sae(&self) -> usize {
        self.d_sae
    }

    pub fn n_contexts(&self) -> u64 {
        self.n_contexts
    }

    /// Adds a batch: `tokens` is `[n_contexts, ctx]` and `code` has one row per token.
    pub fn add_batch(&mut self, tokens: &[u32], code: &SparseCode) -> Result<()> {
        let ctx = self.ctx;
        if !tokens.len().is_multiple_of(ctx) {
            bail!("{} tokens are not whole contexts of {ctx}", tokens.len());
        }
        if code.n_rows != tokens.len() || code.d_sae != self.d_sae {
            bail!(
                "sparse code is [{}, {}] but the batch has {} tokens and the scan {} latents",
                code.n_rows,
                code.d_sae,
                tokens.len(),
                self.d_sae
            );
        }
        if code.row_ptr.len() != code.n_rows + 1 || code.idx.len() != code.val.len() {
            bail!("malformed sparse code (row_ptr / idx / val lengths disagree)");
        }
        self.transpose(code)?;
        let n_ctx_batch = tokens.len() / ctx;
        let base_context = self.n_contexts;
        let counted_per_ctx = ctx - usize::from(self.cfg.skip_first);
        let cfg = &self.cfg;
        let (col_ptr, col_row, col_val) = (&self.col_ptr, &self.col_row, &self.col_val);
        self.states
            .par_iter_mut()
            .enumerate()
            .with_min_len(64)
            .for_each(|(j, st)| {
                let (a, b) = (col_ptr[j], col_ptr[j + 1]);
                if a < b {
                    let col = Column {
                        rows: &col_row[a..b],
                        vals: &col_val[a..b],
                    };
                    update_latent(st, j, &col, tokens, ctx, base_context, cfg);
                }
            });
        self.n_contexts += n_ctx_batch as u64;
        self.n_tokens += (n_ctx_batch * counted_per_ctx) as u64;
        Ok(())
    }

    /// CSR -> per-latent (row, value) lists in row order, checking the values.
    fn transpose(&mut self, code: &SparseCode) -> Result<()> {
        let d = self.d_sae;
        self.col_ptr.clear();
        self.col_ptr.resize(d + 1, 0);
        for &j in &code.idx {
            if j as usize >= d {
                bail!("sparse code names latent {j} but the SAE has {d}");
            }
            self.col_ptr[j as usize + 1] += 1;
        }
        for j in 0..d {
            self.col_ptr[j + 1] += self.col_ptr[j];
        }
        let nnz = code.idx.len();
        self.col_row.resize(nnz, 0);
        self.col_val.resize(nnz, 0.0);
        let mut fill = self.col_ptr[..d].to_vec();
        for r in 0..code.n_rows {
            let (idx, val) = code.row(r);
            for (&j, &v) in idx.iter().zip(val) {
                if !v.is_finite() {
                    bail!("the SAE produced a non-finite activation ({v}) for latent {j}; check the SAE weights and the model's activations");
                }
                let at = &mut fill[j as usize];
                self.col_row[*at] = r as u32;
                self.col_val[*at] = v;
                *at += 1;
            }
        }
        Ok(())
    }

    pub fn finish(self) -> ScanResult {
        let cfg = self.cfg.clone();
        let latents = self
            .states
            .into_par_iter()
            .map(|st| {
                let mut top: Vec<Example> = st.top.into_iter().map(|w| w.0).collect();
                top.sort_by(|a, b| {
                    b.act
                        .total_cmp(&a.act)
                        .then((a.context, a.pos).cmp(&(b.context, b.pos)))
                });
                LatentSummary {
                    n_fired: st.n_fired,
                    sum_act: st.sum,
                    max_act: st.max,
                    hist: st.hist,
                    top,
                    random: spread_over_quantiles(st.reservoir, cfg.n_random),
                }
            })
            .collect();
        ScanResult {
            config: self.cfg,
            ctx: self.ctx,
            n_contexts: self.n_contexts,
            n_tokens: self.n_tokens,
            latents,
        }
    }
}

/// One latent's firings in a batch, in row order.
struct Column<'a> {
    rows: &'a [u32],
    vals: &'a [f32],
}

impl Column<'_> {
    /// The example around batch row `row` (context `row / ctx` of the batch).
    fn example(
        &self,
        row: usize,
        act: f32,
        tokens: &[u32],
        ctx: usize,
        base_context: u64,
        cfg: &ScanConfig,
    ) -> Example {
        let c = row / ctx;
        let pos = row % ctx;
        let start = c * ctx + pos.saturating_sub(cfg.left);
        let end = c * ctx + (pos + cfg.right + 1).min(ctx);
        let mut acts = vec![0.0; end - start];
        let first = self.rows.partition_point(|&r| (r as usize) < start);
        for (&r, &v) in self.rows[first..].iter().zip(&self.vals[first..]) {
            if r as usize >= end {
                break;
            }
            acts[r as usize - start] = v;
        }
        Example {
            act,
            context: (base_context + c as u64) as u32,
            pos: pos as u32,
            center: (row - start) as u32,
            tokens: tokens[start..end].to_vec(),
            acts,
        }
    }
}

fn update_latent(
    st: &mut LatentState,
    latent: usize,
    col: &Column,
    tokens: &[u32],
    ctx: usize,
    base_context: u64,
    cfg: &ScanConfig,
) {
    // The strongest firing of the current context: offered to the top-k once per context.
    let mut best: Option<(usize, f32)> = None;
    let offer_top = |st: &mut LatentState, (row, act): (usize, f32)| {
        if cfg.top_k == 0 {
            return;
        }
        let beats_weakest = match st.top.peek() {
            _ if st.top.len() < cfg.top_k => true,
            Some(w) => {
                let ctx_id = base_context + (row / ctx) as u64;
                act > w.0.act || (act == w.0.act && ctx_id < w.0.context as u64)
            }
            None => true,
        };
        if beats_weakest {
            st.top.push(Weakest(col.example(
                row,
                act,
                tokens,
                ctx,
                base_context,
                cfg,
            )));
            if st.top.len() > cfg.top_k {
                st.top.pop();
            }
        }
    };
    for (&r, &v) in col.rows.iter().zip(col.vals) {
        let row = r as usize;
        if cfg.skip_first && row.is_multiple_of(ctx) {
            continue;
        }
        st.n_fired += 1;
        st.sum += v as f64;
        st.max = st.max.max(v);
        st.hist.add(v);
        // Algorithm R: the n-th firing replaces a random slot with probability R / n.
        if cfg.reservoir > 0 {
            let n = st.n_fired;
            if st.reservoir.len() < cfg.reservoir {
                let ex = col.example(row, v, tokens, ctx, base_context, cfg);
                st.reservoir.push(ex);
            } else {
                let slot = mix(cfg.seed, latent as u64, n) % n;
                if (slot as usize) < cfg.reservoir {
                    st.reservoir[slot as usize] =
                        col.example(row, v, tokens, ctx, base_context, cfg);
                }
            }
        }
        match best {
            Some((b, _)) if b / ctx != row / ctx => {
                offer_top(st, best.unwrap());
                best = Some((row, v));
            }
            Some((_, bv)) if v > bv => best = Some((row, v)),
            Some(_) => {}
            None => best = Some((row, v)),
        }
    }
    if let Some(b) = best {
        offer_top(st, b);
    }
}

/// `n` of the reservoir's examples at evenly spaced activation ranks, strongest first.
fn spread_over_quantiles(mut pool: Vec<Example>, n: usize) -> Vec<Example> {
    pool.sort_by(|a, b| {
        b.act
            .total_cmp(&a.act)
            .then((a.context, a.pos).cmp(&(b.context, b.pos)))
    });
    if pool.len() <= n {
        return pool;
    }
    let len = pool.len();
    let picks: Vec<usize> = (0..n).map(|i| (2 * i + 1) * len / (2 * n)).collect();
    let mut out = Vec::with_capacity(n);
    let mut pool: Vec<Option<Example>> = pool.into_iter().map(Some).collect();
    for p in picks {
        if let Some(e) = pool[p].take() {
            out.push(e);
        }
    }
    out
}

/// SplitMix64 of (seed, latent, counter): a reproducible random number per firing that does
/// not depend on how latents are spread over threads.
fn mix(seed: u64, latent: u64, n: u64) -> u64 {
    let mut z = seed
        .wrapping_add(latent.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(n.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
