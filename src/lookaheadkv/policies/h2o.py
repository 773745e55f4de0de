"""H2O, prefill variant: heavy hitters by attention summed over all prompt queries.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models", NeurIPS 2023, https://arxiv.org/abs/2306.14048
"""

from __future__ import annotations

from dataclasses import dataclass


from ..scoring import AttentionMass
from .base import Policy


@dataclass
class H2O(Policy):
    """Score = attention received from every prompt query (chunked rows), plus a kept recent window.

    Parameters
    ----------
    window : int
        Most recent tokens always kept.
    chunk : int
        Query rows per chunk when summing attention (memory ~ chunk x L per head).
    """

    window: int = 32
    chunk: int = 256
    name = "h2o"

    def observer(self):
        return AttentionMass(last_rows=None, chunk=self.chunk)

    def decode_scorer(self, model):
        """H2O's decoding rule: attention accumulated over every query so far (the recent window is the engine's)."""
        from .decoding import CumulativeAttention

        return CumulativeAttention(model.config.num_key_value_heads, self.gqa_reduce)

    def scores(self, model, prefill, observer):
        kv_heads = model.config.num_key_value_heads
        out = []
        for s in self.reduce(observer.per_layer(), kv_heads):
            s = s.clone()
            s[:, max(0, s.shape[-1] - self.window) :] = float("inf")
            out.append(s)
        return out
