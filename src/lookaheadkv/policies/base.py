"""What every scoring policy shares: the Policy base class.

A policy only decides *scores*: one number per (layer, KV head, prompt token). The engine
owns the rest (prefill, top-k per KV head, the physical gather, decoding); the score-row math
and the observers are in :mod:`lookaheadkv.scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..engine.evict import resolve_budget
from ..engine.prefill import Prefill
from ..scoring import GQA_REDUCTIONS, reduce_gqa

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
    #: False for a policy that keeps the whole cache (FullKV): the engine then skips the eviction checks.
    evicts: ClassVar[bool] = True
    #: True when the scores themselves change with the budget (not only the top-k).
    budget_dependent: ClassVar[bool] = False

    def __post_init__(self):
        resolve_budget(self.budget, 10**9)
        if self.gqa_reduce not in GQA_REDUCTIONS:
            raise ValueError(f"gqa_reduce must be one of {', '.join(GQA_REDUCTIONS)}, got {self.gqa_reduce!r}")

    def with_budget(self, budget: int | float) -> "Policy":
        """The same policy at another budget: a new instance (this one is never changed).

        What a policy loaded lazily (LookaheadKV's modules, SpecKV's draft model) is shared by the copy.
        """
        copy = replace(self, budget=budget)
        if "_loaded" in self.__dict__:
            copy._loaded = self._loaded
        return copy

    def loaded_once(self, key, load):
        """``load()``, called once per ``key`` (e.g. a folder and a device) and kept, also by
        :meth:`with_budget` copies; the settings the user gave stay as they were."""
        cached = self.__dict__.get("_loaded")
        if cached is None or cached[0] != key:
            cached = self._loaded = (key, load())
        return cached[1]

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

    def decode_scorer(self, model: torch.nn.Module):
        """The scorer that re-scores the cache during decoding under a decode budget (``engine.rescore``).

        Policies without one refuse with one line (:attr:`no_decode_scorer` says why).
        """
        raise ValueError(f"{self.name} has no decode-time scorer: {self.no_decode_scorer}")

    @property
    def has_decode_scorer(self) -> bool:
        """Whether this policy can run under a decode budget (it overrides :meth:`decode_scorer`)."""
        return type(self).decode_scorer is not Policy.decode_scorer

    #: Why a policy has no decode-time scorer (shown when a decode budget asks for one).
    no_decode_scorer: ClassVar[str] = "use one of lookahead, snapkv, pyramidkv, h2o, tova, streamingllm, random"

    def layer_budgets(self, num_layers: int, prompt_len: int) -> list[int]:
        """Entries kept per layer: the budget, capped at the prompt (a budget at or above it keeps it all)."""
        return [min(prompt_len, resolve_budget(self.budget, prompt_len))] * num_layers

    def reduce(self, per_head: list[torch.Tensor], kv_heads: int) -> list[torch.Tensor]:
        return [reduce_gqa(s, kv_heads, self.gqa_reduce) for s in per_head]
