"""Training checkpoints: safetensors and JSON only, written atomically.

Layout of one checkpoint (`<run>/checkpoints/step-000123/`):

    model.safetensors      the model's weights (a tied weight is stored once)
    optimizer.safetensors  every tensor of the optimizer state, named `state.<i>.<key>`; the
                           param groups (hyperparameters) are JSON in the file's metadata
    rng.safetensors        torch's CPU generator state (`torch_cpu`) and one per GPU (`cuda.<i>`)
    trainer_state.json     step, configs, tokens seen, data position, wall time, ..., and
                           "files": the size and sha256 of every other file

Nothing is pickled, so loading a checkpoint can never run code. A checkpoint is written as
`.step-000123.tmp/`, every file is fsynced, and only then is the folder renamed to its final
name, so a folder called `step-*` is always complete. Leftover `.tmp` folders from a crash are
ignored and removed by the next save; a save that fails (a full or read-only disk) removes its
own and says which checkpoint is still intact. Loading checks every file against its sha256
first; resuming falls back by itself to the newest intact checkpoint (`intact_checkpoint`).

A run on several processes (memlm.train.distributed) writes a sharded checkpoint instead:

    dcp/                   torch.distributed.checkpoint: each rank's shard of the weights and
                           optimizer state (`__<rank>_0.distcp`) plus memlm_dcp.json, the index
                           of the shards (DCP's own index, `.metadata`, is a pickle: never
                           written, never read)
    model.safetensors      the full weights, gathered by rank 0 (so `memlm.load(run)` works)
    rng.safetensors        rank 0's RNG states
    trainer_state.json     as above, plus world_size and strategy

Every rank writes its shard into the same `.tmp` folder; after a barrier rank 0 writes the rest
and renames the folder, so the commit is as atomic as in one process. DCP reshards on load,
so a run saved by N processes resumes on M (1 included), and a single-process checkpoint
resumes on several processes. Nothing of a sharded checkpoint is unpickled either: the index is
JSON (`_JsonIndexWriter` / `_JsonIndexReader`), tensors are read by DCP with
`torch.load(weights_only=True)`, and the few non-tensor values (the optimizer's hyperparameters)
the same way (`_PlainDataLoadPlanner`), where DCP itself would unpickle them without limits.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from memlm.errors import MemlmError, first_line, io_error
from memlm.integrity import SEAL, damaged_files, describe_files, seal, sealed_intact

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
DCP_DIR = "dcp"  # the shards of a checkpoint saved by several processes
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


def refuse_to_overwrite(run_dir: str | Path, resume: bool, can_resume: bool = True) -> Path | None:
    """The run folder's newest checkpoint; a new run (not `resume`) into a folder that has one
    is refused before anything is written (`can_resume`: the command has --resume to offer)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise MemlmError(f"run folder {run_dir} already has checkpoints",
                         "pass --resume to continue it or choose another --out" if can_resume
                         else "choose another --out")
    return ckpt


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
    trainer_state = dict(state)
    trainer_state["step"] = step
    config = getattr(model, "config", None)
    if "model_config" not in trainer_state and hasattr(config, "to_dict"):
        trainer_state["model_config"] = config.to_dict()
    trainer_state.setdefault("saved_at", time.time())
    _check_json(trainer_state)

    folder = Path(run_dir) / CHECKPOINTS
    name = checkpoint_name(step)
    tmp = folder / f".{name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        clean_partial(run_dir)
        tmp.mkdir()
        # save_model drops the duplicate names of shared (tied) tensors and load_model restores them.
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": "memlm-model-1"})
        if optimizer is not None:
            tensors, metadata = _optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata=metadata)
        save_file(_rng_tensors(), str(tmp / RNG_FILE))
        _write_state(tmp, trainer_state)
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        return _commit(tmp, folder / name, run_dir, keep_last)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_failed(e, run_dir, name) from e


