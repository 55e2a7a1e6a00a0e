"""Fit the heap-slack coefficients of memlm.memory.estimate to measured training rows.

    python bench/fit_slack.py RESULTS.json [more: a later file's row replaces an earlier's] [--adapters]

The slack of a training phase is a * (the phase's transients) + b * (weights + optimizer states)
(+ c * one block's activations under activation checkpointing): ALLOCATOR_SLACK["train"] and
CHECKPOINT_SLACK["train"], or with --adapters the "finetune" ones (adapters on a frozen base). Every phase's predicted total is linear in (a, b, c), so each single-process
`memlm train` / `memlm finetune` row of a memory_accuracy result is rebuilt here (the same model
and train settings through memlm.memory.plan.predict_for_cli), split into its four parts, and
shifted by what the command's own printed prediction held beyond the rebuilt one (its tokenizer
and data). The fit minimises the largest |predicted / measured - 1| over the rows (a grid), and
prints the rows' errors under the current and the fitted coefficients. Rows with a budget (the
planner chose their settings) or more than one process are left out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import memlm.memory.estimate as est  # noqa: E402
from memlm.cli import _parse_set, resolve_configs  # noqa: E402
from memlm.errors import MemlmError  # noqa: E402
from memlm.loading import model_config_of  # noqa: E402
from memlm.memory.plan import predict_for_cli  # noqa: E402

MIB = 2**20
WORK = ROOT / "bench" / ".work"


def settings(command: str) -> dict[str, Any] | None:
    """The model and the prediction arguments of one row's command; None for a row not fitted."""
    words = shlex.split(command)[1:]
    if words[0] not in ("train", "finetune") or "--memory-budget" in words or "--nproc" in words:
        return None
    opts: dict[str, Any] = {"set": []}
    i = 1
    while i < len(words):
        flag = words[i]
        value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
        opts.setdefault(flag, None)
        if flag == "--set":
            opts["set"].append(value)
        else:
            opts[flag] = value
        i += 2 if value is not None else 1
    sections = _parse_set(opts["set"])
    keys = dict(sections["train"])
    for flag, key, cast in (("--micro-batch", "micro_batch", int), ("--seq-len", "seq_len", int),
                            ("--optimizer", "optimizer", str), ("--precision", "precision", str)):
        if opts.get(flag) is not None:
            keys[key] = cast(opts[flag])
    keys.pop("tokenizer", None)
    task = words[0]
    finetune = None
    if task == "finetune":
        model = opts.get("--model") or "smollm2-135m-instruct"
        if "--full" not in opts:
            from memlm.adapters.lora import parse_targets
            from memlm.loading import layout_of

            base = opts.get("--quantize-base") or "int4"
            base = "fp32" if base == "none" else base
            path = str(WORK / model) if (WORK / model).is_dir() else model
            finetune = {"lora_r": int(opts.get("--lora-r") or 8),
                        "lora_targets": parse_targets(opts.get("--lora-targets") or "q_proj,v_proj"),
                        "base_format": base,
                        "layout": lambda f, p=path: {} if f == "fp32" else layout_of(p, f)}
            model = path
        cfg = model_config_of(model)
    else:  # as `memlm train` builds it: the preset, the flags, its own tokenizer's vocabulary
        cfg, tc = resolve_configs(None, opts.get("--preset") or "tiny", {"model": sections["model"], "train": {}})
        cfg = replace(cfg, vocab_size=tc.vocab_size)
    return {"task": task, "model_config": cfg, "train_keys": keys, "finetune": finetune}


def phases(row: dict[str, Any], a: float, b: float, c: float) -> dict[str, int]:
    """Each phase's predicted total of the row with slack coefficients (a, b, c)."""
    kind = "finetune" if row["finetune"] else "train"
    est.ALLOCATOR_SLACK[kind] = (a, b)
    est.CHECKPOINT_SLACK[kind] = c
    breakdown = predict_for_cli(row["model_config"], row["task"], None, dict(row["train_keys"]),
                                finetune=row["finetune"])
    return dict(breakdown.phases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--only", default="", help="rows whose name contains this")
    parser.add_argument("--at", help="a,b,c: the errors under these coefficients instead of a fit")
    parser.add_argument("--adapters", action="store_true",
                        help="fit the fine-tuning rows with adapters (ALLOCATOR_SLACK['finetune']) instead of training")
    parser.add_argument("--floor", type=float, default=-1.0,
                        help="fit only among coefficients whose every error is at least this (-0.05: no row under-predicted by more than 5%%)")
    parser.add_argument("--printed-with", help="a,b,c the rows' commands predicted with (default: the code's now)")
    args = parser.parse_args()
    kind = "finetune" if args.adapters else "train"
    current = (tuple(float(v) for v in args.printed_with.split(",")) if args.printed_with
               else (*est.ALLOCATOR_SLACK[kind], est.CHECKPOINT_SLACK[kind]))
    rows = []
    measured = {}  # a row of a later file replaces the one of the same name in an earlier file
    for path in args.results:
        measured.update({r["name"]: r for r in json.loads(path.read_text())["rows"]})
    for r in measured.values():
        if not (r.get("exit") == 0 and r.get("predicted_mib") and args.only in r["name"]):
            continue
        try:
            s = settings(r["command"])
            if s is None or bool(s["finetune"]) != args.adapters:
                continue
            base = phases(s, 0, 0, 0)
        except MemlmError as e:  # a command stored with its spaces unquoted ("[64, 128]")
            print(f"skipped {r['name']}: {e}")
            continue
        parts = [phases(s, *unit) for unit in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
        linear = {k: (base[k], *(p[k] - base[k] for p in parts)) for k in base}
        rebuilt = max(t0 + current[0] * u + current[1] * w + current[2] * q for t0, u, w, q in linear.values())
        shift = r["predicted_mib"] * MIB - rebuilt  # what the command counted beyond the rebuilt plan
        rows.append({"name": r["name"], "measured": r["measured_mib"] * MIB, "linear": linear, "shift": shift})
    if not rows:
        sys.exit("no single-process training rows in these results")

    def errors(a: float, b: float, c: float) -> list[float]:
        return [(max(t0 + a * u + b * w + c * q for t0, u, w, q in r["linear"].values()) + r["shift"])
                / r["measured"] - 1 for r in rows]

    grid = itertools.product([i / 50 for i in range(0, 101)], [i / 50 for i in range(0, 31)],
                             [i / 10 for i in range(0, 41)])
    best = (tuple(float(v) for v in args.at.split(",")) if args.at
            else min(grid, key=lambda abc: (min(es := errors(*abc)) < args.floor, max(map(abs, es)))))
    now, fitted = errors(*current), errors(*best)
    print(f"{'row':50s} {'measured MiB':>12s} {'printed':>8s} {'fitted':>8s}  shift MiB")
    for r, e0, e1 in zip(rows, now, fitted):
        print(f"{r['name']:50s} {r['measured'] / MIB:12.1f} {e0:+8.1%} {e1:+8.1%}  {r['shift'] / MIB:+.1f}")
    print(f"as printed (a, b, c = {current}): max |error| {max(map(abs, now)):.1%}")
    print(f"{'given' if args.at else 'fitted'} a, b, c = {best}: max |error| {max(map(abs, fitted)):.1%}")


if __name__ == "__main__":
    main()
