//! The step of rules that select against the residual (matching pursuit): the dictionary is
//! the encoder, so the one dense product gives the first correlations `(x - b_dec) W_dec^T`,
//! the rule pursues and differentiates each row through its own steps, and the latent pass
//! sums each atom's gradients over the steps that chose it.
//!
//! Cost per step: the product (n x d_in x d_sae), one Gram row per distinct chosen atom
//! (at most the Gram matrix's upper triangle, d_sae^2 d_in / 2, in the rule's selection), k
//! correlation updates of d_sae values per row, and O(k d_in) per row for the decode and the
//! backward pass.

use super::{Mode, SaeTrainer, StepStats};
use crate::arch::Steps;
use crate::kernels::{axpy, dot, matmul_xt};
use crate::optim::AdamStep;
use rayon::prelude::*;

/// Rows per task: fixed so that sums run in a fixed order (bit-for-bit reproducible).
const ROW_CHUNK: usize = 16;
/// Latents per task in the latent pass.
const LAT_CHUNK: usize = 32;

/// What one chunk of rows measured.
#[derive(Default)]
struct ChunkSums {
    err2: f64,
    x2: f64,
    l0: u64,
    x_sum: Vec<f64>,
    /// `dL/db_dec` of the chunk's rows.
    g_bdec: Vec<f64>,
}

