"""GPTQ (Frantar et al., 2022): quantize each weight column, then correct the columns not yet
quantized so the layer's output on calibration data changes as little as possible.

For a layer y = W x with calibration inputs X, GPTQ minimizes ||W X - Q X||^2 one column at a
time. With H = 2 X X^T, the error of quantizing column i is spread over the later columns
through row i of the upper Cholesky factor U of H^-1 (U^T U = H^-1):
    err = (w_i - q_i) / U[i, i];   W[:, j] -= err * U[i, j]   for j > i
Updates inside a block of 128 columns are applied at once per column; the rest of the matrix
gets one matmul per block ("lazy batch updates"). Groups get their scale/min from the (already
corrected) weights when the group starts, exactly as round-to-nearest computes them.

Act-order quantizes columns by decreasing H[i, i] (the inputs with the most energy first). Its
groups are "static": scale/min of each group of consecutive input columns are computed from
the original weights before permuting, so the stored format is the same as without act-order.

The model is processed block by block: each block's Linears see the outputs of the blocks
before it *after* those were quantized, so later layers correct earlier errors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from memlm.compress.quantize import (
    choose_group_size,
    dequantize_groups,
    group_params,
    module_from_state,
    progress_bar,
    set_module,
)
from memlm.errors import MemlmError


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ one weight (out, in) given H (in, in): (codes uint8 (out, in), scales, mins float16).

    `group_size` must divide `in` (see `choose_group_size`); `block_size` is rounded to a
    multiple of it so a group never straddles two blocks.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    if cols % group_size:
        raise MemlmError(f"group size {group_size} does not divide the layer's {cols} inputs")
    n_groups = cols // group_size
    block_size = max(group_size, block_size // group_size * group_size)

    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scales = torch.zeros(rows, n_groups)
    mins = torch.zeros(rows, n_groups)
    if act_order:  # static groups, from the weights before any column moves
        for g in range(n_groups):
            scales[:, g], mins[:, g] = group_params(W[:, g * group_size : (g + 1) * group_size], bits)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(cols)

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise MemlmError(
            "GPTQ: the calibration Hessian is not positive definite",
            "raise damp (e.g. 0.1) or give more calibration tokens",
        ) from e

    maxq = 2**bits - 1
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1 = W[:, b0:b1].clone()
        U1 = U[b0:b1, b0:b1]
        Q1 = torch.zeros_like(W1)
        errors = torch.zeros_like(W1)
        for j in range(b1 - b0):
            col = b0 + j
            if act_order or col % group_size == 0:  # (act-order: groups change from column to column)
                group = int(perm[col]) // group_size
                if not act_order:
                    scales[:, group], mins[:, group] = group_params(W1[:, j : j + group_size], bits)
                s, m = scales[:, group], mins[:, group]
                inv_s = 1.0 / torch.where(s > 0, s, torch.ones_like(s))
            w = W1[:, j]
            q = ((w - m) * inv_s).round_().clamp_(0, maxq)
            Q1[:, j] = q
            err = (w - torch.addcmul(m, q, s)).div_(U1[j, j])
            W1[:, j:].addr_(err, U1[j, j:], alpha=-1.0)  # spread the error over later columns
            errors[:, j] = err
        codes[:, perm[b0:b1]] = Q1.to(torch.uint8)
        W[:, b1:] -= errors @ U[b0:b1, b1:]
    return codes, scales.half(), mins.half()


class _HessianRecorder:
    """Forward hooks that accumulate H = 2 X X^T / n per Linear of one block.

    Linears fed the very same tensor (q/k/v, gate/up) share one accumulation: the first of them
    computes it, the rest alias it.
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor | None, str] = (None, "")
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            last_x, last_name = self._last
            if x is last_x and name not in self.sums:
                self.alias[name] = last_name
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            if name not in self.sums:
                self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1])
                self.counts[name] = 0
            self.sums[name].addmm_(x2.t(), x2)
            self.counts[name] += x2.shape[0]
            self._last = (x, name)

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        source = self.alias.get(name, name)
        return self.sums[source] * (2.0 / self.counts[source])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = (None, "")


class _StopForward(Exception):
    pass


