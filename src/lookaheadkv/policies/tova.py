"""TOVA: keep what the last prompt token attends to, averaged over heads.

Oren et al., "Transformers are Multi-State RNNs", 2024, https://arxiv.org/abs/2401.06104
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scoring import AttentionMass
from .base import Policy


@dataclass
class TOVA(Policy):
    """Score = the last prompt query's attention, averaged over all heads of the layer."""

    name = "tova"

    def observer(self):
        return AttentionMass(last_rows=1)

    def decode_scorer(self, model):
        """TOVA's decoding rule: the last generated token's attention, averaged over the layer's heads."""
        from .decoding import WindowQueries

        return WindowQueries(model, 1, all_heads=True)

    def scores(self, model, prefill, observer):
        kv_heads = model.config.num_key_value_heads
        return [s.mean(dim=0, keepdim=True).expand(kv_heads, -1) for s in observer.per_layer()]
