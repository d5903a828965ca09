//! Activation files: one 2-D float tensor `[n_rows, d_in]` per file, read row by row with
//! positioned reads.
//!
//! Files are not memory-mapped: a mapped file truncated by another process kills the reader
//! with SIGBUS, while a positioned read just comes back short, which is reported as an error
//! naming the file. Shuffled training batches read scattered rows either way, and a `pread` per
//! row costs about what the page faults of a mapping do (see `examples/read_speed.rs`).

use crate::writer::{Manifest, StoreDtype, MANIFEST};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// Tensor name used in our shards; other files may hold a single 2-D tensor of any name.
pub const ACTIVATIONS: &str = "activations";
/// Tensor of the loss gradient beside the activations, in stores harvested with it.
pub const GRADS: &str = "grads";

/// Headers larger than this are refused before they are read (the safetensors crate's limit).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// One open file and where its rows lie.
pub struct ActivationFile {
    pub path: PathBuf,
    file: File,
    /// Length and modification time when opened: a file changed since is reported, not read.
    len: u64,
    modified: Option<SystemTime>,
    pub dtype: Dtype,
    /// Byte offset of row 0.
    offset: u64,
    pub n_rows: usize,
    pub d_in: usize,
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

fn is_npy(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "npy")
}

/// `len` bytes at `offset`; a file shorter than the caller computed from its header is corrupt.
fn read_at(file: &File, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| anyhow::anyhow!("cannot read the header: {e}"))?;
    Ok(buf)
}

