"""Random: keep a uniformly random subset, a floor for any scorer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy


@dataclass
class RandomPolicy(Policy):
    """Scores drawn uniformly at random, independently per layer and KV head.

    Parameters
    ----------
    seed : int
        Seed of the generator, so a run is reproducible.
    """

    seed: int = 0
    name = "random"

    def decode_scorer(self, model):
        """Fresh uniform scores at every re-scoring (the floor)."""
        from .decoding import RandomScores

        return RandomScores(self.seed + 1)

    def scores(self, model, prefill, observer):
        g = torch.Generator().manual_seed(self.seed)
        kv_heads = model.config.num_key_value_heads
        return [torch.rand(kv_heads, prefill.length, generator=g) for _ in range(model.config.num_hidden_layers)]
