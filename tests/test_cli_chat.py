"""Command line: `python -m axolotl_minicpmv chat` (questions as options), `axolotl minicpmv-chat`
(interactive over stdin) and `python -m axolotl_minicpmv tiny-checkpoint`, run as real subprocesses.

The three commands start at once (each one imports torch and transformers, which takes a while);
answers are compared with the same questions asked in-process through `MiniCPMVChat` (beam search,
deterministic).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, REFERENCE
from safetensors.torch import load_file

from axolotl_minicpmv import MiniCPMVChat, img2base64

PYTHON = sys.executable
AXOLOTL = str(Path(sys.executable).parent / "axolotl")
IMAGE = EXAMPLES / "images" / "stop_sign.jpg"  # small, unsliced: quick on CPU
MAX_NEW_TOKENS = "5"
TIMEOUT = 240

OFFICIAL_FILES = {
    "config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
}

INTERACTIVE_INPUT = "What is this?\n/image missing.jpg\nStill there?\n\n/reset\nHello\n/quit\nNever asked\n"


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """Start the three commands together, wait for all, return {name: CompletedProcess-like}."""
    out_dir = tmp_path_factory.mktemp("cli") / "tiny-from-cli"
    work = tmp_path_factory.mktemp("cli-cwd")  # `/image missing.jpg` is resolved here, where nothing exists
    commands = {
        "questions": (
            [
                PYTHON,
                "-m",
                "axolotl_minicpmv",
                "chat",
                "--model",
                str(tiny_checkpoint),
                "--image",
                str(IMAGE),
                "--question",
                "What is this?",
                "--question",
                "Why?",
                "--beam",
                "--max-new-tokens",
                MAX_NEW_TOKENS,
            ],
            None,
        ),
        "interactive": (
            [
                AXOLOTL,
                "minicpmv-chat",
                "--model",
                str(tiny_checkpoint),
                "--image",
                str(IMAGE),
                "--beam",
                "--max-new-tokens",
                MAX_NEW_TOKENS,
            ],
            INTERACTIVE_INPUT,
        ),
        "tiny": ([PYTHON, "-m", "axolotl_minicpmv", "tiny-checkpoint", str(out_dir), "--seed", "0"], None),
        "fast": (
            [
                PYTHON,
                "-m",
                "axolotl_minicpmv",
                "chat",
                "--model",
                str(tiny_checkpoint),
                "--image",
                str(IMAGE),
                "--question",
                "What is this?",
                "--question",
                "Why?",
                "--fast",
                "--beam",
                "--max-new-tokens",
                MAX_NEW_TOKENS,
            ],
            None,
        ),
    }
    procs = {
        name: subprocess.Popen(
            argv,
            cwd=work,
            env=_env(),
            text=True,
            encoding="utf-8",
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, (argv, stdin) in commands.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(commands[name][1], timeout=TIMEOUT)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results["out_dir"] = out_dir
    return results


@pytest.fixture(scope="module")
def session(tiny_checkpoint):
    return MiniCPMVChat(str(tiny_checkpoint))


def _answer(session, msgs) -> str:
    question = {"image": img2base64(IMAGE), "question": json.dumps(msgs, ensure_ascii=False)}
    return session.chat(question, sampling=False, max_new_tokens=int(MAX_NEW_TOKENS))


def _conversation(session, questions):
    """Ask `questions` in turn, each with the earlier turns as context, as the CLI does."""
    msgs, answers = [], []
    for question in questions:
        msgs = msgs + [{"role": "user", "content": question}]
        answers.append(_answer(session, msgs))
        msgs = msgs + [{"role": "assistant", "content": answers[-1]}]
    return answers


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"


# ---------------------------------------------------------------- python -m axolotl_minicpmv chat --question


def test_questions_are_answered_in_turn(runs, session):
    result = runs["questions"]
    _ok(result)
    first, second = _conversation(session, ["What is this?", "Why?"])
    assert first != second
    assert result.stdout == f"user: What is this?\nassistant: {first}\nuser: Why?\nassistant: {second}\n"


def test_fast_beam_search_answers_as_the_plain_beam_search(runs):
    """`--fast --beam`: FastDecoder's beam search gives generate's beams (float32 on the CPU): the same lines."""
    _ok(runs["fast"])
    _ok(runs["questions"])
    assert runs["fast"].stdout == runs["questions"].stdout


# ---------------------------------------------------------------- axolotl minicpmv-chat over stdin


def test_interactive_session_over_stdin(runs, session):
    result = runs["interactive"]
    _ok(result)
    assert "MiniCPM-V chat. /image PATH, /reset, /quit" in result.stdout.splitlines()  # after axolotl's banner
    answers = [line[len("assistant: ") :] for line in result.stdout.splitlines() if line.startswith("assistant: ")]
    assert len(answers) == 3, "three questions before /quit; the line after /quit is never asked"
    # the failed /image keeps the image and the conversation; /reset starts a new conversation
    expected = _conversation(session, ["What is this?", "Still there?"]) + _conversation(session, ["Hello"])
    assert len(set(expected)) == 3, "the tiny model answers these three conversations differently"
    assert answers == expected


def test_interactive_bad_image_prints_an_error_and_continues(runs):
    result = runs["interactive"]
    _ok(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.jpg" in errors[0]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- tiny-checkpoint


def test_tiny_checkpoint_writes_the_official_file_set(runs):
    _ok(runs["tiny"])
    out = runs["out_dir"]
    assert str(out) in runs["tiny"].stdout
    assert OFFICIAL_FILES <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    official = json.loads((REFERENCE / "config.json").read_text())
    assert config["model_type"] == "minicpmv"
    assert config["auto_map"] == official["auto_map"]
    assert config["architectures"] == ["MiniCPMV"]
    assert set(official) <= set(config), "every key of the official config.json is there"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((out / name).read_text()) == json.loads((REFERENCE / name).read_text()), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        tensors = load_file(str(out / shard))
        assert set(tensors) == {k for k, v in index["weight_map"].items() if v == shard}
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}, "bf16 like the release"


def test_tiny_checkpoint_is_deterministic_for_a_seed(runs, tiny_checkpoint, tmp_path):
    """The CLI's seed-0 checkpoint (another process) equals the session fixture's seed-0 checkpoint."""
    _ok(runs["tiny"])
    out = runs["out_dir"]

    def tensors(directory):
        result = {}
        for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            result.update(load_file(str(directory / shard)))
        return result

    ours, theirs = tensors(out), tensors(tiny_checkpoint)
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert (out / "tokenizer.model").read_bytes() == (tiny_checkpoint / "tokenizer.model").read_bytes()

    from axolotl_minicpmv.testing.tiny_checkpoint import make_tiny_checkpoint

    other = tensors(make_tiny_checkpoint(tmp_path / "seed1", seed=1))
    assert not torch.equal(other["llm.model.embed_tokens.weight"], ours["llm.model.embed_tokens.weight"]), "the seed matters"
