//! Text corpora: a directory of .txt, .jsonl with a text field, .parquet with a text column,
//! or the embedded default ("python-docs"). A spec ending in `#NAME` reads the field/column
//! NAME of .jsonl/.parquet files instead of `text` (e.g. `data.parquet#content`).
//!
//! Documents are read in a fixed order (files sorted by path, lines in file order), each is
//! tokenized on its own, and the token streams are concatenated. Every context is BOS followed
//! by the next `ctx - 1` tokens of that stream. `skip_tokens` drops that many stream tokens
//! first, so a harvest of N tokens from the start and an evaluation with `skip_tokens = N`
//! never see the same text.

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// The embedded default corpus: the Python 3.11 documentation sources (reStructuredText,
/// real English prose with code), from the Debian package python3.11-doc.
pub const PYTHON_DOCS: &str = "python-docs";
const PYTHON_DOCS_DIR: &str = "/usr/share/doc/python3.11/html/_sources";
const PYTHON_DOCS_PACKAGE: &str = "python3.11-doc";

/// Contexts of fixed length packed from a corpus, BOS first in each.
#[derive(Clone, Debug)]
pub struct PackedContexts {
    pub ctx: usize,
    /// `[n_contexts, ctx]` row-major token ids.
    pub tokens: Vec<u32>,
    /// For each context, (document index, token offset in that document) of its first
    /// non-BOS token, for the feature browser.
    pub origins: Vec<(u32, u32)>,
}

impl PackedContexts {
    pub fn n_contexts(&self) -> usize {
        self.origins.len()
    }
}

/// One file of the corpus and how to read documents out of it.
#[derive(Clone, Debug)]
enum Source {
    /// The whole file is one document.
    Text(PathBuf),
    /// One JSON object per line with a text field.
    Jsonl(PathBuf),
    /// One document per row of a string column.
    Parquet(PathBuf),
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::Text(p) | Source::Jsonl(p) | Source::Parquet(p) => p,
        }
    }
}

/// `path#field` -> (`path`, `field`); the field defaults to `text`.
fn split_field(spec: &str) -> (&str, &str) {
    match spec.rsplit_once('#') {
        Some((path, field))
            if !field.is_empty() && !field.contains('/') && !Path::new(spec).exists() =>
        {
            (path, field)
        }
        _ => (spec, "text"),
    }
}

