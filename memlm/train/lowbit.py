"""AdamW with 8-bit optimizer states, and stochastic rounding to bfloat16.

AdamW keeps two fp32 numbers per weight (m and v): 8 bytes, twice the weights themselves.
`AdamW8bit` stores each as one byte plus one fp32 scale per block of 256 values (block-wise
absmax quantization, as in Dettmers et al. 2022), so the states shrink about 4x. The math of
every step is fp32: a slice of a parameter's states is decoded, updated exactly as torch's
AdamW does, and encoded again.

Why not a linear int8 grid: a block's values span several orders of magnitude, and a linear
grid rounds everything below 1/254 of the block's largest value to zero. A zero second moment
under a non-zero first moment turns into an update of m / eps, which wrecks training. So both
states use a logarithmic grid (constant relative spacing, covering `_DECADES` decades below the
block maximum), v is stored as sqrt(v) (halving its dynamic range in log terms), and a non-zero
sqrt(v) is never rounded to zero (it is kept at the grid's smallest positive value, which only
makes that weight's step smaller).

We do not use torchao's AdamW8bit: on CPU it goes through torch.compile (slow first steps) and
keeps its states as tensor subclasses, which our safetensors checkpoints cannot store.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

BLOCK = 256  # values sharing one absmax scale
MIN_QUANTIZED_NUMEL = 4096  # smaller tensors (norm scales, biases) keep fp32 states: they cost nothing
SLICE = 1 << 20  # values decoded at once: bounds the fp32 scratch memory of one step (multiple of BLOCK)
_DECADES = 4.0  # dynamic range of each grid below the block maximum


def _log_grid(levels: int) -> Tensor:
    """[0, 10^-D, ..., 1]: 0 and `levels` magnitudes evenly spaced in log10 between 10^-D and 1."""
    exponents = torch.linspace(-_DECADES, 0.0, levels, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), 10.0**exponents]).float()


_MAGNITUDES = 127  # per sign, for m
_UNSIGNED = _log_grid(255)  # sqrt(v): a uint8 code c means _UNSIGNED[c] * scale
_SIGNED_ZERO = _MAGNITUDES  # m: a uint8 code c means _SIGNED[c] * scale, code 127 is 0
_SIGNED = torch.cat([-_log_grid(_MAGNITUDES)[1:].flip(0), _log_grid(_MAGNITUDES)])  # 255 values, ascending


def _log_codes(rel: Tensor, levels: int, lowest: int, stochastic: bool = False) -> Tensor:
    """Grid index (lowest..levels, as floats) of each rel in [0, 1], rounded in log space:
    to the nearest, or `stochastic`ally (up with the probability of the fractional part).

    The grid is geometric, so its index is an affine function of log(rel): computing it directly
    is much faster than searching the grid. Index 0 (the value 0) is reached below the log-space
    midpoint between the smallest magnitude and the one a step below it; log(0) = -inf lands there.
    """
    # index i holds 10^(-D + D (i - 1) / (levels - 1)), so i = levels + log2(rel) * per_octave
    per_octave = (levels - 1) / (_DECADES * math.log2(10.0))
    index = torch.log2(rel).mul_(per_octave).add_(levels)
    index = index.add_(torch.rand_like(index)).floor_() if stochastic else index.round_()
    return index.clamp_(lowest, levels)


def _blocks(x: Tensor) -> Tensor:
    """A 1-d tensor as (blocks, BLOCK), zero-padded at the end."""
    pad = (-x.numel()) % BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(-1, BLOCK)


def _relative(b: Tensor, scale: Tensor) -> Tensor:
    return b.abs() / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]


def quantize_signed(x: Tensor, stochastic: bool = False) -> tuple[Tensor, Tensor]:
    """1-d fp32 -> (uint8 codes of the same length, fp32 absmax per block)."""
    b = _blocks(x)
    scale = b.abs().amax(dim=1)
    magnitude = _log_codes(_relative(b, scale), _MAGNITUDES, lowest=0, stochastic=stochastic)
    codes = torch.copysign(magnitude, b).add_(_SIGNED_ZERO).to(torch.uint8)
    return codes.flatten()[: x.numel()], scale


def dequantize_signed(codes: Tensor, scale: Tensor) -> Tensor:
    values = _SIGNED.to(codes.device).index_select(0, codes.long()).view(-1)
    return (_blocks(values) * scale[:, None]).flatten()[: codes.numel()]


def quantize_unsigned(x: Tensor, stochastic: bool = False) -> tuple[Tensor, Tensor]:
    """1-d non-negative fp32 -> (uint8 codes, fp32 max per block).

    No value is rounded to 0: a zero sqrt(v) becomes the smallest magnitude times the block's
    max, which is harmless (its m is zero too), while a positive one rounded to 0 would turn
    m / (sqrt(v) + eps) into m / eps. An all-zero block has scale 0 and decodes to zeros.
    """
    b = _blocks(x)
    scale = b.amax(dim=1)
    codes = _log_codes(_relative(b, scale), len(_UNSIGNED) - 1, lowest=1, stochastic=stochastic).to(torch.uint8)
    return codes.flatten()[: x.numel()], scale


def dequantize_unsigned(codes: Tensor, scale: Tensor) -> Tensor:
    values = _UNSIGNED.to(codes.device).index_select(0, codes.long())
    return (_blocks(values) * scale[:, None]).flatten()[: codes.numel()]


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction, as torch.optim.AdamW) with 8-bit states.

    State per quantized parameter: `exp_avg` (uint8 codes of m), `exp_avg_scale` (fp32 per block),
    `exp_avg_sq` (uint8 codes of sqrt(v)), `exp_avg_sq_scale`, and `step`. Parameters under
    MIN_QUANTIZED_NUMEL values keep fp32 `exp_avg` / `exp_avg_sq`. Plain tensors only, so the
    state goes through the safetensors checkpoint as any other optimizer's.

    Weights may be bf16: the math is fp32 slice by slice anyway, and the new weights are written
    back with stochastic rounding (`stochastic_rounding`, on by default) or round-to-nearest.
    So bf16 weights need no fp32 copy of a whole tensor (see optim.PerParamOptimizer).
    """

    handles_low_precision_params = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, stochastic_rounding: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW8bit hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        self.stochastic_rounding = stochastic_rounding
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point state to the parameter's dtype; ours stays fp32 whatever the
        # weights are (bf16 scales or moments would make a resumed run differ).
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for p, i in zip(params, saved_ids):
            for key, value in state_dict["state"].get(i, {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.detach().to(device=p.device, dtype=torch.float32, copy=True)

    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        n = p.numel()
        if n < MIN_QUANTIZED_NUMEL:
            state["exp_avg"] = torch.zeros(n, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=p.device)
        else:
            blocks = math.ceil(n / BLOCK)
            state["exp_avg"] = torch.full((n,), _SIGNED_ZERO, dtype=torch.uint8, device=p.device)
            state["exp_avg_scale"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
            state["exp_avg_sq_scale"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                step = state["step"].item()
                bias1 = 1.0 - beta1**step
                bias2_sqrt = math.sqrt(1.0 - beta2**step)
                flat_p = p.view(-1)
                flat_g = p.grad.reshape(-1)
                quantized = "exp_avg_scale" in state
                for start in range(0, p.numel(), SLICE):
                    end = min(start + SLICE, p.numel())
                    g = flat_g[start:end].float()
                    if quantized:
                        blocks = slice(start // BLOCK, math.ceil(end / BLOCK))
                        m = dequantize_signed(state["exp_avg"][start:end], state["exp_avg_scale"][blocks])
                        v = dequantize_unsigned(state["exp_avg_sq"][start:end], state["exp_avg_sq_scale"][blocks])
                        v.square_()
                    else:
                        m, v = state["exp_avg"][start:end], state["exp_avg_sq"][start:end]
                    m.lerp_(g, 1.0 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                    w = flat_p[start:end].float()
                    w.mul_(1.0 - lr * wd)
                    denom = (v.sqrt() / bias2_sqrt).add_(eps)
                    w.addcdiv_(m, denom, value=-lr / bias1)
                    if p.dtype == torch.bfloat16 and self.stochastic_rounding:
                        flat_p[start:end] = stochastic_round_to_bf16(w)
                    else:
                        flat_p[start:end] = w.to(p.dtype)
                    if quantized:
                        # Stochastic rounding of the codes: round-to-nearest is biased when the states
                        # are re-encoded every step. An entry that decays by beta2 (no gradient) while
                        # its block's maximum holds, decays by whole grid steps instead (sqrt(v) 18% low
                        # after 20 steps at beta2 = 0.95): its steps grow larger than AdamW's.
                        state["exp_avg"][start:end], state["exp_avg_scale"][blocks] = quantize_signed(m, True)
                        state["exp_avg_sq"][start:end], state["exp_avg_sq_scale"][blocks] = \
                            quantize_unsigned(v.sqrt_(), True)
        return loss


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """fp32 -> bf16, rounding up or down at random with probability given by the distance.

    bf16 is the top 16 bits of an fp32. Adding a uniform random 16-bit integer to the low 16
    bits and truncating rounds the magnitude up exactly with probability (low bits / 2^16), so
    E[result] = x: updates smaller than half a bf16 step still move the weight on average,
    where round-to-nearest would drop every one of them.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes fp32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # -65536 == 0xFFFF0000 as int32: keep the top 16 bits
    out = rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
    # inf and nan must not be perturbed (adding to a nan's payload could make it an inf)
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))
