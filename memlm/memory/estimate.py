"""Predict the peak memory of a training step or of generation, term by term.

Every number here is derived from the shapes in `ModelConfig` and the settings in `TrainConfig`
(the same two objects the model and the loop are built from) and from what the code really
allocates: the parameters of `memlm.model`, the tensors autograd saves for backward in
`Block.forward` (listed op by op in `block_activations`), the loss of `memlm.train.loss`, the
optimizers of `memlm.train.optim`, the static `KVCache`, the quantized layers of
`memlm.compress`. The one number that is not derived is the runtime overhead of the process
itself (torch's libraries, thread pools, kernel workspaces): it was MEASURED ONCE (see
`RUNTIME_BYTES`) and is added as it is, never scaled per configuration.

A step is modelled as a short timeline of phases (forward at the loss, loss backward, the
first block's backward, the end of backward, the optimizer step); each phase has its own set
of live tensors and the predicted peak is the largest phase. `docs/memory.md` explains every
formula; the formula of each term is also written beside it in the code and carried in the
`Breakdown` (so a table shows where each number comes from).

Symbols used in the formulas:
  N = B*T tokens of a micro-batch (B = micro_batch, T = seq_len), L = n_layer, d = n_embd,
  V = vocab_size, f = ffn_hidden, qd = n_head*head_dim, kvd = n_kv_heads*head_dim,
  nh = n_head, P = number of parameters, p = bytes per parameter (4 fp32, 2 bf16),
  a = bytes per activation of the matmuls (4 fp32, 2 under bf16 / bf16-autocast),
  r = bytes of the residual stream (2 under pure bf16, else 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from memlm.config import KERNEL_MAX_ROWS, PREFILL_CHUNK, ModelConfig, TrainConfig, cache_length
from memlm.errors import MemlmError
from memlm.memory.measure import program_start_rss_bytes

MiB = 2**20
GiB = 2**30

# ------------------------------------------------------------------------------ measured once

# The resident memory of a memlm process that holds no model, as a user's command has it: the
# Python interpreter, torch's shared libraries, typer/rich, the tokenizer and the data and,
# once a step has run, the pages of the kernels it touched, OpenMP/oneDNN thread state,
# autograd's engine and torch._dynamo (torch's optimizers import it on construction: ~70 MiB).
# Measured with `python bench/memory_accuracy.py --calibrate`: the real CLI in a fresh process,
# glibc's default allocator, torch's default thread count (2 here), the command's own VmHWM from
# start to exit (started through bench/launch.py: see there why a plain wait4 from a large parent
# reports the parent's peak), in a venv just built by `make install` (as CI and a new user have
# it), on the AMD EPYC (Zen 3, 2 cores) of shared/BENCHMARKS.md, 2026-12-02 (evening: a second
# machine of that kind, whose commands hold ~80 MiB less than the morning's, as they do at their
# start: see CALIBRATION_START_BYTES; the morning's figures were 436/455/336/356/348 MiB).
# An older venv of the same packages measured ~57 MiB less again: fewer pages of libtorch_cpu.so
# are mapped (69 MiB resident against 118 in a fresh venv, /proc/self/smaps), most likely the
# state of its pages in the page cache; the start moves with it.
#   train       `memlm train` of a ~10k-parameter model on the default corpus (its BPE
#               tokenizer trained in the run): every cost of the command except the model's
#   train-bf16  the same under bf16 autocast: the bf16 kernels bring their own code and scratch
#               (used for both bf16 precisions)
#   infer       `memlm generate` of a ~10k-parameter run folder, 32 new tokens
#   score       `memlm eval` of the same folder on the default eval split (the text read and
#               tokenized)
#   train-ddp, train-fsdp: "train" + what one rank of a 2-process job adds (gloo's threads and
#               buffers, FSDP's code), +2.3 / +5.7 MiB measured on 2026-11-23
#   serve       `memlm serve` of the ~4M-parameter tiny run under 8 concurrent completions, minus
#               what its prediction holds beyond the runtime: in the morning's fresh venv 348 MiB
#               (the row then measured 381.7 MiB against 377.9 predicted); "infer" + the same
#               web stack on this machine
# Another CPU's kernels touch other code pages: re-run --calibrate on a new kind of machine.
# CUDA: torch.cuda.max_memory_allocated (what PeakMemory reports there) does not see the
# CUDA context (300-600 MiB outside the allocator), so the overhead in allocator terms is 0;
# leave the context out of a GPU budget yourself. Not measured here (no GPU on the dev box).
RUNTIME_BYTES: dict[str, dict[str, int]] = {
    "cpu": {"train": 353 * MiB, "train-bf16": 365 * MiB, "infer": 269 * MiB, "score": 276 * MiB,
            "train-ddp": 355 * MiB, "train-fsdp": 359 * MiB,
            # memlm serve: infer + the web stack (FastAPI, uvicorn, pydantic, prometheus_client) and the
            # heaps of its threads (scheduler, event loop, tokenizing workers); see "serve" above
            "serve": 281 * MiB},
    "cuda": {"train": 0, "train-bf16": 0, "infer": 0, "score": 0, "train-ddp": 0, "train-fsdp": 0,
             "serve": 0},
}
RUNTIME_NOTE = "measured: bench/memory_accuracy.py --calibrate (the CLI, glibc defaults, 2 threads)"
# What the calibration's commands held as they started (memlm.cli.run: torch and memlm imported,
# nothing run). Another machine or venv maps another share of torch's libraries, at the start as
# later: the same commands measured ~80 MiB more on another machine of the same kind, and as much
# more at their start (the CI's machine starts ~60 MiB above this one). A command's runtime is the
# measured one moved by this machine's start's difference from this (`runtime_bytes`).
CALIBRATION_START_BYTES = 227 * MiB


def runtime_bytes(device: str, kind: str) -> int:
    """RUNTIME_BYTES[device][kind] on this machine: on a CPU, moved by how much more (or less) the
    memlm program holds at its start here than the calibration's commands did
    (memlm.memory.measure.program_start_rss_bytes: the program's own start, kept a while for the
    processes beside it)."""
    measured = RUNTIME_BYTES[device][kind]
    start = program_start_rss_bytes() if device == "cpu" else None
    if start is None:
        return measured
    return max(0, measured + start - CALIBRATION_START_BYTES)


# A compiled decode step (`--compile`): torch.compile's own memory in the process (dynamo,
# inductor, sympy, the FX graphs and the compiled block's code), the same whatever the model's
# size: `memlm generate --compile` minus the same command eager, SmolLM2 fp32 +150 MiB and int8
# (--memory-budget 600MiB) +164 MiB on 2026-12-01, warm inductor cache.
COMPILE_BYTES = {"cpu": 165 * MiB, "cuda": 0}

# glibc's heap (its default, dynamic mmap threshold) serves tensors up to 32 MiB from arenas that
# keep freed blocks for reuse: a step's transients are resident with their holes, and gradients
# and optimizer temporaries freed between steps stay in the heap. Fixing the mmap threshold low
# removes this slack but costs 50-60% of the step time on this machine (page faults on every
# fresh block; bench/memory_accuracy.py --allocator measures it), so memlm keeps glibc's defaults
# and models the slack: bytes = a * (a phase's transients) + b * (weights + optimizer states)
# (+ c * one block's activations under activation checkpointing: the recomputed forward's
# blocks come and go between the saved ones), fitted (`bench/fit_slack.py --floor -0.04`: the
# smallest max |error| with no row under-predicted by more than 4%, inside the planner's 6%
# margin, so a planned run finishes) to the 16 single-process training rows of
# bench/memory_accuracy.py, each the command's own peak (2026-12-02, AMD EPYC, an older venv: the
# slack is anonymous memory, the same in a fresh one; -3.7..+8.9%; the
# min-max fit without the floor, 0.26/0.16/0.6, spread -9.7..+9.7% and the watchdog stopped a
# planned run; bench/results/memory_accuracy-own-peak-*). Adapters on a frozen base
# ("finetune") are fitted apart (bench/fit_slack.py --adapters): the 7 single-process LoRA / QLoRA
# rows of bench/memory_accuracy.py (SmolLM2 and the GPT-2 shape, with and without checkpointing),
# with QUANTIZED_BASE_SLACK below, -1.1..+1.0% (2026-12-02 evening, this machine's fresh venv).
# Their heap keeps what a step's forward and backward leave between the small blocks that live
# on (autograd's graph, saved tensors): the loop trims the heap after every step
# (memlm.train.loop), checkpointing keeps no graph from its first forward (memlm.model.decoder.
# recomputed) and the adapters' gradients are one buffer (gradients_in_one_buffer); what is
# left is this slack.
# For inference a * (the forward's workspace) + b * (the KV cache). ALLOCATOR_SLACK and
# CHECKPOINT_SLACK below.
# A model's tokenizer in memory (the tokenizers library's vocabulary and merges maps; SmolLM2's
# 49,152 entries: ~17 MiB more than the calibration run's 4,096), and the first-use pages of a
# weight format's kernels (the int4 CPU kernel, int8's dequantizing matmul, bf16 matmuls) beyond
# the fp32 ones the "infer" runtime already holds: `memlm generate` on SmolLM2 in each format,
# minus its tensors, minus the runtime (bench/memory_accuracy.py --calibrate).
# The int4 figure is PyTorch's int4 kernel (its layout is held only where memlm's kernels were not
# built); with memlm's kernels `memlm generate` of SmolLM2 int4 under a 530MiB budget measured
# 468-473 MiB against 496 predicted with the term (2026-12-01), 480 without it.
TOKENIZER_BYTES_PER_ID = 400
FORMAT_KERNEL_BYTES = {"int4": 16 * MiB, "int8": 0, "bf16": 8 * MiB, "fp32": 0}

MMAP_THRESHOLD_MAX = 32 * MiB  # glibc, 64-bit: the dynamic mmap threshold never rises above this
ALLOCATOR_SLACK = {"train": (0.34, 0.24), "finetune": (0.62, 0.0), "infer": (0.40, 0.0)}
CHECKPOINT_SLACK = {"train": 0.8, "finetune": 2.4}
# Adapters on a quantized base, in blocks whose forward is kept for backward: the quantized
# layers' kernels (memlm.kernels: quantized activations in std::vectors, the float output) add
# heap the next blocks do not reuse, in proportion to the block's quantized outputs (N * out * 4
# summed over its layers): SmolLM2 and the GPT-2 shape with an int4 base, seq 256 x 2, both
# measured 0.44 of that per block above the rest of the fit (2026-12-02). The int8 kernels are
# taken to do the same (no row without checkpointing measured).
QUANTIZED_BASE_SLACK = 0.44
ALLOCATOR_NOTE = "glibc heap slack, calibrated: bench/memory_accuracy.py --calibrate"

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1}
WeightFormat = Literal["fp32", "bf16", "int8", "int4"]

# Constants of the code the estimate follows (kept in sync by tests/test_memory_estimate.py).
ADAMW8BIT_BLOCK = 256  # memlm.train.lowbit.BLOCK: values per fp32 absmax scale
ADAMW8BIT_MIN_NUMEL = 4096  # memlm.train.lowbit.MIN_QUANTIZED_NUMEL: smaller tensors keep fp32 states
ADAMW8BIT_SLICE = 1 << 20  # memlm.train.lowbit.SLICE: values decoded at once in a step
ADAMW8BIT_SCRATCH_PER_VALUE = 42  # bytes of fp32/int64 temporaries per decoded value (profiled)
INT4_GROUP_SIZES = (128, 64, 32)  # memlm.compress.quantize.GROUP_SIZES


def _mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


# ------------------------------------------------------------------------------ the result


@dataclass
class Term:
    """One named amount of memory at the peak moment, with the formula that gives it."""

    name: str
    bytes: int
    formula: str


@dataclass
class Breakdown:
    """Predicted peak memory as a sum of named terms (those live at the peak phase).

    `phases` holds the total of every phase of the timeline; the peak is the largest.
    """

    task: str  # "train" | "infer"
    device: str
    terms: list[Term]
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    phase_terms: dict[str, list[Term]] = field(default_factory=dict)  # every phase's own terms

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def __getitem__(self, name: str) -> int:
        """Bytes of the term `name` at the peak (0 when the term is absent)."""
        return sum(t.bytes for t in self.terms if t.name == name)

    def term(self, name: str, phase: str | None = None) -> int:
        """Bytes of term `name` in `phase` (default: the peak phase); 0 when absent."""
        terms = self.terms if phase is None else self.phase_terms[phase]
        return sum(t.bytes for t in terms if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "device": self.device,
            "total_bytes": self.total,
            "peak_phase": self.peak_phase,
            "terms": [{"name": t.name, "bytes": t.bytes, "formula": t.formula} for t in self.terms],
            "phases": dict(self.phases),
            "settings": dict(self.settings),
            "notes": list(self.notes),
        }

    def table(self, title: str | None = None):
        """A rich Table: one row per term, its share of the peak, and its formula."""
        from rich.table import Table

        from memlm.memory.measure import format_bytes

        table = Table(title=title or f"predicted peak memory ({self.task}, {self.device}): phase '{self.peak_phase}'")
        table.add_column("term")
        table.add_column("bytes", justify="right")
        table.add_column("share", justify="right")
        table.add_column("formula", overflow="fold")
        total = max(self.total, 1)
        for t in self.terms:
            table.add_row(t.name, format_bytes(t.bytes), f"{100 * t.bytes / total:.0f}%", t.formula)
        table.add_row("[bold]total[/]", f"[bold]{format_bytes(self.total)}[/]", "100%", "")
        return table

    def __rich__(self):
        return self.table()


# ------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class ParamShape:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:  # weight decay and Adafactor's factoring go by dim >= 2
        return len(self.shape) >= 2


def param_shapes(cfg: ModelConfig) -> list[ParamShape]:
    """Every parameter of `memlm.model.build_model(cfg)`, in `named_parameters()` order (tied once)."""
    if cfg.kind == "rnn":
        return _rnn_param_shapes(cfg)
    if cfg.kind == "conv":
        return _conv_param_shapes(cfg)
    if cfg.kind == "encdec":
        return _encdec_param_shapes(cfg)
    d = cfg.n_embd
    out = [ParamShape("tok_emb.weight", (cfg.vocab_size, d))]
    if cfg.positions == "learned":
        out.append(ParamShape("pos_emb.weight", (cfg.block_size, d)))
    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        out += _norm_shapes(cfg, f"{p}.attn_norm") + _attention_shapes(cfg, f"{p}.attn")
        out += _norm_shapes(cfg, f"{p}.mlp_norm") + _mlp_shapes(cfg, f"{p}.mlp")
    out += _norm_shapes(cfg, "norm")
    if not cfg.tied_embeddings:
        out.append(ParamShape("lm_head.weight", (cfg.vocab_size, d)))
    return out


def _norm_shapes(cfg: ModelConfig, prefix: str) -> list[ParamShape]:
    shapes = [ParamShape(f"{prefix}.weight", (cfg.n_embd,))]
    if cfg.norm == "layernorm" and cfg.bias:
        shapes.append(ParamShape(f"{prefix}.bias", (cfg.n_embd,)))
    return shapes


def _linear_shapes(cfg: ModelConfig, prefix: str, n_in: int, n_out: int) -> list[ParamShape]:
    shapes = [ParamShape(f"{prefix}.weight", (n_out, n_in))]
    if cfg.bias:
        shapes.append(ParamShape(f"{prefix}.bias", (n_out,)))
    return shapes


def _attention_shapes(cfg: ModelConfig, prefix: str) -> list[ParamShape]:
    """q/k/v/o of memlm.model.layers.Attention (CrossAttention has the same)."""
    d, qd, kvd = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return (_linear_shapes(cfg, f"{prefix}.q_proj", d, qd) + _linear_shapes(cfg, f"{prefix}.k_proj", d, kvd)
            + _linear_shapes(cfg, f"{prefix}.v_proj", d, kvd) + _linear_shapes(cfg, f"{prefix}.o_proj", qd, d))


def _mlp_shapes(cfg: ModelConfig, prefix: str) -> list[ParamShape]:
    d, f = cfg.n_embd, cfg.ffn_hidden
    gate = _linear_shapes(cfg, f"{prefix}.gate_proj", d, f) if cfg.mlp == "swiglu" else []
    return gate + _linear_shapes(cfg, f"{prefix}.up_proj", d, f) + _linear_shapes(cfg, f"{prefix}.down_proj", f, d)


def _encdec_param_shapes(cfg: ModelConfig) -> list[ParamShape]:
    """memlm.model.encdec: the shared embedding, a position table per stack (learned), BART's
    embedding norms (post-norm), the encoder's and decoder's layers, the final norms (pre-norm)."""
    d, post = cfg.n_embd, cfg.norm_placement == "post"
    out = [ParamShape("tok_emb.weight", (cfg.vocab_size, d))]
    if cfg.positions == "learned":
        out += [ParamShape("enc_pos_emb.weight", (cfg.block_size, d)), ParamShape("dec_pos_emb.weight", (cfg.block_size, d))]
    if post:
        out += _norm_shapes(cfg, "enc_emb_norm") + _norm_shapes(cfg, "dec_emb_norm")
    for i in range(cfg.n_encoder_layer):
        p = f"encoder.{i}"
        out += _norm_shapes(cfg, f"{p}.attn_norm") + _attention_shapes(cfg, f"{p}.attn")
        out += _norm_shapes(cfg, f"{p}.mlp_norm") + _mlp_shapes(cfg, f"{p}.mlp")
    for i in range(cfg.n_layer):
        p = f"decoder.{i}"
        out += _norm_shapes(cfg, f"{p}.attn_norm") + _attention_shapes(cfg, f"{p}.attn")
        out += _norm_shapes(cfg, f"{p}.cross_norm") + _attention_shapes(cfg, f"{p}.cross_attn")
        out += _norm_shapes(cfg, f"{p}.mlp_norm") + _mlp_shapes(cfg, f"{p}.mlp")
    if not post:
        out += _norm_shapes(cfg, "enc_norm") + _norm_shapes(cfg, "dec_norm")
    if not cfg.tied_embeddings:
        out.append(ParamShape("lm_head.weight", (cfg.vocab_size, d)))
    return out


def _ends(cfg: ModelConfig, layers: list[ParamShape]) -> list[ParamShape]:
    """Embedding, the layers, the final norm and an untied head: every light kind's frame."""
    head = [] if cfg.tied_embeddings else [ParamShape("lm_head.weight", (cfg.vocab_size, cfg.n_embd))]
    return [ParamShape("tok_emb.weight", (cfg.vocab_size, cfg.n_embd)), *layers, *_norm_shapes(cfg, "norm"), *head]


