"""One description of a model (`ModelConfig`) and one of a training run (`TrainConfig`).

Everything else (the model, the trainer, the memory planner, the converters) reads these two
objects, so a prediction can never drift from what runs. Presets are plain data.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from memlm.errors import MemlmError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Norm = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "sinusoidal", "rope"]
Mlp = Literal["gelu", "swiglu"]
# Which network memlm.model.build makes of a config: the decoder-only transformer, the
# encoder-decoder transformer, a recurrent LM (GRU/LSTM), a causal dilated convolution LM.
Kind = Literal["decoder", "encdec", "rnn", "conv"]


MAX_TABLE_VALUES = 2**28  # RoPE / sinusoidal tables: 1 GiB of float32 (Llama 3.1's 131k x 128 is 16.8M)


@dataclass
class ModelConfig:
    """Shape and flavour of a language model: `kind` says which network, the rest its shape.

    Every kind reads vocab_size, block_size, n_layer, n_embd, norm, tied_embeddings, dropout;
    the transformer kinds read the attention and MLP fields; the last group belongs to one kind
    each (a field of another kind keeps its default)."""

    name: str = "custom"
    kind: Kind = "decoder"
    vocab_size: int = 50257
    block_size: int = 1024  # longest context the model is built for
    n_layer: int = 12
    n_head: int = 12
    n_kv_heads: int | None = None  # None: same as n_head (multi-head); fewer: grouped-query
    n_embd: int = 768
    head_dim: int | None = None  # None: n_embd // n_head (set explicitly after pruning heads)
    ffn_hidden: int | None = None  # None: 4*n_embd for GELU, Llama's 8/3 rule for SwiGLU
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    positions: Positions = "learned"
    rope_theta: float = 10000.0
    mlp: Mlp = "gelu"
    gelu_approximate: Literal["none", "tanh"] = "none"
    bias: bool = True  # biases in every Linear and norm
    tied_embeddings: bool = True
    dropout: float = 0.0
    # encdec: encoder depth (None: n_layer, the decoder's), and where the norms sit: "pre" (memlm's
    # default, x + f(norm(x))) or "post" (the original Transformer's and BART's: norm(x + f(x)),
    # with BART's norm of the embeddings and no final norm)
    n_encoder_layer: int | None = None
    norm_placement: Literal["pre", "post"] = "pre"
    start_id: int = 0  # encdec: the token the decoder starts from (memlm train sets the tokenizer's EOS, as BART)
    # rnn: the recurrent cell (PyTorch's nn.GRU / nn.LSTM, hidden size n_embd)
    rnn_cell: Literal["gru", "lstm"] = "gru"
    # conv: taps of each causal depthwise convolution; layer i dilates them by 2**i
    conv_kernel: int = 3

    def __post_init__(self):
        # The sizes the derived fields divide by or multiply are checked before they are used.
        for name in ("n_head", "n_embd", "n_kv_heads", "head_dim", "ffn_hidden"):
            if getattr(self, name) is not None:
                check_range("model config", name, getattr(self, name), low=1)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise MemlmError(
                    f"model config: n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})",
                    "pick n_head so that n_embd / n_head is a whole head size",
                )
            self.head_dim = self.n_embd // self.n_head
        if self.n_encoder_layer is None:
            self.n_encoder_layer = self.n_layer
        if self.ffn_hidden is None:
            if self.mlp == "gelu":
                self.ffn_hidden = 4 * self.n_embd
            else:  # Llama: 2/3 of 4d, rounded up to a multiple of 256
                self.ffn_hidden = 256 * ((int(8 * self.n_embd / 3) + 255) // 256)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_heads", "n_embd", "head_dim",
                     "ffn_hidden"):
            check_range("model config", name, getattr(self, name), low=1)
        check_range("model config", "norm_eps", self.norm_eps, low=0, low_open=True)
        check_range("model config", "rope_theta", self.rope_theta, low=0, low_open=True)
        check_range("model config", "dropout", self.dropout, low=0, high=1, high_open=True)
        if self.n_head % self.n_kv_heads:
            raise MemlmError(
                f"model config: n_head ({self.n_head}) is not a multiple of n_kv_heads ({self.n_kv_heads})",
                "grouped-query attention shares each KV head among n_head / n_kv_heads query heads",
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise MemlmError(f"model config: RoPE needs an even head size, got {self.head_dim}")
        width = self.n_embd if self.positions == "sinusoidal" else self.head_dim
        if self.positions != "learned" and self.block_size * width > MAX_TABLE_VALUES:
            # the one tensor a loader builds from the config alone, not from the file's bytes
            raise MemlmError(
                f"model config: block_size {self.block_size} makes a position table of {self.block_size * width:,} "
                f"values, more than {MAX_TABLE_VALUES:,} ({MAX_TABLE_VALUES * 4 // 2**30} GiB)",
                "lower block_size (the longest context)",
            )
        check_range("model config", "n_encoder_layer", self.n_encoder_layer, low=1)
        if self.norm_placement == "post" and self.kind != "encdec":
            raise MemlmError(f"model config: norm_placement 'post' is for kind 'encdec', not '{self.kind}'",
                             "drop norm_placement (the other kinds are pre-norm)")
        if self.kind == "conv":
            check_range("model config", "conv_kernel", self.conv_kernel, low=2)
            if self.block_size > self.receptive_field:
                raise MemlmError(
                    f"model config: a conv context of {self.block_size} tokens is longer than its receptive "
                    f"field of {self.receptive_field} (n_layer {self.n_layer}, conv_kernel {self.conv_kernel})",
                    "raise n_layer or conv_kernel (field = 1 + (conv_kernel - 1) * (2**n_layer - 1)), "
                    "or lower block_size",
                )

    @property
    def receptive_field(self) -> int:
        """Tokens a conv model's last layer sees: 1 + (k - 1) * (1 + 2 + ... + 2**(L-1))."""
        return 1 + (self.conv_kernel - 1) * (2**self.n_layer - 1)

    @property
    def fixed_state(self) -> bool:
        """Whether decoding carries a fixed amount of state (RNN, conv) rather than a KV cache
        that grows with the context (the transformers)."""
        return self.kind in ("rnn", "conv")

    def room_after(self, n_prompt: int) -> int | None:
        """How many new tokens a prompt of n_prompt tokens leaves (<= 0: the prompt is too long;
        None: no limit). A decoder's positions end at block_size, prompt and new tokens together;
        an encoder-decoder's source and its output have block_size each (the output's first
        position holds the start token); an RNN's state and a convolution's rolling buffer run
        on as long as one likes (block_size is then only the training length)."""
        if self.fixed_state:
            return None
        if self.kind == "encdec":
            return self.block_size - 1 if n_prompt <= self.block_size else 0
        return self.block_size - n_prompt

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count of a decoder from the shape alone (tests check it against the model;
        every kind's parameters, one by one: memlm.memory.estimate.param_shapes)."""
        if self.kind != "decoder":
            raise ValueError(f"num_params counts a decoder; a {self.kind} model's: memlm.memory.estimate.param_shapes")
        d, f, hd = self.n_embd, self.ffn_hidden, self.head_dim
        q, kv = self.n_head * hd, self.n_kv_heads * hd
        b = int(self.bias)
        norm = d * (2 if (self.norm == "layernorm" and self.bias) else 1)
        attn = 2 * d * q + 2 * d * kv + b * (q + 2 * kv + d)
        mlp = (3 * d * f + b * (2 * f + d)) if self.mlp == "swiglu" else (2 * d * f + b * (f + d))
        per_layer = attn + mlp + 2 * norm
        emb = self.vocab_size * d
        pos = self.block_size * d if self.positions == "learned" else 0
        head = 0 if self.tied_embeddings else self.vocab_size * d
        total = self.n_layer * per_layer + norm + pos + head
        return total + (emb if include_embedding else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**check_keys_and_types(cls, d, "model config"))


# Presets are data. Parameter counts: gpt2 124,439,808 and smollm2-135m 134,515,008 (published).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_heads=2, n_embd=256,
        ffn_hidden=768, norm="rmsnorm", positions="rope", mlp="swiglu", bias=False,
    ),
    "gpt2": dict(
        vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
        gelu_approximate="tanh",
    ),
    "gpt2-medium": dict(
        vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024,
        gelu_approximate="tanh",
    ),
    "gpt2-large": dict(
        vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280,
        gelu_approximate="tanh",
    ),
    "smollm2-135m": dict(
        vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_heads=3, n_embd=576,
        ffn_hidden=1536, norm="rmsnorm", norm_eps=1e-5, positions="rope", rope_theta=100000.0,
        mlp="swiglu", bias=False,
    ),
    # The light baselines at tiny's size (~4.2M parameters with tiny's 4096-token vocabulary):
    # 8 GRU layers (6*d^2 each), 6 LSTM layers (8*d^2), 8 conv blocks (receptive field 511).
    "tiny-rnn": dict(
        kind="rnn", vocab_size=4096, block_size=256, n_layer=8, n_head=4, n_embd=256, norm="rmsnorm", bias=False,
        rnn_cell="gru",
    ),
    "tiny-lstm": dict(
        kind="rnn", vocab_size=4096, block_size=256, n_layer=6, n_head=4, n_embd=256, norm="rmsnorm", bias=False,
        rnn_cell="lstm",
    ),
    "tiny-conv": dict(
        kind="conv", vocab_size=4096, block_size=256, n_layer=8, n_head=4, n_embd=256, ffn_hidden=512,
        norm="rmsnorm", mlp="swiglu", bias=False, conv_kernel=3,
    ),
    # The encoder-decoder at tiny's size: 3 + 3 layers, BART's shape in memlm's pre-norm flavour.
    "tiny-encdec": dict(
        kind="encdec", vocab_size=4096, block_size=256, n_layer=3, n_encoder_layer=3, n_head=4, n_kv_heads=2,
        n_embd=256, ffn_hidden=512, norm="rmsnorm", positions="rope", mlp="swiglu", bias=False,
    ),
    # The standard W3 training workload (shared/BENCHMARKS.md).
    "w3": dict(
        vocab_size=49152, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=False,
    ),
}


