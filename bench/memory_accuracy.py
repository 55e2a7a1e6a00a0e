"""How good is the memory planner? Predicted vs measured peak memory, and plans run for real.

    python bench/memory_accuracy.py              # the matrix + the plan check (a few minutes)
    python bench/memory_accuracy.py --overhead   # re-measure the runtime overhead (RUNTIME_BYTES)
    python bench/memory_accuracy.py --only train-tiny  # rows whose name contains a string

Every measurement runs in a FRESH subprocess (this script's `--worker` mode), so one row's
allocator state cannot leak into the next. A worker imports torch + memlm, then measures with
memlm.memory.PeakMemory (CPU: VmHWM, reset at the start) around building the model and running
2 training steps exactly as memlm.train.loop does one (compute_loss, backward, clip, optimizer
step, zero_grad), or around one generation (static KV cache, prefill, decode at the end of the
context) of a model already built (and quantized). The number compared is the process's peak
RSS, which includes the runtime overhead; the estimate adds the overhead measured once
(memlm.memory.estimate.RUNTIME_BYTES), the same way.

Workers run with 1 torch thread and glibc told to return freed memory at once
(MALLOC_ARENA_MAX=1, MALLOC_MMAP_THRESHOLD_=65536, see docs/memory.md): otherwise the heap keeps
freed chunks and the RSS is a function of allocation history, not of what is alive.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
MIB = 2**20
ERROR_TARGET = 0.10  # |predicted - measured| / measured, for every row of >= 64 MiB
USE_TARGET = 0.80  # a plan under a tight budget uses at least this share of it


# ------------------------------------------------------------------------------ the worker


def _train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from memlm.config import TrainConfig, preset
    from memlm.memory.measure import PeakMemory
    from memlm.model import Decoder
    from memlm.train.loop import compute_loss
    from memlm.train.optim import build_optimizer, lr_at, set_lr

    cfg = preset(spec["model"], **spec.get("overrides", {}))
    tc = TrainConfig(**spec["train"])
    B, T = tc.micro_batch, tc.seq_len or cfg.block_size
    t0 = time.perf_counter()
    with PeakMemory("cpu") as pm:
        torch.manual_seed(0)
        model = Decoder(cfg)
        if tc.precision == "bf16":  # as memlm.train.loop: the weights themselves become bf16
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        model.checkpoint_every = tc.activation_checkpointing
        model.train()
        optimizer = build_optimizer(model, tc)
        g = torch.Generator().manual_seed(0)
        for step in (1, 2):
            set_lr(optimizer, lr_at(step, tc))
            for _ in range(tc.grad_accum):
                x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
                y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
                loss = compute_loss(model, x, y, tc) / tc.grad_accum
                loss.backward()
                loss.item()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"peak": pm.peak_bytes, "baseline": pm.baseline_bytes, "seconds": time.perf_counter() - t0}


def _infer_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    from memlm.config import preset
    from memlm.infer.generate import decode_one_token, prefill
    from memlm.memory.measure import PeakMemory
    from memlm.model import Decoder, KVCache

    cfg = preset(spec["model"], **spec.get("overrides", {}))
    inf = spec["infer"]
    B, ctx, prompt, fmt = inf["batch"], inf["context"], inf["prompt_len"], inf["weight_format"]
    kv_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[inf["kv_dtype"]]
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    if fmt == "bf16":
        model.to(torch.bfloat16)
    elif fmt in ("int8", "int4"):
        from memlm.compress import quantize_model

        quantize_model(model, fmt, progress=False)
    gc.collect()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, prompt), generator=g)
    t0 = time.perf_counter()
    with PeakMemory("cpu") as pm:
        # what generation does (memlm.infer.generate): a static cache of the whole context,
        # a prefill of the prompt, then one token at a time (measured at the cache's end,
        # where attention reads the most keys)
        cache = KVCache(cfg, B, ctx, dtype=kv_dtype)
        with torch.no_grad():
            logits = prefill(model, ids, cache)
            cache.length = ctx - 3
            token = logits.argmax(-1)
            for _ in range(3):
                token = decode_one_token(model, token, cache).argmax(-1)
    return {"peak": pm.peak_bytes, "baseline": pm.baseline_bytes, "seconds": time.perf_counter() - t0}


def _overhead_worker(task: str) -> dict[str, Any]:
    """The runtime overhead: the same measurement as a row, for a model of ~50k parameters
    (tensors < 1 MiB). task: "train", "train-bf16" (bf16 kernels load their own code and
    scratch), "infer"."""
    spec = {"model": "tiny", "overrides": dict(n_layer=1, n_embd=64, n_head=2, n_kv_heads=1, ffn_hidden=128,
                                               vocab_size=256, block_size=64)}
    if task.startswith("train"):
        precision = "bf16-autocast" if task == "train-bf16" else "fp32"
        return _train_worker({**spec, "train": {"micro_batch": 1, "seq_len": 16, "precision": precision}})
    return _infer_worker({**spec, "infer": {"batch": 1, "context": 32, "prompt_len": 16,
                                            "weight_format": "fp32", "kv_dtype": "fp32"}})


def worker_main(spec: dict[str, Any]) -> None:
    import importlib

    import torch

    torch.set_num_threads(1)
    for module in ("memlm", "memlm.model", "memlm.train.loop"):  # a real run has these loaded
        importlib.import_module(module)
    from memlm.memory.measure import current_rss_bytes

    imported = current_rss_bytes()
    if spec["task"] == "overhead":
        out = _overhead_worker(spec["what"])
    elif spec["task"] == "train":
        out = _train_worker(spec)
    else:
        out = _infer_worker(spec)
    print("RESULT " + json.dumps({**out, "imported": imported}))


def run_worker(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    env = {**os.environ, **WORKER_ENV}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-2000:]}")


# ------------------------------------------------------------------------------ the matrix


def _train(name: str, model: str, overrides: dict | None = None, **train: Any) -> dict[str, Any]:
    return {"name": name, "task": "train", "model": model, "overrides": overrides or {}, "train": train}


def _infer(name: str, model: str, batch: int, context: int, prompt_len: int, weight_format: str = "fp32",
           kv_dtype: str = "fp32", overrides: dict | None = None) -> dict[str, Any]:
    return {"name": name, "task": "infer", "model": model, "overrides": overrides or {},
            "infer": dict(batch=batch, context=context, prompt_len=prompt_len, weight_format=weight_format,
                          kv_dtype=kv_dtype)}


def matrix() -> list[dict[str, Any]]:
    """Rows that fit 24 GiB and run in a few minutes on 2 cores (1 thread per worker)."""
    gpt2_4 = dict(n_layer=4)
    return [
        # tiny (4M params, RoPE, GQA, SwiGLU, RMSNorm): activations and logits dominate
        _train("train-tiny-b1-t128", "tiny", micro_batch=1, seq_len=128),
        _train("train-tiny-b8-t256", "tiny", micro_batch=8, seq_len=256),
        _train("train-tiny-b16-t256-ckpt1", "tiny", micro_batch=16, seq_len=256, activation_checkpointing=1),
        _train("train-tiny-b16-t256-chunk512", "tiny", micro_batch=16, seq_len=256, loss_chunk=512),
        _train("train-tiny-b4-t256-sgd-accum2", "tiny", micro_batch=4, seq_len=256, optimizer="sgd", grad_accum=2),
        _train("train-tiny-b8-t256-adafactor", "tiny", micro_batch=8, seq_len=256, optimizer="adafactor"),
        _train("train-tiny-b8-t256-adamw8bit", "tiny", micro_batch=8, seq_len=256, optimizer="adamw8bit"),
        _train("train-tiny-b8-t256-bf16", "tiny", micro_batch=8, seq_len=256, precision="bf16"),
        _train("train-tiny-b8-t256-autocast", "tiny", micro_batch=8, seq_len=256, precision="bf16-autocast"),
        _train("train-tiny-b8-t256-fused", "tiny", micro_batch=8, seq_len=256, fused_backward=True, grad_clip=0.0),
        # w3 (the standard workload: 30M params, vocab 49k, GELU, LayerNorm)
        _train("train-w3-b8-t256", "w3", micro_batch=8, seq_len=256),
        _train("train-w3-b8-t256-chunk1024", "w3", micro_batch=8, seq_len=256, loss_chunk=1024),
        _train("train-w3-b8-t256-ckpt2", "w3", micro_batch=8, seq_len=256, activation_checkpointing=2),
        _train("train-w3-b4-t256-dropout", "w3", {"dropout": 0.1}, micro_batch=4, seq_len=256),
        # gpt2 (124M) and a 4-layer gpt2: weights and optimizer states dominate
        _train("train-gpt2L4-b2-t512", "gpt2", gpt2_4, micro_batch=2, seq_len=512),
        _train("train-gpt2L4-b2-t1024-ckpt1-chunk256", "gpt2", gpt2_4, micro_batch=2, seq_len=1024,
               activation_checkpointing=1, loss_chunk=256),
        _train("train-gpt2L4-b16-t128-autocast", "gpt2", gpt2_4, micro_batch=16, seq_len=128,
               precision="bf16-autocast"),
        _train("train-gpt2-b1-t128", "gpt2", micro_batch=1, seq_len=128),
        _train("train-gpt2-b1-t256-adafactor", "gpt2", micro_batch=1, seq_len=256, optimizer="adafactor"),
        _train("train-gpt2-b1-t256-adamw8bit", "gpt2", micro_batch=1, seq_len=256, optimizer="adamw8bit"),
        _train("train-gpt2-b2-t256-sgd", "gpt2", micro_batch=2, seq_len=256, optimizer="sgd"),
        _train("train-gpt2-b1-t1024-ckpt1-chunk256", "gpt2", micro_batch=1, seq_len=1024,
               activation_checkpointing=1, loss_chunk=256),
        _train("train-smollm2L8-b2-t512", "smollm2-135m", {"n_layer": 8}, micro_batch=2, seq_len=512),
        # generation: static KV cache at several contexts, quantized weights
        _infer("infer-tiny-b16-ctx256", "tiny", 16, 256, 128),
        _infer("infer-gpt2-b1-ctx1024", "gpt2", 1, 1024, 512),
        _infer("infer-gpt2-b8-ctx1024", "gpt2", 8, 1024, 256),
        _infer("infer-gpt2-b4-ctx512-bf16", "gpt2", 4, 512, 256, "bf16", "bf16"),
        _infer("infer-gpt2-b4-ctx512-int8", "gpt2", 4, 512, 256, "int8"),
        _infer("infer-gpt2-b4-ctx512-int4", "gpt2", 4, 512, 256, "int4"),
        _infer("infer-smollm2-b4-ctx2048", "smollm2-135m", 4, 2048, 256),
        _infer("infer-smollm2-b8-ctx4096-int4", "smollm2-135m", 8, 4096, 128, "int4"),
    ]


def predict(row: dict[str, Any]):
    from memlm.config import TrainConfig, preset
    from memlm.memory.estimate import estimate_inference, estimate_training

    cfg = preset(row["model"], **row.get("overrides", {}))
    if row["task"] == "train":
        return estimate_training(cfg, TrainConfig(**row["train"]), device="cpu")
    i = row["infer"]
    return estimate_inference(cfg, batch=i["batch"], context=i["context"], weight_format=i["weight_format"],
                              kv_dtype=i["kv_dtype"], prompt_len=i["prompt_len"])


def _settings_text(row: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in row.get("overrides", {}).items()]
    parts += [f"{k}={v}" for k, v in row.get(row["task"], {}).items()]
    return " ".join(parts)


def run_workers(specs: list[dict[str, Any]], jobs: int) -> list[dict[str, Any] | Exception]:
    """Each spec in its own fresh process, `jobs` at a time (RSS is per process: running two side
    by side changes the wall time, not what either measures)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(spec: dict[str, Any]) -> dict[str, Any] | Exception:
        try:
            return run_worker(spec)
        except Exception as e:  # a row that cannot run is reported, not hidden
            return e

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, specs))


