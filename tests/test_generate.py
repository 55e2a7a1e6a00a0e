"""Sampling against transformers' logits processors; cached generation against full recompute;
streaming text pieces; perplexity against a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from memlm.config import ModelConfig
from memlm.errors import MemlmError
from memlm.eval.perplexity import perplexity, window_plan
from memlm.infer.generate import generate_ids, generate_text, stream_text
from memlm.infer.sampling import SamplingSettings, apply_repetition_penalty, draw, filter_top_k_top_p, sample_next
from memlm.model import Decoder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=259, block_size=64, n_layer=2, n_head=4, n_kv_heads=2, n_embd=32,
                      norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)
    return Decoder(cfg).eval()


class ByteTokenizer:
    """Bytes as tokens (ids 0..255), EOS 256: enough to test text streaming exactly."""

    eos_id = 256
    vocab_size = 259

    def encode(self, text, add_bos=False):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (10, 0.5), (0, 0.999)])
def test_top_k_top_p_match_transformers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 100) * 3
    ours = filter_top_k_top_p(logits, top_k, top_p)
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 50)
    context = torch.randint(0, 50, (2, 12))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(context, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, context, 1.3), expected)


def test_draw_follows_the_distribution_and_never_picks_a_token_without_mass():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    n = 200_000
    ids = draw(probs.expand(n, -1).contiguous(), torch.Generator().manual_seed(0))
    counts = torch.bincount(ids, minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 5 * sigma + 1e-9).all(), counts / n
    # Rows of any positive total (unnormalized weights), and the last token with mass at the edge.
    assert draw(torch.tensor([[0.0, 3.0, 0.0]] * 50)).eq(1).all()
    assert draw(torch.tensor([[1e-30, 0.0]] * 50)).eq(0).all()
    again = draw(probs.expand(n, -1).contiguous(), torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    with pytest.raises(ValueError, match="not finite"):
        draw(torch.tensor([[float("nan"), 1.0]]))


def test_extreme_sampling_settings_stay_well_defined():
    """A temperature near 0 is greedy in the limit (not NaN probabilities, as logits / 1e-116 gave),
    a huge one near uniform, a tiny top_p keeps the likeliest token (a fuzzed request's settings)."""
    logits = torch.randn(3, 40) * 5
    none = torch.zeros(3, 0, dtype=torch.long)
    for s in (SamplingSettings(temperature=1e-116), SamplingSettings(temperature=1e-30),
              SamplingSettings(temperature=1.0, top_p=8e-129),
              SamplingSettings(temperature=1e-116, top_p=8e-129, repetition_penalty=8.6)):
        assert torch.equal(sample_next(logits, none, s, torch.Generator().manual_seed(1)), logits.argmax(-1))
    # A denormal repetition penalty divides the seen tokens' positive logits into inf (a fuzzed
    # request; it gave NaN probabilities and a 500): the seen likeliest token is drawn.
    seen = logits.argmax(-1, keepdim=True)
    tiny = SamplingSettings(temperature=1.0, repetition_penalty=2.2250738585e-313)
    assert torch.equal(sample_next(logits, seen, tiny, torch.Generator().manual_seed(1)), seen[:, 0])
    hot = sample_next(logits[:1].expand(4000, -1), torch.zeros(4000, 0, dtype=torch.long),
                      SamplingSettings(temperature=3e16), torch.Generator().manual_seed(2))
    assert len(set(hot.tolist())) > 35


def test_sampling_is_seeded_and_greedy_is_argmax():
    logits = torch.randn(1, 40)
    s = SamplingSettings(temperature=1.0, top_k=10)
    a = [int(sample_next(logits, torch.zeros(1, 0, dtype=torch.long), s, torch.Generator().manual_seed(3)))
         for _ in range(3)]
    b = [int(sample_next(logits, torch.zeros(1, 0, dtype=torch.long), s, torch.Generator().manual_seed(3)))
         for _ in range(3)]
    assert a == b
    top10 = set(torch.topk(logits, 10).indices[0].tolist())
    assert set(a) <= top10
    greedy = SamplingSettings(temperature=0)
    assert int(sample_next(logits, torch.zeros(1, 0, dtype=torch.long), greedy)) == int(logits.argmax())


def test_cached_greedy_generation_equals_full_recompute(model):
    prompt = [5, 17, 99, 3, 42]
    got = list(generate_ids(model, prompt, SamplingSettings(max_new_tokens=20, temperature=0, ignore_eos=True), 256))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            logits = model(torch.tensor([ids]))[0, -1]
            logits[256] = float("-inf")
            ids.append(int(logits.argmax()))
    assert got == ids[len(prompt):]


def test_generation_stops_at_eos_and_context(model):
    # Force EOS by a huge bias: generation must end right after it.
    with torch.no_grad():
        model.lm_head.weight[256] += 50.0
    try:
        got = list(generate_ids(model, [1, 2, 3], SamplingSettings(max_new_tokens=10, temperature=0), eos_id=256))
        assert got == [256]
    finally:
        with torch.no_grad():
            model.lm_head.weight[256] -= 50.0
    # max_new_tokens is clipped to what the context has left.
    got = list(generate_ids(model, list(range(60)), SamplingSettings(max_new_tokens=50, temperature=0,
                                                                     ignore_eos=True), 256))
    assert len(got) == 4


def test_prompt_longer_than_context_is_refused(model):
    with pytest.raises(MemlmError, match="context is 64"):
        list(generate_ids(model, list(range(70)), SamplingSettings()))


def test_stream_pieces_are_whole_characters_and_respect_stop_strings(model):
    tok = ByteTokenizer()
    settings = SamplingSettings(max_new_tokens=40, temperature=1.0, seed=1, ignore_eos=True)
    pieces = list(stream_text(model, tok, "héllo", settings))
    assert pieces[-1].finish_reason == "length"
    full = "".join(p.text for p in pieces)
    ids = list(generate_ids(model, tok.encode("héllo"), settings, tok.eos_id))
    assert full == tok.decode(ids)
    # Stop strings: take a piece of the unconstrained text as the stop string.
    target = full.replace("\ufffd", "")
    if len(target) >= 6:
        stop = target[3:6]
        settings.stop = [stop]
        text = generate_text(model, tok, "héllo", settings)
        assert stop not in text and full.startswith(text)


def test_perplexity_matches_direct_computation(model):
    ids = torch.randint(0, 256, (200,))
    res = perplexity(model, ids, window=48, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in range(200 // 48):
            x = ids[w * 48:(w + 1) * 48][None]
            nll += F.cross_entropy(model(x[:, :-1])[0], x[0, 1:], reduction="sum").item()
            n += 47
    assert res.n_scored == n and res.n_windows == 4
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-6)


def test_strided_windows_score_every_token_once():
    plan = window_plan(100, window=40, stride=10)
    scored = set()
    for start, first in plan:
        new = set(range(start + first + 1, start + 40))
        assert not (new & scored)
        scored |= new
    assert scored == set(range(1, plan[-1][0] + 40))
    with pytest.raises(MemlmError):
        window_plan(10, window=40)


def test_bf16_kv_cache_with_fp32_compute(model):
    """A half-size cache for an fp32 model: same greedy tokens as the fp32 cache on this model."""
    prompt = [5, 17, 99, 3, 42]
    s = SamplingSettings(max_new_tokens=8, temperature=0, ignore_eos=True)
    fp32 = list(generate_ids(model, prompt, s, 256))
    bf16 = list(generate_ids(model, prompt, s, 256, cache_dtype=torch.bfloat16))
    assert len(bf16) == 8 and sum(a == b for a, b in zip(fp32, bf16)) >= 6


FLAVOURS = {
    "llama-gqa-rope": dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_heads=2, bias=False),
    "gpt2-learned": dict(norm="layernorm", positions="learned", mlp="gelu", n_kv_heads=4, bias=True),
    "sinusoidal": dict(norm="layernorm", positions="sinusoidal", mlp="gelu", n_kv_heads=4, bias=True),
}


def _flavour_model(name: str) -> Decoder:
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=259, block_size=64, n_layer=2, n_head=4, n_embd=32, **FLAVOURS[name])
    return Decoder(cfg).eval()


