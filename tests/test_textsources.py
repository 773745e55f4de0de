"""The text sources (code, docs, retrieval, chat), the corpora they read, and the held-out generalisation set.

What must hold: prompts fit their target length and are deterministic per (seed, index); no
training prompt of any offline source contains the reserved documentation text (pydoc_data),
the held-out package prose or the held-out set's template wording; the held-out tasks exist
only in the eval split and score a needle only when the whole value is there.
"""

import random
import re
import sysconfig
from pathlib import Path

import pytest

from lookaheadkv import corpus
from lookaheadkv.evaluation.metrics import score_sample
from lookaheadkv.tasks import HELDOUT_TASKS, TASKS, make_sample
from lookaheadkv.tasks.heldout import TEMPLATE_PHRASES
from lookaheadkv.training.sources import mixture, render
from lookaheadkv.training.textsources import TEXT_SOURCES

ALL_SOURCES = ("essays", "synthetic", "fewshot", "code", "docs", "retrieval", "chat", "needles")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def training_text(tokenizer):
    """The text of 12 prompts of every offline source, two seeds, 512-2048 tokens."""
    prompts = [p for seed in (0, 1) for p in mixture(tokenizer, {s: 12 for s in ALL_SOURCES}, (512, 2048), seed)]
    return [(p.id, "\n".join(m["content"] for m in p.messages)) for p in prompts]


def _long_lines(text: str, n: int, rng: random.Random, min_chars: int = 60) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) >= min_chars]
    return rng.sample(lines, min(n, len(lines)))


# --------------------------------------------------------------------------- corpora


def test_stdlib_sources_skip_the_reserved_docs():
    paths = corpus.stdlib_sources()
    assert len(paths) > 200
    assert not any("pydoc_data" in p.parts for p in paths)
    reserved = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    with pytest.raises(ValueError, match="reserved"):
        corpus.read_source(reserved)


def test_package_prose_is_split_by_name_and_both_halves_are_used():
    train, held = corpus.training_prose(), corpus.heldout_prose()
    assert train and held
    assert not {n for n, _ in train} & {n for n, _ in held}
    assert all(corpus.is_heldout_package(n) for n, _ in held)
    assert "lookaheadkv" not in {n for n, _ in train + held}  # our own README is no corpus


# --------------------------------------------------------------------------- the text sources


@pytest.mark.parametrize("name", sorted(TEXT_SOURCES))
def test_text_source_prompts_fit_their_length_and_are_deterministic(tokenizer, name):
    make = TEXT_SOURCES[name]
    prompts = make(tokenizer, 6, (1024, 2048), 3)
    assert [p.id for p in prompts] == [p.id for p in make(tokenizer, 6, (1024, 2048), 3)]
    assert make(tokenizer, 3, (1024, 2048), 3) == prompts[:3]  # prompt i depends on (seed, i) only
    assert len({p.id for p in prompts}) == 6 and all(p.source == name for p in prompts)
    for p in prompts:
        assert p.messages[-1]["role"] == "user"
        n = len(render(p, tokenizer))
        assert 1024 * 0.85 <= n <= 2048 * 1.1, (p.id, n)


def test_retrieval_needles_are_in_the_prompt_and_asked(tokenizer):
    from lookaheadkv.training.textsources import _KEYS

    for p in TEXT_SOURCES["retrieval"](tokenizer, 8, (1024, 2048), 0):
        body, question = p.messages[-1]["content"].rsplit("\n\n", 1)
        asked = [k for k in _KEYS if k in question]
        assert 1 <= len(asked) <= 3, question
        for key in asked:
            assert key in body, (p.id, key)  # each asked key has its needle in the text


def test_retrieval_expects_the_asked_values(tokenizer):
    for p in TEXT_SOURCES["retrieval"](tokenizer, 8, (1024, 2048), 0):
        body, question = p.messages[-1]["content"].rsplit("\n\n", 1)
        assert 1 <= len(p.expect) <= 3 and p.match == "all"
        for value in p.expect:
            line = next(s for s in re.split(r"(?<=[.!?])\s+|\n", body) if value in s)
            asked_key = next(k for k in _retrieval_keys() if k in line)
            assert asked_key in question, (p.id, value, question)  # the value belongs to an asked key


def _retrieval_keys():
    from lookaheadkv.training.textsources import _KEYS

    return _KEYS


