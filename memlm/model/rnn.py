"""A recurrent LM, the light baseline of the seed documents: token embedding, n_layer stacked
PyTorch GRU or LSTM layers of n_embd units, a final norm and the (tied) head.

Each layer is its own `nn.GRU` / `nn.LSTM` (in `blocks`), so activation checkpointing and FSDP
take it layer by layer as they take a transformer's blocks. Generation carries the layers'
hidden states: a prompt costs one pass, each new token one step of every layer, and memory
stays the same however long the text grows (no cache that grows with the context).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint

from memlm.config import ModelConfig
from memlm.model.layers import init_weights, make_norm


@dataclass
class RecurrentState:
    """Per layer: h (1, B, d), or (h, c) for an LSTM; None before the first token."""

    hidden: list


@functools.cache
def _cpu_bf16_lstm_runs() -> bool:
    """Whether oneDNN builds a bfloat16 LSTM here: it needs AVX-512 (a 2-core AVX2 AMD EPYC
    refuses the primitive under CPU autocast)."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nn.LSTM(8, 8, batch_first=True)(torch.zeros(1, 2, 8))
        return True
    except RuntimeError:
        return False


def _run_layer(layer: nn.Module, x, h0):
    """layer(x, h0); an LSTM under CPU autocast runs in float32 where oneDNN has no bf16 LSTM."""
    if (isinstance(layer, nn.LSTM) and torch.is_autocast_enabled("cpu") and layer.weight_ih_l0.device.type == "cpu"
            and not _cpu_bf16_lstm_runs()):
        with torch.autocast("cpu", enabled=False):
            return layer(x.float(), None if h0 is None else tuple(t.float() for t in h0))
    return layer(x, h0)


class RecurrentLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.n_embd
        cell = nn.GRU if config.rnn_cell == "gru" else nn.LSTM
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(cell(d, d, num_layers=1, batch_first=True, bias=config.bias)
                                    for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tied_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.checkpoint_every = 0
        init_weights(self.tok_emb)
        if not config.tied_embeddings:
            init_weights(self.lm_head)
        # the recurrent weights keep PyTorch's uniform(-1/sqrt(d), 1/sqrt(d)) initialisation

    def reset_buffers(self, device=None) -> None:
        """No tables to compute (the loaders call this for every kind)."""

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _layers(self, x, hidden: list | None = None):
        """Run every layer over x (B, T, d) or a PackedSequence; the output and each layer's
        final hidden state."""
        new = []
        for i, layer in enumerate(self.blocks):
            h0 = None if hidden is None else hidden[i]
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                x, h = checkpoint(_run_layer, layer, x, h0, use_reentrant=False)
            else:
                x, h = _run_layer(layer, x, h0)
            if isinstance(x, torch.Tensor):
                x = self.drop(x)
            new.append(h)
        return x, new

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> final normed hidden states (B, T, d), each state from zero."""
        out, _ = self._layers(self.drop(self.tok_emb(idx)))
        return self.norm(out)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(idx))

    # ---- generation (memlm.infer.engine.StateEngine)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> RecurrentState:
        return RecurrentState([None] * self.config.n_layer)

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """Right-padded prompts, packed so each row's state stops at its own last token."""
        packed = pack_padded_sequence(self.tok_emb(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, state.hidden = self._layers(packed)
        return self._logits(state)

    def decode_step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        _, state.hidden = self._layers(self.tok_emb(tokens)[:, None], state.hidden)
        return self._logits(state)

    def _logits(self, state: RecurrentState) -> torch.Tensor:
        last = state.hidden[-1]
        h = (last[0] if isinstance(last, tuple) else last)[0]  # (B, d): the top layer after each row's last token
        return self.lm_head(self.norm(h))
