//! `sae_rs._native`: the Rust side of the `sae_rs` Python package.
//!
//! Arrays come in as C-contiguous float32 numpy arrays and are read in place (no copy);
//! results are Rust vectors handed to numpy without a copy. Every long computation runs with
//! the GIL released, and a Rust panic comes back as a `RuntimeError` instead of aborting.
//! Shape and dtype checks with friendlier messages live in the Python wrapper; the checks
//! here keep the Rust side safe when it is called directly.

use numpy::ndarray::{Array2, ArrayView1, ArrayView2};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use sae_core::{ArchKind, Sae, SparseCode};
use sae_train::{BatchSource, TrainConfig};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Rows encoded at a time: bounds the dense pre-activation buffer (`rows x d_sae` floats) of
/// a large batch.
const CHUNK_ROWS: usize = 4096;

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    PyRuntimeError::new_err(format!(
        "internal error in sae_rs (a bug; please report it with the call that caused it): {msg}"
    ))
}

/// Runs `f` without the GIL; a panic becomes a `RuntimeError`.
fn without_gil<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    py.detach(|| std::panic::catch_unwind(AssertUnwindSafe(f)))
        .map_err(panic_message)
}

/// A missing file is `FileNotFoundError`; anything else wrong with the input `ValueError`.
fn input_error(e: anyhow::Error) -> PyErr {
    let not_found = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    });
    let msg = format!("{e:#}");
    if not_found {
        PyFileNotFoundError::new_err(msg)
    } else {
        PyValueError::new_err(msg)
    }
}

/// The rows of a `[n, width]` float32 array, read in place.
fn rows<'a>(
    x: &'a PyReadonlyArray2<'_, f32>,
    width: usize,
    name: &str,
    what: &str,
) -> PyResult<(&'a [f32], usize)> {
    let shape = x.shape();
    if shape[1] != width {
        return Err(PyValueError::new_err(format!(
            "{name} must have shape [n, {width}] ({what}); got [{}, {}]",
            shape[0], shape[1]
        )));
    }
    let data = x.as_slice().map_err(|_| {
        PyValueError::new_err(format!(
            "{name} is not C-contiguous; pass np.ascontiguousarray({name}) (a copy)"
        ))
    })?;
    Ok((data, shape[0]))
}

fn slice1<'a, T: numpy::Element>(x: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    x.as_slice().map_err(|_| {
        PyValueError::new_err(format!(
            "{name} is not contiguous; pass np.ascontiguousarray({name}) (a copy)"
        ))
    })
}

/// Dense `[n, d_sae]` codes of `x`, encoded `CHUNK_ROWS` rows at a time.
fn encode_dense(sae: &Sae, x: &[f32], n: usize) -> Vec<f32> {
    let (d_in, d_sae) = (sae.d_in, sae.d_sae);
    let mut out = vec![0.0f32; n * d_sae];
    for (xs, block) in x
        .chunks(CHUNK_ROWS * d_in)
        .zip(out.chunks_mut(CHUNK_ROWS * d_sae))
    {
        let code = sae.encode(xs, xs.len() / d_in);
        for (r, row) in block.chunks_mut(d_sae).enumerate() {
            let (idx, val) = code.row(r);
            for (&j, &v) in idx.iter().zip(val) {
                row[j as usize] = v;
            }
        }
    }
    out
}

/// CSR codes of `x`: `(indptr [n + 1], indices [nnz], values [nnz])`, as scipy takes them.
fn encode_csr(sae: &Sae, x: &[f32], n: usize) -> (Vec<i64>, Vec<i32>, Vec<f32>) {
    let d_in = sae.d_in;
    let mut indptr = Vec::with_capacity(n + 1);
    indptr.push(0i64);
    let (mut indices, mut values) = (Vec::new(), Vec::new());
    for xs in x.chunks(CHUNK_ROWS * d_in) {
        let code = sae.encode(xs, xs.len() / d_in);
        let base = indices.len() as i64;
        indptr.extend(code.row_ptr[1..].iter().map(|&p| base + p as i64));
        // d_sae < 2^31 (checked at load), so every index fits an i32.
        indices.extend(code.idx.iter().map(|&j| j as i32));
        values.extend_from_slice(&code.val);
    }
    (indptr, indices, values)
}

