"""`axolotl merge-lora` on a MiniCPM-V run is stopped before it writes anything, pointing at `minicpmv-export`.

Axolotl's own merge drops trained vision-tower/resampler tensors whose names do not end in `.weight`
(see /work/shared/AXOLOTL.md), so it would leave a model that loads but answers wrongly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from test_export import trained_run  # noqa: F401  (the same run fixture)


def test_axolotl_merge_lora_is_stopped_with_the_export_command(trained_run, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from axolotl_minicpmv.weights.export import export

    axolotl = Path(sys.executable).parent / "axolotl"
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [str(axolotl), "merge-lora", str(trained_run.config)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    merged = trained_run.output_dir / "merged"
    command = f"axolotl minicpmv-export {trained_run.config} --format merged --out {merged}"
    assert command in output, output[-3000:]
    assert not merged.exists()

    # the command it prints does the merge
    out = export(trained_run.config, "merged", tmp_path / "merged")
    index = load_file(out / "model-00001-of-00002.safetensors")
    assert index and all(t.dtype == torch.bfloat16 for t in index.values())
