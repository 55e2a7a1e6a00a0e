"""GGUF (llama.cpp's single-file format) in and out: `load_gguf`, `read_gguf_config`, `save_gguf`.

Two llama.cpp architectures map onto memlm's `Decoder`:
  llama  RMSNorm, RoPE, SwiGLU, grouped-query attention (SmolLM2, Llama 2, TinyLlama, ...)
  gpt2   LayerNorm with bias, learned positions, tanh-GELU, one fused qkv projection

Reading goes through `gguf.GGUFReader`, which memory-maps the file: a tensor's bytes are only
touched when it is dequantized, and tensors are dequantized one at a time straight into a model
built on the meta device, so loading never holds two float copies of the weights.
`iter_gguf_tensors` hands out the raw (still quantized) blocks for code that wants to keep them.

Layout facts this module relies on:
  * ggml lists a tensor's dimensions fastest-first, the reverse of numpy/torch. GGUFReader's
    `data` is already in numpy order; its `shape` field is in ggml order.
  * llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ... while memlm and Hugging Face
    rotate (x_i, x_{i+hd/2}) ("rotate half"). llama.cpp's converter therefore reorders the rows
    of every q and k projection, head by head; we undo that on import and redo it on export.
  * The tokenizer lives in the metadata as token strings, merges and token types; we rebuild a
    `tokenizers` byte-level BPE from them, with the pre-tokenizer llama.cpp picks by
    `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
import torch
from gguf import GGMLQuantizationType as QType
from tokenizers import decoders, models, pre_tokenizers

from memlm.compress.lowrank import LowRankLinear
from memlm.compress.quantize import GroupQuantLinear, Int8Embedding, Int8Linear, dequantize_weight
from memlm.config import ModelConfig
from memlm.errors import MemlmError
from memlm.model import Decoder
from memlm.tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama", "gpt2")

# Tensor types we can dequantize (all through gguf.quants; see tests/test_gguf.py for a hand check).
SUPPORTED_TYPES = (
    QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
)

# What save_gguf writes, and the llama.cpp "file type" each one announces.
EXPORT_TYPES: dict[str, tuple[QType, gguf.LlamaFileType]] = {
    "F32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_1": (QType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}

# llama.cpp's pre-tokenizers for the "gpt2" tokenizer model that memlm can reproduce exactly.
# The second group splits every digit on its own before the GPT-2 regex (llama.cpp: "\p{N}").
PLAIN_PRES = ("default", "gpt2")
DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")

_INVALID_HINT = "the file is truncated or corrupted: download or export it again"

# memlm name (inside blocks.{i}.) <-> llama.cpp name (inside blk.{i}.), per architecture.
_LAYER_NAMES = {
    "llama": {
        "attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
        "attn.v_proj": "attn_v", "attn.o_proj": "attn_output", "mlp_norm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    },
    "gpt2": {  # q/k/v live in one fused attn_qkv tensor, handled apart
        "attn_norm": "attn_norm", "attn.o_proj": "attn_output", "mlp_norm": "ffn_norm",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    },
}
_GLOBAL_NAMES = {"tok_emb": "token_embd", "pos_emb": "position_embd", "norm": "output_norm", "lm_head": "output"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


# ---- raw tensors -------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: `data` is a read-only view into the memory-mapped file.

    For quantized types `data` holds the raw blocks as uint8, shape (*shape[:-1], bytes per row);
    for F32/F16 it holds the values. `shape` is in numpy/torch order, counted in elements.
    """

    name: str
    qtype: QType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def is_quantized(self) -> bool:
        return self.qtype not in (QType.F32, QType.F16)


def iter_gguf_tensors(path: str | Path) -> Iterator[GGUFTensor]:
    """Every tensor of a GGUF file, raw, in file order (nothing is dequantized or copied)."""
    yield from _GGUFFile(path).tensors.values()