/// The non-zeros of dense codes `[n, d_sae]`.
fn dense_to_code(f: &[f32], n: usize, d_sae: usize) -> SparseCode {
    let mut code = SparseCode {
        n_rows: n,
        d_sae,
        row_ptr: Vec::with_capacity(n + 1),
        idx: Vec::new(),
        val: Vec::new(),
    };
    code.row_ptr.push(0);
    for row in f.chunks(d_sae) {
        for (j, &v) in row.iter().enumerate() {
            if v != 0.0 {
                code.idx.push(j as u32);
                code.val.push(v);
            }
        }
        code.row_ptr.push(code.idx.len());
    }
    code
}

fn to_matrix(py: Python<'_>, data: Vec<f32>, n: usize, width: usize) -> Bound<'_, PyArray2<f32>> {
    Array2::from_shape_vec((n, width), data)
        .expect("a result has n * width values")
        .into_pyarray(py)
}

/// A loaded or trained SAE (immutable).
#[pyclass(frozen, module = "sae_rs._native")]
struct NativeSae {
    sae: Sae,
}

#[pymethods]
impl NativeSae {
    /// Reads `cfg.json` + `sae_weights.safetensors` from `path` (ours or SAELens').
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let sae = without_gil(py, || sae_core::saelens::load(&path))?.map_err(input_error)?;
        if sae.d_sae > i32::MAX as usize {
            return Err(PyValueError::new_err(format!(
                "{}: d_sae {} is over 2^31 - 1, more than the index arrays hold",
                path.display(),
                sae.d_sae
            )));
        }
        Ok(NativeSae { sae })
    }

    /// A freshly initialised SAE of family `arch` (its paper's initialisation).
    #[staticmethod]
    #[pyo3(signature = (arch, d_in, d_sae, k = 0, seed = 0))]
    fn init(arch: &str, d_in: usize, d_sae: usize, k: usize, seed: u64) -> PyResult<Self> {
        let kind: ArchKind = arch
            .parse()
            .map_err(|e| PyValueError::new_err(format!("arch: {e}")))?;
        if d_in == 0 || d_sae == 0 || d_sae > i32::MAX as usize {
            return Err(PyValueError::new_err(format!(
                "d_in and d_sae must be between 1 and 2^31 - 1; got d_in={d_in}, d_sae={d_sae}"
            )));
        }
        let sae = Sae::init(kind, d_in, d_sae, k, seed);
        sae.validate()
            .map_err(|e| PyValueError::new_err(format!("{arch} SAE: {e}")))?;
        Ok(NativeSae { sae })
    }

    /// A copy of this SAE with the named tensors (SAELens names) replaced.
    fn with_tensors(
        &self,
        py: Python<'_>,
        tensors: Vec<(String, PyReadonlyArray1<'_, f32>)>,
    ) -> PyResult<Self> {
        let mut sae = self.sae.clone();
        let names: Vec<&str> = sae
            .arch
            .family()
            .latent_params()
            .iter()
            .map(|p| p.name)
            .collect();
        for (name, values) in &tensors {
            let values = slice1(values, name)?;
            let slot = match name.as_str() {
                "W_enc" => &mut sae.w_enc,
                "W_dec" => &mut sae.w_dec,
                "b_dec" => &mut sae.b_dec,
                other => match names.iter().position(|p| *p == other) {
                    Some(i) => &mut sae.params[i],
                    None => {
                        return Err(PyValueError::new_err(format!(
                            "a {} SAE has no tensor '{other}'; it has W_enc, W_dec, b_dec, {}",
                            sae.arch,
                            names.join(", ")
                        )))
                    }
                },
            };
            if slot.len() != values.len() {
                return Err(PyValueError::new_err(format!(
                    "{name} must have {} values; got {}",
                    slot.len(),
                    values.len()
                )));
            }
            slot.copy_from_slice(values);
        }
        let sae = without_gil(py, move || sae.validate().map(|_| sae))?
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(NativeSae { sae })
    }

    /// Writes the SAE in SAELens layout (replacing `path` as a whole).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        without_gil(py, || sae_core::saelens::save(&self.sae, &path))?
            .map_err(|e| PyRuntimeError::new_err(format!("{e:#}")))
    }

    #[getter]
    fn arch(&self) -> &'static str {
        self.sae.arch.as_str()
    }

    #[getter]
    fn d_in(&self) -> usize {
        self.sae.d_in
    }

    #[getter]
    fn d_sae(&self) -> usize {
        self.sae.d_sae
    }

    /// The cfg.json this SAE saves as (JSON text).
    fn cfg_json(&self) -> String {
        sae_core::saelens::cfg_json(&self.sae).to_string()
    }

    /// `(SAELens name, array)` of every tensor, as numpy views of this object's memory.
    fn tensors<'py>(slf: &Bound<'py, Self>) -> PyResult<Vec<(&'static str, Bound<'py, PyAny>)>> {
        let sae = &slf.get().sae;
        let mut out = Vec::new();
        for (name, data, shape) in sae.tensors() {
            let owner = slf.clone().into_any();
            // SAFETY: the views borrow `sae`'s vectors, which live as long as `owner` (kept
            // alive by numpy as the arrays' base) and never change: the class is frozen.
            let array = match shape[..] {
                [rows, cols] => {
                    let view = ArrayView2::from_shape((rows, cols), data)
                        .map_err(|e| PyRuntimeError::new_err(format!("{name}: {e}")))?;
                    unsafe { PyArray2::borrow_from_array(&view, owner) }.into_any()
                }
                _ => {
                    let view = ArrayView1::from(data);
                    unsafe { PyArray1::borrow_from_array(&view, owner) }.into_any()
                }
            };
            out.push((name, array));
        }
        Ok(out)
    }

    /// Dense codes `[n, d_sae]` of `x` `[n, d_in]`.
    fn encode<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (data, n) = rows(&x, self.sae.d_in, "x", "d_in")?;
        let out = without_gil(py, || encode_dense(&self.sae, data, n))?;
        Ok(to_matrix(py, out, n, self.sae.d_sae))
    }

    /// CSR codes of `x`: `(indptr int64 [n + 1], indices int32 [nnz], values float32 [nnz])`.
    #[allow(clippy::type_complexity)]
    fn encode_sparse<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<(
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i32>>,
        Bound<'py, PyArray1<f32>>,
    )> {
        let (data, n) = rows(&x, self.sae.d_in, "x", "d_in")?;
        let (indptr, indices, values) = without_gil(py, || encode_csr(&self.sae, data, n))?;
        Ok((
            indptr.into_pyarray(py),
            indices.into_pyarray(py),
            values.into_pyarray(py),
        ))
    }

    /// Reconstruction metrics of `x` `[n, d_in]`: `(l0, mse, fvu, gamma, fire counts [d_sae])`
    /// as `sae eval` and the training summary compute them, `CHUNK_ROWS` rows at a time.
    #[allow(clippy::type_complexity)]
    fn metrics<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<(f64, f64, f64, f64, Bound<'py, PyArray1<u64>>)> {
        let (data, _) = rows(&x, self.sae.d_in, "x", "d_in")?;
        let sae = &self.sae;
        let m = without_gil(py, || {
            let mut m = sae_core::metrics::ReconMetrics::new(sae.d_in, sae.d_sae);
            for xs in data.chunks(CHUNK_ROWS * sae.d_in) {
                let code = sae.encode(xs, xs.len() / sae.d_in);
                m.add(xs, &sae.decode(&code), &code);
            }
            m
        })?;
        Ok((
            m.l0(),
            m.mse(),
            m.fvu(),
            m.gamma(),
            m.fire_counts().to_vec().into_pyarray(py),
        ))
    }

    /// Reconstructions `[n, d_in]` of dense codes `f` `[n, d_sae]`.
    fn decode<'py>(
        &self,
        py: Python<'py>,
        f: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (data, n) = rows(&f, self.sae.d_sae, "f", "d_sae")?;
        let out = without_gil(py, || {
            self.sae.decode(&dense_to_code(data, n, self.sae.d_sae))
        })?;
        Ok(to_matrix(py, out, n, self.sae.d_in))
    }

    /// Reconstructions `[n, d_in]` of CSR codes (as `encode_sparse` returns them).
    fn decode_sparse<'py>(
        &self,
        py: Python<'py>,
        indptr: PyReadonlyArray1<'py, i64>,
        indices: PyReadonlyArray1<'py, i32>,
        values: PyReadonlyArray1<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (indptr, indices, values) = (
            slice1(&indptr, "indptr")?,
            slice1(&indices, "indices")?,
            slice1(&values, "values")?,
        );
        let d_sae = self.sae.d_sae;
        let bad = |msg: String| Err(PyValueError::new_err(msg));
        if indices.len() != values.len() {
            return bad(format!(
                "indices and values must have the same length; got {} and {}",
                indices.len(),
                values.len()
            ));
        }
        if indptr.first() != Some(&0)
            || indptr.windows(2).any(|w| w[0] > w[1])
            || *indptr.last().unwrap_or(&0) != indices.len() as i64
        {
            return bad(format!(
                "indptr must start at 0, never decrease and end at len(indices) = {}",
                indices.len()
            ));
        }
        if let Some(j) = indices.iter().find(|&&j| j < 0 || j as usize >= d_sae) {
            return bad(format!("latent index {j} is outside 0..{d_sae} (d_sae)"));
        }
        let n = indptr.len() - 1;
        // The index arrays are converted to the Rust types (one pass over nnz); values too.
        let code = SparseCode {
            n_rows: n,
            d_sae,
            row_ptr: indptr.iter().map(|&p| p as usize).collect(),
            idx: indices.iter().map(|&j| j as u32).collect(),
            val: values.to_vec(),
        };
        let out = without_gil(py, || self.sae.decode(&code))?;
        Ok(to_matrix(py, out, n, self.sae.d_in))
    }
}

