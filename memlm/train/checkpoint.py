"""Training checkpoints: safetensors and JSON only, written atomically.

Layout of one checkpoint (`<run>/checkpoints/step-000123/`):

    model.safetensors      the model's weights (a tied weight is stored once)
    optimizer.safetensors  every tensor of the optimizer state, named `state.<i>.<key>`; the
                           param groups (hyperparameters) are JSON in the file's metadata
    rng.safetensors        torch's CPU generator state (`torch_cpu`) and one per GPU (`cuda.<i>`)
    trainer_state.json     step, configs, tokens seen, data position, wall time, ...

Nothing is pickled, so loading a checkpoint can never run code. A checkpoint is written as
`.step-000123.tmp/`, every file is fsynced, and only then is the folder renamed to its final
name, so a folder called `step-*` is always complete. Leftover `.tmp` folders from a crash are
ignored and removed by the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from memlm.errors import MemlmError

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
_NAME = re.compile(r"^step-(\d+)$")
_TMP = re.compile(r"^\.step-.*\.tmp$")
# Fields that do not change the weights' shapes or meaning; a checkpoint loads across them.
_IGNORED_MODEL_FIELDS = ("name", "dropout")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None. Half-written `.tmp` folders are ignored."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_partial(run_dir: str | Path) -> None:
    """Remove `.step-*.tmp` folders left by a save or prune that was interrupted."""
    folder = Path(run_dir) / CHECKPOINTS
    if folder.is_dir():
        for p in folder.iterdir():
            if _TMP.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------ saving


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform lets you open a folder.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten `optimizer.state_dict()` into named tensors plus string metadata.

    Tensors become `state.<i>.<key>`. Python numbers in the state become 0-d tensors, listed in
    the metadata so they come back as numbers; None values are listed too.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    numbers: list[str] = []
    nones: list[str] = []
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            name = f"state.{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous().cpu()
            elif value is None:
                nones.append(name)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                tensors[name] = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int64)
                numbers.append(name)
            else:
                raise MemlmError(f"cannot save optimizer state {name} of type {type(value).__name__}")
    metadata = {
        "format": "memlm-optimizer-1",
        "optimizer": type(optimizer).__name__,
        "param_groups": json.dumps(sd["param_groups"]),
        "numbers": json.dumps(numbers),
        "nones": json.dumps(nones),
    }
    return tensors, metadata


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return tensors


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` of a run atomically, keep only the newest `keep_last`, return its path.

    `state` is any JSON-able dict (the loop passes configs, tokens seen, the data position, ...);
    `step` and, when the model has one, `model_config` are added to it.
    """
    if keep_last < 1:
        raise MemlmError(f"keep_last must be at least 1, got {keep_last}")
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    clean_partial(run_dir)
    name = checkpoint_name(step)
    tmp = folder / f".{name}.tmp"
    tmp.mkdir()

    trainer_state = dict(state)
    trainer_state["step"] = step
    config = getattr(model, "config", None)
    if "model_config" not in trainer_state and hasattr(config, "to_dict"):
        trainer_state["model_config"] = config.to_dict()
    trainer_state.setdefault("saved_at", time.time())

    # save_model drops the duplicate names of shared (tied) tensors and load_model restores them.
    save_model(model, str(tmp / MODEL_FILE), metadata={"format": "memlm-model-1"})
    if optimizer is not None:
        tensors, metadata = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata=metadata)
    save_file(_rng_tensors(), str(tmp / RNG_FILE))
    try:
        text = json.dumps(trainer_state, indent=2) + "\n"
    except TypeError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MemlmError(f"trainer state is not JSON-serializable: {e}") from e
    (tmp / STATE_FILE).write_text(text, encoding="utf-8")
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)

    final = folder / name
    if final.exists():  # saving the same step again: move the old one aside first
        old = folder / f".{name}.old.tmp"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(folder)
    prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints.

    Each is renamed to a `.tmp` name before it is deleted, so a crash half-way through a
    deletion leaves something the next save cleans up, never a damaged `step-*` folder.
    """
    for old in list_checkpoints(run_dir)[:-keep_last]:
        doomed = old.with_name(f".{old.name}.tmp")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# ----------------------------------------------------------------------------- loading


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer_state.json of a checkpoint folder."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise MemlmError(f"{path} is not a complete checkpoint (no {STATE_FILE})", "point to a step-* folder of a run")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemlmError(f"cannot read {file}: {e}", "the checkpoint is damaged; use an older one") from e
    if not isinstance(state, dict):
        raise MemlmError(f"{file} must hold a JSON object", "the checkpoint is damaged; use an older one")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """'field: saved -> current' for every field whose value differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        if saved.get(key) != current.get(key):
            out.append(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}")
    return out


def _check_model_config(path: Path, state: dict[str, Any], model: nn.Module) -> None:
    config = getattr(model, "config", None)
    saved = state.get("model_config")
    if saved is None or not hasattr(config, "to_dict"):
        return
    diffs = config_differences(saved, config.to_dict(), ignore=_IGNORED_MODEL_FIELDS)
    if diffs:
        raise MemlmError(
            f"checkpoint {path} was saved from a different model config ({'; '.join(diffs)})",
            "build the model with the checkpoint's config (trainer_state.json: model_config)",
        )


def _load_optimizer(file: Path, optimizer: torch.optim.Optimizer) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    saved_kind, kind = metadata.get("optimizer"), type(optimizer).__name__
    if saved_kind is not None and saved_kind != kind:
        raise MemlmError(
            f"the optimizer state in {file} is for {saved_kind}, not {kind}",
            "resume with the optimizer the run was trained with",
        )
    tensors = load_file(str(file))
    groups = json.loads(metadata["param_groups"])
    # JSON turned tuples (betas) into lists; torch's optimizers expect them back as tuples.
    for group in groups:
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)
    numbers = set(json.loads(metadata.get("numbers", "[]")))
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor.item() if name in numbers else tensor
    for name in json.loads(metadata.get("nones", "[]")):
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = None
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise MemlmError(
            f"the optimizer state in {file} does not fit this optimizer: {e}",
            "resume with the same optimizer and model as the checkpoint",
        ) from e


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = False,
) -> dict[str, Any]:
    """Load weights (and optimizer state, and the RNG states when `restore_rng`) from a checkpoint
    folder into `model`/`optimizer`, in place; return its trainer state.

    A model whose config differs from the saved one (besides name and dropout) is refused with
    the differing fields named.
    """
    path = Path(path)
    state = read_trainer_state(path)
    _check_model_config(path, state, model)
    try:
        missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise MemlmError(
            f"cannot load weights from {path / MODEL_FILE}: {e}", "the checkpoint is damaged; use an older one"
        ) from e
    if missing or unexpected:
        raise MemlmError(
            f"checkpoint {path} does not fit the model (missing: {sorted(missing)}, unexpected: {sorted(unexpected)})",
            "build the model with the checkpoint's config",
        )
    if optimizer is not None:
        file = path / OPTIMIZER_FILE
        if not file.is_file():
            raise MemlmError(
                f"checkpoint {path} has no optimizer state", "it was saved for inference only; start a new run from it"
            )
        _load_optimizer(file, optimizer)
    if restore_rng and (path / RNG_FILE).is_file():
        rng = load_file(str(path / RNG_FILE))
        torch.set_rng_state(rng["torch_cpu"])
        cuda_states = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return state
