#!/usr/bin/env bash
# The project's test command (README, .ci/run): the Rust workspace's tests, then the Python
# package's, built and installed into .venv (created here if missing).
set -euo pipefail
cd "$(dirname "$0")"

cargo test --workspace

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -c "import maturin, numpy, pytest" 2>/dev/null \
    || .venv/bin/pip install -q maturin numpy pytest
# Without build isolation the venv's maturin (found on PATH) builds it; python/target is reused.
PATH="$PWD/.venv/bin:$PATH" .venv/bin/pip install -q --no-build-isolation ./python
.venv/bin/python -m pytest -q python/tests
