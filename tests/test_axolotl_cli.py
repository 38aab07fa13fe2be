"""The real Axolotl CLI with the plugin, end to end, as separate processes (no mocks), on the tiny generated
checkpoint and a copy of examples/data:

- `axolotl preprocess` prepares and caches the data (the training run then loads that cache), states the float32
  choice on CPU when bf16/fp16 are unset, and reports bad samples by id and reason (or skips them when asked);
- `python -m axolotl.cli.train`: finite losses, eval loss, LoRA targets and parameter counts in the log, an adapter
  with the LoRA tensors AND full trained copies of vpm / resampler / embed_tokens;
- resuming from checkpoint-2 continues at step 3 and ends at max_steps with the losses of the uninterrupted run;
- `accelerate launch --cpu --num_processes 1` over-fits two samples (the loss falls) and saves the adapter; with
  `minicpmv_compile_layers` the same run starts from the same loss and over-fits too;
- `axolotl evaluate` on base + trained adapter reports the eval loss the training run ended with;
- `axolotl merge-lora` is refused (pointing at minicpmv-export) and writes nothing;
- a `lora_target_modules` pattern that matches nothing stops the run before training;
- one training run on the dataset entries of every examples/<format>.yml (LLaVA JSON, messages JSONL, content parts
  in Parquet with embedded bytes, a save_to_disk folder), and skip mode on a file mixing formats with bad samples.

Budget: one module-scoped preprocess + training run shared by most tests; about 10 CLI processes of ~20-35 s
each on 2 CPU cores. Every command's output is also written next to its config (`*.log`) for diagnosis.
"""

from __future__ import annotations

import ast
import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EXAMPLES, REPO
from safetensors import safe_open

BIN = Path(sys.executable).parent
PYTHON = sys.executable
AXOLOTL = str(BIN / "axolotl")
ACCELERATE = str(BIN / "accelerate")
DATASET_TYPE = "axolotl_minicpmv.minicpmv_chat"
FULLY_TRAINED = {"vpm": "vpm.", "resampler": "resampler.", "embed_tokens": "llm.model.embed_tokens."}
MAX_STEPS = 4


# --------------------------------------------------------------------------------------------- helpers


def run(args, log: Path, timeout: int = 300, **extra_env: str) -> tuple[int, str]:
    """Run a CLI command from the repo root; return (exit code, stdout + stderr) and keep the output in `log`."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # Axolotl's CLI starts `accelerate` by name: the venv's bin must be on PATH.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # CPU tests, also on a machine with a GPU (the float32 choice and the timings depend on it).
        "CUDA_VISIBLE_DEVICES": "",
        **extra_env,
    }
    # Its own process group, so a run past `timeout` is stopped with every process it started (the
    # ranks of `accelerate launch` would otherwise live on, waiting for each other).
    process = subprocess.Popen(
        [str(a) for a in args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n[stopped after {timeout} s]"
    output = stdout + stderr
    log.write_text(output)
    return process.returncode, output


def accelerate_train(config) -> list:
    """`accelerate launch` of Axolotl's train CLI in one CPU process, as a user starts it."""
    launch = ["launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [ACCELERATE, *launch, "-m", "axolotl.cli.train", config]


def logged(output: str, key: str) -> list[dict]:
    """The metric dicts the trainer prints (values are strings) that contain `key`, in order.

    The progress bars share lines with them, so dicts are found anywhere in the text, not per line.
    """
    rows = []
    for match in re.finditer(r"\{'[^{}\n]*\}", output):
        try:
            row = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError):
            continue
        if isinstance(row, dict) and key in row:
            rows.append(row)
    return rows


def values(output: str, key: str) -> list[float]:
    return [float(row[key]) for row in logged(output, key)]


def tail(output: str, n: int = 6000) -> str:
    return output[-n:]


