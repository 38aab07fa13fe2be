"""`minicpmv_compile_layers`: the decoder layers compiled in place train exactly like eager ones.

Real torch.compile (inductor on CPU) of a PEFT-wrapped tiny model with the recipe's fully trained
modules: over three AdamW steps the losses and every trained tensor's gradients equal the eager model's,
with and without gradient checkpointing, for three sequence lengths and image counts that one graph
serves (no recompilation), and the state-dict keys (what adapters save) do not change. Gradient
checkpointing itself (the 24 GB config's memory setting) leaves losses and gradients as they are.
The same comparison in bf16 at the real size on a GPU: benchmarks/gpu_checks/check_train_numerics.py.
"""

from __future__ import annotations

import pytest
import torch

from axolotl_minicpmv import MiniCPMVConfig
from axolotl_minicpmv.integration.compiled_layers import compile_decoder_layers
from axolotl_minicpmv.integration.lora_targets import DEFAULT_TARGETS
from axolotl_minicpmv.testing.tiny_checkpoint import OFFICIAL_CONFIG, TINY_SIZES, _model_kwargs
from axolotl_minicpmv.testing.training_steps import recipe_lora_model, synthetic_batch, train_steps

# hidden_size 256: a width no test sequence length equals (dynamo would specialise a length equal to it)
CONFIG = {**OFFICIAL_CONFIG, **TINY_SIZES, "hidden_size": 256, "num_hidden_layers": 3, "vocab_size": 1000}
# three lengths and image layouts (one size; two sizes) that one compiled graph must serve
BATCHES = [(160, [(2, 448, 448)]), (224, [(1, 448, 448), (1, 336, 560)]), (288, [(4, 448, 448)])]


def lora_model() -> torch.nn.Module:
    return recipe_lora_model(MiniCPMVConfig(**_model_kwargs(CONFIG)), DEFAULT_TARGETS)


def batches() -> list[dict]:
    return [synthetic_batch(length, sizes, CONFIG["vocab_size"], CONFIG["query_num"], seed) for seed, (length, sizes) in enumerate(BATCHES)]


def assert_same_steps(steps, reference) -> None:
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(steps, reference, strict=True)):
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-5), f"step {step + 1}"
        assert grads.keys() == ref_grads.keys() and any("lora_B" in n for n in ref_grads)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-4, msg=f"step {step + 1}: {name}")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_give_the_eager_losses_and_gradients(checkpointing):
    eager, compiled = lora_model(), lora_model()
    keys = list(compiled.state_dict())
    assert compile_decoder_layers(compiled) == 3
    assert list(compiled.state_dict()) == keys
    if checkpointing:
        for model in (eager, compiled):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    data = batches()
    assert_same_steps(train_steps(compiled, data), train_steps(eager, data))
    # the decoder layers ran compiled, and one graph served every length
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_gradient_checkpointing_gives_the_same_losses_and_gradients():
    plain, checkpointed = lora_model(), lora_model()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.base_model.model.vpm.grad_checkpointing  # the vision tower recomputes too
    data = batches()
    assert_same_steps(train_steps(checkpointed, data), train_steps(plain, data))
