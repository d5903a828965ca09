//! Byte-level BPE tokenizer read from GGUF metadata or tokenizer.json.

/// A tokenizer as the model uses it.
pub struct Tokenizer {
    pub bos_id: Option<u32>,
}

// CONTRACT (bodies by the sae-lm owner).
impl Tokenizer {
    /// Token ids of `text`, without BOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let _ = text;
        todo!("sae-lm owner")
    }
    pub fn decode(&self, ids: &[u32]) -> String {
        let _ = ids;
        todo!("sae-lm owner")
    }
    /// Printable text of one token (byte-level symbols mapped back to UTF-8, lossy).
    pub fn token_text(&self, id: u32) -> String {
        let _ = id;
        todo!("sae-lm owner")
    }
    pub fn vocab_size(&self) -> usize {
        todo!("sae-lm owner")
    }
}
