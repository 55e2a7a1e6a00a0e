"""Choose the settings that fit a memory budget: the fastest plan whose predicted peak fits.

Training: the global batch (tokens per optimizer step) is kept; the planner searches the
micro-batch (and with it the gradient accumulation), activation checkpointing (every k-th
block), the chunked loss (chunk size), the optimizer (AdamW -> 8-bit AdamW / Adafactor),
fused backward, and a lower precision. Every candidate gets a predicted peak from
`memlm.memory.estimate` and a relative cost from the simple model below; candidates are tried
cheapest first and the first that fits (with `SAFETY_MARGIN` to spare) is the plan. So the
knobs that only cost memory (bigger micro-batches, bigger loss chunks, fewer recomputed blocks)
are turned up as far as the budget allows, and the plan uses most of it.

Cost model (relative time per token; 1.0 is the unconstrained run; the factors multiply):
  micro-batch b of T tokens  (1 + t0 / (b*T)) / (1 + t0 / (B_max*T)): a fixed cost per
                             micro-batch (Python, kernel launches) worth t0 tokens
                             (CPU 64, CUDA 2048)
  checkpointing              1 + 1/3 * (recomputed blocks / n_layer): a block's forward is
                             about a third of its forward + backward
  chunked loss               1 + 0.002 + 0.0005 * chunks (~0: a Python loop over the chunks)
  8-bit AdamW / Adafactor    1.05 / 1.03 (decode/encode of states; factored statistics)
  fused backward             1.01 (and no gradient clipping)
  lower precision            1.10 on CPU (bf16 matmuls are not faster on most CPUs), 1.02 on
                             CUDA (charged for the numerics, not the speed)

Inference: the weight formats (fp32 > bf16 > int8 > int4, by fidelity; the KV cache in the
activations' dtype) are tried best-first; the first that holds at least one sequence of the context is taken, and
the rest of the budget goes to concurrent sequences. Without a context the model's full
context is the goal; when even the most compact format cannot hold it, the longest context
that fits one sequence is planned.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from memlm.config import ModelConfig, TrainConfig
from memlm.errors import MemlmError
from memlm.memory.estimate import Breakdown, estimate_inference, estimate_training
from memlm.memory.guard import DoesNotFit
from memlm.memory.measure import format_bytes, parse_size

SAFETY_MARGIN = 0.06  # a plan's predicted peak stays below (1 - margin) * budget: the estimate's error
CHECKPOINT_COST = 1 / 3
MICRO_BATCH_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 2048}
LOSS_CHUNK_COST, LOSS_CHUNK_COST_PER_CHUNK = 0.002, 0.0005
OPTIMIZER_COST = {"adamw": 1.0, "sgd": 1.0, "adamw8bit": 1.05, "adafactor": 1.03}
FUSED_BACKWARD_COST = 1.01
LOWER_PRECISION_COST = {"cpu": 1.10, "cuda": 1.02}
MIN_LOSS_CHUNK = 64
# Cheaper-to-store alternatives the planner may switch to, per optimizer and precision asked for.
OPTIMIZER_FALLBACKS = {"adamw": ["adamw", "adamw8bit", "adafactor"], "adamw8bit": ["adamw8bit", "adafactor"],
                       "adafactor": ["adafactor"], "sgd": ["sgd"]}
PRECISION_FALLBACKS = {"fp32": ["fp32", "bf16-autocast", "bf16"], "bf16-autocast": ["bf16-autocast", "bf16"],
                       "bf16": ["bf16"]}
WEIGHT_FORMATS = {"cpu": ["fp32", "bf16", "int8", "int4"], "cuda": ["bf16", "int8", "int4"]}


@dataclass
class Plan:
    """The chosen settings, their predicted memory, and what was given up for them."""

    task: str  # "train" | "finetune" | "infer"
    feasible: bool
    budget_bytes: int
    device: str
    settings: dict[str, Any]
    predicted_peak: int
    breakdown: Breakdown | None
    tradeoffs: list[str] = field(default_factory=list)
    cost: float = 1.0  # relative time per token, 1.0 = unconstrained (training)
    min_budget: int | None = None  # when infeasible: the smallest budget any plan fits in
    world_size: int = 1
    notes: list[str] = field(default_factory=list)
    train_config: TrainConfig | None = None

    @property
    def headroom(self) -> int:
        return self.budget_bytes - self.predicted_peak

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "feasible": self.feasible, "device": self.device, "world_size": self.world_size,
            "budget_bytes": self.budget_bytes, "predicted_peak_bytes": self.predicted_peak,
            "headroom_bytes": self.headroom, "min_budget_bytes": self.min_budget,
            "cost": round(self.cost, 4), "settings": self.settings, "tradeoffs": self.tradeoffs,
            "notes": self.notes, "safety_margin": SAFETY_MARGIN,
            "breakdown": self.breakdown.to_dict() if self.breakdown is not None else None,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _fits(total: int, budget: int) -> bool:
    return total <= budget * (1 - SAFETY_MARGIN)


# ------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class _Candidate:
    micro_batch: int
    grad_accum: int
    checkpoint_every: int
    loss_chunk: int
    optimizer: str
    precision: str
    fused_backward: bool
    cost: float


def _divisors(n: int) -> list[int]:
    return sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)})


def _checkpoint_options(n_layer: int) -> list[int]:
    """0 (off) and, per distinct number of recomputed blocks, the largest k giving it."""
    by_count: dict[int, int] = {}
    for k in range(1, n_layer + 1):
        by_count[len(range(0, n_layer, k))] = k  # larger k with the same count: later wins
    return [0] + sorted(by_count.values())


def _chunk_options(tokens: int) -> list[int]:
    out, c = [0], MIN_LOSS_CHUNK
    while c < tokens:
        out.append(c)
        c *= 2
    return out


def _candidates(model_cfg: ModelConfig, base: TrainConfig, sequences: int, seq_len: int, device: str,
                allow: dict[str, list] | None) -> list[_Candidate]:
    t0 = MICRO_BATCH_OVERHEAD_TOKENS[device]
    allow = allow or {}
    L = model_cfg.n_layer
    out = []
    optimizers = allow.get("optimizer", OPTIMIZER_FALLBACKS[base.optimizer])
    precisions = allow.get("precision", PRECISION_FALLBACKS[base.precision])
    fused_opts = allow.get("fused_backward", [False, True])
    ckpts = allow.get("activation_checkpointing", _checkpoint_options(L))
    full_rate = 1 + t0 / (sequences * seq_len)
    for b in _divisors(sequences):
        accum = sequences // b
        mb_cost = (1 + t0 / (b * seq_len)) / full_rate
        chunks = allow.get("loss_chunk", _chunk_options(b * seq_len))
        for k, chunk, opt, prec, fused in itertools.product(ckpts, chunks, optimizers, precisions, fused_opts):
            if fused and accum > 1:
                continue  # the optimizer steps inside backward: nothing could accumulate
            cost = mb_cost
            if k:
                cost *= 1 + CHECKPOINT_COST * len(range(0, L, k)) / L
            if chunk:
                cost *= 1 + LOSS_CHUNK_COST + LOSS_CHUNK_COST_PER_CHUNK * math.ceil(b * seq_len / chunk)
            cost *= OPTIMIZER_COST[opt] / OPTIMIZER_COST[base.optimizer]
            if prec != base.precision:
                cost *= LOWER_PRECISION_COST[device]
            if fused:
                cost *= FUSED_BACKWARD_COST
            out.append(_Candidate(b, accum, k, chunk, opt, prec, fused, cost))
    # cheapest first; at equal cost, the one with fewer savers switched on
    def savers(c: _Candidate) -> int:
        return (bool(c.checkpoint_every) + bool(c.loss_chunk) + (c.optimizer != base.optimizer)
                + (c.precision != base.precision) + c.fused_backward)

    out.sort(key=lambda c: (round(c.cost, 9), savers(c)))
    return out


def _apply(base: TrainConfig, c: _Candidate, seq_len: int, world: int = 1) -> TrainConfig:
    """The candidate as a TrainConfig; its micro-batch is per process, TrainConfig's is global."""
    return dataclasses.replace(
        base, micro_batch=c.micro_batch * world, grad_accum=c.grad_accum, seq_len=seq_len,
        activation_checkpointing=c.checkpoint_every, loss_chunk=c.loss_chunk, optimizer=c.optimizer,
        precision=c.precision, fused_backward=c.fused_backward,
        grad_clip=0.0 if c.fused_backward else base.grad_clip,
        seq_len_warmup=[], batch_ramp=[],  # the plan sizes the full shape; ramps only ever use less
    )


