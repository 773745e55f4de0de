"""Autoregressive decoding on a (possibly compressed) cache, at the tokens' true positions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from transformers import DynamicCache

from .attention import Observer, hooked
from .cache import reserve


@dataclass
class Sampling:
    """Greedy when ``temperature`` is 0; otherwise temperature and nucleus (top-p) sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """Next token id from ``logits`` (vocab,)."""
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    cache: DynamicCache,
    first_logits: torch.Tensor,
    position: int,
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    eos_token_ids: Iterable[int] = (),
    on_token: Callable[[int], None] | None = None,
    observers: list[Observer | None] = (),
    after_step: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate up to ``max_new_tokens`` tokens; the first one comes from ``first_logits``.

    ``position`` is the true position of the first new token (the prompt length), whatever
    the cache now holds: rotary embeddings see the tokens where they really are.
    ``after_step(n)`` runs after each forward, when ``n`` new tokens are in the cache (decode-time
    eviction re-scores the cache in place there: :mod:`lookaheadkv.engine.rescore`).

    ``cache`` is extended in place: its layers that are exactly ``DynamicLayer`` are first replaced,
    in ``cache.layers``, by :class:`engine.cache.ReservedLayer` with room for the answer, so a step
    writes one entry per layer instead of copying every layer (other layer types are left alone).
    The caller can go on using the cache as before: crop it, assign its layers' keys and values.
    """
    if max_new_tokens > 1:  # each step then writes into reserved room instead of copying every layer
        reserve(cache, max_new_tokens - 1)  # the last token is never fed
    eos = set(eos_token_ids)
    generator = sampling.generator()
    tokens: list[int] = []
    logits = first_logits
    with hooked(model, observers):
        for step in range(max_new_tokens):
            token = sampling.pick(logits, generator)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos or step == max_new_tokens - 1:
                break
            out = model(
                input_ids=torch.tensor([[token]], device=model.device),
                position_ids=torch.tensor([[position + step]], device=model.device),
                cache=cache,
                use_cache=True,
            )
            logits = out.logits[0, -1]
            if after_step is not None:
                after_step(step + 1)
    return tokens


@torch.no_grad()
def decode_batch(
    model: torch.nn.Module,
    caches: list[DynamicCache],
    first_logits: torch.Tensor,
    position: int | list[int],
    max_new_tokens: int,
    *,
    eos_token_ids: Iterable[int] = (),
    sampling: Sampling = Sampling(),
) -> list[list[int]]:
    """Decoding of several caches at once: evictions of one prompt, or different prompts.

    Evictions of ONE prompt share ``first_logits`` (vocab,) and ``position`` (an int).
    Different prompts (the training data build's batches, :func:`engine.batch.generate_batch_ids`)
    give one row of ``first_logits`` (batch, vocab) and one true position (their prompt length) per
    cache; each row then decodes at its own positions. Their layers are stacked along the batch
    dimension and decoded together: the model's weights are read once per step for all of them,
    which is what makes an evaluation of many methods x budgets affordable on a CPU. Caches whose
    layers hold different numbers of entries (other budgets, PyramidKV's per-layer budgets, other
    prompts) are padded to the longest in each layer and the padding is masked out of every step's
    attention. Row ``i`` stops at its own EOS exactly as :func:`decode` would and then leaves the
    batch; the loop ends when every row has stopped. Greedy by default; with ``sampling`` each row
    draws from its own generator seeded as :func:`decode` seeds one, so a row samples what it would
    alone. The caches are left untouched. The result equals running :func:`decode` on each cache up
    to floating-point summation order in the batched matmuls (tested).
    """
    if not caches:
        return []
    from .cache import stack_caches

    stacked, padding = stack_caches(caches, max_new_tokens)  # a step writes one slot per row, it copies no layer
    eos = set(eos_token_ids)
    batch = len(caches)
    first = first_logits.reshape(-1, first_logits.shape[-1])
    if first.shape[0] not in (1, batch):
        raise ValueError(f"first_logits must be (vocab,) or ({batch}, vocab), got {tuple(first_logits.shape)}")
    positions = torch.tensor([position] * batch if isinstance(position, int) else list(position))
    if positions.shape != (batch,):
        raise ValueError(f"position must be an int or one int per cache ({batch}), got {position!r}")
    generators = [sampling.generator() for _ in range(batch)]
    tokens = [[sampling.pick(first[i if first.shape[0] > 1 else 0], generators[i])] for i in range(batch)]
    done = [t[0] in eos or max_new_tokens <= 1 for t in tokens]
    device = model.device
    active = list(range(batch))  # rows still decoding, in the stacked cache's order
    with hooked(model, (), padding=padding or None):
        for step in range(max_new_tokens - 1):
            still = [j for j, i in enumerate(active) if not done[i]]
            if not still:
                break
            if len(still) < len(active):  # finished rows leave the batch: no step is spent on them
                keep = torch.tensor(still, device=device)
                for layer in stacked.layers:
                    layer.select_rows(keep)
                padding[:] = [m.index_select(0, keep) for m in padding]
                active = [active[j] for j in still]
            last = torch.tensor([[tokens[i][-1]] for i in active], device=device)
            out = model(
                input_ids=last,
                position_ids=(positions[active] + step)[:, None].to(device),
                cache=stacked,
                use_cache=True,
                logits_to_keep=1,
            )
            for i, row in zip(active, out.logits[:, -1]):
                token = sampling.pick(row, generators[i])
                tokens[i].append(token)
                done[i] = token in eos or len(tokens[i]) >= max_new_tokens
    return tokens
