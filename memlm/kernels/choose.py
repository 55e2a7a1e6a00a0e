"""Which code computes a quantized layer's call: per machine, the fastest correct one, measured once.

A block-quantized linear layer can be computed several ways here:

    memlm        memlm's integer kernels on AVX-VNNI / AVX2 / plain C++ (csrc/simd_kernels.h)
    memlm-amx    the same integer sums on AMX tiles (csrc/amx_kernels.cpp), where the CPU has AMX
    dequantize   the weights dequantized a slice at a time, then torch's float matmul (the C++ op)
    torch-int4   torch's _weight_int4pack_mm_for_cpu (bf16 activations, its own weight layout)
    torch-int8   torch._weight_int8pack_mm (int8 with one scale per row)

Each is tested against its reference (tests/test_kernels.py, tests/test_compress.py), so any of
them is correct; which is fastest depends on the CPU, the thread count and the number of rows.
So at first use, for each format (int4 in groups of 32 / 64 / 128, int8 per row, int8 in groups
of 32) and row bucket (1: a decode step; 2-4 and 5-16: batched decoding; 17+: a prefill), each
candidate that runs here is timed on two SmolLM2-sized shapes (576 -> 1536, or 512 -> 1536 for
groups of 128, and 1536 -> 576) at
one row count per bucket (MEASURED_ROWS): the least of a few calls, rounds interleaved across
candidates, a candidate left out once it is 8x slower than the best so far. Another path than
the fixed rule's (memlm's kernels up to 16 rows, dequantize beyond) is taken only when it is
clearly faster (MARGIN). This takes well under a second. The result goes to
$MEMLM_CACHE/kernels/choice-<key>.json, the key made of the CPU model and flags, torch's version,
the kernels' source hash, the code path in use and the thread count; later processes read it.
A measurement taken while the machine was busy (load average above the core count) is used but
not kept. The measurement logs one line.

The layers call `int4_linear` / `int8_linear` below, which follow the choice for the row count of
the call. torch-int4 needs the weight in torch's layout, so it can only be taken when a layer is
built: int4 layers hold that layout when it is the one-row winner (`torch_int4_wins`).

MEMLM_KERNEL_CHOICE: "measure" (the default); "default", no measurement, memlm's kernels up to
16 rows and dequantize beyond (what tests pin, see tests/conftest.py); or a candidate's name,
that path wherever it runs (the default elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch

from memlm import kernels

log = logging.getLogger("memlm")

CANDIDATES = ("memlm", "memlm-amx", "dequantize", "torch-int4", "torch-int8")
FORMATS = ("int4-g32", "int4-g64", "int4-g128", "int8-row", "int8-g32")
BUCKETS = ("1", "2-4", "5-16", "17+")
MEASURED_ROWS = {"1": 1, "2-4": 4, "5-16": 12, "17+": 64}
SHAPES = ((576, 1536), (1536, 576))  # (in, out): SmolLM2's MLP, both ways
ROUNDS = 3  # timed calls per candidate, one per round
DROP_FACTOR = 8  # a candidate this many times slower than the best so far is timed no further
# Another path replaces the fixed rule's (default_table) only when this much faster: timings on a
# shared machine wobble by ~10%; PyTorch's kernels (bf16 activations; torch-int4 switches the
# layers' weight layout) only when clearly so.
MARGIN = {"torch-int4": 0.75, "torch-int8": 0.75}
DEFAULT_MARGIN = 0.9
_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8")

_lock = threading.Lock()
_tables: dict[int, dict] = {}  # threads -> {format: {bucket: path}}; forget() clears it
_last: dict | None = None  # the table of the latest eager call, for calls while torch.compile traces
_measured: dict[int, dict] = {}  # threads -> the full record (times included), for bench/kernels.py


def bucket(rows: int) -> str:
    return "1" if rows <= 1 else "2-4" if rows <= 4 else "5-16" if rows <= 16 else "17+"


def format_key(kind: str, group: int | None) -> str:
    """The measured format standing for a layer's: int4 groups of 128 or more as 128, any int8
    grouping as groups of 32."""
    if kind == "int4":
        return f"int4-g{min(int(group or 128), 128)}"
    return "int8-row" if group is None else "int8-g32"


def default_table() -> dict[str, dict[str, str]]:
    """memlm's kernels up to 16 rows, dequantize + matmul beyond (the rule before measuring)."""
    return {f: {b: "dequantize" if b == "17+" else "memlm" for b in BUCKETS} for f in FORMATS}


# ------------------------------------------------------------------------------ what runs here


