"""Decoding under decode budgets, several rows of ONE prompt as one batch.

:func:`engine.decode.decode` with a :class:`engine.rescore.BudgetedDecoding` decodes one cache at a
time: for a small model on a CPU, each step is mostly per-step overhead (Python, kernel launches,
reading the weights), so decoding every (method, decode budget) of a prompt one after the other
costs about as many times one decoding. :func:`decode_budgeted_batch` runs them together: one
forward per step for all rows, as :func:`engine.decode.decode_batch` does for prefill-only eviction.

It works in *segments*: the steps up to the next re-scoring boundary (a multiple of a row's
``interval`` in fed tokens), or up to a step after which some row stops. For a segment the rows'
own batch-1 caches are stacked (:func:`engine.cache.stack_caches`: each layer padded at its end to
the longest row and the padding masked; the segment's new entries come after the padding), and the
steps are decoded batched. Each row's decode-time observer (H2O's attention sums, SnapKV's and
TOVA's window of queries) sees, per layer and step, its row's query and its row's real keys only:
``cat(old real entries, new entries)``, the padding left out, which is exactly what it would see
decoding the row alone. Each row's bookkeeping (:meth:`BudgetedDecoding.advance`: positions, entry
counts) runs after every step. At the segment's end every row's real entries are written back into
its own cache (the object its ``BudgetedDecoding`` holds, in place), each row whose interval ends
there is re-scored on that unpadded cache exactly as :meth:`BudgetedDecoding.after_step` would
(:meth:`BudgetedDecoding.close_interval`), finished rows leave, and the rest are stacked again.

So every row decodes the tokens, and keeps the entries after every re-scoring, of decoding it alone,
up to float summation order in the batched matmuls (tested: tests/test_batch_rescore.py).

Timings. A batched step serves every active row at once, so its time is shared: each row is charged
the step's seconds divided by the number of rows in the step (and likewise for stacking and
unstacking a segment). A row's :class:`Rescoring` then holds its own re-scoring's seconds, as
measured, and ``interval_seconds`` = its share of the decoding of the interval that re-scoring
closes; ``record.seconds`` is the row's whole share plus its re-scorings. The ratio re-scoring /
interval is thus the cost relative to the row's share of a batched step, not to a step decoded
alone (which is slower per row).
"""

from __future__ import annotations

import time
from typing import Iterable

import torch

from .attention import hooked
from .cache import stack_caches
from .decode import Sampling
from .rescore import BudgetedDecoding


class RowObservers:
    """One observer for a stacked batch: each row's own observer gets its row's query and real keys.

    ``observers``: per row of the stacked batch, the row's observer or None. ``real[l][j]``: the
    entries row ``j`` held in layer ``l`` when the caches were stacked, ``padded[l]`` the layer's
    padded length; the entries after ``padded[l]`` are the ones decoded since, real for every row.
    An observer that declares ``needs_keys = False`` (it reads only the query) is given ``None``
    for the keys, which spares a copy of its row's keys per layer and step.
    """

    batched = True  # engine.attention accepts it in a batch of more than one row

    def __init__(self, observers: list, real: list[list[int]], padded: list[int]):
        self.observers, self.real, self.padded = observers, real, padded

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        longest = self.padded[layer_idx]
        for j, observe in enumerate(self.observers):
            if observe is None:
                continue
            n = self.real[layer_idx][j]
            if not getattr(observe, "needs_keys", True):
                keys = None
            elif n == longest:
                keys = key[j : j + 1]
            else:
                keys = torch.cat([key[j : j + 1, :, :n], key[j : j + 1, :, longest:]], dim=2)
            observe(layer_idx, query[j : j + 1], keys, scaling)


def _unstack(stacked, caches, real: list[list[int]], padded: list[int]) -> None:
    """Row ``j``'s real entries of ``stacked`` (old ones, then the new ones after the padding) into ``caches[j]``, in place."""
    for l, layer in enumerate(stacked.layers):
        longest = padded[l]
        for j, cache in enumerate(caches):
            n = real[l][j]
            target = cache.layers[l]
            for part in ("keys", "values"):
                t = getattr(layer, part)
                setattr(target, part, torch.cat([t[j : j + 1, :, :n], t[j : j + 1, :, longest:]], dim=2))


