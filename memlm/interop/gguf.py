"""GGUF (llama.cpp's single-file format) in and out: `load_gguf`, `read_gguf_config`, `save_gguf`.

Two llama.cpp architectures map onto memlm's `Decoder`:
  llama  RMSNorm, RoPE, SwiGLU, grouped-query attention (SmolLM2, Llama 2, TinyLlama, ...)
  gpt2   LayerNorm with bias, learned positions, tanh-GELU, one fused qkv projection

The header is parsed from a memory map of the file (`_HeaderReader`: gguf.GGUFReader's
per-element numpy views cost more than an int4 model), without importing gguf-py (see QType).
Each tensor is then read into fresh memory on its own, converted (dequantized with whole-row
numpy ops, or its blocks repacked as they are into a quantized layer of the same grid) into a
model built on the meta device, and its raw blocks freed: loading holds the result plus a
tensor's blocks or two, whatever the target format (see `load_gguf`). `iter_gguf_tensors`
hands out the raw (still quantized) blocks for code that wants to keep them.

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

import contextlib
import enum
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers

from memlm.compress import assemble
from memlm.compress.assemble import InOrder, ModelAssembler
from memlm.compress.kinds import kind_of
from memlm.compress.quantize import (
    Int4Linear,
    embedding_from_codes,
    format_float_dtype,
    module_from_codes,
)
from memlm.config import ModelConfig
from memlm.errors import MemlmError, io_error
from memlm.model import Decoder, empty_model
from memlm.tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama", "gpt2")


# ---- the format's constants ----------------------------------------------------------------------
# Ids fixed by the GGUF format. memlm keeps the ones it reads here, with gguf-py's names and sizes
# (tests/test_gguf.py checks them against gguf-py), so that loading a file does not import gguf-py
# (~0.1 s: its writer, model-card and YAML code). Writing files and the k-quant dequantizers use
# gguf-py, imported where they run; a tensor type not listed here is looked up there too.


class QType(enum.IntEnum):
    """ggml tensor types by id; equal (as integers) to gguf.GGMLQuantizationType's members."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30


# (values per block, bytes per block) of each type (gguf.GGML_QUANT_SIZES).
_QUANT_SIZES = {
    QType.F32: (1, 4), QType.F16: (1, 2), QType.Q4_0: (32, 18), QType.Q4_1: (32, 20), QType.Q5_0: (32, 22),
    QType.Q5_1: (32, 24), QType.Q8_0: (32, 34), QType.Q2_K: (256, 84), QType.Q3_K: (256, 110),
    QType.Q4_K: (256, 144), QType.Q5_K: (256, 176), QType.Q6_K: (256, 210), QType.I8: (1, 1), QType.I16: (1, 2),
    QType.I32: (1, 4), QType.I64: (1, 8), QType.F64: (1, 8), QType.BF16: (1, 2),
}


