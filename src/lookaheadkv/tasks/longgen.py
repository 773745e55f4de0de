"""Prompts whose answers are long (256-1024 tokens): the evaluation of eviction during decoding.

Four tasks, built offline from the eval half of the bundled essays and the eval split's needle
pools (never from pydoc_data or the held-out prose), fitted to a token length like the suite:

- ``long_summary``: an essay excerpt, then "write a detailed summary, part by part".
- ``long_extraction``: essay text with many "special magic number" lines; list every one, in order
  (checkable: the share of the numbers the answer holds).
- ``long_arithmetic``: few-shot step-by-step running sums, then a long new sum (checkable: the share
  of the correct running totals the answer holds).
- ``long_continuation``: an essay excerpt; continue it for several paragraphs.

Every answer is also compared with the full cache's answer (fidelity); the two checkable tasks
carry ``metric="all"`` (RULER's string_match_all over ``answers``), the others ``metric="fidelity"``.
"""

from __future__ import annotations

import random
from typing import Any

from lookaheadkv.tasks.generators import Draft
from lookaheadkv.tasks.sample import Sample
from lookaheadkv.tasks.suite import _fit, sample_id, sample_seed
from lookaheadkv.tasks.text import SplitPools, draw_keys, draw_number, essay_stream, insert_at_depths, split_pools, take_words

RAW_TASKS = frozenset({"long_arithmetic"})
"""Few-shot completion prompts, given as raw text (as few-shot prompts are run by lm-eval): in the chat
template SmolLM2-135M answers the step-by-step sums with the total alone (14 tokens), as raw text it
continues the worked examples' steps, which is the long, checkable answer the task is for."""
LONG_TASKS = ("long_summary", "long_extraction", "long_arithmetic", "long_continuation")
CHECKABLE = ("long_extraction", "long_arithmetic")


def _summary(rng: random.Random, pools: SplitPools, target_tokens: int) -> Draft:
    words = essay_stream(rng, pools)
    return Draft(
        preamble="Read the following essay carefully.",
        question=(
            "Write a detailed summary of the essay above, part by part: for each part, state its main point, "
            "the arguments and the examples it gives. Write at least 400 words."
        ),
        answers=[],
        render=lambda size: take_words(words, size),
    )


def _continuation(rng: random.Random, pools: SplitPools, target_tokens: int) -> Draft:
    words = essay_stream(rng, pools)
    return Draft(
        preamble="Here is the beginning of an essay.",
        question="Continue the essay from where it stops, in the same voice and style, for at least six long paragraphs.",
        answers=[],
        render=lambda size: take_words(words, size),
    )


def _extraction(rng: random.Random, pools: SplitPools, target_tokens: int) -> Draft:
    n_items = max(3, min(24, target_tokens // 85))  # 24 at 2K tokens (about 20 answer tokens each)
    keys = draw_keys(rng, pools, n_items)
    values: list[str] = []
    while len(values) < n_items:
        value = draw_number(rng, pools)
        if value not in values:
            values.append(value)
    depths = sorted(rng.random() for _ in range(n_items))
    inserts = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths, keys, values)]
    words = essay_stream(rng, pools)
    return Draft(
        preamble="Some special magic numbers are hidden within the following text. Make sure to memorize them.",
        question=(
            "List every special magic number mentioned in the text above, each with its key, one per line, "
            "in the order they appear. Do not skip any."
        ),
        answers=values,
        render=lambda size: insert_at_depths(take_words(words, size), inserts),
    )


def _steps(numbers: list[int]) -> tuple[str, list[int]]:
    total, lines, totals = numbers[0], [], []
    for n in numbers[1:]:
        lines.append(f"{total} + {n} = {total + n}.")
        total += n
        totals.append(total)
    return " ".join(lines) + f" Answer: {total}.", totals


def _arithmetic(rng: random.Random, pools: SplitPools, target_tokens: int, example_terms: int = 12) -> Draft:
    final_terms = max(8, min(48, target_tokens // 40))  # 48 at 2K tokens (about 12 answer tokens a step)
    def problem(k: int) -> list[int]:
        return [rng.randint(10, 99) for _ in range(k)]

    examples = []
    for _ in range(64):
        numbers = problem(example_terms)
        solution, _ = _steps(numbers)
        examples.append(f"Problem: Add these numbers one at a time: {', '.join(map(str, numbers))}.\nSolution: {solution}")
    final = problem(final_terms)
    _, totals = _steps(final)
    return Draft(
        preamble="Solve the last problem step by step, exactly as in the worked examples.",
        question=f"Problem: Add these numbers one at a time: {', '.join(map(str, final))}.\nSolution:",
        answers=[str(t) for t in totals],
        render=lambda size: "\n\n".join(examples[:size]),
        max_size=len(examples),
    )


_BUILDERS = {
    "long_summary": _summary,
    "long_extraction": _extraction,
    "long_arithmetic": _arithmetic,
    "long_continuation": _continuation,
}


def make_long_sample(task: str, tokenizer: Any, target_tokens: int = 2048, seed: int = 0, index: int = 0, max_new_tokens: int = 1024) -> Sample:
    """One long-answer sample of ``task`` (a name in :data:`LONG_TASKS`) whose prompt is ``target_tokens`` long (within 5%)."""
    if task not in _BUILDERS:
        raise KeyError(f"unknown long-generation task {task!r}; choose from {', '.join(LONG_TASKS)}")
    rng = random.Random(sample_seed("eval", task, target_tokens, seed, index))
    draft = _BUILDERS[task](rng, split_pools("eval"), target_tokens)
    chat = task not in RAW_TASKS
    context, messages, prompt_ids = _fit(draft, tokenizer, target_tokens, chat=chat)
    return Sample(
        id=sample_id("eval", task, target_tokens, seed, index),
        task=task,
        group="long",
        split="eval",
        target_tokens=target_tokens,
        context=context,
        question=draft.question,
        answers=list(draft.answers),
        metric="all" if task in CHECKABLE else "fidelity",
        messages=messages,
        prompt_ids=prompt_ids,
        n_tokens=len(prompt_ids),
        max_new_tokens=max_new_tokens,
        meta={"chat": chat},
    )


def make_long_suite(tokenizer: Any, n_per_task: int, target_tokens: int = 2048, seed: int = 0, tasks=LONG_TASKS, max_new_tokens: int = 1024) -> list[Sample]:
    """``n_per_task`` samples of every task, the tasks interleaved (sample 0 of each, then 1, ...)."""
    return [make_long_sample(t, tokenizer, target_tokens, seed, i, max_new_tokens) for i in range(n_per_task) for t in tasks]  # a partial run covers every task
