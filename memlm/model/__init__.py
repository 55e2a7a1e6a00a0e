"""Model definitions: the kinds of model (built by memlm.model.build), their layers, the KV cache."""

from memlm.model.build import KINDS, build_model, empty_model
from memlm.model.decoder import Decoder
from memlm.model.kv_cache import KVCache

__all__ = ["KINDS", "build_model", "empty_model", "Decoder", "KVCache"]
