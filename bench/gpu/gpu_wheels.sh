#!/usr/bin/env bash
# On a CPU machine with PyPI: fill .gpu/ (git-ignored, at most 64 MiB) with what a bare GPU
# machine lacks for bench/gpu/gpu_check.py, and print its size. Then, on the GPU machine, with the
# working tree and .gpu/ copied there:
#   bash bench/gpu/gpu_install.sh
#   PYTHONPATH=/tmp/site:src python bench/gpu/gpu_check.py --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/dev.sh install
.venv/bin/python bench/gpu/gpu_bundle.py "$@"
