#!/usr/bin/env bash
# The test command of the README: create/refresh .venv, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
exec .venv/bin/python -m pytest tests "$@"
