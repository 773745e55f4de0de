"""Training targets: the model's own greedy response, and the true importance it implies.

The importance is :func:`lookaheadkv.scoring.ground_truth` (``docs/method.md``, "The ground
truth"): the mean attention of the response's queries to each prompt token, L1-normalised.
"""

from __future__ import annotations

import torch

from ..engine.cache import copy_cache
from ..engine.decode import decode, decode_batch
from ..engine.prefill import Prefill, prefill
from ..scoring import ground_truth


@torch.no_grad()
def generate_responses(model, prompts: list[list[int]], max_new_tokens: int, eos_token_ids) -> tuple[list[list[int]], list[Prefill]]:
    """Greedy full-cache responses of several prompts at once, and each prompt's prefill.

    Each prompt is prefilled alone (batch 1: no padding in the prompt's attention, which
    keeps bf16 on the fast fused kernels); the responses are then decoded together by
    :func:`~lookaheadkv.engine.decode.decode_batch`, every row at its own true positions,
    the ragged caches padded and the padding masked. Each response ends at its first
    end-of-sequence token (kept, as :func:`~lookaheadkv.engine.decode.decode` keeps it).
    The prefills are returned untouched so that the labels reuse them.
    """
    states = [prefill(model, torch.tensor([p], device=model.device)) for p in prompts]
    logits = torch.stack([s.logits.reshape(-1) for s in states])
    responses = decode_batch(model, [s.cache for s in states], logits, [s.length for s in states], max_new_tokens, eos_token_ids=eos_token_ids)
    return responses, states


@torch.no_grad()
def make_target(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_ids, response: list[int] | None = None, state: Prefill | None = None) -> dict:
    """Greedy response (unless given) and its ground-truth importance for one prompt (1, L).

    ``state``: the prompt's prefill when the caller has it (left as it was). The response's
    trailing end-of-sequence token is dropped before labelling: its query is never computed
    in a real generation, which stops there.
    """
    state = state if state is not None else prefill(model, prompt_ids)
    if response is None:
        response = decode(model, copy_cache(state.cache), state.logits, state.length, max_new_tokens, eos_token_ids=eos_token_ids)
    labelled = response[:-1] if len(response) > 1 and response[-1] in set(eos_token_ids) else response
    return {
        "prompt_ids": state.input_ids[0].cpu(),
        "response_ids": torch.tensor(response),
        "labels": ground_truth(model, state, labelled).cpu(),
    }
