"""LongBench: tables, loading from fixture JSONL, prompt formatting, truncation, scoring."""

import json
import sys
import types

import pytest

from lookaheadkv.evaluation.longbench import (
    DATASET2GROUP,
    DATASET2MAXLEN,
    DATASET2METRIC,
    DATASET2PROMPT,
    LONGBENCH_TASKS,
    RAW_PROMPT_TASKS,
    format_prompt,
    load_longbench,
    truncate_middle,
)
from lookaheadkv.evaluation.metrics import LONGBENCH_SCORERS
from lookaheadkv.evaluation.metrics import score_sample

TREC_CLASSES = ["Individual", "City", "Country", "Date", "Abbreviation", "Expression abbreviated"]
RECORDS = {
    "hotpotqa": [
        {
            "input": "Which city is the capital of France?",
            "context": "Passage 1:\nParis is the capital of France.\nPassage 2:\nBerlin is the capital of Germany.",
            "answers": ["Paris"],
            "length": 16,
            "dataset": "hotpotqa",
            "language": "en",
            "all_classes": None,
            "_id": "h1",
        },
        {
            "input": "Which river flows through Berlin?",
            "context": "Passage 1:\nThe Spree flows through Berlin.",
            "answers": ["Spree", "the Spree river"],
            "length": 7,
            "dataset": "hotpotqa",
            "language": "en",
            "all_classes": None,
            "_id": "h2",
        },
    ],
    "trec": [
        {
            "input": "Question: What is the capital of Peru?\nType:",
            "context": "Question: Who wrote Hamlet?\nType: Individual\nQuestion: Where is Lima?\nType: City\n",
            "answers": ["City"],
            "length": 20,
            "dataset": "trec",
            "language": "en",
            "all_classes": TREC_CLASSES,
            "_id": "t1",
        }
    ],
    "passage_retrieval_en": [
        {
            "input": "An abstract about rivers.",
            "context": "Paragraph 1: Mountains are tall.\n\nParagraph 2: Rivers flow to the sea.",
            "answers": ["Paragraph 2"],
            "length": 12,
            "dataset": "passage_retrieval_en",
            "language": "en",
            "all_classes": None,
            "_id": "p1",
        }
    ],
    "lcc": [
        {
            "input": "",
            "context": "def add(a, b):\n",
            "answers": ["    return a + b"],
            "length": 4,
            "dataset": "lcc",
            "language": "python",
            "all_classes": None,
            "_id": "c1",
        }
    ],
    "gov_report": [
        {
            "input": "",
            "context": " ".join(f"w{i}" for i in range(3000)),
            "answers": ["A summary."],
            "length": 3000,
            "dataset": "gov_report",
            "language": "en",
            "all_classes": None,
            "_id": "g1",
        }
    ],
}


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    """The bundled SmolLM2-135M-Instruct tokenizer (``smollm2`` is conftest's ``(model, tokenizer)``)."""
    return smollm2[1]


@pytest.fixture
def data_dir(tmp_path):
    for task, records in RECORDS.items():
        lines = "\n".join(json.dumps(r) for r in records) + "\n"
        (tmp_path / f"{task}.jsonl").write_text(lines, encoding="utf-8")
    return tmp_path


