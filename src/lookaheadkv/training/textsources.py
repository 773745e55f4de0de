"""Offline training sources over the text that ships on every machine (:mod:`lookaheadkv.corpus`).

- ``code``: questions about, completion of and search in the standard library's source
  (the paper's "The Stack" share).
- ``docs``: tasks over the installed packages' README text (the *training* packages only).
- ``retrieval``: needles hidden in essays, code or package prose, drawn from many needle,
  value and question templates of this file (none of the evaluation suite's, none of the
  held-out generalisation set's), one to five needles, one to three asked.
- ``needles``: one asked needle (among up to two distractors) in essays, code or package
  prose, from templates of its own, the question after the text, before it or on both sides;
  each prompt knows its answer, so the build records whether the model found it.
- ``chat``: two- and three-turn conversations over a document, code or essay passage: the
  earlier assistant turns are written from the text itself, the final user turn asks a new
  question that needs the context again.

Every source is a function ``f(tokenizer, n, lengths, seed) -> list[Prompt]`` whose prompt
``i`` depends only on ``(seed, i)``, registered in :data:`TEXT_SOURCES`. None reads the
reserved documentation text (``pydoc_data``) or the held-out package prose.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from .. import corpus
from .sources import Prompt, _fit, _pick, _rng, _train_pieces, _user, draw_length

# ---------------------------------------------------------------------------------------
# Token windows over long texts


@functools.lru_cache(maxsize=512)
def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _window(tokenizer, docs: list[tuple[str, str]], first: int, offset: float, budget: int, header: str) -> str:
    """About ``budget`` tokens of text: doc ``first`` from a relative ``offset``, then the next docs.

    Each doc opens with ``header.format(name=...)``; the window stops at a line end when the
    budget falls inside a line (a closer fit is left to :func:`sources._fit`'s rounds).
    """
    if budget <= 0:
        return ""
    parts, used, k = [], 0, first
    while used < budget and k < first + len(docs):
        name, text = docs[k % len(docs)]
        ids = _ids(tokenizer, text)
        start = int(offset * max(0, len(ids) - budget)) if k == first else 0
        head = header.format(name=name)
        take = min(len(ids) - start, budget - used - len(_ids(tokenizer, head)))
        if take <= 0:
            break
        chunk = tokenizer.decode(list(ids[start : start + take]))
        if start > 0 and "\n" in chunk:
            chunk = chunk[chunk.index("\n") + 1 :]  # begin on a whole line
        parts.append(head + chunk)
        used += take + len(_ids(tokenizer, head))
        k += 1
    return "\n\n".join(parts)


@functools.lru_cache(maxsize=1)
def _code_names() -> tuple[str, ...]:
    root = corpus.stdlib_root()
    return tuple(p.relative_to(root).as_posix() for p in corpus.stdlib_sources())


class _LazyCode:
    """The stdlib files as (name, text), read when indexed (a list would read 10 MB up front)."""

    def __len__(self) -> int:
        return len(_code_names())

    def __getitem__(self, k: int) -> tuple[str, str]:
        name = _code_names()[k]
        return name, corpus.read_source(corpus.stdlib_root() / name)


@functools.lru_cache(maxsize=1)
def _essay_docs() -> tuple[tuple[str, str], ...]:
    text = "".join(_train_pieces())
    return tuple((f"essay {i}", p.strip()) for i, p in enumerate(text.split("\n\n")) if p.strip())


MATERIALS = ("essays", "code", "docs")


def _material(name: str):
    """The training texts of one kind, indexable as (name, text): essays, stdlib code or package prose."""
    if name == "code":
        return _LazyCode()
    return _essay_docs() if name == "essays" else corpus.training_prose()


# ---------------------------------------------------------------------------------------
# code

_DEF = re.compile(r"^\s*(?:async\s+)?def\s+([A-Za-z_]\w*)\s*\(", re.M)
_CLASS = re.compile(r"^\s*class\s+([A-Za-z_]\w*)", re.M)

_CODE_TASKS = {
    "explain": (
        "Explain what the function `{name}` does, step by step, and when a caller would use it.",
        "What does `{name}` return, and what are its side effects? Refer to the code.",
        "Describe the inputs, the output and the edge cases of `{name}` in the code above.",
    ),
    "locate": (
        "Find where `{name}` is defined in the code above. Quote its definition line and list its parameters.",
        "Which lines of the code call or define `{name}`? Quote them.",
    ),
    "summarise": (
        "Summarise what this code provides: list its main classes and functions with one line each.",
        "Write documentation for the code above: a short overview, then each public function.",
        "What is this module for? Answer in a paragraph, then name the three most important functions.",
    ),
    "review": (
        "Review the function `{name}`: what could go wrong, and which unit tests would you write for it?",
        "Suggest how to simplify `{name}` without changing its behaviour, and show the new code.",
    ),
    "complete": (
        "The code below stops in the middle. Continue it from exactly where it stops.",
        "Complete the following Python source file; write only the lines that come next.",
    ),
}
_CODE_LAYOUTS = (
    "{instruction}\n\n```python\n{code}\n```",
    "```python\n{code}\n```\n\n{instruction}",
    "Here is some Python code.\n\n{code}\n\nQuestion: {instruction}",
)


def code_prompts(tokenizer, n: int, lengths: tuple[int, int], seed: int = 0) -> list[Prompt]:
    """Questions about, completion of and search in the standard library's source (ids ``code:<task>:<seed>:<i>``)."""
    return [_code_prompt(tokenizer, _rng(seed, "code", i), lengths, f"{seed}:{i}") for i in range(n)]


def _code_prompt(tokenizer, rng: np.random.Generator, lengths, key: str) -> Prompt:
    docs = _LazyCode()
    target, task = draw_length(rng, lengths), _pick(rng, sorted(_CODE_TASKS))
    first, offset, where = int(rng.integers(len(docs))), float(rng.random()), float(rng.random())
    template = _pick(rng, _CODE_TASKS[task])
    layout = _CODE_LAYOUTS[0] if task == "complete" else _pick(rng, _CODE_LAYOUTS)

    def build(budget: int) -> list[dict]:
        code = _window(tokenizer, docs, first, offset, budget, "# file: Lib/{name}\n")
        names = _DEF.findall(code[: int(len(code) * 0.8)]) or _CLASS.findall(code) or ["main"]
        return _user(layout.format(instruction=template.format(name=names[int(where * len(names))]), code=code))

    return Prompt(f"code:{task}:{key}", "code", _fit(build, tokenizer, target))


# ---------------------------------------------------------------------------------------
# docs

_DOC_TASKS = (
    "Summarise this documentation for a new user in five bullet points.",
    "According to the documentation above, how do you install the package and what is a first thing to try with it?",
    "List every feature of the package that the text mentions.",
    "Extract every command, function or option name that appears in the text, one per line.",
    "Write a short tutorial based only on this documentation.",
    "What problems does this package solve, and what are its limitations according to the text?",
    "Answer from the text: {quote_question}",
    "Explain the following sentence of the documentation in simpler words: \"{quote}\"",
)


def _sentence(text: str, where: float) -> str:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 40 <= len(s.strip()) <= 240]
    return sentences[int(where * len(sentences))] if sentences else text[:120]


