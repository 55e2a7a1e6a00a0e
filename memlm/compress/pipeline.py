"""`memlm compress`: apply compression methods in order, measure what they did, save the result.

    summary = compress(model, tokenizer, ["prune24", "int4"], CompressOptions(group_size=32))

Methods (each a function of this package, applied in place, in the order given):
  int8 / int4 / int3   round-to-nearest weight quantization (`quantize_model`)
  gptq4 / gptq3        GPTQ on calibration text (`gptq_quantize_model`)
  prune                unstructured magnitude pruning to `sparsity` (zeros stay in dense storage)
  prune24              2:4 pruning; stored compactly when it is the last method, as dense zeros
                       when a quantization follows (the quantized formats have no sparse layout)
  prune-ffn            remove FFN neurons, keeping the `keep` fraction (calibrated)
  prune-heads          remove KV head groups, keeping the `keep` fraction (calibrated)
  lowrank              truncated-SVD factorization by `rank` or `energy`

A quantization replaces the block Linears, after which nothing else has a plain Linear to work
on, so at most one quantization is allowed and it comes last. The embedding is quantized
(`quantize_embedding="int8"`) after every method.

The summary holds sizes (in memory, on disk), perplexity before and after on the eval split (the
W2 protocol, optionally on its first `eval_tokens` tokens) and the predicted peak memory of
generation (memlm.memory.estimate, with the weights term replaced by the model's real bytes).

The run's own peak is predicted before anything is loaded (`plan_compress`, with
memlm.memory.estimate.estimate_compress): with a memory budget the run is refused up front when
no way of doing it fits, and otherwise done the most informative way that fits: as always
(float32 load, perplexity before and after), else without the float32 perplexity before, in
which case round-to-nearest int8/int4 alone loads the model straight into its format (the
float32 model never exists) when the loader's conversion gives the very codes the float path
gives (`_lean_format`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memlm.compress.gptq import gptq_quantize_model
from memlm.compress.lowrank import lowrank_model
from memlm.compress.prune import prune_2_4, prune_ffn, prune_heads, prune_magnitude
from memlm.compress.quantize import (
    GROUP_SIZES,
    GroupQuantLinear,
    Int8Embedding,
    Int8Linear,
    Int8TiedHead,
    choose_group_size,
    dequantize_weight,
    torch_int4_layout_by_default,
    module_from_codes,
    quantize_embedding_int8,
    quantize_model,
    quantize_weight,
    set_module,
)
from memlm.compress.storage import folder_bytes, model_bytes, save_compressed
from memlm.errors import MemlmError
from memlm.memory.estimate import Breakdown
from memlm.memory.guard import DoesNotFit, MemoryGuard, expected_from
from memlm.memory.measure import format_bytes, parse_size, return_free_heap

QUANT_METHODS = ("int8", "int4", "int3", "gptq4", "gptq3")
OTHER_METHODS = ("prune", "prune24", "prune-ffn", "prune-heads", "lowrank")
METHODS = QUANT_METHODS + OTHER_METHODS
CALIBRATED = ("gptq4", "gptq3", "prune-ffn", "prune-heads")
DEFAULT_ENERGY = 0.9  # lowrank with neither rank nor energy given
CHARS_PER_TOKEN_CAP = 16  # text read per token wanted: BPE averages 3-5 characters a token
PREDICT_CONTEXT = 1024  # cache length of the predicted generation (capped at block_size)


@dataclass
class CompressOptions:
    group_size: int = 128  # int4/int3/gptq: upper bound of the group (see choose_group_size)
    sparsity: float = 0.5  # prune: fraction of weights zeroed
    keep: float = 0.75  # prune-ffn / prune-heads: fraction of neurons / KV heads kept
    rank: int | None = None  # lowrank: one rank for every layer ...
    energy: float | None = None  # ... or the fraction of squared singular values kept
    act_order: bool = False  # gptq: quantize the columns with the most input energy first
    calib_tokens: int = 16_384  # calibration text for gptq / calibrated pruning
    calib_corpus: str = "default"  # its train split is used
    quantize_embedding: str | None = None  # "int8": the embedding (and a tied head) too
    eval: bool = True  # perplexity before and after
    eval_corpus: str = "default"  # its eval split is used
    eval_tokens: int | None = None  # only the first N tokens of the eval split (None: all)
    window: int = 512  # perplexity window (capped at the model's block_size)
    progress: bool = True
    use_kernel: bool | None = None  # int4: None = the CPU int4 kernel where available

    def validate(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise MemlmError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if not 0.0 <= self.sparsity < 1.0:
            raise MemlmError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 < self.keep <= 1.0:
            raise MemlmError(f"--keep must be in (0, 1], got {self.keep}")
        if self.rank is not None and self.energy is not None:
            raise MemlmError("give --rank or --energy, not both")
        if self.rank is not None and self.rank < 1:
            raise MemlmError(f"--rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise MemlmError(f"--energy must be in (0, 1], got {self.energy}")
        if self.calib_tokens < 1:
            raise MemlmError(f"--calib-tokens must be positive, got {self.calib_tokens}")
        if self.quantize_embedding not in (None, "int8"):
            raise MemlmError(f"--quantize-embedding must be int8, got {self.quantize_embedding!r}")
        if self.eval_tokens is not None and self.eval_tokens < 2:
            raise MemlmError(f"--eval-tokens must be at least 2, got {self.eval_tokens}")


@dataclass
class CompressSummary:
    """What `compress` did and measured; the `_before` / `_after` pairs describe the model."""

    methods: list[str]
    steps: list[dict[str, Any]]  # one per method (plus the embedding): what it did
    params_before: int
    params_after: int
    memory_before: int  # bytes of parameters and buffers (model_bytes)
    memory_after: int
    predicted_before: int | None  # predicted peak of generation, bytes
    predicted_after: int | None
    predict_context: int
    ppl_before: float | None = None
    ppl_after: float | None = None
    eval_tokens: int | None = None  # tokens scored by the perplexity
    disk_before: int | None = None  # the source's files (None when unknown)
    disk_after: int | None = None  # the saved folder
    out: str | None = None
    seconds: float = 0.0  # time spent compressing (evaluation excluded)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self):
        """A rich Table: one row per measure, before / after / ratio."""
        from rich.table import Table

        from memlm.memory.measure import format_bytes

        def size(n: int | None) -> str:
            return "-" if n is None else format_bytes(n)

        def ratio(a: float | None, b: float | None) -> str:
            return "-" if a is None or b is None or a == 0 else f"{b / a:.3f}x"

        title = "compressed: " + " -> ".join(s["what"] for s in self.steps)
        table = Table(title=title, title_justify="left")
        table.add_column("")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        table.add_column("after / before", justify="right")
        table.add_row("parameters", f"{self.params_before:,}", f"{self.params_after:,}",
                      ratio(self.params_before, self.params_after))
        table.add_row("weights in memory", size(self.memory_before), size(self.memory_after),
                      ratio(self.memory_before, self.memory_after))
        table.add_row("on disk", size(self.disk_before), size(self.disk_after), ratio(self.disk_before, self.disk_after))
        if self.ppl_after is not None:
            before = "-" if self.ppl_before is None else f"{self.ppl_before:.3f}"  # skipped under a budget
            table.add_row(f"perplexity ({self.eval_tokens:,} eval tokens)", before,
                          f"{self.ppl_after:.3f}", ratio(self.ppl_before, self.ppl_after))
        table.add_row(f"predicted generation peak (context {self.predict_context})", size(self.predicted_before),
                      size(self.predicted_after), ratio(self.predicted_before, self.predicted_after))
        return table


# ------------------------------------------------------------------------------ checks


def check_methods(methods: list[str]) -> None:
    """Known names; at most one quantization, and last (see the module docstring)."""
    if not methods:
        raise MemlmError("no compression method given", f"pass --method, one of: {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise MemlmError(f"unknown compression method '{m}'", f"choose from: {', '.join(METHODS)}")
    quants = [i for i, m in enumerate(methods) if m in QUANT_METHODS]
    if len(quants) > 1:
        raise MemlmError(f"more than one quantization method: {', '.join(methods[i] for i in quants)}",
                         "quantize once, as the last method")
    if quants and quants[0] != len(methods) - 1:
        raise MemlmError(f"'{methods[quants[0]]}' must be the last method",
                         "after quantization no plain Linear is left for the other methods: put it last")


# ------------------------------------------------------------------------------ text


def _corpus_ids(tokenizer: Any, corpus: str, split: str, max_tokens: int | None) -> torch.Tensor:
    """Token ids of a corpus split joined by blank lines (as `memlm eval` does), at most max_tokens.

    With a limit only the first CHARS_PER_TOKEN_CAP * max_tokens characters are tokenized: a long
    corpus is not encoded whole for a few thousand tokens (the first max_tokens ids are the same).
    """
    from memlm.data import read_corpus

    text = "\n\n".join(read_corpus(corpus, split))
    if max_tokens is not None:
        text = text[: CHARS_PER_TOKEN_CAP * max_tokens]
    ids = tokenizer.encode(text, add_bos=False)
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def calibration_batches(tokenizer: Any, corpus: str, n_tokens: int, window: int) -> list[torch.Tensor]:
    """ceil(n_tokens / window) windows (1, window) spread evenly over the corpus' train split."""
    ids = _corpus_ids(tokenizer, corpus, "train", n_tokens * 4)  # 4x the text: windows spread over it
    window = min(window, len(ids))
    if window < 2:
        raise MemlmError(f"calibration corpus {corpus} has too little text", "give a bigger --calib-corpus")
    n = math.ceil(n_tokens / window)
    starts = torch.linspace(0, len(ids) - window, n).long().unique()
    return [ids[s : s + window][None] for s in starts.tolist()]