def test_tables_cover_the_16_english_tasks():
    assert len(LONGBENCH_TASKS) == 16
    for table in (DATASET2PROMPT, DATASET2MAXLEN, DATASET2METRIC, DATASET2GROUP):
        assert set(table) == set(LONGBENCH_TASKS)
    assert set(DATASET2METRIC.values()) <= set(LONGBENCH_SCORERS)
    assert all("{context}" in template for template in DATASET2PROMPT.values())
    assert RAW_PROMPT_TASKS == {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
    assert DATASET2MAXLEN["gov_report"] == 512 and DATASET2MAXLEN["hotpotqa"] == 32
    assert DATASET2GROUP["repobench-p"] == "code" and DATASET2GROUP["trec"] == "few_shot"


def test_load_from_data_dir_without_tokenizer(data_dir):
    samples = load_longbench("hotpotqa", data_dir=data_dir)
    assert [s.id for s in samples] == ["longbench/hotpotqa/h1", "longbench/hotpotqa/h2"]
    s = samples[0]
    assert (s.task, s.group, s.split, s.metric) == ("hotpotqa", "multi_doc_qa", "test", "qa_f1_score")
    assert s.answers == ["Paris"] and s.max_new_tokens == 32
    assert s.prompt_ids is None and s.n_tokens == 0
    expected = (
        "Answer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nThe following are given passages.\nPassage 1:\nParis is the capital of France."
        "\nPassage 2:\nBerlin is the capital of Germany.\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: Which city is the capital "
        "of France?\nAnswer:"
    )
    assert s.messages == [{"role": "user", "content": expected}]
    assert len(load_longbench("hotpotqa", data_dir=data_dir, limit=1)) == 1


def test_prompt_formatting_code_tasks():
    record = RECORDS["lcc"][0]
    assert format_prompt("lcc", record) == "Please complete the code given below. \ndef add(a, b):\nNext line of code:\n"
    repo = dict(record, input="# file: add.py\n")
    assert format_prompt("repobench-p", repo).endswith("def add(a, b):\n# file: add.py\nNext line of code:\n")


def test_chat_template_except_raw_tasks(data_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    chat = load_longbench("hotpotqa", data_dir=data_dir, tokenizer=tok)[0]
    text = tok.decode(chat.prompt_ids)
    assert text.startswith("<|im_start|>system") and text.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    assert chat.meta["chat"] and chat.n_tokens == len(chat.prompt_ids)
    for task in ("trec", "lcc"):
        raw = load_longbench(task, data_dir=data_dir, tokenizer=tok)[0]
        assert raw.prompt_ids == tok(raw.messages[0]["content"])["input_ids"]
        assert not raw.meta["chat"] and "<|im_start|>" not in tok.decode(raw.prompt_ids)


def test_middle_truncation(data_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    s = load_longbench("gov_report", data_dir=data_dir, tokenizer=tok, max_length=256)[0]
    prompt = s.messages[0]["content"]
    assert prompt.startswith("You are given a report by a government agency.")
    assert prompt.endswith("Now, write a one-page summary of the report.\n\nSummary:")
    assert " w5 " in prompt and " w2995 " in prompt and " w1500 " not in prompt
    assert abs(len(tok(prompt, add_special_tokens=False)["input_ids"]) - 256) <= 4
    assert s.target_tokens == 256 and s.n_tokens < 300  # plus the chat template
    # the head and the tail are the first and last 128 tokens
    full = format_prompt("gov_report", RECORDS["gov_report"][0])
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert truncate_middle(tok, full, 256) == tok.decode(ids[:128]) + tok.decode(ids[-128:])
    assert truncate_middle(tok, "short prompt", 256) == "short prompt"


def test_max_length_needs_tokenizer(data_dir):
    with pytest.raises(ValueError):
        load_longbench("hotpotqa", data_dir=data_dir, max_length=128)


def test_scoring_rules(data_dir):
    hotpot = load_longbench("hotpotqa", data_dir=data_dir)
    assert score_sample(hotpot[0], "Paris.") == {"score": 1.0, "graded": 1.0}
    # max over references: "The Spree river" matches the second reference exactly -> 1
    assert score_sample(hotpot[1], "The Spree river")["score"] == 1.0
    # "Spree in Berlin" -> [spree, in, berlin]; vs [spree]: P = 1/3, R = 1 -> F1 = 0.5;
    # vs [spree, river]: P = 1/3, R = 1/2 -> F1 = 0.4; the max is 0.5
    assert score_sample(hotpot[1], "Spree in Berlin")["score"] == pytest.approx(0.5)

    trec = load_longbench("trec", data_dir=data_dir)[0]
    assert trec.meta["all_classes"] == TREC_CLASSES and trec.meta["first_line_only"]
    assert score_sample(trec, "City\nQuestion: Who?\nType: Individual")["score"] == 1.0
    assert score_sample(trec, "Individual\nCity")["score"] == 0.0  # only the first line counts
    assert score_sample(trec, "City or Country")["score"] == 0.5

    retrieval = load_longbench("passage_retrieval_en", data_dir=data_dir)[0]
    assert score_sample(retrieval, "Paragraph 2")["score"] == 1.0
    assert score_sample(retrieval, "Paragraph 1")["score"] == 0.0

    lcc = load_longbench("lcc", data_dir=data_dir)[0]
    assert score_sample(lcc, "```python\n    return a + b\n```")["score"] == 1.0
    # "    return a - b" vs "    return a + b": 16 + 16 characters, LCS 15 -> 30/32 = 0.9375 -> 0.94
    assert score_sample(lcc, "    return a - b")["score"] == pytest.approx(0.94)


def test_hub_loading_paths(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_longbench("hotpotqa")

    def unreachable(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(RuntimeError, match="data_dir"):
        load_longbench("hotpotqa")

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return RECORDS["hotpotqa"]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    samples = load_longbench("hotpotqa")
    assert calls == [("THUDM/LongBench", "hotpotqa", "test")] and len(samples) == 2


def test_unknown_task():
    with pytest.raises(KeyError):
        load_longbench("lsht")
