"""The packed vision pass (all image sizes of a batch through the tower at once) equals the per-size passes.

On the CPU the packed layers run with `segment_attention` (one SDPA call per image), which checks the packing
itself: embedding per size, the token-wise layers over the concatenated patches, attention spans, unpacking,
gradient checkpointing, the PEFT copy of the tower. On a GPU the model packs by itself with flash attention's
variable-length kernel; that test runs on the device machine.
"""

from __future__ import annotations

import pytest
import torch

from axolotl_minicpmv import MiniCPMVConfig
from axolotl_minicpmv.integration.lora_targets import DEFAULT_TARGETS
from axolotl_minicpmv.model.packed_vision import encode_packed, packs, segment_attention
from axolotl_minicpmv.testing.tiny_checkpoint import OFFICIAL_CONFIG, TINY_SIZES, _model_kwargs
from axolotl_minicpmv.testing.training_steps import recipe_lora_model

SIZES = [(2, 448, 448), (1, 378, 560), (3, 336, 602)]  # a source picture's size, slices of two others


def stacks(dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, h, w, generator=generator).to(device, dtype) for n, h, w in SIZES]


def tiny_model(device="cpu", dtype=torch.float32):
    return recipe_lora_model(
        MiniCPMVConfig(**_model_kwargs({**OFFICIAL_CONFIG, **TINY_SIZES, "vocab_size": 1000})), DEFAULT_TARGETS, device=device, dtype=dtype
    )


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_tower_gives_the_per_size_features_and_gradients(checkpointing):
    model = tiny_model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tower = model.base_model.model.vpm  # PEFT's wrapper: attributes reach the trained copy
    pixels = stacks()
    weights = [torch.randn(f.shape[-1]) for f in [tower(p) for p in pixels]]  # a fixed projection of the outputs

    def loss_and_grads(features):
        loss = sum((f * w).sum() for f, w in zip(features, weights, strict=True))
        grads = torch.autograd.grad(loss, [p for p in tower.parameters() if p.requires_grad])
        return loss.detach(), grads

    packed = encode_packed(tower, pixels, attention=segment_attention)
    per_size = [tower(p) for p in pixels]
    assert [f.shape for f in packed] == [f.shape for f in per_size]
    for a, b in zip(packed, per_size, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    packed_loss, packed_grads = loss_and_grads(packed)
    loss, grads = loss_and_grads(per_size)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-4)
    assert len(grads) > 10
    for a, b in zip(packed_grads, grads, strict=True):  # float32 sums over thousands of patches, in another order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_the_cpu_path_does_not_pack():
    model = tiny_model()
    assert not packs(model.base_model.model.vpm, stacks()[0])


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="flash attention's variable-length kernel needs a GPU (run on the device machine)"
)
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "float32-weights-under-bf16-autocast"])
def test_a_gpu_bf16_model_packs_and_matches_the_per_size_passes(autocast):
    # autocast: how a run without DeepSpeed trains the tower (integration/precision.py)
    dtype = torch.float32 if autocast else torch.bfloat16
    peft_model = tiny_model("cuda", dtype)
    model = peft_model.base_model.model
    trained = [p for p in model.vpm.parameters() if p.requires_grad]
    pixels = stacks(dtype, "cuda")

    def features_and_grads():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            features = model.get_image_features(pixels)
        grads = torch.autograd.grad(features.float().square().mean(), trained)
        return features.detach().float(), torch.cat([g.float().flatten() for g in grads])

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        assert model.can_pack_images(pixels)
    assert model.can_pack_images(pixels) != autocast  # float32 weights outside autocast: no 16-bit kernel
    packed, packed_grads = features_and_grads()
    model.vision_block = None  # the per-size passes
    assert not model.can_pack_images(pixels)
    per_size, grads = features_and_grads()
    # bf16: the same flash kernels over the same spans, in other tilings and summation orders
    torch.testing.assert_close(packed, per_size, rtol=2e-2, atol=2e-2)
    assert (packed_grads - grads).norm() / grads.norm() < 2e-2
