//! The body of one training step, one method per phase over the reused `Buffers`:
//! `encode` and `screen` (`f32-screened`), `dense_penalty` and `add_pre_noise` (rules with a
//! dense penalty or training noise), `grad_scores` (rules that select with the input's loss
//! gradient), `prepare_selection` and `select`, `decode` (with `dense_entry_dots`),
//! `Buffers::transpose_entries`, `latent_pass` (gradients fused with Adam), `dense_params`.

use super::{noise, Mode, SaeTrainer, StepStats};
use crate::arch::{
    AfterStep, Arch, AuxMode, BatchInput, BatchRef, BatchSlot, DensePenalty, Entry, RowLists,
    RowOut, StepCtx, TopKScope,
};
use crate::kernels::{
    axpy, axpy2, axpy2_h, axpy2x4, axpy2x4_h, axpy4, axpy4_h, axpy_h, bounds_above, dot, dot2,
    dot2_h, dot4, dot4_axpy4, dot4_axpy4_h, dot_h, indices_above, indices_above_margin, matmul,
    matmul_tn, norm_and_bf16_error, prefetch_rows, round_to_bf16, score_floor, screen_bounds,
    split_by_lengths, MarginTerms, SharedMut,
};
use crate::optim::AdamStep;
use rayon::prelude::*;

/// BatchTopK inference threshold: bias-corrected EMA of each batch's selection threshold
/// (close to the paper's mean over batches early on, DL's EMA with beta 0.999 later).
pub(super) const THRESHOLD_EMA_BETA: f64 = 0.999;
/// Rows per task in the row passes and latents per task in the other per-latent passes (the
/// latent pass takes at least as many). Fixed sizes keep every reduction in a fixed order:
/// results are bit-for-bit reproducible for a thread count.
const ROW_CHUNK: usize = 16;
const LAT_CHUNK: usize = 32;
/// The latent pass takes its latents in tasks whose W_dec and W_enc gradient rows (f32) fill
/// about `LATENT_BLOCK_BYTES` (they stay in L2), and each task's entries one block of batch
/// rows at a time whose residual and input rows fill about `ROW_BLOCK_BYTES`, so that a row
/// one latent of the task gathers is often still cached when the task's other latents reach
/// it. At d_in 576 that is 128 latents and 1,024 rows: on the AMX Xeon (2 MB L2) the latent
/// pass at d_sae 9216, L0 200 took 10-15% less time than latent by latent (f32 and bf16
/// rows), and the same at L0 64; L2-sized row blocks (128-256 rows) were slower at L0 64.
/// The residual rows and the input rows are walked in two passes over the blocks, not side
/// by side: 17-21% off the pass at L0 200 there, 3-9% at L0 64.
const LATENT_BLOCK_BYTES: usize = 576 << 10;
const ROW_BLOCK_BYTES: usize = 4608 << 10;
/// Above this fraction of non-zero (token, latent) entries the step uses dense GEMMs for the
/// decode and the gradients (a handful of GEMMs beat the sparse passes there).
pub(super) const DENSE_FRACTION: f64 = 1.0 / 16.0;
/// Per-latent parameters an architecture may train (`EntryGrad::params`).
const MAX_LATENT_PARAMS: usize = 3;
/// The decode gathers decoder rows, and the screen (`f32-screened`) encoder rows, from at
/// most this many bytes of the matrix at a time (a larger one is taken in slices of
/// latents), each block of `GATHER_ROW_BLOCK` rows through every slice before the next
/// block: the block's rows and the slice's weight rows then both stay in L2. On the AMX Xeon
/// (2 MB L2; d_in 576, 4,096 rows) this took 24-39% off the decode at d_sae 9216, L0 200, and
/// up to a third at L0 64, against 8 MB slices each taken over the whole batch (which had
/// been 2.2x faster than one 21 MB pass on a 32 MB-L3 Zen 4); and 13-25% off the screen at
/// d_sae 4608 and 9216 against 12 MB slices.
const GATHER_SLICE_BYTES: usize = 2 << 20;
const GATHER_ROW_BLOCK: usize = 512;
/// The screen recomputes each entry it keeps as one gathered dot product; past this
/// fraction of the matrix those cost more than the f32 product saves (at d_in 576 on the
/// AVX-512 Zen 4 the two met near 1/21), and the step runs the f32 product instead.
const SCREEN_MAX_FRACTION: f64 = 1.0 / 25.0;
/// A batch top-k rule's screen first collects the entries that may score above this
/// fraction of the batch's first m rows' bound under their k*m-th f32 score: a guess under
/// the whole batch's bound, which it then finds among them (rows differ, so the first
/// rows' own bound is not one for the batch; when the guess proves too high the step runs
/// the f32 product). On SmolLM2 layer-15 batches the batch's bound was 0.91-1.05 of the
/// first 16 rows'.
const SCREEN_BATCH_GUESS: f32 = 0.75;

/// `dst[b, j] = scale * val[e]` for every entry (summing duplicates), zero elsewhere.
fn scatter_code(
    dst: &mut [f32],
    row_ptr: &[usize],
    idx: &[u32],
    val: &[f32],
    d_sae: usize,
    scale: f32,
) {
    dst.par_chunks_mut(d_sae).enumerate().for_each(|(b, row)| {
        row.fill(0.0);
        for e in row_ptr[b]..row_ptr[b + 1] {
            row[idx[e] as usize] += scale * val[e];
        }
    });
}

/// Reconstruction head widths: nested prefixes of the dictionary, ascending, the last one the
/// whole dictionary (a single head for families without prefixes).
/// How many entries ahead the sparse passes prefetch the rows they will gather: one row's
/// arithmetic is far shorter than a load from L3 or memory.
const PREFETCH_AHEAD: usize = 4;

/// `dst = bf16(src)`, in parallel blocks of `d`-long rows.
fn round_rows(src: &[f32], dst: &mut Vec<u16>, d: usize) {
    dst.resize(src.len(), 0);
    let block = d.max(1) * ROW_CHUNK;
    dst.par_chunks_mut(block)
        .zip(src.par_chunks(block))
        .for_each(|(h, f)| round_to_bf16(f, h));
}

fn head_widths(arch: &dyn Arch, d_sae: usize) -> Vec<usize> {
    match arch.heads() {
        [] => vec![d_sae],
        w => w.to_vec(),
    }
}

/// The band of latent `j`: band q holds `widths[q-1] <= j < widths[q]`.
fn band_of(widths: &[usize], j: usize) -> usize {
    widths.partition_point(|&w| w <= j)
}

/// Per-step buffers, reused across steps.
#[derive(Default)]
pub(super) struct Buffers {
    xc: Vec<f32>,
    pre: Vec<f32>,
    chunks: Vec<ChunkOut>,
    row_ptr: Vec<usize>,
    idx: Vec<u32>,
    f: Vec<f32>,
    a: Vec<f32>,
    pre_e: Vec<f32>,
    row_of: Vec<u32>,
    resid: Vec<f32>,
    aux: Vec<f32>,
    chunk_stats: Vec<RowStats>,
    lat_ptr: Vec<usize>,
    lat_ent: Vec<LatEntry>,
    /// Per entry in row order, `[d_j . r_b, d_j . r_aux_b]`: both from the dense path's
    /// GEMMs; on the sparse path the decode gives the aux one (both with the frozen
    /// decoder's aux, `Backward::decode_dots`), and otherwise the latent pass takes
    /// `d_j . r_b` itself.
    dots: Vec<[f32; 2]>,
    /// Dense-mode buffers: a second `[n, d_sae]` matrix and the W_enc / W_dec gradients.
    dense2: Vec<f32>,
    genc: Vec<f32>,
    gdec: Vec<f32>,
    lat_fill: Vec<usize>,
    /// Per row chunk, the decode's entries (an unsliced decoder).
    chunk_ents: Vec<Vec<u32>>,
    /// Per block of rows, the decode's entries by slice (a sliced decoder).
    decode_blocks: Vec<SliceEntries>,
    /// `GATHER_SLICE_BYTES` when 0; tests set a small budget to slice small matrices.
    pub(super) gather_slice_bytes: usize,
    /// `GATHER_ROW_BLOCK` when 0 (tests take small blocks).
    pub(super) gather_row_block: usize,
    /// Latents per latent-pass task and batch rows per block of its entries, both; from
    /// `latent_blocks` when 0 (tests take small blocks).
    pub(super) latent_block: usize,
    bdec_part: Vec<f32>,
    dead: Vec<u32>,
    cutoff: Vec<f32>,
    /// The rule's state from `Arch::prepare_batch` (the trainer never reads it).
    batch: BatchSlot,
    gparams: Vec<Vec<f32>>,
    /// Dense penalty (empty without one): its gradient w.r.t. every pre-activation, batch
    /// mean included (`[n, d_sae]`), per row chunk its value, per latent its column sum,
    /// and on the sparse path its W_enc gradient (`[d_sae, d_in]`).
    gpen: Vec<f32>,
    pen_parts: Vec<f64>,
    pen_colsum: Vec<f32>,
    pen_genc: Vec<f32>,
    /// The f32 products' packed copy of W_enc^T or W_dec, where this CPU's path uses one.
    xt_f32: crate::f32_product::TransposedF32,
    /// The bf16 copy of W_enc (`Precision::bf16_encoder`).
    enc_bf16: crate::bf16::EncoderBf16,
    /// `Precision::bf16_sparse` (empty otherwise): bf16 copies of W_dec, of `xc` and of
    /// `resid`, which the sparse passes gather instead of the f32 rows.
    w_dec_h: Vec<u16>,
    xc_h: Vec<u16>,
    resid_h: Vec<u16>,
    /// Rules that select with the input's loss gradient (empty otherwise): `G W_dec^T`,
    /// `[n, d_sae]`.
    grad_scores: Vec<f32>,
    /// `Precision::F32Screened` with a rule that allows it: this step's `pre` is a bf16
    /// product until `screen` refines it.
    screening: bool,
    /// The screen's cutoffs and norms of this step (`screen_prepare`).
    screen: ScreenInputs,
    /// Per row chunk: the row's lowered cutoffs and the entries to recompute.
    screen_tasks: Vec<ScreenTask>,
    /// Entries recomputed in f32 by the last screened step.
    pub(super) screen_refined: usize,
    /// Those entries' latents and values, row by row, for selection.
    screen_lists: ScreenLists,
    /// `SCREEN_MAX_FRACTION` when 0; tests raise it to screen dense codes.
    pub(super) screen_max_fraction: f64,
    /// `SCREEN_BATCH_GUESS` when 0; tests raise it past the batch's threshold.
    pub(super) screen_batch_guess: f32,
    /// Screens whose guess at a batch top-k threshold proved too high (the step then ran
    /// the f32 product).
    pub(super) screen_misses: u64,
    /// Whether this CPU runs bf16 products faster than f32 (AVX512-BF16, AMX). Without
    /// them the screen's bf16 product is the widened one, slower than the f32 product it
    /// would save (0.60-0.67x on AVX2), so `F32Screened` runs the f32 product; tests set it
    /// to run the screen on the widened product.
    pub(super) bf16_units: bool,
    /// One core's L2 (`usize::MAX` where unknown), for `decode_slices`.
    pub(super) l2_bytes: usize,
}

#[derive(Default)]
struct ScreenTask {
    scan: ScanScratch,
    /// Entries to recompute, row after row (each row's ascending), where each row's end, and
    /// (sliced refine) where each row's not yet recomputed ones start.
    idx: Vec<u32>,
    ends: Vec<usize>,
    at: Vec<usize>,
    refined: usize,
    /// Beside `idx`, each entry's value: f32 once recomputed (a batch top-k screen's first
    /// collection holds the bf16 ones). Such a screen's histogram of the bounds under the
    /// f32 scores of that collection (`score_floor`, `ScoreBuckets`), and each row's margin
    /// terms.
    vals: Vec<f32>,
    hist: Vec<u32>,
    terms: Vec<(f32, f32, f32)>,
}

/// The screen's test, per row: which entries of the bf16 product may pass the cutoff.
struct ScreenBounds<'a> {
    margin: crate::bf16::ScreenMargin,
    /// The cutoffs lowered below their rounding, and as the rule gave them.
    cut: &'a [f32],
    cut_raw: &'a [f32],
    wn: &'a [f32],
    ew: &'a [f32],
    /// The largest `|cut_raw|`, `ew` and `wn` (`ScreenInputs::largest`).
    largest: (f32, f32, f32),
    /// `Arch::screen_top_k`, and the latents it does not raise (AuxK's dead ones, also as
    /// a mask over all latents).
    top_k: Option<TopKScope>,
    dead: &'a [u32],
    dead_mask: &'a [bool],
    /// `ScreenInputs::batch_raise`.
    batch_raise: f32,
}

/// The screen's recomputed entries of every row (`RowLists`).
#[derive(Default)]
struct ScreenLists {
    ptr: Vec<usize>,
    idx: Vec<u32>,
    val: Vec<f32>,
}

/// What `screen_prepare` leaves for the screen.
#[derive(Clone, Default)]
struct ScreenInputs {
    /// The rule's cutoffs, lowered below their own rounding, and as it gave them.
    cut: Vec<f32>,
    cut_raw: Vec<f32>,
    /// W_enc's row norms and the norms of their bf16 rounding errors.
    wn: Vec<f32>,
    ew: Vec<f32>,
    /// The largest `|cut_raw|`, `ew` and `wn`, which bound every latent's margin in a row
    /// (NaN when any is).
    largest: (f32, f32, f32),
    /// `TopKScope::Batch`: the first scan raises every cutoff but the AuxK latents' by this
    /// guess under the batch's k*n-th score (`screen_pays`; `screen` then finds a bound).
    batch_raise: f32,
    /// AuxK's dead latents as a mask (empty when there are none).
    dead_mask: Vec<bool>,
}

/// One task's scratch for `ScreenBounds::scan`.
#[derive(Default)]
struct ScanScratch {
    lo: Vec<f32>,
    /// A top-k row's entries scoring above `floor`, their bounds under their f32 scores (as
    /// ordered bits, `kernels::bounds_above`), and the AuxK latents below it that pass.
    above: Vec<u32>,
    keys: Vec<u32>,
    dead_below: Vec<u32>,
    /// A guess under the next row's k-th score (the last row's, less a quarter).
    floor: f32,
}

impl<'a> ScreenBounds<'a> {
    /// The test over this step's norms, cutoffs and AuxK latents (`screen_prepare`).
    fn new(
        d_in: usize,
        top_k: Option<TopKScope>,
        inputs: &'a ScreenInputs,
        dead: &'a [u32],
    ) -> Self {
        ScreenBounds {
            margin: crate::bf16::ScreenMargin::new(d_in),
            cut: &inputs.cut,
            cut_raw: &inputs.cut_raw,
            wn: &inputs.wn,
            ew: &inputs.ew,
            largest: inputs.largest,
            top_k,
            dead,
            dead_mask: &inputs.dead_mask,
            batch_raise: inputs.batch_raise,
        }
    }

