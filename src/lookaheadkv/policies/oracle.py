"""Oracle: the importance the model's actual answer gives each prompt token (an upper bound)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.cache import copy_cache
from ..engine.decode import decode
from ..engine.generate import eos_ids
from ..scoring import ground_truth
from .base import Policy


@dataclass
class Oracle(Policy):
    """Score = mean attention of the full-cache greedy answer's queries (docs/method.md, "The ground truth").

    It generates the whole answer first, so it is not a practical method: it is the best a
    scorer of this kind could do at a budget, reported beside every comparison.

    Parameters
    ----------
    max_new_tokens : int
        Length cap of the answer it looks at (match the evaluation's).
    """

    max_new_tokens: int = 64
    name = "oracle"
    no_decode_scorer = "it needs the rest of the full-cache answer, which a re-scoring mid-answer does not have; use lookahead, snapkv, h2o or tova"

    @torch.no_grad()
    def scores(self, model, prefill, observer):
        eos = eos_ids(model, None)
        answer = decode(model, copy_cache(prefill.cache), prefill.logits, prefill.length, self.max_new_tokens, eos_token_ids=eos)
        if len(answer) > 1 and answer[-1] in eos:
            answer = answer[:-1]
        truth = ground_truth(model, prefill, answer)  # (layers, heads, L)
        return self.reduce(list(truth), model.config.num_key_value_heads)
