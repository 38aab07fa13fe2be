"""Batch prediction (integration/predict.py, `minicpmv-predict`) and `minicpmv_eval_generate`, on the tiny checkpoint:

- batched greedy answers (mixed image sizes, sliced and unsliced, text-only and multi-image rows in one batch) equal
  one-by-one `chat(sampling=False, num_beams=1)` answers in float32 (multi-image rows: a batch of one);
- samples -> requests (`--turns last|all`, VQA-style `answers`, image tags of the turns before), bad rows (missing
  image, malformed conversation, prompt too long, duplicate id) written with the reason, `strict=True` stops;
- every training format is read (LLaVA, messages, content parts, a save_to_disk folder; embedded pictures), and a
  run's own dataset settings when --data is one of its files; the output file survives U+2028 and friends, a resume
  with another metric, and bad samples sharing an id;
- the real CLI: `python -m axolotl_minicpmv predict` uninterrupted vs `axolotl minicpmv-predict` killed (SIGKILL)
  after its first lines and resumed: the same rows, each once, and only whole lines after the kill;
- a real Axolotl training run with `minicpmv_eval_generate: 2` logs eval_exact / eval_rouge_l beside eval_loss, and
  `minicpmv-predict CONFIG.yml` predicts with its base model and trained adapter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES
from PIL import Image
from test_axolotl_cli import DATASET_TYPE, logged, run, tail, write_config

from axolotl_minicpmv.integration.predict import PredictionError, predict, read_predictions, requests_from_samples, run_prediction

PYTHON = sys.executable
AXOLOTL = str(Path(sys.executable).parent / "axolotl")
IMAGES = EXAMPLES / "images"
TIMEOUT = 600


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


# ------------------------------------------------------------------ batching equality


def test_batched_greedy_answers_equal_one_by_one_chat(tiny_model, tiny_tokenizer):
    samples = [
        {
            "id": "small",
            "image": str(IMAGES / "stop_sign.jpg"),
            "conversations": [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A stop sign."}],
        },
        {"id": "text", "conversations": [{"role": "user", "content": "What is 17 times 3?"}, {"role": "assistant", "content": "51"}]},
        {
            "id": "sliced",
            "image": str(IMAGES / "handwritten_note.jpg"),
            "conversations": [{"role": "user", "content": "Read it: <image>"}, {"role": "assistant", "content": "A note."}],
        },
        {
            "id": "multi",
            "image": [str(IMAGES / "clock.jpg"), str(IMAGES / "stop_sign.jpg")],
            "conversations": [
                {"role": "user", "content": "<image> and <image>: which is round?"},
                {"role": "assistant", "content": "The clock."},
            ],
        },
        {
            "id": "two-turns",
            "image": str(IMAGES / "fruit_bowl.jpg"),
            "conversations": [
                {"role": "user", "content": "<image>\nList the fruit."},
                {"role": "assistant", "content": "Apples."},
                {"role": "user", "content": "How many?"},
                {"role": "assistant", "content": "Three."},
            ],
        },
    ]
    batched = {row["id"]: row for row in predict(tiny_model, tiny_tokenizer, samples, batch_size=5, max_new_tokens=12)}
    assert all(row["error"] is None for row in batched.values()), batched
    assert len({row["prediction"] for row in batched.values()}) > 1  # not one degenerate answer for all
    for sample in samples:
        if sample["id"] == "multi":  # chat takes one picture: compare with a batch of one
            alone = next(predict(tiny_model, tiny_tokenizer, [sample], batch_size=1, max_new_tokens=12))
            assert batched["multi"]["prediction"] == alone["prediction"]
            continue
        image = Image.open(sample["image"]) if "image" in sample else None
        msgs = [dict(m, content=m["content"].replace("<image>", "").strip()) for m in sample["conversations"][:-1]]
        if sample["id"] == "sliced":
            msgs = sample["conversations"][:-1]  # the tag stays where it is in the text
        answer, _, _ = tiny_model.chat(image, msgs, tokenizer=tiny_tokenizer, sampling=False, num_beams=1, max_new_tokens=12)
        assert batched[sample["id"]]["prediction"] == answer, sample["id"]


def test_prepared_batches_are_the_processors_batch(tiny_model, tiny_tokenizer):
    """The inputs predict prepares ahead (each prompt tokenized once, while its length is checked) are what
    the processor's own call gives for the same conversations and pictures."""
    import torch

    from axolotl_minicpmv.integration.predict import _prepare_batch
    from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor

    samples = [
        {"id": "sliced", "image": str(IMAGES / "handwritten_note.jpg"), "conversations": [{"role": "user", "content": "Read: <image>"}]},
        {"id": "text", "conversations": [{"role": "user", "content": "What is 17 times 3?"}]},
        {
            "id": "two",
            "image": [str(IMAGES / "clock.jpg"), str(IMAGES / "stop_sign.jpg")],
            "conversations": [{"role": "user", "content": "<image> or <image>?"}],
        },
    ]
    samples = [dict(s, answers=["x"]) for s in samples]
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    requests = list(requests_from_samples(samples))
    prepared = _prepare_batch(processor, requests, 2048)
    assert not prepared.errors and len(prepared.ready) == 3
    expected = processor([r.conversation for r in requests], [ims for _, ims in prepared.ready], padding_side="left", max_length=2048)
    assert sorted(prepared.inputs.keys()) == sorted(expected.keys())
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(prepared.inputs[key], value), key
        else:  # the grouped pixel stacks
            assert len(prepared.inputs[key]) == len(value) and all(torch.equal(a, b) for a, b in zip(prepared.inputs[key], value)), key


