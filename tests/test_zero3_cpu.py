"""DeepSpeed ZeRO-3 with the trained vision tower / resampler / embeddings (PEFT modules_to_save).

Runs the real DeepSpeed engine on CPU (its CPU accelerator, gloo, one process) with every parameter
partitioned (stage3_param_persistence_threshold 0, as at real size). Without the plugin's
post_model_load hook DeepSpeed's hooks fail on the resampler in the first forward (the failure seen at
real size on the H100); with it, training steps run and the trained copies change.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import EXAMPLES

SCRIPT = r"""
import json, os, sys
from pathlib import Path
import torch, deepspeed
import pyarrow.parquet as pq
from deepspeed.runtime.zero import GatheredParameters
from peft import LoraConfig, get_peft_model
from transformers.integrations import HfDeepSpeedConfig
from axolotl.utils.dict import DictDefault
from axolotl_minicpmv import MiniCPMV, MiniCPMVPlugin, load_tokenizer
from axolotl_minicpmv.integration.collator import MiniCPMVDataCollator
from axolotl_minicpmv.integration.data import prepare_dataset_file
from axolotl_minicpmv.integration.lora_targets import DEFAULT_TARGETS
from axolotl_minicpmv.integration.prompt_strategy import MiniCPMVChatStrategy

checkpoint, data, work, use_plugin = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "plugin"
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_allow_untested_optimizer": True}
deepspeed.init_distributed(dist_backend="gloo")
keep_alive = HfDeepSpeedConfig(config)  # from_pretrained builds the model partitioned (zero.Init)
model = MiniCPMV.from_pretrained(checkpoint, dtype=torch.float32)
to_save = ["vpm", "resampler", "embed_tokens"]
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=DEFAULT_TARGETS, modules_to_save=to_save))
if use_plugin:
    MiniCPMVPlugin().post_model_load(DictDefault({"lora_modules_to_save": to_save}), model)
tokenizer = load_tokenizer(checkpoint)
prepared = prepare_dataset_file(data, work / "prepared")
strategy = MiniCPMVChatStrategy(tokenizer, sequence_len=2048)
rows = [strategy.tokenize_prompt(r) for r in pq.read_table(prepared.path).to_pylist()]
batches = [MiniCPMVDataCollator(tokenizer)(rows[i : i + 2]) for i in (0, 2)]
engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
engine.train()

def trained_copies():
    out = {}
    for name, param in model.named_parameters():
        if "modules_to_save.default" in name and ("resampler" in name or (".vpm." in name and "blocks.0.attn" in name)):
            with GatheredParameters([param]):
                out[name] = param.detach().clone()
    return out

before = trained_copies()
losses = []
for batch in batches:
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    losses.append(float(loss))
after = trained_copies()
changed = sorted({name.split(".modules_to_save")[0].rsplit(".", 1)[-1] for name in before if not torch.equal(before[name], after[name])})
print("RESULT " + json.dumps({"losses": losses, "changed": changed, "partitioned": sum(hasattr(p, "ds_id") for p in model.parameters())}))
"""


def _free_ports(count: int) -> list[int]:
    # fixed ports were taken once by another process on the machine (EADDRINUSE): ask the OS for free ones,
    # all sockets open at once so that the ports differ
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture(scope="module")
def runs(tiny_checkpoint_fp32, tmp_path_factory):
    """The same ZeRO-3 training script with and without the plugin hook, run side by side."""
    procs = {}
    for port, mode in zip(_free_ports(2), ("plugin", "bare")):
        work = tmp_path_factory.mktemp(f"zero3-{mode}")
        env = {
            **os.environ,
            "DS_ACCELERATOR": "cpu",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
        }
        argv = [sys.executable, "-c", SCRIPT, str(tiny_checkpoint_fp32), str(EXAMPLES / "train.json"), str(work), mode]
        procs[mode] = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work)
    results = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[mode] = (proc.returncode, stdout, stderr)
    return results


def test_zero3_trains_the_resampler_and_vision_tower_with_the_plugin(runs):
    code, stdout, stderr = runs["plugin"]
    assert code == 0, stderr[-4000:]
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert result["partitioned"] > 0, "DeepSpeed did not partition the parameters"
    assert len(result["losses"]) == 2 and all(loss == loss for loss in result["losses"])
    assert result["changed"] == ["resampler", "vpm"], result["changed"]


def test_without_the_hook_deepspeed_fails_on_the_resampler(runs):
    code, _, stderr = runs["bare"]
    assert code != 0
    assert "'Resampler' object has no attribute 'ds_grads_remaining'" in stderr
