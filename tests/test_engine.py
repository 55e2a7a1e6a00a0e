"""The inference engine: per-row positions and cache slots against each sequence run alone with no
cache; fused projections against the unfused model in every format; the compiled decode step
against the eager one."""

import pytest
import torch

from memlm import kernels
from memlm.config import ModelConfig, cache_length
from memlm.infer.engine import (FLOAT_KERNEL_ROWS, Engine, FloatLinear, decode_and_prefill, decode_step,
                                float_linears, fuse_projections, prefill)
from memlm.infer.generate import generate_batch, generate_ids
from memlm.infer.sampling import SamplingSettings
from memlm.model import Decoder, KVCache
from memlm.model.kv_cache import CacheWindow

FLAVOURS = {
    "llama-gqa-rope": dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_heads=2, bias=False),
    "gpt2-learned": dict(norm="layernorm", positions="learned", mlp="gelu", n_kv_heads=4, bias=True),
    "sinusoidal": dict(norm="layernorm", positions="sinusoidal", mlp="gelu", n_kv_heads=4, bias=True),
}
PROMPTS = [[5, 17, 99], [200, 3, 3, 41, 7, 120, 64, 9, 250], [11, 12, 13, 14, 15]]

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"memlm kernels unavailable: {kernels._failure}")


def flavour_model(name: str, n_embd: int = 32) -> Decoder:
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=259, block_size=64, n_layer=2, n_head=4, n_embd=n_embd, **FLAVOURS[name])
    return Decoder(cfg).eval()


