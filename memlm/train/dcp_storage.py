"""torch.distributed.checkpoint (DCP) storage that never unpickles: memlm's sharded checkpoints.

DCP's file storage writes the index of a checkpoint (which tensor chunk lies where) as a pickle,
`.metadata`, and its default load planner reads non-tensor values with
`torch.load(weights_only=False)`: a run folder from anywhere could run code on `--resume`. Here
the same storage is used with two changes:

* `JsonIndexWriter` / `JsonIndexReader`: the index is `memlm_dcp.json`, plain JSON, checked field
  by field on reading (a dtype must be a torch dtype, a shard a file inside the folder, every
  size a non-negative integer). `.metadata` is never written, and never opened.
* `PlainDataLoadPlanner`: non-tensor values (the optimizer's hyperparameters: floats, tuples,
  parameter names) go through `torch.load(weights_only=True)` like the tensors themselves.

Imported only where a sharded checkpoint is saved or loaded (DCP takes a while to import).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

INDEX_FILE = "memlm_dcp.json"
INDEX_FORMAT = "memlm-dcp-index-1"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
)}


@dataclass(frozen=True)
class _Stored:
    """Where one item's bytes are: the attributes DCP's FileSystemReader reads of its own
    (private) _StorageInfo."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: None = None


class JsonIndexWriter(FileSystemWriter):
    """DCP's file writer, with the index written as JSON instead of DCP's pickled `.metadata`."""

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        items = [wr for per_rank in results for wr in per_rank]
        for wr in items:  # memlm asks for no stream transforms (compression...): none to record
            if getattr(wr.storage_data, "transform_descriptors", None):
                raise RuntimeError(f"unexpected DCP stream transform for {wr.index.fqn}")
        index = index_to_json(metadata, {wr.index: wr.storage_data for wr in items})
        path = Path(self.path) / INDEX_FILE
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class JsonIndexReader(FileSystemReader):
    """DCP's file reader, with the index read from memlm_dcp.json (never `.metadata`).

    The index is read and checked when the reader is made, so a bad one raises (ValueError,
    OSError) here, before DCP, which would log a traceback for it and try other files."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        index = Path(path) / INDEX_FILE
        if not index.is_file():
            raise ValueError(f"{Path(path)} has no {INDEX_FILE}: a sharded checkpoint of an older memlm, whose "
                             "index (.metadata) is a pickle memlm does not read")
        with open(index, "rb") as f:
            self._metadata = index_from_json(json.loads(f.read().decode("utf-8")))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self._metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return self._metadata


class PlainDataLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with non-tensor values unpickled by torch's weights-only unpickler
    (plain numbers, strings, tuples, lists, dicts) instead of without any limit."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        plain = torch.load(value, weights_only=True)  # anything but plain data is refused here
        # DCP's planner puts the value in place (it unflattens nested keys); it unpickles, so it
        # is handed a pickle of memlm's own making, from the plain value just read.
        ours = io.BytesIO()
        torch.save(plain, ours)
        ours.seek(0)
        super().load_bytes(read_item, ours)


def failure_of(e: BaseException) -> BaseException:
    """The exception a rank raised inside DCP (which wraps it, with every rank's traceback, into a
    CheckpointException: a BaseException), or `e` itself."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and failures:
        return next(iter(failures.values()))[0]
    return e


# ---- the index as JSON ---------------------------------------------------------------------

def index_to_json(metadata: Metadata, storage: dict[MetadataIndex, Any]) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            entries[fqn] = {"bytes": True}
        else:
            entries[fqn] = {"dtype": str(item.properties.dtype).removeprefix("torch."), "size": list(item.size),
                            "chunks": [[list(c.offsets), list(c.sizes)] for c in item.chunks]}
    planner = metadata.planner_data or {}
    return {
        "format": INDEX_FORMAT,
        "version": metadata.version,
        "entries": entries,
        "planner_data": {key: list(path) for key, path in planner.items()},
        "storage": [{"fqn": i.fqn, "offset": None if i.offset is None else list(i.offset), "index": i.index,
                     "file": s.relative_path, "at": s.offset, "length": s.length} for i, s in storage.items()],
    }


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise ValueError(f"{INDEX_FILE}: {what} must be a list of non-negative integers, got {value!r}")
    return value


def _field(entry: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(entry, dict) or not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
        raise ValueError(f"{INDEX_FILE}: {what} has no valid '{key}'")
    return entry[key]


def index_from_json(data: Any) -> Metadata:
    """The DCP Metadata of a memlm_dcp.json, every field checked (ValueError names a bad one)."""
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise ValueError(f"{INDEX_FILE} is not a memlm DCP index")
    entries: dict[str, Any] = {}
    for fqn, e in _field(data, "entries", dict, "the index").items():
        if isinstance(e, dict) and e.get("bytes") is True:
            entries[fqn] = BytesStorageMetadata()
            continue
        dtype = _DTYPES.get(_field(e, "dtype", str, f"entry {fqn!r}"))
        if dtype is None:
            raise ValueError(f"{INDEX_FILE}: entry {fqn!r} has an unknown dtype {e['dtype']!r}")
        chunks = []
        for c in _field(e, "chunks", list, f"entry {fqn!r}"):
            if not isinstance(c, list) or len(c) != 2:
                raise ValueError(f"{INDEX_FILE}: entry {fqn!r} has a bad chunk {c!r}")
            chunks.append(ChunkStorageMetadata(torch.Size(_ints(c[0], "a chunk offset")),
                                               torch.Size(_ints(c[1], "a chunk size"))))
        entries[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype),
                                             torch.Size(_ints(e.get("size"), f"the size of {fqn!r}")), chunks)
    planner: dict[str, tuple] = {}
    for key, path in _field(data, "planner_data", dict, "the index").items():
        if not isinstance(path, list) or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
            raise ValueError(f"{INDEX_FILE}: planner path of {key!r} is {path!r}")
        planner[key] = tuple(path)
    storage: dict[MetadataIndex, _Stored] = {}
    for s in _field(data, "storage", list, "the index"):
        fqn = _field(s, "fqn", str, "a storage entry")
        name = _field(s, "file", str, f"the storage of {fqn!r}")
        if name != os.path.basename(name) or name in ("", ".", "..") or not name.endswith(".distcp"):
            raise ValueError(f"{INDEX_FILE}: the storage of {fqn!r} points outside the checkpoint: {name!r}")
        offset = s.get("offset")
        index = s.get("index")
        if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
            raise ValueError(f"{INDEX_FILE}: the storage of {fqn!r} has a bad index {index!r}")
        key = MetadataIndex(fqn, None if offset is None else _ints(offset, "a storage offset"), index)
        at, length = _ints([s.get("at"), s.get("length")], f"the place of {fqn!r}")
        storage[key] = _Stored(name, at, length)
    version = data.get("version")
    if version is not None and not isinstance(version, str):
        raise ValueError(f"{INDEX_FILE}: version is {version!r}")
    return Metadata(state_dict_metadata=entries, planner_data=planner, storage_data=storage, version=version)
