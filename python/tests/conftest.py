import json
import struct

import numpy as np
import pytest

import sae_rs

D_IN, D_SAE = 8, 32


def random_sae(arch: str, seed: int = 0, k: int = 4) -> sae_rs.SAE:
    """An SAE of `arch` with random (not initial) values in every tensor, so that a wrong
    formula or a swapped tensor changes the outputs."""
    rng = np.random.default_rng(seed)
    sae = sae_rs.SAE.init(arch, D_IN, D_SAE, k=k, seed=seed)
    new = {}
    for name, t in sae.tensors.items():
        if name in ("threshold",):
            new[name] = rng.uniform(0.0, 0.5, t.shape)
        elif name in ("W_enc", "W_dec"):
            new[name] = rng.normal(0, 1 / np.sqrt(D_IN), t.shape)
        else:
            new[name] = rng.normal(0, 0.3, t.shape)
    return sae.with_params(**new)


def write_safetensors(path, tensors):
    """Minimal safetensors writer (numpy only): 8-byte header length, JSON header, data."""
    header, blobs, offset = {}, [], 0
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        header[name] = {"dtype": dtypes[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