    /// Appends to `idx` the latents whose bf16 value in `row` lies above the cutoff less
    /// the margin of (x, that latent). Returns the row's margin terms (`ScreenMargin::row`).
    fn scan(
        &self,
        x: &[f32],
        row: &[f32],
        s: &mut ScanScratch,
        idx: &mut Vec<u32>,
    ) -> (f32, f32, f32) {
        let (nx, ex) = norm_and_bf16_error(x);
        let terms = self.margin.row(nx, ex);
        let (p, q, c) = terms;
        s.lo.resize(self.cut.len(), 0.0);
        let raise = match self.top_k {
            Some(TopKScope::Row(k)) if k > 0 && k <= row.len() => {
                // Only the k largest `pre - cut` of the row are selected.
                let floor = s.floor;
                let theta = self.kth_floor(k, row, terms, s);
                s.floor = theta - 0.25 * theta.abs();
                if self.filter_above(k, floor, theta, row, terms, s, idx) {
                    return terms;
                }
                theta
            }
            Some(TopKScope::Batch(_)) => self.batch_raise,
            _ => 0.0,
        };
        let margins = self.margins((p, q, raised(c, raise)));
        if raise == 0.0 || self.dead.is_empty() {
            // The cutoffs computed in registers, not written out.
            indices_above_margin(row, self.cut, margins, idx);
            return terms;
        }
        screen_bounds(self.cut, self.ew, self.wn, p, q, margins.c, &mut s.lo);
        let own = self.margins(terms);
        for &j in self.dead {
            let j = j as usize;
            s.lo[j] = own.lowered(self.cut[j], j);
        }
        indices_above(row, &s.lo, idx);
        terms
    }

    /// When the entries `kth_floor` took the k-th among (`s.above`: those scoring above
    /// `floor`) hold every entry that can pass the cutoffs raised by `theta`: appends those
    /// that pass, and the AuxK latents below `floor` that pass their own cutoffs, to `idx` in
    /// order of latent, as the test over the whole row would, and returns true.
    ///
    /// An entry below the floor has `pre - cut_raw <= floor`, and the raised test asks
    /// `pre > cut + theta - margin` (to rounding), so none passes when `theta - floor`
    /// exceeds the largest margin of the row by more than those roundings: `cut` lies
    /// `2^-20 |cut_raw|` under `cut_raw`, `raised` takes `2^-20 |theta|` off, and the few
    /// operations of each side round by `2^-24` of their largest term; `2^-16` of the sum of
    /// every term covers them all.
    #[allow(clippy::too_many_arguments)]
    fn filter_above(
        &self,
        k: usize,
        floor: f32,
        theta: f32,
        row: &[f32],
        terms: (f32, f32, f32),
        s: &mut ScanScratch,
        idx: &mut Vec<u32>,
    ) -> bool {
        // With many AuxK latents (early in training, or a short dead window) their scalar
        // tests cost more than the whole row's vector pass.
        if s.above.len() < k || self.dead.len() > row.len() / 16 {
            return false;
        }
        let (p, q, c) = terms;
        let (cut_max, ew_max, wn_max) = self.largest;
        let (pe, qw) = (p.abs() * ew_max, q.abs() * wn_max);
        let terms_sum = cut_max + theta.abs() + floor.abs() + pe + qw + c.abs();
        // False for NaN as well.
        let holds = theta - floor - (pe + qw + c) >= terms_sum * 2f32.powi(-16);
        if !holds {
            return false;
        }
        // Without branches on the tests: a third or so of the entries pass, at random.
        let start = idx.len();
        idx.resize(start + s.above.len(), 0);
        let mut len = start;
        for &j in &s.above {
            idx[len] = j;
            len += self.passes(j as usize, row[j as usize], terms, theta) as usize;
        }
        idx.truncate(len);
        s.dead_below.clear();
        for &j in self.dead {
            let jj = j as usize;
            // Not among `above` (the difference `bounds_above` compared), and passing.
            let above = row[jj] - self.cut_raw[jj] > floor;
            if !above && self.passes(jj, row[jj], terms, theta) {
                s.dead_below.push(j);
            }
        }
        if !s.dead_below.is_empty() {
            idx.extend_from_slice(&s.dead_below);
            idx[start..].sort_unstable();
        }
        true
    }

    /// The margins of a row with margin terms `(p, q, c)`.
    fn margins(&self, (p, q, c): (f32, f32, f32)) -> MarginTerms<'a> {
        MarginTerms {
            ew: self.ew,
            wn: self.wn,
            p,
            q,
            c,
        }
    }

    /// Latent `j`'s margin in a row with margin terms `terms`.
    fn margin_of(&self, j: usize, terms: (f32, f32, f32)) -> f32 {
        self.margins(terms).margin(j)
    }

    /// `scan`'s test for one entry: whether latent `j`'s bf16 value `v` lies above its
    /// cutoff raised by `raise` (not for AuxK's latents) less its margin.
    fn passes(&self, j: usize, v: f32, (p, q, c): (f32, f32, f32), raise: f32) -> bool {
        let c = match self.dead_mask.get(j) {
            Some(true) => c,
            _ => raised(c, raise),
        };
        v > self.margins((p, q, c)).lowered(self.cut[j], j)
    }

    /// A value under the row's k-th largest f32 score: the k-th largest of the entries'
    /// bounds under their own f32 scores (`score_floor` of each bf16 score `row[j] -
    /// cut_raw[j]` and that entry's margin), each of the k largest being under its entry's
    /// f32 score. Taken among the entries scoring above `s.floor` when at least k do (a
    /// subset's k-th is under the whole row's, which only makes the screen recompute more),
    /// which it leaves in `s.above`, else among all (`s.above` then left empty).
    fn kth_floor(&self, k: usize, row: &[f32], terms: (f32, f32, f32), s: &mut ScanScratch) -> f32 {
        let margins = self.margins(terms);
        s.above.clear();
        s.keys.clear();
        if s.floor.is_finite() {
            bounds_above(
                row,
                self.cut_raw,
                margins,
                s.floor,
                &mut s.above,
                &mut s.keys,
            );
        }
        if s.above.len() < k {
            // Every entry; those left out (NaN or -inf scores) have bounds of 0.
            s.above.clear();
            s.keys.clear();
            let all = f32::NEG_INFINITY;
            bounds_above(row, self.cut_raw, margins, all, &mut s.above, &mut s.keys);
            s.above.clear();
            if s.keys.len() < k {
                return 0.0;
            }
        }
        let at = s.keys.len() - k;
        let (_, kth, _) = s.keys.select_nth_unstable(at);
        f32::from_bits(*kth)
    }
}

/// The screen's lists of this step when it screened.
fn screened_rows(screening: bool, lists: &ScreenLists) -> Option<RowLists<'_>> {
    screening.then_some(RowLists {
        ptr: &lists.ptr,
        idx: &lists.idx,
        val: &lists.val,
    })
}

/// A margin term `c` with the cutoffs raised by `raise`: `c - raise`, lowered below its own
/// rounding.
fn raised(c: f32, raise: f32) -> f32 {
    c - raise + raise * 2f32.powi(-20)
}

/// Buckets of a batch top-k screen's score histogram: one per step of the top 16 bits of
/// a positive f32 (1/128 of an octave), from the one holding the first guess up; higher
/// scores share the last.
const SCORE_BUCKETS: usize = 2048;

/// The buckets of scores from `lowest` up (`SCORE_BUCKETS` of them).
#[derive(Clone, Copy)]
struct ScoreBuckets {
    base: u32,
}

impl ScoreBuckets {
    fn from(lowest: f32) -> Self {
        ScoreBuckets {
            base: lowest.max(f32::MIN_POSITIVE).to_bits() >> 16,
        }
    }
    /// The bucket of a score, if it is in the range (NaN is not).
    fn of(self, score: f32) -> Option<usize> {
        let top = score.to_bits() >> 16;
        match score > 0.0 && top >= self.base {
            true => Some(((top - self.base) as usize).min(SCORE_BUCKETS - 1)),
            false => None,
        }
    }
    /// The smallest score in bucket `b`.
    fn floor(self, b: usize) -> f32 {
        f32::from_bits((self.base + b as u32) << 16)
    }
}

/// After a batch top-k screen's first scan: a bound under the batch's `want`-th largest f32
/// score, the floor of the highest histogram bucket with `want` bounds at or above it (each
/// entry's bound under its own f32 score: its bf16 score less its margin), or
/// 0 when fewer than `want` reached the histogram. The histograms hold the bounds above the
/// guess the scan used, so the result is one only when it is at least that guess.
fn batch_bound(tasks: &[ScreenTask], buckets: ScoreBuckets, want: usize) -> f32 {
    let mut above = 0usize;
    for b in (0..SCORE_BUCKETS).rev() {
        above += tasks.iter().map(|t| t.hist[b] as usize).sum::<usize>();
        if want > 0 && above >= want {
            return buckets.floor(b);
        }
    }
    0.0
}

/// `x . w_j` (`kernels::dot`'s bits) for each latent `j` in `js` into `vals` beside `js`,
/// and into `row[j]` when given, four at a time, fetching the next four rows of W_enc^T while
/// these sum. Selection reads `vals` (`RowLists`); `row` is written where it is still in
/// cache (a row refined right after its scan), for any later reader of `pre`.
fn refine_row(
    x: &[f32],
    w_t: &[f32],
    d_in: usize,
    js: &[u32],
    mut row: Option<&mut [f32]>,
    vals: &mut [f32],
) {
    let at = |group: &[u32]| -> [usize; 4] {
        std::array::from_fn(|q| group.get(q).map_or(0, |&j| j as usize * d_in))
    };
    for (g, group) in js.chunks(4).enumerate() {
        for &j in js.iter().skip(4 * (g + 1)).take(4) {
            prefetch_rows(w_t, j as usize * d_in, d_in);
        }
        let dots = dot4(x, at(group).map(|r| &w_t[r..r + d_in]));
        for (q, (&j, v)) in group.iter().zip(dots).enumerate() {
            if let Some(row) = row.as_deref_mut() {
                row[j as usize] = v;
            }
            vals[4 * g + q] = v;
        }
    }
}

/// An entry as the latent pass reads it (sorted by latent).
#[derive(Clone, Copy, Default)]
struct LatEntry {
    row: u32,
    f: f32,
    a: f32,
    pre: f32,
    /// `d_j . r_b` and `d_j . r_aux_b`, before the loss scales. Without
    /// `Backward::decode_dots`, `dot_r` is 0 here: the latent pass takes it beside its own
    /// reads of `r_b`.
    dot_r: f32,
    dot_a: f32,
}

#[derive(Default)]
struct ChunkOut {
    out: RowOut,
    row_len: Vec<usize>,
}

#[derive(Clone, Default)]
struct RowStats {
    /// Squared error of the whole dictionary's reconstruction, and of the other heads'.
    err2: f64,
    heads2: f64,
    aux2: f64,
    x2: f64,
    l0: u64,
    /// Sums over rows of the b_dec-gradient residual (all heads) and of the whole
    /// dictionary's residual.
    resid_sum: Vec<f64>,
    full_sum: Vec<f64>,
    x_sum: Vec<f64>,
}

/// The batch-wide inputs of selection besides the rule's own state (in `Buffers::batch`).
#[derive(Clone, Copy)]
struct BatchSelection {
    /// `Buffers::cutoff` holds the family's per-latent prefilter bounds.
    cutoff: bool,
}

/// What selection leaves besides the entries (those are in `Buffers`, as CSR).
struct Selected {
    /// Entries in the batch.
    total: usize,
    /// Unweighted sparsity penalty summed over the batch.
    sparsity_sum: f64,
    /// The dense penalty (with its coefficient) summed over the batch.
    penalty_sum: f64,
}

/// The loss of the batch and what the gradient phases need from the decode.
struct Decoded {
    /// The decode ran (and the gradients run) as GEMMs on dense copies of the code.
    dense: bool,
    stats: StepStats,
    /// Loss derivative per unit of residual, and per unit of aux residual.
    resid_scale: f32,
    aux_scale: f32,
    /// Sum over rows of the b_dec-gradient residual (all heads).
    resid_sum: Vec<f64>,
}

/// What the gradient phases (the latent pass and the dense parameters) share.
#[derive(Clone, Copy)]
struct Backward {
    n: usize,
    sparsity_coeff: f32,
    resid_scale: f32,
    aux_scale: f32,
    /// AuxK's reconstruction trains the decoder rows (a dead latent fires in it).
    aux_trains_dec: bool,
    dense: bool,
    /// The decode (or the dense path's GEMMs) gave every entry's `d_j . r_b`; otherwise the
    /// latent pass takes it.
    decode_dots: bool,
    /// Adam's constants for step `t` when applying; None when collecting gradients.
    adam: Option<AdamStep>,
    t: u64,
}

impl SaeTrainer {
    /// One step on `n` rows of `x`: applied with Adam, or its gradients collected. Each phase
    /// below leaves its results in `self.buf` for the next.
    pub(super) fn run(
        &mut self,
        x: &[f32],
        grad: Option<&[f32]>,
        n: usize,
        sparsity_coeff: f32,
        mode: Mode,
    ) -> StepStats {
        assert_eq!(
            x.len(),
            n * self.d_in,
            "step: x has {} values, expected n * d_in",
            x.len()
        );
        if n == 0 {
            return StepStats::default();
        }
        let mut prof = Profiler::new();
        self.encode(x, n);
        prof.lap("gemm");
        if self.buf.screening {
            self.screen(n);
            prof.lap("screen");
            if prof.on {
                let per_row = self.buf.screen_refined as f64 / n as f64;
                let missed = match self.buf.screening {
                    true => "",
                    false => "; the batch threshold's guess was too high, so the f32 product",
                };
                eprintln!("screen: {per_row:.1} entries per row recomputed in f32{missed}");
            }
        }
        // The penalty reads the pre-activations before the noise is added to them.
        let penalty_sum = self.dense_penalty(n);
        self.add_pre_noise(n);
        prof.lap("penalty+noise");
        self.grad_scores(grad, n);
        prof.lap("grad scores");
        let batch = self.prepare_selection(n);
        prof.lap("prep");
        let mut sel = self.select(n, sparsity_coeff, batch);
        sel.penalty_sum = penalty_sum;
        prof.lap("select");
        let dec = self.decode(x, n, sparsity_coeff, &sel);
        if !dec.stats.loss.is_finite() {
            // Nothing changes: the caller stops and keeps its last checkpoint.
            return StepStats {
                dead_latents: self.count_dead(),
                ..dec.stats
            };
        }
        if dec.dense {
            self.dense_entry_dots(n, dec.aux_scale);
        }
        prof.lap("decode");
        self.buf.transpose_entries(self.d_sae);
        prof.lap("transpose");
        let t = self.steps + 1;
        let bw = Backward {
            n,
            sparsity_coeff,
            resid_scale: dec.resid_scale,
            aux_scale: dec.aux_scale,
            aux_trains_dec: self.arch.aux_mode() == AuxMode::AuxK && dec.aux_scale != 0.0,
            dense: dec.dense,
            decode_dots: dec.dense || self.arch.aux_mode() == AuxMode::FrozenDecoder,
            adam: match &mode {
                Mode::Apply(lr) => Some(AdamStep::new(
                    *lr,
                    self.hyper.adam_beta1,
                    self.hyper.adam_beta2,
                    self.hyper.adam_eps,
                    t,
                )),
                Mode::Collect(_) => None,
            },
            t,
        };
        if bw.dense {
            self.dense_gradients(
                n,
                sparsity_coeff,
                bw.resid_scale,
                bw.aux_scale,
                bw.aux_trains_dec,
            );
        } else if !self.buf.gpen.is_empty() {
            // The dense penalty's W_enc gradient: the one product its dense gradient forces
            // (the dense path folds it into its own encoder product instead).
            let buf = &mut self.buf;
            buf.pen_genc.resize(self.d_sae * self.d_in, 0.0);
            matmul_tn(
                &buf.gpen,
                n,
                self.d_sae,
                &buf.xc,
                self.d_in,
                &mut buf.pen_genc,
                false,
            );
        }
        let mut mode = mode;
        self.latent_pass(&bw, &mut mode);
        prof.lap("latent");
        self.dense_params(&bw, &dec.resid_sum, mode);
        prof.lap("dense");
        prof.report();
        StepStats {
            dead_latents: self.count_dead(),
            ..dec.stats
        }
    }