impl SaeTrainer {
    pub(super) fn run_pursuit(&mut self, x: &[f32], n: usize, mode: Mode) -> StepStats {
        let (d_in, d_sae) = (self.d_in, self.d_sae);
        let arch = self.arch.clone();
        let sel = arch
            .residual_select()
            .expect("run_pursuit needs a residual-selecting rule");
        let mut prof = super::step::Profiler::new();
        // 1. Centre, and the first correlations with the dictionary as encoder.
        let mut xc = x.to_vec();
        xc.par_chunks_mut(d_in).for_each(|row| {
            for (v, b) in row.iter_mut().zip(&self.b_dec) {
                *v -= b;
            }
        });
        let mut corr = std::mem::take(&mut self.buf_pursuit);
        corr.resize(n * d_sae, 0.0);
        matmul_xt(&xc, n, d_in, &self.w_dec, d_sae, &mut corr);
        // 2. The pursuit.
        prof.lap("gemm");
        let steps: Vec<Steps> = sel.select(&self.w_dec, d_in, &mut corr, n, &mut self.buf_select);
        prof.lap("pursuit");
        self.buf_pursuit = corr;
        // 3. Per row: the final residual r_k = x - b_dec - sum c_t d_t, the loss, and the
        //    backward pass through the steps into per-step atom gradients.
        let offsets: Vec<usize> = std::iter::once(0)
            .chain(steps.iter().scan(0, |acc, s| {
                *acc += s.len();
                Some(*acc)
            }))
            .collect();
        let total = offsets[n];
        // Kept across steps: at batch 4096, k 64, d_in 576 it is 600 MB, and fresh pages each
        // step cost more than the backward pass itself.
        let mut atom_grads = std::mem::take(&mut self.buf_atom_grads);
        atom_grads.clear();
        atom_grads.resize(total * d_in, 0.0);
        let scale = 2.0 / n as f32;
        let w_dec = &self.w_dec;
        let mut sums: Vec<ChunkSums> = Vec::new();
        {
            let mut pieces: Vec<&mut [f32]> = Vec::with_capacity(n.div_ceil(ROW_CHUNK));
            let mut rest = &mut atom_grads[..];
            for c in 0..n.div_ceil(ROW_CHUNK) {
                let (lo, hi) = (
                    offsets[c * ROW_CHUNK],
                    offsets[((c + 1) * ROW_CHUNK).min(n)],
                );
                let (head, tail) = rest.split_at_mut((hi - lo) * d_in);
                pieces.push(head);
                rest = tail;
            }
            pieces
                .into_par_iter()
                .enumerate()
                .map(|(c, grads)| {
                    let mut s = ChunkSums {
                        x_sum: vec![0.0; d_in],
                        g_bdec: vec![0.0; d_in],
                        ..Default::default()
                    };
                    let mut r = vec![0f32; d_in];
                    let mut g = vec![0f32; d_in];
                    let base = offsets[c * ROW_CHUNK];
                    for b in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(n) {
                        let xb = &x[b * d_in..(b + 1) * d_in];
                        r.copy_from_slice(&xc[b * d_in..(b + 1) * d_in]);
                        for &(j, v) in &steps[b] {
                            axpy(
                                -v,
                                &w_dec[j as usize * d_in..(j as usize + 1) * d_in],
                                &mut r,
                            );
                        }
                        let mut atoms: Vec<u32> = steps[b].iter().map(|s| s.0).collect();
                        atoms.sort_unstable();
                        atoms.dedup();
                        s.l0 += atoms.len() as u64;
                        s.err2 += dot(&r, &r) as f64;
                        s.x2 += dot(xb, xb) as f64;
                        for i in 0..d_in {
                            s.x_sum[i] += xb[i] as f64;
                            g[i] = scale * r[i];
                        }
                        let (lo, hi) = (offsets[b] - base, offsets[b + 1] - base);
                        sel.row_backward(
                            w_dec,
                            &steps[b],
                            &mut r,
                            &mut g,
                            &mut grads[lo * d_in..hi * d_in],
                        );
                        // r_0 = x - b_dec.
                        for (acc, gi) in s.g_bdec.iter_mut().zip(&g) {
                            *acc -= *gi as f64;
                        }
                    }
                    s
                })
                .collect_into_vec(&mut sums);
        }
        let nf = n as f64;
        let (mut err2, mut x2, mut l0) = (0.0, 0.0, 0u64);
        let mut x_sum = vec![0f64; d_in];
        let mut g_bdec = vec![0f64; d_in];
        for s in &sums {
            err2 += s.err2;
            x2 += s.x2;
            l0 += s.l0;
            for i in 0..d_in {
                x_sum[i] += s.x_sum[i];
                g_bdec[i] += s.g_bdec[i];
            }
        }
        let x_var = x2 - x_sum.iter().map(|v| v * v).sum::<f64>() / nf;
        let mut stats = StepStats {
            loss: err2 / nf,
            mse: err2 / nf,
            l0: l0 as f64 / nf,
            fvu: if x_var > 0.0 { err2 / x_var } else { f64::NAN },
            ..Default::default()
        };
        if !stats.loss.is_finite() {
            stats.dead_latents = self.count_dead();
            return stats;
        }
        prof.lap("rows");
        // 4. Steps per atom (in row order, so sums are in a fixed order).
        let mut lat_ptr = vec![0usize; d_sae + 1];
        for st in &steps {
            for &(j, _) in st {
                lat_ptr[j as usize + 1] += 1;
            }
        }
        for j in 0..d_sae {
            lat_ptr[j + 1] += lat_ptr[j];
        }
        let mut fill = lat_ptr[..d_sae].to_vec();
        let mut lat_ent = vec![0u32; total];
        for (b, st) in steps.iter().enumerate() {
            for (t, &(j, _)) in st.iter().enumerate() {
                lat_ent[fill[j as usize]] = (offsets[b] + t) as u32;
                fill[j as usize] += 1;
            }
        }
        let g_bdec: Vec<f32> = g_bdec.iter().map(|v| *v as f32).collect();
        // 5. Atoms: summed gradients, Adam, unit norm; the encoder follows the dictionary.
        match mode {
            Mode::Collect(out) => {
                out.w_dec
                    .par_chunks_mut(d_in)
                    .enumerate()
                    .for_each(|(j, gd)| {
                        gd.fill(0.0);
                        for &e in &lat_ent[lat_ptr[j]..lat_ptr[j + 1]] {
                            let e = e as usize;
                            axpy(1.0, &atom_grads[e * d_in..(e + 1) * d_in], gd);
                        }
                    });
                out.w_enc_t.fill(0.0);
                out.b_dec.copy_from_slice(&g_bdec);
            }
            Mode::Apply(lr) => {
                let t = self.steps + 1;
                let h = &self.hyper;
                let ad = AdamStep::new(lr, h.adam_beta1, h.adam_beta2, h.adam_eps, t);
                let dense_adam = h.adam_beta1 != 0.0;
                let m_dec = &mut self.mom_dec;
                let with_m = !m_dec.m.is_empty();
                let m_chunks: Vec<&mut [f32]> = if with_m {
                    m_dec.m.chunks_mut(LAT_CHUNK * d_in).collect()
                } else {
                    Vec::new()
                };
                let mut m_iter = m_chunks.into_iter();
                let chunks: Vec<_> = self
                    .w_dec
                    .chunks_mut(LAT_CHUNK * d_in)
                    .zip(self.w_enc_t.chunks_mut(LAT_CHUNK * d_in))
                    .zip(m_dec.v.chunks_mut(LAT_CHUNK * d_in))
                    .zip(self.last_update.chunks_mut(LAT_CHUNK))
                    .zip(self.tokens_since_fired.chunks_mut(LAT_CHUNK))
                    .map(|x| (x, if with_m { m_iter.next() } else { None }))
                    .collect();
                chunks.into_par_iter().enumerate().for_each(
                    |(c, (((((wd, we), vd), last), fired), md))| {
                        let mut md = md;
                        let mut g = vec![0f32; d_in];
                        for (r, j) in (c * LAT_CHUNK..((c + 1) * LAT_CHUNK).min(d_sae)).enumerate()
                        {
                            let ents = &lat_ent[lat_ptr[j]..lat_ptr[j + 1]];
                            if ents.is_empty() {
                                fired[r] += n as u64;
                                if !dense_adam {
                                    continue;
                                }
                            } else {
                                fired[r] = 0;
                            }
                            g.fill(0.0);
                            for &e in ents {
                                let e = e as usize;
                                axpy(1.0, &atom_grads[e * d_in..(e + 1) * d_in], &mut g);
                            }
                            let row = &mut wd[r * d_in..(r + 1) * d_in];
                            let v = &mut vd[r * d_in..(r + 1) * d_in];
                            let m: &mut [f32] = match md.as_mut() {
                                Some(m) => &mut m[r * d_in..(r + 1) * d_in],
                                None => &mut [],
                            };
                            ad.catch_up(v, t - last[r] - 1);
                            last[r] = t;
                            // Unit-norm atoms: remove the component along d_j, then renormalise.
                            let along = dot(&g, row);
                            axpy(-along, row, &mut g);
                            ad.update(row, m, v, &g);
                            let nrm = dot(row, row).sqrt();
                            if nrm > 0.0 {
                                row.iter_mut().for_each(|w| *w /= nrm);
                            }
                            we[r * d_in..(r + 1) * d_in].copy_from_slice(row);
                        }
                    },
                );
                let mb = &mut self.mom_bdec;
                ad.update(&mut self.b_dec, &mut mb.m, &mut mb.v, &g_bdec);
                self.steps = t;
            }
        }
        self.buf_atom_grads = atom_grads;
        prof.lap("latent");
        prof.report();
        stats.dead_latents = self.count_dead();
        stats
    }
}
