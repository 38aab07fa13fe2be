"""Loading checkpoints in the official layout: sharded safetensors, `pytorch_model.bin`, the Auto
classes without remote code, and strict errors that name what is wrong.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from axolotl_minicpmv import MiniCPMV, MiniCPMVConfig
from axolotl_minicpmv.weights.loading import CheckpointError

INDEX = "model.safetensors.index.json"


def _file_tensors(checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint's files hold, read with safetensors directly."""
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(str(checkpoint / shard)))
    assert set(tensors) == set(weight_map)
    return tensors


def _copy(checkpoint, tmp_path, name="copy"):
    out = tmp_path / name
    shutil.copytree(checkpoint, out)
    return out


def _assert_state_equal(model, tensors):
    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, tensor in tensors.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


def _edit_shard(checkpoint, edit):
    """Apply `edit(tensors) -> tensors` to the shard files, and rewrite the index to match."""
    index = json.loads((checkpoint / INDEX).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        path = checkpoint / shard
        tensors = edit(load_file(str(path)))
        save_file(tensors, str(path), metadata={"format": "pt"})
    return index


# ---------------------------------------------------------------- formats


def test_official_layout_files(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", INDEX, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= names
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "minicpmv" and "auto_map" in config


def test_sharded_safetensors_load_every_tensor_unchanged(tiny_checkpoint_fp32):
    tensors = _file_tensors(tiny_checkpoint_fp32)
    model = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32)
    assert isinstance(model, MiniCPMV) and isinstance(model.config, MiniCPMVConfig)
    _assert_state_equal(model, tensors)


def test_bf16_checkpoint_loads_every_tensor_in_bf16(tiny_checkpoint):
    """The official release is bf16; loading it with dtype=bfloat16 must give the stored tensors as they are."""
    tensors = _file_tensors(tiny_checkpoint)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    model = MiniCPMV.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.bfloat16}
    assert wrong == {}, f"parameters not in the requested dtype: {wrong}"
    _assert_state_equal(model, tensors)


def test_pytorch_model_bin_loads_the_same_tensors(tiny_checkpoint_fp32, tmp_path):
    tensors = _file_tensors(tiny_checkpoint_fp32)
    out = tmp_path / "bin"
    out.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_checkpoint_fp32 / name, out / name)
    torch.save(tensors, out / "pytorch_model.bin")
    assert not list(out.glob("*.safetensors*"))
    model = MiniCPMV.from_pretrained(out, dtype=torch.float32)
    _assert_state_equal(model, tensors)
    reference = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32)
    _assert_state_equal(model, reference.state_dict())


def test_output_loading_info_is_still_available(tiny_checkpoint):
    model, info = MiniCPMV.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, output_loading_info=True)
    assert isinstance(model, MiniCPMV)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


# ---------------------------------------------------------------- Auto classes without remote code


def test_auto_classes_return_our_classes_without_trust_remote_code(tiny_checkpoint_fp32):
    checkpoint = tiny_checkpoint_fp32
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_minicpmv.MiniCPMV"
    assert not (checkpoint / "modeling_minicpmv.py").exists(), "no remote code to run"
    tensors = _file_tensors(checkpoint)

    auto_config = AutoConfig.from_pretrained(checkpoint)
    assert type(auto_config) is MiniCPMVConfig
    assert auto_config.num_hidden_layers == config["num_hidden_layers"]
    for auto_class in (AutoModel, AutoModelForCausalLM):
        model = auto_class.from_pretrained(checkpoint, dtype=torch.float32)
        assert type(model) is MiniCPMV, auto_class.__name__
        _assert_state_equal(model, tensors)


def test_auto_class_loading_is_strict_too(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path)
    index = _edit_shard(broken, lambda t: {k: v for k, v in t.items() if k != "llm.model.norm.weight"})
    del index["weight_map"]["llm.model.norm.weight"]
    (broken / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="llm.model.norm.weight"):
        AutoModelForCausalLM.from_pretrained(broken)


# ---------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        MiniCPMV.from_pretrained(missing)
    assert str(missing) in str(err.value)


def test_missing_config_json(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json") as err:
        MiniCPMV.from_pretrained(broken)
    assert str(broken) in str(err.value)


def test_no_weights(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path)
    for path in broken.glob("model*"):
        path.unlink()
    with pytest.raises(CheckpointError, match="has no weights") as err:
        MiniCPMV.from_pretrained(broken)
    assert "model.safetensors" in str(err.value) and "pytorch_model.bin" in str(err.value)


def test_index_naming_a_missing_shard(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path)
    (broken / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors") as err:
        MiniCPMV.from_pretrained(broken)
    assert INDEX in str(err.value)
    assert "model-00001-of-00002.safetensors" not in str(err.value)


def test_tensor_with_another_shape(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path)
    original = _file_tensors(tiny_checkpoint)["resampler.query"]
    assert tuple(original.shape) == (64, 128)

    def shrink(tensors):
        if "resampler.query" in tensors:
            tensors["resampler.query"] = tensors["resampler.query"][:63].clone()
        return tensors

    _edit_shard(broken, shrink)
    with pytest.raises(CheckpointError) as err:
        MiniCPMV.from_pretrained(broken, dtype=torch.bfloat16)
    message = str(err.value)
    assert "resampler.query" in message
    assert "(63, 128)" in message and "(64, 128)" in message


def test_tensor_missing_from_shard_and_index(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path)
    name = "llm.model.layers.1.mlp.up_proj.weight"
    index = _edit_shard(broken, lambda t: {k: v for k, v in t.items() if k != name})
    del index["weight_map"][name]
    (broken / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing") as err:
        MiniCPMV.from_pretrained(broken, dtype=torch.bfloat16)
    assert name in str(err.value)


def test_tensor_missing_from_shard_but_named_in_index(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path)
    name = "resampler.ln_post.weight"
    _edit_shard(broken, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError) as err:
        MiniCPMV.from_pretrained(broken, dtype=torch.bfloat16)
    assert name in str(err.value)


def test_unexpected_tensor(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path)
    index = json.loads((broken / INDEX).read_text())
    shard = broken / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    tensors["llm.model.layers.7.extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"]["llm.model.layers.7.extra.weight"] = shard.name
    (broken / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected") as err:
        MiniCPMV.from_pretrained(broken, dtype=torch.bfloat16)
    assert "llm.model.layers.7.extra.weight" in str(err.value)
