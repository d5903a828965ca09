//! MP-SAE (Costa, Fel, Lubana, Tolooshams, Ba 2025, arXiv 2506.03093): the encoder unrolls
//! matching pursuit over the dictionary itself (no separate encoder matrix). From
//! `r_0 = x - b_dec`, each of `k` steps picks the atom best correlated with the residual,
//! `j = argmax_i relu(r . d_i)`, adds `v = relu(r . d_j)` to `z_j` and removes `v d_j` from
//! the residual; `x_hat = b_dec + z W_dec = x - r_k`. The loss is `||r_k||^2`, and training
//! backpropagates through the unrolled steps (the choice of atoms is not differentiated).
//!
//! Assumptions where the sources differ or say nothing (see the README): a fixed number of
//! steps `k` with ReLU correlations (the overcomplete variant runs exactly k steps, signed);
//! `b_dec` centres the input as in our other families (neither reference code has one); atoms
//! are kept at unit norm, which the correlation-as-coefficient step assumes.
//!
//! The correlations are updated incrementally: after choosing atom `j` for a row,
//! `c <- c - v G[j, :]` with `G[j, :] = W_dec d_j`, the chosen atom's Gram row. A batch runs
//! its `k` steps in rounds, computing each Gram row once for every row that picks that atom:
//! one product for the first correlations plus one Gram row per distinct chosen atom, instead
//! of one product per step. When the batch may use most atoms the whole Gram matrix is built
//! at once, computing only its upper triangle (it is symmetric): d_sae^2 d_in / 2
//! multiply-adds, which at d_sae 4096 and batch 1024 is twice the encoder product's work. The
//! math forces this dense work; the pursuit's k updates per row are O(k d_sae).

use super::{
    validate_k, Arch, ArchKind, AuxMode, Entry, EntryGrad, Family, LatentParam, ResidualSelect,
    RowCode, RowOut, Sparsity, StepCtx, Steps,
};
use crate::kernels::{self, axpy, dot, matmul_xt};
use crate::sae::{Invalid, Sae};
use crate::sparse::SparseCode;
use crate::trainer::TrainHyper;
use rayon::prelude::*;

/// The MP-SAE family.
pub struct MatchingPursuit;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&MatchingPursuit);

impl ArchKind {
    pub const MP: ArchKind = KIND;
}

impl Family for MatchingPursuit {
    fn name(&self) -> &'static str {
        "mp"
    }
    fn about(&self) -> &'static str {
        "Costa et al. 2025: k steps of matching pursuit over the dictionary (tied encoder)"
    }
    /// SAELens has no matching-pursuit SAE; the files carry our own name.
    fn saelens_name(&self) -> &'static str {
        "mp"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &["mp"]
    }
    fn latent_params(&self) -> &'static [LatentParam] {
        &[]
    }
    fn sparsity(&self) -> Sparsity {
        Sparsity::K
    }
    /// EleutherAI's replication trained at 1e-3 (the official code's 3e-2 was for toy data).
    fn default_lr(&self, _d_sae: usize) -> f32 {
        1e-3
    }
    fn validate_settings(&self, sae: &Sae) -> Result<(), Invalid> {
        if !sae.apply_b_dec_to_input {
            return Err(Invalid::Config {
                key: "apply_b_dec_to_input",
                msg: "apply_b_dec_to_input is false; an mp SAE pursues the residual of \
                      x - b_dec"
                    .into(),
            });
        }
        validate_k(sae)
    }
    /// The encoder is the dictionary: W_enc must be W_dec transposed.
    fn validate_params(&self, sae: &Sae) -> Result<(), Invalid> {
        let (d_in, d_sae) = (sae.d_in, sae.d_sae);
        let apart = (0..d_sae)
            .flat_map(|j| (0..d_in).map(move |i| (i, j)))
            .filter(|&(i, j)| sae.w_enc[i * d_sae + j] != sae.w_dec[j * d_in + i])
            .count();
        if apart > 0 {
            return Err(Invalid::Tensor {
                tensor: "W_enc",
                msg: format!(
                    "W_enc differs from W_dec transposed in {apart} places; an mp SAE encodes \
                     with its dictionary, so the two must be equal"
                ),
                non_finite: false,
            });
        }
        Ok(())
    }
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        let mut corr = pre.to_vec();
        let steps = pursue(
            &sae.w_dec,
            sae.d_in,
            sae.d_sae,
            &mut corr,
            1,
            sae.k(),
            &mut Vec::new(),
        );
        let code = codes_of(&steps, sae.d_sae);
        let (idx, val) = code.row(0);
        for (&j, &v) in idx.iter().zip(val) {
            out.push(j as usize, v);
        }
    }
    fn encode_pre(&self, sae: &Sae, mut pre: Vec<f32>, n: usize) -> SparseCode {
        let mut gram = Vec::new();
        let steps = pursue(
            &sae.w_dec,
            sae.d_in,
            sae.d_sae,
            &mut pre,
            n,
            sae.k(),
            &mut gram,
        );
        codes_of(&steps, sae.d_sae)
    }
    /// The atoms stay unit vectors (the pursuit's coefficients are correlations), so only
    /// b_dec scales; codes of raw inputs are those of training divided by `scale`.
    fn fold_activation_scale(&self, sae: &mut Sae, scale: f32) {
        sae.b_dec.iter_mut().for_each(|b| *b /= scale);
    }
    fn has_encoder_product(&self) -> bool {
        false
    }
    fn rule(&self, sae: &Sae, _hyper: &TrainHyper) -> Box<dyn Arch> {
        Box::new(MpRule { k: sae.k() })
    }
}

