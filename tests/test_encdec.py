"""The encoder-decoder: logits against Hugging Face BART built from a small local config (its
weights imported through memlm.interop.bart), cached against uncached decoding, every flavour."""

from __future__ import annotations

import pytest
import torch

from memlm.config import ModelConfig
from memlm.infer.engine import as_engine
from memlm.interop.bart import config_from_bart, state_dict_from_bart
from memlm.memory.estimate import param_shapes
from memlm.model import build_model
from memlm.model.encdec import Seq2SeqBatch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE = torch.tensor([[5, 17, 23, 42, 8, 9, 31, 77, 12, 3], [6, 44, 21, 90, 13, 3, 0, 0, 0, 0]])
LENGTHS = torch.tensor([10, 6])
TARGET_IN = torch.tensor([[2, 11, 19, 33, 7, 64, 25], [2, 50, 14, 3, 88, 47, 29]])


@pytest.fixture(scope="module")
def bart():
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
        pad_token_id=0, bos_token_id=1, eos_token_id=3, decoder_start_token_id=2, scale_embedding=False)
    model = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():  # random norms too: a norm at its (1, 0) init would hide a swapped pair
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.1)
    return model


def memlm_from(bart) -> torch.nn.Module:
    config = config_from_bart(bart.config.to_dict())
    model = build_model(config).eval()
    model.load_state_dict(state_dict_from_bart(bart.state_dict()), strict=True)
    return model


def test_bart_logits_match(bart):
    ours = memlm_from(bart)
    assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == [(s.name, s.shape) for s in param_shapes(ours.config)]
    mask = (torch.arange(SOURCE.shape[1])[None] < LENGTHS[:, None]).long()
    with torch.no_grad():
        theirs = bart(input_ids=SOURCE, attention_mask=mask, decoder_input_ids=TARGET_IN).logits
        mine = ours(Seq2SeqBatch(SOURCE, LENGTHS, TARGET_IN))
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_bart_greedy_generation_matches_transformers(bart):
    ours = memlm_from(bart)
    n = 12
    with torch.no_grad():
        theirs = bart.generate(SOURCE[:1], attention_mask=torch.ones(1, 10, dtype=torch.long), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, num_beams=1, forced_bos_token_id=None,
                               forced_eos_token_id=None, no_repeat_ngram_size=0, eos_token_id=None)
    engine = as_engine(ours)
    state = engine.cache(1, 10 + n)
    logits = engine.prefill(SOURCE[:1], LENGTHS[:1], state)
    ids = []
    for _ in range(n):
        ids.append(int(logits.argmax(-1)))
        logits = engine.decode(torch.tensor(ids[-1:]), None, state)
    assert theirs[0, 1:].tolist() == ids  # theirs starts with the decoder start token


FLAVOURS = {
    "bart": dict(norm="layernorm", positions="learned", mlp="gelu", bias=True, norm_placement="post"),
    "pre-rope-gqa-untied": dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, n_kv_heads=2,
                                tied_embeddings=False),
    "pre-sinusoidal": dict(norm="layernorm", positions="sinusoidal", mlp="gelu"),
}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_cached_decoding_equals_the_uncached_forward(flavour):
    torch.manual_seed(1)
    config = ModelConfig(kind="encdec", vocab_size=99, block_size=32, n_layer=2, n_encoder_layer=3, n_head=4,
                         n_embd=32, ffn_hidden=48, start_id=2, **FLAVOURS[flavour])
    model = build_model(config).eval()
    engine = as_engine(model)
    state = engine.cache(2, 16)
    steps = [engine.prefill(SOURCE, LENGTHS, state)]
    for t in range(1, TARGET_IN.shape[1]):
        steps.append(engine.decode(TARGET_IN[:, t], None, state))
    with torch.no_grad():
        full = model(Seq2SeqBatch(SOURCE, LENGTHS, TARGET_IN))
        # the padded source row is encoded as it is alone
        alone = model(Seq2SeqBatch(SOURCE[1:, :6], LENGTHS[1:], TARGET_IN[1:]))
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[1:], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- the seq2seq task