def _check_json(trainer_state: dict[str, Any]) -> None:
    """Refuse a state that cannot be written, before anything is (on every rank)."""
    try:
        json.dumps(trainer_state)
    except (TypeError, ValueError) as e:
        raise MemlmError(f"trainer state is not JSON-serializable: {e}") from e


def _write_state(tmp: Path, trainer_state: dict[str, Any]) -> None:
    """trainer_state.json, last, with the size and sha256 of every other file of the checkpoint."""
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    state = seal({**trainer_state, "files": describe_files(tmp, names)})
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def save_failed(e: BaseException, run_dir: str | Path, name: str) -> MemlmError:
    """A failed save as one line, saying which checkpoint the run can still resume from."""
    error = io_error(e, f"save checkpoint {name} in {Path(run_dir) / CHECKPOINTS}")
    previous = latest_checkpoint(run_dir)
    kept = f"{previous.name} is intact" if previous is not None else "there is no earlier checkpoint"
    error.hint = f"{error.hint}; {kept}" if error.hint else kept
    return error


def _commit(tmp: Path, final: Path, run_dir: Path, keep_last: int) -> Path:
    """Rename a fully written, fsynced temp folder to its final name, then prune old ones."""
    if final.exists():  # saving the same step again: move the old one aside first
        old = final.parent / f".{final.name}.old.tmp"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
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
    """The trainer_state.json of a checkpoint folder; CheckpointDamaged when it is not one memlm
    wrote (unreadable, a field of the wrong kind, or content that does not match its seal)."""
    path = Path(path)
    file = path / STATE_FILE
    if not file.is_file():
        raise MemlmError(f"{path} is not a complete checkpoint (no {STATE_FILE})", "point to a step-* folder of a run")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise CheckpointDamaged(path, [f"{STATE_FILE} ({first_line(e)})"]) from None
    if not isinstance(state, dict):
        raise CheckpointDamaged(path, [f"{STATE_FILE} (not a JSON object)"])
    if not sealed_intact(state):
        raise CheckpointDamaged(path, [f"{STATE_FILE} (its {SEAL} differs)"])
    kinds = {"step": int, "model_config": dict, "train_config": dict, "files": dict, "tokens_seen": int,
             "data_position": int, "wall_time": (int, float), "last_loss": (int, float)}
    for key, kind in kinds.items():
        if (key in state or key == "step") and (not isinstance(state.get(key), kind) or isinstance(state[key], bool)):
            raise CheckpointDamaged(path, [f"{STATE_FILE} ('{key}' is {state.get(key)!r})"])
    if state["step"] < 0:
        raise CheckpointDamaged(path, [f"{STATE_FILE} ('step' is {state['step']})"])
    return state


class CheckpointDamaged(MemlmError):
    """A checkpoint whose files differ from the sizes and sha256 its trainer_state.json recorded."""

    def __init__(self, path: Path, problems: list[str]):
        older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
        hint = (f"the checkpoint before it is {older[-1].name}: `memlm train --resume` falls back to the newest "
                "intact one by itself; to load it elsewhere, move this one away" if older
                else "there is no earlier checkpoint: start the run again")
        super().__init__(f"checkpoint {path} is damaged: {'; '.join(problems)}", hint)
        self.path = path


def verify_checkpoint(path: str | Path, names: list[str] | None = None) -> dict[str, Any]:
    """The trainer state of a checkpoint whose files (or only `names` of them) are as recorded;
    raises CheckpointDamaged naming the files that are not. Checkpoints of memlm versions that
    recorded no sha256 pass unchecked."""
    path = Path(path)
    state = read_trainer_state(path)
    recorded = state.get("files")
    if recorded is not None:
        if names is not None:
            recorded = {n: recorded[n] for n in names if n in recorded}
        problems = damaged_files(path, recorded)
        if problems:
            raise CheckpointDamaged(path, problems)
    return state


