//! A stand-in "language model" and a hand-made SAE with known features, for tests and for
//! trying the browser without downloading a model.
//!
//! Words are tokens (" cat"). The activation at a token is `e[token] + 0.5 e[previous]`
//! (one-hot embeddings), so latent `w` ("the word w") fires 1.0-ish on w and weaker on the
//! token after it, and pair latents fire only when two given words are adjacent.

use crate::source::ActivationSource;
use anyhow::{bail, Result};
use sae_core::{ArchKind, Sae};

pub const WORDS: &[&str] = &[
    "<bos>", "<unk>", " the", " cat", " sat", " on", " mat", " dog", " ran", " to", " park", " a",
    " big", " red", " ball", " and", " with", " tree", " bird", " sang", " in", " small", " green",
    " house", ".",
];
/// (first, second) word pairs with their own latent.
pub const PAIRS: &[(&str, &str)] = &[(" red", " ball"), (" big", " dog"), (" the", " park")];

pub struct ToyModel {
    vocab: Vec<String>,
}

impl Default for ToyModel {
    fn default() -> Self {
        Self {
            vocab: WORDS.iter().map(|w| w.to_string()).collect(),
        }
    }
}

impl ToyModel {
    pub fn id(&self, word: &str) -> u32 {
        self.vocab.iter().position(|w| w == word).unwrap_or(1) as u32
    }

    /// Latent of a word (its token id) and of a pair (after the words).
    pub fn word_latent(&self, word: &str) -> usize {
        self.id(word) as usize
    }
    pub fn pair_latent(&self, k: usize) -> usize {
        self.vocab.len() + k
    }
    /// The last latent never fires.
    pub fn dead_latent(&self) -> usize {
        self.vocab.len() + PAIRS.len()
    }

    /// The hand-made ReLU SAE reading this model (d_in = vocabulary size).
    pub fn sae(&self) -> Sae {
        let v = self.vocab.len();
        let d_sae = v + PAIRS.len() + 1;
        let mut sae = Sae::init(ArchKind::RELU, v, d_sae, 0, 0);
        sae.w_enc.iter_mut().for_each(|w| *w = 0.0);
        sae.b_dec.iter_mut().for_each(|b| *b = 0.0);
        let mut set = |i: usize, j: usize, w: f32| sae.w_enc[i * d_sae + j] = w;
        // Word latents; strengths differ by word so the list has varied statistics. The BOS
        // latent (0) only fires at position 0, which the scan leaves out.
        for j in 0..v {
            set(j, j, 1.0 + (j % 4) as f32 * 0.25);
        }
        for (k, (a, b)) in PAIRS.iter().enumerate() {
            let j = v + k;
            set(self.id(a) as usize, j, 2.0);
            set(self.id(b) as usize, j, 2.0);
        }
        let mut b_enc = vec![-0.2; d_sae];
        for k in 0..PAIRS.len() {
            b_enc[v + k] = -2.5;
        }
        b_enc[d_sae - 1] = -1.0;
        *sae.param_mut("b_enc") = b_enc;
        // Decoder rows: the normalised encoder columns.
        for j in 0..d_sae {
            let col: Vec<f32> = (0..v).map(|i| sae.w_enc[i * d_sae + j]).collect();
            let n = col.iter().map(|x| x * x).sum::<f32>().sqrt();
            let row = &mut sae.w_dec[j * v..(j + 1) * v];
            for (w, c) in row.iter_mut().zip(&col) {
                *w = if n > 0.0 { c / n } else { 0.0 };
            }
        }
        sae.meta.hook_name = "toy.hook".into();
        sae.meta.model_name = "toy".into();
        sae
    }

    /// Deterministic sentences of the toy vocabulary, about `n_words` words.
    pub fn corpus(&self, n_words: usize, seed: u64) -> String {
        const SENTENCES: &[&str] = &[
            "the big dog ran to the park",
            "the cat sat on the mat",
            "a small bird sang in the green tree",
            "the dog ran with a red ball",
            "a big red ball sat on the mat",
            "the cat and the dog sat in the small house",
            "a bird sang to the cat",
            "the red house",
        ];
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut out = String::new();
        let mut words = 0;
        while words < n_words {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let s = SENTENCES[(state >> 33) as usize % SENTENCES.len()];
            out.push_str(s);
            out.push_str(" . ");
            words += s.split_whitespace().count() + 1;
        }
        out
    }

    /// Contexts of `ctx` tokens (BOS first) from a text, as `pack_corpus` makes them.
    pub fn pack(&self, text: &str, ctx: usize) -> Vec<u32> {
        let ids = self.tokenize(text);
        let mut out = Vec::new();
        for chunk in ids.chunks_exact(ctx - 1) {
            out.push(0);
            out.extend_from_slice(chunk);
        }
        out
    }
}

impl ActivationSource for ToyModel {
    fn hook(&self) -> &str {
        "toy.hook"
    }
    fn d_in(&self) -> usize {
        self.vocab.len()
    }
    fn activations(&self, tokens: &[u32], batch: usize, ctx: usize) -> Result<Vec<f32>> {
        if tokens.len() != batch * ctx {
            bail!(
                "{} tokens given for {batch} contexts of {ctx}",
                tokens.len()
            );
        }
        let v = self.vocab.len();
        let mut x = vec![0.0; tokens.len() * v];
        for (r, &t) in tokens.iter().enumerate() {
            if t as usize >= v {
                bail!("token id {t} is outside the vocabulary ({v})");
            }
            let row = &mut x[r * v..(r + 1) * v];
            row[t as usize] += 1.0;
            if r % ctx > 0 {
                row[tokens[r - 1] as usize] += 0.5;
            }
        }
        Ok(x)
    }
    fn direction_logits(&self, direction: &[f32]) -> Result<Vec<f32>> {
        // Unembedding = the embeddings, minus a small bias toward "the".
        let mut l = direction.to_vec();
        l[self.id(" the") as usize] -= 0.05;
        Ok(l)
    }
    fn tokenize(&self, text: &str) -> Vec<u32> {
        text.split_whitespace()
            .map(|w| {
                if w == "." {
                    self.id(".")
                } else {
                    self.id(&format!(" {}", w.to_lowercase()))
                }
            })
            .collect()
    }
    fn bos(&self) -> Option<u32> {
        Some(0)
    }
    fn vocab(&self) -> Vec<String> {
        self.vocab.clone()
    }
}
