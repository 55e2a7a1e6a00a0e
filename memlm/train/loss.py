"""Chunked linear + cross-entropy: the LM head and the loss without a (tokens x vocab) tensor.

For a small model with a big vocabulary the logits are the largest tensor of a training step:
W3 (2,048 tokens per micro-batch, vocab 49,152) has 400 MB of fp32 logits, and the plain path
keeps two such tensors for backward and makes two more in it. Here the head's matmul, the
softmax and its gradient are done a chunk of tokens at a time, inside forward: each chunk's
gradient with respect to the hidden states is written out, the head weight's gradient is
accumulated, and the chunk's logits are dropped before the next chunk. Backward only scales
the stored gradients by the incoming one. The gradient is exact (the same math, in the same
precision, as the plain path), so this is a memory saving, not an approximation.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # targets with this value are left out of the loss (as in F.cross_entropy)


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on, else the inputs' own."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


class _ChunkedLinearCE(torch.autograd.Function):
    """Sum over tokens of cross_entropy(h @ weight.T, targets); gradients computed in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int, grad_mode: bool
    ) -> Tensor:
        dtype = _compute_dtype(h, weight)
        # needs_input_grad ignores torch.no_grad(), so the caller's grad mode comes in as
        # `grad_mode`: evaluation must not pay for gradients.
        need_h = grad_mode and ctx.needs_input_grad[0]
        need_w = grad_mode and ctx.needs_input_grad[1]
        # Autocast is switched off inside: the casts below are explicit, and the in-place
        # accumulation into the fp32 weight gradient must not be re-typed.
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty_like(h) if need_h else None
            # fp32 whatever the weight's dtype, so many chunks add up without bf16 rounding.
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            # One logits buffer for every chunk: the only (tokens x vocab)-shaped memory, reused.
            buffer = torch.empty((min(chunk, h.shape[0]), w.shape[0]), dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk):
                h_c = h[start : start + chunk].to(dtype)
                t_c = targets[start : start + chunk]
                logits = buffer[: len(t_c)]
                if dtype == torch.float32:
                    torch.mm(h_c, w.T, out=logits)
                else:  # the matmul in bf16, as autocast would run it, the softmax in fp32
                    low = h_c @ w.T
                    logits.copy_(low)
                    del low  # before the next big temporary, not at the end of the iteration
                valid = t_c != IGNORE_INDEX
                all_valid = bool(valid.all())
                safe_t = t_c if all_valid else torch.where(valid, t_c, 0)
                lse = torch.logsumexp(logits, dim=-1)
                losses = lse - logits.gather(1, safe_t[:, None]).squeeze(1)
                total += losses.sum() if all_valid else (losses * valid).sum()
                if not (need_h or need_w):
                    continue
                # d(loss)/d(logits) = softmax - one_hot(target), zero for ignored rows; in place.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(t_c), device=h.device), safe_t] -= 1.0
                if not all_valid:
                    probs *= valid[:, None]
                if need_h:
                    rows = grad_h[start : start + chunk]
                    if dtype == torch.float32 and rows.dtype == torch.float32:
                        torch.mm(probs, w, out=rows)
                    else:  # bf16 matmul, as autocast's backward would run it
                        rows.copy_(probs.to(dtype) @ w)
                if need_w:
                    # fp32 straight into the accumulator: no (vocab x d) temporary, and the sum
                    # over chunks is never rounded to bf16 on the way.
                    grad_w.addmm_(probs.T, h_c.float())
        ctx.save_for_backward(
            grad_h if need_h else None, grad_w.to(weight.dtype) if need_w else None
        )
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None,
            None,
            None,
            None,
        )


def chunked_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """Mean cross-entropy of logits `h @ weight.T` against `targets`, `chunk` tokens at a time.

    h: (N, d) hidden states; weight: (vocab, d), e.g. `lm_head.weight` (tied or not);
    targets: (N,) ids, IGNORE_INDEX for positions to skip. Equals
    `F.cross_entropy((h @ weight.T).float(), targets)` in value and gradient.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return _ChunkedLinearCE.apply(h, weight, targets, chunk, torch.is_grad_enabled()) / count
