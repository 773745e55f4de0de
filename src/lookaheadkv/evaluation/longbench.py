"""LongBench (v1, the 16 English tasks): prompts, truncation, loading and scoring rules.

Prompts, generation lengths and metrics follow LongBench's ``config/dataset2prompt.json``,
``config/dataset2maxlen.json`` and ``eval.py``; the scorers themselves live in
:mod:`lookaheadkv.evaluation.metrics`. Samples are :class:`~lookaheadkv.tasks.Sample`
objects and are scored with :func:`~lookaheadkv.evaluation.metrics.score_sample`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lookaheadkv.tasks.sample import Sample, encode_prompt

DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\nStory: {context}\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be answered based on the "
        'information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n '
        "Answer the question based on the above article as concisely as you can, using a single phrase or "
        "sentence if possible. If the question cannot be answered based on the information in the article, "
        'write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\n"
        "Now, answer the following question based on the above text, only give me the answer "
        "and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\nThe following are given passages.\n{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\nThe following are given passages.\n{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\nThe following are given passages.\n{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\n"
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\n"
        "News:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output "
        "any other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "{context}\n\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there are "
        "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
        "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
        "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on."
        "\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\n"
        "Please enter the number of the paragraph that the abstract is from. The answer format must "
        'be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: '
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
"""Task -> prompt template with ``{context}`` and ``{input}`` fields (LongBench's exact text)."""

_TASK_TABLE: dict[str, tuple[str, str, int]] = {
    # task: (LongBench category, metric, max generated tokens)
    "narrativeqa": ("single_doc_qa", "qa_f1_score", 128),
    "qasper": ("single_doc_qa", "qa_f1_score", 128),
    "multifieldqa_en": ("single_doc_qa", "qa_f1_score", 64),
    "hotpotqa": ("multi_doc_qa", "qa_f1_score", 32),
    "2wikimqa": ("multi_doc_qa", "qa_f1_score", 32),
    "musique": ("multi_doc_qa", "qa_f1_score", 32),
    "gov_report": ("summarization", "rouge_score", 512),
    "qmsum": ("summarization", "rouge_score", 512),
    "multi_news": ("summarization", "rouge_score", 512),
    "trec": ("few_shot", "classification_score", 64),
    "triviaqa": ("few_shot", "qa_f1_score", 32),
    "samsum": ("few_shot", "rouge_score", 128),
    "passage_count": ("synthetic", "count_score", 32),
    "passage_retrieval_en": ("synthetic", "retrieval_score", 32),
    "lcc": ("code", "code_sim_score", 64),
    "repobench-p": ("code", "code_sim_score", 64),
}

DATASET2GROUP: dict[str, str] = {task: row[0] for task, row in _TASK_TABLE.items()}
"""Task -> LongBench category."""
DATASET2METRIC: dict[str, str] = {task: row[1] for task, row in _TASK_TABLE.items()}
"""Task -> metric name (a key of ``metrics.LONGBENCH_SCORERS``)."""
DATASET2MAXLEN: dict[str, int] = {task: row[2] for task, row in _TASK_TABLE.items()}
"""Task -> maximum number of generated tokens."""

LONGBENCH_TASKS: tuple[str, ...] = tuple(DATASET2PROMPT)
RAW_PROMPT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})
"""Tasks whose prompt LongBench feeds without the chat template."""
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum"})
"""Tasks scored on the first line of the prediction only."""


def _check_task(task: str) -> None:
    if task not in DATASET2PROMPT:
        raise KeyError(f"unknown LongBench task {task!r}; choose from {LONGBENCH_TASKS}")


def format_prompt(task: str, record: dict[str, Any]) -> str:
    """Fill the task's template with the record's ``context`` and ``input``."""
    _check_task(task)
    return DATASET2PROMPT[task].format(context=record["context"], input=record["input"])


