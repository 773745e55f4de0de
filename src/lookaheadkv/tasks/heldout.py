"""The held-out generalisation set: needles over text and templates that no training prompt uses.

The suite's own tasks (:mod:`.generators`) share their templates with the training source
``synthetic`` (its train split), so a scorer can learn those templates. These tasks check
what a new user would try instead:

- the haystack is the *held-out* package prose (:func:`lookaheadkv.corpus.heldout_prose`),
  which no training source reads;
- the needle sentences and questions below appear in no training source (tested against
  every offline training source);
- the values are multi-token (reference codes, four-to-six-word mottos, platform and time
  pairs), and a prediction scores only if it holds the *whole* value: a scorer that keeps
  the first tokens of a needle and loses the rest fails here, as the issue that built this
  set observed.

Only ``split="eval"`` exists; the tasks are registered in :data:`HELDOUT_TASKS`, outside the
suite's ``TASKS`` (so ``--tasks all`` and the training source ``synthetic`` never see them),
under the report group ``heldout``.
"""

from __future__ import annotations

import random
import re

from lookaheadkv.tasks.generators import Draft, TaskSpec
from lookaheadkv.tasks.text import insert_at_depths

GROUP = "heldout"

MACHINES = (
    "bottling line", "kiln", "lathe", "loom", "printing press", "conveyor", "boiler", "winch",
    "grain dryer", "paint booth", "lift pump", "cooling tower",
)  # fmt: skip
PLACES = ("library", "chapel", "observatory", "guild hall", "lighthouse", "old mill", "courthouse", "granary", "boathouse", "museum")
TRAVELLERS = ("Odile", "Tomasz", "Priya", "Keanu", "Marguerite", "Olusegun", "Svea", "Haruto", "Beatriz", "Lorcan")
MOTTO_WORDS = (
    "patience", "harvest", "lantern", "quiet", "courage", "river", "stone", "morning", "honest",
    "labour", "steady", "bright", "humble", "winter", "garden", "thread", "anchor", "kindness",
    "measure", "return", "silver", "open", "gate", "ember", "careful", "north", "song", "bread",
)  # fmt: skip
CODE_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"

# The fixed wording of every template below: no training prompt may contain any of these.
TEMPLATE_PHRASES = (
    "Maintenance log: the replacement part for the",
    "was ordered under reference",
    "Under which reference was the replacement part for the",
    "Archive entry: the motto engraved above the",
    "What motto is engraved above the",
    "connecting train leaves from platform",
    "From which platform and at what time does",
    "The following pages come from software manuals",
)


def _code(rng: random.Random) -> str:
    letters = "".join(rng.choice(CODE_LETTERS) for _ in range(3))
    return f"{letters}-{rng.randint(1000, 9999)}-{rng.choice(CODE_LETTERS)}{rng.randint(10, 99)}"


def _motto(rng: random.Random) -> str:
    return " ".join(rng.sample(MOTTO_WORDS, rng.randint(4, 6))).capitalize()


def _time(rng: random.Random) -> str:
    return f"{rng.randint(5, 22):02d}:{rng.choice((5, 10, 20, 25, 35, 40, 50, 55)):02d}"


def _manual_words(rng: random.Random) -> list[str]:
    """The held-out package prose in a random order, as whitespace-separated words with their separators."""
    from lookaheadkv.corpus import heldout_prose

    texts = [text for _, text in heldout_prose()]
    if not texts:
        raise ValueError("no held-out package prose is installed: build the venv with 'make venv'")
    rng.shuffle(texts)
    return re.split(r"(\s+)", "\n\n".join(texts))


def _renderer(rng: random.Random, inserts: list[tuple[float, str]]):
    words = _manual_words(rng)

    def render(size: int) -> str:
        text = "".join(words[: 2 * size]) if 2 * size <= len(words) else "".join(words) + " " + "".join(words[: 2 * size - len(words)])
        return insert_at_depths(text, inserts)

    return render, len(words) // 2


_PREAMBLE = "The following pages come from software manuals. One or more notes are hidden among them; read carefully."


def _reference(rng: random.Random, target: int, n_needles: int) -> Draft:
    machines = rng.sample(MACHINES, n_needles)
    codes = [_code(rng) for _ in machines]
    inserts = [(rng.random(), f"Maintenance log: the replacement part for the {m} was ordered under reference {c}.") for m, c in zip(machines, codes)]
    asked = rng.randrange(n_needles)
    render, size = _renderer(rng, inserts)
    question = f"Under which reference was the replacement part for the {machines[asked]} ordered? Reply with the reference only."
    return Draft(_PREAMBLE, question, [codes[asked]], render, size)


def heldout_reference(rng, pools, target):
    return _reference(rng, target, 1)


def heldout_multi_reference(rng, pools, target):
    return _reference(rng, target, 3)


def heldout_motto(rng, pools, target):
    places = rng.sample(PLACES, 2)
    mottos = [_motto(rng) for _ in places]
    inserts = [(rng.random(), f'Archive entry: the motto engraved above the {p} door reads "{m}".') for p, m in zip(places, mottos)]
    render, size = _renderer(rng, inserts)
    question = f"What motto is engraved above the {places[0]} door? Quote it exactly."
    return Draft(_PREAMBLE, question, [mottos[0]], render, size)


def heldout_train(rng, pools, target):
    person = rng.choice(TRAVELLERS)
    platform, time = f"{rng.randint(2, 19)}{rng.choice('ABC')}", _time(rng)
    inserts = [(rng.random(), f"{person}'s connecting train leaves from platform {platform} at {time}.")]
    render, size = _renderer(rng, inserts)
    question = f"From which platform and at what time does {person}'s connecting train leave? Answer briefly."
    return Draft(_PREAMBLE, question, [platform, time], render, size)


HELDOUT_TASKS: dict[str, TaskSpec] = {
    "heldout_reference": TaskSpec("heldout_reference", GROUP, "all", 32, heldout_reference),
    "heldout_multi_reference": TaskSpec("heldout_multi_reference", GROUP, "all", 32, heldout_multi_reference),
    "heldout_motto": TaskSpec("heldout_motto", GROUP, "all", 48, heldout_motto),
    "heldout_train": TaskSpec("heldout_train", GROUP, "all", 48, heldout_train),
}
"""Held-out generalisation tasks (report group ``heldout``); eval split only."""
