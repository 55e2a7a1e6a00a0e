"""Optimizers and the learning-rate schedule.

Parameter groups follow nanoGPT: every tensor with 2 or more dimensions (matmul weights and
embeddings) gets weight decay; vectors (biases, norm scales) do not, since shrinking them
towards zero only fights the normalisation.

`build_optimizer` returns a plain torch optimizer unless the run needs per-parameter stepping:

* fused_backward: each parameter has its own optimizer, stepped from a hook the moment its
  gradient is complete, after which the gradient is freed. A full set of gradients never
  exists, which saves one copy of the weights' size.
* precision "bf16": the weights are bfloat16, the optimizer math and states fp32. Each
  parameter is stepped on an fp32 copy that exists only during its own step, and the result
  is written back with stochastic rounding (an option, on by default), so small updates are
  not rounded away.
Both go through `PerParamOptimizer`, which looks like one optimizer to the loop and to the
checkpoint code (param_groups, state_dict, load_state_dict, step, zero_grad).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from memlm.config import TrainConfig
from memlm.errors import MemlmError
from memlm.train.lowbit import AdamW8bit, stochastic_round_to_bf16

# torch's Adafactor takes a *relative* step: the update is scaled by the parameter's RMS, and
# it has no momentum, so each step moves by the whole normalized gradient, where AdamW's
# momentum (beta1 0.9) averages part of the gradient noise away and moves less than its lr.
# Our matrices start at RMS 0.02 (the init std); half of 1/0.02 makes Adafactor's loss track
# AdamW's at the same lr: measured on `tiny`, 200 steps, eval loss 0.988x AdamW's (1/0.02:
# 0.949x, too fast; 1/0.08: 1.057x). Norm scales start at RMS 1 and need no scale.
ADAFACTOR_MATRIX_LR_SCALE = 0.5 / 0.02


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


def _plain_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optimizer over `groups` (no fusing, no bf16 handling)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=_fused_adamw(groups) or None
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "adamw8bit":
        return AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                         stochastic_rounding=cfg.stochastic_rounding)
    if cfg.optimizer == "adafactor":
        scaled = []
        for g in groups:
            scale = ADAFACTOR_MATRIX_LR_SCALE if any(p.dim() >= 2 for p in g["params"]) else 1.0
            # torch's Adafactor decays by lr * weight_decay: divide so the decay per step stays
            # what the config asks for, whatever the lr scale.
            scaled.append({**g, "lr_scale": scale, "lr": cfg.lr * scale, "weight_decay": g["weight_decay"] / scale})
        return torch.optim.Adafactor(scaled, lr=cfg.lr)
    raise MemlmError(f"unknown optimizer '{cfg.optimizer}'", "choose one of: adamw, sgd, adamw8bit, adafactor")


def _fused_adamw(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: on CUDA always; on CPU for plain
    float tensors (FSDP's DTensor shards keep the default path there).

    On CPU torch's default is the single-tensor loop (its foreach kernels are CUDA-only): about
    ten elementwise passes over every weight, and temporaries the size of the largest one. The
    fused kernel is one pass with none. W3 (30M parameters, 2 busy cores): 0.41 s a step instead
    of 1.34 s, the same update to float rounding.
    """
    params = [p for g in groups for p in g["params"]]
    if not params:
        return False
    if all(p.is_cuda for p in params):
        return True
    return all(p.device.type == "cpu" and p.is_floating_point() and type(p.data) is torch.Tensor for p in params)


def _plain_cpu_grads(params: list[torch.Tensor]) -> bool:
    return all(p.grad.device.type == "cpu" and type(p.grad) is torch.Tensor for p in params)