def truncate_middle(tokenizer: Any, prompt: str, max_length: int) -> str:
    """LongBench's truncation: over ``max_length`` tokens, keep the first and last half.

    The prompt is tokenised without special tokens; if it is longer than
    ``max_length``, the first ``max_length // 2`` and the last ``max_length // 2`` tokens
    are decoded (skipping special tokens) and concatenated. Shorter prompts are returned
    unchanged.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - half :], skip_special_tokens=True)
    return head + tail


def build_sample(
    task: str,
    record: dict[str, Any],
    index: int = 0,
    tokenizer: Any = None,
    max_length: int | None = None,
    split: str = "test",
) -> Sample:
    """Turn one LongBench record into a :class:`Sample`.

    Parameters
    ----------
    task
        One of :data:`LONGBENCH_TASKS`.
    record
        A LongBench row: ``input``, ``context``, ``answers``, ``length``, ``dataset``,
        ``language``, ``all_classes``, ``_id``.
    index
        Row number, used in the id when the record has no ``_id``.
    tokenizer
        When given, ``prompt_ids`` are computed (chat template unless the task is in
        :data:`RAW_PROMPT_TASKS`); otherwise they are None.
    max_length
        Truncation limit in tokens for the formatted prompt (before the chat
        template), see :func:`truncate_middle`. Needs ``tokenizer``.
    split
        Recorded on the sample.
    """
    prompt = format_prompt(task, record)
    if max_length is not None:
        if tokenizer is None:
            raise ValueError("max_length needs a tokenizer")
        prompt = truncate_middle(tokenizer, prompt, max_length)
    chat = task not in RAW_PROMPT_TASKS
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = encode_prompt(tokenizer, messages, chat=chat) if tokenizer is not None else None
    return Sample(
        id=f"longbench/{task}/{record.get('_id') or index}",
        task=task,
        group=DATASET2GROUP[task],
        split=split,
        target_tokens=max_length or 0,
        context=record["context"],
        question=record["input"],
        answers=[str(a) for a in record["answers"]],
        metric=DATASET2METRIC[task],
        messages=messages,
        prompt_ids=prompt_ids,
        n_tokens=len(prompt_ids) if prompt_ids is not None else 0,
        max_new_tokens=DATASET2MAXLEN[task],
        meta={
            "all_classes": record.get("all_classes"),
            "first_line_only": task in FIRST_LINE_TASKS,
            "chat": chat,
            "length": record.get("length"),
            "_id": record.get("_id"),
        },
    )


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hub_records(task: str, split: str) -> list[dict[str, Any]]:
    """Rows of ``THUDM/LongBench`` / ``task`` from the Hugging Face hub."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "loading LongBench from the hub needs `datasets` (pip install datasets); "
            "or pass data_dir= with {task}.jsonl files"
        ) from exc
    try:
        rows = datasets.load_dataset("THUDM/LongBench", task, split=split)
    except Exception as exc:
        raise RuntimeError(
            f"could not load THUDM/LongBench {task!r} from the hub ({type(exc).__name__}: {exc}); "
            "pass data_dir= with {task}.jsonl files"
        ) from exc
    return [dict(row) for row in rows]


def load_longbench(
    task: str,
    *,
    data_dir: str | Path | None = None,
    split: str = "test",
    tokenizer: Any = None,
    max_length: int | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """Load one LongBench task as samples.

    Parameters
    ----------
    task
        One of :data:`LONGBENCH_TASKS`.
    data_dir
        Folder with LongBench's released ``{task}.jsonl`` files. When None, the task is
        fetched with ``datasets.load_dataset("THUDM/LongBench", task, split=split)``.
    split
        Hub split (LongBench has only "test"); recorded on the samples.
    tokenizer, max_length
        See :func:`build_sample`.
    limit
        Keep only the first ``limit`` records.
    """
    _check_task(task)
    if data_dir is not None:
        records = read_jsonl(Path(data_dir) / f"{task}.jsonl")
    else:
        records = _hub_records(task, split)
    records = records[:limit] if limit is not None else records
    return [build_sample(task, r, i, tokenizer, max_length, split) for i, r in enumerate(records)]
