"""The one place a model is made from its config: `ModelConfig.kind` -> class.

A new kind is a module with its class plus one entry in KINDS. What every kind provides (the
training loop, checkpoints, loaders and generation rely on nothing else):

    Kind(config)                 a model with initialised weights
    forward(x) -> logits         (B, T, V); x is what the kind's batches hold (memlm.data)
    hidden_states(x)             (B, T, d) before `lm_head`: the loop's chunked / fused losses
    tok_emb, lm_head             the embedding and the head (the same weight when tied)
    reset_buffers(device)        recompute non-trained tables after building on the meta device
    checkpoint_every             activation checkpointing: every k-th layer recomputed in backward

and for generation, either the decoder's KV-cache engine (memlm.infer.engine.Engine, which knows
Decoder's blocks) or its own state-carrying steps (memlm.infer.engine.StateEngine):

    new_state(batch, max_len, dtype, device)   what decoding carries from token to token
    prefill(ids, lengths, state) -> (B, V)     right-padded prompts; logits after each last token
    decode_step(tokens, state) -> (B, V)       one token per row
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from memlm.config import ModelConfig
from memlm.errors import MemlmError
from memlm.model.conv import ConvLM
from memlm.model.decoder import Decoder
from memlm.model.encdec import EncoderDecoder
from memlm.model.rnn import RecurrentLM

KINDS: dict[str, type[nn.Module]] = {
    "decoder": Decoder,
    "encdec": EncoderDecoder,
    "rnn": RecurrentLM,
    "conv": ConvLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    if config.kind not in KINDS:
        raise MemlmError(f"model kind '{config.kind}' is not available", f"known kinds: {', '.join(KINDS)}")
    return KINDS[config.kind]


def build_model(config: ModelConfig) -> nn.Module:
    """The model `config` describes, with freshly initialised weights."""
    return model_class(config)(config)


class _SkipInit(TorchFunctionMode):
    """Inside, torch.nn.init functions leave their tensor as it is. Filling meta tensors is
    pointless, and the meta kernel of normal_ imports dynamo and sympy (+70 MB resident)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def empty_model(config: ModelConfig) -> nn.Module:
    """The model of meta tensors (no memory, no init), to be filled by load_state_dict(assign=True)
    or memlm.compress.assemble.ModelAssembler."""
    with torch.device("meta"), _SkipInit():
        return model_class(config)(config)
