//! What the scan and the live text box need from a language model, as a trait, so both run
//! against the real model (`ModelSource`) or a stand-in (`crate::toy::ToyModel`) in tests.

use anyhow::{bail, Result};
use sae_core::{Sae, SparseCode};
use sae_lm::LanguageModel;

pub trait ActivationSource: Send + Sync {
    /// Hook the activations come from (for the record).
    fn hook(&self) -> &str;
    /// Width of the activations.
    fn d_in(&self) -> usize;
    /// `[batch * ctx, d_in]` activations for `batch` contexts of `ctx` tokens.
    fn activations(&self, tokens: &[u32], batch: usize, ctx: usize) -> Result<Vec<f32>>;
    /// Logit effect of a direction in activation space, one value per vocabulary entry.
    fn direction_logits(&self, direction: &[f32]) -> Result<Vec<f32>>;
    /// Token ids of `text`, without BOS.
    fn tokenize(&self, text: &str) -> Vec<u32>;
    fn bos(&self) -> Option<u32>;
    /// Display string of every vocabulary entry.
    fn vocab(&self) -> Vec<String>;
}

/// The real language model at one hook point.
pub struct ModelSource {
    pub model: LanguageModel,
    pub hook: String,
}

impl ModelSource {
    pub fn new(model: LanguageModel, hook: &str) -> Result<Self> {
        let known = model.hook_points();
        if !known.iter().any(|h| h.name == hook) {
            let some: Vec<&str> = known.iter().take(4).map(|h| h.name.as_str()).collect();
            bail!(
                "hook '{hook}' is not a hook point of {} (e.g. {}; `sae hooks` lists them)",
                model.name,
                some.join(", ")
            );
        }
        Ok(Self {
            model,
            hook: hook.to_string(),
        })
    }
}

impl ActivationSource for ModelSource {
    fn hook(&self) -> &str {
        &self.hook
    }
    fn d_in(&self) -> usize {
        self.model
            .hook_points()
            .into_iter()
            .find(|h| h.name == self.hook)
            .map(|h| h.width)
            .unwrap_or_else(|| self.model.d_model())
    }
    fn activations(&self, tokens: &[u32], batch: usize, ctx: usize) -> Result<Vec<f32>> {
        self.model.activations(tokens, batch, ctx, &self.hook)
    }
    fn direction_logits(&self, direction: &[f32]) -> Result<Vec<f32>> {
        self.model.direction_logits(direction)
    }
    fn tokenize(&self, text: &str) -> Vec<u32> {
        self.model.tokenizer().encode(text)
    }
    fn bos(&self) -> Option<u32> {
        self.model.tokenizer().bos_id
    }
    fn vocab(&self) -> Vec<String> {
        let tok = self.model.tokenizer();
        (0..tok.vocab_size() as u32)
            .map(|i| tok.token_text(i))
            .collect()
    }
}

/// Text typed into the browser, tokenized and encoded by the SAE.
#[derive(Clone, Debug)]
pub struct EncodedText {
    /// Token ids, BOS first when the model has one.
    pub tokens: Vec<u32>,
    pub token_text: Vec<String>,
    /// One row per token.
    pub code: SparseCode,
    /// Whether position 0 is a BOS the analysis left out of its statistics.
    pub first_is_bos: bool,
}

/// Runs typed text through the model and the SAE (what the server's text box calls).
pub trait TextEncoder: Send + Sync {
    fn encode_text(&self, text: &str) -> Result<EncodedText>;
    /// Most tokens accepted in one request.
    fn max_tokens(&self) -> usize;
}

/// A model source plus the SAE: the live encoder of `sae serve`.
pub struct SaeTextEncoder<S: ActivationSource> {
    pub source: S,
    pub sae: Sae,
    pub max_tokens: usize,
    vocab: Vec<String>,
    // One forward at a time: the model already uses every core.
    lock: std::sync::Mutex<()>,
}

impl<S: ActivationSource> SaeTextEncoder<S> {
    pub fn new(source: S, sae: Sae, max_tokens: usize) -> Result<Self> {
        check_widths(&source, &sae)?;
        let vocab = source.vocab();
        Ok(Self {
            source,
            sae,
            max_tokens,
            vocab,
            lock: std::sync::Mutex::new(()),
        })
    }
}

/// The SAE must read activations of the source's width.
pub fn check_widths(source: &dyn ActivationSource, sae: &Sae) -> Result<()> {
    if source.d_in() != sae.d_in {
        bail!(
            "the SAE reads {} values per token but hook '{}' gives {}; pick the SAE's hook",
            sae.d_in,
            source.hook(),
            source.d_in()
        );
    }
    Ok(())
}

/// Error text for too long an input; the server maps it to 413.
pub const TOO_LONG: &str = "text too long";

impl<S: ActivationSource> TextEncoder for SaeTextEncoder<S> {
    fn encode_text(&self, text: &str) -> Result<EncodedText> {
        let mut tokens: Vec<u32> = self.source.bos().into_iter().collect();
        let first_is_bos = !tokens.is_empty();
        tokens.extend(self.source.tokenize(text));
        if tokens.len() > self.max_tokens {
            bail!(
                "{TOO_LONG}: {} tokens, at most {} are encoded at once",
                tokens.len(),
                self.max_tokens
            );
        }
        if tokens.is_empty() {
            bail!("no tokens in the text");
        }
        let n = tokens.len();
        let acts = {
            let _one_at_a_time = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.source.activations(&tokens, 1, n)?
        };
        let code = self.sae.encode(&acts, n);
        let token_text = tokens
            .iter()
            .map(|&t| self.vocab.get(t as usize).cloned().unwrap_or_default())
            .collect();
        Ok(EncodedText {
            tokens,
            token_text,
            code,
            first_is_bos,
        })
    }
    fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}
