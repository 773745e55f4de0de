"""Autoregressive decoding on a (possibly compressed) cache, at the tokens' true positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from transformers import DynamicCache

from .attention import Observer, hooked


@dataclass
class Sampling:
    """Greedy when ``temperature`` is 0; otherwise temperature and nucleus (top-p) sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
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
) -> list[int]:
    """Generate up to ``max_new_tokens`` tokens; the first one comes from ``first_logits``.

    ``position`` is the true position of the first new token (the prompt length), whatever
    the cache now holds: rotary embeddings see the tokens where they really are.
    """
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
    return tokens
