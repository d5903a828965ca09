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

/// Large buffers on 2 MiB pages: the sparse passes gather rows at random from them.
#[global_allocator]
static ALLOC: sae_core::hugepage::HugePageAlloc = sae_core::hugepage::HugePageAlloc;

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

const STOPPED: &str = "stopped from Python";

/// Counters shared between a job on its own thread and the Python thread watching it.
#[derive(Default)]
struct Watch {
    /// Units of work done (training rows, harvested rows, forward passes).
    done: AtomicU64,
    /// The units the job expects to do, once it knows (0 before).
    total: AtomicU64,
    /// Set by the watcher: the job should stop at its next check, with an error.
    stop: AtomicBool,
    finished: AtomicBool,
}

impl Watch {
    /// An error when the watcher asked the job to stop.
    fn check(&self) -> anyhow::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            anyhow::bail!(STOPPED);
        }
        Ok(())
    }
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs `job` on its own thread (in a rayon pool of `threads` workers when given) while
/// this thread waits without the GIL; about every 0.2 s it checks for Ctrl-C and calls
/// `report`. A KeyboardInterrupt or an exception from `report` sets `watch.stop` (the job
/// ends at its next check) and is returned instead of the job's result; `report` is called
/// once more after a job that was not stopped.
fn run_watched<T: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    mut report: impl FnMut(Python<'_>, &Watch) -> PyResult<()>,
    job: impl FnOnce(&Watch) -> T + Send,
) -> PyResult<T> {
    let pool = match threads {
        None => None,
        Some(0) => return Err(PyValueError::new_err("threads must be at least 1")),
        Some(n) => Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| PyRuntimeError::new_err(format!("starting {n} threads: {e}")))?,
        ),
    };
    let watch = Watch::default();
    let mut pending: Option<PyErr> = None;
    let result = std::thread::scope(|s| {
        let job = s.spawn(|| {
            // Set on return and on panic alike, so the wait below always ends.
            let _done = SetOnDrop(&watch.finished);
            match &pool {
                Some(pool) => pool.install(|| job(&watch)),
                None => job(&watch),
            }
        });
        loop {
            py.detach(|| {
                for _ in 0..20 {
                    if watch.finished.load(Ordering::Acquire) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            if watch.finished.load(Ordering::Acquire) {
                break;
            }
            if pending.is_some() {
                continue;
            }
            if let Err(e) = py.check_signals().and_then(|_| report(py, &watch)) {
                watch.stop.store(true, Ordering::Relaxed);
                pending = Some(e);
            }
        }
        // The job may still be dropping values that take the GIL.
        py.detach(|| job.join())
    });
    let value = result.map_err(panic_message)?;
    if let Some(e) = pending {
        return Err(e);
    }
    report(py, &watch)?;
    Ok(value)
}

/// A source that counts the training rows it hands out and refuses the next batch once
/// the watcher asks to stop: the training loop then ends with an error before its next
/// step, leaving the last checkpoint in `<out>.partial` for `resume`.
struct Watched<'a> {
    inner: &'a mut dyn BatchSource,
    watch: &'a Watch,
}

impl BatchSource for Watched<'_> {
    fn d_in(&self) -> usize {
        self.inner.d_in()
    }
    fn next_batch(&mut self, out: &mut [f32], n: usize) -> anyhow::Result<()> {
        self.watch.check()?;
        self.inner.next_batch(out, n)?;
        self.watch.done.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }
    fn has_grads(&self) -> bool {
        self.inner.has_grads()
    }
    fn next_batch_with_grads(
        &mut self,
        out: &mut [f32],
        grads: &mut [f32],
        n: usize,
    ) -> anyhow::Result<()> {
        self.watch.check()?;
        self.inner.next_batch_with_grads(out, grads, n)?;
        self.watch.done.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }
    fn sample(&mut self, out: &mut [f32], n: usize) -> anyhow::Result<()> {
        self.watch.check()?;
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

/// Why an [`IterSource`] could not give a batch.
enum IterFailure {
    /// The iterator ended after this many rows.
    Ended(u64),
    /// The iterator (or its batch) raised, or gave something that is not a batch.
    Raised(PyErr),
}

/// Batches pulled from a Python iterator as training asks for rows: the GIL is taken only
/// to call `next` and copy the batch. Rows are handed out in order. `sample` peeks at the
/// rows ahead without consuming them (as the training loop expects), and once the iterator
/// has ended it gives the rows it still holds and the last sample again.
struct IterSource {
    iter: Py<PyAny>,
    d_in: usize,
    /// Rows pulled and not yet trained on start at row `head`.
    pending: Vec<f32>,
    head: usize,
    last_sample: Vec<f32>,
    pulled: u64,
    ended: bool,
    failure: Option<IterFailure>,
}

const ITER_FAILED: &str = "the acts iterator gave no more batches";

impl IterSource {
    /// Pulls the first batch, which sets `d_in`.
    fn new(py: Python<'_>, iter: Py<PyAny>) -> PyResult<Self> {
        let mut source = IterSource {
            iter,
            d_in: 0,
            pending: Vec::new(),
            head: 0,
            last_sample: Vec::new(),
            pulled: 0,
            ended: false,
            failure: None,
        };
        if !source.pull_with(py).map_err(|f| match f {
            IterFailure::Raised(e) => e,
            IterFailure::Ended(_) => PyValueError::new_err("acts is an empty iterator"),
        })? {
            return Err(PyValueError::new_err("acts is an empty iterator"));
        }
        Ok(source)
    }

    fn pending_rows(&self) -> usize {
        self.pending.len() / self.d_in.max(1) - self.head
    }

    /// Appends the iterator's next batch; `Ok(false)` when it has ended.
    fn pull_with(&mut self, py: Python<'_>) -> Result<bool, IterFailure> {
        if self.ended {
            return Ok(false);
        }
        let item = match self.iter.bind(py).call_method0("__next__") {
            Ok(item) => item,
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) => {
                self.ended = true;
                return Ok(false);
            }
            Err(e) => return Err(IterFailure::Raised(e)),
        };
        let batch: PyReadonlyArray2<'_, f32> = item.extract().map_err(|_| {
            IterFailure::Raised(PyValueError::new_err(format!(
                "acts batch {} is not a float32 [n, d_in] array",
                self.pulled
            )))
        })?;
        let width = batch.shape()[1];
        if self.d_in == 0 {
            if width == 0 {
                return Err(IterFailure::Raised(PyValueError::new_err(
                    "acts batches must have d_in >= 1 columns",
                )));
            }
            self.d_in = width;
        }
        let (data, n) =
            rows(&batch, self.d_in, "acts batch", "d_in").map_err(IterFailure::Raised)?;
        // Rows already trained on are dropped before the buffer grows.
        if self.head > 0 {
            self.pending.drain(..self.head * self.d_in);
            self.head = 0;
        }
        self.pending.extend_from_slice(data);
        self.pulled += n as u64;
        Ok(true)
    }

    /// One more batch, taking the GIL; a failure is kept for the caller of `train`.
    fn pull(&mut self) -> anyhow::Result<bool> {
        match Python::attach(|py| self.pull_with(py)) {
            Ok(more) => Ok(more),
            Err(f) => {
                self.failure = Some(f);
                anyhow::bail!(ITER_FAILED)
            }
        }
    }
}

