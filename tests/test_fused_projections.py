"""Fused q/k/v and gate/up projections and the padded lm_head (`MiniCPMForCausalLM.fuse_projections`, used by
FastDecoder): the same logits without autograd, the same checkpoint, and training, LoRA and replaced weights going
through the separate maps."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from axolotl_minicpmv import MiniCPMV


def _logits(model, ids):
    with torch.inference_mode():
        return model.llm(input_ids=ids, use_cache=False).logits


def _fused_model(checkpoint):
    model = MiniCPMV.from_pretrained(checkpoint, dtype=torch.float32).eval()
    layers = len(model.llm.model.layers)
    assert model.llm.fuse_projections() == 2 * layers
    return model


def test_fused_projections_give_the_same_logits_and_add_no_memory(tiny_checkpoint_fp32):
    plain = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).eval()
    fused = _fused_model(tiny_checkpoint_fp32)
    ids = torch.randint(1, 500, (2, 17), generator=torch.Generator().manual_seed(0))
    logits = _logits(fused, ids)
    assert logits.shape[-1] == plain.config.vocab_size  # the padded lm_head's extra logits are cut off
    torch.testing.assert_close(logits, _logits(plain, ids), rtol=1e-5, atol=1e-5)
    head = fused.llm.padded_head_weight
    assert head.shape[0] % 64 == 0 and head.shape[0] >= plain.config.vocab_size
    assert fused.llm.lm_head.weight.data_ptr() == head.data_ptr()

    attn, mlp = fused.llm.model.layers[0].self_attn, fused.llm.model.layers[0].mlp
    # the separate maps are views of the stacked rows: one copy of every weight
    stacked = attn.qkv_weight.untyped_storage().data_ptr()
    assert {p.weight.untyped_storage().data_ptr() for p in (attn.q_proj, attn.k_proj, attn.v_proj)} == {stacked}
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_weight.untyped_storage().data_ptr()
    with torch.no_grad():  # an in-place change of one map reaches the stacked weight too
        attn.k_proj.weight.mul_(2)
    q, k = attn.q_proj.out_features, attn.k_proj.out_features
    torch.testing.assert_close(attn.qkv_weight[q : q + k], attn.k_proj.weight, rtol=0, atol=0)


def test_a_weight_replaced_after_fusing_is_used_as_it_is(tiny_checkpoint_fp32):
    plain = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).eval()
    fused = _fused_model(tiny_checkpoint_fp32)
    for model in (plain, fused):  # as a safe LoRA merge does: a new tensor, not an in-place change
        for proj in (model.llm.model.layers[0].self_attn.v_proj, model.llm.model.layers[1].mlp.up_proj, model.llm.lm_head):
            proj.weight.data = proj.weight.data * 1.5
    ids = torch.randint(1, 500, (1, 13), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)


def test_fusing_again_keeps_the_stacks_still_read_and_restacks_a_replaced_weight(tiny_checkpoint_fp32):
    """A second FastDecoder on one model fuses again: stacks the maps still read must stay the same tensors (the
    first decoder's CUDA graphs point at their memory; new stacks freed it, and its graphs then read garbage),
    while a group whose weight tensor was replaced since is stacked anew."""
    fused = _fused_model(tiny_checkpoint_fp32)
    attn, mlp = fused.llm.model.layers[0].self_attn, fused.llm.model.layers[0].mlp
    before = (fused.llm.padded_head_weight, attn.qkv_weight, mlp.gate_up_weight)
    attn_1 = fused.llm.model.layers[1].self_attn
    attn_1.v_proj.weight.data = attn_1.v_proj.weight.data * 1.5  # replaced, as a safe LoRA merge does
    replaced = attn_1.qkv_weight
    assert fused.llm.fuse_projections() == 2 * len(fused.llm.model.layers)
    assert all(now is then for now, then in zip((fused.llm.padded_head_weight, attn.qkv_weight, mlp.gate_up_weight), before))
    assert attn_1.qkv_weight is not replaced
    v_rows = slice(attn_1.q_proj.out_features + attn_1.k_proj.out_features, None)
    torch.testing.assert_close(attn_1.qkv_weight[v_rows], attn_1.v_proj.weight, rtol=0, atol=0)
    assert attn_1.v_proj.weight.data_ptr() == attn_1.qkv_weight[v_rows].data_ptr()


def test_a_fused_model_saves_and_loads_the_official_tensors(tiny_checkpoint_fp32, tmp_path):
    fused = _fused_model(tiny_checkpoint_fp32)
    assert not [name for name in fused.state_dict() if name.endswith(("qkv_weight", "gate_up_weight", "padded_head_weight"))]
    fused.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    reference = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).state_dict()
    assert saved.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)


def test_training_and_lora_go_through_the_separate_maps(tiny_checkpoint_fp32):
    fused = _fused_model(tiny_checkpoint_fp32)
    ids = torch.randint(1, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    fused.train()
    fused.llm(input_ids=ids, labels=ids).loss.backward()
    attn = fused.llm.model.layers[0].self_attn
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    assert fused.llm.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0

    fused.eval()
    before = _logits(fused, ids)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    lora = get_peft_model(fused, config)
    after = _logits(lora.base_model.model, ids)
    assert not torch.allclose(before, after, atol=1e-4), "the LoRA-wrapped maps must be used, not the stacked weights"
    with lora.disable_adapter():
        torch.testing.assert_close(_logits(lora.base_model.model, ids), before, rtol=1e-5, atol=1e-5)
