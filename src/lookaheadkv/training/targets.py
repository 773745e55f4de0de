"""Training targets: the model's own greedy response, and the true importance it implies.

Ground truth (METHOD.md section 1): for layer l, query head h and prompt token j,

    s_GT[l, h, j] = mean over response tokens t of A[l, h, t, j], L1-normalised over j,

where A is the softmax attention of the response's queries over the causal row
(prompt and earlier response tokens). The response runs over the prompt's cache in
row chunks, so only ``chunk x (L + |Y|)`` attention rows exist at a time.
"""

from __future__ import annotations

import torch

from ..engine.cache import copy_cache
from ..engine.decode import decode
from ..engine.prefill import Prefill, extend, prefill
from ..policies.base import AttentionMass


def normalise(mass: torch.Tensor) -> torch.Tensor:
    """L1-normalise over the last (prompt) dimension."""
    return mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-30)


@torch.no_grad()
def ground_truth(model, state: Prefill, response_ids: list[int], chunk: int = 128) -> torch.Tensor:
    """(layers, heads, L) importance of each prompt token to ``response_ids``, L1-normalised."""
    observer = AttentionMass(chunk=chunk)
    ids = torch.tensor([response_ids], device=model.device)
    extend(model, state.cache, state.length, input_ids=ids, observers=[observer])
    return normalise(torch.stack(observer.per_layer()).float())


@torch.no_grad()
def make_target(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_ids) -> dict:
    """Greedy response and its ground-truth importance for one prompt (1, L).

    The response's trailing end-of-sequence token is dropped before labelling: its query
    is never computed in a real generation, which stops there.
    """
    state = prefill(model, prompt_ids)
    response = decode(model, copy_cache(state.cache), state.logits, state.length, max_new_tokens, eos_token_ids=eos_token_ids)
    labelled = response[:-1] if len(response) > 1 and response[-1] in set(eos_token_ids) else response
    return {
        "prompt_ids": state.input_ids[0].cpu(),
        "response_ids": torch.tensor(response),
        "labels": ground_truth(model, state, labelled).cpu(),
    }