def test_batches_are_grouped_by_prompt_size_and_every_request_is_answered_once(tiny_model, tiny_tokenizer, tmp_path):
    """Sliced, single-cell and text-only samples interleaved: batches of 2 hold prompts of one kind each (the
    shortest first), every sample is answered once, and each answer is the one it gets in the input's order."""
    from axolotl_minicpmv.integration.predict import grouped_by_prompt_size
    from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor

    kinds = {
        "sliced": (str(IMAGES / "handwritten_note.jpg"), "Read it: <image>"),
        "cell": (str(IMAGES / "stop_sign.jpg"), "<image>\nWhat is this?"),
        "text": (None, "What is 17 times 3?"),
    }
    samples = []
    for k in range(2):
        for kind, (image, question) in kinds.items():
            sample = {"id": f"{kind}-{k}", "conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": "x"}]}
            samples.append(sample if image is None else dict(sample, image=image))
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    assert processor.layout(Image.open(kinds["sliced"][0]).size).num_images > 1  # the sliced picture is sliced
    grouped = [r.id for r in grouped_by_prompt_size(list(requests_from_samples(samples)), processor, batch_size=2)]
    assert grouped == ["text-0", "text-1", "cell-0", "cell-1", "sliced-0", "sliced-1"]

    rows = list(predict(tiny_model, tiny_tokenizer, samples, batch_size=2, max_new_tokens=6))
    assert [row["id"] for row in rows] == grouped
    lengths = [row["prompt_tokens"] for row in rows]
    assert lengths == sorted(lengths) and lengths[0] == lengths[1] and lengths[4] == lengths[5]
    in_order = {row["id"]: row["prediction"] for row in predict(tiny_model, tiny_tokenizer, samples, batch_size=1, max_new_tokens=6)}
    assert {row["id"]: row["prediction"] for row in rows} == in_order