def run_matrix(rows: list[dict[str, Any]], jobs: int = 2) -> list[dict[str, Any]]:
    out = []
    for row, m in zip(rows, run_workers(rows, jobs)):
        b = predict(row)
        if isinstance(m, Exception):
            print(f"{row['name']}: FAILED {m}", file=sys.stderr)
            out.append({"name": row["name"], "task": row["task"], "settings": _settings_text(row),
                        "predicted_mib": b.total / MIB, "measured_mib": None, "error_pct": None,
                        "status": "failed"})
            continue
        err = (b.total - m["peak"]) / m["peak"]
        ok = abs(err) <= ERROR_TARGET or m["peak"] < 64 * MIB
        out.append({
            "name": row["name"], "task": row["task"], "model": row["model"], "settings": _settings_text(row),
            "predicted_mib": b.total / MIB, "measured_mib": m["peak"] / MIB, "error_pct": 100 * err,
            "peak_phase": b.peak_phase, "imported_mib": m["imported"] / MIB, "seconds": m["seconds"],
            "status": "ok" if ok else "MISS", "terms_mib": {t.name: round(t.bytes / MIB, 2) for t in b.terms},
        })
        print(f"{row['name']:<44} predicted {b.total / MIB:9.1f} MiB  measured {m['peak'] / MIB:9.1f} MiB  "
              f"error {100 * err:+6.2f}%  ({b.peak_phase}, {m['seconds']:.0f} s)", flush=True)
    return out


