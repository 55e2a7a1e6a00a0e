"""Memory: measuring what a block of work really uses, predicting it, and planning for a budget.

    measure   PeakMemory (CPU peak RSS, CUDA allocator peak), parse_size, format_bytes
    estimate  estimate_training / estimate_inference -> Breakdown (named terms, formulas, phases)
    plan      plan_training / plan_inference / plan_for_cli -> Plan (settings that fit a budget)
"""

from memlm.memory.estimate import Breakdown, Term, estimate_inference, estimate_training
from memlm.memory.measure import PeakMemory, current_rss_bytes, format_bytes, parse_size, peak_rss_bytes
from memlm.memory.plan import Plan, plan_for_cli, plan_inference, plan_training, render_plan

__all__ = [
    "Breakdown", "PeakMemory", "Plan", "Term", "current_rss_bytes", "estimate_inference", "estimate_training",
    "format_bytes", "parse_size", "peak_rss_bytes", "plan_for_cli", "plan_inference", "plan_training",
    "render_plan",
]
