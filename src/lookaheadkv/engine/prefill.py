"""Prefill a prompt once, and run extra tokens over its cache without keeping them."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from transformers import DynamicCache

from .attention import Observer, hooked
from .cache import crop, new_cache


@dataclass
class Prefill:
    """The state after a prompt's prefill: the full cache and the next-token logits."""

    input_ids: torch.Tensor  # (1, L)
    cache: DynamicCache  # every layer (1, kv_heads, L, head_dim)
    logits: torch.Tensor  # (vocab,) at the last prompt position
    seconds: float = 0.0
    tail_mass: list[torch.Tensor] | None = None  # per layer (heads, L): what the tail's observer took
    tail_rows: int = 0  # rows that ran after the prompt in the same forward (their entries are cropped)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def check_input_ids(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids`` as a (1, L) integer tensor on the model's device, or a clear error."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch tensor of token ids, shape (1, L), got {type(input_ids).__name__}: "
            "wrap it as torch.tensor([ids])"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}: use torch.long")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must have shape (1, L) or (L,), got {tuple(input_ids.shape)}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError(f"batch size must be 1, got {input_ids.shape[0]}: run one prompt at a time, or generate_batch_ids(model, input_ids, policy, attention_mask=mask) for a batch")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {vocab}): encode the prompt with this model's tokenizer")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[1] > limit:
        raise ValueError(f"the prompt has {input_ids.shape[1]} tokens, more than the model's context of {limit}")
    return input_ids.to(model.device)


@dataclass
class Tail:
    """Rows that ride along at the end of a prompt's prefill and are dropped after it.

    This is how LookaheadKV's lookahead tokens run "in the prefill" (the paper's setting): one
    forward over ``[prompt ; tail]``, with the tail's positions continuing the prompt's. Inside
    it the prompt's rows see only the prompt (causal), their attention is the same kernel call
    on the same tensors as in a plain prefill, ``adapters`` must touch only the last ``rows``
    positions, and ``observer.take_probs`` receives the tail's attention rows in every layer.
    The tail's cache entries are cropped off and the next-token logits are the last prompt
    position's.
    """

    embeds: torch.Tensor  # (1, n, hidden)
    observer: object  # has take_probs(probs, q, k), a `layer` attribute and per_layer()
    adapters: Callable[[], ContextManager] = field(default=nullcontext)

    @property
    def rows(self) -> int:
        return self.embeds.shape[1]


@torch.no_grad()
def forward_rows(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache,
    start: int = 0,
    observers: list[Observer | None] = (),
    tail: Tail | None = None,
) -> torch.Tensor:
    """Prompt tokens ``input_ids`` (1, m) at positions ``start ..``, then ``tail``'s rows, in one forward into ``cache``.

    Returns the next-token logits (vocab,) at the last prompt token. The cache keeps the tail's
    entries: the caller crops them. ``start > 0`` continues a cache that holds the prompt's
    first ``start`` tokens (a prefill's last chunk).
    """
    rows = input_ids.shape[1]
    positions = torch.arange(start, start + rows + (tail.rows if tail is not None else 0), device=input_ids.device)[None]
    if tail is None:
        with hooked(model, observers):
            out = model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()
    embeds = model.get_input_embeddings()(input_ids)
    embeds = torch.cat([embeds, tail.embeds.to(device=embeds.device, dtype=embeds.dtype)], dim=1)
    last_prompt_row = torch.tensor([rows - 1], device=embeds.device)
    with hooked(model, observers, tail=tail), tail.adapters():
        out = model(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=last_prompt_row)
    return out.logits[0, -1].float()


def prefill(
    model: torch.nn.Module, input_ids: torch.Tensor, observers: list[Observer | None] = (), tail: Tail | None = None
) -> Prefill:
    """Run the prompt through ``model`` once, calling ``observers`` in every attention layer.

    With a ``tail``, its rows run after the prompt in the same forward (see :class:`Tail`);
    what its observer took is in ``Prefill.tail_mass``.
    """
    import time

    input_ids = check_input_ids(model, input_ids)
    start = time.perf_counter()
    cache = new_cache()
    logits = forward_rows(model, input_ids, cache, observers=observers, tail=tail)
    if tail is None:
        return Prefill(input_ids, cache, logits, time.perf_counter() - start)
    crop(cache, input_ids.shape[1])
    return Prefill(input_ids, cache, logits, time.perf_counter() - start, tail_mass=tail.observer.per_layer(), tail_rows=tail.rows)


def extend(
    model: torch.nn.Module,
    cache: DynamicCache,
    prompt_len: int,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    observers: list[Observer | None] = (),
    logits: bool = False,
    position: int | None = None,
) -> torch.Tensor | None:
    """Run tokens at positions ``prompt_len ..`` over the prompt's cache, then drop their entries.

    This is how a scorer looks at the prompt from "after" it (lookahead tokens, draft
    tokens, a response) without changing the prompt's cache. Gradients flow if the caller
    enables them. Returns the logits (1, n, vocab) when ``logits`` is set.

    ``position``: the true position of the first token when the cache holds fewer entries than
    positions (an evicted cache during decoding); every layer is then cut back to its own length.
    """
    n = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    device = model.device
    if position is not None:
        prompt_len = [layer.keys.shape[-2] for layer in cache.layers]
    first = prompt_len if position is None else position
    positions = torch.arange(first, first + n, device=device)[None]
    try:
        with hooked(model, observers):
            out = model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=n if logits else 1,
            )
    finally:
        if position is None:
            crop(cache, prompt_len)
        else:
            for layer, length in zip(cache.layers, prompt_len):
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
    return out.logits if logits else None
