"""`minicpmv_compile_layers`: the decoder layers compiled in place train exactly like eager ones.

Real torch.compile (inductor on CPU) of a PEFT-wrapped tiny model with the recipe's fully trained
modules: losses and every gradient equal the eager model's, with and without gradient checkpointing,
for three sequence lengths and image counts that one graph serves (no recompilation), and the
state-dict keys (what adapters save) do not change.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from axolotl_minicpmv import MiniCPMV, MiniCPMVConfig
from axolotl_minicpmv.integration.compiled_layers import compile_decoder_layers
from axolotl_minicpmv.integration.lora_targets import DEFAULT_TARGETS
from axolotl_minicpmv.testing.tiny_checkpoint import OFFICIAL_CONFIG, TINY_SIZES, _model_kwargs

# hidden_size 256: a width no test sequence length equals (dynamo would specialise a length equal to it)
CONFIG = {**OFFICIAL_CONFIG, **TINY_SIZES, "hidden_size": 256, "num_hidden_layers": 3, "vocab_size": 1000}


def lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = MiniCPMVConfig(**_model_kwargs(CONFIG))
    config._attn_implementation = "sdpa"
    lora = LoraConfig(r=8, target_modules=DEFAULT_TARGETS, modules_to_save=["vpm", "resampler", "embed_tokens"], init_lora_weights=False)
    return get_peft_model(MiniCPMV(config), lora).train()


def batch(length: int, images: int, seed: int) -> dict:
    """Two rows of random text with `images` 448x448 images in 64-token slots, all tokens supervised."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (2, length), generator=generator)
    bounds = [[i % 2, 2 + 66 * (i // 2), 66 + 66 * (i // 2)] for i in range(images)]
    for row, start, end in bounds:
        ids[row, start:end] = 0
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=ids.clone(),
        pixel_values=[torch.randn(images, 3, 448, 448, generator=generator)],
        vision_order=torch.arange(images),
        image_bound=torch.tensor(bounds),
    )


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
    for length, images, seed in ((160, 2, 0), (224, 2, 1), (288, 4, 2)):
        inputs = batch(length, images, seed)
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = model(**inputs).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
        assert compiled_grads.keys() == eager_grads.keys() and any("lora_B" in n for n in eager_grads)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)
    # the decoder layers ran compiled, and one graph served every length
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
