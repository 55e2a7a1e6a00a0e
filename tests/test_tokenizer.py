"""Tokenizer: exact byte-level round trip, save/load, chat templates, unigram baseline."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memlm.data import default_split
from memlm.errors import MemlmError
from memlm.tokenizer import Tokenizer, train_bpe, unigram_baseline_nll

VOCAB = 800


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    train, _ = default_split()
    return train_bpe([train[:150_000]], vocab_size=VOCAB)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_is_exact_for_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " leading space",
        "  two\n\nnewlines\r\n\ttab ",
        "emoji 🙂👍🏽 and CJK 漢字かな한국어",
        "control \x00\x01\x7f\x1b[0m chars",
        "def f(x):\n    return x ** 2\n",
        "<|endoftext|> literal special",
    ],
)
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_vocab_size_and_eos(tok):
    assert tok.vocab_size == VOCAB
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_id is None and tok.add_bos is False
    # A literal special token in the text becomes its id (the tokenizers default).
    assert tok.eos_id in tok.encode("a<|endoftext|>b")


def test_tokens_compress_text(tok):
    _, evals = default_split()
    sample = evals[:5000]
    assert len(tok.encode(sample)) < len(sample.encode()) / 2


def test_vocab_too_small_is_an_error():
    with pytest.raises(MemlmError, match="too small"):
        train_bpe(["hello world"], vocab_size=100)


def test_encode_batch_matches_encode(tok):
    texts = ["hello world", "", " spaced  out ", "ünïcödé"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_add_bos():
    base = train_bpe(["hello hello world world"], vocab_size=300, special_tokens=("<s>", "<|endoftext|>"))
    t = Tokenizer(base.backend, bos_id=base.token_to_id("<s>"), eos_id=base.eos_id, add_bos=True)
    ids = t.encode("hello")
    assert ids[0] == t.bos_id and ids[1:] == base.encode("hello")
    assert t.encode("hello", add_bos=False) == base.encode("hello")
    with pytest.raises(MemlmError):
        base.encode("hello", add_bos=True)  # no BOS token to add


def test_save_load_identical(tok, tmp_path):
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    folder = tok.save(tmp_path / "tok")
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    text = "The quick brown fox 🦊 jumps\nover the lazy dog."
    for path in (folder, folder / "tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.fingerprint() == tok.fingerprint()
        assert loaded.config() == tok.config()
    tok.chat_template = None


def test_fingerprint_changes_with_vocab(tok):
    other = train_bpe(["some other text entirely, some other text"], vocab_size=300)
    assert other.fingerprint() != tok.fingerprint()
    assert len(tok.fingerprint()) == 64


def test_load_errors(tmp_path):
    with pytest.raises(MemlmError, match="not found"):
        Tokenizer.load(tmp_path / "missing")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(MemlmError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)


def test_load_bad_sidecar(tok, tmp_path):
    folder = tok.save(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(MemlmError):
        Tokenizer.load(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_id": 10**6}))
    with pytest.raises(MemlmError, match="outside the vocabulary"):
        Tokenizer.load(folder)


CHATML = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template(tok):
    t = Tokenizer(tok.backend, eos_id=tok.eos_id, chat_template=CHATML)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = t.apply_chat_template(msgs)
    assert out == (
        "<|im_start|>system\nBe brief.<|endoftext|>\n"
        "<|im_start|>user\nHi<|endoftext|>\n"
        "<|im_start|>assistant\n"
    )
    assert not t.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")
    with pytest.raises(MemlmError, match="bad role"):
        t.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_chat_template_errors(tok):
    with pytest.raises(MemlmError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = Tokenizer(tok.backend, chat_template="{% for m in messages %}")
    with pytest.raises(MemlmError, match="chat template failed"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    # The sandbox refuses to reach Python internals from a template shipped in a model file.
    sneaky = Tokenizer(tok.backend, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(MemlmError):
        sneaky.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unigram_baseline_hand_computed():
    train = [0, 0, 1, 2, 0]  # counts: 0 -> 3, 1 -> 1, 2 -> 1, 3 -> 0
    evals = [0, 3, 1]
    v = 4
    denom = len(train) + v  # 9
    expected = -(math.log(4 / denom) + math.log(1 / denom) + math.log(2 / denom)) / 3
    assert unigram_baseline_nll(train, evals, v) == pytest.approx(expected, rel=1e-12)


def test_unigram_baseline_errors():
    with pytest.raises(MemlmError):
        unigram_baseline_nll([0, 1], [], 4)
    with pytest.raises(MemlmError):
        unigram_baseline_nll([0, 1], [5], 4)