/// Files of a corpus spec in their fixed order.
fn sources(spec: &str) -> Result<Vec<Source>> {
    let (spec, _) = split_field(spec);
    let root = if spec == PYTHON_DOCS {
        python_docs_dir()?
    } else {
        PathBuf::from(spec)
    };
    if !root.exists() {
        bail!("corpus '{spec}' not found: give '{PYTHON_DOCS}', a directory of .txt/.jsonl/.parquet files, or one such file");
    }
    let mut files = Vec::new();
    collect_files(&root, &mut files)
        .with_context(|| format!("listing corpus {}", root.display()))?;
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let name = f.to_string_lossy();
        if name.ends_with(".jsonl") {
            out.push(Source::Jsonl(f));
        } else if name.ends_with(".txt") {
            out.push(Source::Text(f));
        } else if name.ends_with(".parquet") {
            out.push(Source::Parquet(f));
        } else if root.is_file() {
            bail!(
                "{}: corpus files must be .txt, .jsonl or .parquet",
                f.display()
            );
        }
    }
    if out.is_empty() {
        bail!("corpus '{spec}' holds no .txt, .jsonl or .parquet files");
    }
    Ok(out)
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// The python-docs directory, installing the Debian package when it is missing.
fn python_docs_dir() -> Result<PathBuf> {
    let dir = PathBuf::from(PYTHON_DOCS_DIR);
    if dir.is_dir() {
        return Ok(dir);
    }
    eprintln!("corpus python-docs: installing Debian package {PYTHON_DOCS_PACKAGE} ...");
    let status = std::process::Command::new("apt-get")
        .args([
            "install",
            "-y",
            "--no-install-recommends",
            PYTHON_DOCS_PACKAGE,
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    match status {
        Ok(s) if s.success() && dir.is_dir() => Ok(dir),
        _ => bail!(
            "corpus python-docs needs {PYTHON_DOCS_DIR}; installing it failed: run \
             `sudo apt-get install -y {PYTHON_DOCS_PACKAGE}` or pass --corpus DIR"
        ),
    }
}

/// Documents of one source file, in order; `field` names the .jsonl field / .parquet column.
fn read_documents(src: &Source, field: &str) -> Result<Vec<String>> {
    let path = match src {
        Source::Parquet(p) => return crate::parquet_text::read_column(p, field),
        Source::Text(p) | Source::Jsonl(p) => p,
    };
    let bytes =
        std::fs::read(path).with_context(|| format!("reading corpus file {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "corpus file {} is not UTF-8 (byte {}); convert it to UTF-8",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    match src {
        Source::Jsonl(_) => {
            let mut docs = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
                let t = v[field].as_str().with_context(|| {
                    format!(
                        "{}:{}: no string field \"{field}\" (name another with CORPUS#FIELD)",
                        path.display(),
                        i + 1
                    )
                })?;
                docs.push(t.to_string());
            }
            Ok(docs)
        }
        _ => Ok(vec![text]),
    }
}

// CONTRACT (bodies by the sae-lm owner).
/// Read `spec` (path or "python-docs"), tokenize, and pack `n_tokens` tokens worth of
/// contexts of length `ctx` (BOS at position 0), skipping the first `skip_tokens` (for
/// held-out evaluation).
///
/// `n_tokens` counts non-BOS tokens: `ceil(n_tokens / (ctx - 1))` contexts are made, fewer
/// (only whole contexts) when the corpus runs out; an error when not even one fits.
pub fn pack_corpus(
    spec: &str,
    tok: &Tokenizer,
    ctx: usize,
    n_tokens: usize,
    skip_tokens: usize,
) -> anyhow::Result<PackedContexts> {
    if ctx < 2 {
        bail!("context length must be at least 2 (got {ctx})");
    }
    let bos = tok.bos_id.context("the tokenizer has no BOS token")?;
    let body = ctx - 1;
    let want_contexts = n_tokens.div_ceil(body);
    let sources = sources(spec)?;
    let (_, field) = split_field(spec);
    let mut packed = PackedContexts {
        ctx,
        tokens: Vec::with_capacity(want_contexts * ctx),
        origins: Vec::new(),
    };
    // Pending stream tokens with their (document, offset) origin.
    let mut pending: Vec<u32> = Vec::new();
    let mut pending_origin: Vec<(u32, u32)> = Vec::new();
    let mut to_skip = skip_tokens;
    let mut doc_index = 0u32;
    let mut total_docs_tokens = 0usize;
    let mut empty_files: Vec<String> = Vec::new();
    // Files are read and tokenized a batch at a time (in parallel, order kept).
    for batch in sources.chunks(16) {
        if packed.n_contexts() >= want_contexts {
            break;
        }
        let docs: Vec<Vec<Vec<u32>>> = batch
            .par_iter()
            .map(|s| {
                Ok(read_documents(s, field)?
                    .iter()
                    .map(|d| tok.encode(d))
                    .collect())
            })
            .collect::<Result<_>>()?;
        for (src, file_docs) in batch.iter().zip(&docs) {
            if file_docs.iter().all(|d| d.is_empty()) {
                empty_files.push(src.path().display().to_string());
            }
        }
        for doc in docs.into_iter().flatten() {
            total_docs_tokens += doc.len();
            let start = to_skip.min(doc.len());
            to_skip -= start;
            for (off, &t) in doc.iter().enumerate().skip(start) {
                pending.push(t);
                pending_origin.push((doc_index, off as u32));
            }
            doc_index += 1;
            let mut used = 0;
            while pending.len() - used >= body && packed.n_contexts() < want_contexts {
                packed.tokens.push(bos);
                packed.tokens.extend_from_slice(&pending[used..used + body]);
                packed.origins.push(pending_origin[used]);
                used += body;
            }
            pending.drain(..used);
            pending_origin.drain(..used);
        }
    }
    if packed.n_contexts() == 0 {
        let empty = if empty_files.is_empty() {
            String::new()
        } else {
            format!(" (empty: {})", empty_files.join(", "))
        };
        bail!(
            "corpus '{spec}' is too small: {total_docs_tokens} tokens in all, {skip_tokens} skipped, \
             a context needs {body}{empty}"
        );
    }
    Ok(packed)
}
