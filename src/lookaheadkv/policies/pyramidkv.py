"""PyramidKV: SnapKV scores with budgets that shrink from the lower layers to the upper ones.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", 2024, https://arxiv.org/abs/2406.02069
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.evict import resolve_budget
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV's scores; per-layer budgets fall linearly with the same total as a flat budget.

    Parameters
    ----------
    beta : float
        Steepness: the top layer keeps ``window + (budget - window) / beta`` entries.
    """

    beta: float = 20.0
    name = "pyramidkv"

    def layer_budgets(self, num_layers, prompt_len):
        budget = resolve_budget(self.budget, prompt_len)
        window = min(self.window, budget)
        if budget >= prompt_len:
            return [prompt_len] * num_layers
        if num_layers == 1 or budget <= window:
            return [budget] * num_layers
        low = (budget - window) / self.beta
        high = 2 * (budget - window) - low
        step = (high - low) / (num_layers - 1)
        budgets = [window + round(high - layer * step) for layer in range(num_layers)]
        budgets[0] += budget * num_layers - sum(budgets)  # rounding leftovers: same total
        budgets = [min(prompt_len, max(1, b)) for b in budgets]
        # Lower layers can ask for more than the prompt holds (budget close to L): give what
        # the clip removed to the next layers that still have room, so the total stays the same.
        missing = budget * num_layers - sum(budgets)
        for layer in range(num_layers):
            if missing <= 0:
                break
            extra = min(missing, prompt_len - budgets[layer])
            budgets[layer] += extra
            missing -= extra
        return budgets