/// The MP-SAE training rule: it selects against the residual, so the trainer runs its
/// pursuit step instead of the row selection.
pub struct MpRule {
    pub k: usize,
}

impl Arch for MpRule {
    fn kind(&self) -> ArchKind {
        KIND
    }
    fn param_names(&self) -> &'static [&'static str] {
        &[]
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::None
    }
    fn residual_select(&self) -> Option<&dyn ResidualSelect> {
        Some(self)
    }
    fn select_row(&self, _ctx: &StepCtx, _row: usize, _pre: &[f32], _out: &mut RowOut) {
        unreachable!("matching pursuit selects in the trainer's pursuit step")
    }
    fn entry_backward(&self, _ctx: &StepCtx, _e: Entry, _df: f32, _da: f32) -> EntryGrad {
        unreachable!("matching pursuit differentiates in the trainer's pursuit step")
    }
}

impl ResidualSelect for MpRule {
    fn select(
        &self,
        w_dec: &[f32],
        d_in: usize,
        corr: &mut [f32],
        n: usize,
        scratch: &mut Vec<f32>,
    ) -> Vec<Steps> {
        let d_sae = w_dec.len() / d_in.max(1);
        pursue(w_dec, d_in, d_sae, corr, n, self.k, scratch)
    }

    fn row_backward(
        &self,
        w_dec: &[f32],
        steps: &Steps,
        r: &mut [f32],
        g: &mut [f32],
        atom_grads: &mut [f32],
    ) {
        let d_in = r.len();
        // Walk the steps backwards: r_{t-1} = r_t + c_t d_t, and with c_t = relu(r_{t-1}.d_t)
        // (> 0 for every recorded step):
        //   dL/dc_t     = -g_t . d_t
        //   dL/dd_t    += -c_t g_t + dL/dc_t r_{t-1}
        //   g_{t-1}     = g_t + dL/dc_t d_t
        for (t, &(j, c)) in steps.iter().enumerate().rev() {
            let d = &w_dec[j as usize * d_in..(j as usize + 1) * d_in];
            axpy(c, d, r);
            let gc = -dot(g, d);
            let ga = &mut atom_grads[t * d_in..(t + 1) * d_in];
            for i in 0..d_in {
                ga[i] = -c * g[i] + gc * r[i];
            }
            axpy(gc, d, g);
        }
    }
}

