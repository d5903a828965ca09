//! Sharded activation writer (owned by the sae-lm / harvest helper).
//!
//! Rows are buffered and written as `shard_NNNNN.safetensors` once `rows_per_shard` are in;
//! each shard goes to a temp name, is synced, renamed, and only then listed in
//! `manifest.json` (itself replaced atomically). Re-opening a directory whose manifest matches
//! the same run continues after the listed shards.

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    F32,
    Bf16,
}

impl std::str::FromStr for StoreDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(StoreDtype::F32),
            "bf16" => Ok(StoreDtype::Bf16),
            _ => bail!("unknown dtype '{s}' (use f32 or bf16)"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub n_rows: usize,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub model: String,
    pub hook: String,
    pub d_in: usize,
    pub context_size: usize,
    /// Rows in the listed shards.
    pub n_tokens: usize,
    pub corpus: String,
    pub dtype: StoreDtype,
    pub shards: Vec<ShardEntry>,
    pub complete: bool,
    /// Rows the run was asked for.
    #[serde(default)]
    pub target_tokens: usize,
    /// Whether the BOS position of each context is left out.
    #[serde(default)]
    pub bos_excluded: bool,
    #[serde(default)]
    pub has_tokens: bool,
    /// Precision of the model's weight products when harvested (`f32` or `bf16`); absent for
    /// stores written without a model, and for stores harvested before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<String>,
    /// When present, every shard also holds tensor `grads` `[n_rows, d_in]` (same dtype as
    /// the activations): the gradient of the loss this names with respect to each row.
    /// Absent for stores without gradients, and for stores written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grads: Option<String>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid activation manifest; re-harvest the store, or delete the \
                 manifest to read the directory's .safetensors/.npy files as they are",
                path.display()
            )
        })
    }

    /// Same run (everything but progress)?
    fn same_run(&self, other: &Manifest) -> bool {
        self.model == other.model
            && self.hook == other.hook
            && self.d_in == other.d_in
            && self.context_size == other.context_size
            && self.corpus == other.corpus
            && self.dtype == other.dtype
            && self.bos_excluded == other.bos_excluded
            && self.has_tokens == other.has_tokens
            && self.grads == other.grads
            // A store harvested before the precision was recorded may be resumed either way.
            && (self.compute.is_none() || other.compute.is_none() || self.compute == other.compute)
    }
}

/// Peak memory of writing a shard of `rows` rows: the f32 buffer, its bytes in the stored dtype
/// and the serialized file (twice with gradients), plus token ids and positions likewise.
/// `None` on overflow.
pub fn shard_buffer_bytes(
    d_in: usize,
    rows: usize,
    dtype: StoreDtype,
    has_tokens: bool,
    has_grads: bool,
) -> Option<u64> {
    let stored = match dtype {
        StoreDtype::F32 => 4,
        StoreDtype::Bf16 => 2,
    };
    let tensors = if has_grads { 2 } else { 1 };
    let per_row = (d_in as u64)
        .checked_mul(tensors * (4 + 2 * stored))?
        .checked_add(if has_tokens { 3 * 12 } else { 0 })?;
    per_row.checked_mul(rows as u64)
}

pub struct ShardWriter {
    dir: PathBuf,
    manifest: Manifest,
    rows_per_shard: usize,
    acts: Vec<f32>,
    grads: Vec<f32>,
    tokens: Vec<u32>,
    positions: Vec<u32>,
}

fn io_context(e: std::io::Error, what: &str, path: &Path) -> anyhow::Error {
    if e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull {
        anyhow::anyhow!(
            "disk full while {what} {}; finished shards are kept, free space and rerun to resume",
            path.display()
        )
    } else {
        anyhow::anyhow!("{what} {}: {e}", path.display())
    }
}

/// Writes `bytes` to `path` through a temp file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_context(e, "writing", path));
    }
    Ok(())
}

