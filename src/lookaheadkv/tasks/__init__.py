"""Offline RULER-style synthetic suite over the Paul Graham essays and filler text.

Shared by training (its ``synthetic`` source draws the train split; the essays split once by
:func:`is_train_essay`) and evaluation (the eval split); answers are scored by
:func:`lookaheadkv.evaluation.metrics.score_sample`.

Tasks (see :data:`TASKS`), by report group (:data:`TASK_GROUPS`):

- ``niah``: niah_single_number (noise haystack), niah_single_word, niah_single_uuid
- ``multi_niah``: niah_multikey, niah_multivalue, niah_multiquery
- ``tracking``: variable_tracking
- ``aggregation``: common_words, frequent_words
- ``qa``: passage_qa

Outside ``all``, the held-out generalisation group ``heldout`` (:mod:`.heldout`): needles
over package prose and templates that no training source uses, eval split only.

Samples are generated deterministically from a seed, at prompt lengths measured in
tokens of the given tokenizer. ``split="train"`` and ``split="eval"`` draw from disjoint
seed spaces, essays, filler sentences and needle vocabularies; :func:`assert_disjoint`
checks it for any two lists of samples.
"""

from lookaheadkv.tasks.generators import TASK_GROUPS, TASKS, TaskSpec
from lookaheadkv.tasks.heldout import HELDOUT_TASKS
from lookaheadkv.tasks.sample import Sample, encode_prompt, has_chat_template
from lookaheadkv.tasks.suite import (
    LENGTH_TOLERANCE,
    assert_disjoint,
    make_sample,
    make_suite,
    sample_id,
    sample_seed,
)
from lookaheadkv.tasks.text import SPLITS, is_train_essay

__all__ = [
    "HELDOUT_TASKS",
    "LENGTH_TOLERANCE",
    "SPLITS",
    "TASKS",
    "TASK_GROUPS",
    "Sample",
    "TaskSpec",
    "assert_disjoint",
    "encode_prompt",
    "has_chat_template",
    "is_train_essay",
    "make_sample",
    "make_suite",
    "sample_id",
    "sample_seed",
]
