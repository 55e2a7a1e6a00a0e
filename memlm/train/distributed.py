"""Training on several processes (and machines) with PyTorch's own distributed engine.

`memlm train --nproc N` starts `torchrun` (torch.distributed.run) with N processes on this
machine; for several machines the user runs torchrun on each. Either way every process runs
the one training loop (memlm.train.loop.train), which asks a `Distributed` object, built by
`setup()` from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), for the few things that
differ from one process:

* the model: DDP (a full copy per rank, gradients all-reduced) or FSDP2 (`fully_shard` on each
  transformer block, then on the root: weights, gradients and optimizer states split over the
  ranks, each block's weights gathered only while it runs);
* the data: `micro_batch` is the global micro-batch, rank r takes rows [r*b, (r+1)*b) of it
  (memlm.data.Batches), so the run does the same optimizer steps whatever the world size;
* the numbers: losses are averaged over the ranks, peaks are their maximum;
* checkpoints: sharded with torch.distributed.checkpoint, committed atomically by rank 0
  (memlm.train.checkpoint.save_sharded_checkpoint);
* output: rank 0 alone prints and writes the run folder's files.

Without torchrun's environment `setup()` returns an inactive `Distributed` whose methods do
what one process needs, so the loop has no `if distributed` branches of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from memlm.config import TrainConfig
from memlm.errors import MemlmError
from memlm.train.checkpoint import (
    is_sharded,
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)

T = TypeVar("T")

# A test hook: "RANK:STEP" makes that rank die (os._exit(1)) at the start of that step, to
# check that a lost process fails the whole job instead of hanging it.
FAULT_ENV = "MEMLM_FAULT_AT"
# Optimizers that work on FSDP's sharded (DTensor) parameters.
FSDP_OPTIMIZERS = ("adamw", "sgd")

_created_group = False  # whether setup() started the process group (then shutdown() ends it)


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun job (torchrun sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process on its own."""
    return os.environ.get("RANK", "0") == "0"


def check_config(cfg: TrainConfig, world_size: int, device: torch.device) -> None:
    """Refuse settings that cannot work under torchrun with `world_size` processes, before
    anything starts (the CLI calls it before launching, each rank again in `setup`)."""
    if cfg.micro_batch % world_size:
        raise MemlmError(
            f"micro_batch {cfg.micro_batch} is not divisible by the {world_size} processes",
            "micro_batch is the global micro-batch, split evenly over the processes: make it a multiple of "
            f"{world_size}",
        )
    uneven = [b for b in cfg.batch_ramp if b % world_size]
    if uneven:
        raise MemlmError(
            f"batch_ramp sizes {uneven} are not divisible by the {world_size} processes",
            f"every micro-batch size is split over the processes: use multiples of {world_size}",
        )
    if cfg.fused_backward:
        raise MemlmError(
            "fused_backward cannot be combined with several processes",
            "it steps each weight as soon as its local gradient exists, before the processes have "
            "averaged it; use strategy = 'fsdp' to save gradient memory instead",
        )
    if cfg.strategy == "ddp" and cfg.precision == "bf16":
        raise MemlmError(
            "precision 'bf16' (pure bf16 weights) is not supported with strategy 'ddp'",
            "use strategy = 'fsdp' (bf16 compute over fp32 sharded weights) or precision = 'bf16-autocast'",
        )
    if cfg.strategy == "fsdp" and cfg.optimizer not in FSDP_OPTIMIZERS:
        raise MemlmError(
            f"optimizer '{cfg.optimizer}' does not work on FSDP's sharded weights",
            f"use one of {', '.join(FSDP_OPTIMIZERS)} with strategy 'fsdp', or strategy 'ddp'",
        )
    if cfg.cpu_offload and cfg.strategy != "fsdp":
        raise MemlmError("cpu_offload needs strategy 'fsdp'", "set strategy = 'fsdp' or cpu_offload = false")
    if cfg.cpu_offload and device.type != "cuda":
        raise MemlmError(
            "cpu_offload only makes sense on a GPU",
            "on CPU the shards already live in CPU memory: set cpu_offload = false",
        )
    if cfg.dist_timeout_s < 1:
        raise MemlmError(f"dist_timeout_s must be at least 1, got {cfg.dist_timeout_s}")


