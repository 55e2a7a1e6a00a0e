"""The small modules a decoder is built from: norms, positions, attention, feed-forward, block.

Every projection is a plain `nn.Linear` attribute with a stable name (q_proj, k_proj, v_proj,
o_proj, up_proj, gate_proj, down_proj), so quantized, LoRA and low-rank layers can be swapped in
by name, and FSDP can shard per `Block`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memlm.config import ModelConfig


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation of Linears and embeddings (every kind starts from it)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """The fixed position table of "Attention is all you need": sin on even, cos on odd features."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (length, head_dim) in the "rotate half" layout used by HF Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hd/2) of x (B, nh, T, hd) by the angles in cos/sin (T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, through PyTorch's SDPA kernels.

    For inference `memlm.infer.engine` may replace q/k/v by one `qkv_proj` (one matmul instead
    of three: the activations are read once, and there is one kernel call per token, not three)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.n_kv_heads, hd
        self.q_proj = nn.Linear(d, config.n_head * hd, bias=config.bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=config.bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=config.bias)
        self.o_proj = nn.Linear(config.n_head * hd, d, bias=config.bias)
        self.qkv_proj: nn.Module | None = None
        self.dropout = config.dropout

    def forward(self, x, rope=None, kv=None, positions=None, slots=None, mask=None):
        """With a cache (kv: this layer's LayerKV): this chunk's keys and values are stored at
        `positions` (B, T) and the queries see what `mask` (B, 1, T, max_len) allows; without one,
        plain causal attention."""
        return self.o_proj(self.attend(*self.project(x), rope, kv, positions, slots, mask))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values of x (..., d): (..., nh * hd), (..., nkv * hd) twice."""
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(
                [self.n_head * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q, k, v, rope=None, kv=None, positions=None, slots=None, mask=None) -> torch.Tensor:
        """Attention of projected q, k, v (B, T, ...) (see forward): (B, T, nh * hd), before o_proj."""
        B, T, _ = q.shape
        q = q.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.write(k, v, positions, slots)  # (B, nkv, max_len, hd)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_head,
        )  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)


class CrossAttention(nn.Module):
    """Attention from a decoder's tokens (queries) to an encoder's output (keys and values), with
    the projections named as in `Attention`. The memory's keys and values depend on the source
    alone: a generation computes them once per source (`memory_kv`) and reuses them every token."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.n_kv_heads, hd
        self.q_proj = nn.Linear(d, config.n_head * hd, bias=config.bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=config.bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=config.bias)
        self.o_proj = nn.Linear(config.n_head * hd, d, bias=config.bias)
        self.dropout = config.dropout

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output (B, S, d) as keys and values (B, nkv, S, hd) each."""
        B, S, _ = memory.shape
        k = self.k_proj(memory).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor],
                memory_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) attends to every source position memory_mask (B, 1, 1, S) lets through."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k, v = memory_kv
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=memory_mask,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_heads != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def cache_mask(positions: torch.Tensor, max_len: int) -> torch.Tensor:
    """Which cached keys each query sees: (B, 1, T, max_len), True = attend.

    A query at position p sees the keys at positions 0..p of its own row, and nothing later: not
    the rest of a right-padded prompt, not what an earlier sequence left in a reused slot."""
    keys = torch.arange(max_len, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.down_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); for inference gate and up may become one `gate_up_proj`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.down_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def make_mlp(config: ModelConfig) -> nn.Module:
    return SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv=None, positions=None, slots=None, mask=None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, kv, positions, slots, mask))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))

    def forward_batches(self, xs: list[torch.Tensor], batches: list[tuple]) -> list[torch.Tensor]:
        """Inference on several batches at once, each x (B, T, d) with its own (rope, kv, positions,
        slots, mask), as `forward` would run them one after the other (a server's decode rows and a
        prompt's next piece). The norms, projections and MLP run over all their tokens together,
        so each weight is read from memory once, not once per batch; attention runs per batch, in
        order (a later batch's writes to the cache land after an earlier one's)."""
        sizes = [x.shape[0] * x.shape[1] for x in xs]
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        projected = [part.split(sizes) for part in self.attn.project(self.attn_norm(flat))]
        attended = [self.attn.attend(*(p[i].reshape(*x.shape[:2], -1) for p in projected), *batch).flatten(0, 1)
                    for i, (x, batch) in enumerate(zip(xs, batches))]
        flat = flat + self.attn.o_proj(torch.cat(attended))
        flat = flat + self.mlp(self.mlp_norm(flat))
        return [part.view(x.shape) for part, x in zip(flat.split(sizes), xs)]
