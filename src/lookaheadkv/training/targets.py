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
    """(layers, heads, L) importance of each prompt token to ``response_ids``, L1-normalised (float32 arithmetic)."""
    observer = _Float32Mass(chunk=chunk)
    ids = torch.tensor([response_ids], device=model.device)
    extend(model, state.cache, state.length, input_ids=ids, observers=[observer])
    return normalise(torch.stack(observer.per_layer()).float())


@torch.no_grad()
def generate_responses(model, prompts: list[list[int]], max_new_tokens: int, eos_token_ids, pad_token_id: int = 0) -> list[list[int]]:
    """Greedy full-cache responses of several prompts at once (left-padded batch, Hugging Face generate).

    Batching only speeds the build up: each response ends at its first end-of-sequence
    token (kept, as :func:`~lookaheadkv.engine.decode.decode` keeps it).
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    eos = list(eos_token_ids)
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos or None,
        pad_token_id=pad_token_id,
    )
    responses = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        responses.append(row if stop is None else row[: stop + 1])
    return responses


@torch.no_grad()
def make_target(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_ids, response: list[int] | None = None) -> dict:
    """Greedy response (unless given) and its ground-truth importance for one prompt (1, L).

    The response's trailing end-of-sequence token is dropped before labelling: its query
    is never computed in a real generation, which stops there.
    """
    state = prefill(model, prompt_ids)
    if response is None:
        response = decode(model, copy_cache(state.cache), state.logits, state.length, max_new_tokens, eos_token_ids=eos_token_ids)
    labelled = response[:-1] if len(response) > 1 and response[-1] in set(eos_token_ids) else response
    return {
        "prompt_ids": state.input_ids[0].cpu(),
        "response_ids": torch.tensor(response),
        "labels": ground_truth(model, state, labelled).cpu(),
    }