def test_needle_prompts_hold_the_asked_value_once_and_ask_for_it(tokenizer):
    from lookaheadkv.training.textsources import _SUBJECTS, NEEDLE_TEMPLATES

    def cap(text):
        return text[0].upper() + text[1:]

    prompts = TEXT_SOURCES["needles"](tokenizer, 40, (1024, 1536), 0)
    places = set()
    for p in prompts:
        text = p.messages[-1]["content"]
        (value,) = p.expect
        assert text.count(value) == 1, (p.id, value)
        # exactly one needle sentence holds the value; the prompt asks that needle's question
        holders = [(q, s) for n, q in NEEDLE_TEMPLATES for s in _SUBJECTS if cap(n.format(key=s, value=value)) in text]
        assert len(holders) == 1, (p.id, holders)
        question = holders[0][0].format(key=holders[0][1])
        assert question in text or (question[0].lower() + question[1:]) in text, (p.id, question)
        first, last = text.find(question), text.rfind(question)
        places.add("both" if first != last else "before" if first < len(text) // 2 else "after")
    assert places >= {"after", "before"}
    assert len({p.expect for p in prompts}) == len(prompts)


def test_chat_prompts_have_earlier_turns_and_end_with_the_user(tokenizer):
    for p in TEXT_SOURCES["chat"](tokenizer, 6, (1024, 2048), 0):
        roles = [m["role"] for m in p.messages]
        assert roles[-1] == "user" and "assistant" in roles and len(roles) in (3, 5)


# --------------------------------------------------------------------------- what training never sees


def test_no_training_prompt_holds_reserved_or_heldout_text(training_text):
    rng = random.Random(0)
    topics = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    probes = {"pydoc_data": _long_lines(topics.read_text(encoding="utf-8"), 40, rng)}
    shared = "\n".join(t for _, t in corpus.training_prose())  # boilerplate that several packages' READMEs share
    for name, text in corpus.heldout_prose():
        probes[f"heldout prose {name}"] = [line for line in _long_lines(text, 10, rng) if line not in shared]
    probes["heldout template"] = list(TEMPLATE_PHRASES)
    assert sum(len(v) for v in probes.values()) > 100
    for pid, text in training_text:
        for what, lines in probes.items():
            for line in lines:
                assert line not in text, f"{pid} contains {what}: {line[:60]!r}"


def test_training_prompts_do_read_their_corpora(training_text):
    """The probe above would pass vacuously if the sources read nothing: they do read code and prose."""
    rng = random.Random(1)
    train_lines = [l for _, t in corpus.training_prose() for l in _long_lines(t, 200, rng, 40)]
    joined = "\n".join(t for _, t in training_text)
    assert "# file: Lib/" in joined and "def " in joined
    assert any(line in joined for line in train_lines)


def test_heldout_tasks_are_not_suite_tasks_and_refuse_the_train_split(tokenizer):
    assert not set(HELDOUT_TASKS) & set(TASKS)
    with pytest.raises(ValueError, match="never be trained on"):
        make_sample("heldout_reference", tokenizer, 1024, seed=0, split="train")


# --------------------------------------------------------------------------- the held-out set


@pytest.mark.parametrize("task", sorted(HELDOUT_TASKS))
def test_heldout_samples_fit_hold_the_needle_and_use_heldout_prose(tokenizer, task):
    sample = make_sample(task, tokenizer, 2048, seed=0, index=1)
    assert abs(sample.n_tokens - 2048) <= 0.05 * 2048
    text = sample.messages[-1]["content"]
    for answer in sample.answers:
        assert answer in text
    held = [line for _, t in corpus.heldout_prose() for line in _long_lines(t, 1000, random.Random(0), 30)]
    assert any(line in text for line in held)


def test_heldout_scoring_needs_the_whole_value(tokenizer):
    sample = make_sample("heldout_motto", tokenizer, 1024, seed=0, index=0)
    motto = sample.answers[0]
    words = motto.split()
    assert score_sample(sample, f'The motto reads "{motto}".')["score"] == 1.0
    assert score_sample(sample, f'The motto reads "{" ".join(words[:2])}".')["score"] == 0.0


def test_heldout_haystack_is_running_prose_only():
    from lookaheadkv.tasks.heldout import plain_paragraphs

    readme = "\n\n".join([
        "# Title",
        '<p align="center"><img src="x.svg"></p>',
        "```python\nimport thing\nthing.run()  # a long enough line of code that is not prose at all.\n```",
        "| a | b |\n|---|---|",
        "- a list item that goes on for a while but is still only a list item in the end.",
        "The **library** reads [the manual](https://example.org/manual) and `parses` every page it is given, "
        "then it writes a summary of what it found to the console for the user to read.",
        "Short line.",
    ])
    assert plain_paragraphs(readme) == [
        "The library reads the manual and parses every page it is given, "
        "then it writes a summary of what it found to the console for the user to read."
    ]


def test_synthetic_prompts_expect_answers_found_in_their_text(tokenizer):
    from lookaheadkv.training.sources import synthetic_prompts

    prompts = synthetic_prompts(tokenizer, 12, (1024, 1536), 0)
    assert all(p.expect and p.match in ("all", "part") for p in prompts)
    for p in prompts:
        text = "\n".join(m["content"] for m in p.messages).lower()
        assert all(value.lower() in text for value in p.expect), (p.id, p.expect)  # RULER's tasks are extractive
