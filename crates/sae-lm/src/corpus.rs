//! Text corpora: a directory of .txt, .jsonl with a text field, .parquet with a text column,
//! or the embedded default ("python-docs").

use crate::tokenizer::Tokenizer;

/// Contexts of fixed length packed from a corpus, BOS first in each.
pub struct PackedContexts {
    pub ctx: usize,
    /// `[n_contexts, ctx]` row-major token ids.
    pub tokens: Vec<u32>,
    /// For each context, (document index, token offset in that document) of its first
    /// non-BOS token, for the feature browser.
    pub origins: Vec<(u32, u32)>,
}

// CONTRACT (bodies by the sae-lm owner).
/// Read `spec` (path or "python-docs"), tokenize, and pack `n_tokens` tokens worth of
/// contexts of length `ctx` (BOS at position 0), skipping the first `skip_tokens` (for
/// held-out evaluation).
pub fn pack_corpus(
    spec: &str,
    tok: &Tokenizer,
    ctx: usize,
    n_tokens: usize,
    skip_tokens: usize,
) -> anyhow::Result<PackedContexts> {
    let _ = (spec, tok, ctx, n_tokens, skip_tokens);
    todo!("sae-lm owner")
}