    /// Phase 1: centre (`xc = x - b_dec`, or `x` where the family does not) and the one dense
    /// product `pre = xc W_enc`.
    fn encode(&mut self, x: &[f32], n: usize) {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let buf = &mut self.buf;
        buf.xc.resize(n * d_in, 0.0);
        if self.apply_b_dec_to_input {
            let b_dec = &self.b_dec;
            buf.xc
                .par_chunks_mut(d_in * ROW_CHUNK)
                .zip(x.par_chunks(d_in * ROW_CHUNK))
                .for_each(|(dst, src)| {
                    for (dr, sr) in dst.chunks_mut(d_in).zip(src.chunks(d_in)) {
                        for ((d, s), b) in dr.iter_mut().zip(sr).zip(b_dec) {
                            *d = s - b;
                        }
                    }
                });
        } else {
            buf.xc.copy_from_slice(x);
        }
        buf.pre.resize(n * d_sae, 0.0);
        buf.screening = self.hyper.precision.screened()
            && buf.bf16_units
            && self.arch.screen_cutoff(&self.params, &mut buf.screen.cut);
        if buf.screening {
            self.screen_prepare();
            let buf = &mut self.buf;
            buf.enc_bf16.refresh(&self.w_enc_t, d_in, d_sae);
            let m = n.min(ROW_CHUNK);
            buf.enc_bf16
                .product(&buf.xc[..m * d_in], m, &mut buf.pre[..m * d_sae]);
            let pays = self.screen_pays(m);
            self.buf.screening = pays;
        }
        let buf = &mut self.buf;
        let w = &self.w_enc_t;
        match (self.hyper.precision.bf16_encoder(), buf.screening) {
            (false, false) => buf
                .xt_f32
                .matmul_xt(&buf.xc, n, d_in, w, d_sae, &mut buf.pre),
            (true, _) => buf
                .enc_bf16
                .matmul_xt(&buf.xc, n, d_in, w, d_sae, &mut buf.pre),
            (false, true) => buf.enc_bf16.product(&buf.xc, n, &mut buf.pre),
        }
        if self.hyper.precision.bf16_sparse() {
            // Taken after the previous step's updates (and any resampling or load since).
            round_rows(&self.w_dec, &mut buf.w_dec_h, d_in);
            round_rows(&buf.xc, &mut buf.xc_h, d_in);
        } else {
            buf.w_dec_h.clear();
            buf.xc_h.clear();
        }
    }

    /// `Precision::F32Screened`: W_enc's row norms and the norms of their bf16 rounding
    /// errors, and the rule's cutoffs lowered below their own rounding.
    fn screen_prepare(&mut self) {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let buf = &mut self.buf;
        let w = &self.w_enc_t;
        let ScreenInputs { wn, ew, .. } = &mut buf.screen;
        wn.resize(d_sae, 0.0);
        ew.resize(d_sae, 0.0);
        wn.par_chunks_mut(LAT_CHUNK)
            .zip(ew.par_chunks_mut(LAT_CHUNK))
            .enumerate()
            .for_each(|(c, (norms, errs))| {
                for (l, (nw, ew)) in norms.iter_mut().zip(errs).enumerate() {
                    let r = &w[(c * LAT_CHUNK + l) * d_in..][..d_in];
                    (*nw, *ew) = norm_and_bf16_error(r);
                }
            });
        // `cut - margin` in f32 can round up by half an ulp of `cut`; lowering the cutoffs
        // by far more than that keeps every comparison on the safe side.
        buf.screen.cut_raw.clone_from(&buf.screen.cut);
        buf.screen.batch_raise = 0.0;
        for c in buf.screen.cut.iter_mut() {
            *c -= c.abs() * 2f32.powi(-20);
        }
        // NaN stays once met: no bound then holds.
        let largest = |v: &[f32]| {
            v.iter().fold(0.0f32, |m, &x| {
                if x.is_nan() || x.abs() > m {
                    x.abs()
                } else {
                    m
                }
            })
        };
        buf.screen.largest = (
            largest(&buf.screen.cut_raw),
            largest(&buf.screen.ew),
            largest(&buf.screen.wn),
        );
        // A top-k rule raises the cutoffs of all but the AuxK latents (as `prepare_selection`
        // will find them).
        buf.dead.clear();
        if self.arch.aux_mode() == AuxMode::AuxK {
            self.arch
                .aux_latents(&self.tokens_since_fired, &self.hyper, &mut buf.dead);
        }
        let mask = &mut buf.screen.dead_mask;
        mask.clear();
        if !buf.dead.is_empty() {
            mask.resize(d_sae, false);
            buf.dead.iter().for_each(|&j| mask[j as usize] = true);
        }
    }

    /// Whether screening pays this step, judged on the batch's first `ROW_CHUNK` rows (their
    /// bf16 product in `pre`): past `SCREEN_MAX_FRACTION` of the entries recomputed, the f32
    /// product is cheaper. Decided from the batch alone, so a resumed run decides the same.
    /// A batch top-k rule's first guess (`ScreenInputs::batch_raise`) comes from these rows.
    fn screen_pays(&mut self, m: usize) -> bool {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let buf = &mut self.buf;
        // The first task's buffers, which the screen itself reuses next.
        if buf.screen_tasks.is_empty() {
            buf.screen_tasks.push(ScreenTask::default());
        }
        let task = &mut buf.screen_tasks[0];
        task.idx.clear();
        let top_k = self.arch.screen_top_k();
        let rows = buf.pre[..m * d_sae].chunks(d_sae).zip(buf.xc.chunks(d_in));
        let mut guess = 0.0;
        if let Some(TopKScope::Batch(k)) = top_k {
            // These rows' bound under their k*m-th largest f32 score (as `batch_bound` bounds
            // the batch's) tests them as the batch's will test the batch; a fraction of it is
            // the screen's first guess.
            let bounds = ScreenBounds::new(d_in, top_k, &buf.screen, &buf.dead);
            let under = &mut task.vals;
            under.clear();
            for (row, x) in rows.clone() {
                let (nx, ex) = norm_and_bf16_error(x);
                let terms = bounds.margin.row(nx, ex);
                let sums = row.iter().zip(bounds.cut_raw).map(|(v, c)| v - c);
                let floors = sums
                    .enumerate()
                    .map(|(j, s)| score_floor(s, bounds.margin_of(j, terms)));
                under.extend(floors.filter(|&u| u > 0.0));
            }
            let want = k * m;
            buf.screen.batch_raise = 0.0;
            if want > 0 && under.len() >= want {
                let (_, kth, _) = under.select_nth_unstable_by(want - 1, |a, b| b.total_cmp(a));
                let fraction = match buf.screen_batch_guess {
                    0.0 => SCREEN_BATCH_GUESS,
                    g => g,
                };
                if kth.is_finite() {
                    buf.screen.batch_raise = *kth;
                    guess = *kth * fraction;
                }
            }
        }
        let bounds = ScreenBounds::new(d_in, top_k, &buf.screen, &buf.dead);
        for (row, x) in rows {
            bounds.scan(x, row, &mut task.scan, &mut task.idx);
        }
        let refined = task.idx.len();
        buf.screen.batch_raise = guess;
        let most = match buf.screen_max_fraction {
            0.0 => SCREEN_MAX_FRACTION,
            f => f,
        };
        (refined as f64) <= most * (m * d_sae) as f64
    }

    /// Phase 1a (`Precision::F32Screened`): `pre` holds the bf16 product, within
    /// `ScreenMargin` of the f32 dot product of each (row, latent). Every entry whose bf16
    /// value is within that margin of passing the rule's cutoff is recomputed as the f32 dot
    /// product; the others lie at or below the cutoff in f32 as well, and no phase reads
    /// them. So selection and the gradients see the f32 values of the f32 selection.
    ///
    /// A batch top-k rule's cutoff is raised by a bound under the batch's k*n-th f32 score,
    /// which needs the batch's k*n-th bf16 score first: the scan collects the entries above
    /// the guess `screen_pays` made, the k*n-th is found among them, and only those above
    /// the bound it gives are recomputed. A guess above that bound would have missed some;
    /// the step then runs the f32 product instead (`screen_misses`).
    fn screen(&mut self, n: usize) {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let top_k = self.arch.screen_top_k();
        let buf = &mut self.buf;
        let w = &self.w_enc_t;
        let batch_k = match top_k {
            Some(TopKScope::Batch(k)) if buf.screen.batch_raise > 0.0 => Some(k),
            _ => None,
        };
        // W_enc's rows are gathered a slice of latents at a time, as the decode gathers
        // W_dec's; with one slice each row is refined right after its scan.
        let slices = buf.gather_slices(d_sae, d_in * 4);
        let width = d_sae.div_ceil(slices);
        let refine_now = slices == 1 && batch_k.is_none();
        buf.screen_tasks
            .resize_with(n.div_ceil(ROW_CHUNK), ScreenTask::default);
        let bounds = ScreenBounds::new(d_in, top_k, &buf.screen, &buf.dead);
        let buckets = ScoreBuckets::from(bounds.batch_raise);
        let pre = &mut buf.pre[..n * d_sae];
        pre.par_chunks_mut(d_sae * ROW_CHUNK)
            .zip(buf.xc.par_chunks(d_in * ROW_CHUNK))
            .zip(buf.screen_tasks.par_iter_mut())
            .for_each(|((pre_rows, x_rows), task)| {
                task.idx.clear();
                task.ends.clear();
                task.vals.clear();
                task.terms.clear();
                task.hist.clear();
                if batch_k.is_some() {
                    task.hist.resize(SCORE_BUCKETS, 0);
                }
                for (row, x) in pre_rows.chunks_mut(d_sae).zip(x_rows.chunks(d_in)) {
                    let start = task.idx.len();
                    let terms = bounds.scan(x, row, &mut task.scan, &mut task.idx);
                    task.ends.push(task.idx.len());
                    if refine_now {
                        task.vals.resize(task.idx.len(), 0.0);
                        let (js, vals) = (&task.idx[start..], &mut task.vals[start..]);
                        refine_row(x, w, d_in, js, Some(row), vals);
                    }
                    if batch_k.is_some() {
                        task.terms.push(terms);
                        let from = task.vals.len();
                        task.vals
                            .extend(task.idx[start..].iter().map(|&j| row[j as usize]));
                        // Each entry's bound under its f32 score.
                        let mine = task.idx[start..].iter().zip(&task.vals[from..]);
                        for (&j, v) in mine {
                            let j = j as usize;
                            let margin = bounds.margin_of(j, terms);
                            let under = score_floor(v - bounds.cut_raw[j], margin);
                            if let Some(b) = buckets.of(under) {
                                task.hist[b] += 1;
                            }
                        }
                    }
                }
            });
        if let Some(k) = batch_k {
            let guess = bounds.batch_raise;
            let raise = batch_bound(&buf.screen_tasks, buckets, k * n);
            // Entries outside the first collection score under the guess in f32, so with a
            // bound at or above it every entry selection keeps has been collected.
            if raise < guess {
                buf.xt_f32
                    .matmul_xt(&buf.xc, n, d_in, w, d_sae, &mut buf.pre);
                buf.screening = false;
                buf.screen_misses += 1;
                buf.screen_refined = 0;
                return;
            }
            // Keep the entries above the raised cutoffs; with one slice, refine them now.
            // The rows of `pre` are out of cache by now, so the values go to the lists only.
            buf.xc[..n * d_in]
                .par_chunks(d_in * ROW_CHUNK)
                .zip(buf.screen_tasks.par_iter_mut())
                .for_each(|(x_rows, task)| {
                    let (mut start, mut kept) = (0, 0);
                    for (r, x) in x_rows.chunks(d_in).enumerate() {
                        let first = kept;
                        for i in start..task.ends[r] {
                            let (j, v) = (task.idx[i], task.vals[i]);
                            if bounds.passes(j as usize, v, task.terms[r], raise) {
                                task.idx[kept] = j;
                                task.vals[kept] = v;
                                kept += 1;
                            }
                        }
                        start = task.ends[r];
                        task.ends[r] = kept;
                        if slices == 1 {
                            let (js, vals) = (&task.idx[first..kept], &mut task.vals[first..kept]);
                            refine_row(x, w, d_in, js, None, vals);
                        }
                    }
                    task.idx.truncate(kept);
                    task.vals.truncate(kept);
                });
        }
        for task in buf.screen_tasks.iter_mut() {
            task.vals.resize(task.idx.len(), 0.0);
            task.refined = task.idx.len();
            task.at.clear();
            task.at.push(0);
            task.at.extend_from_slice(&task.ends[..task.ends.len() - 1]);
        }
        // Each block of rows through every slice before the next block, as in the decode.
        let block = buf.gather_block_chunks();
        if slices > 1 {
            buf.xc[..n * d_in]
                .par_chunks(d_in * ROW_CHUNK * block)
                .zip(buf.screen_tasks.par_chunks_mut(block))
                .for_each(|(x_rows, tasks)| {
                    for s in 0..slices {
                        let end = ((s + 1) * width).min(d_sae) as u32;
                        let chunks = x_rows.chunks(d_in * ROW_CHUNK).zip(tasks.iter_mut());
                        for (x_rows, task) in chunks {
                            for (r, x) in x_rows.chunks(d_in).enumerate() {
                                // This row's entries in slice s: the next ones of its
                                // ascending list.
                                let at = task.at[r];
                                let mine = &task.idx[at..task.ends[r]];
                                let m = mine.partition_point(|&j| j < end);
                                let vals = &mut task.vals[at..at + m];
                                refine_row(x, w, d_in, &mine[..m], None, vals);
                                task.at[r] += m;
                            }
                        }
                    }
                });
        }
        buf.screen_refined = buf.screen_tasks.iter().map(|t| t.refined).sum();
        let lists = &mut buf.screen_lists;
        lists.ptr.clear();
        lists.ptr.push(0);
        lists.idx.clear();
        lists.val.clear();
        for task in &buf.screen_tasks {
            let base = lists.idx.len();
            lists.idx.extend_from_slice(&task.idx);
            lists.val.extend_from_slice(&task.vals);
            lists.ptr.extend(task.ends.iter().map(|e| base + e));
        }
    }

