"""The OpenAI-compatible HTTP front of the engine (FastAPI; uvicorn runs it: hrm_mega/entry/serve.py).

    GET  /health                 {"status": "ok", "running": ..., "waiting": ...}  (no key needed)
    GET  /v1/models              the served model
    POST /v1/completions         prompt: text, token ids, or a list of either (one choice per prompt)
    POST /v1/chat/completions    messages, rendered by the chat template
    POST /admin/swap             {"model": PATH}: canary, then hot swap (needs a server with an API key)
    POST /admin/rollback         back to the model served before the last swap

Both POSTs stream with server-sent events when `stream` is true (`data: {chunk}` lines, then
`data: [DONE]`; `stream_options.include_usage` adds a last chunk with the usage). Sampling: temperature
(0 = greedy; default 1, as OpenAI's), top_p, seed, stop, max_tokens (chat: max_completion_tokens too),
and the extra body fields top_k, ignore_eos, max_cycles, halt_threshold (per-request halting) and
return_token_ids (each choice, or each chunk, also carries its token ids). usage adds `cycles` (H cycles
summed over the new tokens and the CycleBlocks) and `mean_cycles` (per block per token).

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with 400 for a bad request
(malformed JSON, a bad field, a prompt longer than the context), 401 for a missing or wrong API key, 404
for an unknown model or path, 413 for a body over the limit, 429 when the queue is full; the admin
endpoints answer 403 on a server without a key and 409 when a swap is refused (failed canary, unreadable
or newer-format candidate, another swap under way). The key check
and the body limit run in an ASGI middleware ahead of routing, so no endpoint but /health answers
without the key, and no handler ever sees an oversized body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hrm_mega.inference.serve.engine import Busy, Engine, Output, RequestError, SamplingParams, Usage
from hrm_mega.inference.serve.engine import Request as EngineRequest
from hrm_mega.inference.serve.hotswap import SwapError
from hrm_mega.inference.serve.text import GEMMA_STOP, ChatError, gemma_chat_prompt

OPEN_PATHS = ("/health",)
IMAGE_MARKER = "<start_of_image>"  # where an image part stands in the chat text (Gemma 3's convention)


@dataclass
class ServeSettings:
    """What the HTTP front needs besides the engine. encode: text -> ids (no BOS); bos_id: prepended to
    text prompts when not None; chat_prompt: (role, content) pairs -> prompt text; chat_stop: stop
    strings every chat request gets (Gemma's <end_of_turn>)."""

    model_name: str
    encode: Callable[[str], list[int]]
    bos_id: int | None
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    chat_prompt: Callable[[Sequence[tuple[str, str]]], str] = gemma_chat_prompt
    chat_stop: tuple[str, ...] = (GEMMA_STOP,)
    hot_swap: Any = None  # serve/hotswap.HotSwap: enables /admin/swap and /admin/rollback (with an API key)
    # (prompt text with IMAGE_MARKERs, image bytes) -> (ids, pixel_values): a model with images only
    image_prompt: Callable[[str, list[bytes]], tuple[list[int], Any]] | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --------------------------------------------------------------------------------------------------
# Request bodies: OpenAI's fields (unknown ones are ignored, as vLLM does), our extras, and refusals of
# features this server does not have.


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None
    # extras
    top_k: int | None = None
    ignore_eos: bool = False
    max_cycles: int | None = None
    halt_threshold: float | None = None
    return_token_ids: bool = False

    def unsupported(self) -> str | None:
        if self.n not in (None, 1):
            return f"n={self.n}: this server returns one choice per prompt"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return f"{name} is not supported"
        if self.logit_bias:
            return "logit_bias is not supported"
        if self.logprobs not in (None, False, 0):
            return "logprobs are not supported"
        return None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of is not supported"
        if self.suffix:
            return "suffix is not supported"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    image_url: dict[str, Any] | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


# --------------------------------------------------------------------------------------------------


def build_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine's scheduler thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="hrm-mega", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(_first_error(e.errors())), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = engine.stats()
        return {"status": "ok", "running": stats["running"], "waiting": stats["waiting"]}

    def hot_swap() -> Any:
        if settings.api_key is None or settings.hot_swap is None:
            raise ApiError(403, "the admin endpoints need a server started with an API key (--api-key)",
                           "permission_error")  # fmt: skip
        return settings.hot_swap

    @app.post("/admin/swap")
    async def swap(request: Request) -> dict[str, Any]:
        """Body {"model": PATH}: a model directory or consolidated .safetensors the server can read.
        The candidate must pass the canary; then it serves from the next batch on (no request dropped)."""
        r = hot_swap()
        raw = await request.body()
        try:
            path = json.loads(raw)["model"]
            if not isinstance(path, str):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ApiError(400, 'the body must be {"model": PATH}', param="model") from None
        try:
            return await asyncio.to_thread(r.swap_to, path)
        except SwapError as e:
            raise ApiError(409, str(e), code="swap_refused") from None

    @app.post("/admin/rollback")
    async def rollback() -> dict[str, Any]:
        r = hot_swap()
        try:
            return await asyncio.to_thread(r.rollback)
        except SwapError as e:
            raise ApiError(409, str(e), code="rollback_refused") from None

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "hrm-mega",
                "max_model_len": engine.max_context}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        current = None if settings.hot_swap is None else settings.hot_swap.current
        return {**engine.stats(), "kv_cache_bytes": engine.cache.nbytes(), "serving": current}

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def sampling(
        body: _Body, max_tokens: int | None, prompt_len: int, extra_stop: tuple[str, ...]
    ) -> SamplingParams:
        if (why := body.unsupported()) is not None:
            raise ApiError(400, why)
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            max_tokens = max(engine.max_context - prompt_len, 1) if isinstance(body, ChatBody) else 16
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0), seed=body.seed,
            stop=tuple(stop) + extra_stop, ignore_eos=body.ignore_eos, max_cycles=body.max_cycles,
            halt_threshold=body.halt_threshold,
        )  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await parse(request, CompletionBody)
        check_model(body.model)
        prompts = completion_prompts(body.prompt, settings)
        params = [sampling(body, body.max_tokens, len(p), ()) for p in prompts]
        return await respond(request, engine, body, prompts, params, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await parse(request, ChatBody)
        check_model(body.model)
        images: list[bytes] | None = [] if settings.image_prompt is not None else None
        try:
            turns = [(m.role, message_text(i, m, images)) for i, m in enumerate(body.messages)]
            text = settings.chat_prompt(turns)
        except ChatError as e:
            raise ApiError(400, str(e), param="messages") from None
        pixels = None
        if images:
            try:  # decoding and resizing: off the event loop
                prompt, pixels = await asyncio.to_thread(settings.image_prompt, text, images)
            except ValueError as e:
                raise ApiError(400, str(e).splitlines()[0], param="messages") from None
        else:
            prompt = ([] if settings.bos_id is None else [settings.bos_id]) + settings.encode(text)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = [sampling(body, max_tokens, len(prompt), settings.chat_stop)]
        return await respond(request, engine, body, [prompt], params, "chat.completion", [pixels])

    return app


async def parse(request: Request, model: type[_Body]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, _first_error(e.errors()), param=_first_param(e.errors())) from None


def _first_param(errors: Sequence[Any]) -> str | None:
    return ".".join(str(p) for p in errors[0].get("loc", ())) or None if errors else None


def _first_error(errors: Sequence[Any]) -> str:
    if not errors:
        return "invalid request"
    e = errors[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where or 'body'}: {e.get('msg', 'invalid')}{more}".replace("\n", " ")


def completion_prompts(prompt: Any, settings: ServeSettings) -> list[list[int]]:
    """A completion's prompt (text, token ids, or a list of either) as token lists."""
    bos = [] if settings.bos_id is None else [settings.bos_id]
    if isinstance(prompt, str):
        return [bos + settings.encode(prompt)]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [bos + settings.encode(p) for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise ApiError(400, "prompt must be a string, a list of strings, token ids, or lists of token ids")


def message_text(index: int, message: Message, images: list[bytes] | None = None) -> str:
    """The message's text; an image part (a data: URI, decoded into `images`) becomes IMAGE_MARKER."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type == "image_url" and images is not None:
            images.append(data_uri_bytes(index, part.image_url))
            texts.append(IMAGE_MARKER)
            continue
        if part.type != "text" or part.text is None:
            takes = "text and image_url" if images is not None else "text only"
            raise ApiError(400, f"messages[{index}]: a {part.type!r} part; this server takes {takes}",
                           param="messages")  # fmt: skip
        texts.append(part.text)
    return "".join(texts)


def data_uri_bytes(index: int, image_url: dict[str, Any] | None) -> bytes:
    """The bytes of an image_url part's `data:image/...;base64,...` URI (the server fetches no URLs)."""
    url = (image_url or {}).get("url")
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ApiError(400, f"messages[{index}]: image_url must be a data: URI (data:image/png;base64,...); "
                       "this server fetches no URLs", param="messages")  # fmt: skip
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, f"messages[{index}]: the image's base64 data is malformed", param="messages"
        ) from None


async def respond(
    request: Request,
    engine: Engine,
    body: _Body,
    prompts: list[list[int]],
    params: list[SamplingParams],
    kind: Literal["text_completion", "chat.completion"],
    pixel_values: list[Any] | None = None,
) -> Any:
    """Submits one engine request per prompt (with its images' pixel_values, if any), then answers with
    the whole result or a stream."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
    requests = []
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):

        def sink(output: Output, i: int = i) -> None:  # the engine thread -> this event loop
            loop.call_soon_threadsafe(queue.put_nowait, (i, output))

        requests.append(
            EngineRequest(prompt, p, sink, pixel_values=None if pixel_values is None else pixel_values[i])
        )
    try:
        for r in requests:
            engine.check(r.prompt, r.params)
        for r in requests:
            engine.submit(r)
    except RequestError as e:
        _cancel(requests)
        raise ApiError(400, str(e)) from None
    except Busy as e:
        _cancel(requests)
        raise ApiError(429, str(e), type_="server_busy") from None
    ident = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + secrets.token_hex(12)
    head = {"id": ident, "created": int(time.time()), "model": body.model}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        chunks = stream(queue, requests, head, kind, include_usage, body.return_token_ids)
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return await collect(request, queue, requests, head, kind, body.return_token_ids)


def _cancel(requests: list[EngineRequest]) -> None:
    for r in requests:
        r.cancel()


def usage_json(usages: Sequence[Usage]) -> dict[str, Any]:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cycles = sum(u.cycles for u in usages)
    blocks = usages[0].blocks if usages else 1
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "cycles": cycles, "mean_cycles": round(cycles / (completion * blocks), 6) if completion else None,
    }  # fmt: skip


async def collect(
    request: Request,
    queue: asyncio.Queue[tuple[int, Output]],
    requests: list[EngineRequest],
    head: dict[str, Any],
    kind: str,
    token_ids: bool,
) -> JSONResponse:
    """Waits for every choice to finish; a client that disconnects meanwhile cancels its requests."""
    n = len(requests)
    texts, ids, finals = [""] * n, [[] for _ in range(n)], [None] * n
    disconnect = asyncio.ensure_future(_disconnected(request))
    try:
        while any(f is None for f in finals):
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                _cancel(requests)
                return JSONResponse(error_body("the client disconnected"), status_code=499)
            i, out = get.result()
            texts[i] += out.text
            ids[i] += out.token_ids
            if out.finish_reason is not None:
                finals[i] = out
    finally:
        disconnect.cancel()
    errors = [f.error for f in finals if f.finish_reason == "error"]
    if errors:
        raise ApiError(500, f"generation failed: {errors[0]}", type_="server_error")
    choices = []
    for i, final in enumerate(finals):
        choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": final.finish_reason}
        if kind == "text_completion":
            choice["text"] = texts[i]
        else:
            choice["message"] = {"role": "assistant", "content": texts[i]}
        if token_ids:
            choice["token_ids"] = ids[i]
        choices.append(choice)
    return JSONResponse(
        {**head, "object": kind, "choices": choices, "usage": usage_json([f.usage for f in finals])}
    )


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is read already, so the next message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def stream(
    queue: asyncio.Queue[tuple[int, Output]],
    requests: list[EngineRequest],
    head: dict[str, Any],
    kind: str,
    include_usage: bool,
    token_ids: bool,
) -> AsyncIterator[str]:
    """Server-sent events of a streamed response. If the client disconnects, Starlette cancels this
    generator, and `finally` cancels the requests, so their rows leave the batch at the next step."""
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': choices, **extra})}\n\n"

    def choice(i: int, out: Output | None, role: bool = False) -> dict[str, Any]:
        c: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": None}
        text = "" if out is None else out.text
        if kind == "text_completion":
            c["text"] = text
        else:
            c["delta"] = (
                {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            )
        if token_ids:
            c["token_ids"] = [] if out is None else out.token_ids
        if out is not None and out.finish_reason is not None:
            c["finish_reason"] = out.finish_reason
        return c

    try:
        if kind != "text_completion":
            yield event([choice(i, None, role=True) for i in range(len(requests))])
        usages: list[Usage | None] = [None] * len(requests)
        while any(u is None for u in usages):
            i, out = await queue.get()
            if out.finish_reason == "error":
                yield f"data: {json.dumps(error_body(f'generation failed: {out.error}', 'server_error'))}\n\n"
                return
            if out.finish_reason is not None:
                usages[i] = out.usage
            if out.text or out.token_ids or out.finish_reason is not None:
                yield event([choice(i, out)])
        if include_usage:
            yield event([], usage=usage_json(usages))
        yield "data: [DONE]\n\n"
    finally:
        _cancel(requests)


class Guard:
    """ASGI middleware ahead of routing: the API key (every path but /health) and the body limit.

    With a key set, a request must carry `Authorization: Bearer KEY` (compared in constant time) or
    it gets 401 and nothing else happens. A body over max_body_bytes gets 413: at once when its
    Content-Length says so, else as soon as the bytes read pass the limit (the body is read here, at
    most max_body_bytes of it, and replayed to the app)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await _send_json(send, 401, error_body(
                "missing or wrong API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key"
            ), [(b"www-authenticate", b"Bearer")])  # fmt: skip
            return
        length = headers.get("content-length")
        too_large = error_body(f"the request body is over the limit of {self.max_body_bytes} bytes")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _send_json(send, 413 if length.isdigit() else 400, too_large)
            return
        body, more, messages = b"", True, []
        while more:
            message = await receive()
            if message["type"] != "http.request":
                messages.append(message)
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await _send_json(send, 413, too_large)
                return
        replay = [{"type": "http.request", "body": body, "more_body": False}, *messages]

        async def replayed() -> dict[str, Any]:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )


async def _send_json(
    send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})
