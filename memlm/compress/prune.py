"""Pruning: zero out weights (unstructured, 2:4) or remove whole FFN neurons / attention heads.

* `prune_magnitude` zeroes the smallest |w| of the block Linears, per layer or by one global
  threshold. The zeros stay in dense storage: it shows how much can go, not a smaller file.
* `prune_2_4` keeps the 2 largest |w| of every 4 consecutive inputs (the pattern sparse tensor
  cores run). With `compact=True` a layer is stored as its kept values (out, in/2) plus 2-bit
  positions packed 4 per byte (out, in/8): about half the bytes of the dense weight.
* `prune_ffn` and `prune_heads` physically shrink the matrices and the ModelConfig, so the
  model really is smaller and faster. Neurons / KV groups are ranked per layer either by their
  weights, or (with calibration batches) by how much they contribute on real inputs:
  E[x_c^2] * ||W[:, c]||^2 summed over the consumer columns c they feed (as in Wanda).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from memlm.compress.quantize import frozen_matmul, is_block_linear, set_module
from memlm.config import ModelConfig
from memlm.errors import MemlmError


def _block_linears(model: nn.Module, filter: Callable[[str, nn.Module], bool]) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and filter(n, m)}


def sparsity(model: nn.Module, filter: Callable[[str, nn.Module], bool] = is_block_linear) -> float:
    """Fraction of exactly-zero weights over the Linears `filter` accepts."""
    linears = _block_linears(model, filter)
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    total = sum(m.weight.numel() for m in linears.values())
    return zeros / max(total, 1)


# ------------------------------------------------------------------------------ unstructured


@torch.no_grad()
def prune_magnitude(
    model: nn.Module,
    amount: float,
    scope: Literal["layerwise", "global"] = "layerwise",
    filter: Callable[[str, nn.Module], bool] = is_block_linear,
) -> dict[str, Any]:
    """Zero the `amount` fraction of smallest-|w| weights of every block Linear, in place.

    "layerwise": each layer loses `amount` of its weights. "global": one |w| threshold over all
    of them, so layers with many small weights lose more. Returns {"sparsity", "layers"}.
    """
    if not 0.0 <= amount < 1.0:
        raise MemlmError(f"pruning amount must be in [0, 1), got {amount}")
    if scope not in ("layerwise", "global"):
        raise MemlmError(f"unknown pruning scope {scope!r}", "use 'layerwise' or 'global'")
    linears = _block_linears(model, filter)
    if scope == "global":
        threshold = _global_threshold([m.weight for m in linears.values()], amount)
    for m in linears.values():
        w = m.weight
        if scope == "layerwise":
            k = int(amount * w.numel())
            if k == 0:
                continue
            threshold = w.abs().flatten().kthvalue(k).values
        w.masked_fill_(w.abs() <= threshold, 0.0)
    layers = {n: float((m.weight == 0).float().mean()) for n, m in linears.items()}
    return {"sparsity": sparsity(model, filter), "layers": layers}


def _global_threshold(weights: list[torch.Tensor], amount: float) -> float:
    """|w| threshold below which `amount` of all weights lie, by bisection (no concatenated copy)."""
    total = sum(w.numel() for w in weights)
    target = amount * total
    lo, hi = 0.0, max(float(w.abs().max()) for w in weights)
    if target == 0:
        return -1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if sum(int((w.abs() <= mid).sum()) for w in weights) >= target:
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------------------ 2:4


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask keeping the n largest |w| of every m consecutive inputs of each row."""
    out, inp = weight.shape
    if inp % m:
        raise MemlmError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {inp}")
    groups = weight.detach().abs().reshape(out, inp // m, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.view(out, inp)


def _pack_2bit(idx: torch.Tensor) -> torch.Tensor:
    """(rows, n) values 0..3, n % 4 == 0 -> (rows, n/4) uint8, first value in the lowest bits."""
    v = idx.to(torch.uint8).view(idx.shape[0], -1, 4)
    return v[..., 0] | (v[..., 1] << 2) | (v[..., 2] << 4) | (v[..., 3] << 6)


def _unpack_2bit(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 3).view(packed.shape[0], -1)


class Sparse24Linear(nn.Module):
    """A 2:4-sparse Linear stored compactly: kept values (out, in/2) and their positions (2 bits each)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if in_features % 8:
            raise MemlmError(f"compact 2:4 storage needs in_features divisible by 8, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.empty(out_features, in_features // 2, device=device, dtype=dtype))
        self.register_buffer("positions", torch.empty(out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Sparse24Linear":
        w = linear.weight.detach()
        out, inp = w.shape
        keep = w.abs().reshape(out, inp // 4, 4).topk(2, dim=-1).indices.sort(dim=-1).values  # (out, in/4, 2)
        m = cls(inp, out, linear.bias is not None, dtype=w.dtype)
        m.values.data = w.reshape(out, inp // 4, 4).gather(-1, keep).reshape(out, inp // 2).clone()
        m.positions = _pack_2bit(keep.reshape(out, inp // 2))
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        return m

    def dense_weight(self) -> torch.Tensor:
        out, inp = self.out_features, self.in_features
        pos = _unpack_2bit(self.positions).long().view(out, inp // 4, 2)
        dense = torch.zeros(out, inp // 4, 4, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_(-1, pos, self.values.view(out, inp // 4, 2)).view(out, inp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.values.requires_grad:  # trained itself (pruning, then fine-tuning the kept weights)
            return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = frozen_matmul(self, x)  # frozen (under LoRA, say): no float copy kept for backward
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype))

    def weight_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = self.values.detach()[start:stop]
        rows, inp = values.shape[0], self.in_features
        pos = _unpack_2bit(self.positions[start:stop]).long().view(rows, inp // 4, 2)
        dense = torch.zeros(rows, inp // 4, 4, dtype=dtype, device=values.device)
        return dense.scatter_(-1, pos, values.to(dtype).view(rows, inp // 4, 2)).view(rows, inp)

    def spec(self) -> dict[str, Any]:
        return {"kind": "sparse_2_4"}


@torch.no_grad()
def prune_2_4(
    model: nn.Module,
    compact: bool = False,
    filter: Callable[[str, nn.Module], bool] = is_block_linear,
) -> dict[str, Any]:
    """2:4 semi-structured pruning of every block Linear, in place (50% zeros, exact pattern).

    compact=False zeroes weights in the dense Linear; compact=True swaps in Sparse24Linear,
    which stores only the kept half plus 2-bit positions. Returns {"sparsity", "compact"}.
    """
    linears = _block_linears(model, filter)
    for name, m in linears.items():
        if compact:
            set_module(model, name, Sparse24Linear.from_linear(m))
        else:
            m.weight.mul_(nm_mask(m.weight))
    return {"sparsity": 0.5 if compact else sparsity(model, filter), "compact": compact}


# ------------------------------------------------------------------------------ structured


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def _require_linears(*modules: nn.Module) -> None:
    for m in modules:
        if type(m) is not nn.Linear:
            raise MemlmError(
                f"structured pruning needs plain Linear layers, found {type(m).__name__}",
                "prune before quantizing or factorizing the model",
            )


@torch.no_grad()
def _input_energy(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """E[x_c^2] per input column c of each named Linear, over the calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in names}

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(dim=0)
            counts[name] += x.shape[0]
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            ids = torch.as_tensor(ids, dtype=torch.long)
            model(ids[None] if ids.ndim == 1 else ids)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not sums:
        raise MemlmError("pruning got an empty list of calibration batches", "pass token id batches or None")
    return {n: sums[n] / counts[n] for n in names}