def dequantize(tensor: GGUFTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor's values as a fresh torch tensor of `tensor.shape` (never a view of the file)."""
    return torch.from_numpy(_dequantize_np(tensor)).to(dtype)


def _dequantize_np(t: GGUFTensor) -> np.ndarray:
    if t.qtype not in SUPPORTED_TYPES:
        raise MemlmError(
            f"GGUF tensor '{t.name}' has type {t.qtype.name}, which memlm cannot read",
            f"supported tensor types: {', '.join(q.name for q in SUPPORTED_TYPES)}",
        )
    out = gguf.quants.dequantize(t.data, t.qtype)
    if t.qtype == QType.F32:  # dequantize returns a view of the memory map: copy it out
        out = np.array(out, dtype=np.float32)
    return out.reshape(t.shape)


# ---- reading the file safely ---------------------------------------------------------------------

class _BoundedReader(gguf.GGUFReader):
    """GGUFReader that refuses to read past the end of the file.

    The stock reader slices its memory map, and a slice past the end is silently short: a
    truncated or corrupted file then parses as garbage, and a huge array length in it can loop
    for a very long time over zero-byte reads. Raising on the first short read avoids both.
    """

    def _get(self, offset, dtype, count=1, override_order=None):  # type: ignore[override]
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self.data.shape[0]:
            raise ValueError(f"it ends after {self.data.shape[0]} bytes but a field or tensor needs {end}")
        return super()._get(offset, dtype, count, override_order)


class _GGUFFile:
    """A parsed GGUF file: typed metadata access with one-line errors, and its raw tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MemlmError(f"GGUF file not found: {self.path}", "pass the path of an existing .gguf file")
        try:
            self.reader = _BoundedReader(self.path)
            tensors = {}
            for t in self.reader.tensors:
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                tensors[t.name] = GGUFTensor(t.name, QType(int(t.tensor_type)), shape, t.data)
        except MemoryError:
            raise
        except Exception as e:  # the reader raises whatever numpy or its parser hits on bad bytes
            raise self.invalid(e) from None
        if self.reader.byte_order != "I":
            raise MemlmError(f"{self.path} is a big-endian GGUF file", "convert it on a little-endian machine")
        self.tensors: dict[str, GGUFTensor] = tensors

    def invalid(self, reason: Exception | str) -> MemlmError:
        text = " ".join(str(reason).split())[:200] or type(reason).__name__
        return MemlmError(f"{self.path} is not a valid GGUF file: {text}", _INVALID_HINT)

    _MISSING = object()

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is self._MISSING:
                raise MemlmError(
                    f"{self.path}: GGUF metadata '{key}' is missing",
                    "the file was written by a converter memlm does not understand; re-export it",
                )
            return default
        try:
            return field.contents()
        except Exception as e:  # e.g. a string that is not UTF-8
            raise self.invalid(f"metadata '{key}': {e}") from None

    def get_int(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value is not default and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.invalid(f"metadata '{key}' should be an integer, got {value!r}")
        return value

    def get_float(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.invalid(f"metadata '{key}' should be a number, got {value!r}")
        if self.reader.fields[key].types == [gguf.GGUFValueType.FLOAT32]:
            # Keep the float32's shortest decimal (1e-05, not 9.999999747378752e-06).
            return float(str(np.float32(value)))
        return float(value)

    def get_str(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value is not default and not isinstance(value, str):
            raise self.invalid(f"metadata '{key}' should be a string, got {value!r}")
        return value

    def get_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value is not default and not isinstance(value, list):
            raise self.invalid(f"metadata '{key}' should be an array, got {value!r}")
        return value

    def tensor(self, name: str) -> GGUFTensor:
        if name not in self.tensors:
            raise MemlmError(f"{self.path}: GGUF tensor '{name}' is missing", "the file is incomplete; re-export it")
        return self.tensors[name]


# ---- import: config ------------------------------------------------------------------------------

def read_gguf_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a GGUF file, from its metadata (of the tensors, only biases are read)."""
    return _config_from(_GGUFFile(path))


def _config_from(f: _GGUFFile) -> ModelConfig:
    arch = f.get_str("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise MemlmError(
            f"GGUF architecture '{arch}' of {f.path} is not supported",
            f"supported architectures: {', '.join(SUPPORTED_ARCHS)}",
        )
    n_embd = f.get_int(f"{arch}.embedding_length")
    n_head = f.get_int(f"{arch}.attention.head_count")
    # key_length is only written when heads are not n_embd / n_head wide (e.g. pruned heads).
    head_dim = f.get_int(f"{arch}.attention.key_length", None)
    value_dim = f.get_int(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise MemlmError(
            f"{f.path}: keys ({head_dim}) and values ({value_dim}) have different head sizes",
            "memlm's attention needs one head size for both",
        )
    common = dict(
        name=f.get_str("general.name", "gguf") or "gguf",
        vocab_size=_vocab_rows(f),
        block_size=f.get_int(f"{arch}.context_length"),
        n_layer=f.get_int(f"{arch}.block_count"),
        n_head=n_head,
        n_kv_heads=f.get_int(f"{arch}.attention.head_count_kv", n_head),
        n_embd=n_embd,
        head_dim=head_dim,
        ffn_hidden=f.get_int(f"{arch}.feed_forward_length"),
        bias=_has_bias(f),
        tied_embeddings=_is_tied(f),
    )
    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_heads", "n_embd", "head_dim", "ffn_hidden"):
        if common[key] is not None and common[key] <= 0:  # ModelConfig would divide by some of them
            raise f.invalid(f"{arch} {key} is {common[key]}")
    if arch == "llama":
        config = ModelConfig(
            **common, norm="rmsnorm", norm_eps=f.get_float("llama.attention.layer_norm_rms_epsilon"),
            positions="rope", rope_theta=f.get_float("llama.rope.freq_base", 10000.0), mlp="swiglu",
        )
        rope_dim = f.get_int("llama.rope.dimension_count", config.head_dim)
        if rope_dim != config.head_dim:
            raise MemlmError(
                f"{f.path}: RoPE rotates {rope_dim} of the {config.head_dim} features of each head",
                "partial rotary embeddings are not supported",
            )
        scaling = f.get_str("llama.rope.scaling.type", "none")
        if scaling != "none" or "rope_freqs.weight" in f.tensors:
            what = scaling if scaling != "none" else "rope_freqs"
            raise MemlmError(
                f"{f.path} uses RoPE scaling ({what}), which memlm does not implement",
                "use a model without rope scaling (e.g. Llama 2 / SmolLM2 style)",
            )
        return config
    gelu = f.get_str("memlm.gelu_approximate", "tanh")  # llama.cpp's gpt2 always uses the tanh GELU
    if gelu not in ("tanh", "none"):
        raise f.invalid(f"metadata 'memlm.gelu_approximate' is {gelu!r}")
    return ModelConfig(
        **common, norm="layernorm", norm_eps=f.get_float("gpt2.attention.layer_norm_epsilon"),
        positions="learned", mlp="gelu", gelu_approximate=gelu,
    )


def _vocab_rows(f: _GGUFFile) -> int:
    rows = f.tensor("token_embd.weight").shape[0]
    tokens = f.get_list("tokenizer.ggml.tokens", None)
    if tokens is not None and len(tokens) > rows:
        raise MemlmError(
            f"{f.path}: the tokenizer has {len(tokens)} tokens but the embedding only {rows} rows",
            "the file is inconsistent; re-export it",
        )
    return rows


def _is_tied(f: _GGUFFile) -> bool:
    """Tied when there is no output.weight, or when it is a byte-for-byte copy of the embedding
    (GPT-2 converters duplicate it because old llama.cpp versions required the tensor)."""
    out = f.tensors.get("output.weight")
    if out is None:
        return True
    emb = f.tensor("token_embd.weight")
    if out.qtype != emb.qtype or out.data.shape != emb.data.shape:
        return False
    step = 4096  # compare in slices: a whole-matrix comparison would allocate a matrix of booleans
    return all(np.array_equal(out.data[i:i + step], emb.data[i:i + step]) for i in range(0, emb.data.shape[0], step))


def _has_bias(f: _GGUFFile) -> bool:
    """memlm has one `bias` switch; any nonzero bias tensor turns it on (missing ones become 0).

    All-zero biases (gpt2 files must carry them; memlm writes zeros for bias-free models) are
    equivalent to none, so they load as a bias-free model.
    """
    for t in f.tensors.values():
        if t.name.endswith(".bias") and np.any(_dequantize_np(t)):
            return True
    return False


# ---- import: weights -----------------------------------------------------------------------------

def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Decoder, Tokenizer]:
    """A memlm `Decoder` (eval mode, CPU, weights dequantized to `dtype`) and its `Tokenizer`."""
    f = _GGUFFile(path)
    config = _config_from(f)
    unsupported = sorted({t.qtype.name for t in f.tensors.values() if t.qtype not in SUPPORTED_TYPES})
    if unsupported:
        raise MemlmError(
            f"{f.path} holds tensors of type {', '.join(unsupported)}, which memlm cannot read",
            f"supported tensor types: {', '.join(q.name for q in SUPPORTED_TYPES)}",
        )
    tokenizer = _tokenizer_from(f)
    if tokenizer.vocab_size > config.vocab_size:
        raise MemlmError(
            f"{f.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}",
            "the file is inconsistent; re-export it",
        )
    model = Decoder.empty(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    arch = f.get_str("general.architecture")
    sd: dict[str, torch.Tensor] = {}
    for t in f.tensors.values():
        if (t.name == "output.weight" and config.tied_embeddings) or (t.name.endswith(".bias") and not config.bias):
            continue  # a copy of the embedding, or all-zero biases (see _is_tied, _has_bias)
        for key, value in _to_memlm(t, arch, config):
            if key not in expected:  # e.g. blk.12.* in a 12-layer model
                raise _unexpected(t.name, arch)
            if tuple(value.shape) != tuple(expected[key]):
                raise MemlmError(
                    f"{f.path}: tensor '{t.name}' has shape {tuple(value.shape)}, expected {tuple(expected[key])}",
                    "the metadata does not match the tensors; re-export the file",
                )
            sd[key] = torch.from_numpy(value).to(dtype)  # one tensor at a time: one float copy at most
    if config.tied_embeddings and "tok_emb.weight" in sd:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    for key, shape in expected.items():
        if key not in sd:
            if key.endswith(".bias"):  # e.g. llama files with q/k/v biases but none on o_proj
                sd[key] = torch.zeros(shape, dtype=dtype)
            else:
                raise MemlmError(f"{f.path}: no tensor for '{key}'", "the file is incomplete; re-export it")
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tied_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # assign=True replaced the shared Parameter
    model.reset_buffers("cpu")
    return model.eval(), tokenizer


def _to_memlm(t: GGUFTensor, arch: str, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """The memlm state-dict entries one GGUF tensor provides (gpt2's fused qkv provides three)."""
    m = _BLOCK_RE.match(t.name)
    if m is None:
        stem, _, kind = t.name.rpartition(".")
        ours = {v: k for k, v in _GLOBAL_NAMES.items()}.get(stem)
        if ours is None or (ours == "pos_emb" and arch != "gpt2"):
            raise _unexpected(t.name, arch)
        yield f"{ours}.{kind}", _dequantize_np(t)
        return
    i, part, kind = int(m.group(1)), m.group(2), m.group(3)
    prefix = f"blocks.{i}."
    if arch == "gpt2" and part == "attn_qkv":
        w = _dequantize_np(t)
        d, kv = config.n_head * config.head_dim, config.n_kv_heads * config.head_dim
        for name, start, stop in (("q_proj", 0, d), ("k_proj", d, d + kv), ("v_proj", d + kv, d + 2 * kv)):
            yield f"{prefix}attn.{name}.{kind}", np.ascontiguousarray(w[start:stop])
        return
    ours = {v: k for k, v in _LAYER_NAMES[arch].items()}.get(part)
    if ours is None:
        raise _unexpected(t.name, arch)
    w = _dequantize_np(t)
    heads = {"attn.q_proj": config.n_head, "attn.k_proj": config.n_kv_heads}.get(ours)
    if heads is not None and w.shape[0] == heads * config.head_dim:  # else the caller's shape check fails
        w = _unpermute_rope(w, heads)
    yield f"{prefix}{ours}.{kind}", w


def _unexpected(name: str, arch: str) -> MemlmError:
    return MemlmError(
        f"GGUF tensor '{name}' has no place in a memlm {arch} model",
        "the file uses a variant of the architecture that memlm does not implement",
    )


def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection, rotate-half order -> llama.cpp's interleaved-pair order.

    Within each head, row r = half * hd/2 + j moves to 2 * j + half, so the two rows RoPE rotates
    together become neighbours. Works for weights (rows, in) and biases (rows,).
    """
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `_permute_rope`: llama.cpp's interleaved pairs back to rotate-half order."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- import: tokenizer ---------------------------------------------------------------------------

def _tokenizer_from(f: _GGUFFile) -> Tokenizer:
    kind = f.get_str("tokenizer.ggml.model", None)
    if kind != "gpt2":
        found = "no tokenizer" if kind is None else f"tokenizer model '{kind}'"
        raise MemlmError(
            f"{f.path} has {found}, which memlm cannot rebuild",
            "supported tokenizer models: gpt2 (byte-level BPE, used by GPT-2, SmolLM2, Llama 3, ...)",
        )
    pre = f.get_str("tokenizer.ggml.pre", "default")
    if pre not in PLAIN_PRES + DIGIT_SPLIT_PRES:
        raise MemlmError(
            f"GGUF pre-tokenizer '{pre}' of {f.path} is not supported",
            f"supported: {', '.join(PLAIN_PRES + DIGIT_SPLIT_PRES)}",
        )
    tokens: list[str] = f.get_list("tokenizer.ggml.tokens")
    merges: list[str] = f.get_list("tokenizer.ggml.merges", [])
    types: list[int] = f.get_list("tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens))
    if len(types) != len(tokens):
        raise f.invalid(f"{len(tokens)} tokens but {len(types)} token types")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise f.invalid("the token list has duplicate tokens")
    pairs = []
    for merge in merges:
        # A merge is "left right"; neither side can hold a space in a byte-level vocabulary,
        # but search from 1 as llama.cpp does, so a merge of a lone " " would still split.
        cut = merge.find(" ", 1)
        if cut < 0:
            raise f.invalid(f"merge {merge!r} is not two tokens separated by a space")
        pairs.append((merge[:cut], merge[cut + 1:]))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_SPLIT_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # Control tokens are special (matched whole in text, skippable on decode); user-defined
    # tokens are matched whole too but decoded like text.
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty == gguf.TokenType.CONTROL]
    user = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
            for i, ty in enumerate(types) if ty == gguf.TokenType.USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return Tokenizer(
        tok,
        bos_id=f.get_int("tokenizer.ggml.bos_token_id", None),
        eos_id=f.get_int("tokenizer.ggml.eos_token_id", None),
        pad_id=f.get_int("tokenizer.ggml.padding_token_id", None),
        add_bos=bool(f.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=f.get_str("tokenizer.chat_template", None),
    )


# ---- export --------------------------------------------------------------------------------------

def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture a config maps to, or a MemlmError saying what does not fit."""
    flavour = (config.norm, config.positions, config.mlp)
    if flavour == ("rmsnorm", "rope", "swiglu"):
        return "llama"
    if config.norm == "layernorm" and config.positions in ("learned", "sinusoidal") and config.mlp == "gelu":
        if config.n_head * config.head_dim != config.n_embd:
            raise MemlmError(
                f"cannot export this gpt2-style model to GGUF: n_head * head_dim ({config.n_head * config.head_dim}) "
                f"differs from n_embd ({config.n_embd})",
                "llama.cpp's gpt2 architecture has no custom head size; save it as a memlm checkpoint instead",
            )
        return "gpt2"  # a sinusoidal table is written as a (fixed) learned one
    raise MemlmError(
        f"cannot export a {'/'.join(flavour)} model to GGUF: llama.cpp has no matching architecture",
        "GGUF export supports llama (rmsnorm + rope + swiglu) and gpt2 (layernorm + learned or "
        "sinusoidal positions + gelu) models",
    )


def save_gguf(model: Decoder, tokenizer: Tokenizer, path: str | Path, qtype: str = "F32") -> Path:
    """Write `model` and `tokenizer` as a GGUF file llama.cpp can run; returns the path.

    qtype: "F32", "F16", "Q8_0" or "Q4_1" for the 2-D weights (a quantized tensor whose rows are
    not a multiple of 32 falls back to F16; under Q4_1 the embeddings and the output head are
    Q8_0, as llama.cpp keeps them at 8 bits); norms and biases always stay F32. Tensors are
    converted and written one at a time, to a temporary file that replaces `path` only when complete.

    Compressed models (memlm.compress) export too. Where the formats agree their layers are
    written from the codes, not re-rounded: int8 layers and an int8 embedding as Q8_0 (see
    `_int8_to_q8_0`), int4 layers with groups of 32 as Q4_1 (the same q * d + m grid, bit for
    bit). Anything else (other group sizes, int3, low-rank or 2:4 layers, or a format that does
    not match `qtype`) is dequantized to float32, then converted to the tensor's type.
    """
    if qtype not in EXPORT_TYPES:
        raise MemlmError(f"cannot export GGUF as '{qtype}'", f"choose one of: {', '.join(EXPORT_TYPES)}")
    config = model.config
    arch = gguf_architecture(config)
    weight_type, file_type = EXPORT_TYPES[qtype]
    meta = _tokenizer_metadata(tokenizer, config.vocab_size)
    plan = _export_plan(model, arch)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _write_metadata(writer, config, arch, file_type, weight_type, meta)
        # Announce every tensor first (the header lists them all), then convert and write each.
        types = []
        for item in plan:
            t = _storage_type(item.name, item.shape, weight_type)
            types.append(t)
            block, size = gguf.GGML_QUANT_SIZES[t]  # (1, 4) for F32, (32, 34) for Q8_0, ...
            n_bytes = int(np.prod(item.shape)) // block * size
            if t in (QType.F32, QType.F16):
                writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), n_bytes, raw_dtype=t)
            else:  # the writer takes a quantized tensor's shape in bytes
                byte_shape = gguf.quant_shape_to_byte_shape(item.shape, t)
                writer.add_tensor_info(item.name, byte_shape, np.dtype(np.uint8), n_bytes, raw_dtype=t)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item, t in zip(plan, types):
            data = item.encode(t) if t not in (QType.F32, QType.F16) else None
            if data is None:  # float values, rounded to the tensor's type here
                data = gguf.quants.quantize(np.ascontiguousarray(item.make(), dtype=np.float32), t)
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


# Kept at 8 bits under Q4_1: the embedding rows and the output head are the most sensitive weights.
_EIGHT_BIT_UNDER_Q4 = ("token_embd.weight", "position_embd.weight", "output.weight")


def _storage_type(name: str, shape: tuple[int, ...], weight_type: QType) -> QType:
    if len(shape) == 1:
        return QType.F32  # norms and biases: tiny, and precision-sensitive
    if weight_type == QType.Q4_1 and name in _EIGHT_BIT_UNDER_Q4:
        weight_type = QType.Q8_0
    if weight_type in (QType.Q8_0, QType.Q4_1) and shape[-1] % gguf.GGML_QUANT_SIZES[weight_type][0]:
        return QType.F16
    return weight_type


def _no_encoding(qtype: QType) -> np.ndarray | None:
    return None


@dataclass
class _Export:
    """One tensor to write: GGUF name, numpy shape, `make()` for its float32 values, and
    `encode(qtype)` for its exact GGML blocks (rows, bytes per row) when a compressed layer
    already holds it in that type's grid (None otherwise). Both run only while writing, so at
    most one converted tensor is alive at a time."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]
    encode: Callable[[QType], np.ndarray | None] = _no_encoding


class _Sources:
    """A model's tensors by state-dict key, whether its layers are plain or compressed.

    A compressed layer (memlm.compress: it has a `spec()`) holds no `weight` parameter: its float
    weight is dequantized on demand, and its codes can be re-encoded in a matching GGML type.
    """

    def __init__(self, model: Decoder):
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))

    def _layer(self, key: str) -> tuple[torch.nn.Module | None, str]:
        name, _, kind = key.rpartition(".")
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            return None, kind
        return (module if callable(getattr(module, "spec", None)) else None), kind

    @staticmethod
    def _bias(module: torch.nn.Module) -> torch.Tensor | None:
        return module.up.bias if isinstance(module, LowRankLinear) else getattr(module, "bias", None)

    def has(self, key: str) -> bool:
        if key in self.params:
            return True
        module, kind = self._layer(key)
        return module is not None and (kind == "weight" or (kind == "bias" and self._bias(module) is not None))

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.params:
            return tuple(self.params[key].shape)
        module, kind = self._layer(key)
        if kind == "bias":
            return tuple(self._bias(module).shape)
        if isinstance(module, Int8Embedding):
            return (module.num_embeddings, module.embedding_dim)
        return (module.out_features, module.in_features)

    def values(self, key: str) -> np.ndarray:
        if key in self.params:
            t = self.params[key].detach()
        else:
            module, kind = self._layer(key)
            t = self._bias(module).detach() if kind == "bias" else dequantize_weight(module)
        return t.to(device="cpu", dtype=torch.float32).numpy()

    def encode(self, key: str, qtype: QType) -> np.ndarray | None:
        module, kind = self._layer(key)
        if key in self.params or module is None or kind != "weight":
            return None
        if qtype == QType.Q8_0 and isinstance(module, (Int8Linear, Int8Embedding)):
            return _int8_to_q8_0(module.weight_int8, module.scales)
        if qtype == QType.Q4_1 and isinstance(module, GroupQuantLinear) and module.bits == 4 and module.group_size == 32:
            return _int4_to_q4_1(module.codes(), module.scales, module.mins)
        return None


def _int8_to_q8_0(codes: torch.Tensor, scales: torch.Tensor, rows_per_chunk: int = 4096) -> np.ndarray:
    """memlm int8 (codes (rows, n), one float scale per row) as Q8_0 blocks (rows, n / 32 * 34).

    Q8_0 has one fp16 scale d per 32 values. Each block either keeps its int8 codes under the
    row's scale rounded to fp16 (exact when the scale is an fp16 number; else each value moves by
    at most 127 * |d - s|), or takes Q8_0's own rounding of the dequantized values (d = the
    block's absmax / 127): whichever is closer to memlm's values, by the block's largest error.
    """
    q_all = codes.cpu().numpy()
    s_all = scales.detach().float().cpu().numpy()
    rows, n = q_all.shape
    groups = n // 32
    out = np.empty((rows, groups * 34), dtype=np.uint8)
    for r0 in range(0, rows, rows_per_chunk):  # bounded temporaries for a large embedding
        q = q_all[r0:r0 + rows_per_chunk].reshape(-1, groups, 32)
        s = s_all[r0:r0 + rows_per_chunk]
        r = len(s)
        d = s.astype(np.float16)
        values = q.astype(np.float32) * s[:, None, None]
        err_keep = np.abs(q.astype(np.float32)).max(axis=-1) * np.abs(d.astype(np.float32) - s)[:, None]
        keep = np.concatenate([np.broadcast_to(d.view(np.uint8).reshape(r, 1, 2), (r, groups, 2)),
                               q.view(np.uint8)], axis=-1)
        requant = gguf.quants.quantize(values.reshape(r, n), QType.Q8_0)
        back = gguf.quants.dequantize(requant, QType.Q8_0).reshape(r, groups, 32)
        err_requant = np.abs(back - values).max(axis=-1)
        chosen = np.where((err_keep <= err_requant)[..., None], keep, requant.reshape(r, groups, 34))
        out[r0:r0 + r] = chosen.reshape(r, groups * 34)
    return out


def _int4_to_q4_1(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> np.ndarray:
    """memlm int4 with groups of 32 as Q4_1 blocks (rows, n / 32 * 20), bit for bit.

    Q4_1 stores the same fp16 scale (d) and min (m) per 32 values and the same 4-bit codes,
    value = q * d + m; only the nibble order differs: memlm packs neighbours (2j, 2j + 1) into a
    byte, Q4_1 packs value j (low nibble) with value j + 16 (high nibble).
    """
    c = codes.cpu().numpy().astype(np.uint8)
    rows, n = c.shape
    groups = n // 32
    blocks = c.reshape(rows, groups, 32)
    qs = blocks[..., :16] | (blocks[..., 16:] << np.uint8(4))
    d = scales.detach().cpu().half().numpy().view(np.uint8).reshape(rows, groups, 2)
    m = mins.detach().cpu().half().numpy().view(np.uint8).reshape(rows, groups, 2)
    return np.concatenate([d, m, qs], axis=-1).reshape(rows, groups * 20)


def _export_plan(model: Decoder, arch: str) -> list[_Export]:
    """Every tensor to write, in order (see `_Export`)."""
    config = model.config
    src = _Sources(model)
    plan: list[_Export] = []
    Transform = Callable[[np.ndarray], np.ndarray]

    def add(name: str, shape: tuple[int, ...], make: Callable[[], np.ndarray],
            encode: Callable[[QType], np.ndarray | None] = _no_encoding) -> None:
        plan.append(_Export(name, tuple(int(s) for s in shape), make, encode))

    def add_param(name: str, key: str, transform: Transform | None = None) -> None:
        def make() -> np.ndarray:
            w = src.values(key)
            return transform(w) if transform else w

        def encode(qtype: QType) -> np.ndarray | None:
            raw = src.encode(key, qtype)  # rows of blocks: row permutations apply as they do to values
            return transform(raw) if raw is not None and transform else raw

        add(name, src.shape(key), make, encode)

    def zeros(n: int) -> Callable[[], np.ndarray]:
        return lambda: np.zeros(n, dtype=np.float32)

    add_param("token_embd.weight", "tok_emb.weight")
    if arch == "gpt2":
        if config.positions == "learned":
            add_param("position_embd.weight", "pos_emb.weight")
        else:
            add("position_embd.weight", tuple(model.pos_table.shape), lambda: model.pos_table.float().cpu().numpy())
    # llama.cpp's gpt2 requires every bias, so a bias-free model gets zeros (they load back as none).
    need_bias = arch == "gpt2" and not config.bias
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        for mine, name in _LAYER_NAMES[arch].items():
            for kind in ("weight", "bias"):
                key = f"{ours}{mine}.{kind}"
                if src.has(key):
                    transform = None
                    if mine == "attn.q_proj":
                        transform = lambda w: _permute_rope(w, config.n_head)  # noqa: E731
                    elif mine == "attn.k_proj":
                        transform = lambda w: _permute_rope(w, config.n_kv_heads)  # noqa: E731
                    add_param(f"{theirs}{name}.{kind}", key, transform)
                elif kind == "bias" and need_bias:
                    rows = src.shape(f"{ours}{mine}.weight")[0]
                    add(f"{theirs}{name}.bias", (rows,), zeros(rows))
        if arch == "gpt2":
            keys = [f"{ours}attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            rows = (config.n_head + 2 * config.n_kv_heads) * config.head_dim

            def fused_encode(qtype: QType, keys=keys) -> np.ndarray | None:
                parts = [src.encode(f"{k}.weight", qtype) for k in keys]
                return None if any(p is None for p in parts) else np.concatenate(parts)

            add(f"{theirs}attn_qkv.weight", (rows, config.n_embd),
                lambda keys=keys: np.concatenate([src.values(f"{k}.weight") for k in keys]), fused_encode)
            if config.bias:
                add(f"{theirs}attn_qkv.bias", (rows,),
                    lambda keys=keys: np.concatenate([src.values(f"{k}.bias") for k in keys]))
            else:
                add(f"{theirs}attn_qkv.bias", (rows,), zeros(rows))
    add_param("output_norm.weight", "norm.weight")
    if src.has("norm.bias"):
        add_param("output_norm.bias", "norm.bias")
    elif need_bias:
        add("output_norm.bias", (config.n_embd,), zeros(config.n_embd))
    if not config.tied_embeddings:
        add_param("output.weight", "lm_head.weight")
    return plan


def _write_metadata(w: gguf.GGUFWriter, config: ModelConfig, arch: str, file_type: gguf.LlamaFileType,
                    weight_type: QType, meta: dict[str, Any]) -> None:
    w.add_name(config.name)
    w.add_file_type(int(file_type))
    if weight_type not in (QType.F32, QType.F16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.block_size)
    w.add_embedding_length(config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_feed_forward_length(config.ffn_hidden)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.n_kv_heads)
    if config.head_dim * config.n_head != config.n_embd:  # llama.cpp assumes n_embd / n_head otherwise
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    if arch == "llama":
        w.add_layer_norm_rms_eps(config.norm_eps)
        w.add_rope_freq_base(config.rope_theta)
        w.add_rope_dimension_count(config.head_dim)
    else:
        w.add_layer_norm_eps(config.norm_eps)
        # llama.cpp ignores this and uses the tanh GELU; memlm reads it back to stay exact.
        w.add_string("memlm.gelu_approximate", config.gelu_approximate)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    for key, add in (("bos_id", w.add_bos_token_id), ("eos_id", w.add_eos_token_id), ("pad_id", w.add_pad_token_id)):
        if meta[key] is not None:
            add(meta[key])
    w.add_add_bos_token(meta["add_bos"])
    if meta["chat_template"]:
        w.add_chat_template(meta["chat_template"])


def _tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The tokenizer.ggml.* values for a byte-level BPE, padded to the model's vocabulary."""
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    kind = spec["model"].get("type")
    if kind != "BPE" or spec.get("normalizer") is not None:
        raise MemlmError(
            f"cannot export a {kind} tokenizer{' with a normalizer' if kind == 'BPE' else ''} to GGUF",
            "GGUF export supports byte-level BPE tokenizers (e.g. memlm.tokenizer.train_bpe, GPT-2, SmolLM2)",
        )
    pre = _pre_name(spec.get("pre_tokenizer"))
    n = backend.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise MemlmError(
            f"the tokenizer has {n} tokens but the model only {vocab_size} embedding rows",
            "use the tokenizer the model was trained with",
        )
    tokens: list[str | None] = [None] * n
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        if 0 <= i < n:
            tokens[i] = token
    if any(t is None for t in tokens):
        raise MemlmError("the tokenizer's ids are not contiguous", "GGUF needs one token for every id 0..n-1")
    types = [int(gguf.TokenType.NORMAL)] * n
    for added in spec.get("added_tokens", []):
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    # Rows past the tokenizer (a vocabulary padded for speed) get placeholder tokens, as
    # llama.cpp's converter does: every embedding row needs a token.
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [int(gguf.TokenType.UNUSED)] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return {
        "pre": pre, "tokens": tokens, "types": types, "merges": merges,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        "add_bos": tokenizer.add_bos, "chat_template": tokenizer.chat_template,
    }


def _pre_name(pre: dict[str, Any] | None) -> str:
    """The llama.cpp pre-tokenizer name of a `tokenizers` pre-tokenizer we know how to express."""

    def gpt2_byte_level(p: dict[str, Any]) -> bool:
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True)

    if pre is not None and gpt2_byte_level(pre):
        return "gpt2"
    if pre is not None and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and gpt2_byte_level(parts[1])):
            return "smollm"
    raise MemlmError(
        f"cannot export this tokenizer's pre-tokenizer to GGUF: {json.dumps(pre)[:120]}",
        "supported: ByteLevel (GPT-2 regex, no prefix space), optionally after Digits(individual_digits=True)",
    )
