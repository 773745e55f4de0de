"""StreamingLLM: attention sinks plus the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
https://arxiv.org/abs/2309.17453
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy


@dataclass
class StreamingLLM(Policy):
    """Keep the first ``n_sink`` tokens and the last ``budget - n_sink``; no attention needed.

    Parameters
    ----------
    n_sink : int
        Number of initial "sink" tokens always kept.
    """

    n_sink: int = 4
    name = "streamingllm"

    def __post_init__(self):
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")

    def decode_scorer(self, model):
        """Sinks plus the latest positions, as at prefill."""
        from .decoding import Recency

        return Recency(self.n_sink)

    def scores(self, model, prefill, observer):
        position = torch.arange(prefill.length, dtype=torch.float32)  # later = higher
        position[: self.n_sink] = float("inf")
        kv_heads = model.config.num_key_value_heads
        return [position.expand(kv_heads, -1) for _ in range(model.config.num_hidden_layers)]
