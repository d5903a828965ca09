import _thread
import json
import signal
import threading

import numpy as np
import pytest

import sae_rs

D = 16

# Small and fast: every run here takes well under a second of training.
FAST = dict(batch_size=128, init_sample=1024, eval_tokens=512, log_every=10, seed=0)


def sparse_data(n: int = 4096, seed: int = 0) -> np.ndarray:
    """Rows made of a few of 48 fixed directions, the kind of data an SAE can learn."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(48, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    on = rng.random((n, 48)) < 0.06
    return ((on * rng.exponential(1.0, (n, 48))) @ dirs).astype(np.float32)


def test_train_on_an_array_returns_the_sae_and_its_log(tmp_path):
    acts = sparse_data()
    seen = []
    sae = sae_rs.train(acts, arch="relu", d_sae=64, l1=1.0, steps=200, lr=3e-3,
                       out=tmp_path / "relu", progress=seen.append, **FAST)
    assert isinstance(sae, sae_rs.SAE)
    assert (sae.arch, sae.d_in, sae.d_sae) == ("relu", D, 64)
    log = sae.train_log
    assert [r["step"] for r in log] == list(range(10, 201, 10))
    assert {"loss", "mse", "l0", "fvu", "lr", "tokens"} <= set(log[0])
    # It learnt something: the reconstruction error fell.
    assert log[-1]["fvu"] < 0.5 * log[0]["fvu"]
    assert sae.train_summary["steps"] == 200
    # The progress callback's last call has every training row.
    assert seen and seen[-1] >= 200 * 128
    x_hat = sae.reconstruct(acts[:256])
    fvu = ((x_hat - acts[:256]) ** 2).sum() / ((acts[:256] - acts[:256].mean(0)) ** 2).sum()
    assert fvu < 0.5
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            sae.train_log_frame()
    else:
        frame = sae.train_log_frame()
        assert list(frame["step"]) == [r["step"] for r in log]


def test_train_target_l0_steers_a_penalty_family(tmp_path):
    acts = sparse_data()
    sae = sae_rs.train(acts, arch="relu", d_sae=64, l1=0.1, target_l0=6, steps=300,
                       l1_warmup_steps=20, lr=3e-3, out=tmp_path / "t", progress=False, **FAST)
    assert sae.train_summary["l0_target"]["target"] == 6


@pytest.mark.parametrize("arch,extra", [("gated", dict(l1=1.0)), ("topk", dict(k=4)),
                                        ("jumprelu", dict(l1=0.1))])
def test_train_each_family_from_a_store_file(tmp_path, arch, extra):
    np.save(tmp_path / "acts.npy", sparse_data())
    sae = sae_rs.train(tmp_path / "acts.npy", arch=arch, d_sae=64, tokens=128 * 40,
                       out=tmp_path / arch, progress=False, **extra, **FAST)
    assert sae.arch == arch and sae.d_sae == 64
    assert sae.train_summary["tokens"] == 128 * 40
    assert sae.train_log[-1]["step"] == 40


def test_train_on_an_iterable_of_batches(tmp_path):
    acts = sparse_data()
    batches = (acts[i:i + 1000] for i in range(0, len(acts), 1000))
    sae = sae_rs.train(batches, arch="relu", d_sae=32, steps=20, out=tmp_path / "it",
                       progress=False, **FAST)
    assert sae.d_in == D


def test_unknown_config_key_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown field `learning_rate`.*`lr`"):
        sae_rs.train(sparse_data(), arch="relu", out=tmp_path / "x", learning_rate=1e-3)
    assert not (tmp_path / "x").exists()


def test_out_of_range_setting_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="lr must be a positive number; got -1"):
        sae_rs.train(sparse_data(), arch="relu", out=tmp_path / "x", lr=-1.0)
    with pytest.raises(ValueError, match="arch"):
        sae_rs.train(sparse_data(), arch="nope", out=tmp_path / "x")


def test_bad_acts_are_refused(tmp_path):
    with pytest.raises(TypeError, match="float32"):
        sae_rs.train(sparse_data().astype(np.float64), out=tmp_path / "x")
    with pytest.raises(ValueError, match=r"\[n, d_in\]"):
        sae_rs.train(np.zeros(16, np.float32), out=tmp_path / "x")
    with pytest.raises(ValueError, match="cannot read activations"):
        sae_rs.train(tmp_path / "missing.npy", out=tmp_path / "x")
    with pytest.raises(ValueError, match="no activations"):
        sae_rs.train(out=tmp_path / "x")


def test_a_trained_sae_is_not_overwritten_without_overwrite(tmp_path):
    acts = sparse_data()
    sae_rs.train(acts, arch="relu", d_sae=32, steps=10, out=tmp_path / "s", progress=False,
                 **FAST)
    before = (tmp_path / "s" / "sae_weights.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="overwrite"):
        sae_rs.train(acts, arch="relu", d_sae=32, steps=10, seed=1, out=tmp_path / "s",
                     progress=False, **{k: v for k, v in FAST.items() if k != "seed"})
    assert (tmp_path / "s" / "sae_weights.safetensors").read_bytes() == before


def test_stopping_keeps_a_checkpoint_that_resume_continues(tmp_path):
    acts = sparse_data()
    out = tmp_path / "run"
    common = dict(arch="relu", d_sae=32, out=out, checkpoint_every=5, **FAST)

    def stop(rows):
        raise KeyboardInterrupt

    # About 80 s if it ran to the end; stopped at the first progress report.
    with pytest.raises(KeyboardInterrupt, match="resume=True"):
        sae_rs.train(acts, steps=200_000, progress=stop, **common)
    assert not out.exists()
    saved = json.loads((tmp_path / "run.partial" / "checkpoint" / "progress.json").read_text())
    step = saved["step"]
    assert step > 0 and step % 5 == 0
    sae = sae_rs.train(acts, steps=step + 10, resume=True, progress=False, **common)
    summary = sae.train_summary
    assert summary["resumed_at_step"] == step
    assert summary["steps"] == step + 10
    assert not (tmp_path / "run.partial").exists()


def test_ctrl_c_stops_training(tmp_path):
    # A shell starts background jobs with SIGINT ignored, and then interrupt_main does
    # nothing; Python's own Ctrl-C handler makes the test independent of how it was started.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt, match="training stopped"):
            sae_rs.train(sparse_data(), arch="relu", d_sae=32, steps=200_000,
                         out=tmp_path / "c", progress=False, **FAST)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "c.partial").is_dir()
