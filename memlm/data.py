"""Corpora, the token cache, and deterministic batches.

* The default corpus is CPython's own documentation topics (`pydoc_data.topics`), so the demo
  and benchmarks need no download. Its 80/20 character split is the project's benchmark split.
* `tokenize_corpus` tokenizes a corpus once into a flat memory-mapped `.bin` file; later runs
  with the same corpus and tokenizer reuse it.
* `Batches` draws random windows as a pure function of (seed, step), so a resumed run sees
  exactly the data it would have seen without stopping, with no iterator state to save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memlm.cleaning import CleanOptions, CleanReport, clean_documents
from memlm.errors import MemlmError, io_error
from memlm.integrity import write_text_atomic

if TYPE_CHECKING:
    from memlm.tokenizer import Tokenizer

DEFAULT_SPEC = "default"
CORPUS_SUFFIXES = (".txt", ".md", ".jsonl")
SPLITS = ("train", "eval")
DEFAULT_TRAIN_FRACTION = 0.8  # the benchmark split of the default corpus: never change it
USER_TRAIN_FRACTION = 0.9
CACHE_FORMAT_VERSION = 1
_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------- default corpus


def default_corpus_text() -> str:
    """All of CPython's pydoc topics joined by blank lines (about 465k characters on 3.11)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def default_split() -> tuple[str, str]:
    """(train, eval): the first 80% of the default corpus' characters, and the last 20%."""
    s = default_corpus_text()
    cut = int(len(s) * DEFAULT_TRAIN_FRACTION)
    return s[:cut], s[cut:]


def corpus_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------ reading


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise MemlmError(f"unknown split {split!r}", "use 'train', 'eval', or no split for the whole corpus")


def corpus_files(spec: str) -> list[Path]:
    """The files a corpus spec names: a file, a folder (searched recursively), or a glob."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES)
        if not files:
            raise MemlmError(
                f"corpus folder {spec} is empty: no {', '.join(CORPUS_SUFFIXES)} files in it",
                "put text files in the folder or point to another one",
            )
        return files
    if _GLOB_CHARS & set(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not files:
            raise MemlmError(f"corpus pattern {spec!r} matched no files", "check the pattern, e.g. 'data/**/*.txt'")
        return files
    raise MemlmError(f"corpus not found: {spec}", "pass 'default', a text/.jsonl file, a folder, or a glob pattern")


def _read_file(path: Path) -> list[str]:
    """Documents of one file: the whole file, or one per line's `text` field for .jsonl."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MemlmError(f"corpus file {path} is not UTF-8 text ({e.reason} at byte {e.start})", "convert it to UTF-8") from e
    except OSError as e:
        raise MemlmError(f"cannot read corpus file {path}: {e.strerror}") from e
    if path.suffix.lower() != ".jsonl":
        return [raw]
    docs = []
    for lineno, obj in jsonl_objects(path, raw):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise MemlmError(f"{path} line {lineno}: no string 'text' field", 'each line must look like {"text": "..."}')
        docs.append(obj["text"])
    return docs


def jsonl_objects(path: Path, raw: str) -> Iterator[tuple[int, Any]]:
    """(line number, object) for every non-blank line of the JSONL text `raw` read from `path`."""
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise MemlmError(f"{path} line {lineno}: not valid JSON ({e.msg})", "each line must be one JSON object") from None


def _split_documents(docs: list[str], fraction: float, split: str) -> list[str]:
    """Cut a list of documents at `fraction` of the characters of "\\n\\n".join(docs).

    Document boundaries are kept (so EOS separators survive); the one document the cut falls
    inside is split in two, and a cut inside a separator sends nothing of it anywhere.
    """
    total = sum(len(d) for d in docs) + 2 * (len(docs) - 1)
    cut = int(total * fraction)
    train: list[str] = []
    evals: list[str] = []
    pos = 0  # start of the current document inside the joined text
    for doc in docs:
        end = pos + len(doc)
        if end <= cut:
            train.append(doc)
        elif pos >= cut:
            evals.append(doc)
        else:
            train.append(doc[: cut - pos])
            evals.append(doc[cut - pos :])
        pos = end + 2
    return train if split == "train" else evals


def read_corpus(spec: str, split: str | None = None, cleaning: CleanOptions | None = None) -> list[str]:
    """The documents of a corpus (cleaned as `cleaning` says: see `clean_corpus`).

    `spec` is "default" (the embedded pydoc corpus, one document), a file, a folder (every
    .txt/.md/.jsonl file below it, sorted by path), or a glob pattern. A .jsonl file gives one
    document per line (its "text" field); any other file is one document.

    `split`: None for everything, or "train"/"eval". The default corpus uses its fixed 80/20
    character split. A user corpus is split 90/10 by characters: as if the documents were
    joined with "\\n\\n", train is the first 90% of the characters and eval the last 10%
    (document boundaries are kept; the document the cut falls in is divided in two).
    """
    return clean_corpus(spec, split, cleaning)[0]


