//! Byte-level BPE tokenizer read from GGUF metadata or tokenizer.json.
//!
//! GPT-2 style: text is split by a pre-tokenisation regex, each piece is mapped byte by byte to
//! printable "byte-level" characters, then merged greedily by merge rank.

use anyhow::{bail, Context};
use std::collections::HashMap;

/// How text is split before BPE (the `tokenizer.ggml.pre` family).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PreTokenizer {
    /// GPT-2 regex.
    Gpt2,
    /// Every digit on its own, then the GPT-2 regex (SmolLM / StarCoder style).
    DigitsThenGpt2,
    /// Llama 3 regex (digits in runs of up to three).
    Llama3,
}

const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer as the model uses it.
pub struct Tokenizer {
    pub bos_id: Option<u32>,
    /// Token strings in byte-level form, by id.
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    pre: PreTokenizer,
    regex: fancy_regex::Regex,
    /// Special tokens matched literally in text before BPE (as HF does), longest first.
    specials: Vec<(String, u32)>,
    /// A piece that is itself a token is taken whole, without merges (HF `ignore_merges`,
    /// Llama 3). Otherwise merges decide, which can split such a piece differently.
    pub ignore_merges: bool,
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_level_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            let c = char::from_u32(next).unwrap();
            next += 1;
            c
        };
    }
    table
}

