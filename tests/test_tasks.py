"""The offline RULER-style suite: lengths, determinism, content, splits and scoring."""

import dataclasses
import re
from collections import Counter

import pytest
from transformers import PreTrainedTokenizerFast

from lookaheadkv.evaluation.metrics import score_sample
from lookaheadkv.tasks import (
    TASK_GROUPS,
    TASKS,
    assert_disjoint,
    encode_prompt,
    make_sample,
    make_suite,
    sample_seed,
)
from lookaheadkv.models import load_essays

LENGTHS = (1024, 2048, 4096)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    """The bundled SmolLM2-135M-Instruct tokenizer (``smollm2`` is conftest's ``(model, tokenizer)``)."""
    return smollm2[1]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 400-token byte-level BPE trained on three essays; no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text for _, text in load_essays()[:3]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def eval_suite(smollm2_tokenizer):
    return make_suite(smollm2_tokenizer, TASKS, LENGTHS, n_samples=1, split="eval", seed=0)


def test_registry():
    assert set(TASKS) == {
        "niah_single_number", "niah_single_word", "niah_single_uuid", "niah_multikey",
        "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words",
        "frequent_words", "passage_qa",
    }  # fmt: skip
    assert sorted(t for tasks in TASK_GROUPS.values() for t in tasks) == sorted(TASKS)
    assert set(TASK_GROUPS) == {"niah", "multi_niah", "tracking", "aggregation", "qa"}
    assert all(spec.metric in ("all", "part") for spec in TASKS.values())
    assert all(8 <= spec.max_new_tokens <= 64 for spec in TASKS.values())


def test_suite_order_and_fields(eval_suite):
    assert [(s.task, s.target_tokens) for s in eval_suite] == [(t, n) for t in TASKS for n in LENGTHS]
    for s in eval_suite:
        assert s.group == TASKS[s.task].group and s.metric == TASKS[s.task].metric
        assert s.n_tokens == len(s.prompt_ids)
        assert s.max_new_tokens == TASKS[s.task].max_new_tokens


