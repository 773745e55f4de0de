"""The benchmarks run end to end at tiny shapes and report every number they promise.

Nothing here asserts a wall-clock relation between methods (machines are noisy); the
benchmarks' numbers are checked for presence, sign and bookkeeping only. The memory
scripts' formatting runs on a stand-in for the fresh-process measurement, which is itself
tested once for real.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import single_thread  # noqa: F401  (autouse fixture)
import torch

from lookaheadkv.bench import METHODS, PLAIN, bench_model, make_method, measure, memory, ratios
from lookaheadkv.bench.common import machine, prompt_ids
from lookaheadkv.cli import app

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_peak_rss(model_name, method, length, budget, threads=None):
    """Stand-in for a fresh process: 100 MiB held, plus 1 MiB per 64 tokens, plus 1 MiB for SnapKV."""
    return 100.0 if method == memory.BASELINE else 100.0 + length / 64 + (method == "snapkv")


def test_cost_measures_every_method_at_every_length():
    model, tokenizer = bench_model("tiny")
    methods = {m: make_method(m, model, 16) for m in METHODS if m != PLAIN}
    rows = measure(model, tokenizer, [64, 128], methods, reps=1, iso_reps=1, tail_reps=3)
    assert sorted((r.method, r.length) for r in rows) == sorted((m, n) for m in METHODS for n in (64, 128))
    for row in rows:
        assert row.ttft_ms > 0 and row.prefill_ms > 0
        if row.method == PLAIN:
            assert row.isolated_ms is None and row.added_ms == 0
        elif row.method == "lookahead":  # a difference of two timed forwards (with and without its tokens)
            assert row.isolated_ms is not None and row.separate_ms > 0 and len(row.isolated_runs_ms) == 3
        else:
            assert row.isolated_ms > 0 and row.share_pct > 0 and row.separate_ms is None and len(row.isolated_runs_ms) == 1
    assert set(ratios(rows)) == {64, 128}


def test_last_chunk_reproduces_the_prefill_with_and_without_the_tail():
    from lookaheadkv.bench.common import Clock, LastChunk, tail_work
    from lookaheadkv.engine.prefill import prefill

    model, tokenizer = bench_model("tiny")
    ids = prompt_ids(model, tokenizer, 200)
    policy = make_method("lookahead", model, 16)
    tail = policy.tail(model)
    whole, fused = prefill(model, ids), prefill(model, ids, tail=policy.tail(model))
    last = LastChunk(model, ids, size=64)
    assert last.head.length == 136
    for run, reference in ((last.run(model), whole), (last.run(model, tail), fused)):
        assert run.length == 200
        for a, b in zip(run.cache.layers, reference.cache.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(run.logits, reference.logits, atol=1e-4, rtol=0)
    chunked = last.run(model, tail).tail_mass
    assert len(chunked) == model.config.num_hidden_layers
    for a, b in zip(chunked, fused.tail_mass):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert isinstance(tail_work(model, last, policy, Clock(), rep=1), float)
    assert last.head.cache.layers[0].keys.shape[2] == 136  # the head's cache is reused, never extended


def test_bench_command_writes_results_table_and_plot(tmp_path):
    out = tmp_path / "cost"
    args = ["bench", "--model", "tiny", "--lengths", "64,128", "--reps", "1", "--iso-reps", "1", "--tail-reps", "2", "--budget", "16",
            "--methods", "snapkv,lookahead,laq", "--no-memory", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["length"]) for r in results["rows"]} == {(m, n) for m in (PLAIN, "snapkv", "lookahead", "laq") for n in (64, 128)}
    assert set(results["laq_over_lookahead"]) == {"64", "128"}
    table = (out / "table.md").read_text()
    assert "| laq | 128 |" in table and "LAQ added / LookaheadKV added" in table
    assert "of 1 isolated runs per method (2 for LookaheadKV's tokens)" in table
    assert [len(r["isolated_runs_ms"]) for r in results["rows"] if r["method"] == "lookahead"] == [2, 2]
    assert (out / "cost.png").read_bytes()[:4] == b"\x89PNG"
    # --report-only rebuilds the same table from results.json without timing anything
    (out / "table.md").unlink()
    again = CliRunner().invoke(app, ["bench", "--report-only", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert (out / "table.md").read_text() == table
    missing = CliRunner().invoke(app, ["bench", "--report-only", "--out", str(tmp_path / "nothing")])
    assert missing.exit_code != 0 and "run the benchmark into --out first" in missing.output


def test_ratios_skip_a_cost_that_is_not_positive():
    from lookaheadkv.bench.cost import CostRow

    def row(method, isolated, separate=None, added=1.0):
        return CostRow(method, 4096, 0.0, 0.0, added, isolated, None, separate_ms=separate)

    rows = [row("laq", 1000.0, added=3000.0), row("lookahead", 100.0, 200.0, added=600.0)]
    assert ratios(rows) == {4096: {"isolated": 10.0, "isolated_ci": None, "separate": 5.0, "paired": 5.0}}
    rows[1] = row("lookahead", -5.0, 250.0, added=-1.0)  # a difference of two timings below their noise
    assert ratios(rows) == {4096: {"isolated": None, "isolated_ci": None, "separate": 4.0, "paired": None}}


def test_ratio_interval_brackets_the_ratio_of_medians_and_widens_with_noise():
    from lookaheadkv.bench.cost import ratio_interval

    laq = [2000.0 + 10 * i for i in range(21)]  # median 2100
    steady = [200.0 + i for i in range(-10, 11)]  # median 200
    lo, hi = ratio_interval(laq, steady)
    assert lo <= 2100 / 200 <= hi and hi - lo < 1.5
    noisy = [200.0 + 15 * i for i in range(-10, 11)]  # same median, 15x the spread
    nlo, nhi = ratio_interval(laq, noisy)
    assert nlo <= 10.5 <= nhi and nhi - nlo > 2 * (hi - lo)
    # a denominator whose runs sit mostly at or below zero: no finite upper end
    assert ratio_interval(laq, [-50.0, -20.0, 0.0, 5.0, 30.0])[1] is None
    assert ratio_interval(laq, [200.0]) is None and ratio_interval(None, steady) is None


def test_combined_ratio_combines_runs_by_their_own_ratios_and_narrows_with_more_runs():
    from lookaheadkv.bench.cost import combined_ratio, ratio_interval

    laq = [2000.0 + 10 * i for i in range(21)]  # median 2100
    tokens = [200.0 + 15 * i for i in range(-10, 11)]  # median 200
    # one run combined is that run: the same ratio and the same resamples (same seed)
    assert combined_ratio([(laq, tokens)]) == (2100 / 200, ratio_interval(laq, tokens))
    one_lo, one_hi = ratio_interval(laq, tokens)
    ratio, (lo, hi) = combined_ratio([(laq, tokens)] * 4)  # four runs alike: the same ratio, a narrower interval
    assert ratio == pytest.approx(10.5) and lo <= 10.5 <= hi and hi - lo < 0.75 * (one_hi - one_lo)
    # a run where both methods are slower by the same factor does not move the combined ratio
    slow = ([x * 1.4 for x in laq], [x * 1.4 for x in tokens])
    assert combined_ratio([(laq, tokens), slow])[0] == pytest.approx(10.5)
    # two runs whose ratios are 10.5 and 10.5 * 1.2 / 1.5 = 8.4: their geometric mean, bracketed
    other = ([x * 1.2 for x in laq], [x * 1.5 for x in tokens])
    ratio, (lo, hi) = combined_ratio([(laq, tokens), other])
    assert ratio == pytest.approx((10.5 * 8.4) ** 0.5) and lo <= ratio <= hi
    # a run with one timing: a ratio, no interval; a run without timings or no run: nothing
    assert combined_ratio([(laq, tokens), ([2100.0], [200.0])])[1] is None
    assert combined_ratio([]) == (None, None) and combined_ratio([(laq, [])]) == (None, None)


def test_format_ratio_prints_the_interval_only_when_it_has_a_lower_end():
    from lookaheadkv.bench.cost import format_ratio

    assert format_ratio(10.93, [8.81, 13.94]) == "10.9x [8.8, 13.9]"
    assert format_ratio(32.2, [6.4, None]) == "32.2x [6.4, unbounded]"
    assert format_ratio(9.0, [None, None]) == "9.0x" and format_ratio(9.0) == "9.0x" and format_ratio(None) == "-"


def write_run(path: Path, laq: list[float], tokens: list[float], length: int = 4096, machine: str = "x86_64 AMD EPYC, AVX512") -> Path:
    row = lambda method, runs: {"method": method, "length": length, "isolated_runs_ms": runs}  # noqa: E731
    path.write_text(json.dumps({"environment": {"date": "2026-11-29T12:00:00", "command": "lookaheadkv bench", "machine": machine},
                                "rows": [row("laq", laq), row("lookahead", tokens), row("plain", None)]}))
    return path


def test_combine_runs_prints_each_run_and_the_combined_ratio(tmp_path, capsys):
    combine_runs = load_script("combine_runs")
    a = write_run(tmp_path / "a.json", [2000.0, 2100.0, 2200.0], [190.0, 200.0, 210.0])
    (tmp_path / "b").mkdir()
    write_run(tmp_path / "b" / "results.json", [2400.0, 2500.0, 2600.0], [290.0, 300.0, 310.0])
    results = combine_runs.main([str(a), str(tmp_path / "b"), "--length", "4096", "--json", str(tmp_path / "combined.json")])
    out = capsys.readouterr().out
    assert [r["ratio"] for r in results["runs"]] == [2100 / 200, 2500 / 300]
    combined = math.sqrt(2100 / 200 * 2500 / 300)  # 9.4x
    assert results["combined"]["ratio"] == pytest.approx(combined)
    assert "10.5x" in out and "8.3x" in out and f"**{combined:.1f}x [" in out and "2 runs combined" in out
    assert json.loads((tmp_path / "combined.json").read_text())["combined"]["ratio"] == pytest.approx(combined)


def test_combine_runs_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    combine_runs = load_script("combine_runs")
    run = write_run(tmp_path / "a.json", [2000.0, 2100.0], [190.0, 200.0])
    other = write_run(tmp_path / "b.json", [2000.0, 2100.0], [190.0, 200.0], machine="x86_64 AMD EPYC, AVX2")
    for argv, says in (
        ([str(run), str(other), "--length", "4096"], "different machines"),
        ([str(tmp_path / "missing.json"), "--length", "4096"], "cannot read"),
        ([str(run), "--length", "2048"], "pick --length from those"),
        ([str(run), "--length", "4096", "--den", "snapkv"], "no isolated runs of snapkv"),
    ):
        with pytest.raises(SystemExit) as stop:
            combine_runs.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and says in err and err.count("\n") == 1


def test_bench_command_rejects_unknown_methods(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--methods", "snapkv,nope", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "nope" in result.output


def test_bench_command_rejects_a_repetition_count_below_one(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--tail-reps", "0", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--tail-reps" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "results.json").exists()


def test_gpu_script_tiny_path_runs_on_the_cpu(tmp_path):
    gpu_cost = load_script("gpu_cost")
    results = gpu_cost.main(["--tiny", "--lengths", "64,128", "--reps", "1", "--out", str(tmp_path)])
    assert [(run["model"], run["length"]) for run in results["runs"]] == [(m, n) for m in ("Llama-3.1-8B", "Llama-3.2-1B") for n in (64, 128)]
    for run in results["runs"]:
        assert [r["method"] for r in run["rows"]] == list(gpu_cost.METHODS)
        assert all(r["ttft_ms"] > 0 and r["peak_gib"] is None for r in run["rows"])
    assert results["speckv_drafts"] == {"Llama-3.1-8B": "Llama-3.2-1B", "Llama-3.2-1B": "self"}
    assert "CPU" in (tmp_path / "table.md").read_text()


def test_ttft_script_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "peak_rss", fake_peak_rss)
    ttft = load_script("ttft")
    results = ttft.main(["--model", "tiny", "--lengths", "64,128", "--reps", "2", "--iso-reps", "2", "--json", str(tmp_path / "ttft.json")])
    assert {(r["method"], r["length"]) for r in results["rows"]} == {(m, n) for m in (PLAIN, "snapkv", "lookahead") for n in (64, 128)}
    assert all(r["ttft_ms"] > 0 for r in results["rows"])
    assert all(r["isolated_ms"] > 0 for r in results["rows"] if r["method"] != PLAIN)
    peaks = {(p["method"], p["length"]): p["mib"] for p in results["peak_mib"]}
    assert peaks == {("snapkv", 64): 2.0, ("lookahead", 64): 1.0, ("snapkv", 128): 3.0, ("lookahead", 128): 2.0}
    assert json.loads((tmp_path / "ttft.json").read_text())["n_lookahead"] == 32


def test_scoring_memory_script_reports_increments_per_1k_tokens(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "peak_rss", fake_peak_rss)
    scoring_memory = load_script("scoring_memory")
    results = scoring_memory.main(["--model", "tiny", "--lengths", "64,128,256", "--json", str(tmp_path / "mem.json")])
    rows = {r["length"]: r for r in results["rows"]}
    assert rows[64]["plain_mib"] == 1.0 and rows[256]["snapkv_mib"] == 5.0 and rows[128]["snapkv_minus_plain_mib"] == 1.0
    assert rows[64]["plain_per_1k_mib"] is None
    assert rows[128]["plain_per_1k_mib"] == pytest.approx(16.0) and rows[256]["snapkv_per_1k_mib"] == pytest.approx(16.0)
    assert "last over first: 1.00" in capsys.readouterr().out


def test_peak_memory_comes_from_fresh_processes():
    baseline, above = memory.peaks_above_baseline("tiny", [("snapkv", 256)], budget=16, threads=1, jobs=2)
    assert baseline > 50  # a Python process holding torch and a model
    assert isinstance(above[("snapkv", 256)], float)


def test_profile_tail_script_finds_the_tokens_attention_rows(tmp_path):
    profile_tail = load_script("profile_tail")
    results = profile_tail.main(["--model", "tiny", "--length", "300", "--reps", "1", "--json", str(tmp_path / "p.json")])
    added = results["added_ms_by_operator"]
    # the tokens' explicit attention rows (per-KV-head matmuls), their softmax and the top-k exist
    # only in the run with them
    assert added["aten::mm"] > 0 and added["aten::_softmax"] > 0 and added["aten::topk"] > 0
    total = results["total_ms"]
    assert total["added"] == pytest.approx(total["with"] - total["without"])
    assert 0 < results["tail_rows_ms"] < total["with"]  # the named range around the rows was recorded
    assert json.loads((tmp_path / "p.json").read_text())["length"] == 300


def test_spread_places_fewer_runs_evenly_over_the_rounds():
    from lookaheadkv.bench.cost import spread

    held = [r for r in range(200) if spread(r, 40, 200)]
    assert len(held) == 40
    assert {b - a for a, b in zip(held, held[1:])} == {5}  # one run every 5 rounds, not the first 40 rounds
    assert all(spread(r, 15, 15) for r in range(15)) and all(spread(r, 20, 15) for r in range(15))
    assert sum(spread(r, 7, 30) for r in range(30)) == 7


def test_machine_names_architecture_and_simd_level():
    """Results from different hosts of one kind must be told apart: the CPU's SIMD level is in every result."""
    import platform

    name = machine()
    assert name.startswith(platform.machine())
    assert name.endswith(torch.backends.cpu.get_cpu_capability())