/// Rows of a borrowed `[n, d_in]` array, sequential and wrapping around, like
/// `sae_train::MemorySource` but without copying the array.
struct SliceSource<'a> {
    data: &'a [f32],
    d_in: usize,
    next: usize,
}

impl BatchSource for SliceSource<'_> {
    fn d_in(&self) -> usize {
        self.d_in
    }

    fn next_batch(&mut self, out: &mut [f32], n: usize) -> anyhow::Result<()> {
        let rows = self.data.len() / self.d_in;
        for o in out[..n * self.d_in].chunks_mut(self.d_in) {
            let r = self.next % rows;
            o.copy_from_slice(&self.data[r * self.d_in..(r + 1) * self.d_in]);
            self.next += 1;
        }
        Ok(())
    }

    fn sample(&mut self, out: &mut [f32], n: usize) -> anyhow::Result<()> {
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

    fn seek(&mut self, pos: &serde_json::Value) -> anyhow::Result<()> {
        self.next = pos
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("bad position {pos}"))? as usize;
        Ok(())
    }

    fn seek_rows(&mut self, rows: u64) -> anyhow::Result<()> {
        self.next = rows as usize;
        Ok(())
    }
}

const STOPPED: &str = "training stopped from Python";

/// A source that counts the training rows it hands out and refuses the next batch once
/// `stop` is set: the training loop then ends with an error before its next step, leaving
/// the last checkpoint in `<out>.partial` for `resume`.
struct Watched<'a> {
    inner: &'a mut dyn BatchSource,
    rows: &'a AtomicU64,
    stop: &'a AtomicBool,
}