def rnn_gates(cfg: ModelConfig) -> int:
    """Gate blocks of a recurrent cell: GRU 3 (reset, update, new), LSTM 4 (input, forget, cell, output)."""
    return 3 if cfg.rnn_cell == "gru" else 4


def _rnn_param_shapes(cfg: ModelConfig) -> list[ParamShape]:
    """memlm.model.rnn: per layer nn.GRU/LSTM weights (g*d, d) for input and hidden, biases (g*d,) each."""
    d, gd = cfg.n_embd, rnn_gates(cfg) * cfg.n_embd
    layers = []
    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        layers += [ParamShape(f"{p}.weight_ih_l0", (gd, d)), ParamShape(f"{p}.weight_hh_l0", (gd, d))]
        if cfg.bias:
            layers += [ParamShape(f"{p}.bias_ih_l0", (gd,)), ParamShape(f"{p}.bias_hh_l0", (gd,))]
    return _ends(cfg, layers)


def conv_spans(cfg: ModelConfig) -> list[int]:
    """Inputs each conv block's convolution reads (its rolling buffer when decoding): (k-1)*2**i + 1."""
    return [(cfg.conv_kernel - 1) * 2**i + 1 for i in range(cfg.n_layer)]


def _conv_param_shapes(cfg: ModelConfig) -> list[ParamShape]:
    """memlm.model.conv: per block a norm, the depthwise kernel (d, 1, k) and its bias, a norm, the MLP."""
    d = cfg.n_embd
    layers = []
    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        layers += _norm_shapes(cfg, f"{p}.conv_norm") + [ParamShape(f"{p}.conv.conv.weight", (d, 1, cfg.conv_kernel))]
        if cfg.bias:
            layers.append(ParamShape(f"{p}.conv.conv.bias", (d,)))
        layers += _norm_shapes(cfg, f"{p}.mlp_norm") + _mlp_shapes(cfg, f"{p}.mlp")
    return _ends(cfg, layers)


