"""How good is the memory planner? Predicted vs measured peak memory, and plans run for real.

    python bench/memory_accuracy.py              # the matrix + the plan check (a few minutes)
    python bench/memory_accuracy.py --overhead   # re-measure the runtime overhead (RUNTIME_BYTES)
    python bench/memory_accuracy.py --only train-tiny  # rows whose name contains a string
    python bench/memory_accuracy.py --only-distributed --merge
        # the 2-process rows (DDP/FSDP under torchrun, gloo; ~3 minutes), merged into the latest
        # full results (bench/results/memory_accuracy-<date>.{json,md,png}) without re-running the rest

Every measurement runs in a FRESH subprocess (this script's `--worker` mode), so one row's
allocator state cannot leak into the next. A worker imports torch + memlm, then measures with
memlm.memory.PeakMemory (CPU: VmHWM, reset at the start) around building the model and running
2 training steps exactly as memlm.train.loop does one (compute_loss, backward, clip, optimizer
step, zero_grad), or around one generation (static KV cache, prefill, decode at the end of the
context) of a model already built (and quantized). The number compared is the process's peak
RSS, which includes the runtime overhead; the estimate adds the overhead measured once
(memlm.memory.estimate.RUNTIME_BYTES), the same way.

A distributed row is a torchrun job of 2 such processes (memlm.train.distributed: gloo, DDP or
FSDP2, each rank half of the global micro-batch); each rank measures its own peak RSS the same
way, over 3 steps (DDP's rebuilt gradient buckets are first resident in step 3), and the row's
measured peak is the largest rank's (as the training loop reports it).

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
    from memlm.train.loop import apply_train_settings, compute_loss
    from memlm.train.optim import build_optimizer, lr_at, set_lr

    cfg = preset(spec["model"], **spec.get("overrides", {}))
    tc = TrainConfig(**spec["train"])
    B, T = tc.micro_batch, tc.seq_len or cfg.block_size
    t0 = time.perf_counter()
    with PeakMemory("cpu") as pm:
        torch.manual_seed(0)
        model = Decoder(cfg)
        apply_train_settings(model, tc)  # as memlm.train.loop: bf16 weights, checkpointing
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


def _train_dist_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of a torchrun job: the steps of `_train_worker` as memlm.train.loop runs them on
    several processes (memlm.train.distributed: gloo, the model wrapped by DDP or sharded by
    FSDP2, this rank's rows of the global micro-batch, the loss averaged over the ranks).
    Three steps, not two: DDP rebuilds its gradient buckets at the start of step 2 (in the order
    the gradients arrived in step 1), and the new buckets are first resident during step 3.
    Returns every rank's numbers on rank 0 (an empty dict on the others)."""
    import torch
    import torch.distributed as dist

    from memlm.config import TrainConfig, preset
    from memlm.memory.measure import PeakMemory, current_rss_bytes
    from memlm.model import Decoder
    from memlm.train import distributed
    from memlm.train.loop import apply_train_settings, compute_loss
    from memlm.train.optim import build_optimizer, lr_at, set_lr

    cfg = preset(spec["model"], **spec.get("overrides", {}))
    tc = TrainConfig(**spec["train"])
    imported = current_rss_bytes()
    ctx = distributed.setup(tc, torch.device("cpu"))  # joins the gloo group, as the loop does first
    joined = current_rss_bytes()
    B, T = tc.micro_batch, tc.seq_len or cfg.block_size
    b = B // ctx.world_size
    rows = slice(ctx.rank * b, (ctx.rank + 1) * b)
    t0 = time.perf_counter()
    with PeakMemory("cpu") as pm:
        torch.manual_seed(0)
        model = Decoder(cfg)
        apply_train_settings(model, ctx.model_settings(tc))
        net = ctx.wrap(model)
        optimizer = build_optimizer(model, tc)
        model.train()
        g = torch.Generator().manual_seed(0)
        for step in (1, 2, 3):
            set_lr(optimizer, lr_at(step, tc))
            loss_sum = 0.0
            for k in range(tc.grad_accum):
                x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)[rows]
                y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)[rows]
                ctx.sync_gradients(net, now=k == tc.grad_accum - 1)
                loss = compute_loss(net, x, y, tc) / tc.grad_accum
                loss.backward()
                loss_sum += loss.item()
            if tc.grad_clip > 0:
                ctx.clip_grad_norm(model, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ctx.mean(loss_sum)
    mine = {"rank": ctx.rank, "peak": pm.peak_bytes, "baseline": pm.baseline_bytes, "imported": imported,
            "joined": joined, "seconds": time.perf_counter() - t0}
    ranks: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(ranks, mine)
    distributed.shutdown()
    return {"ranks": ranks} if ctx.is_main else {}


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


OVERHEAD_MODEL = {"model": "tiny", "overrides": dict(n_layer=1, n_embd=64, n_head=2, n_kv_heads=1, ffn_hidden=128,
                                                    vocab_size=256, block_size=64)}
DIST_WORLD = 2  # processes of the distributed rows (and of their overhead measurement)


def _overhead_worker(task: str) -> dict[str, Any]:
    """The runtime overhead: the same measurement as a row, for a model of ~50k parameters
    (tensors < 1 MiB). task: "train", "train-bf16" (bf16 kernels load their own code and
    scratch), "infer"; "train-ddp" and "train-fsdp" run as one rank of a 2-process job."""
    spec = OVERHEAD_MODEL
    if task in ("train-ddp", "train-fsdp"):
        return _train_dist_worker({**spec, "train": {"micro_batch": DIST_WORLD, "seq_len": 16,
                                                     "strategy": task.split("-")[1]}})
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
    elif spec["task"] == "train-dist":
        out = _train_dist_worker(spec)
    else:
        out = _infer_worker(spec)
    if out:  # a distributed job: rank 0 reports for every rank
        print("RESULT " + json.dumps({"imported": imported, **out}))


def _is_distributed(spec: dict[str, Any]) -> bool:
    return spec["task"] == "train-dist" or (spec["task"] == "overhead" and spec["what"] in ("train-ddp",
                                                                                            "train-fsdp"))


def run_worker(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """One measurement in a fresh process; a distributed one as a torchrun job of DIST_WORLD fresh
    processes (each measures its own peak RSS: the row's peak is their maximum, as the loop's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WORKER_ENV)
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    if _is_distributed(spec):
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={DIST_WORLD}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            if "ranks" in out:
                ranks = out["ranks"]
                out.update(peak=max(r["peak"] for r in ranks), imported=max(r["imported"] for r in ranks),
                           seconds=max(r["seconds"] for r in ranks))
            return out
    raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-2000:]}")


# ------------------------------------------------------------------------------ the matrix


def _train(name: str, model: str, overrides: dict | None = None, **train: Any) -> dict[str, Any]:
    return {"name": name, "task": "train", "model": model, "overrides": overrides or {}, "train": train}


def _dist(name: str, strategy: str, model: str, overrides: dict | None = None, **train: Any) -> dict[str, Any]:
    """A training row on DIST_WORLD processes (torchrun, gloo); micro_batch is the global one."""
    return {"name": name, "task": "train-dist", "model": model, "overrides": overrides or {},
            "world_size": DIST_WORLD, "strategy": strategy,
            "train": {**train, "strategy": strategy, "nproc": DIST_WORLD}}


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
    ] + distributed_matrix()


def distributed_matrix() -> list[dict[str, Any]]:
    """Rows of the matrix above (same model and global settings) on 2 CPU processes (gloo):
    each rank takes half of the global micro-batch. Each job takes both cores: they run one at a time."""
    gpt2_4 = dict(n_layer=4)
    return [
        _dist("train-tiny-b8-t256-ddp2", "ddp", "tiny", micro_batch=8, seq_len=256),
        _dist("train-tiny-b8-t256-fsdp2", "fsdp", "tiny", micro_batch=8, seq_len=256),
        _dist("train-tiny-b16-t256-ckpt1-fsdp2", "fsdp", "tiny", micro_batch=16, seq_len=256,
              activation_checkpointing=1),
        # weights, gradients and AdamW states (1.1 GiB on one process) dominate: what sharding divides
        _dist("train-gpt2L4-b2-t512-ddp2", "ddp", "gpt2", gpt2_4, micro_batch=2, seq_len=512),
        _dist("train-gpt2L4-b2-t512-fsdp2", "fsdp", "gpt2", gpt2_4, micro_batch=2, seq_len=512),
    ]


def predict(row: dict[str, Any]):
    from memlm.config import TrainConfig, preset
    from memlm.memory.estimate import estimate_inference, estimate_training

    cfg = preset(row["model"], **row.get("overrides", {}))
    if row["task"] == "train":
        return estimate_training(cfg, TrainConfig(**row["train"]), device="cpu")
    if row["task"] == "train-dist":
        return estimate_training(cfg, TrainConfig(**row["train"]), device="cpu", world_size=row["world_size"],
                                 strategy=row["strategy"])
    i = row["infer"]
    return estimate_inference(cfg, batch=i["batch"], context=i["context"], weight_format=i["weight_format"],
                              kv_dtype=i["kv_dtype"], prompt_len=i["prompt_len"])


def _settings_text(row: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in row.get("overrides", {}).items()]
    if row["task"] == "train-dist":  # processes and strategy first, then the (global) settings
        parts = [f"nproc={row['world_size']}", f"strategy={row['strategy']}"] + parts
        parts += [f"{k}={v}" for k, v in row["train"].items() if k not in ("strategy", "nproc")]
        return " ".join(parts)
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

    # a distributed job already runs DIST_WORLD processes: those run one at a time, after the rest
    single = [i for i, sp in enumerate(specs) if not _is_distributed(sp)]
    multi = [i for i, sp in enumerate(specs) if _is_distributed(sp)]
    out: list[dict[str, Any] | Exception] = [{} for _ in specs]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for i, m in zip(single, pool.map(one, [specs[i] for i in single])):
            out[i] = m
    for i in multi:
        out[i] = one(specs[i])
    return out


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
        full = {
            "name": row["name"], "task": row["task"], "model": row["model"], "settings": _settings_text(row),
            "predicted_mib": b.total / MIB, "measured_mib": m["peak"] / MIB, "error_pct": 100 * err,
            "peak_phase": b.peak_phase, "imported_mib": m["imported"] / MIB, "seconds": m["seconds"],
            "status": "ok" if ok else "MISS", "terms_mib": {t.name: round(t.bytes / MIB, 2) for t in b.terms},
        }
        if "ranks" in m:  # the row's peak is the largest rank's, as memlm.train.loop reports it
            full.update(world_size=row["world_size"], strategy=row["strategy"],
                        ranks_measured_mib=[r["peak"] / MIB for r in m["ranks"]],
                        ranks_imported_mib=[r["imported"] / MIB for r in m["ranks"]])
        out.append(full)
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


OVERHEAD_KINDS = ("train", "train-bf16", "infer", "train-ddp", "train-fsdp")


def measure_overhead(runs: int = 3, kinds: tuple[str, ...] = OVERHEAD_KINDS) -> dict[str, int]:
    """Median peak of `runs` overhead workers per kind (train-ddp/-fsdp: the largest rank's)."""
    out = {}
    for what in kinds:
        results = [run_worker({"task": "overhead", "what": what}) for _ in range(runs)]
        out[what] = int(statistics.median(r["peak"] for r in results))
        if what == "train":
            out["import"] = int(statistics.median(r["imported"] for r in results))
    return out


# ------------------------------------------------------------------------------ main


def scatter_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for task, marker, label in (("train", "o", "train"), ("infer", "s", "infer"),
                                ("train-dist", "^", f"train, {DIST_WORLD} processes (DDP/FSDP)")):
        pts = [(r["measured_mib"], r["predicted_mib"]) for r in rows if r["task"] == task and r["measured_mib"]]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label, alpha=0.8)
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


TABLE_COLUMNS = ("name", "settings", "predicted_mib", "measured_mib", "error_pct", "peak_phase", "status")


def error_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    big = [r for r in results if r["measured_mib"] and r["measured_mib"] >= 64]
    return {
        "rows": len(results),
        "max_abs_error_pct": max((abs(r["error_pct"]) for r in big), default=0.0),
        "mean_abs_error_pct": statistics.mean(abs(r["error_pct"]) for r in big) if big else None,
        "misses": [r["name"] for r in results if r["status"] != "ok"],
    }


def render(name: str, results: list[dict[str, Any]], plans: list[dict[str, Any]], summary: dict[str, Any],
           day: str | None = None, plot: bool = True, meta: dict[str, Any] | None = None) -> None:
    """Write bench/results/<name>-<day>.{json,md} (and the scatter plot) from rows and plans.
    `meta`: header fields to keep (a merge keeps the commit of the run it merges into)."""
    import datetime as dt

    from bench.common import RESULTS, write_results
    from memlm.memory.estimate import RUNTIME_BYTES

    day = day or dt.date.today().isoformat()
    dist = [r for r in results if r["task"] == "train-dist" and r["measured_mib"]]
    dist_errors = [abs(r["error_pct"]) for r in dist]
    measured_overhead = summary.get("runtime_overhead_measured_mib", {})
    table = [{k: r.get(k) for k in TABLE_COLUMNS} for r in results]
    plan_table = "\n".join(
        f"| {p['budget_mib']:.0f} | {p['budget_share_of_need']:.2f} | {p.get('predicted_mib') or 0:.0f} | "
        f"{p.get('measured_mib') or 0:.0f} | {p.get('used_pct') or 0:.0f}% | {p.get('cost', '')} | {p['plan']} | "
        f"{p.get('tradeoffs', '')} | {p['status']} |" for p in plans)
    merged = summary.get("merged_runs", [])
    notes = (
        f"Predicted (memlm.memory.estimate) vs measured peak RSS of a fresh worker process, CPU, 1 thread, "
        f"{' '.join(f'{k}={v}' for k, v in WORKER_ENV.items())}. Max |error| over rows >= 64 MiB: "
        f"{summary['max_abs_error_pct']:.2f}% (target 10%). Misses: {', '.join(summary['misses']) or 'none'}.\n\n"
        "Every setting runs through memlm's own code (compute_loss, build_optimizer, quantize_model, "
        "prefill/decode_one_token; for the distributed rows memlm.train.distributed: setup, wrap, "
        "sync_gradients, clip_grad_norm). Not measured: CUDA (no GPU).\n\n"
        + (f"Distributed rows (`-ddp{DIST_WORLD}`, `-fsdp{DIST_WORLD}`): {DIST_WORLD} processes under torchrun "
           "(gloo), each a fresh process with the same environment, 3 steps (DDP's rebuilt gradient buckets "
           "are first resident in step 3); micro_batch is the global one (each rank takes half); measured = "
           "the largest rank's peak RSS (every rank's is in the JSON, `ranks_measured_mib`); predicted = "
           f"estimate_training(..., world_size={DIST_WORLD}, strategy=...). Max |error| "
           f"{max(dist_errors):.2f}%.\n\n" if dist_errors else "")
        + "Runtime overhead recorded in estimate.py: "
        + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in RUNTIME_BYTES['cpu'].items())
        + "; measured: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in measured_overhead.items()) + "."
        + "".join(f"\n\nRows {', '.join(m['rows'])} measured on {m['date']} (commit {m['commit']}) and merged "
                  f"into this run's results ({m['seconds']:.0f} s)." for m in merged)
        + (f"\n\n## Plans run for real ({PLAN_MODEL}, seq_len {PLAN_SEQ_LEN}, global batch {PLAN_GLOBAL_TOKENS} "
           f"tokens; a plan must stay within its budget and, below the unconstrained need, use >= 80% of "
           f"it)\n\n| budget MiB | share of unconstrained need | predicted MiB | measured MiB | used | cost | plan "
           f"| traded away | status |\n|---|---|---|---|---|---|---|---|---|\n{plan_table}\n\n## Matrix"
           if plans else "")
    )
    write_results(name, table, extra={**(meta or {}), "summary": summary, "rows_full": results, "plans": plans},
                  notes=notes, day=day)
    if plot:
        scatter_plot(results, RESULTS / f"{name}-{day}.png")


def latest_results(name: str = "memory_accuracy") -> Path:
    from bench.common import RESULTS

    found = sorted(RESULTS.glob(f"{name}-[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9].json"))
    if not found:
        raise SystemExit(f"no {RESULTS}/{name}-<date>.json to merge into: run the whole bench first")
    return found[-1]


def merge_into(path: Path, results: list[dict[str, Any]], overhead: dict[str, int], seconds: float) -> None:
    """Put this run's rows into an earlier full run's results (same name: replaced; new: appended),
    keep its other rows and its plan check, and re-render its markdown and plot."""
    import datetime as dt

    from bench.common import git_commit
    from memlm.memory.estimate import RUNTIME_BYTES

    old = json.loads(path.read_text())
    new_names = {r["name"] for r in results}
    rows = [r for r in old["rows_full"] if r["name"] not in new_names] + results
    summary = {**old["summary"], **error_summary(rows)}
    summary["runtime_overhead_measured_mib"] = {**old["summary"].get("runtime_overhead_measured_mib", {}),
                                                **{k: v / MIB for k, v in overhead.items()}}
    summary["runtime_overhead_recorded_mib"] = {k: v / MIB for k, v in RUNTIME_BYTES["cpu"].items()}
    runs = [m for m in summary.get("merged_runs", []) if not set(m["rows"]) <= new_names]
    summary["merged_runs"] = runs + [{"date": dt.date.today().isoformat(), "commit": git_commit(),
                                      "rows": sorted(new_names), "seconds": seconds}]
    render(old["name"], rows, old.get("plans", []), summary, day=old["date"], meta={"commit": old["commit"]})
    print(f"merged {len(results)} rows into {path.name} ({len(rows)} rows in all)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--overhead", action="store_true", help="measure the runtime overhead and exit")
    parser.add_argument("--only", help="run only the matrix rows whose name contains this")
    parser.add_argument("--only-distributed", action="store_true",
                        help=f"run only the {DIST_WORLD}-process rows (DDP/FSDP under torchrun; about 3 minutes)")
    parser.add_argument("--merge", action="store_true",
                        help="put this run's rows into the latest full results (bench/results/memory_accuracy-"
                             "<date>.*: rows of the same name replaced, the others and the plan check kept)")
    parser.add_argument("--no-plans", action="store_true", help="skip the plan check")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at a time (default 2)")
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    if args.overhead:
        print(json.dumps({k: f"{v / MIB:.1f} MiB" for k, v in measure_overhead().items()}))
        return

    from memlm.memory.estimate import RUNTIME_BYTES

    t0 = time.perf_counter()
    partial = bool(args.only or args.only_distributed)
    rows = distributed_matrix() if args.only_distributed else matrix()
    if args.only:
        rows = [r for r in rows if args.only in r["name"]]
    kinds = OVERHEAD_KINDS
    if args.only_distributed:
        kinds = ("train", "train-ddp", "train-fsdp")
    overhead = measure_overhead(runs=1, kinds=kinds)
    print("runtime overhead now:", {k: f"{v / MIB:.1f} MiB" for k, v in overhead.items()},
          "recorded:", {k: f"{v / MIB:.1f} MiB" for k, v in RUNTIME_BYTES["cpu"].items()}, flush=True)
    results = run_matrix(rows, args.jobs)
    plans = [] if (args.no_plans or partial) else run_plan_check(args.jobs)

    summary = {
        **error_summary(results), "plan_budgets": len(plans),
        "plan_misses": len([p for p in plans if p["status"] != "ok"]),
        "runtime_overhead_measured_mib": {k: v / MIB for k, v in overhead.items()},
        "runtime_overhead_recorded_mib": {k: v / MIB for k, v in RUNTIME_BYTES["cpu"].items()},
        "worker_env": WORKER_ENV, "seconds": time.perf_counter() - t0,
    }
    if args.merge:
        merge_into(latest_results(), results, overhead, summary["seconds"])
    else:
        render("memory_accuracy" if not partial else "memory_accuracy-partial", results, plans, summary,
               plot=not partial)
    print(json.dumps({k: v for k, v in summary.items() if k != "worker_env"}, indent=1))


if __name__ == "__main__":
    main()
