"""memlm's int4 / int8 linear kernels on SmolLM2-135M's layer shapes: every path, 1 and 2 threads.

    python -m bench.kernels [--quick]

For each shape (in -> out), activation rows R (1: a decode step; 2-16: batched decoding, up to
the server's 16 slots; 64: a prefill chunk) and thread count, the time of one call of
  int4 memlm / amx / dequant   memlm.kernels.int4_linear, group 32 (GGUF Q4_1's grid), fp32 x,
                               by path: the AVX kernels, AMX tiles (where the CPU has them),
                               dequantize + float matmul
  int8 memlm / amx / dequant   memlm.kernels.int8_linear, a scale per row, likewise
  torch int4 / torch int8      torch's _weight_int4pack_mm_for_cpu / _weight_int8pack_mm, bf16 x
  fp32 / bf16                  F.linear with a dense weight
Calls are timed in interleaved rounds (each visits every cell, so a burst of other work on the
machine hits a little of everything) and reported as the least of all calls (what the code does
when nothing else runs), the median, and at 1 thread the least process CPU time of a call, which
other work disturbs less. Also recorded: what memlm.kernels.choose picked on this machine at
each thread count (its own short measurement), the time of the picked path here, and per shape
its 16-row / 1-row ratio. Writes bench/results/kernels-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import load_average, markdown_table, write_results
from memlm import kernels
from memlm.compress.quantize import _to_cpu_int4_layout, pack_int4, quantize_groups, quantize_int8
from memlm.kernels import choose

SHAPES = {  # SmolLM2-135M, fused as memlm decodes it: d_model 576, 9 heads x 64 (3 kv heads), MLP 1536
    "qkv": (576, 960),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
    "head": (576, 49152),  # tied embedding, int8
}
ROWS = (1, 2, 4, 8, 16, 64)
GROUP = 32
PATHS = {"memlm": (0, 0), "amx": (0, 1), "dequant": (1, 0)}  # (dequant_rows, amx_rows) of the ops


def time_cells(cells: dict[tuple, dict[str, callable]], budget_s: float, rounds: int) -> dict:
    """{cell: {name: (wall seconds of every call, CPU seconds of every call)}}, interleaved: each
    of `rounds` rounds visits all cells and gives each function budget_s / rounds (at least one call)."""
    times = {cell: {name: ([], []) for name in fns} for cell, fns in cells.items()}
    for fns in cells.values():
        for fn in fns.values():
            fn()  # warm up
    for round_ in range(rounds):
        for cell, fns in cells.items():
            for name, fn in fns.items():
                walls, cpus = times[cell][name]
                start = time.perf_counter()
                while not walls or len(walls) <= round_ or time.perf_counter() - start < budget_s / rounds:
                    w, c = time.perf_counter(), time.process_time()
                    fn()
                    cpus.append(time.process_time() - c)
                    walls.append(time.perf_counter() - w)
        print(f"round {round_ + 1}/{rounds}", flush=True)
    return times


def methods(inp: int, out: int, rows: int, amx: bool) -> dict[str, tuple[callable, int]]:
    """name -> (call, weight bytes it reads)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, inp, generator=g) * 0.05
    x = torch.randn(rows, inp, generator=g)
    xb = x.bfloat16()
    codes, scales, mins = quantize_groups(w, 4, GROUP)
    packed = pack_int4(codes)
    q8, s8 = quantize_int8(w)
    # torch's int4 kernel: its own weight layout and (q - 8) * scale + zero, as memlm's Int4Linear
    t4 = _to_cpu_int4_layout(codes)
    s, m = scales.float(), mins.float()
    scale_zeros = torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    s8b, wb = s8.bfloat16(), w.bfloat16()
    int4_bytes = out * inp // 2 + 2 * out * (inp // GROUP) * 2
    int8_bytes = out * inp + out * 4
    found = {}
    for path, (dequant_rows, amx_rows) in PATHS.items():
        if path == "amx" and not amx:
            continue
        found[f"int4 {path}"] = (lambda d=dequant_rows, a=amx_rows: kernels.int4_linear(x, packed, scales, mins, GROUP, d, a),
                                 int4_bytes)
        found[f"int8 {path}"] = (lambda d=dequant_rows, a=amx_rows: kernels.int8_linear(x, q8, s8, d, a), int8_bytes)
    found["torch int4"] = (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t4, GROUP, scale_zeros), int4_bytes)
    found["torch int8"] = (lambda: torch._weight_int8pack_mm(xb, q8, s8b), out * inp + out * 2)
    found["fp32"] = (lambda: F.linear(x, w), out * inp * 4)
    found["bf16"] = (lambda: F.linear(xb, wb), out * inp * 2)
    return found