class _Value(enum.IntEnum):
    """GGUF metadata value types (gguf.GGUFValueType)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# gguf.TokenType
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5
_DEFAULT_ALIGNMENT = 32  # gguf.GGUF_DEFAULT_ALIGNMENT


def _qtype(type_id: int) -> tuple[enum.IntEnum, int, int]:
    """A stored tensor type id: (the type, values per block, bytes per block). Types memlm does
    not read are named by gguf-py (ValueError for an id it does not know either)."""
    if type_id in _QUANT_SIZES:
        qtype = QType(type_id)
        return (qtype, *_QUANT_SIZES[qtype])
    import gguf

    qtype = gguf.GGMLQuantizationType(type_id)
    return (qtype, *gguf.GGML_QUANT_SIZES[qtype])


# Tensor types we can dequantize (see tests/test_gguf.py for a hand check).
SUPPORTED_TYPES = (
    QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
)

# What save_gguf writes, and the llama.cpp "file type" (a gguf.LlamaFileType name) each announces.
EXPORT_TYPES: dict[str, tuple[QType, str]] = {
    "F32": (QType.F32, "ALL_F32"),
    "F16": (QType.F16, "MOSTLY_F16"),
    "Q8_0": (QType.Q8_0, "MOSTLY_Q8_0"),
    "Q4_1": (QType.Q4_1, "MOSTLY_Q4_1"),
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


def dequantize(tensor: GGUFTensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor's values as a fresh torch tensor of `tensor.shape` (never a view of the file),
    or written into `out` (contiguous, of that shape; its dtype wins over `dtype`)."""
    t = tensor
    if t.qtype not in SUPPORTED_TYPES:
        raise MemlmError(
            f"GGUF tensor '{t.name}' has type {t.qtype.name}, which memlm cannot read",
            f"supported tensor types: {', '.join(q.name for q in SUPPORTED_TYPES)}",
        )
    if t.qtype not in _ROW_TYPES:  # the k-quants: through gguf.quants, whole
        import gguf

        values = torch.from_numpy(gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(int(t.qtype))).reshape(t.shape))
        return values.to(dtype) if out is None else out.copy_(values)
    n = t.shape[-1] if t.shape else 1
    rows = int(np.prod(t.shape[:-1], dtype=np.int64))
    raw = t.data.reshape(rows, -1)
    result = torch.empty(t.shape, dtype=dtype) if out is None else out
    out = result.view(rows, n)
    direct = out.numpy() if out.dtype == torch.float32 else None
    step = max(1, _CHUNK_VALUES // max(n, 1))
    scratch = None if direct is not None else np.empty((min(step, rows), n), dtype=np.float32)
    # A slice of rows at a time: the few passes over each slice stay in cache, and the result
    # is written once (straight into `out` for float32; else converted from a float32 slice).
    for i in range(0, rows, step):
        j = min(i + step, rows)
        part = direct[i:j] if direct is not None else scratch[:j - i]
        _dequantize_rows(t.qtype, raw[i:j], part)
        if direct is None:
            out[i:j].copy_(torch.from_numpy(part))
    return result


# Types dequantized by `_dequantize_rows` (bit for bit gguf.quants' arithmetic, with in-place
# numpy ops and no per-block Python: several times faster); any other goes through gguf.quants.
_ROW_TYPES = (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1)
_CHUNK_VALUES = 1 << 18  # values dequantized per slice (1 MB of float32)


def _dequantize_rows(qtype: QType, raw: np.ndarray, out: np.ndarray) -> None:
    """Rows of one tensor's stored data (values, or raw blocks as uint8) into `out` (rows, n) float32.

    Q8_0: x = d * q (fp16 d, int8 q); Q4_0: x = d * (q - 8); Q4_1: x = d * q + m (fp16 d and
    m, 4-bit q: value j in the low nibble of byte j, value j + 16 in its high nibble), in float32
    with the operations in gguf.quants' order, so every value is the same float.
    """
    rows, n = out.shape
    if qtype in (QType.F32, QType.F16):
        np.copyto(out, raw.reshape(rows, n), casting="unsafe")  # F16 -> F32 is exact
        return
    if qtype == QType.BF16:  # the high half of a float32
        bits = out.view(np.uint32)
        np.copyto(bits, raw.view(np.uint16).reshape(rows, n), casting="unsafe")
        np.left_shift(bits, 16, out=bits)
        return
    groups = n // 32
    o = out.reshape(rows, groups, 32)
    if qtype == QType.Q8_0:
        b = raw.reshape(rows, groups, 34)
        d = np.ascontiguousarray(b[..., :2]).view(np.float16).astype(np.float32)  # (rows, groups, 1)
        np.multiply(b[..., 2:].view(np.int8), d, out=o)
        return
    width = 18 if qtype == QType.Q4_0 else 20
    b = raw.reshape(rows, groups, width)
    qs = b[..., width - 16:]
    np.bitwise_and(qs, 15, out=o[..., :16], casting="unsafe")
    np.right_shift(qs, 4, out=o[..., 16:], casting="unsafe")
    scale = np.ascontiguousarray(b[..., :width - 16]).view(np.float16).astype(np.float32)  # (rows, groups, 1|2)
    if qtype == QType.Q4_0:
        np.subtract(o, 8, out=o)
        np.multiply(o, scale, out=o)
    else:
        np.multiply(o, scale[..., :1], out=o)
        np.add(o, scale[..., 1:], out=o)


# ---- reading the file safely ---------------------------------------------------------------------

# struct formats of GGUF's scalar metadata types (little-endian; big-endian files are refused).
_SCALARS = {
    _Value.UINT8: "<B", _Value.INT8: "<b", _Value.UINT16: "<H", _Value.INT16: "<h", _Value.UINT32: "<I",
    _Value.INT32: "<i", _Value.FLOAT32: "<f", _Value.BOOL: "<?", _Value.UINT64: "<Q", _Value.INT64: "<q",
    _Value.FLOAT64: "<d",
}
# numpy dtypes GGUF tensors of these types are viewed as (GGUFReader's convention); any other
# type is handed out as its raw blocks, uint8.
_VALUE_DTYPES = {
    QType.F32: np.float32, QType.F16: np.float16, QType.F64: np.float64, QType.I8: np.int8,
    QType.I16: np.int16, QType.I32: np.int32, QType.I64: np.int64,
}
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class _HeaderReader:
    """GGUF's header (metadata and tensor infos) parsed from a buffer (the file's memory map).

    gguf.GGUFReader builds a numpy view per metadata element: for SmolLM2's 49k tokens and
    merges that is 2.9 s and 160 MB of Python objects, more than the int4 model itself. Here a
    value becomes its Python value directly, and the string arrays (the token lists: the hot
    loop of the header, 98k strings) are walked by one tight loop over offsets. Every read is
    bounded by the file's size, so a truncated or corrupted file fails on its first impossible
    length instead of parsing garbage (or looping over a huge array length).
    """

    def __init__(self, buf, size: int):
        self._buf, self.size, self.pos = buf, size, 0

    def _need(self, n: int) -> int:
        """The current position, after checking that n more bytes exist; advances past them."""
        pos = self.pos
        if n > self.size - pos:
            raise ValueError(f"it ends after {self.size} bytes but a field or tensor needs {pos + n}")
        self.pos = pos + n
        return pos

    def take(self, n: int) -> bytes:
        pos = self._need(n)
        return self._buf[pos:pos + n]

    def u32(self) -> int:
        return _U32.unpack_from(self._buf, self._need(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self._buf, self._need(8))[0]

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8")

    def strings(self, count: int) -> list[str]:
        """`count` strings (each an 8-byte length, then UTF-8 bytes); the caller has checked that
        count * 8 bytes fit."""
        buf, pos, unpack = self._buf, self.pos, _U64.unpack_from
        out = []
        append = out.append
        try:
            for _ in range(count):
                n = unpack(buf, pos)[0]
                pos += 8
                append(buf[pos:pos + n].decode("utf-8"))  # a slice past the end comes out short:
                pos += n                                   # caught by the check below
        except struct.error:  # a length field past the end of the buffer
            pos = self.size + 1
        if pos > self.size:
            raise ValueError(f"it ends after {self.size} bytes but a string array needs more")
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _Value.STRING:
            return self.string()
        if vtype == _Value.ARRAY:
            etype, count = self.u32(), self.u64()
            fmt = _SCALARS.get(etype)
            if fmt is not None:
                width = struct.calcsize(fmt)
                return np.frombuffer(self.take(count * width), dtype=np.dtype(fmt)).tolist()
            if etype not in (_Value.STRING, _Value.ARRAY):
                raise ValueError(f"unknown metadata value type {etype}")
            if count * 8 > self.size - self.pos:  # every element starts with an 8-byte length
                raise ValueError(f"an array of {count} elements does not fit in the file")
            if etype == _Value.STRING:
                return self.strings(count)
            return [self.value(etype) for _ in range(count)]
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {vtype}")
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]


@dataclass(frozen=True)
class _Span:
    """Where a tensor's bytes lie in the file and how they are viewed."""

    start: int
    n_bytes: int
    dtype: type
    shape: tuple[int, ...]  # of the stored values (values, or rows of raw blocks)


class _GGUFFile:
    """A parsed GGUF file: typed metadata access with one-line errors, and its raw tensors.

    `tensors` are views of a memory map (nothing is touched until used); the loader reads each
    tensor with `read` instead, a plain file read into fresh memory: the file's pages then sit
    in the page cache, not in this process's resident set (a touched page of a map counts there
    for as long as the map lives).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MemlmError(f"GGUF file not found: {self.path}", "pass the path of an existing .gguf file")
        try:
            self._parse()
        except (ValueError, UnicodeDecodeError, struct.error, OverflowError) as e:
            raise self.invalid(e) from None
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if self._spans else None
        self.tensors: dict[str, GGUFTensor] = {
            name: GGUFTensor(name, qtype, shape, self._view(name)) for name, (qtype, shape) in self._infos.items()
        }

    def _parse(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f, (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size
                                          else contextlib.nullcontext(b"")) as buf:
            # Mapped, not read: only the header's pages are touched, and unmapped at the end.
            h = _HeaderReader(buf, size)
            if h.take(4) != b"GGUF":
                raise ValueError("GGUF magic invalid")
            version = h.u32()
            if version & 0xFFFF == 0:  # the version's bytes reversed: written on a big-endian machine
                raise MemlmError(f"{self.path} is a big-endian GGUF file", "convert it on a little-endian machine")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
            n_tensors, n_fields = h.u64(), h.u64()
            self.fields: dict[str, Any] = {}
            self.types: dict[str, int] = {}
            for _ in range(n_fields):
                key = h.string()
                vtype = h.u32()
                try:
                    self.fields[key] = h.value(vtype)
                except UnicodeDecodeError as e:
                    raise ValueError(f"metadata '{key}': {e}") from None
                self.types[key] = vtype
            if n_tensors * 24 > size - h.pos:  # name length, dims, type, offset: 24 bytes at least
                raise ValueError(f"{n_tensors} tensors do not fit in the file")
            infos = []
            for _ in range(n_tensors):
                name = h.string()
                n_dims = h.u32()
                if n_dims > 8:
                    raise ValueError(f"tensor '{name}' has {n_dims} dimensions")
                dims = [h.u64() for _ in range(n_dims)]  # ggml order: fastest first
                qtype = _qtype(h.u32())
                infos.append((name, qtype, dims, h.u64()))
            alignment = self.fields.get("general.alignment", _DEFAULT_ALIGNMENT)
            if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
                raise ValueError(f"general.alignment is {alignment!r}")
            data_start = -(-h.pos // alignment) * alignment
        self._infos: dict[str, tuple[QType, tuple[int, ...]]] = {}
        self._spans: dict[str, _Span] = {}
        for name, (qtype, block, type_size), dims, offset in infos:
            if name in self._infos:
                raise ValueError(f"tensor '{name}' appears twice")
            shape = tuple(int(d) for d in reversed(dims))  # numpy order
            if dims and dims[0] % block:
                raise ValueError(f"tensor '{name}' has rows of {dims[0]} values, not whole {qtype.name} blocks")
            n_bytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
            start = data_start + offset
            if start + n_bytes > size:
                raise ValueError(f"it ends after {size} bytes but tensor '{name}' needs {start + n_bytes}")
            dtype = _VALUE_DTYPES.get(qtype, np.uint8)
            stored = shape if dtype is not np.uint8 else (*shape[:-1], shape[-1] // block * type_size)
            self._infos[name] = (qtype, shape)
            self._spans[name] = _Span(start, n_bytes, dtype, stored)

    def _view(self, name: str) -> np.ndarray:
        span = self._spans[name]
        return self._map[span.start:span.start + span.n_bytes].view(span.dtype).reshape(span.shape)

    def read(self, t: GGUFTensor, rows: tuple[int, int] | None = None) -> GGUFTensor:
        """`t` with its data (or rows [a, b) of it) read into fresh memory (see the class note)."""
        span = self._spans[t.name]
        shape, start = span.shape, span.start
        if rows is not None:
            row_bytes = span.n_bytes // shape[0]
            start += rows[0] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        data = np.empty(shape, dtype=span.dtype)
        buf = memoryview(data.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(start)
            done = 0
            while done < len(buf):
                n = f.readinto(buf[done:])
                if not n:
                    raise self.invalid(f"tensor '{t.name}' is cut short")
                done += n
        return GGUFTensor(t.name, t.qtype, (*shape[:-1], t.shape[-1]), data)

    def invalid(self, reason: Exception | str) -> MemlmError:
        text = " ".join(str(reason).split())[:200] or type(reason).__name__
        return MemlmError(f"{self.path} is not a valid GGUF file: {text}", _INVALID_HINT)

    _MISSING = object()

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.fields:
            if default is self._MISSING:
                raise MemlmError(
                    f"{self.path}: GGUF metadata '{key}' is missing",
                    "the file was written by a converter memlm does not understand; re-export it",
                )
            return default
        return self.fields[key]

    def forget(self, prefix: str) -> None:
        """Drop the metadata under `prefix` (the token lists, once the tokenizer holds them)."""
        for key in [k for k in self.fields if k.startswith(prefix)]:
            del self.fields[key], self.types[key]

    def get_int(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value is not default and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.invalid(f"metadata '{key}' should be an integer, got {value!r}")
        return value

    def get_float(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.invalid(f"metadata '{key}' should be a finite number, got {value!r}")
        if self.types[key] == _Value.FLOAT32:
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
    rows = emb.data.shape[0]
    return all(np.array_equal(f.read(out, (i, min(i + step, rows))).data, f.read(emb, (i, min(i + step, rows))).data)
               for i in range(0, rows, step))


def _has_bias(f: _GGUFFile) -> bool:
    """memlm has one `bias` switch; any nonzero bias tensor turns it on (missing ones become 0).

    All-zero biases (gpt2 files must carry them; memlm writes zeros for bias-free models) are
    equivalent to none, so they load as a bias-free model.
    """
    for t in f.tensors.values():
        if t.name.endswith(".bias") and bool(dequantize(f.read(t)).any()):
            return True
    return False


# ---- import: weights -----------------------------------------------------------------------------

def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, weight_format: str | None = None,
              use_kernel: bool | None = None) -> tuple[Decoder, Tokenizer]:
    """A memlm `Decoder` (eval mode, CPU) and its `Tokenizer`.

    weight_format None dequantizes every tensor to `dtype`. "fp32", "bf16", "int8", "int4" (the
    formats of memlm.memory.estimate) are reached tensor by tensor while the file is read, so
    the float32 model never exists: each tensor is read into fresh memory and converted, by two
    threads while this one builds the tokenizer and assembles the results in file order. Where
    the file already holds a tensor on the target's grid it is copied, not re-rounded:
      int4  Q4_1 block weights -> Int4Linear with groups of 32 (the same codes, fp16 scales d
            and mins m: x = d*q + m, bit for bit)
      int8  Q8_0 block weights -> Int8Linear with a float32 scale per 32 inputs (Q8_0's fp16 d)
    Under "int4" and "int8" a Q8_0 token embedding (with a Q8_0 output head when untied) loads
    as an int8 embedding with group-32 scales, a tied head computing from it, instead of
    float32. That is what makes SmolLM2 fit an int4 budget: its 49152x576 table is 32 MiB
    this way, 108 MiB in float32, more than all of its int4 layers (the estimator reads this
    off the modules: memlm.memory.estimate.estimate_for_model). Every other tensor (F32, F16,
    Q6_K, ... or a block type that is not the target's) is dequantized alone, then converted
    like a float checkpoint's (`memlm.compress.quantize.linear_in_format`). `use_kernel` as in
    `quantize_model`.
    """
    f = _GGUFFile(path)
    config = _config_from(f)
    unsupported = sorted({t.qtype.name for t in f.tensors.values() if t.qtype not in SUPPORTED_TYPES})
    if unsupported:
        raise MemlmError(
            f"{f.path} holds tensors of type {', '.join(unsupported)}, which memlm cannot read",
            f"supported tensor types: {', '.join(q.name for q in SUPPORTED_TYPES)}",
        )
    float_dtype = format_float_dtype(weight_format, dtype)
    arch = f.get_str("general.architecture")
    int8_embedding = _int8_embedding(f, config, weight_format)

    def plan(t: GGUFTensor) -> tuple[GGUFTensor, list[_Part]]:
        """What a file tensor becomes, with the memory each part is written into: allocated
        here, by the thread that keeps the model (glibc gives each thread its own heap, and a
        result allocated in a worker's would leave its memory there, unusable to this thread,
        when the model later frees it: `memlm compress` then peaked 13-18% higher)."""
        if (t.name == "output.weight" and config.tied_embeddings) or (t.name.endswith(".bias") and not config.bias):
            return t, []  # a copy of the embedding, or all-zero biases (see _is_tied, _has_bias)
        if int8_embedding and t.name in ("token_embd.weight", "output.weight"):
            key = {"token_embd.weight": "tok_emb.weight", "output.weight": "lm_head.weight"}[t.name]
            return t, [_Part(key, 0, t.shape[0], None, t.shape, "table", _int8_buffers(*t.shape))]
        scheme = _direct_scheme(t, weight_format)
        parts = []
        for key, start, stop, heads in _parts(t, arch, config):
            shape = (stop - start, *t.shape[1:])
            if scheme == "int4":
                out = _int4_buffers(*shape)
            elif scheme == "int8":
                out = _int8_buffers(*shape)
            else:
                out = (torch.empty(shape, dtype=float_dtype),)
            parts.append(_Part(key, start, stop, heads, shape, scheme or "float", out))
        return t, parts

    def convert(planned: tuple[GGUFTensor, list[_Part]]) -> list[tuple[str, _Part, torch.Tensor | torch.nn.Module]]:
        """A planned tensor read and written into its parts' memory: (file name, part, values in
        the model's dtype or a finished layer). Runs in a worker thread: reads, changes nothing."""
        t, parts = planned
        if not parts:
            return []
        if parts[0].kind == "table":
            return [(t.name, parts[0], _q8_0_table(f, t, *parts[0].out))]
        raw, qtype = f.read(t).data, t.qtype
        if len(t.shape) < 2:  # a norm or a bias: its values are what rows are moved of
            raw, qtype = dequantize(GGUFTensor(t.name, t.qtype, t.shape, raw)).numpy(), QType.F32
        # Rows are moved (q/k reordered, a fused qkv split) on the stored blocks, then each part
        # is converted: dequantized once into the model's dtype, or its blocks kept as they are.
        done = []
        for part in parts:
            rows = _rows(raw, part.start, part.stop, part.heads)
            if part.kind == "int4":
                value = _q4_1_to_int4(rows, *part.out, use_kernel=use_kernel)
            elif part.kind == "int8":
                codes, scales = part.out
                _q8_0_into(rows, codes.numpy(), scales.numpy())
                value = module_from_codes("int8", {"weight_int8": codes, "scales": scales})
            else:
                value = dequantize(GGUFTensor(t.name, qtype, part.shape, rows), float_dtype, out=part.out[0])
            done.append((t.name, part, value))
        return done

    # Two threads convert (numpy and torch release the GIL, and two threads that never wait for
    # each other keep their share of a busy machine) from here on, while this one builds the model
    # and the tokenizer, then puts each result in file order. Results are the model's own tensors
    # and layers, so the threads may run ahead: beyond those, loading holds a tensor's raw blocks
    # per thread. Where the assembler still quantizes what it is put (a float block weight loaded
    # as int8/int4), it does so here, one layer at a time, while one thread prepares the next: at
    # most one float layer waits beside it.
    tensors = list(f.tensors.values())
    requantized = weight_format in ("int8", "int4") and any(  # a block Linear's weight not kept as stored
        _BLOCK_RE.match(t.name) and t.name.endswith(".weight") and len(t.shape) == 2
        and not _direct_scheme(t, weight_format) for t in tensors)
    workers = assemble.LOAD_WORKERS  # read when called: 0 runs the conversions inline (a profile)
    workers, ahead = (min(1, workers), 1) if requantized else (workers, len(tensors))
    with InOrder(convert, (plan(t) for t in tensors), workers=workers, ahead=ahead) as results:
        model = empty_model(config)
        assembler = ModelAssembler(model, weight_format, dtype, use_kernel, source=str(f.path))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tokenizer = _tokenizer_from(f)
        f.forget("tokenizer.ggml.")  # ~10 MB of Python strings the tokenizer now holds itself
        if tokenizer.vocab_size > config.vocab_size:
            raise MemlmError(
                f"{f.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}",
                "the file is inconsistent; re-export it",
            )
        for done in results:
            for name, part, value in done:
                if part.key not in expected:  # e.g. blk.12.* in a 12-layer model
                    raise _unexpected(name, arch)
                if part.shape != expected[part.key]:
                    raise MemlmError(
                        f"{f.path}: tensor '{name}' has shape {part.shape}, expected {expected[part.key]}",
                        "the metadata does not match the tensors; re-export the file",
                    )
                if isinstance(value, torch.nn.Module):
                    assembler.put_module(part.key.removesuffix(".weight"), value)
                else:  # converted to the format here, before the next tensor is taken
                    assembler.put(part.key, value)
            del done
    for key in assembler.missing():
        if not key.endswith(".bias"):
            raise MemlmError(f"{f.path}: no tensor for '{key}'", "the file is incomplete; re-export it")
        # e.g. llama files with q/k/v biases but none on o_proj
        assembler.put(key, torch.zeros(expected[key]))
    return assembler.finish(), tokenizer


def gguf_layout(path: str | Path, weight_format: str | None) -> dict:
    """What `load_gguf(path, weight_format=...)` will build, read from the header alone: the
    block Linears' group size (32 where Q4_1/Q8_0 blocks are kept as they are) and whether the
    embedding loads as group-32 int8 (memlm.memory.estimate's layout keywords)."""
    f = _GGUFFile(path)
    config = _config_from(f)
    direct = any(_direct_scheme(t, weight_format) for t in f.tensors.values())
    int8_embedding = _int8_embedding(f, config, weight_format)
    return {"group_size": 32 if direct else None, "quantize_embedding": int8_embedding,
            "embedding_group_size": 32 if int8_embedding else None}


def _direct_scheme(t: GGUFTensor, weight_format: str | None) -> str | None:
    """"int4" / "int8" when a block weight's blocks already are that format's layer (else None)."""
    if _BLOCK_RE.match(t.name) is None or not t.name.endswith(".weight") or len(t.shape) != 2:
        return None
    if weight_format == "int4" and t.qtype == QType.Q4_1:
        return "int4"
    if weight_format == "int8" and t.qtype == QType.Q8_0:
        return "int8"
    return None


def _int8_embedding(f: _GGUFFile, config: ModelConfig, weight_format: str | None) -> bool:
    """Whether the token embedding (and an untied head) load as group-32 int8 straight from Q8_0."""
    if weight_format not in ("int4", "int8"):
        return False
    tables = ["token_embd.weight"] + ([] if config.tied_embeddings else ["output.weight"])
    return all(name in f.tensors and f.tensors[name].qtype == QType.Q8_0 for name in tables)


@dataclass(frozen=True)
class _Part:
    """One state-dict entry a file tensor provides (see `_parts`), as `load_gguf` plans it: its
    rows of the tensor, its shape, how it is converted ("float", "int4", "int8", "table": a Q8_0
    table to int8) and the tensors it is written into."""

    key: str
    start: int
    stop: int
    heads: int | None
    shape: tuple[int, ...]
    kind: str
    out: tuple[torch.Tensor, ...]


def _int4_buffers(rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An int4 g32 layer's tensors in the portable layout: packed codes, fp16 scales and mins."""
    return (torch.empty(rows, n // 2, dtype=torch.uint8), torch.empty(rows, n // 32, dtype=torch.float16),
            torch.empty(rows, n // 32, dtype=torch.float16))


def _int8_buffers(rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A group-32 int8 layer's (or table's) tensors: int8 codes and float32 scales."""
    return torch.empty(rows, n, dtype=torch.int8), torch.empty(rows, n // 32, dtype=torch.float32)


def _q8_0_table(f: _GGUFFile, t: GGUFTensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.nn.Module:
    """A Q8_0 embedding (or untied head) as an int8 module, written into `codes` and `scales` a
    slice of rows at a time: the raw blocks of the whole table (30 MB for SmolLM2) never sit
    beside its codes."""
    rows = t.shape[0]
    step = 4096
    for i in range(0, rows, step):
        j = min(i + step, rows)
        _q8_0_into(f.read(t, (i, j)).data, codes[i:j].numpy(), scales[i:j].numpy())
    if t.name == "token_embd.weight":
        return embedding_from_codes(codes, scales)
    return module_from_codes("int8", {"weight_int8": codes, "scales": scales})


def _q4_1_to_int4(blocks: np.ndarray, packed: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                  mins: torch.Tensor | None = None, use_kernel: bool | None = None) -> Int4Linear:
    """Q4_1 blocks (rows, n / 32 * 20) as an Int4Linear with groups of 32 (no bias), bit for bit:
    the inverse of `_int4_to_q4_1`; written into `packed`, `scales`, `mins` (see `_int4_buffers`)
    when given. A block is fp16 d, fp16 m, then 16 bytes holding value j in the low nibble of
    byte j and value j + 16 in its high nibble; memlm's portable layout (what it saves, and what
    the layer loads from a state dict) packs values 2i, 2i + 1 into byte i.

    The nibbles are moved 8 bytes at a time: in a 64-bit word w of 8 Q4_1 bytes, the low
    nibbles l = w & 0x0F.. and `l | l >> 4` put values (2i, 2i + 1) into byte 2i, whose even
    bytes are then the packed bytes (a uint16 view, truncated to uint8); the high nibbles alike.
    """
    rows, groups = blocks.shape[0], blocks.shape[1] // 20
    if packed is None:
        packed, scales, mins = _int4_buffers(rows, groups * 32)
    b = blocks.reshape(rows, groups, 20)
    dm = b[..., :4].view(np.float16)  # (rows, groups, 2): d, m
    np.copyto(scales.numpy(), dm[..., 0])
    np.copyto(mins.numpy(), dm[..., 1])
    words = b[..., 4:].view(np.uint64)  # (rows, groups, 2): bytes 0-7 and 8-15 of the codes
    out = packed.numpy().reshape(rows, groups, 16)
    four = np.uint64(4)
    low = words & _LOW_NIBBLES
    low |= low >> four
    np.copyto(out[..., :8], low.view(np.uint16), casting="unsafe")  # values 0..15 of the group
    high = words >> four
    high &= _LOW_NIBBLES
    high |= high >> four
    np.copyto(out[..., 8:], high.view(np.uint16), casting="unsafe")  # values 16..31
    layer = Int4Linear(groups * 32, rows, 32, bias=False, device="meta", use_kernel=use_kernel)
    layer.load_state_dict({"weight_packed": packed, "scales": scales, "mins": mins}, assign=True)
    return layer


_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)


def _q8_0_to_int8(blocks: np.ndarray) -> dict[str, torch.Tensor]:
    """Q8_0 blocks (rows, n / 32 * 34) as memlm int8 codes (rows, n) and float32 scales (rows, n / 32),
    exact: a block is an fp16 d then 32 int8 codes q, x = d * q, and every fp16 is a float32."""
    rows, groups = blocks.shape[0], blocks.shape[1] // 34
    codes = np.empty((rows, groups * 32), dtype=np.int8)
    scales = np.empty((rows, groups), dtype=np.float32)
    _q8_0_into(blocks, codes, scales)
    return {"weight_int8": torch.from_numpy(codes), "scales": torch.from_numpy(scales)}


def _q8_0_into(blocks: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
    """Q8_0 blocks (rows, groups * 34) into int8 `codes` (rows, groups * 32) and float32 `scales`."""
    rows, groups = scales.shape
    b = blocks.reshape(rows, groups, 34)
    codes.reshape(rows, groups, 32)[...] = b[..., 2:].view(np.int8)
    scales[...] = np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0]


def _parts(t: GGUFTensor, arch: str, config: ModelConfig) -> list[tuple[str, int, int, int | None]]:
    """The memlm state-dict entries one GGUF tensor provides (gpt2's fused qkv provides three):
    (key, first row, end row, heads whose rows llama.cpp reordered or None). Only whole rows are
    moved, so a part applies alike to values and to raw blocks (rows, bytes per row)."""
    rows = t.shape[0] if t.shape else 1
    m = _BLOCK_RE.match(t.name)
    if m is None:
        stem, _, kind = t.name.rpartition(".")
        ours = {v: k for k, v in _GLOBAL_NAMES.items()}.get(stem)
        if ours is None or (ours == "pos_emb" and arch != "gpt2"):
            raise _unexpected(t.name, arch)
        return [(f"{ours}.{kind}", 0, rows, None)]
    i, part, kind = int(m.group(1)), m.group(2), m.group(3)
    prefix = f"blocks.{i}."
    if arch == "gpt2" and part == "attn_qkv":
        d, kv = config.n_head * config.head_dim, config.n_kv_heads * config.head_dim
        return [(f"{prefix}attn.{name}.{kind}", min(start, rows), min(stop, rows), None)  # short: the shape check
                for name, start, stop in (("q_proj", 0, d), ("k_proj", d, d + kv), ("v_proj", d + kv, d + 2 * kv))]
    ours = {v: k for k, v in _LAYER_NAMES[arch].items()}.get(part)
    if ours is None:
        raise _unexpected(t.name, arch)
    heads = {"attn.q_proj": config.n_head, "attn.k_proj": config.n_kv_heads}.get(ours)
    if heads is not None and rows != heads * config.head_dim:  # not reordered: the shape check refuses it
        heads = None
    return [(f"{prefix}{ours}.{kind}", 0, rows, heads)]


def _rows(w: np.ndarray, start: int, stop: int, heads: int | None) -> np.ndarray:
    """Rows [start, stop) of `w`, in memlm's order (see `_parts`)."""
    w = w[start:stop]
    return np.ascontiguousarray(_unpermute_rope(w, heads)) if heads is not None else w


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
    types: list[int] = f.get_list("tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise f.invalid(f"{len(tokens)} tokens but {len(types)} token types")
    if not all(isinstance(t, str) for t in tokens) or not all(isinstance(m, str) for m in merges) \
            or not all(isinstance(t, int) for t in types):
        raise f.invalid("the tokens and merges must be strings, the token types integers")
    vocab = dict(zip(tokens, range(len(tokens))))
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
    try:
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    except Exception as e:  # tokenizers raises a bare Exception (a merge of tokens not in the vocabulary)
        raise f.invalid(e) from None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_SPLIT_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # Control tokens are special (matched whole in text, skippable on decode); user-defined
    # tokens are matched whole too but decoded like text.
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty == _TOKEN_CONTROL]
    user = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
            for i, ty in enumerate(types) if ty == _TOKEN_USER_DEFINED]
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
    if config.kind != "decoder":
        raise MemlmError(f"llama.cpp runs decoder models; this is a {config.kind} model",
                         "export it with --to safetensors (memlm.load reads that folder back)")
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
    import gguf

    if qtype not in EXPORT_TYPES:
        raise MemlmError(f"cannot export GGUF as '{qtype}'", f"choose one of: {', '.join(EXPORT_TYPES)}")
    config = model.config
    arch = gguf_architecture(config)
    weight_type, file_type_name = EXPORT_TYPES[qtype]
    file_type = gguf.LlamaFileType[file_type_name]
    meta = _tokenizer_metadata(tokenizer, config.vocab_size)
    plan = _export_plan(model, arch)

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_metadata(writer, config, arch, file_type, weight_type, meta)
        # Announce every tensor first (the header lists them all), then convert and write each.
        types = []
        for item in plan:
            t = _storage_type(item.name, item.shape, weight_type)
            types.append(t)
            block, size = _QUANT_SIZES[t]  # (1, 4) for F32, (32, 34) for Q8_0, ...
            n_bytes = int(np.prod(item.shape)) // block * size
            theirs = gguf.GGMLQuantizationType(int(t))
            if t in (QType.F32, QType.F16):
                writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), n_bytes, raw_dtype=theirs)
            else:  # the writer takes a quantized tensor's shape in bytes
                byte_shape = gguf.quant_shape_to_byte_shape(item.shape, theirs)
                writer.add_tensor_info(item.name, byte_shape, np.dtype(np.uint8), n_bytes, raw_dtype=theirs)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item, t in zip(plan, types):
            data = item.encode(t) if t not in (QType.F32, QType.F16) else None
            if data is None:  # float values, rounded to the tensor's type here
                data = gguf.quants.quantize(np.ascontiguousarray(item.make(), dtype=np.float32),
                                            gguf.GGMLQuantizationType(int(t)))
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails again
            writer.close()
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise io_error(e, f"export to {path}") from e
        raise
    return path


# Kept at 8 bits under Q4_1: the embedding rows and the output head are the most sensitive weights.
_EIGHT_BIT_UNDER_Q4 = ("token_embd.weight", "position_embd.weight", "output.weight")


def _storage_type(name: str, shape: tuple[int, ...], weight_type: QType) -> QType:
    if len(shape) == 1:
        return QType.F32  # norms and biases: tiny, and precision-sensitive
    if weight_type == QType.Q4_1 and name in _EIGHT_BIT_UNDER_Q4:
        weight_type = QType.Q8_0
    if weight_type in (QType.Q8_0, QType.Q4_1) and shape[-1] % _QUANT_SIZES[weight_type][0]:
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

    A compressed layer (one memlm.compress.kinds says storage records) holds no `weight` parameter: its float
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
        layer = kind_of(module)
        return (module if layer is not None and layer.spec(module) is not None else None), kind

    @staticmethod
    def _bias(module: torch.nn.Module) -> torch.Tensor | None:
        return kind_of(module).bias(module)

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
        return kind_of(module).shape(module)

    def values(self, key: str) -> np.ndarray:
        if key in self.params:
            t = self.params[key].detach()
        else:
            module, kind = self._layer(key)
            t = self._bias(module).detach() if kind == "bias" else kind_of(module).dense_weight(module)
        return t.to(device="cpu", dtype=torch.float32).numpy()

    def encode(self, key: str, qtype: QType) -> np.ndarray | None:
        module, kind = self._layer(key)
        if key in self.params or module is None or kind != "weight":
            return None
        state = kind_of(module).quantized_state(module)  # the codes the layer holds, if any
        if qtype == QType.Q8_0 and state is not None and "weight_int8" in state:
            return _int8_to_q8_0(state["weight_int8"], state["scales"])
        if qtype == QType.Q4_1 and kind_of(module).name == "int4" and module.group_size == 32:
            return _int4_to_q4_1(state["codes"], state["scales"], state["mins"])
        return None


def _int8_to_q8_0(codes: torch.Tensor, scales: torch.Tensor, rows_per_chunk: int = 4096) -> np.ndarray | None:
    """memlm int8 (codes (rows, n), a float scale per row or per group) as Q8_0 blocks (rows, n / 32 * 34).

    Q8_0 has one fp16 scale d per 32 values. Each block either keeps its int8 codes under its
    scale (the row's, or its group's) rounded to fp16 (exact when the scale is an fp16 number, as
    for a Q8_0 file loaded into group-32 int8; else each value moves by at most 127 * |d - s|),
    or takes Q8_0's own rounding of the dequantized values (d = the block's absmax / 127):
    whichever is closer to memlm's values, by the block's largest error. None when the groups
    do not line up with Q8_0's blocks (a group size that is not a multiple of 32).
    """
    import gguf

    q_all = codes.cpu().numpy()
    s_all = scales.detach().float().cpu().numpy()
    rows, n = q_all.shape
    groups = n // 32
    if s_all.ndim == 2:  # group-wise: each Q8_0 block takes the scale of the group it lies in
        group = n // s_all.shape[1]
        if group % 32:
            return None
        s_all = np.repeat(s_all, group // 32, axis=1)
    else:
        s_all = np.broadcast_to(s_all[:, None], (rows, groups))
    out = np.empty((rows, groups * 34), dtype=np.uint8)
    for r0 in range(0, rows, rows_per_chunk):  # bounded temporaries for a large embedding
        q = q_all[r0:r0 + rows_per_chunk].reshape(-1, groups, 32)
        s = s_all[r0:r0 + rows_per_chunk]  # (r, groups): the scale of every block
        r = len(s)
        d = s.astype(np.float16)
        values = q.astype(np.float32) * s[..., None]
        err_keep = np.abs(q.astype(np.float32)).max(axis=-1) * np.abs(d.astype(np.float32) - s)
        keep = np.concatenate([d.view(np.uint8).reshape(r, groups, 2), q.view(np.uint8)], axis=-1)
        requant = gguf.quants.quantize(values.reshape(r, n), gguf.GGMLQuantizationType.Q8_0)
        back = gguf.quants.dequantize(requant, gguf.GGMLQuantizationType.Q8_0).reshape(r, groups, 32)
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
    import gguf

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
    types = [_TOKEN_NORMAL] * n
    for added in spec.get("added_tokens", []):
        types[added["id"]] = _TOKEN_CONTROL if added["special"] else _TOKEN_USER_DEFINED
    # Rows past the tokenizer (a vocabulary padded for speed) get placeholder tokens, as
    # llama.cpp's converter does: every embedding row needs a token.
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [_TOKEN_UNUSED] * (vocab_size - n)
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
