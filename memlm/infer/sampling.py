"""Turning next-token logits into a token: greedy, temperature, top-k, top-p, repetition penalty,
OpenAI's presence and frequency penalties."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memlm.config import check_range


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the context
    presence_penalty: float = 0.0  # 0: off; subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # 0: off; subtracted once per time a token was generated so far
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        check_range("sampling", "max_new_tokens", self.max_new_tokens, low=0)
        check_range("sampling", "temperature", self.temperature, low=0, hint="use 0 for greedy decoding")
        check_range("sampling", "top_p", self.top_p, low=0, high=1, low_open=True, hint="1 switches it off")
        check_range("sampling", "top_k", self.top_k, low=0, hint="0 switches it off")
        check_range("sampling", "repetition_penalty", self.repetition_penalty, low=0, low_open=True,
                    hint="1 switches it off")
        for name in ("presence_penalty", "frequency_penalty"):
            check_range("sampling", name, getattr(self, name), low=-2, high=2, hint="0 switches it off")

    @property
    def penalizes(self) -> bool:
        """Whether sampling needs the ids so far (a penalty is on)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: seen tokens' positive logits are divided, negative ones multiplied."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = logits.gather(-1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, context, seen)


def apply_presence_frequency_penalty(logits: torch.Tensor, generated: torch.Tensor, presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far (not the prompt, as in vLLM):
    logit - presence * [count > 0] - frequency * count."""
    if (presence == 0 and frequency == 0) or generated.numel() == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(-1, generated, torch.ones_like(generated, dtype=logits.dtype))
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus of mass top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop[..., 0] = False  # the likeliest always stays (a top_p below float32's resolution is 0 here)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of probs (B, V) (rows summing to 1, or to any positive total): the inverse of
    the row's cumulative distribution at one uniform number from `generator` (None: torch's).

    torch.multinomial draws one exponential number per token instead (1.2 ms a row at SmolLM2's
    49,152 ids on this CPU, against 0.06 ms here), which made sampling a fifth of a 16-row server
    step (2026-12-02, AMD EPYC, 2 threads). The sums are float64: each token's share of [0, 1)
    is its probability to ~1e-16, and a token without mass has none."""
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    cum = probs.double().cumsum(-1)
    total = cum[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise ValueError("sampling: a row's probabilities are not finite or sum to 0 (NaN or infinite logits)")
    # Strictly below the total: the first sum above it then ends on a token with mass.
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, x, right=True).squeeze(-1)


def sample_next(logits: torch.Tensor, context: torch.Tensor, s: SamplingSettings,
                generator: torch.Generator | None = None, generated: int = 0) -> torch.Tensor:
    """logits (B, V) and the ids so far (B, T), the last `generated` of them new -> next ids (B,).

    A server samples its batch row by row (each row its own settings and generator): on this CPU
    that is also faster than one pass over a (16, V) batch, whose fresh 3-6 MB temporaries cost
    page faults every step while a row's stay in cache."""
    logits = apply_repetition_penalty(logits.float(), context, s.repetition_penalty)
    logits = apply_presence_frequency_penalty(logits, context[:, context.shape[1] - generated:], s.presence_penalty,
                                              s.frequency_penalty)
    # A penalty can push a logit past float32's range (a fuzzed request's repetition_penalty of
    # 2e-313 divides by it, giving inf, then NaN below): clamped to the largest finite value,
    # the order of the logits survives and no probability is NaN.
    fmax = torch.finfo(torch.float32).max
    logits = logits.clamp(-fmax, fmax)
    if s.temperature == 0:
        return logits.argmax(-1)
    # The largest logit moved to 0 before scaling: a tiny temperature then sends the others to
    # -inf (greedy, its limit) instead of every logit to +-inf (NaN probabilities); one too small
    # for float32 to scale by at all (1/t overflows) is greedy outright.
    inv = 1.0 / s.temperature
    if inv >= torch.finfo(torch.float32).max:
        return logits.argmax(-1)
    scaled = (logits - logits.amax(-1, keepdim=True)) * inv
    return draw(filter_top_k_top_p(scaled, s.top_k, s.top_p).softmax(-1), generator)