PROMPTS = [[5, 17, 99], [200, 3, 3, 41, 7, 120, 64, 9, 250], [11, 12, 13, 14, 15]]


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_batched_generation_equals_one_prompt_at_a_time(flavour):
    from memlm.infer.generate import generate_batch

    model = _flavour_model(flavour)
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    alone = [list(generate_ids(model, p, greedy)) for p in PROMPTS]
    assert generate_batch(model, PROMPTS, greedy) == alone
    # An EOS ends its row only (and is not returned); the other rows go on as they would alone.
    firsts = [j for j, t in enumerate(alone[0]) if t not in alone[0][:j]]
    eos = alone[0][firsts[-1]]  # the latest new token of row 0: it ends that row there
    expected = []
    for p in PROMPTS:
        ids = list(generate_ids(model, p, greedy, eos_id=eos))
        expected.append(ids[:-1] if ids and ids[-1] == eos else ids)
    assert generate_batch(model, PROMPTS, greedy, eos_id=eos) == expected
    assert len(expected[0]) == firsts[-1] < 12


def test_batched_generation_refuses_a_prompt_that_does_not_fit(model):
    from memlm.infer.generate import generate_batch

    with pytest.raises(MemlmError, match="context"):
        generate_batch(model, [[1, 2], list(range(64))], SamplingSettings(max_new_tokens=4))


def test_n_completions_in_a_batch_equal_streamed_text(model):
    from memlm.infer.generate import complete_batch

    tok = ByteTokenizer()
    greedy = SamplingSettings(max_new_tokens=20, temperature=0)
    text = generate_text(model, tok, "ab", greedy)
    assert len(text) >= 6
    for settings in (greedy, SamplingSettings(max_new_tokens=20, temperature=0, stop=[text[3:5]])):
        streamed = list(stream_text(model, tok, "ab", settings))
        expected = ("".join(p.text for p in streamed), streamed[-1].finish_reason)
        assert [(p.text, p.finish_reason) for p in complete_batch(model, tok, ["ab"] * 3, settings)] == [expected] * 3
    # prompts of different lengths: each as it would be alone
    prompts = ["ab", "The with statement", "x"]
    alone = [generate_text(model, tok, p, greedy) for p in prompts]
    assert [p.text for p in complete_batch(model, tok, prompts, greedy)] == alone
