"""Corpora, the token cache and deterministic batches."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import tokenizers
import torch

from memlm import data
from memlm.data import (
    Batches,
    TokenFile,
    corpus_sha256,
    default_corpus_text,
    default_split,
    eval_batches,
    read_corpus,
    source_fingerprint,
    token_dtype,
    tokenize_corpus,
)
from memlm.errors import MemlmError
from memlm.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe([default_split()[0][:60_000]], vocab_size=400)


# ------------------------------------------------------------------------- default corpus


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="pydoc topics differ between Python versions")
def test_default_corpus_is_the_benchmark_corpus():
    s = default_corpus_text()
    assert len(s) == 465126
    assert corpus_sha256(s) == "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"


def test_default_split_is_80_20():
    s = default_corpus_text()
    train, evals = default_split()
    assert train + evals == s
    assert len(train) == int(len(s) * 0.8)
    assert read_corpus("default") == [s]
    assert read_corpus("default", "train") == [train]
    assert read_corpus("default", "eval") == [evals]
    assert source_fingerprint("default") == corpus_sha256(s)


# ------------------------------------------------------------------------------ reading


def test_read_file_folder_glob_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha doc", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("beta doc", encoding="utf-8")
    (tmp_path / "sub" / "c.jsonl").write_text(
        json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta", "id": 4}) + "\n", encoding="utf-8"
    )
    (tmp_path / "ignored.csv").write_text("not, a, corpus", encoding="utf-8")

    assert read_corpus(str(tmp_path / "a.txt")) == ["alpha doc"]
    # A folder: every .txt/.md/.jsonl below it, sorted by path; .jsonl gives one doc per line.
    assert read_corpus(str(tmp_path)) == ["alpha doc", "beta doc", "gamma", "delta"]
    assert read_corpus(str(tmp_path / "**" / "*.md")) == ["beta doc"]
    assert read_corpus(str(tmp_path / "sub" / "*")) == ["beta doc", "gamma", "delta"]


def test_user_split_is_90_10_and_keeps_documents(tmp_path):
    docs = ["a" * 50, "b" * 30, "c" * 20]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d, encoding="utf-8")
    joined = "\n\n".join(docs)
    cut = int(len(joined) * 0.9)
    train = read_corpus(str(tmp_path), "train")
    evals = read_corpus(str(tmp_path), "eval")
    assert "\n\n".join(train) == joined[:cut]
    assert "".join(evals) == joined[cut:]
    assert train[:2] == docs[:2]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(MemlmError, match=r"bad\.jsonl line 2"):
        read_corpus(str(f))
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(MemlmError, match="line 2"):
        read_corpus(str(f))


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café".encode("latin-1"))
    with pytest.raises(MemlmError, match="latin1.txt is not UTF-8"):
        read_corpus(str(f))


def test_empty_and_missing_corpora(tmp_path):
    with pytest.raises(MemlmError, match="not found"):
        read_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(MemlmError, match="matched no files"):
        read_corpus(str(tmp_path / "*.txt"))
    with pytest.raises(MemlmError, match="empty"):
        read_corpus(str(tmp_path))  # folder without text files
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(MemlmError, match="is empty"):
        read_corpus(str(tmp_path))
    with pytest.raises(MemlmError, match="unknown split"):
        read_corpus("default", "test")


# --------------------------------------------------------------------------- token cache


def test_tokenize_default_and_reuse(tok, tmp_path, monkeypatch):
    tf = tokenize_corpus("default", tok, "eval", cache_dir=tmp_path)
    assert tf.dtype == "uint16" and tf.path.is_file()
    ids = tf.tokens()
    assert isinstance(ids, np.memmap) and not ids.flags.writeable
    assert len(ids) == tf.num_tokens
    evals = default_split()[1]
    assert ids[-1] == tok.eos_id  # each document ends with EOS
    assert tok.decode(ids[:-1]) == evals
    meta = json.loads(tf.path.with_suffix(".json").read_text())
    assert meta["num_tokens"] == tf.num_tokens and meta["split"] == "eval"
    assert meta["tokenizer_fingerprint"] == tok.fingerprint()

    # Second call: no reading, no encoding, the file is not rewritten.
    mtime = tf.path.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(data, "read_corpus", lambda *a, **k: calls.append(a) or [])
    again = tokenize_corpus("default", tok, "eval", cache_dir=tmp_path)
    assert calls == [] and again.path == tf.path and again.path.stat().st_mtime_ns == mtime
    assert np.array_equal(again.tokens(), ids)
    assert TokenFile.open(tf.path.with_suffix(".json")).num_tokens == tf.num_tokens
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_invalidated_by_tokenizer_and_source(tok, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world " * 20, encoding="utf-8")
    (corpus / "b.txt").write_text("second document", encoding="utf-8")
    cache = tmp_path / "cache"
    first = tokenize_corpus(str(corpus), tok, None, cache_dir=cache)
    assert first.meta["num_documents"] == 2
    assert list(first.tokens()).count(tok.eos_id) == 2

    other = train_bpe(["hello world, a different tokenizer"], vocab_size=300)
    second = tokenize_corpus(str(corpus), other, None, cache_dir=cache)
    assert second.path != first.path and second.num_tokens != first.num_tokens

    # Editing a file changes its size/mtime, so the source fingerprint and the cache key change.
    (corpus / "b.txt").write_text("second document, now longer", encoding="utf-8")
    third = tokenize_corpus(str(corpus), tok, None, cache_dir=cache)
    assert third.path != first.path
    assert tok.decode(third.tokens()).endswith("now longer" + "<|endoftext|>")


def test_truncated_cache_is_rebuilt(tok, tmp_path):
    tf = tokenize_corpus("default", tok, "eval", cache_dir=tmp_path)
    with open(tf.path, "r+b") as f:  # simulate a damaged file
        f.truncate(10)
    again = tokenize_corpus("default", tok, "eval", cache_dir=tmp_path)
    assert again.path.stat().st_size == tf.num_tokens * 2


def test_dtype_choice(tmp_path):
    assert token_dtype(256) == "uint16"
    assert token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"
    # A real tokenizer over 65536 ids (a word-level vocab is cheap to build that big).
    vocab = {f"w{i}": i for i in range(70_000)}
    big = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    big.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    t = Tokenizer(big, eos_id=69_999)
    (tmp_path / "c.txt").write_text("w1 w65536 w69998", encoding="utf-8")
    tf = tokenize_corpus(str(tmp_path / "c.txt"), t, None, cache_dir=tmp_path / "cache")
    assert tf.dtype == "uint32"
    assert list(tf.tokens()) == [1, 65536, 69998, 69999]


# ------------------------------------------------------------------------------ batches


def test_batches_deterministic_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    b = Batches(tokens, batch_size=8, seq_len=16, seed=3)
    x, y = b.get(5)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # tokens are consecutive integers here
    x2, y2 = Batches(tokens, batch_size=8, seq_len=16, seed=3).get(5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(b.get(6)[0], x)
    assert not torch.equal(Batches(tokens, 8, 16, seed=4).get(5)[0], x)


def test_batches_ranks_partition_global_batch():
    tokens = np.random.default_rng(0).integers(0, 500, size=2000).astype(np.uint16)
    b = Batches(tokens, batch_size=12, seq_len=10, seed=0)
    gx, gy = b.get(7)
    for world in (2, 3, 4):
        parts = [b.get(7, rank=r, world_size=world) for r in range(world)]
        assert all(p[0].shape == (12 // world, 10) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), gx)
        assert torch.equal(torch.cat([p[1] for p in parts]), gy)
    with pytest.raises(MemlmError, match="not divisible"):
        b.get(0, rank=0, world_size=5)


def test_batches_stay_in_range_and_seq_len_override():
    tokens = np.arange(21, dtype=np.uint16)  # exactly one window of 20 fits
    b = Batches(tokens, batch_size=4, seq_len=20, seed=1)
    x, y = b.get(0)
    assert torch.equal(x[0], torch.arange(20)) and torch.equal(y[0], torch.arange(1, 21))
    for step in range(50):
        x, y = b.get(step, seq_len=5)
        assert x.shape == (4, 5) and int(y.max()) <= 20
    with pytest.raises(MemlmError, match="corpus too small for seq_len 21"):
        b.get(0, seq_len=21)
    with pytest.raises(MemlmError, match="corpus too small"):
        Batches(tokens, batch_size=4, seq_len=64, seed=0)


def test_eval_batches_even_and_deterministic():
    tokens = np.arange(1001, dtype=np.uint32)
    batches = list(eval_batches(tokens, batch_size=4, seq_len=100, n_batches=3))
    assert len(batches) == 3
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts[0] == 0 and starts[-1] == 1001 - 100 - 1
    assert torch.all(starts[1:] > starts[:-1])
    for x, y in batches:
        assert torch.equal(y[:, :-1], x[:, 1:])
    again = list(eval_batches(tokens, batch_size=4, seq_len=100, n_batches=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_batches_on_token_file(tok, tmp_path):
    tf = tokenize_corpus("default", tok, "eval", cache_dir=tmp_path)
    x, y = Batches(tf.tokens(), batch_size=4, seq_len=32, seed=0).get(0)
    assert x.shape == (4, 32) and int(x.max()) < tok.vocab_size
    assert os.path.getsize(tf.path) == tf.num_tokens * 2
