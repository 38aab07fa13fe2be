"""LoRA targets and trained modules: the resolver, presets, plugin defaults and the official parameter counts."""

from __future__ import annotations

import pytest
import torch
from conftest import REFERENCE
from peft import LoraConfig, get_peft_model

from axolotl_minicpmv import MiniCPMV, MiniCPMVConfig
from axolotl_minicpmv.integration.args import modules_to_save
from axolotl_minicpmv.integration.lora_targets import (
    DEFAULT_TARGETS,
    PRESETS,
    check_targets,
    count_parameters,
    describe_wrapped,
    expand_targets,
)


@pytest.fixture(scope="module")
def real_config():
    return MiniCPMVConfig.from_pretrained(REFERENCE)


def meta_model(config):
    with torch.device("meta"):
        return MiniCPMV(config)


def test_expand_targets_defaults_presets_and_passthrough():
    assert expand_targets(None) == DEFAULT_TARGETS == r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"
    assert expand_targets("llm_attn") == PRESETS["llm_attn"]
    assert expand_targets(["llm_all_linear"]) == PRESETS["llm_all_linear"]
    assert expand_targets(r"llm\..*q_proj") == r"llm\..*q_proj"
    assert expand_targets(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "targets, count, example",
    [
        (DEFAULT_TARGETS, 120, "llm.model.layers.0.self_attn.q_proj"),
        (PRESETS["llm_attn"], 160, "llm.model.layers.39.self_attn.o_proj"),
        (PRESETS["llm_all_linear"], 280, "llm.model.layers.7.mlp.down_proj"),
        (["q_proj", "k_proj"], 80, "llm.model.layers.3.self_attn.k_proj"),  # a list is PEFT's suffix match
    ],
)
def test_resolution_against_the_real_module_names(real_config, targets, count, example):
    names = check_targets(meta_model(real_config), targets)
    assert len(names) == count and example in names
    assert not any(n.startswith(("vpm.", "resampler.")) for n in names)


def test_a_pattern_matching_nothing_is_a_config_error(real_config):
    with pytest.raises(ValueError, match=r"lora_target_modules=.*matches no linear module"):
        check_targets(meta_model(real_config), r"nothing\.matches")


def test_the_resamplers_attention_output_is_refused(real_config):
    """nn.MultiheadAttention reads out_proj's weight itself: a LoRA wrapper there would never run, never train."""
    with pytest.raises(ValueError, match=r"matches resampler\.attn\.out_proj: nn\.MultiheadAttention reads that weight itself"):
        check_targets(meta_model(real_config), r"(resampler\.attn\.out_proj|llm\..*q_proj)")


def test_the_log_says_what_peft_wrapped_in_each_part(real_config):
    """A pattern reaching into a part that is not trained in full is wrapped there, and the log says so."""
    targets = r"(vpm\.blocks\.0\.attn\.qkv|llm\..*layers\.0\.self_attn\.q_proj)"
    model = get_peft_model(meta_model(real_config), LoraConfig(r=4, target_modules=targets, modules_to_save=["resampler"]))
    assert describe_wrapped(model) == (
        "1 modules in llm (e.g. llm.model.layers.0.self_attn.q_proj); 1 modules in vpm (e.g. vpm.blocks.0.attn.qkv)"
    )


@pytest.mark.parametrize(
    "targets, total, trainable",
    [
        (DEFAULT_TARGETS, 3_470_355_232, 745_474_336),  # the official q|k|v default
        (r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj)", 3_458_558_752, 733_677_856),  # what the seed's run logged
    ],
)
def test_counts_equal_the_official_ones_with_the_plugins_modules_to_save(real_config, targets, total, trainable):
    model = get_peft_model(
        meta_model(real_config),
        LoraConfig(r=64, lora_alpha=64, lora_dropout=0.05, target_modules=targets, modules_to_save=modules_to_save({})),
    )
    assert count_parameters(model) == (total, trainable)


def test_tune_keys_choose_the_fully_trained_modules():
    assert modules_to_save({}) == ["vpm", "resampler", "embed_tokens"]
    assert modules_to_save({"minicpmv_tune_vision": False, "minicpmv_tune_embed_tokens": False}) == ["resampler"]


def test_plugin_register_fills_in_the_recipe(tmp_path):
    from axolotl_minicpmv.integration.plugin import MiniCPMVPlugin

    cfg = {"adapter": "lora", "lora_target_modules": "llm_attn", "minicpmv_tune_resampler": False, "output_dir": str(tmp_path)}
    MiniCPMVPlugin().register(cfg)
    assert cfg["lora_target_modules"] == PRESETS["llm_attn"]
    assert cfg["lora_modules_to_save"] == ["vpm", "embed_tokens"]
    assert cfg["remove_unused_columns"] is False
    if not torch.cuda.is_available():  # unset precision on CPU becomes float32, not Axolotl's fp16
        assert cfg["bf16"] is False and cfg["fp16"] is False


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"sample_packing": True}, "sample_packing"),
        ({"lora_target_linear": True}, "lora_target_linear"),
        ({"torch_compile": True}, "minicpmv_compile_layers"),
        ({"torch_compile": "auto"}, "minicpmv_compile_layers"),
    ],
)
def test_plugin_register_refuses_settings_that_cannot_work(cfg, message):
    from axolotl_minicpmv.integration.plugin import MiniCPMVPlugin

    with pytest.raises(ValueError, match=message):
        MiniCPMVPlugin().register(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU precision rule")
def test_fp16_on_cpu_fails_fast(tmp_path):
    from axolotl_minicpmv.integration.plugin import MiniCPMVPlugin

    with pytest.raises(ValueError, match="fp16"):
        MiniCPMVPlugin().register({"fp16": True, "output_dir": str(tmp_path)})