def test_the_decoders_cache_is_sized_once_for_the_whole_run(tiny_model, tiny_tokenizer, monkeypatch):
    """Batches come smallest first, so the last one holds the longest prompt: predict sizes FastDecoder's cache for
    it before the first batch (on a GPU every growth compiles again), and no batch changes it."""
    from axolotl_minicpmv.integration.predict import longest_prompt
    from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor

    def sample(name, content, image=None):
        row = {"id": name, "conversations": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]}
        return row if image is None else dict(row, image=str(IMAGES / image))

    samples = [
        sample("long", "Read it: <image> " + "and then the next word " * 20, "handwritten_note.jpg"),
        sample("text", "What is 17 times 3?"),
        sample("cell", "<image> What is this?", "stop_sign.jpg"),
        sample("sliced", "Read it: <image>", "handwritten_note.jpg"),
    ]
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    longest = longest_prompt(list(requests_from_samples(samples)), processor)
    monkeypatch.setattr(tiny_model, "_fast_path_for", None, raising=False)  # a new FastDecoder, its caches unsized
    keys = []

    def watch(real):
        def loop_for(batch, length, settings, make_loop):
            loop = real(batch, length, settings, make_loop)
            keys.append((length, tiny_model._fast_decoder._slot(batch).key))
            return loop

        return loop_for

    from axolotl_minicpmv.inference.chat import init_fast_path

    init_fast_path(tiny_model)
    monkeypatch.setattr(tiny_model._fast_decoder, "_loop_for", watch(tiny_model._fast_decoder._loop_for))
    rows = list(predict(tiny_model, tiny_tokenizer, samples, batch_size=2, max_new_tokens=6, fast=True))
    assert [row["id"] for row in rows] == ["text", "cell", "sliced", "long"] and not any(row["error"] for row in rows)
    assert longest == max(row["prompt_tokens"] for row in rows) == rows[-1]["prompt_tokens"]
    cache = 1 << (longest + 6 - 1).bit_length()
    assert keys[0][0] + 256 <= cache  # the first batch alone would have made a smaller cache
    assert [key for _, key in keys] == [(2, cache)] * 2


# ------------------------------------------------------------------ requests and bad rows


def test_requests_turns_answers_and_image_tags(tmp_path):
    samples = [
        {
            "id": "a",
            "image": [str(IMAGES / "clock.jpg"), str(IMAGES / "bookshelf.jpg")],
            "conversations": [
                {"role": "user", "content": "Clock: <image>"},
                {"role": "assistant", "content": "3:40"},
                {"role": "user", "content": "Shelf: <image>"},
                {"role": "assistant", "content": "four"},
            ],
        },
        {
            "id": "vqa",
            "image": str(IMAGES / "stop_sign.jpg"),
            "conversations": [{"role": "user", "content": "Colour?"}],
            "answers": ["red", "red", "dark red"],
        },
    ]
    last = list(requests_from_samples(samples, tmp_path, turns="last"))
    assert [(r.id, r.turn, r.references) for r in last] == [("a", 1, ["four"]), ("vqa", 0, ["red", "red", "dark red"])]
    assert len(last[0].images) == 2 and last[1].conversation == [{"role": "user", "content": "<image>\nColour?"}]
    every = list(requests_from_samples(samples, tmp_path, turns="all"))
    assert [(r.id, r.turn) for r in every] == [("a", 0), ("a", 1), ("vqa", 0)]
    assert len(every[0].images) == 1 and every[0].question == "Clock: <image>"  # only the picture tagged before turn 0


def test_bad_rows_are_written_with_the_reason_and_strict_stops(tiny_model, tiny_tokenizer, tmp_path):
    ok = {"id": "ok", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    samples = [
        {"id": "no-image", "image": "missing.jpg", "conversations": ok["conversations"]},
        ok,
        {"id": "bad-roles", "conversations": [{"role": "assistant", "content": "x"}]},
        {"id": "long", "conversations": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "x"}]},
        {"id": "ok", "conversations": ok["conversations"]},
        {"id": "bad-answers", "conversations": [{"role": "user", "content": "Q"}], "answers": []},
    ]
    rows = list(predict(tiny_model, tiny_tokenizer, samples, base_dir=tmp_path, batch_size=4, max_new_tokens=4, max_inp_length=300))
    errors = {row["id"] + ("/dup" if "duplicate" in (row["error"] or "") else ""): row["error"] for row in rows}
    assert len(rows) == 6
    assert "image 'missing.jpg' not found" in errors["no-image"] and "sample 'no-image' (index 0)" in errors["no-image"]
    assert "the first turn is 'assistant'" in errors["bad-roles"]
    assert "longer than max_inp_length=300" in errors["long"] and "sample 'long'" in errors["long"]
    assert "duplicate id 'ok'" in errors["ok/dup"]
    assert "'answers' must be a non-empty list" in errors["bad-answers"]
    good = [row for row in rows if row["error"] is None]
    assert [row["id"] for row in good] == ["ok"] and isinstance(good[0]["prediction"], str) and good[0]["exact"] in (0.0, 1.0)
    with pytest.raises(PredictionError, match="image 'missing.jpg' not found"):
        list(predict(tiny_model, tiny_tokenizer, samples, base_dir=tmp_path, strict=True, max_new_tokens=4))


