//! Memory-mapped activation files: one 2-D float tensor `[n_rows, d_in]` per file.

use crate::writer::{Manifest, MANIFEST};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

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

/// One mapped file and where its rows lie.
pub struct ActivationFile {
    pub path: PathBuf,
    mmap: Mmap,
    pub dtype: Dtype,
    /// Byte offset of row 0.
    offset: usize,
    pub n_rows: usize,
    pub d_in: usize,
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

fn is_npy(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "npy")
}

impl ActivationFile {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path).with_context(|| format!("{}", path.display()))
    }

    fn open_inner(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open: {e}"))?;
        let len = file.metadata()?.len();
        if len == 0 {
            bail!("empty file (not a .safetensors or .npy activation file)");
        }
        // SAFETY: the file is only read; a writer changing it underneath us is a user error
        // that the length checks below cannot fully catch, as with every mmap reader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| anyhow::anyhow!("cannot map: {e}"))?;
        let (dtype, shape, offset) = if is_npy(path) {
            let h = crate::npy::parse_header(&mmap)?;
            (h.dtype, h.shape, h.data_offset)
        } else if is_safetensors(path) {
            safetensors_tensor(&mmap)?
        } else {
            bail!("unknown file type (expected .safetensors or .npy)");
        };
        if shape.len() != 2 {
            bail!("activation tensor has shape {shape:?}; expected 2 dimensions [n_tokens, d_in]");
        }
        let (n_rows, d_in) = (shape[0], shape[1]);
        if d_in == 0 {
            bail!("activation tensor has d_in = 0");
        }
        let need = offset + n_rows * d_in * dtype.size();
        if (mmap.len()) < need {
            bail!(
                "truncated file: {} bytes, but shape [{n_rows}, {d_in}] needs {need}",
                mmap.len()
            );
        }
        Ok(ActivationFile {
            path: path.to_path_buf(),
            mmap,
            dtype,
            offset,
            n_rows,
            d_in,
        })
    }

    /// Row `r` converted to f32 into `out` (`d_in` values); NaN/Inf is an error naming the row.
    pub fn read_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let d = self.d_in;
        let sz = self.dtype.size();
        let start = self.offset + r * d * sz;
        let bytes = &self.mmap[start..start + d * sz];
        match self.dtype {
            Dtype::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Dtype::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Dtype::Bf16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
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

/// The activation tensor of a safetensors image: `activations` if present, otherwise the only
/// tensor. Returns dtype, shape and byte offset of its data within `bytes`.
fn safetensors_tensor(bytes: &[u8]) -> Result<(Dtype, Vec<usize>, usize)> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        anyhow::anyhow!("not a valid safetensors file ({e}); truncated or another format?")
    })?;
    let names = st.names();
    let name = if names.contains(&ACTIVATIONS) {
        ACTIVATIONS.to_string()
    } else if names.len() == 1 {
        names[0].to_string()
    } else {
        let mut n: Vec<&str> = names.to_vec();
        n.sort();
        bail!("no tensor named '{ACTIVATIONS}' and more than one tensor ({n:?}); which one holds the activations?");
    };
    let t = st.tensor(&name)?;
    let dtype = match t.dtype() {
        safetensors::Dtype::F32 => Dtype::F32,
        safetensors::Dtype::F16 => Dtype::F16,
        safetensors::Dtype::BF16 => Dtype::Bf16,
        other => {
            bail!("tensor '{name}' has unsupported dtype {other:?} (expected F32, F16 or BF16)")
        }
    };
    let offset = t.data().as_ptr() as usize - bytes.as_ptr() as usize;
    Ok((dtype, t.shape().to_vec(), offset))
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
        let meta = std::fs::metadata(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read activations ({e})", path.display()))?;
        let (paths, manifest) = if meta.is_dir() {
            if path.join(MANIFEST).exists() {
                let m = Manifest::read(path)?;
                let p: Vec<PathBuf> = m.shards.iter().map(|s| path.join(&s.file)).collect();
                (p, Some(m))
            } else {
                let mut p: Vec<PathBuf> = std::fs::read_dir(path)
                    .with_context(|| format!("listing {}", path.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && (is_safetensors(p) || is_npy(p)))
                    .collect();
                p.sort();
                (p, None)
            }
        } else {
            (vec![path.to_path_buf()], None)
        };
        if paths.is_empty() {
            bail!(
                "{}: no activation files (.safetensors or .npy) in this directory",
                path.display()
            );
        }
        let files = paths
            .iter()
            .map(|p| ActivationFile::open(p))
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
            if m.d_in != d_in {
                bail!(
                    "{}: manifest says d_in {} but the shards have {d_in}",
                    path.join(MANIFEST).display(),
                    m.d_in
                );
            }
        }
        let mut starts = vec![0u64];
        for f in &files {
            starts.push(starts.last().unwrap() + f.n_rows as u64);
        }
        if *starts.last().unwrap() == 0 {
            bail!("{}: the activation files hold no rows", path.display());
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

    /// Global row `g` into `out`.
    pub fn read_row(&self, g: u64, out: &mut [f32]) -> Result<()> {
        let fi = self.starts.partition_point(|&s| s <= g) - 1;
        self.files[fi].read_row((g - self.starts[fi]) as usize, out)
    }

    /// The given global rows into `out` (`[rows.len(), d_in]`), converted in parallel.
    pub fn read_rows(&self, rows: &[u64], out: &mut [f32]) -> Result<()> {
        let d = self.d_in;
        assert_eq!(
            out.len(),
            rows.len() * d,
            "read_rows: output has the wrong length"
        );
        out.par_chunks_mut(d)
            .zip(rows.par_iter())
            .try_for_each(|(o, &g)| self.read_row(g, o))
    }
}
