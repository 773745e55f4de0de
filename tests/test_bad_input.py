"""Bad and unusual input, through the command line and the Python API (issue 18).

Every case ends in one ``error:`` line and exit code 2 on the command line (Ctrl-C: 130), or a
clear exception type and message through the API; short prompts work with every policy; a
results file cut by a kill loses nothing on the rerun. References are independent of the code
under test: Hugging Face's own greedy decoding, and files written by hand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import hf_greedy_tokens, invoke, one_error_line, random_ids, single_thread, tiny_for_tokenizer  # noqa: F401  (autouse fixture)
from lookaheadkv.engine.evict import parse_budget
from lookaheadkv.engine.generate import generate, generate_ids
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import REGISTRY, SnapKV, make_policy
from lookaheadkv.records import append_record, read_records

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a model folder (context 4096)."""
    _, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_for_tokenizer(tokenizer, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- 1. short prompts


SHORT_OPTIONS = {"laq": {"n_draft": 3}, "speckv": {"n_draft": 3}, "oracle": {"max_new_tokens": 3}}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_policy_runs_on_prompts_of_1_to_40_tokens(name):
    """The README's ``generate --prompt hi`` crashed in max_pool1d (SnapKV, PyramidKV, LAQ) on prompts <= 32 tokens."""
    model = tiny_model("llama", seed=4)
    modules = LookaheadModules.for_model(model, seed=0, n_lookahead=4) if name == "lookahead" else None
    layers = model.config.num_hidden_layers
    for length in range(1, 41):
        ids = random_ids(length, seed=length)
        expected = hf_greedy_tokens(model, ids, 3)
        for budget in (length, length + 5, 1.0, 4):
            options = dict(SHORT_OPTIONS.get(name, {}), budget=budget)
            if modules is not None:
                options["modules"] = modules
            tokens, stats, kept = generate_ids(model, ids, make_policy(name, **options), max_new_tokens=3)
            if budget == 4 and length > 4:
                if name == "full":
                    assert stats.kept_per_layer == [length] * layers
                elif name == "pyramidkv":
                    assert sum(stats.kept_per_layer) == 4 * layers and max(stats.kept_per_layer) <= length
                else:
                    assert stats.kept_per_layer == [4] * layers, (name, length)
                for layer in kept or []:
                    assert layer.min() >= 0 and layer.max() < length
                    assert all(len(set(row.tolist())) == row.numel() for row in layer)
                continue
            # a budget at or above the prompt (or the ratio 1.0) keeps the whole prompt: plain greedy decoding
            assert stats.kept_per_layer == [length] * layers, (name, length, budget)
            assert tokens == expected, (name, length, budget)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "laq"])
def test_smollm2_generate_hi_on_the_command_line(smollm2, method):
    result = invoke("generate", "--prompt", "hi", "--method", method, "--max-new-tokens", "4")
    assert result.exit_code == 0, (result.output, result.exception)
    stats = result.stderr.strip().splitlines()[-1]
    prompt_tokens = int(stats.split("prompt ")[1].split(" tok")[0])
    assert prompt_tokens <= 32  # the chat template alone is 31 tokens: under SnapKV's window
    assert f"kept/layer {prompt_tokens} " in stats  # the default budget (128) is above the prompt: all kept


# ----------------------------------------------------------------------------- 2. budgets


def test_budget_one_point_zero_is_the_whole_prompt_and_one_is_one_entry(tiny_folder):
    stats = {}
    for budget in ("1.0", "1", "0.5"):
        result = invoke("generate", "--model", str(tiny_folder), "--budget", budget, "--prompt", "Name three rivers of Europe.", "--max-new-tokens", "2", "--no-chat")
        assert result.exit_code == 0, (result.output, result.exception)
        stats[budget] = result.stderr.strip().splitlines()[-1]
    length = int(stats["1.0"].split("prompt ")[1].split(" tok")[0])
    assert length > 2
    assert f"kept/layer {length} " in stats["1.0"]
    assert "kept/layer 1 " in stats["1"]
    assert f"kept/layer {round(0.5 * length)} " in stats["0.5"]


@pytest.mark.parametrize("bad", ["0", "1.5", "-1", "abc", "nan", "0.0", "2.5"])
def test_one_budget_rule_and_message_for_generate_eval_and_bench(bad):
    from lookaheadkv.bench.common import budget_arg

    with pytest.raises(ValueError) as info:
        parse_budget(bad)
    message = str(info.value)
    assert "1.0 keeps the whole prompt" in message
    generate_line = one_error_line(invoke("generate", "--budget", bad, "--prompt", "hi"))
    eval_line = one_error_line(invoke("eval", "--out", "unused", "--budgets", f"64,{bad}", "--methods", "snapkv"))
    assert generate_line == eval_line == f"error: {message}"
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="1.0 keeps the whole prompt"):
        budget_arg(bad)


