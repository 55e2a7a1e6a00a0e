"""KV-cached generation as small named steps: prefill the prompt, then decode one token at a time.

`generate_ids` yields token ids; `stream_text` turns them into text pieces that are safe to print
(never half a UTF-8 character, never the start of a stop string that may still complete).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from memlm.errors import MemlmError
from memlm.infer.sampling import SamplingSettings, sample_next
from memlm.model import Decoder, KVCache


@torch.no_grad()
def prefill(model: Decoder, ids: torch.Tensor, cache: KVCache, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling the cache; logits of the last position (B, V).
    `pad` (B,): left-padding tokens per row (Decoder.forward)."""
    return model(ids, cache, last_only=True, pad=pad)[:, -1]


@torch.no_grad()
def decode_one_token(model: Decoder, token: torch.Tensor, cache: KVCache,
                     pad: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence (B,) -> next logits (B, V)."""
    return model(token[:, None], cache, last_only=True, pad=pad)[:, -1]


def check_prompt_fits(n_prompt: int, block_size: int) -> None:
    if n_prompt == 0:
        raise MemlmError("the prompt is empty", "give at least one token of prompt")
    if n_prompt >= block_size:
        raise MemlmError(
            f"the prompt has {n_prompt} tokens but the model's context is {block_size}",
            f"shorten the prompt to fewer than {block_size} tokens",
        )


def new_token_room(prompt_lengths: list[int], settings: SamplingSettings, block_size: int) -> int:
    """How many tokens may follow the prompts: max_new_tokens, cut to what the longest leaves of the
    context. Refuses a prompt that does not fit."""
    for n in prompt_lengths:
        check_prompt_fits(n, block_size)
    return min(settings.max_new_tokens, block_size - max(prompt_lengths))


def _cache_and_generator(model: Decoder, batch: int, max_len: int, settings: SamplingSettings,
                         cache_dtype: torch.dtype | None) -> tuple[KVCache, torch.Generator | None]:
    """The KV cache (in the model's float dtype unless told) and the seeded sampling generator."""
    device = next(model.parameters()).device
    dtype = cache_dtype or next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    cache = KVCache(model.config, batch_size=batch, max_len=max_len, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(settings.seed) if settings.seed is not None else None
    return cache, generator


def generate_ids(model: Decoder, prompt: list[int], settings: SamplingSettings, eos_id: int | None = None,
                 cache_dtype: torch.dtype | None = None,
                 on_first_logits: Callable[[], None] | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens ids after `prompt`; stops at EOS unless settings.ignore_eos."""
    max_new = new_token_room([len(prompt)], settings, model.config.block_size)
    if max_new <= 0:
        return
    cache, generator = _cache_and_generator(model, 1, len(prompt) + max_new, settings, cache_dtype)
    context = torch.tensor([prompt], dtype=torch.long, device=cache.k.device)
    logits = prefill(model, context, cache)
    if on_first_logits is not None:
        on_first_logits()
    for i in range(max_new):
        if settings.ignore_eos and eos_id is not None:
            logits[:, eos_id] = float("-inf")
        token = sample_next(logits, context, settings, generator)
        yield int(token)
        if (eos_id is not None and int(token) == eos_id and not settings.ignore_eos) or i == max_new - 1:
            return
        context = torch.cat([context, token[:, None]], dim=1)
        logits = decode_one_token(model, token, cache)


@torch.no_grad()
def generate_batch(model: Decoder, prompts: list[list[int]], settings: SamplingSettings, eos_id: int | None = None,
                   cache_dtype: torch.dtype | None = None) -> list[list[int]]:
    """Up to max_new_tokens new ids for each prompt, all prompts decoded together in one batch.

    Prompts of different lengths are left-padded: each row's positions start at its own first
    token and nothing attends to the padding, so a row generates what it would alone (greedy:
    the same ids; sampling: the same distribution). A row ends at EOS (not included); the
    batch ends when every row has, or after max_new_tokens.
    """
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    max_new = new_token_room([len(p) for p in prompts], settings, model.config.block_size)
    if max_new <= 0:
        return [[] for _ in prompts]
    cache, generator = _cache_and_generator(model, len(prompts), longest + max_new, settings, cache_dtype)
    device = cache.k.device
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    # Padding repeats the row's first token: any id works under the mask, and this one adds no
    # token to the row's repetition penalty that the row does not already have.
    context = torch.tensor([[p[0]] * (longest - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    logits = prefill(model, context, cache, pad)
    stop_id = None if settings.ignore_eos else eos_id
    new: list[list[int]] = [[] for _ in prompts]
    running = [True] * len(prompts)
    for i in range(max_new):
        if settings.ignore_eos and eos_id is not None:
            logits[:, eos_id] = float("-inf")
        token = sample_next(logits, context, settings, generator)
        for row, t in enumerate(token.tolist()):
            if running[row]:
                if t == stop_id:
                    running[row] = False
                else:
                    new[row].append(t)
        if not any(running) or i == max_new - 1:
            break
        context = torch.cat([context, token[:, None]], dim=1)
        logits = decode_one_token(model, token, cache, pad)
    return new


@dataclass
class Piece:
    """A chunk of generated text, and why generation ended when it is the last one."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length"


def stream_text(model: Decoder, tokenizer, prompt: str | list[int], settings: SamplingSettings,
                cache_dtype: torch.dtype | None = None) -> Iterator[Piece]:
    """Generate and yield printable text pieces; the last piece carries the finish reason."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    new: list[int] = []
    emitted = ""
    finish = "length"
    for token in generate_ids(model, ids, settings, tokenizer.eos_id, cache_dtype):
        if token == tokenizer.eos_id and not settings.ignore_eos:
            finish = "stop"
            break
        new.append(token)
        text = tokenizer.decode(new)
        cut = _first_stop(text, settings.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
            if len(text) > len(emitted):
                yield Piece(text[len(emitted):])
            emitted = text
            break
        safe = len(text) - _held_back(text, settings.stop)
        if safe > len(emitted):
            yield Piece(text[len(emitted):safe])
            emitted = text[:safe]
    else:
        text = tokenizer.decode(new) if new else ""
        if len(text) > len(emitted):
            yield Piece(text[len(emitted):])
    yield Piece("", finish)


def complete_batch(model: Decoder, tokenizer, prompts: list[str | list[int]], settings: SamplingSettings,
                   cache_dtype: torch.dtype | None = None) -> list[Piece]:
    """A completion of each prompt, all decoded together in one batch: each one's text (cut at
    the first stop string) and why it ended ("stop": EOS or a stop string; "length")."""
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    outs = generate_batch(model, ids, settings, tokenizer.eos_id, cache_dtype)
    room = new_token_room([len(i) for i in ids], settings, model.config.block_size) if ids else 0
    pieces = []
    for out in outs:
        text = tokenizer.decode(out) if out else ""
        cut = _first_stop(text, settings.stop)
        ended_early = len(out) < room and not settings.ignore_eos  # an EOS came
        pieces.append(Piece(text if cut is None else text[:cut], "stop" if cut is not None or ended_early else "length"))
    return pieces


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end to hold back: an incomplete UTF-8 char or a possible stop-string start."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def generate_text(model: Decoder, tokenizer, prompt: str | list[int], settings: SamplingSettings) -> str:
    return "".join(p.text for p in stream_text(model, tokenizer, prompt, settings))