def test_the_embedded_task_is_code_to_its_docstring_summary():
    from memlm.pairs import code_summary_pairs, copy_the_name

    task = code_summary_pairs()
    train, evals = task["train"], task["eval"]
    assert len(train) > 2000 and 0.07 < len(evals) / (len(train) + len(evals)) < 0.13
    source, target = next((s, t) for s, t in train if s.startswith("def get_close_matches("))
    assert target == "Use SequenceMatcher to return list of the best \"good enough\" matches."
    assert '"""' not in source and "cutoff" in source and copy_the_name(source) == "get close matches"
    assert code_summary_pairs() is task and not set(train) & set(evals)


def test_token_f1_and_exact_match():
    from memlm.pairs import exact_match, token_f1

    assert token_f1("Return the list", "return the sorted list") == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert token_f1("a b", "c d") == 0.0 and token_f1("", "") == 1.0
    assert exact_match("Close the file.", "close the  file") and not exact_match("close", "close it")


def test_a_seq2seq_file_without_a_target_is_refused(tmp_path):
    from memlm.errors import MemlmError
    from memlm.pairs import read_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"source": "a", "target": "b"}\n{"source": "c", "summary": "d"}\n')
    with pytest.raises(MemlmError, match="line 2: no string 'target' field") as e:
        read_pairs(str(path))
    assert '{"source": "...", "target": "..."}' in e.value.hint


def test_encdec_trains_on_the_embedded_task_resumes_exactly_and_answers(tmp_path, tokenizer_dir):
    import json

    from memlm import load
    from memlm.config import TrainConfig
    from memlm.errors import MemlmError
    from memlm.eval.seq2seq import evaluate_pairs
    from memlm.infer.generate import generate_batch
    from memlm.infer.sampling import SamplingSettings
    from memlm.pairs import read_pairs
    from memlm.train import train

    model = ModelConfig(kind="encdec", vocab_size=320, block_size=48, n_layer=2, n_encoder_layer=2, n_head=4,
                        n_embd=32, ffn_hidden=64, norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)

    def cfg(out, **changes):
        base = dict(out_dir=str(out), task="seq2seq", tokenizer=str(tokenizer_dir), steps=8, micro_batch=4,
                    seq_len=48, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2, save_every=4, log_every=1,
                    device="cpu", threads=1, activation_checkpointing=1, loss_chunk=16)
        return TrainConfig(**{**base, **changes})

    whole = train(cfg(tmp_path / "a"), model)
    train(cfg(tmp_path / "b"), model, stop_after=4)
    train(cfg(tmp_path / "b", tokenizer=None), model, resume=True)
    losses = [[json.loads(line).get("loss") for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("a", "b")]
    assert losses[0] == losses[1]
    assert whole.eval_losses[-1][1] < whole.eval_losses[0][1]

    lm = load(tmp_path / "b")
    assert lm.config.kind == "encdec" and lm.config.start_id == lm.tokenizer.eos_id
    source = read_pairs("default", "eval")[0][0]
    text = lm.generate(source, max_new_tokens=8, temperature=0)
    ids = generate_batch(lm.model, [lm.tokenizer.encode(source)[:48]], SamplingSettings(max_new_tokens=8, temperature=0),
                         lm.tokenizer.eos_id)[0]
    assert text == lm.tokenizer.decode(ids)
    result = evaluate_pairs(lm.model, lm.tokenizer, read_pairs("default", "eval")[:8], max_new_tokens=8)
    assert result.pairs == 8 and 0 <= result.f1 <= 1 and result.loss == pytest.approx(result.loss)
    assert 0 < result.baseline_f1 < 1 and len(result.examples) == 3
    with pytest.raises(MemlmError, match="cannot train on the lm task"):
        train(cfg(tmp_path / "c", task="lm"), model)
