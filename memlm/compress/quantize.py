"""Weight-only quantization: int8 per output channel, int4 / int3 per group along the input.

Two steps, as in gpt-fast: `quantize_state(linear, scheme)` turns one `nn.Linear` into the
tensors of its compressed form, and `swap_linears` replaces modules by name with modules built
from those tensors. The model is converted one layer at a time, so there is never a full
float32 copy of it; each quantized module dequantizes (or runs a packed kernel) per forward.

Formats (what is in memory is what is saved, see storage.py):
  int8   `weight_int8` (out, in) int8, `scales` (out,) float32:  w = q * scale, q in -127..127;
         or, with a group size g, `scales` (out, in/g) float32, one per g inputs (what GGUF's
         Q8_0 stores: g = 32, its fp16 scales held exactly in float32)
  int4   `weight_packed` (out, in/2) uint8, two codes per byte, low nibble = even input column;
         `scales`, `mins` (out, in/group) float16:  w = q * scale + min, q in 0..15
  int3   `weight_packed` (out, 3*in/8) uint8, eight 3-bit codes in every 3 bytes (little-endian
         bit order: code j of a run of 8 sits at bits 3j..3j+2 of the 24-bit word); same
         scales/mins with q in 0..7

The min/scale representation (not an integer zero point) reproduces a GGUF Q4_1 grid exactly.

Int4 compute: PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations) when
it is there and the layer's shape suits it (out_features % 64 == 0), else dequantize-then-matmul.
Measured on the dev box (1 thread, 576x1536 layer, torch 2.13):
                        kernel    dequantize   (dense fp32)
  decode, 1 token       0.10 ms   0.97 ms      0.14 ms
  prefill 512, fp32 in  16.7 ms   16.0 ms      15.2 ms
  prefill 512, bf16 in  16.2 ms    8.7 ms
Decode is what a served model spends its time on, so the kernel is the default. It wants its own
weight layout: a kernel-backed layer holds its weight in that layout (no second copy) and
converts to/from the portable layout above only when saved or loaded.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from memlm.errors import MemlmError

Scheme = Literal["int8", "int4", "int3"]
GROUP_SIZES = (128, 64, 32)  # allowed group sizes, largest first
INT8_CHUNK_ELEMENTS = 1 << 20  # weights converted to float at once by the fp32 int8 path (4 MB)
DEQUANT_CHUNK_ELEMENTS = 1 << 20  # int4/int3 weights dequantized at once when no kernel takes the call
INT8_KERNEL_MAX_ROWS = 8  # `_weight_int8pack_mm` beats convert-then-matmul only for a few rows (bf16)


# ------------------------------------------------------------------------------ helpers


def is_block_linear(name: str, module: nn.Module) -> bool:
    """The default filter: every plain Linear inside the transformer blocks."""
    return name.startswith("blocks.") and type(module) is nn.Linear


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr; yields `advance()`. Silent when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    show = enabled and sys.stderr.isatty()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not show,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def choose_group_size(in_features: int, requested: int) -> int:
    """The largest of 128/64/32 that is <= `requested` and divides `in_features`."""
    if requested not in GROUP_SIZES:
        raise MemlmError(f"group_size must be one of {GROUP_SIZES}, got {requested}")
    for g in GROUP_SIZES:
        if g <= requested and in_features % g == 0:
            return g
    raise MemlmError(
        f"cannot quantize a layer with {in_features} inputs group-wise: no group of {GROUP_SIZES} divides it",
        "int4/int3 need in_features to be a multiple of 32; use int8 for this model",
    )


class _KeepsScaleDtype(nn.Module):
    """`model.to(torch.bfloat16)` must not round the quantization scales: they keep their dtype
    (the stored format) and only follow device moves."""

    _fixed_dtype_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {n: getattr(self, n) for n in self._fixed_dtype_buffers}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self


def rows_matmul(grad_out: torch.Tensor, weight_rows: Callable[[int, int], torch.Tensor], out_features: int,
                in_features: int) -> torch.Tensor:
    """grad_out (..., out) @ W (out, in) with W materialised DEQUANT_CHUNK_ELEMENTS weights at a
    time: `weight_rows(i, j)` gives rows i..j of W in grad_out's dtype."""
    step = max(1, DEQUANT_CHUNK_ELEMENTS // max(1, in_features))
    if out_features <= step:
        return grad_out @ weight_rows(0, out_features)
    grad_in = None
    for i in range(0, out_features, step):
        part = grad_out[..., i:i + step] @ weight_rows(i, min(i + step, out_features))
        grad_in = part if grad_in is None else grad_in.add_(part)
    return grad_in


class _FrozenMatmul(torch.autograd.Function):
    """x @ W^T of a quantized weight (never trained) under autograd. The layer's own no-grad
    paths compute the output and nothing is saved; backward computes grad_x = grad_y @ W from
    the packed weight again, a slice of rows at a time. Plain autograd would keep every float
    slice the forward dequantized: the whole layer in float32, until backward (as QLoRA's
    4-bit matmul, which saves only the quantized state)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.dtype = layer, x.dtype
        return layer.matmul(x)  # grad mode is off here

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        layer = ctx.layer
        rows = lambda i, j: layer.weight_rows(i, j, grad_out.dtype)  # noqa: E731
        return rows_matmul(grad_out, rows, layer.out_features, layer.in_features).to(ctx.dtype), None


def frozen_matmul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer.matmul(x), differentiable in x without keeping a float copy of the weight."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenMatmul.apply(x, layer)
    return layer.matmul(x)


# ------------------------------------------------------------------------------ int8


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32,
                  group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: (q (out, in) int8, scales), |w - q*s| <= s/2.

    One scale per row (scales (out,)), or per group of `group_size` inputs (scales (out, in/g)).
    The scale is rounded up in `scale_dtype`, so 127 * scale still covers its values' largest |w|.
    """
    w = w.detach().float()
    out, inp = w.shape
    if group_size is not None:
        if inp % group_size:
            raise MemlmError(f"int8 group size {group_size} does not divide in_features {inp}")
        q, scales = quantize_int8(w.reshape(out * inp // group_size, group_size), scale_dtype)
        return q.view(out, inp), scales.view(out, inp // group_size)
    absmax = w.abs().amax(dim=1)
    scales = (absmax / 127.0).to(scale_dtype)
    short = scales.float() * 127.0 < absmax
    scales = torch.where(short, torch.nextafter(scales, torch.tensor(float("inf"), dtype=scale_dtype)), scales)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero rows: any scale works
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def int8_group_size(weight_int8: torch.Tensor, scales: torch.Tensor) -> int | None:
    """The group size of int8 `scales` (None: one scale per row)."""
    return weight_int8.shape[-1] // scales.shape[-1] if scales.dim() == weight_int8.dim() else None


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = q * scale for codes (..., in) and scales (...,) per row or (..., in/g) per group."""
    w = q.to(dtype)
    s = scales.to(dtype)
    if s.dim() == q.dim():  # grouped: every g inputs share a scale
        w.view(*q.shape[:-1], s.shape[-1], -1).mul_(s[..., None])
        return w
    return w.mul_(s[..., None])


def memlm_kernels_fit(x: torch.Tensor, in_features: int, group_size: int | None) -> bool:
    """Whether memlm's own CPU ops (memlm.kernels) take this call: a CPU float input, widths in
    blocks of 32, no gradients, and the kernels built on this machine. Which of their paths runs
    for the call's row count (the integer kernels, AMX, dequantize + matmul) is measured per
    machine (memlm.kernels.choose)."""
    from memlm import kernels

    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and in_features % 32 == 0
        and (group_size is None or group_size % 32 == 0) and not torch.is_grad_enabled()
        and kernels.available()
    )


def _int8_matmul(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, memlm_kernel: bool = True) -> torch.Tensor:
    """x @ (w_int8 * scales)^T without a float copy of more than this one layer (memlm_kernel:
    through memlm.kernels where it fits)."""
    rows = x.numel() // x.shape[-1]
    grouped = scales.dim() == 2
    if memlm_kernel and memlm_kernels_fit(x, w_int8.shape[1], int8_group_size(w_int8, scales)):
        from memlm.kernels import choose

        return choose.int8_linear(x, w_int8, scales)
    if (
        not grouped and x.dtype == torch.bfloat16 and x.device.type == "cpu" and rows <= INT8_KERNEL_MAX_ROWS
        and w_int8.shape[1] % 32 == 0  # the CPU kernel crashes on other widths (torch 2.13)
    ):
        y = torch._weight_int8pack_mm(x.reshape(rows, -1), w_int8, scales.to(x.dtype))
        return y.view(*x.shape[:-1], -1)
    # fp32 activations: the int8 kernel is a slow reference path there (0.9 ms vs 0.13 ms).
    # A large table (a tied head: vocab x d) is converted a slice of rows at a time, so no float
    # copy of more than INT8_CHUNK_ELEMENTS weights exists at once. Per-row scales scale the
    # output; group scales (no kernel takes them) scale the converted slice before the matmul.
    step = max(1, INT8_CHUNK_ELEMENTS // w_int8.shape[1])
    if grouped:
        def part(i: int, j: int) -> torch.Tensor:
            return F.linear(x, dequantize_int8(w_int8[i:j], scales[i:j], x.dtype))
    else:
        s = scales.to(x.dtype)

        def part(i: int, j: int) -> torch.Tensor:
            return F.linear(x, w_int8[i:j].to(x.dtype)) * s[i:j]
    if w_int8.shape[0] <= step:
        return part(0, w_int8.shape[0])
    y = x.new_empty(*x.shape[:-1], w_int8.shape[0])
    for i in range(0, w_int8.shape[0], step):
        y[..., i:i + step] = part(i, i + step)
    return y


def _int8_scales_shape(rows: int, cols: int, group_size: int | None) -> tuple[int, ...]:
    if group_size is None:
        return (rows,)
    if group_size <= 0 or cols % group_size:
        raise MemlmError(f"int8 group size {group_size} does not divide {cols}")
    return (rows, cols // group_size)


class Int8Linear(_KeepsScaleDtype):
    """Linear with an int8 weight and float32 scales: one per output channel, or one per group of
    `group_size` inputs (the layout of GGUF's Q8_0, loaded without re-rounding)."""

    _fixed_dtype_buffers = ("scales",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 group_size: int | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(_int8_scales_shape(out_features, in_features, group_size),
                                                   dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    memlm_kernel = True  # decode through memlm.kernels where they run; False: PyTorch's paths only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_matmul(self, x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_matmul(x, self.weight_int8, self.scales, self.memlm_kernel)

    def weight_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight_int8[start:stop], self.scales[start:stop], dtype)

    def compute_path(self) -> str:
        from memlm import kernels

        return "memlm" if self.memlm_kernel and kernels.available() else "torch"

    def spec(self) -> dict[str, Any]:
        # Per-row layers keep the original spec, so folders they are saved in read as before.
        return {"kind": "int8"} if self.group_size is None else {"kind": "int8", "group_size": self.group_size}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + ("" if self.group_size is None else f", group_size={self.group_size}"))


class Int8Embedding(nn.Module):
    """Embedding table stored int8 with a scale per row (or per group of `group_size` columns);
    rows are dequantized on lookup.

    The scales keep the dtype of the original table, and lookups come out in that dtype, so the
    embedding follows `model.to(dtype)` like the rest of the model.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None,
                 group_size: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        self.register_buffer("weight_int8", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(_int8_scales_shape(num_embeddings, embedding_dim, group_size),
                                                   dtype=dtype or torch.float32, device=device))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return dequantize_int8(self.weight_int8[idx], self.scales[idx], self.scales.dtype)

    def spec(self) -> dict[str, Any]:
        if self.group_size is None:
            return {"kind": "int8_embedding"}
        return {"kind": "int8_embedding", "group_size": self.group_size}


class Int8TiedHead(nn.Module):
    """The output head of a tied model, computed from the int8 embedding table (nothing stored)."""

    def __init__(self, embedding: Int8Embedding, embedding_name: str = "tok_emb"):
        super().__init__()
        # Kept outside the module tree so the table is not registered (and saved) twice.
        self.__dict__["embedding"] = embedding
        self.embedding_name = embedding_name

    memlm_kernel = True  # as Int8Linear's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_matmul(self, x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_matmul(x, self.embedding.weight_int8, self.embedding.scales, self.memlm_kernel)

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    def weight_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        e = self.embedding
        return dequantize_int8(e.weight_int8[start:stop], e.scales[start:stop], dtype)

    def spec(self) -> dict[str, Any]:
        return {"kind": "int8_tied_head", "embedding": self.embedding_name}


# ------------------------------------------------------------------------------ int4 / int3


def _round_down_fp16(x: torch.Tensor) -> torch.Tensor:
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.tensor(-float("inf"), dtype=h.dtype)), h)


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, min) per row of `w` (rows, group), both float16-representable.

    min is the group minimum rounded down and scale is (max - min) / (2^bits - 1) rounded up to
    float16, so min + (2^bits - 1) * scale still reaches the maximum: no value is clamped and
    every value lies within scale / 2 of its grid point. A group that is already on such a grid
    with float16 scale/min (GGUF Q4_1) gets exactly that grid back.
    """
    maxq = 2**bits - 1
    w = w.float()
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise MemlmError("cannot quantize a weight with inf/nan values", "check the model for diverged weights")
    mins = _round_down_fp16(lo)
    scales = ((hi - mins.float()) / maxq).half()
    short = scales.float() * maxq + mins.float() < hi  # rounding made the range too short
    scales = torch.where(short, torch.nextafter(scales, torch.tensor(float("inf"), dtype=scales.dtype)), scales)
    return scales.float(), mins.float()


def quantize_with_params(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes 0..2^bits-1 of `w` (rows, n) for per-row scales/mins (rows,) or broadcastable."""
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # constant groups: code 0 = min
    return torch.round((w.float() - mins) / safe).clamp_(0, 2**bits - 1)


def quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group-wise: (codes (out, in) uint8, scales, mins (out, in/group) float16)."""
    out, inp = w.shape
    wg = w.detach().float().reshape(out * inp // group_size, group_size)
    scales, mins = group_params(wg, bits)
    codes = quantize_with_params(wg, scales[:, None], mins[:, None], bits)
    n_groups = inp // group_size
    return codes.to(torch.uint8).view(out, inp), scales.half().view(out, n_groups), mins.half().view(out, n_groups)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """w = q * scale + min (two separate ops, the same arithmetic as GGUF's Q4_1 dequantization)."""
    return _scale_codes(codes.to(dtype), scales, mins)


def _scale_codes(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """In place on the float codes q (out, in): one allocation per dequantization, not three."""
    out, inp = q.shape
    n_groups = scales.shape[1]
    grouped = q.view(out, n_groups, inp // n_groups)
    grouped.mul_(scales.to(q.dtype)[..., None]).add_(mins.to(q.dtype)[..., None])
    return q


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(rows, n) codes 0..15 -> (rows, n/2) uint8, low nibble first."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


def pack_int3(codes: torch.Tensor) -> torch.Tensor:
    """(rows, n) codes 0..7, n % 8 == 0 -> (rows, 3n/8) uint8: every 8 codes make one 24-bit word."""
    rows, n = codes.shape
    c = codes.to(torch.int32).view(rows, n // 8, 8)
    word = (c << torch.arange(0, 24, 3, dtype=torch.int32)).sum(dim=-1)  # disjoint bits: sum == or
    octets = torch.stack([word & 255, (word >> 8) & 255, word >> 16], dim=-1)
    return octets.to(torch.uint8).view(rows, n // 8 * 3)


def unpack_int3(packed: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    b = packed.to(torch.int32).view(rows, -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    codes = (word[..., None] >> torch.arange(0, 24, 3, dtype=torch.int32)) & 7
    return codes.to(torch.uint8).view(rows, -1)


# The CPU int4 kernel's own layout, found by probing torch 2.13: rows in blocks of 64; for each
# block and input column k, 32 bytes whose low nibble is row j and high nibble row j + 32.
# `_cpu_int4_layout_ok` checks this against torch's converter once, so a torch that packs
# differently simply falls back to the dequantizing path.


def _to_cpu_int4_layout(codes: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    v = codes.to(torch.uint8).view(n // 64, 2, 32, k)
    return (v[:, 0] | (v[:, 1] << 4)).transpose(1, 2).contiguous().view(n, k // 2)


def _from_cpu_int4_layout(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    v = packed.view(n // 64, 2 * half, 32).transpose(1, 2)  # (blocks, 32, k)
    return torch.stack([v & 15, v >> 4], dim=1).reshape(n, 2 * half)


@functools.lru_cache(maxsize=None)
def _cpu_int4_layout_ok() -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        if not torch.equal(theirs, _to_cpu_int4_layout(codes)):
            return False
        scale_zeros = torch.stack([torch.full((2, 128), 0.5), torch.full((2, 128), 1.0)], dim=-1).bfloat16()
        x = torch.randn(3, 64, generator=g).bfloat16()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, theirs, 32, scale_zeros)
        ref = x.float() @ ((codes.float() - 8) * 0.5 + 1.0).t()
        return bool(torch.allclose(y.float(), ref, rtol=0.02, atol=0.05))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def int4_kernel_available() -> bool:
    return _cpu_int4_layout_ok()


def torch_int4_layout_by_default() -> bool:
    """Whether int4 layers hold PyTorch's int4 kernel layout (and its bf16 scale cache) by
    default: where its kernel runs and memlm's own kernels were not built."""
    from memlm import kernels

    return int4_kernel_available() and not kernels.available()


class GroupQuantLinear(_KeepsScaleDtype):
    """Linear with `bits`-bit codes, float16 scale and min per group of inputs (base of Int4/Int3)."""

    bits = 4
    _fixed_dtype_buffers = ("scales", "mins")

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True,
                 device=None, dtype=None, use_kernel: bool | None = None):
        super().__init__()
        if in_features % group_size:
            raise MemlmError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("weight_packed", torch.empty(out_features, self._packed_width(), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("mins", torch.empty(out_features, n_groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.kernel_layout = False  # True once weight_packed holds the kernel's layout
        self._scale_zeros: torch.Tensor | None = None  # bf16 (groups, out, 2) for the kernel
        self.memlm_kernel = self._memlm_kernel_wanted(use_kernel)  # memlm.kernels on the portable layout
        self.use_kernel = self._kernel_wanted(use_kernel)  # PyTorch's int4 kernel, on its own layout

    def _kernel_wanted(self, use_kernel: bool | None) -> bool:
        """Whether to hold the weight in PyTorch's int4 kernel layout: when asked (True), or by
        default (None) where memlm's own kernels, which read the portable layout, cannot run;
        never where torch's packing differs from the layout memlm writes (its CPU int4 layout
        depends on the CPU: `_cpu_int4_layout_ok`)."""
        eligible = (self.bits == 4 and self.out_features % 64 == 0 and self.group_size in (32, 64, 128)
                    and int4_kernel_available())
        if use_kernel is None:
            return eligible and not self.memlm_kernel
        return eligible and use_kernel

    def _memlm_kernel_wanted(self, use_kernel: bool | None) -> bool:
        from memlm import kernels
        from memlm.kernels import choose

        return (use_kernel is None and self.bits == 4 and self.in_features % 32 == 0 and self.group_size % 32 == 0
                and kernels.available() and not choose.torch_int4_wins(self.group_size))

    def set_kernel(self, use_kernel: bool | None) -> None:
        """Switch the compute path: None = the fastest kernel there is (memlm's own, else
        PyTorch's int4 kernel), True = PyTorch's int4 kernel, False = dequantize per call."""
        self.memlm_kernel = self._memlm_kernel_wanted(use_kernel)
        self.use_kernel = self._kernel_wanted(use_kernel)
        if self.kernel_layout and not self.use_kernel:
            self.weight_packed = pack_int4(self.codes())
            self.kernel_layout = False
            self._scale_zeros = None
        self._adopt_kernel_layout()

    def _packed_width(self) -> int:
        return self.in_features // 2 if self.bits == 4 else self.in_features * 3 // 8

    # codes in / out of the portable layout

    def codes(self) -> torch.Tensor:
        """The (out, in) uint8 codes, whatever layout the weight is held in."""
        if self.kernel_layout:
            return _from_cpu_int4_layout(self.weight_packed)
        return unpack_int4(self.weight_packed) if self.bits == 4 else unpack_int3(self.weight_packed)

    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
        self.scales, self.mins = scales.half(), mins.half()
        self._scale_zeros = None
        if self.use_kernel and codes.device.type == "cpu":  # straight into the kernel's layout
            self.weight_packed = _to_cpu_int4_layout(codes)
            self.kernel_layout = True
            return
        self.weight_packed = pack_int4(codes) if self.bits == 4 else pack_int3(codes)
        self.kernel_layout = False
        self._adopt_kernel_layout()

    def _adopt_kernel_layout(self) -> None:
        self._scale_zeros = None
        if self.use_kernel and not self.kernel_layout and self.weight_packed.device.type == "cpu":
            self.weight_packed = _to_cpu_int4_layout(unpack_int4(self.weight_packed))
            self.kernel_layout = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_layout:  # always save the portable layout
            destination[prefix + "weight_packed"] = pack_int4(self.codes())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        incoming = prefix + "weight_packed" in state_dict
        if incoming:
            self.kernel_layout = False  # what comes in is the portable layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if incoming:
            self._adopt_kernel_layout()

    # compute

    def dequantized(self, dtype=torch.float32, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The float weight, or its output rows start..stop."""
        rows = slice(start, stop)
        if self.bits == 4 and not self.kernel_layout:  # unpack straight into floats (2x faster)
            p = self.weight_packed[rows]
            q = torch.empty(p.shape[0], self.in_features, dtype=dtype, device=p.device)
            q[:, 0::2] = p & 15
            q[:, 1::2] = p >> 4
        else:
            q = self.codes()[rows].to(dtype)
        return _scale_codes(q, self.scales[rows], self.mins[rows])

    def _dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T with W dequantized a slice of output rows at a time: no float copy of more
        than DEQUANT_CHUNK_ELEMENTS weights exists at once, however wide a fused layer is."""
        step = max(1, DEQUANT_CHUNK_ELEMENTS // self.in_features)
        if self.out_features <= step:
            return F.linear(x, self.dequantized(x.dtype))
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for i in range(0, self.out_features, step):
            y[..., i:i + step] = F.linear(x, self.dequantized(x.dtype, i, i + step))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_matmul(self, x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantized(dtype, start, stop)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.memlm_kernel and not self.kernel_layout and memlm_kernels_fit(x, self.in_features, self.group_size):
            from memlm.kernels import choose

            y = choose.int4_linear(x, self.weight_packed, self.scales, self.mins, self.group_size)
        elif self.kernel_layout and x.device.type == "cpu":
            if self._scale_zeros is None:
                # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale.
                s, m = self.scales.float(), self.mins.float()
                self._scale_zeros = torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_packed, self.group_size, self._scale_zeros)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:  # the weight dequantized for this call only (a prefill, or no kernel)
            y = self._dequantized_matmul(x)
        return y

    def spec(self) -> dict[str, Any]:
        return {"kind": f"int{self.bits}", "group_size": self.group_size}

    def compute_path(self) -> str:
        """Which code computes a decode step of this layer."""
        return "memlm" if self.memlm_kernel else "torch-int4" if self.kernel_layout else "dequantize"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, compute={self.compute_path()}")


class Int4Linear(GroupQuantLinear):
    bits = 4


class Int3Linear(GroupQuantLinear):
    bits = 3


GROUP_CLASSES: dict[int, type[GroupQuantLinear]] = {4: Int4Linear, 3: Int3Linear}


# ------------------------------------------------------------------------------ two steps


def quantize_weight(w: torch.Tensor, scheme: Scheme, group_size: int = 128) -> dict[str, torch.Tensor]:
    """Step 1 for one (out, in) weight: the tensors of its quantized form (RTN).

    int8: one scale per row; int4/int3: the group `choose_group_size(in, group_size)` gives.
    """
    w = w.detach()
    if scheme == "int8":
        q, scales = quantize_int8(w)
        return {"weight_int8": q, "scales": scales}
    if scheme in ("int4", "int3"):
        bits = int(scheme[-1])
        g = choose_group_size(w.shape[1], group_size)
        codes, scales, mins = quantize_groups(w, bits, g)
        return {"codes": codes, "scales": scales, "mins": mins}
    raise MemlmError(f"unknown quantization scheme {scheme!r}", "use 'int8', 'int4' or 'int3'")


def quantize_state(linear: nn.Linear, scheme: Scheme, group_size: int = 128) -> dict[str, torch.Tensor]:
    """Step 1: the tensors of `linear`'s quantized form (the bias is left to the module swap)."""
    return quantize_weight(linear.weight, scheme, group_size)


def module_from_codes(scheme: Scheme, state: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                      use_kernel: bool | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The quantized Linear holding `state` (its shape and group size are read off the tensors).

    int8: {"weight_int8" (out, in), "scales" (out,) or (out, in/g)}; int4/int3: {"codes" (out, in)
    uint8, "scales", "mins" (out, in/g)}. `bias` is taken as it is (a meta tensor stays a
    placeholder to be assigned later); `dtype` is the bias's dtype when none is given.
    """
    # Built on meta: every buffer is replaced by `state`, so nothing is allocated twice.
    if scheme == "int8":
        q, scales = state["weight_int8"], state["scales"]
        out_f, in_f = q.shape
        m = Int8Linear(in_f, out_f, bias is not None, device="meta", dtype=dtype,
                       group_size=int8_group_size(q, scales))
        m.weight_int8, m.scales = q, scales.float()
        if use_kernel is False:  # as for int4: no kernel, PyTorch's float paths only
            m.memlm_kernel = False
    elif scheme in ("int4", "int3"):
        codes = state["codes"]
        out_f, in_f = codes.shape
        cls = GROUP_CLASSES[int(scheme[-1])]
        m = cls(in_f, out_f, in_f // state["scales"].shape[1], bias is not None, device="meta", dtype=dtype,
                use_kernel=use_kernel)
        m.set_codes(codes, state["scales"], state["mins"])
    else:
        raise MemlmError(f"unknown quantization scheme {scheme!r}", "use 'int8', 'int4' or 'int3'")
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().clone())
    return m


def concat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing all of `layers` (same input) side by side: its output is theirs
    concatenated. For fusing q/k/v or gate/up at inference. None when they cannot be joined
    (different kinds, formats, group sizes, or some with a bias and some without).

    Each output row keeps its own weights, scales and bias, so every output is computed from
    exactly what it was before."""
    first = layers[0]
    kind = type(first)
    if any(type(m) is not kind for m in layers) or kind not in (nn.Linear, Int8Linear, Int4Linear, Int3Linear):
        return None
    has_bias = [getattr(m, "bias", None) is not None for m in layers]
    if any(has_bias) != all(has_bias):
        return None
    bias = torch.cat([m.bias.detach() for m in layers]) if has_bias[0] else None
    if kind is nn.Linear:
        weight = torch.cat([m.weight.detach() for m in layers])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused
    if kind is Int8Linear:
        if len({m.group_size for m in layers}) != 1:
            return None
        state = {"weight_int8": torch.cat([m.weight_int8 for m in layers]), "scales": torch.cat([m.scales for m in layers])}
        return module_from_codes("int8", state, bias, use_kernel=None if first.memlm_kernel else False)
    if len({m.group_size for m in layers}) != 1:
        return None
    if first.memlm_kernel and not any(m.kernel_layout or m.use_kernel for m in layers):
        # The portable layout packs each output row on its own: the rows join as they are
        # (SmolLM2's 60 fusions: 0.03 s, against 0.25 unpacking and repacking the codes).
        fused = kind(first.in_features, sum(m.out_features for m in layers), first.group_size, bias is not None,
                     device="meta")
        fused.weight_packed = torch.cat([m.weight_packed for m in layers])
        fused.scales, fused.mins = torch.cat([m.scales for m in layers]), torch.cat([m.mins for m in layers])
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused
    state = {"codes": torch.cat([m.codes() for m in layers]), "scales": torch.cat([m.scales for m in layers]),
             "mins": torch.cat([m.mins for m in layers])}
    path = None if first.memlm_kernel else True if first.kernel_layout else False  # the same compute path
    return module_from_codes(f"int{first.bits}", state, bias, use_kernel=path)


def module_from_state(linear: nn.Linear, scheme: Scheme, state: dict[str, torch.Tensor],
                      use_kernel: bool | None = None) -> nn.Module:
    """The quantized module for `linear` holding `state` (from `quantize_state` or GPTQ)."""
    return module_from_codes(scheme, state, linear.bias, use_kernel, dtype=linear.weight.dtype)


# The formats a model is loaded into for a memory budget (memlm.memory.estimate's weight
# formats): block Linears in the format; embeddings, norms and biases float32, or bfloat16 for "bf16".
WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4")


def format_float_dtype(weight_format: str | None, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of everything not quantized: `dtype` as stored (None), bfloat16 for "bf16", else float32."""
    if weight_format is None:
        return dtype
    if weight_format not in WEIGHT_FORMATS:
        raise MemlmError(f"unknown weight format {weight_format!r}", f"use one of: {', '.join(WEIGHT_FORMATS)}")
    wanted = torch.bfloat16 if weight_format == "bf16" else torch.float32
    if dtype not in (torch.float32, wanted):
        raise MemlmError(
            f"dtype {dtype} contradicts weight_format {weight_format!r}",
            "give one of them: weight_format decides the dtype of the unquantized tensors too",
        )
    return wanted


def linear_in_format(weight: torch.Tensor, bias: torch.Tensor | None, weight_format: str | None,
                     dtype: torch.dtype = torch.float32, use_kernel: bool | None = None) -> nn.Module:
    """One block Linear (`weight` (out, in), `bias`) as a module in `weight_format`.

    The single place a loader converts a layer: None/"fp32"/"bf16" give an nn.Linear in
    `format_float_dtype(weight_format, dtype)`; "int8" an Int8Linear (RTN, a scale per row);
    "int4" an Int4Linear (RTN, the group `choose_group_size(in, 128)` gives), the same codes as
    `quantize_model(model, "int4")`. A meta `bias` stays a placeholder for the loader to fill.
    """
    float_dtype = format_float_dtype(weight_format, dtype)
    b = None if bias is None else (bias if bias.is_meta else bias.detach().to(float_dtype))
    if weight_format in ("int8", "int4"):
        return module_from_codes(weight_format, quantize_weight(weight, weight_format), b, use_kernel, float_dtype)
    out_f, in_f = weight.shape
    m = nn.Linear(in_f, out_f, bias is not None, device="meta", dtype=float_dtype)
    m.weight = nn.Parameter(weight.detach().to(float_dtype))
    if b is not None:
        m.bias = nn.Parameter(b)
    return m


def swap_linears(
    model: nn.Module,
    scheme: Scheme,
    filter: Callable[[str, nn.Module], bool] = is_block_linear,
    group_size: int = 128,
    states: dict[str, dict[str, torch.Tensor]] | None = None,
    use_kernel: bool | None = None,
    progress: bool = False,
) -> list[str]:
    """Step 2: replace every Linear `filter` accepts by its quantized module; returns the names.

    Each layer is quantized just before it is swapped (unless `states` gives its tensors), so
    only one layer's float copy exists at a time.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and filter(n, m)]
    with progress_bar(len(names), f"quantizing ({scheme})", progress) as advance:
        for name in names:
            linear = model.get_submodule(name)
            state = states[name] if states is not None else quantize_state(linear, scheme, group_size)
            set_module(model, name, module_from_state(linear, scheme, state, use_kernel))
            advance()
    return names


def embedding_from_codes(weight_int8: torch.Tensor, scales: torch.Tensor) -> Int8Embedding:
    """The Int8Embedding holding these codes and scales (per row, or (rows, dim/g) per group)."""
    rows, dim = weight_int8.shape
    m = Int8Embedding(rows, dim, device="meta", dtype=scales.dtype, group_size=int8_group_size(weight_int8, scales))
    m.weight_int8, m.scales = weight_int8, scales
    return m


def quantize_embedding_int8(model: nn.Module) -> None:
    """tok_emb -> Int8Embedding; a tied lm_head computes from it, an untied one becomes Int8Linear."""
    emb = model.tok_emb
    if not isinstance(emb, nn.Embedding):
        raise MemlmError("the token embedding is already quantized")
    tied = getattr(model, "lm_head", None) is not None and getattr(model.lm_head, "weight", None) is emb.weight
    new = embedding_from_codes(*quantize_int8(emb.weight, scale_dtype=emb.weight.dtype))
    model.tok_emb = new
    if tied:
        model.lm_head = Int8TiedHead(new, "tok_emb")
    elif isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = module_from_state(model.lm_head, "int8", quantize_state(model.lm_head, "int8"))


def quantize_model(
    model: nn.Module,
    method: Scheme = "int8",
    group_size: int = 128,
    quantize_embedding: Literal["int8"] | None = None,
    progress: bool = True,
    filter: Callable[[str, nn.Module], bool] = is_block_linear,
    use_kernel: bool | None = None,
) -> nn.Module:
    """Quantize every block Linear in place (RTN); optionally the embedding/head to int8 too.

    `group_size` (int4/int3) is an upper bound: a layer whose width it does not divide gets the
    next smaller of 128/64/32 that does (SmolLM2's 576 takes 64). `use_kernel`: None picks the
    CPU int4 kernel where available, False forces dequantize-then-matmul.
    """
    if method not in ("int8", "int4", "int3"):
        raise MemlmError(f"unknown quantization method {method!r}", "use 'int8', 'int4' or 'int3'")
    if quantize_embedding not in (None, "int8"):
        raise MemlmError(f"quantize_embedding must be None or 'int8', got {quantize_embedding!r}")
    with torch.no_grad():
        swap_linears(model, method, filter, group_size, use_kernel=use_kernel, progress=progress)
        if quantize_embedding == "int8":
            quantize_embedding_int8(model)
    return model


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float32 (out, in) weight a module computes with (for analysis; materializes it)."""
    if isinstance(module, (Int8Linear, Int8Embedding)):
        return dequantize_int8(module.weight_int8, module.scales)
    if isinstance(module, Int8TiedHead):
        return dequantize_weight(module.embedding)
    if isinstance(module, GroupQuantLinear):
        return module.dequantized(torch.float32)
    if hasattr(module, "dense_weight"):  # low-rank, 2:4 sparse
        return module.dense_weight().float()
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return module.weight.detach().float()
    raise MemlmError(f"dequantize_weight: no weight in a {type(module).__name__}")
