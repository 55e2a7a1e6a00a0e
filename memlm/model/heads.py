"""A classification head over a decoder's hidden states.

    logits = head(pool(decoder.hidden_states(x)))            (B, n_classes)

pool "last": the hidden state of each row's last real token (a causal decoder has read the
whole text there); "mean": the average over the row's real tokens. Rows are right-padded; their
real lengths come with the batch. The decoder is any memlm Decoder (trained fully, or frozen
with LoRA adapters on its layers); the head is a plain Linear, always trained.
"""

from __future__ import annotations

import torch
from torch import nn

from memlm.model.decoder import Decoder

POOLINGS = ("last", "mean")


class SequenceClassifier(nn.Module):
    def __init__(self, decoder: Decoder, n_classes: int, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.decoder, self.pooling = decoder, pooling
        self.config = decoder.config
        self.head = nn.Linear(decoder.config.n_embd, n_classes, device=decoder.norm.weight.device)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def checkpoint_every(self) -> int:  # activation checkpointing is the decoder's
        return self.decoder.checkpoint_every

    @checkpoint_every.setter
    def checkpoint_every(self, k: int) -> None:
        self.decoder.checkpoint_every = k

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def pooled(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, d) features of right-padded ids (B, T) with real lengths (B,)."""
        h = self.decoder.hidden_states(idx)  # (B, T, d)
        if self.pooling == "last":
            return h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        mask = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, T)
        return (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(idx, lengths))  # (B, n_classes)