def _tradeoffs(base: TrainConfig, c: _Candidate, sequences: int, n_layer: int, tokens: int) -> list[str]:
    out = []
    if c.micro_batch < sequences:
        out.append(f"micro-batch {c.micro_batch} x {c.grad_accum} accumulation steps instead of "
                   f"{sequences} x 1 (same global batch, slower per token)")
    if c.checkpoint_every:
        n = len(range(0, n_layer, c.checkpoint_every))
        out.append(f"activation checkpointing of {n}/{n_layer} blocks: "
                   f"+{100 * CHECKPOINT_COST * n / n_layer:.0f}% compute")
    if c.loss_chunk:
        out.append(f"chunked loss ({c.loss_chunk} tokens x {math.ceil(tokens / c.loss_chunk)} chunks): "
                   "same result, ~no cost")
    if c.optimizer != base.optimizer:
        out.append({"adamw8bit": "8-bit AdamW states (block-wise quantized moments)",
                    "adafactor": "Adafactor (factored second moments, no first moment)"}[c.optimizer])
    if c.precision != base.precision:
        out.append({"bf16-autocast": "bf16 autocast (bf16 matmuls, fp32 weights)",
                    "bf16": "pure bf16 weights and activations (fp32 optimizer math, stochastic rounding)"}
                   [c.precision])
    if c.fused_backward:
        out.append("fused backward (optimizer step inside backward)"
                   + ("; gradient clipping off" if base.grad_clip > 0 else ""))
    return out