def test_run_prediction_counts_bad_rows_and_strict_stops_at_the_first(tiny_checkpoint_fp32, tmp_path):
    ok = {"id": "ok", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({**ok, "id": "gone", "image": "gone.png"}) + "\n{not json\n" + json.dumps(ok) + "\n")
    common = {"data": str(data), "model_path": str(tiny_checkpoint_fp32), "max_new_tokens": 3, "progress": False}
    summary = run_prediction(out=str(tmp_path / "p.jsonl"), metrics_out=str(tmp_path / "m.json"), **common)
    assert (summary["predictions"], summary["failed"], summary["samples"]) == (3, 2, 3)
    assert json.loads((tmp_path / "m.json").read_text())["failed"] == 2
    errors = {row["id"]: row["error"] for row in read_predictions(tmp_path / "p.jsonl")}
    assert "image 'gone.png' not found" in errors["gone"] and "line 2 is not valid JSON" in errors["line-2"] and errors["ok"] is None
    with pytest.raises(PredictionError, match="sample 'gone' \\(index 0\\).*image 'gone.png' not found"):
        run_prediction(out=str(tmp_path / "strict.jsonl"), strict=True, **common)
    assert [row["id"] for row in read_predictions(tmp_path / "strict.jsonl")] == ["gone"]  # written, then stopped


@pytest.mark.parametrize("name", ["messages.jsonl", "content_parts.parquet", "sharegpt_hf"])
def test_every_training_format_is_predicted_as_its_llava_twin(name, tiny_model, tiny_tokenizer):
    """The example files hold the same five samples in each format (tests/test_data_formats.py), pictures as paths
    or embedded bytes: each is answered against train.json's last answers, and where the format's prompt text is the
    same (content parts join their text parts with newlines around a picture), with the LLaVA file's answers."""
    settings = dict(batch_size=5, max_new_tokens=3)
    llava = list(predict(tiny_model, tiny_tokenizer, EXAMPLES / "llava.json", **settings))
    seed = {sample["id"]: sample["conversations"][-1]["content"] for sample in json.loads((EXAMPLES / "train.json").read_text())}
    assert [row["error"] for row in llava] == [None] * 5 and all(row["reference"] == seed[row["id"]] for row in llava)
    rows = list(predict(tiny_model, tiny_tokenizer, EXAMPLES / name, **settings))
    assert [row["error"] for row in rows] == [None] * 5
    assert sorted((row["id"], row["reference"]) for row in rows) == sorted((row["id"], row["reference"]) for row in llava)
    if name != "content_parts.parquet":
        assert _stable(rows) == _stable(llava)


