#!/usr/bin/env bash
# Create .venv and install unet-volume with its test, docs and bioimageio extras. Idempotent: it reinstalls only
# when pyproject.toml changed. torch goes first, pinned to the CPU build (override with
# TORCH_SPEC, e.g. TORCH_SPEC=torch for your CUDA build), so pip never pulls a multi-GB
# CUDA build as a side effect of the package's own `torch` range.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f $stamp ]]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,docs,bioimageio]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