def plan_training(model_cfg: ModelConfig, base_train_cfg: TrainConfig, budget_bytes: int | str,
                  device: str = "cpu", world_size: int = 1, global_batch_tokens: int | None = None,
                  allow: dict[str, list] | None = None, task: str = "train", teacher_bytes: int = 0,
                  estimator: Callable[[TrainConfig], Breakdown] | None = None) -> Plan:
    """The fastest training settings whose predicted peak fits `budget_bytes` per process.

    global_batch_tokens: tokens per optimizer step over all processes (default: what
    base_train_cfg gives: micro_batch * grad_accum * seq_len * world_size); it is rounded to
    whole sequences per process. `allow` restricts the search, e.g. {"optimizer": ["adamw"]}.
    `estimator`: the prediction of a candidate (default: estimate_training; fine-tuning: see
    `plan_finetune`).
    """
    budget = parse_size(budget_bytes)
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    world = max(1, int(world_size))
    seq_len = base_train_cfg.seq_len or model_cfg.block_size
    if seq_len > model_cfg.block_size:
        raise MemlmError(f"seq_len {seq_len} is longer than the model's block_size {model_cfg.block_size}",
                         "lower --seq-len")
    if global_batch_tokens is None:
        global_batch_tokens = base_train_cfg.micro_batch * base_train_cfg.grad_accum * seq_len * world
    sequences = max(1, round(global_batch_tokens / (seq_len * world)))
    notes = []
    if sequences * seq_len * world != global_batch_tokens:
        notes.append(f"global batch rounded to {sequences * seq_len * world:,} tokens "
                     f"({sequences} sequences of {seq_len} per process)")
    if task == "finetune" and estimator is None:
        notes.append("full fine-tuning: every weight is trained (LoRA is not planned)")
    if teacher_bytes:  # the distillation loss needs the student's full logits: no chunked loss
        allow = {**(allow or {}), "loss_chunk": [0]}
    candidates = _candidates(model_cfg, base_train_cfg, sequences, seq_len, device, allow)

    def estimate(c: _Candidate) -> tuple[TrainConfig, Breakdown]:
        tc = _apply(base_train_cfg, c, seq_len, world)
        if estimator is not None:
            return tc, estimator(tc)
        return tc, estimate_training(model_cfg, tc, device=device, world_size=world, teacher_bytes=teacher_bytes)

    for c in candidates:
        tc, b = estimate(c)
        if _fits(b.total, budget):
            return Plan(task, True, budget, device, _train_settings(tc, sequences * seq_len * world), b.total, b,
                        _tradeoffs(base_train_cfg, c, sequences, model_cfg.n_layer, c.micro_batch * seq_len),
                        c.cost, None, world, notes, tc)
    # Nothing fits: the smallest need is among the candidates with every saver at its strongest
    # (micro-batch 1, every block recomputed, the smallest chunk); try those for each optimizer,
    # precision and fused choice.
    smallest = [c for c in candidates if c.micro_batch == 1 and c.checkpoint_every in (0, 1)
                and c.loss_chunk in (0, MIN_LOSS_CHUNK)] or candidates
    best_c, best_tc, best_b = None, None, None
    for c in smallest:
        tc, b = estimate(c)
        if best_b is None or b.total < best_b.total:
            best_c, best_tc, best_b = c, tc, b
    assert best_c is not None and best_tc is not None and best_b is not None
    min_budget = math.ceil(best_b.total / (1 - SAFETY_MARGIN))
    notes.append(f"nothing fits {format_bytes(budget)}; the leanest plan needs {format_bytes(min_budget)}")
    return Plan(task, False, budget, device, _train_settings(best_tc, sequences * seq_len * world), best_b.total,
                best_b, _tradeoffs(base_train_cfg, best_c, sequences, model_cfg.n_layer, seq_len), best_c.cost,
                min_budget, world, notes, best_tc)


