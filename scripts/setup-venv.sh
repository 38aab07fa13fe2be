#!/usr/bin/env bash
# Create .venv in the repo root and install the package with everything it needs.
# torch and torchvision come first and as a pair: PyPI's torchvision does not import beside
# the local CPU-only torch wheel, while the registry's torch 2.13.0 build (CUDA, also runs on
# CPU) and torchvision 0.28.0 work together; axolotl 0.19.0 allows torch <= 2.13.0.
# --no-cache-dir: the venv alone takes about 7 GB, and CI has run out of disk during this
# install before; a cached second copy of the wheels only adds to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import axolotl_minicpmv, axolotl, timm, deepspeed, openai, playwright" 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
  .venv/bin/python -m pip install -q --no-cache-dir "torch===2.13.0" "torchvision==0.28.0"
  .venv/bin/python -m pip install -q --no-cache-dir -e ".[test]"
fi