impl BatchSource for IterSource {
    fn d_in(&self) -> usize {
        self.d_in
    }

    fn next_batch(&mut self, out: &mut [f32], n: usize) -> anyhow::Result<()> {
        while self.pending_rows() < n {
            if !self.pull()? {
                self.failure = Some(IterFailure::Ended(self.pulled));
                anyhow::bail!(ITER_FAILED);
            }
        }
        let d = self.d_in;
        out[..n * d].copy_from_slice(&self.pending[self.head * d..(self.head + n) * d]);
        self.head += n;
        Ok(())
    }

    fn sample(&mut self, out: &mut [f32], n: usize) -> anyhow::Result<()> {
        while self.pending_rows() < n && self.pull()? {}
        let d = self.d_in;
        let ahead = &self.pending[self.head * d..];
        if ahead.len() >= n * d {
            out[..n * d].copy_from_slice(&ahead[..n * d]);
        } else {
            let rows: Vec<&[f32]> = ahead.chunks(d).chain(self.last_sample.chunks(d)).collect();
            if rows.is_empty() {
                anyhow::bail!("the acts iterator has no rows left to sample");
            }
            for (i, o) in out[..n * d].chunks_mut(d).enumerate() {
                o.copy_from_slice(rows[i % rows.len()]);
            }
        }
        self.last_sample = out[..n * d].to_vec();
        Ok(())
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

/// Trains an SAE as `sae train` does, on `acts` (a `[n, d_in]` array, read in place), on
/// `batches` (an iterator of `[n, d_in]` float32 arrays, pulled as training needs rows), or
/// on the config's `acts` path or `synth` preset. Returns the run summary as JSON text.
///
/// Training runs on its own thread; this thread waits without the GIL, checks for Ctrl-C
/// and calls `progress(rows_so_far)` about every 0.2 s. A KeyboardInterrupt (or an exception
/// from `progress`) stops training before its next step and is raised here. An iterator
/// that ends before training does raises ValueError; one that raises has its exception
/// raised here.
#[pyfunction]
#[pyo3(signature = (config_json, acts = None, progress = None, batches = None))]
fn train(
    py: Python<'_>,
    config_json: &str,
    acts: Option<PyReadonlyArray2<'_, f32>>,
    progress: Option<Py<PyAny>>,
    batches: Option<Py<PyAny>>,
) -> PyResult<String> {
    let cfg = parse_config(config_json)?;
    let mut slice_source;
    let mut opened;
    let mut iter_source = None;
    let inner: &mut dyn BatchSource = match (&acts, batches) {
        (Some(_), Some(_)) => {
            return Err(PyValueError::new_err(
                "give acts (an array) or batches (an iterator), not both",
            ))
        }
        (None, Some(iter)) => {
            if cfg.acts.is_some() || cfg.synth.is_some() || cfg.model.is_some() {
                return Err(PyValueError::new_err(
                    "acts is an iterator: leave out the config's acts, synth and model",
                ));
            }
            if cfg.steps.is_none() && cfg.tokens.is_none() {
                return Err(PyValueError::new_err(
                    "training on an iterator of batches needs steps or tokens (its length is \
                     not known in advance)",
                ));
            }
            iter_source.insert(IterSource::new(py, iter)?)
        }
        (Some(array), None) => {
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
        (None, None) => {
            if cfg.acts.is_none() && cfg.synth.is_none() && cfg.model.is_none() {
                return Err(PyValueError::new_err(
                    "no activations: pass acts (an array or a store directory), synth, or \
                     model with hook and corpus",
                ));
            }
            if let Some(model) = &cfg.model {
                if cfg.hook.is_none() && cfg.acts.is_none() {
                    return Err(PyValueError::new_err(
                        "training from a model needs hook=, e.g. 'blocks.15.hook_resid_post' \
                         (sae_rs.hooks(model) lists them)",
                    ));
                }
                let hooks = sae_train::hook_list(&cfg).map_err(input_error)?;
                if hooks.len() > 1 {
                    return Err(PyValueError::new_err(format!(
                        "hook='{}': training from a model here takes one hook; train the \
                         hooks one call at a time, or all at once (one forward pass per \
                         batch) with the CLI: sae train --model M --hook a,b",
                        cfg.hook.as_deref().unwrap_or_default()
                    )));
                }
                if cfg.acts.is_none() {
                    check_model_spec(model)?;
                    check_corpus_spec(&cfg.corpus)?;
                }
            }
            // The model source loads the model and starts its producer thread here.
            opened = without_gil(py, || sae_train::open_source(&cfg))?.map_err(open_error)?;
            opened.as_mut()
        }
    };

    let report = |py: Python<'_>, w: &Watch| -> PyResult<()> {
        if let Some(cb) = &progress {
            cb.call1(py, (w.done.load(Ordering::Relaxed),))?;
        }
        Ok(())
    };
    let summary = run_watched(py, None, report, |watch| {
        let mut source = Watched { inner, watch };
        sae_train::run_with_source(&cfg, &mut source)
    });
    let failure = iter_source.as_mut().and_then(|s| s.failure.take());
    let summary = summary?.map_err(|e| {
        let msg = format!("{e:#}");
        match failure {
            Some(IterFailure::Raised(err)) => err,
            Some(IterFailure::Ended(rows)) => PyValueError::new_err(format!(
                "the acts iterator ended after {rows} rows, before training had the rows it \
                 needs ({}); nothing was saved to {}; give a longer iterator or fewer \
                 tokens/steps (the last checkpoint, if any, is in {}.partial: resume=True \
                 continues it on a new iterator)",
                match (cfg.tokens, cfg.steps) {
                    (Some(t), _) => format!("tokens={t}"),
                    (None, Some(s)) => format!("steps={s} x batch_size={}", cfg.batch_size),
                    (None, None) => "tokens".into(),
                },
                cfg.out.display(),
                cfg.out.display()
            )),
            None if e.chain().any(|c| c.is::<sae_train::config::BadSetting>()) => {
                PyValueError::new_err(msg)
            }
            None => PyRuntimeError::new_err(msg),
        }
    })?;
    serde_json::to_string(&summary).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// An error opening a training source: an `--out` that may not be written is refused as
/// training refuses it on an array (`RuntimeError`); anything else is [`input_error`].
fn open_error(e: anyhow::Error) -> PyErr {
    if e.chain()
        .any(|c| c.is::<sae_output::outdir::OutputError>())
    {
        PyRuntimeError::new_err(format!("{e:#}"))
    } else {
        input_error(e)
    }
}

/// `FileNotFoundError` for a model path that does not exist (the default model's name and
/// Hugging Face repo ids are resolved by the loader).
fn check_model_spec(spec: &str) -> PyResult<()> {
    let path = std::path::Path::new(spec);
    if spec != sae_lm::fetch::DEFAULT_MODEL
        && !path.exists()
        && !sae_lm::hub::looks_like_repo_id(spec)
    {
        return Err(PyFileNotFoundError::new_err(format!(
            "model '{spec}' not found: use '{}', a path to a .gguf file or a Hugging Face model \
             directory, or a Hugging Face repo id (org/name) in the local hub cache",
            sae_lm::fetch::DEFAULT_MODEL
        )));
    }
    Ok(())
}

/// `FileNotFoundError` for a corpus path that does not exist (`PATH#FIELD` names a field of
/// PATH).
fn check_corpus_spec(spec: &str) -> PyResult<()> {
    let base = spec.rsplit_once('#').map_or(spec, |(base, _)| base);
    let known = |s: &str| s == sae_lm::corpus::PYTHON_DOCS || std::path::Path::new(s).exists();
    if !known(spec) && !known(base) {
        return Err(PyFileNotFoundError::new_err(format!(
            "corpus '{spec}' not found: give '{}', a directory of .txt/.jsonl/.parquet files, \
             or one such file",
            sae_lm::corpus::PYTHON_DOCS
        )));
    }
    Ok(())
}

/// The progress report of harvest and evaluate: `progress(done, total)`.
fn report_done_total(
    progress: &Option<Py<PyAny>>,
) -> impl FnMut(Python<'_>, &Watch) -> PyResult<()> + '_ {
    move |py, w| {
        if let Some(cb) = progress {
            cb.call1(
                py,
                (
                    w.done.load(Ordering::Relaxed),
                    w.total.load(Ordering::Relaxed),
                ),
            )?;
        }
        Ok(())
    }
}

/// `sae harvest` from Python. Without `out`, the rows `[tokens, width]` as float32 (what the
/// store would hold with dtype f32); with `out`, the store is written (or resumed) as the
/// CLI does and a JSON summary is returned; `with_grad` also stores each row's loss gradient
/// there. `progress(rows, tokens)` about every 0.2 s.
#[pyfunction]
#[pyo3(signature = (model, hook, corpus, tokens, out = None, ctx = 128, batch = 16,
    compute = "f32", dtype = "f32", store_tokens = false, include_bos = false,
    shard_rows = 32768, threads = None, progress = None, with_grad = false))]
#[allow(clippy::too_many_arguments)]
fn harvest<'py>(
    py: Python<'py>,
    model: String,
    hook: String,
    corpus: String,
    tokens: usize,
    out: Option<PathBuf>,
    ctx: usize,
    batch: usize,
    compute: &str,
    dtype: &str,
    store_tokens: bool,
    include_bos: bool,
    shard_rows: usize,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
    with_grad: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if tokens == 0 {
        return Err(PyValueError::new_err("tokens must be at least 1"));
    }
    if ctx < 2 {
        return Err(PyValueError::new_err(format!(
            "ctx must be at least 2 (BOS and one token); got {ctx}"
        )));
    }
    if batch == 0 || shard_rows == 0 {
        return Err(PyValueError::new_err(
            "batch and shard_rows must be at least 1",
        ));
    }
    let products = parse_compute(compute)?;
    let dtype: sae_store::writer::StoreDtype = dtype
        .parse()
        .map_err(|e| PyValueError::new_err(format!("dtype: {e:#}")))?;
    if with_grad && out.is_none() {
        return Err(PyValueError::new_err(
            "with_grad=True stores the loss gradients beside the activations in a store: \
             pass out=DIR as well",
        ));
    }
    check_model_spec(&model)?;
    check_corpus_spec(&corpus)?;
    match out {
        None => {
            let settings = sae_lm::harvest_store::MemoryHarvest {
                model,
                hook,
                corpus,
                tokens,
                ctx,
                batch,
                products,
                include_bos,
                progress: false,
            };
            let result = run_watched(py, threads, report_done_total(&progress), |w| {
                w.total.store(tokens as u64, Ordering::Relaxed);
                sae_lm::harvest_store::harvest_to_memory(&settings, &mut |rows| {
                    w.done.store(rows as u64, Ordering::Relaxed);
                    w.check()
                })
            })?;
            let (acts, width, _) = result.map_err(input_error)?;
            let n = acts.len() / width;
            Ok(to_matrix(py, acts, n, width).into_any())
        }
        Some(out) => {
            let settings = sae_lm::harvest_store::StoreHarvest {
                model,
                hooks: vec![hook],
                corpus,
                tokens,
                out,
                ctx,
                dtype,
                batch,
                products,
                store_tokens,
                include_bos,
                shard_rows,
                with_grad,
                progress: false,
            };
            let result = run_watched(py, threads, report_done_total(&progress), |w| {
                w.total.store(tokens as u64, Ordering::Relaxed);
                sae_lm::harvest_store::harvest_to_store(&settings, &mut |rows| {
                    w.done.store(rows as u64, Ordering::Relaxed);
                    w.check()
                })
            })?;
            let r = result.map_err(input_error)?;
            let m = &r.stores[0].manifest;
            let summary = serde_json::json!({
                "out": settings.out,
                "tokens": m.n_tokens,
                "harvested": r.stats.as_ref().map_or(0, |s| s.rows),
                "seconds": r.stats.as_ref().map_or(0.0, |s| s.seconds),
                "tokens_per_second": r.stats.as_ref().map_or(0.0, |s| s.tokens_per_second()),
                "shards": m.shards.len(),
                "dtype": m.dtype,
                "d_in": m.d_in,
                "model": m.model,
                "hook": m.hook,
                "corpus": m.corpus,
                "context_size": m.context_size,
                "complete": m.complete,
                "grads": m.grads,
            });
            Ok(pyo3::types::PyString::new(py, &summary.to_string()).into_any())
        }
    }
}

