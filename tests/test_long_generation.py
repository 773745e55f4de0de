"""benchmarks/long_generation.py end to end at a tiny shape, and the long-answer prompts of lookaheadkv.tasks.longgen."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from helpers import single_thread, tiny_for_tokenizer  # noqa: F401  (single_thread is an autouse fixture)
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.records import read_records
from lookaheadkv.tasks.longgen import LONG_TASKS, make_long_sample

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "long_generation.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmarks_long_generation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", LONG_TASKS)
def test_long_prompts_fit_2k_tokens_and_are_checkable_where_promised(smollm2, task):
    _, tokenizer = smollm2
    sample = make_long_sample(task, tokenizer, 2048, seed=0, index=1)
    assert abs(sample.n_tokens - 2048) <= 0.05 * 2048 and sample.split == "eval"
    text = sample.messages[-1]["content"]
    if task in ("long_extraction", "long_arithmetic"):
        assert sample.metric == "all" and len(sample.answers) >= 24
        if task == "long_extraction":
            assert all(value in text for value in sample.answers)
    else:
        assert sample.metric == "fidelity" and sample.answers == []
    assert make_long_sample(task, tokenizer, 2048, seed=0, index=1).prompt_ids == sample.prompt_ids  # deterministic
    chat = tokenizer.apply_chat_template(sample.messages, add_generation_prompt=True, tokenize=False)
    if task == "long_arithmetic":  # a few-shot completion prompt: the raw text, no chat turns
        assert sample.prompt_ids == tokenizer(text)["input_ids"] and sample.meta["chat"] is False
    else:
        assert sample.prompt_ids == tokenizer(chat, add_special_tokens=False)["input_ids"] and sample.meta["chat"] is True


def test_long_generation_script_at_a_tiny_shape(smollm2, tmp_path):
    model_dir, modules_dir, out = tmp_path / "tiny", tmp_path / "modules", tmp_path / "out"
    _, tokenizer = smollm2
    model = tiny_for_tokenizer(tokenizer, seed=4, max_position_embeddings=2048)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    LookaheadModules.for_model(model, seed=1, n_lookahead=4).save_pretrained(modules_dir)
    script = load_script()
    argv = [
        "--out", str(out), "--model", str(model_dir), "--modules", str(modules_dir), "--methods", "lookahead,h2o,tova",
        "--decode-budgets", "24,48", "--prompts-per-task", "1", "--length", "1024", "--max-new-tokens", "40",
        "--interval", "8", "--recent", "4",
    ]  # fmt: skip
    text = script.main(argv)
    rows = read_records(out / "results.jsonl")
    assert len(rows) == 4 * (1 + 3 * 2)
    for row in rows:
        if row["method"] == "full":
            assert row["entries"][-1] == row["prompt_tokens"] + row["new_tokens"] - 1
            continue
        assert 0 <= row["f1"] <= 1 and 0 <= row["rouge_l"] <= 1
        assert max(row["entries"]) <= row["decode_budget"] + 8 and row["entries"][0] <= row["decode_budget"]
        if row["new_tokens"] == 40:
            assert row["rescorings"] and all(s > 0 and i > 0 for _, s, i in row["rescorings"])
        assert (row["task_score"] is None) == (row["task"] not in ("long_extraction", "long_arithmetic"))
    assert "| lookahead | 24 | 4 |" in text and "share of the interval's decoding" in text
    assert (out / "memory.png").stat().st_size > 0 and (out / "report.md").read_text() == text
    script.main(argv)  # resumes: nothing left to do
    assert len(read_records(out / "results.jsonl")) == len(rows)


def test_long_generation_batched_equals_one_at_a_time(smollm2, tmp_path):
    """The default (all rows of a prompt as one batch) writes the rows --no-batch writes: texts, entries, re-scoring steps."""
    model_dir, modules_dir = tmp_path / "tiny", tmp_path / "modules"
    _, tokenizer = smollm2
    model = tiny_for_tokenizer(tokenizer, seed=5, max_position_embeddings=2048)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    LookaheadModules.for_model(model, seed=2, n_lookahead=4).save_pretrained(modules_dir)
    script = load_script()
    argv = [
        "--model", str(model_dir), "--modules", str(modules_dir), "--methods", "lookahead,snapkv,h2o,streamingllm,random",
        "--decode-budgets", "16,40,2000", "--prompts-per-task", "1", "--tasks", "long_arithmetic,long_summary", "--length", "1024",
        "--max-new-tokens", "36", "--interval", "6", "--recent", "4",
    ]  # fmt: skip
    script.main(["--out", str(tmp_path / "batched"), *argv])
    script.main(["--out", str(tmp_path / "alone"), "--no-batch", *argv])
    batched, alone = (read_records(tmp_path / d / "results.jsonl") for d in ("batched", "alone"))
    assert len(batched) == len(alone) == 2 * (1 + 5 * 3)
    key = lambda r: (r["id"], r["method"], r["decode_budget"])  # noqa: E731
    for b, a in zip(sorted(batched, key=key), sorted(alone, key=key)):
        assert key(b) == key(a)
        assert (b["text"], b["new_tokens"], b["entries"]) == (a["text"], a["new_tokens"], a["entries"]), key(b)
        assert [r[0] for r in b["rescorings"]] == [r[0] for r in a["rescorings"]], key(b)
        assert b["batch_rows"] == (1 if b["method"] == "full" else 15) and a["batch_rows"] == 1
    assert any(r["rescorings"] for r in batched) and not any(r["rescorings"] for r in batched if r["decode_budget"] == 2000)


def test_shards_split_the_prompts_and_merge_back(smollm2, tmp_path):
    from lookaheadkv.records import append_record

    script = load_script()
    _, tokenizer = smollm2
    samples = [make_long_sample(t, tokenizer, 1024, seed=0, index=i, max_new_tokens=4) for i in range(3) for t in ("long_summary", "long_continuation")]
    parts = [script.in_shard(samples, f"{i}/2") for i in range(2)]
    assert sorted(s.id for p in parts for s in p) == sorted(s.id for s in samples) and not {s.id for s in parts[0]} & {s.id for s in parts[1]}
    assert {s.id.rsplit("/", 1)[1] for s in parts[1]} == {"1"}  # balanced over the tasks, not by task
    with pytest.raises(SystemExit, match="--shard takes i/n"):
        script.in_shard(samples, "2/2")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    row = {"id": "x/0", "method": "full", "decode_budget": 0}
    append_record(a / "results.jsonl", row)
    append_record(b / "results.jsonl", row)
    append_record(b / "results.jsonl", {**row, "id": "x/1"})
    assert script.merge_shards(a, [b]) == 1 and [r["id"] for r in read_records(a / "results.jsonl")] == ["x/0", "x/1"]