    /// Phase 1b: the rule's dense penalty on the (noise-free) pre-activations: per row its
    /// value and its gradient (times 1/n, the batch mean) into `gpen`, then the gradient's
    /// column sums. Returns the penalty summed over the batch (0 without one).
    fn dense_penalty(&mut self, n: usize) -> f64 {
        let d_sae = self.d_sae;
        let buf = &mut self.buf;
        let Some(pen) = self.arch.dense_penalty() else {
            buf.gpen.clear();
            buf.pen_colsum.clear();
            return 0.0;
        };
        buf.gpen.resize(n * d_sae, 0.0);
        buf.pen_parts.clear();
        buf.pen_parts.resize(n.div_ceil(ROW_CHUNK), 0.0);
        let (params, inv_n) = (&self.params, 1.0 / n as f32);
        buf.gpen
            .par_chunks_mut(d_sae * ROW_CHUNK)
            .zip(buf.pre.par_chunks(d_sae * ROW_CHUNK))
            .zip(buf.pen_parts.par_iter_mut())
            .for_each(|((grads, pres), part)| {
                *part = 0.0;
                for (g, p) in grads.chunks_mut(d_sae).zip(pres.chunks(d_sae)) {
                    *part += pen.row(params, p, g);
                    g.iter_mut().for_each(|v| *v *= inv_n);
                }
            });
        buf.pen_colsum.clear();
        buf.pen_colsum.resize(d_sae, 0.0);
        let gpen = &buf.gpen;
        buf.pen_colsum
            .par_chunks_mut(LAT_CHUNK)
            .enumerate()
            .for_each(|(c, dst)| {
                let first = c * LAT_CHUNK;
                for row in gpen.chunks(d_sae) {
                    for (d, v) in dst.iter_mut().zip(&row[first..]) {
                        *d += v;
                    }
                }
            });
        buf.pen_parts.iter().sum()
    }

    /// Phase 1c: the rule's training noise, added to `pre` in place (row `b` of step `t`
    /// draws from `(seed, t, b)` alone: the same bits on any thread count and after a resume).
    fn add_pre_noise(&mut self, n: usize) {
        let Some(std) = self.arch.pre_noise() else {
            return;
        };
        let (d_sae, seed, t) = (self.d_sae, self.hyper.seed, self.steps + 1);
        self.buf.pre[..n * d_sae]
            .par_chunks_mut(d_sae * ROW_CHUNK)
            .enumerate()
            .for_each(|(c, rows)| {
                for (r, row) in rows.chunks_mut(d_sae).enumerate() {
                    let b = (c * ROW_CHUNK + r) as u64;
                    noise::add_gaussian_row(seed, t, b, std, row);
                }
            });
    }

    /// Phase 1d: for rules that select with the input's loss gradient, `G W_dec^T`: the
    /// loss derivative w.r.t. each latent's activation, every (row, latent). A second dense
    /// product beside the encoder's; no sparsity to exploit, every latent is a candidate.
    fn grad_scores(&mut self, grad: Option<&[f32]>, n: usize) {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let buf = &mut self.buf;
        if !self.arch.reads_input_grad() {
            buf.grad_scores.clear();
            return;
        }
        let g = grad.unwrap_or_else(|| {
            panic!(
                "the {} rule selects with the loss gradient of each row: call step_with_grad",
                self.kind
            )
        });
        assert_eq!(
            g.len(),
            n * d_in,
            "step: grad has {} values, expected n * d_in",
            g.len()
        );
        buf.grad_scores.resize(n * d_sae, 0.0);
        // Signed; the rule takes what it needs of each value while it selects, so no extra
        // pass over the [n, d_sae] matrix here.
        let w = &self.w_dec;
        buf.xt_f32
            .matmul_xt(g, n, d_in, w, d_sae, &mut buf.grad_scores);
    }

    /// Phase 2a: the dead latents, the rule's own batch state (`Arch::prepare_batch`) and
    /// its candidate prefilter.
    fn prepare_selection(&mut self, n: usize) -> BatchSelection {
        let buf = &mut self.buf;
        buf.dead.clear();
        if self.arch.aux_mode() == AuxMode::AuxK {
            self.arch
                .aux_latents(&self.tokens_since_fired, &self.hyper, &mut buf.dead);
        }
        let input = BatchInput {
            n,
            d_in: self.d_in,
            d_sae: self.d_sae,
            params: &self.params,
            pre: &buf.pre,
            w_dec: &self.w_dec,
            screened: screened_rows(buf.screening, &buf.screen_lists),
        };
        self.arch.prepare_batch(&input, &mut buf.batch);
        let cutoff = self
            .arch
            .prefilter(&self.params, BatchRef::new(&buf.batch), &mut buf.cutoff);
        BatchSelection { cutoff }
    }

    /// Phase 2b: sparse selection, row-parallel into per-chunk buffers, then flattened to CSR.
    fn select(&mut self, n: usize, sparsity_coeff: f32, batch: BatchSelection) -> Selected {
        let d_sae = self.d_sae;
        let buf = &mut self.buf;
        let ctx = StepCtx {
            n,
            d_sae,
            sparsity_coeff,
            hyper: &self.hyper,
            params: &self.params,
            dead: &buf.dead,
            cutoff: if batch.cutoff { &buf.cutoff } else { &[] },
            screened: screened_rows(buf.screening, &buf.screen_lists),
            batch: BatchRef::new(&buf.batch),
        };
        buf.chunks
            .resize_with(n.div_ceil(ROW_CHUNK), ChunkOut::default);
        let arch = &*self.arch;
        let scores = &buf.grad_scores;
        buf.pre
            .par_chunks(d_sae * ROW_CHUNK)
            .zip(buf.chunks.par_iter_mut())
            .enumerate()
            .for_each(|(c, (rows, ch))| {
                ch.out.clear();
                ch.row_len.clear();
                for (r, row) in rows.chunks(d_sae).enumerate() {
                    let before = ch.out.idx.len();
                    let b = c * ROW_CHUNK + r;
                    if scores.is_empty() {
                        arch.select_row(&ctx, b, row, &mut ch.out);
                    } else {
                        let s = &scores[b * d_sae..(b + 1) * d_sae];
                        arch.select_row_scored(&ctx, b, row, s, &mut ch.out);
                    }
                    ch.row_len.push(ch.out.idx.len() - before);
                }
            });
        let sparsity_sum = buf.flatten_entries();
        Selected {
            total: buf.idx.len(),
            sparsity_sum,
            penalty_sum: 0.0,
        }
    }

    /// Phase 3: decode and residuals, then the loss.
    fn decode(&mut self, x: &[f32], n: usize, sparsity_coeff: f32, sel: &Selected) -> Decoded {
        let widths = head_widths(&*self.arch, self.d_sae);
        // Early in training codes can be dense (half the latents fire at init); then GEMMs
        // on dense copies of the code beat the row-by-row sparse passes.
        // The GEMM path decodes one head only.
        let dense =
            widths.len() == 1 && sel.total as f64 > self.dense_fraction * (n * self.d_sae) as f64;
        self.decode_rows(x, n, &widths, dense);
        self.loss_stats(n, sparsity_coeff, sel, dense)
    }

    /// Per row: resid = x_hat - x; aux = aux reconstruction residual; per entry in the aux
    /// reconstruction `d_j . aux` (`dots[e][1]`; the dense path's GEMMs give both dots).
    /// With several reconstruction heads (nested prefixes of widths[0] < ... < d_sae) each
    /// row keeps one residual per head band q: R_q = sum over heads m >= q of
    /// (x_hat_m - x), the residual that latents of band q (widths[q-1] <= j < widths[q])
    /// reconstruct in every head containing them.
    fn decode_rows(&mut self, x: &[f32], n: usize, widths: &[usize], dense: bool) {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let buf = &mut self.buf;
        let n_row_chunks = n.div_ceil(ROW_CHUNK);
        let total = buf.idx.len();
        let aux_mode = self.arch.aux_mode();
        let n_heads = widths.len();
        let rd = d_in * n_heads;
        buf.resid.resize(n * rd, 0.0);
        buf.aux.resize(n * d_in, 0.0);
        buf.chunk_stats.resize(n_row_chunks, RowStats::default());
        if dense {
            buf.dense2.resize(n * d_sae, 0.0);
            scatter_code(&mut buf.pre, &buf.row_ptr, &buf.idx, &buf.f, d_sae, 1.0);
            matmul(&buf.pre, n, d_sae, &self.w_dec, d_in, &mut buf.resid);
            if aux_mode != AuxMode::None {
                scatter_code(&mut buf.dense2, &buf.row_ptr, &buf.idx, &buf.a, d_sae, 1.0);
                matmul(&buf.dense2, n, d_sae, &self.w_dec, d_in, &mut buf.aux);
            }
        }
        // bf16 rows for the gathers (`Precision::bf16_sparse`); the dense path uses its GEMMs.
        let half = !buf.w_dec_h.is_empty() && !dense;
        // The decoder rows are gathered one slice of latents at a time (`GATHER_SLICE_BYTES`).
        let slices = match dense {
            true => 1,
            false => buf.decode_slices(d_sae, d_in * if half { 2 } else { 4 }, aux_mode),
        };
        buf.resid_h.resize(if half { n * rd } else { 0 }, 0);
        buf.dots.clear();
        buf.dots.resize(total, [0.0; 2]);
        buf.chunk_ents.resize_with(n_row_chunks, Vec::new);
        let rows = DecodeRows {
            x,
            n,
            d_in,
            n_heads,
            widths,
            dense,
            half,
            aux_mode,
            w_dec: &self.w_dec,
            w_dec_h: &buf.w_dec_h,
            b_dec: &self.b_dec,
            row_ptr: &buf.row_ptr,
            idx: &buf.idx,
            fv: &buf.f,
            av: &buf.a,
        };
        // Per task of `chunks` row chunks: its entries and its rows' bf16 residuals (if any).
        let task_lens = |chunks: usize| -> (Vec<usize>, Vec<usize>) {
            let rows = ROW_CHUNK * chunks;
            (0..n.div_ceil(rows))
                .map(|k| {
                    let (r0, r1) = (k * rows, ((k + 1) * rows).min(n));
                    let res_h = if half { (r1 - r0) * rd } else { 0 };
                    (buf.row_ptr[r1] - buf.row_ptr[r0], res_h)
                })
                .unzip()
        };
        if slices == 1 {
            // Row by row: gather, finish, and the aux dots while the row's d_j are in cache.
            let (lens, half_lens) = task_lens(1);
            let dot_pieces = split_by_lengths(&mut buf.dots, &lens);
            let half_pieces = split_by_lengths(&mut buf.resid_h, &half_lens);
            buf.resid
                .par_chunks_mut(rd * ROW_CHUNK)
                .zip(buf.aux.par_chunks_mut(d_in * ROW_CHUNK))
                .zip(buf.chunk_stats.par_iter_mut())
                .zip(buf.chunk_ents.par_iter_mut())
                .zip(dot_pieces.into_par_iter().zip(half_pieces))
                .enumerate()
                .for_each(|(c, ((((res, aux), st), ents), (dots, res_h)))| {
                    st.reset(d_in);
                    let ends = rows.chunk_entries(c, ents);
                    for (r, b) in rows.chunk_rows(c).enumerate() {
                        let (bands, aux) = (&mut res[r * rd..][..rd], &mut aux[r * d_in..][..d_in]);
                        let start = if r == 0 { 0 } else { ends[r - 1] };
                        match dense {
                            true => st.l0 += rows.dense_l0(b),
                            false => rows.gather_row(bands, aux, st, ents, start..ends[r], true),
                        }
                        rows.finish_row(b, bands, aux, st, row_h(res_h, r, rd));
                        let base = rows.row_ptr[c * ROW_CHUNK];
                        rows.aux_dots_row(bands, aux, &ents[start..ends[r]], dots, base);
                    }
                });
            return;
        }
        // Each task takes a block of rows through every slice, then finishes them: the
        // block's residual rows stay in L2 while each slice's decoder rows are gathered.
        let block = buf.gather_block_chunks();
        let (block_entries, block_half) = task_lens(block);
        buf.decode_blocks
            .resize_with(block_entries.len(), SliceEntries::default);
        let dot_pieces = split_by_lengths(&mut buf.dots, &block_entries);
        let half_pieces = split_by_lengths(&mut buf.resid_h, &block_half);
        buf.resid
            .par_chunks_mut(rd * ROW_CHUNK * block)
            .zip(buf.aux.par_chunks_mut(d_in * ROW_CHUNK * block))
            .zip(buf.chunk_stats.par_chunks_mut(block))
            .zip(buf.decode_blocks.par_iter_mut())
            .zip(dot_pieces.into_par_iter().zip(half_pieces))
            .enumerate()
            .for_each(|(k, ((((res, aux), sts), by_slice), (dots, res_h)))| {
                let first_row = k * block * ROW_CHUNK;
                let n_rows = res.len() / rd;
                by_slice.fill(&rows, first_row..first_row + n_rows, slices, d_sae);
                let row_of = |r: usize| {
                    (
                        r / ROW_CHUNK,
                        r * rd..(r + 1) * rd,
                        r * d_in..(r + 1) * d_in,
                    )
                };
                sts.iter_mut().for_each(|st| st.reset(d_in));
                for s in 0..slices {
                    for r in 0..n_rows {
                        let (c, band, ax) = row_of(r);
                        let mine = by_slice.of(s, r);
                        let ents = &by_slice.ents;
                        rows.gather_row(
                            &mut res[band],
                            &mut aux[ax],
                            &mut sts[c],
                            ents,
                            mine,
                            s == 0,
                        );
                    }
                }
                for r in 0..n_rows {
                    let (c, band, ax) = row_of(r);
                    let res_h = row_h(res_h, r, rd);
                    rows.finish_row(
                        first_row + r,
                        &mut res[band],
                        &mut aux[ax],
                        &mut sts[c],
                        res_h,
                    );
                }
                if aux_mode == AuxMode::None {
                    return;
                }
                let base = rows.row_ptr[first_row];
                for s in 0..slices {
                    for r in 0..n_rows {
                        let (_, band, ax) = row_of(r);
                        let mine = by_slice.of(s, r);
                        let ents = &by_slice.ents[mine];
                        rows.aux_dots_row(&res[band], &aux[ax], ents, dots, base);
                    }
                }
            });
    }

