"""Evaluation: the offline RULER-style suite, LongBench, and scoring metrics.

- :mod:`.tasks`: synthetic tasks generated from a seed at measured token lengths,
  with disjoint train / eval splits; :class:`Sample` and :func:`score_sample`.
- :mod:`.longbench`: LongBench's 16 English tasks as :class:`Sample` objects.
- :mod:`.metrics`: answer-fidelity scores, LongBench scorers, attention recall and
  bootstrap confidence intervals.
"""

from lookaheadkv.evaluation.longbench import LONGBENCH_TASKS, load_longbench
from lookaheadkv.evaluation.metrics import (
    attention_recall,
    bootstrap_ci,
    exact_match,
    paired_bootstrap_diff,
    token_f1,
)
from lookaheadkv.evaluation.tasks import (
    TASK_GROUPS,
    TASKS,
    Sample,
    assert_disjoint,
    encode_prompt,
    make_sample,
    make_suite,
    score_sample,
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