@dataclass
class Distributed:
    """This process's place in the job, and the operations that depend on it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "ddp"
    precision: str = "fp32"
    cpu_offload: bool = False
    active: bool = False  # False: one process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- the model

    def model_settings(self, cfg: TrainConfig) -> TrainConfig:
        """The settings to prepare the model with before `wrap` (apply_train_settings).

        Under FSDP, precision "bf16" is FSDP's mixed precision (see `wrap`): the weights must
        stay fp32 until then, and the optimizer is then a plain fp32 one.
        """
        if self.active and self.strategy == "fsdp" and cfg.precision == "bf16":
            return dataclasses.replace(cfg, precision="fp32")
        return cfg

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard or replicate `model`; return what to call forward on.

        FSDP shards `model` in place (its parameters become DTensor shards) and returns it; DDP
        returns a wrapper around it. Build the optimizer from `model` afterwards either way.
        """
        if not self.active:
            return model
        if self.strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Gradients as views into DDP's all-reduce buckets: no second copy of every gradient.
            # Buffers are broadcast once, at the start, not before every forward: memlm's (position
            # tables, a frozen base's quantized weights) never change, and a QLoRA base's would be
            # tens of MB sent every micro-batch.
            return _DDP(_CallMethod(model), device_ids=ids, gradient_as_bucket_view=True, forward_sync_buffers=False)
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        # precision "bf16" under FSDP: the sharded master weights and optimizer stay fp32, blocks
        # are gathered and computed in bf16, gradients are reduced in fp32.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.precision == "bf16" else MixedPrecisionPolicy())
        offload = CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()
        for block in model.blocks:  # one all-gather per block: only one block is ever whole
            fully_shard(block, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mp_policy=mp, offload_policy=offload)  # embeddings, final norm, head
        # The chunked loss calls hidden_states() instead of forward(): FSDP must gather for it too.
        register_fsdp_forward_method(model, "hidden_states")
        return model

    def sync_gradients(self, net: nn.Module, now: bool) -> None:
        """Under DDP, all-reduce gradients only on the last micro-batch of a step (`now`).

        FSDP keeps reducing every micro-batch: skipping would hold full, unsharded gradients,
        which is the memory FSDP is there to save.
        """
        if self.active and self.strategy == "ddp":
            net.require_backward_grad_sync = now  # what DDP.no_sync() toggles

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the global gradient norm (over every rank's shards) and return it."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        # With FSDP the norm is a replicated DTensor; .item() reads the local copy, as on one process.
        return norm.item()

    # ---- numbers and coordination

    def _reduce(self, value: float, op: dist.ReduceOp) -> float:
        # A CPU tensor: gloo takes it, and with "cpu:gloo,cuda:nccl" it stays off the GPU stream.
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return t.item()

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (every rank gets it)."""
        if not self.active:
            return value
        return self._reduce(value, dist.ReduceOp.SUM) / self.world_size

    def sum(self, value: float) -> float:
        """The sum of `value` over the ranks (every rank gets it)."""
        if not self.active:
            return value
        return self._reduce(value, dist.ReduceOp.SUM)

    def token_share(self, count: int) -> float:
        """This rank's share of the counted targets, times the world size: count * W / total.
        A rank's loss is a mean over its own targets, and DDP/FSDP average the ranks' gradients;
        scaled by this, the average is the mean over every target of the micro-batch, as one
        process computes it, even when the ranks count different numbers (padded pairs, prompt
        tokens left out of the loss). 1.0 on one process, and wherever the counts are equal."""
        if not self.active:
            return 1.0
        total = self._reduce(float(count), dist.ReduceOp.SUM)
        return count * self.world_size / total if total else 1.0

    def max(self, value: int) -> int:
        """The maximum of `value` over the ranks (every rank gets it)."""
        if not self.active:
            return value
        return int(self._reduce(float(value), dist.ReduceOp.MAX))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a cache), then the others (which reuse it)."""
        if self.active and not self.is_main:
            self.barrier()
        yield
        if self.active and self.is_main:
            self.barrier()

    def from_main(self, make: Callable[[], T]) -> T:
        """`make()` on rank 0, its result sent to every rank (e.g. a freshly trained tokenizer,
        so that all ranks use the very same one). Pickled in memory between our own processes."""
        if not self.active:
            return make()
        box = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def fault_point(self, step: int) -> None:
        """Die here when the MEMLM_FAULT_AT test hook names this rank and step."""
        target = os.environ.get(FAULT_ENV)
        if target and target == f"{self.rank}:{step}":
            print(f"[rank {self.rank}] {FAULT_ENV}: exiting at step {step}", file=sys.stderr, flush=True)
            os._exit(1)

    # ---- checkpoints

    def save_checkpoint(self, run_dir: str | Path, step: int, model: nn.Module, optimizer: Any,
                        state: dict[str, Any], keep_last: int) -> Path:
        """Single-process format on one process, sharded (every rank calls it) on several."""
        if not self.active:
            return save_checkpoint(run_dir, step, model, optimizer, state, keep_last)
        state = {**state, "world_size": self.world_size, "strategy": self.strategy}
        return save_sharded_checkpoint(run_dir, step, model, optimizer, state, keep_last)

    def load_checkpoint(self, path: str | Path, model: nn.Module, optimizer: Any, verify: bool = True) -> dict[str, Any]:
        """Either format, into this process's model and optimizer, RNG state included."""
        if not self.active and not is_sharded(path):
            return load_checkpoint(path, model, optimizer, restore_rng=True, verify=verify)
        return load_sharded_checkpoint(path, model, optimizer, restore_rng=True, verify=verify)


class _CallMethod(nn.Module):
    """Runs a named method of `model` from forward(): DDP only hooks forward(), and the chunked
    loss (memlm.train.loss) calls hidden_states() and then the head itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, method: str = "forward", **kwargs: Any) -> Any:
        return getattr(self.model, method)(*args, **kwargs)


class _DDP(DistributedDataParallel):
    """DDP that also offers `hidden_states` and `lm_head`, so compute_loss can chunk the loss.

    The head then runs outside DDP's forward, which is fine: DDP's reducer hooks every
    parameter's gradient, wherever the parameter was used.
    """

    @property
    def lm_head(self) -> nn.Module:
        return self.module.model.lm_head

    def hidden_states(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self(*args, method="hidden_states", **kwargs)


def setup(cfg: TrainConfig, device: torch.device) -> Distributed:
    """This process's `Distributed`: joins the process group when started by torchrun.

    The backend follows the device: gloo on CPU, NCCL on CUDA (with gloo beside it for CPU
    tensors). On CUDA each rank takes the GPU numbered by its LOCAL_RANK.
    """
    if not launched_by_torchrun():
        if cfg.nproc > 1 or cfg.cpu_offload:
            raise MemlmError(
                f"nproc = {cfg.nproc} needs one process per rank" if cfg.nproc > 1
                else "cpu_offload works through FSDP, which runs under torchrun",
                "run `memlm train` (it starts torchrun for nproc > 1 or cpu_offload) or launch with torchrun "
                "yourself; nproc = 1 without cpu_offload trains in this process",
            )
        return Distributed(device=device, strategy=cfg.strategy, precision=cfg.precision)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    check_config(cfg, world_size, device)
    if not dist.is_initialized():
        global _created_group
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist_timeout_s),
                                device_id=device if device.type == "cuda" else None)
        _created_group = True
        atexit.register(shutdown, wait_for_peers=False)  # after an error: end without waiting on the others
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       strategy=cfg.strategy, precision=cfg.precision, cpu_offload=cfg.cpu_offload, active=True)


def shutdown(wait_for_peers: bool = True) -> None:
    """End the process group setup() started (a no-op otherwise, and when called twice).

    A rank that tears its gloo group down while a peer still talks to it, or leaves the group's
    C++ threads to interpreter exit (FSDP's device mesh holds a reference), can abort with
    "terminate called without an active exception". So on the normal path every rank first meets
    the others, and the group's last references are collected while the interpreter is alive.
    """
    global _created_group
    if _created_group and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()
    _created_group = False


def local_state_bytes(model: nn.Module, optimizer: Any) -> int:
    """Bytes of weights, gradients and optimizer states this process holds: for FSDP's DTensors
    only the local shard counts. Exact (it adds up tensor sizes), unlike a peak-RSS reading."""
    from torch.distributed.tensor import DTensor

    def nbytes(t: torch.Tensor) -> int:
        if isinstance(t, DTensor):
            t = t.to_local()
        return t.numel() * t.element_size()

    total = 0
    for p in model.parameters():  # a tied weight is yielded once
        total += nbytes(p) + (nbytes(p.grad) if p.grad is not None else 0)
    for entry in optimizer.state_dict()["state"].values():
        total += sum(nbytes(v) for v in entry.values() if isinstance(v, torch.Tensor))
    return total


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The command that runs `memlm <args>` as `nproc` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "memlm", *args]

