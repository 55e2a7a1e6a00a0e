"""Fault injection on real `memlm train` processes, shared by tests/faults (a few faults) and
bench/faults.py (many, counted).

A `TinyRun` is a small training run (a checkpoint every step, so a random moment often falls in
a save). `run_with_faults` starts it as `memlm train`, injects one fault per process life at a
random moment (SIGKILL, SIGTERM, SIGINT, the disk turned read-only, the disk full), checks what
the process did about it, resumes, and at the end compares the final weights, optimizer state
and every logged loss with the same run done in one go, bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from memlm.train.checkpoint import checkpoint_name, latest_checkpoint, verify_checkpoint
from memlm.train.loop import METRICS_FILE

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 240  # a bound for one tiny process on a busy machine, never reached when things work
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
DISK_FAULTS = ("read-only", "full")


@dataclass
class TinyRun:
    corpus: Path
    tokenizer: Path
    steps: int = 60

    def sets(self) -> dict[str, Any]:
        return {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.n_kv_heads": 1,
                "model.ffn_hidden": 64, "model.block_size": 32, "train.tokenizer": json.dumps(str(self.tokenizer)),
                "train.threads": 1, "train.eval_every": 0, "train.eval_batches": 1, "train.save_every": 1,
                "train.keep_last": 2, "train.log_every": 1, "train.warmup_steps": 5}

    def flags(self) -> dict[str, Any]:
        return {"corpus": str(self.corpus), "steps": self.steps, "micro_batch": 2, "seq_len": 16, "lr": 3e-3,
                "device": "cpu"}

    def args(self, out: Path, resume: bool = False) -> list[str]:
        args = ["train", "--out", str(out), *[f"--{k.replace('_', '-')}={v}" for k, v in self.flags().items()]]
        for key, value in self.sets().items():
            args += ["--set", f"{key}={value}"]
        return args + (["--resume"] if resume else [])

    def configs(self, out: Path):
        """(model config, train config) exactly as `memlm train` resolves `args(out)`."""
        from memlm.cli import _parse_set, resolve_configs

        overrides = _parse_set([f"{k}={v}" for k, v in self.sets().items()])
        overrides["train"].update(self.flags(), out_dir=str(out))
        return resolve_configs(None, "tiny", overrides)


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "memlm", *args], cwd=log.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))


def last_step(run: Path) -> int:
    """The last step the run logged (0 before any)."""
    try:
        text = (run / METRICS_FILE).read_text(errors="replace")
    except FileNotFoundError:
        return 0
    steps = []
    for line in text.splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # the line being written
    return max(steps, default=0)


def partial_saves(run: Path) -> list[str]:
    folder = run / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.is_dir() else []


def wait_for_progress(proc: subprocess.Popen, run: Path, past: int) -> bool:
    """Wait until the run logs a step after `past`; False if the process ended first."""
    deadline = time.monotonic() + WAIT_S
    while last_step(run) <= past:
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{run}: no progress past step {past} in {WAIT_S} s")
        time.sleep(0.005)
    return True


@dataclass
class Disk:
    """A tmpfs the run lives on, to turn read-only or fill (mounting needs root)."""

    mount_point: Path

    def remount(self, mode: str, writer: subprocess.Popen | None = None) -> None:
        """Remount read-only ("ro") or writable ("rw"). The kernel refuses "ro" while a file is
        open for writing, so a running `writer` is stopped (SIGSTOP) for each try and let go
        again until one falls between two of its writes: the next write then fails."""
        for _ in range(500):
            if writer is not None:
                writer.send_signal(signal.SIGSTOP)
            done = subprocess.run(["mount", "-o", f"remount,{mode}", str(self.mount_point)], capture_output=True)
            if writer is not None:
                writer.send_signal(signal.SIGCONT)
            if done.returncode == 0:
                return
            time.sleep(0.002)
        raise AssertionError(f"could not remount {self.mount_point} {mode}")

    def fill(self) -> None:
        st = os.statvfs(self.mount_point)
        with open(self.mount_point / "filler", "wb") as f:
            try:
                f.write(b"\0" * (st.f_bavail * st.f_frsize))
            except OSError:
                pass  # full: what was wanted

    def free(self) -> None:
        (self.mount_point / "filler").unlink(missing_ok=True)


def mount_disk(where: Path, size: str = "16m") -> Disk | None:
    """A tmpfs at `where`, or None where this process may not mount one."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return Disk(where) if done.returncode == 0 else None


