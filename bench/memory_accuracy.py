"""Predicted vs measured peak memory of memlm's real commands, and memory budgets run for real.

    python bench/memory_accuracy.py                # every row + the budget sweep (~40 min, 2 cores)
    python bench/memory_accuracy.py --only train   # rows and sweeps whose name contains a string
    python bench/memory_accuracy.py --no-sweep     # the rows only
    python bench/memory_accuracy.py --calibrate    # the runtime terms: commands on negligible models

A row is one `memlm ...` command as a user runs it: a fresh process, the default environment
(no MALLOC_* variables, torch's default thread count), from start to exit (imports, tokenizer
training, data preparation, loading, every step, evaluation, checkpoint writes, generation).
`measured` is the peak resident memory of the process and its children (ru_maxrss from wait4,
started through bench/launch.py so that it is the command's own and not this script's:
the VmHWM of the command, or of its largest torchrun rank); `predicted` is the one figure the
command printed itself (`peak memory: predicted X, measured Y`), so the bench judges exactly what
a user is told. A serve row starts the server, sends concurrent completions from threads on
127.0.0.1, then stops it with SIGINT.

The sweep runs each command under budgets from 1.2x its unconstrained prediction down to the
smallest budget the planner says is feasible: a budget holds when the measured peak is at or
under it. A run the watchdog stopped (exit 3) kept its budget but did not finish: counted apart.
Targets: |error| <= 10% on every row; 0 violations; >= 80% of the budget used on average.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, PeakPopen, load_average, markdown_table, write_results  # noqa: E402

MIB = 2**20
ERROR_TARGET = 0.10
USE_TARGET = 0.80
WORK = ROOT / "bench" / ".work"
SMOL = "smollm2-135m-instruct"
TINY_RUN = "runs/tiny"
FT_TEXT = "ft-text.jsonl"  # made by setup(): 3,000-character pieces of the embedded corpus, one per line
FT_GPT2 = "gpt2-shape"  # made by setup(): the gpt2 preset (random weights) with SmolLM2's chat tokenizer
LONG_PROMPT = ("The with statement is used to wrap the execution of a block with methods defined by a context "
               "manager. This allows common try, except, finally usage patterns to be encapsulated. ") * 6


def memlm_cmd() -> list[str]:
    return [sys.executable, "-m", "memlm"]


def user_env() -> dict[str, str]:
    """The default environment: nothing that changes the allocator or the thread count."""
    drop = ("MALLOC_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLIBC_TUNABLES", "LD_PRELOAD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(COLUMNS="200", NO_COLOR="1", MEMLM_MODELS=str(WORK / "no-models"))
    return env


_SIZE = r"(\d+(?:\.\d+)? (?:B|KiB|MiB|GiB))"


def parse_report(text: str, measured: int | None = None) -> int | None:
    """The command's own prediction from its last line: `peak memory: predicted X, measured Y (Z%)`.

    X is printed to 0.1 of its unit, and 0.1 GiB is 102 MiB: above 1 GiB the prediction is taken
    from the exact ratio the command printed, Z = (its VmHWM - prediction) / prediction, with
    `measured` (this process's wait4 figure of the same command) as that VmHWM."""
    from memlm.memory.measure import parse_size

    found = re.findall(rf"peak memory: predicted {_SIZE}, measured {_SIZE} \(([+-]\d+(?:\.\d+)?)%\)", text)
    if not found:
        return None
    shown, _, ratio = found[-1]
    printed = parse_size(shown.replace(" ", ""))
    if measured and shown.endswith("GiB"):
        exact = measured / (1 + float(ratio) / 100)
        if abs(exact - printed) <= 0.06 * 2**30:  # the same figure, to the printed precision
            return int(exact)
    return printed


def run_command(args: list[str], stdin: str | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run `memlm ARGS` in a fresh process under WORK; its own peak RSS (bench.common.PeakPopen)."""
    t0 = time.perf_counter()
    proc = PeakPopen(memlm_cmd() + args, cwd=WORK, env=user_env(), stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(stdin, timeout=timeout)
    return _finish(proc, out, err, t0)


def _finish(proc: PeakPopen, out: str, err: str, t0: float) -> dict[str, Any]:
    return {"code": proc.returncode, "measured": proc.peak_bytes, "stdout": out, "stderr": err,
            "seconds": time.perf_counter() - t0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(args: list[str], requests: int, max_tokens: int = 32) -> dict[str, Any]:
    """`memlm serve ARGS`: wait for /health, send `requests` concurrent completions, SIGINT."""
    port = free_port()
    t0 = time.perf_counter()
    proc = PeakPopen(memlm_cmd() + ["serve", *args, "--port", str(port)], cwd=WORK, env=user_env(),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(base + "/health", timeout=2).read()
            break
        except OSError:
            time.sleep(0.3)
    statuses: list[int] = []

    def ask(i: int) -> None:
        body = json.dumps({"prompt": f"The {['for', 'with', 'while', 'try'][i % 4]} statement",
                           "max_tokens": max_tokens, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                statuses.append(r.status)
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
        except OSError:
            statuses.append(0)

    if proc.poll() is None:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    r = _finish(proc, out, err, t0)
    r["statuses"] = statuses
    return r


# ------------------------------------------------------------------------------ the rows

TRAIN = ["train", "--preset", "tiny", "--steps", "6"]
N8 = ["--set", "model.n_layer=8", "--set", "model.n_embd=512", "--micro-batch", "4", "--seq-len", "256"]
ALL_SAVERS = ["--micro-batch", "16", "--set", "train.activation_checkpointing=1", "--set", "train.loss_chunk=256",
              "--optimizer", "adamw8bit", "--precision", "bf16-autocast"]


def rows() -> list[dict[str, Any]]:
    """Each row: name, command (what the user types after `memlm`), stdin / serve requests."""
    r: list[dict[str, Any]] = []

    def add(name: str, args: list[str], **kw: Any) -> None:
        r.append({"name": name, "args": args, **kw})

    def out(name: str) -> list[str]:
        return ["--out", f"runs/bench-{name}"]

    add("train tiny", TRAIN + out("t1"))
    add("train tiny mb16", TRAIN + ["--micro-batch", "16"] + out("t2"))
    add("train tiny mb16 checkpointing", TRAIN + ["--micro-batch", "16", "--set", "train.activation_checkpointing=1"]
        + out("t3"))
    add("train tiny mb16 chunked loss", TRAIN + ["--micro-batch", "16", "--set", "train.loss_chunk=256"] + out("t4"))
    add("train tiny adamw8bit", TRAIN + ["--optimizer", "adamw8bit"] + out("t5"))
    add("train tiny adafactor", TRAIN + ["--optimizer", "adafactor"] + out("t6"))
    add("train tiny bf16-autocast", TRAIN + ["--precision", "bf16-autocast"] + out("t7"))
    add("train tiny bf16", TRAIN + ["--precision", "bf16"] + out("t8"))
    add("train tiny fused backward", TRAIN + ["--set", "train.fused_backward=true", "--set", "train.grad_clip=0.0"]
        + out("t9"))
    add("train tiny all savers", TRAIN + ALL_SAVERS + out("t10"))
    add("train 8x512", TRAIN + N8 + out("t11"))
    add("train 8x512 adafactor checkpointing", TRAIN + N8 + ["--optimizer", "adafactor", "--set",
                                                              "train.activation_checkpointing=2"] + out("t12"))
    add("train tiny given tokenizer", TRAIN + ["--set", f'train.tokenizer="{TINY_RUN}"'] + out("t13"))
    add("train tiny progressive", TRAIN + ["--set", "train.seq_len_warmup=[64, 128]", "--set",
                                           "train.seq_len_warmup_steps=2"] + out("t14"))
    add("train gpt2 2 layers", ["train", "--preset", "gpt2", "--set", "model.n_layer=2", "--seq-len", "128",
                                "--micro-batch", "2", "--steps", "3"] + out("t15"))
    add("train smollm2-135m 4 layers", ["train", "--preset", "smollm2-135m", "--set", "model.n_layer=4",
                                        "--seq-len", "128", "--micro-batch", "2", "--steps", "3"] + out("t16"))
    add("train tiny DDP 2 processes", TRAIN + ["--nproc", "2"] + out("t17"))
    add("train tiny FSDP 2 processes", TRAIN + ["--nproc", "2", "--strategy", "fsdp"] + out("t18"))
    add("train tiny budget 1GiB", TRAIN + ["--memory-budget", "1GiB"] + out("t19"))
    add("train tiny 200 steps", ["train", "--preset", "tiny", "--steps", "200", "--set", "train.eval_every=100"]
        + out("t20"))
    add("generate tiny run", ["generate", "The for statement", "--model", TINY_RUN, "--max-new-tokens", "32"])
    add("generate smollm2 fp32", ["generate", "The with statement", "--model", SMOL, "--max-new-tokens", "32"])
    add("generate smollm2 fp32 256 tokens", ["generate", "The with statement", "--model", SMOL,
                                              "--max-new-tokens", "256", "--temperature", "0"])
    add("generate smollm2 long prompt", ["generate", LONG_PROMPT, "--model", SMOL, "--max-new-tokens", "32"])
    add("generate smollm2 chat", ["generate", "What does the with statement do?", "--chat", "--model", SMOL,
                                  "--max-new-tokens", "48"])
    add("generate smollm2 budget 700MiB (bf16)", ["generate", "The with statement", "--model", SMOL,
                                                  "--max-new-tokens", "32", "--memory-budget", "700MiB"])
    add("generate smollm2 budget 600MiB (int8)", ["generate", "The with statement", "--model", SMOL,
                                                  "--max-new-tokens", "32", "--memory-budget", "600MiB"])
    add("generate smollm2 budget 525MiB (int4)", ["generate", "The with statement", "--model", SMOL,
                                                  "--max-new-tokens", "32", "--memory-budget", "525MiB"])
    add("chat smollm2 budget 600MiB", ["chat", "--model", SMOL, "--max-new-tokens", "32", "--memory-budget",
                                       "600MiB", "--context", "512"], stdin="What is a list?\n/exit\n")
    add("eval tiny run", ["eval", "--model", TINY_RUN])
    add("eval smollm2 fp32 (W2)", ["eval", "--model", SMOL])
    add("eval smollm2 window 256 batch 2", ["eval", "--model", SMOL, "--window", "256", "--batch-size", "2"])
    add("eval smollm2 budget 1GiB", ["eval", "--model", SMOL, "--memory-budget", "1GiB"])
    add("eval smollm2 budget 800MiB window 256", ["eval", "--model", SMOL, "--memory-budget", "800MiB",
                                                  "--window", "256"])
    add("serve tiny run, 8 concurrent", ["--model", TINY_RUN], serve=8)
    add("serve smollm2 fp32, 4 concurrent", ["--model", SMOL, "--context", "512"], serve=4)
    add("serve smollm2 budget 600MiB, 8 concurrent", ["--model", SMOL, "--memory-budget", "600MiB",
                                                      "--context", "512"], serve=8)
    add("distill tiny -> 2 layers", ["distill", "--teacher", TINY_RUN, "--student-preset", "tiny", "--set",
                                     "model.n_layer=2", "--steps", "6", "--out", "runs/bench-d1"])
    add("distill budget 1GiB", ["distill", "--teacher", TINY_RUN, "--student-preset", "tiny", "--set",
                                "model.n_layer=2", "--steps", "6", "--memory-budget", "1GiB", "--out", "runs/bench-d2"])
    add("demo 60 steps", ["demo", "--steps", "60", "--out", "runs/bench-demo"])
    # Fine-tuning (memlm finetune): rows of FT_TEXT fill the whole --seq-len, so every step has the
    # shape the prediction is for; SmolLM2 and a GPT-2-shaped model (FT_GPT2, random weights)
    ft = ["finetune", "--data", FT_TEXT, "--seq-len", "256", "--micro-batch", "2", "--steps", "3"]
    ckpt = ["--set", "train.activation_checkpointing=1"]
    add("finetune smollm2 lora", ft + ["--quantize-base", "none"] + out("f1"))
    add("finetune smollm2 qlora int4", ft + ["--quantize-base", "int4"] + out("f2"))
    add("finetune smollm2 qlora int4 checkpointing", ft + ["--quantize-base", "int4"] + ckpt + out("f3"))
    add("finetune smollm2 lora DDP 2 processes", ft + ["--quantize-base", "none", "--nproc", "2"] + out("f9"))
    add("finetune smollm2 lora all-linear checkpointing", ft + ["--quantize-base", "none", "--lora-targets",
                                                                "all-linear"] + ckpt + out("f4"))
    add("finetune smollm2 full", ft + ["--full"] + out("f5"))
    add("finetune gpt2-shape lora", ft + ["--model", FT_GPT2, "--quantize-base", "none"] + out("f6"))
    add("finetune gpt2-shape qlora int4", ft + ["--model", FT_GPT2, "--quantize-base", "int4"] + out("f7"))
    add("finetune gpt2-shape qlora int8 checkpointing", ft + ["--model", FT_GPT2, "--quantize-base", "int8"]
        + ckpt + out("f8"))
    if compress_has_budget():
        add("compress tiny run int8", ["compress", TINY_RUN, "--out", "runs/bench-k1", "--method", "int8"])
        add("compress smollm2 int4 g32", ["compress", SMOL, "--out", "runs/bench-k2", "--method", "int4",
                                          "--group-size", "32", "--eval-tokens", "4096"])
        add("compress smollm2 gptq4", ["compress", SMOL, "--out", "runs/bench-k3", "--method", "gptq4",
                                       "--calib-tokens", "2048", "--eval-tokens", "2048"])
        add("compress tiny run gptq4", ["compress", TINY_RUN, "--out", "runs/bench-k4", "--method", "gptq4",
                                        "--calib-tokens", "4096"])
    return r


def compress_has_budget() -> bool:
    proc = subprocess.run(memlm_cmd() + ["compress", "--help"], capture_output=True, text=True, env=user_env())
    return "--memory-budget" in proc.stdout


def measure_row(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("serve"):
        r = run_server(row["args"], row["serve"])
    else:
        r = run_command(row["args"], row.get("stdin"))
    predicted = parse_report(r["stderr"], r["measured"])
    out = {"name": row["name"], "command": " ".join(["memlm"] + (["serve"] if row.get("serve") else []) + row["args"]),
           "exit": r["code"], "predicted_mib": predicted / MIB if predicted else None,
           "measured_mib": r["measured"] / MIB if r["measured"] else None, "seconds": round(r["seconds"], 1)}
    if predicted and r["measured"]:
        out["error"] = (predicted - r["measured"]) / r["measured"]
    if row.get("serve"):
        out["statuses"] = r["statuses"]
    if r["code"] not in (0, None):
        out["stderr_tail"] = r["stderr"].strip().splitlines()[-2:]
    return out


# ------------------------------------------------------------------------------ the sweep


def sweeps() -> list[dict[str, Any]]:
    """Commands with the planner's range of budgets: (largest unconstrained prediction, smallest feasible)."""
    from memlm.config import TrainConfig, preset
    from memlm.fit import _candidates
    from memlm.loading import model_config_of
    from memlm.memory.estimate import estimate_inference, estimate_training
    from memlm.memory.plan import plan_inference, plan_training

    out = []
    tiny = preset("tiny", vocab_size=TrainConfig().vocab_size)
    tc = TrainConfig(micro_batch=16, seq_len=tiny.block_size)
    top = estimate_training(tiny, tc).total
    low = plan_training(tiny, tc, 1).min_budget
    out.append({"name": "train tiny mb16", "args": TRAIN + ["--micro-batch", "16"], "top": top, "low": low,
                "n": 6, "out": True})
    smol = model_config_of(SMOL)
    cand = _candidates(SMOL)
    ctx = 64 + 32
    top = estimate_inference(smol, 1, ctx, "fp32", prompt_len=64).total
    low = plan_inference(smol, 1, context=ctx, prompt_len=64, max_batch=1, **cand).min_budget
    out.append({"name": "generate smollm2", "args": ["generate", "The with statement", "--model", SMOL,
                                                     "--max-new-tokens", "32"], "top": top, "low": low, "n": 6})
    ctx = 512
    top = estimate_inference(smol, 1, ctx, "fp32", prompt_len=ctx).total
    low = plan_inference(smol, 1, context=ctx, prompt_len=ctx, max_batch=1, **cand).min_budget
    out.append({"name": "serve smollm2", "args": ["--model", SMOL, "--context", str(ctx)], "top": top, "low": low,
                "n": 4, "serve": 4})
    if compress_has_budget():
        out.append({"name": "compress smollm2 int4", "args": ["compress", SMOL, "--method", "int4", "--group-size",
                                                              "32", "--eval-tokens", "4096"],
                    "top": None, "low": None, "n": 4, "out": True})
    return out


def budgets(top: int, low: int, n: int) -> list[int]:
    """n budgets from 1.2 x top down to just above low, evenly spaced in log."""
    hi, lo = 1.2 * top, 1.01 * low
    if n == 1 or hi <= lo:
        return [int(hi)]
    return [int(hi * (lo / hi) ** (i / (n - 1))) for i in range(n)]


def run_sweep(s: dict[str, Any], index: int) -> list[dict[str, Any]]:
    results = []
    if s["top"] is None:  # ask the command itself: run it once without a budget
        probe = run_command(s["args"] + ["--out", f"runs/bench-sweep-{index}-probe"])
        s["top"] = parse_report(probe["stderr"]) or probe["measured"]
        s["low"] = int(0.6 * s["top"])
    for j, budget in enumerate(budgets(s["top"], s["low"], s["n"])):
        args = s["args"] + ["--memory-budget", f"{budget / MIB:.1f}MiB"]
        if s.get("out"):
            args += ["--out", f"runs/bench-sweep-{index}-{j}"]
        r = run_server(args, s["serve"]) if s.get("serve") else run_command(args)
        measured = r["measured"] or 0
        row = {"sweep": s["name"], "budget_mib": budget / MIB, "exit": r["code"],
               "measured_mib": measured / MIB, "predicted_mib": (parse_report(r["stderr"], measured) or 0) / MIB or None,
               "used": measured / budget, "kept": measured <= budget,
               "outcome": {0: "ran", 1: "refused (does not fit)", 3: "stopped by the watchdog"}.get(r["code"],
                                                                                                 f"exit {r['code']}")}
        if r["code"] not in (0, 1, 3):
            row["stderr_tail"] = r["stderr"].strip().splitlines()[-2:]
        print(f"  {s['name']} @ {budget / MIB:.0f} MiB: {row['outcome']}, peak {measured / MIB:.0f} MiB "
              f"({row['used']:.0%})", flush=True)
        results.append(row)
    return results


# ------------------------------------------------------------------------------ calibration


def calibrate() -> None:
    """The runtime terms of memlm.memory.estimate: commands whose model is negligible."""
    neg = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
           "--set", "model.block_size=64", "--seq-len", "64", "--micro-batch", "1", "--set", "train.vocab_size=4096"]
    cmds = {
        "train": ["train", "--preset", "tiny", *neg, "--steps", "4", "--out", "runs/cal-train"],
        "train-bf16": ["train", "--preset", "tiny", *neg, "--steps", "4", "--precision", "bf16-autocast",
                       "--out", "runs/cal-train-bf16"],
        "infer": ["generate", "The for statement", "--model", "runs/cal-train", "--max-new-tokens", "32"],
        "score": ["eval", "--model", "runs/cal-train", "--window", "64"],
    }
    for name, args in cmds.items():
        peaks = []
        for _ in range(3):
            if args[0] == "train":
                subprocess.run(["rm", "-rf", str(WORK / args[-1])])
            peaks.append(run_command(args)["measured"] / MIB)
        print(f"{name:12s} {sorted(peaks)[1]:.0f} MiB (runs: {', '.join(f'{p:.0f}' for p in peaks)})")
    # what a command holds as it starts (memlm.memory.estimate.CALIBRATION_START_BYTES)
    probe = "import memlm.cli, re; print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1])"
    starts = [int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
              / 1024 for _ in range(3)]
    print(f"{'start':12s} {sorted(starts)[1]:.0f} MiB (runs: {', '.join(f'{p:.0f}' for p in starts)})")


# ------------------------------------------------------------------------------ main


def setup() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rm", "-rf", *[str(p) for p in (WORK / "runs").glob("bench-*")]])
    if not (WORK / TINY_RUN / "checkpoints").is_dir():
        r = run_command(["train", "--preset", "tiny", "--steps", "30", "--out", TINY_RUN])
        assert r["code"] == 0, r["stderr"]
    if not (WORK / FT_TEXT).is_file():
        from memlm.data import default_corpus_text

        text = default_corpus_text()
        pieces = [text[i:i + 3000] for i in range(0, 3000 * 60, 3000)]
        (WORK / FT_TEXT).write_text("".join(json.dumps({"text": p}) + "\n" for p in pieces))
    if not (WORK / FT_GPT2 / "config.json").is_file():
        import torch

        from memlm.config import preset
        from memlm.interop.hf import save_hf
        from memlm.loading import load_model
        from memlm.model import Decoder

        tokenizer = load_model(SMOL)[1]
        torch.manual_seed(0)
        save_hf(Decoder(preset("gpt2", vocab_size=tokenizer.vocab_size)), WORK / FT_GPT2, tokenizer)


def summarize(results: list[dict[str, Any]], sweep: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [abs(r["error"]) for r in results if r.get("error") is not None]
    ran = [s for s in sweep if s["exit"] == 0]
    return {
        "rows": len(results), "rows_within_target": sum(e <= ERROR_TARGET for e in errors),
        "max_abs_error": max(errors, default=None), "mean_abs_error": sum(errors) / len(errors) if errors else None,
        "rows_failed": [r["name"] for r in results if r["exit"] != 0],
        "budgets": len(sweep), "violations": sum(not s["kept"] for s in sweep),
        "watchdog_stops": sum(s["exit"] == 3 for s in sweep), "refused": sum(s["exit"] == 1 for s in sweep),
        "mean_used_of_runs": sum(s["used"] for s in ran) / len(ran) if ran else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="rows and sweeps whose name contains this (several: comma-separated)")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-rows", action="store_true")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: put this run's rows (and sweeps) into the latest full results, "
                             "replacing those of the same name")
    args = parser.parse_args()
    setup()
    if args.calibrate:
        calibrate()
        return
    load_before = load_average()

    def wanted(name: str) -> bool:  # "a,b,-c": names containing a or b, but not c
        parts = (args.only or "").split(",")
        keep, drop = [p for p in parts if p and not p.startswith("-")], [p[1:] for p in parts if p.startswith("-")]
        return (not keep or any(p in name for p in keep)) and not any(p in name for p in drop)

    results = []
    if not args.no_rows:
        for row in rows():
            if not wanted(row["name"]):
                continue
            r = measure_row(row)
            err = f"{r['error']:+.1%}" if r.get("error") is not None else "-"
            print(f"{r['name']:45s} exit {r['exit']}  predicted {r['predicted_mib'] or 0:7.1f}  measured "
                  f"{r['measured_mib'] or 0:7.1f} MiB  {err}  ({r['seconds']:.0f} s)", flush=True)
            results.append(r)
    sweep: list[dict[str, Any]] = []
    if not args.no_sweep:
        for i, s in enumerate(sweeps()):
            if not wanted(s["name"]):
                continue
            sweep += run_sweep(s, i)
    merged_from = None
    if args.merge:
        latest = sorted(RESULTS.glob("memory_accuracy-2*.json"))[-1]
        old = json.loads(latest.read_text())
        mine = {r["name"] for r in results}
        order = [row["name"] for row in rows()]  # rows no longer in the bench are dropped
        results = [r for r in old["rows"] if r["name"] not in mine and r["name"] in order] + results
        results.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        swept = {s_["sweep"] for s_ in sweep}
        sweep = [s_ for s_ in old.get("sweep", []) if s_["sweep"] not in swept] + sweep
        merged_from = latest.name
        args.only = None
    summary = summarize(results, sweep)
    print(json.dumps(summary, indent=2))
    env = {"threads": "torch default (2 on this machine)", "allocator": "glibc defaults (no MALLOC_* variables)",
           "load_average_before": load_before, "load_average_after": load_average()}
    columns = ["name", "predicted_mib", "measured_mib", "error", "exit", "seconds"]
    notes = (f"Each row: the real `memlm` command, a fresh process, default environment ({env['allocator']}, "
             f"{env['threads']}); measured = ru_maxrss of the command started through bench/launch.py (its own, not the bench's; largest rank for torchrun); predicted = "
             f"the figure the command printed. Load average {load_before} before, {load_average()} after.\n\n"
             f"Summary: {json.dumps(summary)}"
             + (f"\n\nMerged: the rows and sweeps of this run replaced those of the same name in {merged_from}."
                if merged_from else ""))
    if sweep:
        notes += "\n\nBudget sweep (rows below the first table):\n\n" + markdown_table(
            sweep, ["sweep", "budget_mib", "predicted_mib", "measured_mib", "used", "kept", "outcome"])
    name = "memory_accuracy" if not args.only else "memory_accuracy-partial"
    write_results(name, results, extra={"summary": summary, "environment": env, "sweep": sweep}, columns=columns,
                  notes=notes)


if __name__ == "__main__":
    main()
