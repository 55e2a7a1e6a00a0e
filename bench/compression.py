"""Compression methods compared: file size, resident memory, perplexity and decode speed.

Two models:
  smollm2  SmolLM2-135M-Instruct, the Q4_1 GGUF dequantized to fp32 (the reference)
  trained  a small fp32 model trained here on the default corpus (widths 128 divides, so
           int4 groups of 128 apply everywhere); default run folder runs/compression-bench

Each row compresses a fresh copy of the fp32 model with memlm.compress.pipeline, saves it with
save_compressed and measures, in a fresh worker process that loads the folder with memlm.load:
  * W1 decode speed (shared/BENCHMARKS.md): 2 threads, prompt = the first 64 eval tokens,
    128 greedy tokens with EOS banned, KV cache; a short warm-up and --gen-runs timed generations
    (W1 says 5; fewer on a busy machine, as recorded in the results); medians
  * resident peak memory of generation: the worker's VmHWM after load + generation
  * W2 perplexity on the first --windows windows of 512 tokens of the eval split (the same
    windows for every row; the full split has 43)
and in this process the folder's size on disk (model.safetensors + tokenizer files).

    python bench/compression.py                      # both models, every method
    python bench/compression.py --model trained --only gptq

Results: bench/results/compression-<date>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

MIB = 2**20
TRAINED_RUN = ROOT / "runs" / "compression-bench"
SMOLLM2_GGUF_BYTES = 98_362_432  # SmolLM2-135M-Instruct.Q4_1.gguf as shipped
PROMPT_TOKENS, NEW_TOKENS, WINDOW = 64, 128, 512
WARMUP_TOKENS = 16
# Passive OpenMP waiting: on a machine shared with other jobs, spinning threads wait for each
# other (measured here: 7.7 tok/s spinning vs 160 tok/s passive for the same 7M model).
WORKER_ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}


# ------------------------------------------------------------------------------ the rows


def row(name: str, methods: list[str], **options: Any) -> dict[str, Any]:
    return {"name": name, "methods": methods, "options": options}


def rows_for(model: str) -> list[dict[str, Any]]:
    """Every method; quantization at the group sizes the targets talk about."""
    if model == "smollm2":
        quant = [
            row("int8", ["int8"]),
            row("int4-g32", ["int4"], group_size=32),
            row("int4-g32-emb8", ["int4"], group_size=32, quantize_embedding="int8"),
            row("int4-g64", ["int4"], group_size=64),
            row("gptq4-g64", ["gptq4"], group_size=64),
            row("gptq4-g64-act", ["gptq4"], group_size=64, act_order=True),
            row("int3-g32", ["int3"], group_size=32),
            row("gptq3-g32", ["gptq3"], group_size=32),
        ]
    else:
        quant = [
            row("int8", ["int8"]),
            row("int4-g128", ["int4"], group_size=128),
            row("gptq4-g128", ["gptq4"], group_size=128),
            row("gptq4-g128-act", ["gptq4"], group_size=128, act_order=True),
            row("int4-g64", ["int4"], group_size=64),
            row("gptq4-g64", ["gptq4"], group_size=64),
            row("int4-g32-emb8", ["int4"], group_size=32, quantize_embedding="int8"),
            row("int3-g32", ["int3"], group_size=32),
            row("gptq3-g32", ["gptq3"], group_size=32),
        ]
    structural = [
        row("prune-50%", ["prune"], sparsity=0.5),
        row("prune24", ["prune24"]),
        row("prune24+int4-g32", ["prune24", "int4"], group_size=32),
        row("prune-ffn-75%", ["prune-ffn"], keep=0.75),
        row("prune-heads", ["prune-heads"], keep=0.67),
        row("lowrank-e0.9", ["lowrank"], energy=0.9),
    ]
    return [row("fp32", [])] + quant + structural


# ------------------------------------------------------------------------------ the worker


def worker_main(spec: dict[str, Any]) -> None:
    """Load a saved model, run W1 (timings, VmHWM), then W2 on the first windows; print RESULT."""
    import torch

    torch.set_num_threads(2)
    import memlm
    from memlm.data import default_split
    from memlm.eval.perplexity import perplexity
    from memlm.infer.generate import generate_ids
    from memlm.infer.sampling import SamplingSettings
    from memlm.memory.measure import current_rss_bytes, peak_rss_bytes

    rss_import = current_rss_bytes()  # the runtime every row pays before its weights
    t = time.perf_counter()
    lm = memlm.load(spec["folder"])
    load_s = time.perf_counter() - t
    ids = lm.tokenizer.encode(default_split()[1], add_bos=False)
    prompt = ids[:PROMPT_TOKENS]
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

    def one_generation(s: SamplingSettings = settings) -> tuple[float, float, list[int]]:
        marks: dict[str, float] = {}
        t0 = time.perf_counter()
        out = list(generate_ids(lm.model, prompt, s, lm.tokenizer.eos_id,
                                on_first_logits=lambda: marks.setdefault("t1", time.perf_counter())))
        t2 = time.perf_counter()
        return PROMPT_TOKENS / (marks["t1"] - t0), (len(out) - 1) / (t2 - marks["t1"]), out

    # Warm-up: the same prompt, fewer new tokens (every code path runs; the busy machine's time is saved).
    one_generation(SamplingSettings(max_new_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True))
    runs = [one_generation() for _ in range(spec["gen_runs"])]
    hwm = peak_rss_bytes()  # before the perplexity's (windows x vocab) logits
    windows = spec["windows"]
    ppl = perplexity(lm.model, ids[: windows * WINDOW], WINDOW)
    print("RESULT " + json.dumps({
        "rss_import": rss_import, "load_s": load_s, "prefill_tok_s": statistics.median(r[0] for r in runs),
        "decode_tok_s": statistics.median(r[1] for r in runs), "vmhwm": hwm, "ppl": ppl.ppl,
        "scored": ppl.n_scored, "generated": runs[0][2],
    }))


def run_worker(spec: dict[str, Any], timeout: float = 1200) -> dict[str, Any]:
    env = {**os.environ, **WORKER_ENV}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-2000:]}")


# ------------------------------------------------------------------------------ one model


def reference_folder(model: str, trained_run: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """The fp32 model saved as a memlm folder (every row starts from a fresh load of it)."""
    from memlm.compress import save_compressed
    from memlm.loading import load_model

    source = "smollm2-135m-instruct" if model == "smollm2" else str(trained_run)
    net, tok = load_model(source)
    folder = save_compressed(net, tok, work / f"{model}-fp32")
    return folder, {"source": source, "config": net.config.to_dict(), "params": net.num_params()}


def measure_model(model: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    import torch

    from memlm.compress import load_compressed, save_compressed
    from memlm.compress.pipeline import CompressOptions, compress

    torch.set_num_threads(2)
    ref, info = reference_folder(model, args.trained_run, work)
    print(f"== {model}: {info['source']} ({info['params']:,} parameters)", flush=True)
    results = []
    for spec in rows_for(model):
        if args.only and args.only not in spec["name"] and spec["name"] != "fp32":  # fp32: the ratios' base
            continue
        t = time.perf_counter()
        folder = ref
        steps: list[str] = ["fp32"]
        seconds = 0.0
        gguf_bytes = None
        if spec["methods"] or spec["options"].get("quantize_embedding"):
            net, tok = load_compressed(ref)
            options = CompressOptions(eval=False, progress=False, calib_tokens=args.calib_tokens, **spec["options"])
            summary = compress(net, tok, spec["methods"], options)
            steps, seconds = [s["what"] for s in summary.steps], summary.seconds
            folder = save_compressed(net, tok, work / f"{model}-{spec['name']}")
            if spec["name"] == "int4-g32-emb8" and model == "smollm2":
                from memlm.interop.gguf import save_gguf

                gguf_bytes = save_gguf(net, tok, work / "smollm2-int4-g32.gguf", qtype="Q4_1").stat().st_size
            del net
        m = run_worker({"folder": str(folder), "windows": args.windows, "gen_runs": args.gen_runs})
        weights = (folder / "model.safetensors").stat().st_size
        result = {
            "model": model, "row": spec["name"], "what": " + ".join(steps),
            "file_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
            "weights_bytes": weights, "file_mib": weights / MIB,
            "vmhwm_mib": m["vmhwm"] / MIB, "rss_import_mib": m["rss_import"] / MIB, "ppl": m["ppl"], "decode_tok_s": m["decode_tok_s"],
            "prefill_tok_s": m["prefill_tok_s"], "load_s": m["load_s"], "compress_s": seconds,
            "scored_tokens": m["scored"], "generated": m["generated"], "gguf_q4_1_bytes": gguf_bytes,
        }
        results.append(result)
        print(f"  {spec['name']:18s} {result['file_mib']:8.1f} MiB  ppl {m['ppl']:9.3f}  "
              f"rss {result['vmhwm_mib']:7.1f} MiB  decode {m['decode_tok_s']:6.1f} tok/s  "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    if args.keep_folders is None:
        shutil.rmtree(work, ignore_errors=True)
    base = next((r for r in results if r["row"] == "fp32"), None)
    for r in results:  # ratios against the same model's fp32 row
        if base is not None:
            r["ppl_vs_fp32"] = r["ppl"] / base["ppl"] - 1.0
            r["size_vs_fp32"] = r["weights_bytes"] / base["weights_bytes"]
            r["rss_vs_fp32"] = r["vmhwm_mib"] / base["vmhwm_mib"]
            r["model_rss_mib"] = r["vmhwm_mib"] - r["rss_import_mib"]
            r["model_rss_vs_fp32"] = r["model_rss_mib"] / (base["vmhwm_mib"] - base["rss_import_mib"])
            r["match_fp32_ids"] = sum(a == b for a, b in zip(r["generated"], base["generated"]))
    return results


# ------------------------------------------------------------------------------ targets


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of the brief, each with its measured value and met / missed."""
    by = {(r["model"], r["row"]): r for r in rows}
    checks = []

    def add(what: str, value: Any, ok: bool | None) -> None:
        checks.append({"target": what, "value": value, "status": "info" if ok is None else ("met" if ok else "MISSED")})

    def increase(model: str, name: str) -> float | None:
        r = by.get((model, name))
        return None if r is None else r["ppl_vs_fp32"]

    for model in ("smollm2", "trained"):
        v = increase(model, "int8")
        if v is not None:
            add(f"{model}: int8 perplexity within 0.5% of fp32", f"{v:+.3%}", abs(v) <= 0.005)
    g, r = increase("trained", "gptq4-g128"), increase("trained", "int4-g128")
    if g is not None and r is not None:
        add("trained: GPTQ int4-g128 within 3% of fp32", f"{g:+.2%}", g <= 0.03)
        add("trained: GPTQ int4-g128 better than RTN int4-g128", f"{g:+.2%} vs {r:+.2%}", g < r)
    v = increase("smollm2", "int4-g32")
    if v is not None:
        add("smollm2: RTN int4-g32 reproduces Q4_1 (ppl within 0.1% of fp32)", f"{v:+.3%}", abs(v) <= 0.001)
    for model in ("smollm2", "trained"):
        for rtn, gptq in (("int4-g64", "gptq4-g64"), ("int3-g32", "gptq3-g32")):
            a = increase(model, rtn)
            variants = {n: increase(model, n) for n in (gptq, gptq + "-act") if increase(model, n) is not None}
            if a is not None and variants:
                best = min(variants.values())
                value = ", ".join(f"{n} {v:+.3%}" for n, v in variants.items()) + f" vs {rtn} {a:+.3%}"
                add(f"{model}: GPTQ ({' or '.join(variants)}) at most half of {rtn}'s perplexity increase", value,
                    best <= a / 2)
    s = by.get(("smollm2", "int4-g32-emb8"))
    if s is not None:
        add(f"smollm2: int4-g32 + int8 embedding on disk <= {SMOLLM2_GGUF_BYTES:,} bytes",
            f"{s['file_bytes']:,} bytes (weights {s['weights_bytes']:,}; GGUF Q4_1 export {s['gguf_q4_1_bytes']:,})",
            s["file_bytes"] <= SMOLLM2_GGUF_BYTES)
    # The brief's size sentence: SmolLM2 int4-g32 with the embedding in int8, on disk and resident.
    # The other int4 rows are shown for what they are: with a float embedding (SmolLM2's alone is
    # 0.2x of fp32), or a 6.6M-parameter model whose weights are smaller than the fixed costs of
    # generating at all (tokenizer, the int4 kernel's code, KV cache).
    for model in ("smollm2", "trained"):
        for name in ("int4-g32-emb8", "int4-g32", "int4-g64", "int4-g128"):
            r = by.get((model, name))
            if r is not None:
                target = model == "smollm2" and name == "int4-g32-emb8"
                add(f"{model}: {name} resident memory in generation <= 0.35x fp32 (above the runtime)"
                    + ("" if target else " (for information)"),
                    f"{r['model_rss_vs_fp32']:.3f}x ({r['model_rss_mib']:.0f} MiB; whole process {r['rss_vs_fp32']:.3f}x)",
                    r["model_rss_vs_fp32"] <= 0.35 if target else None)
    return checks


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        pts = [r for r in rows if r["model"] == model]
        for r in pts:
            marker = "o" if r["row"].startswith(("int", "gptq", "fp32")) else "s"
            color = "C3" if "gptq" in r["row"] else ("C0" if r["row"].startswith(("int", "fp32")) else "C2")
            ax.scatter(r["file_mib"], r["ppl"], marker=marker, color=color)
            ax.annotate(r["row"], (r["file_mib"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ppls = [r["ppl"] for r in pts]
        if max(ppls) > 5 * min(ppls):  # a log axis only when collapsed rows would squash the rest
            ax.set_yscale("log")
        ax.set_xlabel("weights on disk (MiB, model.safetensors)")
        ax.set_ylabel(f"perplexity (first {pts[0]['scored_tokens'] // (WINDOW - 1)} W2 windows)")
        ax.set_title(f"{model}: size vs perplexity (blue RTN, red GPTQ, green pruning/low-rank)")
        ax.title.set_fontsize(9)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["smollm2", "trained", "both"], default="both")
    parser.add_argument("--only", help="run only the rows whose name contains this (and fp32)")
    parser.add_argument("--windows", type=int, default=8, help="W2 windows scored per row (the full split: 43)")
    parser.add_argument("--gen-runs", type=int, default=2, help="timed W1 generations per row (W1: 5)")
    parser.add_argument("--calib-tokens", type=int, default=8192, help="GPTQ / calibrated pruning tokens")
    parser.add_argument("--trained-run", type=Path, default=TRAINED_RUN, help="run folder of the trained model")
    parser.add_argument("--keep-folders", type=Path, help="keep the compressed folders here")
    parser.add_argument("--merge", type=Path, nargs=2, metavar=("MAIN_JSON", "PARTIAL_JSON"),
                        help="add the rows of a partial run that the main run lacks, then rewrite the results")
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    if args.merge:
        merge(*args.merge)
        return

    from bench.common import load_average

    t0, load_before = time.perf_counter(), load_average()
    work = args.keep_folders or Path(tempfile.mkdtemp(prefix="memlm-compression-"))
    work.mkdir(parents=True, exist_ok=True)
    models = ["smollm2", "trained"] if args.model == "both" else [args.model]
    rows = []
    for model in models:
        rows += measure_model(model, args, work / model)
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("worker", "merge")}
    name = "compression" if not args.only and args.model == "both" else "compression-partial"
    settings["load_average_before_after"] = f"{load_before} / {load_average()}"
    write(name, rows, settings, time.perf_counter() - t0)


def merge(main_json: Path, partial_json: Path) -> None:
    """Rows of a later partial run (e.g. an extra GPTQ variant) join the main run's results; each
    row keeps the settings of the run that measured it (`run` says which)."""
    main = json.loads(main_json.read_text())
    if partial_json.resolve() == main_json.resolve():  # re-render: the targets and tables, nothing added
        write("compression", main["rows_full"], main["settings"], main["seconds"])
        return
    partial = json.loads(partial_json.read_text())
    have = {(r["model"], r["row"]) for r in main["rows_full"]}
    rows = [{**r, "run": r.get("run", "main")} for r in main["rows_full"]]
    rows += [{**r, "run": f"partial {partial['date']}"} for r in partial["rows_full"] if (r["model"], r["row"]) not in have]
    write("compression", rows, main["settings"], main["seconds"] + partial["seconds"])


def write(name: str, rows: list[dict[str, Any]], settings: dict[str, str], seconds: float) -> None:
    from bench.common import write_results

    args = argparse.Namespace(**{k: settings[k] for k in ("windows", "gen_runs", "calib_tokens")})
    checks = check_targets(rows)
    columns = ["model", "row", "what", "file_mib", "ppl", "ppl_vs_fp32", "vmhwm_mib", "model_rss_mib",
               "model_rss_vs_fp32", "decode_tok_s", "match_fp32_ids", "compress_s"]
    target_lines = "\n".join(f"| {c['target']} | {c['value']} | {c['status']} |" for c in checks)
    notes = (
        f"Perplexity: W2 protocol on the first {args.windows} windows of 512 tokens of the eval split "
        f"({int(args.windows) * 511:,} scored tokens; the full split has 43 windows), the same windows for every row. "
        f"Decode: W1 (2 threads with OMP_WAIT_POLICY=PASSIVE, 64-token prompt, 128 greedy tokens, EOS banned), 1 warm-up + {args.gen_runs} "
        f"timed runs (W1 says 5; the warm-up generates {WARMUP_TOKENS} tokens), median; load average before / after "
        f"the run: {settings.get('load_average_before_after', 'not recorded')} (2 cores: above ~2 other jobs shared them "
        f"and the speeds are noisy). "
        f"Resident memory: vmhwm_mib is the VmHWM (peak resident set) of a fresh worker process after loading "
        f"the saved folder and generating; model_rss_mib is that peak minus the worker's resident set just "
        f"before loading (Python, torch and memlm imported: ~225 MiB, the same for every row), i.e. what the "
        f"model, its tokenizer and its generation add; the resident-memory targets compare model_rss_mib. "
        f"Loading reads each tensor into private memory (no file mapping) and converts int4 layers one at a "
        f"time, so the peak holds no second copy of the weights. file_mib: model.safetensors. GPTQ and calibrated pruning: "
        f"{int(args.calib_tokens):,} calibration tokens from the train split. match_fp32_ids: how many of the 128 "
        f"generated ids equal the fp32 row's.\n\n## Targets\n\n| target | measured | status |\n|---|---|---|\n"
        f"{target_lines}\n\n## Rows"
    )
    if any(r.get("run", "main") != "main" for r in rows):
        columns.append("run")
        notes = notes.replace("\n\n## Targets", " Rows of a later partial run with the same settings are marked in "
                              "`run`.\n\n## Targets")
    extra = {"targets": checks, "settings": settings, "seconds": seconds}
    table = [{k: r.get(k) for k in columns} for r in rows]
    json_path, _ = write_results(name, table, extra={**extra, "rows_full": rows}, columns=columns, notes=notes)
    plot(rows, json_path.with_suffix(".png"))
    for c in checks:
        print(f"{c['status']:7s} {c['target']}: {c['value']}")
    print(f"done in {seconds:.0f} s")


if __name__ == "__main__":
    main()