def test_parse_budget_reads_counts_and_ratios():
    assert parse_budget("1") == 1 and isinstance(parse_budget("1"), int)
    assert parse_budget("1.0") == 1.0 and isinstance(parse_budget("1.0"), float)
    assert parse_budget("128") == 128 and parse_budget(" 64 ") == 64 and parse_budget(128.0) == 128
    assert parse_budget("0.1") == 0.1 and parse_budget(0.25) == 0.25
    from lookaheadkv.engine.evict import resolve_budget

    assert resolve_budget(1.0, 37) == 37 and resolve_budget(1, 37) == 1


def test_eval_takes_ratio_budgets(tiny_folder, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "eval", "--model", str(tiny_folder), "--out", str(out), "--methods", "snapkv", "--budgets", "0.5,1.0",
        "--tasks", "niah_single_number", "--lengths", "200", "--samples", "1", "--threads", "1",
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    rows = {(r["method"], r["budget"]): r for r in read_records(out / "results.jsonl")}
    assert set(rows) == {("full", 0), ("snapkv", 0.5), ("snapkv", 1.0)}
    full = rows[("full", 0)]
    assert rows[("snapkv", 1.0)]["prediction"] == full["prediction"]  # the whole prompt kept: the full answer
    assert rows[("snapkv", 1.0)]["recall"] == pytest.approx(1.0, abs=1e-6)
    assert rows[("snapkv", 0.5)]["recall"] < 1.0


# ----------------------------------------------------------------------------- 3. eval resume, records


def test_append_after_a_cut_line_drops_it_and_never_glues(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    append_record(path, {"a": 1})
    with open(path, "ab") as f:
        f.write(b'{"a": 2, "b": "cut he')  # a write killed mid-line
    assert read_records(path) == [{"a": 1}]
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    append_record(path, {"a": 3})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "dropped a cut last line" in err[0]
    assert path.read_text() == '{"a": 1}\n{"a": 3}\n'


def test_a_record_that_only_lost_its_newline_is_kept(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    append_record(path, {"a": 3})
    assert "added it" in capsys.readouterr().err
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"a": 2}, {"a": 3}]


def eval_args(folder, out, methods="full,snapkv,streamingllm", budgets="8,16", samples="2"):
    return [
        "eval", "--model", str(folder), "--out", str(out), "--methods", methods, "--budgets", budgets,
        "--tasks", "niah_single_number,passage_qa", "--lengths", "256", "--samples", samples, "--threads", "1",
    ]  # fmt: skip


def stable(rows):
    return {(r["sample_id"], r["method"], r["budget"]): {k: v for k, v in r.items() if k not in ("seconds", "trace")} for r in rows}


def test_eval_killed_with_sigkill_mid_line_resumes_to_the_same_records(tiny_folder, tmp_path):
    """A real SIGKILL at a point chosen by the file's progress, then the last line cut in half (a kill
    inside a write), then a rerun: the same records as an uninterrupted run, none glued or lost."""
    straight = tmp_path / "straight"
    assert invoke(*eval_args(tiny_folder, straight, samples="3")).exit_code == 0
    expected = stable(read_records(straight / "results.jsonl"))
    assert len(expected) == 6 * (1 + 2 * 2)

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "lookaheadkv.cli", *eval_args(tiny_folder, killed, samples="3")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    results = killed / "results.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 7:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    data = results.read_bytes()
    if data.count(b"\n") >= len(expected):  # the run outpaced the kill (a loaded machine): cut it back by hand
        data = b"".join(line + b"\n" for line in data.splitlines()[:9])
    lines = data.count(b"\n")
    assert 7 <= lines < len(expected), "the kill should land part-way through the run"
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    results.write_bytes(data[: last + (len(data) - last) // 2].rstrip(b"\n"))  # the last record cut in half

    rerun = invoke(*eval_args(tiny_folder, killed, samples="3"))
    assert rerun.exit_code == 0, (rerun.output, rerun.exception)
    warnings = [line for line in rerun.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "cut last line" in warnings[0]
    raw = results.read_text().splitlines()
    assert all(json.loads(line) for line in raw)  # every line is one whole record
    assert len(raw) == len(expected)  # nothing recomputed twice, nothing lost
    assert stable(read_records(results)) == expected


def test_error_rows_are_retried_unless_kept_and_an_all_failed_method_exits_non_zero(tiny_folder, tmp_path, monkeypatch):
    from lookaheadkv.policies import StreamingLLM

    out = tmp_path / "run"
    original = StreamingLLM.scores

    def broken(self, model, prefill, observer):
        raise RuntimeError("boom")

    monkeypatch.setattr(StreamingLLM, "scores", broken)
    result = invoke(*eval_args(tiny_folder, out, samples="1"))
    one_error_line(result, "every record of streamingllm failed", "RuntimeError: boom", "rerun")
    rows = read_records(out / "results.jsonl")
    assert sum("error" in r for r in rows) == 2 * 2
    assert (out / "summary.md").exists()  # the other methods are still reported

    monkeypatch.setattr(StreamingLLM, "scores", original)
    kept = invoke(*eval_args(tiny_folder, out, samples="1"), "--keep-errors")
    one_error_line(kept, "every record of streamingllm failed")
    assert len(read_records(out / "results.jsonl")) == len(rows)  # nothing retried

    retried = invoke(*eval_args(tiny_folder, out, samples="1"))
    assert retried.exit_code == 0, (retried.output, retried.exception)
    rows = read_records(out / "results.jsonl")
    fresh = tmp_path / "fresh"
    assert invoke(*eval_args(tiny_folder, fresh, samples="1")).exit_code == 0
    from lookaheadkv.evaluation.runner import latest_results

    assert stable(latest_results(rows)) == stable(read_records(fresh / "results.jsonl"))


def test_eval_with_unusable_modules_fails_before_running(tiny_folder, tmp_path):
    other = tiny_model("llama", hidden_size=96)
    mods = LookaheadModules.for_model(other, n_lookahead=4).save_pretrained(tmp_path / "mods")
    out = tmp_path / "run"
    result = invoke(*eval_args(tiny_folder, out, methods="full,lookahead"), "--modules", str(mods))
    one_error_line(result, "hidden_size=96")
    assert not (out / "results.jsonl").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    one_error_line(invoke(*eval_args(tiny_folder, out, methods="lookahead"), "--modules", str(broken)), "not valid JSON")
    # a model with no shipped modules and no --modules: also before any sample runs
    one_error_line(invoke(*eval_args(tiny_folder, out, methods="lookahead")), "needs trained modules")
    assert not (out / "results.jsonl").exists()


# ----------------------------------------------------------------------------- 4. OS errors, damaged files, Ctrl-C


def test_out_is_a_file_or_under_a_file(tiny_folder, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_error_line(invoke(*eval_args(tiny_folder, afile)), "is a file")
    one_error_line(invoke(*eval_args(tiny_folder, afile / "sub")), "is a file")
    one_error_line(invoke("demo", "--out", str(afile)), "is a file")


def test_read_only_place(tiny_folder, tmp_path, monkeypatch):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        one_error_line(invoke(*eval_args(tiny_folder, ro / "run")), "cannot write", "permission denied")
        ro.chmod(0o700)
    # Also when the OS refuses later (root ignores permission bits): a PermissionError from the write itself
    from lookaheadkv import records

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "results.jsonl"))

    monkeypatch.setattr(records.os, "open", refused)
    one_error_line(invoke(*eval_args(tiny_folder, tmp_path / "run", samples="1")), "Permission denied", "results.jsonl", "choose a place you can write to")


def test_a_folder_where_a_file_should_be(tmp_path):
    folder = tmp_path / "prompt.txt"
    folder.mkdir()
    one_error_line(invoke("generate", "--prompt-file", str(folder)), "prompt file not found")


def test_damaged_model_folders(tiny_folder, tmp_path):
    import shutil

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_folder, no_weights)
    (no_weights / "model.safetensors").unlink()
    one_error_line(invoke("generate", "--model", str(no_weights), "--prompt", "hi"), "no weights")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_folder, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_error_line(invoke("generate", "--model", str(truncated), "--prompt", "hi"), "truncated or damaged")
    garbage = tmp_path / "garbage"
    shutil.copytree(tiny_folder, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 100)
    one_error_line(invoke("generate", "--model", str(garbage), "--prompt", "hi"), "truncated or damaged")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch):
    import lookaheadkv.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lookaheadkv.models, "load_model", interrupted)
    result = invoke("generate", "--prompt", "hi")
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == ["interrupted (Ctrl-C); rerun the same command to resume where it applies"]


