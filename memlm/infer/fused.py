"""A decode step's blocks as one C++ op each (memlm.kernels.decode_block), where the model allows.

At batch 1 a quantized block's four matmuls are a third of its time in eager PyTorch; the rest is
the dispatch of some 45 small ops (norms, rotations, the cache's indexed writes, views, adds).
The op runs them as loops between memlm's int4/int8 kernels, and computes what `Block.forward`
does to float rounding (tests/test_decode_block.py).

It takes a Llama-flavour block (RMSNorm, RoPE, SwiGLU, no biases) whose projections are fused
(`fuse_projections`) into layers memlm's kernels compute (int4 in memlm's layout, int8) or
float32 layers on memlm's float kernel (`FloatLinear`), float32 activations and a float32 cache, one
token per row, each at its own position and slot (a server's mixed step passes its prompt
pieces that way too: memlm.infer.engine.decode_and_prefill_tokens). Anything else (prefill, a
bf16 cache, LoRA layers, GPT-2 blocks) runs the block itself. MEMLM_DECODE_BLOCK=0 turns it off
(A/B runs).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from memlm import kernels
from memlm.model import Decoder
from memlm.model.layers import Block

FLOAT, INT4, INT8 = 0, 1, 2  # the op's layer kinds (csrc/decode_block.cpp)


def _layer_tensors(layer: nn.Module) -> tuple[str, int | None, list[torch.Tensor]] | None:
    """(format, group, tensors) of a layer the op can compute, else None."""
    from memlm.compress.quantize import Int4Linear, Int8Linear, int8_group_size
    from memlm.infer.engine import FloatLinear  # engine imports this module

    if type(layer) is FloatLinear and layer.bias is None:
        return "fp32", None, [layer.weight]
    if type(layer) is Int4Linear and layer.bias is None and layer.memlm_kernel and not layer.kernel_layout:
        return "int4", layer.group_size, [layer.weight_packed, layer.scales, layer.mins]
    if (type(layer) is Int8Linear and layer.bias is None and layer.memlm_kernel
            and layer.scales.dtype == torch.float32):
        return "int8", int8_group_size(layer.weight_int8, layer.scales), [layer.weight_int8, layer.scales]
    return None


class FusedBlock:
    """Runs `block` through the op for a decode step, and as itself for anything else."""

    def __init__(self, block: Block, layers: list[tuple[str, int | None, list[torch.Tensor]]]):
        self.block = block
        self.layers = [tensors for _, _, tensors in layers]
        self.formats = [(fmt, group) for fmt, group, _ in layers]
        self.eps = float(block.attn_norm.eps)
        self.n_head, self.n_kv_heads = block.attn.n_head, block.attn.n_kv_heads
        self.norms = (block.attn_norm.weight, block.mlp_norm.weight)
        self._op = torch.ops.memlm.decode_block.default  # the overload itself: no resolution per call
        self._kinds: dict[int, list[int]] = {}
        # float32 layers: at most this many rows through memlm's float kernel (longer batches run
        # the block, whose FloatLinear layers then use torch's matmul)
        self.floats = 0
        if any(fmt == "fp32" for fmt, _ in self.formats):
            from memlm.infer.engine import FLOAT_KERNEL_ROWS

            self.floats = FLOAT_KERNEL_ROWS

    def kinds(self, rows: int) -> list[int]:
        """Per layer: its kind and, quantized, the path memlm.kernels.choose picked for this row
        count; float32 has one path."""
        if rows not in self._kinds:
            from memlm.kernels import choose

            kinds = []
            for fmt, group in self.formats:
                if fmt == "fp32":
                    kinds += [FLOAT, 0, 0]
                else:
                    kinds += [INT4 if fmt == "int4" else INT8, *choose.kernel_args(choose.path(fmt, group, rows))]
            self._kinds[rows] = kinds
        return self._kinds[rows]

    def takes(self, rows: int) -> bool:
        """Whether a call of this many one-token rows runs the op (float32 layers: memlm's kernel)."""
        return not self.floats or rows <= self.floats

    def __call__(self, x, rope=None, kv=None, positions=None, slots=None, mask=None):
        B, T, d = x.shape
        if (T != 1 or kv is None or rope is None or x.dtype != torch.float32 or kv.k.dtype != torch.float32
                or torch.is_grad_enabled() or not self.takes(B)):
            return self.block(x, rope, kv, positions, slots, mask)
        y = self.step(x.reshape(B, d), rope[0].reshape(B, -1), rope[1].reshape(B, -1), positions.reshape(B), slots, kv)
        return y.view(B, 1, d)

    def step(self, x, cos, sin, positions, slots, kv):
        """The op on (B, d) rows, their RoPE angles (B, head_dim) and positions (B,): the block's output."""
        qkv, o, gate_up, down = self.layers
        return self._op(x, *self.norms, self.eps, qkv, o, gate_up, down, self.kinds(x.shape[0]), kv.k, kv.v,
                        positions, slots, cos, sin, self.n_head, self.n_kv_heads)


@torch.no_grad()
def decode_step(model: Decoder, fused: list[FusedBlock], tokens: torch.Tensor, positions: torch.Tensor, cache,
                slots: torch.Tensor | None = None) -> torch.Tensor | None:
    """memlm.infer.engine.decode_step with every block through the op, the step's own arguments
    (embeddings, RoPE angles) made once for all blocks rather than per block: at batch 1 the
    Python around 30 op calls was a sixth of an int4 token (cProfile, SmolLM2: ~2 ms of ~11).
    None where the op does not take this step (the caller then runs the blocks)."""
    B = tokens.shape[0]
    if tokens.dim() != 1 or cache.layers[0].k.dtype != torch.float32 or not fused[0].takes(B):
        return None
    x = model.tok_emb(tokens)  # (B, d); dropout is off in inference
    if x.dtype != torch.float32:
        return None
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (B, head_dim)
    for block, layer in zip(fused, cache.layers):
        x = block.step(x, cos, sin, positions, slots, layer)
    return model.lm_head(model.norm(x))


def op_fits(model: Decoder) -> bool:
    """Whether the op can take this kind of model at all (its flavour, device, the kernels, the
    switch); `fused_blocks` then checks every layer."""
    c = model.config
    return (os.environ.get("MEMLM_DECODE_BLOCK", "1").strip() != "0" and c.norm == "rmsnorm" and c.positions == "rope"
            and c.mlp == "swiglu" and not c.bias and model.norm.weight.device.type == "cpu" and kernels.available())


def fused_blocks(model: Decoder) -> list[FusedBlock] | None:
    """The model's blocks as FusedBlocks, or None where the op does not fit the model (or is off)."""
    if not op_fits(model):
        return None
    fused = []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if attn.qkv_proj is None or getattr(mlp, "gate_up_proj", None) is None:
            return None
        layers = [_layer_tensors(layer) for layer in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        norms = (block.attn_norm, block.mlp_norm)
        if (any(layer is None for layer in layers) or not all(isinstance(n, nn.RMSNorm) for n in norms)
                or any(n.weight is None or n.weight.dtype != torch.float32 or n.eps is None for n in norms)):
            return None
        fused.append(FusedBlock(block, layers))
    return fused
