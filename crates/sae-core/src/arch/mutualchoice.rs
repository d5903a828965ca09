//! Mutual Choice SAE (Ayonrinde 2024, arXiv 2411.02124): tokens and latents are matched under
//! one budget of k*B for the batch with no per-token or per-latent limit, i.e. the k*B largest
//! non-negative `pre + b_enc` of the whole batch (BatchTopK's selection). Its auxiliary loss,
//! `aux_zipf`, is AuxK whose candidates are the dead latents and also the under-used ones:
//! those firing much less often than a Zipf law of latent usage expects of their usage rank
//! (see [`zipf_aux_latents`]). Inference is BatchTopK's: one global threshold estimated
//! during training (a bias-corrected EMA of each batch's selection threshold), saved as a
//! SAELens `jumprelu` SAE.

use super::batchtopk::{encode_batch_top_k, threshold_stored_as, BatchTopKRule, B_ENC_THRESHOLD};
use super::topk::{auxk_train_opts, topk_lr, AUXK_OPTIONS};
use super::{
    encode_jumprelu_row, validate_threshold, Arch, ArchKind, AuxMode, BatchInput, BatchRef,
    BatchSlot, Entry, EntryGrad, Family, LatentParam, RowCode, RowOut, Sparsity, StepCtx, Stored,
    TopKScope, TrainOption, TrainOpts,
};
use crate::sae::{Invalid, Sae};
use crate::sparse::SparseCode;
use crate::trainer::TrainHyper;
use std::collections::BTreeMap;

/// The Mutual Choice family.
pub struct MutualChoice;

/// This family's registry handle.
pub(crate) const KIND: ArchKind = ArchKind(&MutualChoice);

impl ArchKind {
    pub const MUTUALCHOICE: ArchKind = KIND;
}

/// A latent whose usage rank `r` gives it the Zipf density `p_r` is under-used once it has
/// not fired for this many expected gaps `1 / p_r` (a latent at exactly its density goes that
/// long without firing with probability e^-4, about 2%).
pub(crate) const ZIPF_GAPS: f64 = 4.0;

impl Family for MutualChoice {
    fn name(&self) -> &'static str {
        "mutualchoice"
    }
    fn about(&self) -> &'static str {
        "Ayonrinde 2024: the k*B largest of the batch, aux_zipf for dead and under-used latents"
    }
    fn saelens_name(&self) -> &'static str {
        "jumprelu"
    }
    fn saelens_reads(&self) -> &'static [&'static str] {
        &[]
    }
    fn latent_params(&self) -> &'static [LatentParam] {
        B_ENC_THRESHOLD
    }
    fn stored_as(&self, name: &'static str) -> Vec<(&'static str, Stored)> {
        threshold_stored_as(name)
    }
    fn sparsity(&self) -> Sparsity {
        Sparsity::K
    }
    fn default_lr(&self, d_sae: usize) -> f32 {
        topk_lr(d_sae)
    }
    fn reads_decoder_norm_rescale(&self) -> bool {
        true
    }
    fn train_options(&self) -> &'static [TrainOption] {
        AUXK_OPTIONS
    }
    fn train_opts(
        &self,
        d_sae: usize,
        opts: &BTreeMap<String, String>,
    ) -> Result<TrainOpts, String> {
        auxk_train_opts(d_sae, opts)
    }
    fn validate_params(&self, sae: &Sae) -> Result<(), Invalid> {
        validate_threshold(sae, "threshold")
    }
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode) {
        encode_jumprelu_row(sae, pre, out)
    }
    fn encode_batch(&self, sae: &Sae, x: &[f32], n: usize) -> Option<SparseCode> {
        Some(encode_batch_top_k(sae, x, n))
    }
    fn rule(&self, sae: &Sae, hyper: &TrainHyper) -> Box<dyn Arch> {
        Box::new(MutualChoiceRule {
            batch: BatchTopKRule::new(ArchKind::MUTUALCHOICE, sae, hyper, Vec::new()),
        })
    }
}

/// BatchTopK's selection and backward rule with aux_zipf's candidates.
pub struct MutualChoiceRule {
    batch: BatchTopKRule,
}

/// aux_zipf's candidates, ascending: every dead latent (no firing in `dead_window_tokens`,
/// as AuxK) and every under-used one. Latents are ranked by use (fewest tokens since they
/// last fired first, ties by index); a Zipf law gives rank `r` (1-based) the density
/// `p_r = k r^-1 / H_d` (densities summing to k, the mean L0), and the latent at rank `r`
/// is under-used once it has gone `ZIPF_GAPS / p_r` tokens without firing.
pub(crate) fn zipf_aux_latents(k: usize, since_fired: &[u64], dead_window: u64) -> Vec<u32> {
    let d = since_fired.len();
    let harmonic: f64 = (1..=d).map(|r| 1.0 / r as f64).sum();
    let mut order: Vec<u32> = (0..d as u32).collect();
    order.sort_by_key(|&j| (since_fired[j as usize], j));
    let mut out: Vec<u32> = order
        .iter()
        .enumerate()
        .filter(|&(rank0, &j)| {
            let gap = since_fired[j as usize];
            let density = k as f64 / ((rank0 + 1) as f64 * harmonic);
            gap >= dead_window || gap as f64 >= ZIPF_GAPS / density
        })
        .map(|(_, &j)| j)
        .collect();
    out.sort_unstable();
    out
}