def test_resumed_output_with_line_separators_other_metrics_and_repeated_bad_ids(tiny_checkpoint_fp32, tmp_path):
    """Text holding U+2028 / U+0085 (valid unescaped in JSON, line breaks to str.splitlines) reads back whole; a
    resume that asks for another metric scores the earlier rows too; two bad samples sharing an id count twice."""

    def sample(name, question, answer):
        return {"id": name, "conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    bad = {"id": "bad", "image": "gone.png", "conversations": sample("", "Q", "A")["conversations"]}
    lines = [
        json.dumps(sample("escaped", "one\u2028two", "x\u2029y")),
        json.dumps(sample("raw", "one\u0085two", "x\u2028y"), ensure_ascii=False),
        json.dumps(bad),
        json.dumps(bad),
        json.dumps(sample("last", "Say hi", "hi")),
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = {"data": str(data), "model_path": str(tiny_checkpoint_fp32), "max_new_tokens": 3, "progress": False}
    run_prediction(out=str(tmp_path / "p.jsonl"), metrics="exact", limit=3, **common)
    resumed = run_prediction(out=str(tmp_path / "p.jsonl"), metrics="exact,anls", resume=True, **common)
    whole = run_prediction(out=str(tmp_path / "whole.jsonl"), metrics="exact,anls", **common)
    assert resumed["run"]["resumed_from"] == 3 and resumed["run"]["predictions_this_run"] == 2
    assert (
        (resumed["predictions"], resumed["failed"], resumed["samples"])
        == (5, 2, 4)
        == (whole["predictions"], whole["failed"], whole["samples"])
    )
    assert resumed["metrics"] == whole["metrics"] and resumed["metrics"]["anls"] is not None
    questions = {row["id"]: row["question"] for row in read_predictions(tmp_path / "p.jsonl")}
    assert questions["escaped"] == "one\u2028two" and questions["raw"] == "one\u0085two"


def test_eval_generate_logs_no_scores_when_no_sample_could_be_answered(tiny_model, tiny_tokenizer):
    """A score of zero answered samples would read as 0 in the loggers' curves: nothing is added then."""
    from types import SimpleNamespace

    from axolotl_minicpmv.integration.eval_generate import EvalGenerateCallback
    from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    for samples, scored in (
        ([{"id": "gone", "image": "/nonexistent/gone.png", "conversations": turns}], False),
        ([{"id": "ok", "conversations": turns}], True),
    ):
        callback = EvalGenerateCallback(list(requests_from_samples(samples)), processor, max_new_tokens=2, batch_size=1)
        logs = {"eval_loss": 1.0}
        state = SimpleNamespace(global_step=2, log_history=[dict(logs)])
        callback.on_log(None, state, None, logs=logs, model=tiny_model)
        assert ("eval_exact" in logs) is scored and ("eval_rouge_l" in state.log_history[-1]) is scored


def test_eval_generate_key_is_checked():
    from axolotl_minicpmv.integration.args import MiniCPMVArgs

    assert MiniCPMVArgs.from_cfg({"minicpmv_eval_generate": 3}).minicpmv_eval_generate == 3
    assert MiniCPMVArgs.from_cfg({}).minicpmv_eval_generate is None
    with pytest.raises(ValueError, match="minicpmv_eval_generate must be a positive number of eval samples"):
        MiniCPMVArgs.from_cfg({"minicpmv_eval_generate": 0})


# ------------------------------------------------------------------ the command: resume after a kill


def _dataset(folder: Path, count: int = 14) -> Path:
    """`count` samples over the example pictures (small, unsliced with max_slice_nums 1), one text-only."""
    pictures = ["stop_sign.jpg", "clock.jpg", "fruit_bowl.jpg", "street.jpg"]
    samples = [
        {
            "id": f"s{i:02d}",
            "image": str(IMAGES / pictures[i % 4]),
            "conversations": [{"role": "user", "content": f"Question {i}: what is shown?"}, {"role": "assistant", "content": "A picture."}],
        }
        for i in range(count - 1)
    ]
    samples.append(
        {
            "id": "text",
            "conversations": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
            "answers": ["hi", "hello"],
        }
    )
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def _stable(rows):
    return sorted(({k: v for k, v in row.items()} for row in rows), key=lambda r: (r["id"], r["turn"]))


def test_cli_resume_after_kill_equals_an_uninterrupted_run(tiny_checkpoint, tmp_path):
    data = _dataset(tmp_path)
    common = ["--model", tiny_checkpoint, "--data", data, "--batch-size", "2", "--max-new-tokens", "6", "--max-slice-nums", "1"]
    full = subprocess.Popen(
        [PYTHON, "-m", "axolotl_minicpmv", "predict", *common, "--out", tmp_path / "full.jsonl", "--metrics-out", tmp_path / "full.json"],
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    killed_out = tmp_path / "resumed.jsonl"
    killed = subprocess.Popen(
        [AXOLOTL, "minicpmv-predict", *map(str, common), "--out", killed_out],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and killed.poll() is None:
        if killed_out.is_file() and killed_out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before it could be killed"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    after_kill = killed_out.read_bytes()
    lines = after_kill.decode().splitlines()
    assert after_kill.endswith(b"\n") and all(json.loads(line)["id"] for line in lines), after_kill[-200:]
    assert 2 <= len(lines) < 14

    stdout, stderr = full.communicate(timeout=TIMEOUT)
    assert full.returncode == 0, stderr[-3000:]
    resume = subprocess.run(
        [
            PYTHON,
            "-m",
            "axolotl_minicpmv",
            "predict",
            *map(str, common),
            "--out",
            killed_out,
            "--resume",
            "--metrics-out",
            tmp_path / "resumed.json",
        ],
        env=_env(),
        text=True,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert resume.returncode == 0, resume.stderr[-3000:]

    written = [json.loads(line) for line in killed_out.read_text().splitlines()]
    assert len(written) == 14 and len({(r["id"], r["turn"]) for r in written}) == 14  # each prediction once
    assert _stable(written) == _stable(read_predictions(tmp_path / "full.jsonl"))
    full_summary, resumed = json.loads((tmp_path / "full.json").read_text()), json.loads((tmp_path / "resumed.json").read_text())
    for key in ("predictions", "samples", "failed", "metrics"):
        assert resumed[key] == full_summary[key]
    assert full_summary["predictions"] == 14 and full_summary["failed"] == 0
    assert resumed["run"]["resumed_from"] == len(lines) and resumed["run"]["predictions_this_run"] == 14 - len(lines)
    assert set(full_summary["metrics"]) == {"exact", "vqa", "anls", "rouge_l"} and full_summary["versions"]["torch"]
    assert full_summary["run"]["samples_per_s"] > 0 and full_summary["run"]["generated_tokens_per_s"] > 0
    # the last printed line is the summary
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("predict: 14 predictions of 14 samples, 0 failed; exact ") and "full.jsonl" in last
    assert "resuming: " in resume.stderr
    # a second run into the same file without --resume is refused, naming the fix
    again = subprocess.run(
        [PYTHON, "-m", "axolotl_minicpmv", "predict", *map(str, common), "--out", killed_out, "--limit", "1"],
        env=_env(),
        text=True,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert again.returncode != 0 and "pass --resume to finish it, or --overwrite" in again.stderr


# ------------------------------------------------------------------ inside training, and a run as the source


@pytest.fixture(scope="module")
def trained_with_eval_generate(tiny_checkpoint, tmp_path_factory):
    import shutil

    folder = tmp_path_factory.mktemp("evalgen")
    data = folder / "data"
    shutil.copytree(EXAMPLES, data)
    dialog = _as_dialog_file(data / "eval.json", data / "eval_dialog.jsonl")
    eval_set = {"path": str(dialog), "type": DATASET_TYPE, "split": "train", "field_messages": "dialog", "field_images": "pictures"}
    config = write_config(folder, tiny_checkpoint, data, minicpmv_eval_generate=2, test_datasets=[eval_set])
    rc, output = run([PYTHON, "-m", "axolotl.cli.train", config], folder / "train.log")
    assert rc == 0, tail(output)
    return folder, config, data, output


def _as_dialog_file(seed_file: Path, out: Path) -> Path:
    """The seed samples with their turns under `dialog` and their pictures embedded as data URLs under `pictures`:
    rows that only a dataset entry's `field_messages` / `field_images` settings read."""
    import base64

    def url(path: str) -> str:
        return "data:image/jpeg;base64," + base64.b64encode((seed_file.parent / path).read_bytes()).decode()

    rows = []
    for sample in json.loads(seed_file.read_text()):
        row = {"id": sample["id"], "dialog": sample["conversations"]}
        if "image" in sample:
            row["pictures"] = [url(p) for p in sample["image"]] if isinstance(sample["image"], list) else url(sample["image"])
        rows.append(row)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def test_eval_generate_logs_exact_and_rouge_l_beside_eval_loss(trained_with_eval_generate):
    """The eval set's pictures are embedded (data URLs), so the prepared rows carry bytes, not paths."""
    folder, _, _, output = trained_with_eval_generate
    evals = logged(output, "eval_loss")
    assert len(evals) >= 2, tail(output)  # eval at steps 2 and 4
    for row in evals:
        assert 0.0 <= float(row["eval_exact"]) <= 1.0 and 0.0 <= float(row["eval_rouge_l"]) <= 1.0
    assert "minicpmv_eval_generate: greedy answers for 2 eval samples" in output
    assert output.count("minicpmv_eval_generate: 2 of 2 eval samples answered at step ") == len(evals), tail(output)
    state = json.loads((folder / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert all("eval_rouge_l" in entry for entry in state["log_history"] if "eval_loss" in entry)


def test_predict_from_the_run_config_uses_its_adapter(trained_with_eval_generate):
    folder, config, data, _ = trained_with_eval_generate
    out = folder / "pred.jsonl"
    rc, output = run(
        [
            AXOLOTL,
            "minicpmv-predict",
            config,
            "--data",
            data / "eval.json",
            "--out",
            out,
            "--metrics-out",
            folder / "pred.json",
            "--max-new-tokens",
            "6",
            "--turns",
            "all",
        ],
        folder / "predict.log",
    )
    assert rc == 0, tail(output)
    summary = json.loads((folder / "pred.json").read_text())
    assert summary["adapter"] == str(folder / "out") and summary["model"].endswith("tiny-minicpmv")
    assert summary["generation"]["max_slice_nums"] == 1  # the run's minicpmv_max_slice_nums
    assert summary["predictions"] == 6 and summary["samples"] == 4  # --turns all: 1 + 2 + 1 + 2 assistant turns
    assert any(line.startswith("predict: 6 predictions of 4 samples, 0 failed; exact ") for line in output.splitlines()), tail(output)


def test_predict_reads_data_with_the_runs_dataset_settings(trained_with_eval_generate):
    """--data naming a file of the run's config is read with that entry's field names; without the run, the same
    file's samples cannot be read (no 'conversations' nor 'messages'), each row saying so."""
    folder, config, data, _ = trained_with_eval_generate
    common = ["--data", data / "eval_dialog.jsonl", "--max-new-tokens", "4"]
    rc, output = run([AXOLOTL, "minicpmv-predict", config, *common, "--out", folder / "dialog.jsonl"], folder / "dialog.log")
    assert rc == 0, tail(output)
    rows = read_predictions(folder / "dialog.jsonl")
    seed = {sample["id"]: sample["conversations"][-1]["content"] for sample in json.loads((data / "eval.json").read_text())}
    assert {row["id"]: row["reference"] for row in rows} == seed and not any(row["error"] for row in rows)
    base_model = yaml.safe_load(config.read_text())["base_model"]
    rc, output = run([AXOLOTL, "minicpmv-predict", "--model", base_model, *common, "--out", folder / "plain.jsonl"], folder / "plain.log")
    assert rc == 0, tail(output)
    errors = [row["error"] for row in read_predictions(folder / "plain.jsonl")]
    assert len(errors) == len(seed) and all("has no 'conversations' (nor 'messages')" in (e or "") for e in errors)


def test_a_runs_image_root_resolves_relative_pictures(trained_with_eval_generate, tmp_path):
    """As in training, a run's `minicpmv_image_root` resolves relative picture paths of --data (not its folder)."""
    folder, config, data, _ = trained_with_eval_generate
    samples = [
        {
            "id": "clock",
            "image": "clock.jpg",
            "conversations": [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": "3:40"}],
        }
    ]
    (tmp_path / "elsewhere.json").write_text(json.dumps(samples))
    rooted = tmp_path / "rooted.yml"
    rooted.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "minicpmv_image_root": str(data / "images")}))
    common = {"data": str(tmp_path / "elsewhere.json"), "max_new_tokens": 2, "progress": False}
    assert run_prediction(source=str(rooted), out=str(tmp_path / "rooted.jsonl"), **common)["failed"] == 0
    assert run_prediction(source=str(config), out=str(tmp_path / "plain.jsonl"), **common)["failed"] == 1  # the control
    assert "image 'clock.jpg' not found" in read_predictions(tmp_path / "plain.jsonl")[0]["error"]


def test_a_tables_null_answers_are_no_answers(tiny_model, tiny_tokenizer, tmp_path):
    """Parquet rows carry every column, null where a row has none: a null `answers` is the conversation's reference."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    turns = [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"}]
    rows = [
        {"id": "vqa", "conversations": turns[:1], "answers": ["red", "dark red"]},
        {"id": "chat", "conversations": turns, "answers": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    answered = {row["id"]: row for row in predict(tiny_model, tiny_tokenizer, tmp_path / "rows.parquet", max_new_tokens=2)}
    assert answered["vqa"]["reference"] == ["red", "dark red"] and answered["chat"]["reference"] == "red"
    assert answered["vqa"]["error"] is None and answered["chat"]["error"] is None
