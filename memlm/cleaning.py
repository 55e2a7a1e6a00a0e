"""Text cleaning before tokenization: options with safe defaults, and counts of what changed.

Applied to every document of a corpus (memlm.data.read_corpus), in this order:

  control      remove control characters (Unicode Cc, except tab and newline; so "\\r\\n" becomes
               "\\n"), the byte-order mark U+FEFF and lone surrogates (not text)         default on
  unicode      normalise to NFC (canonical: the same text, one encoding) or NFKC (also folds
               compatibility forms: "ﬁ" -> "fi", full-width letters -> ASCII)          default NFC
  lowercase    str.lower()                                                              default off
  whitespace   collapse every run of spaces and tabs to one space, drop trailing spaces,
               at most one blank line in a row (flattens code indentation)             default off
  dedup        drop a document (or, with dedup_unit "line", a non-blank line) that is an exact
               copy of an earlier one ("exact"), or also one whose word 3-gram shingles overlap
               an earlier one's by Jaccard >= NEAR_THRESHOLD ("near": MinHash candidates, each
               checked exactly)                                                       default exact documents

The defaults change nothing that carries meaning: the embedded corpus comes out byte for byte
as it went in (tests/test_cleaning.py). Cleaning is idempotent; removal never lengthens text,
but NFKC and lower-casing may ("ﬁ" -> "fi", "İ" -> "i̇"). The options are part of the token
cache's key, so changing one re-tokenizes.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

NEAR_THRESHOLD = 0.8  # Jaccard similarity of word 3-gram shingles above which two texts are near-duplicates
_MINHASHES, _BAND = 32, 4  # 32 MinHash values in 8 bands of 4: pairs at Jaccard 0.8 share a band with p ~ 0.9996
_PRIME = (1 << 61) - 1
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newlines
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class CleanOptions:
    control: bool = True
    unicode: Literal["none", "NFC", "NFKC"] = "NFC"
    lowercase: bool = False
    whitespace: bool = False
    dedup: Literal["none", "exact", "near"] = "exact"
    dedup_unit: Literal["document", "line"] = "document"

    @classmethod
    def of(cls, train_cfg) -> CleanOptions:
        """The options a TrainConfig's clean_* fields give."""
        return cls(control=train_cfg.clean_control, unicode=train_cfg.clean_unicode,
                   lowercase=train_cfg.clean_lowercase, whitespace=train_cfg.clean_whitespace,
                   dedup=train_cfg.clean_dedup, dedup_unit=train_cfg.clean_dedup_unit)

    def key(self) -> dict:
        """What the token cache's fingerprint records of these options."""
        return asdict(self)


@dataclass
class CleanReport:
    """What cleaning changed in a corpus."""

    documents_in: int = 0
    documents_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    control_chars_removed: int = 0
    documents_normalized: int = 0
    documents_lowercased: int = 0
    whitespace_chars_removed: int = 0
    exact_duplicates: int = 0  # documents or lines, as dedup_unit says
    near_duplicates: int = 0

    def summary(self) -> str:
        parts = [f"{self.documents_in:,} documents, {self.chars_in:,} -> {self.chars_out:,} characters"]
        for name in ("control_chars_removed", "documents_normalized", "documents_lowercased",
                     "whitespace_chars_removed", "exact_duplicates", "near_duplicates"):
            if getattr(self, name):
                parts.append(f"{name.replace('_', ' ')} {getattr(self, name):,}")
        return "; ".join(parts)


