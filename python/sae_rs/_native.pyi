"""Type stubs for the Rust extension module (see src/lib.rs). Use the wrappers in sae_rs."""

from os import PathLike
from typing import Callable, Iterator, List, Optional, Tuple, Union, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "NativeSae",
    "train",
    "check_train_config",
    "architectures",
    "harvest",
    "evaluate",
    "hooks",
]

_F32 = npt.NDArray[np.float32]

@final
class NativeSae:
    @staticmethod
    def load(path: Union[str, PathLike[str]]) -> NativeSae: ...
    @staticmethod
    def init(arch: str, d_in: int, d_sae: int, k: int = 0, seed: int = 0) -> NativeSae: ...
    def with_tensors(self, tensors: List[Tuple[str, _F32]]) -> NativeSae: ...
    def save(self, path: Union[str, PathLike[str]]) -> None: ...
    @property
    def arch(self) -> str: ...
    @property
    def d_in(self) -> int: ...
    @property
    def d_sae(self) -> int: ...
    def cfg_json(self) -> str: ...
    def tensors(self) -> List[Tuple[str, _F32]]: ...
    def encode(self, x: _F32) -> _F32: ...
    def encode_sparse(
        self, x: _F32
    ) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], _F32]: ...
    def metrics(
        self, x: _F32
    ) -> Tuple[float, float, float, float, npt.NDArray[np.uint64]]: ...
    def decode(self, f: _F32) -> _F32: ...
    def decode_sparse(
        self,
        indptr: npt.NDArray[np.int64],
        indices: npt.NDArray[np.int32],
        values: _F32,
    ) -> _F32: ...

def train(
    config_json: str,
    acts: Optional[_F32] = None,
    progress: Optional[Callable[[int], object]] = None,
    batches: Optional[Iterator[_F32]] = None,
) -> str: ...
def check_train_config(config_json: str) -> None: ...
def architectures() -> List[str]: ...
def harvest(
    model: str,
    hook: str,
    corpus: str,
    tokens: int,
    out: Optional[str] = None,
    ctx: int = 128,
    batch: int = 16,
    compute: str = "f32",
    dtype: str = "f32",
    store_tokens: bool = False,
    include_bos: bool = False,
    shard_rows: int = 32768,
    threads: Optional[int] = None,
    progress: Optional[Callable[[int, int], object]] = None,
    with_grad: bool = False,
) -> Union[_F32, str]: ...
def evaluate(
    sae: NativeSae,
    sae_name: str,
    sae_dir: Optional[str],
    model: str,
    corpus: str,
    tokens: int,
    ctx: int = 128,
    batch: int = 8,
    hook: Optional[str] = None,
    skip_tokens: Optional[int] = None,
    out: Optional[str] = None,
    threads: Optional[int] = None,
    progress: Optional[Callable[[int, int], object]] = None,
    compute: str = "f32",
) -> str: ...
def hooks(model: str) -> List[Tuple[str, int]]: ...