CHOSEN = {"memlm": "memlm", "memlm-amx": "amx", "dequantize": "dequant", "torch-int4": "torch int4",
          "torch-int8": "torch int8"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short budget per cell (a smoke run)")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"memlm kernels unavailable: {kernels._failure}")
    budget, rounds = (0.01, 2) if args.quick else (0.15, 6)
    amx = kernels.isa() == "amx"
    load_before = load_average()

    raw, chosen_tables, choice_records = [], {}, {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            chosen_tables[threads] = choose.table(threads)  # what layers follow: measured here, or cached
            choice_records[threads] = choose.record(threads)
            found = {(layer, r): methods(inp, out, r, amx) for layer, (inp, out) in SHAPES.items() for r in ROWS}
            times = time_cells({cell: {n: fn for n, (fn, _) in fns.items()} for cell, fns in found.items()},
                               budget, rounds)
            for (layer, rows), fns in found.items():
                inp, out = SHAPES[layer]
                for name, (_, nbytes) in fns.items():
                    walls, cpus = times[(layer, rows)][name]
                    raw.append({"layer": layer, "shape": f"{inp}->{out}", "R": rows, "threads": threads,
                                "method": name, "min_us": min(walls) * 1e6, "median_us": statistics.median(walls) * 1e6,
                                "cpu_us": min(cpus) * 1e6, "calls": len(walls), "weight_bytes": nbytes})
    finally:
        torch.set_num_threads(before)

    table = pivot(raw, "min_us")
    summary = ratios(raw, chosen_tables)
    ready = kernels.build_directory() / "ready"
    notes = (
        f"Code path: `{kernels.isa()}`. Load average before: {load_before}, after: {load_average()} "
        "(2 cores shared with other work: compare within a run; times are the least of all calls). "
        "Microseconds per call, lower is better; `GB/s`: weight bytes per call / time of memlm's "
        "chosen path. memlm's ops take fp32 x, torch's int4/int8 kernels bf16 x.\n\n"
        "## What memlm.kernels.choose picked here\n\n"
        "Per thread count, for int4 in groups of 32 and int8 per row (SmolLM2's formats), the path of "
        "each row bucket, and (this run's least times) the picked path's time at 1 and 16 rows and their "
        "ratio: what a 16-row batched decode step costs per layer against a 1-row one.\n\n"
        + markdown_table(summary, SUMMARY_COLUMNS)
        + "\n\n" + choice_table(chosen_tables)
        + "\n\n## Least time of a call\n\n" + markdown_table(table, COLUMNS)
        + "\n\n## Least process CPU time of a call (1 thread)\n\n"
        + markdown_table([r for r in pivot(raw, "cpu_us") if r["threads"] == 1], COLUMNS)
        + "\n\n## Median call"
    )
    write_results("kernels", pivot(raw, "median_us"), extra={
        "group_size": GROUP, "load_average_before": load_before, "load_average_after": load_average(),
        "isa": kernels.isa(), "raw": raw, "summary": summary, "choice": chosen_tables,
        "choice_measurements": choice_records, "build": ready.read_text().strip() if ready.is_file() else None,
    }, columns=COLUMNS, notes=notes)


COLUMNS = ["layer", "in->out", "R", "threads", "int4 memlm", "int4 amx", "int4 dequant", "torch int4",
           "int8 memlm", "int8 amx", "int8 dequant", "torch int8", "fp32", "bf16"]
SUMMARY_COLUMNS = ["layer", "threads", "int4 paths", "int4 R=1", "int4 R=16", "int4 16/1", "int4 R=1 GB/s",
                   "int8 paths", "int8 R=1", "int8 R=16", "int8 16/1", "int8 R=1 GB/s"]


def pivot(raw: list[dict], key: str) -> list[dict]:
    """One line per (shape, R, threads), a column per method: its `key` time."""
    table: dict[tuple, dict] = {}
    for r in raw:
        where = (r["threads"], r["R"], r["layer"])
        line = table.setdefault(where, {"layer": r["layer"], "in->out": r["shape"], "R": r["R"], "threads": r["threads"]})
        line[r["method"]] = round(r[key], 1)
    return list(table.values())


def ratios(raw: list[dict], chosen_tables: dict[int, dict]) -> list[dict]:
    """Per (threads, shape): the chosen paths and their times at 1 and 16 rows."""
    best = {(r["threads"], r["layer"], r["R"], r["method"]): r for r in raw}
    lines = []
    for threads, chosen in chosen_tables.items():
        for layer in SHAPES:
            line = {"layer": layer, "threads": threads}
            for kind, fmt in (("int4", "int4-g32"), ("int8", "int8-row")):
                paths = chosen[fmt]
                line[f"{kind} paths"] = " / ".join(paths[b] for b in choose.BUCKETS)
                at = {}
                for rows in (1, 16):
                    method = CHOSEN[paths[choose.bucket(rows)]]
                    method = method if method.startswith("torch") else f"{kind} {method}"
                    r = best.get((threads, layer, rows, method))
                    at[rows] = r
                    line[f"{kind} R={rows}"] = round(r["min_us"], 1) if r else None
                if at[1] and at[16]:
                    line[f"{kind} 16/1"] = round(at[16]["min_us"] / at[1]["min_us"], 2)
                    line[f"{kind} R=1 GB/s"] = round(at[1]["weight_bytes"] / at[1]["min_us"] / 1e3, 1)
            lines.append(line)
    return lines


def choice_table(chosen_tables: dict[int, dict]) -> str:
    rows = [{"threads": t, "format": fmt, **{f"rows {b}": paths[b] for b in choose.BUCKETS}}
            for t, table in chosen_tables.items() for fmt, paths in table.items()]
    return markdown_table(rows)


if __name__ == "__main__":
    main()
