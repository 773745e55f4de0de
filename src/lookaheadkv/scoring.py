"""Importance math shared by the policies, training and evaluation (a layer of its own, under the policies).

* Observers that watch a forward's attention layers: :class:`AttentionMass` (chunked ``rows x L``
  attention summed or maxed over rows), :class:`QueryRecorder`, :class:`Observers` (several as one).
* Score-row helpers: :func:`attention_mass`, :func:`attention_at` (rows over a cache of entries at
  true positions, for decode-time re-scoring), :func:`reduce_gqa` (query heads -> KV heads),
  :func:`max_pool` (along the prompt).
* The ground truth (``docs/method.md``, "The ground truth"): :func:`ground_truth`, the importance of
  each prompt token to a response, and :func:`attention_recall`, the share of it a kept cache holds.

Score rows are always explicit ``rows x L`` matmuls, chunked over rows; nothing here builds an
``L x L`` attention matrix or asks the model for ``output_attentions``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .engine.attention import attention_rows
from .engine.prefill import Prefill, extend

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


def attention_at(
    query: torch.Tensor, key: torch.Tensor, scaling: float, query_positions: torch.Tensor, key_positions: torch.Tensor
) -> torch.Tensor:
    """Softmax attention of query rows over a cache whose entries sit at given true positions: (heads, rows, k).

    ``query`` (heads, rows, d) at ``query_positions`` (rows,); ``key`` (kv_heads, k, d) with
    ``key_positions`` (kv_heads, k), each KV head its own (an evicted cache keeps different entries
    per head). A row sees the entries at or before its position: causal by position, not by
    index. Float32, one ``rows x k`` matmul per KV head group.
    """
    heads, rows, dim = query.shape
    kv_heads, k = key.shape[0], key.shape[1]
    group = heads // kv_heads
    grouped = (query * scaling).reshape(kv_heads, group * rows, dim)
    logits = torch.matmul(grouped, key.transpose(-1, -2)).view(kv_heads, group, rows, k).float()
    qpos = query_positions.to(key.device).view(1, 1, rows, 1)
    hidden = key_positions.to(key.device)[:, None, None, :] > qpos
    return logits.masked_fill_(hidden, float("-inf")).softmax(dim=-1).view(heads, rows, k)


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


def normalise(mass: torch.Tensor) -> torch.Tensor:
    """L1-normalise over the last (prompt) dimension."""
    return mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-30)


class _Float32Mass(AttentionMass):
    """AttentionMass whose rows are computed from float32 copies of the queries and keys.

    In a bf16 or fp16 model the queries and keys are what that model computes, but ``Q K^T``,
    the softmax and the sum over the answer's rows are float32, so a label differs from an
    fp32 model's only through the model's own rounding, not through the labelling arithmetic.
    """

    def __call__(self, layer_idx, query, key, scaling):
        super().__call__(layer_idx, query.float(), key.float(), scaling)

    def takes_probs(self, q: int, k: int) -> bool:
        return False  # the engine's shared rows are in the model's dtype


@torch.no_grad()
def ground_truth(model, state: Prefill, response_ids: list[int], chunk: int = 128) -> torch.Tensor:
    """(layers, heads, L) importance of each prompt token to ``response_ids``, L1-normalised (float32 arithmetic).

    ``docs/method.md``, "The ground truth": for layer l, query head h and prompt token j,
    ``s_GT[l, h, j]`` = mean over response tokens t of ``A[l, h, t, j]``, L1-normalised over j, where
    A is the softmax attention of the response's queries over the causal row (prompt and earlier
    response tokens). The response runs over the prompt's cache (``state``, left as it was) in row
    chunks, so only ``chunk x (L + |Y|)`` attention rows exist at a time.
    """
    observer = _Float32Mass(chunk=chunk)
    ids = torch.tensor([response_ids], device=model.device)
    extend(model, state.cache, state.length, input_ids=ids, observers=[observer])
    return normalise(torch.stack(observer.per_layer()).float())


def attention_recall(
    gt_scores: Sequence[torch.Tensor],
    kept_indices: Sequence[torch.Tensor],
    groups: int | None = None,
) -> float:
    """Mean share of the ground-truth attention mass that the kept cache entries hold.

    Parameters
    ----------
    gt_scores
        Per layer a ``(heads, L)`` tensor of ground-truth importance, each row
        L1-normalised over the ``L`` prompt positions. ``heads`` is either the number
        of KV heads or of query heads.
    kept_indices
        Per layer a ``(kv_heads, k)`` integer tensor of the prompt positions kept.
    groups
        Query heads per KV head (query head ``h`` reads KV head ``h // groups``).
        Inferred as ``heads // kv_heads`` when None; 1 when scores are per KV head.

    Returns
    -------
    float
        ``sum(gt[h, kept])`` averaged over layers and heads.
    """
    if len(gt_scores) != len(kept_indices):
        raise ValueError("gt_scores and kept_indices must have one entry per layer")
    recalls = []
    for gt, kept in zip(gt_scores, kept_indices):
        heads, kv_heads = gt.shape[0], kept.shape[0]
        group = heads // kv_heads if groups is None else groups
        if group * kv_heads != heads:
            raise ValueError(f"{heads} score heads do not map onto {kv_heads} KV heads")
        index = kept.long().to(gt.device).repeat_interleave(group, dim=0)
        recalls.append(gt.float().gather(1, index).sum(dim=1))
    return torch.cat(recalls).mean().item()
