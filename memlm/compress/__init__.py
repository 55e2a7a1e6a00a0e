"""Compression for deployment: quantization (RTN, GPTQ), pruning, low-rank, compressed storage."""

from memlm.compress.gptq import gptq_quantize_model, gptq_quantize_weight
from memlm.compress.lowrank import LowRankLinear, factorize_linear, lowrank_model, rank_for_energy
from memlm.compress.prune import (
    Sparse24Linear,
    config_has_head_dim,
    nm_mask,
    prune_2_4,
    prune_ffn,
    prune_heads,
    prune_magnitude,
    sparsity,
)
from memlm.compress.quantize import (
    Int3Linear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    Int8TiedHead,
    choose_group_size,
    dequantize_weight,
    int4_kernel_available,
    quantize_model,
    quantize_state,
    swap_linears,
)
from memlm.compress.storage import folder_bytes, load_compressed, model_bytes, save_compressed

__all__ = [
    "Int3Linear", "Int4Linear", "Int8Embedding", "Int8Linear", "Int8TiedHead", "LowRankLinear",
    "Sparse24Linear", "choose_group_size", "config_has_head_dim", "dequantize_weight",
    "factorize_linear", "folder_bytes", "gptq_quantize_model", "gptq_quantize_weight",
    "int4_kernel_available", "load_compressed", "lowrank_model", "model_bytes", "nm_mask",
    "prune_2_4", "prune_ffn", "prune_heads", "prune_magnitude", "quantize_model",
    "quantize_state", "rank_for_energy", "save_compressed", "sparsity", "swap_linears",
]