impl BatchSource for Watched<'_> {
    fn d_in(&self) -> usize {
        self.inner.d_in()
    }
    fn next_batch(&mut self, out: &mut [f32], n: usize) -> anyhow::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            anyhow::bail!(STOPPED);
        }
        self.inner.next_batch(out, n)?;
        self.rows.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }
    fn sample(&mut self, out: &mut [f32], n: usize) -> anyhow::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            anyhow::bail!(STOPPED);
        }
        self.inner.sample(out, n)
    }
    fn n_rows(&self) -> Option<u64> {
        self.inner.n_rows()
    }
    fn meta(&self) -> sae_core::sae::SaeMeta {
        self.inner.meta()
    }
    fn position(&self) -> Option<serde_json::Value> {
        self.inner.position()
    }
    fn seek(&mut self, pos: &serde_json::Value) -> anyhow::Result<()> {
        self.inner.seek(pos)
    }
    fn seek_rows(&mut self, rows: u64) -> anyhow::Result<()> {
        self.inner.seek_rows(rows)
    }
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Parses a `TrainConfig` from JSON (unknown keys refused) and checks its ranges.
fn parse_config(config_json: &str) -> PyResult<TrainConfig> {
    let cfg: TrainConfig = serde_json::from_str(config_json)
        .map_err(|e| PyValueError::new_err(format!("train config: {e}")))?;
    cfg.validate()
        .map_err(|e| PyValueError::new_err(format!("train config: {e:#}")))?;
    Ok(cfg)
}

/// Checks a training config without training (the same errors `train` gives first).
#[pyfunction]
fn check_train_config(config_json: &str) -> PyResult<()> {
    parse_config(config_json).map(|_| ())
}