def _train_settings(tc: TrainConfig, global_tokens: int) -> dict[str, Any]:
    keys = ("micro_batch", "grad_accum", "seq_len", "precision", "optimizer", "fused_backward",
            "activation_checkpointing", "loss_chunk", "grad_clip")
    return {**{k: getattr(tc, k) for k in keys}, "global_batch_tokens": global_tokens}


# ------------------------------------------------------------------------------ inference


def _formats(model_cfg: ModelConfig, device: str) -> list[str]:
    """Weight formats in order of fidelity that memlm.compress can build for this model."""
    from memlm.memory.estimate import block_linears, int4_group_size

    out = []
    for fmt in WEIGHT_FORMATS[device]:
        if model_cfg.kind != "decoder" and fmt in ("int8", "int4"):
            continue  # memlm.compress quantizes a decoder's blocks; the other kinds load as float
        if fmt == "int4":
            try:
                for n_in, _ in block_linears(model_cfg):
                    int4_group_size(n_in)
            except MemlmError:
                continue
        out.append(fmt)
    return out


def _max_int(lo: int, hi: int, ok) -> int:
    """Largest x in [lo, hi] with ok(x), assuming ok is monotone (true then false); lo - 1 if none."""
    if not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_inference(model_cfg: ModelConfig, budget_bytes: int | str, context: int | None = None,
                   device: str = "cpu", max_batch: int = 256, prompt_len: int | None = None,
                   min_batch: int = 1, formats: list[str] | None = None,
                   layout: Callable[[str], dict] | None = None, runtime: str = "infer",
                   compile: bool = False) -> Plan:
    """Weight format, KV-cache dtype and concurrent sequences (x context) that fit the budget.

    The format is the best one that holds `min_batch` sequences; the rest of the budget goes to
    more, up to `max_batch` (a server's pool). One command's generation: min = max = 1, and the
    predicted peak is that of exactly what it runs. `formats`: the candidates (default: all that
    memlm can build for this model); `layout(format)`: how the loader will lay that format out
    (memlm.loading.layout_of: group sizes, an int8 embedding), so the plan predicts what loads.
    runtime: "infer" (a command) or "serve" (memlm serve; memlm.memory.estimate.RUNTIME_BYTES).
    compile: the decode step is compiled (the compiler's memory is counted).
    """
    max_batch = max(max_batch, min_batch)
    budget = parse_size(budget_bytes)
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    target = context or model_cfg.block_size
    if target > model_cfg.block_size:
        raise MemlmError(f"context {target} exceeds the model's block_size {model_cfg.block_size}",
                         f"ask for at most {model_cfg.block_size} tokens")
    formats = [f for f in _formats(model_cfg, device) if formats is None or f in formats]
    layouts = {f: (layout(f) if layout else {}) for f in formats}
    # The cache holds keys/values in the activations' dtype: Attention hands SDPA fp32 queries
    # with the cached keys as they are, so a bf16 cache under fp32 compute is not an option.
    combos = [(fmt, "bf16" if fmt == "bf16" or device == "cuda" else "fp32") for fmt in formats]

    def est(fmt: str, kv: str, batch: int, ctx: int) -> Breakdown:
        return estimate_inference(model_cfg, batch=batch, context=ctx, weight_format=fmt, kv_dtype=kv,
                                  prompt_len=min(prompt_len, ctx) if prompt_len else None, device=device,
                                  runtime=runtime, compile=compile, **layouts[fmt])

    def tradeoffs(fmt: str, kv: str, ctx: int) -> list[str]:
        out = []
        best = formats[0]
        if fmt != best:
            out.append({"bf16": "bf16 weights", "int8": "int8 weights (per-row scales)",
                        "int4": "int4 weights (group-wise, largest quantization error)"}[fmt])
        if ctx < target:
            out.append(f"context limited to {ctx} of the {target} asked for")
        return out

    for fmt, kv in combos:
        batch = _max_int(min_batch, max_batch, lambda b: _fits(est(fmt, kv, b, target).total, budget))
        if batch >= min_batch:
            b = est(fmt, kv, batch, target)
            settings = {"weight_format": fmt, "kv_dtype": kv, "context": target, "concurrent_sequences": batch}
            notes = [f"{batch} sequence(s) of {target} tokens at once" + (" (the cap)" if batch == max_batch else "")]
            return Plan("infer", True, budget, device, settings, b.total, b, tradeoffs(fmt, kv, target), 1.0,
                        notes=notes)
    # Not even one sequence of the target context: with no context asked for, shorten it, in
    # the format that allows the longest context (the best format among equals).
    if context is None and min_batch == 1:
        longest = [(_max_int(1, target, lambda c, f=f, k=k: _fits(est(f, k, 1, c).total, budget)), -i, f, k)
                   for i, (f, k) in enumerate(combos)]
        ctx, _, fmt, kv = max(longest)
        if ctx >= 1:
            b = est(fmt, kv, 1, ctx)
            settings = {"weight_format": fmt, "kv_dtype": kv, "context": ctx, "concurrent_sequences": 1}
            return Plan("infer", True, budget, device, settings, b.total, b, tradeoffs(fmt, kv, ctx), 1.0,
                        notes=[f"one sequence of at most {ctx} tokens"])
    ctx = target if context is not None else 1
    b = min((est(f, k, min_batch, ctx) for f, k in combos), key=lambda x: x.total)
    min_budget = math.ceil(b.total / (1 - SAFETY_MARGIN))
    settings = {**{k: b.settings[k] for k in ("weight_format", "kv_dtype", "context")},
                "concurrent_sequences": min_batch}
    return Plan("infer", False, budget, device, settings, b.total, b,
                tradeoffs(settings["weight_format"], settings["kv_dtype"], ctx), 1.0, min_budget,
                notes=[f"nothing fits {format_bytes(budget)}; the leanest plan needs {format_bytes(min_budget)}"])


