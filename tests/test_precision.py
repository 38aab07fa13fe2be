"""A LoRA run without DeepSpeed keeps the fully trained modules' weights in float32 (integration/precision.py).

- Through Axolotl's own model loader (a separate process, as `axolotl train` loads): `bf16: true` without DeepSpeed
  gives float32 vision tower, resampler and embeddings (the frozen decoder stays bf16); with ZeRO-2, whose optimizer
  keeps float32 master weights itself, they stay bf16.
- Why: one AdamW step at the recipe's lr 1e-6 under bf16 autocast moves every float32 weight of the tower, while
  bf16 weights round almost all of those updates away.
- `minicpmv_eval_generate` answers under the trainer's autocast, which such a mixed-dtype model needs.
- The adapter such a run saves (float32 copies of the trained modules) loads into a bf16 model, merged or not, as
  the bf16 rounding of the trained weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLES, REPO
from test_axolotl_cli import write_config

from axolotl_minicpmv import MiniCPMV, MiniCPMVConfig
from axolotl_minicpmv.integration.eval_generate import EvalGenerateCallback
from axolotl_minicpmv.integration.lora_targets import DEFAULT_TARGETS
from axolotl_minicpmv.integration.precision import keep_trained_weights_float32
from axolotl_minicpmv.integration.predict import requests_from_samples
from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor
from axolotl_minicpmv.testing.tiny_checkpoint import OFFICIAL_CONFIG, TINY_SIZES, _model_kwargs
from axolotl_minicpmv.testing.training_steps import FULLY_TRAINED, recipe_lora_model, synthetic_batch

LOAD = """
import collections, json, sys
from axolotl.cli.config import load_cfg
from axolotl.loaders import ModelLoader, load_tokenizer
cfg = load_cfg(sys.argv[1])
model, _ = ModelLoader(cfg, load_tokenizer(cfg)).load()
dtypes = collections.defaultdict(set)
for name, param in model.named_parameters():
    if "lora_" in name:
        part = "lora"
    elif ".modules_to_save" in name:
        part = name.split(".modules_to_save")[0].removeprefix("base_model.model.")
    else:
        part = "frozen"
    dtypes[part].add(str(param.dtype).removeprefix("torch."))
print(json.dumps({part: sorted(kinds) for part, kinds in dtypes.items()}))
"""


def test_only_a_run_without_deepspeed_gets_float32_weights_for_the_fully_trained_modules(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    settings = {
        "bf16": dict(bf16=True, fp16=False),
        "zero2": dict(bf16=True, fp16=False, deepspeed=str(REPO / "configs" / "deepspeed" / "zero2.json")),
    }
    # one process each: load_cfg sets process-wide state (DeepSpeed's); AXOLOTL_IS_PREPROCESS: no NCCL group on a CPU
    env = {**os.environ, "AXOLOTL_IS_PREPROCESS": "1"}
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-c", LOAD, str(write_config(tmp_path / name, tiny_checkpoint, data, **overrides))],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        for name, overrides in settings.items()
    }
    loaded, logs = {}, {}
    for name, process in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {output[-4000:]}"
        loaded[name], logs[name] = json.loads(output.strip().splitlines()[-1]), output
    trained = {"vpm", "resampler", "llm.model.embed_tokens"}
    assert trained <= loaded["bf16"].keys()
    for part in trained:
        assert loaded["bf16"][part] == ["float32"], (part, loaded["bf16"])
        assert loaded["zero2"][part] == ["bfloat16"]
    assert loaded["bf16"]["frozen"] == ["bfloat16"] and loaded["bf16"]["lora"] == ["float32"]  # the frozen decoder stays bf16
    assert "trained parameters (llm.model.embed_tokens, resampler, vpm) kept in float32" in logs["bf16"]
    assert "kept in float32" not in logs["zero2"]


TINY = {**OFFICIAL_CONFIG, **TINY_SIZES, "num_hidden_layers": 2, "vocab_size": 1000}


def test_float32_weights_take_the_recipes_small_updates_that_bf16_weights_round_away():
    batch = synthetic_batch(160, [(2, 448, 448)], TINY["vocab_size"], TINY["query_num"], seed=0)
    changed, losses = {}, {}
    for weights in ("bf16", "float32"):
        model = recipe_lora_model(MiniCPMVConfig(**_model_kwargs(TINY)), DEFAULT_TARGETS, dtype=torch.bfloat16)
        if weights == "float32":
            assert keep_trained_weights_float32({"adapter": "lora", "bf16": True}, model) > 0
        tower = [p for name, p in model.named_parameters() if ".vpm.modules_to_save" in name]
        before = [p.detach().float().clone() for p in tower]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses[weights] = loss.item()
        moved = sum(int((p.detach().float() != b).sum()) for p, b in zip(tower, before, strict=True))
        changed[weights] = moved / sum(b.numel() for b in before)
    assert changed["float32"] == 1.0
    assert changed["bf16"] < 0.1, changed  # only weights near zero can take a step of 1e-6 in bf16
    # the same 16-bit compute either way (float32 weights round to the same bf16 values; the residual stream differs)
    assert losses["float32"] == pytest.approx(losses["bf16"], rel=1e-2)


@pytest.mark.parametrize(
    "precision, cast",
    [({"bf16": True}, True), ({"bf16": False, "bfloat16": True}, True), ({"fp16": True}, True), ({"bf16": False}, False)],
)
def test_every_setting_that_turns_on_autocast_gets_float32_trained_weights(precision, cast):
    """Axolotl's trainer autocasts in bf16 for `bf16` or its alias `bfloat16`, in fp16 for `fp16`."""
    model = recipe_lora_model(MiniCPMVConfig(**_model_kwargs(TINY)), DEFAULT_TARGETS, dtype=torch.bfloat16)
    assert (keep_trained_weights_float32({"adapter": "lora", **precision}, model) > 0) is cast
    tower = {p.dtype for name, p in model.named_parameters() if ".vpm.modules_to_save" in name}
    assert tower == ({torch.float32} if cast else {torch.bfloat16})


