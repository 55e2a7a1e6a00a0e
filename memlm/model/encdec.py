"""The encoder-decoder transformer of "Attention is all you need": an encoder (bidirectional
self-attention over the source) and a decoder (causal self-attention over the output so far,
cross-attention to the encoder's output, then the MLP), from memlm's norms, positions, MLPs and
SDPA attention.

Flavour choices are made once, in `__init__`:
  norm_placement  "pre" (memlm's default): x + f(norm(x)), a final norm after each stack;
                  "post" (the original's, and BART's): norm(x + f(x)), with BART's norm of the
                  embeddings and no final norm
  positions       learned (one table per stack, as BART) / sinusoidal / RoPE (self-attention only)
  embeddings      one token embedding for source, output and (tied) head; untied: its own head

Inputs are a `Seq2SeqBatch` (sources, their lengths, the decoder's inputs: the start token and
the target shifted right). Generation (memlm.infer.engine.StateEngine) encodes the source once,
computes every decoder layer's cross-attention keys and values once, then decodes token by token
with the decoder's own self-attention KV cache (memlm.model.kv_cache, as the decoder-only model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memlm.config import ModelConfig
from memlm.model.kv_cache import KVCache
from memlm.model.layers import (
    Attention,
    CrossAttention,
    cache_mask,
    init_weights,
    make_mlp,
    make_norm,
    rope_tables,
    sinusoidal_table,
)


@dataclass
class Seq2SeqBatch:
    """A batch of source -> target pairs as the model reads them (the labels travel apart)."""

    source: torch.Tensor  # (B, S) right-padded source ids
    source_lengths: torch.Tensor  # (B,) real lengths
    target_in: torch.Tensor  # (B, T) start token + target[:-1] (right-padded)

    def to(self, device, non_blocking: bool = False) -> Seq2SeqBatch:
        return Seq2SeqBatch(*(t.to(device, non_blocking=non_blocking)
                              for t in (self.source, self.source_lengths, self.target_in)))

    @property
    def device(self) -> torch.device:
        return self.target_in.device

    def numel(self) -> int:
        """Tokens the model reads: the (padded) sources and decoder inputs (the loop's tokens/s)."""
        return self.source.numel() + self.target_in.numel()

    def size(self, dim: int) -> int:
        return self.target_in.size(dim)

    def __getitem__(self, rows: slice) -> Seq2SeqBatch:
        return Seq2SeqBatch(self.source[rows], self.source_lengths[rows], self.target_in[rows])


def _pre_norm(x, norm, f, drop):
    return x + drop(f(norm(x)))


def _post_norm(x, norm, f, drop):
    return norm(x + drop(f(x)))


class EncoderLayer(nn.Module):
    """Self-attention over the whole source (its padding masked), then the MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.sublayer = _post_norm if config.norm_placement == "post" else _pre_norm

    def forward(self, x, rope, mask):
        x = self.sublayer(x, self.attn_norm, lambda h: self.attn(h, rope, mask=mask), self.resid_dropout)
        return self.sublayer(x, self.mlp_norm, self.mlp, self.resid_dropout)


class DecoderLayer(nn.Module):
    """Causal self-attention (cached when generating), cross-attention to the source, the MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.cross_norm = make_norm(config)
        self.cross_attn = CrossAttention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.sublayer = _post_norm if config.norm_placement == "post" else _pre_norm

    def forward(self, x, rope, memory, memory_mask, kv=None, positions=None, mask=None):
        """memory: the encoder's output (B, S, d), projected to keys and values here, inside the
        layer, so that FSDP has gathered this layer's weights and activation checkpointing
        recomputes them; or those keys and values already (a generation computes them once)."""
        if isinstance(memory, torch.Tensor):
            memory = self.cross_attn.memory_kv(memory)
        x = self.sublayer(x, self.attn_norm, lambda h: self.attn(h, rope, kv, positions, None, mask),
                          self.resid_dropout)
        x = self.sublayer(x, self.cross_norm, lambda h: self.cross_attn(h, memory, memory_mask),
                          self.resid_dropout)
        return self.sublayer(x, self.mlp_norm, self.mlp, self.resid_dropout)


@dataclass
class EncDecState:
    """What decoding carries: the decoder's self-attention cache, each layer's cross-attention
    keys and values (computed once per source), the source mask, each row's next position."""

    cache: KVCache
    memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    memory_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None


class EncoderDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d, post = config.n_embd, config.norm_placement == "post"
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        if config.positions == "learned":
            self.enc_pos_emb = nn.Embedding(config.block_size, d)
            self.dec_pos_emb = nn.Embedding(config.block_size, d)
        self.enc_emb_norm = make_norm(config) if post else nn.Identity()
        self.dec_emb_norm = make_norm(config) if post else nn.Identity()
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layer))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layer))
        self.enc_norm = nn.Identity() if post else make_norm(config)
        self.dec_norm = nn.Identity() if post else make_norm(config)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tied_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.checkpoint_every = 0
        self.reset_buffers()
        self.apply(init_weights)
        depth = config.n_layer + config.n_encoder_layer
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))

    @property
    def blocks(self) -> list[nn.Module]:
        """Every layer, encoder first: what FSDP shards one at a time."""
        return [*self.encoder, *self.decoder]

    def reset_buffers(self, device=None) -> None:
        """(Re)compute the fixed position tables; needed after building on the meta device."""
        c = self.config
        device = device or self.tok_emb.weight.device
        with torch.device("cpu"):
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
        return sum(p.numel() for p in self.parameters())

    def _embed(self, idx: torch.Tensor, where, pos_emb: str, norm: nn.Module):
        """Token ids at positions `where` (a slice, or (B, T) tensor) -> (embedded x, RoPE tables or None)."""
        x = self.tok_emb(idx)
        rope = None
        if self.config.positions == "learned":
            x = x + getattr(self, pos_emb).weight[where]
        elif self.config.positions == "sinusoidal":
            x = x + self.pos_table[where].to(x.dtype)
        else:
            rope = (self.rope_cos[where], self.rope_sin[where])
            if isinstance(where, torch.Tensor):
                rope = (rope[0][:, None], rope[1][:, None])  # (B, 1, T, hd)
        return self.drop(norm(x)), rope

    def _run(self, layers: nn.ModuleList, x: torch.Tensor, layer_args: Callable[[int], tuple]) -> torch.Tensor:
        for i, layer in enumerate(layers):
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                x = checkpoint(layer, x, *layer_args(i), use_reentrant=False)
            else:
                x = layer(x, *layer_args(i))
        return x

    def encode(self, source: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source ids (B, S), right-padded to `lengths` -> its encoding (B, S, d) and the mask
        (B, 1, 1, S) that keeps attention off the padding."""
        S = source.shape[1]
        mask = (torch.arange(S, device=source.device)[None] < lengths[:, None])[:, None, None]
        x, rope = self._embed(source, slice(0, S), "enc_pos_emb", self.enc_emb_norm)
        x = self._run(self.encoder, x, lambda i: (rope, mask))
        return self.enc_norm(x), mask

    def hidden_states(self, batch: Seq2SeqBatch) -> torch.Tensor:
        """The decoder's final hidden states (B, T, d) for the whole target at once (teacher forcing)."""
        memory, mask = self.encode(batch.source, batch.source_lengths)
        T = batch.target_in.shape[1]
        x, rope = self._embed(batch.target_in, slice(0, T), "dec_pos_emb", self.dec_emb_norm)
        x = self._run(self.decoder, x, lambda i: (rope, memory, mask))
        return self.dec_norm(x)

    def forward(self, batch: Seq2SeqBatch) -> torch.Tensor:
        return self.lm_head(self.hidden_states(batch))

    # ---- generation (memlm.infer.engine.StateEngine): the prompt is the source

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> EncDecState:
        return EncDecState(KVCache(self.config, batch, min(max_len, self.config.block_size), dtype, device))

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, state: EncDecState) -> torch.Tensor:
        """Encode the sources, keep each decoder layer's cross keys and values, and run the start
        token: the logits of each row's first output token."""
        memory, state.memory_mask = self.encode(ids, lengths)
        state.memory_kv = [layer.cross_attn.memory_kv(memory) for layer in self.decoder]
        state.positions = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        start = torch.full((ids.shape[0],), self.config.start_id, dtype=torch.long, device=ids.device)
        return self.decode_step(start, state)

    def decode_step(self, tokens: torch.Tensor, state: EncDecState) -> torch.Tensor:
        positions = state.positions[:, None]  # (B, 1)
        x, rope = self._embed(tokens[:, None], positions, "dec_pos_emb", self.dec_emb_norm)
        mask = cache_mask(positions, state.cache.max_len)
        for i, layer in enumerate(self.decoder):
            x = layer(x, rope, state.memory_kv[i], state.memory_mask, state.cache[i], positions, mask)
        state.positions = state.positions + 1
        return self.lm_head(self.dec_norm(x))[:, -1]
