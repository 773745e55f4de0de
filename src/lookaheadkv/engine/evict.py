"""Budgets and the choice of kept entries: parse_budget / resolve_budget, select (top-k per layer and KV head).

The physical eviction, a gather into a new compact cache, is :func:`lookaheadkv.engine.cache.gather`.
"""

from __future__ import annotations

import math

import torch

BUDGET_RULE = (
    "a budget is a whole number of entries per KV head (e.g. 128) or a decimal ratio of the prompt "
    "in (0, 1] (e.g. 0.1; 1.0 keeps the whole prompt)"
)


def parse_budget(value: int | float | str) -> int | float:
    """The one reading of a budget, for the CLI (generate, eval, bench) and the API alike.

    A whole number >= 1 (``128``, ``"128"``, also ``128.0``) counts entries per KV head; a decimal
    in (0, 1] (``0.1``, ``"0.1"``, ``"1.0"``, ``1.0``) is a ratio of the prompt, so ``"1.0"`` keeps
    the whole prompt while ``"1"`` keeps one entry. Returns the int count or the float ratio;
    anything else raises ``ValueError`` with :data:`BUDGET_RULE`.
    """
    number: int | float
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text) if text.lstrip("+").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"bad budget {value!r}: {BUDGET_RULE}") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"bad budget {value!r}: {BUDGET_RULE}")
    else:
        number = value
    if isinstance(number, float):
        if math.isfinite(number) and 0 < number <= 1:
            return float(number)
        if math.isfinite(number) and number > 1 and number.is_integer():
            return int(number)
        raise ValueError(f"bad budget {value!r}: {BUDGET_RULE}")
    if number < 1:
        raise ValueError(f"bad budget {value!r}: {BUDGET_RULE}")
    return int(number)


def resolve_budget(budget: int | float, prompt_len: int) -> int:
    """Entries to keep per KV head: a count (whole number >= 1) or a ratio of the prompt (a float in (0, 1]).

    See :func:`parse_budget`: ``1.0`` is the whole prompt, ``1`` one entry.
    """
    if isinstance(budget, str):
        raise ValueError(f"budget must be a number, got the string {budget!r}: pass an int (entries) or a float ratio; parse_budget() reads text")
    budget = parse_budget(budget)
    if isinstance(budget, float):
        return max(1, round(budget * prompt_len))
    return budget


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
