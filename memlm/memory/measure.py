"""Measure the peak memory of a block of work.

CPU: the process's resident set size (RSS) from /proc/self/status. Linux keeps a high-water
mark (VmHWM) that we reset to the current RSS by writing "5" to /proc/self/clear_refs, so the
peak of a block is exact and costs nothing. Where that reset is refused, a background thread
polls VmRSS every millisecond instead (it can miss a spike shorter than that).

CUDA: PyTorch's caching allocator counters (allocated = live tensors, reserved = what the
allocator holds from the driver, which is what the GPU really has to provide).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import torch

from memlm.errors import MemlmError

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status, in KiB; None off Linux."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def current_rss_bytes() -> int:
    """Resident set size of this process now (0 where the platform does not say)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return 0


def peak_rss_bytes() -> int:
    """Highest RSS of this process since it started or since the last high-water-mark reset."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource  # not on Windows; macOS reports bytes, Linux KiB

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not let us.

    The peak before the reset is kept (`process_peak_rss_bytes` still sees it): a block's peak
    is measured by resetting, but the whole process's peak from start to exit is the promise a
    memory budget makes, and no reset may hide it.
    """
    global _peak_before_reset
    _peak_before_reset = max(_peak_before_reset, peak_rss_bytes())
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_peak_before_reset = 0


def process_peak_rss_bytes() -> int:
    """The whole process's peak resident memory since it started, across every VmHWM reset."""
    return max(_peak_before_reset, peak_rss_bytes())


def note_start() -> None:
    """Remember this process's resident memory now, as the memlm program starts (memlm.cli.run):
    in this process it is `program_start_rss_bytes`, and it is kept for the processes after it."""
    global _start_rss
    if _start_rss is None:
        _start_rss = current_rss_bytes()


_start_rss: int | None = None

# What the memlm program holds as it starts (torch and memlm imported, nothing run) differs by
# machine and venv with the share of torch's libraries they map, and a command's runtime differs
# with it (memlm.memory.estimate.runtime_bytes). It moves on one machine too, with the state of
# those libraries' pages: the same checkout started at 291 MiB just after its venv was installed
# and at 231 MiB three hours later, on one boot. So the program takes its own start, and keeps it
# under memlm's cache for the processes after it (a library user's or a test's), which read it
# while it is recent and otherwise measure a fresh program's start themselves.
_PROBE = "import memlm.cli; from memlm.memory.measure import current_rss_bytes; print(current_rss_bytes())"
START_KEPT_SECONDS = 600


def program_start_rss_bytes() -> int | None:
    """The memlm program's resident memory at its start on this machine, now (None where it cannot
    be measured: off Linux, or the probe failed)."""
    global _program_start
    if _program_start is None:
        if _start_rss:
            _program_start = _start_rss
            _keep_start(*_kept_start_path(), _start_rss)
        else:
            _program_start = _kept_or_measured_start()
    return _program_start or None


_program_start: int | None = None


