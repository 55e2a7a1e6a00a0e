"""Text cleaning (memlm.cleaning): properties over any text (hypothesis), the counts it reports,
the embedded corpus left as it is by the defaults, and the token cache keyed by the options."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from memlm.cleaning import CleanOptions, clean_documents, clean_text
from memlm.data import default_corpus_text, default_split, read_corpus, tokenize_corpus
from memlm.tokenizer import Tokenizer

EVERY = [CleanOptions(), CleanOptions(unicode="NFKC", lowercase=True, whitespace=True, dedup="near"),
         CleanOptions(control=False, unicode="none", whitespace=True, dedup="exact", dedup_unit="line"),
         CleanOptions(unicode="NFKC", dedup="near", dedup_unit="line")]
# Characters that make cleaning work: controls, CR, combining marks, compatibility forms,
# full-width and special-cased letters, every kind of space.
TRICKY = st.sampled_from(list("\x00\x07\r\t\n \u00a0\u2003\u200b\ufeff\u0301\u0344e\u00e9\ufb01\uff21\u2126\u0130\u212bAz"))
TEXT = st.text(st.one_of(TRICKY, st.characters()), max_size=60)
DOCS = st.lists(st.one_of(TEXT, st.sampled_from(["same words in a row here", "same words in a row here!"])), max_size=6)


@settings(max_examples=150, deadline=None)
@given(DOCS)
def test_cleaning_is_idempotent(docs):
    for options in EVERY:
        once, _ = clean_documents(docs, options)
        twice, report = clean_documents(once, options)
        assert twice == once, options
        assert report.chars_in == report.chars_out


@settings(max_examples=150, deadline=None)
@given(DOCS)
def test_removal_never_grows_the_text(docs):
    # NFKC and lower-casing may lengthen a text ("\ufb01" -> "fi"); every removal only shortens it
    for options in (CleanOptions(unicode="none"), CleanOptions(unicode="none", whitespace=True, dedup="near"),
                    CleanOptions(unicode="none", dedup_unit="line")):
        out, report = clean_documents(docs, options)
        assert sum(map(len, out)) <= sum(map(len, docs)) and report.chars_out <= report.chars_in


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(st.sampled_from("abcdefgh 0123.,\n"), max_size=40), max_size=5, unique=True))
def test_already_clean_text_comes_back_unchanged(docs):
    docs = [d for d in docs if d]
    out, report = clean_documents(docs, CleanOptions())
    assert out == docs
    assert report.control_chars_removed == report.documents_normalized == report.exact_duplicates == 0


def test_what_each_option_does_and_the_counts():
    text = "Caf\u0065\u0301\r\n\x07  \ufb01ve\t\tspaces  \n\n\n\nEnd"
    report_text = clean_text(text, CleanOptions())
    assert report_text == "Caf\u00e9\n  \ufb01ve\t\tspaces  \n\n\n\nEnd"  # NFC composes; CR and BEL go
    out, report = clean_documents([text, text, "other"], CleanOptions(unicode="NFKC", lowercase=True, whitespace=True))
    assert out == ["caf\u00e9\n five spaces\n\nend", "other"]
    assert (report.control_chars_removed, report.documents_normalized, report.documents_lowercased,
            report.exact_duplicates) == (4, 2, 2, 1)
    assert "exact duplicates 1" in report.summary()
    assert unicodedata.is_normalized("NFKC", out[0])


def test_near_duplicates_go_exact_ones_too_lines_as_asked():
    a = "the quick brown fox jumps over the lazy dog near the quiet river bank today"
    b = a.replace("today", "now")  # 12 of 13 shingles shared
    c = "a completely different sentence about tokenizers and memory budgets"
    assert clean_documents([a, b, c], CleanOptions(dedup="exact"))[0] == [a, b, c]
    out, report = clean_documents([a, b, c], CleanOptions(dedup="near"))
    assert out == [a, c] and report.near_duplicates == 1
    lines, report = clean_documents(["x = 1\n\ny = 2", "x = 1\n\nz = 3"], CleanOptions(dedup_unit="line"))
    assert lines == ["x = 1\n\ny = 2", "\nz = 3"] and report.exact_duplicates == 1


def test_the_default_cleaning_leaves_the_embedded_corpus_and_its_split_as_they_are():
    train, evals = default_split()
    assert read_corpus("default", "train", CleanOptions()) == [train]
    assert read_corpus("default", "eval", CleanOptions()) == [evals]
    assert read_corpus("default", None, CleanOptions()) == [default_corpus_text()]


def test_a_change_of_options_retokenizes(tmp_path, tokenizer_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "Hello  World"}\n{"text": "Hello  World"}\n{"text": "another   line here"}\n')
    tok = Tokenizer.load(tokenizer_dir)
    cache = tmp_path / "cache"
    plain = tokenize_corpus(str(corpus), tok, None, cache, CleanOptions())
    again = tokenize_corpus(str(corpus), tok, None, cache, CleanOptions())
    squeezed = tokenize_corpus(str(corpus), tok, None, cache, CleanOptions(whitespace=True, lowercase=True))
    assert again.path == plain.path and squeezed.path != plain.path
    assert plain.meta["cleaning_report"]["exact_duplicates"] == 1 and plain.meta["num_documents"] == 2
    eos = [tok.eos_id] if tok.eos_id is not None else []
    expected = [i for d in ("hello world", "another line here") for i in tok.encode(d) + eos]
    assert squeezed.tokens().tolist() == expected
