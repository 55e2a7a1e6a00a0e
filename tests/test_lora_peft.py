"""LoRA adapters in the PEFT layout, checked against the real `peft` package both ways.

Tiny transformers models come from local configs (random weights, no hub), are saved with their
own `save_pretrained` and read by memlm's HF importer; adapters made by memlm are loaded by
`PeftModel.from_pretrained`, adapters made by `peft` are loaded by memlm, and the logits agree.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import memlm  # noqa: E402
from memlm.adapters.lora import apply_lora, lora_layers  # noqa: E402
from memlm.adapters.peft import load_adapter, save_adapter  # noqa: E402
from memlm.errors import MemlmError  # noqa: E402
from memlm.interop.hf import load_hf  # noqa: E402


def _llama(hidden=64):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return transformers.GPT2LMHeadModel(cfg)


MAKERS = {"llama": _llama, "gpt2": _gpt2}


def _pair(arch: str, folder, seed: int = 0):
    """A transformers model with randomized norms (so the fingerprint has something to tell) and
    the same model read by memlm."""
    torch.manual_seed(seed)
    ref = MAKERS[arch]().eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(folder)
    return ref, load_hf(folder)


def _randomize_adapters(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)


IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("arch,targets", [("llama", "q_proj,v_proj"), ("llama", "all-linear"),
                                          ("gpt2", "q_proj,v_proj,o_proj,down_proj")])
def test_a_memlm_adapter_loads_in_peft_with_the_same_logits(arch, targets, tmp_path):
    ref, ours = _pair(arch, tmp_path / "hf")
    apply_lora(ours, r=4, alpha=8, targets=targets)
    _randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", base_name=str(tmp_path / "hf"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8

    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected, got = peft_model(IDS).logits, ours.eval()(IDS)
        assert not torch.allclose(got, load_hf(tmp_path / "hf")(IDS), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "k_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_a_peft_adapter_loads_in_memlm_with_the_same_logits(arch, targets, tmp_path):
    ref, _ = _pair(arch, tmp_path / "hf")
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False,
                             fan_in_fan_out=arch == "gpt2", lora_dropout=0.0)
    peft_model = peft.get_peft_model(ref, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(IDS).logits

    from memlm.tokenizer import train_bpe

    train_bpe(["a few words to make a tokenizer from, " * 20], vocab_size=280).save(tmp_path / "hf")
    lm = memlm.load(tmp_path / "hf", adapter=tmp_path / "adapter")  # the public API
    assert set(lora_layers(lm.model)) and all(m.r == 4 for m in lora_layers(lm.model).values())
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS), expected, atol=1e-4, rtol=0)


def test_an_adapter_for_another_base_is_refused(tmp_path):
    _, ours = _pair("llama", tmp_path / "a", seed=0)
    apply_lora(ours, r=4, alpha=8)
    save_adapter(ours, tmp_path / "adapter")
    _, other = _pair("llama", tmp_path / "b", seed=7)  # same shape, other weights
    with pytest.raises(MemlmError, match="trained on another base"):
        load_adapter(other, tmp_path / "adapter")

    # a peft adapter (no memlm fingerprint) of another shape: its tensors do not fit
    torch.manual_seed(0)
    wide = _llama(hidden=96)
    peft.get_peft_model(wide, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "wide")
    with pytest.raises(MemlmError, match="does not fit"):
        load_adapter(load_hf(tmp_path / "a"), tmp_path / "wide")


def test_a_damaged_adapter_is_refused(tmp_path):
    _, ours = _pair("llama", tmp_path / "hf")
    apply_lora(ours, r=4, alpha=8)
    folder = save_adapter(ours, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(MemlmError, match="adapter|safetensors|truncated"):
        load_adapter(load_hf(tmp_path / "hf"), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(MemlmError, match="cannot read"):
        load_adapter(load_hf(tmp_path / "hf"), folder)
    weights.unlink()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(MemlmError, match="pickle"):
        load_adapter(load_hf(tmp_path / "hf"), folder)


@pytest.mark.slow
def test_a_qlora_adapter_of_smollm2_loads_in_peft_on_transformers_smollm2(smollm2_gguf_path, tmp_path):
    """The real model: an adapter made on SmolLM2's int4 base (QLoRA) carries the base's
    fingerprint to the float base, and peft puts it on transformers' own SmolLM2 (read from the
    same GGUF file) with the same logits."""
    quantized = memlm.load("smollm2-135m-instruct", weight_format="int4")
    apply_lora(quantized.model, r=8, alpha=16, targets="q_proj,v_proj,down_proj")
    _randomize_adapters(quantized.model)
    save_adapter(quantized.model, tmp_path / "adapter", base_name="smollm2-135m-instruct")
    del quantized

    ours = memlm.load("smollm2-135m-instruct", adapter=tmp_path / "adapter")  # the float base
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    ids = torch.tensor([ours.tokenizer.encode("The with statement is used to wrap the execution of a block")])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), peft_model(ids).logits, atol=1e-4, rtol=0)
