"""Fine-tuning SmolLM2-135M inside a budget: full, LoRA, QLoRA, QLoRA + checkpointing; and classification.

    python bench/finetune_memory.py                 # the four fine-tuning rows and the classification table
    python bench/finetune_memory.py --only qlora    # rows whose name contains this
    python bench/finetune_memory.py --steps 2       # a quick check of the plumbing (labelled QUICK)
    python bench/finetune_memory.py --classify-only # the classification table alone

Each row is the real `memlm finetune` command in a fresh process, default environment (glibc's
allocator defaults, torch's default threads), on the embedded instruction set, CPU, seq 512,
micro-batch 4, 100 steps (the W-FT workload):

  measured peak    ru_maxrss of the command (its VmHWM, start to exit: loading, training, evaluating)
  predicted peak   the prediction the command printed itself (memlm.memory.estimate.estimate_finetune)
  tokens/s         the training throughput it printed (padded tokens, as the loop counts them)
  held-out loss    mean loss per assistant token over the held-out questions, before (the base)
                   and after training, as the command printed them

Targets (issue 16): QLoRA's peak <= 30% of the full fine-tune's; LoRA and QLoRA both lower the
held-out loss clearly, QLoRA's final loss within 3% of LoRA's.

Classification (the embedded docstring set, held-out split): SmolLM2 + LoRA, `tiny` trained from
scratch, and the majority class, through `memlm finetune --task classify` and `memlm eval --task
classify --json`.

The load average is read before and after every row and written beside it: this is a shared
2-core machine, and tokens/s (not the peaks or the losses) depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import load_average, write_results  # noqa: E402
from bench.memory_accuracy import WORK, parse_report, run_command  # noqa: E402

MIB = 2**20
STEPS = 100
COMMON = ["finetune", "--seq-len", "512", "--micro-batch", "4"]
ROWS = {
    "full fine-tune (fp32 AdamW)": ["--full"],
    "LoRA r=8": ["--quantize-base", "none", "--lora-r", "8", "--lr", "5e-4"],
    "QLoRA int4 r=8": ["--quantize-base", "int4", "--lora-r", "8", "--lr", "5e-4"],
    "QLoRA int4 r=8 + checkpointing": ["--quantize-base", "int4", "--lora-r", "8", "--lr", "5e-4",
                                       "--set", "train.activation_checkpointing=1"],
}
CLASSIFY = {  # name: (arguments, steps)
    "SmolLM2-135M + LoRA r=8": (["--quantize-base", "none", "--lora-r", "8", "--lora-targets", "all-linear",
                                 "--seq-len", "256", "--micro-batch", "8", "--lr", "5e-4"], 100),
    "tiny from scratch": (["--model", "tiny", "--full", "--seq-len", "256", "--micro-batch", "8", "--lr", "2e-3"], 300),
}
LOSSES = re.compile(r"held-out loss ([\d.]+) -> ([\d.]+); ([\d,]+) tokens/s")


def finetune_row(name: str, extra: list[str], steps: int) -> dict[str, Any]:
    out = f"runs/bench-ft-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"
    shutil.rmtree(WORK / out, ignore_errors=True)
    load_before = load_average()
    r = run_command(COMMON + extra + ["--steps", str(steps), "--out", out], timeout=4 * 3600)
    text = r["stdout"] + r["stderr"]
    m = LOSSES.search(text)
    predicted = parse_report(text)
    row = {"row": name, "exit": r["code"], "measured_mib": r["measured"] / MIB if r["measured"] else None,
           "predicted_mib": predicted / MIB if predicted else None,
           "tokens_per_s": float(m.group(3).replace(",", "")) if m else None,
           "loss_before": float(m.group(1)) if m else None, "loss_after": float(m.group(2)) if m else None,
           "seconds": round(r["seconds"]), "load_before": load_before, "load_after": load_average()}
    if row["measured_mib"] and row["predicted_mib"]:
        row["error"] = f"{row['predicted_mib'] / row['measured_mib'] - 1:+.1%}"
    if r["code"] != 0:
        row["stderr_tail"] = r["stderr"][-2000:]
    print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), flush=True)
    return row


def classify_rows(scale: float = 1.0) -> list[dict[str, Any]]:
    rows = []
    baseline = None
    for name, (extra, steps) in CLASSIFY.items():
        steps = max(1, round(steps * scale))
        out = f"runs/bench-cls-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"
        shutil.rmtree(WORK / out, ignore_errors=True)
        load_before = load_average()
        t = run_command(["finetune", "--task", "classify", *extra, "--steps", str(steps), "--out", out],
                        timeout=4 * 3600)
        row: dict[str, Any] = {"row": name, "exit": t["code"], "train_seconds": round(t["seconds"]),
                               "measured_mib": t["measured"] / MIB if t["measured"] else None,
                               "load_before": load_before}
        if t["code"] == 0:
            e = run_command(["eval", "--task", "classify", "--model", out, "--json",
                             "--plot", f"{out}/confusion.png"])
            if e["code"] == 0:
                result = json.loads(e["stdout"])
                row.update(accuracy=result["accuracy"], macro_f1=result["macro_f1"], n=result["n"])
                baseline = result["baseline"]
                png = WORK / out / "confusion.png"
                if png.is_file():
                    dest = ROOT / "bench" / "results" / f"finetune_classify-{out.rpartition('-cls-')[2]}.png"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(png, dest)
            else:
                row["stderr_tail"] = e["stderr"][-2000:]
        else:
            row["stderr_tail"] = t["stderr"][-2000:]
        row["load_after"] = load_average()
        print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), flush=True)
        rows.append(row)
    if baseline is not None:
        rows.append({"row": "majority class", "accuracy": baseline["accuracy"], "macro_f1": baseline["macro_f1"],
                     "n": baseline["n"]})
    return rows


def targets(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["row"]: r for r in rows}
    full, lora, qlora = (by.get(k) for k in ("full fine-tune (fp32 AdamW)", "LoRA r=8", "QLoRA int4 r=8"))
    out = []
    if full and full.get("measured_mib"):
        for name in ("QLoRA int4 r=8", "QLoRA int4 r=8 + checkpointing"):
            if by.get(name, {}).get("measured_mib"):
                ratio = by[name]["measured_mib"] / full["measured_mib"]
                out.append(f"{name} peak / full fine-tune peak: {ratio:.3f} (target <= 0.30: "
                           f"{'met' if ratio <= 0.30 else 'NOT met'})")
    for r in (lora, qlora):
        if r and r.get("loss_after") is not None:
            out.append(f"{r['row']}: held-out loss {r['loss_before']:.4f} -> {r['loss_after']:.4f} "
                       f"({r['loss_after'] / r['loss_before'] - 1:+.1%})")
    if lora and qlora and lora.get("loss_after") and qlora.get("loss_after"):
        rel = qlora["loss_after"] / lora["loss_after"] - 1
        out.append(f"QLoRA final loss vs LoRA's: {rel:+.2%} (target within 3%: {'met' if abs(rel) <= 0.03 else 'NOT met'})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="rows whose name contains this")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--no-classify", action="store_true")
    parser.add_argument("--classify-only", action="store_true", help="the classification table alone")
    args = parser.parse_args()
    (WORK / "runs").mkdir(parents=True, exist_ok=True)
    rows = [finetune_row(n, extra, args.steps) for n, extra in ROWS.items()
            if not args.classify_only and (not args.only or args.only in n)]
    cls = [] if args.no_classify else classify_rows(args.steps / STEPS)
    quick = args.steps != STEPS
    summary = targets(rows)
    notes = ("QUICK (not the W-FT workload: " + f"{args.steps} steps)\n\n" if quick else "") + (
        f"`memlm finetune` on SmolLM2-135M-Instruct, the embedded instruction set, CPU, seq 512, micro-batch 4, "
        f"{args.steps} steps; each row a fresh process, default environment; measured = ru_maxrss; load average "
        f"(1/5/15 min) read before and after each row.\n\n" + "\n".join(f"- {t}" for t in summary))
    if cls:
        from bench.common import markdown_table

        notes += ("\n\nClassification (embedded stdlib-docstring families, held-out split; SmolLM2 "
                  f"{CLASSIFY['SmolLM2-135M + LoRA r=8'][1]} steps, tiny {CLASSIFY['tiny from scratch'][1]} steps, "
                  "scaled like --steps):\n\n" + markdown_table(
                      cls, ["row", "accuracy", "macro_f1", "n", "train_seconds", "measured_mib", "load_before",
                            "load_after"]))
    name = ("finetune_classify" if args.classify_only else "finetune_memory") + ("-quick" if quick or args.only else "")
    write_results(name, rows, extra={"targets": summary, "classification": cls},
                  columns=["row", "measured_mib", "predicted_mib", "error", "tokens_per_s", "loss_before",
                           "loss_after", "seconds", "load_before", "load_after"], notes=notes)


if __name__ == "__main__":
    main()
