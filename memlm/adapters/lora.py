"""LoRA: a small trainable low-rank update beside a frozen layer, by composition.

    y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r        (Hu et al., 2021)

`LoRALinear` wraps any linear-like layer memlm has (memlm.compress.kinds: nn.Linear, int8,
int4/int3 -- QLoRA --, low-rank, 2:4 sparse) and is the only adapter class: the base runs its own
forward (an int4 base keeps its packed weights and its kernels), and what LoRA needs to know of
the base (its shape, how it passes gradients back, how an update folds into it) comes from the
base's kind. `lora_A` starts as nn.Linear's default (Kaiming-uniform, as PEFT) and `lora_B` at
zero, so before the first step the model computes exactly what the base did.

A frozen quantized base is never dequantized whole: under autograd its forward saves nothing and
its backward computes grad_x = grad_y @ W from the packed weight, a slice of rows at a time
(memlm.compress.quantize.frozen_matmul, as QLoRA's 4-bit matmul), which holds for every frozen
quantized layer of the model, adapted or not.

The state-dict names are PEFT's once the adapter name is dropped: `<layer>.lora_A.weight`,
`<layer>.lora_B.weight`, the base under `<layer>.base_layer` (memlm.adapters.peft reads and
writes that layout).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from memlm.compress.kinds import is_linear, kind_of
from memlm.compress.quantize import set_module
from memlm.errors import MemlmError

DEFAULT_TARGETS = ("q_proj", "v_proj")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer of the blocks (not the output head)


class LoRALinear(nn.Module):
    """A frozen linear-like `base_layer` plus the trainable update lora_B @ lora_A * alpha / r."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        kind = kind_of(base)
        if kind is None or not kind.linear:
            raise MemlmError(f"LoRA cannot wrap a {type(base).__name__}",
                             "target linear layers (q_proj, v_proj, ... or all-linear)")
        out_f, in_f = kind.shape(base)
        if not 1 <= r <= min(in_f, out_f):
            raise MemlmError(f"LoRA rank {r} does not fit a {out_f} x {in_f} layer",
                             f"use a rank between 1 and {min(in_f, out_f)} (--lora-r)")
        if not 0.0 <= dropout < 1.0:
            raise MemlmError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha = r, float(alpha)
        self.scaling = self.alpha / r
        self.base_layer = base.requires_grad_(False)
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # a frozen quantized base keeps no float weight for backward (quantize.frozen_matmul)
        a = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)

    def delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The update as factors (up (out, r), down (r, in)): W + up @ down is the merged weight."""
        return self.lora_B.weight.detach() * self.scaling, self.lora_A.weight.detach()

    def merged(self) -> nn.Module:
        """The base with the update folded in, of the base's own kind and layout."""
        up, down = self.delta()
        return kind_of(self.base_layer).plus_low_rank(self.base_layer, up, down)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, base={type(self.base_layer).__name__}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def block_linear_names(model: nn.Module) -> list[str]:
    """Every linear-like layer inside the transformer blocks (what LoRA may target)."""
    return [name for name, m in model.named_modules() if name.startswith("blocks.") and is_linear(m)]


def parse_targets(targets: str | Sequence[str] | None) -> tuple[str, ...]:
    """'q_proj,v_proj' / ['q_proj'] / 'all-linear' -> a tuple of names (None: the default)."""
    if targets is None:
        return DEFAULT_TARGETS
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = tuple(t.strip() for t in items if t.strip())
    if not names:
        raise MemlmError("no LoRA targets given", f"name layers, e.g. {','.join(DEFAULT_TARGETS)}, or {ALL_LINEAR}")
    return names


def target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The layers `targets` names: those whose last name part is a target (PEFT's suffix match),
    or every block linear layer for 'all-linear'. Unknown targets are refused."""
    candidates = block_linear_names(model)
    if ALL_LINEAR in targets:
        return candidates
    short = {name.rpartition(".")[2] for name in candidates}
    unknown = [t for t in targets if t not in short]
    if unknown:
        raise MemlmError(f"LoRA target {unknown[0]!r} names no linear layer of this model",
                         f"choose from: {', '.join(sorted(short))}, or {ALL_LINEAR}")
    return [name for name in candidates if name.rpartition(".")[2] in targets]


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: str | Sequence[str] | None = None) -> list[str]:
    """Wrap the targeted layers of `model` in LoRALinear, in place, and freeze everything else:
    afterwards only the adapters' lora_A/lora_B require gradients. Returns the wrapped names."""
    names = target_names(model, parse_targets(targets))
    for name in names:
        set_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    freeze_all_but(model, lora_parameter_names(model))
    return names


def lora_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def freeze_all_but(model: nn.Module, trainable: Iterable[str]) -> None:
    keep = set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base, in place (float bases exactly; quantized bases are
    rounded again to their own format and group size). Returns the merged layer names."""
    merged = lora_layers(model)
    with torch.no_grad():
        for name, layer in merged.items():
            set_module(model, name, layer.merged())
    return list(merged)
