"""Low-rank factorization: W (out, in) ~ up (out, r) @ down (r, in), from the truncated SVD.

With W = U S V^T, down = sqrt(S_r) V_r^T and up = U_r sqrt(S_r): the best rank-r approximation
in the Frobenius norm, with the singular values split evenly so neither factor's scale dwarfs
the other's (better for later quantization or fine-tuning). A layer is only factored when it
gets smaller: r * (in + out) < in * out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memlm.compress.quantize import is_block_linear, progress_bar, set_module
from memlm.errors import MemlmError


class LowRankLinear(nn.Module):
    """y = up(down(x)): `down` (r x in, no bias) then `up` (out x r, the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        return _weight_of(self.up) @ _weight_of(self.down)

    def spec(self) -> dict[str, Any]:
        return {"kind": "lowrank", "rank": self.rank}


def _weight_of(module: nn.Module) -> torch.Tensor:
    from memlm.compress.quantize import dequantize_weight  # the factors may be quantized later

    return dequantize_weight(module)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values squared hold at least `energy` of the total."""
    if not 0.0 < energy <= 1.0:
        raise MemlmError(f"energy must be in (0, 1], got {energy}")
    power = singular_values.double().pow(2)
    cumulative = power.cumsum(0) / power.sum().clamp_min(1e-300)
    return min(int((cumulative < energy - 1e-12).sum()) + 1, len(singular_values))


def worth_factoring(in_features: int, out_features: int, rank: int) -> bool:
    return rank * (in_features + out_features) < in_features * out_features


@torch.no_grad()
def factorize_linear(linear: nn.Linear, rank: int | None = None, energy: float | None = None) -> LowRankLinear:
    """The rank-r (or `energy`-keeping) factorization of one Linear, whether or not it saves space."""
    if (rank is None) == (energy is None):
        raise MemlmError("give exactly one of rank and energy")
    w = linear.weight.detach()
    U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
    r = rank if rank is not None else rank_for_energy(S, energy)
    if not 0 < r <= len(S):
        raise MemlmError(f"rank must be between 1 and {len(S)}, got {r}")
    root = S[:r].sqrt()
    m = LowRankLinear(linear.in_features, linear.out_features, r, linear.bias is not None, device=w.device, dtype=w.dtype)
    m.down.weight.copy_(root[:, None] * Vh[:r])
    m.up.weight.copy_(U[:, :r] * root[None, :])
    if linear.bias is not None:
        m.up.bias.copy_(linear.bias)
    return m


@torch.no_grad()
def lowrank_model(
    model: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    filter: Callable[[str, nn.Module], bool] = is_block_linear,
    progress: bool = True,
) -> dict[str, int | None]:
    """Factor every block Linear in place (where it saves space); returns {name: rank or None}.

    `rank`: one rank for every layer (capped at the layer's size); `energy`: per layer, the
    smallest rank keeping that fraction of the squared singular values (e.g. 0.9).
    """
    if (rank is None) == (energy is None):
        raise MemlmError("lowrank_model: give exactly one of rank and energy")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and filter(n, m)]
    chosen: dict[str, int | None] = {}
    with progress_bar(len(names), "low-rank", progress) as advance:
        for name in names:
            linear = model.get_submodule(name)
            r_cap = None if rank is None else min(rank, linear.in_features, linear.out_features)
            new = factorize_linear(linear, rank=r_cap, energy=energy)
            if worth_factoring(linear.in_features, linear.out_features, new.rank):
                set_module(model, name, new)
                chosen[name] = new.rank
            else:
                chosen[name] = None
            advance()
    return chosen

