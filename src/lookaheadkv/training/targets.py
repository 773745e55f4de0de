"""Training targets: the model's own greedy response, and the true importance it implies.

The importance is :func:`lookaheadkv.scoring.ground_truth` (``docs/method.md``, "The ground
truth"): the mean attention of the response's queries to each prompt token, L1-normalised.
"""

from __future__ import annotations

import torch

from ..engine.cache import copy_cache
from ..engine.decode import decode
from ..engine.prefill import prefill
from ..scoring import ground_truth


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
