"""Evaluation: LongBench, answer scoring, the runner and its reports.

The offline RULER-style suite (synthetic tasks with disjoint train / eval splits, :class:`Sample`)
is :mod:`lookaheadkv.tasks`, shared with training; attention recall is :mod:`lookaheadkv.scoring`.

- :mod:`.longbench`: LongBench's 16 English tasks as :class:`Sample` objects.
- :mod:`.metrics`: :func:`score_sample`, answer-fidelity scores, LongBench scorers and
  bootstrap confidence intervals.
"""

from lookaheadkv.evaluation.longbench import LONGBENCH_TASKS, load_longbench
from lookaheadkv.evaluation.metrics import (
    bootstrap_ci,
    exact_match,
    paired_bootstrap_diff,
    score_sample,
    token_f1,
)
from lookaheadkv.scoring import attention_recall
from lookaheadkv.tasks import (
    TASK_GROUPS,
    TASKS,
    Sample,
    assert_disjoint,
    encode_prompt,
    make_sample,
    make_suite,
)

__all__ = [
    "LONGBENCH_TASKS",
    "TASKS",
    "TASK_GROUPS",
    "Sample",
    "assert_disjoint",
    "attention_recall",
    "bootstrap_ci",
    "encode_prompt",
    "exact_match",
    "load_longbench",
    "make_sample",
    "make_suite",
    "paired_bootstrap_diff",
    "score_sample",
    "token_f1",
]