def _keep_count(current: int, keep: float | int, multiple_of: int, what: str) -> int:
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise MemlmError(f"{what}: keep fraction must be in (0, 1], got {keep}")
        n = round(current * keep / multiple_of) * multiple_of
        n = min(current, max(multiple_of, n))
    else:
        n = keep
    if not 0 < n <= current:
        raise MemlmError(f"{what}: cannot keep {n} of {current}", f"keep between 1 and {current}")
    return n


def _replace_config(model: nn.Module, **changes: Any) -> None:
    model.config = dataclasses.replace(model.config, **changes)


@torch.no_grad()
def prune_ffn(
    model: nn.Module,
    keep: float | int,
    calib_batches: Iterable[torch.Tensor] | None = None,
    multiple_of: int = 32,
) -> nn.Module:
    """Remove the least salient FFN neurons of every block, in place; returns the model.

    `keep`: a fraction of ffn_hidden (rounded to a multiple of `multiple_of`, so int4 groups still
    divide down_proj's width) or the new ffn_hidden itself (an int, used as is). Every block
    keeps the same number (ModelConfig has one ffn_hidden), each its own best neurons.
    """
    config: ModelConfig = model.config
    new_hidden = _keep_count(config.ffn_hidden, keep, multiple_of, "prune_ffn")
    for block in model.blocks:
        _require_linears(*(m for m in block.mlp.children() if isinstance(m, nn.Module)))
    energy = None
    if calib_batches is not None:
        energy = _input_energy(model, [f"blocks.{i}.mlp.down_proj" for i in range(len(model.blocks))], calib_batches)
    for i, block in enumerate(model.blocks):
        mlp = block.mlp
        out_norm = mlp.down_proj.weight.float().pow(2).sum(dim=0)  # ||down[:, j]||^2
        if energy is not None:
            score = energy[f"blocks.{i}.mlp.down_proj"] * out_norm
        else:
            score = out_norm * mlp.up_proj.weight.float().pow(2).sum(dim=1)
            if hasattr(mlp, "gate_proj"):
                score = score * mlp.gate_proj.weight.float().pow(2).sum(dim=1)
        kept = score.topk(new_hidden).indices.sort().values
        mlp.up_proj = _sliced_linear(mlp.up_proj, rows=kept)
        if hasattr(mlp, "gate_proj"):
            mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=kept)
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=kept)
    _replace_config(model, ffn_hidden=new_hidden)
    return model


