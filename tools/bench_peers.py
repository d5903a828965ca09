#!/usr/bin/env python3
"""Same-run speed against the peers: SAELens training and transformers harvest beside `sae`.

    python3 tools/bench_peers.py target/release/sae [--model-dir ~/.cache/sae/smollm2-135m]
        [--venv DIR] [--torch-index URL] [--rounds 2] [--steps 5] [--d-sae 4608,9216]
        [--archs relu,gated,topk,jumprelu,batchtopk,matryoshka] [--harvest-tokens 8000]
        [--skip-train] [--skip-harvest]

Not part of CI. It makes its own venv (default target/bench-peers; several GB with PyPI's torch;
--torch-index https://download.pytorch.org/whl/cpu takes the much smaller CPU build where that
index is reachable) with SAELens, transformers and gguf, then re-runs itself there.

Training: for every family SAELens shares with us, at d_in 576, batch 4096 and each d_sae, the
median tokens/s of SAELens' own training step (`SAETrainer.step`: forward, loss, backward, grad
clipping, Adam, lr and coefficient schedules, dead-latent counters; f32, random activations)
against `sae bench` at L0 64 (k = 64 for the k families; the PyTorch step is dense, so its cost
does not depend on the L0), and beside it our encoder product alone (`sae bench`'s one-GEMM
column, timed in the same run) as a multiple of SAELens' step: no step of ours runs faster than
that product, so where it is under 10x, so is every step. Harvest: SmolLM2-135M to
blocks.15.hook_resid_post, 128-token contexts, transformers f32 and bf16 against `sae harvest --compute f32`, `--compute bf16x3`
(three bf16 products per product, ~16 significant bits per operand) and `--compute bf16`
(tools/bench_hf_harvest.py does the timing). Every configuration runs --rounds times, the two
sides alternating, and the best of each is kept: on a busy machine the best run is the one least
slowed by others. Both sides use the same thread count (torch's; RAYON_NUM_THREADS for ours).
The CPU's model, flags and the load average are printed with the tables.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
D_IN, BATCH, L0 = 576, 4096, 64
# Our family name -> SAELens training config class (module, class) and its sparsity settings.
SAELENS = {
    "relu": ("standard_sae", "StandardTrainingSAEConfig", {"l1_coefficient": 5.0}),
    "gated": ("gated_sae", "GatedTrainingSAEConfig", {"l1_coefficient": 5.0}),
    "topk": ("topk_sae", "TopKTrainingSAEConfig", {"k": L0}),
    "jumprelu": ("jumprelu_sae", "JumpReLUTrainingSAEConfig", {"l0_coefficient": 5.0}),
    "batchtopk": ("batchtopk_sae", "BatchTopKTrainingSAEConfig", {"k": L0}),
    "matryoshka": ("matryoshka_batchtopk_sae", "MatryoshkaBatchTopKTrainingSAEConfig", {"k": L0}),
}
TRAINING_SAE = {
    "StandardTrainingSAEConfig": "StandardTrainingSAE",
    "GatedTrainingSAEConfig": "GatedTrainingSAE",
    "TopKTrainingSAEConfig": "TopKTrainingSAE",
    "JumpReLUTrainingSAEConfig": "JumpReLUTrainingSAE",
    "BatchTopKTrainingSAEConfig": "BatchTopKTrainingSAE",
    "MatryoshkaBatchTopKTrainingSAEConfig": "MatryoshkaBatchTopKTrainingSAE",
}


def in_venv() -> bool:
    try:
        import sae_lens  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


def make_venv(venv: Path, torch_index: str | None) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(py), "-c", "import torch, sae_lens, transformers, gguf"],
                           capture_output=True)
    if probe.returncode != 0:
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["--upgrade", "pip"], check=True)
        if torch_index:
            subprocess.run(pip + ["torch", "--index-url", torch_index], check=True)
        subprocess.run(pip + ["sae-lens", "transformers", "gguf"], check=True)
    return py


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_line() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = cpu_flags()
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "amx_tile", "amx_bf16", "amx_int8"]
    have = [f for f in wanted if f in flags]
    return f"{model}, {os.cpu_count()} logical CPUs; flags: {' '.join(have) or 'none of interest'}"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def saelens_rate(arch: str, d_sae: int, steps: int) -> float:
    """Median tokens/s of SAELens' training step, after two warm-up steps."""
    import importlib

    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    module, cfg_name, sparsity = SAELENS[arch]
    mod = importlib.import_module(f"sae_lens.saes.{module}")
    extra = dict(sparsity)
    if arch == "matryoshka":
        extra["matryoshka_widths"] = [d_sae // 32, d_sae // 8, d_sae // 2, d_sae]
    cfg = getattr(mod, cfg_name)(d_in=D_IN, d_sae=d_sae, dtype="float32", device="cpu", **extra)
    sae = getattr(mod, TRAINING_SAE[cfg_name])(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(BATCH, D_IN, generator=gen) for _ in range(4)]
    trainer_cfg = SAETrainerConfig(total_training_samples=BATCH * (steps + 10),
                                   train_batch_size_samples=BATCH, lr=3e-4,
                                   lr_end=3e-4)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(batches))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        trainer.step(batches[i % len(batches)])
        trainer.n_training_steps += 1
        if i >= 2:
            times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times)


