"""Decoding under decode budgets as one batch (engine.batch_rescore.decode_budgeted_batch).

* Rows of one prompt, every decode-time policy at several decode budgets, decoded together give, row by
  row, what decoding the row alone (``decode`` + ``BudgetedDecoding``) gives: the tokens, the entry count
  after every step, every re-scoring (when, before, after) with its kept positions, and the final cache.
  Rows stop at an EOS one of them emits early; a budget above the final length never re-scores.
* Rows with different intervals in one batch; every row's cache stays under ``budget + interval``.
* The timings: each row is charged its share of the batched steps and its own re-scorings.
* Edge cases: the first token an EOS, one token, no runs, a run that starts elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from helpers import ARCHS, decode_policy, random_ids, single_thread  # noqa: F401  (single_thread is an autouse fixture)
from lookaheadkv.engine.batch_rescore import decode_budgeted_batch
from lookaheadkv.engine.cache import gather
from lookaheadkv.engine.decode import decode
from lookaheadkv.engine.rescore import BudgetedDecoding, DecodeBudget, decode_scorer
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import SharedPrefill

LENGTH, STEPS = 60, 40
NAMES = ["streamingllm", "snapkv", "h2o", "tova", "random", "lookahead"]
NEVER = 200  # above the prompt plus the answer: never re-scored


def policies(model, names=NAMES) -> dict:
    return {name: decode_policy(name, model, NEVER) for name in names}


def make_runs(model, shared, specs):
    """One fresh BudgetedDecoding per (name, budget, interval), each over its own evicted cache, as the benchmark builds them."""
    runs = []
    for name, budget, interval in specs:
        kept = shared.kept(name, budget)
        run = BudgetedDecoding(
            model, gather(shared.state.cache, kept), kept, LENGTH, DecodeBudget(budget, interval, recent=6),
            decode_scorer(shared.policy(name, budget), model), prefill=shared.state, observer=shared.observers[name], keep_positions=True,
        )  # fmt: skip
        runs.append(run)
    return runs


def alone(model, shared, specs, eos=()):
    runs = make_runs(model, shared, specs)
    state = shared.state
    tokens = [decode(model, r.cache, state.logits, LENGTH, STEPS, eos_token_ids=eos, observers=r.observers(), after_step=r.after_step) for r in runs]
    return tokens, runs


def assert_same_run(a: BudgetedDecoding, b: BudgetedDecoding, what: str):
    assert a.record.entries == b.record.entries, what
    assert [(r.fed, r.before, r.after) for r in a.record.rescorings] == [(r.fed, r.before, r.after) for r in b.record.rescorings], what
    for ra, rb in zip(a.record.rescorings, b.record.rescorings):
        assert all(torch.equal(x, y) for x, y in zip(ra.positions, rb.positions)), f"{what}: kept positions at fed {ra.fed}"
    assert all(torch.equal(x, y) for x, y in zip(a.positions, b.positions)), what
    for la, lb in zip(a.cache.layers, b.cache.layers):  # the row's own cache ends as decoding it alone leaves it
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(la.values, lb.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_each_row_alone(arch):
    model = tiny_model(arch, seed=7)
    ids = random_ids(LENGTH, seed=8)
    shared = SharedPrefill(model, ids, policies(model))
    specs = [(name, budget, 5) for name in NAMES for budget in (20, 32)] + [("h2o", NEVER, 5), ("snapkv", NEVER, 5)]
    free, _ = alone(model, shared, specs)
    assert len({tuple(t) for t in free}) > 3  # the rows really differ, else the test proves little
    # an EOS that some row emits early (and not at its first token): that row stops there, others go on
    eos = next(t[k] for t in free for k in range(6, 20) if t[k] not in t[:k] and sum(t[k] in u for u in free) < len(free) // 2)
    expected, singles = alone(model, shared, specs, eos=[eos])
    assert any(len(t) < STEPS for t in expected) and any(len(t) == STEPS for t in expected)

    runs = make_runs(model, shared, specs)
    got = decode_budgeted_batch(model, runs, shared.state.logits, LENGTH, STEPS, eos_token_ids=[eos])
    for spec, g, e, run, single in zip(specs, got, expected, runs, singles):
        assert g == e, f"{spec}: tokens"
        assert_same_run(run, single, f"{spec}")
        name, budget, interval = spec
        assert run.record.peak <= budget + interval
        if budget == NEVER:
            assert run.record.rescorings == []
        elif len(g) == STEPS:
            assert len(run.record.rescorings) >= 5 and run.record.peak == budget + interval
    assert sum(len(r.record.rescorings) for r in runs) > 20


def test_rows_with_different_intervals_and_budgets():
    model = tiny_model("qwen2", seed=2)
    ids = random_ids(LENGTH, seed=4)
    shared = SharedPrefill(model, ids, policies(model, ["h2o", "tova", "lookahead", "streamingllm"]))
    specs = [("h2o", 24, 4), ("tova", 16, 7), ("lookahead", 30, 6), ("streamingllm", 12, 3), ("h2o", 40, 9)]
    expected, singles = alone(model, shared, specs)
    runs = make_runs(model, shared, specs)
    got = decode_budgeted_batch(model, runs, shared.state.logits, LENGTH, STEPS)
    assert got == expected
    for spec, run, single in zip(specs, runs, singles):
        assert_same_run(run, single, f"{spec}")
        assert run.record.peak <= spec[1] + spec[2] and all(r.fed % spec[2] == 0 for r in run.record.rescorings)


def test_timings_are_shared_out():
    model = tiny_model("llama", seed=1)
    shared = SharedPrefill(model, random_ids(LENGTH, seed=2), policies(model, ["snapkv", "h2o"]))
    runs = make_runs(model, shared, [("snapkv", 20, 5), ("h2o", 20, 5), ("h2o", NEVER, 5)])
    decode_budgeted_batch(model, runs, shared.state.logits, LENGTH, STEPS)
    for run in runs:
        assert run.record.seconds > 0
        assert all(r.seconds > 0 and r.interval_seconds > 0 for r in run.record.rescorings)
        assert run.record.seconds >= sum(r.seconds + r.interval_seconds for r in run.record.rescorings) * 0.999


def test_edge_cases():
    model = tiny_model("llama", seed=1)
    shared = SharedPrefill(model, random_ids(LENGTH, seed=2), policies(model, ["h2o"]))
    logits = shared.state.logits
    first = int(logits.argmax())
    specs = [("h2o", 20, 5), ("h2o", 30, 5)]
    assert decode_budgeted_batch(model, [], logits, LENGTH, STEPS) == []
    runs = make_runs(model, shared, specs)
    assert decode_budgeted_batch(model, runs, logits, LENGTH, STEPS, eos_token_ids=[first]) == [[first], [first]]
    assert all(r.record.entries == [r.record.entries[0]] and r.record.rescorings == [] for r in runs)
    runs = make_runs(model, shared, specs)
    assert decode_budgeted_batch(model, runs, logits, LENGTH, 1) == [[first], [first]]
    runs = make_runs(model, shared, specs)
    with pytest.raises(ValueError, match="shared position"):
        decode_budgeted_batch(model, runs, logits, LENGTH + 1, STEPS)