# ------------------------------------------------------------------------------ the plan check

PLAN_MODEL = "tiny"
PLAN_SEQ_LEN = 256
PLAN_GLOBAL_TOKENS = 32 * 256


def run_plan_check(jobs: int = 2) -> list[dict[str, Any]]:
    """Ten budgets from generous to impossible; each feasible plan is run in a fresh worker."""
    from memlm.config import TrainConfig, preset
    from memlm.memory.plan import plan_training

    cfg = preset(PLAN_MODEL)
    base = TrainConfig(micro_batch=32, grad_accum=1, seq_len=PLAN_SEQ_LEN)
    need = plan_training(cfg, base, 1 << 50, global_batch_tokens=PLAN_GLOBAL_TOKENS).predicted_peak
    fractions = [1.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.42, 0.36, 0.3, 0.2]
    plans = []
    for frac in fractions:
        budget = int(need * frac)
        plans.append((frac, budget, plan_training(cfg, base, budget, global_batch_tokens=PLAN_GLOBAL_TOKENS)))
    keys = ("micro_batch", "grad_accum", "seq_len", "precision", "optimizer", "fused_backward",
            "activation_checkpointing", "loss_chunk", "grad_clip")
    specs = [{"task": "train", "model": PLAN_MODEL, "overrides": {},
              "train": {k: plan.settings[k] for k in keys}} for _, _, plan in plans if plan.feasible]
    measured = iter(run_workers(specs, jobs))
    rows = []
    for frac, budget, plan in plans:
        row: dict[str, Any] = {"budget_mib": budget / MIB, "budget_share_of_need": frac, "feasible": plan.feasible}
        if not plan.feasible:
            row.update(plan=f"infeasible; smallest budget that fits {plan.min_budget / MIB:.0f} MiB",
                       status="ok" if plan.min_budget > budget else "MISS")
            rows.append(row)
            print(f"budget {budget / MIB:8.1f} MiB: {row['plan']}", flush=True)
            continue
        m = next(measured)
        train = {k: plan.settings[k] for k in keys}
        row["plan"] = ", ".join(f"{k}={v}" for k, v in train.items())
        if isinstance(m, Exception):
            row.update(status="failed", error=str(m)[-500:])
            rows.append(row)
            continue
        used = m["peak"] / budget
        ok = m["peak"] <= budget and (frac >= 1.0 or used >= USE_TARGET)
        row.update(cost=round(plan.cost, 3), tradeoffs="; ".join(plan.tradeoffs) or "none",
                   predicted_mib=plan.predicted_peak / MIB, measured_mib=m["peak"] / MIB,
                   used_pct=100 * used, status="ok" if ok else "MISS")
        rows.append(row)
        print(f"budget {budget / MIB:8.1f} MiB: measured {m['peak'] / MIB:8.1f} MiB ({100 * used:.0f}%), "
              f"cost x{plan.cost:.3f}: {row['plan']}", flush=True)
    return rows


