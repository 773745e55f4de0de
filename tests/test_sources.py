"""Training prompt sources: rendering, offline sources, the essay split and the hub loaders."""

import json
import re
import sys
from collections import Counter

import pytest

from lookaheadkv.models import load_essays
from lookaheadkv.training.hub import HUB_SOURCES, PAPER_MIXTURE, hub_mixture, load_source
from lookaheadkv.training.sources import (
    ESSAY_TASKS,
    FEWSHOT_KINDS,
    TRAIN_ESSAYS,
    Prompt,
    essay_prompts,
    fewshot_prompts,
    is_train_essay,
    mixture,
    render,
    strip_final_assistant,
    synthetic_prompts,
    truncate_middle,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


def content(prompt: Prompt) -> str:
    return "\n".join(m["content"] for m in prompt.messages)


def assert_no_final_answer(prompts):
    assert prompts
    for prompt in prompts:
        assert prompt.messages and prompt.messages[-1]["role"] != "assistant"


# --------------------------------------------------------------------------- rendering


def test_render_applies_the_chat_template_with_a_generation_prompt(tokenizer):
    ids = render(Prompt("p", "test", [{"role": "user", "content": "Hello there"}]), tokenizer)
    assert all(type(t) is int for t in ids)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert "Hello there" in tokenizer.decode(ids)


def test_render_truncates_middle_out(tokenizer):
    prompt = Prompt("p", "test", [{"role": "user", "content": "word " * 300}])
    full = render(prompt, tokenizer)
    cut = render(prompt, tokenizer, max_tokens=101)
    assert len(full) > 101 and cut == full[:50] + full[-51:]
    assert render(prompt, tokenizer, max_tokens=10_000) == full


def test_truncate_middle_rejects_non_positive_limits():
    assert truncate_middle([1, 2, 3], None) == [1, 2, 3]
    with pytest.raises(ValueError, match="positive"):
        truncate_middle([1, 2, 3], 0)


def test_render_without_chat_template_uses_plain_text(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    ids = render(Prompt("p", "test", [{"role": "user", "content": "hi"}]), tokenizer)
    assert ids == tokenizer("user: hi\n\nassistant:")["input_ids"]


def test_strip_final_assistant_keeps_earlier_turns():
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert strip_final_assistant(messages) == messages[:3]
    assert len(messages) == 4


# --------------------------------------------------------------------------- essay split


def test_train_essays_follow_the_hash_rule_and_halve_the_essays():
    names = [name for name, _ in load_essays()]
    assert len(names) == 49
    assert tuple(n for n in names if is_train_essay(n)) == TRAIN_ESSAYS
    assert len(TRAIN_ESSAYS) == 28
    assert is_train_essay("apple.txt") and is_train_essay("/x/apple.txt") and not is_train_essay("addiction")


def eval_sentences() -> list[str]:
    """Long, distinctive sentences of the evaluation-half essays."""
    text = " ".join(" ".join(t.split()) for n, t in load_essays() if not is_train_essay(n))
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 80]


def test_essay_prompts_only_quote_training_essays(tokenizer):
    prompts = essay_prompts(tokenizer, 16, lengths=(1024, 2048), seed=5)
    text = "\n".join(content(p) for p in prompts)
    assert not [s for s in eval_sentences() if s in text]
    train = " ".join(" ".join(t.split()) for n, t in load_essays() if is_train_essay(n))
    assert sum(s in train for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 80) > 20


def test_training_essays_are_disjoint_from_the_eval_suite():
    text_module = pytest.importorskip("lookaheadkv.tasks.text")
    eval_texts = set(text_module.split_pools("eval").essays)
    eval_names = [n for n, t in load_essays() if text_module.clean_text(t) in eval_texts]
    assert eval_names, "the eval suite's essays should be recognisable by their text"
    assert not [n for n in eval_names if is_train_essay(n)], "eval-suite essays must be those not is_train_essay"


# --------------------------------------------------------------------------- essays


@pytest.mark.parametrize("target", [512, 1500, 4096])
def test_essay_prompts_hit_the_token_target(tokenizer, target):
    for prompt in essay_prompts(tokenizer, 4, lengths=(target, target), seed=1):
        assert abs(len(render(prompt, tokenizer)) - target) <= max(8, 0.02 * target), prompt.id


def test_essay_prompts_are_deterministic_per_seed_and_index(tokenizer):
    first = essay_prompts(tokenizer, 6, lengths=(512, 1024), seed=3)
    assert first == essay_prompts(tokenizer, 6, lengths=(512, 1024), seed=3)
    assert first[:3] == essay_prompts(tokenizer, 3, lengths=(512, 1024), seed=3)
    assert first != essay_prompts(tokenizer, 6, lengths=(512, 1024), seed=4)
    assert len({p.id for p in first}) == 6


def test_essay_prompts_cover_every_task_and_quote_their_own_passage(tokenizer):
    prompts = essay_prompts(tokenizer, 40, lengths=(512, 768), seed=0)
    assert_no_final_answer(prompts)
    assert Counter(p.id.split(":")[1] for p in prompts).keys() == ESSAY_TASKS.keys()
    quoting = re.compile(r'(?:mean by|comes right after|author write) "(.+?)"(?:\?| in the passage)')
    quotes = [(p, m.group(1)) for p in prompts if (m := quoting.search(content(p)))]
    assert quotes
    for prompt, quote in quotes:
        assert content(prompt).count(quote) >= 2, f"{prompt.id}: quoted sentence not in its passage"


# --------------------------------------------------------------------------- few-shot


@pytest.mark.parametrize("target", [512, 2048])
def test_fewshot_prompts_fill_the_target_with_whole_shots(tokenizer, target):
    prompts = fewshot_prompts(tokenizer, 9, lengths=(target, target), seed=2)
    assert_no_final_answer(prompts)
    assert {p.id.split(":")[1] for p in prompts} == FEWSHOT_KINDS.keys()
    for prompt in prompts:
        instruction, *shots, query = content(prompt).split("\n\n")
        assert shots and all(re.search(r"\nAnswer: \S", shot) for shot in shots)
        assert query.endswith("\nAnswer:")
        assert target - 256 < len(render(prompt, tokenizer)) <= target, prompt.id


def test_fewshot_prompts_are_deterministic(tokenizer):
    assert fewshot_prompts(tokenizer, 4, seed=7) == fewshot_prompts(tokenizer, 4, seed=7)
    assert fewshot_prompts(tokenizer, 4, seed=7) != fewshot_prompts(tokenizer, 4, seed=8)


# --------------------------------------------------------------------------- synthetic and mixture


def test_synthetic_source_refuses_the_eval_split(tokenizer):
    with pytest.raises(ValueError, match="split='train'"):
        synthetic_prompts(tokenizer, 1, split="eval")


def test_synthetic_prompts_come_from_the_train_split(tokenizer):
    pytest.importorskip("lookaheadkv.tasks", reason="the evaluation suite is not written yet")
    prompts = synthetic_prompts(tokenizer, 4, lengths=(512, 1024), seed=0)
    assert prompts == synthetic_prompts(tokenizer, 4, lengths=(512, 1024), seed=0)
    assert_no_final_answer(prompts)
    assert all(p.source == "synthetic" and p.id.startswith("synthetic:") for p in prompts)
    assert all(480 <= len(render(p, tokenizer)) <= 1080 for p in prompts)


def test_mixture_is_deterministic_and_sized(tokenizer):
    sizes = {"essays": 5, "fewshot": 4}
    prompts = mixture(tokenizer, sizes, lengths=(512, 1024), seed=9)
    assert prompts == mixture(tokenizer, sizes, lengths=(512, 1024), seed=9)
    assert Counter(p.source for p in prompts) == sizes
    assert len({p.id for p in prompts}) == 9
    assert all(len(render(p, tokenizer)) <= 1024 + 8 for p in prompts)
    with pytest.raises(ValueError, match="unknown offline sources"):
        mixture(tokenizer, {"wikipedia": 1})


# --------------------------------------------------------------------------- hub loaders on local fixtures


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHATQA2_RECORDS = [
    {  # long_sft layout: a System/User/Assistant transcript in "question"
        "question": "System: This is a chat between a user and an assistant.\n\nThe Nile is 6650 km long."
        "\n\nUser: How long is the Nile?\n\nAssistant: About 6650 km.\n\nUser: And in miles?\n\nAssistant:",
        "answer": "About 4130 miles.",
        "word count": 30,
    },
    {  # ChatQA 1.5 layout: "messages" plus a separate "document"
        "messages": [{"role": "user", "content": "Who wrote the memo?"}, {"role": "assistant", "content": "Dana."}],
        "document": "Memo by Dana: lunch moves to noon.",
        "answers": ["Dana."],
    },
    {"question": "User: " + "long context " * 600 + "\n\nQ: What repeats?\n\nAssistant:", "answer": "context"},
]


def test_chatqa2_loader_keeps_context_and_drops_the_answer(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chatqa2.jsonl", CHATQA2_RECORDS)
    prompts = load_source("chatqa2", tokenizer, 10, seed=0, data_file=path)
    assert len(prompts) == 3
    assert_no_final_answer(prompts)
    by_text = {content(p): p for p in prompts}
    nile = next(p for t, p in by_text.items() if "Nile" in t)
    assert [m["role"] for m in nile.messages] == ["system", "user", "assistant", "user"]
    assert "6650 km long" in content(nile) and nile.messages[-1]["content"] == "And in miles?"
    assert "4130" not in content(nile)
    memo = next(p for t, p in by_text.items() if "memo" in t)
    assert memo.messages == [{"role": "user", "content": "Memo by Dana: lunch moves to noon.\n\nWho wrote the memo?"}]
    short = load_source("chatqa2", tokenizer, 10, seed=0, data_file=path, max_tokens=512)
    assert len(short) == 2 and all(len(render(p, tokenizer)) <= 512 for p in short)


def test_tulu3_loader_removes_the_final_assistant_turn(tokenizer, tmp_path):
    records = [
        {
            "id": "oasst1_1",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a prime."},
                {"role": "assistant", "content": "7"},
                {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "FINAL ANSWER"},
            ],
            "source": "ai2-adapt-dev/oasst1_converted",
        },
        {"id": "broken", "messages": [{"role": "assistant", "content": "orphan"}], "source": "x"},
    ]
    prompts = load_source("tulu3", tokenizer, 5, data_file=write_jsonl(tmp_path / "tulu.jsonl", records))
    assert [p.id for p in prompts] == ["tulu3:oasst1_1"]
    assert [m["content"] for m in prompts[0].messages] == ["Be brief.", "Name a prime.", "7", "Another?"]


def test_stack_loader_truncates_code_files(tokenizer, tmp_path):
    code = "\n".join(f"x{i} = {i}" for i in range(40))
    records = [
        {"content": code, "lang": "Python", "path": "a.py", "size": len(code), "licenses": ["mit"]},
        {"content": "print(1)", "lang": "Python", "path": "b.py", "size": 8, "licenses": ["mit"]},
    ]
    path = write_jsonl(tmp_path / "stack.jsonl", records)
    prompts = load_source("stack", tokenizer, 5, seed=3, data_file=path)
    assert len(prompts) == 1 and prompts[0] == load_source("stack", tokenizer, 5, seed=3, data_file=path)[0]
    text = content(prompts[0])
    shown = re.search(r"```\n(.*)\n```", text, re.S).group(1).splitlines()
    assert "Python" in text and 10 <= len(shown) < 40 and shown == code.splitlines()[: len(shown)]


def metamath_records(n):
    return [
        {
            "query": f"Tom has {i} pens and buys 2 more. How many pens?",
            "response": f"{i} + 2 = {i + 2}. The answer is: {i + 2}",
            "type": "GSM_Rephrased",
            "original_question": f"Tom has {i} pens.",
        }
        for i in range(n)
    ]


def hellaswag_records(n):
    return [
        {
            "ind": i,
            "activity_label": "Removing ice from car",
            "ctx_a": f"Scene {i}: a man scrapes the windshield.",
            "ctx_b": "he",
            "ctx": f"Scene {i}: a man scrapes the windshield. he",
            "endings": [f"ending {i}-{k}" for k in range(4)],
            "source_id": f"activitynet~v_{i}",
            "split": "train",
            "split_type": "indomain",
            "label": str(i % 4) if i else "",
        }
        for i in range(n)
    ]


def arc_records(n):
    return [
        {
            "id": f"Mercury_{i}",
            "question": f"Which object is number {i}?",
            "choices": {"text": [f"object {i}-{k}" for k in range(4)], "label": ["A", "B", "C", "D"]},
            "answerKey": "ABCD"[i % 4],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("name", "records", "answer"),
    [
        ("metamath", metamath_records(12), r".* The answer is: \d+"),
        ("hellaswag", hellaswag_records(16), r"[ABCD]"),
        ("arc", arc_records(30), r"[ABCD]"),
    ],
)
def test_fewshot_loaders_build_k_shot_prompts(tokenizer, tmp_path, name, records, answer):
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    prompts = load_source(name, tokenizer, 20, seed=1, data_file=path)
    assert len(prompts) == 20 and prompts == load_source(name, tokenizer, 20, seed=1, data_file=path)
    assert_no_final_answer(prompts)
    for prompt in prompts:
        instruction, *shots, query = content(prompt).split("\n\n")
        assert len(shots) == HUB_SOURCES[name].shots
        assert all(re.search(rf"\nAnswer: {answer}$", shot) for shot in shots)
        assert query.endswith("\nAnswer:")
        assert not any(shot.startswith(query) for shot in shots), "the open question is not among its shots"


def test_hellaswag_loader_skips_unlabelled_records(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "hellaswag.jsonl", hellaswag_records(16))
    assert not any("Scene 0:" in content(p) for p in load_source("hellaswag", tokenizer, 30, data_file=path))


def test_hub_mixture_blends_local_files(tokenizer, tmp_path):
    files = {
        "chatqa2": write_jsonl(tmp_path / "c.jsonl", CHATQA2_RECORDS),
        "metamath": write_jsonl(tmp_path / "m.jsonl", metamath_records(10)),
        "arc": write_jsonl(tmp_path / "a.jsonl", arc_records(30)),
    }
    sizes = {"chatqa2": 2, "metamath": 3, "arc": 4}
    prompts = hub_mixture(tokenizer, sizes, seed=0, data_files=files)
    assert Counter(p.source for p in prompts) == sizes
    assert prompts == hub_mixture(tokenizer, sizes, seed=0, data_files=files)
    assert set(PAPER_MIXTURE) == set(HUB_SOURCES)


def test_hub_loading_without_datasets_says_what_to_do(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets.*data_file="):
        load_source("tulu3", tokenizer, 1)
    with pytest.raises(ValueError, match="unknown hub source"):
        load_source("pile", tokenizer, 1)
