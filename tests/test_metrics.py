"""Metrics against hand-worked examples."""

import math

import pytest
import torch

from lookaheadkv.evaluation.metrics import (
    bootstrap_ci,
    classification_score,
    code_sim_score,
    count_score,
    exact_match,
    first_code_line,
    graded_match,
    longbench_score,
    normalize_answer,
    paired_bootstrap_diff,
    prefix_share,
    qa_f1_score,
    retrieval_score,
    rouge_l,
    similarity_ratio,
    string_match_all,
    string_match_part,
    token_f1,
)
from lookaheadkv.scoring import attention_recall


def test_normalize_answer():
    # lower -> drop punctuation -> drop articles -> collapse whitespace
    assert normalize_answer("  The Cat, a  hat!") == "cat hat"


def test_token_f1_hand_worked():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]
    # shared 2; P = 2/2 = 1, R = 2/3; F1 = 2 * 1 * 2/3 / (1 + 2/3) = (4/3) / (5/3) = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: [cat, cat] vs [cat]: shared 1, P = 1/2, R = 1, F1 = 2/3
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "cat") == 0.0


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "eiffel tower") == 0.0


def test_qa_f1_is_squad_f1():
    # "Paris, France" -> [paris, france]; "Paris" -> [paris]: P = 1/2, R = 1, F1 = 2/3
    assert qa_f1_score("Paris, France", "Paris") == pytest.approx(2 / 3)


def test_rouge_l_hand_worked():
    # pred: the cat sat on the mat (6); ref: the cat lay on the mat (6)
    # LCS = "the cat on the mat" = 5; P = R = 5/6; F = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(5 / 6)
    # pred: a b c d (4); ref: a c (2); LCS = 2; P = 1/2, R = 1; F = 2 * 1/2 / (3/2) = 2/3
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    # order matters: "c b a" vs "a b c": LCS = 1; P = R = 1/3
    assert rouge_l("c b a", "a b c") == pytest.approx(1 / 3)
    assert rouge_l("", "a b c") == 0.0


def test_classification_score():
    classes = ["Location", "Person", "Number", "Description", "Description of something"]
    assert classification_score("Location", "Location", classes) == 1.0
    # two classes named, one right: 1/2
    assert classification_score("Location or Person", "Location", classes) == 0.5
    assert classification_score("Number", "Location", classes) == 0.0
    # "Description" is a strict substring of the reference, so it is dropped: 1/1
    assert classification_score("Description of something", "Description of something", classes) == 1.0


def test_retrieval_score():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    # numbers found: 3 and 12; one is right: 1/2
    assert retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert retrieval_score("I don't know", "Paragraph 3") == 0.0
    assert retrieval_score("Paragraph 13", "Paragraph 3") == 0.0


def test_count_score():
    # numbers found: 5 and 6; one equals 5: 1/2
    assert count_score("There are 5 unique paragraphs, not 6", "5") == 0.5
    assert count_score("12", "12") == 1.0
    assert count_score("none", "12") == 0.0


def test_code_sim_score():
    # first line without '`', '#', '//' is "x = foo(a)"
    prediction = "```python\n# the next line\nx = foo(a)\ny = 2\n"
    assert first_code_line(prediction) == "x = foo(a)"
    # "x = foo(a)" vs "x = foo(b)": 10 + 10 characters, LCS 9; ratio = 18/20 = 0.9
    assert code_sim_score(prediction, "x = foo(b)") == pytest.approx(0.9)
    # "abc" vs "abd": LCS 2; 4/6 = 0.667 -> 67 percent
    assert similarity_ratio("abc", "abd") == pytest.approx(0.67)
    assert similarity_ratio("", "") == 1.0
    assert code_sim_score("// only a comment", "x = 1") == 0.0


def test_longbench_score_rules():
    # max over references
    assert longbench_score("qa_f1_score", "Paris", ["London", "Paris"]) == 1.0
    # first line only (trec, triviaqa, samsum)
    assert longbench_score("qa_f1_score", "\nParis\nLondon", ["London"], first_line_only=True) == 0.0
    assert longbench_score("qa_f1_score", "\nParis\nLondon", ["London"]) == pytest.approx(2 / 3)
    assert longbench_score("classification_score", "Person", ["Person"], all_classes=["Person", "Number"]) == 1.0
    with pytest.raises(ValueError):
        longbench_score("classification_score", "Person", ["Person"])


def test_string_match_and_graded():
    answers = ["1234567", "7654321"]
    pred = "The numbers are 1234567 and 76543."
    assert string_match_all(pred, answers) == 0.5
    assert string_match_part(pred, answers) == 1.0
    # prefixes found: 7/7 and "76543" = 5/7
    assert prefix_share(pred, "7654321") == pytest.approx(5 / 7)
    assert graded_match(pred, answers, "all") == pytest.approx((1 + 5 / 7) / 2)
    assert graded_match(pred, answers, "part") == 1.0
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
    assert prefix_share("nothing here", "xyz") == 0.0


def test_attention_recall_toy():
    # one layer, two KV heads, L = 4
    gt = [torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.25, 0.25]])]
    kept = [torch.tensor([[3, 2], [0, 1]])]
    # head 0 keeps 0.4 + 0.3 = 0.7; head 1 keeps 0.5 + 0.0 = 0.5; mean 0.6
    assert attention_recall(gt, kept) == pytest.approx(0.6)


def test_attention_recall_query_heads():
    # four query heads on two KV heads (groups = 2): query heads 0, 1 read KV head 0
    gt = [torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])]
    kept = [torch.tensor([[2, 3], [0, 1]])]
    # 0.7, 0.3, 1.0, 0.0 -> mean 0.5
    assert attention_recall(gt, kept, groups=2) == pytest.approx(0.5)
    assert attention_recall(gt, kept) == pytest.approx(0.5)  # groups inferred
    with pytest.raises(ValueError):
        attention_recall(gt, kept, groups=3)


def test_attention_recall_mean_over_layers():
    gt = [torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])]
    kept = [torch.tensor([[0]]), torch.tensor([[1]])]
    # 0.5 and 0.75 -> 0.625
    assert attention_recall(gt, kept) == pytest.approx(0.625)


def test_bootstrap_constant():
    mean, lo, hi = bootstrap_ci([0.3] * 20)
    assert mean == lo == hi == pytest.approx(0.3)


def test_bootstrap_brackets_mean_and_is_seeded():
    values = [0.0, 1.0] * 25
    mean, lo, hi = bootstrap_ci(values, n_boot=500, seed=1)
    assert mean == 0.5 and lo < 0.5 < hi
    # standard error sqrt(0.25 / 50) ~ 0.071; the 95% interval is about +-0.14
    assert math.isclose(hi - lo, 2 * 1.96 * math.sqrt(0.25 / 50), rel_tol=0.25)
    assert bootstrap_ci(values, n_boot=500, seed=1) == (mean, lo, hi)


def test_paired_bootstrap_diff():
    a = [1.0, 0.5, 0.75, 1.0]
    b = [0.5, 0.0, 0.25, 0.5]  # a - b = 0.5 everywhere
    assert paired_bootstrap_diff(a, b) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1.0], [1.0, 2.0])