/// Above this many latents the full Gram matrix (d_sae^2 floats) is not built; the pursuit
/// then computes Gram rows on demand, in rounds over the batch.
const FULL_GRAM_MAX_LATENTS: usize = 8192;

/// Matching pursuit over `n` rows at once, `k` steps each, from the first correlations
/// `corr` (`[n, d_sae]`, overwritten). Ties go to the lower atom index; a row whose best
/// correlation is not positive stops (its residual can no longer shrink).
///
/// When a batch may use most atoms (`n k >= d_sae`) and the Gram matrix is small enough, it
/// is built in one product and each block of rows runs all its steps while its correlations
/// stay in cache; otherwise the batch runs its steps in rounds and builds each chosen atom's
/// Gram row once. Both give the same steps. `gram` is scratch space kept by the caller (the
/// full Gram matrix is d_sae^2 floats, 64 MiB at 4096 latents).
pub(crate) fn pursue(
    w_dec: &[f32],
    d_in: usize,
    d_sae: usize,
    corr: &mut [f32],
    n: usize,
    k: usize,
    gram: &mut Vec<f32>,
) -> Vec<Steps> {
    if n * k >= d_sae && d_sae <= FULL_GRAM_MAX_LATENTS {
        pursue_full_gram(w_dec, d_in, d_sae, corr, n, k, gram)
    } else {
        pursue_in_rounds(w_dec, d_in, d_sae, corr, n, k)
    }
}

/// Rows per task of the full-Gram pursuit: their correlations stay in L2 across the steps.
const ROWS_PER_BLOCK: usize = 4;

pub(crate) fn pursue_full_gram(
    w_dec: &[f32],
    d_in: usize,
    d_sae: usize,
    corr: &mut [f32],
    n: usize,
    k: usize,
    gram: &mut Vec<f32>,
) -> Vec<Steps> {
    // Every element is written by the product, so old contents do not matter.
    gram.resize(d_sae * d_sae, 0.0);
    kernels::gram(w_dec, d_sae, d_in, gram);
    let gram = &*gram;
    let mut steps: Vec<Steps> = vec![Vec::with_capacity(k); n];
    corr.par_chunks_mut(d_sae.max(1) * ROWS_PER_BLOCK)
        .zip(steps.par_chunks_mut(ROWS_PER_BLOCK))
        .for_each(|(block, st)| {
            for (c, st) in block.chunks_mut(d_sae.max(1)).zip(st) {
                let mut next = argmax_positive(c);
                for t in 0..k {
                    let Some((j, v)) = next else {
                        break;
                    };
                    st.push((j, v));
                    let g = &gram[j as usize * d_sae..(j as usize + 1) * d_sae];
                    next = update_and_argmax(c, -v, g, t + 1 < k);
                }
            }
        });
    steps
}

pub(crate) fn pursue_in_rounds(
    w_dec: &[f32],
    d_in: usize,
    d_sae: usize,
    corr: &mut [f32],
    n: usize,
    k: usize,
) -> Vec<Steps> {
    let mut steps: Vec<Steps> = vec![Vec::with_capacity(k); n];
    // Gram rows computed so far: `slot[j]` indexes `gram` (d_sae values per row).
    let mut slot = vec![u32::MAX; d_sae];
    let mut gram: Vec<f32> = Vec::new();
    // The first choice of each row; later choices come out of the update pass, so each round
    // streams the correlations once.
    let mut chosen: Vec<Option<(u32, f32)>> =
        corr.par_chunks(d_sae.max(1)).map(argmax_positive).collect();
    for round in 0..k {
        // Gram rows of the atoms chosen for the first time, in one product.
        let mut new: Vec<u32> = Vec::new();
        for &(j, _) in chosen.iter().flatten() {
            if slot[j as usize] == u32::MAX {
                slot[j as usize] = u32::MAX - 1;
                new.push(j);
            }
        }
        if !new.is_empty() {
            let first = gram.len() / d_sae.max(1);
            let mut atoms = Vec::with_capacity(new.len() * d_in);
            for &j in &new {
                atoms.extend_from_slice(&w_dec[j as usize * d_in..(j as usize + 1) * d_in]);
            }
            gram.resize(gram.len() + new.len() * d_sae, 0.0);
            matmul_xt(
                &atoms,
                new.len(),
                d_in,
                w_dec,
                d_sae,
                &mut gram[first * d_sae..],
            );
            for (i, &j) in new.iter().enumerate() {
                slot[j as usize] = (first + i) as u32;
            }
        }
        let (gram, slot) = (&gram, &slot);
        let last = round + 1 == k;
        corr.par_chunks_mut(d_sae.max(1))
            .zip(steps.par_iter_mut())
            .zip(chosen.par_iter_mut())
            .for_each(|((c, st), ch)| {
                let Some((j, v)) = *ch else {
                    return;
                };
                st.push((j, v));
                let s = slot[j as usize] as usize;
                *ch = update_and_argmax(c, -v, &gram[s * d_sae..(s + 1) * d_sae], !last);
            });
    }
    steps
}

