import json

import numpy as np
import pytest

import sae_rs
from conftest import D_IN, D_SAE, random_sae, write_safetensors

FAMILIES = ["relu", "gated", "jumprelu", "topk"]


def reference_encode(sae: sae_rs.SAE, x: np.ndarray) -> np.ndarray:
    """SAELens' encoders written out in numpy (float64)."""
    p = {k: v.astype(np.float64) for k, v in sae.tensors.items()}
    xin = x.astype(np.float64)
    if sae.cfg["apply_b_dec_to_input"]:
        xin = xin - p["b_dec"]
    if sae.arch == "gated":
        gate = xin @ p["W_enc"] + p["b_gate"]
        mag = xin @ (p["W_enc"] * np.exp(p["r_mag"])) + p["b_mag"]
        return (gate > 0) * np.maximum(mag, 0)
    pre = xin @ p["W_enc"] + p["b_enc"]
    if sae.arch == "relu":
        return np.maximum(pre, 0)
    if sae.arch == "jumprelu":
        return np.maximum(pre, 0) * (pre > p["threshold"])
    if sae.arch == "topk":
        k = sae.cfg["k"]
        out = np.zeros_like(pre)
        top = np.argsort(-pre, axis=1)[:, :k]
        rows = np.arange(len(pre))[:, None]
        out[rows, top] = np.maximum(pre[rows, top], 0)
        return out
    raise AssertionError(sae.arch)


@pytest.mark.parametrize("arch", FAMILIES)
def test_encode_and_decode_match_saelens_formulas(arch, rng):
    sae = random_sae(arch)
    x = rng.normal(size=(64, D_IN)).astype(np.float32)
    f = sae.encode(x)
    assert f.dtype == np.float32 and f.shape == (64, D_SAE)
    want = reference_encode(sae, x)
    np.testing.assert_allclose(f, want, atol=1e-5)
    # Some latents on, some off: the comparison says something about the gating.
    assert 0 < np.count_nonzero(f) < f.size
    x_hat = sae.decode(f)
    np.testing.assert_allclose(x_hat, want @ sae.W_dec.astype(np.float64) + sae.b_dec, atol=1e-4)


@pytest.mark.parametrize("arch", FAMILIES)
def test_save_load_round_trip(arch, tmp_path, rng):
    sae = random_sae(arch, seed=3)
    sae.save(tmp_path / "s")
    back = sae_rs.SAE.load(tmp_path / "s")
    assert back.arch == arch and back.d_in == D_IN and back.d_sae == D_SAE
    assert set(back.tensors) == set(sae.tensors)
    for name, t in sae.tensors.items():
        np.testing.assert_array_equal(back.tensors[name], t, err_msg=name)
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert back.cfg == cfg
    x = rng.normal(size=(5, D_IN)).astype(np.float32)
    np.testing.assert_array_equal(back.encode(x), sae.encode(x))


def test_params_and_weights_by_name():
    sae = random_sae("gated")
    assert set(sae.params) == {"b_gate", "r_mag", "b_mag"}
    assert sae.W_enc.shape == (D_IN, D_SAE)
    assert sae.W_dec.shape == (D_SAE, D_IN)
    assert sae.b_dec.shape == (D_IN,)
    for v in sae.params.values():
        assert v.shape == (D_SAE,) and v.dtype == np.float32
    assert sae.cfg["architecture"] == "gated"
    assert sae.cfg["d_sae"] == D_SAE


def test_weights_are_read_only_views_not_copies():
    sae = random_sae("relu")
    w = sae.W_enc
    assert not w.flags.writeable
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    # The array does not own its memory: it views the Rust SAE's.
    assert not w.flags.owndata
    assert np.shares_memory(sae.W_enc, sae.tensors["W_enc"])


def test_sparse_code_matches_dense_over_several_chunks(rng):
    # More rows than one encode chunk (4096), so the chunks' CSR offsets are joined.
    sae = random_sae("topk", k=3)
    x = rng.normal(size=(9000, D_IN)).astype(np.float32)
    code = sae.encode_sparse(x)
    dense = sae.encode(x)
    assert code.shape == (9000, D_SAE)
    assert code.indptr.dtype == np.int64 and code.indices.dtype == np.int32
    assert code.indptr[-1] == code.nnz == np.count_nonzero(dense)
    assert (code.l0() <= 3).all()
    np.testing.assert_array_equal(code.to_dense(), dense)
    idx, val = code.row(8999)
    np.testing.assert_array_equal(dense[8999, idx], val)
    np.testing.assert_allclose(sae.decode(code), sae.decode(dense), atol=1e-6)
    np.testing.assert_allclose(sae.reconstruct(x), sae.decode(dense), atol=1e-6)


def test_one_row_and_empty_batches(rng):
    sae = random_sae("relu")
    x = rng.normal(size=(3, D_IN)).astype(np.float32)
    np.testing.assert_array_equal(sae.encode(x[1]), sae.encode(x)[1])
    assert sae.decode(sae.encode(x[1])).shape == (D_IN,)
    empty = np.zeros((0, D_IN), np.float32)
    assert sae.encode(empty).shape == (0, D_SAE)
    assert sae.encode_sparse(empty).nnz == 0


