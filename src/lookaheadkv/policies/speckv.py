"""SpecKV: a small draft model's answer tells the target which prompt tokens matter.

Galim et al., "Draft-based Approximate Inference for LLMs", 2025,
https://arxiv.org/abs/2506.08373
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.cache import copy_cache
from ..engine.decode import decode
from ..engine.generate import eos_ids
from ..engine.prefill import extend, prefill
from ..scoring import AttentionMass, max_pool
from .base import Policy

#: How SpecKV is shown when it drafts with the target itself (no draft model given): its draft is
#: then the full-cache answer's own beginning, so it is an upper bound, not a practical method.
SELF_DRAFT_LABEL = "SpecKV (self-draft: the target's own answer, an upper bound)"


def speckv_label(draft_name: str | None) -> str:
    """The display name of SpecKV with a draft model named ``draft_name`` (None: self-draft)."""
    return SELF_DRAFT_LABEL if draft_name is None else f"SpecKV (draft: {draft_name})"


@dataclass
class SpecKV(Policy):
    """The draft model answers first; the target's window queries plus the draft's queries vote (max); with no draft model it is SpecKV (self-draft: the target's own answer, an upper bound).

    Parameters
    ----------
    draft : model, str or None
        A causal LM sharing the target's tokenizer, or a name/folder for ``load_model``.
        None drafts with the target model itself (for a model with no smaller sibling,
        such as the bundled SmolLM2). The draft is then the full-cache answer's own beginning:
        an oracle in disguise, labelled everywhere as :data:`SELF_DRAFT_LABEL` (an upper bound).
    n_draft : int
        Draft tokens (stops early at end of sequence).
    window : int
        Last prompt queries that also vote.
    kernel : int
        Max-pooling kernel along the prompt.
    """

    draft: object = None
    n_draft: int = 32
    window: int = 32
    kernel: int = 7
    gqa_reduce: str = "max"
    name = "speckv"
    no_decode_scorer = (
        "re-drafting at every re-scoring would decode the draft model beside the target for the whole "
        "answer; use --method snapkv (the generated tokens' queries are the window) or lookahead"
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.draft, type) or (self.draft is not None and not isinstance(self.draft, (str, torch.nn.Module))):
            raise TypeError(f"draft must be a loaded causal LM, a hub id or a folder, or None (self-draft), got {self.draft!r}")

    @property
    def draft_name(self) -> str | None:
        """The draft model's name (a hub id or folder), None when drafting with the target itself."""
        if self.draft is None:
            return None
        if isinstance(self.draft, str):
            return self.draft
        return getattr(self.draft.config, "_name_or_path", "") or "a draft model"

    @property
    def label(self) -> str:
        return speckv_label(self.draft_name)

    def observer(self):
        return AttentionMass(last_rows=self.window, reduce="max")

    def draft_model(self, model):
        if self.draft is None:
            return model
        drafter = self.draft
        if isinstance(drafter, str):  # loaded once per name and device; ``draft`` stays the name
            from ..models import load_model

            drafter = self.loaded_once((drafter, str(model.device)), lambda: load_model(self.draft, device=model.device)[0])
        if drafter.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({drafter.config.vocab_size}) differs from the target's "
                f"({model.config.vocab_size}): SpecKV needs a draft with the same tokenizer"
            )
        return drafter

    @torch.no_grad()
    def draft_tokens(self, model, state) -> list[int]:
        drafter = self.draft_model(model)
        if drafter is model:
            start, logits = copy_cache(state.cache), state.logits
        else:
            own = prefill(drafter, state.input_ids)
            start, logits = own.cache, own.logits
        return decode(drafter, start, logits, state.length, self.n_draft, eos_token_ids=eos_ids(drafter, None))

    def scores(self, model, prefill_state, observer):
        tokens = self.draft_tokens(model, prefill_state)
        drafted = AttentionMass(reduce="max")
        ids = torch.tensor([tokens], device=model.device)
        with torch.no_grad():
            extend(model, prefill_state.cache, prefill_state.length, input_ids=ids, observers=[drafted])
        votes = [torch.maximum(w, d) for w, d in zip(observer.per_layer(), drafted.per_layer())]
        kv_heads = model.config.num_key_value_heads
        return [max_pool(s, self.kernel) for s in self.reduce(votes, kv_heads)]
