"""The synthetic tasks: RULER-style templates rendered at any haystack size.

A task's ``build`` function draws everything random about a sample (needles, depths,
haystack order) up front and returns a :class:`Draft` whose ``render(size)`` lays the
haystack out at a given size (words, filler paragraphs or list items), so that the
suite can search for the size that meets a token target without redrawing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from lookaheadkv.tasks.text import (
    SplitPools,
    draw_coded_words,
    draw_keys,
    draw_number,
    draw_uuid,
    draw_variable_names,
    draw_words,
    essay_stream,
    insert_at_depths,
    noise_haystack,
    take_words,
)


@dataclass
class Draft:
    """A drawn sample, waiting for its haystack size.

    Attributes
    ----------
    preamble, question
        Text before and after the context in the user message.
    answers
        Reference answers (the needle values).
    render
        ``size -> context``; deterministic, non-decreasing in length.
    max_size
        Largest size ``render`` accepts (None: unbounded).
    """

    preamble: str
    question: str
    answers: list[str]
    render: Callable[[int], str]
    max_size: int | None = None

    def user_message(self, context: str) -> str:
        """The user turn: preamble, context, then the question (RULER's order)."""
        return f"{self.preamble}\n{context}\n{self.question}"


Builder = Callable[[random.Random, SplitPools, int], Draft]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its name, report group, RULER metric, generation budget and builder."""

    name: str
    group: str
    metric: str
    max_new_tokens: int
    build: Builder


def _haystack_renderer(
    rng: random.Random, pools: SplitPools, kind: str, inserts: list[tuple[float, str]]
) -> Callable[[int], str]:
    """``size -> haystack with inserts``: ``size`` essay words ("essay") or filler paragraphs ("noise")."""
    if kind == "noise":
        return lambda size: insert_at_depths(noise_haystack(pools, size), inserts)
    words = essay_stream(rng, pools)
    return lambda size: insert_at_depths(take_words(words, size), inserts)


def _join_keys(keys: list[str]) -> str:
    """"a", "a and b", "a, b, and c"."""
    if len(keys) <= 2:
        return " and ".join(keys)
    return ", ".join(keys[:-1]) + ", and " + keys[-1]


def _draw_values(rng: random.Random, pools: SplitPools, kind: str, k: int, exclude: set[str]) -> list[str]:
    """``k`` distinct needle values of ``kind`` ("number", "word", "uuid"), none in ``exclude``."""
    draw = {"number": draw_number, "uuid": draw_uuid, "word": lambda r, p: draw_words(r, p, 1)[0]}[kind]
    values: list[str] = []
    while len(values) < k:
        value = draw(rng, pools)
        if value not in exclude and value not in values:
            values.append(value)
    return values


def niah(value_kind: str, haystack: str, n_keys: int = 1, n_values: int = 1, n_queries: int = 1) -> Builder:
    """Builder of a RULER needle-in-a-haystack variant.

    ``n_keys`` keys each get ``n_values`` needles "One of the special magic {kind}s for
    {key} is: {value}." at random depths; the question asks for the values of the first
    ``n_queries`` keys (the others are distractors). RULER's question always reads "What
    are all the special magic {kind}s ..."; ours is singular when one value is asked
    for and ends "Answer with the ... only.", which stands in for RULER's answer prefix:
    without it SmolLM2-135M-Instruct echoes the question and the filler.
    """
    noun = f"{value_kind}s"

    def build(rng: random.Random, pools: SplitPools, target_tokens: int) -> Draft:
        keys = draw_keys(rng, pools, n_keys)
        exclude = {part for key in keys for part in key.split("-")}
        values = _draw_values(rng, pools, value_kind, n_keys * n_values, exclude)
        needles = [
            f"One of the special magic {noun} for {key} is: {values[i * n_values + j]}."
            for i, key in enumerate(keys)
            for j in range(n_values)
        ]
        inserts = [(rng.random(), needle) for needle in needles]
        asked = _join_keys(keys[:n_queries])
        if n_queries * n_values == 1:
            question = f"What is the special magic {value_kind} for {asked} mentioned in the provided text?"
            question += f" Answer with the {value_kind} only."
        else:
            question = f"What are all the special magic {noun} for {asked} mentioned in the provided text?"
            question += f" Answer with the {noun} only."
        return Draft(
            preamble=(
                f"Some special magic {noun} are hidden within the following text. "
                f"Make sure to memorize it. I will quiz you about the {noun} afterwards."
            ),
            question=question,
            answers=values[: n_queries * n_values],
            render=_haystack_renderer(rng, pools, haystack, inserts),
        )

    return build


def variable_tracking(rng: random.Random, pools: SplitPools, target_tokens: int, n_hops: int = 4) -> Draft:
    """RULER variable tracking: one chain "VAR A = v. VAR B = VAR A. ..." in noise; name every variable equal to v."""
    names = draw_variable_names(rng, pools, n_hops + 1)
    rng.shuffle(names)
    value = str(rng.randint(*pools.short_number_range))
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in statements)
    return Draft(
        preamble="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        question=f"Question: Find all variables that are assigned the value {value} in the text above.",
        answers=names,
        render=_haystack_renderer(rng, pools, "noise", list(zip(depths, statements))),
    )


def common_words(rng: random.Random, pools: SplitPools, target_tokens: int, n_common: int = 10) -> Draft:
    """RULER common-words extraction over a numbered word list; ``size`` = number of rare words.

    The ``n_common`` answer words appear ``clip(target_tokens // 200, 6, 30)`` times
    each (RULER: 30 at long lengths), every rare word 3 times.
    """
    common = draw_words(rng, pools, n_common)
    rare = [w for w in pools.vocab if w not in common]
    rng.shuffle(rare)
    freq_common = min(30, max(6, target_tokens // 200))
    order_seed = rng.getrandbits(64)

    def render(size: int) -> str:
        items = common * freq_common + rare[:size] * 3
        random.Random(order_seed).shuffle(items)
        return " ".join(f"{i}. {word}" for i, word in enumerate(items, start=1))

    return Draft(
        preamble=(
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often."
        ),
        question=f"Question: What are the {n_common} most common words in the above list?",
        answers=common,
        render=render,
        max_size=len(rare),
    )


_DOTS = "...."


def frequent_words(rng: random.Random, pools: SplitPools, target_tokens: int, vocab_size: int = 500) -> Draft:
    """RULER frequent-words extraction: Zipf(2) coded text; ``size`` = number of words.

    Rank k (k = 1..vocab_size) appears ``floor(size * k**-2 / zeta(2))`` times; rank 1
    is the dots "....", which the question says to ignore, so the answers are ranks 2-4.
    """
    words = draw_coded_words(rng, pools, vocab_size - 1)
    rng.shuffle(words)
    ranked = [_DOTS] + words
    order_seed = rng.getrandbits(64)
    zeta2 = math.pi**2 / 6

    def render(size: int) -> str:
        items = [w for k, w in enumerate(ranked, start=1) for _ in range(int(size / k**2 / zeta2))]
        random.Random(order_seed).shuffle(items)
        return " ".join(items)

    return Draft(
        preamble=(
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words."
        ),
        question=(
            f"Question: Do not provide any explanation. Please ignore the dots '{_DOTS}'. "
            "What are the three most frequently appeared words in the above coded text?"
        ),
        answers=ranked[1:4],
        render=render,
    )


def passage_qa(rng: random.Random, pools: SplitPools, target_tokens: int, n_people: int = 4) -> Draft:
    """Short notes about fictional people hidden in essays; ask one person's city or profession.

    Each note reads "Note about {name}: {name} lives in {city} and works as a
    {profession}."; the distractor people have other cities and professions, so the
    answer requires reading the right note.
    """
    firsts = rng.sample(pools.first_names, n_people)
    lasts = rng.sample(pools.last_names, n_people)
    cities = rng.sample(pools.cities, n_people)
    jobs = rng.sample(pools.professions, n_people)
    names = [f"{f} {l}" for f, l in zip(firsts, lasts)]
    notes = [
        f"Note about {name}: {name} lives in {city} and works as {'an' if job[0] in 'aeiou' else 'a'} {job}."
        for name, city, job in zip(names, cities, jobs)
    ]
    inserts = [(rng.random(), note) for note in notes]
    if rng.random() < 0.5:
        question, answer = f"In which city does {names[0]} live?", cities[0]
    else:
        question, answer = f"What is the profession of {names[0]}?", jobs[0]
    return Draft(
        preamble=(
            "The following text contains a few short notes about people. "
            "Read it and answer the question about one of them."
        ),
        question=f"Question: {question} Only give me the answer and do not output any other words.",
        answers=[answer],
        render=_haystack_renderer(rng, pools, "essay", inserts),
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("niah_single_number", "niah", "all", 32, niah("number", "noise")),
        TaskSpec("niah_single_word", "niah", "all", 32, niah("word", "essay")),
        TaskSpec("niah_single_uuid", "niah", "all", 64, niah("uuid", "essay")),  # a uuid is 36 SmolLM2 tokens
        TaskSpec("niah_multikey", "multi_niah", "all", 32, niah("number", "essay", n_keys=4)),
        TaskSpec("niah_multivalue", "multi_niah", "all", 64, niah("number", "essay", n_values=4)),
        TaskSpec("niah_multiquery", "multi_niah", "all", 64, niah("number", "essay", n_keys=4, n_queries=4)),
        TaskSpec("variable_tracking", "tracking", "all", 48, variable_tracking),
        TaskSpec("common_words", "aggregation", "all", 64, common_words),
        TaskSpec("frequent_words", "aggregation", "all", 48, frequent_words),
        TaskSpec("passage_qa", "qa", "part", 32, passage_qa),
    )
}
"""Task name (as used on the CLI) -> :class:`TaskSpec`."""

TASK_GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(name for name, spec in TASKS.items() if spec.group == group)
    for group in dict.fromkeys(spec.group for spec in TASKS.values())
}
"""Report group -> its task names, in registry order."""
