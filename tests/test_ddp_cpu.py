"""Two training processes through the real Axolotl CLI on the CPU (gloo, plain DDP, no DeepSpeed), on the tiny
generated checkpoint and a copy of examples/data (samples with an image and text-only ones):

- the data are split between the ranks: 16 samples at micro batch 1 take 8 steps, one sample per rank per step;
- the ranks stay in step: after training both hold the same trainable tensors (LoRA and the fully trained
  vision tower / resampler / embeddings), which moved away from where they started. A text-only sample on
  one rank beside an image on the other does not stop DDP, even with `ddp_find_unused_parameters: false`
  (the image-free batch still passes the vision tower; without that the ranks wait for each other forever);
- rank 0's adapter is that trained state, under PEFT's names, and loads with PEFT.

`accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true starts two CPU processes
(`--cpu --num_processes 2` starts one). Axolotl 0.19 needs CUDA once WORLD_SIZE > 1 in two places that
tests/cpu_ddp_train.py replaces (a GPU peer-access probe, and the device map); the rest is the real CLI.
DeepSpeed over two CPU processes is not tested here. DeepSpeed 0.18.9 (Axolotl 0.19 allows < 0.19) waits
only for the last of its coalesced gloo all-gathers, so a gathered parameter can hold uninitialised
memory: 19 of 100 gathers of a plain nn.Sequential came back wrong here (0 with 0.19.8, after DeepSpeed's
PR #8539). On a GPU the all-gathers queue on one stream, in order. Multi-GPU DeepSpeed runs are GPU work
(benchmarks/gpu_checks/check_gpu_runs.py, benchmarks/bench_train.py --num-processes). About 50 s on 2 cores.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, REPO
from safetensors.torch import load_file
from test_axolotl_cli import ACCELERATE, base_tensors, run, tail, values, write_config

WORLD_SIZE = 2
LAUNCHER = REPO / "tests" / "cpu_ddp_train.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    data = folder / "data"
    shutil.copytree(EXAMPLES, data)
    samples = json.loads((data / "train.json").read_text())
    config = write_config(
        folder,
        tiny_checkpoint,
        data,
        micro_batch_size=1,
        num_epochs=1,
        save_steps=1000,
        eval_strategy="no",
        ddp_find_unused_parameters=False,
        drop=("max_steps", "test_datasets", "eval_steps"),
    )
    rc, output = run(
        [
            ACCELERATE,
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(WORLD_SIZE),
            "--num_machines",
            "1",
            "--main_process_port",
            str(free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            LAUNCHER,
            config,
        ],
        folder / "train.log",
        timeout=240,  # about 40 s; a rank that waits for the other's gradients would wait forever
        ACCELERATE_USE_CPU="true",
    )
    assert rc == 0, tail(output)
    return samples, folder / "out", output


def rank_tensors(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(out / f"rank{rank}-trainable.safetensors")


def test_the_ranks_split_the_data(ddp_run):
    samples, out, output = ddp_run
    with_image = sum("image" in s for s in samples)
    assert 0 < with_image < len(samples), "the data must mix image and text-only samples"
    assert '"world_size": 2' in output and '"ddp": true' in output

    losses = values(output, "loss")
    assert len(losses) == math.ceil(len(samples) / WORLD_SIZE), tail(output)  # one sample per rank per step
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    assert json.loads((out / f"checkpoint-{len(losses)}" / "trainer_state.json").read_text())["epoch"] == 1


def test_the_ranks_end_with_the_same_trained_weights(ddp_run, tiny_checkpoint):
    _, out, _ = ddp_run
    first, second = rank_tensors(out, 0), rank_tensors(out, 1)
    assert first.keys() == second.keys()
    differing = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differing, differing

    assert all(first[name].abs().sum() > 0 for name in first if ".lora_B." in name)  # LoRA B starts at zero
    base = base_tensors(tiny_checkpoint)
    for part in ("vpm", "resampler", "llm.model.embed_tokens"):
        prefix = f"base_model.model.{part}.modules_to_save.default."
        copies = {name.removeprefix(prefix): t for name, t in first.items() if name.startswith(prefix)}
        assert copies, part
        moved = [name for name, t in copies.items() if not torch.equal(t, base[f"{part}.{name}"].to(t.dtype))]
        assert moved, f"{part}: no fully trained tensor changed"


def test_rank_0_saved_the_trained_adapter(ddp_run, tiny_checkpoint):
    from peft import PeftModel

    from axolotl_minicpmv import MiniCPMV

    _, out, _ = ddp_run
    trained = rank_tensors(out, 0)
    saved = load_file(out / "adapter_model.safetensors")
    assert not any(name.startswith("module.") for name in saved)  # not DDP's wrapper names
    expected = {name.replace("modules_to_save.default.", "").replace(".default.", "."): t for name, t in trained.items()}
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[name], expected[name]) for name in saved)

    model = PeftModel.from_pretrained(MiniCPMV.from_pretrained(tiny_checkpoint, dtype=torch.float32), out)
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[name], t) for name, t in trained.items())