    /// The loss terms from the per-chunk row statistics (summed in chunk order).
    fn loss_stats(&self, n: usize, sparsity_coeff: f32, sel: &Selected, dense: bool) -> Decoded {
        let d_in = self.d_in;
        let buf = &self.buf;
        let nf = n as f64;
        let (mut err2, mut heads2, mut aux2, mut x2, mut l0) = (0.0, 0.0, 0.0, 0.0, 0u64);
        let mut resid_sum = vec![0.0f64; d_in];
        let mut full_sum = vec![0.0f64; d_in];
        let mut x_sum = vec![0.0f64; d_in];
        for st in &buf.chunk_stats {
            err2 += st.err2;
            heads2 += st.heads2;
            aux2 += st.aux2;
            x2 += st.x2;
            l0 += st.l0;
            for i in 0..d_in {
                resid_sum[i] += st.resid_sum[i];
                full_sum[i] += st.full_sum[i];
                x_sum[i] += st.x_sum[i];
            }
        }
        let x_var = x2 - x_sum.iter().map(|s| s * s).sum::<f64>() / nf;
        let resid_scale = (2.0 / nf) as f32;
        let (aux_loss, aux_scale) = match self.arch.aux_mode() {
            AuxMode::None => (0.0, 0.0),
            AuxMode::FrozenDecoder => (aux2 / nf, resid_scale),
            AuxMode::AuxK => {
                // Var(e) * n with e = -res: sum ||e||^2 - n ||mean e||^2.
                let denom = err2 - full_sum.iter().map(|s| s * s).sum::<f64>() / nf;
                let alpha = self.arch.aux_coeff() as f64;
                if buf.dead.is_empty() || denom <= 0.0 || !denom.is_finite() {
                    (0.0, 0.0)
                } else {
                    (alpha * aux2 / denom, (2.0 * alpha / denom) as f32)
                }
            }
        };
        let mse = err2 / nf;
        let sparsity_loss = (sparsity_coeff as f64 * sel.sparsity_sum + sel.penalty_sum) / nf;
        // The prefix heads' squared errors join the loss; `mse` and `fvu` stay those of the
        // whole dictionary.
        let stats = StepStats {
            loss: mse + heads2 / nf + sparsity_loss + aux_loss,
            mse,
            sparsity_loss,
            aux_loss,
            l0: l0 as f64 / nf,
            fvu: if x_var > 0.0 { err2 / x_var } else { f64::NAN },
            dead_latents: 0,
        };
        Decoded {
            dense,
            stats,
            resid_scale,
            aux_scale,
            resid_sum,
        }
    }

    /// Dense mode: `d_j . r_b` for every (b, j) at once, `R W_dec^T` (and the same for the aux
    /// residual), gathered into the entries' dots.
    fn dense_entry_dots(&mut self, n: usize, aux_scale: f32) {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let buf = &mut self.buf;
        let w = &self.w_dec;
        buf.xt_f32
            .matmul_xt(&buf.resid, n, d_in, w, d_sae, &mut buf.pre);
        let with_aux = self.arch.aux_mode() != AuxMode::None && aux_scale != 0.0;
        if with_aux {
            buf.xt_f32
                .matmul_xt(&buf.aux, n, d_in, w, d_sae, &mut buf.dense2);
        }
        let (row_ptr, idx, dr, da) = (&buf.row_ptr, &buf.idx, &buf.pre, &buf.dense2);
        let lens: Vec<usize> = (0..n).map(|b| row_ptr[b + 1] - row_ptr[b]).collect();
        split_by_lengths(&mut buf.dots, &lens)
            .into_par_iter()
            .enumerate()
            .for_each(|(b, dots)| {
                for (p, d) in dots.iter_mut().enumerate() {
                    let k = b * d_sae + idx[row_ptr[b] + p] as usize;
                    *d = [dr[k], if with_aux { da[k] } else { 0.0 }];
                }
            });
    }

    /// Phase 5: per latent, the W_dec / W_enc row gradients fused with Adam (or copied out
    /// when collecting): per task the residual rows, the entries' backward rules, the input
    /// rows, then each latent's tail (`LatentInputs::latent_chunk`). Every per-latent array is cut into chunks of the same latents
    /// (`latent_blocks`, fixed by d_in) and each task owns one chunk of each.
    fn latent_pass(&mut self, bw: &Backward, mode: &mut Mode) {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let (lat_chunk, row_block) = match self.buf.latent_block {
            0 => latent_blocks(d_in),
            b => (b, b),
        };
        let n_chunks = d_sae.div_ceil(lat_chunk);
        let n_params = self.params.len();
        assert!(
            n_params <= MAX_LATENT_PARAMS,
            "an architecture trains at most {MAX_LATENT_PARAMS} per-latent parameters"
        );
        let buf = &mut self.buf;
        buf.bdec_part.clear();
        buf.bdec_part.resize(n_chunks * d_in, 0.0);
        buf.gparams.resize_with(n_params, Vec::new);
        for g in buf.gparams.iter_mut() {
            g.clear();
            g.resize(d_sae, 0.0);
        }
        let widths = head_widths(&*self.arch, d_sae);
        let inputs = LatentInputs {
            arch: &*self.arch,
            ctx: StepCtx {
                n: bw.n,
                d_sae,
                sparsity_coeff: bw.sparsity_coeff,
                hyper: &self.hyper,
                params: &self.params,
                dead: &buf.dead,
                cutoff: &[],
                screened: None,
                batch: BatchRef::new(&buf.batch),
            },
            bw: *bw,
            d_in,
            block: row_block,
            n_params,
            widths: &widths,
            dense_adam: self.hyper.adam_beta1 != 0.0,
            unit_norm: self.arch.unit_norm_decoder(),
            centre: self.apply_b_dec_to_input,
            lat_ptr: &buf.lat_ptr,
            lat_ent: &buf.lat_ent,
            resid: &buf.resid,
            aux: &buf.aux,
            xc: &buf.xc,
            resid_h: &buf.resid_h,
            xc_h: &buf.xc_h,
            dense_genc: &buf.genc,
            dense_gdec: &buf.gdec,
            penalty: match buf.pen_colsum.is_empty() {
                true => None,
                false => self.arch.dense_penalty(),
            },
            pen_colsum: &buf.pen_colsum,
            pen_genc: &buf.pen_genc,
        };
        let (grad_enc, grad_dec): (&mut [f32], &mut [f32]) = match mode {
            Mode::Collect(g) => (g.w_enc_t.as_mut_slice(), g.w_dec.as_mut_slice()),
            Mode::Apply(_) => (&mut [], &mut []),
        };
        let rows = lat_chunk * d_in;
        let mut w_enc = latent_chunks(&mut self.w_enc_t, rows, n_chunks);
        let mut w_dec = latent_chunks(&mut self.w_dec, rows, n_chunks);
        let mut m_enc = latent_chunks(&mut self.mom_enc.m, rows, n_chunks);
        let mut v_enc = latent_chunks(&mut self.mom_enc.v, rows, n_chunks);
        let mut m_dec = latent_chunks(&mut self.mom_dec.m, rows, n_chunks);
        let mut v_dec = latent_chunks(&mut self.mom_dec.v, rows, n_chunks);
        let mut grad_enc = latent_chunks(grad_enc, rows, n_chunks);
        let mut grad_dec = latent_chunks(grad_dec, rows, n_chunks);
        let mut last_update = latent_chunks(&mut self.last_update, lat_chunk, n_chunks);
        let mut since_fired = latent_chunks(&mut self.tokens_since_fired, lat_chunk, n_chunks);
        let mut gparams: Vec<_> = buf
            .gparams
            .iter_mut()
            .map(|g| latent_chunks(g, lat_chunk, n_chunks))
            .collect();
        let mut bdec_part = buf.bdec_part.chunks_mut(d_in);
        let tasks: Vec<LatentChunk> = (0..n_chunks)
            .map(|c| LatentChunk {
                first: c * lat_chunk,
                w_enc: w_enc.next().unwrap(),
                w_dec: w_dec.next().unwrap(),
                m_enc: m_enc.next().unwrap(),
                v_enc: v_enc.next().unwrap(),
                m_dec: m_dec.next().unwrap(),
                v_dec: v_dec.next().unwrap(),
                grad_enc: grad_enc.next().unwrap(),
                grad_dec: grad_dec.next().unwrap(),
                last_update: last_update.next().unwrap(),
                since_fired: since_fired.next().unwrap(),
                gparams: std::array::from_fn(|k| match gparams.get_mut(k) {
                    Some(it) => it.next().unwrap(),
                    None => &mut [],
                }),
                bdec_part: bdec_part.next().unwrap(),
            })
            .collect();
        tasks
            .into_par_iter()
            .for_each(|task| inputs.latent_chunk(task));
    }

    /// Phase 6: the small dense parameters: b_dec, the per-latent vectors and BatchTopK's
    /// inference threshold EMA (or the gradients copied out when collecting).
    fn dense_params(&mut self, bw: &Backward, resid_sum: &[f64], mode: Mode) {
        let d_in = self.d_in;
        let nf = bw.n as f64;
        let buf = &mut self.buf;
        let mut g_bdec: Vec<f32> = resid_sum.iter().map(|s| (*s * 2.0 / nf) as f32).collect();
        for part in buf.bdec_part.chunks(d_in) {
            for i in 0..d_in {
                g_bdec[i] += part[i];
            }
        }
        match mode {
            Mode::Collect(g) => {
                g.b_dec.copy_from_slice(&g_bdec);
                for (dst, src) in g.params.iter_mut().zip(&buf.gparams) {
                    dst.copy_from_slice(src);
                }
            }
            Mode::Apply(_) => {
                let ad = bw.adam.expect("applying a step needs its Adam constants");
                ad.update(
                    &mut self.b_dec,
                    &mut self.mom_bdec.m,
                    &mut self.mom_bdec.v,
                    &g_bdec,
                );
                for ((p, m), g) in self
                    .params
                    .iter_mut()
                    .zip(self.mom_params.iter_mut())
                    .zip(&buf.gparams)
                {
                    ad.update(p, &mut m.m, &mut m.v, g);
                }
                let step = AfterStep {
                    t: bw.t,
                    n: bw.n,
                    batch: BatchRef::new(&buf.batch),
                };
                self.arch.after_step(&step, &mut self.params);
                if let Some(threshold) = self.arch.batch_threshold(step.batch) {
                    self.threshold_ema = THRESHOLD_EMA_BETA * self.threshold_ema
                        + (1.0 - THRESHOLD_EMA_BETA) * threshold as f64;
                    self.last_batch_threshold = threshold;
                }
                self.steps = bw.t;
            }
        }
    }

    /// Dense mode: W_enc and W_dec gradients as GEMMs on dense copies of the per-entry
    /// gradients (same math as the sparse latent pass).
    pub(super) fn dense_gradients(
        &mut self,
        n: usize,
        sparsity_coeff: f32,
        resid_scale: f32,
        aux_scale: f32,
        aux_trains_dec: bool,
    ) {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let buf = &mut self.buf;
        let ctx = StepCtx {
            n,
            d_sae,
            sparsity_coeff,
            hyper: &self.hyper,
            params: &self.params,
            dead: &buf.dead,
            cutoff: &[],
            screened: None,
            batch: BatchRef::new(&buf.batch),
        };
        // Gpre[b, j], row by row.
        let (row_ptr, idx, fv, av, pre_e, dots, arch, gpen) = (
            &buf.row_ptr,
            &buf.idx,
            &buf.f,
            &buf.a,
            &buf.pre_e,
            &buf.dots,
            &*self.arch,
            &buf.gpen,
        );
        buf.pre
            .par_chunks_mut(d_sae)
            .enumerate()
            .for_each(|(b, row)| {
                // A dense penalty's gradient joins the entries' in the one encoder product.
                if gpen.is_empty() {
                    row.fill(0.0);
                } else {
                    row.copy_from_slice(&gpen[b * d_sae..(b + 1) * d_sae]);
                }
                for e in row_ptr[b]..row_ptr[b + 1] {
                    let j = idx[e] as usize;
                    let ent = Entry {
                        j,
                        pre: pre_e[e],
                        f: fv[e],
                        a: av[e],
                    };
                    let (df, da) = (resid_scale * dots[e][0], aux_scale * dots[e][1]);
                    row[j] += arch.entry_backward(&ctx, ent, df, da).gpre;
                }
            });
        buf.genc.resize(d_sae * d_in, 0.0);
        buf.gdec.resize(d_sae * d_in, 0.0);
        // G_enc = Gpre^T Xc.
        matmul_tn(&buf.pre, n, d_sae, &buf.xc, d_in, &mut buf.genc, false);
        // G_dec = (s F)^T R (+ (s_a A)^T R_aux for AuxK).
        scatter_code(
            &mut buf.pre,
            &buf.row_ptr,
            &buf.idx,
            &buf.f,
            d_sae,
            resid_scale,
        );
        matmul_tn(&buf.pre, n, d_sae, &buf.resid, d_in, &mut buf.gdec, false);
        if aux_trains_dec {
            scatter_code(
                &mut buf.pre,
                &buf.row_ptr,
                &buf.idx,
                &buf.a,
                d_sae,
                aux_scale,
            );
            matmul_tn(&buf.pre, n, d_sae, &buf.aux, d_in, &mut buf.gdec, true);
        }
    }
}

impl Buffers {
    pub(super) fn new(precision: crate::bf16::Precision) -> Self {
        Self {
            enc_bf16: crate::bf16::EncoderBf16::new(precision.split_encoder()),
            bf16_units: crate::bf16::available(),
            l2_bytes: crate::cpu::l2_bytes().unwrap_or(usize::MAX),
            ..Self::default()
        }
    }

    /// Slices of latents for a sliced gather from a `d_sae`-row matrix of `row_bytes` rows
    /// (`GATHER_SLICE_BYTES` each at most, or the tests' budget).
    fn gather_slices(&self, d_sae: usize, row_bytes: usize) -> usize {
        (d_sae * row_bytes)
            .div_ceil(self.slice_budget())
            .clamp(1, d_sae.max(1))
    }

    /// The most bytes of a matrix per slice of a sliced gather.
    fn slice_budget(&self) -> usize {
        match self.gather_slice_bytes {
            0 => GATHER_SLICE_BYTES,
            b => b,
        }
    }

    /// Slices of latents for the decode (`gather_slices`), but one (row by row) for the frozen
    /// decoder's aux where a slice is larger than L2. Its dots read each entry's decoder row
    /// a second time once the row's reconstructions are complete: row by row that is right
    /// after the row's gather, in reverse, so most of those rows are still in L2; in slices,
    /// after every slice of a block of rows, so a slice too large for L2 comes from L3 again,
    /// and every residual row once per slice. On the AVX2 Zen 3 (512 KB L2; gated, d_sae
    /// 9216, three alternated rounds) one slice took the decode from 85-90 to 74-78 ms at L0
    /// 200 and from 36-46 to 28-38 ms at L0 64, while the other families' decodes were the
    /// same either way. Where L2 holds a slice (the 2 MB Xeon the slices were tuned on) the
    /// blocks stay; gated row by row is not measured there.
    fn decode_slices(&self, d_sae: usize, row_bytes: usize, aux_mode: AuxMode) -> usize {
        match aux_mode == AuxMode::FrozenDecoder && self.l2_bytes < self.slice_budget() {
            true => 1,
            false => self.gather_slices(d_sae, row_bytes),
        }
    }