@torch.no_grad()
def decode_budgeted_batch(
    model: torch.nn.Module,
    runs: list[BudgetedDecoding],
    first_logits: torch.Tensor,
    position: int,
    max_new_tokens: int,
    *,
    eos_token_ids: Iterable[int] = (),
    sampling: Sampling = Sampling(),
) -> list[list[int]]:
    """Decode every run's cache under its decode budget, all rows as one batch; the tokens per run.

    ``runs``: one :class:`BudgetedDecoding` per row, each over its own batch-1 cache, all evictions
    of ONE prompt: they share ``first_logits`` (vocab,) and the true position of the first new token
    (``position``, the prompt length; each run's ``start`` must equal it). Budgets, intervals,
    policies and scorers may differ. Row ``i`` gives what ``decode(model, runs[i].cache,
    first_logits, position, max_new_tokens, observers=runs[i].observers(),
    after_step=runs[i].after_step)`` gives: its tokens (stopping at its own EOS), and in
    ``runs[i].record`` the same entry counts and re-scorings (kept positions included with
    ``keep_positions``); its cache ends as that decoding leaves it. Greedy by default; with
    ``sampling`` each row draws from its own generator, seeded as :func:`decode` seeds one.

    Timings (see the module): ``interval_seconds`` of a re-scoring and ``record.seconds`` charge
    each row a batched step's seconds divided by the rows in that step.
    """
    if not runs:
        return []
    for run in runs:
        if run.start != position:
            raise ValueError(f"every run must start at the shared position {position}, got one at {run.start}")
    rows = len(runs)
    first = first_logits.reshape(-1, first_logits.shape[-1])
    if first.shape[0] not in (1, rows):
        raise ValueError(f"first_logits must be (vocab,) or ({rows}, vocab), got {tuple(first_logits.shape)}")
    eos = set(eos_token_ids)
    generators = [sampling.generator() for _ in range(rows)]
    tokens = [[sampling.pick(first[i if first.shape[0] > 1 else 0], generators[i])] for i in range(rows)]
    done = [t[0] in eos or max_new_tokens <= 1 for t in tokens]
    spent = [0.0] * rows  # decoding seconds charged to each row since its last interval ended
    total = [0.0] * rows  # and over the whole answer, re-scorings included
    device = model.device

    def charge(seconds: float, active: list[int]) -> None:
        share = seconds / len(active)
        for i in active:
            spent[i] += share
            total[i] += share

    active = [i for i in range(rows) if not done[i]]
    step = 0  # tokens fed so far, the same for every active row
    while active:
        begin = time.perf_counter()
        end = min(min(step + runs[i].budget.interval - step % runs[i].budget.interval for i in active), max_new_tokens - 1)
        caches = [runs[i].cache for i in active]
        real = [[c.layers[l].keys.shape[-2] for c in caches] for l in range(len(caches[0].layers))]
        padded = [max(r) for r in real]
        stacked, padding = stack_caches(caches, room=end - step)
        observers = [next(iter(runs[i].observers()), None) for i in active]
        watch = [RowObservers(observers, real, padded)] if any(o is not None for o in observers) else []
        charge(time.perf_counter() - begin, active)
        with hooked(model, watch, padding=padding or None):
            while step < end:
                begin = time.perf_counter()
                out = model(
                    input_ids=torch.tensor([[tokens[i][-1]] for i in active], device=device),
                    position_ids=torch.full((len(active), 1), position + step, device=device),
                    cache=stacked,
                    use_cache=True,
                    logits_to_keep=1,
                )
                step += 1
                for i, row in zip(active, out.logits[:, -1]):
                    token = sampling.pick(row, generators[i])
                    tokens[i].append(token)
                    done[i] = token in eos or len(tokens[i]) >= max_new_tokens
                    runs[i].advance(step)
                charge(time.perf_counter() - begin, active)
                if any(done[i] for i in active):  # it leaves the batch: end the segment here
                    break
        begin = time.perf_counter()
        _unstack(stacked, caches, real, padded)
        del stacked
        charge(time.perf_counter() - begin, active)
        for i in active:
            if step % runs[i].budget.interval == 0:
                count = len(runs[i].record.rescorings)
                runs[i].close_interval(step, spent[i])
                spent[i] = 0.0
                total[i] += sum(r.seconds for r in runs[i].record.rescorings[count:])
        active = [i for i in active if not done[i]]
    for run, seconds in zip(runs, total):
        run.record.seconds = seconds
    return tokens