def _shape_weights(fmt: str, inp: int, out: int) -> dict[str, torch.Tensor]:
    """Random weights of the format (only the speed is measured, not the values)."""
    g = torch.Generator().manual_seed(0)
    if fmt.startswith("int4"):
        group = int(fmt.split("-g")[1])
        codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
        return {"codes": codes, "packed": codes[:, 0::2] | (codes[:, 1::2] << 4),
                "scales": (torch.rand(out, inp // group, generator=g) * 0.01).half(),
                "mins": (torch.rand(out, inp // group, generator=g) * -0.05).half(), "group": torch.tensor(group)}
    codes = torch.randint(-127, 128, (out, inp), generator=g, dtype=torch.int8)
    scales = torch.rand(out, generator=g) * 0.01 if fmt == "int8-row" else torch.rand(out, inp // 32, generator=g) * 0.01
    return {"codes": codes, "scales": scales}


def _shapes(fmt: str) -> list[tuple[int, int]]:
    """SHAPES, the inputs cut to a multiple of the format's group (groups of 128: 576 -> 512)."""
    group = int(fmt.split("-g")[1]) if "-g" in fmt else 32
    return [(inp // group * group, out) for inp, out in SHAPES]


def _runner(name: str, fmt: str, w: dict[str, torch.Tensor]):
    """A call of candidate `name` on weights w, or None where it does not run here."""
    if name.startswith("memlm") or name == "dequantize":
        if not kernels.available() or (name == "memlm-amx" and kernels.isa() != "amx"):
            return None
        dequant_rows, amx_rows = (1, 0) if name == "dequantize" else (0, 1 if name == "memlm-amx" else 0)
        if fmt.startswith("int4"):
            group = int(w["group"])
            return lambda x: kernels.int4_linear(x, w["packed"], w["scales"], w["mins"], group, dequant_rows, amx_rows)
        return lambda x: kernels.int8_linear(x, w["codes"], w["scales"], dequant_rows, amx_rows)
    if name == "torch-int4" and fmt.startswith("int4"):
        group = int(w["group"])
        try:  # (q - 8) * scale + zero with zero = min + 8 * scale, bf16 activations
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w["codes"].int(), 1)
            s, m = w["scales"].float(), w["mins"].float()
            scale_zeros = torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
            torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, w["codes"].shape[1], dtype=torch.bfloat16),
                                                       packed, group, scale_zeros)
        except (RuntimeError, AttributeError):
            return None
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, group, scale_zeros).float()
    if name == "torch-int8" and fmt == "int8-row":
        return lambda x: torch._weight_int8pack_mm(x, w["codes"], w["scales"])
    return None


def _pick(times: dict[str, float], rule: str) -> str:
    """The fastest path, unless it beats the fixed rule's by less than its margin."""
    fastest = min(times, key=times.get)
    if rule in times and times[fastest] > times[rule] * MARGIN.get(fastest, DEFAULT_MARGIN):
        return rule
    return fastest


def _call_time(fns, xs) -> float:
    t0 = time.perf_counter()
    for fn, x in zip(fns, xs):
        fn(x)
    return time.perf_counter() - t0


def _measure(threads: int) -> dict:
    """Times every candidate of every format and bucket; returns the record that is cached."""
    start = time.perf_counter()
    choices: dict[str, dict] = {}
    with torch.no_grad():
        for fmt in FORMATS:
            weights = [_shape_weights(fmt, inp, out) for inp, out in _shapes(fmt)]
            runners = {name: [_runner(name, fmt, w) for w in weights] for name in CANDIDATES}
            runners = {name: fns for name, fns in runners.items() if all(fns)}
            choices[fmt] = {}
            hopeless: set[str] = set()  # dropped in a smaller bucket: more rows only widen the gap
            for b in BUCKETS:
                g = torch.Generator().manual_seed(1)
                xs = [torch.randn(MEASURED_ROWS[b], inp, generator=g) for inp, _ in _shapes(fmt)]
                best: dict[str, float] = {}
                dropped: dict[str, float] = {}
                for round_ in range(ROUNDS + 1):  # round 0 warms up, and drops the hopeless
                    for name, fns in runners.items():
                        if name in dropped or name in hopeless:
                            continue
                        t = _call_time(fns, xs)
                        if round_ == 0 and best and t > DROP_FACTOR * min(best.values()):
                            t = min(t, _call_time(fns, xs))  # not a first call's setup, nor a preemption
                            if t > DROP_FACTOR * min(best.values()):
                                dropped[name] = t
                                continue
                        best[name] = t if round_ <= 1 else min(best[name], t)
                # Dequantize's cost hardly grows with the rows, the others' does: it may catch up.
                hopeless |= set(dropped) - {"dequantize"}
                choices[fmt][b] = {"path": _pick(best, default_table()[fmt][b]), "rows": MEASURED_ROWS[b],
                                   "us": {n: round(t * 1e6, 1) for n, t in best.items()},
                                   "dropped_us": {n: round(t * 1e6, 1) for n, t in dropped.items()}}
    return {"threads": threads, "seconds": round(time.perf_counter() - start, 3), "shapes": SHAPES,
            "choices": choices}


# ------------------------------------------------------------------------------ the cache


def cache_key(threads: int) -> dict[str, str]:
    """What the choice depends on."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"cpu": model, "flags": " ".join(f for f in _FLAGS if f in flags), "torch": torch.__version__,
            "kernels": kernels.build_directory().name, "isa": kernels.isa() if kernels.available() else "none",
            "threads": str(threads)}


def cache_path(threads: int) -> Path:
    key = json.dumps(cache_key(threads), sort_keys=True)
    return kernels.cache_root() / "kernels" / f"choice-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _load_or_measure(threads: int) -> dict:
    path = cache_path(threads)
    try:
        record = json.loads(path.read_text())
        if record.get("key") == cache_key(threads):
            return record
    except (OSError, ValueError):
        pass
    loads = [os.getloadavg()[0]]
    record = {"key": cache_key(threads), **_measure(threads)}
    loads.append(os.getloadavg()[0])
    record["load_average"] = loads
    # Timed while other work kept the cores busy, the choice is used but not kept: the next
    # process measures again.
    busy = max(loads) > (os.cpu_count() or 1)
    if not busy:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    summary = ", ".join(f"{f} " + "/".join(record["choices"][f][b]["path"] for b in BUCKETS) for f in FORMATS)
    log.info("memlm kernels: measured in %.2f s at %d threads (rows %s): %s; %s", record["seconds"], threads,
             "/".join(BUCKETS), summary,
             f"not cached, the machine was busy (load {max(loads):.1f})" if busy else f"cached in {path}")
    return record


def mode() -> str:
    value = os.environ.get("MEMLM_KERNEL_CHOICE", "measure").strip() or "measure"
    if value not in ("measure", "default", *CANDIDATES):
        raise ValueError(f"MEMLM_KERNEL_CHOICE={value!r}: use measure, default or one of {', '.join(CANDIDATES)}")
    return value


def table(threads: int | None = None) -> dict[str, dict[str, str]]:
    """{format: {bucket: path}} for this thread count (default: torch's now), measured if need be."""
    global _last
    threads = threads or torch.get_num_threads()
    found = _tables.get(threads)
    if found is None:
        with _lock:
            found = _tables.get(threads)
            if found is None:
                found = _tables[threads] = _make_table(mode(), threads)
    _last = found
    return found


def _make_table(how: str, threads: int) -> dict[str, dict[str, str]]:
    found = default_table()
    if how == "measure" and kernels.available():
        record = _measured[threads] = _load_or_measure(threads)
        return {f: {b: record["choices"][f][b]["path"] for b in BUCKETS} for f in FORMATS}
    if how in CANDIDATES:  # that path wherever it runs
        for fmt in FORMATS:
            if _runner(how, fmt, _shape_weights(fmt, 128, 64)) is not None:
                found[fmt] = dict.fromkeys(BUCKETS, how)
    return found


def forget() -> None:
    """Drops the tables in memory: after set_isa (another code path, other timings) or a change
    of MEMLM_KERNEL_CHOICE (read when a table is made)."""
    global _last
    with _lock:
        _tables.clear()
        _measured.clear()
        _last = None


def record(threads: int | None = None) -> dict | None:
    """The measurement behind the table for this thread count (times per candidate), if measured."""
    threads = threads or torch.get_num_threads()
    table(threads)
    return _measured.get(threads)


def path(kind: str, group: int | None, rows: int) -> str:
    """The path chosen for a call of `rows` rows on a layer of this format."""
    if torch.compiler.is_compiling():  # no measuring (nor thread count) while tracing
        chosen = _last or default_table()
    else:
        chosen = table()
    return chosen[format_key(kind, group)][bucket(rows)]


def torch_int4_wins(group: int) -> bool:
    """Whether PyTorch's int4 kernel is this machine's one-row winner for int4 with this group."""
    return kernels.available() and path("int4", group, 1) == "torch-int4"


# ------------------------------------------------------------------------------ the layers' calls


def kernel_args(chosen: str) -> tuple[int, int]:
    """(dequant_rows, amx_rows) that make memlm's ops take the chosen path (any path but
    dequantize and memlm-amx: the integer kernels)."""
    return (1, 0) if chosen == "dequantize" else (0, int(chosen == "memlm-amx"))


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """kernels.int4_linear by the chosen path (torch-int4 falls back to memlm: it needs its own layout)."""
    chosen = path("int4", group_size, x.numel() // x.shape[-1])
    return kernels.int4_linear(x, packed, scales, mins, group_size, *kernel_args(chosen))


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """kernels.int8_linear, or torch._weight_int8pack_mm, by the chosen path (scales of another
    dtype, an embedding's kept in the model's, as float32)."""
    rows = x.numel() // x.shape[-1]
    scales = scales if scales.dtype == torch.float32 else scales.float()
    chosen = path("int8", None if scales.dim() == 1 else w_int8.shape[1] // scales.shape[1], rows)
    if chosen == "torch-int8" and scales.dim() == 1:
        y = torch._weight_int8pack_mm(x.reshape(rows, -1), w_int8, scales.to(x.dtype))
        return y.view(*x.shape[:-1], -1)
    return kernels.int8_linear(x, w_int8, scales, *kernel_args(chosen))
