//! The body of one training step: selection, decode, gradients, Adam.

use super::shared::{SharedRows, SharedU64};
use super::{Mode, SaeTrainer, StepStats};
use crate::arch::{AuxMode, Entry, RowOut, StepCtx};
use crate::kernels::{
    acc2, acc3, axpy, axpy2, dot, dot2, matmul, matmul_tn, matmul_xt, prefetch_rows,
    split_by_lengths,
};
use crate::optim::AdamStep;
use rayon::prelude::*;

/// BatchTopK inference threshold: bias-corrected EMA of each batch's selection threshold
/// (close to the paper's mean over batches early on, DL's EMA with beta 0.999 later).
pub(super) const THRESHOLD_EMA_BETA: f64 = 0.999;
/// Rows per task in the row passes and latents per task in the latent pass. Fixed sizes keep
/// every reduction in a fixed order: results are bit-for-bit reproducible for a thread count.
const ROW_CHUNK: usize = 16;
const LAT_CHUNK: usize = 32;
/// Above this fraction of non-zero (token, latent) entries the step uses dense GEMMs for the
/// decode and the gradients (a handful of GEMMs beat the sparse passes there).
pub(super) const DENSE_FRACTION: f64 = 1.0 / 16.0;

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
    dots: Vec<[f32; 2]>,
    /// Dense-mode buffers: a second `[n, d_sae]` matrix and the W_enc / W_dec gradients.
    dense2: Vec<f32>,
    genc: Vec<f32>,
    gdec: Vec<f32>,
    lat_fill: Vec<usize>,
    lat_scratch: Vec<f32>,
    bdec_part: Vec<f32>,
    dec_norm: Vec<f32>,
    dead: Vec<u32>,
    cutoff: Vec<f32>,
    gparams: Vec<Vec<f32>>,
}

