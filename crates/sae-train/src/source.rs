//! Where training batches come from: the activation store, or (added elsewhere) a model.

use anyhow::{bail, Result};
use sae_core::sae::SaeMeta;
use sae_store::{ActivationStore, BatchStream, Order, StreamPosition};
use std::path::Path;

/// A stream of activation rows (Send: training may run inside its own rayon pool).
pub trait BatchSource: Send {
    fn d_in(&self) -> usize;

    /// Fills `out` (`[n, d_in]`, row-major f32) with the next `n` rows.
    fn next_batch(&mut self, out: &mut [f32], n: usize) -> Result<()>;

    /// Whether `next_batch_with_grads` gives each row's loss gradient.
    fn has_grads(&self) -> bool {
        false
    }

    /// `next_batch`, and into `grads` (`[n, d_in]`) the gradient of the language model's loss
    /// with respect to each of those rows.
    fn next_batch_with_grads(
        &mut self,
        _out: &mut [f32],
        _grads: &mut [f32],
        _n: usize,
    ) -> Result<()> {
        bail!(
            "this activation source has no loss gradients; train from a store harvested with \
             sae harvest --with-grad"
        )
    }

    /// `n` rows for initialisation (b_dec, normalisation) and the final evaluation.
    /// Default: the next rows of the stream.
    fn sample(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.next_batch(out, n)
    }

    /// Rows in one pass, when the source has a fixed size.
    fn n_rows(&self) -> Option<u64> {
        None
    }

    /// Model, hook, context size... saved into the SAE's cfg.json.
    fn meta(&self) -> SaeMeta {
        SaeMeta::default()
    }

    /// Where the stream is, saved in checkpoints; `None` if it cannot be restored.
    fn position(&self) -> Option<serde_json::Value> {
        None
    }

    /// Restore a `position()`.
    fn seek(&mut self, _pos: &serde_json::Value) -> Result<()> {
        bail!("this activation source cannot seek")
    }

    /// Go to where the stream is after its first `rows` rows (`sample` reads none of them):
    /// how a run extended without its checkpoint finds its place.
    fn seek_rows(&mut self, _rows: u64) -> Result<()> {
        bail!("this activation source cannot seek")
    }
}

/// Shuffled batches from `.safetensors`/`.npy` activation files.
pub struct StoreSource {
    stream: BatchStream,
}

impl StoreSource {
    pub fn open(path: &Path, seed: u64) -> Result<Self> {
        let store = ActivationStore::open(path)?;
        Ok(StoreSource {
            stream: BatchStream::new(store, Order::Shuffled, seed),
        })
    }

    /// `open`, with each row's loss gradient (a store harvested with `--with-grad`); the
    /// gradients are checked for first, before the activation files are opened.
    pub fn open_with_grads(path: &Path, seed: u64) -> Result<Self> {
        let grads = ActivationStore::open_grads(path)?;
        let mut source = Self::open(path, seed)?;
        source.stream.attach_grads(grads)?;
        Ok(source)
    }

    pub fn store(&self) -> &ActivationStore {
        self.stream.store()
    }
}

impl BatchSource for StoreSource {
    fn d_in(&self) -> usize {
        self.stream.d_in()
    }

    fn next_batch(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.stream.next_batch(out, n)
    }

    fn has_grads(&self) -> bool {
        self.stream.has_grads()
    }

    fn next_batch_with_grads(
        &mut self,
        out: &mut [f32],
        grads: &mut [f32],
        n: usize,
    ) -> Result<()> {
        self.stream.next_batch_with_grads(out, grads, n)
    }

    fn sample(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.stream.sample(out, n)
    }

    fn n_rows(&self) -> Option<u64> {
        Some(self.stream.store().n_rows())
    }

    fn meta(&self) -> SaeMeta {
        let store = self.stream.store();
        let mut meta = SaeMeta {
            dataset_path: store.root.display().to_string(),
            prepend_bos: true,
            ..Default::default()
        };
        if let Some(m) = &store.manifest {
            meta.model_name = m.model.clone();
            meta.hook_name = m.hook.clone();
            meta.context_size = m.context_size;
        }
        meta
    }

