#!/usr/bin/env bash
# The test command of the README: create/refresh .venv, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
# vLLM's own environment for tests/test_vllm.py (once; it skips with the reason if this fails)
bash scripts/setup-vllm-venv.sh || echo "scripts/setup-vllm-venv.sh failed: tests/test_vllm.py will be skipped" >&2
# lint and format (pyproject.toml [tool.ruff]) before the tests
.venv/bin/ruff check plugin tests benchmarks examples
.venv/bin/ruff format --check plugin tests benchmarks examples
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
exec .venv/bin/python -m pytest tests "$@"