def _total_norm(params: list[torch.Tensor]) -> float:
    norms = torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params])
    return float(torch.linalg.vector_norm(norms))


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most `max_norm`; the norm before.

    What torch.nn.utils.clip_grad_norm_ does, but on CPU it scales only when the norm is over
    `max_norm`, and by a Python number: torch multiplies every gradient by a 0-dim tensor each
    step, even by 1, which is a slow kernel on CPU (W3: 205 ms a step, against 27 ms by a
    number). Elsewhere (CUDA, FSDP's DTensor gradients) torch's own function runs, which needs
    no host sync there.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if not _plain_cpu_grads(params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    total = _total_norm(params)
    coef = max_norm / (total + 1e-6)
    if not coef >= 1.0:  # also when the norm is inf or nan: the gradients then become nan, as in torch
        for p in params:
            p.grad.mul_(coef)
    return total


def takes_grad_scale(optimizer: Any) -> bool:
    """Whether `optimizer.step()` divides the gradients by `optimizer.grad_scale` inside its
    fused kernel (the hook torch's GradScaler unscales fused optimizers through) and nothing
    else has set one."""
    return (isinstance(optimizer, torch.optim.Optimizer) and getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(g.get("fused") for g in optimizer.param_groups) and getattr(optimizer, "grad_scale", None) is None)


def clipped_step(optimizer: torch.optim.Optimizer | PerParamOptimizer, parameters: Iterable[torch.Tensor],
                 max_norm: float) -> float | None:
    """optimizer.step(), the gradients' global norm clipped to `max_norm` first (0: no clipping).

    Returns the norm before clipping (None without clipping). With a fused optimizer on CPU the
    clipping factor goes into the step's own kernel as its grad_scale, so clipping costs one
    read of the gradients (their norm) and no pass that writes them.
    """
    if max_norm <= 0:
        optimizer.step()
        return None
    params = [p for p in parameters if p.grad is not None]
    if params and _plain_cpu_grads(params) and takes_grad_scale(optimizer):
        total = _total_norm(params)
        coef = max_norm / (total + 1e-6)
        if coef < 1.0 and math.isfinite(total):
            optimizer.grad_scale = torch.tensor(1.0 / coef, dtype=torch.float32)  # the step divides by it
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale  # this step's only
            return total
    else:
        total = clip_grad_norm(params, max_norm)
        coef = 1.0
    if not coef >= 1.0:  # inf or nan (the fused path above): nan gradients, as torch makes them
        for p in params:
            p.grad.mul_(coef)
    optimizer.step()
    return total


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | PerParamOptimizer:
    """The optimizer named by `cfg.optimizer`, at `cfg.lr` (the loop overrides lr every step).

    Per-parameter stepping (`PerParamOptimizer`) when cfg.fused_backward is on or any weight is
    not fp32 (precision "bf16"); a plain torch optimizer otherwise.
    """
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if cfg.fused_backward or any(p.dtype != torch.float32 for p in params):
        return PerParamOptimizer(
            groups, lambda gs: _plain_optimizer(gs, cfg), fused_backward=cfg.fused_backward,
            stochastic_rounding=cfg.stochastic_rounding,
        )
    return _plain_optimizer(groups, cfg)


class PerParamOptimizer:
    """One inner optimizer per parameter, stepped parameter by parameter.

    `make(groups)` builds an inner optimizer for a one-parameter list of groups. fp32 weights
    are handed to it directly, and so are bf16 weights when the optimizer does fp32 math on them
    itself (`handles_low_precision_params`, as AdamW8bit). Otherwise a bf16 weight's optimizer
    gets an fp32 stand-in tensor whose storage exists only during that weight's step, so its
    state is fp32 (torch creates state like the parameter it sees, and casts loaded state to
    that dtype too), and the result is rounded back into the bf16 weight.

    With `fused_backward`, a hook steps each parameter as soon as backward has accumulated its
    gradient and then drops the gradient; `step()` is then a no-op.
    """

    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer],
                 fused_backward: bool = False, stochastic_rounding: bool = True):
        self.fused_backward = fused_backward
        self.stochastic_rounding = stochastic_rounding
        self.params: list[nn.Parameter] = []
        self._inner: list[torch.optim.Optimizer] = []
        self._stand_ins: list[torch.Tensor | None] = []
        self._hooks = []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                stand_in = None
                inner = make([{**options, "params": [p]}])
                if p.dtype != torch.float32 and not getattr(inner, "handles_low_precision_params", False):
                    stand_in = nn.Parameter(torch.empty(0, dtype=torch.float32, device=p.device))
                    inner = make([{**options, "params": [stand_in]}])
                self.params.append(p)
                self._inner.append(inner)
                self._stand_ins.append(stand_in)
                if fused_backward:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(len(self.params) - 1)))
        self.kind = type(self._inner[0]).__name__ if self._inner else "none"

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizers' own group dicts, so setting lr here sets it where it is used.

        Read afresh each time: torch's load_state_dict replaces an optimizer's group dicts.
        """
        return [g for inner in self._inner for g in inner.param_groups]

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def step_now(p: torch.Tensor) -> None:
            self._step_one(index)
            p.grad = None  # the point of fusing: this gradient is gone before the next one is made

        return step_now

    @torch.no_grad()
    def _step_one(self, index: int) -> None:
        p, inner, stand_in = self.params[index], self._inner[index], self._stand_ins[index]
        if p.grad is None:
            return
        if stand_in is None:
            inner.step()
            return
        stand_in.data = p.detach().float()
        stand_in.grad = p.grad.float()
        inner.step()
        new = stand_in.detach()
        p.copy_(stochastic_round_to_bf16(new) if self.stochastic_rounding and p.dtype == torch.bfloat16 else new)
        stand_in.grad = None
        stand_in.data = torch.empty(0, dtype=torch.float32, device=p.device)  # free the fp32 copy

    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise MemlmError("PerParamOptimizer does not take a closure")
        if self.fused_backward:
            return  # every parameter already stepped inside backward
        for i in range(len(self.params)):
            self._step_one(i)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_dict(self) -> dict[str, Any]:
        """In torch's layout: state keyed by the parameter's index here, one group per parameter."""
        state: dict[int, dict] = {}
        groups: list[dict] = []
        for i, inner in enumerate(self._inner):
            sd = inner.state_dict()
            if sd["state"]:
                state[i] = sd["state"][0]
            (group,) = sd["param_groups"]
            groups.append({**group, "params": [i], "inner": self.kind})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self._inner):
            raise ValueError(f"the saved state has {len(groups)} parameters, this optimizer {len(self._inner)}")
        for i, (inner, group) in enumerate(zip(self._inner, groups)):
            group = dict(group)
            if group.pop("inner", self.kind) != self.kind:
                raise ValueError(f"the saved state is for another optimizer than {self.kind}")
            if group["params"] != [i]:
                raise ValueError(f"saved parameter group {i} holds parameters {group['params']}")
            state = {0: state_dict["state"][i]} if i in state_dict["state"] else {}
            inner.load_state_dict({"state": state, "param_groups": [{**group, "params": [0]}]})


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


def set_lr(optimizer: torch.optim.Optimizer | PerParamOptimizer, lr: float) -> None:
    """Set every group's lr (times its `lr_scale`, which only Adafactor's groups have)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