def plan_scoring(model_cfg: ModelConfig, budget_bytes: int | str, window: int | None = None, batch: int = 1,
                 device: str = "cpu", formats: list[str] | None = None,
                 layout: Callable[[str], dict] | None = None) -> Plan:
    """The best weight format in which perplexity scoring of `batch` windows fits the budget
    (`formats`, `layout` as in `plan_inference`)."""
    from memlm.memory.estimate import estimate_scoring

    budget = parse_size(budget_bytes)
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    window = min(window or model_cfg.block_size, model_cfg.block_size)
    formats = [f for f in _formats(model_cfg, device) if formats is None or f in formats]
    estimates = [estimate_scoring(model_cfg, batch, window, fmt, device, **(layout(fmt) if layout else {}))
                 for fmt in formats]
    for fmt, b in zip(formats, estimates):
        if _fits(b.total, budget):
            settings = {"weight_format": fmt, "window": window, "batch": batch}
            trade = [] if fmt == formats[0] else [f"{fmt} weights"]
            return Plan("score", True, budget, device, settings, b.total, b, trade)
    b = min(estimates, key=lambda x: x.total)
    min_budget = math.ceil(b.total / (1 - SAFETY_MARGIN))
    return Plan("score", False, budget, device, {"weight_format": b.settings["weight_format"], "window": window,
                                                 "batch": batch}, b.total, b, [], 1.0, min_budget,
                notes=[f"nothing fits {format_bytes(budget)}; the leanest plan needs {format_bytes(min_budget)}"])