def ours_rate(sae_bin: str, arch: str, d_sae: int, steps: int, threads: int,
              precision: str) -> tuple[float, float]:
    """`sae bench`'s tokens/s for full steps and for the encoder product alone (its one-GEMM
    limit, timed in the same run: no step can be faster)."""
    proc = subprocess.run(
        [sae_bin, "bench", "--archs", arch, "--d-sae", str(d_sae), "--d-in", str(D_IN),
         "--batch", str(BATCH), "--l0", str(L0), "--steps", str(steps),
         "--precision", precision],
        capture_output=True, text=True, env=os.environ | {"RAYON_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise SystemExit(f"sae bench failed:\n{proc.stderr}")
    for line in proc.stdout.splitlines():
        cols = line.split()
        if cols and cols[0] == arch and len(cols) >= 6:
            return float(cols[4]), float(cols[5])
    raise SystemExit(f"no {arch} row in sae bench's output:\n{proc.stdout}")


def bench_train(a, threads: int) -> None:
    d_saes = [int(d) for d in a.d_sae.split(",")]
    archs = a.archs.split(",")
    unknown = [x for x in archs if x not in SAELENS]
    if unknown:
        raise SystemExit(f"--archs: {unknown} not shared with SAELens; choose from {list(SAELENS)}")
    precisions = a.precision.split(",")
    print(f"\n## Training: d_in {D_IN}, batch {BATCH}, L0 {L0}, SAELens in f32, ours in "
          f"{', '.join(precisions)}, {threads} threads, median of {a.steps} steps, best of "
          f"{a.rounds} round(s)")
    rows = []
    for d_sae in d_saes:
        for arch in archs:
            peer, ours, limit = [], {p: [] for p in precisions}, {p: [] for p in precisions}
            for r in range(a.rounds):
                peer.append(saelens_rate(arch, d_sae, a.steps))
                for p in precisions:
                    step, product = ours_rate(a.sae_bin, arch, d_sae, a.steps, threads, p)
                    ours[p].append(step)
                    limit[p].append(product)
                mine = ", ".join(f"{p} {ours[p][-1]:.0f}" for p in precisions)
                print(f"  round {r + 1}: {arch} d_sae {d_sae}: SAELens {peer[-1]:.0f}, "
                      f"ours {mine} tokens/s (load {loadavg()})", flush=True)
            rows.append((arch, d_sae, max(peer), [(max(ours[p]), max(limit[p]))
                                                  for p in precisions]))
    # The product alone against SAELens: where it is under 10x, no step of ours can reach 10x.
    head = " | ".join(f"sae {p} tokens/s | ratio | {p} product alone, ratio" for p in precisions)
    print(f"\n| family | d_sae | SAELens f32 tokens/s | {head} |")
    print("|---|---|---|" + "---|---|---|" * len(precisions))
    for arch, d_sae, peer_rate, mine in rows:
        cells = " | ".join(f"{o:,.0f} | {o / peer_rate:.1f}x | {g / peer_rate:.1f}x"
                           for o, g in mine)
        print(f"| {arch} | {d_sae} | {peer_rate:,.0f} | {cells} |")


def bench_harvest(a, threads: int) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    import torch
    import bench_hf_harvest as hh

    print(f"\n## Harvest: SmolLM2-135M to blocks.{hh.LAYER}.hook_resid_post, context {hh.CTX}, "
          f"about {a.harvest_tokens} tokens, {threads} threads, best of {a.rounds} round(s)")
    f32 = hh.load_hf(a.model_dir, torch.float32)
    bf16 = hh.load_hf(a.model_dir, torch.bfloat16)
    runs = {
        "transformers f32": lambda: hh.bench_hf(f32, a.harvest_tokens, a.harvest_batch),
        "transformers bf16": lambda: hh.bench_hf(bf16, a.harvest_tokens, a.harvest_batch),
        "sae harvest --compute f32": lambda: hh.bench_ours(
            a.sae_bin, a.harvest_tokens, a.harvest_batch, ("--compute", "f32")),
    }
    if "avx512_bf16" in cpu_flags():
        for compute in ("bf16x3", "bf16"):
            runs[f"sae harvest --compute {compute}"] = (
                lambda c=compute: hh.bench_ours(
                    a.sae_bin, a.harvest_tokens, a.harvest_batch, ("--compute", c)))
    else:
        print("  (no `sae harvest --compute bf16` or `bf16x3`: they need AVX512-BF16, which this "
              "CPU lacks)")
    rates = {name: [] for name in runs}
    for r in range(a.rounds):
        for name, run in runs.items():
            rates[name].append(run())
            print(f"  round {r + 1}: {name}: {rates[name][-1]:.0f} tokens/s (load {loadavg()})",
                  flush=True)
    best = {name: max(v) for name, v in rates.items()}
    print("\n| harvest | tokens/s | vs transformers f32 | vs transformers bf16 |")
    print("|---|---|---|---|")
    for name, v in best.items():
        print(f"| {name} | {v:,.0f} | {v / best['transformers f32']:.2f}x "
              f"| {v / best['transformers bf16']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sae_bin", help="the sae binary to time (a release build)")
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache/sae/smollm2-135m"),
                    help="folder holding SmolLM2-135M-Instruct.Q4_1.gguf (run `sae harvest` "
                         "once to fill the default)")
    ap.add_argument("--venv", default=str(ROOT / "target/bench-peers"))
    ap.add_argument("--torch-index", help="pip index for torch, e.g. the CPU-only build's")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    ap.add_argument("--d-sae", default="4608,9216")
    ap.add_argument("--archs", default=",".join(SAELENS))
    ap.add_argument("--harvest-tokens", type=int, default=8000)
    ap.add_argument("--harvest-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, help="threads on both sides (default: torch's)")
    ap.add_argument("--precision", default="f32",
                    help="comma-separated precisions of our side (f32, bf16, bf16-sparse, f32-bf16-sparse, "
                         "f32-screened, bf16x3); "
                         "SAELens trains in f32")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-harvest", action="store_true")
    a = ap.parse_args()
    if not Path(a.sae_bin).is_file():
        raise SystemExit(f"{a.sae_bin}: no such binary; build it with `cargo build --release -p sae-cli`")
    if not in_venv():
        py = make_venv(Path(a.venv), a.torch_index)
        os.execv(str(py), [str(py), __file__, *sys.argv[1:]])
    import sae_lens
    import torch
    import transformers

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    print(f"# Same-run peer benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"CPU: {cpu_line()}")
    print(f"torch {torch.__version__}, SAELens {sae_lens.__version__}, transformers "
          f"{transformers.__version__}; sae: {a.sae_bin}; load average {loadavg()}")
    if not a.skip_train:
        bench_train(a, threads)
    if not a.skip_harvest:
        if not (Path(a.model_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
            raise SystemExit(f"{a.model_dir}: no SmolLM2-135M-Instruct.Q4_1.gguf; run `sae harvest` "
                             "once (it fills ~/.cache/sae/smollm2-135m) or pass --model-dir")
        bench_harvest(a, threads)
    print(f"\nload average at the end: {loadavg()}")


if __name__ == "__main__":
    main()