def eval_perplexity(model: nn.Module, ids: torch.Tensor, window: int, console: Any = None,
                    progress: bool = True, guard: MemoryGuard | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored) of `model` on `ids`, non-overlapping windows (W2); `guard`
    checks the budget before each window."""
    from rich.progress import Progress

    from memlm.eval.perplexity import perplexity, window_plan

    n = len(window_plan(len(ids), window))
    with Progress(console=console, transient=True, disable=console is None or not progress) as bar:
        task = bar.add_task("perplexity", total=n)
        result = perplexity(model, ids, window, on_window=lambda k: bar.advance(task, k), guard=guard)
    return result.ppl, result.n_scored


# ------------------------------------------------------------------------------ memory


def predicted_generation_bytes(model: nn.Module, context: int) -> int | None:
    """Predicted peak of generating with `model` (batch 1, `context` cached tokens).

    memlm.memory.estimate knows uniform formats; the weights term is replaced by the model's own
    bytes (plus the bf16 scale/zero pairs the int4 kernel caches on first use), so pruned,
    factored or mixed models are counted as they are. None when the estimator cannot say.
    """
    from memlm.memory.estimate import estimate_inference

    groups = [m for m in model.modules() if isinstance(m, GroupQuantLinear)]
    kernel = any(m.kernel_layout for m in groups)
    fmt = "int4" if groups else "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else "fp32"
    try:
        est = estimate_inference(model.config, batch=1, context=context, weight_format=fmt, int4_kernel=kernel)
    except MemlmError:
        return None
    kernel_cache = sum(4 * m.scales.numel() for m in groups if m.kernel_layout)
    return est.total - est["weights"] + model_bytes(model) + kernel_cache


# ------------------------------------------------------------------------------ the pipeline


def _rtn_what(method: str, o: CompressOptions) -> str:
    return method if method == "int8" else f"{method} g{o.group_size}"


def _phase_done(guard: MemoryGuard | None, phase: str) -> None:
    """The end of a phase: hand the heap's freed pages back (glibc keeps them otherwise, and a
    phase that frees the float32 weights would leave them resident through the next); with a
    budget, the guard also checks the peak so far (MemoryGuard.mark)."""
    if guard is not None:
        guard.mark(phase)
    else:
        return_free_heap()


def _apply(model: nn.Module, method: str, last: bool, o: CompressOptions, calib: list[torch.Tensor] | None) -> str:
    """Apply one method in place; returns a short description of what it did."""
    if method in ("int8", "int4", "int3"):
        quantize_model(model, method, o.group_size, progress=o.progress, use_kernel=o.use_kernel)
        return _rtn_what(method, o)
    if method in ("gptq4", "gptq3"):
        gptq_quantize_model(model, calib, bits=int(method[-1]), group_size=o.group_size, act_order=o.act_order,
                            progress=o.progress, use_kernel=o.use_kernel)
        return f"{method} g{o.group_size}" + (" act-order" if o.act_order else "")
    if method == "prune":
        result = prune_magnitude(model, o.sparsity)
        return f"prune {result['sparsity']:.0%}"
    if method == "prune24":
        prune_2_4(model, compact=last)  # compact storage only when nothing rewrites the layers after
        return "prune24" + (" compact" if last else " dense")
    if method == "prune-ffn":
        before = model.config.ffn_hidden
        prune_ffn(model, o.keep, calib)
        return f"prune-ffn {before}->{model.config.ffn_hidden}"
    if method == "prune-heads":
        n_kv = model.config.n_kv_heads
        prune_heads(model, max(1, round(n_kv * o.keep)), calib)
        return f"prune-heads kv {n_kv}->{model.config.n_kv_heads}"
    if method == "lowrank":
        if o.rank is not None:
            chosen = lowrank_model(model, rank=o.rank, progress=o.progress)
            what = f"rank {o.rank}"
        else:
            energy = o.energy if o.energy is not None else DEFAULT_ENERGY
            chosen = lowrank_model(model, energy=energy, progress=o.progress)
            what = f"energy {energy}"
        factored = sum(r is not None for r in chosen.values())
        return f"lowrank {what} ({factored}/{len(chosen)} layers factored)"
    raise MemlmError(f"unknown compression method '{method}'", f"choose from: {', '.join(METHODS)}")


def compress(model: nn.Module, tokenizer: Any, methods: list[str], options: CompressOptions | None = None,
             console: Any = None, eval_before: bool = True, quantized_at_load: bool = False,
             guard: MemoryGuard | None = None) -> CompressSummary:
    """Compress `model` in place by `methods` (in order); returns what was done and measured.

    `tokenizer` encodes the calibration and evaluation text. `console` (rich) shows progress.
    eval_before=False skips the perplexity before (ppl_before stays None). quantized_at_load: the
    model was loaded straight into the format of its only method, round-to-nearest int8/int4
    (`_load_in_format`): the "before" sizes are those of its float32 original, from its config.
    `guard` (a budget's MemoryGuard) checks the peak after each phase and before each window.
    """
    o = options or CompressOptions()
    o.validate()
    check_methods(methods)
    model.eval()
    config = model.config
    window = min(o.window, config.block_size)
    context = min(PREDICT_CONTEXT, config.block_size)

    eval_ids = None
    if o.eval:
        eval_ids = _corpus_ids(tokenizer, o.eval_corpus, "eval", o.eval_tokens)
        if len(eval_ids) < window:
            raise MemlmError(f"the eval text has {len(eval_ids)} tokens, fewer than one window of {window}",
                             "raise --eval-tokens, use a bigger --eval-corpus, or pass --no-eval")
    calib = None
    if any(m in CALIBRATED for m in methods):
        calib = calibration_batches(tokenizer, o.calib_corpus, o.calib_tokens, window)

    if quantized_at_load:
        params, memory, predicted = _float_original(config, context)
    else:
        params, memory, predicted = _count_params(model), model_bytes(model), predicted_generation_bytes(model, context)
    summary = CompressSummary(
        methods=list(methods), steps=[], params_before=params, params_after=0, memory_before=memory, memory_after=0,
        predicted_before=predicted, predicted_after=None, predict_context=context,
    )
    if eval_ids is not None and eval_before:
        summary.ppl_before, summary.eval_tokens = eval_perplexity(model, eval_ids, window, console, o.progress, guard)
        _phase_done(guard, "perplexity before")

    t0 = time.perf_counter()
    with torch.no_grad():
        for i, method in enumerate(methods):
            last = i == len(methods) - 1
            what = _rtn_what(method, o) if quantized_at_load and last else _apply(model, method, last, o, calib)
            summary.steps.append({"method": method, "what": what})
            _phase_done(guard, method)
        if o.quantize_embedding == "int8":
            quantize_embedding_int8(model)
            summary.steps.append({"method": "embedding", "what": "embedding int8"})
            _phase_done(guard, "embedding int8")
    summary.seconds = time.perf_counter() - t0
    if methods[-1] in QUANT_METHODS and any(m in ("prune", "prune24") for m in methods):
        summary.notes.append("the pruned zeros were quantized with the rest: the file holds no sparse layout")

    summary.params_after = _count_params(model)
    summary.memory_after = model_bytes(model)
    summary.predicted_after = predicted_generation_bytes(model, context)
    if eval_ids is not None:
        summary.ppl_after, n_scored = eval_perplexity(model, eval_ids, window, console, o.progress, guard)
        summary.eval_tokens = n_scored
        _phase_done(guard, "perplexity after")
    return summary


def _float_original(config: Any, context: int) -> tuple[int, int, int | None]:
    """(parameters, bytes, predicted generation peak) of the float32 model `config` describes, as
    `compress` reads them off a loaded float32 model (tied embeddings counted once)."""
    from memlm.memory.estimate import estimate_inference, inference_weight_bytes, param_shapes

    try:
        predicted = estimate_inference(config, batch=1, context=context).total
    except MemlmError:
        predicted = None
    return sum(s.numel for s in param_shapes(config)), inference_weight_bytes(config, "fp32"), predicted


def _count_params(model: nn.Module) -> int:
    """Weights the model computes with: float parameters plus quantized codes (one per weight)."""
    from memlm.compress.quantize import Int8Embedding

    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, (Int8Linear, GroupQuantLinear)):
            total += m.in_features * m.out_features
        elif isinstance(m, Int8Embedding):
            total += m.num_embeddings * m.embedding_dim
    return total


# ------------------------------------------------------------------------------ from a path


def source_disk_bytes(name_or_path: str | Path) -> int | None:
    """Bytes of the model files a name or path stands for (weights and tokenizer; for a run,
    its latest checkpoint's weights only). None when it cannot be told."""
    from memlm.loading import resolve

    try:
        kind, path = resolve(name_or_path)
    except MemlmError:
        return None
    if kind == "gguf":
        return path.stat().st_size
    if kind == "compressed":
        return folder_bytes(path)
    if kind == "hf":
        return sum(p.stat().st_size for p in path.iterdir()
                   if p.is_file() and (p.suffix == ".safetensors" or p.name.startswith("tokenizer")))
    from memlm.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(path)
    weights = ckpt / "model.safetensors" if ckpt is not None else None
    return weights.stat().st_size if weights is not None and weights.is_file() else None


@dataclass
class CompressPlan:
    """How a compress run will go, and its predicted peak (printed once, before any work)."""

    breakdown: Breakdown  # memlm.memory.estimate.estimate_compress of the run as planned
    load_format: str | None  # None: float32 (as stored); "int8" / "int4": straight into it (_load_in_format)
    eval_before: bool  # the float32 perplexity before the methods
    budget: int | None = None  # bytes; None: no budget was given
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_peak(self) -> int:
        return self.breakdown.total

    def guard(self) -> MemoryGuard | None:
        if self.budget is None:
            return None
        return MemoryGuard(self.budget, expected_from(self.breakdown), "perplexity window")

    def describe(self) -> str:
        """The one prediction, as `memlm compress` prints it before it starts."""
        s = self.breakdown.settings
        head = f"memory budget {format_bytes(self.budget)}: " if self.budget is not None else ""
        load = f"loaded straight into {self.load_format}" if self.load_format else "loaded in float32"
        evals = ("perplexity before and after" if s["eval_before"] and s["eval_after"] else
                 "perplexity after only" if s["eval_after"] else "no perplexity")
        return (f"{head}{' + '.join(s['methods'])}, {load}, {evals}, predicted peak "
                f"{format_bytes(self.predicted_peak)} ({self.breakdown.peak_phase})")


def plan_compress(source: str, methods: list[str], options: CompressOptions | None = None,
                  memory_budget: str | int | None = None) -> CompressPlan:
    """Predict the peak of compressing `source` (reading only its config and header).

    Without a budget: the run as always. With one, the first of these that fits (its prediction
    at most (1 - SAFETY_MARGIN) of the budget, as every memlm plan): the run as always; without
    the float32 perplexity before, loading straight into int8/int4 where `_lean_format` allows.
    None fits: DoesNotFit (exit status 1) with the smallest budget that would.
    """
    from memlm.loading import layout_of, model_config_of
    from memlm.memory.estimate import estimate_compress
    from memlm.memory.plan import SAFETY_MARGIN

    o = options or CompressOptions()
    o.validate()
    check_methods(methods)
    config = model_config_of(source)
    if config.kind != "decoder":
        raise MemlmError(f"memlm compress works on a decoder's transformer blocks; {source} is a {config.kind} model",
                         "a light model is small already: memlm generate --memory-budget loads it in bf16 if needed")
    # PyTorch's int4 layout: asked for, or by default where memlm's own kernels are not built
    kernel = o.use_kernel is True or (o.use_kernel is None and torch_int4_layout_by_default())
    window = min(o.window, config.block_size)

    layouts: dict[str, dict] = {}  # layout_of reads the file's header: once per format

    def estimate(load_format: str | None, before: bool, after: bool = o.eval) -> Breakdown:
        if load_format is not None and load_format not in layouts:
            layouts[load_format] = layout_of(source, load_format)
        layout = layouts.get(load_format) if load_format is not None else None
        return estimate_compress(config, methods, o.group_size, o.quantize_embedding == "int8", before and o.eval,
                                 after, window, o.calib_tokens, load_format, layout, kernel)

    def needs(b: Breakdown) -> int:
        return math.ceil(b.total / (1 - SAFETY_MARGIN))

    full = estimate(None, True)
    if memory_budget is None:
        return CompressPlan(full, None, o.eval)
    budget = parse_size(memory_budget)
    lean = _lean_format(source, config, methods, o)
    ways = ([(None, True)] if o.eval else []) + [(lean, False)]
    for load_format, before in ways:
        b = full if (load_format, before) == (None, True) else estimate(load_format, before)
        if needs(b) <= budget:
            notes = []
            if o.eval and not before:
                notes.append(f"the float32 perplexity before was skipped: with it the run needs "
                             f"{format_bytes(needs(full))}, more than the budget {format_bytes(budget)}"
                             + (f" (the model was loaded straight into {load_format})" if load_format else ""))
            return CompressPlan(b, load_format, before and o.eval, budget, notes)
    hint = "raise --memory-budget"
    if o.eval:
        hint += f", or pass --no-eval (then it needs {format_bytes(needs(estimate(lean, False, False)))})"
    raise DoesNotFit(f"compressing {source} ({' + '.join(methods)}) does not fit the memory budget "
                     f"{format_bytes(budget)}: the leanest way needs {format_bytes(needs(b))} (at its "
                     f"{b.peak_phase})", hint)


def _lean_format(source: str, config: Any, methods: list[str], o: CompressOptions) -> str | None:
    """"int8" / "int4" when `source` may be loaded straight into its only method's format and
    come out with the float path's codes; None when the float32 model is needed.

    The loaders convert each block Linear with linear_in_format: int8 with a scale per row, int4
    in groups of choose_group_size(in, 128) -- the float path's codes when --group-size picks the
    same groups. A GGUF block weight already on the format's grid (Q4_1 for int4, Q8_0 for int8)
    is kept as it is; its values are exactly the float path's, so `_load_in_format` rounds it
    again to the requested layout: such layers never stop the lean path.
    """
    from memlm.loading import resolve
    from memlm.memory.estimate import block_linears

    if len(methods) != 1 or methods[0] not in ("int8", "int4"):
        return None
    fmt = methods[0]
    kind, path = resolve(source)
    if kind == "compressed":  # already in a format: loaded as it is
        return None
    if fmt == "int8" or all(choose_group_size(i, o.group_size) == choose_group_size(i, 128)
                            for i, _ in block_linears(config)):
        return fmt
    if kind == "gguf":
        from memlm.interop.gguf import _BLOCK_RE, _direct_scheme, iter_gguf_tensors

        weights = [t for t in iter_gguf_tensors(path) if _BLOCK_RE.match(t.name) and t.name.endswith(".weight")
                   and len(t.shape) == 2]
        if weights and all(_direct_scheme(t, fmt) == fmt for t in weights):
            return fmt
    return None


def _load_in_format(source: str, fmt: str, o: CompressOptions) -> tuple[nn.Module, Any]:
    """`source` loaded straight into `fmt` (memlm.loading.load_model), then brought to the state
    the float path reaches after round-to-nearest `fmt` -- the same tensors, bit for bit:
      - a layer kept on a GGUF file's grid (int4 g32 from Q4_1, int8 g32 from Q8_0) whose layout
        is not the requested one is rounded again, one layer at a time, from its values: they are
        the float path's float32 values exactly (d*q + m computed in float32 either way);
      - an embedding kept as int8 (a GGUF Q8_0 table) goes back to float32 (the float path keeps
        it float until --quantize-embedding rounds it per row).
    """
    from memlm.loading import load_model

    model, tokenizer = load_model(source, weight_format=fmt)
    with torch.no_grad():
        # the embedding first: estimate_compress's "load: float embedding" then "load: re-round"
        if isinstance(model.tok_emb, Int8Embedding):
            # _weight: nn.Embedding's own init, even on meta, costs ~1.3 bytes per value (67 MiB for SmolLM2)
            emb = nn.Embedding(model.tok_emb.num_embeddings, model.tok_emb.embedding_dim,
                               _weight=dequantize_weight(model.tok_emb))
            model.tok_emb = emb
            if isinstance(model.lm_head, Int8TiedHead):
                model.lm_head = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
                model.lm_head.weight = emb.weight
        if isinstance(model.lm_head, Int8Linear):  # an untied Q8_0 head
            head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False, device="meta")
            head.weight = nn.Parameter(dequantize_weight(model.lm_head))
            model.lm_head = head
        for name, m in list(model.named_modules()):
            if not name.startswith("blocks.") or not isinstance(m, (Int8Linear, GroupQuantLinear)):
                continue
            want = ({"kind": "int8"} if fmt == "int8" else
                    {"kind": "int4", "group_size": choose_group_size(m.in_features, o.group_size)})
            if m.spec() != want:
                state = quantize_weight(dequantize_weight(m), fmt, o.group_size)
                set_module(model, name, module_from_codes(fmt, state, m.bias, o.use_kernel))
                del state, m
                return_free_heap()  # this layer's float32 copy and old codes: glibc would keep the pages
            elif isinstance(m, GroupQuantLinear) and o.use_kernel is not None:
                m.set_kernel(o.use_kernel)
    return model, tokenizer


def compress_to_folder(source: str, out: str | Path, methods: list[str], options: CompressOptions | None = None,
                       console: Any = None, memory_budget: str | int | None = None,
                       plan: CompressPlan | None = None) -> CompressSummary:
    """Load `source` (a name or path, see memlm.load), compress it, save it with save_compressed.

    memory_budget: see `plan_compress` (DoesNotFit before anything is loaded or written).
    `plan`: one plan_compress already made (the CLI prints its prediction first).
    """
    from memlm.loading import load_model

    o = options or CompressOptions()
    o.validate()
    check_methods(methods)  # before loading: a typo should not cost a model load
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MemlmError(f"{out} exists and is not a folder", "pass a folder path with -o")
    plan = plan or plan_compress(source, methods, o, memory_budget)
    guard = plan.guard()
    _phase_done(guard, "start-up")
    if plan.load_format is not None:
        model, tokenizer = _load_in_format(source, plan.load_format, o)
    else:
        model, tokenizer = load_model(source)
    if tokenizer is None:
        raise MemlmError(f"model '{source}' has no tokenizer", "put a tokenizer.json beside the weights")
    _phase_done(guard, "model")
    summary = compress(model, tokenizer, methods, o, console, eval_before=plan.eval_before,
                       quantized_at_load=plan.load_format is not None, guard=guard)
    summary.notes += plan.notes
    save_compressed(model, tokenizer, out)
    summary.disk_before = source_disk_bytes(source)
    summary.disk_after = folder_bytes(out)
    summary.out = str(out)
    return summary
