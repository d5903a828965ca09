#!/usr/bin/env python3
"""Harvest speed: Hugging Face transformers (PyTorch CPU) vs `sae harvest`, same run.

Both run SmolLM2-135M-Instruct (the Q4_1 GGUF dequantised to f32) over 128-token contexts and
stop at layer 15 (blocks.15.hook_resid_post); tokens/s counts stored rows (127 per context,
BOS left out), as `sae harvest` does.

    /work/venv-hf/bin/python tools/bench_hf_harvest.py ~/.cache/sae/smollm2-135m \
        target/release/sae [--tokens 200000] [--batch 16] [--bf16] [--before OLD_SAE_BIN] [--threads N] [--rounds N]

MODEL_DIR is any folder holding the GGUF (the cache `sae` fills on first use will do); the venv
needs torch, transformers and gguf from pip. The HF side times forward passes only (after one
warm-up batch), on random token ids; ours is the tokens/s `sae harvest` prints (model forward +
shard writing, after model load and tokenization). --bf16 adds transformers with bf16 weights
and `sae harvest --compute bf16`; --before adds another `sae` binary (f32, and bf16 with --bf16)
for a before/after.
Both sides use the same number of threads (torch's, else --threads; RAYON_NUM_THREADS for ours).
--rounds N times every configuration N times, interleaved, and reports the best of each: on a
machine others are using, the best is the run least slowed by them.
"""
import argparse
import os
import re
import subprocess
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, GgufConfig

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYER = 15
CTX = 128


def load_hf(model_dir, dtype):
    torch.set_grad_enabled(False)
    # Recent transformers keep GGUF weights in their quantized blocks (matmuls dequantize on
    # the fly) unless told otherwise; the comparison is with a plain dense model.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=GGUF, dtype=dtype, quantization_config=GgufConfig(dequantize=True))
    model.eval()
    proj = model.model.layers[0].mlp.gate_proj
    if type(proj) is not torch.nn.Linear or proj.weight.dtype != dtype:
        raise SystemExit(f"transformers did not load a dense {dtype} model: {type(proj)}, {proj.weight.dtype}")
    body = model.model
    body.layers = body.layers[: LAYER + 1]  # stop at the hooked layer
    return body


def bench_hf(body, n_tokens, batch):
    gen = torch.Generator().manual_seed(0)
    n_batches = max(1, n_tokens // (batch * (CTX - 1)))
    ids = torch.randint(3, body.config.vocab_size, (n_batches + 1, batch, CTX), generator=gen)
    with torch.inference_mode():
        body(ids[0])  # warm-up
        start = time.perf_counter()
        for i in range(1, n_batches + 1):
            out = body(ids[i], output_hidden_states=True)
            _ = out.hidden_states[LAYER + 1][:, 1:].contiguous()  # layer-15 resid_post, no BOS
        seconds = time.perf_counter() - start
    rows = n_batches * batch * (CTX - 1)
    return rows / seconds


def bench_ours(sae_bin, n_tokens, batch, extra=()):
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sae_bin, "harvest", "--model", "smollm2-135m", "--hook", f"blocks.{LAYER}.hook_resid_post",
             "--corpus", "python-docs", "--tokens", str(n_tokens), "--ctx", str(CTX), "--batch", str(batch),
             "--out", out + "/acts", *extra],
            capture_output=True, text=True, env=os.environ | {"RAYON_NUM_THREADS": str(torch.get_num_threads())})
        if proc.returncode != 0:
            raise SystemExit("sae harvest failed:\n" + proc.stderr)
        m = re.search(r"harvested (\d+) tokens .* in ([\d.]+)s: (\d+) tokens/s", proc.stdout)
        return float(m.group(3))


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("sae_bin")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--bf16", action="store_true", help="also bf16 on both sides")
    ap.add_argument("--before", help="another sae binary to time (f32), e.g. an older build")
    ap.add_argument("--threads", type=int, help="threads on both sides (default: torch's)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every configuration this many times, interleaved (a busy machine)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {loadavg()}")
    runs = {"transformers f32": lambda body=load_hf(a.model_dir, torch.float32): bench_hf(body, a.tokens, a.batch)}
    if a.bf16:
        runs["transformers bf16"] = lambda body=load_hf(a.model_dir, torch.bfloat16): bench_hf(body, a.tokens, a.batch)
    runs["sae harvest f32"] = lambda: bench_ours(a.sae_bin, a.tokens, a.batch)
    if a.bf16:
        runs["sae harvest --compute bf16"] = lambda: bench_ours(a.sae_bin, a.tokens, a.batch, ("--compute", "bf16"))
    if a.before:
        runs[f"{a.before} f32"] = lambda: bench_ours(a.before, a.tokens, a.batch)
        if a.bf16:
            runs[f"{a.before} --compute bf16"] = lambda: bench_ours(a.before, a.tokens, a.batch, ("--compute", "bf16"))
    rates = {name: [] for name in runs}
    for r in range(a.rounds):
        for name, run in runs.items():
            rates[name].append(run())
            print(f"round {r + 1}: {name}: {rates[name][-1]:.0f} tokens/s (load average {loadavg()})", flush=True)
    best_hf = max(rates["transformers f32"])
    print(f"best of {a.rounds} round(s), about {a.tokens} tokens each:")
    best_bf16 = max(rates.get("transformers bf16", [0.0]))
    for name, rs in rates.items():
        vs_bf16 = f", {max(rs) / best_bf16:.2f}x transformers bf16" if best_bf16 else ""
        print(f"  {name}: {max(rs):.0f} tokens/s = {max(rs) / best_hf:.2f}x transformers f32{vs_bf16}")
    if a.rounds > 1 and best_bf16:
        print("round by round, against transformers bf16 of the same round:")
        for name, rs in rates.items():
            ratios = " / ".join(f"{x / y:.2f}" for x, y in zip(rs, rates["transformers bf16"]))
            print(f"  {name}: {ratios}")


if __name__ == "__main__":
    main()