/// Trains an SAE as `sae train` does, on `acts` (a `[n, d_in]` array, read in place) or on
/// the config's `acts` path or `synth` preset. Returns the run summary as JSON text.
///
/// Training runs on its own thread; this thread waits without the GIL, checks for Ctrl-C
/// and calls `progress(rows_so_far)` about every 0.2 s. A KeyboardInterrupt (or an exception
/// from `progress`) stops training before its next step and is raised here.
#[pyfunction]
#[pyo3(signature = (config_json, acts = None, progress = None))]
fn train(
    py: Python<'_>,
    config_json: &str,
    acts: Option<PyReadonlyArray2<'_, f32>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let cfg = parse_config(config_json)?;
    let mut slice_source;
    let mut store_source;
    let mut synth_source;
    let inner: &mut dyn BatchSource = match &acts {
        Some(array) => {
            if cfg.acts.is_some() || cfg.synth.is_some() || cfg.model.is_some() {
                return Err(PyValueError::new_err(
                    "acts is an array: leave out the config's acts, synth and model",
                ));
            }
            let d_in = array.shape()[1];
            let (data, n) = rows(array, d_in, "acts", "d_in")?;
            if n == 0 || d_in == 0 {
                return Err(PyValueError::new_err(format!(
                    "acts must have shape [n, d_in] with n, d_in >= 1; got [{n}, {d_in}]"
                )));
            }
            slice_source = SliceSource {
                data,
                d_in,
                next: 0,
            };
            &mut slice_source
        }
        None => {
            if cfg.model.is_some() {
                return Err(PyValueError::new_err(
                    "training straight from a model is not offered here; run `sae train \
                     --model M --hook H`, or harvest with `sae harvest` and pass the directory \
                     as acts",
                ));
            }
            match (&cfg.acts, &cfg.synth) {
                (Some(path), None) => {
                    let (path, seed) = (path.clone(), cfg.seed);
                    store_source = without_gil(py, || sae_train::StoreSource::open(&path, seed))?
                        .map_err(input_error)?;
                    &mut store_source
                }
                (None, Some(preset)) => {
                    if cfg.steps.is_none() && cfg.tokens.is_none() {
                        return Err(PyValueError::new_err(
                            "training on synth needs steps or tokens (the stream is endless)",
                        ));
                    }
                    synth_source =
                        sae_train::source::SynthBenchSource::preset(preset).map_err(input_error)?;
                    &mut synth_source
                }
                (Some(_), Some(_)) => {
                    return Err(PyValueError::new_err(
                        "give acts or synth, not both (synth generates its own data)",
                    ))
                }
                (None, None) => {
                    return Err(PyValueError::new_err(
                        "no activations: pass acts (an array or a store directory) or synth",
                    ))
                }
            }
        }
    };

    let rows_done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let mut source = Watched {
        inner,
        rows: &rows_done,
        stop: &stop,
    };
    let mut pending: Option<PyErr> = None;
    let finished = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        let job = s.spawn(|| {
            // Set on return and on panic alike, so the wait below always ends.
            let _done = SetOnDrop(&finished);
            sae_train::run_with_source(&cfg, &mut source)
        });
        loop {
            py.detach(|| {
                for _ in 0..20 {
                    if finished.load(Ordering::Acquire) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            if finished.load(Ordering::Acquire) {
                break;
            }
            if pending.is_some() {
                continue;
            }
            if let Err(e) = py.check_signals() {
                stop.store(true, Ordering::Relaxed);
                pending = Some(e);
            } else if let Some(cb) = &progress {
                if let Err(e) = cb.call1(py, (rows_done.load(Ordering::Relaxed),)) {
                    stop.store(true, Ordering::Relaxed);
                    pending = Some(e);
                }
            }
        }
        job.join()
    });
    let summary = result.map_err(panic_message)?;
    if let Some(e) = pending {
        return Err(e);
    }
    let summary = summary.map_err(|e| {
        let msg = format!("{e:#}");
        let from_config = e.chain().any(|c| c.is::<sae_train::config::BadSetting>());
        if from_config {
            PyValueError::new_err(msg)
        } else {
            PyRuntimeError::new_err(msg)
        }
    })?;
    if let Some(cb) = &progress {
        cb.call1(py, (rows_done.load(Ordering::Relaxed),))?;
    }
    serde_json::to_string(&summary).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The registered SAE families (`arch` values).
#[pyfunction]
fn architectures() -> Vec<&'static str> {
    ArchKind::all().map(ArchKind::as_str).collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeSae>()?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(check_train_config, m)?)?;
    m.add_function(wrap_pyfunction!(architectures, m)?)?;
    Ok(())
}