def intact_checkpoint(run_dir: str | Path, on_damaged: Any = None) -> Path | None:
    """The newest checkpoint of a run whose files are intact (None when the run has none yet).

    Damaged ones newer than it are renamed `step-N.damaged` (kept for a look, out of the way of
    resuming and of pruning), each reported to `on_damaged(error)`. When none is intact,
    nothing is renamed and the newest one's CheckpointDamaged is raised.
    """
    found = list_checkpoints(run_dir)
    damaged: list[CheckpointDamaged] = []
    for ckpt in reversed(found):
        try:
            verify_checkpoint(ckpt)
        except CheckpointDamaged as e:
            damaged.append(e)
            continue
        for e in damaged:
            try:
                os.replace(e.path, e.path.with_name(e.path.name + ".damaged"))
            except OSError as err:
                raise io_error(err, f"move the damaged checkpoint {e.path} aside") from err
            if on_damaged is not None:
                on_damaged(e)
        return ckpt
    if damaged:
        raise damaged[0]
    return None


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
    saved = type(config).from_dict(saved).to_dict()  # a field added since the save has its default
    diffs = config_differences(saved, config.to_dict(), ignore=_IGNORED_MODEL_FIELDS)
    if diffs:
        raise MemlmError(
            f"checkpoint {path} was saved from a different model config ({'; '.join(diffs)})",
            "build the model with the checkpoint's config (trainer_state.json: model_config)",
        )


