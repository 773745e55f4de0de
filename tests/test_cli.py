"""The ``lookaheadkv`` command line: help, one-line errors with exit code 2, one real generate run.

The runs use a tiny random Llama saved with the bundled SmolLM2 tokenizer into a temporary folder
(``--model FOLDER``), so nothing here loads a large model.
"""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from helpers import single_thread, tiny_for_tokenizer  # noqa: F401  (single_thread is an autouse fixture)
from lookaheadkv.cli import app, main
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.policies import REGISTRY

CONTEXT = 128
LONG_PROMPT = "The river keeps moving past the old mill while the town sleeps. " * 30


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2):
    """A tiny Llama (context 128) with the SmolLM2 tokenizer, saved as a model folder."""
    _, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_for_tokenizer(tokenizer, seed=3, max_position_embeddings=CONTEXT)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).save_pretrained(folder)
    return folder


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def error_line(stderr: str) -> str:
    """The one 'error: ...' line, which must be the last line of stderr (progress bars of
    Hugging Face's weight loading may come before it)."""
    lines = [line for line in stderr.replace("\r", "\n").strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def assert_user_error(result, *needles: str) -> None:
    """Exit code 2, one line on stderr starting with 'error: ', no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    line = error_line(result.stderr)
    assert line.startswith("error: "), line
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"


# ----------------------------------------------------------------------------- help, methods


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "generate" in result.stdout and "methods" in result.stdout
    result = invoke("generate", "--help")
    assert result.exit_code == 0
    for option in ("--method", "--budget", "--prompt", "--prompt-file", "--model", "--modules", "--max-new-tokens"):
        assert option in result.stdout


def test_methods_lists_every_registered_method():
    result = invoke("methods")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.strip().splitlines()]
    assert sorted(names) == sorted(REGISTRY)
    snap = next(line for line in result.stdout.splitlines() if line.startswith("snapkv "))
    assert "window=32" in snap and "kernel=7" in snap


def test_main_entry_point_exits_2_with_one_line(monkeypatch, capsys):
    """``main()`` is what the installed ``lookaheadkv`` script (and ``python -m lookaheadkv.cli``) runs."""
    monkeypatch.setattr(sys, "argv", ["lookaheadkv", "generate", "--method", "nope", "--prompt", "hi"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: unknown method 'nope'; choose from: {', '.join(sorted(REGISTRY))}"]


# ----------------------------------------------------------------------------- user errors


def test_unknown_method():
    assert_user_error(invoke("generate", "--method", "snapkvv", "--prompt", "hi"), "unknown method 'snapkvv'", "snapkv")


@pytest.mark.parametrize("budget", ["0", "-3", "0.0", "abc", "1.5", "-0.5"])
def test_bad_budget(budget):
    assert_user_error(invoke("generate", "--budget", budget, "--prompt", "hi"), "budget", budget)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(prompt):
    assert_user_error(invoke("generate", "--prompt", prompt), "the prompt is empty")


def test_empty_prompt_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    assert_user_error(invoke("generate", "--prompt-file", str(path)), "the prompt is empty")


def test_missing_prompt_file(tmp_path):
    missing = tmp_path / "nope.txt"
    assert_user_error(invoke("generate", "--prompt-file", str(missing)), "prompt file not found", "nope.txt")


def test_prompt_and_prompt_file_are_exclusive(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello")
    assert_user_error(invoke("generate", "--prompt", "hi", "--prompt-file", str(path)), "exactly one of")
    assert_user_error(invoke("generate"), "exactly one of")


def test_modules_with_another_method():
    assert_user_error(invoke("generate", "--method", "snapkv", "--modules", "x", "--prompt", "hi"), "--modules only applies")


def test_prompt_longer_than_the_context(tiny_folder, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text(LONG_PROMPT)
    result = invoke("generate", "--model", str(tiny_folder), "--prompt-file", str(path), "--budget", "16")
    assert_user_error(result, f"context of {CONTEXT}", "tokens")


def test_unsupported_model(gpt2_folder):
    result = invoke("generate", "--model", str(gpt2_folder), "--prompt", "hi")
    assert_user_error(result, "'gpt2' is not supported", "llama")


def test_missing_model_folder(tmp_path):
    result = invoke("generate", "--model", str(tmp_path / "no-such-model"), "--prompt", "hi")
    assert_user_error(result, "not found")


def test_lookahead_without_modules_for_a_custom_model(tiny_folder):
    result = invoke("generate", "--model", str(tiny_folder), "--method", "lookahead", "--prompt", "hi", "--budget", "8")
    assert_user_error(result, "needs trained modules")


def test_lookahead_modules_for_another_model(tiny_folder, tmp_path):
    from lookaheadkv.models import tiny_model

    other = tiny_model("llama", hidden_size=96)
    folder = LookaheadModules.for_model(other, n_lookahead=4).save_pretrained(tmp_path / "mods")
    result = invoke(
        "generate", "--model", str(tiny_folder), "--method", "lookahead", "--modules", str(folder), "--prompt", "hi"
    )
    assert_user_error(result, "made for a model with hidden_size=96", "this model has hidden_size=64")


# ----------------------------------------------------------------------------- successful runs


def test_generate_prints_the_answer_and_a_stats_line(tiny_folder):
    result = invoke(
        "generate", "--model", str(tiny_folder), "--method", "snapkv", "--budget", "16",
        "--prompt", "Name three rivers.", "--max-new-tokens", "5",
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    stats = result.stderr.strip().splitlines()[-1]
    assert stats.startswith("[snapkv budget=16]")
    assert "kept/layer 16" in stats
    assert "decode 5 tok" in stats  # the tiny model's eos is never drawn in 5 greedy steps
    assert "lookahead rows" not in stats  # SnapKV adds no rows to the prefill


def test_generate_with_trained_style_modules(tiny_folder, tmp_path):
    from lookaheadkv.models import load_model

    model, _ = load_model(tiny_folder)
    folder = LookaheadModules.for_model(model, n_lookahead=4).save_pretrained(tmp_path / "mods")
    result = invoke(
        "generate", "--model", str(tiny_folder), "--method", "lookahead", "--modules", str(folder),
        "--budget", "0.5", "--prompt", "Name three rivers.", "--max-new-tokens", "3", "--no-chat",
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    stats = result.stderr.strip().splitlines()[-1]
    prompt_tokens = int(stats.split("prompt ")[1].split(" tok")[0])
    assert f"kept/layer {round(0.5 * prompt_tokens)} " in stats
    assert "prefill" in stats and "(with 4 lookahead rows)" in stats  # the modules' 4 tokens ran inside the prefill
