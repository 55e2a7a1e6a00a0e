"""Fit a model to a memory budget: plan the format, then load the model straight into it.

This workflow sits above the layers it drives (memlm.loading reads and converts, memlm.memory
plans), so neither of them imports the other. The model is converted tensor by tensor while
it is read: the fp32 copy of the whole model never exists when the plan says int4/int8/bf16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from memlm.config import PREFILL_CHUNK
from memlm.errors import MemlmError
from memlm.infer.engine import make_engine
from memlm.loading import LoadedModel, layout_of, load, model_config_of, stored_format
from memlm.memory.estimate import Breakdown, estimate_for_model, estimate_scoring, model_layout
from memlm.memory.guard import DoesNotFit, MemoryGuard, expected_from
from memlm.memory.measure import format_bytes, parse_size
from memlm.memory.plan import WEIGHT_FORMATS, Plan, plan_inference, plan_scoring


@dataclass
class Fitted:
    """A loaded model with the prediction its command prints once and compares at the end."""

    lm: LoadedModel
    breakdown: Breakdown
    plan: Plan | None = None  # None: no budget was given
    guard: MemoryGuard | None = None

    @property
    def predicted_peak(self) -> int:
        return self.plan.predicted_peak if self.plan is not None else self.breakdown.total

    def describe(self) -> str:
        """The one prediction, as the command prints it before it starts."""
        b = self.breakdown.settings
        what = f"{b['weight_format']} weights"
        if b.get("kv_dtype", "-") != "-":
            cache = "decoding state" if self.lm.config.fixed_state else "KV cache"
            what += f", {b['kv_dtype']} {cache} for {b['batch']} x {b['context']} tokens"
        else:
            what += f", {b['batch']} x {b['context']}-token windows"
        head = f"memory budget {format_bytes(self.plan.budget_bytes)}: " if self.plan is not None else ""
        return f"{head}{what}, predicted peak {format_bytes(self.predicted_peak)}"


def _candidates(name_or_path: str) -> dict:
    """The formats a plan may choose for this model and how each will be laid out when loaded:
    a compressed folder only as it is stored; anything else in any format (GGUF blocks kept)."""
    stored = stored_format(name_or_path)
    if stored is not None:
        fmt = stored.pop("weight_format")
        if fmt is None:  # pruned / low-rank / mixed folders: not re-planned, loaded as they are
            raise DoesNotFit(f"{name_or_path} is compressed in a way the planner does not model",
                             "run it without --memory-budget")
        return {"formats": [fmt], "layout": lambda f: stored}
    return {"layout": functools.lru_cache(maxsize=None)(lambda f: layout_of(name_or_path, f))}


def prompt_tokens_bound(text: str) -> int:
    """At most this many tokens for `text` with any byte-level BPE: one per UTF-8 byte, plus BOS/EOS."""
    return len(text.encode("utf-8")) + 2


def load_for_inference(name_or_path: str, budget: str | int | None = None, context: int | None = None,
                       batch: int = 1, prompt_len: int | None = None, compile: bool = False,
                       max_batch: int | None = None, runtime: str = "infer", adapter: str | None = None) -> Fitted:
    """`memlm.load`, planned: with a budget, the best weight format whose predicted peak for
    `batch` sequences of `context` tokens fits, loaded straight into that format; without one,
    the model as stored and the prediction of its own format. It generates through an Engine
    with fused projections (and a compiled decode step when `compile`).

    context: the KV cache's length (default: the model's block size). prompt_len: tokens
    prefilled at once per sequence (default: the whole context). max_batch: with a budget, the
    rest of it goes to more sequences, up to this many (default: batch). runtime: "infer" (a
    command) or "serve" (memlm serve's process; memlm.memory.estimate.RUNTIME_BYTES). adapter: a
    LoRA adapter folder put on the model (memlm.load's; its few weights are not in the prediction).
    """
    if budget is None:
        lm = load(name_or_path, adapter=adapter)
        ctx = _context(context, lm.config)
        b = estimate_for_model(lm.model, batch, ctx, min(prompt_len or ctx, ctx), runtime, compile)
        fitted = Fitted(lm, b)
    else:
        config = model_config_of(name_or_path)
        ctx = _context(context, config)
        plan = plan_inference(config, parse_size(budget), context=ctx, prompt_len=min(prompt_len or ctx, ctx),
                              min_batch=batch, max_batch=max(batch, max_batch or batch), runtime=runtime,
                              compile=compile,
                              **_candidates(name_or_path))
        fitted = _load_planned(name_or_path, plan, "the model", "token",
                               "raise --memory-budget, shorten the context or use a smaller model "
                               "(see: memlm plan --task infer)", adapter)
    lm = fitted.lm
    lm.engine = make_engine(lm.model, compile=compile, fuse=True, cache_dtype=lm.cache_dtype)
    return fitted


def _context(context: int | None, config) -> int:
    """The context to plan for: as asked, within a transformer's positions (default: all of them)."""
    wanted = context or config.block_size
    return wanted if config.fixed_state else min(wanted, config.block_size)


SERVE_CONTEXT = 2048  # a server's default KV pool length per slot (the model's, when shorter)


def load_for_serving(name_or_path: str, budget: str | int | None = None, context: int | None = None,
                     slots: int = 8, compile: bool = False, adapter: str | None = None) -> Fitted:
    """`load_for_inference` for a server's KV pool: `slots` sequences of `context` tokens
    (default: the model's context, at most SERVE_CONTEXT). The server prefills at most
    PREFILL_CHUNK prompt tokens a forward in all (memlm.serve.scheduler), so each of b slots is
    planned for PREFILL_CHUNK / b of them. With a budget: the best format that holds every slot;
    when none does, the format that holds the most (a server's users wait for slots, not for
    fidelity). The pool is the plan's: `breakdown.settings["batch"]` x `["context"]`."""
    config = model_config_of(name_or_path)
    if config.kind != "decoder":
        raise MemlmError(f"memlm serve runs decoder models; {name_or_path} is a {config.kind} model",
                         "generate with it through memlm generate or memlm.load(...).generate")
    ctx = context or min(config.block_size, SERVE_CONTEXT)
    if budget is not None:
        slots = _slots_that_fit(name_or_path, parse_size(budget), ctx, slots, compile)
    return load_for_inference(name_or_path, budget, ctx, slots, _prefill_share(slots), compile, runtime="serve",
                              adapter=adapter)


def _prefill_share(slots: int) -> int:
    return -(-PREFILL_CHUNK // slots)


def _slots_that_fit(name_or_path: str, budget: int, context: int, slots: int, compile: bool = False) -> int:
    """The most slots (up to `slots`) any one format holds in the budget (at least 1: if not even
    one fits, load_for_inference refuses it with the leanest plan's need)."""
    config, candidates = model_config_of(name_or_path), _candidates(name_or_path)
    formats = candidates.pop("formats", WEIGHT_FORMATS["cpu"])

    def most(fmt: str, prompt_len: int, least: int = 1) -> int:
        plan = plan_inference(config, budget, context=context, prompt_len=prompt_len, min_batch=least,
                              max_batch=slots, formats=[fmt], runtime="serve", compile=compile, **candidates)
        return plan.settings["concurrent_sequences"] if plan.feasible else 0

    best = 0
    for fmt in formats:  # best fidelity first: a later format is taken only for more slots
        if most(fmt, _prefill_share(slots), least=slots):
            return slots
        held = most(fmt, PREFILL_CHUNK)  # each slot prefilling a whole chunk: an under-count
        while held:  # with that many slots each prefills less of the chunk, which leaves room for more
            more = most(fmt, _prefill_share(held))
            if more <= held:
                break
            held = more
        best = max(best, held)
    return max(best, 1)


def _load_planned(name_or_path: str, plan: Plan, what: str, unit: str, hint: str,
                  adapter: str | None = None) -> Fitted:
    """Refuse an infeasible plan before any work; else load straight into its format, guarded."""
    if not plan.feasible:
        raise DoesNotFit(f"{what} does not fit the memory budget {format_bytes(plan.budget_bytes)}: "
                         f"the leanest plan needs {format_bytes(plan.min_budget)}", hint)
    assert plan.breakdown is not None
    guard = MemoryGuard(plan.budget_bytes, expected_from(plan.breakdown), unit)  # before loading: it counts
    lm = load(name_or_path, weight_format=plan.settings["weight_format"], adapter=adapter)
    if plan.settings.get("kv_dtype"):
        lm.cache_dtype = torch.bfloat16 if plan.settings["kv_dtype"] == "bf16" else torch.float32
    guard.mark("model")
    return Fitted(lm, plan.breakdown, plan, guard)


def load_for_scoring(name_or_path: str, budget: str | int | None = None, window: int = 512, batch: int = 1,
                     adapter: str | None = None) -> Fitted:
    """`memlm.load` for perplexity scoring of `batch` windows of `window` tokens (memlm eval)."""
    if budget is None:
        lm = load(name_or_path, adapter=adapter)
        b = estimate_scoring(lm.config, batch, window, **model_layout(lm.model))
        return Fitted(lm, b)
    config = model_config_of(name_or_path)
    plan = plan_scoring(config, parse_size(budget), window, batch, **_candidates(name_or_path))
    return _load_planned(name_or_path, plan, "scoring", "batch of windows",
                         "raise --memory-budget or lower --window / --batch-size", adapter)
