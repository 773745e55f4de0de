"""LookaheadKV: learned lookahead tokens predict what the answer will attend to.

Ahn et al., "LookaheadKV: Fast and Accurate KV Cache Eviction by Glimpsing into the
Future without Generation", ICLR 2026, https://arxiv.org/abs/2603.10899
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lookahead import LookaheadModules, ModulesError, default_modules_path
from ..scoring import AttentionMass, max_pool
from .base import Policy


@dataclass
class LookaheadKV(Policy):
    """Score = mean attention of the n lookahead queries to each prompt token.

    The lookahead tokens run at the end of the prompt's own prefill, with their LoRA adapters
    on their rows only (n x L score rows per layer); their own KV is dropped afterwards. When
    the prompt was prefilled without them (a prefill shared between methods, or
    ``fused=False``), they run in one extra forward over the prompt's cache instead: the same
    scores up to float rounding, a prompt cache bit-identical to a plain prefill's, and the
    cost of a second, 32-row forward.

    Parameters
    ----------
    modules : LookaheadModules, str or None
        Trained modules, or a folder / hub id to load them from. None uses the modules
        shipped for the bundled model (other models need their own: see ``lookaheadkv train``).
    kernel : int
        Optional max-pooling kernel over the scores (1 = off, the default).
    window : int
        Optional hybrid: also count the last ``window`` prompt queries' attention, as in
        SnapKV (0 = off, the default).
    fused : bool
        Run the lookahead tokens inside the prompt's prefill (True, the default) or in a
        separate forward over its cache (False).
    """

    modules: object = None
    kernel: int = 1
    window: int = 0
    fused: bool = True
    name = "lookahead"

    def __post_init__(self):
        super().__post_init__()
        if self.kernel < 1 or self.window < 0:
            raise ValueError(f"kernel must be >= 1 and window >= 0, got {self.kernel} and {self.window}")

    def resolve(self, model):
        if isinstance(self.modules, LookaheadModules):
            return self.modules
        path = self.modules if self.modules is not None else default_modules_path(model)
        if path is None:
            raise ModulesError(
                "LookaheadKV needs trained modules for this model: pass modules=PATH (--modules PATH); "
                "train them with 'lookaheadkv train'"
            )
        # per folder and device: used with another model (its own shipped modules) or after the
        # model moved, the policy loads what that one needs; ``modules`` stays as the user gave it
        return self.loaded_once((str(path), str(model.device)), lambda: LookaheadModules.from_pretrained(path, device=model.device))

    def observer(self):
        return AttentionMass(last_rows=self.window) if self.window else None

    def tail(self, model):
        return self.resolve(model).tail(model) if self.fused else None

    def decode_scorer(self, model):
        """The lookahead tokens over the current cache at the next true positions (``policies.decoding``)."""
        from .decoding import LookaheadScores

        return LookaheadScores(self, model)

    @torch.no_grad()  # inference: never build an autograd graph through the model (training uses attention_mass)
    def scores(self, model, prefill, observer):
        modules = self.resolve(model)
        mass = prefill.tail_mass  # the tokens ran in the prefill (see tail()); else run them now
        if mass is None:
            mass = modules.attention_mass(model, prefill.cache, prefill.length)
        rows = modules.config.n_lookahead
        if observer is not None:
            mass = [m + observer.mass[i] for i, m in enumerate(mass)]
            rows += min(self.window, prefill.length)
        kv_heads = model.config.num_key_value_heads
        return [max_pool(s / rows, self.kernel) for s in self.reduce(mass, kv_heads)]