def unmount(disk: Disk) -> None:
    subprocess.run(["umount", "-l", str(disk.mount_point)], capture_output=True)


@dataclass
class FaultLog:
    faults: list[dict[str, Any]] = field(default_factory=list)

    def count(self, **match: Any) -> int:
        return sum(all(f.get(k) == v for k, v in match.items()) for f in self.faults)


def _one_line(log: Path, label: str) -> str:
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith(f"{label}: ")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


def inject(spec: TinyRun, run: Path, fault: str, rng: random.Random, log: Path, disk: Disk | None = None,
           max_delay_s: float = 0.08) -> dict[str, Any]:
    """One process life: start (or resume) the run, let it train a step, wait a random moment,
    inject `fault`, and check the process's answer. Returns what happened."""
    before = last_step(run)
    proc = start(spec.args(run, resume=before > 0 or latest_checkpoint(run) is not None), log)
    if not wait_for_progress(proc, run, before):
        raise AssertionError(f"{fault}: the run ended before the fault\n{log.read_text()[-3000:]}")
    time.sleep(rng.uniform(0, max_delay_s))
    record: dict[str, Any] = {"fault": fault, "at_step": last_step(run)}
    if fault in SIGNALS:
        proc.send_signal(SIGNALS[fault])
    elif fault == "read-only":
        disk.remount("ro", writer=proc)
    else:
        disk.fill()
    status = proc.wait(timeout=WAIT_S)
    record["status"] = status
    record["in_a_save"] = bool(partial_saves(run))
    if status == 0 and "done: step" in log.read_text():
        # The run reached its end before the fault landed (a busy machine, or a remount the kernel
        # kept refusing while files were open): nothing to check but that the end is intact.
        if fault == "read-only":
            disk.remount("rw")
        elif fault == "full":
            disk.free()
        record["finished_first"] = True
    elif fault == "SIGKILL":
        assert status == -signal.SIGKILL, (status, log.read_text()[-3000:])
    elif fault in SIGNALS:
        assert status == 128 + SIGNALS[fault], (status, log.read_text()[-3000:])
        line = _one_line(log, "stopped")
        saved = latest_checkpoint(run)
        assert str(saved) in line and saved.name == checkpoint_name(last_step(run)), (line, last_step(run))
    else:  # the disk failed under it: one line, exit 2 (or, between two writes, it may still be writing)
        assert status == 2, (status, log.read_text()[-3000:])
        line = _one_line(log, "error")
        assert ("Read-only file system" if fault == "read-only" else "No space left on device") in line, line
        if fault == "read-only":
            disk.remount("rw")
        else:
            disk.free()
    ckpt = latest_checkpoint(run)
    if ckpt is not None:
        verify_checkpoint(ckpt)  # what was committed is intact, whatever the fault
    return record


def finish(spec: TinyRun, run: Path, log: Path) -> None:
    """Resume the run to its end."""
    proc = start(spec.args(run, resume=True), log)
    status = proc.wait(timeout=WAIT_S)
    assert status == 0, log.read_text()[-3000:]
    assert partial_saves(run) == []  # the saves after the faults cleaned up after them


def reference(spec: TinyRun, out: Path) -> Path:
    """The same run in one go, in this process, in the run folder `out` (returned)."""
    from memlm.train import train

    model_cfg, train_cfg = spec.configs(out)
    train(train_cfg, model_cfg)
    return out


def assert_same_run(run: Path, ref: Path) -> None:
    """Bit for bit: the final weights and optimizer state, and the loss of every step."""
    got, want = latest_checkpoint(run), latest_checkpoint(ref)
    assert got.name == want.name, (got, want)
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(got / name), load_file(want / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"

    def losses(folder: Path) -> dict[int, float]:
        lines = (folder / METRICS_FILE).read_text().splitlines()
        return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}

    assert losses(run) == losses(ref)