/// The largest positive value of `c` and its index (ties: the lower index); `None` when no
/// value is positive.
fn argmax_positive(c: &[f32]) -> Option<(u32, f32)> {
    let mut best = Best::default();
    for (blk, cb) in c.chunks(BLOCK).enumerate() {
        best.offer(cb, blk * BLOCK);
    }
    best.found()
}

/// `c += a g`, and (when `search`) the argmax of the result as [`argmax_positive`], block by
/// block so that each block is searched while it is still in L1.
fn update_and_argmax(c: &mut [f32], a: f32, g: &[f32], search: bool) -> Option<(u32, f32)> {
    let mut best = Best::default();
    for (blk, (cb, gb)) in c.chunks_mut(BLOCK).zip(g.chunks(BLOCK)).enumerate() {
        axpy(a, gb, cb);
        if search {
            best.offer(cb, blk * BLOCK);
        }
    }
    best.found()
}

const BLOCK: usize = 256;

/// A running argmax over blocks: each block's maximum is found with 8 independent lanes (it
/// vectorises); only a block that beats the best so far is searched for its index.
struct Best {
    value: f32,
    index: u32,
}

impl Default for Best {
    fn default() -> Self {
        Best {
            value: 0.0,
            index: u32::MAX,
        }
    }
}

impl Best {
    #[inline]
    fn offer(&mut self, block: &[f32], offset: usize) {
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut it = block.chunks_exact(8);
        for ch in &mut it {
            for l in 0..8 {
                lanes[l] = if ch[l] > lanes[l] { ch[l] } else { lanes[l] };
            }
        }
        let mut m = lanes
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        for &v in it.remainder() {
            if v > m {
                m = v;
            }
        }
        if m > self.value {
            // The first index holding the block's maximum: the lowest index among ties.
            let i = block.iter().position(|&v| v == m).unwrap_or(0);
            self.value = m;
            self.index = (offset + i) as u32;
        }
    }

    fn found(&self) -> Option<(u32, f32)> {
        (self.index != u32::MAX).then_some((self.index, self.value))
    }
}

/// The codes `z` of pursued rows: each atom's coefficients summed, sorted by atom.
pub(crate) fn codes_of(steps: &[Steps], d_sae: usize) -> SparseCode {
    let mut code = SparseCode {
        n_rows: steps.len(),
        d_sae,
        row_ptr: Vec::with_capacity(steps.len() + 1),
        idx: Vec::new(),
        val: Vec::new(),
    };
    code.row_ptr.push(0);
    let mut row: Vec<(u32, f32)> = Vec::new();
    for st in steps {
        row.clear();
        row.extend_from_slice(st);
        row.sort_by_key(|&(j, _)| j);
        for &(j, v) in &row {
            match code.idx.last() {
                Some(&last) if last == j && code.idx.len() > *code.row_ptr.last().unwrap() => {
                    *code.val.last_mut().unwrap() += v;
                }
                _ => {
                    code.idx.push(j);
                    code.val.push(v);
                }
            }
        }
        code.row_ptr.push(code.idx.len());
    }
    code
}
