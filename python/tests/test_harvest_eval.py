"""harvest, evaluate and streaming training, on the tiny Llama the Rust model tests use
(3 layers of width 64, a 398-token vocabulary: every call here takes well under a second)."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import sae_rs

TINY = Path(__file__).resolve().parents[2] / "crates/sae-lm/tests/fixtures/tiny-llama"
HOOK = "blocks.1.hook_resid_post"
WIDTH = 64
CTX = 32


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "text.txt"
    para = ("A sparse autoencoder reads the residual stream of a language model and writes "
            "it back as a sum of a few directions. The loss with the reconstruction spliced "
            "in tells how much of what the model uses survived. ")
    path.write_text(para * 40)
    return path


def read_store(path: Path) -> np.ndarray:
    """The activation rows of a float32 store, shard after shard (safetensors by hand)."""
    manifest = json.loads((path / "manifest.json").read_text())
    parts = []
    for shard in manifest["shards"]:
        raw = (path / shard["file"]).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        info = json.loads(raw[8:8 + n])["activations"]
        assert info["dtype"] == "F32"
        a, b = info["data_offsets"]
        parts.append(np.frombuffer(raw[8 + n + a:8 + n + b], np.float32).reshape(info["shape"]))
    return np.concatenate(parts)


def harvest(corpus, **kw):
    args = dict(model=TINY, hook=HOOK, corpus=corpus, tokens=300, ctx=CTX, progress=False)
    args.update(kw)
    return sae_rs.harvest(**args)


# -- harvest ---------------------------------------------------------------------------------

def test_hooks_lists_the_models_hook_points():
    names = dict(sae_rs.hooks(TINY))
    assert names[HOOK] == WIDTH
    assert "blocks.2.hook_resid_post" in names and "blocks.3.hook_resid_post" not in names


def test_harvest_returns_the_rows_the_store_holds(corpus, tmp_path):
    acts = harvest(corpus)
    assert acts.dtype == np.float32 and acts.shape == (300, WIDTH)
    assert np.isfinite(acts).all() and acts.std() > 0
    summary = harvest(corpus, out=tmp_path / "acts", shard_rows=100)
    assert summary["tokens"] == 300 and summary["harvested"] == 300
    assert summary["complete"] and summary["d_in"] == WIDTH and summary["shards"] > 1
    assert Path(summary["out"]) == tmp_path / "acts"
    np.testing.assert_array_equal(read_store(tmp_path / "acts"), acts)
    # Different layers give different rows; the same call gives the same rows.
    assert not np.allclose(harvest(corpus, hook="blocks.2.hook_resid_post"), acts)
    np.testing.assert_array_equal(harvest(corpus), acts)


def test_harvest_include_bos_and_batch(corpus):
    plain = harvest(corpus, tokens=CTX - 1)
    with_bos = harvest(corpus, tokens=CTX, include_bos=True, batch=1)
    # Position 0 (BOS) comes first, then the same rows.
    np.testing.assert_allclose(with_bos[1:], plain, rtol=1e-5, atol=1e-5)


def test_harvest_reports_progress(corpus):
    seen = []
    harvest(corpus, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (300, 300)


def test_harvest_stopped_keeps_the_shards_and_resumes(corpus, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(corpus.read_text() * 40)
    out = tmp_path / "acts"
    tokens = 60_000

    def stop(done, total):
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="resumes"):
        harvest(big, tokens=tokens, out=out, shard_rows=10 * (CTX - 1), batch=1, progress=stop)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 0 < manifest["n_tokens"] < tokens
    summary = harvest(big, tokens=tokens, out=out, shard_rows=10 * (CTX - 1), batch=1)
    assert summary["tokens"] == tokens and summary["complete"]
    assert summary["harvested"] == tokens - manifest["n_tokens"]
    np.testing.assert_array_equal(read_store(out), harvest(big, tokens=tokens))


def test_harvest_refuses_a_folder_holding_other_files(corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        harvest(corpus, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_harvest_bad_inputs(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"unknown hook 'blocks.9.hook_resid_post'.*valid hooks"
                                         r".*hook_resid_post.*0\.\.3"):
        harvest(corpus, hook="blocks.9.hook_resid_post")
    with pytest.raises(FileNotFoundError, match="no-such-model.gguf"):
        harvest(corpus, model=tmp_path / "no-such-model.gguf")
    with pytest.raises(FileNotFoundError, match="corpus .*no-such.txt' not found"):
        harvest(tmp_path / "no-such.txt")
    for bad in (0, -5):
        with pytest.raises(ValueError, match="tokens must be at least 1"):
            harvest(corpus, tokens=bad)
    with pytest.raises(ValueError, match="ctx"):
        harvest(corpus, ctx=1)
    with pytest.raises(ValueError, match="compute"):
        harvest(corpus, compute="f16")
    with pytest.raises(ValueError, match="out=DIR"):
        harvest(corpus, dtype="bf16")
    with pytest.raises(ValueError, match="hook is required"):
        sae_rs.harvest(model=TINY, corpus=corpus, tokens=10)
    assert not any(tmp_path.glob("acts*"))


# -- evaluate --------------------------------------------------------------------------------

def identity_sae() -> sae_rs.SAE:
    """A ReLU SAE whose reconstruction is exactly x: latents x+ and x-."""
    sae = sae_rs.SAE.init("relu", WIDTH, 2 * WIDTH)
    eye = np.eye(WIDTH, dtype=np.float32)
    return sae.with_params(W_enc=np.hstack([eye, -eye]), W_dec=np.vstack([eye, -eye]),
                           b_enc=np.zeros(2 * WIDTH), b_dec=np.zeros(WIDTH))


def random_sae(seed=0) -> sae_rs.SAE:
    rng = np.random.default_rng(seed)
    sae = sae_rs.SAE.init("relu", WIDTH, 128, seed=seed)
    return sae.with_params(W_enc=rng.normal(0, 0.2, (WIDTH, 128)),
                           W_dec=rng.normal(0, 0.2, (128, WIDTH)),
                           b_enc=rng.normal(-0.3, 0.1, 128))


def evaluate(sae, corpus, **kw):
    args = dict(model=TINY, hook=HOOK, corpus=corpus, tokens=10 * (CTX - 1), ctx=CTX,
                skip_tokens=0, progress=False)
    args.update(kw)
    return sae_rs.evaluate(sae, **args)


def test_evaluate_an_identity_sae_recovers_all_the_loss(corpus):
    r = evaluate(identity_sae(), corpus)
    assert r["ce_sae"] == pytest.approx(r["ce_clean"], abs=1e-4)
    assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert r["fvu"] < 1e-8 and r["delta_lm_loss"] == pytest.approx(0.0, abs=1e-4)
    # The tiny model is random, so zero ablation changes its loss without raising it for sure.
    assert abs(r["ce_zero"] - r["ce_clean"]) > 1e-3


def test_evaluate_metrics_match_the_sae_on_the_harvested_rows(corpus):
    # The evaluation text (no skip) is the text harvest reads, so its reconstruction metrics
    # are those of the same rows through SAE.metrics.
    sae = random_sae()
    r = evaluate(sae, corpus, batch=3)
    acts = harvest(corpus, tokens=10 * (CTX - 1))
    m = sae.metrics(acts)
    assert r["n_tokens"] == m["n_tokens"] == 10 * (CTX - 1) and r["n_contexts"] == 10
    for key in ("l0", "mse", "fvu", "gamma"):
        assert r[key] == pytest.approx(m[key], rel=1e-4), key
    assert r["firing"]["dead"] == int((m["fire_counts"] == 0).sum())
    assert r["delta_lm_loss"] == pytest.approx(r["ce_sae"] - r["ce_clean"], abs=1e-9)
    assert r["loss_recovered"] == pytest.approx(
        (r["ce_zero"] - r["ce_sae"]) / (r["ce_zero"] - r["ce_clean"]), rel=1e-9)
    assert (r["hook"], r["arch"], r["d_sae"], r["skip_tokens"]) == (HOOK, "relu", 128, 0)


def test_evaluate_a_path_writes_what_it_returns(corpus, tmp_path):
    random_sae().save(tmp_path / "sae")
    progress = []
    r = evaluate(tmp_path / "sae", corpus, out=tmp_path / "ev",
                 progress=lambda d, t: progress.append((d, t)))
    written = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert written == r
    assert (tmp_path / "ev" / "report.md").is_file()
    assert r["sae"] == str(tmp_path / "sae")
    # 4 forward passes per batch of 8 contexts: 10 contexts are 2 batches.
    assert progress[-1] == (8, 8)
    keys = {"sae", "arch", "d_in", "d_sae", "model", "hook", "corpus", "skip_tokens",
            "context_size", "n_contexts", "n_tokens", "l0", "mse", "fvu", "gamma", "ce_clean",
            "ce_sae", "ce_zero", "ce_mean_ablation", "delta_lm_loss", "loss_recovered",
            "loss_recovered_vs_mean", "firing", "max_norm", "n_unspliced", "compute"}
    assert set(r) == keys
    assert r["compute"] == "f32"


def test_evaluate_bad_inputs(corpus, tmp_path):
    sae = identity_sae()
    with pytest.raises(ValueError, match="valid hooks"):
        evaluate(sae, corpus, hook="blocks.7.hook_resid_post")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        evaluate(sae, corpus, model=tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no-such.txt"):
        evaluate(sae, tmp_path / "no-such.txt")
    with pytest.raises(ValueError, match="tokens must be at least 1"):
        evaluate(sae, corpus, tokens=0)
    with pytest.raises(ValueError, match="compute: unknown product precision 'f16'"):
        evaluate(sae, corpus, compute="f16")
    with pytest.raises(ValueError, match="skip_tokens"):
        evaluate(sae, corpus, skip_tokens=None)
    with pytest.raises(ValueError, match="names no hook"):
        evaluate(sae, corpus, hook=None)
    with pytest.raises(ValueError, match="d_in 32"):
        evaluate(sae_rs.SAE.init("relu", 32, 64), corpus)
    with pytest.raises(FileNotFoundError):
        sae_rs.evaluate(tmp_path / "no-sae", model=TINY, hook=HOOK, corpus=corpus)


# -- streaming training ----------------------------------------------------------------------

def batches_of(acts, rows, pulled):
    """Batches of `rows` rows, wrapping around forever, counting how many were taken."""
    i = 0
    while True:
        pulled.append(1)
        yield acts[(np.arange(rows) + i * rows) % len(acts)]
        i += 1


def test_train_pulls_batches_only_as_it_needs_them(corpus, tmp_path):
    acts = harvest(corpus, tokens=1000)
    pulled = []
    sae = sae_rs.train(batches_of(acts, 64, pulled), arch="relu", d_sae=128, l1=1.0,
                       steps=30, batch_size=64, init_sample=256, eval_tokens=128,
                       out=tmp_path / "s", progress=False)
    assert sae.d_in == WIDTH and sae.train_summary["steps"] == 30
    # 30 training batches; the samples read ahead at most 2 more.
    assert 30 <= len(pulled) <= 32


def test_train_on_an_iterator_that_runs_out(corpus, tmp_path):
    acts = harvest(corpus, tokens=320)
    batches = iter([acts[i:i + 64] for i in range(0, 320, 64)])
    with pytest.raises(ValueError, match="ended after 320 rows.*tokens=6400"):
        sae_rs.train(batches, arch="relu", d_sae=128, l1=1.0, tokens=6400, batch_size=64,
                     init_sample=128, eval_tokens=64, out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_train_raises_what_the_iterator_raises(tmp_path):
    def broken():
        yield np.zeros((64, 8), np.float32)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        sae_rs.train(broken(), arch="relu", d_sae=16, steps=10, batch_size=32,
                     init_sample=32, eval_tokens=32, out=tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="give tokens or steps"):
        sae_rs.train(iter([np.zeros((4, 8), np.float32)]), arch="relu", out=tmp_path / "t")
    with pytest.raises(ValueError, match=r"shape \[n, 8\]"):
        sae_rs.train(iter([np.zeros((64, 8), np.float32), np.zeros((64, 9), np.float32)]),
                     arch="relu", d_sae=16, steps=10, batch_size=32, init_sample=32,
                     eval_tokens=32, out=tmp_path / "u", progress=False)


# -- loss gradients (g-SAE) and training straight from the model ------------------------------

def shard_tensors(path: Path, shard: str) -> dict:
    """`name -> float32 array` of every tensor in one f32 shard (safetensors by hand)."""
    raw = (path / shard).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32"
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], np.float32).reshape(info["shape"])
    return out


# Small settings so that a few steps on the tiny model take well under a second.
SMALL_TRAIN = dict(d_sae=16, k=2, steps=3, batch_size=32, init_sample=64, eval_tokens=32,
                   progress=False)


def test_harvest_with_grad_stores_a_gradient_beside_each_activation(corpus, tmp_path):
    summary = harvest(corpus, out=tmp_path / "acts", shard_rows=100, with_grad=True)
    assert summary["complete"] and summary["shards"] > 1 and summary["grads"]
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["grads"]
    for shard in manifest["shards"]:
        t = shard_tensors(tmp_path / "acts", shard["file"])
        assert t["grads"].shape == t["activations"].shape
        assert np.isfinite(t["grads"]).all() and np.abs(t["grads"]).max() > 0
    # The activations are those of a harvest without gradients.
    np.testing.assert_array_equal(read_store(tmp_path / "acts"), harvest(corpus))


def test_harvest_with_grad_needs_a_store(corpus, tmp_path):
    with pytest.raises(ValueError, match="with_grad.*out=DIR"):
        harvest(corpus, with_grad=True)


def test_train_gsae_on_a_store_with_gradients(corpus, tmp_path):
    harvest(corpus, out=tmp_path / "acts", with_grad=True)
    sae = sae_rs.train(tmp_path / "acts", arch="gsae", out=tmp_path / "s", **SMALL_TRAIN)
    assert sae.arch == "gsae" and sae.d_in == WIDTH and sae.d_sae == 16
    assert sae.train_summary["steps"] == 3
    assert sae_rs.SAE.load(tmp_path / "s").arch == "gsae"


def test_train_gsae_on_a_store_without_gradients_is_refused(corpus, tmp_path):
    harvest(corpus, out=tmp_path / "acts")
    with pytest.raises(ValueError, match="with-grad|with_grad"):
        sae_rs.train(tmp_path / "acts", arch="gsae", out=tmp_path / "s", **SMALL_TRAIN)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("arch", ["topk", "gsae"])
def test_train_straight_from_the_model(corpus, tmp_path, arch):
    seen = []
    sae = sae_rs.train(arch=arch, model=TINY, hook=HOOK, corpus=corpus, ctx=CTX,
                       out=tmp_path / "s", **{**SMALL_TRAIN, "progress": seen.append})
    assert sae.arch == arch and sae.d_in == WIDTH and sae.train_summary["steps"] == 3
    meta = sae.cfg["metadata"]
    assert meta["hook_name"] == HOOK and meta["context_size"] == CTX
    # Progress counts the training rows (rows left out for their norm are drawn on top).
    assert seen[-1] >= 3 * 32


def test_train_from_the_model_bad_inputs(corpus, tmp_path):
    def train(**kw):
        args = dict(arch="topk", model=TINY, hook=HOOK, corpus=corpus, ctx=CTX,
                    out=tmp_path / "s", **SMALL_TRAIN)
        args.update(kw)
        return sae_rs.train(**args)

    with pytest.raises(ValueError, match="sae train --model M --hook a,b"):
        train(hook=f"{HOOK},blocks.2.hook_resid_post")
    with pytest.raises(ValueError, match="needs hook="):
        train(hook=None)
    with pytest.raises(ValueError, match="valid hooks"):
        train(hook="blocks.9.hook_resid_post")
    with pytest.raises(FileNotFoundError, match="no-such-model.gguf"):
        train(model=tmp_path / "no-such-model.gguf")
    with pytest.raises(FileNotFoundError, match="no-such.txt"):
        train(corpus=tmp_path / "no-such.txt")
    assert not (tmp_path / "s").exists()