impl Arch for MutualChoiceRule {
    fn kind(&self) -> ArchKind {
        self.batch.kind()
    }
    fn param_names(&self) -> &'static [&'static str] {
        self.batch.param_names()
    }
    fn trained_params(&self, sae: &Sae) -> Vec<Vec<f32>> {
        self.batch.trained_params(sae)
    }
    fn saved_params(&self, trained: &[Vec<f32>], batch_threshold: f32) -> Vec<Vec<f32>> {
        self.batch.saved_params(trained, batch_threshold)
    }
    fn batch_threshold(&self, batch: BatchRef) -> Option<f32> {
        self.batch.batch_threshold(batch)
    }
    fn initial_batch_threshold(&self, sae: &Sae) -> f32 {
        self.batch.initial_batch_threshold(sae)
    }
    fn aux_mode(&self) -> AuxMode {
        AuxMode::AuxK
    }
    fn aux_coeff(&self) -> f32 {
        self.batch.aux_coeff
    }
    fn aux_latents(&self, since_fired: &[u64], hyper: &TrainHyper, out: &mut Vec<u32>) {
        *out = zipf_aux_latents(self.batch.k, since_fired, hyper.dead_window_tokens);
    }
    fn prepare_batch(&self, batch: &BatchInput, state: &mut BatchSlot) {
        self.batch.prepare_batch(batch, state)
    }
    fn prefilter(&self, params: &[Vec<f32>], batch: BatchRef, out: &mut Vec<f32>) -> bool {
        self.batch.prefilter(params, batch, out)
    }
    /// BatchTopK's selection; the screen leaves this rule's own AuxK candidates unraised.
    fn screen_cutoff(&self, params: &[Vec<f32>], out: &mut Vec<f32>) -> bool {
        self.batch.screen_cutoff(params, out)
    }
    fn screen_top_k(&self) -> Option<TopKScope> {
        self.batch.screen_top_k()
    }
    fn select_row(&self, ctx: &StepCtx, row: usize, pre: &[f32], out: &mut RowOut) {
        self.batch.select_row(ctx, row, pre, out)
    }
    fn entry_backward(&self, ctx: &StepCtx, e: Entry, df: f32, da: f32) -> EntryGrad {
        self.batch.entry_backward(ctx, e, df, da)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SaeTrainer;

    #[test]
    fn zipf_candidates_are_the_dead_and_the_long_silent_for_their_rank() {
        // d = 4, k = 1: H_4 = 25/12, densities 0.48, 0.24, 0.16, 0.12 by rank, so ranks
        // 1..4 are under-used after 8.3, 16.7, 25 and 33.3 silent tokens.
        let since = [0, 30, 10, 40];
        // Ranks: latent 0 (0), 2 (10), 1 (30), 3 (40).
        assert_eq!(zipf_aux_latents(1, &since, 1_000), vec![1, 3]);
        // A dead window of 10 adds latent 2 as AuxK would.
        assert_eq!(zipf_aux_latents(1, &since, 10), vec![1, 2, 3]);
        // Larger k means larger expected densities, so shorter silences count.
        assert_eq!(zipf_aux_latents(4, &since, 1_000), vec![1, 2, 3]);
        assert!(zipf_aux_latents(1, &[0, 0, 0, 0], 1_000).is_empty());
    }

    /// The trainer asks the rule for its candidates: with a dead window no run reaches,
    /// aux_zipf still trains latents that stay silent, where BatchTopK's AuxK is off.
    #[test]
    fn aux_zipf_trains_under_used_latents_before_any_is_dead() {
        use rand::SeedableRng;
        let (d_in, d_sae, n) = (8, 64, 64);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let x = crate::tests::randn(&mut rng, n * d_in);
        let aux_after = |arch: ArchKind| {
            let sae = Sae::init(arch, d_in, d_sae, 2, 4);
            let mut t = SaeTrainer::new(sae, TrainHyper::default());
            (0..12)
                .map(|_| t.step(&x, n, 1e-3, 0.0).aux_loss)
                .fold(0.0, f64::max)
        };
        assert!(aux_after(ArchKind::MUTUALCHOICE) > 0.0);
        assert_eq!(aux_after(ArchKind::BATCHTOPK), 0.0);
    }
}
