"""Decode-time scorers: what each policy asks of the cache when it is re-scored during decoding.

The mechanism (budget, schedule, recent window, top-k, gather, true positions) is the engine's
(:mod:`lookaheadkv.engine.rescore`); a policy's ``decode_scorer(model)`` returns one of these.
Each scores the entries of the current cache, prompt and generated alike, in cache order:

* :class:`LookaheadScores` (LookaheadKV): the lookahead tokens run over the current cache at the
  next true positions (one extra forward of n tokens, their entries cropped), as at prefill.
* :class:`WindowQueries` (SnapKV, PyramidKV, TOVA): the queries of the last generated tokens,
  recorded while decoding, are the window; SnapKV pools each query head's votes along the cache
  and reduces the GQA group, TOVA takes the last token's attention averaged over all heads.
* :class:`CumulativeAttention` (H2O): every entry's attention summed over every query that has
  seen it, the prompt's included (H2O's accumulated score for decoding).
* :class:`Recency` (StreamingLLM): the sinks and the most recent entries.
* :class:`RandomScores` (Random): fresh uniform scores at every re-scoring.

Attention rows are explicit ``rows x n`` matmuls over the cache; no model forward runs except
LookaheadKV's tokens.
"""

from __future__ import annotations

from collections import deque

import torch

from ..engine.attention import attention_rows
from ..engine.rescore import CacheView
from ..scoring import attention_at, max_pool, reduce_gqa


