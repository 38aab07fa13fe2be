"""`minicpmv-serve`: the OpenAI API through the real `openai` client against a real server process (tiny float32
checkpoint, CPU): greedy answers equal `chat(..., sampling=False, num_beams=1)`, plain and streamed; images,
multi-turn, system turns; batching of concurrent clients; bad input, auth, a full queue, disconnects; an adapter.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serving_server import Server, data_url, picture, png_bytes

openai = pytest.importorskip("openai")

KEY = "test-key-123"
NEW = 24  # new tokens per answer in the equality tests (the tiny model rarely stops by itself)
IMAGE_PIXELS_LIMIT = 400 * 400
MAX_TOKENS = 2048  # long enough that a forced 2048-token answer outlasts a client timeout on any CPU
MAX_MODEL_LEN = 3072  # prompt + answer: less than the longest prompt (2048) plus MAX_TOKENS


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-root")
    (root / "red.png").write_bytes(png_bytes(picture(60, 40, seed=7)))
    (tmp_path_factory.getbasetemp() / "secret.png").write_bytes(png_bytes(picture(20, 20, seed=8)))
    return root


@pytest.fixture(scope="module")
def server(tiny_checkpoint_fp32, image_root, tmp_path_factory):
    srv = Server(
        [
            "--model",
            str(tiny_checkpoint_fp32),
            "--served-model-name",
            "tiny",
            "--api-key",
            KEY,
            "--image-root",
            str(image_root),
            "--max-image-pixels",
            str(IMAGE_PIXELS_LIMIT),
            "--max-batch-size",
            "8",
            "--max-tokens",
            str(MAX_TOKENS),
            "--max-model-len",
            str(MAX_MODEL_LEN),
        ],
        tmp_path_factory.mktemp("logs") / "server.log",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint_fp32):
    from axolotl_minicpmv import load_tokenizer

    return load_tokenizer(tiny_checkpoint_fp32)


def chat_answer(model, tokenizer, image, msgs, max_new_tokens=NEW) -> str:
    answer, _, _ = model.chat(image, msgs, tokenizer=tokenizer, sampling=False, num_beams=1, max_new_tokens=max_new_tokens)
    return answer


def ask(client, messages, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": NEW, **kwargs}
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def ask_streamed(client, messages, **kwargs) -> tuple[str, str, list]:
    kwargs = {"temperature": 0, "max_tokens": NEW, **kwargs}
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    return text, finish[0], chunks


def image_part(image):
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def text_part(text):
    return {"type": "text", "text": text}


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = server.health()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_text_only_plain_and_streamed_equal_chat(client, tiny_model, tokenizer):
    from axolotl_minicpmv import MiniCPMVProcessor

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    expected = chat_answer(tiny_model, tokenizer, None, msgs)
    reply = ask(client, msgs)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    processor = MiniCPMVProcessor.from_config(tokenizer, tiny_model.config)
    assert reply.usage.prompt_tokens == len(processor.encode_prompt(processor.chat_prompt(msgs, None)))
    assert reply.usage.completion_tokens <= NEW
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == NEW else "stop")
    text, finish, chunks = ask_streamed(client, msgs, stream_options={"include_usage": True})
    assert text == expected and finish == reply.choices[0].finish_reason
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed, token by token
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_one_image_plain_and_streamed_equal_chat(client, tiny_model, tokenizer):
    image = picture(90, 60, seed=1)
    expected = chat_answer(tiny_model, tokenizer, image, [{"role": "user", "content": "Describe the picture."}])
    messages = [{"role": "user", "content": [image_part(image), text_part("Describe the picture.")]}]
    assert ask(client, messages).choices[0].message.content == expected
    assert ask_streamed(client, messages)[0] == expected
    text_only = chat_answer(tiny_model, tokenizer, None, [{"role": "user", "content": "Describe the picture."}])
    assert expected != text_only  # the picture reached the model


def test_two_images_are_placed_where_their_parts_are(client, tiny_model, tokenizer):
    from axolotl_minicpmv import MiniCPMVProcessor
    from axolotl_minicpmv.inference.generate import generate_answers

    left, right = picture(64, 64, seed=2), picture(500, 280, seed=3)  # the second is sliced
    processor = MiniCPMVProcessor.from_config(tokenizer, tiny_model.config)
    conversation = [{"role": "user", "content": "First:\n<image>\nSecond:\n<image>\nWhich differs?"}]
    solo = generate_answers(tiny_model, processor, [conversation], [[left, right]], max_new_tokens=NEW, num_beams=1)[0]
    swapped = generate_answers(tiny_model, processor, [conversation], [[right, left]], max_new_tokens=NEW, num_beams=1)[0]
    messages = [
        {
            "role": "user",
            "content": [text_part("First:"), image_part(left), text_part("Second:"), image_part(right), text_part("Which differs?")],
        }
    ]
    reply = ask(client, messages)
    assert reply.choices[0].message.content == solo.text != swapped.text
    assert reply.usage.prompt_tokens == solo.prompt_tokens


def test_multi_turn_and_system_message_equal_chat(client, tiny_model, tokenizer):
    image = picture(80, 80, seed=4)
    msgs = [
        {"role": "user", "content": "What colour dominates?"},
        {"role": "assistant", "content": "Mostly grey noise."},
        {"role": "user", "content": "And in the corners?"},
    ]
    expected = chat_answer(tiny_model, tokenizer, image, msgs)
    messages = [{"role": "user", "content": [image_part(image), text_part(msgs[0]["content"])]}, msgs[1], msgs[2]]
    assert ask(client, messages).choices[0].message.content == expected
    # A system message goes in front of the first user turn's text (the picture stays in front of all), as chat does.
    system = {"role": "system", "content": "Answer in one short sentence."}
    with_system = chat_answer(tiny_model, tokenizer, image, [system] + msgs)
    assert with_system != expected
    assert ask(client, [system] + messages).choices[0].message.content == with_system
    folded = [{"role": "user", "content": system["content"] + "\n" + msgs[0]["content"]}] + msgs[1:]
    assert chat_answer(tiny_model, tokenizer, image, folded) == with_system


def test_image_from_image_root_only(client, image_root, tiny_model, tokenizer):
    from PIL import Image

    question = [text_part("What is it?")]
    expected = chat_answer(tiny_model, tokenizer, Image.open(image_root / "red.png"), [{"role": "user", "content": "What is it?"}])
    path_part = {"type": "image_url", "image_url": {"url": "red.png"}}
    assert ask(client, [{"role": "user", "content": [path_part] + question}]).choices[0].message.content == expected
    outside = (
        "../secret.png",
        str(image_root.parent / "secret.png"),
        "file:///etc/passwd",
        "/etc/hostname",
        "../absent.png",
        "/no/such.png",
    )
    # the same answer whether a file outside the root exists or not: a client cannot probe the server's files
    for url, code in [(url, "image_path_refused") for url in outside] + [("nothere.png", "image_not_found")]:
        bad = {"type": "image_url", "image_url": {"url": url}}
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, [{"role": "user", "content": [bad] + question}])
        assert err.value.body["param"] == "messages[0].content[0].image_url.url", err.value.body
        assert "image-root" in err.value.body["message"] and err.value.body["code"] == code, (url, err.value.body)


def test_eight_concurrent_clients_get_their_solo_answers(server, client, tiny_model, tokenizer):
    questions = [f"Question number {i}: what do you see?" for i in range(8)]
    images = [picture(40 + 20 * (i % 3), 50, seed=10 + i) if i % 2 == 0 else None for i in range(8)]
    expected = [chat_answer(tiny_model, tokenizer, im, [{"role": "user", "content": q}]) for q, im in zip(questions, images)]
    before = server.health()["batches"]

    def one(i):
        content = [image_part(images[i]), text_part(questions[i])] if images[i] is not None else questions[i]
        return ask(client, [{"role": "user", "content": content}]).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert answers == expected
    health = server.health()
    assert health["largest_batch"] > 1 and health["batches"] - before < 8  # requests shared generate calls


def test_stop_strings_and_max_tokens(client, tiny_model, tokenizer):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    full = chat_answer(tiny_model, tokenizer, None, msgs, max_new_tokens=40)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    reply = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=40, stop=[stop])
    answer = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and stop not in answer and reply.usage.completion_tokens < 40

    # The answer up to the stop string. While stop strings are watched the text is decoded token by token, which
    # on the tiny model's random byte pieces differs from decoding the whole in spaces and punctuation: compare letters.
    def letters(text):
        return re.sub(r"[\W_]", "", text)

    assert letters(full).startswith(letters(answer)) and len(letters(answer)) >= len(letters(full[: full.find(stop)])) - 2
    text, finish, _ = ask_streamed(client, msgs, stop=stop, max_tokens=40)
    assert text == answer and finish == "stop"
    short = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_sampling_with_a_seed_repeats(client):
    msgs = [{"role": "user", "content": "Say something."}]
    first, second = (
        client.chat.completions.create(model="tiny", messages=msgs, seed=5, max_tokens=12).choices[0].message.content for _ in range(2)
    )
    assert first == second


def test_a_seed_decides_its_own_request_only(client):
    """A seeded request leaves the random state of later unseeded requests as it was (vLLM's rule): two unseeded
    answers after the same seeded one differ."""
    msgs = [{"role": "user", "content": "Say something."}]
    answers = []
    for _ in range(2):
        client.chat.completions.create(model="tiny", messages=msgs, seed=7, max_tokens=4)
        answers.append(
            client.chat.completions.create(model="tiny", messages=msgs, temperature=1.0, max_tokens=24).choices[0].message.content
        )
    assert answers[0] != answers[1]


def raw(server, body, key=KEY, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        server.url + "/v1/chat/completions", content=content, headers={**headers, "Content-Type": "application/json"}, timeout=timeout
    )


def test_auth(server):
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in (None, "wrong-key", KEY + "x"):
        response = raw(server, good, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert raw(server, good).status_code == 200


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(server):
    user = {"role": "user", "content": "hi"}
    junk = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    big = data_url(picture(500, 400, seed=0))  # 200,000 pixels > IMAGE_PIXELS_LIMIT
    # a PNG whose header (390x390) reads but whose pixels do not (cut after 300 bytes), and a PPM with too few bytes
    cut = "data:image/png;base64," + base64.b64encode(png_bytes(picture(390, 390, seed=3))[:300]).decode()
    short_ppm = "data:image/x-portable-pixmap;base64," + base64.b64encode(b"P6\n16 12\n255\n" + b"G" * 10).decode()

    def pictures(*urls, text=None):
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + ([{"type": "text", "text": text}] if text else [])
        return {"model": "tiny", "messages": [{"role": "user", "content": parts}]}

    cases = [
        (b"{not json", 400, None, "not valid JSON"),
        ([1, 2], 400, None, "JSON object"),
        ({"messages": [user]}, 400, "model", "'model' is required"),
        ({"model": "gpt-9", "messages": [user]}, 404, "model", "not served"),
        ({"model": "tiny"}, 400, "messages", "missing"),
        ({"model": "tiny", "messages": "hi"}, 400, "messages", "non-empty list"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "must be one of"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string or a non-empty list"),
        ({"model": "tiny", "messages": [{"role": "user", "content": ""}]}, 400, "messages", "empty content"),
        ({"model": "tiny", "messages": [user, {"role": "assistant", "content": "ok"}]}, 400, "messages[1]", "last message"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0].type", "type"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "<image> trick"}]}, 400, "messages[0].content", "image_url parts"),
        (
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}],
            },
            400,
            "messages[0].content[0].image_url.url",
            "http(s) image URLs are not fetched",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": junk}}]}]},
            400,
            "messages[0].content[0].image_url.url",
            "cannot decode",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]},
            400,
            "messages[0].content[0].image_url.url",
            "--max-image-pixels",
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages", "max_inp_length"),
        (pictures(cut), 400, "messages[0].content[0].image_url.url", "cannot decode"),
        (pictures(short_ppm), 400, "messages[0].content[0].image_url.url", "cannot decode"),
        # 16 such pictures (the most a request may have) and 1,205 tokens of text make a prompt over 2048 tokens:
        # refused from the pictures' headers, before any is decoded (else: "cannot decode")
        (pictures(*[cut] * 16, text="word " * 400), 400, "messages", "max_inp_length"),
        (b"[" * 100_000 + b"]" * 100_000, 400, None, "not valid JSON"),
        (b'{"model": "tiny", "seed": ' + b"1" * 5000 + b"}", 400, None, "not valid JSON"),
        ({"model": "tiny", "messages": [user], "seed": 2**64}, 400, "seed", "between 0 and 2**63 - 1"),
        ({"model": "tiny", "messages": [user], "n": 2}, 400, "n", "must be 1"),
        # fields that would change the answer's meaning are refused by name, never dropped
        ({"model": "tiny", "messages": [user], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported"),
        ({"model": "tiny", "messages": [user], "response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
        ({"model": "tiny", "messages": [user], "logit_bias": {"2": 100}}, 400, "logit_bias", "not supported"),
        ({"model": "tiny", "messages": [user], "ignore_eos": True}, 400, "ignore_eos", "not supported"),
        ({"model": "tiny", "messages": [user], "top_logprobs": 2}, 400, "top_logprobs", "not supported"),
        (
            {"model": "tiny", "messages": [user], "stream_options": {"include_usage": True}},
            400,
            "stream_options",
            "only with 'stream': true",
        ),
        (
            {"model": "tiny", "messages": [user], "stream": True, "stream_options": {"include_usage": "no"}},
            400,
            "stream_options.include_usage",
            "true or false",
        ),
        ({"model": "tiny", "messages": [user], "temperature": "hot"}, 400, "temperature", "must be a number"),
        ({"model": "tiny", "messages": [user], "temperature": 3}, 400, "temperature", "must be in"),
        ({"model": "tiny", "messages": [user], "max_tokens": 0}, 400, "max_tokens", "between 1 and"),
        ({"model": "tiny", "messages": [user], "max_tokens": 100000}, 400, "max_tokens", f"server's limit {MAX_TOKENS}"),
        ({"model": "tiny", "messages": [user], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ({"model": "tiny", "messages": [user], "stream": "yes"}, 400, "stream", "true or false"),
        ({"model": "tiny", "messages": [user], "max_tokens": 5, "min_tokens": 6}, 400, "min_tokens", "between 0 and max_tokens"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}], "max_tokens": MAX_TOKENS},
            400,
            "max_tokens",
            f"more than the server's context of {MAX_MODEL_LEN} (--max-model-len)",
        ),
    ]
    for body, status, param, reason in cases:
        response = raw(server, body)
        assert response.status_code == status, (body if not isinstance(body, dict) else list(body), response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and reason in error["message"], (error, reason)
    assert httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}).json()["error"]["code"] == "not_found"
    ok = raw(server, {"model": "tiny", "messages": [user], "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    # a temperature too small to divide by answers greedily; a null max_completion_tokens leaves max_tokens in charge
    tiny_temperature = raw(server, {"model": "tiny", "messages": [user], "max_tokens": 4, "temperature": 1e-300})
    assert tiny_temperature.status_code == 200 and tiny_temperature.json()["choices"] == ok.json()["choices"]
    unset = raw(server, {"model": "tiny", "messages": [user], "max_tokens": 2, "max_completion_tokens": None, "temperature": 0})
    assert unset.status_code == 200 and unset.json()["usage"]["completion_tokens"] == 2
    # fields that change nothing, or hold their neutral value, are accepted
    harmless = {
        "user": "u1",
        "metadata": {"k": "v"},
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logit_bias": {},
        "echo": False,
        "modalities": ["text"],
        "reasoning_effort": "low",
    }
    same = raw(server, {"model": "tiny", "messages": [user], "max_tokens": 4, "temperature": 0, **harmless})
    assert same.status_code == 200 and same.json()["choices"] == ok.json()["choices"]
    assert server.health()["failed"] == 0  # every bad request was refused before it reached a batch


def test_disconnected_clients_stop_their_generation(server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Talk for a long time."}],
        "max_tokens": MAX_TOKENS,
        "min_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    before = server.health()["cancelled"]
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the answer is streaming: leave
    with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
        raw(server, body, timeout=1.0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (server.health()["cancelled"] < before + 2 or server.health()["running"]):
        time.sleep(0.2)
    health = server.health()
    assert health["cancelled"] >= before + 2 and health["running"] == 0, health


# --- an adapter, and a full queue (a second server: one request at a time, one waiting) -----------------------


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint_fp32, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights on q/k/v, saved by PEFT: the `adapter` export layout."""
    from peft import LoraConfig, get_peft_model

    from axolotl_minicpmv import MiniCPMV

    torch.manual_seed(0)
    base = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)", init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("adapter") / "tiny-lora"
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_server(tiny_checkpoint_fp32, adapter_dir, tmp_path_factory):
    srv = Server(
        ["--model", str(tiny_checkpoint_fp32), "--adapter", str(adapter_dir), "--max-batch-size", "1", "--max-queue", "1", "--no-ui"],
        tmp_path_factory.mktemp("logs") / "adapter-server.log",
    )
    yield srv
    srv.stop()


