"""Optimizers and the learning-rate schedule.

Parameter groups follow nanoGPT: every tensor with 2 or more dimensions (matmul weights and
embeddings) gets weight decay; vectors (biases, norm scales) do not, since shrinking them
towards zero only fights the normalisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memlm.config import TrainConfig
from memlm.errors import MemlmError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed params (dim >= 2), non-decayed params (dim < 2)], trainable ones only.

    `named_parameters` yields a tied weight once, so it is never optimized twice.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.optimizer`, at `cfg.lr` (the loop overrides lr every step)."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # fused=True only helps on GPU; the default (foreach) is right on CPU.
        on_cuda = any(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True if on_cuda else None
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer in ("adamw8bit", "adafactor"):
        raise MemlmError(
            f"optimizer '{cfg.optimizer}' is not implemented yet",
            "use optimizer = 'adamw' or 'sgd' for now",
        )
    raise MemlmError(f"unknown optimizer '{cfg.optimizer}'", "choose one of: adamw, sgd, adamw8bit, adafactor")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based: step 1 is the first update).

    Linear warmup from lr/warmup_steps to lr over steps 1..warmup_steps, then a half cosine from
    lr down to min_lr, reached exactly at step cfg.steps (and held after it).
    """
    warmup = cfg.warmup_steps
    if warmup > 0 and step <= warmup:
        return cfg.lr * step / warmup
    if step >= cfg.steps:
        return cfg.min_lr
    progress = (step - warmup) / (cfg.steps - warmup)  # in (0, 1) here
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
