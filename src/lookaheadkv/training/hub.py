"""The paper's training prompts from the Hugging Face hub (``docs/method.md``, "Training").

:data:`HUB_SOURCES` maps a name to its dataset and record converter (ChatQA2, Tulu-3, The Stack,
MetaMath, HellaSwag, ARC); :func:`load_source` draws prompts of one, :func:`hub_mixture` blends them
(:data:`PAPER_MIXTURE` by default). Every loader also reads a local JSONL file written in the
dataset's own record schema, so nothing needs the network in tests. The offline sources, and the
:class:`~lookaheadkv.training.sources.Prompt` record these produce too, are :mod:`.sources`.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import _LETTERS, Prompt, Shot, _fewshot_text, _has_user, _pick, _rng, _shuffled, _user, render, strip_final_assistant


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
