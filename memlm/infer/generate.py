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
from memlm.infer.engine import Engine, as_engine
from torch import nn


def check_prompt_fits(n_prompt: int, config) -> None:
    if n_prompt == 0:
        raise MemlmError("the prompt is empty", "give at least one token of prompt")
    room = config.room_after(n_prompt)
    if room is not None and room <= 0:
        longest = n_prompt - room if config.kind != "encdec" else config.block_size + 1
        raise MemlmError(
            f"the prompt has {n_prompt} tokens but the model's context is {config.block_size}",
            f"shorten the prompt to fewer than {longest} tokens",
        )


def new_token_room(prompt_lengths: list[int], settings: SamplingSettings, config) -> int:
    """How many tokens may follow the prompts: max_new_tokens, cut to what the longest leaves of the
    model's context (ModelConfig.room_after). Refuses a prompt that does not fit."""
    for n in prompt_lengths:
        check_prompt_fits(n, config)
    rooms = [r for r in (config.room_after(n) for n in prompt_lengths) if r is not None]
    return min([settings.max_new_tokens, *rooms])


@torch.no_grad()
def decode_tokens(model: nn.Module | Engine, prompts: list[list[int]], settings: SamplingSettings,
                  eos_id: int | None = None, cache_dtype: torch.dtype | None = None,
                  on_first_logits: Callable[[], None] | None = None) -> Iterator[torch.Tensor]:
    """Prefill all prompts together, then yield the next token of every row (B,) per step, up to
    max_new_tokens steps (every row steps; the caller decides which rows have ended).

    One batch of any prompt lengths: right-padded, each row at its own positions (engine.prefill)."""
    engine = as_engine(model, cache_dtype)
    lengths = [len(p) for p in prompts]
    max_new = new_token_room(lengths, settings, engine.config)
    if max_new <= 0:
        return
    device = engine.device
    cache = engine.cache(len(prompts), max(lengths) + max_new)
    generator = torch.Generator(device=device).manual_seed(settings.seed) if settings.seed is not None else None
    longest = max(lengths)
    # Padding repeats the row's first token: any id works (it is never seen), and this one adds
    # no token to the row's repetition penalty that the row does not already have.
    ids = torch.tensor([p + [p[0]] * (longest - len(p)) for p in prompts], dtype=torch.long, device=device)
    positions = torch.tensor(lengths, device=device)
    logits = engine.prefill(ids, positions, cache)
    if on_first_logits is not None:
        on_first_logits()
    context = ids
    for i in range(max_new):
        if settings.ignore_eos and eos_id is not None:
            logits[:, eos_id] = float("-inf")
        token = sample_next(logits, context, settings, generator, generated=context.shape[1] - longest)
        yield token
        if i == max_new - 1:
            return
        if settings.penalizes:
            context = torch.cat([context, token[:, None]], dim=1)
        logits = engine.decode(token, positions, cache)
        positions = positions + 1


def generate_ids(model: nn.Module | Engine, prompt: list[int], settings: SamplingSettings, eos_id: int | None = None,
                 cache_dtype: torch.dtype | None = None,
                 on_first_logits: Callable[[], None] | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens ids after `prompt`; stops at EOS unless settings.ignore_eos.
    The batch-of-one case of `decode_tokens`."""
    for token in decode_tokens(model, [prompt], settings, eos_id, cache_dtype, on_first_logits):
        t = int(token[0])
        yield t
        if eos_id is not None and t == eos_id and not settings.ignore_eos:
            return


def generate_batch(model: nn.Module | Engine, prompts: list[list[int]], settings: SamplingSettings,
                   eos_id: int | None = None, cache_dtype: torch.dtype | None = None) -> list[list[int]]:
    """Up to max_new_tokens new ids for each prompt, all prompts decoded together in one batch.

    A row generates what it would alone (greedy: the same ids; sampling: the same distribution).
    A row ends at EOS (not included); the batch ends when every row has, or after max_new_tokens.
    """
    if not prompts:
        return []
    stop_id = None if settings.ignore_eos else eos_id
    new: list[list[int]] = [[] for _ in prompts]
    running = [True] * len(prompts)
    for token in decode_tokens(model, prompts, settings, eos_id, cache_dtype):
        for row, t in enumerate(token.tolist()):
            if running[row]:
                if t == stop_id:
                    running[row] = False
                else:
                    new[row].append(t)
        if not any(running):
            break
    return new


@dataclass
class Piece:
    """A chunk of generated text, and why generation ended when it is the last one."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length"


class TextStream:
    """Generated ids in, printable text out: never half a UTF-8 character, never the start of a
    stop string that may still complete. A stop string ends the text (it and what follows are
    cut; `stopped` is then set)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that `token` makes printable (often "")."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = _first_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        return self._emit(text[:len(text) - _held_back(text, self.stop)])

    def flush(self) -> str:
        """What is still held back, once generation has ended (nothing after a stop string)."""
        if self.stopped or not self.ids:
            return ""
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.emitted):
            return ""
        piece, self.emitted = upto[len(self.emitted):], upto
        return piece


def stream_text(model: nn.Module | Engine, tokenizer, prompt: str | list[int], settings: SamplingSettings,
                cache_dtype: torch.dtype | None = None) -> Iterator[Piece]:
    """Generate and yield printable text pieces; the last piece carries the finish reason."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    text = TextStream(tokenizer, settings.stop)
    finish = "length"
    for token in generate_ids(model, ids, settings, tokenizer.eos_id, cache_dtype):
        if token == tokenizer.eos_id and not settings.ignore_eos:
            finish = "stop"
            break
        piece = text.push(token)
        if piece:
            yield Piece(piece)
        if text.stopped:
            finish = "stop"
            break
    tail = text.flush()
    if tail:
        yield Piece(tail)
    yield Piece("", finish)


def complete_batch(model: nn.Module | Engine, tokenizer, prompts: list[str | list[int]], settings: SamplingSettings,
                   cache_dtype: torch.dtype | None = None) -> list[Piece]:
    """A completion of each prompt, all decoded together in one batch: each one's text (cut at
    the first stop string) and why it ended ("stop": EOS or a stop string; "length")."""
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    outs = generate_batch(model, ids, settings, tokenizer.eos_id, cache_dtype)
    room = new_token_room([len(i) for i in ids], settings, model.config) if ids else 0
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


def generate_text(model: nn.Module | Engine, tokenizer, prompt: str | list[int], settings: SamplingSettings) -> str:
    return "".join(p.text for p in stream_text(model, tokenizer, prompt, settings))
