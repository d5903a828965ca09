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
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from . import _native

__version__ = "0.1.0"
__all__ = ["SAE", "SparseCode", "train", "architectures", "__version__"]

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

    def __init__(self, total: Optional[int]):
        self.total = total
        self.t0 = time.monotonic()
        self.last = 0
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc="train")
        except ImportError:
            self.bar = None

    def __call__(self, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(rows - self.last)
        else:
            secs = max(time.monotonic() - self.t0, 1e-9)
            of = f"/{self.total:,} ({100 * rows / self.total:.0f}%)" if self.total else ""
            print(f"\rtrain: {rows:,}{of} tokens, {rows / secs:,.0f} tok/s", end="",
                  file=sys.stderr, flush=True)
        self.last = rows

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr, flush=True)


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
    order, wrapping around), an iterable of such batches (concatenated first: a copy), or
    the path of an activation store (files or directory written by ``sae harvest``,
    shuffled). Leave it out with ``synth="synthsaebench-small"``.

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
            batches = [_as_rows(b, _width(b), "acts batch", "d_in")[0] for b in acts]
            if not batches:
                raise ValueError("acts is an empty iterable")
            widths = {b.shape[1] for b in batches}
            if len(widths) != 1:
                raise ValueError(f"acts batches must share one width d_in; got {sorted(widths)}")
            acts = np.concatenate(batches)
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
    bar = _Progress(total) if progress is True else None
    report = progress if callable(progress) else bar
    try:
        _native.train(config_json, array, report)
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
