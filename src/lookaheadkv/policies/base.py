"""What every scoring policy shares: the Policy base class and the score-row math.

A policy only decides *scores*: one number per (layer, KV head, prompt token). The engine
owns the rest (prefill, top-k per KV head, the physical gather, decoding). Score rows are
always explicit ``rows x L`` matmuls, chunked over rows; no policy ever builds an
``L x L`` attention matrix or asks the model for ``output_attentions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..engine.attention import attention_rows
from ..engine.evict import resolve_budget
from ..engine.prefill import Prefill

GQA_REDUCTIONS = ("mean", "max")


def attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    last_rows: int | None = None,
    chunk: int = 256,
    reduce: str = "sum",
) -> torch.Tensor:
    """Attention over the last ``last_rows`` query rows (all when None), chunked: (heads, k).

    ``query`` (1, heads, q, d) and ``key`` (1, kv_heads, k, d) as an attention layer sees them:
    the ``q`` queries are the last ``q`` positions of the ``k`` keys. ``reduce`` is "sum" or
    "max" over the rows.
    """
    q, k = query.shape[2], key.shape[2]
    first = 0 if last_rows is None else max(0, q - last_rows)
    total = None
    for start in range(first, q, chunk):
        rows = query[0, :, start : min(q, start + chunk)]
        probs = attention_rows(rows, key[0], scaling, row_offset=k - q + start)
        part = probs.amax(dim=1) if reduce == "max" else probs.sum(dim=1)
        if total is None:
            total = part
        else:
            total = torch.maximum(total, part) if reduce == "max" else total + part
    return total


def reduce_gqa(scores: torch.Tensor, kv_heads: int, how: str = "mean") -> torch.Tensor:
    """(heads, L) query-head scores -> (kv_heads, L), one score per KV head of each group."""
    grouped = scores.view(kv_heads, scores.shape[0] // kv_heads, scores.shape[-1])
    return grouped.amax(dim=1) if how == "max" else grouped.mean(dim=1)


def max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D max-pooling along the prompt (stride 1, same length); kernel <= 1 is a no-op.

    Any length works, also one shorter than the kernel (the window is clipped to the sequence)
    and an empty one (a prompt that lies wholly inside SnapKV's window leaves no prefix to pool).
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    return F.max_pool1d(scores[None], kernel_size=kernel, stride=1, padding=kernel // 2)[0][..., : scores.shape[-1]]


class AttentionMass:
    """Observer that aggregates, per layer, the attention of a call's last rows over the earlier keys.

    In a prefill call (q == k) it keeps all k columns; in an extension call over a cache
    (q < k) it keeps the ``k - q`` columns that were there before. Result: ``mass[l]``
    (heads, cols), the sum (or max) over the rows.
    """

    def __init__(self, last_rows: int | None = None, chunk: int = 256, reduce: str = "sum"):
        self.last_rows = last_rows
        self.chunk = chunk
        self.reduce = reduce
        self.mass: dict[int, torch.Tensor] = {}

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        q, k = query.shape[2], key.shape[2]
        cols = k if q == k else k - q
        self.mass[layer_idx] = attention_mass(query, key, scaling, self.last_rows, self.chunk, self.reduce)[:, :cols]

    def takes_probs(self, q: int, k: int) -> bool:
        """Short calls over a cache, all rows wanted: the layer's own probabilities can be reused."""
        return q < k and q <= self.chunk and (self.last_rows is None or self.last_rows >= q)

    def take_probs(self, probs: torch.Tensor, q: int, k: int) -> None:
        """``probs`` (heads, q, k): the layer's attention rows, computed once by the engine."""
        part = probs.amax(dim=1) if self.reduce == "max" else probs.sum(dim=1)
        self.mass[self.layer] = part[:, : k - q]

    def per_layer(self) -> list[torch.Tensor]:
        return [self.mass[i] for i in sorted(self.mass)]


class QueryRecorder:
    """Observer that keeps every call's queries per layer, e.g. those of draft tokens decoded one by one."""

    def __init__(self):
        self.queries: dict[int, list[torch.Tensor]] = {}

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        self.queries.setdefault(layer_idx, []).append(query[0])
        self.scaling = scaling

    def per_layer(self) -> list[torch.Tensor]:
        """Per layer (heads, rows, d), the rows in call order."""
        return [torch.cat(self.queries[i], dim=1) for i in sorted(self.queries)]


class Observers:
    """Several observers run as one."""

    def __init__(self, *observers):
        self.observers = observers

    def __call__(self, *args) -> None:
        for observe in self.observers:
            observe(*args)


@dataclass
class Policy:
    """Base of every scoring policy.

    Parameters
    ----------
    budget : int or float
        KV entries kept per KV head in each layer: an absolute count, or a ratio of the
        prompt when a float in (0, 1).
    gqa_reduce : {"mean", "max"}
        How a GQA group's query-head scores become one score per KV head.
    """

    budget: int | float = 128
    gqa_reduce: str = "mean"

    name: ClassVar[str] = "base"
    #: True when scores come only from the prompt's own prefill (the runner may share it).
    prefill_only: ClassVar[bool] = True
    #: True when the scores themselves change with the budget (not only the top-k).
    budget_dependent: ClassVar[bool] = False

    def __post_init__(self):
        resolve_budget(self.budget, 10**9)
        if self.gqa_reduce not in GQA_REDUCTIONS:
            raise ValueError(f"gqa_reduce must be one of {', '.join(GQA_REDUCTIONS)}, got {self.gqa_reduce!r}")

    @property
    def label(self) -> str:
        """The name shown in tables and plots (SpecKV without a draft model says it is an upper bound)."""
        return self.name

    def observer(self):
        """An observer to run during the prompt's prefill, or None."""
        return None

    def tail(self, model: torch.nn.Module):
        """Extra rows to run at the end of the prompt's own prefill (an engine ``Tail``), or None."""
        return None

    def scores(self, model: torch.nn.Module, prefill: Prefill, observer) -> list[torch.Tensor] | None:
        """Per layer (kv_heads, L) scores, higher = keep; None keeps everything."""
        raise NotImplementedError

    def layer_budgets(self, num_layers: int, prompt_len: int) -> list[int]:
        """Entries kept per layer: the budget, capped at the prompt (a budget at or above it keeps it all)."""
        return [min(prompt_len, resolve_budget(self.budget, prompt_len))] * num_layers

    def reduce(self, per_head: list[torch.Tensor], kv_heads: int) -> list[torch.Tensor]:
        return [reduce_gqa(s, kv_heads, self.gqa_reduce) for s in per_head]
