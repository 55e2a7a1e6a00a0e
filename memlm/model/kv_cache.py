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


class LayerKV(nn.Module):
    """One layer's keys and values for every slot: k, v (slots, n_kv, max_len, head_dim)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) of batch row b at positions[b] (B, T) of slot slots[b], and
        return every stored key and value of those slots (B, nkv, max_len, hd).

        slots None: row b is slot b and the batch is the whole pool (no gather: the common case of
        one generation, or a server decoding all its slots). Indexed assignment (`index_put_`)
        rather than `index_copy_`: each row writes at its own positions."""
        rows = torch.arange(k.shape[0], device=k.device) if slots is None else slots
        # Advanced indices around a slice put their dims first: the target is (B, T, nkv, hd).
        self.k[rows[:, None], :, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows[:, None], :, positions] = v.transpose(1, 2).to(self.v.dtype)
        keys, values = (self.k, self.v) if slots is None else (self.k[slots], self.v[slots])
        if keys.dtype != k.dtype:  # a low-precision cache for higher-precision compute: widen per layer
            keys, values = keys.to(k.dtype), values.to(k.dtype)
        return keys, values


class KVCache(nn.Module):
    """The pool: one LayerKV per layer (`cache[i]`), all of `slots` x `max_len` tokens.

    A buffer per layer, not one (L, ...) tensor: each layer's write is in place in its own buffer
    (a compiled step that wrote into a view of one big buffer copied the whole cache at every
    layer), and every block gets the same kind of argument, so one compiled block serves all."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self.slots = slots
        self.max_len = max_len or config.block_size
        shape = (slots, config.n_kv_heads, self.max_len, config.head_dim)
        self.layers = nn.ModuleList(LayerKV(shape, dtype, device) for _ in range(config.n_layer))

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k.dtype

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())


class CacheWindow:
    """The first `slots` slots and `max_len` positions of a KVCache, sharing its memory.

    A server's pool is as long as its longest request and as wide as its most concurrent ones;
    a decode step whose rows sit in the first slots and have not gone past `max_len` attends
    over this window instead: the attention costs what the rows hold, and the keys and values
    are views, never copied."""

    def __init__(self, pool: KVCache, slots: int, max_len: int):
        self.pool, self.slots, self.max_len = pool, slots, max_len
        self.layers = [_LayerWindow(layer.k[:slots, :, :max_len], layer.v[:slots, :, :max_len])
                       for layer in pool.layers]

    def __getitem__(self, layer: int) -> "_LayerWindow":
        return self.layers[layer]


class _LayerWindow:
    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    write = LayerKV.write  # the same indexed writes, into the views