def _start_key() -> dict[str, str]:
    import os

    import memlm

    cpu = next((line.partition(":")[2].strip() for line in _text("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), "")
    return {"python": sys.executable, "torch": f"{torch.__version__} {Path(torch.__file__).parent}",
            "memlm": str(Path(memlm.__file__).parent), "kernel": os.uname().release, "cpu": cpu,
            "cpus": str(os.cpu_count()), "boot": _text("/proc/sys/kernel/random/boot_id").strip()}


def _text(path: str) -> str:
    """A file's text, or "" where it cannot be read (off Linux)."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _kept_start_path() -> tuple[Path, dict[str, str]]:
    import hashlib
    import json

    from memlm.kernels import cache_root

    key = _start_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f"program-start-{digest}.json", key


def _kept_or_measured_start() -> int:
    import json
    import subprocess

    if current_rss_bytes() == 0:
        return 0
    path, key = _kept_start_path()
    try:
        record = json.loads(path.read_text())
        if record["key"] == key and 0 <= time.time() - float(record["time"]) < START_KEPT_SECONDS:
            return int(record["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                             check=True).stdout
        measured = int(out.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0
    _keep_start(path, key, measured)
    return measured


def _keep_start(path: Path, key: dict[str, str], measured: int) -> None:
    """Keep a start figure atomically: a process reading it meanwhile sees the old file or none."""
    import json
    import os

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps({"key": key, "bytes": measured, "time": time.time()}))
        os.replace(partial, path)
    except OSError:
        pass


def return_free_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed blocks of up to 32 MB in its heap once it has seen one that size, so a
    process that converts many tensors one after another (a model loading) holds the transient
    copies' pages as well as the results, unless told to give them back.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None

HUGE_PAGE = 2 * 2**20  # transparent huge pages on x86-64 and most arm64 kernels
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.empty(shape)`, backed by transparent huge pages where the kernel offers them.

    A fresh large tensor is mapped but not resident: the first write faults its pages in, 4 KiB
    at a time. In this VM that costs ~4 us a page, so a step's 400 MB logits buffer (W3) spent
    ~0.43 s faulting before the 0.1 s of writing it (`torch.empty(N).fill_(1)`: 430 ms fresh,
    100 ms reused). Marked MADV_HUGEPAGE, the kernel maps 2 MiB pages instead: 200 faults, not
    100,000 (50 ms for the same fresh fill). Only the 2 MiB-aligned pages inside the tensor are
    marked, so it occupies no more memory than before: for buffers written whole, once a step.
    Linux with THP "madvise" or "always"; elsewhere (or on CUDA) this is plain torch.empty.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < 2 * HUGE_PAGE or not sys.platform.startswith("linux"):
        return t
    global _madvise
    if _madvise is None:
        try:
            import ctypes

            fn = ctypes.CDLL("libc.so.6").madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    if _madvise:
        start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # advice: a refusal changes nothing
    return t


_madvise = None


class _RssSampler(threading.Thread):
    """Polls VmRSS until stopped, keeping the maximum (the fallback when VmHWM cannot be reset)."""

    def __init__(self, interval_s: float = 0.001):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = current_rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, current_rss_bytes())
        return self.peak


class PeakMemory:
    """Peak memory used while the `with` block runs.

        with PeakMemory("cpu") as pm:
            work()
        pm.peak_bytes, pm.baseline_bytes, pm.delta_bytes

    CPU numbers are the whole process's RSS (so they include Python, torch's libraries and
    anything another thread allocates); CUDA numbers are bytes allocated by PyTorch tensors on
    that device, with `peak_reserved_bytes` for what the caching allocator held.
    `peak_so_far()` can be read inside the block (e.g. for a progress bar).
    """

    def __init__(self, device: str | torch.device | None = None, sample_interval_s: float = 0.001):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.sample_interval_s = sample_interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.peak_reserved_bytes: int | None = None
        self._sampler: _RssSampler | None = None
        self._running = False

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def delta_bytes(self) -> int:
        """How far above its starting point memory went during the block."""
        return max(0, self.peak_bytes - self.baseline_bytes)

    def __enter__(self) -> PeakMemory:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            # Reset first, so the high-water mark starts at the baseline we record.
            if not reset_peak_rss():
                self._sampler = _RssSampler(self.sample_interval_s)
                self._sampler.start()
            self.baseline_bytes = current_rss_bytes()
        self.peak_bytes = self.baseline_bytes
        self._running = True
        return self

    def peak_so_far(self) -> int:
        """Peak bytes since the block started (also valid after it ended)."""
        if not self._running:
            return self.peak_bytes
        if self.is_cuda:
            return torch.cuda.max_memory_allocated(self.device)
        if self._sampler is not None:
            return max(self._sampler.peak, current_rss_bytes())
        return peak_rss_bytes()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.peak_reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        elif self._sampler is not None:
            self.peak_bytes = self._sampler.stop()
            self._sampler = None
        else:
            self.peak_bytes = peak_rss_bytes()
        self.peak_bytes = max(self.peak_bytes, self.baseline_bytes)
        self._running = False


def peak_report(predicted: int, measured: int) -> str:
    """The line every command ends with: `predicted X, measured Y (+Z%)`."""
    return (f"predicted {format_bytes(predicted)}, measured {format_bytes(measured)} "
            f"({(measured - predicted) / max(predicted, 1):+.1%})")


_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]


def format_bytes(n: int | float) -> str:
    """Human-readable size in binary units: 512 -> "512 B", 12.3 * 2**20 -> "12.3 MiB"."""
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{sign}{int(value)} B" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# Decimal (SI) units are powers of 1000, binary (IEC) units powers of 1024, as on disk labels.
_MULTIPLIERS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "p": 10**15, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}


def parse_size(text: str | int) -> int:
    """Bytes in a size like "2GiB", "512MiB", "1.5GB", "100MB", "123" (GB = 10^9, GiB = 2^30)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise MemlmError(f"size must not be negative, got {text}")
        return text
    hint = (
        'write a number with an optional unit: "123", "100MB", "1.5GB" (powers of 1000), '
        '"512MiB", "2GiB" (powers of 1024)'
    )
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    if not match:
        raise MemlmError(f"cannot read size {text!r}", hint)
    number, unit = match.groups()
    multiplier = _MULTIPLIERS.get(unit.lower())
    if multiplier is None:
        raise MemlmError(f"unknown size unit {unit!r} in {text!r}", hint)
    return int(round(float(number) * multiplier))