impl ShardWriter {
    /// Starts a store in `dir`, or resumes one whose manifest describes the same run.
    /// `template` gives the run's description; its progress fields are ignored.
    pub fn open(dir: &Path, template: Manifest, rows_per_shard: usize) -> Result<Self> {
        if rows_per_shard == 0 {
            bail!("rows per shard must be positive");
        }
        if template.d_in == 0 {
            bail!("{}: activations of width 0 cannot be stored", dir.display());
        }
        // The buffered shard is allocated as rows come in; refuse one that cannot fit now
        // rather than abort when it fills.
        let rows = match template.target_tokens {
            0 => rows_per_shard,
            t => rows_per_shard.min(t),
        };
        sae_output::ensure_memory(
            shard_buffer_bytes(
                template.d_in,
                rows,
                template.dtype,
                template.has_tokens,
                template.grads.is_some(),
            ),
            &format!("a shard of {rows} rows of width {}", template.d_in),
            "lower --shard-rows",
        )?;
        std::fs::create_dir_all(dir).map_err(|e| io_context(e, "creating", dir))?;
        let manifest_path = dir.join(MANIFEST);
        let manifest = if manifest_path.exists() {
            let old = Manifest::read(dir)?;
            if !old.same_run(&template) {
                bail!(
                    "{} holds activations of another run (model {}, hook {}, corpus {}, dtype {:?}, compute {}); \
                     use another --out or delete it",
                    dir.display(),
                    old.model,
                    old.hook,
                    old.corpus,
                    old.dtype,
                    old.compute.as_deref().unwrap_or("not recorded")
                );
            }
            for s in &old.shards {
                if !dir.join(&s.file).exists() {
                    bail!("{}: shard {} listed in the manifest is missing; delete the directory and rerun", dir.display(), s.file);
                }
            }
            Manifest {
                target_tokens: template.target_tokens,
                complete: false,
                ..old
            }
        } else {
            // Empty but for the mark of a store being built (`sae_output::mark`).
            let mut entries = std::fs::read_dir(dir)?;
            if entries.any(|e| e.map_or(true, |e| e.file_name() != sae_output::MARK_FILE)) {
                bail!(
                    "{} exists and is not an activation store; use an empty or new --out",
                    dir.display()
                );
            }
            Manifest {
                n_tokens: 0,
                shards: Vec::new(),
                complete: false,
                ..template
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            rows_per_shard,
            acts: Vec::new(),
            grads: Vec::new(),
            tokens: Vec::new(),
            positions: Vec::new(),
        })
    }