def test_adapter_is_served(adapter_server, adapter_dir, tiny_checkpoint_fp32, tiny_model, tokenizer):
    from axolotl_minicpmv import load_model

    tuned = load_model(tiny_checkpoint_fp32, adapter=adapter_dir, dtype=torch.float32).eval()
    image = picture(70, 50, seed=9)
    msgs = [{"role": "user", "content": "What is this?"}]
    expected = chat_answer(tuned, tokenizer, image, msgs)
    assert expected != chat_answer(tiny_model, tokenizer, image, msgs)
    client = openai.OpenAI(base_url=adapter_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny-lora"]
    reply = client.chat.completions.create(
        model="tiny-lora",
        temperature=0,
        max_tokens=NEW,
        messages=[{"role": "user", "content": [image_part(image), text_part("What is this?")]}],
    )
    assert reply.choices[0].message.content == expected
    assert httpx.get(adapter_server.url + "/").status_code == 404  # --no-ui


def test_full_queue_gets_503_with_retry_after(adapter_server):
    url = adapter_server.url + "/v1/chat/completions"
    long = {
        "model": "tiny-lora",
        "messages": [{"role": "user", "content": "Go on and on."}],
        "max_tokens": 1024,
        "min_tokens": 1024,
        "temperature": 0,
    }
    waiting: dict = {}
    with httpx.stream("POST", url, json={**long, "stream": True}, timeout=60) as running:
        lines = running.iter_lines()  # kept: closing this iterator would close the connection (and cancel the request)
        while not ('"content": "' in (line := next(lines)) and '"content": ""' not in line):
            pass  # until the first request runs (batch size 1)
        thread = threading.Thread(
            target=lambda: waiting.update(r=httpx.post(url, json={**long, "max_tokens": 4, "min_tokens": 0}, timeout=120))
        )
        thread.start()
        deadline = time.monotonic() + 20
        while adapter_server.health()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert adapter_server.health()["running"] == 1
        refused = httpx.post(url, json={**long, "max_tokens": 4, "min_tokens": 0}, timeout=30)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "server_busy" and "--max-queue" in refused.json()["error"]["message"]
        lines.close()
    thread.join(timeout=120)  # leaving the stream cancelled the running request; the waiting one runs
    assert waiting["r"].status_code == 200 and waiting["r"].json()["choices"][0]["finish_reason"] == "length"
    assert httpx.post(url, json={**long, "max_tokens": 2, "min_tokens": 0}, timeout=60).status_code == 200


def test_a_picture_whose_header_names_another_size_is_prompted_as_decoded(tiny_tokenizer):
    """The prompt is tokenized from the pictures' headers before they are decoded; an ICNS file's header names its
    block's size (1024x1024 for ic10, sliced) while the picture inside may be 16x16: the prompt must follow the
    decoded picture, or its placeholders outnumber the pixels."""
    import struct

    from axolotl_minicpmv.model.image_processing_minicpmv import MiniCPMVImageProcessor
    from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor
    from axolotl_minicpmv.serving.api import ServerSettings, _prepare
    from axolotl_minicpmv.serving.protocol import parse_chat_request

    processor = MiniCPMVProcessor(MiniCPMVImageProcessor(), tiny_tokenizer)
    small = picture(16, 16, seed=4)
    block = b"ic10" + struct.pack(">I", 8 + len(png_bytes(small))) + png_bytes(small)
    icns = "data:image/icns;base64," + base64.b64encode(b"icns" + struct.pack(">I", 8 + len(block)) + block).decode()

    def prompt(url):
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}],
        }
        return _prepare(parse_chat_request(body, {"tiny"}, 16), processor, None, ServerSettings("tiny"))

    from_icns, from_png = prompt(icns), prompt(data_url(small))
    assert from_icns.ids == from_png.ids and len(from_icns.pixels) == len(from_png.pixels) == 1
