"""Save and load compressed models: packed tensors as they are, plus a JSON map of layer kinds.

A folder holds
  model.safetensors   every persistent tensor of the model, in the portable layouts of
                      quantize.py (a tied embedding/head is stored once)
  memlm_model.json    {"format": "memlm-compressed", "version": 1 or 2, "config": ModelConfig dict,
                       "tied_embeddings": bool, "layers": {module name: {"kind": ..., ...}},
                       "files": {name: {"sha256", "bytes"}} of the other files, checked on load}
  tokenizer.json ...  when a tokenizer is given (Tokenizer.save)

Loading builds the model on the meta device from the config (no memory, no init), swaps in
an empty module of the recorded kind for each layer, and assigns the saved tensors: nothing
but the compressed tensors is ever allocated, and the logits are identical to the saved model's.
No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memlm.compress import kinds
from memlm.compress.quantize import set_module
from memlm.config import ModelConfig
from memlm.errors import MemlmError, first_line, io_error, os_error_of
from memlm.integrity import SEAL, damaged_files, describe_files, seal, sealed_intact
from memlm.memory.measure import return_free_heap

FORMAT = "memlm-compressed"
# Version 2 adds group-wise int8 scales ("group_size" in an int8 / int8_embedding spec). A
# folder without them is still written as version 1, so older memlm versions keep reading it;
# one with them says "newer than this memlm" there instead of failing on a shape mismatch.
VERSION = 2
WEIGHTS_FILE = "model.safetensors"
META_FILE = "memlm_model.json"


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: spec} for every compressed module (memlm.compress.kinds)."""
    return kinds.layer_specs(model)


def _is_tied(model: nn.Module) -> bool:
    head, emb = getattr(model, "lm_head", None), getattr(model, "tok_emb", None)
    return isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding) and head.weight is emb.weight


