"""Adapters: LoRA by composition over any linear-like layer (lora.py), PEFT-layout files (peft.py)."""

from memlm.adapters.lora import LoRALinear, apply_lora, lora_layers, merge_lora
from memlm.adapters.peft import base_fingerprint, load_adapter, save_adapter

__all__ = ["LoRALinear", "apply_lora", "base_fingerprint", "load_adapter", "lora_layers", "merge_lora", "save_adapter"]