    /// Row chunks (`ROW_CHUNK`) per block of a sliced gather (`GATHER_ROW_BLOCK` rows, or the
    /// tests' block).
    fn gather_block_chunks(&self) -> usize {
        match self.gather_row_block {
            0 => GATHER_ROW_BLOCK,
            b => b,
        }
        .div_ceil(ROW_CHUNK)
    }

    /// The per-chunk selections as one CSR (`row_ptr`, `idx`, `f`, `a`, `pre_e`, `row_of`),
    /// in row order; returns the summed sparsity penalty.
    fn flatten_entries(&mut self) -> f64 {
        let total: usize = self.chunks.iter().map(|c| c.out.idx.len()).sum();
        let mut sparsity_sum = 0.0f64;
        self.row_ptr.clear();
        self.row_ptr.push(0);
        for (v, len) in [
            (&mut self.idx as &mut dyn ClearLen, total),
            (&mut self.f, total),
            (&mut self.a, total),
            (&mut self.pre_e, total),
            (&mut self.row_of, total),
        ] {
            v.clear_to(len);
        }
        let mut pos = 0;
        let mut row = 0u32;
        for ch in &self.chunks {
            let m = ch.out.idx.len();
            self.idx[pos..pos + m].copy_from_slice(&ch.out.idx);
            self.f[pos..pos + m].copy_from_slice(&ch.out.f);
            self.a[pos..pos + m].copy_from_slice(&ch.out.a);
            self.pre_e[pos..pos + m].copy_from_slice(&ch.out.pre);
            for &l in &ch.row_len {
                let start = *self.row_ptr.last().unwrap();
                self.row_ptr.push(start + l);
                self.row_of[start..start + l].fill(row);
                row += 1;
            }
            sparsity_sum += ch.out.sparsity;
            pos += m;
        }
        sparsity_sum
    }

    /// Phase 4: the entries per latent (`lat_ptr`, `lat_ent`), each latent's in entry order
    /// (deterministic, whatever the thread count). The entries are cut into one contiguous
    /// part per thread; each part counts its entries per latent, and after one prefix sum
    /// over (latent, part) writes its own slots.
    fn transpose_entries(&mut self, d_sae: usize) {
        let total = self.idx.len();
        let parts = rayon::current_num_threads().clamp(1, total.max(1));
        let bounds: Vec<usize> = (0..=parts).map(|t| t * total / parts).collect();
        let idx = &self.idx;
        self.lat_fill.clear();
        self.lat_fill.resize(parts * d_sae, 0);
        self.lat_fill
            .par_chunks_mut(d_sae.max(1))
            .enumerate()
            .for_each(|(t, count)| {
                for &j in &idx[bounds[t]..bounds[t + 1]] {
                    count[j as usize] += 1;
                }
            });
        // Each part's first slot per latent: within a latent the parts come in entry order.
        self.lat_ptr.clear();
        self.lat_ptr.resize(d_sae + 1, 0);
        let mut at = 0;
        for j in 0..d_sae {
            self.lat_ptr[j] = at;
            for t in 0..parts {
                let fill = &mut self.lat_fill[t * d_sae + j];
                let count = *fill;
                *fill = at;
                at += count;
            }
        }
        self.lat_ptr[d_sae] = at;
        self.lat_ent.resize(total, LatEntry::default());
        let out = SharedMut(self.lat_ent.as_mut_ptr());
        let (row_of, f, a, pre_e, dots) = (&self.row_of, &self.f, &self.a, &self.pre_e, &self.dots);
        self.lat_fill
            .par_chunks_mut(d_sae.max(1))
            .enumerate()
            .for_each(|(t, fill)| {
                for e in bounds[t]..bounds[t + 1] {
                    let p = &mut fill[idx[e] as usize];
                    let ent = LatEntry {
                        row: row_of[e],
                        f: f[e],
                        a: a[e],
                        pre: pre_e[e],
                        dot_r: dots[e][0],
                        dot_a: dots[e][1],
                    };
                    // SAFETY: slot `*p` is below `total` (the counts sum to it) and belongs
                    // to this part alone (its slots for latent j follow its own first slot).
                    unsafe { out.get().add(*p).write(ent) };
                    *p += 1;
                }
            });
    }
}

/// `v` cut into `n_chunks` chunks of `len` (the last may be shorter). An empty `v` (Adam's
/// first moments with beta1 = 0, the gradient outputs when applying) gives every chunk an
/// empty slice.
fn latent_chunks<T>(v: &mut [T], len: usize, n_chunks: usize) -> std::vec::IntoIter<&mut [T]> {
    let chunks: Vec<&mut [T]> = if v.is_empty() {
        (0..n_chunks).map(|_| Default::default()).collect()
    } else {
        v.chunks_mut(len).collect()
    };
    assert_eq!(
        chunks.len(),
        n_chunks,
        "a per-latent array of the wrong length"
    );
    chunks.into_iter()
}

/// Row `l` of a chunk of `d`-long rows, or an empty slice for an absent array.
fn row_in(v: &mut [f32], l: usize, d: usize) -> &mut [f32] {
    if v.is_empty() {
        &mut []
    } else {
        &mut v[l * d..(l + 1) * d]
    }
}

/// One task of the latent pass: latents `first..first + LAT_CHUNK` (fewer in the last chunk)
/// and its own rows of every per-latent array.
struct LatentChunk<'a> {
    first: usize,
    w_enc: &'a mut [f32],
    w_dec: &'a mut [f32],
    /// Adam's moments (`m_*` empty when beta1 = 0).
    m_enc: &'a mut [f32],
    v_enc: &'a mut [f32],
    m_dec: &'a mut [f32],
    v_dec: &'a mut [f32],
    /// Collect mode's gradient outputs (empty when applying).
    grad_enc: &'a mut [f32],
    grad_dec: &'a mut [f32],
    last_update: &'a mut [u64],
    since_fired: &'a mut [u64],
    /// Gradients of the per-latent parameters (empty past the architecture's count).
    gparams: [&'a mut [f32]; MAX_LATENT_PARAMS],
    /// This chunk's share of the b_dec gradient.
    bdec_part: &'a mut [f32],
}

/// Latents per task of the latent pass and batch rows per block of its entries, for rows
/// `d_in` long (`LATENT_BLOCK_BYTES`, `ROW_BLOCK_BYTES`).
fn latent_blocks(d_in: usize) -> (usize, usize) {
    let per_row = 8 * d_in.max(1);
    (
        (LATENT_BLOCK_BYTES / per_row).clamp(LAT_CHUNK, 512),
        (ROW_BLOCK_BYTES / per_row).max(ROW_CHUNK),
    )
}

thread_local! {
    /// Each worker's W_dec / W_enc gradient rows and sums for the latents of its current
    /// latent-pass task, kept between steps.
    static LATENT_GRADS: std::cell::RefCell<LatentScratch> =
        const { std::cell::RefCell::new(LatentScratch { grads: Vec::new(), sums: Vec::new(), next: Vec::new(), coef: Vec::new() }) };
}

/// A worker's buffers for its current latent-pass task.
struct LatentScratch {
    /// Each latent's W_dec then W_enc row gradient, `2 * d_in` per latent.
    grads: Vec<f32>,
    sums: Vec<LatentSums>,
    /// Each latent's first entry not yet taken (into `lat_ent`).
    next: Vec<usize>,
    /// Per entry of the task: `d_j . r_b` after the residual pass, then the pre-activation
    /// gradient that weighs its input row in the W_enc gradient.
    coef: Vec<f32>,
}

/// What every task of the latent pass reads.
struct LatentInputs<'a> {
    arch: &'a dyn Arch,
    ctx: StepCtx<'a>,
    bw: Backward,
    d_in: usize,
    /// Batch rows per block of a task's entries.
    block: usize,
    n_params: usize,
    widths: &'a [usize],
    /// Adam with momentum updates every row every step.
    dense_adam: bool,
    unit_norm: bool,
    /// The encoder sees `x - b_dec`, so b_dec gets a gradient through it.
    centre: bool,
    lat_ptr: &'a [usize],
    lat_ent: &'a [LatEntry],
    resid: &'a [f32],
    aux: &'a [f32],
    xc: &'a [f32],
    /// bf16 copies of `resid` and `xc` (`Precision::bf16_sparse`; empty otherwise).
    resid_h: &'a [u16],
    xc_h: &'a [u16],
    dense_genc: &'a [f32],
    dense_gdec: &'a [f32],
    /// The rule's dense penalty, its gradient's column sums and (sparse path) its W_enc
    /// gradient; every latent then has a gradient every step.
    penalty: Option<&'a dyn DensePenalty>,
    pen_colsum: &'a [f32],
    pen_genc: &'a [f32],
}

/// One latent's sums over its entries.
#[derive(Default)]
struct LatentSums {
    /// Some entry fired (f > 0).
    any_fired: bool,
    /// Gradients of the per-latent parameters.
    psum: [f32; MAX_LATENT_PARAMS],
    /// Sum of the pre-activation gradients (the b_dec gradient through the centring).
    colsum: f32,
    sum_f: f32,
}

