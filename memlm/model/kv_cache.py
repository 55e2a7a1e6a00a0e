"""A static key/value cache: a pool of `slots` sequences, each up to `max_len` tokens, allocated
once at its full size. Decoding never reallocates, its memory is known before the first token
(the planner counts exactly these two buffers), and a compiled decode step sees the same shapes
on every token.

Every write names its positions per row (a tensor), so sequences of different lengths share one
pool: nothing about the cache changes per token on the Python side. Which positions a query may
see is the model's business (`attention_mask`); the cache only stores.
"""

from __future__ import annotations

import torch
from torch import nn

from memlm.config import ModelConfig


class KVCache(nn.Module):
    def __init__(self, config: ModelConfig, slots: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self.slots = slots
        self.max_len = max_len or config.block_size
        shape = (config.n_layer, slots, config.n_kv_heads, self.max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) of batch row b at positions[b] (B, T) of slot slots[b], and
        return every stored key and value of those slots (B, nkv, max_len, hd).

        slots None: row b is slot b and the batch is the whole pool (no gather: the common case of
        one generation, or a server decoding all its slots). Indexed assignment (`index_put_`)
        rather than `index_copy_`: each row writes at its own positions."""
        rows = torch.arange(k.shape[0], device=k.device) if slots is None else slots
        # Advanced indices around a slice put their dims first: the target is (B, T, nkv, hd).
        self.k[layer][rows[:, None], :, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer][rows[:, None], :, positions] = v.transpose(1, 2).to(self.v.dtype)
        keys, values = (self.k[layer], self.v[layer]) if slots is None else (self.k[layer][slots], self.v[layer][slots])
        if keys.dtype != k.dtype:  # a low-precision cache for higher-precision compute: widen per layer
            keys, values = keys.to(k.dtype), values.to(k.dtype)
        return keys, values

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class CacheWindow:
    """The first `slots` slots and `max_len` positions of a KVCache, sharing its memory.

    A server's pool is as long as its longest request and as wide as its most concurrent ones;
    a decode step whose rows sit in the first slots and have not gone past `max_len` attends
    over this window instead: the attention costs what the rows hold, and the keys and values
    are views, never copied."""

    def __init__(self, pool: KVCache, slots: int, max_len: int):
        self.k, self.v = pool.k[:, :slots, :, :max_len], pool.v[:, :slots, :, :max_len]
        self.slots, self.max_len = slots, max_len

    write = KVCache.write  # the same indexed writes, into the views