def docs_prompts(tokenizer, n: int, lengths: tuple[int, int], seed: int = 0) -> list[Prompt]:
    """Tasks over the training packages' README text (ids ``docs:<seed>:<i>``)."""
    return [_docs_prompt(tokenizer, _rng(seed, "docs", i), lengths, f"{seed}:{i}") for i in range(n)]


def _docs_prompt(tokenizer, rng: np.random.Generator, lengths, key: str) -> Prompt:
    docs = corpus.training_prose()
    target = draw_length(rng, lengths)
    first, offset, where = int(rng.integers(len(docs))), float(rng.random()) * 0.3, float(rng.random())
    template = _pick(rng, _DOC_TASKS)
    quote = _sentence(docs[first][1][: len(docs[first][1]) // 2], where)
    instruction = template.format(quote=quote, quote_question=f"what does the documentation say right after \"{quote[:80]}\"?")
    layout = _pick(rng, ("{instruction}\n\n{text}", "{text}\n\n{instruction}", "Documentation:\n{text}\n\nTask: {instruction}"))

    def build(budget: int) -> list[dict]:
        return _user(layout.format(instruction=instruction, text=_window(tokenizer, docs, first, offset, budget, "## {name}\n")))

    return Prompt(f"docs:{key}", "docs", _fit(build, tokenizer, target))


# ---------------------------------------------------------------------------------------
# retrieval

_RETRIEVAL_WORDS = (
    "amber", "basalt", "cedar", "delta", "falcon", "glacier", "harbor", "indigo", "juniper", "kestrel",
    "lagoon", "meadow", "nebula", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber",
    "velvet", "willow", "yonder", "zephyr", "copper", "maple", "onyx", "prairie", "summit", "timber",
)  # fmt: skip
_KEYS = (
    "the blue project", "account 7741", "the north warehouse", "Dr. Alvarez", "the spring release",
    "room 12", "the Lisbon office", "batch C", "the night shift", "the backup server", "order 3390",
    "the chess club", "Professor Okafor", "the east gate", "the summer fair", "locker 48",
)  # fmt: skip


def _value(rng: np.random.Generator, kind: str) -> str:
    if kind == "number":
        return str(int(rng.integers(10_000, 10_000_000)))
    if kind == "phrase":
        return " ".join(str(w) for w in rng.choice(_RETRIEVAL_WORDS, size=int(rng.integers(2, 6)), replace=False))
    if kind == "code":
        letters = "".join(chr(65 + int(x)) for x in rng.integers(0, 26, size=4))
        return f"{letters}{int(rng.integers(100, 1000))}-{int(rng.integers(10, 100))}"
    if kind == "date":
        months = ("January", "March", "April", "June", "August", "October", "November", "December")
        return f"{_pick(rng, months)} {int(rng.integers(1, 29))}, {int(rng.integers(1950, 2040))}"
    return "".join(f"{int(x):x}" for x in rng.integers(0, 16, size=8)) + "-" + "".join(f"{int(x):x}" for x in rng.integers(0, 16, size=4))


_VALUE_KINDS = ("number", "phrase", "code", "date", "hex")
_NEEDLES = (
    ("The secret password for {key} is {value}.", "What is the secret password for {key}?"),
    ("Note to self: {key} -> {value}.", "What did the note say {key} maps to?"),
    ("Important: the value associated with {key} is {value}.", "Which value is associated with {key}?"),
    ("According to the records, {key} was assigned {value}.", "What was {key} assigned according to the records?"),
    ("[memo] {key}: {value}", "What does the memo list for {key}?"),
    ("Remember that the code word for {key} is \"{value}\".", "What is the code word for {key}?"),
    ("The inventory tag of {key} reads {value}.", "What does the inventory tag of {key} read?"),
    ("By the way, {key} has the identifier {value}.", "Give the identifier of {key}."),
    ("SETTING {key} = {value}", "What is SETTING {key} set to?"),
    ("The deadline recorded for {key} is {value}.", "What deadline is recorded for {key}?"),
    ("Fact: the lucky token of {key} is {value}.", "What is the lucky token of {key}?"),
    ("{key} should always be filed under {value}.", "Under what should {key} be filed?"),
)
_ASK_STYLES = (
    "{questions}",
    "{questions} Answer with the value only.",
    "Using the text above, answer: {questions}",
    "{questions} Copy the exact value from the text.",
    "Find the answer in the document. {questions} Reply briefly.",
    "{questions} If several values are asked, list them in order, one per line.",
)
_INTROS = (
    "Read the following text; a few facts are hidden in it.",
    "Below is a long document. Some statements in it matter for the question at the end.",
    "",
    "Here is a document with some inserted notes. Pay attention to them.",
)


def _haystack_draw(rng: np.random.Generator, lengths):
    """A prompt's target length, filler kind, its texts, the first text and the offset into it."""
    target = draw_length(rng, lengths)
    filler = _pick(rng, MATERIALS)
    docs = _material(filler)
    return target, filler, docs, int(rng.integers(len(docs))), float(rng.random())


def _haystack(tokenizer, docs, first: int, offset: float, budget: int, placed: list[tuple[float, str]]) -> str:
    """About ``budget`` tokens of ``docs`` with each ``(depth, sentence)`` of ``placed`` inserted at
    its relative depth, between lines (code, markup) or sentences (prose)."""
    text = _window(tokenizer, docs, first, offset, budget - 24 * len(placed), "")
    sep, units = ("\n", text.split("\n")) if text.count("\n") > 40 else (" ", re.split(r"(?<=[.!?])\s+", text))
    for depth, sentence in sorted(placed, key=lambda item: item[0], reverse=True):
        units.insert(int(depth * len(units)), sentence)
    return sep.join(units)


def retrieval_prompts(tokenizer, n: int, lengths: tuple[int, int], seed: int = 0) -> list[Prompt]:
    """Needles over essays, code or package prose, from many templates (ids ``retrieval:<filler>:<seed>:<i>``)."""
    return [_retrieval_prompt(tokenizer, _rng(seed, "retrieval", i), lengths, f"{seed}:{i}") for i in range(n)]


def _retrieval_prompt(tokenizer, rng: np.random.Generator, lengths, key: str) -> Prompt:
    target, filler, docs, first, offset = _haystack_draw(rng, lengths)
    n_needles = int(rng.integers(1, 6))
    n_asked = int(rng.integers(1, min(3, n_needles) + 1))
    keys = [str(k) for k in rng.choice(_KEYS, size=n_needles, replace=False)]
    needle, question = _pick(rng, _NEEDLES)
    kind = _pick(rng, _VALUE_KINDS)
    values = [_value(rng, kind) for _ in keys]
    needles = [needle.format(key=k, value=v) for k, v in zip(keys, values)]
    depths = sorted(float(d) for d in rng.random(n_needles))
    questions = " ".join(question.format(key=k) for k in keys[:n_asked])
    ask = _pick(rng, _ASK_STYLES).format(questions=questions)
    intro = _pick(rng, _INTROS)

    def build(budget: int) -> list[dict]:
        body = _haystack(tokenizer, docs, first, offset, budget, list(zip(depths, needles)))
        return _user(f"{intro}\n\n{body}\n\n{ask}".strip())

    return Prompt(f"retrieval:{filler}:{key}", "retrieval", _fit(build, tokenizer, target), tuple(values[:n_asked]))


# ---------------------------------------------------------------------------------------
# needles: one asked needle, many wordings, the question after, before or on both sides of the text

_SUBJECTS = (
    "the green locker", "the harbour crane", "the west annex", "Mrs. Ferreira", "the third-floor printer",
    "the orchard shed", "the museum van", "the county archive", "cabinet 19", "the blue canoe",
    "the rehearsal hall", "the pumping station", "the night ferry", "the attic trunk", "Inspector Dahl",
    "the greenhouse", "the choir", "the relay tower", "Captain Osei", "the bakery oven", "vault 6",
    "the tram depot", "the student union", "the hangar", "the glass studio", "the river barge",
)  # fmt: skip
_WORDS = (
    "falcon", "meadow", "cobalt", "ripple", "saddle", "tangerine", "violet", "walnut", "crimson", "drift",
    "ember", "fjord", "granite", "hollow", "ivory", "jasper", "kettle", "lumen", "mosaic", "nectar",
    "orbit", "parchment", "quiver", "russet", "sparrow", "trellis", "uplift", "vessel", "whistle", "yarrow",
    "zenith", "bramble", "cinder", "dune", "estuary", "fable", "gorse", "hearth", "inkwell", "lark",
)  # fmt: skip
_NEEDLE_KINDS = ("number", "words", "hyphenated", "code", "date", "hex", "price")
NEEDLE_TEMPLATES = (
    ("Inspection report: the serial number stamped on {key} is {value}.", "What serial number is stamped on {key}?"),
    ("The combination for {key} was changed to {value}.", "What was the combination for {key} changed to?"),
    ("Reminder: {key} must quote the booking code {value}.", "Which booking code must {key} quote?"),
    ("In the ledger, the entry for {key} shows {value}.", "What does the ledger entry for {key} show?"),
    ("The label on {key} says {value}.", "What does the label on {key} say?"),
    ("Dispatch note: {key} ships with tracking number {value}.", "Which tracking number does {key} ship with?"),
    ("Keep this safe: the access phrase for {key} is {value}.", "What is the access phrase for {key}?"),
    ("{key} uses the call sign {value} on the radio.", "What call sign does {key} use on the radio?"),
    ("The registration of {key} is listed as {value}.", "How is the registration of {key} listed?"),
    ("Per the minutes, {key} was renamed to {value}.", "According to the minutes, what was {key} renamed to?"),
    ("Catalogue card: {key}, shelf mark {value}.", "What is the shelf mark of {key}?"),
    ("The wireless key for {key} is {value}.", "What is the wireless key for {key}?"),
    ("Status line: {key} reported {value}.", "What did {key} report in its status line?"),
    ("Do not forget: the pass code of {key} is {value}.", "What is the pass code of {key}?"),
    ("(Side note: {key} goes by the nickname \"{value}\".)", "What nickname does {key} go by?"),
    ("The receipt for {key} lists the amount {value}.", "Which amount does the receipt for {key} list?"),
)
_LEADS = (
    "Question: {question} The answer is somewhere in the text below.",
    "Read the text below and find out: {question}",
    "I will ask you this afterwards: {question}",
    "Look for the answer to this while you read: {question}",
)
_ENDS_AFTER_LEAD = (
    "Now answer the question from the beginning.",
    "What is the answer? Give only the value.",
    "Answer the question asked before the text.",
)
_ASKS = (
    "{question}",
    "{question} Give the exact value.",
    "Based on the text, {question_lower}",
    "Answer from the text: {question}",
    "{question} Reply with just the value, nothing else.",
    "Quick question about the text above. {question}",
)
_OPENERS = ("", "Here is some text.", "The passage below contains one or more notes.", "Please read this document.")


def _needle_value(rng: np.random.Generator, kind: str) -> str:
    if kind == "number":
        return str(int(rng.integers(1_000, 100_000_000)))
    if kind == "words":
        return " ".join(str(w) for w in rng.choice(_WORDS, size=int(rng.integers(2, 7)), replace=False)).capitalize()
    if kind == "hyphenated":
        words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(2, 5)), replace=False)]
        return "-".join(words + ([str(int(rng.integers(10, 1000)))] if rng.random() < 0.6 else []))
    if kind == "code":
        shape = _pick(rng, ("LLD-DDDD-L", "LL-DD-LL-DD", "LDLD-DDD", "LLLL/DDDD", "DDD-LLL-DDD"))
        return "".join(chr(65 + int(rng.integers(26))) if c == "L" else str(int(rng.integers(10))) if c == "D" else c for c in shape)
    if kind == "date":
        months = ("February", "May", "July", "September", "January", "October")
        return f"{int(rng.integers(1, 29))} {_pick(rng, months)} {int(rng.integers(1900, 2100))}"
    if kind == "price":
        return f"${int(rng.integers(1, 99))},{int(rng.integers(0, 1000)):03d}.{int(rng.integers(0, 100)):02d}"
    return "0x" + "".join(f"{int(x):x}" for x in rng.integers(0, 16, size=int(rng.integers(6, 11))))