def clean_text(text: str, options: CleanOptions, report: CleanReport | None = None) -> str:
    """One document's character-level cleaning (everything but dedup)."""
    report = report if report is not None else CleanReport()
    if options.control:
        cleaned = _CONTROL.sub("", text)
        report.control_chars_removed += len(text) - len(cleaned)
        text = cleaned
    # Normalising and lower-casing each may undo the other ("ℌ" NFKC -> "H", lower -> "h"; some
    # lowered strings are not normalised): repeat both until neither changes anything.
    before = text
    for _ in range(4):
        step = text
        if options.unicode != "none":
            step = unicodedata.normalize(options.unicode, step)
        if options.lowercase:
            step = step.lower()
        if step == text:
            break
        text = step
    if text != before:
        if options.unicode != "none" and unicodedata.normalize(options.unicode, before) != before:
            report.documents_normalized += 1
        if options.lowercase and before.lower() != before:
            report.documents_lowercased += 1
    if options.whitespace:
        cleaned = _BLANK_RUNS.sub("\n\n", re.sub(r" +\n", "\n", _SPACES.sub(" ", text)))
        if cleaned.endswith(" "):
            cleaned = cleaned.rstrip(" ")
        report.whitespace_chars_removed += len(text) - len(cleaned)
        text = cleaned
    return text


def clean_documents(docs: Iterable[str], options: CleanOptions) -> tuple[list[str], CleanReport]:
    """Every document cleaned, duplicates dropped (empty results too), and the report."""
    report = CleanReport()
    out = []
    for doc in docs:
        report.documents_in += 1
        report.chars_in += len(doc)
        out.append(clean_text(doc, options, report))
    if options.dedup != "none":
        out = _dedup_documents(out, options, report) if options.dedup_unit == "document" else \
            _dedup_lines(out, options, report)
    out = [d for d in out if d]
    report.documents_out = len(out)
    report.chars_out = sum(len(d) for d in out)
    return out, report


class _Seen:
    """Texts kept so far: exact copies by value, near copies through MinHash bands."""

    def __init__(self, near: bool):
        self.near = near
        self.exact: set[str] = set()
        self.bands: dict[tuple, list[frozenset]] = {}

    def duplicate(self, text: str) -> str | None:
        """"exact" / "near" if `text` repeats a kept one; else keep it and return None."""
        if text in self.exact:
            return "exact"
        shingles = _shingles(text) if self.near else frozenset()
        keys = []
        if shingles:
            signature = _minhash(shingles)
            keys = [(i, signature[i:i + _BAND]) for i in range(0, _MINHASHES, _BAND)]
            for key in keys:
                for other in self.bands.get(key, ()):
                    if len(shingles & other) >= NEAR_THRESHOLD * len(shingles | other):
                        return "near"
        self.exact.add(text)
        for key in keys:
            self.bands.setdefault(key, []).append(shingles)
        return None


def _dedup_documents(docs: list[str], options: CleanOptions, report: CleanReport) -> list[str]:
    seen, kept = _Seen(options.dedup == "near"), []
    for doc in docs:
        found = seen.duplicate(doc)
        if found is None:
            kept.append(doc)
        elif found == "exact":
            report.exact_duplicates += 1
        else:
            report.near_duplicates += 1
    return kept


def _dedup_lines(docs: list[str], options: CleanOptions, report: CleanReport) -> list[str]:
    """Each non-blank line kept the first time it appears in the corpus (blank lines always)."""
    seen, out = _Seen(options.dedup == "near"), []
    for doc in docs:
        lines = []
        for line in doc.split("\n"):
            found = seen.duplicate(line) if line.strip() else None
            if found is None:
                lines.append(line)
            elif found == "exact":
                report.exact_duplicates += 1
            else:
                report.near_duplicates += 1
        out.append("\n".join(lines))
    return out


def _shingles(text: str) -> frozenset[int]:
    """Word 3-grams (of lower-cased words), hashed with CRC-32: stable across processes."""
    words = text.lower().split()
    grams = [" ".join(words[i:i + 3]) for i in range(max(len(words) - 2, 1))] if words else []
    return frozenset(zlib.crc32(g.encode("utf-8", "surrogatepass")) for g in grams)


_SEEDS = [(zlib.crc32(f"a{i}".encode()) | 1, zlib.crc32(f"b{i}".encode())) for i in range(_MINHASHES)]


def _minhash(shingles: frozenset[int]) -> tuple[int, ...]:
    return tuple(min((a * s + b) % _PRIME for s in shingles) for a, b in _SEEDS)
