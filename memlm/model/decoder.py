"""The decoder-only language model (GPT-2 and Llama flavours from one `ModelConfig`).

Flavour choices are made once, in `__init__`; `forward` has no flavour branches:
  positions  learned / sinusoidal add a table to the token embeddings; RoPE rotates q and k
  norm       LayerNorm or RMSNorm (layers.make_norm)
  mlp        GELU or SwiGLU (layers.Block)
  heads      n_kv_heads < n_head gives grouped-query attention
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memlm.config import ModelConfig
from memlm.model.kv_cache import KVCache
from memlm.model.layers import Block, cache_mask, init_weights, make_norm, rope_tables, sinusoidal_table


def recomputed(block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
    """block(x, *args) under activation checkpointing: only x is kept; backward runs it again.

    Fine-tuning a frozen base in one process, the block's first forward runs without building a
    graph (torch's reentrant checkpoint). The non-reentrant one records every op's graph node in
    forward and keeps it to backward: small allocations, made between the block's temporaries of
    1-4 MiB, which split the holes those leave in glibc's heap, so the next block cannot reuse
    them and the heap grows past what is alive (QLoRA on SmolLM2, every block recomputed: 904 MiB
    against 746 reentrant, the same speed). Training every weight it is the other way round (the
    tiny preset, 16 x 256 tokens: 747 MiB reentrant, 720 non-reentrant, whose backward frees each
    block's graph as it goes), and under torchrun (DDP, FSDP2) it stays non-reentrant, the form
    those wrappers' hooks are written for. The reentrant form needs an input that requires a
    gradient: the frozen embedding's output does not, so block 0 is handed a leaf that does."""
    frozen_base = any(not p.requires_grad for p in block.parameters())
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed or not frozen_base:
        return checkpoint(block, x, *args, use_reentrant=False)
    if not x.requires_grad:
        x = x.detach().requires_grad_()
    return checkpoint(block, x, *args, use_reentrant=True)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tied_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.checkpoint_every = 0  # activation checkpointing: every k-th block recomputed in backward
        self.reset_buffers()
        self.apply(init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def reset_buffers(self, device=None) -> None:
        """(Re)compute the fixed position tables; needed after building on the meta device."""
        c = self.config
        device = device or self.norm.weight.device
        with torch.device("cpu"):  # small tables; computing them on meta would import dynamo's kernels
            if c.positions == "rope":
                cos, sin = rope_tables(c.block_size, c.head_dim, c.rope_theta)
                tables = {"rope_cos": cos, "rope_sin": sin}
            elif c.positions == "sinusoidal":
                tables = {"pos_table": sinusoidal_table(c.block_size, c.n_embd)}
            else:
                tables = {}
        for name, table in tables.items():
            self.register_buffer(name, table.to(device), persistent=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                      slots: torch.Tensor | None = None, blocks: Sequence[Callable] | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final normed hidden states (B, T, d).

        Without a cache (training, scoring) the tokens sit at positions 0..T-1. With one, token
        (b, t) sits at positions[b, t] of cache slot slots[b] (slots None: slot b): its key and
        value are stored there, and it sees its row's keys up to its own position. Nothing here
        depends on a Python count of tokens so far, so the same code serves a compiled step.
        The caller keeps positions inside the context (memlm.infer.generate checks).

        blocks: what runs each of self.blocks (default: the blocks themselves; a compiled decode
        step passes their compiled forms, memlm.infer.engine)."""
        x, rope, mask = self._inputs(idx, cache, positions)
        for i, block in enumerate(blocks or self.blocks):
            kv = None if cache is None else cache[i]
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                x = recomputed(block, x, rope, kv, positions, slots, mask)
            else:
                x = block(x, rope, kv, positions, slots, mask)
        return self.norm(x)

    def _inputs(self, idx: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None):
        """What the blocks take for token ids (B, T): embeddings (B, T, d) with learned or
        sinusoidal positions added, RoPE's angles, and which cached keys each token sees."""
        T = idx.shape[1]
        x = self.tok_emb(idx)  # (B, T, d)
        mask = None
        if cache is not None:
            mask = cache_mask(positions, cache.max_len)
        where: slice | torch.Tensor = slice(0, T) if positions is None else positions
        rope = None
        if self.config.positions == "learned":
            x = x + self.pos_emb.weight[where]
        elif self.config.positions == "sinusoidal":
            x = x + self.pos_table[where].to(x.dtype)
        else:
            rope = (self.rope_cos[where], self.rope_sin[where])  # (T, hd) each, or (B, T, hd)
            if positions is not None:
                rope = (rope[0][:, None], rope[1][:, None])  # (B, 1, T, hd): one set per row, all heads
        return self.drop(x), rope, mask

    def hidden_states_batches(self, batches: list[tuple]) -> list[torch.Tensor]:
        """hidden_states of several cached batches at once, each (idx, cache, positions, slots),
        as if run one after the other: every block reads its weights once for all their tokens
        (Block.forward_batches). Inference only."""
        inputs = [self._inputs(idx, cache, positions) for idx, cache, positions, _ in batches]
        xs = [x for x, _, _ in inputs]
        for i, block in enumerate(self.blocks):
            per_batch = [(rope, cache[i], positions, slots, mask)
                         for (_, rope, mask), (_, cache, positions, slots) in zip(inputs, batches)]
            xs = block.forward_batches(xs, per_batch)
        return [self.norm(x) for x in xs]

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, last_only: bool = False,
                blocks: Sequence[Callable] | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) of the last position only (see hidden_states)."""
        h = self.hidden_states(idx, cache, positions, slots, blocks)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)
