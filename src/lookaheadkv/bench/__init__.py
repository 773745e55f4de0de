"""Benchmarks of eviction cost: time to first token, added time, peak memory (see ``benchmarks/``)."""

from .common import METHODS, PLAIN, Capture, Clock, Timing, added_work, bench_model, capture_prefill, first_token, make_method, paired_runs, prompt_ids
from .cost import CostRow, measure, ratios

__all__ = ["METHODS", "PLAIN", "Capture", "Clock", "Timing", "added_work", "bench_model", "capture_prefill", "first_token", "make_method", "paired_runs", "prompt_ids", "CostRow", "measure", "ratios"]
