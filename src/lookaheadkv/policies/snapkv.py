"""SnapKV: the last prompt window votes for the tokens to keep.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
https://arxiv.org/abs/2404.14469
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scoring import AttentionMass, max_pool
from .base import Policy


def window_scores(mass: torch.Tensor, window: int, kernel: int) -> torch.Tensor:
    """Pool the window's attention over the prefix; the window itself always stays (+inf)."""
    length = mass.shape[-1]
    window = min(window, length)
    prefix = max_pool(mass[:, : length - window], kernel)
    keep = torch.full((mass.shape[0], window), float("inf"), dtype=prefix.dtype, device=prefix.device)
    return torch.cat([prefix, keep], dim=-1)


@dataclass
class SnapKV(Policy):
    """Score = attention of the last ``window`` prompt queries, max-pooled; the window is kept.

    Each query head's window votes are pooled first, then a GQA group's pooled scores are
    reduced to one per KV head (the order of docs/method.md and of SnapKV's reference code).

    Parameters
    ----------
    window : int
        Number of last prompt tokens whose queries vote (and which are always kept).
    kernel : int
        Max-pooling kernel along the prompt (1 disables pooling).
    """

    window: int = 32
    kernel: int = 7
    name = "snapkv"

    def __post_init__(self):
        super().__post_init__()
        if self.window < 1 or self.kernel < 1:
            raise ValueError(f"window and kernel must be >= 1, got {self.window} and {self.kernel}")

    def observer(self):
        return AttentionMass(last_rows=self.window)

    def decode_scorer(self, model):
        """The last ``window`` generated tokens' queries are the window (pooled, GQA-reduced as at prefill).

        PyramidKV inherits it: during decoding every layer has the same (flat) decode budget.
        """
        from .decoding import WindowQueries

        return WindowQueries(model, self.window, self.kernel, self.gqa_reduce)

    def scores(self, model, prefill, observer):
        kv_heads = model.config.num_key_value_heads
        pooled = [window_scores(s, self.window, self.kernel) for s in observer.per_layer()]  # per query head
        return self.reduce(pooled, kv_heads)
