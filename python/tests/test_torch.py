import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sae_rs  # noqa: E402
from conftest import D_IN, D_SAE, random_sae  # noqa: E402


def test_torch_in_torch_out_same_values_as_numpy(rng):
    sae = random_sae("gated")
    x = rng.normal(size=(16, D_IN)).astype(np.float32)
    f = sae.encode(torch.from_numpy(x))
    assert isinstance(f, torch.Tensor) and f.dtype == torch.float32
    assert tuple(f.shape) == (16, D_SAE)
    np.testing.assert_array_equal(f.numpy(), sae.encode(x))
    x_hat = sae.decode(f)
    assert isinstance(x_hat, torch.Tensor)
    np.testing.assert_array_equal(x_hat.numpy(), sae.decode(sae.encode(x)))


def test_tensor_that_requires_grad_is_read_in_place(rng):
    sae = random_sae("relu")
    x = torch.randn(4, D_IN, requires_grad=True)
    assert sae.encode(x).shape == (4, D_SAE)


def test_bad_tensors(rng):
    sae = random_sae("relu")
    with pytest.raises(TypeError, match=r"float32.*\.float\(\)"):
        sae.encode(torch.zeros(4, D_IN, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        sae.encode(torch.zeros(4, D_IN + 1))
    with pytest.raises(ValueError, match="contiguous"):
        sae.encode(torch.zeros(D_IN, 4).T)


def test_train_on_a_tensor(tmp_path):
    acts = torch.randn(2048, 8)
    sae = sae_rs.train(acts, arch="relu", d_sae=16, steps=10, batch_size=128, init_sample=256,
                       eval_tokens=256, out=tmp_path / "t", progress=False)
    assert sae.d_in == 8
