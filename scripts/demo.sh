#!/usr/bin/env bash
# The main job on the embedded default: a tiny generated MiniCPM-V 2.0 checkpoint and the example
# dataset -> LoRA training through Axolotl's CLI -> export (adapter, merged) -> chat about an image -> scoring:
# the tiny model is taught to name a picture's colour (examples/colours) and scored before and after on held-out pictures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
PY=.venv/bin/python
rm -rf outputs/tiny-minicpmv outputs/tiny-lora outputs/tiny-prepared outputs/tiny-adapter outputs/tiny-merged outputs/colours-*
$PY -m axolotl_minicpmv tiny-checkpoint outputs/tiny-minicpmv
$PY -m axolotl.cli.train examples/tiny_cpu.yml
$PY -m axolotl_minicpmv export examples/tiny_cpu.yml --format adapter --out outputs/tiny-adapter
$PY -m axolotl_minicpmv export examples/tiny_cpu.yml --format merged --out outputs/tiny-merged
$PY -m axolotl_minicpmv chat --model outputs/tiny-minicpmv --adapter outputs/tiny-adapter \
    --image examples/data/images/street.jpg --question "What colour is the car?" --question "And the door?" \
    --beam --max-new-tokens 24
$PY -m axolotl_minicpmv chat --model outputs/tiny-merged \
    --image examples/data/images/clock.jpg --question "What time does the clock show?" --beam --max-new-tokens 24
# Scoring: fine-tune on examples/colours/train.json, then predict the held-out test.json with the base and the fine-tuned model.
$PY -m axolotl.cli.train examples/colours_cpu.yml
PREDICT=(--data examples/colours/test.json --max-new-tokens 8 --batch-size 12 --metrics exact,rouge_l)
$PY -m axolotl_minicpmv predict --model outputs/tiny-minicpmv --max-slice-nums 1 "${PREDICT[@]}" \
    --out outputs/colours-base.jsonl --metrics-out outputs/colours-base.json
$PY -m axolotl_minicpmv predict examples/colours_cpu.yml "${PREDICT[@]}" \
    --out outputs/colours-tuned.jsonl --metrics-out outputs/colours-tuned.json
$PY - <<'EOF'
import json
base, tuned = (json.load(open(f"outputs/colours-{name}.json"))["metrics"] for name in ("base", "tuned"))
print("colour task, 12 held-out pictures (base -> fine-tuned):", ", ".join(f"{k} {base[k]:.2f} -> {tuned[k]:.2f}" for k in base))
EOF
echo "demo finished: adapter in outputs/tiny-adapter, merged checkpoint in outputs/tiny-merged, predictions in outputs/colours-*.jsonl"
