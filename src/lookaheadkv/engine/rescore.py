"""Eviction during decoding: the cache held at or under a budget while the answer grows.

Prefill eviction bounds the prompt's share of the cache only: every generated token then adds
one entry per layer and KV head. :class:`DecodeBudget` bounds the whole cache, prompt and
generated entries alike, at ``budget`` entries per KV head:

* the prefill's eviction keeps at most ``budget`` entries per KV head (each layer's own budget
  capped at it);
* every ``interval`` generated tokens, if a layer holds more than ``budget`` entries, its
  entries are re-scored by the policy's *decode-time scorer* and the top ``budget`` per KV head
  are gathered into new compact tensors, exactly as at prefill (``select`` + ``gather``);
* the ``window`` most recent entries of every KV head are always kept (``min(recent, budget // 2)``,
  by default the last 32 tokens): whatever a scorer says, the tokens just written stay.

So the cache never holds more than ``budget + interval`` entries per KV head. The engine owns
the mechanism (schedule, recent window, top-k, gather, the true position of every entry); a
scorer only returns scores, and any scorer composes with it (kvpress's decoding press plays
the same part for its presses). A scorer is any object with

* ``scores(model, view) -> list[(kv_heads, n_l)]``: higher = keep, per layer over the entries
  of :class:`CacheView` in cache order;
* optionally ``observer()``: an observer that watches every decoding step (post-RoPE query
  and the whole key cache per layer, as at prefill; it must not take the layer's probabilities,
  so the decoding itself is computed exactly as without it);
* optionally ``start(model, prefill, observer, kept)``: called once after the prefill's
  eviction (H2O carries the prefill's attention sums on);
* optionally ``evicted(kept)``: called after each re-scoring with the kept indices per layer
  (scorers that hold one number per entry gather them too);
* optionally ``extra_entries``: how many entries its scoring appends to the cache for a moment
  (LookaheadKV's tokens, cropped off again), so that the cache reserves room for them.

Policies build their scorer with ``policy.decode_scorer(model)`` (see
:mod:`lookaheadkv.policies.decoding`); the engine imports no policy.

Several rows of one prompt (other policies, other budgets) decode under their budgets as one batch
with :func:`engine.batch_rescore.decode_budgeted_batch`: the same steps, each row re-scored on its own
cache (:meth:`BudgetedDecoding.advance` per step, :meth:`BudgetedDecoding.close_interval` at its interval's end).

Positions stay true: each entry's position is tracked per layer and KV head (ascending in
cache order, since kept indices are sorted and new tokens come last), decoding continues at
the prompt length plus the tokens generated, and a scorer that runs tokens of its own
(LookaheadKV) puts them at the next true positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .cache import gather, reserve
from .evict import select


@dataclass(frozen=True)
class DecodeBudget:
    """A decode-time budget: at most ``budget`` entries per KV head, re-scored every ``interval`` tokens.

    Parameters
    ----------
    budget : int
        Entries per KV head and layer, prompt and generated alike.
    interval : int
        Generated tokens between two re-scorings (the cache peaks at ``budget + interval``).
    recent : int
        The most recent entries of every KV head that a re-scoring always keeps, capped at half
        the budget (:attr:`window`).
    """

    budget: int
    interval: int = 32
    recent: int = 32

    def __post_init__(self):
        for name, low in (("budget", 1), ("interval", 1), ("recent", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"decode {name} must be a whole number >= {low}, got {value!r}")

    @property
    def window(self) -> int:
        """Recent entries always kept: ``min(recent, budget // 2)``."""
        return min(self.recent, self.budget // 2)


def as_decode_budget(decode_budget) -> DecodeBudget | None:
    """``decode_budget`` as a :class:`DecodeBudget` (an int ``n`` means ``DecodeBudget(n)``), None for None, or a one-line ``TypeError``."""
    if decode_budget is None or isinstance(decode_budget, DecodeBudget):
        return decode_budget
    if isinstance(decode_budget, int) and not isinstance(decode_budget, bool):
        return DecodeBudget(decode_budget)
    raise TypeError(f"decode_budget must be a DecodeBudget (e.g. DecodeBudget(256, interval=32)) or a whole number of entries, got {decode_budget!r}")


@dataclass
class CacheView:
    """What a decode-time scorer sees at a re-scoring."""

    cache: object  # DynamicCache, every layer (1, kv_heads, n_l, head_dim)
    positions: list[torch.Tensor]  # per layer (kv_heads, n_l): each entry's true position, ascending
    next_position: int  # where the next token (picked, not yet in the cache) goes
    start: int = 0  # the prompt length: the first generated token's position

    @property
    def fed(self) -> int:
        """Generated tokens in the cache (the positions ``start .. next_position - 1``)."""
        return self.next_position - self.start


@dataclass
class Rescoring:
    """One re-scoring: when it ran, what it cut, what it cost."""

    fed: int  # generated tokens in the cache when it ran
    before: int  # entries per KV head in the longest layer, before
    after: int  # and after
    seconds: float  # scoring + top-k + gather
    interval_seconds: float  # decoding time of the ``interval`` steps it closes
    positions: list[torch.Tensor] | None = field(default=None, repr=False)  # kept positions per layer (tests)


@dataclass
class DecodeRecord:
    """What decoding under a :class:`DecodeBudget` did."""

    budget: DecodeBudget
    entries: list[int] = field(default_factory=list)  # entries per KV head (longest layer) at step 0 (after prefill) and after each step, before any re-scoring
    rescorings: list[Rescoring] = field(default_factory=list)
    seconds: float | None = None  # the whole answer's decoding time, where the decoder records it (engine.batch_rescore: this row's share)

    @property
    def peak(self) -> int:
        return max(self.entries, default=0)

    @property
    def rescore_seconds(self) -> float:
        return sum(r.seconds for r in self.rescorings)

    def line(self) -> str:
        b = self.budget
        return (
            f"decode budget {b.budget} (every {b.interval} tok, last {b.window} kept): {len(self.rescorings)} re-scorings"
            f" in {self.rescore_seconds * 1000:.1f}ms, peak {self.peak}/head"
        )


def decode_scorer(policy, model):
    """``policy``'s decode-time scorer, or a one-line ``ValueError`` naming why there is none."""
    if policy is None:
        raise ValueError("a decode budget evicts, and policy=None keeps the whole cache: pick an eviction method (e.g. SnapKV, LookaheadKV)")
    make = getattr(policy, "decode_scorer", None)
    if make is None:
        raise ValueError(f"{type(policy).__name__} has no decode-time scorer (decode_scorer)")
    return make(model)


class BudgetedDecoding:
    """The engine's side of decoding under a budget: entry positions, schedule, recent window, top-k, gather.

    Built after the prefill's eviction (``kept``: per layer (kv_heads, k) kept prompt positions,
    None when the whole prompt was kept; ``prefill`` and the policy's prefill ``observer`` go to the
    scorer's ``start``); :func:`engine.decode.decode` then runs with
    :meth:`observers` and calls :meth:`after_step` after every forward, which re-scores the
    cache in place when it is due.

    ``appended``: tokens already run over the evicted cache after the prompt (a question over a
    compressed context, :class:`integrations.hf.EvictionPipeline`): each layer then holds the kept
    prompt entries followed by these ``appended`` entries, at positions ``prompt_len ..``, and
    decoding starts after them (:attr:`start` is ``prompt_len + appended``).

    The cache's layers are made :class:`engine.cache.ReservedLayer` with room up to the peak
    (``budget + interval``, plus the entries a scorer appends for a moment, ``extra_entries``), so
    decoding writes into reserved slots and a re-scoring copies the kept entries into the same room.
    """

    def __init__(
        self, model, cache, kept, prompt_len: int, budget: DecodeBudget, scorer, *, prefill=None, observer=None, keep_positions: bool = False, appended: int = 0
    ):
        self.model, self.cache, self.budget, self.scorer = model, cache, budget, scorer
        self.start, self.keep_positions = prompt_len + appended, keep_positions
        self.positions = []
        for i, layer in enumerate(cache.layers):
            heads, n = layer.keys.shape[1], layer.keys.shape[2] - appended
            if kept is None:
                positions = torch.arange(n).expand(heads, n).clone()
            else:
                positions = kept[i].detach().cpu().long().clone()
            if appended:
                positions = torch.cat([positions, torch.arange(prompt_len, self.start).expand(heads, appended)], dim=1)
            if positions.shape != (heads, layer.keys.shape[2]):
                raise ValueError(f"layer {i} holds {layer.keys.shape[2]} entries per KV head, but {positions.shape[1]} positions were given for it (kept + appended)")
            self.positions.append(positions)
        extra = getattr(scorer, "extra_entries", 0)
        reserve(cache, [max(budget.budget - p.shape[1], 0) + budget.interval + extra for p in self.positions])
        begin = getattr(scorer, "start", None)
        if begin is not None:  # what the scorer carries on from the prefill (H2O: the prompt's attention sums)
            begin(model, prefill, observer, kept)
        observe = getattr(scorer, "observer", None)
        self._observer = observe() if observe is not None else None
        self.record = DecodeRecord(budget, entries=[self._longest()])
        self._mark = time.perf_counter()

    def _longest(self) -> int:
        return max(layer.keys.shape[-2] for layer in self.cache.layers)

    def observers(self) -> list:
        return [] if self._observer is None else [self._observer]

    def view(self, fed: int) -> CacheView:
        return CacheView(self.cache, self.positions, self.start + fed, start=self.start)

    def after_step(self, fed: int) -> None:
        """``fed`` generated tokens are now in the cache (the last one at position ``start + fed - 1``)."""
        if not self.advance(fed):
            return
        now = time.perf_counter()
        interval_seconds, self._mark = now - self._mark, now
        if self.close_interval(fed, interval_seconds):
            self._mark = time.perf_counter()

    def advance(self, fed: int) -> bool:
        """The bookkeeping of one step (:meth:`after_step` without the re-scoring): whether an interval ends at ``fed``.

        The entry count recorded is read off the positions (one per entry), so it holds also while
        the step's entries sit elsewhere (a stacked batch, :mod:`engine.batch_rescore`).
        """
        position = self.start + fed - 1
        self.positions = [torch.cat([p, p.new_full((p.shape[0], 1), position)], dim=1) for p in self.positions]
        self.record.entries.append(max(p.shape[1] for p in self.positions))
        return fed % self.budget.interval == 0

    def close_interval(self, fed: int, interval_seconds: float) -> bool:
        """An interval ended at ``fed``: re-score if the cache holds more than the budget; whether it did."""
        if self.record.entries[-1] > self.budget.budget:
            self.rescore(fed, interval_seconds)
            return True
        return False

    @torch.no_grad()
    def rescore(self, fed: int, interval_seconds: float = 0.0) -> None:
        """Score the cache with the scorer, keep the top ``budget`` per KV head (and the recent window), gather."""
        start = time.perf_counter()
        before = self._longest()
        scores = self.scorer.scores(self.model, self.view(fed))
        window = self.budget.window
        budgets, ranked = [], []
        for s, p in zip(scores, self.positions):
            if s.shape != p.shape:
                raise ValueError(f"a decode-time scorer returned scores of shape {tuple(s.shape)} for a layer of {tuple(p.shape)} entries")
            s = s.float().clone()
            if window:
                s[:, -window:] = float("inf")  # cache order is position order: the last entries are the most recent
            ranked.append(s)
            budgets.append(min(s.shape[-1], self.budget.budget))
        kept = select(ranked, budgets)
        compact = gather(self.cache, kept)
        for layer, new in zip(self.cache.layers, compact.layers):  # in place: decode() holds this cache
            layer.keys, layer.values = new.keys, new.values
        self.positions = [p.gather(1, k.cpu()) for p, k in zip(self.positions, kept)]
        evicted = getattr(self.scorer, "evicted", None)
        if evicted is not None:
            evicted(kept)
        self.record.rescorings.append(
            Rescoring(
                fed=fed,
                before=before,
                after=self._longest(),
                seconds=time.perf_counter() - start,
                interval_seconds=interval_seconds,
                positions=[p.clone() for p in self.positions] if self.keep_positions else None,
            )
        )
