"""memlm's int4 / int8 linear kernels against PyTorch's CPU paths, on SmolLM2-135M's layer shapes.

    python -m bench.kernels [--quick]

For each shape (in -> out), activation rows R (1: a decode step, 64: a short prefill) and thread
count: the median time of one call of
  memlm int4    memlm.kernels.int4_linear, group 32 (GGUF Q4_1's grid), fp32 x
  memlm int8    memlm.kernels.int8_linear, a scale per row, fp32 x
  (at R >= INT4/INT8_DEQUANT_ROWS these ops dequantize + matmul; the "kernel" rows force the
  integer kernel so both sides of that threshold are visible)
  torch int4    torch.ops.aten._weight_int4pack_mm_for_cpu, group 32, bf16 x (memlm's layout conversion)
  torch int8    torch._weight_int8pack_mm, bf16 x
  fp32 / bf16   F.linear with a dense weight
and the weight bytes each reads per call divided by that time (GB/s). The weights of one layer
fit in L2/L3 here, so these are compute-bound numbers; a whole model streams from memory.
Writes bench/results/kernels-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import load_average, markdown_table, write_results
from memlm import kernels
from memlm.compress.quantize import _to_cpu_int4_layout, pack_int4, quantize_groups, quantize_int8

SHAPES = {  # SmolLM2-135M: d_model 576, 9 heads x 64 (3 kv heads), MLP 1536, vocabulary 49152
    "q / o": (576, 576),
    "k / v": (576, 192),
    "qkv fused": (576, 960),
    "gate / up": (576, 1536),
    "gate_up fused": (576, 3072),
    "down": (1536, 576),
    "head": (576, 49152),
}
GROUP = 32


def time_cells(cells: dict[tuple, dict[str, callable]], budget_s: float, rounds: int) -> dict[tuple, dict[str, list[float]]]:
    """Call times (microseconds) of every function of every cell, interleaved: each of `rounds`
    rounds visits all cells and gives each function budget_s / rounds (at least 2 calls). A burst
    of other work on the machine then hits a little of everything instead of all of one cell."""
    times = {cell: {name: [] for name in fns} for cell, fns in cells.items()}
    for fns in cells.values():
        for fn in fns.values():
            fn()  # warm up
    for round_ in range(rounds):
        for cell, fns in cells.items():
            for name, fn in fns.items():
                start, n = time.perf_counter(), 0
                while n < 2 or time.perf_counter() - start < budget_s / rounds:
                    t = time.perf_counter()
                    fn()
                    times[cell][name].append((time.perf_counter() - t) * 1e6)
                    n += 1
        print(f"round {round_ + 1}/{rounds}", flush=True)
    return times


def methods(inp: int, out: int, rows: int) -> dict[str, tuple[callable, int]]:
    """name -> (call, weight bytes it reads)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, inp, generator=g) * 0.05
    x = torch.randn(rows, inp, generator=g)
    xb = x.bfloat16()
    groups = inp // GROUP

    codes, scales, mins = quantize_groups(w, 4, GROUP)
    packed = pack_int4(codes)
    q8, s8 = quantize_int8(w)
    # torch's int4 kernel: its own weight layout and (q - 8) * scale + zero, as memlm's Int4Linear
    t4 = _to_cpu_int4_layout(codes)
    s, m = scales.float(), mins.float()
    scale_zeros = torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    s8b = s8.bfloat16()
    wb = w.bfloat16()

    int4_bytes = out * inp // 2 + 2 * out * groups * 2
    int8_bytes = out * inp + out * 4
    found = {
        "memlm int4": (lambda: kernels.int4_linear(x, packed, scales, mins, GROUP), int4_bytes),
        "memlm int8": (lambda: kernels.int8_linear(x, q8, s8), int8_bytes),
        "torch int4": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t4, GROUP, scale_zeros), int4_bytes),
        "torch int8": (lambda: torch._weight_int8pack_mm(xb, q8, s8b), out * inp + out * 2),
        "fp32": (lambda: F.linear(x, w), out * inp * 4),
        "bf16": (lambda: F.linear(xb, wb), out * inp * 2),
    }
    if rows >= min(kernels.INT4_DEQUANT_ROWS, kernels.INT8_DEQUANT_ROWS):
        found["memlm int4 kernel"] = (lambda: kernels.int4_linear(x, packed, scales, mins, GROUP, 0), int4_bytes)
        found["memlm int8 kernel"] = (lambda: kernels.int8_linear(x, q8, s8, 0), int8_bytes)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short budget per cell (a smoke run)")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"memlm kernels unavailable: {kernels._failure}")
    budget, rounds = (0.05, 2) if args.quick else (0.5, 10)

    found = {(layer, rows): methods(inp, out, rows) for layer, (inp, out) in SHAPES.items() for rows in (1, 64)}
    rows_out = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times = time_cells({cell: {name: fn for name, (fn, _) in fns.items()} for cell, fns in found.items()},
                               budget, rounds)
            for (layer, rows), fns in found.items():
                inp, out = SHAPES[layer]
                for name, (_, nbytes) in fns.items():
                    t = times[(layer, rows)][name]
                    med = statistics.median(t)
                    rows_out.append({"layer": layer, "shape": f"{inp}->{out}", "R": rows, "threads": threads,
                                     "method": name, "median_us": med, "min_us": min(t), "calls": len(t),
                                     "weight_bytes": nbytes, "GB/s": nbytes / med / 1e3})
    finally:
        torch.set_num_threads(before)

    table = pivot(rows_out, "median_us")
    ready = kernels.build_directory() / "ready"
    notes = (
        "Median microseconds per call (lower is better); `int4 GB/s` / `int8 GB/s`: memlm's weight bytes "
        "per call / time. memlm ops take fp32 x, torch's int4/int8 kernels bf16 x. At R=64 memlm's "
        f"ops dequantize + matmul (R >= {kernels.INT4_DEQUANT_ROWS} for int4, >= {kernels.INT8_DEQUANT_ROWS} "
        "for int8); `int4 kernel` / `int8 kernel` force the integer kernel. "
        f"Load average at the end: {load_average()} (other work on this 2-core machine inflates times)."
    )
    best = pivot(rows_out, "min_us")
    notes += ("\n\n## Fastest call\n\nWhat the code does when nothing else runs (this 2-core machine was "
              "shared with other work while the bench ran, which inflates medians, most of all with 2 threads: "
              "a thread that loses its core stalls the whole call).\n\n" + markdown_table(best, COLUMNS)
              + "\n\n## Median call")
    write_results("kernels", table, extra={
        "group_size": GROUP, "load_average": load_average(), "raw": rows_out,
        "build": ready.read_text().strip() if ready.is_file() else None,
        "int4_dequant_rows": kernels.INT4_DEQUANT_ROWS, "int8_dequant_rows": kernels.INT8_DEQUANT_ROWS,
    }, columns=COLUMNS, notes=notes)


COLUMNS = ["layer", "in->out", "R", "threads", "int4", "int4 kernel", "int4 GB/s", "torch int4",
           "int8", "int8 kernel", "int8 GB/s", "torch int8", "fp32", "bf16"]


def pivot(raw: list[dict], key: str) -> list[dict]:
    """One line per (shape, R, threads), a column per method: its `key` time, and GB/s for memlm's."""
    table: dict[tuple, dict] = {}
    for r in raw:
        where = (r["threads"], r["R"], r["layer"])
        line = table.setdefault(where, {"layer": r["layer"], "in->out": r["shape"], "R": r["R"], "threads": r["threads"]})
        line[r["method"].replace("memlm ", "")] = round(r[key], 1)
        if r["method"] in ("memlm int4", "memlm int8"):
            line[r["method"].replace("memlm ", "") + " GB/s"] = round(r["weight_bytes"] / r[key] / 1e3, 1)
    return list(table.values())


if __name__ == "__main__":
    main()