impl LatentInputs<'_> {
    fn latent_chunk(&self, mut task: LatentChunk) {
        let (d_in, first, bw) = (self.d_in, task.first, &self.bw);
        let n_lat = task.since_fired.len();
        let e0 = self.lat_ptr[first];
        LATENT_GRADS.with(|cell| {
            let LatentScratch {
                grads,
                sums,
                next,
                coef,
            } = &mut *cell.borrow_mut();
            grads.clear();
            grads.resize(n_lat * 2 * d_in, 0.0);
            sums.clear();
            sums.resize_with(n_lat, LatentSums::default);
            coef.clear();
            coef.resize(self.lat_ptr[first + n_lat] - e0, 0.0);
            // The W_dec gradients (and `d_j . r_b`) from the residual rows, then every entry's
            // backward rule, then the W_enc gradients from the input rows: one kind of row per
            // pass keeps a block's rows and the task's gradient rows in cache together.
            if !bw.dense {
                self.row_blocks(first, n_lat, next, |l, at, len| {
                    let g_dec = &mut grads[l * 2 * d_in..][..d_in];
                    let wd = &task.w_dec[l * d_in..][..d_in];
                    let dots = &mut coef[at - e0..][..len];
                    self.residual_rows(first + l, wd, at..at + len, g_dec, dots);
                });
            }
            for (l, sums) in sums.iter_mut().enumerate() {
                let ents = self.lat_ptr[first + l]..self.lat_ptr[first + l + 1];
                let coef = &mut coef[ents.start - e0..ents.end - e0];
                self.entry_rules(first + l, ents, coef, sums);
            }
            if !bw.dense {
                self.row_blocks(first, n_lat, next, |l, at, len| {
                    let g_enc = &mut grads[l * 2 * d_in + d_in..][..d_in];
                    self.input_rows(at..at + len, g_enc, &coef[at - e0..][..len]);
                });
            }
            for (l, sums) in sums.iter_mut().enumerate() {
                let (g_dec, g_enc) = grads[l * 2 * d_in..][..2 * d_in].split_at_mut(d_in);
                self.finish_latent(first + l, l, sums, g_dec, g_enc, &mut task);
            }
        });
    }

    /// Calls `f(l, at, len)` for the entries `at..at + len` (into `lat_ent`) of each latent
    /// `first + l` of a task of `n_lat`, one block of batch rows at a time (each latent's
    /// entries are in row order).
    fn row_blocks(
        &self,
        first: usize,
        n_lat: usize,
        next: &mut Vec<usize>,
        mut f: impl FnMut(usize, usize, usize),
    ) {
        next.clear();
        next.extend_from_slice(&self.lat_ptr[first..first + n_lat]);
        for b0 in (0..self.bw.n).step_by(self.block) {
            let end_row = (b0 + self.block) as u32;
            for (l, at) in next.iter_mut().enumerate() {
                // A scan, not a binary search: the pass reads these entries next anyway.
                let ents = &self.lat_ent[*at..self.lat_ptr[first + l + 1]];
                let len = ents.iter().take_while(|le| le.row < end_row).count();
                if len > 0 {
                    f(l, *at, len);
                    *at += len;
                }
            }
        }
    }

    /// Latent `j` (row `l` of its task) after its entries: its gradients finished (dense
    /// path, penalty, decoder-norm term), its share of the b_dec gradient, and Adam's update
    /// (or the gradients copied out when collecting).
    fn finish_latent(
        &self,
        j: usize,
        l: usize,
        sums: &mut LatentSums,
        g_dec: &mut [f32],
        g_enc: &mut [f32],
        task: &mut LatentChunk,
    ) {
        let LatentChunk {
            w_enc,
            w_dec,
            m_enc,
            v_enc,
            m_dec,
            v_dec,
            grad_enc,
            grad_dec,
            last_update,
            since_fired,
            gparams,
            bdec_part,
            ..
        } = task;
        let (d_in, n, bw) = (self.d_in, self.bw.n, &self.bw);
        let no_entries = self.lat_ptr[j] == self.lat_ptr[j + 1];
        if no_entries && !self.dense_adam && bw.adam.is_some() && self.penalty.is_none() {
            since_fired[l] += n as u64;
            return;
        }
        let rows = l * d_in..(l + 1) * d_in;
        let (wd, we) = (&mut w_dec[rows.clone()], &mut w_enc[rows.clone()]);
        if bw.dense {
            g_dec.copy_from_slice(&self.dense_gdec[j * d_in..(j + 1) * d_in]);
            g_enc.copy_from_slice(&self.dense_genc[j * d_in..(j + 1) * d_in]);
        }
        if let Some(pen) = self.penalty {
            let cs = self.pen_colsum[j];
            // The dense path's encoder product already holds the penalty's part.
            if !bw.dense {
                axpy(1.0, &self.pen_genc[j * d_in..(j + 1) * d_in], g_enc);
            }
            sums.colsum += cs;
            for (s, g) in sums.psum.iter_mut().zip(pen.param_grads(j, cs)) {
                *s += g;
            }
        }
        if let Some(coef) = self.arch.dec_row_extra(&self.ctx, j, sums.sum_f) {
            let nrm = dot(wd, wd).sqrt();
            if nrm > 0.0 {
                axpy(coef / nrm, wd, g_dec);
            }
        }
        // d loss / d b_dec through the centring x - b_dec (old encoder row).
        if self.centre && sums.colsum != 0.0 {
            axpy(-sums.colsum, we, bdec_part);
        }
        for (gp, s) in gparams.iter_mut().zip(sums.psum).take(self.n_params) {
            gp[l] = s;
        }
        if bw.adam.is_some() {
            let tf = &mut since_fired[l];
            *tf = if sums.any_fired { 0 } else { *tf + n as u64 };
        }
        match &bw.adam {
            None => {
                grad_dec[rows.clone()].copy_from_slice(g_dec);
                grad_enc[rows].copy_from_slice(g_enc);
            }
            Some(ad) => {
                let lu = &mut last_update[l];
                let missed = bw.t - *lu - 1;
                *lu = bw.t;
                let (ve, vd) = (&mut v_enc[rows.clone()], &mut v_dec[rows]);
                ad.catch_up(ve, missed);
                ad.catch_up(vd, missed);
                ad.update(we, row_in(m_enc, l, d_in), ve, g_enc);
                if self.unit_norm {
                    // Remove the component along d_j (|d_j| = 1).
                    let along = dot(g_dec, wd);
                    axpy(-along, wd, g_dec);
                }
                ad.update(wd, row_in(m_dec, l, d_in), vd, g_dec);
                if self.unit_norm {
                    let nrm = dot(wd, wd).sqrt();
                    if nrm > 0.0 {
                        let inv = 1.0 / nrm;
                        wd.iter_mut().for_each(|v| *v *= inv);
                    }
                }
            }
        }
    }

    /// The residual rows of latent `j`'s entries `entries` (within one block of rows):
    /// `g_dec += f s r_b` (and AuxK's `a s_aux r_aux_b`), four rows per pass, and `d_j . r_b`
    /// into `dots` unless the decode took it. `d_j` is the latent's decoder row before this
    /// step's update.
    fn residual_rows(
        &self,
        j: usize,
        d_j: &[f32],
        entries: std::ops::Range<usize>,
        g_dec: &mut [f32],
        dots: &mut [f32],
    ) {
        let (d_in, bw) = (self.d_in, &self.bw);
        let n_heads = self.widths.len();
        let band = band_of(self.widths, j);
        let half = !self.resid_h.is_empty();
        let ents = &self.lat_ent[entries];
        let resid_at = |le: &LatEntry| (le.row as usize * n_heads + band) * d_in;
        for (g, group) in ents.chunks(4).enumerate() {
            // Random rows: fetch the next group's while this one computes.
            for nx in ents.iter().skip(4 * g + PREFETCH_AHEAD).take(4) {
                match half {
                    true => prefetch_rows(self.resid_h, resid_at(nx), d_in),
                    false => prefetch_rows(self.resid, resid_at(nx), d_in),
                }
                if bw.aux_trains_dec {
                    prefetch_rows(self.aux, nx.row as usize * d_in, d_in);
                }
            }
            let c_dec: [f32; 4] =
                std::array::from_fn(|q| group.get(q).map_or(0.0, |le| le.f * bw.resid_scale));
            let rs: [usize; 4] = std::array::from_fn(|q| group.get(q).map_or(0, resid_at));
            let dots = &mut dots[4 * g..4 * g + group.len()];
            let (resid, resid_h) = (self.resid, self.resid_h);
            match (group.len() == 4, bw.decode_dots, half) {
                (true, false, false) => dots.copy_from_slice(&dot4_axpy4(
                    rs.map(|r| &resid[r..r + d_in]),
                    d_j,
                    c_dec,
                    g_dec,
                )),
                (true, false, true) => dots.copy_from_slice(&dot4_axpy4_h(
                    rs.map(|r| &resid_h[r..r + d_in]),
                    d_j,
                    c_dec,
                    g_dec,
                )),
                (true, true, false) => axpy4(c_dec, rs.map(|r| &resid[r..r + d_in]), g_dec),
                (true, true, true) => axpy4_h(c_dec, rs.map(|r| &resid_h[r..r + d_in]), g_dec),
                (false, known, _) => {
                    for (q, d) in dots.iter_mut().enumerate() {
                        let r = rs[q]..rs[q] + d_in;
                        match half {
                            false => {
                                if !known {
                                    *d = dot(&resid[r.clone()], d_j);
                                }
                                axpy(c_dec[q], &resid[r], g_dec);
                            }
                            true => {
                                if !known {
                                    *d = dot_h(&resid_h[r.clone()], d_j);
                                }
                                axpy_h(c_dec[q], &resid_h[r], g_dec);
                            }
                        }
                    }
                }
            }
            if bw.aux_trains_dec {
                // AuxK's reconstruction (dead latents only): its residual row too.
                for le in group.iter().filter(|le| le.a != 0.0) {
                    let b = le.row as usize * d_in;
                    axpy(le.a * bw.aux_scale, &self.aux[b..b + d_in], g_dec);
                }
            }
        }
    }

    /// The architecture's backward rule for each of latent `j`'s entries `entries`, in row
    /// order: the latent's sums, and in `coef` (which holds `d_j . r_b` where the decode did
    /// not take it) each entry's pre-activation gradient.
    fn entry_rules(
        &self,
        j: usize,
        entries: std::ops::Range<usize>,
        coef: &mut [f32],
        sums: &mut LatentSums,
    ) {
        let bw = &self.bw;
        for (le, c) in self.lat_ent[entries].iter().zip(coef) {
            let (f, a) = (le.f, le.a);
            if f != 0.0 {
                sums.any_fired |= f > 0.0;
                sums.sum_f += f;
            }
            let dot_r = if bw.decode_dots { le.dot_r } else { *c };
            let ent = Entry {
                j,
                pre: le.pre,
                f,
                a,
            };
            let (df, da) = (bw.resid_scale * dot_r, bw.aux_scale * le.dot_a);
            let eg = self.arch.entry_backward(&self.ctx, ent, df, da);
            sums.colsum += eg.gpre;
            for (s, g) in sums.psum.iter_mut().zip(&eg.params).take(self.n_params) {
                *s += g;
            }
            *c = eg.gpre;
        }
    }

    /// `g_enc += gpre x_b` over the input rows of one latent's entries `entries` (within one
    /// block of rows), four rows per pass; `gpre` is in `coef`.
    fn input_rows(&self, entries: std::ops::Range<usize>, g_enc: &mut [f32], coef: &[f32]) {
        let d_in = self.d_in;
        let half = !self.xc_h.is_empty();
        let ents = &self.lat_ent[entries];
        for (g, group) in ents.chunks(4).enumerate() {
            for nx in ents.iter().skip(4 * g + PREFETCH_AHEAD).take(4) {
                match half {
                    true => prefetch_rows(self.xc_h, nx.row as usize * d_in, d_in),
                    false => prefetch_rows(self.xc, nx.row as usize * d_in, d_in),
                }
            }
            let c = &coef[4 * g..4 * g + group.len()];
            let xs: [usize; 4] =
                std::array::from_fn(|q| group.get(q).map_or(0, |le| le.row as usize * d_in));
            let (xc, xc_h) = (self.xc, self.xc_h);
            if let &[c0, c1, c2, c3] = c {
                match half {
                    false => axpy4([c0, c1, c2, c3], xs.map(|r| &xc[r..r + d_in]), g_enc),
                    true => axpy4_h([c0, c1, c2, c3], xs.map(|r| &xc_h[r..r + d_in]), g_enc),
                }
            } else {
                for (&c, x) in c.iter().zip(xs) {
                    match half {
                        false => axpy(c, &xc[x..x + d_in], g_enc),
                        true => axpy_h(c, &xc_h[x..x + d_in], g_enc),
                    }
                }
            }
        }
    }
}

/// Row `r`'s bf16 residuals in a chunk's share of them (empty when there are none).
fn row_h(res_h: &mut [u16], r: usize, rd: usize) -> &mut [u16] {
    match res_h.is_empty() {
        true => res_h,
        false => &mut res_h[r * rd..(r + 1) * rd],
    }
}

/// What every task of the decode reads; its three parts run per chunk of `ROW_CHUNK` rows.
struct DecodeRows<'a> {
    x: &'a [f32],
    n: usize,
    d_in: usize,
    n_heads: usize,
    widths: &'a [usize],
    dense: bool,
    half: bool,
    aux_mode: AuxMode,
    w_dec: &'a [f32],
    w_dec_h: &'a [u16],
    b_dec: &'a [f32],
    row_ptr: &'a [usize],
    idx: &'a [u32],
    fv: &'a [f32],
    av: &'a [f32],
}

impl DecodeRows<'_> {
    /// The rows of chunk `c`.
    fn chunk_rows(&self, c: usize) -> std::ops::Range<usize> {
        c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(self.n)
    }

    /// Prefetches decoder row `j` as the gathers read it (f32 or bf16).
    fn prefetch(&self, j: usize) {
        let at = j * self.d_in;
        match self.half {
            true => prefetch_rows(self.w_dec_h, at, self.d_in),
            false => prefetch_rows(self.w_dec, at, self.d_in),
        }
    }

    /// Chunk `c`'s entries into `ents`, row by row (none on the dense path); returns where
    /// each row's end.
    fn chunk_entries(&self, c: usize, ents: &mut Vec<u32>) -> [usize; ROW_CHUNK] {
        ents.clear();
        let mut ends = [0usize; ROW_CHUNK];
        for (r, b) in self.chunk_rows(c).enumerate() {
            if !self.dense {
                ents.extend((self.row_ptr[b]..self.row_ptr[b + 1]).map(|e| e as u32));
            }
            ends[r] = ents.len();
        }
        ends
    }

    /// Row `b`'s active latents where the GEMMs made x_hat and the aux reconstruction.
    fn dense_l0(&self, b: usize) -> u64 {
        let f = &self.fv[self.row_ptr[b]..self.row_ptr[b + 1]];
        f.iter().filter(|f| **f != 0.0).count() as u64
    }

    /// Adds entries `ents[mine]` (one row's, of one slice of latents) to its reconstructions:
    /// `bands` (one `d_in` band per head: band q the partial sum of band q's latents, the last
    /// the whole dictionary's) and `aux`; `first` starts them from zero (the frozen decoder's
    /// aux from b_dec). Slices come in latent order and each row's main entries, and its aux
    /// entries, ascend in latent, so the sums are those of one pass over the row.
    fn gather_row(
        &self,
        bands: &mut [f32],
        aux: &mut [f32],
        st: &mut RowStats,
        ents: &[u32],
        mine: std::ops::Range<usize>,
        first: bool,
    ) {
        let (d_in, n_heads) = (self.d_in, self.n_heads);
        let (idx, fv, av, w_dec, w_dec_h) = (self.idx, self.fv, self.av, self.w_dec, self.w_dec_h);
        let (front, res) = bands.split_at_mut(bands.len() - d_in);
        if first {
            front.fill(0.0);
            res.fill(0.0);
            match self.aux_mode {
                AuxMode::None => {}
                AuxMode::FrozenDecoder => aux.copy_from_slice(self.b_dec),
                AuxMode::AuxK => aux.fill(0.0),
            }
        }
        // Across row ends too: the chunk's next row's entries follow.
        let ahead = |i: usize| {
            if let Some(&e) = ents.get(i + PREFETCH_AHEAD) {
                self.prefetch(idx[e as usize] as usize);
            }
        };
        // One head: four entries per pass over the residual.
        let mut i = mine.start;
        while n_heads == 1 && i + 4 <= mine.end {
            let es: [usize; 4] = std::array::from_fn(|q| ents[i + q] as usize);
            let js = es.map(|e| idx[e] as usize * d_in);
            let (f4, a4) = (es.map(|e| fv[e]), es.map(|e| av[e]));
            (0..4).for_each(|q| ahead(i + q));
            st.l0 += f4.iter().filter(|f| **f != 0.0).count() as u64;
            let with_aux = a4.iter().any(|a| *a != 0.0);
            match (self.half, with_aux) {
                (false, false) => axpy4(f4, js.map(|r| &w_dec[r..r + d_in]), res),
                (false, true) => axpy2x4(f4, a4, js.map(|r| &w_dec[r..r + d_in]), res, aux),
                (true, false) => axpy4_h(f4, js.map(|r| &w_dec_h[r..r + d_in]), res),
                (true, true) => axpy2x4_h(f4, a4, js.map(|r| &w_dec_h[r..r + d_in]), res, aux),
            }
            i += 4;
        }
        for (i, &e) in ents.iter().enumerate().take(mine.end).skip(i) {
            let e = e as usize;
            let j = idx[e] as usize;
            let rows = j * d_in..(j + 1) * d_in;
            ahead(i);
            let (f, a) = (fv[e], av[e]);
            st.l0 += (f != 0.0) as u64;
            // Band partial sums first; prefix sums of the bands below.
            let q = if n_heads == 1 {
                0
            } else {
                band_of(self.widths, j)
            };
            let dst = if q + 1 == n_heads {
                &mut *res
            } else {
                &mut front[q * d_in..(q + 1) * d_in]
            };
            match (self.half, a == 0.0) {
                (_, true) if f == 0.0 => {}
                (false, true) => axpy(f, &w_dec[rows], dst),
                (false, false) => axpy2(f, a, &w_dec[rows], dst, aux),
                (true, true) => axpy_h(f, &w_dec_h[rows], dst),
                (true, false) => axpy2_h(f, a, &w_dec_h[rows], dst, aux),
            }
        }
    }

    /// After every slice's gather: row `b`'s residuals (b_dec added, x taken off, heads
    /// combined into band residuals), its statistics, aux residual and bf16 copy (`res_h`,
    /// empty unless `half`).
    fn finish_row(
        &self,
        b: usize,
        bands: &mut [f32],
        aux: &mut [f32],
        st: &mut RowStats,
        res_h: &mut [u16],
    ) {
        let (d_in, n_heads, b_dec) = (self.d_in, self.n_heads, self.b_dec);
        let rd = d_in * n_heads;
        let xb = &self.x[b * d_in..(b + 1) * d_in];
        {
            let (front, res) = bands.split_at_mut(rd - d_in);
            if self.dense {
                axpy(1.0, b_dec, res);
                if self.aux_mode == AuxMode::FrozenDecoder {
                    axpy(1.0, b_dec, aux);
                }
            } else if n_heads == 1 {
                axpy(1.0, b_dec, res);
            } else {
                // x_hat of head q = b_dec + bands 0..=q: prefix sums in place.
                axpy(1.0, b_dec, &mut front[..d_in]);
                for q in 1..n_heads - 1 {
                    let (below, band) = front.split_at_mut(q * d_in);
                    axpy(1.0, &below[(q - 1) * d_in..], &mut band[..d_in]);
                }
                axpy(1.0, &front[(n_heads - 2) * d_in..], res);
            }
            for q in 0..n_heads - 1 {
                let band = &mut front[q * d_in..(q + 1) * d_in];
                for i in 0..d_in {
                    band[i] -= xb[i];
                }
                st.heads2 += dot(band, band) as f64;
            }
            for i in 0..d_in {
                res[i] -= xb[i];
                st.full_sum[i] += res[i] as f64;
                st.x_sum[i] += xb[i] as f64;
            }
            st.err2 += dot(res, res) as f64;
            st.x2 += dot(xb, xb) as f64;
        }
        // Band q's residual: the sum of the head residuals from q up.
        for q in (0..n_heads - 1).rev() {
            let (lo, hi) = bands.split_at_mut((q + 1) * d_in);
            axpy(1.0, &hi[..d_in], &mut lo[q * d_in..]);
        }
        for (s, v) in st.resid_sum.iter_mut().zip(&bands[..d_in]) {
            *s += *v as f64;
        }
        if self.half {
            round_to_bf16(bands, res_h);
        }
        let res = &bands[rd - d_in..];
        match self.aux_mode {
            AuxMode::None => {}
            // ||x - x_hat_frozen(relu(pi_gate))||^2
            AuxMode::FrozenDecoder => {
                for i in 0..d_in {
                    aux[i] -= xb[i];
                }
            }
            // e_hat - e with e = x - x_hat = -res
            AuxMode::AuxK => {
                for i in 0..d_in {
                    aux[i] += res[i];
                }
            }
        }
        if self.aux_mode != AuxMode::None {
            st.aux2 += dot(aux, aux) as f64;
        }
    }

    /// `d_j . r_aux_b` (unscaled) of one row's entries `ents` (indices into the step's
    /// entries) that are in the aux reconstruction, into `dots` (which starts at entry
    /// `base`); where every entry has one (the frozen decoder) `d_j . r_b` comes along.
    /// Otherwise the latent pass takes `d_j . r_b`, beside its own reads of `r_b`. The
    /// entries go in reverse: the gather just read their decoder rows in order, so the last
    /// ones are the likeliest still in cache (the dots are independent, so the bits are the
    /// same in any order).
    fn aux_dots_row(
        &self,
        bands: &[f32],
        aux: &[f32],
        ents: &[u32],
        dots: &mut [[f32; 2]],
        base: usize,
    ) {
        if self.aux_mode == AuxMode::None || self.dense {
            return;
        }
        let (d_in, n_heads) = (self.d_in, self.n_heads);
        let (idx, w_dec, w_dec_h) = (self.idx, self.w_dec, self.w_dec_h);
        let both = self.aux_mode == AuxMode::FrozenDecoder;
        for (i, &e) in ents.iter().enumerate().rev() {
            let e = e as usize;
            let in_aux = self.av[e] != 0.0;
            if !both && !in_aux {
                continue;
            }
            if let Some(&ahead) = i.checked_sub(PREFETCH_AHEAD).and_then(|a| ents.get(a)) {
                self.prefetch(idx[ahead as usize] as usize);
            }
            let j = idx[e] as usize;
            let rows = j * d_in..(j + 1) * d_in;
            let q = if n_heads == 1 {
                0
            } else {
                band_of(self.widths, j)
            };
            let rq = &bands[q * d_in..(q + 1) * d_in];
            dots[e - base] = match (self.half, both, in_aux) {
                (false, true, true) => dot2(&w_dec[rows], rq, aux).into(),
                (true, true, true) => dot2_h(&w_dec_h[rows], rq, aux).into(),
                (false, true, false) => [dot(&w_dec[rows], rq), 0.0],
                (true, true, false) => [dot_h(&w_dec_h[rows], rq), 0.0],
                (false, false, _) => [0.0, dot(&w_dec[rows], aux)],
                (true, false, _) => [0.0, dot_h(&w_dec_h[rows], aux)],
            };
        }
    }
}

