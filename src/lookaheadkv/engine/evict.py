"""Turn scores into kept indices, per layer and KV head, and shrink the cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .cache import gather


def resolve_budget(budget: int | float, prompt_len: int) -> int:
    """Entries to keep per KV head: an absolute count (a whole number >= 1) or a ratio of the prompt (0 < r < 1)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a positive integer or a ratio in (0, 1), got {budget!r}")
    if isinstance(budget, float) and not budget.is_integer():
        if not 0 < budget <= 1:
            raise ValueError(f"a fractional budget is a ratio of the prompt and must lie in (0, 1), got {budget}")
        return max(1, round(budget * prompt_len))
    if budget <= 0:
        raise ValueError(f"budget must be a positive integer, got {budget:g}")
    return int(budget)


def select(scores: list[torch.Tensor], budgets: list[int]) -> list[torch.Tensor]:
    """Top ``budgets[l]`` positions of ``scores[l]`` (kv_heads, L), returned sorted (kv_heads, k)."""
    kept = []
    for layer_scores, budget in zip(scores, budgets):
        length = layer_scores.shape[-1]
        if budget >= length:
            kept.append(torch.arange(length, device=layer_scores.device).expand(layer_scores.shape[0], -1))
            continue
        top = layer_scores.float().topk(budget, dim=-1).indices
        kept.append(top.sort(dim=-1).values)
    return kept


def evict(cache: DynamicCache, kept: list[torch.Tensor]) -> DynamicCache:
    """A new cache that holds only the ``kept`` entries (see :func:`select`)."""
    return gather(cache, kept)
