"""An OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (streamed
as server-sent events or not), a chat page at /, /health, /metrics (Prometheus) and /stats (the
page's memory panel). Needs the `serve` extra (FastAPI, uvicorn, prometheus_client).

The handlers are asyncio coroutines that never run the model: they validate a request, hand its
completions to the scheduler thread (memlm.serve.scheduler: continuous batching over a KV pool
of `slots` sequences) and relay what it produces. So a client that disconnects or times out
only cancels its own sequences, and no request holds a thread while it waits.

Every request first passes `RequestGate` (the API key, the body size); every refusal is
OpenAI's error JSON with a 4xx status (503 when the memory budget would be crossed), never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

from memlm.errors import MemlmError, require_extra

for _module in ("fastapi", "uvicorn", "prometheus_client"):  # this module is the server: say which extra
    require_extra(_module, "serve")                           # installs what is missing
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from memlm.loading import LoadedModel  # noqa: E402
from memlm.serve import protocol as api  # noqa: E402
from memlm.serve.metrics import CONTENT_TYPE, MemoryFacts, ServerMetrics  # noqa: E402
from memlm.serve.scheduler import Mailbox, QueueFull, Scheduler, Sequence, seeded  # noqa: E402

MAX_BODY_BYTES = 1 << 20  # default request body limit: a context of 8k tokens is ~40 KB of text
STATIC = Path(__file__).parent / "static"
# Reachable without the API key: the health check, and the chat page's own files (they hold no
# data; the page asks for the key and sends it with every API call it makes).
OPEN_PATHS = ("/health", "/", "/static/index.html", "/static/chat.js", "/static/chat.css")


class RequestGate:
    """ASGI middleware: what every HTTP request passes before a route sees it.

    1. The API key (when one is set): `Authorization: Bearer KEY`, compared in constant time,
       on every path but OPEN_PATHS.
    2. The body size: read here, at most `max_body` bytes (413 beyond), then handed on. API
       bodies are JSON whatever their Content-Type says (`curl -d` sends form-urlencoded).
    """

    def __init__(self, app, api_key: str | None, max_body: int, on_response=None):
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.on_response = on_response  # (path, status) of every API response, for /metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.on_response is not None and scope["path"].startswith("/v1/"):
            send = self._counted(scope["path"], send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return await _send_error(send, api.ApiError(
                401, "incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        length = headers.get(b"content-length", b"0")
        too_large = api.ApiError(413, f"the request body is larger than this server's limit of {self.max_body} bytes",
                             code="request_too_large")
        if not length.isdigit() or int(length) > self.max_body:
            return await _send_error(send, too_large)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                return await _send_error(send, too_large)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        if scope["path"].startswith("/v1/") and scope["method"] == "POST":
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        await self.app(scope, replay, send)

    def _counted(self, path: str, send):
        async def counted(message):
            if message["type"] == "http.response.start":
                self.on_response(path, message["status"])
            await send(message)

        return counted

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + self.api_key.encode())


async def _send_error(send, error) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(lm: LoadedModel, model_name: str, *, slots: int = 4, context: int | None = None,
               queue_size: int = 64, default_max_tokens: int = 256, api_key: str | None = None,
               max_body: int = MAX_BODY_BYTES, request_timeout: float = 600.0, guard=None,
               memory: MemoryFacts | None = None):
    """The FastAPI app around one model.

    slots, context: the KV pool (slots x context tokens, allocated now): the most completions
    decoded at once, and the longest request (prompt + max_tokens). queue_size: completions
    that may wait for a slot; beyond, 429. api_key: required as a Bearer token on every route
    but /health and the page's files. max_body: request body limit in bytes (413 beyond).
    request_timeout: seconds a request may take, waiting included (408 beyond). guard
    (memlm.memory.guard.MemoryGuard): with a memory budget, a request that would take the
    process over it is refused (503). memory: the budget and predicted peak, for /metrics and
    the page."""
    context = min(context or lm.config.block_size, lm.config.block_size)
    scheduler = Scheduler(lm, slots, context, queue_size)
    metrics = ServerMetrics(scheduler, memory or MemoryFacts(None, 0), model_name)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="memlm", description="OpenAI-compatible API for a memlm model", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    app.add_middleware(RequestGate, api_key=api_key, max_body=max_body,
                       on_response=lambda path, status: metrics.requests.labels(path, str(status)).inc())

    def error_response(e: api.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(api.ApiError)
    async def on_api_error(request, e: api.ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, e: RequestValidationError):
        return error_response(api.validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        return error_response(api.ApiError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)))

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            if any(not 0 <= t < lm.config.vocab_size for t in prompt):
                raise api.ApiError(400, f"'prompt': token ids must be in [0, {lm.config.vocab_size})", param="prompt")
            return prompt
        return lm.tokenizer.encode(prompt)

    def check_prompt(ids: list[int], requested: int | None) -> int:
        """The new tokens this prompt gets: max_tokens, or the default cut to what the context leaves."""
        if not ids:
            raise api.ApiError(400, "the prompt is empty: give at least one token", param="prompt")
        if len(ids) >= context:
            raise api.ApiError(400, f"the prompt has {len(ids)} tokens, this server's context is {context}: "
                                    "send a shorter prompt", param="prompt", code="context_length_exceeded")
        room = context - len(ids)
        if requested is None:
            return min(default_max_tokens, room)
        if requested > room:
            raise api.ApiError(400, f"'max_tokens' is {requested}, but the prompt's {len(ids)} tokens leave "
                                    f"{room} of this server's context of {context}", param="max_tokens",
                               code="context_length_exceeded")
        return requested

    async def respond(request, body: api.CompletionRequest | api.ChatRequest, chat: bool):
        if body.model is not None and body.model != model_name:
            raise api.ApiError(404, f"the model '{body.model}' does not exist: this server serves '{model_name}'",
                               param="model", code="model_not_found")
        body.unsupported()
        if guard is not None:
            try:
                guard.check_room()
            except MemlmError as e:
                raise api.ApiError(503, str(e), type="server_error", code="memory_budget",
                                   headers={"Retry-After": "1"}) from e
        try:
            if chat:
                prompts: list[str | list[int]] = [lm.chat_prompt(body.chat_messages())]
                requested = body.max_completion_tokens or body.max_tokens
            else:
                prompts = body.prompt_list()
                requested = body.max_tokens
            ids = await run_in_threadpool(lambda: [encode(p) for p in prompts])
            n = body.choices_per_prompt()
            if len(ids) * n > api.MAX_N:
                raise api.ApiError(400, f"{len(ids)} prompts x n={n} is more than {api.MAX_N} completions",
                                   param="n")
            settings = [body.settings(check_prompt(p, requested)) for p in ids]
        except MemlmError as e:  # bad settings, a model without a chat template
            raise api.ApiError(400, str(e)) from e
        mailbox = Mailbox()
        seqs = [Sequence(p, seeded(s, j), i * n + j, mailbox.deliver)
                for i, (p, s) in enumerate(zip(ids, settings)) for j in range(n)]
        try:
            scheduler.submit(seqs)
        except QueueFull as e:
            raise api.ApiError(429, f"{e}: retry later", type="rate_limit_error", code="server_busy",
                               headers={"Retry-After": str(retry_after())}) from e
        envelope = api.Envelope(chat, model_name)
        prompt_tokens = sum(len(p) for p in ids)
        deadline = time.monotonic() + request_timeout
        if body.stream:
            return StreamingResponse(stream_events(envelope, mailbox, seqs, prompt_tokens, body.include_usage,
                                                   deadline), media_type="text/event-stream")
        return await collect(request, envelope, mailbox, seqs, prompt_tokens, deadline)

    def retry_after() -> int:
        """Seconds until a slot is likely free: the queue ahead, at the recent pace of completions."""
        rate = metrics.completions_per_second()
        return max(1, min(60, math.ceil((scheduler.waiting + 1) / rate))) if rate > 0 else 1

    async def outputs(mailbox: Mailbox, seqs: list[Sequence], deadline: float):
        """Every Output of these sequences until each has finished, or until the client has
        gone (the mailbox says so); whoever stops early cancels what is still running. Past
        the deadline: ApiError 408."""
        running = len(seqs)
        try:
            while running:
                try:
                    out = await asyncio.wait_for(mailbox.queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise api.ApiError(408, f"the request took longer than this server's limit of "
                                            f"{request_timeout:g} s", type="timeout", code="request_timeout")
                if out is None:
                    return
                if out.finish_reason is not None:
                    running -= 1
                yield out
        finally:
            if running:
                scheduler.cancel(seqs)

    async def collect(request, envelope, mailbox: Mailbox, seqs: list[Sequence], prompt_tokens: int,
                      deadline: float):
        texts = {s.index: "" for s in seqs}
        finish: dict[int, str] = {}
        completion_tokens = 0
        watcher = asyncio.ensure_future(_on_disconnect(request, mailbox.close))
        try:
            async with aclosing(outputs(mailbox, seqs, deadline)) as reading:
                async for out in reading:
                    if out.finish_reason == "error":
                        raise api.ApiError(500, out.text, type="server_error")
                    texts[out.index] += out.text
                    if out.finish_reason is not None:
                        finish[out.index] = out.finish_reason
                        completion_tokens += out.tokens
        finally:
            watcher.cancel()
        if len(finish) < len(seqs):
            return None  # the client has gone: nobody reads this
        return envelope.full([api.choice(envelope.chat, i, texts[i], finish[i], False) for i in sorted(texts)],
                             prompt_tokens, completion_tokens)

    async def stream_events(envelope, mailbox: Mailbox, seqs: list[Sequence], prompt_tokens: int,
                            include_usage: bool, deadline: float):
        # A disconnect cancels this generator (Starlette watches for it): `outputs` then cancels
        # the sequences.
        chat = envelope.chat
        if chat:
            heads = [{"index": s.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for s in seqs]
            yield _sse(envelope.chunk(heads))
        completion_tokens = 0
        try:
            async with aclosing(outputs(mailbox, seqs, deadline)) as reading:
                async for out in reading:
                    if out.finish_reason == "error":
                        yield _sse(api.ApiError(500, out.text, type="server_error").body())
                        return
                    completion_tokens += out.tokens
                    if out.text or out.finish_reason:
                        yield _sse(envelope.chunk([api.choice(chat, out.index, out.text, out.finish_reason, True)]))
        except api.ApiError as e:  # the timeout: the status line has gone out, so say it in the stream
            yield _sse(e.body())
            return
        if include_usage:
            yield _sse(envelope.chunk([], api.usage(prompt_tokens, completion_tokens)))
        yield "data: [DONE]\n\n"

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "memlm"}]}

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request):
        return await respond(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatRequest, request: Request):
        return await respond(request, body, chat=True)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "slots_in_use": scheduler.running, "slots": scheduler.slots,
                "queue_depth": scheduler.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.prometheus(), media_type=CONTENT_TYPE)

    @app.get("/stats")
    async def stats():
        """What the chat page's memory panel shows (JSON)."""
        return metrics.snapshot()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    return app


async def _on_disconnect(request, then) -> None:
    """Call `then()` once the client has gone (the ASGI receive channel says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    then()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(fitted, model_name: str, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Run the server for a model loaded by memlm.fit.load_for_serving (its plan sizes the KV
    pool) until SIGINT/SIGTERM; options: see create_app. Requests in flight get a few seconds to
    finish on shutdown."""
    import uvicorn

    settings = fitted.breakdown.settings
    app = create_app(fitted.lm, model_name, slots=settings["batch"], context=settings["context"], guard=fitted.guard,
                     memory=MemoryFacts(fitted.plan.budget_bytes if fitted.plan else None, fitted.predicted_peak,
                                        fitted.describe()),
                     **options)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
