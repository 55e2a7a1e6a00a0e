"""Windowed perplexity, the standard W2 protocol by default (shared/BENCHMARKS.md).

Non-overlapping windows of `window` tokens (the trailing remainder dropped), each scored from an
empty context with no BOS: every window predicts window - 1 tokens. With stride < window the
windows overlap and each later window scores only its last `stride` tokens, which then see a
longer context. NLL is accumulated in float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memlm.errors import MemlmError
from memlm.model import Decoder


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean nats per scored token
    n_scored: int
    n_windows: int
    tokens_per_s: float


def window_plan(n_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(start, first scored offset within the window) for every window."""
    stride = stride or window
    if not 0 < stride <= window:
        raise MemlmError(f"stride must be in 1..window ({window}), got {stride}")
    if n_tokens < window:
        raise MemlmError(f"the text has {n_tokens} tokens, fewer than one window of {window}",
                         "use a longer text or a smaller --window")
    starts = range(0, n_tokens - window + 1, stride)
    # A later window scores the targets the previous one did not reach; with no overlap the first
    # token of each window has no context and stays unscored (the W2 protocol).
    return [(s, 0 if i == 0 else max(window - stride - 1, 0)) for i, s in enumerate(starts)]


@torch.no_grad()
def perplexity(model: Decoder, ids, window: int = 512, stride: int | None = None, batch_size: int = 1,
               on_window: Callable[[int], None] | None = None, guard=None) -> PerplexityResult:
    """Perplexity of `ids` (see the module docstring). `guard`: a memlm.memory.guard.MemoryGuard
    asked before each batch of windows whether it still fits the budget."""
    if window > model.config.block_size:
        raise MemlmError(f"window {window} is longer than the model's context {model.config.block_size}",
                         f"use --window {model.config.block_size} or less")
    ids = torch.as_tensor(ids, dtype=torch.long)
    plan = window_plan(len(ids), window, stride)
    device = next(model.parameters()).device
    total_nll, n_scored = 0.0, 0
    model.eval()
    t0 = time.perf_counter()
    for b in range(0, len(plan), batch_size):
        chunk = plan[b:b + batch_size]
        if guard is not None:
            guard.before_unit()
        x = torch.stack([ids[s:s + window] for s, _ in chunk]).to(device)  # (B, W)
        logits = model(x[:, :-1]).float()  # (B, W-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, W-1)
        for row, (_, first) in enumerate(chunk):
            total_nll += nll[row, first:].double().sum().item()
            n_scored += nll.shape[1] - first
        del logits  # before the next batch's: two (B, W, V) tensors at once would double the peak
        if guard is not None:
            guard.after_unit()
        if on_window is not None:
            on_window(len(chunk))
    elapsed = time.perf_counter() - t0
    mean = total_nll / n_scored
    return PerplexityResult(math.exp(mean), mean, n_scored, len(plan), len(plan) * window / elapsed)
