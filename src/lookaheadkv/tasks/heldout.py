"""The held-out generalisation set: needles over text and templates that no training prompt uses.

The suite's own tasks (:mod:`.generators`) share their templates with the training source
``synthetic`` (its train split), so a scorer can learn those templates. These tasks check
what a new user would try instead:

- the haystack is the *held-out* package prose (:func:`lookaheadkv.corpus.heldout_prose`),
  which no training source reads;
- the needle sentences and questions below appear in no training source (tested against
  every offline training source);
- the values are multi-token (reference codes, four-to-six-word mottos, hyphenated passwords), and a prediction scores only if it holds the *whole* value: a scorer that keeps
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
MOTTO_WORDS = (
    "patience", "harvest", "lantern", "quiet", "courage", "river", "stone", "morning", "honest",
    "labour", "steady", "bright", "humble", "winter", "garden", "thread", "anchor", "kindness",
    "measure", "return", "silver", "open", "gate", "ember", "careful", "north", "song", "bread",
)  # fmt: skip
CODE_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"
ROOMS = ("east storeroom", "print archive", "tool cage", "seed vault", "map room", "wine cellar", "radio hut", "boat shed", "coal bunker", "records office")
PASSWORD_WORDS = ("copper", "heron", "lantern", "juniper", "saltmarsh", "quarry", "foxglove", "tannery", "ferrier", "rookwood", "millbrook", "alder", "pebble", "thistle")

# The fixed wording of every template below: no training prompt may contain any of these.
TEMPLATE_PHRASES = (
    "Maintenance log: the replacement part for the",
    "was ordered under reference",
    "Under which reference was the replacement part for the",
    "Archive entry: the motto engraved above the",
    "What motto is engraved above the",
    "Security notice: the password for the",
    "What is the password for the",
    "Question to answer afterwards:",
    "The following pages come from software manuals",
)


def _code(rng: random.Random) -> str:
    letters = "".join(rng.choice(CODE_LETTERS) for _ in range(3))
    return f"{letters}-{rng.randint(1000, 9999)}-{rng.choice(CODE_LETTERS)}{rng.randint(10, 99)}"


def _motto(rng: random.Random) -> str:
    return " ".join(rng.sample(MOTTO_WORDS, rng.randint(4, 6))).capitalize()


_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")  # [text](url) -> text; images vanish with their alt text
_MARKUP = re.compile(r"<[^>]+>|\*\*|__|`")
_URL = re.compile(r"https?://\S+")


def plain_paragraphs(text: str) -> list[str]:
    """The running-prose paragraphs of a README: code blocks, headings, tables, lists, quotes and
    badges dropped, inline markup and links reduced to their words. A 135M model reads prose the
    way it reads the suite's essays; README markup (code, badges, tables) distracts it so much
    that it no longer answers at all, even with the whole cache, which would leave nothing to
    measure an eviction by."""
    out, fenced = [], False
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if any(line.startswith("```") for line in lines):
            fenced ^= sum(line.startswith("```") for line in lines) % 2 == 1
            continue
        if fenced or not lines or lines[0][:1] in "#>|-*+=<[!:." or lines[0][:2].rstrip(".").isdigit():
            continue
        para = _URL.sub("", _MARKUP.sub("", _LINK.sub(r"\1", " ".join(lines))))
        para = re.sub(r"\s+", " ", para).strip()
        words = para.split()
        if len(para) < 120 or not para.endswith((".", ":")) or sum(w.isalpha() for w in words) < 0.6 * len(words):
            continue
        out.append(para)
    return out


def _manual_words(rng: random.Random) -> list[str]:
    """The held-out package prose (its running-prose paragraphs, :func:`plain_paragraphs`) in a
    random order, as whitespace-separated words with their separators."""
    from lookaheadkv.corpus import heldout_prose

    paragraphs = [p for _, text in heldout_prose() for p in plain_paragraphs(text)]
    if not paragraphs:
        raise ValueError("no held-out package prose is installed: build the venv with 'make venv'")
    rng.shuffle(paragraphs)
    return re.split(r"(\s+)", "\n\n".join(paragraphs))


def _renderer(rng: random.Random, inserts: list[tuple[float, str]]):
    words = _manual_words(rng)

    def render(size: int) -> str:
        text = "".join(words[: 2 * size]) if 2 * size <= len(words) else "".join(words) + " " + "".join(words[: 2 * size - len(words)])
        return insert_at_depths(text, inserts)

    return render, len(words) // 2


_PREAMBLE = "The following pages come from software manuals. One or more notes are hidden among them; read carefully."


def _preamble(question: str) -> str:
    """The preamble names the question before the pages too (RULER's query-first variant): a
    135M model answers the question it was told to look for, and a scorer still has to find
    the one note that answers it among the pages."""
    return f"{_PREAMBLE} Question to answer afterwards: {question}"


def _reference(rng: random.Random, target: int, n_needles: int) -> Draft:
    machines = rng.sample(MACHINES, n_needles)
    codes = [_code(rng) for _ in machines]
    inserts = [(rng.random(), f"Maintenance log: the replacement part for the {m} was ordered under reference {c}.") for m, c in zip(machines, codes)]
    asked = rng.randrange(n_needles)
    render, size = _renderer(rng, inserts)
    question = f"Under which reference was the replacement part for the {machines[asked]} ordered? Reply with the reference only."
    return Draft(_preamble(question), question, [codes[asked]], render, size)


def heldout_reference(rng, pools, target):
    return _reference(rng, target, 1)


def heldout_multi_reference(rng, pools, target):
    return _reference(rng, target, 2)


def heldout_motto(rng, pools, target):
    place = rng.choice(PLACES)
    motto = _motto(rng)
    inserts = [(rng.random(), f'Archive entry: the motto engraved above the {place} door reads "{motto}".')]
    render, size = _renderer(rng, inserts)
    question = f"What motto is engraved above the {place} door? Quote it exactly."
    return Draft(_preamble(question), question, [motto], render, size)


def heldout_password(rng, pools, target):
    room = rng.choice(ROOMS)
    password = "-".join(rng.sample(PASSWORD_WORDS, 3)) + f"-{rng.randint(10, 99)}"
    inserts = [(rng.random(), f"Security notice: the password for the {room} is {password}.")]
    render, size = _renderer(rng, inserts)
    question = f"What is the password for the {room}? Reply with the password only."
    return Draft(_preamble(question), question, [password], render, size)


HELDOUT_TASKS: dict[str, TaskSpec] = {
    "heldout_reference": TaskSpec("heldout_reference", GROUP, "all", 32, heldout_reference),
    "heldout_multi_reference": TaskSpec("heldout_multi_reference", GROUP, "all", 32, heldout_multi_reference),
    "heldout_motto": TaskSpec("heldout_motto", GROUP, "all", 48, heldout_motto),
    "heldout_password": TaskSpec("heldout_password", GROUP, "all", 32, heldout_password),
}
"""Held-out generalisation tasks (report group ``heldout``); eval split only."""