@pytest.mark.parametrize("delay", [0.3, 0.6, 1.0, 2.0, 3.0])
def test_sigint_in_the_first_seconds(tmp_path, delay):
    """Wherever the Ctrl-C lands (imports, typer's parsing, dataclasses built by ``exec`` inside
    transformers, loading, decoding), the command ends in one line and exit 130, never in a
    traceback or a death by SIGINT (-2)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lookaheadkv.cli", "generate", "--prompt", "hi", "--max-new-tokens", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    if proc.returncode == 0:  # finished before the signal: nothing to check
        pytest.skip("the command finished before the signal")
    assert proc.returncode == 130, err.decode()
    assert len(lines) == 1 and lines[0].startswith("interrupted"), lines


# ----------------------------------------------------------------------------- API misuse


@pytest.fixture(scope="module")
def small(smollm2):
    _, tokenizer = smollm2
    return tiny_for_tokenizer(tokenizer, seed=1), tokenizer


def test_api_misuse_raises_clear_errors(small):
    model, tokenizer = small
    with pytest.raises(TypeError, match="prompt must be a str.*once per prompt"):
        generate(model, tokenizer, ["hi", "there"])
    with pytest.raises(TypeError, match=r"string 'snapkv'.*make_policy\('snapkv'"):
        generate(model, tokenizer, "hi", policy="snapkv")
    with pytest.raises(TypeError, match=r"class SnapKV: instantiate it"):
        generate(model, tokenizer, "hi", policy=SnapKV)
    with pytest.raises(TypeError, match="Policy instance"):
        generate(model, tokenizer, "hi", policy=42)
    for bad in (float("nan"), -0.5, float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            generate(model, tokenizer, "hi", SnapKV(budget=8), temperature=bad)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tokenizer, "hi", SnapKV(budget=8), temperature=1.0, top_p=float("nan"))
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=rf"token id {vocab} is outside the model's vocabulary \[0, {vocab}\)"):
        generate_ids(model, torch.tensor([[5, vocab]]), SnapKV(budget=8))
    with pytest.raises(ValueError, match="token id -1"):
        generate_ids(model, torch.tensor([[5, -1]]), SnapKV(budget=8))
    with pytest.raises(TypeError, match=r"torch.tensor\(\[ids\]\)"):
        generate_ids(model, [[5, 6]], SnapKV(budget=8))
    with pytest.raises(TypeError, match="integer token ids"):
        generate_ids(model, torch.tensor([[5.0, 6.0]]), SnapKV(budget=8))
    with pytest.raises(ValueError, match="budget must be a number, got the string"):
        SnapKV(budget="0.5")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(model, torch.tensor([[5, 6]]), SnapKV(budget=8), max_new_tokens=2.5)


def test_index_ranges_are_read_once_for_data_build_and_cut(capsys):
    import typer

    from lookaheadkv.cli import parse_index_range

    assert parse_index_range(None, 40) == (0, 40)
    assert parse_index_range("8-20", 40) == (8, 20)
    for bad in ("20-8", "5-5", "-1-4", "a-b", "7"):
        with pytest.raises(typer.Exit) as exit_:
            parse_index_range(bad, 40)
        assert exit_.value.exit_code == 2
        assert capsys.readouterr().err.startswith("error: --range takes FIRST-END")


def test_data_build_only_some_sources_keeps_every_index(tiny_folder, tmp_path):
    """``--only`` builds one source's prompts at the indices a full build gives them: the later
    run without it builds the rest and leaves the first files byte for byte as they were."""
    from safetensors import safe_open

    out = tmp_path / "data"
    args = ["data", "build", "--model", str(tiny_folder), "--out", str(out), "--source", "synthetic=3,fewshot=3",
            "--lengths", "512,700", "--max-new-tokens", "2", "--threads", "1"]  # fmt: skip
    one_error_line(invoke(*args, "--only", "essays"), "--only takes names among", "fewshot, synthetic")
    assert invoke(*args, "--only", "fewshot").exit_code == 0

    def sources(folder):
        found = {}
        for path in sorted((folder / "samples").glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                found[path.name] = f.metadata()["source"]
        return found

    first = sources(out)
    assert sorted(first.values()) == ["fewshot"] * 3
    kept = {name: (out / "samples" / name).read_bytes() for name in first}
    assert invoke(*args).exit_code == 0
    everything = sources(out)
    assert sorted(everything.values()) == ["fewshot"] * 3 + ["synthetic"] * 3
    assert {name: everything[name] for name in first} == first
    assert all((out / "samples" / name).read_bytes() == data for name, data in kept.items())