/// `compute=` (f32, bf16 or bf16x3), or a ValueError naming the keyword.
fn parse_compute(compute: &str) -> PyResult<sae_lm::ProductPrecision> {
    compute
        .parse()
        .map_err(|e| PyValueError::new_err(format!("compute: {e}")))
}

/// `sae eval` from Python on a loaded SAE: the report `sae eval` writes to eval.json, as
/// JSON text. `sae_dir` (where the SAE was loaded from, if anywhere) gives the norm limit
/// it was trained with and keeps `out` from being inside it except as its `eval` folder.
/// With `out`, eval.json, the firing histogram and report.md are written there as the CLI
/// does. `progress(passes, total)` about every 0.2 s.
#[pyfunction]
#[pyo3(signature = (sae, sae_name, sae_dir, model, corpus, tokens, ctx = 128, batch = 8,
    hook = None, skip_tokens = None, out = None, threads = None, progress = None,
    compute = "f32"))]
#[allow(clippy::too_many_arguments)]
fn evaluate(
    py: Python<'_>,
    sae: &NativeSae,
    sae_name: String,
    sae_dir: Option<PathBuf>,
    model: String,
    corpus: String,
    tokens: usize,
    ctx: usize,
    batch: usize,
    hook: Option<String>,
    skip_tokens: Option<usize>,
    out: Option<PathBuf>,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
    compute: &str,
) -> PyResult<String> {
    if tokens == 0 {
        return Err(PyValueError::new_err("tokens must be at least 1"));
    }
    let products = parse_compute(compute)?;
    if ctx < 2 {
        return Err(PyValueError::new_err(format!(
            "ctx must be at least 2 (BOS and one token); got {ctx}"
        )));
    }
    if batch == 0 {
        return Err(PyValueError::new_err("batch must be at least 1"));
    }
    let sae = &sae.sae;
    let hook = match (hook, sae.meta.hook_name.as_str()) {
        (Some(h), _) => h,
        (None, "") => {
            return Err(PyValueError::new_err(format!(
                "{sae_name}: its cfg.json names no hook; pass hook="
            )))
        }
        (None, h) => h.to_string(),
    };
    let skip = match skip_tokens {
        Some(s) => s,
        None => sae_eval::pipeline::training_tokens(sae, &corpus).ok_or_else(|| {
            PyValueError::new_err(format!(
                "cannot tell which text SAE {sae_name} was trained on (no activation store at \
                 '{}'); pass skip_tokens=N to skip the first N corpus tokens (0 if it was \
                 trained on other text)",
                sae.meta.dataset_path
            ))
        })?,
    };
    check_model_spec(&model)?;
    check_corpus_spec(&corpus)?;
    let max_norm = sae_dir
        .as_deref()
        .and_then(sae_eval::eval::trained_max_norm);
    let inputs: Vec<sae_output::Input> = sae_dir
        .iter()
        .map(|d| sae_output::Input {
            flag: "sae",
            path: d,
            allowed_child: Some("eval"),
        })
        .collect();
    let check_out = |out: &std::path::Path| {
        sae_output::check_output(out, sae_output::OutputKind::Eval, &inputs, false)
    };
    let result = run_watched(py, threads, report_done_total(&progress), |w| {
        let _lock = match &out {
            Some(out) => {
                check_out(out)?;
                Some(sae_output::OutputLock::acquire(out)?)
            }
            None => None,
        };
        let model = sae_lm::LanguageModel::load_with_products(&model, products)?;
        sae_eval::eval::check_sae_fits(sae, &sae_name, &model, &hook)?;
        let data =
            sae_eval::eval::EvalData::load(&model, &corpus, &hook, tokens, ctx, batch, skip)?;
        let r = sae_eval::pipeline::evaluate_on(
            &model,
            sae,
            &sae_name,
            max_norm,
            &data,
            &mut |d, t| {
                w.done.store(d as u64, Ordering::Relaxed);
                w.total.store(t as u64, Ordering::Relaxed);
                w.check()
            },
        )?;
        if let Some(out) = &out {
            check_out(out)?;
            sae_eval::report::write_eval(out, &r)?;
        }
        anyhow::Ok(r)
    })?;
    let r = result.map_err(input_error)?;
    serde_json::to_string(&r).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// `(name, width)` of every hook point of `model` (what `sae hooks` prints).
#[pyfunction]
fn hooks(py: Python<'_>, model: String) -> PyResult<Vec<(String, usize)>> {
    check_model_spec(&model)?;
    let m = without_gil(py, || sae_lm::LanguageModel::load(&model))?.map_err(input_error)?;
    Ok(m.hook_points()
        .into_iter()
        .map(|h| (h.name, h.width))
        .collect())
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
    m.add_function(wrap_pyfunction!(harvest, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(hooks, m)?)?;
    Ok(())
}
