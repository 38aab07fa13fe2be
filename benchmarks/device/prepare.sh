#!/usr/bin/env bash
# On the CPU machine, from the project root: what a device call (the lent GPU, no internet) needs to run the
# inference benchmarks, GPU checks and GPU tests of this repository, in the ignored folder .axgpu/:
#   .axgpu/whl/    cp312 wheels of the serving stack the device image lacks (FastAPI, starlette, uvicorn,
#                  pydantic; the image has torch, transformers, timm, peft)
#   .axgpu/stubs/  an `axolotl` stand-in holding only axolotl.utils.logging (predict's data readers import it;
#                  training on the device uses ../shared/gpu-axolotl instead)
# Then, in a device call with carry [".axgpu"] (plus ".gpuref" for the official anchor, see
# ../shared/official-anchor/README.md):
#   source benchmarks/device/env.sh; step chat 400 python benchmarks/bench_chat.py --fast ...
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
grep -qx '/.axgpu/' .git/info/exclude 2>/dev/null || echo '/.axgpu/' >> .git/info/exclude
mkdir -p .axgpu/whl .axgpu/stubs/axolotl/utils
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .axgpu/whl \
  fastapi==0.163.2 starlette==0.52.1 uvicorn==0.55.0 opentelemetry-api==1.45.2 pydantic==2.12.5 \
  pydantic_core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2
touch .axgpu/stubs/axolotl/__init__.py .axgpu/stubs/axolotl/utils/__init__.py
printf 'import logging\n\nget_logger = logging.getLogger\n' > .axgpu/stubs/axolotl/utils/logging.py
du -sh .axgpu
