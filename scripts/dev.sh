#!/usr/bin/env bash
# One entry point for set-up and every routine task; needs only python3.11 (with venv/pip) and bash.
#   bash scripts/dev.sh repro   install everything, then run the whole DVC pipeline (dvc repro)
#   bash scripts/dev.sh test    install everything, then run the test suite
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
  # uv.lock pins every package; --frozen refuses to drift from it.
  .tools/bin/uv sync --frozen --extra dev --python "$PY" --quiet
  export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
  if [ ! -d .git ]; then git init -q; fi
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  install) bootstrap ;;
  repro) bootstrap; dvc repro "$@" ;;
  test) bootstrap; python -m pytest "$@" ;;
  lint) bootstrap; ruff check . && ruff format --check . ;;
  bench) bootstrap; python bench/run.py "$@" ;;
  *) sed -n '2,6p' "$0"; exit 2 ;;
esac