impl Tokenizer {
    /// Build from a vocabulary (byte-level strings by id) and merges ("left right" lines, in
    /// rank order).
    pub fn from_parts(
        tokens: Vec<String>,
        merges: &[(String, String)],
        bos_id: Option<u32>,
        pre: PreTokenizer,
        special_ids: &[u32],
    ) -> anyhow::Result<Self> {
        if tokens.is_empty() {
            bail!("tokenizer has an empty vocabulary");
        }
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) else {
                continue;
            };
            let Some(&merged) = ids.get(&format!("{a}{b}")) else {
                continue;
            };
            merge_map.entry((ia, ib)).or_insert((rank as u32, merged));
        }
        let byte_to_char = byte_level_chars();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let pattern = match pre {
            PreTokenizer::Llama3 => LLAMA3_PATTERN,
            _ => GPT2_PATTERN,
        };
        let mut specials: Vec<(String, u32)> = special_ids
            .iter()
            .filter_map(|&id| tokens.get(id as usize).map(|t| (t.clone(), id)))
            .filter(|(t, _)| !t.is_empty())
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(Self {
            ignore_merges: pre == PreTokenizer::Llama3,
            specials,
            bos_id,
            tokens,
            ids,
            merges: merge_map,
            byte_to_char,
            char_to_byte,
            pre,
            regex: fancy_regex::Regex::new(pattern).context("pre-tokenizer regex")?,
        })
    }

    /// Pre-tokenizer family from GGUF's `tokenizer.ggml.pre` value.
    pub fn pre_from_gguf_name(name: &str) -> anyhow::Result<PreTokenizer> {
        Ok(match name {
            "smollm" | "starcoder" | "refact" | "smaug-bpe" => PreTokenizer::DigitsThenGpt2,
            "gpt-2" | "gpt2" | "default" => PreTokenizer::Gpt2,
            "llama-bpe" | "llama3" => PreTokenizer::Llama3,
            other => bail!(
                "unsupported tokenizer pre-tokenisation '{other}' (supported: smollm, gpt-2, llama-bpe)"
            ),
        })
    }

    /// Load a Hugging Face `tokenizer.json` (byte-level BPE models only).
    pub fn from_tokenizer_json(path: &std::path::Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let model = &json["model"];
        if model["type"].as_str() != Some("BPE") {
            bail!(
                "{}: only byte-level BPE tokenizers are supported",
                path.display()
            );
        }
        let vocab = model["vocab"]
            .as_object()
            .with_context(|| format!("{}: model.vocab missing", path.display()))?;
        let mut entries: Vec<(u32, String)> = vocab
            .iter()
            .map(|(k, v)| (v.as_u64().unwrap_or(u64::MAX) as u32, k.clone()))
            .collect();
        let mut special_ids = Vec::new();
        if let Some(added) = json["added_tokens"].as_array() {
            for t in added {
                if let (Some(id), Some(s)) = (t["id"].as_u64(), t["content"].as_str()) {
                    entries.push((id as u32, s.to_string()));
                    special_ids.push(id as u32);
                }
            }
        }
        let size = entries.iter().map(|e| e.0 as usize + 1).max().unwrap_or(0);
        let mut tokens = vec![String::new(); size];
        for (id, s) in entries {
            tokens[id as usize] = s;
        }
        let mut merges = Vec::new();
        for m in model["merges"].as_array().into_iter().flatten() {
            if let Some(s) = m.as_str() {
                if let Some((a, b)) = s.split_once(' ') {
                    merges.push((a.to_string(), b.to_string()));
                }
            } else if let Some(pair) = m.as_array() {
                if let (Some(a), Some(b)) = (pair[0].as_str(), pair.get(1).and_then(|b| b.as_str()))
                {
                    merges.push((a.to_string(), b.to_string()));
                }
            }
        }
        let pre_text = json["pre_tokenizer"].to_string();
        let pre = if pre_text.contains("Digits") {
            PreTokenizer::DigitsThenGpt2
        } else if pre_text.contains("\\p{N}{1,3}") {
            PreTokenizer::Llama3
        } else {
            PreTokenizer::Gpt2
        };
        // BOS: the post-processor's leading special token if any, else a known BOS name.
        let bos_name = json["post_processor"]["single"][0]["SpecialToken"]["id"]
            .as_str()
            .map(str::to_string);
        let bos_id = bos_name
            .into_iter()
            .chain(["<|begin_of_text|>", "<|endoftext|>", "<s>"].map(String::from))
            .find_map(|n| tokens.iter().position(|t| *t == n))
            .map(|i| i as u32);
        let mut tok = Self::from_parts(tokens, &merges, bos_id, pre, &special_ids)?;
        tok.ignore_merges = model["ignore_merges"].as_bool().unwrap_or(false);
        Ok(tok)
    }

    /// Id of a token string in byte-level form, if present.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    fn split<'t>(&self, text: &'t str, out: &mut Vec<&'t str>) {
        let push_regex = |piece: &'t str, out: &mut Vec<&'t str>| {
            for m in self.regex.find_iter(piece) {
                match m {
                    Ok(m) => out.push(m.as_str()),
                    Err(_) => {
                        // Backtracking limit: fall back to the whole remaining piece.
                        out.push(piece);
                        return;
                    }
                }
            }
        };
        if self.pre != PreTokenizer::DigitsThenGpt2 {
            push_regex(text, out);
            return;
        }
        // Isolate each numeric character, then split the runs between them.
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if is_unicode_number(c) {
                if start < i {
                    push_regex(&text[start..i], out);
                }
                out.push(&text[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        if start < text.len() {
            push_regex(&text[start..], out);
        }
    }

    fn bpe_piece(&self, piece: &str, out: &mut Vec<u32>) {
        let mut word: Vec<u32> = Vec::with_capacity(piece.len());
        let mut buf = [0u8; 4];
        for &b in piece.as_bytes() {
            let c = self.byte_to_char[b as usize];
            match self.ids.get(c.encode_utf8(&mut buf) as &str) {
                Some(&id) => word.push(id),
                None => continue, // byte missing from the vocabulary: dropped
            }
        }
        if self.ignore_merges && word.len() > 1 {
            if let Some(&id) = self.ids.get(&self.to_byte_level(piece)) {
                out.push(id);
                return;
            }
        }
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..word.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&(word[i], word[i + 1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((rank, _, _)) = best else { break };
            // Merge every occurrence of the best pair, left to right.
            let mut merged_word = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() {
                    if let Some(&(r, m)) = self.merges.get(&(word[i], word[i + 1])) {
                        if r == rank {
                            merged_word.push(m);
                            i += 2;
                            continue;
                        }
                    }
                }
                merged_word.push(word[i]);
                i += 1;
            }
            word = merged_word;
        }
        out.extend_from_slice(&word);
    }

    fn to_byte_level(&self, piece: &str) -> String {
        piece
            .bytes()
            .map(|b| self.byte_to_char[b as usize])
            .collect()
    }

    fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(s) = self.tokens.get(id as usize) else {
            return;
        };
        let mut buf = [0u8; 4];
        for c in s.chars() {
            match self.char_to_byte.get(&c) {
                Some(&b) => out.push(b),
                None => out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
            }
        }
    }
}

/// `\p{N}`: decimal digits, letter numbers and other numbers.
fn is_unicode_number(c: char) -> bool {
    // char::is_numeric covers Nd, Nl and No, which is exactly \p{N}.
    c.is_numeric()
}

// CONTRACT (bodies by the sae-lm owner).
impl Tokenizer {
    /// Token ids of `text`, without BOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut pieces = Vec::new();
        let mut rest = text;
        loop {
            // Earliest special token in the rest (longest on ties).
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let (plain, special) = match next {
                Some((at, len, id)) => (&rest[..at], Some((at + len, id))),
                None => (rest, None),
            };
            pieces.clear();
            self.split(plain, &mut pieces);
            for piece in &pieces {
                self.bpe_piece(piece, &mut ids);
            }
            match special {
                Some((end, id)) => {
                    ids.push(id);
                    rest = &rest[end..];
                }
                None => break,
            }
        }
        ids
    }
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            self.token_bytes(id, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
    /// Printable text of one token (byte-level symbols mapped back to UTF-8, lossy).
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id])
    }
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
}