# ------------------------------------------------------------------------------ overhead


def measure_overhead(runs: int = 3) -> dict[str, int]:
    out = {}
    for what in ("train", "train-bf16", "infer"):
        results = [run_worker({"task": "overhead", "what": what}) for _ in range(runs)]
        out[what] = int(statistics.median(r["peak"] for r in results))
        out["import"] = int(statistics.median(r["imported"] for r in results))
    return out


# ------------------------------------------------------------------------------ main


def scatter_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for task, marker in (("train", "o"), ("infer", "s")):
        pts = [(r["measured_mib"], r["predicted_mib"]) for r in rows if r["task"] == task and r["measured_mib"]]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=task, alpha=0.8)
    values = [v for r in rows if r["measured_mib"] for v in (r["measured_mib"], r["predicted_mib"])]
    lo, hi = min(values) / 1.3, max(values) * 1.3
    ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="y = x")
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="gray", alpha=0.15,
                    label="±10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured peak RSS (MiB)")
    ax.set_ylabel("predicted peak (MiB)")
    ax.set_title("memlm memory estimate vs measurement (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--overhead", action="store_true", help="measure the runtime overhead and exit")
    parser.add_argument("--only", help="run only the matrix rows whose name contains this")
    parser.add_argument("--no-plans", action="store_true", help="skip the plan check")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at a time (default 2)")
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    if args.overhead:
        print(json.dumps({k: f"{v / MIB:.1f} MiB" for k, v in measure_overhead().items()}))
        return

    from bench.common import RESULTS, write_results
    from memlm.memory.estimate import RUNTIME_BYTES

    t0 = time.perf_counter()
    overhead = measure_overhead(runs=1)
    print("runtime overhead now:", {k: f"{v / MIB:.1f} MiB" for k, v in overhead.items()},
          "recorded:", {k: f"{v / MIB:.1f} MiB" for k, v in RUNTIME_BYTES["cpu"].items()}, flush=True)
    rows = matrix()
    if args.only:
        rows = [r for r in rows if args.only in r["name"]]
    results = run_matrix(rows, args.jobs)
    plans = [] if (args.no_plans or args.only) else run_plan_check(args.jobs)

    measured = [r for r in results if r["measured_mib"]]
    big = [r for r in measured if r["measured_mib"] >= 64]
    max_err = max((abs(r["error_pct"]) for r in big), default=0.0)
    misses = [r["name"] for r in results if r["status"] != "ok"]
    plan_misses = [p for p in plans if p["status"] != "ok"]
    summary = {
        "rows": len(results), "max_abs_error_pct": max_err,
        "mean_abs_error_pct": statistics.mean(abs(r["error_pct"]) for r in big) if big else None,
        "misses": misses, "plan_budgets": len(plans), "plan_misses": len(plan_misses),
        "runtime_overhead_measured_mib": {k: v / MIB for k, v in overhead.items()},
        "runtime_overhead_recorded_mib": {k: v / MIB for k, v in RUNTIME_BYTES["cpu"].items()},
        "worker_env": WORKER_ENV, "seconds": time.perf_counter() - t0,
    }
    name = "memory_accuracy" if not args.only else "memory_accuracy-partial"
    table = [{k: r.get(k) for k in ("name", "settings", "predicted_mib", "measured_mib", "error_pct", "peak_phase",
                                     "status")} for r in results]
    plan_table = "\n".join(
        f"| {p['budget_mib']:.0f} | {p['budget_share_of_need']:.2f} | {p.get('predicted_mib') or 0:.0f} | "
        f"{p.get('measured_mib') or 0:.0f} | {p.get('used_pct') or 0:.0f}% | {p.get('cost', '')} | {p['plan']} | "
        f"{p.get('tradeoffs', '')} | {p['status']} |" for p in plans)
    notes = (
        f"Predicted (memlm.memory.estimate) vs measured peak RSS of a fresh worker process, CPU, 1 thread, "
        f"{' '.join(f'{k}={v}' for k, v in WORKER_ENV.items())}. Max |error| over rows >= 64 MiB: "
        f"{max_err:.2f}% (target 10%). Misses: {', '.join(misses) or 'none'}.\n\n"
        "Every setting runs through memlm's own code (compute_loss, build_optimizer, quantize_model, "
        "prefill/decode_one_token). Not measured: DDP/FSDP (nproc > 1 is not implemented in the loop yet; "
        "their terms are modelled only) and CUDA (no GPU).\n\n"
        f"Runtime overhead recorded in estimate.py: "
        + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in RUNTIME_BYTES['cpu'].items())
        + "; measured in this run: " + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in overhead.items()) + "."
        + (f"\n\n## Plans run for real ({PLAN_MODEL}, seq_len {PLAN_SEQ_LEN}, global batch {PLAN_GLOBAL_TOKENS} "
           f"tokens; a plan must stay within its budget and, below the unconstrained need, use >= 80% of "
           f"it)\n\n| budget MiB | share of unconstrained need | predicted MiB | measured MiB | used | cost | plan "
           f"| traded away | status |\n|---|---|---|---|---|---|---|---|---|\n{plan_table}\n\n## Matrix"
           if plans else "")
    )
    write_results(name, table, extra={"summary": summary, "rows_full": results, "plans": plans}, notes=notes)
    if not args.only:
        import datetime as dt

        scatter_plot(results, RESULTS / f"{name}-{dt.date.today().isoformat()}.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "worker_env"}, indent=1))


if __name__ == "__main__":
    main()
