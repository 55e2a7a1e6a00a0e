"""Model definitions: the decoder LM, its layers, the KV cache."""

from memlm.model.decoder import Decoder
from memlm.model.kv_cache import KVCache

__all__ = ["Decoder", "KVCache"]