    fn position(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.stream.position()).ok()
    }

    fn seek(&mut self, pos: &serde_json::Value) -> Result<()> {
        let p: StreamPosition = serde_json::from_value(pos.clone())?;
        self.stream.seek(p);
        Ok(())
    }

    fn seek_rows(&mut self, rows: u64) -> Result<()> {
        // The stream normalises an index past the end into (epoch, index).
        self.stream.seek(StreamPosition {
            epoch: 0,
            index: rows,
        });
        Ok(())
    }
}

/// Rows generated on the fly by a SynthSAEBench generator: nothing on disk, an endless
/// stream in which row r is a pure function of (generator, r), so any position can be
/// restored. `sample` draws from a separate range of rows, so the initialisation sample and
/// the final evaluation never repeat training rows.
pub struct SynthBenchSource {
    bench: std::sync::Arc<sae_store::synthbench::SynthBench>,
    preset: String,
    next_row: u64,
    next_sample_row: u64,
}

/// First row of the range `sample` draws from, far beyond any training run.
const SYNTH_SAMPLE_ROWS: u64 = 1 << 62;

impl SynthBenchSource {
    /// Builds the generator of a preset (`sae_store::synthbench::PRESETS`).
    pub fn preset(name: &str) -> Result<Self> {
        let cfg = sae_store::synthbench::SynthBenchConfig::preset(name)
            .map_err(|e| anyhow::anyhow!("--synth: {e}"))?;
        let bench = sae_store::synthbench::SynthBench::new(cfg)?;
        Ok(Self::new(std::sync::Arc::new(bench), name))
    }

    pub fn new(bench: std::sync::Arc<sae_store::synthbench::SynthBench>, preset: &str) -> Self {
        SynthBenchSource {
            bench,
            preset: preset.to_string(),
            next_row: 0,
            next_sample_row: SYNTH_SAMPLE_ROWS,
        }
    }

    pub fn bench(&self) -> &std::sync::Arc<sae_store::synthbench::SynthBench> {
        &self.bench
    }
}

impl BatchSource for SynthBenchSource {
    fn d_in(&self) -> usize {
        self.bench.d_in()
    }

    fn next_batch(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.bench
            .sample_batch(self.next_row, &mut out[..n * self.d_in()], None);
        self.next_row += n as u64;
        Ok(())
    }

    fn sample(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.bench
            .sample_batch(self.next_sample_row, &mut out[..n * self.d_in()], None);
        self.next_sample_row += n as u64;
        Ok(())
    }

    fn meta(&self) -> SaeMeta {
        SaeMeta {
            model_name: format!("synthetic:{}", self.preset),
            dataset_path: format!("synthetic:{} seed {}", self.preset, self.bench.cfg.seed),
            ..Default::default()
        }
    }

    fn position(&self) -> Option<serde_json::Value> {
        Some(generated_position(self.next_row, self.next_sample_row))
    }

    fn seek(&mut self, pos: &serde_json::Value) -> Result<()> {
        (self.next_row, self.next_sample_row) = parse_generated_position(pos)?;
        Ok(())
    }

    fn seek_rows(&mut self, rows: u64) -> Result<()> {
        self.next_row = rows;
        Ok(())
    }
}

/// Rows held in memory (tests, tools): sequential, wrapping around.
pub struct MemorySource {
    pub data: Vec<f32>,
    pub d_in: usize,
    pub next: usize,
}

impl BatchSource for MemorySource {
    fn d_in(&self) -> usize {
        self.d_in
    }

    fn next_batch(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        let rows = self.data.len() / self.d_in;
        for o in out[..n * self.d_in].chunks_mut(self.d_in) {
            let r = self.next % rows;
            o.copy_from_slice(&self.data[r * self.d_in..(r + 1) * self.d_in]);
            self.next += 1;
        }
        Ok(())
    }