# ------------------------------------------------------------------------------ CLI and display


def plan_for_cli(model_cfg: ModelConfig, task: str, budget_bytes: int | str, seq_len: int | None = None,
                 global_batch_tokens: int | None = None, world_size: int = 1, device: str = "cpu",
                 finetune: dict[str, Any] | None = None) -> Plan:
    """Everything `memlm plan` does besides reading its arguments.

    train / finetune: seq_len defaults to the model's block_size, the global batch to 8
    sequences per process (TrainConfig's default micro-batch). infer: seq_len is the context
    (default: block_size). finetune with `finetune` = {lora_r, lora_targets, base_format,
    layout}: a LoRA / QLoRA plan (`plan_finetune`); without it, full fine-tuning.
    """
    if task == "finetune" and finetune is not None:
        seq = seq_len or model_cfg.block_size
        base = TrainConfig(seq_len=seq)
        if global_batch_tokens:
            base = dataclasses.replace(base, micro_batch=max(1, round(global_batch_tokens / seq)))
        return plan_finetune(model_cfg, base, budget_bytes, device, **finetune)
    if task in ("train", "finetune"):
        seq = seq_len or model_cfg.block_size
        base = TrainConfig(seq_len=seq, nproc=max(1, world_size))
        return plan_training(model_cfg, base, budget_bytes, device=device, world_size=world_size,
                             global_batch_tokens=global_batch_tokens, task=task)
    if task == "infer":
        return plan_inference(model_cfg, budget_bytes, context=seq_len, device=device)
    raise MemlmError(f"unknown task '{task}'", "use train, finetune or infer")


def predict_for_cli(model_cfg: ModelConfig, task: str, seq_len: int | None = None,
                    train_keys: dict[str, Any] | None = None, world_size: int = 1, device: str = "cpu",
                    weight_format: str = "fp32", finetune: dict[str, Any] | None = None) -> Breakdown:
    """`memlm plan` without a budget: the predicted peak of exactly these settings, term by term.

    train / finetune: TrainConfig's defaults with `train_keys` over them (micro_batch is per
    process here, as a user reads it); infer: train_keys' micro_batch concurrent sequences of
    seq_len (default block_size) tokens in `weight_format`.
    """
    keys = dict(train_keys or {})
    if task in ("train", "finetune"):
        seq = seq_len or keys.pop("seq_len", None) or model_cfg.block_size
        world = max(1, world_size)
        keys["micro_batch"] = keys.get("micro_batch", TrainConfig().micro_batch) * world
        tc = TrainConfig.from_dict({**keys, "seq_len": seq, "nproc": world})
        tc.validate()
        if task == "finetune" and finetune is not None:
            from memlm.memory.estimate import estimate_finetune

            layout = finetune.get("layout")
            group = (layout(finetune["base_format"]) if layout else {}).get("group_size")
            return estimate_finetune(model_cfg, tc, device, finetune["lora_r"], finetune["lora_targets"],
                                     finetune["base_format"], group, world)
        return estimate_training(model_cfg, tc, device=device, world_size=world)
    if task == "infer":
        return estimate_inference(model_cfg, batch=int(keys.get("micro_batch", 1)), context=seq_len,
                                  weight_format=weight_format, device=device)
    raise MemlmError(f"unknown task '{task}'", "use train, finetune or infer")


