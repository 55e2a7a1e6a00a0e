"""A static key/value cache: allocated once at its full size, so decoding never reallocates and
its memory is known before the first token (the planner counts exactly these two tensors)."""

from __future__ import annotations

import torch

from memlm.config import ModelConfig
from memlm.errors import MemlmError


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.n_kv_heads, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens already written, shared by the whole batch

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write k, v (B, nkv, T, hd) at positions start.. and return all keys/values so far."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise MemlmError(
                f"context of {end} tokens does not fit the KV cache of {self.max_len}",
                "shorten the prompt or max_new_tokens, or allocate a longer cache",
            )
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if keys.dtype != k.dtype:  # a low-precision cache for higher-precision compute: widen per layer
            keys, values = keys.to(k.dtype), values.to(k.dtype)
        return keys, values

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