# Shapes of inference, followed by the engine (memlm.infer.engine) and the planner alike.
PREFILL_CHUNK = 256  # prompt tokens per forward: bounds activations and attention (chunk x cache length)
CACHE_ROUND = 128  # KV cache lengths are rounded up to a multiple of this: a compiled step meets few shapes
# Rows up to which the memory estimate counts a quantized layer's call as memlm's kernels' (int8
# codes + output) rather than a dequantized slice, which is more. Which path runs is measured per
# machine (memlm.kernels.choose); by default (and measured on the dev box) the kernels take these.
KERNEL_MAX_ROWS = 16


def cache_length(needed: int, block_size: int) -> int:
    """The KV cache length that holds `needed` tokens: rounded up (CACHE_ROUND), within the context."""
    return min(block_size, -(-needed // CACHE_ROUND) * CACHE_ROUND)


def preset(preset_name: str, /, **overrides: Any) -> ModelConfig:
    """A preset's config; overrides change any field (even `name`)."""
    if preset_name not in PRESETS:
        raise MemlmError(f"unknown model preset '{preset_name}'", f"known presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({"name": preset_name, **PRESETS[preset_name], **overrides})


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model shape. Saved as config.toml in the run."""

    out_dir: str = "runs/default"
    corpus: str = "default"  # "default" (embedded corpus), a file, folder, glob, or .jsonl
    task: Literal["lm", "seq2seq"] = "lm"  # seq2seq: source -> target pairs (memlm.pairs), for kind "encdec"
    tokenizer: str | None = None  # path to tokenizer.json; None: train a BPE on the corpus
    vocab_size: int = 4096  # for a tokenizer trained here
    init_from: str | None = None  # fine-tune: a model name or path to start from
    # text cleaning before tokenization (memlm.cleaning; the defaults change no meaning)
    clean_control: bool = True  # drop control characters (not tab, newline) and the BOM
    clean_unicode: Literal["none", "NFC", "NFKC"] = "NFC"
    clean_lowercase: bool = False
    clean_whitespace: bool = False  # collapse runs of spaces (flattens indentation)
    clean_dedup: Literal["none", "exact", "near"] = "exact"
    clean_dedup_unit: Literal["document", "line"] = "document"
    seed: int = 1337
    steps: int = 1000
    max_time_s: float = 0.0  # > 0: end (eval and save as at the end) once training has taken this long
    micro_batch: int = 8
    grad_accum: int = 1
    seq_len: int | None = None  # None: the model's block_size
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["fp32", "bf16-autocast", "bf16"] = "fp32"
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "sgd"] = "adamw"
    fused_backward: bool = False  # optimizer step inside backward, each grad freed at once
    activation_checkpointing: int = 0  # 0 off; k: checkpoint every k-th block
    loss_chunk: int = 0  # 0: full logits; n: cross-entropy over chunks of n tokens
    stochastic_rounding: bool = True  # precision "bf16": round each update to bf16 at random, unbiased
    seq_len_warmup: list[int] = field(default_factory=list)  # e.g. [64, 128]: short contexts first
    seq_len_warmup_steps: int = 0  # steps spent on each warmup length
    batch_ramp: list[int] = field(default_factory=list)  # e.g. [2, 4]: smaller micro-batches first
    batch_ramp_steps: int = 0  # steps spent on each ramp micro-batch size
    eval_every: int = 200
    eval_batches: int = 10
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    device: str = "auto"
    threads: int = 0  # 0: torch's default
    memory_budget: str | None = None  # e.g. "2GiB": let the planner pick the savers
    nproc: int = 1  # processes on this machine (`memlm train --nproc N` starts torchrun)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    cpu_offload: bool = False  # fsdp on GPU: keep parameter/gradient/optimizer shards in CPU memory
    dist_timeout_s: int = 600  # how long a collective waits for the other processes before failing

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        cfg = cls(**check_keys_and_types(cls, d, "train config"))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every value in its range, before any work: a run that starts does not fail at its end
        (an eval with no batches, a NaN learning rate) on a setting it could have refused."""
        for name in ("steps", "micro_batch", "grad_accum", "keep_last", "eval_batches", "nproc", "dist_timeout_s"):
            check_range("train config", name, getattr(self, name), low=1)
        for name in ("warmup_steps", "eval_every", "save_every", "log_every", "threads"):
            check_range("train config", name, getattr(self, name), low=0)
        check_range("train config", "lr", self.lr, low=0, low_open=True)
        check_range("train config", "min_lr", self.min_lr, low=0)
        check_range("train config", "weight_decay", self.weight_decay, low=0)
        check_range("train config", "beta1", self.beta1, low=0, high=1, high_open=True)
        check_range("train config", "beta2", self.beta2, low=0, high=1, high_open=True)
        check_range("train config", "eps", self.eps, low=0, low_open=True)
        check_range("train config", "grad_clip", self.grad_clip, low=0, hint="0 switches clipping off")
        check_range("train config", "max_time_s", self.max_time_s, low=0, hint="0 means no limit")
        if self.fused_backward and self.grad_accum > 1:
            raise MemlmError(
                "train config: fused_backward cannot be combined with grad_accum > 1",
                "the optimizer steps inside backward, so gradients cannot accumulate: drop one of them",
            )
        if self.fused_backward and self.grad_clip > 0:
            raise MemlmError(
                "train config: fused_backward cannot be combined with grad_clip",
                "clipping needs every gradient at once; set grad_clip = 0 or drop fused_backward",
            )
        for name in ("loss_chunk", "activation_checkpointing", "seq_len_warmup_steps", "batch_ramp_steps"):
            if getattr(self, name) < 0:
                raise MemlmError(f"train config: {name} must not be negative, got {getattr(self, name)}",
                                 "0 switches it off")
        if self.seq_len is not None and self.seq_len < 1:
            raise MemlmError(f"train config: seq_len must be at least 1, got {self.seq_len}")
        self._check_ramp("seq_len_warmup", self.seq_len_warmup, self.seq_len_warmup_steps, "seq_len", self.seq_len)
        self._check_ramp("batch_ramp", self.batch_ramp, self.batch_ramp_steps, "micro_batch", self.micro_batch)

    @staticmethod
    def _check_ramp(name: str, values: list[int], steps: int, full_name: str, full: int | None) -> None:
        """A warmup list must be positive, strictly increasing, no larger than the full value, and
        come with a number of steps per entry."""
        if not values:
            return
        if any(v < 1 for v in values):
            raise MemlmError(f"train config: {name} values must be positive, got {values}")
        if any(b <= a for a, b in zip(values, values[1:])):
            raise MemlmError(f"train config: {name} must be strictly increasing, got {values}",
                             "list the phases from shortest to longest, e.g. [64, 128]")
        if full is not None and values[-1] > full:
            raise MemlmError(f"train config: {name} {values} goes beyond {full_name} = {full}",
                             f"every phase must be at most {full_name}; the run ends at {full_name}")
        if steps < 1:
            raise MemlmError(f"train config: {name} is set but {name}_steps is {steps}",
                             f"set {name}_steps to the number of steps each phase lasts")


def check_range(what: str, key: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, hint: str | None = None) -> None:
    """Refuse a number that is not finite or not in its range, naming the key and the range:
    "train config: lr must be a finite number > 0, got nan". Every config value, CLI flag and
    file field with a range goes through here before any work starts."""
    if low is not None and high is not None:
        valid = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        valid = f"{'>' if low_open else '>='} {low}"
    else:
        valid = f"{'<' if high_open else '<='} {high}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "an integer" if isinstance(value, int) and not isinstance(value, bool) else "a finite number"
        raise MemlmError(f"{what}: {key} must be {kind} {valid}, got {value!r}", hint)


def check_port(port: int, what: str = "--port") -> None:
    """A TCP port a server can listen on."""
    check_range("serve", what, port, low=1, high=65535, hint="pick a free port, e.g. 8000")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def check_keys_and_types(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """Reject unknown keys (naming the valid ones) and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    out = {}
    for key, value in d.items():
        if key not in hints:
            raise MemlmError(f"{what}: unknown key '{key}'", f"valid keys: {', '.join(valid)}")
        if isinstance(value, int) and not isinstance(value, bool) and hints[key] is float:
            value = float(value)
        if not _type_ok(value, hints[key]):
            raise MemlmError(
                f"{what}: '{key}' must be {_describe(hints[key])}, got {value!r}",
                "fix the value in the config file or on the command line",
            )
        out[key] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MemlmError(f"config file not found: {path}", "pass the path of an existing .toml file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MemlmError(f"config file {path} is not valid TOML: {e}") from None


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Write flat sections of scalars and lists as TOML (None values are left out)."""
    import tomli_w

    return tomli_w.dumps({s: {k: v for k, v in d.items() if v is not None} for s, d in sections.items()})
