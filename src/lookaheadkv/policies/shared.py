"""Several policies scored on ONE prefill of a prompt: the evaluation runner, the recall benchmark
(``benchmarks/recall.py``) and training's held-out recall all go through :class:`SharedPrefill`.

The prompt is prefilled once, plainly (no policy's tail rides in it: LookaheadKV then runs its tokens
in one extra forward over the cache, the same scores up to float rounding), with every policy's
observer in that one pass. Each policy is then scored on it once; a policy whose scores depend on the
budget (``budget_dependent``, LAQ) is scored once per budget. Policies are never changed: a budget is
applied to a copy (:meth:`Policy.with_budget`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..engine.evict import select
from ..engine.prefill import prefill
from ..scoring import Observers, attention_recall
from .base import Policy
from .oracle import Oracle


class SharedPrefill:
    """One prefill of ``input_ids`` (1, L) carrying the observers of ``policies`` (name -> policy).

    ``truth`` (layers, heads, L), the ground-truth importance of the prompt's tokens
    (:func:`lookaheadkv.scoring.ground_truth`), may be given now or later (:meth:`set_truth`):
    an :class:`~lookaheadkv.policies.Oracle` then takes it as its scores instead of decoding its
    own answer, and :meth:`recall` measures against it.
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, policies: Mapping[str, Policy], truth: torch.Tensor | None = None):
        self.model = model
        self.policies = dict(policies)
        self.observers = {name: p.observer() for name, p in self.policies.items()}
        watching = [o for o in self.observers.values() if o is not None]
        with torch.no_grad():
            self.state = prefill(model, input_ids, [Observers(*watching)])
        self.truth = truth
        self._scores: dict[tuple, list[torch.Tensor] | None] = {}
        self._at: dict[tuple, Policy] = {}

    def set_truth(self, truth: torch.Tensor) -> None:
        self.truth = truth

    def policy(self, name: str, budget: int | float | None = None) -> Policy:
        """``policies[name]``, or a copy of it at ``budget`` (made once)."""
        base = self.policies[name]
        if budget is None or (type(budget) is type(base.budget) and budget == base.budget):  # 1 (one entry) is not 1.0 (all)
            return base
        if (name, budget) not in self._at:
            self._at[(name, budget)] = self.policies[name].with_budget(budget)
        return self._at[(name, budget)]

    @torch.no_grad()
    def scores(self, name: str, budget: int | float | None = None) -> list[torch.Tensor] | None:
        """Per layer (kv_heads, L) scores of ``policies[name]`` (at ``budget`` when it matters), computed once."""
        base = self.policies[name]
        key = (name, budget if base.budget_dependent else None)
        if key not in self._scores:
            policy = self.policy(*key)
            if isinstance(policy, Oracle) and self.truth is not None:
                self._scores[key] = policy.reduce(list(self.truth), self.model.config.num_key_value_heads)
            else:
                self._scores[key] = policy.scores(self.model, self.state, self.observers[name])
        return self._scores[key]

    def kept(self, name: str, budget: int | float) -> list[torch.Tensor] | None:
        """Per layer (kv_heads, k) prompt positions ``policies[name]`` keeps at ``budget``; None keeps everything."""
        scores = self.scores(name, budget)
        if scores is None:
            return None
        return select(scores, self.policy(name, budget).layer_budgets(len(scores), self.state.length))

    def recall(self, budgets: Sequence[int | float], names: Sequence[str] | None = None) -> dict[str, float]:
        """``{"name@budget": attention recall}`` against ``truth`` (1.0 where a policy keeps everything)."""
        if self.truth is None:
            raise ValueError("recall needs the ground truth: pass truth= or call set_truth()")
        out = {}
        for name in self.policies if names is None else names:
            for b in budgets:
                kept = self.kept(name, b)
                out[f"{name}@{b}"] = 1.0 if kept is None else attention_recall(list(self.truth), kept)
        return out