    fn sample(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        let rows = self.data.len() / self.d_in;
        for (i, o) in out[..n * self.d_in].chunks_mut(self.d_in).enumerate() {
            let r = i % rows;
            o.copy_from_slice(&self.data[r * self.d_in..(r + 1) * self.d_in]);
        }
        Ok(())
    }

    fn n_rows(&self) -> Option<u64> {
        Some((self.data.len() / self.d_in) as u64)
    }

    fn position(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!(self.next))
    }

    fn seek(&mut self, pos: &serde_json::Value) -> Result<()> {
        self.next = pos
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("bad position {pos}"))? as usize;
        Ok(())
    }

    fn seek_rows(&mut self, rows: u64) -> Result<()> {
        self.next = rows as usize;
        Ok(())
    }
}

/// Leaves out rows whose squared norm exceeds `max_norm2`: the massive activations that
/// some language models put on the first tokens of some contexts (SmolLM2-135M at layer 15:
/// 0.04% of tokens, norms over 100x the median, half of all squared norm). Left in, they
/// dominate the squared error and the normalisation constant.
///
/// Each batch reads exactly as many rows from the inner source as it needs to refill, so no
/// rows are held back and `position()` stays exact for resuming.
pub struct NormFilter<'a> {
    inner: &'a mut dyn BatchSource,
    max_norm2: f32,
    pub rows_skipped: u64,
}

/// Squared norm of one row.
pub fn row_norm2(row: &[f32]) -> f32 {
    row.iter().map(|v| v * v).sum()
}

impl<'a> NormFilter<'a> {
    pub fn new(inner: &'a mut dyn BatchSource, max_norm: f32) -> Self {
        NormFilter {
            inner,
            max_norm2: max_norm * max_norm,
            rows_skipped: 0,
        }
    }

    /// Reads the missing rows straight into `out` behind the kept ones and compacts them in
    /// place (no staging buffer, no copy when nothing is over the limit).
    fn fill(
        &mut self,
        out: &mut [f32],
        mut grads: Option<&mut [f32]>,
        n: usize,
        from_sample: bool,
    ) -> Result<()> {
        let read = |inner: &mut dyn BatchSource,
                    out: &mut [f32],
                    grads: Option<&mut [f32]>,
                    want: usize| match (grads, from_sample) {
            (Some(g), _) => inner.next_batch_with_grads(out, g, want),
            (None, true) => inner.sample(out, want),
            (None, false) => inner.next_batch(out, want),
        };
        if self.max_norm2.is_infinite() {
            return read(&mut *self.inner, out, grads, n);
        }
        let d = self.inner.d_in();
        let mut have = 0;
        let mut tries = 0;
        while have < n {
            let want = n - have;
            let fresh = &mut out[have * d..n * d];
            let fresh_grads = grads.as_deref_mut().map(|g| &mut g[have * d..n * d]);
            read(&mut *self.inner, fresh, fresh_grads, want)?;
            let first_new = have;
            for r in first_new..n {
                // NaN rows are kept, so the trainer's non-finite check reports them.
                let norm2 = row_norm2(&out[r * d..(r + 1) * d]);
                if norm2.is_nan() || norm2 <= self.max_norm2 {
                    if r != have {
                        out.copy_within(r * d..(r + 1) * d, have * d);
                        if let Some(g) = grads.as_deref_mut() {
                            g.copy_within(r * d..(r + 1) * d, have * d);
                        }
                    }
                    have += 1;
                } else {
                    self.rows_skipped += 1;
                }
            }
            tries += 1;
            if tries > 64 && have == 0 {
                bail!(
                    "every row read is over the norm limit {}; raise --max-norm-ratio or set it to 0",
                    self.max_norm2.sqrt()
                );
            }
        }
        Ok(())
    }
}