def _block_inputs(model: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
    """Run the model up to block 0 on each batch; return its inputs and the positional args after x."""
    xs, rests = [], []

    def grab(module, args):
        xs.append(args[0].detach())
        rests.append(args[1:])
        raise _StopForward

    handle = model.blocks[0].register_forward_pre_hook(grab)
    try:
        for ids in batches:
            ids = torch.as_tensor(ids, dtype=torch.long)
            if ids.ndim == 1:
                ids = ids[None]
            try:
                model(ids)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not xs:
        raise MemlmError("GPTQ got no calibration batches", "pass a few batches of token ids (e.g. 32 x 512 tokens)")
    return xs, rests


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calib_batches: Iterable[torch.Tensor],
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    damp: float = 0.01,
    progress: bool = True,
    block_size: int = 128,
    use_kernel: bool | None = None,
) -> nn.Module:
    """Quantize every Linear of every block with GPTQ, in place; returns the model.

    `calib_batches`: token id tensors (B, T) or (T,), e.g. 32 windows of 512 tokens of text like
    the model will see. Stored exactly like round-to-nearest int4/int3 (Int4Linear / Int3Linear).
    """
    if bits not in (3, 4):
        raise MemlmError(f"GPTQ bits must be 3 or 4, got {bits}")
    was_training = model.training
    model.eval()
    xs, rests = _block_inputs(model, calib_batches)
    scheme = f"int{bits}"
    n_linears = sum(
        1 for block in model.blocks for m in block.modules() if type(m) is nn.Linear
    )
    with progress_bar(n_linears, f"GPTQ int{bits}", progress) as advance:
        for i, block in enumerate(model.blocks):
            linears = {n: m for n, m in block.named_modules() if type(m) is nn.Linear}
            states = {}
            # True-sequential: each group of Linears is quantized on the inputs that the groups
            # before it produce once quantized (o_proj sees quantized q/k/v's attention, and so on).
            # The dense Linears hold the dequantized weights meanwhile: no dequantization per batch.
            for stage in _stages(block, linears, xs[0], _block_args(rests[0])):
                recorder = _HessianRecorder({name: linears[name] for name in stage})
                stop = linears[stage[-1]].register_forward_hook(_stop_forward)  # the rest of the block can wait
                try:
                    for x, rest in zip(xs, rests):
                        try:
                            block(x, *_block_args(rest))
                        except _StopForward:
                            pass
                finally:
                    recorder.close()
                    stop.remove()
                for name in stage:
                    linear = linears[name]
                    g = choose_group_size(linear.in_features, group_size)
                    codes, scales, mins = gptq_quantize_weight(
                        linear.weight, recorder.hessian(name), bits, g, act_order, damp, block_size
                    )
                    states[name] = {"codes": codes, "scales": scales, "mins": mins}
                    linear.weight.data = dequantize_groups(**states[name]).to(linear.weight.dtype)
                    advance()
                del recorder
            # The next block sees what this block computes now that it is quantized.
            xs = [block(x, *_block_args(rest)) for x, rest in zip(xs, rests)]
            for name, linear in linears.items():
                set_module(block, name, module_from_state(linear, scheme, states[name], use_kernel))
    model.train(was_training)
    return model


def _stop_forward(module, args, output):
    raise _StopForward


def _stages(block: nn.Module, linears: dict[str, nn.Linear], x: torch.Tensor, args: tuple) -> list[list[str]]:
    """The block's Linears grouped by the tensor they read, in the order the block calls them:
    [q, k, v], [o], [gate, up], [down] for a Llama block."""
    calls: list[tuple[str, torch.Tensor]] = []

    def record(name: str):
        def hook(module, inputs, output):
            if all(name != n for n, _ in calls):
                calls.append((name, inputs[0]))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in linears.items()]
    try:
        block(x[:1], *args)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    for k, (name, seen) in enumerate(calls):
        if k and seen is calls[k - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    missing = set(linears) - {n for n, _ in calls}
    if missing:
        raise MemlmError(f"GPTQ: the block never calls {sorted(missing)}", "only Linears the forward uses can be quantized")
    return stages


def _block_args(rest: tuple) -> tuple:
    """Block i gets block 0's rope (the same for every block) and no cache."""
    return rest[:1]