class WindowQueries:
    """The last ``window`` generated tokens' queries vote over the current cache.

    ``all_heads`` (TOVA): the votes for a position are averaged over every head of the layer (the
    same score wherever that position is kept); otherwise each query head's votes are max-pooled along the cache (``kernel``) and
    a GQA group's pooled votes reduced to its KV head (``gqa_reduce``), SnapKV's order. Pooling runs
    along the cache order, which is position order with the evicted entries left out.
    """

    needs_keys = False  # its observer reads only the query (engine.batch_rescore then passes no keys)

    def __init__(self, model, window: int, kernel: int = 1, gqa_reduce: str = "mean", all_heads: bool = False):
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.window, self.kernel, self.gqa_reduce, self.all_heads = window, kernel, gqa_reduce, all_heads
        self.queries: dict[int, deque] = {}
        self.scaling = 1.0

    def observer(self):
        return self

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """A decoding step: keep its query (heads, 1, d), the last ``window`` per layer."""
        self.queries.setdefault(layer_idx, deque(maxlen=self.window)).append(query[0, :, -1:].detach())
        self.scaling = scaling

    def mass(self, view: CacheView) -> list[torch.Tensor]:
        """Per layer (heads, n): the recorded queries' attention summed over them (empty rows: zeros)."""
        out = []
        for layer_idx, positions in enumerate(view.positions):
            keys = view.cache.layers[layer_idx].keys[0]
            recorded = self.queries.get(layer_idx)
            if not recorded:  # no token decoded yet
                out.append(keys.new_zeros(self.heads, keys.shape[1], dtype=torch.float32))
                continue
            q = torch.cat(list(recorded), dim=1)  # (heads, rows, d), the last row the latest token
            rows = q.shape[1]
            qpos = torch.arange(view.next_position - rows, view.next_position)
            out.append(attention_at(q, keys, self.scaling, qpos, positions).sum(dim=1))
        return out

    def scores(self, model, view: CacheView) -> list[torch.Tensor]:
        out = []
        for mass, positions in zip(self.mass(view), view.positions):
            if self.all_heads:
                out.append(self._by_position(mass, positions.to(mass.device)))
            else:
                out.append(reduce_gqa(max_pool(mass, self.kernel), self.kv_heads, self.gqa_reduce))
        return out


    def _by_position(self, mass: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """TOVA's layer-wide score of a position: its attention averaged over ALL heads of the layer.

        KV heads hold different entries after per-head eviction: a head whose KV head evicted a
        position gives it 0. The score is then read back for each (KV head, entry).
        """
        group = mass.shape[0] // self.kv_heads
        index = positions.repeat_interleave(group, dim=0)  # (heads, n): each query head's entries
        total = mass.new_zeros(int(positions.max()) + 1).index_add_(0, index.reshape(-1), mass.reshape(-1))
        return total[positions] / mass.shape[0]


class CumulativeAttention:
    """H2O for decoding: each entry's attention summed over all queries so far, per query head.

    Starts from the prefill's column sums (every prompt query), gathered to the entries the
    prefill kept; every decoding step adds its query's attention row (computed apart from the
    layer's own kernel, so decoding is unchanged); a re-scoring reduces each GQA group and keeps
    the heavy hitters (the engine adds the recent window), and the sums follow the kept entries.
    """

    def __init__(self, kv_heads: int, gqa_reduce: str = "mean"):
        self.kv_heads, self.gqa_reduce = kv_heads, gqa_reduce
        self.sums: dict[int, torch.Tensor] = {}

    def observer(self):
        return self

    def start(self, model, prefill, observer, kept) -> None:
        for layer_idx, mass in enumerate(observer.per_layer()):
            mass = mass.float()
            if kept is not None:
                mass = mass.gather(1, self._per_query_head(kept[layer_idx].to(mass.device), mass.shape[0]))
            self.sums[layer_idx] = mass.clone()

    def _per_query_head(self, kept: torch.Tensor, heads: int) -> torch.Tensor:
        return kept.long().repeat_interleave(heads // kept.shape[0], dim=0)

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        k = key.shape[2]
        row = attention_rows(query[0, :, -1:], key[0], scaling, row_offset=k - 1)[:, 0]  # (heads, k)
        total = self.sums.get(layer_idx)
        if total is None:
            total = row.new_zeros(row.shape[0], 0)
        if total.shape[1] < k:
            total = torch.cat([total, total.new_zeros(total.shape[0], k - total.shape[1])], dim=1)
        self.sums[layer_idx] = total + row

    def scores(self, model, view: CacheView) -> list[torch.Tensor]:
        return [reduce_gqa(self.sums[i], self.kv_heads, self.gqa_reduce) for i in range(len(view.positions))]

    def evicted(self, kept: list[torch.Tensor]) -> None:
        for layer_idx, idx in enumerate(kept):
            total = self.sums[layer_idx]
            self.sums[layer_idx] = total.gather(1, self._per_query_head(idx.to(total.device), total.shape[0]))


class Recency:
    """StreamingLLM: the ``n_sink`` first positions and then the latest ones."""

    def __init__(self, n_sink: int):
        self.n_sink = n_sink

    def scores(self, model, view: CacheView) -> list[torch.Tensor]:
        out = []
        for positions in view.positions:
            s = positions.float()
            s[positions < self.n_sink] = float("inf")
            out.append(s)
        return out


class RandomScores:
    """Uniform scores drawn afresh at every re-scoring from one seeded generator."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, model, view: CacheView) -> list[torch.Tensor]:
        return [torch.rand(p.shape, generator=self.generator) for p in view.positions]


class LookaheadScores:
    """LookaheadKV for decoding: the lookahead tokens run over the current cache at the next true positions.

    The n tokens sit at ``view.next_position ..`` (where the next answer token goes), their LoRA
    on, in one forward over the evicted cache; their entries are cropped off. Score = mean of
    their attention, reduced over each GQA group, pooled with ``kernel``, as at prefill; with
    ``window`` the last generated tokens' queries also vote (the policy's SnapKV hybrid).
    """

    def __init__(self, policy, model):
        self.policy, self.modules = policy, policy.resolve(model)
        self.kv_heads = model.config.num_key_value_heads
        self.queries = WindowQueries(model, policy.window) if policy.window else None
        self.extra_entries = self.modules.config.n_lookahead  # its tokens' entries, cropped after each scoring

    def observer(self):
        return self.queries

    @torch.no_grad()
    def scores(self, model, view: CacheView) -> list[torch.Tensor]:
        mass = self.modules.attention_mass(model, view.cache, None, position=view.next_position)
        rows = self.modules.config.n_lookahead
        if self.queries is not None:
            mass = [m + w.to(m.device) for m, w in zip(mass, self.queries.mass(view))]
            rows += min(self.policy.window, view.fed)
        return [max_pool(s / rows, self.policy.kernel) for s in self.policy.reduce(mass, self.kv_heads)]
