"""sae_rs: sparse autoencoders from the ``sae`` Rust crates, for numpy and torch.

Load an SAE (ours or any SAELens-layout directory) and run it::

    import numpy as np, sae_rs
    sae = sae_rs.SAE.load("runs/gated")
    f = sae.encode(x)              # x: float32 [n, d_in] -> [n, d_sae]
    x_hat = sae.decode(f)          # -> [n, d_in]
    code = sae.encode_sparse(x)    # CSR (indptr, indices, values) for large batches

Train one::

    sae = sae_rs.train(acts, arch="gated", d_sae=4096, l1=4.0, tokens=2_000_000,
                       out="runs/x")
    sae.train_log                  # list of dicts, one per logged step

Harvest activations from a language model and evaluate an SAE with the model's loss::

    x = sae_rs.harvest(model="smollm2-135m", hook="blocks.15.hook_resid_post",
                       corpus="python-docs", tokens=100_000)       # float32 [100000, 576]
    sae_rs.harvest(hook="blocks.15.hook_resid_post", tokens=2_000_000, out="acts")
    sae_rs.evaluate(sae, corpus="python-docs", tokens=50_000)      # the eval.json dict

Inputs are read in place when they are C-contiguous float32 (numpy, or a CPU torch tensor,
which gives back a torch tensor); results are handed over without a copy. Long work runs
with the GIL released.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from . import _native

__version__ = "0.1.0"
__all__ = ["SAE", "SparseCode", "train", "harvest", "evaluate", "hooks", "architectures",
           "__version__"]

_DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_CORPUS = "python-docs"

_TRAIN_BATCH_DEFAULT = 4096


def architectures() -> List[str]:
    """The SAE families this build knows (the values of ``arch``)."""
    return list(_native.architectures())


def _torch_module():
    # A torch tensor can only exist once torch is imported, so torch is never imported here.
    return sys.modules.get("torch")


def _as_rows(x: Any, width: int, name: str, width_name: str) -> Tuple[np.ndarray, bool, bool]:
    """``x`` as a C-contiguous float32 ``[n, width]`` numpy array without copying.

    Returns ``(array, came_from_torch, was_1d)``.
    """
    torch = _torch_module()
    from_torch = torch is not None and isinstance(x, torch.Tensor)
    if from_torch:
        if x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device}; pass {name}.cpu() (a copy)")
        if x.dtype != torch.float32:
            raise TypeError(
                f"{name} must be float32 with shape [n, {width}] ({width_name}); got {x.dtype}; "
                f"convert with {name}.float() (a copy)"
            )
        if not x.is_contiguous():
            raise ValueError(f"{name} is not contiguous; pass {name}.contiguous() (a copy)")
        x = x.detach().numpy()
    elif not isinstance(x, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy array (or a CPU torch tensor) of float32 with shape "
            f"[n, {width}] ({width_name}); got {type(x).__name__}"
        )
    if x.dtype != np.float32:
        raise TypeError(
            f"{name} must be float32 with shape [n, {width}] ({width_name}); got {x.dtype}; "
            f"convert with {name}.astype(np.float32) (a copy)"
        )
    was_1d = x.ndim == 1
    if was_1d:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(
            f"{name} must have shape [n, {width}] ({width_name}) or [{width}]; "
            f"got {list(x.shape) if not was_1d else [x.shape[1]]}"
        )
    if not x.flags.c_contiguous:
        raise ValueError(
            f"{name} is not C-contiguous (a transposed or sliced view?); "
            f"pass np.ascontiguousarray({name}) (a copy)"
        )
    return x, from_torch, was_1d


def _give_back(out: np.ndarray, from_torch: bool, was_1d: bool):
    if was_1d:
        out = out[0]
    if from_torch:
        return _torch_module().from_numpy(out)
    return out


@dataclass(frozen=True)
class SparseCode:
    """Codes of ``n`` rows in CSR form (scipy's ``csr_matrix((values, indices, indptr))``).

    Row ``r``'s active latents are ``indices[indptr[r]:indptr[r + 1]]`` with ``values`` at the
    same positions.
    """

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int32 [nnz]
    values: np.ndarray  # float32 [nnz]
    d_sae: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.n_rows, self.d_sae)

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def row(self, r: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(latent indices, values)`` of row ``r``."""
        a, b = int(self.indptr[r]), int(self.indptr[r + 1])
        return self.indices[a:b], self.values[a:b]

    def l0(self) -> np.ndarray:
        """Active latents per row."""
        return np.diff(self.indptr)

    def to_dense(self) -> np.ndarray:
        """The dense ``[n, d_sae]`` float32 codes."""
        out = np.zeros(self.shape, dtype=np.float32)
        rows = np.repeat(np.arange(self.n_rows), np.diff(self.indptr))
        out[rows, self.indices] = self.values
        return out

    def to_scipy(self):
        """A ``scipy.sparse.csr_matrix`` sharing these arrays (needs scipy)."""
        import scipy.sparse

        return scipy.sparse.csr_matrix((self.values, self.indices, self.indptr), shape=self.shape)


class SAE:
    """A sparse autoencoder in SAELens layout (immutable).

    Make one with :meth:`load`, :meth:`init` or :func:`train`. The weights are read-only numpy
    views of the Rust object's memory: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]``, and :attr:`params`, the family's per-latent parameters ``[d_sae]`` by
    SAELens name (``b_enc``, ``b_gate``, ``r_mag``, ``b_mag``, ``threshold``, ...).
    """

    def __init__(self, native: "_native.NativeSae", path: Optional[Path] = None):
        self._native = native
        self.path = path
        tensors = {}
        for name, array in native.tensors():
            array.flags.writeable = False
            tensors[name] = array
        self._tensors = tensors

    # -- making one ---------------------------------------------------------------------

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SAE":
        """Loads ``path/cfg.json`` + ``path/sae_weights.safetensors`` (ours or SAELens').

        Raises FileNotFoundError when a file is missing, ValueError when one is malformed.
        """
        path = Path(path)
        return cls(_native.NativeSae.load(str(path)), path)

    @classmethod
    def init(cls, arch: str, d_in: int, d_sae: int, k: int = 0, seed: int = 0) -> "SAE":
        """A freshly initialised SAE of family ``arch`` (see :func:`architectures`)."""
        return cls(_native.NativeSae.init(arch, d_in, d_sae, k, seed))

    def with_params(self, **arrays: Any) -> "SAE":
        """A copy with the named tensors replaced (SAELens names and shapes), checked."""
        pairs = []
        for name, value in arrays.items():
            if name not in self._tensors:
                raise ValueError(
                    f"a {self.arch} SAE has no tensor {name!r}; it has {', '.join(self._tensors)}"
                )
            want = self._tensors[name].shape
            value = np.asarray(value, dtype=np.float32)
            if value.shape != want:
                raise ValueError(f"{name} must have shape {list(want)}; got {list(value.shape)}")
            pairs.append((name, np.ascontiguousarray(value).reshape(-1)))
        return SAE(self._native.with_tensors(pairs))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the SAE in SAELens layout, replacing ``path`` as a whole."""
        self._native.save(str(path))

    # -- what it is ---------------------------------------------------------------------

    @property
    def arch(self) -> str:
        """The family (``gated``, ``relu``, ``topk``, ``batchtopk``, ``jumprelu``, ...)."""
        return self._native.arch

    @property
    def d_in(self) -> int:
        return self._native.d_in

    @property
    def d_sae(self) -> int:
        return self._native.d_sae

    @property
    def cfg(self) -> Dict[str, Any]:
        """The cfg.json this SAE saves as (SAELens keys plus our ``sae_core`` block)."""
        return json.loads(self._native.cfg_json())

    @property
    def W_enc(self) -> np.ndarray:
        return self._tensors["W_enc"]

    @property
    def W_dec(self) -> np.ndarray:
        return self._tensors["W_dec"]

    @property
    def b_dec(self) -> np.ndarray:
        return self._tensors["b_dec"]

    @property
    def params(self) -> Dict[str, np.ndarray]:
        """The per-latent parameters ``[d_sae]`` by SAELens name."""
        return {k: v for k, v in self._tensors.items() if k not in ("W_enc", "W_dec", "b_dec")}

    @property
    def tensors(self) -> Dict[str, np.ndarray]:
        """Every tensor by SAELens name, as saved."""
        return dict(self._tensors)

    @property
    def train_log(self) -> List[Dict[str, Any]]:
        """The lines of ``train_log.jsonl`` next to the weights (empty when there is none)."""
        if self.path is None or not (self.path / "train_log.jsonl").is_file():
            return []
        with open(self.path / "train_log.jsonl") as f:
            return [json.loads(line) for line in f if line.strip()]

    def train_log_frame(self) -> Any:
        """``train_log`` as a pandas DataFrame, one row per logged step (needs pandas)."""
        try:
            import pandas
        except ImportError as e:
            raise ImportError(
                "train_log_frame needs pandas (pip install pandas); train_log gives the same "
                "lines as a list of dicts"
            ) from e
        return pandas.DataFrame(self.train_log)

    @property
    def train_summary(self) -> Optional[Dict[str, Any]]:
        """``train_summary.json`` next to the weights, if there is one."""
        if self.path is None or not (self.path / "train_summary.json").is_file():
            return None
        with open(self.path / "train_summary.json") as f:
            return json.load(f)

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return f"SAE(arch={self.arch!r}, d_in={self.d_in}, d_sae={self.d_sae}{where})"

    # -- running it ---------------------------------------------------------------------

    def encode(self, x):
        """Dense codes ``[n, d_sae]`` of ``x`` ``[n, d_in]`` (or ``[d_in]`` -> ``[d_sae]``).

        ``x`` is a float32 numpy array or CPU torch tensor; the result is of the same kind.
        """
        arr, from_torch, was_1d = _as_rows(x, self.d_in, "x", "d_in")
        return _give_back(self._native.encode(arr), from_torch, was_1d)

    def encode_sparse(self, x) -> SparseCode:
        """Codes of ``x`` ``[n, d_in]`` in CSR form: memory grows with the active latents,
        not with ``n x d_sae``."""
        arr, _, _ = _as_rows(x, self.d_in, "x", "d_in")
        indptr, indices, values = self._native.encode_sparse(arr)
        return SparseCode(indptr, indices, values, self.d_sae)

    def decode(self, f):
        """Reconstructions ``[n, d_in]`` of codes: dense ``[n, d_sae]`` (numpy or torch, the
        result is of the same kind) or a :class:`SparseCode`."""
        if isinstance(f, SparseCode):
            if f.d_sae != self.d_sae:
                raise ValueError(f"the code has d_sae {f.d_sae}; this SAE has {self.d_sae}")
            return self._native.decode_sparse(
                np.ascontiguousarray(f.indptr, dtype=np.int64),
                np.ascontiguousarray(f.indices, dtype=np.int32),
                np.ascontiguousarray(f.values, dtype=np.float32),
            )
        arr, from_torch, was_1d = _as_rows(f, self.d_sae, "f", "d_sae")
        return _give_back(self._native.decode(arr), from_torch, was_1d)

    def metrics(self, x) -> Dict[str, Any]:
        """Reconstruction metrics on activations ``x`` ``[n, d_in]`` (``n >= 2``), as ``sae
        eval`` reports them without the language model: ``l0`` (mean active latents), ``mse``
        (mean over rows of the squared error summed over d_in), ``fvu`` (that over the total
        variance), ``gamma`` (E||x_hat||^2 / E[x_hat . x]; 1 = no shrinkage) and
        ``fire_counts`` (rows each latent fired on)."""
        arr, _, _ = _as_rows(x, self.d_in, "x", "d_in")
        if arr.shape[0] < 2:
            raise ValueError(f"metrics need at least 2 rows (a variance); got {arr.shape[0]}")
        l0, mse, fvu, gamma, fires = self._native.metrics(arr)
        return {"n_tokens": arr.shape[0], "l0": l0, "mse": mse, "fvu": fvu, "gamma": gamma,
                "fire_counts": fires}

    def reconstruct(self, x):
        """``decode(encode(x))``, through the sparse code."""
        arr, from_torch, was_1d = _as_rows(x, self.d_in, "x", "d_in")
        indptr, indices, values = self._native.encode_sparse(arr)
        out = self._native.decode_sparse(indptr, indices, values)
        return _give_back(out, from_torch, was_1d)


class _Progress:
    """tqdm when it is installed, else one line rewritten in place."""

    def __init__(self, total: Optional[int], desc: str = "train", unit: str = "tok"):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.t0 = time.monotonic()
        self.last = 0
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc=desc)
        except ImportError:
            self.bar = None

    def __call__(self, done: int, total: Optional[int] = None) -> None:
        if total and total != self.total:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
                self.bar.refresh()
        if self.bar is not None:
            self.bar.update(done - self.last)
        else:
            secs = max(time.monotonic() - self.t0, 1e-9)
            of = f"/{self.total:,} ({100 * done / self.total:.0f}%)" if self.total else ""
            print(f"\r{self.desc}: {done:,}{of} {self.unit}, {done / secs:,.0f} {self.unit}/s",
                  end="", file=sys.stderr, flush=True)
        self.last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr, flush=True)


def _count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum``, or ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value}")
    return int(value)


def _model_spec(model: Union[str, os.PathLike]) -> str:
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be {_DEFAULT_MODEL!r}, a .gguf path, a Hugging Face model directory or "
            f"a cached repo id; got {type(model).__name__}"
        )
    return os.fspath(model)


def _reporter(progress: Union[bool, Callable[..., None]], total: Optional[int], desc: str,
              unit: str):
    """``(callback for the native call, bar to close or None)``."""
    bar = _Progress(total, desc, unit) if progress is True else None
    return (progress if callable(progress) else bar), bar


def hooks(model: Union[str, os.PathLike] = _DEFAULT_MODEL) -> List[Tuple[str, int]]:
    """``(hook name, width)`` of every hook point of ``model``, as ``sae hooks`` prints them."""
    return [(name, width) for name, width in _native.hooks(_model_spec(model))]


def harvest(
    model: Union[str, os.PathLike] = _DEFAULT_MODEL,
    hook: Optional[str] = None,
    corpus: Union[str, os.PathLike] = _DEFAULT_CORPUS,
    tokens: Optional[int] = None,
    out: Optional[Union[str, os.PathLike]] = None,
    *,
    ctx: int = 128,
    batch: int = 16,
    compute: str = "f32",
    dtype: str = "f32",
    store_tokens: bool = False,
    include_bos: bool = False,
    shard_rows: int = 32768,
    with_grad: bool = False,
    threads: Optional[int] = None,
    progress: Union[bool, Callable[[int, int], None]] = True,
) -> Union[np.ndarray, Dict[str, Any]]:
    """Runs the language model over ``corpus`` and takes ``tokens`` activation rows at
    ``hook``, as ``sae harvest`` does.

    ``model``: ``"smollm2-135m"`` (fetched on first use, as the CLI does), a ``.gguf`` file,
    a Hugging Face model directory, or a repo id in the local hub cache. ``hook``: e.g.
    ``"blocks.15.hook_resid_post"`` (:func:`hooks` lists them). ``corpus``:
    ``"python-docs"``, a directory of .txt/.jsonl/.parquet files or one such file
    (``PATH#NAME`` reads that field/column).

    Without ``out`` it returns a float32 numpy array ``[tokens, width]`` (fewer rows when the
    corpus is shorter), in corpus order: the rows the store would hold. With ``out`` it
    writes an activation store there exactly as ``sae harvest --out`` does (a new or empty
    directory, or an unfinished store of its own, which is resumed; anything else is
    refused and left untouched) and returns a summary dict (``out``, ``tokens`` in the
    store, ``harvested`` by this call, ``tokens_per_second``, ``shards``...).

    The other keywords are the CLI's flags: ``ctx`` (context length, BOS included),
    ``batch`` (contexts per forward pass), ``compute`` (``"f32"``, ``"bf16"`` or ``"bf16x3"``
    weight products), and for stores only ``dtype`` (``"f32"``/``"bf16"``), ``store_tokens``,
    ``shard_rows``; ``include_bos`` keeps the BOS rows. ``threads``: worker threads for the
    forward pass (default: all cores, or ``RAYON_NUM_THREADS``).

    ``with_grad=True`` (``sae harvest --with-grad``) also stores, beside each activation, the
    gradient of the model's next-token loss with respect to it (tensor ``grads`` in every
    shard; one backward pass through the layers above the hook per batch): what
    ``train(DIR, arch="gsae")`` needs. Stores only (it needs ``out``); Llama-family models.

    ``progress``: True shows a tqdm bar (a plain line without tqdm), False nothing, a
    callable gets ``(rows, tokens)`` about every 0.2 s. The forward passes run without the
    GIL. Ctrl-C stops after the current batch (loading the model and reading the corpus are
    not cut short) and raises KeyboardInterrupt; a store keeps the shards written so far and
    the same call resumes it.

    Raises ValueError for a bad setting or an unknown hook (the message lists the valid
    ones), FileNotFoundError for a missing model or corpus.
    """
    if hook is None:
        raise ValueError("hook is required, e.g. hook='blocks.15.hook_resid_post' "
                         "(sae_rs.hooks(model) lists them)")
    if tokens is None:
        raise ValueError("tokens is required: the activation rows to take")
    tokens = _count(tokens, "tokens")
    if with_grad and out is None:
        raise ValueError("with_grad=True stores the loss gradients beside the activations in "
                         "a store: pass out=DIR as well")
    if out is None:
        for name, value, default in (("dtype", dtype, "f32"), ("store_tokens", store_tokens, False),
                                     ("shard_rows", shard_rows, 32768)):
            if value != default:
                raise ValueError(f"{name} applies to a store only; pass out=DIR as well")
    callback, bar = _reporter(progress, tokens, "harvest", "tok")
    try:
        result = _native.harvest(
            _model_spec(model), str(hook), os.fspath(corpus), tokens,
            None if out is None else os.fspath(out), _count(ctx, "ctx", 2), _count(batch, "batch"),
            compute, dtype, bool(store_tokens), bool(include_bos), _count(shard_rows, "shard_rows"),
            None if threads is None else _count(threads, "threads"), callback,
            with_grad=bool(with_grad),
        )
    except KeyboardInterrupt:
        if out is None:
            raise KeyboardInterrupt("harvest stopped; nothing was returned") from None
        raise KeyboardInterrupt(
            f"harvest stopped: {os.fspath(out)} keeps the shards written so far; the same call "
            "resumes it") from None
    finally:
        if bar is not None:
            bar.close()
    if out is None:
        return result
    return json.loads(result)


def evaluate(
    sae: Union["SAE", str, os.PathLike],
    model: Union[str, os.PathLike] = _DEFAULT_MODEL,
    hook: Optional[str] = None,
    corpus: Union[str, os.PathLike] = _DEFAULT_CORPUS,
    tokens: int = 200_000,
    *,
    ctx: int = 128,
    batch: int = 8,
    skip_tokens: Optional[int] = None,
    out: Optional[Union[str, os.PathLike]] = None,
    threads: Optional[int] = None,
    progress: Union[bool, Callable[[int, int], None]] = True,
    compute: str = "f32",
) -> Dict[str, Any]:
    """Evaluates ``sae`` (an :class:`SAE` or the path of one) on ``tokens`` held-out tokens
    of ``corpus`` with ``model``'s own loss, as ``sae eval`` does, and returns the dict
    ``sae eval`` writes to ``eval.json``: ``l0``, ``mse``, ``fvu``, ``gamma``, ``ce_clean``,
    ``ce_sae``, ``ce_zero``, ``ce_mean_ablation``, ``delta_lm_loss``, ``loss_recovered``,
    ``loss_recovered_vs_mean``, ``firing`` (dead/dense latents and the histogram),
    ``n_tokens``, ``n_contexts``, ``skip_tokens``, ``max_norm``, ``n_unspliced``...

    ``hook``: default the SAE's (cfg.json). ``skip_tokens``: corpus tokens skipped first;
    default the size of the store the SAE was trained on (so the text is held out), and
    ValueError when that cannot be told (pass 0 if it was trained on other text). ``out``:
    also write ``eval.json``, the firing histogram and ``report.md`` there, with the CLI's
    checks (nothing is written by default). ``ctx``, ``batch``, ``threads``, ``progress``
    (a callable gets ``(forward passes, total)``) as in :func:`harvest`. ``compute``: the
    model's weight products, ``"f32"`` (default), ``"bf16"`` or ``"bf16x3"``, as in
    :func:`harvest`; the report records it (``compute``). Ctrl-C stops after the current
    forward pass and raises KeyboardInterrupt.
    """
    if isinstance(sae, (str, os.PathLike)):
        sae = SAE.load(sae)
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be an SAE or the path of one; got {type(sae).__name__}")
    name = str(sae.path) if sae.path is not None else repr(sae)
    tokens = _count(tokens, "tokens")
    callback, bar = _reporter(progress, None, "eval", "pass")
    try:
        report = _native.evaluate(
            sae._native, name, None if sae.path is None else str(sae.path), _model_spec(model),
            os.fspath(corpus), tokens, _count(ctx, "ctx", 2), _count(batch, "batch"),
            None if hook is None else str(hook),
            None if skip_tokens is None else _count(skip_tokens, "skip_tokens", 0),
            None if out is None else os.fspath(out),
            None if threads is None else _count(threads, "threads"), callback, str(compute),
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt("evaluation stopped; nothing was written") from None
    finally:
        if bar is not None:
            bar.close()
    return json.loads(report)


def _json_default(v: Any):
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    raise TypeError(f"train config: {type(v).__name__} is not a setting value")


def train(
    acts: Any = None,
    arch: str = "gated",
    *,
    out: Union[str, os.PathLike],
    d_sae: Optional[int] = None,
    l1: Optional[float] = None,
    k: Optional[int] = None,
    tokens: Optional[int] = None,
    steps: Optional[int] = None,
    progress: Union[bool, Callable[[int], None]] = True,
    **config: Any,
) -> SAE:
    """Trains an SAE as ``sae train`` does and returns it (loaded from ``out``).

    ``acts``: a float32 ``[n, d_in]`` numpy array or CPU torch tensor (read in place, in
    order, wrapping around), an iterable or iterator of such batches, or the path of an
    activation store (files or directory written by ``sae harvest`` or :func:`harvest`,
    shuffled). Leave it out with ``synth="synthsaebench-small"``, or to train straight from
    a language model as ``sae train --model`` does: ``model=`` (as in :func:`harvest`),
    ``hook=`` (one; ``sae train --hook a,b`` trains several in one pass), ``corpus=`` and
    ``tokens`` or ``steps``; the model is loaded (without the GIL; Ctrl-C does not cut the
    load short) before training starts.

    ``arch="gsae"`` selects latents with the model's loss gradient: train it from a model, or
    from a store harvested with ``harvest(..., out=DIR, with_grad=True)``; a store without
    gradients raises ValueError.

    Batches from an iterable are streamed: training pulls the next batch (taking the GIL
    only for that) when it needs more rows, and keeps only the rows not yet trained on, so
    the data never has to fit in memory. Give ``tokens`` or ``steps``. The rows are used in
    the order given (shuffle them yourself); the initialisation sample
    (``init_sample`` rows, 32768 by default) and the final evaluation sample
    (``eval_tokens`` rows) are read ahead of training without being skipped. If the
    iterator runs out before ``tokens`` (or ``steps x batch_size``) rows, training stops
    with ValueError saying how many rows it gave; nothing is saved to ``out``, and the last
    checkpoint (if one was written) stays in ``<out>.partial`` for ``resume=True`` with a
    new iterator. An exception raised by the iterator stops training and is raised as it
    is.

    Every other keyword is a field of the Rust ``TrainConfig`` (the ``sae train`` flags with
    underscores: ``batch_size``, ``lr``, ``seed``, ``checkpoint_every``, ``resume``,
    ``overwrite``...); an unknown one raises ValueError listing the known ones. The Rust
    progress bar is off (``quiet=True``) unless you pass ``quiet=False``.

    ``progress``: True shows a tqdm bar (a plain line without tqdm), False nothing, and a
    callable is called with the rows (tokens) trained so far, about every 0.2 s.

    Ctrl-C stops training before its next step and raises KeyboardInterrupt; the run's last
    checkpoint (every ``checkpoint_every`` steps, 1000 by default) stays in
    ``<out>.partial``, and the same call with ``resume=True`` continues it.
    """
    cfg: Dict[str, Any] = {"arch": arch, "out": os.fspath(out), "quiet": True}
    for key, value in (("d_sae", d_sae), ("l1", l1), ("k", k), ("tokens", tokens),
                       ("steps", steps)):
        if value is not None:
            cfg[key] = value
    cfg.update(config)

    array = None
    batches = None
    if isinstance(acts, (str, os.PathLike)):
        cfg["acts"] = os.fspath(acts)
    elif acts is not None:
        torch = _torch_module()
        is_array = isinstance(acts, np.ndarray) or (torch is not None and isinstance(acts, torch.Tensor))
        if not is_array:
            if not isinstance(acts, Iterable):
                raise TypeError(
                    "acts must be a float32 [n, d_in] array, an iterable of them, or a path; "
                    f"got {type(acts).__name__}"
                )
            if tokens is None and steps is None:
                raise ValueError("acts is an iterable of batches: give tokens or steps (its "
                                 "length is not known in advance)")
            batches = _checked_batches(iter(acts))
        else:
            array, _, _ = _as_rows(acts, _width(acts), "acts", "d_in")

    config_json = json.dumps(cfg, default=_json_default)
    _native.check_train_config(config_json)

    total = None
    if tokens is not None:
        total = int(tokens)
    elif steps is not None:
        total = int(steps) * int(cfg.get("batch_size", _TRAIN_BATCH_DEFAULT))
    elif array is not None and not cfg.get("resume") and not cfg.get("extend"):
        total = array.shape[0]
    report, bar = _reporter(progress, total, "train", "tok")
    try:
        _native.train(config_json, array, report, batches)
    except KeyboardInterrupt:
        partial = Path(os.fspath(out) + ".partial")
        saved = [partial / d / "progress.json" for d in ("checkpoint", "checkpoint.old")]
        if any(p.is_file() for p in saved):
            where = (f"its last checkpoint is in {partial}; the same call with resume=True "
                     "continues from there")
        else:
            where = ("it stopped before its first checkpoint, so there is nothing to resume; "
                     "the same call starts over")
        raise KeyboardInterrupt(f"training stopped: {where}") from None
    finally:
        if bar is not None:
            bar.close()
    return SAE.load(out)


def _width(x: Any) -> int:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(
            f"acts must have shape [n, d_in]; got {list(shape) if shape is not None else type(x).__name__}"
        )
    return int(shape[1])


def _checked_batches(batches: Iterator[Any]) -> Iterator[np.ndarray]:
    """Each batch as a C-contiguous float32 ``[n, d_in]`` numpy array, lazily."""
    for b in batches:
        yield _as_rows(b, _width(b), "acts batch", "d_in")[0]
