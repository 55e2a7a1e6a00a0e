"""Chunked linear + cross-entropy: the LM head and the loss without a (tokens x vocab) tensor.

For a small model with a big vocabulary the logits are the largest tensor of a training step:
W3 (2,048 tokens per micro-batch, vocab 49,152) has 400 MB of fp32 logits, and the plain path
keeps two such tensors for backward and makes two more in it. Here the head's matmul, the
softmax and its gradient are done a chunk of tokens at a time, inside forward: each chunk's
gradient with respect to the hidden states is written out, the head weight's gradient is
accumulated, and the chunk's logits are dropped before the next chunk. Backward only scales
the stored gradients by the incoming one. The gradient is exact (the same math, in the same
precision, as the plain path), so this is a memory saving, not an approximation.

`linear_cross_entropy` is the unchunked path (the default, `loss_chunk = 0`): the full logits,
in one (tokens x vocab) buffer instead of autograd's three. `F.cross_entropy(h @ w.T, y)` makes
the logits, log_softmax's output (saved), and in backward nll's zero-filled gradient and
log_softmax's gradient: four fresh (N, V) fp32 tensors a step, three alive at once. Here the
buffer that receives the logits becomes exp(logits - max) in place and is saved; backward folds
the softmax's normalisation and the one-hot target into the small sides of the head's two
matmuls, so it never writes vocab-sized memory. It saves what the plain path saves (the head's
input and N x V fp32 values), so the memory planner's saved-activation terms hold; W3 (2,048
tokens, vocab 49,152): 400 MB at the peak instead of 1.2 GB, four passes over it instead of
about ten, and no page faults for three fresh 400 MB tensors a step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memlm.memory.measure import empty_huge

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


class _LinearCE(torch.autograd.Function):
    """Mean of cross_entropy(h @ weight.T, targets) in fp32 with one (N, V) buffer (see the module doc).

    The buffer receives the logits x, then becomes e = exp(x - max_row(x)) in place; with the row
    sums s, softmax = e / s. Backward never passes over it again: the 1/s row scale and the
    one-hot target are applied to the head's (N, d) and (V, d) sides of the two matmuls,
        d(loss)/dh = (e @ W) / s - W[t]        d(loss)/dW = e.T @ (h / s) - scatter(t, h)
    (each times grad_out / count, zero for ignored rows). Four streaming passes over the buffer
    in all (max, subtract, exp, sum), each one parallel kernel: nothing per row block, which a
    loaded machine would stall on thread by thread.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        # (N, V): the only vocab-sized memory of the step, on huge pages (memlm.memory.measure)
        e = torch.mm(h, weight.T, out=empty_huge((h.shape[0], weight.shape[0]), h.dtype, h.device))
        e.sub_(e.amax(dim=1, keepdim=True))  # x - max: every exp below is at most 1
        valid = targets != IGNORE_INDEX
        safe_t = torch.where(valid, targets, 0)
        picked = e.gather(1, safe_t[:, None]).squeeze(1)  # (N,) x_t - max
        e.exp_()
        sums = e.sum(dim=1)  # (N,) >= 1: the max's own term is exp(0)
        count = valid.sum().clamp(min=1)
        loss = ((sums.log() - picked) * valid).sum() / count  # -log softmax(x)_t, averaged
        ctx.save_for_backward(h, weight, e, sums, safe_t, valid, count)
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        h, weight, e, sums, safe_t, valid, count = ctx.saved_tensors
        target_scale = (valid * (grad_out / count)).to(h.dtype)[:, None]  # (N, 1): the one-hot's factor
        row_scale = target_scale / sums[:, None]  # (N, 1): softmax = e / s
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.mm(e, weight).mul_(row_scale).sub_(weight[safe_t] * target_scale)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(e.T, h * row_scale, out=empty_huge(weight.shape, weight.dtype, weight.device))
            grad_w.index_add_(0, safe_t, h * target_scale, alpha=-1)
        return grad_h, grad_w, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits `h @ weight.T` against `targets`, over the full logits.

    h: (N, d) fp32 hidden states; weight: (V, d) fp32, e.g. `lm_head.weight` (tied or not);
    targets: (N,) ids, IGNORE_INDEX for positions to skip. Equals
    `F.cross_entropy(h @ weight.T, targets)` in value and gradients (to float rounding), and
    autograd saves the same bytes, with one (N, V) buffer instead of three at the peak.
    """
    if h.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"linear_cross_entropy is the fp32 path; got {h.dtype} and {weight.dtype}")
    return _LinearCE.apply(h, weight, targets)


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
