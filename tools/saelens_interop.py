#!/usr/bin/env python3
"""Checks that SAE files pass both ways between sae_rs (this repository's Python package) and
SAELens, with the same encode and decode.

    python3 tools/saelens_interop.py [--venv DIR] [--torch-index URL]

Not part of CI: it makes its own venv (default target/saelens-interop, several GB with
PyPI's torch) with SAELens, torch and sae_rs built from ./python, then re-runs itself there. For each family:

* ours -> SAELens: a random SAE made and saved with sae_rs, loaded with
  `sae_lens.SAE.load_from_disk`;
* SAELens -> ours: a random SAE made with `sae_lens.SAE.from_dict` and `save_model`, loaded with
  `sae_rs.SAE.load`;

and prints the max abs difference of encode (on the same random inputs) and of decode (of the
same codes). A family one side cannot read is reported with the error, and makes the exit
status 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
D_IN, D_SAE, K, ROWS = 64, 256, 16, 512


def make_venv(venv: Path, torch_index: Optional[str]) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    probe = subprocess.run([str(py), "-c", "import torch, sae_lens"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run(pip + ["--upgrade", "pip"], check=True)
        if torch_index:
            # e.g. the CPU build of torch: a fraction of the CUDA one's size.
            subprocess.run(pip + ["torch", "--index-url", torch_index], check=True)
        subprocess.run(pip + ["sae-lens", "maturin", "numpy"], check=True)
    # Always rebuilt, so the check is of this checkout; the venv's maturin must be on PATH.
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run(pip + ["--no-build-isolation", "--force-reinstall", "--no-deps",
                          str(ROOT / "python")], check=True, env=env)
    return py


def random_ours(arch: str, rng):
    import numpy as np
    import sae_rs

    sae = sae_rs.SAE.init(arch, D_IN, D_SAE, k=K, seed=1)
    new = {}
    for name, t in sae.tensors.items():
        if name == "threshold":
            new[name] = rng.uniform(0.0, 0.3, t.shape)
        elif name in ("W_enc", "W_dec"):
            new[name] = rng.normal(0, 1 / np.sqrt(D_IN), t.shape)
        else:
            new[name] = rng.normal(0, 0.2, t.shape)
    if arch == "mp":
        # Matching pursuit encodes with its dictionary: the encoder is tied to it.
        new["W_enc"] = new["W_dec"].T
    return sae.with_params(**new)


def random_saelens(arch: str, seed: int):
    import torch
    from sae_lens import SAE

    torch.manual_seed(seed)
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True}
    if arch in ("topk", "abstopk"):
        cfg["k"] = K
    sae = SAE.from_dict(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1 / D_IN ** 0.5)
            elif "threshold" in name:
                p.uniform_(0.0, 0.3)
            else:
                p.normal_(0, 0.2)
    return sae


def why(e: Exception, width: int) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:width] if text else '(no message)'}"


def compare(ours, theirs, rng) -> tuple[float, float, float]:
    import numpy as np
    import torch

    x = rng.normal(size=(ROWS, D_IN)).astype(np.float32)
    with torch.no_grad():
        f_theirs = theirs.encode(torch.from_numpy(x)).numpy()
        f_ours = ours.encode(x)
        enc = float(np.abs(f_ours - f_theirs).max())
        # Decode the same code on both sides.
        dec = float(np.abs(ours.decode(f_theirs)
                           - theirs.decode(torch.from_numpy(f_theirs)).numpy()).max())
    active = np.count_nonzero(f_ours) / ROWS
    return enc, dec, active


def inside() -> int:
    import numpy as np
    import sae_lens
    import sae_rs
    from sae_lens import SAE

    rng = np.random.default_rng(0)
    print(f"SAELens {sae_lens.__version__}, sae_rs {sae_rs.__version__}")
    print(f"d_in {D_IN}, d_sae {D_SAE}, k {K}, {ROWS} random rows; max abs differences\n")
    print(f"{'direction':<10} {'family':<16} {'saved as':<18} {'encode':>10} {'decode':>10} "
          f"{'L0':>6}")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for arch in sae_rs.architectures():
            path = Path(tmp) / f"ours-{arch}"
            ours = random_ours(arch, rng)
            ours.save(path)
            saved_as = ours.cfg["architecture"]
            try:
                theirs = SAE.load_from_disk(str(path), device="cpu")
                enc, dec, l0 = compare(ours, theirs, rng)
                print(f"{'ours->SL':<10} {arch:<16} {saved_as:<18} {enc:>10.2e} {dec:>10.2e} "
                      f"{l0:>6.1f}")
            except Exception as e:  # noqa: BLE001 - the report names what failed
                failures += 1
                print(f"{'ours->SL':<10} {arch:<16} {saved_as:<18} SAELens cannot load it: "
                      f"{why(e, 100)}")
        from sae_lens.registry import SAE_CLASS_REGISTRY

        # Transcoders map to another layer's output: not SAEs, so not files this reads.
        for arch in sorted(a for a in SAE_CLASS_REGISTRY if "transcoder" not in a):
            path = Path(tmp) / f"saelens-{arch}"
            try:
                theirs = random_saelens(arch, seed=2)
                theirs.save_model(path)
            except Exception as e:  # noqa: BLE001
                print(f"{'SL->ours':<10} {arch:<16} {'-':<18} SAELens cannot make one with "
                      f"defaults: {why(e, 80)}")
                continue
            try:
                ours = sae_rs.SAE.load(path)
                enc, dec, l0 = compare(ours, theirs, rng)
                print(f"{'SL->ours':<10} {arch:<16} {'read as ' + ours.arch:<18} {enc:>10.2e} "
                      f"{dec:>10.2e} {l0:>6.1f}")
            except Exception as e:  # noqa: BLE001
                failures += 1
                print(f"{'SL->ours':<10} {arch:<16} {'-':<18} sae_rs cannot load it: "
                      f"{why(e, 100)}")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=ROOT / "target" / "saelens-interop")
    ap.add_argument("--torch-index", default=None,
                    help="pip index to take torch from (default: PyPI's, with its CUDA libraries)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside:
        return inside()
    py = make_venv(args.venv, args.torch_index)
    return subprocess.run([str(py), __file__, "--inside"], env=dict(os.environ)).returncode


if __name__ == "__main__":
    sys.exit(main())
