"""Hugging Face BART (BartForConditionalGeneration) weights as memlm's encoder-decoder.

BART is the original Transformer's encoder-decoder with learned positions and post-norm (plus a
norm of the embeddings), which memlm's "encdec" kind builds with norm_placement = "post". Its
position tables carry two extra rows in front (positions start at offset 2); its encoder, decoder
and head share one embedding. Only what memlm builds is accepted: GELU MLPs, unscaled embeddings,
as many heads and MLP units in both stacks, and a final logits bias of zeros.
"""

from __future__ import annotations

from typing import Any

import torch

from memlm.config import ModelConfig
from memlm.errors import MemlmError

BART_POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: position p is row p + 2
_LAYER_NAMES = {  # BART's names inside a layer -> memlm's
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.o_proj", "self_attn_layer_norm": "attn_norm",
    "encoder_attn.q_proj": "cross_attn.q_proj", "encoder_attn.k_proj": "cross_attn.k_proj",
    "encoder_attn.v_proj": "cross_attn.v_proj", "encoder_attn.out_proj": "cross_attn.o_proj",
    "encoder_attn_layer_norm": "cross_norm", "fc1": "mlp.up_proj", "fc2": "mlp.down_proj",
    "final_layer_norm": "mlp_norm",
}


def config_from_bart(hf: dict[str, Any]) -> ModelConfig:
    """The memlm config of a BART config.json (as a dict)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise MemlmError(f"this BART model has {what}, which memlm's encoder-decoder does not build",
                             "use a BART config with GELU, unscaled embeddings and the same shape in both stacks")

    need(hf.get("activation_function", "gelu") == "gelu", f"activation {hf.get('activation_function')!r}")
    need(not hf.get("scale_embedding", False), "scaled embeddings")
    need(hf["encoder_attention_heads"] == hf["decoder_attention_heads"], "different head counts per stack")
    need(hf["encoder_ffn_dim"] == hf["decoder_ffn_dim"], "different MLP widths per stack")
    return ModelConfig(
        name=hf.get("_name_or_path") or "bart", kind="encdec", vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"], n_layer=hf["decoder_layers"],
        n_encoder_layer=hf["encoder_layers"], n_head=hf["encoder_attention_heads"], n_embd=hf["d_model"],
        ffn_hidden=hf["encoder_ffn_dim"], norm="layernorm", norm_eps=1e-5, positions="learned", mlp="gelu",
        bias=True, tied_embeddings=hf.get("tie_word_embeddings", True), norm_placement="post",
        start_id=hf.get("decoder_start_token_id", 2),
    )


def state_dict_from_bart(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BartForConditionalGeneration state dict under memlm.model.encdec's names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf.items():
        name = key.removeprefix("model.")
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            continue  # the shared embedding, under its own name
        if name == "final_logits_bias":
            if value.abs().max() != 0:
                raise MemlmError("this BART model has a non-zero final_logits_bias", "memlm's head has no bias")
            continue
        if name == "shared.weight":
            out["tok_emb.weight"] = value
        elif name == "lm_head.weight":
            out["lm_head.weight"] = value
        elif name.endswith("embed_positions.weight"):
            out[f"{name[:3]}_pos_emb.weight"] = value[BART_POSITION_OFFSET:]
        elif name.endswith(("layernorm_embedding.weight", "layernorm_embedding.bias")):
            out[f"{name[:3]}_emb_norm.{name.rpartition('.')[2]}"] = value
        else:  # encoder.layers.3.fc1.weight -> encoder.3.mlp.up_proj.weight
            stack, _, i, rest = name.split(".", 3)
            inner, _, attr = rest.rpartition(".")
            if stack not in ("encoder", "decoder") or inner not in _LAYER_NAMES:
                raise MemlmError(f"BART tensor '{key}' has no place in memlm's encoder-decoder")
            out[f"{stack}.{i}.{_LAYER_NAMES[inner]}.{attr}"] = value
    return out