impl BatchSource for NormFilter<'_> {
    fn d_in(&self) -> usize {
        self.inner.d_in()
    }
    fn next_batch(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.fill(out, None, n, false)
    }
    fn has_grads(&self) -> bool {
        self.inner.has_grads()
    }
    fn next_batch_with_grads(
        &mut self,
        out: &mut [f32],
        grads: &mut [f32],
        n: usize,
    ) -> Result<()> {
        self.fill(out, Some(grads), n, false)
    }
    fn sample(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.fill(out, None, n, true)
    }
    fn n_rows(&self) -> Option<u64> {
        self.inner.n_rows()
    }
    fn meta(&self) -> SaeMeta {
        self.inner.meta()
    }
    fn position(&self) -> Option<serde_json::Value> {
        self.inner.position()
    }
    fn seek(&mut self, pos: &serde_json::Value) -> Result<()> {
        self.inner.seek(pos)
    }
    fn seek_rows(&mut self, rows: u64) -> Result<()> {
        self.inner.seek_rows(rows)
    }
}

/// The norm limit: `ratio` times the median row norm of `sample` (`[n, d]`).
pub fn norm_limit(sample: &[f32], d: usize, ratio: f32) -> f32 {
    let mut norms: Vec<f32> = sample.chunks(d).map(|r| row_norm2(r).sqrt()).collect();
    if norms.is_empty() {
        return f32::INFINITY;
    }
    let mid = norms.len() / 2;
    let (_, median, _) = norms.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
    *median * ratio
}

/// The checkpoint position of a source of generated rows: the next training row and the next
/// row of the trainer's own sample range.
pub fn generated_position(row: u64, sample_row: u64) -> serde_json::Value {
    serde_json::json!({ "row": row, "sample_row": sample_row })
}

/// `(row, sample_row)` of a [`generated_position`].
pub fn parse_generated_position(pos: &serde_json::Value) -> Result<(u64, u64)> {
    match (
        pos.get("row").and_then(|v| v.as_u64()),
        pos.get("sample_row").and_then(|v| v.as_u64()),
    ) {
        (Some(row), Some(sample_row)) => Ok((row, sample_row)),
        _ => bail!("a generated-rows position needs \"row\" and \"sample_row\"; got {pos}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows `[i, 0]` for i in 0..n, with rows 3 and 7 made huge.
    fn rows(n: usize) -> MemorySource {
        let mut data = Vec::new();
        for i in 0..n {
            let v = if i == 3 || i == 7 {
                1e6
            } else {
                1.0 + i as f32 * 0.01
            };
            data.extend([v, 0.0]);
        }
        MemorySource {
            data,
            d_in: 2,
            next: 0,
        }
    }

    #[test]
    fn norm_limit_is_ratio_times_median() {
        let s = rows(11);
        // Norms 1.00..1.10 but rows 3 and 7 huge; sorted, the huge ones sit at the top and
        // the middle (6th of 11) is 1.06.
        let lim = norm_limit(&s.data, 2, 10.0);
        assert!((lim - 10.6).abs() < 1e-4, "{lim}");
    }

    #[test]
    fn filter_skips_rows_over_the_limit_and_keeps_order() {
        let mut s = rows(10);
        let mut f = NormFilter::new(&mut s, 5.0);
        let mut out = vec![0.0f32; 2 * 6];
        f.next_batch(&mut out, 6).unwrap();
        let firsts: Vec<f32> = out.chunks(2).map(|r| r[0]).collect();
        let want = [1.0, 1.01, 1.02, 1.04, 1.05, 1.06];
        assert!(
            firsts.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{firsts:?}"
        );
        assert_eq!(f.rows_skipped, 1);
        // The inner source advanced by exactly the rows read: 7 (6 kept + 1 skipped).
        f.next_batch(&mut out, 2).unwrap();
        assert!((out[0] - 1.08).abs() < 1e-6, "{}", out[0]);
        assert_eq!(f.rows_skipped, 2);
        // Rows 7 (skipped), 8 and 9 read: the inner source is at 10.
        assert_eq!(s.next, 10);
    }

    #[test]
    fn filter_errors_when_every_row_is_over_the_limit() {
        let mut s = rows(10);
        let mut f = NormFilter::new(&mut s, 1e-3);
        let mut out = vec![0.0f32; 4];
        let e = f.next_batch(&mut out, 2).unwrap_err().to_string();
        assert!(e.contains("--max-norm-ratio"), "{e}");
    }
}
