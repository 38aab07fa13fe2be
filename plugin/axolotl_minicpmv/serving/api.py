"""The FastAPI app of `minicpmv-serve`: OpenAI chat completions (plain and streamed), models, health, the page.

Requests are checked here (body size, JSON, `protocol.parse_chat_request`, pictures, prompt length) before
they are queued, so a bad request is refused with a 4xx OpenAI error body and never reaches a batch. With
an API key every `/v1` route needs `Authorization: Bearer KEY` (compared in constant time). A client that
disconnects cancels its request, queued or running.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..model.conversation import InvalidInputError
from .images import DEFAULT_MAX_IMAGE_PIXELS, decode_image, open_image
from .protocol import ChatRequest, RequestError, fit_to_context, parse_chat_request
from .scheduler import Job, Prompt, QueueFull, Scheduler

MAX_IMAGES_PER_REQUEST = 16
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    image_root: Path | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_tokens: int = 1024  # chat's max_new_tokens: the most a request may ask for, and the default
    max_inp_length: int = 2048  # chat's: longer prompts are refused
    max_model_len: int = 2048  # prompt + answer (vLLM's name): the context the fast path is compiled for
    max_request_bytes: int = 32 * 1024 * 1024
    ui: bool = True


def create_app(scheduler: Scheduler, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="MiniCPM-V 2.0 (axolotl-minicpmv)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.settings = scheduler, settings
    processor = scheduler.processor
    image_root = settings.image_root.resolve() if settings.image_root else None
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(
            RequestError(f"{request.method} {request.url.path}: {err.detail}", None, code=code).body(), status_code=err.status_code
        )

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise RequestError(
                "missing or wrong API key: send 'Authorization: Bearer KEY' (the server's --api-key)",
                None,
                code="invalid_api_key",
                status=401,
                type="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queued": scheduler.queued, "running": scheduler.running, **scheduler.stats}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "created": created, "owned_by": "axolotl-minicpmv"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await _read_json(request, settings.max_request_bytes)
        chat = parse_chat_request(body, {settings.model_name}, settings.max_tokens)
        if len(chat.image_urls) > MAX_IMAGES_PER_REQUEST:
            raise RequestError(f"{len(chat.image_urls)} images; at most {MAX_IMAGES_PER_REQUEST} per request", "messages")
        prompt = await run_in_threadpool(_prepare, chat, processor, image_root, settings)
        chat = fit_to_context(chat, len(prompt.ids), settings.max_model_len, settings.max_tokens)
        job = Job(chat, prompt, asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull:
            wait = scheduler.retry_after()
            raise RequestError(
                f"the server is busy ({scheduler.max_queue} requests queued, --max-queue); retry in about {wait} s",
                None,
                code="server_busy",
                status=503,
                type="server_error",
                headers={"Retry-After": str(wait)},
            ) from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return StreamingResponse(
                _stream(job, completion_id, settings.model_name),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(job, request, completion_id, settings.model_name)

    if settings.ui:
        page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

        @app.get("/", response_class=HTMLResponse)
        async def index():
            return HTMLResponse(
                page,
                headers={
                    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                    "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"
                },
            )

    @app.on_event("shutdown")
    async def shutdown():
        scheduler.close()

    return app


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(
            f"the request body is {int(declared):,} bytes, more than the server's limit of {limit:,}",
            None,
            code="request_too_large",
            status=413,
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                f"the request body is more than the server's limit of {limit:,} bytes", None, code="request_too_large", status=413
            )
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    # ValueError: bad JSON, bad UTF-8, an integer of more digits than Python parses; RecursionError: deep nesting
    except (ValueError, RecursionError) as err:
        raise RequestError(f"the request body is not valid JSON ({err})", None, code="invalid_json") from None


def _prepare(chat: ChatRequest, processor, image_root: Path | None, settings: ServerSettings) -> Prompt:
    """Open the pictures and build the prompt and pixels once, here in the request's thread (not the model's),
    so that bad input is refused before it is queued. The prompt is tokenized from the pictures' headers
    (their sizes) before any is decoded: a request of many large pictures that cannot fit costs no decoding."""
    opened = [(open_image(url, param, image_root, settings.max_image_pixels), param) for url, param in chat.image_urls]
    try:
        sizes = [image.size for image, _ in opened]
        ids = processor.prompt_ids(chat.conversation, sizes, settings.max_inp_length)
        images = [decode_image(image, param) for image, param in opened]
        decoded = [image.size for image in images]
        if decoded != sizes:  # a format whose header names another size (ICNS): the pixels decide
            ids = processor.prompt_ids(chat.conversation, decoded, settings.max_inp_length)
        return Prompt(ids, processor.inference_pixels(images))
    except InvalidInputError as err:
        raise RequestError(
            f"messages: {err}", "messages", code="context_length_exceeded" if "max_inp_length" in str(err) else None
        ) from None


def _usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _failure(err: Exception) -> RequestError:
    if isinstance(err, InvalidInputError):
        return RequestError(f"messages: {err}", "messages")
    return RequestError(f"generation failed: {type(err).__name__}: {err}", None, code="generation_failed", status=500, type="server_error")


async def _complete(job: Job, request: Request, completion_id: str, model_name: str):
    while True:
        try:
            kind, payload = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()  # its row ends at the next step; nobody reads the answer
                return JSONResponse({}, status_code=499)
            continue
        if kind == "error":
            raise _failure(payload)
        if kind == "done":
            break
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": payload.text},
                "finish_reason": payload.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(payload),
    }


async def _stream(job: Job, completion_id: str, model_name: str):
    created = int(time.time())

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                yield chunk({"content": payload})
            elif kind == "error":
                yield f"data: {json.dumps(_failure(payload).body())}\n\n"
                break
            else:
                yield chunk({}, payload.finish_reason)
                if job.request.include_usage:
                    body = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": _usage(payload),
                    }
                    yield f"data: {json.dumps(body)}\n\n"
                break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away: stop its generation
            job.cancel()