def test_lengths_within_tolerance_smollm2(eval_suite, smollm2_tokenizer):
    for s in eval_suite:
        assert abs(s.n_tokens - s.target_tokens) <= 0.05 * s.target_tokens, (s.id, s.n_tokens)
        # the ids are the chat-templated messages
        assert s.prompt_ids == encode_prompt(smollm2_tokenizer, s.messages)
        assert smollm2_tokenizer.decode(s.prompt_ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("task", list(TASKS))
def test_lengths_within_tolerance_tiny_tokenizer(task, tiny_tokenizer):
    for length in LENGTHS:
        s = make_sample(task, tiny_tokenizer, length, seed=0)
        assert abs(s.n_tokens - length) <= 0.05 * length, (s.id, s.n_tokens)
        # no chat template: the raw user message is tokenised
        assert s.prompt_ids == tiny_tokenizer(s.messages[-1]["content"])["input_ids"]


def test_question_follows_context_and_needles_are_in_it(eval_suite):
    for s in eval_suite:
        content = s.messages[-1]["content"]
        assert s.messages[-1]["role"] == "user"
        assert content.endswith(s.question)
        assert content.index(s.context) + len(s.context) <= content.rindex(s.question)
        for answer in s.answers:
            assert answer in s.context, (s.id, answer)


def test_deterministic_for_a_seed(tiny_tokenizer):
    for task in TASKS:
        first = make_sample(task, tiny_tokenizer, 1024, seed=3, index=1)
        assert first == make_sample(task, tiny_tokenizer, 1024, seed=3, index=1)
        assert first.answers != make_sample(task, tiny_tokenizer, 1024, seed=4, index=1).answers
        assert first.answers != make_sample(task, tiny_tokenizer, 1024, seed=3, index=2).answers


def test_niah_needles(eval_suite):
    by_task = {s.task: s for s in eval_suite if s.target_tokens == 2048}
    number = by_task["niah_single_number"]
    assert re.fullmatch(r"\d{7}", number.answers[0])
    assert "The grass is green." in number.context  # noise haystack
    assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", by_task["niah_single_uuid"].answers[0])
    multikey = by_task["niah_multikey"]
    assert len(multikey.answers) == 1 and multikey.context.count("One of the special magic numbers for") == 4
    assert len(by_task["niah_multivalue"].answers) == 4
    multiquery = by_task["niah_multiquery"]
    keys = re.findall(r"for ([a-z]+-[a-z]+) is: (\d+)", multiquery.context)
    assert sorted(v for _, v in keys) == sorted(multiquery.answers)
    assert all(key in multiquery.question for key, _ in keys)


def test_aggregation_answers_are_the_most_frequent(eval_suite):
    for s in eval_suite:
        if s.task == "common_words":
            counts = Counter(re.findall(r"\d+\. ([a-z]+)", s.context))
            top = {w for w, _ in counts.most_common(10)}
            assert top == set(s.answers)
            assert counts.most_common(11)[-1][1] < min(counts[w] for w in top)  # a strict gap
        if s.task == "frequent_words":
            counts = Counter(s.context.split())
            ranked = [w for w, _ in counts.most_common(4)]
            assert ranked[0] == "...." and ranked[1:] == s.answers


def test_variable_tracking_chain(eval_suite):
    for s in (s for s in eval_suite if s.task == "variable_tracking"):
        value = re.search(r"value (\d+)", s.question).group(1)
        assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (?:VAR )?([A-Z]{5}|\d+)\.", s.context))
        resolved = set()
        for name in assignments:
            target = name
            while target in assignments:
                target = assignments[target]
            if target == value:
                resolved.add(name)
        assert resolved == set(s.answers) and len(s.answers) == 5


def test_passage_qa_answer_is_in_the_asked_note(eval_suite):
    for s in (s for s in eval_suite if s.task == "passage_qa"):
        name = re.search(r"(?:of|does) ([A-Z][a-z]+ [A-Z][a-z]+)", s.question).group(1)
        note = re.search(rf"Note about {name}: [^.]*\.", s.context).group(0)
        assert s.answers[0] in note and s.context.count("Note about ") == 4


def test_train_and_eval_are_disjoint(smollm2_tokenizer):
    eval_samples = make_suite(smollm2_tokenizer, TASKS, [1024], n_samples=2, split="eval", seed=0)
    train = make_suite(smollm2_tokenizer, TASKS, [1024], n_samples=2, split="train", seed=0)
    assert_disjoint(train, eval_samples)
    eval_pairs = {(s.context, tuple(s.answers)) for s in eval_samples}
    assert not any((s.context, tuple(s.answers)) in eval_pairs for s in train)
    eval_values = {a for s in eval_samples for a in s.answers}
    assert not eval_values & {a for s in train for a in s.answers}
    # the value spaces themselves are split
    for s in eval_samples + train:
        if s.task in ("niah_single_number", "niah_multivalue"):
            assert all((int(a) < 5_500_000) == (s.split == "eval") for a in s.answers)
        if s.task == "niah_single_uuid":
            assert (s.answers[0][0] in "01234567") == (s.split == "eval")
        if s.task == "variable_tracking":
            assert all((a[0] <= "M") == (s.split == "eval") for a in s.answers)
    # different essays and filler
    assert "The grass is green." in eval_samples[0].context
    assert "The grass is green." not in train[0].context


def test_assert_disjoint_catches_leaks(smollm2_tokenizer):
    eval_sample = make_sample("niah_single_number", smollm2_tokenizer, 1024, seed=0)
    leaked = dataclasses.replace(eval_sample, split="train", id="train/leak")
    with pytest.raises(AssertionError):
        assert_disjoint([leaked], [eval_sample])
    with pytest.raises(AssertionError):
        assert_disjoint([eval_sample], [eval_sample])


def test_seed_spaces_are_disjoint():
    for index in range(50):
        train_seed = sample_seed("train", "niah_single_number", 1024, 0, index)
        eval_seed = sample_seed("eval", "niah_single_number", 1024, 0, index)
        assert train_seed >> 63 == 1 and eval_seed >> 63 == 0
    with pytest.raises(ValueError):
        sample_seed("test", "niah_single_number", 1024, 0, 0)


def test_score_sample(eval_suite):
    multivalue = next(s for s in eval_suite if s.task == "niah_multivalue")
    assert score_sample(multivalue, " ".join(multivalue.answers)) == {"score": 1.0, "graded": 1.0}
    first, second = multivalue.answers[:2]
    scored = score_sample(multivalue, f"They are {first} and {second[:4]}.")
    assert scored["score"] == pytest.approx(0.25)
    assert scored["graded"] == pytest.approx((1 + 4 / 7) / 4)
    qa = next(s for s in eval_suite if s.task == "passage_qa")
    assert score_sample(qa, f"The answer is {qa.answers[0].upper()}.")["score"] == 1.0


def test_errors(tiny_tokenizer):
    with pytest.raises(KeyError):
        make_sample("no_such_task", tiny_tokenizer, 1024, seed=0)
    with pytest.raises(ValueError):
        make_sample("niah_single_number", tiny_tokenizer, 20, seed=0)  # the template alone is longer


def test_per_group_suite_shares_samples_over_a_groups_tasks(smollm2_tokenizer):
    tasks = ["niah_single_number", "niah_single_word", "niah_single_uuid", "variable_tracking"]
    suite = make_suite(smollm2_tokenizer, tasks, [256], 5, split="eval", seed=0, per_group=True)
    per_task = {t: [s for s in suite if s.task == t] for t in tasks}
    assert [len(per_task[t]) for t in tasks] == [2, 2, 1, 5]
    assert sum(s.group == "niah" for s in suite) == 5 and sum(s.group == "tracking" for s in suite) == 5
    # group-interleaved: any even-length prefix holds as many niah as tracking samples, niah's tasks in turn
    assert [s.task for s in suite[:6]] == [tasks[0], tasks[3], tasks[1], tasks[3], tasks[2], tasks[3]]
    assert all(sum(s.group == "niah" for s in suite[:n]) == n // 2 for n in range(0, 11, 2))
    # the same sample as the task-major suite's sample i (same id, same prompt): runs resume each other
    plain = make_suite(smollm2_tokenizer, ["niah_single_word"], [256], 2, split="eval", seed=0)
    assert [(s.id, s.prompt_ids) for s in per_task["niah_single_word"]] == [(s.id, s.prompt_ids) for s in plain]