def test_eval_generate_answers_under_the_trainers_autocast(tiny_checkpoint, tiny_tokenizer, caplog):
    from peft import LoraConfig, get_peft_model

    base = MiniCPMV.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=DEFAULT_TARGETS, modules_to_save=FULLY_TRAINED))
    keep_trained_weights_float32({"adapter": "lora", "bf16": True}, model)
    samples = json.loads((EXAMPLES / "eval.json").read_text())[:2]
    requests = list(requests_from_samples(samples, base_dir=EXAMPLES))
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, base.config, max_slice_nums=1)
    state = type("State", (), {"global_step": 1, "log_history": []})()
    answered = {}
    for name, autocast in (("none", contextlib.nullcontext), ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        caplog.clear()
        logs = {"eval_loss": 1.0}
        with caplog.at_level(logging.INFO, logger="axolotl_minicpmv"):
            EvalGenerateCallback(requests, processor, max_new_tokens=4, batch_size=2, autocast=autocast).on_log(
                None, state, None, logs=logs, model=model
            )
        answered[name] = ("eval_exact" in logs and "eval_rouge_l" in logs, caplog.text)
    assert answered["bf16"][0] and "minicpmv_eval_generate: 2 of 2 eval samples answered" in answered["bf16"][1]
    # the control: float32 embeddings feeding the bf16 decoder outside autocast fail every row (and no score is logged)
    assert not answered["none"][0] and "none of the 2 eval samples could be answered" in answered["none"][1]


@pytest.mark.parametrize("merge", [False, True])
def test_an_adapter_with_float32_trained_modules_loads_into_a_bf16_model(tiny_checkpoint, tmp_path, merge):
    from peft import LoraConfig, get_peft_model

    from axolotl_minicpmv.weights.adapters import apply_adapter

    trained = get_peft_model(
        MiniCPMV.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16),
        LoraConfig(r=8, target_modules=DEFAULT_TARGETS, modules_to_save=FULLY_TRAINED),
    )
    keep_trained_weights_float32({"adapter": "lora", "bf16": True}, trained)
    tower = trained.base_model.model.vpm.modules_to_save["default"]
    with torch.no_grad():
        for param in tower.parameters():
            param.add_(1e-3 * torch.randn_like(param))  # a float32 update, as training leaves it
    trained.save_pretrained(tmp_path / "adapter")
    expected = {name: p.detach().to(torch.bfloat16) for name, p in tower.named_parameters()}

    loaded = apply_adapter(MiniCPMV.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16), tmp_path / "adapter", merge=merge)
    model = loaded if merge else loaded.base_model.model
    vpm = model.vpm if merge else model.vpm.modules_to_save["default"]
    for name, param in vpm.named_parameters():
        assert param.dtype == torch.bfloat16, name
        assert torch.equal(param.detach(), expected[name]), name