def save_compressed(model: nn.Module, tokenizer: Any, folder: str | Path) -> Path:
    """Write the model (and tokenizer, if not None) into `folder`, atomically; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MemlmError(f"{folder} exists and is not a folder", "pass a folder path to save the model into")
    tied = _is_tied(model)
    state = model.state_dict()
    if tied:
        del state["lm_head.weight"]  # the same tensor as tok_emb.weight
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in state.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    specs = layer_specs(model)
    grouped_int8 = any(s.get("kind") in ("int8", "int8_embedding") and "group_size" in s for s in specs.values())
    meta = {
        "format": FORMAT,
        "version": 2 if grouped_int8 else 1,
        "config": model.config.to_dict(),
        "tied_embeddings": tied,
        "layers": specs,
        # Position tables are recomputed on load, in float32; a model moved to bf16 had them in bf16.
        "table_dtypes": {n: str(b.dtype).removeprefix("torch.") for n, b in model.named_buffers() if n not in state},
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        # last: the size and sha256 of every other file, checked on load
        sealed = seal({**meta, "files": describe_files(tmp, sorted(p.name for p in tmp.iterdir()))})
        (tmp / META_FILE).write_text(json.dumps(sealed, indent=2) + "\n", encoding="utf-8")

    return write_folder(folder, fill)


def write_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Make `folder` atomically: `fill(tmp)` writes its files into a temporary sibling, which then
    takes the folder's name (an old folder is swapped out only once the new one is complete). A
    full or read-only disk is one line (io_error), and no temporary is left behind."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as e:
        raise io_error(e, f"save to {folder}") from e
    try:
        fill(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "x")
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os_error_of(e) is not None:  # a full or read-only disk (safetensors says so in Rust's words)
            raise io_error(e, f"save to {folder}") from e
        raise
    return folder


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorFile:
    """Reads tensors of a safetensors file one at a time, each into fresh process memory.

    safetensors' own loader maps the file: every page a tensor touched stays charged to the
    process for as long as any tensor of the file is alive, so a layer converted on load (or a
    model that outlives its load) counts its bytes twice. Plain reads land each byte once.
    The format: an 8-byte little-endian header length, a JSON header
    {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the data.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close / the with block)
        try:
            size = self.path.stat().st_size
            (n,) = struct.unpack("<Q", self._file.read(8))
            if n > size - 8:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(self._file.read(n))
            self._data_start = 8 + n
            self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
            for key, e in self._entries.items():
                begin, end = e["data_offsets"]
                numel = math.prod(e["shape"])
                if e["dtype"] not in _DTYPES or not 0 <= begin <= end <= size - self._data_start \
                        or end - begin != numel * _DTYPES[e["dtype"]].itemsize:
                    raise ValueError(f"entry {key!r} is inconsistent: {e}")
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as err:
            self._file.close()
            raise MemlmError(f"{self.path} is not a readable safetensors file: {err}",
                             "the folder is damaged; save the model again") from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def read(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        begin, end = e["data_offsets"]
        t = torch.empty(e["shape"], dtype=_DTYPES[e["dtype"]])
        if end > begin:
            self._file.seek(self._data_start + begin)
            if self._file.readinto(t.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise MemlmError(f"{self.path} is truncated", "the folder is damaged; save the model again")
        return t

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_description(folder: str | Path) -> dict[str, Any]:
    """The memlm_model.json of a compressed folder, its fields checked (a one-line error if not)."""
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise MemlmError(f"cannot read {path}: {first_line(e)}", "the folder is damaged; save the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MemlmError(f"{path} is not a memlm-compressed description")
    if not sealed_intact(meta):
        raise MemlmError(f"{folder} is damaged: {META_FILE} (its {SEAL} differs)", "save or download the model again")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise MemlmError(f"{path}: version is {version!r}", "the folder is damaged; save the model again")
    if version > VERSION:
        raise MemlmError(f"{folder} uses format version {version}, newer than this memlm", "upgrade memlm")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("layers"), dict) \
            or not all(isinstance(spec, dict) for spec in meta["layers"].values()):
        raise MemlmError(f"{path} lacks a valid 'config' or 'layers'", "the folder is damaged; save the model again")
    return meta


def load_compressed(folder: str | Path, use_kernel: bool | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) from a folder written by `save_compressed`; model in eval mode.

    `use_kernel` as in `quantize_model`: None runs int4 layers on the CPU int4 kernel where it is
    available (bf16 compute, so logits match a model quantized with the same setting).
    """
    from memlm.model import empty_model

    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise MemlmError(f"{folder} is not a compressed memlm model", f"it needs {META_FILE} and {WEIGHTS_FILE}")
    meta = read_description(folder)
    problems = damaged_files(folder, meta["files"]) if "files" in meta else []  # older folders record none
    if problems:
        raise MemlmError(f"{folder} is damaged: {'; '.join(problems)}", "save or download the model again")
    try:  # every field of the description is used below: a bad one is the folder's fault
        config = ModelConfig.from_dict(meta["config"])
        model = empty_model(config)
        # Parents before children (a low-rank layer's factors may be quantized), the tied head last.
        order = sorted(meta["layers"].items(), key=lambda kv: (kv[1].get("kind") == "int8_tied_head", kv[0].count("."), kv[0]))
        for name, spec in order:
            try:
                placeholder = model.get_submodule(name)
            except AttributeError:
                raise MemlmError(f"{meta_path}: layer {name!r} does not exist in the model its config describes") from None
            set_module(model, name, kinds.empty_layer(spec, placeholder, model, use_kernel))

        tied = bool(meta.get("tied_embeddings")) and isinstance(model.lm_head, nn.Linear)
        expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
        with TensorFile(weights_path) as f:
            missing, unexpected = sorted(expected - set(f.keys())), sorted(set(f.keys()) - expected)
            if missing or unexpected:
                raise MemlmError(
                    f"{weights_path} does not match its description: missing {missing[:5]}, unexpected {unexpected[:5]}",
                    "the folder is damaged or was not written by save_compressed",
                )
            # One module at a time: a layer converted on load (int4 into the CPU kernel's layout)
            # drops its portable copy before the next is read.
            by_owner: dict[str, list[str]] = {}
            for key in f.keys():
                by_owner.setdefault(key.rpartition(".")[0], []).append(key)
            for owner, keys in by_owner.items():
                module = model.get_submodule(owner)
                module.load_state_dict({key.rpartition(".")[2]: f.read(key) for key in keys}, strict=False, assign=True)
                if getattr(module, "kernel_layout", False):
                    return_free_heap()  # the portable copy just freed
        if tied:
            model.lm_head.weight = model.tok_emb.weight
        model.reset_buffers("cpu")
        for name, dtype in meta.get("table_dtypes", {}).items():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if isinstance(getattr(module, attr, None), torch.Tensor):
                dtype = getattr(torch, str(dtype), None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"table_dtypes of {name!r} is not a torch dtype")
                setattr(module, attr, getattr(module, attr).to(dtype))
        model.eval()
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise MemlmError(f"{folder} does not load: {first_line(e)}", "the folder is damaged; save the model again") from None

    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from memlm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(folder)
    return model, tokenizer


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under `folder` (what the model costs on disk)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in memory (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total