def clean_corpus(spec: str, split: str | None = None,
                 cleaning: CleanOptions | None = None) -> tuple[list[str], CleanReport | None]:
    """`read_corpus` and what cleaning changed (None when not cleaned). A user corpus is cleaned
    before it is split, so a duplicate never sits on both sides; the default corpus after, so
    its benchmark split stays where it is (its text comes out of the default cleaning unchanged)."""
    _check_split(split)
    if spec == DEFAULT_SPEC:
        if split is None:
            docs = [default_corpus_text()]
        else:
            train, evals = default_split()
            docs = [train if split == "train" else evals]
        return clean_documents(docs, cleaning) if cleaning is not None else (docs, None)
    docs = [doc for f in corpus_files(spec) for doc in _read_file(f)]
    report = None
    if cleaning is not None:
        docs, report = clean_documents(docs, cleaning)
    docs = [d for d in docs if d]
    if not docs:
        raise MemlmError(f"corpus {spec} is empty", "add some text to the files")
    if split is not None:
        docs = [d for d in _split_documents(docs, USER_TRAIN_FRACTION, split) if d]
        if not docs:
            raise MemlmError(f"the {split} split of corpus {spec} is empty", "the corpus is too small to split; add more text")
    return docs, report


def source_fingerprint(spec: str) -> str:
    """Changes when the corpus may have changed: the text's sha256 for "default", else a hash
    over (path, size, mtime_ns) of every file, which is cheap even for large corpora."""
    if spec == DEFAULT_SPEC:
        return corpus_sha256(default_corpus_text())
    h = hashlib.sha256()
    for f in corpus_files(spec):
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- token cache


@dataclass
class TokenFile:
    """A flat token stream on disk (raw little-endian integers) plus its metadata."""

    path: Path
    dtype: str
    num_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    def tokens(self) -> np.memmap:
        """The tokens, memory-mapped read-only: nothing is loaded until it is touched."""
        return np.memmap(self.path, dtype=np.dtype(self.dtype).newbyteorder("<"), mode="r", shape=(self.num_tokens,))

    @classmethod
    def open(cls, meta_path: str | Path) -> TokenFile:
        """Open a cached token file from its JSON sidecar."""
        meta_path = Path(meta_path)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            return cls(meta_path.with_suffix(".bin"), meta["dtype"], int(meta["num_tokens"]), meta)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MemlmError(f"cannot read token cache {meta_path}: {e}", "delete the cache folder to rebuild it") from e


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds every id: uint16 halves the file for vocabs <= 65536."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _normalized_spec(spec: str) -> str:
    return spec if spec == DEFAULT_SPEC else os.path.abspath(os.path.expanduser(spec))


def _valid_cache(meta_path: Path, bin_path: Path, key: dict[str, Any]) -> TokenFile | None:
    """The cached file if its sidecar matches `key` and the .bin has the recorded length."""
    if not (meta_path.is_file() and bin_path.is_file()):
        return None
    try:
        tf = TokenFile.open(meta_path)
    except MemlmError:
        return None
    if any(tf.meta.get(k) != v for k, v in key.items()):
        return None
    if bin_path.stat().st_size != tf.num_tokens * np.dtype(tf.dtype).itemsize:
        return None
    return tf


def tokenize_corpus(
    spec: str,
    tokenizer: Tokenizer,
    split: str | None = None,
    cache_dir: str | Path = ".memlm-cache",
    cleaning: CleanOptions | None = None,
) -> TokenFile:
    """Tokenize a corpus once into `cache_dir` and return the memory-mappable token file.

    Documents are separated by the tokenizer's EOS id when it has one. The file is named by a
    hash of (spec, split, tokenizer fingerprint, source fingerprint), and reused when a JSON
    sidecar with that same key exists. Both files are written to `*.tmp` and renamed, the
    sidecar last, so an interrupted run never leaves a cache entry that looks valid. The cleaning
    options are part of the key; what they changed is in the sidecar (`meta["cleaning_report"]`).
    """
    _check_split(split)
    key: dict[str, Any] = {
        "format_version": CACHE_FORMAT_VERSION,
        "spec": _normalized_spec(spec),
        "split": split,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        # The EOS id shapes the stream but lives outside the tokenizer JSON, so key it too.
        "eos_id": tokenizer.eos_id,
        "source_fingerprint": source_fingerprint(spec),
        "cleaning": None if cleaning is None else cleaning.key(),
    }
    name = "tokens-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir)
    bin_path, meta_path = cache / f"{name}.bin", cache / f"{name}.json"
    cached = _valid_cache(meta_path, bin_path, key)
    if cached is not None:
        return cached

    docs, report = clean_corpus(spec, split, cleaning)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp_bin = bin_path.with_name(bin_path.name + ".tmp")
    num_tokens = 0
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with open(tmp_bin, "wb") as out:
            for ids in _encode_documents(docs, tokenizer):
                arr = np.asarray(ids, dtype=np.dtype(dtype).newbyteorder("<"))
                out.write(arr.tobytes())
                num_tokens += arr.size
        if num_tokens == 0:
            tmp_bin.unlink()
            raise MemlmError(f"corpus {spec} produced no tokens", "add some text to the corpus")
        os.replace(tmp_bin, bin_path)
        meta = {**key, "dtype": dtype, "num_tokens": num_tokens, "num_documents": len(docs),
                "vocab_size": tokenizer.vocab_size,
                "cleaning_report": None if report is None else dataclasses.asdict(report)}
        write_text_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp_bin.unlink()
        raise io_error(e, f"write the token cache in {cache}") from e
    return TokenFile(bin_path, dtype, num_tokens, meta)


