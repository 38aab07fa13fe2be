"""Export of a trained run (`minicpmv-export`): adapter, official-lora and merged layouts, and loading them back.

Every export must compute what the trained model computes (fp32 logits and beam-search answers for an image and
a prompt), differ from the untrained base, and keep the official on-disk format; bad inputs fail with a message
that names the problem.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import EXAMPLES, REPO

IMAGE = EXAMPLES / "images" / "clock.jpg"
MSGS = [{"role": "user", "content": "What time does the clock show?"}]
FULLY_TRAINED = ("vpm", "resampler", "embed_tokens")


# ------------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def trained_run(tiny_checkpoint, tmp_path_factory):
    """An Axolotl LoRA run on the tiny checkpoint: output_dir (final adapter, two checkpoint-N folders, tokenizer
    and config.json as Axolotl pre-saves them) and its YAML (examples/tiny_cpu.yml with absolute paths). The
    tests read the checkpoint names from the folder.

    Stand-in until the data pipeline is finished, then to be replaced by `python -m axolotl.cli.train` on that
    YAML: the tiny model is wrapped with peft exactly as Axolotl does it and every trainable tensor gets seeded
    noise (one "step" per checkpoint). `model` is the trained model in memory (fp32, eval); for a real run,
    load it with `PeftModel.from_pretrained(MiniCPMV.from_pretrained(base), output_dir)`.
    """
    from peft import LoraConfig, get_peft_model

    from axolotl_minicpmv import MiniCPMV, load_tokenizer
    from axolotl_minicpmv.integration.lora_targets import PRESETS

    root = tmp_path_factory.mktemp("run")
    output_dir = root / "tiny-lora"
    cfg = yaml.safe_load((REPO / "examples" / "tiny_cpu.yml").read_text())
    cfg.update(base_model=str(tiny_checkpoint), output_dir=str(output_dir), dataset_prepared_path=str(root / "prepared"))
    for ds in cfg["datasets"] + cfg.get("test_datasets", []):
        ds["path"] = str(REPO / ds["path"])
    config = root / "tiny_cpu.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    base = MiniCPMV.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PRESETS["llm_attn"],
        modules_to_save=list(FULLY_TRAINED), task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(base, lora)
    output_dir.mkdir()
    load_tokenizer(tiny_checkpoint).save_pretrained(output_dir)
    model.base_model.model.config.save_pretrained(output_dir)
    generator = torch.Generator().manual_seed(1234)
    for step in (1, 2):
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        model.save_pretrained(output_dir / f"checkpoint-{step}")
    model.save_pretrained(output_dir)
    # Inference as after loading: with parameters requiring grad, nn.MultiheadAttention (resampler) skips its
    # fused fast path and rounds differently (~1e-6), which is not what these tests compare.
    model.requires_grad_(False)
    return SimpleNamespace(config=config, output_dir=output_dir, base=tiny_checkpoint, model=model.eval())


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from axolotl_minicpmv import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def expected(trained_run, tokenizer):
    """Logits and beam-search answer of the trained model in memory, and of the untrained base."""
    from axolotl_minicpmv import MiniCPMV

    base = MiniCPMV.from_pretrained(trained_run.base, dtype=torch.float32).eval()
    return SimpleNamespace(
        logits=logits(trained_run.model, tokenizer), answer=answer(trained_run.model, tokenizer),
        base_logits=logits(base, tokenizer), base_answer=answer(base, tokenizer),
    )  # fmt: skip


def logits(model, tokenizer) -> torch.Tensor:
    from peft import PeftModel

    from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor, group_by_size, image_bounds, load_image

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    processor = MiniCPMVProcessor.from_config(tokenizer, inner.config)
    image = load_image(str(IMAGE))
    ids = processor.encode_prompt(processor.chat_prompt(MSGS, image)).unsqueeze(0)
    pixel_values, order = group_by_size(processor.pixel_values(image))
    bound = image_bounds(ids, tokenizer.im_start_id, tokenizer.im_end_id)
    with torch.no_grad():
        return inner(input_ids=ids, pixel_values=pixel_values, vision_order=order, image_bound=bound).logits


def answer(model, tokenizer) -> str:
    return model.chat(image=str(IMAGE), msgs=MSGS, tokenizer=tokenizer, sampling=False, max_new_tokens=12)[0]


def chat_answer(session) -> str:
    from axolotl_minicpmv import img2base64

    return session.chat({"image": img2base64(IMAGE), "question": json.dumps(MSGS)}, sampling=False, max_new_tokens=12)


def do_export(trained_run, fmt, out, **kwargs) -> Path:
    from axolotl_minicpmv.weights.export import export

    return export(kwargs.pop("source", trained_run.output_dir), fmt, out, **kwargs)


def trained_keys(model) -> set[str]:
    """state_dict keys of the fully trained modules in a model wrapped by get_peft_model without modules_to_save."""
    return {k for k in model.state_dict() if any(f".{m}." in f".{k}" for m in FULLY_TRAINED) and "lora_" not in k}


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    return SimpleNamespace(
        adapter=do_export(trained_run, "adapter", out / "adapter"),
        official=do_export(trained_run, "official-lora", out / "official"),
        merged32=do_export(trained_run, "merged", out / "merged32", dtype="float32"),
        merged=do_export(trained_run, "merged", out / "merged"),
    )


# ------------------------------------------------------------------------------------------- equality


def test_training_changed_the_model(expected):
    assert not torch.allclose(expected.logits, expected.base_logits)
    assert expected.answer != expected.base_answer


def test_adapter_export_loads_both_ways_exactly(trained_run, exports, expected, tokenizer):
    from peft import PeftModel

    from axolotl_minicpmv import MiniCPMV, MiniCPMVChat

    files = {p.name for p in exports.adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.model", "tokenizer_config.json"} <= files
    config = json.loads((exports.adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == list(FULLY_TRAINED)
    readme = (exports.adapter / "README.md").read_text()
    assert str(Path(trained_run.base).resolve()) in readme and "r=8" in readme
    assert 'adapter="adapter"' in readme and "incomplete" not in readme

    peft_model = PeftModel.from_pretrained(MiniCPMV.from_pretrained(trained_run.base, dtype=torch.float32), exports.adapter).eval()
    assert torch.equal(logits(peft_model, tokenizer), expected.logits)
    assert answer(peft_model, tokenizer) == expected.answer

    session = MiniCPMVChat(str(trained_run.base), adapter=str(exports.adapter), device="cpu", dtype=torch.float32)
    assert torch.equal(logits(session.model, tokenizer), expected.logits)
    assert chat_answer(session) == expected.answer


def test_fast_decoding_goes_through_the_adapter(trained_run, exports):
    from axolotl_minicpmv import MiniCPMVChat, img2base64

    question = {"image": img2base64(IMAGE), "question": json.dumps(MSGS)}
    greedy = dict(sampling=False, num_beams=1, max_new_tokens=12)
    tuned = MiniCPMVChat(str(trained_run.base), adapter=str(exports.adapter), device="cpu", dtype=torch.float32)
    base = MiniCPMVChat(str(trained_run.base), device="cpu", dtype=torch.float32)
    fast_answer = tuned.chat(question, fast=True, **greedy)
    assert fast_answer == tuned.chat(question, **greedy)
    assert fast_answer != base.chat(question, fast=True, **greedy)


def test_official_lora_export_loads_the_seeds_way(trained_run, exports, expected, tokenizer):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from axolotl_minicpmv import MiniCPMV, MiniCPMVChat

    config = json.loads((exports.official / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    lora_tensors = load_file(exports.official / "adapter_model.safetensors")
    assert lora_tensors and all(".lora_" in k for k in lora_tensors)

    model = get_peft_model(MiniCPMV.from_pretrained(trained_run.base, dtype=torch.float32), LoraConfig.from_pretrained(exports.official))
    full = torch.load(exports.official / "vpm_resampler_embedtokens.pt", weights_only=True)
    assert type(full) is dict and "base_model.model.llm.model.embed_tokens.weight" in full
    result = model.load_state_dict(full, strict=False)
    assert result.unexpected_keys == []
    assert trained_keys(model) & set(result.missing_keys) == set()
    assert trained_keys(model) == set(full)
    set_peft_model_state_dict(model, lora_tensors)
    model.eval()
    assert torch.equal(logits(model, tokenizer), expected.logits)
    assert answer(model, tokenizer) == expected.answer

    session = MiniCPMVChat(str(trained_run.base), adapter=str(exports.official), device="cpu", dtype=torch.float32)
    assert torch.equal(logits(session.model, tokenizer), expected.logits)
    assert chat_answer(session) == expected.answer


def test_merged_fp32_export_equals_trained_model(trained_run, exports, expected, tokenizer):
    from peft import PeftModel

    from axolotl_minicpmv import MiniCPMV, MiniCPMVChat
    from axolotl_minicpmv.weights.loading import load_model

    merged = MiniCPMV.from_pretrained(exports.merged32, dtype=torch.float32).eval()
    # bit for bit what peft's own float32 merge of the run's adapter gives
    reference = PeftModel.from_pretrained(MiniCPMV.from_pretrained(trained_run.base, dtype=torch.float32), trained_run.output_dir)
    reference = reference.merge_and_unload().state_dict()
    state = merged.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    # merged weights compute the unmerged LoRA sum up to float32 rounding
    torch.testing.assert_close(logits(merged, tokenizer), expected.logits, rtol=0, atol=1e-4)
    assert answer(merged, tokenizer) == expected.answer
    assert chat_answer(MiniCPMVChat(str(exports.merged32), device="cpu", dtype=torch.float32)) == expected.answer
    merged_on_load = load_model(trained_run.base, adapter=exports.adapter, dtype=torch.float32, merge=True)
    assert all(torch.equal(v, state[k]) for k, v in merged_on_load.state_dict().items())


def test_a_merged_export_loads_in_the_dtype_it_was_written_in(exports):
    """transformers loads a checkpoint in the dtype its config names: the copied config must name the export's."""
    from axolotl_minicpmv import MiniCPMV

    for folder, dtype in ((exports.merged32, torch.float32), (exports.merged, torch.bfloat16)):
        assert json.loads((folder / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
        assert MiniCPMV.from_pretrained(folder).dtype == dtype


def test_lora_on_lm_head_merges_and_exports_as_peft_does(trained_run, tmp_path):
    """PEFT saves the base weight of a LoRA-targeted lm_head as `llm.lm_head.base_layer.weight`: the base's own
    tensor under the wrapped name, which must not read as a tensor of another base model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    from axolotl_minicpmv import MiniCPMV
    from axolotl_minicpmv.weights.loading import load_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    model = get_peft_model(MiniCPMV.from_pretrained(trained_run.base, dtype=torch.float32), lora)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    run = tmp_path / "lm-head-run"
    model.save_pretrained(run)
    assert "base_model.model.llm.lm_head.base_layer.weight" in load_file(run / "adapter_model.safetensors")
    base = MiniCPMV.from_pretrained(trained_run.base, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, run).merge_and_unload().state_dict()
    merged = load_model(trained_run.base, adapter=run, dtype=torch.float32, merge=True).state_dict()
    assert merged.keys() == reference.keys() and all(torch.equal(merged[k], reference[k]) for k in merged)
    exported = do_export(trained_run, "merged", tmp_path / "merged", source=run, base_model=str(trained_run.base), dtype="float32")
    written = MiniCPMV.from_pretrained(exported).state_dict()
    assert all(torch.equal(written[k], reference[k]) for k in written)


def test_a_symlinked_out_dir_receives_the_export(trained_run, tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    do_export(trained_run, "adapter", link)
    assert link.is_symlink() and (real / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_merged_bf16_export_is_in_the_official_format(trained_run, exports):
    from safetensors import safe_open

    base, out = Path(trained_run.base), exports.merged
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    size = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as new, safe_open(base / shard, "pt") as old:
            assert new.metadata() == {"format": "pt"}
            assert set(new.keys()) == set(old.keys())
            for name in new.keys():
                assert new.get_slice(name).get_shape() == old.get_slice(name).get_shape(), name
                assert new.get_slice(name).get_dtype() == "BF16", name
                size += new.get_tensor(name).numel() * 2
    assert index["metadata"]["total_size"] == size
    for name in (
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert not (out / "adapter_config.json").exists()
    # the bf16 shards are the float32 merge rounded once
    with safe_open(out / shards[0], "pt") as bf16, safe_open(exports.merged32 / shards[0], "pt") as fp32:
        assert all(torch.equal(bf16.get_tensor(k), fp32.get_tensor(k).to(torch.bfloat16)) for k in bf16.keys())


# ------------------------------------------------------------------------------------------- sources


def test_checkpoint_and_yaml_sources(trained_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    first, *_, last = checkpoints(trained_run.output_dir)
    out = do_export(trained_run, "adapter", tmp_path / "first", checkpoint=first)
    saved = load_file(trained_run.output_dir / first / "adapter_model.safetensors")
    exported = load_file(out / "adapter_model.safetensors")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    final = load_file(trained_run.output_dir / "adapter_model.safetensors")
    assert not all(torch.equal(final[k], saved[k]) for k in saved)

    # a YAML with paths relative to the current directory, as Axolotl reads them
    monkeypatch.chdir(trained_run.output_dir.parent)
    relative = tmp_path / "relative.yml"
    base = os.path.relpath(trained_run.base)
    relative.write_text(yaml.safe_dump({"base_model": base, "output_dir": f"./{trained_run.output_dir.name}"}))
    out = do_export(trained_run, "adapter", tmp_path / "from-yaml", source=relative, checkpoint=last.split("-")[1])
    exported = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(exported[k], final[k]) for k in final)


def test_deepspeed_bin_and_bf16_adapter(trained_run, tmp_path, expected, tokenizer):
    """ZeRO-2/3 runs save the gathered 16-bit weights via save_pretrained; older setups write adapter_model.bin."""
    from safetensors.torch import load_file

    from axolotl_minicpmv.weights.loading import load_model

    run = tmp_path / "zero-run"
    run.mkdir()
    shutil.copy(trained_run.output_dir / "adapter_config.json", run)
    state = load_file(trained_run.output_dir / "adapter_model.safetensors")
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, run / "adapter_model.bin")
    out = do_export(trained_run, "merged", tmp_path / "merged", source=run, dtype="float32", base_model=str(trained_run.base))
    adapter = do_export(trained_run, "adapter", tmp_path / "adapter", source=run, base_model=str(trained_run.base))
    merged = load_model(out, dtype=torch.float32).eval()
    unmerged = load_model(trained_run.base, adapter=adapter, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, tokenizer), logits(unmerged, tokenizer), rtol=0, atol=1e-4)
    assert not torch.allclose(logits(merged, tokenizer), expected.base_logits)


def test_qlora_run_merges_onto_the_unquantised_base(trained_run, exports, tmp_path, caplog):
    cfg = yaml.safe_load(trained_run.config.read_text())
    cfg.update(adapter="qlora", load_in_4bit=True)
    config = tmp_path / "qlora.yml"
    config.write_text(yaml.safe_dump(cfg))
    with caplog.at_level("WARNING", logger="axolotl_minicpmv.weights.export"):
        out = do_export(trained_run, "merged", tmp_path / "merged", source=config)
    assert "quantized base (adapter: qlora, load_in_4bit)" in caplog.text and "unquantized base" in caplog.text
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (out / shard).read_bytes() == (exports.merged / shard).read_bytes()


# ------------------------------------------------------------------------------------------- bad input


def checkpoints(run_dir: Path) -> list[str]:
    return sorted((p.name for p in run_dir.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def copy_run(trained_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run.output_dir, run)
    return run


def test_missing_and_partial_runs(trained_run, tmp_path):
    from axolotl_minicpmv.weights.export import ExportError

    with pytest.raises(ExportError, match="does not exist"):
        do_export(trained_run, "adapter", tmp_path / "out", source=tmp_path / "nowhere")
    run = copy_run(trained_run, tmp_path)
    (run / "adapter_model.safetensors").unlink()  # Axolotl pre-saved adapter_config.json; training did not finish
    found = ", ".join(checkpoints(run))
    with pytest.raises(ExportError, match=f"has not finished.*Checkpoints found: {found}; export one with --checkpoint"):
        do_export(trained_run, "adapter", tmp_path / "out", source=run)
    with pytest.raises(ExportError, match=f"no checkpoint-999; checkpoints found: {found}"):
        do_export(trained_run, "adapter", tmp_path / "out", source=run, checkpoint="checkpoint-999")
    last = checkpoints(run)[-1]
    truncated = run / last / "adapter_model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(ExportError, match="incomplete or corrupt"):
        do_export(trained_run, "merged", tmp_path / "out", source=run, checkpoint=last)
    shutil.rmtree(run / last)
    (run / last).mkdir()
    with pytest.raises(ExportError, match=f"{last}' holds no adapter"):
        do_export(trained_run, "merged", tmp_path / "out", source=run, checkpoint=last)
    with pytest.raises(ExportError, match="unknown export format 'gguf'"):
        do_export(trained_run, "gguf", tmp_path / "out")
    config = tmp_path / "no-output.yml"
    config.write_text("base_model: x\n")
    with pytest.raises(ExportError, match="has no `output_dir`"):
        do_export(trained_run, "adapter", tmp_path / "out", source=config)
    (run / checkpoints(run)[0] / "adapter_config.json").write_text('{"r": 8, ')  # a save cut short
    with pytest.raises(ExportError, match=r"adapter_config\.json is not valid JSON"):
        do_export(trained_run, "adapter", tmp_path / "out", source=run, checkpoint=checkpoints(run)[0])
    assert not (tmp_path / "out").exists()


def test_adapter_from_another_base_names_the_tensor(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from axolotl_minicpmv import MiniCPMVChat
    from axolotl_minicpmv.weights.adapters import AdapterError
    from axolotl_minicpmv.weights.export import ExportError

    run = copy_run(trained_run, tmp_path)
    state = load_file(run / "adapter_model.safetensors")
    key = "base_model.model.llm.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(8, 256)  # a decoder twice as wide
    state["base_model.model.resampler.query"] = torch.zeros(64, 256)
    save_file(state, run / "adapter_model.safetensors")
    message = r"llm\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: shape \(8, 256\).*q_proj\.weight of shape \(128, 128\)"
    with pytest.raises(ExportError, match=message):
        do_export(trained_run, "merged", tmp_path / "out", source=run)
    with pytest.raises(ExportError, match=r"resampler\.query: shape \(64, 256\) in the adapter, \(64, 128\) in the base"):
        do_export(trained_run, "adapter", tmp_path / "out", source=run)
    with pytest.raises(AdapterError, match="trained on another base model"):
        MiniCPMVChat(str(trained_run.base), adapter=str(run), device="cpu")

    state = {
        k: (torch.empty(0) if "lora_A" in k else v) for k, v in load_file(trained_run.output_dir / "adapter_model.safetensors").items()
    }
    save_file(state, run / "adapter_model.safetensors")
    with pytest.raises(ExportError, match="stage3_gather_16bit_weights_on_model_save"):
        do_export(trained_run, "adapter", tmp_path / "out", source=run)


def test_out_dir_is_refused_replaced_or_left_untouched(trained_run, tmp_path):
    from axolotl_minicpmv.weights.export import ExportError

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty.*--overwrite"):
        do_export(trained_run, "adapter", out)
    with pytest.raises(ExportError, match="would replace"):
        do_export(trained_run, "adapter", trained_run.output_dir, overwrite=True)

    # a failure while writing leaves neither a half export nor a damaged old one
    run = copy_run(trained_run, tmp_path)
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ExportError, match="DoRA"):
        do_export(trained_run, "merged", out, source=run, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    do_export(trained_run, "adapter", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_loading_refuses_the_wrong_kind_of_folder(trained_run, exports):
    from axolotl_minicpmv import MiniCPMVChat
    from axolotl_minicpmv.weights.adapters import AdapterError
    from axolotl_minicpmv.weights.loading import CheckpointError, load_model

    with pytest.raises(AdapterError, match=r"full model checkpoint.*MiniCPMVChat\("):
        MiniCPMVChat(str(trained_run.base), adapter=str(exports.merged), device="cpu")
    with pytest.raises(CheckpointError, match="is an adapter, not a model"):
        load_model(exports.adapter)
    with pytest.raises(CheckpointError, match="is an adapter, not a model"):  # Axolotl saves a config.json beside it
        load_model(trained_run.output_dir)


def test_cli_export(trained_run, tmp_path):
    out = tmp_path / "cli-out"
    result = subprocess.run(
        [sys.executable, "-m", "axolotl_minicpmv", "export", str(trained_run.config), "--format", "official-lora", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote official-lora export to {out}" in result.stdout
    assert "vpm_resampler_embedtokens.pt" in result.stdout and "adapter_model.safetensors" in result.stdout
