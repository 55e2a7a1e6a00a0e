"""Shared by every benchmark: the machine, the versions, the commit, and writing results.

Each bench writes bench/results/<name>-<YYYY-MM-DD>.json and .md (see shared/BENCHMARKS.md).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for pkg in ("numpy", "tokenizers", "safetensors", "gguf"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # a missing optional package is simply not recorded
            pass
    return info


def load_average() -> str:
    """The 1/5/15-minute load averages ("unknown" off Linux): how busy the cores were."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def corpus_hash() -> str:
    from memlm.data import default_corpus_text

    return hashlib.sha256(default_corpus_text().encode()).hexdigest()


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])

    def cell(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                  columns: list[str] | None = None, notes: str = "", day: str | None = None) -> tuple[Path, Path]:
    """Write the JSON (everything) and the markdown (a dated table with the machine).

    `day` (YYYY-MM-DD, default today): the date of the files, e.g. to re-render an earlier run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    day = day or dt.date.today().isoformat()
    meta = {"name": name, "date": day, "commit": git_commit(), "machine": machine(),
            "corpus_sha256": corpus_hash(), **(extra or {})}
    json_path = RESULTS / f"{name}-{day}.json"
    json_path.write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str) + "\n")
    m = meta["machine"]
    header = (f"# {name} ({day})\n\nMachine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; "
              f"torch {m['torch']}, Python {m['python']}; commit {meta['commit']}.\n\n")
    md_path = RESULTS / f"{name}-{day}.md"
    md_path.write_text(header + (notes + "\n\n" if notes else "") + markdown_table(rows, columns) + "\n")
    print(markdown_table(rows, columns))
    return json_path, md_path


LAUNCHER = Path(__file__).resolve().parent / "launch.py"


class PeakPopen(subprocess.Popen):
    """Popen whose `peak_bytes` (after it has been waited for) is the command's own peak resident
    memory from start to exit, its waited-for children included: started through bench/launch.py,
    so the figure does not carry this process's peak (see there why a plain wait4 would)."""

    def __init__(self, args: list[str], **kwargs: Any):
        fd, self._peak_file = tempfile.mkstemp(prefix="memlm-peak-")
        os.close(fd)
        self._peak: int | None = None
        super().__init__([sys.executable, str(LAUNCHER), self._peak_file, *args], **kwargs)

    @property
    def peak_bytes(self) -> int | None:
        """Bytes, read once the command has exited (None before, or if the launcher failed)."""
        if self._peak is None and self.returncode is not None:
            path = Path(self._peak_file)
            try:
                self._peak = int(path.read_text()) * 1024
            except (OSError, ValueError):
                return None
            path.unlink(missing_ok=True)
        return self._peak