def block_linears(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every Linear in one block (what weight-only quantization converts; an RNN
    layer's two gate matrices, which bf16 autocast copies like Linears)."""
    d, f, hd = cfg.n_embd, cfg.ffn_hidden, cfg.head_dim
    mlp = [(d, f), (d, f), (f, d)] if cfg.mlp == "swiglu" else [(d, f), (f, d)]
    if cfg.kind == "rnn":
        return [(d, rnn_gates(cfg) * d)] * 2
    if cfg.kind == "conv":
        return mlp
    qd, kvd = cfg.n_head * hd, cfg.n_kv_heads * hd
    return [(d, qd), (d, kvd), (d, kvd), (qd, d)] + mlp


# ------------------------------------------------------------------------------ optimizer states


def optimizer_state_bytes(shape: ParamShape, optimizer: str) -> int:
    """Bytes of the optimizer state of one fp32 parameter after its first step (exact).

    adamw      exp_avg + exp_avg_sq: 2 * n * 4, plus the step counter (a 0-d fp32 tensor: 4)
    adamw8bit  n >= 4096: int8 m + uint8 sqrt(v): 2 * n, plus 2 * ceil(n / 256) fp32 scales,
               plus step; smaller tensors: as adamw
    adafactor  matrix (R, C): row factor R * 4 + column factor C * 4 (+ step);
               vector: full second moment n * 4 (+ step)
    sgd        momentum buffer n * 4
    """
    n = shape.numel
    if optimizer == "adamw":
        return 2 * n * 4 + 4
    if optimizer == "adamw8bit":
        if n < ADAMW8BIT_MIN_NUMEL:
            return 2 * n * 4 + 4
        return 2 * n + 2 * math.ceil(n / ADAMW8BIT_BLOCK) * 4 + 4
    if optimizer == "adafactor":
        if shape.is_matrix:
            rows = math.prod(shape.shape[:-1])
            cols = math.prod(shape.shape[:-2]) * shape.shape[-1]
            return (rows + cols) * 4 + 4
        return n * 4 + 4
    if optimizer == "sgd":
        return n * 4
    raise MemlmError(f"unknown optimizer '{optimizer}'", "choose one of: adamw, adamw8bit, adafactor, sgd")


OPTIMIZER_FORMULAS = {
    "adamw": "2 fp32 moments: 8*P (+4 B step per tensor)",
    "adamw8bit": "int8 m + uint8 sqrt(v): 2*P + 2*4*ceil(n/256) scales per tensor (tensors < 4096 values: 8*n)",
    "adafactor": "matrices: 4*(rows+cols) factored 2nd moment; vectors: 4*n (+4 B step)",
    "sgd": "momentum: 4*P",
}


def optimizer_step_workspace(shapes: list[ParamShape], optimizer: str, device: str, precision: str,
                             stochastic_rounding: bool = True, per_param: bool = False) -> tuple[int, str]:
    """Temporaries of one optimizer step at its worst moment, and the formula.

    On CPU torch's optimizers run their single-tensor path (foreach kernels are CUDA-only), so
    the temporaries are those of the LARGEST parameter n_max:
      adamw      denom = (exp_avg_sq.sqrt() / bias_correction).add_(eps): 2 * n_max * 4
      adafactor  var_estimate = row_var @ col_var, the full matrix: n_max * 4
      sgd        grad.add(param, alpha=weight_decay): n_max * 4 (decayed tensors)
      adamw8bit  decodes at most 2^20 values at a time: 42 B per value of fp32/int64 scratch
    CUDA: fused AdamW has none; foreach SGD/Adafactor take the whole decayed group at once.
    Pure bf16 (and fused backward) step each weight on an fp32 copy that exists only during its
    own step (memlm.train.optim.PerParamOptimizer): + 4*n (weight) + 4*n (grad) for bf16, and
    stochastic rounding needs ~17*n of int32/bf16/bool scratch (noise, rounded bits, the bf16 result,
    isfinite's temporaries) after the inner step has freed its own.
    """
    if not shapes:
        return 0, "0"
    n_max = max(s.numel for s in shapes)
    decayed = [s for s in shapes if s.is_matrix]
    n_max_decayed = max((s.numel for s in decayed), default=0)
    cuda_foreach = device == "cuda" and not per_param
    if optimizer == "adamw":
        inner = 0 if device == "cuda" else 2 * n_max * 4
        formula = "0 (fused)" if device == "cuda" else "2*4*n_max"
    elif optimizer == "adafactor":
        inner = (sum(s.numel for s in decayed) if cuda_foreach else n_max_decayed) * 4
        formula = "4*sum(decayed n)" if cuda_foreach else "4*n_max"
    elif optimizer == "sgd":
        inner = (sum(s.numel for s in decayed) if cuda_foreach else n_max_decayed) * 4
        formula = "4*sum(decayed n)" if cuda_foreach else "4*n_max"
    elif optimizer == "adamw8bit":
        inner = min(n_max, ADAMW8BIT_SLICE) * ADAMW8BIT_SCRATCH_PER_VALUE
        formula = f"{ADAMW8BIT_SCRATCH_PER_VALUE}*min(n_max, 2^20)"
    else:
        raise MemlmError(f"unknown optimizer '{optimizer}'")
    if precision == "bf16":
        rounding = 17 * n_max if stochastic_rounding else 0
        return 8 * n_max + max(inner, rounding), f"8*n_max (fp32 copies) + max({formula}, 17*n_max rounding)"
    return inner, formula.replace("n_max", f"n_max({n_max:,})")


# ------------------------------------------------------------------------------ activations


@dataclass(frozen=True)
class Saved:
    """A tensor autograd keeps for backward (or the loop keeps alive), in bytes."""

    what: str
    bytes: int
    formula: str


def _dtypes(precision: str) -> tuple[int, int, int]:
    """(a, r, stats): bytes of matmul activations, of the residual stream, of norm statistics."""
    if precision == "bf16":
        return 2, 2, 2
    if precision == "bf16-autocast":
        return 2, 4, 4
    return 4, 4, 4


def _attention_math_path(cfg: ModelConfig, training: bool) -> bool:
    """SDPA on CPU takes the flash kernel (saves q, k, v, out, logsumexp) unless dropout is on,
    which only the math path does: it materialises the (T, T) attention weights."""
    return training and cfg.dropout > 0


def _saved_norm(cfg: ModelConfig, name: str, N: int, precision: str, consumers: int) -> list[Saved]:
    """What a norm saves (and, for `consumers` Linears reading it, its output; 0: none reads it)."""
    d = cfg.n_embd
    a, r, st = _dtypes(precision)
    out = []
    if cfg.norm == "rmsnorm":
        # composite on CPU: x.pow(2) saves x, x * rstd saves x and rstd, (x * rstd) * w saves
        # x * rstd; it computes in fp32 whatever the input (a bf16 input is upcast first)
        out.append(Saved(f"{name}: input (fp32)", N * d * 4, "N*d*4"))
        out.append(Saved(f"{name}: x*rstd (fp32)", N * d * 4, "N*d*4"))
        out.append(Saved(f"{name}: rstd", N * 4, "N*4"))
    else:  # native_layer_norm saves input, mean, rstd
        out.append(Saved(f"{name}: input", N * d * r, "N*d*r"))
        out.append(Saved(f"{name}: mean + rstd", 2 * N * st, "2*N*s"))
    if not consumers:
        return out
    if precision == "bf16-autocast":  # each Linear saves its own bf16 cast of the (fp32) norm output
        out.append(Saved(f"{name}: output, one bf16 cast per Linear", consumers * N * d * 2, f"{consumers}*N*d*2"))
    else:  # one tensor, shared by the Linears that read it
        out.append(Saved(f"{name}: output (Linear input)", N * d * a, "N*d*a"))
    return out


def _saved_mlp(cfg: ModelConfig, N: int, a: int) -> Saved:
    if cfg.mlp == "swiglu":
        # silu saves gate_proj's output; the product saves silu's output and up_proj's output;
        # down_proj saves the product
        return Saved("swiglu: gate, silu(gate), up, product", 4 * N * cfg.ffn_hidden * a, "4*N*f*a")
    return Saved("gelu: input and output", 2 * N * cfg.ffn_hidden * a, "2*N*f*a")  # up's output, gelu's


def _rnn_block_activations(cfg: ModelConfig, B: int, T: int, precision: str) -> list[Saved]:
    """One nn.GRU / nn.LSTM layer over (B, T, d) on CPU (oneDNN's kernel), measured with
    saved_tensors_hooks: a GRU keeps its input, output and gate workspace, 8*N*d values; an
    LSTM 18*N*d (its workspace, input, output) + its initial and final h, c: 4*B*d."""
    N, d = B * T, cfg.n_embd
    a = _dtypes(precision)[0]
    out = [Saved("gru: input, output, gates workspace", 8 * N * d * a, "8*N*d*a") if cfg.rnn_cell == "gru" else
           Saved("lstm: input, output, gates workspace, h and c", 18 * N * d * a + 4 * B * d * a, "18*N*d*a + 4*B*d*a")]
    if cfg.dropout > 0:
        out.append(Saved("dropout mask after the layer", N * d * a, "N*d*a"))
    return out


def _conv_block_activations(cfg: ModelConfig, B: int, T: int, precision: str) -> list[Saved]:
    """One memlm.model.conv.ConvBlock: the conv's norm (its output goes to the padding, which
    saves nothing), the left-padded input the convolution saves (B, d, T + (k-1)*2**i),
    averaged over the blocks' dilations, then the MLP's norm and the MLP, as in a decoder."""
    N, d, L = B * T, cfg.n_embd, cfg.n_layer
    a = _dtypes(precision)[0]
    mean_pad = (cfg.conv_kernel - 1) * (2**L - 1) // L  # sum of the blocks' paddings / L
    out = _saved_norm(cfg, "conv_norm", N, precision, consumers=0)
    out.append(Saved("conv: padded input", B * d * (T + mean_pad) * a, f"B*d*(T + {mean_pad} mean padding)*a"))
    if cfg.dropout > 0:
        out.append(Saved("conv residual dropout mask", N * d * a, "N*d*a"))
    out += _saved_norm(cfg, "mlp_norm", N, precision, consumers=2 if cfg.mlp == "swiglu" else 1)
    out.append(_saved_mlp(cfg, N, a))
    if cfg.dropout > 0:
        out.append(Saved("mlp residual dropout mask", N * d * a, "N*d*a"))
    return out


def _encdec_block_activations(cfg: ModelConfig, B: int, T: int, precision: str) -> list[Saved]:
    """An encoder-decoder counted as its n_layer decoder layers, each carrying its share of the
    encoder's (sources as long as targets, T: the loop cuts both to seq_len). A layer saves what
    a decoder block saves (an encoder layer too), plus, in the decoder, the cross-attention's norm,
    its queries, the memory's keys and values, its output and logsumexp."""
    N, nh = B * T, cfg.n_head
    qd, kvd = cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    a = _dtypes(precision)[0]
    layer = block_activations(replace(cfg, kind="decoder", norm_placement="pre"), B, T, precision)
    share = cfg.n_encoder_layer / cfg.n_layer
    cross = _saved_norm(cfg, "cross_norm", N, precision, consumers=1)
    cross.append(Saved("cross-attention: q, memory k and v, output, logsumexp",
                       2 * N * qd * a + 2 * N * kvd * a + B * nh * T * 4, "2*N*qd*a + 2*N*kvd*a + B*nh*T*4"))
    encoder = Saved(f"encoder layers ({share:g} per decoder layer), each as a block",
                    int(share * sum(s.bytes for s in layer)), f"{share:g}*A_block")
    return [*layer, *cross, encoder]


def block_activations(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "fp32") -> list[Saved]:
    """What autograd saves in one block's forward (training mode), op by op.

    Found by walking the autograd graph of a real block (each node's `_saved_*` tensors,
    deduplicated by storage); tests/test_memory_estimate.py checks the sum against
    saved_tensors_hooks for several flavours. Parameters and the RoPE tables are not counted:
    they exist anyway.
    """
    if cfg.kind == "rnn":
        return _rnn_block_activations(cfg, batch, seq_len, precision)
    if cfg.kind == "conv":
        return _conv_block_activations(cfg, batch, seq_len, precision)
    if cfg.kind == "encdec":
        return _encdec_block_activations(cfg, batch, seq_len, precision)
    B, T, d, nh = batch, seq_len, cfg.n_embd, cfg.n_head
    qd, kvd = cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    N = B * T
    a, r, st = _dtypes(precision)
    out: list[Saved] = []

    def norm(name: str, consumers: int) -> None:
        out.extend(_saved_norm(cfg, name, N, precision, consumers))

    norm("attn_norm", 3)
    if _attention_math_path(cfg, training=True):
        # math SDPA: q*scale, k and v (repeated to nh heads under GQA), softmax weights, the
        # dropout mask and the dropped weights (B, nh, T, T each); output copied for o_proj
        # (on CPU the math path upcasts bf16 inputs and computes in fp32: m = 4 whatever the
        # precision; its output is cast back, so o_proj saves it in the activation dtype)
        kv_width = qd if cfg.n_kv_heads != cfg.n_head else kvd
        m = 4
        out.append(Saved("sdpa(math): q*scale", N * qd * m, "N*qd*m"))
        out.append(Saved("sdpa(math): k, v", 2 * N * kv_width * m, "2*N*kvd*m (qd under GQA)"))
        out.append(Saved("sdpa(math): softmax, dropout mask, dropped weights", 3 * B * nh * T * T * m,
                         "3*B*nh*T^2*m"))
        out.append(Saved("o_proj input (attention output)", N * qd * a, "N*qd*a"))
    else:
        # flash SDPA saves q, k, v (after RoPE: new tensors; else views of the projections),
        # its output (which o_proj reads: same storage) and the logsumexp (fp32)
        out.append(Saved("q (after RoPE)" if cfg.positions == "rope" else "q", N * qd * a, "N*qd*a"))
        out.append(Saved("k, v", 2 * N * kvd * a, "2*N*kvd*a"))
        out.append(Saved("sdpa output = o_proj input", N * qd * a, "N*qd*a"))
        out.append(Saved("sdpa logsumexp", B * nh * T * 4, "B*nh*T*4"))
    if cfg.dropout > 0:
        out.append(Saved("attn residual dropout mask", N * d * a, "N*d*a"))
    norm("mlp_norm", 2 if cfg.mlp == "swiglu" else 1)
    out.append(_saved_mlp(cfg, N, a))
    if cfg.dropout > 0:
        out.append(Saved("mlp residual dropout mask", N * d * a, "N*d*a"))
    return out


def block_linear_params(cfg: ModelConfig) -> int:
    return sum(i * o for i, o in block_linears(cfg))


def outside_activations(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "fp32",
                        loss_chunk: int = 0) -> list[Saved]:
    """Saved outside the blocks: token ids, embedding dropout mask, the final norm, the head's
    input (full loss only: the chunked loss saves its own gradients instead), the batch."""
    N, d = batch * seq_len, cfg.n_embd
    a, r, st = _dtypes(precision)
    out = [Saved("batch: inputs (= the embedding's saved ids) and targets, int64", 2 * N * 8, "2*N*8")]
    if cfg.dropout > 0:
        out.append(Saved("embedding dropout mask", N * d * r, "N*d*r"))
    if cfg.norm == "rmsnorm":
        out.append(Saved("final norm: input, x*rstd (fp32), rstd", N * d * 8 + N * 4, "N*d*8 + N*4"))
    else:
        out.append(Saved("final norm: input, mean + rstd", N * d * r + 2 * N * st, "N*d*r + 2*N*s"))
    if loss_chunk <= 0:
        out.append(Saved("lm_head input", N * d * a, "N*d*a"))
    return out


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "fp32",
                     checkpoint_every: int = 0, loss_chunk: int = 0) -> int:
    """Bytes autograd keeps at the end of forward (what tests compare with saved_tensors_hooks).

    Without checkpointing: L * block + outside. With checkpointing every k-th block (blocks
    i % k == 0, as Decoder does): those blocks keep only their input (N*d*r), the others all.
    """
    per_block = sum(s.bytes for s in block_activations(cfg, batch, seq_len, precision))
    n_ckpt = checkpointed_blocks(cfg.n_layer, checkpoint_every)
    _, r, _ = _dtypes(precision)
    kept = n_ckpt * batch * seq_len * cfg.n_embd * r + (cfg.n_layer - n_ckpt) * per_block
    return kept + sum(s.bytes for s in outside_activations(cfg, batch, seq_len, precision, loss_chunk))


def checkpointed_blocks(n_layer: int, every: int) -> int:
    """How many blocks Decoder recomputes: those with index i % every == 0."""
    return 0 if every <= 0 else len(range(0, n_layer, every))


def autocast_weight_copy_bytes(cfg: ModelConfig, loss_chunk: int = 0, checkpoint_every: int = 0) -> int:
    """bf16 copies of weights that bf16 autocast saves for backward: 2 bytes per weight of every
    block Linear (not of recomputed blocks, whose saved tensors are dropped) and of lm_head
    (full loss only: the chunked loss casts the head itself, inside its forward)."""
    n_ckpt = checkpointed_blocks(cfg.n_layer, checkpoint_every)
    head = cfg.vocab_size * cfg.n_embd * 2 if loss_chunk <= 0 else 0
    return (cfg.n_layer - n_ckpt) * block_linear_params(cfg) * 2 + head


def saved_for_backward_bytes(model_cfg: ModelConfig, train_cfg: TrainConfig) -> int:
    """Bytes autograd (and the loss) hold at the end of forward, as saved_tensors_hooks sees them:
    the activations, the bf16 weight copies of autocast, and what the loss saves
    (full: log_softmax's output N*V*4; chunked: its gradients N*d + V*d)."""
    B, T = train_cfg.micro_batch, train_cfg.seq_len or model_cfg.block_size
    prec = train_cfg.precision
    p = 2 if prec == "bf16" else 4
    total = activation_bytes(model_cfg, B, T, prec, train_cfg.activation_checkpointing, train_cfg.loss_chunk)
    if prec == "bf16-autocast":
        total += autocast_weight_copy_bytes(model_cfg, train_cfg.loss_chunk, train_cfg.activation_checkpointing)
    return total + _loss_terms(model_cfg, B * T, prec, train_cfg.loss_chunk, p)["held"][0]


def buffer_bytes(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    """The model's non-trained tables: RoPE cos + sin (2*block_size*head_dim) or the sinusoidal
    table (block_size*d); fp32 (training keeps them fp32 under pure bf16 too)."""
    if cfg.positions == "rope":
        return 2 * cfg.block_size * cfg.head_dim * dtype_bytes
    if cfg.positions == "sinusoidal":
        return cfg.block_size * cfg.n_embd * dtype_bytes
    return 0


# ------------------------------------------------------------------------------ training


def _loss_terms(cfg: ModelConfig, N: int, precision: str, loss_chunk: int, p: int,
                head_trainable: bool = True, one_buffer: bool = False) -> dict[str, tuple[int, str]]:
    """Memory of the head + loss over N scored tokens in three moments: 'fwd' (peak inside the
    loss), 'held' (kept from the end of forward into backward), 'bwd' (peak of the loss's
    backward). A frozen head (fine-tuning adapters) makes no weight gradient in the chunked
    loss. `one_buffer`: the fp32 full loss of memlm.train.loss.linear_cross_entropy."""
    V, d = cfg.vocab_size, cfg.n_embd
    a, r, _ = _dtypes(precision)
    if loss_chunk <= 0 and one_buffer:
        # one (N, V) fp32 buffer: the logits, then exp(logits - max) in place, saved; backward
        # reads it into the (N, d) sides of the head's matmuls: e @ W, W[targets], h / sums
        return {
            "fwd": (N * V * 4, "N*V*4 (one buffer: logits, then their exponentials)"),
            "held": (N * V * 4, "N*V*4 (the exponentials, saved)"),
            "bwd": (N * V * 4 + 3 * N * d * 4, "N*V*4 saved + 3*N*d*4 (e@W, W[t], h/sums)"),
        }
    if loss_chunk <= 0:
        # logits (N, V) in the matmul dtype, an fp32 copy when that is bf16 (.float()),
        # log_softmax's output (fp32, saved); backward: nll's grad, log_softmax's grad, both fp32
        logits = N * V * a + (N * V * 4 if a != 4 else 0)
        fwd = logits + N * V * 4
        return {
            "fwd": (fwd, f"N*V*{fwd // (N * V)} (logits{' + fp32 copy' if a != 4 else ''} + log_softmax)"),
            "held": (N * V * 4, "N*V*4 (log_softmax output, saved)"),
            "bwd": (3 * N * V * 4, "N*V*12 (saved log_softmax + its grad in + grad out, fp32)"),
        }
    c = min(loss_chunk, N)
    # memlm.train.loss: grad_h (N, d) and an fp32 grad_w (V, d) are written during forward.
    # Inside one chunk, on top of its fp32 logits (c, V), the largest of:
    #   logsumexp's own (c, V) fp32 temporary;
    #   the matmul's bf16 result before .float() (bf16 matmuls only);
    #   bf16 d_logits + the (V, d) product d_logits.T @ h (bf16, then its fp32 copy).
    h_bytes = r if precision != "bf16-autocast" else 4  # grad_h is like h (fp32 under autocast)
    bf16_mm = a == 2
    w_cast = V * d * 2 if precision == "bf16-autocast" else 0  # weight.to(bf16) for the matmuls
    logits = c * V * 4
    inner = max(c * V * 4, c * V * 2 if bf16_mm else 0,
                (c * V * 2 + V * d * 2 + V * d * 4) if bf16_mm else V * d * 4)
    if not head_trainable:  # grad_h alone: no (V, d) accumulator, no chunk product
        held = N * d * h_bytes
        fwd = held + w_cast + logits + max(c * V * 4, c * V * 2 if bf16_mm else 0)
        return {"fwd": (fwd, f"N*d*{h_bytes} grad_h + c*V*4 logits + c*V*4 logsumexp (frozen head, c={c})"),
                "held": (held, f"N*d*{h_bytes} (saved gradient)"),
                "bwd": (2 * held, f"2*N*d*{h_bytes} (saved and scaled gradient)")}
    fwd = N * d * h_bytes + V * d * 4 + w_cast + logits + inner
    held = N * d * h_bytes + V * d * p  # saved: grad_h, grad_w in the weight's dtype
    if p != 4:
        fwd = max(fwd, N * d * h_bytes + V * d * 4 + V * d * p)  # the final cast of grad_w
    return {
        "fwd": (fwd, f"N*d*{h_bytes} grad_h + V*d*4 grad_w + c*V*4 logits + max(c*V*4 logsumexp, "
                     f"V*d*{6 if bf16_mm else 4} chunk grad_w{' + c*V*2' if bf16_mm else ''})"
                     f"{' + V*d*2 weight cast' if w_cast else ''} (c={c})"),
        "held": (held, f"N*d*{h_bytes} + V*d*{p} (saved gradients)"),
        "bwd": (2 * held, f"2*(N*d*{h_bytes} + V*d*{p}) (saved and scaled gradients)"),
    }


def _train_settings(model_cfg: ModelConfig, cfg: TrainConfig) -> dict[str, Any]:
    seq_len = cfg.seq_len or model_cfg.block_size
    return {
        "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum, "seq_len": seq_len,
        "precision": cfg.precision, "optimizer": cfg.optimizer, "fused_backward": cfg.fused_backward,
        "activation_checkpointing": cfg.activation_checkpointing, "loss_chunk": cfg.loss_chunk,
    }


def estimate_training(model_cfg: ModelConfig, train_cfg: TrainConfig, device: str = "cpu",
                      world_size: int = 1, strategy: str | None = None, teacher_bytes: int = 0,
                      frozen: FrozenBase | None = None, scored_tokens: int | None = None) -> Breakdown:
    """Peak memory of one process of a training step (steady state: the optimizer has its state).

    `strategy` defaults to train_cfg.strategy; it only matters when world_size > 1.
    train_cfg.micro_batch is the global micro-batch, split evenly over the processes (as the loop does).
    `teacher_bytes`: distillation (memlm.train.distill) from a frozen teacher holding that many
    bytes of weights; the loss is then the distillation loss over full logits (no chunking).
    `frozen`: only adapters are trained on a frozen base (LoRA / QLoRA: see `estimate_finetune`).
    `scored_tokens`: at most that many of a process's N tokens have a target (a fine-tune's
    answers): the head and the loss run over those rows only (memlm.train.loop.scored_rows).
    """
    cfg, mc = train_cfg, model_cfg
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    strategy = strategy or cfg.strategy
    world = max(1, int(world_size))
    B = max(1, cfg.micro_batch // world)  # micro_batch is global: each process takes its share
    T = cfg.seq_len or mc.block_size
    N, L, d, V = B * T, mc.n_layer, mc.n_embd, mc.vocab_size
    precision = cfg.precision
    p = 2 if precision == "bf16" else 4
    a, r, _ = _dtypes(precision)
    shapes = param_shapes(mc) if frozen is None else frozen.trainable  # what the optimizer steps
    P = sum(s.numel for s in shapes)
    fsdp = world > 1 and strategy == "fsdp"
    ddp = world > 1 and not fsdp
    shard = world if fsdp else 1

    # -- persistent: weights (+ the position tables, fp32 buffers), optimizer states, runtime
    runtime = runtime_bytes(device, "train" if precision == "fp32" else "train-bf16")
    if world > 1:  # the process group (and FSDP's code): measured once, like the rest
        runtime += RUNTIME_BYTES[device][f"train-{strategy}"] - RUNTIME_BYTES[device]["train"]
    weights = P * p // shard + buffer_bytes(mc) + (frozen.base_bytes if frozen is not None else 0)
    states = sum(optimizer_state_bytes(s, cfg.optimizer) for s in shapes) // shard
    grads = P * p // shard
    block_params = sum(s.numel for s in shapes if s.name.startswith("blocks.0."))
    root_params = P - L * block_params  # outside the blocks: embeddings, final norm (FSDP's root)
    # The head's weight gradient (tied: summed with the embedding's at the end of backward). Under
    # FSDP it belongs to the root, whose gradients stay unsharded until its reduce-scatter, the
    # last of the step: full size, not / world.
    head_grad = V * d * p if frozen is None else 0  # a frozen head has no weight gradient
    ddp_buckets = P * p if ddp else 0
    gathered_root, gathered_block = root_params * p, block_params * p  # FSDP: one group unsharded

    # -- activations
    per_block = sum(s.bytes for s in block_activations(mc, B, T, precision)) if frozen is None else frozen.per_block
    outside_bytes = (sum(s.bytes for s in outside_activations(mc, B, T, precision, cfg.loss_chunk))
                     if frozen is None else frozen.outside)
    Ns = N if scored_tokens is None else max(1, min(N, scored_tokens))  # the rows the head and loss run on
    if frozen is None and cfg.loss_chunk <= 0:  # the head's input: the scored rows' copy, not all N
        outside_bytes -= (N - Ns) * d * a
    n_ckpt = checkpointed_blocks(L, cfg.activation_checkpointing)
    if frozen is None:
        kept = activation_bytes(mc, B, T, precision, cfg.activation_checkpointing, cfg.loss_chunk) - outside_bytes
    else:  # a checkpointed block keeps its input (block 0's, the frozen embedding's output, needs no grad)
        kept = n_ckpt * N * d * r + (L - n_ckpt) * per_block - (0 if n_ckpt else per_block - frozen.first_block)
    recompute = per_block if n_ckpt else 0  # backward recomputes ONE checkpointed block at a time
    act_formula = (f"{L}*A_block({_mib(per_block)}) + outside({_mib(outside_bytes)})" if not n_ckpt else
                   f"{n_ckpt} ckpt inputs*N*d*r + {L - n_ckpt}*A_block({_mib(per_block)}) + outside")
    # bf16 autocast keeps a bf16 copy of every Linear weight it used (its cast cache) until it
    # exits; the copies saved for backward live on (those of recomputed blocks are made again)
    autocast_copies = autocast_weight_copy_bytes(mc, cfg.loss_chunk, 0) if precision == "bf16-autocast" else 0
    autocast_bwd = 0
    if precision == "bf16-autocast":
        autocast_bwd = (autocast_weight_copy_bytes(mc, cfg.loss_chunk, cfg.activation_checkpointing)
                        + (block_linear_params(mc) * 2 if n_ckpt else 0))

    loss = _loss_terms(mc, Ns, precision, cfg.loss_chunk, p, head_trainable=frozen is None,
                       one_buffer=precision == "fp32" and not fsdp)
    if teacher_bytes:
        # memlm.train.distill.distillation_loss over (N, V) fp32: the teacher's logits, the
        # student's, s/T and t/T, both log_softmaxes, the KL's elementwise terms and the
        # cross-entropy's own log_softmax at the forward's peak; the student's logits, its two
        # saved log_softmaxes and the teacher's (referenced by the graph) held into backward
        NV4 = N * V * 4
        loss = {"fwd": (7 * NV4, "7*N*V*4 (teacher + student logits, /T copies, log_softmaxes, KL terms; measured)"),
                "held": (4 * NV4, "4*N*V*4 (student logits, 2 saved log_softmax, teacher logits)"),
                "bwd": (6 * NV4, "6*N*V*4 (held + their gradients)")}

    # -- transients of one block (not saved; they come and go inside an op sequence)
    f, qd = mc.ffn_hidden, mc.n_head * mc.head_dim
    kvd = mc.n_kv_heads * mc.head_dim
    # Backward through one block, net of the saved tensors each node releases once it has run:
    # swiglu's product backward makes grad(silu) and grad(up) while grad(product) is alive, after
    # down_proj released the product: +2*N*f; gelu's backward: +1*N*f. Attention: o_proj's
    # grad (N*qd) + SDPA's grad q, k, v + its fp32 accumulator (N*qd*4). Plus the residual's
    # incoming gradient and the one being summed (2*N*d*r).
    mlp_k = 2 if mc.mlp == "swiglu" else 1
    mlp_bwd = mlp_k * N * f * a
    attn_bwd = N * (2 * qd + 2 * kvd) * a + N * qd * 4
    block_bwd = max(mlp_bwd, attn_bwd) + 2 * N * d * r
    block_bwd_formula = f"max({mlp_k}*N*f*a, N*(2qd+2kvd)*a + N*qd*4) + 2*N*d*r"
    if mc.kind == "rnn":  # the gates' gradients for every step at once, and the input's
        g = rnn_gates(mc)
        block_bwd = (2 * g + 1) * N * d * a + 2 * N * d * r
        block_bwd_formula = f"{2 * g + 1}*N*d*a (gate gradients, input and hidden) + 2*N*d*r"
    elif mc.kind == "conv":  # the MLP's as above, or the convolution's padded input gradient
        pad = conv_spans(mc)[-1] - 1
        block_bwd = max(mlp_bwd, 2 * B * d * (T + pad) * a) + 2 * N * d * r
        block_bwd_formula = f"max({mlp_k}*N*f*a, 2*B*d*(T+{pad})*a) + 2*N*d*r"

    per_param = cfg.fused_backward or precision == "bf16"
    opt_ws, opt_ws_formula = optimizer_step_workspace(shapes, cfg.optimizer, device, precision,
                                                      cfg.stochastic_rounding, per_param)
    opt_ws //= 1 if not fsdp else world
    # accumulation: FSDP reduce-scatters every micro-batch (sharded grads are held); DDP skips its
    # all-reduce (no_sync) and the grads accumulate outside its buckets until the last micro-batch
    held_grads = grads if (cfg.grad_accum > 1 and not cfg.fused_backward) else 0
    fused = cfg.fused_backward and world == 1  # refused with several processes (check_config)

    base = {
        "runtime": (runtime, RUNTIME_NOTE),
        "weights": (weights, (f"{frozen.base_formula} + adapters " if frozen is not None else "")
                    + f"P({P:,})*{p}" + (f"/{shard}" if shard > 1 else "")
                    + (" + position tables" if buffer_bytes(mc) else "")),
        "optimizer_states": (states, OPTIMIZER_FORMULAS[cfg.optimizer] + (f" /{shard}" if shard > 1 else "")),
    }
    if teacher_bytes:
        base["teacher"] = (teacher_bytes, "the frozen teacher's weights, as loaded")
    if ddp_buckets:
        # DDP (gradient_as_bucket_view): flat buckets of every gradient, allocated by DDP and
        # kept after zero_grad(set_to_none=True); the gradients are views into them. They are
        # resident from the step after DDP rebuilds its buckets (step 2) on.
        base["sharding_buffers"] = (ddp_buckets, f"P*{p} DDP gradient buckets (the grads are views into them)")
    if held_grads:
        base["gradients"] = (held_grads, f"P*{p} (accumulated over {cfg.grad_accum} micro-batches)")

    def phase(**terms: tuple[int, str]) -> dict[str, tuple[int, str]]:
        merged = dict(base)
        for k, v in terms.items():
            if v[0] > 0:
                merged[k] = v
        return merged

    act_all = (kept + outside_bytes, act_formula)
    phases: dict[str, dict[str, tuple[int, str]]] = {}
    phases["forward: loss"] = phase(
        activations=act_all,
        autocast_weight_copies=(autocast_copies, "2*L*P_linear_block + 2*V*d (bf16 cast cache)"),
        logits_loss=loss["fwd"],
    )
    # adapters in one process on a CPU: their gradients are one buffer made before backward
    # (memlm.train.loop.gradients_in_one_buffer), alive through all of it
    grads_before = (frozen is not None and device == "cpu" and world == 1 and not cfg.fused_backward
                    and not held_grads)
    before_f = f"P*{p} (the adapters' gradients: one buffer, made before backward)"
    phases["backward: loss"] = phase(
        activations=act_all,
        autocast_weight_copies=(autocast_bwd, "bf16 copies still saved for backward"),
        logits_loss=loss["bwd"],
        gradients=(grads, before_f) if grads_before else (0, ""),
    )
    # FSDP2 all-gathers one parameter group at a time (the root module: embeddings and final
    # norm; each block) into a flat buffer and copies each parameter out of it: 2*size while
    # that happens; the flat buffer is held until the next group's all-gather. The root is
    # resharded when its forward returns (the loss itself runs on sharded weights) and gathered
    # again when the logits' gradient reaches it, until the end of backward.
    root_f = "P_root*p"
    if fsdp and cfg.loss_chunk <= 0:  # inside the root's forward, at the head's matmul
        phases["forward: head"] = phase(
            activations=act_all,
            autocast_weight_copies=(autocast_copies, "2*L*P_linear_block + 2*V*d (bf16 cast cache)"),
            logits_loss=(Ns * V * a, "logits N*V*a"),
            sharding_buffers=(gathered_root, f"{root_f} (root params gathered)"),
        )
    if fsdp:
        phases["backward: root all-gather"] = phase(
            activations=act_all,
            autocast_weight_copies=(autocast_bwd, "bf16 copies still saved for backward"),
            logits_loss=(Ns * V * 4, "the logits' gradient N*V*4") if cfg.loss_chunk <= 0 else loss["held"],
            sharding_buffers=(2 * gathered_root, f"2*{root_f} (flat all-gather output + the params copied out)"),
        )
    # Gradients during backward. The head's weight gradient comes first (tied: it waits in
    # autograd's input buffer until the embedding's backward adds its own, at the very end).
    tied_extra = head_grad if mc.tied_embeddings else 0
    if fused:  # each gradient is stepped and freed at once; the tied head's waits for the embedding
        grads_first = (tied_extra, "tied head grad V*d*p, waiting for the embedding's")
        grads_end = (head_grad, "the embedding's grad V*d*p")
    elif fsdp:
        # a block's gradients are reduce-scattered when its backward is done (then 1/W of them
        # stays); the root's stay unsharded until its own reduce-scatter, the last of the step
        sharded = grads if held_grads else L * block_params * p // world
        sharded_f = f"P*{p}/{world} (held)" if held_grads else f"L*P_block*{p}/{world} (blocks, reduce-scattered)"
        grads_first = ((grads if held_grads else 0) + head_grad,
                       (f"P*{p}/{world} held + " if held_grads else "") + "head weight grad V*d*p (unsharded)")
        grads_end = (sharded + root_params * p + 2 * tied_extra,
                     f"{sharded_f} + root grads unsharded {root_f}"
                     + (" + 2*V*d*p (head and embedding grads next to their sum)" if tied_extra else ""))
    elif held_grads:
        grads_first = (grads + head_grad, f"P*{p} accumulated + the new head grad V*d*p")
        grads_end = (grads + head_grad + 2 * tied_extra, f"P*{p} + new embedding grad (+ tied: head grad, sum)")
    else:
        # tied: the head's grad and the embedding's dense grad are summed out of place: for a
        # moment both exist next to their sum (which becomes the weight's .grad, inside P*p)
        grads_first = (head_grad, "head weight grad V*d*p")
        grads_end = (grads + 2 * tied_extra, f"P*{p}" + (" + 2*V*d*p (head and embedding grads, summed)"
                                                        if tied_extra else ""))
    if grads_before:
        grads_first = grads_end = (grads, before_f)
    if ddp and not held_grads:
        # DDP's reducer copies each fresh gradient into its bucket, then makes .grad a view of
        # it: the buckets (sharding_buffers) are the gradients; on top, the gradient being copied
        # (tied: the head's and the embedding's next to their sum, itself a fresh tensor)
        grads_first = (head_grad, "head weight grad V*d*p (before its copy into a bucket)")
        grads_end = ((3 if tied_extra else 1) * head_grad,
                     "3*V*d*p (head and embedding grads + their sum, before its copy into a bucket)" if tied_extra
                     else "the embedding's grad V*d*p (before its copy into a bucket)")
    block_sharding = {}
    if fsdp:
        block_sharding = {"sharding_buffers": (gathered_root + 3 * gathered_block,
                                               f"{root_f} + 3*P_block*p (this block, the prefetched next one "
                                               "and its all-gather buffer)")}
    last_block_ckpt = n_ckpt > 0 and (L - 1) % max(cfg.activation_checkpointing, 1) == 0
    # freed before the blocks' backward: the head's input (full loss) and the final norm's saved
    head_input = (sum(x.bytes for x in outside_activations(mc, B, T, precision, cfg.loss_chunk)
                      if x.what.startswith(("final norm", "lm_head input")))
                  - (N - Ns) * d * a * (cfg.loss_chunk <= 0)) if frozen is None else frozen.head_input
    phases["backward: last block"] = phase(
        activations=(kept + outside_bytes - head_input + (recompute if last_block_ckpt else 0),
                     act_formula + (" + 1 recomputed block" if last_block_ckpt else "")),
        autocast_weight_copies=(autocast_bwd, "bf16 copies still saved for backward"),
        gradients=grads_first,
        workspace=(block_bwd + (opt_ws if fused and not mc.tied_embeddings else 0),
                   block_bwd_formula + (" + head's optimizer step" if fused and not mc.tied_embeddings else "")),
        **block_sharding,
    )
    if n_ckpt and not last_block_ckpt:  # the first checkpointed block met going backward
        phases["backward: recomputed block"] = phase(
            activations=(kept + outside_bytes - head_input + recompute, act_formula + " + 1 recomputed block"),
            autocast_weight_copies=(autocast_bwd, "bf16 copies still saved for backward"),
            gradients=grads_first,
            workspace=(block_bwd, block_bwd_formula),
            **block_sharding,
        )
    # fused: the embedding's grad is stepped at the very end; before that (tied) the head's and
    # the embedding's grads are summed out of place, two more V*d*p next to the sum
    phases["backward: end"] = phase(
        gradients=grads_end,
        workspace=(max(opt_ws, 2 * tied_extra) if fused else 0,
                   f"max({opt_ws_formula}, 2*V*d*p tied grads being summed)" if fused else ""),
        sharding_buffers=(gathered_root + gathered_block,
                          f"{root_f} + P_block*p (the last block's reduce-scatter input, held until the next)")
        if fsdp else (0, ""),
    )
    if fsdp:  # the root resharded, its gradients reduce-scattered from a flat copy
        phases["backward: root reduce-scatter"] = phase(
            gradients=(sharded + root_params * p, f"{sharded_f} + root grads {root_f}"),
            sharding_buffers=(root_params * p + root_params * p // world,
                              f"{root_f} + {root_f}/{world} (reduce-scatter input and output)"),
        )
    if not fused:
        phases["optimizer step"] = phase(
            gradients=(0, "") if ddp else (grads, f"P*{p}" + (f"/{shard}" if shard > 1 else "")),
            workspace=(opt_ws, opt_ws_formula + (f"/{shard}" if shard > 1 else "")),
        )
    if device == "cpu":  # glibc's heap holds more than the live tensors: see ALLOCATOR_SLACK
        kind = "train" if frozen is None else "finetune"  # adapters on a frozen base: fitted apart
        a_unit, a_state = ALLOCATOR_SLACK[kind]
        recomputing = CHECKPOINT_SLACK[kind] * per_block if n_ckpt else 0
        # a quantized base's kernels, in the blocks whose forward is kept (see QUANTIZED_BASE_SLACK)
        kernels = int(QUANTIZED_BASE_SLACK * (L - n_ckpt) * frozen.quantized_outputs) if frozen is not None else 0
        # the unchunked loss's (N, V) fp32 tensors above glibc's largest mmap threshold are mmapped
        # and unmapped when freed: no holes left in the heap (measured: tiny at micro-batch 16,
        # N*V*4 = 64 MiB, keeps ~80 MiB of slack where 0.46*(its transients) said ~250)
        mmapped = ("logits_loss",) if cfg.loss_chunk <= 0 and Ns * V * 4 > MMAP_THRESHOLD_MAX else ()
        for terms in phases.values():
            unit = sum(v[0] for k, v in terms.items()
                       if k not in ("runtime", "weights", "optimizer_states", "teacher", *mmapped))
            # a frozen base is allocated once, when loaded: no freed gradients or updates around it
            state = weights + states - (frozen.base_bytes if frozen is not None else 0)
            terms["allocator"] = (int(a_unit * unit + a_state * state + recomputing + kernels),
                                  f"{a_unit}*(this phase's transients) + {a_state}*(weights + states)"
                                  + (f" + {CHECKPOINT_SLACK[kind]}*A_block (recomputation)" if n_ckpt else "")
                                  + (f" + {QUANTIZED_BASE_SLACK}*{L - n_ckpt}*(a block's quantized outputs)"
                                     if kernels else "")
                                  + f" ({ALLOCATOR_NOTE})")
    totals = {name: sum(v[0] for v in terms.values()) for name, terms in phases.items()}
    peak_phase = max(totals, key=lambda k: totals[k])
    phase_terms = {name: [Term(k, int(v[0]), v[1]) for k, v in terms.items()] for name, terms in phases.items()}
    notes = []
    if world > 1:
        notes.append(f"{strategy} over {world} processes: per-process memory")
    return Breakdown("train", device, phase_terms[peak_phase], peak_phase, totals,
                     {**_train_settings(mc, cfg), "world_size": world, "strategy": strategy}, notes, phase_terms)


# ------------------------------------------------------------------------------ fine-tuning


@dataclass(frozen=True)
class FrozenBase:
    """Adapters trained on a frozen base (LoRA / QLoRA), as `estimate_training` takes it."""

    base_bytes: int  # the frozen weights as they are stored
    base_formula: str
    trainable: list[ParamShape]  # the adapters' parameters: what gets gradients and optimizer states
    per_block: int  # what autograd saves in a block whose input needs a gradient
    first_block: int  # ... in block 0, whose input (the frozen embedding's output) needs none
    outside: int  # saved outside the blocks
    head_input: int  # the part of `outside` freed before the blocks' backward
    quantized_outputs: int = 0  # the outputs of one block's quantized layers (0 for a float base)


def lora_shapes(cfg: ModelConfig, r: int, targets: tuple[str, ...]) -> list[ParamShape]:
    """lora_A (r, in) and lora_B (out, r) of every targeted block Linear (memlm.adapters.lora)."""
    names = _linear_names(cfg)
    out = []
    for i in range(cfg.n_layer):
        for name, (n_in, n_out) in names.items():
            if "all-linear" in targets or name in targets:
                out += [ParamShape(f"blocks.{i}.{name}.lora_A.weight", (r, n_in)),
                        ParamShape(f"blocks.{i}.{name}.lora_B.weight", (n_out, r))]
    return out


def _linear_names(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """{short name: (in, out)} of one block's Linears, as memlm.model.layers names them."""
    d, f, hd = cfg.n_embd, cfg.ffn_hidden, cfg.head_dim
    qd, kvd = cfg.n_head * hd, cfg.n_kv_heads * hd
    names = {"q_proj": (d, qd), "k_proj": (d, kvd), "v_proj": (d, kvd), "o_proj": (qd, d)}
    if cfg.mlp == "swiglu":
        names["gate_proj"] = (d, f)
    return {**names, "up_proj": (d, f), "down_proj": (f, d)}


def lora_block_activations(cfg: ModelConfig, batch: int, seq_len: int, r: int, targets: tuple[str, ...],
                           first: bool = False) -> list[Saved]:
    """What autograd saves in one Block.forward when only LoRA adapters train (fp32).

    Follows which tensors need a gradient: the block's input does (except in block 0, whose
    input is the frozen embedding's output: `first`), and so does every adapter's output and
    whatever is computed from one. Then, op by op: a frozen Linear saves nothing (its weight
    needs no gradient, so its input is not kept, and the gradient it passes back is computed
    from the weight itself); an adapter keeps its input (for lora_A's gradient; shared by the
    adapters reading one tensor) and its rank-r hidden state; a frozen RMSNorm keeps its input
    and rstd (LayerNorm: input, mean, rstd) when its input needs a gradient; attention keeps q,
    k, v, its output and logsumexp when any of q, k, v needs one; silu keeps its input, the
    product each factor the other's gradient needs, gelu its input. Checked against
    saved_tensors_hooks in tests/test_finetune_memory.py.
    """
    B, T, d, f, nh = batch, seq_len, cfg.n_embd, cfg.ffn_hidden, cfg.n_head
    qd, kvd = cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    N = B * T
    adapted = lambda name: "all-linear" in targets or name in targets  # noqa: E731
    out: list[Saved] = []

    def norm(name: str, needs_grad: bool) -> None:
        if not needs_grad:
            return
        if cfg.norm == "rmsnorm":
            out.append(Saved(f"{name}: input, rstd", N * d * 4 + N * 4, "N*d*4 + N*4"))
        else:
            out.append(Saved(f"{name}: input, mean + rstd", N * d * 4 + 2 * N * 4, "N*d*4 + 2*N*4"))

    def adapters(what: str, names: tuple[str, ...], width: int) -> None:
        """The adapters among `names` reading one tensor of `width` features."""
        n = sum(map(adapted, names))
        if n:
            out.append(Saved(f"{what} (the adapters' input)", N * width * 4, f"N*{width}*4"))
            out.append(Saved(f"{'/'.join(x for x in names if adapted(x))} hidden states", n * N * r * 4,
                             f"{n}*N*r*4"))

    x_grad = not first
    norm("attn_norm", x_grad)
    adapters("attn_norm output", ("q_proj", "k_proj", "v_proj"), d)
    if x_grad or any(map(adapted, ("q_proj", "k_proj", "v_proj"))):
        out.append(Saved("q (after RoPE)" if cfg.positions == "rope" else "q", N * qd * 4, "N*qd*4"))
        out.append(Saved("k, v", 2 * N * kvd * 4, "2*N*kvd*4"))
        out.append(Saved("sdpa output", N * qd * 4, "N*qd*4"))
        out.append(Saved("sdpa logsumexp", B * nh * T * 4, "B*nh*T*4"))
        attn_grad = True
    else:
        attn_grad = False
        adapters("sdpa output", ("o_proj",), qd)
    h_grad = x_grad or attn_grad or adapted("o_proj")
    if attn_grad and adapted("o_proj"):  # its input is the sdpa output, saved already
        out.append(Saved("o_proj hidden state", N * r * 4, "N*r*4"))
    norm("mlp_norm", h_grad)
    if cfg.mlp == "swiglu":
        adapters("mlp_norm output", ("gate_proj", "up_proj"), d)
        g_grad, u_grad = h_grad or adapted("gate_proj"), h_grad or adapted("up_proj")
        kept = [("gate", g_grad), ("silu(gate)", u_grad), ("up", g_grad)]  # silu's input; each factor
        n = sum(k for _, k in kept)
        if n:
            out.append(Saved("swiglu: " + ", ".join(w for w, k in kept if k), n * N * f * 4, f"{n}*N*f*4"))
    else:
        adapters("mlp_norm output", ("up_proj",), d)
        if h_grad or adapted("up_proj"):
            out.append(Saved("gelu: input", N * f * 4, "N*f*4"))
    adapters("down_proj's input", ("down_proj",), f)
    return out


def frozen_base(cfg: ModelConfig, batch: int, seq_len: int, r: int, targets: tuple[str, ...],
                base_format: str = "fp32", group_size: int | None = None, loss_chunk: int = 0,
                scored_tokens: int | None = None) -> FrozenBase:
    """The terms of a LoRA / QLoRA fine-tune: the base's block Linears in `base_format` (its
    embedding and norms fp32: memlm.finetune keeps a float head), the adapters in fp32; the
    head's input is the copy of the `scored_tokens` rows with a target."""
    N, d = batch * seq_len, cfg.n_embd
    Ns = N if scored_tokens is None else max(1, min(N, scored_tokens))
    per_block = sum(s.bytes for s in lora_block_activations(cfg, batch, seq_len, r, targets))
    first = sum(s.bytes for s in lora_block_activations(cfg, batch, seq_len, r, targets, first=True))
    # the final norm (frozen) keeps its input and rstd; the loss keeps the head's input (full loss)
    final = N * d * 4 + (N * 4 if cfg.norm == "rmsnorm" else 2 * N * 4)
    head_input = final + (Ns * d * 4 if loss_chunk <= 0 else 0)
    quantized = sum(n_out for _, n_out in _linear_names(cfg).values()) * N * 4 if base_format in ("int8", "int4") else 0
    return FrozenBase(
        quantized_outputs=quantized,
        base_bytes=inference_weight_bytes(cfg, base_format, group_size=group_size) - buffer_bytes(cfg),
        base_formula=f"frozen base ({base_format}" + (f" g{group_size}" if group_size else "") + ")",
        trainable=lora_shapes(cfg, r, targets), per_block=per_block, first_block=first,
        outside=2 * N * 8 + head_input, head_input=head_input)


def estimate_finetune(model_cfg: ModelConfig, train_cfg: TrainConfig, device: str = "cpu",
                      lora_r: int | None = None, lora_targets: tuple[str, ...] | None = None,
                      base_format: str = "fp32", group_size: int | None = None, world_size: int = 1,
                      answer_tokens: tuple[int, ...] | None = None) -> Breakdown:
    """Peak memory of a `memlm finetune` step: LoRA / QLoRA (`lora_r`: adapters of rank r on
    `lora_targets`, on a frozen base stored in `base_format`) or, lora_r None, a full fine-tune
    (estimate_training's). Both add what a pretrained model brings to the process beyond its
    tensors: its tokenizer and the base format's kernels (as in inference). With world_size
    processes (DDP, or FSDP for a full fine-tune) it is one process's peak: each holds the whole
    frozen base and takes its share of the global micro-batch. `answer_tokens`: the examples'
    scored (answer) token counts, largest first; a micro-batch's loss runs over at most the sum
    of the largest B of them (None: every token is scored, as in classification's head)."""
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    world = max(1, int(world_size))
    T = train_cfg.seq_len or model_cfg.block_size
    B = max(1, train_cfg.micro_batch // world)
    scored = None if not answer_tokens else sum(min(n, T) for n in answer_tokens[:B])
    frozen = None
    if lora_r is not None:
        frozen = frozen_base(model_cfg, B, T, lora_r, tuple(lora_targets or ("q_proj", "v_proj")), base_format,
                             group_size, train_cfg.loss_chunk, scored)
    b = estimate_training(model_cfg, train_cfg, device, world_size=world, frozen=frozen, scored_tokens=scored)
    extras = _inference_extras(model_cfg, base_format if lora_r is not None else "fp32", device)
    for terms in {id(t): t for t in [b.terms, *b.phase_terms.values()]}.values():  # the peak's list is one of them
        terms[1:1] = extras  # after the runtime
    b.phases = {k: v + sum(t.bytes for t in extras) for k, v in b.phases.items()}
    # The held-out evaluation (memlm.finetune.FineTune.evaluate): a no-grad forward of a
    # micro-batch, the fused head's (N, V) logits buffer at its end, beside the weights and states
    rows = -(-train_cfg.micro_batch // world)  # a rank scores every world-th row of a batch
    N = rows * T
    fwd, fwd_f = forward_transient(model_cfg, rows, T, base_format if lora_r is not None else "fp32")
    head = N * model_cfg.n_embd * 4 + N * model_cfg.vocab_size * 4
    work = max(fwd, head)
    kept = [t for t in b.phase_terms["optimizer step"] if t.name in ("runtime", "weights", "optimizer_states")]
    evaluation = kept[:1] + extras + kept[1:] + [
        Term("workspace", work, fwd_f if fwd >= head else "N*d*4 + N*V*4 (final norm, the head's logits buffer)")]
    if device == "cpu":
        a_work = ALLOCATOR_SLACK["infer"][0]
        evaluation.append(Term("allocator", int(a_work * work), f"{a_work}*workspace ({ALLOCATOR_NOTE})"))
    b.phase_terms["evaluation"] = evaluation
    b.phases["evaluation"] = sum(t.bytes for t in evaluation)
    peak = max(b.phases, key=lambda k: b.phases[k])
    b.peak_phase, b.terms = peak, b.phase_terms[peak]
    b.task = "finetune"
    b.settings.update(method="full" if lora_r is None else ("qlora" if base_format in ("int8", "int4") else "lora"),
                      lora_r=lora_r, lora_targets=",".join(lora_targets or ()) or None, base_format=base_format)
    return b


# ------------------------------------------------------------------------------ inference


def int4_group_size(in_features: int, requested: int = 128) -> int:
    """memlm.compress.quantize.choose_group_size: largest of 128/64/32 <= requested dividing in."""
    for g in INT4_GROUP_SIZES:
        if g <= requested and in_features % g == 0:
            return g
    raise MemlmError(f"int4 needs in_features divisible by 32, got {in_features}")


DEQUANT_CHUNK = 1 << 20  # weights dequantized at once (memlm.compress.quantize: DEQUANT/INT8_CHUNK_ELEMENTS)


def int4_uses_kernel(out_features: int, group: int) -> bool:
    """Whether memlm.compress's Int4Linear runs the CPU int4 kernel for this shape (when available)."""
    return out_features % 64 == 0 and group in (32, 64, 128)


def torch_int4_layout(int4_kernel: bool | None) -> bool:
    """int4_kernel as given, or (None) what int4 layers do on this machine by default: hold
    PyTorch's int4 kernel layout only where memlm's own kernels were not built."""
    if int4_kernel is not None:
        return int4_kernel
    from memlm.compress.quantize import torch_int4_layout_by_default

    return torch_int4_layout_by_default()


def memlm_kernels_built() -> bool:
    from memlm import kernels

    return kernels.available()


def inference_linears(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of the Linears of one block as inference runs them: q/k/v and gate/up fused
    (memlm.infer.engine.fuse_projections)."""
    d, f, hd = cfg.n_embd, cfg.ffn_hidden, cfg.head_dim
    qd, kvd = cfg.n_head * hd, cfg.n_kv_heads * hd
    mlp = [(d, 2 * f), (f, d)] if cfg.mlp == "swiglu" else [(d, f), (f, d)]
    return [(d, qd + 2 * kvd), (qd, d)] + mlp


def linear_weight_bytes(n_in: int, n_out: int, fmt: str, int4_kernel: bool | None = None,
                       group_size: int | None = None) -> int:
    """Stored bytes of one (n_out, n_in) Linear weight in `fmt` (bias not included).

    fp32 4*n, bf16 2*n; int8: n + 4*out (an fp32 scale per row), or with a group size g (a GGUF
    Q8_0 loaded as it is: g = 32) n + 4*out*in/g (an fp32 scale per group);
    int4: n/2 + (2+2)*out*in/g (fp16 scale and min per group of g inputs, g the largest of
    128/64/32 <= group_size (default 128) that divides in: choose_group_size; 32 for GGUF Q4_1);
    PyTorch's CPU int4 kernel also caches a bf16 (scale, zero) pair per group on first use:
    + 4*out*in/g, where its layout is used (int4_kernel; None: as on this machine, torch_int4_layout).
    """
    from memlm.compress.kinds import FORMAT_KINDS  # each layer kind's own formula

    if fmt not in ("fp32", "bf16", "int8", "int4"):
        raise MemlmError(f"unknown weight format '{fmt}'", "use fp32, bf16, int8 or int4")
    if fmt == "int4":
        g = int4_group_size(n_in, group_size or 128)
        return FORMAT_KINDS[fmt].weight_bytes(n_in, n_out, group_size=g, torch_int4_layout=(
            torch_int4_layout(int4_kernel) and int4_uses_kernel(n_out, g)))
    return FORMAT_KINDS[fmt].weight_bytes(n_in, n_out, DTYPE_BYTES[fmt], group_size)


def inference_weight_bytes(cfg: ModelConfig, weight_format: str = "fp32", quantize_embedding: bool = False,
                           int4_kernel: bool | None = None, group_size: int | None = None,
                           embedding_group_size: int | None = None) -> int:
    """Weights of a model for generation: block Linears in `weight_format` (`group_size` as in
    `linear_weight_bytes`); embeddings, norms and biases fp32 (bf16 for the bf16 format); the
    embedding (and head) int8 if asked: V*d + 4*V fp32 row scales, or + 4*V*d/g with a group
    size g (a GGUF Q8_0 table loaded as it is)."""
    other = 2 if weight_format == "bf16" else 4
    total = 0
    lin_shapes = {(i, o) for i, o in block_linears(cfg)}
    for s in param_shapes(cfg):
        if s.name.startswith("blocks.") and s.name.endswith("_proj.weight"):
            n_out, n_in = s.shape
            assert (n_in, n_out) in lin_shapes
            total += linear_weight_bytes(n_in, n_out, weight_format, int4_kernel, group_size)
        elif s.name in ("tok_emb.weight", "lm_head.weight") and quantize_embedding:
            rows, dim = s.shape
            total += s.numel + 4 * (rows if embedding_group_size is None else rows * (dim // embedding_group_size))
        else:
            total += s.numel * other
    return total + buffer_bytes(cfg, other)


def kv_cache_bytes(cfg: ModelConfig, batch: int, context: int, kv_dtype: str = "fp32") -> int:
    """KVCache: 2 (k, v) * L * B * n_kv_heads * max_len * head_dim * bytes."""
    return 2 * cfg.n_layer * batch * cfg.n_kv_heads * context * cfg.head_dim * DTYPE_BYTES[kv_dtype]


def decode_state(cfg: ModelConfig, batch: int, context: int, dtype: str = "fp32") -> tuple[int, str]:
    """What decoding carries from token to token, and its formula: a transformer's KV cache
    (grows with the context), an RNN's hidden states, a convolution's rolling buffers (fixed)."""
    b = DTYPE_BYTES[dtype]
    if cfg.kind == "rnn":
        per = 1 if cfg.rnn_cell == "gru" else 2  # h; LSTM: h and c
        return cfg.n_layer * batch * cfg.n_embd * per * b, f"L*B*d*{per}*{b} (hidden states, B={batch})"
    if cfg.kind == "conv":
        spans = sum(conv_spans(cfg))
        return (batch * spans * cfg.n_embd * b + 8 * batch,
                f"B*d*sum((k-1)*2^i + 1)({spans})*{b} rolling buffers + positions (B={batch})")
    kv = kv_cache_bytes(cfg, batch, context, dtype)
    if cfg.kind == "encdec":  # + each decoder layer's cross-attention keys and values of a source as long
        return 2 * kv, f"2*2*L*B*n_kv*ctx*hd*{b} (self-attention cache + cross keys/values, B={batch}, ctx={context})"
    return kv, f"2*L*B*n_kv*ctx*hd*{b} (B={batch}, ctx={context})"


def _light_forward_transient(cfg: ModelConfig, batch: int, tokens: int, a: int, prefill: bool) -> tuple[int, str]:
    """A no-grad forward of an RNN or conv model over `tokens` per sequence (StateEngine's prefill
    takes the whole prompt in one pass): the final norm and last logits, and
      rnn   a layer's input (packed copy), its g*d input projections for every step, its output: (g+3)*N*d*a
      conv  a block's input, its norm, the padded copy, the convolution's output (4*N*d*a + B*pad*d*a)
            or the MLP's (3*N*d*a + 3|2*N*f*a); a prefill also keeps every block's conv input, L*N*d*a."""
    N, d, f = batch * tokens, cfg.n_embd, cfg.ffn_hidden
    final = N * d * a + batch * cfg.vocab_size * 4
    if cfg.kind == "rnn":
        g = rnn_gates(cfg)
        return max((g + 3) * N * d * a, final), f"{g + 3}*N*d*a (input, gate projections, output), N={N}"
    pad = conv_spans(cfg)[-1] - 1
    mlp = 3 * N * d * a + (3 if cfg.mlp == "swiglu" else 2) * N * f * a
    block = max(4 * N * d * a + batch * pad * d * a, mlp)
    kept = cfg.n_layer * N * d * a if prefill else 0
    return max(block + kept, final), (f"max(conv 4*N*d*a + B*{pad}*d*a, mlp 3*N*d*a + k*N*f*a)"
                                      + (" + L*N*d*a (conv inputs kept)" if prefill else "") + f", N={N}")


def forward_transient(cfg: ModelConfig, batch: int, tokens: int, weight_format: str = "fp32",
                      int4_kernel: bool | None = None) -> tuple[int, str]:
    """Peak of the temporaries of a no-grad forward over `tokens` new tokens per sequence.

    Liveness in Block.forward: the caller's x, the residual after attention, the MLP's input
    norm, then swiglu's silu(gate), up and their product (gelu: up and gelu(up)):
      mlp  3*N*d*a + (3 swiglu | 2 gelu)*N*f*a
      attn 2*N*d*a + N*(2*qd + 2*kvd)*a + RoPE's rotate-half temporaries (3*N*qd*a)
    plus, for a quantized Linear: up to KERNEL_MAX_ROWS rows through memlm's kernels, the int8
    activation codes and the output (N*i + N*o*4); with PyTorch's int4 kernel layout, bf16
    copies of input and output; else the weight dequantized a slice at a time (int8: 4 bytes,
    int4: unpacked codes + fp32 dequantization, ~13 bytes per weight, of at most
    DEQUANT_CHUNK weights), over the fused inference shapes.
    """
    a = 2 if weight_format == "bf16" else 4
    if cfg.kind in ("rnn", "conv"):
        return _light_forward_transient(cfg, batch, tokens, a, prefill=tokens > 1)
    N, d, f = batch * tokens, cfg.n_embd, cfg.ffn_hidden
    qd, kvd = cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    mlp = 3 * N * d * a + (3 if cfg.mlp == "swiglu" else 2) * N * f * a
    rope = 3 * N * qd * a if cfg.positions == "rope" else 0
    attn = 2 * N * d * a + N * (2 * qd + 2 * kvd) * a + rope
    quant = 0
    lins = block_linears(cfg) + inference_linears(cfg)
    if weight_format in ("int8", "int4"):
        torch_layout = weight_format == "int4" and torch_int4_layout(int4_kernel)
        if torch_layout and all(int4_uses_kernel(o, int4_group_size(i)) for i, o in block_linears(cfg)):
            quant = max(N * i * 2 + N * o * 2 for i, o in lins)
        elif N <= KERNEL_MAX_ROWS and not torch_layout and memlm_kernels_built():
            quant = max(N * i + N * o * 4 for i, o in lins)
        else:  # int8: to fp32 (4 B); int4: unpack (1 B) + to fp32 + q*scale + min, ~13 B per weight
            per_weight = 4 if weight_format == "int8" else 13
            quant = max(per_weight * min(i * o, DEQUANT_CHUNK) for i, o in lins)
    final = N * d * a + batch * cfg.vocab_size * 4  # final norm over all positions, last logits
    peak = max(mlp, attn) + quant
    return max(peak, final), (f"max(mlp 3*N*d*a + {3 if cfg.mlp == 'swiglu' else 2}*N*f*a, "
                              f"attn 2*N*d*a + N*(2qd+2kvd)*a{' + 3*N*qd*a' if rope else ''})"
                              + (" + dequantized layer" if quant else "") + f", N={N}")


def estimate_inference(model_cfg: ModelConfig, batch: int = 1, context: int | None = None,
                       weight_format: str = "fp32", kv_dtype: str | None = None, prompt_len: int | None = None,
                       device: str = "cpu", quantize_embedding: bool = False, int4_kernel: bool | None = None,
                       group_size: int | None = None, embedding_group_size: int | None = None,
                       runtime: str = "infer", compile: bool = False) -> Breakdown:
    """Peak memory of generation: weights + KV cache for `batch` sequences of `context` tokens +
    the larger of the prefill and decode temporaries + the runtime ("infer": a command;
    "serve": memlm serve, see RUNTIME_BYTES) + the compiler's, with a compiled decode step.

    context: the cache's length (prompt + new tokens; default block_size). prompt_len: tokens
    prefilled at once (default: context // 2). kv_dtype: default like generate_ids: the
    weights' float dtype (bf16 for bf16 weights, else fp32). group_size, embedding_group_size:
    see `inference_weight_bytes` (None: what quantize_model gives).
    """
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    context = context or model_cfg.block_size
    light = model_cfg.fixed_state  # RNN / conv: their state does not grow with the context
    if context > model_cfg.block_size and not light:
        raise MemlmError(f"context {context} exceeds the model's block_size {model_cfg.block_size}")
    kv_dtype = kv_dtype or ("bf16" if weight_format == "bf16" else "fp32")
    prompt_len = prompt_len or max(1, context // 2)
    weights = inference_weight_bytes(model_cfg, weight_format, quantize_embedding, int4_kernel, group_size,
                                     embedding_group_size)
    # The engine rounds the cache up (cache_length) and prefills at most PREFILL_CHUNK tokens a
    # forward; the light kinds' StateEngine prefills a prompt in one pass.
    kv, kv_formula = decode_state(model_cfg, batch, context if light else cache_length(context, model_cfg.block_size),
                                  kv_dtype)
    whole_prompt = model_cfg.kind != "decoder"  # StateEngine's prefill: no chunks
    pre, pre_f = forward_transient(model_cfg, batch, min(prompt_len, context) if whole_prompt else
                                   min(prompt_len, context, PREFILL_CHUNK), weight_format, int4_kernel)
    dec, dec_f = forward_transient(model_cfg, batch, 1, weight_format, int4_kernel)
    base = [
        Term("runtime", runtime_bytes(device, runtime), RUNTIME_NOTE),
        Term("weights", weights, f"{weight_format}{'' if group_size is None else f' g{group_size}'} block Linears"
             + (", int8 embedding" + ("" if embedding_group_size is None else f" g{embedding_group_size}")
                if quantize_embedding else ", embeddings/norms "
                + ("bf16" if weight_format == "bf16" else "fp32"))),
        Term("kv_cache" if not light else "decode_state", kv, kv_formula),
        *_inference_extras(model_cfg, weight_format, device),
        *([Term("compiler", COMPILE_BYTES[device], "torch.compile in the process (measured)")] if compile else []),
    ]
    phases = {"prefill": sum(t.bytes for t in base) + pre, "decode": sum(t.bytes for t in base) + dec}
    peak_phase = "prefill" if pre >= dec else "decode"
    terms = base + [Term("workspace", max(pre, dec), pre_f if pre >= dec else dec_f)]
    if device == "cpu":
        a_work, a_kv = ALLOCATOR_SLACK["infer"]
        slack = int(a_work * max(pre, dec) + a_kv * kv)
        terms.append(Term("allocator", slack, f"{a_work}*workspace + {a_kv}*kv_cache ({ALLOCATOR_NOTE})"))
        phases = {k: v + slack for k, v in phases.items()}
    settings = {"batch": batch, "context": context, "weight_format": weight_format, "kv_dtype": kv_dtype,
                "prompt_len": prompt_len, "quantize_embedding": quantize_embedding}
    return Breakdown("infer", device, terms, peak_phase, phases, settings)


def _inference_extras(cfg: ModelConfig, weight_format: str, device: str) -> list[Term]:
    """What a model adds to an inference process beyond its tensors (CPU; measured, see
    TOKENIZER_BYTES_PER_ID and FORMAT_KERNEL_BYTES): its tokenizer, and the pages the first
    forward touches in the format's kernels."""
    if device != "cpu":
        return []
    out = [Term("tokenizer", TOKENIZER_BYTES_PER_ID * cfg.vocab_size,
                f"{TOKENIZER_BYTES_PER_ID} B per vocabulary entry (measured)")]
    kernel_pages = FORMAT_KERNEL_BYTES.get(weight_format, 0)
    if weight_format == "int4" and not torch_int4_layout(None):
        kernel_pages = 0  # memlm's own int4 kernels: a small library, already in the runtime's pages
    if kernel_pages:
        out.append(Term("kernels", kernel_pages, f"first use of the {weight_format} kernels (measured)"))
    return out


def estimate_scoring(model_cfg: ModelConfig, batch: int = 1, window: int | None = None, weight_format: str = "fp32",
                     device: str = "cpu", quantize_embedding: bool = False, int4_kernel: bool | None = None,
                     group_size: int | None = None, embedding_group_size: int | None = None) -> Breakdown:
    """Peak memory of perplexity scoring (memlm.eval.perplexity): no KV cache, but the logits of
    every position: batch windows of `window` tokens score N = batch*(window-1) positions.

    Peak: the larger of a block's forward temporaries and the head's moment: the final norm's
    output N*d*a, the logits N*V*a (+ an fp32 copy N*V*4 under bf16), cross-entropy's copy of
    the transposed logits N*V*4 and its log_softmax N*V*4.
    """
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    window = min(window or model_cfg.block_size, model_cfg.block_size)
    N, V, d = batch * max(window - 1, 1), model_cfg.vocab_size, model_cfg.n_embd
    a = 2 if weight_format == "bf16" else 4
    weights = inference_weight_bytes(model_cfg, weight_format, quantize_embedding, int4_kernel, group_size,
                                     embedding_group_size)
    blocks, blocks_f = forward_transient(model_cfg, batch, max(window - 1, 1), weight_format, int4_kernel)
    # logits, their fp32 copy under bf16, the contiguous (B, V, T) copy cross_entropy makes of
    # the transposed logits, and log_softmax's output
    head = N * d * a + N * V * a + (N * V * 4 if a != 4 else 0) + 2 * N * V * 4
    terms = [
        Term("runtime", runtime_bytes(device, "score"), RUNTIME_NOTE),
        Term("weights", weights, f"{weight_format} block Linears"
             + (", int8 embedding" if quantize_embedding else "")),
        *_inference_extras(model_cfg, weight_format, device),
    ]
    phases = {"blocks": sum(t.bytes for t in terms) + blocks, "head + loss": sum(t.bytes for t in terms) + head}
    peak_phase = max(phases, key=lambda k: phases[k])
    terms.append(Term("workspace", max(blocks, head), blocks_f if blocks >= head else
                      f"N*d*a + N*V*{a + (4 if a != 4 else 0) + 8} (final norm, logits, their (B, V, T) copy, "
                      f"log_softmax), N={N}"))
    if device == "cpu":
        a_work = ALLOCATOR_SLACK["infer"][0]
        terms.append(Term("allocator", int(a_work * max(blocks, head)), f"{a_work}*workspace ({ALLOCATOR_NOTE})"))
        phases = {k: v + terms[-1].bytes for k, v in phases.items()}
    settings = {"batch": batch, "context": window, "weight_format": weight_format, "kv_dtype": "-",
                "quantize_embedding": quantize_embedding}
    return Breakdown("score", device, terms, peak_phase, phases, settings)


# ------------------------------------------------------------------------------ compression

# The methods of memlm.compress.pipeline that quantize (the format they leave the block Linears in);
# every other method (prune, prune24, prune-ffn, prune-heads, lowrank) keeps them float32.
COMPRESS_QUANT_FORMATS = {"int8": "int8", "int4": "int4", "int3": "int3", "gptq4": "int4", "gptq3": "int3"}
# Bytes of temporaries per weight while one (out, in) weight is rounded to nearest (quantize_int8 /
# quantize_groups): the scaled copy and its rounding, 4 B each, then the codes (1 B).
RTN_BYTES_PER_WEIGHT = 9


def compressed_weight_bytes(cfg: ModelConfig, weight_format: str, group_size: int = 128,
                            quantize_embedding: bool = False, int4_kernel: bool | None = None) -> int:
    """Weights of a compressed model: `inference_weight_bytes`, plus int3 (which inference does
    not plan for): codes packed 3 bits a weight, n*3/8, and an fp16 scale and min per group."""
    if weight_format != "int3":
        return inference_weight_bytes(cfg, weight_format, quantize_embedding, int4_kernel, group_size)
    int3 = sum(i * o * 3 // 8 + 4 * o * (i // int4_group_size(i, group_size)) for i, o in block_linears(cfg))
    fp32_linears = sum(i * o * 4 for i, o in block_linears(cfg))
    return inference_weight_bytes(cfg, "fp32", quantize_embedding) + cfg.n_layer * (int3 - fp32_linears)


def _scoring_terms(cfg: ModelConfig, window: int, weight_format: str, group_size: int | None,
                   quantize_embedding: bool, int4_kernel: bool, device: str) -> dict[str, tuple[int, str]]:
    """The workspace of one perplexity window (memlm.eval.perplexity): estimate_scoring's."""
    fmt = "int4" if weight_format == "int3" else weight_format  # int3 computes like int4 without the kernel
    s = estimate_scoring(cfg, 1, window, fmt, device, quantize_embedding, fmt == "int4" and torch_int4_layout(int4_kernel),
                         group_size if fmt == "int4" else None)
    return {"workspace": (s["workspace"], next(t.formula for t in s.terms if t.name == "workspace"))}


def estimate_compress(model_cfg: ModelConfig, methods: list[str], group_size: int = 128,
                      quantize_embedding: bool = False, eval_before: bool = True, eval_after: bool = True,
                      window: int = 512, calib_tokens: int = 16_384, load_format: str | None = None,
                      load_layout: dict | None = None, int4_kernel: bool | None = None, device: str = "cpu") -> Breakdown:
    """Peak memory of `memlm compress` (memlm.compress.pipeline.compress_to_folder), as a timeline:

      load               the model as loaded: float32 (load_format None: the methods need float
                         weights), or straight into load_format ("int8" / "int4": round-to-nearest
                         alone, converted layer by layer while reading; `load_layout` is how the
                         loader lays it out: memlm.loading.layout_of)
      perplexity before  float32 scoring of one window of `window` tokens (if eval_before)
      <method>           one phase per method, on the float32 model (upper bound: a method that
                         shrinks it frees memory into the heap, which keeps it)
      embedding int8     quantize_embedding: the table rounded while its float32 copy lives
      perplexity after   the compressed model scoring one window (if eval_after)
      save               save_compressed: the compressed model and the copies its state_dict makes

    Each phase: runtime + tokenizer + the weights held then + the phase's transients + the heap's
    slack over those transients (ALLOCATOR_SLACK["infer"]); the pipeline hands freed heap back to
    the system between phases (malloc_trim), so a phase holds only its own weights. The peak is
    the largest phase. Pruned and low-rank models are counted at their float32 size (their final
    size depends on the data: an upper bound).

    Nothing here is fitted to compress runs: the runtime is the measured "score" one and the
    slack estimate_scoring's. Checked against `memlm compress` in fresh processes (glibc
    defaults, 2 threads, VmHWM; 2026-12-01): SmolLM2-135M int8 / int4 g128 / int4 g32 / gptq4
    (2,048 calibration and eval tokens), with and without a budget (budgets down to the smallest
    that fits), and a tiny-preset run folder: 20 runs, every prediction between 2.0% below and
    7.2% above the measured peak. The over-predictions are SmolLM2's evaluations: its 96 MiB
    logits are mmapped, so the heap keeps none of the slack the 0.4 factor gives them.
    """
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    cfg, V, d = model_cfg, model_cfg.vocab_size, model_cfg.n_embd
    T = min(window, cfg.block_size)
    quant = next((COMPRESS_QUANT_FORMATS[m] for m in methods if m in COMPRESS_QUANT_FORMATS), None)
    after_fmt = quant or "fp32"
    lins = block_linears(cfg)
    n_max = max(i * o for i, o in lins)
    fp32 = inference_weight_bytes(cfg, "fp32")
    fp32_f = "float32 model: 4*P + tables"
    kernel = after_fmt == "int4" and torch_int4_layout(int4_kernel)
    # After the methods, before any forward: the int4 kernel's bf16 (scale, zero) cache is made on
    # first use, so it joins from the evaluation on.
    after_cold = compressed_weight_bytes(cfg, after_fmt, group_size, False, False)
    after_emb = compressed_weight_bytes(cfg, after_fmt, group_size, quantize_embedding, False)
    after_warm = compressed_weight_bytes(cfg, after_fmt, group_size, quantize_embedding, kernel)
    after_f = f"{after_fmt}" + (f" g<={group_size}" if after_fmt in ("int4", "int3") else "") + " block Linears" \
        + (", int8 embedding" if quantize_embedding else ", embeddings/norms fp32")
    extras = {t.name: (t.bytes, t.formula) for t in _inference_extras(cfg, "fp32", device)}
    after_extras = {t.name: (t.bytes, t.formula) for t in _inference_extras(cfg, "int4" if after_fmt == "int3"
                                                                             else after_fmt, device)}

    phases: dict[str, dict[str, tuple[int, str]]] = {}

    def phase(name: str, base: dict, **terms: tuple[int, str]) -> None:
        phases[name] = {"runtime": (runtime_bytes(device, "score"), RUNTIME_NOTE), **base,
                        **{k: v for k, v in terms.items() if v[0]}}

    # -- load
    emb_rows = V * (1 if cfg.tied_embeddings else 2)  # the token table, and an untied head
    if load_format is None:
        # one block weight in flight, as read and as converted (a GGUF converts its tables first,
        # before the model is there; a safetensors tensor read in float32 is the weight itself)
        phase("load", extras, weights=(fp32, fp32_f), workspace=(8 * n_max, "2*4*n_max (one layer read and converted)"))
    else:
        layout = dict(load_layout or {})
        loaded = inference_weight_bytes(cfg, load_format, int4_kernel=False, **layout)
        load_ws = (RTN_BYTES_PER_WEIGHT * n_max, f"{RTN_BYTES_PER_WEIGHT}*n_max (one layer converted while read)")
        phase("load", extras, weights=(loaded, f"{load_format} as the loader lays it out {layout or ''}"),
              workspace=load_ws)
        if layout.get("quantize_embedding"):
            # A GGUF Q8_0 table the loader kept as int8: back to float32 (the float path's
            # embedding), both copies alive for a moment
            phase("load: float embedding", extras, weights=(loaded, f"{load_format} as loaded"),
                  workspace=(4 * emb_rows * d, "4*V*d (the table back in float32 beside its int8 codes)"))
        if layout.get("group_size") is not None:
            # Layers kept on the file's grid are re-rounded to the requested group, one at a time,
            # from their float32 values
            phase("load: re-round", extras, weights=(after_cold, after_f.replace(", int8 embedding", "")),
                  workspace=(4 * n_max + RTN_BYTES_PER_WEIGHT * n_max,
                             f"(4 + {RTN_BYTES_PER_WEIGHT})*n_max (one layer's float32 values and their rounding)"))

    # -- perplexity before (float32)
    if eval_before:
        phase("perplexity before", extras, weights=(fp32, fp32_f),
              **_scoring_terms(cfg, T, "fp32", None, False, False, device))

    # -- the methods, on the float32 model
    if load_format is None:
        for m in methods:
            if m in ("int8", "int4", "int3"):
                ws = (RTN_BYTES_PER_WEIGHT * n_max, f"{RTN_BYTES_PER_WEIGHT}*n_max (one layer rounded at a time)")
                phase(m, extras, weights=(fp32, fp32_f), workspace=ws)
            elif m in ("gptq4", "gptq3"):
                phase(m, extras, weights=(fp32, fp32_f), **gptq_terms(cfg, T, calib_tokens))
            elif m in ("prune", "prune24"):
                # |w|, its flattened kthvalue (values, int64 indices, a sorted copy) for one layer
                phase(m, extras, weights=(fp32, fp32_f), workspace=(16 * n_max, "16*n_max (|w|, kthvalue of one layer)"))
            elif m == "lowrank":
                # torch.linalg.svd of one layer: U, S, Vh and LAPACK's copy of the matrix
                phase(m, extras, weights=(fp32, fp32_f), workspace=(12 * n_max, "12*n_max (svd of one layer)"))
            elif m in ("prune-ffn", "prune-heads"):
                # calibration forwards of the whole model: one window's blocks and logits at a time
                fwd, fwd_f = forward_transient(cfg, 1, T)
                phase(m, extras, weights=(fp32, fp32_f),
                      workspace=(max(fwd, T * V * 4), f"max({fwd_f}, T*V*4 logits), T={T}"))
            else:
                raise MemlmError(f"unknown compression method '{m}'")

    # -- the embedding to int8: quantize_int8 of the whole (V, d) table at once
    if quantize_embedding:
        phase("embedding int8", extras, weights=(after_cold, after_f.replace(", int8 embedding", "")),
              workspace=(RTN_BYTES_PER_WEIGHT * emb_rows * d, f"{RTN_BYTES_PER_WEIGHT}*V*d (the table rounded at once)"))

    # -- perplexity after
    if eval_after:
        phase("perplexity after", after_extras, weights=(after_warm, after_f),
              **_scoring_terms(cfg, T, after_fmt, group_size, quantize_embedding, int4_kernel, device))

    # -- save: state_dict turns every int4 layer in the kernel's layout back into the portable
    # one, a new tensor each (n/2), all held until the file is written; unpacking one takes n
    copies = 0
    if kernel:
        copies = sum(i * o // 2 for i, o in lins if int4_uses_kernel(o, int4_group_size(i, group_size))) * cfg.n_layer
    phase("save", after_extras if eval_after else extras, weights=(after_warm if eval_after else after_emb, after_f),
          workspace=(copies + (n_max if copies else 0), "L*sum(n/2) portable int4 copies + n_max unpacked codes"))

    if device == "cpu":  # the heap's slack over each phase's transients, as estimate_scoring's
        a_work = ALLOCATOR_SLACK["infer"][0]
        for terms in phases.values():
            transient = sum(v[0] for k, v in terms.items() if k not in ("runtime", "weights", "tokenizer", "kernels"))
            terms["allocator"] = (int(a_work * transient), f"{a_work}*(this phase's transients) ({ALLOCATOR_NOTE})")
    totals = {name: sum(v[0] for v in terms.values()) for name, terms in phases.items()}
    peak_phase = max(totals, key=lambda k: totals[k])
    phase_terms = {name: [Term(k, int(v[0]), v[1]) for k, v in terms.items()] for name, terms in phases.items()}
    settings = {"methods": list(methods), "weight_format": after_fmt, "load_format": load_format or "fp32",
                "group_size": group_size, "window": T, "eval_before": eval_before, "eval_after": eval_after,
                "quantize_embedding": quantize_embedding, "calib_tokens": calib_tokens}
    notes = []
    if any(m in ("prune", "prune24", "prune-ffn", "prune-heads", "lowrank") for m in methods) and quant is None:
        notes.append("pruned / low-rank weights counted at their float32 size (an upper bound)")
    return Breakdown("compress", device, phase_terms[peak_phase], peak_phase, totals, settings, notes, phase_terms)


def gptq_terms(cfg: ModelConfig, window: int, calib_tokens: int) -> dict[str, tuple[int, str]]:
    """What memlm.compress.gptq.gptq_quantize_model allocates beside the float32 model.

      calibration  the inputs of the block being quantized for all S = ceil(calib_tokens / T)
                   calibration windows, and the outputs it computes from them (the next block's
                   inputs), both alive when the list is rebuilt: 2*S*T*d*4
      workspace    the larger of a calibration forward through the block (one window, a stage's
                   Hessian accumulating: forward_transient + 4*n_in^2) and the math of one layer:
                   the stage's Hessian sum, its scaled copy, gptq_quantize_weight's clone, Cholesky
                   factor, inverse and upper factor (6*n_in^2*4) plus the weight's clone, the lazy
                   update's product and the codes (9*n) -- plus the codes of the block's layers
                   quantized so far (sum n, held until the block is swapped)
    """
    T = window
    S = math.ceil(calib_tokens / T)
    d = cfg.n_embd
    lins = block_linears(cfg)
    fwd, _ = forward_transient(cfg, 1, T)
    math_peak = max(6 * i * i * 4 + 9 * i * o for i, o in lins)
    forward = fwd + max(4 * i * i for i, _ in lins)
    codes = sum(i * o for i, o in lins)
    return {
        "calibration": (2 * S * T * d * 4, f"2*S*T*d*4, S={S}, T={T}"),
        "workspace": (max(math_peak, forward) + codes,
                      "max(6*n_in^2*4 + 9*n (one layer's GPTQ), forward + 4*n_in^2) + sum(n) block codes"),
    }


def model_layout(model) -> dict:
    """What the estimator needs to know of a loaded model, read off its modules: the weight format
    of its block Linears, their group size (the largest: an upper bound, as quantize_model is
    given; 32 for GGUF Q4_1 blocks), and whether (and how) the embedding is int8."""
    import torch

    from memlm.compress.kinds import kind_of

    modules = list(model.modules())
    names = {kind_of(m).name for m in modules if kind_of(m) is not None}

    def group_of(kind: str) -> int | None:
        sizes = [m.group_size for m in modules if kind_of(m) is not None and kind_of(m).name == kind]
        return max(sizes) if sizes and None not in sizes else None

    if "int4" in names:
        fmt, group = "int4", group_of("int4")
    elif "int8" in names:
        fmt, group = "int8", group_of("int8")
    else:
        fmt, group = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32", None
    return {"weight_format": fmt, "quantize_embedding": "int8_embedding" in names, "group_size": group,
            "embedding_group_size": group_of("int8_embedding")}


def estimate_for_model(model, batch: int = 1, context: int | None = None, prompt_len: int | None = None,
                       runtime: str = "infer", compile: bool = False) -> Breakdown:
    """`estimate_inference` for a loaded model, its layout read off its modules (`model_layout`)."""
    return estimate_inference(model.config, batch, context, prompt_len=prompt_len, runtime=runtime,
                              compile=compile, **model_layout(model))
