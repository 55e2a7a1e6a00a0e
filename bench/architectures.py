"""The transformer against the light baselines (issue 17 part 3): tiny (decoder), tiny-rnn (GRU),
tiny-lstm and tiny-conv, all ~4.2M parameters with the same 4096-token BPE, trained on the
embedded corpus for the same wall-clock time, each through the real CLI in a fresh process.

    python -m bench.architectures                     # 120 s of training per model
    python -m bench.architectures --train-s 60 --only tiny,tiny-conv
    python -m bench.architectures --decode-only       # the decode columns again, on the runs trained last
    python -m bench.architectures --worker decode tiny-rnn 4096 RUN   # one decode row, prints JSON

Per model: `memlm train --preset P --set train.max_time_s=S` (a schedule of 100k steps, so every
model trains at its peak learning rate the whole time: the same treatment for all), its
training tokens/s (the run's metrics, eval excluded) and whole-process peak (VmHWM) against the
prediction it printed; `memlm eval --window 256 --json` on the eval split (perplexity, same
tokenizer for all, so comparable); then, per context C in 128 / 1024 / 4096, a fresh process
loads the run (memlm.load), prefills C - 32 tokens of the eval split and decodes 32 greedy
tokens (after a warm-up generation of the same shapes), on one thread (two threads on a machine
other jobs keep busy wait on each other at every op): decode tokens/s and the process's peak,
against memlm.memory.estimate's prediction.
The transformer is built for 4096 positions to decode that far (RoPE has no table to learn:
the weights are the same; its text past its 256 training positions is not the point).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, load_average, write_results  # noqa: E402

WORK = ROOT / "bench" / ".work" / "architectures"
MODELS = {"tiny": "transformer", "tiny-rnn": "GRU", "tiny-lstm": "LSTM", "tiny-conv": "convolution"}
CONTEXTS = (128, 1024, 4096)
NEW_TOKENS = 64
MIB = 2**20


def memlm(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "memlm", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"COLUMNS": "200", "NO_COLOR": "1", **_env()})
    if proc.returncode != 0:
        raise SystemExit(f"memlm {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR")}


def _peak_line(stderr: str) -> tuple[float, float]:
    """(predicted, measured) MiB from the line every memlm command ends with."""
    m = re.search(r"peak memory: predicted ([\d.,]+) (MiB|GiB), measured ([\d.,]+) (MiB|GiB)", stderr)
    scale = {"MiB": 1.0, "GiB": 1024.0}
    return float(m.group(1).replace(",", "")) * scale[m.group(2)], float(m.group(3).replace(",", "")) * scale[m.group(4)]


def train_row(preset: str, seconds: float, tokenizer: Path | None) -> dict:
    run = WORK / preset
    if run.exists():
        import shutil

        shutil.rmtree(run)
    args = ["train", "--preset", preset, "--out", str(run), "--steps", "100000",
            "--set", f"train.max_time_s={seconds}", "--set", "train.eval_every=0", "--set", "train.save_every=0",
            "--set", "train.log_every=20"]
    if tokenizer is not None:  # the first model's BPE for all: the same ids, comparable perplexities
        args += ["--set", f"train.tokenizer={json.dumps(str(tokenizer))}"]
    proc = memlm(*args)
    predicted, measured = _peak_line(proc.stderr)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "tokens_per_s" in m]
    tokens = steps[-1]["tokens_seen"]
    train_s = json.loads(next((run / "checkpoints").iterdir()).joinpath("trainer_state.json").read_text())["wall_time"]
    ev = json.loads(memlm("eval", "--model", str(run), "--window", "256", "--json").stdout)
    from memlm.config import preset as get_preset

    return {"model": MODELS[preset], "preset": preset, "params": _params(get_preset(preset)),
            "train_s": round(train_s, 1), "train_tokens": tokens, "train_tok_s": tokens / train_s,
            "eval_ppl": ev["ppl"], "train_peak_mib": measured, "train_predicted_mib": predicted}


def _params(config) -> int:
    from memlm.memory.estimate import param_shapes

    return sum(s.numel for s in param_shapes(config))


def decode_worker(preset: str, context: int, run: str) -> dict:
    """One fresh process: load, prefill context - NEW_TOKENS eval tokens, decode NEW_TOKENS."""
    import dataclasses

    import torch

    from bench.decode_speed import peak_rss_mib
    from memlm import load
    from memlm.data import read_corpus
    from memlm.infer.generate import generate_ids
    from memlm.infer.sampling import SamplingSettings
    from memlm.memory.estimate import estimate_inference
    from memlm.model import build_model

    torch.set_num_threads(1)
    lm = load(run)
    model, config = lm.model, lm.config
    if config.room_after(context - 1) is not None and context > config.block_size:
        config = dataclasses.replace(config, block_size=context)  # RoPE tables for every position
        wide = build_model(config).eval()
        wide.load_state_dict(model.state_dict())
        model = wide
    prompt = lm.tokenizer.encode(read_corpus("default", "eval")[0], add_bos=False)[: context - NEW_TOKENS]
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for _ in generate_ids(model, prompt, dataclasses.replace(settings, max_new_tokens=4)):
        pass  # warm-up: the kernels of these shapes chosen and their memory touched once
    t0 = time.perf_counter()
    first = None
    for i, _ in enumerate(generate_ids(model, prompt, settings)):
        if i == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    predicted = estimate_inference(config, 1, context, prompt_len=len(prompt)).total
    return {"prefill_s": first - t0, "decode_tok_s": (NEW_TOKENS - 1) / (end - first),
            "peak_mib": peak_rss_mib(), "predicted_mib": predicted / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-s", type=float, default=120.0, help="Training seconds per model.")
    parser.add_argument("--only", default=",".join(MODELS), help="Comma-separated presets.")
    parser.add_argument("--decode-only", action="store_true", help="Keep today's training columns, measure decode again.")
    parser.add_argument("--worker", nargs=4, metavar=("WHAT", "PRESET", "CONTEXT", "RUN"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(decode_worker(args.worker[1], int(args.worker[2]), args.worker[3])))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    rows, tokenizer = [], None
    earlier = {}
    if args.decode_only:
        import datetime as dt

        saved = json.loads((RESULTS / f"architectures-{dt.date.today().isoformat()}.json").read_text())
        earlier = {r["preset"]: r for r in saved["rows"]}
        args.train_s, loads_trained = saved["train_s"], saved["load_average"]
    for preset in args.only.split(","):
        if args.decode_only:
            row = {k: v for k, v in earlier[preset].items() if not k.startswith("decode")}
        else:
            print(f"training {preset} for {args.train_s:.0f} s (load average {load_average()})", file=sys.stderr)
            row = train_row(preset, args.train_s, tokenizer)
            tokenizer = tokenizer or WORK / preset / "tokenizer.json"
        for context in CONTEXTS:
            proc = subprocess.run([sys.executable, "-m", "bench.architectures", "--worker", "decode", preset,
                                   str(context), str(WORK / preset)], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            d = json.loads(proc.stdout.strip().splitlines()[-1])
            row[f"decode_tok_s@{context}"] = d["decode_tok_s"]
            row[f"decode_mib@{context}"] = d["peak_mib"]
            row[f"decode_predicted_mib@{context}"] = d["predicted_mib"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    loads = f"load average before {load_before}, after {load_average()} (1/5/15 min) on this 2-core machine"
    if args.decode_only:
        loads = f"training: {loads_trained}; decode: {loads}"
    notes = (f"{args.train_s:.0f} s of `memlm train` per model on the embedded corpus (default split), one "
             f"process at a time, torch's default threads; {loads}. Perplexity: `memlm eval --window 256` on "
             f"the eval split (one tokenizer for all). Decode: {NEW_TOKENS} greedy tokens after a prompt of "
             f"context - {NEW_TOKENS} eval tokens, after a warm-up, fresh process each, 1 thread; MiB = whole-process "
             "peak (VmHWM).")
    write_results("architectures", rows, {"train_s": args.train_s, "load_average": loads}, notes=notes)


if __name__ == "__main__":
    main()
