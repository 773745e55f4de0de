"""Building samples and suites at measured token lengths, with train/eval disjointness."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from typing import Any

from lookaheadkv.tasks.generators import TASKS, Draft, TaskSpec
from lookaheadkv.tasks.heldout import GROUP as HELDOUT_GROUP
from lookaheadkv.tasks.heldout import HELDOUT_TASKS
from lookaheadkv.tasks.sample import Sample, encode_prompt
from lookaheadkv.tasks.text import SPLITS, split_pools

LENGTH_TOLERANCE = 0.05
"""Largest allowed relative gap between a prompt's token count and its target."""


def sample_seed(split: str, task: str, target_tokens: int, seed: int, index: int) -> int:
    """The RNG seed of one sample.

    A hash of ``(task, target_tokens, seed, index)`` in the low 63 bits and the split
    in the top bit, so train and eval seeds come from disjoint spaces.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    digest = hashlib.sha256(f"{task}|{target_tokens}|{seed}|{index}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 1) | (SPLITS.index(split) << 63)


def sample_id(split: str, task: str, target_tokens: int, seed: int, index: int) -> str:
    """A readable unique id, e.g. ``eval/niah_single_number/2048/seed0/3``."""
    return f"{split}/{task}/{target_tokens}/seed{seed}/{index}"


def _fit(draft: Draft, tokenizer: Any, target_tokens: int, chat: bool = True) -> tuple[str, list[dict], list[int]]:
    """Find the haystack size whose prompt comes closest to ``target_tokens``.

    ``chat``: the prompt is the chat template around the user turn (default), or its raw text
    (:func:`encode_prompt`).

    Grows the size geometrically until the prompt exceeds the target, then bisects.

    Returns
    -------
    tuple
        ``(context, messages, prompt_ids)`` at the chosen size.

    Raises
    ------
    ValueError
        When no size brings the prompt within :data:`LENGTH_TOLERANCE` of the target.
    """
    measured: dict[int, tuple[str, list[dict], list[int]]] = {}

    def measure(size: int) -> int:
        if size not in measured:
            context = draft.render(size)
            messages = [{"role": "user", "content": draft.user_message(context)}]
            measured[size] = (context, messages, encode_prompt(tokenizer, messages, chat=chat))
        return len(measured[size][2])

    cap = draft.max_size if draft.max_size is not None else target_tokens
    lo, hi = 0, min(16, cap)
    while hi < cap and measure(hi) <= target_tokens:
        lo, hi = hi, min(2 * hi, cap)
    if measure(hi) <= target_tokens:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(mid) <= target_tokens:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda size: abs(measure(size) - target_tokens))
    n_tokens = measure(best)
    if abs(n_tokens - target_tokens) > LENGTH_TOLERANCE * target_tokens:
        raise ValueError(f"cannot fit the prompt to {target_tokens} tokens (closest: {n_tokens})")
    return measured[best]


def _spec(task: str) -> TaskSpec:
    """The suite's task or a held-out generalisation task."""
    spec = TASKS.get(task) or HELDOUT_TASKS.get(task)
    if spec is None:
        raise KeyError(f"unknown task {task!r}; choose from {sorted(TASKS) + sorted(HELDOUT_TASKS)}")
    return spec


def make_sample(
    task: str, tokenizer: Any, target_tokens: int, seed: int, split: str = "eval", index: int = 0
) -> Sample:
    """Generate one sample of ``task`` whose prompt is ``target_tokens`` long (within 5%).

    Parameters
    ----------
    task
        A key of :data:`TASKS`.
    tokenizer
        A Hugging Face tokenizer; its chat template is applied when it has one.
    target_tokens
        Prompt length to meet, measured on ``prompt_ids`` (chat template included).
    seed, index
        Suite seed and sample number; with ``split``, ``task`` and ``target_tokens``
        they determine the sample completely.
    split
        "eval" or "train"; the two draw from disjoint pools (see ``text.SplitPools``).
    """
    spec = _spec(task)
    if spec.group == HELDOUT_GROUP and split != "eval":
        raise ValueError(f"the held-out generalisation task {task!r} has only split='eval': it must never be trained on")
    rng = random.Random(sample_seed(split, task, target_tokens, seed, index))
    draft = spec.build(rng, split_pools(split), target_tokens)
    context, messages, prompt_ids = _fit(draft, tokenizer, target_tokens)
    return Sample(
        id=sample_id(split, task, target_tokens, seed, index),
        task=task,
        group=spec.group,
        split=split,
        target_tokens=target_tokens,
        context=context,
        question=draft.question,
        answers=list(draft.answers),
        metric=spec.metric,
        messages=messages,
        prompt_ids=prompt_ids,
        n_tokens=len(prompt_ids),
        max_new_tokens=spec.max_new_tokens,
    )


def make_suite(
    tokenizer: Any,
    tasks: Iterable[str],
    lengths: Iterable[int],
    n_samples: int,
    split: str = "eval",
    seed: int = 0,
    per_group: bool = False,
) -> list[Sample]:
    """``n_samples`` samples for every (task, length), task-major, in the given orders.

    With ``per_group``, ``n_samples`` is per task GROUP and length instead, shared out over
    the group's tasks among ``tasks`` (the first ones get one more when it does not divide),
    and the samples come group-interleaved (the r-th sample of every group, the group's tasks
    in turn, before the (r+1)-th of any) so that a run stopped part-way holds about as many
    samples of every group. Sample ``i`` of a task is the same sample either way (same id),
    so runs of both kinds resume each other.
    """
    tasks, lengths = list(tasks), list(lengths)
    if not per_group:
        return [
            make_sample(task, tokenizer, length, seed, split=split, index=i)
            for task in tasks
            for length in lengths
            for i in range(n_samples)
        ]
    members: dict[str, list[str]] = {}
    for task in tasks:
        members.setdefault(_spec(task).group, []).append(task)
    # the r-th sample of every group comes before the (r+1)-th of any: r = i * (tasks in the group) + k
    order = []
    for g, group_tasks in enumerate(members.values()):
        m = len(group_tasks)
        for k, task in enumerate(group_tasks):
            count = n_samples // m + (k < n_samples % m)
            order += [(i * m + k, g, task, i) for i in range(count)]
    return [
        make_sample(task, tokenizer, length, seed, split=split, index=i)
        for _, _, task, i in sorted(order)
        for length in lengths
    ]


def assert_disjoint(train: Sequence[Sample], eval: Sequence[Sample]) -> None:
    """Raise ``AssertionError`` unless ``train`` and ``eval`` share nothing.

    Checks the split labels, the sample ids, the (context, answers) pairs, and the
    needle values: no answer of a train sample is an answer of an eval sample.
    """
    if any(s.split != "train" for s in train) or any(s.split != "eval" for s in eval):
        raise AssertionError("split labels do not match: train samples must be 'train', eval samples 'eval'")
    shared_ids = {s.id for s in train} & {s.id for s in eval}
    if shared_ids:
        raise AssertionError(f"sample ids shared by train and eval: {sorted(shared_ids)[:5]}")
    shared_pairs = {(s.context, tuple(s.answers)) for s in train} & {(s.context, tuple(s.answers)) for s in eval}
    if shared_pairs:
        raise AssertionError(f"{len(shared_pairs)} (context, answers) pairs shared by train and eval")
    shared_values = {a for s in train for a in s.answers} & {a for s in eval for a in s.answers}
    if shared_values:
        raise AssertionError(f"needle values shared by train and eval: {sorted(shared_values)[:5]}")