def _encode_documents(docs: list[str], tokenizer: Tokenizer, chunk: int = 512) -> Iterator[list[int]]:
    """Yield each document's ids (EOS appended when the tokenizer has one), `chunk` documents
    per batch call so memory stays bounded; shows a progress bar only for long interactive runs."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    starts = range(0, len(docs), chunk)
    progress = None
    if len(docs) > 10 * chunk and sys.stderr.isatty():
        from rich.progress import Progress

        progress = Progress(transient=True)
        task = progress.add_task("tokenizing", total=len(docs))
        progress.start()
    try:
        for start in starts:
            batch = docs[start : start + chunk]
            for ids in tokenizer.encode_batch(batch):
                yield ids + eos
            if progress is not None:
                progress.advance(task, len(batch))
    finally:
        if progress is not None:
            progress.stop()


# ------------------------------------------------------------------------------ batches


def _check_length(n: int, seq_len: int) -> None:
    if seq_len <= 0:
        raise MemlmError(f"seq_len must be positive, got {seq_len}")
    if n < seq_len + 1:
        raise MemlmError(
            f"corpus too small for seq_len {seq_len}: it has {n} tokens, a window needs {seq_len + 1}",
            "use a shorter seq_len or a bigger corpus",
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = tokens[i : i+seq_len], y = tokens[i+1 : i+seq_len+1] for each start i, as int64."""
    rows = np.stack([np.asarray(tokens[i : i + seq_len + 1], dtype=np.int64) for i in starts])
    rows_t = torch.from_numpy(rows)
    return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()


class Batches:
    """Random training windows that depend only on (seed, step).

    The global batch of `step` is drawn from a generator seeded with seed * 1_000_003 + step;
    rank r of world_size takes rows [r*b, (r+1)*b) with b = batch_size // world_size. So the
    global batch is the same whatever the world size, and resuming at step k needs no state.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        if batch_size <= 0:
            raise MemlmError(f"batch_size must be positive, got {batch_size}")
        _check_length(len(tokens), seq_len)
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed

    def indices(self, step: int, seq_len: int | None = None) -> torch.Tensor:
        """Start offsets of the global batch at `step`."""
        seq_len = self.seq_len if seq_len is None else seq_len
        _check_length(len(self.tokens), seq_len)
        if step < 0:
            raise MemlmError(f"step must be >= 0, got {step}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        # Largest valid start is len - seq_len - 1 (its y window ends at the last token).
        return torch.randint(len(self.tokens) - seq_len - 1 + 1, (self.batch_size,), generator=g)

    def get(
        self, step: int, rank: int = 0, world_size: int = 1, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape (batch_size // world_size, seq_len) for this rank.

        `seq_len` overrides the constructor's for this call (progressive-length training).
        """
        if world_size <= 0 or not 0 <= rank < world_size:
            raise MemlmError(f"bad rank {rank} for world size {world_size}")
        if self.batch_size % world_size:
            raise MemlmError(
                f"batch_size {self.batch_size} is not divisible by world size {world_size}",
                "pick a batch size that is a multiple of the number of processes",
            )
        seq_len = self.seq_len if seq_len is None else seq_len
        b = self.batch_size // world_size
        ix = self.indices(step, seq_len)[rank * b : (rank + 1) * b]
        return _windows(self.tokens, ix.numpy(), seq_len)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `n_batches` (x, y) batches of windows spread evenly over the whole stream.

    The same stream always gives the same windows, so eval losses are comparable across runs.
    Windows overlap when the stream is shorter than batch_size * n_batches windows.
    """
    if batch_size <= 0 or n_batches <= 0:
        raise MemlmError(f"eval needs positive batch_size and n_batches, got {batch_size} and {n_batches}")
    _check_length(len(tokens), seq_len)
    total = batch_size * n_batches
    last_start = len(tokens) - seq_len - 1
    starts = (np.arange(total, dtype=np.int64) * last_start) // max(total - 1, 1)
    for k in range(n_batches):
        yield _windows(tokens, starts[k * batch_size : (k + 1) * batch_size], seq_len)
