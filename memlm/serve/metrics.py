"""What the server tells about itself: GET /metrics (Prometheus text, through prometheus_client)
and GET /stats (the same as JSON, for the chat page's memory panel).

Counters of the scheduler's work are read from `Scheduler.stats` when scraped; the two latency
histograms are fed by the scheduler thread as tokens are sampled; memory is the process's
resident set now and at its peak (VmHWM) against the budget and the plan's prediction.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from memlm.memory.measure import current_rss_bytes, process_peak_rss_bytes
from memlm.serve.scheduler import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
GAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
RATE_WINDOW = 5.0  # seconds over which tokens/s is measured


@dataclass
class MemoryFacts:
    """What the plan said: the budget (None: none given), the predicted peak, the plan in words."""

    budget: int | None
    predicted_peak: int
    plan: str = ""


class ServerMetrics:
    """Prometheus metrics of one app (its own registry: several apps may live in one process)."""

    def __init__(self, scheduler: Scheduler, memory: MemoryFacts, model: str):
        self.scheduler, self.memory, self.model = scheduler, memory, model
        self.registry = CollectorRegistry()
        self.requests = Counter("memlm_requests", "HTTP API requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.first_token = Histogram("memlm_time_to_first_token_seconds", "From a completion's arrival to its "
                                     "first token", buckets=TTFT_BUCKETS, registry=self.registry)
        self.token_gap = Histogram("memlm_inter_token_latency_seconds", "Between two tokens of one completion",
                                   buckets=GAP_BUCKETS, registry=self.registry)
        self.registry.register(_SchedulerCollector(self))
        scheduler.stats.on_first_token = self.first_token.observe
        scheduler.stats.on_token_gap = self.token_gap.observe
        self.tokens_per_second = _Rate(lambda: scheduler.stats.tokens)
        self.completions_per_second = _Rate(lambda: scheduler.stats.sequences)

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "model": self.model, "slots": s.slots, "slots_in_use": s.running, "context": s.context,
            "queue_depth": s.waiting, "queue_size": s.queue_size, "tokens_generated": s.stats.tokens,
            "prompt_tokens": s.stats.prompt_tokens, "tokens_per_second": self.tokens_per_second(),
            "plan": self.memory.plan,
            "memory": {"budget_bytes": self.memory.budget, "predicted_peak_bytes": self.memory.predicted_peak,
                       "resident_bytes": current_rss_bytes(), "peak_resident_bytes": process_peak_rss_bytes(),
                       "kv_pool_bytes": s.pool.nbytes()},
        }


class _Rate:
    """A counter's rate over the last RATE_WINDOW seconds, from the looks taken at it."""

    def __init__(self, read):
        self.read = read
        self.history: deque[tuple[float, int]] = deque()  # (time, count) at each look

    def __call__(self) -> float:
        now, count = time.monotonic(), self.read()
        self.history.append((now, count))
        while len(self.history) > 2 and self.history[1][0] <= now - RATE_WINDOW:
            self.history.popleft()
        t0, n0 = self.history[0]
        return (count - n0) / (now - t0) if now > t0 else 0.0


class _SchedulerCollector:
    """The scheduler's counters and gauges, read at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        s, mem = self.metrics.scheduler, self.metrics.memory
        st = s.stats
        for name, doc, value in (("memlm_generated_tokens", "Tokens generated", st.tokens),
                                 ("memlm_prompt_tokens", "Prompt tokens prefilled", st.prompt_tokens),
                                 ("memlm_decode_steps", "Batched decode steps run", st.steps),
                                 ("memlm_completions", "Completions finished or cancelled", st.sequences)):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
        for name, doc, value in (
                ("memlm_queue_depth", "Completions waiting for a KV slot", s.waiting),
                ("memlm_queue_size", "Completions that may wait (429 beyond)", s.queue_size),
                ("memlm_kv_slots_in_use", "KV pool slots holding a running completion", s.running),
                ("memlm_kv_slots", "KV pool slots", s.slots),
                ("memlm_kv_pool_bytes", "Bytes of the KV pool (allocated once)", s.pool.nbytes()),
                ("memlm_resident_memory_bytes", "Resident memory of the server process now", current_rss_bytes()),
                ("memlm_peak_resident_memory_bytes", "Peak resident memory of the server process (VmHWM)",
                 process_peak_rss_bytes()),
                ("memlm_predicted_peak_bytes", "The memory plan's predicted peak", mem.predicted_peak),
                ("memlm_memory_budget_bytes", "The memory budget (0: none)", mem.budget or 0),
                ("memlm_batch_rows_peak", "The most completions one decode step has run", st.peak_rows)):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