def needle_prompts(tokenizer, n: int, lengths: tuple[int, int], seed: int = 0) -> list[Prompt]:
    """One asked needle among up to two distractors, in essays, code or package prose, with the
    question after the text, before it, or on both sides (ids ``needles:<filler>:<seed>:<i>``).

    Each prompt's :attr:`Prompt.expect` is the asked value, so a build can check the model's
    answer, and training can keep only the answers that found the needle (``--answered-only``).
    """
    return [_needle_prompt(tokenizer, _rng(seed, "needles", i), lengths, f"{seed}:{i}") for i in range(n)]


def _needle_prompt(tokenizer, rng: np.random.Generator, lengths, key: str) -> Prompt:
    target, filler, docs, first, offset = _haystack_draw(rng, lengths)
    n_needles = int(rng.choice([1, 1, 1, 2, 2, 3]))
    keys = [str(k) for k in rng.choice(_SUBJECTS, size=n_needles, replace=False)]
    needle, question = _pick(rng, NEEDLE_TEMPLATES)
    kind = _pick(rng, _NEEDLE_KINDS)
    values = [_needle_value(rng, kind) for _ in keys]
    needles = [needle.format(key=k, value=v) for k, v in zip(keys, values)]
    needles = [s[0].upper() + s[1:] for s in needles]
    depths = [float(d) for d in rng.random(n_needles)]
    asked = int(rng.integers(n_needles))
    q = question.format(key=keys[asked])
    place = _pick(rng, ("after", "after", "before", "both"))
    lead, end, ask, opener = _pick(rng, _LEADS), _pick(rng, _ENDS_AFTER_LEAD), _pick(rng, _ASKS), _pick(rng, _OPENERS)

    def build(budget: int) -> list[dict]:
        body = _haystack(tokenizer, docs, first, offset, budget, list(zip(depths, needles)))
        after = ask.format(question=q, question_lower=q[0].lower() + q[1:])
        if place == "after":
            content = f"{opener}\n\n{body}\n\n{after}"
        elif place == "before":
            content = f"{lead.format(question=q)}\n\n{body}\n\n{end}"
        else:
            content = f"{lead.format(question=q)}\n\n{body}\n\n{after}"
        return _user(content.strip())

    return Prompt(f"needles:{filler}:{key}", "needles", _fit(build, tokenizer, target), (values[asked],))


