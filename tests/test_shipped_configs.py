"""Every shipped training config passes Axolotl's own config loading with the plugin.

`axolotl.cli.config.load_cfg` (what `axolotl train` and `axolotl preprocess` run before loading anything: plugin registration,
schema validation, normalisation, the DeepSpeed and optimizer environment) on each file of configs/, with
only the model and data pointed at the tiny checkpoint and the example data. A subprocess per config
(run side by side), because load_cfg sets process-wide state that a second DeepSpeed config refuses. Catches a misspelt key, an optimizer name Axolotl does
not know or a DeepSpeed file that does not exist before a user's GPU run does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from conftest import EXAMPLES, REPO

CONFIGS = sorted((REPO / "configs").glob("*.yml"))

LOAD = """
import json, sys
from axolotl.cli.config import load_cfg
cfg = load_cfg(sys.argv[1])
print(json.dumps({key: cfg[key] for key in ("optimizer", "deepspeed", "gradient_checkpointing", "minicpmv_compile_layers", "adapter")}))
"""


def test_every_shipped_config_loads_through_axolotl(tiny_checkpoint, tmp_path):
    assert {p.name for p in CONFIGS} >= {"minicpmv_lora.yml", "minicpmv_lora_24gb.yml", "minicpmv_lora_fast.yml", "minicpmv_qlora.yml"}
    paths = []
    for path in CONFIGS:
        cfg = yaml.safe_load(path.read_text())
        cfg.update(
            base_model=str(tiny_checkpoint),
            datasets=[{"path": str(EXAMPLES / "train.json"), "type": "axolotl_minicpmv.minicpmv_chat"}],
            dataset_prepared_path=str(tmp_path / path.stem / "prepared"),
            output_dir=str(tmp_path / path.stem / "out"),
        )
        if cfg.get("deepspeed"):
            cfg["deepspeed"] = str(REPO / cfg["deepspeed"])
        paths.append(tmp_path / path.name)
        paths[-1].write_text(yaml.safe_dump(cfg))
    # as `axolotl preprocess` loads it: no NCCL process group for the DeepSpeed configs on this CPU machine
    env = {**os.environ, "AXOLOTL_IS_PREPROCESS": "1"}
    runs = {
        path.name: subprocess.Popen(
            [sys.executable, "-c", LOAD, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env
        )
        for path in paths
    }
    loaded = {}
    for name, process in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {stderr[-4000:]}"
        loaded[name] = json.loads(stdout.strip().splitlines()[-1])
    assert loaded["minicpmv_lora_24gb.yml"]["optimizer"] == "adamw_bnb_8bit"
    for name in ("minicpmv_lora_24gb.yml", "minicpmv_lora_fast.yml"):  # ZeRO-2 with the optimizer on the GPU
        zero = loaded[name]["deepspeed"]["zero_optimization"]
        assert zero["stage"] == 2 and "offload_optimizer" not in zero, (name, zero)
    assert (
        loaded["minicpmv_lora_fast.yml"]["gradient_checkpointing"] is False and loaded["minicpmv_lora_fast.yml"]["minicpmv_compile_layers"]
    )
    assert loaded["minicpmv_qlora.yml"]["adapter"] == "qlora"