impl ActivationFile {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path, None).with_context(|| format!("{}", path.display()))
    }

    /// The 2-D tensor `name` of a `.safetensors` file (e.g. [`GRADS`]), read like activations.
    pub fn open_tensor(path: &Path, name: &str) -> Result<Self> {
        Self::open_inner(path, Some(name)).with_context(|| format!("{}", path.display()))
    }

    fn open_inner(path: &Path, tensor: Option<&str>) -> Result<Self> {
        let file = File::open(path).map_err(|e| {
            if e.raw_os_error() == Some(24) {
                anyhow::anyhow!(
                    "cannot open: {e}; every file of a store stays open while it is read, so \
                     raise the limit (ulimit -n) or store fewer, larger shards"
                )
            } else {
                anyhow::anyhow!("cannot open: {e}")
            }
        })?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            bail!("not a regular file (expected a .safetensors or .npy activation file)");
        }
        let len = meta.len();
        if len == 0 {
            bail!("empty file (not a .safetensors or .npy activation file)");
        }
        let (dtype, shape, offset) = if let Some(name) = tensor {
            if !is_safetensors(path) {
                bail!("tensor '{name}' is read from .safetensors files only");
            }
            safetensors_tensor(&file, len, Some(name))?
        } else if is_npy(path) {
            let prefix = read_at(&file, 0, len.min(crate::npy::PREFIX_LEN as u64) as usize)?;
            let size = crate::npy::header_size(&prefix)?;
            // A header running past the end is read as far as it goes and reported truncated.
            let header = read_at(&file, 0, (size as u64).min(len) as usize)?;
            let h = crate::npy::parse_header(&header)?;
            (h.dtype, h.shape, h.data_offset as u64)
        } else if is_safetensors(path) {
            safetensors_tensor(&file, len, None)?
        } else {
            bail!(
                "unknown file type (expected .safetensors or .npy); pass an activation store \
                 directory or a .safetensors/.npy file"
            );
        };
        if shape.len() != 2 {
            bail!("activation tensor has shape {shape:?}; expected 2 dimensions [n_tokens, d_in]");
        }
        let (n_rows, d_in) = (shape[0], shape[1]);
        if d_in == 0 {
            bail!("activation tensor has d_in = 0");
        }
        // Sizes come from the header: an absurd shape must not wrap around and pass the check.
        let data = (n_rows as u64)
            .checked_mul(d_in as u64)
            .and_then(|v| v.checked_mul(dtype.size() as u64));
        let need = data.and_then(|v| v.checked_add(offset));
        match need {
            None => bail!(
                "the header's shape [{n_rows}, {d_in}] is impossibly large (its byte size \
                 overflows); the file is corrupt, re-create it"
            ),
            Some(need) if len < need => bail!(
                "truncated file: {len} bytes, but shape [{n_rows}, {d_in}] needs {need}; \
                 re-create it"
            ),
            Some(_) => {}
        }
        if n_rows == 0 {
            bail!(
                "holds no rows (shape [0, {d_in}]); remove it from the store or re-create the store"
            );
        }
        Ok(ActivationFile {
            path: path.to_path_buf(),
            file,
            len,
            modified: meta.modified().ok(),
            dtype,
            offset,
            n_rows,
            d_in,
        })
    }

    /// An error if the file's length or modification time differ from when it was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = self
            .file
            .metadata()
            .with_context(|| format!("{}: cannot check the file", self.path.display()))?;
        if meta.len() != self.len || meta.modified().ok() != self.modified {
            bail!(
                "{}: the file changed while it was being read (now {} bytes, expected {}{}); \
                 the store was modified by another process; re-harvest it",
                self.path.display(),
                meta.len(),
                self.len,
                if meta.len() == self.len {
                    ", and its modification time changed"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    /// Row `r` converted to f32 into `out` (`d_in` values); NaN/Inf is an error naming the row.
    pub fn read_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        self.read_row_with(r, out, &mut Vec::new())
    }

    /// `read_row` with a scratch buffer for 2-byte dtypes, reused across rows.
    fn read_row_with(&self, r: usize, out: &mut [f32], scratch: &mut Vec<u8>) -> Result<()> {
        let d = self.d_in;
        if r >= self.n_rows {
            bail!(
                "{}: row {r} is past the end ({} rows)",
                self.path.display(),
                self.n_rows
            );
        }
        assert_eq!(out.len(), d, "read_row: output has the wrong length");
        let sz = self.dtype.size();
        // Cannot overflow: open() checked that offset + n_rows * d * sz fits the file's length.
        let start = self.offset + (r * d * sz) as u64;
        let read = match self.dtype {
            Dtype::F32 => self
                .file
                .read_exact_at(bytemuck::cast_slice_mut(out), start),
            Dtype::F16 | Dtype::Bf16 => {
                scratch.resize(d * sz, 0);
                self.file.read_exact_at(scratch, start)
            }
        };
        if let Err(e) = read {
            // A short read means the file shrank under us; say so rather than the bare I/O error.
            self.check_unchanged()?;
            bail!("{}: cannot read row {r}: {e}", self.path.display());
        }
        match self.dtype {
            Dtype::F32 => {
                for v in out.iter_mut() {
                    *v = f32::from_bits(u32::from_le(v.to_bits()));
                }
            }
            Dtype::F16 => {
                for (o, c) in out.iter_mut().zip(scratch.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Dtype::Bf16 => {
                for (o, c) in out.iter_mut().zip(scratch.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
        if let Some(col) = out.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: row {r} has a non-finite value ({} at column {col}); fix or remove this file",
                self.path.display(),
                out[col]
            );
        }
        Ok(())
    }
}

/// The activation tensor of a safetensors file: `wanted` if given, else `activations` if
/// present, otherwise the only tensor. Returns dtype, shape and the byte offset of its data in
/// the file.
fn safetensors_tensor(
    file: &File,
    len: u64,
    wanted: Option<&str>,
) -> Result<(Dtype, Vec<usize>, u64)> {
    let invalid = |why: String| {
        anyhow::anyhow!(
            "not a valid safetensors file ({why}); truncated or another format? Re-create it \
             (re-harvest a store)"
        )
    };
    if len < 8 {
        return Err(invalid(format!(
            "{len} bytes, shorter than the header length field"
        )));
    }
    let header_len = u64::from_le_bytes(read_at(file, 0, 8)?.try_into().unwrap());
    if header_len > MAX_SAFETENSORS_HEADER || header_len > len - 8 {
        return Err(invalid(format!(
            "a header of {header_len} bytes in a file of {len}"
        )));
    }
    let header = read_at(file, 8, header_len as usize)?;
    let text = std::str::from_utf8(&header).map_err(|e| invalid(format!("header: {e}")))?;
    // The crate's Metadata checks that the tensors' offsets are contiguous and agree with their
    // shapes and dtypes, with checked arithmetic.
    let meta: safetensors::tensor::Metadata =
        serde_json::from_str(text).map_err(|e| invalid(format!("header: {e}")))?;
    let tensors = meta.tensors();
    let data_end = tensors
        .values()
        .map(|t| t.data_offsets.1 as u64)
        .max()
        .unwrap_or(0);
    let data_start = 8 + header_len;
    match data_start.checked_add(data_end) {
        Some(total) if total == len => {}
        total => {
            return Err(invalid(format!(
                "the header describes {} bytes but the file has {len}",
                total.map_or("more than 2^64".to_string(), |t| t.to_string())
            )))
        }
    }
    let name = if let Some(w) = wanted {
        if !tensors.contains_key(w) {
            bail!("no tensor named '{w}'");
        }
        w.to_string()
    } else if tensors.contains_key(ACTIVATIONS) {
        ACTIVATIONS.to_string()
    } else if tensors.len() == 1 {
        tensors.keys().next().unwrap().clone()
    } else {
        let mut n: Vec<&str> = tensors.keys().map(String::as_str).collect();
        n.sort();
        bail!("no tensor named '{ACTIVATIONS}' and more than one tensor ({n:?}); which one holds the activations?");
    };
    let t = tensors[&name];
    let dtype = match t.dtype {
        safetensors::Dtype::F32 => Dtype::F32,
        safetensors::Dtype::F16 => Dtype::F16,
        safetensors::Dtype::BF16 => Dtype::Bf16,
        other => {
            bail!("tensor '{name}' has unsupported dtype {other:?} (expected F32, F16 or BF16)")
        }
    };
    Ok((dtype, t.shape.clone(), data_start + t.data_offsets.0 as u64))
}

/// All activation files of a path (one file, or a directory of shards) as one row space.
pub struct ActivationStore {
    pub root: PathBuf,
    files: Vec<ActivationFile>,
    /// Global index of each file's first row, plus the total at the end.
    starts: Vec<u64>,
    d_in: usize,
    /// `manifest.json` of a directory written by our writer, when present.
    pub manifest: Option<Manifest>,
}

impl ActivationStore {
    /// Opens a `.safetensors`/`.npy` file or a directory. A directory with `manifest.json` is
    /// read through the shards it lists; otherwise every `.safetensors`/`.npy` file in it,
    /// sorted by name.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path, None)
    }

    /// The loss gradients of a store harvested with them (`Manifest::grads`): the same rows
    /// as [`ActivationStore::open`] of `path`, read from each shard's `grads` tensor.
    pub fn open_grads(path: &Path) -> Result<Self> {
        let has =
            path.is_dir() && path.join(MANIFEST).exists() && Manifest::read(path)?.grads.is_some();
        if !has {
            bail!(
                "{} holds no loss gradients; harvest it with them: sae harvest --with-grad \
                 (a store written by `sae harvest` whose manifest records `grads`)",
                path.display()
            );
        }
        Self::open_inner(path, Some(GRADS))
    }

    fn open_inner(path: &Path, tensor: Option<&str>) -> Result<Self> {
        let meta = std::fs::metadata(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read activations ({e})", path.display()))?;
        let (paths, manifest) = if meta.is_dir() {
            if path.join(MANIFEST).exists() {
                let m = Manifest::read(path)?;
                (manifest_shards(path, &m)?, Some(m))
            } else {
                (directory_files(path)?, None)
            }
        } else {
            (vec![path.to_path_buf()], None)
        };
        let files = paths
            .iter()
            .map(|p| match tensor {
                None => ActivationFile::open(p),
                Some(name) => ActivationFile::open_tensor(p, name),
            })
            .collect::<Result<Vec<_>>>()?;
        let d_in = files[0].d_in;
        for f in &files[1..] {
            if f.d_in != d_in {
                bail!(
                    "{}: d_in is {} but {} has d_in {d_in}; all files of a store must have the same width",
                    f.path.display(),
                    f.d_in,
                    files[0].path.display()
                );
            }
        }
        if let Some(m) = &manifest {
            check_against_manifest(&path.join(MANIFEST), m, &files)?;
        }
        let mut starts = vec![0u64];
        for f in &files {
            let total = starts.last().unwrap().checked_add(f.n_rows as u64);
            starts.push(total.with_context(|| {
                format!("{}: the files hold more than 2^64 rows", path.display())
            })?);
        }
        Ok(ActivationStore {
            root: path.to_path_buf(),
            files,
            starts,
            d_in,
            manifest,
        })
    }

    pub fn d_in(&self) -> usize {
        self.d_in
    }

    pub fn n_rows(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    pub fn files(&self) -> &[ActivationFile] {
        &self.files
    }

    /// The file holding global row `g`, and the row within it.
    fn locate(&self, g: u64) -> Result<(usize, usize)> {
        if g >= self.n_rows() {
            bail!(
                "{}: row {g} is past the end ({} rows)",
                self.root.display(),
                self.n_rows()
            );
        }
        let fi = self.starts.partition_point(|&s| s <= g) - 1;
        Ok((fi, (g - self.starts[fi]) as usize))
    }

    /// Global row `g` into `out`.
    pub fn read_row(&self, g: u64, out: &mut [f32]) -> Result<()> {
        let (fi, r) = self.locate(g)?;
        self.files[fi].read_row(r, out)
    }

    /// The given global rows into `out` (`[rows.len(), d_in]`), converted in parallel.
    /// Every file read from is checked afterwards, so rows of a file that another process
    /// changed meanwhile are reported as such instead of being returned.
    pub fn read_rows(&self, rows: &[u64], out: &mut [f32]) -> Result<()> {
        let d = self.d_in;
        assert_eq!(
            out.len(),
            rows.len() * d,
            "read_rows: output has the wrong length"
        );
        let mut touched = vec![false; self.files.len()];
        let located = rows
            .iter()
            .map(|&g| {
                let (fi, r) = self.locate(g)?;
                touched[fi] = true;
                Ok((fi, r))
            })
            .collect::<Result<Vec<_>>>()?;
        let read = out
            .par_chunks_mut(d)
            .zip(located.par_iter())
            .try_for_each_init(Vec::new, |scratch, (o, &(fi, r))| {
                self.files[fi].read_row_with(r, o, scratch)
            });
        for (f, _) in self.files.iter().zip(&touched).filter(|(_, &t)| t) {
            f.check_unchanged()?;
        }
        read
    }
}

/// The shard paths a manifest lists, each checked to be a plain name that exists.
fn manifest_shards(dir: &Path, m: &Manifest) -> Result<Vec<PathBuf>> {
    let manifest = dir.join(MANIFEST);
    if m.shards.is_empty() {
        bail!(
            "{}: lists no shards yet (the harvest stopped before finishing its first one); \
             rerun the harvest to resume it",
            manifest.display()
        );
    }
    m.shards
        .iter()
        .map(|s| {
            let name = Path::new(&s.file);
            let plain = name.components().count() == 1
                && matches!(
                    name.components().next(),
                    Some(std::path::Component::Normal(_))
                );
            if !plain {
                bail!(
                    "{}: shard '{}' is not a file name inside the store directory; the manifest \
                     is corrupt, re-harvest the store",
                    manifest.display(),
                    s.file
                );
            }
            let p = dir.join(name);
            if !p.exists() {
                bail!(
                    "{}: listed in {} but missing; the store is incomplete, re-harvest it",
                    p.display(),
                    manifest.display()
                );
            }
            Ok(p)
        })
        .collect()
}

/// The `.safetensors`/`.npy` files of a directory without a manifest, sorted by name.
fn directory_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut p: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && (is_safetensors(p) || is_npy(p)))
        .collect();
    p.sort();
    // An SAE directory holds one .safetensors file too; say what it is rather than failing
    // on its tensor names.
    if dir.join("cfg.json").is_file() && dir.join("sae_weights.safetensors").is_file() {
        bail!(
            "{}: this is a trained SAE, not activations; pass the activation store (a directory \
             written by `sae harvest` or `sae synth`, or a .safetensors/.npy file)",
            dir.display()
        );
    }
    if p.is_empty() {
        bail!(
            "{}: no activation files (.safetensors or .npy) in this directory; pass a store \
             written by `sae harvest` or `sae synth`, or a .safetensors/.npy file",
            dir.display()
        );
    }
    Ok(p)
}

/// The shards must be what the manifest says they are.
fn check_against_manifest(manifest: &Path, m: &Manifest, files: &[ActivationFile]) -> Result<()> {
    let fix = "the store is inconsistent; re-harvest it";
    let d_in = files[0].d_in;
    if m.d_in != d_in {
        bail!(
            "{}: manifest says d_in {} but the shards have {d_in}; {fix}",
            manifest.display(),
            m.d_in
        );
    }
    let dtype = match m.dtype {
        StoreDtype::F32 => Dtype::F32,
        StoreDtype::Bf16 => Dtype::Bf16,
    };
    let mut total = 0u64;
    for (f, s) in files.iter().zip(&m.shards) {
        if f.n_rows != s.n_rows {
            bail!(
                "{}: holds {} rows but {} lists {}; {fix}",
                f.path.display(),
                f.n_rows,
                manifest.display(),
                s.n_rows
            );
        }
        if f.dtype != dtype {
            bail!(
                "{}: holds {:?} values but {} says {:?}; {fix}",
                f.path.display(),
                f.dtype,
                manifest.display(),
                m.dtype
            );
        }
        total += f.n_rows as u64;
    }
    if m.n_tokens as u64 != total {
        bail!(
            "{}: n_tokens is {} but its shards hold {total} rows; {fix}",
            manifest.display(),
            m.n_tokens
        );
    }
    Ok(())
}
