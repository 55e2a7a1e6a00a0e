"""The kinds of layer a memlm model is made of, each described once.

A model's matmuls are plain `nn.Linear`s or one of memlm.compress's layers (int8, int4/int3,
low-rank, 2:4 sparse), and its token table a float or int8 embedding. Several places need to
know what such a layer is: LoRA (what it can wrap, how a frozen one passes gradients back, how
a low-rank update is folded into it), compressed storage (the spec it records, how an empty one
is rebuilt), GGUF export (which exact GGML blocks it holds) and the memory estimator (bytes of a
weight in a format). They all ask the layer's `LayerKind` here, found by the layer's class
(`kind_of`), instead of each testing classes itself.

A kind answers, for a module `m` of its class:
  name                      the "kind" of its spec (storage); "linear" for a float nn.Linear
  linear                    whether it computes y = x W^T (+ b): LoRA can wrap it
  spec(m)                   what storage records (None: a plain float layer, not recorded)
  empty(spec, like, model)  a module of this kind with meta tensors, shaped like `like`
  shape(m)                  (out_features, in_features) of the weight it computes with
  bias(m)                   its bias (None without)
  weight_rows(m, i, j)      rows i..j of that weight in float (materialises only those rows)
  input_grad(m, g)          g @ W: the gradient a frozen layer passes back, a slice of W at a time
  quantized_state(m)        its codes in the portable form of quantize.quantize_weight (None: float)
  plus_low_rank(m, up, down)  a module of the same kind and layout computing W + up @ down
                            (exact for float and low-rank layers; quantized ones are rounded again)
  weight_bytes(n_in, n_out, ...)  stored bytes of an (n_out, n_in) weight (the estimator's formulas)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memlm.compress.lowrank import LowRankLinear
from memlm.compress.prune import Sparse24Linear
from memlm.compress.quantize import (
    GROUP_CLASSES,
    GroupQuantLinear,
    Int3Linear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    Int8TiedHead,
    dequantize_int8,
    module_from_codes,
    quantize_groups,
    quantize_int8,
    rows_matmul,
)
from memlm.errors import MemlmError


class LayerKind:
    """What memlm knows about one class of layer (see the module docstring)."""

    name = "?"
    cls: type[nn.Module] = nn.Module
    linear = True

    # -- storage
    def spec(self, m: nn.Module) -> dict[str, Any] | None:
        return m.spec()

    def empty(self, spec: dict[str, Any], like: nn.Module, model: nn.Module, use_kernel: bool | None) -> nn.Module:
        raise NotImplementedError

    # -- shape and weights
    def shape(self, m: nn.Module) -> tuple[int, int]:
        return m.out_features, m.in_features

    def bias(self, m: nn.Module) -> torch.Tensor | None:
        return getattr(m, "bias", None)

    def weight_rows(self, m: nn.Module, start: int = 0, stop: int | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self, m: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_rows(m, 0, None, dtype)

    def input_grad(self, m: nn.Module, grad_out: torch.Tensor) -> torch.Tensor:
        """grad_out (..., out) @ W (out, in), W materialised a slice of output rows at a time."""
        out_f, in_f = self.shape(m)
        return rows_matmul(grad_out, lambda i, j: self.weight_rows(m, i, j, grad_out.dtype), out_f, in_f)

    def quantized_state(self, m: nn.Module) -> dict[str, torch.Tensor] | None:
        return None

    def plus_low_rank(self, m: nn.Module, up: torch.Tensor, down: torch.Tensor) -> nn.Module:
        raise NotImplementedError

    # -- the estimator
    def weight_bytes(self, n_in: int, n_out: int, dtype_bytes: int = 4, group_size: int | None = None,
                     torch_int4_layout: bool = False) -> int:
        raise NotImplementedError


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    m = nn.Linear(in_f, out_f, bias is not None, device="meta", dtype=weight.dtype)
    m.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return m


class _Linear(LayerKind):
    """A float nn.Linear (fp32 or bf16): `weight` (out, in)."""

    name, cls = "linear", nn.Linear

    def spec(self, m):
        return None

    def weight_rows(self, m, start=0, stop=None, dtype=torch.float32):
        return m.weight.detach()[start:stop].to(dtype)

    def input_grad(self, m, grad_out):
        return grad_out @ m.weight.detach().to(grad_out.dtype)

    def plus_low_rank(self, m, up, down):
        w = m.weight.detach()
        return _float_linear((w.float() + up.float() @ down.float()).to(w.dtype), m.bias)

    def weight_bytes(self, n_in, n_out, dtype_bytes=4, group_size=None, torch_int4_layout=False):
        """dtype_bytes * n (4 fp32, 2 bf16)."""
        return n_in * n_out * dtype_bytes


class _Int8(LayerKind):
    """Int8Linear: codes (out, in) int8 and a float32 scale per row or per group of inputs."""

    name, cls = "int8", Int8Linear

    def empty(self, spec, like, model, use_kernel):
        # version-1 folders have no group size: one scale per row
        return Int8Linear(like.in_features, like.out_features, bias=getattr(like, "bias", None) is not None,
                          device="meta", group_size=spec.get("group_size"))

    def weight_rows(self, m, start=0, stop=None, dtype=torch.float32):
        return m.weight_rows(start, stop, dtype)

    def quantized_state(self, m):
        return {"weight_int8": m.weight_int8, "scales": m.scales}

    def plus_low_rank(self, m, up, down):
        w = self.dense_weight(m) + up.float() @ down.float()
        q, scales = quantize_int8(w, group_size=m.group_size)
        new = module_from_codes("int8", {"weight_int8": q, "scales": scales}, m.bias,
                                use_kernel=None if m.memlm_kernel else False)
        return new.requires_grad_(False)

    def weight_bytes(self, n_in, n_out, dtype_bytes=4, group_size=None, torch_int4_layout=False):
        """n + 4*out (an fp32 scale per row), or with a group size g n + 4*out*in/g."""
        return n_in * n_out + 4 * (n_out if group_size is None else n_out * (n_in // group_size))


class _Group(LayerKind):
    """Int4Linear / Int3Linear: packed codes with an fp16 scale and min per group of inputs."""

    def __init__(self, cls: type[GroupQuantLinear]):
        self.cls, self.bits, self.name = cls, cls.bits, f"int{cls.bits}"

    def empty(self, spec, like, model, use_kernel):
        return GROUP_CLASSES[self.bits](like.in_features, like.out_features, spec["group_size"],
                                        bias=getattr(like, "bias", None) is not None, device="meta",
                                        use_kernel=use_kernel)

    def weight_rows(self, m, start=0, stop=None, dtype=torch.float32):
        return m.weight_rows(start, stop, dtype)

    def quantized_state(self, m):
        return {"codes": m.codes(), "scales": m.scales, "mins": m.mins}

    def plus_low_rank(self, m, up, down):
        w = self.dense_weight(m) + up.float() @ down.float()
        codes, scales, mins = quantize_groups(w, self.bits, m.group_size)
        path = None if m.memlm_kernel else True if m.kernel_layout else False  # the same compute path
        new = module_from_codes(self.name, {"codes": codes, "scales": scales, "mins": mins}, m.bias, use_kernel=path)
        return new.requires_grad_(False)

    def weight_bytes(self, n_in, n_out, dtype_bytes=4, group_size=None, torch_int4_layout=False):
        """int4: n/2 + (2+2)*out*in/g (fp16 scale and min per group of g inputs); PyTorch's CPU
        int4 kernel also caches a bf16 (scale, zero) pair per group on first use where its layout
        is held (torch_int4_layout): + 4*out*in/g. int3: 3*n/8 + 4*out*in/g."""
        groups = n_out * (n_in // group_size)
        packed = n_in * n_out // 2 if self.bits == 4 else n_in * n_out * 3 // 8
        return packed + 4 * groups + (4 * groups if torch_int4_layout and self.bits == 4 else 0)


class _LowRank(LayerKind):
    """LowRankLinear: up (out, r) @ down (r, in); either factor may itself be quantized."""

    name, cls = "lowrank", LowRankLinear

    def empty(self, spec, like, model, use_kernel):
        return LowRankLinear(like.in_features, like.out_features, spec["rank"],
                             bias=getattr(like, "bias", None) is not None, device="meta")

    def bias(self, m):
        return kind_of(m.up).bias(m.up)

    def weight_rows(self, m, start=0, stop=None, dtype=torch.float32):
        up, down = kind_of(m.up), kind_of(m.down)
        return up.weight_rows(m.up, start, stop, dtype) @ down.dense_weight(m.down, dtype)

    def input_grad(self, m, grad_out):  # through the factors: (g @ up) @ down, no dense W
        return kind_of(m.down).input_grad(m.down, kind_of(m.up).input_grad(m.up, grad_out))

    def plus_low_rank(self, m, up, down):
        """Exactly: the update's factors appended to the layer's (rank r + r'), in float."""
        u = torch.cat([kind_of(m.up).dense_weight(m.up), up.float()], dim=1)
        d = torch.cat([kind_of(m.down).dense_weight(m.down), down.float()], dim=0)
        bias = self.bias(m)
        new = LowRankLinear(m.in_features, m.out_features, d.shape[0], bias is not None, device="meta")
        new.down.weight = nn.Parameter(d, requires_grad=False)
        new.up.weight = nn.Parameter(u, requires_grad=False)
        if bias is not None:
            new.up.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return new


class _Sparse24(LayerKind):
    """Sparse24Linear: the kept half of each group of 4 inputs and their positions."""

    name, cls = "sparse_2_4", Sparse24Linear

    def empty(self, spec, like, model, use_kernel):
        return Sparse24Linear(like.in_features, like.out_features, bias=getattr(like, "bias", None) is not None,
                              device="meta")

    def weight_rows(self, m, start=0, stop=None, dtype=torch.float32):
        return m.weight_rows(start, stop, dtype)

    def plus_low_rank(self, m, up, down):
        """Pruned again to 2:4 (the update is dense): lossy."""
        w = self.dense_weight(m) + up.float() @ down.float()
        return Sparse24Linear.from_linear(_float_linear(w.to(m.values.dtype), m.bias)).requires_grad_(False)


class _Int8Embedding(LayerKind):
    name, cls, linear = "int8_embedding", Int8Embedding, False

    def empty(self, spec, like, model, use_kernel):
        return Int8Embedding(like.num_embeddings, like.embedding_dim, device="meta", group_size=spec.get("group_size"))

    def shape(self, m):
        return m.num_embeddings, m.embedding_dim

    def weight_rows(self, m, start=0, stop=None, dtype=torch.float32):
        return dequantize_int8(m.weight_int8[start:stop], m.scales[start:stop], dtype)

    def quantized_state(self, m):
        return {"weight_int8": m.weight_int8, "scales": m.scales}


class _Int8TiedHead(LayerKind):
    """The head of a tied model computed from its int8 embedding (it stores nothing)."""

    name, cls, linear = "int8_tied_head", Int8TiedHead, False

    def empty(self, spec, like, model, use_kernel):
        return Int8TiedHead(model.get_submodule(spec["embedding"]), spec["embedding"])

    def shape(self, m):
        return m.embedding.num_embeddings, m.embedding.embedding_dim

    def bias(self, m):
        return None

    def weight_rows(self, m, start=0, stop=None, dtype=torch.float32):
        return m.weight_rows(start, stop, dtype)


KINDS: dict[type[nn.Module], LayerKind] = {
    k.cls: k for k in (_Linear(), _Int8(), _Group(Int4Linear), _Group(Int3Linear), _LowRank(), _Sparse24(),
                       _Int8Embedding(), _Int8TiedHead())
}
BY_NAME: dict[str, LayerKind] = {k.name: k for k in KINDS.values()}
# The estimator's weight formats (memlm.memory.estimate) as the kind a block Linear takes in each.
FORMAT_KINDS = {"fp32": BY_NAME["linear"], "bf16": BY_NAME["linear"], "int8": BY_NAME["int8"],
                "int4": BY_NAME["int4"], "int3": BY_NAME["int3"]}


def kind_of(m: nn.Module) -> LayerKind | None:
    """The kind of a layer (by its exact class), or None for anything else (norms, containers)."""
    return KINDS.get(type(m))


def is_linear(m: nn.Module) -> bool:
    kind = kind_of(m)
    return kind is not None and kind.linear


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: spec} of every layer that storage records (the compressed ones)."""
    out = {}
    for name, m in model.named_modules():
        kind = kind_of(m)
        spec = kind.spec(m) if kind is not None else None
        if spec is not None:
            out[name] = spec
    return out


def empty_layer(spec: dict[str, Any], like: nn.Module, model: nn.Module, use_kernel: bool | None = None) -> nn.Module:
    """A module of the recorded kind with meta tensors shaped like `like` (storage's loader)."""
    kind = BY_NAME.get(spec.get("kind"))
    if kind is None or kind.name == "linear":
        raise MemlmError(f"unknown compressed layer kind {spec.get('kind')!r}",
                         "this model was saved by a newer memlm; upgrade memlm")
    return kind.empty(spec, like, model, use_kernel)


def weight_format(m: nn.Module) -> str | None:
    """The estimator's weight format of a block layer: "int8", "int4", "int3", "fp32" or "bf16"
    (None: not a plain or quantized Linear, e.g. low-rank or sparse)."""
    kind = kind_of(m)
    if kind is None or kind.name not in ("linear", "int8", "int4", "int3"):
        return None
    if kind.name == "linear":
        return "bf16" if m.weight.dtype == torch.bfloat16 else "fp32"
    return kind.name


