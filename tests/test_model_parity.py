"""memlm's decoder against Hugging Face transformers, the independent implementation.

Tiny HF models are built from local configs with random weights (no hub), exported through
their own `save_pretrained`, imported through memlm's HF importer, and compared logit by logit,
including step-by-step decoding with memlm's KV cache. And the reverse: memlm export -> HF load.
"""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memlm.config import PRESETS, ModelConfig, preset  # noqa: E402
from memlm.interop.hf import load_hf, save_hf  # noqa: E402
from memlm.model import Decoder, KVCache  # noqa: E402


def hf_gpt2():
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=3, n_head=4,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return transformers.GPT2LMHeadModel(cfg)


def hf_llama(tie=False, n_kv=2, bias=False, head_dim=None):
    cfg = transformers.LlamaConfig(head_dim=head_dim, vocab_size=300, hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=n_kv,
                                   max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    return transformers.LlamaForCausalLM(cfg)


REFERENCES = {
    "gpt2": hf_gpt2,
    "llama-gqa": lambda: hf_llama(n_kv=2),
    "llama-mha-tied": lambda: hf_llama(tie=True, n_kv=4),
    "llama-bias": lambda: hf_llama(bias=True, n_kv=1),
    "llama-wide-heads": lambda: hf_llama(n_kv=2, head_dim=32),  # n_head * head_dim != hidden
}


@pytest.fixture(params=list(REFERENCES))
def pair(request, tmp_path):
    torch.manual_seed(0)
    ref = REFERENCES[request.param]().eval()
    with torch.no_grad():  # HF inits biases and norms to constants: randomize so they are tested
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path / "hf")
    return ref, load_hf(tmp_path / "hf")


def test_logits_match_hf(pair):
    ref, ours = pair
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_kv_cache_decoding_matches_hf(pair):
    ref, ours = pair
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        expected = ref(ids).logits
        cache = KVCache(ours.config, slots=1, max_len=64)
        steps = [ours(ids[:, :10], cache, torch.arange(10)[None])]  # prefill, then one token at a time
        steps += [ours(ids[:, t:t + 1], cache, torch.tensor([[t]])) for t in range(10, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)


def test_export_loads_in_hf_with_same_logits(pair, tmp_path):
    ref, ours = pair
    save_hf(ours, tmp_path / "exported")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_grouped_query_attention_matches_repeated_heads():
    """GQA via SDPA's enable_gqa equals plain multi-head attention with KV heads repeated."""
    torch.manual_seed(0)
    gqa = Decoder(ModelConfig(vocab_size=100, block_size=32, n_layer=1, n_head=4, n_kv_heads=2, n_embd=32,
                              norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)).eval()
    mha = Decoder(ModelConfig(**{**gqa.config.to_dict(), "n_kv_heads": 4})).eval()
    sd = gqa.state_dict()
    for proj in ("k_proj", "v_proj"):
        w = sd[f"blocks.0.attn.{proj}.weight"].view(2, 8, 32)
        sd[f"blocks.0.attn.{proj}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,published", [("gpt2", 124_439_808), ("smollm2-135m", 134_515_008)])
def test_preset_parameter_counts_are_the_published_ones(name, published):
    with torch.device("meta"):
        model = Decoder(preset(name))
    assert model.num_params() == published == preset(name).num_params()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_counts_its_parameters(name):
    from memlm.memory.estimate import param_shapes
    from memlm.model.build import empty_model

    model = empty_model(preset(name))
    counted = sum(p.numel() for p in model.parameters())
    assert counted == sum(math.prod(s.shape) for s in param_shapes(model.config))
    if model.config.kind == "decoder":
        assert counted == model.num_params() == model.config.num_params()


def test_sinusoidal_positions_run_with_cache():
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16,
                                positions="sinusoidal")).eval()
    ids = torch.randint(0, 50, (1, 12))
    full = model(ids)
    cache = KVCache(model.config, 1, 32)
    stepwise = torch.cat([model(ids[:, :5], cache, torch.arange(5)[None]),
                          model(ids[:, 5:12], cache, torch.arange(5, 12)[None])], dim=1)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=0)
