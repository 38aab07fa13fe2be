"""OpenAI chat completions requests -> conversations with `<image>` tags, pictures and generation settings.

The one place that checks a request body: every refusal is a `RequestError` carrying the OpenAI error body
(`{"error": {"message", "type", "param", "code"}}`) that names the field and the reason. Conversations then
go through `validate_conversation` (the project's rule: leading system turns go in front of the first user
turn's text). Content parts are joined with "\n", an image part becoming an `<image>` tag, so one picture in
front of the question gives exactly `chat(image, msgs)`'s prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..model.conversation import IMAGE_TAG, InvalidInputError, json_type, validate_conversation

ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer name for "system"
GREEDY_REPETITION_PENALTY = 1.2  # chat(sampling=False)'s
GREEDY_BELOW_TEMPERATURE = 1e-5  # a temperature under this answers greedily, as temperature 0 does
MAX_STOP_STRINGS = 4
# The request fields this server reads, those it ignores because they never change an answer, and the values of
# others that change nothing. Any other field or value (tools, response_format, logit_bias, vLLM's guided_json,
# ignore_eos...) is refused by name rather than dropped: an answer that ignored it might not mean what was asked.
READ_FIELDS = frozenset(
    "model messages n frequency_penalty presence_penalty logprobs top_logprobs max_tokens max_completion_tokens "
    "temperature top_p top_k repetition_penalty min_tokens seed stream stream_options stop".split()
)
IGNORED_FIELDS = frozenset(
    "user store metadata service_tier prompt_cache_key safety_identifier parallel_tool_calls reasoning_effort".split()
)
NEUTRAL_VALUES = {
    "tools": [],
    "tool_choice": "none",
    "logit_bias": {},
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "echo": False,
    "min_p": 0,
    "best_of": 1,
    "ignore_eos": False,
    "include_stop_str_in_output": False,
    "skip_special_tokens": False,  # special tokens are kept in answers, as chat keeps them
}


class RequestError(Exception):
    """A refused request: HTTP status + OpenAI error body."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        *,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A checked request: the conversation (tags placed), its pictures' URLs in tag order, and settings."""

    conversation: list[dict]
    image_urls: list[tuple[str, str]]  # (url, param naming it)
    max_tokens: int | None  # None: not given; `fit_to_context` sets what the server's context leaves
    greedy: bool
    overrides: dict  # generate_answers overrides: num_beams / temperature / top_p / top_k / repetition_penalty
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    min_tokens: int = 0  # vLLM's extra field: no eos before this many tokens
    stream: bool = False
    include_usage: bool = False

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one `generate` call (one generation config per call)."""
        return (self.greedy, tuple(sorted(self.overrides.items())), self.seed, self.min_tokens)


def parse_chat_request(body, model_names: set[str], max_tokens_limit: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got a JSON {json_type(body)}", None)
    model = body.get("model")
    if model is None:
        raise RequestError("'model' is required (see GET /v1/models)", "model")
    if not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got a JSON {json_type(model)}", "model")
    if model not in model_names:
        raise RequestError(
            f"model {model!r} is not served here; served: {sorted(model_names)}", "model", code="model_not_found", status=404
        )
    for name, value in body.items():
        if value is None or name in READ_FIELDS or name in IGNORED_FIELDS:
            continue
        if name not in NEUTRAL_VALUES or value != NEUTRAL_VALUES[name]:
            raise RequestError(f"'{name}' is not supported by this server", name, code="unsupported_parameter")
    conversation, image_urls = _messages(body.get("messages"))

    n = body.get("n", 1)
    if n is not None and (_int(n, "n") != 1):
        raise RequestError(f"'n' must be 1 (one answer per request), got {n}", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(f"'{name}' is not supported; use 'repetition_penalty' (an extra field, as in vLLM)", name)
    for name in ("logprobs", "top_logprobs"):
        if body.get(name):
            raise RequestError(f"'{name}' is not supported by this server", name)

    # OpenAI's clients may send unset fields as null: a null max_completion_tokens leaves max_tokens in charge
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(param)
    if max_tokens is not None and not 1 <= _int(max_tokens, param) <= max_tokens_limit:
        raise RequestError(f"'{param}' must be between 1 and the server's limit {max_tokens_limit}, got {max_tokens}", param)

    temperature = _number(body.get("temperature"), "temperature", 0.0, 2.0)
    top_p = _number(body.get("top_p"), "top_p", 0.0, 1.0, low_open=True)
    top_k = body.get("top_k")
    if top_k is not None and _int(top_k, "top_k") < 1:
        raise RequestError(f"'top_k' must be a positive integer, got {top_k}", "top_k")
    repetition_penalty = _number(body.get("repetition_penalty"), "repetition_penalty", 0.0, 10.0, low_open=True)
    # dividing the logits by a smaller temperature overflows them: greedy, as vLLM also decides
    greedy = temperature is not None and temperature < GREEDY_BELOW_TEMPERATURE
    if greedy:  # exactly chat(sampling=False, num_beams=1): top_p / top_k do not apply
        overrides = {"num_beams": 1, "repetition_penalty": repetition_penalty or GREEDY_REPETITION_PENALTY}
    else:  # unset keys keep chat's sampling defaults (top_p 0.8, top_k 100, temperature 0.7, repetition_penalty 1.05)
        given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty}
        overrides = {k: v for k, v in given.items() if v is not None}

    min_tokens = body.get("min_tokens", 0)
    most = max_tokens_limit if max_tokens is None else max_tokens
    if min_tokens is not None and not 0 <= _int(min_tokens, "min_tokens") <= most:
        raise RequestError(f"'min_tokens' must be between 0 and max_tokens ({most}), got {min_tokens}", "min_tokens")
    seed = body.get("seed")
    if seed is not None and not 0 <= _int(seed, "seed") < 2**63:  # torch.manual_seed's range
        raise RequestError(f"'seed' must be between 0 and 2**63 - 1, got {seed}", "seed")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got a JSON {json_type(stream)}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    if options and not stream:
        raise RequestError("'stream_options' applies only with 'stream': true", "stream_options")
    if not isinstance(options.get("include_usage", False), bool):
        raise RequestError("'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    return ChatRequest(
        conversation,
        image_urls,
        None if max_tokens is None else int(max_tokens),
        greedy,
        overrides,
        _stop(body.get("stop")),
        seed,
        int(min_tokens or 0),
        bool(stream),
        bool(options.get("include_usage")),
    )


def _messages(messages) -> tuple[list[dict], list[tuple[str, str]]]:
    if not isinstance(messages, list) or not messages:
        got = "missing" if messages is None else f"a JSON {json_type(messages)}" if not isinstance(messages, list) else "empty"
        raise RequestError(f"'messages' must be a non-empty list of {{role, content}} objects; it is {got}", "messages")
    turns, urls = [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content', got a JSON {json_type(msg)}", where)
        role = msg.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {list(ROLES)}, got {role!r}", f"{where}.role")
        role = "system" if role == "developer" else role
        content = msg.get("content")
        if isinstance(content, str):
            text = _no_tags(content, f"{where}.content")
        elif isinstance(content, list) and content:
            pieces = []
            for k, part in enumerate(content):
                at = f"{where}.content[{k}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise RequestError(f"{at}.text must be a string", f"{at}.text")
                    pieces.append(_no_tags(part["text"], f"{at}.text"))
                elif kind == "image_url":
                    if role != "user":
                        raise RequestError(f"{at}: images can only be sent in user messages, not in {role!r} ones", at)
                    image = part.get("image_url")
                    url = image.get("url") if isinstance(image, dict) else image if isinstance(image, str) else None
                    if not isinstance(url, str):
                        raise RequestError(f"{at}.image_url must be an object with a 'url' string", f"{at}.image_url")
                    urls.append((url, f"{at}.image_url.url"))
                    pieces.append(IMAGE_TAG)
                else:
                    raise RequestError(f"{at} must be an object with type 'text' or 'image_url', got {kind!r}", f"{at}.type")
            text = "\n".join(pieces)
        else:
            got = "an empty list" if content == [] else f"a JSON {json_type(content)}"
            raise RequestError(f"{where}.content must be a string or a non-empty list of content parts, got {got}", f"{where}.content")
        turns.append({"role": role, "content": text})
    _untag_single_front_image(turns, len(urls))
    try:
        conversation = validate_conversation(turns, field="messages")
    except InvalidInputError as err:
        raise RequestError(str(err), "messages") from None
    if conversation[-1]["role"] != "user":
        raise RequestError("the last message must come from 'user' (the server answers it)", f"messages[{len(messages) - 1}]")
    return conversation, urls


def _untag_single_front_image(turns: list[dict], num_images: int) -> None:
    """One picture in front of the first user turn's text goes untagged, so the processor places it as `chat`
    does: in front of everything, system text included (`<image>` + "\n" + system + "\n" + question)."""
    first = next((t for t in turns if t["role"] == "user"), None)
    prefix = IMAGE_TAG + "\n"
    if num_images == 1 and first is not None and first["content"].startswith(prefix) and first["content"][len(prefix) :].strip():
        first["content"] = first["content"][len(prefix) :]


def _no_tags(text: str, param: str) -> str:
    if IMAGE_TAG in text:
        raise RequestError(f"{param} contains {IMAGE_TAG!r}, which marks pictures; send pictures as image_url parts", param)
    return text


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    return stops


def _int(value, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{param}' must be an integer, got a JSON {json_type(value)} ({value!r})", param)
    return value


def _number(value, param: str, low: float, high: float, low_open: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{param}' must be a number, got a JSON {json_type(value)} ({value!r})", param)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(f"'{param}' must be in {interval}, got {value}", param)
    return float(value)


def fit_to_context(chat: ChatRequest, prompt_tokens: int, max_model_len: int, max_tokens_limit: int) -> ChatRequest:
    """vLLM's rule for the server's context (`--max-model-len`): prompt plus `max_tokens` must fit it, and a request
    that gives no `max_tokens` gets what the context leaves (at most the server's `--max-tokens`). The fast path's
    caches are compiled for that context at start-up, so a request that fits never compiles."""
    room = max_model_len - prompt_tokens
    if chat.max_tokens is None:
        if room < max(1, chat.min_tokens):
            raise RequestError(
                f"messages: the prompt is {prompt_tokens} tokens, which leaves {max(room, 0)} of the server's context of "
                f"{max_model_len} tokens (--max-model-len) for the answer; shorten the messages",
                "messages",
                code="context_length_exceeded",
            )
        return replace(chat, max_tokens=min(max_tokens_limit, room))
    if chat.max_tokens > room:
        raise RequestError(
            f"the prompt ({prompt_tokens} tokens) and max_tokens ({chat.max_tokens}) come to {prompt_tokens + chat.max_tokens} "
            f"tokens, more than the server's context of {max_model_len} (--max-model-len); ask for at most {max(room, 0)} "
            "new tokens or shorten the messages",
            "max_tokens",
            code="context_length_exceeded",
        )
    return chat