def _read_optimizer(file: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state saved in `file`, in torch's layout (state keyed by parameter index)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    saved_kind, kind = metadata.get("optimizer"), type(optimizer).__name__
    if saved_kind is not None and saved_kind != kind:
        raise MemlmError(
            f"the optimizer state in {file} is for {saved_kind}, not {kind}",
            "resume with the optimizer the run was trained with",
        )
    # Copies, not the file's memory map: the state lives on in the optimizer, and a mapped file
    # stays on the disk after the checkpoint is pruned (its space not freed, the disk busy).
    tensors = {name: t.clone() for name, t in load_file(str(file)).items()}
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
    return {"state": state, "param_groups": groups}


def _load_optimizer(file: Path, optimizer: torch.optim.Optimizer) -> None:
    try:
        optimizer.load_state_dict(_read_optimizer(file, optimizer))
    except (ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise MemlmError(
            f"the optimizer state in {file} does not fit this optimizer: {first_line(e)}",
            "resume with the same optimizer and model as the checkpoint",
        ) from e


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Load weights (and optimizer state, and the RNG states when `restore_rng`) from a checkpoint
    folder into `model`/`optimizer`, in place; return its trainer state.

    Its files are checked against their recorded sha256 first (`verify=False`: the caller has
    just done so). A model whose config differs from the saved one (besides name and dropout)
    is refused with the differing fields named.
    """
    path = Path(path)
    state = verify_checkpoint(path) if verify else read_trainer_state(path)
    _check_model_config(path, state, model)
    try:
        missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise MemlmError(
            f"cannot load weights from {path / MODEL_FILE}: {first_line(e)}", "the checkpoint is damaged; use an older one"
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
    if restore_rng:
        _restore_rng(path)
    return state


def _restore_rng(path: Path) -> None:
    if not (path / RNG_FILE).is_file():
        return
    try:
        rng = load_file(str(path / RNG_FILE))
        torch.set_rng_state(rng["torch_cpu"])
        cuda_states = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    except (SafetensorError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise MemlmError(f"cannot restore the random state from {path / RNG_FILE}: {first_line(e)}",
                         "the checkpoint is damaged; use an older one") from None


# ------------------------------------------------------------- sharded (several processes)


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint folder was saved by several processes (it holds DCP shards)."""
    return (Path(path) / DCP_DIR).is_dir()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` from every process at once; every rank must call it.

    `model` is the FSDP-sharded model or, under DDP, the plain module inside the wrapper.
    Rank 0 prepares `.step-N.tmp/`; every rank writes its shard into it (DCP, fsynced); the full
    weights are gathered to rank 0, which writes model.safetensors, the RNG states and
    trainer_state.json, fsyncs, renames the folder to `step-N` and prunes old checkpoints. A
    last barrier keeps every rank here until the checkpoint is committed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    from torch.distributed.checkpoint import CheckpointException

    from memlm.train.dcp_storage import JsonIndexWriter, failure_of

    if keep_last < 1:
        raise MemlmError(f"keep_last must be at least 1, got {keep_last}")
    trainer_state = dict(state)
    trainer_state["step"] = step
    config = getattr(model, "config", None)
    if "model_config" not in trainer_state and hasattr(config, "to_dict"):
        trainer_state["model_config"] = config.to_dict()
    if optimizer is not None:
        trainer_state["optimizer"] = type(optimizer).__name__
    trainer_state.setdefault("saved_at", time.time())
    _check_json(trainer_state)  # on every rank, before any collective: a failure must not leave the others waiting

    main = _rank() == 0
    folder = Path(run_dir) / CHECKPOINTS
    name = checkpoint_name(step)
    tmp = folder / f".{name}.tmp"
    failure: BaseException | None = None

    def give_up_together() -> None:
        """Every rank learns whether rank 0 failed (a barrier that carries the answer): on a
        failure every rank raises the same error, none is left waiting for the others."""
        if _any_rank(failure is not None):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise save_failed(failure or OSError("rank 0 could not write its part"), run_dir, name)

    if main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            clean_partial(run_dir)
            tmp.mkdir()
        except OSError as e:
            failure = e
    give_up_together()  # the folder exists (and no stale one) before anyone writes into it

    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        shards = {"model": model_sd, "optim": optim_sd}
    else:
        shards = {"model": get_model_state_dict(model)}
    # Returns on every rank only after rank 0 has written the index, which it does once every
    # rank reported its shard written, so the shards are complete here. A rank's failure comes
    # out on every rank (DCP gathers them).
    try:
        with warnings.catch_warnings():  # DCP warns that no process group means one process: we know
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(shards, storage_writer=JsonIndexWriter(tmp / DCP_DIR))
    except CheckpointException as e:
        failure = failure_of(e)
    del shards
    give_up_together()
    # A collective too; with cpu_offload only rank 0 receives the tensors (in CPU memory).
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    final = folder / name
    if main:
        try:
            if getattr(config, "tied_embeddings", False):  # a shared tensor is stored once
                full.pop("lm_head.weight", None)
            save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / MODEL_FILE),
                      metadata={"format": "memlm-model-1"})
            save_file(_rng_tensors(), str(tmp / RNG_FILE))
            _write_state(tmp, trainer_state)  # the shards' sha256 too: every rank has written its own
            for f in tmp.iterdir():
                if f.is_file():
                    _fsync_file(f)
            _fsync_dir(tmp)
            _commit(tmp, final, run_dir, keep_last)
        except (OSError, SafetensorError) as e:
            failure = e
    del full
    give_up_together()  # and no rank goes on before the checkpoint is committed
    return final


def _any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank (just `flag` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)])  # a CPU tensor: gloo takes it, beside NCCL too
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _optimizer_by_name(file: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A single-process optimizer file in the layout of torch.distributed's state-dict helpers:
    state and param groups keyed by parameter name instead of position.

    Position i is the i-th parameter over the optimizer's groups, which `build_optimizer` makes
    in the same order for the same model, wrapped or not.
    """
    saved = _read_optimizer(file, optimizer)
    names = {p: n for n, p in model.named_parameters()}  # a tied weight has one name here
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    if sum(len(g["params"]) for g in saved["param_groups"]) != len(order):
        raise MemlmError(
            f"the optimizer state in {file} does not fit this optimizer",
            "resume with the same optimizer and model as the checkpoint",
        )
    return {
        "state": {order[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def load_sharded_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint of either format into a sharded (FSDP), replicated (the module inside
    DDP) or plain model, in place; return its trainer state.

    With a process group running, every rank must call it. A sharded checkpoint is read through
    DCP, which gives each rank its part whatever the world size that saved it (without a process
    group it loads everything into this one process). A single-process checkpoint is read whole
    by every rank and split with `set_state_dict(full_state_dict=True)`.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    from torch.distributed.checkpoint import CheckpointException

    from memlm.train.dcp_storage import JsonIndexReader, PlainDataLoadPlanner, failure_of

    path = Path(path)
    state = verify_checkpoint(path) if verify else read_trainer_state(path)
    _check_model_config(path, state, model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise MemlmError(
            f"cannot load {path} into a {type(optimizer).__name__} through torch.distributed",
            "this optimizer setup (per-parameter stepping: fused_backward or pure bf16 weights) only "
            "resumes from single-process checkpoints in one process; use precision fp32 or bf16-autocast",
        )
    saved_kind = state.get("optimizer")
    if optimizer is not None and saved_kind is not None and saved_kind != type(optimizer).__name__:
        raise MemlmError(
            f"the optimizer state in {path} is for {saved_kind}, not {type(optimizer).__name__}",
            "resume with the optimizer the run was trained with",
        )
    try:
        if is_sharded(path):
            if optimizer is not None:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                shards = {"model": model_sd, "optim": optim_sd}
            else:
                shards = {"model": get_model_state_dict(model)}
            no_dist = not (dist.is_available() and dist.is_initialized())
            reader = JsonIndexReader(path / DCP_DIR)
            with warnings.catch_warnings():  # DCP warns that no process group means one process: we know
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(shards, storage_reader=reader, planner=PlainDataLoadPlanner(), no_dist=no_dist)
            if optimizer is not None:
                set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optim"])
            else:
                set_model_state_dict(model, shards["model"])
        else:
            if optimizer is not None and not (path / OPTIMIZER_FILE).is_file():
                raise MemlmError(f"checkpoint {path} has no optimizer state",
                                 "it was saved for inference only; start a new run from it")
            full = load_file(str(path / MODEL_FILE))
            if getattr(getattr(model, "config", None), "tied_embeddings", False):
                # safetensors kept one of the two names; torch.distributed expects the first one
                shared = full.pop("lm_head.weight", None)
                full.setdefault("tok_emb.weight", shared)
            options = StateDictOptions(full_state_dict=True)
            if optimizer is not None:
                set_state_dict(model, optimizer, model_state_dict=full,
                               optim_state_dict=_optimizer_by_name(path / OPTIMIZER_FILE, model, optimizer),
                               options=options)
            else:
                set_model_state_dict(model, full, options=options)
    except MemlmError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError, pickle.UnpicklingError,
            CheckpointException) as e:
        raise MemlmError(
            f"cannot load checkpoint {path}: {first_line(failure_of(e))}",
            "resume with the model and optimizer it was saved with; if it is damaged, use an older one",
        ) from e
    if restore_rng:
        _restore_rng(path)
    return state


def consolidate(path: str | Path, out: str | Path | None = None) -> nn.Module:
    """The full model (of its config's kind, in eval mode, on CPU) of a checkpoint folder, or of a run
    folder's latest checkpoint, read in this one process: a sharded checkpoint's DCP shards are
    put together without any process group. With `out`, also write it as a memlm safetensors
    file, which `memlm.loading`, the HF and the GGUF exporters read.
    """
    from memlm.config import ModelConfig
    from memlm.model import build_model

    path = Path(path)
    if not (path / STATE_FILE).is_file() and (path / CHECKPOINTS).is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise MemlmError(f"run folder {path} has no checkpoint yet", "train it first (memlm train)")
        path = ckpt
    state = read_trainer_state(path)
    if "model_config" not in state:
        raise MemlmError(f"{path / STATE_FILE} has no model_config", "point to a checkpoint written by memlm train")
    model = build_model(ModelConfig.from_dict(state["model_config"]))
    if is_sharded(path):
        load_sharded_checkpoint(path, model)
    else:
        load_checkpoint(path, model)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, str(out), metadata={"format": "memlm-model-1"})
    return model.eval()
