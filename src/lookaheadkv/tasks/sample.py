"""The evaluation sample shared by the synthetic suite and LongBench (scored by :func:`lookaheadkv.evaluation.metrics.score_sample`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any



@dataclass
class Sample:
    """One prompt with its reference answers.

    Attributes
    ----------
    id
        Unique id; encodes split, task, length, seed and index for generated samples.
    task, group, split
        Task name, report group (e.g. "niah") and split ("eval", "train"; LongBench: "test").
    target_tokens
        Requested prompt length in tokens (LongBench: the truncation limit, 0 if none).
    context, question
        The long context and the question; the user message is context then question.
    answers
        Reference answers.
    metric
        "all" / "part" (RULER's string_match_all / string_match_part) or a LongBench
        metric name (a key of ``lookaheadkv.evaluation.metrics.LONGBENCH_SCORERS``).
    messages
        Chat messages; ``messages[-1]`` is the user turn.
    prompt_ids
        The token ids fed to the model (None when built without a tokenizer).
    n_tokens
        ``len(prompt_ids)`` (0 when there are none).
    max_new_tokens
        Generation budget.
    meta
        Extra per-sample fields (LongBench: ``all_classes``, ``first_line_only``,
        ``chat``, ``length``, ``_id``).
    """

    id: str
    task: str
    group: str
    split: str
    target_tokens: int
    context: str
    question: str
    answers: list[str]
    metric: str
    messages: list[dict]
    prompt_ids: list[int] | None
    n_tokens: int
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER ``string_match_all``: share of answers found (case-insensitive substring) in the prediction."""
    pred = prediction.lower()
    return sum(ans.lower() in pred for ans in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER ``string_match_part``: 1 if any answer is found (case-insensitive substring), else 0."""
    pred = prediction.lower()
    return float(any(ans.lower() in pred for ans in answers))


def ruler_match(prediction: str, answers: Sequence[str], metric: str = "all") -> float:
    """RULER's string match of ``prediction`` against ``answers``: :func:`string_match_all` for
    ``metric="all"``, :func:`string_match_part` for ``"part"``. The evaluation scores answers with
    it, and the training data build checks the model's own answers with it."""
    if not answers:
        raise ValueError("a string match needs at least one answer")
    return (string_match_part if metric == "part" else string_match_all)(prediction, answers)


def _as_id_list(encoded: Any) -> list[int]:
    """Normalise what a tokenizer returns (dict / BatchEncoding, tensor, nested list) to ``list[int]``."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        if len(encoded) != 1:
            raise ValueError("expected a single sequence of token ids")
        encoded = encoded[0]
    return [int(t) for t in encoded]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, messages: Sequence[dict], chat: bool = True) -> list[int]:
    """Token ids of a prompt.

    With ``chat`` and a tokenizer that has a chat template, the template is applied
    with the generation prompt; otherwise the message contents (joined by blank lines)
    are tokenised as raw text, with the tokenizer's default special tokens.
    """
    if chat and has_chat_template(tokenizer):
        encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    else:
        encoded = tokenizer("\n\n".join(m["content"] for m in messages))
    return _as_id_list(encoded)
