"""Issue 20: an evaluation spread over shards merges into the single run's records and report; a killed shard resumes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from helpers import single_thread, tiny_for_tokenizer  # noqa: F401  (autouse fixture)
from lookaheadkv.cli import app
from lookaheadkv.evaluation import report
from lookaheadkv.evaluation.runner import EvalConfig, Runner, merge_shards, read_results, shard_path
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.tasks import make_suite

METHODS = ["full", "snapkv", "lookahead", "h2o"]
BUDGETS = [16, 48]


@pytest.fixture(scope="module")
def setup(smollm2):
    _, tokenizer = smollm2
    model = tiny_for_tokenizer(tokenizer, seed=4)
    suite = make_suite(tokenizer, ["niah_single_number", "passage_qa"], [256], 3, split="eval", seed=1)
    for s in suite:
        s.max_new_tokens = 5
    options = {"lookahead": {"modules": LookaheadModules.for_model(model, seed=0, n_lookahead=8)}}
    return model, tokenizer, suite, options


def stable(rows):
    """The records in file order, without their timings."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "trace")} for r in rows]


def summary_text(rows) -> str:
    summary = report.summarise(rows)
    return "\n".join(report.markdown(summary, metric) for metric in report.METRICS)


def test_sharded_run_merged_equals_the_single_run_record_for_record(setup, tmp_path, monkeypatch):
    model, tokenizer, suite, options = setup
    config = EvalConfig(METHODS, BUDGETS, options)
    single = Runner(model, tokenizer, config, tmp_path / "single").run(suite)
    assert len(single) == len(suite) * len(config.runs()) == 6 * 7

    out = tmp_path / "sharded"
    original, written = Runner.append, []

    def dying_append(self, row):  # shard 1 is killed after its 3rd record
        if self.shard == (1, 3):
            if len(written) == 3:
                raise KeyboardInterrupt
            written.append(row)
        original(self, row)

    monkeypatch.setattr(Runner, "append", dying_append)
    for index in (0, 2):
        Runner(model, tokenizer, config, out, shard=(index, 3)).run(suite)
    with pytest.raises(KeyboardInterrupt):
        Runner(model, tokenizer, config, out, shard=(1, 3)).run(suite)
    present, expected = merge_shards(out, suite, config)
    assert present < expected == len(single)

    computed = []
    monkeypatch.setattr(Runner, "append", lambda self, row: (computed.append(row), original(self, row)))
    mine = Runner(model, tokenizer, config, out, shard=(1, 3)).run(suite)  # the killed shard resumes
    assert len(computed) == 2 * 7 - 3 and {r["sample_id"] for r in mine} == {suite[1].id, suite[4].id}
    assert merge_shards(out, suite, config) == (expected, expected)

    merged = read_results(out / "results.jsonl")
    key = lambda r: (r["sample_id"], r["method"], r["budget"])  # noqa: E731
    order = {k: i for i, k in enumerate((s.id, m, b) for s in suite for m, b in config.runs())}
    assert stable(merged) == stable(sorted(single, key=lambda r: order[key(r)]))  # record for record, in one order
    assert summary_text(merged) == summary_text(read_results(tmp_path / "single" / "results.jsonl"))
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"results-{i}-of-3.jsonl" for i in range(3)]
    assert shard_path(out, 1, 3).is_file()


def test_cli_shards_report_once_every_shard_is_in(setup, tmp_path, monkeypatch):
    _, tokenizer, _, _ = setup
    folder = tmp_path / "model"
    tiny_for_tokenizer(tokenizer, seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = ["eval", "--model", str(folder), "--methods", "full,snapkv", "--budgets", "8", "--tasks", "niah_single_number", "--lengths", "200", "--samples", "3", "--threads", "1"]
    invoke = lambda *a: CliRunner().invoke(app, [*args, *a])  # noqa: E731
    assert invoke("--out", str(tmp_path / "single")).exit_code == 0
    first = invoke("--out", str(tmp_path / "sharded"), "--shard", "0/2")
    assert first.exit_code == 0 and "the report is written when every shard has finished" in first.output
    assert not (tmp_path / "sharded" / "summary.md").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # the second shard as torchrun would start it
    monkeypatch.setenv("RANK", "1")
    second = invoke("--out", str(tmp_path / "sharded"))
    assert second.exit_code == 0, second.output
    single, sharded = (read_results(tmp_path / d / "results.jsonl") for d in ("single", "sharded"))
    assert stable(sharded) == stable(single)  # the single run's order too: one sample at a time, full first
    assert (tmp_path / "sharded" / "summary.md").read_text() == (tmp_path / "single" / "summary.md").read_text()
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--shard", "2/2"])
    assert bad.exit_code == 2 and "--shard takes i/n" in bad.stderr
