"""The eviction engine: prefill -> scores -> keep top-k per KV head -> decode."""

from .cache import gather
from .decode import Sampling, decode
from .evict import parse_budget, resolve_budget, select
from .generate import Generation, Stats, compress, generate, generate_ids
from .prefill import Prefill, extend, prefill

__all__ = ["Sampling", "decode", "gather", "parse_budget", "resolve_budget", "select", "Generation", "Stats", "compress", "generate", "generate_ids", "Prefill", "extend", "prefill"]
