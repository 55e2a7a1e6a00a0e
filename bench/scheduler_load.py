"""The serving scheduler alone, in one process: N client threads x M completions each on
SmolLM2-135M, no HTTP and no client process (the load benchmark, bench/serve_load.py, is the
figure a user sees; this one isolates the scheduler's steps from the web stack's and the
clients' share of the 2 cores, whose noise swamps a scheduler change there).

    python -m bench.scheduler_load                          # int4 and fp32, 16 clients x 4
    python -m bench.scheduler_load --formats fp32 --clients 1,16 --name scheduler_load-ab

Each completion: a prompt of the load benchmark's questions (60 tokens), 48 tokens sampled at
temperature 0.7 (ignore_eos). Reported: total tokens/s, p50/p95 gap between a sequence's
outputs, p50 time to its first output (percentiles taken as bench/serve_load.py takes them),
decode steps and how many of them were mixed with a prompt's piece (memlm.serve.scheduler)."""

from __future__ import annotations

import argparse
import threading
import time

from bench.common import load_average, write_results
from bench.serve_load import PROMPTS, pct

MAX_TOKENS = 48  # per completion, all of them generated (ignore_eos)


def run(fmt: str, clients: int, requests: int) -> dict:
    from memlm.infer.engine import make_engine
    from memlm.infer.sampling import SamplingSettings
    from memlm.loading import load
    from memlm.serve.scheduler import Scheduler, Sequence

    lm = load("smollm2-135m-instruct", weight_format=fmt)
    lm.engine = make_engine(lm.model, fuse=True, cache_dtype=lm.cache_dtype)  # as `memlm serve` has it
    prompts = [lm.tokenizer.encode(p * 5)[:60] for p in PROMPTS]
    scheduler = Scheduler(lm, 16, 256, 64)
    scheduler.start()
    gaps, firsts, lock = [], [], threading.Lock()

    def client(u: int) -> None:
        for k in range(requests):
            times, done = [], threading.Event()

            def deliver(out, times=times, done=done):
                times.append(time.perf_counter())
                if out.finish_reason is not None:
                    done.set()

            start = time.perf_counter()
            settings = SamplingSettings(max_new_tokens=MAX_TOKENS, temperature=0.7, ignore_eos=True,
                                        seed=u * requests + k)
            scheduler.submit([Sequence(prompts[(u * requests + k) % len(prompts)], settings, 0, deliver)])
            done.wait(600)
            with lock:
                firsts.append(times[0] - start)
                gaps.extend(b - a for a, b in zip(times, times[1:]))

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(u,)) for u in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    scheduler.stop()

    def ms(values, q):
        return round(pct(values, q) * 1000, 1)

    return {"format": fmt, "clients": clients, "requests": clients * requests,
            "tokens_per_s": round(clients * requests * MAX_TOKENS / wall, 1), "gap_p50_ms": ms(gaps, 0.5),
            "gap_p95_ms": ms(gaps, 0.95), "first_p50_ms": ms(firsts, 0.5), "steps": scheduler.stats.steps,
            "mixed_steps": scheduler.stats.mixed_steps, "load_avg": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="int4,fp32")
    parser.add_argument("--clients", default="16")
    parser.add_argument("--requests", type=int, default=4, help="completions per client")
    parser.add_argument("--name", default="scheduler_load")
    args = parser.parse_args()
    rows = [run(fmt, int(n), args.requests) for fmt in args.formats.split(",") for n in args.clients.split(",")]
    write_results(args.name, rows, {"args": vars(args)},
                  notes="In-process (no HTTP, no client process): the scheduler's own figures, not the load "
                        "benchmark's (bench/serve_load.py). 16 slots x 256 tokens, torch's default threads.")


if __name__ == "__main__":
    main()
