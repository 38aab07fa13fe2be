#!/usr/bin/env bash
# The main job on the embedded default: a tiny generated MiniCPM-V 2.0 checkpoint and the example task
# (examples/colours: name a solid-colour picture's colour) -> LoRA training through Axolotl's CLI -> export
# (adapter, merged) -> chat about a picture with each -> scoring of the base and the fine-tuned model on held-out pictures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
PY=.venv/bin/python
rm -rf outputs/tiny-minicpmv outputs/colours-*
$PY -m axolotl_minicpmv tiny-checkpoint outputs/tiny-minicpmv
# Fine-tune on examples/colours/train.json: LoRA on the decoder's attention, and (the plugin's default, as in the
# official recipe) the vision tower, resampler and embeddings trained in full.
$PY -m axolotl.cli.train examples/colours_cpu.yml
$PY -m axolotl_minicpmv export examples/colours_cpu.yml --format adapter --out outputs/colours-adapter
$PY -m axolotl_minicpmv export examples/colours_cpu.yml --format merged --out outputs/colours-merged
QUESTION="What colour is this picture? Answer with one word."
$PY -m axolotl_minicpmv chat --model outputs/tiny-minicpmv --adapter outputs/colours-adapter \
    --image examples/colours/images/test-green-0.png --question "$QUESTION" --question "And what colour is it not?" \
    --beam --max-new-tokens 8
$PY -m axolotl_minicpmv chat --model outputs/colours-merged \
    --image examples/colours/images/test-blue-0.png --question "$QUESTION" --beam --max-new-tokens 8
# Scoring: predict the held-out test.json with the base and the fine-tuned model.
PREDICT=(--data examples/colours/test.json --max-new-tokens 8 --batch-size 12 --metrics exact,rouge_l)
$PY -m axolotl_minicpmv predict --model outputs/tiny-minicpmv --max-slice-nums 1 "${PREDICT[@]}" \
    --out outputs/colours-base.jsonl --metrics-out outputs/colours-base.json
$PY -m axolotl_minicpmv predict examples/colours_cpu.yml "${PREDICT[@]}" \
    --out outputs/colours-tuned.jsonl --metrics-out outputs/colours-tuned.json
$PY - <<'PYEOF'
import json
base, tuned = (json.load(open(f"outputs/colours-{name}.json"))["metrics"] for name in ("base", "tuned"))
print("colour task, held-out pictures (base -> fine-tuned):", ", ".join(f"{k} {base[k]:.2f} -> {tuned[k]:.2f}" for k in base))
PYEOF
echo "demo finished: adapter in outputs/colours-adapter, merged checkpoint in outputs/colours-merged, predictions in outputs/colours-*.jsonl"
