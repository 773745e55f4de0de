"""The eviction engine: prefill -> scores -> keep top-k per KV head -> decode."""

from .batch import generate_batch, generate_batch_ids, split_rows
from .cache import gather
from .decode import Sampling, decode
from .evict import parse_budget, resolve_budget, select
from .generate import Generation, Selection, Stats, compress, generate, generate_ids, select_kv
from .prefill import Prefill, extend, prefill
from .rescore import DecodeBudget

__all__ = ["Sampling", "decode", "gather", "parse_budget", "resolve_budget", "select", "Generation", "Stats", "compress", "generate", "generate_ids", "generate_batch", "generate_batch_ids", "split_rows", "select_kv", "Selection", "Prefill", "extend", "prefill", "DecodeBudget"]
