"""Text classification data: JSONL records of `text` and `label`, and the embedded default set.

A data file has one JSON object per line, {"text": "...", "label": ...}; the labels are all
strings or all integers (not a mix), and the classes are the distinct labels, sorted. As for
instruction data, the last 10% of the records (at least one) are held out.

The embedded default set (`default_classify_records`) is real text shipped with every Python:
the docstrings of the standard library's public functions, classes and methods, each labelled by
the family of its module (FAMILIES: text, files, containers, math, internet, concurrency, dates,
archives). The split is fixed by a hash of the text (1 in 5 held out).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memlm.errors import MemlmError

FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "textwrap", "re", "difflib", "unicodedata", "codecs", "stringprep"),
    "files": ("os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "fileinput"),
    "containers": ("collections", "heapq", "bisect", "array", "copy", "weakref", "graphlib"),
    "math": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"),
    "internet": ("urllib.parse", "urllib.request", "http.client", "http.cookies", "email.message", "email.utils",
                 "smtplib", "ftplib", "ipaddress"),
    "concurrency": ("threading", "multiprocessing.pool", "concurrent.futures", "asyncio", "subprocess", "queue",
                    "sched"),
    "dates": ("datetime", "time", "calendar", "zoneinfo"),
    "archives": ("zipfile", "tarfile", "gzip", "bz2", "lzma", "zlib", "zipimport"),
}
MIN_TEXT, MAX_TEXT = 40, 600  # characters of a docstring kept as one example
HELD_OUT = 5  # 1 in 5 examples held out (by a hash of the text)


def _docstrings(module_name: str) -> list[str]:
    """Cleaned docstrings of a module's public functions and classes and of their public methods."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    out = []
    public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in sorted(set(public)):
        obj = getattr(module, name, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        members = [obj]
        if inspect.isclass(obj):
            members += [m for n, m in sorted(vars(obj).items()) if not n.startswith("_") and callable(m)]
        for m in members:
            doc = inspect.getdoc(m)
            if doc and MIN_TEXT <= len(doc):
                out.append(doc[:MAX_TEXT])
    return out


def default_classify_records(split: str | None = None) -> list[dict[str, Any]]:
    """The embedded set ({"text", "label"} records; split "train", "eval" or None for all). A
    docstring found under two families (a re-exported class) is kept once, under the first."""
    seen: set[str] = set()
    records = []
    for family, modules in FAMILIES.items():
        for module in modules:
            for text in _docstrings(module):
                if text in seen:
                    continue
                seen.add(text)
                held = int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % HELD_OUT == 0
                if split is None or (split == "eval") == held:
                    records.append({"text": text, "label": family})
    return records


def read_labelled(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file of {"text", "label"}, checked: every line has a non-empty
    string text and a label, and the labels are all strings or all integers."""
    path = Path(path)
    if not path.is_file():
        raise MemlmError(f"data file not found: {path}", "pass a .jsonl file, or leave --data out for the embedded set")
    from memlm.data import jsonl_objects

    records = []
    kinds: dict[type, int] = {}
    for lineno, obj in jsonl_objects(path, path.read_text(encoding="utf-8")):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"]:
            raise MemlmError(f"{path} line {lineno}: no non-empty string 'text'",
                             'each line must look like {"text": "...", "label": "..."}')
        if "label" not in obj or obj["label"] is None:
            raise MemlmError(f"{path} line {lineno}: no 'label'", 'each line must look like {"text": "...", "label": "..."}')
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise MemlmError(f"{path} line {lineno}: label {label!r} is neither a string nor an integer",
                             "give every label as a string (or every label as an integer)")
        kinds.setdefault(type(label), lineno)
        if len(kinds) > 1:
            raise MemlmError(f"{path}: labels of mixed types (strings and integers, first at lines "
                             f"{kinds.get(str)} and {kinds.get(int)})", "give every label as a string, or every one as an integer")
        records.append({"text": obj["text"], "label": label})
    if not records:
        raise MemlmError(f"data file {path} is empty", 'add one JSON object per line: {"text": ..., "label": ...}')
    return records


def load_labelled(spec: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) records of `spec`: "default" (the embedded set) or a JSONL file."""
    from memlm.data_instruct import split_records

    if spec == "default":
        return default_classify_records("train"), default_classify_records("eval")
    return split_records(read_labelled(spec))


def class_names(records: list[dict[str, Any]]) -> list[str]:
    """The classes: the distinct labels, sorted (as strings, the form finetune.json keeps)."""
    labels = sorted({r["label"] for r in records})
    if len(labels) < 2:
        raise MemlmError(f"the data has {len(labels)} class", "classification needs at least two different labels")
    return [str(x) for x in labels]


@dataclass
class Labelled:
    ids: list[int]
    label: int


def encode_labelled(records: list[dict[str, Any]], tokenizer: Any, classes: list[str], seq_len: int) -> list[Labelled]:
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for r in records:
        label = str(r["label"])
        if label not in index:
            raise MemlmError(f"label {r['label']!r} of a held-out record is not among the training labels",
                             f"the classes are {', '.join(classes)}")
        ids = tokenizer.encode(r["text"])[:seq_len] or [0]
        out.append(Labelled(ids, index[label]))
    return out


def collate(examples: list[Labelled], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (B, T) right-padded ids, y (B, 2)): per row its label and its real length (the head
    pools over the real tokens only)."""
    T = max(len(e.ids) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for row, e in enumerate(examples):
        x[row, :len(e.ids)] = torch.tensor(e.ids)
    y = torch.tensor([[e.label, len(e.ids)] for e in examples], dtype=torch.long)
    return x, y
