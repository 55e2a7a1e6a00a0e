"""Files memlm writes, whole or not at all, and checked when read back.

`write_text_atomic` writes a small file aside and renames it over the old one, so a kill or a
full disk leaves the old file or the new, never half of one. The sha256 of every file memlm
writes into a checkpoint or a compressed model is recorded in
the folder's JSON (`"files": {name: {"sha256": ..., "bytes": ...}}`) and checked before the
files are read: a flipped bit, a truncated copy or a file swapped for another is named, instead
of loading wrong weights or failing somewhere inside a parser. The JSON itself is sealed: its
"json_sha256" is the sha256 of the rest of it (`seal`, `sealed_intact`). (sha256 runs at over
1 GB/s where the CPU has SHA instructions: a fraction of reading the file from disk.)
`read_json_object` reads a small JSON file of a user's folder, or says in one line why not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from memlm.errors import MemlmError, first_line

_CHUNK = 1 << 20
SEAL = "json_sha256"


def read_json_object(path: str | Path, hint: str) -> dict[str, Any]:
    """The JSON object in `path`; a one-line MemlmError naming the file (with `hint`) when it
    cannot be read, is not UTF-8 JSON, or holds something other than an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise MemlmError(f"cannot read {path}: {first_line(e)}", hint) from None
    if not isinstance(obj, dict):
        raise MemlmError(f"{path} must hold a JSON object, got {type(obj).__name__}", hint)
    return obj


def write_text_atomic(path: str | Path, text: str) -> None:
    """`path` holds `text`, or (after any failure) what it held before; no temporary is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_files(folder: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {"sha256", "bytes"}} of the files `names` (paths relative to `folder`)."""
    folder = Path(folder)
    return {name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in names}


def damaged_files(folder: str | Path, recorded: Any) -> list[str]:
    """What is wrong with the files `recorded` (as `describe_files` wrote it) under `folder`, one
    phrase per file ("model.safetensors (sha256 differs)"); empty when every file is intact."""
    folder = Path(folder)
    if not isinstance(recorded, dict):
        return ["its list of files (not a JSON object)"]
    problems = []
    for name, entry in recorded.items():
        path = folder / name
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("bytes"), int) or Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name} (its record is not valid)")
        elif not path.is_file():
            problems.append(f"{name} (missing)")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} ({path.stat().st_size} bytes, {entry['bytes']} recorded)")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{name} (sha256 differs)")
    return problems


def _canonical_sha256(obj: dict[str, Any]) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))  # floats round-trip exactly through JSON
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its own sha256 added (over the rest of it, keys sorted)."""
    rest = {k: v for k, v in obj.items() if k != SEAL}
    return {**rest, SEAL: _canonical_sha256(rest)}


def sealed_intact(obj: dict[str, Any]) -> bool:
    """Whether a JSON object read back is the one `seal` wrote. One written before memlm
    recorded files (neither "files" nor a seal) passes; "files" without a seal does not (a
    changed byte in the seal's own name must not pass for an old file)."""
    if SEAL not in obj:
        return "files" not in obj
    rest = {k: v for k, v in obj.items() if k != SEAL}
    return obj[SEAL] == _canonical_sha256(rest)
