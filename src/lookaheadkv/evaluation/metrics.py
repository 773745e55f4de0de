"""Scoring functions: task answers (RULER string match, LongBench's scorers), fidelity, bootstrap CIs.

Everything here is a pure function of its arguments. LongBench's official scorers
(``LongBench/metrics.py``) are re-implemented from their definitions, without the
``rouge`` and ``fuzzywuzzy`` packages; where our version differs from the package it
replaces, the docstring says how.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from ..tasks.sample import Sample, ruler_match, string_match_all, string_match_part  # noqa: F401 (the RULER matches, re-exported)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD / LongBench answer normalisation.

    Lower-case, drop ASCII punctuation, drop the articles ``a``, ``an``, ``the`` and
    collapse whitespace.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(pred_tokens: Sequence[str], ref_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 between two token lists (0 when nothing is shared)."""
    n_same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if n_same == 0:
        return 0.0
    precision = n_same / len(pred_tokens)
    recall = n_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1 of ``pred`` against ``ref`` after :func:`normalize_answer`.

    Examples
    --------
    >>> token_f1("the cat sat", "a cat sat down")  # P = 2/2, R = 2/3
    0.8
    """
    return _f1(normalize_answer(pred).split(), normalize_answer(ref).split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when ``pred`` and ``ref`` are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(ref))


def qa_f1_score(prediction: str, reference: str) -> float:
    """LongBench ``qa_f1_score`` (English): SQuAD token F1, see :func:`token_f1`."""
    return token_f1(prediction, reference)


def _lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (one-row DP)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def _rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric runs, the tokenisation of Google's ``rouge-score``."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) from the token-level longest common subsequence.

    ``P = LCS / len(pred)``, ``R = LCS / len(ref)``, ``F = 2PR / (P + R)``, over
    lower-cased alphanumeric tokens. LongBench calls the ``rouge`` package, whose
    ROUGE-L is the summary-level variant (union LCS over sentences split at '.');
    for single-sentence texts the two coincide. Empty inputs score 0, as LongBench's
    ``rouge_score`` does when the package raises.

    Examples
    --------
    >>> round(rouge_l("the cat sat on the mat", "the cat lay on the mat"), 4)  # LCS 5 of 6
    0.8333
    """
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    lcs = _lcs_length(pred, ref) if pred and ref else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """LongBench ``classification_score`` (trec).

    Collect the class names that occur in ``prediction``; drop those that are a
    strict substring of ``reference`` (so "Description" does not count against
    "Description of something"); score ``1 / len(matches)`` if ``reference`` is among
    the matches, else 0. (LongBench removes items from the list while iterating over
    it, which can skip an item; we apply the stated rule to every match.)
    """
    matches = [name for name in all_classes if name in prediction]
    matches = [name for name in matches if not (name in reference and name != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def _share_of_numbers_equal(prediction: str, number: str) -> float:
    """Fraction of the integers written in ``prediction`` that equal ``number``."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == number for n in numbers) / len(numbers)


def retrieval_score(prediction: str, reference: str) -> float:
    """LongBench ``retrieval_score`` (passage_retrieval_en).

    The reference reads "Paragraph N"; the score is the share of the integers in the
    prediction that equal N ("Paragraph 3" -> 1.0, "Paragraph 3 or 12" -> 0.5).
    """
    match = re.search(r"Paragraph (\d+)", reference)
    if match is None:
        raise ValueError(f"reference {reference!r} does not read 'Paragraph N'")
    return _share_of_numbers_equal(prediction, match.group(1))


def count_score(prediction: str, reference: str) -> float:
    """LongBench ``count_score`` (passage_count): share of integers in ``prediction`` equal to ``reference``."""
    return _share_of_numbers_equal(prediction, str(reference).strip())


def first_code_line(prediction: str) -> str:
    """The first line of ``prediction`` without '`', '#' or '//' (LongBench's code rule); '' if none."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def similarity_ratio(a: str, b: str) -> float:
    """Indel (Levenshtein with substitution cost 2) similarity, rounded to whole percent.

    ``2 * LCS(a, b) / (len(a) + len(b))`` over characters, rounded as
    ``round(100 * ratio) / 100``: the value of ``fuzz.ratio(a, b) / 100`` from
    fuzzywuzzy with python-Levenshtein installed. Two empty strings score 1.
    """
    if not a and not b:
        return 1.0
    ratio = 2 * _lcs_length(a, b) / (len(a) + len(b))
    return round(100 * ratio) / 100


def code_sim_score(prediction: str, reference: str) -> float:
    """LongBench ``code_sim_score`` (lcc, repobench-p).

    Similarity (:func:`similarity_ratio`) between the first code-like line of the
    prediction (:func:`first_code_line`) and the reference line.
    """
    return similarity_ratio(first_code_line(prediction), reference)


LONGBENCH_SCORERS = {
    "qa_f1_score": qa_f1_score,
    "rouge_score": rouge_l,
    "classification_score": classification_score,
    "retrieval_score": retrieval_score,
    "count_score": count_score,
    "code_sim_score": code_sim_score,
}
"""LongBench metric name -> scorer ``(prediction, reference[, all_classes]) -> float``."""


def longbench_score(
    metric: str,
    prediction: str,
    references: Sequence[str],
    all_classes: Sequence[str] | None = None,
    first_line_only: bool = False,
) -> float:
    """Score one LongBench prediction: the maximum over references of ``metric``.

    Parameters
    ----------
    metric
        A key of :data:`LONGBENCH_SCORERS`.
    prediction
        The generated text.
    references
        All reference answers of the sample.
    all_classes
        Label set, required by ``classification_score``.
    first_line_only
        Keep only the first line of the prediction (LongBench does so for trec,
        triviaqa and samsum).
    """
    if first_line_only:
        prediction = prediction.lstrip("\n").split("\n")[0]
    scorer = LONGBENCH_SCORERS[metric]
    if metric == "classification_score":
        if all_classes is None:
            raise ValueError("classification_score needs all_classes")
        return max(scorer(prediction, ref, all_classes) for ref in references)
    return max(scorer(prediction, ref) for ref in references)


def prefix_share(prediction: str, answer: str) -> float:
    """Share of ``answer`` whose longest prefix occurs in ``prediction`` (case-insensitive).

    Every prefix of an occurring prefix also occurs, so the length is found by
    binary search.

    Examples
    --------
    >>> prefix_share("the number is 12345xx", "1234567")  # "12345" found
    0.7142857142857143
    """
    pred, ans = prediction.lower(), answer.lower()
    lo, hi = 0, len(ans)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ans[:mid] in pred:
            lo = mid
        else:
            hi = mid - 1
    return lo / len(ans) if ans else 1.0


def graded_match(prediction: str, answers: Sequence[str], metric: str) -> float:
    """Partial credit for RULER answers: :func:`prefix_share` averaged ("all") or maxed ("part")."""
    shares = [prefix_share(prediction, ans) for ans in answers]
    return max(shares) if metric == "part" else sum(shares) / len(shares)


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of the mean.

    Returns
    -------
    tuple
        ``(mean, lo, hi)`` with ``lo``/``hi`` the ``alpha/2`` and ``1 - alpha/2``
        quantiles of ``n_boot`` resampled means (resampling with replacement, a
        ``numpy.random.default_rng(seed)`` stream).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("values must be a non-empty 1-D sequence")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Bootstrap CI of ``mean(a - b)`` for paired per-sample scores; see :func:`bootstrap_ci`."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError("paired samples must have the same shape")
    return bootstrap_ci(x - y, n_boot=n_boot, seed=seed, alpha=alpha)


RULER_METRICS = ("all", "part")


def score_sample(sample: Sample, prediction: str) -> dict[str, float]:
    """Score a generated answer.

    Returns
    -------
    dict
        ``score``: RULER's string match ("all": share of answers found as
        case-insensitive substrings; "part": 1 if any is found) or the LongBench metric
        (maximum over references, with its first-line and label-set rules), in [0, 1].
        ``graded``: for RULER metrics, the longest prefix of each answer found in the
        prediction as a share of the answer's length, averaged ("all") or maxed
        ("part"); for LongBench metrics equal to ``score``.
    """
    if sample.metric in RULER_METRICS:
        return {
            "score": ruler_match(prediction, sample.answers, sample.metric),
            "graded": graded_match(prediction, sample.answers, sample.metric),
        }
    score = longbench_score(
        sample.metric,
        prediction,
        sample.answers,
        all_classes=sample.meta.get("all_classes"),
        first_line_only=sample.meta.get("first_line_only", False),
    )
    return {"score": score, "graded": score}