# ---------------------------------------------------------------------------------------
# chat

_FIRST_ASKS = (
    "Can you tell me briefly what this is about?",
    "Give me a one-sentence summary of this.",
    "What is the first thing this text talks about?",
)
_FOLLOW_UPS = (
    "Thanks. Now, what does the text say near the end?",
    "Which part of the text did you find most surprising, and why? Quote it.",
    "Good. Can you list three specific details from the middle of the text?",
    "Now explain the sentence \"{quote}\" in context.",
    "Based on the same text, what question would you ask the author? Justify it with a quote.",
    "One more thing: write a title for each section of the text.",
)


def chat_prompts(tokenizer, n: int, lengths: tuple[int, int], seed: int = 0) -> list[Prompt]:
    """Multi-turn chats over a document, code or essay passage (ids ``chat:<material>:<seed>:<i>``)."""
    return [_chat_prompt(tokenizer, _rng(seed, "chat", i), lengths, f"{seed}:{i}") for i in range(n)]


def _chat_prompt(tokenizer, rng: np.random.Generator, lengths, key: str) -> Prompt:
    target = draw_length(rng, lengths)
    material = _pick(rng, MATERIALS)
    docs = _material(material)
    first, offset, where = int(rng.integers(len(docs))), float(rng.random()), float(rng.random())
    first_ask, follow_up = _pick(rng, _FIRST_ASKS), _pick(rng, _FOLLOW_UPS)
    turns = int(rng.integers(2, 4))

    def build(budget: int) -> list[dict]:
        text = _window(tokenizer, docs, first, offset, budget, "")
        opening = _sentence(text, 0.0) if text else "It is a text."
        quote = _sentence(text, where) if text else ""
        messages = [
            {"role": "user", "content": f"{text}\n\n{first_ask}"},
            {"role": "assistant", "content": f"It begins like this: \"{opening[:200]}\""},
        ]
        if turns == 3:
            messages += [
                {"role": "user", "content": "Is it long?"},
                {"role": "assistant", "content": "Fairly long; it continues on the same subject."},
            ]
        messages.append({"role": "user", "content": follow_up.format(quote=quote[:160])})
        return messages

    return Prompt(f"chat:{material}:{key}", "chat", _fit(build, tokenizer, target))


TEXT_SOURCES = {
    "code": code_prompts,
    "docs": docs_prompts,
    "retrieval": retrieval_prompts,
    "chat": chat_prompts,
    "needles": needle_prompts,
}
"""Text source name -> ``f(tokenizer, n, lengths, seed) -> list[Prompt]``."""
