"""LAQ (Lookahead Q-Cache): score the prompt with the queries of a self-drafted answer.

Wang et al., "Lookahead Q-Cache: Achieving More Consistent KV Eviction via Pseudo
Query", EMNLP 2025, https://arxiv.org/abs/2505.20334
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.decode import decode
from ..engine.cache import gather
from ..engine.evict import resolve_budget, select
from ..engine.generate import eos_ids
from ..engine.attention import attention_rows
from ..scoring import AttentionMass, Observers, QueryRecorder, max_pool
from .base import Policy
from .snapkv import window_scores


@dataclass
class LAQ(Policy):
    """Draft ``n_draft`` pseudo tokens on a SnapKV-compressed copy, then score the full prompt with their queries.

    The cost is ``n_draft`` sequential decode steps at prefill time; the draft and the copy
    are discarded and the first real token comes from the prefill's logits.

    Parameters
    ----------
    n_draft : int
        Pseudo tokens to decode (stops early at end of sequence).
    window, kernel : int
        SnapKV settings of the compressed copy the draft is decoded on.
    prompt_rows : int
        Also count the attention of the last ``prompt_rows`` prompt queries (0 = off).
    """

    n_draft: int = 32
    window: int = 32
    kernel: int = 7
    prompt_rows: int = 8
    name = "laq"
    no_decode_scorer = (
        "its pseudo queries stand in for answer queries that decoding has for real, which makes it "
        "SnapKV's decode-time scorer: use --method snapkv (or lookahead, h2o, tova)"
    )
    budget_dependent = True  # the draft runs on a copy compressed to the budget

    def observer(self):
        return Observers(AttentionMass(last_rows=self.window), AttentionMass(last_rows=self.prompt_rows or 1))

    def draft_queries(self, model, prefill, window_mass) -> list[torch.Tensor]:
        """Queries (heads, rows, d) per layer of the pseudo tokens decoded on a SnapKV copy."""
        kv_heads = model.config.num_key_value_heads
        snap = self.reduce([window_scores(m, self.window, self.kernel) for m in window_mass], kv_heads)
        budget = resolve_budget(self.budget, prefill.length)
        copy = gather(prefill.cache, select(snap, [budget] * len(snap)))
        recorder = QueryRecorder()
        decode(model, copy, prefill.logits, prefill.length, self.n_draft + 1, eos_token_ids=eos_ids(model, None), observers=[recorder])
        return recorder.per_layer(), recorder.scaling

    def scores(self, model, prefill, observer):
        window, last = observer.observers
        queries, scaling = self.draft_queries(model, prefill, window.per_layer())
        out = []
        for layer, q in enumerate(queries):
            keys = prefill.cache.layers[layer].keys[0]  # (kv_heads, L, d): the FULL prompt, not the copy
            mass = attention_rows(q, keys, scaling, row_offset=keys.shape[1]).sum(dim=1)  # (heads, L)
            if self.prompt_rows:
                mass = mass + last.mass[layer]
            out.append(mass)
        kv_heads = model.config.num_key_value_heads
        return [max_pool(s, self.kernel) for s in self.reduce(out, kv_heads)]
