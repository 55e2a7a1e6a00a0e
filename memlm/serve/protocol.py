"""The OpenAI API as this server speaks it: the request bodies (pydantic models, so a wrongly
typed field is a 400 that names it, and /openapi.json describes exactly what is accepted), the
error shape, and the response and stream-chunk bodies.

Imported by memlm.serve.app once the `serve` extra is known to be installed.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from memlm.infer.sampling import SamplingSettings

MAX_N = 16  # completions per request: each one takes a slot of the KV pool
MAX_STOP = 4  # stop sequences per request (OpenAI's limit)
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)  # what torch.Generator.manual_seed takes
# OpenAI fields that would change the answer, and the values that mean "off" (accepted)
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
               "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "best_of": (None, 1),
               "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """A request the server refuses, as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's list of pydantic errors as one OpenAI 400 naming the first bad field."""
    if not errors:
        return ApiError(400, "the request body is not valid")
    e = errors[0]
    loc = [p for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    if not loc or not isinstance(loc[0], str):
        return ApiError(400, f"the request body must be a JSON object ({e.get('msg', 'invalid')})")
    param = loc[0]
    item = f" (item {loc[1]})" if len(loc) > 1 and isinstance(loc[1], int) else ""
    return ApiError(400, f"'{param}'{item}: {e.get('msg', 'invalid value')}", param=param, code="invalid_value")


class _Body(BaseModel):
    """Fields common to completions and chat completions. Strict types: a string is not a
    number here, as in OpenAI's API. Fields OpenAI has and this server does not implement are
    refused when set (see `unsupported`), never silently ignored."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = Field(None, description="The served model's id (GET /v1/models); omitted: that model")
    max_tokens: int | None = Field(None, ge=1, description="At most this many new tokens (default: the server's "
                                                           "default, cut to what the context leaves)")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="Keep the k likeliest tokens (0 or -1: off)")
    n: int | None = Field(None, ge=1, le=MAX_N, description="Completions of the prompt, each decoded in its own slot")
    stop: Union[str, list[str], None] = Field(None, description=f"Up to {MAX_STOP} strings that end a completion "
                                                                "(not included)")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1],
                             description="Sampling seed: completion i of a request is seeded seed + i")
    stream: bool | None = False
    stream_options: dict[str, bool] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="CTRL-style penalty, 1: off")
    ignore_eos: bool | None = Field(None, description="Keep generating after the end-of-sequence token")
    user: str | None = None

    def choices_per_prompt(self) -> int:
        return 1 if self.n is None else self.n

    def unsupported(self) -> None:
        """Refuse OpenAI fields this server does not implement when they are set to anything but off."""
        extra = self.model_extra or {}
        for name, off in UNSUPPORTED.items():
            if name in extra and extra[name] not in off:
                raise ApiError(400, f"'{name}' is not supported by this server", param=name,
                               code="unsupported_parameter")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ApiError(400, f"'stop': at most {MAX_STOP} stop sequences", param="stop")

    def settings(self, max_new_tokens: int) -> SamplingSettings:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingSettings(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=[s for s in stop if s],
            seed=self.seed,
            ignore_eos=bool(self.ignore_eos),
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Body):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="A prompt, a list of prompts, or token ids (one list per prompt)")

    def prompt_list(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "'prompt' must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")

    def chat_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# ------------------------------------------------------------------------------ responses


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def choice(chat: bool, index: int, text: str, finish: str | None, stream: bool) -> dict[str, Any]:
    if not chat:
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    if stream:
        return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Envelope:
    """The fields every response and chunk of one request shares."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.id, self.model, self.created = chat, new_id(chat), model, int(time.time())

    def full(self, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> dict[str, Any]:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None:
            out["usage"] = usage_
        return out
