"""FullKV: no eviction, the reference every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass
class FullKV(Policy):
    """Keep the whole prompt cache (the budget is ignored)."""

    name = "full"
    no_decode_scorer = "it keeps the whole cache, and a decode budget evicts: drop --decode-budget, or pick an eviction method"
    evicts = False

    def scores(self, model, prefill, observer):
        return None

    def layer_budgets(self, num_layers, prompt_len):
        return [prompt_len] * num_layers
