"""The real Axolotl CLI with the plugin: train (python -m and accelerate launch --cpu), resume, preprocess,
evaluate, merge-lora refusal and config errors, on the tiny generated checkpoint and examples/data."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from conftest import EXAMPLES, REPO

BIN = Path(sys.executable).parent


def run(args, cwd, timeout=600):
    # Axolotl's CLI starts `accelerate` by name: the venv's bin must be on PATH.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def logged(output: str, key: str) -> list[dict]:
    """The metric dicts Axolotl prints (values are strings) that contain `key`."""
    rows = []
    for line in output.splitlines():
        if f"'{key}'" in line and "{" in line:
            rows.append(ast.literal_eval(line[line.index("{") : line.rindex("}") + 1]))
    return rows


def write_config(folder: Path, base: Path, **overrides) -> Path:
    cfg = yaml.safe_load((REPO / "examples" / "tiny_cpu.yml").read_text())
    cfg.update(
        base_model=str(base),
        datasets=[{"path": str(EXAMPLES / "train.json"), "type": "axolotl_minicpmv.minicpmv_chat"}],
        test_datasets=[{"path": str(EXAMPLES / "eval.json"), "type": "axolotl_minicpmv.minicpmv_chat", "split": "train"}],
        dataset_prepared_path=str(folder / "prepared"),
        output_dir=str(folder / "out"),
        minicpmv_max_slice_nums=1,  # small vision work: the layouts are tested elsewhere
        max_steps=4,
        save_steps=2,
        eval_steps=4,
        learning_rate=0.005,
    )
    cfg.update(overrides)
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    config = write_config(folder, tiny_checkpoint)
    rc, output = run([sys.executable, "-m", "axolotl.cli.train", str(config)], REPO)
    assert rc == 0, output[-4000:]
    return config, folder / "out", output


def test_train_logs_losses_eval_targets_and_counts(trained):
    _, _, output = trained
    losses = [float(row["loss"]) for row in logged(output, "loss")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert logged(output, "eval_loss"), "no eval loss reported"
    assert "LoRA targets: 8 modules" in output  # llm_attn preset: q, k, v, o of 2 layers
    assert "MiniCPM-V parameters: Total" in output
    assert "minicpmv/samples_per_second" in output


def test_adapter_holds_lora_and_the_fully_trained_modules(trained):
    _, out, _ = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) >= {"vpm", "resampler", "embed_tokens"}
    with safe_open(out / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert any("self_attn.q_proj.lora_A" in k for k in keys)
    for module in ("vpm.", "resampler.", "embed_tokens"):
        assert any(module in k for k in keys), module
    assert any("resampler.pos_embed" in k or "resampler" in k and "query" in k for k in keys)


def test_loss_falls_when_over_fitting(tiny_checkpoint, tmp_path):
    two = tmp_path / "two.json"
    samples = json.loads((EXAMPLES / "train.json").read_text())[:2]
    for sample in samples:  # keep the image paths valid from the new location
        if isinstance(sample.get("image"), str):
            sample["image"] = str(EXAMPLES / sample["image"])
        elif isinstance(sample.get("image"), list):
            sample["image"] = [str(EXAMPLES / p) for p in sample["image"]]
    two.write_text(json.dumps(samples))
    config = write_config(tmp_path, tiny_checkpoint, max_steps=8, save_steps=100, eval_strategy="no", eval_steps=None, test_datasets=None,
                          datasets=[{"path": str(two), "type": "axolotl_minicpmv.minicpmv_chat"}], learning_rate=0.01)
    rc, output = run([sys.executable, "-m", "axolotl.cli.train", str(config)], REPO)
    assert rc == 0, output[-4000:]
    losses = [float(row["loss"]) for row in logged(output, "loss")]
    assert losses[-1] < losses[0] - 0.5, losses


def test_resume_from_checkpoint_continues_with_the_same_step_count(trained, tmp_path):
    config, out, _ = trained
    cfg = yaml.safe_load(config.read_text())
    cfg.update(output_dir=str(out), resume_from_checkpoint=str(out / "checkpoint-2"))
    resumed = tmp_path / "resume.yml"
    resumed.write_text(yaml.safe_dump(cfg))
    rc, output = run([sys.executable, "-m", "axolotl.cli.train", str(resumed)], REPO)
    assert rc == 0, output[-4000:]
    assert len(logged(output, "loss")) == 2  # steps 3 and 4 only
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_accelerate_launch_cpu(tiny_checkpoint, tmp_path):
    config = write_config(tmp_path, tiny_checkpoint, max_steps=2, save_steps=2, eval_steps=2)
    rc, output = run([str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "axolotl.cli.train", str(config)], REPO)
    assert rc == 0, output[-4000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_preprocess_caches_and_reports_bad_samples(tiny_checkpoint, tmp_path):
    config = write_config(tmp_path, tiny_checkpoint)
    cfg = yaml.safe_load(config.read_text())
    del cfg["bf16"], cfg["fp16"]  # unset on CPU: the plugin picks float32 and says so
    config.write_text(yaml.safe_dump(cfg))
    rc, output = run([str(BIN / "axolotl"), "preprocess", str(config)], REPO)
    assert rc == 0, output[-4000:]
    assert "training in float32" in output
    assert any((tmp_path / "prepared").iterdir())

    bad = json.loads((EXAMPLES / "train.json").read_text())[:4]  # two stay valid (preprocess samples from >= 2 rows)
    bad[0]["image"] = "images/missing.jpg"
    bad[1]["conversations"][0]["role"] = "assistant"
    for sample in bad[2:]:
        if isinstance(sample.get("image"), str):
            sample["image"] = str(EXAMPLES / sample["image"])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cfg.update(datasets=[{"path": str(tmp_path / "bad.json"), "type": "axolotl_minicpmv.minicpmv_chat"}], test_datasets=None,
               dataset_prepared_path=str(tmp_path / "prepared-bad"))
    config.write_text(yaml.safe_dump(cfg))
    rc, output = run([str(BIN / "axolotl"), "preprocess", str(config)], REPO)
    assert rc != 0
    assert bad[0]["id"] in output and "missing.jpg" in output
    assert bad[1]["id"] in output and "user" in output

    cfg["minicpmv_skip_bad_samples"] = True
    config.write_text(yaml.safe_dump(cfg))
    rc, output = run([str(BIN / "axolotl"), "preprocess", str(config)], REPO)
    assert rc == 0, output[-4000:]
    assert "skipped" in output.lower()


def test_evaluate_reports_eval_loss_of_the_trained_adapter(trained, tmp_path):
    config, out, _ = trained
    cfg = yaml.safe_load(config.read_text())
    cfg.update(lora_model_dir=str(out), output_dir=str(tmp_path / "eval"))
    evaluated = tmp_path / "evaluate.yml"
    evaluated.write_text(yaml.safe_dump(cfg))
    rc, output = run([str(BIN / "axolotl"), "evaluate", str(evaluated)], REPO)
    assert rc == 0, output[-4000:]
    assert "eval_loss" in output


def test_merge_lora_is_refused_and_points_at_the_export(trained):
    config, out, _ = trained
    rc, output = run([str(BIN / "axolotl"), "merge-lora", str(config)], REPO)
    assert rc != 0 and "minicpmv-export" in output
    assert not (out / "merged").exists()


def test_a_target_pattern_matching_nothing_stops_before_training(tiny_checkpoint, tmp_path):
    config = write_config(tmp_path, tiny_checkpoint, lora_target_modules=r"nothing\.matches")
    rc, output = run([sys.executable, "-m", "axolotl.cli.train", str(config)], REPO)
    assert rc != 0 and "matches no linear module" in output
    assert not logged(output, "loss")
