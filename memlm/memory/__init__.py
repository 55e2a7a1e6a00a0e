"""Memory: measuring what a block of work really uses (and, later, predicting it)."""

from memlm.memory.measure import PeakMemory, current_rss_bytes, format_bytes, parse_size, peak_rss_bytes

__all__ = ["PeakMemory", "current_rss_bytes", "format_bytes", "parse_size", "peak_rss_bytes"]
