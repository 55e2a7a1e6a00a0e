"""Peak-memory measurement and the size helpers."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from memlm.errors import MemlmError
from memlm.memory import measure
from memlm.memory.measure import PeakMemory, current_rss_bytes, format_bytes, parse_size, peak_rss_bytes

SIZE = 200_000_000  # bytes: big enough to dwarf allocator noise


def _allocate_and_free() -> None:
    t = torch.ones(SIZE // 4, dtype=torch.float32)  # ones() touches every page, so RSS grows
    time.sleep(0.02)  # let the fallback sampler see it
    del t


def test_rss_helpers_are_plausible():
    rss = current_rss_bytes()
    assert 10 * 2**20 < rss < 64 * 2**30  # a Python process with torch loaded
    assert peak_rss_bytes() >= rss


def test_cpu_peak_sees_a_200mb_tensor():
    """In a fresh process: earlier tests leave this one's heap in a state (pages kept by the
    allocator, other threads) that is not what a measurement of a run starts from."""
    import json
    import subprocess
    import sys

    script = (
        "import json, time, torch\n"
        "from memlm.memory.measure import PeakMemory, current_rss_bytes\n"
        "with PeakMemory('cpu') as pm:\n"
        f"    t = torch.ones({SIZE // 4}, dtype=torch.float32); time.sleep(0.02); del t\n"
        "print(json.dumps([pm.delta_bytes, pm.peak_bytes, pm.baseline_bytes, current_rss_bytes()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    delta, peak, baseline, rss_after = json.loads(out)
    assert delta == pytest.approx(SIZE, rel=0.05)
    assert peak == baseline + delta
    assert rss_after < peak  # freed again, but the peak remembers it


def test_peak_is_reset_between_blocks():
    with PeakMemory("cpu"):
        _allocate_and_free()
    with PeakMemory("cpu") as small:
        x = torch.ones(1000)
        del x
    assert small.delta_bytes < SIZE / 4


def test_sampling_fallback_when_reset_is_refused(monkeypatch):
    monkeypatch.setattr(measure, "reset_peak_rss", lambda: False)
    # In a long test process glibc may hold 200 MB of freed, still-resident heap that the tensor
    # would reuse without any RSS change: hand it back first, so the tensor's pages are new.
    measure.return_free_heap()
    with PeakMemory("cpu", sample_interval_s=0.001) as pm:
        sampler = pm._sampler
        assert sampler is not None
        t = torch.ones(SIZE // 4, dtype=torch.float32)
        # Hold the tensor until the sampling thread has polled once more: on a loaded machine a
        # fixed sleep can pass before the thread is scheduled at all.
        deadline = time.time() + 10
        while sampler.peak < pm.baseline_bytes + 0.9 * SIZE and time.time() < deadline:
            time.sleep(0.005)
        del t
        assert pm.peak_so_far() >= pm.baseline_bytes
    assert pm.delta_bytes == pytest.approx(SIZE, rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_sees_a_tensor():
    with PeakMemory("cuda") as pm:
        t = torch.empty(SIZE, dtype=torch.uint8, device="cuda")
        del t
    assert pm.delta_bytes == pytest.approx(SIZE, rel=0.01)
    assert pm.peak_reserved_bytes is not None and pm.peak_reserved_bytes >= pm.peak_bytes


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (int(12.3 * 2**20), "12.3 MiB"),
        (2**30, "1.0 GiB"),
        (5 * 2**40, "5.0 TiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    "text, n",
    [
        ("123", 123),
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("100MB", 100_000_000),
        ("100 mb", 100_000_000),
        ("4KiB", 4096),
        ("1kb", 1000),
        ("0.5GiB", 2**29),
        ("7B", 7),
        (42, 42),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "abc", "12XB", "-1", "1.2.3", "GiB", "2 Gibs"])
def test_parse_size_rejects_bad_input(bad):
    with pytest.raises(MemlmError) as e:
        parse_size(bad)
    assert "GiB" in e.value.hint and "MB" in e.value.hint


@given(st.integers(min_value=0, max_value=2**50))
def test_format_then_parse_is_close(n):
    number, unit = format_bytes(n).split()
    back = parse_size(number + unit)
    assert abs(back - n) <= max(0.05 * n, 1)