def alone_logits(model: Decoder, ids: list[int]) -> torch.Tensor:
    """Next-token logits after `ids`, by a full forward with no cache: the reference."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_right_padded_prefill_equals_each_prompt_alone(flavour):
    model = flavour_model(flavour)
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([p + [7] * (longest - len(p)) for p in PROMPTS])
    cache = KVCache(model.config, slots=3, max_len=32)
    for chunk in (256, 2):  # one forward, and chunks that end inside some prompts
        logits = prefill(model, ids, torch.tensor([len(p) for p in PROMPTS]), cache, chunk=chunk)
        for row, p in enumerate(PROMPTS):
            torch.testing.assert_close(logits[row], alone_logits(model, p), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_decode_in_slots_of_a_shared_pool_equals_each_sequence_alone(flavour):
    """Sequences of different lengths in chosen slots of one pool, one decode step for all of
    them at their own positions; then a shorter sequence reuses a slot that held a longer one."""
    model = flavour_model(flavour)
    pool = KVCache(model.config, slots=4, max_len=40)
    slots = torch.tensor([3, 0, 1])
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in PROMPTS])
    lengths = torch.tensor([len(p) for p in PROMPTS])
    prefill(model, ids, lengths, pool, slots)
    seqs = [list(p) for p in PROMPTS]
    tokens, positions = torch.tensor([4, 8, 15]), lengths.clone()
    for _ in range(3):
        logits = decode_step(model, tokens, positions, pool, slots)
        for row in range(3):
            seqs[row].append(int(tokens[row]))
            torch.testing.assert_close(logits[row], alone_logits(model, seqs[row]), atol=1e-5, rtol=1e-5)
        tokens, positions = logits.argmax(-1), positions + 1
    # Slot 0 held 12+ tokens; a 2-token sequence there must not see any of them.
    short = [9, 9]
    first = prefill(model, torch.tensor([short]), torch.tensor([2]), pool, torch.tensor([0]))
    torch.testing.assert_close(first[0], alone_logits(model, short), atol=1e-5, rtol=1e-5)
    nxt = decode_step(model, torch.tensor([3]), torch.tensor([2]), pool, torch.tensor([0]))
    torch.testing.assert_close(nxt[0], alone_logits(model, short + [3]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("engine", ["bare", "fused and packed"])
def test_a_mixed_batch_computes_each_sequence_as_alone(flavour, engine):
    """One forward for a decode step of the pool's first slots (one of them parked: a half
    prefilled prompt fed a dummy token where its next piece goes) and the next pieces of two
    prompts, one in that parked slot: every row's logits are its sequence's alone, and the cache
    then continues each sequence as alone."""
    model = flavour_model(flavour)
    if engine != "bare":
        model = Engine(model, fuse=True).model
    pool = KVCache(model.config, slots=4, max_len=40)
    running, prompt, late = PROMPTS[0] + [42], PROMPTS[1], [31, 32, 33, 34]
    prefill(model, torch.tensor([running]), torch.tensor([len(running)]), pool, torch.tensor([0]))
    prefill(model, torch.tensor([prompt[:4]]), torch.tensor([4]), pool, torch.tensor([1]))  # half in
    # Decode rows: slot 0 (running), slot 1 parked at position 4; pieces: slot 1 from 4, slot 3 from 0.
    rest = prompt[4:]
    ids = torch.tensor([rest, late + [late[0]] * (len(rest) - len(late))])
    window = CacheWindow(pool, 2, 40)
    stepped, last = decode_and_prefill(model, torch.tensor([8, 0]), torch.tensor([len(running), 4]), window, ids,
                                       torch.tensor([len(rest), len(late)]), pool, torch.tensor([1, 3]),
                                       torch.tensor([4, 0]))
    torch.testing.assert_close(stepped[0], alone_logits(model, running + [8]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last[0], alone_logits(model, prompt), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last[1], alone_logits(model, late), atol=1e-5, rtol=1e-5)
    nxt = decode_step(model, torch.tensor([5, 6, 7]), torch.tensor([len(running) + 1, len(prompt), len(late)]), pool,
                      torch.tensor([0, 1, 3]))
    for row, seq in enumerate([running + [8, 5], prompt + [6], late + [7]]):
        torch.testing.assert_close(nxt[row], alone_logits(model, seq), atol=1e-5, rtol=1e-5)


def _quantized(model: Decoder, fmt: str) -> Decoder:
    from memlm.compress.quantize import quantize_model

    if fmt in ("int8", "int4"):
        # One compute path for every layer: torch's int4 kernel takes only out % 64 == 0 layers
        # (in bf16), so fusing would move some outputs from one path to the other.
        quantize_model(model, fmt, group_size=32, progress=False, use_kernel=False)
    elif fmt.endswith("-kernel"):  # memlm's kernels: every output row sees the same int8 activations
        quantize_model(model, fmt.split("-")[0], group_size=32, progress=False)
    return model


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4", "int8-kernel", "int4-kernel"])
@pytest.mark.parametrize("flavour", ["llama-gqa-rope", "gpt2-learned"])
def test_fused_projections_compute_what_the_separate_ones_did(flavour, fmt):
    model = _quantized(flavour_model(flavour, n_embd=64), fmt)
    x = torch.tensor([PROMPTS[1][:1]]) if fmt.endswith("-kernel") else torch.tensor([PROMPTS[1]])  # decode: 1 row
    with torch.no_grad():
        before = model(x)
        fuse_projections(model)
        after = model(x)
    assert all(b.attn.qkv_proj is not None and not hasattr(b.attn, "q_proj") for b in model.blocks)
    if model.config.mlp == "swiglu":
        assert all(b.mlp.gate_up_proj is not None for b in model.blocks)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("flavour", ["llama-gqa-rope", "gpt2-learned"])
def test_float_linears_compute_what_the_float_ones_did(flavour):
    model = flavour_model(flavour, n_embd=64)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied
    model.blocks[1].mlp = _quantized(flavour_model(flavour, n_embd=64), "int8").blocks[0].mlp  # stays as it is
    # A decode row, a prompt, and 72 rows: past FLOAT_KERNEL_ROWS, torch's matmul.
    inputs = [torch.tensor([PROMPTS[1][:1]]), torch.tensor([PROMPTS[1]]), torch.tensor([PROMPTS[1]] * 8)]
    assert inputs[-1].numel() > FLOAT_KERNEL_ROWS >= inputs[1].numel()
    with torch.no_grad():
        before = [model(x) for x in inputs]
        float_linears(fuse_projections(model))
        after = [model(x) for x in inputs]
    assert isinstance(model.blocks[0].attn.qkv_proj, FloatLinear) and isinstance(model.lm_head, FloatLinear)
    assert not any(isinstance(m, FloatLinear) for m in model.blocks[1].mlp.modules())
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    tied = flavour_model(flavour, n_embd=64)
    with torch.no_grad():
        before = [tied(x) for x in inputs]
        float_linears(tied)
        after = [tied(x) for x in inputs]
    # The tied head reads the embedding's own weight: no copy, the same logits.
    assert isinstance(tied.lm_head, FloatLinear) and tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_engine_greedy_ids_equal_the_bare_model_and_reuse_the_pool():
    model = flavour_model("llama-gqa-rope")
    greedy = SamplingSettings(max_new_tokens=10, temperature=0)
    expected = [list(generate_ids(model, p, greedy)) for p in PROMPTS]
    engine = Engine(flavour_model("llama-gqa-rope"), fuse=True)
    assert [list(generate_ids(engine, p, greedy)) for p in PROMPTS] == expected
    assert generate_batch(engine, PROMPTS, greedy) == expected
    pool = engine.cache(1, 20)
    assert engine.cache(1, 30) is pool and pool.max_len == cache_length(20, 64)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_compiled_decode_step_equals_eager(flavour, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # A Llama block would decode through the fused op instead (tests/test_decode_block.py); the
    # compiled step is what runs where the op does not (other flavours, bf16, the op switched off).
    monkeypatch.setenv("MEMLM_DECODE_BLOCK", "0")
    eager = Engine(flavour_model(flavour), fuse=True)
    compiled = Engine(flavour_model(flavour), fuse=True, compile=True)
    assert compiled.compiled
    for engine in (eager, compiled):
        cache = engine.cache(2, 24)
        ids = torch.tensor([PROMPTS[0] + [0, 0], PROMPTS[2]])
        lengths = torch.tensor([3, 5])
        logits = engine.prefill(ids, lengths, cache)
        steps = []
        tokens, positions = logits.argmax(-1), lengths.clone()
        for _ in range(4):
            logits = engine.decode(tokens, positions, cache)
            steps.append(logits)
            tokens, positions = logits.argmax(-1), positions + 1
        engine.steps = steps
    assert compiled.compiled and compiled.compile_seconds > 0  # it did compile, and did not fall back
    for a, b in zip(compiled.steps, eager.steps):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