    /// Rows already in finished shards (a resumed run continues after them).
    pub fn rows_done(&self) -> usize {
        self.manifest.n_tokens
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Adds rows: `acts` is `[n, d_in]`; `tokens` `[n]` and `positions` `[n]` of (context
    /// index, position) are stored when the manifest says so.
    pub fn push(&mut self, acts: &[f32], tokens: &[u32], positions: &[(u32, u32)]) -> Result<()> {
        self.push_rows(acts, None, tokens, positions)
    }

    /// `push` for a store with gradients (`Manifest::grads`): `grads` is `[n, d_in]`, one
    /// per activation row.
    pub fn push_with_grads(
        &mut self,
        acts: &[f32],
        grads: &[f32],
        tokens: &[u32],
        positions: &[(u32, u32)],
    ) -> Result<()> {
        self.push_rows(acts, Some(grads), tokens, positions)
    }

    fn push_rows(
        &mut self,
        acts: &[f32],
        grads: Option<&[f32]>,
        tokens: &[u32],
        positions: &[(u32, u32)],
    ) -> Result<()> {
        let d = self.manifest.d_in;
        match (self.manifest.grads.is_some(), grads) {
            (true, None) => bail!("this store holds gradients; push them with the activations"),
            (false, Some(_)) => bail!("this store was opened without gradients"),
            (_, Some(g)) if g.len() != acts.len() => bail!(
                "{} gradient values for {} activation values",
                g.len(),
                acts.len()
            ),
            _ => {}
        }
        if !acts.len().is_multiple_of(d) {
            bail!(
                "activation buffer of {} values is not a multiple of d_in {d}",
                acts.len()
            );
        }
        let n = acts.len() / d;
        if self.manifest.has_tokens && (tokens.len() != n || positions.len() != n) {
            bail!(
                "{n} activation rows but {} tokens and {} positions",
                tokens.len(),
                positions.len()
            );
        }
        let mut done = 0;
        while done < n {
            let buffered = self.acts.len() / d;
            let take = (self.rows_per_shard - buffered).min(n - done);
            self.acts
                .extend_from_slice(&acts[done * d..(done + take) * d]);
            if let Some(g) = grads {
                self.grads
                    .extend_from_slice(&g[done * d..(done + take) * d]);
            }
            if self.manifest.has_tokens {
                self.tokens.extend_from_slice(&tokens[done..done + take]);
                for &(c, p) in &positions[done..done + take] {
                    self.positions.extend_from_slice(&[c, p]);
                }
            }
            done += take;
            if self.acts.len() / d == self.rows_per_shard {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Writes the buffered rows as the next shard and lists it in the manifest.
    fn flush(&mut self) -> Result<()> {
        let d = self.manifest.d_in;
        let n = self.acts.len() / d;
        if n == 0 {
            return Ok(());
        }
        let file = format!("shard_{:05}.safetensors", self.manifest.shards.len());
        let stored = |values: &[f32]| -> Vec<u8> {
            match self.manifest.dtype {
                StoreDtype::F32 => bytemuck::cast_slice(values).to_vec(),
                StoreDtype::Bf16 => {
                    let v: Vec<half::bf16> =
                        values.iter().map(|&x| half::bf16::from_f32(x)).collect();
                    bytemuck::cast_slice(&v).to_vec()
                }
            }
        };
        let act_bytes = stored(&self.acts);
        let grad_bytes = stored(&self.grads);
        let dtype = match self.manifest.dtype {
            StoreDtype::F32 => Dtype::F32,
            StoreDtype::Bf16 => Dtype::BF16,
        };
        let mut views = vec![(
            "activations",
            TensorView::new(dtype, vec![n, d], &act_bytes)?,
        )];
        if self.manifest.grads.is_some() {
            views.push(("grads", TensorView::new(dtype, vec![n, d], &grad_bytes)?));
        }
        if self.manifest.has_tokens {
            views.push((
                "tokens",
                TensorView::new(Dtype::U32, vec![n], bytemuck::cast_slice(&self.tokens))?,
            ));
            views.push((
                "positions",
                TensorView::new(
                    Dtype::U32,
                    vec![n, 2],
                    bytemuck::cast_slice(&self.positions),
                )?,
            ));
        }
        let bytes = safetensors::serialize(views, None)?;
        write_atomic(&self.dir.join(&file), &bytes)?;
        self.manifest.shards.push(ShardEntry { file, n_rows: n });
        self.manifest.n_tokens += n;
        self.write_manifest()?;
        self.acts.clear();
        self.grads.clear();
        self.tokens.clear();
        self.positions.clear();
        Ok(())
    }

    fn write_manifest(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.manifest)?;
        write_atomic(&self.dir.join(MANIFEST), text.as_bytes())
    }

    /// Writes the last partial shard and marks the store complete.
    pub fn finish(mut self) -> Result<Manifest> {
        self.flush()?;
        self.manifest.complete = true;
        self.write_manifest()?;
        Ok(self.manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unaligned<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
        bytes
            .chunks_exact(std::mem::size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
            .collect()
    }

    fn template(dtype: StoreDtype) -> Manifest {
        Manifest {
            model: "m".into(),
            hook: "blocks.0.hook_resid_post".into(),
            d_in: 3,
            context_size: 4,
            n_tokens: 0,
            corpus: "c".into(),
            dtype,
            shards: vec![],
            complete: false,
            target_tokens: 10,
            bos_excluded: true,
            has_tokens: true,
            compute: Some("f32".into()),
            grads: None,
        }
    }

    fn rows(n: usize, start: usize) -> (Vec<f32>, Vec<u32>, Vec<(u32, u32)>) {
        let acts = (start * 3..(start + n) * 3)
            .map(|v| v as f32 * 0.5)
            .collect();
        let toks = (start..start + n).map(|v| v as u32).collect();
        let pos = (start..start + n)
            .map(|v| ((v / 3) as u32, (v % 3 + 1) as u32))
            .collect();
        (acts, toks, pos)
    }

    #[test]
    fn shards_resume_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("acts");
        let mut w = ShardWriter::open(&out, template(StoreDtype::F32), 4).unwrap();
        let (a, t, p) = rows(6, 0);
        w.push(&a, &t, &p).unwrap();
        assert_eq!(w.rows_done(), 4); // one shard of 4 flushed; 2 rows lost on "kill"
        drop(w);
        let mut w = ShardWriter::open(&out, template(StoreDtype::F32), 4).unwrap();
        assert_eq!(w.rows_done(), 4);
        let (a, t, p) = rows(6, 4);
        w.push(&a, &t, &p).unwrap();
        let m = w.finish().unwrap();
        assert!(m.complete);
        assert_eq!(m.n_tokens, 10);
        assert_eq!(
            m.shards.iter().map(|s| s.n_rows).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        let bytes = std::fs::read(out.join("shard_00001.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let acts = st.tensor("activations").unwrap();
        assert_eq!(acts.shape(), &[4, 3]);
        let vals: Vec<f32> = unaligned(acts.data());
        assert_eq!(vals[0], 12.0 * 0.5);
        let toks: Vec<u32> = unaligned(st.tensor("tokens").unwrap().data());
        assert_eq!(toks, vec![4, 5, 6, 7]);
        assert_eq!(st.tensor("positions").unwrap().shape(), &[4, 2]);
        assert_eq!(Manifest::read(&out).unwrap(), m);
    }

    #[test]
    fn refuses_other_run_and_foreign_dir() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("acts");
        ShardWriter::open(&out, template(StoreDtype::F32), 4)
            .unwrap()
            .finish()
            .unwrap();
        let err = ShardWriter::open(&out, template(StoreDtype::Bf16), 4)
            .err()
            .unwrap();
        assert!(err.to_string().contains("another run"), "{err}");
        // Activations from bf16 products are not continued with f32 ones, nor the reverse;
        // a store that did not record its precision may be continued.
        let bf16_products = Manifest {
            compute: Some("bf16".into()),
            ..template(StoreDtype::F32)
        };
        let err = ShardWriter::open(&out, bf16_products, 4).err().unwrap();
        assert!(err.to_string().contains("compute f32"), "{err}");
        let unrecorded = Manifest {
            compute: None,
            ..template(StoreDtype::F32)
        };
        assert!(ShardWriter::open(&out, unrecorded, 4).is_ok());
        std::fs::write(dir.path().join("x.txt"), "hi").unwrap();
        let err = ShardWriter::open(dir.path(), template(StoreDtype::F32), 4)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not an activation store"), "{err}");
    }

    #[test]
    fn refuses_shards_that_cannot_be_buffered_before_creating_anything() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("acts");
        let huge = Manifest {
            d_in: 1 << 20,
            target_tokens: 1 << 40,
            ..template(StoreDtype::F32)
        };
        let err = ShardWriter::open(&out, huge.clone(), 1 << 30)
            .err()
            .unwrap();
        let e = err.to_string();
        assert!(
            e.contains("of memory but only") && e.contains("--shard-rows"),
            "{e}"
        );
        assert!(!out.exists());
        // Rows per shard beyond the rows asked for are never buffered.
        let few = Manifest {
            target_tokens: 10,
            ..huge
        };
        assert!(ShardWriter::open(&out, few, 1 << 30).is_ok());
        let err = ShardWriter::open(
            &dir.path().join("zero"),
            Manifest {
                d_in: 0,
                ..template(StoreDtype::F32)
            },
            4,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("width 0"), "{err}");
        assert!(!dir.path().join("zero").exists());
    }

    #[test]
    fn gradients_beside_activations() {
        let dir = tempfile::tempdir().unwrap();
        let with = Manifest {
            grads: Some("d loss / d x".into()),
            ..template(StoreDtype::F32)
        };
        let mut w = ShardWriter::open(dir.path(), with.clone(), 4).unwrap();
        let (a, t, p) = rows(6, 0);
        let e = w.push(&a, &t, &p).unwrap_err();
        assert!(e.to_string().contains("gradients"), "{e}");
        let g: Vec<f32> = a.iter().map(|v| -2.0 * v).collect();
        w.push_with_grads(&a, &g, &t, &p).unwrap();
        w.finish().unwrap();
        let acts = crate::ActivationStore::open(dir.path()).unwrap();
        let grads = crate::ActivationStore::open_grads(dir.path()).unwrap();
        let (mut x, mut y) = (vec![0f32; 3], vec![0f32; 3]);
        for r in 0..6 {
            acts.read_row(r, &mut x).unwrap();
            grads.read_row(r, &mut y).unwrap();
            assert_eq!(y, x.iter().map(|v| -2.0 * v).collect::<Vec<_>>());
        }
        // A run without gradients does not continue this one.
        let e = ShardWriter::open(dir.path(), template(StoreDtype::F32), 4)
            .err()
            .unwrap();
        assert!(e.to_string().contains("another run"), "{e}");
    }

    #[test]
    fn bf16_shard() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::open(dir.path(), template(StoreDtype::Bf16), 8).unwrap();
        let (a, t, p) = rows(2, 0);
        w.push(&a, &t, &p).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(dir.path().join("shard_00000.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let acts = st.tensor("activations").unwrap();
        assert_eq!(acts.dtype(), Dtype::BF16);
        let vals: Vec<half::bf16> = unaligned(acts.data());
        assert_eq!(vals[5].to_f32(), 2.5);
    }
}
