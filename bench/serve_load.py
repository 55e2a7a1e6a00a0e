"""Load benchmark of `memlm serve`: a fresh server process per weight format, and this process
as the clients, on loopback.

For each format (the memory budget chooses it, as a user's --memory-budget does) and each number
of clients N, N clients each send M streamed completions one after another (ignore_eos, a fixed
max_tokens: every request is the same work). Measured on the client side: total generated
tokens/s (all tokens / wall time of the level), time to first token and inter-token latency
(p50, p95, between streamed chunks), errors; on the server side: its peak resident memory
(VmHWM from /proc, the whole process) against the budget.

    python -m bench.serve_load                        # int4 and fp32, 1/4/16/32 clients
    python -m bench.serve_load --formats int4 --clients 1,16 --requests 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import load_average, write_results

MODEL = "smollm2-135m-instruct"
PROMPTS = ["Explain what a Python list comprehension is.", "Write a short story about a lighthouse keeper.",
           "What is the difference between a thread and a process?", "Describe how bread is made.",
           "Give three tips for learning a new language.", "Why is the sky blue?",
           "What does the with statement do in Python?", "Summarize the rules of chess."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def budget_for(fmt: str, context: int, slots: int) -> int:
    """A budget in which the planner picks `fmt` for `slots` x `context` (memlm.fit.load_for_serving):
    fp32 with room to spare; int4 just above its own need, so that no better format fits."""
    from memlm.fit import _candidates, _prefill_share
    from memlm.loading import model_config_of
    from memlm.memory.plan import SAFETY_MARGIN, plan_inference

    plan = plan_inference(model_config_of(MODEL), 64 << 30, context=context, prompt_len=_prefill_share(slots),
                          min_batch=slots, max_batch=slots, formats=[fmt], runtime="serve", **_candidates(MODEL))
    return math.ceil(plan.predicted_peak / (1 - SAFETY_MARGIN)) + (64 << 20 if fmt == "fp32" else 4 << 20)


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class ServerProcess:
    def __init__(self, args: list[str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "memlm", "serve", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


async def one_request(client, i: int, max_tokens: int, stats: dict) -> None:
    import httpx

    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                stats["errors"].append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    stats["tokens"] += event["usage"]["completion_tokens"]
                for c in event.get("choices", []):
                    if c.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            stats["ttft"].append(now - t0)
                        else:
                            stats["gaps"].append(now - last)
                        last = now
    except httpx.HTTPError as e:
        stats["errors"].append(repr(e))


async def run_level(base: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    stats: dict[str, Any] = {"tokens": 0, "ttft": [], "gaps": [], "errors": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        async def user(u: int) -> None:
            for k in range(requests):
                await one_request(client, u * requests + k, max_tokens, stats)

        t0 = time.perf_counter()
        await asyncio.gather(*(user(u) for u in range(clients)))
        wall = time.perf_counter() - t0
    return {**stats, "wall": wall}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="int4,fp32")
    ap.add_argument("--clients", default="1,4,16,32")
    ap.add_argument("--requests", type=int, default=3, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="memlm serve --threads (default: torch's)")
    ap.add_argument("--name", default=None, help="results file name (default: serve_load[-tN])")
    args = ap.parse_args()
    rows = []
    load_before = load_average()
    for fmt in args.formats.split(","):
        budget = budget_for(fmt, args.context, args.slots)
        server = ServerProcess(["--model", MODEL, "--memory-budget", str(budget), "--context", str(args.context),
                                "--slots", str(args.slots)] + (["--threads", str(args.threads)] if args.threads else []))
        plan = json.loads(urllib.request.urlopen(server.base + "/stats").read())["plan"]
        print(plan, flush=True)
        try:
            asyncio.run(run_level(server.base, 1, 1, 8))  # warm-up: first forward, kernel pages
            for n in map(int, args.clients.split(",")):
                load = load_average()
                r = asyncio.run(run_level(server.base, n, args.requests, args.max_tokens))
                peak = vm_hwm(server.proc.pid)
                rows.append({"format": fmt, "clients": n, "requests": n * args.requests,
                             "tokens_per_s": r["tokens"] / r["wall"], "tokens": r["tokens"],
                             "ttft_p50_ms": 1000 * (pct(r["ttft"], 0.5) or 0),
                             "ttft_p95_ms": 1000 * (pct(r["ttft"], 0.95) or 0),
                             "itl_p50_ms": 1000 * (pct(r["gaps"], 0.5) or 0),
                             "itl_p95_ms": 1000 * (pct(r["gaps"], 0.95) or 0),
                             "errors": len(r["errors"]), "peak_rss_mib": peak / 2 ** 20,
                             "budget_mib": budget / 2 ** 20, "under_budget": peak <= budget,
                             "load_avg": load, "plan": plan, "error_samples": r["errors"][:3]})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            log = server.stop()
        rows[-1]["server_log_tail"] = log[-2000:]
    for fmt in args.formats.split(","):
        one = next((r for r in rows if r["format"] == fmt and r["clients"] == 1), None)
        for r in rows:
            if r["format"] == fmt and one:
                r["speedup_vs_1"] = r["tokens_per_s"] / one["tokens_per_s"]
    threads = f" --threads {args.threads}" if args.threads else ""
    notes = (f"`memlm serve --model {MODEL} --memory-budget B --context {args.context} --slots {args.slots}{threads}` "
             f"(a fresh process per format, the budget chosen so the planner picks that format), clients in a "
             f"separate process on loopback: N clients x {args.requests} streamed chat completions each, "
             f"{args.max_tokens} tokens (ignore_eos), temperature 0.7. Inter-token latency: between streamed chunks. "
             f"Load average (1/5/15 min) before: {load_before}; per level in the table: other jobs share this "
             "2-core machine, so figures are taken under that load.")
    columns = ["format", "clients", "requests", "tokens_per_s", "speedup_vs_1", "ttft_p50_ms", "ttft_p95_ms",
               "itl_p50_ms", "itl_p95_ms", "errors", "peak_rss_mib", "budget_mib", "under_budget", "load_avg"]
    write_results(args.name or "serve_load" + (f"-t{args.threads}" if args.threads else ""), rows, {"args": vars(args), "environment": {k: v for k, v in os.environ.items()
                                                                         if k.startswith(("OMP", "MKL", "MEMLM"))}},
                  columns=columns, notes=notes)


if __name__ == "__main__":
    main()
