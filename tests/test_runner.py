"""The evaluation runner: one shared prefill per sample, resumable JSONL, failures recorded."""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import single_thread, tiny_for_tokenizer  # noqa: F401  (autouse fixture)
from lookaheadkv.evaluation import report
from lookaheadkv.evaluation.runner import EvalConfig, Runner, read_results
from lookaheadkv.tasks import make_suite
from lookaheadkv.lookahead import LookaheadModules

METHODS = ["full", "snapkv", "streamingllm", "lookahead", "oracle"]
BUDGETS = [16, 64]


@pytest.fixture(scope="module")
def setup(smollm2):
    _, tokenizer = smollm2
    model = tiny_for_tokenizer(tokenizer, seed=1)
    suite = make_suite(tokenizer, ["niah_single_number", "passage_qa"], [320], 2, split="eval", seed=0)
    for s in suite:
        s.max_new_tokens = 6
    modules = LookaheadModules.for_model(model, seed=0, n_lookahead=8)
    return model, tokenizer, suite, {"lookahead": {"modules": modules}}


def stable(rows):
    """Rows without timings, keyed by (sample, method, budget)."""
    return {(r["sample_id"], r["method"], r["budget"]): {k: v for k, v in r.items() if k != "seconds"} for r in rows}


def test_killed_run_resumes_to_the_same_results_without_recomputing(setup, tmp_path, monkeypatch):
    model, tokenizer, suite, options = setup
    config = EvalConfig(METHODS, BUDGETS, options)
    expected = len(suite) * len(config.runs())

    straight = Runner(model, tokenizer, config, tmp_path / "straight").run(suite)
    assert len(straight) == expected

    written = []
    original = Runner.append

    def dying_append(self, row):
        if len(written) == 13:  # a kill part-way through the second sample
            raise KeyboardInterrupt
        written.append(row)
        original(self, row)

    monkeypatch.setattr(Runner, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        Runner(model, tokenizer, config, tmp_path / "killed").run(suite)
    assert len(read_results(tmp_path / "killed" / "results.jsonl")) == 13

    computed = []

    def counting_append(self, row):
        computed.append((row["sample_id"], row["method"], row["budget"]))
        original(self, row)

    monkeypatch.setattr(Runner, "append", counting_append)
    resumed = Runner(model, tokenizer, config, tmp_path / "killed").run(suite)
    assert len(computed) == expected - 13, "finished rows must not be recomputed"
    assert not set(computed) & {(r["sample_id"], r["method"], r["budget"]) for r in written}
    assert stable(resumed) == stable(straight)
    assert stable(read_results(tmp_path / "killed" / "results.jsonl")) == stable(straight)


def test_rows_carry_scores_fidelity_and_recall(setup, tmp_path):
    model, tokenizer, suite, options = setup
    rows = Runner(model, tokenizer, EvalConfig(METHODS, BUDGETS, options), tmp_path).run(suite[:1])
    full = next(r for r in rows if r["method"] == "full")
    for r in rows:
        assert 0 <= r["score"] <= 1 and 0 <= r["graded"] <= 1
        if r["method"] != "full":
            assert 0 <= r["fidelity_f1"] <= 1 and 0 < r["recall"] <= 1 + 1e-5
    # The oracle's kept entries hold at least as much true mass as any other scorer's at a budget.
    for b in BUDGETS:
        at_b = {r["method"]: r["recall"] for r in rows if r["budget"] == b}
        assert at_b["oracle"] >= max(at_b.values()) - 1e-6


def test_a_failing_method_is_recorded_and_the_run_goes_on(setup, tmp_path, monkeypatch):
    model, tokenizer, suite, options = setup
    from lookaheadkv.policies import StreamingLLM

    def broken(self, model, prefill, observer):
        raise RuntimeError("boom")

    monkeypatch.setattr(StreamingLLM, "scores", broken)
    rows = Runner(model, tokenizer, EvalConfig(METHODS, BUDGETS, options), tmp_path).run(suite[:2])
    errors = [r for r in rows if "error" in r]
    assert {r["method"] for r in errors} == {"streamingllm"} and len(errors) == 2 * len(BUDGETS)
    assert "RuntimeError: boom" in errors[0]["error"]
    assert sum("error" not in r for r in rows) == 2 * (len(EvalConfig(METHODS, BUDGETS).runs()) - len(BUDGETS))
    summary = report.summarise(read_results(tmp_path / "results.jsonl"))
    assert suite[0].group == suite[1].group
    assert summary[(suite[0].group, "streamingllm", 16)]["errors"] == 2  # both samples, none scored
    assert summary[(suite[0].group, "streamingllm", 16)]["n"] == 0


def test_summary_marks_uninformative_groups_and_pairs_with_snapkv(tmp_path):
    rows = []
    for i in range(6):
        for method, budget, score in [("full", 0, 0.1), ("snapkv", 8, 0.0), ("lookahead", 8, 1.0 if i % 2 else 0.0)]:
            rows.append({"sample_id": f"s{i}", "group": "g", "method": method, "budget": budget, "score": score, "graded": score})
    summary = report.summarise(rows, n_boot=200)
    entry = summary[("g", "lookahead", 8)]
    assert entry["uninformative"] is True
    assert entry["diff_vs_snapkv"][0] == pytest.approx(0.5)
    assert entry["score"][0] == pytest.approx(0.5)
    text = report.markdown(summary)
    assert "uninformative" in text and "Δ +50.0" in text
    assert report.plot(summary, tmp_path / "p.png").stat().st_size > 0


def test_terminal_table_marks_uninformative_groups(capsys):
    rows = [{"sample_id": "s0", "group": "g", "method": m, "budget": b, "score": 0.0, "graded": 0.0} for m, b in [("full", 0), ("snapkv", 8)]]
    report.terminal(report.summarise(rows, n_boot=50))
    assert "uninformative" in capsys.readouterr().out


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        EvalConfig(["full", "nope"], [64])
    with pytest.raises(ValueError, match="budgets"):
        EvalConfig(["full"], [0])


def test_batched_decoding_gives_the_rows_of_one_by_one_decoding(setup, tmp_path):
    """The runner decodes equal-sized evictions as one batch; every row must be what decoding it alone gives."""
    model, tokenizer, suite, options = setup
    methods = ["full", "snapkv", "streamingllm", "h2o", "tova", "lookahead", "oracle", "pyramidkv"]
    one_by_one = Runner(model, tokenizer, EvalConfig(methods, BUDGETS, options, batch_decode=False), tmp_path / "single").run(suite)
    batched = Runner(model, tokenizer, EvalConfig(methods, BUDGETS, options, batch_decode=True), tmp_path / "batched").run(suite)
    assert not any("error" in r for r in batched)
    assert len({r["prediction"] for r in batched}) > 1
    assert stable(batched) == stable(one_by_one)


def test_summary_pools_the_informative_groups():
    rows = []
    for group, full_score in [("a", 1.0), ("b", 1.0), ("c", 0.0)]:
        for i in range(4):
            sid = f"{group}{i}"
            rows.append({"sample_id": sid, "group": group, "method": "full", "budget": 0, "score": full_score, "graded": full_score})
            rows.append({"sample_id": sid, "group": group, "method": "snapkv", "budget": 8, "score": float(group == "a"), "graded": 0.0})
    summary = report.summarise(rows, n_boot=50)
    pooled = summary[(report.POOLED, "snapkv", 8)]
    assert pooled["n"] == 8  # groups a and b, not the uninformative c
    assert pooled["score"][0] == pytest.approx(0.5)
    assert not pooled["uninformative"]
    assert report.markdown(summary).index(report.POOLED) < report.markdown(summary).index("**a**")
    assert (report.POOLED, "snapkv", 8) not in report.summarise(rows, n_boot=50, pooled=False)


def test_summary_does_not_depend_on_the_order_of_the_rows():
    # a resumed run appends samples in another order than an uninterrupted one; the report must not move
    rng = random.Random(0)
    rows = []
    for group in ["a", "b"]:
        for i in range(12):
            sid = f"{group}{i}"
            rows.append({"sample_id": sid, "group": group, "method": "full", "budget": 0, "score": 1.0})
            for method in ["snapkv", "lookahead"]:
                rows.append({"sample_id": sid, "group": group, "method": method, "budget": 8, "score": float(rng.random() < 0.5)})
    shuffled = rows[:]
    rng.shuffle(shuffled)
    assert report.summarise(shuffled, n_boot=200) == report.summarise(rows, n_boot=200)


def test_a_method_variant_runs_as_the_policy_built_with_its_options(setup, tmp_path):
    """``lookahead:kernel=5`` is recorded under that name and decodes what LookaheadKV(kernel=5) gives alone."""
    from lookaheadkv.engine.generate import eos_ids, generate_ids
    from lookaheadkv.policies import LookaheadKV, SnapKV

    model, tokenizer, suite, options = setup
    methods = ["full", "lookahead", "lookahead:kernel=5", "snapkv:window=4:kernel=1"]
    rows = Runner(model, tokenizer, EvalConfig(methods, [16], options), tmp_path).run(suite[:2])
    assert not any("error" in r for r in rows)
    by_key = {(r["sample_id"], r["method"]): r for r in rows}
    eos = eos_ids(model, tokenizer)
    references = {
        "lookahead:kernel=5": LookaheadKV(budget=16, modules=options["lookahead"]["modules"], kernel=5),
        "snapkv:window=4:kernel=1": SnapKV(budget=16, window=4, kernel=1),
    }
    for sample in suite[:2]:
        for name, policy in references.items():
            tokens, _, _ = generate_ids(model, torch.tensor([sample.prompt_ids]), policy, max_new_tokens=sample.max_new_tokens, eos_token_ids=eos)
            assert by_key[(sample.id, name)]["prediction"] == tokenizer.decode(tokens, skip_special_tokens=True)


def test_method_options_are_checked():
    from lookaheadkv.policies import make_policy, split_method

    assert split_method("lookahead:kernel=7:window=16:fused=false") == ("lookahead", {"kernel": 7, "window": 16, "fused": False})
    assert make_policy("snapkv:kernel=3", budget=8).kernel == 3
    for bad, match in (("lookahead:kernal=7", "key one of"), ("snapkv:kernel=x", "whole number"), ("lookahead:fused=2", "true or false"), ("nope:kernel=1", "unknown method")):
        with pytest.raises(ValueError, match=match):
            EvalConfig(["full", bad], [64])
