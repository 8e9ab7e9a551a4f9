#!/usr/bin/env bash
# On the GPU machine: install .gpu/wheels (bench/gpu/gpu_wheels.sh) into /tmp/site, for
#   PYTHONPATH=/tmp/site:src python bench/gpu/gpu_check.py --out "$OUT"
# A machine with its own huggingface_hub keeps it: its transformers pins a range (seen on an H200:
# 'huggingface-hub>=1.5.0,<2.0 is required ... but found 2.4.0'), and torchmetrics imports
# transformers whenever it is installed, so the bundled hub would break every import of lightning.
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels=(.gpu/wheels/*.whl)
if python -c "import huggingface_hub" 2>/dev/null; then
  kept=()
  for w in "${wheels[@]}"; do [[ "$(basename "$w")" == huggingface_hub-* ]] || kept+=("$w"); done
  wheels=("${kept[@]}")
  echo "keeping this machine's huggingface_hub $(python -c 'import huggingface_hub as h; print(h.__version__)')"
fi
pip install -q --no-index --no-deps --target /tmp/site "${wheels[@]}"