def config_has_head_dim() -> bool:
    """Whether ModelConfig has an explicit head_dim field (needed once heads are removed)."""
    return any(f.name == "head_dim" for f in dataclasses.fields(ModelConfig))


@torch.no_grad()
def prune_heads(
    model: nn.Module,
    keep_kv_heads: int,
    calib_batches: Iterable[torch.Tensor] | None = None,
) -> nn.Module:
    """Remove whole KV groups (a KV head with the query heads that share it), in place.

    Every block keeps `keep_kv_heads` groups, so n_kv_heads becomes keep_kv_heads and n_head
    keep_kv_heads * (n_head / n_kv_heads); head_dim stays, so n_head * head_dim < n_embd after.
    """
    if not config_has_head_dim():
        raise MemlmError(
            "head pruning needs ModelConfig.head_dim (n_head * head_dim may then differ from n_embd)",
            "prune FFN neurons instead, or update memlm.config to a version with a head_dim field",
        )
    config: ModelConfig = model.config
    n_head, n_kv, hd = config.n_head, config.n_kv_heads, config.head_dim
    rep = n_head // n_kv
    if not 0 < keep_kv_heads <= n_kv:
        raise MemlmError(f"prune_heads: cannot keep {keep_kv_heads} of {n_kv} KV heads")
    for block in model.blocks:
        a = block.attn
        _require_linears(a.q_proj, a.k_proj, a.v_proj, a.o_proj)
    energy = None
    if calib_batches is not None:
        energy = _input_energy(model, [f"blocks.{i}.attn.o_proj" for i in range(len(model.blocks))], calib_batches)
    for i, block in enumerate(model.blocks):
        a = block.attn
        o_cols = a.o_proj.weight.float().pow(2).sum(dim=0)  # ||o[:, c]||^2 per input column
        if energy is not None:
            score = (energy[f"blocks.{i}.attn.o_proj"] * o_cols).view(n_kv, rep * hd).sum(dim=1)
        else:
            v_rows = a.v_proj.weight.float().pow(2).sum(dim=1).view(n_kv, hd).sum(dim=1)
            score = o_cols.view(n_kv, rep * hd).sum(dim=1) * v_rows
        groups = score.topk(keep_kv_heads).indices.sort().values
        # SDPA's GQA gives query head h the KV head h // rep, so group j owns q heads j*rep..j*rep+rep-1.
        q_idx = (groups[:, None] * rep * hd + torch.arange(rep * hd)).flatten()
        kv_idx = (groups[:, None] * hd + torch.arange(hd)).flatten()
        a.q_proj = _sliced_linear(a.q_proj, rows=q_idx)
        a.k_proj = _sliced_linear(a.k_proj, rows=kv_idx)
        a.v_proj = _sliced_linear(a.v_proj, rows=kv_idx)
        a.o_proj = _sliced_linear(a.o_proj, cols=q_idx)
        a.n_head, a.n_kv_heads = keep_kv_heads * rep, keep_kv_heads
    _replace_config(model, n_head=keep_kv_heads * rep, n_kv_heads=keep_kv_heads, head_dim=hd)
    return model