def test_loads_a_directory_saelens_wrote(tmp_path, rng):
    # SAELens 5 layout: hook and model at the top level, float16 weights.
    d = tmp_path / "saelens"
    d.mkdir()
    t = {
        "W_enc": rng.normal(size=(D_IN, D_SAE)).astype(np.float16),
        "b_enc": rng.normal(size=D_SAE).astype(np.float16),
        "W_dec": rng.normal(size=(D_SAE, D_IN)).astype(np.float16),
        "b_dec": rng.normal(size=D_IN).astype(np.float16),
    }
    write_safetensors(d / "sae_weights.safetensors", t)
    (d / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float16",
        "apply_b_dec_to_input": True, "hook_name": "blocks.3.hook_resid_post",
        "model_name": "gpt2", "context_size": 128,
    }))
    sae = sae_rs.SAE.load(d)
    assert sae.arch == "relu"
    np.testing.assert_array_equal(sae.W_enc, t["W_enc"].astype(np.float32))
    x = rng.normal(size=(4, D_IN)).astype(np.float32)
    np.testing.assert_allclose(sae.encode(x), reference_encode(sae, x), atol=1e-4)
    assert sae.cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"


def test_architectures_lists_the_families():
    assert set(FAMILIES) <= set(sae_rs.architectures())


# -- bad input -----------------------------------------------------------------------------


def test_wrong_width_names_the_expected_shape(rng):
    sae = random_sae("relu")
    with pytest.raises(ValueError, match=r"shape \[n, 8\] \(d_in\).*got \[4, 7\]"):
        sae.encode(np.zeros((4, 7), np.float32))
    with pytest.raises(ValueError, match=r"\[n, 32\] \(d_sae\)"):
        sae.decode(np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match=r"shape \[n, 8\]"):
        sae.encode(np.zeros((2, 4, 8), np.float32))


def test_wrong_dtype_or_type_is_a_type_error():
    sae = random_sae("relu")
    with pytest.raises(TypeError, match=r"float32.*got float64.*astype\(np.float32\)"):
        sae.encode(np.zeros((4, D_IN)))
    with pytest.raises(TypeError, match="numpy array"):
        sae.encode([[0.0] * D_IN])


def test_non_contiguous_input_is_refused_not_copied(rng):
    sae = random_sae("relu")
    x = rng.normal(size=(D_IN * 2, D_IN * 2)).astype(np.float32)
    with pytest.raises(ValueError, match="not C-contiguous.*ascontiguousarray"):
        sae.encode(x[:, ::2])
    with pytest.raises(ValueError, match="not C-contiguous"):
        sae.encode(x[:D_IN, :D_IN].T)


def test_native_layer_checks_shapes_itself():
    # The Rust functions, called without the Python wrapper's checks.
    sae = random_sae("relu")
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        sae._native.encode(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        sae._native.encode(np.zeros((8, 16), np.float32)[:, ::2])


def test_bad_sparse_codes_are_refused():
    sae = random_sae("relu")
    ok = sae_rs.SparseCode(np.array([0, 1]), np.array([3], np.int32),
                           np.array([1.0], np.float32), D_SAE)
    assert sae.decode(ok).shape == (1, D_IN)
    with pytest.raises(ValueError, match=r"latent index 32 is outside 0..32"):
        sae.decode(sae_rs.SparseCode(np.array([0, 1]), np.array([32], np.int32),
                                     np.array([1.0], np.float32), D_SAE))
    with pytest.raises(ValueError, match="indptr must start at 0"):
        sae.decode(sae_rs.SparseCode(np.array([0, 2]), np.array([1], np.int32),
                                     np.array([1.0], np.float32), D_SAE))
    with pytest.raises(ValueError, match="same length"):
        sae.decode(sae_rs.SparseCode(np.array([0, 1]), np.array([1], np.int32),
                                     np.array([1.0, 2.0], np.float32), D_SAE))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        sae_rs.SAE.load(tmp_path / "missing")
    d = tmp_path / "broken"
    random_sae("relu").save(d)
    (d / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cfg.json: not valid JSON"):
        sae_rs.SAE.load(d)


def test_with_params_checks_names_and_shapes():
    sae = random_sae("gated")
    with pytest.raises(ValueError, match="no tensor 'b_enc'"):
        sae.with_params(b_enc=np.zeros(D_SAE))
    with pytest.raises(ValueError, match=r"W_dec must have shape \[32, 8\]"):
        sae.with_params(W_dec=np.zeros((8, 32)))
    with pytest.raises(ValueError, match="arch"):
        sae_rs.SAE.init("nope", D_IN, D_SAE)


def test_encode_releases_the_gil(rng):
    import threading
    import time

    sae = sae_rs.SAE.init("relu", 256, 4096)
    x = rng.normal(size=(2048, 256)).astype(np.float32)
    started = threading.Event()

    def work():
        started.set()
        for _ in range(3):
            sae.encode(x)

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    ticks = 0
    # With the GIL held through each encode this loop would barely run until the thread ends.
    while t.is_alive():
        time.sleep(0.001)
        ticks += 1
    t.join()
    assert ticks > 50


def test_metrics_match_numpy(rng):
    sae = random_sae("jumprelu")
    x = rng.normal(size=(5000, D_IN)).astype(np.float32)
    m = sae.metrics(x)
    f = sae.encode(x).astype(np.float64)
    x_hat = f @ sae.W_dec.astype(np.float64) + sae.b_dec
    err = ((x - x_hat) ** 2).sum(1).mean()
    assert m["n_tokens"] == 5000
    assert m["l0"] == pytest.approx(np.count_nonzero(f) / 5000)
    assert m["mse"] == pytest.approx(err, rel=1e-4)
    assert m["fvu"] == pytest.approx(err / x.astype(np.float64).var(0).sum(), rel=1e-4)
    assert m["gamma"] == pytest.approx((x_hat ** 2).sum() / (x_hat * x).sum(), rel=1e-4)
    np.testing.assert_array_equal(m["fire_counts"], np.count_nonzero(f, axis=0))
    with pytest.raises(ValueError, match="at least 2 rows"):
        sae.metrics(x[:1])