def render_plan(plan: Plan):
    """A rich renderable: verdict, settings, trade-offs and the breakdown of the peak."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if plan.feasible:
        head = Text.assemble(
            ("fits: ", "bold green"),
            f"predicted peak {format_bytes(plan.predicted_peak)} of {format_bytes(plan.budget_bytes)} "
            f"(headroom {format_bytes(plan.headroom)})",
            (f", relative cost x{plan.cost:.2f}" if plan.task != "infer" else ""),
        )
    else:
        head = Text.assemble(
            ("does not fit: ", "bold red"),
            f"the leanest plan needs {format_bytes(plan.min_budget or 0)} "
            f"(budget {format_bytes(plan.budget_bytes)})",
        )
    settings = Table(title=f"{plan.task} plan ({plan.device}"
                           + (f", {plan.world_size} processes" if plan.world_size > 1 else "") + ")")
    settings.add_column("setting")
    settings.add_column("value")
    for k, v in plan.settings.items():
        settings.add_row(k, str(v))
    parts: list[Any] = [head, settings]
    if plan.tradeoffs:
        parts.append(Text("traded away:\n" + "\n".join(f"  - {t}" for t in plan.tradeoffs)))
    else:
        parts.append(Text("traded away: nothing"))
    for n in plan.notes:
        parts.append(Text(f"note: {n}", style="dim"))
    if plan.breakdown is not None:
        parts.append(plan.breakdown.table())
    return Group(*parts)


def fit_training(model_cfg: ModelConfig, train_cfg: TrainConfig, device: str = "cpu",
                 teacher_bytes: int = 0) -> tuple[TrainConfig, Plan]:
    """Apply `train_cfg.memory_budget`: the run's config with the chosen plan's settings.

    The global batch of the given config is kept; the plan is a pure function of the two
    configs, so a resumed run re-derives the same settings.
    """
    plan = plan_training(model_cfg, train_cfg, train_cfg.memory_budget, device=device,
                         world_size=max(1, train_cfg.nproc), global_batch_tokens=tokens_per_step(train_cfg, model_cfg),
                         teacher_bytes=teacher_bytes)
    return _planned(train_cfg, plan, "raise --memory-budget, shorten --seq-len or pick a smaller model "
                                     "(see: memlm plan)"), plan


def tokens_per_step(train_cfg: TrainConfig, model_cfg: ModelConfig) -> int:
    """Tokens per optimizer step of a run's config: its micro_batch is the global one (split over
    the processes by the loop), unlike plan_training's base config, whose micro_batch is per
    process (as `memlm plan --nproc` reads it)."""
    return train_cfg.micro_batch * train_cfg.grad_accum * (train_cfg.seq_len or model_cfg.block_size)


def _planned(train_cfg: TrainConfig, plan: Plan, hint: str) -> TrainConfig:
    """The run's config with the plan's settings; an infeasible plan is refused before any work."""
    if not plan.feasible:
        raise DoesNotFit(
            f"nothing fits the memory budget {format_bytes(plan.budget_bytes)}: "
            f"the leanest plan needs {format_bytes(plan.min_budget)}", hint)
    keys = [k for k in plan.settings if k in {f.name for f in dataclasses.fields(TrainConfig)}]
    return dataclasses.replace(train_cfg, **{k: plan.settings[k] for k in keys})


# ------------------------------------------------------------------------------ fine-tuning

# Base formats a LoRA fine-tune may fall back to, by fidelity; and the lowest rank it goes down to.
FINETUNE_FORMATS = ("fp32", "int8", "int4")
MIN_LORA_RANK = 2


def plan_finetune(model_cfg: ModelConfig, train_cfg: TrainConfig, budget_bytes: int | str, device: str = "cpu",
                  lora_r: int | None = 8, lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
                  base_format: str = "fp32", layout: Callable[[str], dict] | None = None,
                  search_base: bool = True, answer_tokens: tuple[int, ...] | None = None) -> Plan:
    """The settings of `memlm finetune` that fit: micro-batch (the global batch kept), activation
    checkpointing and the chunked loss as for training, and, for LoRA, the base's format (the one
    asked for, then the more compact int8 and int4) and then the rank (halved down to
    MIN_LORA_RANK). A full fine-tune (lora_r None) is planned like training, every saver allowed.
    `layout(format)`: how the base loads in that format (memlm.loading.layout_of: group sizes).
    `answer_tokens`: the data's scored tokens per example, largest first (estimate_finetune).
    The plan's settings carry `lora_r` and `base_format`."""
    from memlm.memory.estimate import estimate_finetune

    budget = parse_size(budget_bytes)
    world = max(1, train_cfg.nproc)  # the budget is each process's, as for training
    tokens = tokens_per_step(train_cfg, model_cfg)  # train_cfg is a run's: its micro_batch is global
    if lora_r is None:
        plan = plan_training(model_cfg, train_cfg, budget, device, world_size=world, global_batch_tokens=tokens,
                             task="finetune", estimator=lambda tc: estimate_finetune(model_cfg, tc, device,
                                                                                     world_size=world,
                                                                                     answer_tokens=answer_tokens))
        plan.settings.update(lora_r=None, base_format="fp32")
        return plan
    keep = {"optimizer": [train_cfg.optimizer], "precision": [train_cfg.precision], "fused_backward": [False]}
    asked = FINETUNE_FORMATS.index(base_format) if base_format in FINETUNE_FORMATS else 0
    formats = list(FINETUNE_FORMATS[asked:]) if search_base else [base_format]
    ranks = [lora_r]
    while search_base and ranks[-1] // 2 >= MIN_LORA_RANK:
        ranks.append(ranks[-1] // 2)
    leanest = None
    for r in ranks:
        for fmt in formats:
            group = (layout(fmt) if layout else {}).get("group_size")

            def estimator(tc: TrainConfig, r=r, fmt=fmt, group=group) -> Breakdown:
                return estimate_finetune(model_cfg, tc, device, r, lora_targets, fmt, group, world, answer_tokens)

            plan = plan_training(model_cfg, train_cfg, budget, device, world_size=world, global_batch_tokens=tokens,
                                 allow=keep, task="finetune", estimator=estimator)
            plan.settings.update(lora_r=r, base_format=fmt)
            trade = ([f"{fmt} base weights (frozen)"] if fmt != base_format else []) + (
                [f"LoRA rank {r} instead of {lora_r}"] if r != lora_r else [])
            plan.tradeoffs = trade + plan.tradeoffs
            if plan.feasible:
                return plan
            if leanest is None or plan.predicted_peak < leanest.predicted_peak:
                leanest = plan
    assert leanest is not None
    return leanest


def fit_finetune(model_cfg: ModelConfig, train_cfg: TrainConfig, device: str = "cpu", lora_r: int | None = 8,
                 lora_targets: tuple[str, ...] = ("q_proj", "v_proj"), base_format: str = "fp32",
                 group_size: int | None = None, answer_tokens: tuple[int, ...] | None = None) -> tuple[TrainConfig, Plan]:
    """`fit_training` for a fine-tune whose rank and base are already chosen (by `plan_finetune`):
    the run's config with the plan's micro-batch, checkpointing and loss chunk."""
    plan = plan_finetune(model_cfg, train_cfg, train_cfg.memory_budget, device, lora_r, lora_targets, base_format,
                         layout=lambda f: {"group_size": group_size}, search_base=False, answer_tokens=answer_tokens)
    return _planned(train_cfg, plan, "raise --memory-budget, shorten --seq-len, or use a quantized base "
                                     "(see: memlm plan --task finetune)"), plan