/// A block of rows' entries bucketed by decoder slice: slice `s`'s entries of the block's
/// row `r` are `ents[starts[s * rows + r]..starts[s * rows + r + 1]]`, in the row's order.
#[derive(Default)]
struct SliceEntries {
    ents: Vec<u32>,
    starts: Vec<usize>,
    rows: usize,
}

impl SliceEntries {
    /// Buckets the entries of `rows` of the batch (a counting sort by slice, then row).
    fn fill(
        &mut self,
        dec: &DecodeRows,
        rows: std::ops::Range<usize>,
        slices: usize,
        d_sae: usize,
    ) {
        let n_rows = rows.len();
        self.rows = n_rows;
        // Latent j lies in slice s when s d_sae / slices <= j < (s + 1) d_sae / slices.
        let slice_of = |j: u32| {
            let s = ((j as usize + 1) * slices).div_ceil(d_sae) - 1;
            debug_assert!((s * d_sae / slices..(s + 1) * d_sae / slices).contains(&(j as usize)));
            s
        };
        self.starts.clear();
        self.starts.resize(slices * n_rows + 1, 0);
        self.ents.clear();
        if dec.dense {
            return;
        }
        // Counts, their prefix sums as each bucket's start, then each entry placed at its
        // bucket's cursor; the cursors end at the next bucket's start, so one shift restores
        // the starts.
        for (r, b) in rows.clone().enumerate() {
            for &j in &dec.idx[dec.row_ptr[b]..dec.row_ptr[b + 1]] {
                self.starts[slice_of(j) * n_rows + r + 1] += 1;
            }
        }
        for i in 1..self.starts.len() {
            self.starts[i] += self.starts[i - 1];
        }
        self.ents
            .resize(dec.row_ptr[rows.end] - dec.row_ptr[rows.start], 0);
        for (r, b) in rows.enumerate() {
            for e in dec.row_ptr[b]..dec.row_ptr[b + 1] {
                let slot = &mut self.starts[slice_of(dec.idx[e]) * n_rows + r];
                self.ents[*slot] = e as u32;
                *slot += 1;
            }
        }
        let last = self.starts.len() - 1;
        self.starts.copy_within(0..last, 1);
        self.starts[0] = 0;
    }

    /// Where slice `s`'s entries of the block's row `r` lie in `ents`.
    fn of(&self, s: usize, r: usize) -> std::ops::Range<usize> {
        let i = s * self.rows + r;
        self.starts[i]..self.starts[i + 1]
    }
}

impl RowStats {
    /// Zero, for a new step.
    fn reset(&mut self, d_in: usize) {
        self.err2 = 0.0;
        self.heads2 = 0.0;
        self.aux2 = 0.0;
        self.x2 = 0.0;
        self.l0 = 0;
        for v in [&mut self.resid_sum, &mut self.x_sum, &mut self.full_sum] {
            v.clear();
            v.resize(d_in, 0.0);
        }
    }
}

/// Resizing helper over the entry arrays of different element types.
trait ClearLen {
    fn clear_to(&mut self, len: usize);
}
impl<T: Copy + Default> ClearLen for Vec<T> {
    fn clear_to(&mut self, len: usize) {
        self.clear();
        self.resize(len, T::default());
    }
}

/// What the screened step's first two phases leave, for tests.
#[cfg(test)]
pub(crate) struct ScreenedPre {
    pub xc: Vec<f32>,
    /// W_enc^T, `[d_sae, d_in]`.
    pub w_enc_t: Vec<f32>,
    /// The pre-activations as selection reads them (the screen's lists over `pre`).
    pub pre: Vec<f32>,
    /// The rule's cutoffs as `Arch::screen_cutoff` gives them.
    pub cutoff: Vec<f32>,
    pub refined: usize,
}

#[cfg(test)]
impl SaeTrainer {
    /// The encoder product and the screen alone, on a trainer whose steps screen.
    pub(crate) fn screened_pre(&mut self, x: &[f32], n: usize) -> ScreenedPre {
        self.encode(x, n);
        assert!(self.buf.screening, "this trainer does not screen");
        self.screen(n);
        // As selection reads them: the lists' values over `pre`.
        let mut pre = self.buf.pre[..n * self.d_sae].to_vec();
        let lists = &self.buf.screen_lists;
        for (b, row) in pre.chunks_mut(self.d_sae).enumerate() {
            let at = lists.ptr[b]..lists.ptr[b + 1];
            for (&j, &v) in lists.idx[at.clone()].iter().zip(&lists.val[at]) {
                row[j as usize] = v;
            }
        }
        ScreenedPre {
            xc: self.buf.xc.clone(),
            w_enc_t: self.w_enc_t.clone(),
            pre,
            cutoff: self.buf.screen.cut_raw.clone(),
            refined: self.buf.screen_refined,
        }
    }
}

/// Phase timings printed to stderr when `SAE_CORE_PROFILE` is set (a development aid).
pub(super) struct Profiler {
    on: bool,
    last: std::time::Instant,
    laps: Vec<(&'static str, f64)>,
}

impl Profiler {
    pub(super) fn new() -> Self {
        Profiler {
            on: std::env::var_os("SAE_CORE_PROFILE").is_some(),
            last: std::time::Instant::now(),
            laps: Vec::new(),
        }
    }
    pub(super) fn lap(&mut self, name: &'static str) {
        if self.on {
            let now = std::time::Instant::now();
            self.laps
                .push((name, (now - self.last).as_secs_f64() * 1e3));
            self.last = now;
        }
    }
    pub(super) fn report(&self) {
        if self.on {
            let parts: Vec<String> = self
                .laps
                .iter()
                .map(|(n, t)| format!("{n} {t:.1}ms"))
                .collect();
            eprintln!("step: {}", parts.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The decode takes the frozen decoder's aux row by row where a slice is larger than
    /// L2, and in slices otherwise and for every other family.
    #[test]
    fn frozen_decoder_decodes_row_by_row_where_l2_is_smaller_than_a_slice() {
        // d_sae 9216 at d_in 576 in f32: 21 MB of W_dec, 11 slices of at most 2 MB.
        let (d_sae, row_bytes) = (9216, 576 * 4);
        let mut buf = Buffers {
            l2_bytes: 512 << 10,
            ..Buffers::default()
        };
        assert_eq!(
            buf.decode_slices(d_sae, row_bytes, AuxMode::FrozenDecoder),
            1
        );
        assert_eq!(buf.decode_slices(d_sae, row_bytes, AuxMode::None), 11);
        assert_eq!(buf.decode_slices(d_sae, row_bytes, AuxMode::AuxK), 11);
        for l2 in [GATHER_SLICE_BYTES, usize::MAX] {
            buf.l2_bytes = l2;
            assert_eq!(
                buf.decode_slices(d_sae, row_bytes, AuxMode::FrozenDecoder),
                11
            );
        }
        // The tests' small slices are sliced whatever the L2.
        buf.l2_bytes = 512 << 10;
        buf.gather_slice_bytes = 3 * row_bytes;
        assert_eq!(buf.decode_slices(10, row_bytes, AuxMode::FrozenDecoder), 4);
    }

    /// The parallel transposition against a plain counting sort, on 1, 2 and 3 threads:
    /// every latent's entries in entry order, whatever the thread count.
    #[test]
    fn transpose_entries_matches_a_counting_sort_on_any_thread_count() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (d_sae, total) = (37, 1000);
        // Latents past d_sae - 3 get no entries.
        let mut buf = Buffers {
            idx: (0..total)
                .map(|_| rng.gen_range(0..d_sae as u32 - 3))
                .collect(),
            row_of: (0..total as u32).map(|e| e / 7).collect(),
            f: (0..total).map(|_| rng.gen()).collect(),
            a: (0..total).map(|_| rng.gen()).collect(),
            pre_e: (0..total).map(|_| rng.gen()).collect(),
            dots: (0..total).map(|_| [rng.gen(), rng.gen()]).collect(),
            ..Buffers::default()
        };
        let mut want: Vec<Vec<usize>> = vec![Vec::new(); d_sae];
        for (e, &j) in buf.idx.iter().enumerate() {
            want[j as usize].push(e);
        }
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| buf.transpose_entries(d_sae));
            for (j, es) in want.iter().enumerate() {
                let got = &buf.lat_ent[buf.lat_ptr[j]..buf.lat_ptr[j + 1]];
                assert_eq!(got.len(), es.len(), "latent {j}, {threads} threads");
                for (le, &e) in got.iter().zip(es) {
                    let ent = (le.row, le.f, le.a, le.pre, [le.dot_r, le.dot_a]);
                    let from = (buf.row_of[e], buf.f[e], buf.a[e], buf.pre_e[e], buf.dots[e]);
                    assert_eq!(ent, from, "latent {j}, entry {e}, {threads} threads");
                }
            }
            assert_eq!(buf.lat_ptr[d_sae], total);
        }
    }

    /// A top-k row's scan takes its list from the entries above the carried floor only where
    /// no entry below the floor can pass, and gives the list of the test over the whole row
    /// either way: after a row whose floor lands a margin above the next row's k-th bound
    /// (each entry below the floor then passes), and after one whose floor lies far under
    /// it. The reference is the whole row's test at the same k-th bound.
    #[test]
    fn top_k_scan_lists_what_the_whole_row_test_lists() {
        let (d_in, d_sae, k) = (64, 300, 6);
        let inputs = ScreenInputs {
            cut: vec![0.0; d_sae],
            cut_raw: vec![0.0; d_sae],
            wn: vec![1.0; d_sae],
            ew: vec![0.01; d_sae],
            largest: (0.0, 0.01, 1.0),
            ..ScreenInputs::default()
        };
        let bounds = ScreenBounds::new(d_in, Some(TopKScope::Row(k)), &inputs, &[]);
        let x = vec![0.5f32; d_in];
        let (nx, ex) = norm_and_bf16_error(&x);
        let terms = bounds.margin.row(nx, ex);
        let m = bounds.margin_of(0, terms);
        assert!(m > 0.0);
        let whole_row = |row: &[f32], floor: f32| {
            let mut s = ScanScratch {
                floor,
                ..ScanScratch::default()
            };
            let theta = bounds.kth_floor(k, row, terms, &mut s);
            let (p, q, c) = terms;
            let mut lo = vec![0.0; d_sae];
            screen_bounds(
                &inputs.cut,
                &inputs.ew,
                &inputs.wn,
                p,
                q,
                raised(c, theta),
                &mut lo,
            );
            let mut idx = Vec::new();
            indices_above(row, &lo, &mut idx);
            idx
        };
        let top = |v: f32, rest: f32| {
            let mut row = vec![rest; d_sae];
            row[..k].fill(v);
            row
        };
        let mut s = ScanScratch::default();
        let first = top(40.0 * m, 0.0);
        let mut idx = Vec::new();
        bounds.scan(&x, &first, &mut s, &mut idx);
        assert_eq!(idx, whole_row(&first, 0.0), "first row");
        // k entries an eighth of a margin above the floor, the rest half a margin below.
        let floor = s.floor;
        let near = top(floor + m / 8.0, floor - m / 2.0);
        idx.clear();
        bounds.scan(&x, &near, &mut s, &mut idx);
        let want = whole_row(&near, floor);
        assert_eq!(want.len(), d_sae, "every entry passes");
        assert_eq!(idx, want, "a floor just under the k-th");
        // The floor now lies far under the scores of a row like the first.
        let floor = s.floor;
        idx.clear();
        bounds.scan(&x, &first, &mut s, &mut idx);
        assert_eq!(idx, whole_row(&first, floor), "a floor far under the k-th");
        // AuxK latents keep their own cutoffs: two below the floor (at 0, over their cutoff
        // less its margin) pass as well, one among the top k stays once.
        let dead = [5u32, 100, 250];
        let mut with_dead = ScreenInputs {
            dead_mask: vec![false; d_sae],
            ..inputs.clone()
        };
        dead.iter()
            .for_each(|&j| with_dead.dead_mask[j as usize] = true);
        let bounds = ScreenBounds::new(d_in, Some(TopKScope::Row(k)), &with_dead, &dead);
        let mut s = ScanScratch::default();
        idx.clear();
        bounds.scan(&x, &first, &mut s, &mut idx);
        let mut want: Vec<u32> = (0..k as u32).collect();
        want.extend([100, 250]);
        assert_eq!(idx, want, "AuxK latents");
    }
}
