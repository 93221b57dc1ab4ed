#!/usr/bin/env bash
# The reference GPU benchmark: 8 real-size layers of Qwen3.5-35B-A3B (6 GDN + 2 attention), 4-bit,
# context 1024, mlx-lm side by side. Needs MLX's CUDA build (pip install "mlx[cuda13]") and mlx-lm.
# usage: scripts/gpu_bench.sh OUT_DIR [more `specdec bench` options, e.g. --arch qwen3-next-80b-a3b]
# On a fresh machine MLX compiles its CUDA kernels on first use: the first prefill took ~160 s on an H200,
# so allow ~6 minutes in all. Writes OUT_DIR/bench.json (updated after each section, so a cut-off run keeps what it measured)
# and OUT_DIR/bench.log.
set -euo pipefail
out=${1:?usage: scripts/gpu_bench.sh OUT_DIR [options]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m specdec.cli bench --arch qwen3.5-35b-a3b --layers 8 --bits 4 --context 1024 \
  --output "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
