#!/bin/bash
# Our products against oneDNN and OpenBLAS on the same shapes, rounds interleaved so that both
# see the same machine load: `bash tools/bench_libs.sh [THREADS] [ROUNDS]`.
# Needs Debian's libdnnl-dev and libopenblas-dev (apt-get install libdnnl-dev libopenblas-dev)
# and g++; neither library is used by the product. Not part of CI.
set -euo pipefail
threads=${1:-2}
rounds=${2:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
bin=$(mktemp -d)/bench_libs
g++ -O2 -std=c++17 "$root/tools/bench_libs.cpp" -ldnnl -lopenblas -o "$bin"
(cd "$root" && cargo build --release -q -p sae-core --example bf16_product \
  -p sae-lm --example product_speed)
grep -m1 "model name" /proc/cpuinfo
grep -m1 flags /proc/cpuinfo | tr ' ' '\n' |
  grep -E "^(avx2|fma|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|amx_bf16|amx_tile)$" |
  tr '\n' ' '
echo
dpkg-query -W -f='${Package} ${Version}\n' libdnnl-dev libopenblas-dev 2>/dev/null || true
export OMP_NUM_THREADS=$threads RAYON_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads
for r in $(seq "$rounds"); do
  echo "== round $r, $threads threads; load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$bin" 7
  for d_sae in 4608 9216; do
    "$target/release/examples/bf16_product" 4096 576 "$d_sae" 7
  done
  "$target/release/examples/product_speed" 7
done
echo "== done; load $(cut -d' ' -f1-3 /proc/loadavg)"
