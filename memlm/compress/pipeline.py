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
from memlm.compress.quantize import GROUP_SIZES, GroupQuantLinear, Int8Linear, quantize_embedding_int8, quantize_model
from memlm.compress.storage import folder_bytes, model_bytes, save_compressed
from memlm.errors import MemlmError

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
        if self.ppl_before is not None:
            table.add_row(f"perplexity ({self.eval_tokens:,} eval tokens)", f"{self.ppl_before:.3f}",
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
                    progress: bool = True) -> tuple[float, int]:
    """(perplexity, tokens scored) of `model` on `ids`, non-overlapping windows (W2)."""
    from rich.progress import Progress

    from memlm.eval.perplexity import perplexity, window_plan

    n = len(window_plan(len(ids), window))
    with Progress(console=console, transient=True, disable=console is None or not progress) as bar:
        task = bar.add_task("perplexity", total=n)
        result = perplexity(model, ids, window, on_window=lambda k: bar.advance(task, k))
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


def _apply(model: nn.Module, method: str, last: bool, o: CompressOptions, calib: list[torch.Tensor] | None) -> str:
    """Apply one method in place; returns a short description of what it did."""
    if method in ("int8", "int4", "int3"):
        quantize_model(model, method, o.group_size, progress=o.progress, use_kernel=o.use_kernel)
        return method if method == "int8" else f"{method} g{o.group_size}"
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
             console: Any = None) -> CompressSummary:
    """Compress `model` in place by `methods` (in order); returns what was done and measured.

    `tokenizer` encodes the calibration and evaluation text. `console` (rich) shows progress.
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

    summary = CompressSummary(
        methods=list(methods), steps=[], params_before=_count_params(model), params_after=0,
        memory_before=model_bytes(model), memory_after=0,
        predicted_before=predicted_generation_bytes(model, context), predicted_after=None, predict_context=context,
    )
    if eval_ids is not None:
        summary.ppl_before, summary.eval_tokens = eval_perplexity(model, eval_ids, window, console, o.progress)

    t0 = time.perf_counter()
    with torch.no_grad():
        for i, method in enumerate(methods):
            what = _apply(model, method, i == len(methods) - 1, o, calib)
            summary.steps.append({"method": method, "what": what})
        if o.quantize_embedding == "int8":
            quantize_embedding_int8(model)
            summary.steps.append({"method": "embedding", "what": "embedding int8"})
    summary.seconds = time.perf_counter() - t0
    if methods[-1] in QUANT_METHODS and any(m in ("prune", "prune24") for m in methods):
        summary.notes.append("the pruned zeros were quantized with the rest: the file holds no sparse layout")

    summary.params_after = _count_params(model)
    summary.memory_after = model_bytes(model)
    summary.predicted_after = predicted_generation_bytes(model, context)
    if eval_ids is not None:
        summary.ppl_after, _ = eval_perplexity(model, eval_ids, window, console, o.progress)
    return summary


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


def compress_to_folder(source: str, out: str | Path, methods: list[str], options: CompressOptions | None = None,
                       console: Any = None) -> CompressSummary:
    """Load `source` (a name or path, see memlm.load), compress it, save it with save_compressed."""
    from memlm.loading import load_model

    o = options or CompressOptions()
    o.validate()
    check_methods(methods)  # before loading: a typo should not cost a model load
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MemlmError(f"{out} exists and is not a folder", "pass a folder path with -o")
    model, tokenizer = load_model(source)
    if tokenizer is None:
        raise MemlmError(f"model '{source}' has no tokenizer", "put a tokenizer.json beside the weights")
    summary = compress(model, tokenizer, methods, o, console)
    save_compressed(model, tokenizer, out)
    summary.disk_before = source_disk_bytes(source)
    summary.disk_after = folder_bytes(out)
    summary.out = str(out)
    return summary
