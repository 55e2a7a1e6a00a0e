"""Source -> target pairs for the encoder-decoder: the embedded task, .jsonl files, batches, metrics.

The embedded task ships with every Python: each function of the standard library's top-level
modules that has a docstring, its source with the docstring removed -> the first line of that
docstring (a code-to-summary "translation"). A pair goes to the eval split when the CRC-32 of
"module:function" is 0 mod 10 (fixed across runs and machines; the counts of one Python version
are in docs/models.md). A user's pairs are a .jsonl file of {"source": ..., "target": ...}
objects, split 90/10 by position.

`PairBatches` and `pair_eval_batches` are `memlm.data.Batches` and `eval_batches` for pairs:
the same calls, so the training loop drives either. Each row is (source cut to seq_len; the
start token + the target; the target + EOS, padding ignored by the loss).
"""

from __future__ import annotations

import ast
import json
import re
import sysconfig
import textwrap
import zlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from memlm.cleaning import CleanOptions, clean_text
from memlm.data import DEFAULT_SPEC, USER_TRAIN_FRACTION, _check_split
from memlm.errors import MemlmError
from memlm.model.encdec import Seq2SeqBatch

MAX_SOURCE_CHARS = 1500  # functions longer than this are left out of the embedded task
IGNORE_INDEX = -100  # memlm.train.loss: targets left out of the loss

Pair = tuple[str, str]


@lru_cache(maxsize=1)
def code_summary_pairs() -> dict[str, list[Pair]]:
    """{"train": [...], "eval": [...]} of the embedded task (sorted by module, then position)."""
    out: dict[str, list[Pair]] = {"train": [], "eval": []}
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if path.name.startswith("__"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            pair = _function_pair(node, lines)
            if pair is not None:
                split = "eval" if zlib.crc32(f"{path.stem}:{node.name}".encode()) % 10 == 0 else "train"
                out[split].append(pair)
    return out


def _function_pair(node: ast.AST, lines: list[str]) -> Pair | None:
    """(source without its docstring, first docstring line) of a function worth a pair."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
        return None
    doc = ast.get_docstring(node, clean=True)
    first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
    docstring = node.body[0]
    if not 2 <= len(first.split()) <= 20 or docstring.lineno == node.lineno:
        return None
    source = textwrap.dedent("".join(lines[node.lineno - 1:docstring.lineno - 1] + lines[docstring.end_lineno:node.end_lineno]))
    return (source, first) if len(source) <= MAX_SOURCE_CHARS else None


def read_pairs(spec: str, split: str | None = None, cleaning: CleanOptions | None = None) -> list[Pair]:
    """The pairs of a seq2seq corpus: "default" (the embedded task) or a .jsonl file."""
    _check_split(split)
    if spec == DEFAULT_SPEC:
        task = code_summary_pairs()
        pairs = task["train"] + task["eval"] if split is None else task[split]
    else:
        pairs = _read_jsonl_pairs(Path(spec).expanduser())
        if split is not None:
            cut = int(len(pairs) * USER_TRAIN_FRACTION)
            pairs = pairs[:cut] if split == "train" else pairs[cut:]
    if cleaning is not None:  # character-level cleaning of both sides (duplicates stay: each is a pair)
        pairs = [(clean_text(s, cleaning), clean_text(t, cleaning)) for s, t in pairs]
    pairs = [(s, t) for s, t in pairs if s and t]
    if not pairs:
        raise MemlmError(f"the {split or 'whole'} split of seq2seq corpus {spec} has no pairs",
                         "add more {\"source\": ..., \"target\": ...} lines")
    return pairs


def _read_jsonl_pairs(path: Path) -> list[Pair]:
    if not path.is_file() or path.suffix.lower() != ".jsonl":
        raise MemlmError(f"seq2seq corpus {path} is not a .jsonl file",
                         'give a .jsonl file with one {"source": "...", "target": "..."} object a line, or "default"')
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MemlmError(f"cannot read seq2seq corpus {path}: {e}", "give a UTF-8 .jsonl file") from e
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemlmError(f"{path} line {lineno}: not valid JSON ({e.msg})", "each line must be one JSON object") from e
        for field in ("source", "target"):
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise MemlmError(f"{path} line {lineno}: no string '{field}' field",
                                 'each line of a seq2seq corpus must look like {"source": "...", "target": "..."}')
        pairs.append((obj["source"], obj["target"]))
    return pairs


def tokenize_pairs(pairs: list[Pair], tokenizer) -> list[tuple[list[int], list[int]]]:
    sources = tokenizer.encode_batch([s for s, _ in pairs], add_bos=False)
    targets = tokenizer.encode_batch([t for _, t in pairs], add_bos=False)
    return list(zip(sources, targets))


def pair_rows(ids: list[tuple[list[int], list[int]]], seq_len: int, start_id: int,
              eos_id: int) -> tuple[Seq2SeqBatch, torch.Tensor]:
    """Rows of pairs as the model reads them and the labels: sources cut to seq_len; the decoder
    reads the start token + target, and learns target + EOS (both cut to seq_len)."""
    sources = [s[:seq_len] or [eos_id] for s, _ in ids]
    outs = [(t + [eos_id])[:seq_len] for _, t in ids]
    S, T = max(map(len, sources)), max(map(len, outs))
    src = torch.tensor([s + [s[0]] * (S - len(s)) for s in sources])
    tgt_in = torch.tensor([([start_id] + o[:-1]) + [eos_id] * (T - len(o)) for o in outs])
    y = torch.tensor([o + [IGNORE_INDEX] * (T - len(o)) for o in outs])
    return Seq2SeqBatch(src, torch.tensor([len(s) for s in sources]), tgt_in), y


class PairBatches:
    """Random rows of pairs that depend only on (seed, step), as memlm.data.Batches."""

    def __init__(self, ids: list[tuple[list[int], list[int]]], batch_size: int, seq_len: int, seed: int,
                 start_id: int, eos_id: int):
        self.ids, self.batch_size, self.seq_len, self.seed = ids, batch_size, seq_len, seed
        self.start_id, self.eos_id = start_id, eos_id

    def get(self, step: int, rank: int = 0, world_size: int = 1,
            seq_len: int | None = None) -> tuple[Seq2SeqBatch, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = torch.randint(len(self.ids), (self.batch_size,), generator=g)
        b = self.batch_size // world_size
        picked = [self.ids[i] for i in rows[rank * b:(rank + 1) * b].tolist()]
        return pair_rows(picked, seq_len or self.seq_len, self.start_id, self.eos_id)


def pair_eval_batches(ids: list[tuple[list[int], list[int]]], batch_size: int, seq_len: int, n_batches: int,
                      start_id: int, eos_id: int) -> Iterator[tuple[Seq2SeqBatch, torch.Tensor]]:
    """`n_batches` batches of pairs spread evenly over the eval split (always the same ones)."""
    total = batch_size * n_batches
    picks = (np.arange(total) * max(len(ids) - 1, 0)) // max(total - 1, 1)
    for k in range(n_batches):
        yield pair_rows([ids[i] for i in picks[k * batch_size:(k + 1) * batch_size]], seq_len, start_id, eos_id)


# ------------------------------------------------------------------------------ metrics

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: the harmonic mean of word precision and recall (lower-cased words)."""
    p, r = words(prediction), words(reference)
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    return words(prediction) == words(reference)


def copy_the_name(source: str) -> str:
    """The baseline: the function's name as words ("get_close_matches" -> "get close matches")."""
    m = re.search(r"def\s+(\w+)", source)
    return m.group(1).replace("_", " ").strip() if m else ""