/// An entry as the latent pass reads it (sorted by latent).
#[derive(Clone, Copy, Default)]
struct LatEntry {
    row: u32,
    f: f32,
    a: f32,
    pre: f32,
    /// `d_j . r_b` and `d_j . r_aux_b`, before the loss scales.
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

impl SaeTrainer {
    pub(super) fn run(
        &mut self,
        x: &[f32],
        n: usize,
        sparsity_coeff: f32,
        mode: Mode,
    ) -> StepStats {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        assert_eq!(
            x.len(),
            n * d_in,
            "step: x has {} values, expected n * d_in",
            x.len()
        );
        if n == 0 {
            return StepStats::default();
        }
        let buf = &mut self.buf;
        let n_row_chunks = n.div_ceil(ROW_CHUNK);

        let mut prof = Profiler::new();
        // 1. Centre and the one dense product.
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
        matmul_xt(&buf.xc, n, d_in, &self.w_enc_t, d_sae, &mut buf.pre);

        prof.lap("gemm");
        // Per-step inputs of the architecture.
        buf.dec_norm.clear();
        if self.arch.needs_dec_norm() {
            buf.dec_norm.resize(d_sae, 0.0);
            let w_dec = &self.w_dec;
            buf.dec_norm
                .par_iter_mut()
                .enumerate()
                .for_each(|(j, nrm)| {
                    let r = &w_dec[j * d_in..(j + 1) * d_in];
                    *nrm = dot(r, r).sqrt();
                });
        }
        buf.dead.clear();
        if self.arch.aux_mode() == AuxMode::AuxK {
            let w = self.hyper.dead_window_tokens;
            buf.dead
                .extend((0..d_sae as u32).filter(|&j| self.tokens_since_fired[j as usize] >= w));
        }
        let mut ctx = StepCtx {
            n,
            d_sae,
            sparsity_coeff,
            hyper: &self.hyper,
            params: &self.params,
            dec_norm: &buf.dec_norm,
            dead: &buf.dead,
            batch_threshold: self.last_batch_threshold,
            cutoff: &[],
        };
        let batch_threshold = self.arch.prepare_batch(&ctx, &buf.pre);
        ctx.batch_threshold = batch_threshold;
        if self
            .arch
            .prefilter(&self.params, batch_threshold, &mut buf.cutoff)
        {
            ctx.cutoff = &buf.cutoff;
        }

        prof.lap("prep");
        // 2. Sparse selection, row-parallel into per-chunk buffers, then flattened to CSR.
        buf.chunks.resize_with(n_row_chunks, ChunkOut::default);
        let arch = &*self.arch;
        buf.pre
            .par_chunks(d_sae * ROW_CHUNK)
            .zip(buf.chunks.par_iter_mut())
            .for_each(|(rows, ch)| {
                ch.out.clear();
                ch.row_len.clear();
                for row in rows.chunks(d_sae) {
                    let before = ch.out.idx.len();
                    arch.select_row(&ctx, row, &mut ch.out);
                    ch.row_len.push(ch.out.idx.len() - before);
                }
            });
        let total: usize = buf.chunks.iter().map(|c| c.out.idx.len()).sum();
        let mut sparsity_sum = 0.0f64;
        buf.row_ptr.clear();
        buf.row_ptr.push(0);
        for (v, len) in [
            (&mut buf.idx as &mut dyn ClearLen, total),
            (&mut buf.f, total),
            (&mut buf.a, total),
            (&mut buf.pre_e, total),
            (&mut buf.row_of, total),
        ] {
            v.clear_to(len);
        }
        {
            let mut pos = 0;
            let mut row = 0u32;
            for ch in &buf.chunks {
                let m = ch.out.idx.len();
                buf.idx[pos..pos + m].copy_from_slice(&ch.out.idx);
                buf.f[pos..pos + m].copy_from_slice(&ch.out.f);
                buf.a[pos..pos + m].copy_from_slice(&ch.out.a);
                buf.pre_e[pos..pos + m].copy_from_slice(&ch.out.pre);
                for &l in &ch.row_len {
                    let start = *buf.row_ptr.last().unwrap();
                    buf.row_ptr.push(start + l);
                    buf.row_of[start..start + l].fill(row);
                    row += 1;
                }
                sparsity_sum += ch.out.sparsity;
                pos += m;
            }
        }

        prof.lap("select");
        // 3. Decode and residuals: resid = x_hat - x; aux = aux reconstruction residual.
        // With several reconstruction heads (nested prefixes of widths[0] < ... < d_sae) each
        // row keeps one residual per head band q: R_q = sum over heads m >= q of
        // (x_hat_m - x), the residual that latents of band q (widths[q-1] <= j < widths[q])
        // reconstruct in every head containing them.
        let aux_mode = self.arch.aux_mode();
        let widths: Vec<usize> = match self.arch.heads() {
            [] => vec![d_sae],
            w => w.to_vec(),
        };
        let n_heads = widths.len();
        let band_of = |j: usize| widths.partition_point(|&w| w <= j);
        let rd = d_in * n_heads;
        buf.resid.resize(n * rd, 0.0);
        buf.aux.resize(n * d_in, 0.0);
        buf.chunk_stats.resize(n_row_chunks, RowStats::default());
        // Early in training codes can be dense (half the latents fire at init); then GEMMs
        // on dense copies of the code beat the row-by-row sparse passes.
        // The GEMM path decodes one head only.
        let dense = n_heads == 1 && total as f64 > self.dense_fraction * (n * d_sae) as f64;
        if dense {
            buf.dense2.resize(n * d_sae, 0.0);
            scatter_code(&mut buf.pre, &buf.row_ptr, &buf.idx, &buf.f, d_sae, 1.0);
            matmul(&buf.pre, n, d_sae, &self.w_dec, d_in, &mut buf.resid);
            if aux_mode != AuxMode::None {
                scatter_code(&mut buf.dense2, &buf.row_ptr, &buf.idx, &buf.a, d_sae, 1.0);
                matmul(&buf.dense2, n, d_sae, &self.w_dec, d_in, &mut buf.aux);
            }
        }
        {
            let (w_dec, b_dec) = (&self.w_dec, &self.b_dec);
            let (row_ptr, idx, fv, av) = (&buf.row_ptr, &buf.idx, &buf.f, &buf.a);
            buf.dots.resize(total, [0.0; 2]);
            let lens: Vec<usize> = (0..n_row_chunks)
                .map(|c| row_ptr[((c + 1) * ROW_CHUNK).min(n)] - row_ptr[c * ROW_CHUNK])
                .collect();
            let dot_pieces = split_by_lengths(&mut buf.dots, &lens);
            buf.resid
                .par_chunks_mut(rd * ROW_CHUNK)
                .zip(buf.aux.par_chunks_mut(d_in * ROW_CHUNK))
                .zip(buf.chunk_stats.par_iter_mut())
                .zip(dot_pieces)
                .enumerate()
                .for_each(|(c, (((res, aux), st), dots))| {
                    let base = row_ptr[c * ROW_CHUNK];
                    st.err2 = 0.0;
                    st.heads2 = 0.0;
                    st.aux2 = 0.0;
                    st.x2 = 0.0;
                    st.l0 = 0;
                    st.resid_sum.clear();
                    st.resid_sum.resize(d_in, 0.0);
                    st.x_sum.clear();
                    st.x_sum.resize(d_in, 0.0);
                    st.full_sum.clear();
                    st.full_sum.resize(d_in, 0.0);
                    let mut acc = vec![0f32; if n_heads > 1 { d_in } else { 0 }];
                    for (r, (bands, aux)) in
                        res.chunks_mut(rd).zip(aux.chunks_mut(d_in)).enumerate()
                    {
                        let b = c * ROW_CHUNK + r;
                        let xb = &x[b * d_in..(b + 1) * d_in];
                        let row_end = row_ptr[b + 1];
                        // The last band's slice is the whole dictionary's residual.
                        let (front, res) = bands.split_at_mut(rd - d_in);
                        if dense {
                            // x_hat and the aux reconstruction came from the GEMMs.
                            axpy(1.0, b_dec, res);
                            if aux_mode == AuxMode::FrozenDecoder {
                                axpy(1.0, b_dec, aux);
                            }
                            st.l0 += fv[row_ptr[b]..row_end]
                                .iter()
                                .filter(|f| **f != 0.0)
                                .count() as u64;
                        } else {
                            front.fill(0.0);
                            res.fill(0.0);
                            match aux_mode {
                                AuxMode::None => {}
                                AuxMode::FrozenDecoder => aux.copy_from_slice(b_dec),
                                AuxMode::AuxK => aux.fill(0.0),
                            }
                        }
                        for e in row_ptr[b]..if dense { row_ptr[b] } else { row_end } {
                            let j = idx[e] as usize;
                            let d = &w_dec[j * d_in..(j + 1) * d_in];
                            if e + 1 < row_end {
                                prefetch_rows(w_dec, idx[e + 1] as usize * d_in, d_in);
                            }
                            let (f, a) = (fv[e], av[e]);
                            st.l0 += (f != 0.0) as u64;
                            // Band partial sums first; prefix sums of the bands below.
                            let q = if n_heads == 1 { 0 } else { band_of(j) };
                            let dst = if q + 1 == n_heads {
                                &mut *res
                            } else {
                                &mut front[q * d_in..(q + 1) * d_in]
                            };
                            if a == 0.0 {
                                if f != 0.0 {
                                    axpy(f, d, dst);
                                }
                            } else {
                                axpy2(f, a, d, dst, aux);
                            }
                        }
                        if !dense && n_heads == 1 {
                            axpy(1.0, b_dec, res);
                        } else if !dense {
                            // x_hat of head q = b_dec + bands 0..=q.
                            acc.copy_from_slice(b_dec);
                            for q in 0..n_heads - 1 {
                                let band = &mut front[q * d_in..(q + 1) * d_in];
                                axpy(1.0, &acc, band);
                                acc.copy_from_slice(band);
                            }
                            axpy(1.0, &acc, res);
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
                        // Band q's residual: the sum of the head residuals from q up.
                        for q in (0..n_heads - 1).rev() {
                            let (lo, hi) = bands.split_at_mut((q + 1) * d_in);
                            axpy(1.0, &hi[..d_in], &mut lo[q * d_in..]);
                        }
                        for (s, v) in st.resid_sum.iter_mut().zip(&bands[..d_in]) {
                            *s += *v as f64;
                        }
                        let (front, res) = bands.split_at_mut(rd - d_in);
                        match aux_mode {
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
                        if aux_mode != AuxMode::None {
                            st.aux2 += dot(aux, aux) as f64;
                        }
                        // d_j . r_b and d_j . r_aux_b (unscaled): the rows d_j were just read
                        // for this token and are still in cache.
                        for e in row_ptr[b]..if dense { row_ptr[b] } else { row_end } {
                            let j = idx[e] as usize;
                            let d = &w_dec[j * d_in..(j + 1) * d_in];
                            if e + 1 < row_end {
                                prefetch_rows(w_dec, idx[e + 1] as usize * d_in, d_in);
                            }
                            let q = if n_heads == 1 { 0 } else { band_of(j) };
                            let rq = if q + 1 == n_heads {
                                &*res
                            } else {
                                &front[q * d_in..(q + 1) * d_in]
                            };
                            dots[e - base] = if aux_mode != AuxMode::None && av[e] != 0.0 {
                                let (u, v) = dot2(d, rq, aux);
                                [u, v]
                            } else {
                                [dot(d, rq), 0.0]
                            };
                        }
                    }
                });
        }
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
        let (aux_loss, aux_scale) = match aux_mode {
            AuxMode::None => (0.0, 0.0),
            AuxMode::FrozenDecoder => (aux2 / nf, resid_scale),
            AuxMode::AuxK => {
                // Var(e) * n with e = -res: sum ||e||^2 - n ||mean e||^2.
                let denom = err2 - full_sum.iter().map(|s| s * s).sum::<f64>() / nf;
                let alpha = self.hyper.aux_coeff as f64;
                if buf.dead.is_empty() || denom <= 0.0 || !denom.is_finite() {
                    (0.0, 0.0)
                } else {
                    (alpha * aux2 / denom, (2.0 * alpha / denom) as f32)
                }
            }
        };
        let mse = err2 / nf;
        let sparsity_loss = sparsity_coeff as f64 * sparsity_sum / nf;
        // The prefix heads' squared errors join the loss; `mse` and `fvu` stay those of the
        // whole dictionary.
        let mut stats = StepStats {
            loss: mse + heads2 / nf + sparsity_loss + aux_loss,
            mse,
            sparsity_loss,
            aux_loss,
            l0: l0 as f64 / nf,
            fvu: if x_var > 0.0 { err2 / x_var } else { f64::NAN },
            dead_latents: 0,
        };
        if !stats.loss.is_finite() {
            stats.dead_latents = self.count_dead();
            return stats;
        }

        if dense {
            // d_j . r_b for every (b, j) at once: R W_dec^T (and the same for the aux residual).
            matmul_xt(&buf.resid, n, d_in, &self.w_dec, d_sae, &mut buf.pre);
            let with_aux = aux_mode != AuxMode::None && aux_scale != 0.0;
            if with_aux {
                matmul_xt(&buf.aux, n, d_in, &self.w_dec, d_sae, &mut buf.dense2);
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
        prof.lap("decode");
        // 5. Transposed index (entries per latent, in entry order: deterministic).
        buf.lat_ptr.clear();
        buf.lat_ptr.resize(d_sae + 1, 0);
        for &j in &buf.idx {
            buf.lat_ptr[j as usize + 1] += 1;
        }
        for j in 0..d_sae {
            buf.lat_ptr[j + 1] += buf.lat_ptr[j];
        }
        buf.lat_fill.clear();
        buf.lat_fill.extend_from_slice(&buf.lat_ptr[..d_sae]);
        buf.lat_ent.resize(total, LatEntry::default());
        for (e, &j) in buf.idx.iter().enumerate() {
            let p = &mut buf.lat_fill[j as usize];
            buf.lat_ent[*p] = LatEntry {
                row: buf.row_of[e],
                f: buf.f[e],
                a: buf.a[e],
                pre: buf.pre_e[e],
                dot_r: buf.dots[e][0],
                dot_a: buf.dots[e][1],
            };
            *p += 1;
        }

        prof.lap("transpose");
        let aux_trains_dec = aux_mode == AuxMode::AuxK && aux_scale != 0.0;
        if dense {
            self.dense_gradients(
                n,
                sparsity_coeff,
                resid_scale,
                aux_scale,
                aux_trains_dec,
                batch_threshold,
            );
        }
        let buf = &mut self.buf;
        let ctx = StepCtx {
            n,
            d_sae,
            sparsity_coeff,
            hyper: &self.hyper,
            params: &self.params,
            dec_norm: &buf.dec_norm,
            dead: &buf.dead,
            batch_threshold,
            cutoff: &[],
        };
        let arch = &*self.arch;
        // 6. Latent pass: W_dec / W_enc row gradients fused with Adam.
        let t = self.steps + 1;
        let n_lat_chunks = d_sae.div_ceil(LAT_CHUNK);
        buf.bdec_part.clear();
        buf.bdec_part.resize(n_lat_chunks * d_in, 0.0);
        buf.lat_scratch.resize(n_lat_chunks * 2 * d_in, 0.0);
        buf.gparams.resize_with(self.params.len(), Vec::new);
        for g in buf.gparams.iter_mut() {
            g.clear();
            g.resize(d_sae, 0.0);
        }
        let adam = match &mode {
            Mode::Apply(lr) => Some(AdamStep::new(
                *lr,
                self.hyper.adam_beta1,
                self.hyper.adam_beta2,
                self.hyper.adam_eps,
                t,
            )),
            Mode::Collect(_) => None,
        };
        let dense_adam = self.hyper.adam_beta1 != 0.0;
        let unit_norm = self.arch.unit_norm_decoder();
        let centre = self.apply_b_dec_to_input;
        let mut mode = mode;
        let (grad_enc, grad_dec) = match &mut mode {
            Mode::Collect(g) => (
                SharedRows::new(&mut g.w_enc_t, d_in),
                SharedRows::new(&mut g.w_dec, d_in),
            ),
            Mode::Apply(_) => (
                SharedRows::new(&mut [], d_in),
                SharedRows::new(&mut [], d_in),
            ),
        };
        {
            let w_enc = SharedRows::new(&mut self.w_enc_t, d_in);
            let w_dec = SharedRows::new(&mut self.w_dec, d_in);
            let m_enc = SharedRows::new(&mut self.mom_enc.m, d_in);
            let v_enc = SharedRows::new(&mut self.mom_enc.v, d_in);
            let m_dec = SharedRows::new(&mut self.mom_dec.m, d_in);
            let v_dec = SharedRows::new(&mut self.mom_dec.v, d_in);
            let gparams: Vec<SharedRows> = buf
                .gparams
                .iter_mut()
                .map(|g| SharedRows::new(g, 1))
                .collect();
            let last = SharedU64(self.last_update.as_mut_ptr());
            let fired = SharedU64(self.tokens_since_fired.as_mut_ptr());
            let (lat_ptr, lat_ent) = (&buf.lat_ptr, &buf.lat_ent);
            let (resid, aux, xc) = (&buf.resid, &buf.aux, &buf.xc);
            let (dense_genc, dense_gdec) = (&buf.genc, &buf.gdec);
            let n_params = self.params.len();
            buf.bdec_part
                .par_chunks_mut(d_in)
                .zip(buf.lat_scratch.par_chunks_mut(2 * d_in))
                .enumerate()
                .for_each(|(c, (part, scratch))| {
                    let (g_dec, g_enc) = scratch.split_at_mut(d_in);
                    for j in c * LAT_CHUNK..((c + 1) * LAT_CHUNK).min(d_sae) {
                        let ents = &lat_ent[lat_ptr[j]..lat_ptr[j + 1]];
                        let band = band_of(j);
                        // SAFETY: latent j belongs to this task only.
                        let (wd, we) = unsafe { (w_dec.row(j), w_enc.row(j)) };
                        let mut any_fired = false;
                        if ents.is_empty() && !dense_adam && adam.is_some() {
                            unsafe { *fired.at(j) += n as u64 };
                            continue;
                        }
                        g_dec.fill(0.0);
                        g_enc.fill(0.0);
                        let mut psum = [0.0f32; 3];
                        let (mut colsum, mut sum_f) = (0.0f32, 0.0f32);
                        for (p, le) in ents.iter().enumerate() {
                            let b = le.row as usize;
                            let (f, a) = (le.f, le.a);
                            // Random rows: fetch the next entry's while this one computes.
                            if dense {
                            } else if let Some(nx) = ents.get(p + 1) {
                                let nb = nx.row as usize * d_in;
                                prefetch_rows(
                                    resid,
                                    (nx.row as usize * n_heads + band) * d_in,
                                    d_in,
                                );
                                prefetch_rows(xc, nb, d_in);
                                if aux_trains_dec {
                                    prefetch_rows(aux, nb, d_in);
                                }
                            }
                            if f != 0.0 {
                                any_fired |= f > 0.0;
                                sum_f += f;
                            }
                            let ent = Entry {
                                j,
                                pre: le.pre,
                                f,
                                a,
                            };
                            let (df, da) = (resid_scale * le.dot_r, aux_scale * le.dot_a);
                            let eg = arch.entry_backward(&ctx, ent, df, da);
                            colsum += eg.gpre;
                            for (s, g) in psum.iter_mut().zip(&eg.params).take(n_params) {
                                *s += g;
                            }
                            if dense {
                                continue;
                            }
                            let rr = (b * n_heads + band) * d_in;
                            let rb = &resid[rr..rr + d_in];
                            let xb = &xc[b * d_in..(b + 1) * d_in];
                            let ca = if aux_trains_dec { a * aux_scale } else { 0.0 };
                            if ca != 0.0 {
                                let ab = &aux[b * d_in..(b + 1) * d_in];
                                acc3(f * resid_scale, rb, ca, ab, g_dec, eg.gpre, xb, g_enc);
                            } else {
                                acc2(f * resid_scale, rb, g_dec, eg.gpre, xb, g_enc);
                            }
                        }
                        if dense {
                            g_dec.copy_from_slice(&dense_gdec[j * d_in..(j + 1) * d_in]);
                            g_enc.copy_from_slice(&dense_genc[j * d_in..(j + 1) * d_in]);
                        }
                        if let Some(coef) = arch.dec_row_extra(&ctx, j, sum_f) {
                            let nrm = dot(wd, wd).sqrt();
                            if nrm > 0.0 {
                                axpy(coef / nrm, wd, g_dec);
                            }
                        }
                        // d loss / d b_dec through the centring x - b_dec (old encoder row).
                        if centre && colsum != 0.0 {
                            axpy(-colsum, we, part);
                        }
                        for (k, gp) in gparams.iter().enumerate() {
                            unsafe { gp.row(j)[0] = psum[k] };
                        }
                        if adam.is_some() {
                            unsafe {
                                let tf = fired.at(j);
                                *tf = if any_fired { 0 } else { *tf + n as u64 };
                            }
                        }
                        match &adam {
                            None => unsafe {
                                grad_dec.row(j).copy_from_slice(g_dec);
                                grad_enc.row(j).copy_from_slice(g_enc);
                            },
                            Some(ad) => unsafe {
                                let lu = last.at(j);
                                let missed = t - *lu - 1;
                                *lu = t;
                                let (ve, vd) = (v_enc.row(j), v_dec.row(j));
                                ad.catch_up(ve, missed);
                                ad.catch_up(vd, missed);
                                ad.update(we, m_enc.row(j), ve, g_enc);
                                if unit_norm {
                                    // Remove the component along d_j (|d_j| = 1).
                                    let along = dot(g_dec, wd);
                                    axpy(-along, wd, g_dec);
                                }
                                ad.update(wd, m_dec.row(j), vd, g_dec);
                                if unit_norm {
                                    let nrm = dot(wd, wd).sqrt();
                                    if nrm > 0.0 {
                                        let inv = 1.0 / nrm;
                                        wd.iter_mut().for_each(|v| *v *= inv);
                                    }
                                }
                            },
                        }
                    }
                });
        }

        prof.lap("latent");
        // 7. Small dense parameters: b_dec and the per-latent vectors.
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
                let ad = adam.unwrap();
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
                if self.arch.tracks_batch_threshold() {
                    self.threshold_ema = THRESHOLD_EMA_BETA * self.threshold_ema
                        + (1.0 - THRESHOLD_EMA_BETA) * batch_threshold as f64;
                    self.last_batch_threshold = batch_threshold;
                }
                self.steps = t;
            }
        }
        prof.lap("dense");
        prof.report();
        stats.dead_latents = self.count_dead();
        stats
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
        batch_threshold: f32,
    ) {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let buf = &mut self.buf;
        let ctx = StepCtx {
            n,
            d_sae,
            sparsity_coeff,
            hyper: &self.hyper,
            params: &self.params,
            dec_norm: &buf.dec_norm,
            dead: &buf.dead,
            batch_threshold,
            cutoff: &[],
        };
        // Gpre[b, j], row by row.
        let (row_ptr, idx, fv, av, pre_e, dots, arch) = (
            &buf.row_ptr,
            &buf.idx,
            &buf.f,
            &buf.a,
            &buf.pre_e,
            &buf.dots,
            &*self.arch,
        );
        buf.pre
            .par_chunks_mut(d_sae)
            .enumerate()
            .for_each(|(b, row)| {
                row.fill(0.0);
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

/// Phase timings printed to stderr when `SAE_CORE_PROFILE` is set (a development aid).
struct Profiler {
    on: bool,
    last: std::time::Instant,
    laps: Vec<(&'static str, f64)>,
}

impl Profiler {
    fn new() -> Self {
        Profiler {
            on: std::env::var_os("SAE_CORE_PROFILE").is_some(),
            last: std::time::Instant::now(),
            laps: Vec::new(),
        }
    }
    fn lap(&mut self, name: &'static str) {
        if self.on {
            let now = std::time::Instant::now();
            self.laps
                .push((name, (now - self.last).as_secs_f64() * 1e3));
            self.last = now;
        }
    }
    fn report(&self) {
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