def write_config(folder: Path, base: Path, data: Path, name: str = "config.yml", drop=(), **overrides) -> Path:
    """examples/tiny_cpu.yml made small: absolute paths into `folder`, 1 slice per image, 4 steps."""
    cfg = yaml.safe_load((REPO / "examples" / "tiny_cpu.yml").read_text())
    cfg.update(
        base_model=str(base),
        datasets=[{"path": str(data / "train.json"), "type": DATASET_TYPE}],
        test_datasets=[{"path": str(data / "eval.json"), "type": DATASET_TYPE, "split": "train"}],
        dataset_prepared_path=str(folder / "prepared"),
        output_dir=str(folder / "out"),
        minicpmv_max_slice_nums=1,  # keeps the vision work small: slicing layouts are tested elsewhere
        max_steps=MAX_STEPS,
        save_steps=2,
        eval_steps=2,
        learning_rate=0.005,
    )
    cfg.update(overrides)
    for key in drop:
        cfg.pop(key, None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def base_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        out.update(tensors(shard))
    return out


@dataclass
class Run:
    config: Path
    folder: Path
    rc: int
    output: str

    @property
    def out(self) -> Path:
        return self.folder / "out"

    @property
    def prepared(self) -> Path:
        return self.folder / "prepared"


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A copy of examples/data (JSON files + images), so datasets written next to it keep relative image paths."""
    target = tmp_path_factory.mktemp("data") / "data"
    shutil.copytree(EXAMPLES, target)
    return target


@pytest.fixture(scope="module")
def preprocessed(tiny_checkpoint, data, tmp_path_factory) -> Run:
    """`axolotl preprocess` on the main config, which leaves bf16/fp16 unset (the plugin must pick float32 on CPU)."""
    folder = tmp_path_factory.mktemp("cli")
    config = write_config(folder, tiny_checkpoint, data, drop=("bf16", "fp16"))
    rc, output = run([AXOLOTL, "preprocess", config], folder / "preprocess.log")
    return Run(config, folder, rc, output)


@pytest.fixture(scope="module")
def trained(preprocessed) -> Run:
    """`python -m axolotl.cli.train` on the same config, after preprocessing: 4 steps, eval and save every 2."""
    rc, output = run([PYTHON, "-m", "axolotl.cli.train", preprocessed.config], preprocessed.folder / "train.log")
    assert rc == 0, tail(output)
    return Run(preprocessed.config, preprocessed.folder, rc, output)


@pytest.fixture(scope="module")
def overfit(tiny_checkpoint, data, tmp_path_factory) -> Run:
    """`accelerate launch --cpu --num_processes 1` on two samples for 8 steps (the same batch every step), no eval,
    no intermediate checkpoint: the adapter is written once, at the end."""
    folder = tmp_path_factory.mktemp("overfit")
    samples = json.loads((data / "train.json").read_text())[:2]
    (data / "two.json").write_text(json.dumps(samples))
    config = write_config(
        folder,
        tiny_checkpoint,
        data,
        datasets=[{"path": str(data / "two.json"), "type": DATASET_TYPE}],
        max_steps=8,
        save_steps=1000,
        eval_strategy="no",
        learning_rate=0.01,
        drop=("test_datasets", "eval_steps"),
    )
    rc, output = run(accelerate_train(config), folder / "train.log")
    return Run(config, folder, rc, output)


# --------------------------------------------------------------------------------------------- preprocess


def test_preprocess_prepares_and_caches_the_dataset_and_picks_float32(preprocessed, trained):
    assert preprocessed.rc == 0, tail(preprocessed.output)
    assert "Success! Preprocessed data path" in preprocessed.output
    # bf16/fp16 unset on a machine without CUDA: the plugin says it trains in float32 (not Axolotl's fp16 default)
    assert "no CUDA device and bf16/fp16 unset; training in float32" in preprocessed.output
    assert '"fp16": false' in preprocessed.output and '"bf16": false' in preprocessed.output

    # the plugin's validated Parquet files + their metadata, and Axolotl's tokenized datasets
    minicpmv_data = preprocessed.prepared / "minicpmv_data"
    metas = {p.name.split("-")[0]: json.loads(p.read_text()) for p in minicpmv_data.glob("*.json")}
    assert {k: v["num_samples"] for k, v in metas.items()} == {"train": 16, "eval": 4}
    assert len(list(minicpmv_data.glob("*.parquet"))) == 2
    tokenized = sorted(p for p in preprocessed.prepared.iterdir() if (p / "dataset_info.json").is_file())
    assert len(tokenized) == 2, list(preprocessed.prepared.iterdir())  # train and test split

    # the training run with the same config reuses both caches instead of preparing again
    assert trained.output.count("reusing prepared dataset") == 2, tail(trained.output)
    for folder in tokenized:
        assert f"Loading prepared dataset from disk at {folder}" in trained.output
    assert "Unable to find prepared dataset" not in trained.output


def test_preprocess_reports_bad_samples_by_id_and_reason_or_skips_them(tiny_checkpoint, data, tmp_path):
    samples = json.loads((data / "train.json").read_text())[:4]  # two stay valid
    samples[0]["image"] = "images/missing.jpg"
    samples[1]["conversations"] = samples[1]["conversations"][1:]  # starts with the assistant
    (data / "bad.json").write_text(json.dumps(samples))
    bad_ids = samples[0]["id"], samples[1]["id"]
    datasets = [{"path": str(data / "bad.json"), "type": DATASET_TYPE}]

    config = write_config(tmp_path, tiny_checkpoint, data, datasets=datasets, drop=("test_datasets", "eval_steps"), eval_strategy="no")
    rc, output = run([AXOLOTL, "preprocess", config], tmp_path / "bad.log")
    assert rc != 0, tail(output)
    assert "2 of 4 samples are invalid" in output, tail(output)
    assert f"sample {bad_ids[0]!r} (index 0): image 'images/missing.jpg' not found" in output
    assert f"sample {bad_ids[1]!r} (index 1): the first turn is 'assistant'; it must be 'user'" in output
    assert "minicpmv_skip_bad_samples" in output  # names the way out
    assert not list((tmp_path / "prepared").rglob("*.parquet"))  # nothing half-prepared

    config = write_config(
        tmp_path,
        tiny_checkpoint,
        data,
        datasets=datasets,
        drop=("test_datasets", "eval_steps"),
        eval_strategy="no",
        minicpmv_skip_bad_samples=True,
        name="skip.yml",
    )
    rc, output = run([AXOLOTL, "preprocess", config], tmp_path / "skip.log")
    assert rc == 0, tail(output)
    assert "skipped 2 of 4 samples (minicpmv_skip_bad_samples: true)" in output
    for bad_id in bad_ids:
        assert f"skipping sample {bad_id!r}" in output
    (meta,) = [json.loads(p.read_text()) for p in (tmp_path / "prepared" / "minicpmv_data").glob("*.json")]
    assert (meta["num_samples"], meta["num_skipped"]) == (2, 2)
    assert "Success! Preprocessed data path" in output


# --------------------------------------------------------------------------------------------- train


def test_train_logs_finite_losses_eval_loss_targets_and_parameter_counts(trained):
    losses = values(trained.output, "loss")
    assert len(losses) == MAX_STEPS, tail(trained.output)
    # finite and not the 0.0 of the fp16-on-CPU failure (bf16/fp16 are unset in this config)
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    eval_losses = values(trained.output, "eval_loss")
    assert len(eval_losses) >= MAX_STEPS // 2 and all(math.isfinite(x) for x in eval_losses), eval_losses
    assert "training in float32" in trained.output

    # what PEFT wrapped, read from the model: llm_attn is q/k/v/o x 2 layers, nothing in the fully trained tower
    assert "LoRA wrapped 8 modules in llm (e.g. llm.model.layers.0.self_attn.q_proj)\n" in trained.output, tail(trained.output)
    counts = re.search(r"MiniCPM-V parameters: Total ([\d,]+) / Trainable ([\d,]+)", trained.output)
    assert counts, tail(trained.output)
    total, trainable = (int(x.replace(",", "")) for x in counts.groups())
    assert 0 < trainable < total
    assert "minicpmv/samples_per_second" in trained.output

    state = json.loads((trained.out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    assert (trained.out / "checkpoint-2").is_dir()


def test_adapter_holds_trained_lora_and_full_copies_of_the_trained_modules(trained, tiny_checkpoint):
    config = json.loads((trained.out / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) >= set(FULLY_TRAINED)
    saved = tensors(trained.out / "adapter_model.safetensors")
    base = base_tensors(tiny_checkpoint)

    # LoRA A and B on q/k/v/o of every decoder layer; B starts at zero, so non-zero B means it was trained
    layers = sorted({int(m.group(1)) for k in base if (m := re.match(r"llm\.model\.layers\.(\d+)\.self_attn\.q_proj\.weight$", k))})
    assert layers
    for layer in layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = f"base_model.model.llm.model.layers.{layer}.self_attn.{proj}"
            assert f"{prefix}.lora_A.weight" in saved, prefix
            assert saved[f"{prefix}.lora_B.weight"].abs().max() > 0, prefix

    # a full, trained copy of every vpm / resampler / embed_tokens tensor of the base (biases, pos_embed, query too)
    for module, prefix in FULLY_TRAINED.items():
        names = [k for k in base if k.startswith(prefix)]
        assert names, module
        changed = 0
        for name in names:
            key = f"base_model.model.{name}"
            assert key in saved, f"{module}: {name} missing from the adapter"
            assert saved[key].shape == base[name].shape, name
            changed += bool((saved[key].float() - base[name].float()).abs().max() > 1e-3)
        assert changed, f"{module}: saved copy equals the base (not trained?)"


def test_resume_from_checkpoint_continues_at_step_3_with_the_same_step_count(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained.out, out, ignore=shutil.ignore_patterns(f"checkpoint-{MAX_STEPS}"))
    rc, output = run(
        [PYTHON, "-m", "axolotl.cli.train", trained.config, "--output_dir", out, "--resume_from_checkpoint", out / "checkpoint-2"],
        tmp_path / "resume.log",
    )
    assert rc == 0, tail(output)

    # only steps 3 and 4 ran (epoch 0.375 and 0.5 with 8 steps per epoch), not a fresh 4 steps from step 1
    rows = logged(output, "loss")
    assert [float(r["epoch"]) for r in rows] == [0.375, 0.5], rows

    resumed = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    original = json.loads((trained.out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    assert resumed["global_step"] == MAX_STEPS
    resumed_losses = {h["step"]: h["loss"] for h in resumed["log_history"] if "loss" in h}
    original_losses = {h["step"]: h["loss"] for h in original["log_history"] if "loss" in h}
    assert sorted(resumed_losses) == [1, 2, 3, 4]  # the history of steps 1-2 came from checkpoint-2
    # weights, optimizer, scheduler and data order restored: steps 3-4 match the uninterrupted run
    for step in (3, 4):
        assert math.isclose(resumed_losses[step], original_losses[step], rel_tol=1e-3), (step, resumed_losses, original_losses)
    assert (out / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------------------------- accelerate launch


def test_accelerate_launch_cpu_trains_and_saves_the_adapter(overfit):
    assert overfit.rc == 0, tail(overfit.output)
    assert len(values(overfit.output, "loss")) == 8
    assert '"world_size": 1' in overfit.output
    saved = tensors(overfit.out / "adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in saved.items())
    assert any(k.startswith("base_model.model.resampler.") for k in saved)
    # no intermediate checkpoint: the trainer saves once, at the last step, and Axolotl writes the final adapter
    assert [p.name for p in overfit.out.glob("checkpoint-*")] == ["checkpoint-8"]


def test_loss_falls_when_over_fitting_two_samples(overfit):
    assert overfit.rc == 0, tail(overfit.output)
    losses = values(overfit.output, "loss")
    assert all(math.isfinite(x) for x in losses), losses
    assert all(x < losses[0] for x in losses[1:]) and losses[-1] < 0.7 * losses[0], losses


def test_compiled_decoder_layers_train_with_the_eager_losses(overfit, tmp_path):
    """`minicpmv_compile_layers: true` (without gradient checkpointing, as it is meant to run) over-fits
    like the eager, checkpointed run from the same first loss, and the plugin says what it compiled."""
    assert overfit.rc == 0, tail(overfit.output)
    cfg = yaml.safe_load(overfit.config.read_text())
    cfg.update(
        minicpmv_compile_layers=True,
        gradient_checkpointing=False,
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    config = tmp_path / "compiled.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc, output = run(accelerate_train(config), tmp_path / "train.log")
    assert rc == 0, tail(output)
    assert "MiniCPM-V: compiling 2 decoder layers in place" in output
    losses, eager = values(output, "loss"), values(overfit.output, "loss")
    assert len(losses) == len(eager) == 8
    # Step 1 is the same computation; afterwards Adam at lr 0.01 amplifies float-rounding differences of
    # near-zero gradients (the gradients themselves match eager: tests/test_compiled_layers.py).
    assert losses[0] == pytest.approx(eager[0], rel=1e-4), (losses, eager)
    assert all(x < losses[0] for x in losses[1:]) and losses[-1] < 0.7 * losses[0], losses


# --------------------------------------------------------------------------------------------- evaluate


def test_evaluate_reports_the_eval_loss_of_the_trained_adapter(trained, tmp_path):
    cfg = yaml.safe_load(trained.config.read_text())
    cfg.update(lora_model_dir=str(trained.out), output_dir=str(tmp_path / "eval"))
    config = tmp_path / "evaluate.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc, output = run([AXOLOTL, "evaluate", config], tmp_path / "evaluate.log")
    assert rc == 0, tail(output)
    found = re.findall(r"eval_loss: ([0-9.eE+-]+|nan|inf)", output)
    assert found, tail(output)
    eval_loss = float(found[-1])
    assert math.isfinite(eval_loss)
    # base + adapter (LoRA and the trained vpm/resampler/embeddings) gives the loss the training run ended with
    state = json.loads((trained.out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    final = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h and h["step"] == MAX_STEPS]
    assert final and math.isclose(eval_loss, final[-1], rel_tol=1e-3), (eval_loss, final)


def test_evaluate_without_an_adapter_reports_the_base_models_eval_loss(trained, tmp_path):
    """No `adapter`: the plugin's LoRA hooks stand aside (Axolotl calls them on every run)."""
    cfg = yaml.safe_load(trained.config.read_text())
    for key in ("adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
        cfg.pop(key, None)
    cfg.update(output_dir=str(tmp_path / "eval"))
    config = tmp_path / "evaluate-base.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc, output = run([AXOLOTL, "evaluate", config], tmp_path / "evaluate.log")
    assert rc == 0, tail(output)
    found = re.findall(r"eval_loss: ([0-9.eE+-]+)", output)
    assert found and math.isfinite(float(found[-1])), tail(output)
    assert "LoRA wrapped" not in output


# --------------------------------------------------------------------------------------------- refusals


def test_merge_lora_is_refused_and_points_at_the_export(trained):
    rc, output = run([AXOLOTL, "merge-lora", trained.config], trained.folder / "merge.log")
    assert rc != 0, tail(output)
    assert f"axolotl minicpmv-export {trained.config} --format merged --out {trained.out / 'merged'}" in output, tail(output)
    assert not (trained.out / "merged").exists()


def test_a_target_pattern_matching_nothing_stops_before_training(tiny_checkpoint, data, tmp_path):
    config = write_config(tmp_path, tiny_checkpoint, data, lora_target_modules=r"nothing\.matches")
    rc, output = run([PYTHON, "-m", "axolotl.cli.train", config], tmp_path / "train.log")
    assert rc != 0, tail(output)
    assert "lora_target_modules='nothing\\\\.matches' matches no linear module" in output, tail(output)
    assert "Starting trainer" not in output and not logged(output, "loss")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------------------------- data formats

FORMAT_CONFIGS = ("llava", "messages", "content_parts", "hf_dataset")  # examples/<name>.yml


@pytest.fixture(scope="module")
def formats_trained(tiny_checkpoint, data, tmp_path_factory) -> Run:
    """One training run whose `datasets:` are the entries of every examples/<format>.yml: a LLaVA JSON file, a
    messages JSONL file, content parts in Parquet with embedded image bytes and a save_to_disk folder."""
    entries = []
    for name in FORMAT_CONFIGS:
        for entry in yaml.safe_load((REPO / "examples" / f"{name}.yml").read_text())["datasets"]:
            entries.append({**entry, "path": str(data / Path(entry["path"]).relative_to("examples/data"))})
    folder = tmp_path_factory.mktemp("formats")
    config = write_config(
        folder,
        tiny_checkpoint,
        data,
        datasets=entries,
        drop=("test_datasets", "eval_steps"),
        eval_strategy="no",
        max_steps=2,
        save_steps=1000,
    )
    rc, output = run([PYTHON, "-m", "axolotl.cli.train", config], folder / "train.log")
    return Run(config, folder, rc, output)


def test_one_run_trains_on_json_jsonl_parquet_bytes_and_a_saved_dataset(formats_trained):
    run_ = formats_trained
    assert run_.rc == 0, tail(run_.output)
    minicpmv_data = run_.prepared / "minicpmv_data"
    metas = {p.name.split("-")[0]: json.loads(p.read_text()) for p in minicpmv_data.glob("*.json")}
    assert {k: (v["num_samples"], v["format"]) for k, v in metas.items()} == {
        "llava": (5, "llava"),
        "messages": (5, "messages"),
        "content_parts": (5, "content_parts"),
        "sharegpt_hf": (5, "auto"),
    }
    assert len(re.findall(r"5 samples validated and written to .* samples/s\)", run_.output)) == 4, tail(run_.output)
    losses = values(run_.output, "loss")
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), losses
    # the embedded pictures went through Axolotl's tokenized cache as bytes (the collator decodes them)
    import datasets

    (tokenized,) = [p for p in run_.prepared.iterdir() if (p / "dataset_info.json").is_file()]
    rows = datasets.load_from_disk(str(tokenized))
    assert len(rows) == 20
    embedded = [b for row in rows for b in row["image_bytes"] if b]
    assert len(embedded) == 2 * 5 and all(b[:2] == b"\xff\xd8" for b in embedded)  # 5 JPEGs in each of 2 embedded sources
    assert (run_.out / "adapter_model.safetensors").is_file()


def test_skip_mode_on_a_file_mixing_formats_with_bad_samples_in_each(tiny_checkpoint, data, tmp_path):
    stop_sign = base64.b64encode((data / "images" / "stop_sign.jpg").read_bytes()).decode()
    rows = [
        {
            "id": "seed-ok",
            "image": "images/stop_sign.jpg",
            "conversations": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A stop sign."}],
        },
        {
            "id": "seed-bad",
            "image": "images/nope.jpg",
            "conversations": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "?"}],
        },
        {
            "id": "llava-ok",
            "image": "images/clock.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat time is it?"}, {"from": "gpt", "value": "3:40."}],
        },
        {
            "id": "llava-bad",
            "image": "images/clock.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat time is it?"}, {"from": "gpt"}],
        },
        {
            "id": "messages-ok",
            "images": ["images/fruit_bowl.jpg"],
            "messages": [{"role": "user", "content": "<image>Fruit?"}, {"role": "assistant", "content": "Apples."}],
        },
        {"id": "messages-bad", "messages": [{"role": "user", "content": "<image>Fruit?"}, {"role": "assistant", "content": "Apples."}]},
        {
            "id": "parts-ok",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{stop_sign}"}},
                        {"type": "text", "text": "Sign?"},
                    ],
                },
                {"role": "assistant", "content": "Stop."},
            ],
        },
        {
            "id": "parts-bad",
            "messages": [{"role": "user", "content": [{"type": "video", "path": "x.mp4"}]}, {"role": "assistant", "content": "?"}],
        },
    ]
    (data / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = write_config(
        tmp_path,
        tiny_checkpoint,
        data,
        datasets=[{"path": str(data / "mixed.jsonl"), "type": DATASET_TYPE}],
        drop=("test_datasets", "eval_steps"),
        eval_strategy="no",
        minicpmv_skip_bad_samples=True,
    )
    rc, output = run([AXOLOTL, "preprocess", config], tmp_path / "skip.log")
    assert rc == 0, tail(output)
    assert "skipped 4 of 8 samples (minicpmv_skip_bad_samples: true)" in output, tail(output)
    for sample_id, reason in [
        ("seed-bad", "image 'images/nope.jpg' not found"),
        ("llava-bad", "conversations[1] must be an object with 'from' and 'value'"),
        ("messages-bad", "1 '<image>' tag(s) but the sample has no 'images'"),
        ("parts-bad", "messages[0].content[0] has type 'video'"),
    ]:
        assert f"skipping sample {sample_id!r} (index {[r['id'] for r in rows].index(sample_id)}): {reason}" in output, (
            sample_id,
            tail(output),
        )
    (meta,) = [json.loads(p.read_text()) for p in (tmp_path / "prepared" / "minicpmv_data").glob("*.json")]
    assert (meta["num_samples"], meta["num_skipped"]) == (4, 4)
    assert "Success! Preprocessed data path" in output
