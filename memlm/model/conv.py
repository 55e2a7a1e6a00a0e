"""A causal dilated convolution LM, the other light baseline: n_layer pre-norm blocks, each a
depthwise causal convolution over time (conv_kernel taps, dilation 2**i in block i) and the
transformer's MLP over channels, each with its residual.

Block i sees (conv_kernel - 1) * 2**i tokens further back than the one below it, so the last
block's receptive field is 1 + (k - 1) * (2**L - 1) tokens (ModelConfig.receptive_field),
growing exponentially with depth at a cost linear in it. Nothing depends on absolute positions.
Generation keeps, per block, a rolling buffer of the last (k - 1) * 2**i + 1 inputs of its
convolution: each new token costs the same whatever came before, in a fixed amount of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memlm.config import ModelConfig
from memlm.model.layers import init_weights, make_mlp, make_norm


class CausalConv(nn.Module):
    """Depthwise Conv1d over (B, T, d), left-padded so output t sees inputs t - (k-1)*dilation .. t."""

    def __init__(self, config: ModelConfig, dilation: int):
        super().__init__()
        d, k = config.n_embd, config.conv_kernel
        self.dilation = dilation
        self.span = (k - 1) * dilation + 1  # inputs one output reads: the rolling buffer's length
        self.conv = nn.Conv1d(d, d, k, dilation=dilation, groups=d, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(x.transpose(1, 2), (self.span - 1, 0))  # (B, d, T + span - 1)
        return self.conv(y).transpose(1, 2)  # (B, T, d)

    def step(self, x: torch.Tensor, buffer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One input per row, x (B, d) at positions (B,): written into the rolling buffer
        (B, span, d) at position % span, then the taps at position - m * dilation (m = k-1..0)
        read back. A tap before the start reads a slot not written yet: zero, like the padding."""
        rows = torch.arange(x.shape[0], device=x.device)
        buffer[rows, positions % self.span] = x.to(buffer.dtype)
        k = self.conv.kernel_size[0]
        back = self.dilation * torch.arange(k - 1, -1, -1, device=x.device)  # tap j reads k-1-j steps back
        window = buffer[rows[:, None], (positions[:, None] - back) % self.span].to(x.dtype)  # (B, k, d)
        y = torch.einsum("bkd,dk->bd", window, self.conv.weight[:, 0])
        return y if self.conv.bias is None else y + self.conv.bias


class ConvBlock(nn.Module):
    """x + conv(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, dilation: int):
        super().__init__()
        self.conv_norm = make_norm(config)
        self.conv = CausalConv(config, dilation)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.conv(self.conv_norm(x)))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))

    def step(self, x: torch.Tensor, buffer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.conv.step(self.conv_norm(x), buffer, positions)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class ConvState:
    buffers: list[torch.Tensor]  # per block (B, span, d): its convolution's recent inputs
    positions: torch.Tensor  # (B,) the position of each row's next token


class ConvLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ConvBlock(config, 2**i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tied_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.checkpoint_every = 0
        self.apply(init_weights)  # Linears and the embedding; the convolutions keep PyTorch's init

    def reset_buffers(self, device=None) -> None:
        """No tables to compute (the loaders call this for every kind)."""

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _blocks(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if record is not None:
                record.append(block.conv_norm(x))
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> final normed hidden states (B, T, d)."""
        return self.norm(self._blocks(self.drop(self.tok_emb(idx))))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(idx))

    # ---- generation (memlm.infer.engine.StateEngine)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> ConvState:
        d = self.config.n_embd
        return ConvState([torch.zeros(batch, b.conv.span, d, dtype=dtype, device=device) for b in self.blocks],
                         torch.zeros(batch, dtype=torch.long, device=device))

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, state: ConvState) -> torch.Tensor:
        """One pass over the right-padded prompts (causal: padding never reaches a row's real
        tokens); each block's last `span` convolution inputs before a row's length go into its
        buffer, at position % span."""
        inputs: list[torch.Tensor] = []
        h = self._blocks(self.tok_emb(ids), record=inputs)  # (B, T, d)
        rows = torch.arange(ids.shape[0], device=ids.device)
        for buffer, x in zip(state.buffers, inputs):
            span = buffer.shape[1]
            pos = lengths[:, None] - span + torch.arange(span, device=ids.device)  # (B, span): the last span positions
            kept = x[rows[:, None], pos.clamp(min=0)] * (pos >= 0)[..., None]  # before the start: zero
            buffer.scatter_(1, (pos % span)[..., None].expand_as(kept), kept.to(buffer.dtype))
        state.positions = lengths.clone()
        return self.lm_head(self.norm(h[rows, lengths - 1]))

    def decode_step(self, tokens: torch.Tensor, state: ConvState) -> torch.Tensor:
        x = self.tok_emb(tokens)  # (B, d)
        for block, buffer in zip(self.blocks, state.buffers):
            x = block.step(x, buffer, state.positions)
        state.positions = state.positions + 1
        return self.lm_head(self.norm(x))
