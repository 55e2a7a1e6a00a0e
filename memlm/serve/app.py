"""An OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (streaming
with server-sent events or not). Needs the `serve` extra (FastAPI + uvicorn).

Requests are served one at a time (a lock around the model): on a CPU with two cores, running
two generations side by side only splits the same compute, and each keeps its own KV cache.
`n` > 1 completions of one request are decoded together as one batch (not streamed).
"""



import json
import threading
import time
import uuid
from typing import Any

from memlm.errors import MemlmError, require_extra
from memlm.infer.generate import complete_batch, stream_text
from memlm.infer.sampling import SamplingSettings
from memlm.loading import LoadedModel


MAX_N = 16  # completions per request: n rows of KV cache are allocated at once


def _settings(body: dict[str, Any], default_max: int) -> SamplingSettings:
    stop = body.get("stop") or []
    return SamplingSettings(
        max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or default_max),
        temperature=float(body.get("temperature", 1.0)),
        top_p=float(body.get("top_p", 1.0)),
        top_k=int(body.get("top_k", 0)),
        repetition_penalty=float(body.get("repetition_penalty", 1.0)),
        stop=[stop] if isinstance(stop, str) else list(stop),
        seed=body.get("seed"),
    )


def create_app(lm: LoadedModel, model_name: str, default_max_tokens: int = 256, guard=None,
               context: int | None = None):
    """The FastAPI app. `guard` (memlm.memory.guard.MemoryGuard): with a memory budget, a request
    that would take the process over it is refused (503 + Retry-After) instead of run.
    `context`: the longest request (prompt + max_tokens) served, the one the memory plan sized
    the KV cache for; longer ones get a 400."""
    fastapi = require_extra("fastapi", "serve")
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = fastapi.FastAPI(title="memlm", description="OpenAI-compatible API for a memlm model")
    lock = threading.Lock()

    def error(status: int, message: str):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    def run(prompt: str, settings: SamplingSettings):
        """Yield (text piece, finish_reason) under the model lock."""
        with lock:
            pieces = stream_text(lm.engine or lm.model, lm.tokenizer, prompt, settings, lm.cache_dtype)
            yield from ((p.text, p.finish_reason) for p in pieces)

    def usage(prompt: str, texts: list[str]) -> dict[str, int]:
        p = len(lm.tokenizer.encode(prompt))
        c = sum(len(lm.tokenizer.encode(text)) for text in texts if text)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def respond(body: dict, chat: bool):
        if guard is not None:
            try:
                guard.check_room()
            except MemlmError as e:
                return JSONResponse({"error": {"message": str(e), "type": "server_error", "code": "memory_budget"}},
                                    status_code=503, headers={"Retry-After": "1"})
        n = 1 if body.get("n") is None else body["n"]
        if not isinstance(n, int) or not 1 <= n <= MAX_N:
            return error(400, f"'n' must be an integer from 1 to {MAX_N}")
        if n > 1 and body.get("stream"):
            return error(400, "streaming returns one completion: use n=1 with stream, or stream=false")
        try:
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    return error(400, "'messages' must be a non-empty list")
                prompt = lm.chat_prompt([{"role": m.get("role"), "content": m.get("content") or ""}
                                         for m in messages])
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str) or not prompt:
                    return error(400, "'prompt' must be a non-empty string")
            settings = _settings(body, default_max_tokens)
            if context is not None:  # the plan sized the KV cache for this many tokens
                n_prompt = len(lm.tokenizer.encode(prompt))
                if n_prompt >= context:
                    return error(400, f"the prompt has {n_prompt} tokens, this server's context is {context}: "
                                      "send a shorter prompt")
                settings.max_new_tokens = min(settings.max_new_tokens, context - n_prompt)
            if n > 1:  # (text, finish reason) of each, decoded as one batch
                with lock:
                    done = complete_batch(lm.engine or lm.model, lm.tokenizer, [prompt] * n, settings, lm.cache_dtype)
                    finished = [(p.text, p.finish_reason) for p in done]
            else:
                pieces = run(prompt, settings)
                first = next(pieces)  # errors (prompt too long, bad settings) surface before any byte is sent
        except MemlmError as e:
            return error(400, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def all_pieces():
            yield first
            yield from pieces

        if body.get("stream"):
            def events():
                if chat:
                    head = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": model_name, "choices": [head]})
                for text, finish in all_pieces():
                    if text or finish:
                        yield _sse({"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                    "model": model_name, "choices": [_choice(chat, text, finish, True)]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        if n == 1:
            text, finish = "", None
            for piece, reason in all_pieces():
                text += piece
                finish = reason or finish
            finished = [(text, finish)]
        return {"id": rid, "object": obj, "created": created, "model": model_name,
                "choices": [_choice(chat, text, finish, False, i) for i, (text, finish) in enumerate(finished)],
                "usage": usage(prompt, [text for text, _ in finished])}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "memlm"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _with_body(request, lambda body: respond(body, chat=False), error)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _with_body(request, lambda body: respond(body, chat=True), error)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name}

    return app


async def _with_body(request, handler, error):
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error(400, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return error(400, "the request body must be a JSON object")
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(handler, body)


def _choice(chat: bool, text: str, finish: str | None, stream: bool, index: int = 0) -> dict:
    if not chat:
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    key = "delta" if stream else "message"
    msg = {"content": text} if stream else {"role": "assistant", "content": text}
    return {"index": index, key: msg, "finish_reason": finish}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(lm: LoadedModel, model_name: str, host: str = "127.0.0.1", port: int = 8000, guard=None,
          context: int | None = None) -> None:
    uvicorn = require_extra("uvicorn", "serve")
    uvicorn.run(create_app(lm, model_name, guard=guard, context=context), host=host, port=port, log_level="info")
