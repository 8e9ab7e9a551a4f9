#!/usr/bin/env bash
# One entry point for set-up and every routine task; needs only python3.11 (with venv/pip) and bash.
#   bash scripts/dev.sh repro   install everything, then run the whole DVC pipeline (dvc repro)
#   bash scripts/dev.sh test    install everything, then run the test suite
#   bash scripts/dev.sh cpu-paths   re-run the tolerance-sensitive tests on every CPU code path this CPU can emulate
#   bash scripts/dev.sh docs        build the documentation site strictly (broken links fail) into site/
#   bash scripts/dev.sh docs-serve  serve it on http://127.0.0.1:8000
#   bash scripts/dev.sh lint | bench | shell-env
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"

bootstrap() {
  if [ ! -x .tools/bin/uv ]; then
    "$PY" -m venv .tools
    .tools/bin/python -m pip install -q --disable-pip-version-check "uv==${UV_VERSION}"
  fi
  # uv.lock pins every package; --frozen refuses to drift from it. --compile-bytecode writes the
  # .pyc files once here: where Python may not write them (PYTHONDONTWRITEBYTECODE, read-only
  # environments) every stage, experiment and DDP rank would otherwise compile its imports from
  # source (bench/speed/startup.py: 2.2-2.9x the import time).
  .tools/bin/uv sync --frozen --extra dev --python "$PY" --quiet --compile-bytecode
  export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
  if [ ! -d .git ]; then git init -q; fi
}

# The kernels other CPUs run, emulated downward: PyTorch's own vectorised kernels (ATen) and
# oneDNN's convolutions / matmuls each capped at an older instruction set. Tests marked
# `cpu_paths` (float comparisons) must pass under every one of them.
cpu_paths() {
  # every path strictly below this CPU's own (the native one is the main suite's run)
  local flags paths=()
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 || true) "
  has() { [[ "$flags" == *" $1 "* ]]; }
  if has avx2 || has avx512f; then paths+=("ATEN_CPU_CAPABILITY=default"); fi
  if has avx512f; then paths+=("ATEN_CPU_CAPABILITY=avx2" "ONEDNN_MAX_CPU_ISA=AVX2"); fi
  if has avx512_bf16 || has amx_bf16; then paths+=("ONEDNN_MAX_CPU_ISA=AVX512_CORE"); fi
  if has amx_bf16; then paths+=("ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16"); fi
  local failed=0 summary=()
  for path in "${paths[@]}"; do
    echo "== cpu path: $path"
    local log rc=0
    log="$(mktemp)"
    # inductor's on-disk cache is not keyed on ATEN_CPU_CAPABILITY: kernels built for one path crash
    # another, so an ATen path gets a cache of its own. oneDNN's kernels are JIT-built at run time
    # for the capped ISA and never land in inductor's cache, so oneDNN paths share the native one.
    # The ATen caches live with the user's other caches, so a second run on the same machine is warm.
    local cache=()
    if [[ "$path" == ATEN_* ]]; then
      cache=("TORCHINDUCTOR_CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/sdvae/inductor/${path//[^A-Za-z0-9]/_}")
    fi
    env "$path" "${cache[@]}" python -m pytest -m cpu_paths -q -p no:cacheprovider "$@" 2>&1 | tee "$log" || rc=$?
    summary+=("$path: $(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -1 | tr -d '=' | sed 's/^ *//' || true) (exit $rc)")
    rm -f "$log"
    if [ "$rc" -ne 0 ]; then failed=1; fi
  done
  printf '%s\n' "== cpu paths" "${summary[@]}"
  return "$failed"
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  install) bootstrap ;;
  repro) bootstrap; dvc repro "$@" ;;
  test) bootstrap; python -m pytest "$@" ;;
  cpu-paths) bootstrap; cpu_paths "$@" ;;
  lint) bootstrap; ruff check . && ruff format --check . ;;
  bench) bootstrap; python bench/run.py "$@" ;;
  docs) bootstrap; NO_MKDOCS_2_WARNING=1 mkdocs build --strict "$@" ;;
  docs-serve) bootstrap; NO_MKDOCS_2_WARNING=1 mkdocs serve "$@" ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
